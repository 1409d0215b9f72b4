//! A configured ingestible type (seed 000 `sensor_data`): validate, seal
//! the configured fields, hand the record to the writer; `ack` follows the
//! commit.

use std::sync::Arc;

use simd_json::prelude::*;

use crate::env::Handling;
use crate::proto::{Dialect, ErrorCode, field};
use crate::work::{StoreWait, Work};

use super::reply::{Replies, reply_error, required};

/// A configured ingestible type (seed 000 `sensor_data`): validate, seal the
/// configured fields, and hand the record to the writer; `ack` follows the commit.
pub(super) fn ingest(
    kind: &str,
    v: &simd_json::BorrowedValue<'_>,
    raw: &[u8],
    rid: Option<&[u8]>,
    user: &Arc<str>,
    ctx: &mut Handling<'_>,
    out: &mut dyn Replies,
) {
    if !ctx.env.storage() {
        reply_error(
            out,
            ErrorCode::StorageDisabled,
            "this server stores nothing (storage.backend = \"none\")",
            rid,
            Dialect::Native,
        );
        return;
    }
    let Some(data) = required(v, "data", rid, out) else {
        return;
    };
    // A client id makes retries idempotent: the same id is stored once.
    // Integers and strings are both ids (42 and "42" are the same id).
    let client_id = match field(v, "id") {
        None => None,
        Some(i) => match i.value_type() {
            simd_json::ValueType::String => i.as_str().map(str::to_owned),
            simd_json::ValueType::I64 | simd_json::ValueType::U64 => Some(i.encode()),
            _ => {
                reply_error(
                    out,
                    ErrorCode::InvalidData,
                    "\"id\" must be a string or an integer",
                    rid,
                    Dialect::Native,
                );
                return;
            }
        },
    };
    if let Some(c) = &client_id
        && c.len() > 256
    {
        reply_error(
            out,
            ErrorCode::InvalidData,
            "\"id\" is longer than 256 bytes",
            rid,
            Dialect::Native,
        );
        return;
    }
    // The client's own text of `data`: repeated keys show there at every
    // size (the parsed value hides them past 32 members).
    let data_text = crate::proto::raw_field(raw, "data");
    let stored = match crate::ingest::prepare(
        &ctx.env.cfg.ingest,
        ctx.env.sealer.as_deref(),
        data,
        data_text,
    ) {
        Ok(s) => s,
        Err(crate::ingest::PrepareError::Invalid(e)) => {
            reply_error(
                out,
                ErrorCode::InvalidData,
                &e.to_string(),
                rid,
                Dialect::Native,
            );
            return;
        }
        Err(e) => {
            log::error!("conn={} cannot prepare a record: {e}", ctx.conn);
            reply_error(
                out,
                ErrorCode::StorageError,
                "the record could not be encrypted",
                rid,
                Dialect::Native,
            );
            return;
        }
    };
    ctx.desk.work.push(Work::Store {
        to: ctx.asker(),
        op: crate::store::Op::Ingest {
            table: Arc::from(ctx.env.cfg.ingest.table.as_str()),
            kind: kind.to_owned(),
            user: user.clone(),
            connection: ctx.conn.to_string(),
            client_id: client_id.clone(),
            received_at_ms: crate::clock::now_ms(),
            data: stored,
        },
        wait: StoreWait::Ingest {
            request_id: rid.map(<[u8]>::to_vec),
            client_id,
        },
    });
}
