//! The byte stream under a connection: plain TCP or TLS (rustls), and the one
//! place that classifies socket results, so the state machine never sees a
//! raw `io::ErrorKind`.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;

use super::outq::OutQueue;

/// Result of a read.
#[derive(Debug)]
pub enum ReadOutcome {
    /// `n > 0` plaintext bytes were placed in the buffer.
    Data(usize),
    /// Nothing more until the next readiness event.
    WouldBlock,
    /// The peer closed its side.
    Eof,
    /// The connection is broken (reset, TLS failure...).
    Error(io::Error),
}

/// Result of pushing queued output.
#[derive(Debug)]
pub enum WriteOutcome {
    /// Everything queued reached the socket.
    Done,
    /// The socket is full; wait for WRITABLE.
    WouldBlock,
    Error(io::Error),
}

/// Plaintext rustls may buffer before `write` returns 0 (backpressure then
/// stays in our own queue, where the outbound budget counts it).
const TLS_BUFFER_LIMIT: usize = 64 << 10;

pub struct TlsStream {
    sock: TcpStream,
    tls: rustls::ServerConnection,
}

pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

fn classify_read(r: io::Result<usize>) -> ReadOutcome {
    match r {
        Ok(0) => ReadOutcome::Eof,
        Ok(n) => ReadOutcome::Data(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadOutcome::WouldBlock,
        Err(e) => ReadOutcome::Error(e),
    }
}

impl Transport {
    pub fn tls(sock: TcpStream, config: std::sync::Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let mut tls = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        tls.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        Ok(Transport::Tls(Box::new(TlsStream { sock, tls })))
    }

    pub fn socket(&mut self) -> &mut TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(t) => &mut t.sock,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// TLS records produced but not yet on the socket.
    pub fn has_pending_output(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(t) => t.tls.wants_write(),
        }
    }

    /// Read plaintext into `buf`.
    pub fn read(&mut self, buf: &mut [u8]) -> ReadOutcome {
        match self {
            Transport::Plain(s) => loop {
                match s.read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => return classify_read(r),
                }
            },
            Transport::Tls(t) => t.read(buf),
        }
    }

    /// Write `data` directly (the cork path). Returns bytes accepted; 0 when
    /// the socket would block.
    pub fn write_direct(&mut self, data: &[u8]) -> Result<usize, io::Error> {
        match self {
            Transport::Plain(s) => loop {
                match s.write(data) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                    Err(e) => return Err(e),
                }
            },
            Transport::Tls(t) => {
                let n = t.tls.writer().write(data)?;
                match t.push_records() {
                    WriteOutcome::Error(e) => Err(e),
                    _ => Ok(n),
                }
            }
        }
    }

    /// Write queued output until it is all sent or the socket is full.
    pub fn write_queue(&mut self, q: &mut OutQueue) -> (usize, WriteOutcome) {
        match self {
            Transport::Plain(s) => match q.write_to(s) {
                Ok(n) if q.is_empty() => (n, WriteOutcome::Done),
                Ok(n) => (n, WriteOutcome::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, WriteOutcome::WouldBlock),
                Err(e) => (0, WriteOutcome::Error(e)),
            },
            Transport::Tls(t) => t.write_queue(q),
        }
    }

    /// Half-close our side (after the last frame), so the peer sees EOF.
    pub fn shutdown_write(&mut self) {
        if let Transport::Tls(t) = self {
            t.tls.send_close_notify();
            let _ = t.push_records();
            if t.tls.wants_write() {
                // The socket is full: a FIN now would cut the close_notify
                // record. It goes out with the next flush; the linger timer
                // ends the connection.
                return;
            }
        }
        let _ = self.socket().shutdown(Shutdown::Write);
    }
}

impl TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> ReadOutcome {
        loop {
            // Plaintext already decrypted comes first.
            match self.tls.reader().read(buf) {
                Ok(0) => return ReadOutcome::Eof, // close_notify received
                Ok(n) => return ReadOutcome::Data(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return ReadOutcome::Error(e),
            }
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(_) => {
                    if let Err(e) = self.tls.process_new_packets() {
                        // Send the alert rustls queued, then give up on the connection.
                        let _ = self.push_records();
                        return ReadOutcome::Error(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    // Handshake messages (or a KeyUpdate reply) must go out now.
                    if let WriteOutcome::Error(e) = self.push_records() {
                        return ReadOutcome::Error(e);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::WouldBlock,
                Err(e) => return ReadOutcome::Error(e),
            }
        }
    }

    /// Move TLS records from rustls to the socket.
    fn push_records(&mut self) -> WriteOutcome {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => return WriteOutcome::Error(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return WriteOutcome::WouldBlock,
                Err(e) => return WriteOutcome::Error(e),
            }
        }
        WriteOutcome::Done
    }

    fn write_queue(&mut self, q: &mut OutQueue) -> (usize, WriteOutcome) {
        let mut total = 0;
        loop {
            // Hand plaintext to rustls until its buffer limit says stop.
            while let Some(front) = q.front() {
                match self.tls.writer().write(front) {
                    Ok(0) => break,
                    Ok(n) => {
                        total += n;
                        q.advance(n);
                    }
                    Err(e) => return (total, WriteOutcome::Error(e)),
                }
            }
            match self.push_records() {
                WriteOutcome::Done if q.is_empty() => return (total, WriteOutcome::Done),
                WriteOutcome::Done => continue,
                other => return (total, other),
            }
        }
    }
}
