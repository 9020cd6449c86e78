//! Human-readable sizes and durations for configuration files and the CLI.
//!
//! Sizes accept a plain number of bytes or a number with a unit: `K`/`KiB`, `M`/`MiB`,
//! `G`/`GiB`, `T`/`TiB` are powers of 1024 (a block store deals in binary units; `KB`, `MB`,
//! `GB` and `TB` are accepted as the same binary units, as `dd` and `qemu-img` do). Durations use
//! humantime (`250ms`, `2s`, `1m 30s`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A size in bytes that reads and prints with binary units.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// Error parsing a size or a duration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    /// Not a size.
    #[error(
        "invalid size {0:?}: use a number of bytes or a number with a unit, like 512MiB or 10G"
    )]
    Size(String),
    /// The size does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
    /// Not a duration.
    #[error("invalid duration {0:?}: use a number with a unit, like 250ms or 2s")]
    Duration(String),
}

impl ByteSize {
    /// Bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let shift = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            "p" | "pb" | "pib" => 50,
            _ => return Err(UnitError::Size(s.to_string())),
        };
        if num.is_empty() {
            return Err(UnitError::Size(s.to_string()));
        }
        if let Ok(n) = num.parse::<u64>() {
            return n
                .checked_mul(1u64 << shift)
                .map(ByteSize)
                .ok_or_else(|| UnitError::Overflow(s.to_string()));
        }
        // Fractions such as 1.5G: allowed, rounded down to a byte.
        let f: f64 = num.parse().map_err(|_| UnitError::Size(s.to_string()))?;
        let v = f * (1u64 << shift) as f64;
        if !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 {
            return Err(UnitError::Overflow(s.to_string()));
        }
        Ok(ByteSize(v as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 5] = [
            ("PiB", 50),
            ("TiB", 40),
            ("GiB", 30),
            ("MiB", 20),
            ("KiB", 10),
        ];
        for (name, shift) in UNITS {
            let unit = 1u64 << shift;
            if self.0 >= unit {
                if self.0.is_multiple_of(unit) {
                    return write!(f, "{}{name}", self.0 >> shift);
                }
                return write!(f, "{:.1}{name}", self.0 as f64 / unit as f64);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self} ({} bytes)", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            s.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Parses a humantime duration (`250ms`, `2s`).
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(s.trim()).map_err(|_| UnitError::Duration(s.to_string()))
}

/// Serde adapter for durations written as humantime text: `#[serde(with = "common::units::duration")]`.
pub mod duration {
    use super::*;

    /// Serializes as humantime text.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Deserializes humantime text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        for (s, v) in [
            ("4096", 4096),
            ("10G", 10 << 30),
            ("512MiB", 512 << 20),
            ("1.5G", 3 << 29),
            ("64 mib", 64 << 20),
            ("1k", 1024),
            ("0", 0),
        ] {
            assert_eq!(s.parse::<ByteSize>().unwrap().0, v, "{s}");
        }
        for s in ["", "G", "10X", "-1G", "abc", "1.2.3M"] {
            assert!(s.parse::<ByteSize>().is_err(), "{s}");
        }
        assert!(matches!(
            "99999999P".parse::<ByteSize>(),
            Err(UnitError::Overflow(_))
        ));
    }

    #[test]
    fn sizes_print() {
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1.5GiB");
        assert_eq!(ByteSize(100).to_string(), "100B");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("fast").is_err());
    }
}
