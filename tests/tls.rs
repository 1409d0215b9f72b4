//! wss:// with rustls (ring provider) driven by the same shard loop: echo,
//! protocol errors and heartbeats over TLS, and a plain client refused.

mod common;

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use tungstenite::{Message, WebSocket};

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

struct Certs {
    _dir: tempfile::TempDir,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    cert_der: CertificateDer<'static>,
}

fn certs() -> Certs {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    Certs {
        _dir: dir,
        cert_path,
        key_path,
        cert_der: ck.cert.der().clone(),
    }
}

fn tls_server(
    shards: usize,
    certs: &Certs,
    tweak: impl FnOnce(&mut switchboard::Config),
) -> switchboard::Server {
    let mut cfg = test_config(shards);
    cfg.tls.cert = Some(certs.cert_path.clone());
    cfg.tls.key = Some(certs.key_path.clone());
    tweak(&mut cfg);
    start(cfg)
}

fn tls_stream(addr: std::net::SocketAddr, certs: &Certs) -> TlsStream {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.cert_der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

fn wss(addr: std::net::SocketAddr, certs: &Certs) -> WebSocket<TlsStream> {
    let stream = tls_stream(addr, certs);
    let (ws, resp) =
        tungstenite::client::client(format!("wss://localhost:{}/echo", addr.port()), stream)
            .expect("wss handshake");
    assert_eq!(resp.status(), 101);
    ws
}

#[test]
fn wss_echo_text_binary_and_large() {
    let certs = certs();
    let server = tls_server(2, &certs, |_| {});
    let addr = server.local_addr();
    let mut clients: Vec<_> = (0..8).map(|_| wss(addr, &certs)).collect();
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(Message::text(format!("secure {i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("secure {i}")));
    }
    // Larger than the TLS record and rustls buffer sizes.
    let big: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    clients[0].send(Message::binary(big.clone())).unwrap();
    assert_eq!(clients[0].read().unwrap(), Message::binary(big));
    assert_eq!(server.open_connections(), 8);
}

#[test]
fn wss_protocol_error_gets_1002() {
    let certs = certs();
    let server = tls_server(1, &certs, |_| {});
    let mut ws = wss(server.local_addr(), &certs);
    // tungstenite refuses to send a bad frame, so write one by hand under TLS.
    let mut frame = Vec::new();
    switchboard::ws::frame::encode_client_frame(&mut frame, true, 0x3, b"", [1, 2, 3, 4]);
    std::io::Write::write_all(ws.get_mut(), &frame).unwrap();
    match ws.read() {
        Ok(Message::Close(Some(cf))) => assert_eq!(u16::from(cf.code), 1002),
        other => panic!("expected close 1002, got {other:?}"),
    }
}

#[test]
fn wss_heartbeat_and_shutdown() {
    let certs = certs();
    let server = tls_server(1, &certs, |c| {
        c.heartbeat_interval = Duration::from_millis(100);
        c.pong_timeout = Duration::from_millis(1000);
    });
    let mut ws = wss(server.local_addr(), &certs);
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(50));
        ws.send(Message::text(format!("{i}"))).unwrap();
        loop {
            match ws.read().unwrap() {
                Message::Ping(_) => continue,
                m => {
                    assert_eq!(m, Message::text(format!("{i}")));
                    break;
                }
            }
        }
    }
    assert!(server.stats().pings_sent >= 1);
    assert_eq!(server.stats().heartbeat_timeouts, 0);
    let handle = std::thread::spawn(move || server.shutdown());
    loop {
        match ws.read() {
            Ok(Message::Close(Some(cf))) => {
                assert_eq!(u16::from(cf.code), 1001);
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    let _ = ws.flush();
    handle.join().unwrap();
}

#[test]
fn plain_client_on_tls_port_is_dropped() {
    let certs = certs();
    let server = tls_server(1, &certs, |_| {});
    let r = http(
        server.local_addr(),
        "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    assert!(!r.contains("101"), "{r}");
    // Still serving TLS afterwards.
    let mut ws = wss(server.local_addr(), &certs);
    ws.send(Message::text("ok")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("ok"));
}
