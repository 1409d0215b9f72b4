//! The Socket.IO front end (docs/SOCKETIO.md): Engine.IO v4 packets over
//! the WebSocket transport, Socket.IO v5 packets inside them, turned into
//! the native protocol's messages for the same handlers, and native
//! answers rendered back as Socket.IO events and acks.
//!
//! A Socket.IO client is a Switchboard connection: its namespace CONNECT
//! authenticates it (token from the `auth` payload, the `Authorization`
//! header or the query), `socket.emit(type, {...})` is the native message
//! `{"type": type, ...}`, an ack id becomes its `requestId` and the answer
//! carrying it becomes the ACK; every other server message reaches the
//! client as an event named after its `type`, on the first namespace it
//! connected (its home namespace).

use std::collections::HashMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::env::Handling;
use crate::proto::socketio::{self as sio, EioPacket, SioKind, SioPacket};
use crate::proto::{Dialect, ErrorCode};

use super::reply::{Replies, reply_error};
use super::sio_state::{MAX_PENDING_ACKS, PendingBinary, SioState, random_id};
use super::state::{ConnectParams, Session, Verdict};

/// Close codes for Engine.IO-level failures (the WebSocket close that ends
/// the Engine.IO session; socket.io-client reports "transport close").
pub mod close {
    /// A packet that is not Engine.IO/Socket.IO (socket.io closes on a parse error).
    pub const PROTOCOL: u16 = 1002;
    /// A packet over `maxPayload`.
    pub const TOO_BIG: u16 = 1009;
    /// A binary frame that is no announced attachment.
    pub const UNSUPPORTED: u16 = 1003;
}

/// Refused CONNECTs one Engine.IO session may make; the next refusal closes
/// it (4003), so a client cannot make the server verify tokens forever on
/// one connection.
const MAX_REFUSED_CONNECTS: u8 = 3;

/// Native replies rendered for a Socket.IO client on the way to the sink.
struct SioOut<'a> {
    out: &'a mut dyn Replies,
    st: &'a mut SioState,
    nsp: &'a str,
}

impl Replies for SioOut<'_> {
    fn text(&mut self, json: &[u8]) {
        if let Some(b) = self.st.render(json, Some(self.nsp)) {
            self.out.text(&b);
        }
    }
}

/// Native replies kept aside (a CONNECT answers before them).
#[derive(Default)]
struct Capture(Vec<Vec<u8>>);

impl Replies for Capture {
    fn text(&mut self, json: &[u8]) {
        self.0.push(json.to_vec());
    }
}

impl Session {
    /// A Socket.IO connection, right after the WebSocket upgrade.
    pub fn socketio(params: ConnectParams) -> Session {
        Session::engine_io(params, false, false)
    }

    /// `plain`: the conformance suites' Engine.IO echo (no Socket.IO).
    pub fn engine_io(params: ConnectParams, plain: bool, strings: bool) -> Session {
        let mut s = Session::new(params);
        s.sio = Some(Box::new(SioState {
            sid: random_id().into(),
            nsps: Vec::new(),
            pending: Vec::new(),
            plain,
            strings,
            awaiting: Vec::new(),
            next_ack: 0,
            binary: None,
            refused: 0,
        }));
        s
    }

    pub fn sio(&self) -> Option<&SioState> {
        self.sio.as_deref()
    }

    pub fn sio_mut(&mut self) -> Option<&mut SioState> {
        self.sio.as_deref_mut()
    }

    /// One Engine.IO packet (a text frame). Pongs are the connection's
    /// business (its heartbeat) and never reach here.
    pub fn on_sio_text(
        &mut self,
        text: &[u8],
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
    ) -> Verdict {
        if text.len() > ctx.env.cfg.socketio.max_payload {
            return Verdict::Close(close::TOO_BIG, "packet over maxPayload");
        }
        let packet = match sio::decode_eio(text) {
            Ok(p) => p,
            Err(e) => {
                log::debug!("conn={} Engine.IO: {e}", ctx.conn);
                return Verdict::Close(close::PROTOCOL, "malformed Engine.IO packet");
            }
        };
        match packet {
            EioPacket::Close => Verdict::Close(1000, "client closed"),
            EioPacket::Ping(d) => {
                // v4 clients do not ping, but answering one costs nothing.
                let mut b = Vec::with_capacity(1 + d.len());
                b.push(b'3');
                b.extend_from_slice(d);
                out.text(&b);
                Verdict::Continue
            }
            EioPacket::Open | EioPacket::Pong(_) | EioPacket::Upgrade | EioPacket::Noop => {
                Verdict::Continue
            }
            EioPacket::Message(_) if self.sio.as_ref().is_some_and(|st| st.plain) => {
                out.text(text); // the Engine.IO echo: the packet as it came
                Verdict::Continue
            }
            // socket.io's parser refuses text while attachments are due.
            EioPacket::Message(_) if self.sio.as_ref().is_some_and(|st| st.binary.is_some()) => {
                Verdict::Close(close::PROTOCOL, "a text packet while attachments were due")
            }
            EioPacket::Message(m) => match sio::decode_sio(m) {
                Ok(p) => self.on_sio_packet(p, ctx, out),
                Err(e) => {
                    log::debug!("conn={} Socket.IO: {e}", ctx.conn);
                    Verdict::Close(close::PROTOCOL, "malformed Socket.IO packet")
                }
            },
        }
    }

    fn on_sio_packet(
        &mut self,
        p: SioPacket<'_>,
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
    ) -> Verdict {
        let Some(mut st) = self.sio.take() else {
            return Verdict::Continue;
        };
        let verdict = match p.kind {
            SioKind::Connect => self.sio_connect(&p, &mut st, ctx, out),
            SioKind::Disconnect => {
                // As socket.io: the Engine.IO session stays; server pushes
                // go to the next namespace still connected (none: dropped).
                st.nsps.retain(|n| &**n != p.nsp);
                st.pending.retain(|(_, n)| &**n != p.nsp);
                Verdict::Continue
            }
            SioKind::Event
                if ctx.env.cfg.socketio.conformance && st.nsps.iter().any(|n| &**n == p.nsp) =>
            {
                conformance_echo(&p, out);
                Verdict::Continue
            }
            SioKind::Event if st.nsps.iter().any(|n| &**n == p.nsp) => {
                self.sio_event(&p, &mut st, ctx, out)
            }
            // An event on a namespace not connected: socket.io drops it too.
            SioKind::Event => Verdict::Continue,
            // The client acknowledged an inbox delivery: the native `ack`.
            SioKind::Ack => {
                let found = st.awaiting.iter().position(|(a, _)| Some(*a) == p.id);
                match found {
                    Some(i) => {
                        let (_, inbox_id) = st.awaiting.remove(i);
                        let mut native =
                            format!("{{\"type\":\"ack\",\"id\":{inbox_id}}}").into_bytes();
                        let mut sink = SioOut {
                            out,
                            st: &mut st,
                            nsp: p.nsp,
                        };
                        self.on_text(&mut native, ctx, &mut sink)
                    }
                    // Unknown or already acknowledged: socket.io ignores it too.
                    None => Verdict::Continue,
                }
            }
            SioKind::BinaryEvent | SioKind::BinaryAck => {
                st.binary = Some(Box::new(PendingBinary {
                    kind: p.kind,
                    nsp: p.nsp.into(),
                    id: p.id,
                    data: p.data.unwrap_or_default().into(),
                    need: p.attachments,
                    parts: Vec::new(),
                    bytes: 0,
                }));
                Verdict::Continue
            }
            SioKind::ConnectError => {
                Verdict::Close(close::PROTOCOL, "a client does not send this packet")
            }
        };
        self.sio = Some(st);
        verdict
    }

    /// One binary frame: the next attachment of the pending binary packet.
    pub fn on_sio_binary(
        &mut self,
        data: &[u8],
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
    ) -> Verdict {
        let Some(st) = self.sio.as_deref_mut() else {
            return Verdict::Continue;
        };
        let Some(pending) = st.binary.as_deref_mut() else {
            return Verdict::Close(close::UNSUPPORTED, "a binary frame without a binary packet");
        };
        pending.bytes = pending.bytes.saturating_add(data.len());
        if pending.bytes > ctx.env.cfg.socketio.max_payload {
            return Verdict::Close(close::TOO_BIG, "attachments over maxPayload");
        }
        pending.parts.push(data.to_vec());
        if pending.parts.len() < pending.need as usize {
            return Verdict::Continue;
        }
        let Some(done) = st.binary.take() else {
            return Verdict::Continue;
        };
        if !st.nsps.contains(&done.nsp) {
            return Verdict::Continue; // a namespace not joined: dropped, as events are
        }
        if ctx.env.cfg.socketio.conformance {
            conformance_binary_echo(&done, out);
            return Verdict::Continue;
        }
        match done.kind {
            SioKind::BinaryAck => {
                // The ACK of an inbox delivery, with binary arguments.
                let p = SioPacket {
                    kind: SioKind::Ack,
                    nsp: &done.nsp,
                    id: done.id,
                    data: Some(&done.data),
                    attachments: 0,
                };
                self.on_sio_packet(p, ctx, out)
            }
            _ => {
                let mut sink = SioOut {
                    out,
                    st,
                    nsp: &done.nsp,
                };
                reply_error(
                    &mut sink,
                    ErrorCode::BinaryNotSupported,
                    "binary attachments have no mapping onto the JSON protocol; send JSON (e.g. base64)",
                    None,
                    Dialect::Native,
                );
                Verdict::Continue
            }
        }
    }

    fn sio_connect(
        &mut self,
        p: &SioPacket<'_>,
        st: &mut SioState,
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
    ) -> Verdict {
        let mut b = Vec::new();
        if !ctx.env.cfg.socketio.has_namespace(p.nsp) {
            sio::connect_error(&mut b, p.nsp, "Invalid namespace");
            out.text(&b);
            return Verdict::Continue;
        }
        if self.is_authenticated() {
            // One identity per connection: another namespace joins it.
            if !st.nsps.iter().any(|n| &**n == p.nsp) {
                st.nsps.push(p.nsp.into());
            }
            sio::connect_ok(&mut b, p.nsp, &random_id());
            out.text(&b);
            if ctx.env.cfg.socketio.conformance {
                conformance_auth(p, out);
            }
            return Verdict::Continue;
        }
        #[derive(Deserialize)]
        struct Auth {
            token: Option<String>,
        }
        let token = p
            .data
            .and_then(|d| serde_json::from_slice::<Auth>(d).ok())
            .and_then(|a| a.token);
        // The CONNECT's token is for this attempt only: a refused one must
        // not stand in for the header's or the query's on the next.
        let connect_time = self.params.as_ref().and_then(|p| p.token.clone());
        if let (Some(t), Some(params)) = (token, self.params.as_mut()) {
            params.token = Some(t);
        }
        let mut kept = Capture::default();
        let verdict = self.on_open(ctx, &mut kept);
        if verdict != Verdict::Authenticated {
            st.refused = st.refused.saturating_add(1);
        }
        if verdict != Verdict::Authenticated
            && let Some(params) = self.params.as_mut()
        {
            params.token = connect_time;
        }
        match verdict {
            Verdict::Authenticated => {
                st.nsps.push(p.nsp.into());
                sio::connect_ok(&mut b, p.nsp, &random_id());
                out.text(&b);
                if ctx.env.cfg.socketio.conformance {
                    conformance_auth(p, out);
                    return Verdict::Authenticated;
                }
                for json in &kept.0 {
                    if let Some(e) = st.render(json, Some(p.nsp)) {
                        out.text(&e);
                    }
                }
                Verdict::Authenticated
            }
            Verdict::Close(_, reason) => {
                // The error reply says why; the Engine.IO session stays
                // open so the client may try again (or its auth timer ends it).
                #[derive(Deserialize)]
                struct Err {
                    message: String,
                }
                let why = kept
                    .0
                    .iter()
                    .find_map(|j| serde_json::from_slice::<Err>(j).ok())
                    .map_or_else(|| reason.to_owned(), |e| e.message);
                sio::connect_error(&mut b, p.nsp, &why);
                out.text(&b);
                refused(st)
            }
            // A CONNECT logs in or not; it never refreshes a token.
            Verdict::Continue | Verdict::Refreshed => {
                sio::connect_error(
                    &mut b,
                    p.nsp,
                    "authentication required: send auth: { token }, an Authorization: Bearer header or ?token=",
                );
                out.text(&b);
                refused(st)
            }
        }
    }

    /// `emit(type, {fields})` is the native `{"type": type, fields...}`.
    fn sio_event(
        &mut self,
        p: &SioPacket<'_>,
        st: &mut SioState,
        ctx: &mut Handling<'_>,
        out: &mut dyn Replies,
    ) -> Verdict {
        let mut sink = SioOut {
            out,
            st,
            nsp: p.nsp,
        };
        let parsed = p
            .data
            .and_then(|d| serde_json::from_slice::<Vec<&RawValue>>(d).ok())
            .unwrap_or_default();
        let mut args = parsed.iter();
        let name: String = match args
            .next()
            .map(|n| serde_json::from_str::<serde_json::Value>(n.get()))
        {
            Some(Ok(serde_json::Value::String(s))) => s,
            Some(Ok(serde_json::Value::Number(n))) => n.to_string(),
            _ => String::new(),
        };
        let arg = args.next().map(|a| a.get().trim());
        if name == "message"
            && args.next().is_none()
            && let Some(Ok(serde_json::Value::String(text))) =
                arg.map(serde_json::from_str::<serde_json::Value>)
        {
            // Seed 004: `emit('message', JSON.stringify({type: 'REQUEST', ...}))`
            // is the native message itself; it names its own `requestId`,
            // so an ack id has nothing to answer it with.
            let mut native = text.into_bytes();
            return self.on_text(&mut native, ctx, &mut sink);
        }
        let body = match arg {
            None => Some(""),
            Some(a) if a.starts_with('{') => {
                let keys =
                    serde_json::from_str::<HashMap<String, IgnoredAny>>(a).unwrap_or_default();
                if keys.contains_key("type") || (p.id.is_some() && keys.contains_key("requestId")) {
                    None
                } else {
                    let inner = a
                        .get(1..a.len().saturating_sub(1))
                        .unwrap_or_default()
                        .trim();
                    Some(inner)
                }
            }
            Some(_) => None,
        };
        let Some(body) = body else {
            reply_error(
                &mut sink,
                ErrorCode::BadJson,
                "an event carries at most one argument, a JSON object without \"type\" (the event name is the type; with an ack, without \"requestId\")",
                None,
                Dialect::Native,
            );
            return Verdict::Continue;
        };
        let mut native = Vec::with_capacity(name.len() + body.len() + 40);
        native.extend_from_slice(b"{\"type\":");
        crate::proto::write_str(&mut native, &name);
        if let Some(id) = p.id {
            if sink.st.pending.len() >= MAX_PENDING_ACKS {
                sink.st.pending.remove(0);
            }
            sink.st.pending.push((id, p.nsp.into()));
            native.extend_from_slice(format!(",\"requestId\":{id}").as_bytes());
        }
        if !body.is_empty() {
            native.push(b',');
            native.extend_from_slice(body.as_bytes());
        }
        native.push(b'}');
        self.on_text(&mut native, ctx, &mut sink)
    }
}

/// The conformance application's answer to a CONNECT: its auth payload
/// back as the `auth` event (`{}` without one).
fn conformance_auth(p: &SioPacket<'_>, out: &mut dyn Replies) {
    let mut b = Vec::new();
    sio::event(&mut b, p.nsp, "auth", p.data.unwrap_or(b"{}"));
    out.text(&b);
}

/// The conformance application: `message` is answered with `message-back`
/// and the same arguments, `message-with-ack` is acknowledged with them.
fn conformance_echo(p: &SioPacket<'_>, out: &mut dyn Replies) {
    let parsed = p
        .data
        .and_then(|d| serde_json::from_slice::<Vec<&RawValue>>(d).ok())
        .unwrap_or_default();
    let Some((name, args)) = parsed.split_first() else {
        return;
    };
    let mut rest = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            rest.push(b',');
        }
        rest.extend_from_slice(a.get().as_bytes());
    }
    let mut b = Vec::new();
    match (name.get(), p.id) {
        ("\"message\"", _) => {
            b.extend_from_slice(b"42");
            if p.nsp != "/" {
                b.extend_from_slice(p.nsp.as_bytes());
                b.push(b',');
            }
            b.extend_from_slice(b"[\"message-back\"");
            if !rest.is_empty() {
                b.push(b',');
                b.extend_from_slice(&rest);
            }
            b.push(b']');
        }
        ("\"message-with-ack\"", Some(id)) => sio::ack(&mut b, p.nsp, id, &rest),
        _ => return,
    }
    out.text(&b);
}

/// The conformance application for binary packets: `message` comes back as
/// `message-back`, `message-with-ack` as a BINARY_ACK, with the same
/// arguments (placeholders included) and the same attachments.
fn conformance_binary_echo(p: &PendingBinary, out: &mut dyn Replies) {
    let parsed = serde_json::from_slice::<Vec<&RawValue>>(&p.data).unwrap_or_default();
    let Some((name, args)) = parsed.split_first() else {
        return;
    };
    let args: Vec<&str> = args.iter().map(|a| a.get()).collect();
    let mut b = format!("45{}-", p.need).into_bytes();
    match (name.get(), p.id) {
        ("\"message\"", _) => {
            if &*p.nsp != "/" {
                b.extend_from_slice(p.nsp.as_bytes());
                b.push(b',');
            }
            b.extend_from_slice(b"[\"message-back\"");
            for a in &args {
                b.push(b',');
                b.extend_from_slice(a.as_bytes());
            }
            b.push(b']');
        }
        ("\"message-with-ack\"", Some(id)) => {
            b = format!("46{}-", p.need).into_bytes();
            if &*p.nsp != "/" {
                b.extend_from_slice(p.nsp.as_bytes());
                b.push(b',');
            }
            b.extend_from_slice(format!("{id}[{}]", args.join(",")).as_bytes());
        }
        _ => return,
    }
    out.text(&b);
    for part in &p.parts {
        out.binary(part);
    }
}

/// After a refused CONNECT (its CONNECT_ERROR is queued): the session may
/// try again, up to [`MAX_REFUSED_CONNECTS`] refusals.
fn refused(st: &SioState) -> Verdict {
    if st.refused > MAX_REFUSED_CONNECTS {
        Verdict::Close(super::close::AUTH_FAILED, "too many refused CONNECTs")
    } else {
        Verdict::Continue
    }
}
