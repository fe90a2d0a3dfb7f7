//! Convolution + BatchNorm (+ residual add) (+ activation) as one CUDA training op: the CUDA twin
//! of [`crate::conv_bn`].
//!
//! Why: candle's backward pass accumulates every gradient that flows along an edge of the graph
//! into a fresh zero tensor (a memset, then its generic `badd` kernel). As separate ops (cuDNN
//! convolution, cuDNN BatchNorm, add, activation), a basic block's layer had five such edges the
//! size of its activations. Measured on an H200 (`docs/performance.md`), those adds were the
//! largest single kernel of the bottleneck design's step at batch 512 (9 of 36 ms of GPU time,
//! 492 launches a step), and their launches and allocations most of the host's time at batch
//! 128. As one op, the intermediate gradients are scratch buffers inside its backward pass and
//! the graph keeps three edges: the input, the parameters, the residual.
//!
//! Forward: cuDNN's convolution, cuDNN's BatchNorm training pass, then one kernel for the
//! residual add and the activation. Backward: one kernel for the activation's gradient (written
//! straight into the residual's gradient when there is a residual), cuDNN's BatchNorm backward
//! and the convolution's two backward calls, all writing into one result buffer. The input
//! gradient is skipped when the input tracks none (the network's input).
//!
//! **Opt-in, not yet run on a GPU**: it was written after the session's GPU machine was taken
//! back, so only the CUDA build and the CPU twin's tests vouch for it. Training uses it with
//! `DEEPMAD_CUDA_CONV_BN=fused` ([`enabled`]); `deepmad bench --check --device cuda` compares it
//! with candle's ops whatever the setting, and `bench/gpu_check.sh` checks and times both
//! paths. Make it the default once that passes and is faster.
//!
//! The inputs and the saved state mirror the CPU op: one parameter tensor (the flattened
//! weight, then BatchNorm's weight and bias), the convolution's output kept in the op, and the
//! batch statistics in a [`BatchNormStash`] for the running statistics.

// Like cuda/cudnn.rs, this passes raw device buffers to cuDNN and allocates buffers that cuDNN or a
// kernel fills; each unsafe block says why it is sound.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use deepmad_design::Activation;

use crate::batch_norm::cudnn::{
    batch_norm_backward_raw, batch_norm_forward_raw, BatchNormSaved, BatchNormStash, BnBackward,
    BnForward,
};
use crate::conv::cudnn::{launch_conv, ConvGeometry, Pass};
use crate::cuda::cudnn::{cpu_unsupported, view};
use crate::cuda::{launch, Arg};

/// Whether `DEEPMAD_CUDA_CONV_BN` chose the fused op: `fused`, or `separate` (the default:
/// cuDNN's convolution and BatchNorm, then the add and the activation, as separate ops). Read
/// once; another value is an error naming the variable.
pub(crate) fn enabled() -> candle_core::Result<bool> {
    static FUSED: std::sync::OnceLock<Result<bool, String>> = std::sync::OnceLock::new();
    FUSED
        .get_or_init(|| match std::env::var("DEEPMAD_CUDA_CONV_BN").as_deref() {
            Err(_) | Ok("") | Ok("separate") => Ok(false),
            Ok("fused") => Ok(true),
            Ok(other) => Err(format!(
                "DEEPMAD_CUDA_CONV_BN={other:?}: expected \"fused\" or \"separate\""
            )),
        })
        .clone()
        .map_err(candle_core::Error::Msg)
}

/// Returns `act(bn(conv(xs, weight)) + residual)` with batch statistics, differentiable in
/// `xs`, `weight`, `bn_weight`, `bn_bias` and `residual`, and where the batch statistics are
/// (for [`crate::batch_norm::cudnn::update_running_statistics`]). All tensors are f32 on one CUDA device.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train(
    xs: &Tensor,
    weight: &Tensor,
    (stride, padding, groups): (usize, usize, usize),
    bn_weight: &Tensor,
    bn_bias: &Tensor,
    residual: Option<&Tensor>,
    activation: Option<Activation>,
    eps: f64,
) -> candle_core::Result<(Tensor, BatchNormStash)> {
    let (windows, out_channels) = crate::layout::Windows::of(xs, weight, stride, padding)?;
    let geometry = ConvGeometry::new(windows, out_channels, groups);
    let stash: BatchNormStash = Arc::default();
    let op = ConvBnAct {
        geometry,
        activation,
        eps,
        saved: Arc::new(Mutex::new(None)),
        stash: Arc::clone(&stash),
    };
    let params = super::params(weight, bn_weight, bn_bias)?;
    let ys = super::apply(xs, &params, residual, &geometry.output_shape(), op)?;
    Ok((ys, stash))
}

/// What the forward pass leaves for the backward pass.
struct Saved {
    /// The convolution's output, BatchNorm's input.
    conv_out: CudaSlice<f32>,
    /// BatchNorm's output, kept only for SiLU, whose gradient needs its input (ReLU's and
    /// ReLU6's are read from the op's output).
    bn_out: Option<CudaSlice<f32>>,
    stats: Arc<BatchNormSaved>,
}

#[derive(Clone)]
struct ConvBnAct {
    geometry: ConvGeometry,
    activation: Option<Activation>,
    eps: f64,
    saved: Arc<Mutex<Option<Saved>>>,
    stash: BatchNormStash,
}

/// The gradients from `(input, params, output gradient)`, in one buffer: the input's (only when
/// `input_gradient`), the parameters' and, with a residual, the residual's.
struct ConvBnActBackward {
    forward: ConvBnAct,
    input_gradient: bool,
    residual: Option<Tensor>,
    ys: Tensor,
}

fn activation_code(activation: Option<Activation>) -> i32 {
    match activation {
        None => 0,
        Some(Activation::Relu) => 1,
        Some(Activation::Relu6) => 2,
        Some(Activation::Silu) => 3,
    }
}

/// The f32 data of a tensor an op holds (the residual, the output), from its storage.
fn held_view<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    shape: &Shape,
    what: &str,
) -> candle_core::Result<cudarc::driver::CudaView<'a, f32>> {
    let candle_core::Storage::Cuda(storage) = storage else {
        candle_core::bail!("{what}: a tensor it holds is not on a CUDA device");
    };
    view(storage, layout, shape, what)
}

impl ConvBnAct {
    fn channels(&self) -> usize {
        self.geometry.output_shape().dims()[1]
    }

    fn weight_len(&self) -> usize {
        self.geometry.weight_shape().elem_count()
    }

    fn forward(
        &self,
        (xs, xs_layout): (&CudaStorage, &Layout),
        (params, params_layout): (&CudaStorage, &Layout),
        residual: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let what = "conv + batch norm";
        let g = self.geometry;
        let channels = self.channels();
        let weight_len = self.weight_len();
        let shape = g.output_shape();
        let n = shape.elem_count();
        let device = xs.device.clone();
        let stream = device.cuda_stream();
        let input = view(xs, xs_layout, &g.input_shape(), what)?;
        let params = view(
            params,
            params_layout,
            &(weight_len + 2 * channels).into(),
            what,
        )?;
        let residual = residual
            .map(|(storage, layout)| view(storage, layout, &shape, what))
            .transpose()?;
        let weight = params.slice(..weight_len);
        // SAFETY: uninitialised device memory; cuDNN's convolution writes every element of it
        // on the next line, before anything reads it.
        let mut conv_out = unsafe { device.alloc::<f32>(n)? };
        launch_conv(&device, g, Pass::Forward, &input, &weight, &mut conv_out)?;
        // SAFETY: uninitialised; cuDNN's BatchNorm forward below writes every element.
        let mut bn_out = unsafe { device.alloc::<f32>(n)? };
        // SAFETY: uninitialised; the same call writes the batch mean of every channel.
        let mut mean = unsafe { device.alloc::<f32>(channels)? };
        // SAFETY: uninitialised; the same call writes every channel's inverse deviation.
        let mut inv_std = unsafe { device.alloc::<f32>(channels)? };
        {
            let affine = params.slice(weight_len..);
            let (x, _x) = conv_out.device_ptr(&stream);
            let (y, _y) = bn_out.device_ptr_mut(&stream);
            let (affine, _a) = affine.device_ptr(&stream);
            let (mean, _m) = mean.device_ptr_mut(&stream);
            let (inv_std, _s) = inv_std.device_ptr_mut(&stream);
            let float = std::mem::size_of::<f32>() as u64;
            let pointers = BnForward {
                x,
                y,
                weight: affine,
                bias: affine + channels as u64 * float,
                mean,
                inv_std,
            };
            // SAFETY: live buffers of the sizes the shape names, held by the guards above.
            unsafe { batch_norm_forward_raw(&device, &shape, self.eps, pointers) }?;
        }
        let ys = match (&residual, self.activation) {
            // No residual, no activation: BatchNorm's output is the op's.
            (None, None) => {
                let ys = bn_out;
                self.keep(conv_out, None, mean, inv_std);
                return Ok((CudaStorage::wrap_cuda_slice(ys, device), shape));
            }
            (None, Some(activation)) => {
                // SAFETY: uninitialised; the activation kernel writes all `n` elements.
                let mut ys = unsafe { device.alloc::<f32>(n)? };
                let z = bn_out.slice(..);
                let name = crate::activation::kernel_name(activation, false);
                let mut out = ys.slice_mut(..);
                let mut args = [Arg::Out(&mut out), Arg::In(&z), Arg::U32(n as u32)];
                launch(&device, name, n, &mut args)?;
                ys
            }
            (Some(residual), activation) => {
                // SAFETY: uninitialised; the add + activation kernel writes all `n` elements.
                let mut ys = unsafe { device.alloc::<f32>(n)? };
                let z = bn_out.slice(..);
                let mut out = ys.slice_mut(..);
                let mut args = [
                    Arg::Out(&mut out),
                    Arg::In(&z),
                    Arg::In(residual),
                    Arg::U32(n as u32),
                    Arg::I32(activation_code(activation)),
                ];
                launch(&device, "deepmad_add_act", n, &mut args)?;
                ys
            }
        };
        let bn_out = (self.activation == Some(Activation::Silu)).then_some(bn_out);
        self.keep(conv_out, bn_out, mean, inv_std);
        Ok((CudaStorage::wrap_cuda_slice(ys, device), shape))
    }

    /// Keeps what the backward pass and the running statistics need.
    fn keep(
        &self,
        conv_out: CudaSlice<f32>,
        bn_out: Option<CudaSlice<f32>>,
        mean: CudaSlice<f32>,
        inv_std: CudaSlice<f32>,
    ) {
        let stats = Arc::new(BatchNormSaved { mean, inv_std });
        *self.stash.lock().expect("no panic while holding the lock") = Some(Arc::clone(&stats));
        *self.saved.lock().expect("no panic while holding the lock") = Some(Saved {
            conv_out,
            bn_out,
            stats,
        });
    }

    fn backward(
        &self,
        xs: &Tensor,
        params: &Tensor,
        residual: Option<&Tensor>,
        ys: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        // The network's input (no variable, no op behind it) needs no gradient.
        let input_gradient = xs.track_op();
        let op = ConvBnActBackward {
            forward: self.clone(),
            input_gradient,
            residual: residual.cloned(),
            ys: ys.clone(),
        };
        let flat = xs.apply_op3_no_bwd(params, &grad.contiguous()?, &op)?;
        super::split_gradients(&flat, xs, params, residual, input_gradient)
    }
}

impl CustomOp2 for ConvBnAct {
    fn name(&self) -> &'static str {
        "deepmad-cudnn-conv-batch-norm-act"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_unsupported(CustomOp2::name(self))
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xs_layout: &Layout,
        params: &CudaStorage,
        params_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.forward((xs, xs_layout), (params, params_layout), None)
    }

    fn bwd(
        &self,
        xs: &Tensor,
        params: &Tensor,
        ys: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dparams, _) = self.backward(xs, params, None, ys, grad)?;
        Ok((dx, Some(dparams)))
    }
}

impl CustomOp3 for ConvBnAct {
    fn name(&self) -> &'static str {
        "deepmad-cudnn-conv-batch-norm-add-act"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_unsupported(CustomOp3::name(self))
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xs_layout: &Layout,
        params: &CudaStorage,
        params_layout: &Layout,
        residual: &CudaStorage,
        residual_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
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
        ys: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dparams, dresidual) = self.backward(xs, params, Some(residual), ys, grad)?;
        Ok((dx, Some(dparams), dresidual))
    }
}

impl CustomOp3 for ConvBnActBackward {
    fn name(&self) -> &'static str {
        "deepmad-cudnn-conv-batch-norm-act-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xs_layout: &Layout,
        params: &CudaStorage,
        params_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let what = "conv + batch norm backward";
        let forward = &self.forward;
        let g = forward.geometry;
        let channels = forward.channels();
        let weight_len = forward.weight_len();
        let shape = g.output_shape();
        let n_out = shape.elem_count();
        let device = xs.device.clone();
        let stream = device.cuda_stream();
        let input = view(xs, xs_layout, &g.input_shape(), what)?;
        let params_len = weight_len + 2 * channels;
        let params = view(params, params_layout, &params_len.into(), what)?;
        let grad = view(grad, grad_layout, &shape, what)?;
        let residual_storage = self.residual.as_ref().map(Tensor::storage_and_layout);
        let residual = residual_storage
            .as_ref()
            .map(|(storage, layout)| held_view(storage, layout, &shape, what))
            .transpose()?;
        let (ys_storage, ys_layout) = self.ys.storage_and_layout();
        let ys = held_view(&ys_storage, ys_layout, &shape, what)?;
        let saved = forward
            .saved
            .lock()
            .expect("no panic while holding the lock");
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("{what}: the op ran no forward pass");
        };
        let n_in = if self.input_gradient {
            g.input_shape().elem_count()
        } else {
            0
        };
        let len = n_in + params_len + residual.as_ref().map_or(0, |_| n_out);
        // SAFETY: uninitialised device memory; cuDNN and the kernels below write every element
        // before anything reads it: the input gradient (backward-data), the parameters'
        // (backward-filter, BatchNorm's backward) and the residual's (the activation's gradient
        // or a copy of the output gradient).
        let mut out = unsafe { device.alloc::<f32>(len)? };
        let (mut dx, mut rest) = out.split_at_mut(n_in);
        let (mut dparams, mut dresidual) = rest.split_at_mut(params_len);
        // The gradient at BatchNorm's output: the residual's gradient when there is one.
        let mut scratch = None;
        match forward.activation {
            Some(activation) => {
                let mut target = match residual {
                    Some(_) => dresidual.slice_mut(..),
                    None => scratch
                        // SAFETY: uninitialised; the activation's gradient kernel writes all
                        // `n_out` elements before BatchNorm's backward reads them.
                        .insert(unsafe { device.alloc::<f32>(n_out)? })
                        .slice_mut(..),
                };
                let n = n_out as u32;
                match (activation, &residual, &saved.bn_out) {
                    (Activation::Silu, Some(residual), Some(z)) => {
                        let z = z.slice(..);
                        let mut args = [
                            Arg::Out(&mut target),
                            Arg::In(&z),
                            Arg::In(residual),
                            Arg::In(&grad),
                            Arg::U32(n),
                        ];
                        launch(&device, "deepmad_silu_backward_sum", n_out, &mut args)?;
                    }
                    (Activation::Silu, None, Some(z)) => {
                        let z = z.slice(..);
                        let name = crate::activation::kernel_name(activation, true);
                        let mut args = [
                            Arg::Out(&mut target),
                            Arg::In(&z),
                            Arg::In(&grad),
                            Arg::U32(n),
                        ];
                        launch(&device, name, n_out, &mut args)?;
                    }
                    (Activation::Silu, _, None) => {
                        candle_core::bail!("{what}: SiLU's input was not kept")
                    }
                    // ReLU and ReLU6 pass the gradient where their output is inside (0, 6)
                    // or above 0, the same set as for their input.
                    (Activation::Relu | Activation::Relu6, _, _) => {
                        let name = crate::activation::kernel_name(activation, true);
                        let mut args = [
                            Arg::Out(&mut target),
                            Arg::In(&ys),
                            Arg::In(&grad),
                            Arg::U32(n),
                        ];
                        launch(&device, name, n_out, &mut args)?;
                    }
                }
            }
            None => {
                if residual.is_some() {
                    stream
                        .memcpy_dtod(&grad, &mut dresidual)
                        .map_err(|error| candle_core::Error::Cuda(Box::new(error)))?;
                }
            }
        }
        // BatchNorm's input gradient is the convolution's output gradient: scratch only.
        // SAFETY: uninitialised; BatchNorm's backward writes every element before the
        // convolution's backward calls read it.
        let mut grad_conv_out = unsafe { device.alloc::<f32>(n_out)? };
        {
            let (x, _x) = saved.conv_out.device_ptr(&stream);
            let (dy, _dy) = match (&scratch, &residual) {
                (Some(scratch), _) => scratch.device_ptr(&stream),
                (None, Some(_)) => dresidual.device_ptr(&stream),
                (None, None) => grad.device_ptr(&stream),
            };
            let affine = params.slice(weight_len..);
            let (affine, _a) = affine.device_ptr(&stream);
            let (mean, _m) = saved.stats.mean.device_ptr(&stream);
            let (inv_std, _s) = saved.stats.inv_std.device_ptr(&stream);
            let (dx_bn, _g) = grad_conv_out.device_ptr_mut(&stream);
            let mut daffine = dparams.slice_mut(weight_len..);
            let (daffine, _d) = daffine.device_ptr_mut(&stream);
            let float = std::mem::size_of::<f32>() as u64;
            let pointers = BnBackward {
                x,
                dy,
                weight: affine,
                mean,
                inv_std,
                dx: dx_bn,
                dweight: daffine,
                dbias: daffine + channels as u64 * float,
            };
            // SAFETY: live buffers of the sizes the shape names, held by the guards above.
            unsafe { batch_norm_backward_raw(&device, &shape, forward.eps, pointers) }?;
        }
        let mut dweight = dparams.slice_mut(..weight_len);
        launch_conv(
            &device,
            g,
            Pass::BackwardFilter,
            &input,
            &grad_conv_out,
            &mut dweight,
        )?;
        if self.input_gradient {
            let weight = params.slice(..weight_len);
            launch_conv(
                &device,
                g,
                Pass::BackwardData,
                &weight,
                &grad_conv_out,
                &mut dx,
            )?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(len)))
    }
}
