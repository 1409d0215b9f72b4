//! The reactor: one thread, one mio `Poll`, a slab of connections, a timer
//! wheel and an inbox. Every loop turn runs the same phases in order:
//!
//! 1. poll (timeout: the wheel's next tick, 0 if a connection still has
//!    unread bytes from a budget-limited read);
//! 2. record readiness per token (edge-triggered: a flag is cleared only by
//!    `WouldBlock`), note waker and listener events;
//! 3. drain the inbox (sockets handed over, shutdown, later: deliveries);
//! 4. accept (SO_REUSEPORT mode);
//! 5. serve each ready connection once: flush, read up to the budget,
//!    decode, reply through the cork buffer, one write;
//! 6. expire timers (heartbeats, handshake and linger deadlines);
//! 7. publish counters; during shutdown, stop when empty or at the deadline.
//!
//! | file | owns |
//! |---|---|
//! | `state.rs` | the shard's fields, how it is built and started |
//! | `run.rs` | the loop and its socket phases (poll, inbox, accept, serve, timers, flush, shutdown) |
//! | `inbox.rs` | `ShardMsg`, `Inbox`, `Peers` and the one scatter loop |
//! | `dispatch.rs` | carrying out handlers' work items |
//! | `gather.rs` | answers of cross-shard operations, replies to the asker |
//! | `channel.rs` | a channel's home-shard work: numbering, history, fan-out, presence |
//! | `storage.rs` | writer tickets, inbox redelivery |
//! | `query.rs` | API queries on local connections, revocations |
//!
//! See LIFECYCLE.md beside this file for what may call what, and when.

mod channel;
mod dispatch;
mod gather;
mod inbox;
mod query;
mod run;
mod state;
mod storage;

pub use inbox::{Inbox, Peers, ReportTo, ShardMsg};
pub use state::{Opened, Shard, ShardHandle, ShardSetup, TICK};
