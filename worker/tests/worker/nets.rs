//! Small designs of every block family, for tests that must run on two CPU cores.

use deepmad_design::{Activation, BlockKind, Mid, Network, Stage, Stem};

fn stage(block: BlockKind, cin: u32, out: u32, stride: u32, depth: u32) -> Stage {
    let mid = match block {
        BlockKind::Basic => None,
        BlockKind::Bottleneck => Some(Mid::Width(out / 2)),
        BlockKind::Mbconv => Some(Mid::Ratio(3)),
    };
    Stage {
        block,
        in_channels: cin,
        out,
        stride,
        depth,
        kernel: 3,
        mid,
        se: false,
    }
}

/// A three-stage network of one family: 8 -> 8 (stride 1) -> 16 (stride 2) -> 24 (stride 2),
/// so every block kind meets both an identity and a projection (or no) shortcut.
pub fn tiny(block: BlockKind, in_channels: u32, resolution: u32, classes: u32) -> Network {
    let activation = match block {
        BlockKind::Mbconv => Activation::Relu6,
        _ => Activation::Relu,
    };
    Network {
        resolution,
        in_channels,
        num_classes: classes,
        activation,
        stem: Stem {
            out: 8,
            kernel: 3,
            stride: 1,
            max_pool: false,
        },
        stages: vec![
            stage(block, 8, 8, 1, 2),
            stage(block, 8, 16, 2, 2),
            stage(block, 16, 24, 2, 1),
        ],
        head: (block == BlockKind::Mbconv).then_some(32),
    }
}

/// The mbconv family with squeeze-excitation and SiLU (EfficientNet's choices); its first
/// stage has expansion ratio 1 (no expansion conv), as MobileNetV2 and EfficientNet do.
pub fn tiny_mbconv_se(in_channels: u32, resolution: u32, classes: u32) -> Network {
    let mut net = tiny(BlockKind::Mbconv, in_channels, resolution, classes);
    net.activation = Activation::Silu;
    for stage in &mut net.stages {
        stage.se = true;
    }
    net.stages[0].mid = Some(Mid::Ratio(1));
    net.stages[0].depth = 1;
    net
}

/// Every family, named.
pub fn all_families(
    in_channels: u32,
    resolution: u32,
    classes: u32,
) -> Vec<(&'static str, Network)> {
    vec![
        (
            "basic",
            tiny(BlockKind::Basic, in_channels, resolution, classes),
        ),
        (
            "bottleneck",
            tiny(BlockKind::Bottleneck, in_channels, resolution, classes),
        ),
        (
            "mbconv",
            tiny(BlockKind::Mbconv, in_channels, resolution, classes),
        ),
        (
            "mbconv-se",
            tiny_mbconv_se(in_channels, resolution, classes),
        ),
    ]
}
