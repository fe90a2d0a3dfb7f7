//! What the cuDNN ops share: this thread's raw cuDNN handle per device (made on first use, on
//! candle's stream), the f32 views of their operands and the mapping of cuDNN's errors. The
//! ops are `conv/cudnn.rs` (convolutions), `batch_norm/cudnn.rs` (BatchNorm) and
//! `conv_bn/cudnn.rs` (the fused op).
//!
//! cuDNN is a C library: every call takes raw device pointers and descriptors. Each unsafe
//! block says why its call is sound.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::cuda::{CudaDevice, DeviceId};
use candle_core::{CpuStorage, CudaStorage, DType, Layout, Shape};
use cudarc::cudnn::sys;
use cudarc::driver::CudaView;

/// The f32 data of a contiguous tensor of the expected shape.
pub(crate) fn view<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    expected: &Shape,
    what: &str,
) -> candle_core::Result<CudaView<'a, f32>> {
    if storage.dtype() != DType::F32 {
        candle_core::bail!(
            "cuDNN convolution: the {what} is {:?}; only f32 is supported so far",
            storage.dtype()
        );
    }
    if layout.shape() != expected {
        candle_core::bail!(
            "cuDNN convolution: the {what} has shape {:?}, expected {expected:?}",
            layout.shape()
        );
    }
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "cudnn-conv2d" })?;
    Ok(storage.as_cuda_slice::<f32>()?.slice(start..end))
}

pub(crate) fn cudnn_error(error: cudarc::cudnn::CudnnError) -> candle_core::Error {
    candle_core::Error::Cuda(format!("cuDNN: {error:?}").into())
}

pub(crate) fn cpu_unsupported(op: &str) -> candle_core::Result<(CpuStorage, Shape)> {
    candle_core::bail!("{op} runs on CUDA tensors only (the CPU path is deepmad's im2col)")
}

/// Raw cuDNN handles and BatchNorm descriptors: cudarc's safe API has no BatchNorm, and its
/// handle and descriptors are private, so these are made with its `result` functions.
pub(crate) struct RawState {
    pub(crate) handle: sys::cudnnHandle_t,
    /// Per NCHW shape: the data descriptor and the `(1, C, 1, 1)` parameter descriptor.
    pub(crate) descriptors:
        HashMap<[usize; 4], (sys::cudnnTensorDescriptor_t, sys::cudnnTensorDescriptor_t)>,
}

impl Drop for RawState {
    fn drop(&mut self) {
        use cudarc::cudnn::result;
        // SAFETY: this state created the handle and descriptors and nothing else holds them;
        // errors while tearing down are ignored (there is nothing left to do with them).
        unsafe {
            for (data, params) in self.descriptors.values() {
                let _ = result::destroy_tensor_descriptor(*data);
                let _ = result::destroy_tensor_descriptor(*params);
            }
            let _ = result::destroy_handle(self.handle);
        }
    }
}

thread_local! {
    static RAW: RefCell<HashMap<DeviceId, RawState>> = RefCell::new(HashMap::new());
}

/// Runs `f` with this thread's raw cuDNN state for `device` (made on first use, on candle's
/// stream for that device).
pub(crate) fn with_raw<T>(
    device: &CudaDevice,
    f: impl FnOnce(&mut RawState) -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    use cudarc::cudnn::result;
    RAW.with(|raw| {
        let mut raw = raw.borrow_mut();
        if !raw.contains_key(&device.id()) {
            raw.clear();
        }
        let state = match raw.entry(device.id()) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let handle = result::create_handle().map_err(cudnn_error)?;
                let stream = device.cuda_stream().cu_stream() as sys::cudaStream_t;
                // SAFETY: a fresh handle and candle's live stream for this device.
                unsafe { result::set_stream(handle, stream) }.map_err(cudnn_error)?;
                entry.insert(RawState {
                    handle,
                    descriptors: HashMap::new(),
                })
            }
        };
        f(state)
    })
}
