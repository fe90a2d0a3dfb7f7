//! deepmad-worker: builds DeepMAD designs in candle, loads datasets, trains them on CPU or CUDA
//! with the paper's recipe (Table 12), and runs the loop that leases trials from a
//! coordinator.
//!
//! The crate is in layers; each imports only the ones before it:
//! 1. `deepmad_kernels` (its own crate): the ops, with CPU and CUDA implementations.
//! 2. [`nn`]: the network ([`Model`], blocks, BatchNorm, initialisation, loss), and [`data`]:
//!    datasets on disk (CIFAR, IDX, image folders) loaded into a [`Dataset`].
//! 3. [`train`]: one trial's training ([`Trainer`]): recipe, augmentation, prefetch, SGD,
//!    schedule, checkpoints, metrics, hooks and cancellation.
//! 4. [`client`]: the coordinator client loop: it registers, leases trials, drives [`train`]
//!    on a blocking thread while heartbeating, uploads weights, and reports results without
//!    ever dropping one (an outbox on disk); [`client::settings`] is the worker's settings.
//!
//! Beside them: [`error::WorkerError`] with its [`error::FailureClass`], [`device`] (`cpu`,
//! `cuda:N`) and [`rng`] (seeded streams). `worker/README.md` has the conventions and what is
//! missing.
#![forbid(unsafe_code)]

pub mod client;
pub mod data;
pub mod device;
pub mod error;
pub mod nn;
pub mod rng;
pub mod train;

pub use data::{Dataset, DatasetKind, DatasetSpec, LoadOptions};
pub use device::DeviceSpec;
pub use error::{FailureClass, WorkerError};
pub use nn::Model;
pub use train::control::{
    CancellationFlag, Control, NoHooks, StepProgress, StopReason, TrainHooks,
};
pub use train::metrics::{EpochMetrics, EvalMetrics, Position};
pub use train::recipe::Recipe;
pub use train::{TrainOutcome, Trainer, TrainerOptions, TrialResult, TrialSpec};
