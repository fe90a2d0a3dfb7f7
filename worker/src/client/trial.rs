//! One leased trial, from the assignment to the report: prepare (dataset, design, recipe,
//! pretrained weights), train on a blocking thread while [`super::heartbeat`] keeps the lease,
//! then complete, fail or hand the trial back.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deepmad_design::Network;
use deepmad_proto::v1;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::heartbeat::{Heartbeat, Shared, StopCause};
use super::outbox::keep_pending;
use super::{publish, sleep_or_shutdown, Client, ClientConfig, WorkerStatus};
use crate::data::{Dataset, DatasetSpec, LoadOptions};
use crate::error::{FailureClass, WorkerError};
use crate::train::control::{Control, StepProgress, StopReason, TrainHooks};
use crate::train::metrics::EpochMetrics;
use crate::train::recipe::Recipe;
use crate::train::{TrainOutcome, Trainer, TrainerOptions, TrialResult, TrialSpec};

pub(super) enum Finished {
    Completed,
    Failed,
    Stopped,
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

pub(super) struct TrialRun<'a> {
    pub(super) client: Client,
    pub(super) config: &'a ClientConfig,
    pub(super) device: candle_core::Device,
    pub(super) heartbeat_every: Duration,
}

impl TrialRun<'_> {
    pub(super) async fn run(
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
        let timing = (self.heartbeat_every, self.config.call_timeout);
        let heartbeat = Heartbeat::start(self.client.clone(), &attempt, &token, timing);
        let prepared = match self.prepare(&assignment, datasets).await {
            Ok((mut spec, dataset)) => self
                .pretrained(&assignment, &mut spec, &dataset)
                .await
                .map(|pretrained| (spec, dataset, pretrained)),
            Err(error) => Err(error),
        };
        let (spec, dataset, pretrained) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                heartbeat.stop();
                self.fail(&attempt, &token, &error).await;
                return Finished::Failed;
            }
        };
        let stem = match super::id_file_stem(&assignment.trial_id, "trial_id") {
            Ok(stem) => stem,
            Err(error) => {
                heartbeat.stop();
                self.fail(&attempt, &token, &error).await;
                return Finished::Failed;
            }
        };
        let checkpoint = self
            .config
            .work_dir
            .join("checkpoints")
            .join(format!("{stem}.safetensors"));
        let options = TrainerOptions {
            checkpoint: Some(checkpoint.clone()),
            pretrained,
            ..TrainerOptions::new(self.device.clone())
        };
        let outcome = self
            .train(spec, dataset, options, &heartbeat, shutdown)
            .await;
        let unreported = heartbeat.stop();
        match outcome {
            Ok(TrainOutcome::Completed(result)) => {
                // The lease is kept through the upload and until the coordinator has the
                // result; the epochs go with the result instead.
                let keep_alive = Heartbeat::resume(
                    self.client.clone(),
                    &attempt,
                    &token,
                    timing,
                    unreported.progress,
                );
                // The protocol has no field for it, so the worker's log is where it shows.
                if result.corrupt_checkpoints > 0 {
                    warn!(
                        %attempt,
                        corrupt_checkpoints = result.corrupt_checkpoints,
                        "trial trained from scratch after setting a corrupt checkpoint aside"
                    );
                }
                if assignment.upload_weights {
                    self.upload_weights(&attempt, &token, &checkpoint).await;
                }
                let metrics = final_metrics(&result, &checkpoint, unreported.epochs);
                self.complete(&attempt, &token, metrics, shutdown).await;
                keep_alive.stop();
                Finished::Completed
            }
            Ok(TrainOutcome::Stopped { reason, .. }) => {
                self.stopped(&attempt, &token, reason, unreported.cause)
                    .await;
                Finished::Stopped
            }
            Err(error) => {
                self.fail(&attempt, &token, &error).await;
                Finished::Failed
            }
        }
    }

    /// Trains on a blocking thread until done, stopped by the heartbeat's flag (lease lost,
    /// sweep cancelled) or by `shutdown`; hooks publish progress for the heartbeat to send.
    async fn train(
        &self,
        spec: TrialSpec,
        dataset: Arc<Dataset>,
        options: TrainerOptions,
        heartbeat: &Heartbeat,
        shutdown: &CancellationToken,
    ) -> Result<TrainOutcome, WorkerError> {
        let stop_on_shutdown = {
            let (flag, shutdown) = (heartbeat.flag.clone(), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                flag.cancel();
            })
        };
        let mut hooks = SharedHooks {
            shared: heartbeat.shared.clone(),
            status: self.config.status.clone(),
        };
        let flag = heartbeat.flag.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut trainer = Trainer::new(spec, dataset, options)?;
            trainer.run(&mut hooks, &flag)
        })
        .await
        .unwrap_or_else(|error| {
            Err(WorkerError::Loader {
                reason: format!("training thread panicked: {error}"),
            })
        });
        stop_on_shutdown.abort();
        outcome
    }

    /// Parses the design and recipe and loads the dataset (cached across trials).
    async fn prepare(
        &self,
        assignment: &v1::Assignment,
        datasets: &mut HashMap<String, Arc<Dataset>>,
    ) -> Result<(TrialSpec, Arc<Dataset>), WorkerError> {
        let network = Network::from_json(&assignment.architecture_json)?;
        let recipe_json: serde_json::Value = serde_json::from_str(&assignment.recipe_json)
            .map_err(|error| WorkerError::MalformedRecipe {
                location: "in the lease".into(),
                reason: error.to_string(),
            })?;
        let recipe = Recipe::from_json(&recipe_json)?;
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
            let timeout = self.config.call_timeout;
            match super::within(timeout, self.client.fail(request.clone())).await {
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
                // A hand-back is not a failure: the coordinator queues the trial again at
                // once and counts it against no limit.
                let message = "the worker shut down; the checkpoint is kept on that worker";
                self.send_fail(attempt, token, v1::FailureClass::HandedBack, message)
                    .await;
            }
        }
    }

    /// Reports a result until the coordinator acknowledges it; if the worker must exit first,
    /// or the coordinator does not know the attempt, the report is written to `pending/` and
    /// delivered at the next registration.
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
            let timeout = self.config.call_timeout;
            match super::within(timeout, self.client.complete(request.clone())).await {
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
                // The coordinator does not know this attempt (restored from an older backup):
                // retrying cannot help, and the result must not be lost, so it waits in the
                // outbox, reported again at the next registration.
                Err(status) if status.code() == tonic::Code::NotFound => {
                    warn!(%attempt, %status, "coordinator does not know this attempt; result kept");
                    keep_pending(&self.config.work_dir, &request);
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
