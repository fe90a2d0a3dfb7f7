//! The database goes away in the middle of a sweep and comes back: the coordinator says it is
//! unavailable meanwhile, stays up, and the sweep completes with nothing lost.
//!
//! The test runs a PostgreSQL server of its own (`initdb` + `pg_ctl` in a temp dir) so it can
//! stop and start it without touching the shared server.

use super::checks::{self, trials_of};
use super::data::{sweep_toml, write_dataset, SweepShape};
use super::harness::{one_at_a_time, wait_for, Cluster};
use super::postgres::{PrivateServer, TestDatabase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_rides_out_a_database_outage() {
    let _turn = one_at_a_time().await;
    let server = PrivateServer::start();
    let database = TestDatabase::create(&server.admin_url()).await;
    let mut cluster = Cluster::new(&database.url, &[]);
    cluster.start_coordinator().await;
    write_dataset(&cluster.path("data"), 256, 128);
    let shape = SweepShape {
        name: "outage",
        seeds: &[0, 1, 2, 3],
        epochs: 6,
        ..SweepShape::default()
    };
    let created = cluster.create_sweep(&sweep_toml(&cluster.path("data"), &shape));
    assert_eq!(created.trials, 4, "{created:?}");
    cluster.start_worker("a");
    cluster.start_worker("b");
    let (api, id) = (&cluster.api(), created.id.as_str());
    wait_for("the sweep to be half-way", || async move {
        let counts = api.sweep(id).await.ok()?.counts?;
        (counts.succeeded >= 1 && counts.running >= 1).then_some(())
    })
    .await;

    server.pause();
    // A client waits for a connection to the database, then hears UNAVAILABLE (the CLI
    // exits 1: not the caller's fault). The server stays down until it has.
    let shown = cluster.cli(&["sweep", "show", id]);
    assert_eq!(shown.code, Some(1), "{shown:?}");
    assert!(
        shown.stderr.to_lowercase().contains("unavailable"),
        "{shown:?}"
    );
    cluster.wait_log(None, "answering unavailable").await;
    assert!(
        cluster.coordinator().exited().is_none(),
        "the coordinator survives the outage"
    );
    server.resume();

    let summary = cluster.wait_sweep_done(id).await;
    assert_eq!(
        summary.counts.unwrap_or_default().succeeded,
        4,
        "{summary:?}"
    );
    let summaries = cluster.stop_workers().await;
    let pool = &cluster.sql().await;
    let results = checks::results(pool).await;
    let with_result: Vec<String> = results.iter().map(|(trial, _)| trial.clone()).collect();
    assert_eq!(
        with_result,
        trials_of(pool, id).await,
        "one result per trial"
    );
    // Leases that ran out during the outage get a grace period when the database is back, so
    // no training is fenced out for the outage: nothing is late, nothing trained twice.
    let late = checks::late_results(pool).await;
    assert!(late.is_empty(), "late results after the outage: {late:?}");
    let completed: u32 = summaries.iter().map(|[completed, _, _]| completed).sum();
    assert_eq!(
        completed as usize,
        results.len() + late.len(),
        "every finished training is stored once: workers {summaries:?}, late {late:?}"
    );
}
