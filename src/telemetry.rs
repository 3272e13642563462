//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`): the
//! application installs the exporter it wants (Prometheus, OpenTelemetry through a bridge,
//! statsd) and tollgate reports into it. Names and labels follow ASP.NET Core's rate-limiting
//! convention (`policy` and `result`):
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `tollgate_requests_total` | counter | `policy`, `result` | each request once, by how it ended: `allowed`, `delayed`, `denied`, `dry_run_denied`, `unlimited`, `fail_open`, `fail_closed`, `fallback_allowed`, `fallback_denied`, `unidentified` |
//! | `tollgate_request_delay_seconds` | histogram | `policy` | how long delayed requests waited ([`Builder::delay_after`](crate::Builder::delay_after)) |
//! | `tollgate_store_duration_seconds` | histogram | `store`, `outcome` | how long a store took to decide, for stores that answer through a future (Redis): `outcome` is `ok` or the error kind |
//! | `tollgate_store_errors_total` | counter | `store`, `kind` | store failures, by [`StoreErrorKind`] |
//! | `tollgate_deny_cache_hits_total` | counter | | denials answered by a [`DenyCache`](crate::DenyCache) without the store |
//! | `tollgate_breaker_state` | gauge | `store` | a [`CircuitBreaker`](crate::CircuitBreaker)'s state: 0 closed, 1 half-open, 2 open |
//! | `tollgate_breaker_transitions_total` | counter | `store`, `to` | its changes of state |
//! | `tollgate_store_clock_offset_seconds` | gauge | `store` | Redis's clock minus this server's, measured by [`Store::health`](crate::Store::health); never used for decisions |
//! | `tollgate_memory_keys` | gauge | | the states a [`MemoryStore`](crate::MemoryStore) holds, after each sweep |
//! | `tollgate_memory_evictions_total` | counter | `reason` | states a sweep removed: `fresh` (changes no decision) or `capacity` (not yet fresh, removed at `max_keys`: many of these mean `max_keys` is too small) |
//!
//! `policy` is the layer's policy, or for a layer of tiers the tier that decided. No label
//! ever holds a client's identity or anything a client chooses: every label set is bounded by
//! the configuration (policies, tiers, stores, error kinds), however many clients there are.
//!
//! The layer registers its metrics when it is built, so **install the recorder before
//! building layers**; a layer built before has no-op metrics. Without the feature (or without
//! a recorder) nothing is measured and the hot path pays for no clock read.

#[cfg(feature = "metrics")]
use std::time::Instant;

use crate::error::StoreErrorKind;
use crate::store::Policy;

/// How a request ended, for `tollgate_requests_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Allowed,
    Delayed,
    Denied,
    DryRunDenied,
    Unlimited,
    FailOpen,
    FailClosed,
    FallbackAllowed,
    FallbackDenied,
    Unidentified,
}

impl Outcome {
    #[cfg(feature = "metrics")]
    const ALL: [Outcome; 10] = [
        Self::Allowed,
        Self::Delayed,
        Self::Denied,
        Self::DryRunDenied,
        Self::Unlimited,
        Self::FailOpen,
        Self::FailClosed,
        Self::FallbackAllowed,
        Self::FallbackDenied,
        Self::Unidentified,
    ];

    /// The `result` label.
    #[cfg(feature = "metrics")]
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Delayed => "delayed",
            Self::Denied => "denied",
            Self::DryRunDenied => "dry_run_denied",
            Self::Unlimited => "unlimited",
            Self::FailOpen => "fail_open",
            Self::FailClosed => "fail_closed",
            Self::FallbackAllowed => "fallback_allowed",
            Self::FallbackDenied => "fallback_denied",
            Self::Unidentified => "unidentified",
        }
    }
}

/// The `kind` / `outcome` label of a store error.
#[cfg(feature = "metrics")]
pub(crate) const fn error_label(kind: StoreErrorKind) -> &'static str {
    match kind {
        StoreErrorKind::Connection => "connection",
        StoreErrorKind::Timeout => "timeout",
        StoreErrorKind::Busy => "busy",
        StoreErrorKind::OutOfMemory => "out_of_memory",
        StoreErrorKind::CrossSlot => "cross_slot",
        StoreErrorKind::UnexpectedReply => "unexpected_reply",
        StoreErrorKind::Server => "server",
        StoreErrorKind::CircuitOpen => "circuit_open",
        _ => "other",
    }
}

#[cfg(feature = "metrics")]
const ERROR_KINDS: [StoreErrorKind; 9] = [
    StoreErrorKind::Connection,
    StoreErrorKind::Timeout,
    StoreErrorKind::Busy,
    StoreErrorKind::OutOfMemory,
    StoreErrorKind::CrossSlot,
    StoreErrorKind::UnexpectedReply,
    StoreErrorKind::Server,
    StoreErrorKind::CircuitOpen,
    StoreErrorKind::Other,
];

/// One layer's metric handles, registered when the layer is built: one set per tier (policy),
/// and the store's.
#[derive(Default)]
pub(crate) struct LayerMetrics {
    #[cfg(feature = "metrics")]
    tiers: Box<[TierMetrics]>,
    #[cfg(feature = "metrics")]
    store: Option<StoreMetrics>,
}

#[cfg(feature = "metrics")]
struct TierMetrics {
    requests: [metrics::Counter; 10],
    delay: metrics::Histogram,
}

#[cfg(feature = "metrics")]
struct StoreMetrics {
    ok: metrics::Histogram,
    /// Per error kind, in `ERROR_KINDS` order: the duration histogram and the error counter.
    errors: Box<[(metrics::Histogram, metrics::Counter)]>,
}

/// When a store call began, for `tollgate_store_duration_seconds`: nothing without the
/// feature.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Started {
    #[cfg(feature = "metrics")]
    at: Option<Instant>,
}

impl LayerMetrics {
    /// Registers the metrics of `policies` (the layer's tiers) and of the store called `store`
    /// with the recorder installed now.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(policies: &[&Policy], store: &'static str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let tiers = policies
                .iter()
                .map(|p| {
                    let name = p.name().to_owned();
                    TierMetrics {
                        requests: Outcome::ALL.map(|o| {
                            metrics::counter!(
                                "tollgate_requests_total",
                                "policy" => name.clone(),
                                "result" => o.label()
                            )
                        }),
                        delay: metrics::histogram!(
                            "tollgate_request_delay_seconds",
                            "policy" => name.clone()
                        ),
                    }
                })
                .collect();
            let store = StoreMetrics {
                ok: metrics::histogram!(
                    "tollgate_store_duration_seconds",
                    "store" => store,
                    "outcome" => "ok"
                ),
                errors: ERROR_KINDS
                    .iter()
                    .map(|&kind| {
                        (
                            metrics::histogram!(
                                "tollgate_store_duration_seconds",
                                "store" => store,
                                "outcome" => error_label(kind)
                            ),
                            metrics::counter!(
                                "tollgate_store_errors_total",
                                "store" => store,
                                "kind" => error_label(kind)
                            ),
                        )
                    })
                    .collect(),
            };
            Self {
                tiers,
                store: Some(store),
            }
        }
        #[cfg(not(feature = "metrics"))]
        Self::default()
    }

    /// Counts one request of tier `tier`.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn request(&self, tier: usize, outcome: Outcome) {
        #[cfg(feature = "metrics")]
        if let Some(t) = self.tiers.get(tier) {
            t.requests[outcome as usize].increment(1);
        }
    }

    /// Records a delayed request's wait.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn delay(&self, tier: usize, wait: std::time::Duration) {
        #[cfg(feature = "metrics")]
        if let Some(t) = self.tiers.get(tier) {
            t.delay.record(wait.as_secs_f64());
        }
    }

    /// The start of a store call that answers through a future.
    #[inline]
    pub(crate) fn start(&self) -> Started {
        Started {
            #[cfg(feature = "metrics")]
            at: self.store.as_ref().map(|_| Instant::now()),
        }
    }

    /// The end of a store call begun at `started`: its duration and, for a failure, its kind.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn finish(&self, started: Started, error: Option<StoreErrorKind>) {
        #[cfg(feature = "metrics")]
        if let (Some(store), Some(at)) = (&self.store, started.at) {
            let secs = at.elapsed().as_secs_f64();
            match error {
                None => store.ok.record(secs),
                Some(kind) => {
                    let i = ERROR_KINDS.iter().position(|k| *k == kind).unwrap_or(8);
                    if let Some((duration, _)) = store.errors.get(i) {
                        duration.record(secs);
                    }
                }
            }
        }
    }

    /// Counts a store failure of `kind` (whether or not the call was timed).
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn store_error(&self, kind: StoreErrorKind) {
        #[cfg(feature = "metrics")]
        if let Some(store) = &self.store {
            let i = ERROR_KINDS.iter().position(|k| *k == kind).unwrap_or(8);
            if let Some((_, count)) = store.errors.get(i) {
                count.increment(1);
            }
        }
    }
}

/// Sets a gauge, for the stores' own metrics (breaker state, clock offset).
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn gauge(name: &'static str, store: &'static str, value: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(name, "store" => store).set(value);
}

/// Counts one event of the counter `name`, labelled `labels` (for rare events: the labels are
/// looked up each time).
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn count(name: &'static str, labels: &[(&'static str, &'static str)]) {
    #[cfg(feature = "metrics")]
    {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, *v))
            .collect();
        metrics::counter!(name, labels).increment(1);
    }
}

/// Adds `n` to the counter `name`, labelled `labels` (for rare events).
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn add(name: &'static str, labels: &[(&'static str, &'static str)], n: usize) {
    #[cfg(feature = "metrics")]
    if n > 0 {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, *v))
            .collect();
        metrics::counter!(name, labels).increment(n as u64);
    }
}

/// Sets the gauge `name`, without labels.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn gauge_unlabelled(name: &'static str, value: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(name).set(value);
}

/// A counter without labels, registered once (for frequent events).
#[derive(Clone, Default)]
pub(crate) struct CounterHandle {
    #[cfg(feature = "metrics")]
    counter: Option<metrics::Counter>,
}

impl CounterHandle {
    /// Registers `name` with the recorder installed now.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(name: &'static str) -> Self {
        Self {
            #[cfg(feature = "metrics")]
            counter: Some(metrics::counter!(name)),
        }
    }

    #[inline]
    pub(crate) fn increment(&self) {
        #[cfg(feature = "metrics")]
        if let Some(c) = &self.counter {
            c.increment(1);
        }
    }
}
