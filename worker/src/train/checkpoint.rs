//! Checkpoints: one safetensors file with the model (parameters and BatchNorm statistics), the
//! optimiser's momentum buffers, and in its metadata the trial's identity and training state.
//!
//! Tensors are `model.<name>` and `momentum.<name>`. Metadata keys: `format`, `design_hash`,
//! `recipe_hash`, `dataset_hash`, `seed` and `state` (JSON of [`TrainState`]). No generator
//! state is stored: every random draw derives from (seed, epoch, batch) (see [`crate::rng`]).
//! The file is written to a temp file beside `<path>`, synced, then renamed over `<path>`, so a
//! crash leaves the previous checkpoint intact. A checkpoint that cannot be loaded is renamed
//! aside by [`set_aside`] (kept for inspection, never deleted).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::WorkerError;
use crate::nn::model::Model;
use crate::train::metrics::{EpochMetrics, EpochSums, Position};
use crate::train::optim::Sgd;

const FORMAT: &str = "deepmad-checkpoint/1";

/// What makes a checkpoint belong to a trial: resuming with anything else is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrialIdentity {
    pub design_hash: String,
    pub recipe_hash: String,
    pub dataset_hash: String,
    pub seed: u64,
}

/// Where training is and what it has measured so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub position: Position,
    pub history: Vec<EpochMetrics>,
    pub epoch_sums: EpochSums,
}

/// A checkpoint read from disk, not yet applied to a model.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    pub identity: TrialIdentity,
    pub state: TrainState,
    tensors: HashMap<String, Tensor>,
    path: PathBuf,
}

/// Writes the checkpoint of `model` and `optimizer` at `state` to `path`, atomically.
pub fn save(
    path: &Path,
    identity: &TrialIdentity,
    model: &Model,
    optimizer: &Sgd,
    state: &TrainState,
) -> Result<(), WorkerError> {
    let failed = |reason: String| WorkerError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for named in model.named_vars() {
        let tensor = named.var.as_detached_tensor().to_device(&Device::Cpu)?;
        tensors.push((format!("model.{}", named.name), tensor));
    }
    for (name, buffer) in optimizer.momentum_buffers() {
        tensors.push((format!("momentum.{name}"), buffer.to_device(&Device::Cpu)?));
    }
    let state_json = serde_json::to_string(state).map_err(|error| failed(error.to_string()))?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("design_hash".to_string(), identity.design_hash.clone()),
        ("recipe_hash".to_string(), identity.recipe_hash.clone()),
        ("dataset_hash".to_string(), identity.dataset_hash.clone()),
        ("seed".to_string(), identity.seed.to_string()),
        ("state".to_string(), state_json),
    ]);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|error| failed(format!("cannot serialize: {error}")))?;
    write_atomically(path, &bytes)
}

/// Temp files written by this process so far, so that each has its own name.
static TEMPORARY_FILES: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `<path>.<process id>-<n>.tmp`, syncs, and renames it over `path`. The
/// temp name is unique so that two writers of one path (two workers started in one folder,
/// or two threads) never write into each other's half-written file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WorkerError> {
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|source| WorkerError::io(parent, source))?;
    }
    let mut temporary = path.as_os_str().to_owned();
    let count = TEMPORARY_FILES.fetch_add(1, Ordering::Relaxed);
    temporary.push(format!(".{}-{count}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let mut file =
        std::fs::File::create(&temporary).map_err(|source| WorkerError::io(&temporary, source))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| WorkerError::io(&temporary, source))?;
    std::fs::rename(&temporary, path).map_err(|source| WorkerError::io(path, source))
}

/// Renames the checkpoint at `path` to `<path>.corrupt-<unix seconds>` (`-<n>` added when that
/// name is taken) and returns the new path: training can start afresh while the file stays in
/// its folder for inspection.
pub fn set_aside(path: &Path) -> Result<PathBuf, WorkerError> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let mut taken = 0u32;
    loop {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".corrupt-{seconds}"));
        if taken > 0 {
            name.push(format!("-{taken}"));
        }
        let target = PathBuf::from(name);
        // Never rename over an earlier corrupt file: each one stays for inspection.
        if !target.exists() {
            std::fs::rename(path, &target).map_err(|source| WorkerError::io(path, source))?;
            return Ok(target);
        }
        taken += 1;
    }
}

/// Reads the checkpoint at `path` onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<LoadedCheckpoint, WorkerError> {
    let failed = |reason: String| WorkerError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| WorkerError::io(path, source))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|error| failed(format!("not a safetensors file: {error}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let field = |key: &str| {
        metadata
            .get(key)
            .cloned()
            .ok_or_else(|| failed(format!("metadata has no {key}")))
    };
    if field("format")? != FORMAT {
        return Err(failed(format!("format is not {FORMAT}")));
    }
    let identity = TrialIdentity {
        design_hash: field("design_hash")?,
        recipe_hash: field("recipe_hash")?,
        dataset_hash: field("dataset_hash")?,
        seed: field("seed")?
            .parse()
            .map_err(|_| failed("seed is not a number".into()))?,
    };
    let state: TrainState = serde_json::from_str(&field("state")?)
        .map_err(|error| failed(format!("state is malformed: {error}")))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
    Ok(LoadedCheckpoint {
        identity,
        state,
        tensors,
        path: path.to_path_buf(),
    })
}

impl LoadedCheckpoint {
    /// Refuses a checkpoint of another trial, naming what differs.
    pub fn check_identity(&self, expected: &TrialIdentity) -> Result<(), WorkerError> {
        let differences: Vec<&str> = [
            ("design", self.identity.design_hash != expected.design_hash),
            ("recipe", self.identity.recipe_hash != expected.recipe_hash),
            (
                "dataset",
                self.identity.dataset_hash != expected.dataset_hash,
            ),
            ("seed", self.identity.seed != expected.seed),
        ]
        .iter()
        .filter(|(_, differs)| *differs)
        .map(|(name, _)| *name)
        .collect();
        if differences.is_empty() {
            return Ok(());
        }
        Err(self.failed(format!(
            "belongs to another trial (its {} differ)",
            differences.join(", ")
        )))
    }

    /// Copies the stored weights, statistics and momentum buffers into `model` and `optimizer`.
    pub fn restore(&self, model: &Model, optimizer: &mut Sgd) -> Result<(), WorkerError> {
        self.copy_model(model, |_| true)?;
        for (key, tensor) in &self.tensors {
            if let Some(name) = key.strip_prefix("momentum.") {
                optimizer
                    .set_momentum_buffer(name, tensor.clone())
                    .map_err(|reason| self.failed(reason))?;
            }
        }
        Ok(())
    }

    /// Copies the stored backbone weights and BatchNorm statistics into `model`: every
    /// variable but the classifier's, which a downstream task trains afresh for its classes.
    /// The checkpoint must belong to `design_hash` (the design the backbone was trained as).
    pub fn restore_backbone(&self, model: &Model, design_hash: &str) -> Result<(), WorkerError> {
        if self.identity.design_hash != design_hash {
            return Err(WorkerError::Weights {
                reason: format!(
                    "{} holds design {}, the task's backbone is {design_hash}",
                    self.path.display(),
                    self.identity.design_hash
                ),
            });
        }
        self.copy_model(model, |name| !name.starts_with("classifier."))
    }

    /// Sets each of `model`'s variables that `wanted` names from its stored tensor, which
    /// must exist with the variable's shape.
    fn copy_model(&self, model: &Model, wanted: impl Fn(&str) -> bool) -> Result<(), WorkerError> {
        for named in model.named_vars() {
            if !wanted(&named.name) {
                continue;
            }
            let key = format!("model.{}", named.name);
            let tensor = self
                .tensors
                .get(&key)
                .ok_or_else(|| self.failed(format!("has no tensor {key}")))?;
            if tensor.dims() != named.var.dims() {
                return Err(self.failed(format!(
                    "{key} has shape {:?}, the model {:?}",
                    tensor.dims(),
                    named.var.dims()
                )));
            }
            named.var.set(tensor)?;
        }
        Ok(())
    }

    fn failed(&self, reason: String) -> WorkerError {
        WorkerError::Checkpoint {
            path: self.path.clone(),
            reason,
        }
    }
}
