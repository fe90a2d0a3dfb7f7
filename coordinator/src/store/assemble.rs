//! Building the store's records from rows, shared by both backends once each has decoded
//! its own column encodings.

use super::rules::{shown_sweep_state, SweepPlan};
use super::types::{
    AttemptRecord, DownstreamRecord, DownstreamScore, EpochMetrics, FinalMetrics, LeaderboardRow,
    SweepCreated, SweepSummary, TrialCounts, TrialHistory,
};
use super::StoreError;
use crate::model::{
    AttemptId, AttemptState, DesignId, FailureClass, SweepId, SweepState, TrialId, TrialState,
};

use chrono::{DateTime, Utc};

/// A sweep row's columns that its summary shows.
#[derive(Clone, Debug)]
pub(crate) struct SweepRow {
    pub id: SweepId,
    pub name: String,
    pub state: SweepState,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub dataset: String,
    pub grid_points: i32,
    pub infeasible_points: i32,
    pub distinct_designs: i32,
}

/// Adds `count` trials in `state` to `counts`.
pub(crate) fn add_count(counts: &mut TrialCounts, state: TrialState, count: i64) {
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    match state {
        TrialState::Queued => counts.queued += count,
        TrialState::Running => counts.running += count,
        TrialState::Succeeded => counts.succeeded += count,
        TrialState::Failed => counts.failed += count,
        TrialState::Dead => counts.dead += count,
    }
}

/// Returns a sweep's summary from its row, its trial counts and its best leaderboard row.
pub(crate) fn sweep_summary(
    row: SweepRow,
    counts: TrialCounts,
    best: Option<LeaderboardRow>,
) -> SweepSummary {
    SweepSummary {
        id: row.id,
        name: row.name,
        state: shown_sweep_state(row.state, &counts),
        created_by: row.created_by,
        created_at: row.created_at,
        dataset: row.dataset,
        grid_points: row.grid_points.max(0) as u32,
        infeasible_points: row.infeasible_points.max(0) as u32,
        distinct_designs: row.distinct_designs.max(0) as u32,
        counts,
        best_top1: best.as_ref().map(|row| row.top1_mean),
        best_design: best.map(|row| row.design_id),
    }
}

/// A trial a new sweep links: one it inserted, or an existing one (with its state).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LinkedTrial {
    pub id: TrialId,
    pub new: bool,
    pub state: TrialState,
}

/// Returns what creating a sweep did, from its plan and the trials it linked.
pub(crate) fn created(plan: &SweepPlan, linked: &[LinkedTrial]) -> SweepCreated {
    let count = |keep: &dyn Fn(&LinkedTrial) -> bool| linked.iter().filter(|t| keep(t)).count();
    SweepCreated {
        grid_points: plan.grid_points,
        infeasible_points: plan.infeasible_points,
        distinct_designs: plan.designs.len() as u32,
        new_trials: count(&|t| t.new) as u32,
        reused_results: count(&|t| !t.new && t.state == TrialState::Succeeded) as u32,
        shared_trials: count(&|t| !t.new && t.state != TrialState::Succeeded) as u32,
        downstream_linked: 0,
    }
}

/// A design's columns that a leaderboard row shows.
#[derive(Clone, Debug)]
pub(crate) struct DesignColumns {
    pub design_id: DesignId,
    pub family: String,
    pub dataset: String,
    pub recipe_hash: String,
    pub params: i64,
    pub flops: i64,
    pub layers: i32,
    pub effectiveness: f64,
    pub entropy: f64,
    pub rho: Option<f64>,
}

/// Aggregates of a group of results (one per seed).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scores {
    pub seeds: i64,
    pub top1_mean: f64,
    /// Population variance of top-1 over the seeds.
    pub top1_variance: f64,
    pub top5_mean: f64,
}

/// Returns a leaderboard row from a design's columns and its scores.
pub(crate) fn leaderboard_row(design: DesignColumns, scores: Scores) -> LeaderboardRow {
    LeaderboardRow {
        design_id: design.design_id,
        family: design.family,
        dataset: design.dataset,
        recipe_hash: design.recipe_hash,
        params: design.params,
        flops: design.flops,
        layers: design.layers,
        effectiveness: design.effectiveness,
        entropy: design.entropy,
        rho: design.rho,
        seeds: u32::try_from(scores.seeds).unwrap_or(0),
        top1_mean: scores.top1_mean,
        // Rounding can leave a zero variance a hair below zero.
        top1_std: scores.top1_variance.max(0.0).sqrt(),
        top5_mean: scores.top5_mean,
        downstream: Vec::new(),
    }
}

/// Attaches to each leaderboard row the downstream results of its design's backbones trained
/// on the row's dataset and recipe: mean and population standard deviation over the seeds
/// with a result, per task (in the order the records first name the tasks).
pub(crate) fn attach_downstream(rows: &mut [LeaderboardRow], records: &[DownstreamRecord]) {
    for row in rows.iter_mut() {
        let mut tasks: Vec<(DownstreamScore, Vec<(f64, f64)>)> = Vec::new();
        for record in records.iter().filter(|record| {
            record.design_id == row.design_id
                && record.upstream_dataset == row.dataset
                && record.upstream_recipe_hash == row.recipe_hash
        }) {
            let (Some(top1), Some(top5)) = (record.top1, record.top5) else {
                continue;
            };
            let slot = match tasks
                .iter()
                .position(|(score, _)| score.task_hash == record.task_hash)
            {
                Some(slot) => slot,
                None => {
                    tasks.push((
                        DownstreamScore {
                            name: record.name.clone(),
                            kind: record.kind.clone(),
                            dataset: record.dataset.clone(),
                            task_hash: record.task_hash.clone(),
                            seeds: 0,
                            top1_mean: 0.0,
                            top1_std: 0.0,
                            top5_mean: 0.0,
                        },
                        Vec::new(),
                    ));
                    tasks.len() - 1
                }
            };
            tasks[slot].1.push((top1, top5));
        }
        row.downstream = tasks
            .into_iter()
            .map(|(mut score, values)| {
                let n = values.len() as f64;
                score.seeds = values.len() as u32;
                score.top1_mean = values.iter().map(|v| v.0).sum::<f64>() / n;
                score.top5_mean = values.iter().map(|v| v.1).sum::<f64>() / n;
                let variance = values
                    .iter()
                    .map(|v| (v.0 - score.top1_mean).powi(2))
                    .sum::<f64>()
                    / n;
                score.top1_std = variance.sqrt();
                score
            })
            .collect();
    }
}

/// A trial row's columns that its history shows.
#[derive(Clone, Debug)]
pub(crate) struct TrialHead {
    pub trial: TrialId,
    pub design_id: DesignId,
    pub dataset: String,
    pub seed: i64,
    pub state: TrialState,
}

/// Returns a trial's history. `attempts` are oldest first; each result's and late result's
/// `epochs_metrics` are its attempt's stored epochs, and the history's `epochs` are those of
/// the attempt that produced the result, or else of the latest attempt.
pub(crate) fn trial_history(
    head: TrialHead,
    attempts: Vec<AttemptRecord>,
    epochs: Vec<(AttemptId, EpochMetrics)>,
    result: Option<(AttemptId, FinalMetrics)>,
    late_results: Vec<(AttemptId, FinalMetrics)>,
) -> TrialHistory {
    let epochs_of = |attempt: AttemptId| -> Vec<EpochMetrics> {
        epochs
            .iter()
            .filter(|(id, _)| *id == attempt)
            .map(|(_, metrics)| metrics.clone())
            .collect()
    };
    let shown_attempt = match (&result, attempts.last()) {
        (Some((attempt, _)), _) => Some(*attempt),
        (None, Some(latest)) => Some(latest.id),
        (None, None) => None,
    };
    let with_epochs = |(attempt, mut metrics): (AttemptId, FinalMetrics)| {
        metrics.epochs_metrics = epochs_of(attempt);
        (attempt, metrics)
    };
    TrialHistory {
        trial: head.trial,
        design_id: head.design_id,
        dataset: head.dataset,
        seed: head.seed,
        state: head.state,
        epochs: shown_attempt.map(epochs_of).unwrap_or_default(),
        result: result.map(with_epochs).map(|(_, metrics)| metrics),
        late_results: late_results.into_iter().map(with_epochs).collect(),
        attempts,
    }
}

/// Parses a stored trial state.
pub(crate) fn trial_state(text: &str) -> Result<TrialState, StoreError> {
    TrialState::parse(text).ok_or_else(|| StoreError::corrupt("trial state", text))
}

/// Parses a stored sweep state.
pub(crate) fn sweep_state(text: &str) -> Result<SweepState, StoreError> {
    SweepState::parse(text).ok_or_else(|| StoreError::corrupt("sweep state", text))
}

/// Parses a stored attempt state.
pub(crate) fn attempt_state(text: &str) -> Result<AttemptState, StoreError> {
    AttemptState::parse(text).ok_or_else(|| StoreError::corrupt("attempt state", text))
}

/// Parses a stored failure class, if any.
pub(crate) fn failure_class(text: Option<&str>) -> Result<Option<FailureClass>, StoreError> {
    text.map(|text| {
        FailureClass::parse(text).ok_or_else(|| StoreError::corrupt("failure class", text))
    })
    .transpose()
}
