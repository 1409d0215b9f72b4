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
//!
//! One thread: a tokio current_thread runtime. Listens on 127.0.0.1,
//! port `--port N` (default 9101).

use std::io;

use futures_util::{StreamExt, TryStreamExt, future};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::{Error, Message, error::ProtocolError, http::StatusCode};

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
        "peer-tokio-tungstenite: listening on ws://{}/echo and /broadcast",
        listener.local_addr()?
    );
    let (hub, _) = broadcast::channel::<Message>(HUB_CAPACITY);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, hub.clone()));
            }
            // Out of file descriptors and the like: keep serving the others.
            Err(e) => eprintln!("peer-tokio-tungstenite: accept: {e}"),
        }
    }
}

#[allow(clippy::result_large_err)] // ErrorResponse is tungstenite's type
async fn connection(stream: TcpStream, hub: broadcast::Sender<Message>) {
    let mut path = String::new();
    let route = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        path = req.uri().path().to_owned();
        if path == "/echo" || path == "/broadcast" {
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
    let result = if path == "/echo" {
        echo(ws).await
    } else {
        broadcast(ws, hub).await
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
