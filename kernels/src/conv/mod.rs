//! 2-D convolution for training, with both gradients, on every device.
//!
//! Why not `Tensor::conv2d` everywhere: candle 0.11 computes a convolution's input gradient
//! with a naive `conv_transpose2d` loop (CPU and CUDA), and a grouped convolution as one
//! convolution per group, so a depthwise 3x3 on 96 channels is 96 tiny convolutions forward and
//! backward. Here, with [`Kernels::Deepmad`]:
//! - dense convolutions on the CPU: `DenseConv`, per group of images an im2col into a per-thread
//!   scratch buffer and one matrix product with the `(out, in * k * k)` weight (the gemm crate
//!   candle uses, single-threaded, images spread over the threads); the backward pass is two
//!   products per group, the weight gradient accumulated per contiguous slice of groups and the
//!   slices summed in order (bit-reproducible whatever the thread timing), the input gradient
//!   as a convolution of the output gradient for stride 1 and as a product and a col2im
//!   otherwise;
//! - depthwise convolutions on the CPU: `DepthwiseConv`, with no columns: for stride 1 on
//!   zero-padded planes where each tap is one long multiply-add (`Padded`), otherwise a direct
//!   loop per (image, channel) plane and tap, forward and backward;
//! - every convolution on CUDA (with the `cuda` feature): cuDNN in all three passes
//!   (`cuda/cudnn.rs`); with `DEEPMAD_DEPTHWISE=deepmad`, depthwise ones go to deepmad's own
//!   kernels instead (not yet run on a GPU, see `own_depthwise_kernels`);
//! - other devices or types: candle's `conv2d` for dense, the columns as tensor ops times the
//!   taps as a batched product for depthwise.
//!
//! With [`Kernels::Stock`] every convolution is candle's `conv2d`.
//! `docs/performance.md` has the measured speeds.
//!
//! The column layout is `(batch, in_channels * k * k, out_side * out_side)` with row
//! `c * k * k + ky * k + kx`, which matches the weight's row-major `(out, in, k, k)` layout.

use candle_core::{Shape, Tensor};

pub(crate) use crate::layout::{contiguous_f32, Windows};
use crate::Kernels;
pub(crate) use dense::DenseConv;
#[cfg(feature = "cuda")]
pub(crate) use depthwise::own_depthwise_kernels;
use depthwise::{depthwise_backward, depthwise_forward, DepthwiseConv};

#[cfg(feature = "cuda")]
pub(crate) mod cudnn;
mod dense;
mod depthwise;
mod direct;
mod gemm;
mod im2col;

/// Returns `xs * weight` (cross-correlation, PyTorch's `conv2d` without bias) for a weight of
/// shape `(out, in / groups, k, k)`, with the process's [`crate::current`] kernels.
pub fn conv2d(
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    conv2d_with(crate::current(), xs, weight, stride, padding, groups)
}

/// [`conv2d`] with the given kernels. deepmad's CPU path handles `groups` of 1 or the channel
/// count (depthwise), the families the IR has; other group counts fall back to candle's.
pub fn conv2d_with(
    kernels: Kernels,
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    let (windows, out_channels) = Windows::of(xs, weight, stride, padding)?;
    let (batch, channels, kernel) = (windows.batch, windows.channels, windows.kernel);
    let out_shape = (
        batch,
        out_channels,
        windows.out_height(),
        windows.out_width(),
    );
    if kernels == Kernels::Stock {
        return xs.conv2d(weight, padding, stride, 1, groups);
    }
    #[cfg(feature = "cuda")]
    if xs.device().is_cuda() {
        let depthwise = groups > 1 && groups == channels && out_channels == channels;
        if depthwise && xs.dtype() == candle_core::DType::F32 && own_depthwise_kernels() {
            // deepmad's own kernels (cuda/mod.rs), as PyTorch uses its own for fp32.
            return xs
                .contiguous()?
                .apply_op2(&weight.contiguous()?, DepthwiseConv(windows));
        }
        return cudnn::conv2d(xs, weight, windows, out_channels, groups);
    }
    let cpu_f32 = xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32;
    if cpu_f32 {
        if let Some(conv) = CpuConv::new(windows, out_channels, groups)? {
            let (xs, weight) = (xs.contiguous()?, weight.contiguous()?);
            return match conv {
                CpuConv::Dense(op) => xs.apply_op2(&weight, op),
                CpuConv::Depthwise(w) => xs.apply_op2(&weight, DepthwiseConv(w)),
            };
        }
    }
    if groups == 1 || groups != channels || out_channels != channels {
        // Dense off the CPU, or a group count the IR does not have (slowly): candle's own.
        return xs.conv2d(weight, padding, stride, 1, groups);
    }
    let taps = kernel * kernel;
    // Per (image, channel): a (1 x taps) by (taps x pixels) product. As a batched matrix
    // product its weight gradient is a product too; the equivalent broadcast multiply and sum
    // needed a slow reduction over batch and pixels in candle's backward (1.8x slower overall).
    let cols = columns(xs, windows)?.reshape((batch, channels, taps, ()))?;
    let weight = weight.reshape((1, channels, 1, taps))?;
    weight.broadcast_matmul(&cols)?.reshape(out_shape)
}

/// deepmad's CPU kernels for one convolution, over plain slices: what the convolution ops here
/// run, and what [`crate::conv_bn`] fuses with BatchNorm.
#[derive(Clone, Copy, Debug)]
pub(crate) enum CpuConv {
    Dense(DenseConv),
    Depthwise(Windows),
}

impl CpuConv {
    /// The kernels for `groups` of 1 or depthwise; `None` for other group counts (not a family
    /// the IR has).
    /// An error only for a `DEEPMAD_CPU_DIRECT` this CPU cannot follow
    /// ([`direct::Kernel::chosen`]).
    pub(crate) fn new(
        windows: Windows,
        out_channels: usize,
        groups: usize,
    ) -> candle_core::Result<Option<CpuConv>> {
        Ok(if groups == 1 {
            Some(CpuConv::Dense(DenseConv {
                windows,
                out_channels,
                simd: direct::Kernel::chosen()?,
            }))
        } else if groups == windows.channels && out_channels == windows.channels {
            Some(CpuConv::Depthwise(windows))
        } else {
            None
        })
    }

    /// `(batch, out, out_height, out_width)`.
    pub(crate) fn output_shape(&self) -> Shape {
        let (w, out) = match self {
            CpuConv::Dense(conv) => (conv.windows, conv.out_channels),
            CpuConv::Depthwise(w) => (*w, w.channels),
        };
        (w.batch, out, w.out_height(), w.out_width()).into()
    }

    /// The output of `input * weight`, row-major.
    pub(crate) fn forward(&self, input: &[f32], weight: &[f32]) -> Vec<f32> {
        match self {
            CpuConv::Dense(conv) => conv.forward_values(input, weight),
            CpuConv::Depthwise(w) => depthwise_forward(w, input, weight),
        }
    }

    /// Writes every element of the weight's gradient and, when given a buffer for it, of the
    /// input's.
    pub(crate) fn backward(
        &self,
        input: &[f32],
        weight: &[f32],
        grad_ys: &[f32],
        grad_xs: Option<&mut [f32]>,
        grad_weight: &mut [f32],
    ) {
        match (self, grad_xs) {
            (CpuConv::Dense(conv), grad_xs) => {
                conv.backward_values(input, weight, grad_ys, grad_xs, grad_weight)
            }
            (CpuConv::Depthwise(w), Some(grad_xs)) => {
                depthwise_backward(w, input, weight, grad_ys, grad_xs, grad_weight)
            }
            (CpuConv::Depthwise(w), None) => {
                let mut unused = vec![0f32; input.len()];
                depthwise_backward(w, input, weight, grad_ys, &mut unused, grad_weight)
            }
        }
    }
}

/// Returns the columns of `xs` (see the module docs) as tensor ops (padding, shifted slices,
/// strided selection), for devices and types the custom ops do not cover.
fn columns(xs: &Tensor, windows: Windows) -> candle_core::Result<Tensor> {
    if windows.kernel == 1 && windows.stride == 1 && windows.padding == 0 {
        return xs.reshape((windows.batch, windows.channels, ()));
    }
    columns_with_tensor_ops(xs, windows)
}

fn columns_with_tensor_ops(xs: &Tensor, windows: Windows) -> candle_core::Result<Tensor> {
    let Windows {
        kernel,
        stride,
        padding,
        ..
    } = windows;
    let (out_h, out_w) = (windows.out_height(), windows.out_width());
    let padded = xs
        .pad_with_zeros(2, padding, padding)?
        .pad_with_zeros(3, padding, padding)?;
    let select = |len: usize| -> candle_core::Result<Tensor> {
        let indices: Vec<u32> = (0..len).map(|i| (i * stride) as u32).collect();
        Tensor::new(indices.as_slice(), xs.device())
    };
    let (rows, cols) = (select(out_h)?, select(out_w)?);
    let mut slices = Vec::with_capacity(kernel * kernel);
    for ky in 0..kernel {
        for kx in 0..kernel {
            let mut slice = padded.narrow(2, ky, (out_h - 1) * stride + 1)?.narrow(
                3,
                kx,
                (out_w - 1) * stride + 1,
            )?;
            if stride > 1 {
                slice = slice
                    .contiguous()?
                    .index_select(&rows, 2)?
                    .index_select(&cols, 3)?;
            }
            slices.push(slice);
        }
    }
    Tensor::stack(&slices, 2)?.reshape(windows.cols_shape())
}

/// Splits a backward op's single buffer (the input gradient, then the weight gradient) into
/// the two gradients, as views.
fn split_gradients(
    flat: &Tensor,
    xs: &Tensor,
    weight: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let count = xs.elem_count();
    let grad_xs = flat.narrow(0, 0, count)?.reshape(xs.shape())?;
    let grad_weight = flat
        .narrow(0, count, weight.elem_count())?
        .reshape(weight.shape())?;
    Ok((Some(grad_xs), Some(grad_weight)))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::im2col::im2col_into;

    use super::*;

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Var {
        // A fixed pseudo-random pattern (no RNG needed): values in [-1, 1).
        let count = shape.0 * shape.1 * shape.2 * shape.3;
        let values: Vec<f32> = (0..count as u64)
            .map(|i| {
                let x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Var::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Our convolution and its gradients equal candle's reference `conv2d` (forward and
    /// autograd backward) for dense and depthwise kernels, strides 1 and 2, odd sides, and every
    /// way [`DenseConvBackward`] computes the input gradient.
    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        let cases = [
            // (in, out, kernel, stride, groups, side)
            (3, 5, 3, 1, 1, 7),
            (4, 6, 3, 2, 1, 7),
            (4, 6, 1, 2, 1, 6),
            (4, 6, 1, 1, 1, 5),
            (2, 3, 5, 2, 1, 9),
            (6, 6, 3, 1, 6, 7),
            (6, 6, 5, 2, 6, 9),
            // Stride 1 and k > 1: the input gradient as a convolution of the output gradient,
            // one image per product (529 pixels) and several (81).
            (5, 4, 3, 1, 1, 23),
            (3, 4, 5, 1, 1, 9),
            // Pointwise with one image per product: the image is the columns.
            (4, 6, 1, 1, 1, 23),
            // Depthwise stride 1 on padded planes, the filter wider than the plane too.
            (5, 5, 7, 1, 5, 4),
            (4, 4, 5, 1, 4, 9),
            // A dense filter wider than the image (every shifted row partly off the plane).
            (2, 3, 5, 1, 1, 3),
        ];
        for (index, &(cin, cout, k, s, g, side)) in cases.iter().enumerate() {
            // 19 images: more than one group of images per matrix product, the last partial.
            let batch = if index % 2 == 0 { 2 } else { 19 };
            let xs = random((batch, cin, side, side), index as u64);
            let w = random((cout, cin / g, k, k), 100 + index as u64);
            let ours = conv2d(xs.as_tensor(), w.as_tensor(), s, k / 2, g).unwrap();
            let reference = xs
                .as_tensor()
                .conv2d(w.as_tensor(), k / 2, s, 1, g)
                .unwrap();
            assert_eq!(ours.dims(), reference.dims(), "case {index}");
            assert!(
                max_difference(&ours, &reference) < 1e-4,
                "case {index} forward"
            );
            // A loss that weights every output differently, so every gradient entry is tested.
            let weights = random(ours.dims4().unwrap(), 7);
            let ours_grads = (ours * weights.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let ref_grads = (reference * weights.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, var) in [("input", &xs), ("weight", &w)] {
                let a = ours_grads.get(var.as_tensor()).unwrap();
                let b = ref_grads.get(var.as_tensor()).unwrap();
                let scale = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let difference = max_difference(a, b);
                assert!(
                    difference < 1e-5 * scale.max(1.0),
                    "case {index} {name} gradient: {difference} (largest {scale})"
                );
            }
        }
    }

    /// The tensor-op columns (the fallback on other devices) equal the CPU kernels' im2col.
    #[test]
    fn tensor_op_columns_equal_the_custom_op() {
        for (k, s, side) in [(3, 1, 5), (3, 2, 7), (5, 2, 8), (1, 2, 6)] {
            let xs = random((2, 3, side, side), 3);
            let windows = Windows {
                batch: 2,
                channels: 3,
                height: side,
                width: side,
                kernel: k,
                stride: s,
                padding: k / 2,
            };
            let image_len = 3 * side * side;
            let input: Vec<f32> = xs.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let mut cols = vec![0f32; windows.cols_shape().elem_count()];
            let cols_len = cols.len() / 2;
            for (cols, image) in cols.chunks_mut(cols_len).zip(input.chunks(image_len)) {
                let pixels = windows.out_height() * windows.out_width();
                im2col_into(&windows, image, cols, pixels, 0);
            }
            let custom = Tensor::from_vec(cols, windows.cols_shape(), &Device::Cpu).unwrap();
            let generic = columns_with_tensor_ops(xs.as_tensor(), windows).unwrap();
            assert_eq!(custom.dims(), generic.dims());
            assert_eq!(max_difference(&custom, &generic), 0.0, "k {k} s {s}");
        }
    }
}
