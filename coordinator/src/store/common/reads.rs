//! Reads on both backends: leaderboards, trial histories and counts. None of them locks
//! rows; on SQLite they run on the reader pool, which WAL lets read while the writer writes.

use chrono::{DateTime, Utc};

use crate::model::{AttemptId, DesignId, SweepId, TrialId, TrialState, WorkerId};
use crate::store::assemble::{
    add_count, attempt_state, failure_class, leaderboard_row, trial_history, trial_state,
    DesignColumns, Scores, TrialHead,
};
use crate::store::rules::leaderboard_limit;
use crate::store::sql::{Arg, Db, Id, Time};
use crate::store::types::{
    AttemptRecord, EpochMetrics, FinalMetrics, LeaderboardFilter, LeaderboardRow, ResultRecord,
    TrialCounts, TrialHistory,
};
use crate::store::StoreError;

/// The cross-sweep leaderboard reads the running aggregates of `design_scores` in
/// `top1_mean` order off its index and stops after `limit` rows, instead of grouping every
/// result.
const LEADERBOARD_ALL: &str = "\
    SELECT s.design_id, d.family, s.dataset, s.recipe_hash, d.params, d.flops, d.layers, \
        d.effectiveness, d.entropy, \
        (SELECT min(g.rho) FROM grid_points g WHERE g.design_id = s.design_id) AS rho, \
        CAST(s.seeds AS bigint) AS seeds, s.top1_mean, s.top1_m2 / s.seeds AS top1_variance, \
        s.top5_mean \
    FROM design_scores s JOIN designs d ON d.id = s.design_id \
    WHERE (CAST($1 AS text) IS NULL OR s.dataset = $1) \
        AND (CAST($2 AS text) IS NULL OR s.family = $2) \
        AND (CAST($3 AS bigint) IS NULL OR d.params >= $3) \
        AND (CAST($4 AS bigint) IS NULL OR d.params <= $4) \
        AND (CAST($6 AS bigint) IS NULL OR d.flops <= $6) \
    ORDER BY s.top1_mean DESC, s.design_id, s.dataset, s.recipe_hash \
    LIMIT $5";

/// A sweep's leaderboard reads the sweep's running aggregates (`sweep_scores`, over exactly
/// the sweep's seeds) in `top1_mean` order off their index.
const LEADERBOARD_SWEEP: &str = "\
    SELECT s.design_id, s.family, s.dataset, s.recipe_hash, d.params, d.flops, d.layers, \
        d.effectiveness, d.entropy, \
        (SELECT min(p.rho) FROM grid_points p \
            WHERE p.sweep_id = $7 AND p.design_id = s.design_id) AS rho, \
        CAST(s.seeds AS bigint) AS seeds, s.top1_mean, s.top1_m2 / s.seeds AS top1_variance, \
        s.top5_mean \
    FROM sweep_scores s JOIN designs d ON d.id = s.design_id \
    WHERE s.sweep_id = $7 AND (CAST($1 AS text) IS NULL OR s.dataset = $1) \
        AND (CAST($2 AS text) IS NULL OR s.family = $2) \
        AND (CAST($3 AS bigint) IS NULL OR d.params >= $3) \
        AND (CAST($4 AS bigint) IS NULL OR d.params <= $4) \
        AND (CAST($6 AS bigint) IS NULL OR d.flops <= $6) \
    ORDER BY s.top1_mean DESC, s.design_id, s.dataset, s.recipe_hash \
    LIMIT $5";

#[derive(sqlx::FromRow)]
struct LeaderboardColumns {
    design_id: String,
    family: String,
    dataset: String,
    recipe_hash: String,
    params: i64,
    flops: i64,
    layers: i32,
    effectiveness: f64,
    entropy: f64,
    rho: Option<f64>,
    seeds: i64,
    top1_mean: f64,
    top1_variance: f64,
    top5_mean: f64,
}

pub(crate) async fn leaderboard(
    db: &mut Db<'_>,
    filter: &LeaderboardFilter,
) -> Result<Vec<LeaderboardRow>, StoreError> {
    let mut args = vec![
        Arg::OptText(filter.dataset.as_deref()),
        Arg::OptText(filter.family.as_deref()),
        Arg::OptBigInt(filter.min_params),
        Arg::OptBigInt(filter.max_params),
        Arg::BigInt(leaderboard_limit(filter.limit)),
        Arg::OptBigInt(filter.max_flops),
    ];
    let sql = match filter.sweep {
        Some(sweep) => {
            args.push(Arg::Id(sweep.0));
            LEADERBOARD_SWEEP
        }
        None => LEADERBOARD_ALL,
    };
    let rows: Vec<LeaderboardColumns> = db.fetch_all(sql, &args).await?;
    Ok(rows.into_iter().map(LeaderboardColumns::into_row).collect())
}

impl LeaderboardColumns {
    fn into_row(self) -> LeaderboardRow {
        let design = DesignColumns {
            design_id: DesignId(self.design_id),
            family: self.family,
            dataset: self.dataset,
            recipe_hash: self.recipe_hash,
            params: self.params,
            flops: self.flops,
            layers: self.layers,
            effectiveness: self.effectiveness,
            entropy: self.entropy,
            rho: self.rho,
        };
        let scores = Scores {
            seeds: self.seeds,
            top1_mean: self.top1_mean,
            top1_variance: self.top1_variance,
            top5_mean: self.top5_mean,
        };
        leaderboard_row(design, scores)
    }
}

#[derive(sqlx::FromRow)]
struct TrialHeadRow {
    design_id: String,
    dataset: String,
    seed: i64,
    state: String,
}

pub(crate) async fn get_trial_history(
    db: &mut Db<'_>,
    trial: TrialId,
) -> Result<TrialHistory, StoreError> {
    let id = [Arg::Id(trial.0)];
    let head: TrialHeadRow = db
        .fetch_optional(
            "SELECT design_id, dataset, seed, state FROM trials WHERE id = $1",
            &id,
        )
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "trial",
            id: trial.to_string(),
        })?;
    let head = TrialHead {
        trial,
        design_id: DesignId(head.design_id),
        dataset: head.dataset,
        seed: head.seed,
        state: trial_state(&head.state)?,
    };
    let attempts = attempts_of(db, trial).await?;
    let epochs = epochs_of(db, trial).await?;
    let result: Option<MetricsRow> = db
        .fetch_optional(
            &format!("{METRICS_COLUMNS} FROM results WHERE trial_id = $1"),
            &id,
        )
        .await?;
    let late_results: Vec<MetricsRow> = db
        .fetch_all(
            &format!(
                "{METRICS_COLUMNS} FROM late_results WHERE trial_id = $1 \
                 ORDER BY received_at, attempt_id"
            ),
            &id,
        )
        .await?;
    Ok(trial_history(
        head,
        attempts,
        epochs,
        result.map(MetricsRow::into_metrics),
        late_results
            .into_iter()
            .map(MetricsRow::into_metrics)
            .collect(),
    ))
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    id: Id,
    worker_id: Id,
    state: String,
    leased_at: Time,
    lease_expires_at: Time,
    finished_at: Option<Time>,
    failure_class: Option<String>,
    failure_message: Option<String>,
}

async fn attempts_of(db: &mut Db<'_>, trial: TrialId) -> Result<Vec<AttemptRecord>, StoreError> {
    let rows: Vec<AttemptRow> = db
        .fetch_all(
            "SELECT id, worker_id, state, leased_at, lease_expires_at, finished_at, \
                 failure_class, failure_message \
             FROM attempts WHERE trial_id = $1 ORDER BY leased_at, id",
            &[Arg::Id(trial.0)],
        )
        .await?;
    rows.into_iter()
        .map(|row| {
            Ok(AttemptRecord {
                id: AttemptId(row.id.0),
                worker: WorkerId(row.worker_id.0),
                state: attempt_state(&row.state)?,
                leased_at: row.leased_at.0,
                lease_expires_at: row.lease_expires_at.0,
                finished_at: row.finished_at.map(|time| time.0),
                failure_class: failure_class(row.failure_class.as_deref())?,
                failure_message: row.failure_message,
            })
        })
        .collect()
}

#[derive(sqlx::FromRow)]
struct EpochRow {
    attempt_id: Id,
    epoch: i32,
    train_loss: f64,
    test_loss: f64,
    top1: f64,
    top5: f64,
    images_per_second: f64,
    learning_rate: f64,
}

async fn epochs_of(
    db: &mut Db<'_>,
    trial: TrialId,
) -> Result<Vec<(AttemptId, EpochMetrics)>, StoreError> {
    let rows: Vec<EpochRow> = db
        .fetch_all(
            "SELECT attempt_id, epoch, train_loss, test_loss, top1, top5, images_per_second, \
                 learning_rate \
             FROM epoch_metrics WHERE trial_id = $1 ORDER BY attempt_id, epoch",
            &[Arg::Id(trial.0)],
        )
        .await?;
    let epochs = rows.into_iter().map(|row| {
        let metrics = EpochMetrics {
            epoch: row.epoch,
            train_loss: row.train_loss,
            test_loss: row.test_loss,
            top1: row.top1,
            top5: row.top5,
            images_per_second: row.images_per_second,
            learning_rate: row.learning_rate,
        };
        (AttemptId(row.attempt_id.0), metrics)
    });
    Ok(epochs.collect())
}

#[derive(sqlx::FromRow)]
struct StateCount {
    state: String,
    trials: i64,
}

/// Adds up `state, count(*) AS trials` rows.
fn trial_counts(rows: Vec<StateCount>) -> Result<TrialCounts, StoreError> {
    let mut counts = TrialCounts::default();
    for row in rows {
        add_count(&mut counts, trial_state(&row.state)?, row.trials);
    }
    Ok(counts)
}

pub(crate) async fn queue_counts(db: &mut Db<'_>) -> Result<TrialCounts, StoreError> {
    let rows = db
        .fetch_all(
            "SELECT state, count(*) AS trials FROM trials GROUP BY state",
            &[],
        )
        .await?;
    trial_counts(rows)
}

/// Returns a sweep's trial counts by state.
pub(crate) async fn sweep_counts(
    db: &mut Db<'_>,
    sweep: SweepId,
) -> Result<TrialCounts, StoreError> {
    let rows = db
        .fetch_all(
            "SELECT t.state, count(*) AS trials \
             FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
             WHERE st.sweep_id = $1 GROUP BY t.state",
            &[Arg::Id(sweep.0)],
        )
        .await?;
    trial_counts(rows)
}

#[derive(sqlx::FromRow)]
struct TrialStateRow {
    id: Id,
    state: String,
}

pub(crate) async fn sweep_trials(
    db: &mut Db<'_>,
    sweep: SweepId,
) -> Result<Vec<(TrialId, TrialState)>, StoreError> {
    ensure_sweep(db, sweep).await?;
    let rows: Vec<TrialStateRow> = db
        .fetch_all(
            "SELECT t.id, t.state FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
             WHERE st.sweep_id = $1 ORDER BY t.id",
            &[Arg::Id(sweep.0)],
        )
        .await?;
    rows.into_iter()
        .map(|row| Ok((TrialId(row.id.0), trial_state(&row.state)?)))
        .collect()
}

/// A sweep's results, one row per trial, with the smallest rho of the sweep's grid points
/// that produced the design.
const EXPORT_RESULTS: &str = "\
    SELECT t.id AS trial_id, t.design_id, d.family, t.dataset, t.recipe_hash, t.seed, \
        (SELECT min(p.rho) FROM grid_points p \
            WHERE p.sweep_id = $1 AND p.design_id = t.design_id) AS rho, \
        d.params, d.flops, d.layers, d.effectiveness, d.entropy, \
        r.top1, r.top5, r.test_loss, r.train_seconds, r.epochs \
    FROM sweep_trials st \
        JOIN trials t ON t.id = st.trial_id \
        JOIN results r ON r.trial_id = t.id \
        JOIN designs d ON d.id = t.design_id \
    WHERE st.sweep_id = $1 AND t.task = 'train' \
    ORDER BY t.design_id, t.seed, t.id";

#[derive(sqlx::FromRow)]
struct ResultRow {
    trial_id: Id,
    design_id: String,
    family: String,
    dataset: String,
    recipe_hash: String,
    seed: i64,
    rho: Option<f64>,
    params: i64,
    flops: i64,
    layers: i32,
    effectiveness: f64,
    entropy: f64,
    top1: f64,
    top5: f64,
    test_loss: f64,
    train_seconds: f64,
    epochs: i32,
}

/// Returns every result of the sweep's trials with its design's numbers, by design and
/// seed.
pub(crate) async fn export_results(
    db: &mut Db<'_>,
    sweep: SweepId,
) -> Result<Vec<ResultRecord>, StoreError> {
    ensure_sweep(db, sweep).await?;
    let rows: Vec<ResultRow> = db.fetch_all(EXPORT_RESULTS, &[Arg::Id(sweep.0)]).await?;
    let records = rows.into_iter().map(|row| ResultRecord {
        trial: TrialId(row.trial_id.0),
        design_id: DesignId(row.design_id),
        family: row.family,
        dataset: row.dataset,
        recipe_hash: row.recipe_hash,
        seed: row.seed,
        rho: row.rho,
        params: row.params,
        flops: row.flops,
        layers: row.layers,
        effectiveness: row.effectiveness,
        entropy: row.entropy,
        top1: row.top1,
        top5: row.top5,
        test_loss: row.test_loss,
        train_seconds: row.train_seconds,
        epochs: row.epochs,
    });
    Ok(records.collect())
}

/// Returns the recipe (JSON) of the trial that `attempt` trains; `None` for an unknown attempt.
pub(crate) async fn attempt_recipe(
    db: &mut Db<'_>,
    attempt: AttemptId,
) -> Result<Option<String>, StoreError> {
    // PostgreSQL keeps the recipe as `json`, SQLite as TEXT; both cast it to text.
    let row: Option<(String,)> = db
        .fetch_optional(
            "SELECT CAST(t.recipe_json AS TEXT) FROM attempts a \
                 JOIN trials t ON t.id = a.trial_id WHERE a.id = $1",
            &[Arg::Id(attempt.0)],
        )
        .await?;
    Ok(row.map(|(recipe,)| recipe))
}

/// Returns how many running attempts of `worker` hold an unexpired lease at `now`.
pub(crate) async fn leases_held(
    db: &mut Db<'_>,
    worker: WorkerId,
    now: DateTime<Utc>,
) -> Result<i64, StoreError> {
    let (held,): (i64,) = db
        .fetch_one(
            "SELECT COUNT(*) FROM attempts \
                 WHERE worker_id = $1 AND state = 'running' AND lease_expires_at > $2",
            &[Arg::Id(worker.0), Arg::Time(now)],
        )
        .await?;
    Ok(held)
}

/// Returns `NotFound` unless the sweep exists.
pub(crate) async fn ensure_sweep(db: &mut Db<'_>, sweep: SweepId) -> Result<(), StoreError> {
    let (exists,): (bool,) = db
        .fetch_one(
            "SELECT EXISTS (SELECT 1 FROM sweeps WHERE id = $1)",
            &[Arg::Id(sweep.0)],
        )
        .await?;
    if exists {
        Ok(())
    } else {
        Err(StoreError::NotFound {
            what: "sweep",
            id: sweep.to_string(),
        })
    }
}

const METRICS_COLUMNS: &str = "SELECT attempt_id, top1, top5, test_loss, train_seconds, epochs, \
    dataset_hash, checkpoint";

#[derive(sqlx::FromRow)]
struct MetricsRow {
    attempt_id: Id,
    top1: f64,
    top5: f64,
    test_loss: f64,
    train_seconds: f64,
    epochs: i32,
    dataset_hash: String,
    checkpoint: Option<String>,
}

impl MetricsRow {
    fn into_metrics(self) -> (AttemptId, FinalMetrics) {
        let metrics = FinalMetrics {
            top1: self.top1,
            top5: self.top5,
            test_loss: self.test_loss,
            train_seconds: self.train_seconds,
            epochs: self.epochs,
            dataset_hash: self.dataset_hash,
            checkpoint: self.checkpoint,
            epochs_metrics: Vec::new(),
        };
        (AttemptId(self.attempt_id.0), metrics)
    }
}
