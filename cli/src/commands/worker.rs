//! `deepmad worker`: leases trials from a coordinator and trains them until shut down.

use std::io::Write;
use std::time::Duration;

use deepmad_worker::client::{self, ClientConfig};
use deepmad_worker::DeviceSpec;
use tokio_util::sync::CancellationToken;

use crate::args::WorkerArgs;
use crate::Failure;

pub async fn run(
    args: &WorkerArgs,
    out: &mut impl Write,
    shutdown: CancellationToken,
) -> Result<(), Failure> {
    let device: DeviceSpec =
        args.device
            .parse()
            .map_err(|error: deepmad_worker::WorkerError| {
                Failure::usage(format!("--device: {error}"))
            })?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}/{device}", host_name()));
    let config = ClientConfig {
        coordinator: args.remote.coordinator.clone(),
        token: args.remote.token.clone(),
        device,
        name,
        work_dir: args.work_dir.clone(),
        backoff_min: Duration::from_millis(500),
        backoff_max: Duration::from_secs(30),
        max_trials: args.max_trials,
    };
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
