//! The worker loop: register with a coordinator, lease trials, train each on a blocking thread
//! while heartbeating, and report the outcome.
//!
//! Guarantees:
//! * A heartbeat that says the lease is lost or the sweep was cancelled stops training at the
//!   next batch (the checkpoint stays).
//! * A finished result is never dropped: its report is retried with backoff while the
//!   coordinator is unreachable, and written to `work_dir/pending/` if the worker must exit
//!   first; the next start reports pending results before leasing.
//! * A coordinator that does not know this worker (restored from a backup taken before it
//!   registered) is registered with again, under the same worker id, and the loop carries on;
//!   a trial whose attempt it does not know stops (checkpoint kept) and its result, if one was
//!   finished, is kept in `pending/`.
//! * Shutdown drains in order: stop leasing, stop the trial at the next batch (checkpoint),
//!   hand it back (`HANDED_BACK`) so the trial is requeued at once, uncounted, exit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deepmad_proto::client::{endpoint, Bearer};
use deepmad_proto::v1;
use deepmad_proto::v1::work_service_client::WorkServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::data::Dataset;
use crate::device::DeviceSpec;
use crate::error::WorkerError;
use outbox::deliver_pending;
use trial::{Finished, TrialRun};

mod heartbeat;
mod outbox;
pub mod settings;
mod trial;
mod weights;

/// The protocol version this worker speaks.
pub const PROTOCOL_VERSION: u32 = deepmad_proto::PROTOCOL_VERSION;

/// Size of the chunks of a weights upload (under the default 4 MiB message limit).
const UPLOAD_CHUNK_BYTES: usize = 1 << 20;

/// How the worker finds its coordinator and where it keeps its files.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port` (or `https://`).
    pub coordinator: String,
    pub token: Option<String>,
    /// PEM file of the CA of an `https://` coordinator (default: the system's roots).
    pub ca_cert: Option<PathBuf>,
    pub device: DeviceSpec,
    pub name: String,
    /// Checkpoints (`checkpoints/<trial>.safetensors`) and undelivered reports (`pending/`).
    pub work_dir: PathBuf,
    /// First and largest wait between attempts to reach the coordinator.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Stop after this many trials (embedded runs and tests); `None` runs until shutdown.
    pub max_trials: Option<u32>,
    /// How long one unary call to the coordinator (register, lease, heartbeat, complete, fail)
    /// may take before it counts as failed and is retried: a coordinator that vanished without
    /// closing the connection (a frozen VM, a dropped route) must not stall the worker.
    pub call_timeout: Duration,
    /// Where the loop publishes what it is doing, for progress displays (`deepmad run`).
    pub status: Option<Arc<Mutex<WorkerStatus>>>,
}

/// What a worker is doing now, as a progress display shows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerStatus {
    /// The trial being trained, if any.
    pub trial: Option<String>,
    /// Fraction of the trial's training done, in [0, 1].
    pub fraction: f64,
    /// Zero-based epoch in training, and the trial's epochs.
    pub epoch: u32,
    pub epochs: u32,
    /// Loss of the last batch.
    pub loss: f64,
    pub images_per_second: f64,
    /// Trials finished by this worker (completed, failed or stopped).
    pub finished: u32,
}

/// Updates the published status, if any.
fn publish(status: &Option<Arc<Mutex<WorkerStatus>>>, update: impl FnOnce(&mut WorkerStatus)) {
    if let Some(status) = status {
        update(&mut status.lock().expect("no panics while holding the lock"));
    }
}

/// What a worker did before it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientSummary {
    pub trials_completed: u32,
    pub trials_failed: u32,
    pub trials_stopped: u32,
}

type Client = WorkServiceClient<InterceptedService<Channel, Bearer>>;

fn coordinator_error(reason: impl std::fmt::Display) -> WorkerError {
    WorkerError::Coordinator {
        reason: reason.to_string(),
    }
}

/// Runs the worker until `shutdown` is cancelled (or `max_trials` trials ran).
pub async fn run(
    config: ClientConfig,
    shutdown: CancellationToken,
) -> Result<ClientSummary, WorkerError> {
    let device = config.device.open()?;
    let mut client = connect(&config, &shutdown).await?;
    let worker_id = uuid::Uuid::new_v4().to_string();
    let mut heartbeat_every = join(&mut client, &config, &worker_id, &shutdown).await?;
    let mut datasets: HashMap<String, Arc<Dataset>> = HashMap::new();
    let mut summary = ClientSummary::default();
    let mut backoff = config.backoff_min;
    while !shutdown.is_cancelled()
        && config.max_trials.is_none_or(|max| {
            summary.trials_completed + summary.trials_failed + summary.trials_stopped < max
        })
    {
        let request = v1::LeaseRequest {
            worker_id: worker_id.clone(),
        };
        let response = match within(config.call_timeout, client.lease(request)).await {
            Ok(response) => {
                backoff = config.backoff_min;
                response.into_inner()
            }
            // The coordinator's database does not know this worker: it was restored from a
            // backup, or replaced. Registering again is all it takes; the id is kept, since
            // registration is keyed by it (an upsert) and one id keeps one worker's story
            // together in both sides' logs and in the attempts the database still has.
            Err(status) if status.code() == tonic::Code::NotFound => {
                warn!(%worker_id, %status, "coordinator does not know this worker; registering again");
                match join(&mut client, &config, &worker_id, &shutdown).await {
                    Ok(every) => heartbeat_every = every,
                    Err(_) if shutdown.is_cancelled() => break,
                    Err(error) => return Err(error),
                }
                // Backed off like any failed lease, so that a coordinator which keeps
                // forgetting the worker is not asked in a tight loop.
                sleep_or_shutdown(backoff, &shutdown).await;
                backoff = (backoff * 2).min(config.backoff_max);
                continue;
            }
            Err(status) => {
                warn!(%status, "lease failed; retrying");
                sleep_or_shutdown(backoff, &shutdown).await;
                backoff = (backoff * 2).min(config.backoff_max);
                continue;
            }
        };
        let Some(assignment) = response.assignment else {
            sleep_or_shutdown(
                Duration::from_millis(response.retry_after_ms.max(50)),
                &shutdown,
            )
            .await;
            continue;
        };
        let trial = TrialRun {
            client: client.clone(),
            config: &config,
            device: device.clone(),
            heartbeat_every,
        };
        publish(&config.status, |status| {
            *status = WorkerStatus {
                trial: Some(assignment.trial_id.clone()),
                finished: status.finished,
                ..WorkerStatus::default()
            }
        });
        match trial.run(assignment, &mut datasets, &shutdown).await {
            Finished::Completed => summary.trials_completed += 1,
            Finished::Failed => summary.trials_failed += 1,
            Finished::Stopped => summary.trials_stopped += 1,
        }
        publish(&config.status, |status| {
            status.trial = None;
            status.finished += 1;
        });
    }
    info!(?summary, "worker stopping");
    Ok(summary)
}

async fn sleep_or_shutdown(duration: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(duration) => {}
    }
}

/// Connects, retrying with backoff until the coordinator answers or shutdown.
async fn connect(
    config: &ClientConfig,
    shutdown: &CancellationToken,
) -> Result<Client, WorkerError> {
    let endpoint =
        endpoint(&config.coordinator, config.ca_cert.as_deref()).map_err(coordinator_error)?;
    let bearer = Bearer::new(config.token.as_deref()).map_err(coordinator_error)?;
    let mut backoff = config.backoff_min;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(WorkServiceClient::with_interceptor(channel, bearer)),
            Err(error) => warn!(%error, "coordinator unreachable; retrying"),
        }
        if shutdown.is_cancelled() {
            return Err(coordinator_error(
                "shut down before the coordinator answered",
            ));
        }
        sleep_or_shutdown(backoff, shutdown).await;
        backoff = (backoff * 2).min(config.backoff_max);
    }
}

/// Returns the id the coordinator sent as a file name: a UUID in its hyphenated form, never a
/// path (issue 24: ids from the coordinator went into file paths unchecked, so `../x` would
/// have written outside the work directory). `what` names the field in the error.
pub(crate) fn id_file_stem(id: &str, what: &str) -> Result<String, WorkerError> {
    uuid::Uuid::parse_str(id)
        .map(|id| id.hyphenated().to_string())
        .map_err(|_| coordinator_error(format!("{what} {id:?} is not a UUID")))
}

/// The default of [`ClientConfig::call_timeout`]: far above a healthy call's milliseconds, and
/// below a lease (60 s by default), so a stalled heartbeat is retried while the lease holds.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits one unary call for at most `limit`; past it the call is dropped (which cancels it on
/// the connection) and counts as `DeadlineExceeded`.
pub(crate) async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(format!(
            "the coordinator did not answer within {limit:?}"
        )))
    })
}

/// Registers `worker_id` and reports results kept from earlier runs; returns the heartbeat
/// interval the coordinator asks for.
async fn join(
    client: &mut Client,
    config: &ClientConfig,
    worker_id: &str,
    shutdown: &CancellationToken,
) -> Result<Duration, WorkerError> {
    let registered = register(client, config, worker_id, shutdown).await?;
    info!(%worker_id, coordinator = %config.coordinator, "worker registered");
    deliver_pending(client, config, shutdown).await;
    Ok(Duration::from_millis(
        registered.heartbeat_interval_ms.max(50),
    ))
}

async fn register(
    client: &mut Client,
    config: &ClientConfig,
    worker_id: &str,
    shutdown: &CancellationToken,
) -> Result<v1::RegisterResponse, WorkerError> {
    let (kind, index) = match config.device {
        DeviceSpec::Cpu => ("cpu", 0),
        DeviceSpec::Cuda(ordinal) => ("cuda", ordinal as u32),
    };
    let request = v1::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: worker_id.to_string(),
        name: config.name.clone(),
        devices: vec![v1::Device {
            kind: kind.into(),
            index,
            name: config.device.to_string(),
            memory_bytes: None,
        }],
    };
    let mut backoff = config.backoff_min;
    loop {
        match within(config.call_timeout, client.register(request.clone())).await {
            Ok(response) => return Ok(response.into_inner()),
            // Refusals are final: a wrong token or protocol will not fix itself.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                ) =>
            {
                return Err(coordinator_error(format!(
                    "registration refused: {}",
                    status.message()
                )));
            }
            Err(status) => warn!(%status, "registration failed; retrying"),
        }
        if shutdown.is_cancelled() {
            return Err(coordinator_error("shut down before registering"));
        }
        sleep_or_shutdown(backoff, shutdown).await;
        backoff = (backoff * 2).min(config.backoff_max);
    }
}

#[cfg(test)]
mod tests {
    use super::id_file_stem;

    #[test]
    fn only_uuids_become_file_names() {
        let id = "6f1c2b8e-1d3a-4c5e-9f00-0123456789ab";
        assert_eq!(id_file_stem(id, "trial_id").unwrap(), id);
        let upper = "6F1C2B8E-1D3A-4C5E-9F00-0123456789AB";
        assert_eq!(id_file_stem(upper, "trial_id").unwrap(), id);
        for bad in [
            "../../etc/passwd",
            "",
            "a/b",
            "6f1c2b8e-1d3a-4c5e-9f00-0123456789ab/..",
        ] {
            let error = id_file_stem(bad, "trial_id").unwrap_err().to_string();
            assert!(error.contains("trial_id"), "{error}");
        }
    }
}
