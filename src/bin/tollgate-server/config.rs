//! The configuration file: TOML read with spans, so that every mistake is reported as
//! `file:line:column: field: what is wrong; what to write instead`, then checked into a
//! [`Config`] that the server can build from without further failure (besides connecting to a
//! store).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use tollgate::key::ForwardedHeader;
use tollgate::{BreakerConfig, FailMode, HeaderStyle, Quota, RejectionBody, Tiers};
use toml::Spanned;

/// A configuration mistake, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigFileError {
    /// The file, as given on the command line.
    pub(crate) file: PathBuf,
    /// 1-based line, 0 when the file could not be read at all.
    pub(crate) line: usize,
    /// 1-based column.
    pub(crate) column: usize,
    /// The setting, e.g. `policy[1].quota`; empty for a syntax error.
    pub(crate) field: String,
    /// What is wrong and what to write instead.
    pub(crate) message: String,
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigFileError {}

/// The checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Config {
    pub(crate) listen: SocketAddr,
    pub(crate) http: HttpLimits,
    pub(crate) response: ResponseConfig,
    pub(crate) store: StoreConfig,
    pub(crate) clients: Clients,
    pub(crate) policies: Vec<PolicyConfig>,
}

/// How the server treats connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HttpLimits {
    /// A connection that has not sent a whole request head within this is closed.
    pub(crate) header_read_timeout: Duration,
    /// A connection with no traffic for this long is closed.
    pub(crate) idle_timeout: Duration,
    /// Connections beyond this many wait, unaccepted, until one closes.
    pub(crate) max_connections: usize,
    /// The largest request head (431 beyond it).
    pub(crate) max_header_bytes: usize,
    /// On SIGTERM, open connections get this long to finish.
    pub(crate) shutdown_timeout: Duration,
}

/// What denied checks answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResponseConfig {
    pub(crate) status: http::StatusCode,
    pub(crate) headers: HeaderStyle,
    pub(crate) body: RejectionBody,
}

/// Which store holds the limits, and how it fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoreConfig {
    pub(crate) kind: StoreKind,
    pub(crate) fail_mode: FailMode,
}

/// The store itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreKind {
    Memory {
        max_keys: usize,
    },
    Redis {
        url: String,
        options: RedisOptions,
    },
    Cluster {
        nodes: Vec<String>,
        options: RedisOptions,
    },
    /// The primary that a set of Redis Sentinels names for `master`, followed across failovers.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        options: RedisOptions,
    },
}

impl StoreKind {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Memory { .. } => "memory",
            Self::Redis { .. } => "redis",
            Self::Cluster { .. } => "cluster",
            Self::Sentinel { .. } => "sentinel",
        }
    }
}

/// What every Redis-backed store kind shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisOptions {
    pub(crate) prefix: Option<String>,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) deny_cache: bool,
    pub(crate) breaker: Option<BreakerConfig>,
}

/// How clients are told apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Clients {
    /// Peers whose forwarding headers (client address, original method, URI, host, tier) count.
    pub(crate) trusted_proxies: Vec<IpNet>,
    pub(crate) ip_header: ForwardedHeader,
    pub(crate) ipv6_prefix: u8,
}

/// One policy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PolicyConfig {
    pub(crate) name: String,
    pub(crate) limit: Limit,
    pub(crate) key: KeyKind,
    pub(crate) matcher: Matcher,
    pub(crate) dry_run: bool,
}

/// A policy's quotas, or its tiers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Limit {
    Quotas(Vec<Quota>),
    Tiers {
        tiers: TiersSpec,
        /// A header the proxy sets to the client's tier name (read from trusted peers only).
        header: Option<http::HeaderName>,
        /// Identities (API keys, IP addresses) that start in a tier.
        assigned: BTreeMap<String, String>,
    },
}

impl Limit {
    /// The limit's canonical text: two limits are the same state iff their texts are equal.
    pub(crate) fn canonical(&self) -> String {
        match self {
            Self::Quotas(quotas) => quotas
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" & "),
            Self::Tiers { tiers, .. } => tiers.0.to_string(),
        }
    }
}

/// Parsed tiers, compared by their text (two parses of one text are the same tiers).
#[derive(Debug, Clone)]
pub(crate) struct TiersSpec(pub(crate) Tiers);

impl PartialEq for TiersSpec {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

/// How a policy identifies the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyKind {
    /// The client address (the socket peer, or what a trusted proxy forwarded).
    Ip,
    /// A header's value (e.g. an API key); requests without it are not limited by the policy.
    Header(http::HeaderName),
    /// A header's value if present, else the client address.
    HeaderOrIp(http::HeaderName),
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip => f.write_str("ip"),
            Self::Header(h) => write!(f, "header:{h}"),
            Self::HeaderOrIp(h) => write!(f, "header-or-ip:{h}"),
        }
    }
}

/// Which requests a policy applies to; an empty list matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Matcher {
    /// Lower case, without a port.
    pub(crate) hosts: Vec<String>,
    /// Upper case.
    pub(crate) methods: Vec<String>,
    pub(crate) path_prefixes: Vec<String>,
}

// ---- the file as written -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    response: RawResponse,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    clients: RawClients,
    #[serde(default)]
    policy: Vec<Spanned<RawPolicy>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    header_read_timeout_ms: Option<Spanned<u64>>,
    idle_timeout_ms: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    max_header_bytes: Option<Spanned<u64>>,
    shutdown_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResponse {
    status: Option<Spanned<u16>>,
    headers: Option<Spanned<String>>,
    body: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<Spanned<String>>,
    max_keys: Option<Spanned<u64>>,
    url: Option<Spanned<String>>,
    nodes: Option<Spanned<Vec<String>>>,
    sentinels: Option<Spanned<Vec<String>>>,
    master: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    timeout_ms: Option<Spanned<u64>>,
    connect_timeout_ms: Option<Spanned<u64>>,
    fail_mode: Option<Spanned<String>>,
    deny_cache: Option<Spanned<bool>>,
    breaker: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawClients {
    trusted_proxies: Option<Vec<Spanned<String>>>,
    ip_header: Option<Spanned<String>>,
    ipv6_prefix: Option<Spanned<u8>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<Spanned<String>>,
    quota: Option<Spanned<String>>,
    quotas: Option<Spanned<Vec<Spanned<String>>>>,
    tiers: Option<Spanned<String>>,
    tier_header: Option<Spanned<String>>,
    tier_of: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    key: Option<Spanned<String>>,
    hosts: Option<Vec<Spanned<String>>>,
    methods: Option<Vec<Spanned<String>>>,
    path_prefixes: Option<Vec<Spanned<String>>>,
    dry_run: Option<bool>,
}

/// Turns byte spans into `file:line:column` errors.
struct Locator<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, span: Range<usize>, field: &str, message: impl Into<String>) -> ConfigFileError {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigFileError {
            file: self.file.to_path_buf(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// The defaults, in one place (the sample config documents the same values).
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
const DEFAULT_MAX_HEADER_BYTES: u64 = 16 * 1024;
const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_STORE_TIMEOUT_MS: u64 = 50;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;

/// Reads and checks the file at `path`.
pub(crate) fn load(path: &Path) -> Result<Config, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        field: String::new(),
        message: format!("cannot read the configuration file: {e}"),
    })?;
    parse(path, &text)
}

/// Checks `text`, the contents of `file`.
pub(crate) fn parse(file: &Path, text: &str) -> Result<Config, ConfigFileError> {
    let at = Locator { file, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let mut error = at.at(span, "", e.message().trim_end().to_owned());
        // A wrong value (say a string for a number) is reported with the key of its line.
        if let Some((key, _)) = text
            .lines()
            .nth(error.line.saturating_sub(1))
            .and_then(|l| l.split_once('='))
        {
            let key = key.trim();
            if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                error.field = key.to_owned();
            }
        }
        error
    })?;
    let listen = match &raw.listen {
        None => DEFAULT_LISTEN.parse().unwrap_or_else(|_| unreachable!()),
        Some(l) => l.get_ref().parse::<SocketAddr>().map_err(|_| {
            at.at(
                l.span(),
                "listen",
                format!(
                    "{:?} is not an address with a port; write e.g. \"127.0.0.1:8080\" or \"[::1]:8080\"",
                    l.get_ref()
                ),
            )
        })?,
    };
    let http = http_limits(&at, &raw.http)?;
    let response = response(&at, &raw.response)?;
    let store = store(&at, &raw.store)?;
    let clients = clients(&at, &raw.clients)?;
    if raw.policy.is_empty() {
        return Err(at.at(
            text.len()..text.len(),
            "policy",
            "no policy is declared; add one, e.g.\n[[policy]]\nname = \"default\"\nquota = \"60/m\"\nkey = \"ip\"",
        ));
    }
    let mut policies: Vec<PolicyConfig> = Vec::with_capacity(raw.policy.len());
    for (i, p) in raw.policy.iter().enumerate() {
        let policy = policy(&at, i, p)?;
        if policies.iter().any(|known| known.name == policy.name) {
            let span = p.get_ref().name.as_ref().map_or(p.span(), Spanned::span);
            return Err(at.at(
                span,
                &format!("policy[{i}].name"),
                format!(
                    "another policy is already called {:?}; give each policy its own name",
                    policy.name
                ),
            ));
        }
        if let Limit::Tiers { tiers, .. } = &policy.limit {
            for tier in tiers.0.policies() {
                if tier.name() != policy.name
                    && policies.iter().any(|known| {
                        known.name == tier.name() || tier_names(known).any(|n| n == tier.name())
                    })
                {
                    let span = p.get_ref().tiers.as_ref().map_or(p.span(), Spanned::span);
                    return Err(at.at(
                        span,
                        &format!("policy[{i}].tiers"),
                        format!(
                            "the tier name {:?} is already used by another policy; tier names \
                             name their state in the store, so rename the tier",
                            tier.name()
                        ),
                    ));
                }
            }
        }
        policies.push(policy);
    }
    Ok(Config {
        listen,
        http,
        response,
        store,
        clients,
        policies,
    })
}

fn tier_names(policy: &PolicyConfig) -> impl Iterator<Item = &str> {
    let tiers = match &policy.limit {
        Limit::Tiers { tiers, .. } => Some(tiers.0.policies().iter().map(|p| p.name())),
        Limit::Quotas(_) => None,
    };
    tiers.into_iter().flatten()
}

fn millis(
    at: &Locator<'_>,
    value: Option<&Spanned<u64>>,
    field: &str,
    default: u64,
    allow_zero: bool,
) -> Result<Duration, ConfigFileError> {
    match value {
        None => Ok(Duration::from_millis(default)),
        Some(v) if *v.get_ref() == 0 && !allow_zero => Err(at.at(
            v.span(),
            field,
            format!("0 is not a timeout; write a number of milliseconds, e.g. {default}"),
        )),
        Some(v) => Ok(Duration::from_millis(*v.get_ref())),
    }
}

fn count(
    at: &Locator<'_>,
    value: Option<&Spanned<u64>>,
    field: &str,
    default: u64,
) -> Result<usize, ConfigFileError> {
    match value {
        None => Ok(default as usize),
        Some(v) => match usize::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(at.at(
                v.span(),
                field,
                format!(
                    "{} is not a usable count; write a number from 1 up, e.g. {default}",
                    v.get_ref()
                ),
            )),
        },
    }
}

fn http_limits(at: &Locator<'_>, raw: &RawHttp) -> Result<HttpLimits, ConfigFileError> {
    Ok(HttpLimits {
        header_read_timeout: millis(
            at,
            raw.header_read_timeout_ms.as_ref(),
            "http.header_read_timeout_ms",
            DEFAULT_HEADER_READ_TIMEOUT_MS,
            false,
        )?,
        idle_timeout: millis(
            at,
            raw.idle_timeout_ms.as_ref(),
            "http.idle_timeout_ms",
            DEFAULT_IDLE_TIMEOUT_MS,
            false,
        )?,
        max_connections: count(
            at,
            raw.max_connections.as_ref(),
            "http.max_connections",
            DEFAULT_MAX_CONNECTIONS,
        )?,
        max_header_bytes: {
            let n = count(
                at,
                raw.max_header_bytes.as_ref(),
                "http.max_header_bytes",
                DEFAULT_MAX_HEADER_BYTES,
            )?;
            if n < 1024 {
                let span = raw.max_header_bytes.as_ref().map_or(0..0, Spanned::span);
                return Err(at.at(
                    span,
                    "http.max_header_bytes",
                    format!("{n} bytes cannot hold a proxy's request head; write at least 1024, e.g. 16384"),
                ));
            }
            n
        },
        shutdown_timeout: millis(
            at,
            raw.shutdown_timeout_ms.as_ref(),
            "http.shutdown_timeout_ms",
            DEFAULT_SHUTDOWN_TIMEOUT_MS,
            true,
        )?,
    })
}

fn response(at: &Locator<'_>, raw: &RawResponse) -> Result<ResponseConfig, ConfigFileError> {
    let status = match &raw.status {
        None => http::StatusCode::TOO_MANY_REQUESTS,
        Some(s) => match http::StatusCode::from_u16(*s.get_ref()) {
            Ok(code) if (400..=599).contains(&code.as_u16()) => code,
            _ => {
                return Err(at.at(
                    s.span(),
                    "response.status",
                    format!(
                        "{} is not an error status; write 429 (the default), or 403 behind nginx \
                         auth_request (which understands only 2xx, 401 and 403)",
                        s.get_ref()
                    ),
                ));
            }
        },
    };
    let headers = match &raw.headers {
        None => HeaderStyle::default(),
        Some(h) => h.get_ref().parse::<HeaderStyle>().map_err(|_| {
            at.at(
                h.span(),
                "response.headers",
                format!(
                    "{:?} is not a header style; write one of \"ietf\" (the default), \"legacy\", \"both\", \"none\"",
                    h.get_ref()
                ),
            )
        })?,
    };
    let body = match raw.body.as_ref().map(|b| (b.get_ref().as_str(), b)) {
        None | Some(("text", _)) => RejectionBody::Text,
        Some(("json", _)) => RejectionBody::Json,
        Some(("empty", _)) => RejectionBody::Empty,
        Some((other, b)) => {
            return Err(at.at(
                b.span(),
                "response.body",
                format!(
                    "{other:?} is not a body kind; write one of \"text\" (the default), \"json\", \"empty\""
                ),
            ));
        }
    };
    Ok(ResponseConfig {
        status,
        headers,
        body,
    })
}

fn store(at: &Locator<'_>, raw: &RawStore) -> Result<StoreConfig, ConfigFileError> {
    let kind_name = raw.kind.as_ref().map_or("memory", |k| k.get_ref().as_str());
    let kind_span = raw.kind.as_ref().map_or(0..0, Spanned::span);
    let fail_mode = match &raw.fail_mode {
        None => FailMode::default(),
        Some(f) => f.get_ref().parse::<FailMode>().map_err(|_| {
            at.at(
                f.span(),
                "store.fail_mode",
                format!(
                    "{:?} is not a fail mode; write one of \"open\" (the default: allow and warn), \
                     \"closed\" (503), \"fallback\" or \"fallback/N\" (a local limit of limit/N)",
                    f.get_ref()
                ),
            )
        })?,
    };
    // A setting that belongs to another kind of store is a mistake, not something to ignore.
    let only_for = |span: Range<usize>, field: &str, kinds: &str| {
        at.at(
            span,
            &format!("store.{field}"),
            format!(
                "{field} is a setting of kind = {kinds}, not of kind = {kind_name:?}; remove it or change the kind"
            ),
        )
    };
    let redis_only: [(&str, Option<Range<usize>>); 5] = [
        ("prefix", raw.prefix.as_ref().map(Spanned::span)),
        ("timeout_ms", raw.timeout_ms.as_ref().map(Spanned::span)),
        (
            "connect_timeout_ms",
            raw.connect_timeout_ms.as_ref().map(Spanned::span),
        ),
        ("deny_cache", raw.deny_cache.as_ref().map(Spanned::span)),
        ("breaker", raw.breaker.as_ref().map(Spanned::span)),
    ];
    let kind = match kind_name {
        "memory" => {
            for (field, span) in &redis_only {
                if let Some(span) = span {
                    return Err(only_for(
                        span.clone(),
                        field,
                        "\"redis\", \"cluster\" or \"sentinel\"",
                    ));
                }
            }
            if let Some(url) = &raw.url {
                return Err(only_for(url.span(), "url", "\"redis\""));
            }
            if let Some(nodes) = &raw.nodes {
                return Err(only_for(nodes.span(), "nodes", "\"cluster\""));
            }
            sentinel_only(raw, &only_for)?;
            let max_keys = count(
                at,
                raw.max_keys.as_ref(),
                "store.max_keys",
                tollgate::DEFAULT_MAX_KEYS as u64,
            )?;
            StoreKind::Memory { max_keys }
        }
        "redis" | "cluster" | "sentinel" => {
            if let Some(m) = &raw.max_keys {
                return Err(only_for(m.span(), "max_keys", "\"memory\""));
            }
            let breaker = match &raw.breaker {
                None => Some(BreakerConfig::default()),
                Some(b) if b.get_ref() == "off" => None,
                Some(b) => Some(b.get_ref().parse::<BreakerConfig>().map_err(|e| {
                    at.at(
                        b.span(),
                        "store.breaker",
                        format!("{e}; write FAILURES/COOLDOWN_MS, e.g. \"3/1000\" (the default), or \"off\""),
                    )
                })?),
            };
            if let Some(p) = &raw.prefix
                && p.get_ref().is_empty()
            {
                return Err(at.at(
                    p.span(),
                    "store.prefix",
                    "an empty prefix would mix tollgate's keys with others; write e.g. \"tollgate\" or remove the setting",
                ));
            }
            let options = RedisOptions {
                prefix: raw.prefix.as_ref().map(|p| p.get_ref().clone()),
                timeout: millis(
                    at,
                    raw.timeout_ms.as_ref(),
                    "store.timeout_ms",
                    DEFAULT_STORE_TIMEOUT_MS,
                    false,
                )?,
                connect_timeout: millis(
                    at,
                    raw.connect_timeout_ms.as_ref(),
                    "store.connect_timeout_ms",
                    DEFAULT_CONNECT_TIMEOUT_MS,
                    false,
                )?,
                deny_cache: raw.deny_cache.as_ref().is_none_or(|d| *d.get_ref()),
                breaker,
            };
            if kind_name == "sentinel" {
                if let Some(url) = &raw.url {
                    return Err(only_for(url.span(), "url", "\"redis\""));
                }
                if let Some(nodes) = &raw.nodes {
                    return Err(only_for(nodes.span(), "nodes", "\"cluster\""));
                }
                let Some(sentinels) = raw.sentinels.as_ref().filter(|n| !n.get_ref().is_empty())
                else {
                    return Err(at.at(
                        raw.sentinels.as_ref().map_or(kind_span, Spanned::span),
                        "store.sentinels",
                        "kind = \"sentinel\" needs the sentinels' addresses: add sentinels = [\"10.0.0.5:26379\", \"10.0.0.6:26379\", \"10.0.0.7:26379\"]",
                    ));
                };
                for sentinel in sentinels.get_ref() {
                    check_sentinel_addr(at, sentinel, sentinels.span())?;
                }
                let master = match &raw.master {
                    None => DEFAULT_SENTINEL_MASTER.to_owned(),
                    Some(m) if m.get_ref().trim().is_empty() => {
                        return Err(at.at(
                            m.span(),
                            "store.master",
                            "the master name is empty; write the NAME of the sentinels' `sentinel monitor NAME host port quorum`, e.g. \"mymaster\" (the default)",
                        ));
                    }
                    Some(m) => m.get_ref().trim().to_owned(),
                };
                StoreKind::Sentinel {
                    sentinels: sentinels.get_ref().clone(),
                    master,
                    options,
                }
            } else if kind_name == "redis" {
                sentinel_only(raw, &only_for)?;
                if let Some(nodes) = &raw.nodes {
                    return Err(only_for(nodes.span(), "nodes", "\"cluster\""));
                }
                let Some(url) = &raw.url else {
                    return Err(at.at(
                        kind_span,
                        "store.url",
                        "kind = \"redis\" needs the server's address: add url = \"redis://127.0.0.1:6379\"",
                    ));
                };
                check_redis_url(at, url.get_ref(), url.span(), "store.url")?;
                StoreKind::Redis {
                    url: url.get_ref().clone(),
                    options,
                }
            } else {
                if !cfg!(feature = "redis-cluster") {
                    return Err(at.at(
                        kind_span,
                        "store.kind",
                        "this tollgate-server is built without Redis Cluster support; rebuild with \
                         --features server,redis-cluster, or use kind = \"redis\"",
                    ));
                }
                sentinel_only(raw, &only_for)?;
                if let Some(url) = &raw.url {
                    return Err(only_for(url.span(), "url", "\"redis\""));
                }
                let Some(nodes) = raw.nodes.as_ref().filter(|n| !n.get_ref().is_empty()) else {
                    return Err(at.at(
                        raw.nodes.as_ref().map_or(kind_span, Spanned::span),
                        "store.nodes",
                        "kind = \"cluster\" needs some of the cluster's nodes: add nodes = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]",
                    ));
                };
                for node in nodes.get_ref() {
                    check_redis_url(at, node, nodes.span(), "store.nodes")?;
                }
                StoreKind::Cluster {
                    nodes: nodes.get_ref().clone(),
                    options,
                }
            }
        }
        other => {
            return Err(at.at(
                kind_span,
                "store.kind",
                format!(
                    "{other:?} is not a store kind; write one of \"memory\" (the default: this \
                     process only), \"redis\" (with url = ...), \"cluster\" (with nodes = [...]), \
                     \"sentinel\" (with sentinels = [...] and master = ...)"
                ),
            ));
        }
    };
    Ok(StoreConfig { kind, fail_mode })
}

/// The master name a `sentinel` store looks for when the file names none.
const DEFAULT_SENTINEL_MASTER: &str = "mymaster";

/// `sentinels` and `master` belong to kind = "sentinel" only.
fn sentinel_only(
    raw: &RawStore,
    only_for: &dyn Fn(Range<usize>, &str, &str) -> ConfigFileError,
) -> Result<(), ConfigFileError> {
    if let Some(sentinels) = &raw.sentinels {
        return Err(only_for(sentinels.span(), "sentinels", "\"sentinel\""));
    }
    if let Some(master) = &raw.master {
        return Err(only_for(master.span(), "master", "\"sentinel\""));
    }
    Ok(())
}

/// A sentinel's address: `host:port` (or a redis:// URL, as the library takes).
fn check_sentinel_addr(
    at: &Locator<'_>,
    addr: &str,
    span: Range<usize>,
) -> Result<(), ConfigFileError> {
    let addr = addr.trim();
    if addr.starts_with("redis://") || addr.starts_with("rediss://") {
        return check_redis_url(at, addr, span, "store.sentinels");
    }
    let port_ok = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if port_ok {
        Ok(())
    } else {
        Err(at.at(
            span,
            "store.sentinels",
            "each sentinel is host:port, e.g. \"10.0.0.5:26379\" (or a redis:// URL)",
        ))
    }
}

fn check_redis_url(
    at: &Locator<'_>,
    url: &str,
    span: Range<usize>,
    field: &str,
) -> Result<(), ConfigFileError> {
    let ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
        .iter()
        .any(|scheme| url.len() > scheme.len() && url.starts_with(scheme));
    if ok {
        Ok(())
    } else {
        // The URL may hold a password: it is not repeated.
        Err(at.at(
            span,
            field,
            "this is not a Redis URL; write e.g. \"redis://127.0.0.1:6379\" (or rediss:// for TLS)",
        ))
    }
}

fn clients(at: &Locator<'_>, raw: &RawClients) -> Result<Clients, ConfigFileError> {
    let mut trusted_proxies = Vec::new();
    for (i, cidr) in raw.trusted_proxies.iter().flatten().enumerate() {
        let text = cidr.get_ref().trim();
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| {
                at.at(
                    cidr.span(),
                    &format!("clients.trusted_proxies[{i}]"),
                    format!(
                        "{text:?} is not an address range; write e.g. \"10.0.0.0/8\", \"127.0.0.1/32\" or \"::1/128\""
                    ),
                )
            })?;
        trusted_proxies.push(net);
    }
    let ip_header = match raw
        .ip_header
        .as_ref()
        .map(|h| (h.get_ref().to_ascii_lowercase(), h))
    {
        None => ForwardedHeader::XRealIp,
        Some((name, h)) => match name.as_str() {
            "x-real-ip" => ForwardedHeader::XRealIp,
            "x-forwarded-for" => ForwardedHeader::XForwardedFor,
            "forwarded" => ForwardedHeader::Forwarded,
            _ => {
                return Err(at.at(
                    h.span(),
                    "clients.ip_header",
                    format!(
                        "{:?} is not a forwarding header tollgate reads; write one of \"x-real-ip\" \
                         (the default), \"x-forwarded-for\", \"forwarded\"",
                        h.get_ref()
                    ),
                ));
            }
        },
    };
    let ipv6_prefix = match &raw.ipv6_prefix {
        None => 56,
        Some(p) if (1..=128).contains(p.get_ref()) => *p.get_ref(),
        Some(p) => {
            return Err(at.at(
                p.span(),
                "clients.ipv6_prefix",
                format!(
                    "{} is not a prefix length; write 1 to 128, e.g. 56 (the default) or 64",
                    p.get_ref()
                ),
            ));
        }
    };
    Ok(Clients {
        trusted_proxies,
        ip_header,
        ipv6_prefix,
    })
}

fn quota(at: &Locator<'_>, q: &Spanned<String>, field: &str) -> Result<Quota, ConfigFileError> {
    // The quota's own error says what is wrong and what to write.
    q.get_ref()
        .trim()
        .parse::<Quota>()
        .map_err(|e| at.at(q.span(), field, e.to_string()))
}

fn header_name(
    at: &Locator<'_>,
    text: &str,
    span: Range<usize>,
    field: &str,
    example: &str,
) -> Result<http::HeaderName, ConfigFileError> {
    http::HeaderName::from_bytes(text.trim().as_bytes()).map_err(|_| {
        at.at(
            span,
            field,
            format!("{text:?} is not a header name; write e.g. {example:?}"),
        )
    })
}

fn policy(
    at: &Locator<'_>,
    i: usize,
    spanned: &Spanned<RawPolicy>,
) -> Result<PolicyConfig, ConfigFileError> {
    let raw = spanned.get_ref();
    let field = |name: &str| format!("policy[{i}].{name}");
    let Some(name) = &raw.name else {
        return Err(at.at(
            spanned.span(),
            &field("name"),
            "this policy has no name; add name = \"api\" (it is sent in RateLimit-Policy and names its state in the store)",
        ));
    };
    tollgate::Policy::new(name.get_ref(), Quota::per_second(1).unwrap_or_else(|_| unreachable!()))
        .map_err(|_| {
            at.at(
                name.span(),
                &field("name"),
                format!(
                    "{:?} is not a policy name; use 1 to 64 ASCII letters, digits and -_.: (e.g. \"api\")",
                    name.get_ref()
                ),
            )
        })?;
    let given: Vec<(&str, Range<usize>)> = [
        raw.quota.as_ref().map(|q| ("quota", q.span())),
        raw.quotas.as_ref().map(|q| ("quotas", q.span())),
        raw.tiers.as_ref().map(|t| ("tiers", t.span())),
    ]
    .into_iter()
    .flatten()
    .collect();
    match given.as_slice() {
        [] => {
            return Err(at.at(
                name.span(),
                &field("quota"),
                "this policy has no limit; add quota = \"60/m\" (or quotas = [\"10/s\", \"1000/h\"], or tiers = \"free=60/m,pro=600/m\")",
            ));
        }
        [_] => {}
        [(first, _), (second, span), ..] => {
            return Err(at.at(
                span.clone(),
                &field(second),
                format!(
                    "give exactly one of quota, quotas, tiers; this policy has {first} and {second}: \
                     remove one (several quotas go into one list: quotas = [\"10/s\", \"1000/h\"])"
                ),
            ));
        }
    }
    if raw.tiers.is_none() {
        for (set, what) in [
            (raw.tier_header.as_ref().map(Spanned::span), "tier_header"),
            (raw.tier_of.as_ref().map(Spanned::span), "tier_of"),
        ] {
            if let Some(span) = set {
                return Err(at.at(
                    span,
                    &field(what),
                    format!("{what} needs tiers to choose from: add tiers = \"free=60/m,pro=600/m\" or remove {what}"),
                ));
            }
        }
    }
    let limit = if let Some(q) = &raw.quota {
        Limit::Quotas(vec![quota(at, q, &field("quota"))?])
    } else if let Some(list) = &raw.quotas {
        let quotas = list
            .get_ref()
            .iter()
            .enumerate()
            .map(|(j, q)| quota(at, q, &field(&format!("quotas[{j}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        tollgate::Policy::multi(name.get_ref(), quotas.iter().copied())
            .map_err(|e| at.at(list.span(), &field("quotas"), e.to_string()))?;
        Limit::Quotas(quotas)
    } else {
        let t = raw
            .tiers
            .as_ref()
            .unwrap_or_else(|| unreachable!("one of the three is given"));
        let tiers = t.get_ref().parse::<Tiers>().map_err(|e| {
            at.at(
                t.span(),
                &field("tiers"),
                format!("{e} (write e.g. \"free=60/m,pro=600/m;capacity=1000\"; the first tier is the default)"),
            )
        })?;
        let header = match &raw.tier_header {
            None => None,
            Some(h) => Some(header_name(
                at,
                h.get_ref(),
                h.span(),
                &field("tier_header"),
                "x-tier",
            )?),
        };
        let mut assigned = BTreeMap::new();
        if let Some(map) = &raw.tier_of {
            for (identity, tier) in map.get_ref() {
                if tiers.get(tier.get_ref()).is_none() {
                    let names: Vec<&str> = tiers.policies().iter().map(|p| p.name()).collect();
                    // The identity may be an API key: it is not repeated.
                    return Err(at.at(
                        tier.span(),
                        &field("tier_of"),
                        format!(
                            "{:?} is not one of this policy's tiers; write one of {}",
                            tier.get_ref(),
                            names.join(", ")
                        ),
                    ));
                }
                assigned.insert(identity.clone(), tier.get_ref().clone());
            }
        }
        Limit::Tiers {
            tiers: TiersSpec(tiers),
            header,
            assigned,
        }
    };
    let key = match &raw.key {
        None => KeyKind::Ip,
        Some(k) => {
            let text = k.get_ref().trim();
            let example = "write \"ip\", \"header:x-api-key\" or \"header-or-ip:x-api-key\"";
            if text == "ip" {
                KeyKind::Ip
            } else if let Some(h) = text.strip_prefix("header:") {
                KeyKind::Header(header_name(
                    at,
                    h,
                    k.span(),
                    &field("key"),
                    "header:x-api-key",
                )?)
            } else if let Some(h) = text.strip_prefix("header-or-ip:") {
                KeyKind::HeaderOrIp(header_name(
                    at,
                    h,
                    k.span(),
                    &field("key"),
                    "header-or-ip:x-api-key",
                )?)
            } else {
                return Err(at.at(
                    k.span(),
                    &field("key"),
                    format!("{text:?} is not a key kind; {example}"),
                ));
            }
        }
    };
    let mut matcher = Matcher::default();
    for (j, h) in raw.hosts.iter().flatten().enumerate() {
        let host = h.get_ref().trim().to_ascii_lowercase();
        if host.is_empty() || host.contains(['/', ' ', ':']) {
            return Err(at.at(
                h.span(),
                &field(&format!("hosts[{j}]")),
                format!("{:?} is not a host name; write it without scheme or port, e.g. \"api.example.com\"", h.get_ref()),
            ));
        }
        matcher.hosts.push(host);
    }
    for (j, m) in raw.methods.iter().flatten().enumerate() {
        let method = m.get_ref().trim().to_ascii_uppercase();
        if http::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
            return Err(at.at(
                m.span(),
                &field(&format!("methods[{j}]")),
                format!(
                    "{:?} is not an HTTP method; write e.g. \"GET\" or \"POST\"",
                    m.get_ref()
                ),
            ));
        }
        matcher.methods.push(method);
    }
    for (j, p) in raw.path_prefixes.iter().flatten().enumerate() {
        if !p.get_ref().starts_with('/') {
            return Err(at.at(
                p.span(),
                &field(&format!("path_prefixes[{j}]")),
                format!(
                    "{:?} does not start with /; write e.g. \"/api/\"",
                    p.get_ref()
                ),
            ));
        }
        matcher.path_prefixes.push(p.get_ref().clone());
    }
    Ok(PolicyConfig {
        name: name.get_ref().clone(),
        limit,
        key,
        matcher,
        dry_run: raw.dry_run.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigFileError {
        parse(Path::new("t.toml"), text).expect_err("the config is wrong")
    }

    #[test]
    fn sample_config_parses() {
        let text = include_str!("../../../examples/tollgate.toml");
        let config = parse(Path::new("examples/tollgate.toml"), text).expect("the sample works");
        assert_eq!(
            config.store.kind,
            StoreKind::Memory {
                max_keys: 1_000_000
            }
        );
        assert_eq!(config.policies.len(), 1);
        assert_eq!(config.clients.ip_header, ForwardedHeader::XRealIp);
    }

    #[test]
    fn errors_name_line_column_and_field() {
        let e = err("[[policy]]\nname = \"api\"\nquota = \"60/x\"\n");
        assert_eq!((e.line, e.column), (3, 9), "{e}");
        assert_eq!(e.field, "policy[0].quota");
        assert!(
            e.to_string()
                .starts_with("t.toml:3:9: policy[0].quota: \"60/x\" is not a quota"),
            "{e}"
        );
        let e = err("[store]\nkind = \"memcached\"\n[[policy]]\nname = \"a\"\nquota = \"1/s\"\n");
        assert_eq!((e.line, e.field.as_str()), (2, "store.kind"), "{e}");
        let e = err("[[policy]]\nname = \"a\"\nquota = \"1/s\"\nquotaa = 3\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("quotaa"), "{e}");
        let e =
            err("[http]\nidle_timeout_ms = \"60s\"\n[[policy]]\nname = \"a\"\nquota = \"1/s\"\n");
        assert_eq!((e.line, e.field.as_str()), (2, "idle_timeout_ms"), "{e}");
        assert!(e.message.contains("expected u64"), "{e}");
    }
}
