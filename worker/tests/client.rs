//! The worker loop against a real coordinator on 127.0.0.1:0 (SQLite store in a temp dir):
//! lease, heartbeat, complete; cancellation stops training; shutdown hands the trial back; a
//! coordinator that forgot the worker (restored database) is registered with again.

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
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Writes a tiny MNIST-style dataset: 8x8 images whose class is the bright row.
fn write_dataset(folder: &Path) {
    idx::write_synthetic(folder, 128, 128).unwrap();
}

struct Setup {
    address: String,
    coordinator: Arc<Coordinator>,
    shutdown: CancellationToken,
    /// Ends once the coordinator stopped serving and let go of its port.
    serving: Option<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Serves a coordinator on the SQLite file in `dir` (made on first use) at 127.0.0.1:0.
async fn serve(dir: &Path) -> (String, Arc<Coordinator>, CancellationToken) {
    let (address, coordinator, shutdown, _) = serve_at(dir, "127.0.0.1:0").await;
    (address, coordinator, shutdown)
}

/// Serves a coordinator on the SQLite file in `dir` (made on first use) at `listen`; the
/// handle ends once it has stopped serving.
async fn serve_at(
    dir: &Path,
    listen: &str,
) -> (String, Arc<Coordinator>, CancellationToken, JoinHandle<()>) {
    let env = [
        ("DEEPMAD__LEASE__LEASE_MS", "2000"),
        ("DEEPMAD__LEASE__HEARTBEAT_INTERVAL_MS", "100"),
        ("DEEPMAD__LEASE__REAPER_INTERVAL_MS", "500"),
        ("DEEPMAD__RETRY__BACKOFF_BASE_MS", "10"),
        ("DEEPMAD__RETRY__BACKOFF_MAX_MS", "20"),
    ];
    let overrides = Overrides {
        listen: Some(listen.into()),
        database_url: Some(format!("sqlite://{}", dir.join("deepmad.db").display())),
    };
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let settings = settings::load(None, env, &overrides).unwrap();
    let listener = TcpListener::bind(settings.listen).await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let coordinator = app::open(&settings, shutdown.clone()).await.unwrap();
    let serving = coordinator.clone();
    let token = shutdown.clone();
    let served = tokio::spawn(async move {
        app::run(&settings, serving, listener, None, token)
            .await
            .unwrap()
    });
    (address, coordinator, shutdown, served)
}

async fn setup(epochs: u32, seeds: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(&dir.path().join("data"));
    let (address, coordinator, shutdown, serving) = serve_at(dir.path(), "127.0.0.1:0").await;
    create_sweep(&coordinator, &dir.path().join("data"), epochs, seeds).await;
    Setup {
        address,
        coordinator,
        shutdown,
        serving: Some(serving),
        dir,
    }
}

/// Creates a sweep of one design on the dataset in `data`, one trial per seed.
async fn create_sweep(coordinator: &Coordinator, data: &Path, epochs: u32, seeds: &str) {
    let spec = format!(
        "name = \"client test\"\ndataset = \"idx:{}\"\nseeds = {seeds}\n\
         [grid]\nblock = [\"basic\"]\nrho = [0.5]\nbudget = [{{ params = \"10K\" }}]\nresolution = 8\nnum_classes = 4\nin_channels = 1\n\
         [recipe]\nepochs = {epochs}\nwarmup_epochs = 0\nbatch_size = 32\neval_batch_size = 64\nlr = 0.05\nmixup_alpha = 0.0\nrandom_erase_prob = 0.0\nhflip_prob = 0.0\ncrop_padding = 0\n",
        data.display()
    );
    coordinator
        .create_sweep(SweepSpec::from_toml(&spec).unwrap(), "test")
        .await
        .unwrap();
}

fn config(setup: &Setup, max_trials: Option<u32>) -> ClientConfig {
    ClientConfig {
        coordinator: setup.address.clone(),
        token: None,
        ca_cert: None,
        device: DeviceSpec::Cpu,
        name: "test worker".into(),
        work_dir: setup.dir.path().join("work"),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        max_trials,
        status: None,
        call_timeout: client::DEFAULT_CALL_TIMEOUT,
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

async fn wait_until_succeeded(coordinator: &Coordinator, trials: u32) {
    for _ in 0..1200 {
        let sweeps = coordinator.list_sweeps(10).await.unwrap();
        if sweeps[0].counts.succeeded >= trials {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("fewer than {trials} trials succeeded");
}

/// Issue 24, item 4: a coordinator restored from a backup taken before a worker registered
/// answers its every lease with "worker not found"; the worker used to retry that forever and
/// train nothing. Here the coordinator comes back on the same port with a fresh database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_registers_again_with_a_coordinator_that_forgot_it() {
    let mut setup = setup(2, "[0]").await;
    let worker = tokio::spawn(client::run(
        config(&setup, Some(2)),
        CancellationToken::new(),
    ));
    // A finished trial proves the worker registered with the first database.
    wait_until_succeeded(&setup.coordinator, 1).await;
    setup.shutdown.cancel();
    setup.serving.take().expect("serving").await.unwrap();

    let restored = tempfile::tempdir().unwrap();
    let listen = setup.address.trim_start_matches("http://");
    let (_, coordinator, shutdown, _) = serve_at(restored.path(), listen).await;
    create_sweep(&coordinator, &setup.dir.path().join("data"), 2, "[0]").await;
    let summary = tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("the worker trains on the restored coordinator")
        .unwrap()
        .unwrap();
    assert_eq!(summary.trials_completed, 2, "{summary:?}");
    let sweep = &coordinator.list_sweeps(1).await.unwrap()[0];
    assert_eq!(sweep.counts.succeeded, 1, "{:?}", sweep.counts);
    shutdown.cancel();
}

/// Issue 24, item 4, mid-trial: the restored coordinator knows neither the worker nor the
/// attempt it is training. The trial stops at the next heartbeat (its result could never be
/// accepted), the worker registers again and trains the restored coordinator's work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_whose_attempt_the_coordinator_forgot_stops_and_the_worker_carries_on() {
    let mut setup = setup(400, "[0]").await;
    let worker = tokio::spawn(client::run(
        config(&setup, Some(2)),
        CancellationToken::new(),
    ));
    wait_until_running(&setup.coordinator).await;
    setup.shutdown.cancel();
    setup.serving.take().expect("serving").await.unwrap();

    let restored = tempfile::tempdir().unwrap();
    let listen = setup.address.trim_start_matches("http://");
    let (_, coordinator, shutdown, _) = serve_at(restored.path(), listen).await;
    create_sweep(&coordinator, &setup.dir.path().join("data"), 2, "[0]").await;
    let summary = tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("the worker trains on the restored coordinator")
        .unwrap()
        .unwrap();
    assert_eq!(
        (summary.trials_stopped, summary.trials_completed),
        (1, 1),
        "{summary:?}"
    );
    let sweep = &coordinator.list_sweeps(1).await.unwrap()[0];
    assert_eq!(sweep.counts.succeeded, 1, "{:?}", sweep.counts);
    shutdown.cancel();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_finished_while_the_coordinator_is_down_is_kept_and_delivered_later() {
    let setup = setup(6, "[0]").await;
    let worker_shutdown = CancellationToken::new();
    let mut worker_config = config(&setup, Some(1));
    worker_config.backoff_max = Duration::from_millis(50);
    let worker = tokio::spawn(client::run(worker_config, worker_shutdown.clone()));
    wait_until_running(&setup.coordinator).await;
    // The coordinator goes away mid-trial; the worker trains on and cannot report.
    setup.shutdown.cancel();
    let pending = setup.dir.path().join("work").join("pending");
    // Give training time to finish and the report to fail at least once, then stop the worker:
    // the result must land on disk, not be dropped.
    let mut finished = false;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if worker.is_finished() {
            break;
        }
        if checkpoint_epochs(&setup) >= 6 {
            finished = true;
            break;
        }
    }
    assert!(finished, "the trial did not finish training");
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker_shutdown.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("the worker exits")
        .unwrap()
        .unwrap();
    assert_eq!(summary.trials_completed, 1, "{summary:?}");
    let kept: Vec<_> = std::fs::read_dir(&pending).unwrap().flatten().collect();
    assert_eq!(kept.len(), 1, "one pending report on disk");

    // The coordinator comes back on the same database; a new worker start delivers the report
    // before it leases anything.
    let (address, coordinator, shutdown) = serve(setup.dir.path()).await;
    let mut again = config(&setup, Some(0));
    again.coordinator = address;
    let summary = client::run(again, CancellationToken::new()).await.unwrap();
    assert_eq!(summary, client::ClientSummary::default());
    assert_eq!(std::fs::read_dir(&pending).unwrap().count(), 0);
    let sweep = &coordinator.list_sweeps(1).await.unwrap()[0];
    assert_eq!(sweep.counts.succeeded, 1, "{:?}", sweep.counts);
    let board = coordinator
        .leaderboard(&LeaderboardFilter::default())
        .await
        .unwrap();
    assert_eq!(board[0].seeds, 1);
    shutdown.cancel();
}

/// Epochs the trial's checkpoint holds (0 before the first is written).
fn checkpoint_epochs(setup: &Setup) -> u32 {
    let folder = setup.dir.path().join("work/checkpoints");
    let Some(file) = std::fs::read_dir(folder).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|e| e == "safetensors"))
    }) else {
        return 0;
    };
    deepmad_worker::train::checkpoint::load(&file, &candle_core::Device::Cpu)
        .map_or(0, |checkpoint| checkpoint.state.history.len() as u32)
}

/// Issue 24, item 7: a coordinator that vanished without closing the connection (a frozen VM)
/// must not stall the worker until TCP gives up. This one accepts connections and never
/// answers; every call gives up after the worker's `call_timeout`, so the worker keeps its
/// retry loop, sees the shutdown and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_never_answers_does_not_stall_the_worker() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = ClientConfig {
        coordinator: format!("http://{address}"),
        token: None,
        ca_cert: None,
        device: DeviceSpec::Cpu,
        name: "silent test".into(),
        work_dir: dir.path().join("work"),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        max_trials: None,
        status: None,
        call_timeout: Duration::from_millis(300),
    };
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(client::run(config, shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    shutdown.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker is not stuck in a call to a silent coordinator")
        .unwrap();
    assert!(outcome.is_err(), "it never registered: {outcome:?}");
    silent.abort();
}
