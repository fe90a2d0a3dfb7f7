//! `WorkService`: the pull-based, leased, fenced work protocol for workers.

use std::sync::Arc;

use deepmad_proto::v1;
use tonic::{Request, Response, Status};

use crate::convert::{
    epochs_from_proto, final_metrics_from_proto, parse_id, progress_from_proto,
    reported_failure_class, worker_from_proto,
};
use crate::error::Error;
use crate::model::{AttemptId, LeaseToken, WorkerId};
use crate::service::Coordinator;

/// How long a worker that got no work should wait before asking again.
const IDLE_RETRY_MS: u64 = 1_000;

/// Longest failure message kept (characters).
const MAX_FAILURE_MESSAGE: usize = 4_000;

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
        let class = reported_failure_class(wire.failure_class, "failure_class")?;
        let message: String = wire.message.chars().take(MAX_FAILURE_MESSAGE).collect();
        let outcome = self
            .coordinator
            .fail(attempt, token, class, &message)
            .await?;
        Ok(Response::new(v1::FailResponse::from(&outcome)))
    }
}
