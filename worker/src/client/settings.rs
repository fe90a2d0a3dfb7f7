//! The worker's settings: an optional TOML file, then the command line (and the environment
//! variables the command line reads), later layers winning. [`WorkerSettings::resolve`] checks
//! every value and names the key at fault; nothing here connects to anything, so
//! `deepmad worker --check-config` can validate a deployment's settings offline.
//!
//! ```toml
//! coordinator = "http://head-node:50051"
//! token = "..."             # a worker token of the coordinator's configuration
//! ca_cert = "/etc/deepmad/ca.pem"   # for an https:// coordinator (default: system roots)
//! device = "cuda:0"
//! name = "node3/gpu0"
//! work_dir = "/var/lib/deepmad"
//! backoff_min_ms = 500      # first wait when the coordinator is unreachable
//! backoff_max_ms = 30000    # longest wait (the wait doubles up to it)
//! threads = 2               # CPU kernel threads (CPU workers)
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ClientConfig;
use crate::device::DeviceSpec;

/// The coordinator a worker talks to when none is configured.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";
/// The folder that holds each worker's own work directory (`<this>/<name>`) when no work
/// directory is configured.
pub const DEFAULT_WORK_DIR: &str = ".deepmad-worker";

/// One layer of worker settings; unset fields fall through to the layer below.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    pub coordinator: Option<String>,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub device: Option<String>,
    pub name: Option<String>,
    pub work_dir: Option<PathBuf>,
    pub max_trials: Option<u32>,
    pub backoff_min_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    pub threads: Option<usize>,
}

impl fmt::Debug for WorkerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerSettings")
            .field("coordinator", &self.coordinator)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_cert", &self.ca_cert)
            .field("device", &self.device)
            .field("name", &self.name)
            .field("work_dir", &self.work_dir)
            .field("max_trials", &self.max_trials)
            .field("backoff_min_ms", &self.backoff_min_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .field("threads", &self.threads)
            .finish()
    }
}

/// A setting that cannot be used, named by its key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read worker settings {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("worker setting `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Longest backoff accepted: an hour (a worker that waits longer looks dead).
const MAX_BACKOFF_MS: u64 = 3_600_000;

/// Settings checked and ready for [`crate::client::run`].
#[derive(Clone, Debug)]
pub struct Resolved {
    pub client: ClientConfig,
    /// CPU kernel threads to use, when set.
    pub threads: Option<usize>,
}

impl WorkerSettings {
    /// Reads a TOML settings file; unknown keys are errors (a typo must not pass silently).
    pub fn from_file(path: &Path) -> Result<WorkerSettings, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|error| SettingsError::File {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
        toml::from_str(&text).map_err(|error| SettingsError::File {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })
    }

    /// Returns `self` with every unset field taken from `below`.
    pub fn over(self, below: WorkerSettings) -> WorkerSettings {
        WorkerSettings {
            coordinator: self.coordinator.or(below.coordinator),
            token: self.token.or(below.token),
            ca_cert: self.ca_cert.or(below.ca_cert),
            device: self.device.or(below.device),
            name: self.name.or(below.name),
            work_dir: self.work_dir.or(below.work_dir),
            max_trials: self.max_trials.or(below.max_trials),
            backoff_min_ms: self.backoff_min_ms.or(below.backoff_min_ms),
            backoff_max_ms: self.backoff_max_ms.or(below.backoff_max_ms),
            threads: self.threads.or(below.threads),
        }
    }

    /// Applies the defaults and checks every value; `host` names the worker when no name is
    /// set (`host/device`).
    pub fn resolve(self, host: &str) -> Result<Resolved, SettingsError> {
        let coordinator = self
            .coordinator
            .unwrap_or_else(|| DEFAULT_COORDINATOR.to_string());
        // The same check the client makes when it connects, without connecting.
        deepmad_proto::client::endpoint(&coordinator, self.ca_cert.as_deref()).map_err(
            |error| match error {
                deepmad_proto::client::ClientError::CaCert { reason, .. } => {
                    invalid("ca_cert", reason)
                }
                other => invalid("coordinator", other.to_string()),
            },
        )?;
        if let Some(token) = &self.token {
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "token",
                    "must be non-empty printable ASCII without spaces",
                ));
            }
        }
        let device_text = self.device.unwrap_or_else(|| "cpu".to_string());
        let device: DeviceSpec = device_text
            .parse()
            .map_err(|error: crate::WorkerError| invalid("device", error.to_string()))?;
        let name = match self.name {
            Some(name) if name.trim().is_empty() => {
                return Err(invalid("name", "must not be empty"))
            }
            Some(name) => name,
            None => format!("{host}/{device}"),
        };
        let work_dir = self.work_dir.unwrap_or_else(|| default_work_dir(&name));
        if work_dir.as_os_str().is_empty() {
            return Err(invalid("work_dir", "must not be empty"));
        }
        if self.max_trials == Some(0) {
            return Err(invalid("max_trials", "must be at least 1 when set"));
        }
        let backoff_min = self.backoff_min_ms.unwrap_or(500);
        let backoff_max = self.backoff_max_ms.unwrap_or(30_000);
        if backoff_min == 0 || backoff_min > MAX_BACKOFF_MS {
            return Err(invalid(
                "backoff_min_ms",
                format!("must be in 1..={MAX_BACKOFF_MS}"),
            ));
        }
        if backoff_max < backoff_min || backoff_max > MAX_BACKOFF_MS {
            return Err(invalid(
                "backoff_max_ms",
                format!("must be in backoff_min_ms ({backoff_min})..={MAX_BACKOFF_MS}"),
            ));
        }
        if self.threads == Some(0) {
            return Err(invalid("threads", "must be at least 1 when set"));
        }
        Ok(Resolved {
            client: ClientConfig {
                coordinator,
                token: self.token,
                ca_cert: self.ca_cert,
                device,
                name,
                work_dir,
                backoff_min: Duration::from_millis(backoff_min),
                backoff_max: Duration::from_millis(backoff_max),
                max_trials: self.max_trials,
                status: None,
                call_timeout: super::DEFAULT_CALL_TIMEOUT,
            },
            threads: self.threads,
        })
    }
}

/// Returns `.deepmad-worker/<name>`, the name's characters other than letters, digits, `-`,
/// `_` and `.` made `_`: two workers started in one folder (one per GPU) must not share
/// checkpoints or undelivered results, and their names differ by default (host and device).
fn default_work_dir(name: &str) -> PathBuf {
    let folder: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '_',
        })
        .collect();
    // `.` and `..` alone would name the parent folders, not a folder of their own.
    let folder = if folder.chars().all(|c| c == '.') {
        folder.replace('.', "_")
    } else {
        folder
    };
    Path::new(DEFAULT_WORK_DIR).join(folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(result: Result<Resolved, SettingsError>) -> &'static str {
        match result {
            Err(SettingsError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid setting, got {other:?}"),
        }
    }

    #[test]
    fn defaults_resolve_to_a_local_cpu_worker() {
        let resolved = WorkerSettings::default().resolve("host").unwrap();
        assert_eq!(resolved.client.coordinator, DEFAULT_COORDINATOR);
        assert_eq!(resolved.client.device, DeviceSpec::Cpu);
        assert_eq!(resolved.client.name, "host/cpu");
        assert_eq!(resolved.client.backoff_min, Duration::from_millis(500));
        assert_eq!(resolved.client.backoff_max, Duration::from_secs(30));
        assert_eq!(resolved.client.max_trials, None);
        assert_eq!(
            resolved.client.work_dir,
            Path::new(DEFAULT_WORK_DIR).join("host_cpu")
        );
    }

    #[test]
    fn workers_started_in_one_folder_get_work_dirs_of_their_own() {
        let on = |device: &str| {
            let settings = WorkerSettings {
                device: Some(device.into()),
                ..WorkerSettings::default()
            };
            settings.resolve("node3").unwrap().client.work_dir
        };
        assert_eq!(on("cuda:0"), Path::new(".deepmad-worker/node3_cuda_0"));
        assert_ne!(on("cuda:0"), on("cuda:1"));
        assert_eq!(default_work_dir(".."), Path::new(".deepmad-worker/__"));
    }

    #[test]
    fn upper_layers_win_and_unset_fields_fall_through() {
        let file: WorkerSettings = toml::from_str(
            "coordinator = \"http://head:50051\"\ndevice = \"cuda:1\"\nbackoff_min_ms = 20\n",
        )
        .unwrap();
        let flags = WorkerSettings {
            device: Some("cpu".into()),
            ..WorkerSettings::default()
        };
        let merged = flags.over(file);
        assert_eq!(merged.coordinator.as_deref(), Some("http://head:50051"));
        assert_eq!(merged.device.as_deref(), Some("cpu"));
        assert_eq!(merged.backoff_min_ms, Some(20));
    }

    #[test]
    fn bad_values_name_their_key() {
        let with = |edit: fn(&mut WorkerSettings)| {
            let mut settings = WorkerSettings::default();
            edit(&mut settings);
            settings.resolve("host")
        };
        assert_eq!(
            key_of(with(|s| s.coordinator = Some("not a url".into()))),
            "coordinator"
        );
        assert_eq!(
            key_of(with(|s| s.coordinator = Some("ftp://head:1".into()))),
            "coordinator"
        );
        assert_eq!(key_of(with(|s| s.device = Some("tpu".into()))), "device");
        assert_eq!(key_of(with(|s| s.token = Some("a b".into()))), "token");
        assert_eq!(key_of(with(|s| s.name = Some(" ".into()))), "name");
        assert_eq!(key_of(with(|s| s.max_trials = Some(0))), "max_trials");
        assert_eq!(
            key_of(with(|s| s.backoff_min_ms = Some(0))),
            "backoff_min_ms"
        );
        assert_eq!(
            key_of(with(|s| {
                s.backoff_min_ms = Some(100);
                s.backoff_max_ms = Some(10);
            })),
            "backoff_max_ms"
        );
        assert_eq!(key_of(with(|s| s.threads = Some(0))), "threads");
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, "coordinater = \"http://x:1\"\n").unwrap();
        let error = WorkerSettings::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("coordinater"), "{error}");
    }

    #[test]
    fn the_token_is_not_printed() {
        let settings = WorkerSettings {
            token: Some("secret-worker-token".into()),
            ..WorkerSettings::default()
        };
        assert!(!format!("{settings:?}").contains("secret"));
    }
}
