//! Commands that read a finished sweep, without training: its trials were leased and
//! completed through the `Coordinator` use cases, in this process, on an SQLite file.
//! - `deepmad plot` against that coordinator (gRPC on 127.0.0.1:0): every chart as a PNG,
//!   checked (PNG signature, size, colours, text in the caption), and as an SVG;
//! - `deepmad run --dashboard` on that database: it finds the finished sweep, serves the
//!   dashboard while it lasts and prints its URL.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use deepmad_coordinator::app;
use deepmad_coordinator::model::{SweepId, WorkerId};
use deepmad_coordinator::service::{Coordinator, PROTOCOL_VERSION};
use deepmad_coordinator::settings::{self, Overrides};
use deepmad_coordinator::store::{EpochMetrics, FinalMetrics, NewWorker};
use deepmad_coordinator::sweep::SweepSpec;
use resvg::tiny_skia::Pixmap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const EPOCHS: i32 = 3;

struct Running {
    address: SocketAddr,
    sweep: SweepId,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The sweep file of the tests' sweep: two rho values, two seeds, a tiny budget.
fn sweep_toml() -> String {
    format!(
        "name = \"finished\"\ndataset = \"idx:data/mnist-subset\"\nseeds = [0, 1]\n[grid]\n\
         block = [\"basic\"]\nrho = [0.3, 1.0]\nbudget = [{{ params = \"20K\", flops = \"4M\" }}]\n\
         resolution = 28\nnum_classes = 10\nin_channels = 1\n[recipe]\nepochs = {EPOCHS}\nwarmup_epochs = 0\n"
    )
}

/// The settings of a coordinator on `dir`'s SQLite file.
fn settings_in(dir: &Path) -> settings::Validated {
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        database_url: Some(format!("sqlite://{}", dir.join("deepmad.db").display())),
    };
    let env = vec![(
        "DEEPMAD__STORAGE__WEIGHTS_DIR".to_string(),
        dir.join("weights").display().to_string(),
    )];
    settings::load(None, env, &overrides).unwrap()
}

/// A coordinator serving the tests' sweep, every trial finished.
async fn coordinator_with_results() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings_in(dir.path());
    let listener = TcpListener::bind(settings.listen).await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let coordinator = app::open(&settings, shutdown.clone()).await.unwrap();
    let sweep = finish_a_sweep(&coordinator).await;
    let token = shutdown.clone();
    tokio::spawn(async move {
        app::run(&settings, coordinator, listener, None, token)
            .await
            .unwrap()
    });
    Running {
        address,
        sweep,
        shutdown,
        _dir: dir,
    }
}

async fn finish_a_sweep(coordinator: &Arc<Coordinator>) -> SweepId {
    let spec = SweepSpec::from_toml(&sweep_toml()).unwrap();
    let (sweep, _, _) = coordinator.create_sweep(spec, "test").await.unwrap();
    let worker = WorkerId::new();
    let registration = NewWorker {
        id: worker,
        name: "fake".into(),
        devices_json: "[]".into(),
        protocol_version: PROTOCOL_VERSION,
    };
    coordinator.register(registration).await.unwrap();
    let mut done = 0;
    while let Some(lease) = coordinator.lease(worker).await.unwrap() {
        let top1 = 0.8 + 0.04 * f64::from(done);
        let epochs_metrics = (1..=EPOCHS)
            .map(|epoch| EpochMetrics {
                epoch,
                train_loss: 1.0,
                test_loss: 1.0,
                top1: top1 - 0.1 * f64::from(EPOCHS - epoch),
                top5: 0.99,
                images_per_second: 10.0,
                learning_rate: 0.1,
            })
            .collect();
        let metrics = FinalMetrics {
            top1,
            top5: 0.99,
            test_loss: 0.3,
            train_seconds: 5.0,
            epochs: EPOCHS,
            dataset_hash: "abc".into(),
            checkpoint: None,
            epochs_metrics,
        };
        coordinator
            .complete(lease.attempt, lease.token, &metrics)
            .await
            .unwrap();
        done += 1;
    }
    assert!(done >= 2, "a sweep worth plotting");
    sweep
}

/// Runs `deepmad ARGS` on a blocking thread (the coordinator keeps serving meanwhile).
async fn deepmad(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_deepmad"))
            .args(&args)
            .env_remove("DEEPMAD_COORDINATOR")
            .env_remove("DEEPMAD_TOKEN")
            .output()
            .expect("the deepmad binary runs")
    })
    .await
    .unwrap()
}

fn plot_args(running: &Running, kind: &str, out: &Path) -> Vec<String> {
    vec![
        "plot".into(),
        "--sweep".into(),
        running.sweep.to_string(),
        "--kind".into(),
        kind.into(),
        "--out".into(),
        out.display().to_string(),
        "--coordinator".into(),
        format!("http://{}", running.address),
    ]
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Checks a chart's PNG: signature, the charts' size, a real picture (many colours), and
/// text in the caption strip (dark pixels where the title is; no font draws none).
fn check_png(kind: &str, bytes: &[u8]) {
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{kind}: the PNG signature"
    );
    let image = Pixmap::decode_png(bytes).unwrap_or_else(|error| panic!("{kind}: {error}"));
    assert_eq!((image.width(), image.height()), (900, 560), "{kind}");
    let mut colours: Vec<[u8; 4]> = image
        .pixels()
        .iter()
        .map(|p| [p.red(), p.green(), p.blue(), p.alpha()])
        .collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(colours.len() >= 16, "{kind}: {} colours", colours.len());
    let width = image.width() as usize;
    let caption_strip = &image.pixels()[..width * 50];
    let dark = caption_strip
        .iter()
        .filter(|p| u16::from(p.red()) + u16::from(p.green()) + u16::from(p.blue()) < 200)
        .count();
    assert!(
        dark > 200,
        "{kind}: the caption's text is missing ({dark} dark pixels)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plot_writes_every_chart_as_png_with_its_text() {
    let running = coordinator_with_results().await;
    let dir = tempfile::tempdir().unwrap();
    for kind in ["rho", "pareto", "entropy", "curves"] {
        let out = dir.path().join(format!("{kind}.png"));
        let output = deepmad(plot_args(&running, kind, &out)).await;
        assert!(output.status.success(), "{kind}: {}", stderr(&output));
        check_png(kind, &std::fs::read(&out).unwrap());
        if let Some(keep) = std::env::var_os("DEEPMAD_PLOT_DIR") {
            std::fs::copy(&out, Path::new(&keep).join(format!("{kind}.png"))).unwrap();
        }
    }
    let svg = dir.path().join("rho.svg");
    let output = deepmad(plot_args(&running, "rho", &svg)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("top-1 against rho"));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name.to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "written atomically: {leftovers:?}");
}

#[tokio::test]
async fn plot_refuses_other_formats_with_exit_2_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rho.jpg");
    let output = deepmad(vec![
        "plot".into(),
        "--sweep".into(),
        "00000000-0000-0000-0000-000000000000".into(),
        "--kind".into(),
        "rho".into(),
        "--out".into(),
        out.display().to_string(),
        // Nothing listens here: the format is refused first.
        "--coordinator".into(),
        "http://127.0.0.1:9".into(),
    ])
    .await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(".svg or .png"),
        "{}",
        stderr(&output)
    );
    assert!(!out.exists());
}

/// `deepmad run SPEC --database ... --dashboard ADDR` with the files of `dir`.
fn run_args(dir: &Path, dashboard: &str) -> Vec<String> {
    vec![
        "run".into(),
        dir.join("sweep.toml").display().to_string(),
        "--database".into(),
        format!("sqlite://{}", dir.join("deepmad.db").display()),
        "--work-dir".into(),
        dir.join("work").display().to_string(),
        "--device".into(),
        "cpu".into(),
        "--dashboard".into(),
        dashboard.into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_the_dashboard_and_prints_its_url() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sweep.toml"), sweep_toml()).unwrap();
    {
        let coordinator = app::open(&settings_in(dir.path()), CancellationToken::new())
            .await
            .unwrap();
        finish_a_sweep(&coordinator).await;
        coordinator.store.close().await;
    }
    let output = deepmad(run_args(dir.path(), "127.0.0.1:0")).await;
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}\n{}", stderr(&output));
    assert!(
        out.contains("resuming sweep"),
        "the finished sweep is found: {out}"
    );
    let url = out
        .lines()
        .find_map(|line| line.strip_prefix("dashboard: http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no dashboard URL in:\n{out}"));
    let port: u16 = url.trim_end_matches('/').parse().expect("a port");
    assert_ne!(port, 0, "the URL names the port bound");

    // Without tokens the dashboard stays on loopback, as gRPC; a malformed address says so.
    let output = deepmad(run_args(dir.path(), "0.0.0.0:8080")).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("dashboard.listen"),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("loopback"), "{}", stderr(&output));
    let output = deepmad(run_args(dir.path(), "8080")).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--dashboard"),
        "{}",
        stderr(&output)
    );
}
