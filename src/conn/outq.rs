//! Per-connection outbound queue.
//!
//! Invariants:
//! * `bytes` is the number of bytes still to be written.
//! * `head` bytes of the front chunk have already been written.
//! * When the queue drains, its storage is released: an idle connection
//!   holds no outbound allocation.
//!
//! A chunk is either shared (one encoded fan-out frame referenced by every
//! recipient) or owned (small frames coalesced into one buffer).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::sync::Arc;

use crate::ws::frame::{self, OpCode};

/// Owned chunks grow up to this size before a new one is started.
const COALESCE_LIMIT: usize = 64 << 10;
/// Slices handed to one writev (IOV_MAX is 1024; 64 covers a loop turn's batch).
const MAX_IOV: usize = 64;

#[derive(Debug)]
enum Chunk {
    Shared(Arc<[u8]>),
    Owned(Vec<u8>),
}

impl Chunk {
    fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Shared(a) => a,
            Chunk::Owned(v) => v,
        }
    }
}

#[derive(Debug, Default)]
pub struct OutQueue {
    chunks: VecDeque<Chunk>,
    head: usize,
    bytes: usize,
}

impl OutQueue {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Bytes waiting to be written.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Heap bytes owned by this queue (shared frames are counted once per holder).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + self
                .chunks
                .iter()
                .map(|c| match c {
                    Chunk::Owned(v) => v.capacity(),
                    Chunk::Shared(_) => 0,
                })
                .sum::<usize>()
    }

    /// Queue a frame encoded once and shared with other connections.
    pub fn push_shared(&mut self, frame: Arc<[u8]>) {
        if frame.is_empty() {
            return;
        }
        self.bytes += frame.len();
        self.chunks.push_back(Chunk::Shared(frame));
    }

    /// Copy raw bytes to the end of the queue.
    pub fn push_bytes(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.tail_owned(data.len()).extend_from_slice(data);
        self.bytes += data.len();
    }

    /// Encode a server frame at the end of the queue.
    pub fn push_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let tail = self.tail_owned(payload.len() + frame::MAX_SERVER_HEADER);
        let before = tail.len();
        frame::encode_frame(tail, opcode, payload);
        self.bytes += tail.len() - before;
    }

    fn tail_owned(&mut self, extra: usize) -> &mut Vec<u8> {
        let reuse = matches!(self.chunks.back(), Some(Chunk::Owned(v)) if v.len() + extra <= COALESCE_LIMIT);
        if !reuse {
            self.chunks
                .push_back(Chunk::Owned(Vec::with_capacity(extra.max(256))));
        }
        match self.chunks.back_mut() {
            Some(Chunk::Owned(v)) => v,
            // Unreachable: the back chunk was just checked or pushed as Owned.
            _ => unreachable!("tail chunk is owned"),
        }
    }

    /// Mark `n` bytes as written.
    pub fn advance(&mut self, mut n: usize) {
        n = n.min(self.bytes);
        self.bytes -= n;
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.as_slice().len() - self.head;
            if n >= left {
                n -= left;
                self.head = 0;
                self.chunks.pop_front();
            } else {
                self.head += n;
                n = 0;
            }
        }
        if self.bytes == 0 {
            self.release();
        }
    }

    fn release(&mut self) {
        self.chunks = VecDeque::new();
        self.head = 0;
    }

    /// The unwritten part of the front chunk.
    pub fn front(&self) -> Option<&[u8]> {
        self.chunks
            .front()
            .and_then(|c| c.as_slice().get(self.head..))
    }

    /// Write as much as the writer takes, with one writev per call.
    /// Returns bytes written; stops at the first `WouldBlock` (returned as an error
    /// only if nothing was written).
    pub fn write_to<W: Write + ?Sized>(&mut self, w: &mut W) -> io::Result<usize> {
        let mut total = 0;
        while !self.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (i, c) in self.chunks.iter().enumerate().take(MAX_IOV) {
                let s = if i == 0 {
                    c.as_slice().get(self.head..).unwrap_or_default()
                } else {
                    c.as_slice()
                };
                if let Some(slot) = iov.get_mut(n) {
                    *slot = IoSlice::new(s);
                    n += 1;
                }
            }
            match w.write_vectored(iov.get(..n).unwrap_or_default()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    total += k;
                    self.advance(k);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && total > 0 => return Ok(total),
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    /// Drop everything not yet started, keeping the rest of a partly written
    /// frame so the stream stays well framed (used before a last close frame).
    pub fn drop_unsent(&mut self) {
        if self.head == 0 {
            self.chunks.clear();
            self.bytes = 0;
            self.release();
            return;
        }
        // Front chunk is partly written: keep just its remainder. An owned chunk
        // may hold several frames, so this can keep a few more whole frames;
        // that is harmless, they are still valid frames.
        self.chunks.truncate(1);
        self.bytes = self.front().map_or(0, <[u8]>::len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `cap` bytes per call, then would block after `calls`.
    struct Limited {
        got: Vec<u8>,
        cap: usize,
        calls: usize,
    }
    impl Write for Limited {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.calls == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls -= 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.cap - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.cap {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order_and_release_storage() {
        let shared: Arc<[u8]> = Arc::from(&b"SHARED"[..]);
        let mut q = OutQueue::new();
        q.push_bytes(b"ab");
        q.push_shared(shared.clone());
        q.push_frame(OpCode::Text, b"hi");
        q.push_bytes(b"z");
        assert_eq!(q.bytes(), 2 + 6 + 4 + 1);
        let mut w = Limited {
            got: Vec::new(),
            cap: 3,
            calls: 2,
        };
        assert_eq!(q.write_to(&mut w).unwrap(), 6);
        assert_eq!(q.bytes(), 7);
        w.calls = 100;
        q.write_to(&mut w).unwrap();
        assert!(q.is_empty());
        assert_eq!(w.got, b"abSHARED\x81\x02hiz");
        assert_eq!(q.heap_bytes(), 0);
        assert_eq!(Arc::strong_count(&shared), 1, "queue dropped its reference");
    }

    #[test]
    fn small_frames_coalesce() {
        let mut q = OutQueue::new();
        for _ in 0..100 {
            q.push_frame(OpCode::Binary, &[1, 2, 3]);
        }
        assert_eq!(q.chunks.len(), 1);
        assert_eq!(q.bytes(), 500);
    }

    #[test]
    fn drop_unsent_keeps_partial_frame() {
        let mut q = OutQueue::new();
        q.push_shared(Arc::from(&b"0123456789"[..]));
        q.push_shared(Arc::from(&b"abc"[..]));
        q.advance(4);
        q.drop_unsent();
        assert_eq!(q.bytes(), 6);
        assert_eq!(q.front(), Some(&b"456789"[..]));
        q.advance(6);
        q.push_shared(Arc::from(&b"x"[..]));
        q.drop_unsent();
        assert!(q.is_empty());
    }

    #[test]
    fn would_block_with_nothing_written_is_an_error() {
        let mut q = OutQueue::new();
        q.push_bytes(b"abc");
        let mut w = Limited {
            got: Vec::new(),
            cap: 10,
            calls: 0,
        };
        let e = q.write_to(&mut w).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(q.bytes(), 3);
    }
}
