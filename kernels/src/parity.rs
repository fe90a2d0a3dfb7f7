//! The parity harness: deepmad's kernels on a device against candle's stock ops on the CPU,
//! forward and backward, for the shapes the network families use. `deepmad bench --check`
//! prints its table; the crate's integration tests (`tests/parity.rs`) run it on the CPU.

use std::fmt;

use candle_core::{Device, Tensor, Var};

use crate::Kernels;

/// One convolution shape that [`check`] compares.
#[derive(Clone, Copy, Debug)]
pub struct CheckCase {
    pub batch: usize,
    pub in_channels: usize,
    pub side: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
}

impl fmt::Display for CheckCase {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{}x{}x{s}x{s} -> {} k{} s{} p{} g{}",
            self.batch,
            self.in_channels,
            self.out_channels,
            self.kernel,
            self.stride,
            self.kernel / 2,
            self.groups,
            s = self.side
        )
    }
}

/// The shapes the network families use: dense kxk (stem, basic, bottleneck), 1x1 with and
/// without stride (projections, MBConv expand / project; on a 24x24 map the CPU kernel uses the
/// image as its columns), depthwise 3x3, 5x5 and 7x7, odd sides.
pub const CHECK_CASES: [CheckCase; 10] = [
    case(4, 3, 16, 16, 3, 1, 1),
    case(4, 16, 8, 16, 3, 1, 1),
    case(3, 8, 9, 16, 3, 2, 1),
    case(4, 16, 8, 32, 1, 1, 1),
    case(4, 16, 8, 32, 1, 2, 1),
    case(4, 24, 8, 24, 3, 1, 24),
    case(2, 24, 11, 24, 5, 2, 24),
    case(2, 3, 16, 8, 7, 2, 1),
    case(2, 16, 24, 24, 1, 1, 1),
    case(2, 16, 8, 16, 7, 1, 16),
];

const fn case(
    batch: usize,
    in_channels: usize,
    side: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
) -> CheckCase {
    CheckCase {
        batch,
        in_channels,
        side,
        out_channels,
        kernel,
        stride,
        groups,
    }
}

/// How far deepmad's convolution on a device is from candle's stock one on the CPU, for one
/// case: the largest absolute difference over the largest reference magnitude, for the output
/// and both gradients (of a fixed random linear function of the output).
#[derive(Clone, Debug)]
pub struct CheckRow {
    /// The layer and shape, e.g. `conv 4x16x8x8 -> 16 k3 s1 p1 g1`.
    pub case: String,
    /// What was compared (`forward`, `input grad`, ...) and its relative error.
    pub errors: Vec<(&'static str, f32)>,
}

impl CheckRow {
    /// The largest relative error.
    pub fn worst(&self) -> f32 {
        self.errors
            .iter()
            .map(|(_, error)| *error)
            .fold(0.0, f32::max)
    }
}

/// The tolerance [`check`]'s relative errors must stay under on `device`: fp32 rounding on the
/// CPU; on CUDA cuDNN may use TF32 tensor cores for fp32 (as PyTorch does by default), whose
/// 10-bit mantissa gives errors near 1e-3.
pub fn check_tolerance(device: &Device) -> f32 {
    if device.is_cpu() {
        1e-4
    } else {
        1e-2
    }
}

/// Runs deepmad's convolution on `device` against candle's stock `conv2d` on the CPU for every
/// case of [`CHECK_CASES`], and deepmad's BatchNorm training pass against the stock one, forward
/// and backward. For BatchNorm, `grad_weight` is the larger of the weight's and the bias's.
pub fn check(device: &Device) -> candle_core::Result<Vec<CheckRow>> {
    let mut rows = CHECK_CASES
        .iter()
        .enumerate()
        .map(|(index, case)| check_case(device, *case, index as u64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    for (index, shape) in [(8, 16, 8, 8), (2, 3, 5, 7)].into_iter().enumerate() {
        rows.push(check_batch_norm(device, shape, 100 + index as u64)?);
    }
    rows.push(check_running_statistics(device)?);
    use deepmad_design::Activation::{Relu, Relu6, Silu};
    // The fused convolution + BatchNorm (+ residual) (+ activation) training op: a basic
    // block's second layer, a strided layer, a depthwise one, a 1x1 projection.
    let fused = [
        (CHECK_CASES[1], true, Some(Relu)),
        (CHECK_CASES[2], false, Some(Relu6)),
        (CHECK_CASES[5], true, Some(Silu)),
        (CHECK_CASES[5], false, Some(Silu)),
        (CHECK_CASES[3], false, None),
        (CHECK_CASES[1], true, None),
    ];
    for (index, (case, residual, activation)) in fused.into_iter().enumerate() {
        rows.push(check_conv_bn(
            device,
            case,
            residual,
            activation,
            400 + index as u64,
        )?);
    }
    for activation in [
        deepmad_design::Activation::Relu,
        deepmad_design::Activation::Relu6,
        deepmad_design::Activation::Silu,
    ] {
        rows.push(check_activation(device, activation)?);
    }
    Ok(rows)
}

fn check_activation(
    device: &Device,
    activation: deepmad_design::Activation,
) -> candle_core::Result<CheckRow> {
    let shape = (3, 4, 7, 5);
    // Values in [-8, 8): both kinks of ReLU6 and SiLU's tails are covered.
    let input = (pattern(shape, 300)? * 8.0)?;
    let run = |kernels: Kernels, device: &Device| -> candle_core::Result<[Tensor; 2]> {
        let xs = Var::from_tensor(&input.to_device(device)?)?;
        let ys = crate::activation::activate_with(kernels, xs.as_tensor(), activation)?;
        let probe = pattern(shape, 301)?.to_device(device)?;
        let grads = (&ys * &probe)?.sum_all()?.backward()?;
        let grad = grads
            .get(xs.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("activation check: no gradient".into()))?;
        Ok([ys.to_device(&Device::Cpu)?, grad.to_device(&Device::Cpu)?])
    };
    let ours = run(Kernels::Deepmad, device)?;
    let reference = run(Kernels::Stock, &Device::Cpu)?;
    Ok(CheckRow {
        case: format!("activation {activation:?}").to_lowercase(),
        errors: vec![
            ("forward", relative_error(&ours[0], &reference[0])?),
            ("input grad", relative_error(&ours[1], &reference[1])?),
        ],
    })
}

/// Two training passes of BatchNorm (the process's kernels, through
/// [`crate::batch_norm::forward`]) on `device` and on the CPU: the running mean and variance
/// they leave must agree.
fn check_running_statistics(device: &Device) -> candle_core::Result<CheckRow> {
    let shape = (6, 5, 4, 3);
    let run = |device: &Device| -> candle_core::Result<[Tensor; 2]> {
        let f32 = candle_core::DType::F32;
        let weight = Tensor::ones(shape.1, f32, device)?;
        let bias = Tensor::zeros(shape.1, f32, device)?;
        let running_mean = Var::zeros(shape.1, f32, device)?;
        let running_var = Var::ones(shape.1, f32, device)?;
        let state = crate::batch_norm::BatchNormState {
            weight: &weight,
            bias: &bias,
            running_mean: &running_mean,
            running_var: &running_var,
            momentum: 0.1,
        };
        for seed in [200, 201] {
            let xs = (pattern(shape, seed)?.to_device(device)? * 3.0)?;
            crate::batch_norm::forward(&xs, &state, true)?;
        }
        Ok([
            running_mean.as_tensor().to_device(&Device::Cpu)?,
            running_var.as_tensor().to_device(&Device::Cpu)?,
        ])
    };
    let ours = run(device)?;
    let reference = run(&Device::Cpu)?;
    Ok(CheckRow {
        case: format!(
            "batchnorm running stats {}x{}x{}x{}",
            shape.0, shape.1, shape.2, shape.3
        ),
        errors: vec![
            ("mean", relative_error(&ours[0], &reference[0])?),
            ("variance", relative_error(&ours[1], &reference[1])?),
        ],
    })
}

fn check_batch_norm(
    device: &Device,
    shape: (usize, usize, usize, usize),
    seed: u64,
) -> candle_core::Result<CheckRow> {
    let input = pattern(shape, seed)?;
    let affine = pattern((2, shape.1, 1, 1), seed + 1)?.reshape((2, shape.1))?;
    let run = |kernels: Kernels, device: &Device| -> candle_core::Result<[Tensor; 4]> {
        let xs = Var::from_tensor(&input.to_device(device)?)?;
        let weight = Var::from_tensor(&(affine.get(0)?.to_device(device)? + 1.5)?)?;
        let bias = Var::from_tensor(&affine.get(1)?.to_device(device)?)?;
        let (ys, _) = crate::batch_norm::train_pass(
            kernels,
            xs.as_tensor(),
            weight.as_tensor(),
            bias.as_tensor(),
        )?;
        let probe = pattern(shape, seed + 2)?.to_device(device)?;
        let grads = (&ys * &probe)?.sum_all()?.backward()?;
        let missing = || candle_core::Error::Msg("batch norm check: no gradient".into());
        let grad = |var: &Var| -> candle_core::Result<Tensor> {
            grads
                .get(var.as_tensor())
                .ok_or_else(missing)?
                .to_device(&Device::Cpu)
        };
        Ok([
            ys.to_device(&Device::Cpu)?,
            grad(&xs)?,
            grad(&weight)?,
            grad(&bias)?,
        ])
    };
    let ours = run(Kernels::Deepmad, device)?;
    let reference = run(Kernels::Stock, &Device::Cpu)?;
    Ok(CheckRow {
        case: format!("batchnorm {}x{}x{}x{}", shape.0, shape.1, shape.2, shape.3),
        errors: vec![
            ("forward", relative_error(&ours[0], &reference[0])?),
            ("input grad", relative_error(&ours[1], &reference[1])?),
            ("weight grad", relative_error(&ours[2], &reference[2])?),
            ("bias grad", relative_error(&ours[3], &reference[3])?),
        ],
    })
}

fn check_case(device: &Device, case: CheckCase, seed: u64) -> candle_core::Result<CheckRow> {
    let padding = case.kernel / 2;
    let input_shape = (case.batch, case.in_channels, case.side, case.side);
    let weight_shape = (
        case.out_channels,
        case.in_channels / case.groups,
        case.kernel,
        case.kernel,
    );
    let input = pattern(input_shape, seed * 3 + 1)?;
    let weight = pattern(weight_shape, seed * 3 + 2)?;
    let run = |kernels: Kernels, device: &Device| -> candle_core::Result<[Tensor; 3]> {
        let xs = Var::from_tensor(&input.to_device(device)?)?;
        let ws = Var::from_tensor(&weight.to_device(device)?)?;
        let ys = crate::conv::conv2d_with(
            kernels,
            xs.as_tensor(),
            ws.as_tensor(),
            case.stride,
            padding,
            case.groups,
        )?;
        let probe = pattern(ys.dims4()?, seed * 3 + 3)?.to_device(device)?;
        let grads = (&ys * &probe)?.sum_all()?.backward()?;
        let missing = || candle_core::Error::Msg("convolution check: no gradient".into());
        let grad_input = grads.get(xs.as_tensor()).ok_or_else(missing)?.clone();
        let grad_weight = grads.get(ws.as_tensor()).ok_or_else(missing)?.clone();
        let cpu = Device::Cpu;
        Ok([
            ys.to_device(&cpu)?,
            grad_input.to_device(&cpu)?,
            grad_weight.to_device(&cpu)?,
        ])
    };
    let ours = run(Kernels::Deepmad, device)?;
    let reference = run(Kernels::Stock, &Device::Cpu)?;
    Ok(CheckRow {
        case: format!("conv {case}"),
        errors: vec![
            ("forward", relative_error(&ours[0], &reference[0])?),
            ("input grad", relative_error(&ours[1], &reference[1])?),
            ("weight grad", relative_error(&ours[2], &reference[2])?),
        ],
    })
}

/// The fused training op of [`crate::conv_bn::forward_act`] on `device` (the
/// CPU's or the CUDA one) against candle's stock convolution, BatchNorm, add and activation on
/// the CPU: output and the gradients of the input, the convolution weight, BatchNorm's weight
/// and bias, and the residual.
fn check_conv_bn(
    device: &Device,
    case: CheckCase,
    with_residual: bool,
    activation: Option<deepmad_design::Activation>,
    seed: u64,
) -> candle_core::Result<CheckRow> {
    let padding = case.kernel / 2;
    let geometry = (case.stride, padding, case.groups);
    let input_shape = (case.batch, case.in_channels, case.side, case.side);
    let weight_shape = (
        case.out_channels,
        case.in_channels / case.groups,
        case.kernel,
        case.kernel,
    );
    let input = pattern(input_shape, seed * 7 + 1)?;
    let weight = pattern(weight_shape, seed * 7 + 2)?;
    let affine =
        pattern((2, case.out_channels, 1, 1), seed * 7 + 3)?.reshape((2, case.out_channels))?;
    let missing = || candle_core::Error::Msg("conv + batch norm check: no gradient".into());
    let run = |kernels: Kernels, device: &Device| -> candle_core::Result<Vec<Tensor>> {
        let xs = Var::from_tensor(&input.to_device(device)?)?;
        let ws = Var::from_tensor(&weight.to_device(device)?)?;
        let bn_weight = Var::from_tensor(&(affine.get(0)?.to_device(device)? + 1.5)?)?;
        let bn_bias = Var::from_tensor(&affine.get(1)?.to_device(device)?)?;
        let out_shape = crate::conv::conv2d_with(
            Kernels::Stock,
            &input.narrow(0, 0, 1)?,
            &weight,
            case.stride,
            padding,
            case.groups,
        )?
        .dims4()?;
        let out_shape = (case.batch, out_shape.1, out_shape.2, out_shape.3);
        let residual = if with_residual {
            Some(Var::from_tensor(
                &(pattern(out_shape, seed * 7 + 4)? * 2.0)?.to_device(device)?,
            )?)
        } else {
            None
        };
        let residual_tensor = residual.as_ref().map(Var::as_tensor);
        let (xs_t, ws_t) = (xs.as_tensor(), ws.as_tensor());
        let (bw, bb) = (bn_weight.as_tensor(), bn_bias.as_tensor());
        let ys = match kernels {
            Kernels::Stock => {
                let conv = crate::conv::conv2d_with(
                    Kernels::Stock,
                    xs_t,
                    ws_t,
                    case.stride,
                    padding,
                    case.groups,
                )?;
                let (mut ys, _) = crate::batch_norm::train_pass(Kernels::Stock, &conv, bw, bb)?;
                if let Some(residual) = residual_tensor {
                    ys = (ys + residual)?;
                }
                match activation {
                    Some(activation) => {
                        crate::activation::activate_with(Kernels::Stock, &ys, activation)?
                    }
                    None => ys,
                }
            }
            Kernels::Deepmad if device.is_cpu() => {
                crate::conv_bn::cpu::train(
                    xs_t,
                    ws_t,
                    geometry,
                    bw,
                    bb,
                    residual_tensor,
                    activation,
                )?
                .ok_or_else(|| candle_core::Error::Msg("conv + batch norm: no CPU kernel".into()))?
                .0
            }
            Kernels::Deepmad => {
                fused_on_device(xs_t, ws_t, geometry, (bw, bb), residual_tensor, activation)?
            }
        };
        let probe = pattern(out_shape, seed * 7 + 5)?.to_device(device)?;
        let grads = (&ys * &probe)?.sum_all()?.backward()?;
        let cpu = Device::Cpu;
        let mut values = vec![ys.to_device(&cpu)?];
        for var in [Some(&xs), Some(&ws), Some(&bn_weight), Some(&bn_bias)]
            .into_iter()
            .chain([residual.as_ref()])
            .flatten()
        {
            let grad = grads.get(var.as_tensor()).ok_or_else(missing)?;
            values.push(grad.to_device(&cpu)?);
        }
        Ok(values)
    };
    let ours = run(Kernels::Deepmad, device)?;
    let reference = run(Kernels::Stock, &Device::Cpu)?;
    let names = [
        "forward",
        "input grad",
        "weight grad",
        "bn weight grad",
        "bn bias grad",
        "residual grad",
    ];
    let errors = names
        .into_iter()
        .zip(ours.iter().zip(&reference))
        .map(|(name, (ours, reference))| Ok((name, relative_error(ours, reference)?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let residual = if with_residual { " + residual" } else { "" };
    let activation = activation.map_or("none".to_string(), |a| format!("{a:?}").to_lowercase());
    Ok(CheckRow {
        case: format!("conv+bn {case}{residual} {activation}"),
        errors,
    })
}

/// The fused op on a CUDA device (cuDNN's).
#[cfg(feature = "cuda")]
fn fused_on_device(
    xs: &Tensor,
    weight: &Tensor,
    geometry: (usize, usize, usize),
    (bn_weight, bn_bias): (&Tensor, &Tensor),
    residual: Option<&Tensor>,
    activation: Option<deepmad_design::Activation>,
) -> candle_core::Result<Tensor> {
    let (ys, _) = crate::conv_bn::cudnn::train(
        xs,
        weight,
        geometry,
        bn_weight,
        bn_bias,
        residual,
        activation,
        crate::batch_norm::EPS,
    )?;
    Ok(ys)
}

#[cfg(not(feature = "cuda"))]
fn fused_on_device(
    xs: &Tensor,
    _: &Tensor,
    _: (usize, usize, usize),
    _: (&Tensor, &Tensor),
    _: Option<&Tensor>,
    _: Option<deepmad_design::Activation>,
) -> candle_core::Result<Tensor> {
    candle_core::bail!(
        "the fused conv + batch norm op has no kernel for {:?} in this build",
        xs.device().location()
    )
}

/// A fixed pseudo-random pattern in [-1, 1) on the CPU (no RNG state involved).
fn pattern(shape: (usize, usize, usize, usize), seed: u64) -> candle_core::Result<Tensor> {
    let count = shape.0 * shape.1 * shape.2 * shape.3;
    let values: Vec<f32> = (0..count as u64)
        .map(|i| {
            let x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (seed + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let x = (x ^ (x >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

fn relative_error(ours: &Tensor, reference: &Tensor) -> candle_core::Result<f32> {
    let difference = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(difference / scale.max(1e-6))
}
