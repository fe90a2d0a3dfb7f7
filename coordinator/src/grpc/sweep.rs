//! `SweepService`: create, read, list, cancel and watch sweeps.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use deepmad_proto::v1;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::convert::{create_sweep_response, infeasible_point, parse_id, sweep_spec_from_proto};
use crate::error::Error;
use crate::model::{SweepId, SweepState};
use crate::service::Coordinator;

/// How often a watch re-reads its sweep.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct SweepHandler {
    coordinator: Arc<Coordinator>,
}

impl SweepHandler {
    pub fn new(coordinator: Arc<Coordinator>) -> SweepHandler {
        SweepHandler { coordinator }
    }
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<v1::SweepProgress, Status>> + Send>>;

#[tonic::async_trait]
impl v1::sweep_service_server::SweepService for SweepHandler {
    async fn create_sweep(
        &self,
        request: Request<v1::CreateSweepRequest>,
    ) -> Result<Response<v1::CreateSweepResponse>, Status> {
        let created_by = crate::auth::caller_name(&request);
        let wire = request
            .into_inner()
            .spec
            .ok_or_else(|| Error::InvalidArgument {
                field: "spec".into(),
                reason: "is required".into(),
            })?;
        let spec = sweep_spec_from_proto(wire)?;
        let (id, created, grid) = self.coordinator.create_sweep(spec, &created_by).await?;
        let infeasible = grid.iter().filter_map(infeasible_point).collect();
        Ok(Response::new(create_sweep_response(
            id, &created, infeasible,
        )))
    }

    async fn retry_trials(
        &self,
        request: Request<v1::RetryTrialsRequest>,
    ) -> Result<Response<v1::RetryTrialsResponse>, Status> {
        let id: SweepId = parse_id(&request.get_ref().sweep_id, "sweep_id")?;
        let requeued = self.coordinator.retry_trials(id).await?;
        Ok(Response::new(v1::RetryTrialsResponse { requeued }))
    }

    async fn get_sweep(
        &self,
        request: Request<v1::GetSweepRequest>,
    ) -> Result<Response<v1::SweepSummary>, Status> {
        let id: SweepId = parse_id(&request.get_ref().sweep_id, "sweep_id")?;
        let summary = self.coordinator.get_sweep(id).await?;
        Ok(Response::new(v1::SweepSummary::from(&summary)))
    }

    async fn list_sweeps(
        &self,
        request: Request<v1::ListSweepsRequest>,
    ) -> Result<Response<v1::ListSweepsResponse>, Status> {
        let limit = match request.get_ref().limit {
            0 => 100,
            n => n,
        };
        let sweeps = self.coordinator.list_sweeps(limit).await?;
        Ok(Response::new(v1::ListSweepsResponse {
            sweeps: sweeps.iter().map(v1::SweepSummary::from).collect(),
        }))
    }

    async fn cancel_sweep(
        &self,
        request: Request<v1::CancelSweepRequest>,
    ) -> Result<Response<v1::SweepSummary>, Status> {
        let id: SweepId = parse_id(&request.get_ref().sweep_id, "sweep_id")?;
        let summary = self.coordinator.cancel_sweep(id).await?;
        Ok(Response::new(v1::SweepSummary::from(&summary)))
    }

    type WatchSweepStream = ProgressStream;

    async fn watch_sweep(
        &self,
        request: Request<v1::WatchSweepRequest>,
    ) -> Result<Response<Self::WatchSweepStream>, Status> {
        let id: SweepId = parse_id(&request.get_ref().sweep_id, "sweep_id")?;
        // Fail fast on an unknown sweep, before the stream starts.
        let first = self.coordinator.get_sweep(id).await?;
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let coordinator = self.coordinator.clone();
        tokio::spawn(async move {
            let _counted = coordinator.metrics.watch_started();
            let mut last = None;
            let mut summary = first;
            loop {
                if last.as_ref() != Some(&summary) {
                    let message = v1::SweepProgress {
                        sweep: Some(v1::SweepSummary::from(&summary)),
                    };
                    if sender.send(Ok(message)).await.is_err() {
                        return; // the client went away
                    }
                }
                let counts = summary.counts;
                let finished =
                    summary.state != SweepState::Active || counts.queued + counts.running == 0;
                if finished {
                    return;
                }
                last = Some(summary);
                // A client that went away ends the poller now, not at the next change it would
                // have sent (issue 24: cancelled streams kept polling until the sweep ended).
                tokio::select! {
                    _ = coordinator.shutdown.cancelled() => return,
                    _ = sender.closed() => return,
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                }
                summary = match coordinator.get_sweep(id).await {
                    Ok(summary) => summary,
                    Err(error) => {
                        let _ = sender.send(Err(Status::from(error))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
