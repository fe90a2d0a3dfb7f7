//! The coordinator's gRPC API end to end: a real server on 127.0.0.1:0 over a real SQLite
//! store (and PostgreSQL in `store.rs`), driven by the generated clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use deepmad_coordinator::app;
use deepmad_coordinator::service::Coordinator;
use deepmad_coordinator::settings::{self, Overrides, Validated};
use deepmad_design::digest::sha256_hex;
use deepmad_proto::v1;
use deepmad_proto::v1::result_service_client::ResultServiceClient;
use deepmad_proto::v1::sweep_service_client::SweepServiceClient;
use deepmad_proto::v1::work_service_client::WorkServiceClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request};

const WORKER_TOKEN: &str = "worker-token-0123456789";
const CLIENT_TOKEN: &str = "client-token-0123456789";

struct Running {
    address: SocketAddr,
    coordinator: Arc<Coordinator>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(env: Vec<(String, String)>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        database_url: Some(format!(
            "sqlite://{}",
            dir.path().join("deepmad.db").display()
        )),
    };
    let settings: Validated = settings::load(None, env, &overrides).unwrap();
    let listener = TcpListener::bind(settings.listen).await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let coordinator = app::open(&settings, shutdown.clone()).await.unwrap();
    let serving = coordinator.clone();
    let token = shutdown.clone();
    tokio::spawn(async move {
        app::run(&settings, serving, listener, None, token)
            .await
            .unwrap()
    });
    Running {
        address,
        coordinator,
        shutdown,
        _dir: dir,
    }
}

async fn channel(address: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn spec(rho: Vec<f64>) -> v1::SweepSpec {
    v1::SweepSpec {
        name: "grpc test".into(),
        grid: Some(v1::Grid {
            families: vec![v1::Family::Basic as i32],
            rho,
            alpha: vec![],
            budgets: vec![v1::Budget {
                params: Some(20_000),
                flops: Some(4_000_000),
            }],
            resolution: Some(28),
            num_classes: Some(10),
            objective: v1::ObjectiveKind::Paper as i32,
            beta: None,
            max_layers: None,
            stage_strides: vec![],
            in_channels: Some(1),
        }),
        recipe_json: r#"{"epochs": 1, "warmup_epochs": 0}"#.into(),
        dataset: "idx:data/mnist-subset".into(),
        seeds: vec![0],
        downstream: vec![],
        max_attempts: 0,
    }
}

fn metrics(top1: f64) -> v1::FinalMetrics {
    v1::FinalMetrics {
        top1,
        top5: 0.99,
        test_loss: 0.3,
        train_seconds: 12.0,
        epochs: 1,
        dataset_hash: "abc".into(),
        checkpoint: None,
        epoch_metrics: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_runs_through_the_api() {
    let running = start(vec![]).await;
    let channel = channel(running.address).await;
    let mut sweeps = SweepServiceClient::new(channel.clone());
    let mut work = WorkServiceClient::new(channel.clone());
    let mut results = ResultServiceClient::new(channel);

    let created = sweeps
        .create_sweep(v1::CreateSweepRequest {
            spec: Some(spec(vec![0.3, 0.3, 1.0])),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.grid_points, 3);
    assert_eq!(
        created.new_trials as usize,
        created.distinct_designs as usize
    );
    assert!(
        created.distinct_designs <= 2,
        "two identical grid points share a design"
    );

    let worker_id = uuid::Uuid::new_v4().to_string();
    let register = v1::RegisterRequest {
        protocol_version: deepmad_proto::PROTOCOL_VERSION,
        worker_id: worker_id.clone(),
        name: "test".into(),
        devices: vec![],
    };
    work.register(register).await.unwrap();
    let mut done = 0;
    while let Some(assignment) = work
        .lease(v1::LeaseRequest {
            worker_id: worker_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .assignment
    {
        let heartbeat = v1::HeartbeatRequest {
            attempt_id: assignment.attempt_id.clone(),
            lease_token: assignment.lease_token.clone(),
            progress: Some(v1::Progress {
                epoch: 0,
                step: 3,
                loss: Some(1.0),
                top1: None,
                images_per_second: Some(10.0),
            }),
            epochs: vec![],
        };
        let directive = work
            .heartbeat(heartbeat)
            .await
            .unwrap()
            .into_inner()
            .directive;
        assert_eq!(
            directive,
            v1::heartbeat_response::Directive::Continue as i32
        );
        let complete = v1::CompleteRequest {
            attempt_id: assignment.attempt_id.clone(),
            lease_token: assignment.lease_token.clone(),
            metrics: Some(metrics(0.9 + 0.01 * f64::from(done))),
        };
        let outcome = work
            .complete(complete.clone())
            .await
            .unwrap()
            .into_inner()
            .outcome;
        assert_eq!(outcome, v1::complete_response::Outcome::Recorded as i32);
        let again = work.complete(complete).await.unwrap().into_inner().outcome;
        assert_eq!(again, v1::complete_response::Outcome::Duplicate as i32);
        done += 1;
    }
    assert_eq!(done, created.new_trials);

    let summary = sweeps
        .get_sweep(v1::GetSweepRequest {
            sweep_id: created.sweep_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.counts.unwrap().succeeded, done);
    let board = results
        .leaderboard(v1::LeaderboardRequest {
            sweep_id: Some(created.sweep_id.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(board.rows.len(), created.distinct_designs as usize);
    assert!(board
        .rows
        .windows(2)
        .all(|w| w[0].top1_mean >= w[1].top1_mean));
    let mut export = results
        .export_results(v1::ExportResultsRequest {
            sweep_id: created.sweep_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut rows = 0;
    while let Some(chunk) = export.message().await.unwrap() {
        rows += chunk.rows.len();
    }
    assert_eq!(rows, done as usize);

    let analytics = results
        .sweep_analytics(v1::SweepAnalyticsRequest {
            sweep_id: created.sweep_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(analytics.trials, done);
    assert_eq!(analytics.designs.len(), board.rows.len());
    assert!(analytics.designs.iter().any(|d| d.pareto_params));
    let grouped: u32 = analytics.by_rho.iter().map(|g| g.trials).sum();
    assert_eq!(grouped, done, "every result has its grid point's rho");
    let unknown = results
        .sweep_analytics(v1::SweepAnalyticsRequest {
            sweep_id: "00000000-0000-4000-8000-000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let malformed = results
        .sweep_analytics(v1::SweepAnalyticsRequest {
            sweep_id: "not-a-uuid".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument, "{malformed:?}");
}

fn downstream(task: &str, dataset: &str) -> v1::DownstreamTask {
    v1::DownstreamTask {
        name: String::new(),
        task: task.into(),
        dataset: dataset.into(),
        recipe_json: r#"{"epochs": 1, "warmup_epochs": 0}"#.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_store_nothing() {
    let running = start(vec![]).await;
    let mut sweeps = SweepServiceClient::new(channel(running.address).await);
    let cases: Vec<(v1::SweepSpec, Code, &str)> = vec![
        (spec(vec![]), Code::InvalidArgument, "grid.rho"),
        (spec(vec![0.3, f64::NAN]), Code::InvalidArgument, "rho"),
        (spec(vec![-1.0]), Code::InvalidArgument, "rho"),
        (spec(vec![0.3; 20_000]), Code::ResourceExhausted, "limit"),
        (
            v1::SweepSpec {
                dataset: "nowhere".into(),
                ..spec(vec![0.3])
            },
            Code::InvalidArgument,
            "dataset",
        ),
        (
            v1::SweepSpec {
                recipe_json: "{not json".into(),
                ..spec(vec![0.3])
            },
            Code::InvalidArgument,
            "recipe",
        ),
        (
            v1::SweepSpec {
                downstream: vec![downstream("knn", "idx:data/other")],
                ..spec(vec![0.3])
            },
            Code::InvalidArgument,
            "spec.downstream[0].task",
        ),
        (
            v1::SweepSpec {
                downstream: vec![downstream("finetune", "elsewhere")],
                ..spec(vec![0.3])
            },
            Code::InvalidArgument,
            "downstream[0].dataset",
        ),
        (
            v1::SweepSpec {
                downstream: vec![
                    downstream("finetune", "idx:a"),
                    downstream("finetune", "idx:b"),
                ],
                ..spec(vec![0.3])
            },
            Code::InvalidArgument,
            "downstream[1].name",
        ),
        (
            v1::SweepSpec {
                downstream: vec![v1::DownstreamTask {
                    recipe_json: "[1, 2]".into(),
                    ..downstream("linear-probe", "idx:a")
                }],
                ..spec(vec![0.3])
            },
            Code::InvalidArgument,
            "downstream[0].recipe",
        ),
    ];
    let cases = cases.into_iter().chain(issue_24_bad_sweeps());
    for (spec, code, needle) in cases {
        let status = sweeps
            .create_sweep(v1::CreateSweepRequest { spec: Some(spec) })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(
            status.message().contains(needle),
            "{needle}: {}",
            status.message()
        );
    }
    let mut impossible = spec(vec![0.3]);
    impossible.grid.as_mut().unwrap().budgets = vec![v1::Budget {
        params: Some(10),
        flops: None,
    }];
    let status = sweeps
        .create_sweep(v1::CreateSweepRequest {
            spec: Some(impossible),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("infeasible"),
        "{}",
        status.message()
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    let status = sweeps
        .get_sweep(v1::GetSweepRequest { sweep_id: unknown })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = sweeps
        .get_sweep(v1::GetSweepRequest {
            sweep_id: "not-an-id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let listed = sweeps
        .list_sweeps(v1::ListSweepsRequest { limit: 10 })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sweeps.is_empty(), "no partial sweep left behind");
}

/// Issue 24 (item 9): sweeps that every worker would refuse, or that the store cannot hold,
/// are refused at creation naming the field.
fn issue_24_bad_sweeps() -> Vec<(v1::SweepSpec, Code, &'static str)> {
    let with_recipe = |recipe: &str| v1::SweepSpec {
        recipe_json: recipe.into(),
        ..spec(vec![0.3])
    };
    let cases: Vec<(v1::SweepSpec, &'static str)> = vec![
        (
            with_recipe(r#"{"epochs": 0}"#),
            "recipe.epochs: must be between 1 and 10000, got 0",
        ),
        (with_recipe(r#"{"epochs": 4000000000}"#), "recipe.epochs"),
        (
            with_recipe(r#"{"epochs": 1, "warmup_epochs": 0, "batch_size": 4000000000}"#),
            "recipe.batch_size",
        ),
        (
            with_recipe(r#"{"epochs": 1, "colour": 3}"#),
            "recipe.colour",
        ),
        (with_recipe(r#"{"lr": "fast"}"#), "recipe.lr"),
        (
            v1::SweepSpec {
                downstream: vec![v1::DownstreamTask {
                    recipe_json: r#"{"lr": -1.0}"#.into(),
                    ..downstream("finetune", "idx:a")
                }],
                ..spec(vec![0.3])
            },
            "downstream[0].recipe.lr",
        ),
        (
            v1::SweepSpec {
                max_attempts: u32::MAX,
                ..spec(vec![0.3])
            },
            "max_attempts: must be between 1 and 100, got 4294967295",
        ),
        (
            v1::SweepSpec {
                name: "clear\u{1b}[2J".into(),
                ..spec(vec![0.3])
            },
            "invalid name",
        ),
    ];
    cases
        .into_iter()
        .map(|(spec, needle)| (spec, Code::InvalidArgument, needle))
        .collect()
}

/// Registers a fresh worker incarnation and returns its id.
async fn register(work: &mut WorkServiceClient<Channel>) -> String {
    let worker_id = uuid::Uuid::new_v4().to_string();
    work.register(v1::RegisterRequest {
        protocol_version: deepmad_proto::PROTOCOL_VERSION,
        worker_id: worker_id.clone(),
        name: "w".into(),
        devices: vec![],
    })
    .await
    .unwrap();
    worker_id
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_separate_workers_from_clients() {
    let env = vec![
        (
            "DEEPMAD__AUTH__WORKER_TOKENS".to_string(),
            WORKER_TOKEN.to_string(),
        ),
        (
            "DEEPMAD__AUTH__CLIENT_TOKENS".to_string(),
            CLIENT_TOKEN.to_string(),
        ),
    ];
    let running = start(env).await;
    let channel = channel(running.address).await;
    let mut sweeps = SweepServiceClient::new(channel.clone());
    let mut work = WorkServiceClient::new(channel);
    let create = || v1::CreateSweepRequest {
        spec: Some(spec(vec![0.5])),
    };
    let status = sweeps.create_sweep(create()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = sweeps
        .create_sweep(with_token(create(), WORKER_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    sweeps
        .create_sweep(with_token(create(), CLIENT_TOKEN))
        .await
        .unwrap();
    let lease = || v1::LeaseRequest {
        worker_id: uuid::Uuid::new_v4().to_string(),
    };
    let status = work
        .lease(with_token(lease(), CLIENT_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = work
        .lease(with_token(lease(), "wrong-token-0123456789"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_sweep_stops_its_workers_at_the_next_heartbeat() {
    let running = start(vec![]).await;
    let channel = channel(running.address).await;
    let mut sweeps = SweepServiceClient::new(channel.clone());
    let mut work = WorkServiceClient::new(channel);
    let created = sweeps
        .create_sweep(v1::CreateSweepRequest {
            spec: Some(spec(vec![0.5])),
        })
        .await
        .unwrap()
        .into_inner();
    let worker_id = register(&mut work).await;
    let assignment = work
        .lease(v1::LeaseRequest { worker_id })
        .await
        .unwrap()
        .into_inner()
        .assignment
        .unwrap();
    sweeps
        .cancel_sweep(v1::CancelSweepRequest {
            sweep_id: created.sweep_id,
        })
        .await
        .unwrap();
    let heartbeat = v1::HeartbeatRequest {
        attempt_id: assignment.attempt_id,
        lease_token: assignment.lease_token,
        progress: None,
        epochs: vec![],
    };
    let directive = work
        .heartbeat(heartbeat)
        .await
        .unwrap()
        .into_inner()
        .directive;
    assert_eq!(
        directive,
        v1::heartbeat_response::Directive::StopCancelled as i32
    );
}

/// Lease expiry in real time with a one-second lease (the store's own tests cover expiry with
/// explicit times; paused tokio time would also fire the connection pool's timeouts): the
/// reaper requeues the trial, the old token is fenced out and its late report is kept, not
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leases_are_reaped_and_fenced() {
    use deepmad_coordinator::model::WorkerId;
    use deepmad_coordinator::store::{
        CompleteOutcome, FinalMetrics, HeartbeatOutcome, NewWorker, Progress,
    };
    let short = [
        ("DEEPMAD__LEASE__LEASE_MS", "1000"),
        ("DEEPMAD__LEASE__HEARTBEAT_INTERVAL_MS", "100"),
        ("DEEPMAD__LEASE__GRACE_MS", "1000"),
        ("DEEPMAD__LEASE__REAPER_INTERVAL_MS", "1000"),
        ("DEEPMAD__RETRY__BACKOFF_BASE_MS", "10"),
        ("DEEPMAD__RETRY__BACKOFF_MAX_MS", "20"),
    ];
    let running = start(
        short
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
    .await;
    let coordinator = &running.coordinator;
    let spec = deepmad_coordinator::sweep::SweepSpec::from_toml(
        "name = \"t\"\ndataset = \"idx:d\"\nseeds = [0]\n[grid]\nblock = [\"basic\"]\nrho = [0.5]\nbudget = [{ params = \"20K\" }]\nresolution = 28\nnum_classes = 10\n[recipe]\n",
    )
    .unwrap();
    coordinator.create_sweep(spec, "test").await.unwrap();
    let (first, second) = (WorkerId::new(), WorkerId::new());
    for id in [first, second] {
        let worker = NewWorker {
            id,
            name: "w".into(),
            devices_json: "[]".into(),
            protocol_version: deepmad_proto::PROTOCOL_VERSION as i32,
        };
        coordinator.register(worker).await.unwrap();
    }
    let lease = coordinator.lease(first).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(
        coordinator.config.lease_ms as u64 + 50,
    ))
    .await;
    // The background reaper may have run first; either way the lease is gone.
    coordinator.reap().await.unwrap();
    let outcome = coordinator
        .heartbeat(lease.attempt, lease.token, &Progress::default(), &[])
        .await
        .unwrap();
    assert_eq!(outcome, HeartbeatOutcome::LeaseLost);
    tokio::time::sleep(Duration::from_millis(
        coordinator.config.retry.backoff_max_ms as u64 + 30,
    ))
    .await;
    let again = coordinator
        .lease(second)
        .await
        .unwrap()
        .expect("the reaped trial is leased again");
    assert_eq!(again.trial, lease.trial);
    let metrics = FinalMetrics {
        top1: 0.5,
        top5: 0.9,
        test_loss: 1.0,
        train_seconds: 1.0,
        epochs: 1,
        dataset_hash: "h".into(),
        checkpoint: None,
        epochs_metrics: vec![],
    };
    assert_eq!(
        coordinator
            .complete(lease.attempt, lease.token, &metrics)
            .await
            .unwrap(),
        CompleteOutcome::Late
    );
    assert_eq!(
        coordinator
            .complete(again.attempt, again.token, &metrics)
            .await
            .unwrap(),
        CompleteOutcome::Recorded
    );
    let history = coordinator.trial_history(lease.trial).await.unwrap();
    assert_eq!(history.late_results.len(), 1);
    assert!(history.result.is_some());
}

/// The lease lifecycle over the API with the coordinator's clock moved by hand: a heartbeat
/// extends the lease, expiry and reaping fence the attempt out, the requeue waits out its
/// backoff, the late result is kept apart, completion is idempotent; deterministic failures
/// use up the retry limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_lifecycle_follows_the_coordinators_clock() {
    use v1::complete_response::Outcome;
    use v1::heartbeat_response::Directive;
    let env = [
        ("DEEPMAD__LEASE__LEASE_MS", "2000"),
        ("DEEPMAD__LEASE__HEARTBEAT_INTERVAL_MS", "500"),
        ("DEEPMAD__LEASE__REAPER_INTERVAL_MS", "1000"),
        ("DEEPMAD__RETRY__BACKOFF_BASE_MS", "60000"),
        ("DEEPMAD__RETRY__BACKOFF_MAX_MS", "60000"),
    ];
    let running = start(
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
    .await;
    let clock = running.coordinator.clock.clone();
    let second = Duration::from_secs(1);
    let channel = channel(running.address).await;
    let mut sweeps = SweepServiceClient::new(channel.clone());
    let mut work = WorkServiceClient::new(channel.clone());
    let mut results = ResultServiceClient::new(channel);
    let created = sweeps
        .create_sweep(v1::CreateSweepRequest {
            spec: Some(v1::SweepSpec {
                max_attempts: 2,
                ..spec(vec![0.5])
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.new_trials, 1);
    let worker_id = register(&mut work).await;
    let lease = |work: &mut WorkServiceClient<Channel>| {
        let request = v1::LeaseRequest {
            worker_id: worker_id.clone(),
        };
        let mut work = work.clone();
        async move { work.lease(request).await.unwrap().into_inner() }
    };
    let heartbeat = |assignment: &v1::Assignment| v1::HeartbeatRequest {
        attempt_id: assignment.attempt_id.clone(),
        lease_token: assignment.lease_token.clone(),
        progress: None,
        epochs: vec![],
    };
    let first = lease(&mut work).await.assignment.expect("one trial queued");

    // Heartbeats at 1.5 s and 3 s keep a 2 s lease alive past its first expiry.
    for _ in 0..2 {
        clock.advance(second * 3 / 2);
        assert_eq!(running.coordinator.reap().await.unwrap(), 0);
        let directive = work
            .heartbeat(heartbeat(&first))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(directive.directive, Directive::Continue as i32);
    }
    // Silence past the lease: reaped once, and the holder is told it lost the lease.
    clock.advance(second * 5 / 2);
    let reaped = running.coordinator.reap().await.unwrap();
    // The background reaper may have run after the advance; either way, exactly once.
    let history_attempts = |results: &mut ResultServiceClient<Channel>| {
        let mut results = results.clone();
        let trial_id = first.trial_id.clone();
        async move {
            results
                .trial_history(v1::TrialHistoryRequest { trial_id })
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert!(reaped <= 1);
    assert_eq!(history_attempts(&mut results).await.attempts.len(), 1);
    let directive = work
        .heartbeat(heartbeat(&first))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(directive.directive, Directive::StopLeaseLost as i32);
    // The requeue waits out its backoff.
    let empty = lease(&mut work).await;
    assert!(empty.assignment.is_none(), "leased during the backoff");
    assert!(empty.retry_after_ms > 0);
    clock.advance(second * 61);
    let second_attempt = lease(&mut work).await.assignment.expect("requeued");
    assert_eq!(second_attempt.trial_id, first.trial_id);
    assert_ne!(second_attempt.lease_token, first.lease_token);

    // The fenced-out attempt's result is kept as late; the holder's is recorded, once.
    let complete = |assignment: &v1::Assignment, top1: f64| v1::CompleteRequest {
        attempt_id: assignment.attempt_id.clone(),
        lease_token: assignment.lease_token.clone(),
        metrics: Some(metrics(top1)),
    };
    let outcome = |response: v1::CompleteResponse| response.outcome;
    let late = work.complete(complete(&first, 0.1)).await.unwrap();
    assert_eq!(outcome(late.into_inner()), Outcome::Late as i32);
    let recorded = work.complete(complete(&second_attempt, 0.8)).await.unwrap();
    assert_eq!(outcome(recorded.into_inner()), Outcome::Recorded as i32);
    let again = work.complete(complete(&second_attempt, 0.8)).await.unwrap();
    assert_eq!(outcome(again.into_inner()), Outcome::Duplicate as i32);
    let board = results
        .leaderboard(v1::LeaderboardRequest {
            sweep_id: Some(created.sweep_id.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(board.rows.len(), 1);
    assert_eq!(board.rows[0].seeds, 1);
    assert!(
        (board.rows[0].top1_mean - 0.8).abs() < 1e-12,
        "the late 0.1 is not counted"
    );
    let history = history_attempts(&mut results).await;
    assert_eq!(history.attempts.len(), 2);
    assert_eq!(history.late_results.len(), 1);
    assert_eq!(history.result.unwrap().top1, 0.8);

    // Deterministic failures count: with max_attempts 2 the second one makes the trial
    // `failed` (a lost worker, as above, would not have counted), and retry requeues it.
    let other = sweeps
        .create_sweep(v1::CreateSweepRequest {
            spec: Some(v1::SweepSpec {
                max_attempts: 2,
                seeds: vec![1],
                ..spec(vec![0.5])
            }),
        })
        .await
        .unwrap()
        .into_inner();
    for attempt in 0..2 {
        let assignment = lease(&mut work).await.assignment.expect("queued");
        let failed = work
            .fail(v1::FailRequest {
                attempt_id: assignment.attempt_id,
                lease_token: assignment.lease_token,
                failure_class: v1::FailureClass::Deterministic as i32,
                message: "bad data".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let expected = if attempt == 0 {
            v1::fail_response::Outcome::Requeued
        } else {
            v1::fail_response::Outcome::Stopped
        };
        assert_eq!(failed.outcome, expected as i32, "attempt {attempt}");
        clock.advance(second * 61);
    }
    let counts = sweeps
        .get_sweep(v1::GetSweepRequest {
            sweep_id: other.sweep_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .counts
        .unwrap();
    assert_eq!((counts.failed, counts.dead), (1, 0), "{counts:?}");
    let requeued = sweeps
        .retry_trials(v1::RetryTrialsRequest {
            sweep_id: other.sweep_id,
        })
        .await
        .unwrap()
        .into_inner()
        .requeued;
    assert_eq!(requeued, 1);
    assert!(lease(&mut work).await.assignment.is_some());
}

fn chunks(assignment: &v1::Assignment, data: &[u8], sha256: &str) -> Vec<v1::WeightsChunk> {
    data.chunks(5)
        .enumerate()
        .map(|(index, piece)| v1::WeightsChunk {
            attempt_id: if index == 0 {
                assignment.attempt_id.clone()
            } else {
                String::new()
            },
            lease_token: if index == 0 {
                assignment.lease_token.clone()
            } else {
                String::new()
            },
            total_bytes: if index == 0 { data.len() as u64 } else { 0 },
            sha256: if index == 0 {
                sha256.to_string()
            } else {
                String::new()
            },
            data: piece.to_vec(),
        })
        .collect()
}

async fn lease_one(work: &mut WorkServiceClient<Channel>, worker_id: &str) -> v1::Assignment {
    work.lease(v1::LeaseRequest {
        worker_id: worker_id.to_string(),
    })
    .await
    .unwrap()
    .into_inner()
    .assignment
    .expect("a trial is queued")
}

#[tokio::test]
async fn trained_weights_travel_to_downstream_trials_under_their_leases() {
    let weights_dir = tempfile::tempdir().unwrap();
    let running = start(vec![(
        "DEEPMAD__STORAGE__WEIGHTS_DIR".into(),
        weights_dir.path().display().to_string(),
    )])
    .await;
    let channel = channel(running.address).await;
    let mut sweeps = SweepServiceClient::new(channel.clone());
    let mut work = WorkServiceClient::new(channel);
    let created = sweeps
        .create_sweep(v1::CreateSweepRequest {
            spec: Some(v1::SweepSpec {
                downstream: vec![downstream("finetune", "idx:data/other")],
                ..spec(vec![0.3])
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.new_trials, 1);
    let worker_id = register(&mut work).await;
    let training = lease_one(&mut work, &worker_id).await;
    assert_eq!(
        (training.task.as_str(), training.upload_weights),
        ("train", true)
    );

    let data = b"a safetensors checkpoint, in spirit".to_vec();
    let sha = sha256_hex(&data);
    // A wrong token, a wrong hash and a short upload are refused and leave no file.
    let mut forged = chunks(&training, &data, &sha);
    forged[0].lease_token = uuid::Uuid::new_v4().to_string();
    let status = work
        .upload_weights(tokio_stream::iter(forged))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let wrong_hash = chunks(&training, &data, &sha256_hex(b"other"));
    let status = work
        .upload_weights(tokio_stream::iter(wrong_hash))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("SHA-256"), "{status:?}");
    let mut short = chunks(&training, &data, &sha);
    short.pop();
    let status = work
        .upload_weights(tokio_stream::iter(short))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Issue 24, item 1c: more than the design's parameters can fill is refused up front.
    let mut oversized = chunks(&training, &data, &sha);
    oversized[0].total_bytes = 1 << 30;
    let status = work
        .upload_weights(tokio_stream::iter(oversized))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("total_bytes"), "{status:?}");
    assert_eq!(std::fs::read_dir(weights_dir.path()).unwrap().count(), 0);
    // A training attempt has no weights to fetch.
    let status = work
        .fetch_weights(v1::FetchWeightsRequest {
            attempt_id: training.attempt_id.clone(),
            lease_token: training.lease_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let uploaded = work
        .upload_weights(tokio_stream::iter(chunks(&training, &data, &sha)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(uploaded.bytes, data.len() as u64);
    work.complete(v1::CompleteRequest {
        attempt_id: training.attempt_id.clone(),
        lease_token: training.lease_token.clone(),
        metrics: Some(metrics(0.9)),
    })
    .await
    .unwrap();

    // The fine-tune is queued by the completion; its lease fetches exactly those bytes.
    let finetune = lease_one(&mut work, &worker_id).await;
    assert_eq!(finetune.task, "finetune");
    assert_eq!(
        finetune.parent_trial_id.as_deref(),
        Some(training.trial_id.as_str())
    );
    assert_eq!(finetune.dataset, "idx:data/other");
    let mut stream = work
        .fetch_weights(v1::FetchWeightsRequest {
            attempt_id: finetune.attempt_id.clone(),
            lease_token: finetune.lease_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a chunk");
    assert_eq!(
        (first.total_bytes, first.sha256.as_str()),
        (data.len() as u64, sha.as_str())
    );
    let mut fetched = first.data;
    while let Some(chunk) = stream.message().await.unwrap() {
        fetched.extend(chunk.data);
    }
    assert_eq!(fetched, data);
    // Without the lease, nothing.
    let status = work
        .fetch_weights(v1::FetchWeightsRequest {
            attempt_id: finetune.attempt_id.clone(),
            lease_token: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    // Lost weights are NotFound, naming the trial.
    let file = std::fs::read_dir(weights_dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    std::fs::remove_file(file.path()).unwrap();
    let status = work
        .fetch_weights(v1::FetchWeightsRequest {
            attempt_id: finetune.attempt_id.clone(),
            lease_token: finetune.lease_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains(&training.trial_id), "{status:?}");
}

fn epoch(epoch: u32, top1: f64) -> v1::EpochMetrics {
    v1::EpochMetrics {
        epoch,
        train_loss: 0.5,
        test_loss: 0.4,
        top1,
        top5: 0.99,
        images_per_second: 10.0,
        learning_rate: 0.1,
    }
}

/// Issue 24 (item 1b): a report with a metric out of its range, or with more epochs than the
/// trial's recipe runs (1 here), is refused naming the field and stores nothing; a good
/// report is still recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_reports_are_refused_and_store_nothing() {
    let running = start(vec![]).await;
    let channel = channel(running.address).await;
    let mut sweeps = SweepServiceClient::new(channel.clone());
    let mut work = WorkServiceClient::new(channel);
    let request = v1::CreateSweepRequest {
        spec: Some(spec(vec![0.3])),
    };
    sweeps.create_sweep(request).await.unwrap();
    let worker_id = register(&mut work).await;
    let assignment = lease_one(&mut work, &worker_id).await;
    let completion = |metrics: v1::FinalMetrics| v1::CompleteRequest {
        attempt_id: assignment.attempt_id.clone(),
        lease_token: assignment.lease_token.clone(),
        metrics: Some(metrics),
    };
    let bad_completions = [
        (
            v1::FinalMetrics {
                top1: 1e300,
                top5: -5.0,
                ..metrics(0.9)
            },
            "metrics.top1",
        ),
        (
            v1::FinalMetrics {
                top5: 0.5,
                ..metrics(0.9)
            },
            "metrics.top5",
        ),
        (
            v1::FinalMetrics {
                test_loss: -0.1,
                ..metrics(0.9)
            },
            "metrics.test_loss",
        ),
        (
            v1::FinalMetrics {
                train_seconds: f64::INFINITY,
                ..metrics(0.9)
            },
            "metrics.train_seconds",
        ),
        (
            v1::FinalMetrics {
                epochs: 2,
                ..metrics(0.9)
            },
            "metrics.epochs",
        ),
        (
            v1::FinalMetrics {
                epoch_metrics: vec![epoch(1, 1.5)],
                ..metrics(0.9)
            },
            "metrics.epoch_metrics[0].top1",
        ),
        (
            v1::FinalMetrics {
                epoch_metrics: vec![epoch(3, 0.9)],
                ..metrics(0.9)
            },
            "metrics.epoch_metrics[0].epoch",
        ),
    ];
    for (bad, field) in bad_completions {
        let status = work.complete(completion(bad)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    let progress = v1::Progress {
        epoch: 1,
        step: 3,
        loss: Some(1.0),
        top1: None,
        images_per_second: Some(10.0),
    };
    let bad_heartbeats = [
        (
            v1::Progress {
                loss: Some(-1.0),
                ..progress
            },
            vec![],
            "progress.loss",
        ),
        (
            v1::Progress {
                top1: Some(2.0),
                ..progress
            },
            vec![],
            "progress.top1",
        ),
        (
            v1::Progress {
                images_per_second: Some(f64::NAN),
                ..progress
            },
            vec![],
            "progress.images_per_second",
        ),
        (
            v1::Progress {
                epoch: 5,
                ..progress
            },
            vec![],
            "progress.epoch",
        ),
        (
            progress,
            vec![v1::EpochMetrics {
                learning_rate: -0.1,
                ..epoch(1, 0.9)
            }],
            "epochs[0].learning_rate",
        ),
        (progress, vec![epoch(2, 0.9)], "epochs[0].epoch"),
    ];
    for (progress, epochs, field) in bad_heartbeats {
        let heartbeat = v1::HeartbeatRequest {
            attempt_id: assignment.attempt_id.clone(),
            lease_token: assignment.lease_token.clone(),
            progress: Some(progress),
            epochs,
        };
        let status = work.heartbeat(heartbeat).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    let trial = deepmad_coordinator::convert::parse_id(&assignment.trial_id, "trial").unwrap();
    let history = running.coordinator.trial_history(trial).await.unwrap();
    assert!(
        history.result.is_none() && history.epochs.is_empty(),
        "{history:?}"
    );
    assert!(history.late_results.is_empty(), "{history:?}");

    let good = v1::FinalMetrics {
        epoch_metrics: vec![epoch(1, 0.9)],
        ..metrics(0.9)
    };
    let outcome = work
        .complete(completion(good))
        .await
        .unwrap()
        .into_inner()
        .outcome;
    assert_eq!(outcome, v1::complete_response::Outcome::Recorded as i32);
    let history = running.coordinator.trial_history(trial).await.unwrap();
    assert_eq!(history.result.map(|result| result.top1), Some(0.9));
}

/// Issue 24, item 3: a WatchSweep stream that the client drops ends its poller at once; before,
/// it polled the database until the sweep finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_stream_stops_polling() {
    let running = start(vec![]).await;
    let mut sweeps = SweepServiceClient::new(channel(running.address).await);
    let created = sweeps
        .create_sweep(v1::CreateSweepRequest {
            spec: Some(spec(vec![0.3])),
        })
        .await
        .unwrap()
        .into_inner();
    let metrics = running.coordinator.metrics.clone();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = sweeps
            .watch_sweep(v1::WatchSweepRequest {
                sweep_id: created.sweep_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        // The sweep's trial stays queued (no worker), so the pollers would run on.
        assert!(stream.message().await.unwrap().is_some());
        streams.push(stream);
    }
    assert_eq!(metrics.watch_streams(), 3);
    drop(streams);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metrics.watch_streams() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} pollers still running after their clients left",
            metrics.watch_streams()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 24, item 2: a CreateSweep whose client gives up stops solving (a 200-point
/// ImageNet-size sweep kept both cores busy for 25 s after its client left) and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_create_sweep_stops_solving() {
    let running = start(vec![]).await;
    let mut sweeps = SweepServiceClient::new(channel(running.address).await);
    let mut large = spec((0..200).map(|i| 0.1 + 0.01 * f64::from(i)).collect());
    let grid = large.grid.as_mut().unwrap();
    grid.budgets = vec![v1::Budget {
        params: Some(11_700_000),
        flops: Some(1_800_000_000),
    }];
    (grid.resolution, grid.num_classes, grid.in_channels) = (Some(224), Some(1000), Some(3));
    let request = sweeps.create_sweep(v1::CreateSweepRequest { spec: Some(large) });
    let gave_up = tokio::time::timeout(Duration::from_millis(1500), request).await;
    assert!(
        gave_up.is_err(),
        "200 ImageNet-size points take longer than 1.5 s"
    );
    let metrics = running.coordinator.metrics.clone();
    // Solves that had started finish (each well under a second); then nothing more runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let solved = metrics.grid_points_solved();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(metrics.grid_points_solved(), solved, "still solving");
    assert!(solved < 200, "stopped early: {solved} of 200 solved");
    let listed = sweeps
        .list_sweeps(v1::ListSweepsRequest { limit: 10 })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sweeps.is_empty(), "nothing stored");
}

/// Issue 24, item 1a: one worker id leased every trial of a sweep at once and let the leases
/// expire until all were dead. A worker now holds at most `limits.leases_per_worker` (1)
/// leases: a second lease call gets no work while trials are queued, another worker gets one,
/// and the first gets its next once it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_holds_one_lease_at_a_time() {
    let running = start(vec![]).await;
    let channel = channel(running.address).await;
    let mut sweeps = SweepServiceClient::new(channel.clone());
    let mut work = WorkServiceClient::new(channel);
    let mut three = spec(vec![0.2, 0.5, 1.0]);
    three.seeds = vec![0, 1, 2];
    sweeps
        .create_sweep(v1::CreateSweepRequest { spec: Some(three) })
        .await
        .unwrap();
    let greedy = register(&mut work).await;
    let first = lease_one(&mut work, &greedy).await;
    let again = work
        .lease(v1::LeaseRequest {
            worker_id: greedy.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.assignment.is_none(), "a second lease for one worker");
    assert!(again.retry_after_ms > 0);
    let other = register(&mut work).await;
    lease_one(&mut work, &other).await;
    let outcome = work
        .complete(v1::CompleteRequest {
            attempt_id: first.attempt_id,
            lease_token: first.lease_token,
            metrics: Some(metrics(0.9)),
        })
        .await
        .unwrap()
        .into_inner()
        .outcome;
    assert_eq!(outcome, v1::complete_response::Outcome::Recorded as i32);
    lease_one(&mut work, &greedy).await;
}

/// Issue 24, item 1c: a training lease in a sweep without downstream tasks has nobody to read
/// its weights, so it may not upload any (any lease could store 4 GiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_nobody_reads_are_refused() {
    let weights_dir = tempfile::tempdir().unwrap();
    let running = start(vec![(
        "DEEPMAD__STORAGE__WEIGHTS_DIR".into(),
        weights_dir.path().display().to_string(),
    )])
    .await;
    let channel = channel(running.address).await;
    let mut sweeps = SweepServiceClient::new(channel.clone());
    let mut work = WorkServiceClient::new(channel);
    sweeps
        .create_sweep(v1::CreateSweepRequest {
            spec: Some(spec(vec![0.3])),
        })
        .await
        .unwrap();
    let worker_id = register(&mut work).await;
    let training = lease_one(&mut work, &worker_id).await;
    assert!(!training.upload_weights);
    let data = b"weights nobody asked for".to_vec();
    let status = work
        .upload_weights(tokio_stream::iter(chunks(
            &training,
            &data,
            &sha256_hex(&data),
        )))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("downstream"), "{status:?}");
    assert_eq!(std::fs::read_dir(weights_dir.path()).unwrap().count(), 0);
}
