//! Conversions between TinyNAS structures and the architecture IR ([`Network`]).
//!
//! The mapping keeps the architecture, not the counts: scoring the converted IR in paper mode
//! ([`crate::score`], [`crate::count`]) gives other numbers than [`super::score_tinynas`],
//! because the IR's bottlenecks project only when the shape changes (TinyNAS's first
//! `ResK1KXK1` always projects), the IR's SE squeezes to a quarter of the block's input
//! channels with biased convs and no BN (EfficientNet's), the IR counts the classifier and
//! multiply-accumulates only (no BN, ReLU or shortcut terms), and the IR's sides round up.

use super::{SuperBlock, TinyBlock, TinyNet};
use crate::arch::{Activation, BlockKind, Mid, Network, Stage, Stem};
use crate::error::DesignError;

const TARGET: &str = "a TinyNAS structure";

impl TinyNet {
    /// Converts an IR network: the stem (without max pool) becomes a `ConvKXBNRELU`, bottleneck
    /// stages with an absolute inner width `SuperResK1KXK1`, mbconv stages with an absolute
    /// inner width `SuperResK1DWK1` (`SuperResK1DWSEK1` with SE), the head a 1x1 stride-1
    /// `ConvKXBNRELU`. The activation, class count and resolution are not part of a structure.
    ///
    /// Fails with [`DesignError::Unsupported`] for basic blocks, ratio inner widths and a max
    /// pool, which TinyNAS structures cannot express.
    pub fn from_network(net: &Network) -> Result<TinyNet, DesignError> {
        net.validate()?;
        if net.stem.max_pool {
            return Err(DesignError::Unsupported {
                what: "the stem's max pool".into(),
                target: TARGET,
                reason:
                    "TinyNAS stems are a single ConvKXBNRELU; down-sample with a stride instead"
                        .into(),
            });
        }
        for (index, stage) in net.stages.iter().enumerate() {
            super_block_of(stage, index)?;
        }
        Ok(TinyNet {
            blocks: blocks(net).collect(),
        })
    }

    /// Converts to an IR network with ReLU activations for `num_classes` classes at
    /// `resolution`: the first block becomes the stem, super-blocks become stages, and a
    /// trailing 1x1 stride-1 `ConvKXBNRELU` after the last super-block becomes the head.
    ///
    /// Fails with [`DesignError::Unsupported`] for a `ConvKXBNRELU` anywhere else but the first
    /// block, and with the IR's validation error when the result breaks an IR rule.
    pub fn to_network(&self, num_classes: u32, resolution: u32) -> Result<Network, DesignError> {
        self.validate()?;
        let Some((
            TinyBlock::Conv {
                in_channels,
                out,
                kernel,
                stride,
            },
            rest,
        )) = self.blocks.split_first()
        else {
            unreachable!("validate checks that the first block is a ConvKXBNRELU");
        };
        let (stages, head) = stages_and_head(rest)?;
        let network = Network {
            resolution,
            in_channels: *in_channels,
            num_classes,
            activation: Activation::Relu,
            stem: Stem {
                out: *out,
                kernel: *kernel,
                stride: *stride,
                max_pool: false,
            },
            stages,
            head,
        };
        network.validate()?;
        Ok(network)
    }
}

/// Returns the blocks of `net`'s structure without allocating (the solver converts millions
/// of candidates). Every stage must convert (see [`TinyNet::from_network`]).
pub(crate) fn blocks(net: &Network) -> impl Iterator<Item = TinyBlock> + Clone + '_ {
    let stem = TinyBlock::Conv {
        in_channels: net.in_channels,
        out: net.stem.out,
        kernel: net.stem.kernel,
        stride: net.stem.stride,
    };
    let head = net.head.map(|head| TinyBlock::Conv {
        in_channels: net.stages.last().map_or(net.stem.out, |stage| stage.out),
        out: head,
        kernel: 1,
        stride: 1,
    });
    let stages = net.stages.iter().enumerate().map(|(index, stage)| {
        super_block_of(stage, index).expect("the caller checked that every stage converts")
    });
    std::iter::once(stem).chain(stages).chain(head)
}

/// Converts the blocks after the stem: super-blocks to stages, a trailing 1x1 stride-1
/// `ConvKXBNRELU` after at least one super-block to the head.
fn stages_and_head(rest: &[TinyBlock]) -> Result<(Vec<Stage>, Option<u32>), DesignError> {
    let mut stages = Vec::with_capacity(rest.len());
    let mut head = None;
    for (offset, block) in rest.iter().enumerate() {
        let is_last = offset + 1 == rest.len();
        match block {
            TinyBlock::Conv {
                kernel: 1,
                stride: 1,
                out,
                ..
            } if is_last && !stages.is_empty() => head = Some(*out),
            TinyBlock::Conv { .. } => return Err(conv_not_at_the_ends(offset + 1)),
            TinyBlock::Bottleneck(shape) => {
                stages.push(stage_of(BlockKind::Bottleneck, shape, false))
            }
            TinyBlock::Depthwise(shape) => stages.push(stage_of(BlockKind::Mbconv, shape, false)),
            TinyBlock::DepthwiseSe(shape) => stages.push(stage_of(BlockKind::Mbconv, shape, true)),
        }
    }
    Ok((stages, head))
}

fn conv_not_at_the_ends(index: usize) -> DesignError {
    DesignError::Unsupported {
        what: format!("the ConvKXBNRELU at block {index}"),
        target: "an architecture IR network",
        reason: "the IR has plain convolutions only as the stem (the first block) and as a 1x1 \
                 stride-1 head after the last super-block"
            .into(),
    }
}

fn stage_of(block: BlockKind, shape: &SuperBlock, se: bool) -> Stage {
    Stage {
        block,
        in_channels: shape.in_channels,
        out: shape.out,
        stride: shape.stride,
        depth: shape.depth,
        kernel: shape.kernel,
        mid: Some(Mid::Width(shape.btn)),
        se,
    }
}

/// Converts one IR stage to a super-block.
fn super_block_of(stage: &Stage, index: usize) -> Result<TinyBlock, DesignError> {
    let unsupported = |reason: &str| DesignError::Unsupported {
        what: format!("stages[{index}] ({} blocks)", stage.block.name()),
        target: TARGET,
        reason: reason.to_string(),
    };
    let btn = match stage.mid {
        Some(Mid::Width(width)) => width,
        Some(Mid::Ratio(_)) => {
            return Err(unsupported("TinyNAS super-blocks take an absolute inner width ('btn'), not an expansion ratio"))
        }
        None => {
            return Err(unsupported("TinyNAS has no basic-block super-block (only SuperResK1KXK1, SuperResK1DWK1 and SuperResK1DWSEK1)"))
        }
    };
    let shape = SuperBlock {
        in_channels: stage.in_channels,
        out: stage.out,
        btn,
        kernel: stage.kernel,
        stride: stage.stride,
        depth: stage.depth,
    };
    Ok(match (stage.block, stage.se) {
        (BlockKind::Bottleneck, _) => TinyBlock::Bottleneck(shape),
        (BlockKind::Mbconv, false) => TinyBlock::Depthwise(shape),
        (BlockKind::Mbconv, true) => TinyBlock::DepthwiseSe(shape),
        (BlockKind::Basic, _) => return Err(unsupported("TinyNAS has no basic-block super-block")),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{conv, depthwise_example, se_reference, shape, worked_example};
    use super::*;
    use crate::classic;
    use crate::count;

    #[test]
    fn round_trips_through_the_ir() {
        for tiny in [worked_example(), se_reference(), depthwise_example()] {
            let net = tiny.to_network(1000, 224).unwrap();
            assert_eq!(net.activation, Activation::Relu);
            assert_eq!(
                net.stages.len(),
                tiny.blocks
                    .iter()
                    .filter(|b| b.super_block().is_some())
                    .count()
            );
            assert_eq!(TinyNet::from_network(&net).unwrap(), tiny);
        }
        let net = se_reference().to_network(10, 192).unwrap();
        assert_eq!(
            (net.head, net.num_classes, net.resolution),
            (Some(1792), 10, 192)
        );
        assert!(net
            .stages
            .iter()
            .all(|stage| stage.se && stage.block == BlockKind::Mbconv));
        assert_eq!(worked_example().to_network(1000, 224).unwrap().head, None);
    }

    /// The module doc warns that the IR's paper-mode counts differ; this pins one reason:
    /// the always-present projection and the BN parameters make TinyNAS's count larger here
    /// even though the IR adds the classifier.
    #[test]
    fn paper_mode_counts_of_the_converted_ir_differ() {
        let net = worked_example().to_network(1000, 224).unwrap();
        let totals = count::totals(&net);
        assert_ne!(totals.params, 10_576_000);
        assert_ne!(totals.flops, 1_818_075_616);
    }

    #[test]
    fn classic_nets_are_unsupported() {
        for name in ["resnet18", "resnet50", "mobilenet_v2"] {
            let net = classic::by_name(name, 1000, 224).unwrap();
            let error = TinyNet::from_network(&net).unwrap_err();
            assert!(
                matches!(
                    error,
                    DesignError::Unsupported {
                        target: "a TinyNAS structure",
                        ..
                    }
                ),
                "{name}: {error}"
            );
        }
        let mut net = classic::by_name("resnet18", 1000, 224).unwrap();
        net.stem.max_pool = false;
        let message = TinyNet::from_network(&net).unwrap_err().to_string();
        assert!(
            message.contains("stages[0] (basic blocks) cannot be expressed as a TinyNAS structure"),
            "{message}"
        );
        let mut net = classic::by_name("mobilenet_v2", 1000, 224).unwrap();
        net.stem.max_pool = false;
        let message = TinyNet::from_network(&net).unwrap_err().to_string();
        assert!(message.contains("expansion ratio"), "{message}");
    }

    #[test]
    fn plain_convs_inside_a_structure_are_unsupported() {
        let mut tiny = worked_example();
        tiny.blocks.insert(3, conv(416, 416, 3, 1));
        let error = tiny.to_network(1000, 224).unwrap_err();
        assert!(matches!(error, DesignError::Unsupported { .. }), "{error}");
        assert!(error.to_string().contains("block 3"), "{error}");
        let mut tiny = worked_example();
        tiny.blocks.push(conv(2048, 1024, 3, 1));
        assert!(matches!(
            tiny.to_network(1000, 224),
            Err(DesignError::Unsupported { .. })
        ));
        let stem_only = TinyNet {
            blocks: vec![conv(3, 32, 3, 2), conv(32, 64, 1, 1)],
        };
        assert!(matches!(
            stem_only.to_network(1000, 224),
            Err(DesignError::Unsupported { .. })
        ));
        let bad_shape = TinyNet {
            blocks: vec![
                conv(3, 32, 3, 2),
                TinyBlock::Bottleneck(shape(31, 64, 16, 3, 2, 1)),
            ],
        };
        assert!(matches!(
            bad_shape.to_network(1000, 224),
            Err(DesignError::InvalidNetwork { .. })
        ));
    }
}
