//! The BatchNorm layer: PyTorch's `BatchNorm2d` (affine, running statistics with a momentum),
//! owning its variables. The computation is [`deepmad_kernels::batch_norm`]'s, and the fused
//! convolution + BatchNorm op [`deepmad_kernels::conv_bn`]'s; this file only holds the tensors
//! and names them as PyTorch does.

use candle_core::{ModuleT, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use deepmad_design::Activation;
use deepmad_kernels::batch_norm::{self, BatchNormState};
use deepmad_kernels::conv_bn::{self, Conv};

/// BatchNorm with an affine transform: `{vb}.weight`, `{vb}.bias` and the buffers
/// `{vb}.running_mean`, `{vb}.running_var`.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    momentum: f64,
}

impl BatchNorm2d {
    /// Creates the variables (values come from [`crate::nn::init`]).
    pub fn new(vb: VarBuilder, channels: usize, momentum: f64) -> candle_core::Result<Self> {
        let zero = Init::Const(0.0);
        let running_mean = vb.get_with_hints(channels, "running_mean", zero)?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        Ok(BatchNorm2d {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", zero)?,
            // The var map's tensors are variables, so these share their storage.
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            momentum,
        })
    }

    fn state(&self) -> BatchNormState<'_> {
        BatchNormState {
            weight: &self.weight,
            bias: &self.bias,
            running_mean: &self.running_mean,
            running_var: &self.running_var,
            momentum: self.momentum,
        }
    }

    /// `act(bn(xs) + residual)`, fused into one op where the kernels can
    /// ([`batch_norm::forward_act`]).
    pub fn forward_act(
        &self,
        xs: &Tensor,
        train: bool,
        residual: Option<&Tensor>,
        activation: Option<Activation>,
    ) -> candle_core::Result<Tensor> {
        batch_norm::forward_act(xs, &self.state(), train, residual, activation)
    }

    /// `act(bn(conv(xs)) + residual)` for [`crate::nn::blocks::ConvBn`], fused into one op
    /// where the kernels can ([`conv_bn::forward_act`]).
    pub(crate) fn conv_forward_act(
        &self,
        xs: &Tensor,
        conv: Conv,
        train: bool,
        residual: Option<&Tensor>,
        activation: Option<Activation>,
    ) -> candle_core::Result<Tensor> {
        conv_bn::forward_act(xs, conv, &self.state(), train, residual, activation)
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        batch_norm::forward(xs, &self.state(), train)
    }
}
