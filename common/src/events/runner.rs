//! The I/O around the engine: each round scrape the `/metrics` targets and query Prometheus,
//! feed the values to the [`Engine`], evaluate, and respond to the events (log, webhook, and
//! whatever the caller does with the returned [`Round`]).
//!
//! Time comes from an injected [`Clock`](crate::Clock) plus a wall-clock base, so a
//! [`ManualClock`](crate::ManualClock) drives [`Runner::tick`] exactly in tests; [`Runner::run`]
//! is the real loop. Round timestamps are rounded to multiples of the interval — the same grid
//! the Prometheus source queries on — so scraped series and queried series align.
//!
//! Scraped samples get an `instance="host:port"` label naming their target (an `instance` label
//! already present becomes `exported_instance`, as Prometheus does); their own exposition
//! timestamps are ignored in favour of the round's, so every series of a round aligns.

use super::engine::{Engine, EngineStats, Event, Ingested, TimestampMs};
use super::expo::{self, Exposition};
use super::http::{self, HttpError, HttpUrl, Limits};
use super::metrics::EventsMetrics;
use super::prom::{PromError, PromSource};
use super::series::{SeriesKey, ValueKind};
use super::webhook::{Notifier, WebhookConfig, WebhookError};
use crate::clock::SharedClock;
use crate::logging::RateLimit;
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;

/// Most `/metrics` targets.
pub const MAX_TARGETS: usize = 1024;

/// The sources and responses of a runner.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// `/metrics` URLs scraped every round.
    pub targets: Vec<HttpUrl>,
    /// A Prometheus server and expressions queried every round.
    pub prometheus: Option<PromSource>,
    /// Deadline of one scrape.
    pub scrape_timeout: Duration,
    /// Largest accepted `/metrics` body.
    pub max_body_bytes: usize,
    /// Where to post events.
    pub webhook: Option<WebhookConfig>,
    /// Events kept for [`Runner::recent_events`].
    pub recent_events: usize,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            prometheus: None,
            scrape_timeout: Duration::from_secs(5),
            max_body_bytes: 16 << 20,
            webhook: None,
            recent_events: 256,
        }
    }
}

/// A runner that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// Neither targets nor a Prometheus source.
    #[error("nothing to read: give /metrics targets or a Prometheus server with queries")]
    NoSources,
    /// Over [`MAX_TARGETS`].
    #[error("{count} targets; the limit is {MAX_TARGETS}")]
    TooManyTargets {
        /// Targets given.
        count: usize,
    },
    /// The webhook notifier could not start.
    #[error(transparent)]
    Webhook(#[from] WebhookError),
}

/// A source that could not be read this round.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The exchange failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The target answered with an error status.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The target.
        url: String,
        /// The status.
        status: u16,
    },
    /// A Prometheus query failed.
    #[error(transparent)]
    Prom(#[from] PromError),
    /// The scrape task died.
    #[error("scrape task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What one round did.
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// The round's timestamp (milliseconds since the Unix epoch, on the interval grid).
    pub t_ms: TimestampMs,
    /// The round was skipped: its grid slot was already done (a tick came early).
    pub skipped: bool,
    /// Sources read (targets and expressions).
    pub sources_ok: usize,
    /// Sources that failed.
    pub sources_failed: usize,
    /// Values offered to the engine.
    pub values: usize,
    /// Events raised.
    pub events: Vec<Event>,
    /// Candidates left out of this round's evaluation by `max_candidates` (their pairs were not
    /// correlated).
    pub candidates_dropped: u64,
}

/// Milliseconds since the Unix epoch now, minus the clock's reading: add the clock's reading
/// later to get wall-clock milliseconds on a monotonic base.
pub fn wall_base_ms(clock: &SharedClock) -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    wall.saturating_sub(clock.now_ns() / 1_000_000)
}

/// Scrapes, queries, correlates and responds, one round at a time.
#[derive(Debug)]
pub struct Runner {
    engine: Engine,
    cfg: RunnerConfig,
    clock: SharedClock,
    wall_base_ms: u64,
    interval_ms: u64,
    last_round: Option<TimestampMs>,
    /// Per Prometheus expression, the first timestamp not yet fetched.
    prom_next: Vec<Option<TimestampMs>>,
    metrics: Option<EventsMetrics>,
    notifier: Option<Notifier>,
    recent: VecDeque<Event>,
    last_stats: EngineStats,
    warn_sources: RateLimit,
    warn_flags: RateLimit,
    warn_dropped: RateLimit,
}

impl Runner {
    /// A runner; must be called inside a tokio runtime when a webhook is configured.
    /// `wall_base_ms` plus the clock's reading is the wall-clock time ([`wall_base_ms`]).
    pub fn new(
        engine: Engine,
        cfg: RunnerConfig,
        clock: SharedClock,
        wall_base_ms: u64,
        metrics: Option<EventsMetrics>,
    ) -> Result<Self, RunnerError> {
        if cfg.targets.is_empty() && cfg.prometheus.is_none() {
            return Err(RunnerError::NoSources);
        }
        if cfg.targets.len() > MAX_TARGETS {
            return Err(RunnerError::TooManyTargets {
                count: cfg.targets.len(),
            });
        }
        let notifier = match &cfg.webhook {
            Some(w) => Some(Notifier::spawn(w.clone(), metrics.clone())?),
            None => None,
        };
        let interval_ms = (engine.config().interval.as_millis() as u64).max(1);
        let prom_next = vec![None; cfg.prometheus.as_ref().map_or(0, |p| p.queries().len())];
        Ok(Self {
            engine,
            cfg,
            clock,
            wall_base_ms,
            interval_ms,
            last_round: None,
            prom_next,
            metrics,
            notifier,
            recent: VecDeque::new(),
            last_stats: EngineStats::default(),
            warn_sources: RateLimit::new(Duration::from_secs(10)),
            warn_flags: RateLimit::new(Duration::from_secs(1)),
            warn_dropped: RateLimit::new(Duration::from_secs(60)),
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The last events raised, oldest first (at most [`RunnerConfig::recent_events`]).
    pub fn recent_events(&self) -> impl Iterator<Item = &Event> {
        self.recent.iter()
    }

    /// Wall-clock milliseconds now, on the monotonic clock.
    pub fn now_ms(&self) -> TimestampMs {
        self.wall_base_ms
            .saturating_add(self.clock.now_ns() / 1_000_000)
    }

    /// Runs one round now.
    pub async fn tick(&mut self) -> Round {
        let iv = self.interval_ms;
        let t = (self.now_ms().saturating_add(iv / 2) / iv).saturating_mul(iv);
        let mut round = Round {
            t_ms: t,
            ..Round::default()
        };
        if self.last_round.is_some_and(|last| last >= t) {
            round.skipped = true;
            return round;
        }
        self.last_round = Some(t);
        if !self.cfg.targets.is_empty() {
            self.scrape(t, &mut round).await;
        }
        if self.cfg.prometheus.is_some() {
            self.query(t, &mut round).await;
        }
        round.events = self.engine.evaluate(t);
        self.respond(&round.events);
        self.update_metrics(&mut round);
        round
    }

    /// Runs rounds on the interval grid until `stop` resolves or `on_round` breaks. Meant
    /// for a real clock; tests drive [`tick`](Self::tick).
    pub async fn run(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
        mut on_round: impl FnMut(&Round) -> ControlFlow<()>,
    ) {
        let iv = self.interval_ms;
        let now = self.now_ms();
        let delay = Duration::from_millis(iv - now % iv);
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + delay,
            Duration::from_millis(iv),
        );
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                _ = ticker.tick() => {}
            }
            let round = tokio::select! {
                biased;
                _ = &mut stop => break,
                r = self.tick() => r,
            };
            if on_round(&round).is_break() {
                break;
            }
        }
    }

    /// Stops the webhook notifier, waiting up to `grace` for queued deliveries.
    pub async fn shutdown(self, grace: Duration) {
        if let Some(n) = self.notifier {
            n.close(grace).await;
        }
    }

    async fn scrape(&mut self, t: TimestampMs, round: &mut Round) {
        let limits = Limits {
            timeout: self.cfg.scrape_timeout,
            connect_timeout: super::http::CONNECT_TIMEOUT,
            max_body_bytes: self.cfg.max_body_bytes,
        };
        let mut set = JoinSet::new();
        for (i, url) in self.cfg.targets.iter().enumerate() {
            let url = url.clone();
            set.spawn(async move { (i, scrape_one(&url, limits).await) });
        }
        let mut results = Vec::with_capacity(self.cfg.targets.len());
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(r) => results.push(r),
                Err(e) => {
                    round.sources_failed += 1;
                    self.source_failed("scrape", &SourceError::Task(e));
                }
            }
        }
        results.sort_by_key(|(i, _)| *i);
        for (i, res) in results {
            let Some(url) = self.cfg.targets.get(i).cloned() else {
                continue;
            };
            match res {
                Ok(e) => {
                    round.sources_ok += 1;
                    if e.bad_lines > 0 || e.truncated {
                        self.parse_trouble(&url, &e);
                    }
                    let instance = url.authority();
                    round.values += self.ingest_exposition(t, &e, &instance);
                }
                Err(e) => {
                    round.sources_failed += 1;
                    self.source_failed(&url.to_string(), &e);
                }
            }
        }
    }

    fn ingest_exposition(&mut self, t: TimestampMs, e: &Exposition, instance: &str) -> usize {
        let mut n = 0;
        let mut labels: Vec<(String, String)> = Vec::new();
        for s in &e.samples {
            labels.clear();
            labels.extend(s.labels.iter().map(|(k, v)| {
                let k = if k == "instance" {
                    "exported_instance".to_string()
                } else {
                    k.clone()
                };
                (k, v.clone())
            }));
            labels.push(("instance".into(), instance.to_string()));
            let key = SeriesKey::new(&s.name, &labels);
            let kind = e.value_kind(&s.name);
            self.offer(t, &key, kind, s.value);
            n += 1;
        }
        n
    }

    async fn query(&mut self, t: TimestampMs, round: &mut Round) {
        let Some(src) = self.cfg.prometheus.clone() else {
            return;
        };
        let cfg = self.engine.config();
        let window_ms = cfg.window.as_millis() as u64;
        let step = cfg.interval;
        // The first round fetches the whole window; later ones only what is new.
        let window_start = t.saturating_sub(window_ms).saturating_add(self.interval_ms);
        let mut set = JoinSet::new();
        for (i, q) in src.queries().iter().enumerate() {
            let start = self
                .prom_next
                .get(i)
                .copied()
                .flatten()
                .map_or(window_start, |next| next.max(window_start));
            let (src, q) = (src.clone(), q.clone());
            set.spawn(async move { (i, src.query_range(&q, start, t, step).await) });
        }
        let mut results = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(r) => results.push(r),
                Err(e) => {
                    round.sources_failed += 1;
                    self.source_failed("prometheus", &SourceError::Task(e));
                }
            }
        }
        results.sort_by_key(|(i, _)| *i);
        for (i, res) in results {
            match res {
                Ok(series) => {
                    round.sources_ok += 1;
                    if let Some(next) = self.prom_next.get_mut(i) {
                        *next = Some(t.saturating_add(self.interval_ms));
                    }
                    for s in series {
                        for (pt, v) in s.points {
                            self.offer(pt, &s.key, ValueKind::Gauge, v);
                            round.values += 1;
                        }
                    }
                }
                Err(e) => {
                    round.sources_failed += 1;
                    self.source_failed(&src.base().to_string(), &SourceError::Prom(e));
                }
            }
        }
    }

    fn offer(&mut self, t: TimestampMs, key: &SeriesKey, kind: ValueKind, v: f64) {
        if let Ingested::Flagged { z } = self.engine.ingest(t, key, kind, v)
            && let Some(suppressed) = self.warn_flags.check(self.clock.now_ns())
        {
            tracing::info!(series = %key, z, suppressed, "anomaly: series flagged for correlation");
        }
    }

    fn source_failed(&self, source: &str, e: &SourceError) {
        if let Some(suppressed) = self.warn_sources.check(self.clock.now_ns()) {
            tracing::warn!(source, error = %e, suppressed, "could not read a metrics source");
        }
        if let Some(m) = &self.metrics {
            m.scrapes.with_label_values(&["error"]).inc();
        }
    }

    fn parse_trouble(&self, url: &HttpUrl, e: &Exposition) {
        if let Some(suppressed) = self.warn_sources.check(self.clock.now_ns()) {
            let first = e
                .errors
                .first()
                .map(ToString::to_string)
                .unwrap_or_default();
            tracing::warn!(
                source = %url,
                bad_lines = e.bad_lines,
                truncated = e.truncated,
                first_error = %first,
                suppressed,
                "skipped malformed lines of a metrics exposition"
            );
        }
    }

    fn respond(&mut self, events: &[Event]) {
        for ev in events {
            tracing::info!(
                a = %ev.a.key,
                b = %ev.b.key,
                coefficient = ev.coefficient,
                threshold = ev.threshold,
                samples = ev.window.samples,
                window_start_ms = ev.window.start_ms,
                window_end_ms = ev.window.end_ms,
                "correlated series"
            );
            if let Some(n) = &self.notifier {
                n.notify(ev);
            }
            if self.cfg.recent_events > 0 {
                if self.recent.len() >= self.cfg.recent_events {
                    self.recent.pop_front();
                }
                self.recent.push_back(ev.clone());
            }
        }
    }

    fn update_metrics(&mut self, round: &mut Round) {
        let stats = self.engine.stats();
        round.candidates_dropped = stats.candidates_dropped - self.last_stats.candidates_dropped;
        if round.candidates_dropped > 0
            && let Some(suppressed) = self.warn_dropped.check(self.clock.now_ns())
        {
            tracing::warn!(
                dropped = round.candidates_dropped,
                paired = stats.candidates,
                suppressed,
                "more candidate series than max_candidates: the rest were not correlated \
                 (raise max_candidates or narrow the watch patterns)"
            );
        }
        if let Some(m) = &self.metrics {
            m.scrapes
                .with_label_values(&["ok"])
                .inc_by(round.sources_ok as u64);
            m.series.set(stats.series as i64);
            m.candidates.set(stats.candidates as i64);
            m.refused
                .inc_by(stats.series_refused - self.last_stats.series_refused);
            m.anomalies.inc_by(stats.flagged - self.last_stats.flagged);
            m.raised.inc_by(stats.events - self.last_stats.events);
            m.candidates_dropped.inc_by(round.candidates_dropped);
        }
        self.last_stats = stats;
    }
}

async fn scrape_one(url: &HttpUrl, limits: Limits) -> Result<Exposition, SourceError> {
    let r = http::get(url, "text/plain;version=0.0.4;q=1,*/*;q=0.1", limits).await?;
    if !r.is_success() {
        return Err(SourceError::Status {
            url: url.to_string(),
            status: r.status,
        });
    }
    Ok(expo::parse(&String::from_utf8_lossy(&r.body)))
}

#[cfg(test)]
mod tests;
