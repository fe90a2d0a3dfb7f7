//! Stress check of the solver against the evolutionary baseline on random problems drawn as the
//! property test in `design/tests/solver.rs` draws them (families, objectives, ImageNet or
//! CIFAR resolution, params 0.3-30M, 20-300 FLOPs per param, rho 0.1-2).
//!
//! Run: `cargo run --release -p deepmad-design --example stress -- [SEED] [CASES] [ONLY_CASE]`.
//! Prints every case the solver loses (with the problem, to reproduce it), every solve slower
//! than 3 s, and the count of losses.

use std::time::Instant;

use deepmad_design::score::ObjectiveKind;
use deepmad_design::solver::{baseline, solve, Family, Problem};

/// Candidates of the baseline run each case is compared with (as the property test).
const BASELINE_CANDIDATES: u64 = 20_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut number = |default: u64| {
        args.next()
            .map(|text| text.parse::<u64>().expect("arguments are numbers"))
            .unwrap_or(default)
    };
    let mut state = number(1).max(1);
    let cases = number(100);
    let only = number(u64::MAX);
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let families = [
        Family::Basic,
        Family::Bottleneck,
        Family::Mbconv,
        Family::MbconvSe,
    ];
    let mut losses = 0;
    for case in 0..cases {
        let family = families[(uniform() * 4.0) as usize];
        let cifar = uniform() < 0.5;
        let tinynas = uniform() < 0.5 && family != Family::Basic && !cifar;
        let params = ((0.3 + uniform() * 29.7) * 1e6) as u64;
        let flops_per_param = 20.0 + uniform() * 280.0;
        let rho = 0.1 + uniform() * 1.9;
        let scale = if cifar { 0.02 } else { 1.0 };
        let flops = (params as f64 * flops_per_param * scale * 10.0) as u64;
        if only != u64::MAX && only != case {
            continue;
        }
        let mut problem = Problem::new(family, Some(params), Some(flops), rho);
        if tinynas {
            problem.objective = ObjectiveKind::Tinynas;
        }
        if cifar {
            problem.resolution = 32;
            problem.num_classes = 100;
        }
        let started = Instant::now();
        let Ok(solution) = solve(&problem) else {
            continue;
        };
        let elapsed = started.elapsed();
        let reference = baseline::evolve(&problem, BASELINE_CANDIDATES, 7)
            .map_or(f64::MIN, |b| b.analysis.objective);
        let ours = solution.analysis.objective;
        if ours < reference - 1e-9 {
            losses += 1;
            println!(
                "LOSS case {case}: {family:?} cifar={cifar} tinynas={tinynas} params={params} \
                 flops={flops} rho={rho:.4}: solver {ours:.1} < baseline {reference:.1}"
            );
        }
        if elapsed.as_secs_f64() > 3.0 || only != u64::MAX {
            println!("case {case}: solver {ours:.1} in {elapsed:?}");
        }
    }
    println!("losses {losses} of {cases} cases");
}
