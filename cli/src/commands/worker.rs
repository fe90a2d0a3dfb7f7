//! `deepmad worker`: leases trials from a coordinator and trains them until shut down.

use std::io::Write;

use deepmad_worker::client;
use deepmad_worker::client::settings::WorkerSettings;
use tokio_util::sync::CancellationToken;

use crate::args::WorkerArgs;
use crate::Failure;

pub async fn run(
    args: &WorkerArgs,
    out: &mut impl Write,
    shutdown: CancellationToken,
) -> Result<(), Failure> {
    let flags = WorkerSettings {
        coordinator: args.coordinator.clone(),
        token: args.token.clone(),
        ca_cert: args.ca_cert.clone(),
        device: args.device.clone(),
        name: args.name.clone(),
        work_dir: args.work_dir.clone(),
        max_trials: args.max_trials,
        threads: args.threads,
        ..WorkerSettings::default()
    };
    let file = match &args.config {
        Some(path) => {
            WorkerSettings::from_file(path).map_err(|error| Failure::usage(error.to_string()))?
        }
        None => WorkerSettings::default(),
    };
    let resolved = flags
        .over(file)
        .resolve(&host_name())
        .map_err(|error| Failure::usage(error.to_string()))?;
    let config = resolved.client;
    if args.check_config {
        writeln!(out, "settings ok")?;
        writeln!(out, "coordinator {}", config.coordinator)?;
        writeln!(
            out,
            "token {}",
            if config.token.is_some() {
                "set"
            } else {
                "none"
            }
        )?;
        writeln!(out, "device {}", config.device)?;
        writeln!(out, "name {}", config.name)?;
        writeln!(out, "work_dir {}", config.work_dir.display())?;
        writeln!(
            out,
            "backoff {}..{} ms",
            config.backoff_min.as_millis(),
            config.backoff_max.as_millis()
        )?;
        return Ok(());
    }
    if let Some(threads) = resolved.threads {
        // Read by candle's CPU kernels when they first run, which is after this point.
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    let summary = client::run(config, shutdown)
        .await
        .map_err(|error| Failure {
            code: 1,
            message: error.to_string(),
        })?;
    writeln!(
        out,
        "trials completed {}, failed {}, stopped {}",
        summary.trials_completed, summary.trials_failed, summary.trials_stopped
    )?;
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "worker".to_string())
}
