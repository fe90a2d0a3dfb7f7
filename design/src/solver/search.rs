//! The search moves: the population search of each island, the structural kick of iterated
//! local search, and the width repair both use; the moves they share with the evolutionary
//! baseline (the generator, the width fill, blind mutation) are in `moves.rs`. `mod.rs` strings
//! them together with the polish (`polish.rs`); `design/README.md` describes the whole method.
//!
//! All randomness comes from a fixed-seed generator, so the same problem gives the same design.

use crate::arch::Network;

use super::moves::{fill, mutate, worst_index, Rng, WIDTH_FACTORS};
use super::vars::{Ctx, Eval, Var};

/// Designs kept by the population search.
const POPULATION: usize = 256;
/// Children the population search evaluates.
const CHILDREN: u32 = 60_000;
/// Tenths of the children made by blind mutation (the rest by budget-aware moves).
const BLIND_TENTHS: u32 = 9;

/// Runs the population search from `start` and returns the best candidates found, best first.
///
/// A population of [`POPULATION`] designs evolves for [`CHILDREN`] children: each child is a
/// random member with one or two mutations, its budget repaired and a few widths re-fitted;
/// it replaces the worst member when it is at least as good. Repair and re-fit keep nearly
/// every child on the budget boundary, where the optimum lies, so far fewer children are
/// needed than with blind mutation.
pub(crate) fn population_search(ctx: &Ctx, start: &Network, seed: u64) -> Vec<(Network, Eval)> {
    let mut rng = Rng::new(seed);
    let mut first = start.clone();
    fill(ctx, &mut first);
    let first_eval = ctx.evaluate(&first);
    let mut population = vec![(first, first_eval)];
    while population.len() < POPULATION {
        let mut member = start.clone();
        randomize_structure(ctx, &mut member, &mut rng);
        fill(ctx, &mut member);
        let eval = ctx.evaluate(&member);
        population.push((member, eval));
    }
    let vars = ctx.vars();
    // The worst member changes only when a child replaces it.
    let mut worst = worst_index(&population);
    for _ in 0..CHILDREN {
        let parent = &population[rng.below(POPULATION as u32) as usize].0;
        let mut child = parent.clone();
        if rng.below(10) < BLIND_TENTHS {
            for _ in 0..2 {
                mutate(ctx, &mut child, rng.pick(vars), &mut rng);
            }
        } else {
            perturb(ctx, &mut child, &mut rng);
        }
        let eval = ctx.evaluate(&child);
        if !eval.feasible() && population[0].1.feasible() {
            continue;
        }
        if eval.at_least(&population[worst].1) {
            population[worst] = (child, eval);
            worst = worst_index(&population);
        }
    }
    population.sort_by(|a, b| {
        if a.1.better_than(&b.1) {
            std::cmp::Ordering::Less
        } else if b.1.better_than(&a.1) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    population
}

/// Draws random depths and kernels (widths stay minimal until the fill).
fn randomize_structure(ctx: &Ctx, net: &mut Network, rng: &mut Rng) {
    for &var in ctx.vars() {
        if !var.is_width() {
            let (low, high) = ctx.range(net, var);
            let level = rng.between(low, high);
            ctx.set(net, var, level);
        }
    }
}

/// A structural jump for iterated local search: two or three depths or kernels move to random
/// levels at once, then every width is shrunk to fit and refilled to the budget.
pub(crate) fn kick(ctx: &Ctx, net: &mut Network, rng: &mut Rng) {
    let structural: Vec<Var> = ctx
        .vars()
        .iter()
        .copied()
        .filter(|v| !v.is_width())
        .collect();
    if structural.is_empty() {
        return;
    }
    for _ in 0..2 + rng.below(2) {
        let var = rng.pick(&structural);
        let (low, high) = ctx.range(net, var);
        let level = rng.between(low, high);
        ctx.set(net, var, level);
    }
    let widths = ctx.width_vars();
    repair(ctx, net, widths, rng);
    fill(ctx, net);
}

/// Mutates one or two variables, then repairs the budget and re-fits one to three widths.
fn perturb(ctx: &Ctx, net: &mut Network, rng: &mut Rng) {
    let vars = ctx.vars();
    let widths = ctx.width_vars();
    let mutations = 1 + rng.below(2);
    for _ in 0..mutations {
        let var = rng.pick(vars);
        if let (Var::Out(index), 0) = (var, rng.below(3)) {
            // A coupled move: the neighbours follow, so runs of equal widths can grow together.
            let max = ctx.space.max_channels / ctx.space.channel_step;
            let level = rng.between(1, max);
            let mut moved = net.clone();
            if ctx.push_out(&mut moved, index, level) {
                *net = moved;
            }
            continue;
        }
        let (low, high) = ctx.range(net, var);
        let current = ctx.get(net, var);
        let level = match rng.below(4) {
            0 => rng.between(low, high),
            1 if var.is_width() => {
                let factor = rng.pick(&WIDTH_FACTORS);
                ((f64::from(current) * factor).round() as u32).clamp(low, high)
            }
            _ => {
                let delta = 1 + rng.below(3);
                if rng.below(2) == 0 {
                    current.saturating_sub(delta).max(low)
                } else {
                    (current + delta).min(high)
                }
            }
        };
        ctx.set(net, var, level);
    }
    repair(ctx, net, widths, rng);
    for _ in 0..rng.below(3) {
        ctx.fit(net, rng.pick(widths));
    }
}

/// Shrinks random widths to the budget until the design fits (or every width was tried).
fn repair(ctx: &Ctx, net: &mut Network, widths: &[Var], rng: &mut Rng) {
    let offset = rng.below(widths.len() as u32) as usize;
    for index in 0..widths.len() {
        if ctx.within_budget(net) {
            return;
        }
        ctx.fit(net, widths[(offset + index) % widths.len()]);
    }
}
