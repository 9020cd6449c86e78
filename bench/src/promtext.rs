//! Just enough of the Prometheus text format to read latency histograms' `_sum` and `_count`
//! from a sled's `/metrics`, plus a minimal HTTP GET to fetch it.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Errors fetching metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsFetchError {
    /// The connection failed.
    #[error("fetching http://{addr}/metrics: {source}")]
    Io {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server did not answer in time.
    #[error("fetching http://{0}/metrics timed out")]
    Timeout(SocketAddr),
    /// The server answered something else than 200.
    #[error("http://{addr}/metrics answered: {status}")]
    Status {
        /// Address.
        addr: SocketAddr,
        /// The status line.
        status: String,
    },
}

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with any `_sum`/`_count`/`_bucket` suffix).
    pub name: String,
    /// Label pairs in the order written.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// The value of a label.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        let after = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        out.push((key, value));
        rest = after[end + 1..].trim_start().trim_start_matches(',').trim();
    }
    Some(out)
}

/// Parses the text exposition format; comments and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(open) => {
                let Some(close) = line.rfind('}') else {
                    continue;
                };
                let Some(labels) = parse_labels(&line[open + 1..close]) else {
                    continue;
                };
                (&line[..open], labels, &line[close + 1..])
            }
            None => match line.split_once(' ') {
                Some((n, r)) => (n, Vec::new(), r),
                None => continue,
            },
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        out.push(Sample {
            name: name.trim().to_string(),
            labels,
            value,
        });
    }
    out
}

/// Sum of the values of `name` whose label `key` equals `value` (other labels summed over).
pub fn sum_where(samples: &[Sample], name: &str, key: &str, value: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.label(key) == Some(value))
        .map(|s| s.value)
        .sum()
}

/// Fetches `http://addr/metrics` (HTTP/1.0, so the server closes when done).
pub async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<String, MetricsFetchError> {
    let io = |source| MetricsFetchError::Io { addr, source };
    let run = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(io)?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.map_err(io)?;
        let text = String::from_utf8_lossy(&body).into_owned();
        let status = text.lines().next().unwrap_or_default().to_string();
        if !status.contains(" 200") {
            return Err(MetricsFetchError::Status { addr, status });
        }
        let body = text
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string());
        Ok(body)
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| MetricsFetchError::Timeout(addr))?
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP stockade_sled_request_duration_seconds Time from a request frame received to its reply written.
# TYPE stockade_sled_request_duration_seconds histogram
stockade_sled_request_duration_seconds_bucket{op="write",le="0.00001"} 0
stockade_sled_request_duration_seconds_sum{op="write"} 1.5
stockade_sled_request_duration_seconds_count{op="write"} 1000
stockade_sled_request_duration_seconds_sum{op="read"} 0.25
stockade_sled_device_request_duration_seconds_sum{device="/a b,\"c\"",op="write"} 1
stockade_sled_device_request_duration_seconds_sum{device="/d",op="write"} 0.5
stockade_sled_connections 1
garbage{
"#;

    #[test]
    fn parses_histogram_parts_and_sums_over_labels() {
        let s = parse(TEXT);
        assert_eq!(
            sum_where(
                &s,
                "stockade_sled_request_duration_seconds_sum",
                "op",
                "write"
            ),
            1.5
        );
        assert_eq!(
            sum_where(
                &s,
                "stockade_sled_request_duration_seconds_count",
                "op",
                "write"
            ),
            1000.0
        );
        assert_eq!(
            sum_where(
                &s,
                "stockade_sled_device_request_duration_seconds_sum",
                "op",
                "write"
            ),
            1.5
        );
        let dev = s
            .iter()
            .find(|x| x.label("device") == Some("/a b,\"c\""))
            .expect("escaped label value");
        assert_eq!(dev.value, 1.0);
        assert!(s.iter().any(|x| x.name == "stockade_sled_connections"));
        assert!(!s.iter().any(|x| x.name.starts_with("garbage")));
    }
}
