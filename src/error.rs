//! Errors: [`QuotaError`] and [`ConfigError`] when something is built, [`StoreError`] when a
//! store cannot decide.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// A quota that cannot be built. Each message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaError {
    /// The limit is 0.
    #[error("a quota's limit must be at least 1 request per period")]
    ZeroLimit,
    /// The period is 0.
    #[error("a quota's period must be longer than zero")]
    ZeroPeriod,
    /// The capacity is 0.
    #[error("a quota's capacity must be at least 1 (it is the most requests admitted at once)")]
    ZeroCapacity,
    /// A divisor of 0 was given to [`Quota::divided`](crate::Quota::divided).
    #[error("a quota can only be divided by 1 or more servers")]
    ZeroDivisor,
    /// The period is not a whole number of microseconds.
    #[error("period {period:?} is not a whole number of microseconds; round it")]
    SubMicrosecondPeriod {
        /// The period given.
        period: Duration,
    },
    /// More than one request per microsecond.
    #[error(
        "{limit} requests per {period:?} is faster than one request per microsecond; \
         use a longer period or a smaller limit"
    )]
    TooFast {
        /// The limit given.
        limit: u32,
        /// The period given.
        period: Duration,
    },
    /// `capacity × period / limit` is over 100 years, or the period does not fit.
    #[error(
        "the quota with period {period:?} takes over 100 years to refill from empty; \
         use a smaller capacity or a shorter period"
    )]
    TooLong {
        /// The period given.
        period: Duration,
    },
    /// The text is not a quota.
    #[error(
        "{input:?} is not a quota: write LIMIT/PERIOD such as \"60/m\", \"10/s\", \"1000/h\", \
         \"5/30s\", optionally followed by \";capacity=N\" (or nginx's \";burst=B\", which is capacity B + 1)"
    )]
    Parse {
        /// The text given (at most 64 characters of it).
        input: String,
    },
}

/// A layer or store configuration that cannot be built. Each message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A quota was invalid.
    #[error(transparent)]
    Quota(#[from] QuotaError),
    /// The rejection status is outside 400..=599.
    #[error("the status for limited requests must be a 4xx or 5xx code, not {0}")]
    Status(u16),
    /// The policy name cannot be sent in a header.
    #[error(
        "policy name {0:?} must be 1 to 64 characters of letters, digits and - _ . : (it is sent \
         in RateLimit headers and used in store keys)"
    )]
    PolicyName(String),
    /// The body of the rejection cannot be used.
    #[error("the rejection content type {0:?} is not a valid header value")]
    ContentType(String),
    /// `max_keys` of 0.
    #[error("max_keys must be at least 1")]
    ZeroMaxKeys,
    /// An IPv6 prefix length outside 1..=128.
    #[error("an IPv6 prefix length must be between 1 and 128, not {0}")]
    Ipv6Prefix(u8),
    /// A header name that is not a valid HTTP header name.
    #[error("{0:?} is not a valid HTTP header name")]
    HeaderName(String),
    /// A trusted proxy range that does not parse.
    #[error("{0:?} is not an IP network: write it as 10.0.0.0/8, 192.168.1.7 or fd00::/8")]
    Cidr(String),
    /// A layer's policy has the name of one the store already has, with other quotas: the two
    /// would share their clients' state.
    #[error(
        "policy {name:?} is already used on this store with {known}, and this layer gives it \
         {new}; give this layer another name with .policy(\"...\"), or the same quotas to \
         share the limit on purpose"
    )]
    PolicyConflict {
        /// The policy name.
        name: String,
        /// The quotas the store knows under the name.
        known: String,
        /// The quotas of the layer being built.
        new: String,
    },
    /// A second layer without a policy name was built on a store that already has one, so both
    /// would be policy `"default"` and share their clients' state.
    #[error(
        "this store already serves a layer without a policy name (policy \"default\"); name \
         each layer of a shared store with .policy(\"...\") (or name this one \"default\" to \
         share that layer's limit on purpose)"
    )]
    UnnamedPolicy,
    /// A tier name the layer does not have.
    #[error("the layer has no tier {name:?}; its tiers are {known}")]
    UnknownTier {
        /// The name given.
        name: String,
        /// The layer's tiers, comma-separated.
        known: String,
    },
    /// Anything else, with a message saying what to change.
    #[error("{0}")]
    Invalid(String),
}

/// What went wrong in a store. Match on [`StoreError::kind`] or use the predicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store could not be reached (connection refused, reset, DNS).
    Connection,
    /// The store did not answer within its timeout.
    Timeout,
    /// The store is busy (a Redis `BUSY` script) or loading.
    Busy,
    /// The store is out of memory (Redis `OOM`).
    OutOfMemory,
    /// Keys of one decision landed in different cluster slots (Redis `CROSSSLOT`).
    CrossSlot,
    /// The store answered something that cannot be a decision.
    UnexpectedReply,
    /// The store refused the command (any other server error).
    Server,
    /// A [`CircuitBreaker`](crate::CircuitBreaker) is open after repeated failures, so the store
    /// was not called at all; the layer's fail mode decides at once.
    CircuitOpen,
    /// The store was unusable for another reason.
    Other,
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connection => "connection failed",
            Self::Timeout => "timed out",
            Self::Busy => "busy",
            Self::OutOfMemory => "out of memory",
            Self::CrossSlot => "keys in different cluster slots",
            Self::UnexpectedReply => "unexpected reply",
            Self::Server => "server error",
            Self::CircuitOpen => "circuit breaker open",
            Self::Other => "failed",
        })
    }
}

/// A store could not decide. The layer's [`FailMode`](crate::FailMode) then decides instead.
#[derive(Debug, Clone, thiserror::Error)]
#[error("rate-limit store {kind}: {message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    #[source]
    source: Option<std::sync::Arc<dyn StdError + Send + Sync>>,
}

impl StoreError {
    /// A new error of `kind`, with a message for operators.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// The same error, keeping `source` as its cause.
    #[must_use]
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(std::sync::Arc::new(source));
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The store did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == StoreErrorKind::Timeout
    }

    /// The store could not be reached.
    pub fn is_connection(&self) -> bool {
        self.kind == StoreErrorKind::Connection
    }
}
