//! The store's conformance suite: each test is an async function over `&Store`, run once on
//! PostgreSQL (a fresh database per test, on the server at `DEEPMAD_TEST_POSTGRES_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`) and once on SQLite (a fresh file
//! per test). Times are explicit `now` values: nothing sleeps.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, TimeZone, Utc};
use deepmad_coordinator::model::{
    AttemptId, AttemptState, DesignId, FailureClass, LeaseToken, SweepId, SweepState, TrialState,
    WorkerId,
};
use deepmad_coordinator::store::{
    CompleteOutcome, EpochMetrics, FailOutcome, FinalMetrics, HeartbeatOutcome, LeaderboardFilter,
    Lease, NewDesign, NewGridPoint, NewSweep, NewTask, NewWorker, PoolSettings, Progress,
    RetryPolicy, Store, StoreError,
};
use sqlx::Connection;
use uuid::Uuid;

/// Declares each conformance test once per backend.
macro_rules! conformance {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::TestDb::postgres().await;
                    let store = db.store.clone();
                    let outcome = tokio::spawn(async move { super::$name(&store).await }).await;
                    db.remove().await;
                    if let Err(error) = outcome {
                        std::panic::resume_unwind(error.into_panic());
                    }
                }
            )+
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::TestDb::sqlite().await;
                    let store = db.store.clone();
                    let outcome = tokio::spawn(async move { super::$name(&store).await }).await;
                    db.remove().await;
                    if let Err(error) = outcome {
                        std::panic::resume_unwind(error.into_panic());
                    }
                }
            )+
        }
    };
}

conformance!(
    creating_a_sweep_dedups_designs_and_trials,
    a_later_sweep_reuses_results_and_shares_trials,
    a_failing_create_writes_nothing,
    a_lease_runs_from_claim_to_complete,
    expired_leases_are_reaped_and_requeued_after_backoff,
    fenced_out_attempts_are_kept_late_and_not_counted,
    deterministic_failures_count_and_others_do_not,
    hand_backs_requeue_at_once_and_never_end_a_trial,
    retry_trials_requeues_failed_and_dead_trials,
    cancelling_a_sweep_stops_its_attempts,
    a_sweep_is_found_by_its_spec_unless_cancelled,
    grace_extends_running_leases,
    two_reapers_requeue_each_trial_once,
    leaderboard_aggregates_over_seeds_and_filters,
    export_lists_each_result_of_a_sweep,
    unknown_ids_are_not_found,
    concurrent_workers_never_share_a_trial,
    a_burst_of_claims_shares_out_the_queue,
    a_burst_of_completions_records_each_once,
    downstream_trials_follow_their_training_trials,
    a_stored_design_is_read_back_by_id,
);

/// A database that exists for one test.
struct TestDb {
    store: Store,
    cleanup: Cleanup,
    /// The database's URL (PostgreSQL only), for tests that hold locks from another session.
    url: Option<String>,
}

enum Cleanup {
    Postgres { admin_url: String, name: String },
    Sqlite { path: std::path::PathBuf },
}

impl TestDb {
    async fn postgres() -> TestDb {
        let admin_url = std::env::var("DEEPMAD_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let name = format!("deepmad_test_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "PostgreSQL is not reachable at {admin_url} ({error}); start it with \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
                )
            });
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("the test role may create databases");
        admin.close().await.expect("closing the admin connection");
        let (server, _) = admin_url
            .rsplit_once('/')
            .expect("the url names a database");
        let url = format!("{server}/{name}");
        let store = Store::connect_with(&url, &test_pool())
            .await
            .expect("connecting to the fresh database and migrating it");
        TestDb {
            url: Some(url),
            store,
            cleanup: Cleanup::Postgres { admin_url, name },
        }
    }

    async fn sqlite() -> TestDb {
        let path = std::env::temp_dir().join(format!("deepmad-test-{}.db", Uuid::new_v4()));
        let store = Store::connect_with(&format!("sqlite://{}", path.display()), &test_pool())
            .await
            .expect("creating the SQLite file and migrating it");
        TestDb {
            store,
            url: None,
            cleanup: Cleanup::Sqlite { path },
        }
    }

    async fn remove(self) {
        self.store.close().await;
        match self.cleanup {
            Cleanup::Postgres { admin_url, name } => {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
                sqlx::raw_sql(&format!("DROP DATABASE {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .expect("dropping the test database");
            }
            Cleanup::Sqlite { path } => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
            }
        }
    }
}

fn test_pool() -> PoolSettings {
    PoolSettings {
        max_connections: 8,
        ..PoolSettings::default()
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures.

const LEASE_MS: i64 = 10_000;
const POLICY: RetryPolicy = RetryPolicy {
    backoff_base_ms: 1_000,
    backoff_max_ms: 60_000,
    max_requeues: 2,
};

/// Returns the test clock: 2024-05-01T12:00:00Z plus `seconds`.
fn at(seconds: f64) -> DateTime<Utc> {
    let start = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap();
    start + Duration::microseconds((seconds * 1e6).round() as i64)
}

fn design(tag: &str, family: &str, params: i64) -> NewDesign {
    NewDesign {
        id: DesignId(format!("{tag:0>64}")),
        family: family.to_string(),
        objective_kind: "paper".to_string(),
        architecture_json: format!(r#"{{"name":"{tag}","stages":[1,2]}}"#),
        params,
        flops: params * 10,
        layers: 8,
        effectiveness: 0.4,
        entropy: 12.5,
        penalty: 0.0,
        objective: 12.5,
        resolution: 32,
        num_classes: 10,
        solver_version: "test".to_string(),
    }
}

fn point(index: i32, rho: f64, design: Option<&NewDesign>) -> NewGridPoint {
    NewGridPoint {
        index,
        family: design.map_or("basic".to_string(), |d| d.family.clone()),
        objective_kind: "paper".to_string(),
        rho,
        alpha_json: "[1,1,1,8]".to_string(),
        beta: 10.0,
        params_budget: Some(1_000_000),
        flops_budget: None,
        resolution: 32,
        design_id: design.map(|d| d.id.clone()),
        infeasible_reason: design.is_none().then(|| "budget too small".to_string()),
        solve_ms: 1.5,
    }
}

/// A sweep with one grid point per (rho, design) pair, and the given seeds.
fn sweep(points: &[(f64, Option<&NewDesign>)], seeds: &[i64]) -> NewSweep {
    let mut designs: Vec<NewDesign> = Vec::new();
    for design in points.iter().filter_map(|(_, design)| *design) {
        if !designs.iter().any(|known| known.id == design.id) {
            designs.push(design.clone());
        }
    }
    NewSweep {
        id: SweepId::new(),
        name: "test sweep".to_string(),
        created_by: "tester".to_string(),
        spec_json: r#"{"rho":[0.3,0.5]}"#.to_string(),
        dataset: "idx:data/test".to_string(),
        recipe_json: r#"{"epochs":2, "lr":0.1}"#.to_string(),
        recipe_hash: "recipe-a".to_string(),
        seeds: seeds.to_vec(),
        max_attempts: 3,
        grid: (0..)
            .zip(points)
            .map(|(index, (rho, design))| point(index, *rho, *design))
            .collect(),
        tasks: Vec::new(),
        designs,
    }
}

/// A downstream task as `SweepSpec::tasks` makes them.
fn task(index: i32, name: &str, kind: &str) -> NewTask {
    NewTask {
        index,
        name: name.to_string(),
        kind: kind.to_string(),
        dataset: "idx:data/other".to_string(),
        recipe_json: r#"{"epochs":1,"lr":0.01}"#.to_string(),
        task_hash: format!("{kind}-hash"),
    }
}

fn epoch(epoch: i32, top1: f64) -> EpochMetrics {
    EpochMetrics {
        epoch,
        train_loss: 1.0 / f64::from(epoch + 1),
        test_loss: 1.1,
        top1,
        top5: 0.99,
        images_per_second: 500.0,
        learning_rate: 0.1,
    }
}

fn metrics(top1: f64) -> FinalMetrics {
    FinalMetrics {
        top1,
        top5: (top1 + 0.1).min(1.0),
        test_loss: 0.5,
        train_seconds: 12.0,
        epochs: 2,
        dataset_hash: "abc123".to_string(),
        checkpoint: Some("/tmp/checkpoint".to_string()),
        epochs_metrics: vec![epoch(1, top1)],
    }
}

async fn worker(store: &Store, now: DateTime<Utc>) -> WorkerId {
    let worker = NewWorker {
        id: WorkerId::new(),
        name: "gpu-node-1".to_string(),
        devices_json: r#"[{"kind":"cpu"}]"#.to_string(),
        protocol_version: 1,
    };
    store.register_worker(&worker, now).await.unwrap();
    worker.id
}

async fn claim(store: &Store, worker: WorkerId, now: DateTime<Utc>) -> Lease {
    store
        .claim(worker, LEASE_MS, now)
        .await
        .unwrap()
        .expect("a trial is ready")
}

async fn complete(store: &Store, lease: &Lease, top1: f64, now: DateTime<Utc>) -> CompleteOutcome {
    store
        .complete(lease.attempt, lease.token, &metrics(top1), now)
        .await
        .unwrap()
}

/// Claims and completes every ready trial, scoring each with `top1_of(lease)`.
async fn run_all(store: &Store, now: DateTime<Utc>, top1_of: impl Fn(&Lease) -> f64) -> usize {
    let worker = worker(store, now).await;
    let mut finished = 0;
    while let Some(lease) = store.claim(worker, LEASE_MS, now).await.unwrap() {
        let top1 = top1_of(&lease);
        assert_eq!(
            complete(store, &lease, top1, now).await,
            CompleteOutcome::Recorded
        );
        finished += 1;
    }
    finished
}

async fn trial_state_of(store: &Store, lease: &Lease) -> TrialState {
    store.trial_history(lease.trial).await.unwrap().state
}

// ---------------------------------------------------------------------------------------
// Sweeps.

async fn creating_a_sweep_dedups_designs_and_trials(store: &Store) {
    let a = design("a", "basic", 1_000);
    let b = design("b", "basic", 2_000);
    let new = sweep(
        &[
            (0.3, Some(&a)),
            (0.5, Some(&a)),
            (0.5, Some(&b)),
            (0.9, None),
        ],
        &[1, 2, 2],
    );
    let created = store.create_sweep(&new, at(0.0)).await.unwrap();
    assert_eq!(created.grid_points, 4);
    assert_eq!(created.infeasible_points, 1);
    assert_eq!(created.distinct_designs, 2);
    assert_eq!(created.new_trials, 4, "2 designs x 2 distinct seeds");
    assert_eq!(created.reused_results + created.shared_trials, 0);

    let summary = store.get_sweep(new.id).await.unwrap();
    assert_eq!(summary.state, SweepState::Active);
    assert_eq!(summary.name, "test sweep");
    assert_eq!(summary.created_at, at(0.0));
    assert_eq!((summary.grid_points, summary.distinct_designs), (4, 2));
    assert_eq!(summary.counts.queued, 4);
    assert_eq!(summary.best_top1, None);
    let trials = store.sweep_trials(new.id).await.unwrap();
    assert_eq!(trials.len(), 4);
    assert!(trials.iter().all(|(_, state)| *state == TrialState::Queued));
}

async fn a_later_sweep_reuses_results_and_shares_trials(store: &Store) {
    let a = design("a", "basic", 1_000);
    let b = design("b", "basic", 2_000);
    let first = sweep(&[(0.3, Some(&a)), (0.5, Some(&b))], &[1]);
    store.create_sweep(&first, at(0.0)).await.unwrap();
    assert_eq!(run_all(store, at(1.0), |_| 0.5).await, 2);
    assert_eq!(
        store.get_sweep(first.id).await.unwrap().state,
        SweepState::Completed
    );

    // Design a, seed 1 was trained: reused. Seed 2 is new.
    let second = sweep(&[(0.3, Some(&a))], &[1, 2]);
    let created = store.create_sweep(&second, at(2.0)).await.unwrap();
    assert_eq!(
        (
            created.new_trials,
            created.reused_results,
            created.shared_trials
        ),
        (1, 1, 0)
    );
    // Design a, seed 2 is queued for the second sweep: the third shares it.
    let third = sweep(&[(0.4, Some(&a))], &[2]);
    let created = store.create_sweep(&third, at(3.0)).await.unwrap();
    assert_eq!(
        (
            created.new_trials,
            created.reused_results,
            created.shared_trials
        ),
        (0, 0, 1)
    );
    let counts = store.queue_counts().await.unwrap();
    assert_eq!(
        (counts.succeeded, counts.queued),
        (2, 1),
        "three trials in all"
    );

    let second_summary = store.get_sweep(second.id).await.unwrap();
    assert_eq!(
        (
            second_summary.counts.succeeded,
            second_summary.counts.queued
        ),
        (1, 1)
    );
    assert_eq!(second_summary.best_top1, Some(0.5));
    let newest: Vec<SweepId> = store
        .list_sweeps(0)
        .await
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(newest, vec![third.id, second.id, first.id]);
    assert_eq!(store.list_sweeps(2).await.unwrap().len(), 2);

    // The shared trial completes once and counts in both sweeps that hold it; the second
    // sweep's board also holds the result it reused at creation.
    assert_eq!(run_all(store, at(4.0), |_| 0.7).await, 1);
    let board_of = |sweep: SweepId| LeaderboardFilter {
        sweep: Some(sweep),
        ..Default::default()
    };
    let second_board = store.leaderboard(&board_of(second.id)).await.unwrap();
    assert_eq!(second_board.len(), 1);
    assert_eq!(second_board[0].seeds, 2);
    assert!((second_board[0].top1_mean - 0.6).abs() < 1e-12);
    assert!((second_board[0].top1_std - 0.1).abs() < 1e-12);
    let third_board = store.leaderboard(&board_of(third.id)).await.unwrap();
    assert_eq!(
        (
            third_board.len(),
            third_board[0].seeds,
            third_board[0].top1_mean
        ),
        (1, 1, 0.7)
    );
    let first_board = store.leaderboard(&board_of(first.id)).await.unwrap();
    assert_eq!(
        first_board.iter().map(|row| row.seeds).collect::<Vec<_>>(),
        vec![1, 1],
        "the first sweep never held seed 2"
    );
}

async fn a_failing_create_writes_nothing(store: &Store) {
    let a = design("a", "basic", 1_000);
    let first = sweep(&[(0.3, Some(&a))], &[1]);
    store.create_sweep(&first, at(0.0)).await.unwrap();

    // The same sweep id again, with a new design and new trials: the sweep row fails after
    // the designs were written, and everything rolls back.
    let c = design("c", "basic", 3_000);
    let mut taken_id = sweep(&[(0.3, Some(&c))], &[1, 2]);
    taken_id.id = first.id;
    match store.create_sweep(&taken_id, at(1.0)).await {
        Err(StoreError::Conflict { constraint }) => assert_eq!(constraint, "sweeps_pkey"),
        other => panic!("expected a conflict on sweeps_pkey, got {other:?}"),
    }
    // A grid point naming a design the sweep does not carry fails after the sweep row.
    let mut dangling = sweep(&[(0.3, Some(&c))], &[1]);
    dangling.designs.clear();
    let error = store.create_sweep(&dangling, at(1.0)).await.unwrap_err();
    assert!(matches!(error, StoreError::Conflict { .. }), "{error:?}");

    assert!(matches!(
        store.get_sweep(dangling.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.queue_counts().await.unwrap().queued, 1);
    assert_eq!(store.list_sweeps(0).await.unwrap().len(), 1);
    // The store is still whole: a correct sweep over design c goes through.
    let retried = sweep(&[(0.3, Some(&c))], &[1]);
    assert_eq!(
        store
            .create_sweep(&retried, at(2.0))
            .await
            .unwrap()
            .new_trials,
        1
    );
}

// ---------------------------------------------------------------------------------------
// The lease protocol.

async fn a_lease_runs_from_claim_to_complete(store: &Store) {
    let a = design("a", "basic", 1_000);
    let new = sweep(&[(0.3, Some(&a))], &[7]);
    store.create_sweep(&new, at(0.0)).await.unwrap();
    let worker = worker(store, at(0.0)).await;

    let lease = claim(store, worker, at(1.0)).await;
    assert_eq!(lease.design_id, a.id);
    assert_eq!(
        lease.architecture_json, a.architecture_json,
        "the canonical bytes"
    );
    assert_eq!(lease.recipe_json, new.recipe_json);
    // Reports are checked against the attempt's recipe (issue 24).
    let recipe = store.attempt_recipe(lease.attempt).await.unwrap();
    assert_eq!(recipe.as_deref(), Some(new.recipe_json.as_str()));
    assert_eq!(store.attempt_recipe(AttemptId::new()).await.unwrap(), None);
    assert_eq!((lease.dataset.as_str(), lease.seed), ("idx:data/test", 7));
    assert_eq!(lease.expires_at, at(11.0));
    assert!(store
        .claim(worker, LEASE_MS, at(1.0))
        .await
        .unwrap()
        .is_none());
    assert_eq!(trial_state_of(store, &lease).await, TrialState::Running);

    let progress = Progress {
        epoch: 0,
        step: 120,
        loss: Some(1.2),
        top1: Some(0.4),
        images_per_second: Some(800.0),
    };
    let beat = store
        .heartbeat(
            lease.attempt,
            lease.token,
            &progress,
            &[epoch(0, 0.4)],
            LEASE_MS,
            at(5.0),
        )
        .await
        .unwrap();
    assert_eq!(
        beat,
        HeartbeatOutcome::Continue {
            expires_at: at(15.0)
        }
    );
    // The extended lease holds past the first expiry.
    assert_eq!(
        complete(store, &lease, 0.8, at(14.0)).await,
        CompleteOutcome::Recorded
    );
    assert_eq!(
        complete(store, &lease, 0.8, at(15.0)).await,
        CompleteOutcome::Duplicate
    );

    let history = store.trial_history(lease.trial).await.unwrap();
    assert_eq!(history.state, TrialState::Succeeded);
    assert_eq!(history.attempts.len(), 1);
    assert_eq!(history.attempts[0].state, AttemptState::Succeeded);
    assert_eq!(history.attempts[0].finished_at, Some(at(14.0)));
    assert_eq!(
        history.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
        vec![0, 1]
    );
    let result = history.result.expect("the trial has its result");
    assert_eq!((result.top1, result.dataset_hash.as_str()), (0.8, "abc123"));
    assert!(history.late_results.is_empty());
    let summary = store.get_sweep(new.id).await.unwrap();
    assert_eq!(
        (summary.state, summary.counts.succeeded),
        (SweepState::Completed, 1)
    );
    assert_eq!(summary.best_design, Some(a.id));
}

async fn expired_leases_are_reaped_and_requeued_after_backoff(store: &Store) {
    let a = design("a", "basic", 1_000);
    store
        .create_sweep(&sweep(&[(0.3, Some(&a))], &[1]), at(0.0))
        .await
        .unwrap();
    let worker = worker(store, at(0.0)).await;
    let lost = claim(store, worker, at(0.0)).await;

    assert_eq!(
        store.reap_expired(&POLICY, at(10.0)).await.unwrap(),
        0,
        "expires at 10 s"
    );
    // Past its expiry the lease is lost even before the reaper runs.
    let beat = store
        .heartbeat(
            lost.attempt,
            lost.token,
            &Progress::default(),
            &[],
            LEASE_MS,
            at(10.5),
        )
        .await
        .unwrap();
    assert_eq!(beat, HeartbeatOutcome::LeaseLost);
    assert_eq!(store.reap_expired(&POLICY, at(11.0)).await.unwrap(), 1);
    assert_eq!(store.reap_expired(&POLICY, at(11.0)).await.unwrap(), 0);

    let history = store.trial_history(lost.trial).await.unwrap();
    assert_eq!(history.state, TrialState::Queued);
    assert_eq!(history.attempts[0].state, AttemptState::Expired);
    assert_eq!(history.attempts[0].failure_class, Some(FailureClass::Lost));
    // Backoff: 1 s after the reap.
    assert!(store
        .claim(worker, LEASE_MS, at(11.9))
        .await
        .unwrap()
        .is_none());
    let again = claim(store, worker, at(12.0)).await;
    assert_eq!(again.trial, lost.trial);
    assert_ne!(again.token, lost.token);
    assert_eq!(
        complete(store, &again, 0.6, at(13.0)).await,
        CompleteOutcome::Recorded
    );
}

async fn fenced_out_attempts_are_kept_late_and_not_counted(store: &Store) {
    let a = design("a", "basic", 1_000);
    store
        .create_sweep(&sweep(&[(0.3, Some(&a))], &[1]), at(0.0))
        .await
        .unwrap();
    let worker = worker(store, at(0.0)).await;
    let old = claim(store, worker, at(0.0)).await;
    store.reap_expired(&POLICY, at(20.0)).await.unwrap();
    let new = claim(store, worker, at(30.0)).await;

    let idle = Progress::default();
    let old_beat = store.heartbeat(old.attempt, old.token, &idle, &[], LEASE_MS, at(31.0));
    assert_eq!(old_beat.await.unwrap(), HeartbeatOutcome::LeaseLost);
    let forged = store
        .heartbeat(new.attempt, old.token, &idle, &[], LEASE_MS, at(31.0))
        .await;
    assert!(
        matches!(forged, Err(StoreError::NotLeaseHolder { attempt }) if attempt == new.attempt)
    );
    let forged = store
        .complete(new.attempt, LeaseToken::new(), &metrics(0.9), at(31.0))
        .await;
    assert!(matches!(forged, Err(StoreError::NotLeaseHolder { .. })));

    assert_eq!(
        complete(store, &old, 0.99, at(32.0)).await,
        CompleteOutcome::Late
    );
    assert_eq!(
        complete(store, &old, 0.99, at(33.0)).await,
        CompleteOutcome::Late
    );
    assert_eq!(
        trial_state_of(store, &new).await,
        TrialState::Running,
        "late is not counted"
    );
    assert!(store
        .leaderboard(&LeaderboardFilter::default())
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        complete(store, &new, 0.7, at(34.0)).await,
        CompleteOutcome::Recorded
    );
    assert_eq!(
        complete(store, &new, 0.7, at(35.0)).await,
        CompleteOutcome::Duplicate
    );
    // A report from the fenced-out attempt after the result still does not count.
    let failed = store
        .fail(
            old.attempt,
            old.token,
            FailureClass::Retryable,
            "oom",
            None,
            &POLICY,
            at(36.0),
        )
        .await
        .unwrap();
    assert_eq!(failed, FailOutcome::NotLeaseHolder);

    let history = store.trial_history(new.trial).await.unwrap();
    assert_eq!(history.result.as_ref().map(|r| r.top1), Some(0.7));
    assert_eq!(
        history.late_results.len(),
        1,
        "the second late report was a no-op"
    );
    assert_eq!(history.late_results[0].0, old.attempt);
    assert_eq!(history.late_results[0].1.top1, 0.99);
    let board = store
        .leaderboard(&LeaderboardFilter::default())
        .await
        .unwrap();
    assert_eq!((board[0].seeds, board[0].top1_mean), (1, 0.7));
}

async fn fail_once(
    store: &Store,
    lease: &Lease,
    class: FailureClass,
    now: DateTime<Utc>,
) -> FailOutcome {
    store
        .fail(
            lease.attempt,
            lease.token,
            class,
            "boom",
            None,
            &POLICY,
            now,
        )
        .await
        .unwrap()
}

/// Issue 24, item 8: rolling restarts that hit one trial must not make it `dead`. Eleven
/// hand-backs (past the policy's 2 requeues) each queue the trial again at once, and it still
/// trains to completion; the attempts are kept as retryable failures with the message.
async fn hand_backs_requeue_at_once_and_never_end_a_trial(store: &Store) {
    let a = design("a", "basic", 1_000);
    store
        .create_sweep(&sweep(&[(0.3, Some(&a))], &[1]), at(0.0))
        .await
        .unwrap();
    let worker = worker(store, at(0.0)).await;
    let mut now = 1.0;
    for _ in 0..11 {
        let lease = claim(store, worker, at(now)).await;
        let outcome = store
            .hand_back(lease.attempt, lease.token, "shutting down", at(now + 1.0))
            .await
            .unwrap();
        assert_eq!(
            outcome,
            FailOutcome::Requeued {
                not_before: at(now + 1.0)
            },
            "queued again at once"
        );
        now += 1.0;
    }
    let lease = claim(store, worker, at(now)).await;
    assert_eq!(
        complete(store, &lease, 0.5, at(now + 1.0)).await,
        CompleteOutcome::Recorded
    );
    let history = store.trial_history(lease.trial).await.unwrap();
    assert_eq!(history.state, TrialState::Succeeded);
    assert_eq!(history.attempts.len(), 12);
    let handed_back = &history.attempts[0];
    assert_eq!(handed_back.state, AttemptState::Failed);
    assert_eq!(handed_back.failure_class, Some(FailureClass::Retryable));
    assert_eq!(
        handed_back.failure_message.as_deref(),
        Some("shutting down")
    );
    // A stale lease cannot hand a trial back.
    let outcome = store
        .hand_back(lease.attempt, lease.token, "late", at(now + 2.0))
        .await
        .unwrap();
    assert_eq!(outcome, FailOutcome::NotLeaseHolder);
}

async fn deterministic_failures_count_and_others_do_not(store: &Store) {
    let a = design("a", "basic", 1_000);
    let mut new = sweep(&[(0.3, Some(&a))], &[1]);
    new.max_attempts = 2;
    store.create_sweep(&new, at(0.0)).await.unwrap();
    let worker = worker(store, at(0.0)).await;

    // Lost and retryable failures do not count; their backoff doubles with every retry.
    let lease = claim(store, worker, at(0.0)).await;
    let outcome = fail_once(store, &lease, FailureClass::Retryable, at(1.0)).await;
    assert_eq!(
        outcome,
        FailOutcome::Requeued {
            not_before: at(2.0)
        }
    );
    assert!(store
        .claim(worker, LEASE_MS, at(1.5))
        .await
        .unwrap()
        .is_none());
    let lease = claim(store, worker, at(2.0)).await;
    let outcome = fail_once(store, &lease, FailureClass::Deterministic, at(3.0)).await;
    assert_eq!(
        outcome,
        FailOutcome::Requeued {
            not_before: at(5.0)
        },
        "counted: 1 of 2"
    );
    let lease = claim(store, worker, at(5.0)).await;
    let outcome = fail_once(store, &lease, FailureClass::Lost, at(6.0)).await;
    assert_eq!(
        outcome,
        FailOutcome::Requeued {
            not_before: at(10.0)
        }
    );
    // The second counted failure reaches max_attempts: the trial failed.
    let lease = claim(store, worker, at(10.0)).await;
    let outcome = fail_once(store, &lease, FailureClass::Deterministic, at(11.0)).await;
    assert_eq!(
        outcome,
        FailOutcome::Stopped {
            state: TrialState::Failed
        }
    );
    assert!(store
        .claim(worker, LEASE_MS, at(100.0))
        .await
        .unwrap()
        .is_none());
    let history = store.trial_history(lease.trial).await.unwrap();
    assert_eq!(history.state, TrialState::Failed);
    assert_eq!(history.attempts.len(), 4);
    assert!(history
        .attempts
        .iter()
        .all(|a| a.state == AttemptState::Failed));
    assert_eq!(history.attempts[3].failure_message.as_deref(), Some("boom"));

    // Past max_requeues (2) uncounted failures, a trial is dead.
    let b = design("b", "basic", 1_000);
    store
        .create_sweep(&sweep(&[(0.3, Some(&b))], &[1]), at(200.0))
        .await
        .unwrap();
    let mut now = 200.0;
    let mut last = None;
    for _ in 0..3 {
        let lease = claim(store, worker, at(now)).await;
        last = Some(fail_once(store, &lease, FailureClass::Lost, at(now)).await);
        now += 100.0;
    }
    assert_eq!(
        last,
        Some(FailOutcome::Stopped {
            state: TrialState::Dead
        })
    );
    // An override replaces the trial's max_attempts for that report.
    let c = design("c", "basic", 1_000);
    store
        .create_sweep(&sweep(&[(0.3, Some(&c))], &[1]), at(600.0))
        .await
        .unwrap();
    let lease = claim(store, worker, at(600.0)).await;
    let outcome = store
        .fail(
            lease.attempt,
            lease.token,
            FailureClass::Deterministic,
            "bad",
            Some(1),
            &POLICY,
            at(600.0),
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        FailOutcome::Stopped {
            state: TrialState::Failed
        }
    );
    let counts = store.queue_counts().await.unwrap();
    assert_eq!((counts.failed, counts.dead, counts.queued), (2, 1, 0));
}

async fn retry_trials_requeues_failed_and_dead_trials(store: &Store) {
    let a = design("a", "basic", 1_000);
    let mut new = sweep(&[(0.3, Some(&a))], &[1, 2]);
    new.max_attempts = 1;
    store.create_sweep(&new, at(0.0)).await.unwrap();
    let worker = worker(store, at(0.0)).await;
    for _ in 0..2 {
        let lease = claim(store, worker, at(0.0)).await;
        let outcome = fail_once(store, &lease, FailureClass::Deterministic, at(0.0)).await;
        assert_eq!(
            outcome,
            FailOutcome::Stopped {
                state: TrialState::Failed
            }
        );
    }
    assert_eq!(
        store.get_sweep(new.id).await.unwrap().state,
        SweepState::Completed
    );
    store.reap_expired(&POLICY, at(1.0)).await.unwrap(); // Persists `completed`.

    assert_eq!(store.retry_trials(new.id, at(50.0)).await.unwrap(), 2);
    let summary = store.get_sweep(new.id).await.unwrap();
    assert_eq!(
        (summary.state, summary.counts.queued),
        (SweepState::Active, 2)
    );
    // Counters were reset: one deterministic failure stops it again (max_attempts 1).
    let lease = claim(store, worker, at(50.0)).await;
    let outcome = fail_once(store, &lease, FailureClass::Deterministic, at(51.0)).await;
    assert_eq!(
        outcome,
        FailOutcome::Stopped {
            state: TrialState::Failed
        }
    );
    let lease = claim(store, worker, at(52.0)).await;
    assert_eq!(
        complete(store, &lease, 0.5, at(53.0)).await,
        CompleteOutcome::Recorded
    );
    assert_eq!(store.retry_trials(new.id, at(60.0)).await.unwrap(), 1);
    assert_eq!(store.retry_trials(new.id, at(60.0)).await.unwrap(), 0);
}

async fn a_sweep_is_found_by_its_spec_unless_cancelled(store: &Store) {
    let a = design("a", "basic", 1_000);
    let first = sweep(&[(0.3, Some(&a))], &[1]);
    store.create_sweep(&first, at(0.0)).await.unwrap();
    // Spacing does not matter: the JSON values are compared.
    let same = r#"{ "rho": [0.3, 0.5] }"#;
    assert_eq!(store.find_sweep(same).await.unwrap(), Some(first.id));
    assert_eq!(store.find_sweep(r#"{"rho":[0.3]}"#).await.unwrap(), None);
    let second = NewSweep {
        id: SweepId::new(),
        ..sweep(&[(0.3, Some(&a))], &[1])
    };
    store.create_sweep(&second, at(1.0)).await.unwrap();
    assert_eq!(
        store.find_sweep(same).await.unwrap(),
        Some(second.id),
        "newest first"
    );
    store.cancel_sweep(second.id, at(2.0)).await.unwrap();
    assert_eq!(store.find_sweep(same).await.unwrap(), Some(first.id));
    store.cancel_sweep(first.id, at(3.0)).await.unwrap();
    assert_eq!(store.find_sweep(same).await.unwrap(), None);
}

async fn cancelling_a_sweep_stops_its_attempts(store: &Store) {
    let a = design("a", "basic", 1_000);
    let first = sweep(&[(0.3, Some(&a))], &[1, 2]);
    store.create_sweep(&first, at(0.0)).await.unwrap();
    let worker = worker(store, at(0.0)).await;
    let lease = claim(store, worker, at(0.0)).await;

    let summary = store.cancel_sweep(first.id, at(1.0)).await.unwrap();
    assert_eq!(summary.state, SweepState::Cancelled);
    assert!(
        store
            .claim(worker, LEASE_MS, at(2.0))
            .await
            .unwrap()
            .is_none(),
        "not leasable"
    );
    let idle = Progress::default();
    let beat = store.heartbeat(lease.attempt, lease.token, &idle, &[], LEASE_MS, at(3.0));
    assert_eq!(beat.await.unwrap(), HeartbeatOutcome::Cancelled);
    let beat = store.heartbeat(lease.attempt, lease.token, &idle, &[], LEASE_MS, at(4.0));
    assert_eq!(beat.await.unwrap(), HeartbeatOutcome::Cancelled);
    let history = store.trial_history(lease.trial).await.unwrap();
    assert_eq!(history.state, TrialState::Queued);
    assert_eq!(history.attempts[0].state, AttemptState::Cancelled);
    assert_eq!(
        complete(store, &lease, 0.9, at(5.0)).await,
        CompleteOutcome::Late
    );
    let again = store.cancel_sweep(first.id, at(6.0)).await.unwrap();
    assert_eq!(again.state, SweepState::Cancelled, "idempotent");

    // A later sweep takes the same trials up again.
    let second = sweep(&[(0.3, Some(&a))], &[1, 2]);
    let created = store.create_sweep(&second, at(7.0)).await.unwrap();
    assert_eq!(created.shared_trials, 2);
    assert_eq!(run_all(store, at(8.0), |_| 0.5).await, 2);
    // Cancelling a sweep with nothing left to run leaves it completed.
    let summary = store.cancel_sweep(second.id, at(9.0)).await.unwrap();
    assert_eq!(summary.state, SweepState::Completed);
}

async fn grace_extends_running_leases(store: &Store) {
    let a = design("a", "basic", 1_000);
    store
        .create_sweep(&sweep(&[(0.3, Some(&a))], &[1, 2]), at(0.0))
        .await
        .unwrap();
    let worker = worker(store, at(0.0)).await;
    let lease = claim(store, worker, at(0.0)).await;
    let other = claim(store, worker, at(0.0)).await;
    store
        .complete(other.attempt, other.token, &metrics(0.5), at(1.0))
        .await
        .unwrap();

    // The coordinator was down from 5 s to 30 s: the lease (to 10 s) gets 60 s from 30 s.
    assert_eq!(store.grant_grace(60_000, at(30.0)).await.unwrap(), 1);
    assert_eq!(
        store.grant_grace(10_000, at(30.0)).await.unwrap(),
        0,
        "never shortens"
    );
    assert_eq!(store.reap_expired(&POLICY, at(89.0)).await.unwrap(), 0);
    let beat = store
        .heartbeat(
            lease.attempt,
            lease.token,
            &Progress::default(),
            &[],
            LEASE_MS,
            at(85.0),
        )
        .await
        .unwrap();
    assert_eq!(
        beat,
        HeartbeatOutcome::Continue {
            expires_at: at(95.0)
        }
    );
}

async fn two_reapers_requeue_each_trial_once(store: &Store) {
    let designs: Vec<NewDesign> = (0..10)
        .map(|i| design(&format!("d{i}"), "basic", 1_000))
        .collect();
    let points: Vec<(f64, Option<&NewDesign>)> = designs.iter().map(|d| (0.3, Some(d))).collect();
    store
        .create_sweep(&sweep(&points, &[1]), at(0.0))
        .await
        .unwrap();
    let worker = worker(store, at(0.0)).await;
    let mut leases = Vec::new();
    for _ in 0..10 {
        leases.push(claim(store, worker, at(0.0)).await);
    }
    let (one, two) = tokio::join!(
        store.reap_expired(&POLICY, at(20.0)),
        store.reap_expired(&POLICY, at(20.0))
    );
    assert_eq!(one.unwrap() + two.unwrap(), 10);
    for lease in &leases {
        let history = store.trial_history(lease.trial).await.unwrap();
        assert_eq!(history.state, TrialState::Queued);
        assert_eq!(history.attempts.len(), 1);
    }
    // Each trial was requeued once: its backoff is the first one (1 s), not the second.
    assert!(store
        .claim(worker, LEASE_MS, at(20.9))
        .await
        .unwrap()
        .is_none());
    assert_eq!(run_all(store, at(21.0), |_| 0.5).await, 10);
}

// ---------------------------------------------------------------------------------------
// Reads.

async fn leaderboard_aggregates_over_seeds_and_filters(store: &Store) {
    let a = design("a", "basic", 1_000);
    let b = design("b", "bottleneck", 5_000);
    let first = sweep(
        &[(0.3, Some(&a)), (0.5, Some(&a)), (0.4, Some(&b))],
        &[1, 2, 3],
    );
    store.create_sweep(&first, at(0.0)).await.unwrap();
    // a: 0.5, 0.7, 0.9 over seeds 1..3 (mean 0.7); b: 0.8 on every seed.
    let top1_of = |lease: &Lease| {
        if lease.design_id == a.id {
            0.3 + 0.2 * lease.seed as f64
        } else {
            0.8
        }
    };
    assert_eq!(run_all(store, at(1.0), top1_of).await, 6);
    // A second sweep reaches a at a smaller rho and reuses its results.
    let second = sweep(&[(0.2, Some(&a))], &[1]);
    assert_eq!(
        store
            .create_sweep(&second, at(2.0))
            .await
            .unwrap()
            .reused_results,
        1
    );

    let all = store
        .leaderboard(&LeaderboardFilter::default())
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|r| r.design_id.clone()).collect::<Vec<_>>(),
        vec![b.id.clone(), a.id.clone()]
    );
    assert_eq!((all[0].seeds, all[0].top1_std), (3, 0.0));
    assert!((all[0].top1_mean - 0.8).abs() < 1e-12);
    assert!((all[0].top5_mean - 0.9).abs() < 1e-12);
    assert!((all[1].top1_mean - 0.7).abs() < 1e-12);
    assert!((all[1].top1_std - (0.08_f64 / 3.0).sqrt()).abs() < 1e-9);
    assert_eq!(
        (all[1].family.as_str(), all[1].params, all[1].flops),
        ("basic", 1_000, 10_000)
    );
    assert_eq!(
        (all[1].dataset.as_str(), all[1].recipe_hash.as_str()),
        ("idx:data/test", "recipe-a")
    );
    assert_eq!(all[1].rho, Some(0.2), "the smallest rho of any sweep");

    let in_first = |extra: LeaderboardFilter| LeaderboardFilter {
        sweep: Some(first.id),
        ..extra
    };
    let board = store
        .leaderboard(&in_first(LeaderboardFilter::default()))
        .await
        .unwrap();
    assert_eq!(board.len(), 2);
    assert_eq!(
        (board[1].design_id.clone(), board[1].rho, board[1].seeds),
        (a.id.clone(), Some(0.3), 3)
    );
    assert!((board[1].top1_std - all[1].top1_std).abs() < 1e-12);
    let in_second = LeaderboardFilter {
        sweep: Some(second.id),
        ..Default::default()
    };
    let board = store.leaderboard(&in_second).await.unwrap();
    assert_eq!(
        (board.len(), board[0].seeds, board[0].rho),
        (1, 1, Some(0.2))
    );

    let family = LeaderboardFilter {
        family: Some("basic".into()),
        ..Default::default()
    };
    assert_eq!(store.leaderboard(&family).await.unwrap()[0].design_id, a.id);
    let big = LeaderboardFilter {
        min_params: Some(2_000),
        ..Default::default()
    };
    assert_eq!(
        store.leaderboard(&in_first(big)).await.unwrap()[0].design_id,
        b.id
    );
    let small = LeaderboardFilter {
        max_params: Some(2_000),
        ..Default::default()
    };
    assert_eq!(store.leaderboard(&small).await.unwrap().len(), 1);
    // FLOPs are params * 10 in these fixtures: a has 10,000, b 50,000.
    let flops_budget = |max_flops: i64| LeaderboardFilter {
        max_flops: Some(max_flops),
        ..Default::default()
    };
    let best_within = store.leaderboard(&flops_budget(20_000)).await.unwrap();
    assert_eq!(best_within.len(), 1);
    assert_eq!(best_within[0].design_id, a.id);
    let in_sweep = store
        .leaderboard(&in_first(flops_budget(50_000)))
        .await
        .unwrap();
    assert_eq!(in_sweep[0].design_id, b.id, "the budget is inclusive");
    assert!(store
        .leaderboard(&in_first(flops_budget(9_999)))
        .await
        .unwrap()
        .is_empty());
    let other = LeaderboardFilter {
        dataset: Some("idx:data/other".into()),
        ..Default::default()
    };
    assert!(store.leaderboard(&other).await.unwrap().is_empty());
    let top = LeaderboardFilter {
        limit: 1,
        ..Default::default()
    };
    assert_eq!(store.leaderboard(&top).await.unwrap().len(), 1);
    assert_eq!(
        store.get_sweep(first.id).await.unwrap().best_design,
        Some(b.id)
    );
}

async fn export_lists_each_result_of_a_sweep(store: &Store) {
    let a = design("a", "basic", 1_000);
    let b = design("b", "mbconv", 2_000);
    let new = sweep(
        &[(0.5, Some(&a)), (0.3, Some(&a)), (0.4, Some(&b))],
        &[2, 1],
    );
    store.create_sweep(&new, at(0.0)).await.unwrap();
    let worker = worker(store, at(0.0)).await;
    let unfinished = claim(store, worker, at(1.0)).await;
    assert_eq!(
        run_all(store, at(1.0), |lease| 0.1 * lease.seed as f64).await,
        3
    );

    let rows = store.export_results(new.id).await.unwrap();
    assert_eq!(rows.len(), 3, "the unfinished trial has no result yet");
    assert!(rows.iter().all(|row| row.trial != unfinished.trial));
    let mut expected: Vec<(DesignId, i64)> = [(&a, 1), (&a, 2), (&b, 1), (&b, 2)]
        .into_iter()
        .map(|(design, seed)| (design.id.clone(), seed))
        .filter(|key| *key != (unfinished.design_id.clone(), unfinished.seed))
        .collect();
    expected.sort();
    let keys: Vec<(DesignId, i64)> = rows.iter().map(|r| (r.design_id.clone(), r.seed)).collect();
    assert_eq!(keys, expected, "by design, then seed");
    for row in &rows {
        let (design, rho) = if row.design_id == a.id {
            (&a, 0.3)
        } else {
            (&b, 0.4)
        };
        assert_eq!(
            (row.family.as_str(), row.params, row.rho),
            (design.family.as_str(), design.params, Some(rho))
        );
        assert_eq!(
            (row.top1, row.epochs, row.dataset.as_str()),
            (0.1 * row.seed as f64, 2, "idx:data/test")
        );
    }
    let unknown = SweepId::new();
    assert!(matches!(
        store.export_results(unknown).await,
        Err(StoreError::NotFound { what: "sweep", .. })
    ));
}

async fn unknown_ids_are_not_found(store: &Store) {
    fn names(error: StoreError, expected_what: &str, expected_id: &str) {
        match error {
            StoreError::NotFound { what, id } => {
                assert_eq!((what, id.as_str()), (expected_what, expected_id))
            }
            other => panic!("expected not found, got {other:?}"),
        }
    }
    let sweep_id = SweepId::new();
    let text = sweep_id.to_string();
    names(store.get_sweep(sweep_id).await.unwrap_err(), "sweep", &text);
    names(
        store.cancel_sweep(sweep_id, at(0.0)).await.unwrap_err(),
        "sweep",
        &text,
    );
    names(
        store.retry_trials(sweep_id, at(0.0)).await.unwrap_err(),
        "sweep",
        &text,
    );
    names(
        store.sweep_trials(sweep_id).await.unwrap_err(),
        "sweep",
        &text,
    );
    let trial = deepmad_coordinator::model::TrialId::new();
    names(
        store.trial_history(trial).await.unwrap_err(),
        "trial",
        &trial.to_string(),
    );
    let worker = WorkerId::new();
    names(
        store.claim(worker, LEASE_MS, at(0.0)).await.unwrap_err(),
        "worker",
        &worker.to_string(),
    );
    let attempt = deepmad_coordinator::model::AttemptId::new();
    let token = LeaseToken::new();
    let idle = Progress::default();
    let beat = store
        .heartbeat(attempt, token, &idle, &[], LEASE_MS, at(0.0))
        .await;
    names(beat.unwrap_err(), "attempt", &attempt.to_string());
    let done = store.complete(attempt, token, &metrics(0.5), at(0.0)).await;
    names(done.unwrap_err(), "attempt", &attempt.to_string());
    let failed = store
        .fail(
            attempt,
            token,
            FailureClass::Lost,
            "",
            None,
            &POLICY,
            at(0.0),
        )
        .await;
    names(failed.unwrap_err(), "attempt", &attempt.to_string());
}

// ---------------------------------------------------------------------------------------
// Concurrency.

/// Claims that arrive together (PostgreSQL sends them as one statement): more claims than
/// queued trials, one from a worker that never registered. Each trial goes to one worker, the
/// rest get no work, the unknown worker gets `NotFound`, and every lease holds.
async fn a_burst_of_claims_shares_out_the_queue(store: &Store) {
    let designs: Vec<NewDesign> = (0..3)
        .map(|i| design(&format!("b{i}"), "basic", 1_000 + i))
        .collect();
    let points: Vec<(f64, Option<&NewDesign>)> = designs.iter().map(|d| (0.3, Some(d))).collect();
    store
        .create_sweep(&sweep(&points, &[1]), at(0.0))
        .await
        .unwrap();
    let mut workers = Vec::new();
    for _ in 0..8 {
        workers.push(worker(store, at(1.0)).await);
    }
    let stranger = WorkerId::new();
    let mut tasks = Vec::new();
    for id in workers.iter().copied().chain([stranger]) {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            (id, store.claim(id, LEASE_MS, at(2.0)).await)
        }));
    }
    let mut leased = HashSet::new();
    let mut idle = 0;
    for task in tasks {
        match task.await.unwrap() {
            (id, Err(StoreError::NotFound { what, .. })) => {
                assert_eq!((id, what), (stranger, "worker"));
            }
            (id, Ok(Some(lease))) => {
                assert_ne!(id, stranger);
                assert!(leased.insert(lease.trial), "{:?} leased twice", lease.trial);
                assert_eq!(
                    store
                        .heartbeat(
                            lease.attempt,
                            lease.token,
                            &Progress::default(),
                            &[],
                            LEASE_MS,
                            at(3.0)
                        )
                        .await
                        .unwrap(),
                    HeartbeatOutcome::Continue {
                        expires_at: at(3.0) + Duration::milliseconds(LEASE_MS)
                    }
                );
            }
            (_, Ok(None)) => idle += 1,
            (id, other) => panic!("{id:?}: {other:?}"),
        }
    }
    assert_eq!((leased.len(), idle), (3, 5));
    assert_eq!(
        store.claim(workers[0], LEASE_MS, at(4.0)).await.unwrap(),
        None
    );
}

/// Completions that arrive together (PostgreSQL sends them as one statement, each in its own
/// subtransaction): three identical reports per lease, each lease with its own number of
/// epochs, and one forged report. Each trial records once, with its own result and epochs;
/// the forged report is refused without disturbing the others.
async fn a_burst_of_completions_records_each_once(store: &Store) {
    let designs: Vec<NewDesign> = (0..6)
        .map(|i| design(&format!("d{i}"), "basic", 1_000 + i))
        .collect();
    let points: Vec<(f64, Option<&NewDesign>)> = designs.iter().map(|d| (0.3, Some(d))).collect();
    let new = sweep(&points, &[1]);
    store.create_sweep(&new, at(0.0)).await.unwrap();
    let worker = worker(store, at(0.0)).await;
    let mut leases = Vec::new();
    for _ in 0..6 {
        leases.push(claim(store, worker, at(1.0)).await);
    }
    let report = |index: usize| {
        let top1 = 0.5 + 0.05 * index as f64;
        FinalMetrics {
            epochs_metrics: (0..=index as i32)
                .map(|e| epoch(e, top1 - 0.01 * f64::from(e)))
                .collect(),
            ..metrics(top1)
        }
    };
    let mut tasks = Vec::new();
    for (index, lease) in leases.iter().enumerate() {
        for _ in 0..3 {
            let (store, lease, report) = (store.clone(), lease.clone(), report(index));
            tasks.push(tokio::spawn(async move {
                let outcome = store
                    .complete(lease.attempt, lease.token, &report, at(2.0))
                    .await;
                (index, outcome)
            }));
        }
    }
    let forged = {
        let (store, lease) = (store.clone(), leases[0].clone());
        tokio::spawn(async move {
            store
                .complete(lease.attempt, LeaseToken::new(), &metrics(0.1), at(2.0))
                .await
        })
    };
    let mut recorded = vec![0; leases.len()];
    for task in tasks {
        match task.await.unwrap() {
            (index, Ok(CompleteOutcome::Recorded)) => recorded[index] += 1,
            (_, Ok(CompleteOutcome::Duplicate)) => {}
            (index, other) => panic!("lease {index}: {other:?}"),
        }
    }
    assert!(matches!(
        forged.await.unwrap(),
        Err(StoreError::NotLeaseHolder { .. })
    ));
    assert_eq!(recorded, vec![1; leases.len()]);
    for (index, lease) in leases.iter().enumerate() {
        let history = store.trial_history(lease.trial).await.unwrap();
        let want = report(index);
        assert_eq!(history.state, TrialState::Succeeded);
        assert_eq!(history.result.expect("a result").top1, want.top1);
        let epochs: Vec<(i32, f64)> = history.epochs.iter().map(|e| (e.epoch, e.top1)).collect();
        let want: Vec<(i32, f64)> = want
            .epochs_metrics
            .iter()
            .map(|e| (e.epoch, e.top1))
            .collect();
        assert_eq!(epochs, want, "lease {index}'s epochs");
    }
    assert_eq!(store.get_sweep(new.id).await.unwrap().counts.succeeded, 6);
}

async fn concurrent_workers_never_share_a_trial(store: &Store) {
    workers_share_out_a_sweep(std::slice::from_ref(store)).await;
}

/// 50 workers lease, heartbeat and complete 200 trials concurrently, worker i through
/// `stores[i % len]` (several stores on one database: several coordinators). No trial is
/// leased twice and every result counts once.
async fn workers_share_out_a_sweep(stores: &[Store]) {
    const WORKERS: usize = 50;
    let store = &stores[0];
    let designs: Vec<NewDesign> = (0..40)
        .map(|i| design(&format!("c{i}"), "basic", 1_000 + i))
        .collect();
    let points: Vec<(f64, Option<&NewDesign>)> = designs.iter().map(|d| (0.3, Some(d))).collect();
    let new = sweep(&points, &[1, 2, 3, 4, 5]);
    assert_eq!(
        store.create_sweep(&new, at(0.0)).await.unwrap().new_trials,
        200
    );

    let leases = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for index in 0..WORKERS {
        let (store, leases) = (stores[index % stores.len()].clone(), leases.clone());
        tasks.push(tokio::spawn(async move {
            let (idle, epochs, last) = (Progress::default(), [epoch(1, 0.5)], metrics(0.5));
            let worker = worker(&store, at(1.0)).await;
            while let Some(lease) = store.claim(worker, LEASE_MS, at(1.0)).await.unwrap() {
                // A last heartbeat races the completion: neither may deadlock or fail.
                let (beat, outcome) = tokio::join!(
                    store.heartbeat(
                        lease.attempt,
                        lease.token,
                        &idle,
                        &epochs,
                        LEASE_MS,
                        at(2.0)
                    ),
                    store.complete(lease.attempt, lease.token, &last, at(2.0)),
                );
                let beat = beat.unwrap();
                assert!(
                    matches!(
                        beat,
                        HeartbeatOutcome::Continue { .. } | HeartbeatOutcome::LeaseLost
                    ),
                    "{beat:?}"
                );
                assert_eq!(outcome.unwrap(), CompleteOutcome::Recorded);
                leases.lock().unwrap().push((lease.trial, lease.attempt));
            }
        }));
    }
    for task in tasks {
        task.await.expect("a simulated worker panicked");
    }
    let leases = leases.lock().unwrap().clone();
    let trials: HashSet<_> = leases.iter().map(|(trial, _)| *trial).collect();
    assert_eq!(
        (leases.len(), trials.len()),
        (200, 200),
        "no trial was leased twice"
    );
    let summary = store.get_sweep(new.id).await.unwrap();
    assert_eq!(
        (summary.counts.succeeded, summary.state),
        (200, SweepState::Completed)
    );
    let mut by_trial = BTreeMap::new();
    for (trial, attempt) in &leases {
        by_trial.insert(*trial, *attempt);
    }
    for (trial, attempt) in by_trial.iter().take(20) {
        let history = store.trial_history(*trial).await.unwrap();
        assert!(history.result.is_some());
        assert_eq!(
            history.attempts.iter().map(|a| a.id).collect::<Vec<_>>(),
            vec![*attempt]
        );
    }
    let everything = LeaderboardFilter {
        limit: 1000,
        ..Default::default()
    };
    let board = store.leaderboard(&everything).await.unwrap();
    assert_eq!(board.len(), 40);
    assert!(
        board.iter().all(|row| row.seeds == 5),
        "every result counted once"
    );
}

async fn downstream_trials_follow_their_training_trials(store: &Store) {
    let a = design("a", "basic", 1_000);
    let first = NewSweep {
        tasks: vec![task(0, "probe", "linear-probe")],
        ..sweep(&[(0.3, Some(&a))], &[0, 1])
    };
    store.create_sweep(&first, at(0.0)).await.unwrap();
    let worker = worker(store, at(0.0)).await;
    let seed0 = claim(store, worker, at(1.0)).await;
    let seed1 = claim(store, worker, at(1.0)).await;
    for lease in [&seed0, &seed1] {
        assert_eq!(lease.task, "train");
        assert_eq!(lease.parent, None);
        assert!(lease.upload_weights, "a sweep with tasks wants the weights");
    }
    assert!(store
        .claim(worker, LEASE_MS, at(1.0))
        .await
        .unwrap()
        .is_none());
    // Weights transfers are fenced like reports.
    let leased = store
        .leased_trial(seed0.attempt, seed0.token, at(2.0))
        .await
        .unwrap();
    assert_eq!((leased.trial, leased.task.as_str()), (seed0.trial, "train"));
    assert!(matches!(
        store
            .leased_trial(seed0.attempt, LeaseToken::new(), at(2.0))
            .await,
        Err(StoreError::NotLeaseHolder { .. })
    ));
    assert!(matches!(
        store
            .leased_trial(seed0.attempt, seed0.token, at(1.0 + 11.0))
            .await,
        Err(StoreError::NotLeaseHolder { .. })
    ));

    // A recorded training result queues its downstream trial, starting from its weights.
    assert_eq!(
        complete(store, &seed0, 0.8, at(3.0)).await,
        CompleteOutcome::Recorded
    );
    assert_eq!(
        complete(store, &seed0, 0.8, at(3.5)).await,
        CompleteOutcome::Duplicate
    );
    let probe0 = claim(store, worker, at(4.0)).await;
    assert_eq!(probe0.task, "linear-probe");
    assert_eq!(probe0.parent, Some(seed0.trial));
    assert_eq!(probe0.design_id, a.id);
    assert_eq!(probe0.dataset, "idx:data/other");
    assert_eq!(probe0.seed, seed0.seed);
    assert!(!probe0.upload_weights);
    assert!(
        store
            .claim(worker, LEASE_MS, at(4.0))
            .await
            .unwrap()
            .is_none(),
        "queued once"
    );
    let leased = store
        .leased_trial(probe0.attempt, probe0.token, at(4.5))
        .await
        .unwrap();
    assert_eq!(leased.parent, Some(seed0.trial));
    assert_eq!(leased.parent_result_attempt, Some(seed0.attempt));
    assert_eq!(
        complete(store, &probe0, 0.5, at(5.0)).await,
        CompleteOutcome::Recorded
    );

    // The second seed's downstream trial fails; its training result stays.
    assert_eq!(
        complete(store, &seed1, 0.6, at(6.0)).await,
        CompleteOutcome::Recorded
    );
    let probe1 = claim(store, worker, at(7.0)).await;
    assert_eq!(probe1.parent, Some(seed1.trial));
    let outcome = store
        .fail(
            probe1.attempt,
            probe1.token,
            FailureClass::Deterministic,
            "bad data",
            Some(1),
            &POLICY,
            at(8.0),
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        FailOutcome::Stopped {
            state: TrialState::Failed
        }
    );

    let filter = LeaderboardFilter {
        sweep: Some(first.id),
        limit: 10,
        ..LeaderboardFilter::default()
    };
    let board = store.leaderboard(&filter).await.unwrap();
    assert_eq!(
        board.len(),
        1,
        "downstream results are columns, not rows: {board:?}"
    );
    let row = &board[0];
    assert_eq!(row.seeds, 2);
    assert!((row.top1_mean - 0.7).abs() < 1e-12);
    assert_eq!(row.downstream.len(), 1);
    let probe = &row.downstream[0];
    assert_eq!(
        (probe.name.as_str(), probe.kind.as_str(), probe.seeds),
        ("probe", "linear-probe", 1)
    );
    assert!((probe.top1_mean - 0.5).abs() < 1e-12);
    // The cross-sweep board names tasks by kind and dataset.
    let all = store
        .leaderboard(&LeaderboardFilter {
            limit: 10,
            ..LeaderboardFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(all[0].seeds, 2);
    assert_eq!(all[0].downstream.len(), 1);
    assert_eq!(all[0].downstream[0].name, "linear-probe:idx:data/other");
    let exported = store.export_results(first.id).await.unwrap();
    assert_eq!(exported.len(), 2, "the export lists training results only");
    let records = store.downstream_results(first.id).await.unwrap();
    let states: Vec<(i64, TrialState, Option<f64>)> =
        records.iter().map(|r| (r.seed, r.state, r.top1)).collect();
    let mut expected = vec![
        (seed0.seed, TrialState::Succeeded, Some(0.5)),
        (seed1.seed, TrialState::Failed, None),
    ];
    expected.sort_by_key(|(seed, _, _)| *seed);
    assert_eq!(states, expected);
    assert!(records
        .iter()
        .all(|r| r.name == "probe" && r.upstream_dataset == "idx:data/test"));
    let summary = store.get_sweep(first.id).await.unwrap();
    assert_eq!((summary.counts.succeeded, summary.counts.failed), (3, 1));
    assert_eq!(summary.best_top1, Some(0.7));

    // A later sweep with the same task reuses the training results and the downstream
    // trials; one with another task queues that task for the reused results at once.
    let second = NewSweep {
        id: SweepId::new(),
        tasks: vec![
            task(0, "probe again", "linear-probe"),
            task(1, "tune", "finetune"),
        ],
        ..sweep(&[(0.3, Some(&a))], &[0, 1])
    };
    let created = store.create_sweep(&second, at(10.0)).await.unwrap();
    assert_eq!(created.reused_results, 2);
    assert_eq!(
        created.downstream_linked, 4,
        "the two probes linked, two fine-tunes queued"
    );
    let reused = store.downstream_results(second.id).await.unwrap();
    let mut trials: Vec<_> = reused
        .iter()
        .filter(|r| r.kind == "linear-probe")
        .map(|r| r.trial)
        .collect();
    trials.sort();
    let mut before: Vec<_> = records.iter().map(|r| r.trial).collect();
    before.sort();
    assert_eq!(
        trials, before,
        "the same downstream trials, under this sweep's name"
    );
    assert!(reused
        .iter()
        .filter(|r| r.kind == "linear-probe")
        .all(|r| r.name == "probe again"));
    let mut tunes = Vec::new();
    while let Some(lease) = store.claim(worker, LEASE_MS, at(11.0)).await.unwrap() {
        assert_eq!(lease.task, "finetune");
        tunes.push(lease.parent.unwrap());
    }
    tunes.sort();
    let mut parents = vec![seed0.trial, seed1.trial];
    parents.sort();
    assert_eq!(tunes, parents, "one finetune per reused training result");
    // A sweep without tasks sees no downstream columns and uploads no weights.
    let plain = NewSweep {
        id: SweepId::new(),
        ..sweep(&[(0.3, Some(&a))], &[2])
    };
    store.create_sweep(&plain, at(12.0)).await.unwrap();
    let lease = claim(store, worker, at(13.0)).await;
    assert_eq!(
        (lease.task.as_str(), lease.upload_weights),
        ("train", false)
    );
    complete(store, &lease, 0.9, at(14.0)).await;
    assert!(store
        .claim(worker, LEASE_MS, at(15.0))
        .await
        .unwrap()
        .is_none());
    let board = store
        .leaderboard(&LeaderboardFilter {
            sweep: Some(plain.id),
            limit: 10,
            ..LeaderboardFilter::default()
        })
        .await
        .unwrap();
    assert!(board[0].downstream.is_empty());
    assert!(store.downstream_results(plain.id).await.unwrap().is_empty());
}

/// The dashboard's design page reads a design back exactly as written: the architecture JSON
/// byte for byte (its hash is the design's id), every number; an unknown id is not found.
async fn a_stored_design_is_read_back_by_id(store: &Store) {
    let mut stored = design("c", "mbconv", 3_000);
    stored.architecture_json = r#"{"resolution":32,"stages":[{"out":8}],"head":1280}"#.into();
    stored.penalty = 0.25;
    store
        .create_sweep(&sweep(&[(0.3, Some(&stored))], &[0]), at(0.0))
        .await
        .unwrap();
    assert_eq!(store.get_design(&stored.id).await.unwrap(), stored);
    let unknown = DesignId("f".repeat(64));
    match store.get_design(&unknown).await.unwrap_err() {
        StoreError::NotFound { what, id } => assert_eq!((what, id), ("design", unknown.0)),
        other => panic!("expected not found, got {other:?}"),
    }
}

/// On PostgreSQL a completion that must queue downstream trials while a sweep-level change
/// holds the sweep lock does not wait for it (it holds the trial's row, which such a change
/// may want next): it fails, committing nothing, and the store calls it again until the lock
/// is free. Here another session holds the lock for 300 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_completion_retries_while_a_sweep_change_holds_the_lock() {
    let db = TestDb::postgres().await;
    let store = db.store.clone();
    let url = db.url.clone().expect("a PostgreSQL database");
    let outcome = tokio::spawn(async move {
        let a = design("a", "basic", 1_000);
        let first = NewSweep {
            tasks: vec![task(0, "probe", "linear-probe")],
            ..sweep(&[(0.3, Some(&a))], &[0])
        };
        store.create_sweep(&first, at(0.0)).await.unwrap();
        let worker = worker(&store, at(0.0)).await;
        let lease = claim(&store, worker, at(1.0)).await;

        let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
        // pg.rs's SWEEPS_LOCK, as sweep creation, cancel, retry and finish take it.
        sqlx::query("SELECT pg_advisory_xact_lock(28258984023384420)")
            .execute(&mut holder)
            .await
            .unwrap();
        let release = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
        });
        let started = std::time::Instant::now();
        assert_eq!(
            complete(&store, &lease, 0.8, at(2.0)).await,
            CompleteOutcome::Recorded
        );
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(250),
            "the completion waited for the lock: {:?}",
            started.elapsed()
        );
        release.await.unwrap();
        let probe = claim(&store, worker, at(3.0)).await;
        assert_eq!(
            (probe.task.as_str(), probe.parent),
            ("linear-probe", Some(lease.trial))
        );
        // A sweep without tasks completes without the lock, even while it is held.
        let plain = NewSweep {
            id: SweepId::new(),
            ..sweep(&[(0.3, Some(&a))], &[7])
        };
        store.create_sweep(&plain, at(4.0)).await.unwrap();
        let lease = claim(&store, worker, at(5.0)).await;
        let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
        sqlx::query("SELECT pg_advisory_xact_lock(28258984023384420)")
            .execute(&mut holder)
            .await
            .unwrap();
        // (Were the lock needed, the store would give up after its retries and fail.)
        assert_eq!(
            complete(&store, &lease, 0.7, at(6.0)).await,
            CompleteOutcome::Recorded
        );
        sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    })
    .await;
    db.remove().await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

/// Two coordinators on one PostgreSQL database (two stores, each with its own pool and claim
/// and completion queues): their workers still never share a trial and lose no result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_coordinators_share_one_queue() {
    let db = TestDb::postgres().await;
    let url = db.url.clone().expect("a PostgreSQL database");
    let first = db.store.clone();
    let outcome = tokio::spawn(async move {
        let second = Store::connect_with(&url, &test_pool()).await.unwrap();
        workers_share_out_a_sweep(&[first, second.clone()]).await;
        second.close().await;
    })
    .await;
    db.remove().await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}
