//! Exact counting: every layer of a network, its parameters and its multiply-accumulates.
//!
//! [`walk`] visits the layers of a [`Network`] in order, each with a multiplicity (the blocks
//! after the first in a stage are identical), and marks the end of every down-sampling scale.
//! Everything else (params, FLOPs, entropy, effectiveness) is a fold over that walk.
//!
//! Conventions, as torchvision: convolutions have no bias and are followed by BatchNorm
//! (weight + bias = 2 * out parameters); SE convolutions have a bias and no BatchNorm; the
//! classifier is a linear layer with bias. Padding is `k / 2`, so a stride-s layer maps side
//! `r` to `ceil(r / s)`. FLOPs are multiply-accumulates of convolutions and linear layers.

use crate::arch::{BlockKind, Mid, Network, Stage};

/// What a layer is for; the paper's entropy counts only [`Role::is_main_path`] layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Stem,
    Main,
    Head,
    Projection,
    SqueezeExcite,
    Classifier,
}

impl Role {
    /// Returns true for the layers that count in entropy and effectiveness (Sec. 4.1): the stem,
    /// every convolution on a block's main path and the head conv.
    pub fn is_main_path(self) -> bool {
        matches!(self, Role::Stem | Role::Main | Role::Head)
    }
}

/// One convolution (or the classifier, as a 1x1 "convolution" on a 1x1 map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layer {
    pub role: Role,
    pub in_channels: u32,
    pub out_channels: u32,
    pub kernel: u32,
    pub stride: u32,
    pub groups: u32,
    /// Side of the square input feature map.
    pub in_side: u32,
    pub bias: bool,
    pub batch_norm: bool,
}

impl Layer {
    /// Returns the side of the output feature map: `ceil(in_side / stride)`.
    pub fn out_side(&self) -> u32 {
        self.in_side.div_ceil(self.stride)
    }

    /// Returns the parameter count: weights, then bias, then BatchNorm's weight and bias.
    pub fn params(&self) -> u64 {
        let weights = u64::from(self.in_channels / self.groups)
            * u64::from(self.out_channels)
            * u64::from(self.kernel * self.kernel);
        let bias = if self.bias { self.out_channels } else { 0 };
        let norm = if self.batch_norm {
            2 * self.out_channels
        } else {
            0
        };
        weights + u64::from(bias) + u64::from(norm)
    }

    /// Returns the multiply-accumulates of one forward pass of one image.
    pub fn macs(&self) -> u64 {
        let side = u64::from(self.out_side());
        u64::from(self.in_channels / self.groups)
            * u64::from(self.out_channels)
            * u64::from(self.kernel * self.kernel)
            * side
            * side
    }

    /// Returns the layer "width" of Sec. 4.1: `c_in * k^2 / g`.
    pub fn width(&self) -> f64 {
        f64::from(self.in_channels) * f64::from(self.kernel * self.kernel) / f64::from(self.groups)
    }
}

/// What [`walk`] reports, in network order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event {
    /// `count` identical copies of `layer`; `stage` is the IR stage, `None` for stem/head/classifier.
    Layer {
        layer: Layer,
        count: u32,
        stage: Option<usize>,
    },
    /// A down-sampling scale ends here (Guideline 1): its output side and channels.
    ScaleEnd { side: u32, channels: u32 },
}

/// Visits every layer of `net` in order and marks where each down-sampling scale ends.
///
/// A scale ends just before every down-sampling (a stride-2 stage or the stem's max pool) that
/// follows at least one layer, and after the last layer. ResNet-50 at 224 has five scales.
pub fn walk(net: &Network, visit: &mut impl FnMut(Event)) {
    walk_outline(net, &mut |item| match item {
        Outline::Layer(layer) => visit(Event::Layer {
            layer,
            count: 1,
            stage: None,
        }),
        Outline::Stage { stage, index, side } => walk_stage(stage, index, side, visit),
        Outline::ScaleEnd { side, channels } => visit(Event::ScaleEnd { side, channels }),
    });
}

/// What [`walk_outline`] reports: [`walk`]'s events, with each stage as one item.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Outline<'a> {
    /// The stem, the head conv or the classifier (one layer, outside the stages).
    Layer(Layer),
    /// A stage whose input feature map has side `side`; [`walk_stage`] lists its layers.
    Stage {
        stage: &'a Stage,
        index: usize,
        side: u32,
    },
    ScaleEnd {
        side: u32,
        channels: u32,
    },
}

/// [`walk`] at stage granularity: scores that remember what each stage adds fold over this.
pub(crate) fn walk_outline<'a>(net: &'a Network, visit: &mut impl FnMut(Outline<'a>)) {
    let mut side = net.resolution;
    let stem = Layer {
        role: Role::Stem,
        in_channels: net.in_channels,
        out_channels: net.stem.out,
        kernel: net.stem.kernel,
        stride: net.stem.stride,
        groups: 1,
        in_side: side,
        bias: false,
        batch_norm: true,
    };
    visit(Outline::Layer(stem));
    side = stem.out_side();
    // A scale is open while layers were visited since the last scale end.
    let mut open = true;
    if net.stem.max_pool {
        visit(Outline::ScaleEnd {
            side,
            channels: net.stem.out,
        });
        open = false;
        side = side.div_ceil(2);
    }
    let mut channels = net.stem.out;
    for (index, stage) in net.stages.iter().enumerate() {
        if stage.stride > 1 && open {
            visit(Outline::ScaleEnd { side, channels });
        }
        visit(Outline::Stage { stage, index, side });
        // Only a stage's first block strides (`block_layers`).
        side = side.div_ceil(stage.stride);
        channels = stage.out;
        open = true;
    }
    if let Some(head) = net.head {
        visit(Outline::Layer(pointwise(
            Role::Head,
            channels,
            head,
            1,
            side,
        )));
        channels = head;
    }
    visit(Outline::ScaleEnd { side, channels });
    visit(Outline::Layer(Layer {
        role: Role::Classifier,
        in_channels: channels,
        out_channels: net.num_classes,
        kernel: 1,
        stride: 1,
        groups: 1,
        in_side: 1,
        bias: true,
        batch_norm: false,
    }));
}

/// Visits the layers of one stage whose input side is `side`: its first block, then the
/// identical rest.
pub(crate) fn walk_stage(stage: &Stage, index: usize, side: u32, visit: &mut impl FnMut(Event)) {
    let mut emit = |layer: Layer, count: u32| {
        if count > 0 {
            visit(Event::Layer {
                layer,
                count,
                stage: Some(index),
            });
        }
    };
    let first = BlockShape {
        in_channels: stage.in_channels,
        stride: stage.stride,
        mid: stage.mid_width(0),
    };
    let out_side = block_layers(stage, first, side, &mut |layer| emit(layer, 1));
    let rest = BlockShape {
        in_channels: stage.out,
        stride: 1,
        mid: stage.mid_width(1),
    };
    block_layers(stage, rest, out_side, &mut |layer| {
        emit(layer, stage.depth - 1)
    });
}

#[derive(Clone, Copy)]
struct BlockShape {
    in_channels: u32,
    stride: u32,
    mid: Option<u32>,
}

/// Emits the layers of one block and returns its output side.
fn block_layers(stage: &Stage, block: BlockShape, side: u32, emit: &mut impl FnMut(Layer)) -> u32 {
    let (cin, cout, k, s) = (block.in_channels, stage.out, stage.kernel, block.stride);
    let out_side = side.div_ceil(s);
    let needs_projection = s != 1 || cin != cout;
    match stage.block {
        BlockKind::Basic => {
            emit(spatial(cin, cout, k, s, 1, side));
            emit(spatial(cout, cout, k, 1, 1, out_side));
            if needs_projection {
                emit(projection(cin, cout, s, side));
            }
        }
        BlockKind::Bottleneck => {
            let mid = block
                .mid
                .expect("validated: bottleneck stages have an inner width");
            emit(pointwise(Role::Main, cin, mid, 1, side));
            emit(spatial(mid, mid, k, s, 1, side));
            emit(pointwise(Role::Main, mid, cout, 1, out_side));
            if needs_projection {
                emit(projection(cin, cout, s, side));
            }
        }
        BlockKind::Mbconv => {
            let mid = block
                .mid
                .expect("validated: mbconv stages have an inner width");
            if stage.mid != Some(Mid::Ratio(1)) {
                emit(pointwise(Role::Main, cin, mid, 1, side));
            }
            emit(spatial(mid, mid, k, s, mid, side));
            if stage.se {
                let squeeze = (cin / 4).max(1);
                emit(squeeze_excite(mid, squeeze));
                emit(squeeze_excite(squeeze, mid));
            }
            emit(pointwise(Role::Main, mid, cout, 1, out_side));
        }
    }
    out_side
}

fn spatial(cin: u32, cout: u32, kernel: u32, stride: u32, groups: u32, side: u32) -> Layer {
    Layer {
        role: Role::Main,
        in_channels: cin,
        out_channels: cout,
        kernel,
        stride,
        groups,
        in_side: side,
        bias: false,
        batch_norm: true,
    }
}

fn pointwise(role: Role, cin: u32, cout: u32, stride: u32, side: u32) -> Layer {
    Layer {
        role,
        ..spatial(cin, cout, 1, stride, 1, side)
    }
}

fn projection(cin: u32, cout: u32, stride: u32, side: u32) -> Layer {
    pointwise(Role::Projection, cin, cout, stride, side)
}

/// SE convolutions act on the pooled 1x1 map, with a bias and without BatchNorm.
fn squeeze_excite(cin: u32, cout: u32) -> Layer {
    Layer {
        role: Role::SqueezeExcite,
        bias: true,
        batch_norm: false,
        ..spatial(cin, cout, 1, 1, 1, 1)
    }
}

/// Parameter and multiply-accumulate totals of a network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub params: u64,
    pub flops: u64,
    /// Main-path layers (the `L` of Eq. (2)).
    pub layers: u32,
}

/// Returns the parameter count, MACs and main-path layer count of `net`.
pub fn totals(net: &Network) -> Totals {
    let mut totals = Totals::default();
    walk(net, &mut |event| {
        if let Event::Layer { layer, count, .. } = event {
            totals.params += layer.params() * u64::from(count);
            totals.flops += layer.macs() * u64::from(count);
            if layer.role.is_main_path() {
                totals.layers += count;
            }
        }
    });
    totals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classic;

    /// Parameter counts from torchvision's model builders (`sum(p.numel())`, 1000 classes),
    /// as listed in torchvision's model documentation and in issue 2.
    #[test]
    fn classic_params_equal_torchvision_exactly() {
        let expected = [
            ("resnet18", 11_689_512u64),
            ("resnet34", 21_797_672),
            ("resnet50", 25_557_032),
            ("mobilenet_v2", 3_504_872),
            ("efficientnet_b0", 5_288_548),
        ];
        for (name, params) in expected {
            let net = classic::by_name(name, 1000, 224).unwrap();
            assert_eq!(totals(&net).params, params, "{name}");
        }
    }

    /// torchvision's published GFLOPS (multiply-accumulates at 224x224); we must be within 2%.
    #[test]
    fn classic_flops_within_two_percent_of_torchvision() {
        let expected = [
            ("resnet18", 1.81e9),
            ("resnet34", 3.66e9),
            ("resnet50", 4.09e9),
            ("mobilenet_v2", 0.30e9),
            ("efficientnet_b0", 0.39e9),
        ];
        for (name, flops) in expected {
            let net = classic::by_name(name, 1000, 224).unwrap();
            let ours = totals(&net).flops as f64;
            let relative = (ours - flops).abs() / flops;
            assert!(relative < 0.02, "{name}: {ours} vs {flops} ({relative:.4})");
        }
    }

    #[test]
    fn resnet50_has_five_scales_and_49_main_layers() {
        let net = classic::by_name("resnet50", 1000, 224).unwrap();
        let mut scales = Vec::new();
        walk(&net, &mut |event| {
            if let Event::ScaleEnd { side, channels } = event {
                scales.push((side, channels));
            }
        });
        assert_eq!(
            scales,
            vec![(112, 64), (56, 256), (28, 512), (14, 1024), (7, 2048)]
        );
        assert_eq!(totals(&net).layers, 49);
    }
}
