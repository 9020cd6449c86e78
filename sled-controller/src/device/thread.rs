//! The drivers that own a device, and the handle the network side uses to reach one.
//!
//! Requests travel through a bounded tokio channel, one at a time or a batch at once
//! ([`DeviceHandle::send_batch`]: the requests a connection read from one socket read). A driver
//! drains it while the device has room (a full device is back-pressure: the channel fills and
//! senders wait) and pushes I/O. Replies to connections are pushed into their sinks and each
//! connection is woken once per round ([`DeviceCore::deliver`](super::core::DeviceCore::deliver)).
//! Dropping the last handle closes the channel; the driver answers what it holds, writes back its
//! checksums and stops. Two drivers:
//!
//! * [`spawn_device_task`] (the sled's default, `threading = "event-loop"`): a task on the
//!   runtime that serves the sockets, waiting for the ring's completions through its descriptor
//!   in the same event loop; no thread hand-off on the data path.
//! * [`spawn_device`] (`threading = "threads"`): a thread of its own that blocks in the engine
//!   until an operation completes, the periodic tick is due, or the doorbell rings. Senders ring
//!   the doorbell only when the thread says it is about to sleep, so a busy device costs no extra
//!   syscall per request; closing the channel rings it too.

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
            finish(&name, &mut core, &mut rx, &bell.doorbell);
        })?;
    Ok((
        DeviceHandle {
            inner: Arc::new(Inner { tx: Some(tx), bell }),
        },
        join,
    ))
}

/// Completions the event-loop driver processes before it lets the connections run. The disk
/// tends to finish a queue's worth of requests at once; answering them in slices of this many
/// gets the first replies onto the wire, and the client's next requests back to the disk, while
/// the rest are still being processed, instead of the whole queue making each trip as one
/// convoy (measured in bench/README.md: QD 32 reads 50k IOPS with no limit, 76k with 8, 71k
/// with 4, 75k with 16).
pub const REPLY_SLICE: usize = 8;

/// The ring's descriptor as [`tokio::io::unix::AsyncFd`] needs it (the engine owns the ring).
struct RingFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for RingFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// What the event-loop driver owns. Fields drop in order: the descriptor leaves the event loop
/// before the engine closes it.
struct Driver<E: IoEngine> {
    ring: tokio::io::unix::AsyncFd<RingFd>,
    core: DeviceCore<E>,
}

/// Starts a task on the current tokio runtime that drives `core` from the event loop: it waits
/// for the ring's completions (its descriptor polls readable when some are queued) next to the
/// request queue and the tick timer, so a connection on the same thread hands requests to the
/// device, and gets its replies, without waking another thread. An engine without a completion
/// descriptor (sync, mem) gets [`spawn_device`]'s thread instead.
pub fn spawn_device_task<E: IoEngine + 'static>(
    name: String,
    core: DeviceCore<E>,
    queue: usize,
) -> std::io::Result<(DeviceHandle, tokio::task::JoinHandle<()>)> {
    let Some(fd) = core.completion_fd() else {
        let (handle, join) = spawn_device(name, core, queue)?;
        let task = tokio::task::spawn_blocking(move || drop(join.join()));
        return Ok((handle, task));
    };
    // SAFETY: `fd` is the ring's descriptor, owned by the engine inside `core`; the Driver keeps
    // core alive for as long as the AsyncFd and drops the AsyncFd first, so the descriptor stays
    // open and the same for the AsyncFd's whole life.
    let ring = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(RingFd(fd), tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)?;
    let (tx, rx) = mpsc::channel::<DevRequest>(queue.max(1));
    // Nobody sleeps on this doorbell (the driver never blocks in the engine), so senders never
    // ring it; the engine's interface still wants one.
    let bell = Arc::new(Bell {
        doorbell: Doorbell::new()?,
        sleeping: AtomicBool::new(false),
    });
    let task = tokio::spawn(drive(name, Driver { ring, core }, rx, bell.clone()));
    Ok((
        DeviceHandle {
            inner: Arc::new(Inner { tx: Some(tx), bell }),
        },
        task,
    ))
}

async fn drive<E: IoEngine>(
    name: String,
    mut d: Driver<E>,
    mut rx: mpsc::Receiver<DevRequest>,
    bell: Arc<Bell>,
) {
    let mut closing = false;
    loop {
        while d.core.can_accept() {
            match rx.try_recv() {
                Ok(req) => d.core.accept(req),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closing = true;
                    break;
                }
            }
        }
        if d.core.tick_due_in().is_zero() {
            d.core.tick();
        }
        let more = match d.core.poll_some(REPLY_SLICE, &bell.doorbell) {
            Ok(more) => more,
            Err(e) => {
                tracing::error!(device = %name, error = %e, "device engine failed; stopping");
                break;
            }
        };
        if more || d.core.unsubmitted() {
            // Completions left to process, or follow-up I/O they queued: let the connections
            // send what was answered so far, then carry on without waiting.
            tokio::task::yield_now().await;
            continue;
        }
        if closing && d.core.idle() {
            break;
        }
        let accept = d.core.can_accept() && !closing;
        let tick = tokio::time::sleep(if closing {
            std::time::Duration::from_millis(10)
        } else {
            d.core.tick_due_in()
        });
        tokio::select! {
            biased;
            ready = d.ring.readable() => match ready {
                // Cleared before the completions are collected (on the next round), so one
                // that lands in between marks the descriptor ready again.
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => {
                    tracing::error!(device = %name, error = %e, "waiting on the ring; stopping");
                    break;
                }
            },
            req = rx.recv(), if accept => match req {
                Some(req) => d.core.accept(req),
                None => closing = true,
            },
            () = tick => {}
        }
    }
    let Driver { ring, mut core } = d;
    drop(ring);
    finish(&name, &mut core, &mut rx, &bell.doorbell);
}

/// The end of a driver: writes back the checksums, answers what the core holds, and refuses
/// anything still queued.
fn finish<E: IoEngine>(
    name: &str,
    core: &mut DeviceCore<E>,
    rx: &mut mpsc::Receiver<DevRequest>,
    doorbell: &Doorbell,
) {
    if let Err(e) = core.flush_all(doorbell) {
        tracing::error!(device = %name, error = %e, "writing back checksums at shutdown");
    }
    core.deliver();
    rx.close();
    while let Ok(req) = rx.try_recv() {
        req.fail(DevError::ShuttingDown);
    }
    tracing::info!(device = %name, "device driver stopped");
}
