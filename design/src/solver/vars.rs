//! The decision variables of a design problem and the evaluation of candidates.
//!
//! A candidate is a [`Network`] from the search space. Each variable (stem width, a stage's
//! output width, inner width, depth or kernel, the head width) takes an integer *level*:
//! widths are `level * channel_step`, kernels index `space.kernels`. [`Ctx::range`] gives the
//! levels a variable may take with every other variable fixed, so every move stays inside the
//! space (non-decreasing widths, growth limit, inner-width bounds) by construction.

use std::cell::{Cell, RefCell};

use crate::arch::{Mid, Network, Stage, Stem};
use crate::memo::{Ln, LnMemo, Memo};
use crate::score::{
    budget_paper, score_paper_with, stage_terms, ObjectiveKind, PaperStages, Score, StageTerms,
};
use crate::tinynas::{self, score_tinynas_with, BlockCounter, BlockCounts, TinyBlock};

use super::problem::{Problem, SearchSpace};

/// One decision variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Var {
    Stem,
    Out(usize),
    Mid(usize),
    Head,
    Depth(usize),
    Kernel(usize),
}

impl Var {
    /// Returns true for width variables (budget usage grows with their level).
    pub(crate) fn is_width(self) -> bool {
        matches!(self, Var::Stem | Var::Out(_) | Var::Mid(_) | Var::Head)
    }
}

/// A scored candidate: its score and how far it is from feasible (0 when feasible).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Eval {
    pub score: Score,
    pub violation: f64,
}

impl Eval {
    pub(crate) fn feasible(&self) -> bool {
        self.violation == 0.0
    }

    /// Returns true when `self` is strictly better: feasible beats infeasible, then the higher
    /// objective (feasible) or the smaller violation (infeasible) wins.
    pub(crate) fn better_than(&self, other: &Eval) -> bool {
        match (self.feasible(), other.feasible()) {
            (true, true) => self.score.objective > other.score.objective,
            (true, false) => true,
            (false, true) => false,
            (false, false) => self.violation < other.violation,
        }
    }

    /// Returns true when `self` is at least as good as `other`.
    pub(crate) fn at_least(&self, other: &Eval) -> bool {
        !other.better_than(self)
    }
}

/// Everything the search needs about the problem, precomputed once, and the scratch space
/// its evaluations reuse.
pub(crate) struct Ctx<'a> {
    pub problem: &'a Problem,
    pub space: SearchSpace,
    pub alpha: Vec<f64>,
    /// Candidates scored or budget-checked.
    pub evaluations: Cell<u64>,
    /// Every variable, widths first (see [`Ctx::vars`]).
    vars: Vec<Var>,
    /// How many of `vars` are widths.
    widths: usize,
    /// What stages, blocks and logarithms scored so far gave (see [`Memos`]).
    memos: RefCell<Memos>,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(problem: &'a Problem) -> Ctx<'a> {
        let space = problem.space();
        let stages = space.stage_strides.len();
        let mut vars = vec![Var::Stem];
        for index in 0..stages {
            vars.push(Var::Out(index));
            if problem.family != super::Family::Basic {
                vars.push(Var::Mid(index));
            }
        }
        if space.head {
            vars.push(Var::Head);
        }
        let widths = vars.len();
        vars.extend((0..stages).map(Var::Depth));
        if space.kernels.len() > 1 {
            vars.extend((0..stages).map(Var::Kernel));
        }
        Ctx {
            problem,
            space,
            alpha: problem.alpha(),
            evaluations: Cell::new(0),
            vars,
            widths,
            memos: RefCell::new(Memos::new()),
        }
    }

    fn stages(&self) -> usize {
        self.space.stage_strides.len()
    }

    fn has_mid(&self) -> bool {
        self.problem.family != super::Family::Basic
    }

    /// Returns every variable, widths first.
    pub(crate) fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Returns the width variables.
    pub(crate) fn width_vars(&self) -> &[Var] {
        &self.vars[..self.widths]
    }

    /// Returns the smallest design of the space: every variable at its lowest level.
    pub(crate) fn minimal(&self) -> Network {
        let step = self.space.channel_step;
        let stem = self.space.min_stem.div_ceil(step) * step;
        let family = self.problem.family;
        let stages = self
            .space
            .stage_strides
            .iter()
            .map(|&stride| Stage {
                block: family.block(),
                in_channels: stem,
                out: stem,
                stride,
                depth: 1,
                kernel: self.space.kernels[0],
                mid: self
                    .has_mid()
                    .then_some(Mid::Width(self.mid_bounds(stem).0 * step)),
                se: family == super::Family::MbconvSe,
            })
            .collect();
        Network {
            resolution: self.problem.resolution,
            in_channels: self.problem.in_channels,
            num_classes: self.problem.num_classes,
            activation: family.activation(),
            stem: Stem {
                out: stem,
                kernel: 3,
                stride: self.space.stem_stride,
                max_pool: false,
            },
            stages,
            head: self.space.head.then_some(stem),
        }
    }

    /// Returns the inner-width levels allowed for a stage of output width `out`.
    fn mid_bounds(&self, out: u32) -> (u32, u32) {
        let step = self.space.channel_step;
        let low = (out * self.space.mid_min_tenths)
            .div_ceil(10)
            .div_ceil(step)
            .max(1);
        let high = ((out * self.space.mid_max_tenths / 10).min(self.space.max_mid) / step).max(1);
        (low, high.max(low))
    }

    /// Returns the current level of `var`.
    pub(crate) fn get(&self, net: &Network, var: Var) -> u32 {
        let step = self.space.channel_step;
        match var {
            Var::Stem => net.stem.out / step,
            Var::Out(i) => net.stages[i].out / step,
            Var::Mid(i) => mid_width(&net.stages[i]) / step,
            Var::Head => net.head.expect("head var only exists with a head") / step,
            Var::Depth(i) => net.stages[i].depth,
            Var::Kernel(i) => self.kernel_index(net.stages[i].kernel),
        }
    }

    fn kernel_index(&self, kernel: u32) -> u32 {
        self.space
            .kernels
            .iter()
            .position(|k| *k == kernel)
            .expect("kernels come from the space") as u32
    }

    /// Returns the inclusive level range of `var` with every other variable fixed.
    pub(crate) fn range(&self, net: &Network, var: Var) -> (u32, u32) {
        let step = self.space.channel_step;
        let growth = self.space.max_growth;
        let last = self.stages() - 1;
        let out = |i: usize| net.stages[i].out / step;
        match var {
            Var::Stem => {
                let low = (self.space.min_stem.div_ceil(step)).max(out(0).div_ceil(growth));
                let high = (self.space.max_stem / step).min(out(0));
                (low, high)
            }
            Var::Out(i) => {
                let previous = if i == 0 {
                    net.stem.out / step
                } else {
                    out(i - 1)
                };
                let mut low = previous;
                let mut high = (self.space.max_channels / step).min(growth * previous);
                if i < last {
                    low = low.max(out(i + 1).div_ceil(growth));
                    high = high.min(out(i + 1));
                } else if let Some(head) = net.head {
                    low = low.max((head / step).div_ceil(self.space.max_head_growth));
                    high = high.min(head / step);
                }
                (low, high)
            }
            Var::Mid(i) => self.mid_bounds(net.stages[i].out),
            Var::Head => {
                let last_out = out(last);
                (
                    last_out,
                    (self.space.max_head_growth * last_out).min(4096 / step),
                )
            }
            Var::Depth(i) => {
                let max = if i == 0 {
                    self.space.first_stage_max_depth.min(self.space.max_depth)
                } else {
                    self.space.max_depth
                };
                (1, max)
            }
            Var::Kernel(_) => (0, self.space.kernels.len() as u32 - 1),
        }
    }

    /// Sets `var` to `level`, keeping the width chain and inner-width bounds consistent.
    pub(crate) fn set(&self, net: &mut Network, var: Var, level: u32) {
        let step = self.space.channel_step;
        match var {
            Var::Stem => {
                net.stem.out = level * step;
                net.stages[0].in_channels = level * step;
            }
            Var::Out(i) => {
                net.stages[i].out = level * step;
                if let Some(next) = net.stages.get_mut(i + 1) {
                    next.in_channels = level * step;
                }
                if self.has_mid() {
                    let (low, high) = self.mid_bounds(level * step);
                    let mid = (mid_width(&net.stages[i]) / step).clamp(low, high);
                    net.stages[i].mid = Some(Mid::Width(mid * step));
                }
            }
            Var::Mid(i) => net.stages[i].mid = Some(Mid::Width(level * step)),
            Var::Head => net.head = Some(level * step),
            Var::Depth(i) => net.stages[i].depth = level,
            Var::Kernel(i) => net.stages[i].kernel = self.space.kernels[level as usize],
        }
    }

    /// Sets stage `index`'s output width to `level` and moves the other widths just enough to
    /// stay inside the space: later stages between the previous width and `max_growth` times
    /// it, earlier stages (and the stem) between the next width over `max_growth` and it, the
    /// head within its bounds. Returns false when no such widths exist; callers work on a copy.
    pub(crate) fn push_out(&self, net: &mut Network, index: usize, level: u32) -> bool {
        let step = self.space.channel_step;
        let growth = self.space.max_growth;
        let max_level = self.space.max_channels / step;
        self.set(net, Var::Out(index), level.min(max_level));
        for later in index + 1..net.stages.len() {
            let previous = net.stages[later - 1].out / step;
            let current = net.stages[later].out / step;
            let clamped = current.clamp(previous, (growth * previous).min(max_level));
            self.set(net, Var::Out(later), clamped);
        }
        for earlier in (0..index).rev() {
            let next = net.stages[earlier + 1].out / step;
            let current = net.stages[earlier].out / step;
            self.set(
                net,
                Var::Out(earlier),
                current.clamp(next.div_ceil(growth), next),
            );
        }
        let first = net.stages[0].out / step;
        let stem = (net.stem.out / step).clamp(first.div_ceil(growth), first);
        self.set(net, Var::Stem, stem);
        if let Some(head) = net.head {
            let last = net.stages.last().expect("at least one stage").out / step;
            let clamped = (head / step).clamp(last, self.space.max_head_growth * last);
            self.set(net, Var::Head, clamped);
        }
        self.consistent(net)
    }

    /// Returns true when every variable lies inside its range.
    pub(crate) fn consistent(&self, net: &Network) -> bool {
        self.vars().iter().all(|&var| {
            let (low, high) = self.range(net, var);
            (low..=high).contains(&self.get(net, var))
        })
    }

    /// Scores `net` under the problem's objective and measures its constraint violation.
    pub(crate) fn evaluate(&self, net: &Network) -> Eval {
        self.evaluations.set(self.evaluations.get() + 1);
        let memos = &mut *self.memos.borrow_mut();
        let (alpha, beta) = (&self.alpha, self.problem.beta);
        let score = match self.problem.objective {
            ObjectiveKind::Paper => score_paper_with(net, alpha, beta, memos),
            ObjectiveKind::Tinynas => {
                score_tinynas_with(tinynas::blocks(net), net.resolution, alpha, beta, memos)
            }
        };
        Eval {
            score,
            violation: self.violation(&score),
        }
    }

    /// Returns the params and FLOPs of `net` under the problem's objective's conventions.
    fn budget(&self, net: &Network) -> (u64, u64) {
        self.evaluations.set(self.evaluations.get() + 1);
        let memos = &mut *self.memos.borrow_mut();
        match self.problem.objective {
            ObjectiveKind::Paper => budget_paper(net, memos),
            ObjectiveKind::Tinynas => tinynas::budget(tinynas::blocks(net), net.resolution, memos),
        }
    }

    /// Returns the summed relative excess over each bound (0 when feasible).
    fn violation(&self, score: &Score) -> f64 {
        let excess = |value: f64, bound: f64| (value / bound - 1.0).max(0.0);
        let mut total = excess(score.effectiveness, self.problem.rho);
        if let Some(params) = self.problem.params {
            total += excess(score.params as f64, params as f64);
        }
        if let Some(flops) = self.problem.flops {
            total += excess(score.flops as f64, flops as f64);
        }
        if let Some(layers) = self.problem.max_layers {
            total += excess(f64::from(score.layers), f64::from(layers));
        }
        total
    }

    /// Returns true when `net` holds the params and FLOPs budgets (rho and layers aside).
    pub(crate) fn within_budget(&self, net: &Network) -> bool {
        let (params, flops) = self.budget(net);
        self.problem.params.is_none_or(|p| params <= p)
            && self.problem.flops.is_none_or(|f| flops <= f)
    }

    /// Sets width `var` to the largest level whose design stays within the params and FLOPs
    /// budgets. Returns false, leaving the lowest level, when even that is over budget.
    ///
    /// Budget use grows with every width, so the levels within budget are a prefix of the
    /// range: the search gallops from the current level (one step, two, four, ...) until it
    /// brackets the boundary, then halves the bracket. A fit usually lands near where the
    /// width was, so this checks far fewer levels than a binary search over the whole range.
    /// Setting a stage's output width clamps its inner width into the new bounds. A fit of an
    /// output width first brings the inner width within the bounds of the lowest output level
    /// (so widening the output does not widen the inner width too; the budget goes to the
    /// output), and every probe clamps from that, so the answer does not depend on which
    /// levels were probed.
    pub(crate) fn fit(&self, net: &mut Network, var: Var) -> bool {
        let (low, high) = self.range(net, var);
        let step = self.space.channel_step;
        let inner = match var {
            Var::Out(index) if self.has_mid() => {
                let (mid_low, mid_high) = self.mid_bounds(low * step);
                let mid = (mid_width(&net.stages[index]) / step).clamp(mid_low, mid_high);
                Some((index, Some(Mid::Width(mid * step))))
            }
            _ => None,
        };
        let place = |net: &mut Network, level: u32| {
            if let Some((index, mid)) = inner {
                net.stages[index].mid = mid;
            }
            self.set(net, var, level);
        };
        let probe = |net: &mut Network, level: u32| {
            place(net, level);
            self.within_budget(net)
        };
        // `good` is a level known within budget, `bad` one known over it (good < bad).
        let current = self.get(net, var).clamp(low, high);
        let (mut good, mut bad);
        if probe(net, current) {
            good = current;
            let mut stride = 1;
            loop {
                if good == high {
                    // Every level fits.
                    place(net, high);
                    return true;
                }
                let next = good.saturating_add(stride).min(high);
                if probe(net, next) {
                    good = next;
                    stride = stride.saturating_mul(2);
                } else {
                    bad = next;
                    break;
                }
            }
        } else {
            bad = current;
            let mut stride = 1;
            loop {
                if bad == low {
                    // Not even the lowest level fits.
                    place(net, low);
                    return false;
                }
                let next = bad.saturating_sub(stride).max(low);
                if probe(net, next) {
                    good = next;
                    break;
                }
                bad = next;
                stride = stride.saturating_mul(2);
            }
        }
        while bad - good > 1 {
            let middle = good + (bad - good) / 2;
            if probe(net, middle) {
                good = middle;
            } else {
                bad = middle;
            }
        }
        place(net, good);
        true
    }
}

/// The solver's memos. Candidates differ from their parents in one or two stages, so most
/// stages (paper mode) or blocks (TinyNAS mode) of a candidate were scored before; a
/// remembered value is the one computed then, so scores are bit-for-bit the direct ones.
struct Memos {
    stages: Memo<(Stage, u32), StageTerms>,
    blocks: Memo<(TinyBlock, u64), BlockCounts>,
    logs: LnMemo,
}

impl Memos {
    fn new() -> Memos {
        Memos {
            stages: Memo::new(12),
            blocks: Memo::new(12),
            logs: LnMemo::new(),
        }
    }
}

impl Ln for Memos {
    fn ln(&mut self, x: f64) -> f64 {
        self.logs.ln(x)
    }
}

impl PaperStages for Memos {
    fn stage_terms(&mut self, stage: &Stage, side: u32) -> StageTerms {
        let logs = &mut self.logs;
        self.stages
            .get_or((*stage, side), || stage_terms(stage, side, logs))
    }
}

impl BlockCounter for Memos {
    fn block_counts(&mut self, block: &TinyBlock, side: f64) -> BlockCounts {
        let logs = &mut self.logs;
        if let TinyBlock::Conv { .. } = block {
            // One conv (the stem or the head): cheaper to count than to look up.
            return tinynas::block_counts(block, side, logs);
        }
        self.blocks.get_or((*block, side.to_bits()), || {
            tinynas::block_counts(block, side, logs)
        })
    }
}

fn mid_width(stage: &Stage) -> u32 {
    match stage.mid {
        Some(Mid::Width(width)) => width,
        _ => unreachable!("solver stages always carry an absolute inner width"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::moves::Rng;
    use super::super::Family;
    use super::*;
    use crate::score::score_paper;
    use crate::tinynas::{score_tinynas, TinyNet};

    /// Random designs of `problem`'s space: every variable at a random level of its range.
    fn random_designs(ctx: &Ctx, count: usize) -> Vec<Network> {
        let mut rng = Rng::new(7);
        (0..count)
            .map(|_| {
                let mut net = ctx.minimal();
                for _ in 0..3 {
                    for &var in ctx.vars() {
                        let (low, high) = ctx.range(&net, var);
                        ctx.set(&mut net, var, rng.between(low, high));
                    }
                }
                net
            })
            .collect()
    }

    /// A fit lands on the largest level within budget, found by scanning every level the
    /// same way (the inner width brought within the bounds of the lowest level first), from
    /// designs where the width starts below, at and above that level.
    #[test]
    fn fits_find_the_largest_level_within_budget() {
        for family in [Family::Basic, Family::Bottleneck, Family::MbconvSe] {
            for objective in [ObjectiveKind::Paper, ObjectiveKind::Tinynas] {
                if objective == ObjectiveKind::Tinynas && family == Family::Basic {
                    continue;
                }
                let mut problem = Problem::new(family, Some(8_000_000), Some(1_500_000_000), 0.5);
                problem.objective = objective;
                let ctx = Ctx::new(&problem);
                let mut fitted = 0;
                for net in random_designs(&ctx, 60) {
                    for &var in ctx.width_vars() {
                        let (low, high) = ctx.range(&net, var);
                        let mut start = net.clone();
                        if let Var::Out(index) = var {
                            if ctx.has_mid() {
                                let step = ctx.space.channel_step;
                                let (mid_low, mid_high) = ctx.mid_bounds(low * step);
                                let mid = (mid_width(&start.stages[index]) / step)
                                    .clamp(mid_low, mid_high);
                                start.stages[index].mid = Some(Mid::Width(mid * step));
                            }
                        }
                        let expected = (low..=high).rev().find(|&level| {
                            let mut probe = start.clone();
                            ctx.set(&mut probe, var, level);
                            ctx.within_budget(&probe)
                        });
                        let mut got = net.clone();
                        let fits = ctx.fit(&mut got, var);
                        assert_eq!(fits, expected.is_some(), "{var:?} {net:?}");
                        let mut want = start.clone();
                        ctx.set(&mut want, var, expected.unwrap_or(low));
                        assert_eq!(got, want, "{var:?} from {net:?}");
                        fitted += usize::from(fits);
                    }
                }
                assert!(fitted > 100, "{family:?} {objective:?}: only {fitted} fits");
            }
        }
    }

    /// The solver's memoised scoring and budget-only counting agree bit for bit with the
    /// public scores, so the search decides exactly what the reported analysis says.
    #[test]
    fn fast_evaluation_is_the_public_score() {
        for objective in [ObjectiveKind::Paper, ObjectiveKind::Tinynas] {
            let families = [
                Family::Basic,
                Family::Bottleneck,
                Family::Mbconv,
                Family::MbconvSe,
            ];
            for (family, resolution) in families.into_iter().zip([224, 32, 160, 224]) {
                if objective == ObjectiveKind::Tinynas && family == Family::Basic {
                    continue;
                }
                let mut problem = Problem::new(family, Some(20_000_000), None, 0.5);
                problem.objective = objective;
                // TinyNAS scores five stages, which small inputs do not have.
                problem.resolution = match objective {
                    ObjectiveKind::Tinynas => resolution.max(192),
                    ObjectiveKind::Paper => resolution,
                };
                problem.validate().unwrap();
                let ctx = Ctx::new(&problem);
                for net in random_designs(&ctx, 300) {
                    let fast = ctx.evaluate(&net).score;
                    let reference = match objective {
                        ObjectiveKind::Paper => score_paper(&net, &ctx.alpha, problem.beta),
                        ObjectiveKind::Tinynas => score_tinynas(
                            &TinyNet::from_network(&net).unwrap(),
                            net.resolution,
                            &ctx.alpha,
                            problem.beta,
                        ),
                    };
                    assert_eq!(fast, reference, "{objective:?} {family:?} {net:?}");
                    assert_eq!(
                        fast.objective.to_bits(),
                        reference.objective.to_bits(),
                        "{net:?}"
                    );
                    assert_eq!(ctx.budget(&net), (fast.params, fast.flops), "{net:?}");
                }
            }
        }
    }
}
