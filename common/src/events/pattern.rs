//! Glob patterns that choose series: `--watch` (allow-list) and `--ignore` (deny-list).
//!
//! `*` matches any run of characters (including none) and `?` exactly one; everything else is
//! literal. A pattern that mentions labels — it contains `{`, `}`, `=` or `"` — is matched
//! against the whole series key `name{label="value",…}`, whose labels are sorted by name and
//! whose values are quoted and escaped as in the exposition format (`*volume="vol-1"*`); any
//! other pattern is matched against the metric name alone (`stockade_nbd_*`).

use super::series::SeriesKey;
use std::fmt;
use std::str::FromStr;

/// Longest accepted pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1024;

/// A pattern that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    /// The pattern is empty.
    #[error("empty series pattern")]
    Empty,
    /// The pattern is longer than [`MAX_PATTERN_BYTES`].
    #[error("series pattern is {len} bytes long; the limit is {MAX_PATTERN_BYTES}")]
    TooLong {
        /// Its length.
        len: usize,
    },
}

/// One glob pattern over series.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    whole_key: bool,
}

impl Pattern {
    /// Parses a pattern.
    pub fn new(text: &str) -> Result<Self, PatternError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.len() > MAX_PATTERN_BYTES {
            return Err(PatternError::TooLong { len: text.len() });
        }
        Ok(Self {
            text: text.to_string(),
            whole_key: text.contains(['{', '}', '=', '"']),
        })
    }

    /// Whether the series matches.
    pub fn matches(&self, key: &SeriesKey) -> bool {
        let subject = if self.whole_key {
            key.as_str()
        } else {
            key.name()
        };
        glob(self.text.as_bytes(), subject.as_bytes())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Pattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.text)
    }
}

/// Whether any pattern matches.
pub fn any_match(patterns: &[Pattern], key: &SeriesKey) -> bool {
    patterns.iter().any(|p| p.matches(key))
}

/// Iterative glob matching with single-star backtracking: O(pattern × subject) at worst, no
/// recursion. `?` matches one byte; patterns and keys in practice are ASCII, and a `?` against a
/// multi-byte character simply needs one `?` per byte.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi.min(p.len())..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(name: &str, labels: &[(&str, &str)]) -> SeriesKey {
        let l: Vec<(String, String)> = labels
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        SeriesKey::new(name, &l)
    }

    #[test]
    fn globs() {
        assert!(glob(b"abc", b"abc"));
        assert!(!glob(b"abc", b"abcd"));
        assert!(glob(b"a*", b"abcd"));
        assert!(glob(b"*d", b"abcd"));
        assert!(glob(b"a*c*", b"abcd"));
        assert!(glob(b"a?c?", b"abcd"));
        assert!(!glob(b"a?c", b"abcd"));
        assert!(glob(b"*", b""));
        assert!(glob(b"**", b"x"));
        assert!(!glob(b"x", b""));
        assert!(glob(b"*a*a*a*a*b", b"aaaaaaaaaaaaaaaaaaaaaaaab"));
        assert!(!glob(b"*a*a*a*a*b", b"aaaaaaaaaaaaaaaaaaaaaaaaa"));
    }

    #[test]
    fn name_patterns_ignore_labels_and_key_patterns_see_them() {
        let k = key(
            "stockade_nbd_requests_total",
            &[("volume", "vol-1"), ("op", "read")],
        );
        assert_eq!(
            k.as_str(),
            r#"stockade_nbd_requests_total{op="read",volume="vol-1"}"#
        );
        assert!(Pattern::new("stockade_nbd_*").unwrap().matches(&k));
        assert!(
            Pattern::new("stockade_nbd_requests_total")
                .unwrap()
                .matches(&k)
        );
        assert!(!Pattern::new("stockade_sled_*").unwrap().matches(&k));
        assert!(Pattern::new(r#"*{op="read"*"#).unwrap().matches(&k));
        assert!(!Pattern::new(r#"*{op="write"*"#).unwrap().matches(&k));
        assert!(Pattern::new(r#"*volume="vol-?"}"#).unwrap().matches(&k));
    }

    #[test]
    fn bad_patterns() {
        assert_eq!(Pattern::new("  "), Err(PatternError::Empty));
        assert!(matches!(
            Pattern::new(&"a".repeat(2000)),
            Err(PatternError::TooLong { len: 2000 })
        ));
    }

    proptest! {
        #[test]
        fn star_matches_everything_and_literal_matches_itself(s in "[a-z_{}=\",]{0,40}") {
            prop_assert!(glob(b"*", s.as_bytes()));
            let lit: String = s.chars().filter(|c| *c != '*' && *c != '?').collect();
            prop_assert!(glob(lit.as_bytes(), lit.as_bytes()));
        }

        #[test]
        fn glob_never_panics(p in ".{0,30}", s in ".{0,60}") {
            let _ = glob(p.as_bytes(), s.as_bytes());
        }
    }
}
