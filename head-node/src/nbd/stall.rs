//! Progress deadlines for the moments the server waits on a client.
//!
//! A client that stops reading its replies, or stops sending a write's payload halfway, holds
//! what its requests took: their share of the server-wide in-flight bytes, which every other
//! connection draws from too. So while the server waits on a client — replies to write, a
//! payload to receive — the client must make progress at least once per `stall-timeout`, or
//! the connection is closed and gives everything back. A connection idle *between* requests
//! holds nothing and is left alone.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::{Instant, Sleep};

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

/// A writer that fails with [`io::ErrorKind::TimedOut`] when a write, flush or shutdown stays
/// pending (the peer does not read) for longer than `limit` without any progress.
#[derive(Debug)]
pub(crate) struct StallGuard<W> {
    inner: W,
    limit: Duration,
    /// Armed while an operation is pending; reset by every completed one.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<W> StallGuard<W> {
    pub(crate) fn new(inner: W, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
        }
    }

    /// Called with the inner result: disarms on progress, arms (or checks) on pending.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = self.limit;
                let timer = self.timer.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + limit))
                });
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.timer = None;
                        Poll::Ready(Err(stalled("reading its replies", limit)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
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
        self.watch(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Fills `buf` from `rd`, failing with [`stalled`] when no byte arrives for `limit`, and with
/// `UnexpectedEof` when the stream ends first.
pub(crate) async fn read_exact<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    limit: Duration,
) -> io::Result<()> {
    let mut n = 0;
    while n < buf.len() {
        match tokio::time::timeout(limit, rd.read(&mut buf[n..])).await {
            Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(k)) => n += k,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(stalled("sending a write's payload", limit)),
        }
    }
    Ok(())
}

/// Reads and discards `n` bytes from `rd`, with the same deadline as [`read_exact`].
pub(crate) async fn drain<R: AsyncRead + Unpin>(
    rd: &mut R,
    mut n: u64,
    limit: Duration,
) -> io::Result<()> {
    let mut scratch = [0u8; 8192];
    while n > 0 {
        let take = n.min(scratch.len() as u64) as usize;
        match tokio::time::timeout(limit, rd.read(&mut scratch[..take])).await {
            Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(k)) => n -= k as u64,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(stalled("sending a refused payload", limit)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_writer_whose_peer_never_reads_fails_after_the_limit() {
        let (a, _b) = tokio::io::duplex(1024);
        let mut w = StallGuard::new(a, Duration::from_millis(200));
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
        let mut w = StallGuard::new(a, Duration::from_millis(200));
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
        let e = read_exact(&mut b, &mut buf, Duration::from_millis(200))
            .await
            .expect_err("stalled");
        assert!(is_stall(&e), "{e}");
        a.write_all(&[3u8; 100]).await.unwrap();
        drop(a);
        let e = drain(&mut b, 200, Duration::from_millis(200))
            .await
            .expect_err("ended");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
