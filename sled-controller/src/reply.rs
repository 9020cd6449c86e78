//! The way back from the device threads to a connection.
//!
//! Every connection owns a [`ReplySink`]. The requests it hands to device threads carry the sink
//! and a [`Ticket`] (what the connection needs to answer and account for the request); the device
//! thread pushes each finished request into the sink without waking anyone, and wakes every sink
//! it touched once, when it has finished a round of work ([`Wakes`]). The connection's writer
//! then answers everything the sink holds and flushes once. So a burst of completions costs one
//! wake-up and one `sendto`, not one per request.
//!
//! The sink is bounded by construction: an entry exists only for a request that holds one of the
//! connection's in-flight permits, and the permit is given back only after the writer has taken
//! the entry and written its reply.

use crate::device::DevError;
use crate::sled::Routed;
use common::AlignedBuf;
use common::ids::VolumeId;
use common::sled_proto::Response;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Notify;

/// What a connection needs back with a request's result. The device carries it untouched.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    /// The request's tag, echoed in the reply.
    pub tag: u64,
    /// Operation name (metric label); `None` for a frame refused before it was decoded.
    pub op: Option<&'static str>,
    /// When the request frame was received.
    pub started: Instant,
    /// In-flight request permits to give back (1, or 0 for a reply to a refused frame).
    pub requests: u32,
    /// In-flight KiB permits to give back.
    pub kib: u32,
    /// The volume (for per-volume metrics).
    pub volume: VolumeId,
    /// Payload bytes of a read or write (for per-volume metrics).
    pub len: u64,
    /// A write routed to a device: the sled's catalog hears how it ended.
    pub routed: Option<Routed>,
}

/// How a request ended.
#[derive(Debug)]
pub enum Outcome {
    /// A device request finished: the data of a read, nothing for a mutation.
    Device(Result<Option<AlignedBuf>, DevError>),
    /// A reply made without the hot path (refused frames, control requests).
    Ready(Response, Option<AlignedBuf>),
}

/// An entry of a sink: a request's result.
#[derive(Debug)]
pub struct Entry {
    /// What the connection needs back.
    pub ticket: Ticket,
    /// The result.
    pub outcome: Outcome,
}

/// A connection's queue of finished requests, filled by device threads and the connection's own
/// tasks, drained by its writer.
#[derive(Debug, Default)]
pub struct ReplySink {
    queue: Mutex<Vec<Entry>>,
    notify: Notify,
    ended: AtomicBool,
}

impl ReplySink {
    /// Adds an entry without waking the writer (call [`ReplySink::wake`] after a batch).
    pub fn push(&self, e: Entry) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }

    /// Wakes the writer (at most one wake-up is stored while it is busy).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Adds an entry and wakes the writer.
    pub fn push_and_wake(&self, e: Entry) {
        self.push(e);
        self.wake();
    }

    /// Moves every queued entry into `out` (which the caller passes in empty, to reuse it).
    pub fn take(&self, out: &mut Vec<Entry>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut *q, out);
    }

    /// Says that no more requests will come (the connection's reader stopped) and wakes the
    /// writer. Entries pushed by the reader before this are seen by a [`ReplySink::take`] that
    /// follows an [`ReplySink::ended`] returning true.
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// True once [`ReplySink::end`] was called.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Waits for a wake-up (returns at once if one was stored since the last wait).
    pub async fn woken(&self) {
        self.notify.notified().await;
    }
}

/// A request's way back to its connection. Answered exactly once: dropped unanswered (a device
/// thread that stopped on an engine error, or panicked, with requests it had accepted), it
/// answers `ShuttingDown`, so the connection still gives back the request's permits and its
/// client hears about it, instead of waiting forever.
#[derive(Debug)]
pub struct ReplyTo {
    sink: Arc<ReplySink>,
    ticket: Ticket,
    answered: bool,
}

impl ReplyTo {
    /// The way back to `sink` for the request of `ticket`.
    pub fn new(sink: Arc<ReplySink>, ticket: Ticket) -> Self {
        Self {
            sink,
            ticket,
            answered: false,
        }
    }

    /// Pushes the answer into the sink without waking the writer; returns the sink.
    fn answer(mut self, outcome: Outcome) -> Arc<ReplySink> {
        self.answered = true;
        self.sink.push(Entry {
            ticket: self.ticket,
            outcome,
        });
        self.sink.clone()
    }

    /// Pushes the answer and wakes the connection's writer.
    pub fn answer_now(self, outcome: Outcome) {
        self.answer(outcome).wake();
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        if !self.answered {
            self.answered = true;
            self.sink.push_and_wake(Entry {
                ticket: self.ticket,
                outcome: Outcome::Device(Err(crate::device::DevError::ShuttingDown)),
            });
        }
    }
}

/// Sinks a device thread has pushed into since it last woke them; each is woken once.
#[derive(Debug, Default)]
pub struct Wakes {
    touched: Vec<Arc<ReplySink>>,
}

impl Wakes {
    /// Pushes an entry into `to`'s sink and remembers to wake it.
    pub fn push(&mut self, to: ReplyTo, outcome: Outcome) {
        let sink = to.answer(outcome);
        if !self.touched.iter().any(|s| Arc::ptr_eq(s, &sink)) {
            self.touched.push(sink);
        }
    }

    /// Wakes every sink pushed into since the last call.
    pub fn wake_all(&mut self) {
        for s in self.touched.drain(..) {
            s.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DevError;

    fn ticket(tag: u64) -> Ticket {
        Ticket {
            tag,
            op: Some("write"),
            started: Instant::now(),
            requests: 1,
            kib: 4,
            volume: VolumeId(1),
            len: 4096,
            routed: None,
        }
    }

    #[test]
    fn every_way_back_answers_exactly_once() {
        let sink = Arc::new(ReplySink::default());
        let mut wakes = Wakes::default();
        ReplyTo::new(sink.clone(), ticket(1)).answer_now(Outcome::Device(Ok(None)));
        wakes.push(
            ReplyTo::new(sink.clone(), ticket(2)),
            Outcome::Device(Ok(None)),
        );
        wakes.wake_all();
        // Dropped unanswered (its device thread stopped): answered as shut down.
        drop(ReplyTo::new(sink.clone(), ticket(3)));
        let mut got = Vec::new();
        sink.take(&mut got);
        let tags: Vec<u64> = got.iter().map(|e| e.ticket.tag).collect();
        assert_eq!(tags, [1, 2, 3]);
        assert!(matches!(got[0].outcome, Outcome::Device(Ok(None))));
        assert!(matches!(got[1].outcome, Outcome::Device(Ok(None))));
        assert!(matches!(
            got[2].outcome,
            Outcome::Device(Err(DevError::ShuttingDown))
        ));
    }
}
