//! Getting connections to shards: listeners and the acceptor thread (the
//! per-IP limit is applied later, at the upgrade request: `conn`).
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
use std::time::Instant;

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::admission::{AcceptBackoff, AcceptFailure, Admission};
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

/// The acceptor thread: accept, hand over round-robin, back off while
/// descriptors are exhausted.
pub struct AcceptorHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl AcceptorHandle {
    pub fn spawn(
        mut listener: TcpListener,
        shards: Vec<Inbox>,
        admission: Arc<Admission>,
    ) -> io::Result<AcceptorHandle> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), STOP)?);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || run(poll, listener, shards, admission, stop2))?;
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
    admission: Arc<Admission>,
    stop: Arc<AtomicBool>,
) {
    let mut events = Events::with_capacity(64);
    let mut next = 0usize;
    let mut backoff = AcceptBackoff::default();
    loop {
        let timeout = backoff
            .until()
            .map(|t| t.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("acceptor poll failed: {e}");
            return;
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        if !backoff.may_accept(now) {
            // Out of descriptors a moment ago: a new connection's readiness
            // would only fail again. Edge-triggered readiness will not
            // repeat for connections already queued, so the pause's end
            // (the poll timeout) is what brings us back.
            continue;
        }
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    backoff.recovered(now);
                    let Some(inbox) = shards.get(next % shards.len().max(1)) else {
                        return;
                    };
                    next = next.wrapping_add(1);
                    if !inbox.send(ShardMsg::Adopt { stream, peer }) {
                        return; // shards are gone: shutting down
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    backoff.recovered(now);
                    break;
                }
                Err(e) => match AcceptFailure::of(&e) {
                    AcceptFailure::Connection => {}
                    AcceptFailure::Exhausted => {
                        backoff.exhausted(now, &e, &admission);
                        break;
                    }
                },
            }
        }
    }
}
