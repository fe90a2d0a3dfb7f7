//! 2-D convolution for training: im2col + matrix product, so that the backward pass is two
//! matrix products and a col2im, on every device.
//!
//! Why not `Tensor::conv2d` everywhere: on the CPU, candle 0.11 computes a convolution's input
//! gradient with a naive `conv_transpose2d` loop, and a grouped convolution as one convolution
//! per group, so a depthwise 3x3 on 96 channels is 96 tiny convolutions forward and backward.
//! Measured on this project's 2-core machine (batch 128, 16 -> 16 channels at 32x32): forward
//! and backward 0.41 s with candle's, 0.24 s with ours; a 96-channel depthwise layer at 16x16,
//! 1.4 s and 1.1 s before the batched product below, which then made a whole MBConv training
//! step 1.8x faster. Here:
//! - dense convolutions on the CPU: `Im2Col` (a custom op whose backward is col2im) and one
//!   batched matrix product with the `(out, in * k * k)` weight;
//! - depthwise convolutions on any device: the same columns, times the per-channel taps as a
//!   batched matrix product;
//! - dense convolutions elsewhere (CUDA): candle's `conv2d` (cuDNN / im2col + cuBLAS).
//!
//! The column layout is `(batch, in_channels * k * k, out_side * out_side)` with row
//! `c * k * k + ky * k + kx`, which matches the weight's row-major `(out, in, k, k)` layout.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The geometry of one convolution's input windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Windows {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Windows {
    fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }

    fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }

    fn cols_shape(&self) -> Shape {
        let rows = self.channels * self.kernel * self.kernel;
        (self.batch, rows, self.out_height() * self.out_width()).into()
    }
}

/// Returns `xs * weight` (cross-correlation, PyTorch's `conv2d` without bias) for a weight of
/// shape `(out, in / groups, k, k)`; `groups` must be 1 or the channel count (depthwise).
pub fn conv2d(
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    let (batch, channels, height, width) = xs.dims4()?;
    let (out_channels, _, kernel, _) = weight.dims4()?;
    let windows = Windows {
        batch,
        channels,
        height,
        width,
        kernel,
        stride,
        padding,
    };
    let out_shape = (
        batch,
        out_channels,
        windows.out_height(),
        windows.out_width(),
    );
    if groups == 1 {
        if !xs.device().is_cpu() {
            return xs.conv2d(weight, padding, stride, 1, 1);
        }
        let cols = columns(xs, windows)?;
        let weight = weight.reshape((out_channels, ()))?;
        return weight.broadcast_matmul(&cols)?.reshape(out_shape);
    }
    if groups != channels || out_channels != channels {
        // Not a family the IR has; candle handles it, slowly.
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

/// Returns the columns of `xs` (see the module docs): a custom op on the CPU, tensor ops
/// (padding, shifted slices, strided selection) on other devices.
fn columns(xs: &Tensor, windows: Windows) -> candle_core::Result<Tensor> {
    if windows.kernel == 1 && windows.stride == 1 && windows.padding == 0 {
        return xs.reshape((windows.batch, windows.channels, ()));
    }
    if xs.device().is_cpu() {
        return xs.contiguous()?.apply_op1(Im2Col(windows));
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

/// im2col on the CPU; its gradient is [`Col2Im`].
#[derive(Clone, Copy, Debug)]
struct Im2Col(Windows);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "deepmad-im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(storage, layout, "im2col")?;
        let windows = self.0;
        let mut cols = vec![0f32; windows.cols_shape().elem_count()];
        let image_len = windows.channels * windows.height * windows.width;
        let cols_len = cols.len() / windows.batch;
        cols.par_chunks_mut(cols_len)
            .zip(input.par_chunks(image_len))
            .for_each(|(cols, image)| im2col_one(&windows, image, cols));
        Ok((CpuStorage::F32(cols), windows.cols_shape()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

/// col2im: sums each column entry back onto the input pixel it was copied from.
#[derive(Clone, Copy, Debug)]
struct Col2Im(Windows);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "deepmad-col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = contiguous_f32(storage, layout, "col2im")?;
        let w = self.0;
        let image_len = w.channels * w.height * w.width;
        let mut image = vec![0f32; w.batch * image_len];
        let cols_len = cols.len() / w.batch;
        image
            .par_chunks_mut(image_len)
            .zip(cols.par_chunks(cols_len))
            .for_each(|(image, cols)| col2im_one(&w, cols, image));
        let shape = (w.batch, w.channels, w.height, w.width).into();
        Ok((CpuStorage::F32(image), shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: only f32 tensors are supported");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op }),
    }
}

/// The output positions `lo..hi` along one axis whose input coordinate at kernel offset `tap`
/// lies inside `0..len`, and the input coordinate of `lo`.
fn valid_range(w: &Windows, tap: usize, len: usize, out_len: usize) -> (usize, usize, usize) {
    let lo = w.padding.saturating_sub(tap).div_ceil(w.stride);
    let hi = match (len - 1 + w.padding).checked_sub(tap) {
        Some(last) => (last / w.stride + 1).min(out_len),
        None => 0,
    };
    let first = lo * w.stride + tap - w.padding;
    (lo, hi.max(lo), first)
}

/// Copies the windows of one image (`channels x height x width`) into its columns
/// (`channels * k * k x out_plane`), which must be zeroed.
fn im2col_one(w: &Windows, image: &[f32], cols: &mut [f32]) {
    let (out_h, out_w) = (w.out_height(), w.out_width());
    let plane = w.height * w.width;
    for (row_index, row) in cols.chunks_exact_mut(out_h * out_w).enumerate() {
        let channel = row_index / (w.kernel * w.kernel);
        let (ky, kx) = ((row_index / w.kernel) % w.kernel, row_index % w.kernel);
        let source = &image[channel * plane..(channel + 1) * plane];
        let (y_lo, y_hi, y_first) = valid_range(w, ky, w.height, out_h);
        let (x_lo, x_hi, x_first) = valid_range(w, kx, w.width, out_w);
        for (step, oy) in (y_lo..y_hi).enumerate() {
            let line = &source[(y_first + step * w.stride) * w.width..];
            let target = &mut row[oy * out_w + x_lo..oy * out_w + x_hi];
            if w.stride == 1 {
                target.copy_from_slice(&line[x_first..x_first + target.len()]);
            } else {
                for (offset, value) in target.iter_mut().enumerate() {
                    *value = line[x_first + offset * w.stride];
                }
            }
        }
    }
}

/// Adds the columns of one image back onto its pixels (the adjoint of [`im2col_one`]).
fn col2im_one(w: &Windows, cols: &[f32], image: &mut [f32]) {
    let (out_h, out_w) = (w.out_height(), w.out_width());
    let plane = w.height * w.width;
    for (row_index, row) in cols.chunks_exact(out_h * out_w).enumerate() {
        let channel = row_index / (w.kernel * w.kernel);
        let (ky, kx) = ((row_index / w.kernel) % w.kernel, row_index % w.kernel);
        let target = &mut image[channel * plane..(channel + 1) * plane];
        let (y_lo, y_hi, y_first) = valid_range(w, ky, w.height, out_h);
        let (x_lo, x_hi, x_first) = valid_range(w, kx, w.width, out_w);
        for (step, oy) in (y_lo..y_hi).enumerate() {
            let line = &mut target[(y_first + step * w.stride) * w.width..];
            let source = &row[oy * out_w + x_lo..oy * out_w + x_hi];
            for (offset, value) in source.iter().enumerate() {
                line[x_first + offset * w.stride] += value;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

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
    /// autograd backward) for dense and depthwise kernels, strides 1 and 2, odd sides.
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
        ];
        for (index, &(cin, cout, k, s, g, side)) in cases.iter().enumerate() {
            let xs = random((2, cin, side, side), index as u64);
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
                assert!(max_difference(a, b) < 1e-4, "case {index} {name} gradient");
            }
        }
    }

    /// The tensor-op columns (used on CUDA) equal the custom op's.
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
            let custom = xs.as_tensor().apply_op1(Im2Col(windows)).unwrap();
            let generic = columns_with_tensor_ops(xs.as_tensor(), windows).unwrap();
            assert_eq!(custom.dims(), generic.dims());
            assert_eq!(max_difference(&custom, &generic), 0.0, "k {k} s {s}");
        }
    }
}
