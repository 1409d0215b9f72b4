//! The Socket.IO wire state of one connection (beside the native
//! [`Session`](super::Session) state): its Engine.IO session id, connected
//! namespaces, ack ids in both directions, a binary packet being
//! reassembled; and how a native server message is rendered for it.

use serde::Deserialize;

use crate::proto::socketio::{self as sio, SioKind};

/// Client ack ids whose answer is still due, per connection: past this the
/// oldest is forgotten (its answer then arrives as a plain event). The same
/// bound holds for server events awaiting the client's ACK (inbox
/// deliveries; a forgotten one is redelivered under a new id).
pub(super) const MAX_PENDING_ACKS: usize = 256;

/// The Socket.IO state of a connection (beside the native [`Session`] state).
#[derive(Debug)]
pub struct SioState {
    /// The Engine.IO session id sent in the open packet.
    pub(super) sid: Box<str>,
    /// Connected namespaces; the first is home (server pushes go there).
    pub(super) nsps: Vec<Box<str>>,
    /// Ack ids of client events still to be answered, with their namespace.
    pub(super) pending: Vec<(u64, Box<str>)>,
    /// Plain Engine.IO (the conformance echo at `/engine.io/`): no
    /// Socket.IO inside, every message packet is sent back.
    pub(super) plain: bool,
    /// `socketio.message_strings`: server messages as `message` strings.
    pub(super) strings: bool,
    /// Server events sent with an ack id, awaiting the client's ACK:
    /// (ack id, offline inbox message id).
    pub(super) awaiting: Vec<(u64, i64)>,
    pub(super) next_ack: u64,
    /// A BINARY_EVENT/BINARY_ACK waiting for its attachments.
    pub(super) binary: Option<Box<PendingBinary>>,
    /// CONNECTs refused so far (see [`MAX_REFUSED_CONNECTS`]).
    pub(super) refused: u8,
}

/// A binary packet and the attachments received so far.
#[derive(Debug)]
pub(super) struct PendingBinary {
    pub(super) kind: SioKind,
    pub(super) nsp: Box<str>,
    pub(super) id: Option<u64>,
    /// The packet's JSON (with its placeholders).
    pub(super) data: Box<[u8]>,
    pub(super) need: u32,
    pub(super) parts: Vec<Vec<u8>>,
    pub(super) bytes: usize,
}

/// Random URL-safe id (the Engine.IO sid, a namespace socket's id).
pub(super) fn random_id() -> String {
    use base64::Engine;
    use ring::rand::SecureRandom;
    let mut b = [0u8; 15];
    // A failing system RNG leaves zeros: ids are not secrets (the token is).
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl SioState {
    pub fn is_plain(&self) -> bool {
        self.plain
    }

    /// The home namespace, once one is connected.
    pub fn home(&self) -> Option<&str> {
        self.nsps.first().map(|n| &**n)
    }

    /// A native server message as the Socket.IO text this client gets: the
    /// ACK of a pending ack id it carries as `requestId`, else an event
    /// named by its `type` on `nsp` (default: home). `None` when no
    /// namespace is connected (nothing can be delivered).
    pub fn render(&mut self, json: &[u8], nsp: Option<&str>) -> Option<Vec<u8>> {
        if !self.pending.is_empty() {
            #[derive(Deserialize)]
            struct Rid {
                #[serde(rename = "requestId")]
                request_id: Option<u64>,
            }
            if let Ok(Rid {
                request_id: Some(id),
            }) = serde_json::from_slice::<Rid>(json)
                && let Some(i) = self.pending.iter().position(|(p, _)| *p == id)
            {
                let (_, nsp) = self.pending.remove(i);
                let mut b = Vec::with_capacity(json.len() + 16);
                sio::ack(&mut b, &nsp, id, json);
                return Some(b);
            }
        }
        let nsp = nsp.or(self.home())?;
        Some(self.push(nsp, json))
    }

    /// A server message for this client alone (not a shared fan-out): an
    /// offline inbox delivery (`"ack": true` with its `id`) is sent as an
    /// event with an ack id, and the client's ACK of it acknowledges the
    /// inbox message. `None` when no namespace is connected.
    pub fn delivery(&mut self, json: &[u8]) -> Option<Vec<u8>> {
        #[derive(Deserialize)]
        struct Inbox {
            id: Option<i64>,
            ack: Option<bool>,
        }
        let nsp = self.home()?;
        let Ok(Inbox {
            id: Some(inbox_id),
            ack: Some(true),
        }) = serde_json::from_slice::<Inbox>(json)
        else {
            return Some(self.push(nsp, json));
        };
        let nsp: Box<str> = nsp.into();
        let id = self.next_ack;
        self.next_ack = (self.next_ack + 1) % (1 << 53);
        if self.awaiting.len() >= MAX_PENDING_ACKS {
            self.awaiting.remove(0);
        }
        self.awaiting.push((id, inbox_id));
        let mut b = Vec::with_capacity(json.len() + 48);
        if self.strings {
            let mut arg = Vec::with_capacity(json.len() + 16);
            crate::proto::write_str(&mut arg, &String::from_utf8_lossy(json));
            sio::event_acked(&mut b, &nsp, Some(id), "message", &arg);
        } else {
            let name = sio::event_name(json);
            sio::event_acked(&mut b, &nsp, Some(id), name, json);
        }
        Some(b)
    }

    /// Is every server message a `message` string for this client?
    pub fn strings(&self) -> bool {
        self.strings
    }

    /// A server message as the event this client receives on `nsp`: named
    /// by its `type` with the object as argument, or (`message_strings`)
    /// `message` with the JSON text as a string argument.
    pub fn push(&self, nsp: &str, json: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(json.len() + 32);
        if self.strings {
            let mut arg = Vec::with_capacity(json.len() + 16);
            crate::proto::write_str(&mut arg, &String::from_utf8_lossy(json));
            sio::event(&mut b, nsp, "message", &arg);
        } else {
            sio::event(&mut b, nsp, sio::event_name(json), json);
        }
        b
    }

    /// The Engine.IO open packet for this session.
    pub fn open_packet(&self, cfg: &crate::config::SocketIoConfig) -> Vec<u8> {
        let mut b = Vec::with_capacity(128);
        sio::eio_open(
            &mut b,
            &self.sid,
            cfg.ping_interval.as_millis(),
            cfg.ping_timeout.as_millis(),
            cfg.max_payload,
        );
        b
    }
}
