//! Training one trial: the paper's recipe (Table 12) over a dataset, resumable from
//! checkpoints.
//!
//! Start at [`trainer::Trainer`]: it takes a [`trainer::TrialSpec`] (design, recipe, seed), a
//! loaded `data::Dataset` and [`trainer::TrainerOptions`], and runs epochs until done, stopped
//! by its [`control::TrainHooks`] or cancelled by a [`control::CancellationFlag`]. Around it:
//! [`recipe::Recipe`] (the hyper-parameters), [`augment`] (crops, flips, erasing, mixup and
//! cutmix into batches) and [`prefetch`] (batches assembled ahead on their own thread),
//! [`optim::Sgd`], [`schedule::CosineSchedule`], [`checkpoint`] and [`metrics`].

pub mod augment;
pub mod checkpoint;
pub mod control;
pub mod metrics;
pub mod optim;
pub mod prefetch;
pub mod recipe;
pub mod schedule;
pub mod trainer;

pub use trainer::{Pretrained, TrainOutcome, Trainer, TrainerOptions, TrialResult, TrialSpec};
