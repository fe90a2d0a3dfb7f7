//! The MP solver of Sec. 4.3 and, for benchmarks and tests, the paper code's evolutionary
//! baseline.
//!
//! [`solve`] takes a [`Problem`] and returns the best [`Solution`] it finds: a validated
//! [`Network`], its analysis under the problem's objective, and a [`Certificate`] saying what
//! was proven about it.

pub mod baseline;
mod moves;
mod polish;
mod problem;
mod search;
mod vars;

pub use problem::{scale_count, Family, Problem, SearchSpace};

use serde::Serialize;

use crate::arch::Network;
use crate::error::DesignError;
use crate::score::{self, Analysis, ObjectiveKind, Score};
use crate::tinynas::{self, TinyNet};
use crate::units::format_count;
use vars::{Ctx, Eval};

/// What the solver can vouch for about its answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Certificate {
    /// `"local-optimum"`: no move of the named neighbourhood improves the objective.
    pub kind: &'static str,
    /// The neighbourhood that was checked exhaustively around the answer.
    pub neighbourhood: String,
    /// How many neighbours were checked.
    pub neighbours_checked: u64,
    /// A proven upper bound on the objective, when the method gives one.
    pub upper_bound: Option<f64>,
}

/// The solver's answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Solution {
    pub network: Network,
    pub analysis: Analysis,
    pub certificate: Certificate,
    /// Candidate designs evaluated.
    pub evaluations: u64,
}

/// Independent population searches, each polished to a local optimum.
const ISLANDS: u64 = 4;
/// Iterated-local-search kicks from the best local optimum: structural jumps the polish
/// neighbourhoods cannot make (several depths and kernels at once), each polished again.
const KICKS: u64 = 8;

/// Solves `problem`: returns the best feasible design found, its analysis and its certificate.
///
/// Fails with [`DesignError::InvalidInput`] for bad inputs and [`DesignError::Infeasible`]
/// when no design of the space meets a constraint, naming it and what the space can reach.
pub fn solve(problem: &Problem) -> Result<Solution, DesignError> {
    problem.validate()?;
    let ctx = Ctx::new(problem);
    let minimal = ctx.minimal();
    minimal.validate()?;
    check_smallest_fits(&ctx, &minimal)?;
    // Independent populations settle in different basins; the best of each is polished.
    let mut best: Option<(Network, Eval, u64)> = None;
    for seed in 1..=ISLANDS {
        let ranked = search::population_search(&ctx, &minimal, seed);
        let (mut network, mut eval) = ranked[0].clone();
        let checked = polish::polish(&ctx, &mut network, &mut eval);
        if best
            .as_ref()
            .is_none_or(|(_, best_eval, _)| eval.better_than(best_eval))
        {
            best = Some((network, eval, checked));
        }
    }
    // Iterated local search: kick the incumbent, descend again, keep improvements.
    let mut rng = moves::Rng::new(ISLANDS + 1);
    for _ in 0..KICKS {
        let (incumbent, incumbent_eval, _) = best.as_ref().expect("at least one island");
        let incumbent_eval = *incumbent_eval;
        let mut network = incumbent.clone();
        search::kick(&ctx, &mut network, &mut rng);
        let mut eval = ctx.evaluate(&network);
        polish::descend_light(&ctx, &mut network, &mut eval);
        if eval.better_than(&incumbent_eval) {
            let checked = polish::polish(&ctx, &mut network, &mut eval);
            best = Some((network, eval, checked));
        }
    }
    let (network, eval, neighbours_checked) = best.expect("at least one island");
    if !eval.feasible() {
        return Err(infeasible_rho_or_layers(problem, &eval.score));
    }
    network.validate()?;
    let analysis = analyze(problem, &network, &ctx.alpha)?;
    Ok(Solution {
        network,
        analysis,
        certificate: Certificate {
            kind: "local-optimum",
            neighbourhood: polish::NEIGHBOURHOOD.to_string(),
            neighbours_checked,
            upper_bound: None,
        },
        evaluations: ctx.evaluations.get(),
    })
}

/// Analyzes a solver design under the problem's objective.
pub fn analyze(
    problem: &Problem,
    network: &Network,
    alpha: &[f64],
) -> Result<Analysis, DesignError> {
    match problem.objective {
        ObjectiveKind::Paper => score::analyze_paper(network, alpha, problem.beta),
        ObjectiveKind::Tinynas => {
            let tiny = TinyNet::from_network(network)?;
            tinynas::analyze_tinynas(&tiny, network.resolution, alpha, problem.beta)
        }
    }
}

/// Fails when even the smallest design of the space breaks a budget (every count grows with
/// every variable, so the smallest design has the smallest params, FLOPs and layers).
fn check_smallest_fits(ctx: &Ctx, minimal: &Network) -> Result<(), DesignError> {
    let smallest = ctx.evaluate(minimal).score;
    let problem = ctx.problem;
    let over = |constraint: &'static str, budget: u64, needs: u64, unit: &str| {
        DesignError::Infeasible {
            constraint,
            budget: format_count(budget),
            detail: format!(
                "the smallest design in the space needs {} {unit}; raise the budget to at least that",
                format_count(needs)
            ),
        }
    };
    if let Some(params) = problem.params.filter(|p| smallest.params > *p) {
        return Err(over("params", params, smallest.params, "params"));
    }
    if let Some(flops) = problem.flops.filter(|f| smallest.flops > *f) {
        return Err(over("flops", flops, smallest.flops, "FLOPs"));
    }
    if let Some(layers) = problem.max_layers.filter(|l| smallest.layers > *l) {
        return Err(over(
            "max-layers",
            u64::from(layers),
            u64::from(smallest.layers),
            "layers",
        ));
    }
    Ok(())
}

fn infeasible_rho_or_layers(problem: &Problem, best: &Score) -> DesignError {
    if best.effectiveness > problem.rho {
        DesignError::Infeasible {
            constraint: "rho",
            budget: format!("{}", problem.rho),
            detail: format!(
                "the lowest effectiveness the solver reached within the budgets is {:.4}; \
                 raise rho or the budgets",
                best.effectiveness
            ),
        }
    } else {
        DesignError::Infeasible {
            constraint: "budget",
            budget: "combination".to_string(),
            detail: "no design meets the params, FLOPs and layer budgets together".to_string(),
        }
    }
}
