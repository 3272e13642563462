//! Every failure of the Redis path as a [`StoreError`] of the right [`StoreErrorKind`], and
//! [`RedisConfigError`] for stores that cannot be built.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::error::{StoreError, StoreErrorKind};

/// A [`RedisStore`](super::RedisStore) that cannot be built. Each message says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisConfigError {
    /// The URL (or a cluster node URL) does not parse.
    #[error(
        "the Redis URL is invalid ({source}); write it as redis://[user:password@]host:port[/db], \
         rediss:// for TLS or redis+unix:///path"
    )]
    Url {
        /// What the redis crate said.
        #[source]
        source: RedisError,
    },
    /// The key prefix cannot be used.
    #[error("{0}")]
    Prefix(String),
    /// A timeout of zero.
    #[error("the Redis {which} timeout must be longer than zero (got {value:?})")]
    ZeroTimeout {
        /// `"command"` or `"connect"`.
        which: &'static str,
        /// The value given.
        value: Duration,
    },
    /// A batch bound out of range.
    #[error(
        "the Redis store's {which} must be {allowed} (got {value}); max_batch(1) turns group \
         commit off"
    )]
    BatchBound {
        /// `"max_batch"` or `"max_batch_bytes"`.
        which: &'static str,
        /// The values allowed.
        allowed: &'static str,
        /// The value given.
        value: usize,
    },
    /// A cluster constructor was given no node.
    #[error("a Redis Cluster store needs at least one node URL")]
    NoClusterNodes,
    /// [`RedisStoreBuilder::require_connection`](super::RedisStoreBuilder::require_connection)
    /// was set and Redis could not be reached (or could not load the script) at startup.
    #[error(
        "could not reach Redis at startup ({source}); check that it runs and that the URL is \
         right, or leave require_connection off to start anyway and let the fail mode apply"
    )]
    Connect {
        /// The store error, with the redis error as its source.
        #[source]
        source: StoreError,
    },
}

/// The kind of a redis error.
pub(super) fn kind_of(e: &RedisError) -> StoreErrorKind {
    if e.is_timeout() {
        return StoreErrorKind::Timeout;
    }
    match e.kind() {
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound | ErrorKind::AuthenticationFailed => {
            StoreErrorKind::Connection
        }
        ErrorKind::Server(ServerErrorKind::CrossSlot) => StoreErrorKind::CrossSlot,
        ErrorKind::Server(ServerErrorKind::BusyLoading | ServerErrorKind::TryAgain) => {
            StoreErrorKind::Busy
        }
        ErrorKind::Server(
            ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask
            | ServerErrorKind::ReadOnly,
        ) => StoreErrorKind::Connection,
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => StoreErrorKind::UnexpectedReply,
        ErrorKind::InvalidClientConfig | ErrorKind::Client => StoreErrorKind::Other,
        _ => match e.code() {
            Some("BUSY") => StoreErrorKind::Busy,
            Some("OOM") => StoreErrorKind::OutOfMemory,
            Some("CROSSSLOT") => StoreErrorKind::CrossSlot,
            _ => match e.detail() {
                // A write refused inside the script comes back as a script error whose text
                // carries the original code.
                Some(d) if d.starts_with("OOM") || d.contains(" OOM ") => {
                    StoreErrorKind::OutOfMemory
                }
                _ => StoreErrorKind::Server,
            },
        },
    }
}

/// A redis error as a store error, keeping it as the source.
pub(super) fn store_error(e: RedisError) -> StoreError {
    let kind = kind_of(&e);
    let message = match kind {
        StoreErrorKind::Connection => "Redis connection failed; reconnecting in the background",
        StoreErrorKind::Timeout => "Redis did not answer in time",
        StoreErrorKind::Busy => "Redis is busy (a long script, or loading, or resharding)",
        StoreErrorKind::OutOfMemory => "Redis is out of memory (maxmemory reached)",
        StoreErrorKind::CrossSlot => "the keys of one decision are in different cluster slots",
        StoreErrorKind::UnexpectedReply => "Redis sent a reply that is not a decision",
        _ => "Redis refused the rate-limit script",
    };
    StoreError::new(kind, message).with_source(e)
}

/// The command timeout elapsed (connection wait, script reload and reply included).
pub(super) fn timeout(after: Duration) -> StoreError {
    StoreError::new(
        StoreErrorKind::Timeout,
        format!("Redis did not answer within the command timeout of {after:?}"),
    )
}

/// A reply of the wrong shape.
pub(super) fn unexpected(what: String) -> StoreError {
    StoreError::new(StoreErrorKind::UnexpectedReply, what)
}

/// A pool failure.
pub(super) fn pool_error(e: deadpool_redis::PoolError) -> StoreError {
    match e {
        deadpool_redis::PoolError::Backend(e) => store_error(e),
        deadpool_redis::PoolError::Timeout(t) => StoreError::new(
            StoreErrorKind::Timeout,
            format!("no Redis connection from the pool in time ({t:?})"),
        ),
        other => StoreError::new(StoreErrorKind::Other, "the Redis pool failed").with_source(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, detail: &str) -> RedisError {
        redis::make_extension_error(code.to_owned(), Some(detail.to_owned()))
    }

    #[test]
    fn server_codes_map_to_kinds() {
        assert_eq!(
            kind_of(&server("BUSY", "Redis is busy")),
            StoreErrorKind::Busy
        );
        assert_eq!(
            kind_of(&server("OOM", "command not allowed")),
            StoreErrorKind::OutOfMemory
        );
        assert_eq!(kind_of(&server("WEIRD", "x")), StoreErrorKind::Server);
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(kind_of(&io), StoreErrorKind::Connection);
        let to = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(kind_of(&to), StoreErrorKind::Timeout);
        let e = store_error(io);
        assert!(std::error::Error::source(&e).is_some());
    }
}
