//! The paper code's search, as a yardstick for benchmarks and tests only.
//!
//! TinyNAS searches with a mutation-only evolutionary algorithm: a population of 256, each
//! child a copy of a random member with two random mutations, 500,000 candidates, a child
//! kept when it meets every budget and beats the population's worst. This re-implementation
//! searches the same space with the same objective as [`super::solve`], so the two can be
//! compared row by row (`design/README.md`).

use crate::arch::Network;
use crate::error::DesignError;

use super::moves::{fill, mutate, worst_index, Rng};
use super::vars::{Ctx, Eval};
use super::{analyze, Certificate, Problem, Solution};

/// The population size of the paper's code.
pub const POPULATION: usize = 256;
/// The number of candidates the paper's code evaluates.
pub const PAPER_CANDIDATES: u64 = 500_000;

/// Runs the evolutionary baseline for `candidates` children from a filled smallest design.
pub fn evolve(problem: &Problem, candidates: u64, seed: u64) -> Result<Solution, DesignError> {
    problem.validate()?;
    let ctx = Ctx::new(problem);
    // The paper's code starts from a feasible seed structure given in its config; this one
    // starts from the smallest design with every width filled to the budget (the solver's
    // first starting point too), which is feasible whenever a shallow design is.
    let mut start = ctx.minimal();
    fill(&ctx, &mut start);
    let start_eval = ctx.evaluate(&start);
    let mut population: Vec<(Network, Eval)> = vec![(start, start_eval)];
    let mut rng = Rng::new(seed.wrapping_add(0x5EED));
    let vars = ctx.vars();
    for _ in 0..candidates {
        let parent = &population[rng.below(population.len() as u32) as usize].0;
        let mut child = parent.clone();
        for _ in 0..2 {
            mutate(&ctx, &mut child, rng.pick(vars), &mut rng);
        }
        let eval = ctx.evaluate(&child);
        if !eval.feasible() {
            continue;
        }
        if population.len() < POPULATION {
            population.push((child, eval));
            continue;
        }
        let worst = worst_index(&population);
        if eval.better_than(&population[worst].1) {
            population[worst] = (child, eval);
        }
    }
    let (network, eval) = population
        .into_iter()
        .reduce(|a, b| if b.1.better_than(&a.1) { b } else { a })
        .expect("the population starts with one member");
    if !eval.feasible() {
        return Err(DesignError::Infeasible {
            constraint: "budget",
            budget: "combination".into(),
            detail: "the evolutionary baseline found no feasible design".into(),
        });
    }
    let analysis = analyze(problem, &network, &ctx.alpha)?;
    Ok(Solution {
        network,
        analysis,
        certificate: Certificate {
            kind: "none",
            neighbourhood: String::new(),
            neighbours_checked: 0,
            upper_bound: None,
        },
        evaluations: ctx.evaluations.get(),
    })
}
