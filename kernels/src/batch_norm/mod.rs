//! BatchNorm over `(batch, channels, height, width)` activations, as PyTorch's `BatchNorm2d`:
//! training normalises with the batch's mean and biased variance and updates the running
//! statistics with the unbiased variance (`running = (1 - momentum) * running + momentum *
//! batch`); evaluation normalises with the running statistics.
//!
//! Why not candle-nn's `BatchNorm` (whose semantics are the same): its backward pass sums the
//! gradients of the per-channel broadcasts over batch, height and width at once, which candle's
//! CPU backend does element by element with an index division each; that was most of a
//! ResNet-20 training step. With [`Kernels::Deepmad`] the training pass is one custom op with a
//! written-out backward on the CPU ([`cpu`], which can also fuse the residual add and the
//! activation that follow: [`forward_act`]) and cuDNN's on CUDA. Elsewhere the same formula runs
//! as plain tensor ops under autograd.
//!
//! The layer that owns the tensors (the worker's `nn::BatchNorm2d`) lends them as a
//! [`BatchNormState`]; the functions here update its running statistics in place.

use candle_core::{DType, Device, Tensor, Var};
use deepmad_design::Activation;

use crate::Kernels;

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cudnn;

/// PyTorch's default epsilon.
pub const EPS: f64 = 1e-5;

/// One BatchNorm layer's tensors: the affine parameters and the running statistics, which a
/// training pass updates with `momentum`.
#[derive(Clone, Copy, Debug)]
pub struct BatchNormState<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub running_mean: &'a Var,
    pub running_var: &'a Var,
    pub momentum: f64,
}

/// `bn(xs)`: in training mode with the batch's statistics (and the running statistics
/// updated), otherwise with the running statistics.
pub fn forward(xs: &Tensor, bn: &BatchNormState, train: bool) -> candle_core::Result<Tensor> {
    if !train {
        return eval(xs, bn);
    }
    let count = count(xs)?;
    let (ys, stats) = train_pass(crate::current(), xs, bn.weight, bn.bias)?;
    record(bn, stats, count)?;
    Ok(ys)
}

/// `act(bn(xs) + residual)`: in training mode on the CPU with deepmad's kernels one fused op
/// ([`cpu`]), elsewhere the separate ops.
pub fn forward_act(
    xs: &Tensor,
    bn: &BatchNormState,
    train: bool,
    residual: Option<&Tensor>,
    activation: Option<Activation>,
) -> candle_core::Result<Tensor> {
    if fuses_on_cpu(xs, train, residual) {
        let (ys, stats) = cpu::train(xs, bn.weight, bn.bias, residual, activation)?;
        record(
            bn,
            BatchStats::from_channels(stats, ys.device())?,
            count(&ys)?,
        )?;
        return Ok(ys);
    }
    let mut ys = forward(xs, bn, train)?;
    if let Some(residual) = residual {
        ys = (ys + residual)?;
    }
    match activation {
        Some(activation) => crate::activation::activate(&ys, activation),
        None => Ok(ys),
    }
}

/// Whether training on `xs` (BatchNorm's input, or the convolution's before it) can use the
/// fused CPU ops ([`cpu`], [`crate::conv_bn`]).
pub(crate) fn fuses_on_cpu(xs: &Tensor, train: bool, residual: Option<&Tensor>) -> bool {
    train
        && crate::current() == Kernels::Deepmad
        && xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && residual.is_none_or(|r| r.dtype() == DType::F32)
}

/// Where a training pass left its batch statistics.
pub(crate) enum BatchStats {
    /// The detached batch mean and biased variance.
    Tensors { mean: Tensor, variance: Tensor },
    /// Saved by cuDNN on the GPU, read by `cuda::cudnn::update_running_statistics`.
    #[cfg(feature = "cuda")]
    Cudnn(cudnn::BatchNormStash),
}

impl BatchStats {
    /// The statistics a CPU op computed, as tensors on `device`.
    pub(crate) fn from_channels(
        stats: cpu::ChannelStats,
        device: &Device,
    ) -> candle_core::Result<BatchStats> {
        let channels = stats.mean.len();
        Ok(BatchStats::Tensors {
            mean: Tensor::from_vec(stats.mean, channels, device)?,
            variance: Tensor::from_vec(stats.variance, channels, device)?,
        })
    }
}

/// BatchNorm's training pass with the given kernels: the output (differentiable in `xs`,
/// `weight` and `bias`) and the batch statistics. deepmad's kernels are one custom op on the
/// CPU and cuDNN on CUDA; the stock path is plain tensor ops.
pub(crate) fn train_pass(
    kernels: Kernels,
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<(Tensor, BatchStats)> {
    let deepmad = kernels == Kernels::Deepmad && xs.dtype() == DType::F32;
    if deepmad && xs.device().is_cpu() {
        let (ys, stats) = cpu::train(xs, weight, bias, None, None)?;
        let stats = BatchStats::from_channels(stats, xs.device())?;
        return Ok((ys, stats));
    }
    #[cfg(feature = "cuda")]
    if deepmad && xs.device().is_cuda() {
        let (ys, stash) = cudnn::batch_norm_train(xs, weight, bias, EPS)?;
        return Ok((ys, BatchStats::Cudnn(stash)));
    }
    let (ys, mean, variance) = train_with_tensor_ops(xs, weight, bias)?;
    Ok((ys, BatchStats::Tensors { mean, variance }))
}

/// Folds a training pass's batch statistics over `count` values per channel into the layer's
/// running statistics.
pub(crate) fn record(
    bn: &BatchNormState,
    stats: BatchStats,
    count: usize,
) -> candle_core::Result<()> {
    match stats {
        BatchStats::Tensors { mean, variance } => {
            let momentum = bn.momentum;
            let unbiased = (variance * (count as f64 / (count - 1) as f64))?;
            let running_mean = bn.running_mean.as_detached_tensor();
            let running_var = bn.running_var.as_detached_tensor();
            bn.running_mean
                .set(&((running_mean * (1.0 - momentum))? + (mean * momentum)?)?)?;
            bn.running_var
                .set(&((running_var * (1.0 - momentum))? + (unbiased * momentum)?)?)
        }
        #[cfg(feature = "cuda")]
        BatchStats::Cudnn(stash) => cudnn::update_running_statistics(
            bn.running_mean.as_tensor(),
            bn.running_var.as_tensor(),
            stash,
            bn.momentum,
            EPS,
            count,
        ),
    }
}

/// Values per channel in a batch; at least two are needed for a variance.
pub(crate) fn count(xs: &Tensor) -> candle_core::Result<usize> {
    let (batch, _, height, width) = xs.dims4()?;
    let count = batch * height * width;
    if count < 2 {
        candle_core::bail!("batch norm needs more than one value per channel, got {count}");
    }
    Ok(count)
}

/// Evaluation: the running statistics folded into one scale and shift per channel.
fn eval(xs: &Tensor, bn: &BatchNormState) -> candle_core::Result<Tensor> {
    let channels = xs.dim(1)?;
    let running_mean = bn.running_mean.as_detached_tensor();
    let running_var = bn.running_var.as_detached_tensor();
    let scale = ((running_var + EPS)?.sqrt()?.recip()? * bn.weight)?;
    let shift = (bn.bias - (running_mean * &scale)?)?;
    xs.broadcast_mul(&scale.reshape((1, channels, 1, 1))?)?
        .broadcast_add(&shift.reshape((1, channels, 1, 1))?)
}

/// The same computation as the custom op, as tensor ops (any device, autograd backward).
fn train_with_tensor_ops(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let channels = xs.dim(1)?;
    let mean = xs.mean_keepdim((0, 2, 3))?;
    let centered = xs.broadcast_sub(&mean)?;
    let variance = centered.sqr()?.mean_keepdim((0, 2, 3))?;
    let inv_std = (&variance + EPS)?.sqrt()?.recip()?;
    let scale = inv_std.broadcast_mul(&weight.reshape((1, channels, 1, 1))?)?;
    let ys = centered
        .broadcast_mul(&scale)?
        .broadcast_add(&bias.reshape((1, channels, 1, 1))?)?;
    let mean = mean.flatten_all()?.detach();
    let variance = variance.flatten_all()?.detach();
    Ok((ys, mean, variance))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, ModuleT};

    use super::*;

    const SHAPE: (usize, usize, usize, usize) = (3, 4, 5, 5);

    fn pattern(count: usize, seed: u64) -> Vec<f32> {
        (0..count as u64)
            .map(|i| {
                let x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 1.0
            })
            .collect()
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        let difference = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        difference.max(0).unwrap().to_scalar().unwrap()
    }

    /// Fresh running statistics (mean 0, variance 1), as a new layer has.
    fn running() -> (Var, Var) {
        let mean = Var::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let variance = Var::ones(4, DType::F32, &Device::Cpu).unwrap();
        (mean, variance)
    }

    fn state<'a>(weight: &'a Var, bias: &'a Var, running: &'a (Var, Var)) -> BatchNormState<'a> {
        BatchNormState {
            weight: weight.as_tensor(),
            bias: bias.as_tensor(),
            running_mean: &running.0,
            running_var: &running.1,
            momentum: 0.1,
        }
    }

    /// candle-nn's `BatchNorm`, whose train-mode semantics are PyTorch's: the reference.
    fn reference(weight: &Var, bias: &Var) -> candle_nn::BatchNorm {
        candle_nn::BatchNorm::new_with_momentum(
            4,
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
            Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(),
            weight.as_tensor().clone(),
            bias.as_tensor().clone(),
            EPS,
            0.1,
        )
        .unwrap()
    }

    fn affine() -> (Var, Var) {
        let weight = Var::from_vec(vec![0.5f32, 1.5, -1.0, 2.0], 4, &Device::Cpu).unwrap();
        let bias = Var::from_vec(vec![0.1f32, -0.2, 0.3, 0.0], 4, &Device::Cpu).unwrap();
        (weight, bias)
    }

    /// The custom op, the generic tensor-op path and the reference agree on the output and on
    /// the gradients of input, weight and bias.
    #[test]
    fn matches_candle_nn_forward_and_backward() {
        let xs = Var::from_vec(pattern(300, 1), SHAPE, &Device::Cpu).unwrap();
        let loss_weights = Tensor::from_vec(pattern(300, 2), SHAPE, &Device::Cpu).unwrap();
        let (weight, bias) = affine();
        let candle_norm = reference(&weight, &bias);
        let run = |forward: &dyn Fn(&Tensor) -> Tensor| {
            let ys = forward(xs.as_tensor());
            let loss = (&ys * &loss_weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let grad_of = |var: &Var| grads.get(var.as_tensor()).unwrap().clone();
            [ys, grad_of(&xs), grad_of(&weight), grad_of(&bias)]
        };
        let (w, b) = (weight.as_tensor(), bias.as_tensor());
        let custom = run(&|x| train_pass(Kernels::Deepmad, x, w, b).unwrap().0);
        let generic = run(&|x| train_pass(Kernels::Stock, x, w, b).unwrap().0);
        let expected = run(&|x| candle_norm.forward_t(x, true).unwrap());
        for (index, name) in ["output", "input grad", "weight grad", "bias grad"]
            .iter()
            .enumerate()
        {
            let (a, b, c) = (&custom[index], &generic[index], &expected[index]);
            assert!(max_difference(a, c) < 1e-4, "custom {name}");
            assert!(max_difference(b, c) < 1e-4, "generic {name}");
        }
    }

    #[test]
    fn running_statistics_follow_pytorch() {
        let xs = Tensor::from_vec(pattern(300, 3), SHAPE, &Device::Cpu).unwrap();
        let (weight, bias) = affine();
        let stats = running();
        let candle_norm = reference(&weight, &bias);
        forward(&xs, &state(&weight, &bias, &stats), true).unwrap();
        candle_norm.forward_t(&xs, true).unwrap();
        let mean = stats.0.as_tensor();
        let variance = stats.1.as_tensor();
        assert!(max_difference(mean, candle_norm.running_mean()) < 1e-6);
        assert!(max_difference(variance, candle_norm.running_var()) < 1e-6);
        assert!(max_difference(mean, &Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap()) > 0.0);
    }

    #[test]
    fn eval_uses_running_statistics() {
        let (weight, bias) = affine();
        let stats = running();
        let set = |var: &Var, values: &[f32]| {
            var.set(&Tensor::new(values, &Device::Cpu).unwrap())
                .unwrap()
        };
        set(&stats.0, &[1.0, -1.0, 0.0, 0.0]);
        set(&stats.1, &[4.0, 0.25, 1.0, 1.0]);
        let xs = Tensor::new(&[3f32, 0.0, 0.0, 0.0], &Device::Cpu).unwrap();
        let xs = xs.reshape((1, 4, 1, 1)).unwrap();
        let ys = forward(&xs, &state(&weight, &bias, &stats), false).unwrap();
        let ys: Vec<f32> = ys.flatten_all().unwrap().to_vec1().unwrap();
        // 0.5 * (3 - 1) / sqrt(4) + 0.1 = 0.6; 1.5 * (0 + 1) / sqrt(0.25) - 0.2 = 2.8.
        assert!(
            (ys[0] - 0.6).abs() < 1e-4 && (ys[1] - 2.8).abs() < 1e-3,
            "{ys:?}"
        );
    }
}
