//! Starting and stopping Switchboard: bind, spawn the shards (and the
//! acceptor), and the graceful shutdown fan-out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::accept::{self, AcceptorHandle, IpLimiter};
use crate::config::{AcceptMode, Config};
use crate::conn::Admission;
use crate::error::StartError;
use crate::route::Router;
use crate::shard::{Shard, ShardHandle, ShardMsg, ShardSetup};
use crate::stats::Counters;

/// A running server. Dropping it shuts it down immediately; call
/// [`Server::shutdown`] for the graceful path.
pub struct Server {
    cfg: Arc<Config>,
    addr: SocketAddr,
    shards: Vec<ShardHandle>,
    acceptor: Option<AcceptorHandle>,
    admission: Arc<Admission>,
    router: Arc<Router>,
    started: Instant,
}

/// What a graceful shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections open when shutdown began.
    pub connections: u64,
    /// Shards that still had connections at the deadline.
    pub shards_timed_out: usize,
}

impl Server {
    /// Bind and start serving. Returns once every shard is running.
    pub fn start(cfg: Config) -> Result<Server, StartError> {
        cfg.validate()?;
        let cfg = Arc::new(cfg);
        let tls = if cfg.tls.enabled() {
            Some(crate::tls::load(&cfg.tls)?)
        } else {
            None
        };
        let admission = Arc::new(Admission::new(cfg.max_connections));
        let limiter = Arc::new(IpLimiter::new(cfg.per_ip_connections_per_minute));
        let want = SocketAddr::new(cfg.bind_ip(), cfg.port);
        let reuse = cfg.accept == AcceptMode::Reuseport;
        let first =
            accept::bind(want, reuse).map_err(|err| StartError::Bind { addr: want, err })?;
        let addr = first
            .local_addr()
            .map_err(|err| StartError::Bind { addr: want, err })?;
        let mut listeners: Vec<Option<mio::net::TcpListener>> = Vec::new();
        let mut acceptor_listener = None;
        if reuse {
            listeners.push(Some(first));
            for _ in 1..cfg.shards {
                // Same port as the first (which may have been port 0).
                let l = accept::bind(addr, true).map_err(|err| StartError::Bind { addr, err })?;
                listeners.push(Some(l));
            }
        } else {
            acceptor_listener = Some(first);
            listeners.resize_with(cfg.shards, || None);
        }
        let auth = Arc::new(crate::auth_setup::build(&cfg.auth)?);
        let mut prepared = Vec::with_capacity(cfg.shards);
        for (id, listener) in listeners.into_iter().enumerate() {
            let p = Shard::prepare(ShardSetup {
                id,
                cfg: cfg.clone(),
                admission: admission.clone(),
                limiter: limiter.clone(),
                tls: tls.clone(),
                listener,
                auth: auth.clone(),
            })
            .map_err(|err| StartError::Io {
                what: "shard poller",
                err,
            })?;
            prepared.push(p);
        }
        let router = Arc::new(Router::new(prepared.iter().map(|p| p.inbox()).collect()));
        let all_stats: Arc<[Arc<crate::stats::ShardStats>]> =
            prepared.iter().map(|p| p.stats()).collect();
        let mut shards = Vec::with_capacity(cfg.shards);
        for p in prepared {
            shards.push(p.spawn(router.clone(), all_stats.clone()).map_err(|err| {
                StartError::Io {
                    what: "shard thread",
                    err,
                }
            })?);
        }
        let acceptor = match acceptor_listener {
            Some(l) => Some(
                AcceptorHandle::spawn(l, shards.iter().map(|s| s.inbox.clone()).collect(), limiter)
                    .map_err(|err| StartError::Io {
                        what: "acceptor thread",
                        err,
                    })?,
            ),
            None => None,
        };
        log::info!(
            "switchboard {} listening on {}://{addr} with {} shards ({:?} accept); ws {} echo {}",
            env!("CARGO_PKG_VERSION"),
            if tls.is_some() { "wss" } else { "ws" },
            cfg.shards,
            cfg.accept,
            cfg.ws_path,
            if cfg.echo_enabled {
                cfg.echo_path.as_str()
            } else {
                "off"
            },
        );
        Ok(Server {
            cfg,
            addr,
            shards,
            acceptor,
            admission,
            router,
            started: Instant::now(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Open WebSocket connections (admission count, exact).
    pub fn open_connections(&self) -> usize {
        self.admission.open()
    }

    /// The routing table (users and channels online).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Counters per shard, as last published (at most one loop turn old).
    pub fn shard_stats(&self) -> Vec<Counters> {
        self.shards.iter().map(|s| s.stats.snapshot()).collect()
    }

    /// Totals across shards.
    pub fn stats(&self) -> Counters {
        Counters::total(self.shards.iter().map(|s| s.stats.as_ref()))
    }

    /// Stop accepting, close every client with 1001, and wait at most the
    /// configured shutdown timeout for them to finish.
    pub fn shutdown(mut self) -> ShutdownReport {
        let timeout = self.cfg.shutdown_timeout;
        self.stop(timeout)
    }

    fn stop(&mut self, timeout: Duration) -> ShutdownReport {
        if let Some(mut a) = self.acceptor.take() {
            a.stop();
        }
        let connections = self.stats().connections;
        let deadline = Instant::now() + timeout;
        for s in &self.shards {
            s.inbox.send(ShardMsg::Shutdown { deadline });
        }
        let mut timed_out = 0;
        for s in &mut self.shards {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
            if s.stats.snapshot().sockets > 0 {
                timed_out += 1;
            }
        }
        ShutdownReport {
            connections,
            shards_timed_out: timed_out,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.shards.iter().any(|s| s.thread.is_some()) {
            self.stop(Duration::ZERO);
        }
    }
}
