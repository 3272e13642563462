//! tower_governor 0.8, the peer layer for axum, configured like the benchmarks' tollgate layers
//! (its default key, the peer IP from axum's `ConnectInfo<SocketAddr>`), so that benches and
//! `examples/bench_server.rs` measure it beside them.

use axum::Router;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;

/// How the peer is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Governor {
    /// A cell per microsecond and a burst no run exhausts: every request admitted.
    Plain,
    /// The same with `use_headers()`: `x-ratelimit-*` headers on every response.
    Headers,
    /// One request an hour: every request after the first denied.
    Denied,
}

/// `router` behind tower_governor configured as `mode`.
pub(crate) fn governor(router: Router, mode: Governor) -> Router {
    let mut config = GovernorConfigBuilder::default();
    if mode == Governor::Denied {
        config
            .period(std::time::Duration::from_secs(3600))
            .burst_size(1);
    } else {
        config.per_nanosecond(1_000).burst_size(1_000_000_000);
    }
    if mode == Governor::Headers {
        let config = config
            .use_headers()
            .finish()
            .unwrap_or_else(|| panic!("tower_governor config"));
        router.layer(GovernorLayer::new(config))
    } else {
        let config = config
            .finish()
            .unwrap_or_else(|| panic!("tower_governor config"));
        router.layer(GovernorLayer::new(config))
    }
}
