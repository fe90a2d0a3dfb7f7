//! The dashboard's JSON API: what the pages' script polls for progress, and what scripts may
//! read. The shapes are the store's records serialized (`SweepSummary`, `LeaderboardRow`,
//! `TrialHistory`) and [`SweepAnalytics`]; failures are `{"error": MESSAGE}` with the status.

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_sweep, parse_trial, Dashboard, JsonProblem};
use crate::analytics::SweepAnalytics;
use crate::store::{LeaderboardFilter, SweepSummary, TrialHistory};

/// Sweeps the lists show, newest first.
pub(super) const SWEEPS_SHOWN: u32 = 200;

/// Leaderboard rows when the request does not say, and the most it may ask for.
pub(super) const DEFAULT_ROWS: u32 = 1_000;
const MAX_ROWS: u32 = 10_000;

/// `GET /api/sweeps`: `{"sweeps": [SweepSummary, ...]}`, newest first.
pub(super) async fn sweeps(State(dashboard): State<Dashboard>) -> Result<Json<Value>, JsonProblem> {
    let sweeps = dashboard.coordinator.list_sweeps(SWEEPS_SHOWN).await?;
    Ok(Json(json!({ "sweeps": sweeps })))
}

/// `GET /api/sweeps/{id}`: the sweep's summary.
pub(super) async fn sweep(
    State(dashboard): State<Dashboard>,
    Path(sweep): Path<String>,
) -> Result<Json<SweepSummary>, JsonProblem> {
    let id = parse_sweep(&sweep)?;
    Ok(Json(dashboard.coordinator.get_sweep(id).await?))
}

#[derive(Debug, Deserialize)]
pub(super) struct RowsQuery {
    limit: Option<u32>,
}

/// `GET /api/sweeps/{id}/leaderboard?limit=N`: `{"sweep": ID, "rows": [LeaderboardRow, ...]}`,
/// best mean top-1 first.
pub(super) async fn leaderboard(
    State(dashboard): State<Dashboard>,
    Path(sweep): Path<String>,
    Query(query): Query<RowsQuery>,
) -> Result<Json<Value>, JsonProblem> {
    let id = parse_sweep(&sweep)?;
    // An unknown sweep is a 404, not an empty leaderboard.
    dashboard.coordinator.get_sweep(id).await?;
    let filter = LeaderboardFilter {
        sweep: Some(id),
        limit: query.limit.unwrap_or(DEFAULT_ROWS).clamp(1, MAX_ROWS),
        ..LeaderboardFilter::default()
    };
    let rows = dashboard.coordinator.leaderboard(&filter).await?;
    Ok(Json(json!({ "sweep": id, "rows": rows })))
}

/// `GET /api/sweeps/{id}/analytics`: the sweep's [`SweepAnalytics`].
pub(super) async fn analytics(
    State(dashboard): State<Dashboard>,
    Path(sweep): Path<String>,
) -> Result<Json<SweepAnalytics>, JsonProblem> {
    let id = parse_sweep(&sweep)?;
    dashboard.coordinator.get_sweep(id).await?;
    Ok(Json(dashboard.coordinator.sweep_analytics(id).await?))
}

/// `GET /api/trials/{id}`: the trial's history (attempts, epochs, result, late results).
pub(super) async fn trial(
    State(dashboard): State<Dashboard>,
    Path(trial): Path<String>,
) -> Result<Json<TrialHistory>, JsonProblem> {
    let id = parse_trial(&trial)?;
    Ok(Json(dashboard.coordinator.trial_history(id).await?))
}
