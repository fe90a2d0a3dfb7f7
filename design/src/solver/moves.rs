//! The moves and helpers the solver's population search (`search.rs`) and the paper code's
//! evolutionary baseline (`baseline.rs`) share: the deterministic generator, the width fill,
//! the blind mutation and the choice of the member a better child replaces.
//!
//! All randomness comes from a fixed-seed generator, so the same problem gives the same design.

use crate::arch::Network;

use super::vars::{Ctx, Eval, Var};

/// Width mutations scale a width by one of these factors, as the paper's code does.
pub(crate) const WIDTH_FACTORS: [f64; 6] = [0.5, 0.67, 0.8, 1.25, 1.5, 2.0];

/// A small deterministic generator (xorshift64*), local to one search.
#[derive(Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Returns a uniform integer in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u32) -> u32 {
        (((self.next() >> 32) * u64::from(n)) >> 32) as u32
    }

    /// Returns a uniform integer in `low..=high`.
    pub(crate) fn between(&mut self, low: u32, high: u32) -> u32 {
        low + self.below(high - low + 1)
    }

    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u32) as usize]
    }
}

/// Fills every width to the budget, last stages first, a few passes.
pub(crate) fn fill(ctx: &Ctx, net: &mut Network) {
    let widths = ctx.width_vars();
    for _ in 0..3 {
        for &var in widths.iter().rev() {
            ctx.fit(net, var);
        }
    }
}

/// Returns the index of the population's worst member: the first of the worst
/// when several tie.
pub(crate) fn worst_index(population: &[(Network, Eval)]) -> usize {
    let mut worst = 0;
    for (index, member) in population.iter().enumerate() {
        if population[worst].1.better_than(&member.1) {
            worst = index;
        }
    }
    worst
}

/// One random mutation of `var`: widths scale by a random factor, depths step by one or two
/// or jump anywhere, kernels jump anywhere.
pub(crate) fn mutate(ctx: &Ctx, net: &mut Network, var: Var, rng: &mut Rng) {
    let (low, high) = ctx.range(net, var);
    let current = ctx.get(net, var);
    let level = match var {
        Var::Kernel(_) => rng.between(low, high),
        Var::Depth(_) => match rng.below(3) {
            0 => rng.between(low, high),
            1 => current.saturating_sub(1 + rng.below(2)).max(low),
            _ => (current + 1 + rng.below(2)).min(high),
        },
        _ => {
            let factor = rng.pick(&WIDTH_FACTORS);
            let scaled = (f64::from(current) * factor).round() as u32;
            let moved = if scaled == current {
                if factor > 1.0 {
                    current + 1
                } else {
                    current.saturating_sub(1)
                }
            } else {
                scaled
            };
            moved.clamp(low, high)
        }
    };
    ctx.set(net, var, level);
}
