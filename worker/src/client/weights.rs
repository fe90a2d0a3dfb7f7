//! Trained weights through the coordinator: a downstream evaluation downloads its backbone's,
//! and a finished training trial with downstream tasks uploads its own, both hashed.

use std::path::{Path, PathBuf};

use deepmad_design::digest::sha256_hex;
use deepmad_proto::v1;
use tracing::{info, warn};

use super::trial::TrialRun;
use super::UPLOAD_CHUNK_BYTES;
use crate::data::Dataset;
use crate::error::WorkerError;
use crate::train::{Pretrained, TrialSpec};

impl TrialRun<'_> {
    /// For a downstream evaluation: fetches the training trial's weights and gives the
    /// network the task dataset's classes. A training trial starts from scratch (`None`).
    pub(super) async fn pretrained(
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
    pub(super) async fn fetch_weights(
        &mut self,
        attempt: &str,
        token: &str,
        parent: &str,
    ) -> Result<PathBuf, WorkerError> {
        let dir = self.config.work_dir.join("weights");
        std::fs::create_dir_all(&dir).map_err(|source| WorkerError::io(&dir, source))?;
        let stem = super::id_file_stem(parent, "parent_trial_id")?;
        let path = dir.join(format!("{stem}.safetensors"));
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
        crate::train::checkpoint::write_atomically(&path, &data)?;
        info!(%parent, bytes = size, "pretrained weights fetched");
        Ok(path)
    }

    /// Uploads the final checkpoint for the trial's downstream evaluations, a few times at
    /// most; without it the result still counts, and its downstream trials fail naming the
    /// missing weights.
    pub(super) async fn upload_weights(&mut self, attempt: &str, token: &str, checkpoint: &Path) {
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
