//! What training reports: where it is ([`Position`]), per-epoch metrics ([`EpochMetrics`]),
//! held-out evaluation ([`EvalMetrics`]). All serialisable: checkpoints carry them and results
//! are sent on as they are.

use serde::{Deserialize, Serialize};

/// A point in a run: the next batch to train is `batch` of epoch `epoch` (both 0-based);
/// `global_step` batches have been trained in all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u32,
    pub batch: u64,
    pub global_step: u64,
}

/// Loss and accuracy on the held-out split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean cross-entropy (no label smoothing).
    pub loss: f64,
    /// Fractions in [0, 1].
    pub top1: f64,
    pub top5: f64,
    pub samples: u64,
}

/// The running sums of the epoch in progress (checkpointed, so a resumed epoch reports the
/// same training loss as an uninterrupted one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochSums {
    /// Sum over batches of (mean batch loss x batch size).
    pub loss: f64,
    /// Images whose (first, unmixed) label was the arg-max.
    pub top1_hits: u64,
    pub samples: u64,
    /// Wall-clock seconds spent training in this epoch, over all attempts.
    pub seconds: f64,
}

impl EpochSums {
    /// Returns the mean training loss so far.
    pub fn mean_loss(&self) -> f64 {
        self.loss / self.samples.max(1) as f64
    }
}

/// One finished epoch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based, as people count epochs.
    pub epoch: u32,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Mean training loss on the (augmented, mixed) batches.
    pub train_loss: f64,
    /// Training top-1 against the unmixed labels (low under heavy mixing: a trend, not a score).
    pub train_top1: f64,
    pub test: EvalMetrics,
    /// Training images per second (training steps only, evaluation excluded).
    pub images_per_second: f64,
    pub seconds: f64,
}
