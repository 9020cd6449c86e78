//! Waiting for SIGINT or SIGTERM, for clean shutdown of every process.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGINT and SIGTERM caught from the moment this is made (see [`Shutdown::catch`]).
#[derive(Debug)]
pub struct Shutdown {
    signals: Option<(Signal, Signal)>,
}

impl Shutdown {
    /// Catches SIGINT and SIGTERM from now on (a signal that arrives before [`Shutdown::wait`]
    /// is awaited is remembered, not fatal). Must be called inside a tokio runtime.
    pub fn catch() -> Self {
        let signals = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            _ => None,
        };
        Self { signals }
    }

    /// Resolves on the first SIGINT (Ctrl-C) or SIGTERM since [`Shutdown::catch`].
    pub async fn wait(&mut self) {
        let Some((term, int)) = self.signals.as_mut() else {
            // Without signal handlers the process can only be killed; wait forever.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn wait_for_shutdown() {
    Shutdown::catch().wait().await
}
