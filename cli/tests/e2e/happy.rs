//! The happy path: a coordinator and two workers run a small sweep to a full leaderboard.

use std::collections::HashSet;

use super::data::{sweep_toml, write_dataset, SweepShape};
use super::harness::{one_at_a_time, Cluster, PATIENCE};
use super::postgres::{shared_admin_url, TestDatabase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_run_a_sweep_to_a_full_leaderboard() {
    let _turn = one_at_a_time().await;
    let database = TestDatabase::create(&shared_admin_url()).await;
    let mut cluster = Cluster::new(&database.url, &[]);
    cluster.start_coordinator().await;
    write_dataset(&cluster.path("data"), 128, 128);
    let seeds = [0, 1];
    let shape = SweepShape {
        seeds: &seeds,
        rho: &[0.3, 0.5],
        params: &["10K", "20K"],
        ..SweepShape::default()
    };
    let created = cluster.create_sweep(&sweep_toml(&cluster.path("data"), &shape));
    assert!(
        created.designs >= 2,
        "a leaderboard of several designs: {created:?}"
    );
    assert_eq!(created.trials, created.designs * seeds.len() as u32);
    cluster.start_worker("a");
    cluster.start_worker("b");

    let summary = cluster.wait_sweep_done(&created.id).await;
    let counts = summary.counts.expect("counts are always sent");
    assert_eq!(counts.succeeded, created.trials, "{summary:?}");
    assert_eq!(counts.failed + counts.dead, 0, "{summary:?}");

    let board = cluster.cli_json(&["leaderboard", "--sweep", &created.id, "--format", "json"]);
    let rows = board.as_array().expect("a JSON array");
    assert_eq!(rows.len(), created.designs as usize, "{board:#}");
    let mut previous = f64::INFINITY;
    for row in rows {
        assert_eq!(row["seeds"], seeds.len(), "{row:#}");
        let top1 = row["top1_mean"].as_f64().expect("a number");
        assert!((0.0..=1.0).contains(&top1), "{row:#}");
        assert!(top1 <= previous, "ranked best first: {board:#}");
        previous = top1;
    }

    let results = cluster.cli_json(&["results", "--sweep", &created.id, "--format", "json"]);
    let results = results.as_array().expect("a JSON array");
    let trials: HashSet<&str> = results
        .iter()
        .map(|row| row["trial_id"].as_str().expect("a trial id"))
        .collect();
    assert_eq!(results.len(), created.trials as usize);
    assert_eq!(trials.len(), results.len(), "one row per trial");
    assert!(results.iter().all(|row| row["epochs"] == shape.epochs));

    // Per-epoch curves: one trial's as CSV and JSON, every trial's with `results --curves`.
    let epochs = shape.epochs as usize;
    let first = results[0]["trial_id"].as_str().expect("a trial id");
    let csv = cluster.cli_ok(&["trial", first, "--format", "csv"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("trial_id,design_id,seed,epoch,"),
        "{csv}"
    );
    assert_eq!(lines.len(), 1 + epochs, "{csv}");
    assert!(
        lines[1..].iter().all(|line| line.starts_with(first)),
        "{csv}"
    );
    let history = cluster.cli_json(&["trial", first, "--format", "json"]);
    assert_eq!(history["state"], "succeeded", "{history:#}");
    assert_eq!(history["epochs"].as_array().map(Vec::len), Some(epochs));
    let curves = cluster.cli_ok(&[
        "results",
        "--sweep",
        &created.id,
        "--curves",
        "--format",
        "csv",
    ]);
    assert_eq!(
        curves.lines().count(),
        1 + epochs * results.len(),
        "{curves}"
    );

    let pool = cluster.sql().await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM results")
        .fetch_one(&pool)
        .await
        .unwrap();
    let late: i64 = sqlx::query_scalar("SELECT count(*) FROM late_results")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((stored, late), (i64::from(created.trials), 0));

    // Both workers drain on SIGTERM and account for every trial between them.
    let summaries = cluster.stop_workers().await;
    let completed: u32 = summaries.iter().map(|[completed, _, _]| completed).sum();
    assert_eq!(completed, created.trials, "{summaries:?}");
    cluster.coordinator().signal("TERM");
    let status = cluster.coordinator().wait_exit(PATIENCE).await;
    assert!(
        status.success(),
        "the coordinator drains on SIGTERM: {status}"
    );
}
