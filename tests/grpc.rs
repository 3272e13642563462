//! gRPC (feature `tonic`): real tonic servers and clients over loopback, the standard health
//! service behind a `RateLimitLayer`, and the `examples/grpc.rs` binary.
#![cfg(feature = "tonic")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_stream::wrappers::TcpListenerStream;
use tollgate::grpc::GrpcMode;
use tollgate::key::{ClientIp, Header};
use tollgate::{KeyExtractor, RateLimitLayer, Rejector, Store};
use tonic::{Code, Request, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response};
use tonic_health::server::HealthReporter;
use tonic_types::StatusExt;

const CHECK: &str = "/grpc.health.v1.Health/Check";

/// Serves the health service behind `layer` with `serve_with_incoming` on a free loopback
/// port; returns its address and the reporter that changes what `Watch` streams.
async fn serve_grpc<St, K, R>(layer: RateLimitLayer<St, K, R>) -> (SocketAddr, HealthReporter)
where
    St: Store,
    K: KeyExtractor,
    R: Rejector<tonic::body::Body>,
{
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, reporter)
}

async fn client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

/// A `Check` of the whole server, with `x-api-key: api_key` when given.
fn check(api_key: Option<&str>) -> Request<HealthCheckRequest> {
    let mut req = Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(key) = api_key {
        req.metadata_mut().insert("x-api-key", key.parse().unwrap());
    }
    req
}

fn metadata<'a>(md: &'a tonic::metadata::MetadataMap, name: &str) -> &'a str {
    md.get(name)
        .unwrap_or_else(|| panic!("no {name} in {md:?}"))
        .to_str()
        .unwrap()
}

/// One raw HTTP/2 request, to see exactly what goes on the wire: status, headers, every body
/// frame and the trailers.
async fn raw_h2<IO>(io: IO, path: &str, content_type: &str) -> RawResponse
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    RawResponse {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

struct RawResponse {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

impl RawResponse {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    /// The `google.rpc.Status` of a trailers-only response, as tonic reads it.
    fn status(&self) -> Status {
        Status::from_header_map(&self.headers).expect("grpc-status in the headers")
    }
}

#[tokio::test]
async fn allowed_calls_carry_the_fields_and_the_call_after_the_capacity_is_resource_exhausted() {
    let layer = RateLimitLayer::builder("2/m".parse().unwrap())
        .policy("grpc")
        .key(Header::new("x-api-key").unwrap())
        .build()
        .unwrap();
    let (addr, _reporter) = serve_grpc(layer).await;
    let mut client = client(addr).await;
    for remaining in ["1", "0"] {
        let res = client.check(check(Some("sk_alice"))).await.unwrap();
        assert_eq!(
            res.get_ref().status,
            health_check_response::ServingStatus::Serving as i32
        );
        let md = res.metadata();
        assert_eq!(
            metadata(md, "ratelimit"),
            format!("\"grpc\";r={remaining};t=30")
        );
        assert_eq!(metadata(md, "ratelimit-policy"), "\"grpc\";q=2;w=60");
    }
    let status = client.check(check(Some("sk_alice"))).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("policy \"grpc\""), "{status:?}");
    // Two calls at once used the capacity of 2/m: the third waits for one interval (30 s),
    // less the moments that passed since the first.
    let retry = status
        .get_details_retry_info()
        .expect("RetryInfo")
        .retry_delay
        .expect("a retry delay");
    assert!(
        retry > Duration::from_secs(29) && retry <= Duration::from_secs(30),
        "{retry:?}"
    );
    assert_eq!(retry.subsec_nanos() % 1_000_000, 0, "whole milliseconds");
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations.len(), 1);
    assert_eq!(quota.violations[0].subject, "policy:grpc");
    assert!(quota.violations[0].description.contains("2/m"));
    // The rate-limit fields and Retry-After go out as metadata on the denial too.
    assert_eq!(metadata(status.metadata(), "retry-after"), "30");
    assert_eq!(
        metadata(status.metadata(), "ratelimit"),
        "\"grpc\";r=0;t=30"
    );
    // The identity is a credential: nowhere in what the client is told.
    assert!(!format!("{status:?}").contains("sk_alice"));
    assert!(!String::from_utf8_lossy(status.details()).contains("sk_alice"));
    // Another client has its own limit.
    client.check(check(Some("sk_bob"))).await.unwrap();
}

#[tokio::test]
async fn a_denial_is_a_trailers_only_response_with_http_200() {
    let layer = RateLimitLayer::builder("1/h".parse().unwrap())
        .key(ClientIp::new())
        .build()
        .unwrap();
    let (addr, _reporter) = serve_grpc(layer).await;
    let tcp = || async { tokio::net::TcpStream::connect(addr).await.unwrap() };
    // A Check with no message is answered by the service (a decode error), after the layer
    // admitted it: what matters is that it was charged.
    raw_h2(tcp().await, CHECK, "application/grpc").await;
    let res = raw_h2(tcp().await, CHECK, "application/grpc").await;
    assert_eq!(res.status, http::StatusCode::OK);
    assert_eq!(res.header("content-type"), "application/grpc");
    assert_eq!(res.header("grpc-status"), "8");
    assert!(res.headers.contains_key("grpc-message"));
    assert!(res.headers.contains_key("grpc-status-details-bin"));
    assert!(res.body.is_empty(), "{:?}", res.body);
    assert!(res.trailers.is_none(), "trailers-only: {:?}", res.trailers);
    let status = res.status();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let retry = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(retry > Duration::from_secs(3590) && retry <= Duration::from_secs(3600));
    assert_eq!(
        status.get_details_quota_failure().unwrap().violations[0].subject,
        "policy:default"
    );
    // The peer (from tonic's TcpConnectInfo) is the key, and never shown to the client.
    assert!(!format!("{:?}", res.headers).contains("127.0.0.1"));
}

#[tokio::test]
async fn http_and_grpc_share_one_limit_and_http_still_gets_429() {
    // One layer (one store, one policy) in front of a tonic server and an axum router; both
    // identify the client by its peer address, from tonic's TcpConnectInfo and axum's
    // ConnectInfo.
    let layer = RateLimitLayer::builder("3/h".parse().unwrap())
        .policy("shared")
        .key(ClientIp::new())
        .build()
        .unwrap();
    let (grpc_addr, _reporter) = serve_grpc(layer.clone()).await;
    let app = Router::new()
        .route("/api", get(|| async { "hello" }))
        .layer(layer.clone());
    let http_addr = common::http::serve(app).await;
    let http = reqwest::Client::new();
    let url = format!("http://{http_addr}/api");
    let mut grpc = client(grpc_addr).await;

    let res = http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["ratelimit"], "\"shared\";r=2;t=1200");
    let res = grpc.check(check(None)).await.unwrap();
    assert_eq!(
        metadata(res.metadata(), "ratelimit"),
        "\"shared\";r=1;t=1200"
    );
    let res = http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["ratelimit"], "\"shared\";r=0;t=1200");

    let status = grpc.check(check(None)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.get_details_quota_failure().unwrap().violations[0].subject,
        "policy:shared"
    );
    // A request that is not gRPC, through the same layer: the HTTP rejection.
    let res = http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert!(res.headers().get("grpc-status").is_none());
    assert!(res.headers().contains_key("retry-after"));
    assert!(res.text().await.unwrap().contains("Too Many Requests"));
    let stats = layer.stats();
    assert_eq!((stats.allowed, stats.denied), (3, 2));
}

#[tokio::test]
async fn a_streaming_call_is_charged_once_when_it_starts() {
    let layer = RateLimitLayer::builder("2/h".parse().unwrap())
        .policy("stream")
        .key(Header::new("x-api-key").unwrap())
        .build()
        .unwrap();
    let (addr, reporter) = serve_grpc(layer.clone()).await;
    let mut client = client(addr).await;
    let watch = client.watch(check(Some("sk_stream"))).await.unwrap();
    assert_eq!(
        metadata(watch.metadata(), "ratelimit"),
        "\"stream\";r=1;t=1800"
    );
    let mut stream = watch.into_inner();
    // Several messages on the one stream.
    let mut seen = Vec::new();
    for status in [
        ServingStatus::NotServing,
        ServingStatus::Serving,
        ServingStatus::NotServing,
    ] {
        let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("a Watch update within 5 s")
            .unwrap()
            .expect("the stream is open");
        seen.push(msg.status);
        reporter.set_service_status("", status).await;
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(
        layer.stats().allowed,
        1,
        "the stream counts once, not per message"
    );
    // One unit is left of 2: one Check passes, the next call (stream or not) does not.
    let res = client.check(check(Some("sk_stream"))).await.unwrap();
    assert_eq!(
        metadata(res.metadata(), "ratelimit"),
        "\"stream\";r=0;t=1800"
    );
    let status = client.watch(check(Some("sk_stream"))).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.get_details_retry_info().is_some());
    // The open stream is never cut off by the limit.
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the open stream still gets updates")
        .unwrap()
        .expect("the stream is open");
    assert_eq!(
        msg.status,
        health_check_response::ServingStatus::NotServing as i32
    );
}

#[tokio::test]
async fn a_cost_closure_weights_methods_and_skip_gives_a_method_its_own_policy() {
    // Every call: 10/h, Watch costing 4. Check only: 2/h more, in a layer of its own.
    let all = RateLimitLayer::builder("10/h".parse().unwrap())
        .policy("all")
        .key(Header::new("x-api-key").unwrap())
        .cost(|req| match req.uri.path() {
            "/grpc.health.v1.Health/Watch" => 4,
            _ => 1,
        })
        .build()
        .unwrap();
    let checks = RateLimitLayer::builder("2/h".parse().unwrap())
        .policy("check")
        .key(Header::new("x-api-key").unwrap())
        .skip(|req| req.uri.path() != CHECK)
        .build()
        .unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (all_layer, checks_layer) = (all.clone(), checks.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(all_layer)
            .layer(checks_layer)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let mut client = client(addr).await;
    let watch = client.watch(check(Some("k"))).await.unwrap();
    assert_eq!(metadata(watch.metadata(), "ratelimit"), "\"all\";r=6;t=360");
    client.check(check(Some("k"))).await.unwrap();
    client.check(check(Some("k"))).await.unwrap();
    let status = client.check(check(Some("k"))).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.get_details_quota_failure().unwrap().violations[0].subject,
        "policy:check"
    );
    // The Check denied by "check" got its charge on "all" back (it never reached the
    // service): 10 - 4 - 2 = 4 left, one more Watch. Watch is not limited by "check".
    let watch = client.watch(check(Some("k"))).await.unwrap();
    assert_eq!(metadata(watch.metadata(), "ratelimit"), "\"all\";r=0;t=360");
    assert_eq!(all.stats().refunds, 1);
    let status = client.watch(check(Some("k"))).await.unwrap_err();
    assert_eq!(
        status.get_details_quota_failure().unwrap().violations[0].subject,
        "policy:all"
    );
    // The two Watches admitted by "all" skipped "check"; the third never reached it.
    assert_eq!(checks.stats().unlimited, 2);
}

#[tokio::test]
async fn grpc_answers_can_be_forced_on_or_off_per_layer() {
    // Always: even a request without a gRPC content type gets the gRPC status.
    let always = RateLimitLayer::builder("1/h".parse().unwrap())
        .key(ClientIp::new())
        .grpc(GrpcMode::Always)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/api", get(|| async { "hello" }))
        .layer(always);
    let addr = common::http::serve(app).await;
    let url = format!("http://{addr}/api");
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 200);
    let res = reqwest::get(&url).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["grpc-status"], "8");
    assert_eq!(res.headers()["content-type"], "application/grpc");
    assert!(res.bytes().await.unwrap().is_empty());

    // Never: a gRPC call gets the layer's HTTP rejection (which a gRPC client cannot read).
    let never = RateLimitLayer::builder("1/h".parse().unwrap())
        .key(ClientIp::new())
        .grpc(GrpcMode::Never)
        .build()
        .unwrap();
    let (addr, _reporter) = serve_grpc(never).await;
    let tcp = || async { tokio::net::TcpStream::connect(addr).await.unwrap() };
    raw_h2(tcp().await, CHECK, "application/grpc").await;
    let res = raw_h2(tcp().await, CHECK, "application/grpc").await;
    assert_eq!(res.status, http::StatusCode::TOO_MANY_REQUESTS);
    assert!(!res.headers.contains_key("grpc-status"));
    let status = client(addr).await.check(check(None)).await.unwrap_err();
    assert_ne!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test]
async fn a_client_that_cannot_be_identified_gets_internal() {
    // Over a Unix socket tonic has no TcpConnectInfo, so ClientIp finds no peer address: a
    // misconfiguration, answered INTERNAL (HTTP: 500).
    let layer = RateLimitLayer::builder("10/h".parse().unwrap())
        .key(ClientIp::new())
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("tollgate-grpc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("internal.sock");
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
    let uds = tokio::net::UnixStream::connect(&path).await.unwrap();
    let res = raw_h2(uds, CHECK, "application/grpc").await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(res.status, http::StatusCode::OK);
    assert_eq!(res.header("grpc-status"), "13");
    let status = res.status();
    assert_eq!(status.code(), Code::Internal);
    assert!(status.message().contains("cannot identify the client"));
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_failed_store_under_fail_closed_gives_unavailable_with_a_retry_hint() {
    use common::redis::RedisServer;
    common::redis::require_binaries();
    let mut redis = RedisServer::start();
    let store = tollgate::RedisStore::builder(&redis.url())
        .command_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let layer = RateLimitLayer::builder("10/h".parse().unwrap())
        .key(Header::new("x-api-key").unwrap())
        .store(store)
        .fail_mode(tollgate::FailMode::Closed)
        .build()
        .unwrap();
    let (addr, _reporter) = serve_grpc(layer).await;
    let mut client = client(addr).await;
    client.check(check(Some("k"))).await.unwrap();
    redis.kill();
    let status = client.check(check(Some("k"))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("cannot decide"), "{status:?}");
    assert_eq!(
        status.get_details_retry_info().unwrap().retry_delay,
        Some(Duration::from_secs(1))
    );
}

#[test]
fn the_example_serves_health_behind_the_limit_and_exits_on_sigterm() {
    let demo = common::demo::Demo::start_example(
        "grpc",
        &[
            "--rate",
            "2/m",
            "--capacity",
            "3",
            "--key",
            "metadata:x-api-key",
        ],
    );
    assert!(
        demo.banner
            .starts_with("tollgate grpc demo listening on http://127.0.0.1:"),
        "{}",
        demo.banner
    );
    let addr = demo.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = client(addr).await;
        for remaining in ["2", "1", "0"] {
            let res = client.check(check(Some("sk_demo"))).await.unwrap();
            let field = metadata(res.metadata(), "ratelimit").to_owned();
            assert!(
                field.starts_with(&format!("\"default\";r={remaining};")),
                "{field}"
            );
        }
        let status = client.check(check(Some("sk_demo"))).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let retry = status
            .get_details_retry_info()
            .unwrap()
            .retry_delay
            .unwrap();
        assert!(
            retry > Duration::from_secs(29) && retry <= Duration::from_secs(30),
            "{retry:?}"
        );
        assert_eq!(
            status.get_details_quota_failure().unwrap().violations[0].subject,
            "policy:default"
        );
        // Without the metadata entry: the peer IP is the key, with a limit of its own.
        client.check(check(None)).await.unwrap();
        // A stream is charged when it starts.
        let watch = client.watch(check(Some("sk_other"))).await.unwrap();
        assert!(metadata(watch.metadata(), "ratelimit").starts_with("\"default\";r=2;"));
    });
    drop(rt);
    let status = demo.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_example_rejects_a_bad_key_flag_with_what_to_write() {
    let out = std::process::Command::new(common::demo::example_binary("grpc"))
        .args(["--listen", "127.0.0.1:0", "--key", "cookie:x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("write ip or metadata:NAME"), "{stderr}");
}

/// `skip_successful` on a gRPC service: only failed calls count. tonic answers an error status
/// trailers-only (HTTP 200, `grpc-status` in the headers), and that is what the preset reads:
/// successful checks are refunded, checks of an unknown service (NOT_FOUND) keep their
/// charge, and once two of those are counted every call is RESOURCE_EXHAUSTED.
#[tokio::test]
async fn skip_successful_counts_only_failed_grpc_calls() {
    let layer = RateLimitLayer::builder("2/m".parse().unwrap())
        .policy("grpc-failures")
        .key(Header::new("x-api-key").unwrap())
        .skip_successful()
        .build()
        .unwrap();
    let (addr, _reporter) = serve_grpc(layer).await;
    let mut c = client(addr).await;
    for _ in 0..5 {
        let ok = c.check(check(Some("caller"))).await;
        assert!(ok.is_ok(), "successful calls are refunded: {ok:?}");
    }
    let unknown = || {
        let mut req = Request::new(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        });
        req.metadata_mut()
            .insert("x-api-key", "caller".parse().unwrap());
        req
    };
    for _ in 0..2 {
        let failed = c.check(unknown()).await.unwrap_err();
        assert_eq!(failed.code(), Code::NotFound, "{failed:?}");
    }
    let limited = c.check(check(Some("caller"))).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    // A denial is never refunded, so the limit stays in force.
    let again = c.check(check(Some("caller"))).await.unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted, "{again:?}");
}
