//! Who is the client? [`KeyExtractor`]s turn a request into a [`Key`], or `None`.
//!
//! `None` means **not limited**, as nginx treats an empty key: the request passes without
//! touching the store and without rate-limit headers. That is the allowlist idiom:
//!
//! ```
//! use http::request::Parts;
//! use tollgate::Key;
//!
//! // API keys are limited per key; the internal monitoring key is never limited.
//! let by_api_key = |req: &Parts| -> Option<Key> {
//!     let key = req.headers.get("x-api-key")?.as_bytes();
//!     (key != b"internal-monitoring").then(|| Key::new(key.to_vec()))
//! };
//! # let _ = by_api_key;
//! ```
//!
//! Built-ins: [`ClientIp`] (socket peer, trusted-proxy aware, IPv6 prefix grouping),
//! [`Header`], [`ApiKeyOrIp`] and [`Global`]. Any `Fn(&Parts) -> Option<impl Into<Key>>` works.
//!
#![doc = include_str!("../docs/proxies.md")]

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::HeaderName;
use http::request::Parts;
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::error::ConfigError;

/// A client's identity, as bytes. Long identities are hashed so that every key is short.
///
/// Keys up to [`Key::MAX_LEN`] bytes are kept as they are; a longer one is replaced by `#` and
/// the hex SHA-256 of its bytes (65 bytes in all). The mapping stays injective (a kept key is
/// never 65 bytes long), and a client sending a 64 KiB API key costs the store no more memory
/// than any other client.
#[derive(Clone)]
pub struct Key(Repr);

/// Short keys (IP addresses, typical API keys) live inline: building one allocates nothing.
#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Bytes),
}

/// The longest key stored inline.
const INLINE: usize = 38;

impl Key {
    /// The longest key kept verbatim; longer keys are hashed.
    pub const MAX_LEN: usize = 64;

    /// A key from any bytes; hashed when longer than [`Key::MAX_LEN`].
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.len() <= INLINE {
            return Self::from_slice(&bytes);
        }
        if bytes.len() <= Self::MAX_LEN {
            return Self(Repr::Shared(bytes));
        }
        Self::from_parts(&[&bytes])
    }

    /// A key from borrowed bytes: no allocation when it is short.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self::from_parts(&[bytes])
    }

    /// A key from the concatenation of `parts`, without building the concatenation first:
    /// inline when short, hashed piece by piece when long.
    pub fn from_parts(parts: &[&[u8]]) -> Self {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len <= INLINE {
            let mut bytes = [0u8; INLINE];
            let mut at = 0;
            for part in parts {
                bytes[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            // len <= INLINE < 256.
            return Self(Repr::Inline {
                len: len as u8,
                bytes,
            });
        }
        if len <= Self::MAX_LEN {
            return Self(Repr::Shared(Bytes::from(parts.concat())));
        }
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update(part);
        }
        let mut out = [0u8; 1 + 64];
        out[0] = b'#';
        // Fails only on a length mismatch: 32 digest bytes fill the 64 bytes after the `#`.
        hex::encode_to_slice(hasher.finalize(), &mut out[1..]).expect("32 bytes are 64 hex digits");
        Self(Repr::Shared(Bytes::copy_from_slice(&out)))
    }

    /// A key from a static string, without allocating (hashed if it is too long).
    pub fn from_static(s: &'static str) -> Self {
        Self::new(Bytes::from_static(s.as_bytes()))
    }

    /// The key's bytes (after hashing, if it was long).
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(b) => b,
        }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl Key {
    /// A short, stable name for this key in logs and traces: a keyed hash of its bytes.
    ///
    /// Within one process the same key always has the same fingerprint, so the log lines of
    /// one client can be followed; across processes (restarts, other app servers) fingerprints
    /// differ. The hash (SipHash, a keyed pseudorandom function) is keyed by a random secret
    /// created once per process and never exposed, so a fingerprint cannot be turned back into
    /// the key, nor checked against guesses (an IP address, a leaked API key), without that
    /// secret. Fingerprints are 64 bits: two keys can share one, rarely; they name keys for
    /// people reading logs, they are not identities.
    pub fn fingerprint(&self) -> Fingerprint {
        static SECRET: OnceLock<RandomState> = OnceLock::new();
        let hash = SECRET
            .get_or_init(RandomState::new)
            .hash_one(self.as_bytes());
        Fingerprint(hash.to_be_bytes())
    }

    /// The key's bytes as text, non-printable bytes escaped as `\xNN`: **dangerous**.
    ///
    /// Keys are identities, and identities are credentials: an API key is a secret, and an IP
    /// address is personal data. That is why `Key` has no `Display` and its `Debug` shows only
    /// the [`fingerprint`](Key::fingerprint). Use this only where a user explicitly asked to
    /// see keys, in debugging or operator tools, never in routine logs, metrics or responses.
    pub fn raw(&self) -> RawKey<'_> {
        RawKey(self)
    }
}

/// Shows the [fingerprint](Key::fingerprint), never the key: `Key(fp:0123456789abcdef)`.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(fp:{})", self.fingerprint())
    }
}

/// A keyed hash of a [`Key`], safe to log: see [`Key::fingerprint`]. Shown (`Display` and
/// `Debug`) as 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 8]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; 16];
        // Fails only on a length mismatch: 8 bytes are 16 hex digits.
        hex::encode_to_slice(self.0, &mut text).map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A key's raw bytes as text, from [`Key::raw`] (read its warning): bytes that are not
/// printable ASCII are escaped as `\xNN`.
#[derive(Clone, Copy)]
pub struct RawKey<'a>(&'a Key);

impl fmt::Display for RawKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.as_bytes().escape_ascii())
    }
}

impl fmt::Debug for RawKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawKey(\"{self}\")")
    }
}

impl From<String> for Key {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        Self::from_slice(s.as_bytes())
    }
}

impl From<Vec<u8>> for Key {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

impl From<&[u8]> for Key {
    fn from(v: &[u8]) -> Self {
        Self::from_slice(v)
    }
}

impl From<Bytes> for Key {
    fn from(b: Bytes) -> Self {
        Self::new(b)
    }
}

impl From<IpAddr> for Key {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ipv4_key(&[], v4),
            IpAddr::V6(v6) => ipv6_key(&[], v6, None),
        }
    }
}

impl From<u64> for Key {
    fn from(n: u64) -> Self {
        Self::from_slice(itoa::Buffer::new().format(n).as_bytes())
    }
}

/// `prefix` + dotted IPv4, octet by octet from a table: no `core::fmt`, no allocation.
fn ipv4_key(prefix: &[u8], ip: std::net::Ipv4Addr) -> Key {
    // Written straight into the inline key when it fits (always, for the built-in prefixes),
    // with room for the last octet's three-byte store.
    let mut bytes = [0u8; INLINE];
    let Some(start) = bytes
        .get_mut(..prefix.len())
        .filter(|_| prefix.len() + 15 + 2 <= INLINE)
    else {
        let mut text = TextBuf::<15>::new();
        write_ipv4(ip, |b| text.push(b));
        return Key::from_parts(&[prefix, text.as_bytes()]);
    };
    start.copy_from_slice(prefix);
    let mut len = prefix.len();
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0
            && let Some(dot) = bytes.get_mut(len)
        {
            *dot = b'.';
            len += 1;
        }
        let (digits, n) = OCTET_TEXT[usize::from(octet)];
        // Three bytes stored, `n` kept: the table pads with zeros, and the next dot overwrites
        // the first of them, so the key's padding stays zero.
        if let Some(slot) = bytes.get_mut(len..len + 3) {
            slot.copy_from_slice(&digits);
            len += usize::from(n);
        }
    }
    // len <= INLINE < 256.
    Key(Repr::Inline {
        len: len as u8,
        bytes,
    })
}

/// Each octet's decimal text, left-aligned in three bytes, and its length.
const OCTET_TEXT: [([u8; 3], u8); 256] = {
    let mut table = [([0u8; 3], 0u8); 256];
    let mut i = 0;
    while i < 256 {
        let n = i as u8;
        table[i] = if n >= 100 {
            ([b'0' + n / 100, b'0' + n / 10 % 10, b'0' + n % 10], 3)
        } else if n >= 10 {
            ([b'0' + n / 10, b'0' + n % 10, 0], 2)
        } else {
            ([b'0' + n, 0, 0], 1)
        };
        i += 1;
    }
    table
};

/// The dotted-decimal text of `ip`, byte by byte (at most 15).
#[inline]
fn write_ipv4(ip: std::net::Ipv4Addr, mut push: impl FnMut(u8)) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            push(b'.');
        }
        if octet >= 100 {
            push(b'0' + octet / 100);
        }
        if octet >= 10 {
            push(b'0' + octet / 10 % 10);
        }
        push(b'0' + octet % 10);
    }
}

/// `prefix` + an IPv6 address in its RFC 5952 text form, and `/bits` when grouped by prefix,
/// written on the stack.
fn ipv6_key(prefix: &[u8], ip: Ipv6Addr, bits: Option<u8>) -> Key {
    use std::fmt::Write as _;
    // The longest form, `ffff:...:ffff/128` or `::ffff:255.255.255.255/128`, is 43 bytes.
    let mut text = TextBuf::<48>::new();
    let written = match bits {
        Some(bits) => write!(text, "{ip}/{bits}"),
        None => write!(text, "{ip}"),
    };
    if written.is_ok() {
        return Key::from_parts(&[prefix, text.as_bytes()]);
    }
    // Unreachable with the buffer above; a longer text would still give the exact key.
    let text = match bits {
        Some(bits) => format!("{ip}/{bits}"),
        None => ip.to_string(),
    };
    Key::from_parts(&[prefix, text.as_bytes()])
}

/// A short ASCII text built on the stack. Bytes past the capacity are dropped (callers size it
/// for the longest text they write).
struct TextBuf<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> TextBuf<N> {
    fn new() -> Self {
        Self {
            bytes: [0; N],
            len: 0,
        }
    }

    #[inline]
    fn push(&mut self, byte: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&self.bytes)
    }
}

impl<const N: usize> fmt::Write for TextBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let slot = self.bytes.get_mut(self.len..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Turns a request into the key it is limited under, or `None` for "not limited".
///
/// Implemented for every `Fn(&Parts) -> Option<K>` where `K: Into<Key>`.
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key for this request; `None` lets it through unlimited.
    fn extract(&self, req: &Parts) -> Option<Key>;

    /// The key for this request, or why the request cannot be keyed at all. This is what the
    /// layer calls; the provided method never fails and returns [`extract`](Self::extract)'s
    /// answer.
    ///
    /// # Errors
    /// A [`KeyError`] when the request lacks what the extractor needs to tell clients apart
    /// and guessing would be wrong (e.g. [`ClientIp`] without a peer address): the layer
    /// answers such a request with `500` and logs the error.
    fn try_extract(&self, req: &Parts) -> Result<Option<Key>, KeyError> {
        Ok(self.extract(req))
    }

    /// The keys this extractor could have given a client identified by `identity`: its API
    /// key or header value, or its IP address as text (`192.0.2.1`, `2001:db8::1`,
    /// `[2001:db8::1]`). With them an admin can reset what one identity maps to (see
    /// [`Store::reset`](crate::Store::reset)) without knowing the internal key layout: IPv6
    /// prefix grouping, IPv4-mapped addresses, `key:`/`ip:` prefixes, hashing of long keys.
    ///
    /// Empty means the extractor cannot say (the provided method, and so every closure), or
    /// that no request from such an identity is ever limited under a key of its own.
    fn keys_for_identity(&self, identity: &str) -> Vec<Key> {
        let _ = identity;
        Vec::new()
    }
}

impl<F, K> KeyExtractor for F
where
    F: Fn(&Parts) -> Option<K> + Send + Sync + 'static,
    K: Into<Key>,
{
    fn extract(&self, req: &Parts) -> Option<Key> {
        self(req).map(Into::into)
    }
}

impl<E: KeyExtractor + ?Sized> KeyExtractor for Arc<E> {
    fn extract(&self, req: &Parts) -> Option<Key> {
        (**self).extract(req)
    }

    fn try_extract(&self, req: &Parts) -> Result<Option<Key>, KeyError> {
        (**self).try_extract(req)
    }

    fn keys_for_identity(&self, identity: &str) -> Vec<Key> {
        (**self).keys_for_identity(identity)
    }
}

/// Why a request could not be keyed; see [`KeyExtractor::try_extract`]. Each message says
/// what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// [`ClientIp`] (or [`ApiKeyOrIp`] without an API key) found no peer address on the
    /// request, and [`MissingPeer::Reject`] (the default) is in force.
    #[error("{}", missing_peer_message(cfg!(feature = "axum")))]
    MissingPeer,
}

/// What to change when requests carry no peer address; `axum`: whether tollgate is built with
/// its `axum` feature (without it, axum's `ConnectInfo` is never read).
fn missing_peer_message(axum: bool) -> &'static str {
    if axum {
        "ClientIp found no peer address on the request: serve axum with \
         `into_make_service_with_connect_info::<SocketAddr>()`, serve tonic over TCP with \
         tollgate's `tonic` feature, or (hyper) insert a `tollgate::key::PeerAddr` extension \
         into each request; to key such requests anyway, see `ClientIp::on_missing_peer`"
    } else {
        "ClientIp found no peer address on the request: tollgate is built without its `axum` \
         feature, so axum's `ConnectInfo` is not read at all; enable the feature and serve axum \
         with `into_make_service_with_connect_info::<SocketAddr>()`, serve tonic over TCP with \
         tollgate's `tonic` feature, or (hyper) insert a `tollgate::key::PeerAddr` extension \
         into each request; to key such requests anyway, see `ClientIp::on_missing_peer`"
    }
}

/// What [`ClientIp`] does with a request that carries no peer address (no axum `ConnectInfo`,
/// no [`PeerAddr`] extension). See [`ClientIp::on_missing_peer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingPeer {
    /// [`KeyExtractor::try_extract`] fails with [`KeyError::MissingPeer`]: the layer answers
    /// `500` and logs the error, so the misconfiguration shows on the first request. The
    /// default.
    #[default]
    Reject,
    /// All such requests share one key, `unknown` (one bucket for all of them); an error is
    /// logged once.
    SharedKey,
    /// Such requests are not limited.
    Unlimited,
}

/// The socket peer's address, for servers that are not axum: insert it into each request's
/// extensions (hyper's `service_fn` knows the peer when it accepts the connection).
///
/// [`ClientIp`] reads it first, then axum's `ConnectInfo<SocketAddr>`, then (feature `tonic`)
/// tonic's `TcpConnectInfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The header a trusted proxy writes the client's address into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (the default).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for="[2001:db8::1]:4711"`.
    Forwarded,
    /// `X-Real-IP: client` (one address, as nginx's realip module sets).
    XRealIp,
}

/// The client's IP address: the socket peer, or, behind trusted proxies, the address they
/// forwarded. IPv6 clients are grouped by prefix (default /56: one household or small office).
///
/// Forwarding headers are read only when the socket peer is inside a trusted range, right to
/// left, skipping trusted hops; all header lines are joined into one list. A hop that is not an
/// address stops the walk at the last trusted address: a client cannot skip past it by writing
/// garbage. IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) count as IPv4.
///
/// ```
/// use tollgate::key::{ClientIp, ForwardedHeader};
///
/// let ip = ClientIp::new()
///     .trust("10.0.0.0/8")?            // your load balancers
///     .header(ForwardedHeader::XForwardedFor)
///     .ipv6_prefix(64)?;
/// # let _ = ip;
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
///
/// The peer address comes from axum's `ConnectInfo<SocketAddr>` (serve with
/// `into_make_service_with_connect_info::<SocketAddr>()`), from tonic's `TcpConnectInfo` (with
/// the `tonic` feature: tonic inserts it for TCP connections, with `serve` and with
/// `serve_with_incoming`), or from a [`PeerAddr`] extension.
///
/// A request with neither is **rejected** by default ([`MissingPeer::Reject`]):
/// [`try_extract`](KeyExtractor::try_extract) fails with [`KeyError::MissingPeer`], and the
/// layer answers `500` and logs an error that says how to fix it. A missing peer address is
/// always a deployment mistake (axum served without `ConnectInfo`, a hyper server that does not
/// insert [`PeerAddr`]), and it hits every request alike. Keying such requests all under one
/// shared key turns the per-client limit into one global limit, which passes a developer's
/// tests and then throttles every user at once in production; leaving them unlimited silently
/// disables the limit. Failing on the first request of the first test makes the mistake
/// impossible to miss. Choose [`MissingPeer::SharedKey`] or [`MissingPeer::Unlimited`] with
/// [`on_missing_peer`](ClientIp::on_missing_peer) where requests without a peer are expected.
///
/// [`extract`](KeyExtractor::extract), which cannot fail, gives the shared key `unknown` for
/// such requests under both `Reject` and `SharedKey` (logging an error once) and `None` under
/// `Unlimited`. The layer never calls `extract` on the built-in extractors; it calls
/// `try_extract`.
#[derive(Debug, Clone)]
pub struct ClientIp {
    trusted: Arc<[IpNet]>,
    header: ForwardedHeader,
    ipv6_prefix: u8,
    on_missing_peer: MissingPeer,
    warned: Arc<AtomicBool>,
}

impl Default for ClientIp {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientIp {
    /// The socket peer's address; no proxy is trusted; IPv6 grouped by /56.
    pub fn new() -> Self {
        Self {
            trusted: Arc::from(Vec::new()),
            header: ForwardedHeader::default(),
            ipv6_prefix: 56,
            on_missing_peer: MissingPeer::Reject,
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Trusts proxies in `cidr` (`10.0.0.0/8`, `fd00::/8`, or a single address).
    ///
    /// # Errors
    /// [`ConfigError::Cidr`] when `cidr` is neither a network nor an address.
    pub fn trust(self, cidr: &str) -> Result<Self, ConfigError> {
        let net = parse_cidr(cidr)?;
        Ok(self.trust_net(net))
    }

    /// Trusts proxies in `net`.
    #[must_use]
    pub fn trust_net(mut self, net: IpNet) -> Self {
        let mut nets = self.trusted.to_vec();
        nets.push(net.trunc());
        self.trusted = nets.into();
        self
    }

    /// Which forwarding header the trusted proxies set (default `X-Forwarded-For`). Only that
    /// one is read: a client-supplied copy of another header is never believed.
    #[must_use]
    pub fn header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// Groups IPv6 clients by this prefix length (1..=128; default 56, 128 = no grouping).
    ///
    /// # Errors
    /// [`ConfigError::Ipv6Prefix`] outside 1..=128.
    pub fn ipv6_prefix(mut self, bits: u8) -> Result<Self, ConfigError> {
        if !(1..=128).contains(&bits) {
            return Err(ConfigError::Ipv6Prefix(bits));
        }
        self.ipv6_prefix = bits;
        Ok(self)
    }

    /// What to do with a request that carries no peer address (default
    /// [`MissingPeer::Reject`]; see the [type docs](ClientIp) for why).
    #[must_use]
    pub fn on_missing_peer(mut self, mode: MissingPeer) -> Self {
        self.on_missing_peer = mode;
        self
    }

    /// The client's address (before IPv6 grouping), or `None` when the request carries no
    /// peer address.
    pub fn client_addr(&self, req: &Parts) -> Option<IpAddr> {
        let peer = peer_addr(req)?.to_canonical();
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let mut current = peer;
        let mut walk = |hop: Option<IpAddr>| -> Option<IpAddr> {
            match hop {
                Some(ip) if self.is_trusted(ip) => {
                    current = ip;
                    None
                }
                Some(ip) => Some(ip),
                None => Some(current),
            }
        };
        let found = match self.header {
            ForwardedHeader::XForwardedFor => {
                hops_right_to_left(req, "x-forwarded-for", parse_xff_hop, &mut walk)
            }
            ForwardedHeader::Forwarded => {
                hops_right_to_left(req, "forwarded", parse_forwarded_hop, &mut walk)
            }
            ForwardedHeader::XRealIp => {
                hops_right_to_left(req, "x-real-ip", parse_xff_hop, &mut walk)
            }
        };
        Some(found.unwrap_or(current))
    }

    /// The key text for `ip`: IPv4 as is, IPv6 as its prefix (`2001:db8:abcd::/56`).
    fn key_for(&self, prefix: &[u8], ip: IpAddr) -> Key {
        match ip {
            IpAddr::V4(v4) => ipv4_key(prefix, v4),
            IpAddr::V6(v6) if self.ipv6_prefix == 128 => ipv6_key(prefix, v6, None),
            IpAddr::V6(v6) => {
                let mask = u128::MAX << (128 - u32::from(self.ipv6_prefix));
                let net = Ipv6Addr::from(u128::from(v6) & mask);
                ipv6_key(prefix, net, Some(self.ipv6_prefix))
            }
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The key for the request's client, after `prefix`; without a peer address, what
    /// [`MissingPeer`] says.
    fn try_key(&self, prefix: &[u8], req: &Parts) -> Result<Option<Key>, KeyError> {
        match self.client_addr(req) {
            Some(ip) => Ok(Some(self.key_for(prefix, ip))),
            None => match self.on_missing_peer {
                MissingPeer::Reject => Err(KeyError::MissingPeer),
                MissingPeer::SharedKey => Ok(Some(self.unknown(prefix))),
                MissingPeer::Unlimited => Ok(None),
            },
        }
    }

    /// [`try_key`](Self::try_key) for `extract`, which cannot fail: `Reject` becomes the
    /// shared key too.
    fn key(&self, prefix: &[u8], req: &Parts) -> Option<Key> {
        match self.try_key(prefix, req) {
            Ok(key) => key,
            Err(KeyError::MissingPeer) => Some(self.unknown(prefix)),
        }
    }

    /// The key shared by every request without a peer address; logs an error the first time.
    fn unknown(&self, prefix: &[u8]) -> Key {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::error!(
                target: "tollgate::key",
                "{}. All such requests share the key \"unknown\"",
                missing_peer_message(cfg!(feature = "axum"))
            );
        }
        Key::from_parts(&[prefix, b"unknown"])
    }
}

impl KeyExtractor for ClientIp {
    fn extract(&self, req: &Parts) -> Option<Key> {
        self.key(b"", req)
    }

    fn try_extract(&self, req: &Parts) -> Result<Option<Key>, KeyError> {
        self.try_key(b"", req)
    }

    /// The key of the client at IP address `identity` (IPv6 grouped by the configured prefix,
    /// IPv4-mapped IPv6 as IPv4); none when `identity` is not an IP address.
    fn keys_for_identity(&self, identity: &str) -> Vec<Key> {
        parse_identity_ip(identity)
            .map(|ip| self.key_for(b"", ip))
            .into_iter()
            .collect()
    }
}

/// `identity` as a client address: `192.0.2.1`, `2001:db8::1` or `[2001:db8::1]`, mapped IPv4
/// unwrapped.
fn parse_identity_ip(identity: &str) -> Option<IpAddr> {
    let ip = match identity.strip_prefix('[') {
        Some(rest) => IpAddr::V6(rest.strip_suffix(']')?.parse().ok()?),
        None => identity.parse().ok()?,
    };
    Some(ip.to_canonical())
}

fn parse_cidr(s: &str) -> Result<IpNet, ConfigError> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| ConfigError::Cidr(s.chars().take(80).collect()))
}

fn peer_addr(req: &Parts) -> Option<IpAddr> {
    if let Some(PeerAddr(addr)) = req.extensions.get::<PeerAddr>() {
        return Some(addr.ip());
    }
    #[cfg(feature = "axum")]
    if let Some(info) = req
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(info.0.ip());
    }
    #[cfg(feature = "tonic")]
    if let Some(info) = req
        .extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
    {
        return info.remote_addr().map(|addr| addr.ip());
    }
    None
}

/// Walks the hops of header `name` (all lines joined) from the right. `visit` gets each parsed
/// hop (`None` for one that is not an address) and returns `Some` to stop with that address.
///
/// Lines are read as bytes: a byte that is not ASCII (which proxies pass on) makes only its own
/// hop unparseable, never the whole line.
fn hops_right_to_left(
    req: &Parts,
    name: &str,
    parse: fn(&[u8]) -> Option<IpAddr>,
    visit: &mut dyn FnMut(Option<IpAddr>) -> Option<IpAddr>,
) -> Option<IpAddr> {
    for line in req.headers.get_all(name).iter().rev() {
        for hop in line.as_bytes().rsplit(|&b| b == b',') {
            let hop = hop.trim_ascii();
            if hop.is_empty() {
                continue;
            }
            if let Some(ip) = visit(parse(hop).map(|ip| ip.to_canonical())) {
                return Some(ip);
            }
        }
    }
    None
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:443`; anything with a byte that is
/// not ASCII is not an address.
fn parse_xff_hop(hop: &[u8]) -> Option<IpAddr> {
    if !hop.is_ascii() {
        return None;
    }
    let hop = std::str::from_utf8(hop).ok()?;
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sock) = hop.parse::<SocketAddr>() {
        return Some(sock.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// One `Forwarded` element: `for=1.2.3.4;proto=https`, `For="[2001:db8::17]:4711"`.
/// `_hidden`, `unknown` and elements without `for=` are not addresses.
fn parse_forwarded_hop(element: &[u8]) -> Option<IpAddr> {
    let value = element.split(|&b| b == b';').find_map(|pair| {
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (name, value) = (&pair[..eq], &pair[eq + 1..]);
        name.trim_ascii()
            .eq_ignore_ascii_case(b"for")
            .then_some(value.trim_ascii())
    })?;
    let value = value
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(value);
    parse_xff_hop(value)
}

/// The value of one request header as the key; requests without it (or with it empty) are
/// not limited.
///
/// ```
/// let by_api_key = tollgate::key::Header::new("x-api-key")?;
/// # let _ = by_api_key;
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Header {
    name: HeaderName,
}

impl Header {
    /// Keys requests by header `name`.
    ///
    /// # Errors
    /// [`ConfigError::HeaderName`] when `name` is not a valid header name.
    pub fn new(name: &str) -> Result<Self, ConfigError> {
        let name = HeaderName::try_from(name)
            .map_err(|_| ConfigError::HeaderName(name.chars().take(80).collect()))?;
        Ok(Self { name })
    }

    fn value<'a>(&self, req: &'a Parts) -> Option<&'a [u8]> {
        let v = req.headers.get(&self.name)?.as_bytes();
        (!v.is_empty()).then_some(v)
    }
}

impl KeyExtractor for Header {
    fn extract(&self, req: &Parts) -> Option<Key> {
        self.value(req).map(Key::from)
    }

    /// The key of requests whose header value is `identity`; none for an empty `identity`
    /// (such requests are not limited).
    fn keys_for_identity(&self, identity: &str) -> Vec<Key> {
        if identity.is_empty() {
            return Vec::new();
        }
        vec![Key::from(identity)]
    }
}

/// The API key header when the request has one (`key:<value>`), else the client IP
/// (`ip:<address>`). The two kinds can never collide. A request without an API key and without
/// a peer address is handled as the [`ClientIp`]'s [`MissingPeer`] says (rejected by default).
///
/// # Invented API keys
/// The API key is whatever the client sends: unless keys are validated before this layer
/// runs, a client that invents a new key for every request gets a fresh bucket every time,
/// and is never limited. Close that with a per-IP guard in front: an outer layer keyed by
/// [`ClientIp`], looser than the per-key quota (so a few honest API clients behind one address
/// fit), then the per-key layer inside it. An invented key still passes the inner layer, but
/// every request of that address is counted by the outer one.
///
/// ```
/// use axum::{Router, routing::get};
/// use tollgate::{MemoryStore, RateLimitLayer};
/// use tollgate::key::{ApiKeyOrIp, ClientIp, Header};
///
/// # fn build() -> Result<Router, Box<dyn std::error::Error>> {
/// let store = MemoryStore::new(); // shared: each layer needs its own policy name
/// let per_ip = RateLimitLayer::builder("600/m".parse()?)
///     .policy("per-ip")
///     .store(store.clone())
///     .key(ClientIp::new())
///     .build()?;
/// let per_key = RateLimitLayer::builder("60/m".parse()?)
///     .policy("per-key")
///     .store(store)
///     .key(ApiKeyOrIp::new(Header::new("x-api-key")?, ClientIp::new()))
///     .build()?;
/// let app = Router::new()
///     .route("/api", get(|| async { "ok" }))
///     .layer(per_key) // inner
///     .layer(per_ip); // outer: the last `.layer` runs first
/// # Ok(app) }
/// # build().unwrap();
/// ```
///
/// The policy names must differ when the layers share a store: the name namespaces the keys,
/// and two layers with one name would count into the same buckets. Validating keys first (an
/// authentication layer outside the limiter that rejects unknown keys) closes the hole too.
#[derive(Debug, Clone)]
pub struct ApiKeyOrIp {
    header: Header,
    ip: ClientIp,
}

impl ApiKeyOrIp {
    /// API key from `header`, else the IP as `ip` finds it.
    pub fn new(header: Header, ip: ClientIp) -> Self {
        Self { header, ip }
    }
}

impl KeyExtractor for ApiKeyOrIp {
    fn extract(&self, req: &Parts) -> Option<Key> {
        match self.header.value(req) {
            Some(v) => Some(Key::from_parts(&[b"key:", v])),
            None => self.ip.key(b"ip:", req),
        }
    }

    /// The API key when there is one, whatever the peer; else as [`ClientIp`] decides.
    fn try_extract(&self, req: &Parts) -> Result<Option<Key>, KeyError> {
        match self.header.value(req) {
            Some(v) => Ok(Some(Key::from_parts(&[b"key:", v]))),
            None => self.ip.try_key(b"ip:", req),
        }
    }

    /// `key:<identity>` (the identity as an API key) and, when `identity` is an IP address,
    /// `ip:<address>` as well (grouped as the [`ClientIp`] groups it): the text alone cannot
    /// tell which one is meant, and resetting both is what an admin asking for it wants. Empty
    /// only for an empty `identity`.
    fn keys_for_identity(&self, identity: &str) -> Vec<Key> {
        let mut keys = Vec::with_capacity(2);
        if !identity.is_empty() {
            keys.push(Key::from_parts(&[b"key:", identity.as_bytes()]));
        }
        if let Some(ip) = parse_identity_ip(identity) {
            keys.push(self.ip.key_for(b"ip:", ip));
        }
        keys
    }
}

/// One key for everyone: a limit on the whole service (or route).
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

impl KeyExtractor for Global {
    fn extract(&self, _req: &Parts) -> Option<Key> {
        Some(Key::from_static("global"))
    }

    /// Always empty: every client shares the one key, so resetting one identity cannot be
    /// told apart from resetting everyone (reset `Key::from("global")` for that, on purpose).
    fn keys_for_identity(&self, _identity: &str) -> Vec<Key> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(peer: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        let ip: IpAddr = peer.parse().unwrap();
        parts.extensions.insert(PeerAddr(SocketAddr::new(ip, 4000)));
        parts
    }

    /// A request from `peer` with raw header values.
    fn parts_bytes(peer: &str, headers: &[(&str, &[u8])]) -> Parts {
        let mut b = http::Request::builder();
        for (k, v) in headers {
            b = b.header(*k, http::HeaderValue::from_bytes(v).unwrap());
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        let ip: IpAddr = peer.parse().unwrap();
        parts.extensions.insert(PeerAddr(SocketAddr::new(ip, 4000)));
        parts
    }

    /// `text` with `byte` spliced in place of the `@`.
    fn splice(text: &str, byte: u8) -> Vec<u8> {
        let at = text.find('@').unwrap();
        [&text.as_bytes()[..at], &[byte], &text.as_bytes()[at + 1..]].concat()
    }

    fn key(ex: &impl KeyExtractor, p: &Parts) -> String {
        ex.extract(p).unwrap().raw().to_string()
    }

    /// SEMANTICS.md §5 table: trusted = 10.0.0.0/8, rightmost walk.
    #[test]
    fn trusted_proxy_table() {
        let ip = ClientIp::new().trust("10.0.0.0/8").unwrap();
        let fwd = ip.clone().header(ForwardedHeader::Forwarded);
        let xff = "x-forwarded-for";
        type Case<'a> = (&'a ClientIp, &'a str, Vec<(&'a str, &'a str)>, &'a str);
        let cases: [Case<'_>; 8] = [
            (&ip, "10.0.0.5", vec![(xff, "1.2.3.4")], "1.2.3.4"),
            (&ip, "10.0.0.5", vec![(xff, "6.6.6.6, 1.2.3.4")], "1.2.3.4"),
            (&ip, "10.0.0.5", vec![(xff, "1.2.3.4, 10.0.0.7")], "1.2.3.4"),
            (
                &ip,
                "10.0.0.5",
                vec![(xff, "6.6.6.6"), (xff, "1.2.3.4")],
                "1.2.3.4",
            ),
            (&ip, "203.0.113.9", vec![(xff, "1.2.3.4")], "203.0.113.9"),
            (
                &ip,
                "10.0.0.5",
                vec![(xff, "1.2.3.4, not-an-ip")],
                "10.0.0.5",
            ),
            (
                &fwd,
                "10.0.0.5",
                vec![(
                    "forwarded",
                    "for=192.0.2.43, for=\"[2001:db8:cafe::17]:4711\"",
                )],
                "2001:db8:cafe::/56",
            ),
            (
                &fwd,
                "10.0.0.5",
                vec![("forwarded", "for=_hidden")],
                "10.0.0.5",
            ),
        ];
        for (extractor, peer, headers, want) in cases {
            assert_eq!(
                key(extractor, &parts(peer, &headers)),
                want,
                "{peer} {headers:?}"
            );
        }
        let p = parts("10.0.0.5", &[("forwarded", "for=unknown")]);
        assert_eq!(key(&fwd, &p), "10.0.0.5");
        // Forwarded is not believed when the proxy sets X-Forwarded-For.
        let p = parts(
            "10.0.0.5",
            &[("forwarded", "for=6.6.6.6"), (xff, "1.2.3.4")],
        );
        assert_eq!(key(&ip, &p), "1.2.3.4");
        // All hops trusted: the leftmost trusted address.
        let p = parts("10.0.0.5", &[(xff, "10.1.1.1, 10.2.2.2")]);
        assert_eq!(key(&ip, &p), "10.1.1.1");
    }

    /// Every byte a header value may carry, in a hop left of the client, inside the client's
    /// hop, and as a hop of its own right of the client: only the hop holding the byte is
    /// affected, and a hop that is not an address stops the walk at the proxy.
    #[test]
    fn forwarding_headers_are_parsed_as_bytes_hop_by_hop() {
        let xff_ip = ClientIp::new().trust("10.0.0.0/8").unwrap();
        let fwd_ip = xff_ip.clone().header(ForwardedHeader::Forwarded);
        let real_ip = xff_ip.clone().header(ForwardedHeader::XRealIp);
        let proxy = "10.0.0.5";
        let v6 = "2001:db8:cafe::/56";
        let mut tried = 0;
        for byte in 0..=255u8 {
            if http::HeaderValue::from_bytes(&[b'a', byte, b'a']).is_err() {
                continue;
            }
            tried += 1;
            let trimmed_or_split = matches!(byte, b',' | b' ' | b'\t');
            // (want, extractor, header, template with `@` for the byte)
            let digit = (byte as char).to_string();
            let client_plus_digit = format!("1.2.3.4{digit}");
            let cases: [(&str, &ClientIp, &str, &str); 9] = [
                // (a) left of the client: never read.
                ("1.2.3.4", &xff_ip, "x-forwarded-for", "6.6.6@6, 1.2.3.4"),
                (
                    "1.2.3.4",
                    &fwd_ip,
                    "forwarded",
                    "for=\"6.6.6@6\";proto=https, for=1.2.3.4",
                ),
                // (b) inside the client's hop.
                (
                    if byte.is_ascii_digit() {
                        &client_plus_digit
                    } else if trimmed_or_split {
                        "1.2.3.4"
                    } else {
                        proxy
                    },
                    &xff_ip,
                    "x-forwarded-for",
                    "6.6.6.6, 1.2.3.4@",
                ),
                (
                    if byte.is_ascii_digit() {
                        &client_plus_digit
                    } else if trimmed_or_split || byte == b';' {
                        "1.2.3.4"
                    } else {
                        proxy
                    },
                    &fwd_ip,
                    "forwarded",
                    "for=6.6.6.6, for=1.2.3.4@",
                ),
                (
                    if byte.is_ascii_hexdigit() { v6 } else { proxy },
                    &fwd_ip,
                    "forwarded",
                    "for=6.6.6.6, for=\"[2001:db8:cafe::17@]:4711\"",
                ),
                (
                    if byte.is_ascii_digit() {
                        &client_plus_digit
                    } else if trimmed_or_split {
                        // X-Real-IP lines are split on commas like the others.
                        "1.2.3.4"
                    } else {
                        proxy
                    },
                    &real_ip,
                    "x-real-ip",
                    "1.2.3.4@",
                ),
                // (c) a hop of its own, right of the client.
                (
                    if trimmed_or_split { "1.2.3.4" } else { proxy },
                    &xff_ip,
                    "x-forwarded-for",
                    "6.6.6.6, 1.2.3.4, @",
                ),
                (
                    if trimmed_or_split { "1.2.3.4" } else { proxy },
                    &fwd_ip,
                    "forwarded",
                    "for=6.6.6.6, for=1.2.3.4, @",
                ),
                (
                    proxy,
                    &fwd_ip,
                    "forwarded",
                    "for=6.6.6.6, for=1.2.3.4, for=@",
                ),
            ];
            for (want, extractor, header, template) in cases {
                let value = splice(template, byte);
                let p = parts_bytes(proxy, &[(header, &value)]);
                assert_eq!(
                    key(extractor, &p),
                    want,
                    "{header}: {}",
                    value.escape_ascii()
                );
            }
        }
        // Tab, the 95 printable bytes and the 128 bytes >= 0x80.
        assert_eq!(tried, 1 + 95 + 128);
    }

    #[test]
    fn a_non_ascii_byte_in_another_line_changes_nothing() {
        let ip = ClientIp::new().trust("10.0.0.0/8").unwrap();
        let xff = "x-forwarded-for";
        for (lines, want) in [
            (vec![&b"\x80"[..], b"1.2.3.4"], "1.2.3.4"),
            (vec![b"6.6.6.6, \x80", b"1.2.3.4, 10.0.0.7"], "1.2.3.4"),
            (vec![b"caf\xc3\xa9", b"10.0.0.7, 1.2.3.4"], "1.2.3.4"),
            // The walk reaches the earlier line: its hop right of the byte is the client.
            (vec![b"6.6.6.6\x80, 1.2.3.4", b"10.0.0.7"], "1.2.3.4"),
            (vec![b"\xff, 1.2.3.4, 10.0.0.8", b"10.0.0.7"], "1.2.3.4"),
            // Reached by the walk, it stops at the last trusted address.
            (vec![b"1.2.3.4, \x80", b"10.0.0.7"], "10.0.0.7"),
        ] {
            let headers: Vec<(&str, &[u8])> = lines.iter().map(|l| (xff, *l)).collect();
            let p = parts_bytes("10.0.0.5", &headers);
            let shown: Vec<String> = lines.iter().map(|l| l.escape_ascii().to_string()).collect();
            assert_eq!(key(&ip, &p), want, "{shown:?}");
        }
    }

    #[test]
    fn ipv6_prefixes_and_mapped_addresses() {
        let p = parts("2001:db8:abcd:12:1:2:3:4", &[]);
        for (bits, want) in [
            (64, "2001:db8:abcd:12::/64"),
            (56, "2001:db8:abcd::/56"),
            (48, "2001:db8:abcd::/48"),
        ] {
            let ip = ClientIp::new().ipv6_prefix(bits).unwrap();
            assert_eq!(key(&ip, &p), want);
        }
        let p = parts("2001:db8:abcd:12ff::1", &[]);
        assert_eq!(key(&ClientIp::new(), &p), "2001:db8:abcd:1200::/56");
        let p = parts("::ffff:192.0.2.1", &[]);
        assert_eq!(key(&ClientIp::new(), &p), "192.0.2.1");
        assert!(ClientIp::new().ipv6_prefix(0).is_err());
        assert!(ClientIp::new().ipv6_prefix(129).is_err());
        assert!(ClientIp::new().trust("10.0.0.0/33").is_err());
        assert!(ClientIp::new().trust("nonsense").is_err());
    }

    #[test]
    fn ip_keys_match_the_standard_text_forms() {
        for octet in 0..=255u8 {
            let v4 = std::net::Ipv4Addr::new(octet, 255 - octet, octet / 2, octet % 10);
            assert_eq!(Key::from(IpAddr::V4(v4)), Key::from(v4.to_string()));
            // Behind a prefix, inline, and past the inline size.
            assert_eq!(ipv4_key(b"ip:", v4), Key::from(format!("ip:{v4}")));
            let long = "p".repeat(30);
            assert_eq!(
                ipv4_key(long.as_bytes(), v4),
                Key::from(format!("{long}{v4}"))
            );
        }
        // Prefixes around the longest one written inline, with the longest and shortest texts.
        for len in 18..=25 {
            let prefix = "p".repeat(len);
            for v4 in [
                std::net::Ipv4Addr::BROADCAST,
                std::net::Ipv4Addr::UNSPECIFIED,
            ] {
                let key = ipv4_key(prefix.as_bytes(), v4);
                assert_eq!(key.as_bytes(), format!("{prefix}{v4}").as_bytes());
            }
        }
        for v6 in [
            Ipv6Addr::UNSPECIFIED,
            Ipv6Addr::LOCALHOST,
            Ipv6Addr::from(u128::MAX),
            "2001:db8::1:0:0:1".parse().unwrap(),
            "::ffff:255.255.255.255".parse().unwrap(),
            "::1.2.3.4".parse().unwrap(),
        ] {
            assert_eq!(Key::from(IpAddr::V6(v6)), Key::from(v6.to_string()));
            let grouped = ClientIp::new().ipv6_prefix(128).unwrap();
            assert_eq!(
                grouped.key_for(b"ip:", IpAddr::V6(v6)),
                Key::from(format!("ip:{v6}"))
            );
        }
        // The longest IPv6 text with the longest prefix suffix still fits the stack buffer.
        let all_ones = Ipv6Addr::from(u128::MAX);
        let key = ClientIp::new()
            .ipv6_prefix(127)
            .unwrap()
            .key_for(b"", all_ones.into());
        assert_eq!(
            key,
            Key::from("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127")
        );
    }

    #[test]
    fn long_keys_are_hashed_injectively() {
        let short = Key::from("a".repeat(64));
        assert_eq!(short.as_bytes().len(), 64);
        let long = Key::from("a".repeat(65));
        let huge = Key::from("a".repeat(65_536));
        assert_eq!(long.as_bytes().len(), 65);
        assert_eq!(huge.as_bytes().len(), 65);
        assert_ne!(long, huge);
        assert_eq!(long.as_bytes()[0], b'#');
    }

    #[test]
    fn keys_show_a_fingerprint_never_their_bytes() {
        let secret = Key::from("sk_live_4eC39HqLyjWDarjtT1zdp7dc");
        let fp = secret.fingerprint();
        assert_eq!(
            fp,
            Key::from("sk_live_4eC39HqLyjWDarjtT1zdp7dc").fingerprint()
        );
        assert_ne!(
            fp,
            Key::from("sk_live_4eC39HqLyjWDarjtT1zdp7dd").fingerprint()
        );
        let hex = fp.to_string();
        assert_eq!(hex.len(), 16);
        assert!(
            hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{hex}"
        );
        assert_eq!(format!("{fp:?}"), hex);
        let debug = format!("{secret:?}");
        assert_eq!(debug, format!("Key(fp:{hex})"));
        assert!(!debug.contains("sk_live"), "{debug}");
        // Pretty and alternate forms too.
        assert!(!format!("{secret:#?} {:?}", Some(&secret)).contains("sk_live"));
        // Raw text only on request, escaped.
        assert_eq!(secret.raw().to_string(), "sk_live_4eC39HqLyjWDarjtT1zdp7dc");
        let odd = Key::from(&b"a\x00b\xff\n"[..]);
        assert_eq!(odd.raw().to_string(), "a\\x00b\\xff\\n");
        assert_eq!(format!("{:?}", odd.raw()), "RawKey(\"a\\x00b\\xff\\n\")");
        // A hashed long key has its own fingerprint, stable too.
        let long = Key::from("x".repeat(100));
        assert_eq!(long.fingerprint(), Key::from("x".repeat(100)).fingerprint());
        assert_ne!(long.fingerprint(), fp);
    }

    #[test]
    fn hashed_key_text_is_hash_sign_and_lowercase_hex_sha256() {
        // `printf 'a%.0s' $(seq 65) | sha256sum`
        let want = b"#635361c48bb9eab14198e76ea8ab7f1a41685d6ad62aa9146d301d4f17eb0ae0";
        assert_eq!(Key::from("a".repeat(65)).as_bytes(), want);
        // Hashed piece by piece, the same text.
        let a = "a".repeat(30);
        let b = "a".repeat(35);
        let parts = Key::from_parts(&[a.as_bytes(), b.as_bytes()]);
        assert_eq!(parts.as_bytes(), want);
    }

    #[test]
    fn api_key_or_ip_never_collide() {
        let ex = ApiKeyOrIp::new(Header::new("x-api-key").unwrap(), ClientIp::new());
        let with_key = parts("1.2.3.4", &[("x-api-key", "ip:1.2.3.4")]);
        let without = parts("1.2.3.4", &[]);
        assert_eq!(key(&ex, &with_key), "key:ip:1.2.3.4");
        assert_eq!(key(&ex, &without), "ip:1.2.3.4");
        let empty = parts("1.2.3.4", &[("x-api-key", "")]);
        assert_eq!(key(&ex, &empty), "ip:1.2.3.4");
    }

    /// A request with no peer address and no `ConnectInfo`.
    fn no_peer(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn missing_peer_is_rejected_by_default() {
        let p = no_peer(&[]);
        let ip = ClientIp::new();
        assert_eq!(ip.try_extract(&p), Err(KeyError::MissingPeer));
        // Through an Arc too (the layer may hold one).
        let shared: Arc<dyn KeyExtractor> = Arc::new(ip.clone());
        assert_eq!(shared.try_extract(&p), Err(KeyError::MissingPeer));
        // `extract` cannot fail: the shared key.
        assert_eq!(key(&ip, &p), "unknown");
        // A request with a peer is keyed as usual.
        assert_eq!(
            ip.try_extract(&parts("1.2.3.4", &[])),
            Ok(Some(Key::from("1.2.3.4")))
        );
        // Forwarding headers are no substitute for the peer (a client could write them).
        let p = no_peer(&[("x-forwarded-for", "1.2.3.4")]);
        let behind = ClientIp::new().trust("10.0.0.0/8").unwrap();
        assert_eq!(behind.try_extract(&p), Err(KeyError::MissingPeer));
    }

    #[test]
    fn missing_peer_modes() {
        let p = no_peer(&[]);
        let shared = ClientIp::new().on_missing_peer(MissingPeer::SharedKey);
        assert_eq!(shared.try_extract(&p), Ok(Some(Key::from("unknown"))));
        assert_eq!(key(&shared, &p), "unknown");
        let unlimited = ClientIp::new().on_missing_peer(MissingPeer::Unlimited);
        assert_eq!(unlimited.try_extract(&p), Ok(None));
        assert_eq!(unlimited.extract(&p), None);
        let reject = ClientIp::new().on_missing_peer(MissingPeer::Reject);
        assert_eq!(reject.try_extract(&p), Err(KeyError::MissingPeer));
        assert_eq!(MissingPeer::default(), MissingPeer::Reject);
        // A peer makes the mode irrelevant.
        let p = parts("1.2.3.4", &[]);
        for ip in [&shared, &unlimited, &reject] {
            assert_eq!(ip.try_extract(&p), Ok(Some(Key::from("1.2.3.4"))));
        }
    }

    #[test]
    fn api_key_or_ip_with_missing_peer() {
        let header = || Header::new("x-api-key").unwrap();
        let with_key = no_peer(&[("x-api-key", "alice")]);
        let without = no_peer(&[]);
        let reject = ApiKeyOrIp::new(header(), ClientIp::new());
        // An API key is enough: no peer needed.
        assert_eq!(
            reject.try_extract(&with_key),
            Ok(Some(Key::from("key:alice")))
        );
        assert_eq!(reject.try_extract(&without), Err(KeyError::MissingPeer));
        assert_eq!(key(&reject, &without), "ip:unknown");
        let shared = ApiKeyOrIp::new(
            header(),
            ClientIp::new().on_missing_peer(MissingPeer::SharedKey),
        );
        assert_eq!(
            shared.try_extract(&without),
            Ok(Some(Key::from("ip:unknown")))
        );
        let unlimited = ApiKeyOrIp::new(
            header(),
            ClientIp::new().on_missing_peer(MissingPeer::Unlimited),
        );
        assert_eq!(unlimited.try_extract(&without), Ok(None));
        assert_eq!(unlimited.extract(&without), None);
        assert_eq!(
            unlimited.try_extract(&with_key),
            Ok(Some(Key::from("key:alice")))
        );
    }

    #[test]
    fn missing_peer_error_says_how_to_fix_it() {
        let msg = KeyError::MissingPeer.to_string();
        assert_eq!(msg, missing_peer_message(cfg!(feature = "axum")));
        let with_axum = missing_peer_message(true);
        let without = missing_peer_message(false);
        for m in [with_axum, without] {
            assert!(
                m.contains("into_make_service_with_connect_info::<SocketAddr>()"),
                "{m}"
            );
            assert!(m.contains("tollgate::key::PeerAddr"), "{m}");
            assert!(m.contains("on_missing_peer"), "{m}");
        }
        assert!(!with_axum.contains("without its `axum` feature"));
        assert!(without.contains("without its `axum` feature"), "{without}");
        assert!(
            without.contains("`ConnectInfo` is not read at all"),
            "{without}"
        );
    }

    #[test]
    fn keys_for_identity_are_the_keys_requests_get() {
        let behind = ClientIp::new().trust("10.0.0.0/8").unwrap();
        let by_64 = ClientIp::new().ipv6_prefix(64).unwrap();
        // (identity, peer it arrives from)
        let clients = [
            ("192.0.2.1", "192.0.2.1"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
            ("192.0.2.1", "::ffff:192.0.2.1"),
            ("2001:db8:abcd:12:1:2:3:4", "2001:db8:abcd:12:ffff::9"),
            ("[2001:db8:abcd:12:1:2:3:4]", "2001:db8:abcd:12:1:2:3:4"),
            ("2001:db8::1", "2001:db8::1"),
        ];
        for (identity, peer) in clients {
            for ip in [ClientIp::new(), by_64.clone()] {
                let want = ip.extract(&parts(peer, &[])).unwrap();
                assert_eq!(
                    ip.keys_for_identity(identity),
                    std::slice::from_ref(&want),
                    "{identity}"
                );
                let either = ApiKeyOrIp::new(Header::new("x-api-key").unwrap(), ip.clone());
                let from_ip = either.extract(&parts(peer, &[])).unwrap();
                let from_key = either
                    .extract(&parts(peer, &[("x-api-key", identity)]))
                    .unwrap();
                assert_eq!(either.keys_for_identity(identity), [from_key, from_ip]);
                // Through an Arc too.
                let arc: Arc<dyn KeyExtractor> = Arc::new(ip);
                assert_eq!(arc.keys_for_identity(identity), [want]);
            }
            // Behind a trusted proxy, the forwarded address is the identity.
            let p = parts("10.0.0.5", &[("x-forwarded-for", peer)]);
            assert_eq!(
                behind.keys_for_identity(identity),
                [behind.extract(&p).unwrap()]
            );
        }
        // Grouped by /56, another /64 of the same /56 is the same client.
        let p = parts("2001:db8:abcd:ff::1", &[]);
        assert_eq!(
            ClientIp::new().keys_for_identity("2001:db8:abcd:1:2::3"),
            [ClientIp::new().extract(&p).unwrap()]
        );
        assert_ne!(
            by_64.keys_for_identity("2001:db8:abcd:1:2::3"),
            [by_64.extract(&p).unwrap()]
        );
        assert_eq!(
            ClientIp::new().keys_for_identity("2001:db8:abcd:12:1:2:3:4")[0]
                .raw()
                .to_string(),
            "2001:db8:abcd::/56"
        );
        for not_ip in [
            "alice",
            "",
            "1.2.3.4:80",
            "[1.2.3.4]",
            "2001:db8::1]",
            " 1.2.3.4",
        ] {
            assert!(
                ClientIp::new().keys_for_identity(not_ip).is_empty(),
                "{not_ip}"
            );
        }

        let header = Header::new("x-api-key").unwrap();
        let long = "k".repeat(200);
        for identity in ["alice", "1.2.3.4", long.as_str()] {
            let want = header
                .extract(&parts("1.2.3.4", &[("x-api-key", identity)]))
                .unwrap();
            assert_eq!(header.keys_for_identity(identity), [want]);
        }
        assert!(header.keys_for_identity("").is_empty());

        let either = ApiKeyOrIp::new(Header::new("x-api-key").unwrap(), ClientIp::new());
        let alice = either
            .extract(&parts("1.2.3.4", &[("x-api-key", "alice")]))
            .unwrap();
        assert_eq!(either.keys_for_identity("alice"), [alice]);
        assert!(either.keys_for_identity("").is_empty());

        assert!(Global.keys_for_identity("1.2.3.4").is_empty());
        let closure = |req: &Parts| req.headers.get("x-tenant").map(|v| Key::from(v.as_bytes()));
        assert!(closure.keys_for_identity("t1").is_empty());
    }

    #[test]
    fn closures_never_fail() {
        let ex = |req: &Parts| req.headers.get("x-tenant").map(|v| Key::from(v.as_bytes()));
        let p = no_peer(&[("x-tenant", "t1")]);
        assert_eq!(ex.try_extract(&p), Ok(Some(Key::from("t1"))));
        assert_eq!(ex.try_extract(&no_peer(&[])), Ok(None));
    }
}
