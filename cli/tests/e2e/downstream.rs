//! Downstream evaluations: a sweep names a linear probe and a fine-tune on a second dataset
//! with its own classes; each training trial that succeeds queues one trial per task, which
//! any worker leases (two workers with separate work dirs, so the trained weights travel
//! through the coordinator), and their results become leaderboard columns.

use std::collections::HashSet;

use super::data::{sweep_toml, write_dataset, write_halves_dataset, SweepShape};
use super::harness::{one_at_a_time, Cluster};
use super::postgres::{shared_admin_url, TestDatabase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_evaluations_run_as_leased_jobs_from_the_trained_weights() {
    let _turn = one_at_a_time().await;
    let database = TestDatabase::create(&shared_admin_url()).await;
    let mut cluster = Cluster::new(&database.url, &[]);
    cluster.start_coordinator().await;
    write_dataset(&cluster.path("data"), 128, 64);
    write_halves_dataset(&cluster.path("halves"), 96, 32);
    let shape = SweepShape {
        name: "downstream",
        seeds: &[0, 1],
        ..SweepShape::default()
    };
    let halves = cluster.path("halves");
    let toml = format!(
        "{}\n[[downstream]]\nname = \"probe\"\ntask = \"linear-probe\"\n\
         dataset = \"idx:{halves}\"\nrecipe = {{ epochs = 2, lr = 0.1 }}\n\n\
         [[downstream]]\ntask = \"finetune\"\ndataset = \"idx:{halves}\"\n\
         recipe = {{ epochs = 1, lr = 0.02 }}\n",
        sweep_toml(&cluster.path("data"), &shape),
        halves = halves.display(),
    );
    let created = cluster.create_sweep(&toml);
    assert_eq!((created.designs, created.trials), (1, 2), "{created:?}");
    cluster.start_worker("a");
    cluster.start_worker("b");

    let summary = cluster.wait_sweep_done(&created.id).await;
    let counts = summary.counts.expect("counts are always sent");
    assert_eq!(
        (counts.succeeded, counts.failed, counts.dead),
        (2 + 2 * 2, 0, 0),
        "two trainings, then a probe and a fine-tune of each: {summary:?}"
    );

    // The leaderboard: one row (one design, two seeds), one column per task.
    let board = cluster.cli_json(&["leaderboard", "--sweep", &created.id, "--format", "json"]);
    let rows = board.as_array().expect("a JSON array");
    assert_eq!(rows.len(), 1, "{board:#}");
    assert_eq!(rows[0]["seeds"], 2, "{board:#}");
    let tasks = rows[0]["downstream"]
        .as_array()
        .expect("downstream columns");
    let names: Vec<&str> = tasks.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["probe", "finetune"], "{board:#}");
    for task in tasks {
        assert_eq!(task["seeds"], 2, "{board:#}");
        let top1 = task["top1_mean"].as_f64().expect("a number");
        assert!((0.0..=1.0).contains(&top1), "{board:#}");
    }
    let table = cluster.cli_ok(&["leaderboard", "--sweep", &created.id]);
    assert!(table.lines().next().unwrap().contains("probe %"), "{table}");
    let csv = cluster.cli_ok(&["leaderboard", "--sweep", &created.id, "--format", "csv"]);
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",probe_top1_mean,finetune_top1_mean"),
        "{csv}"
    );

    // Per (trial, task): each downstream trial names the training trial it started from.
    let results = cluster.cli_json(&["results", "--sweep", &created.id, "--format", "json"]);
    let trained: HashSet<&str> = results
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|row| row["trial_id"].as_str().unwrap())
        .collect();
    assert_eq!(trained.len(), 2, "training results only: {results:#}");
    let downstream = cluster.cli_json(&[
        "results",
        "--sweep",
        &created.id,
        "--downstream",
        "--format",
        "json",
    ]);
    let downstream = downstream.as_array().expect("a JSON array");
    assert_eq!(downstream.len(), 4, "{downstream:#?}");
    for row in downstream {
        assert_eq!(row["state"], "succeeded", "{row:#}");
        assert!(
            trained.contains(row["parent_trial_id"].as_str().unwrap()),
            "{row:#}"
        );
        assert_eq!(row["dataset"], format!("idx:{}", halves.display()));
    }
    let epochs = |name: &str| {
        downstream
            .iter()
            .filter(|row| row["name"] == name)
            .map(|row| row["epochs"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        epochs("probe"),
        [2, 2],
        "the task's recipe overrides the sweep's"
    );
    assert_eq!(epochs("finetune"), [1, 1]);

    // Upstream against downstream ranking, per task (one design: no tau).
    let analytics = cluster.cli_json(&["analytics", "--sweep", &created.id, "--format", "json"]);
    let agreement = analytics["downstream"].as_array().expect("rank agreement");
    assert_eq!(agreement.len(), 2, "{analytics:#}");
    assert_eq!(agreement[0]["designs"], 1, "{analytics:#}");

    // The weights went through the coordinator: one upload per training trial, and each
    // downstream trial's worker fetched them into its own work dir.
    let uploads = std::fs::read_dir(cluster.path("deepmad-weights"))
        .expect("the coordinator's weights dir")
        .count();
    assert_eq!(uploads, 2);
    let pool = cluster.sql().await;
    let (children, with_epochs): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE EXISTS ( \
             SELECT 1 FROM epoch_metrics e WHERE e.trial_id = t.id)) \
         FROM trials t WHERE t.parent_trial_id IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (children, with_epochs),
        (4, 4),
        "curves are kept for downstream trials too"
    );
    let fetched: usize = ["a", "b"]
        .iter()
        .filter_map(|name| std::fs::read_dir(cluster.path(&format!("work-{name}/weights"))).ok())
        .map(|dir| dir.count())
        .sum();
    assert!(
        fetched >= 2,
        "each trained backbone was fetched by some worker"
    );
}
