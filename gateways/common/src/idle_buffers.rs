//! Read and write buffers that a connection holds only while it has bytes in them.
//!
//! Most connections of a large deployment are idle most of the time. A buffer made with
//! the connection and kept for its life costs every idle connection its capacity (the
//! kernel's socket buffers are separate and not counted in the process's memory); at a few
//! KiB each way that was most of an idle Kafka connection's 12 KiB. Here the read buffer
//! is given up when it is empty and the socket has nothing more (a busy connection keeps
//! it), and the connection then waits for its next bytes with a small array on the
//! waiting future; the write buffer is given up after each flush.

use std::future::Future;
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What an idle connection's wait reads into: enough for a small request or packet whole.
const FIRST_READ: usize = 64;

/// Bytes read from a connection and not yet taken by its decoder.
pub struct ReadBuffer {
    buf: BytesMut,
    /// How much room each read asks for (at least): the size the buffer grows by.
    chunk: usize,
}

impl ReadBuffer {
    pub fn new(chunk: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            chunk,
        }
    }

    /// The bytes read so far (a decoder takes whole frames off its front).
    pub fn bytes(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Reads what the connection has, with room for at least `want` more bytes (a frame
    /// whose length is known is read straight into place). Returns 0 at the end of the
    /// stream. Cancel-safe: bytes are never read into anything but the buffer, so a
    /// `select!` may drop the call at any point.
    pub async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        want: usize,
    ) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            // A busy connection keeps its buffer: whatever has arrived is read into it at once.
            self.buf.reserve(self.chunk.max(want));
            if let Some(read) = rd.read_buf(&mut self.buf).now_or_never() {
                return read;
            }
            // Nothing pending: give the buffer up and wait with a few bytes on the future
            // (a read that returns nothing consumes nothing, so dropping it loses nothing).
            self.buf = BytesMut::new();
            let mut first = [0u8; FIRST_READ];
            let n = rd.read(&mut first).await?;
            if n == 0 {
                return Ok(0);
            }
            self.buf.reserve(self.chunk.max(want));
            self.buf.extend_from_slice(&first[..n]);
            // Whatever else already arrived, without waiting (a request that did not fit the
            // array, pipelined requests). An end of stream seen here is seen again next call.
            let more = match rd.read_buf(&mut self.buf).now_or_never() {
                Some(r) => r?,
                None => 0,
            };
            return Ok(n + more);
        }
        self.buf.reserve(self.chunk.max(want));
        rd.read_buf(&mut self.buf).await
    }
}

impl ReadBuffer {
    /// [`ReadBuffer::fill`] for a connection polled by hand: the same reads, with nothing
    /// kept between polls. An idle connection waits with no buffer at all (its first bytes
    /// are read into an array on the stack), and a busy one gives its buffer up when the
    /// socket has nothing more.
    pub fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        rd: &mut R,
        want: usize,
    ) -> Poll<std::io::Result<usize>> {
        if !self.buf.is_empty() || self.buf.capacity() > 0 {
            self.buf.reserve(self.chunk.max(want));
            let read = std::pin::pin!(rd.read_buf(&mut self.buf)).poll(cx);
            if read.is_pending() && self.buf.is_empty() {
                self.buf = BytesMut::new();
            }
            return read;
        }
        let mut first = [0u8; FIRST_READ];
        let n = match std::pin::pin!(rd.read(&mut first)).poll(cx) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        self.buf.reserve(self.chunk.max(want));
        self.buf.extend_from_slice(&first[..n]);
        // Whatever else already arrived, without waiting. An end of stream or an error
        // seen here is seen again by the next call.
        let more = match std::pin::pin!(rd.read_buf(&mut self.buf)).poll(cx) {
            Poll::Ready(Ok(m)) => m,
            _ => 0,
        };
        Poll::Ready(Ok(n + more))
    }
}

/// Encoded answers waiting to be written.
#[derive(Default)]
pub struct WriteBuffer {
    out: Vec<u8>,
}

impl WriteBuffer {
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Writes everything out and gives the memory up.
    pub async fn flush<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<()> {
        if !self.out.is_empty() {
            wr.write_all(&self.out).await?;
        }
        self.out = Vec::new();
        wr.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer_and_reads_what_arrives_whole() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let mut rb = ReadBuffer::new(4096);
        // 200 bytes at once: more than the first read's array.
        let sent: Vec<u8> = (0..200u8).collect();
        client.write_all(&sent).await.unwrap();
        let mut got = 0;
        while got < sent.len() {
            got += rb.fill(&mut server, 0).await.unwrap();
        }
        assert_eq!(&rb.bytes()[..], &sent[..]);
        let _ = rb.bytes().split_to(200);
        assert!(rb.is_empty());
        // Waiting again gives the (now empty) buffer up before the wait.
        {
            let wait = rb.fill(&mut server, 0);
            futures::pin_mut!(wait);
            assert!(futures::poll!(&mut wait).is_pending());
        }
        assert_eq!(rb.bytes().capacity(), 0);
        // A cancelled wait lost nothing: the next bytes are read in full.
        client.write_all(b"next").await.unwrap();
        assert_eq!(rb.fill(&mut server, 0).await.unwrap(), 4);
        assert_eq!(&rb.bytes()[..], b"next");
        drop(client);
        let _ = rb.bytes().split_to(4);
        assert_eq!(rb.fill(&mut server, 0).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_known_frame_length_is_read_into_room_made_for_it() {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let mut rb = ReadBuffer::new(1024);
        let big = vec![7u8; 300_000];
        let writer = tokio::spawn(async move {
            client.write_all(&big).await.unwrap();
            client
        });
        let mut got = rb.fill(&mut server, 0).await.unwrap();
        while got < 300_000 {
            let want = 300_000 - rb.bytes().len();
            got += rb.fill(&mut server, want).await.unwrap();
        }
        assert_eq!(rb.bytes().len(), 300_000);
        assert!(rb.bytes().iter().all(|b| *b == 7));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_flush_writes_everything_and_gives_the_memory_up() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let mut wb = WriteBuffer::default();
        wb.extend_from_slice(b"hello ");
        wb.extend_from_slice(b"world");
        wb.flush(&mut server).await.unwrap();
        assert!(wb.is_empty());
        assert_eq!(wb.out.capacity(), 0);
        let mut got = [0u8; 11];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
    }

    #[tokio::test]
    async fn a_polled_reader_holds_no_buffer_while_idle_and_loses_nothing() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let mut rb = ReadBuffer::new(4096);
        let poll = |rb: &mut ReadBuffer, server: &mut tokio::io::DuplexStream| {
            let waker = futures::task::noop_waker();
            rb.poll_fill(&mut Context::from_waker(&waker), server, 0)
        };
        assert!(poll(&mut rb, &mut server).is_pending());
        assert_eq!(rb.bytes().capacity(), 0, "an idle wait holds no buffer");
        // More than the first read's array: the rest is read in the same call.
        let sent: Vec<u8> = (0..200u8).collect();
        client.write_all(&sent).await.unwrap();
        assert!(matches!(poll(&mut rb, &mut server), Poll::Ready(Ok(200))));
        assert_eq!(&rb.bytes()[..], &sent[..]);
        // A buffer with bytes in it is kept while the socket has nothing more.
        assert!(poll(&mut rb, &mut server).is_pending());
        assert_eq!(rb.bytes().len(), 200);
        let _ = rb.bytes().split_to(200);
        // Emptied: given up at the next wait.
        assert!(poll(&mut rb, &mut server).is_pending());
        assert_eq!(rb.bytes().capacity(), 0);
        drop(client);
        assert!(matches!(poll(&mut rb, &mut server), Poll::Ready(Ok(0))));
    }
}
