//! The mathematical program of Sec. 4.3: its inputs, its search space and their validation.

use serde::{Deserialize, Serialize};

use crate::arch::{Activation, BlockKind};
use crate::error::DesignError;
use crate::score::{ObjectiveKind, DEFAULT_BETA};

/// The block family a design problem builds with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    Basic,
    Bottleneck,
    Mbconv,
    /// MobileNetV2 blocks followed by SE, as in EfficientNet (the paper's Sec. 5.2 block).
    MbconvSe,
}

impl Family {
    /// Parses `basic`, `bottleneck`, `mbconv` or `mbconv-se`.
    pub fn parse(text: &str) -> Result<Family, DesignError> {
        match text.to_ascii_lowercase().replace('_', "-").as_str() {
            "basic" => Ok(Family::Basic),
            "bottleneck" => Ok(Family::Bottleneck),
            "mbconv" => Ok(Family::Mbconv),
            "mbconv-se" => Ok(Family::MbconvSe),
            _ => Err(DesignError::InvalidInput {
                field: "block",
                reason: format!(
                    "unknown block family {text:?} (known: basic, bottleneck, mbconv, mbconv-se)"
                ),
            }),
        }
    }

    /// Returns the name [`Family::parse`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Family::Basic => "basic",
            Family::Bottleneck => "bottleneck",
            Family::Mbconv => "mbconv",
            Family::MbconvSe => "mbconv-se",
        }
    }

    /// Returns the IR block kind.
    pub fn block(self) -> BlockKind {
        match self {
            Family::Basic => BlockKind::Basic,
            Family::Bottleneck => BlockKind::Bottleneck,
            Family::Mbconv | Family::MbconvSe => BlockKind::Mbconv,
        }
    }

    /// Returns true for the inverted-residual families.
    pub fn is_mobile(self) -> bool {
        matches!(self, Family::Mbconv | Family::MbconvSe)
    }

    /// Returns the activation designs of this family use (ReLU for ResNet blocks, SiLU as
    /// EfficientNet for inverted residuals).
    pub fn activation(self) -> Activation {
        if self.is_mobile() {
            Activation::Silu
        } else {
            Activation::Relu
        }
    }
}

/// The bounds of the search: which networks the solver may return.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSpace {
    /// Stride of the 3x3 stem conv.
    pub stem_stride: u32,
    /// Stride of each stage's first block; its length is the number of stages.
    pub stage_strides: Vec<u32>,
    /// Every width is a multiple of this.
    pub channel_step: u32,
    pub min_stem: u32,
    pub max_stem: u32,
    /// Largest stage output width.
    pub max_channels: u32,
    /// Largest inner (btn / expanded) width.
    pub max_mid: u32,
    pub kernels: Vec<u32>,
    pub max_depth: u32,
    pub first_stage_max_depth: u32,
    /// A stage's output is at most this many times its input (TinyNAS's `out <= 4 * in`).
    pub max_growth: u32,
    /// Inner width bounds relative to the stage's output, in tenths: bottleneck [1, 10]
    /// (btn in [out/10, out]), inverted residual [10, 60] (expansion 1 to 6).
    pub mid_min_tenths: u32,
    pub mid_max_tenths: u32,
    /// Whether the network ends with a searched 1x1 head conv (inverted-residual families).
    pub head: bool,
    /// The head conv's width is at most this many times the last stage's output.
    pub max_head_growth: u32,
}

impl SearchSpace {
    /// Returns the default space for a family at a resolution: TinyNAS's space at ImageNet
    /// resolutions (five stages, strides 2,2,2,1,2 after a stride-2 stem for ResNet blocks,
    /// 2,2,2,2,1 plus a head conv for inverted residuals), and for inputs under 128 pixels
    /// the same with a stride-1 stem and stride-1 first stage (three down-samplings).
    pub fn default_for(family: Family, resolution: u32) -> SearchSpace {
        let small = resolution < 128;
        let mobile = family.is_mobile();
        let mut stage_strides = if mobile {
            vec![2, 2, 2, 2, 1]
        } else {
            vec![2, 2, 2, 1, 2]
        };
        if small {
            stage_strides[0] = 1;
        }
        SearchSpace {
            stem_stride: if small { 1 } else { 2 },
            stage_strides,
            channel_step: 8,
            min_stem: 8,
            max_stem: 32,
            max_channels: if mobile { 1280 } else { 2048 },
            max_mid: if mobile { 6 * 1280 } else { 2048 },
            kernels: if mobile { vec![3, 5, 7] } else { vec![3, 5] },
            max_depth: 16,
            first_stage_max_depth: 3,
            max_growth: 4,
            mid_min_tenths: if mobile { 10 } else { 1 },
            mid_max_tenths: if mobile { 60 } else { 10 },
            head: mobile,
            max_head_growth: 4,
        }
    }

    fn validate(&self, family: Family) -> Result<(), DesignError> {
        let bad = |reason: String| DesignError::InvalidInput {
            field: "space",
            reason,
        };
        if self.stage_strides.is_empty() || self.stage_strides.len() > 12 {
            return Err(bad("stage_strides must have 1 to 12 entries".into()));
        }
        if let Some(s) = self
            .stage_strides
            .iter()
            .chain([&self.stem_stride])
            .find(|s| !(1..=2).contains(*s))
        {
            return Err(bad(format!("strides must be 1 or 2, got {s}")));
        }
        if self.channel_step == 0 || self.min_stem == 0 || self.min_stem > self.max_stem {
            return Err(bad(
                "need channel_step > 0 and 0 < min_stem <= max_stem".into()
            ));
        }
        if self.max_channels < self.channel_step || self.max_mid < self.channel_step {
            return Err(bad(
                "max_channels and max_mid must be at least channel_step".into(),
            ));
        }
        if self.kernels.is_empty() || self.kernels.iter().any(|k| k % 2 == 0 || *k > 15) {
            return Err(bad("kernels must be odd sizes up to 15".into()));
        }
        if self.max_depth == 0 || self.first_stage_max_depth == 0 || self.max_depth > 64 {
            return Err(bad("depth limits must be in 1..=64".into()));
        }
        if self.max_growth == 0
            || self.mid_min_tenths == 0
            || self.mid_min_tenths > self.mid_max_tenths
        {
            return Err(bad(
                "need max_growth > 0 and 0 < mid_min_tenths <= mid_max_tenths".into(),
            ));
        }
        if self.head && !family.is_mobile() {
            return Err(bad(
                "a head conv is only searched for mbconv families".into()
            ));
        }
        Ok(())
    }
}

/// One design problem: maximise the objective subject to the budgets and rho <= rho0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Problem {
    pub family: Family,
    #[serde(default)]
    pub objective: ObjectiveKind,
    /// Parameter budget (`None`: unbounded, but one of params / flops must be set).
    pub params: Option<u64>,
    /// FLOPs (multiply-accumulate) budget.
    pub flops: Option<u64>,
    /// The effectiveness bound rho0.
    pub rho: f64,
    /// Scale weights; `None` gives {1, ..., 1, 8}.
    #[serde(default)]
    pub alpha: Option<Vec<f64>>,
    #[serde(default = "default_beta")]
    pub beta: f64,
    pub resolution: u32,
    #[serde(default = "default_in_channels")]
    pub in_channels: u32,
    pub num_classes: u32,
    #[serde(default)]
    pub max_layers: Option<u32>,
    /// `None` gives [`SearchSpace::default_for`].
    #[serde(default)]
    pub space: Option<SearchSpace>,
}

fn default_beta() -> f64 {
    DEFAULT_BETA
}

fn default_in_channels() -> u32 {
    3
}

impl Problem {
    /// Returns a problem with the defaults of `deepmad design`.
    pub fn new(family: Family, params: Option<u64>, flops: Option<u64>, rho: f64) -> Problem {
        Problem {
            family,
            objective: ObjectiveKind::Paper,
            params,
            flops,
            rho,
            alpha: None,
            beta: DEFAULT_BETA,
            resolution: 224,
            in_channels: 3,
            num_classes: 1000,
            max_layers: None,
            space: None,
        }
    }

    /// Returns the search space in effect.
    pub fn space(&self) -> SearchSpace {
        self.space
            .clone()
            .unwrap_or_else(|| SearchSpace::default_for(self.family, self.resolution))
    }

    /// Checks every input, naming the field on failure.
    pub fn validate(&self) -> Result<(), DesignError> {
        let bad = |field: &'static str, reason: String| DesignError::InvalidInput { field, reason };
        if !self.rho.is_finite() || self.rho <= 0.0 {
            return Err(bad(
                "rho",
                format!("must be a positive number, got {}", self.rho),
            ));
        }
        if self.params.is_none() && self.flops.is_none() {
            return Err(bad(
                "budget",
                "set a params budget, a FLOPs budget or both".into(),
            ));
        }
        if self.params == Some(0) || self.flops == Some(0) {
            return Err(bad("budget", "budgets must be positive".into()));
        }
        if !self.beta.is_finite() || self.beta < 0.0 {
            return Err(bad(
                "beta",
                format!("must be finite and non-negative, got {}", self.beta),
            ));
        }
        if !(8..=4096).contains(&self.resolution) {
            return Err(bad(
                "resolution",
                format!("must be in 8..=4096, got {}", self.resolution),
            ));
        }
        if self.num_classes == 0 || self.in_channels == 0 {
            return Err(bad(
                "num_classes",
                "classes and input channels must be positive".into(),
            ));
        }
        if self.max_layers == Some(0) {
            return Err(bad("max_layers", "must be positive".into()));
        }
        let space = self.space();
        space.validate(self.family)?;
        if self.objective == ObjectiveKind::Tinynas {
            if self.family == Family::Basic {
                return Err(bad("block", "the tinynas objective has no basic-block form; use bottleneck, mbconv or mbconv-se".into()));
            }
            if space.stem_stride != 2
                || space.stage_strides.iter().filter(|s| **s == 2).count() != 4
            {
                return Err(bad("space", "the tinynas objective scores exactly five stages: a stride-2 stem and four stride-2 stages".into()));
            }
        }
        if let Some(alpha) = &self.alpha {
            let scales = scale_count(&space);
            if alpha.len() != scales {
                return Err(bad(
                    "alpha",
                    format!("has {} entries but the design has {scales} down-sampling scales (one weight each)", alpha.len()),
                ));
            }
            if let Some(x) = alpha.iter().find(|a| !a.is_finite() || **a < 0.0) {
                return Err(bad(
                    "alpha",
                    format!("entries must be finite and non-negative, got {x}"),
                ));
            }
        }
        Ok(())
    }

    /// Returns the scale weights in effect.
    pub fn alpha(&self) -> Vec<f64> {
        self.alpha
            .clone()
            .unwrap_or_else(|| crate::score::default_alpha(scale_count(&self.space())))
    }
}

/// Returns the number of down-sampling scales of every design in `space`: a scale ends just
/// before each stride-2 stage and after the last layer (see `count::walk`; solver designs
/// have no stem max pool, so the stem always opens the first scale).
pub fn scale_count(space: &SearchSpace) -> usize {
    space.stage_strides.iter().filter(|s| **s == 2).count() + 1
}
