//! The units of the configuration: durations (`500ms`, `60s`, `5m`, `24h`, `7d`, `1h30m`;
//! a bare number is seconds) and sizes (`65536`, `64KiB`, `1MB`, `10GB`).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

/// A duration written like the seed's: `500ms`, `60s`, `5m`, `24h`, `7d`, or combined
/// (`1h30m`); a bare number means seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }
    pub fn as_millis_i64(self) -> i64 {
        i64::try_from(self.0.as_millis()).unwrap_or(i64::MAX)
    }

    pub fn parse(s: &str) -> Result<Dur, String> {
        let expected = || format!("invalid duration {s:?}: expected a number with a unit, such as 500ms, 60s, 5m, 24h or 7d");
        let t = s.trim();
        if t.is_empty() {
            return Err(expected());
        }
        if let Ok(n) = t.parse::<u64>() {
            return Ok(Dur::secs(n));
        }
        let mut total: u128 = 0;
        let mut rest = t;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            if digits == 0 {
                return Err(expected());
            }
            let n: u128 = rest[..digits].parse().map_err(|_| expected())?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let unit_ms: u128 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(expected()),
            };
            rest = &rest[unit_len..];
            total = total.checked_add(n.checked_mul(unit_ms).ok_or_else(expected)?).ok_or_else(expected)?;
        }
        let ms = u64::try_from(total).map_err(|_| expected())?;
        Ok(Dur(Duration::from_millis(ms)))
    }
}

/// In the largest units that say it exactly, as an operator writes it: `30d`, `1h30m`,
/// `90s` as `1m30s`, `1500ms` as `1s500ms`, `0s`. [`Dur::parse`] reads it back.
impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Dur::parse(&s).map_err(de::Error::custom),
            Value::Number(n) => n.as_u64().map(Dur::secs).ok_or_else(|| {
                de::Error::custom(format!("invalid duration {n}: expected a whole number of seconds or a value such as 60s"))
            }),
            _ => Err(de::Error::custom("expected a duration such as 500ms, 60s, 5m, 24h or 7d")),
        }
    }
}

/// A size in bytes: a number, or with a unit (`64KiB`, `1MB`, `10GB`; KB/MB/GB are 1000-based,
/// KiB/MiB/GiB 1024-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let expected = || format!("invalid size {s:?}: expected bytes, or a number with a unit such as 64KiB, 1MB, 10GB");
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        if digits == 0 {
            return Err(expected());
        }
        let n: u64 = t[..digits].parse().map_err(|_| expected())?;
        let mult: u64 = match t[digits..].trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(expected()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(expected)
    }
}

/// With the unit it was most likely written in: `64KiB`, `10GB`; bytes when no unit
/// divides it. [`ByteSize::parse`] reads it back.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in
            [("GiB", 1u64 << 30), ("GB", 1_000_000_000), ("MiB", 1 << 20), ("MB", 1_000_000), ("KiB", 1 << 10), ("KB", 1_000)]
        {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => ByteSize::parse(&s).map_err(de::Error::custom),
            Value::Number(n) => n.as_u64().map(ByteSize).ok_or_else(|| de::Error::custom("expected a whole number of bytes")),
            _ => Err(de::Error::custom("expected a size such as 65536 or 64KiB")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(Dur::parse("500ms").unwrap(), Dur::millis(500));
        assert_eq!(Dur::parse("3600s").unwrap(), Dur::secs(3600));
        assert_eq!(Dur::parse("1h30m").unwrap(), Dur::secs(5400));
        assert_eq!(Dur::parse("7d").unwrap(), Dur::secs(7 * 86400));
        assert_eq!(Dur::parse("15").unwrap(), Dur::secs(15));
        for bad in ["", "s", "5x", "-5s", "1.5s", "99999999999999999999999h"] {
            assert!(Dur::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ByteSize::parse("16KiB").unwrap(), ByteSize(16384));
        assert_eq!(ByteSize::parse("1GB").unwrap(), ByteSize(1_000_000_000));
        assert!(ByteSize::parse("1TB").is_err());
    }

    #[test]
    fn durations_and_sizes_print_readably_and_read_back() {
        for (d, text) in [
            (Dur::secs(30 * 86400), "30d"),
            (Dur::secs(5400), "1h30m"),
            (Dur::secs(90), "1m30s"),
            (Dur::millis(1500), "1s500ms"),
            (Dur::millis(100), "100ms"),
            (Dur::secs(0), "0s"),
            (Dur::secs(86400 + 1), "1d1s"),
        ] {
            assert_eq!(d.to_string(), text);
            assert_eq!(Dur::parse(text).unwrap(), d, "{text} reads back");
        }
        for (b, text) in [(1 << 30, "1GiB"), (10_000_000_000, "10GB"), (65536, "64KiB"), (1_000_000, "1MB"), (1000, "1KB"), (1500, "1500")]
        {
            assert_eq!(ByteSize(b).to_string(), text);
            assert_eq!(ByteSize::parse(text).unwrap(), ByteSize(b), "{text} reads back");
        }
    }
}
