//! Settings tests: the environment is injected, nothing reads the real one or any file
//! (the TOML file layer and the TLS files are tested in `coordinator/tests/server.rs`).

use super::*;

const WORKER: &str = "worker-token-0123456789";
const CLIENT: &str = "client-token-0123456789";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

fn load_env(pairs: &[(&str, &str)]) -> Result<Validated, SettingsError> {
    load(None, env(pairs), &Overrides::default())
}

/// Returns the key an error names.
fn key_of(error: SettingsError) -> String {
    match error {
        SettingsError::Invalid { key, .. } => key,
        SettingsError::Load { reason, .. } => panic!("expected a validation error, got {reason}"),
    }
}

fn with_tokens() -> Settings {
    let mut settings = Settings::default();
    settings.auth.worker_tokens = vec![WORKER.into()];
    settings.auth.client_tokens = vec![CLIENT.into()];
    settings
}

#[test]
fn defaults_are_valid_and_documented() {
    let validated = load_env(&[]).unwrap();
    assert_eq!(validated.listen, "127.0.0.1:50051".parse().unwrap());
    assert_eq!(validated.database_url, "sqlite://deepmad.db");
    assert!(!validated.tokens.is_enabled());
    assert_eq!(validated.tls, None);
    assert_eq!(
        validated.lease,
        LeaseTimes {
            lease_ms: 60_000,
            heartbeat_interval_ms: 10_000,
            grace_ms: 60_000,
            reaper_interval_ms: 5_000,
        }
    );
    assert_eq!(validated.max_attempts, 3);
    assert_eq!(
        validated.retry,
        RetryPolicy {
            backoff_base_ms: 5_000,
            backoff_max_ms: 300_000,
            max_requeues: 10,
        }
    );
    assert_eq!(validated.metrics_listen, None);
    assert_eq!(validated.limits.max_grid_points, 10_000);
    assert_eq!(validated.limits.max_message_bytes, 4 * 1024 * 1024);
}

#[test]
fn environment_variables_set_nested_keys_and_lists() {
    let worker_list = format!("{WORKER}, other-worker-token-0000");
    let validated = load_env(&[
        ("DEEPMAD__LISTEN", "0.0.0.0:7000"),
        ("DEEPMAD__DATABASE__URL", "postgres://deepmad@db/deepmad"),
        ("DEEPMAD__LEASE__LEASE_MS", "30000"),
        ("DEEPMAD__LEASE__HEARTBEAT_INTERVAL_MS", "5000"),
        ("DEEPMAD__LEASE__GRACE_MS", "0"),
        ("DEEPMAD__AUTH__WORKER_TOKENS", &worker_list),
        ("DEEPMAD__AUTH__CLIENT_TOKENS", CLIENT),
        ("DEEPMAD__METRICS__LISTEN", "127.0.0.1:9464"),
        ("DEEPMAD__LIMITS__MAX_MESSAGE_BYTES", "1048576"),
        ("deepmad__retry__max_attempts", "5"),
        ("DEEPMAD_LOG", "debug"),
        ("PATH", "/usr/bin"),
    ])
    .unwrap();
    assert_eq!(validated.listen, "0.0.0.0:7000".parse().unwrap());
    assert_eq!(validated.database_url, "postgres://deepmad@db/deepmad");
    assert_eq!(validated.lease.lease_ms, 30_000);
    assert_eq!(validated.lease.heartbeat_interval_ms, 5_000);
    assert_eq!(validated.lease.grace_ms, 0);
    assert_eq!(
        validated.tokens.role_of(WORKER),
        Some(crate::auth::Role::Worker)
    );
    assert_eq!(
        validated.tokens.role_of("other-worker-token-0000"),
        Some(crate::auth::Role::Worker)
    );
    assert_eq!(
        validated.tokens.role_of(CLIENT),
        Some(crate::auth::Role::Client)
    );
    assert_eq!(
        validated.metrics_listen,
        Some("127.0.0.1:9464".parse().unwrap())
    );
    assert_eq!(validated.limits.max_message_bytes, 1_048_576);
    assert_eq!(validated.max_attempts, 5);
}

#[test]
fn flags_win_over_the_environment() {
    let overrides = Overrides {
        listen: Some("127.0.0.1:7001".into()),
        database_url: Some("sqlite://flag.db".into()),
    };
    let validated = load(
        None,
        env(&[
            ("DEEPMAD__LISTEN", "127.0.0.1:7002"),
            ("DEEPMAD__DATABASE__URL", "sqlite://env.db"),
        ]),
        &overrides,
    )
    .unwrap();
    assert_eq!(validated.listen, "127.0.0.1:7001".parse().unwrap());
    assert_eq!(validated.database_url, "sqlite://flag.db");
}

#[test]
fn unknown_keys_are_named() {
    let cases = [
        ("DEEPMAD__LEASE__LEASE_SECS", "lease.lease_secs"),
        ("DEEPMAD__LEASES__LEASE_MS", "leases"),
        ("DEEPMAD__PORT", "port"),
        ("DEEPMAD__TLS__CERT", "tls.cert"),
    ];
    for (variable, key) in cases {
        let error = load_env(&[(variable, "1")]).unwrap_err();
        assert_eq!(key_of(error), key, "{variable}");
    }
}

#[test]
fn unparseable_values_name_the_key() {
    let error = load_env(&[("DEEPMAD__LEASE__LEASE_MS", "soon")]).unwrap_err();
    assert!(error.to_string().contains("lease.lease_ms"), "{error}");
}

#[test]
fn the_lease_must_outlast_two_heartbeats() {
    let error = load_env(&[
        ("DEEPMAD__LEASE__LEASE_MS", "15000"),
        ("DEEPMAD__LEASE__HEARTBEAT_INTERVAL_MS", "10000"),
    ])
    .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("heartbeat_interval_ms"), "{message}");
    assert_eq!(key_of(error), "lease.lease_ms");
}

#[test]
fn out_of_range_numbers_name_the_key() {
    type Change = fn(&mut Settings);
    let cases: [(Change, &str); 8] = [
        (|s| s.lease.lease_ms = 10, "lease.lease_ms"),
        (|s| s.lease.grace_ms = Some(MAX_MS + 1), "lease.grace_ms"),
        (
            |s| s.lease.reaper_interval_ms = 0,
            "lease.reaper_interval_ms",
        ),
        (|s| s.retry.max_attempts = 0, "retry.max_attempts"),
        (|s| s.retry.backoff_max_ms = 10, "retry.backoff_max_ms"),
        (|s| s.retry.max_requeues = 5_000, "retry.max_requeues"),
        (|s| s.limits.max_grid_points = 0, "limits.max_grid_points"),
        (
            |s| s.limits.max_message_bytes = 10,
            "limits.max_message_bytes",
        ),
    ];
    for (change, key) in cases {
        let mut settings = Settings::default();
        change(&mut settings);
        assert_eq!(key_of(settings.validate().unwrap_err()), key);
    }
}

#[test]
fn without_tokens_only_loopback_addresses_are_allowed() {
    for address in ["0.0.0.0:50051", "192.0.2.7:50051", "[::]:50051"] {
        let settings = Settings {
            listen: address.into(),
            ..Settings::default()
        };
        let error = settings.validate().unwrap_err();
        assert!(error.to_string().contains("auth.worker_tokens"), "{error}");
        assert_eq!(key_of(error), "listen", "{address}");
    }
    for address in ["127.0.0.1:1", "127.0.0.2:50051", "[::1]:50051"] {
        let settings = Settings {
            listen: address.into(),
            ..Settings::default()
        };
        assert!(settings.validate().is_ok(), "{address}");
    }
    let mut settings = with_tokens();
    settings.listen = "0.0.0.0:50051".into();
    assert!(settings.validate().unwrap().tokens.is_enabled());
}

#[test]
fn token_lists_are_checked() {
    let mut only_workers = with_tokens();
    only_workers.auth.client_tokens.clear();
    assert_eq!(
        key_of(only_workers.validate().unwrap_err()),
        "auth.client_tokens"
    );

    let mut short = with_tokens();
    short.auth.worker_tokens = vec!["secret".into()];
    let error = short.validate().unwrap_err();
    assert!(!error.to_string().contains("secret"), "{error}");
    assert_eq!(key_of(error), "auth.worker_tokens");

    let mut shared = with_tokens();
    shared.auth.client_tokens.push(WORKER.into());
    assert_eq!(key_of(shared.validate().unwrap_err()), "auth.client_tokens");
}

#[test]
fn addresses_and_urls_are_checked() {
    let settings = Settings {
        listen: "localhost".into(),
        ..Settings::default()
    };
    assert_eq!(key_of(settings.validate().unwrap_err()), "listen");

    let mut settings = Settings::default();
    settings.metrics.listen = Some("9464".into());
    assert_eq!(key_of(settings.validate().unwrap_err()), "metrics.listen");

    let mut settings = Settings::default();
    settings.database.url = "mysql://db".into();
    assert_eq!(key_of(settings.validate().unwrap_err()), "database.url");
}

#[test]
fn tls_needs_both_files() {
    let mut settings = Settings::default();
    settings.tls.cert_path = Some("cert.pem".into());
    assert_eq!(key_of(settings.validate().unwrap_err()), "tls.key_path");
    let mut settings = Settings::default();
    settings.tls.key_path = Some("key.pem".into());
    assert_eq!(key_of(settings.validate().unwrap_err()), "tls.cert_path");
}

#[test]
fn debug_output_hides_tokens() {
    let settings = with_tokens();
    let printed = format!("{settings:?} {:?}", settings.validate().unwrap());
    assert!(!printed.contains("token-0123"), "{printed}");
}

#[test]
fn only_prefixed_variables_are_ours() {
    assert!(is_ours("DEEPMAD__LISTEN"));
    assert!(is_ours("deepmad__listen"));
    assert!(!is_ours("DEEPMAD__"));
    assert!(!is_ours("DEEPMAD_LOG"));
    assert!(!is_ours("HOME"));
}

#[test]
fn the_dashboard_is_off_unless_its_address_is_set() {
    assert_eq!(load_env(&[]).unwrap().dashboard_listen, None);
    let validated = load_env(&[("DEEPMAD__DASHBOARD__LISTEN", "127.0.0.1:8080")]).unwrap();
    assert_eq!(
        validated.dashboard_listen,
        Some("127.0.0.1:8080".parse().unwrap())
    );
    let error = load_env(&[("DEEPMAD__DASHBOARD__LISTEN", "8080")]).unwrap_err();
    assert_eq!(key_of(error), "dashboard.listen");
}

/// Without tokens the dashboard and (issue 24, item 10) the metrics endpoint follow gRPC's
/// loopback rule; with tokens they may listen anywhere.
#[test]
fn without_tokens_side_listeners_stay_on_loopback() {
    type Set = fn(&mut Settings, &str);
    type Get = fn(&Validated) -> Option<SocketAddr>;
    let listeners: [(&str, Set, Get); 2] = [
        (
            "dashboard.listen",
            |settings, address| settings.dashboard.listen = Some(address.into()),
            |validated| validated.dashboard_listen,
        ),
        (
            "metrics.listen",
            |settings, address| settings.metrics.listen = Some(address.into()),
            |validated| validated.metrics_listen,
        ),
    ];
    for (key, set, get) in listeners {
        let mut settings = Settings::default();
        set(&mut settings, "0.0.0.0:8080");
        let error = settings.validate().unwrap_err();
        assert!(error.to_string().contains("auth is off"), "{key}: {error}");
        assert_eq!(key_of(error), key);

        let mut settings = with_tokens();
        settings.listen = "0.0.0.0:50051".into();
        set(&mut settings, "0.0.0.0:8080");
        let validated = settings.validate().unwrap();
        assert_eq!(
            get(&validated),
            Some("0.0.0.0:8080".parse().unwrap()),
            "{key}"
        );
    }
}
