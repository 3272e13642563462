//! The Redis key layout: `<prefix>:{<tag>}:<policy>`, where the tag is the unpadded base64url
//! SHA-256 of the client key's bytes. No client text ever reaches Redis.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::key::Key;
use crate::store::Policy;

/// Length of the hash tag: 32 digest bytes in unpadded base64url.
pub(super) const TAG_LEN: usize = 43;

/// The longest prefix accepted by the builder.
pub(super) const MAX_PREFIX_LEN: usize = 64;

/// The longest Redis key: prefix, `:{`, tag, `}:`, policy name, `#<quota index>`.
pub(super) const MAX_KEY_LEN: usize = MAX_PREFIX_LEN + 2 + TAG_LEN + 2 + Policy::MAX_NAME_LEN + 2;

/// `Ok(())` when `prefix` can start every key: 1 to 64 printable ASCII characters without
/// braces (a `{` in the prefix would become the cluster hash tag) or spaces.
pub(super) fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the Redis key prefix {:?} must be 1 to {MAX_PREFIX_LEN} printable ASCII characters \
             without spaces, '{{' or '}}' (braces would choose the cluster slot)",
            prefix.chars().take(80).collect::<String>()
        ))
    }
}

/// The hash tag of one client key: the same for every policy, so that one client's keys share
/// a cluster slot.
pub(super) fn tag(key: &Key) -> [u8; TAG_LEN] {
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let mut out = [0u8; TAG_LEN];
    // 32 bytes are exactly TAG_LEN characters, so the buffer always fits.
    let written = URL_SAFE_NO_PAD.encode_slice(digest, &mut out);
    debug_assert_eq!(written.ok(), Some(TAG_LEN));
    out
}

/// `<prefix>:{<tag>}:<policy>`.
pub(super) fn state_key(prefix: &str, policy: &Policy, key: &Key) -> Vec<u8> {
    let name = policy.name().as_bytes();
    let mut out = Vec::with_capacity(prefix.len() + 4 + TAG_LEN + name.len());
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(b":{");
    out.extend_from_slice(&tag(key));
    out.extend_from_slice(b"}:");
    out.extend_from_slice(name);
    out
}

/// The state keys of a policy of several quotas: `<prefix>:{<tag>}:<policy>#<i>`, one per
/// quota, in one hash slot. Policy names never contain `#`, so these never collide with a
/// single-quota policy's key.
pub(super) fn quota_keys(prefix: &str, policy: &Policy, key: &Key) -> Vec<Vec<u8>> {
    let base = state_key(prefix, policy, key);
    (0..policy.quotas().len())
        .map(|i| {
            let mut k = base.clone();
            k.push(b'#');
            k.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
            k
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Quota;

    #[test]
    fn tag_is_unpadded_base64url_of_sha256() {
        // SHA-256("") = e3b0c442 98fc1c14 9afbf4c8 996fb924 27ae41e4 649b934c a495991b 7852b855
        let t = tag(&Key::from(""));
        assert_eq!(&t, b"47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU");
    }

    #[test]
    fn layout_is_bounded_and_keeps_client_text_out() {
        let p = Policy::new("login", Quota::per_second(1).unwrap()).unwrap();
        for raw in [&b"{"[..], b"}", b"{}", b"a\r\nb", b"\0", &[b'x'; 65_536]] {
            let k = state_key("tollgate", &p, &Key::from(raw));
            assert!(k.len() <= MAX_KEY_LEN);
            assert_eq!(k.iter().filter(|b| **b == b'{').count(), 1);
            assert_eq!(k.iter().filter(|b| **b == b'}').count(), 1);
            assert!(k.starts_with(b"tollgate:{") && k.ends_with(b"}:login"));
        }
    }

    #[test]
    fn prefixes_with_braces_are_refused() {
        assert!(check_prefix("tollgate").is_ok());
        assert!(check_prefix("app:v2").is_ok());
        for bad in ["", "a{b", "a}b", "a b", &"x".repeat(65)] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
