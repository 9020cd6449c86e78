//! Prometheus exposition shared by every process.
//!
//! Conventions (see `docs/metrics.md`): text format 0.0.4, names prefixed `stockade_`, base units
//! in the name (`_seconds`, `_bytes`, `_total`), labels from bounded sets only (volume, device,
//! node, op, stage — never offsets, connections or client ports). A [`prometheus::Registry`] is
//! created by `main` and passed to each component; there are no global metric statics.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, HistogramOpts, Opts, Registry, TextEncoder};

/// Latency buckets in seconds: 10 µs to ~10 s, roughly ×2.5 apart.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Errors registering metrics.
#[derive(Debug, thiserror::Error)]
#[error("registering metric: {0}")]
pub struct MetricsError(#[from] pub prometheus::Error);

/// A registry with the process collector (CPU, memory, open fds) already registered.
pub fn new_registry() -> Registry {
    let r = Registry::new();
    // The process collector only fails to register if it is registered twice.
    let _ = r.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ));
    r
}

/// Registers and returns a collector; the one place metrics meet a registry.
pub fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    c: C,
) -> Result<C, MetricsError> {
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

/// A counter vector with the given labels.
pub fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<prometheus::IntCounterVec, MetricsError> {
    register(
        registry,
        prometheus::IntCounterVec::new(Opts::new(name, help), labels)?,
    )
}

/// A plain counter.
pub fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
) -> Result<prometheus::IntCounter, MetricsError> {
    register(registry, prometheus::IntCounter::new(name, help)?)
}

/// A gauge vector with the given labels.
pub fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<prometheus::GaugeVec, MetricsError> {
    register(
        registry,
        prometheus::GaugeVec::new(Opts::new(name, help), labels)?,
    )
}

/// A plain gauge.
pub fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
) -> Result<prometheus::Gauge, MetricsError> {
    register(registry, prometheus::Gauge::new(name, help)?)
}

/// An integer gauge.
pub fn int_gauge(
    registry: &Registry,
    name: &str,
    help: &str,
) -> Result<prometheus::IntGauge, MetricsError> {
    register(registry, prometheus::IntGauge::new(name, help)?)
}

/// A latency histogram vector (seconds) with [`LATENCY_BUCKETS`].
pub fn latency_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<prometheus::HistogramVec, MetricsError> {
    register(
        registry,
        prometheus::HistogramVec::new(
            HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
            labels,
        )?,
    )
}

/// A histogram vector with explicit buckets.
pub fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> Result<prometheus::HistogramVec, MetricsError> {
    register(
        registry,
        prometheus::HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?,
    )
}

/// Renders the registry in the text format 0.0.4.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let enc = TextEncoder::new();
    // Encoding into a Vec only fails on a metric family that violates the data model, which
    // registration already rejects.
    if let Err(e) = enc.encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

async fn metrics_handler(State(registry): State<Registry>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        render(&registry),
    )
}

/// A router serving `GET /metrics` (and `GET /healthz`) from `registry`.
pub fn router(registry: Registry) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(registry)
}

/// Serves `router` on `listener` until `shutdown` resolves, within the bounds of
/// [`crate::http_server`] (connections, header time, shutdown grace).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::http_server::serve(listener, router, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_includes_registered_metrics_and_process_metrics() {
        let r = new_registry();
        let c = counter_vec(&r, "stockade_test_total", "A test counter.", &["op"]).unwrap();
        c.with_label_values(&["read"]).inc();
        let text = render(&r);
        assert!(
            text.contains("stockade_test_total{op=\"read\"} 1"),
            "{text}"
        );
        assert!(text.contains("process_open_fds"), "{text}");
        // Registering the same name twice is an error, not a silent duplicate.
        assert!(counter_vec(&r, "stockade_test_total", "again", &["op"]).is_err());
    }
}
