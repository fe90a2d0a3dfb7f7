//! deepmad-worker: builds DeepMAD designs in candle, loads datasets, and trains them on CPU or
//! CUDA with the paper's recipe (Table 12).
//!
//! Start reading at [`train::Trainer`]: it takes a [`train::TrialSpec`] (design, recipe, seed),
//! a loaded [`data::Dataset`] and [`train::TrainerOptions`] (device, checkpoint path), and runs
//! epochs until done, stopped by its [`control::TrainHooks`] or cancelled by a
//! [`control::CancellationFlag`]; an interrupted trial resumes from its checkpoint.
//!
//! The pieces: [`model::Model`] and [`blocks`] (the network, layer for layer as
//! `deepmad_design::count::walk` lists it), [`conv`] and [`norm`] (convolution and BatchNorm
//! with a fast CPU backward), [`init`] (seeded torchvision initialisation), [`data`] (CIFAR,
//! IDX, image folders, augmentation, prefetch), [`recipe::Recipe`], [`optim::Sgd`],
//! [`schedule::CosineSchedule`], [`loss`], [`checkpoint`], [`metrics`], and
//! [`error::WorkerError`] with its [`error::FailureClass`]. `worker/README.md` has the
//! conventions, the measured speeds and what is missing.
//!
//! [`client`] is the coordinator client loop: it registers, leases trials, drives [`train`] on
//! a blocking thread while heartbeating, and reports results without ever dropping one.

pub mod activation;
pub mod blocks;
mod bn_act;
mod buffer;
pub mod checkpoint;
pub mod client;
pub mod control;
pub mod conv;
mod conv_bn;
#[cfg(feature = "cuda")]
mod cuda_kernels;
#[cfg(feature = "cuda")]
pub mod cudnn;
#[cfg(feature = "cuda")]
mod cudnn_conv_bn;
pub mod data;
pub mod device;
mod direct;
pub mod error;
pub mod init;
pub mod kernels;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod norm;
pub mod optim;
pub mod recipe;
pub mod rng;
pub mod schedule;
pub mod settings;
mod simd;
pub mod train;

pub use control::{CancellationFlag, Control, NoHooks, StepProgress, StopReason, TrainHooks};
pub use data::{Dataset, DatasetKind, DatasetSpec, LoadOptions};
pub use device::DeviceSpec;
pub use error::{FailureClass, WorkerError};
pub use kernels::Kernels;
pub use metrics::{EpochMetrics, EvalMetrics, Position};
pub use model::Model;
pub use recipe::Recipe;
pub use train::{TrainOutcome, Trainer, TrainerOptions, TrialResult, TrialSpec};
