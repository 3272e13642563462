//! Brute-force protection for a login, the tollgate way: only failed logins count.
//!
//! Two limits guard `POST /login`, both counting failures only (`skip_successful`: a
//! successful login's charge is given back before its response leaves):
//!
//! - policy `login-user-ip`: 5 failures per username and client IP, regenerating one every 12
//!   minutes, so a guesser is slowed to a crawl on one account while other users on the same
//!   IP (an office NAT) are not locked out;
//! - policy `login-ip-day`: 100 failures per client IP per day, whichever usernames it tries
//!   (password spraying); an attempt the first limit refused (429) is not counted here.
//!
//! A successful login also forgets the username+IP state (`Store::reset`), so a user who mistyped
//! a few times starts from fresh once they get in. Every attempt is charged on arrival, so 50
//! guesses sent at once still get only 5 answers.
//!
//! The username comes from the `x-username` header here (a key extractor sees the request
//! head, not its body; a form post would carry it in a header or the path, or the limit keys on
//! what the handler parses). The password is `open-sesame`.
//!
//! ```text
//! cargo run --example login_recipe                # serves on 127.0.0.1:3001 (LISTEN_ADDR)
//! for i in $(seq 6); do curl -s -o /dev/null -w '%{http_code} ' -X POST -H 'x-username: alice' \
//!   -H 'x-password: guess' http://127.0.0.1:3001/login; done; echo
//! # 401 401 401 401 401 429
//! cargo run --example login_recipe -- --self-test # plays that scenario (and more) and exits
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Router, response::IntoResponse};
use tollgate::key::{ClientIp, KeyExtractor};
use tollgate::{Key, MemoryStore, Policy, RateLimitLayer, Store};

/// The username+IP key: the username's bytes, a NUL (which no header value contains, so two
/// pairs never meet on one key), and the client IP's key.
fn user_and_ip(ip: &ClientIp, req: &Parts) -> Option<Key> {
    let user = req.headers.get("x-username")?;
    let ip = ip.extract(req)?;
    let mut bytes = user.as_bytes().to_vec();
    bytes.push(0);
    bytes.extend_from_slice(ip.as_bytes());
    Some(Key::from(bytes))
}

#[derive(Clone)]
struct App {
    store: MemoryStore,
    user_ip: Policy,
    ip: ClientIp,
}

/// 200 for the right password (and the username+IP state forgotten), else 401.
async fn login(State(app): State<Arc<App>>, parts: Parts) -> impl IntoResponse {
    let headers: &HeaderMap = &parts.headers;
    if headers.get("x-password").is_none_or(|p| p != "open-sesame") {
        return (StatusCode::UNAUTHORIZED, "wrong username or password\n");
    }
    if let Some(key) = user_and_ip(&app.ip, &parts) {
        // A success wipes this user's failures from this IP (the per-IP daily count stays).
        let _ = app.store.reset(&app.user_ip, &key).await;
    }
    (StatusCode::OK, "welcome\n")
}

fn router() -> Result<Router, Box<dyn std::error::Error>> {
    let store = MemoryStore::new();
    let ip = ClientIp::new();
    let key_ip = ip.clone();
    let user_ip = RateLimitLayer::builder("5/h".parse()?)
        .policy("login-user-ip")
        .key(move |req: &Parts| user_and_ip(&key_ip, req))
        .store(store.clone())
        .skip_successful()
        .build()?;
    // A 429 from the username+IP limit is not a failed login either: that attempt was refused
    // before the handler saw it, so the daily count gives it back too.
    let per_day = RateLimitLayer::builder("100/d".parse()?)
        .policy("login-ip-day")
        .key(ip.clone())
        .store(store.clone())
        .refund_when(|status, _| status.as_u16() < 400 || status == StatusCode::TOO_MANY_REQUESTS)
        .build()?;
    let app = Arc::new(App {
        store,
        user_ip: user_ip.policy().clone(),
        ip,
    });
    // The per-IP layer runs first: a sprayer it stops never reaches the username+IP count.
    Ok(Router::new()
        .route("/login", post(login))
        .layer(user_ip)
        .layer(per_day)
        .with_state(app))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let self_test = std::env::args().any(|a| a == "--self-test");
    let addr: SocketAddr = if self_test {
        "127.0.0.1:0".parse()?
    } else {
        std::env::var("LISTEN_ADDR")
            .unwrap_or_else(|_| "127.0.0.1:3001".to_owned())
            .parse()?
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = router()?.into_make_service_with_connect_info::<SocketAddr>();
    if !self_test {
        println!("login recipe listening on http://{addr}/login (password: open-sesame)");
        axum::serve(listener, app).await?;
        return Ok(());
    }
    tokio::spawn(async move { axum::serve(listener, app).await });
    play(addr).await
}

/// The scenario, against the running server; fails (exit 1) at the first surprise.
async fn play(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/login");
    let attempt = |user: &str, password: &str| {
        client
            .post(&url)
            .header("x-username", user)
            .header("x-password", password)
            .send()
    };
    let mut seen = Vec::new();
    let mut check = |what: &str, got: u16, want: u16| {
        seen.push(got);
        if got == want {
            Ok(())
        } else {
            Err(format!("{what}: expected {want}, got {got}"))
        }
    };
    // alice mistypes 4 times, then gets in: her failures are forgotten.
    for _ in 0..4 {
        check(
            "alice's typo",
            attempt("alice", "open-sesam").await?.status().as_u16(),
            401,
        )?;
    }
    check(
        "alice logs in",
        attempt("alice", "open-sesame").await?.status().as_u16(),
        200,
    )?;
    for _ in 0..5 {
        check(
            "alice's typo after a success",
            attempt("alice", "x").await?.status().as_u16(),
            401,
        )?;
    }
    // Five failures in a row: alice is locked out on this IP, even with the right password...
    check(
        "alice locked out",
        attempt("alice", "open-sesame").await?.status().as_u16(),
        429,
    )?;
    // ...but bob, from the same IP, is not.
    check(
        "bob logs in",
        attempt("bob", "open-sesame").await?.status().as_u16(),
        200,
    )?;
    // 50 guesses at once on carol: 5 are answered, 45 are refused before the handler runs.
    let guesses = (0..50).map(|i| {
        let request = client
            .post(&url)
            .header("x-username", "carol")
            .header("x-password", format!("guess-{i}"));
        tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) })
    });
    let mut statuses = Vec::new();
    for guess in guesses.collect::<Vec<_>>() {
        statuses.push(guess.await??);
    }
    let answered = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    if (answered, refused) != (5, 45) {
        return Err(format!("50 guesses at once: {answered} answered, {refused} refused").into());
    }
    // Password spraying: one guess each on many accounts, until the IP's daily 100 failures
    // are spent.
    let mut sprayed = 0;
    for i in 0.. {
        let status = attempt(&format!("user-{i}"), "123456")
            .await?
            .status()
            .as_u16();
        if status == 429 {
            break;
        }
        sprayed += 1;
        if i > 200 {
            return Err("the daily per-IP limit never stopped the spray".into());
        }
    }
    // 100 failures a day from this IP in all: 4 + 5 (alice) + 5 (carol) + the spray.
    if 4 + 5 + 5 + sprayed != 100 {
        return Err(format!("the spray got {sprayed} guesses in; expected 86").into());
    }
    println!(
        "ok: typos forgiven on success, lock-out after 5 failures per user+IP, other users \
         unaffected, 5 of 50 concurrent guesses answered, spraying stopped after {sprayed} \
         more failures (100 per IP per day)"
    );
    Ok(())
}
