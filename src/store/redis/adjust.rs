//! [`RedisStore`]'s adjustments (refunds, unconditional charges): one `EVALSHA` of
//! `lua/adjust.lua` per adjustment, which changes every quota of the policy atomically. Kept
//! apart from the decision path: a layer without refunds never loads or runs this script.

use std::sync::OnceLock;

use redis::{Cmd, Value};

use super::{Inner, errors, keys};
use crate::decision::Decision;
use crate::error::StoreError;
use crate::gcra;
use crate::key::Key;
use crate::quota::Quota;
use crate::store::Policy;

/// The adjustment script, one source of truth with `lua/adjust.lua`.
const ADJUST_LUA: &str = include_str!("../../../lua/adjust.lua");

/// The `SCRIPT LOAD` command of the adjustment script, for the store's warm-up and
/// `load_script`: a refund right after a start or a failover then finds it loaded.
pub(super) fn load_cmd() -> &'static Cmd {
    &script().1
}

/// The script (for its SHA-1) and its `SCRIPT LOAD` command, built once per process.
fn script() -> &'static (redis::Script, Cmd) {
    static SCRIPT: OnceLock<(redis::Script, Cmd)> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        (
            redis::Script::new(ADJUST_LUA),
            super::script_load_cmd(ADJUST_LUA),
        )
    })
}

impl Inner {
    /// `EVALSHA` of `lua/adjust.lua`: the policy's keys (as for the decision script), each
    /// quota's `T`, the signed delta, the debt cap and, in tests only, `now`.
    fn adjust_cmd(&self, policy: &Policy, key: &Key, delta: i64, now: Option<u64>) -> Cmd {
        let quotas = policy.quotas();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script().0.get_hash()).arg(quotas.len());
        if quotas.len() == 1 {
            cmd.arg(keys::state_key(&self.prefix, policy, key));
        } else {
            for redis_key in keys::quota_keys(&self.prefix, policy, key) {
                cmd.arg(redis_key);
            }
        }
        for quota in quotas {
            cmd.arg(quota.interval_micros());
        }
        cmd.arg(delta).arg(gcra::MAX_DEBT_MICROS);
        if let Some(now) = now {
            cmd.arg(now);
        }
        cmd
    }

    /// One adjustment, bounded by the command timeout; `NOSCRIPT` (the script did not run)
    /// loads it and sends it once more, nothing else is retried.
    pub(super) async fn adjust(
        &self,
        policy: &Policy,
        key: &Key,
        delta: i64,
        now: Option<u64>,
    ) -> Result<Decision, StoreError> {
        let cmd = self.adjust_cmd(policy, key, delta, now);
        let reply = self
            .timed(self.send_on_backend(&cmd, Some(&script().1)))
            .await?;
        adjusted(&reply, policy.quotas())
    }
}

/// The script's reply (`used` per quota after the adjustment) as a peek of that state.
fn adjusted(reply: &Value, quotas: &[Quota]) -> Result<Decision, StoreError> {
    let mut used = [0u64; Policy::MAX_QUOTAS];
    let valid = match reply {
        Value::Array(items) if items.len() == quotas.len() && items.len() <= used.len() => items
            .iter()
            .zip(used.iter_mut())
            .all(|(item, slot)| match item {
                Value::Int(u) if *u >= 0 => {
                    *slot = u.unsigned_abs();
                    true
                }
                _ => false,
            }),
        _ => false,
    };
    if !valid {
        return Err(errors::unexpected(format!(
            "the adjustment script answered {reply:?} instead of an array of {} non-negative \
             integers",
            quotas.len()
        )));
    }
    // `now = 0`, stored TAT = used: the state the script left.
    Ok(gcra::step_all(&used[..quotas.len()], 0, quotas, 0).decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_become_peeks_of_the_adjusted_state() {
        let q: [Quota; 1] = ["5/5s".parse().unwrap()];
        let d = adjusted(&Value::Array(vec![Value::Int(2_000_000)]), &q).unwrap();
        assert_eq!(d, gcra::step(2_000_000, 0, &q[0], 0).decision);
        assert_eq!(d.remaining(), 3);
        // In debt: nothing remaining, still a report (never a denial).
        let d = adjusted(&Value::Array(vec![Value::Int(9_000_000)]), &q).unwrap();
        assert!(d.is_allowed());
        assert_eq!(d.remaining(), 0);
        for bad in [
            Value::Int(0),
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(-1)]),
            Value::Array(vec![Value::Int(0), Value::Int(0)]),
        ] {
            let e = adjusted(&bad, &q).unwrap_err();
            assert_eq!(e.kind(), crate::StoreErrorKind::UnexpectedReply, "{bad:?}");
        }
    }
}
