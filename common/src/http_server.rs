//! The HTTP server every process runs for `/metrics` (and the head node for its admin API):
//! axum routes on hyper's HTTP/1 connections, with the bounds a server reachable over the
//! network needs.
//!
//! * At most [`ServeLimits::max_connections`] connections are served at once; further ones
//!   wait in the listen backlog, so a flood of connections cannot take the file descriptors the
//!   process's other listeners (NBD, peers, sleds) need.
//! * A client must send a whole request header within [`ServeLimits::header_read_timeout`]
//!   (hyper's timer starts when it waits for a request, so it also ends idle keep-alive
//!   connections); a request being handled is never timed out here — an admin delete may take
//!   minutes.
//! * On shutdown, connections finish the request they are in within
//!   [`ServeLimits::shutdown_grace`]; then the rest are dropped, so a stalled client cannot
//!   keep the process from exiting.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Bounds of [`serve_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a client has to send a request header.
    pub header_read_timeout: Duration,
    /// Time connections get after shutdown.
    pub shutdown_grace: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serves `router` on `listener` with the default [`ServeLimits`] until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, router, shutdown, ServeLimits::default()).await
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then gives open
/// connections `limits.shutdown_grace` to finish.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    limits: ServeLimits,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let res = tokio::select! {
                r = conn.as_mut() => r,
                () = stopped => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = res {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = conns.len(),
            "HTTP connections still open after the shutdown grace; closing them"
        );
        conns.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn limits(max_connections: usize) -> ServeLimits {
        ServeLimits {
            max_connections,
            header_read_timeout: Duration::from_millis(300),
            shutdown_grace: Duration::from_millis(300),
        }
    }

    async fn start(
        limits: ServeLimits,
    ) -> (
        std::net::SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/", get(|| async { "hello" }));
        let (tx, mut rx) = watch::channel(false);
        let server = tokio::spawn(serve_with(
            listener,
            router,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
            limits,
        ));
        (addr, tx, server)
    }

    async fn get_root(addr: std::net::SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("an answer")
            .unwrap();
        out
    }

    /// Read until the server closes (EOF or reset); false if it is still open after 10 s.
    async fn closed_by_server(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_header_is_closed() {
        let (addr, _stop, _server) = start(limits(8)).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let started = Instant::now();
        assert!(closed_by_server(&mut slow).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(get_root(addr).await.ends_with("hello"));
    }

    #[tokio::test]
    async fn connections_beyond_the_bound_wait_for_a_free_slot() {
        let (addr, _stop, _server) = start(limits(1)).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // The one slot is taken: a second client waits in the backlog...
        let second = tokio::spawn(get_root(addr));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished());
        // ...until the first one's header times out and frees it.
        assert!(closed_by_server(&mut first).await);
        assert!(second.await.unwrap().ends_with("hello"));
    }

    #[tokio::test]
    async fn shutdown_is_not_held_up_by_a_stalled_client() {
        let mut l = limits(8);
        l.header_read_timeout = Duration::from_secs(60);
        let (addr, stop, server) = start(l).await;
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(closed_by_server(&mut stalled).await);
    }
}
