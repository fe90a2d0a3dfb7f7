//! `WorkService`: the pull-based, leased, fenced work protocol for workers.

use std::pin::Pin;
use std::sync::Arc;

use deepmad_proto::v1;
use tokio_stream::{Stream, StreamExt};
use tokio_util::io::ReaderStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{
    epochs_from_proto, final_metrics_from_proto, parse_id, progress_from_proto,
    reported_failure_class, worker_from_proto, Reported,
};
use crate::error::Error;
use crate::model::{AttemptId, LeaseToken, WorkerId};
use crate::service::Coordinator;
use crate::weights::file_digest;

/// How long a worker that got no work should wait before asking again.
const IDLE_RETRY_MS: u64 = 1_000;

/// Longest failure message kept (characters).
const MAX_FAILURE_MESSAGE: usize = 4_000;

/// Size of the chunks `FetchWeights` streams (well under the default message limit).
const WEIGHTS_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub struct WorkHandler {
    coordinator: Arc<Coordinator>,
}

impl WorkHandler {
    pub fn new(coordinator: Arc<Coordinator>) -> WorkHandler {
        WorkHandler { coordinator }
    }
}

fn lease_ids(attempt: &str, token: &str) -> Result<(AttemptId, LeaseToken), Error> {
    Ok((
        parse_id(attempt, "attempt_id")?,
        parse_id(token, "lease_token")?,
    ))
}

#[tonic::async_trait]
impl v1::work_service_server::WorkService for WorkHandler {
    type FetchWeightsStream =
        Pin<Box<dyn Stream<Item = Result<v1::WeightsChunk, Status>> + Send + 'static>>;

    async fn upload_weights(
        &self,
        request: Request<Streaming<v1::WeightsChunk>>,
    ) -> Result<Response<v1::UploadWeightsResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the upload has no chunks"))?;
        let (attempt, token) = lease_ids(&first.attempt_id, &first.lease_token)?;
        let limit = self.coordinator.authorize_upload(attempt, token).await?;
        let mut upload = self
            .coordinator
            .weights
            .begin(attempt, first.total_bytes, &first.sha256, limit)
            .await?;
        let mut chunk = Some(first);
        while let Some(current) = chunk {
            if let Err(error) = upload.write(&current.data).await {
                upload.abort().await;
                return Err(error.into());
            }
            chunk = match stream.message().await {
                Ok(next) => next,
                Err(status) => {
                    upload.abort().await;
                    return Err(status);
                }
            };
        }
        let bytes = upload.finish().await?;
        tracing::info!(%attempt, bytes, "weights uploaded");
        Ok(Response::new(v1::UploadWeightsResponse { bytes }))
    }

    async fn fetch_weights(
        &self,
        request: Request<v1::FetchWeightsRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        let wire = request.get_ref();
        let (attempt, token) = lease_ids(&wire.attempt_id, &wire.lease_token)?;
        let path = self.coordinator.weights_for(attempt, token).await?;
        let (sha256, total_bytes) = file_digest(&path).await?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|error| Status::internal(format!("cannot open the weights: {error}")))?;
        let mut first = true;
        let chunks = ReaderStream::with_capacity(file, WEIGHTS_CHUNK_BYTES).map(move |data| {
            let data =
                data.map_err(|error| Status::internal(format!("reading weights: {error}")))?;
            let header = std::mem::take(&mut first);
            Ok(v1::WeightsChunk {
                attempt_id: String::new(),
                lease_token: String::new(),
                total_bytes: if header { total_bytes } else { 0 },
                sha256: if header {
                    sha256.clone()
                } else {
                    String::new()
                },
                data: data.to_vec(),
            })
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let worker = worker_from_proto(request.get_ref())?;
        self.coordinator.register(worker).await?;
        let config = &self.coordinator.config;
        Ok(Response::new(v1::RegisterResponse {
            protocol_version: deepmad_proto::PROTOCOL_VERSION,
            heartbeat_interval_ms: config.heartbeat_interval_ms as u64,
            lease_ms: config.lease_ms as u64,
        }))
    }

    async fn lease(
        &self,
        request: Request<v1::LeaseRequest>,
    ) -> Result<Response<v1::LeaseResponse>, Status> {
        let worker: WorkerId = parse_id(&request.get_ref().worker_id, "worker_id")?;
        let lease = self.coordinator.lease(worker).await?;
        let assignment = lease.as_ref().map(v1::Assignment::from);
        let retry_after_ms = if assignment.is_some() {
            0
        } else {
            IDLE_RETRY_MS
        };
        Ok(Response::new(v1::LeaseResponse {
            assignment,
            retry_after_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let wire = request.get_ref();
        let (attempt, token) = lease_ids(&wire.attempt_id, &wire.lease_token)?;
        let progress = progress_from_proto(wire.progress.as_ref())?;
        let epochs = epochs_from_proto(&wire.epochs, "epochs")?;
        let outcome = self
            .coordinator
            .heartbeat(attempt, token, &progress, &epochs)
            .await?;
        Ok(Response::new(v1::HeartbeatResponse::from(&outcome)))
    }

    async fn complete(
        &self,
        request: Request<v1::CompleteRequest>,
    ) -> Result<Response<v1::CompleteResponse>, Status> {
        let wire = request.get_ref();
        let (attempt, token) = lease_ids(&wire.attempt_id, &wire.lease_token)?;
        let metrics = final_metrics_from_proto(wire.metrics.as_ref())?;
        let outcome = self.coordinator.complete(attempt, token, &metrics).await?;
        Ok(Response::new(v1::CompleteResponse::from(outcome)))
    }

    async fn fail(
        &self,
        request: Request<v1::FailRequest>,
    ) -> Result<Response<v1::FailResponse>, Status> {
        let wire = request.get_ref();
        let (attempt, token) = lease_ids(&wire.attempt_id, &wire.lease_token)?;
        let message: String = wire.message.chars().take(MAX_FAILURE_MESSAGE).collect();
        let coordinator = &self.coordinator;
        let outcome = match reported_failure_class(wire.failure_class, "failure_class")? {
            Reported::Failure(class) => coordinator.fail(attempt, token, class, &message).await?,
            Reported::HandBack => coordinator.hand_back(attempt, token, &message).await?,
        };
        Ok(Response::new(v1::FailResponse::from(&outcome)))
    }
}
