//! Reading series from a Prometheus server's `GET /api/v1/query_range`.
//!
//! Each PromQL expression is evaluated over the window with the step set to the engine's
//! interval, `start` and `end` on multiples of the step, so every series of every query shares
//! the same timestamps (and the same grid the scraper stamps its rounds with). Series are keyed
//! by their labels; a result without `__name__` (any expression that is not a plain selector)
//! takes the expression as its name, so `--watch 'rate(*'` works.

use super::engine::TimestampMs;
use super::http::{self, HttpError, HttpUrl, Limits, encode_component};
use super::series::SeriesKey;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Most expressions per source.
pub const MAX_QUERIES: usize = 64;
/// Longest expression, in bytes.
pub const MAX_QUERY_BYTES: usize = 4096;

/// A failed query or an unusable configuration.
#[derive(Debug, thiserror::Error)]
pub enum PromError {
    /// No expressions were given.
    #[error("no PromQL expressions to query: give at least one --query")]
    NoQueries,
    /// Too many or too long expressions.
    #[error(
        "{count} expressions (limit {MAX_QUERIES}), longest {longest} bytes (limit {MAX_QUERY_BYTES})"
    )]
    TooManyQueries {
        /// Expressions given.
        count: usize,
        /// Length of the longest.
        longest: usize,
    },
    /// The URL built from the base URL and the query is not usable.
    #[error("building the query URL: {0}")]
    Url(#[from] http::UrlError),
    /// The exchange failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// Prometheus answered with an error.
    #[error("prometheus rejected {query:?} (HTTP {status}): {error_type}: {message}")]
    Api {
        /// The expression.
        query: String,
        /// HTTP status.
        status: u16,
        /// Prometheus' `errorType` (or `http` when the body was not Prometheus JSON).
        error_type: String,
        /// Prometheus' `error` (or the start of the body).
        message: String,
    },
    /// The body is not the JSON Prometheus sends.
    #[error("decoding the answer to {query:?}: {source}")]
    Json {
        /// The expression.
        query: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// The result is not a range vector.
    #[error("{query:?} returned a {result_type}, not a range vector (matrix)")]
    ResultType {
        /// The expression.
        query: String,
        /// What it returned.
        result_type: String,
    },
}

/// One series of a range query.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeSeries {
    /// Its key.
    pub key: SeriesKey,
    /// `(timestamp, value)`, as returned (values may be `NaN` or infinite).
    pub points: Vec<(TimestampMs, f64)>,
}

/// The envelope, read first without keeping the result (which may be large).
#[derive(Deserialize)]
struct ApiResponse {
    status: String,
    #[serde(default)]
    data: Option<ApiData>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct ApiData {
    #[serde(rename = "resultType")]
    result_type: String,
    #[serde(default, rename = "result")]
    _result: serde::de::IgnoredAny,
}

/// A matrix answer, read typed once the envelope said it is one.
#[derive(Deserialize)]
struct MatrixResponse {
    data: MatrixData,
}

#[derive(Deserialize)]
struct MatrixData {
    result: Vec<MatrixSeries>,
}

#[derive(Deserialize)]
struct MatrixSeries {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    #[serde(default)]
    values: Vec<(f64, String)>,
}

/// Decodes a `query_range` answer (HTTP status and body) into series.
pub fn parse_query_range(
    query: &str,
    status: u16,
    body: &[u8],
) -> Result<Vec<RangeSeries>, PromError> {
    let parsed: Result<ApiResponse, _> = serde_json::from_slice(body);
    let api = match parsed {
        Ok(a) if a.status == "success" && (200..300).contains(&status) => a,
        Ok(a) => {
            return Err(PromError::Api {
                query: query.to_string(),
                status,
                error_type: a.error_type.unwrap_or_else(|| "unknown".into()),
                message: a.error.unwrap_or_default(),
            });
        }
        Err(source) if (200..300).contains(&status) => {
            return Err(PromError::Json {
                query: query.to_string(),
                source,
            });
        }
        Err(_) => {
            let end = body.len().min(200);
            return Err(PromError::Api {
                query: query.to_string(),
                status,
                error_type: "http".into(),
                message: String::from_utf8_lossy(&body[..end]).trim().to_string(),
            });
        }
    };
    let Some(data) = api.data else {
        return Err(PromError::ResultType {
            query: query.to_string(),
            result_type: "nothing".into(),
        });
    };
    if data.result_type != "matrix" {
        return Err(PromError::ResultType {
            query: query.to_string(),
            result_type: data.result_type,
        });
    }
    let series = serde_json::from_slice::<MatrixResponse>(body)
        .map_err(|source| PromError::Json {
            query: query.to_string(),
            source,
        })?
        .data
        .result;
    Ok(series
        .into_iter()
        .map(|s| {
            let mut metric = s.metric;
            let name = metric
                .remove("__name__")
                .unwrap_or_else(|| query.to_string());
            let labels: Vec<(String, String)> = metric.into_iter().collect();
            let points = s
                .values
                .into_iter()
                .filter_map(|(t, v)| {
                    let ms = (t * 1000.0).round();
                    // A timestamp before the epoch or beyond u64 cannot be placed; skip it.
                    (ms.is_finite() && ms >= 0.0 && ms < u64::MAX as f64)
                        .then(|| (ms as u64, v.trim().parse::<f64>().unwrap_or(f64::NAN)))
                })
                .collect();
            RangeSeries {
                key: SeriesKey::new(&name, &labels),
                points,
            }
        })
        .collect())
}

/// Formats milliseconds as Prometheus' seconds with a fraction.
fn seconds(ms: u64) -> String {
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

/// The path and query of a range query under `base_path` (the server's path prefix).
pub fn query_range_path(
    base_path: &str,
    query: &str,
    start_ms: TimestampMs,
    end_ms: TimestampMs,
    step: Duration,
) -> String {
    let prefix = base_path
        .split('?')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/');
    let step_ms = step.as_millis().max(1) as u64;
    format!(
        "{prefix}/api/v1/query_range?query={}&start={}&end={}&step={}",
        encode_component(query),
        seconds(start_ms),
        seconds(end_ms),
        seconds(step_ms),
    )
}

/// A Prometheus server and the expressions to watch on it.
#[derive(Debug, Clone)]
pub struct PromSource {
    base: HttpUrl,
    queries: Vec<String>,
    limits: Limits,
}

impl PromSource {
    /// Checks the expressions.
    pub fn new(base: HttpUrl, queries: Vec<String>, limits: Limits) -> Result<Self, PromError> {
        let queries: Vec<String> = queries
            .into_iter()
            .map(|q| q.trim().to_string())
            .filter(|q| !q.is_empty())
            .collect();
        if queries.is_empty() {
            return Err(PromError::NoQueries);
        }
        let longest = queries.iter().map(String::len).max().unwrap_or(0);
        if queries.len() > MAX_QUERIES || longest > MAX_QUERY_BYTES {
            return Err(PromError::TooManyQueries {
                count: queries.len(),
                longest,
            });
        }
        Ok(Self {
            base,
            queries,
            limits,
        })
    }

    /// The expressions.
    pub fn queries(&self) -> &[String] {
        &self.queries
    }

    /// The server.
    pub fn base(&self) -> &HttpUrl {
        &self.base
    }

    /// Evaluates one expression over `[start, end]` at `step`.
    pub async fn query_range(
        &self,
        query: &str,
        start_ms: TimestampMs,
        end_ms: TimestampMs,
        step: Duration,
    ) -> Result<Vec<RangeSeries>, PromError> {
        let path = query_range_path(self.base.path_and_query(), query, start_ms, end_ms, step);
        let url = self.base.with_path_and_query(&path)?;
        let resp = http::get(&url, "application/json", self.limits).await?;
        parse_query_range(query, resp.status, &resp.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::test_server::{TestServer, ok, status};

    const MATRIX: &str = r#"{"status":"success","data":{"resultType":"matrix","result":[
        {"metric":{"__name__":"up","job":"sled","instance":"a:1"},"values":[[1700000000,"1"],[1700000001.5,"NaN"],[1700000003,"+Inf"]]},
        {"metric":{"volume":"v1"},"values":[[1700000000,"2.5"]]}
    ]},"warnings":["w"]}"#;

    #[test]
    fn matrix_decodes() {
        let s = parse_query_range("rate(x[1m])", 200, MATRIX.as_bytes()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].key.as_str(), r#"up{instance="a:1",job="sled"}"#);
        assert_eq!(s[0].points[0], (1_700_000_000_000, 1.0));
        assert_eq!(s[0].points[1].0, 1_700_000_001_500);
        assert!(s[0].points[1].1.is_nan());
        assert_eq!(s[0].points[2].1, f64::INFINITY);
        assert_eq!(s[1].key.as_str(), r#"rate(x[1m]){volume="v1"}"#);
        assert_eq!(s[1].key.name(), "rate(x[1m])");
    }

    #[test]
    fn errors_decode() {
        let e = parse_query_range(
            "x(",
            400,
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            r#"prometheus rejected "x(" (HTTP 400): bad_data: parse error"#
        );
        let e = parse_query_range("x", 502, b"<html>bad gateway</html>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTP 502") && e.contains("bad gateway"), "{e}");
        let e = parse_query_range("x", 200, b"not json").unwrap_err();
        assert!(matches!(e, PromError::Json { .. }), "{e}");
        let e = parse_query_range(
            "x",
            200,
            br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("returned a vector"), "{e}");
        let e = parse_query_range(
            "x",
            200,
            br#"{"status":"success","data":{"resultType":"matrix","result":[{"values":[["a"]]}]}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, PromError::Json { .. }), "{e}");
    }

    #[test]
    fn paths_are_encoded() {
        assert_eq!(
            query_range_path(
                "/prom/",
                "sum(x{a=\"b\"})",
                1_000,
                61_500,
                Duration::from_secs(1)
            ),
            "/prom/api/v1/query_range?query=sum%28x%7Ba%3D%22b%22%7D%29&start=1.000&end=61.500&step=1.000"
        );
        assert_eq!(
            query_range_path("/", "up", 0, 0, Duration::from_millis(250)),
            "/api/v1/query_range?query=up&start=0.000&end=0.000&step=0.250"
        );
    }

    #[test]
    fn bad_configurations() {
        let u = HttpUrl::parse("http://h:9090").unwrap();
        assert!(matches!(
            PromSource::new(u.clone(), vec![" ".into()], Limits::default()),
            Err(PromError::NoQueries)
        ));
        assert!(matches!(
            PromSource::new(u, vec!["x".repeat(MAX_QUERY_BYTES + 1)], Limits::default()),
            Err(PromError::TooManyQueries { .. })
        ));
    }

    #[tokio::test]
    async fn queries_a_server() {
        let srv = TestServer::start(|r| {
            if r.path.starts_with("/api/v1/query_range?query=up&") {
                ok("application/json", MATRIX)
            } else {
                status(
                    400,
                    "application/json",
                    r#"{"status":"error","errorType":"bad_data","error":"nope"}"#,
                )
            }
        })
        .await;
        let src = PromSource::new(srv.url("/"), vec!["up".into()], Limits::default()).unwrap();
        let s = src
            .query_range("up", 1_000, 2_000, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(s.len(), 2);
        let e = src
            .query_range("down", 1_000, 2_000, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, PromError::Api { status: 400, .. }), "{e}");
    }
}
