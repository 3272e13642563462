//! Every failure of the Redis path as a [`StoreError`] of the right [`StoreErrorKind`], and
//! [`RedisConfigError`] for stores that cannot be built.

use std::time::Duration;

use redis::{ErrorKind, RedisError};

use crate::error::{StoreError, StoreErrorKind};

/// A [`RedisStore`](super::RedisStore) that cannot be built. Each message says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisConfigError {
    /// The URL (or a cluster node URL) does not parse.
    #[error(
        "the Redis URL is invalid ({source}); write it as redis://[user:password@]host:port[/db], \
         rediss:// for TLS (feature redis-tls) or redis+unix:///path"
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
    /// A sentinel address does not parse.
    #[error(
        "a Redis Sentinel address is invalid ({source}); write each sentinel as host:port \
         (e.g. 10.0.0.5:26379) or redis://[user:password@]host:port"
    )]
    Sentinel {
        /// What the redis crate said.
        #[source]
        source: RedisError,
    },
    /// A Sentinel store was given no sentinel (or an empty address).
    #[error(
        "a Redis Sentinel store needs at least one sentinel address, and no empty one: give \
         host:port of each sentinel, e.g. 10.0.0.5:26379,10.0.0.6:26379"
    )]
    NoSentinels,
    /// A Sentinel store was given an empty master name.
    #[error(
        "a Redis Sentinel store needs the master name the sentinels monitor (the NAME of \
         `sentinel monitor NAME host port quorum`, often mymaster)"
    )]
    NoSentinelMaster,
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

/// The error code of a server error reply (`NOSCRIPT`, `OOM`, `READONLY`, ...), never its
/// message text, which differs between Redis and Valkey versions. Redis before 7 wraps an error
/// raised inside a script as `ERR Error running script ...: -OOM ...`; the code that error
/// carries (the word after the first ` -`) is taken instead of `ERR`.
pub(super) fn server_code(e: &RedisError) -> Option<&str> {
    let code = e.code()?;
    match e.detail().and_then(wrapped_code) {
        Some(inner) if code == "ERR" => Some(inner),
        _ => Some(code),
    }
}

/// The code of the error reply wrapped in a pre-7 script error: ` -CODE ` in capitals.
fn wrapped_code(detail: &str) -> Option<&str> {
    let (_, rest) = detail.split_once(" -")?;
    let code = rest.split([' ', '.', ':']).next()?;
    let ok = !code.is_empty() && code.len() <= 16 && code.bytes().all(|b| b.is_ascii_uppercase());
    ok.then_some(code)
}

/// The kind of a server error code.
fn kind_of_code(code: &str) -> Option<StoreErrorKind> {
    Some(match code {
        // The primary is gone or demoted (a failover), or a cluster node does not own the slot.
        "READONLY" | "MASTERDOWN" | "CLUSTERDOWN" | "MOVED" | "ASK" => StoreErrorKind::Connection,
        "BUSY" | "LOADING" | "TRYAGAIN" => StoreErrorKind::Busy,
        "OOM" => StoreErrorKind::OutOfMemory,
        "CROSSSLOT" => StoreErrorKind::CrossSlot,
        // NOSCRIPT is answered by reloading the script; it only surfaces when that failed.
        "NOSCRIPT" | "NOPERM" | "NOAUTH" | "WRONGPASS" | "EXECABORT" | "ERR" => {
            StoreErrorKind::Server
        }
        _ => return None,
    })
}

/// The kind of a redis error.
pub(super) fn kind_of(e: &RedisError) -> StoreErrorKind {
    if e.is_timeout() {
        return StoreErrorKind::Timeout;
    }
    if let Some(kind) = server_code(e).and_then(kind_of_code) {
        return kind;
    }
    match e.kind() {
        ErrorKind::Io
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::AuthenticationFailed
        | ErrorKind::MasterNameNotFoundBySentinel
        | ErrorKind::EmptySentinelList => StoreErrorKind::Connection,
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => StoreErrorKind::UnexpectedReply,
        ErrorKind::InvalidClientConfig | ErrorKind::Client => StoreErrorKind::Other,
        _ => StoreErrorKind::Server,
    }
}

/// A redis error as a store error, keeping it as the source.
pub(super) fn store_error(e: RedisError) -> StoreError {
    let kind = kind_of(&e);
    let message = match (kind, server_code(&e)) {
        (StoreErrorKind::Connection, Some("READONLY")) => {
            "Redis answered READONLY: this server is a replica now (a failover happened); \
             a Sentinel store finds the new primary by itself, a URL store needs the primary's URL"
        }
        (StoreErrorKind::Connection, Some("MOVED" | "ASK")) => {
            "Redis redirected the request (MOVED/ASK): the server is a Redis Cluster node, so \
             build the store with cluster_builder, or the cluster is resharding"
        }
        (StoreErrorKind::Connection, Some("MASTERDOWN" | "CLUSTERDOWN")) => {
            "Redis has no primary for this data right now (MASTERDOWN/CLUSTERDOWN)"
        }
        (StoreErrorKind::Connection, _) => {
            "Redis connection failed; reconnecting in the background"
        }
        (StoreErrorKind::Timeout, _) => "Redis did not answer in time",
        (StoreErrorKind::Busy, Some("TRYAGAIN")) => {
            "Redis Cluster asked to try again (TRYAGAIN: keys of a slot being moved)"
        }
        (StoreErrorKind::Busy, Some("LOADING")) => "Redis is loading its data set (LOADING)",
        (StoreErrorKind::Busy, _) => "Redis is busy (BUSY: another script runs too long)",
        (StoreErrorKind::OutOfMemory, _) => "Redis is out of memory (OOM: maxmemory reached)",
        (StoreErrorKind::CrossSlot, _) => "the keys of one decision are in different cluster slots",
        (StoreErrorKind::UnexpectedReply, _) => "Redis sent a reply that is not a decision",
        (_, Some("NOSCRIPT")) => "Redis lost the rate-limit script again right after loading it",
        (_, Some("NOPERM")) => {
            "the Redis user may not run the rate-limit script: it needs +evalsha +script|load \
             +time +get +mget +set +del +ping on the store's keys (~<prefix>:*)"
        }
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

    /// An error reply as the parser makes it from `-CODE detail` on the wire.
    fn reply(line: &str) -> RedisError {
        let wire = format!("-{line}\r\n");
        match redis::parse_redis_value(wire.as_bytes()).expect("an error reply parses") {
            redis::Value::ServerError(e) => e.into(),
            other => panic!("{line:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn server_codes_map_to_kinds_whatever_the_message() {
        use StoreErrorKind::*;
        // Each code twice: with Redis 7's message, and with a made-up one (Valkey 8 reworded
        // several), which must not change the kind.
        let cases = [
            ("BUSY Redis is busy running a script.", Busy),
            ("BUSY Valkey is busy", Busy),
            (
                "OOM command not allowed when used memory > 'maxmemory'.",
                OutOfMemory,
            ),
            ("OOM out of memory", OutOfMemory),
            (
                "TRYAGAIN Multiple keys request during rehashing of slot",
                Busy,
            ),
            ("LOADING Redis is loading the dataset in memory", Busy),
            ("MOVED 3999 127.0.0.1:6381", Connection),
            ("ASK 3999 127.0.0.1:6381", Connection),
            (
                "READONLY You can't write against a read only replica.",
                Connection,
            ),
            ("READONLY replica", Connection),
            ("MASTERDOWN Link with MASTER is down", Connection),
            ("CLUSTERDOWN The cluster is down", Connection),
            (
                "CROSSSLOT Keys in request don't hash to the same slot",
                CrossSlot,
            ),
            ("NOSCRIPT No matching script. Please use EVAL.", Server),
            (
                "NOPERM this user has no permissions to run the 'evalsha' command",
                Server,
            ),
            ("WEIRD something new", Server),
            ("ERR unknown command", Server),
            // Redis < 7 wraps an error raised inside a script; its own code counts.
            (
                "ERR Error running script (call to f_0123): @user_script:1: -OOM command not allowed",
                OutOfMemory,
            ),
            (
                "ERR Error running script (call to f_0123): @user_script:1: -READONLY You can't write",
                Connection,
            ),
            // Lower-case text after " -" is not a code.
            ("ERR wrong number of arguments - see the docs", Server),
        ];
        for (line, want) in cases {
            assert_eq!(kind_of(&reply(line)), want, "{line}");
        }
    }

    #[test]
    fn messages_name_the_code_not_its_text() {
        let e = store_error(reply("READONLY whatever a server says"));
        assert!(e.to_string().contains("READONLY"), "{e}");
        assert!(e.to_string().contains("failover"), "{e}");
        let e = store_error(reply("MOVED 1 127.0.0.1:1"));
        assert!(e.to_string().contains("cluster_builder"), "{e}");
        let e = store_error(reply("NOPERM no"));
        assert!(e.to_string().contains("+evalsha"), "{e}");
    }

    #[test]
    fn io_errors_map_to_connection_and_timeout() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(kind_of(&io), StoreErrorKind::Connection);
        let to = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(kind_of(&to), StoreErrorKind::Timeout);
        let e = store_error(io);
        assert!(std::error::Error::source(&e).is_some());
    }
}
