//! How whoever runs a trial watches and steers it: [`TrainHooks`] receive progress after every
//! step and every epoch and may ask to stop; a [`CancellationFlag`] stops training from another
//! thread (a rejected heartbeat, a cancelled sweep, SIGTERM). Both take effect between batches,
//! and both leave a checkpoint to resume from.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::train::metrics::{EpochMetrics, Position};

/// A shared stop request, checked before every batch.
#[derive(Clone, Debug, Default)]
pub struct CancellationFlag(Arc<AtomicBool>);

impl CancellationFlag {
    /// Returns a flag that is not set.
    pub fn new() -> CancellationFlag {
        CancellationFlag::default()
    }

    /// Asks the trainer to stop after the batch in progress.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Returns true once [`CancellationFlag::cancel`] was called on any clone.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a hook wants after seeing progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop now: the trainer writes a checkpoint and returns [`StopReason::Hook`].
    Stop,
}

/// Why a run stopped before its last epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    Hook,
}

/// Progress after one training step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepProgress {
    /// The next batch to train (so `batch == batches_per_epoch` at an epoch's end).
    pub position: Position,
    pub epochs: u32,
    pub batches_per_epoch: u64,
    /// Learning rate of the step just taken.
    pub lr: f64,
    /// Mean loss of the step's batch.
    pub loss: f64,
    /// Training images per second in this epoch so far.
    pub images_per_second: f64,
}

impl StepProgress {
    /// Returns the fraction of the whole run done, in [0, 1].
    pub fn fraction_done(&self) -> f64 {
        let total = u64::from(self.epochs) * self.batches_per_epoch;
        self.position.global_step as f64 / total.max(1) as f64
    }
}

/// Receives progress; every method may ask to stop. The defaults continue.
pub trait TrainHooks {
    /// Called after every training step.
    fn on_step(&mut self, _progress: &StepProgress) -> Control {
        Control::Continue
    }

    /// Called after every epoch's evaluation (and its checkpoint).
    fn on_epoch(&mut self, _metrics: &EpochMetrics) -> Control {
        Control::Continue
    }
}

/// Hooks that watch nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

impl TrainHooks for NoHooks {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancelling_one_clone_cancels_all() {
        let flag = CancellationFlag::new();
        let other = flag.clone();
        assert!(!other.is_cancelled());
        flag.cancel();
        assert!(other.is_cancelled());
    }

    #[test]
    fn fraction_done_counts_steps_over_the_run() {
        let progress = StepProgress {
            position: Position {
                epoch: 1,
                batch: 5,
                global_step: 15,
            },
            epochs: 3,
            batches_per_epoch: 10,
            lr: 0.1,
            loss: 1.0,
            images_per_second: 1.0,
        };
        assert!((progress.fraction_done() - 0.5).abs() < 1e-12);
    }
}
