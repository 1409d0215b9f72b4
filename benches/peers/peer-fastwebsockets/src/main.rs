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
//!
//! One thread. Listens on 127.0.0.1, port `--port N` (default 9102).

use std::io;

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
        "peer-fastwebsockets: listening on ws://{}/echo and /broadcast",
        listener.local_addr()?
    );
    let (hub, _) = broadcast::channel::<Bytes>(HUB_CAPACITY);
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
        let hub = hub.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| route(req, hub.clone()));
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
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let fan_out = match req.uri().path() {
        "/echo" => false,
        "/broadcast" => true,
        _ => return Ok(status(StatusCode::NOT_FOUND)),
    };
    if !upgrade::is_upgrade_request(&req) {
        return Ok(status(StatusCode::UPGRADE_REQUIRED));
    }
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(tokio::task::unconstrained(async move {
        let result = if fan_out {
            broadcast(fut, hub).await
        } else {
            echo(fut).await
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
