//! Prometheus metrics of the NBD front end.
//!
//! Registered on a registry passed in by the caller (no globals). Per-volume series carry the
//! label `volume` (the export name); per-request series add `op` (`read`, `write`, `flush`,
//! `trim`, `cache`, `write_zeroes`, `block_status`, `disc`, `unknown`). Every metric:
//!
//! | name | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `stockade_nbd_requests_total` | counter | volume, op | requests received |
//! | `stockade_nbd_request_errors_total` | counter | volume, op, error | requests answered with an error (`error` = `einval`, `enospc`, `eio`, ...) |
//! | `stockade_nbd_request_duration_seconds` | histogram | volume, op | from request header received to reply written to the socket |
//! | `stockade_nbd_read_bytes_total` | counter | volume | bytes returned by successful reads |
//! | `stockade_nbd_written_bytes_total` | counter | volume | bytes stored by successful writes |
//! | `stockade_nbd_requests_in_flight` | gauge | volume | requests received and not yet answered |
//! | `stockade_nbd_connections` | gauge | volume | open connections in the transmission phase |
//! | `stockade_nbd_backpressure_waits_total` | counter | volume | times the reader waited for in-flight room (bytes or requests) |
//! | `stockade_nbd_connections_closed_total` | counter | reason | connections ended, by reason |

use std::sync::Arc;

use prometheus::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use common::metrics::{MetricsError, counter_vec, latency_vec, register};

use super::proto::Cmd;

/// Number of `op` label values: every command plus `unknown`.
const OPS: usize = Cmd::ALL.len() + 1;

/// The `op` label of a request type.
pub(crate) fn op_index(cmd: Option<Cmd>) -> usize {
    cmd.map_or(Cmd::ALL.len(), |c| usize::from(c.wire()))
}

fn op_name(i: usize) -> &'static str {
    Cmd::ALL.get(i).map_or("unknown", |c| c.name())
}

/// Every metric family of the NBD front end.
#[derive(Debug, Clone)]
pub struct NbdMetrics {
    requests: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    read_bytes: IntCounterVec,
    written_bytes: IntCounterVec,
    in_flight: IntGaugeVec,
    connections: IntGaugeVec,
    backpressure: IntCounterVec,
    closed: IntCounterVec,
}

impl NbdMetrics {
    /// Registers every family on `registry`.
    pub fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let int_gauge_vec = |name: &str, help: &str| -> Result<IntGaugeVec, MetricsError> {
            register(
                registry,
                IntGaugeVec::new(Opts::new(name, help), &["volume"])?,
            )
        };
        Ok(Self {
            requests: counter_vec(
                registry,
                "stockade_nbd_requests_total",
                "NBD requests received, by volume and command.",
                &["volume", "op"],
            )?,
            errors: counter_vec(
                registry,
                "stockade_nbd_request_errors_total",
                "NBD requests answered with an error, by volume, command and NBD error.",
                &["volume", "op", "error"],
            )?,
            duration: latency_vec(
                registry,
                "stockade_nbd_request_duration_seconds",
                "Time from an NBD request header being received to its reply being written.",
                &["volume", "op"],
            )?,
            read_bytes: counter_vec(
                registry,
                "stockade_nbd_read_bytes_total",
                "Bytes returned to NBD clients by successful reads.",
                &["volume"],
            )?,
            written_bytes: counter_vec(
                registry,
                "stockade_nbd_written_bytes_total",
                "Bytes stored by successful NBD writes.",
                &["volume"],
            )?,
            in_flight: int_gauge_vec(
                "stockade_nbd_requests_in_flight",
                "NBD requests received and not yet answered.",
            )?,
            connections: int_gauge_vec(
                "stockade_nbd_connections",
                "Open NBD connections in the transmission phase.",
            )?,
            backpressure: counter_vec(
                registry,
                "stockade_nbd_backpressure_waits_total",
                "Times a connection stopped reading requests until in-flight bytes or requests \
                 dropped below their bound.",
                &["volume"],
            )?,
            closed: counter_vec(
                registry,
                "stockade_nbd_connections_closed_total",
                "NBD connections ended, by reason.",
                &["reason"],
            )?,
        })
    }

    /// Counts a connection that ended for `reason` (a fixed, bounded set of names).
    pub(crate) fn connection_closed(&self, reason: &'static str) {
        self.closed.with_label_values(&[reason]).inc();
    }

    /// The series of one volume, resolved once per connection.
    pub(crate) fn volume(&self, volume: &str) -> Arc<VolumeMetrics> {
        let per_op = |i: usize| {
            (
                self.requests.with_label_values(&[volume, op_name(i)]),
                self.duration.with_label_values(&[volume, op_name(i)]),
            )
        };
        let (requests, duration): (Vec<IntCounter>, Vec<Histogram>) = (0..OPS).map(per_op).unzip();
        Arc::new(VolumeMetrics {
            volume: volume.to_string(),
            requests,
            duration,
            errors: self.errors.clone(),
            read_bytes: self.read_bytes.with_label_values(&[volume]),
            written_bytes: self.written_bytes.with_label_values(&[volume]),
            in_flight: self.in_flight.with_label_values(&[volume]),
            connections: self.connections.with_label_values(&[volume]),
            backpressure: self.backpressure.with_label_values(&[volume]),
        })
    }
}

/// The series of one volume.
#[derive(Debug)]
pub(crate) struct VolumeMetrics {
    volume: String,
    requests: Vec<IntCounter>,
    duration: Vec<Histogram>,
    errors: IntCounterVec,
    pub(crate) read_bytes: IntCounter,
    pub(crate) written_bytes: IntCounter,
    pub(crate) in_flight: IntGauge,
    pub(crate) connections: IntGauge,
    pub(crate) backpressure: IntCounter,
}

impl VolumeMetrics {
    pub(crate) fn request(&self, op: usize) {
        if let Some(c) = self.requests.get(op) {
            c.inc();
        }
    }

    pub(crate) fn observe(&self, op: usize, seconds: f64) {
        if let Some(h) = self.duration.get(op) {
            h.observe(seconds);
        }
    }

    pub(crate) fn error(&self, op: usize, error: &'static str) {
        self.errors
            .with_label_values(&[self.volume.as_str(), op_name(op), error])
            .inc();
    }
}

/// Decrements a gauge when dropped.
#[derive(Debug)]
pub(crate) struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub(crate) fn new(g: &IntGauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_every_family_once() {
        let r = Registry::new();
        let m = NbdMetrics::new(&r).unwrap();
        assert!(
            NbdMetrics::new(&r).is_err(),
            "double registration is refused"
        );
        let v = m.volume("vol");
        v.request(op_index(Some(Cmd::Write)));
        v.request(op_index(None));
        v.error(op_index(Some(Cmd::Write)), "enospc");
        v.observe(op_index(Some(Cmd::Write)), 0.001);
        {
            let _g = GaugeGuard::new(&v.in_flight);
            assert_eq!(v.in_flight.get(), 1);
        }
        assert_eq!(v.in_flight.get(), 0);
        m.connection_closed("disc");
        let text = common::metrics::render(&r);
        for needle in [
            "stockade_nbd_requests_total{op=\"write\",volume=\"vol\"} 1",
            "stockade_nbd_requests_total{op=\"unknown\",volume=\"vol\"} 1",
            "stockade_nbd_request_errors_total{error=\"enospc\",op=\"write\",volume=\"vol\"} 1",
            "stockade_nbd_request_duration_seconds_count{op=\"write\",volume=\"vol\"} 1",
            "stockade_nbd_connections_closed_total{reason=\"disc\"} 1",
            "stockade_nbd_requests_in_flight{volume=\"vol\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
