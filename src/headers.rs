//! Rate-limit header fields: IETF draft-ietf-httpapi-ratelimit-headers-10
//! `RateLimit` / `RateLimit-Policy`, legacy `X-RateLimit-*`, and `Retry-After`.
//!
//! | style | fields |
//! |---|---|
//! | [`HeaderStyle::Ietf`] (default) | `RateLimit-Policy: "default";q=60;w=60` and `RateLimit: "default";r=59;t=1` |
//! | [`HeaderStyle::Legacy`] | `X-RateLimit-Limit: 60`, `X-RateLimit-Remaining: 59`, `X-RateLimit-Reset: 1` |
//! | [`HeaderStyle::Both`] | all of the above |
//! | [`HeaderStyle::None`] | none (a 429 still carries `Retry-After`) |
//!
//! `q` is the quota's limit and `w` its period in seconds (rounded up); `r` is the remaining
//! requests and `t` the seconds until one more is available (rounded up). Stacked layers add
//! their members to the same two fields in the order the layers ran, so one `RateLimit` list
//! reports every policy. The legacy fields can carry only one policy: they report the one with
//! the fewest requests remaining. `X-RateLimit-Reset` is the seconds until the client is back
//! at full capacity, or that instant as Unix epoch seconds with [`ResetStyle::Epoch`].
//! Integers are clamped to 15 digits, the limit of structured-field Integers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{Entry, OccupiedEntry};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::Quota;
use crate::decision::{Decision, Outcome};
use crate::store::Policy;

/// `RateLimit` (IETF draft-10).
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `RateLimit-Policy` (IETF draft-10).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `X-RateLimit-Limit` (legacy).
pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining` (legacy).
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset` (legacy).
pub static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// `X-RateLimit-Degraded: fallback | fail-open | fail-closed`: the store failed and the fail
/// mode decided (sent only when the layer enables it).
pub static X_RATELIMIT_DEGRADED: HeaderName = HeaderName::from_static("x-ratelimit-degraded");

/// The largest structured-field Integer: 15 digits.
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// Which rate-limit fields responses carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum HeaderStyle {
    /// IETF draft-10 `RateLimit` and `RateLimit-Policy` (the default).
    #[default]
    Ietf,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    Legacy,
    /// Both sets.
    Both,
    /// No rate-limit fields (denials still carry `Retry-After`).
    None,
}

impl HeaderStyle {
    fn ietf(self) -> bool {
        matches!(self, Self::Ietf | Self::Both)
    }

    fn legacy(self) -> bool {
        matches!(self, Self::Legacy | Self::Both)
    }
}

impl std::str::FromStr for HeaderStyle {
    type Err = crate::ConfigError;

    /// `ietf`, `legacy`, `both` or `none`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ietf" => Ok(Self::Ietf),
            "legacy" => Ok(Self::Legacy),
            "both" => Ok(Self::Both),
            "none" => Ok(Self::None),
            other => Err(crate::ConfigError::Invalid(format!(
                "header style {other:?} is not one of ietf, legacy, both, none"
            ))),
        }
    }
}

/// How `X-RateLimit-Reset` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ResetStyle {
    /// Seconds from now (the default; needs no clock agreement with the client).
    #[default]
    Delta,
    /// Unix epoch seconds, as GitHub and X send it.
    Epoch,
}

/// Whether `headers` name a gRPC message: a `content-type` that starts with
/// `application/grpc`, compared without regard to case.
#[inline]
pub(crate) fn is_grpc_content(headers: &HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    let Some(ct) = headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let bytes = ct.as_bytes();
    // Other content types almost always differ in the first byte: settle those without the
    // byte-by-byte comparison (on every response of a layer with a refund rule).
    matches!(bytes.first(), Some(b'a' | b'A'))
        && bytes
            .get(..GRPC.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(GRPC))
}

/// Seconds, rounded up, clamped to 15 digits.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    secs.min(SF_INTEGER_MAX)
}

/// A quota's `q` and `w` for `RateLimit-Policy`, whose window is whole seconds: the smallest
/// whole-second window that holds a whole number of the quota's periods, with `q` scaled to
/// it, so that `q / w` is the quota's rate exactly (`5/500ms` is `q=10;w=1`, `1/1500ms` is
/// `q=2;w=3`, `60/m` is `q=60;w=60`). A period that would need a window over a thousand times
/// its own length (a period of odd microseconds) is rounded up to whole seconds instead.
fn policy_numbers(quota: &Quota) -> (u64, u64) {
    const SECOND: u128 = 1_000_000;
    let limit = u128::from(quota.limit());
    let period = quota.period().as_micros().max(1);
    let mut g = (period, SECOND);
    while g.1 != 0 {
        g = (g.1, g.0 % g.1);
    }
    let (window, q) = (period / g.0, limit * (SECOND / g.0));
    let rounded = u128::from(ceil_secs(quota.period()).max(1));
    match (u64::try_from(window), u64::try_from(q)) {
        (Ok(w), Ok(q)) if u128::from(w) <= rounded * 1000 && q <= SF_INTEGER_MAX => (q, w),
        _ => (
            u64::from(quota.limit()).min(SF_INTEGER_MAX),
            u64::try_from(rounded).unwrap_or(SF_INTEGER_MAX),
        ),
    }
}

/// Precomputed per-policy parts of the fields.
#[derive(Debug, Clone)]
pub(crate) struct PolicyFields {
    /// `"name";q=L;w=W`, one member per quota, joined.
    policy_member: String,
    /// The same, ready to insert without allocating.
    policy_value: HeaderValue,
    /// `"name";r=` per quota, where `"name"` is the policy's name, or for a policy of several
    /// quotas `"name-<quota>"` (e.g. `"api-10/s"`, `"api-1000/d"`).
    member_prefixes: Vec<Box<[u8]>>,
    /// For a single-quota policy, the `RateLimit` member of its most frequent decision, built
    /// once: one request admitted from a fresh state, as every request of a client well under
    /// its limit is. Used whenever a decision's `(r, t)` match.
    fresh_member: Option<((u64, u64), HeaderValue)>,
}

impl PolicyFields {
    pub(crate) fn new(policy: &Policy) -> Self {
        let quotas = policy.quotas();
        let quoted_names: Vec<String> = if quotas.len() == 1 {
            vec![format!("\"{}\"", policy.name())]
        } else {
            quotas
                .iter()
                .map(|q| format!("\"{}-{q}\"", policy.name()))
                .collect()
        };
        let policy_member = quoted_names
            .iter()
            .zip(quotas)
            .map(|(name, quota)| {
                let (q, w) = policy_numbers(quota);
                format!("{name};q={q};w={w}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let member_prefixes: Vec<Box<[u8]>> = quoted_names
            .iter()
            .map(|name| format!("{name};r=").into_bytes().into_boxed_slice())
            .collect();
        let fresh_member = match (member_prefixes.as_slice(), quotas) {
            ([prefix], [quota]) => {
                let fresh = Decision::new(Outcome::Allowed, quota, quota.interval_micros(), 0);
                let numbers = member_numbers(&fresh);
                HeaderValue::from_maybe_shared(Bytes::from(single_member(prefix, numbers)))
                    .ok()
                    .map(|value| (numbers, value))
            }
            _ => None,
        };
        Self {
            // Printable ASCII only: validated policy names and digits.
            policy_value: HeaderValue::from_str(&policy_member)
                .unwrap_or_else(|_| HeaderValue::from_static("\"invalid\";q=0")),
            policy_member,
            member_prefixes,
            fresh_member,
        }
    }
}

/// Adds this layer's fields to `headers` (after any inner layer added its own).
pub(crate) fn apply(
    headers: &mut HeaderMap,
    style: HeaderStyle,
    reset: ResetStyle,
    fields: &PolicyFields,
    decision: &Decision,
) {
    if style.ietf() {
        match headers.entry(&RATELIMIT_POLICY) {
            Entry::Vacant(slot) => {
                slot.insert(fields.policy_value.clone());
            }
            Entry::Occupied(slot) => prepend_member(slot, fields.policy_member.as_bytes()),
        }
        match headers.entry(&RATELIMIT) {
            Entry::Vacant(slot) => {
                // Printable ASCII only (validated names, digits), so this cannot fail.
                if let Some(v) = member_value(fields, decision) {
                    slot.insert(v);
                }
            }
            Entry::Occupied(slot) => match prebuilt_member(fields, decision) {
                Some(v) => prepend_member(slot, v.as_bytes()),
                None => prepend_member(slot, &ratelimit_member(fields, decision)),
            },
        }
    }
    if style.legacy() {
        let remaining = u64::from(decision.remaining());
        let tighter_inside = headers
            .get(&X_RATELIMIT_REMAINING)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|inner| inner <= remaining);
        if !tighter_inside {
            let reset = match reset {
                ResetStyle::Delta => ceil_secs(decision.reset_after()),
                ResetStyle::Epoch => {
                    let at = SystemTime::now() + decision.reset_after();
                    ceil_secs(at.duration_since(UNIX_EPOCH).unwrap_or_default())
                }
            };
            headers.insert(
                X_RATELIMIT_LIMIT.clone(),
                int_value(u64::from(decision.capacity())),
            );
            headers.insert(X_RATELIMIT_REMAINING.clone(), int_value(remaining));
            headers.insert(X_RATELIMIT_RESET.clone(), int_value(reset));
        }
    }
}

/// This layer's `RateLimit` value: the prebuilt one when the decision matches it, else built.
fn member_value(fields: &PolicyFields, decision: &Decision) -> Option<HeaderValue> {
    if let ([prefix], [d]) = (fields.member_prefixes.as_slice(), decision.per_quota()) {
        // One quota, the usual case: its numbers are worked out once, for both uses.
        let numbers = member_numbers(d);
        if let Some((fresh, value)) = &fields.fresh_member
            && *fresh == numbers
        {
            return Some(value.clone());
        }
        return HeaderValue::from_maybe_shared(Bytes::from(single_member(prefix, numbers))).ok();
    }
    HeaderValue::from_maybe_shared(Bytes::from(ratelimit_member(fields, decision))).ok()
}

/// The prebuilt member, when `decision` is exactly the one it was built for.
fn prebuilt_member<'a>(fields: &'a PolicyFields, decision: &Decision) -> Option<&'a HeaderValue> {
    match (&fields.fresh_member, decision.per_quota()) {
        (Some((numbers, value)), [d]) if member_numbers(d) == *numbers => Some(value),
        _ => None,
    }
}

/// A quota's `r` (remaining, clamped to 15 digits) and `t` (seconds until one more unit,
/// rounded up).
fn member_numbers(d: &Decision) -> (u64, u64) {
    let (remaining, next_micros) = d.remaining_and_next_micros();
    let t = next_micros.div_ceil(1_000_000).min(SF_INTEGER_MAX);
    (u64::from(remaining).min(SF_INTEGER_MAX), t)
}

/// `prefix` + `r;t=t` in exactly as many bytes as they take: the digits are written once, on
/// the stack, and then copied after the prefix.
fn single_member(prefix: &[u8], (r, t): (u64, u64)) -> Vec<u8> {
    let (mut r_digits, mut t_digits) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (r, t) = (r_digits.format(r).as_bytes(), t_digits.format(t).as_bytes());
    let mut member = Vec::with_capacity(prefix.len() + r.len() + b";t=".len() + t.len());
    member.extend_from_slice(prefix);
    member.extend_from_slice(r);
    member.extend_from_slice(b";t=");
    member.extend_from_slice(t);
    member
}

fn member_len(prefix: &[u8], (r, t): (u64, u64)) -> usize {
    prefix.len() + decimal_len(r) + b";t=".len() + decimal_len(t)
}

fn write_member(member: &mut Vec<u8>, prefix: &[u8], (r, t): (u64, u64)) {
    let mut digits = itoa::Buffer::new();
    member.extend_from_slice(prefix);
    member.extend_from_slice(digits.format(r).as_bytes());
    member.extend_from_slice(b";t=");
    member.extend_from_slice(digits.format(t).as_bytes());
}

/// This layer's `RateLimit` list members, one per quota (`"name";r=R;t=T`), in exactly as many
/// bytes as they take, so that the header value is made from them without a copy.
fn ratelimit_member(fields: &PolicyFields, decision: &Decision) -> Vec<u8> {
    if let ([prefix], [d]) = (fields.member_prefixes.as_slice(), decision.per_quota()) {
        // One quota, the usual case: its numbers are worked out once.
        return single_member(prefix, member_numbers(d));
    }
    let members = fields.member_prefixes.iter().zip(decision.per_quota());
    let len: usize = members
        .clone()
        .map(|(prefix, d)| member_len(prefix, member_numbers(d)))
        .sum::<usize>()
        + b", ".len() * decision.per_quota().len().saturating_sub(1);
    let mut member = Vec::with_capacity(len);
    for (prefix, d) in members {
        if !member.is_empty() {
            member.extend_from_slice(b", ");
        }
        write_member(&mut member, prefix, member_numbers(d));
    }
    member
}

/// How many decimal digits `n` takes.
pub(crate) fn decimal_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// Every integer below 1000 written back to back (`0123456789101112…999`): header values of
/// small integers borrow their text from here instead of allocating it.
static SMALL_INTS: [u8; SMALL_INTS_LEN] = small_ints();
const SMALL_INTS_LEN: usize = 10 + 90 * 2 + 900 * 3;

const fn small_ints() -> [u8; SMALL_INTS_LEN] {
    let mut out = [0u8; SMALL_INTS_LEN];
    let mut n = 0;
    let mut at = 0;
    while n < 1000 {
        if n >= 100 {
            out[at] = b'0' + (n / 100) as u8;
            at += 1;
        }
        if n >= 10 {
            out[at] = b'0' + (n / 10 % 10) as u8;
            at += 1;
        }
        out[at] = b'0' + (n % 10) as u8;
        at += 1;
        n += 1;
    }
    out
}

/// `n` (clamped to 15 digits) as a header value; below 1000 without allocating, above in one
/// allocation of exactly its digits.
pub(crate) fn int_value(n: u64) -> HeaderValue {
    let n = n.min(SF_INTEGER_MAX);
    if let Ok(small) = usize::try_from(n)
        && small < 1000
    {
        let (start, len) = match small {
            0..=9 => (small, 1),
            10..=99 => (10 + (small - 10) * 2, 2),
            _ => (190 + (small - 100) * 3, 3),
        };
        if let Some(text) = SMALL_INTS
            .get(start..start + len)
            .and_then(|digits| std::str::from_utf8(digits).ok())
        {
            return HeaderValue::from_static(text);
        }
    }
    // Digits only, so this cannot fail; one exact-size allocation (`From<u64>` makes two).
    HeaderValue::from_str(itoa::Buffer::new().format(n)).unwrap_or_else(|_| HeaderValue::from(n))
}

/// Puts `member` first in the list field `name`, joining every existing line into one list,
/// so the field reads in the order the layers ran (outermost first).
fn prepend_member(mut slot: OccupiedEntry<'_, HeaderValue>, member: &[u8]) {
    let mut value = ValueBuf::new();
    value.push(member);
    for existing in slot.iter() {
        value.push(b", ");
        value.push(existing.as_bytes());
    }
    // Our parts are printable ASCII and existing values were valid header values, so this
    // cannot fail. `insert` replaces every line of the field with the joined one.
    if let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
        slot.insert(v);
    }
}

/// A header value under construction: on the stack while short (the usual case), on the heap
/// past that, so that building it costs no allocation of its own.
struct ValueBuf {
    stack: [u8; 192],
    len: usize,
    heap: Vec<u8>,
}

impl ValueBuf {
    fn new() -> Self {
        Self {
            stack: [0; 192],
            len: 0,
            heap: Vec::new(),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.heap.is_empty() && self.len + bytes.len() <= self.stack.len() {
            self.stack[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            if self.heap.is_empty() {
                self.heap.extend_from_slice(&self.stack[..self.len]);
            }
            self.heap.extend_from_slice(bytes);
        }
    }

    fn as_bytes(&self) -> &[u8] {
        if self.heap.is_empty() {
            &self.stack[..self.len]
        } else {
            &self.heap
        }
    }
}

/// `Retry-After` in whole seconds, rounded up, never 0.
pub(crate) fn retry_after_value(retry: Duration) -> HeaderValue {
    int_value(ceil_secs(retry).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Quota;

    #[test]
    fn ceil_never_rounds_down() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_micros(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::MAX), SF_INTEGER_MAX);
        assert_eq!(retry_after_value(Duration::from_millis(1)), "1");
    }

    #[test]
    fn integer_values_match_their_decimal_text() {
        for n in (0..1_200).chain([9_999, 10_000, u64::from(u32::MAX), SF_INTEGER_MAX]) {
            assert_eq!(int_value(n), n.to_string().as_str(), "{n}");
            assert_eq!(decimal_len(n), n.to_string().len(), "{n}");
        }
        assert_eq!(int_value(u64::MAX), SF_INTEGER_MAX.to_string().as_str());
    }

    #[test]
    fn ratelimit_members_fill_their_allocation_exactly() {
        use crate::decision::Outcome;
        let one = "10/s".parse::<Quota>().unwrap();
        let two = "1000000/d".parse::<Quota>().unwrap();
        let single = PolicyFields::new(&Policy::new("api", one).unwrap());
        let multi = PolicyFields::new(&Policy::multi("api", [one, two]).unwrap());
        let d1 = Decision::new(Outcome::Allowed, &one, 300_000, 0);
        let d2 = Decision::new(Outcome::Allowed, &two, 86_400_000_000, 0);
        let member = ratelimit_member(&single, &d1);
        assert_eq!(member, b"\"api\";r=7;t=1");
        assert_eq!(member.len(), member.capacity());
        let both = Decision::combined(d1.clone(), vec![d1, d2]);
        let member = ratelimit_member(&multi, &both);
        assert_eq!(
            String::from_utf8_lossy(&member),
            "\"api-10/s\";r=7;t=1, \"api-1000000/d\";r=0;t=1"
        );
        assert_eq!(member.len(), member.capacity());
    }

    #[test]
    fn the_prebuilt_member_is_exactly_the_built_one() {
        use crate::decision::Outcome;
        for quota in [
            "10/s",
            "1/d",
            "5/m;capacity=7",
            "1000000/s;capacity=1000000000",
        ] {
            let q = quota.parse::<Quota>().unwrap();
            let fields = PolicyFields::new(&Policy::new("api", q).unwrap());
            let tolerance = q.interval_micros() * u64::from(q.capacity());
            let mut prebuilt = 0;
            for used in (0..=8)
                .map(|i| tolerance / 8 * i)
                .chain([q.interval_micros()])
            {
                let d = Decision::new(Outcome::Allowed, &q, used, 0);
                let value = member_value(&fields, &d).unwrap();
                assert_eq!(
                    value.as_bytes(),
                    ratelimit_member(&fields, &d),
                    "{quota} {used}"
                );
                prebuilt += usize::from(prebuilt_member(&fields, &d).is_some());
            }
            // A fresh client's first request (used = T) takes the prebuilt value.
            assert!(prebuilt >= 1, "{quota}");
        }
        let (a, b) = (
            "10/s".parse::<Quota>().unwrap(),
            "100/m".parse::<Quota>().unwrap(),
        );
        let fields = PolicyFields::new(&Policy::multi("api", [a, b]).unwrap());
        assert!(fields.fresh_member.is_none());
    }

    #[test]
    fn policy_member_states_the_rate_exactly_in_whole_seconds() {
        for (quota, member) in [
            ("2/500ms", "q=4;w=1"),
            ("5/500ms", "q=10;w=1"),
            ("1/1500ms", "q=2;w=3"),
            ("60/m", "q=60;w=60"),
            ("10/s", "q=10;w=1"),
            ("3/250ms", "q=12;w=1"),
            ("7/2h", "q=7;w=7200"),
        ] {
            let p = Policy::new("fast", quota.parse::<Quota>().unwrap()).unwrap();
            assert_eq!(
                PolicyFields::new(&p).policy_member,
                format!("\"fast\";{member}"),
                "{quota}"
            );
        }
        // A period of odd microseconds: rounded up to whole seconds.
        let odd = Quota::new(1, std::time::Duration::from_micros(1_000_001)).unwrap();
        let p = Policy::new("odd", odd).unwrap();
        assert_eq!(PolicyFields::new(&p).policy_member, "\"odd\";q=1;w=2");
    }
}
