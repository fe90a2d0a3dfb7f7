//! Prints the solver vs. evolutionary-baseline table of `design/README.md`.
//! Run: `cargo run --release -p deepmad-design --example compare_baseline [candidates]`.
//! With `0` candidates only the solver runs: its objective and the median CPU time of five
//! solves per row.

use deepmad_design::score::ObjectiveKind;
use deepmad_design::solver::{baseline, solve, Family, Problem};

/// The budgets of Tables 1-3: (name, family, params, FLOPs, rho0).
const ROWS: [(&str, Family, u64, u64, f64); 6] = [
    ("R18", Family::Bottleneck, 11_690_000, 1_820_000_000, 0.3),
    ("R34", Family::Bottleneck, 21_800_000, 3_680_000_000, 0.3),
    ("R50", Family::Bottleneck, 25_550_000, 4_130_000_000, 0.3),
    ("29M", Family::MbconvSe, 29_000_000, 4_500_000_000, 0.5),
    ("50M", Family::MbconvSe, 50_000_000, 8_700_000_000, 0.5),
    ("89M", Family::MbconvSe, 89_000_000, 15_400_000_000, 0.5),
];

/// Independent baseline runs per row (seeds 1..=SEEDS): its result varies by seed.
const SEEDS: u64 = 5;

/// CPU time this thread has run, from Linux's `/proc/thread-self/schedstat` (nanoseconds
/// on the CPU): unlike wall time it does not grow when other processes compete for the cores.
fn cpu_time() -> Option<std::time::Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(std::time::Duration::from_nanos(nanos))
}

fn main() {
    let candidates: u64 = std::env::args()
        .nth(1)
        .map(|text| text.parse().expect("candidates is a number"))
        .unwrap_or(baseline::PAPER_CANDIDATES);
    println!("| budget | objective | solver | solver CPU time | baseline best of {SEEDS} | baseline mean | baseline CPU time (one run) | solver - best |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for objective in [ObjectiveKind::Paper, ObjectiveKind::Tinynas] {
        for (name, family, params, flops, rho) in ROWS {
            let mut problem = Problem::new(family, Some(params), Some(flops), rho);
            problem.objective = objective;
            let started = cpu_time().unwrap_or_default();
            let solved = solve(&problem).expect("the paper's budgets are feasible");
            let solve_time = cpu_time().unwrap_or_default() - started;
            let ours = solved.analysis.objective;
            if candidates == 0 {
                // Solver only: the median of five solves (the time varies run to run on a
                // shared machine; the design does not).
                let mut times: Vec<f64> = (0..5)
                    .map(|_| {
                        let started = cpu_time().unwrap_or_default();
                        solve(&problem).expect("the paper's budgets are feasible");
                        (cpu_time().unwrap_or_default() - started).as_secs_f64() * 1e3
                    })
                    .collect();
                times.sort_by(f64::total_cmp);
                println!(
                    "| {name} | {} | {ours:.1} | {:.0} ms (min {:.0}, max {:.0}) | | | | |",
                    objective.name(),
                    times[2],
                    times[0],
                    times[4]
                );
                continue;
            }
            let started = cpu_time().unwrap_or_default();
            let objectives: Vec<f64> = (1..=SEEDS)
                .map(|seed| {
                    baseline::evolve(&problem, candidates, seed)
                        .expect("baseline finds a design")
                        .analysis
                        .objective
                })
                .collect();
            let baseline_time = (cpu_time().unwrap_or_default() - started) / SEEDS as u32;
            let best = objectives.iter().copied().fold(f64::MIN, f64::max);
            let mean = objectives.iter().sum::<f64>() / objectives.len() as f64;
            println!(
                "| {name} | {} | {ours:.1} | {:.0} ms | {best:.1} | {mean:.1} | {:.0} ms | {:+.1} |",
                objective.name(),
                solve_time.as_secs_f64() * 1e3,
                baseline_time.as_secs_f64() * 1e3,
                ours - best
            );
        }
    }
}
