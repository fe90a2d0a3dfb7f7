//! `deepmad run`: the whole loop in one process on an embedded SQLite file. A sweep runs to a
//! leaderboard; Ctrl-C (SIGINT) mid-sweep exits 130 with the sweep resumable; the same command
//! then resumes it (finished trials kept, the rest trained) and a third run trains nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::data::{sweep_toml, write_dataset, SweepShape};
use super::harness::{one_at_a_time, DEEPMAD, PATIENCE};
use super::process::Process;

fn run_command(dir: &Path, spec: &Path) -> Command {
    let mut command = Command::new(DEEPMAD);
    command
        .current_dir(dir)
        .arg("run")
        .arg(spec)
        .args(["--database", "sqlite://results.db", "--device", "cpu"])
        .args(["--work-dir", "work", "--threads", "1", "--format", "json"])
        .env_remove("DEEPMAD_COORDINATOR")
        .env_remove("DEEPMAD_TOKEN")
        .env("RUST_LOG", "warn");
    command
}

/// Returns the design ids and seed counts of the JSON leaderboard at the end of the output.
fn leaderboard(out: &str) -> Vec<(String, u64)> {
    let start = out.find("\n[").map_or(0, |at| at + 1);
    let rows: serde_json::Value = serde_json::from_str(&out[start..])
        .unwrap_or_else(|error| panic!("no JSON leaderboard ({error}) in:\n{out}"));
    rows.as_array()
        .expect("a JSON array")
        .iter()
        .map(|row| {
            (
                row["design_id"].as_str().expect("design_id").to_string(),
                row["seeds"].as_u64().expect("seeds"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_trains_a_sweep_resumes_after_ctrl_c_and_reuses_finished_work() {
    let _turn = one_at_a_time().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let data = dir.path().join("data");
    write_dataset(&data, 512, 128);
    let spec = dir.path().join("sweep.toml");
    let shape = SweepShape {
        name: "embedded",
        seeds: &[0, 1],
        rho: &[0.3, 1.0],
        epochs: 4,
        ..SweepShape::default()
    };
    std::fs::write(&spec, sweep_toml(&data, &shape)).expect("writing the sweep");

    // First run: interrupted once training is under way.
    let mut first = Process::spawn("run-1", run_command(dir.path(), &spec), dir.path());
    let checkpoints = dir.path().join("work").join("checkpoints");
    let started = std::time::Instant::now();
    while !checkpoints.exists() || std::fs::read_dir(&checkpoints).unwrap().next().is_none() {
        assert!(
            first.exited().is_none(),
            "run ended before training:\n{}",
            first.tail(40)
        );
        assert!(
            started.elapsed() < PATIENCE,
            "no checkpoint written:\n{}",
            first.tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.signal("INT");
    let status = first.wait_exit(PATIENCE).await;
    assert_eq!(status.code(), Some(130), "{}", first.tail(40));
    assert!(
        first
            .log_text()
            .contains("run the same command again to resume"),
        "{}",
        first.tail(40)
    );

    // Second run: resumes the same sweep and finishes it.
    let mut second = Process::spawn("run-2", run_command(dir.path(), &spec), dir.path());
    let status = second.wait_exit(PATIENCE * 2).await;
    assert!(status.success(), "{}", second.tail(60));
    let out = second.out_text();
    assert!(out.contains("resuming sweep"), "{out}");
    let board = leaderboard(&out);
    assert!(!board.is_empty(), "{out}");
    assert!(
        board.iter().all(|(_, seeds)| *seeds == 2),
        "every design has both seeds: {board:?}"
    );

    // Third run: nothing left to train; the same leaderboard.
    let mut third = Process::spawn("run-3", run_command(dir.path(), &spec), dir.path());
    let status = third.wait_exit(PATIENCE).await;
    assert!(status.success(), "{}", third.tail(60));
    let out = third.out_text();
    assert!(out.contains("resuming sweep"), "{out}");
    assert_eq!(leaderboard(&out), board);
}

#[tokio::test]
async fn run_refuses_a_bad_sweep_file_with_exit_2_and_writes_no_database() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let spec = dir.path().join("sweep.toml");
    std::fs::write(&spec, "name = \"bad\"\n[grid]\nrho = [-1.0]\n").expect("writing");
    let output = run_command(dir.path(), &spec)
        .output()
        .expect("deepmad runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sweep.toml"), "{stderr}");
    assert!(!dir.path().join("results.db").exists(), "nothing written");
}
