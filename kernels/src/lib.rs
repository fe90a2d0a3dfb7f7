//! deepmad-kernels: the training kernels of deepmad's worker, as candle custom ops with a CPU
//! and a CUDA implementation each, and the one switch between them and candle's stock ops.
//!
//! Start reading at [`conv::conv2d`] and [`batch_norm`]: each dispatches on the process's
//! [`Kernels`] ([`current`], [`set`], [`scoped`]) and on the tensor's device. The ops:
//! - [`conv`]: 2-D convolution with both gradients. CPU: direct stride-1 kernels
//!   (`conv/direct.rs`), im2col + gemm (`conv/dense.rs`), depthwise on padded planes
//!   (`conv/depthwise.rs`); CUDA: cuDNN (`cuda/cudnn.rs`).
//! - [`batch_norm`]: BatchNorm's training and evaluation passes and its running statistics;
//!   on the CPU one op with a written-out backward that can fuse a residual add and an
//!   activation (`batch_norm/cpu.rs`), on CUDA cuDNN's.
//! - [`conv_bn`]: convolution + BatchNorm (+ residual) (+ activation) as one training op
//!   (`conv_bn/cpu.rs`; `conv_bn/cudnn.rs` on CUDA, opt-in).
//! - [`activation`]: ReLU, ReLU6 and SiLU, one op each way.
//! - [`sgd`]: the fused in-place SGD update.
//! - [`parity`]: every op on a device against candle's stock ops on the CPU (`deepmad bench
//!   --check`; the integration tests run it on the CPU).
//!
//! This is the workspace's only crate with `unsafe` code: SIMD intrinsics (`simd.rs`,
//! `conv/direct.rs`), uninitialised output buffers (`buffer.rs`), CUDA launches and cuDNN
//! calls (`cuda/`), and glibc's `mallopt` (`heap.rs`). Every block says why it is sound in a `// SAFETY:` comment, which clippy
//! enforces (`undocumented_unsafe_blocks`).
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod activation;
pub mod batch_norm;
mod buffer;
pub mod conv;
pub mod conv_bn;
#[cfg(feature = "cuda")]
mod cuda;
pub mod heap;
mod layout;
pub mod parity;
pub mod sgd;
mod simd;
mod switch;

pub use switch::{current, scoped, set, Kernels, KernelsScope};

/// Prepares a freshly opened device for training: on CUDA, deepmad's kernels and the allocator
/// settings of `cuda::prepare_device`; nothing on the CPU.
pub fn prepare_device(device: &candle_core::Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = device {
        return cuda::prepare_device(cuda);
    }
    let _ = device;
    Ok(())
}

/// Returns true when this build has candle's CUDA backend and deepmad's CUDA kernels.
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}
