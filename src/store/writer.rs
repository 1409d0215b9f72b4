//! The writer thread: one consumer of a bounded queue that applies whatever
//! has accumulated in one backend call (group commit).
//!
//! The batch grows by itself under load: while a commit is being made, new
//! requests queue up, and the next loop turn takes them all (at most
//! `max_batch`). An idle writer commits a single request at once, so there
//! is no latency added to wait for a batch to fill.
//!
//! Shutdown must not lose a request a shard was told was queued. Senders
//! announce themselves in `inflight` before they look at `closing`; shutdown
//! sets `closing` and then waits for `inflight` to drain, so after it no
//! request can enter the queue, and the thread drains what is there.
//!
//! The writer also remembers which channels' history copies it did not
//! keep (refused by the full queue, or failed in the backend): their stored
//! offsets are behind what clients saw, so the next start must give them
//! new epochs ([`Writer::lost_history`]). Nothing else it refuses or fails
//! costs history: every other request is either answered (the client knows
//! it was not stored) or harmless to lose (an inbox ack means a redelivery).

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, select};

use super::{Backend, Done, Notify, Op, Request, StoreError};
use crate::clock::now_ms;
use crate::config::StorageConfig;

/// How often expired history, inbox messages and revocations are deleted.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A request the queue did not take; the caller gets it back.
#[derive(Debug)]
pub enum SendError {
    /// The queue is full: answer `overloaded`.
    Full(Request),
    /// The writer is shutting down or gone.
    Closed(Request),
}

impl SendError {
    pub fn into_request(self) -> Request {
        match self {
            SendError::Full(r) | SendError::Closed(r) => r,
        }
    }
}

/// Counters of the writer since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Backend calls (one transaction each, unless one op had to be isolated).
    pub batches: u64,
    pub ops: u64,
    /// Ops answered with an error, plus failed prunes.
    pub errors: u64,
    pub last_batch: u64,
    pub max_batch: u64,
    /// Time spent in the backend applying batches, in microseconds.
    pub commit_us: u64,
    /// Expired rows deleted.
    pub pruned: u64,
    /// Bytes of the requests queued or being applied (`storage.queue_bytes`).
    pub queued_bytes: u64,
    /// Requests refused because `storage.queue_bytes` were queued.
    pub refused_bytes: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    ops: AtomicU64,
    errors: AtomicU64,
    last_batch: AtomicU64,
    max_batch: AtomicU64,
    commit_us: AtomicU64,
    pruned: AtomicU64,
    refused_bytes: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WriterStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WriterStats {
            batches: get(&self.batches),
            ops: get(&self.ops),
            errors: get(&self.errors),
            last_batch: get(&self.last_batch),
            max_batch: get(&self.max_batch),
            commit_us: get(&self.commit_us),
            pruned: get(&self.pruned),
            queued_bytes: 0,
            refused_bytes: get(&self.refused_bytes),
        }
    }
}

/// Past this many channels with lost history copies, every channel is
/// treated as one (the set stays small whatever happens).
const MAX_LOST_NAMED: usize = 65_536;

/// Channels whose history copy was not kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LostHistory {
    /// Too many to name, or a batch failed without saying which: all of them.
    pub all: bool,
    pub channels: HashSet<Arc<str>>,
}

impl LostHistory {
    pub fn is_empty(&self) -> bool {
        !self.all && self.channels.is_empty()
    }

    fn note(&mut self, channel: &Arc<str>) {
        if self.all {
            return;
        }
        if self.channels.len() >= MAX_LOST_NAMED {
            self.all = true;
            self.channels = HashSet::new();
        } else if !self.channels.contains(channel) {
            self.channels.insert(channel.clone());
        }
    }
}

struct Shared {
    closing: AtomicBool,
    /// Senders between their `closing` check and their send.
    inflight: AtomicUsize,
    /// Bytes (by [`Op::weight`]) of the requests queued or in the batch
    /// being applied: the queue is bounded by count (`queue_capacity`) and by
    /// these (`queue_bytes`), so large requests cannot pile up gigabytes.
    bytes: AtomicUsize,
    max_bytes: usize,
    counters: Counters,
    /// Touched only when a history copy is lost (rare): a lock is fine.
    lost: Mutex<LostHistory>,
    /// The backend can take writes (`/readyz`); false while a database
    /// connection is down.
    available: AtomicBool,
}

impl Shared {
    fn lost_copy(&self, channel: &Arc<str>) {
        match self.lost.lock() {
            Ok(mut l) => l.note(channel),
            Err(poisoned) => poisoned.into_inner().all = true,
        }
    }
}

/// Send side, cloned into every shard.
#[derive(Clone)]
pub struct WriterHandle {
    tx: Sender<Request>,
    shared: Arc<Shared>,
}

impl WriterHandle {
    /// Queue a request without blocking.
    #[expect(
        clippy::result_large_err,
        reason = "the request comes back so the caller can answer it; no allocation per send"
    )]
    pub fn try_send(&self, req: Request) -> Result<(), SendError> {
        self.shared.inflight.fetch_add(1, Ordering::SeqCst);
        let w = req.op.weight();
        let shared = &self.shared;
        let res = if shared.closing.load(Ordering::SeqCst) {
            Err(SendError::Closed(req))
        } else if over_budget(
            shared.bytes.fetch_add(w, Ordering::AcqRel),
            w,
            shared.max_bytes,
        ) {
            shared.bytes.fetch_sub(w, Ordering::AcqRel);
            shared
                .counters
                .refused_bytes
                .fetch_add(1, Ordering::Relaxed);
            Err(SendError::Full(req))
        } else {
            self.tx.try_send(req).map_err(|e| {
                shared.bytes.fetch_sub(w, Ordering::AcqRel);
                match e {
                    TrySendError::Full(r) => SendError::Full(r),
                    TrySendError::Disconnected(r) => SendError::Closed(r),
                }
            })
        };
        self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
        if let Err(SendError::Full(r) | SendError::Closed(r)) = &res
            && let Op::Publication { channel, .. } = &r.op
        {
            // Nobody waits for a history copy: the loss must be remembered.
            self.shared.lost_copy(channel);
        }
        res
    }

    /// Requests waiting (for status/metrics).
    pub fn depth(&self) -> usize {
        self.tx.len()
    }

    pub fn stats(&self) -> WriterStats {
        let mut st = self.shared.counters.snapshot();
        st.queued_bytes = self.shared.bytes.load(Ordering::Acquire) as u64;
        st
    }

    /// Whether the backend can take writes now (false while the database
    /// connection is down and being re-established).
    pub fn available(&self) -> bool {
        self.shared.available.load(Ordering::Relaxed)
    }
}

/// With `before` bytes queued, may a request of `w` more not be taken?
/// An empty queue takes any one request, so one larger than the budget is
/// not refused for ever.
fn over_budget(before: usize, w: usize, max: usize) -> bool {
    before > 0 && before.saturating_add(w) > max
}

/// The running writer thread (named "writer").
pub struct Writer {
    handle: WriterHandle,
    stop: Sender<()>,
    /// Gives the backend back when it ends (`None`: it panicked).
    thread: Option<JoinHandle<Box<dyn Backend>>>,
}

impl Writer {
    /// Start the thread. It blocks on the queue, takes everything queued (up
    /// to `max_batch`), applies it in one `backend.apply` call, then calls
    /// `notify.done` once per shard with that shard's results in request
    /// order. It prunes expired rows at start and every [`PRUNE_EVERY`].
    pub fn spawn(
        backend: Box<dyn Backend>,
        cfg: &StorageConfig,
        notify: Arc<dyn Notify>,
    ) -> std::io::Result<Writer> {
        let (tx, rx) = crossbeam_channel::bounded(cfg.queue_capacity.max(1));
        let (stop, stop_rx) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Shared {
            closing: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_bytes: cfg.queue_bytes.max(1),
            counters: Counters::default(),
            lost: Mutex::new(LostHistory::default()),
            available: AtomicBool::new(backend.available()),
        });
        let mut run = Run {
            backend,
            notify,
            shared: shared.clone(),
            max_batch: cfg.max_batch.max(1),
            episode: crate::stats::Episode::new("storage writes", log::Level::Error),
        };
        let thread = std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || {
                run.main(&rx, &stop_rx);
                run.backend
            })?;
        Ok(Writer {
            handle: WriterHandle { tx, shared },
            stop,
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> WriterHandle {
        self.handle.clone()
    }

    pub fn stats(&self) -> WriterStats {
        self.handle.stats()
    }

    /// Stop accepting, apply everything already queued (committed and
    /// notified), join the thread, and give the backend back (`None` if
    /// the thread panicked, or on a second call). Idempotent; also done on drop.
    pub fn shutdown(&mut self) -> Option<Box<dyn Backend>> {
        let thread = self.thread.take()?;
        let shared = &self.handle.shared;
        shared.closing.store(true, Ordering::SeqCst);
        while shared.inflight.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        let _ = self.stop.send(()); // Err: the thread is gone already
        match thread.join() {
            Ok(backend) => Some(backend),
            Err(_) => {
                log::error!("the storage writer thread panicked");
                None
            }
        }
    }

    /// Channels whose history copies were refused or failed so far.
    pub fn lost_history(&self) -> LostHistory {
        match self.handle.shared.lost.lock() {
            Ok(l) => l.clone(),
            Err(_) => LostHistory {
                all: true,
                channels: HashSet::new(),
            },
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The thread's state.
struct Run {
    backend: Box<dyn Backend>,
    notify: Arc<dyn Notify>,
    shared: Arc<Shared>,
    max_batch: usize,
    /// Failed writes, logged once per episode.
    episode: crate::stats::Episode,
}

impl Run {
    fn main(&mut self, rx: &Receiver<Request>, stop: &Receiver<()>) {
        let mut next_prune = Instant::now();
        let mut batch = Vec::with_capacity(self.max_batch.min(4096));
        loop {
            let mut wait = next_prune.saturating_duration_since(Instant::now());
            if !self.backend.available() {
                // Down: wake for the next reconnection attempt too.
                if let Some(retry) = self.backend.retry_in() {
                    wait = wait.min(retry);
                }
            }
            let stopping = select! {
                recv(rx) -> req => match req {
                    Ok(req) => {
                        batch.push(req);
                        false
                    }
                    Err(_) => true,
                },
                recv(stop) -> _ => true,
                default(wait) => false,
            };
            // Everything queued, in batches of max_batch.
            loop {
                batch.extend(rx.try_iter().take(self.max_batch - batch.len()));
                if batch.is_empty() {
                    break;
                }
                self.run_batch(std::mem::take(&mut batch));
                if !stopping {
                    break;
                }
            }
            if stopping {
                return;
            }
            if !self.backend.available() {
                let up =
                    catch_unwind(AssertUnwindSafe(|| self.backend.reconnect())).unwrap_or(false);
                self.shared.available.store(up, Ordering::Relaxed);
                if !up {
                    continue; // prune once it is back
                }
            }
            if Instant::now() >= next_prune {
                self.prune();
                next_prune = Instant::now() + PRUNE_EVERY;
            }
        }
    }

    fn run_batch(&mut self, batch: Vec<Request>) {
        let n = batch.len();
        let weight: usize = batch.iter().map(|r| r.op.weight()).sum();
        // The channel of each history copy, to remember it if it fails.
        let copies: Vec<Option<Arc<str>>> = batch
            .iter()
            .map(|r| match &r.op {
                Op::Publication { channel, .. } => Some(channel.clone()),
                _ => None,
            })
            .collect();
        let (ops, tickets): (Vec<_>, Vec<_>) = batch.into_iter().map(|r| (r.op, r.ticket)).unzip();
        let started = Instant::now();
        let results = catch_unwind(AssertUnwindSafe(|| self.backend.apply(ops)));
        let took = started.elapsed();
        let results = results.unwrap_or_else(|_| {
            log::error!("the storage backend panicked applying a batch of {n}");
            let e = Arc::new(StoreError::BackendPanicked);
            (0..n).map(|_| Err(e.clone())).collect()
        });
        let c = &self.shared.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.ops.fetch_add(n as u64, Ordering::Relaxed);
        c.last_batch.store(n as u64, Ordering::Relaxed);
        c.max_batch.fetch_max(n as u64, Ordering::Relaxed);
        c.commit_us.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );

        // Group by shard, keeping request order; a missing result is an error.
        let mut per_shard: Vec<(usize, Vec<Done>)> = Vec::new();
        let mut results = results.into_iter();
        let mut errors = 0;
        for (ticket, copy) in tickets.into_iter().zip(copies) {
            let result = results
                .next()
                .unwrap_or_else(|| Err(Arc::new(StoreError::NoResult)));
            if let Err(e) = &result {
                errors += 1;
                if let Some(channel) = &copy {
                    self.shared.lost_copy(channel);
                }
                // One line per episode (a full disk fails every request
                // until space returns), not one per request; the count is
                // in `switchboard_store_errors_total`. An outage of the
                // database is logged once by the backend (lost connection,
                // reconnected), so it does not open an episode here too.
                if !e.is_outage() {
                    let waits = if ticket.is_some() {
                        "the client got storage_error"
                    } else {
                        "nobody waits for it"
                    };
                    self.episode.failed(started, &format_args!("{e} ({waits})"));
                }
            }
            let Some(ticket) = ticket else { continue };
            let done = Done {
                token: ticket.token,
                result,
            };
            match per_shard.iter_mut().find(|(s, _)| *s == ticket.shard) {
                Some((_, v)) => v.push(done),
                None => per_shard.push((ticket.shard, vec![done])),
            }
        }
        c.errors.fetch_add(errors, Ordering::Relaxed);
        self.shared
            .available
            .store(self.backend.available(), Ordering::Relaxed);
        // The batch's memory is released here (its ops are dropped with
        // `apply`): its room in the budget is free again.
        self.shared.bytes.fetch_sub(weight, Ordering::AcqRel);
        if errors == 0 {
            // Ends the failure episode if the last failure is a while ago.
            let _ended = self.episode.succeeded(Instant::now());
        }
        for (shard, results) in per_shard {
            self.notify.done(shard, results);
        }
    }

    fn prune(&mut self) {
        let c = &self.shared.counters;
        match catch_unwind(AssertUnwindSafe(|| self.backend.prune(now_ms()))) {
            Ok(Ok(n)) => {
                c.pruned.fetch_add(n as u64, Ordering::Relaxed);
                if n > 0 {
                    log::debug!("pruned {n} expired rows");
                }
            }
            Ok(Err(e)) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("pruning expired rows failed: {e}");
            }
            Err(_) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                log::error!("the storage backend panicked pruning");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Loaded, Op, Outcome, SqliteBackend, Ticket};
    use crossbeam_channel::Receiver;

    /// Results arrive on a channel, one message per `done` call.
    struct ChanNotify(Sender<(usize, Vec<Done>)>);

    impl Notify for ChanNotify {
        fn done(&self, shard: usize, results: Vec<Done>) {
            self.0.send((shard, results)).unwrap();
        }
    }

    /// Answers every op `Done`; each `apply` first reports that it started,
    /// then waits until the test opens the gate (drops its sender).
    struct Gated {
        entered: Sender<usize>,
        gate: Receiver<()>,
        panic_first: bool,
    }

    impl Backend for Gated {
        fn set_history_budget(&mut self, _: u64) {}
        fn history_bytes(&self) -> u64 {
            0
        }
        fn apply(&mut self, ops: Vec<Op>) -> Vec<Result<Outcome, Arc<StoreError>>> {
            let _ = self.entered.send(ops.len());
            let _ = self.gate.recv();
            if std::mem::take(&mut self.panic_first) {
                panic!("test panic");
            }
            ops.iter().map(|_| Ok(Outcome::Done)).collect()
        }
        fn load(&mut self, _: i64) -> Result<Loaded, StoreError> {
            Ok(Loaded::default())
        }
        fn prune(&mut self, _: i64) -> Result<usize, StoreError> {
            Ok(0)
        }
        fn mark(
            &mut self,
            _: &[crate::store::NewEpoch],
            _: Option<&str>,
        ) -> Result<(), StoreError> {
            Ok(())
        }
    }

    struct Setup {
        writer: Writer,
        results: Receiver<(usize, Vec<Done>)>,
        entered: Receiver<usize>,
        gate: Option<Sender<()>>,
    }

    fn gated(queue_capacity: usize, max_batch: usize, panic_first: bool) -> Setup {
        let (entered_tx, entered) = crossbeam_channel::unbounded();
        let (gate, gate_rx) = crossbeam_channel::unbounded();
        let (tx, results) = crossbeam_channel::unbounded();
        let cfg = StorageConfig {
            queue_capacity,
            max_batch,
            ..StorageConfig::default()
        };
        let backend = Gated {
            entered: entered_tx,
            gate: gate_rx,
            panic_first,
        };
        let writer = Writer::spawn(Box::new(backend), &cfg, Arc::new(ChanNotify(tx))).unwrap();
        Setup {
            writer,
            results,
            entered,
            gate: Some(gate),
        }
    }

    fn req(shard: usize, token: u64) -> Request {
        Request {
            op: Op::InboxAck {
                user: "u".into(),
                id: 1,
            },
            ticket: Some(Ticket { shard, token }),
        }
    }

    /// Every (shard, token, result) received, in arrival order, until `n`.
    fn collect(rx: &Receiver<(usize, Vec<Done>)>, n: usize) -> Vec<(usize, Done)> {
        let mut all = Vec::new();
        while all.len() < n {
            let (shard, results) = rx.recv().unwrap();
            assert!(!results.is_empty());
            all.extend(results.into_iter().map(|d| (shard, d)));
        }
        assert!(rx.try_recv().is_err(), "more results than requests");
        all
    }

    #[test]
    fn group_commit_batches_and_answers_every_token_once_in_order() {
        let mut s = gated(4096, 100, false);
        let h = s.writer.handle();
        h.try_send(req(0, 0)).unwrap();
        assert_eq!(s.entered.recv().unwrap(), 1); // the writer is inside apply
        for token in 1..1000 {
            h.try_send(req(token as usize % 3, token)).unwrap();
        }
        assert_eq!(h.depth(), 999);
        s.gate = None; // open
        let all = collect(&s.results, 1000);
        for shard in 0..3 {
            let tokens: Vec<u64> = all
                .iter()
                .filter(|(s, _)| *s == shard)
                .map(|(_, d)| d.token)
                .collect();
            let expected: Vec<u64> = (0..1000).filter(|t| t % 3 == shard as u64).collect();
            assert_eq!(tokens, expected, "shard {shard}");
        }
        assert!(all.iter().all(|(_, d)| d.result.is_ok()));
        let st = s.writer.stats();
        // 1, then the 999 queued meanwhile in batches of at most 100.
        assert_eq!(st.batches, 11);
        assert_eq!(
            (st.ops, st.max_batch, st.last_batch, st.errors),
            (1000, 100, 99, 0)
        );
        let sizes: Vec<usize> = s.entered.try_iter().collect();
        assert_eq!(sizes.len(), 10);
        assert_eq!(h.depth(), 0);
    }

    #[test]
    fn try_send_reports_full_then_closed() {
        let mut s = gated(8, 4096, false);
        let h = s.writer.handle();
        h.try_send(req(0, 0)).unwrap();
        s.entered.recv().unwrap();
        for token in 1..=8 {
            h.try_send(req(0, token)).unwrap();
        }
        match h.try_send(req(0, 9)) {
            Err(SendError::Full(r)) => assert_eq!(r.ticket.unwrap().token, 9),
            other => panic!("{other:?}"),
        }
        s.gate = None;
        let tokens: Vec<u64> = collect(&s.results, 9)
            .iter()
            .map(|(_, d)| d.token)
            .collect();
        assert_eq!(tokens, (0..=8).collect::<Vec<_>>());
        s.writer.shutdown();
        s.writer.shutdown(); // idempotent
        assert!(matches!(h.try_send(req(0, 10)), Err(SendError::Closed(_))));
    }

    fn copy(channel: &str, offset: u64) -> Request {
        Request {
            op: Op::Publication {
                channel: channel.into(),
                epoch: "e".into(),
                offset,
                payload: Arc::from(&b"{}"[..]),
                at_ms: 1,
                expires_at_ms: i64::MAX,
                keep: 10,
            },
            ticket: None,
        }
    }

    #[test]
    fn only_lost_history_copies_are_remembered() {
        let mut s = gated(1, 1, false);
        let h = s.writer.handle();
        h.try_send(req(0, 0)).unwrap();
        s.entered.recv().unwrap(); // the writer is inside apply
        h.try_send(req(0, 1)).unwrap(); // the queue is full now
        assert!(matches!(h.try_send(req(0, 2)), Err(SendError::Full(_))));
        assert!(
            s.writer.lost_history().is_empty(),
            "a refused ack costs no history"
        );
        assert!(matches!(h.try_send(copy("a", 1)), Err(SendError::Full(_))));
        assert!(matches!(h.try_send(copy("a", 2)), Err(SendError::Full(_))));
        s.gate = None;
        collect(&s.results, 2);
        let lost = s.writer.lost_history();
        assert!(!lost.all);
        assert_eq!(lost.channels.len(), 1);
        assert!(lost.channels.contains("a"));

        // A copy the backend fails (here: an offset SQLite cannot store).
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig {
            data_dir: dir.path().to_owned(),
            ..StorageConfig::default()
        };
        let backend = SqliteBackend::open(&cfg, "records").unwrap();
        let (tx, _results) = crossbeam_channel::unbounded();
        let mut writer = Writer::spawn(Box::new(backend), &cfg, Arc::new(ChanNotify(tx))).unwrap();
        let h = writer.handle();
        h.try_send(copy("ok", 1)).unwrap();
        h.try_send(copy("bad", u64::MAX)).unwrap();
        assert!(writer.shutdown().is_some(), "the backend comes back");
        let lost = writer.lost_history();
        assert_eq!(lost.channels.len(), 1);
        assert!(lost.channels.contains("bad"));
    }

    #[test]
    fn a_panicking_backend_answers_errors_and_the_writer_goes_on() {
        let mut s = gated(16, 16, true);
        let h = s.writer.handle();
        s.gate = None;
        h.try_send(req(1, 1)).unwrap();
        let (shard, done) = s.results.recv().unwrap();
        assert_eq!(shard, 1);
        assert!(matches!(
            &*done[0].result.as_ref().unwrap_err().clone(),
            StoreError::BackendPanicked
        ));
        h.try_send(req(1, 2)).unwrap();
        let (_, done) = s.results.recv().unwrap();
        assert_eq!(done[0].result.as_ref().unwrap(), &Outcome::Done);
        assert_eq!(s.writer.stats().errors, 1);
    }

    #[test]
    fn shutdown_applies_everything_queued_before_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig {
            data_dir: dir.path().to_owned(),
            synchronous: crate::config::SyncMode::Normal,
            ..StorageConfig::default()
        };
        let backend = SqliteBackend::open(&cfg, "records").unwrap();
        let (tx, results) = crossbeam_channel::unbounded();
        let mut writer = Writer::spawn(Box::new(backend), &cfg, Arc::new(ChanNotify(tx))).unwrap();
        let h = writer.handle();
        for i in 0..500u64 {
            let op = Op::Ingest {
                table: "records".into(),
                kind: "sensor_data".into(),
                user: "u".into(),
                connection: "0.1".into(),
                client_id: Some(format!("c{i}")),
                received_at_ms: 1,
                data: format!(r#"{{"i":{i}}}"#).into_bytes(),
            };
            let ticket = i.is_multiple_of(2).then_some(Ticket { shard: 0, token: i });
            h.try_send(Request { op, ticket }).unwrap();
        }
        writer.shutdown();
        let answered = collect(&results, 250);
        assert!(answered.iter().all(|(_, d)| matches!(
            d.result,
            Ok(Outcome::Ingested {
                duplicate: false,
                ..
            })
        )));
        drop(writer);
        let conn =
            rusqlite::Connection::open(dir.path().join(super::super::sqlite::DB_FILE)).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 500);
    }

    fn ingest(token: u64, bytes: usize) -> Request {
        Request {
            op: Op::Ingest {
                table: "records".into(),
                kind: "sensor_data".into(),
                user: "u".into(),
                connection: "0.1".into(),
                client_id: None,
                received_at_ms: 1,
                data: vec![b'1'; bytes],
            },
            ticket: Some(Ticket { shard: 0, token }),
        }
    }

    /// Issue 12.5: the queue is bounded in bytes too. With room for 65,536
    /// requests but 4 MB of budget, 1 MB requests are refused from the
    /// fifth on (before: all 1,500 were taken and held 1.5 GB); once the
    /// batch is applied the room is back.
    #[test]
    fn the_queue_is_bounded_in_bytes() {
        let (entered_tx, entered) = crossbeam_channel::unbounded();
        let (gate, gate_rx) = crossbeam_channel::unbounded::<()>();
        let (tx, results) = crossbeam_channel::unbounded();
        let cfg = StorageConfig {
            queue_capacity: 65_536,
            queue_bytes: (4 << 20) + 1024,
            ..StorageConfig::default()
        };
        let backend = Gated {
            entered: entered_tx,
            gate: gate_rx,
            panic_first: false,
        };
        let writer = Writer::spawn(Box::new(backend), &cfg, Arc::new(ChanNotify(tx))).unwrap();
        let h = writer.handle();
        let mb = 1 << 20;
        h.try_send(ingest(0, mb)).unwrap();
        entered.recv().unwrap(); // the writer holds it inside apply
        let mut taken = 1;
        let mut refused = 0;
        for token in 1..1500 {
            match h.try_send(ingest(token, mb)) {
                Ok(()) => taken += 1,
                Err(SendError::Full(_)) => refused += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        let st = h.stats();
        drop(gate); // first: a failed assertion must not leave the writer blocked
        assert_eq!(taken, 4, "4 MB of 1 MB requests");
        assert_eq!(refused, 1496);
        assert_eq!(st.refused_bytes, 1496);
        assert!(st.queued_bytes <= (4 << 20) + 1024, "{}", st.queued_bytes);
        collect(&results, 4);
        wait_for(|| h.stats().queued_bytes == 0);
        h.try_send(ingest(9999, mb)).unwrap();
        // One request larger than the whole budget is taken by an empty queue.
        wait_for(|| h.stats().queued_bytes == 0);
        h.try_send(ingest(10_000, 8 * mb)).unwrap();
    }

    fn wait_for(mut f: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("timed out");
    }
}
