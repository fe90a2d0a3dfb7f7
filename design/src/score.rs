//! DeepMAD scoring in the paper's conventions (the default objective).
//!
//! * Layer width `w = c_in * k^2 / g` (Sec. 4.1) over main-path layers: the stem, every conv
//!   inside blocks and the head conv; not projections, not SE convs, not the classifier.
//! * Scale entropy `H_i = ln(r_i^2 c_i) * sum ln w` over all main-path layers from the input to
//!   the end of scale i (Prop. 2, Eq. (4)), with `r_i`, `c_i` the true side and channels there.
//! * Network entropy `sum_i alpha_i H_i` (Guideline 1).
//! * Effectiveness `rho = L / exp(mean ln w)` over the whole network (Eq. (2), Prop. 1).
//! * Penalty `Q` = population variance of the stage depths (Guideline 2).
//! * Objective = entropy - beta * Q (Sec. 4.3).

use serde::{Deserialize, Serialize};

use crate::arch::{Network, Stage};
use crate::count::{walk, walk_outline, walk_stage, Event, Outline};
use crate::error::DesignError;
use crate::memo::{Direct, Ln};

/// Which scoring convention to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    /// The paper's Sec. 4 conventions (this module).
    #[default]
    Paper,
    /// The conventions of the paper's official code (see `tinynas`).
    Tinynas,
}

impl ObjectiveKind {
    /// Returns the lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            ObjectiveKind::Paper => "paper",
            ObjectiveKind::Tinynas => "tinynas",
        }
    }
}

/// The headline numbers of a scored network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Score {
    pub params: u64,
    pub flops: u64,
    pub layers: u32,
    pub effectiveness: f64,
    pub entropy: f64,
    pub penalty: f64,
    pub objective: f64,
}

/// One down-sampling scale's entropy term.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScaleTerm {
    /// Feature-map side at the scale's end.
    pub side: u32,
    pub channels: u32,
    /// Sum of ln(width) over main-path layers from the input to the scale's end.
    pub log_width_sum: f64,
    pub alpha: f64,
    /// The unweighted `H_i`.
    pub entropy: f64,
}

/// One stage (or TinyNAS block) of the report table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageReport {
    pub block: String,
    #[serde(rename = "in")]
    pub in_channels: u32,
    pub out: u32,
    pub stride: u32,
    pub depth: u32,
    pub kernel: u32,
    /// Inner width of the stage's first block (btn / expanded width), if any.
    pub mid: Option<u32>,
    pub se: bool,
    /// Output feature-map side.
    pub side: u32,
    pub params: u64,
    pub flops: u64,
    pub layers: u32,
}

impl StageReport {
    /// Headers of [`StageReport::cells`], as `deepmad analyze` and the dashboard show them.
    pub const HEADERS: [&'static str; 11] = [
        "stage", "block", "in", "out", "mid", "k", "s", "depth", "side", "params", "FLOPs",
    ];

    /// The stage's row of the report table (`index` counts from 0): the block (`+se` with
    /// squeeze-excitation), widths, kernel, stride, depth, output side, params and FLOPs.
    pub fn cells(&self, index: usize) -> Vec<String> {
        let block = if self.se {
            format!("{}+se", self.block)
        } else {
            self.block.clone()
        };
        vec![
            (index + 1).to_string(),
            block,
            self.in_channels.to_string(),
            self.out.to_string(),
            self.mid.map_or("-".to_string(), |mid| mid.to_string()),
            self.kernel.to_string(),
            self.stride.to_string(),
            self.depth.to_string(),
            self.side.to_string(),
            crate::units::format_count(self.params),
            crate::units::format_count(self.flops),
        ]
    }
}

/// A full analysis: the score, its terms and a per-stage table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Analysis {
    pub objective_kind: ObjectiveKind,
    pub resolution: u32,
    pub params: u64,
    pub flops: u64,
    pub layers: u32,
    pub effectiveness: f64,
    pub entropy: f64,
    pub penalty: f64,
    pub beta: f64,
    pub objective: f64,
    pub alpha: Vec<f64>,
    pub scales: Vec<ScaleTerm>,
    pub stages: Vec<StageReport>,
}

impl Analysis {
    /// Returns the headline numbers.
    pub fn score(&self) -> Score {
        Score {
            params: self.params,
            flops: self.flops,
            layers: self.layers,
            effectiveness: self.effectiveness,
            entropy: self.entropy,
            penalty: self.penalty,
            objective: self.objective,
        }
    }
}

/// The penalty weight the paper uses (Sec. 4.3).
pub const DEFAULT_BETA: f64 = 10.0;

/// Returns the default scale weights: 1 for every scale but the last, 8 for the last
/// (the paper's {1,1,1,1,8} for five down-samplings, Sec. 4.3).
pub fn default_alpha(scales: usize) -> Vec<f64> {
    let mut alpha = vec![1.0; scales];
    if scales > 1 {
        alpha[scales - 1] = 8.0;
    }
    alpha
}

/// Returns the number of down-sampling scales of `net` (the length its alpha must have).
pub fn scale_count(net: &Network) -> usize {
    let mut count = 0;
    walk(net, &mut |event| {
        if matches!(event, Event::ScaleEnd { .. }) {
            count += 1;
        }
    });
    count
}

/// Checks alpha and beta against `net`, naming the field on failure.
pub fn check_weights(net: &Network, alpha: &[f64], beta: f64) -> Result<(), DesignError> {
    let scales = scale_count(net);
    if alpha.len() != scales {
        return Err(DesignError::InvalidInput {
            field: "alpha",
            reason: format!(
                "has {} entries but the network has {scales} down-sampling scales (one weight each)",
                alpha.len()
            ),
        });
    }
    if let Some(bad) = alpha.iter().find(|a| !a.is_finite() || **a < 0.0) {
        return Err(DesignError::InvalidInput {
            field: "alpha",
            reason: format!("entries must be finite and non-negative, got {bad}"),
        });
    }
    if !beta.is_finite() || beta < 0.0 {
        return Err(DesignError::InvalidInput {
            field: "beta",
            reason: format!("must be finite and non-negative, got {beta}"),
        });
    }
    Ok(())
}

/// Scores `net` in paper mode without allocating. `alpha` must have one weight per scale
/// (see [`check_weights`]); the solver calls this in its inner loop.
pub fn score_paper(net: &Network, alpha: &[f64], beta: f64) -> Score {
    score_paper_with(net, alpha, beta, &mut Direct)
}

/// The most main-path layer groups a stage has: three in its first block, three in the rest.
const STAGE_TERMS: usize = 6;

/// What one stage adds to the paper score.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StageTerms {
    params: u64,
    flops: u64,
    layers: u32,
    /// `count * ln(width)` of each main-path layer group, in layer order: the score adds them
    /// one by one, so a remembered stage sums exactly as a walked one.
    log_terms: [f64; STAGE_TERMS],
    terms: usize,
}

/// Where the paper score gets a stage's terms and the logarithms: computed ([`Direct`]) or
/// remembered (the solver's memos).
pub(crate) trait PaperStages: Ln {
    fn stage_terms(&mut self, stage: &Stage, side: u32) -> StageTerms;
}

impl PaperStages for Direct {
    fn stage_terms(&mut self, stage: &Stage, side: u32) -> StageTerms {
        stage_terms(stage, side, self)
    }
}

/// Folds the layers of `stage` (input side `side`) into its terms.
pub(crate) fn stage_terms(stage: &Stage, side: u32, ln: &mut impl Ln) -> StageTerms {
    let mut terms = StageTerms {
        params: 0,
        flops: 0,
        layers: 0,
        log_terms: [0.0; STAGE_TERMS],
        terms: 0,
    };
    walk_stage(stage, 0, side, &mut |event| {
        if let Event::Layer { layer, count, .. } = event {
            terms.params += layer.params() * u64::from(count);
            terms.flops += layer.macs() * u64::from(count);
            if layer.role.is_main_path() {
                terms.layers += count;
                terms.log_terms[terms.terms] = f64::from(count) * ln.ln(layer.width());
                terms.terms += 1;
            }
        }
    });
    terms
}

/// [`score_paper`] with stage terms and logarithms from `stages` (the solver's memos).
pub(crate) fn score_paper_with(
    net: &Network,
    alpha: &[f64],
    beta: f64,
    stages: &mut impl PaperStages,
) -> Score {
    let mut score = Score::default();
    let mut log_width_sum = 0.0;
    let mut scale = 0;
    walk_outline(net, &mut |item| match item {
        Outline::Layer(layer) => {
            score.params += layer.params();
            score.flops += layer.macs();
            if layer.role.is_main_path() {
                score.layers += 1;
                log_width_sum += stages.ln(layer.width());
            }
        }
        Outline::Stage { stage, side, .. } => {
            let terms = stages.stage_terms(stage, side);
            score.params += terms.params;
            score.flops += terms.flops;
            score.layers += terms.layers;
            for term in &terms.log_terms[..terms.terms] {
                log_width_sum += term;
            }
        }
        Outline::ScaleEnd { side, channels } => {
            let weight = alpha.get(scale).copied().unwrap_or(0.0);
            score.entropy += weight * scale_entropy(side, channels, log_width_sum, stages);
            scale += 1;
        }
    });
    debug_assert_eq!(scale, alpha.len(), "alpha checked against the scales");
    score.effectiveness = effectiveness(score.layers, log_width_sum);
    score.penalty = depth_variance(net);
    score.objective = score.entropy - beta * score.penalty;
    score
}

/// Returns the params and FLOPs of `net` (what budgets bound), without scoring it.
pub(crate) fn budget_paper(net: &Network, stages: &mut impl PaperStages) -> (u64, u64) {
    let (mut params, mut flops) = (0, 0);
    walk_outline(net, &mut |item| match item {
        Outline::Layer(layer) => {
            params += layer.params();
            flops += layer.macs();
        }
        Outline::Stage { stage, side, .. } => {
            let terms = stages.stage_terms(stage, side);
            params += terms.params;
            flops += terms.flops;
        }
        Outline::ScaleEnd { .. } => {}
    });
    (params, flops)
}

/// Eq. (4): `ln(r^2 c) * sum ln w`.
fn scale_entropy(side: u32, channels: u32, log_width_sum: f64, ln: &mut impl Ln) -> f64 {
    ln.ln(f64::from(side) * f64::from(side) * f64::from(channels)) * log_width_sum
}

/// Eq. (2) with Prop. 1's geometric-mean width: `L / exp(sum ln w / L)`.
pub fn effectiveness(layers: u32, log_width_sum: f64) -> f64 {
    let layers = f64::from(layers);
    layers / (log_width_sum / layers).exp()
}

/// Guideline 2: the population variance of the stage depths.
pub fn depth_variance(net: &Network) -> f64 {
    let count = net.stages.len() as f64;
    let mean = net.stages.iter().map(|s| f64::from(s.depth)).sum::<f64>() / count;
    net.stages
        .iter()
        .map(|s| (f64::from(s.depth) - mean).powi(2))
        .sum::<f64>()
        / count
}

/// Analyzes `net` in paper mode: the score, each scale's term and a per-stage table.
pub fn analyze_paper(net: &Network, alpha: &[f64], beta: f64) -> Result<Analysis, DesignError> {
    net.validate()?;
    check_weights(net, alpha, beta)?;
    let score = score_paper(net, alpha, beta);
    let mut scales = Vec::new();
    let mut stages: Vec<StageReport> = net
        .stages
        .iter()
        .map(|stage| StageReport {
            block: stage.block.name().to_string(),
            in_channels: stage.in_channels,
            out: stage.out,
            stride: stage.stride,
            depth: stage.depth,
            kernel: stage.kernel,
            mid: stage.mid_width(0),
            se: stage.se,
            side: 0,
            params: 0,
            flops: 0,
            layers: 0,
        })
        .collect();
    let mut log_width_sum = 0.0;
    walk(net, &mut |event| match event {
        Event::Layer {
            layer,
            count,
            stage,
        } => {
            if layer.role.is_main_path() {
                log_width_sum += f64::from(count) * layer.width().ln();
            }
            if let Some(report) = stage.map(|index| &mut stages[index]) {
                report.params += layer.params() * u64::from(count);
                report.flops += layer.macs() * u64::from(count);
                if layer.role.is_main_path() {
                    report.side = layer.out_side();
                    report.layers += count;
                }
            }
        }
        Event::ScaleEnd { side, channels } => scales.push(ScaleTerm {
            side,
            channels,
            log_width_sum,
            alpha: alpha[scales.len()],
            entropy: scale_entropy(side, channels, log_width_sum, &mut Direct),
        }),
    });
    Ok(Analysis {
        objective_kind: ObjectiveKind::Paper,
        resolution: net.resolution,
        params: score.params,
        flops: score.flops,
        layers: score.layers,
        effectiveness: score.effectiveness,
        entropy: score.entropy,
        penalty: score.penalty,
        beta,
        objective: score.objective,
        alpha: alpha.to_vec(),
        scales,
        stages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classic;

    fn rho(name: &str) -> f64 {
        let net = classic::by_name(name, 1000, 224).unwrap();
        let alpha = default_alpha(scale_count(&net));
        analyze_paper(&net, &alpha, DEFAULT_BETA)
            .unwrap()
            .effectiveness
    }

    /// Tables 1 and 2 print rho to one significant figure: ResNet-18 0.01, ResNet-34 0.02,
    /// ResNet-50 0.09, MobileNet-V2 0.9, EfficientNet-B0 0.6.
    #[test]
    fn classic_effectiveness_matches_the_paper_to_one_significant_figure() {
        let round1 = |x: f64| {
            let magnitude = 10f64.powf(x.log10().floor());
            (x / magnitude).round() * magnitude
        };
        let expected = [
            ("resnet18", 0.01),
            ("resnet34", 0.02),
            ("resnet50", 0.09),
            ("mobilenet_v2", 0.9),
            ("efficientnet_b0", 0.6),
        ];
        for (name, paper) in expected {
            let ours = rho(name);
            assert!(
                (round1(ours) - paper).abs() < 1e-9,
                "{name}: rho {ours} rounds to {} not {paper}",
                round1(ours)
            );
        }
    }

    /// ResNet-18 worked by hand: widths 147, 5 x 576, 4 x 1152, 4 x 2304, 3 x 4608 over 17
    /// layers; rho = 17 / exp(sum ln w / 17).
    #[test]
    fn resnet18_effectiveness_by_hand() {
        let sum = 147f64.ln()
            + 5.0 * 576f64.ln()
            + 4.0 * 1152f64.ln()
            + 4.0 * 2304f64.ln()
            + 3.0 * 4608f64.ln();
        let expected = 17.0 / (sum / 17.0).exp();
        assert!((rho("resnet18") - expected).abs() < 1e-12);
    }

    #[test]
    fn alpha_length_must_match_scales() {
        let net = classic::by_name("resnet18", 1000, 224).unwrap();
        let error = analyze_paper(&net, &[1.0, 8.0], 10.0).unwrap_err();
        assert!(error.to_string().contains("alpha"), "{error}");
    }

    #[test]
    fn analysis_agrees_with_fast_score() {
        for name in classic::NAMES {
            let net = classic::by_name(name, 100, 224).unwrap();
            let alpha = default_alpha(scale_count(&net));
            let analysis = analyze_paper(&net, &alpha, 10.0).unwrap();
            assert_eq!(analysis.score(), score_paper(&net, &alpha, 10.0));
            let stage_params: u64 = analysis.stages.iter().map(|s| s.params).sum();
            assert!(stage_params < analysis.params);
        }
    }
}
