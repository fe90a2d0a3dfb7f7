//! BatchNorm's training pass fused with what follows it in every block: an optional residual
//! add and an optional activation, `act(bn(xs) + residual)`, as one CPU op each way.
//!
//! Unfused, a basic block's tail is four autograd nodes (BatchNorm, add, activation, and the
//! shortcut), and each node costs passes over the whole activation: its own forward, its
//! backward, and candle's accumulation of every gradient into a fresh zero tensor. Here the
//! forward is two passes (per-channel statistics, then the output) and the backward two more
//! (per-plane sums of the activation-masked gradient, then the input gradient). The
//! pre-activation value is recomputed from the input in the backward pass rather than stored.
//!
//! Only used with [`crate::Kernels::Deepmad`] on the CPU in training mode; elsewhere
//! [`crate::batch_norm::forward_act`] composes the separate ops, which compute the same
//! function (the tests compare them).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use deepmad_design::Activation;
use rayon::prelude::*;

use crate::activation::{backward_one, forward_one};
use crate::batch_norm::EPS;

/// Per-channel statistics of one batch: the mean and the biased variance.
#[derive(Clone, Debug)]
pub(crate) struct ChannelStats {
    pub(crate) mean: Vec<f32>,
    pub(crate) variance: Vec<f32>,
}

/// Returns `act(bn(xs) + residual)` with batch statistics (differentiable in `xs`, `weight`,
/// `bias` and `residual`) and the batch's statistics. `xs` and `residual` must be f32 CPU
/// tensors of one `(batch, channels, height, width)` shape.
pub(crate) fn train(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    activation: Option<Activation>,
) -> candle_core::Result<(Tensor, ChannelStats)> {
    let stats = Arc::new(Mutex::new(None));
    let op = BnAct {
        activation,
        stats: Arc::clone(&stats),
    };
    // One affine tensor (weight, then bias), so that the residual fits in a three-input op.
    let affine = Tensor::cat(&[weight, bias], 0)?;
    let xs = xs.contiguous()?;
    let ys = match residual {
        Some(residual) => {
            if residual.shape() != xs.shape() {
                candle_core::bail!(
                    "batch norm residual: shape {:?} does not match the input's {:?}",
                    residual.shape(),
                    xs.shape()
                );
            }
            xs.apply_op3(&affine, &residual.contiguous()?, op)?
        }
        None => xs.apply_op2(&affine, op)?,
    };
    let stats = stats
        .lock()
        .expect("no panic while holding the lock")
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("batch norm ran no forward".into()))?;
    Ok((ys, stats))
}

/// The op; `stats` receives the batch statistics from the forward pass, and the backward pass
/// reads them back.
#[derive(Debug, Clone)]
struct BnAct {
    activation: Option<Activation>,
    stats: Arc<Mutex<Option<ChannelStats>>>,
}

/// The gradients from `(input, affine, output gradient)`, in one buffer: the input's gradient,
/// the weight's, the bias's and, with a residual, the residual's.
#[derive(Debug, Clone)]
struct BnActBackward {
    activation: Option<Activation>,
    stats: ChannelStats,
    /// The forward pass's residual input, read to recompute the pre-activation value.
    residual: Option<Tensor>,
}

/// The geometry of one activation tensor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planes {
    channels: usize,
    plane: usize,
    count: usize,
}

impl Planes {
    pub(crate) fn of(shape: &Shape) -> candle_core::Result<Planes> {
        let (batch, channels, height, width) = shape.dims4()?;
        let count = batch * height * width;
        if count < 2 {
            candle_core::bail!("batch norm needs more than one value per channel, got {count}");
        }
        Ok(Planes {
            channels,
            plane: height * width,
            count,
        })
    }
}

/// Per-channel `(scale, shift)` so that `bn(x) = x * scale + shift`, and `inv_std`.
fn affine_terms(stats: &ChannelStats, affine: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let channels = stats.mean.len();
    let (weight, bias) = affine.split_at(channels);
    let inv_std: Vec<f32> = stats
        .variance
        .iter()
        .map(|&v| 1.0 / (f64::from(v) + EPS).sqrt() as f32)
        .collect();
    let scale: Vec<f32> = weight.iter().zip(&inv_std).map(|(w, s)| w * s).collect();
    let shift = (0..channels)
        .map(|c| bias[c] - stats.mean[c] * scale[c])
        .collect();
    (scale, shift, inv_std)
}

/// The batch statistics: per plane, f64 sums of `x - first` and its square (shifted by the
/// channel's first value, so that the subtraction of squares does not cancel), then per channel
/// in plane order. Deterministic whatever the threads do.
fn statistics(input: &[f32], planes: Planes) -> ChannelStats {
    let Planes {
        channels,
        plane,
        count,
    } = planes;
    let origin: Vec<f64> = (0..channels).map(|c| f64::from(input[c * plane])).collect();
    let sums: Vec<(f64, f64)> = input
        .par_chunks(plane)
        .enumerate()
        .map(|(index, values)| plane_moments(values, origin[index % channels] as f32))
        .collect();
    let mut stats = ChannelStats {
        mean: vec![0.0; channels],
        variance: vec![0.0; channels],
    };
    let n = count as f64;
    for (c, origin) in origin.iter().enumerate() {
        let (s, q) = channel_total(&sums, c, channels);
        let shifted_mean = s / n;
        stats.mean[c] = (origin + shifted_mean) as f32;
        stats.variance[c] = (q / n - shifted_mean * shifted_mean).max(0.0) as f32;
    }
    stats
}

/// Lanes of the per-plane sums: wide enough for the compiler to vectorise them.
const LANES: usize = 16;

/// The sums of both terms of `term(a, b)` over one plane's pairs of values, in f32 lanes,
/// returned as f64. A plane has at most a few thousand values, so f32 partial sums lose nothing
/// that matters; planes are added in f64.
#[inline(always)]
fn lane_sums(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> (f32, f32)) -> (f64, f64) {
    debug_assert_eq!(a.len(), b.len());
    let (mut first, mut second) = ([0f32; LANES], [0f32; LANES]);
    let (mut a_chunks, mut b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (a, b) in (&mut a_chunks).zip(&mut b_chunks) {
        for lane in 0..LANES {
            let (x, y) = term(a[lane], b[lane]);
            first[lane] += x;
            second[lane] += y;
        }
    }
    let rest = a_chunks.remainder().iter().zip(b_chunks.remainder());
    for (lane, (&a, &b)) in rest.enumerate() {
        let (x, y) = term(a, b);
        first[lane] += x;
        second[lane] += y;
    }
    let total = |lanes: [f32; LANES]| lanes.iter().map(|&v| f64::from(v)).sum::<f64>();
    (total(first), total(second))
}

/// Channel `c`'s total of per-plane pairs, in plane order (deterministic).
fn channel_total(sums: &[(f64, f64)], c: usize, channels: usize) -> (f64, f64) {
    sums.iter()
        .skip(c)
        .step_by(channels)
        .fold((0.0, 0.0), |(s, q), pair| (s + pair.0, q + pair.1))
}

/// An f32 CPU tensor's contiguous values ([`crate::layout::contiguous_f32`] named for this op).
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    crate::layout::contiguous_f32(storage, layout, "batch-norm")
}

impl BnAct {
    fn forward(
        &self,
        input: &[f32],
        layout: &Layout,
        affine: &[f32],
        residual: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let planes = Planes::of(layout.shape())?;
        let (output, stats) = forward_values(input, planes, affine, residual, self.activation)?;
        *self.stats.lock().expect("no panic while holding the lock") = Some(stats);
        Ok((CpuStorage::F32(output), layout.shape().clone()))
    }

    fn backward_op(&self, residual: Option<&Tensor>) -> candle_core::Result<BnActBackward> {
        let stats = self
            .stats
            .lock()
            .expect("no panic while holding the lock")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("batch norm ran no forward".into()))?;
        Ok(BnActBackward {
            activation: self.activation,
            stats,
            residual: residual.cloned(),
        })
    }
}

/// `act(bn(input) + residual)` with the batch's statistics, and those statistics: two passes,
/// parallel over planes.
pub(crate) fn forward_values(
    input: &[f32],
    planes: Planes,
    affine: &[f32],
    residual: Option<&[f32]>,
    activation: Option<Activation>,
) -> candle_core::Result<(Vec<f32>, ChannelStats)> {
    if affine.len() != 2 * planes.channels {
        candle_core::bail!(
            "batch norm: {} affine values for {} channels",
            affine.len(),
            planes.channels
        );
    }
    let stats = statistics(input, planes);
    let (scale, shift, _) = affine_terms(&stats, affine);
    // SAFETY: the planes tile the output, and `forward_plane` writes every element of its plane
    // without reading the output.
    let output = unsafe {
        crate::buffer::filled_by(input.len(), "batch norm", |output| {
            output
                .par_chunks_mut(planes.plane)
                .zip(input.par_chunks(planes.plane))
                .enumerate()
                .for_each(|(index, (out, values))| {
                    let c = index % planes.channels;
                    let offset = index * planes.plane;
                    let residual = residual.map(|r| &r[offset..offset + planes.plane]);
                    forward_plane(out, values, residual, (scale[c], shift[c]), activation);
                });
        })
    };
    Ok((output, stats))
}

crate::simd::multiversion! {
    /// One plane of the output: `act(x * scale + shift + r)`.
    fn forward_plane(
        out: &mut [f32],
        values: &[f32],
        residual: Option<&[f32]>,
        affine: (f32, f32),
        activation: Option<Activation>,
    ) {
        let (scale, shift) = affine;
        // One loop per case, so that each vectorises.
        match (activation, residual) {
            (None, None) => map_plane(out, values, values, |x, _| x * scale + shift),
            (None, Some(r)) => map_plane(out, values, r, |x, r| x * scale + shift + r),
            (Some(Activation::Relu), None) => {
                map_plane(out, values, values, |x, _| (x * scale + shift).max(0.0))
            }
            (Some(Activation::Relu), Some(r)) => {
                map_plane(out, values, r, |x, r| (x * scale + shift + r).max(0.0))
            }
            (Some(act), None) => map_plane(out, values, values, |x, _| {
                forward_one(act, x * scale + shift)
            }),
            (Some(act), Some(r)) => map_plane(out, values, r, |x, r| {
                forward_one(act, x * scale + shift + r)
            }),
        }
    }
}

/// `out[i] = f(a[i], b[i])`.
#[inline(always)]
fn map_plane(out: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = f(a, b);
    }
}

crate::simd::multiversion! {
    /// One plane's sums of `x - origin` and its square.
    fn plane_moments(values: &[f32], origin: f32) -> (f64, f64) {
        lane_sums(values, values, |v, _| {
            let d = v - origin;
            (d, d * d)
        })
    }
}

crate::simd::multiversion! {
    /// One plane of the backward's first pass: `gz = g * act'(z)` with
    /// `z = x * scale + shift + r`, and the sums of `gz` and `gz * (x - mean)`.
    fn gradient_plane(
        gz: &mut [f32],
        values: &[f32],
        grads: &[f32],
        residual: Option<&[f32]>,
        terms: (f32, f32, f32),
        activation: Option<Activation>,
    ) -> (f64, f64) {
        let (scale, shift, mean) = terms;
        match (activation, residual) {
            (None, _) => gz.copy_from_slice(grads),
            (Some(act), None) => {
                for ((g, &x), &grad) in gz.iter_mut().zip(values).zip(grads) {
                    *g = backward_one(act, x * scale + shift, grad);
                }
            }
            (Some(act), Some(residual)) => {
                let terms = gz.iter_mut().zip(values).zip(grads).zip(residual);
                for (((g, &x), &grad), &r) in terms {
                    *g = backward_one(act, x * scale + shift + r, grad);
                }
            }
        }
        lane_sums(gz, values, |g, x| (g, g * (x - mean)))
    }
}

crate::simd::multiversion! {
    /// One plane of the backward's second pass:
    /// `dx = gain * (gz - mean_g - (x - mu) * inv * mean_gx)`, with `gz` in `dx` itself
    /// unless given.
    fn input_gradient_plane(
        dx: &mut [f32],
        values: &[f32],
        gz: Option<&[f32]>,
        means: (f32, f32, f32),
        normalise: (f32, f32),
    ) {
        let ((gain, mean_g, mean_gx), (mu, inv)) = (means, normalise);
        match gz {
            Some(gz) => {
                for ((d, &x), &g) in dx.iter_mut().zip(values).zip(gz) {
                    *d = gain * (g - mean_g - (x - mu) * inv * mean_gx);
                }
            }
            None => {
                for (d, &x) in dx.iter_mut().zip(values) {
                    *d = gain * (*d - mean_g - (x - mu) * inv * mean_gx);
                }
            }
        }
    }
}

impl CustomOp2 for BnAct {
    fn name(&self) -> &'static str {
        "deepmad-batch-norm-act"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        affine: &CpuStorage,
        affine_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = f32_slice(xs, xs_layout)?;
        let affine = f32_slice(affine, affine_layout)?;
        self.forward(input, xs_layout, affine, None)
    }

    fn bwd(
        &self,
        xs: &Tensor,
        affine: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let op = self.backward_op(None)?;
        let flat = xs.apply_op3_no_bwd(affine, &grad.contiguous()?, &op)?;
        let (dx, daffine, _) = split(&flat, xs, affine, false)?;
        Ok((Some(dx), Some(daffine)))
    }
}

impl CustomOp3 for BnAct {
    fn name(&self) -> &'static str {
        "deepmad-batch-norm-add-act"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        affine: &CpuStorage,
        affine_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = f32_slice(xs, xs_layout)?;
        let affine = f32_slice(affine, affine_layout)?;
        let residual = f32_slice(residual, residual_layout)?;
        self.forward(input, xs_layout, affine, Some(residual))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        affine: &Tensor,
        residual: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.backward_op(Some(residual))?;
        let flat = xs.apply_op3_no_bwd(affine, &grad.contiguous()?, &op)?;
        let (dx, daffine, dresidual) = split(&flat, xs, affine, true)?;
        Ok((Some(dx), Some(daffine), dresidual))
    }
}

/// Splits the backward buffer into views: input gradient, affine gradient, residual gradient.
fn split(
    flat: &Tensor,
    xs: &Tensor,
    affine: &Tensor,
    residual: bool,
) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    let n = xs.elem_count();
    let dx = flat.narrow(0, 0, n)?.reshape(xs.shape())?;
    let daffine = flat.narrow(0, n, affine.elem_count())?;
    let dresidual = residual
        .then(|| {
            flat.narrow(0, n + affine.elem_count(), n)?
                .reshape(xs.shape())
        })
        .transpose()?;
    Ok((dx, daffine, dresidual))
}

impl BnActBackward {
    fn backward(
        &self,
        input: &[f32],
        layout: &Layout,
        affine: &[f32],
        residual: Option<&[f32]>,
        grad: &[f32],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let planes = Planes::of(layout.shape())?;
        let n = input.len();
        let len = out_len(n, planes.channels, residual);
        let forward = Forward {
            input,
            planes,
            affine,
            stats: &self.stats,
            residual,
            activation: self.activation,
        };
        // SAFETY: `backward_values` writes every element of the three gradients, which tile the
        // buffer, before reading any (its accumulations start from a write).
        let out = unsafe {
            crate::buffer::filled_by(len, "batch norm backward", |out| {
                let (dx, rest) = out.split_at_mut(n);
                let (daffine, dresidual) = rest.split_at_mut(2 * planes.channels);
                let gradients = Gradients {
                    input: dx,
                    affine: daffine,
                    residual: residual.map(|_| dresidual),
                };
                backward_values(&forward, grad, gradients);
            })
        };
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// What [`backward_values`] reads of the forward pass.
pub(crate) struct Forward<'a> {
    pub(crate) input: &'a [f32],
    pub(crate) planes: Planes,
    pub(crate) affine: &'a [f32],
    pub(crate) stats: &'a ChannelStats,
    pub(crate) residual: Option<&'a [f32]>,
    pub(crate) activation: Option<Activation>,
}

/// Where [`backward_values`] writes: the input's gradient, the affine's (weight, then bias) and,
/// with a residual, the residual's. Every element is written.
pub(crate) struct Gradients<'a> {
    pub(crate) input: &'a mut [f32],
    pub(crate) affine: &'a mut [f32],
    pub(crate) residual: Option<&'a mut [f32]>,
}

/// With `z = x * scale + shift (+ r)`, `gz = g * act'(z)`, `x_hat = (x - mean) * inv_std`
/// and `n` values per channel: `d_bias = sum(gz)`, `d_weight = sum(gz * x_hat)`,
/// `d_r = gz`, `d_x = weight * inv_std * (gz - d_bias / n - x_hat * d_weight / n)`
/// (Ioffe & Szegedy, 2015, Sec. 3).
pub(crate) fn backward_values(forward: &Forward, grad: &[f32], gradients: Gradients) {
    let Forward {
        input,
        planes,
        affine,
        stats,
        residual,
        activation,
    } = *forward;
    let Planes {
        channels, plane, ..
    } = planes;
    let (scale, shift, inv_std) = affine_terms(stats, affine);
    let mean = &stats.mean;
    let Gradients {
        input: dx,
        affine: daffine,
        residual: mut dresidual,
    } = gradients;
    // Pass 1: gz per element (into the residual's gradient, or into dx to be finished in
    // place), and per plane the sums of gz and gz * x_hat.
    let gz_buffer: &mut [f32] = match dresidual.as_deref_mut() {
        Some(dresidual) => dresidual,
        None => &mut *dx,
    };
    let sums: Vec<(f64, f64)> = gz_buffer
        .par_chunks_mut(plane)
        .enumerate()
        .map(|(index, gz)| {
            let c = index % channels;
            let offset = index * plane;
            let values = &input[offset..offset + plane];
            let grads = &grad[offset..offset + plane];
            let residual = residual.map(|r| &r[offset..offset + plane]);
            let terms = (scale[c], shift[c], mean[c]);
            gradient_plane(gz, values, grads, residual, terms, activation)
        })
        .collect();
    let (dweight, dbias) = daffine.split_at_mut(channels);
    for c in 0..channels {
        let (sum, dot) = channel_total(&sums, c, channels);
        dbias[c] = sum as f32;
        dweight[c] = (dot * f64::from(inv_std[c])) as f32;
    }
    // Pass 2: dx from gz, where gz is the residual's gradient or dx itself (each element
    // is read before it is overwritten).
    let count = planes.count as f32;
    let weight = &affine[..channels];
    let dresidual = dresidual.as_deref();
    dx.par_chunks_mut(plane)
        .enumerate()
        .for_each(|(index, dx)| {
            let c = index % channels;
            let offset = index * plane;
            let values = &input[offset..offset + plane];
            let gz = dresidual.map(|r| &r[offset..offset + plane]);
            let gain = weight[c] * inv_std[c];
            let means = (gain, dbias[c] / count, dweight[c] / count);
            input_gradient_plane(dx, values, gz, means, (mean[c], inv_std[c]));
        });
}

fn out_len(n: usize, channels: usize, residual: Option<&[f32]>) -> usize {
    n + 2 * channels + residual.map_or(0, |_| n)
}

impl CustomOp3 for BnActBackward {
    fn name(&self) -> &'static str {
        "deepmad-batch-norm-act-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        affine: &CpuStorage,
        affine_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = f32_slice(xs, xs_layout)?;
        let affine = f32_slice(affine, affine_layout)?;
        let grad = f32_slice(grad, grad_layout)?;
        match &self.residual {
            None => self.backward(input, xs_layout, affine, None, grad),
            Some(residual) => {
                // The forward pass made it contiguous, on the CPU.
                let (storage, layout) = residual.storage_and_layout();
                let candle_core::Storage::Cpu(storage) = &*storage else {
                    candle_core::bail!("batch norm backward: the residual is not on the CPU");
                };
                let residual = f32_slice(storage, layout)?;
                self.backward(input, xs_layout, affine, Some(residual), grad)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::Kernels;

    const SHAPE: (usize, usize, usize, usize) = (3, 4, 5, 5);

    fn pattern(seed: u64, scale: f32) -> Vec<f32> {
        (0..300u64)
            .map(|i| {
                let x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                (((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        let difference = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        difference.max(0).unwrap().to_scalar().unwrap()
    }

    /// The fused op equals BatchNorm, add and activation as separate stock ops: output,
    /// statistics, and the gradients of input, weight, bias and residual, for every activation
    /// with and without a residual. Inputs span ReLU6's upper kink too.
    #[test]
    fn matches_the_separate_ops() {
        let device = Device::Cpu;
        let xs = Var::from_vec(pattern(1, 3.0), SHAPE, &device).unwrap();
        let residual = Var::from_vec(pattern(2, 4.0), SHAPE, &device).unwrap();
        let loss_weights = Tensor::from_vec(pattern(3, 1.0), SHAPE, &device).unwrap();
        let weight = Var::from_vec(vec![0.5f32, 1.5, -1.0, 4.0], 4, &device).unwrap();
        let bias = Var::from_vec(vec![0.1f32, -0.2, 0.3, 2.0], 4, &device).unwrap();
        let activations = [
            None,
            Some(Activation::Relu),
            Some(Activation::Relu6),
            Some(Activation::Silu),
        ];
        for activation in activations {
            for with_residual in [false, true] {
                let r = with_residual.then(|| residual.as_tensor());
                let case = format!("{activation:?}, residual {with_residual}");
                let (w, b) = (weight.as_tensor(), bias.as_tensor());
                let (fused, stats) = train(xs.as_tensor(), w, b, r, activation).unwrap();
                let (mut reference, reference_stats) =
                    crate::batch_norm::train_pass(Kernels::Stock, xs.as_tensor(), w, b).unwrap();
                if let Some(r) = r {
                    reference = (reference + r).unwrap();
                }
                if let Some(activation) = activation {
                    reference =
                        crate::activation::activate_with(Kernels::Stock, &reference, activation)
                            .unwrap();
                }
                assert!(max_difference(&fused, &reference) < 1e-5, "{case}: output");
                // Irrefutable without the `cuda` feature, whose variant holds cuDNN's statistics.
                #[allow(irrefutable_let_patterns)]
                let crate::batch_norm::BatchStats::Tensors { mean, variance } = reference_stats
                else {
                    panic!("stock statistics are tensors");
                };
                let ours = Tensor::new(stats.mean.as_slice(), &device).unwrap();
                assert!(max_difference(&ours, &mean) < 1e-6, "{case}: mean");
                let ours = Tensor::new(stats.variance.as_slice(), &device).unwrap();
                assert!(max_difference(&ours, &variance) < 1e-5, "{case}: variance");
                let grads_of = |ys: &Tensor| {
                    let loss = (ys * &loss_weights).unwrap().sum_all().unwrap();
                    loss.backward().unwrap()
                };
                let (ours, theirs) = (grads_of(&fused), grads_of(&reference));
                let mut vars = vec![("input", &xs), ("weight", &weight), ("bias", &bias)];
                if with_residual {
                    vars.push(("residual", &residual));
                }
                for (name, var) in vars {
                    let a = ours.get(var.as_tensor()).unwrap();
                    let b = theirs.get(var.as_tensor()).unwrap();
                    assert!(max_difference(a, b) < 1e-4, "{case}: {name} gradient");
                }
                assert!(ours.get(residual.as_tensor()).is_none() || with_residual);
            }
        }
    }

    /// Per-channel statistics stay exact for values far from zero (the shifted sums).
    #[test]
    fn statistics_do_not_cancel_for_large_offsets() {
        let values: Vec<f32> = pattern(4, 1.0).iter().map(|v| v + 1.0e4).collect();
        let planes = Planes {
            channels: 4,
            plane: 25,
            count: 75,
        };
        let stats = statistics(&values, planes);
        for c in 0..4 {
            let channel: Vec<f64> = (0..3)
                .flat_map(|image| &values[(image * 4 + c) * 25..][..25])
                .map(|&v| f64::from(v))
                .collect();
            let mean = channel.iter().sum::<f64>() / 75.0;
            let variance = channel.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 75.0;
            assert!((f64::from(stats.mean[c]) - mean).abs() < 1e-3, "mean {c}");
            assert!(
                (f64::from(stats.variance[c]) - variance).abs() < 1e-4 * variance,
                "variance {c}: {} vs {variance}",
                stats.variance[c]
            );
        }
    }
}
