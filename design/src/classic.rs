//! Built-in classic networks, defined as torchvision defines them.
//!
//! Their parameter counts equal torchvision's exactly and their FLOPs are within 2% of the
//! published numbers (see the tests in `count.rs`); they are the yardsticks of Tables 1 and 2.

use crate::arch::{Activation, BlockKind, Mid, Network, Stage, Stem};
use crate::error::DesignError;

/// The names [`by_name`] accepts.
pub const NAMES: [&str; 5] = [
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "efficientnet_b0",
];

/// Returns the classic network `name` for `num_classes` classes at `resolution`.
pub fn by_name(name: &str, num_classes: u32, resolution: u32) -> Result<Network, DesignError> {
    let normalized = name.to_ascii_lowercase().replace(['-', '_'], "");
    let net = match normalized.as_str() {
        "resnet18" => resnet(BlockKind::Basic, [2, 2, 2, 2]),
        "resnet34" => resnet(BlockKind::Basic, [3, 4, 6, 3]),
        "resnet50" => resnet(BlockKind::Bottleneck, [3, 4, 6, 3]),
        "mobilenetv2" => mobilenet_v2(),
        "efficientnetb0" => efficientnet_b0(),
        _ => {
            return Err(DesignError::UnknownNetwork {
                name: name.to_string(),
                known: NAMES.join(", "),
            })
        }
    };
    let net = Network {
        num_classes,
        resolution,
        ..net
    };
    net.validate()?;
    Ok(net)
}

/// Builds stages from rows, chaining each stage's input to the previous output.
/// One stage as `(block, out, stride, depth, kernel, mid, se)`: torchvision's tables, row by row.
type Row = (BlockKind, u32, u32, u32, u32, Option<Mid>, bool);

fn chain(stem_out: u32, rows: &[Row]) -> Vec<Stage> {
    let mut in_channels = stem_out;
    rows.iter()
        .map(|&(block, out, stride, depth, kernel, mid, se)| {
            let stage = Stage {
                block,
                in_channels,
                out,
                stride,
                depth,
                kernel,
                mid,
                se,
            };
            in_channels = out;
            stage
        })
        .collect()
}

/// torchvision's ResNet (v1.5: the stride sits on the 3x3 conv of a bottleneck).
fn resnet(block: BlockKind, depths: [u32; 4]) -> Network {
    let expansion = if block == BlockKind::Bottleneck { 4 } else { 1 };
    let rows: Vec<_> = [64u32, 128, 256, 512]
        .iter()
        .zip(depths)
        .enumerate()
        .map(|(index, (&width, depth))| {
            let stride = if index == 0 { 1 } else { 2 };
            let mid = (block == BlockKind::Bottleneck).then_some(Mid::Width(width));
            (block, width * expansion, stride, depth, 3, mid, false)
        })
        .collect();
    Network {
        resolution: 224,
        in_channels: 3,
        num_classes: 1000,
        activation: Activation::Relu,
        stem: Stem {
            out: 64,
            kernel: 7,
            stride: 2,
            max_pool: true,
        },
        stages: chain(64, &rows),
        head: None,
    }
}

/// torchvision's MobileNetV2 (width multiplier 1.0).
fn mobilenet_v2() -> Network {
    let m = BlockKind::Mbconv;
    let rows = [
        (m, 16, 1, 1, 3, Some(Mid::Ratio(1)), false),
        (m, 24, 2, 2, 3, Some(Mid::Ratio(6)), false),
        (m, 32, 2, 3, 3, Some(Mid::Ratio(6)), false),
        (m, 64, 2, 4, 3, Some(Mid::Ratio(6)), false),
        (m, 96, 1, 3, 3, Some(Mid::Ratio(6)), false),
        (m, 160, 2, 3, 3, Some(Mid::Ratio(6)), false),
        (m, 320, 1, 1, 3, Some(Mid::Ratio(6)), false),
    ];
    Network {
        resolution: 224,
        in_channels: 3,
        num_classes: 1000,
        activation: Activation::Relu6,
        stem: Stem {
            out: 32,
            kernel: 3,
            stride: 2,
            max_pool: false,
        },
        stages: chain(32, &rows),
        head: Some(1280),
    }
}

/// torchvision's EfficientNet-B0 (MBConv with SE, squeeze = block input / 4, SiLU).
fn efficientnet_b0() -> Network {
    let m = BlockKind::Mbconv;
    let rows = [
        (m, 16, 1, 1, 3, Some(Mid::Ratio(1)), true),
        (m, 24, 2, 2, 3, Some(Mid::Ratio(6)), true),
        (m, 40, 2, 2, 5, Some(Mid::Ratio(6)), true),
        (m, 80, 2, 3, 3, Some(Mid::Ratio(6)), true),
        (m, 112, 1, 3, 5, Some(Mid::Ratio(6)), true),
        (m, 192, 2, 4, 5, Some(Mid::Ratio(6)), true),
        (m, 320, 1, 1, 3, Some(Mid::Ratio(6)), true),
    ];
    Network {
        resolution: 224,
        in_channels: 3,
        num_classes: 1000,
        activation: Activation::Silu,
        stem: Stem {
            out: 32,
            kernel: 3,
            stride: 2,
            max_pool: false,
        },
        stages: chain(32, &rows),
        head: Some(1280),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let message = by_name("vgg16", 1000, 224).unwrap_err().to_string();
        assert!(
            message.contains("vgg16") && message.contains("resnet50"),
            "{message}"
        );
    }

    #[test]
    fn names_are_case_and_dash_insensitive() {
        assert!(by_name("ResNet-50", 10, 32).is_ok());
        assert!(by_name("mobilenet-v2", 10, 32).is_ok());
    }
}
