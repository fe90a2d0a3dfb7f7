use chrono::TimeZone;

use super::*;
use crate::model::{AttemptId, LeaseToken, SweepId, TrialId};

fn field_of(error: Error) -> String {
    match error {
        Error::InvalidArgument { field, .. } => field,
        other => panic!("expected an invalid argument, got {other:?}"),
    }
}

fn some_time() -> DateTime<Utc> {
    Utc.timestamp_opt(1_790_000_000, 123_456_000).unwrap()
}

fn final_metrics() -> FinalMetrics {
    FinalMetrics {
        top1: 0.91,
        top5: 0.99,
        test_loss: 0.3,
        train_seconds: 120.5,
        epochs: 2,
        dataset_hash: "ab".repeat(32),
        checkpoint: Some("/ckpt/final.safetensors".into()),
        epochs_metrics: vec![EpochMetrics {
            epoch: 1,
            train_loss: 1.0,
            test_loss: 0.9,
            top1: 0.5,
            top5: 0.8,
            images_per_second: 1000.0,
            learning_rate: 0.1,
        }],
    }
}

#[test]
fn ids_are_parsed_naming_the_field() {
    let id = SweepId::new();
    let parsed: SweepId = parse_id(&id.to_string(), "sweep_id").unwrap();
    assert_eq!(parsed, id);
    let error = parse_id::<TrialId>("not-a-uuid", "trial_id").unwrap_err();
    assert_eq!(field_of(error), "trial_id");
    let hash = "0f".repeat(32);
    assert_eq!(parse_design_id(&hash, "design_id").unwrap().0, hash);
    for bad in ["", "0F".repeat(32).as_str(), "abc"] {
        assert_eq!(
            field_of(parse_design_id(bad, "design_id").unwrap_err()),
            "design_id"
        );
    }
}

#[test]
fn timestamps_round_trip() {
    let time = some_time();
    let wire = timestamp(time);
    assert_eq!(wire.seconds, 1_790_000_000);
    assert_eq!(wire.nanos, 123_456_000);
    assert_eq!(datetime(&wire, "expires_at").unwrap(), time);
    let bad = Timestamp {
        seconds: 0,
        nanos: -1,
    };
    assert_eq!(
        field_of(datetime(&bad, "expires_at").unwrap_err()),
        "expires_at"
    );
}

#[test]
fn workers_report_only_their_own_failure_classes() {
    let deterministic = v1::FailureClass::Deterministic as i32;
    assert_eq!(
        reported_failure_class(deterministic, "failure_class").unwrap(),
        Reported::Failure(FailureClass::Deterministic)
    );
    let hand_back = v1::FailureClass::HandedBack as i32;
    assert_eq!(
        reported_failure_class(hand_back, "failure_class").unwrap(),
        Reported::HandBack
    );
    for bad in [0, v1::FailureClass::Lost as i32, 42] {
        assert_eq!(
            field_of(reported_failure_class(bad, "failure_class").unwrap_err()),
            "failure_class"
        );
    }
}

#[test]
fn register_requests_become_worker_records() {
    let id = WorkerId::new();
    let request = v1::RegisterRequest {
        protocol_version: 1,
        worker_id: id.to_string(),
        name: "gpu-node-3/0".into(),
        devices: vec![v1::Device {
            kind: "cuda".into(),
            index: 0,
            name: "NVIDIA H100".into(),
            memory_bytes: Some(80 << 30),
        }],
    };
    let worker = worker_from_proto(&request).unwrap();
    assert_eq!(worker.id, id);
    assert_eq!(worker.protocol_version, 1);
    let devices: Vec<DeviceRecord> = serde_json::from_str(&worker.devices_json).unwrap();
    assert_eq!(devices[0].name, "NVIDIA H100");
    assert_eq!(devices[0].memory_bytes, Some(80 << 30));

    let mut bad_device = request.clone();
    bad_device.devices.push(v1::Device {
        kind: "tpu".into(),
        ..Default::default()
    });
    assert_eq!(
        field_of(worker_from_proto(&bad_device).unwrap_err()),
        "devices[1].kind"
    );
    let no_id = v1::RegisterRequest {
        worker_id: String::new(),
        ..request.clone()
    };
    assert_eq!(
        field_of(worker_from_proto(&no_id).unwrap_err()),
        "worker_id"
    );
    let no_name = v1::RegisterRequest {
        name: " ".into(),
        ..request
    };
    assert_eq!(field_of(worker_from_proto(&no_name).unwrap_err()), "name");
}

#[test]
fn leases_become_assignments() {
    let lease = Lease {
        attempt: AttemptId::new(),
        token: LeaseToken::new(),
        trial: TrialId::new(),
        design_id: DesignId("ab".repeat(32)),
        architecture_json: "{}".into(),
        recipe_json: "{\"epochs\":1}".into(),
        dataset: "idx:data/mnist-subset".into(),
        seed: 7,
        expires_at: some_time(),
        task: "finetune".into(),
        parent: Some(TrialId::new()),
        upload_weights: false,
    };
    let wire = v1::Assignment::from(&lease);
    assert_eq!(wire.task, "finetune");
    assert_eq!(wire.parent_trial_id, lease.parent.map(|p| p.to_string()));
    assert!(!wire.upload_weights);
    assert_eq!(wire.attempt_id, lease.attempt.to_string());
    assert_eq!(wire.lease_token, lease.token.to_string());
    assert_eq!(
        parse_id::<TrialId>(&wire.trial_id, "trial_id").unwrap(),
        lease.trial
    );
    assert_eq!(wire.seed, 7);
    assert_eq!(
        datetime(&wire.expires_at.unwrap(), "expires_at").unwrap(),
        lease.expires_at
    );
}

#[test]
fn final_metrics_round_trip() {
    let metrics = final_metrics();
    let wire = v1::FinalMetrics::from(&metrics);
    assert_eq!(final_metrics_from_proto(Some(&wire)).unwrap(), metrics);
    assert_eq!(
        field_of(final_metrics_from_proto(None).unwrap_err()),
        "metrics"
    );
}

#[test]
fn non_finite_metrics_name_the_field() {
    let mut wire = v1::FinalMetrics::from(&final_metrics());
    wire.epoch_metrics[0].top1 = f64::NAN;
    let error = final_metrics_from_proto(Some(&wire)).unwrap_err();
    assert_eq!(field_of(error), "metrics.epoch_metrics[0].top1");
    let mut wire = v1::FinalMetrics::from(&final_metrics());
    wire.train_seconds = -1.0;
    assert_eq!(
        field_of(final_metrics_from_proto(Some(&wire)).unwrap_err()),
        "metrics.train_seconds"
    );
    let progress = v1::Progress {
        loss: Some(f64::INFINITY),
        ..Default::default()
    };
    assert_eq!(
        field_of(progress_from_proto(Some(&progress)).unwrap_err()),
        "progress.loss"
    );
    assert_eq!(progress_from_proto(None).unwrap(), Progress::default());
}

#[test]
fn outcomes_become_responses() {
    use v1::heartbeat_response::Directive;
    let cont = v1::HeartbeatResponse::from(&HeartbeatOutcome::Continue {
        expires_at: some_time(),
    });
    assert_eq!(cont.directive(), Directive::Continue);
    assert_eq!(cont.expires_at, Some(timestamp(some_time())));
    assert_eq!(
        v1::HeartbeatResponse::from(&HeartbeatOutcome::LeaseLost).directive(),
        Directive::StopLeaseLost
    );
    assert_eq!(
        v1::HeartbeatResponse::from(&HeartbeatOutcome::Cancelled).directive(),
        Directive::StopCancelled
    );

    let late = v1::CompleteResponse::from(CompleteOutcome::Late);
    assert_eq!(late.outcome(), v1::complete_response::Outcome::Late);

    use v1::fail_response::Outcome;
    let requeued = v1::FailResponse::from(&FailOutcome::Requeued {
        not_before: some_time(),
    });
    assert_eq!(requeued.outcome(), Outcome::Requeued);
    assert!(requeued.not_before.is_some());
    let stopped = v1::FailResponse::from(&FailOutcome::Stopped {
        state: TrialState::Dead,
    });
    assert_eq!(stopped.outcome(), Outcome::Stopped);
    assert_eq!(stopped.trial_state(), v1::TrialState::Dead);
    assert_eq!(
        v1::FailResponse::from(&FailOutcome::NotLeaseHolder).outcome(),
        Outcome::NotLeaseHolder
    );
}

#[test]
fn leaderboard_requests_become_filters() {
    let sweep = SweepId::new();
    let request = v1::LeaderboardRequest {
        sweep_id: Some(sweep.to_string()),
        dataset: Some(String::new()),
        family: v1::Family::MbconvSe.into(),
        min_params: Some(1_000),
        max_params: Some(2_000),
        limit: 0,
        max_flops: Some(3_000_000),
    };
    let filter = leaderboard_filter_from_proto(&request, 20, 500).unwrap();
    assert_eq!(filter.max_flops, Some(3_000_000));
    assert_eq!(filter.sweep, Some(sweep));
    assert_eq!(filter.dataset, None);
    assert_eq!(filter.family.as_deref(), Some("mbconv-se"));
    assert_eq!(
        (filter.min_params, filter.max_params, filter.limit),
        (Some(1_000), Some(2_000), 20)
    );

    let huge = v1::LeaderboardRequest {
        limit: 1_000_000,
        ..request.clone()
    };
    assert_eq!(
        leaderboard_filter_from_proto(&huge, 20, 500).unwrap().limit,
        500
    );
    let inverted = v1::LeaderboardRequest {
        min_params: Some(3_000),
        ..request.clone()
    };
    assert_eq!(
        field_of(leaderboard_filter_from_proto(&inverted, 20, 500).unwrap_err()),
        "min_params"
    );
    let bad_family = v1::LeaderboardRequest {
        family: 99,
        ..request.clone()
    };
    assert_eq!(
        field_of(leaderboard_filter_from_proto(&bad_family, 20, 500).unwrap_err()),
        "family"
    );
    let bad_sweep = v1::LeaderboardRequest {
        sweep_id: Some("x".into()),
        ..request
    };
    assert_eq!(
        field_of(leaderboard_filter_from_proto(&bad_sweep, 20, 500).unwrap_err()),
        "sweep_id"
    );
}

#[test]
fn summaries_and_histories_keep_every_field() {
    let summary = SweepSummary {
        id: SweepId::new(),
        name: "mnist".into(),
        state: SweepState::Active,
        created_by: "client:1a2b3c4d".into(),
        created_at: some_time(),
        dataset: "idx:data/mnist-subset".into(),
        grid_points: 6,
        infeasible_points: 1,
        distinct_designs: 4,
        counts: TrialCounts {
            queued: 3,
            running: 1,
            succeeded: 4,
            failed: 0,
            dead: 0,
        },
        best_top1: Some(0.97),
        best_design: Some(DesignId("cd".repeat(32))),
    };
    let wire = v1::SweepSummary::from(&summary);
    assert_eq!(wire.state(), v1::SweepState::Active);
    assert_eq!(wire.counts.unwrap().succeeded, 4);
    assert_eq!(
        wire.best_design_id.as_deref(),
        Some("cd".repeat(32).as_str())
    );

    let attempt = AttemptId::new();
    let history = TrialHistory {
        trial: TrialId::new(),
        design_id: DesignId("ef".repeat(32)),
        dataset: "idx:data/mnist-subset".into(),
        seed: 3,
        state: TrialState::Succeeded,
        attempts: vec![AttemptRecord {
            id: attempt,
            worker: WorkerId::new(),
            state: AttemptState::Expired,
            leased_at: some_time(),
            lease_expires_at: some_time(),
            finished_at: None,
            failure_class: Some(FailureClass::Lost),
            failure_message: None,
        }],
        epochs: final_metrics().epochs_metrics,
        result: Some(final_metrics()),
        late_results: vec![(attempt, final_metrics())],
    };
    let wire = v1::TrialHistoryResponse::from(&history);
    assert_eq!(wire.state(), v1::TrialState::Succeeded);
    assert_eq!(wire.attempts[0].failure_class(), v1::FailureClass::Lost);
    assert_eq!(wire.attempts[0].state(), v1::AttemptState::Expired);
    assert_eq!(wire.epochs.len(), 1);
    assert_eq!(wire.late_results[0].attempt_id, attempt.to_string());
    assert!(wire.result.is_some());
}

#[test]
fn infeasible_grid_points_keep_their_reason() {
    let point = NewGridPoint {
        index: 4,
        family: "bottleneck".into(),
        objective_kind: "paper".into(),
        rho: 0.3,
        alpha_json: "[1.0,1.0,8.0]".into(),
        beta: 10.0,
        params_budget: Some(1_000),
        flops_budget: None,
        resolution: 32,
        design_id: None,
        infeasible_reason: Some("the params budget 1.0K cannot be met".into()),
        solve_ms: 0.5,
    };
    let wire = infeasible_point(&point).unwrap();
    assert_eq!(wire.index, 4);
    assert_eq!(wire.family(), v1::Family::Bottleneck);
    assert_eq!(wire.alpha, vec![1.0, 1.0, 8.0]);
    assert_eq!((wire.params, wire.flops), (Some(1_000), None));
    let solved = NewGridPoint {
        infeasible_reason: None,
        design_id: Some(DesignId("ab".repeat(32))),
        ..point
    };
    assert_eq!(infeasible_point(&solved), None);
    let response = create_sweep_response(SweepId::new(), &SweepCreated::default(), vec![wire]);
    assert_eq!(response.infeasible.len(), 1);
}
