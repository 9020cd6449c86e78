//! The async admission queue of one volume: FIFO, bounded, delays and never errors.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;

use super::bucket::Tokens;
use super::config::{QosConfig, QosError};
use super::limiter::{Decision, GlobalBucket, Grant, QosState, Request, VolumeLimiter};
use crate::clock::{Clock, SharedClock};

/// A node's global bucket, shared by the queues of every volume it leads.
pub type SharedGlobal = Arc<Mutex<GlobalBucket>>;

/// A [`Clock`] reading tokio's clock, so that the clock and `tokio::time::sleep` agree. Under
/// `#[tokio::test(start_paused = true)]` time only moves when every task sleeps, and jumps to the
/// next timer: throttling tests are exact and instant.
///
/// ```
/// use common::clock::Clock;
/// use common::throttle::TokioClock;
/// let c = TokioClock::new();
/// assert!(c.now_ns() < 1_000_000_000);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// An admitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// How it was paid.
    pub grant: Grant,
    /// How long it waited, from its arrival (the call that queued it) to its admission.
    pub waited: Duration,
}

/// What a dashboard shows about one volume's throttle, as of the moment of the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSnapshot {
    /// Work tokens (ops); `None`: unlimited baseline.
    pub work_tokens: Option<Tokens>,
    /// Burst credit balance (ops).
    pub burst_credits: Tokens,
    /// Peak tokens (ops); `None`: no ceiling.
    pub peak_tokens: Option<Tokens>,
    /// Bytes tokens; `None`: unlimited bandwidth.
    pub bytes_tokens: Option<Tokens>,
    /// The node's global bucket level (ops); `None`: unlimited node.
    pub global_level: Option<Tokens>,
    /// Requests admitted later than they arrived.
    pub delayed_count: u64,
    /// Their total wait.
    pub total_delay: Duration,
    /// Ops admitted.
    pub admitted_ops: u64,
    /// Bytes admitted.
    pub admitted_bytes: u64,
    /// Requests waiting now (in the queue or for a slot in it).
    pub waiting: u64,
}

/// The order of requests: tickets are handed out in arrival order and served one at a time.
///
/// A waiting request is woken only when what it waits for has happened — its turn came, or the
/// queue has room for it — never by every change of the line: with a thousand requests queued
/// behind a throttle, waking them all at each admission would cost a thousand task polls per
/// admitted request.
#[derive(Debug, Default)]
struct Line {
    /// The next ticket to hand out.
    next: u64,
    /// The ticket being served (the head of the queue).
    served: u64,
    /// Tickets after `served` whose request was dropped: skipped when their turn comes.
    abandoned: BTreeSet<u64>,
    /// Requests waiting for a slot in the queue, by ticket. Room frees in ticket order (a
    /// ticket has room once fewer than `bound` live tickets are ahead of it, so every earlier
    /// ticket has room too): they are woken from the smallest.
    for_slot: BTreeMap<u64, Waker>,
    /// Requests waiting for their turn, by ticket: woken when `served` reaches them.
    for_turn: BTreeMap<u64, Waker>,
}

impl Line {
    /// Live requests ahead of `ticket`.
    fn ahead_of(&self, ticket: u64) -> u64 {
        let skipped = self.abandoned.range(self.served..ticket).count() as u64;
        ticket.saturating_sub(self.served).saturating_sub(skipped)
    }

    /// `ticket` leaves the line (admitted or dropped); returns whether waiters must look again.
    fn leave(&mut self, ticket: u64) -> bool {
        if ticket == self.served {
            self.served += 1;
            while self.abandoned.remove(&self.served) {
                self.served += 1;
            }
            true
        } else if ticket > self.served {
            self.abandoned.insert(ticket)
        } else {
            false
        }
    }

    fn waiting(&self) -> u64 {
        self.ahead_of(self.next)
    }

    /// Takes out the wakers of the requests whose wait is over: the one whose turn it is, and
    /// those that now have a slot, in ticket order.
    fn ready(&mut self, bound: u64, out: &mut Vec<Waker>) {
        if let Some(w) = self.for_turn.remove(&self.served) {
            out.push(w);
        }
        while let Some(&first) = self.for_slot.keys().next() {
            if self.ahead_of(first) >= bound {
                break;
            }
            out.extend(self.for_slot.remove(&first));
        }
    }
}

#[derive(Debug)]
struct Shared {
    clock: SharedClock,
    limiter: Mutex<VolumeLimiter>,
    global: SharedGlobal,
    bound: u64,
    line: Mutex<Line>,
    reconfigured: Notify,
}

impl Shared {
    /// One admission attempt at the clock's now; the clock is read under both locks so that the
    /// buckets see time in order.
    fn try_admit(&self, req: &Request) -> (Decision, u64) {
        let mut limiter = lock(&self.limiter);
        let mut global = lock(&self.global);
        let now = self.clock.now_ns();
        (limiter.try_admit(&mut global, now, req), now)
    }
}

/// Locks, ignoring poisoning: the throttle's state is consistent between calls, and nothing in
/// this module panics while holding a lock.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The admission queue of one volume: its [`VolumeLimiter`], its node's [`SharedGlobal`] bucket
/// and a FIFO line of waiting requests. Requests are admitted strictly in arrival order (a small
/// request never overtakes a big one that arrived earlier); the head sleeps exactly the delay the
/// limiter computes. At most `bound` requests are queued; later ones wait for a slot, in order
/// too. Nothing fails: callers only see latency. Clones share the same queue.
///
/// ```
/// use common::throttle::{GlobalBucket, QosConfig, ThrottleQueue, TokioClock, VolumeLimiter};
/// use std::num::NonZeroUsize;
/// use std::sync::{Arc, Mutex};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let clock = Arc::new(TokioClock::new());
/// let limiter = VolumeLimiter::new(QosConfig { iops: Some(1_000), ..QosConfig::UNLIMITED }, 0).unwrap();
/// let node = Arc::new(Mutex::new(GlobalBucket::unlimited()));
/// let queue = ThrottleQueue::new(limiter, node, clock, NonZeroUsize::new(64).unwrap());
/// let admitted = queue.admit(4096).await;
/// assert_eq!(admitted.grant.ops, 1);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ThrottleQueue {
    shared: Arc<Shared>,
}

impl ThrottleQueue {
    /// A queue admitting through `limiter` and the node's `global` bucket, reading time from
    /// `clock` (which must agree with `tokio::time`: [`SystemClock`](crate::clock::SystemClock)
    /// in production, [`TokioClock`] in paused-time tests), holding at most `bound` requests.
    pub fn new(
        limiter: VolumeLimiter,
        global: SharedGlobal,
        clock: SharedClock,
        bound: NonZeroUsize,
    ) -> Self {
        ThrottleQueue {
            shared: Arc::new(Shared {
                clock,
                limiter: Mutex::new(limiter),
                global,
                bound: bound.get() as u64,
                line: Mutex::new(Line::default()),
                reconfigured: Notify::new(),
            }),
        }
    }

    /// Admits a read or write of `len` bytes, waiting as long as the throttle requires.
    ///
    /// The request's place in line is taken by this call, not by the first poll of the returned
    /// future, so requests issued in order are admitted in order even if their futures are
    /// spawned on different tasks. Dropping the future gives up the place.
    pub fn admit(&self, len: u64) -> impl Future<Output = Admitted> + Send + 'static {
        self.admit_request(Request::io(len))
    }

    /// Admits a request with an explicit cost (a flush: [`Request::flush`]). Same ordering as
    /// [`ThrottleQueue::admit`].
    pub fn admit_request(&self, req: Request) -> impl Future<Output = Admitted> + Send + 'static {
        let reserve = self.reserve();
        async move { reserve.await.admit_request(req).await }
    }

    /// Takes a place in line now and waits for a slot in the queue: this is the back-pressure
    /// point (an NBD reader awaits it before reading the next request off the socket). The
    /// returned [`Slot`] keeps the place; requests behind it wait until it is admitted or
    /// dropped.
    pub fn reserve(&self) -> impl Future<Output = Slot> + Send + 'static {
        let slot = Slot::enter(self.shared.clone());
        async move {
            slot.wait_for_slot().await;
            slot
        }
    }

    /// Changes the volume's QoS now, keeping its balances; the head of the queue re-evaluates
    /// its delay at once. On error nothing changes.
    pub fn set_config(&self, config: QosConfig) -> Result<(), QosError> {
        {
            let mut limiter = lock(&self.shared.limiter);
            let now = self.shared.clock.now_ns();
            limiter.set_config(now, config)?;
        }
        self.shared.reconfigured.notify_waiters();
        Ok(())
    }

    /// The volume's QoS.
    pub fn config(&self) -> QosConfig {
        lock(&self.shared.limiter).config()
    }

    /// The state to replicate, as of now.
    pub fn export_state(&self) -> QosState {
        let mut limiter = lock(&self.shared.limiter);
        let now = self.shared.clock.now_ns();
        limiter.advance(now);
        limiter.export_state()
    }

    /// Replaces the credit balance with a replicated one (clamped to the maximum).
    pub fn import_state(&self, state: &QosState) {
        {
            let mut limiter = lock(&self.shared.limiter);
            let now = self.shared.clock.now_ns();
            limiter.advance(now);
            limiter.import_state(state);
        }
        self.shared.reconfigured.notify_waiters();
    }

    /// Every metric, as of now.
    pub fn snapshot(&self) -> ThrottleSnapshot {
        let waiting = self.waiting();
        let mut limiter = lock(&self.shared.limiter);
        let mut global = lock(&self.shared.global);
        let now = self.shared.clock.now_ns();
        limiter.advance(now);
        global.advance(now);
        ThrottleSnapshot {
            work_tokens: limiter.work_tokens(),
            burst_credits: limiter.burst_credits(),
            peak_tokens: limiter.peak_tokens(),
            bytes_tokens: limiter.bytes_tokens(),
            global_level: global.level(),
            delayed_count: limiter.delayed_count(),
            total_delay: limiter.total_delay(),
            admitted_ops: limiter.admitted_ops(),
            admitted_bytes: limiter.admitted_bytes(),
            waiting,
        }
    }

    /// Requests waiting now, queued or waiting for a slot.
    pub fn waiting(&self) -> u64 {
        lock(&self.shared.line).waiting()
    }

    /// The most requests queued at once.
    pub fn bound(&self) -> u64 {
        self.shared.bound
    }

    /// The node's global bucket.
    pub fn global(&self) -> &SharedGlobal {
        &self.shared.global
    }
}

/// A place in a [`ThrottleQueue`]'s line, holding a slot in the queue. Dropping it gives the
/// place up.
#[derive(Debug)]
pub struct Slot {
    shared: Arc<Shared>,
    ticket: u64,
    arrived_ns: u64,
}

impl Slot {
    fn enter(shared: Arc<Shared>) -> Self {
        let ticket = {
            let mut l = lock(&shared.line);
            l.next += 1;
            l.next - 1
        };
        let arrived_ns = shared.clock.now_ns();
        Slot {
            shared,
            ticket,
            arrived_ns,
        }
    }

    /// Waits until `done` holds for this ticket, its waker kept in the map `waiters` picks
    /// (under the line's lock, with the check, so no wake-up is lost).
    async fn wait_until(
        &self,
        done: impl Fn(&Line, u64) -> bool,
        waiters: fn(&mut Line) -> &mut BTreeMap<u64, Waker>,
    ) {
        let ticket = self.ticket;
        std::future::poll_fn(|cx| {
            let mut l = lock(&self.shared.line);
            if done(&l, ticket) {
                waiters(&mut l).remove(&ticket);
                Poll::Ready(())
            } else {
                waiters(&mut l).insert(ticket, cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }

    async fn wait_for_slot(&self) {
        let bound = self.shared.bound;
        self.wait_until(|l, t| l.ahead_of(t) < bound, |l| &mut l.for_slot)
            .await;
    }

    async fn wait_for_turn(&self) {
        self.wait_until(|l, t| l.served >= t, |l| &mut l.for_turn)
            .await;
    }

    /// Admits a read or write of `len` bytes in this place.
    pub async fn admit(self, len: u64) -> Admitted {
        self.admit_request(Request::io(len)).await
    }

    /// Admits `req` in this place: waits for the requests ahead, then sleeps the throttle's
    /// delays (re-evaluated at once on reconfiguration) until admitted.
    pub async fn admit_request(self, req: Request) -> Admitted {
        self.wait_for_turn().await;
        let shared = self.shared.clone();
        let req = req.arrived_at(self.arrived_ns);
        loop {
            let reconfigured = shared.reconfigured.notified();
            tokio::pin!(reconfigured);
            // Registered before the attempt, so a reconfiguration after it is not missed.
            reconfigured.as_mut().enable();
            let (decision, now) = shared.try_admit(&req);
            match decision {
                Decision::Admitted(grant) => {
                    return Admitted {
                        grant,
                        waited: Duration::from_nanos(now.saturating_sub(self.arrived_ns)),
                    };
                }
                Decision::Delayed(delay) => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = &mut reconfigured => {}
                    }
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let ticket = self.ticket;
        let mut wake = Vec::new();
        {
            let mut l = lock(&self.shared.line);
            l.for_slot.remove(&ticket);
            l.for_turn.remove(&ticket);
            if l.leave(ticket) {
                l.ready(self.shared.bound, &mut wake);
            }
        }
        // Woken outside the lock: a woken task may run at once and take it.
        for w in wake {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::GlobalConfig;

    const MS: Duration = Duration::from_millis(1);

    fn qos(iops: u64) -> QosConfig {
        QosConfig {
            iops: Some(iops),
            ..QosConfig::UNLIMITED
        }
    }

    fn shared_node(capacity: Option<u64>) -> SharedGlobal {
        let cfg = GlobalConfig {
            capacity_iops: capacity,
            ..GlobalConfig::UNLIMITED
        };
        Arc::new(Mutex::new(GlobalBucket::new(cfg, 0).expect("valid")))
    }

    fn queue(
        cfg: QosConfig,
        node: SharedGlobal,
        clock: &Arc<TokioClock>,
        bound: usize,
    ) -> ThrottleQueue {
        let limiter = VolumeLimiter::new(cfg, clock.now_ns()).expect("valid");
        let bound = NonZeroUsize::new(bound).expect("nonzero");
        ThrottleQueue::new(limiter, node, clock.clone(), bound)
    }

    /// Admits `fut`'s request on a task and reports when it was admitted.
    fn spawn_timed(
        clock: &Arc<TokioClock>,
        fut: impl Future<Output = Admitted> + Send + 'static,
    ) -> tokio::task::JoinHandle<(Duration, Admitted)> {
        let clock = clock.clone();
        tokio::spawn(async move {
            let a = fut.await;
            (clock.now(), a)
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_request_never_overtakes_a_big_one_queued_earlier() {
        let clock = Arc::new(TokioClock::new());
        let q = queue(qos(10), shared_node(None), &clock, 16);
        q.admit_request(Request::new(10, 0)).await;
        // The big one (8 ops) arrives first, the small one (1 op) second; the tasks are spawned
        // the other way round: the order is the order of the calls.
        let big = q.admit(2 << 20);
        let small = q.admit(4096);
        let small = spawn_timed(&clock, small);
        let big = spawn_timed(&clock, big);
        let (big_at, big) = big.await.expect("task");
        let (small_at, small) = small.await.expect("task");
        assert_eq!(big_at, 800 * MS);
        assert_eq!(big.waited, 800 * MS);
        // Alone it would have passed at 100 ms; behind the big one it passes 100 ms after it.
        assert_eq!(small_at, 900 * MS);
        assert_eq!(small.waited, 900 * MS);
        let snap = q.snapshot();
        assert_eq!((snap.delayed_count, snap.total_delay), (2, 1_700 * MS));
        assert_eq!((snap.admitted_ops, snap.waiting), (10 + 8 + 1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_clients_get_exactly_the_baseline() {
        let clock = Arc::new(TokioClock::new());
        let q = queue(qos(100), shared_node(Some(1_000)), &clock, 4);
        let until = Duration::from_secs(5);
        let mut clients = Vec::new();
        for _ in 0..8 {
            let (q, clock) = (q.clone(), clock.clone());
            clients.push(tokio::spawn(async move {
                let mut times = Vec::new();
                loop {
                    q.admit(4096).await;
                    let now = clock.now();
                    if now > until {
                        return times;
                    }
                    times.push(now);
                }
            }));
        }
        let mut times = Vec::new();
        for c in clients {
            times.extend(c.await.expect("task"));
        }
        times.sort();
        // One second of baseline at once, then one every 10 ms, exactly.
        assert_eq!(times.len(), 100 + 500);
        assert!(times[..100].iter().all(|t| t.is_zero()));
        for (k, t) in times[100..].iter().enumerate() {
            assert_eq!(*t, (k as u32 + 1) * 10 * MS);
        }
    }

    /// Counts the polls of a future.
    fn counted<F: Future>(
        polls: Arc<std::sync::atomic::AtomicU64>,
        fut: F,
    ) -> impl Future<Output = F::Output> {
        let mut fut = Box::pin(fut);
        std::future::poll_fn(move |cx| {
            polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            fut.as_mut().poll(cx)
        })
    }

    /// Hundreds of requests queued behind a throttle (and more waiting for a slot) are woken
    /// when their own wait is over, not at every admission ahead of them: a few polls each,
    /// not one per request admitted before them.
    #[tokio::test(start_paused = true)]
    async fn waiting_requests_are_woken_only_when_their_wait_is_over() {
        const N: u64 = 400;
        let clock = Arc::new(TokioClock::new());
        let q = queue(qos(100), shared_node(None), &clock, 100);
        q.admit_request(Request::new(100, 0)).await;
        let polls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tasks: Vec<_> = (0..N)
            .map(|_| tokio::spawn(counted(polls.clone(), q.admit(4096))))
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        let polls = polls.load(std::sync::atomic::Ordering::Relaxed);
        // Each request: its first poll, the wake-up for its slot or its turn, and one per
        // throttle delay it sleeps as the head. Waking every waiter at each admission would be
        // tens of thousands here.
        assert!(polls <= 5 * N, "{polls} polls for {N} requests");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_makes_callers_wait_for_a_slot_in_order() {
        let clock = Arc::new(TokioClock::new());
        let q = queue(qos(1), shared_node(None), &clock, 2);
        q.admit(4096).await;
        let waiting: Vec<_> = (0..5).map(|_| spawn_timed(&clock, q.admit(4096))).collect();
        let reserve = q.reserve();
        let reserved = {
            let clock = clock.clone();
            tokio::spawn(async move {
                let slot = reserve.await;
                (clock.now(), slot)
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(q.waiting(), 6);
        // The slot opens when only one request is left ahead of it: after the fourth admission.
        tokio::time::sleep(3_500 * MS).await;
        assert!(!reserved.is_finished());
        assert_eq!(q.waiting(), 3);
        let (at, slot) = reserved.await.expect("task");
        assert_eq!(at, 4_000 * MS);
        let last = spawn_timed(&clock, slot.admit(4096));
        for (k, w) in waiting.into_iter().enumerate() {
            let (at, _) = w.await.expect("task");
            assert_eq!(at, (k as u32 + 1) * 1_000 * MS);
        }
        assert_eq!(last.await.expect("task").0, 6_000 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_request_gives_up_its_place() {
        let clock = Arc::new(TokioClock::new());
        let q = queue(qos(1), shared_node(None), &clock, 8);
        q.admit(4096).await;
        let first = spawn_timed(&clock, q.admit(4096));
        let never_polled = q.admit(4096);
        let third = spawn_timed(&clock, q.admit(4096));
        drop(never_polled);
        // The head is cancelled while it sleeps.
        tokio::time::sleep(500 * MS).await;
        first.abort();
        assert!(first.await.is_err());
        let (at, _) = third.await.expect("task");
        assert_eq!(at, 1_000 * MS);
        assert_eq!(q.waiting(), 0);
        let (at, _) = spawn_timed(&clock, q.admit(4096)).await.expect("task");
        assert_eq!(at, 2_000 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_request_frees_its_slot_at_once() {
        let clock = Arc::new(TokioClock::new());
        let q = queue(qos(1), shared_node(None), &clock, 2);
        q.admit(4096).await;
        let head = spawn_timed(&clock, q.admit(4096));
        let queued = q.reserve();
        let queued = tokio::spawn(queued);
        let behind = q.reserve();
        let behind = {
            let clock = clock.clone();
            tokio::spawn(async move {
                let slot = behind.await;
                (clock.now(), slot)
            })
        };
        tokio::time::sleep(100 * MS).await;
        assert!(!behind.is_finished());
        drop(queued.await.expect("task"));
        let (at, slot) = behind.await.expect("task");
        assert_eq!(
            at,
            100 * MS,
            "the slot is free as soon as the request ahead is dropped"
        );
        assert_eq!(head.await.expect("task").0, 1_000 * MS);
        assert_eq!(
            spawn_timed(&clock, slot.admit(0)).await.expect("task").0,
            2_000 * MS
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reconfiguration_takes_effect_at_once() {
        let clock = Arc::new(TokioClock::new());
        let q = queue(qos(1), shared_node(None), &clock, 8);
        q.admit(4096).await;
        let next = spawn_timed(&clock, q.admit(4096));
        tokio::time::sleep(100 * MS).await;
        // 0.1 op earned at 1 IOPS; the remaining 0.9 op at 10 IOPS takes 90 ms.
        q.set_config(qos(10)).expect("valid");
        assert!(
            q.set_config(QosConfig {
                burst_credits: 1,
                ..QosConfig::UNLIMITED
            })
            .is_err()
        );
        let (at, _) = next.await.expect("task");
        assert_eq!(at, 190 * MS);
        assert_eq!(q.config(), qos(10));
    }

    #[tokio::test(start_paused = true)]
    async fn volumes_on_a_saturated_node_keep_their_baselines() {
        let clock = Arc::new(TokioClock::new());
        let node = shared_node(Some(300));
        let bursty = QosConfig {
            burst_iops: Some(1_000),
            burst_credits: 100_000,
            ..qos(100)
        };
        let queues = [
            queue(bursty, node.clone(), &clock, 8),
            queue(qos(200), node.clone(), &clock, 8),
        ];
        let until = Duration::from_secs(5);
        let mut clients = Vec::new();
        for q in &queues {
            for _ in 0..4 {
                let (q, clock) = (q.clone(), clock.clone());
                clients.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    loop {
                        q.admit(4096).await;
                        if clock.now() > until {
                            return n;
                        }
                        n += 1;
                    }
                }));
            }
        }
        let mut counts = [0u64; 2];
        for (i, c) in clients.into_iter().enumerate() {
            counts[i / 4] += c.await.expect("task");
        }
        assert_eq!(counts[1], 200 + 200 * 5);
        assert!(counts[0] >= 100 + 100 * 5, "{counts:?}");
        assert!(counts[0] <= 100 + 100 * 5 + 10, "{counts:?}");
        assert!(queues[0].snapshot().global_level.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_credit_balance_moves_between_leaders() {
        let clock = Arc::new(TokioClock::new());
        let cfg = QosConfig {
            burst_iops: Some(1_000),
            burst_credits: 5_000,
            ..qos(100)
        };
        let old = queue(cfg, shared_node(None), &clock, 8);
        old.admit_request(Request::new(1_100, 0)).await;
        let state = old.export_state();
        assert_eq!(state.burst_credits, Tokens::from_units(4_000));
        let new = queue(cfg, shared_node(None), &clock, 8);
        new.import_state(&state);
        assert_eq!(new.snapshot().burst_credits, Tokens::from_units(4_000));
        assert_eq!(new.bound(), 8);
        assert!(new.global().lock().is_ok());
    }
}
