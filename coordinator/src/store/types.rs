//! The records the store takes and returns. Times are passed in (`now`) rather than read from
//! the clock, so lease expiry, backoff and grace periods are tested without sleeping.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{
    AttemptId, AttemptState, DesignId, FailureClass, LeaseToken, SweepId, SweepState, TrialId,
    TrialState, WorkerId,
};

/// A solved design to store (inserted once; the same hash from another sweep is reused).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewDesign {
    pub id: DesignId,
    /// Block family of the design problem (`basic`, `bottleneck`, `mbconv`, `mbconv-se`).
    pub family: String,
    /// `paper` or `tinynas`: which objective scored the numbers below.
    pub objective_kind: String,
    /// The canonical IR JSON (`Network::canonical_json`).
    pub architecture_json: String,
    pub params: i64,
    pub flops: i64,
    pub layers: i32,
    pub effectiveness: f64,
    pub entropy: f64,
    pub penalty: f64,
    pub objective: f64,
    pub resolution: i32,
    pub num_classes: i32,
    pub solver_version: String,
}

/// One grid point of a sweep: one solver problem and its outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewGridPoint {
    pub index: i32,
    pub family: String,
    pub objective_kind: String,
    pub rho: f64,
    /// The alpha vector as a JSON array.
    pub alpha_json: String,
    pub beta: f64,
    pub params_budget: Option<i64>,
    pub flops_budget: Option<i64>,
    pub resolution: i32,
    /// The solved design, or `None` when the point was infeasible.
    pub design_id: Option<DesignId>,
    /// The solver's reason when infeasible.
    pub infeasible_reason: Option<String>,
    pub solve_ms: f64,
}

/// A downstream task of a sweep (see `SweepSpec::tasks`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    pub index: i32,
    /// The leaderboard column's name, unique in the sweep.
    pub name: String,
    /// `linear-probe` or `finetune`.
    pub kind: String,
    pub dataset: String,
    /// The full recipe (the sweep's with the task's overrides), canonical JSON.
    pub recipe_json: String,
    /// SHA-256 of the canonical {kind, dataset, recipe}.
    pub task_hash: String,
}

/// Everything a new sweep writes, in one transaction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewSweep {
    pub id: SweepId,
    pub name: String,
    pub created_by: String,
    /// The request as the user gave it (JSON), kept for reproducibility.
    pub spec_json: String,
    /// Dataset spec, `KIND:PATH` (e.g. `idx:data/mnist-subset`).
    pub dataset: String,
    /// The training recipe (JSON) and the SHA-256 of its canonical form.
    pub recipe_json: String,
    pub recipe_hash: String,
    pub seeds: Vec<i64>,
    /// Deterministic failures allowed per trial before it is dead.
    pub max_attempts: i32,
    pub grid: Vec<NewGridPoint>,
    /// Downstream evaluations of each trained backbone.
    pub tasks: Vec<NewTask>,
    /// Distinct designs of the feasible grid points.
    pub designs: Vec<NewDesign>,
}

/// What creating a sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepCreated {
    pub grid_points: u32,
    pub infeasible_points: u32,
    pub distinct_designs: u32,
    /// Trials inserted by this sweep.
    pub new_trials: u32,
    /// Trials that already existed with a result: the sweep reuses the result.
    pub reused_results: u32,
    /// Trials that already existed without a result (queued or running elsewhere): shared.
    pub shared_trials: u32,
    /// Downstream trials queued (or linked) at once for the training results the sweep
    /// reuses; the others are queued as its training trials succeed.
    pub downstream_linked: u32,
}

/// Trial counts by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialCounts {
    pub queued: u32,
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub dead: u32,
}

/// A sweep as `get` and `list` return it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepSummary {
    pub id: SweepId,
    pub name: String,
    pub state: SweepState,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub dataset: String,
    pub grid_points: u32,
    pub infeasible_points: u32,
    pub distinct_designs: u32,
    pub counts: TrialCounts,
    /// Best mean top-1 over seeds among the sweep's designs, if any result exists.
    pub best_top1: Option<f64>,
    pub best_design: Option<DesignId>,
}

/// A worker registering (a fresh incarnation each start).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewWorker {
    pub id: WorkerId,
    pub name: String,
    pub devices_json: String,
    pub protocol_version: i32,
}

/// A lease handed to a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub attempt: AttemptId,
    pub token: LeaseToken,
    pub trial: TrialId,
    pub design_id: DesignId,
    pub architecture_json: String,
    pub recipe_json: String,
    pub dataset: String,
    pub seed: i64,
    pub expires_at: DateTime<Utc>,
    /// `train`, or the downstream task (`linear-probe`, `finetune`) this trial runs.
    pub task: String,
    /// A downstream trial's training trial, whose trained weights it starts from.
    pub parent: Option<TrialId>,
    /// Whether the worker should upload the trained weights before completing: a training
    /// trial held by a sweep with downstream tasks.
    pub upload_weights: bool,
}

/// An attempt that holds its lease, as a weights upload or download checks it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeasedTrial {
    pub trial: TrialId,
    pub task: String,
    pub parent: Option<TrialId>,
    /// The attempt whose result is the parent's result (its weights are the parent's).
    pub parent_result_attempt: Option<AttemptId>,
    /// Whether a downstream task of a sweep that needs this trial will read its weights.
    pub wants_weights: bool,
    /// The design's parameter count (bounds the size of its weights).
    pub design_params: i64,
}

/// Progress a heartbeat carries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub epoch: i32,
    pub step: i64,
    pub loss: Option<f64>,
    pub top1: Option<f64>,
    pub images_per_second: Option<f64>,
}

/// Metrics of one finished epoch (evaluated on the held-out split).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: i32,
    pub train_loss: f64,
    pub test_loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub images_per_second: f64,
    pub learning_rate: f64,
}

/// What the coordinator tells a heartbeating worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HeartbeatOutcome {
    /// Keep going; the lease now runs until `expires_at`.
    Continue { expires_at: DateTime<Utc> },
    /// The token no longer holds the lease (expired and reaped, or re-leased): stop.
    LeaseLost,
    /// Every sweep of the trial was cancelled: stop.
    Cancelled,
}

/// Final metrics of a trial.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinalMetrics {
    pub top1: f64,
    pub top5: f64,
    pub test_loss: f64,
    pub train_seconds: f64,
    pub epochs: i32,
    /// SHA-256 of the dataset files the worker trained on.
    pub dataset_hash: String,
    /// Where the worker keeps the final checkpoint.
    pub checkpoint: Option<String>,
    /// Per-epoch metrics not yet sent with a heartbeat.
    pub epochs_metrics: Vec<EpochMetrics>,
}

/// What a completion did. Completion is idempotent per attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompleteOutcome {
    /// The result is the trial's result.
    Recorded,
    /// This attempt's completion was already recorded: nothing changed.
    Duplicate,
    /// The attempt was fenced out (its lease expired, the trial moved on): the report is kept
    /// as a late result, never counted as the trial's result.
    Late,
}

/// What a failure report did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FailOutcome {
    /// The trial is queued again, not before `not_before`.
    Requeued { not_before: DateTime<Utc> },
    /// A deterministic failure: the trial is `failed` (or `dead` past the retry limit).
    Stopped { state: TrialState },
    /// The attempt no longer held the lease: nothing changed.
    NotLeaseHolder,
}

/// Retry and backoff policy (from the coordinator's settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Backoff before the first retry; doubled for each earlier retry of the trial.
    pub backoff_base_ms: i64,
    pub backoff_max_ms: i64,
    /// Retries after lost workers or retryable failures before a trial is dead (they do not
    /// count against `max_attempts`, but an endless loop must end somewhere).
    pub max_requeues: i32,
}

/// Filters of a leaderboard query.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LeaderboardFilter {
    pub sweep: Option<SweepId>,
    pub dataset: Option<String>,
    pub family: Option<String>,
    pub min_params: Option<i64>,
    pub max_params: Option<i64>,
    /// Designs of at most this many FLOPs.
    pub max_flops: Option<i64>,
    pub limit: u32,
}

/// One leaderboard row: a design's results on a (dataset, recipe), over seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaderboardRow {
    pub design_id: DesignId,
    pub family: String,
    pub dataset: String,
    pub recipe_hash: String,
    pub params: i64,
    pub flops: i64,
    pub layers: i32,
    pub effectiveness: f64,
    pub entropy: f64,
    /// The smallest rho0 among the grid points that produced the design (in the filtered sweep).
    pub rho: Option<f64>,
    pub seeds: u32,
    pub top1_mean: f64,
    /// Population standard deviation over seeds (0 with one seed).
    pub top1_std: f64,
    pub top5_mean: f64,
    /// Downstream results of the design's backbones (this dataset and recipe), per task.
    pub downstream: Vec<DownstreamScore>,
}

/// A downstream task's results for one leaderboard row, over seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DownstreamScore {
    /// The sweep's name of the task; across sweeps `KIND:DATASET`.
    pub name: String,
    pub kind: String,
    pub dataset: String,
    pub task_hash: String,
    pub seeds: u32,
    pub top1_mean: f64,
    /// Population standard deviation over seeds.
    pub top1_std: f64,
    pub top5_mean: f64,
}

/// One downstream trial of a sweep, with its result once it has one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DownstreamRecord {
    pub trial: TrialId,
    /// The training trial whose weights it starts from.
    pub parent: TrialId,
    pub design_id: DesignId,
    /// The training trial's dataset and recipe hash (the leaderboard row it belongs to).
    pub upstream_dataset: String,
    pub upstream_recipe_hash: String,
    pub seed: i64,
    /// The task's name in the sweep (`KIND:DATASET` when read across sweeps).
    pub name: String,
    pub kind: String,
    pub dataset: String,
    pub task_hash: String,
    pub state: TrialState,
    pub top1: Option<f64>,
    pub top5: Option<f64>,
    pub test_loss: Option<f64>,
    pub epochs: Option<i32>,
}

/// A trial's whole history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrialHistory {
    pub trial: TrialId,
    pub design_id: DesignId,
    pub dataset: String,
    pub seed: i64,
    pub state: TrialState,
    pub attempts: Vec<AttemptRecord>,
    pub epochs: Vec<EpochMetrics>,
    pub result: Option<FinalMetrics>,
    /// Reports from fenced-out attempts, kept but not counted.
    pub late_results: Vec<(AttemptId, FinalMetrics)>,
}

/// One attempt as the history shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub id: AttemptId,
    pub worker: WorkerId,
    pub state: AttemptState,
    pub leased_at: DateTime<Utc>,
    pub lease_expires_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub failure_class: Option<FailureClass>,
    pub failure_message: Option<String>,
}

/// Connection pool settings of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    /// Most connections the pool opens (on SQLite: readers; writes share one connection).
    pub max_connections: u32,
    /// How long a caller waits for a connection before the store reports `Unavailable`.
    pub acquire_timeout: std::time::Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_connections: 16,
            acquire_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// One trial's result, with its design's numbers, as `deepmad results` exports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub trial: TrialId,
    pub design_id: DesignId,
    pub family: String,
    pub dataset: String,
    pub recipe_hash: String,
    pub seed: i64,
    /// The smallest rho0 among the sweep's grid points that produced the design.
    pub rho: Option<f64>,
    pub params: i64,
    pub flops: i64,
    pub layers: i32,
    pub effectiveness: f64,
    pub entropy: f64,
    pub top1: f64,
    pub top5: f64,
    pub test_loss: f64,
    pub train_seconds: f64,
    pub epochs: i32,
}
