//! The worker loop against a real coordinator on 127.0.0.1:0 (SQLite store in a temp dir):
//! lease, heartbeat, complete; cancellation stops training; shutdown hands the trial back.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deepmad_coordinator::app;
use deepmad_coordinator::service::Coordinator;
use deepmad_coordinator::settings::{self, Overrides};
use deepmad_coordinator::store::LeaderboardFilter;
use deepmad_coordinator::sweep::SweepSpec;
use deepmad_worker::client::{self, ClientConfig};
use deepmad_worker::data::idx;
use deepmad_worker::DeviceSpec;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Writes a tiny MNIST-style dataset: 8x8 images whose class is the bright row.
fn write_dataset(folder: &Path) {
    let (count, side) = (128u32, 8u32);
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for index in 0..count {
        let class = (index % 4) as u8;
        labels.push(class);
        for row in 0..side {
            for _ in 0..side {
                images.push(if row as u8 == class * 2 {
                    250
                } else {
                    (index * 7 % 40) as u8
                });
            }
        }
    }
    std::fs::create_dir_all(folder).unwrap();
    for prefix in ["train", "t10k"] {
        let image_file = idx::encode(&[count, side, side], &images);
        let label_file = idx::encode(&[count], &labels);
        std::fs::write(
            folder.join(format!("{prefix}-images-idx3-ubyte")),
            image_file,
        )
        .unwrap();
        std::fs::write(
            folder.join(format!("{prefix}-labels-idx1-ubyte")),
            label_file,
        )
        .unwrap();
    }
}

struct Setup {
    address: String,
    coordinator: Arc<Coordinator>,
    shutdown: CancellationToken,
    dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn setup(epochs: u32, seeds: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(&dir.path().join("data"));
    let env = [
        ("DEEPMAD__LEASE__LEASE_MS", "2000"),
        ("DEEPMAD__LEASE__HEARTBEAT_INTERVAL_MS", "100"),
        ("DEEPMAD__LEASE__REAPER_INTERVAL_MS", "500"),
        ("DEEPMAD__RETRY__BACKOFF_BASE_MS", "10"),
        ("DEEPMAD__RETRY__BACKOFF_MAX_MS", "20"),
    ];
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        database_url: Some(format!(
            "sqlite://{}",
            dir.path().join("deepmad.db").display()
        )),
    };
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let settings = settings::load(None, env, &overrides).unwrap();
    let listener = TcpListener::bind(settings.listen).await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let coordinator = app::open(&settings, shutdown.clone()).await.unwrap();
    let serving = coordinator.clone();
    let token = shutdown.clone();
    tokio::spawn(async move {
        app::run(&settings, serving, listener, None, token)
            .await
            .unwrap()
    });
    let spec = format!(
        "name = \"client test\"\ndataset = \"idx:{}\"\nseeds = {seeds}\n\
         [grid]\nblock = [\"basic\"]\nrho = [0.5]\nbudget = [{{ params = \"10K\" }}]\nresolution = 8\nnum_classes = 4\nin_channels = 1\n\
         [recipe]\nepochs = {epochs}\nwarmup_epochs = 0\nbatch_size = 32\neval_batch_size = 64\nlr = 0.05\nmixup_alpha = 0.0\nrandom_erase_prob = 0.0\nhflip_prob = 0.0\ncrop_padding = 0\n",
        dir.path().join("data").display()
    );
    coordinator
        .create_sweep(SweepSpec::from_toml(&spec).unwrap(), "test")
        .await
        .unwrap();
    Setup {
        address,
        coordinator,
        shutdown,
        dir,
    }
}

fn config(setup: &Setup, max_trials: Option<u32>) -> ClientConfig {
    ClientConfig {
        coordinator: setup.address.clone(),
        token: None,
        device: DeviceSpec::Cpu,
        name: "test worker".into(),
        work_dir: setup.dir.path().join("work"),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        max_trials,
    }
}

async fn wait_until_running(coordinator: &Coordinator) {
    for _ in 0..400 {
        let sweeps = coordinator.list_sweeps(10).await.unwrap();
        if sweeps[0].counts.running > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no trial started running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_trains_every_trial_and_reports_it() {
    let setup = setup(10, "[0, 1]").await;
    let summary = client::run(config(&setup, Some(2)), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(summary.trials_completed, 2, "{summary:?}");
    let board = setup
        .coordinator
        .leaderboard(&LeaderboardFilter::default())
        .await
        .unwrap();
    assert_eq!(board.len(), 1);
    assert_eq!(board[0].seeds, 2);
    // The bright row gives the class away: ten short epochs learn it well above chance (25%).
    assert!(board[0].top1_mean > 0.5, "top-1 {}", board[0].top1_mean);
    let sweep = &setup.coordinator.list_sweeps(1).await.unwrap()[0];
    assert_eq!(sweep.counts.succeeded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_sweep_stops_training_at_the_next_heartbeat() {
    let setup = setup(400, "[0]").await;
    let worker = tokio::spawn(client::run(
        config(&setup, Some(1)),
        CancellationToken::new(),
    ));
    wait_until_running(&setup.coordinator).await;
    let sweep = setup.coordinator.list_sweeps(1).await.unwrap()[0].id;
    setup.coordinator.cancel_sweep(sweep).await.unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("the worker stops promptly")
        .unwrap()
        .unwrap();
    assert_eq!(summary.trials_stopped, 1, "{summary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_the_trial_back_for_another_worker() {
    let setup = setup(400, "[0]").await;
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(client::run(config(&setup, None), shutdown.clone()));
    wait_until_running(&setup.coordinator).await;
    shutdown.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("the worker drains promptly")
        .unwrap()
        .unwrap();
    assert_eq!(summary.trials_stopped, 1, "{summary:?}");
    let counts = setup.coordinator.list_sweeps(1).await.unwrap()[0].counts;
    assert_eq!(
        (counts.queued, counts.running),
        (1, 0),
        "the trial is queued again: {counts:?}"
    );
}
