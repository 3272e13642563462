//! RedisStore over TLS (feature `redis-tls`, rustls) against a real `redis-server --tls-port`
//! with a CA and a server certificate this test generates (rcgen), and an ACL user on a
//! database over that TLS connection.
#![cfg(feature = "redis-tls")]

mod common;

use std::path::Path;

use common::redis::{RedisServer, free_port};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tollgate::store::redis::{RedisConfigError, RedisStore};
use tollgate::{Key, Policy, Quota, Store};

/// A CA and a certificate for `localhost` / 127.0.0.1 signed by it, as PEM files in `dir`;
/// returns the CA's PEM.
fn write_certificates(dir: &Path) -> String {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "tollgate test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let server =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let cert = server.signed_by(&server_key, &ca).unwrap();
    let ca_pem = ca.as_ref().pem();
    std::fs::write(dir.join("ca.crt"), &ca_pem).unwrap();
    std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    ca_pem
}

/// A redis-server answering TLS on `tls_port` (its plain port stays for redis-cli and the
/// readiness check), and the CA that signed its certificate.
fn tls_server() -> (RedisServer, u16, String, TempDir) {
    let dir = TempDir::new();
    let ca = write_certificates(dir.path());
    let tls_port = free_port();
    let (p, d) = (tls_port.to_string(), dir.path());
    let file = |name: &str| d.join(name).display().to_string();
    let server = RedisServer::start_with(&[
        "--tls-port",
        &p,
        "--tls-cert-file",
        &file("server.crt"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.crt"),
        "--tls-auth-clients",
        "no",
    ]);
    assert!(
        server.cli(&["CONFIG", "GET", "tls-port"]).contains(&p),
        "this redis-server has no TLS support (Debian's redis-server 7 has it)"
    );
    (server, tls_port, ca, dir)
}

/// A temp dir removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "tollgate-tls-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn certificates(ca: &str) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.as_bytes().to_vec()),
    }
}

fn policy() -> Policy {
    Policy::new("tls", "2/m".parse::<Quota>().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_over_tls_with_a_private_ca() {
    let (server, tls_port, ca, _dir) = tls_server();
    let url = format!("rediss://localhost:{tls_port}");
    let store = RedisStore::builder_with_tls(&url, certificates(&ca))
        .require_connection(true)
        .build()
        .await
        .expect("TLS with the test CA");
    let (p, k) = (policy(), Key::from("over-tls"));
    assert_eq!(store.check(&p, &k, 1).await.unwrap().remaining(), 1);
    assert_eq!(store.check(&p, &k, 1).await.unwrap().remaining(), 0);
    assert!(!store.check(&p, &k, 1).await.unwrap().is_allowed());
    assert!(store.ping().await.is_ok());
    // The state is on that server (read over its plain port).
    let key = String::from_utf8(store.redis_key(&p, &k)).unwrap();
    assert_eq!(server.cli(&["EXISTS", &key]).trim(), "1");

    // The server's certificate is checked: the system roots do not know the test CA.
    let e = RedisStore::builder(&url)
        .require_connection(true)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(e, RedisConfigError::Connect { .. }), "{e}");
    // Plain text on the TLS port gets no answer that is a decision.
    let plain = RedisStore::builder(&format!("redis://127.0.0.1:{tls_port}"))
        .connect_timeout(std::time::Duration::from_millis(300))
        .require_connection(true)
        .build()
        .await;
    assert!(plain.is_err(), "plain text reached the TLS port");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_on_a_database_over_tls_from_a_client() {
    let (server, tls_port, ca, _dir) = tls_server();
    let password = "tls-pw-5d1c-never-shown";
    let pass = format!(">{password}");
    let set = server.cli(&[
        "ACL",
        "SETUSER",
        "limiter",
        "reset",
        "on",
        &pass,
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
    ]);
    assert_eq!(set.trim(), "OK");
    let url = format!("rediss://limiter:{password}@localhost:{tls_port}/5");
    let client = redis::Client::build_with_tls(url.as_str(), certificates(&ca)).unwrap();
    let builder = RedisStore::from_client(client).require_connection(true);
    assert!(!format!("{builder:?}").contains(password));
    let store = builder.build().await.expect("the ACL user over TLS");
    assert!(!format!("{store:?}").contains(password));
    let (p, k) = (policy(), Key::from("tenant"));
    assert!(store.check(&p, &k, 1).await.unwrap().is_allowed());
    let key = String::from_utf8(store.redis_key(&p, &k)).unwrap();
    assert_eq!(server.cli(&["-n", "5", "EXISTS", &key]).trim(), "1");
    assert_eq!(server.cli(&["-n", "0", "EXISTS", &key]).trim(), "0");
}
