//! The correlated-events engine (US10270668B1) running inside the head node, behind
//! `GET /v1/events` of the admin API.
//!
//! The engine and its runner are `common::events` (the same code as `stockade events`): every
//! `interval` the runner scrapes the configured `/metrics` targets (by default this node's own),
//! keeps each series in a sliding window, flags anomalous ones (z-score), correlates watched and
//! flagged pairs, and raises one event per pair above the threshold per cooldown, logged (and
//! posted to a webhook when configured). The endpoint shows the configuration, the engine's
//! counters and the recent events.

use common::events::engine::MAX_TOTAL_SAMPLES;
use common::events::http::HttpUrl;
use common::events::webhook::WebhookConfig;
use common::events::{
    Engine, EngineConfig, Event, EventsMetrics, Pattern, Runner, RunnerConfig, Sign,
};
use common::{SharedClock, SystemClock};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Events kept for the endpoint.
const RECENT: usize = 256;

/// `[events]` of the head-node configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Run the engine.
    pub enabled: bool,
    /// `/metrics` URLs (or `host:port`) to scrape; empty: this node's own.
    pub targets: Vec<String>,
    /// Series always correlated (globs on the metric name, or on `name{labels}`).
    pub watch: Vec<String>,
    /// Series never looked at (wins over `watch`).
    pub ignore: Vec<String>,
    /// Also correlate series whose newest value is this many standard deviations from its
    /// window (unset: 3 without `watch`, off with it).
    pub anomaly_z: Option<f64>,
    /// Correlation coefficient at which a pair raises an event, in (0, 1].
    pub threshold: f64,
    /// Only positive correlation counts (default: either sign).
    pub positive_only: bool,
    /// Sliding window.
    #[serde(with = "common::units::duration")]
    pub window: Duration,
    /// Time between scrapes.
    #[serde(with = "common::units::duration")]
    pub interval: Duration,
    /// After an event, the same pair stays quiet this long.
    #[serde(with = "common::units::duration")]
    pub cooldown: Duration,
    /// POST each event as JSON to this http:// URL.
    pub webhook: Option<String>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            targets: Vec::new(),
            watch: Vec::new(),
            ignore: Vec::new(),
            anomaly_z: None,
            threshold: 0.9,
            positive_only: false,
            window: Duration::from_secs(300),
            interval: Duration::from_secs(5),
            cooldown: Duration::from_secs(300),
            webhook: None,
        }
    }
}

/// A configuration the engine cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// A bad option.
    #[error("events.{field}: {reason}")]
    Config {
        /// The key.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn bad(field: &'static str, reason: impl std::fmt::Display) -> EventsError {
    EventsError::Config {
        field,
        reason: reason.to_string(),
    }
}

fn target_url(s: &str) -> Result<HttpUrl, EventsError> {
    HttpUrl::metrics_target(s).map_err(|e| bad("targets", format!("{}: {e}", s.trim())))
}

impl EventsConfig {
    /// The engine's and runner's configuration; `own` is this node's metrics address.
    pub fn plan(&self, own: SocketAddr) -> Result<(EngineConfig, RunnerConfig), EventsError> {
        let targets = if self.targets.is_empty() {
            vec![target_url(&own.to_string())?]
        } else {
            self.targets
                .iter()
                .map(|t| target_url(t))
                .collect::<Result<Vec<_>, _>>()?
        };
        let patterns = |field, v: &[String]| {
            v.iter()
                .map(|p| p.parse::<Pattern>().map_err(|e| bad(field, e)))
                .collect::<Result<Vec<_>, _>>()
        };
        let watch = patterns("watch", &self.watch)?;
        let mut ignore = patterns("ignore", &self.ignore)?;
        // The engine's own metrics (scraped with the rest of this node's) would only ever
        // correlate with its own activity.
        ignore.push(
            "stockade_events_*"
                .parse::<Pattern>()
                .map_err(|e| bad("ignore", e))?,
        );
        let anomaly_z = match self.anomaly_z {
            Some(z) => Some(z),
            None if watch.is_empty() => Some(3.0),
            None => None,
        };
        let engine = EngineConfig {
            threshold: self.threshold,
            sign: if self.positive_only {
                Sign::Positive
            } else {
                Sign::Either
            },
            window: self.window,
            interval: self.interval,
            cooldown: self.cooldown,
            anomaly_z,
            watch,
            ignore,
            ..EngineConfig::default()
        };
        let per_series = engine.samples_per_window().saturating_add(2).max(1);
        let engine = EngineConfig {
            max_series: (MAX_TOTAL_SAMPLES / per_series).clamp(1, 10_000) as usize,
            ..engine
        };
        engine.validate().map_err(|e| bad("engine", e))?;
        let webhook = match &self.webhook {
            Some(u) => Some(WebhookConfig::new(
                HttpUrl::parse(u).map_err(|e| bad("webhook", e))?,
            )),
            None => None,
        };
        let runner = RunnerConfig {
            targets,
            scrape_timeout: self
                .interval
                .clamp(Duration::from_secs(1), Duration::from_secs(10)),
            webhook,
            recent_events: RECENT,
            ..RunnerConfig::default()
        };
        Ok((engine, runner))
    }
}

/// What `GET /v1/events` answers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EventsView {
    /// The engine runs.
    pub enabled: bool,
    /// What it scrapes.
    pub targets: Vec<String>,
    /// Time between scrapes (seconds).
    pub interval_seconds: f64,
    /// Sliding window (seconds).
    pub window_seconds: f64,
    /// Quiet time of a pair after an event (seconds).
    pub cooldown_seconds: f64,
    /// Coefficient that raises an event.
    pub threshold: f64,
    /// Rounds run.
    pub rounds: u64,
    /// Rounds skipped because their slot on the interval grid was already done (a late timer).
    pub rounds_skipped: u64,
    /// Candidate series left out of evaluations by `max_candidates`, since the start.
    pub candidates_dropped: u64,
    /// Sources read in the last round.
    pub sources_ok: usize,
    /// Sources that failed in the last round.
    pub sources_failed: usize,
    /// Values offered to the engine in the last round.
    pub values: usize,
    /// The most recent events, oldest first.
    pub events: Vec<Event>,
}

/// The engine's state as the endpoint shows it, updated after every round.
pub type SharedEvents = Arc<Mutex<EventsView>>;

/// Starts the engine (when enabled) on the current runtime until `stop`; answers the view the
/// endpoint reads.
pub fn start(
    cfg: &EventsConfig,
    own: SocketAddr,
    registry: &prometheus::Registry,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<SharedEvents, EventsError> {
    let view: SharedEvents = Arc::new(Mutex::new(EventsView::default()));
    if !cfg.enabled {
        return Ok(view);
    }
    let (engine_cfg, runner_cfg) = cfg.plan(own)?;
    {
        let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
        v.enabled = true;
        v.targets = runner_cfg.targets.iter().map(|t| t.to_string()).collect();
        v.interval_seconds = engine_cfg.interval.as_secs_f64();
        v.window_seconds = engine_cfg.window.as_secs_f64();
        v.cooldown_seconds = engine_cfg.cooldown.as_secs_f64();
        v.threshold = engine_cfg.threshold;
    }
    let metrics = EventsMetrics::new(registry).map_err(|e| bad("metrics", e))?;
    let engine = Engine::new(engine_cfg).map_err(|e| bad("engine", e))?;
    let clock: SharedClock = Arc::new(SystemClock::new());
    let base = common::events::runner::wall_base_ms(&clock);
    let mut runner = Runner::new(engine, runner_cfg, clock, base, Some(metrics))
        .map_err(|e| bad("runner", e))?;
    let shared = view.clone();
    tokio::spawn(async move {
        runner
            .run(stop, |round| {
                let mut v = shared.lock().unwrap_or_else(|p| p.into_inner());
                if round.skipped {
                    v.rounds_skipped += 1;
                    return ControlFlow::Continue(());
                }
                v.rounds += 1;
                v.candidates_dropped += round.candidates_dropped;
                v.sources_ok = round.sources_ok;
                v.sources_failed = round.sources_failed;
                v.values = round.values;
                for ev in &round.events {
                    if v.events.len() >= RECENT {
                        v.events.remove(0);
                    }
                    v.events.push(ev.clone());
                }
                ControlFlow::Continue(())
            })
            .await;
        runner.shutdown(Duration::from_secs(2)).await;
    });
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_scrape_this_node_and_flag_anomalies() {
        let own: SocketAddr = "127.0.0.1:7900".parse().unwrap();
        let (e, r) = EventsConfig::default().plan(own).unwrap();
        assert_eq!(r.targets.len(), 1);
        assert_eq!(r.targets[0].port(), 7900);
        assert_eq!(e.anomaly_z, Some(3.0));
        assert_eq!(e.interval, Duration::from_secs(5));
    }

    #[test]
    fn bad_options_name_the_key() {
        let own: SocketAddr = "127.0.0.1:7900".parse().unwrap();
        let c = EventsConfig {
            threshold: 1.5,
            ..EventsConfig::default()
        };
        assert!(
            c.plan(own)
                .unwrap_err()
                .to_string()
                .contains("events.engine")
        );
        let c = EventsConfig {
            targets: vec!["ftp://x/metrics".into()],
            ..EventsConfig::default()
        };
        assert!(
            c.plan(own)
                .unwrap_err()
                .to_string()
                .contains("events.targets")
        );
        let c = EventsConfig {
            watch: vec!["stockade_nbd_*".into()],
            ..EventsConfig::default()
        };
        assert_eq!(c.plan(own).unwrap().0.anomaly_z, None);
    }

    #[test]
    fn config_parses_from_toml() {
        let c: EventsConfig = toml::from_str(
            "enabled = true\ninterval = \"1s\"\nwindow = \"60s\"\nwatch = [\"stockade_nbd_*\"]\n",
        )
        .unwrap();
        assert_eq!(c.interval, Duration::from_secs(1));
        assert!(toml::from_str::<EventsConfig>("bogus = 1").is_err());
    }
}
