//! Server messages written straight into a byte buffer: the JSON writer
//! ([`Out`]), the messages several senders build (a channel publication,
//! an inbox delivery, presence, request responses in either dialect), and
//! the shared frame a fan-out sends to every recipient.

use std::io::Write;
use std::sync::Arc;

use simd_json::prelude::*;

use super::{Dialect, ErrorCode};
use crate::clock::rfc3339_now;
use crate::history::Page;
use crate::ws::frame::{self, OpCode};

/// Append `s` as a JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        match esc {
            Some(e) => out.extend_from_slice(e),
            None => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

/// A server message being written: `{"type":"...", ... ,"timestamp":"..."}`.
pub struct Out<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Out<'a> {
    /// Start a message of `kind` in `buf` (appending).
    pub fn new(buf: &'a mut Vec<u8>, kind: &str) -> Self {
        buf.extend_from_slice(b"{\"type\":");
        write_str(buf, kind);
        Out { buf }
    }

    fn key(&mut self, k: &str) {
        self.buf.push(b',');
        write_str(self.buf, k);
        self.buf.push(b':');
    }

    pub fn str(mut self, k: &str, v: &str) -> Self {
        self.key(k);
        write_str(self.buf, v);
        self
    }

    pub fn opt_str(self, k: &str, v: Option<&str>) -> Self {
        match v {
            Some(v) => self.str(k, v),
            None => self,
        }
    }

    pub fn num(mut self, k: &str, v: u64) -> Self {
        self.key(k);
        let _ = write!(self.buf, "{v}");
        self
    }

    /// A value that is already JSON text (e.g. a requestId as received).
    pub fn raw(mut self, k: &str, json: &[u8]) -> Self {
        self.key(k);
        self.buf.extend_from_slice(json);
        self
    }

    pub fn opt_raw(self, k: &str, json: Option<&[u8]>) -> Self {
        match json {
            Some(j) => self.raw(k, j),
            None => self,
        }
    }

    /// A value from a decoded client message, re-encoded.
    pub fn value(mut self, k: &str, v: &simd_json::BorrowedValue<'_>) -> Self {
        self.key(k);
        let _ = v.write(&mut *self.buf);
        self
    }

    pub fn strs(mut self, k: &str, items: &[&str]) -> Self {
        self.key(k);
        self.buf.push(b'[');
        for (i, s) in items.iter().enumerate() {
            if i > 0 {
                self.buf.push(b',');
            }
            write_str(self.buf, s);
        }
        self.buf.push(b']');
        self
    }

    /// Close the object with the server timestamp.
    pub fn finish(self) {
        let ts = rfc3339_now();
        self.finish_at(&ts);
    }

    pub fn finish_at(mut self, ts: &str) {
        self.key("timestamp");
        write_str(self.buf, ts);
        self.buf.push(b'}');
    }
}

/// `{"type":"error","code","message","requestId"?,"timestamp"}`.
pub fn error(buf: &mut Vec<u8>, code: ErrorCode, message: &str, request_id: Option<&[u8]>) {
    Out::new(buf, "error")
        .str("code", code.as_str())
        .str("message", message)
        .opt_raw("requestId", request_id)
        .finish();
}

/// Encode a server message once as a text frame shared by every recipient.
pub fn shared_frame(json: &[u8]) -> Arc<[u8]> {
    Arc::from(frame::frame_bytes(OpCode::Text, json))
}

/// The `message` event of a channel publication, numbered.
pub fn publication(
    channel: &str,
    from: Option<&str>,
    data: &[u8],
    offset: u64,
    epoch: &str,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(96 + channel.len() + data.len());
    Out::new(&mut b, "message")
        .str("channel", channel)
        .opt_str("from", from)
        .raw("data", data)
        .num("offset", offset)
        .str("epoch", epoch)
        .finish();
    b
}

/// `payload` (a stored JSON object) with `"id":id,"ack":true` added.
pub fn with_ack_id(payload: &[u8], id: i64) -> Vec<u8> {
    let body = match payload.iter().rposition(|&c| c == b'}') {
        Some(end) => payload.get(..end).unwrap_or(payload),
        None => payload,
    };
    let mut b = Vec::with_capacity(body.len() + 32);
    b.extend_from_slice(body);
    if body.iter().any(|c| !c.is_ascii_whitespace() && *c != b'{') {
        b.push(b',');
    }
    let _ = write!(b, "\"id\":{id},\"ack\":true}}");
    b
}

/// `{"channel":..,"connections":n,"users":[{"userId","connections"}]}`.
pub fn presence(b: &mut Vec<u8>, channel: &str, connections: u64, users: &[(Arc<str>, u32)]) {
    b.extend_from_slice(b"{\"channel\":");
    write_str(b, channel);
    let _ = write!(b, ",\"connections\":{connections},\"users\":[");
    for (i, (u, n)) in users.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(b"{\"userId\":");
        write_str(b, u);
        let _ = write!(b, ",\"connections\":{n}}}");
    }
    b.extend_from_slice(b"]}");
}

/// A channel's history page: `{"channel","epoch","offset","hasMore","publications"}`
/// (only the channel when there is no page).
pub fn history_page(b: &mut Vec<u8>, channel: &str, page: Option<&Page>) {
    b.extend_from_slice(b"{\"channel\":");
    write_str(b, channel);
    if let Some(page) = page {
        b.extend_from_slice(b",\"epoch\":");
        write_str(b, &page.epoch);
        let _ = write!(
            b,
            ",\"offset\":{},\"hasMore\":{},\"publications\":",
            page.top, !page.complete
        );
        publications(b, &page.publications);
    }
    b.push(b'}');
}

/// `[p1,p2,...]` of stored publication objects.
pub fn publications(b: &mut Vec<u8>, pubs: &[Arc<[u8]>]) {
    b.push(b'[');
    for (i, p) in pubs.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(p);
    }
    b.push(b']');
}

/// `{"type":"response","requestId":..,"action":..,"data":` (the caller
/// writes data, then [`response_tail`]); `RESPONSE` in the upper dialect.
pub fn response_head(b: &mut Vec<u8>, dialect: Dialect, rid: &[u8], action: &str) {
    b.extend_from_slice(match dialect {
        Dialect::Upper => b"{\"type\":\"RESPONSE\",\"requestId\":".as_slice(),
        Dialect::Native => b"{\"type\":\"response\",\"requestId\":".as_slice(),
    });
    b.extend_from_slice(rid);
    b.extend_from_slice(b",\"action\":");
    write_str(b, action);
    b.extend_from_slice(b",\"data\":");
}

/// Close a response started with [`response_head`].
pub fn response_tail(b: &mut Vec<u8>) {
    b.extend_from_slice(b",\"timestamp\":");
    write_str(b, &rfc3339_now());
    b.push(b'}');
}

/// An error in the client's dialect: `error {code, message}`, or seed
/// 004's `ERROR` with the same fields and a nested `error` object.
pub fn error_in(
    b: &mut Vec<u8>,
    dialect: Dialect,
    code: ErrorCode,
    message: &str,
    rid: Option<&[u8]>,
) {
    match dialect {
        Dialect::Native => error(b, code, message, rid),
        Dialect::Upper => {
            let mut e = Vec::new();
            e.extend_from_slice(b"{\"code\":");
            write_str(&mut e, code.as_str());
            e.extend_from_slice(b",\"message\":");
            write_str(&mut e, message);
            e.push(b'}');
            Out::new(b, "ERROR")
                .str("code", code.as_str())
                .str("message", message)
                .opt_raw("requestId", rid)
                .raw("error", &e)
                .finish();
        }
    }
}
