//! The thread that owns a device, and the handle the network side uses to reach it.
//!
//! Requests travel through a bounded tokio channel, one at a time or a batch at once
//! ([`DeviceHandle::send_batch`]: the requests a connection read from one socket read). The thread
//! drains it while the device has room (a full device is back-pressure: the channel fills and
//! senders wait), pushes I/O, and blocks in the engine until an operation completes, the periodic
//! tick is due, or the doorbell rings. Senders ring the doorbell only when the thread says it is
//! about to sleep, so a busy device costs no extra syscall per request. Replies to connections
//! are pushed into their sinks and each connection is woken once per round
//! ([`DeviceCore::deliver`](super::core::DeviceCore::deliver)). Dropping the last handle closes the channel and
//! rings the doorbell; the thread answers what it holds, writes back its checksums and exits.

use super::core::DeviceCore;
use super::{DevError, DevRequest};
use crate::engine::{Doorbell, IoEngine};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc;

#[derive(Debug)]
struct Bell {
    doorbell: Doorbell,
    sleeping: AtomicBool,
}

#[derive(Debug)]
struct Inner {
    tx: Option<mpsc::Sender<DevRequest>>,
    bell: Arc<Bell>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the channel first, then wake the thread so it sees the close.
        self.tx.take();
        self.bell.doorbell.ring();
    }
}

/// A cloneable handle to a device thread.
#[derive(Debug, Clone)]
pub struct DeviceHandle {
    inner: Arc<Inner>,
}

impl DeviceHandle {
    /// Sends a request, waiting for queue space (back-pressure). A request sent to a thread
    /// that has exited is failed with [`DevError::ShuttingDown`].
    pub async fn send(&self, req: DevRequest) {
        let Some(tx) = self.inner.tx.as_ref() else {
            req.fail(DevError::ShuttingDown);
            return;
        };
        if let Err(mpsc::error::SendError(req)) = tx.send(req).await {
            req.fail(DevError::ShuttingDown);
            return;
        }
        self.ring_if_sleeping();
    }

    /// Sends every request of `batch` (draining it) in order, waiting for queue space as needed,
    /// and rings the doorbell at most once per queue reservation instead of once per request.
    pub async fn send_batch(&self, batch: &mut Vec<DevRequest>) {
        let Some(tx) = self.inner.tx.as_ref() else {
            for req in batch.drain(..) {
                req.fail(DevError::ShuttingDown);
            }
            return;
        };
        let mut reqs = batch.drain(..);
        loop {
            let n = reqs.len().min(tx.max_capacity());
            if n == 0 {
                break;
            }
            match tx.reserve_many(n).await {
                Ok(permits) => {
                    for (permit, req) in permits.zip(reqs.by_ref()) {
                        permit.send(req);
                    }
                    self.ring_if_sleeping();
                }
                Err(mpsc::error::SendError(())) => {
                    for req in reqs.by_ref() {
                        req.fail(DevError::ShuttingDown);
                    }
                }
            }
        }
    }

    fn ring_if_sleeping(&self) {
        if self.inner.bell.sleeping.swap(false, Ordering::SeqCst) {
            self.inner.bell.doorbell.ring();
        }
    }
}

/// Starts the thread that owns `core`. Returns the handle and the thread's join handle.
pub fn spawn_device<E: IoEngine + 'static>(
    name: String,
    mut core: DeviceCore<E>,
    queue: usize,
) -> std::io::Result<(DeviceHandle, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<DevRequest>(queue.max(1));
    let bell = Arc::new(Bell {
        doorbell: Doorbell::new()?,
        sleeping: AtomicBool::new(false),
    });
    let thread_bell = bell.clone();
    let join = std::thread::Builder::new()
        .name(format!("dev-{name}"))
        .spawn(move || {
            let bell = thread_bell;
            let mut closing = false;
            loop {
                while core.can_accept() {
                    match rx.try_recv() {
                        Ok(req) => core.accept(req),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closing = true;
                            break;
                        }
                    }
                }
                if core.tick_due_in().is_zero() {
                    core.tick();
                }
                if closing && core.idle() {
                    break;
                }
                // Announce the sleep, then look again: a sender that queued after the look sees
                // the flag and rings.
                bell.sleeping.store(true, Ordering::SeqCst);
                let nothing_queued = rx.is_empty() || !core.can_accept();
                let wait = (nothing_queued && !closing).then(|| core.tick_due_in());
                let res = core.poll(
                    wait.or(closing.then_some(std::time::Duration::from_millis(10))),
                    &bell.doorbell,
                );
                bell.sleeping.store(false, Ordering::SeqCst);
                if let Err(e) = res {
                    tracing::error!(device = %name, error = %e, "device engine failed; stopping");
                    break;
                }
            }
            if let Err(e) = core.flush_all(&bell.doorbell) {
                tracing::error!(device = %name, error = %e, "writing back checksums at shutdown");
            }
            core.deliver();
            // Anything still queued is refused.
            rx.close();
            while let Ok(req) = rx.try_recv() {
                req.fail(DevError::ShuttingDown);
            }
            tracing::info!(device = %name, "device thread stopped");
        })?;
    Ok((
        DeviceHandle {
            inner: Arc::new(Inner { tx: Some(tx), bell }),
        },
        join,
    ))
}
