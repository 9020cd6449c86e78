//! A small, forgiving parser of the Prometheus text exposition format 0.0.4.
//!
//! Every sample line becomes one [`Sample`] (histograms and summaries arrive as their
//! `_bucket`/`_sum`/`_count`/quantile lines); `# TYPE` lines decide whether a sample is a
//! cumulative counter ([`Exposition::value_kind`]); `# HELP` and other comments are skipped. A
//! line that does not parse is counted and skipped, never fatal; the first few errors are kept
//! with their line numbers. Any input — binary garbage included — parses without panicking, and
//! the output is bounded by [`ParseLimits`].
//!
//! ```
//! use common::events::expo::parse;
//! use common::events::ValueKind;
//! let e = parse("# TYPE req_total counter\nreq_total{op=\"read\"} 7 1700000000000\nup 1\n");
//! assert_eq!(e.samples.len(), 2);
//! assert_eq!(e.samples[0].labels, vec![("op".to_string(), "read".to_string())]);
//! assert_eq!(e.samples[0].timestamp_ms, Some(1_700_000_000_000));
//! assert_eq!(e.value_kind("req_total"), ValueKind::Counter);
//! assert_eq!(e.value_kind("up"), ValueKind::Gauge);
//! ```

use super::series::{SeriesKey, ValueKind, escape_label_value};
use std::collections::BTreeMap;

/// Bounds on what one parse may produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Samples kept; later ones are dropped and [`Exposition::truncated`] is set.
    pub max_samples: usize,
    /// Labels per sample; a line with more is an error.
    pub max_labels: usize,
    /// Line errors kept in [`Exposition::errors`] (all are counted).
    pub max_errors_kept: usize,
    /// `# TYPE` declarations kept.
    pub max_types: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        Self {
            max_samples: 200_000,
            max_labels: 64,
            max_errors_kept: 8,
            max_types: 50_000,
        }
    }
}

/// The declared type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    /// `counter`.
    Counter,
    /// `gauge`.
    Gauge,
    /// `histogram`.
    Histogram,
    /// `summary`.
    Summary,
    /// `untyped` or anything unknown.
    Untyped,
}

impl MetricType {
    fn parse(s: &str) -> Self {
        match s {
            "counter" => Self::Counter,
            "gauge" => Self::Gauge,
            "histogram" => Self::Histogram,
            "summary" => Self::Summary,
            _ => Self::Untyped,
        }
    }
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name of the line (`x_bucket` for a histogram bucket).
    pub name: String,
    /// Labels in the order written, values unescaped.
    pub labels: Vec<(String, String)>,
    /// The value (`NaN` and infinities included).
    pub value: f64,
    /// The optional timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
}

impl Sample {
    /// The series key of this sample.
    pub fn key(&self) -> SeriesKey {
        SeriesKey::new(&self.name, &self.labels)
    }

    /// Renders the sample as one exposition line (without newline).
    pub fn render(&self) -> String {
        let mut s = self.name.clone();
        if !self.labels.is_empty() {
            s.push('{');
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                s.push_str(k);
                s.push_str("=\"");
                escape_label_value(v, &mut s);
                s.push('"');
            }
            s.push('}');
        }
        s.push(' ');
        s.push_str(&format_value(self.value));
        if let Some(t) = self.timestamp_ms {
            s.push(' ');
            s.push_str(&t.to_string());
        }
        s
    }
}

/// Formats a value as the exposition format writes it (`NaN`, `+Inf`, `-Inf`).
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v:?}")
    }
}

/// Why a line was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineErrorKind {
    /// The line does not start with a valid metric name.
    #[error("invalid metric name")]
    Name,
    /// A label name is missing or invalid.
    #[error("invalid label name")]
    LabelName,
    /// `=` or the opening quote of a label value is missing.
    #[error("expected =\"value\" after a label name")]
    LabelSyntax,
    /// A label value is not closed.
    #[error("unterminated label value")]
    UnterminatedValue,
    /// The label set is not closed or separated properly.
    #[error("expected , or }} in the label set")]
    LabelSeparator,
    /// Too many labels.
    #[error("too many labels")]
    TooManyLabels,
    /// The sample value is missing.
    #[error("missing sample value")]
    MissingValue,
    /// The sample value is not a number.
    #[error("invalid sample value")]
    Value,
    /// The timestamp is not an integer.
    #[error("invalid timestamp")]
    Timestamp,
    /// Something follows the timestamp.
    #[error("unexpected text after the sample")]
    Trailing,
}

/// A skipped line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    #[source]
    pub kind: LineErrorKind,
}

/// The result of parsing one exposition.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// The sample lines that parsed, in order.
    pub samples: Vec<Sample>,
    /// `# TYPE` declarations: family name → type.
    pub types: BTreeMap<String, MetricType>,
    /// Number of lines skipped as malformed.
    pub bad_lines: usize,
    /// The first few of those, with line numbers.
    pub errors: Vec<LineError>,
    /// Whether samples were dropped because of [`ParseLimits::max_samples`].
    pub truncated: bool,
}

impl Exposition {
    /// Whether a sample of this name is a cumulative counter (turned into a rate) or a gauge,
    /// from the `# TYPE` lines: a `counter` family; a histogram's `_bucket`, `_sum` and
    /// `_count`; a summary's `_sum` and `_count`; a `_total` sample of a family declared as
    /// counter without the suffix. Everything else (gauges, untyped, summary quantiles,
    /// undeclared) is a gauge.
    pub fn value_kind(&self, sample_name: &str) -> ValueKind {
        match self.types.get(sample_name) {
            Some(MetricType::Counter) => return ValueKind::Counter,
            Some(_) => return ValueKind::Gauge,
            None => {}
        }
        for (suffix, counts_for) in [
            ("_bucket", &[MetricType::Histogram][..]),
            ("_sum", &[MetricType::Histogram, MetricType::Summary][..]),
            ("_count", &[MetricType::Histogram, MetricType::Summary][..]),
            ("_total", &[MetricType::Counter][..]),
        ] {
            if let Some(base) = sample_name.strip_suffix(suffix)
                && let Some(t) = self.types.get(base)
            {
                return if counts_for.contains(t) {
                    ValueKind::Counter
                } else {
                    ValueKind::Gauge
                };
            }
        }
        ValueKind::Gauge
    }
}

/// Parses with the default [`ParseLimits`].
pub fn parse(text: &str) -> Exposition {
    parse_with(text, &ParseLimits::default())
}

/// Parses `text`, never failing: malformed lines are counted in the result.
pub fn parse_with(text: &str, limits: &ParseLimits) -> Exposition {
    let mut e = Exposition::default();
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw
            .strip_suffix('\r')
            .unwrap_or(raw)
            .trim_matches([' ', '\t']);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if words.next() == Some("TYPE")
                && let (Some(name), Some(ty)) = (words.next(), words.next())
                && (e.types.len() < limits.max_types || e.types.contains_key(name))
            {
                e.types.insert(name.to_string(), MetricType::parse(ty));
            }
            continue;
        }
        if e.samples.len() >= limits.max_samples {
            e.truncated = true;
            break;
        }
        match parse_sample(line, limits.max_labels) {
            Ok(s) => e.samples.push(s),
            Err(kind) => {
                e.bad_lines += 1;
                if e.errors.len() < limits.max_errors_kept {
                    e.errors.push(LineError { line: i + 1, kind });
                }
            }
        }
    }
    e
}

fn is_name_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

fn is_label_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_label_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// A position in a line. Every delimiter is ASCII, so every position the cursor stops at is a
/// character boundary.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn skip_blanks(&mut self) -> bool {
        let start = self.pos;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        self.pos > start
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
        self.s.get(start..self.pos).unwrap_or_default()
    }

    fn token(&mut self) -> &'a str {
        self.take_while(|c| c != b' ' && c != b'\t')
    }

    /// Reads a label value after its opening quote, unescaping `\\`, `\"` and `\n`; any other
    /// escape is kept as written.
    fn label_value(&mut self) -> Result<String, LineErrorKind> {
        let rest = self.s.get(self.pos..).unwrap_or_default();
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, '"')) => out.push('"'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, other)) => {
                        out.push('\\');
                        out.push(other);
                    }
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(LineErrorKind::UnterminatedValue)
    }
}

fn parse_sample(line: &str, max_labels: usize) -> Result<Sample, LineErrorKind> {
    let mut c = Cursor { s: line, pos: 0 };
    if !c.peek().is_some_and(is_name_start) {
        return Err(LineErrorKind::Name);
    }
    let name = c.take_while(is_name_char).to_string();
    c.skip_blanks();
    let mut labels = Vec::new();
    if c.peek() == Some(b'{') {
        c.pos += 1;
        loop {
            c.skip_blanks();
            if c.peek() == Some(b'}') {
                c.pos += 1;
                break;
            }
            if !c.peek().is_some_and(is_label_start) {
                return Err(LineErrorKind::LabelName);
            }
            let lname = c.take_while(is_label_char).to_string();
            c.skip_blanks();
            if c.peek() != Some(b'=') {
                return Err(LineErrorKind::LabelSyntax);
            }
            c.pos += 1;
            c.skip_blanks();
            if c.peek() != Some(b'"') {
                return Err(LineErrorKind::LabelSyntax);
            }
            c.pos += 1;
            let value = c.label_value()?;
            if labels.len() >= max_labels {
                return Err(LineErrorKind::TooManyLabels);
            }
            labels.push((lname, value));
            c.skip_blanks();
            match c.peek() {
                Some(b',') => c.pos += 1,
                Some(b'}') => {
                    c.pos += 1;
                    break;
                }
                _ => return Err(LineErrorKind::LabelSeparator),
            }
        }
        c.skip_blanks();
    }
    let value = c.token();
    if value.is_empty() {
        return Err(LineErrorKind::MissingValue);
    }
    let value = parse_value(value).ok_or(LineErrorKind::Value)?;
    c.skip_blanks();
    let ts = c.token();
    let timestamp_ms = if ts.is_empty() {
        None
    } else {
        Some(ts.parse::<i64>().map_err(|_| LineErrorKind::Timestamp)?)
    };
    c.skip_blanks();
    if c.peek().is_some() {
        return Err(LineErrorKind::Trailing);
    }
    Ok(Sample {
        name,
        labels,
        value,
        timestamp_ms,
    })
}

/// Parses a sample value as Go's `ParseFloat` would for the values Prometheus writes: decimal
/// and exponent notation, `NaN`, `+Inf`, `-Inf` (any case).
fn parse_value(s: &str) -> Option<f64> {
    // Rust also accepts "infinity" and "nan" in any case, which is harmless; it rejects Go's hex
    // floats and underscores, which no exposition writer emits.
    s.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOLDEN: &str = r#"# HELP http_requests_total The total number of HTTP requests.
# TYPE http_requests_total counter
http_requests_total{method="post",code="200"} 1027 1395066363000
http_requests_total{method="post",code="400"}    3 1395066363000

# Escaping in label values:
msdos_file_access_time_seconds{path="C:\\DIR\\FILE.TXT",error="Cannot find file:\n\"FILE.TXT\""} 1.458255915e9

# Minimalistic line:
metric_without_timestamp_and_labels 12.47

# A weird metric from before the epoch:
something_weird{problem="division by zero"} +Inf -3982045

# A histogram, which has a pretty complex representation in the text format:
# HELP http_request_duration_seconds A histogram of the request duration.
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.05"} 24054
http_request_duration_seconds_bucket{le="+Inf"} 144320
http_request_duration_seconds_sum 53423
http_request_duration_seconds_count 144320

# Finally a summary, which has a complex representation, too:
# HELP rpc_duration_seconds A summary of the RPC duration in seconds.
# TYPE rpc_duration_seconds summary
rpc_duration_seconds{quantile="0.01"} 3102
rpc_duration_seconds{quantile="0.5"} 4773
rpc_duration_seconds_sum 1.7560473e+07
rpc_duration_seconds_count 2693
# TYPE g gauge
g{a="x",} NaN
g { b = "y" } -Inf
"#;

    #[test]
    fn golden_exposition() {
        let e = parse(GOLDEN);
        assert_eq!(e.bad_lines, 0, "{:?}", e.errors);
        assert!(!e.truncated);
        let lines: Vec<String> = e.samples.iter().map(Sample::render).collect();
        assert_eq!(
            lines,
            vec![
                r#"http_requests_total{method="post",code="200"} 1027.0 1395066363000"#,
                r#"http_requests_total{method="post",code="400"} 3.0 1395066363000"#,
                r#"msdos_file_access_time_seconds{path="C:\\DIR\\FILE.TXT",error="Cannot find file:\n\"FILE.TXT\""} 1458255915.0"#,
                "metric_without_timestamp_and_labels 12.47",
                r#"something_weird{problem="division by zero"} +Inf -3982045"#,
                r#"http_request_duration_seconds_bucket{le="0.05"} 24054.0"#,
                r#"http_request_duration_seconds_bucket{le="+Inf"} 144320.0"#,
                "http_request_duration_seconds_sum 53423.0",
                "http_request_duration_seconds_count 144320.0",
                r#"rpc_duration_seconds{quantile="0.01"} 3102.0"#,
                r#"rpc_duration_seconds{quantile="0.5"} 4773.0"#,
                "rpc_duration_seconds_sum 17560473.0",
                "rpc_duration_seconds_count 2693.0",
                r#"g{a="x"} NaN"#,
                r#"g{b="y"} -Inf"#,
            ]
        );
        assert_eq!(
            e.samples[2].labels,
            vec![
                ("path".to_string(), r"C:\DIR\FILE.TXT".to_string()),
                (
                    "error".to_string(),
                    "Cannot find file:\n\"FILE.TXT\"".to_string()
                ),
            ]
        );
        assert!(e.samples[13].value.is_nan());
        for (name, kind) in [
            ("http_requests_total", ValueKind::Counter),
            ("http_request_duration_seconds_bucket", ValueKind::Counter),
            ("http_request_duration_seconds_sum", ValueKind::Counter),
            ("http_request_duration_seconds_count", ValueKind::Counter),
            ("rpc_duration_seconds", ValueKind::Gauge),
            ("rpc_duration_seconds_sum", ValueKind::Counter),
            ("rpc_duration_seconds_count", ValueKind::Counter),
            ("metric_without_timestamp_and_labels", ValueKind::Gauge),
            ("g", ValueKind::Gauge),
        ] {
            assert_eq!(e.value_kind(name), kind, "{name}");
        }
    }

    #[test]
    fn counter_declared_without_total_suffix() {
        let e = parse("# TYPE foo counter\nfoo_total 3\n");
        assert_eq!(e.value_kind("foo_total"), ValueKind::Counter);
        let e = parse("# TYPE foo gauge\nfoo_total 3\nfoo_bucket 1\n");
        assert_eq!(e.value_kind("foo_total"), ValueKind::Gauge);
        assert_eq!(e.value_kind("foo_bucket"), ValueKind::Gauge);
    }

    #[test]
    fn bad_lines_are_counted_and_located() {
        let text = "ok 1\n9bad 1\nx{a=1} 2\nx{a=\"1\" 2\nx{a=\"1 2\nx\nx abc\nx 1 2.5\nx 1 2 3\nx{=\"a\"} 1\nok2 2\r\n";
        let e = parse(text);
        assert_eq!(e.samples.len(), 2);
        assert_eq!(e.samples[1].name, "ok2");
        assert_eq!(e.bad_lines, 9);
        let kinds: Vec<(usize, LineErrorKind)> =
            e.errors.iter().map(|er| (er.line, er.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (2, LineErrorKind::Name),
                (3, LineErrorKind::LabelSyntax),
                (4, LineErrorKind::LabelSeparator),
                (5, LineErrorKind::UnterminatedValue),
                (6, LineErrorKind::MissingValue),
                (7, LineErrorKind::Value),
                (8, LineErrorKind::Timestamp),
                (9, LineErrorKind::Trailing),
            ]
        );
        assert_eq!(e.errors[0].to_string(), "line 2: invalid metric name");
    }

    #[test]
    fn limits_bound_the_output() {
        let text = "a 1\n".repeat(100);
        let limits = ParseLimits {
            max_samples: 10,
            max_labels: 2,
            max_errors_kept: 1,
            max_types: 1,
        };
        let e = parse_with(&text, &limits);
        assert_eq!(e.samples.len(), 10);
        assert!(e.truncated);
        let e = parse_with(
            "x{a=\"1\",b=\"2\",c=\"3\"} 1\n# TYPE a gauge\n# TYPE b counter\n",
            &limits,
        );
        assert_eq!(e.errors[0].kind, LineErrorKind::TooManyLabels);
        assert_eq!(e.types.len(), 1);
    }

    #[test]
    fn unicode_and_odd_escapes_in_values() {
        let e = parse("m{a=\"ünï\\tcode\\\\\"} 1\n");
        assert_eq!(e.samples[0].labels[0].1, "ünï\\tcode\\");
    }

    fn label() -> impl Strategy<Value = (String, String)> {
        ("[a-zA-Z_][a-zA-Z0-9_]{0,8}", "\\PC{0,12}")
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,400}") {
            let e = parse(&s);
            prop_assert!(e.samples.len() + e.bad_lines <= s.split('\n').count());
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let s = String::from_utf8_lossy(&b);
            let _ = parse(&s);
        }

        #[test]
        fn near_miss_lines_never_panic(s in "[a-z_{}=\",\\\\ \\t0-9.+#-]{0,80}") {
            let _ = parse(&s);
        }

        #[test]
        fn rendered_samples_parse_back(
            name in "[a-zA-Z_:][a-zA-Z0-9_:]{0,12}",
            labels in proptest::collection::vec(label(), 0..4),
            value in any::<f64>(),
            ts in proptest::option::of(any::<i64>()),
        ) {
            let s = Sample { name, labels, value, timestamp_ms: ts };
            let e = parse(&s.render());
            prop_assert_eq!(e.bad_lines, 0, "{:?} {}", e.errors, s.render());
            prop_assert_eq!(e.samples.len(), 1);
            let got = &e.samples[0];
            prop_assert_eq!(&got.name, &s.name);
            prop_assert_eq!(&got.labels, &s.labels);
            prop_assert_eq!(got.timestamp_ms, s.timestamp_ms);
            prop_assert!(got.value == s.value || (got.value.is_nan() && s.value.is_nan()));
        }
    }
}
