//! BatchNorm's training pass on CUDA through cuDNN: `cudnnBatchNormalizationForwardTraining`
//! forward and `cudnnBatchNormalizationBackward` backward, one kernel each instead of candle's
//! chain of reductions and broadcasts, and the running statistics updated by one kernel of
//! `cuda/mod.rs`. cudarc's safe API has no BatchNorm, so the calls go through its `result`
//! functions on this thread's raw handle (`cuda::cudnn::with_raw`). The raw forward and
//! backward calls are shared with the fused convolution + BatchNorm op (`conv_bn/cudnn.rs`).

use std::sync::Arc;

use candle_core::cuda::CudaDevice;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape, Tensor};
use cudarc::cudnn::sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use crate::cuda::cudnn::{cpu_unsupported, cudnn_error, view, with_raw};

/// What cuDNN's BatchNorm training pass saves for its backward pass: the batch mean and the
/// inverse standard deviation, per channel.
#[derive(Debug)]
pub struct BatchNormSaved {
    pub(crate) mean: CudaSlice<f32>,
    pub(crate) inv_std: CudaSlice<f32>,
}

/// Where one BatchNorm forward call leaves [`BatchNormSaved`] for its backward pass and for the
/// running statistics.
pub type BatchNormStash = Arc<std::sync::Mutex<Option<Arc<BatchNormSaved>>>>;

/// BatchNorm's training pass over NCHW `xs` by `cudnnBatchNormalizationForwardTraining`
/// (spatial mode, batch statistics), with `cudnnBatchNormalizationBackward` as its backward.
/// Returns the output and where the batch statistics are, for [`update_running_statistics`].
pub fn batch_norm_train(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, BatchNormStash)> {
    let stash: BatchNormStash = Arc::default();
    let op = BatchNormForward {
        eps,
        stash: Arc::clone(&stash),
    };
    let ys = xs
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    Ok((ys, stash))
}

/// PyTorch's running-statistics update from a [`batch_norm_train`] call, in place, one kernel
/// each: `running = (1 - momentum) * running + momentum * batch`, with the unbiased variance
/// (`count` values per channel).
pub fn update_running_statistics(
    running_mean: &Tensor,
    running_var: &Tensor,
    stash: BatchNormStash,
    momentum: f64,
    eps: f64,
    count: usize,
) -> candle_core::Result<()> {
    let saved = stash
        .lock()
        .expect("no panic while holding the lock")
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("batch norm: no forward ran".into()))?;
    running_mean.inplace_op1(&RunningUpdate {
        saved: Arc::clone(&saved),
        momentum: momentum as f32,
        variance: None,
    })?;
    running_var.inplace_op1(&RunningUpdate {
        saved,
        momentum: momentum as f32,
        variance: Some((eps as f32, (count as f64 / (count - 1) as f64) as f32)),
    })
}

/// Updates a running mean (or, with `variance: Some((eps, count / (count - 1)))`, a running
/// variance) from the statistics cuDNN saved.
struct RunningUpdate {
    saved: Arc<BatchNormSaved>,
    momentum: f32,
    variance: Option<(f32, f32)>,
}

impl candle_core::InplaceOp1 for RunningUpdate {
    fn name(&self) -> &'static str {
        "deepmad-batch-norm-running-statistics"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("{} runs on CUDA tensors only", self.name())
    }

    fn cuda_fwd(&self, running: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        use crate::cuda::{f32_view_mut, launch, Arg};
        let device = running.device.clone();
        let n = layout.shape().elem_count();
        let mut out = f32_view_mut(running, layout, "running statistics")?;
        let momentum = self.momentum;
        match self.variance {
            None => {
                let mean = self.saved.mean.slice(..);
                let mut args = [
                    Arg::Out(&mut out),
                    Arg::In(&mean),
                    Arg::U32(n as u32),
                    Arg::F32(momentum),
                ];
                launch(&device, "deepmad_running_mean", n, &mut args)
            }
            Some((eps, unbias)) => {
                let inv_std = self.saved.inv_std.slice(..);
                let mut args = [
                    Arg::Out(&mut out),
                    Arg::In(&inv_std),
                    Arg::U32(n as u32),
                    Arg::F32(momentum),
                    Arg::F32(eps),
                    Arg::F32(unbias),
                ];
                launch(&device, "deepmad_running_var", n, &mut args)
            }
        }
    }
}

struct BatchNormForward {
    eps: f64,
    stash: BatchNormStash,
}

struct BatchNormBackward {
    eps: f64,
    saved: Arc<BatchNormSaved>,
}

impl CustomOp3 for BatchNormForward {
    fn name(&self) -> &'static str {
        "deepmad-cudnn-batch-norm"
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
        weight: &CudaStorage,
        weight_layout: &Layout,
        bias: &CudaStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let shape = xs_layout.shape().clone();
        let (_, channels, _, _) = shape.dims4()?;
        let device = xs.device.clone();
        let xs = view(xs, xs_layout, &shape, "batch norm input")?;
        let weight = view(weight, weight_layout, &channels.into(), "batch norm weight")?;
        let bias = view(bias, bias_layout, &channels.into(), "batch norm bias")?;
        let stream = device.cuda_stream();
        // SAFETY: uninitialised device memory; cuDNN's forward call below writes every element
        // of the output before anything reads it.
        let mut ys = unsafe { device.alloc::<f32>(shape.elem_count())? };
        // SAFETY: as above: cuDNN writes the batch mean of every channel.
        let mut mean = unsafe { device.alloc::<f32>(channels)? };
        // SAFETY: as above: cuDNN writes the inverse standard deviation of every channel.
        let mut inv_std = unsafe { device.alloc::<f32>(channels)? };
        {
            let (x, _x) = xs.device_ptr(&stream);
            let (y, _y) = ys.device_ptr_mut(&stream);
            let (weight, _w) = weight.device_ptr(&stream);
            let (bias, _b) = bias.device_ptr(&stream);
            let (mean, _m) = mean.device_ptr_mut(&stream);
            let (inv_std, _s) = inv_std.device_ptr_mut(&stream);
            let pointers = BnForward {
                x,
                y,
                weight,
                bias,
                mean,
                inv_std,
            };
            // SAFETY: live device buffers of the sizes `shape` names, held by the guards above.
            unsafe { batch_norm_forward_raw(&device, &shape, self.eps, pointers) }?;
        }
        let saved = Arc::new(BatchNormSaved { mean, inv_std });
        *self.stash.lock().expect("no panic while holding the lock") = Some(saved);
        Ok((CudaStorage::wrap_cuda_slice(ys, device), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _ys: &Tensor,
        grad_ys: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .stash
            .lock()
            .expect("no panic while holding the lock")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("batch norm: backward before forward".into()))?;
        let op = BatchNormBackward {
            eps: self.eps,
            saved,
        };
        // One buffer: the input gradient, then the weight's, then the bias's.
        let flat = xs.apply_op3_no_bwd(weight, &grad_ys.contiguous()?, &op)?;
        let count = xs.elem_count();
        let channels = weight.elem_count();
        let grad_xs = flat.narrow(0, 0, count)?.reshape(xs.shape())?;
        let grad_weight = flat.narrow(0, count, channels)?;
        let grad_bias = flat.narrow(0, count + channels, channels)?;
        Ok((Some(grad_xs), Some(grad_weight), Some(grad_bias)))
    }
}

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "deepmad-cudnn-batch-norm-backward"
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
        weight: &CudaStorage,
        weight_layout: &Layout,
        grad_ys: &CudaStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let shape = xs_layout.shape().clone();
        let (_, channels, _, _) = shape.dims4()?;
        let count = shape.elem_count();
        let device = xs.device.clone();
        let xs = view(xs, xs_layout, &shape, "batch norm input")?;
        let weight = view(weight, weight_layout, &channels.into(), "batch norm weight")?;
        let grad_ys = view(grad_ys, grad_layout, &shape, "batch norm output gradient")?;
        let stream = device.cuda_stream();
        // SAFETY: cuDNN writes every element (beta = 0 for data and parameter gradients).
        let mut out = unsafe { device.alloc::<f32>(count + 2 * channels)? };
        {
            let (x, _x) = xs.device_ptr(&stream);
            let (dy, _dy) = grad_ys.device_ptr(&stream);
            let (weight, _w) = weight.device_ptr(&stream);
            let (mean, _m) = self.saved.mean.device_ptr(&stream);
            let (inv_std, _s) = self.saved.inv_std.device_ptr(&stream);
            let (out_ptr, _out) = out.device_ptr_mut(&stream);
            let float = std::mem::size_of::<f32>() as u64;
            let pointers = BnBackward {
                x,
                dy,
                weight,
                mean,
                inv_std,
                dx: out_ptr,
                dweight: out_ptr + count as u64 * float,
                dbias: out_ptr + (count + channels) as u64 * float,
            };
            // SAFETY: live device buffers, held by the guards above; `out` holds count + 2 *
            // channels floats.
            unsafe { batch_norm_backward_raw(&device, &shape, self.eps, pointers) }?;
        }
        let shape = Shape::from(count + 2 * channels);
        Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
    }
}

/// Device addresses (of f32 buffers) for [`batch_norm_forward_raw`].
pub(crate) struct BnForward {
    pub x: u64,
    pub y: u64,
    pub weight: u64,
    pub bias: u64,
    /// Written: the batch mean and inverse standard deviation per channel.
    pub mean: u64,
    pub inv_std: u64,
}

/// `cudnnBatchNormalizationForwardTraining` (spatial mode, batch statistics, no running
/// statistics: deepmad updates them itself) on NCHW data of `shape`.
///
/// # Safety
/// Every pointer must address a live f32 device buffer on `device`'s stream: `x` and `y` of
/// `shape`'s size, the others of its channel count.
pub(crate) unsafe fn batch_norm_forward_raw(
    device: &CudaDevice,
    shape: &Shape,
    eps: f64,
    p: BnForward,
) -> candle_core::Result<()> {
    use std::ffi::c_void;
    with_raw_batch_norm(device, shape, |handle, data, params| {
        let (one, zero) = (1f32, 0f32);
        // SAFETY: the caller guarantees the buffers; the descriptors match `shape`.
        unsafe {
            sys::cudnnBatchNormalizationForwardTraining(
                handle,
                sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                (&one as *const f32).cast(),
                (&zero as *const f32).cast(),
                data,
                p.x as *const c_void,
                data,
                p.y as *mut c_void,
                params,
                p.weight as *const c_void,
                p.bias as *const c_void,
                0.0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                eps,
                p.mean as *mut c_void,
                p.inv_std as *mut c_void,
            )
        }
        .result()
        .map_err(cudnn_error)
    })
}

/// Device addresses (of f32 buffers) for [`batch_norm_backward_raw`].
pub(crate) struct BnBackward {
    pub x: u64,
    pub dy: u64,
    pub weight: u64,
    pub mean: u64,
    pub inv_std: u64,
    /// Written: the input gradient and the weight's and bias's.
    pub dx: u64,
    pub dweight: u64,
    pub dbias: u64,
}

/// `cudnnBatchNormalizationBackward` with the statistics the forward pass saved; writes every
/// element of the three gradients (beta = 0).
///
/// # Safety
/// As [`batch_norm_forward_raw`]: `x`, `dy` and `dx` of `shape`'s size, the others of its
/// channel count.
pub(crate) unsafe fn batch_norm_backward_raw(
    device: &CudaDevice,
    shape: &Shape,
    eps: f64,
    p: BnBackward,
) -> candle_core::Result<()> {
    use std::ffi::c_void;
    with_raw_batch_norm(device, shape, |handle, data, params| {
        let (one, zero) = (1f32, 0f32);
        // SAFETY: the caller guarantees the buffers; the descriptors match `shape`.
        unsafe {
            sys::cudnnBatchNormalizationBackward(
                handle,
                sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                (&one as *const f32).cast(),
                (&zero as *const f32).cast(),
                (&one as *const f32).cast(),
                (&zero as *const f32).cast(),
                data,
                p.x as *const c_void,
                data,
                p.dy as *const c_void,
                data,
                p.dx as *mut c_void,
                params,
                p.weight as *const c_void,
                p.dweight as *mut c_void,
                p.dbias as *mut c_void,
                eps,
                p.mean as *const c_void,
                p.inv_std as *const c_void,
            )
        }
        .result()
        .map_err(cudnn_error)
    })
}

fn with_raw_batch_norm(
    device: &CudaDevice,
    shape: &Shape,
    launch: impl FnOnce(
        sys::cudnnHandle_t,
        sys::cudnnTensorDescriptor_t,
        sys::cudnnTensorDescriptor_t,
    ) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    use cudarc::cudnn::result;
    let (n, c, h, w) = shape.dims4()?;
    with_raw(device, |state| {
        let key = [n, c, h, w];
        if let std::collections::hash_map::Entry::Vacant(slot) = state.descriptors.entry(key) {
            let int = |value: usize| value as std::ffi::c_int;
            let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
            let float = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
            let data = result::create_tensor_descriptor().map_err(cudnn_error)?;
            let params = result::create_tensor_descriptor().map_err(cudnn_error)?;
            // SAFETY: freshly created descriptors.
            unsafe {
                result::set_tensor4d_descriptor(data, nchw, float, [n, c, h, w].map(int))
                    .map_err(cudnn_error)?;
                result::set_tensor4d_descriptor(params, nchw, float, [1, int(c), 1, 1])
                    .map_err(cudnn_error)?;
            }
            slot.insert((data, params));
        }
        let (data, params) = state.descriptors[&key];
        launch(state.handle, data, params)
    })
}
