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
//!
//! cuDNN's default math mode is used, which, like PyTorch's default
//! (`torch.backends.cudnn.allow_tf32 = True`), lets fp32 convolutions use TF32 tensor cores.
//! Only f32 tensors are supported so far; other types are an error naming the type.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda::{CudaDevice, DeviceId};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};
use cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn,
    FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use crate::cuda::cudnn::{cpu_unsupported, cudnn_error, view, with_raw};
use crate::layout::Windows;

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
    // SAFETY: a plain C struct of integers, floats and enums, for which all-zero bytes are a
    // valid value (enum value 0 exists for each of its enums).
    let mut forward = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; MAX];
    // SAFETY: the descriptors describe one valid convolution (cuDNN checks them), the result
    // array holds MAX entries, and cuDNN writes `count` of them.
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
    // SAFETY: as for `forward`: all-zero bytes are a valid value of this C struct.
    let mut data = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>() }; MAX];
    // SAFETY: as for the forward search: valid descriptors, MAX entries, `count` written.
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
        // SAFETY: as for `forward`: all-zero bytes are a valid value of this C struct.
        [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>() }; MAX];
    // SAFETY: as for the forward search: valid descriptors, MAX entries, `count` written.
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
