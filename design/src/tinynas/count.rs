//! The official code's per-block counts and its walk over blocks and stages (conventions and
//! their sources in the module doc of [`crate::tinynas`]).

use super::{SuperBlock, TinyBlock};
use crate::memo::{Direct, Ln};

/// The resolution the official score always uses for feature-map sides
/// (`ComputeDeepMadScore(image_size = 224)`), whatever resolution FLOPs are counted at.
pub const SCORE_RESOLUTION: u32 = 224;

/// What one block contributes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct BlockCounts {
    pub params: u64,
    /// That code's float FLOPs, before rounding.
    pub flops: f64,
    pub layers: u32,
    /// Sum of the 0.5-scaled log terms of `get_deepmad_forward`.
    pub log_sum: f64,
    /// Sum of the ln widths of `get_width`.
    pub log_width_sum: f64,
}

/// What [`walk`] reports, in network order.
#[derive(Clone, Copy, Debug)]
pub(super) enum Event {
    /// A block, its counts and its output side at the counting resolution (integer division,
    /// as `get_output_resolution`, but without SE's reset to 1).
    Block {
        block: TinyBlock,
        counts: BlockCounts,
        side: u32,
    },
    /// A stage ends: its channels and its feature-map side as the score sees it, and
    /// `ln channels + ln(side^2)`.
    StageEnd {
        side: u32,
        channels: u32,
        log_size: f64,
    },
}

/// Visits every block of a structure at `resolution` and marks where each stage ends
/// (`CnnNet.get_stage_info`: before every stride-2 block but the first block, and at the last).
pub(super) fn walk(
    blocks: impl Iterator<Item = TinyBlock>,
    resolution: u32,
    counter: &mut impl BlockCounter,
    visit: &mut impl FnMut(Event),
) {
    // FLOPs divide the side with real division (`CnnNet.get_flops`).
    let mut flops_side = f64::from(resolution);
    let mut side = resolution;
    // The score's side divides with integer division and is 1 after SE
    // (`get_output_resolution`, `SE.get_output_resolution`).
    let mut score_side = SCORE_RESOLUTION;
    let mut blocks = blocks.peekable();
    let mut previous_out = None;
    while let Some(block) = blocks.next() {
        let stride = block.stride();
        if let Some(channels) = previous_out.filter(|_| stride == 2) {
            visit(stage_end(score_side, channels, counter));
        }
        previous_out = Some(block.out());
        let counts = counter.block_counts(&block, flops_side);
        flops_side /= f64::from(stride);
        side /= stride;
        score_side = match block {
            TinyBlock::DepthwiseSe(_) => 1,
            _ => score_side / stride,
        };
        visit(Event::Block {
            block,
            counts,
            side,
        });
        if blocks.peek().is_none() {
            visit(stage_end(score_side, block.out(), counter));
        }
    }
}

fn stage_end(side: u32, channels: u32, ln: &mut impl Ln) -> Event {
    let squared = f64::from(side) * f64::from(side);
    Event::StageEnd {
        side,
        channels,
        log_size: ln.ln(f64::from(channels)) + ln.ln(squared),
    }
}

/// Where the walk gets a block's counts and the logarithms: computed ([`Direct`]) or
/// remembered (the solver's memos).
pub(crate) trait BlockCounter: Ln {
    fn block_counts(&mut self, block: &TinyBlock, side: f64) -> BlockCounts;
}

impl BlockCounter for Direct {
    fn block_counts(&mut self, block: &TinyBlock, side: f64) -> BlockCounts {
        block_counts(block, side, self)
    }
}

/// Returns the counts of one block whose input side is `side`.
pub(crate) fn block_counts(block: &TinyBlock, side: f64, ln: &mut impl Ln) -> BlockCounts {
    let (shape, kind) = match block {
        TinyBlock::Conv {
            in_channels,
            out,
            kernel,
            stride,
        } => return conv_counts(*in_channels, *out, *kernel, *stride, side, ln),
        TinyBlock::Bottleneck(shape) => (shape, Kind::Bottleneck),
        TinyBlock::Depthwise(shape) => (shape, Kind::Depthwise),
        TinyBlock::DepthwiseSe(shape) => (shape, Kind::DepthwiseSe),
    };
    // `BaseSuperBlock`: the first sub-block maps in -> out with the stride, the rest are equal
    // and see the side divided by the stride.
    let first = sub_block(kind, shape, shape.in_channels, shape.stride, true, ln);
    let rest = sub_block(kind, shape, shape.out, 1, false, ln);
    let others = shape.depth - 1;
    let s2 = f64::from(shape.stride * shape.stride);
    BlockCounts {
        params: first.params + rest.params * u64::from(others),
        flops: side * side * (first.flops + rest.flops * f64::from(others) / s2),
        layers: 3 * shape.depth,
        log_sum: first.log_term + rest.log_term * f64::from(others),
        log_width_sum: first.log_width + rest.log_width * f64::from(others),
    }
}

/// `ConvKXBNRELU`: `ConvKXBN` (weights + BN, 2 c_out per position) plus ReLU (c_out).
fn conv_counts(
    cin: u32,
    cout: u32,
    kernel: u32,
    stride: u32,
    side: f64,
    ln: &mut impl Ln,
) -> BlockCounts {
    let weights = u64::from(cin) * u64::from(cout) * u64::from(kernel * kernel);
    let s2 = f64::from(stride * stride);
    let log_width = ln.ln(f64::from(cin) * f64::from(kernel * kernel));
    BlockCounts {
        params: weights + 2 * u64::from(cout),
        flops: side * side * (weights as f64 + 3.0 * f64::from(cout)) / s2,
        layers: 1,
        log_sum: 0.5 * log_width,
        log_width_sum: log_width,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bottleneck,
    Depthwise,
    DepthwiseSe,
}

/// What one sub-block contributes; `flops` is per input position.
#[derive(Clone, Copy, Debug, PartialEq)]
struct SubBlock {
    params: u64,
    flops: f64,
    log_term: f64,
    log_width: f64,
}

/// The shape of one sub-block (`ResK1KXK1`, `ResK1DWK1` or `ResK1DWSEK1`).
#[derive(Clone, Copy, Debug)]
struct SubShape {
    cin: u32,
    btn: u32,
    cout: u32,
    kernel: u32,
    stride: u32,
    depthwise: bool,
    /// `force_resproj` is set on the first `ResK1KXK1` only; depthwise blocks never project.
    projection: bool,
}

impl SubShape {
    /// Returns the kxk conv's weights: full for bottlenecks, depthwise (groups = btn) otherwise.
    fn spatial_weights(&self) -> u64 {
        let k2 = u64::from(self.kernel * self.kernel);
        let btn = u64::from(self.btn);
        if self.depthwise {
            btn * k2
        } else {
            btn * btn * k2
        }
    }
}

/// Returns one sub-block with `cin` inputs and `stride`; `first` marks the super-block's first.
fn sub_block(
    kind: Kind,
    shape: &SuperBlock,
    cin: u32,
    stride: u32,
    first: bool,
    ln: &mut impl Ln,
) -> SubBlock {
    let depthwise = kind != Kind::Bottleneck;
    let sub = SubShape {
        cin,
        btn: shape.btn,
        cout: shape.out,
        kernel: shape.kernel,
        stride,
        depthwise,
        projection: !depthwise && (first || cin != shape.out),
    };
    let (cin, btn, k2) = (
        f64::from(cin),
        f64::from(shape.btn),
        f64::from(shape.kernel * shape.kernel),
    );
    let (log_term, log_width) = if sub.depthwise {
        (
            0.5 * (ln.ln(cin) + ln.ln(k2) + ln.ln(btn)),
            ln.ln(cin * k2 * btn),
        )
    } else {
        (
            0.5 * (ln.ln(cin) + ln.ln(btn * k2) + ln.ln(btn)),
            ln.ln(cin * btn * k2 * btn),
        )
    };
    SubBlock {
        params: sub_params(kind, &sub),
        flops: sub_flops(&sub),
        log_term,
        log_width,
    }
}

/// Returns the parameters of the three convs, their BNs, the projection and the SE.
fn sub_params(kind: Kind, sub: &SubShape) -> u64 {
    let (cin, btn, cout) = (u64::from(sub.cin), u64::from(sub.btn), u64::from(sub.cout));
    let mut params = cin * btn + 2 * btn + sub.spatial_weights() + 2 * btn + btn * cout + 2 * cout;
    if sub.projection {
        params += cin * cout + 2 * cout;
    }
    if kind == Kind::DepthwiseSe {
        let squeeze = se_width(sub.btn);
        params += btn * squeeze + 2 * squeeze + squeeze * btn + 2 * btn;
    }
    params
}

/// Returns the FLOPs per input position (`self.flops` of the sub-block classes).
fn sub_flops(sub: &SubShape) -> f64 {
    let (cin, btn, cout) = (f64::from(sub.cin), f64::from(sub.btn), f64::from(sub.cout));
    let s2 = f64::from(sub.stride * sub.stride);
    // conv1 + BN, conv2 + BN, conv3 + BN, then the three ReLUs (`# add relu flops`).
    let mut flops = cin * btn
        + 2.0 * btn
        + (sub.spatial_weights() as f64 + 2.0 * btn) / s2
        + (btn * cout + 2.0 * cout) / s2
        + btn
        + btn / s2
        + cout / s2;
    // The stride-2 shortcut's average pool: always for bottlenecks, with a residual otherwise.
    if sub.stride == 2 && (!sub.depthwise || sub.cin == sub.cout) {
        flops += cin;
    }
    if sub.projection {
        flops += (cin * cout + 3.0 * cout) / s2;
    }
    flops
}

/// Returns the SE squeeze width of `SE` in `blocks_basic.py`:
/// `max(1, round(btn * 0.25) // 8) * 8`, with Python's `round` (half to even).
fn se_width(btn: u32) -> u64 {
    let (quarter, remainder) = (btn / 4, btn % 4);
    let rounded = match remainder {
        0 | 1 => quarter,
        3 => quarter + 1,
        _ => quarter + quarter % 2,
    };
    u64::from((rounded / 8).max(1) * 8)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{conv, shape};
    use super::*;

    #[test]
    fn se_width_follows_python() {
        // max(1, round(btn * 0.25) // 8) * 8 as Python 3 prints it; 126 and 130 round a half.
        let expected = [
            (4, 8),
            (60, 8),
            (64, 16),
            (240, 56),
            (512, 128),
            (1872, 464),
            (126, 32),
            (130, 32),
            (66, 16),
        ];
        for (btn, squeeze) in expected {
            assert_eq!(se_width(btn), squeeze, "btn {btn}");
        }
    }

    /// Hand counts from the formulas of the module doc, one block of each kind.
    #[test]
    fn single_blocks_by_hand() {
        let stem = block_counts(&conv(3, 32, 3, 2), 224.0, &mut Direct);
        assert_eq!(stem.params, 3 * 32 * 9 + 64);
        assert_eq!(stem.flops, 224.0 * 224.0 * (864.0 + 96.0) / 4.0);
        // SuperResK1KXK1 (32, 104, btn 32, k3, s2, L1): one sub-block, with projection and pool.
        let bottleneck = block_counts(
            &TinyBlock::Bottleneck(shape(32, 104, 32, 3, 2, 1)),
            112.0,
            &mut Direct,
        );
        let params = 32 * 32 + 64 + 32 * 32 * 9 + 64 + 32 * 104 + 208 + 32 * 104 + 208;
        assert_eq!(bottleneck.params, params);
        let per_position = 32.0 * 32.0
            + 64.0
            + (9216.0 + 64.0) / 4.0
            + (3328.0 + 208.0) / 4.0
            + 32.0
            + 8.0
            + 26.0
            + 32.0
            + (3328.0 + 312.0) / 4.0;
        assert_eq!(bottleneck.flops, 112.0 * 112.0 * per_position);
        // SuperResK1DWK1 (16, 16, btn 48, k3, s2, L2): residual (in == out), so the pool counts;
        // the second sub-block sees side 56 and no pool.
        let depthwise = block_counts(
            &TinyBlock::Depthwise(shape(16, 16, 48, 3, 2, 2)),
            112.0,
            &mut Direct,
        );
        let sub_params = 16 * 48 + 96 + 48 * 9 + 96 + 48 * 16 + 32;
        assert_eq!(depthwise.params, 2 * sub_params);
        let common = |s2: f64| {
            768.0 + 96.0 + (432.0 + 96.0) / s2 + (768.0 + 32.0) / s2 + 48.0 + 48.0 / s2 + 16.0 / s2
        };
        assert_eq!(
            depthwise.flops,
            112.0 * 112.0 * (common(4.0) + 16.0) + 56.0 * 56.0 * common(1.0)
        );
        assert_eq!(depthwise.layers, 6);
        // The SE variant adds 2 x (48 x 8 + 2 x ...) parameters and no FLOPs.
        let se = block_counts(
            &TinyBlock::DepthwiseSe(shape(16, 16, 48, 3, 2, 2)),
            112.0,
            &mut Direct,
        );
        assert_eq!(
            se.params,
            depthwise.params + 2 * (48 * 8 + 16 + 8 * 48 + 96)
        );
        assert_eq!(se.flops, depthwise.flops);
        assert_eq!(se.log_sum, depthwise.log_sum);
    }
}
