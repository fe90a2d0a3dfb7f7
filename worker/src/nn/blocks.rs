//! The layers a design is made of: convolution + BatchNorm, squeeze-excitation, and the three
//! block families of [`deepmad_design::BlockKind`].
//!
//! Every layer here corresponds to exactly one layer of `deepmad_design::count::walk`, with the
//! same shape and the same parameters (see the parameter-count tests in `model.rs`): no conv
//! bias before BatchNorm, padding `k / 2`, SE convolutions with a bias and no BatchNorm.

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{Init, VarBuilder};
use deepmad_design::{Activation, BlockKind, Mid, Stage};

use deepmad_kernels::conv_bn::Conv;

use crate::nn::norm::BatchNorm2d;

/// A convolution without bias followed by BatchNorm (no activation).
#[derive(Clone, Debug)]
pub struct ConvBn {
    weight: Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
    bn: BatchNorm2d,
}

/// The shape of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
}

impl ConvBn {
    /// Creates `{vb}.weight` of shape `(out, in / groups, k, k)` and the BatchNorm `{vb}.bn.*`.
    /// Values are placeholders until [`crate::nn::init::initialize`] runs.
    pub fn new(vb: VarBuilder, shape: ConvShape, bn_momentum: f64) -> candle_core::Result<ConvBn> {
        let weight = vb.get_with_hints(
            (
                shape.out_channels,
                shape.in_channels / shape.groups,
                shape.kernel,
                shape.kernel,
            ),
            "weight",
            Init::Const(0.0),
        )?;
        let bn = BatchNorm2d::new(vb.pp("bn"), shape.out_channels, bn_momentum)?;
        Ok(ConvBn {
            weight,
            stride: shape.stride,
            padding: shape.kernel / 2,
            groups: shape.groups,
            bn,
        })
    }

    /// `act(bn(conv(xs)) + residual)`; all of it one op where
    /// [`BatchNorm2d::conv_forward_act`] can fuse it.
    pub fn forward_act(
        &self,
        xs: &Tensor,
        train: bool,
        residual: Option<&Tensor>,
        activation: Option<Activation>,
    ) -> candle_core::Result<Tensor> {
        let conv = Conv {
            weight: &self.weight,
            stride: self.stride,
            padding: self.padding,
            groups: self.groups,
        };
        self.bn
            .conv_forward_act(xs, conv, train, residual, activation)
    }
}

impl ModuleT for ConvBn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_act(xs, train, None, None)
    }
}

pub use deepmad_kernels::activation::activate;

/// Squeeze-excitation as torchvision's `SqueezeExcitation`: global average pool, 1x1 conv
/// (with bias) to `squeeze` channels, activation, 1x1 conv back, sigmoid, channel scaling.
/// The 1x1 convolutions act on a 1x1 map, so they run as matrix products.
#[derive(Clone, Debug)]
pub struct SqueezeExcite {
    reduce_weight: Tensor,
    reduce_bias: Tensor,
    expand_weight: Tensor,
    expand_bias: Tensor,
    activation: Activation,
}

impl SqueezeExcite {
    /// Creates `{vb}.reduce.{weight,bias}` and `{vb}.expand.{weight,bias}`.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        squeeze: usize,
        activation: Activation,
    ) -> candle_core::Result<SqueezeExcite> {
        let zero = Init::Const(0.0);
        let reduce = vb.pp("reduce");
        let expand = vb.pp("expand");
        Ok(SqueezeExcite {
            reduce_weight: reduce.get_with_hints((squeeze, channels, 1, 1), "weight", zero)?,
            reduce_bias: reduce.get_with_hints(squeeze, "bias", zero)?,
            expand_weight: expand.get_with_hints((channels, squeeze, 1, 1), "weight", zero)?,
            expand_bias: expand.get_with_hints(channels, "bias", zero)?,
            activation,
        })
    }
}

impl Module for SqueezeExcite {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, channels, _, _) = xs.dims4()?;
        let pooled = xs.mean_keepdim((2, 3))?.reshape((batch, channels))?;
        let reduce = self.reduce_weight.flatten_from(1)?;
        let squeezed = pooled
            .matmul(&reduce.t()?)?
            .broadcast_add(&self.reduce_bias)?;
        let squeezed = activate(&squeezed, self.activation)?;
        let expand = self.expand_weight.flatten_from(1)?;
        let scale = squeezed
            .matmul(&expand.t()?)?
            .broadcast_add(&self.expand_bias)?;
        let scale = candle_nn::ops::sigmoid(&scale)?.reshape((batch, channels, 1, 1))?;
        xs.broadcast_mul(&scale)
    }
}

/// One block of a stage.
#[derive(Clone, Debug)]
pub enum Block {
    /// kxk -> kxk, plus a 1x1 projection shortcut when the shape changes.
    Basic {
        conv1: ConvBn,
        conv2: ConvBn,
        shortcut: Option<ConvBn>,
    },
    /// 1x1 -> kxk (stride) -> 1x1, plus a projection shortcut when the shape changes.
    Bottleneck {
        conv1: ConvBn,
        conv2: ConvBn,
        conv3: ConvBn,
        shortcut: Option<ConvBn>,
    },
    /// [1x1 expand] -> depthwise kxk (stride) -> [SE] -> 1x1 linear projection; identity
    /// residual only when input and output shapes match.
    Mbconv {
        expand: Option<ConvBn>,
        depthwise: ConvBn,
        squeeze_excite: Option<SqueezeExcite>,
        project: ConvBn,
        residual: bool,
    },
}

/// What one block needs to know beyond its stage.
#[derive(Clone, Copy, Debug)]
pub struct BlockPlan {
    /// 0-based index of the block in its stage.
    pub index: u32,
    pub activation: Activation,
    pub bn_momentum: f64,
}

impl Block {
    /// Builds block `plan.index` of `stage` under `vb` (e.g. `stages.1.blocks.0`), with the
    /// layers `deepmad_design::count::walk` lists for it.
    pub fn new(vb: VarBuilder, stage: &Stage, plan: BlockPlan) -> candle_core::Result<Block> {
        let first = plan.index == 0;
        let cin = if first { stage.in_channels } else { stage.out } as usize;
        let cout = stage.out as usize;
        let stride = if first { stage.stride as usize } else { 1 };
        let kernel = stage.kernel as usize;
        let needs_projection = stride != 1 || cin != cout;
        let momentum = plan.bn_momentum;
        let conv = |name: &str, cin: usize, cout: usize, kernel: usize, stride: usize| {
            let shape = ConvShape {
                in_channels: cin,
                out_channels: cout,
                kernel,
                stride,
                groups: 1,
            };
            ConvBn::new(vb.pp(name), shape, momentum)
        };
        let shortcut = || -> candle_core::Result<Option<ConvBn>> {
            needs_projection
                .then(|| conv("shortcut", cin, cout, 1, stride))
                .transpose()
        };
        match stage.block {
            BlockKind::Basic => Ok(Block::Basic {
                conv1: conv("conv1", cin, cout, kernel, stride)?,
                conv2: conv("conv2", cout, cout, kernel, 1)?,
                shortcut: shortcut()?,
            }),
            BlockKind::Bottleneck => {
                let mid = mid_width(stage, plan.index)?;
                Ok(Block::Bottleneck {
                    conv1: conv("conv1", cin, mid, 1, 1)?,
                    conv2: conv("conv2", mid, mid, kernel, stride)?,
                    conv3: conv("conv3", mid, cout, 1, 1)?,
                    shortcut: shortcut()?,
                })
            }
            BlockKind::Mbconv => mbconv(vb, stage, plan, cin, stride),
        }
    }
}

fn mid_width(stage: &Stage, index: u32) -> candle_core::Result<usize> {
    stage
        .mid_width(index)
        .map(|width| width as usize)
        .ok_or_else(|| candle_core::Error::Msg("validated design: this block needs `mid`".into()))
}

/// Builds an inverted residual block (MobileNetV2 / EfficientNet's MBConv).
fn mbconv(
    vb: VarBuilder,
    stage: &Stage,
    plan: BlockPlan,
    cin: usize,
    stride: usize,
) -> candle_core::Result<Block> {
    let (cout, kernel) = (stage.out as usize, stage.kernel as usize);
    let mid = mid_width(stage, plan.index)?;
    let momentum = plan.bn_momentum;
    let pointwise = |cin: usize, cout: usize| ConvShape {
        in_channels: cin,
        out_channels: cout,
        kernel: 1,
        stride: 1,
        groups: 1,
    };
    // As torchvision, an expansion ratio of 1 has no expansion convolution.
    let expand = (stage.mid != Some(Mid::Ratio(1)))
        .then(|| ConvBn::new(vb.pp("expand"), pointwise(cin, mid), momentum))
        .transpose()?;
    let depthwise_shape = ConvShape {
        in_channels: mid,
        out_channels: mid,
        kernel,
        stride,
        groups: mid,
    };
    let depthwise = ConvBn::new(vb.pp("depthwise"), depthwise_shape, momentum)?;
    // torchvision's EfficientNet: squeeze channels = max(1, block input channels / 4).
    let squeeze_excite = stage
        .se
        .then(|| SqueezeExcite::new(vb.pp("se"), mid, (cin / 4).max(1), plan.activation))
        .transpose()?;
    let project = ConvBn::new(vb.pp("project"), pointwise(mid, cout), momentum)?;
    Ok(Block::Mbconv {
        expand,
        depthwise,
        squeeze_excite,
        project,
        residual: stride == 1 && cin == cout,
    })
}

impl Block {
    /// Runs the block; `train` selects batch statistics (and updates the running ones).
    pub fn forward(
        &self,
        xs: &Tensor,
        activation: Activation,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let act = Some(activation);
        match self {
            Block::Basic {
                conv1,
                conv2,
                shortcut,
            } => {
                let ys = conv1.forward_act(xs, train, None, act)?;
                let shortcut = shortcut_of(shortcut.as_ref(), xs, train)?;
                conv2.forward_act(&ys, train, Some(&shortcut), act)
            }
            Block::Bottleneck {
                conv1,
                conv2,
                conv3,
                shortcut,
            } => {
                let ys = conv1.forward_act(xs, train, None, act)?;
                let ys = conv2.forward_act(&ys, train, None, act)?;
                let shortcut = shortcut_of(shortcut.as_ref(), xs, train)?;
                conv3.forward_act(&ys, train, Some(&shortcut), act)
            }
            Block::Mbconv {
                expand,
                depthwise,
                squeeze_excite,
                project,
                residual,
            } => {
                let mut ys = xs.clone();
                if let Some(expand) = expand {
                    ys = expand.forward_act(&ys, train, None, act)?;
                }
                ys = depthwise.forward_act(&ys, train, None, act)?;
                if let Some(squeeze_excite) = squeeze_excite {
                    ys = squeeze_excite.forward(&ys)?;
                }
                project.forward_act(&ys, train, residual.then_some(xs), None)
            }
        }
    }
}

fn shortcut_of(shortcut: Option<&ConvBn>, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
    match shortcut {
        Some(projection) => projection.forward_t(xs, train),
        None => Ok(xs.clone()),
    }
}
