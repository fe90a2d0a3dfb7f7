//! Convolution + BatchNorm (+ residual add) (+ activation) as one training op, and the choice
//! between it and the separate ops: [`forward_act`].
//!
//! - CPU ([`cpu`]): with deepmad's kernels, always in training mode when the convolution is one
//!   the CPU kernels cover.
//! - CUDA (`cudnn.rs`, with the `cuda` feature): opt-in with `DEEPMAD_CUDA_CONV_BN=fused`
//!   (not yet run on a GPU), and not for a depthwise convolution when deepmad's own depthwise
//!   kernels were chosen (`DEEPMAD_DEPTHWISE=deepmad`), since the fused op calls cuDNN.
//! - Otherwise, and in evaluation: [`crate::conv::conv2d`], then
//!   [`crate::batch_norm::forward_act`].
//!
//! Both fused ops take one parameter tensor (the flattened convolution weight, then
//! BatchNorm's weight and bias: [`params`]) so that their backward passes write one buffer.

#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::{CustomOp2, CustomOp3, Shape, Tensor};
use deepmad_design::Activation;

use crate::batch_norm::{self, BatchNormState, BatchStats};

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cudnn;

/// One convolution's weight `(out, in / groups, k, k)` and geometry.
#[derive(Clone, Copy, Debug)]
pub struct Conv<'a> {
    pub weight: &'a Tensor,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl Conv<'_> {
    fn geometry(&self) -> (usize, usize, usize) {
        (self.stride, self.padding, self.groups)
    }
}

/// `act(bn(conv(xs)) + residual)`: in training mode with deepmad's kernels one fused op where
/// one covers the case, otherwise the convolution and [`batch_norm::forward_act`]. A training
/// pass updates `bn`'s running statistics.
pub fn forward_act(
    xs: &Tensor,
    conv: Conv,
    bn: &BatchNormState,
    train: bool,
    residual: Option<&Tensor>,
    activation: Option<Activation>,
) -> candle_core::Result<Tensor> {
    if batch_norm::fuses_on_cpu(xs, train, residual) {
        let (weight, geometry) = (conv.weight, conv.geometry());
        let fused = cpu::train(
            xs, weight, geometry, bn.weight, bn.bias, residual, activation,
        )?;
        if let Some((ys, stats)) = fused {
            let count = batch_norm::count(&ys)?;
            batch_norm::record(bn, BatchStats::from_channels(stats, ys.device())?, count)?;
            return Ok(ys);
        }
    }
    #[cfg(feature = "cuda")]
    if fuses_on_cuda(xs, &conv, train, residual)? {
        let (weight, geometry) = (conv.weight, conv.geometry());
        let eps = batch_norm::EPS;
        let (ys, stash) = cudnn::train(
            xs, weight, geometry, bn.weight, bn.bias, residual, activation, eps,
        )?;
        batch_norm::record(bn, BatchStats::Cudnn(stash), batch_norm::count(&ys)?)?;
        return Ok(ys);
    }
    let ys = crate::conv::conv2d(xs, conv.weight, conv.stride, conv.padding, conv.groups)?;
    batch_norm::forward_act(&ys, bn, train, residual, activation)
}

/// Whether training on CUDA uses the fused cuDNN op: only with `DEEPMAD_CUDA_CONV_BN=fused`
/// (see [`cudnn::enabled`]), f32 and deepmad's kernels, and not for a depthwise convolution
/// when deepmad's own depthwise kernels were chosen.
#[cfg(feature = "cuda")]
fn fuses_on_cuda(
    xs: &Tensor,
    conv: &Conv,
    train: bool,
    residual: Option<&Tensor>,
) -> candle_core::Result<bool> {
    let groups = conv.groups;
    let depthwise = groups > 1 && groups == xs.dim(1)? && conv.weight.dim(0)? == groups;
    Ok(train
        && cudnn::enabled()?
        && crate::current() == crate::Kernels::Deepmad
        && xs.device().is_cuda()
        && xs.dtype() == DType::F32
        && conv.weight.dtype() == DType::F32
        && residual.is_none_or(|r| r.dtype() == DType::F32)
        && !(depthwise && crate::conv::own_depthwise_kernels()))
}

/// Applies a fused op (this CPU one or its CUDA twin) to `xs` and the parameters, with the
/// residual as a third input when there is one; the residual must have the output's shape.
pub(crate) fn apply<Op: CustomOp2 + CustomOp3 + Send + Sync + 'static>(
    xs: &Tensor,
    params: &Tensor,
    residual: Option<&Tensor>,
    output: &Shape,
    op: Op,
) -> candle_core::Result<Tensor> {
    let xs = xs.contiguous()?;
    match residual {
        Some(residual) => {
            if residual.shape() != output {
                candle_core::bail!(
                    "conv + batch norm residual: shape {:?} does not match the output's {:?}",
                    residual.shape(),
                    output
                );
            }
            xs.apply_op3(params, &residual.contiguous()?, op)
        }
        None => xs.apply_op2(params, op),
    }
}

/// The op's parameter input: the convolution weight flattened, then BatchNorm's weight and
/// bias. Parameters are small (at most a few hundred thousand values), so the concatenation and
/// the split of its gradient are cheap.
pub(crate) fn params(
    weight: &Tensor,
    bn_weight: &Tensor,
    bn_bias: &Tensor,
) -> candle_core::Result<Tensor> {
    Tensor::cat(&[&weight.flatten_all()?, bn_weight, bn_bias], 0)
}

/// Splits a fused op's backward buffer (the input's gradient when `input_gradient`, then the
/// parameters', then the residual's when there is one) into views of their shapes. Shared by
/// the CPU op and its CUDA twin (`cudnn.rs`).
pub(crate) fn split_gradients(
    flat: &Tensor,
    xs: &Tensor,
    params: &Tensor,
    residual: Option<&Tensor>,
    input_gradient: bool,
) -> candle_core::Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
    let mut start = 0;
    let mut take = |len: usize| {
        let view = flat.narrow(0, start, len);
        start += len;
        view
    };
    let dx = if input_gradient {
        Some(take(xs.elem_count())?.reshape(xs.shape())?)
    } else {
        None
    };
    let dparams = take(params.elem_count())?;
    let dresidual = residual
        .map(|r| take(r.elem_count())?.reshape(r.shape()))
        .transpose()?;
    Ok((dx, dparams, dresidual))
}
