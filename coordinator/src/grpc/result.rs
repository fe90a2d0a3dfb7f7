//! `ResultService`: leaderboards, trial histories and result export.

use std::pin::Pin;
use std::sync::Arc;

use deepmad_proto::v1;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::convert::{leaderboard_filter_from_proto, parse_id};
use crate::model::{SweepId, TrialId};
use crate::service::Coordinator;

#[derive(Debug)]
pub struct ResultHandler {
    coordinator: Arc<Coordinator>,
}

impl ResultHandler {
    pub fn new(coordinator: Arc<Coordinator>) -> ResultHandler {
        ResultHandler { coordinator }
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<v1::ExportResultsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl v1::result_service_server::ResultService for ResultHandler {
    async fn leaderboard(
        &self,
        request: Request<v1::LeaderboardRequest>,
    ) -> Result<Response<v1::LeaderboardResponse>, Status> {
        let filter = leaderboard_filter_from_proto(request.get_ref(), 100, 10_000)?;
        let rows = self.coordinator.leaderboard(&filter).await?;
        Ok(Response::new(v1::LeaderboardResponse {
            rows: rows.iter().map(v1::LeaderboardRow::from).collect(),
        }))
    }

    async fn trial_history(
        &self,
        request: Request<v1::TrialHistoryRequest>,
    ) -> Result<Response<v1::TrialHistoryResponse>, Status> {
        let trial: TrialId = parse_id(&request.get_ref().trial_id, "trial_id")?;
        let history = self.coordinator.trial_history(trial).await?;
        Ok(Response::new(v1::TrialHistoryResponse::from(&history)))
    }

    type ExportResultsStream = ExportStream;

    async fn export_results(
        &self,
        request: Request<v1::ExportResultsRequest>,
    ) -> Result<Response<Self::ExportResultsStream>, Status> {
        let sweep: SweepId = parse_id(&request.get_ref().sweep_id, "sweep_id")?;
        let rows = self.coordinator.export_results(sweep).await?;
        let downstream = self.coordinator.downstream_results(sweep).await?;
        // Training results first, then downstream trials, 500 rows a message.
        let chunks: Vec<Result<v1::ExportResultsResponse, Status>> = rows
            .chunks(500)
            .map(|chunk| {
                Ok(v1::ExportResultsResponse {
                    rows: chunk.iter().map(v1::ResultRow::from).collect(),
                    downstream: Vec::new(),
                })
            })
            .chain(downstream.chunks(500).map(|chunk| {
                Ok(v1::ExportResultsResponse {
                    rows: Vec::new(),
                    downstream: chunk.iter().map(v1::DownstreamRow::from).collect(),
                })
            }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn sweep_analytics(
        &self,
        request: Request<v1::SweepAnalyticsRequest>,
    ) -> Result<Response<v1::SweepAnalyticsResponse>, Status> {
        let sweep: SweepId = parse_id(&request.get_ref().sweep_id, "sweep_id")?;
        let analytics = self.coordinator.sweep_analytics(sweep).await?;
        Ok(Response::new(v1::SweepAnalyticsResponse::from(&analytics)))
    }
}
