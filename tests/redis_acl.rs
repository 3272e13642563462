//! RedisStore as the deployments teams run it, against real redis-server processes: an ACL
//! user with only the permissions the store needs, a database index, stores built from a URL,
//! a `redis::Client` and a `ConnectionInfo`; passwords never shown; a replica's `READONLY`
//! recognised by its code.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use tollgate::store::redis::{RedisConfigError, RedisStore};
use tollgate::{Key, Policy, Quota, Store, StoreErrorKind};

const PASSWORD: &str = "pw-7f3a9c1e-never-shown";

/// The permissions the store needs: its script and what the script calls, on its own keys.
const GRANTS: &[&str] = &[
    "+evalsha",
    "+script|load",
    "+time",
    "+get",
    "+mget",
    "+set",
    "+del",
    "+ping",
    "+select",
    "~tollgate:*",
];

fn acl_user(server: &RedisServer, user: &str, grants: &[&str]) {
    let pass = format!(">{PASSWORD}");
    let mut args = vec!["ACL", "SETUSER", user, "reset", "on", pass.as_str()];
    args.extend_from_slice(grants);
    assert_eq!(server.cli(&args).trim(), "OK", "ACL SETUSER {user}");
}

fn policy() -> Policy {
    Policy::new("acl", "3/m".parse::<Quota>().unwrap()).unwrap()
}

fn url(server: &RedisServer, user: &str, db: u8) -> String {
    format!("redis://{user}:{PASSWORD}@127.0.0.1:{}/{db}", server.port)
}

fn assert_no_password(what: &str, text: &str) {
    assert!(
        !text.contains(PASSWORD),
        "{what} shows the password: {text}"
    );
}

/// The whole chain of an error, Display and Debug.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("{e} / {e:?}");
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(" / {s} / {s:?}"));
        source = s.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_on_a_database_from_url_client_and_connection_info() {
    let server = RedisServer::start();
    acl_user(&server, "limiter", GRANTS);
    let p = policy();
    let k = Key::from("tenant-1");

    let builder = RedisStore::builder(&url(&server, "limiter", 3)).require_connection(true);
    assert_no_password("the builder's Debug", &format!("{builder:?}"));
    let from_url = builder
        .build()
        .await
        .expect("the ACL user may run the store");
    assert_no_password("the store's Debug", &format!("{from_url:?}"));
    assert_eq!(from_url.check(&p, &k, 1).await.unwrap().remaining(), 2);

    // The state lives in database 3, not 0.
    let redis_key = String::from_utf8(from_url.redis_key(&p, &k)).unwrap();
    assert_eq!(server.cli(&["-n", "3", "EXISTS", &redis_key]).trim(), "1");
    assert_eq!(server.cli(&["-n", "0", "EXISTS", &redis_key]).trim(), "0");

    // The same user and database from a redis::Client and from a ConnectionInfo: one limit.
    let client = redis::Client::open(url(&server, "limiter", 3)).unwrap();
    let from_client = RedisStore::from_client(client)
        .require_connection(true)
        .build()
        .await
        .unwrap();
    assert_eq!(from_client.check(&p, &k, 1).await.unwrap().remaining(), 1);
    let info = ConnectionAddr::Tcp("127.0.0.1".into(), server.port)
        .into_connection_info()
        .unwrap()
        .set_redis_settings(
            RedisConnectionInfo::default()
                .set_username("limiter")
                .set_password(PASSWORD)
                .set_db(3),
        );
    let from_info = RedisStore::from_connection_info(info)
        .require_connection(true)
        .build()
        .await
        .unwrap();
    assert_no_password("the store's Debug", &format!("{from_info:?}"));
    assert_eq!(from_info.check(&p, &k, 1).await.unwrap().remaining(), 0);
    assert!(!from_url.check(&p, &k, 1).await.unwrap().is_allowed());
    from_info.reset(&p, &k).await.unwrap();
    assert!(from_client.check(&p, &k, 1).await.unwrap().is_allowed());
    assert!(from_info.ping().await.is_ok());
}

#[tokio::test(flavor = "current_thread")]
async fn a_wrong_password_fails_clearly_and_never_shows_it() {
    let server = RedisServer::start();
    acl_user(&server, "limiter", GRANTS);
    // The right user with another password: the password in the URL is the one to hide.
    let wrong = format!("redis://limiter:{PASSWORD}-x@127.0.0.1:{}/0", server.port);
    let e = RedisStore::builder(&wrong)
        .require_connection(true)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(e, RedisConfigError::Connect { .. }), "{e}");
    assert_no_password("the startup error", &error_text(&e));

    // Without require_connection: the startup warning and each decision's error.
    let wrong2 = wrong.clone();
    let logs = common::logs::capture(async move {
        let store = RedisStore::builder(&wrong2)
            .command_timeout(Duration::from_millis(500))
            .build()
            .await
            .unwrap();
        let e = store
            .check(&policy(), &Key::from("k"), 1)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.kind(),
                StoreErrorKind::Connection | StoreErrorKind::Server
            ),
            "{e}"
        );
        assert_no_password("a decision's error", &error_text(&e));
    })
    .await;
    assert!(logs.contains("not reachable at startup"), "{logs}");
    assert_no_password("the logs", &logs);

    // An invalid URL that carries a password: the error names the problem, not the password.
    let bad = format!("redis://limiter:{PASSWORD}@127.0.0.1:notaport/0");
    let e = RedisStore::builder(&bad).build().await.unwrap_err();
    assert!(matches!(e, RedisConfigError::Url { .. }), "{e}");
    assert!(
        e.to_string().contains("redis://[user:password@]host:port"),
        "{e}"
    );
    assert_no_password("the URL error", &error_text(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_the_grants_gets_a_server_error() {
    let server = RedisServer::start();
    // No EVALSHA: Redis refuses the call itself with NOPERM, and the message names the grants.
    acl_user(
        &server,
        "noeval",
        &[
            "+script|load",
            "+time",
            "+get",
            "+set",
            "+ping",
            "+select",
            "~tollgate:*",
        ],
    );
    let store = RedisStore::builder(&url(&server, "noeval", 0))
        .require_connection(true)
        .build()
        .await
        .unwrap();
    let e = store
        .check(&policy(), &Key::from("k"), 1)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Server, "{e}");
    assert!(e.to_string().contains("+evalsha"), "{e}");
    assert!(error_text(&e).contains("NoPerm"), "{}", error_text(&e));
    // No GET/SET: the script is refused from inside (Redis 7.0 reports that as ERR).
    acl_user(
        &server,
        "narrow",
        &[
            "+evalsha",
            "+script|load",
            "+time",
            "+ping",
            "+select",
            "~tollgate:*",
        ],
    );
    let store = RedisStore::builder(&url(&server, "narrow", 0))
        .require_connection(true)
        .build()
        .await
        .unwrap();
    let e = store
        .check(&policy(), &Key::from("k"), 1)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Server, "{e}");
    assert!(std::error::Error::source(&e).is_some());
}

/// A store pointed at a replica: the script's write is refused with `READONLY`, recognised by
/// its code (a connection-kind failure: the primary moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answers_readonly_by_code() {
    let primary = RedisServer::start();
    let port = primary.port.to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let store = RedisStore::builder(&replica.url())
        .require_connection(true)
        .build()
        .await
        .unwrap();
    let e = store
        .check(&policy(), &Key::from("k"), 1)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Connection, "{e}");
    assert!(e.to_string().contains("READONLY"), "{e}");
    assert!(e.to_string().contains("replica"), "{e}");
    // A peek writes nothing, so a replica can answer it.
    assert!(
        store
            .inspect(&policy(), &Key::from("k"))
            .await
            .unwrap()
            .is_allowed()
    );
}

/// The grants above are all the store needs, under concurrency too: decisions that arrive
/// together go as one batch script call (`MGET` in the script), and a refund runs the
/// adjustment script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_with_the_documented_grants_batches_and_refunds() {
    let server = RedisServer::start();
    acl_user(&server, "limiter", GRANTS);
    let store = RedisStore::builder(&url(&server, "limiter", 0))
        .require_connection(true)
        .command_timeout(Duration::from_secs(5))
        .build()
        .await
        .expect("the ACL user may run the store");
    let p = Policy::new("acl-batch", "100/h".parse::<Quota>().unwrap()).unwrap();
    let mut checks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let check = store.check(&p, &Key::from(format!("tenant-{}", i % 8)), 1);
        checks.spawn(check);
    }
    let mut allowed = 0;
    while let Some(result) = checks.join_next().await {
        let decision = result
            .unwrap()
            .expect("every batched decision is allowed by the grants");
        allowed += usize::from(decision.is_allowed());
    }
    assert_eq!(allowed, 64);
    let calls = server.cli(&["INFO", "commandstats"]);
    assert!(
        calls.contains("cmdstat_evalsha"),
        "the decisions ran as scripts: {calls}"
    );
    let adjust = store
        .adjust(&p, &Key::from("tenant-0"), -1)
        .expect("RedisStore adjusts");
    let after = adjust.await.expect("the grants allow a refund");
    assert_eq!(
        after.remaining(),
        93,
        "tenant-0 had 8 charges, one given back"
    );
}
