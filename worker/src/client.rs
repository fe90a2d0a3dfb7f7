//! The worker loop: register with a coordinator, lease trials, train each on a blocking thread
//! while heartbeating, and report the outcome.
//!
//! Guarantees:
//! * A heartbeat that says the lease is lost or the sweep was cancelled stops training at the
//!   next batch (the checkpoint stays).
//! * A finished result is never dropped: its report is retried with backoff while the
//!   coordinator is unreachable, and written to `work_dir/pending/` if the worker must exit
//!   first; the next start reports pending results before leasing.
//! * Shutdown drains in order: stop leasing, stop the trial at the next batch (checkpoint),
//!   report it as retryable so the trial is requeued at once, exit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deepmad_design::Network;
use deepmad_proto::client::{endpoint, Bearer};
use deepmad_proto::v1;
use deepmad_proto::v1::work_service_client::WorkServiceClient;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::control::{CancellationFlag, Control, StepProgress, StopReason, TrainHooks};
use crate::data::{Dataset, DatasetSpec, LoadOptions};
use crate::device::DeviceSpec;
use crate::error::{FailureClass, WorkerError};
use crate::metrics::EpochMetrics;
use crate::recipe::Recipe;
use crate::train::{Pretrained, TrainOutcome, Trainer, TrainerOptions, TrialResult, TrialSpec};

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

/// A report the coordinator has not acknowledged yet, as kept on disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PendingReport {
    attempt_id: String,
    lease_token: String,
    metrics_json: String,
}

/// Runs the worker until `shutdown` is cancelled (or `max_trials` trials ran).
pub async fn run(
    config: ClientConfig,
    shutdown: CancellationToken,
) -> Result<ClientSummary, WorkerError> {
    let device = config.device.open()?;
    let mut client = connect(&config, &shutdown).await?;
    let worker_id = uuid::Uuid::new_v4().to_string();
    let registered = register(&mut client, &config, &worker_id, &shutdown).await?;
    info!(%worker_id, coordinator = %config.coordinator, "worker registered");
    deliver_pending(&mut client, &config, &shutdown).await;
    let heartbeat_every = Duration::from_millis(registered.heartbeat_interval_ms.max(50));
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
        let response = match client.lease(request).await {
            Ok(response) => {
                backoff = config.backoff_min;
                response.into_inner()
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
        match client.register(request.clone()).await {
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

enum Finished {
    Completed,
    Failed,
    Stopped,
}

/// Progress shared between the training thread and the heartbeat task.
#[derive(Default)]
struct Shared {
    progress: Option<v1::Progress>,
    epochs: Vec<v1::EpochMetrics>,
}

struct SharedHooks {
    shared: Arc<Mutex<Shared>>,
    status: Option<Arc<Mutex<WorkerStatus>>>,
}

impl TrainHooks for SharedHooks {
    fn on_step(&mut self, progress: &StepProgress) -> Control {
        publish(&self.status, |status| {
            status.fraction = progress.fraction_done();
            status.epoch = progress.position.epoch;
            status.epochs = progress.epochs;
            status.loss = progress.loss;
            status.images_per_second = progress.images_per_second;
        });
        let mut shared = self
            .shared
            .lock()
            .expect("no panics while holding the lock");
        shared.progress = Some(v1::Progress {
            epoch: progress.position.epoch,
            step: progress.position.global_step,
            loss: Some(progress.loss),
            top1: None,
            images_per_second: Some(progress.images_per_second),
        });
        Control::Continue
    }

    fn on_epoch(&mut self, metrics: &EpochMetrics) -> Control {
        let mut shared = self
            .shared
            .lock()
            .expect("no panics while holding the lock");
        shared.epochs.push(epoch_to_proto(metrics));
        Control::Continue
    }
}

fn epoch_to_proto(metrics: &EpochMetrics) -> v1::EpochMetrics {
    v1::EpochMetrics {
        epoch: metrics.epoch,
        train_loss: metrics.train_loss,
        test_loss: metrics.test.loss,
        top1: metrics.test.top1,
        top5: metrics.test.top5,
        images_per_second: metrics.images_per_second,
        learning_rate: metrics.lr,
    }
}

/// Why the heartbeat task asked training to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopCause {
    None,
    LeaseLost,
    Cancelled,
}

struct TrialRun<'a> {
    client: Client,
    config: &'a ClientConfig,
    device: candle_core::Device,
    heartbeat_every: Duration,
}

impl TrialRun<'_> {
    async fn run(
        mut self,
        assignment: v1::Assignment,
        datasets: &mut HashMap<String, Arc<Dataset>>,
        shutdown: &CancellationToken,
    ) -> Finished {
        let attempt = assignment.attempt_id.clone();
        let token = assignment.lease_token.clone();
        info!(trial = %assignment.trial_id, %attempt, "trial leased");
        // Heartbeats start before the dataset loads and the weights download, which can take
        // longer than a lease.
        let shared = Arc::new(Mutex::new(Shared::default()));
        let flag = CancellationFlag::new();
        let cause = Arc::new(Mutex::new(StopCause::None));
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            attempt.clone(),
            token.clone(),
            shared.clone(),
            flag.clone(),
            cause.clone(),
            self.heartbeat_every,
        ));
        let prepared = match self.prepare(&assignment, datasets).await {
            Ok((mut spec, dataset)) => self
                .pretrained(&assignment, &mut spec, &dataset)
                .await
                .map(|pretrained| (spec, dataset, pretrained)),
            Err(error) => Err(error),
        };
        let (trainer_spec, dataset, pretrained) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                heartbeat.abort();
                self.fail(&attempt, &token, &error).await;
                return Finished::Failed;
            }
        };
        let checkpoint = self
            .config
            .work_dir
            .join("checkpoints")
            .join(format!("{}.safetensors", assignment.trial_id));
        let stop_on_shutdown = {
            let (flag, shutdown) = (flag.clone(), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                flag.cancel();
            })
        };
        let options = TrainerOptions {
            checkpoint: Some(checkpoint.clone()),
            pretrained,
            ..TrainerOptions::new(self.device.clone())
        };
        let mut hooks = SharedHooks {
            shared: shared.clone(),
            status: self.config.status.clone(),
        };
        let train_flag = flag.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut trainer = Trainer::new(trainer_spec, dataset, options)?;
            trainer.run(&mut hooks, &train_flag)
        })
        .await
        .unwrap_or_else(|error| {
            Err(WorkerError::Loader {
                reason: format!("training thread panicked: {error}"),
            })
        });
        heartbeat.abort();
        stop_on_shutdown.abort();
        let cause = *cause.lock().expect("no panics while holding the lock");
        match outcome {
            Ok(TrainOutcome::Completed(result)) => {
                let epochs = std::mem::take(
                    &mut shared
                        .lock()
                        .expect("no panics while holding the lock")
                        .epochs,
                );
                if assignment.upload_weights {
                    self.upload_weights(&attempt, &token, &checkpoint).await;
                }
                let metrics = final_metrics(&result, &checkpoint, epochs);
                self.complete(&attempt, &token, metrics, shutdown).await;
                Finished::Completed
            }
            Ok(TrainOutcome::Stopped { reason, .. }) => {
                self.stopped(&attempt, &token, reason, cause).await;
                Finished::Stopped
            }
            Err(error) => {
                self.fail(&attempt, &token, &error).await;
                Finished::Failed
            }
        }
    }

    /// Parses the design and recipe and loads the dataset (cached across trials).
    async fn prepare(
        &self,
        assignment: &v1::Assignment,
        datasets: &mut HashMap<String, Arc<Dataset>>,
    ) -> Result<(TrialSpec, Arc<Dataset>), WorkerError> {
        let network = Network::from_json(&assignment.architecture_json)?;
        let recipe: Recipe = serde_json::from_str(&assignment.recipe_json).map_err(|error| {
            WorkerError::MalformedRecipe {
                location: "in the lease".into(),
                reason: error.to_string(),
            }
        })?;
        recipe.validate()?;
        let spec: DatasetSpec = assignment.dataset.parse()?;
        // The same files load differently for designs of another side or channel count.
        let key = format!(
            "{}@{}x{}",
            assignment.dataset, network.resolution, network.in_channels
        );
        let dataset = match datasets.get(&key) {
            Some(dataset) => dataset.clone(),
            None => {
                let options = LoadOptions {
                    side: network.resolution,
                    channels: network.in_channels,
                };
                let loaded = tokio::task::spawn_blocking(move || Dataset::load(&spec, options))
                    .await
                    .map_err(|error| WorkerError::Loader {
                        reason: error.to_string(),
                    })??;
                let loaded = Arc::new(loaded);
                datasets.insert(key, loaded.clone());
                loaded
            }
        };
        let seed = u64::try_from(assignment.seed).map_err(|_| WorkerError::InvalidRecipe {
            key: "seed".into(),
            reason: "must be non-negative".into(),
        })?;
        Ok((
            TrialSpec {
                network,
                recipe,
                seed,
            },
            dataset,
        ))
    }

    /// For a downstream evaluation: fetches the training trial's weights and gives the
    /// network the task dataset's classes. A training trial starts from scratch (`None`).
    async fn pretrained(
        &mut self,
        assignment: &v1::Assignment,
        spec: &mut TrialSpec,
        dataset: &Dataset,
    ) -> Result<Option<Pretrained>, WorkerError> {
        let freeze_backbone = match assignment.task.as_str() {
            "" | "train" => return Ok(None),
            "linear-probe" => true,
            "finetune" => false,
            other => {
                return Err(WorkerError::Incompatible {
                    reason: format!("this worker does not know the task {other:?}"),
                })
            }
        };
        let parent = assignment
            .parent_trial_id
            .as_deref()
            .ok_or_else(|| WorkerError::Weights {
                reason: format!("the {} trial names no training trial", assignment.task),
            })?;
        let design_hash = spec.network.content_hash();
        spec.network.num_classes = dataset.num_classes;
        let checkpoint = self
            .fetch_weights(&assignment.attempt_id, &assignment.lease_token, parent)
            .await?;
        Ok(Some(Pretrained {
            checkpoint,
            design_hash,
            freeze_backbone,
        }))
    }

    /// Downloads the weights of training trial `parent` into `work_dir/weights/`, checking
    /// the size and SHA-256 the coordinator announced before the file takes its name.
    async fn fetch_weights(
        &mut self,
        attempt: &str,
        token: &str,
        parent: &str,
    ) -> Result<PathBuf, WorkerError> {
        let dir = self.config.work_dir.join("weights");
        std::fs::create_dir_all(&dir).map_err(|source| WorkerError::io(&dir, source))?;
        let path = dir.join(format!("{parent}.safetensors"));
        let request = v1::FetchWeightsRequest {
            attempt_id: attempt.to_string(),
            lease_token: token.to_string(),
        };
        let mut stream = self
            .client
            .fetch_weights(request)
            .await
            .map_err(weights_status)?
            .into_inner();
        let mut data = Vec::new();
        let mut announced: Option<(u64, String)> = None;
        while let Some(chunk) = stream.message().await.map_err(weights_status)? {
            if announced.is_none() {
                announced = Some((chunk.total_bytes, chunk.sha256.clone()));
            }
            data.extend_from_slice(&chunk.data);
        }
        let (size, sha256) = announced.ok_or_else(|| WorkerError::Coordinator {
            reason: "the weights stream was empty".into(),
        })?;
        let digest = sha256_hex(&data);
        if data.len() as u64 != size || digest != sha256 {
            return Err(WorkerError::Coordinator {
                reason: format!(
                    "weights of trial {parent} arrived damaged: {} bytes with SHA-256 {digest}, \
                     announced {size} bytes with {sha256}",
                    data.len()
                ),
            });
        }
        crate::checkpoint::write_atomically(&path, &data)?;
        info!(%parent, bytes = size, "pretrained weights fetched");
        Ok(path)
    }

    /// Uploads the final checkpoint for the trial's downstream evaluations, a few times at
    /// most; without it the result still counts, and its downstream trials fail naming the
    /// missing weights.
    async fn upload_weights(&mut self, attempt: &str, token: &str, checkpoint: &Path) {
        let data = match std::fs::read(checkpoint) {
            Ok(data) => data,
            Err(error) => {
                warn!(%attempt, %error, "cannot read the checkpoint to upload");
                return;
            }
        };
        let sha256 = sha256_hex(&data);
        let mut backoff = self.config.backoff_min;
        for _ in 0..4 {
            let chunks: Vec<v1::WeightsChunk> = data
                .chunks(UPLOAD_CHUNK_BYTES)
                .enumerate()
                .map(|(index, piece)| {
                    let first = index == 0;
                    v1::WeightsChunk {
                        attempt_id: if first {
                            attempt.to_string()
                        } else {
                            String::new()
                        },
                        lease_token: if first {
                            token.to_string()
                        } else {
                            String::new()
                        },
                        total_bytes: if first { data.len() as u64 } else { 0 },
                        sha256: if first { sha256.clone() } else { String::new() },
                        data: piece.to_vec(),
                    }
                })
                .collect();
            match self.client.upload_weights(tokio_stream::iter(chunks)).await {
                Ok(response) => {
                    info!(%attempt, bytes = response.into_inner().bytes, "weights uploaded");
                    return;
                }
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::FailedPrecondition
                            | tonic::Code::NotFound
                    ) =>
                {
                    warn!(%attempt, %status, "weights upload refused");
                    return;
                }
                Err(status) => warn!(%attempt, %status, "weights upload failed; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
        warn!(%attempt, "weights not uploaded: this trial's downstream evaluations will fail");
    }

    async fn fail(&mut self, attempt: &str, token: &str, error: &WorkerError) {
        let class = match error.class() {
            FailureClass::Deterministic => v1::FailureClass::Deterministic,
            FailureClass::Retryable => v1::FailureClass::Retryable,
        };
        warn!(%attempt, %error, ?class, "trial failed");
        self.send_fail(attempt, token, class, &error.to_string())
            .await;
    }

    async fn send_fail(
        &mut self,
        attempt: &str,
        token: &str,
        class: v1::FailureClass,
        message: &str,
    ) {
        let request = v1::FailRequest {
            attempt_id: attempt.to_string(),
            lease_token: token.to_string(),
            failure_class: class as i32,
            message: message.to_string(),
        };
        // A failure report that does not arrive costs only time: the lease expires and the
        // reaper requeues the trial. So it is tried a few times, not forever.
        for _ in 0..3 {
            match self.client.fail(request.clone()).await {
                Ok(_) => return,
                Err(status) => warn!(%status, "failure report not delivered; retrying"),
            }
            tokio::time::sleep(self.config.backoff_min).await;
        }
    }

    async fn stopped(&mut self, attempt: &str, token: &str, reason: StopReason, cause: StopCause) {
        match cause {
            StopCause::LeaseLost => {
                info!(%attempt, "lease lost; training stopped, checkpoint kept")
            }
            StopCause::Cancelled => info!(%attempt, "sweep cancelled; training stopped"),
            StopCause::None => {
                info!(%attempt, ?reason, "worker shutting down; trial handed back");
                let message = "the worker shut down; the checkpoint is kept on that worker";
                self.send_fail(attempt, token, v1::FailureClass::Retryable, message)
                    .await;
            }
        }
    }

    /// Reports a result until the coordinator acknowledges it; if the worker must exit first,
    /// the report is written to `pending/` and delivered at the next start.
    async fn complete(
        &mut self,
        attempt: &str,
        token: &str,
        metrics: v1::FinalMetrics,
        shutdown: &CancellationToken,
    ) {
        let request = v1::CompleteRequest {
            attempt_id: attempt.to_string(),
            lease_token: token.to_string(),
            metrics: Some(metrics),
        };
        let mut backoff = self.config.backoff_min;
        loop {
            match self.client.complete(request.clone()).await {
                Ok(response) => {
                    info!(%attempt, outcome = response.into_inner().outcome, "result reported");
                    return;
                }
                Err(status)
                    if status.code() == tonic::Code::InvalidArgument
                        || status.code() == tonic::Code::FailedPrecondition =>
                {
                    warn!(%status, "result refused by the coordinator");
                    return;
                }
                Err(status) => warn!(%status, "result not delivered; retrying"),
            }
            if shutdown.is_cancelled() {
                keep_pending(&self.config.work_dir, &request);
                return;
            }
            sleep_or_shutdown(backoff, shutdown).await;
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }
}

async fn heartbeat_loop(
    mut client: Client,
    attempt: String,
    token: String,
    shared: Arc<Mutex<Shared>>,
    flag: CancellationFlag,
    cause: Arc<Mutex<StopCause>>,
    every: Duration,
) {
    use v1::heartbeat_response::Directive;
    loop {
        tokio::time::sleep(every).await;
        let (progress, epochs) = {
            let shared = shared.lock().expect("no panics while holding the lock");
            (shared.progress, shared.epochs.clone())
        };
        let request = v1::HeartbeatRequest {
            attempt_id: attempt.clone(),
            lease_token: token.clone(),
            progress,
            epochs: epochs.clone(),
        };
        match client.heartbeat(request).await {
            Ok(response) => {
                // Epochs the coordinator stored need not be sent again.
                shared
                    .lock()
                    .expect("no panics while holding the lock")
                    .epochs
                    .drain(..epochs.len());
                let directive = response.into_inner().directive;
                let stop = match Directive::try_from(directive) {
                    Ok(Directive::StopLeaseLost) => StopCause::LeaseLost,
                    Ok(Directive::StopCancelled) => StopCause::Cancelled,
                    _ => StopCause::None,
                };
                if stop != StopCause::None {
                    *cause.lock().expect("no panics while holding the lock") = stop;
                    flag.cancel();
                    return;
                }
            }
            Err(status) => warn!(%status, "heartbeat failed; the lease runs on until it expires"),
        }
    }
}

fn final_metrics(
    result: &TrialResult,
    checkpoint: &Path,
    epochs: Vec<v1::EpochMetrics>,
) -> v1::FinalMetrics {
    v1::FinalMetrics {
        top1: result.final_test.top1,
        top5: result.final_test.top5,
        test_loss: result.final_test.loss,
        train_seconds: result.epochs.iter().map(|e| e.seconds).sum(),
        epochs: result.epochs.len() as u32,
        dataset_hash: result.dataset_hash.clone(),
        checkpoint: Some(checkpoint.display().to_string()),
        epoch_metrics: epochs,
    }
}

/// Maps a refused weights download: a missing upload or a trial that is not a downstream
/// evaluation will not fix itself (deterministic); anything else may (retryable).
fn weights_status(status: tonic::Status) -> WorkerError {
    match status.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument => WorkerError::Weights {
            reason: status.message().to_string(),
        },
        _ => WorkerError::Coordinator {
            reason: format!("fetching weights: {status}"),
        },
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn pending_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("pending")
}

/// Writes an undelivered completion to disk (temp file, then rename).
fn keep_pending(work_dir: &Path, request: &v1::CompleteRequest) {
    let metrics = request
        .metrics
        .as_ref()
        .map(prost::Message::encode_to_vec)
        .unwrap_or_default();
    let report = PendingReport {
        attempt_id: request.attempt_id.clone(),
        lease_token: request.lease_token.clone(),
        metrics_json: hex_encode(&metrics),
    };
    let dir = pending_dir(work_dir);
    let path = dir.join(format!("{}.json", request.attempt_id));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let temporary = path.with_extension("tmp");
        std::fs::write(
            &temporary,
            serde_json::to_vec(&report).expect("reports serialize"),
        )?;
        std::fs::rename(&temporary, &path)
    };
    match write() {
        Ok(()) => {
            warn!(path = %path.display(), "result kept on disk; it is reported at the next start")
        }
        Err(error) => warn!(%error, "could not keep the undelivered result on disk"),
    }
}

/// Reports results kept by an earlier run; each file is removed once acknowledged.
async fn deliver_pending(client: &mut Client, config: &ClientConfig, shutdown: &CancellationToken) {
    let Ok(entries) = std::fs::read_dir(pending_dir(&config.work_dir)) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if shutdown.is_cancelled() || path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Some(request) = std::fs::read(&path)
            .ok()
            .and_then(|bytes| pending_request(&bytes))
        else {
            warn!(path = %path.display(), "unreadable pending result left in place");
            continue;
        };
        match client.complete(request).await {
            Ok(response) => {
                info!(path = %path.display(), outcome = response.into_inner().outcome, "pending result reported");
                let _ = std::fs::remove_file(&path);
            }
            Err(status) => warn!(%status, "pending result still not delivered"),
        }
    }
}

fn pending_request(bytes: &[u8]) -> Option<v1::CompleteRequest> {
    let report: PendingReport = serde_json::from_slice(bytes).ok()?;
    let metrics =
        <v1::FinalMetrics as prost::Message>::decode(hex_decode(&report.metrics_json)?.as_slice())
            .ok()?;
    Some(v1::CompleteRequest {
        attempt_id: report.attempt_id,
        lease_token: report.lease_token,
        metrics: Some(metrics),
    })
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect()
}
