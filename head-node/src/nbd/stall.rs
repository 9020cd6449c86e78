//! Progress deadlines for the moments the server waits on a client.
//!
//! A client that stops reading its replies, or stops sending a write's payload halfway, holds
//! what its requests took: their share of the server-wide in-flight bytes, which every other
//! connection draws from too. So while the server waits on a client — replies to write, a
//! payload to receive — the client must make progress at least once per `stall-timeout`, and
//! must not fall behind `stall-min-rate` by more than `stall-timeout` over the whole wait (a
//! client trickling one byte a minute would otherwise hold its share for good); else the
//! connection is closed and gives everything back. A connection idle *between* requests holds
//! nothing and is left alone.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::{Instant, Sleep};

/// How long a client may keep the server waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stall {
    /// Longest time without progress, and the slack on top of the rate's allowance.
    pub(crate) limit: Duration,
    /// Bytes per second the client must average while the server waits on it.
    pub(crate) min_rate: u64,
}

impl Stall {
    /// The time `bytes` may take at the minimum rate.
    fn allowance(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.min_rate.max(1) as f64)
    }
}

/// The error of a stalled client.
pub(crate) fn stalled(what: &str, limit: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the client made no progress for {} s {what}",
            limit.as_secs_f64()
        ),
    )
}

/// True for the error [`stalled`] makes.
pub(crate) fn is_stall(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut
}

/// A writer that fails with [`io::ErrorKind::TimedOut`] when the peer keeps it waiting too
/// long. The guard arms when an operation goes pending (the peer does not read), with a
/// deadline `limit` away; every byte written while armed pushes the deadline back by its
/// allowance at the minimum rate; a completed flush or shutdown (nothing left to send)
/// disarms it. So a stalled peer fails after `limit`, and a trickling one once it has fallen
/// `limit` behind the minimum rate.
#[derive(Debug)]
pub(crate) struct StallGuard<W> {
    inner: W,
    stall: Stall,
    /// Armed while the peer keeps the writer waiting.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<W> StallGuard<W> {
    pub(crate) fn new(inner: W, stall: Stall) -> Self {
        Self {
            inner,
            stall,
            timer: None,
        }
    }

    fn error(&mut self) -> io::Error {
        self.timer = None;
        stalled("reading its replies", self.stall.limit)
    }

    /// A write made progress (`n` bytes) or went pending.
    fn watch_write(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                if let Some(timer) = self.timer.as_mut() {
                    let deadline = timer.deadline() + self.stall.allowance(n as u64);
                    if Instant::now() > deadline {
                        return Poll::Ready(Err(self.error()));
                    }
                    timer.as_mut().reset(deadline);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.pending(cx),
        }
    }

    /// A flush or shutdown completed (disarms) or went pending.
    fn watch_done(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<()>>,
    ) -> Poll<io::Result<()>> {
        match r {
            Poll::Ready(r) => {
                self.timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.pending(cx),
        }
    }

    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.stall.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(self.error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for StallGuard<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch_write(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch_done(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch_done(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Time left for the next read of a payload: at most `limit` without progress, and never past
/// the payload's whole deadline.
fn next_wait(stall: Stall, deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .min(stall.limit)
}

/// Fills `buf` from `rd`, failing with [`stalled`] when no byte arrives for `limit` or the
/// whole payload takes longer than `limit` plus its allowance at the minimum rate, and with
/// `UnexpectedEof` when the stream ends first.
pub(crate) async fn read_exact<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    stall: Stall,
) -> io::Result<()> {
    let deadline = Instant::now() + stall.limit + stall.allowance(buf.len() as u64);
    let mut n = 0;
    while n < buf.len() {
        match tokio::time::timeout(next_wait(stall, deadline), rd.read(&mut buf[n..])).await {
            Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(k)) => n += k,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(stalled("sending a write's payload", stall.limit)),
        }
    }
    Ok(())
}

/// Reads and discards `n` bytes from `rd`, with the same deadlines as [`read_exact`].
pub(crate) async fn drain<R: AsyncRead + Unpin>(
    rd: &mut R,
    mut n: u64,
    stall: Stall,
) -> io::Result<()> {
    let deadline = Instant::now() + stall.limit + stall.allowance(n);
    let mut scratch = [0u8; 8192];
    while n > 0 {
        let take = n.min(scratch.len() as u64) as usize;
        match tokio::time::timeout(next_wait(stall, deadline), rd.read(&mut scratch[..take])).await
        {
            Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(k)) => n -= k as u64,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(stalled("sending a refused payload", stall.limit)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn stall(limit_ms: u64, min_rate: u64) -> Stall {
        Stall {
            limit: Duration::from_millis(limit_ms),
            min_rate,
        }
    }

    #[tokio::test]
    async fn a_writer_whose_peer_never_reads_fails_after_the_limit() {
        let (a, _b) = tokio::io::duplex(1024);
        let mut w = StallGuard::new(a, stall(200, 1 << 20));
        let started = Instant::now();
        let e = w.write_all(&[7u8; 4096]).await.expect_err("stalled");
        assert!(is_stall(&e), "{e}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_up_is_never_cut_off() {
        let (a, mut b) = tokio::io::duplex(1024);
        // 8 KiB/s asked for; the reader below does 10 KiB/s.
        let mut w = StallGuard::new(a, stall(200, 8 << 10));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 512];
            while got < 8 * 1024 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                got += b.read(&mut buf).await.unwrap();
            }
            got
        });
        // 8 KiB through a 1 KiB pipe, 512 bytes per 50 ms: 0.8 s in all, well past the limit,
        // but never 200 ms without progress.
        w.write_all(&[1u8; 8 * 1024])
            .await
            .expect("progress all along");
        w.flush().await.unwrap();
        assert_eq!(reader.await.unwrap(), 8 * 1024);
    }

    #[tokio::test]
    async fn a_payload_that_stops_arriving_fails_and_one_that_ends_is_eof() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&[3u8; 100]).await.unwrap();
        let mut buf = vec![0u8; 200];
        let e = read_exact(&mut b, &mut buf, stall(200, 1 << 20))
            .await
            .expect_err("stalled");
        assert!(is_stall(&e), "{e}");
        a.write_all(&[3u8; 100]).await.unwrap();
        drop(a);
        let e = drain(&mut b, 200, stall(200, 1 << 20))
            .await
            .expect_err("ended");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A peer that makes progress now and then, but far below the minimum rate, is cut off
    /// once it has fallen `limit` behind it: progress alone does not keep the server waiting.
    #[tokio::test]
    async fn a_trickling_peer_is_cut_off_both_ways() {
        // Reading replies: 64 bytes per 50 ms (1.3 KiB/s) against 64 KiB/s asked for.
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = StallGuard::new(a, stall(300, 64 << 10));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if !matches!(b.read(&mut buf).await, Ok(n) if n > 0) {
                    break;
                }
            }
        });
        let started = Instant::now();
        let e = w.write_all(&[1u8; 64 << 10]).await.expect_err("cut off");
        assert!(is_stall(&e), "{e}");
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        drop(w);
        reader.await.unwrap();

        // Sending a payload: 64 bytes per 50 ms, no gap ever reaching the 300 ms limit.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if a.write_all(&[2u8; 64]).await.is_err() {
                    break;
                }
            }
        });
        let mut buf = vec![0u8; 64 << 10];
        let started = Instant::now();
        let e = read_exact(&mut b, &mut buf, stall(300, 64 << 10))
            .await
            .expect_err("cut off");
        assert!(is_stall(&e), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(b);
        writer.await.unwrap();
    }
}
