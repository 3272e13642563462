//! Quotas from configuration files (feature `serde`).
#![cfg(feature = "serde")]

use std::time::Duration;

use tollgate::Quota;

#[derive(Debug, serde::Deserialize)]
struct Limits {
    global: Quota,
    login: Quota,
}

#[test]
fn quotas_deserialize_from_strings_and_tables() {
    let limits: Limits = toml::from_str(
        r#"
        global = "60/m"
        login = { rate = "5/30s", capacity = 2 }
        "#,
    )
    .unwrap();
    assert_eq!(limits.global.limit(), 60);
    assert_eq!(limits.global.period(), Duration::from_secs(60));
    assert_eq!(limits.login.limit(), 5);
    assert_eq!(limits.login.period(), Duration::from_secs(30));
    assert_eq!(limits.login.capacity(), 2);
    // And back: Display/Serialize round-trips.
    assert_eq!(
        serde_json::to_string(&limits.login).unwrap(),
        "\"5/30s;capacity=2\""
    );
}

#[test]
fn invalid_quotas_fail_with_the_reason() {
    for (input, needle) in [
        (r#"global = "0/m""#, "at least 1"),
        (r#"global = "ten per second""#, "is not a quota"),
        (
            r#"global = { rate = "5/s", capacity = 0 }"#,
            "capacity must be at least 1",
        ),
        (
            r#"global = { rate = "5/s", burst = 3, extra = 1 }"#,
            "unknown field",
        ),
        (r#"global = { capacity = 3 }"#, "missing field"),
    ] {
        let err = toml::from_str::<toml::Table>(input)
            .map(|t| t["global"].clone().try_into::<Quota>())
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{input}: {err}");
    }
}
