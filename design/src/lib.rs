//! deepmad-design: the pure mathematics of DeepMAD (Shen et al., 2023, arXiv:2303.02165).
//!
//! Start reading at [`arch::Network`], the architecture IR, then [`count::walk`], which every
//! count and score folds over. [`score`] implements the paper's conventions (Sec. 4),
//! [`tinynas`] those of the paper's official code, and [`solver`] solves Sec. 4.3's
//! mathematical program. [`classic`] holds torchvision's reference networks. [`recipe`] is
//! the training recipe of a trial, checked here so the coordinator and the workers agree.
//!
//! This crate does no I/O, spawns no threads and uses no global random state: every function
//! is a deterministic function of its arguments.
#![forbid(unsafe_code)]

pub mod analyze;
pub mod arch;
pub mod classic;
pub mod count;
pub mod dataset;
pub mod digest;
pub mod error;
mod memo;
pub mod recipe;
pub mod score;
pub mod solver;
pub mod tinynas;
pub mod units;

pub use arch::{Activation, BlockKind, Mid, Network, Stage, Stem};
pub use error::DesignError;
pub use score::{Analysis, ObjectiveKind, Score};
