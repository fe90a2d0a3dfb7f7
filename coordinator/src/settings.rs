//! The coordinator's settings: raw [`Settings`] as read, validated into [`Validated`].
//!
//! Layers, later ones win: the defaults in this file, an optional TOML file, environment
//! variables `DEEPMAD__SECTION__KEY` (`DEEPMAD__LEASE__LEASE_MS=30000`; token lists are
//! comma-separated), then the command line's [`Overrides`]. [`load`] takes the environment
//! as a parameter so tests inject it; [`process_env`] is the one place that reads the real
//! one. Every error names the setting's key (`lease.lease_ms`, `listen`).
//!
//! A coordinator without tokens has auth off, so it may only listen on a loopback address.
//!
//! ```toml
//! listen = "0.0.0.0:50051"
//! [database]
//! url = "postgres://deepmad@db/deepmad"
//! [auth]
//! worker_tokens = ["..."]
//! client_tokens = ["..."]
//! [lease]
//! lease_ms = 60000
//! [dashboard]
//! listen = "0.0.0.0:8080"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use config::{Config, File, FileFormat};
use serde::{Deserialize, Serialize};

use crate::auth::Tokens;
use crate::store::{PoolSettings, RetryPolicy};

/// The prefix of the coordinator's environment variables; `__` separates the key's parts.
pub const ENV_PREFIX: &str = "DEEPMAD__";

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: [&str; 2] = ["auth.worker_tokens", "auth.client_tokens"];

/// Shortest token accepted: a guessable token is no authentication.
const MIN_TOKEN_CHARS: usize = 16;

/// Longest lease, grace period or backoff accepted: one day.
const MAX_MS: u64 = 86_400_000;

/// The settings as read, before validation. Every field has a default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The gRPC address, `IP:PORT`.
    pub listen: String,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub tls: TlsSettings,
    pub lease: LeaseSettings,
    pub retry: RetrySettings,
    pub metrics: MetricsSettings,
    pub dashboard: DashboardSettings,
    pub limits: LimitSettings,
    pub storage: StorageSettings,
}

/// Files the coordinator keeps beside the database.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Trained weights uploaded for downstream evaluations (one file per attempt).
    pub weights_dir: PathBuf,
}

impl Default for StorageSettings {
    fn default() -> StorageSettings {
        StorageSettings {
            weights_dir: PathBuf::from("deepmad-weights"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://...` or `sqlite://PATH`.
    pub url: String,
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long a request waits for a connection before it is answered `Unavailable` (during a
    /// database outage, every request waits this long).
    pub acquire_timeout_ms: u64,
}

/// Bearer tokens; both lists empty turns auth off.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub worker_tokens: Vec<String>,
    pub client_tokens: Vec<String>,
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field("worker_tokens", &self.worker_tokens.len())
            .field("client_tokens", &self.client_tokens.len())
            .finish()
    }
}

/// PEM files of the server's certificate chain and private key; both or neither.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    pub cert_path: Option<PathBuf>,
    pub key_path: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseSettings {
    /// How long a lease lasts without a heartbeat.
    pub lease_ms: u64,
    /// How often workers heartbeat.
    pub heartbeat_interval_ms: u64,
    /// Extension given to running leases at start-up (`None`: `lease_ms`).
    pub grace_ms: Option<u64>,
    /// How often expired leases are reaped.
    pub reaper_interval_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Deterministic failures allowed per trial (a sweep may set its own).
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Requeues after lost workers or retryable failures before a trial is dead.
    pub max_requeues: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// The Prometheus scrape address, `IP:PORT` (`None`: no metrics endpoint).
    pub listen: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardSettings {
    /// The web dashboard's HTTP address, `IP:PORT` (`None`: no dashboard). With tokens set it
    /// asks for a client token; without, it may only listen on a loopback address.
    pub listen: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    pub max_grid_points: u32,
    /// Leases one worker id may hold at once (a worker trains one trial per process; more
    /// would let one worker token take a whole sweep and let its leases expire).
    pub leases_per_worker: u32,
    /// Largest gRPC message, in either direction.
    pub max_message_bytes: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            listen: "127.0.0.1:50051".to_string(),
            database: DatabaseSettings::default(),
            auth: AuthSettings::default(),
            tls: TlsSettings::default(),
            lease: LeaseSettings::default(),
            retry: RetrySettings::default(),
            metrics: MetricsSettings::default(),
            dashboard: DashboardSettings::default(),
            limits: LimitSettings::default(),
            storage: StorageSettings::default(),
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> DatabaseSettings {
        DatabaseSettings {
            url: "sqlite://deepmad.db".to_string(),
            max_connections: 16,
            acquire_timeout_ms: 5_000,
        }
    }
}

impl Default for LeaseSettings {
    fn default() -> LeaseSettings {
        LeaseSettings {
            lease_ms: 60_000,
            heartbeat_interval_ms: 10_000,
            grace_ms: None,
            reaper_interval_ms: 5_000,
        }
    }
}

impl Default for RetrySettings {
    fn default() -> RetrySettings {
        RetrySettings {
            max_attempts: 3,
            backoff_base_ms: 5_000,
            backoff_max_ms: 300_000,
            max_requeues: 10,
        }
    }
}

impl Default for LimitSettings {
    fn default() -> LimitSettings {
        LimitSettings {
            max_grid_points: 10_000,
            leases_per_worker: 1,
            max_message_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Settings given on the command line; they win over every other layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub listen: Option<String>,
    pub database_url: Option<String>,
}

/// A setting that cannot be used; the message names its key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: String, reason: String },
    /// The file or the environment could not be read or parsed.
    #[error("cannot load settings from {source_name}: {reason}")]
    Load { source_name: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// The server's TLS identity, read from the PEM files at start-up.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The lease protocol's timings, in milliseconds (as the store takes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTimes {
    pub lease_ms: i64,
    pub heartbeat_interval_ms: i64,
    pub grace_ms: i64,
    pub reaper_interval_ms: i64,
}

/// Request limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_grid_points: usize,
    pub leases_per_worker: i64,
    pub max_message_bytes: usize,
}

/// The settings in force: every value checked, every file read.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    pub listen: SocketAddr,
    pub database_url: String,
    pub pool: PoolSettings,
    /// Empty: auth is off (and `listen` is a loopback address).
    pub tokens: Tokens,
    pub tls: Option<TlsIdentity>,
    pub lease: LeaseTimes,
    /// Default deterministic-failure limit per trial.
    pub max_attempts: u32,
    pub retry: RetryPolicy,
    pub metrics_listen: Option<SocketAddr>,
    /// The dashboard's address (a loopback one when auth is off).
    pub dashboard_listen: Option<SocketAddr>,
    pub limits: Limits,
    /// Where uploaded weights are kept.
    pub weights_dir: PathBuf,
}

/// Returns the process's `DEEPMAD__*` environment variables: the only place the coordinator
/// reads its environment. Variables that are not valid Unicode are skipped.
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(key, _)| is_ours(key))
        .collect()
}

fn is_ours(key: &str) -> bool {
    key.len() > ENV_PREFIX.len() && key[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX)
}

/// Loads the layers and validates them: defaults, then `file` (TOML; must exist when given),
/// then the `DEEPMAD__*` entries of `env` (others are ignored), then `overrides`.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &Overrides,
) -> Result<Validated, SettingsError> {
    load_raw(file, env, overrides)?.validate()
}

/// Loads the layers into raw [`Settings`] without validating them.
pub fn load_raw(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &Overrides,
) -> Result<Settings, SettingsError> {
    let mut builder = Config::builder();
    let mut source_name = "the defaults".to_string();
    if let Some(path) = file {
        builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        source_name = path.display().to_string();
    }
    // Environment and flags are overrides: they win over the file whatever the order of keys.
    let env = env_entries(env);
    if !env.is_empty() {
        source_name = format!("{source_name} and the environment");
    }
    for (key, value) in env {
        builder = match LIST_KEYS.contains(&key.as_str()) {
            true => builder.set_override(&key, split_list(&value)),
            false => builder.set_override(&key, value),
        }
        .map_err(|error| invalid(&key, error.to_string()))?;
    }
    let flags = [
        ("listen", &overrides.listen),
        ("database.url", &overrides.database_url),
    ];
    for (key, value) in flags {
        builder = builder
            .set_override_option(key, value.clone())
            .map_err(|error| invalid(key, error.to_string()))?;
    }
    let config = builder.build().map_err(|error| SettingsError::Load {
        source_name: source_name.clone(),
        reason: error.to_string(),
    })?;
    check_known_keys(&config)?;
    config
        .try_deserialize()
        .map_err(|error| SettingsError::Load {
            source_name,
            reason: error.to_string(),
        })
}

/// Returns `(section.key, value)` for each `DEEPMAD__SECTION__KEY` entry, sorted by key.
fn env_entries(env: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    env.into_iter()
        .filter(|(key, _)| is_ours(key))
        .map(|(key, value)| {
            let path = key[ENV_PREFIX.len()..]
                .to_ascii_lowercase()
                .replace("__", ".");
            (path, value)
        })
        .collect()
}

fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
}

/// Fails naming the first key that no setting has. The known keys are those of
/// `Settings::default()` serialized, so this list cannot drift from the struct.
fn check_known_keys(config: &Config) -> Result<(), SettingsError> {
    let schema = serde_json::to_value(Settings::default()).expect("settings serialize");
    let given = config::Source::collect(config).map_err(|error| SettingsError::Load {
        source_name: "the settings".into(),
        reason: error.to_string(),
    })?;
    for (section, value) in given {
        let Some(known) = schema.get(&section) else {
            return Err(invalid(&section, "no such setting"));
        };
        let (Some(known_keys), Ok(keys)) = (known.as_object(), value.into_table()) else {
            continue;
        };
        if let Some(key) = keys.keys().find(|key| !known_keys.contains_key(*key)) {
            let names: Vec<&str> = known_keys.keys().map(String::as_str).collect();
            return Err(invalid(
                &format!("{section}.{key}"),
                format!(
                    "no such setting (known in [{section}]: {})",
                    names.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

impl Settings {
    /// Checks every value and reads the TLS files, naming the key at fault.
    pub fn validate(&self) -> Result<Validated, SettingsError> {
        let listen = parse_address("listen", &self.listen)?;
        let metrics_listen = match &self.metrics.listen {
            Some(text) => Some(parse_address("metrics.listen", text)?),
            None => None,
        };
        let tokens = self.auth.validate(listen)?;
        // The metrics page has no authentication: like gRPC and the dashboard, it may only
        // leave this machine when tokens are set (issue 24), so that a coordinator with auth
        // off stays a loopback-only one.
        if let Some(address) = metrics_listen {
            if !tokens.is_enabled() && !address.ip().is_loopback() {
                return Err(invalid(
                    "metrics.listen",
                    format!(
                        "{address} is not a loopback address, and auth is off: set \
                         auth.worker_tokens and auth.client_tokens to serve metrics beyond \
                         this machine"
                    ),
                ));
            }
        }
        let dashboard_listen = self.dashboard.validate(&tokens)?;
        Ok(Validated {
            listen,
            database_url: self.database.validate()?,
            pool: self.database.validate_pool()?,
            tokens,
            tls: self.tls.validate()?,
            lease: self.lease.validate()?,
            max_attempts: self.retry.validate_max_attempts()?,
            retry: self.retry.validate_policy()?,
            metrics_listen,
            dashboard_listen,
            limits: self.limits.validate()?,
            weights_dir: self.storage.validate()?,
        })
    }
}

fn parse_address(key: &str, text: &str) -> Result<SocketAddr, SettingsError> {
    text.trim().parse().map_err(|_| {
        invalid(
            key,
            format!("expected IP:PORT such as 127.0.0.1:50051, got {text:?}"),
        )
    })
}

impl StorageSettings {
    fn validate(&self) -> Result<PathBuf, SettingsError> {
        if self.weights_dir.as_os_str().is_empty() {
            return Err(invalid(
                "storage.weights_dir",
                "must name a directory".to_string(),
            ));
        }
        Ok(self.weights_dir.clone())
    }
}

impl DashboardSettings {
    /// Parses the address; without tokens it must be a loopback one, as gRPC's.
    fn validate(&self, tokens: &Tokens) -> Result<Option<SocketAddr>, SettingsError> {
        let Some(text) = &self.listen else {
            return Ok(None);
        };
        let address = parse_address("dashboard.listen", text)?;
        if !tokens.is_enabled() && !address.ip().is_loopback() {
            return Err(invalid(
                "dashboard.listen",
                format!(
                    "{address} is not a loopback address, and auth is off: set \
                     auth.worker_tokens and auth.client_tokens to serve the dashboard beyond \
                     this machine"
                ),
            ));
        }
        Ok(Some(address))
    }
}

impl DatabaseSettings {
    fn validate(&self) -> Result<String, SettingsError> {
        let url = self.url.trim();
        let known = ["postgres://", "postgresql://", "sqlite:"];
        if !known.iter().any(|scheme| url.starts_with(scheme)) {
            return Err(invalid(
                "database.url",
                "expected postgres://USER@HOST/DB or sqlite://PATH",
            ));
        }
        Ok(url.to_string())
    }

    fn validate_pool(&self) -> Result<PoolSettings, SettingsError> {
        let max_connections = check_range(
            "database.max_connections",
            u64::from(self.max_connections),
            1,
            1_000,
        )?;
        let acquire_timeout_ms = check_range(
            "database.acquire_timeout_ms",
            self.acquire_timeout_ms,
            100,
            600_000,
        )?;
        Ok(PoolSettings {
            max_connections: u32::try_from(max_connections).expect("bounded above"),
            acquire_timeout: std::time::Duration::from_millis(
                u64::try_from(acquire_timeout_ms).expect("bounded below by 100"),
            ),
        })
    }
}

impl AuthSettings {
    /// Checks the tokens; without any, `listen` must be a loopback address.
    fn validate(&self, listen: SocketAddr) -> Result<Tokens, SettingsError> {
        let lists = [
            ("auth.worker_tokens", &self.worker_tokens),
            ("auth.client_tokens", &self.client_tokens),
        ];
        if lists.iter().all(|(_, tokens)| tokens.is_empty()) {
            if !listen.ip().is_loopback() {
                return Err(invalid(
                    "listen",
                    format!(
                        "{listen} is not a loopback address, and auth is off: set \
                         auth.worker_tokens and auth.client_tokens to listen beyond this machine"
                    ),
                ));
            }
            return Ok(Tokens::default());
        }
        for (key, tokens) in lists {
            if tokens.is_empty() {
                return Err(invalid(
                    key,
                    "must not be empty when the other token list is set",
                ));
            }
            if let Some(index) = tokens.iter().position(|token| !token_is_well_formed(token)) {
                return Err(invalid(
                    key,
                    format!(
                        "token {index} must be at least {MIN_TOKEN_CHARS} visible characters, \
                         without spaces or commas"
                    ),
                ));
            }
        }
        if self
            .worker_tokens
            .iter()
            .any(|token| self.client_tokens.contains(token))
        {
            return Err(invalid(
                "auth.client_tokens",
                "a token cannot be both a worker and a client token",
            ));
        }
        Ok(Tokens::new(&self.worker_tokens, &self.client_tokens))
    }
}

fn token_is_well_formed(token: &str) -> bool {
    token.chars().count() >= MIN_TOKEN_CHARS
        && token.chars().all(|c| c.is_ascii_graphic() && c != ',')
}

impl TlsSettings {
    fn validate(&self) -> Result<Option<TlsIdentity>, SettingsError> {
        match (&self.cert_path, &self.key_path) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(invalid("tls.key_path", "must be set with tls.cert_path")),
            (None, Some(_)) => Err(invalid("tls.cert_path", "must be set with tls.key_path")),
            (Some(cert), Some(key)) => Ok(Some(TlsIdentity {
                cert_pem: read_pem("tls.cert_path", cert)?,
                key_pem: read_pem("tls.key_path", key)?,
            })),
        }
    }
}

fn read_pem(key: &str, path: &Path) -> Result<Vec<u8>, SettingsError> {
    let bytes = std::fs::read(path)
        .map_err(|error| invalid(key, format!("cannot read {}: {error}", path.display())))?;
    if !bytes.windows(11).any(|window| window == b"-----BEGIN ") {
        return Err(invalid(
            key,
            format!("{} is not a PEM file", path.display()),
        ));
    }
    Ok(bytes)
}

fn check_range(key: &str, value: u64, min: u64, max: u64) -> Result<i64, SettingsError> {
    if !(min..=max).contains(&value) {
        return Err(invalid(
            key,
            format!("must be in {min}..={max}, got {value}"),
        ));
    }
    Ok(i64::try_from(value).expect("bounded by MAX_MS"))
}

impl LeaseSettings {
    fn validate(&self) -> Result<LeaseTimes, SettingsError> {
        let lease_ms = check_range("lease.lease_ms", self.lease_ms, 1_000, MAX_MS)?;
        let heartbeat_interval_ms = check_range(
            "lease.heartbeat_interval_ms",
            self.heartbeat_interval_ms,
            100,
            MAX_MS,
        )?;
        if lease_ms < 2 * heartbeat_interval_ms {
            return Err(invalid(
                "lease.lease_ms",
                format!(
                    "must be at least twice lease.heartbeat_interval_ms ({heartbeat_interval_ms}), \
                     so one late heartbeat does not lose the lease; got {lease_ms}"
                ),
            ));
        }
        let grace = self.grace_ms.unwrap_or(self.lease_ms);
        let grace_ms = check_range("lease.grace_ms", grace, 0, MAX_MS)?;
        let reaper_interval_ms = check_range(
            "lease.reaper_interval_ms",
            self.reaper_interval_ms,
            100,
            self.lease_ms,
        )?;
        Ok(LeaseTimes {
            lease_ms,
            heartbeat_interval_ms,
            grace_ms,
            reaper_interval_ms,
        })
    }
}

impl RetrySettings {
    fn validate_max_attempts(&self) -> Result<u32, SettingsError> {
        check_range("retry.max_attempts", u64::from(self.max_attempts), 1, 100)?;
        Ok(self.max_attempts)
    }

    fn validate_policy(&self) -> Result<RetryPolicy, SettingsError> {
        let backoff_base_ms =
            check_range("retry.backoff_base_ms", self.backoff_base_ms, 1, MAX_MS)?;
        let backoff_max_ms = check_range("retry.backoff_max_ms", self.backoff_max_ms, 1, MAX_MS)?;
        if backoff_max_ms < backoff_base_ms {
            return Err(invalid(
                "retry.backoff_max_ms",
                format!("must be at least retry.backoff_base_ms ({backoff_base_ms}), got {backoff_max_ms}"),
            ));
        }
        let max_requeues =
            check_range("retry.max_requeues", u64::from(self.max_requeues), 0, 1_000)?;
        Ok(RetryPolicy {
            backoff_base_ms,
            backoff_max_ms,
            max_requeues: i32::try_from(max_requeues).expect("at most 1000"),
        })
    }
}

impl LimitSettings {
    fn validate(&self) -> Result<Limits, SettingsError> {
        let points = check_range(
            "limits.max_grid_points",
            u64::from(self.max_grid_points),
            1,
            1_000_000,
        )?;
        let leases = check_range(
            "limits.leases_per_worker",
            u64::from(self.leases_per_worker),
            1,
            64,
        )?;
        let bytes = check_range(
            "limits.max_message_bytes",
            self.max_message_bytes,
            64 * 1024,
            256 * 1024 * 1024,
        )?;
        Ok(Limits {
            max_grid_points: usize::try_from(points).expect("at most a million"),
            leases_per_worker: leases,
            max_message_bytes: usize::try_from(bytes).expect("at most 256 MiB"),
        })
    }
}

#[cfg(test)]
mod tests;
