//! 2-D convolution for training, with both gradients, on every device.
//!
//! Why not `Tensor::conv2d` everywhere: candle 0.11 computes a convolution's input gradient
//! with a naive `conv_transpose2d` loop (CPU and CUDA), and a grouped convolution as one
//! convolution per group, so a depthwise 3x3 on 96 channels is 96 tiny convolutions forward and
//! backward. Here, with [`crate::kernels::Kernels::Deepmad`]:
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
//!   (`cudnn.rs`); with `DEEPMAD_DEPTHWISE=deepmad`, depthwise ones go to deepmad's own
//!   kernels instead (not yet run on a GPU, see `own_depthwise_kernels`);
//! - other devices or types: candle's `conv2d` for dense, the columns as tensor ops times the
//!   taps as a batched product for depthwise.
//!
//! With [`crate::kernels::Kernels::Stock`] every convolution is candle's `conv2d`.
//! `docs/performance.md` has the measured speeds.
//!
//! The column layout is `(batch, in_channels * k * k, out_side * out_side)` with row
//! `c * k * k + ky * k + kx`, which matches the weight's row-major `(out, in, k, k)` layout.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::direct::Direct;

/// The geometry of one convolution's input windows (NCHW input, square `k x k` kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Windows {
    pub(crate) batch: usize,
    pub(crate) channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl Windows {
    /// The windows of convolving `xs` `(batch, in, height, width)` with `weight`
    /// `(out, in / groups, k, k)`, and the output channel count.
    pub(crate) fn of(
        xs: &Tensor,
        weight: &Tensor,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<(Windows, usize)> {
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
        Ok((windows, out_channels))
    }

    pub(crate) fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }

    pub(crate) fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }

    fn cols_shape(&self) -> Shape {
        let rows = self.channels * self.kernel * self.kernel;
        (self.batch, rows, self.out_height() * self.out_width()).into()
    }
}

/// Returns `xs * weight` (cross-correlation, PyTorch's `conv2d` without bias) for a weight of
/// shape `(out, in / groups, k, k)`, with the process's [`crate::kernels::current`] kernels.
pub fn conv2d(
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    conv2d_with(
        crate::kernels::current(),
        xs,
        weight,
        stride,
        padding,
        groups,
    )
}

/// [`conv2d`] with the given kernels. deepmad's CPU path handles `groups` of 1 or the channel
/// count (depthwise), the families the IR has; other group counts fall back to candle's.
pub fn conv2d_with(
    kernels: crate::kernels::Kernels,
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
    if kernels == crate::kernels::Kernels::Stock {
        return xs.conv2d(weight, padding, stride, 1, groups);
    }
    #[cfg(feature = "cuda")]
    if xs.device().is_cuda() {
        let depthwise = groups > 1 && groups == channels && out_channels == channels;
        if depthwise && xs.dtype() == candle_core::DType::F32 && own_depthwise_kernels() {
            // deepmad's own kernels (cuda_kernels.rs), as PyTorch uses its own for fp32.
            return xs
                .contiguous()?
                .apply_op2(&weight.contiguous()?, DepthwiseConv(windows));
        }
        return crate::cudnn::conv2d(xs, weight, windows, out_channels, groups);
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
    /// ([`crate::direct::Kernel::chosen`]).
    pub(crate) fn new(
        windows: Windows,
        out_channels: usize,
        groups: usize,
    ) -> candle_core::Result<Option<CpuConv>> {
        Ok(if groups == 1 {
            Some(CpuConv::Dense(DenseConv {
                windows,
                out_channels,
                simd: crate::direct::Kernel::chosen()?,
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

/// A dense convolution on the CPU as one op. Images go in groups of [`DenseConv::group`]: the
/// group's columns side by side in a per-thread scratch matrix (`in * k * k` rows, `group *
/// pixels` columns), one single-threaded matrix product with the `(out, in * k * k)` weight,
/// and the product's blocks copied to each image's output; groups are spread over candle's
/// threads. Grouping makes the products wide enough for the gemm kernels (ResNet-20's last
/// stage has 64 pixels per image). Nothing batch-sized is materialised besides input and output;
/// the backward pass ([`DenseConvBackward`]) accumulates the weight gradient per slice of groups
/// with the product's `dst += lhs * rhs` instead of a batch-sized tensor reduced afterwards.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DenseConv {
    windows: Windows,
    out_channels: usize,
    /// The direct kernel's tiling, for the convolutions that use it ([`DenseConv::direct`]).
    simd: crate::direct::Kernel,
}

/// Both gradients of [`DenseConv`] from `(input, weight, output gradient)`, in one buffer: the
/// input gradient, then the weight gradient.
#[derive(Clone, Copy, Debug)]
struct DenseConvBackward(DenseConv);

/// Columns per matrix product that [`DenseConv::group`] aims at.
const PRODUCT_COLUMNS: usize = 512;

impl DenseConv {
    /// Rows of the columns (`in * k * k`) and output pixels per image.
    fn dims(&self) -> (usize, usize) {
        let w = &self.windows;
        (
            w.channels * w.kernel * w.kernel,
            w.out_height() * w.out_width(),
        )
    }

    fn image_len(&self) -> usize {
        let w = &self.windows;
        w.channels * w.height * w.width
    }

    /// Images per matrix product: enough for about [`PRODUCT_COLUMNS`] columns, at most 16.
    fn group(&self) -> usize {
        let (_, pixels) = self.dims();
        (PRODUCT_COLUMNS / pixels.max(1)).clamp(1, 16)
    }

    /// A 1x1 convolution with stride 1 and no padding, one image per product: the columns are
    /// the image itself, with no copy. (With smaller images, products of one image were too
    /// narrow: the bottleneck design trained 15% slower.)
    fn pointwise(&self) -> bool {
        let w = &self.windows;
        w.kernel == 1 && w.stride == 1 && w.padding == 0 && self.group() == 1
    }

    /// Whether the input gradient is the convolution of the output gradient with the flipped,
    /// transposed weight over the same windows (stride 1, "same" padding, `k > 1`). That is an
    /// im2col of the output gradient and a product `in x (out * k * k)` deep, instead of a
    /// product only `out` deep and a col2im that scatters every column back.
    fn transposed_gradient(&self) -> bool {
        let w = &self.windows;
        w.kernel > 1 && w.stride == 1 && 2 * w.padding + 1 == w.kernel
    }

    /// The direct kernel ([`crate::direct`]) for this convolution's forward pass: stride 1,
    /// "same" padding, `k > 1`.
    fn direct(&self) -> Option<Direct> {
        let w = &self.windows;
        self.transposed_gradient().then_some(Direct {
            channels: w.channels,
            out_channels: self.out_channels,
            height: w.height,
            width: w.width,
            kernel: w.kernel,
            simd: self.simd,
        })
    }

    /// The direct kernel for the input gradient of a [`DenseConv::transposed_gradient`]
    /// convolution: from the output gradient's `out` channels to the input's, with the
    /// [`DenseConv::flipped_weight`].
    fn gradient_direct(&self) -> Option<Direct> {
        self.direct().map(|direct| Direct {
            channels: direct.out_channels,
            out_channels: direct.channels,
            ..direct
        })
    }

    /// The output, `(batch, out, out_height, out_width)` row-major, of `input * weight`.
    fn forward_values(&self, input: &[f32], weight: &[f32]) -> Vec<f32> {
        let (_, pixels) = self.dims();
        let len = self.windows.batch * self.out_channels * pixels;
        crate::buffer::filled_by(len, "conv2d", |ys| self.forward_into(input, weight, ys))
    }

    /// Writes every element of [`DenseConv::forward_values`] into `ys`.
    fn forward_into(&self, input: &[f32], weight: &[f32], ys: &mut [f32]) {
        let (rows, pixels) = self.dims();
        let (w, out, group) = (self.windows, self.out_channels, self.group());
        let width = group * pixels;
        if let Some(direct) = self.direct() {
            let packed = direct.pack(weight);
            ys.par_chunks_mut(out * pixels)
                .zip(input.par_chunks(self.image_len()))
                .for_each_init(
                    || direct.scratch(),
                    |scratch, (ys, image)| direct.run(image, &packed, scratch, ys),
                );
            return;
        }
        ys.par_chunks_mut(group * out * pixels)
            .zip(input.par_chunks(group * self.image_len()))
            .for_each_init(
                // Zeroed once: im2col writes the same in-image positions for every image, so
                // the padding positions stay zero.
                || {
                    let cols = if self.pointwise() { 0 } else { rows * width };
                    let product = if group == 1 { 0 } else { out * width };
                    (vec![0f32; cols], vec![0f32; product])
                },
                |(cols, product), (ys, images)| {
                    let count = images.len() / self.image_len();
                    let cols: &[f32] = if self.pointwise() {
                        images
                    } else {
                        for (j, image) in images.chunks(self.image_len()).enumerate() {
                            im2col_into(&w, image, cols, width, j * pixels);
                        }
                        cols
                    };
                    // product (out x count * pixels) = weight (out x rows) * cols; a single
                    // image's product is its output, so it goes there directly.
                    let dst = if count == 1 {
                        &mut ys[..]
                    } else {
                        &mut product[..]
                    };
                    matmul(
                        (dst, if count == 1 { pixels } else { width }),
                        false,
                        Operand::row_major(weight, rows),
                        Operand::row_major(cols, width),
                        (out, count * pixels, rows),
                    );
                    if count == 1 {
                        return;
                    }
                    for (j, image_out) in ys.chunks_mut(out * pixels).enumerate() {
                        for (o, plane) in image_out.chunks_mut(pixels).enumerate() {
                            plane.copy_from_slice(&product[o * width + j * pixels..][..pixels]);
                        }
                    }
                },
            );
    }

    /// The weight for [`DenseConv::transposed_gradient`]: `(in, out, k, k)` with the taps
    /// reversed, row-major, so row `c` holds `weight[o][c][k-1-ky][k-1-kx]` at
    /// `o * k * k + ky * k + kx`.
    fn flipped_weight(&self, weight: &[f32]) -> Vec<f32> {
        let (k, channels, out) = (
            self.windows.kernel,
            self.windows.channels,
            self.out_channels,
        );
        let taps = k * k;
        let mut flipped = vec![0f32; weight.len()];
        for o in 0..out {
            for c in 0..channels {
                let source = &weight[(o * channels + c) * taps..][..taps];
                let target = &mut flipped[(c * out + o) * taps..][..taps];
                for (tap, value) in target.iter_mut().enumerate() {
                    *value = source[taps - 1 - tap];
                }
            }
        }
        flipped
    }
}

impl CustomOp2 for DenseConv {
    fn name(&self) -> &'static str {
        "deepmad-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(xs, xs_layout, "conv2d")?;
        let weight = contiguous_f32(weight, weight_layout, "conv2d")?;
        let w = self.windows;
        let shape = (w.batch, self.out_channels, w.out_height(), w.out_width()).into();
        Ok((CpuStorage::F32(self.forward_values(input, weight)), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _ys: &Tensor,
        grad_ys: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let flat =
            xs.apply_op3_no_bwd(weight, &grad_ys.contiguous()?, &DenseConvBackward(*self))?;
        split_gradients(&flat, xs, weight)
    }
}

/// One slice's scratch space in [`DenseConvBackward`]; buffers a shape does not use are empty.
struct BackwardScratch {
    grad_weight: Vec<f32>,
    /// The input's columns (not for a pointwise convolution).
    cols: Vec<f32>,
    /// The columns' gradient (for a col2im).
    grad_cols: Vec<f32>,
    /// The group's output gradients side by side (groups of more than one image).
    grad_y: Vec<f32>,
    /// The direct kernel's buffers ([`DenseConv::gradient_direct`]).
    direct: Option<crate::direct::Scratch>,
}

impl CustomOp3 for DenseConvBackward {
    fn name(&self) -> &'static str {
        "deepmad-conv2d-backward"
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
        let input = contiguous_f32(xs, xs_layout, "conv2d backward")?;
        let weight = contiguous_f32(weight, weight_layout, "conv2d backward")?;
        let grad_ys = contiguous_f32(grad_ys, grad_layout, "conv2d backward")?;
        let len = input.len() + weight.len();
        let grads = crate::buffer::filled_by(len, "conv2d backward", |grads| {
            let (grad_xs, grad_weight) = grads.split_at_mut(input.len());
            self.0
                .backward_values(input, weight, grad_ys, Some(grad_xs), grad_weight);
        });
        let shape = Shape::from(grads.len());
        Ok((CpuStorage::F32(grads), shape))
    }
}

impl DenseConv {
    /// Writes the weight's gradient (every element) and, when asked for, the input's, from the
    /// forward pass's input and weight and the output's gradient.
    fn backward_values(
        &self,
        input: &[f32],
        weight: &[f32],
        grad_ys: &[f32],
        grad_xs: Option<&mut [f32]>,
        grad_weight: &mut [f32],
    ) {
        let (rows, pixels) = self.dims();
        let (w, out, group) = (self.windows, self.out_channels, self.group());
        let width = group * pixels;
        let image_len = self.image_len();
        let (pointwise, transposed) = (self.pointwise(), self.transposed_gradient());
        let input_gradient = grad_xs.is_some();
        let gradient_direct = self.gradient_direct().filter(|_| input_gradient);
        let flipped = gradient_direct
            .map(|direct| direct.pack(&self.flipped_weight(weight)))
            .unwrap_or_default();
        // The weight gradient on the padded grid, with no im2col, where there is a kernel.
        let weight_direct = self.direct().and_then(|direct| direct.weight_gradient());
        // The weight gradient is a sum over images. Each thread sums a fixed, contiguous slice
        // of the groups in order and the slices' partial sums are added in slice order, so the
        // summation order, and with it every bit of the result, does not depend on which
        // thread ran what (a work-stealing fold would make it vary from run to run).
        let groups = input.len().div_ceil(group * image_len);
        let per_slice = groups.div_ceil(rayon::current_num_threads().clamp(1, groups.max(1)));
        let slice_len = per_slice * group * image_len;
        let grad_x_slices: Vec<Option<&mut [f32]>> = match grad_xs {
            Some(grad_xs) => grad_xs.chunks_mut(slice_len).map(Some).collect(),
            None => (0..input.len().div_ceil(slice_len)).map(|_| None).collect(),
        };
        let partials: Vec<Vec<f32>> = grad_x_slices
            .into_par_iter()
            .zip(input.par_chunks(slice_len))
            .zip(grad_ys.par_chunks(per_slice * group * out * pixels))
            .map(|((mut grad_xs, input), grad_ys)| {
                let several = group > 1;
                let mut scratch = BackwardScratch {
                    grad_weight: vec![0f32; out * rows],
                    cols: vec![
                        0f32;
                        if pointwise || weight_direct.is_some() {
                            0
                        } else {
                            rows * width
                        }
                    ],
                    grad_cols: if pointwise || transposed || !input_gradient {
                        Vec::new()
                    } else {
                        vec![0f32; rows * width]
                    },
                    grad_y: vec![
                        0f32;
                        if several && weight_direct.is_none() {
                            out * width
                        } else {
                            0
                        }
                    ],
                    direct: gradient_direct.map(|direct| direct.scratch()),
                };
                if let Some(direct) = &weight_direct {
                    let mut direct_scratch = direct.scratch();
                    let images = direct.images();
                    let pairs = input
                        .chunks(images * image_len)
                        .zip(grad_ys.chunks(images * out * pixels));
                    for (images, grad_ys) in pairs {
                        direct.accumulate(
                            images,
                            grad_ys,
                            &mut direct_scratch,
                            &mut scratch.grad_weight,
                        );
                    }
                }
                let groups = input
                    .chunks(group * image_len)
                    .zip(grad_ys.chunks(group * out * pixels))
                    .enumerate();
                for (index, (images, grad_ys)) in groups {
                    let count = images.len() / image_len;
                    let n = count * pixels;
                    // The weight gradient's share of the group, unless computed above; the
                    // output gradients as an operand for the input gradient's products.
                    let grad_y = if weight_direct.is_some() {
                        None
                    } else {
                        let cols: &[f32] = if pointwise {
                            images
                        } else {
                            for (j, image) in images.chunks(image_len).enumerate() {
                                im2col_into(&w, image, &mut scratch.cols, width, j * pixels);
                            }
                            &scratch.cols
                        };
                        // The group's output gradients side by side, as the forward's product (a
                        // single image's gradient already is).
                        let grad_y = if count == 1 {
                            Operand::row_major(grad_ys, pixels)
                        } else {
                            for (j, image_grad) in grad_ys.chunks(out * pixels).enumerate() {
                                for (o, plane) in image_grad.chunks(pixels).enumerate() {
                                    scratch.grad_y[o * width + j * pixels..][..pixels]
                                        .copy_from_slice(plane);
                                }
                            }
                            Operand::row_major(&scratch.grad_y, width)
                        };
                        let cols_stride = if pointwise { pixels } else { width };
                        // grad_weight (out x rows) += grad_y (out x n) * cols^T (n x rows),
                        // accumulated column-major (as rows x out): the gemm crate then packs
                        // grad_y, `out` rows, instead of the columns, `in * k * k` rows.
                        matmul_strided(
                            (&mut scratch.grad_weight, 1, out),
                            true,
                            grad_y,
                            Operand::transposed(cols, cols_stride),
                            (out, rows, n),
                        );
                        Some(grad_y)
                    };
                    let Some(grad_xs) = grad_xs.as_deref_mut() else {
                        continue;
                    };
                    let grad_xs = &mut grad_xs[index * group * image_len..][..images.len()];
                    if let (Some(direct), Some(direct_scratch)) =
                        (gradient_direct, scratch.direct.as_mut())
                    {
                        // grad_x = grad_y * flipped, directly per image.
                        let pairs = grad_ys
                            .chunks(out * pixels)
                            .zip(grad_xs.chunks_mut(image_len));
                        for (image_grad, grad_x) in pairs {
                            direct.run(image_grad, &flipped, direct_scratch, grad_x);
                        }
                        continue;
                    }
                    // A direct weight gradient implies a direct input gradient (same shapes).
                    let grad_y = grad_y.expect("direct weight gradient without direct input");
                    if pointwise {
                        // grad_x (in x pixels) = weight^T (in x out) * grad_y.
                        matmul(
                            (grad_xs, pixels),
                            false,
                            Operand::transposed(weight, rows),
                            grad_y,
                            (rows, n, out),
                        );
                    } else {
                        // grad_cols (rows x n) = weight^T (rows x out) * grad_y, then col2im.
                        matmul(
                            (&mut scratch.grad_cols, width),
                            false,
                            Operand::transposed(weight, rows),
                            grad_y,
                            (rows, n, out),
                        );
                        for (j, grad_x) in grad_xs.chunks_mut(image_len).enumerate() {
                            grad_x.fill(0.0);
                            col2im_from(&w, &scratch.grad_cols, width, j * pixels, grad_x);
                        }
                    }
                }
                scratch.grad_weight
            })
            .collect();
        // The partials are column-major (rows x out); the gradient is (out x rows).
        grad_weight.fill(0.0);
        for partial in partials {
            for (r, partial_row) in partial.chunks_exact(out).enumerate() {
                for (o, value) in partial_row.iter().enumerate() {
                    grad_weight[o * rows + r] += value;
                }
            }
        }
    }
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

/// One operand of [`matmul`]: a row-major matrix (whose rows may be longer than the columns
/// used) or the transpose of one.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix whose rows start `row_stride` elements apart.
    fn row_major(data: &'a [f32], row_stride: usize) -> Operand<'a> {
        Operand {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows start `row_stride` elements apart.
    fn transposed(data: &'a [f32], row_stride: usize) -> Operand<'a> {
        Operand {
            data,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    /// One past the largest index a `rows x cols` view reaches.
    fn reach(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return 0;
        }
        (rows - 1) * self.row_stride + (cols - 1) * self.col_stride + 1
    }
}

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)`, `dst` row-major with rows `dst.1` apart,
/// on the calling thread.
fn matmul(
    (dst, dst_row_stride): (&mut [f32], usize),
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    dims: (usize, usize, usize),
) {
    matmul_strided((dst, dst_row_stride, 1), accumulate, lhs, rhs, dims);
}

/// [`matmul`] with a destination of any strides (`dst.1` between rows, `dst.2` between
/// columns). The gemm crate computes a column-major destination without transposing the
/// problem, which decides which operand it packs.
// The gemm crate's entry point takes raw pointers and strides; the asserts make it sound.
#[allow(unsafe_code)]
fn matmul_strided(
    (dst, dst_row_stride, dst_col_stride): (&mut [f32], usize, usize),
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    (m, n, k): (usize, usize, usize),
) {
    let dst_view = Operand {
        data: dst,
        row_stride: dst_row_stride,
        col_stride: dst_col_stride,
    };
    assert!(
        dst_view.reach(m, n) <= dst.len(),
        "matmul: destination too small"
    );
    assert!(
        lhs.reach(m, k) <= lhs.data.len(),
        "matmul: left operand too small"
    );
    assert!(
        rhs.reach(k, n) <= rhs.data.len(),
        "matmul: right operand too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    // Safety: the asserts above bound every index the strides reach in all three matrices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_col_stride as isize,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A depthwise convolution (one `k x k` filter per channel) on the CPU, computed directly:
/// per (image, channel) plane and per tap, one multiply-add over the rows and columns that tap
/// reaches, with no columns at all. Backward: [`DepthwiseBackward`].
#[derive(Clone, Copy, Debug)]
struct DepthwiseConv(Windows);

/// Both gradients of [`DepthwiseConv`] in one buffer: the input's, then the weight's.
#[derive(Clone, Copy, Debug)]
struct DepthwiseBackward(Windows);

/// `DEEPMAD_DEPTHWISE=deepmad` sends fp32 depthwise convolutions on CUDA to deepmad's own kernels
/// (`cuda_kernels.rs`) instead of cuDNN. They pass `deepmad bench --check` on an H200, but are
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
        use crate::cuda_kernels::{f32_view, launch, Arg};
        let w = self.0;
        let device = xs.device.clone();
        let input = f32_view(xs, xs_layout, "depthwise input")?;
        let filter = f32_view(weight, weight_layout, "depthwise weight")?;
        let shape: Shape = (w.batch, w.channels, w.out_height(), w.out_width()).into();
        let n = shape.elem_count();
        // Safety: the kernel writes every output element.
        #[allow(unsafe_code)]
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
        use crate::cuda_kernels::{f32_view, launch, launch_with, Arg};
        let w = self.0;
        let device = xs.device.clone();
        let input = f32_view(xs, xs_layout, "depthwise input")?;
        let filter = f32_view(weight, weight_layout, "depthwise weight")?;
        let grad_ys = f32_view(grad_ys, grad_layout, "depthwise output gradient")?;
        let count = w.batch * w.channels * w.height * w.width;
        let taps = w.channels * w.kernel * w.kernel;
        // Safety: the two kernels write every element (the input gradient, then the taps').
        #[allow(unsafe_code)]
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
fn depthwise_forward(w: &Windows, input: &[f32], weight: &[f32]) -> Vec<f32> {
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
fn depthwise_backward(
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

/// The values of a contiguous f32 CPU tensor; other types and layouts are errors naming `op`.
pub(crate) fn contiguous_f32<'a>(
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

/// Copies the windows of one image (`channels x height x width`) into its columns, one row of
/// `out_plane` values per (channel, tap): row `r` is
/// `cols[r * row_stride + offset..][..out_plane]`. Only in-image positions are written, so the
/// padding positions keep whatever they held (zero, when the scratch was zeroed once).
fn im2col_into(w: &Windows, image: &[f32], cols: &mut [f32], row_stride: usize, offset: usize) {
    let (out_h, out_w) = (w.out_height(), w.out_width());
    if w.stride == 1 && out_h == w.height && out_w == w.width {
        return im2col_same(w, image, cols, row_stride, offset);
    }
    let plane = w.height * w.width;
    let rows = w.channels * w.kernel * w.kernel;
    for row_index in 0..rows {
        let row = &mut cols[row_index * row_stride + offset..][..out_h * out_w];
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

/// [`im2col_into`] for stride 1 and "same" padding, where each row is the channel's plane
/// shifted by `(ky - p) * width + (kx - p)`: one long copy per row, then zeros where the shift
/// ran off the top or bottom (the ends of the row) or wrapped across a side (a few columns per
/// output row). The general loop copies each output row separately, as many short copies.
fn im2col_same(w: &Windows, image: &[f32], cols: &mut [f32], row_stride: usize, offset: usize) {
    let (width, plane, k, p) = (w.width, w.height * w.width, w.kernel, w.padding);
    for row_index in 0..w.channels * k * k {
        let row = &mut cols[row_index * row_stride + offset..][..plane];
        let channel = row_index / (k * k);
        let (ky, kx) = ((row_index / k) % k, row_index % k);
        let source = &image[channel * plane..(channel + 1) * plane];
        let dx = kx as isize - p as isize;
        let shift = (ky as isize - p as isize) * width as isize + dx;
        // row[i] = source[i + shift] for i + shift in 0..plane.
        let lo = (-shift).clamp(0, plane as isize) as usize;
        let hi = (plane as isize - shift).clamp(lo as isize, plane as isize) as usize;
        if lo < hi {
            let start = (lo as isize + shift) as usize;
            row[lo..hi].copy_from_slice(&source[start..start + (hi - lo)]);
        }
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
        // Columns whose tap falls left or right of the image.
        let (left, right) = (dx.min(0).unsigned_abs(), dx.max(0) as usize);
        if left + right > 0 {
            for line in row.chunks_exact_mut(width) {
                line[..left.min(width)].fill(0.0);
                line[width - right.min(width)..].fill(0.0);
            }
        }
    }
}

crate::simd::multiversion! {
/// Adds one image's columns, laid out as in [`im2col_into`], back onto its pixels (the
/// adjoint of im2col).
fn col2im_from(w: &Windows, cols: &[f32], row_stride: usize, offset: usize, image: &mut [f32]) {
    let (out_h, out_w) = (w.out_height(), w.out_width());
    let plane = w.height * w.width;
    let rows = w.channels * w.kernel * w.kernel;
    for row_index in 0..rows {
        let row = &cols[row_index * row_stride + offset..][..out_h * out_w];
        let channel = row_index / (w.kernel * w.kernel);
        let (ky, kx) = ((row_index / w.kernel) % w.kernel, row_index % w.kernel);
        let target = &mut image[channel * plane..(channel + 1) * plane];
        let (y_lo, y_hi, y_first) = valid_range(w, ky, w.height, out_h);
        let (x_lo, x_hi, x_first) = valid_range(w, kx, w.width, out_w);
        for (step, oy) in (y_lo..y_hi).enumerate() {
            let line = &mut target[(y_first + step * w.stride) * w.width..];
            let source = &row[oy * out_w + x_lo..oy * out_w + x_hi];
            if w.stride == 1 {
                // Contiguous on both sides, so the compiler vectorises the adds.
                let target = &mut line[x_first..x_first + source.len()];
                for (pixel, value) in target.iter_mut().zip(source) {
                    *pixel += value;
                }
            } else {
                for (offset, value) in source.iter().enumerate() {
                    line[x_first + offset * w.stride] += value;
                }
            }
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
