//! `tollgate-server`: a rate-limit decision service for proxies, for apps in any language.
//!
//! nginx (`auth_request`), Caddy (`forward_auth`), Traefik (ForwardAuth) and Envoy (`ext_authz`
//! over HTTP) ask it about each request at `/check`; it answers 200 with the `RateLimit` fields
//! to admit, or the configured status (429, or 403 for nginx) with `Retry-After` to deny. Its
//! limits are tollgate's own layers and stores, so every proxy instance on one Redis shares
//! one limit.
//!
//! ```text
//! cargo run --features server --bin tollgate-server -- --config examples/tollgate.toml
//! curl -i -H 'X-Real-IP: 192.0.2.1' http://127.0.0.1:8080/check
//! ```
//!
//! Flags: `--config FILE` (required), `--listen ADDR` (overrides the file's `listen`),
//! `--check` (check the file and exit). Signals: SIGHUP reloads the file (a broken one is
//! logged and the running configuration keeps serving), SIGTERM and SIGINT stop it gracefully.
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`, without per-request denials).

mod app;
mod config;
mod serve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::sync::watch;

use crate::app::{Generation, Live};

/// tollgate-server: rate-limit decisions for nginx auth_request, Caddy forward_auth, Traefik
/// ForwardAuth and Envoy ext_authz.
#[derive(Debug, Parser)]
#[command(name = "tollgate-server", version)]
struct Args {
    /// The configuration file (TOML); see examples/tollgate.toml.
    #[arg(long = "config", value_name = "FILE")]
    config: PathBuf,
    /// Listen on ADDR instead of the file's `listen` (e.g. 127.0.0.1:0 for any free port).
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Check the configuration file, print what it declares, and exit.
    #[arg(long = "check")]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    let config = match config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("tollgate-server did not start: fix the configuration and run it again");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "{}: ok (store: {}, policies: {})",
            args.config.display(),
            config.store.kind.name(),
            config
                .policies
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, config))
}

async fn run(args: Args, config: config::Config) -> ExitCode {
    // The recorder comes first: layers register their metrics when they are built.
    let metrics = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(target: "tollgate::server", error = %e, "no /metrics: cannot install the recorder");
            None
        }
    };
    let listen = args.listen.unwrap_or(config.listen);
    let (generation, _) = match app::build(config, None).await {
        Ok(built) => built,
        Err(e) => {
            eprintln!("error: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    let listener = match bind(listen, generation.config.http.max_connections) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(listen);
    let names: Vec<String> = generation
        .config
        .policies
        .iter()
        .map(|p| p.name.clone())
        .collect();
    println!(
        "tollgate-server listening on http://{addr} (store: {}, policies: {})",
        generation.store.config.kind.name(),
        names.join(", ")
    );
    let live: Live = Arc::new(arc_swap::ArcSwap::from_pointee(generation));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(signals(args.config.clone(), Arc::clone(&live), stop));
    let shared = serve::Shared { live, metrics };
    match serve::run(listener, shared, stopped).await {
        Ok(()) => {
            println!("tollgate-server stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A listener with a backlog of `max_connections` (bounded by the kernel's somaxconn).
fn bind(addr: SocketAddr, max_connections: usize) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(max_connections.clamp(128, 65_535)).unwrap_or(1024))
}

/// SIGHUP reloads; SIGTERM or SIGINT stops.
async fn signals(path: PathBuf, live: Live, stop: watch::Sender<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!(target: "tollgate::server", "cannot install signal handlers; stopping");
        let _ = stop.send(true);
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&path, &live).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(target: "tollgate::server", "stopping: no new connections, open ones finish");
    let _ = stop.send(true);
}

/// Reads the file again; a valid configuration replaces the running one in one step, keeping
/// the state of unchanged policies; an invalid one is logged and changes nothing.
async fn reload(path: &Path, live: &Live) {
    let old = live.load_full();
    let config = match config::load(path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(target: "tollgate::server", "reload rejected, the running configuration keeps serving: {e}");
            return;
        }
    };
    let restart_only = restart_only(&old, &config);
    match app::build(config, Some(&old)).await {
        Ok((generation, changes)) => {
            live.store(Arc::new(generation));
            tracing::info!(
                target: "tollgate::server",
                kept = ?changes.kept,
                rebuilt = ?changes.rebuilt,
                store_rebuilt = changes.store_rebuilt,
                "configuration reloaded"
            );
            for setting in restart_only {
                tracing::warn!(target: "tollgate::server", "{setting} changed: it takes effect on restart");
            }
        }
        Err(e) => {
            tracing::error!(target: "tollgate::server", "reload rejected, the running configuration keeps serving: {}: {e}", path.display());
        }
    }
}

/// The settings a reload cannot change on a running server.
fn restart_only(old: &Generation, new: &config::Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.config.listen != new.listen {
        changed.push("listen");
    }
    if old.config.http.max_connections != new.http.max_connections {
        changed.push("http.max_connections");
    }
    changed
}

/// Logs to stderr, filtered by `RUST_LOG`; by default `info`, without the `tollgate::limited`
/// event of every denied request.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tollgate::limited=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
