//! peer-fastwebsockets: a reference server for side-by-side benchmarks
//! against Switchboard, written the way fastwebsockets' own examples are
//! (hyper 1 for the HTTP upgrade, a tokio current_thread runtime, each
//! connection task run `unconstrained`).
//!
//! * `/echo`: every text or binary message is sent back; pings are
//!   answered and closes completed by fastwebsockets (auto-pong and
//!   auto-close, both on by default).
//! * `/broadcast`: every connected client is a subscriber; a text message
//!   from any of them goes to all of them (the sender included) through a
//!   `tokio::sync::broadcast` channel of one reference-counted payload.
//!   Each connection is split: a writer owns the write half and takes the
//!   broadcasts plus the pongs and close reply the reader has to send. A
//!   subscriber that falls more than `HUB_CAPACITY` messages behind skips
//!   what it missed.
//! * `/ws?userId=NAME`: the subset of Switchboard's JSON protocol that
//!   `switchboard-load fanout` speaks (docs/PROTOCOL.md): a `connected`
//!   welcome, `subscribe` -> `subscribed`, `publish` -> `published` plus a
//!   `message` to every subscriber of the channel (the publisher too, if
//!   subscribed), `data` forwarded verbatim. Split like `/broadcast`: the
//!   writer takes the reader's control frames and the connection's
//!   unbounded mpsc outbox; a channel is a map of its subscribers'
//!   outboxes. A `message` is encoded once per publish and its `Bytes`
//!   cloned (reference-counted) into every outbox.
//!
//! One thread. Listens on 127.0.0.1, port `--port N` (default 9102).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use fastwebsockets::{
    FragmentCollector, FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError, upgrade,
};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;

const DEFAULT_PORT: u16 = 9102;
const HUB_CAPACITY: usize = 1024;

type Hub = broadcast::Sender<Bytes>;

fn main() -> io::Result<()> {
    let port = port_arg(DEFAULT_PORT)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?
        .block_on(serve(port))
}

/// `--port N` or `--port=N`; nothing else is accepted.
fn port_arg(default: u16) -> io::Result<u16> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let mut args = std::env::args().skip(1);
    let mut port = default;
    while let Some(arg) = args.next() {
        let value = match arg.strip_prefix("--port") {
            Some("") => args
                .next()
                .ok_or_else(|| bad("--port needs a value".into()))?,
            Some(v) if v.starts_with('=') => v[1..].to_owned(),
            _ => return Err(bad(format!("unknown argument {arg:?} (usage: --port N)"))),
        };
        port = value
            .parse()
            .map_err(|_| bad(format!("bad port {value:?}")))?;
    }
    Ok(port)
}

async fn serve(port: u16) -> io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!(
        "peer-fastwebsockets: listening on ws://{}/echo, /broadcast and /ws",
        listener.local_addr()?
    );
    let (hub, _) = broadcast::channel::<Bytes>(HUB_CAPACITY);
    let channels = Channels::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors and the like: keep serving the others.
            Err(e) => {
                eprintln!("peer-fastwebsockets: accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (hub, channels) = (hub.clone(), channels.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| route(req, hub.clone(), channels.clone()));
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let _ = conn.await; // a client that goes away mid-request is not news
        });
    }
}

async fn route(
    mut req: Request<Incoming>,
    hub: Hub,
    channels: Channels,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let user = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("userId="))
            .map(str::to_owned)
    });
    let path = match req.uri().path() {
        "/echo" => "/echo",
        "/broadcast" => "/broadcast",
        "/ws" => "/ws",
        _ => return Ok(status(StatusCode::NOT_FOUND)),
    };
    if !upgrade::is_upgrade_request(&req) {
        return Ok(status(StatusCode::UPGRADE_REQUIRED));
    }
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(tokio::task::unconstrained(async move {
        let result = match path {
            "/echo" => echo(fut).await,
            "/broadcast" => broadcast(fut, hub).await,
            _ => pubsub(fut, user, channels).await,
        };
        match result {
            // A client that goes away without a close handshake is not news.
            Ok(())
            | Err(
                WebSocketError::ConnectionClosed
                | WebSocketError::UnexpectedEOF
                | WebSocketError::IoError(_),
            ) => {}
            Err(e) => eprintln!("peer-fastwebsockets: {e}"),
        }
    }));
    Ok(response)
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = code;
    resp
}

/// fastwebsockets' echo_server example.
async fn echo(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = FragmentCollector::new(fut.await?);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()), // the close reply is already sent
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
}

async fn broadcast(fut: upgrade::UpgradeFut, hub: Hub) -> Result<(), WebSocketError> {
    let (read, mut write) = fut.await?.split(tokio::io::split);
    let mut read = FragmentCollectorRead::new(read);
    // Subscribe before reading, so a client sees its own first message.
    let mut subscription = hub.subscribe();
    // Pongs and the close reply, from the reader to the writer.
    let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Frame<'static>>();

    // When the reader returns it drops control_tx: the writer then sends
    // what is queued (the close reply) and stops.
    let reader = async move {
        let mut send_control = |f: Frame<'_>| {
            let owned = Frame::new(true, f.opcode, None, Payload::Owned(f.payload.to_vec()));
            let sent = control_tx.send(owned).map_err(|_| "writer gone");
            async move { sent }
        };
        loop {
            let frame = read.read_frame(&mut send_control).await?;
            match frame.opcode {
                OpCode::Close => return Ok(()),
                OpCode::Text => {
                    let _ = hub.send(Bytes::copy_from_slice(&frame.payload));
                }
                _ => {}
            }
        }
    };
    let writer = async move {
        loop {
            tokio::select! {
                biased;
                control = control_rx.recv() => match control {
                    Some(frame) => write.write_frame(frame).await?,
                    None => return Ok(()),
                },
                msg = subscription.recv() => match msg {
                    Ok(payload) => write.write_frame(Frame::text(Payload::Borrowed(&payload))).await?,
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return Ok(()),
                },
            }
        }
    };
    let (r, w): (Result<(), WebSocketError>, Result<(), WebSocketError>) =
        tokio::join!(reader, writer);
    r.and(w)
}

// ---------------------------------------------------------------------------
// /ws: a subset of Switchboard's JSON protocol.

/// Channel name -> its subscribers' outboxes, by connection id.
type Channels = Arc<Mutex<HashMap<String, HashMap<u64, mpsc::UnboundedSender<Bytes>>>>>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A client message; other fields are ignored, `data` is kept verbatim.
#[derive(Deserialize)]
struct ClientMsg<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// A server message: `type` first, then the fields in this order.
#[derive(Serialize)]
#[serde(
    tag = "type",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
enum Event<'a> {
    Connected {
        connection_id: &'a str,
        user_id: &'a str,
        features: [(); 0],
        channels: [(); 0],
        timestamp: String,
    },
    Subscribed {
        channel: &'a str,
        timestamp: String,
    },
    Published {
        channel: &'a str,
        timestamp: String,
    },
    Message {
        channel: &'a str,
        from: &'a str,
        data: &'a RawValue,
        timestamp: String,
    },
    Error {
        code: &'a str,
        message: &'a str,
        timestamp: String,
    },
}

/// RFC 3339, UTC, milliseconds.
fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn encode(event: &Event<'_>) -> Bytes {
    serde_json::to_vec(event).expect("events serialize").into()
}

fn error(code: &str, message: &str) -> Bytes {
    encode(&Event::Error {
        code,
        message,
        timestamp: now(),
    })
}

async fn pubsub(
    fut: upgrade::UpgradeFut,
    user: Option<String>,
    channels: Channels,
) -> Result<(), WebSocketError> {
    let (read, mut write) = fut.await?.split(tokio::io::split);
    let mut read = FragmentCollectorRead::new(read);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let user = user.unwrap_or_else(|| format!("anon-{id}"));
    let (tx, mut outbox) = mpsc::unbounded_channel::<Bytes>();
    let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Frame<'static>>();
    let _ = tx.send(encode(&Event::Connected {
        connection_id: &id.to_string(),
        user_id: &user,
        features: [],
        channels: [],
        timestamp: now(),
    }));
    let mut joined: HashSet<String> = HashSet::new();

    // As in `broadcast`: when the reader returns it drops control_tx, and
    // the writer sends what is queued (the close reply) and stops.
    let reader = async {
        let mut send_control = move |f: Frame<'_>| {
            let owned = Frame::new(true, f.opcode, None, Payload::Owned(f.payload.to_vec()));
            let sent = control_tx.send(owned).map_err(|_| "writer gone");
            async move { sent }
        };
        loop {
            let frame = read.read_frame(&mut send_control).await?;
            match frame.opcode {
                OpCode::Close => return Ok(()),
                OpCode::Text => {}
                _ => continue,
            }
            let Ok(msg) = serde_json::from_slice::<ClientMsg>(&frame.payload) else {
                let _ = tx.send(error("bad_json", "not a JSON object with a string type"));
                continue;
            };
            let reply = match (&*msg.kind, msg.channel.as_deref(), msg.data) {
                ("subscribe", Some(channel), _) => {
                    if joined.insert(channel.to_owned()) {
                        let mut map = channels.lock().unwrap();
                        map.entry(channel.to_owned())
                            .or_default()
                            .insert(id, tx.clone());
                    }
                    encode(&Event::Subscribed {
                        channel,
                        timestamp: now(),
                    })
                }
                ("publish", Some(channel), Some(data)) => {
                    // The reply first (as Switchboard does), then the fan-out.
                    let _ = tx.send(encode(&Event::Published {
                        channel,
                        timestamp: now(),
                    }));
                    // Encoded once; each clone shares the same bytes.
                    let message = encode(&Event::Message {
                        channel,
                        from: &user,
                        data,
                        timestamp: now(),
                    });
                    if let Some(subscribers) = channels.lock().unwrap().get(channel) {
                        for outbox in subscribers.values() {
                            let _ = outbox.send(message.clone());
                        }
                    }
                    continue;
                }
                ("subscribe" | "publish", ..) => {
                    error("missing_field", "channel (and data) required")
                }
                _ => error("unknown_type", "only subscribe and publish are supported"),
            };
            let _ = tx.send(reply);
        }
    };
    let writer = async move {
        loop {
            tokio::select! {
                biased;
                control = control_rx.recv() => match control {
                    Some(frame) => write.write_frame(frame).await?,
                    None => return Ok(()),
                },
                Some(text) = outbox.recv() => {
                    write.write_frame(Frame::text(Payload::Borrowed(&text))).await?;
                }
            }
        }
    };
    // Reader first: replies queued while reading go out in the same poll,
    // not after every subscriber task the reader woke.
    let (r, w): (Result<(), WebSocketError>, Result<(), WebSocketError>) =
        tokio::join!(biased; reader, writer);
    let mut map = channels.lock().unwrap();
    for channel in joined {
        if let Some(subscribers) = map.get_mut(&channel) {
            subscribers.remove(&id);
            if subscribers.is_empty() {
                map.remove(&channel);
            }
        }
    }
    r.and(w)
}
