//! The Sentinel backend: the connection to whichever server the sentinels name as the primary,
//! replaced when a failover names another.
//!
//! The store keeps one `ConnectionManager` to the current primary, as a URL store does. A
//! decision that fails with a connection error, a timeout (its future dropped by the command
//! timeout included) or `READONLY` (the server was demoted to a replica) asks the sentinels again in the background, at most once per
//! [`RESOLVE_INTERVAL`]; when they name another primary, the next decisions go there. Requests
//! never wait for the sentinels: until the new primary is known they fail fast and the layer's
//! fail mode applies.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::SentinelClient;
use redis::{Cmd, ConnectionAddr, Value};

use super::errors;
use crate::error::{StoreError, StoreErrorKind};

/// The shortest time between two lookups of the primary.
pub(super) const RESOLVE_INTERVAL: Duration = Duration::from_millis(100);

/// The primary the sentinels named last, and the sentinels to ask again.
pub(super) struct Follower {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    primary: RwLock<Option<Primary>>,
    resolving: AtomicBool,
    last_resolve: std::sync::Mutex<Option<Instant>>,
    config: ConnectionManagerConfig,
    connect_timeout: Duration,
}

struct Primary {
    addr: ConnectionAddr,
    manager: ConnectionManager,
}

impl Follower {
    pub(super) fn new(
        sentinels: SentinelClient,
        config: ConnectionManagerConfig,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            sentinels: tokio::sync::Mutex::new(sentinels),
            primary: RwLock::new(None),
            resolving: AtomicBool::new(false),
            last_resolve: std::sync::Mutex::new(None),
            config,
            connect_timeout,
        })
    }

    /// The primary's address (`host:port`), once the sentinels have named one.
    pub(super) fn primary_addr(&self) -> Option<String> {
        let guard = self.primary.read().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|p| p.addr.to_string())
    }

    /// `cmd` on the current primary (see `super::query` for `reload`). A failure that may mean
    /// a failover starts a lookup of the primary in the background.
    pub(super) async fn query(
        self: &Arc<Self>,
        cmd: &Cmd,
        reload: Option<&Cmd>,
    ) -> Result<Value, StoreError> {
        let manager = {
            let guard = self.primary.read().unwrap_or_else(|e| e.into_inner());
            guard.as_ref().map(|p| p.manager.clone())
        };
        let Some(mut manager) = manager else {
            self.kick();
            return Err(StoreError::new(
                StoreErrorKind::Connection,
                "no Redis primary known yet: the sentinels have not named one (asking again \
                 in the background)",
            ));
        };
        // Armed while the command runs: a decision whose command timeout ends first drops this
        // future, and that timeout must start a lookup as an error reply does.
        let mut guard = KickOnDrop {
            follower: self,
            armed: true,
        };
        let result = super::query(&mut manager, cmd, reload).await;
        guard.armed = result.as_ref().is_err_and(|e| {
            matches!(
                e.kind(),
                StoreErrorKind::Connection | StoreErrorKind::Timeout
            )
        });
        result
    }

    /// Starts a lookup of the primary unless one runs already.
    pub(super) fn kick(self: &Arc<Self>) {
        // A decision's future may be dropped outside the runtime (at shutdown): no lookup then.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.resolving.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        runtime.spawn(async move {
            let wait = {
                let last = this.last_resolve.lock().unwrap_or_else(|e| e.into_inner());
                last.map_or(Duration::ZERO, |t| {
                    RESOLVE_INTERVAL.saturating_sub(t.elapsed())
                })
            };
            tokio::time::sleep(wait).await;
            if let Err(e) = this.resolve().await {
                tracing::debug!(
                    target: "tollgate::store",
                    error = %e,
                    "the sentinels named no reachable Redis primary; asking again on the next failure"
                );
            }
            this.resolving.store(false, Ordering::Release);
        });
    }

    /// Asks the sentinels for the primary (each named primary is checked with `ROLE`) and, if
    /// it is another server than the current one, switches to it. Bounded by the connect
    /// timeout.
    pub(super) async fn resolve(&self) -> Result<(), StoreError> {
        let found = tokio::time::timeout(self.connect_timeout, async {
            let mut sentinels = self.sentinels.lock().await;
            sentinels.async_get_client().await
        })
        .await;
        *self.last_resolve.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let client = match found {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(errors::store_error(e)),
            Err(_) => return Err(errors::timeout(self.connect_timeout)),
        };
        let addr = client.get_connection_info().addr().clone();
        if self.primary_addr().as_deref() == Some(addr.to_string().as_str()) {
            return Ok(());
        }
        let manager = ConnectionManager::new_lazy_with_config(client, self.config.clone())
            .map_err(errors::store_error)?;
        let previous = self
            .primary
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Primary {
                addr: addr.clone(),
                manager,
            });
        match previous {
            Some(old) => tracing::warn!(
                target: "tollgate::store",
                from = %old.addr,
                to = %addr,
                "Redis Sentinel failover: decisions now go to the new primary"
            ),
            None => tracing::info!(
                target: "tollgate::store",
                primary = %addr,
                "Redis Sentinel named the primary"
            ),
        }
        Ok(())
    }
}

/// Starts a lookup of the primary when dropped armed.
struct KickOnDrop<'a> {
    follower: &'a Arc<Follower>,
    armed: bool,
}

impl Drop for KickOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.follower.kick();
        }
    }
}
