//! BatchNorm over `(batch, channels, height, width)` activations, as PyTorch's `BatchNorm2d`:
//! training normalises with the batch's mean and biased variance and updates the running
//! statistics with the unbiased variance (`running = (1 - momentum) * running + momentum *
//! batch`); evaluation normalises with the running statistics.
//!
//! Why not candle-nn's `BatchNorm` (whose semantics are the same): its backward pass sums the
//! gradients of the per-channel broadcasts over batch, height and width at once, which candle's
//! CPU backend does element by element with an index division each; that was most of a
//! ResNet-20 training step. On the CPU the training forward here is one custom op whose backward
//! is written out (Ioffe & Szegedy, 2015, Sec. 3), with every sum taken over trailing
//! dimensions first. On other devices the same formula runs as plain tensor ops under autograd.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, ModuleT, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// PyTorch's default epsilon.
const EPS: f64 = 1e-5;

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
        let (batch, _, height, width) = xs.dims4()?;
        let count = batch * height * width;
        if count < 2 {
            candle_core::bail!("batch norm needs more than one value per channel, got {count}");
        }
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
        let channels = xs.dim(1)?;
        let stats = Arc::new(Mutex::new(None));
        let op = TrainOp {
            stats: Arc::clone(&stats),
        };
        let ys = xs.contiguous()?.apply_op3(weight, bias, op)?;
        // Cloned, not taken: the backward pass reads the same statistics.
        let stats = stats
            .lock()
            .expect("no panic while holding the lock")
            .clone();
        let stats =
            stats.ok_or_else(|| candle_core::Error::Msg("batch norm ran no forward".into()))?;
        let mean = Tensor::from_vec(stats.mean, channels, xs.device())?;
        let variance = Tensor::from_vec(stats.variance, channels, xs.device())?;
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

/// Per-channel statistics of one batch.
#[derive(Clone, Debug)]
struct ChannelStats {
    mean: Vec<f32>,
    /// Biased (divided by the count), as used for normalising.
    variance: Vec<f32>,
}

/// The training forward on the CPU: `(xs, weight, bias) -> ys`; leaves the batch statistics in
/// `stats` for the running averages and the backward pass.
#[derive(Debug)]
struct TrainOp {
    stats: Arc<Mutex<Option<ChannelStats>>>,
}

impl CustomOp3 for TrainOp {
    fn name(&self) -> &'static str {
        "deepmad-batch-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(xs, xs_layout)?;
        let weight = contiguous_f32(weight, weight_layout)?;
        let bias = contiguous_f32(bias, bias_layout)?;
        let (batch, channels, height, width) = xs_layout.shape().dims4()?;
        let plane = height * width;
        let count = (batch * plane) as f64;
        let mut stats = ChannelStats {
            mean: vec![0.0; channels],
            variance: vec![0.0; channels],
        };
        let planes = |channel: usize| {
            (0..batch).map(move |image| &input[(image * channels + channel) * plane..][..plane])
        };
        for channel in 0..channels {
            // Two passes in f64: exact enough that the order of the sums does not matter.
            let sum: f64 = planes(channel).flatten().map(|&v| f64::from(v)).sum();
            let mean = sum / count;
            let squares: f64 = planes(channel)
                .flatten()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum();
            stats.mean[channel] = mean as f32;
            stats.variance[channel] = (squares / count) as f32;
        }
        let mut output = vec![0f32; input.len()];
        for (index, (out, values)) in output
            .chunks_exact_mut(plane)
            .zip(input.chunks_exact(plane))
            .enumerate()
        {
            let channel = index % channels;
            let inv_std = 1.0 / (f64::from(stats.variance[channel]) + EPS).sqrt() as f32;
            let scale = weight[channel] * inv_std;
            let shift = bias[channel] - stats.mean[channel] * scale;
            for (y, &x) in out.iter_mut().zip(values) {
                *y = x * scale + shift;
            }
        }
        *self.stats.lock().expect("no panic while holding the lock") = Some(stats);
        Ok((CpuStorage::F32(output), xs_layout.shape().clone()))
    }

    /// With `x_hat = (x - mean) * inv_std` and `n` values per channel:
    /// `d_bias = sum(g)`, `d_weight = sum(g * x_hat)`,
    /// `d_x = weight * inv_std * (g - d_bias / n - x_hat * d_weight / n)`.
    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, channels, height, width) = xs.dims4()?;
        let count = (batch * height * width) as f64;
        let stats = self
            .stats
            .lock()
            .expect("no panic while holding the lock")
            .clone();
        let stats =
            stats.ok_or_else(|| candle_core::Error::Msg("batch norm ran no forward".into()))?;
        let per_channel =
            |values: Vec<f32>| Tensor::from_vec(values, (1, channels, 1, 1), xs.device());
        let mean = per_channel(stats.mean)?;
        let inv_std = per_channel(stats.variance)?
            .affine(1.0, EPS)?
            .sqrt()?
            .recip()?;
        let x_hat = xs.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?;
        let channel_sum = |t: &Tensor| -> candle_core::Result<Tensor> { t.sum(3)?.sum(2)?.sum(0) };
        let d_bias = channel_sum(grad)?;
        let d_weight = channel_sum(&(grad * &x_hat)?)?;
        let shape = (1, channels, 1, 1);
        let correction = x_hat
            .broadcast_mul(&(d_weight.reshape(shape)? / count)?)?
            .broadcast_add(&(d_bias.reshape(shape)? / count)?)?;
        let gain = weight.reshape(shape)?.broadcast_mul(&inv_std)?;
        let d_xs = (grad - correction)?.broadcast_mul(&gain)?;
        Ok((Some(d_xs), Some(d_weight), Some(d_bias)))
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("batch norm: only f32 tensors are supported");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op: "batch-norm" }),
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
