//! What a sweep's results say about the paper's claims, computed from its per-trial results:
//! accuracy against rho (Fig. 2), the accuracy / size and accuracy / FLOPs Pareto fronts, and
//! whether entropy ranks the designs (Kendall's tau, Fig. 3), overall and within each rho.
//!
//! Pure functions over [`Observation`]s, so the CLI (`deepmad analytics`), a future RPC and the
//! dashboard share one implementation. Seeds are averaged per design first: a design is one
//! point, whatever its number of seeds.

use std::collections::BTreeMap;

use serde::Serialize;

/// One trial's result, with what the analytics need of its design and grid point.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub design_id: String,
    /// The grid point's rho; `None` for results without one.
    pub rho: Option<f64>,
    pub params: u64,
    pub flops: u64,
    pub entropy: f64,
    pub top1: f64,
}

/// One design: its seeds' mean and sample standard deviation of top-1.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DesignPoint {
    pub design_id: String,
    pub rho: Option<f64>,
    pub params: u64,
    pub flops: u64,
    pub entropy: f64,
    pub seeds: usize,
    pub top1_mean: f64,
    pub top1_std: f64,
    /// On the front of fewest parameters for the most accuracy.
    pub pareto_params: bool,
    /// On the front of fewest FLOPs for the most accuracy.
    pub pareto_flops: bool,
}

/// Accuracy at one rho, over all its designs and seeds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RhoGroup {
    pub rho: f64,
    pub designs: usize,
    pub trials: usize,
    pub top1_mean: f64,
    pub top1_std: f64,
    pub top1_best: f64,
    /// Kendall's tau-b between entropy and mean top-1 over this rho's designs; `None` with
    /// fewer than two designs or when either variable is constant.
    pub kendall_tau: Option<f64>,
}

/// A sweep's analytics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepAnalytics {
    pub trials: usize,
    /// Best mean top-1 first.
    pub designs: Vec<DesignPoint>,
    /// Ascending rho; results without a rho are left out.
    pub by_rho: Vec<RhoGroup>,
    /// Kendall's tau-b between entropy and mean top-1 over all designs.
    pub kendall_tau: Option<f64>,
    /// Per downstream task: upstream against downstream ranking ([`rank_agreement`]).
    pub downstream: Vec<RankAgreement>,
}

/// One downstream trial's result.
#[derive(Clone, Debug, PartialEq)]
pub struct DownstreamObservation {
    pub design_id: String,
    /// The task's name in the sweep.
    pub name: String,
    pub kind: String,
    pub dataset: String,
    pub top1: f64,
}

/// Whether the upstream ranking of designs carries over to a downstream task (the paper's
/// Sec. 5.7 question, asked of the user's own tasks).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankAgreement {
    pub name: String,
    pub kind: String,
    pub dataset: String,
    /// Designs with both an upstream and a downstream result.
    pub designs: usize,
    /// Kendall's tau-b of upstream mean top-1 against downstream mean top-1 over those
    /// designs (seeds averaged); `None` with fewer than two or a constant variable.
    pub kendall_tau: Option<f64>,
    /// The best design upstream among those designs, and the best downstream.
    pub best_upstream: Option<String>,
    pub best_downstream: Option<String>,
}

impl RankAgreement {
    /// Whether one design is best both upstream and downstream.
    pub fn same_best(&self) -> bool {
        self.best_upstream.is_some() && self.best_upstream == self.best_downstream
    }
}

/// Compares, per downstream task (in the order the observations first name them), the
/// designs' upstream mean top-1 with their downstream mean top-1.
pub fn rank_agreement(
    designs: &[DesignPoint],
    downstream: &[DownstreamObservation],
) -> Vec<RankAgreement> {
    let mut names: Vec<&DownstreamObservation> = Vec::new();
    for observation in downstream {
        if !names.iter().any(|seen| seen.name == observation.name) {
            names.push(observation);
        }
    }
    names
        .into_iter()
        .map(|task| {
            // (upstream mean, downstream mean, design) for designs with both.
            let pairs: Vec<(f64, f64, &str)> = designs
                .iter()
                .filter_map(|design| {
                    let values: Vec<f64> = downstream
                        .iter()
                        .filter(|o| o.name == task.name && o.design_id == design.design_id)
                        .map(|o| o.top1)
                        .collect();
                    let (mean, _) = mean_std(&values);
                    (!values.is_empty()).then_some((
                        design.top1_mean,
                        mean,
                        design.design_id.as_str(),
                    ))
                })
                .collect();
            let best = |pick: fn(&(f64, f64, &str)) -> f64| {
                pairs
                    .iter()
                    .max_by(|a, b| pick(a).total_cmp(&pick(b)).then_with(|| b.2.cmp(a.2)))
                    .map(|pair| pair.2.to_string())
            };
            RankAgreement {
                name: task.name.clone(),
                kind: task.kind.clone(),
                dataset: task.dataset.clone(),
                designs: pairs.len(),
                kendall_tau: kendall_tau_b(
                    &pairs.iter().map(|p| p.0).collect::<Vec<_>>(),
                    &pairs.iter().map(|p| p.1).collect::<Vec<_>>(),
                ),
                best_upstream: best(|p| p.0),
                best_downstream: best(|p| p.1),
            }
        })
        .collect()
}

/// Computes a sweep's analytics from its results.
pub fn analyze(observations: &[Observation]) -> SweepAnalytics {
    let mut by_design: BTreeMap<&str, Vec<&Observation>> = BTreeMap::new();
    for observation in observations {
        by_design
            .entry(observation.design_id.as_str())
            .or_default()
            .push(observation);
    }
    let mut designs: Vec<DesignPoint> = by_design
        .values()
        .map(|trials| {
            let first = trials[0];
            let top1: Vec<f64> = trials.iter().map(|t| t.top1).collect();
            let (top1_mean, top1_std) = mean_std(&top1);
            DesignPoint {
                design_id: first.design_id.clone(),
                rho: first.rho,
                params: first.params,
                flops: first.flops,
                entropy: first.entropy,
                seeds: trials.len(),
                top1_mean,
                top1_std,
                pareto_params: false,
                pareto_flops: false,
            }
        })
        .collect();
    let fronts: Vec<(bool, bool)> = designs
        .iter()
        .map(|design| {
            (
                !designs.iter().any(|other| {
                    dominates(
                        other.params,
                        other.top1_mean,
                        design.params,
                        design.top1_mean,
                    )
                }),
                !designs.iter().any(|other| {
                    dominates(other.flops, other.top1_mean, design.flops, design.top1_mean)
                }),
            )
        })
        .collect();
    for (design, (on_params, on_flops)) in designs.iter_mut().zip(fronts) {
        design.pareto_params = on_params;
        design.pareto_flops = on_flops;
    }
    designs.sort_by(|a, b| {
        b.top1_mean
            .total_cmp(&a.top1_mean)
            .then_with(|| a.design_id.cmp(&b.design_id))
    });
    let kendall_tau = kendall_tau_b(
        &designs.iter().map(|d| d.entropy).collect::<Vec<_>>(),
        &designs.iter().map(|d| d.top1_mean).collect::<Vec<_>>(),
    );
    let mut rhos: Vec<f64> = designs.iter().filter_map(|d| d.rho).collect();
    rhos.sort_by(f64::total_cmp);
    rhos.dedup();
    let by_rho = rhos
        .into_iter()
        .map(|rho| {
            let group: Vec<&DesignPoint> = designs.iter().filter(|d| d.rho == Some(rho)).collect();
            let trials: Vec<f64> = observations
                .iter()
                .filter(|o| o.rho == Some(rho))
                .map(|o| o.top1)
                .collect();
            let (top1_mean, top1_std) = mean_std(&trials);
            RhoGroup {
                rho,
                designs: group.len(),
                trials: trials.len(),
                top1_mean,
                top1_std,
                top1_best: group.iter().map(|d| d.top1_mean).fold(f64::NAN, f64::max),
                kendall_tau: kendall_tau_b(
                    &group.iter().map(|d| d.entropy).collect::<Vec<_>>(),
                    &group.iter().map(|d| d.top1_mean).collect::<Vec<_>>(),
                ),
            }
        })
        .collect();
    SweepAnalytics {
        trials: observations.len(),
        designs,
        by_rho,
        kendall_tau,
        downstream: Vec::new(),
    }
}

/// True when `(cost_a, accuracy_a)` is at least as good as `(cost_b, accuracy_b)` in both and
/// strictly better in one.
fn dominates(cost_a: u64, accuracy_a: f64, cost_b: u64, accuracy_b: f64) -> bool {
    cost_a <= cost_b && accuracy_a >= accuracy_b && (cost_a < cost_b || accuracy_a > accuracy_b)
}

/// The mean and the sample standard deviation (0 for a single value).
fn mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, variance.sqrt())
}

/// Kendall's tau-b (ties in either variable corrected); `None` for fewer than two pairs or a
/// constant variable.
pub fn kendall_tau_b(xs: &[f64], ys: &[f64]) -> Option<f64> {
    assert_eq!(xs.len(), ys.len(), "kendall_tau_b: paired samples");
    let n = xs.len();
    if n < 2 {
        return None;
    }
    let (mut concordant, mut discordant, mut ties_x, mut ties_y) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            let dx = xs[i].total_cmp(&xs[j]) as i64;
            let dy = ys[i].total_cmp(&ys[j]) as i64;
            match (dx, dy) {
                (0, 0) => {}
                (0, _) => ties_x += 1,
                (_, 0) => ties_y += 1,
                _ if dx == dy => concordant += 1,
                _ => discordant += 1,
            }
        }
    }
    let pairs = (n * (n - 1) / 2) as i64;
    // Pairs tied in both variables count as tied in each.
    let both = pairs - concordant - discordant - ties_x - ties_y;
    let untied_x = (pairs - ties_x - both) as f64;
    let untied_y = (pairs - ties_y - both) as f64;
    if untied_x == 0.0 || untied_y == 0.0 {
        return None;
    }
    Some((concordant - discordant) as f64 / (untied_x * untied_y).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(design: &str, rho: f64, params: u64, entropy: f64, top1: f64) -> Observation {
        Observation {
            design_id: design.into(),
            rho: Some(rho),
            params,
            flops: params * 10,
            entropy,
            top1,
        }
    }

    #[test]
    fn kendall_tau_b_matches_worked_examples() {
        // Perfect agreement and perfect disagreement.
        assert_eq!(kendall_tau_b(&[1., 2., 3.], &[10., 20., 30.]), Some(1.0));
        assert_eq!(kendall_tau_b(&[1., 2., 3.], &[30., 20., 10.]), Some(-1.0));
        // x = 1,2,3,4,5 and y = 3,1,2,5,4: 7 concordant, 3 discordant pairs -> 0.4
        // (scipy.stats.kendalltau gives 0.4).
        let tau = kendall_tau_b(&[1., 2., 3., 4., 5.], &[3., 1., 2., 5., 4.]).unwrap();
        assert!((tau - 0.4).abs() < 1e-12, "{tau}");
        // With a tie in x: x = 1,1,2,3, y = 1,2,3,4: C = 5, D = 0, one x tie;
        // tau_b = 5 / sqrt(5 * 6) = 0.912870929... (scipy: 0.9128709291752769).
        let tau = kendall_tau_b(&[1., 1., 2., 3.], &[1., 2., 3., 4.]).unwrap();
        assert!((tau - 0.912_870_929_175_276_9).abs() < 1e-12, "{tau}");
        assert_eq!(kendall_tau_b(&[1., 1.], &[1., 2.]), None, "constant x");
        assert_eq!(kendall_tau_b(&[1.], &[1.]), None, "one point");
    }

    #[test]
    fn seeds_are_averaged_per_design_and_fronts_marked() {
        let observations = vec![
            obs("a", 0.1, 100, 5.0, 0.80),
            obs("a", 0.1, 100, 5.0, 0.82),
            obs("b", 0.1, 200, 6.0, 0.85),
            obs("c", 0.5, 150, 7.0, 0.79), // dominated by a (fewer params, more accurate)
            obs("d", 0.5, 300, 8.0, 0.90),
        ];
        let result = analyze(&observations);
        assert_eq!(result.trials, 5);
        let ids: Vec<&str> = result
            .designs
            .iter()
            .map(|d| d.design_id.as_str())
            .collect();
        assert_eq!(ids, ["d", "b", "a", "c"], "best mean first");
        let a = result.designs.iter().find(|d| d.design_id == "a").unwrap();
        assert_eq!(a.seeds, 2);
        assert!((a.top1_mean - 0.81).abs() < 1e-12);
        assert!((a.top1_std - 0.02 / 2f64.sqrt()).abs() < 1e-12);
        let front: Vec<&str> = result
            .designs
            .iter()
            .filter(|d| d.pareto_params)
            .map(|d| d.design_id.as_str())
            .collect();
        assert_eq!(front, ["d", "b", "a"]);
        assert_eq!(result.by_rho.len(), 2);
        let low = &result.by_rho[0];
        assert_eq!((low.rho, low.designs, low.trials), (0.1, 2, 3));
        assert!((low.top1_best - 0.85).abs() < 1e-12);
        assert_eq!(low.kendall_tau, Some(1.0), "entropy ranks a below b");
        // Entropy order a < b < c < d against accuracy c < a < b < d: 4 pairs agree, 2
        // ((a, c) and (b, c)) disagree: tau = (4 - 2) / 6.
        let tau = result.kendall_tau.unwrap();
        assert!((tau - 2.0 / 6.0).abs() < 1e-12, "{tau}");
    }
}
