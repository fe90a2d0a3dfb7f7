//! BatchNorm over `(batch, channels, height, width)` activations, as PyTorch's `BatchNorm2d`:
//! training normalises with the batch's mean and biased variance and updates the running
//! statistics with the unbiased variance (`running = (1 - momentum) * running + momentum *
//! batch`); evaluation normalises with the running statistics.
//!
//! Why not candle-nn's `BatchNorm` (whose semantics are the same): its backward pass sums the
//! gradients of the per-channel broadcasts over batch, height and width at once, which candle's
//! CPU backend does element by element with an index division each; that was most of a
//! ResNet-20 training step. On the CPU the training pass here is one custom op with a written-out
//! backward ([`crate::bn_act`], which can also fuse the residual add and the activation that
//! follow: [`BatchNorm2d::forward_act`]); on CUDA it is cuDNN's. Elsewhere the same formula runs
//! as plain tensor ops under autograd.

use candle_core::{DType, ModuleT, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use deepmad_design::Activation;

/// PyTorch's default epsilon.
pub(crate) const EPS: f64 = 1e-5;

/// BatchNorm with an affine transform: `{vb}.weight`, `{vb}.bias` and the buffers
/// `{vb}.running_mean`, `{vb}.running_var`.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    momentum: f64,
}

impl BatchNorm2d {
    /// Creates the variables (values come from [`crate::init`]).
    pub fn new(vb: VarBuilder, channels: usize, momentum: f64) -> candle_core::Result<Self> {
        let zero = Init::Const(0.0);
        let running_mean = vb.get_with_hints(channels, "running_mean", zero)?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        Ok(BatchNorm2d {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", zero)?,
            // The var map's tensors are variables, so these share their storage.
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            momentum,
        })
    }

    fn forward_train(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let count = self.count(xs)?;
        let kernels = crate::kernels::current();
        let (ys, stats) = train_batch_norm(kernels, xs, &self.weight, &self.bias)?;
        match stats {
            BatchStats::Tensors { mean, variance } => {
                self.update_running_statistics(&mean, &variance, count)?;
            }
            #[cfg(feature = "cuda")]
            BatchStats::Cudnn(stash) => crate::cudnn::update_running_statistics(
                self.running_mean.as_tensor(),
                self.running_var.as_tensor(),
                stash,
                self.momentum,
                EPS,
                count,
            )?,
        }
        Ok(ys)
    }

    /// `act(bn(xs) + residual)`: in training mode on the CPU with deepmad's kernels one fused
    /// op ([`crate::bn_act`]), elsewhere the separate ops.
    pub fn forward_act(
        &self,
        xs: &Tensor,
        train: bool,
        residual: Option<&Tensor>,
        activation: Option<Activation>,
    ) -> candle_core::Result<Tensor> {
        if self.fuses(xs, train, residual) {
            let (ys, stats) =
                crate::bn_act::train(xs, &self.weight, &self.bias, residual, activation)?;
            self.record(&ys, stats)?;
            return Ok(ys);
        }
        let mut ys = self.forward_t(xs, train)?;
        if let Some(residual) = residual {
            ys = (ys + residual)?;
        }
        match activation {
            Some(activation) => crate::activation::activate(&ys, activation),
            None => Ok(ys),
        }
    }

    /// `act(bn(conv(xs)) + residual)` for [`crate::blocks::ConvBn`]: in training mode with
    /// deepmad's kernels one fused op ([`crate::conv_bn`] on the CPU, `cudnn_conv_bn` on CUDA),
    /// elsewhere the convolution and [`BatchNorm2d::forward_act`].
    pub(crate) fn conv_forward_act(
        &self,
        xs: &Tensor,
        conv: (&Tensor, usize, usize, usize),
        train: bool,
        residual: Option<&Tensor>,
        activation: Option<Activation>,
    ) -> candle_core::Result<Tensor> {
        let (weight, stride, padding, groups) = conv;
        if self.fuses(xs, train, residual) {
            let geometry = (stride, padding, groups);
            let fused = crate::conv_bn::train(
                xs,
                weight,
                geometry,
                &self.weight,
                &self.bias,
                residual,
                activation,
            )?;
            if let Some((ys, stats)) = fused {
                self.record(&ys, stats)?;
                return Ok(ys);
            }
        }
        #[cfg(feature = "cuda")]
        if self.fuses_on_cuda(xs, weight, train, residual, groups)? {
            let geometry = (stride, padding, groups);
            let (ys, stash) = crate::cudnn_conv_bn::train(
                xs,
                weight,
                geometry,
                &self.weight,
                &self.bias,
                residual,
                activation,
                EPS,
            )?;
            crate::cudnn::update_running_statistics(
                self.running_mean.as_tensor(),
                self.running_var.as_tensor(),
                stash,
                self.momentum,
                EPS,
                self.count(&ys)?,
            )?;
            return Ok(ys);
        }
        let ys = crate::conv::conv2d(xs, weight, stride, padding, groups)?;
        self.forward_act(&ys, train, residual, activation)
    }

    /// Whether training on CUDA uses the fused cuDNN op ([`crate::cudnn_conv_bn`]): only with
    /// `DEEPMAD_CUDA_CONV_BN=fused` (see [`crate::cudnn_conv_bn::enabled`]), f32 and deepmad's
    /// kernels, and not for a depthwise convolution when deepmad's own depthwise kernels were
    /// chosen (`DEEPMAD_DEPTHWISE=deepmad`; the fused op calls cuDNN).
    #[cfg(feature = "cuda")]
    fn fuses_on_cuda(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        train: bool,
        residual: Option<&Tensor>,
        groups: usize,
    ) -> candle_core::Result<bool> {
        let depthwise = groups > 1 && groups == xs.dim(1)? && weight.dim(0)? == groups;
        Ok(train
            && crate::cudnn_conv_bn::enabled()?
            && crate::kernels::current() == crate::kernels::Kernels::Deepmad
            && xs.device().is_cuda()
            && xs.dtype() == DType::F32
            && weight.dtype() == DType::F32
            && residual.is_none_or(|r| r.dtype() == DType::F32)
            && !(depthwise && crate::conv::own_depthwise_kernels()))
    }

    /// Whether training on `xs` (BatchNorm's input, or the convolution's before it) can use the
    /// fused CPU ops.
    fn fuses(&self, xs: &Tensor, train: bool, residual: Option<&Tensor>) -> bool {
        train
            && crate::kernels::current() == crate::kernels::Kernels::Deepmad
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && residual.is_none_or(|r| r.dtype() == DType::F32)
    }

    /// Folds a fused op's batch statistics into the running statistics; `ys` is the op's
    /// output, of BatchNorm's shape.
    fn record(&self, ys: &Tensor, stats: crate::bn_act::ChannelStats) -> candle_core::Result<()> {
        let count = self.count(ys)?;
        let (mean, variance) = stats_tensors(stats, ys.device())?;
        self.update_running_statistics(&mean, &variance, count)
    }

    /// Values per channel in a batch; at least two are needed for a variance.
    fn count(&self, xs: &Tensor) -> candle_core::Result<usize> {
        let (batch, _, height, width) = xs.dims4()?;
        let count = batch * height * width;
        if count < 2 {
            candle_core::bail!("batch norm needs more than one value per channel, got {count}");
        }
        Ok(count)
    }

    fn update_running_statistics(
        &self,
        mean: &Tensor,
        variance: &Tensor,
        count: usize,
    ) -> candle_core::Result<()> {
        let momentum = self.momentum;
        let unbiased = (variance * (count as f64 / (count - 1) as f64))?;
        let running_mean = self.running_mean.as_detached_tensor();
        let running_var = self.running_var.as_detached_tensor();
        self.running_mean
            .set(&((running_mean * (1.0 - momentum))? + (mean * momentum)?)?)?;
        self.running_var
            .set(&((running_var * (1.0 - momentum))? + (unbiased * momentum)?)?)
    }

    fn forward_eval(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let channels = xs.dim(1)?;
        let running_mean = self.running_mean.as_detached_tensor();
        let running_var = self.running_var.as_detached_tensor();
        let scale = ((running_var + EPS)?.sqrt()?.recip()? * &self.weight)?;
        let shift = (&self.bias - (running_mean * &scale)?)?;
        xs.broadcast_mul(&scale.reshape((1, channels, 1, 1))?)?
            .broadcast_add(&shift.reshape((1, channels, 1, 1))?)
    }
}

/// Where a training pass left its batch statistics.
pub(crate) enum BatchStats {
    /// The detached batch mean and biased variance.
    Tensors { mean: Tensor, variance: Tensor },
    /// Saved by cuDNN on the GPU, read by `cudnn::update_running_statistics`.
    #[cfg(feature = "cuda")]
    Cudnn(crate::cudnn::BatchNormStash),
}

/// BatchNorm's training pass with the given kernels: the output (differentiable in `xs`,
/// `weight` and `bias`) and the batch statistics. deepmad's kernels are one custom op on the
/// CPU and cuDNN on CUDA; the stock path is plain tensor ops.
pub(crate) fn train_batch_norm(
    kernels: crate::kernels::Kernels,
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<(Tensor, BatchStats)> {
    let deepmad = kernels == crate::kernels::Kernels::Deepmad && xs.dtype() == DType::F32;
    if deepmad && xs.device().is_cpu() {
        let (ys, stats) = crate::bn_act::train(xs, weight, bias, None, None)?;
        let (mean, variance) = stats_tensors(stats, xs.device())?;
        return Ok((ys, BatchStats::Tensors { mean, variance }));
    }
    #[cfg(feature = "cuda")]
    if deepmad && xs.device().is_cuda() {
        let (ys, stash) = crate::cudnn::batch_norm_train(xs, weight, bias, EPS)?;
        return Ok((ys, BatchStats::Cudnn(stash)));
    }
    let (ys, mean, variance) = train_batch_norm_generic(xs, weight, bias)?;
    Ok((ys, BatchStats::Tensors { mean, variance }))
}

fn stats_tensors(
    stats: crate::bn_act::ChannelStats,
    device: &candle_core::Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let channels = stats.mean.len();
    Ok((
        Tensor::from_vec(stats.mean, channels, device)?,
        Tensor::from_vec(stats.variance, channels, device)?,
    ))
}

/// The same computation as the custom op, as tensor ops (any device, autograd backward).
fn train_batch_norm_generic(
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

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if train {
            self.forward_train(xs)
        } else {
            self.forward_eval(xs)
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use candle_nn::VarMap;

    use super::*;
    use crate::kernels::Kernels;

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

    /// Ours with the given affine parameters and fresh running statistics.
    fn ours(weight: &Var, bias: &Var) -> BatchNorm2d {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        BatchNorm2d {
            weight: weight.as_tensor().clone(),
            bias: bias.as_tensor().clone(),
            ..BatchNorm2d::new(vb, 4, 0.1).unwrap()
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
        let custom = run(&|x| train_batch_norm(Kernels::Deepmad, x, w, b).unwrap().0);
        let generic = run(&|x| train_batch_norm(Kernels::Stock, x, w, b).unwrap().0);
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
        let (norm, candle_norm) = (ours(&weight, &bias), reference(&weight, &bias));
        norm.forward_t(&xs, true).unwrap();
        candle_norm.forward_t(&xs, true).unwrap();
        let mean = norm.running_mean.as_tensor();
        let variance = norm.running_var.as_tensor();
        assert!(max_difference(mean, candle_norm.running_mean()) < 1e-6);
        assert!(max_difference(variance, candle_norm.running_var()) < 1e-6);
        assert!(max_difference(mean, &Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap()) > 0.0);
    }

    #[test]
    fn eval_uses_running_statistics() {
        let (weight, bias) = affine();
        let norm = ours(&weight, &bias);
        let set = |var: &Var, values: &[f32]| {
            var.set(&Tensor::new(values, &Device::Cpu).unwrap())
                .unwrap()
        };
        set(&norm.running_mean, &[1.0, -1.0, 0.0, 0.0]);
        set(&norm.running_var, &[4.0, 0.25, 1.0, 1.0]);
        let xs = Tensor::new(&[3f32, 0.0, 0.0, 0.0], &Device::Cpu).unwrap();
        let ys = norm
            .forward_t(&xs.reshape((1, 4, 1, 1)).unwrap(), false)
            .unwrap();
        let ys: Vec<f32> = ys.flatten_all().unwrap().to_vec1().unwrap();
        // 0.5 * (3 - 1) / sqrt(4) + 0.1 = 0.6; 1.5 * (0 + 1) / sqrt(0.25) - 0.2 = 2.8.
        assert!(
            (ys[0] - 0.6).abs() < 1e-4 && (ys[1] - 2.8).abs() < 1e-3,
            "{ys:?}"
        );
    }
}
