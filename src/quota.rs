//! [`Quota`]: how many requests per period, and how many at one instant.
//!
//! A quota is `limit` requests per `period`, with a `capacity`: the most requests admitted at
//! one instant by a client that has been idle. The default capacity is the limit. The GCRA
//! turns a quota into an *emission interval* `T = period / limit` (integer microseconds) and a
//! tolerance `capacity × T`.
//!
//! | other tool | its setting | tollgate |
//! |---|---|---|
//! | nginx `limit_req` | `rate=10r/s burst=b` | `10/s`, capacity `b + 1` |
//! | nginx Redis module | `requests=L period=P burst=b` | `L` per `P`, capacity `b + 1` |
//! | redis-cell | `CL.THROTTLE key b L P` | `L` per `P`, capacity `b + 1` |
//! | governor | `Quota::per_second(n).allow_burst(b)` | `n/s`, capacity `b` |
//!
//! ```
//! use std::time::Duration;
//! use tollgate::Quota;
//!
//! let q: Quota = "60/m".parse()?;
//! assert_eq!(q.limit(), 60);
//! assert_eq!(q.period(), Duration::from_secs(60));
//! assert_eq!(q.capacity(), 60);
//!
//! let bursty = Quota::per_second(10)?.with_capacity(20)?;
//! assert_eq!(bursty.emission_interval(), Duration::from_millis(100));
//! # Ok::<(), tollgate::QuotaError>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::QuotaError;

/// The longest `capacity × T` a quota may have: 100 years, in microseconds.
///
/// The bound keeps every timestamp (`now + capacity × T`) exactly representable in the
/// double-precision numbers of Redis Lua scripts (below 2^53 µs) for the next two centuries.
pub(crate) const MAX_TOLERANCE_MICROS: u64 = 100 * 365 * 24 * 3600 * 1_000_000;

/// A validated rate limit: `limit` requests per `period`, at most `capacity` at one instant.
///
/// Every `Quota` that exists is valid: zero limits, zero periods, zero capacity, rates faster
/// than one request per microsecond and tolerances over 100 years are rejected when the quota is
/// built, so nothing about a quota can fail at request time.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    limit: u32,
    period_micros: u64,
    capacity: u32,
    interval_micros: u64,
}

impl Quota {
    /// `limit` requests per `period`, capacity `limit`.
    ///
    /// # Errors
    /// [`QuotaError`] when the limit or period is zero, the period is not a whole number of
    /// microseconds, or the rate is faster than one request per microsecond.
    pub fn new(limit: u32, period: Duration) -> Result<Self, QuotaError> {
        if limit == 0 {
            return Err(QuotaError::ZeroLimit);
        }
        if period.is_zero() {
            return Err(QuotaError::ZeroPeriod);
        }
        if !period.subsec_nanos().is_multiple_of(1_000) {
            return Err(QuotaError::SubMicrosecondPeriod { period });
        }
        let period_micros =
            u64::try_from(period.as_micros()).map_err(|_| QuotaError::TooLong { period })?;
        let interval_micros = period_micros / u64::from(limit);
        if interval_micros == 0 {
            return Err(QuotaError::TooFast { limit, period });
        }
        Self::validated(limit, period_micros, limit, interval_micros)
    }

    /// `limit` requests per second.
    ///
    /// # Errors
    /// As [`Quota::new`].
    pub fn per_second(limit: u32) -> Result<Self, QuotaError> {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` requests per minute.
    ///
    /// # Errors
    /// As [`Quota::new`].
    pub fn per_minute(limit: u32) -> Result<Self, QuotaError> {
        Self::new(limit, Duration::from_secs(60))
    }

    /// `limit` requests per hour.
    ///
    /// # Errors
    /// As [`Quota::new`].
    pub fn per_hour(limit: u32) -> Result<Self, QuotaError> {
        Self::new(limit, Duration::from_secs(3600))
    }

    /// `limit` requests per day.
    ///
    /// # Errors
    /// As [`Quota::new`].
    pub fn per_day(limit: u32) -> Result<Self, QuotaError> {
        Self::new(limit, Duration::from_secs(86_400))
    }

    /// The same rate with a different capacity (burst): the most requests admitted at once.
    ///
    /// # Errors
    /// [`QuotaError::ZeroCapacity`] for 0, [`QuotaError::TooLong`] when `capacity × T` exceeds
    /// 100 years.
    pub fn with_capacity(self, capacity: u32) -> Result<Self, QuotaError> {
        if capacity == 0 {
            return Err(QuotaError::ZeroCapacity);
        }
        Self::validated(
            self.limit,
            self.period_micros,
            capacity,
            self.interval_micros,
        )
    }

    /// A quota for one of `divisor` servers sharing this one: limit and capacity divided by
    /// `divisor` (never below 1), same period. Used by the fallback limiter.
    ///
    /// # Errors
    /// [`QuotaError::ZeroDivisor`] for 0.
    pub fn divided(self, divisor: u32) -> Result<Self, QuotaError> {
        if divisor == 0 {
            return Err(QuotaError::ZeroDivisor);
        }
        let limit = (self.limit / divisor).max(1);
        let capacity = (self.capacity / divisor).max(1);
        let interval_micros = self.period_micros / u64::from(limit);
        Self::validated(limit, self.period_micros, capacity, interval_micros)
    }

    fn validated(
        limit: u32,
        period_micros: u64,
        capacity: u32,
        interval_micros: u64,
    ) -> Result<Self, QuotaError> {
        match interval_micros.checked_mul(u64::from(capacity)) {
            Some(tolerance) if tolerance <= MAX_TOLERANCE_MICROS => Ok(Self {
                limit,
                period_micros,
                capacity,
                interval_micros,
            }),
            _ => Err(QuotaError::TooLong {
                period: Duration::from_micros(period_micros),
            }),
        }
    }

    /// Requests per period.
    pub const fn limit(&self) -> u32 {
        self.limit
    }

    /// The period the limit applies to.
    pub const fn period(&self) -> Duration {
        Duration::from_micros(self.period_micros)
    }

    /// The most requests admitted at one instant from idle.
    pub const fn capacity(&self) -> u32 {
        self.capacity
    }

    /// `T = period / limit`: the time one request "costs" at the sustained rate.
    pub const fn emission_interval(&self) -> Duration {
        Duration::from_micros(self.interval_micros)
    }

    pub(crate) const fn interval_micros(&self) -> u64 {
        self.interval_micros
    }
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quota")
            .field("limit", &self.limit)
            .field("period", &self.period())
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Formats as the string [`FromStr`] accepts, with `;capacity=N` when it differs from the limit.
impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.period_micros;
        write!(f, "{}/", self.limit)?;
        const UNITS: [(u64, &str); 4] = [
            (86_400_000_000, "d"),
            (3_600_000_000, "h"),
            (60_000_000, "m"),
            (1_000_000, "s"),
        ];
        match UNITS.iter().find(|(unit, _)| p.is_multiple_of(*unit)) {
            Some((unit, name)) if p == *unit => f.write_str(name)?,
            Some((unit, name)) => write!(f, "{}{name}", p / unit)?,
            None if p.is_multiple_of(1_000) => write!(f, "{}ms", p / 1_000)?,
            None => write!(f, "{p}us")?,
        }
        if self.capacity != self.limit {
            write!(f, ";capacity={}", self.capacity)?;
        }
        Ok(())
    }
}

/// Parses `"<limit>/<period>"`, e.g. `"60/m"`, `"10/s"`, `"1000/h"`, `"5/30s"`, `"2/500ms"`,
/// optionally followed by `";capacity=<n>"` (the most requests admitted at one instant) or
/// `";burst=<b>"` with nginx's meaning: `b` requests *beyond* the first, so `burst=b` is
/// capacity `b + 1` (nginx `limit_req burst=5` admits 6 at once from idle).
///
/// ```
/// use tollgate::Quota;
///
/// let q: Quota = "10/s;burst=5".parse()?;
/// assert_eq!(q.capacity(), 6);
/// assert_eq!(q, "10/s;capacity=6".parse()?);
/// # Ok::<(), tollgate::QuotaError>(())
/// ```
///
/// Units: `us`, `ms`, `s`/`sec`, `m`/`min`, `h`/`hour`, `d`/`day`; a number before the unit
/// multiplies it.
impl FromStr for Quota {
    type Err = QuotaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || QuotaError::Parse {
            input: s.chars().take(64).collect(),
        };
        let (rate, capacity) = match s.split_once(';') {
            Some((rate, extra)) => {
                let (name, value) = extra.trim().split_once('=').ok_or_else(bad)?;
                let value = value.trim().parse::<u32>().map_err(|_| bad())?;
                let capacity = match name.trim() {
                    "capacity" => value,
                    // nginx: `burst` requests beyond the first.
                    "burst" => value.checked_add(1).ok_or_else(bad)?,
                    _ => return Err(bad()),
                };
                (rate, Some(capacity))
            }
            None => (s, None),
        };
        let (limit, period) = rate.trim().split_once('/').ok_or_else(bad)?;
        let limit: u32 = limit.trim().parse().map_err(|_| bad())?;
        let period = period.trim();
        let split = period.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (count, unit) = period.split_at(split);
        let count: u64 = if count.is_empty() {
            1
        } else {
            count.parse().map_err(|_| bad())?
        };
        let unit_micros: u64 = match unit {
            "us" => 1,
            "ms" => 1_000,
            "s" | "sec" => 1_000_000,
            "m" | "min" => 60_000_000,
            "h" | "hour" => 3_600_000_000,
            "d" | "day" => 86_400_000_000,
            _ => return Err(bad()),
        };
        let micros = count.checked_mul(unit_micros).ok_or_else(bad)?;
        let quota = Quota::new(limit, Duration::from_micros(micros))?;
        match capacity {
            Some(c) => quota.with_capacity(c),
            None => Ok(quota),
        }
    }
}

#[cfg(feature = "serde")]
mod serde_impl {
    use super::Quota;
    use serde::Deserialize;
    use serde::de::{self, Deserializer, MapAccess, Visitor};
    use std::fmt;

    /// Deserializes from a string (`"60/m"`, `"10/s;capacity=20"`) or a table
    /// `{ rate = "10/s", capacity = 20 }`.
    impl<'de> Deserialize<'de> for Quota {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct QuotaVisitor;
            impl<'de> Visitor<'de> for QuotaVisitor {
                type Value = Quota;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a quota such as \"60/m\" or { rate = \"10/s\", capacity = 20 }")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Quota, E> {
                    v.parse().map_err(E::custom)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Quota, A::Error> {
                    let mut rate: Option<String> = None;
                    let mut capacity: Option<u32> = None;
                    while let Some(k) = map.next_key::<String>()? {
                        match k.as_str() {
                            "rate" => rate = Some(map.next_value()?),
                            "capacity" => capacity = Some(map.next_value()?),
                            // nginx's meaning: requests beyond the first.
                            "burst" => {
                                let burst: u32 = map.next_value()?;
                                capacity = Some(burst.checked_add(1).ok_or_else(|| {
                                    de::Error::custom(
                                        "burst is too large; write capacity = N instead",
                                    )
                                })?);
                            }
                            other => {
                                return Err(de::Error::unknown_field(
                                    other,
                                    &["rate", "capacity", "burst"],
                                ));
                            }
                        }
                    }
                    let rate = rate.ok_or_else(|| de::Error::missing_field("rate"))?;
                    let quota: Quota = rate.parse().map_err(de::Error::custom)?;
                    match capacity {
                        Some(c) => quota.with_capacity(c).map_err(de::Error::custom),
                        None => Ok(quota),
                    }
                }
            }
            d.deserialize_any(QuotaVisitor)
        }
    }

    impl serde::Serialize for Quota {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let cases = [
            ("60/m", 60, 60, 60),
            ("10/s", 10, 1, 10),
            ("1000/h", 1000, 3600, 1000),
            ("5/30s", 5, 30, 5),
            ("7/d", 7, 86_400, 7),
            ("10/s;capacity=25", 10, 1, 25),
            (" 3 / 2min ; burst = 1", 3, 120, 2),
            ("10/s;burst=5", 10, 1, 6),
            ("10/s;burst=0", 10, 1, 1),
        ];
        for (input, limit, secs, capacity) in cases {
            let q: Quota = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(q.limit(), limit, "{input}");
            assert_eq!(q.period(), Duration::from_secs(secs), "{input}");
            assert_eq!(q.capacity(), capacity, "{input}");
        }
        let q: Quota = "2/500ms".parse().unwrap();
        assert_eq!(q.emission_interval(), Duration::from_millis(250));
    }

    #[test]
    fn rejects_invalid_quotas_with_typed_errors() {
        assert_eq!("0/s".parse::<Quota>(), Err(QuotaError::ZeroLimit));
        assert_eq!("5/0s".parse::<Quota>(), Err(QuotaError::ZeroPeriod));
        assert_eq!(
            "5/s;capacity=0".parse::<Quota>(),
            Err(QuotaError::ZeroCapacity)
        );
        assert!(matches!(
            "2000000/s".parse::<Quota>(),
            Err(QuotaError::TooFast { .. })
        ));
        assert!(matches!(
            Quota::new(1, Duration::from_secs(365 * 24 * 3600))
                .unwrap()
                .with_capacity(1000),
            Err(QuotaError::TooLong { .. })
        ));
        assert!(matches!(
            Quota::new(1, Duration::from_nanos(1500)),
            Err(QuotaError::SubMicrosecondPeriod { .. })
        ));
        for junk in [
            "",
            "/",
            "5",
            "x/s",
            "5/",
            "5/fortnight",
            "5/s;cap=3",
            "99999999999/s",
        ] {
            assert!(
                matches!(junk.parse::<Quota>(), Err(QuotaError::Parse { .. })),
                "{junk:?}"
            );
        }
        assert!(matches!(
            "1/18446744073709551615d".parse::<Quota>(),
            Err(QuotaError::Parse { .. })
        ));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "60/m",
            "10/s",
            "1000/h",
            "5/30s",
            "7/d",
            "10/s;capacity=25",
            "2/500ms",
        ] {
            let q: Quota = s.parse().unwrap();
            assert_eq!(q.to_string(), s);
            assert_eq!(q.to_string().parse::<Quota>().unwrap(), q);
        }
    }

    #[test]
    fn divided_never_reaches_zero() {
        let q: Quota = "10/s;capacity=20".parse().unwrap();
        let d = q.divided(3).unwrap();
        assert_eq!((d.limit(), d.capacity()), (3, 6));
        let tiny = q.divided(100).unwrap();
        assert_eq!((tiny.limit(), tiny.capacity()), (1, 1));
        assert_eq!(q.divided(0), Err(QuotaError::ZeroDivisor));
    }
}
