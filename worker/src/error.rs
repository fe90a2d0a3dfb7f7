//! The one error type of the worker crate, and how a failure should be treated by whoever
//! schedules the trial ([`FailureClass`]).

use std::path::PathBuf;

use deepmad_design::DesignError;

/// Whether a failed trial is worth running again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The same inputs fail the same way again (a bad design, recipe or dataset, a diverged
    /// run); retrying wastes a GPU. Counts against the trial's retry limit (DESIGN.md, step 5).
    Deterministic,
    /// The machine, not the trial, failed (out of device memory, a lost device, a file system
    /// hiccup); another attempt, possibly on another worker, may succeed.
    Retryable,
}

/// Everything that can go wrong when loading data, building a model or training it.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The design itself is invalid or unknown.
    #[error("invalid design: {0}")]
    Design(DesignError),

    /// A recipe value is out of range; `key` is the TOML key.
    #[error("invalid recipe: {key} {reason}")]
    InvalidRecipe { key: String, reason: String },

    /// A recipe file is not valid TOML or has unknown keys.
    #[error("malformed recipe {location}: {reason}")]
    MalformedRecipe { location: String, reason: String },

    /// A `KIND:PATH` dataset spec could not be parsed.
    #[error("invalid dataset {spec:?}: {reason}")]
    InvalidDatasetSpec { spec: String, reason: String },

    /// A dataset file exists but its content is not what its format says.
    #[error("malformed dataset file {}: {reason}", path.display())]
    MalformedData { path: PathBuf, reason: String },

    /// A file or folder could not be read or written.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The design and the dataset (or the recipe) do not fit together.
    #[error("the design does not fit the data: {reason}")]
    Incompatible { reason: String },

    /// The requested device does not exist or this build cannot drive it.
    #[error("device {spec:?} is unavailable: {reason}")]
    Device { spec: String, reason: String },

    /// A tensor operation failed (shapes, device memory, a lost device).
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),

    /// A checkpoint could not be written, read, or does not belong to this trial.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    /// The training loss stopped being a finite number.
    #[error("training diverged at epoch {epoch}, batch {batch}: the loss is {loss}")]
    Diverged { epoch: u32, batch: u64, loss: f32 },

    /// The data loading thread died (a bug: loading is checked before training starts).
    #[error("the data loader stopped: {reason}")]
    Loader { reason: String },

    /// The coordinator could not be reached, or refused the worker.
    #[error("coordinator: {reason}")]
    Coordinator { reason: String },

    /// A downstream evaluation's starting weights do not exist or do not fit its design.
    #[error("pretrained weights: {reason}")]
    Weights { reason: String },
}

impl From<DesignError> for WorkerError {
    /// The recipe and the dataset spec are parsed by the design crate (the coordinator checks
    /// sweeps with the same code); their errors keep the worker's own variants.
    fn from(error: DesignError) -> WorkerError {
        match error {
            DesignError::InvalidRecipe { key, reason } => {
                WorkerError::InvalidRecipe { key, reason }
            }
            DesignError::MalformedRecipe { location, reason } => {
                WorkerError::MalformedRecipe { location, reason }
            }
            DesignError::InvalidDatasetSpec { spec, reason } => {
                WorkerError::InvalidDatasetSpec { spec, reason }
            }
            other => WorkerError::Design(other),
        }
    }
}

impl WorkerError {
    /// Returns whether retrying the trial may help (see [`FailureClass`]).
    pub fn class(&self) -> FailureClass {
        match self {
            WorkerError::Design(_)
            | WorkerError::InvalidRecipe { .. }
            | WorkerError::MalformedRecipe { .. }
            | WorkerError::InvalidDatasetSpec { .. }
            | WorkerError::MalformedData { .. }
            | WorkerError::Incompatible { .. }
            | WorkerError::Diverged { .. }
            | WorkerError::Weights { .. }
            | WorkerError::Loader { .. } => FailureClass::Deterministic,
            // A missing dataset or an unreadable checkpoint is a property of this machine:
            // another worker may have the file, and a fresh attempt starts without the checkpoint.
            WorkerError::Io { .. }
            | WorkerError::Coordinator { .. }
            | WorkerError::Device { .. }
            | WorkerError::Checkpoint { .. } => FailureClass::Retryable,
            WorkerError::Tensor(error) => tensor_failure_class(error),
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> WorkerError {
        WorkerError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Markers of failures that belong to the device rather than to the computation. candle
/// reports CUDA errors as text (cudarc's `DriverError` names the `CUresult`), so the
/// classification reads the message; everything else from candle (shapes, dtypes) is a bug or
/// a bad design and would fail again.
const DEVICE_FAILURE_MARKERS: [&str; 7] = [
    "out of memory",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "device lost",
];

fn tensor_failure_class(error: &candle_core::Error) -> FailureClass {
    let message = error.to_string();
    let lowercase = message.to_ascii_lowercase();
    let device_failure = DEVICE_FAILURE_MARKERS
        .iter()
        .any(|marker| message.contains(marker) || lowercase.contains(&marker.to_ascii_lowercase()));
    if device_failure {
        FailureClass::Retryable
    } else {
        FailureClass::Deterministic
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_retryable_and_shape_errors_are_not() {
        let oom = WorkerError::Tensor(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        assert_eq!(oom.class(), FailureClass::Retryable);
        let shape = WorkerError::Tensor(candle_core::Error::Msg("shape mismatch in add".into()));
        assert_eq!(shape.class(), FailureClass::Deterministic);
    }

    #[test]
    fn bad_inputs_are_deterministic_and_machine_trouble_is_not() {
        let recipe = WorkerError::InvalidRecipe {
            key: "lr".into(),
            reason: "must be positive".into(),
        };
        assert_eq!(recipe.class(), FailureClass::Deterministic);
        assert_eq!(recipe.to_string(), "invalid recipe: lr must be positive");
        let device = WorkerError::Device {
            spec: "cuda:3".into(),
            reason: "no such device".into(),
        };
        assert_eq!(device.class(), FailureClass::Retryable);
    }
}
