//! SGD's update as two in-place ops over f32 data (momentum buffer, then value), on the CPU as
//! loops and on CUDA as two kernels of `cuda/mod.rs`, instead of the nine tensor ops and
//! allocations per parameter of the formula (PyTorch's `torch.optim.SGD`, dampening 0):
//! ```text
//! g  = grad + weight_decay * p
//! b  = g                      (first step)
//! b  = momentum * b + g       (later steps)
//! g  = g + momentum * b       (nesterov)   or   g = b   (classical momentum)
//! p  = p - lr * g
//! ```
//! The worker's optimiser (`train::optim::Sgd`) owns the buffers and falls back to the formula
//! as tensor ops where [`update`] does not apply; its tests compare the two.

use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Tensor};

/// One parameter's update step: the learning rate and the optimiser's settings for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

/// Whether [`update`] runs for a parameter like `value` (f32 on the CPU or CUDA).
pub fn applies_to(value: &Tensor) -> bool {
    let device = value.device();
    value.dtype() == DType::F32 && (device.is_cpu() || device.is_cuda())
}

/// Updates `value` in place from `grad` (contiguous, `value`'s shape) and the momentum buffer,
/// which it creates on the first step (when `step.momentum` is not 0) and updates in place
/// after. Only for parameters where [`applies_to`] holds.
pub fn update(
    value: &Tensor,
    grad: &Tensor,
    momentum_buffer: &mut Option<Tensor>,
    step: SgdStep,
) -> candle_core::Result<()> {
    let mut buffer = None;
    if step.momentum != 0.0 {
        let first = momentum_buffer.is_none();
        let existing = match momentum_buffer {
            Some(existing) => existing.clone(),
            None => value.zeros_like()?,
        };
        let op = SgdBuffer {
            momentum: step.momentum as f32,
            weight_decay: step.weight_decay as f32,
            first,
        };
        existing.inplace_op3(grad, value, &op)?;
        buffer = Some(existing);
    }
    let op = SgdValue {
        lr: step.lr as f32,
        momentum: step.momentum as f32,
        weight_decay: step.weight_decay as f32,
        nesterov: step.nesterov,
    };
    // Without momentum the kernel never reads the buffer operand.
    value.inplace_op3(grad, buffer.as_ref().unwrap_or(grad), &op)?;
    if buffer.is_some() {
        *momentum_buffer = buffer;
    }
    Ok(())
}

/// `buffer = first ? g : buffer * momentum + g` with `g = grad + value * weight_decay`, in
/// place on the buffer; operands `(grad, value)`.
#[derive(Clone, Copy, Debug)]
struct SgdBuffer {
    momentum: f32,
    weight_decay: f32,
    first: bool,
}

/// `value -= lr * update` with `update` = `g` (no momentum), `g + buffer * momentum`
/// (Nesterov) or `buffer`, in place on the value; operands `(grad, buffer)`.
#[derive(Clone, Copy, Debug)]
struct SgdValue {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
}

fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("sgd: only f32 is supported");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "sgd" })?;
    Ok(&data[start..end])
}

fn cpu_f32_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("sgd: only f32 is supported");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or(candle_core::Error::RequiresContiguous { op: "sgd" })?;
    Ok(&mut data[start..end])
}

impl InplaceOp3 for SgdBuffer {
    fn name(&self) -> &'static str {
        "deepmad-sgd-buffer"
    }

    fn cpu_fwd(
        &self,
        buffer: &mut CpuStorage,
        buffer_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
        value: &CpuStorage,
        value_layout: &Layout,
    ) -> candle_core::Result<()> {
        let buffer = cpu_f32_mut(buffer, buffer_layout)?;
        let grad = cpu_f32(grad, grad_layout)?;
        let value = cpu_f32(value, value_layout)?;
        for ((b, g), v) in buffer.iter_mut().zip(grad).zip(value) {
            let g = g + v * self.weight_decay;
            *b = if self.first {
                g
            } else {
                *b * self.momentum + g
            };
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        buffer: &mut candle_core::CudaStorage,
        buffer_layout: &Layout,
        grad: &candle_core::CudaStorage,
        grad_layout: &Layout,
        value: &candle_core::CudaStorage,
        value_layout: &Layout,
    ) -> candle_core::Result<()> {
        use crate::cuda::{f32_view, f32_view_mut, launch, Arg};
        let device = buffer.device.clone();
        let n = buffer_layout.shape().elem_count();
        let mut out = f32_view_mut(buffer, buffer_layout, "sgd buffer")?;
        let grad = f32_view(grad, grad_layout, "sgd gradient")?;
        let value = f32_view(value, value_layout, "sgd value")?;
        launch(
            &device,
            "deepmad_sgd_buffer",
            n,
            &mut [
                Arg::Out(&mut out),
                Arg::In(&grad),
                Arg::In(&value),
                Arg::U32(n as u32),
                Arg::F32(self.momentum),
                Arg::F32(self.weight_decay),
                Arg::I32(i32::from(self.first)),
            ],
        )
    }
}

impl InplaceOp3 for SgdValue {
    fn name(&self) -> &'static str {
        "deepmad-sgd-value"
    }

    fn cpu_fwd(
        &self,
        value: &mut CpuStorage,
        value_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
        buffer: &CpuStorage,
        buffer_layout: &Layout,
    ) -> candle_core::Result<()> {
        let value = cpu_f32_mut(value, value_layout)?;
        let grad = cpu_f32(grad, grad_layout)?;
        let buffer = cpu_f32(buffer, buffer_layout)?;
        for ((v, g), b) in value.iter_mut().zip(grad).zip(buffer) {
            let g = g + *v * self.weight_decay;
            let update = if self.momentum == 0.0 {
                g
            } else if self.nesterov {
                g + b * self.momentum
            } else {
                *b
            };
            *v -= update * self.lr;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        value: &mut candle_core::CudaStorage,
        value_layout: &Layout,
        grad: &candle_core::CudaStorage,
        grad_layout: &Layout,
        buffer: &candle_core::CudaStorage,
        buffer_layout: &Layout,
    ) -> candle_core::Result<()> {
        use crate::cuda::{f32_view, f32_view_mut, launch, Arg};
        let device = value.device.clone();
        let n = value_layout.shape().elem_count();
        let mut out = f32_view_mut(value, value_layout, "sgd value")?;
        let grad = f32_view(grad, grad_layout, "sgd gradient")?;
        let buffer = f32_view(buffer, buffer_layout, "sgd buffer")?;
        launch(
            &device,
            "deepmad_sgd_value",
            n,
            &mut [
                Arg::Out(&mut out),
                Arg::In(&grad),
                Arg::In(&buffer),
                Arg::U32(n as u32),
                Arg::F32(self.lr),
                Arg::F32(self.momentum),
                Arg::F32(self.weight_decay),
                Arg::I32(i32::from(self.nesterov)),
            ],
        )
    }
}
