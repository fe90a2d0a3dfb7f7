//! Dense convolutions on the CPU: the forward pass and both gradients as custom ops, through
//! the direct stride-1 kernels ([`super::direct`]) where they apply and im2col + gemm
//! ([`super::im2col`], [`super::gemm`]) elsewhere.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::direct::{self, Direct};
use super::gemm::{matmul, matmul_strided, Operand};
use super::im2col::{col2im_from, im2col_into};
use super::Windows;
use super::{contiguous_f32, split_gradients};

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
    pub(super) windows: Windows,
    pub(super) out_channels: usize,
    /// The direct kernel's tiling, for the convolutions that use it ([`DenseConv::direct`]).
    pub(super) simd: direct::Kernel,
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

    /// The direct kernel ([`super::direct`]) for this convolution's forward pass: stride 1,
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
    pub(super) fn forward_values(&self, input: &[f32], weight: &[f32]) -> Vec<f32> {
        let (_, pixels) = self.dims();
        let len = self.windows.batch * self.out_channels * pixels;
        // SAFETY: `forward_into` writes every output element (the products overwrite their
        // destination, beta = 0) before reading any.
        unsafe {
            crate::buffer::filled_by(len, "conv2d", |ys| self.forward_into(input, weight, ys))
        }
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
        // SAFETY: `backward_values` writes every element of both gradients, which tile the
        // buffer, before reading any (the weight gradient is cleared before it is summed into).
        let grads = unsafe {
            crate::buffer::filled_by(len, "conv2d backward", |grads| {
                let (grad_xs, grad_weight) = grads.split_at_mut(input.len());
                self.0
                    .backward_values(input, weight, grad_ys, Some(grad_xs), grad_weight);
            })
        };
        let shape = Shape::from(grads.len());
        Ok((CpuStorage::F32(grads), shape))
    }
}

/// What the backward pass does for one convolution, decided once per call.
struct BackwardPlan {
    /// Rows of the columns (`in * k * k`), output pixels per image, images per product and
    /// columns per product (`group * pixels`).
    rows: usize,
    pixels: usize,
    group: usize,
    width: usize,
    image_len: usize,
    out: usize,
    /// [`DenseConv::pointwise`] and [`DenseConv::transposed_gradient`].
    pointwise: bool,
    transposed: bool,
    input_gradient: bool,
    /// The direct kernel for the input gradient, with the packed flipped weight it runs with.
    gradient_direct: Option<Direct>,
    flipped: Vec<f32>,
    /// The weight gradient on the padded grid, with no im2col, where there is a kernel.
    weight_direct: Option<direct::WeightGradient>,
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
    direct: Option<direct::Scratch>,
}

impl BackwardPlan {
    fn scratch(&self) -> BackwardScratch {
        let sized = |needed: bool, len: usize| if needed { vec![0f32; len] } else { Vec::new() };
        let (pointwise, direct_weights) = (self.pointwise, self.weight_direct.is_some());
        BackwardScratch {
            grad_weight: vec![0f32; self.out * self.rows],
            cols: sized(!pointwise && !direct_weights, self.rows * self.width),
            grad_cols: sized(
                !pointwise && !self.transposed && self.input_gradient,
                self.rows * self.width,
            ),
            grad_y: sized(self.group > 1 && !direct_weights, self.out * self.width),
            direct: self.gradient_direct.map(|direct| direct.scratch()),
        }
    }
}

impl DenseConv {
    /// Writes the weight's gradient (every element) and, when asked for, the input's, from the
    /// forward pass's input and weight and the output's gradient.
    ///
    /// The weight gradient is a sum over images. Each thread sums a fixed, contiguous slice of
    /// the groups in order and the slices' partial sums are added in slice order, so the
    /// summation order, and with it every bit of the result, does not depend on which thread
    /// ran what (a work-stealing fold would make it vary from run to run).
    pub(super) fn backward_values(
        &self,
        input: &[f32],
        weight: &[f32],
        grad_ys: &[f32],
        grad_xs: Option<&mut [f32]>,
        grad_weight: &mut [f32],
    ) {
        let plan = self.backward_plan(weight, grad_xs.is_some());
        let group_len = plan.group * plan.image_len;
        let groups = input.len().div_ceil(group_len);
        let per_slice = groups.div_ceil(rayon::current_num_threads().clamp(1, groups.max(1)));
        let slice_len = per_slice * group_len;
        let grad_x_slices: Vec<Option<&mut [f32]>> = match grad_xs {
            Some(grad_xs) => grad_xs.chunks_mut(slice_len).map(Some).collect(),
            None => (0..input.len().div_ceil(slice_len)).map(|_| None).collect(),
        };
        let partials: Vec<Vec<f32>> = grad_x_slices
            .into_par_iter()
            .zip(input.par_chunks(slice_len))
            .zip(grad_ys.par_chunks(per_slice * plan.group * plan.out * plan.pixels))
            .map(|((grad_xs, input), grad_ys)| {
                self.backward_slice(&plan, weight, input, grad_ys, grad_xs)
            })
            .collect();
        // The partials are column-major (rows x out); the gradient is (out x rows).
        grad_weight.fill(0.0);
        for partial in partials {
            for (r, partial_row) in partial.chunks_exact(plan.out).enumerate() {
                for (o, value) in partial_row.iter().enumerate() {
                    grad_weight[o * plan.rows + r] += value;
                }
            }
        }
    }

    fn backward_plan(&self, weight: &[f32], input_gradient: bool) -> BackwardPlan {
        let (rows, pixels) = self.dims();
        let group = self.group();
        let gradient_direct = self.gradient_direct().filter(|_| input_gradient);
        BackwardPlan {
            rows,
            pixels,
            group,
            width: group * pixels,
            image_len: self.image_len(),
            out: self.out_channels,
            pointwise: self.pointwise(),
            transposed: self.transposed_gradient(),
            input_gradient,
            flipped: gradient_direct
                .map(|direct| direct.pack(&self.flipped_weight(weight)))
                .unwrap_or_default(),
            gradient_direct,
            weight_direct: self.direct().and_then(|direct| direct.weight_gradient()),
        }
    }

    /// One slice's partial weight gradient (column-major, `rows x out`), and its images' input
    /// gradients when `grad_xs` is given.
    fn backward_slice(
        &self,
        plan: &BackwardPlan,
        weight: &[f32],
        input: &[f32],
        grad_ys: &[f32],
        mut grad_xs: Option<&mut [f32]>,
    ) -> Vec<f32> {
        let mut scratch = plan.scratch();
        let (image_len, out, pixels, group) = (plan.image_len, plan.out, plan.pixels, plan.group);
        if let Some(direct) = &plan.weight_direct {
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
            // The weight gradient's share of the group, unless computed above; the output
            // gradients as an operand for the input gradient's products.
            let grad_y = plan.weight_direct.is_none().then(|| {
                let (cols, grad_y) = (&mut scratch.cols, &mut scratch.grad_y);
                self.group_weight_gradient(
                    plan,
                    images,
                    grad_ys,
                    cols,
                    grad_y,
                    &mut scratch.grad_weight,
                )
            });
            let Some(grad_xs) = grad_xs.as_deref_mut() else {
                continue;
            };
            let grad_xs = &mut grad_xs[index * group * image_len..][..images.len()];
            let buffers = (scratch.grad_cols.as_mut_slice(), scratch.direct.as_mut());
            self.group_input_gradient(plan, weight, grad_ys, grad_y, grad_xs, buffers);
        }
        scratch.grad_weight
    }

    /// Adds one group's share to the weight gradient (column-major, `rows x out`) through its
    /// columns, and returns the group's output gradients as a product operand.
    fn group_weight_gradient<'a>(
        &self,
        plan: &BackwardPlan,
        images: &'a [f32],
        grad_ys: &'a [f32],
        cols: &'a mut [f32],
        grad_y_buffer: &'a mut [f32],
        grad_weight: &mut [f32],
    ) -> Operand<'a> {
        let (pixels, width, out, rows) = (plan.pixels, plan.width, plan.out, plan.rows);
        let count = images.len() / plan.image_len;
        let cols: &[f32] = if plan.pointwise {
            images
        } else {
            for (j, image) in images.chunks(plan.image_len).enumerate() {
                im2col_into(&self.windows, image, cols, width, j * pixels);
            }
            cols
        };
        // The group's output gradients side by side, as the forward's product (a single
        // image's gradient already is).
        let grad_y = if count == 1 {
            Operand::row_major(grad_ys, pixels)
        } else {
            for (j, image_grad) in grad_ys.chunks(out * pixels).enumerate() {
                for (o, plane) in image_grad.chunks(pixels).enumerate() {
                    grad_y_buffer[o * width + j * pixels..][..pixels].copy_from_slice(plane);
                }
            }
            Operand::row_major(grad_y_buffer, width)
        };
        let cols_stride = if plan.pointwise { pixels } else { width };
        // grad_weight (out x rows) += grad_y (out x n) * cols^T (n x rows), accumulated
        // column-major (as rows x out): the gemm crate then packs grad_y, `out` rows, instead
        // of the columns, `in * k * k` rows.
        matmul_strided(
            (grad_weight, 1, out),
            true,
            grad_y,
            Operand::transposed(cols, cols_stride),
            (out, rows, count * pixels),
        );
        grad_y
    }

    /// Writes one group's input gradients: directly per image where there is a kernel,
    /// otherwise as a product with the transposed weight (and a col2im unless pointwise).
    fn group_input_gradient(
        &self,
        plan: &BackwardPlan,
        weight: &[f32],
        grad_ys: &[f32],
        grad_y: Option<Operand>,
        grad_xs: &mut [f32],
        (grad_cols, direct_scratch): (&mut [f32], Option<&mut direct::Scratch>),
    ) {
        let (pixels, width, out, rows) = (plan.pixels, plan.width, plan.out, plan.rows);
        if let (Some(direct), Some(direct_scratch)) = (plan.gradient_direct, direct_scratch) {
            // grad_x = grad_y * flipped, directly per image.
            let pairs = grad_ys
                .chunks(out * pixels)
                .zip(grad_xs.chunks_mut(plan.image_len));
            for (image_grad, grad_x) in pairs {
                direct.run(image_grad, &plan.flipped, direct_scratch, grad_x);
            }
            return;
        }
        // A direct weight gradient implies a direct input gradient (same shapes).
        let grad_y = grad_y.expect("direct weight gradient without direct input");
        let n = grad_xs.len() / plan.image_len * pixels;
        if plan.pointwise {
            // grad_x (in x pixels) = weight^T (in x out) * grad_y.
            let lhs = Operand::transposed(weight, rows);
            matmul((grad_xs, pixels), false, lhs, grad_y, (rows, n, out));
            return;
        }
        // grad_cols (rows x n) = weight^T (rows x out) * grad_y, then col2im.
        let lhs = Operand::transposed(weight, rows);
        matmul((grad_cols, width), false, lhs, grad_y, (rows, n, out));
        for (j, grad_x) in grad_xs.chunks_mut(plan.image_len).enumerate() {
            grad_x.fill(0.0);
            col2im_from(&self.windows, grad_cols, width, j * pixels, grad_x);
        }
    }
}
