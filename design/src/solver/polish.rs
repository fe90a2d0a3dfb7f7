//! Variable-neighbourhood descent: the solver's last phase and its certificate.
//!
//! The neighbourhoods, cheapest first:
//! 1. every variable at every other level of its range (for widths, only the largest level
//!    within budget can improve, by monotonicity, so only it is evaluated);
//! 2. every stage width at every level, its neighbours pushed along to stay non-decreasing;
//! 3. every variable one step (depths and kernels also two), one other width re-fitted to the
//!    budget;
//! 4. every depth one block up or down, two widths re-fitted in turn;
//! 5. one block moved from a stage to another, nothing or one width re-fitted.
//!
//! The descent moves to the best member of the first neighbourhood that holds an improvement
//! and starts again from the first; it stops when none does. The final, fruitless scan of all
//! five is the certificate: the answer is a local optimum of their union.

use crate::arch::Network;

use super::vars::{Ctx, Eval, Var};

/// The certificate's description of the neighbourhoods.
pub(crate) const NEIGHBOURHOOD: &str = "every variable at every level; every stage width at \
every level with its neighbours pushed along; every variable step with one width re-fitted; \
every depth step with two widths re-fitted; every block moved between stages";

type Generator = fn(&Ctx, &Network, &mut dyn FnMut(Network));

const NEIGHBOURHOODS: [Generator; 5] = [single, pushed, step_refit, depth_refit2, transfer];

/// Descends from `net` to a local optimum; returns how many neighbours the final scan checked.
pub(crate) fn polish(ctx: &Ctx, net: &mut Network, eval: &mut Eval) -> u64 {
    descend(ctx, net, eval, &NEIGHBOURHOODS)
}

/// A cheaper descent for iterated local search: the first `LIGHT` neighbourhoods only.
pub(crate) fn descend_light(ctx: &Ctx, net: &mut Network, eval: &mut Eval) {
    descend(ctx, net, eval, &NEIGHBOURHOODS[..LIGHT]);
}

/// Neighbourhoods of the light descent.
const LIGHT: usize = 3;

fn descend(ctx: &Ctx, net: &mut Network, eval: &mut Eval, neighbourhoods: &[Generator]) -> u64 {
    'descent: loop {
        let mut checked = 0u64;
        for generate in neighbourhoods {
            let mut best: Option<(Network, Eval)> = None;
            generate(ctx, net, &mut |candidate| {
                checked += 1;
                let candidate_eval = ctx.evaluate(&candidate);
                let reference = best.as_ref().map_or(&*eval, |(_, e)| e);
                if candidate_eval.better_than(reference) {
                    best = Some((candidate, candidate_eval));
                }
            });
            if let Some((better, better_eval)) = best {
                *net = better;
                *eval = better_eval;
                continue 'descent;
            }
        }
        return checked;
    }
}

/// Every variable at every level. The objective never falls as a width grows (every log term
/// and every `ln(r^2 c)` grows with it, and rho falls), while params and FLOPs only grow: so
/// of a width's levels only the largest within budget can improve, and only it is evaluated.
fn single(ctx: &Ctx, net: &Network, consider: &mut dyn FnMut(Network)) {
    for &var in ctx.vars() {
        if var.is_width() {
            let mut candidate = net.clone();
            ctx.fit(&mut candidate, var);
            if candidate != *net {
                consider(candidate);
            }
            continue;
        }
        let (low, high) = ctx.range(net, var);
        let current = ctx.get(net, var);
        for level in (low..=high).filter(|level| *level != current) {
            let mut candidate = net.clone();
            ctx.set(&mut candidate, var, level);
            consider(candidate);
        }
    }
}

fn pushed(ctx: &Ctx, net: &Network, consider: &mut dyn FnMut(Network)) {
    let max_level = ctx.space.max_channels / ctx.space.channel_step;
    for index in 0..net.stages.len() {
        for level in 1..=max_level {
            let mut candidate = net.clone();
            if ctx.push_out(&mut candidate, index, level) && candidate != *net {
                consider(candidate);
            }
        }
    }
}

/// Returns the levels one (widths) or one and two (depths, kernels) steps from the current.
fn steps(ctx: &Ctx, net: &Network, var: Var) -> Vec<u32> {
    let (low, high) = ctx.range(net, var);
    let current = ctx.get(net, var);
    let distances: &[u32] = if var.is_width() { &[1] } else { &[1, 2] };
    distances
        .iter()
        .flat_map(|&d| [current.checked_sub(d), Some(current + d)])
        .flatten()
        .filter(|level| (low..=high).contains(level))
        .collect()
}

fn step_refit(ctx: &Ctx, net: &Network, consider: &mut dyn FnMut(Network)) {
    let widths = ctx.width_vars();
    for &var in ctx.vars() {
        for level in steps(ctx, net, var) {
            for &other in widths.iter().filter(|other| **other != var) {
                let mut candidate = net.clone();
                ctx.set(&mut candidate, var, level);
                ctx.fit(&mut candidate, other);
                consider(candidate);
            }
        }
    }
}

fn depth_refit2(ctx: &Ctx, net: &Network, consider: &mut dyn FnMut(Network)) {
    let widths = ctx.width_vars();
    for &var in ctx.vars().iter().filter(|var| matches!(var, Var::Depth(_))) {
        let current = ctx.get(net, var);
        let (low, high) = ctx.range(net, var);
        let levels = [current.checked_sub(1), Some(current + 1)];
        for level in levels
            .into_iter()
            .flatten()
            .filter(|l| (low..=high).contains(l))
        {
            for &first in widths {
                for &second in widths.iter().filter(|second| **second != first) {
                    let mut candidate = net.clone();
                    ctx.set(&mut candidate, var, level);
                    ctx.fit(&mut candidate, first);
                    ctx.fit(&mut candidate, second);
                    consider(candidate);
                }
            }
        }
    }
}

fn transfer(ctx: &Ctx, net: &Network, consider: &mut dyn FnMut(Network)) {
    let widths = ctx.width_vars();
    let stages = net.stages.len();
    for from in 0..stages {
        for to in (0..stages).filter(|to| *to != from) {
            let (from_var, to_var) = (Var::Depth(from), Var::Depth(to));
            let (from_low, _) = ctx.range(net, from_var);
            let (_, to_high) = ctx.range(net, to_var);
            let (from_depth, to_depth) = (ctx.get(net, from_var), ctx.get(net, to_var));
            if from_depth <= from_low || to_depth >= to_high {
                continue;
            }
            let mut moved = net.clone();
            ctx.set(&mut moved, from_var, from_depth - 1);
            ctx.set(&mut moved, to_var, to_depth + 1);
            for &width in widths {
                let mut candidate = moved.clone();
                ctx.fit(&mut candidate, width);
                consider(candidate);
            }
            consider(moved);
        }
    }
}
