use deepmad_design::classic;
use deepmad_design::score::{analyze_paper, default_alpha, scale_count};
use deepmad_design::solver::solve;

use super::*;

fn small_problem() -> Problem {
    // The CIFAR ResNet-20 row of design/benches/solver.rs: solves in milliseconds.
    let mut problem = Problem::new(Family::Basic, Some(270_000), Some(41_000_000), 0.5);
    problem.resolution = 32;
    problem.num_classes = 100;
    problem
}

#[test]
fn analysis_round_trips() {
    let net = classic::by_name("resnet18", 1000, 224).unwrap();
    let analysis = analyze_paper(&net, &default_alpha(scale_count(&net)), 10.0).unwrap();
    let wire = analysis_to_proto(&analysis, &net.content_hash());
    assert_eq!(wire.content_hash, net.content_hash());
    assert_eq!(wire.objective_kind, v1::ObjectiveKind::Paper as i32);
    assert_eq!(wire.stages.len(), analysis.stages.len());
    assert_eq!(analysis_from_proto(&wire).unwrap(), analysis);
}

#[test]
fn solution_round_trips_through_solve_response() {
    let problem = small_problem();
    let solution = solve(&problem).unwrap();
    let wire = solution_to_proto(&solution, 12.5);
    assert_eq!(wire.content_hash, solution.network.content_hash());
    assert_eq!(wire.solve_ms, 12.5);
    assert_eq!(solution_from_proto(&wire).unwrap(), solution);
}

#[test]
fn solution_with_a_wrong_hash_is_rejected() {
    let solution = solve(&small_problem()).unwrap();
    let mut wire = solution_to_proto(&solution, 1.0);
    wire.content_hash = "00".repeat(32);
    assert_eq!(
        solution_from_proto(&wire).unwrap_err().field,
        "content_hash"
    );
}

#[test]
fn problem_round_trips_through_solve_request() {
    let mut problem = small_problem();
    problem.objective = ObjectiveKind::Paper;
    problem.alpha = Some(vec![1.0, 2.0, 8.0]);
    problem.max_layers = Some(40);
    let mut space = SearchSpace::default_for(problem.family, problem.resolution);
    space.stage_strides = vec![1, 2, 2];
    problem.space = Some(space);
    let wire = problem_to_proto(&problem).unwrap();
    assert_eq!(wire.stage_strides, vec![1, 2, 2]);
    assert_eq!(problem_from_proto(&wire).unwrap(), problem);
}

#[test]
fn problem_defaults_fill_unset_fields() {
    let wire = v1::SolveRequest {
        family: v1::Family::Mbconv.into(),
        params: Some(5_000_000),
        rho: 0.5,
        ..Default::default()
    };
    let problem = problem_from_proto(&wire).unwrap();
    assert_eq!(
        problem,
        Problem::new(Family::Mbconv, Some(5_000_000), None, 0.5)
    );
}

#[test]
fn bad_solve_requests_name_the_field() {
    let good = problem_to_proto(&small_problem()).unwrap();
    let cases: Vec<(&str, v1::SolveRequest)> = vec![
        (
            "family",
            v1::SolveRequest {
                family: 0,
                ..good.clone()
            },
        ),
        (
            "family",
            v1::SolveRequest {
                family: 99,
                ..good.clone()
            },
        ),
        (
            "objective",
            v1::SolveRequest {
                objective: 7,
                ..good.clone()
            },
        ),
        (
            "rho",
            v1::SolveRequest {
                rho: -1.0,
                ..good.clone()
            },
        ),
        (
            "params",
            v1::SolveRequest {
                params: None,
                flops: None,
                ..good.clone()
            },
        ),
        (
            "flops",
            v1::SolveRequest {
                flops: Some(0),
                ..good.clone()
            },
        ),
        (
            "beta",
            v1::SolveRequest {
                beta: Some(f64::NAN),
                ..good.clone()
            },
        ),
        (
            "alpha",
            v1::SolveRequest {
                alpha: vec![1.0],
                ..good.clone()
            },
        ),
        (
            "resolution",
            v1::SolveRequest {
                resolution: Some(4),
                ..good.clone()
            },
        ),
        (
            "max_layers",
            v1::SolveRequest {
                max_layers: Some(0),
                ..good.clone()
            },
        ),
        (
            "stage_strides",
            v1::SolveRequest {
                stage_strides: vec![3],
                ..good.clone()
            },
        ),
    ];
    for (field, request) in cases {
        let error = problem_from_proto(&request).unwrap_err();
        assert_eq!(error.field, field, "{error}");
    }
}

#[test]
fn problems_with_custom_spaces_cannot_be_sent() {
    let mut problem = small_problem();
    let mut space = SearchSpace::default_for(problem.family, problem.resolution);
    space.max_depth = 4;
    problem.space = Some(space);
    assert_eq!(problem_to_proto(&problem).unwrap_err().field, "space");
}

#[test]
fn enums_map_both_ways() {
    for family in [
        Family::Basic,
        Family::Bottleneck,
        Family::Mbconv,
        Family::MbconvSe,
    ] {
        let wire = v1::Family::from(family) as i32;
        assert_eq!(family_from_proto(wire, "family").unwrap(), family);
    }
    for kind in [ObjectiveKind::Paper, ObjectiveKind::Tinynas] {
        let wire = v1::ObjectiveKind::from(kind) as i32;
        assert_eq!(objective_from_proto(wire, "objective").unwrap(), kind);
    }
    assert_eq!(
        objective_from_proto(0, "objective").unwrap(),
        ObjectiveKind::Paper
    );
    let error = family_from_proto(0, "grid.families[2]").unwrap_err();
    assert_eq!(error.field, "grid.families[2]");
}

#[test]
fn certificates_of_unknown_kind_are_rejected() {
    let wire = v1::Certificate {
        kind: "global-optimum".into(),
        ..Default::default()
    };
    assert_eq!(
        certificate_from_proto(&wire).unwrap_err().field,
        "certificate.kind"
    );
}

#[test]
fn analyze_requests_are_checked() {
    let request = v1::AnalyzeRequest {
        network: Some(v1::analyze_request::Network::Builtin("resnet50".into())),
        resolution: Some(160),
        objective: v1::ObjectiveKind::Tinynas.into(),
        ..Default::default()
    };
    let input = analyze_input_from_proto(&request).unwrap();
    assert_eq!(input.source, NetworkSource::Builtin("resnet50".into()));
    assert_eq!(input.resolution, Some(160));
    assert_eq!(input.objective, ObjectiveKind::Tinynas);
    assert_eq!(input.alpha, None);
    assert_eq!(input.beta, DEFAULT_BETA);

    let missing = v1::AnalyzeRequest::default();
    assert_eq!(
        analyze_input_from_proto(&missing).unwrap_err().field,
        "network"
    );
    let empty = v1::AnalyzeRequest {
        network: Some(v1::analyze_request::Network::ArchitectureJson(" ".into())),
        ..Default::default()
    };
    assert_eq!(
        analyze_input_from_proto(&empty).unwrap_err().field,
        "architecture_json"
    );
    let negative = v1::AnalyzeRequest {
        alpha: vec![1.0, -2.0],
        ..request
    };
    assert_eq!(
        analyze_input_from_proto(&negative).unwrap_err().field,
        "alpha"
    );
}

#[test]
fn the_descriptor_set_holds_every_service() {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(v1::FILE_DESCRIPTOR_SET).unwrap();
    let services: Vec<String> = set
        .file
        .iter()
        .flat_map(|file| file.service.iter().filter_map(|s| s.name.clone()))
        .collect();
    for name in [
        "DesignService",
        "SweepService",
        "WorkService",
        "ResultService",
    ] {
        assert!(services.iter().any(|s| s == name), "{name}: {services:?}");
    }
    assert!(set
        .file
        .iter()
        .any(|file| file.name() == "google/protobuf/timestamp.proto"));
}
