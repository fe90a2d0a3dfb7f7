//! TinyNAS-compatible mode: the structure format, counts and score of the paper's official code
//! (alibaba/lightweight-neural-architecture-search, `tinynas/`), reproduced number for number.
//!
//! A [`TinyNet`] is a list of [`TinyBlock`]s as in the released structure files
//! (`configs/classification/models/*.txt`); [`TinyNet::parse_all`] reads those files (a Python
//! literal `{'best_structures': [[...]], 'space_arch': 'CnnNet'}`) or JSON, and
//! [`score_tinynas`] / [`analyze_tinynas`] score them as that code does. The conventions below
//! were checked against `tinynas/models/blocks_cnn_2d/{blocks_basic,super_res_k1kxk1,
//! super_res_k1dwk1,super_res_k1dwsek1}.py`, `tinynas/models/cnnnet.py`,
//! `tinynas/scores/compute_deepmad.py` and `tinynas/strategy/strategy.py`. They differ from the
//! paper-mode conventions of [`crate::score`] on purpose.
//!
//! # Blocks
//! * `ConvKXBNRELU {in, out, k, s}`: conv + BN + ReLU. A missing `s` means 1, as in that code.
//! * `SuperResK1KXK1 {in, out, btn, k, s, L}`: `L` bottleneck sub-blocks (1x1 in->btn, kxk
//!   btn->btn with stride s, 1x1 btn->out). The first maps in->out with stride s and always has
//!   a 1x1 projection shortcut (`force_resproj` for `ResK1KXK1`); the rest map out->out with
//!   stride 1 and an identity shortcut.
//! * `SuperResK1DWK1` / `SuperResK1DWSEK1 {in, out, btn, k, s, L}`: inverted residuals (1x1
//!   in->btn, depthwise kxk, optional SE, 1x1 btn->out); never a projection; a residual only when a
//!   sub-block's in == out.
//!
//! # Files
//! [`TinyNet::parse_all`] takes the released Python literal (single quotes, trailing commas,
//! backslash-newline continuations, `#` comments, whitespace anywhere), the same dict in JSON,
//! or a plain list of block dicts. Blocks take exactly the keys above plus `inner_class`, which
//! is ignored (that code overwrites it); the official format's optional `g`, `p`, `act`,
//! `nbitsA`/`nbitsW` and `force_resproj_skip` change the counts and are rejected by name, so
//! `g` below is 1 except in the depthwise conv (g = btn). [`TinyNet::to_python_literal`] writes
//! the released style and [`TinyNet::to_json`] a JSON list; both read back unchanged. Block
//! indices in messages count from 0, as in Python.
//!
//! # Parameters (exact integers)
//! Every conv has `c_in * c_out * k^2 / g` weights and `2 * c_out` BatchNorm parameters, stem,
//! projections and SE convs included. SE (`SE` in `blocks_basic.py`) squeezes `btn` to
//! `max(1, round(btn / 4) // 8) * 8` channels (Python's `round`, half to even) with two 1x1
//! convs with BN. The classifier is not counted.
//!
//! # FLOPs (that code's floats, rounded to the nearest integer)
//! With R the input side and s the stride (each sub-block's own: the first carries the
//! super-block's stride, the rest have stride 1 and input side R / s):
//!
//! ```text
//! ConvKXBNRELU          R^2 (cin cout k^2 / g + 3 cout) / s^2
//! bottleneck sub-block  R^2 [ cin btn + 2 btn + (btn^2 k^2 + 2 btn) / s^2
//!                             + (btn cout + 2 cout) / s^2 + btn + btn / s^2 + cout / s^2
//!                             + (s == 2 ? cin : 0)
//!                             + (projection ? (cin cout + 3 cout) / s^2 : 0) ]
//! depthwise sub-block   the same with btn k^2 for btn^2 k^2, no projection term,
//!                       and the cin term only when cin == cout and s == 2
//! ```
//!
//! SE FLOPs are not counted (that code says so in `ResK1DWSEK1.get_flops`). R is divided by
//! each stride with real division (`CnnNet.get_flops`: `the_res /= block.stride`;
//! `BaseSuperBlock`: `current_res /= stride`), so at a resolution that does not halve cleanly
//! (200 -> 6.25 after five halvings, 230 -> 7.1875) the sum can have a fraction; this module
//! rounds it to the nearest integer. At 224 (and 192, 256, ...) it is an integer.
//! (Integer and real division agree at 224; the worked example cannot tell them apart, the
//! code can.)
//!
//! # Score (always at resolution 224, whatever resolution the FLOPs are counted at)
//! * Layers: 1 per `ConvKXBNRELU`, 3 per sub-block.
//! * Log terms (`get_deepmad_forward`; the 0.5 is that code's `log(sqrt(.))`):
//!   `ConvKXBNRELU` `0.5 ln(cin k^2)`; bottleneck sub-block `0.5 [ln cin + ln(btn k^2) + ln btn]`;
//!   depthwise sub-block `0.5 [ln cin + ln k^2 + ln btn]`.
//! * Widths for rho (`get_width`): `cin k^2`; bottleneck `cin btn k^2 btn`; depthwise
//!   `cin k^2 btn` (one width per sub-block, standing for its three layers).
//! * Stages (`CnnNet.get_stage_info`): a stage ends before every stride-2 block except the first
//!   block, and at the last block. The score needs exactly 5 stages.
//! * Feature-map side H_i at a stage's end: 224 divided by each stride with integer division
//!   (`get_output_resolution`: `input_resolution // stride`), except that `SE` reports an output
//!   side of 1, so every stage that ends at or after the first SE block has H_i = 1. (A stride-2
//!   layer after an SE block would make that side `1 // 2 = 0` and the entropy -inf;
//!   [`analyze_tinynas`] rejects such structures, [`score_tinynas`] returns the -inf.)
//! * Entropy (`ComputeDeepMadScore.ratio_score`): `sum_i alpha_i [ln C_i + ln(H_i^2)] S_i`, with
//!   `C_i` the stage's output channels and `S_i` the sum of the log terms of every block and
//!   sub-block from the input to the end of stage i. A stage with `alpha_i == 0` adds 0.
//! * rho (`CnnNet.get_efficient_score`): `max_i L_i / exp(W_i / L_i)`, with `L_i` the layers and
//!   `W_i` the sum of ln widths from the input to the end of stage i.
//! * Q (`Strategy.get_info_for_evolution`): `exp(population std of the L values of every super
//!   block)`; when the second block is a `SuperResK1KXK1` the first two L values are dropped (that
//!   code drops one, asserts four remain, and drops another). An empty list has std 0 here (NaN
//!   there). Fitness = entropy - beta Q.
//!
//! Worked example (a result of that code's own search, R18 budget): stem 3->32 k3 s2, then
//! `SuperResK1KXK1` (32,104,32,3,2,1), (104,416,40,5,2,7), (416,616,64,5,2,12),
//! (616,616,64,5,1,12), (616,2048,512,3,2,1): params 10,576,000, FLOPs 1,818,075,616, 100
//! layers, rho 0.2968996540678661, fitness 29291.463439930158 (alpha {1,1,1,1,8}, beta 10);
//! see the tests of `score.rs`.

mod convert;
mod count;
mod format;
mod literal;
mod score;

pub(crate) use convert::blocks;
pub use count::SCORE_RESOLUTION;
pub(crate) use count::{block_counts, BlockCounter, BlockCounts};
pub use score::{analyze_tinynas, score_tinynas};
pub(crate) use score::{budget, score_tinynas_with};

use crate::arch::MAX_DIMENSION;
use crate::error::DesignError;

/// The shape of one TinyNAS super-block: `depth` (`L`) sub-blocks, the first of which maps
/// `in_channels -> out` with `stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SuperBlock {
    pub in_channels: u32,
    pub out: u32,
    pub btn: u32,
    pub kernel: u32,
    pub stride: u32,
    pub depth: u32,
}

/// One block of a TinyNAS structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TinyBlock {
    /// `ConvKXBNRELU`: conv + BN + ReLU (the stem, or a 1x1 head conv).
    Conv {
        in_channels: u32,
        out: u32,
        kernel: u32,
        stride: u32,
    },
    /// `SuperResK1KXK1`: ResNet-style bottlenecks.
    Bottleneck(SuperBlock),
    /// `SuperResK1DWK1`: MobileNetV2-style inverted residuals.
    Depthwise(SuperBlock),
    /// `SuperResK1DWSEK1`: inverted residuals with squeeze-excitation.
    DepthwiseSe(SuperBlock),
}

/// A TinyNAS structure: its blocks in order, the first a `ConvKXBNRELU` stem.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TinyNet {
    pub blocks: Vec<TinyBlock>,
}

/// The class names of the released files, in [`TinyBlock`] order.
pub const CLASS_NAMES: [&str; 4] = [
    "ConvKXBNRELU",
    "SuperResK1KXK1",
    "SuperResK1DWK1",
    "SuperResK1DWSEK1",
];

impl TinyBlock {
    /// Returns the class name used in structure files, e.g. `"SuperResK1KXK1"`.
    pub fn class_name(&self) -> &'static str {
        match self {
            TinyBlock::Conv { .. } => CLASS_NAMES[0],
            TinyBlock::Bottleneck(_) => CLASS_NAMES[1],
            TinyBlock::Depthwise(_) => CLASS_NAMES[2],
            TinyBlock::DepthwiseSe(_) => CLASS_NAMES[3],
        }
    }

    /// Returns the inner class name the released files carry (`'inner_class'`), if any.
    pub fn inner_class_name(&self) -> Option<&'static str> {
        match self {
            TinyBlock::Conv { .. } => None,
            TinyBlock::Bottleneck(_) => Some("ResK1KXK1"),
            TinyBlock::Depthwise(_) => Some("ResK1DWK1"),
            TinyBlock::DepthwiseSe(_) => Some("ResK1DWSEK1"),
        }
    }

    /// Returns the super-block shape, or `None` for a `ConvKXBNRELU`.
    pub fn super_block(&self) -> Option<&SuperBlock> {
        match self {
            TinyBlock::Conv { .. } => None,
            TinyBlock::Bottleneck(block)
            | TinyBlock::Depthwise(block)
            | TinyBlock::DepthwiseSe(block) => Some(block),
        }
    }

    /// Returns the input channels.
    pub fn in_channels(&self) -> u32 {
        match self {
            TinyBlock::Conv { in_channels, .. } => *in_channels,
            _ => self.super_block().map_or(0, |block| block.in_channels),
        }
    }

    /// Returns the output channels.
    pub fn out(&self) -> u32 {
        match self {
            TinyBlock::Conv { out, .. } => *out,
            _ => self.super_block().map_or(0, |block| block.out),
        }
    }

    /// Returns the kernel size.
    pub fn kernel(&self) -> u32 {
        match self {
            TinyBlock::Conv { kernel, .. } => *kernel,
            _ => self.super_block().map_or(0, |block| block.kernel),
        }
    }

    /// Returns the stride of the block (of its first sub-block for a super-block).
    pub fn stride(&self) -> u32 {
        match self {
            TinyBlock::Conv { stride, .. } => *stride,
            _ => self.super_block().map_or(0, |block| block.stride),
        }
    }

    /// Returns `L` for a super-block and 1 for a `ConvKXBNRELU`.
    pub fn depth(&self) -> u32 {
        self.super_block().map_or(1, |block| block.depth)
    }
}

/// A broken structural rule: the block index, the field and what is wrong with it (a phrase
/// that reads after the field name).
pub(crate) struct BlockProblem {
    pub index: usize,
    pub field: &'static str,
    pub reason: String,
}

impl TinyNet {
    /// Returns the number of stages as that code counts them (`CnnNet.get_stage_info`): one
    /// per stride-2 block after the first block, plus the one the last block closes.
    pub fn stage_count(&self) -> usize {
        if self.blocks.is_empty() {
            return 0;
        }
        let boundaries = self.blocks[1..]
            .iter()
            .filter(|block| block.stride() == 2)
            .count();
        boundaries + 1
    }

    /// Checks the structural rules (first block a `ConvKXBNRELU`, positive bounded integers,
    /// strides 1 or 2, odd kernels, chained widths) and names the block and field on failure.
    pub fn validate(&self) -> Result<(), DesignError> {
        self.check().map_err(|problem| DesignError::InvalidNetwork {
            location: format!("blocks[{}].{}", problem.index, file_key(problem.field)),
            reason: problem.reason,
        })
    }

    /// The rules behind [`TinyNet::validate`], reported as a [`BlockProblem`].
    pub(crate) fn check(&self) -> Result<(), BlockProblem> {
        let Some(first) = self.blocks.first() else {
            return Err(BlockProblem {
                index: 0,
                field: "class",
                reason: "is missing: a structure needs at least a ConvKXBNRELU stem".into(),
            });
        };
        if !matches!(first, TinyBlock::Conv { .. }) {
            return Err(BlockProblem {
                index: 0,
                field: "class",
                reason: format!(
                    "is {} but the first block must be a ConvKXBNRELU stem",
                    first.class_name()
                ),
            });
        }
        for (index, block) in self.blocks.iter().enumerate() {
            let problem = |field, reason| BlockProblem {
                index,
                field,
                reason,
            };
            check_block(block).map_err(|(field, reason)| problem(field, reason))?;
            if let Some(previous) = index.checked_sub(1).map(|i| &self.blocks[i]) {
                if block.in_channels() != previous.out() {
                    return Err(problem(
                        "in",
                        format!(
                            "is {} but block {} outputs {} channels",
                            block.in_channels(),
                            index - 1,
                            previous.out()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Returns the key a field has in the structure files.
pub(crate) fn file_key(field: &'static str) -> &'static str {
    match field {
        "depth" => "L",
        other => other,
    }
}

/// Checks one block's own fields; the error is `(field, reason)`.
fn check_block(block: &TinyBlock) -> Result<(), (&'static str, String)> {
    positive_bounded(block.in_channels()).map_err(|reason| ("in", reason))?;
    positive_bounded(block.out()).map_err(|reason| ("out", reason))?;
    let kernel = block.kernel();
    if kernel.is_multiple_of(2) || kernel > 15 {
        return Err(("k", format!("must be odd and at most 15, got {kernel}")));
    }
    let stride = block.stride();
    if !(1..=2).contains(&stride) {
        return Err(("s", format!("must be 1 or 2, got {stride}")));
    }
    if let Some(shape) = block.super_block() {
        positive_bounded(shape.btn).map_err(|reason| ("btn", reason))?;
        positive_bounded(shape.depth).map_err(|reason| ("depth", reason))?;
    }
    Ok(())
}

/// Checks that a channel count or depth is in `1..=MAX_DIMENSION`, as the IR requires.
pub(crate) fn positive_bounded(value: u32) -> Result<(), String> {
    if value == 0 || value > MAX_DIMENSION {
        return Err(format!("must be in 1..={MAX_DIMENSION}, got {value}"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Returns a super-block shape from the released files' `(in, out, btn, k, s, L)` order.
    pub(crate) fn shape(
        in_channels: u32,
        out: u32,
        btn: u32,
        kernel: u32,
        stride: u32,
        depth: u32,
    ) -> SuperBlock {
        SuperBlock {
            in_channels,
            out,
            btn,
            kernel,
            stride,
            depth,
        }
    }

    /// Returns a `ConvKXBNRELU` block.
    pub(crate) fn conv(in_channels: u32, out: u32, kernel: u32, stride: u32) -> TinyBlock {
        TinyBlock::Conv {
            in_channels,
            out,
            kernel,
            stride,
        }
    }

    /// The worked example of the issue: a result of the official code's own search at the R18
    /// budget (see the module doc).
    pub(crate) fn worked_example() -> TinyNet {
        TinyNet {
            blocks: vec![
                conv(3, 32, 3, 2),
                TinyBlock::Bottleneck(shape(32, 104, 32, 3, 2, 1)),
                TinyBlock::Bottleneck(shape(104, 416, 40, 5, 2, 7)),
                TinyBlock::Bottleneck(shape(416, 616, 64, 5, 2, 12)),
                TinyBlock::Bottleneck(shape(616, 616, 64, 5, 1, 12)),
                TinyBlock::Bottleneck(shape(616, 2048, 512, 3, 2, 1)),
            ],
        }
    }

    /// The SE reference structure of the issue (from the official repository's released files).
    pub(crate) fn se_reference() -> TinyNet {
        let se = |i, o, b, k, s, l| TinyBlock::DepthwiseSe(shape(i, o, b, k, s, l));
        TinyNet {
            blocks: vec![
                conv(3, 40, 3, 2),
                se(40, 40, 240, 5, 1, 2),
                se(40, 85, 512, 5, 2, 4),
                se(85, 134, 800, 5, 2, 6),
                se(134, 201, 1208, 5, 2, 6),
                se(201, 312, 1872, 5, 2, 5),
                conv(312, 1792, 1, 1),
            ],
        }
    }

    /// A MobileNetV2-like structure of plain depthwise super-blocks, made up for these tests.
    pub(crate) fn depthwise_example() -> TinyNet {
        let dw = |i, o, b, k, s, l| TinyBlock::Depthwise(shape(i, o, b, k, s, l));
        TinyNet {
            blocks: vec![
                conv(3, 16, 3, 2),
                dw(16, 24, 48, 3, 2, 2),
                dw(24, 40, 96, 5, 2, 3),
                dw(40, 80, 160, 3, 2, 4),
                dw(80, 80, 320, 3, 1, 3),
                dw(80, 160, 480, 5, 2, 3),
                conv(160, 1280, 1, 1),
            ],
        }
    }

    #[test]
    fn references_have_five_stages_and_validate() {
        for net in [worked_example(), se_reference(), depthwise_example()] {
            assert_eq!(net.stage_count(), 5);
            net.validate().unwrap();
        }
        assert_eq!(TinyNet { blocks: vec![] }.stage_count(), 0);
    }

    #[test]
    fn validation_names_block_and_field() {
        let mut net = worked_example();
        net.blocks[2] = TinyBlock::Bottleneck(shape(100, 416, 40, 5, 2, 7));
        let message = net.validate().unwrap_err().to_string();
        assert!(
            message.contains("blocks[2].in is 100 but block 1 outputs 104"),
            "{message}"
        );
        let mut net = worked_example();
        net.blocks[3] = TinyBlock::Bottleneck(shape(416, 616, 64, 4, 2, 12));
        let message = net.validate().unwrap_err().to_string();
        assert!(message.contains("blocks[3].k must be odd"), "{message}");
        let mut net = worked_example();
        net.blocks[4] = TinyBlock::Bottleneck(shape(616, 616, 64, 5, 1, 0));
        let message = net.validate().unwrap_err().to_string();
        assert!(message.contains("blocks[4].L must be in 1..="), "{message}");
        let net = TinyNet {
            blocks: worked_example().blocks[1..].to_vec(),
        };
        let message = net.validate().unwrap_err().to_string();
        assert!(
            message.contains("blocks[0].class is SuperResK1KXK1"),
            "{message}"
        );
    }
}
