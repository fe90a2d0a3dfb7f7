//! Convolutions on CUDA through cuDNN, forward and both backward passes.
//!
//! Why: candle 0.11 runs a convolution's input gradient on CUDA as a naive `conv_transpose2d`
//! kernel, and its own `cudnn` feature uses cuDNN for the forward pass only (measured on an
//! H200: ResNet-20 training at batch 128 was 0.28x PyTorch's speed with stock candle, and 5x
//! slower still with that feature, see `docs/performance.md`). PyTorch calls cuDNN for all three
//! passes; so does this module, through cudarc (the CUDA crate candle itself is built on):
//! - [`conv2d`] applies one op type, `CudnnConv`, in its forward pass on `(input, weight)`
//!   (`cudnnConvolutionForward`); its backward is the same op in its other two passes,
//!   `cudnnConvolutionBackwardData` and `cudnnConvolutionBackwardFilter`;
//! - grouped and depthwise convolutions are one cuDNN call (its group count), not one call per
//!   group;
//! - descriptors and algorithms are made once per shape and cached (the algorithms timed by
//!   cuDNN's `Find` calls, or its heuristics' pick: [`AlgoChoice`]), and one workspace buffer
//!   per device is reused (all work is on candle's one stream, so the calls are ordered and
//!   cannot overlap).
//!
//! BatchNorm's training pass is cuDNN's too ([`batch_norm_train`]): one kernel forward and one
//! backward instead of candle's chain of reductions and broadcasts.
//!
//! cuDNN's default math mode is used, which, like PyTorch's default
//! (`torch.backends.cudnn.allow_tf32 = True`), lets fp32 convolutions use TF32 tensor cores.
//! Only f32 tensors are supported so far; other types are an error naming the type.

// cuDNN is a C library: every call takes raw device pointers and descriptors. Each unsafe
// block says why its call is sound.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda::{CudaDevice, DeviceId};

use crate::layout::Windows;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn,
    FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

/// The shape of one convolution: its input windows, output channels and group count (the
/// weight is `(out, in / groups, k, k)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConvGeometry {
    windows: Windows,
    out_channels: usize,
    groups: usize,
}

impl ConvGeometry {
    pub(crate) fn new(windows: Windows, out_channels: usize, groups: usize) -> ConvGeometry {
        ConvGeometry {
            windows,
            out_channels,
            groups,
        }
    }

    pub(crate) fn input_shape(&self) -> Shape {
        let w = &self.windows;
        (w.batch, w.channels, w.height, w.width).into()
    }

    pub(crate) fn weight_shape(&self) -> Shape {
        let w = &self.windows;
        let per_group = w.channels / self.groups;
        (self.out_channels, per_group, w.kernel, w.kernel).into()
    }

    pub(crate) fn output_shape(&self) -> Shape {
        let w = &self.windows;
        (w.batch, self.out_channels, w.out_height(), w.out_width()).into()
    }
}

/// Returns the cross-correlation of `xs` (NCHW, f32, on a CUDA device) with `weight`, computed
/// by cuDNN in all three passes.
pub(crate) fn conv2d(
    xs: &Tensor,
    weight: &Tensor,
    windows: Windows,
    out_channels: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    let op = CudnnConv {
        geometry: ConvGeometry {
            windows,
            out_channels,
            groups,
        },
        pass: Pass::Forward,
    };
    xs.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// Which of cuDNN's three convolution calls a [`CudnnConv`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// `(input, weight)` to the output; differentiable, by the two others.
    Forward,
    /// `(weight, output gradient)` to the input gradient.
    BackwardData,
    /// `(input, output gradient)` to the weight gradient.
    BackwardFilter,
}

/// One cuDNN convolution call as a candle op.
#[derive(Clone, Copy, Debug)]
struct CudnnConv {
    geometry: ConvGeometry,
    pass: Pass,
}

impl CudnnConv {
    /// The shapes and names of the two operands, then the result's shape.
    fn shapes(&self) -> ((Shape, &'static str), (Shape, &'static str), Shape) {
        let g = &self.geometry;
        let (input, weight, output) = (g.input_shape(), g.weight_shape(), g.output_shape());
        match self.pass {
            Pass::Forward => ((input, "input"), (weight, "weight"), output),
            Pass::BackwardData => ((weight, "weight"), (output, "output gradient"), input),
            Pass::BackwardFilter => ((input, "input"), (output, "output gradient"), weight),
        }
    }
}

pub(crate) fn cpu_unsupported(op: &str) -> candle_core::Result<(CpuStorage, Shape)> {
    candle_core::bail!("{op} runs on CUDA tensors only (the CPU path is deepmad's im2col)")
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "deepmad-cudnn-conv2d",
            Pass::BackwardData => "deepmad-cudnn-conv2d-backward-data",
            Pass::BackwardFilter => "deepmad-cudnn-conv2d-backward-filter",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        first: &CudaStorage,
        first_layout: &Layout,
        second: &CudaStorage,
        second_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let ((first_shape, first_name), (second_shape, second_name), shape) = self.shapes();
        let a = view(first, first_layout, &first_shape, first_name)?;
        let b = view(second, second_layout, &second_shape, second_name)?;
        let device = first.device.clone();
        // SAFETY: cuDNN writes every element of the result (beta = 0).
        let mut out = unsafe { device.alloc::<f32>(shape.elem_count())? };
        launch_conv(&device, self.geometry, self.pass, &a, &b, &mut out)?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _ys: &Tensor,
        grad_ys: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.pass != Pass::Forward {
            return Err(candle_core::Error::BackwardNotSupported { op: self.name() });
        }
        let grad_ys = grad_ys.contiguous()?;
        let pass = |pass| CudnnConv {
            geometry: self.geometry,
            pass,
        };
        let grad_xs = weight.apply_op2_no_bwd(&grad_ys, &pass(Pass::BackwardData))?;
        let grad_weight = xs.apply_op2_no_bwd(&grad_ys, &pass(Pass::BackwardFilter))?;
        Ok((Some(grad_xs), Some(grad_weight)))
    }
}

/// Runs one of cuDNN's three convolution calls for `geometry` on `device`, writing every element
/// of `out` (beta = 0). The operands are, by pass: forward `(input, weight)` to the output;
/// backward-data `(weight, output gradient)` to the input gradient; backward-filter `(input,
/// output gradient)` to the weight gradient. Each must hold the f32 elements of its shape.
pub(crate) fn launch_conv(
    device: &CudaDevice,
    geometry: ConvGeometry,
    pass: Pass,
    a: &impl DevicePtr<f32>,
    b: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<f32>,
) -> candle_core::Result<()> {
    with_plan(device, geometry, |plan, workspace| {
        let scale = (1f32, 0f32);
        // SAFETY: the descriptors were made from this geometry, and the caller passes operands
        // and a result of its shapes.
        let launched = unsafe {
            match pass {
                Pass::Forward => {
                    let op = ConvForward {
                        conv: &plan.conv,
                        x: &plan.x,
                        w: &plan.w,
                        y: &plan.y,
                    };
                    op.launch(plan.forward, workspace, scale, a, b, out)
                }
                Pass::BackwardData => {
                    let op = ConvBackwardData {
                        conv: &plan.conv,
                        dx: &plan.x,
                        w: &plan.w,
                        dy: &plan.y,
                    };
                    op.launch(plan.backward_data, workspace, scale, out, a, b)
                }
                Pass::BackwardFilter => {
                    let op = ConvBackwardFilter {
                        conv: &plan.conv,
                        x: &plan.x,
                        dw: &plan.w,
                        dy: &plan.y,
                    };
                    op.launch(plan.backward_filter, workspace, scale, a, out, b)
                }
            }
        };
        launched.map_err(cudnn_error)
    })
}

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

/// Everything cuDNN needs for one convolution shape, made once.
struct Plan {
    x: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    y: TensorDescriptor<f32>,
    conv: ConvDescriptor<f32>,
    forward: sys::cudnnConvolutionFwdAlgo_t,
    backward_data: sys::cudnnConvolutionBwdDataAlgo_t,
    backward_filter: sys::cudnnConvolutionBwdFilterAlgo_t,
    /// The largest workspace the three algorithms need, in bytes.
    workspace: usize,
}

impl Plan {
    /// Makes the descriptors for `g` and chooses its three algorithms; `raw` is a handle on the
    /// same stream, for [`AlgoChoice::Find`].
    fn new(
        cudnn: &Arc<Cudnn>,
        raw: sys::cudnnHandle_t,
        g: ConvGeometry,
        choice: AlgoChoice,
    ) -> Result<Plan, cudarc::cudnn::CudnnError> {
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let int = |value: usize| value as std::ffi::c_int;
        let w = &g.windows;
        let x = cudnn.create_4d_tensor::<f32>(
            nchw,
            [int(w.batch), int(w.channels), int(w.height), int(w.width)],
        )?;
        let filter = cudnn.create_4d_filter::<f32>(
            nchw,
            [
                int(g.out_channels),
                int(w.channels / g.groups),
                int(w.kernel),
                int(w.kernel),
            ],
        )?;
        let y = cudnn.create_4d_tensor::<f32>(
            nchw,
            [
                int(w.batch),
                int(g.out_channels),
                int(w.out_height()),
                int(w.out_width()),
            ],
        )?;
        let mut conv = cudnn.create_conv2d::<f32>(
            [int(w.padding), int(w.padding)],
            [int(w.stride), int(w.stride)],
            [1, 1],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )?;
        if g.groups > 1 {
            conv.set_group_count(int(g.groups))?;
        }
        let forward_op = ConvForward {
            conv: &conv,
            x: &x,
            w: &filter,
            y: &y,
        };
        let data_op = ConvBackwardData {
            conv: &conv,
            dx: &x,
            w: &filter,
            dy: &y,
        };
        let filter_op = ConvBackwardFilter {
            conv: &conv,
            x: &x,
            dw: &filter,
            dy: &y,
        };
        let (forward, backward_data, backward_filter) = match choice {
            AlgoChoice::Heuristic => (
                forward_op.pick_algorithm()?,
                data_op.pick_algorithm()?,
                filter_op.pick_algorithm()?,
            ),
            AlgoChoice::Find => find_algorithms(raw, g)?,
        };
        let workspace = forward_op
            .get_workspace_size(forward)?
            .max(data_op.get_workspace_size(backward_data)?)
            .max(filter_op.get_workspace_size(backward_filter)?);
        tracing::debug!(
            ?g,
            ?choice,
            ?forward,
            ?backward_data,
            ?backward_filter,
            workspace,
            "cuDNN convolution plan"
        );
        Ok(Plan {
            x,
            w: filter,
            y,
            conv,
            forward,
            backward_data,
            backward_filter,
            workspace,
        })
    }
}

/// How a convolution plan's algorithms are chosen, by `DEEPMAD_CUDNN_ALGO`:
/// - `find` (the default): cuDNN runs every algorithm once per shape and the fastest is kept,
///   as PyTorch does with `torch.backends.cudnn.benchmark = True`. The first step of each new
///   shape is slower (a few milliseconds per convolution);
/// - `heuristic`: cuDNN's heuristics, no device work; what PyTorch does by default. Measured
///   on an H200, ResNet-20 at batch 128 trained 1.36x faster with `find`
///   (`docs/performance.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlgoChoice {
    Heuristic,
    Find,
}

/// The choice `DEEPMAD_CUDNN_ALGO` names, read once; an unknown value is an error naming it.
pub fn algo_choice() -> candle_core::Result<AlgoChoice> {
    static CHOICE: std::sync::OnceLock<Result<AlgoChoice, String>> = std::sync::OnceLock::new();
    CHOICE
        .get_or_init(|| match std::env::var("DEEPMAD_CUDNN_ALGO").as_deref() {
            Err(_) | Ok("") | Ok("find") => Ok(AlgoChoice::Find),
            Ok("heuristic") => Ok(AlgoChoice::Heuristic),
            Ok(other) => Err(format!(
                "DEEPMAD_CUDNN_ALGO={other:?}: expected \"heuristic\" or \"find\""
            )),
        })
        .clone()
        .map_err(candle_core::Error::Msg)
}

/// Raw convolution descriptors for [`find_algorithms`] (cudarc's own are private to it),
/// destroyed on drop.
struct RawConv {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl RawConv {
    fn new(g: ConvGeometry) -> Result<RawConv, cudarc::cudnn::CudnnError> {
        use cudarc::cudnn::result;
        let int = |value: usize| value as std::ffi::c_int;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let float = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
        let w = &g.windows;
        let raw = RawConv {
            x: result::create_tensor_descriptor()?,
            y: result::create_tensor_descriptor()?,
            w: result::create_filter_descriptor()?,
            conv: result::create_convolution_descriptor()?,
        };
        let (p, s) = (int(w.padding), int(w.stride));
        // SAFETY: freshly created descriptors, set to the same values as cudarc's in Plan::new.
        unsafe {
            result::set_tensor4d_descriptor(
                raw.x,
                nchw,
                float,
                [w.batch, w.channels, w.height, w.width].map(int),
            )?;
            result::set_tensor4d_descriptor(
                raw.y,
                nchw,
                float,
                [w.batch, g.out_channels, w.out_height(), w.out_width()].map(int),
            )?;
            result::set_filter4d_descriptor(
                raw.w,
                float,
                nchw,
                [g.out_channels, w.channels / g.groups, w.kernel, w.kernel].map(int),
            )?;
            result::set_convolution2d_descriptor(
                raw.conv,
                p,
                p,
                s,
                s,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                float,
            )?;
            if g.groups > 1 {
                result::set_convolution_group_count(raw.conv, int(g.groups))?;
            }
        }
        Ok(raw)
    }
}

impl Drop for RawConv {
    fn drop(&mut self) {
        use cudarc::cudnn::result;
        // SAFETY: created in RawConv::new and used by nothing else; errors while tearing down
        // are ignored (there is nothing left to do with them).
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.x);
            let _ = result::destroy_tensor_descriptor(self.y);
            let _ = result::destroy_filter_descriptor(self.w);
            let _ = result::destroy_convolution_descriptor(self.conv);
        }
    }
}

/// Times every algorithm of the three passes for `g` (cuDNN's `Find` calls, which allocate
/// their own buffers and synchronise) and returns the fastest that succeeded, for each.
fn find_algorithms(
    handle: sys::cudnnHandle_t,
    g: ConvGeometry,
) -> Result<
    (
        sys::cudnnConvolutionFwdAlgo_t,
        sys::cudnnConvolutionBwdDataAlgo_t,
        sys::cudnnConvolutionBwdFilterAlgo_t,
    ),
    cudarc::cudnn::CudnnError,
> {
    use cudarc::cudnn::CudnnError;
    const MAX: usize = 16;
    let raw = RawConv::new(g)?;
    let ok = sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
    // cuDNN sorts the results by time; the first that ran is the fastest.
    let fastest = |count: std::ffi::c_int, statuses: &[sys::cudnnStatus_t]| {
        statuses[..count as usize]
            .iter()
            .position(|status| *status == ok)
            .ok_or(CudnnError(sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED))
    };
    let mut count: std::ffi::c_int = 0;
    // SAFETY (the three calls): the descriptors describe one valid convolution (cuDNN checks
    // them), the result arrays hold MAX entries, and cuDNN writes `count` of them.
    let mut forward = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; MAX];
    unsafe {
        sys::cudnnFindConvolutionForwardAlgorithm(
            handle,
            raw.x,
            raw.w,
            raw.conv,
            raw.y,
            MAX as std::ffi::c_int,
            &mut count,
            forward.as_mut_ptr(),
        )
    }
    .result()?;
    let statuses: Vec<_> = forward.iter().map(|perf| perf.status).collect();
    let forward = forward[fastest(count, &statuses)?].algo;
    let mut data = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>() }; MAX];
    unsafe {
        sys::cudnnFindConvolutionBackwardDataAlgorithm(
            handle,
            raw.w,
            raw.y,
            raw.conv,
            raw.x,
            MAX as std::ffi::c_int,
            &mut count,
            data.as_mut_ptr(),
        )
    }
    .result()?;
    let statuses: Vec<_> = data.iter().map(|perf| perf.status).collect();
    let data = data[fastest(count, &statuses)?].algo;
    let mut filter =
        [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>() }; MAX];
    unsafe {
        sys::cudnnFindConvolutionBackwardFilterAlgorithm(
            handle,
            raw.x,
            raw.y,
            raw.conv,
            raw.w,
            MAX as std::ffi::c_int,
            &mut count,
            filter.as_mut_ptr(),
        )
    }
    .result()?;
    let statuses: Vec<_> = filter.iter().map(|perf| perf.status).collect();
    let filter = filter[fastest(count, &statuses)?].algo;
    Ok((forward, data, filter))
}

/// One device's cuDNN handle, its plans and its workspace. cuDNN handles are neither `Send`
/// nor `Sync`, so this lives in a thread-local (as candle keeps its own handles).
struct DeviceState {
    cudnn: Arc<Cudnn>,
    plans: HashMap<ConvGeometry, Plan>,
    workspace: Option<CudaSlice<u8>>,
}

thread_local! {
    static STATE: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
}

/// Runs `launch` with the plan for `g` on `device` and a workspace at least as large as the
/// plan needs (`None` when it needs none).
fn with_plan(
    device: &CudaDevice,
    g: ConvGeometry,
    launch: impl FnOnce(&Plan, Option<&mut CudaSlice<u8>>) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        if !state.contains_key(&device.id()) {
            // A thread trains on one device at a time: a new device replaces the others'
            // handles, plans and workspaces (freed now, not kept for the thread's life).
            state.clear();
        }
        let entry = match state.entry(device.id()) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let cudnn = Cudnn::new(device.cuda_stream()).map_err(cudnn_error)?;

                entry.insert(DeviceState {
                    cudnn,
                    plans: HashMap::new(),
                    workspace: None,
                })
            }
        };
        if !entry.plans.contains_key(&g) {
            let choice = algo_choice()?;
            let plan = with_raw(device, |raw| {
                Plan::new(&entry.cudnn, raw.handle, g, choice).map_err(cudnn_error)
            })?;
            entry.plans.insert(g, plan);
        }
        let plan = &entry.plans[&g];
        let needed = plan.workspace;
        if needed == 0 {
            return launch(plan, None);
        }
        let too_small = entry
            .workspace
            .as_ref()
            .is_none_or(|buffer| buffer.len() < needed);
        if too_small {
            // SAFETY: a workspace is scratch space; cuDNN never reads what it did not write.
            entry.workspace = Some(unsafe { device.alloc::<u8>(needed)? });
        }
        launch(plan, entry.workspace.as_mut())
    })
}

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
        // SAFETY: cuDNN writes every element of the three outputs.
        let mut ys = unsafe { device.alloc::<f32>(shape.elem_count())? };
        let mut mean = unsafe { device.alloc::<f32>(channels)? };
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

/// Raw cuDNN handles and BatchNorm descriptors: cudarc's safe API has no BatchNorm, and its
/// handle and descriptors are private, so these are made with its `result` functions.
struct RawState {
    handle: sys::cudnnHandle_t,
    /// Per NCHW shape: the data descriptor and the `(1, C, 1, 1)` parameter descriptor.
    descriptors: HashMap<[usize; 4], (sys::cudnnTensorDescriptor_t, sys::cudnnTensorDescriptor_t)>,
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
fn with_raw<T>(
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
