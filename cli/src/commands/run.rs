//! `deepmad run SWEEP.toml`: the whole loop in one process, for a laptop or one machine.
//!
//! A coordinator on an embedded database (SQLite by default) serves gRPC on a loopback port,
//! and local workers lease from it over that port, exactly as they would on a cluster. The
//! command creates the sweep, or resumes it when this database already holds a sweep made
//! from the same file (finished trials are kept, unfinished ones run again from their
//! checkpoints), shows a bar per worker and one for the sweep, and prints the leaderboard.
//! Ctrl-C stops the workers at their next batch (checkpoint kept), stops the coordinator and
//! exits with status 130; the same command resumes. With `--dashboard ADDR` the coordinator
//! also serves the web dashboard there while the run lasts.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deepmad_coordinator::app;
use deepmad_coordinator::convert::sweep_spec_to_proto;
use deepmad_coordinator::model::{SweepId, SweepState};
use deepmad_coordinator::service::Coordinator;
use deepmad_coordinator::settings::{self, Overrides, Validated};
use deepmad_coordinator::store::SweepSummary;
use deepmad_coordinator::sweep::SweepSpec;
use deepmad_proto::v1;
use deepmad_worker::client::{self, ClientConfig, ClientSummary, WorkerStatus};
use deepmad_worker::DeviceSpec;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::remote::{status_failure, Remote};
use crate::args::{LeaderboardArgs, RemoteArgs, RunArgs};
use crate::{render, Failure};

/// The embedded coordinator's lease settings, unless the environment sets them: leases of
/// workers that died with an earlier run expire within seconds, and nobody else needs a
/// start-up grace period.
const EMBEDDED_DEFAULTS: [(&str, &str); 6] = [
    ("DEEPMAD__LEASE__LEASE_MS", "10000"),
    ("DEEPMAD__LEASE__HEARTBEAT_INTERVAL_MS", "1000"),
    ("DEEPMAD__LEASE__GRACE_MS", "0"),
    ("DEEPMAD__LEASE__REAPER_INTERVAL_MS", "500"),
    ("DEEPMAD__RETRY__BACKOFF_BASE_MS", "500"),
    ("DEEPMAD__RETRY__BACKOFF_MAX_MS", "5000"),
];

/// The environment variable of the dashboard's address, which `--dashboard` sets.
const DASHBOARD_ENV: &str = "DEEPMAD__DASHBOARD__LISTEN";

/// How often the progress display refreshes.
const REFRESH: Duration = Duration::from_millis(250);

pub async fn run(
    args: &RunArgs,
    out: &mut impl Write,
    shutdown: CancellationToken,
) -> Result<(), Failure> {
    let text = std::fs::read_to_string(&args.spec)
        .map_err(|error| Failure::usage(format!("cannot read {}: {error}", args.spec.display())))?;
    let spec = SweepSpec::from_toml(&text)
        .map_err(|error| Failure::usage(format!("{}: {error}", args.spec.display())))?;
    let devices = devices(args)?;
    if let Some(threads) = args.threads {
        // candle reads this once, when its CPU thread pool starts (nothing has run yet).
        std::env::set_var("CANDLE_NUM_THREADS", threads.max(1).to_string());
    }
    let settings = embedded_settings(args)?;

    let server_stop = CancellationToken::new();
    let (coordinator, address, dashboard, server) =
        start_coordinator(&settings, &server_stop).await?;
    if let Some(dashboard) = dashboard {
        writeln!(out, "dashboard: http://{dashboard}/")?;
    }
    let outcome = drive(args, out, &spec, &devices, &coordinator, address, &shutdown).await;
    server_stop.cancel();
    let served = server.await;
    let outcome = outcome?;
    if let Ok(Err(error)) = served {
        return Err(internal(error));
    }
    match outcome {
        Finished::Done => Ok(()),
        Finished::Interrupted(summary) => Err(Failure {
            code: 130,
            message: format!(
                "interrupted with {} of {} trials done; run the same command again to resume",
                done(&summary),
                total(&summary)
            ),
        }),
    }
}

enum Finished {
    Done,
    Interrupted(SweepSummary),
}

/// Creates or resumes the sweep, runs the workers to the end or to Ctrl-C, prints the result.
async fn drive(
    args: &RunArgs,
    out: &mut impl Write,
    spec: &SweepSpec,
    devices: &[DeviceSpec],
    coordinator: &Arc<Coordinator>,
    address: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<Finished, Failure> {
    let remote_args = RemoteArgs {
        coordinator: format!("http://{address}"),
        token: None,
        ca_cert: None,
    };
    let id = match coordinator.find_sweep(spec).await.map_err(internal)? {
        Some(id) => {
            let summary = coordinator.get_sweep(id).await.map_err(internal)?;
            writeln!(
                out,
                "resuming sweep {id} ({} of {} trials done)",
                done(&summary),
                total(&summary)
            )?;
            id
        }
        None => {
            let remote = Remote::connect(&remote_args).await?;
            let wire =
                sweep_spec_to_proto(spec).map_err(|error| Failure::usage(error.to_string()))?;
            let created = remote
                .sweeps()
                .create_sweep(v1::CreateSweepRequest { spec: Some(wire) })
                .await
                .map_err(status_failure)?
                .into_inner();
            render::sweep_created(out, &created)?;
            created
                .sweep_id
                .parse()
                .map_err(|_| internal("the coordinator returned a malformed sweep id"))?
        }
    };
    out.flush()?;

    let summary = coordinator.get_sweep(id).await.map_err(internal)?;
    let summary = if is_finished(&summary) {
        summary
    } else {
        match train(args, devices, coordinator, address, id, shutdown).await? {
            Some(summary) => summary,
            None => {
                let summary = coordinator.get_sweep(id).await.map_err(internal)?;
                return Ok(Finished::Interrupted(summary));
            }
        }
    };
    writeln!(
        out,
        "sweep {id}: {} succeeded, {} failed, {} dead",
        summary.counts.succeeded, summary.counts.failed, summary.counts.dead
    )?;
    let leaderboard = LeaderboardArgs {
        sweep: Some(id.to_string()),
        dataset: None,
        block: None,
        min_params: None,
        max_params: None,
        max_flops: None,
        limit: args.limit,
        format: args.format,
        remote: remote_args,
    };
    super::results::leaderboard(&leaderboard, out).await?;
    Ok(Finished::Done)
}

/// Runs one worker per device until the sweep is finished (returns its summary) or
/// `shutdown` is cancelled (returns `None` once the workers have handed their trials back).
async fn train(
    args: &RunArgs,
    devices: &[DeviceSpec],
    coordinator: &Arc<Coordinator>,
    address: SocketAddr,
    id: SweepId,
    shutdown: &CancellationToken,
) -> Result<Option<SweepSummary>, Failure> {
    let workers_stop = CancellationToken::new();
    let display = Display::new(devices);
    let mut workers: Vec<JoinHandle<Result<ClientSummary, deepmad_worker::WorkerError>>> =
        Vec::new();
    for (index, device) in devices.iter().enumerate() {
        let config = ClientConfig {
            coordinator: format!("http://{address}"),
            token: None,
            ca_cert: None,
            device: *device,
            name: format!("local/{device}#{index}"),
            // One directory for all local workers: a checkpoint is found by whichever worker
            // leases its trial next.
            work_dir: args.work_dir.clone(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            max_trials: None,
            status: Some(display.statuses[index].clone()),
            call_timeout: client::DEFAULT_CALL_TIMEOUT,
        };
        workers.push(tokio::spawn(client::run(config, workers_stop.clone())));
    }
    let mut ticker = tokio::time::interval(REFRESH);
    let finished = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break None,
            _ = ticker.tick() => {}
        }
        let summary = coordinator.get_sweep(id).await.map_err(internal)?;
        display.update(&summary);
        if is_finished(&summary) {
            break Some(summary);
        }
        if let Some(failed) = workers.iter().position(JoinHandle::is_finished) {
            // A worker that stops on its own failed to start (a device that cannot open):
            // waiting for it would wait forever.
            workers_stop.cancel();
            let result = workers.swap_remove(failed).await;
            display.clear();
            let reason = match result {
                Ok(Err(error)) => error.to_string(),
                Ok(Ok(_)) => "it stopped unexpectedly".to_string(),
                Err(error) => error.to_string(),
            };
            return Err(Failure {
                code: 1,
                message: format!("a local worker stopped: {reason}"),
            });
        }
    };
    workers_stop.cancel();
    for worker in workers {
        match worker.await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "a local worker ended with an error"),
            Err(error) => tracing::warn!(%error, "a local worker panicked"),
        }
    }
    display.clear();
    Ok(finished)
}

/// The bars: one per worker and one for the sweep, on stderr (hidden when not a terminal).
struct Display {
    _multi: MultiProgress,
    overall: ProgressBar,
    bars: Vec<ProgressBar>,
    statuses: Vec<Arc<Mutex<WorkerStatus>>>,
}

/// Resolution of the overall bar: a trial is this many units, so running trials' partial
/// progress moves the bar and its ETA.
const UNITS_PER_TRIAL: u64 = 1000;

impl Display {
    fn new(devices: &[DeviceSpec]) -> Display {
        let multi = MultiProgress::new();
        let worker_style = ProgressStyle::with_template("{prefix:>10} {bar:24} {msg}")
            .expect("the template is valid");
        let bars: Vec<ProgressBar> = devices
            .iter()
            .enumerate()
            .map(|(index, device)| {
                let bar = multi.add(ProgressBar::new(UNITS_PER_TRIAL));
                bar.set_style(worker_style.clone());
                bar.set_prefix(format!("{device}#{index}"));
                bar.set_message("waiting for work");
                bar
            })
            .collect();
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} {bar:24} {msg}  [{elapsed_precise}, eta {eta}]",
            )
            .expect("the template is valid"),
        );
        overall.set_prefix("sweep");
        Display {
            _multi: multi,
            overall,
            bars,
            statuses: devices
                .iter()
                .map(|_| Arc::new(Mutex::new(WorkerStatus::default())))
                .collect(),
        }
    }

    fn update(&self, summary: &SweepSummary) {
        let mut partial = 0.0;
        for (bar, status) in self.bars.iter().zip(&self.statuses) {
            let status = status
                .lock()
                .expect("no panics while holding the lock")
                .clone();
            match &status.trial {
                Some(trial) => {
                    partial += status.fraction;
                    bar.set_position((status.fraction * UNITS_PER_TRIAL as f64) as u64);
                    bar.set_message(format!(
                        "trial {} epoch {}/{} loss {:.3} {:.0} img/s",
                        short(trial),
                        (status.epoch + 1).min(status.epochs.max(1)),
                        status.epochs,
                        status.loss,
                        status.images_per_second
                    ));
                }
                None => {
                    bar.set_position(0);
                    bar.set_message(format!("idle ({} trials done)", status.finished));
                }
            }
        }
        let counts = &summary.counts;
        self.overall
            .set_length(u64::from(total(summary)) * UNITS_PER_TRIAL);
        self.overall.set_position(
            u64::from(done(summary)) * UNITS_PER_TRIAL + (partial * UNITS_PER_TRIAL as f64) as u64,
        );
        let best = summary
            .best_top1
            .map_or("-".to_string(), |b| format!("{:.2}%", b * 100.0));
        self.overall.set_message(format!(
            "{}/{} trials, {} running, {} failed, best top-1 {best}",
            done(summary),
            total(summary),
            counts.running,
            counts.failed + counts.dead
        ));
    }

    fn clear(&self) {
        for bar in &self.bars {
            bar.finish_and_clear();
        }
        self.overall.finish_and_clear();
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn done(summary: &SweepSummary) -> u32 {
    let counts = &summary.counts;
    counts.succeeded + counts.failed + counts.dead
}

fn total(summary: &SweepSummary) -> u32 {
    done(summary) + summary.counts.queued + summary.counts.running
}

fn is_finished(summary: &SweepSummary) -> bool {
    summary.state != SweepState::Active || summary.counts.queued + summary.counts.running == 0
}

/// The workers' devices: `--device auto` is every CUDA device of a CUDA build, else the CPU.
fn devices(args: &RunArgs) -> Result<Vec<DeviceSpec>, Failure> {
    let workers = args.workers;
    if workers == Some(0) {
        return Err(Failure::usage("--workers: must be at least 1"));
    }
    let base = match args.device.as_str() {
        "auto" => {
            let gpus = cuda_devices();
            if gpus.is_empty() {
                vec![DeviceSpec::Cpu]
            } else {
                gpus
            }
        }
        text => vec![text
            .parse::<DeviceSpec>()
            .map_err(|error| Failure::usage(format!("--device: {error}")))?],
    };
    let count = workers.map_or(base.len(), |n| n as usize);
    // More workers than devices share them round-robin (useful on CPU with many cores).
    Ok((0..count).map(|index| base[index % base.len()]).collect())
}

/// CUDA devices that open, in order (none without the `cuda` feature).
fn cuda_devices() -> Vec<DeviceSpec> {
    if !DeviceSpec::cuda_compiled() {
        return Vec::new();
    }
    (0..16)
        .map(DeviceSpec::Cuda)
        .take_while(|device| device.open().is_ok())
        .collect()
}

/// The coordinator's settings for an embedded run: loopback on a free port, the embedded
/// lease defaults unless the environment sets them, the database from `--database`.
fn embedded_settings(args: &RunArgs) -> Result<Validated, Failure> {
    let mut env: Vec<(String, String)> = settings::process_env().into_iter().collect();
    for (key, value) in EMBEDDED_DEFAULTS {
        if !env.iter().any(|(known, _)| known == key) {
            env.push((key.to_string(), value.to_string()));
        }
    }
    if let Some(address) = &args.dashboard {
        address.trim().parse::<SocketAddr>().map_err(|_| {
            Failure::usage(format!(
                "--dashboard {address:?}: expected IP:PORT such as 127.0.0.1:8080"
            ))
        })?;
        // The flag wins over the environment, like every flag.
        env.retain(|(key, _)| !key.eq_ignore_ascii_case(DASHBOARD_ENV));
        env.push((DASHBOARD_ENV.to_string(), address.clone()));
    }
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".to_string()),
        database_url: Some(args.database.clone()),
    };
    let weights_set = env
        .iter()
        .any(|(key, _)| key.eq_ignore_ascii_case("DEEPMAD__STORAGE__WEIGHTS_DIR"));
    let mut validated =
        settings::load(None, env, &overrides).map_err(|error| Failure::usage(error.to_string()))?;
    if !weights_set {
        // Uploaded weights live with the run's other files, not in the current directory.
        validated.weights_dir = args.work_dir.join("uploads");
    }
    Ok(validated)
}

type Served = JoinHandle<Result<(), deepmad_coordinator::error::Error>>;

/// Starts the embedded coordinator: returns it, its gRPC address, the dashboard's address
/// (when `--dashboard` asked for one) and the serving task.
async fn start_coordinator(
    settings: &Validated,
    stop: &CancellationToken,
) -> Result<(Arc<Coordinator>, SocketAddr, Option<SocketAddr>, Served), Failure> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|error| internal(format!("cannot listen on {}: {error}", settings.listen)))?;
    let address = listener.local_addr()?;
    let dashboard = match settings.dashboard_listen {
        Some(wanted) => Some(TcpListener::bind(wanted).await.map_err(|error| {
            internal(format!("cannot serve the dashboard on {wanted}: {error}"))
        })?),
        None => None,
    };
    let dashboard_address = match &dashboard {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let coordinator = app::open(settings, stop.clone())
        .await
        .map_err(|error| Failure {
            code: 1,
            message: format!("cannot open the database: {error}"),
        })?;
    let serving = coordinator.clone();
    let settings = settings.clone();
    let stop = stop.clone();
    let listeners = app::Listeners {
        grpc: listener,
        metrics: None,
        dashboard,
    };
    let server =
        tokio::spawn(async move { app::run_all(&settings, serving, listeners, stop).await });
    Ok((coordinator, address, dashboard_address, server))
}

fn internal(error: impl std::fmt::Display) -> Failure {
    Failure {
        code: 1,
        message: error.to_string(),
    }
}
