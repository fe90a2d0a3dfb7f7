//! Solve time of five-stage problems at 224 (goal: under 1 s on one core).
//! Run: `cargo bench -p deepmad-design --bench solver`.

use criterion::{criterion_group, criterion_main, Criterion};
use deepmad_design::score::ObjectiveKind;
use deepmad_design::solver::{solve, Family, Problem};

fn problems() -> Vec<(&'static str, Problem)> {
    let mut rows = Vec::new();
    for objective in [ObjectiveKind::Paper, ObjectiveKind::Tinynas] {
        let mut r18 = Problem::new(
            Family::Bottleneck,
            Some(11_690_000),
            Some(1_820_000_000),
            0.3,
        );
        r18.objective = objective;
        let mut m29 = Problem::new(Family::MbconvSe, Some(29_000_000), Some(4_500_000_000), 0.5);
        m29.objective = objective;
        let name = objective.name();
        rows.push((
            if name == "paper" {
                "r18-paper"
            } else {
                "r18-tinynas"
            },
            r18,
        ));
        rows.push((
            if name == "paper" {
                "29m-paper"
            } else {
                "29m-tinynas"
            },
            m29,
        ));
    }
    let mut cifar = Problem::new(Family::Basic, Some(270_000), Some(41_000_000), 0.5);
    cifar.resolution = 32;
    cifar.num_classes = 100;
    rows.push(("resnet20-cifar-paper", cifar));
    rows
}

fn bench_solver(c: &mut Criterion) {
    let mut group = c.benchmark_group("solve");
    group.sample_size(10);
    for (name, problem) in problems() {
        group.bench_function(name, |b| b.iter(|| solve(&problem).expect("feasible")));
    }
    group.finish();
}

criterion_group!(benches, bench_solver);
criterion_main!(benches);
