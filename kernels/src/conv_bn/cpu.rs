//! Convolution + BatchNorm (+ residual add) (+ activation) as one CPU training op.
//!
//! Why: candle's backward pass accumulates every gradient that flows along an edge of the graph
//! into a fresh zero tensor (`zeros_like`, then `add`), one allocation, one memset and one
//! single-threaded pass over the whole tensor per edge. With the convolution and
//! [`crate::batch_norm::cpu`] as two ops, the convolution's output was such an edge for every layer of the
//! network. As one op, that gradient stays a scratch buffer inside the backward pass.
//!
//! The op's inputs are the convolution's input, one parameter tensor (the flattened weight, then
//! BatchNorm's weight and bias: [`params`]) and optionally the residual. The forward pass keeps
//! the convolution's output and the batch statistics in the op for the backward pass, as the
//! two separate ops kept them as a graph tensor and in the BatchNorm op (`batch_norm/cpu.rs`).
//!
//! The network's input needs no gradient: when the op's input does not track one (the stem
//! convolution), the backward pass skips the convolution's input gradient altogether.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use deepmad_design::Activation;

use super::{apply, params, split_gradients};
use crate::batch_norm::cpu::{
    backward_values, forward_values, ChannelStats, Forward, Gradients, Planes,
};
use crate::conv::CpuConv;
use crate::layout::contiguous_f32;

/// Returns `act(bn(conv(xs, weight)) + residual)` with batch statistics, differentiable in
/// `xs`, `weight`, `bn_weight`, `bn_bias` and `residual`, and the batch statistics; `None` when
/// deepmad's CPU kernels do not cover the convolution (then compose the separate ops). `xs`
/// must be an f32 CPU tensor.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train(
    xs: &Tensor,
    weight: &Tensor,
    (stride, padding, groups): (usize, usize, usize),
    bn_weight: &Tensor,
    bn_bias: &Tensor,
    residual: Option<&Tensor>,
    activation: Option<Activation>,
) -> candle_core::Result<Option<(Tensor, ChannelStats)>> {
    let (windows, out_channels) = crate::layout::Windows::of(xs, weight, stride, padding)?;
    let Some(conv) = CpuConv::new(windows, out_channels, groups)? else {
        return Ok(None);
    };
    let saved = Arc::new(Mutex::new(None));
    let op = ConvBnAct {
        conv,
        weight_len: weight.elem_count(),
        activation,
        saved: Arc::clone(&saved),
    };
    let params = params(weight, bn_weight, bn_bias)?;
    let ys = apply(xs, &params, residual, &conv.output_shape(), op)?;
    let stats = saved
        .lock()
        .expect("no panic while holding the lock")
        .as_ref()
        .map(|saved| saved.stats.clone())
        .ok_or_else(|| candle_core::Error::Msg("conv + batch norm ran no forward".into()))?;
    Ok(Some((ys, stats)))
}

/// What the forward pass leaves for the backward pass.
#[derive(Debug)]
struct Saved {
    /// The convolution's output, BatchNorm's input.
    conv_out: Vec<f32>,
    stats: ChannelStats,
}

#[derive(Debug, Clone)]
struct ConvBnAct {
    conv: CpuConv,
    /// Values of the convolution weight at the start of the parameter input.
    weight_len: usize,
    activation: Option<Activation>,
    saved: Arc<Mutex<Option<Saved>>>,
}

/// The gradients from `(input, params, output gradient)`, in one buffer: the input's (only when
/// `input_gradient`), the parameters' and, with a residual, the residual's.
#[derive(Debug, Clone)]
struct ConvBnActBackward {
    forward: ConvBnAct,
    input_gradient: bool,
    residual: Option<Tensor>,
}

impl ConvBnAct {
    fn forward(
        &self,
        (xs, xs_layout): (&CpuStorage, &Layout),
        (params, params_layout): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(xs, xs_layout, "conv + batch norm")?;
        let params = contiguous_f32(params, params_layout, "conv + batch norm")?;
        let residual = residual
            .map(|(storage, layout)| contiguous_f32(storage, layout, "conv + batch norm"))
            .transpose()?;
        let (weight, affine) = params.split_at(self.weight_len);
        let shape = self.conv.output_shape();
        let planes = Planes::of(&shape)?;
        let conv_out = self.conv.forward(input, weight);
        let (output, stats) = forward_values(&conv_out, planes, affine, residual, self.activation)?;
        *self.saved.lock().expect("no panic while holding the lock") =
            Some(Saved { conv_out, stats });
        Ok((CpuStorage::F32(output), shape))
    }

    fn backward(
        &self,
        xs: &Tensor,
        params: &Tensor,
        residual: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        // The network's input (no variable, no op behind it) needs no gradient.
        let input_gradient = xs.track_op();
        let op = ConvBnActBackward {
            forward: self.clone(),
            input_gradient,
            residual: residual.cloned(),
        };
        let flat = xs.apply_op3_no_bwd(params, &grad.contiguous()?, &op)?;
        split_gradients(&flat, xs, params, residual, input_gradient)
    }
}

impl CustomOp2 for ConvBnAct {
    fn name(&self) -> &'static str {
        "deepmad-conv-batch-norm-act"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        params: &CpuStorage,
        params_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward((xs, xs_layout), (params, params_layout), None)
    }

    fn bwd(
        &self,
        xs: &Tensor,
        params: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dparams, _) = self.backward(xs, params, None, grad)?;
        Ok((dx, Some(dparams)))
    }
}

impl CustomOp3 for ConvBnAct {
    fn name(&self) -> &'static str {
        "deepmad-conv-batch-norm-add-act"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        params: &CpuStorage,
        params_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(
            (xs, xs_layout),
            (params, params_layout),
            Some((residual, residual_layout)),
        )
    }

    fn bwd(
        &self,
        xs: &Tensor,
        params: &Tensor,
        residual: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dparams, dresidual) = self.backward(xs, params, Some(residual), grad)?;
        Ok((dx, Some(dparams), dresidual))
    }
}

impl CustomOp3 for ConvBnActBackward {
    fn name(&self) -> &'static str {
        "deepmad-conv-batch-norm-act-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        params: &CpuStorage,
        params_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let what = "conv + batch norm backward";
        let input = contiguous_f32(xs, xs_layout, what)?;
        let params = contiguous_f32(params, params_layout, what)?;
        let grad = contiguous_f32(grad, grad_layout, what)?;
        let residual_storage = self
            .residual
            .as_ref()
            .map(|residual| residual.storage_and_layout());
        let residual = match &residual_storage {
            None => None,
            Some((storage, layout)) => {
                // The forward pass made it contiguous, on the CPU.
                let candle_core::Storage::Cpu(storage) = &**storage else {
                    candle_core::bail!("{what}: the residual is not on the CPU");
                };
                Some(contiguous_f32(storage, layout, what)?)
            }
        };
        let forward = &self.forward;
        let saved = forward
            .saved
            .lock()
            .expect("no panic while holding the lock");
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("{what}: the op ran no forward pass");
        };
        let shape = forward.conv.output_shape();
        let planes = Planes::of(&shape)?;
        let (weight, affine) = params.split_at(forward.weight_len);
        let n_in = if self.input_gradient { input.len() } else { 0 };
        let n_out = grad.len();
        let len = n_in + params.len() + residual.map_or(0, |_| n_out);
        // SAFETY: BatchNorm's backward writes every element of its parameter and residual
        // gradients, and the convolution's backward every element of its weight gradient and
        // (when asked for) its input gradient, each before reading it; together they tile the
        // buffer.
        let out = unsafe {
            crate::buffer::filled_by(len, what, |out| {
                let (dx, rest) = out.split_at_mut(n_in);
                let (dparams, dresidual) = rest.split_at_mut(params.len());
                let (dweight, daffine) = dparams.split_at_mut(forward.weight_len);
                // BatchNorm's input gradient is the convolution's output gradient: scratch only.
                with_scratch(n_out, |grad_conv_out| {
                    let bn = Forward {
                        input: &saved.conv_out,
                        planes,
                        affine,
                        stats: &saved.stats,
                        residual,
                        activation: forward.activation,
                    };
                    let gradients = Gradients {
                        input: &mut *grad_conv_out,
                        affine: daffine,
                        residual: residual.map(|_| dresidual),
                    };
                    backward_values(&bn, grad, gradients);
                    let dx = self.input_gradient.then_some(dx);
                    forward
                        .conv
                        .backward(input, weight, grad_conv_out, dx, dweight);
                });
            })
        };
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

thread_local! {
    /// The scratch of [`with_scratch`]: the largest one this thread has needed.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a scratch slice of `len` floats whose contents are left over from earlier
/// calls: for buffers that `f` writes in full before it reads them (the convolution's output
/// gradient, which BatchNorm's backward pass writes element by element). Reusing the thread's
/// buffer saves an allocation and a zero fill of an activation-sized buffer per layer and step.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        // Taken out while `f` runs, so a nested call gets its own buffer instead of a panic.
        let mut buffer = cell.take();
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        }
        let result = f(&mut buffer[..len]);
        cell.replace(buffer);
        result
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::Kernels;

    /// `len` values in `[-scale, scale)`, fixed by `seed`.
    fn pattern(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        (0..len as u64)
            .map(|i| {
                let x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (seed + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                let x = x ^ (x >> 31);
                (((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn var(shape: &[usize], seed: u64, scale: f32) -> Var {
        let len = shape.iter().product();
        let tensor = Tensor::from_vec(pattern(len, seed, scale), shape, &Device::Cpu)
            .expect("a tensor of the pattern");
        Var::from_tensor(&tensor).expect("a variable")
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("comparable tensors")
    }

    /// The fused op against candle's convolution, the separate BatchNorm ops, add and
    /// activation, for dense (3x3 stride 1 and 2, 1x1) and depthwise convolutions, with and
    /// without a residual: the output, the statistics and every gradient.
    #[test]
    fn matches_the_separate_ops() {
        // (in, out, kernel, stride, groups, activation, residual)
        let cases = [
            (3, 4, 3, 1, 1, Some(Activation::Relu), true),
            (4, 6, 3, 2, 1, Some(Activation::Silu), false),
            (5, 3, 1, 1, 1, None, true),
            (6, 6, 3, 1, 6, Some(Activation::Relu), false),
            (6, 6, 5, 2, 6, Some(Activation::Relu6), true),
        ];
        for (index, (cin, cout, k, stride, groups, activation, with_residual)) in
            cases.into_iter().enumerate()
        {
            let seed = 100 * index as u64;
            let (batch, side) = (2, 7);
            let xs = var(&[batch, cin, side, side], seed, 2.0);
            let weight = var(&[cout, cin / groups, k, k], seed + 1, 1.0);
            let bn_weight = var(&[cout], seed + 2, 1.0);
            let bn_bias = var(&[cout], seed + 3, 1.0);
            let out_side = (side + 2 * (k / 2) - k) / stride + 1;
            let residual = var(&[batch, cout, out_side, out_side], seed + 4, 1.0);
            let residual = with_residual.then_some(residual.as_tensor());
            let geometry = (stride, k / 2, groups);
            let (fused, stats) = train(
                &xs, &weight, geometry, &bn_weight, &bn_bias, residual, activation,
            )
            .expect("the fused op runs")
            .expect("deepmad has kernels for these convolutions");
            let conv =
                crate::conv::conv2d_with(Kernels::Stock, &xs, &weight, stride, k / 2, groups)
                    .expect("candle's convolution");
            let (reference, _) =
                crate::batch_norm::cpu::train(&conv, &bn_weight, &bn_bias, residual, activation)
                    .expect("the separate batch-norm op");
            let reference = reference.contiguous().expect("contiguous");
            let case = format!("case {index}");
            assert!(max_difference(&fused, &reference) < 1e-4, "{case}: output");
            let mean = conv
                .mean_keepdim((0, 2, 3))
                .expect("mean")
                .flatten_all()
                .expect("flat");
            let mean: Vec<f32> = mean.to_vec1().expect("values");
            for (a, b) in stats.mean.iter().zip(&mean) {
                assert!((a - b).abs() < 1e-4, "{case}: mean {a} vs {b}");
            }
            // A loss that weights every output differently, so no gradient cancels.
            let probe = Tensor::from_vec(
                pattern(fused.elem_count(), seed + 5, 1.0),
                fused.shape(),
                &Device::Cpu,
            )
            .expect("probe");
            let fused_grads = (&fused * &probe)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("fused backward");
            let reference_grads = (&reference * &probe)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("reference backward");
            let mut inputs = vec![
                ("input", xs.as_tensor()),
                ("weight", weight.as_tensor()),
                ("bn weight", bn_weight.as_tensor()),
                ("bn bias", bn_bias.as_tensor()),
            ];
            if let Some(residual) = residual {
                inputs.push(("residual", residual));
            }
            for (name, tensor) in inputs {
                let ours = fused_grads.get(tensor).expect("a fused gradient");
                let theirs = reference_grads.get(tensor).expect("a reference gradient");
                let scale = theirs
                    .abs()
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.max(0))
                    .and_then(|t| t.to_scalar::<f32>())
                    .expect("scale")
                    .max(1.0);
                let difference = max_difference(ours, theirs);
                assert!(
                    difference < 1e-4 * scale,
                    "{case}: {name} gradient differs by {difference} (scale {scale})"
                );
            }
        }
    }

    /// The stem convolution's input is data: its gradient is not computed, and the parameters'
    /// gradients are the same as when it is.
    #[test]
    fn skips_the_input_gradient_of_data() {
        let data = Tensor::from_vec(pattern(2 * 3 * 6 * 6, 7, 2.0), (2, 3, 6, 6), &Device::Cpu)
            .expect("data");
        let as_var = Var::from_tensor(&data).expect("a variable");
        let weight = var(&[4, 3, 3, 3], 8, 1.0);
        let bn_weight = var(&[4], 9, 1.0);
        let bn_bias = var(&[4], 10, 1.0);
        let run = |xs: &Tensor| {
            let (ys, _) = train(
                xs,
                &weight,
                (1, 1, 1),
                &bn_weight,
                &bn_bias,
                None,
                Some(Activation::Relu),
            )
            .expect("runs")
            .expect("covered");
            ys.sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("backward")
        };
        let without = run(&data);
        let with = run(as_var.as_tensor());
        assert!(without.get(&data).is_none(), "data got a gradient");
        assert!(
            with.get(as_var.as_tensor()).is_some(),
            "a variable got none"
        );
        let ours = without.get(weight.as_tensor()).expect("weight gradient");
        let theirs = with.get(weight.as_tensor()).expect("weight gradient");
        assert_eq!(max_difference(ours, theirs), 0.0);
    }
}
