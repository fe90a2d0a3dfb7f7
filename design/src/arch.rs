//! The architecture IR: what a network is, its validation, canonical JSON and content hash.
//!
//! A [`Network`] is an input (resolution, channels), a stem convolution, an ordered list of
//! [`Stage`]s, an optional 1x1 head convolution and a linear classifier. Every stage repeats
//! one block family `depth` times; only its first block may change the stride or the width.

use serde::{Deserialize, Serialize};

use crate::digest::sha256_hex;
use crate::error::DesignError;

/// The block family of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// ResNet basic block: kxk conv, kxk conv; projection shortcut when the shape changes.
    Basic,
    /// ResNet bottleneck: 1x1 -> kxk (carries the stride) -> 1x1; projection when the shape changes.
    Bottleneck,
    /// MobileNetV2 inverted residual: 1x1 expand -> depthwise kxk -> [SE] -> 1x1 project;
    /// residual only when input and output shapes match, never a projection.
    Mbconv,
}

impl BlockKind {
    /// Returns the lowercase name used in JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BlockKind::Basic => "basic",
            BlockKind::Bottleneck => "bottleneck",
            BlockKind::Mbconv => "mbconv",
        }
    }
}

/// The activation after each BatchNorm on the main path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Relu6,
    Silu,
}

/// The inner width of bottleneck and inverted-residual blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mid {
    /// The same absolute inner width in every block of the stage (ResNet's `btn`, TinyNAS's `btn`).
    Width(u32),
    /// Inner width = the block's input channels times this ratio (MobileNetV2's `t`).
    /// A ratio of 1 has no expansion convolution, as in torchvision.
    Ratio(u32),
}

/// The stem: one conv + BN + activation, optionally followed by a 3x3 stride-2 max pool (ResNet).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stem {
    pub out: u32,
    pub kernel: u32,
    pub stride: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    pub max_pool: bool,
}

/// One stage: `depth` blocks of one family; the first maps `in_channels -> out` with `stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub block: BlockKind,
    #[serde(rename = "in")]
    pub in_channels: u32,
    pub out: u32,
    pub stride: u32,
    pub depth: u32,
    pub kernel: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid: Option<Mid>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub se: bool,
}

/// A whole network. Its canonical JSON is its identity (see [`Network::content_hash`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub resolution: u32,
    pub in_channels: u32,
    pub num_classes: u32,
    pub activation: Activation,
    pub stem: Stem,
    pub stages: Vec<Stage>,
    /// Output channels of the optional 1x1 head conv before pooling (MobileNetV2's 1280).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<u32>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// The largest channel count, kernel, depth or resolution the IR accepts; far above any real
/// network, it keeps every count inside `u64` and every JSON file honest.
pub const MAX_DIMENSION: u32 = 1 << 16;

impl Stage {
    /// Returns the inner width of block `index` (0-based) of this stage, or `None` for basic blocks.
    pub fn mid_width(&self, index: u32) -> Option<u32> {
        let block_in = if index == 0 {
            self.in_channels
        } else {
            self.out
        };
        match self.mid? {
            Mid::Width(width) => Some(width),
            Mid::Ratio(ratio) => Some(block_in * ratio),
        }
    }
}

impl Network {
    /// Checks every structural rule and names the offending stage and field on failure.
    pub fn validate(&self) -> Result<(), DesignError> {
        let net = |field: &str, reason: String| DesignError::InvalidNetwork {
            location: field.to_string(),
            reason,
        };
        positive_bounded(self.resolution, "resolution").map_err(|r| net("resolution", r))?;
        positive_bounded(self.in_channels, "in_channels").map_err(|r| net("in_channels", r))?;
        positive_bounded(self.num_classes, "num_classes").map_err(|r| net("num_classes", r))?;
        positive_bounded(self.stem.out, "out").map_err(|r| net("stem.out", r))?;
        check_kernel(self.stem.kernel).map_err(|r| net("stem.kernel", r))?;
        check_stride(self.stem.stride).map_err(|r| net("stem.stride", r))?;
        if self.stages.is_empty() {
            return Err(net("stages", "a network needs at least one stage".into()));
        }
        let mut previous_out = self.stem.out;
        for (index, stage) in self.stages.iter().enumerate() {
            stage
                .validate(previous_out)
                .map_err(|(field, reason)| net(&format!("stages[{index}].{field}"), reason))?;
            previous_out = stage.out;
        }
        if let Some(head) = self.head {
            positive_bounded(head, "head").map_err(|r| net("head", r))?;
        }
        Ok(())
    }

    /// Returns the canonical JSON: fixed field order, no whitespace, defaults omitted.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("the IR serializes: it has no maps and no floats")
    }

    /// Returns the SHA-256 of the canonical JSON in hex: the design's identity everywhere.
    pub fn content_hash(&self) -> String {
        sha256_hex(self.canonical_json())
    }

    /// Parses a network from JSON and validates it; errors name the line and column or the field.
    pub fn from_json(text: &str) -> Result<Network, DesignError> {
        let network: Network =
            serde_json::from_str(text).map_err(|error| DesignError::Malformed {
                format: "architecture JSON",
                location: format!("line {}, column {}", error.line(), error.column()),
                reason: error.to_string(),
            })?;
        network.validate()?;
        Ok(network)
    }

    /// Returns the channels entering the classifier.
    pub fn final_channels(&self) -> u32 {
        self.head
            .unwrap_or_else(|| self.stages.last().map_or(self.stem.out, |stage| stage.out))
    }

    /// Returns the layers around the stages in one line, as `deepmad analyze` prints them:
    /// `stem 7x7 conv stride 2 -> 64 + max pool, classifier 2048 -> 1000`.
    pub fn outline(&self) -> String {
        let pool = if self.stem.max_pool {
            " + max pool"
        } else {
            ""
        };
        let head = self
            .head
            .map_or(String::new(), |h| format!(", head 1x1 conv -> {h}"));
        format!(
            "stem {k}x{k} conv stride {} -> {}{pool}{head}, classifier {} -> {}",
            self.stem.stride,
            self.stem.out,
            self.final_channels(),
            self.num_classes,
            k = self.stem.kernel
        )
    }
}

impl Stage {
    fn validate(&self, previous_out: u32) -> Result<(), (&'static str, String)> {
        if self.in_channels != previous_out {
            return Err((
                "in",
                format!(
                    "is {} but the previous layer outputs {previous_out} channels",
                    self.in_channels
                ),
            ));
        }
        positive_bounded(self.out, "out").map_err(|r| ("out", r))?;
        positive_bounded(self.depth, "depth").map_err(|r| ("depth", r))?;
        check_kernel(self.kernel).map_err(|r| ("kernel", r))?;
        check_stride(self.stride).map_err(|r| ("stride", r))?;
        match (self.block, self.mid) {
            (BlockKind::Basic, Some(_)) => {
                return Err(("mid", "basic blocks have no inner width".into()));
            }
            (BlockKind::Bottleneck | BlockKind::Mbconv, None) => {
                return Err((
                    "mid",
                    format!("{} blocks need an inner width", self.block.name()),
                ));
            }
            (_, Some(Mid::Width(width))) => {
                positive_bounded(width, "mid.width").map_err(|r| ("mid", r))?
            }
            (_, Some(Mid::Ratio(ratio))) => {
                if ratio == 0 || ratio > 64 {
                    return Err(("mid", format!("ratio must be in 1..=64, got {ratio}")));
                }
            }
            (BlockKind::Basic, None) => {}
        }
        if self.block == BlockKind::Bottleneck && matches!(self.mid, Some(Mid::Ratio(_))) {
            return Err(("mid", "bottleneck blocks take an absolute width".into()));
        }
        if self.se && self.block != BlockKind::Mbconv {
            return Err((
                "se",
                "squeeze-excitation is only defined for mbconv blocks".into(),
            ));
        }
        Ok(())
    }
}

fn positive_bounded(value: u32, name: &str) -> Result<(), String> {
    if value == 0 || value > MAX_DIMENSION {
        return Err(format!(
            "{name} must be in 1..={MAX_DIMENSION}, got {value}"
        ));
    }
    Ok(())
}

fn check_kernel(kernel: u32) -> Result<(), String> {
    if kernel.is_multiple_of(2) || kernel > 15 {
        return Err(format!("kernel must be odd and at most 15, got {kernel}"));
    }
    Ok(())
}

fn check_stride(stride: u32) -> Result<(), String> {
    if !(1..=2).contains(&stride) {
        return Err(format!("stride must be 1 or 2, got {stride}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classic;

    #[test]
    fn canonical_json_round_trips_and_hash_is_stable() {
        let net = classic::by_name("resnet50", 1000, 224).unwrap();
        let json = net.canonical_json();
        let back = Network::from_json(&json).unwrap();
        assert_eq!(back, net);
        assert_eq!(back.content_hash(), net.content_hash());
        assert_eq!(net.content_hash().len(), 64);
        let other = classic::by_name("resnet34", 1000, 224).unwrap();
        assert_ne!(other.content_hash(), net.content_hash());
    }

    #[test]
    fn validation_names_stage_and_field() {
        let mut net = classic::by_name("resnet18", 1000, 224).unwrap();
        net.stages[2].kernel = 4;
        let message = net.validate().unwrap_err().to_string();
        assert!(message.contains("stages[2].kernel"), "{message}");
        let mut net = classic::by_name("resnet18", 1000, 224).unwrap();
        net.stages[1].in_channels = 7;
        let message = net.validate().unwrap_err().to_string();
        assert!(message.contains("stages[1].in"), "{message}");
    }

    #[test]
    fn malformed_json_says_where() {
        let error = Network::from_json("{\"resolution\": 224,\n \"oops\": 1}").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("line 2"), "{message}");
    }
}
