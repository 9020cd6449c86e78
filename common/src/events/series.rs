//! Series identity: the key `name{label="value",…}` that names a series everywhere (patterns,
//! events, output).

use std::fmt;
use std::sync::Arc;

/// The identity of one series: metric name plus labels sorted by name, rendered as in the
/// exposition format (`stockade_nbd_requests_total{op="read",volume="vol-1"}`). Cheap to clone.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    text: Arc<str>,
    name_len: usize,
    /// The metric family: the name without a histogram's or summary's `_bucket`, `_sum` or
    /// `_count`, and the labels without `le` and `quantile`.
    family: Arc<str>,
}

impl SeriesKey {
    /// A key from a name and labels (in any order; they are sorted, values escaped).
    pub fn new(name: &str, labels: &[(String, String)]) -> Self {
        let mut sorted: Vec<&(String, String)> = labels.iter().collect();
        sorted.sort();
        let mut text = String::with_capacity(
            name.len()
                + labels
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 4)
                    .sum::<usize>()
                + 2,
        );
        text.push_str(name);
        if !sorted.is_empty() {
            text.push('{');
            for (i, (k, v)) in sorted.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                text.push_str(k);
                text.push_str("=\"");
                escape_label_value(v, &mut text);
                text.push('"');
            }
            text.push('}');
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|sfx| name.strip_suffix(sfx))
            .unwrap_or(name);
        let family = if base.len() == name.len()
            && !sorted.iter().any(|(k, _)| k == "le" || k == "quantile")
        {
            text.clone()
        } else {
            let rest: Vec<(String, String)> = sorted
                .iter()
                .filter(|(k, _)| k != "le" && k != "quantile")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Self::new(base, &rest).text.to_string()
        };
        Self {
            text: text.into(),
            name_len: name.len(),
            family: family.into(),
        }
    }

    /// The metric family this series is part of (the series itself, unless it is a
    /// histogram's or summary's bucket, quantile, sum or count): series of one family move
    /// together by construction, so they are never paired.
    pub fn family(&self) -> &str {
        &self.family
    }

    /// A key for a series without labels.
    pub fn named(name: &str) -> Self {
        Self::new(name, &[])
    }

    /// The whole key.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The metric name (for a Prometheus expression without one, the expression).
    pub fn name(&self) -> &str {
        self.text.get(..self.name_len).unwrap_or_default()
    }
}

impl fmt::Display for SeriesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for SeriesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.text)
    }
}

/// Appends `v` escaped as a label value of the text format: `\` → `\\`, `"` → `\"`, newline →
/// `\n`.
pub fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// How raw values of a series turn into the values that are correlated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Used as is (gauges, untyped samples, summary quantiles, Prometheus query results).
    Gauge,
    /// A cumulative counter (counters, histogram `_bucket`/`_sum`/`_count`, summary
    /// `_sum`/`_count`): turned into a per-second rate between consecutive samples; a decrease
    /// is a reset, and the increase across it is the new value (as Prometheus' `rate`).
    Counter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_labels_and_escape_values() {
        let k = SeriesKey::new(
            "m",
            &[
                ("z".into(), "1".into()),
                ("a".into(), "say \"hi\"\\\n".into()),
            ],
        );
        assert_eq!(k.as_str(), r#"m{a="say \"hi\"\\\n",z="1"}"#);
        assert_eq!(k.name(), "m");
        assert_eq!(SeriesKey::named("up").as_str(), "up");
        let expr = SeriesKey::new("rate(x{a=\"b\"}[1m])", &[("i".into(), "h".into())]);
        assert_eq!(expr.name(), "rate(x{a=\"b\"}[1m])");
    }
}
