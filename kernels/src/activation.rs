//! The networks' activations (ReLU, ReLU6, SiLU) as one op each way: with deepmad's kernels the
//! forward pass is one op and the backward one more, instead of candle's chains (its ReLU
//! gradient alone is a comparison, a type conversion, a zero tensor and a product, each a pass
//! over memory and, on CUDA, a kernel launch and an allocation). CPU: loops over rayon chunks;
//! CUDA: kernels of `cuda/mod.rs`. The stock path is candle's own ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use deepmad_design::Activation;
use rayon::prelude::*;

use crate::Kernels;

/// Applies `activation` with the process's kernels.
pub fn activate(xs: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
    activate_with(crate::current(), xs, activation)
}

/// [`activate`] with the given kernels.
pub fn activate_with(
    kernels: Kernels,
    xs: &Tensor,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    let device = xs.device();
    let fused = kernels == Kernels::Deepmad
        && xs.dtype() == DType::F32
        && (device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda()));
    if fused {
        return xs.contiguous()?.apply_op1(Forward(activation));
    }
    match activation {
        Activation::Relu => xs.relu(),
        Activation::Relu6 => xs.relu()?.minimum(6.0),
        Activation::Silu => xs.silu(),
    }
}

#[derive(Clone, Copy, Debug)]
struct Forward(Activation);

/// The input gradient from `(input, output gradient)`.
#[derive(Clone, Copy, Debug)]
struct Backward(Activation);

#[inline(always)]
pub(crate) fn forward_one(activation: Activation, x: f32) -> f32 {
    match activation {
        Activation::Relu => x.max(0.0),
        Activation::Relu6 => x.clamp(0.0, 6.0),
        Activation::Silu => x / (1.0 + crate::simd::exp(-x)),
    }
}

/// The derivative times the output gradient `g` (PyTorch's conventions: 0 at the kinks).
#[inline(always)]
pub(crate) fn backward_one(activation: Activation, x: f32, g: f32) -> f32 {
    match activation {
        Activation::Relu => {
            if x > 0.0 {
                g
            } else {
                0.0
            }
        }
        Activation::Relu6 => {
            if x > 0.0 && x < 6.0 {
                g
            } else {
                0.0
            }
        }
        Activation::Silu => {
            let s = 1.0 / (1.0 + crate::simd::exp(-x));
            g * s * (1.0 + x * (1.0 - s))
        }
    }
}

crate::simd::multiversion! {
    fn forward_chunk(activation: Activation, ys: &mut [f32], xs: &[f32]) {
        // One loop per activation, so that each vectorises.
        match activation {
            Activation::Relu => apply(ys, xs, |x| forward_one(Activation::Relu, x)),
            Activation::Relu6 => apply(ys, xs, |x| forward_one(Activation::Relu6, x)),
            Activation::Silu => apply(ys, xs, |x| forward_one(Activation::Silu, x)),
        }
    }
}

crate::simd::multiversion! {
    fn backward_chunk(activation: Activation, out: &mut [f32], xs: &[f32], grad: &[f32]) {
        let terms = out.iter_mut().zip(xs).zip(grad);
        match activation {
            Activation::Relu => terms.for_each(|((o, &x), &g)| *o = backward_one(Activation::Relu, x, g)),
            Activation::Relu6 => terms.for_each(|((o, &x), &g)| *o = backward_one(Activation::Relu6, x, g)),
            Activation::Silu => terms.for_each(|((o, &x), &g)| *o = backward_one(Activation::Silu, x, g)),
        }
    }
}

#[inline(always)]
fn apply(ys: &mut [f32], xs: &[f32], f: impl Fn(f32) -> f32) {
    for (y, &x) in ys.iter_mut().zip(xs) {
        *y = f(x);
    }
}

/// Elements per rayon task: enough to amortise the task, few enough to spread a layer.
const CHUNK: usize = 1 << 14;

fn cpu_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("activation: only f32 is supported");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "activation" })?;
    Ok(&data[start..end])
}

#[cfg(feature = "cuda")]
pub(crate) fn kernel_name(activation: Activation, backward: bool) -> &'static str {
    match (activation, backward) {
        (Activation::Relu, false) => "deepmad_relu",
        (Activation::Relu6, false) => "deepmad_relu6",
        (Activation::Silu, false) => "deepmad_silu",
        (Activation::Relu, true) => "deepmad_relu_backward",
        (Activation::Relu6, true) => "deepmad_relu6_backward",
        (Activation::Silu, true) => "deepmad_silu_backward",
    }
}

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "deepmad-activation"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = cpu_slice(storage, layout)?;
        let mut ys = vec![0f32; xs.len()];
        ys.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(ys, xs)| forward_chunk(self.0, ys, xs));
        Ok((CpuStorage::F32(ys), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{f32_view, launch, Arg};
        let device = storage.device.clone();
        let n = layout.shape().elem_count();
        let xs = f32_view(storage, layout, "activation input")?;
        // SAFETY: the kernel writes all n elements.
        let mut ys = unsafe { device.alloc::<f32>(n)? };
        let mut out = ys.slice_mut(..);
        let mut args = [Arg::Out(&mut out), Arg::In(&xs), Arg::U32(n as u32)];
        launch(&device, kernel_name(self.0, false), n, &mut args)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(ys, device),
            layout.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        _ys: &Tensor,
        grad_ys: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = xs.apply_op2_no_bwd(&grad_ys.contiguous()?, &Backward(self.0))?;
        Ok(Some(grad))
    }
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "deepmad-activation-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = cpu_slice(xs, xs_layout)?;
        let grad = cpu_slice(grad, grad_layout)?;
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)))
            .for_each(|(out, (xs, grad))| backward_chunk(self.0, out, xs, grad));
        Ok((CpuStorage::F32(out), xs_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xs_layout: &Layout,
        grad: &candle_core::CudaStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{f32_view, launch, Arg};
        let device = xs.device.clone();
        let n = xs_layout.shape().elem_count();
        let xs = f32_view(xs, xs_layout, "activation input")?;
        let grad = f32_view(grad, grad_layout, "activation gradient")?;
        // SAFETY: the kernel writes all n elements.
        let mut dx = unsafe { device.alloc::<f32>(n)? };
        let mut out = dx.slice_mut(..);
        let mut args = [
            Arg::Out(&mut out),
            Arg::In(&xs),
            Arg::In(&grad),
            Arg::U32(n as u32),
        ];
        launch(&device, kernel_name(self.0, true), n, &mut args)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dx, device),
            xs_layout.shape().clone(),
        ))
    }
}
