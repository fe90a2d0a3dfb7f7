//! The official code's DeepMAD score of a TinyNAS structure (conventions and their sources in
//! the module doc of [`crate::tinynas`]).

use super::count::{walk, BlockCounter, BlockCounts, Event};
use super::{TinyBlock, TinyNet};
use crate::arch::MAX_DIMENSION;
use crate::error::DesignError;
use crate::memo::Direct;
use crate::score::{effectiveness, Analysis, ObjectiveKind, ScaleTerm, Score, StageReport};

/// The number of stages (and alpha weights) the score needs.
const STAGES: usize = 5;

/// `ComputeDeepMadScore.ratio_score`: `[ln C + ln(H^2)] * S` for one stage, from the walk's
/// `ln C + ln(H^2)`.
fn stage_entropy(log_size: f64, log_sum: f64) -> f64 {
    log_size * log_sum
}

/// `Strategy.get_info_for_evolution`: `exp(std(L))` over the super-blocks' L values, the first
/// two dropped when the second block is a `SuperResK1KXK1`; 1 when no value is left.
fn depth_penalty(blocks: impl Iterator<Item = TinyBlock>) -> f64 {
    // One pass over the blocks (the solver's blocks are converted as they are walked); the
    // depths of a structure of up to `KEPT` super-blocks stay on the stack.
    const KEPT: usize = 16;
    let (mut kept, mut more) = ([0.0; KEPT], Vec::new());
    let (mut count, mut second_is_bottleneck) = (0, false);
    for (index, block) in blocks.enumerate() {
        second_is_bottleneck |= index == 1 && matches!(block, TinyBlock::Bottleneck(_));
        if let Some(shape) = block.super_block() {
            let depth = f64::from(shape.depth);
            match kept.get_mut(count) {
                Some(slot) => *slot = depth,
                None => more.push(depth),
            }
            count += 1;
        }
    }
    let skip = if second_is_bottleneck { 2 } else { 0 };
    let depths = || kept.iter().take(count).chain(&more).skip(skip).copied();
    let count = depths().count();
    if count == 0 {
        return 1.0;
    }
    let count = count as f64;
    let mean = depths().sum::<f64>() / count;
    let variance = depths().map(|depth| (depth - mean).powi(2)).sum::<f64>() / count;
    variance.sqrt().exp()
}

/// Scores `net` as the official code does, FLOPs counted at `resolution`, without allocating;
/// the solver calls this in its inner loop. `alpha` must have 5 entries and `net` 5 stages
/// (see [`analyze_tinynas`], which checks both).
pub fn score_tinynas(net: &TinyNet, resolution: u32, alpha: &[f64], beta: f64) -> Score {
    score_tinynas_with(
        net.blocks.iter().copied(),
        resolution,
        alpha,
        beta,
        &mut Direct,
    )
}

/// [`score_tinynas`] with block counts and logarithms from `counter` (the solver's memos).
pub(crate) fn score_tinynas_with(
    blocks: impl Iterator<Item = TinyBlock> + Clone,
    resolution: u32,
    alpha: &[f64],
    beta: f64,
    counter: &mut impl BlockCounter,
) -> Score {
    debug_assert_eq!(
        alpha.len(),
        STAGES,
        "the TinyNAS score has one alpha per stage"
    );
    let mut score = Score::default();
    let (mut flops, mut log_sum, mut log_width_sum) = (0.0, 0.0, 0.0);
    let (mut stage, mut rho) = (0, 0.0_f64);
    walk(
        blocks.clone(),
        resolution,
        counter,
        &mut |event| match event {
            Event::Block { counts, .. } => {
                score.params += counts.params;
                score.layers += counts.layers;
                flops += counts.flops;
                log_sum += counts.log_sum;
                log_width_sum += counts.log_width_sum;
            }
            Event::StageEnd { log_size, .. } => {
                let weight = alpha.get(stage).copied().unwrap_or(0.0);
                // `ratio_score` skips a stage whose weight is 0 (no 0 * -inf).
                if weight != 0.0 {
                    score.entropy += weight * stage_entropy(log_size, log_sum);
                }
                rho = rho.max(effectiveness(score.layers, log_width_sum));
                stage += 1;
            }
        },
    );
    score.flops = round_flops(flops);
    score.effectiveness = rho;
    score.penalty = depth_penalty(blocks);
    score.objective = score.entropy - beta * score.penalty;
    score
}

/// Returns the params and FLOPs of a structure at `resolution` (what budgets bound): the
/// score's walk without the score.
pub(crate) fn budget(
    blocks: impl Iterator<Item = TinyBlock>,
    resolution: u32,
    counter: &mut impl BlockCounter,
) -> (u64, u64) {
    let (mut params, mut flops) = (0, 0.0);
    walk(blocks, resolution, counter, &mut |event| {
        if let Event::Block { counts, .. } = event {
            params += counts.params;
            flops += counts.flops;
        }
    });
    (params, round_flops(flops))
}

/// Rounds that code's float FLOPs to the nearest integer (exact when the resolution halves
/// cleanly, e.g. 224; a fraction of 1/4096 or coarser otherwise).
fn round_flops(flops: f64) -> u64 {
    flops.round() as u64
}

/// Analyzes `net` as the official code scores it, FLOPs counted at `resolution`: the score, the
/// five stage terms (side as scored at 224, 1 after SE; `log_width_sum` is the cumulative sum of
/// the 0.5-scaled log terms) and one report row per block (its output side at `resolution`
/// with that code's integer division, its params, its FLOPs rounded on their own, and its layers).
///
/// Fails when `net` breaks a structural rule, does not have exactly 5 stages, or scores -inf
/// (a stage ending at side 0), and when `resolution`, `alpha` (5 finite non-negative weights)
/// or `beta` is out of range.
pub fn analyze_tinynas(
    net: &TinyNet,
    resolution: u32,
    alpha: &[f64],
    beta: f64,
) -> Result<Analysis, DesignError> {
    net.validate()?;
    check_structure(net)?;
    check_weights(resolution, alpha, beta)?;
    let score = score_tinynas(net, resolution, alpha, beta);
    let (scales, stages) = terms_and_rows(net, resolution, alpha);
    if let Some(stage) = scales.iter().position(|scale| scale.side == 0) {
        return Err(DesignError::InvalidNetwork {
            location: "structure".into(),
            reason: format!(
                "has stage {stage} ending at feature-map side 0 in the official code's count (a stride-2 \
                 layer after a SuperResK1DWSEK1 block, whose SE reports side 1), so its entropy is -inf"
            ),
        });
    }
    Ok(Analysis {
        objective_kind: ObjectiveKind::Tinynas,
        resolution,
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

/// Returns the stage terms and one report row per block.
fn terms_and_rows(
    net: &TinyNet,
    resolution: u32,
    alpha: &[f64],
) -> (Vec<ScaleTerm>, Vec<StageReport>) {
    let mut scales = Vec::with_capacity(STAGES);
    let mut stages = Vec::with_capacity(net.blocks.len());
    let mut log_sum = 0.0;
    let blocks = net.blocks.iter().copied();
    walk(blocks, resolution, &mut Direct, &mut |event| match event {
        Event::Block {
            block,
            counts,
            side,
        } => {
            log_sum += counts.log_sum;
            stages.push(report(&block, &counts, side));
        }
        Event::StageEnd {
            side,
            channels,
            log_size,
        } => scales.push(ScaleTerm {
            side,
            channels,
            log_width_sum: log_sum,
            alpha: alpha.get(scales.len()).copied().unwrap_or(0.0),
            entropy: stage_entropy(log_size, log_sum),
        }),
    });
    (scales, stages)
}

/// Returns the report row of one block; `side` is its output side at the counting resolution.
fn report(block: &TinyBlock, counts: &BlockCounts, side: u32) -> StageReport {
    StageReport {
        block: block.class_name().to_string(),
        in_channels: block.in_channels(),
        out: block.out(),
        stride: block.stride(),
        depth: block.depth(),
        kernel: block.kernel(),
        mid: block.super_block().map(|shape| shape.btn),
        se: matches!(block, TinyBlock::DepthwiseSe(_)),
        side,
        params: counts.params,
        flops: round_flops(counts.flops),
        layers: counts.layers,
    }
}

/// Checks that `net` has the five stages the score needs.
fn check_structure(net: &TinyNet) -> Result<(), DesignError> {
    let stages = net.stage_count();
    if stages != STAGES {
        return Err(DesignError::InvalidNetwork {
            location: "structure".into(),
            reason: format!(
                "has {stages} stages but the official DeepMAD score needs exactly {STAGES} (a stage \
                 ends before every stride-2 block but the first, and at the last block)"
            ),
        });
    }
    Ok(())
}

/// Checks the resolution, alpha and beta, naming the field on failure.
fn check_weights(resolution: u32, alpha: &[f64], beta: f64) -> Result<(), DesignError> {
    if resolution == 0 || resolution > MAX_DIMENSION {
        return Err(DesignError::InvalidInput {
            field: "resolution",
            reason: format!("must be in 1..={MAX_DIMENSION}, got {resolution}"),
        });
    }
    if alpha.len() != STAGES {
        return Err(DesignError::InvalidInput {
            field: "alpha",
            reason: format!(
                "has {} entries but the TinyNAS score needs {STAGES}, one per stage",
                alpha.len()
            ),
        });
    }
    if let Some(bad) = alpha
        .iter()
        .find(|weight| !weight.is_finite() || **weight < 0.0)
    {
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

#[cfg(test)]
mod tests {
    use super::super::tests::{conv, depthwise_example, se_reference, shape, worked_example};
    use super::*;

    const ALPHA: [f64; 5] = [1.0, 1.0, 1.0, 1.0, 8.0];

    fn assert_close(ours: f64, theirs: f64, what: &str) {
        let relative = ((ours - theirs) / theirs).abs();
        assert!(
            relative < 1e-9,
            "{what}: {ours} vs {theirs} (relative error {relative:e})"
        );
    }

    /// The worked example: the numbers the official code reports for a structure of its
    /// own search at the R18 budget (params 10,576,000, FLOPs 1,818,075,616, 100 layers,
    /// rho 0.2968996540678661, fitness 29291.463439930158 at 224, alpha {1,1,1,1,8}, beta 10).
    #[test]
    fn worked_example_matches_the_official_code() {
        let score = score_tinynas(&worked_example(), 224, &ALPHA, 10.0);
        assert_eq!(score.params, 10_576_000);
        assert_eq!(score.flops, 1_818_075_616);
        assert_eq!(score.layers, 100);
        assert_close(score.effectiveness, 0.2968996540678661, "rho");
        assert_close(score.objective, 29291.463439930158, "fitness");
        // Q = exp(std of L = 12, 12, 1 after dropping the first two).
        let mean = 25.0 / 3.0;
        let std =
            ((2.0 * (12.0 - mean) * (12.0 - mean) + (1.0 - mean) * (1.0 - mean)) / 3.0_f64).sqrt();
        assert_close(score.penalty, std.exp(), "Q");
        assert_close(
            score.entropy,
            score.objective + 10.0 * score.penalty,
            "entropy",
        );
    }

    /// Regression values for the other block kinds. Provenance: a line-by-line Python
    /// transcription of the official formulas (`blocks_basic.py`, `super_res_k1dw*.py`,
    /// `cnnnet.py`, `compute_deepmad.py`, `strategy.py`), run on these structures; the
    /// official code itself was not run (it needs torch), so these are weaker than the
    /// worked example above.
    #[test]
    fn depthwise_and_se_structures_match_the_transcription() {
        let cases = [
            (
                se_reference(),
                224,
                26_876_956,
                4_448_877_776,
                71,
                0.4964788262497393,
                11915.370482986611,
                4.4667583969549005,
            ),
            (
                se_reference(),
                200,
                26_876_956,
                3_546_618_125,
                71,
                0.4964788262497393,
                11915.370482986611,
                4.4667583969549005,
            ),
            (
                depthwise_example(),
                224,
                980_128,
                160_088_096,
                47,
                0.8974618080690836,
                9314.558786524562,
                1.882226777480292,
            ),
            (
                depthwise_example(),
                200,
                980_128,
                127_621_250,
                47,
                0.8974618080690836,
                9314.558786524562,
                1.882226777480292,
            ),
        ];
        for (net, resolution, params, flops, layers, rho, entropy, q) in cases {
            let score = score_tinynas(&net, resolution, &ALPHA, 10.0);
            assert_eq!(
                (score.params, score.flops, score.layers),
                (params, flops, layers),
                "{resolution}"
            );
            assert_close(score.effectiveness, rho, "rho");
            assert_close(score.entropy, entropy, "entropy");
            assert_close(score.penalty, q, "Q");
            assert_close(score.objective, entropy - 10.0 * q, "fitness");
        }
    }

    #[test]
    fn analysis_agrees_with_the_fast_score() {
        for net in [worked_example(), se_reference(), depthwise_example()] {
            for resolution in [224, 200, 160] {
                let analysis = analyze_tinynas(&net, resolution, &ALPHA, 10.0).unwrap();
                assert_eq!(
                    analysis.score(),
                    score_tinynas(&net, resolution, &ALPHA, 10.0)
                );
                assert_eq!(analysis.objective_kind, ObjectiveKind::Tinynas);
                assert_eq!(analysis.stages.len(), net.blocks.len());
                assert_eq!(
                    analysis.stages.iter().map(|s| s.params).sum::<u64>(),
                    analysis.params
                );
                assert_eq!(
                    analysis.stages.iter().map(|s| s.layers).sum::<u32>(),
                    analysis.layers
                );
                let weighted: f64 = analysis.scales.iter().map(|s| s.alpha * s.entropy).sum();
                assert_close(weighted, analysis.entropy, "entropy");
            }
        }
    }

    #[test]
    fn analysis_reports_stages_and_blocks() {
        let analysis = analyze_tinynas(&worked_example(), 224, &ALPHA, 10.0).unwrap();
        let scales: Vec<(u32, u32)> = analysis
            .scales
            .iter()
            .map(|s| (s.side, s.channels))
            .collect();
        assert_eq!(
            scales,
            vec![(112, 32), (56, 104), (28, 416), (14, 616), (7, 2048)]
        );
        let first = &analysis.stages[1];
        assert_eq!(
            (
                first.block.as_str(),
                first.depth,
                first.mid,
                first.side,
                first.layers
            ),
            ("SuperResK1KXK1", 1, Some(32), 56, 3)
        );
        // SE: every stage of the SE reference ends after an SE block, so its side is 1.
        let analysis = analyze_tinynas(&se_reference(), 224, &ALPHA, 10.0).unwrap();
        assert!(
            analysis.scales.iter().all(|s| s.side == 1),
            "{:?}",
            analysis.scales
        );
        let sides: Vec<u32> = analysis.stages.iter().map(|s| s.side).collect();
        assert_eq!(sides, vec![112, 112, 56, 28, 14, 7, 7]);
        assert!(analysis.stages[1].se && !analysis.stages[0].se);
    }

    #[test]
    fn flops_follow_the_resolution_but_the_score_does_not() {
        let net = worked_example();
        let at_224 = score_tinynas(&net, 224, &ALPHA, 10.0);
        let at_192 = score_tinynas(&net, 192, &ALPHA, 10.0);
        assert_ne!(at_224.flops, at_192.flops);
        // Real division: 192 halves cleanly too, so FLOPs scale exactly with the area.
        assert_eq!(at_192.flops, 1_335_729_024);
        assert_eq!(at_224.params, at_192.params);
        assert_eq!(at_224.entropy, at_192.entropy);
        assert_eq!(at_224.objective, at_192.objective);
        assert_eq!(at_224.effectiveness, at_192.effectiveness);
        // At 230 and 225 that code's float FLOPs have fractions (1916776946.875 and
        // 1834344667.96875 in the transcription of the module doc); they round to nearest.
        assert_eq!(score_tinynas(&net, 230, &ALPHA, 10.0).flops, 1_916_776_947);
        assert_eq!(score_tinynas(&net, 225, &ALPHA, 10.0).flops, 1_834_344_668);
    }

    #[test]
    fn zero_alpha_drops_a_stage_and_bad_inputs_are_named() {
        let net = worked_example();
        let full = analyze_tinynas(&net, 224, &ALPHA, 10.0).unwrap();
        let alpha = [0.0, 1.0, 1.0, 1.0, 8.0];
        let dropped = score_tinynas(&net, 224, &alpha, 10.0);
        assert_close(
            dropped.entropy,
            full.entropy - full.scales[0].entropy,
            "entropy",
        );
        let error = analyze_tinynas(&net, 224, &[1.0, 8.0], 10.0).unwrap_err();
        assert!(
            matches!(error, DesignError::InvalidInput { field: "alpha", .. }),
            "{error}"
        );
        let error = analyze_tinynas(&net, 224, &[1.0, 1.0, 1.0, f64::NAN, 8.0], 10.0).unwrap_err();
        assert!(
            matches!(error, DesignError::InvalidInput { field: "alpha", .. }),
            "{error}"
        );
        let error = analyze_tinynas(&net, 224, &ALPHA, -1.0).unwrap_err();
        assert!(
            matches!(error, DesignError::InvalidInput { field: "beta", .. }),
            "{error}"
        );
        let error = analyze_tinynas(&net, 0, &ALPHA, 10.0).unwrap_err();
        assert!(
            matches!(
                error,
                DesignError::InvalidInput {
                    field: "resolution",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn four_stages_are_an_error_naming_the_count() {
        let mut net = worked_example();
        net.blocks[2] = TinyBlock::Bottleneck(shape(104, 416, 40, 5, 1, 7));
        assert_eq!(net.stage_count(), 4);
        let message = analyze_tinynas(&net, 224, &ALPHA, 10.0)
            .unwrap_err()
            .to_string();
        assert!(
            message
                .contains("structure has 4 stages but the official DeepMAD score needs exactly 5"),
            "{message}"
        );
    }

    #[test]
    fn a_stride_two_layer_after_se_is_rejected() {
        let mut net = se_reference();
        // A plain depthwise block with stride 2 after the SE blocks: the code's side is 1 // 2 = 0.
        net.blocks[5] = TinyBlock::Depthwise(shape(201, 312, 1872, 5, 2, 5));
        let message = analyze_tinynas(&net, 224, &ALPHA, 10.0)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("stage 4 ending at feature-map side 0"),
            "{message}"
        );
        assert_eq!(
            score_tinynas(&net, 224, &ALPHA, 10.0).entropy,
            f64::NEG_INFINITY
        );
        let invalid = TinyNet {
            blocks: vec![conv(3, 8, 3, 2), conv(9, 8, 3, 2)],
        };
        assert!(matches!(
            analyze_tinynas(&invalid, 224, &ALPHA, 10.0),
            Err(DesignError::InvalidNetwork { .. })
        ));
    }
}

#[cfg(test)]
mod penalty_tests {
    use super::super::tests::{conv, shape};
    use super::*;

    /// The one-pass penalty keeps any number of super-blocks (past its stack buffer too).
    #[test]
    fn depth_penalty_is_exp_of_the_population_std() {
        for (blocks, bottleneck) in [(3, true), (16, true), (40, false)] {
            let depths: Vec<u32> = (0..blocks).map(|i| 1 + (i * 7) % 5).collect();
            let mut net = vec![conv(3, 16, 3, 2)];
            net.extend(depths.iter().map(|&depth| {
                let block = shape(16, 16, 16, 3, 1, depth);
                if bottleneck {
                    TinyBlock::Bottleneck(block)
                } else {
                    TinyBlock::Depthwise(block)
                }
            }));
            let kept: Vec<f64> = depths
                .iter()
                .skip(if bottleneck { 2 } else { 0 })
                .map(|&d| f64::from(d))
                .collect();
            let mean = kept.iter().sum::<f64>() / kept.len() as f64;
            let variance = kept.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / kept.len() as f64;
            let penalty = depth_penalty(net.iter().copied());
            assert_eq!(
                penalty.to_bits(),
                variance.sqrt().exp().to_bits(),
                "{blocks} blocks"
            );
        }
        assert_eq!(depth_penalty([conv(3, 16, 3, 2)].into_iter()), 1.0);
    }
}
