//! Getting connections to shards: listeners, the acceptor thread, and the
//! per-IP connection rate limit.
//!
//! Two modes (config `accept`), measured in docs/ARCHITECTURE.md:
//! * `acceptor`: one thread owns the listener and hands each socket to the
//!   next shard in turn through its inbox;
//! * `reuseport`: each shard owns an SO_REUSEPORT listener on the same port
//!   and the kernel spreads connections by hashing the 4-tuple.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::admission::IpLimiter;
use crate::shard::{Inbox, ShardMsg};

/// Pending connections the kernel may queue (capped by net.core.somaxconn).
const BACKLOG: i32 = 4096;

/// Bind a non-blocking listener, optionally with SO_REUSEPORT.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

const LISTENER: Token = Token(0);
const STOP: Token = Token(1);

/// The acceptor thread: accept, count per IP, hand over round-robin.
pub struct AcceptorHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl AcceptorHandle {
    pub fn spawn(
        mut listener: TcpListener,
        shards: Vec<Inbox>,
        limiter: Arc<IpLimiter>,
    ) -> io::Result<AcceptorHandle> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), STOP)?);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || run(poll, listener, shards, limiter, stop2))?;
        Ok(AcceptorHandle {
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// Stop accepting (the listener closes) and wait for the thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AcceptorHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    mut poll: Poll,
    listener: TcpListener,
    shards: Vec<Inbox>,
    limiter: Arc<IpLimiter>,
    stop: Arc<AtomicBool>,
) {
    let mut events = Events::with_capacity(64);
    let mut next = 0usize;
    let mut retry: Option<Duration> = None;
    loop {
        if let Err(e) = poll.poll(&mut events, retry) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("acceptor poll failed: {e}");
            return;
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        retry = None;
        let now = Instant::now();
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let rate_limited = limiter.is_limited(peer.ip(), now);
                    let Some(inbox) = shards.get(next % shards.len().max(1)) else {
                        return;
                    };
                    next = next.wrapping_add(1);
                    if !inbox.send(ShardMsg::Adopt {
                        stream,
                        peer,
                        rate_limited,
                    }) {
                        return; // shards are gone: shutting down
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: connections stay queued in the
                    // kernel; edge-triggered readiness will not repeat, so poll again soon.
                    log::warn!("accept failed: {e}; retrying in 100 ms");
                    retry = Some(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}
