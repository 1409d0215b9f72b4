//! The routing table: which shards hold a user's connections and which
//! shards have subscribers on a channel. The only mutable state shared
//! between shards.
//!
//! Each value is a bit set of shard indexes (so at most 64 shards). A shard
//! sets its bit when its local count for a key goes 0 -> 1 and clears it when
//! the count goes back to 0; the update is one atomic `compute` on a
//! lock-free map (papaya), and an entry whose set becomes empty is removed in
//! the same operation, so nothing leaks. Readers (every send) only load.
//!
//! A lookup may be stale by one in-flight update: a message sent to a shard
//! that just lost its last subscriber finds nobody locally and is dropped
//! there; a shard that just gained one may miss a message published in the
//! same instant. Delivery is exact for every subscription that completed
//! (its `subscribed` reply was sent) before the publish.

//!
//! [`LocalIndex`] is a shard's own side of it: its connections per user and
//! subscribers per channel, whose 0 <-> 1 transitions update the table.

mod local;
mod table;

pub use crate::id::MAX_SHARDS;
pub use local::{LocalIndex, Members};
pub use table::{Router, home_shard, shards_in};
