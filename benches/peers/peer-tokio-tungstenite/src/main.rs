//! peer-tokio-tungstenite: a reference server for side-by-side benchmarks
//! against Switchboard, written the way a tokio-tungstenite user would.
//!
//! * `/echo`: every text or binary message is sent back (pings are
//!   answered and closes completed by tungstenite itself).
//! * `/broadcast`: every connected client is a subscriber; a text message
//!   from any of them goes to all of them (the sender included) through a
//!   `tokio::sync::broadcast` channel: one `Message`, cloned per recipient
//!   (the payload is reference-counted, so the clone is cheap). A
//!   subscriber that falls more than `HUB_CAPACITY` messages behind skips
//!   what it missed.
//! * `/ws?userId=NAME`: the subset of Switchboard's JSON protocol that
//!   `switchboard-load fanout` speaks (docs/PROTOCOL.md): a `connected`
//!   welcome, `subscribe` -> `subscribed`, `publish` -> `published` plus a
//!   `message` to every subscriber of the channel (the publisher too, if
//!   subscribed), `data` forwarded verbatim. Each connection has an
//!   unbounded mpsc outbox drained into its sink; a channel is a map of
//!   its subscribers' outboxes. A `message` is encoded once per publish and
//!   its `Utf8Bytes` cloned (reference-counted) into every outbox.
//!
//! One thread: a tokio current_thread runtime. Listens on 127.0.0.1,
//! port `--port N` (default 9101).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures_util::{StreamExt, TryStreamExt, future};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{BroadcastStream, UnboundedReceiverStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::{
    Error, Message, Utf8Bytes, error::ProtocolError, http::StatusCode,
};

const DEFAULT_PORT: u16 = 9101;
const HUB_CAPACITY: usize = 1024;

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
        "peer-tokio-tungstenite: listening on ws://{}/echo, /broadcast and /ws",
        listener.local_addr()?
    );
    let (hub, _) = broadcast::channel::<Message>(HUB_CAPACITY);
    let channels = Channels::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, hub.clone(), channels.clone()));
            }
            // Out of file descriptors and the like: keep serving the others.
            Err(e) => eprintln!("peer-tokio-tungstenite: accept: {e}"),
        }
    }
}

#[allow(clippy::result_large_err)] // ErrorResponse is tungstenite's type
async fn connection(stream: TcpStream, hub: broadcast::Sender<Message>, channels: Channels) {
    let mut path = String::new();
    let mut query = String::new();
    let route = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        path = req.uri().path().to_owned();
        query = req.uri().query().unwrap_or_default().to_owned();
        if path == "/echo" || path == "/broadcast" || path == "/ws" {
            Ok(resp)
        } else {
            let mut not_found = ErrorResponse::new(Some("no such endpoint".into()));
            *not_found.status_mut() = StatusCode::NOT_FOUND;
            Err(not_found)
        }
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, route).await else {
        return;
    };
    let result = match path.as_str() {
        "/echo" => echo(ws).await,
        "/broadcast" => broadcast(ws, hub).await,
        _ => pubsub(ws, &query, channels).await,
    };
    match result {
        // A client that goes away without a close handshake is not news.
        Ok(())
        | Err(
            Error::ConnectionClosed
            | Error::AlreadyClosed
            | Error::Io(_)
            | Error::Protocol(ProtocolError::ResetWithoutClosingHandshake),
        ) => {}
        Err(e) => eprintln!("peer-tokio-tungstenite: {path}: {e}"),
    }
}

/// The tokio-tungstenite echo example: forward data messages to the sink.
/// `forward` flushes only when no further message is ready, so a burst of
/// messages goes out in one write.
async fn echo(ws: WebSocketStream<TcpStream>) -> Result<(), Error> {
    let (write, read) = ws.split();
    read.try_filter(|msg| future::ready(msg.is_text() || msg.is_binary()))
        .forward(write)
        .await
}

async fn broadcast(
    ws: WebSocketStream<TcpStream>,
    hub: broadcast::Sender<Message>,
) -> Result<(), Error> {
    let (write, mut read) = ws.split();
    // Subscribe before reading, so a client sees its own first message.
    let outgoing = BroadcastStream::new(hub.subscribe())
        .filter_map(|m| future::ready(m.ok().map(Ok))) // skip what a lagging subscriber missed
        .forward(write);
    let incoming = async {
        // Read to the end (not just to the Close message): the next read
        // after a Close is what flushes tungstenite's close reply.
        while let Some(msg) = read.next().await {
            if let msg @ Message::Text(_) = msg? {
                let _ = hub.send(msg); // Err only when nobody subscribes
            }
        }
        Ok(())
    };
    tokio::select! {
        r = incoming => r,
        r = outgoing => r,
    }
}

// ---------------------------------------------------------------------------
// /ws: a subset of Switchboard's JSON protocol.

/// Channel name -> its subscribers' outboxes, by connection id.
type Channels = Arc<Mutex<HashMap<String, HashMap<u64, mpsc::UnboundedSender<Message>>>>>;

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

fn text(event: &Event<'_>) -> Message {
    Message::text(serde_json::to_string(event).expect("events serialize"))
}

fn error(code: &str, message: &str) -> Message {
    text(&Event::Error {
        code,
        message,
        timestamp: now(),
    })
}

async fn pubsub(
    ws: WebSocketStream<TcpStream>,
    query: &str,
    channels: Channels,
) -> Result<(), Error> {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let connection_id = id.to_string();
    let user = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("userId="))
        .map_or_else(|| format!("anon-{id}"), str::to_owned);
    let (write, mut read) = ws.split();
    let (tx, rx) = mpsc::unbounded_channel::<Message>();
    // `forward` flushes when the outbox has nothing more ready.
    let outgoing = UnboundedReceiverStream::new(rx).map(Ok).forward(write);
    let _ = tx.send(text(&Event::Connected {
        connection_id: &connection_id,
        user_id: &user,
        features: [],
        channels: [],
        timestamp: now(),
    }));
    let mut joined: HashSet<String> = HashSet::new();
    let incoming = async {
        while let Some(msg) = read.next().await {
            let Message::Text(msg) = msg? else {
                continue; // pings are answered by tungstenite
            };
            let Ok(msg) = serde_json::from_str::<ClientMsg>(&msg) else {
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
                    text(&Event::Subscribed {
                        channel,
                        timestamp: now(),
                    })
                }
                ("publish", Some(channel), Some(data)) => {
                    // The reply first (as Switchboard does), then the fan-out.
                    let _ = tx.send(text(&Event::Published {
                        channel,
                        timestamp: now(),
                    }));
                    let event = Event::Message {
                        channel,
                        from: &user,
                        data,
                        timestamp: now(),
                    };
                    // Encoded once; each clone shares the same bytes.
                    let message =
                        Utf8Bytes::from(serde_json::to_string(&event).expect("events serialize"));
                    if let Some(subscribers) = channels.lock().unwrap().get(channel) {
                        for outbox in subscribers.values() {
                            let _ = outbox.send(Message::Text(message.clone()));
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
        Ok(())
    };
    // Reader first: replies queued while reading go out in the same poll,
    // not after every subscriber task the reader woke.
    let result = tokio::select! {
        biased;
        r = incoming => r,
        r = outgoing => r,
    };
    let mut map = channels.lock().unwrap();
    for channel in joined {
        if let Some(subscribers) = map.get_mut(&channel) {
            subscribers.remove(&id);
            if subscribers.is_empty() {
                map.remove(&channel);
            }
        }
    }
    result
}
