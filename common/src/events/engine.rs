//! The pure correlation engine: sliding windows, the anomaly rule, pairwise correlation and
//! cooldowns. No I/O and no clock: every call carries its timestamp (milliseconds on any
//! monotonic timeline shared by all calls), so tests are exact and instant.
//!
//! Per round the caller [`Engine::ingest`]s each sample at the round's timestamp, then calls
//! [`Engine::evaluate`] once at that timestamp to get the events.
//!
//! **Selection.** A series is a *candidate* for correlation when it matches a `watch` pattern,
//! or when the anomaly rule flagged it within the last window: the absolute z-score of a new
//! value against the window before it reached `anomaly_z`. Series matching an `ignore` pattern
//! are never stored. Only candidates are paired.
//!
//! **Bounds.** At most `max_series` series are tracked: when full, a new series is refused (and
//! counted in [`EngineStats::series_refused`]) until an old one goes stale — a series with no
//! sample in the last window is dropped at the next evaluation. Each series keeps at most
//! `window / interval + 2` samples. At most `max_candidates` are paired (watched series first, in
//! key order, then flagged ones, most recently flagged first); the rest are counted in
//! [`EngineStats::candidates_dropped`]. Cooldowns are kept only while they run.

use super::pattern::{Pattern, any_match};
use super::series::{SeriesKey, ValueKind};
use super::stats::{pearson, z_score};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// A timestamp in milliseconds. The engine only compares and subtracts them; the runner uses
/// milliseconds since the Unix epoch so events print as wall-clock times.
pub type TimestampMs = u64;

/// Most samples the engine may hold in total (`max_series × samples per window`): 4 Mi samples,
/// 64 MiB.
pub const MAX_TOTAL_SAMPLES: u64 = 4 << 20;

/// Which correlations raise events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Sign {
    /// Only `r ≥ threshold`.
    Positive,
    /// `|r| ≥ threshold`: anti-correlation counts too.
    #[default]
    Either,
}

/// What the engine watches and when it raises an event.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `|r|` (or `r`, see `sign`) at or above which a pair raises an event; in `(0, 1]`.
    pub threshold: f64,
    /// Whether anti-correlation raises events.
    pub sign: Sign,
    /// The sliding window: samples in `(now − window, now]` are kept and correlated.
    pub window: Duration,
    /// The expected spacing of samples (the scrape interval or query step); sizes the windows.
    pub interval: Duration,
    /// After an event, the same pair raises nothing for this long.
    pub cooldown: Duration,
    /// Aligned samples a pair needs before it can correlate, and values a window needs before
    /// the anomaly rule judges a new one; at least 3.
    pub min_samples: usize,
    /// Flag a series whose newest value lies at least this many standard deviations from its
    /// window; `None` disables the anomaly rule (then only watched series are stored).
    pub anomaly_z: Option<f64>,
    /// Allow-list: matching series are always candidates.
    pub watch: Vec<Pattern>,
    /// Deny-list: matching series are never stored, whatever else matches.
    pub ignore: Vec<Pattern>,
    /// Most series tracked at once.
    pub max_series: usize,
    /// Most series paired in one evaluation.
    pub max_candidates: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threshold: 0.9,
            sign: Sign::Either,
            window: Duration::from_secs(60),
            interval: Duration::from_secs(1),
            cooldown: Duration::from_secs(300),
            min_samples: 10,
            anomaly_z: Some(3.0),
            watch: Vec::new(),
            ignore: Vec::new(),
            max_series: 10_000,
            max_candidates: 64,
        }
    }
}

/// A configuration the engine cannot run with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The threshold is not in `(0, 1]`.
    #[error("threshold {0} is out of range: use a number above 0 and at most 1")]
    Threshold(f64),
    /// The anomaly z-score is not a positive number.
    #[error("anomaly z-score {0} is out of range: use a positive number such as 3")]
    AnomalyZ(f64),
    /// A duration is zero.
    #[error("{what} must be longer than zero")]
    ZeroDuration {
        /// Which setting.
        what: &'static str,
    },
    /// The interval is below a millisecond, the resolution of timestamps.
    #[error("the interval ({0:?}) must be at least 1ms")]
    IntervalTooShort(Duration),
    /// The interval is longer than the window.
    #[error("the interval ({interval:?}) must not be longer than the window ({window:?})")]
    IntervalAboveWindow {
        /// The interval.
        interval: Duration,
        /// The window.
        window: Duration,
    },
    /// Too few samples to mean anything.
    #[error("min-samples is {0}; at least 3 are needed for a meaningful correlation")]
    MinSamples(usize),
    /// The window cannot hold `min_samples` samples.
    #[error(
        "the window holds at most {fits} samples at this interval, fewer than min-samples ({min_samples}); widen the window or shorten the interval"
    )]
    WindowTooShort {
        /// Samples that fit.
        fits: u64,
        /// Samples required.
        min_samples: usize,
    },
    /// A bound is zero.
    #[error("{what} must be at least 1")]
    ZeroBound {
        /// Which setting.
        what: &'static str,
    },
    /// The windows would take too much memory.
    #[error(
        "{max_series} series × {per_series} samples per window exceeds the limit of {MAX_TOTAL_SAMPLES} samples; lower max-series, shorten the window or lengthen the interval"
    )]
    TooManySamples {
        /// Series bound.
        max_series: usize,
        /// Samples per series.
        per_series: u64,
    },
    /// Nothing can ever be selected.
    #[error("nothing to correlate: give watch patterns or enable the anomaly rule")]
    NothingSelected,
}

impl EngineConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(ConfigError::Threshold(self.threshold));
        }
        if let Some(z) = self.anomaly_z
            && !(z > 0.0 && z.is_finite())
        {
            return Err(ConfigError::AnomalyZ(z));
        }
        for (what, d) in [("the window", self.window), ("the interval", self.interval)] {
            if d.is_zero() {
                return Err(ConfigError::ZeroDuration { what });
            }
        }
        if self.interval < Duration::from_millis(1) {
            return Err(ConfigError::IntervalTooShort(self.interval));
        }
        if self.interval > self.window {
            return Err(ConfigError::IntervalAboveWindow {
                interval: self.interval,
                window: self.window,
            });
        }
        if self.min_samples < 3 {
            return Err(ConfigError::MinSamples(self.min_samples));
        }
        let fits = self.samples_per_window();
        if fits < self.min_samples as u64 {
            return Err(ConfigError::WindowTooShort {
                fits,
                min_samples: self.min_samples,
            });
        }
        for (what, v) in [
            ("max-series", self.max_series),
            ("max-candidates", self.max_candidates),
        ] {
            if v == 0 {
                return Err(ConfigError::ZeroBound { what });
            }
        }
        let per_series = self.samples_per_window() + 2;
        if (self.max_series as u64).saturating_mul(per_series) > MAX_TOTAL_SAMPLES {
            return Err(ConfigError::TooManySamples {
                max_series: self.max_series,
                per_series,
            });
        }
        if self.watch.is_empty() && self.anomaly_z.is_none() {
            return Err(ConfigError::NothingSelected);
        }
        Ok(())
    }

    /// Samples one series holds in a full window at the configured interval.
    pub fn samples_per_window(&self) -> u64 {
        let i = self.interval.as_nanos().max(1);
        (self.window.as_nanos() / i).min(u64::MAX as u128) as u64
    }
}

/// Why a series is a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "by")]
pub enum SelectedBy {
    /// It matches a watch pattern.
    Watch,
    /// The anomaly rule flagged it.
    Anomaly {
        /// The z-score that flagged it (`null` in JSON when infinite: a constant that moved).
        z: Option<f64>,
        /// When.
        at_ms: TimestampMs,
    },
}

/// One series named by an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventSeries {
    /// The series key, `name{labels}`.
    pub key: String,
    /// Why it was watched.
    pub selected: SelectedBy,
}

/// The aligned samples an event's coefficient was computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventWindow {
    /// Timestamp of the first aligned sample.
    pub start_ms: TimestampMs,
    /// Timestamp of the last aligned sample.
    pub end_ms: TimestampMs,
    /// Number of aligned samples.
    pub samples: usize,
}

/// A correlated event: two series moved together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Always `"correlated"`; lets consumers of a mixed stream recognise the event.
    pub kind: String,
    /// When it was raised.
    pub raised_at_ms: TimestampMs,
    /// The first series (keys in order).
    pub a: EventSeries,
    /// The second series.
    pub b: EventSeries,
    /// Pearson's r over the window.
    pub coefficient: f64,
    /// The threshold that was crossed.
    pub threshold: f64,
    /// The window.
    pub window: EventWindow,
}

/// What happened to one ingested value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ingested {
    /// Stored.
    Stored,
    /// Stored, and it made the anomaly rule flag a series that was not flagged.
    Flagged {
        /// Its z-score.
        z: f64,
    },
    /// The first value of a counter: kept to compute the next rate.
    FirstCounterValue,
    /// The series matches an ignore pattern, or no watch pattern while the anomaly rule is off.
    NotSelected,
    /// The series is new and `max_series` are already tracked.
    Refused,
    /// The timestamp is not after the series' last one.
    OutOfOrder,
    /// The value is `NaN` or infinite (a gap in the series).
    NotFinite,
}

/// Counters of what the engine did, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Series tracked now.
    pub series: usize,
    /// Candidates at the last evaluation (after the bound).
    pub candidates: usize,
    /// Values of new series refused because `max_series` were tracked.
    pub series_refused: u64,
    /// Series dropped because they had no sample in the window.
    pub series_expired: u64,
    /// Candidates left out of evaluations by `max_candidates`.
    pub candidates_dropped: u64,
    /// Values with a timestamp not after their series' last one.
    pub out_of_order: u64,
    /// Series newly flagged by the anomaly rule.
    pub flagged: u64,
    /// Events raised.
    pub events: u64,
}

#[derive(Debug, Clone, Copy)]
struct Flag {
    z: f64,
    at_ms: TimestampMs,
    until_ms: TimestampMs,
}

#[derive(Debug)]
struct Series {
    kind: ValueKind,
    watched: bool,
    /// (timestamp, value), increasing timestamps, all finite.
    samples: VecDeque<(TimestampMs, f64)>,
    /// Last raw value of a counter.
    last_raw: Option<(TimestampMs, f64)>,
    /// Timestamp of the last value offered (finite or not); `None` before the first.
    last_ms: Option<TimestampMs>,
    flag: Option<Flag>,
}

/// Pairs in cooldown are forgotten beyond this many (the oldest first).
const MAX_COOLDOWNS: usize = 65_536;

/// The correlated-events engine. See the [module docs](self) for the rules.
///
/// ```
/// use common::events::{Engine, EngineConfig, Pattern, SeriesKey, ValueKind};
/// use std::time::Duration;
///
/// let mut engine = Engine::new(EngineConfig {
///     watch: vec![Pattern::new("queue_*").unwrap()],
///     anomaly_z: None,
///     ..EngineConfig::default()
/// })
/// .unwrap();
/// let (a, b) = (SeriesKey::named("queue_depth"), SeriesKey::named("queue_latency"));
/// let mut events = Vec::new();
/// for i in 0..30u64 {
///     let t = i * 1000;
///     let x = (i % 7) as f64;
///     engine.ingest(t, &a, ValueKind::Gauge, x);
///     engine.ingest(t, &b, ValueKind::Gauge, 2.0 * x + 1.0);
///     events.extend(engine.evaluate(t));
/// }
/// // Correlated from the 10th sample on, but the cooldown (5 minutes) allows one event.
/// assert_eq!(events.len(), 1);
/// assert_eq!(events[0].a.key, "queue_depth");
/// assert_eq!(events[0].window.samples, 10);
/// assert!(events[0].coefficient > 0.999);
/// ```
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    window_ms: u64,
    cooldown_ms: u64,
    max_samples: usize,
    series: BTreeMap<SeriesKey, Series>,
    cooldowns: BTreeMap<(SeriesKey, SeriesKey), TimestampMs>,
    stats: EngineStats,
    scratch_a: Vec<f64>,
    scratch_b: Vec<f64>,
}

impl Engine {
    /// An engine with a validated configuration.
    pub fn new(cfg: EngineConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let window_ms = cfg.window.as_millis().min(u64::MAX as u128) as u64;
        let cooldown_ms = cfg.cooldown.as_millis().min(u64::MAX as u128) as u64;
        let max_samples = (cfg.samples_per_window() + 2) as usize;
        Ok(Self {
            cfg,
            window_ms,
            cooldown_ms,
            max_samples,
            series: BTreeMap::new(),
            cooldowns: BTreeMap::new(),
            stats: EngineStats::default(),
            scratch_a: Vec::new(),
            scratch_b: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            series: self.series.len(),
            ..self.stats
        }
    }

    /// Keys of the tracked series.
    pub fn series_keys(&self) -> impl Iterator<Item = &SeriesKey> {
        self.series.keys()
    }

    /// The values in a series' window (rates for counters), oldest first.
    pub fn values(&self, key: &SeriesKey) -> Vec<(TimestampMs, f64)> {
        self.series
            .get(key)
            .map(|s| s.samples.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Series currently flagged by the anomaly rule, with their z-scores.
    pub fn flagged(&self) -> Vec<(SeriesKey, f64)> {
        self.series
            .iter()
            .filter_map(|(k, s)| s.flag.map(|f| (k.clone(), f.z)))
            .collect()
    }

    /// Whether a series is stored at all.
    fn selected(&self, key: &SeriesKey) -> Option<bool> {
        if any_match(&self.cfg.ignore, key) {
            return None;
        }
        let watched = any_match(&self.cfg.watch, key);
        (watched || self.cfg.anomaly_z.is_some()).then_some(watched)
    }

    /// Adds one value of a series at `t_ms`.
    pub fn ingest(
        &mut self,
        t_ms: TimestampMs,
        key: &SeriesKey,
        kind: ValueKind,
        value: f64,
    ) -> Ingested {
        if !self.series.contains_key(key) {
            let Some(watched) = self.selected(key) else {
                return Ingested::NotSelected;
            };
            if self.series.len() >= self.cfg.max_series {
                self.stats.series_refused += 1;
                return Ingested::Refused;
            }
            self.series.insert(
                key.clone(),
                Series {
                    kind,
                    watched,
                    samples: VecDeque::new(),
                    last_raw: None,
                    last_ms: None,
                    flag: None,
                },
            );
        }
        let window_ms = self.window_ms;
        let max_samples = self.max_samples;
        let min_samples = self.cfg.min_samples;
        let anomaly_z = self.cfg.anomaly_z;
        let Some(s) = self.series.get_mut(key) else {
            return Ingested::NotSelected;
        };
        if s.last_ms.is_some_and(|last| last >= t_ms) {
            self.stats.out_of_order += 1;
            return Ingested::OutOfOrder;
        }
        s.last_ms = Some(t_ms);
        if !value.is_finite() {
            return Ingested::NotFinite;
        }
        // A series whose type changed (a restarted exporter) starts over.
        if s.kind != kind {
            s.kind = kind;
            s.samples.clear();
            s.last_raw = None;
        }
        let v = match kind {
            ValueKind::Gauge => value,
            ValueKind::Counter => {
                let prev = s.last_raw.replace((t_ms, value));
                let Some((pt, pv)) = prev else {
                    return Ingested::FirstCounterValue;
                };
                let increase = if value >= pv { value - pv } else { value };
                let dt_s = (t_ms - pt) as f64 / 1000.0;
                increase / dt_s
            }
        };
        if !v.is_finite() {
            return Ingested::NotFinite;
        }
        while s
            .samples
            .front()
            .is_some_and(|(t, _)| !in_window(*t, t_ms, window_ms))
        {
            s.samples.pop_front();
        }
        let mut outcome = Ingested::Stored;
        if let Some(zmax) = anomaly_z
            && s.samples.len() >= min_samples
        {
            self.scratch_a.clear();
            self.scratch_a.extend(s.samples.iter().map(|(_, v)| *v));
            if let Some(z) = z_score(&self.scratch_a, v)
                && z >= zmax
            {
                let fresh = s.flag.is_none_or(|f| f.until_ms < t_ms);
                s.flag = Some(Flag {
                    z,
                    at_ms: t_ms,
                    until_ms: t_ms.saturating_add(window_ms),
                });
                if fresh {
                    self.stats.flagged += 1;
                    outcome = Ingested::Flagged { z };
                }
            }
        }
        if s.samples.len() >= max_samples {
            s.samples.pop_front();
        }
        s.samples.push_back((t_ms, v));
        outcome
    }

    /// Ages out stale series, flags and cooldowns, pairs the candidates and returns the events
    /// raised at `now_ms` (in key order of their pairs).
    pub fn evaluate(&mut self, now_ms: TimestampMs) -> Vec<Event> {
        let window_ms = self.window_ms;
        let before = self.series.len();
        self.series.retain(|_, s| {
            s.last_ms
                .is_some_and(|t| t.saturating_add(window_ms) > now_ms)
        });
        self.stats.series_expired += (before - self.series.len()) as u64;
        for s in self.series.values_mut() {
            if s.flag.is_some_and(|f| f.until_ms < now_ms) {
                s.flag = None;
            }
        }
        let cooldown_ms = self.cooldown_ms;
        self.cooldowns
            .retain(|_, t| t.saturating_add(cooldown_ms) > now_ms);

        let mut cands: Vec<(&SeriesKey, &Series)> =
            self.series.iter().filter(|(_, s)| s.watched).collect();
        let mut flagged: Vec<(&SeriesKey, &Series)> = self
            .series
            .iter()
            .filter(|(_, s)| !s.watched && s.flag.is_some())
            .collect();
        flagged.sort_by_key(|(_, s)| std::cmp::Reverse(s.flag.map_or(0, |f| f.at_ms)));
        cands.extend(flagged);
        if cands.len() > self.cfg.max_candidates {
            self.stats.candidates_dropped += (cands.len() - self.cfg.max_candidates) as u64;
            cands.truncate(self.cfg.max_candidates);
        }
        // Pair in key order so events come out deterministically.
        cands.sort_by(|x, y| x.0.cmp(y.0));
        self.stats.candidates = cands.len();

        let mut events = Vec::new();
        for i in 0..cands.len() {
            for j in i + 1..cands.len() {
                let (ka, sa) = cands[i];
                let (kb, sb) = cands[j];
                // Parts of one histogram or summary are correlated by construction.
                if ka.family() == kb.family() {
                    continue;
                }
                let pair = (ka.clone(), kb.clone());
                if self.cooldowns.contains_key(&pair) {
                    continue;
                }
                let Some((start, end)) = align(
                    sa,
                    sb,
                    now_ms,
                    window_ms,
                    &mut self.scratch_a,
                    &mut self.scratch_b,
                ) else {
                    continue;
                };
                let n = self.scratch_a.len();
                if n < self.cfg.min_samples {
                    continue;
                }
                let Some(r) = pearson(&self.scratch_a, &self.scratch_b) else {
                    continue;
                };
                let crosses = match self.cfg.sign {
                    Sign::Positive => r >= self.cfg.threshold,
                    Sign::Either => r.abs() >= self.cfg.threshold,
                };
                if !crosses {
                    continue;
                }
                events.push(Event {
                    kind: "correlated".into(),
                    raised_at_ms: now_ms,
                    a: event_series(ka, sa),
                    b: event_series(kb, sb),
                    coefficient: r,
                    threshold: self.cfg.threshold,
                    window: EventWindow {
                        start_ms: start,
                        end_ms: end,
                        samples: n,
                    },
                });
                self.cooldowns.insert(pair, now_ms);
            }
        }
        while self.cooldowns.len() > MAX_COOLDOWNS {
            let oldest = self
                .cooldowns
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.cooldowns.remove(&k);
                }
                None => break,
            }
        }
        self.stats.events += events.len() as u64;
        events
    }
}

fn event_series(key: &SeriesKey, s: &Series) -> EventSeries {
    EventSeries {
        key: key.as_str().to_string(),
        selected: match (s.watched, s.flag) {
            (false, Some(f)) => SelectedBy::Anomaly {
                z: f.z.is_finite().then_some(f.z),
                at_ms: f.at_ms,
            },
            _ => SelectedBy::Watch,
        },
    }
}

/// Whether a sample at `t` lies in the window `(now − window, now]` (computed without
/// underflow, so early timestamps count as inside).
fn in_window(t: TimestampMs, now: TimestampMs, window_ms: u64) -> bool {
    t <= now && t.saturating_add(window_ms) > now
}

/// Collects the values of both series at the timestamps they share inside the window ending
/// at `now` into `xa`/`xb`; returns the first and last shared timestamps.
fn align(
    a: &Series,
    b: &Series,
    now: TimestampMs,
    window_ms: u64,
    xa: &mut Vec<f64>,
    xb: &mut Vec<f64>,
) -> Option<(TimestampMs, TimestampMs)> {
    xa.clear();
    xb.clear();
    let inside = |(t, _): &&(TimestampMs, f64)| in_window(*t, now, window_ms);
    let mut ia = a.samples.iter().filter(inside).peekable();
    let mut ib = b.samples.iter().filter(inside).peekable();
    let (mut first, mut last) = (None, 0);
    while let (Some(&&(ta, va)), Some(&&(tb, vb))) = (ia.peek(), ib.peek()) {
        match ta.cmp(&tb) {
            std::cmp::Ordering::Less => {
                ia.next();
            }
            std::cmp::Ordering::Greater => {
                ib.next();
            }
            std::cmp::Ordering::Equal => {
                xa.push(va);
                xb.push(vb);
                first.get_or_insert(ta);
                last = ta;
                ia.next();
                ib.next();
            }
        }
    }
    first.map(|f| (f, last))
}

#[cfg(test)]
mod tests;
