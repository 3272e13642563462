#![doc = include_str!("../../../docs/redis.md")]
//!
//! ## Example
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use tollgate::{FailMode, Quota, RateLimitLayer, key::ClientIp, store::redis::RedisStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // Succeeds even while Redis is down: the fail mode then decides until it is back.
//! let store = RedisStore::builder("redis://127.0.0.1:6380")
//!     .prefix("myapp")
//!     .command_timeout(Duration::from_millis(50))
//!     .build()
//!     .await?;
//! let layer = RateLimitLayer::builder(Quota::per_minute(60)?)
//!     .key(ClientIp::new())
//!     .store(store)
//!     .fail_mode(FailMode::Open)
//!     .build()?;
//! let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(layer);
//! # let _ = app;
//! # Ok(()) }
//! ```

mod adjust;
mod batch;
mod errors;
mod keys;
mod sentinel;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value};

pub use batch::{DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH_BYTES};
pub use errors::RedisConfigError;

use crate::decision::Decision;
use crate::error::StoreError;
use crate::gcra;
use crate::key::Key;
use crate::quota::Quota;
use crate::store::{Policy, Store};

/// The GCRA script, one source of truth with `lua/gcra.lua`: one decision over a policy's
/// 1 to [`Policy::MAX_QUOTAS`] quotas.
const GCRA_LUA: &str = include_str!("../../../lua/gcra.lua");

/// The longest Redis key the store writes: prefix (at most 64 bytes), `:{`, the 43-byte tag,
/// `}:`, policy name (at most 64 bytes).
pub const MAX_KEY_LEN: usize = keys::MAX_KEY_LEN;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "tollgate";

/// The default per-command timeout: no decision waits longer for Redis.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(50);

/// The default timeout of one connection attempt (made in the background; requests never wait
/// longer than the command timeout for it).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The future of [`RedisStore`]'s [`Store::check`]: boxed, `Send`, `'static`.
pub type RedisFuture = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send + 'static>>;

/// A [`Store`] in Redis: one limit shared by every app server that uses the same Redis (or
/// Redis Cluster) and prefix. See the [module docs](self) for the semantics.
///
/// Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    /// The policies layers were built with, so that two never share a name by accident.
    registry: crate::store::PolicyRegistry,
    prefix: Box<str>,
    command_timeout: Duration,
    script: redis::Script,
    /// `SCRIPT LOAD <gcra.lua>`, built once.
    load: Cmd,
    /// Group commit (`batch.rs`): `None` on a cluster, or with batching turned off.
    batcher: Option<batch::Batcher>,
}

enum Backend {
    Manager(ConnectionManager),
    Sentinel(Arc<sentinel::Follower>),
    Pool(deadpool_redis::Pool),
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Self::Manager(_) => "connection manager",
            Self::Sentinel(_) => "sentinel",
            Self::Pool(_) => "deadpool pool",
            #[cfg(feature = "redis-cluster")]
            Self::Cluster(_) => "cluster",
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("backend", &self.inner.backend.name())
            .field("prefix", &self.inner.prefix)
            .field("command_timeout", &self.inner.command_timeout)
            .finish()
    }
}

enum Source {
    Url(String),
    Info(Box<redis::ConnectionInfo>),
    Client(redis::Client),
    #[cfg(feature = "redis-tls")]
    Tls(String, redis::TlsCertificates),
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
    SentinelClient(Box<SentinelClient>),
    Pool(deadpool_redis::Pool),
    #[cfg(feature = "redis-cluster")]
    Cluster(Vec<String>),
}

/// Configures a [`RedisStore`]; made by [`RedisStore::builder`], [`RedisStore::from_client`],
/// [`RedisStore::from_connection_info`], [`RedisStore::sentinel_builder`],
/// [`RedisStore::from_sentinel_client`], [`RedisStore::from_pool`],
/// `RedisStore::builder_with_tls` (feature `redis-tls`) or `RedisStore::cluster_builder`
/// (feature `redis-cluster`).
#[must_use]
pub struct RedisStoreBuilder {
    source: Source,
    prefix: String,
    command_timeout: Duration,
    connect_timeout: Duration,
    require_connection: bool,
    max_batch: usize,
    max_batch_bytes: usize,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.source {
            Source::Url(_) => "url",
            Source::Info(_) => "connection info",
            Source::Client(_) => "client",
            #[cfg(feature = "redis-tls")]
            Source::Tls(..) => "url with TLS certificates",
            Source::Sentinel { .. } | Source::SentinelClient(_) => "sentinel",
            Source::Pool(_) => "pool",
            #[cfg(feature = "redis-cluster")]
            Source::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStoreBuilder")
            .field("source", &source)
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("require_connection", &self.require_connection)
            .field("max_batch", &self.max_batch)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .finish()
    }
}

impl RedisStore {
    /// A builder for a store on one Redis server at `url` (`redis://host:port[/db]`,
    /// `rediss://` needs the redis crate's TLS features). The store keeps one multiplexed,
    /// automatically reconnecting connection (redis-rs `ConnectionManager`), the faster of the
    /// two options measured (see the module docs).
    ///
    /// ACL users and the database index go in the URL:
    /// `redis://USER:PASSWORD@host:port/DB`. The password is never shown: not by `Debug`, not
    /// in errors, not in logs.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tollgate::store::redis::RedisStore;
    ///
    /// // Nothing listens on port 1: the store starts anyway, and its decisions fail (the
    /// // layer's fail mode applies) until Redis is reachable.
    /// let store = RedisStore::builder("redis://limiter:s3cret@127.0.0.1:1/2")
    ///     .prefix("myapp")
    ///     .build()
    ///     .await?;
    /// assert_eq!(store.prefix(), "myapp");
    /// assert!(!format!("{store:?}").contains("s3cret"));
    /// # Ok(()) }
    /// ```
    pub fn builder(url: &str) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Source::Url(url.to_owned()))
    }

    /// A builder for a store on the server a `redis::Client` points at, with everything the
    /// client was configured with (address, TLS certificates, ACL user, database, protocol).
    /// The store keeps its own `ConnectionManager` made from the client, as
    /// [`RedisStore::builder`] does.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tollgate::store::redis::RedisStore;
    ///
    /// let client = redis::Client::open("redis://127.0.0.1:1/0")?;
    /// let store = RedisStore::from_client(client).build().await?;
    /// assert!(store.ping().await.is_err(), "nothing listens on port 1");
    /// # Ok(()) }
    /// ```
    pub fn from_client(client: redis::Client) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Source::Client(client))
    }

    /// A builder for a store on the server `info` describes: address, ACL user and password,
    /// database index, as [`RedisStore::from_client`] with `redis::Client::open(info)`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};
    /// use tollgate::store::redis::RedisStore;
    ///
    /// let info = ConnectionAddr::Tcp("127.0.0.1".into(), 1)
    ///     .into_connection_info()?
    ///     .set_redis_settings(
    ///         RedisConnectionInfo::default()
    ///             .set_username("limiter")
    ///             .set_password("s3cret")
    ///             .set_db(3),
    ///     );
    /// let store = RedisStore::from_connection_info(info).build().await?;
    /// assert!(!format!("{store:?}").contains("s3cret"));
    /// # Ok(()) }
    /// ```
    pub fn from_connection_info(info: redis::ConnectionInfo) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Source::Info(Box::new(info)))
    }

    /// A builder for a store on a `rediss://` URL whose server certificate is checked against
    /// `certificates.root_cert` (a PEM CA, for a private CA) instead of the system's roots, and
    /// which may present a client certificate (`certificates.client_tls`, for
    /// `tls-auth-clients yes`). For a server with a publicly trusted certificate,
    /// [`RedisStore::builder`] with a `rediss://` URL is enough.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tollgate::store::redis::RedisStore;
    ///
    /// # let ca_pem = rcgen::generate_simple_self_signed(vec!["localhost".into()])?.cert.pem();
    /// let certificates = redis::TlsCertificates {
    ///     client_tls: None,
    ///     root_cert: Some(ca_pem.into_bytes()),
    /// };
    /// let store = RedisStore::builder_with_tls("rediss://localhost:1", certificates)
    ///     .build()
    ///     .await?;
    /// assert!(store.ping().await.is_err(), "nothing listens on port 1");
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "redis-tls")]
    pub fn builder_with_tls(url: &str, certificates: redis::TlsCertificates) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Source::Tls(url.to_owned(), certificates))
    }

    /// A builder for a store on the primary that Redis Sentinel names `master` (often
    /// `"mymaster"`), asking any of `sentinels` (`host:port`, or `redis://host:port` URLs, which
    /// may carry the sentinels' own user and password).
    ///
    /// The store follows failovers: when a decision fails with a connection error, a timeout
    /// or `READONLY` (the server it used was demoted), it asks the sentinels again in the
    /// background (at most every 100 ms) and moves to the primary they name. Decisions resume
    /// as soon as the sentinels have promoted a replica; meanwhile they fail fast and the fail
    /// mode applies. What a failover can lose is in the [module docs](self#redis-sentinel).
    /// For an ACL user, a database or TLS on the primary, build a
    /// `redis::sentinel::SentinelClient` and use [`RedisStore::from_sentinel_client`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tollgate::store::redis::RedisStore;
    ///
    /// // No sentinel listens on these ports: the store starts, knows no primary yet, and keeps
    /// // asking while decisions fail fast.
    /// let store = RedisStore::sentinel_builder(["127.0.0.1:1", "127.0.0.1:2"], "mymaster")
    ///     .build()
    ///     .await?;
    /// assert_eq!(store.sentinel_primary(), None);
    /// # Ok(()) }
    /// ```
    pub fn sentinel_builder<S: AsRef<str>>(
        sentinels: impl IntoIterator<Item = S>,
        master: &str,
    ) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Source::Sentinel {
            sentinels: sentinels
                .into_iter()
                .map(|s| s.as_ref().trim().to_owned())
                .collect(),
            master: master.to_owned(),
        })
    }

    /// A builder for a store on the primary a `redis::sentinel::SentinelClient` finds (built
    /// for `SentinelServerType::Master`): every setting of redis-rs's `SentinelClientBuilder`
    /// applies, such as ACL users, passwords and TLS for the sentinels and for the primary,
    /// and the database index. Follows failovers as [`RedisStore::sentinel_builder`] does.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use redis::ConnectionAddr;
    /// use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
    /// use tollgate::store::redis::RedisStore;
    ///
    /// let sentinels = [ConnectionAddr::Tcp("127.0.0.1".into(), 1)];
    /// let client = SentinelClientBuilder::new(sentinels, "mymaster", SentinelServerType::Master)?
    ///     .set_client_to_redis_username("limiter")
    ///     .set_client_to_redis_password("s3cret")
    ///     .set_client_to_redis_db(2)
    ///     .build()?;
    /// let store = RedisStore::from_sentinel_client(client).build().await?;
    /// assert_eq!(store.sentinel_primary(), None);
    /// # Ok(()) }
    /// ```
    pub fn from_sentinel_client(client: SentinelClient) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Source::SentinelClient(Box::new(client)))
    }

    /// For a Sentinel store, the `host:port` of the primary it sends decisions to now (`None`
    /// before the sentinels have named one, and for other stores).
    pub fn sentinel_primary(&self) -> Option<String> {
        match &self.inner.backend {
            Backend::Sentinel(follower) => follower.primary_addr(),
            _ => None,
        }
    }

    /// A builder for a store on connections from an existing `deadpool-redis` pool, for apps
    /// that already hold one. Each decision checks a connection out of the pool, which costs
    /// deadpool's recycle check (a `PING` round trip) on top of the script; prefer
    /// [`RedisStore::builder`] when you have the choice. The pool's own timeouts apply too, but
    /// the command timeout bounds the whole decision either way.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tollgate::store::redis::RedisStore;
    ///
    /// let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:1/0")
    ///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
    /// let store = RedisStore::from_pool(pool).build().await?;
    /// assert!(store.ping().await.is_err(), "nothing listens on port 1");
    /// # Ok(()) }
    /// ```
    pub fn from_pool(pool: deadpool_redis::Pool) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Source::Pool(pool))
    }

    /// A builder for a store on a Redis Cluster reached through any of `nodes` (URLs like
    /// `redis://10.0.0.1:7000`). Every client's keys carry the same hash tag, so each decision
    /// touches one slot on one primary.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tollgate::store::redis::RedisStore;
    ///
    /// // No cluster listens there: the store starts, and decisions fail until one does.
    /// let store = RedisStore::cluster_builder(["redis://127.0.0.1:1", "redis://127.0.0.1:2"])
    ///     .connect_timeout(Duration::from_millis(100))
    ///     .build()
    ///     .await?;
    /// assert!(store.ping().await.is_err());
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "redis-cluster")]
    pub fn cluster_builder<S: AsRef<str>>(nodes: impl IntoIterator<Item = S>) -> RedisStoreBuilder {
        let nodes = nodes.into_iter().map(|s| s.as_ref().to_owned()).collect();
        RedisStoreBuilder::new(Source::Cluster(nodes))
    }

    /// **For tests only.** Adjusts as [`Store::adjust`] does, with `now` sent to the script
    /// instead of the Redis server's `TIME` (see [`RedisStore::check_at`]).
    ///
    /// # Errors
    /// As [`RedisStore::inspect`].
    pub async fn adjust_at(
        &self,
        policy: &Policy,
        key: &Key,
        delta: i64,
        now_micros: u64,
    ) -> Result<Decision, StoreError> {
        self.inner
            .adjust(policy, key, delta, Some(now_micros))
            .await
    }

    /// The Redis key that holds `key`'s state under `policy`:
    /// `<prefix>:{<base64url SHA-256 of the key>}:<policy>`. For operators (`PTTL`, `DEL`).
    pub fn redis_key(&self, policy: &Policy, key: &Key) -> Vec<u8> {
        keys::state_key(&self.inner.prefix, policy, key)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The per-command timeout.
    pub fn command_timeout(&self) -> Duration {
        self.inner.command_timeout
    }

    /// Reports `key`'s state under `policy` (remaining requests, time until fully reset) without
    /// charging anything; the same as [`Store::peek`].
    ///
    /// # Errors
    /// A [`StoreError`] when Redis fails or does not answer within the command timeout.
    pub async fn inspect(&self, policy: &Policy, key: &Key) -> Result<Decision, StoreError> {
        self.check(policy, key, 0).await
    }

    /// **For tests only.** Decides as [`Store::check`] does, but with `now` (microseconds on
    /// any epoch) sent to the script instead of the Redis server's `TIME`. Production code must
    /// never call it: mixing injected and real time on one key gives meaningless results. It
    /// exists so that the shared GCRA vectors can be replayed at chosen instants.
    ///
    /// # Errors
    /// As [`RedisStore::inspect`].
    pub async fn check_at(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
        now_micros: u64,
    ) -> Result<Decision, StoreError> {
        self.inner
            .decide_policy(policy, key, cost, Some(now_micros))
            .await
    }

    /// Checks that Redis answers: a `PING` within the command timeout, then a `TIME` whose
    /// answer, against this server's clock, gives the offset between the two clocks (half the
    /// round trip corrected). Returns that offset in seconds (Redis minus this server; positive
    /// when Redis is ahead) and reports it as the `tollgate_store_clock_offset_seconds` gauge
    /// (feature `metrics`). Decisions never use it: they run on Redis's clock alone. This is
    /// what [`Store::health`] runs; never on the request path.
    ///
    /// # Errors
    /// A [`StoreError`] when Redis fails or does not answer within the command timeout.
    pub async fn ping(&self) -> Result<f64, StoreError> {
        let inner = &self.inner;
        match inner.timed(inner.run(&redis::cmd("PING"))).await? {
            Value::SimpleString(s) if s == "PONG" => {}
            other => {
                return Err(errors::unexpected(format!(
                    "PING answered {other:?} instead of PONG"
                )));
            }
        }
        let sent = std::time::SystemTime::now();
        let reply = inner.timed(inner.run(&redis::cmd("TIME"))).await?;
        let received = std::time::SystemTime::now();
        let redis_micros = match &reply {
            Value::Array(parts) if parts.len() == 2 => {
                let num = |v: &Value| match v {
                    Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse::<u64>().ok(),
                    _ => None,
                };
                match (num(&parts[0]), num(&parts[1])) {
                    (Some(secs), Some(micros)) => {
                        secs.saturating_mul(1_000_000).saturating_add(micros)
                    }
                    _ => return Err(errors::unexpected(format!("TIME answered {reply:?}"))),
                }
            }
            other => return Err(errors::unexpected(format!("TIME answered {other:?}"))),
        };
        let micros = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        let local = (micros(sent) + micros(received)) / 2.0;
        #[allow(clippy::cast_precision_loss)] // microseconds since 1970 fit a double exactly
        let offset = (redis_micros as f64 - local) / 1e6;
        crate::telemetry::gauge("tollgate_store_clock_offset_seconds", "redis", offset);
        Ok(offset)
    }

    /// Loads the script into Redis (every primary, in a cluster) ahead of the first decision.
    /// `build` does this already; call it after a planned `SCRIPT FLUSH` to spare the first
    /// request the reload round trips (which are transparent either way).
    ///
    /// # Errors
    /// A [`StoreError`] when Redis fails or does not answer within the command timeout.
    pub async fn load_script(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner.timed(inner.load_scripts()).await
    }
}

impl RedisStoreBuilder {
    fn new(source: Source) -> Self {
        Self {
            source,
            prefix: DEFAULT_PREFIX.to_owned(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            require_connection: false,
            max_batch: DEFAULT_MAX_BATCH,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
        }
    }

    /// The most decisions one script call carries: 1 to 4096 (default [`DEFAULT_MAX_BATCH`],
    /// 128; 1 turns group commit off). While two calls are in flight to Redis, the decisions
    /// that arrive meanwhile wait and go together in the next call, up to this many (and
    /// [`max_batch_bytes`](Self::max_batch_bytes)); the rest wait for the call after. No
    /// decision waits while fewer than two calls are in flight. Ignored on Redis Cluster, which
    /// decides one call per decision (see the module docs).
    pub fn max_batch(mut self, decisions: usize) -> Self {
        self.max_batch = decisions;
        self
    }

    /// The most bytes of keys and arguments one batch carries (default
    /// [`DEFAULT_MAX_BATCH_BYTES`], 64 KiB). A single decision always goes, whatever its size
    /// (at most about 1.5 KiB: 8 quotas of [`MAX_KEY_LEN`]-byte keys).
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes;
        self
    }

    /// The first part of every key (default `"tollgate"`): 1 to 64 printable ASCII characters
    /// without spaces or braces. App servers that share limits must use the same prefix.
    pub fn prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.prefix);
        self
    }

    /// The longest a decision may take, connection wait, script reload and reply included
    /// (default 50 ms). Past it the decision fails with [`StoreErrorKind::Timeout`] and the
    /// layer's fail mode applies.
    ///
    /// [`StoreErrorKind::Timeout`]: crate::StoreErrorKind::Timeout
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// The longest one connection attempt may take (default 1 s). Connections are made in the
    /// background; requests never wait longer than the command timeout for one.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// When on, [`build`](Self::build) fails if Redis cannot be reached (and the script loaded)
    /// within the connect timeout. Off by default: the store starts during a Redis outage,
    /// decisions fail fast meanwhile, the layer's fail mode applies, and the store recovers by
    /// itself when Redis is back.
    pub fn require_connection(mut self, on: bool) -> Self {
        self.require_connection = on;
        self
    }

    /// The store. Needs a Tokio runtime (it spawns the reconnecting connection's tasks).
    ///
    /// # Errors
    /// [`RedisConfigError`] for an invalid URL, prefix or zero timeout; and, only with
    /// [`require_connection`](Self::require_connection), when Redis cannot be reached.
    pub async fn build(self) -> Result<RedisStore, RedisConfigError> {
        keys::check_prefix(&self.prefix).map_err(RedisConfigError::Prefix)?;
        for (which, value) in [
            ("command", self.command_timeout),
            ("connect", self.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(RedisConfigError::ZeroTimeout { which, value });
            }
        }
        if !(1..=batch::MAX_BATCH).contains(&self.max_batch) {
            return Err(RedisConfigError::BatchBound {
                which: "max_batch",
                allowed: "1 to 4096",
                value: self.max_batch,
            });
        }
        if self.max_batch_bytes == 0 {
            return Err(RedisConfigError::BatchBound {
                which: "max_batch_bytes",
                allowed: "at least 1",
                value: 0,
            });
        }
        let url_error = |source| RedisConfigError::Url { source };
        let manager = |client| {
            ConnectionManager::new_lazy_with_config(client, manager_config(self.connect_timeout))
                .map(Backend::Manager)
                .map_err(url_error)
        };
        let backend = match self.source {
            Source::Url(url) => manager(redis::Client::open(url.as_str()).map_err(url_error)?)?,
            Source::Info(info) => manager(redis::Client::open(*info).map_err(url_error)?)?,
            Source::Client(client) => manager(client)?,
            #[cfg(feature = "redis-tls")]
            Source::Tls(url, certificates) => manager(
                redis::Client::build_with_tls(url.as_str(), certificates).map_err(url_error)?,
            )?,
            Source::Sentinel { sentinels, master } => {
                let client = sentinel_client(sentinels, &master)?;
                let config = manager_config(self.connect_timeout);
                Backend::Sentinel(sentinel::Follower::new(
                    client,
                    config,
                    self.connect_timeout,
                ))
            }
            Source::SentinelClient(client) => {
                let config = manager_config(self.connect_timeout);
                Backend::Sentinel(sentinel::Follower::new(
                    *client,
                    config,
                    self.connect_timeout,
                ))
            }
            Source::Pool(pool) => Backend::Pool(pool),
            #[cfg(feature = "redis-cluster")]
            Source::Cluster(nodes) => {
                if nodes.is_empty() {
                    return Err(RedisConfigError::NoClusterNodes);
                }
                let client = redis::cluster::ClusterClient::builder(nodes)
                    .connection_timeout(self.connect_timeout)
                    .response_timeout(self.command_timeout)
                    .retries(3)
                    .min_retry_wait(5)
                    .max_retry_wait(50)
                    .build()
                    .map_err(|source| RedisConfigError::Url { source })?;
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(self.connect_timeout)
                    .set_response_timeout(self.command_timeout);
                Backend::Cluster(client.get_pending_async_connection_with_config(config))
            }
        };
        let batcher = match &backend {
            #[cfg(feature = "redis-cluster")]
            Backend::Cluster(_) => None,
            _ if self.max_batch == 1 => None,
            _ => Some(batch::Batcher::new(self.max_batch, self.max_batch_bytes)),
        };
        let store = RedisStore {
            inner: Arc::new(Inner {
                backend,
                registry: crate::store::PolicyRegistry::new(),
                prefix: self.prefix.into(),
                command_timeout: self.command_timeout,
                script: redis::Script::new(GCRA_LUA),
                load: script_load_cmd(GCRA_LUA),
                batcher,
            }),
        };
        let inner = &store.inner;
        if let Backend::Sentinel(follower) = &inner.backend {
            // Errors surface through the script load below.
            let _ = follower.resolve().await;
        }
        let warm = tokio::time::timeout(self.connect_timeout, inner.load_scripts()).await;
        let failure = match warm {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(errors::timeout(self.connect_timeout)),
        };
        if let Some(e) = failure {
            if self.require_connection {
                return Err(RedisConfigError::Connect { source: e });
            }
            tracing::warn!(
                target: "tollgate::store",
                error = %e,
                "Redis is not reachable at startup; decisions fail (and the fail mode applies) \
                 until it is"
            );
        }
        Ok(store)
    }
}

impl Inner {
    /// `EVALSHA` of `lua/gcra.lua` for any policy: one key per quota (the bare state key for
    /// one quota, `...#<i>` for several, all in one hash slot), then each quota's `T` and `B`,
    /// the cost and, in tests only, `now`.
    fn eval_cmd(&self, policy: &Policy, key: &Key, cost: u32, now: Option<u64>) -> Cmd {
        let quotas = policy.quotas();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(quotas.len());
        if quotas.len() == 1 {
            cmd.arg(keys::state_key(&self.prefix, policy, key));
        } else {
            for redis_key in keys::quota_keys(&self.prefix, policy, key) {
                cmd.arg(redis_key);
            }
        }
        for quota in quotas {
            cmd.arg(quota.interval_micros()).arg(quota.capacity());
        }
        cmd.arg(cost);
        if let Some(now) = now {
            cmd.arg(now);
        }
        cmd
    }

    /// `SCRIPT LOAD` of `lua/gcra.lua`, and of `lua/gcra_batch.lua` when batching.
    async fn load_scripts(&self) -> Result<(), StoreError> {
        self.run(&self.load).await?;
        if let Some(batcher) = &self.batcher {
            self.run(batcher.load_cmd()).await?;
        }
        // Cheap, and spares the first refund the NOSCRIPT round trips inside its timeout.
        self.run(adjust::load_cmd()).await?;
        Ok(())
    }

    /// One decision in a script call of its own (no group commit).
    fn check_alone(self: &Arc<Self>, policy: &Policy, key: &Key, cost: u32) -> RedisFuture {
        let cmd = self.eval_cmd(policy, key, cost, None);
        let quotas = Quotas::of(policy);
        let inner = Arc::clone(self);
        Box::pin(async move { inner.decide(cmd, quotas.as_slice(), cost).await })
    }

    /// Bounds `fut` by the command timeout.
    async fn timed<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.command_timeout, fut).await {
            Ok(result) => result,
            Err(_) => Err(errors::timeout(self.command_timeout)),
        }
    }

    /// One command on whichever backend.
    async fn run(&self, cmd: &Cmd) -> Result<Value, StoreError> {
        self.send_on_backend(cmd, None).await
    }

    /// The script, reloaded once on `NOSCRIPT` (which means it did not run).
    async fn eval(&self, cmd: &Cmd) -> Result<Value, StoreError> {
        self.send_on_backend(cmd, Some(&self.load)).await
    }

    /// `cmd` on whichever backend. The pool and cluster paths are boxed: their futures are
    /// kilobytes large, and every decision's future would otherwise carry (and move) that much.
    async fn send_on_backend(&self, cmd: &Cmd, load: Option<&Cmd>) -> Result<Value, StoreError> {
        match &self.backend {
            Backend::Manager(m) => query(&mut m.clone(), cmd, load).await,
            Backend::Sentinel(s) => Box::pin(s.query(cmd, load)).await,
            Backend::Pool(p) => Box::pin(pooled(p, cmd, load)).await,
            #[cfg(feature = "redis-cluster")]
            Backend::Cluster(c) => {
                let mut conn = c.clone();
                Box::pin(query(&mut conn, cmd, load)).await
            }
        }
    }

    /// One decision: the script's reply to `cmd` read against `quotas`.
    ///
    /// Single-quota and multi-quota policies share this path and the one script, which keeps
    /// a branch of its own for one quota. Measured with redis-server 7.0 (100k `EVALSHA` per
    /// batch, `INFO commandstats` usec_per_call, 4 interleaved rounds, admitted and denied
    /// requests), one quota through the script's general N-quota loop cost 1.14-1.27x the
    /// Redis CPU of the former single-quota script (5.05-5.42 us admitted, 3.19-3.43 us
    /// denied), 1.06-1.23x with that branch but an array reply; with the branch and an
    /// integer reply it costs 0.90-1.02x, so a one-quota reply stays one integer.
    async fn decide(&self, cmd: Cmd, quotas: &[Quota], cost: u32) -> Result<Decision, StoreError> {
        let reply = self.timed(self.eval(&cmd)).await?;
        decision(&reply, quotas, cost)
    }

    async fn del(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("DEL");
        for key in keys {
            cmd.arg(key);
        }
        self.timed(self.run(&cmd)).await.map(drop)
    }

    /// One decision for `policy`, at Redis's `TIME` or (tests only) at `now`.
    async fn decide_policy(
        &self,
        policy: &Policy,
        key: &Key,
        cost: u32,
        now: Option<u64>,
    ) -> Result<Decision, StoreError> {
        let cmd = self.eval_cmd(policy, key, cost, now);
        self.decide(cmd, policy.quotas(), cost).await
    }
}

/// The quotas a reply is read against, owned by the decision's future: a copy of the one quota
/// (the common case, which leaves the policy's reference counts alone), or the policy.
enum Quotas {
    One(Quota),
    Policy(Policy),
}

impl Quotas {
    fn of(policy: &Policy) -> Self {
        match policy.quotas() {
            [quota] => Self::One(*quota),
            _ => Self::Policy(policy.clone()),
        }
    }

    fn as_slice(&self) -> &[Quota] {
        match self {
            Self::One(quota) => std::slice::from_ref(quota),
            Self::Policy(policy) => policy.quotas(),
        }
    }
}

/// The reconnecting connection's settings. No response timeout inside redis-rs: the store's
/// own command timeout bounds every decision (connection wait and reload included), and one
/// timer per request is enough.
fn manager_config(connect_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(None)
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(Duration::from_millis(100))
        .set_number_of_retries(6)
}

/// A redis-rs sentinel client for `master` on `sentinels` (`host:port` or URLs).
fn sentinel_client(
    sentinels: Vec<String>,
    master: &str,
) -> Result<SentinelClient, RedisConfigError> {
    if sentinels.is_empty() || sentinels.iter().any(String::is_empty) {
        return Err(RedisConfigError::NoSentinels);
    }
    if master.is_empty() {
        return Err(RedisConfigError::NoSentinelMaster);
    }
    let urls: Vec<String> = sentinels
        .into_iter()
        .map(|s| {
            if s.contains("://") {
                s
            } else {
                format!("redis://{s}")
            }
        })
        .collect();
    // A `String`: redis-rs takes one without its TLS feature, `impl AsRef<str>` with it.
    #[allow(clippy::unnecessary_to_owned)]
    SentinelClient::build(urls, master.to_owned(), None, SentinelServerType::Master)
        .map_err(|source| RedisConfigError::Sentinel { source })
}

/// `cmd` on a connection checked out of a deadpool pool.
async fn pooled(
    pool: &deadpool_redis::Pool,
    cmd: &Cmd,
    load: Option<&Cmd>,
) -> Result<Value, StoreError> {
    let mut conn = pool.get().await.map_err(errors::pool_error)?;
    query(&mut conn, cmd, load).await
}

fn script_load_cmd(script: &str) -> Cmd {
    let mut cmd = redis::cmd("SCRIPT");
    cmd.arg("LOAD").arg(script);
    cmd
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Sends `cmd`; with `reload`, answers `NOSCRIPT` by loading the script and sending it again.
async fn query<C: ConnectionLike>(
    conn: &mut C,
    cmd: &Cmd,
    reload: Option<&Cmd>,
) -> Result<Value, StoreError> {
    match (send(conn, cmd).await, reload) {
        (Err(e), Some(load)) if is_noscript(&e) => {
            send(conn, load).await.map_err(errors::store_error)?;
            send(conn, cmd).await.map_err(errors::store_error)
        }
        (result, _) => result.map_err(errors::store_error),
    }
}

/// One command; an error reply becomes an `Err`.
async fn send<C: ConnectionLike>(conn: &mut C, cmd: &Cmd) -> Result<Value, RedisError> {
    match conn.req_packed_command(cmd).await? {
        Value::ServerError(e) => Err(e.into()),
        v => Ok(v),
    }
}

/// The script's reply as a decision: `used` per quota (each TAT's lead over Redis's `now`, in
/// microseconds, before this request), one integer for one quota, an array of N for N. The
/// script allowed and wrote exactly when the in-memory GCRA allows `cost` from that state, so
/// running that same function on it gives the numbers to report.
fn decision(reply: &Value, quotas: &[Quota], cost: u32) -> Result<Decision, StoreError> {
    let bad = || {
        let wanted = match quotas.len() {
            1 => "a non-negative integer".to_owned(),
            n => format!("an array of {n} non-negative integers"),
        };
        errors::unexpected(format!(
            "the rate-limit script answered {reply:?} instead of {wanted}"
        ))
    };
    let non_negative = |v: &Value| match v {
        Value::Int(used) if *used >= 0 => Some(used.unsigned_abs()),
        _ => None,
    };
    // `now = 0`, stored TAT = used: the same relative state the script saw.
    if let [quota] = quotas {
        let used = non_negative(reply).ok_or_else(bad)?;
        return Ok(gcra::step(used, 0, quota, cost).decision);
    }
    let mut used = [0u64; Policy::MAX_QUOTAS];
    match reply {
        Value::Array(items) if items.len() == quotas.len() && items.len() <= used.len() => {
            for (slot, item) in used.iter_mut().zip(items) {
                *slot = non_negative(item).ok_or_else(bad)?;
            }
        }
        _ => return Err(bad()),
    }
    Ok(gcra::step_all(&used[..quotas.len()], 0, quotas, cost).decision)
}

impl Store for RedisStore {
    type Future = RedisFuture;

    fn check(&self, policy: &Policy, key: &Key, cost: u32) -> Self::Future {
        batch::check(&self.inner, policy, key, cost)
    }

    /// One `EVALSHA` of `lua/adjust.lua`, atomic over the policy's quotas; sent when the
    /// future is first polled, bounded by the command timeout, never retried (but for
    /// `NOSCRIPT`, which means it did not run).
    fn adjust(&self, policy: &Policy, key: &Key, delta: i64) -> Option<Self::Future> {
        let (inner, policy, key) = (Arc::clone(&self.inner), policy.clone(), key.clone());
        Some(Box::pin(async move {
            inner.adjust(&policy, &key, delta, None).await
        }))
    }

    fn reset(
        &self,
        policy: &Policy,
        key: &Key,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let redis_keys = if policy.quotas().len() == 1 {
            vec![self.redis_key(policy, key)]
        } else {
            keys::quota_keys(&self.inner.prefix, policy, key)
        };
        let inner = Arc::clone(&self.inner);
        async move { inner.del(redis_keys).await }
    }

    fn registry(&self) -> Option<&crate::store::PolicyRegistry> {
        Some(&self.inner.registry)
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    fn health(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        let store = self.clone();
        async move { store.ping().await.map(drop) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(s: &str) -> Quota {
        s.parse().unwrap()
    }

    #[test]
    fn replies_become_decisions_like_the_memory_store() {
        let q = [quota("5/5s")];
        // Fresh key, cost 1: allowed, 4 left.
        let want = gcra::step(0, 1_000_000, &q[0], 1).decision;
        assert_eq!(decision(&Value::Int(0), &q, 1).unwrap(), want);
        // Five charged (used 5 s): denied, retry 1 s.
        let d = decision(&Value::Int(5_000_000), &q, 1).unwrap();
        assert_eq!(d.outcome(), crate::Outcome::Denied);
        assert_eq!(d.retry_after(), Some(Duration::from_secs(1)));
        assert_eq!(d.next_available(), Duration::from_secs(1));
        // Cost above capacity: impossible, whatever the state.
        let d = decision(&Value::Int(0), &q, 6).unwrap();
        assert_eq!(d.outcome(), crate::Outcome::Impossible);
        // A corrupted huge TAT saturates instead of panicking.
        assert!(!decision(&Value::Int(i64::MAX), &q, 1).unwrap().is_allowed());
    }

    #[test]
    fn array_replies_become_multi_quota_decisions() {
        let qs = [quota("2/s"), quota("5/h")];
        let reply = Value::Array(vec![Value::Int(500_000), Value::Int(720_000_000)]);
        let want = gcra::step_all(&[1_500_000, 721_000_000], 1_000_000, &qs, 1).decision;
        assert_eq!(decision(&reply, &qs, 1).unwrap(), want);
        let remaining: Vec<u32> = want.per_quota().iter().map(Decision::remaining).collect();
        assert_eq!(remaining, [0, 3]);
    }

    #[test]
    fn malformed_replies_are_unexpected() {
        let one = [quota("5/5s")];
        let two = [quota("5/5s"), quota("5/h")];
        let cases: [(&[Quota], Value); 10] = [
            (&one, Value::Nil),
            (&one, Value::Int(-1)),
            (&one, Value::Int(i64::MIN)),
            (&one, Value::Array(vec![Value::Int(0)])),
            (&one, Value::SimpleString("OK".into())),
            (&two, Value::Int(0)),
            (&two, Value::Array(vec![Value::Int(0)])),
            (&two, Value::Array(vec![Value::Int(0); 3])),
            (&two, Value::Array(vec![Value::Int(0), Value::Int(-1)])),
            (&two, Value::Array(vec![Value::Int(0), Value::Nil])),
        ];
        for (quotas, v) in cases {
            let e = decision(&v, quotas, 1).unwrap_err();
            assert_eq!(e.kind(), crate::StoreErrorKind::UnexpectedReply, "{v:?}");
        }
    }
}

#[cfg(test)]
mod future_size {
    use super::*;

    /// Every decision moves its future into a box: keep it small (the pool and cluster paths
    /// are boxed separately for this; unboxed, the future was 14 KiB and cost a quarter of the
    /// client's throughput at 128 in flight).
    #[tokio::test]
    async fn check_future_stays_small() {
        let store = RedisStore::builder("redis://127.0.0.1:1")
            .connect_timeout(Duration::from_millis(10))
            .build()
            .await
            .unwrap();
        let p = Policy::new("p", "5/s".parse().unwrap()).unwrap();
        let fut = store.check(&p, &Key::from("k"), 1);
        let size = std::mem::size_of_val(&*fut);
        assert!(size <= 2_048, "the check future is {size} bytes");
    }
}
