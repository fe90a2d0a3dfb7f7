//! Depthwise convolutions on the CPU (and, with `DEEPMAD_DEPTHWISE=deepmad`, on CUDA): no
//! columns; for stride 1 on zero-padded planes where each tap is one long multiply-add
//! ([`Padded`]), otherwise a direct loop per (image, channel) plane and tap.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::valid_range;
use super::Windows;
use super::{contiguous_f32, split_gradients};

/// A depthwise convolution (one `k x k` filter per channel) on the CPU, computed directly:
/// per (image, channel) plane and per tap, one multiply-add over the rows and columns that tap
/// reaches, with no columns at all. Backward: [`DepthwiseBackward`].
#[derive(Clone, Copy, Debug)]
pub(super) struct DepthwiseConv(pub(super) Windows);

/// Both gradients of [`DepthwiseConv`] in one buffer: the input's, then the weight's.
#[derive(Clone, Copy, Debug)]
struct DepthwiseBackward(Windows);

/// `DEEPMAD_DEPTHWISE=deepmad` sends fp32 depthwise convolutions on CUDA to deepmad's own kernels
/// (`cuda/mod.rs`) instead of cuDNN. They pass `deepmad bench --check` on an H200, but are
/// opt-in because they were not faster: with cuDNN's heuristic algorithms for the other
/// convolutions, the mbconv-se design trained 1.24x faster than with cuDNN's depthwise at batch
/// 128 but 0.95x as fast at batch 512, and cuDNN with timed algorithms for every convolution
/// (the default now) was faster than both (`docs/performance.md`). Not yet measured: these
/// kernels with timed algorithms for the other convolutions.
#[cfg(feature = "cuda")]
pub(crate) fn own_depthwise_kernels() -> bool {
    static OWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| std::env::var("DEEPMAD_DEPTHWISE").is_ok_and(|value| value == "deepmad"))
}

/// The shape arguments of the depthwise CUDA kernels: N, C, H, W, Ho, Wo, K, S, P.
#[cfg(feature = "cuda")]
fn depthwise_dims(w: &Windows) -> [i32; 9] {
    [
        w.batch,
        w.channels,
        w.height,
        w.width,
        w.out_height(),
        w.out_width(),
        w.kernel,
        w.stride,
        w.padding,
    ]
    .map(|value| value as i32)
}

/// Calls `visit(out_row, in_row, out_x_lo..out_x_hi, in_x_first)` for every output row a
/// tap `(ky, kx)` reaches, so that out column `ox` reads in column
/// `in_x_first + (ox - out_x_lo) * stride`.
fn for_tap_rows(
    w: &Windows,
    ky: usize,
    kx: usize,
    mut visit: impl FnMut(usize, usize, usize, usize, usize),
) {
    let (out_h, out_w) = (w.out_height(), w.out_width());
    let (y_lo, y_hi, y_first) = valid_range(w, ky, w.height, out_h);
    let (x_lo, x_hi, x_first) = valid_range(w, kx, w.width, out_w);
    for (step, oy) in (y_lo..y_hi).enumerate() {
        visit(oy, y_first + step * w.stride, x_lo, x_hi, x_first);
    }
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "deepmad-depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(xs, xs_layout, "depthwise conv2d")?;
        let weight = contiguous_f32(weight, weight_layout, "depthwise conv2d")?;
        let w = self.0;
        let shape = (w.batch, w.channels, w.out_height(), w.out_width()).into();
        Ok((CpuStorage::F32(depthwise_forward(&w, input, weight)), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xs_layout: &Layout,
        weight: &candle_core::CudaStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{f32_view, launch, Arg};
        let w = self.0;
        let device = xs.device.clone();
        let input = f32_view(xs, xs_layout, "depthwise input")?;
        let filter = f32_view(weight, weight_layout, "depthwise weight")?;
        let shape: Shape = (w.batch, w.channels, w.out_height(), w.out_width()).into();
        let n = shape.elem_count();
        // SAFETY: the kernel writes every output element.
        let mut ys = unsafe { device.alloc::<f32>(n)? };
        let mut out = ys.slice_mut(..);
        let mut args = vec![Arg::Out(&mut out), Arg::In(&input), Arg::In(&filter)];
        args.extend(depthwise_dims(&w).iter().map(|d| Arg::I32(*d)));
        launch(&device, "deepmad_depthwise_forward", n, &mut args)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(ys, device), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _ys: &Tensor,
        grad_ys: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let flat =
            xs.apply_op3_no_bwd(weight, &grad_ys.contiguous()?, &DepthwiseBackward(self.0))?;
        split_gradients(&flat, xs, weight)
    }
}

impl CustomOp3 for DepthwiseBackward {
    fn name(&self) -> &'static str {
        "deepmad-depthwise-conv2d-backward"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xs_layout: &Layout,
        weight: &candle_core::CudaStorage,
        weight_layout: &Layout,
        grad_ys: &candle_core::CudaStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{f32_view, launch, launch_with, Arg};
        let w = self.0;
        let device = xs.device.clone();
        let input = f32_view(xs, xs_layout, "depthwise input")?;
        let filter = f32_view(weight, weight_layout, "depthwise weight")?;
        let grad_ys = f32_view(grad_ys, grad_layout, "depthwise output gradient")?;
        let count = w.batch * w.channels * w.height * w.width;
        let taps = w.channels * w.kernel * w.kernel;
        // SAFETY: the two kernels write every element (the input gradient, then the taps').
        let mut grads = unsafe { device.alloc::<f32>(count + taps)? };
        let dims = depthwise_dims(&w);
        {
            let mut out = grads.slice_mut(0..count);
            let mut args = vec![Arg::Out(&mut out), Arg::In(&grad_ys), Arg::In(&filter)];
            args.extend(dims.iter().map(|d| Arg::I32(*d)));
            launch(
                &device,
                "deepmad_depthwise_backward_input",
                count,
                &mut args,
            )?;
        }
        {
            let mut out = grads.slice_mut(count..count + taps);
            let mut args = vec![Arg::Out(&mut out), Arg::In(&grad_ys), Arg::In(&input)];
            args.extend(dims.iter().map(|d| Arg::I32(*d)));
            let config = cudarc::driver::LaunchConfig {
                grid_dim: (taps as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            launch_with(
                &device,
                "deepmad_depthwise_backward_weight",
                config,
                &mut args,
            )?;
        }
        let shape = Shape::from(count + taps);
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(grads, device),
            shape,
        ))
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        grad_ys: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(xs, xs_layout, "depthwise conv2d backward")?;
        let weight = contiguous_f32(weight, weight_layout, "depthwise conv2d backward")?;
        let grad_ys = contiguous_f32(grad_ys, grad_layout, "depthwise conv2d backward")?;
        let mut grads = vec![0f32; input.len() + weight.len()];
        let (grad_xs, grad_weight) = grads.split_at_mut(input.len());
        depthwise_backward(&self.0, input, weight, grad_ys, grad_xs, grad_weight);
        let shape = Shape::from(grads.len());
        Ok((CpuStorage::F32(grads), shape))
    }
}

/// The output of a depthwise convolution (see [`DepthwiseConv`]) on the CPU.
pub(super) fn depthwise_forward(w: &Windows, input: &[f32], weight: &[f32]) -> Vec<f32> {
    let w = *w;
    let (out_h, out_w) = (w.out_height(), w.out_width());
    let (plane, out_plane, taps) = (w.height * w.width, out_h * out_w, w.kernel * w.kernel);
    let mut ys = vec![0f32; w.batch * w.channels * out_plane];
    if w.stride == 1 {
        let padded = Padded::new(&w);
        ys.par_chunks_mut(out_plane)
            .zip(input.par_chunks(plane))
            .enumerate()
            .for_each_init(
                || (padded.buffer(), vec![0f32; padded.span]),
                |(buffer, wide), (index, (ys, image))| {
                    let filter = &weight[(index % w.channels) * taps..][..taps];
                    padded.fill(buffer, image);
                    padded.correlate(buffer, filter, wide);
                    padded.narrow(wide, ys);
                },
            );
        return ys;
    }
    ys.par_chunks_mut(out_plane)
        .zip(input.par_chunks(plane))
        .enumerate()
        .for_each(|(index, (ys, image))| {
            let filter = &weight[(index % w.channels) * taps..][..taps];
            for ky in 0..w.kernel {
                for kx in 0..w.kernel {
                    let tap = filter[ky * w.kernel + kx];
                    for_tap_rows(&w, ky, kx, |oy, iy, lo, hi, first| {
                        let src = &image[iy * w.width..(iy + 1) * w.width];
                        let dst = &mut ys[oy * out_w + lo..oy * out_w + hi];
                        if w.stride == 1 {
                            let src = &src[first..first + dst.len()];
                            dst.iter_mut().zip(src).for_each(|(d, s)| *d += tap * s);
                        } else {
                            for (offset, d) in dst.iter_mut().enumerate() {
                                *d += tap * src[first + offset * w.stride];
                            }
                        }
                    });
                }
            }
        });
    ys
}

/// Both gradients of a depthwise convolution on the CPU, written in full into `grad_xs` and
/// `grad_weight`.
pub(super) fn depthwise_backward(
    w: &Windows,
    input: &[f32],
    weight: &[f32],
    grad_ys: &[f32],
    grad_xs: &mut [f32],
    grad_weight: &mut [f32],
) {
    let w = *w;
    let (out_h, out_w) = (w.out_height(), w.out_width());
    let (plane, out_plane, taps) = (w.height * w.width, out_h * out_w, w.kernel * w.kernel);
    let planes = w.batch * w.channels;
    // Per plane, its contribution to its channel's filter gradient; summed over images below.
    let mut plane_taps = vec![0f32; planes * taps];
    if w.stride == 1 {
        let padded = Padded::new(&w);
        grad_xs
            .par_chunks_mut(plane)
            .zip(plane_taps.par_chunks_mut(taps))
            .zip(input.par_chunks(plane).zip(grad_ys.par_chunks(out_plane)))
            .enumerate()
            .for_each_init(
                || (padded.buffer(), padded.buffer(), vec![0f32; padded.span]),
                |(buffer, grad_buffer, wide), (index, ((grad_x, grad_taps), (image, grad_y)))| {
                    let filter = &weight[(index % w.channels) * taps..][..taps];
                    padded.fill(buffer, image);
                    padded.widen(grad_y, wide);
                    padded.backward(buffer, filter, wide, grad_buffer, grad_taps);
                    padded.interior(grad_buffer, grad_x);
                },
            );
    } else {
        grad_xs
            .par_chunks_mut(plane)
            .zip(plane_taps.par_chunks_mut(taps))
            .zip(input.par_chunks(plane).zip(grad_ys.par_chunks(out_plane)))
            .enumerate()
            .for_each(|(index, ((grad_x, grad_taps), (image, grad_y)))| {
                grad_x.fill(0.0);
                let filter = &weight[(index % w.channels) * taps..][..taps];
                for ky in 0..w.kernel {
                    for kx in 0..w.kernel {
                        let t = ky * w.kernel + kx;
                        let tap = filter[t];
                        let mut sum = 0f32;
                        for_tap_rows(&w, ky, kx, |oy, iy, lo, hi, first| {
                            let gy = &grad_y[oy * out_w + lo..oy * out_w + hi];
                            let src = &image[iy * w.width..(iy + 1) * w.width];
                            let gx = &mut grad_x[iy * w.width..(iy + 1) * w.width];
                            if w.stride == 1 {
                                let src = &src[first..first + gy.len()];
                                let gx = &mut gx[first..first + gy.len()];
                                for ((g, s), d) in gy.iter().zip(src).zip(gx.iter_mut()) {
                                    sum += g * s;
                                    *d += tap * g;
                                }
                            } else {
                                for (offset, g) in gy.iter().enumerate() {
                                    let i = first + offset * w.stride;
                                    sum += g * src[i];
                                    gx[i] += tap * g;
                                }
                            }
                        });
                        grad_taps[t] = sum;
                    }
                }
            });
    }
    grad_weight.fill(0.0);
    for (index, contribution) in plane_taps.chunks(taps).enumerate() {
        let channel = index % w.channels;
        grad_weight[channel * taps..][..taps]
            .iter_mut()
            .zip(contribution)
            .for_each(|(a, b)| *a += b);
    }
}

/// One (image, channel) plane of a stride-1 depthwise convolution, zero-padded on every side
/// and flattened with row length `width + 2 * padding`. On that grid every tap `(ky, kx)` is one
/// shift, `ky * row + kx`, so the convolution is a sum of long contiguous multiply-adds over a
/// "wide" output that also holds `row - out_width` junk columns per row, dropped at the end.
/// With 7x7 filters on 8x8 planes the exact loops ran rows of 2 to 8 values; these run 100.
struct Padded {
    w: Windows,
    /// Row length of the padded plane.
    row: usize,
    /// Values of the padded plane.
    len: usize,
    /// Values of the wide output: up to the last valid output column.
    span: usize,
    /// Per tap, its shift on the padded grid: `ky * row + kx`.
    shifts: Vec<usize>,
}

/// Outputs accumulated in registers at once by [`Padded::correlate`].
const BLOCK: usize = 16;

impl Padded {
    fn new(w: &Windows) -> Padded {
        let row = w.width + 2 * w.padding;
        let rows = w.height + 2 * w.padding;
        let span = (w.out_height() - 1) * row + w.out_width();
        let taps = w.kernel * w.kernel;
        let shifts = (0..taps)
            .map(|tap| (tap / w.kernel) * row + tap % w.kernel)
            .collect();
        Padded {
            w: *w,
            row,
            len: rows * row,
            span,
            shifts,
        }
    }

    /// A zeroed padded plane; [`Padded::fill`] only ever writes its interior.
    fn buffer(&self) -> Vec<f32> {
        vec![0f32; self.len]
    }

    /// Copies a plane into the interior of a padded buffer.
    fn fill(&self, buffer: &mut [f32], image: &[f32]) {
        let (p, width) = (self.w.padding, self.w.width);
        for (y, line) in image.chunks_exact(width).enumerate() {
            buffer[(y + p) * self.row + p..][..width].copy_from_slice(line);
        }
    }

    /// Copies a padded buffer's interior out to a plane.
    fn interior(&self, buffer: &[f32], image: &mut [f32]) {
        let (p, width) = (self.w.padding, self.w.width);
        for (y, line) in image.chunks_exact_mut(width).enumerate() {
            line.copy_from_slice(&buffer[(y + p) * self.row + p..][..width]);
        }
    }

    /// `wide[i] = sum over taps of filter[t] * buffer[shift(t) + i]`.
    fn correlate(&self, buffer: &[f32], filter: &[f32], wide: &mut [f32]) {
        correlate_plane(buffer, filter, &self.shifts, &mut wide[..self.span]);
    }

    /// Drops the junk columns: the wide output's valid columns into the output plane.
    fn narrow(&self, wide: &[f32], ys: &mut [f32]) {
        let out_w = self.w.out_width();
        for (y, line) in ys.chunks_exact_mut(out_w).enumerate() {
            line.copy_from_slice(&wide[y * self.row..][..out_w]);
        }
    }

    /// The inverse of [`Padded::narrow`]: an output gradient plane onto the wide grid, its
    /// junk columns zero (they are never written, and the buffer starts zeroed).
    fn widen(&self, ys: &[f32], wide: &mut [f32]) {
        let out_w = self.w.out_width();
        for (y, line) in ys.chunks_exact(out_w).enumerate() {
            wide[y * self.row..][..out_w].copy_from_slice(line);
        }
    }

    /// From the padded input, the filter and the widened output gradient: the padded input
    /// gradient (its border ends up holding what fell on the padding, to be dropped) and the
    /// plane's filter gradient.
    fn backward(
        &self,
        buffer: &[f32],
        filter: &[f32],
        wide: &[f32],
        grad_buffer: &mut [f32],
        grad_taps: &mut [f32],
    ) {
        grad_buffer.fill(0.0);
        let wide = &wide[..self.span];
        depthwise_backward_plane(buffer, filter, &self.shifts, wide, grad_buffer, grad_taps);
    }
}

crate::simd::multiversion! {
    /// [`Padded::correlate`] in register blocks of [`BLOCK`] outputs.
    fn correlate_plane(buffer: &[f32], filter: &[f32], shifts: &[usize], wide: &mut [f32]) {
        let span = wide.len();
        let mut start = 0;
        while start < span {
            let count = BLOCK.min(span - start);
            let mut acc = [0f32; BLOCK];
            if count == BLOCK {
                for (&tap, &shift) in filter.iter().zip(shifts) {
                    let source = &buffer[shift + start..][..BLOCK];
                    for j in 0..BLOCK {
                        acc[j] += tap * source[j];
                    }
                }
            } else {
                for (&tap, &shift) in filter.iter().zip(shifts) {
                    let source = &buffer[shift + start..][..count];
                    for j in 0..count {
                        acc[j] += tap * source[j];
                    }
                }
            }
            wide[start..start + count].copy_from_slice(&acc[..count]);
            start += count;
        }
    }
}

crate::simd::multiversion! {
    /// [`Padded::backward`]: per tap, the dot product of the wide output gradient with the
    /// shifted input (the tap's gradient) and the scatter of the output gradient times the tap
    /// onto the shifted input gradient.
    fn depthwise_backward_plane(
        buffer: &[f32],
        filter: &[f32],
        shifts: &[usize],
        wide: &[f32],
        grad_buffer: &mut [f32],
        grad_taps: &mut [f32],
    ) {
        let span = wide.len();
        let terms = filter.iter().zip(shifts).zip(grad_taps.iter_mut());
        for ((&tap, &shift), grad_tap) in terms {
            let source = &buffer[shift..shift + span];
            let target = &mut grad_buffer[shift..shift + span];
            let mut lanes = [0f32; BLOCK];
            let mut chunks = wide
                .chunks_exact(BLOCK)
                .zip(source.chunks_exact(BLOCK))
                .zip(target.chunks_exact_mut(BLOCK));
            for ((g, x), d) in &mut chunks {
                for j in 0..BLOCK {
                    lanes[j] += g[j] * x[j];
                    d[j] += tap * g[j];
                }
            }
            let done = span - span % BLOCK;
            for i in done..span {
                lanes[i - done] += wide[i] * source[i];
                target[i] += tap * wide[i];
            }
            *grad_tap = lanes.iter().sum();
        }
    }
}
