//! Conversions between `deepmad.v1` wire messages and the coordinator's records
//! ([`crate::store`] types and [`crate::model`] ids and states).
//!
//! The design crate's types convert in `deepmad_proto::convert`; this module holds what needs
//! the coordinator's own types. Wire -> record conversions check their input and fail with
//! [`Error::InvalidArgument`] naming the wire field; record -> wire conversions are total.
//! Times travel as `google.protobuf.Timestamp`; counts as `uint64` on the wire and `i64` in
//! the store.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use deepmad_design::solver::Family;
use deepmad_proto::v1;
use prost_types::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::model::{AttemptState, DesignId, FailureClass, SweepState, TrialState, WorkerId};
use crate::store::{
    AttemptRecord, CompleteOutcome, DownstreamRecord, EpochMetrics, FailOutcome, FinalMetrics,
    HeartbeatOutcome, LeaderboardFilter, LeaderboardRow, Lease, NewGridPoint, NewWorker, Progress,
    ResultRecord, SweepCreated, SweepSummary, TrialCounts, TrialHistory,
};

fn invalid(field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Parses a UUID id (`SweepId`, `TrialId`, `AttemptId`, `WorkerId`, `LeaseToken`).
pub fn parse_id<T: FromStr>(text: &str, field: &str) -> Result<T, Error> {
    text.trim()
        .parse()
        .map_err(|_| invalid(field, format!("expected a UUID, got {text:?}")))
}

/// Parses a design id: 64 lowercase hex digits (a SHA-256).
pub fn parse_design_id(text: &str, field: &str) -> Result<DesignId, Error> {
    let text = text.trim();
    let is_hash = text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !is_hash {
        return Err(invalid(
            field,
            format!("expected 64 lowercase hex digits, got {text:?}"),
        ));
    }
    Ok(DesignId(text.to_string()))
}

/// Returns the wire timestamp of `time`.
pub fn timestamp(time: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).expect("nanoseconds below 2e9"),
    }
}

/// Reads a wire timestamp.
pub fn datetime(timestamp: &Timestamp, field: &str) -> Result<DateTime<Utc>, Error> {
    let nanos =
        u32::try_from(timestamp.nanos).map_err(|_| invalid(field, "negative nanoseconds"))?;
    DateTime::from_timestamp(timestamp.seconds, nanos).ok_or_else(|| invalid(field, "out of range"))
}

/// Converts a count the store keeps as `i64` (never negative by its constraints).
fn count_to_wire(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Converts a wire count to the store's `i64`, naming the field when it is too large.
pub fn count_from_wire(value: u64, field: &str) -> Result<i64, Error> {
    i64::try_from(value).map_err(|_| invalid(field, format!("{value} is too large")))
}

fn non_negative_i32(value: u32, field: &str) -> Result<i32, Error> {
    i32::try_from(value).map_err(|_| invalid(field, format!("{value} is too large")))
}

/// Returns the wire family of a stored family name (`mbconv-se`); an unknown name (a newer
/// coordinator's family in a shared database) is `FAMILY_UNSPECIFIED`.
pub fn family_to_wire(name: &str) -> i32 {
    match Family::parse(name) {
        Ok(family) => v1::Family::from(family).into(),
        Err(_) => {
            tracing::warn!(family = name, "stored family has no wire value");
            v1::Family::Unspecified.into()
        }
    }
}

impl From<SweepState> for v1::SweepState {
    fn from(state: SweepState) -> v1::SweepState {
        match state {
            SweepState::Active => v1::SweepState::Active,
            SweepState::Cancelled => v1::SweepState::Cancelled,
            SweepState::Completed => v1::SweepState::Completed,
        }
    }
}

impl From<TrialState> for v1::TrialState {
    fn from(state: TrialState) -> v1::TrialState {
        match state {
            TrialState::Queued => v1::TrialState::Queued,
            TrialState::Running => v1::TrialState::Running,
            TrialState::Succeeded => v1::TrialState::Succeeded,
            TrialState::Failed => v1::TrialState::Failed,
            TrialState::Dead => v1::TrialState::Dead,
        }
    }
}

impl From<AttemptState> for v1::AttemptState {
    fn from(state: AttemptState) -> v1::AttemptState {
        match state {
            AttemptState::Running => v1::AttemptState::Running,
            AttemptState::Succeeded => v1::AttemptState::Succeeded,
            AttemptState::Failed => v1::AttemptState::Failed,
            AttemptState::Expired => v1::AttemptState::Expired,
            AttemptState::Cancelled => v1::AttemptState::Cancelled,
        }
    }
}

impl From<FailureClass> for v1::FailureClass {
    fn from(class: FailureClass) -> v1::FailureClass {
        match class {
            FailureClass::Deterministic => v1::FailureClass::Deterministic,
            FailureClass::Retryable => v1::FailureClass::Retryable,
            FailureClass::Lost => v1::FailureClass::Lost,
        }
    }
}

/// What a worker's fail report says: a failure of a class, or a graceful hand-back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reported {
    Failure(FailureClass),
    HandBack,
}

/// Reads what a worker reports: a deterministic or retryable failure, or a hand-back (lost
/// is the coordinator's own verdict on an expired lease).
pub fn reported_failure_class(value: i32, field: &str) -> Result<Reported, Error> {
    match v1::FailureClass::try_from(value) {
        Ok(v1::FailureClass::Deterministic) => Ok(Reported::Failure(FailureClass::Deterministic)),
        Ok(v1::FailureClass::Retryable) => Ok(Reported::Failure(FailureClass::Retryable)),
        Ok(v1::FailureClass::HandedBack) => Ok(Reported::HandBack),
        Ok(v1::FailureClass::Lost) => Err(invalid(field, "LOST is set by the coordinator only")),
        Ok(v1::FailureClass::Unspecified) => Err(invalid(
            field,
            "must be DETERMINISTIC, RETRYABLE or HANDED_BACK",
        )),
        Err(_) => Err(invalid(field, format!("unknown failure class {value}"))),
    }
}

impl From<TrialCounts> for v1::TrialCounts {
    fn from(counts: TrialCounts) -> v1::TrialCounts {
        v1::TrialCounts {
            queued: counts.queued,
            running: counts.running,
            succeeded: counts.succeeded,
            failed: counts.failed,
            dead: counts.dead,
        }
    }
}

impl From<&SweepSummary> for v1::SweepSummary {
    fn from(summary: &SweepSummary) -> v1::SweepSummary {
        v1::SweepSummary {
            sweep_id: summary.id.to_string(),
            name: summary.name.clone(),
            state: v1::SweepState::from(summary.state).into(),
            created_by: summary.created_by.clone(),
            created_at: Some(timestamp(summary.created_at)),
            dataset: summary.dataset.clone(),
            grid_points: summary.grid_points,
            infeasible_points: summary.infeasible_points,
            distinct_designs: summary.distinct_designs,
            counts: Some(summary.counts.into()),
            best_top1: summary.best_top1,
            best_design_id: summary.best_design.as_ref().map(|id| id.0.clone()),
        }
    }
}

/// Returns the answer to `CreateSweep`.
pub fn create_sweep_response(
    sweep_id: crate::model::SweepId,
    created: &SweepCreated,
    infeasible: Vec<v1::InfeasiblePoint>,
) -> v1::CreateSweepResponse {
    v1::CreateSweepResponse {
        sweep_id: sweep_id.to_string(),
        grid_points: created.grid_points,
        infeasible_points: created.infeasible_points,
        distinct_designs: created.distinct_designs,
        new_trials: created.new_trials,
        reused_results: created.reused_results,
        shared_trials: created.shared_trials,
        infeasible,
        downstream_linked: created.downstream_linked,
    }
}

/// Returns the wire form of an infeasible grid point, or `None` for a solved one.
pub fn infeasible_point(point: &NewGridPoint) -> Option<v1::InfeasiblePoint> {
    let reason = point.infeasible_reason.clone()?;
    Some(v1::InfeasiblePoint {
        index: u32::try_from(point.index).unwrap_or(0),
        family: family_to_wire(&point.family),
        rho: point.rho,
        alpha: serde_json::from_str(&point.alpha_json).unwrap_or_default(),
        params: point.params_budget.map(count_to_wire),
        flops: point.flops_budget.map(count_to_wire),
        reason,
    })
}

/// A device as `workers.devices_json` stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub kind: String,
    pub index: u32,
    pub name: String,
    pub memory_bytes: Option<u64>,
}

/// Reads a `Register` request into the worker record to store.
pub fn worker_from_proto(request: &v1::RegisterRequest) -> Result<NewWorker, Error> {
    let id: WorkerId = parse_id(&request.worker_id, "worker_id")?;
    let name = request.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(invalid("name", "must be 1 to 200 characters"));
    }
    let mut devices = Vec::with_capacity(request.devices.len());
    for (index, device) in request.devices.iter().enumerate() {
        if !matches!(device.kind.as_str(), "cpu" | "cuda") {
            let field = format!("devices[{index}].kind");
            return Err(invalid(
                &field,
                format!("expected cpu or cuda, got {:?}", device.kind),
            ));
        }
        devices.push(DeviceRecord {
            kind: device.kind.clone(),
            index: device.index,
            name: device.name.clone(),
            memory_bytes: device.memory_bytes,
        });
    }
    Ok(NewWorker {
        id,
        name: name.to_string(),
        devices_json: serde_json::to_string(&devices).expect("devices serialize"),
        protocol_version: i32::try_from(request.protocol_version).unwrap_or(i32::MAX),
    })
}

impl From<&Lease> for v1::Assignment {
    fn from(lease: &Lease) -> v1::Assignment {
        v1::Assignment {
            attempt_id: lease.attempt.to_string(),
            lease_token: lease.token.to_string(),
            trial_id: lease.trial.to_string(),
            design_id: lease.design_id.0.clone(),
            architecture_json: lease.architecture_json.clone(),
            recipe_json: lease.recipe_json.clone(),
            dataset: lease.dataset.clone(),
            seed: lease.seed,
            expires_at: Some(timestamp(lease.expires_at)),
            task: lease.task.clone(),
            parent_trial_id: lease.parent.map(|parent| parent.to_string()),
            upload_weights: lease.upload_weights,
        }
    }
}

// Reported metrics are checked against their ranges, not only for finiteness (issue 24): a
// result of top-1 = 1e300 would otherwise be recorded and rank first. NaN is in no range.

/// Checks an accuracy: a fraction of the test images.
fn fraction(value: f64, field: &str) -> Result<f64, Error> {
    if !(0.0..=1.0).contains(&value) {
        return Err(invalid(field, format!("must be in [0, 1], got {value}")));
    }
    Ok(value)
}

/// Checks a loss, a rate or a duration.
fn non_negative(value: f64, field: &str) -> Result<f64, Error> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(invalid(
            field,
            format!("must be a finite number >= 0, got {value}"),
        ));
    }
    Ok(value)
}

/// Checks that top-5 is at least top-1 (the five best guesses include the best); `field` is
/// the path of the metrics (`metrics`, `epochs[2]`).
fn top5_not_below_top1(top1: f64, top5: f64, field: &str) -> Result<(), Error> {
    if top5 < top1 {
        return Err(invalid(
            &format!("{field}.top5"),
            format!("is {top5}, below top1 {top1}"),
        ));
    }
    Ok(())
}

/// Reads heartbeat progress (absent progress is epoch 0, step 0).
pub fn progress_from_proto(progress: Option<&v1::Progress>) -> Result<Progress, Error> {
    let Some(progress) = progress else {
        return Ok(Progress::default());
    };
    Ok(Progress {
        epoch: non_negative_i32(progress.epoch, "progress.epoch")?,
        step: count_from_wire(progress.step, "progress.step")?,
        loss: progress
            .loss
            .map(|loss| non_negative(loss, "progress.loss"))
            .transpose()?,
        top1: progress
            .top1
            .map(|top1| fraction(top1, "progress.top1"))
            .transpose()?,
        images_per_second: progress
            .images_per_second
            .map(|rate| non_negative(rate, "progress.images_per_second"))
            .transpose()?,
    })
}

/// Reads one epoch's metrics; `field` is its path (`epochs[3]`).
pub fn epoch_metrics_from_proto(
    wire: &v1::EpochMetrics,
    field: &str,
) -> Result<EpochMetrics, Error> {
    let named = |name: &str| format!("{field}.{name}");
    let top1 = fraction(wire.top1, &named("top1"))?;
    let top5 = fraction(wire.top5, &named("top5"))?;
    top5_not_below_top1(top1, top5, field)?;
    Ok(EpochMetrics {
        epoch: non_negative_i32(wire.epoch, &named("epoch"))?,
        train_loss: non_negative(wire.train_loss, &named("train_loss"))?,
        test_loss: non_negative(wire.test_loss, &named("test_loss"))?,
        top1,
        top5,
        images_per_second: non_negative(wire.images_per_second, &named("images_per_second"))?,
        learning_rate: non_negative(wire.learning_rate, &named("learning_rate"))?,
    })
}

/// Reads a list of epoch metrics; `field` is the list's name (`epochs`).
pub fn epochs_from_proto(
    wire: &[v1::EpochMetrics],
    field: &str,
) -> Result<Vec<EpochMetrics>, Error> {
    wire.iter()
        .enumerate()
        .map(|(index, epoch)| epoch_metrics_from_proto(epoch, &format!("{field}[{index}]")))
        .collect()
}

impl From<&EpochMetrics> for v1::EpochMetrics {
    fn from(metrics: &EpochMetrics) -> v1::EpochMetrics {
        v1::EpochMetrics {
            epoch: u32::try_from(metrics.epoch).unwrap_or(0),
            train_loss: metrics.train_loss,
            test_loss: metrics.test_loss,
            top1: metrics.top1,
            top5: metrics.top5,
            images_per_second: metrics.images_per_second,
            learning_rate: metrics.learning_rate,
        }
    }
}

/// Reads a completion's final metrics (the field is `metrics` in `CompleteRequest`).
pub fn final_metrics_from_proto(wire: Option<&v1::FinalMetrics>) -> Result<FinalMetrics, Error> {
    let wire = wire.ok_or_else(|| invalid("metrics", "must be set"))?;
    let top1 = fraction(wire.top1, "metrics.top1")?;
    let top5 = fraction(wire.top5, "metrics.top5")?;
    top5_not_below_top1(top1, top5, "metrics")?;
    Ok(FinalMetrics {
        top1,
        top5,
        test_loss: non_negative(wire.test_loss, "metrics.test_loss")?,
        train_seconds: non_negative(wire.train_seconds, "metrics.train_seconds")?,
        epochs: non_negative_i32(wire.epochs, "metrics.epochs")?,
        dataset_hash: wire.dataset_hash.clone(),
        checkpoint: wire.checkpoint.clone(),
        epochs_metrics: epochs_from_proto(&wire.epoch_metrics, "metrics.epoch_metrics")?,
    })
}

impl From<&FinalMetrics> for v1::FinalMetrics {
    fn from(metrics: &FinalMetrics) -> v1::FinalMetrics {
        v1::FinalMetrics {
            top1: metrics.top1,
            top5: metrics.top5,
            test_loss: metrics.test_loss,
            train_seconds: metrics.train_seconds,
            epochs: u32::try_from(metrics.epochs).unwrap_or(0),
            dataset_hash: metrics.dataset_hash.clone(),
            checkpoint: metrics.checkpoint.clone(),
            epoch_metrics: metrics.epochs_metrics.iter().map(Into::into).collect(),
        }
    }
}

impl From<&HeartbeatOutcome> for v1::HeartbeatResponse {
    fn from(outcome: &HeartbeatOutcome) -> v1::HeartbeatResponse {
        use v1::heartbeat_response::Directive;
        let (directive, expires_at) = match outcome {
            HeartbeatOutcome::Continue { expires_at } => {
                (Directive::Continue, Some(timestamp(*expires_at)))
            }
            HeartbeatOutcome::LeaseLost => (Directive::StopLeaseLost, None),
            HeartbeatOutcome::Cancelled => (Directive::StopCancelled, None),
        };
        v1::HeartbeatResponse {
            directive: directive.into(),
            expires_at,
        }
    }
}

impl From<CompleteOutcome> for v1::CompleteResponse {
    fn from(outcome: CompleteOutcome) -> v1::CompleteResponse {
        use v1::complete_response::Outcome;
        let outcome = match outcome {
            CompleteOutcome::Recorded => Outcome::Recorded,
            CompleteOutcome::Duplicate => Outcome::Duplicate,
            CompleteOutcome::Late => Outcome::Late,
        };
        v1::CompleteResponse {
            outcome: outcome.into(),
        }
    }
}

impl From<&FailOutcome> for v1::FailResponse {
    fn from(outcome: &FailOutcome) -> v1::FailResponse {
        use v1::fail_response::Outcome;
        let mut response = v1::FailResponse::default();
        match outcome {
            FailOutcome::Requeued { not_before } => {
                response.set_outcome(Outcome::Requeued);
                response.not_before = Some(timestamp(*not_before));
            }
            FailOutcome::Stopped { state } => {
                response.set_outcome(Outcome::Stopped);
                response.set_trial_state(v1::TrialState::from(*state));
            }
            FailOutcome::NotLeaseHolder => response.set_outcome(Outcome::NotLeaseHolder),
        }
        response
    }
}

/// Reads a leaderboard request; a `limit` of 0 is `default_limit`, and no limit exceeds
/// `max_limit`.
pub fn leaderboard_filter_from_proto(
    request: &v1::LeaderboardRequest,
    default_limit: u32,
    max_limit: u32,
) -> Result<LeaderboardFilter, Error> {
    let sweep = match &request.sweep_id {
        Some(text) => Some(parse_id(text, "sweep_id")?),
        None => None,
    };
    let family = match v1::Family::try_from(request.family) {
        Ok(v1::Family::Unspecified) => None,
        Ok(_) => Some(
            deepmad_proto::convert::family_from_proto(request.family, "family")?
                .name()
                .to_string(),
        ),
        Err(_) => {
            return Err(invalid(
                "family",
                format!("unknown family {}", request.family),
            ))
        }
    };
    let min_params = request
        .min_params
        .map(|v| count_from_wire(v, "min_params"))
        .transpose()?;
    let max_params = request
        .max_params
        .map(|v| count_from_wire(v, "max_params"))
        .transpose()?;
    if let (Some(min), Some(max)) = (min_params, max_params) {
        if min > max {
            return Err(invalid(
                "min_params",
                format!("{min} is above max_params {max}"),
            ));
        }
    }
    let max_flops = request
        .max_flops
        .map(|v| count_from_wire(v, "max_flops"))
        .transpose()?;
    let limit = if request.limit == 0 {
        default_limit
    } else {
        request.limit
    };
    Ok(LeaderboardFilter {
        sweep,
        dataset: request
            .dataset
            .clone()
            .filter(|dataset| !dataset.is_empty()),
        family,
        min_params,
        max_params,
        max_flops,
        limit: limit.min(max_limit),
    })
}

impl From<&LeaderboardRow> for v1::LeaderboardRow {
    fn from(row: &LeaderboardRow) -> v1::LeaderboardRow {
        v1::LeaderboardRow {
            design_id: row.design_id.0.clone(),
            family: family_to_wire(&row.family),
            dataset: row.dataset.clone(),
            recipe_hash: row.recipe_hash.clone(),
            params: count_to_wire(row.params),
            flops: count_to_wire(row.flops),
            layers: u32::try_from(row.layers).unwrap_or(0),
            effectiveness: row.effectiveness,
            entropy: row.entropy,
            rho: row.rho,
            seeds: row.seeds,
            top1_mean: row.top1_mean,
            top1_std: row.top1_std,
            top5_mean: row.top5_mean,
            downstream: row
                .downstream
                .iter()
                .map(|score| v1::DownstreamScore {
                    name: score.name.clone(),
                    task: score.kind.clone(),
                    dataset: score.dataset.clone(),
                    seeds: score.seeds,
                    top1_mean: score.top1_mean,
                    top1_std: score.top1_std,
                    top5_mean: score.top5_mean,
                })
                .collect(),
        }
    }
}

impl From<&DownstreamRecord> for v1::DownstreamRow {
    fn from(record: &DownstreamRecord) -> v1::DownstreamRow {
        v1::DownstreamRow {
            trial_id: record.trial.to_string(),
            parent_trial_id: record.parent.to_string(),
            design_id: record.design_id.0.clone(),
            seed: record.seed,
            name: record.name.clone(),
            task: record.kind.clone(),
            dataset: record.dataset.clone(),
            state: v1::TrialState::from(record.state) as i32,
            top1: record.top1,
            top5: record.top5,
            test_loss: record.test_loss,
            epochs: record.epochs.and_then(|epochs| u32::try_from(epochs).ok()),
            upstream_dataset: record.upstream_dataset.clone(),
            upstream_recipe_hash: record.upstream_recipe_hash.clone(),
        }
    }
}

impl From<&AttemptRecord> for v1::Attempt {
    fn from(attempt: &AttemptRecord) -> v1::Attempt {
        v1::Attempt {
            attempt_id: attempt.id.to_string(),
            worker_id: attempt.worker.to_string(),
            state: v1::AttemptState::from(attempt.state).into(),
            leased_at: Some(timestamp(attempt.leased_at)),
            lease_expires_at: Some(timestamp(attempt.lease_expires_at)),
            finished_at: attempt.finished_at.map(timestamp),
            failure_class: attempt
                .failure_class
                .map_or(v1::FailureClass::Unspecified, v1::FailureClass::from)
                .into(),
            failure_message: attempt.failure_message.clone(),
        }
    }
}

impl From<&TrialHistory> for v1::TrialHistoryResponse {
    fn from(history: &TrialHistory) -> v1::TrialHistoryResponse {
        v1::TrialHistoryResponse {
            trial_id: history.trial.to_string(),
            design_id: history.design_id.0.clone(),
            dataset: history.dataset.clone(),
            seed: history.seed,
            state: v1::TrialState::from(history.state).into(),
            attempts: history.attempts.iter().map(Into::into).collect(),
            epochs: history.epochs.iter().map(Into::into).collect(),
            result: history.result.as_ref().map(Into::into),
            late_results: history
                .late_results
                .iter()
                .map(|(attempt, metrics)| v1::LateResult {
                    attempt_id: attempt.to_string(),
                    metrics: Some(metrics.into()),
                })
                .collect(),
        }
    }
}

impl From<&ResultRecord> for v1::ResultRow {
    fn from(record: &ResultRecord) -> v1::ResultRow {
        v1::ResultRow {
            trial_id: record.trial.to_string(),
            design_id: record.design_id.0.clone(),
            family: family_to_wire(&record.family),
            dataset: record.dataset.clone(),
            recipe_hash: record.recipe_hash.clone(),
            seed: record.seed,
            rho: record.rho,
            params: count_to_wire(record.params),
            flops: count_to_wire(record.flops),
            layers: u32::try_from(record.layers).unwrap_or(0),
            effectiveness: record.effectiveness,
            entropy: record.entropy,
            top1: record.top1,
            top5: record.top5,
            test_loss: record.test_loss,
            train_seconds: record.train_seconds,
            epochs: u32::try_from(record.epochs).unwrap_or(0),
        }
    }
}

mod sweep_spec;

pub use sweep_spec::{sweep_spec_from_proto, sweep_spec_to_proto};

#[cfg(test)]
mod tests;

impl From<&crate::analytics::SweepAnalytics> for v1::SweepAnalyticsResponse {
    fn from(analytics: &crate::analytics::SweepAnalytics) -> v1::SweepAnalyticsResponse {
        let count = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
        v1::SweepAnalyticsResponse {
            trials: count(analytics.trials),
            designs: analytics
                .designs
                .iter()
                .map(|design| v1::AnalyticsDesign {
                    design_id: design.design_id.clone(),
                    rho: design.rho,
                    params: design.params,
                    flops: design.flops,
                    entropy: design.entropy,
                    seeds: count(design.seeds),
                    top1_mean: design.top1_mean,
                    top1_std: design.top1_std,
                    pareto_params: design.pareto_params,
                    pareto_flops: design.pareto_flops,
                })
                .collect(),
            by_rho: analytics
                .by_rho
                .iter()
                .map(|group| v1::RhoGroup {
                    rho: group.rho,
                    designs: count(group.designs),
                    trials: count(group.trials),
                    top1_mean: group.top1_mean,
                    top1_std: group.top1_std,
                    top1_best: group.top1_best,
                    kendall_tau: group.kendall_tau,
                })
                .collect(),
            kendall_tau: analytics.kendall_tau,
            downstream: analytics
                .downstream
                .iter()
                .map(|agreement| v1::RankAgreement {
                    name: agreement.name.clone(),
                    task: agreement.kind.clone(),
                    dataset: agreement.dataset.clone(),
                    designs: count(agreement.designs),
                    kendall_tau: agreement.kendall_tau,
                    same_best: agreement.same_best(),
                    best_upstream: agreement.best_upstream.clone(),
                    best_downstream: agreement.best_downstream.clone(),
                })
                .collect(),
        }
    }
}

impl From<&v1::SweepAnalyticsResponse> for crate::analytics::SweepAnalytics {
    fn from(response: &v1::SweepAnalyticsResponse) -> crate::analytics::SweepAnalytics {
        crate::analytics::SweepAnalytics {
            trials: response.trials as usize,
            designs: response
                .designs
                .iter()
                .map(|design| crate::analytics::DesignPoint {
                    design_id: design.design_id.clone(),
                    rho: design.rho,
                    params: design.params,
                    flops: design.flops,
                    entropy: design.entropy,
                    seeds: design.seeds as usize,
                    top1_mean: design.top1_mean,
                    top1_std: design.top1_std,
                    pareto_params: design.pareto_params,
                    pareto_flops: design.pareto_flops,
                })
                .collect(),
            by_rho: response
                .by_rho
                .iter()
                .map(|group| crate::analytics::RhoGroup {
                    rho: group.rho,
                    designs: group.designs as usize,
                    trials: group.trials as usize,
                    top1_mean: group.top1_mean,
                    top1_std: group.top1_std,
                    top1_best: group.top1_best,
                    kendall_tau: group.kendall_tau,
                })
                .collect(),
            kendall_tau: response.kendall_tau,
            downstream: response
                .downstream
                .iter()
                .map(|agreement| crate::analytics::RankAgreement {
                    name: agreement.name.clone(),
                    kind: agreement.task.clone(),
                    dataset: agreement.dataset.clone(),
                    designs: agreement.designs as usize,
                    kendall_tau: agreement.kendall_tau,
                    best_upstream: agreement.best_upstream.clone(),
                    best_downstream: agreement.best_downstream.clone(),
                })
                .collect(),
        }
    }
}
