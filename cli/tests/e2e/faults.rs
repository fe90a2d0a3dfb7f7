//! Faults of real processes: SIGKILL of a worker, SIGTERM and restart of the coordinator,
//! SIGSTOP of a worker past its lease, and a sweep cancelled while its trials train.

use deepmad_proto::v1;

use super::checks::{self, attempts_of, running_with_progress, trials_of};
use super::data::{sweep_toml, write_dataset, SweepShape};
use super::harness::{one_at_a_time, wait_for, Cluster, PATIENCE};
use super::postgres::{shared_admin_url, TestDatabase};

/// A trial of a few seconds: long enough to be caught in the middle, short enough to finish.
const MEDIUM: SweepShape<'static> = SweepShape {
    name: "medium",
    seeds: &[0],
    rho: &[0.5],
    params: &["10K"],
    epochs: 6,
    batch_size: 32,
    eval_batch_size: 256,
};
const MEDIUM_TRAIN_IMAGES: u32 = 512;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_its_lease_and_another_worker_finishes_the_trial() {
    let _turn = one_at_a_time().await;
    let database = TestDatabase::create(&shared_admin_url()).await;
    let mut cluster = Cluster::new(&database.url, &[]);
    cluster.start_coordinator().await;
    write_dataset(&cluster.path("data"), MEDIUM_TRAIN_IMAGES, 128);
    let created = cluster.create_sweep(&sweep_toml(&cluster.path("data"), &MEDIUM));
    assert_eq!(created.trials, 1, "{created:?}");
    let pool = &cluster.sql().await;
    let trial = trials_of(pool, &created.id).await.remove(0);

    let a = cluster.start_worker("a");
    let a_id = cluster.worker_id(a).await;
    wait_for("worker a to be in the middle of the trial", || async move {
        (!running_with_progress(pool, 1).await.is_empty()).then_some(())
    })
    .await;
    cluster.workers[a].kill_hard();
    let b = cluster.start_worker("b");
    let b_id = cluster.worker_id(b).await;

    let summary = cluster.wait_sweep_done(&created.id).await;
    assert_eq!(
        summary.counts.unwrap_or_default().succeeded,
        1,
        "{summary:?}"
    );
    let attempts = attempts_of(pool, &trial).await;
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(
        (&attempts[0].worker, attempts[0].state.as_str()),
        (&a_id, "expired"),
        "the killed worker's lease expired: {attempts:#?}"
    );
    assert_eq!(attempts[0].failure_class.as_deref(), Some("lost"));
    assert_eq!(
        (&attempts[1].worker, attempts[1].state.as_str()),
        (&b_id, "succeeded"),
        "{attempts:#?}"
    );
    assert_eq!(
        checks::results(pool).await,
        vec![(trial.clone(), attempts[1].id.clone())],
        "exactly one result, from worker b"
    );
    assert!(checks::late_results(pool).await.is_empty());
    let history = cluster.cli_ok(&["trial", &trial]);
    assert!(history.contains("result: top-1"), "{history}");
    assert!(!history.contains("late report"), "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_restarts_mid_sweep_and_no_result_is_lost_or_duplicated() {
    let _turn = one_at_a_time().await;
    let database = TestDatabase::create(&shared_admin_url()).await;
    // The grace a restarted coordinator gives running leases: well past the time its
    // workers need to reach it again, however loaded the machine.
    let mut cluster = Cluster::new(&database.url, &[("DEEPMAD__LEASE__GRACE_MS", "5000")]);
    cluster.start_coordinator().await;
    write_dataset(&cluster.path("data"), 256, 128);
    let seeds = [0, 1, 2, 3, 4, 5];
    let shape = SweepShape {
        seeds: &seeds,
        epochs: 6,
        ..MEDIUM
    };
    let created = cluster.create_sweep(&sweep_toml(&cluster.path("data"), &shape));
    assert_eq!(created.trials, 6, "{created:?}");
    cluster.start_worker("a");
    cluster.start_worker("b");
    let (api, id) = (&cluster.api(), created.id.as_str());
    // In the middle: a result in, a trial training, a trial still queued.
    wait_for("the sweep to be half-way", || async move {
        let counts = api.sweep(id).await.ok()?.counts?;
        (counts.succeeded >= 1 && counts.running >= 1 && counts.queued >= 1).then_some(())
    })
    .await;
    let logged_before: Vec<usize> = cluster.workers.iter().map(|w| w.log_text().len()).collect();

    cluster.coordinator().signal("TERM");
    let status = cluster.coordinator().wait_exit(PATIENCE).await;
    assert!(
        status.success(),
        "the coordinator drains on SIGTERM: {status}"
    );
    let pool = &cluster.sql().await;
    let before = checks::results(pool).await;
    let running = checks::count(pool, "attempts WHERE state = 'running'").await;
    // Down for longer than a lease: every running lease lapses, and every worker notices
    // (a heartbeat, lease or report that fails).
    wait_for("every running lease to lapse", || async move {
        let live = "attempts WHERE state = 'running' AND lease_expires_at >= now()";
        (checks::count(pool, live).await == 0).then_some(())
    })
    .await;
    for (worker, logged) in cluster.workers.iter().zip(logged_before) {
        wait_for(&format!("{} to notice", worker.name), || {
            let since = worker.log_text().split_off(logged);
            let noticed = ["lease failed", "heartbeat failed", "not delivered"]
                .iter()
                .any(|warning| since.contains(warning));
            std::future::ready(noticed.then_some(()))
        })
        .await;
    }
    cluster.start_coordinator().await;
    if running > 0 {
        let log = cluster.coordinator().log_text();
        assert!(
            log.contains("running leases given a grace period"),
            "{running} leases were running across the restart"
        );
    }

    let summary = cluster.wait_sweep_done(id).await;
    assert_eq!(
        summary.counts.unwrap_or_default().succeeded,
        6,
        "{summary:?}"
    );
    let summaries = cluster.stop_workers().await;
    let after = checks::results(pool).await;
    let with_result: Vec<String> = after.iter().map(|(trial, _)| trial.clone()).collect();
    assert_eq!(
        with_result,
        trials_of(pool, id).await,
        "one result per trial"
    );
    assert!(
        before.iter().all(|result| after.contains(result)),
        "results from before the restart are kept"
    );
    assert!(
        after.len() > before.len(),
        "the workers reported to the restarted coordinator"
    );
    // The grace kept every lease across the downtime: nothing expired, nothing was trained
    // twice, and each training a worker finished is the result of its trial.
    let expired = checks::count(pool, "attempts WHERE state = 'expired'").await;
    assert_eq!(expired, 0, "leases expired across the restart");
    assert_eq!(checks::late_results(pool).await, []);
    let completed: u32 = summaries.iter().map(|[completed, _, _]| completed).sum();
    assert_eq!(completed as usize, after.len(), "workers {summaries:?}");
}

/// A trial that trains two batches, then evaluates for seconds: training stops only between
/// batches, so a worker paused during that evaluation finishes it when resumed, whatever the
/// coordinator says, and reports a result that comes too late.
const LONG_EVALUATION: SweepShape<'static> = SweepShape {
    name: "long evaluation",
    seeds: &[0],
    rho: &[0.5],
    params: &["10K"],
    epochs: 1,
    batch_size: 32,
    eval_batch_size: 2048,
};
const LONG_EVALUATION_TEST_IMAGES: u32 = 30_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_is_fenced_out_and_its_late_result_is_kept_but_not_counted() {
    let _turn = one_at_a_time().await;
    let database = TestDatabase::create(&shared_admin_url()).await;
    let mut cluster = Cluster::new(&database.url, &[]);
    cluster.start_coordinator().await;
    write_dataset(&cluster.path("data"), 64, LONG_EVALUATION_TEST_IMAGES);
    let created = cluster.create_sweep(&sweep_toml(&cluster.path("data"), &LONG_EVALUATION));
    assert_eq!(created.trials, 1, "{created:?}");
    let pool = &cluster.sql().await;
    let trial = trials_of(pool, &created.id).await.remove(0);

    let a = cluster.start_worker("a");
    let a_id = cluster.worker_id(a).await;
    // Both batches trained (64 images, batch 32): worker a is evaluating.
    let evaluating = wait_for("worker a to finish its batches", || async move {
        running_with_progress(pool, 2).await.pop()
    })
    .await;
    cluster.workers[a].signal("STOP");
    assert!(
        checks::results(pool).await.is_empty(),
        "worker a finished before it was paused: make the evaluation longer"
    );

    // Its heartbeats stop: the lease expires and the attempt is fenced out.
    let trial = trial.as_str();
    wait_for("worker a's lease to expire", || async move {
        let attempts = attempts_of(pool, trial).await;
        let state = attempts[0].state.as_str();
        assert_ne!(state, "succeeded", "worker a finished before it was paused");
        (state == "expired").then_some(())
    })
    .await;
    let b = cluster.start_worker("b");
    let b_id = cluster.worker_id(b).await;
    cluster.wait_sweep_done(&created.id).await;
    let attempts = attempts_of(pool, trial).await;
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(attempts[0].id, evaluating.id);
    assert_eq!(
        (&attempts[0].worker, attempts[0].state.as_str()),
        (&a_id, "expired")
    );
    assert_eq!(
        (&attempts[1].worker, attempts[1].state.as_str()),
        (&b_id, "succeeded")
    );

    // Resumed, worker a finishes its evaluation and reports: kept as late.
    cluster.workers[a].signal("CONT");
    let late = wait_for("worker a's late report", || async move {
        checks::late_results(pool).await.pop()
    })
    .await;
    assert_eq!(late, (trial.to_string(), attempts[0].id.clone()));
    assert_eq!(
        checks::results(pool).await,
        vec![(trial.to_string(), attempts[1].id.clone())],
        "the trial's result is worker b's, once"
    );
    let seeds: i32 = sqlx::query_scalar("SELECT seeds FROM design_scores")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(seeds, 1, "the late result is not aggregated");
    let board = cluster.cli_json(&["leaderboard", "--sweep", &created.id, "--format", "json"]);
    assert_eq!(board[0]["seeds"], 1, "{board:#}");
    let history = cluster.cli_ok(&["trial", trial]);
    let short = &attempts[0].id[..8];
    assert!(
        history.contains(&format!(
            "late report from attempt {short} (kept, not counted)"
        )),
        "{history}"
    );
    assert!(history.contains("result: top-1"), "{history}");
    let summaries = cluster.stop_workers().await;
    assert_eq!(
        summaries[a][0], 1,
        "worker a trained to the end: {summaries:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_sweep_stops_its_workers_at_their_next_heartbeat() {
    let _turn = one_at_a_time().await;
    let database = TestDatabase::create(&shared_admin_url()).await;
    let mut cluster = Cluster::new(&database.url, &[]);
    cluster.start_coordinator().await;
    write_dataset(&cluster.path("data"), 256, 64);
    // Far more epochs than any test waits for: only the cancellation can end these trials.
    let shape = SweepShape {
        seeds: &[0, 1],
        epochs: 5_000,
        ..MEDIUM
    };
    let created = cluster.create_sweep(&sweep_toml(&cluster.path("data"), &shape));
    assert_eq!(created.trials, 2, "{created:?}");
    cluster.start_worker("a");
    cluster.start_worker("b");
    let pool = &cluster.sql().await;
    wait_for("both trials to train", || async move {
        (running_with_progress(pool, 1).await.len() == 2).then_some(())
    })
    .await;

    let shown = cluster.cli_ok(&["sweep", "cancel", &created.id]);
    assert!(shown.contains(", cancelled"), "{shown}");
    for index in 0..2 {
        cluster
            .wait_log(Some(index), "sweep cancelled; training stopped")
            .await;
    }
    for trial in trials_of(pool, &created.id).await {
        let attempts = attempts_of(pool, &trial).await;
        let states: Vec<&str> = attempts.iter().map(|a| a.state.as_str()).collect();
        assert_eq!(states, ["cancelled"], "{attempts:#?}");
    }
    // Stopped attempts put their trials back in the queue, where only another sweep that
    // needs them could lease them again.
    let queued = checks::count(pool, "trials WHERE state = 'queued' AND active_sweeps = 0").await;
    assert_eq!(queued, 2);
    assert_eq!(checks::count(pool, "results").await, 0);
    let summary = cluster.api().sweep(&created.id).await.unwrap();
    assert_eq!(
        summary.state,
        v1::SweepState::Cancelled as i32,
        "{summary:?}"
    );
    // The workers live on, idle: nothing of a cancelled sweep is leased again.
    let summaries = cluster.stop_workers().await;
    assert_eq!(summaries, [[0, 0, 1], [0, 0, 1]]);
    assert_eq!(checks::count(pool, "attempts").await, 2);
}
