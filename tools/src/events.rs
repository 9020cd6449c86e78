//! `stockade events`: watch metric series and report pairs that move together (correlated
//! events, US10270668B1). The engine is `common::events`; this is its command line.

use anyhow::{Context, bail};
use common::events::engine::MAX_TOTAL_SAMPLES;
use common::events::http::{HttpUrl, Limits};
use common::events::prom::PromSource;
use common::events::webhook::WebhookConfig;
use common::events::{Engine, EngineConfig, Pattern, Round, Runner, RunnerConfig, Sign};
use common::{SharedClock, SystemClock};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const EXAMPLES: &str = "\
Examples:
  # Every process of a `stockade up` cluster; anomalous series (z ≥ 3) are paired.
  stockade events --cluster ./stockade-data

  # Two targets, only NBD and sled series, JSON lines, posted to a webhook too.
  stockade events --target 127.0.0.1:9101 --target 127.0.0.1:9102 \\
      --watch 'stockade_nbd_*' --watch 'stockade_sled_*' --json --webhook http://alerts:8080/hook

  # The last ten minutes on a Prometheus server, evaluated once.
  stockade events --prometheus http://prom:9090 --query 'rate(stockade_nbd_requests_total[1m])' \\
      --query 'stockade_sled_device_queue_depth' --window 10m --interval 15s --once

Patterns are globs (* and ?). One that mentions labels ({ } = or \") is matched against the whole
series key name{label=\"value\",...} (labels sorted by name); any other against the metric name.
Counters (by their # TYPE line, histogram buckets/sums/counts included) are correlated as
per-second rates. Scraped series get an instance=\"host:port\" label.";

/// Options of `stockade events`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct EventsArgs {
    /// A /metrics URL to scrape (repeatable); `host:port` alone means
    /// http://host:port/metrics.
    #[arg(long = "target", value_name = "URL")]
    pub targets: Vec<String>,
    /// Scrape every process of a `stockade up` cluster: its data directory or its
    /// cluster.json.
    #[arg(long, value_name = "PATH")]
    pub cluster: Option<PathBuf>,
    /// A Prometheus server whose range-query API to read (with --query).
    #[arg(long, value_name = "URL", requires = "queries")]
    pub prometheus: Option<String>,
    /// A PromQL expression to watch on --prometheus (repeatable).
    #[arg(long = "query", value_name = "EXPR", requires = "prometheus")]
    pub queries: Vec<String>,
    /// Always correlate series matching this pattern (repeatable).
    #[arg(long = "watch", value_name = "PATTERN")]
    pub watch: Vec<Pattern>,
    /// Never look at series matching this pattern (repeatable; wins over --watch).
    #[arg(long = "ignore", value_name = "PATTERN")]
    pub ignore: Vec<Pattern>,
    /// Also correlate series whose newest value lies at least Z standard deviations from its
    /// window. Default: 3 without --watch, off with --watch.
    #[arg(long, value_name = "Z")]
    pub anomaly_z: Option<f64>,
    /// Raise an event when the correlation coefficient reaches this value (0 < r ≤ 1).
    #[arg(long, value_name = "R", default_value_t = 0.9)]
    pub threshold: f64,
    /// Which correlations count.
    #[arg(long, value_enum, default_value_t = SignArg::Either)]
    pub sign: SignArg,
    /// Sliding window the correlation is computed over.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    pub window: Duration,
    /// Time between scrapes (and the step of Prometheus queries).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration)]
    pub interval: Duration,
    /// After an event, the same pair stays quiet this long.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration)]
    pub cooldown: Duration,
    /// Aligned samples a pair needs before it can correlate (at least 3).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub min_samples: usize,
    /// Most series tracked at once; new series beyond it are ignored until old ones go
    /// stale. Default: 10000, or fewer when the window holds many samples (all windows
    /// together hold at most 4 Mi samples, 64 MiB).
    #[arg(long, value_name = "N")]
    pub max_series: Option<usize>,
    /// Most series paired per round (watched first, then the most recently flagged).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_candidates: usize,
    /// Deadline of one scrape or query. Default: the interval, at least 1s, at most 10s.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub timeout: Option<Duration>,
    /// POST each event as JSON to this http:// URL (failures are logged, never fatal).
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// Retries of a failed webhook delivery.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub webhook_retries: u32,
    /// Deadline of one webhook attempt.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration)]
    pub webhook_timeout: Duration,
    /// Print events as JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Read the sources once, report and exit (with --prometheus one query covers the whole
    /// window; a single scrape cannot correlate and serves as a connectivity check).
    #[arg(long, conflicts_with = "run_for")]
    pub once: bool,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long = "for", value_name = "DURATION", value_parser = duration)]
    pub run_for: Option<Duration>,
}

/// Which correlations raise events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SignArg {
    /// Only positive correlation (r ≥ threshold).
    Positive,
    /// Positive or negative (|r| ≥ threshold).
    Either,
}

/// `--max-series` unless the window is long.
const DEFAULT_MAX_SERIES: usize = 10_000;

fn duration(s: &str) -> Result<Duration, common::units::UnitError> {
    common::units::parse_duration(s)
}

/// A `--target` as a URL: `host:port` gets `http://` and `/metrics`.
pub fn target_url(s: &str) -> anyhow::Result<HttpUrl> {
    HttpUrl::metrics_target(s).with_context(|| format!("--target {}", s.trim()))
}

/// The `/metrics` URLs of a `stockade up` cluster.
pub fn cluster_targets(path: &Path) -> anyhow::Result<Vec<HttpUrl>> {
    let file = if path.is_dir() {
        path.join("cluster.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "reading {} (is `stockade up` running on that data directory?)",
            file.display()
        )
    })?;
    let info: crate::up::ClusterInfo =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    info.processes
        .iter()
        .map(|p| target_url(&format!("http://{}/metrics", p.metrics)))
        .collect()
}

/// Checks the options and turns them into the engine's and the runner's configuration.
pub fn plan(args: &EventsArgs) -> anyhow::Result<(EngineConfig, RunnerConfig)> {
    let mut targets = args
        .targets
        .iter()
        .map(|t| target_url(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(c) = &args.cluster {
        targets.extend(cluster_targets(c)?);
    }
    let timeout = args.timeout.unwrap_or_else(|| {
        args.interval
            .clamp(Duration::from_secs(1), Duration::from_secs(10))
    });
    if timeout.is_zero() {
        bail!("--timeout must be longer than zero");
    }
    let prometheus = match &args.prometheus {
        Some(url) => {
            let base = HttpUrl::parse(url).with_context(|| format!("--prometheus {url}"))?;
            let limits = Limits {
                timeout,
                max_body_bytes: 16 << 20,
                ..Limits::default()
            };
            Some(PromSource::new(base, args.queries.clone(), limits).context("--query")?)
        }
        None => None,
    };
    if targets.is_empty() && prometheus.is_none() {
        bail!(
            "nothing to watch: give --target URL, --cluster PATH, or --prometheus URL with --query EXPR"
        );
    }
    let webhook = match &args.webhook {
        Some(url) => {
            let url = HttpUrl::parse(url).with_context(|| format!("--webhook {url}"))?;
            if args.webhook_timeout.is_zero() {
                bail!("--webhook-timeout must be longer than zero");
            }
            Some(WebhookConfig {
                timeout: args.webhook_timeout,
                retries: args.webhook_retries,
                ..WebhookConfig::new(url)
            })
        }
        None => None,
    };
    let anomaly_z = match args.anomaly_z {
        Some(z) => Some(z),
        None if args.watch.is_empty() => Some(3.0),
        None => None,
    };
    let engine = EngineConfig {
        threshold: args.threshold,
        sign: match args.sign {
            SignArg::Positive => Sign::Positive,
            SignArg::Either => Sign::Either,
        },
        window: args.window,
        interval: args.interval,
        cooldown: args.cooldown,
        min_samples: args.min_samples,
        anomaly_z,
        watch: args.watch.clone(),
        ignore: args.ignore.clone(),
        max_series: 1,
        max_candidates: args.max_candidates,
    };
    let per_series = engine.samples_per_window().saturating_add(2).max(1);
    let engine = EngineConfig {
        max_series: args.max_series.unwrap_or_else(|| {
            (MAX_TOTAL_SAMPLES / per_series).clamp(1, DEFAULT_MAX_SERIES as u64) as usize
        }),
        ..engine
    };
    engine.validate().context("invalid options")?;
    let runner = RunnerConfig {
        targets,
        prometheus,
        scrape_timeout: timeout,
        webhook,
        ..RunnerConfig::default()
    };
    Ok((engine, runner))
}

/// Runs `stockade events`, printing to stdout until Ctrl-C, `--for` or `--once`.
pub fn run(args: EventsArgs) -> anyhow::Result<()> {
    common::logging::init("stockade");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stdout = std::io::stdout();
    rt.block_on(run_with(
        args,
        stdout.lock(),
        common::signals::wait_for_shutdown(),
    ))
}

/// Runs `stockade events`, printing events to `out`, until `stop`, `--for` or `--once`.
pub async fn run_with(
    args: EventsArgs,
    mut out: impl Write,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (engine_cfg, runner_cfg) = plan(&args)?;
    let sources = runner_cfg.targets.len()
        + runner_cfg
            .prometheus
            .as_ref()
            .map_or(0, |p| p.queries().len());
    let selection = match (engine_cfg.watch.len(), engine_cfg.anomaly_z) {
        (0, Some(z)) => format!("series with |z| ≥ {z}"),
        (n, None) => format!("{n} watch pattern(s)"),
        (n, Some(z)) => format!("{n} watch pattern(s) and series with |z| ≥ {z}"),
    };
    eprintln!(
        "stockade events: {sources} source(s) every {:?}, window {:?}, {selection}, threshold {} ({}), cooldown {:?}",
        engine_cfg.interval,
        engine_cfg.window,
        engine_cfg.threshold,
        match engine_cfg.sign {
            Sign::Positive => "positive only",
            Sign::Either => "either sign",
        },
        engine_cfg.cooldown,
    );
    let engine = Engine::new(engine_cfg).context("invalid options")?;
    let clock: SharedClock = Arc::new(SystemClock::new());
    let base = common::events::runner::wall_base_ms(&clock);
    let mut runner = Runner::new(engine, runner_cfg, clock, base, None)?;

    let mut write_err: Option<std::io::Error> = None;
    let mut print = |round: &Round, out: &mut dyn Write| -> ControlFlow<()> {
        for ev in &round.events {
            let res = if args.json {
                serde_json::to_string(ev)
                    .map_err(std::io::Error::other)
                    .and_then(|line| writeln!(out, "{line}"))
            } else {
                writeln!(out, "{ev}")
            }
            .and_then(|()| out.flush());
            if let Err(e) = res {
                write_err = Some(e);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    };

    let result = if args.once {
        let round = runner.tick().await;
        let _ = print(&round, &mut out);
        let stats = runner.engine().stats();
        let dropped = if round.candidates_dropped > 0 {
            format!(
                " ({} more left out by --max-candidates {})",
                round.candidates_dropped, args.max_candidates
            )
        } else {
            String::new()
        };
        eprintln!(
            "read {} of {} source(s): {} values, {} series tracked, {} candidate(s){dropped}, {} event(s)",
            round.sources_ok,
            round.sources_ok + round.sources_failed,
            round.values,
            stats.series,
            stats.candidates,
            round.events.len(),
        );
        if round.sources_ok == 0 {
            Err(anyhow::anyhow!(
                "no source could be read (see the log above)"
            ))
        } else {
            Ok(())
        }
    } else {
        let limit = args.run_for;
        let stop = async move {
            match limit {
                Some(d) => {
                    tokio::select! {
                        _ = stop => {}
                        _ = tokio::time::sleep(d) => {}
                    }
                }
                None => stop.await,
            }
        };
        runner.run(stop, |round| print(round, &mut out)).await;
        Ok(())
    };
    runner.shutdown(Duration::from_secs(10)).await;
    match write_err {
        // The reader went away (`| head`): a normal end.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => result,
        Some(e) => Err(anyhow::Error::new(e).context("writing events")),
        None => result,
    }
}

#[cfg(test)]
mod tests;
