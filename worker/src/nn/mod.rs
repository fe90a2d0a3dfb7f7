//! The network: a design's layers in candle, built from the IR and initialised as torchvision
//! does, and the loss.
//!
//! [`model::Model`] builds a `deepmad_design::Network` layer for layer as
//! `deepmad_design::count::walk` lists it, from [`blocks`] (convolution + BatchNorm,
//! squeeze-excitation, the three block families) and [`norm::BatchNorm2d`]; [`init`] sets the
//! seeded initial values; [`loss`] is the soft-target cross-entropy and top-k accuracy. The ops
//! underneath are `deepmad_kernels`'.

pub mod blocks;
pub mod init;
pub mod loss;
pub mod model;
pub mod norm;

pub use model::{Model, NamedVar, VarRole};
