//! Starting and stopping Switchboard: bind, spawn the shards (and the
//! acceptor), and the graceful shutdown fan-out.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::accept::{self, AcceptorHandle};
use crate::admission::Admission;
use crate::admission::IpLimiter;
use crate::config::{AcceptMode, Config};
use crate::error::StartError;
use crate::route::Router;
use crate::shard::{Inbox, Opened, Peers, ShardHandle, ShardMsg, ShardSetup};
use crate::stats::Counters;
use crate::store::{
    self, Backend, CLEAN_MARKER, LostHistory, NewEpoch, Revocation, RevocationKind, Writer,
};

/// Hands the writer's results to the shards' inboxes.
struct ShardNotify {
    inboxes: Vec<Inbox>,
}

impl store::Notify for ShardNotify {
    fn done(&self, shard: usize, results: Vec<store::Done>) {
        if let Some(inbox) = self.inboxes.get(shard) {
            inbox.send(ShardMsg::Stored(results));
        }
    }
}

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
    writer: Option<Writer>,
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
        let auth = Arc::new(crate::auth::setup::build(&cfg.auth)?);
        let sealer = crate::ingest::Sealer::from_config(&cfg.ingest)
            .map_err(StartError::Ingest)?
            .map(Arc::new);
        // Storage before the listeners: a start that is about to fail on a
        // damaged or unopenable store must not accept a connection first,
        // and the epochs it changes are durable before anything is served.
        let (backend, loaded) = open_storage(&cfg)?;
        let (addr, listeners, acceptor_listener) = match bind_all(&cfg) {
            Ok(bound) => bound,
            Err(e) => {
                // Nothing was served: the store is still exactly what
                // clients saw, so the next start may trust it.
                if let Some(mut b) = backend {
                    seal(&cfg.storage.data_dir, &mut b, &LostHistory::default());
                }
                return Err(e);
            }
        };
        let admission = Arc::new(Admission::new(cfg.max_connections));
        let limiter = Arc::new(IpLimiter::new(cfg.per_ip_connections_per_minute));
        let mut histories: Vec<Vec<store::LoadedChannel>> = vec![Vec::new(); cfg.shards];
        for ch in loaded.channels {
            let home = crate::route::home_shard(&ch.channel, cfg.shards);
            if let Some(h) = histories.get_mut(home) {
                h.push(ch);
            }
        }
        // Every shard's poller and inbox first, so each shard starts knowing
        // every other one; then the writer (it answers into the inboxes).
        let opened = (0..cfg.shards)
            .map(|_| Opened::new())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|err| StartError::Io {
                what: "shard poller",
                err,
            })?;
        let inboxes: Vec<Inbox> = opened.iter().map(Opened::inbox).collect();
        let peers = Arc::new(Peers::new(inboxes.clone()));
        let router = Arc::new(Router::new(cfg.shards));
        let all_stats: Arc<[Arc<crate::stats::ShardStats>]> =
            opened.iter().map(Opened::stats).collect();
        let writer = match backend {
            Some(b) => Some(
                Writer::spawn(b, &cfg.storage, Arc::new(ShardNotify { inboxes })).map_err(
                    |err| StartError::Io {
                        what: "storage writer thread",
                        err,
                    },
                )?,
            ),
            None => None,
        };
        let mut shards = Vec::with_capacity(cfg.shards);
        let parts = opened.into_iter().zip(listeners).zip(histories);
        for (id, ((opened, listener), history)) in parts.enumerate() {
            let setup = ShardSetup {
                id,
                cfg: cfg.clone(),
                admission: admission.clone(),
                limiter: limiter.clone(),
                tls: tls.clone(),
                listener,
                auth: auth.clone(),
                history,
                revocations: loaded.revocations.clone(),
                sealer: sealer.clone(),
                router: router.clone(),
                peers: peers.clone(),
                all_stats: all_stats.clone(),
                writer: writer.as_ref().map(Writer::handle),
            };
            shards.push(opened.start(setup).map_err(|err| StartError::Io {
                what: "shard thread",
                err,
            })?);
        }
        let acceptor = match acceptor_listener {
            Some(l) => Some(
                AcceptorHandle::spawn(
                    l,
                    shards.iter().map(|s| s.inbox.clone()).collect(),
                    admission.clone(),
                )
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
            writer,
        })
    }

    /// Revoke every token of `user` issued up to now (`RevocationKind::User`)
    /// or the token with id `value` (`Token`): connected sockets get
    /// `token_revoked` and close 4001, later connects are refused, and the
    /// revocation is stored (it survives a restart). Kept for
    /// `auth.revocation_ttl`.
    pub fn revoke(
        &self,
        kind: RevocationKind,
        value: &str,
        reason: &str,
    ) -> Result<(), RevokeError> {
        let now = crate::clock::now_ms();
        let ttl = i64::try_from(self.cfg.auth.revocation_ttl.as_millis()).unwrap_or(i64::MAX);
        let r = Revocation {
            kind,
            value: value.to_owned(),
            revoked_at_ms: now,
            expires_at_ms: now.saturating_add(ttl),
            reason: reason.to_owned(),
        };
        if let Some(w) = &self.writer {
            w.handle()
                .try_send(store::Request {
                    op: store::Op::Revoke(r.clone()),
                    ticket: None,
                })
                .map_err(|_| RevokeError::StorageBusy)?;
        }
        let r = Arc::new(r);
        for s in &self.shards {
            s.inbox.send(ShardMsg::Revoke(r.clone()));
        }
        Ok(())
    }

    /// Requests waiting for the storage writer.
    pub fn writer_depth(&self) -> usize {
        self.writer.as_ref().map_or(0, |w| w.handle().depth())
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
        let mut panicked = 0;
        for s in &mut self.shards {
            if let Some(t) = s.thread.take()
                && t.join().is_err()
            {
                panicked += 1;
            }
            if s.stats.snapshot().sockets > 0 {
                timed_out += 1;
            }
        }
        // Shards are gone: everything they queued is written before we return.
        if let Some(mut w) = self.writer.take() {
            let backend = w.shutdown();
            match backend {
                // A shard that died may have numbered publications it never
                // handed to the writer: no channel can be vouched for.
                Some(mut b) if panicked == 0 => {
                    seal(&self.cfg.storage.data_dir, &mut b, &w.lost_history());
                }
                _ => log::warn!(
                    "storage: a shard or the writer panicked; every channel starts a new epoch \
                     at the next start"
                ),
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
        if self.shards.iter().any(|s| s.thread.is_some()) || self.writer.is_some() {
            self.stop(Duration::ZERO);
        }
    }
}

/// The address listened on, one listener slot per shard (filled in
/// reuseport mode), and the acceptor's listener (acceptor mode).
type Bound = (
    SocketAddr,
    Vec<Option<mio::net::TcpListener>>,
    Option<mio::net::TcpListener>,
);

fn bind_all(cfg: &Config) -> Result<Bound, StartError> {
    let want = SocketAddr::new(cfg.bind_ip(), cfg.port);
    let reuse = cfg.accept == AcceptMode::Reuseport;
    let first = accept::bind(want, reuse).map_err(|err| StartError::Bind { addr: want, err })?;
    let addr = first
        .local_addr()
        .map_err(|err| StartError::Bind { addr: want, err })?;
    let mut listeners: Vec<Option<mio::net::TcpListener>> = Vec::new();
    if reuse {
        listeners.push(Some(first));
        for _ in 1..cfg.shards {
            // Same port as the first (which may have been port 0).
            let l = accept::bind(addr, true).map_err(|err| StartError::Bind { addr, err })?;
            listeners.push(Some(l));
        }
        Ok((addr, listeners, None))
    } else {
        listeners.resize_with(cfg.shards, || None);
        Ok((addr, listeners, Some(first)))
    }
}

/// Open the store and read back what must outlive a restart, before any
/// shard runs: channel histories go to their home shards, every shard
/// gets every live revocation.
///
/// Publications are numbered before their copies are committed, so the
/// stored offsets are trusted only after a clean shutdown that vouched for
/// them: the marker file must hold the token that shutdown stored in the
/// database (a restored or swapped database file does not match). Otherwise
/// every channel starts a new epoch (its kept publications dropped), and
/// that is committed before the server listens: a client is then told
/// `recovered: false`, never a wrong `recovered: true`, and the new epochs
/// hold across any later restart.
fn open_storage(cfg: &Config) -> Result<(Option<Box<dyn Backend>>, store::Loaded), StartError> {
    let history_budget = u64::try_from(cfg.history.max_bytes).unwrap_or(u64::MAX);
    let (mut b, describe): (Box<dyn Backend>, String) = match cfg.storage.backend {
        crate::config::StorageBackend::None => return Ok((None, store::Loaded::default())),
        crate::config::StorageBackend::Sqlite => {
            let mut b = store::SqliteBackend::open(&cfg.storage, &cfg.ingest.table)
                .map_err(StartError::Storage)?;
            b.set_history_budget(history_budget);
            let describe = b.path().display().to_string();
            (Box::new(b), describe)
        }
        crate::config::StorageBackend::Postgres => {
            // The clean-shutdown marker stays a local file: it vouches for
            // this node's last run (see `seal`).
            std::fs::create_dir_all(&cfg.storage.data_dir).map_err(|err| {
                StartError::Storage(store::StoreError::Io {
                    path: cfg.storage.data_dir.clone(),
                    err,
                })
            })?;
            // Start-up lines are held back until the start succeeds or
            // fails (`logging::hold`); a wait of up to `start_retry` for the
            // database must be visible while it lasts.
            let mut b = store::PostgresBackend::open_waiting(
                &cfg.storage.postgres,
                cfg.storage.synchronous,
                &cfg.ingest.table,
                &mut crate::logging::release,
            )
            .map_err(StartError::Storage)?;
            b.set_history_budget(history_budget);
            let describe = b.describe().to_owned();
            (Box::new(b), describe)
        }
    };
    let mut loaded = b
        .load(crate::clock::now_ms())
        .map_err(StartError::Storage)?;
    let marker_path = cfg.storage.data_dir.join(CLEAN_MARKER);
    let marker = match std::fs::read_to_string(&marker_path) {
        Ok(token) => Some(token.trim().to_owned()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => {
            return Err(StartError::Io {
                what: "the clean-shutdown marker",
                err,
            });
        }
    };
    let clean = marker.is_some() && marker == loaded.clean_token;
    if marker.is_some() && !clean {
        log::warn!(
            "storage: {} does not match the database (restored, copied or replaced?): \
             its channel offsets are not trusted",
            marker_path.display()
        );
    }
    let mut renew = Vec::new();
    if !clean {
        if !loaded.channels.is_empty() {
            log::warn!(
                "storage: the last run did not shut down cleanly; {} channel histories start \
                 new epochs",
                loaded.channels.len()
            );
        }
        for ch in &mut loaded.channels {
            ch.epoch = crate::history::fresh_epoch();
            ch.publications.clear();
            renew.push(NewEpoch {
                channel: Arc::from(ch.channel.as_str()),
                epoch: Arc::from(ch.epoch.as_str()),
            });
        }
    }
    // A channel whose rule keeps nothing now is not written while it is
    // used: restoring its stored epoch would let its offsets be reused.
    // (Renewed above all the same: a later run that keeps its history again
    // must not trust a position from before a crash.)
    loaded
        .channels
        .retain(|ch| cfg.history.rule(&ch.channel).size > 0);
    // Durable before anything is served: the new epochs, and no clean
    // token (this run has not ended cleanly yet, whatever happens to the
    // marker file).
    b.mark(&renew, None).map_err(StartError::Storage)?;
    if let Err(err) = std::fs::remove_file(&marker_path)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        return Err(StartError::Io {
            what: "the clean-shutdown marker",
            err,
        });
    }
    log::info!(
        "storage: {} ({} channel histories, {} revocations restored)",
        describe,
        loaded.channels.len(),
        loaded.revocations.len()
    );
    Ok((Some(b), loaded))
}

/// After the last commit of a graceful shutdown: give a new epoch to every
/// channel whose history copies were lost (refused by a full queue, or
/// failed in the backend), then vouch for the rest with a fresh token in
/// the database and the same token in the marker file. When that cannot be
/// done, no marker is written and every channel starts a new epoch next time.
fn seal(dir: &Path, backend: &mut Box<dyn Backend>, lost: &LostHistory) {
    if lost.all {
        log::warn!(
            "storage: history copies of too many channels were lost; every channel starts a \
             new epoch at the next start"
        );
        return;
    }
    let renew: Vec<NewEpoch> = lost
        .channels
        .iter()
        .map(|c| NewEpoch {
            channel: c.clone(),
            epoch: Arc::from(crate::history::fresh_epoch()),
        })
        .collect();
    if !renew.is_empty() {
        log::warn!(
            "storage: history copies of {} channels were lost; they start new epochs",
            renew.len()
        );
    }
    let token = format!(
        "{}{}",
        crate::history::fresh_epoch(),
        crate::history::fresh_epoch()
    );
    if let Err(e) = backend.mark(&renew, Some(&token)) {
        log::warn!(
            "storage: cannot record the clean shutdown ({e}); every channel starts a new epoch \
             at the next start"
        );
        return;
    }
    let marker = dir.join(CLEAN_MARKER);
    let written = std::fs::File::create(&marker).and_then(|mut f| {
        use std::io::Write;
        f.write_all(token.as_bytes())?;
        f.sync_all()?;
        // The marker's directory entry, durable too.
        std::fs::File::open(dir)?.sync_all()
    });
    if let Err(e) = written {
        log::warn!(
            "storage: cannot write {} ({e}); every channel starts a new epoch at the next start",
            marker.display()
        );
    }
}

/// Why a revocation was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeError {
    /// The storage writer's queue is full: nothing was revoked; retry.
    StorageBusy,
}

impl std::fmt::Display for RevokeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the storage queue is full; nothing was revoked, retry")
    }
}

impl std::error::Error for RevokeError {}
