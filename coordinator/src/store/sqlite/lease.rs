//! Claims and completions on SQLite, each one write transaction: the write lock it holds
//! from its start serialises them as PostgreSQL's row locks do. The rest of the work
//! protocol is shared with PostgreSQL (`store/common/lease.rs`).

use chrono::{DateTime, Utc};

use super::{downstream, upsert_epochs, SqliteStore};
use crate::model::{AttemptId, AttemptState, DesignId, LeaseToken, TrialId, TrialState, WorkerId};
use crate::store::assemble::trial_state;
use crate::store::common::lease::{check_token, lock_attempt};
use crate::store::rules::after_ms;
use crate::store::sql::{Arg, Db, Id};
use crate::store::types::{CompleteOutcome, FinalMetrics, Lease};
use crate::store::StoreError;

/// The oldest queued trial whose backoff has passed and that an active sweep needs.
const CANDIDATE: &str = "\
    SELECT t.id, t.design_id, d.architecture_json, t.recipe_json, t.dataset, t.seed, t.task, \
        t.parent_trial_id, \
        (t.task = 'train' AND EXISTS ( \
            SELECT 1 FROM sweep_trials st \
                JOIN sweep_tasks k ON k.sweep_id = st.sweep_id \
            WHERE st.trial_id = t.id)) AS upload_weights \
    FROM trials t JOIN designs d ON d.id = t.design_id \
    WHERE t.state = 'queued' AND t.active_sweeps > 0 AND t.not_before <= $1 \
    ORDER BY t.created_at, t.id LIMIT 1";

#[derive(sqlx::FromRow)]
struct Candidate {
    id: Id,
    design_id: String,
    architecture_json: String,
    recipe_json: String,
    dataset: String,
    seed: i64,
    task: String,
    parent_trial_id: Option<Id>,
    upload_weights: bool,
}

impl SqliteStore {
    pub(crate) async fn claim(
        &self,
        worker: WorkerId,
        lease_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<Lease>, StoreError> {
        let mut tx = self.write().await?;
        let mut db = Db::SqliteConn(&mut tx);
        let seen = db
            .execute(
                "UPDATE workers SET last_seen_at = $2 WHERE id = $1",
                &[Arg::Id(worker.0), Arg::Time(now)],
            )
            .await?;
        if seen == 0 {
            return Err(StoreError::NotFound {
                what: "worker",
                id: worker.to_string(),
            });
        }
        let candidate: Option<Candidate> = db.fetch_optional(CANDIDATE, &[Arg::Time(now)]).await?;
        let Some(candidate) = candidate else {
            tx.commit().await?;
            return Ok(None);
        };
        let lease = new_lease(candidate, after_ms(now, lease_ms));
        db.execute(
            "UPDATE trials SET state = 'running', updated_at = $2 WHERE id = $1",
            &[Arg::Id(lease.trial.0), Arg::Time(now)],
        )
        .await?;
        let attempt = [
            Arg::Id(lease.attempt.0),
            Arg::Id(lease.trial.0),
            Arg::Id(worker.0),
            Arg::Id(lease.token.0),
            Arg::Time(now),
            Arg::Time(lease.expires_at),
        ];
        db.execute(
            "INSERT INTO attempts (id, trial_id, worker_id, lease_token, state, leased_at, \
                 heartbeat_at, lease_expires_at) \
             VALUES ($1, $2, $3, $4, 'running', $5, $5, $6)",
            &attempt,
        )
        .await?;
        tx.commit().await?;
        Ok(Some(lease))
    }

    pub(crate) async fn complete(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        metrics: &FinalMetrics,
        now: DateTime<Utc>,
    ) -> Result<CompleteOutcome, StoreError> {
        let mut tx = self.write().await?;
        let mut db = Db::SqliteConn(&mut tx);
        let (trial, view) = lock_attempt(&mut db, attempt).await?;
        check_token(&view, attempt, token)?;
        if view.state == AttemptState::Succeeded {
            return Ok(CompleteOutcome::Duplicate);
        }
        let trial = read_trial(&mut db, trial.id).await?;
        upsert_epochs(&mut db, attempt, trial.id, &metrics.epochs_metrics, now).await?;
        let outcome = if view.holds_lease(now) && trial.state == TrialState::Running {
            record_result(&mut db, &trial, attempt, metrics, now).await?;
            CompleteOutcome::Recorded
        } else {
            // A fenced-out attempt's report is kept; a second report changes nothing.
            insert_metrics(&mut db, INSERT_LATE_RESULT, trial.id, attempt, metrics, now).await?;
            CompleteOutcome::Late
        };
        tx.commit().await?;
        Ok(outcome)
    }
}

fn new_lease(candidate: Candidate, expires_at: DateTime<Utc>) -> Lease {
    Lease {
        attempt: AttemptId::new(),
        token: LeaseToken::new(),
        trial: TrialId(candidate.id.0),
        design_id: DesignId(candidate.design_id),
        architecture_json: candidate.architecture_json,
        recipe_json: candidate.recipe_json,
        dataset: candidate.dataset,
        seed: candidate.seed,
        expires_at,
        task: candidate.task,
        parent: candidate.parent_trial_id.map(|id| TrialId(id.0)),
        upload_weights: candidate.upload_weights,
    }
}

/// A trial row read inside a write transaction.
struct TrialRow {
    id: TrialId,
    state: TrialState,
    design_id: String,
    dataset: String,
    recipe_hash: String,
    /// `train` or a downstream task.
    task: String,
}

#[derive(sqlx::FromRow)]
struct TrialColumns {
    state: String,
    design_id: String,
    dataset: String,
    recipe_hash: String,
    task: String,
}

async fn read_trial(db: &mut Db<'_>, trial: TrialId) -> Result<TrialRow, StoreError> {
    let row: TrialColumns = db
        .fetch_one(
            "SELECT state, design_id, dataset, recipe_hash, task FROM trials WHERE id = $1",
            &[Arg::Id(trial.0)],
        )
        .await?;
    Ok(TrialRow {
        id: trial,
        state: trial_state(&row.state)?,
        design_id: row.design_id,
        dataset: row.dataset,
        recipe_hash: row.recipe_hash,
        task: row.task,
    })
}

async fn record_result(
    db: &mut Db<'_>,
    trial: &TrialRow,
    attempt: AttemptId,
    metrics: &FinalMetrics,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    insert_metrics(db, INSERT_RESULT, trial.id, attempt, metrics, now).await?;
    db.execute(
        "UPDATE trials SET state = 'succeeded', updated_at = $2 WHERE id = $1",
        &[Arg::Id(trial.id.0), Arg::Time(now)],
    )
    .await?;
    db.execute(
        "UPDATE attempts SET state = 'succeeded', finished_at = $2 WHERE id = $1",
        &[Arg::Id(attempt.0), Arg::Time(now)],
    )
    .await?;
    if trial.task != "train" {
        // A downstream result is read per (trial, task); it feeds no design aggregate.
        return Ok(());
    }
    add_to_scores(db, trial, metrics, now).await?;
    downstream::queue(db, trial.id, None, now).await?;
    Ok(())
}

/// Adds a recorded training result to its design's aggregates and to those of every sweep
/// that holds the trial (Welford's update).
async fn add_to_scores(
    db: &mut Db<'_>,
    trial: &TrialRow,
    metrics: &FinalMetrics,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let design = [
        Arg::Text(&trial.design_id),
        Arg::Text(&trial.dataset),
        Arg::Text(&trial.recipe_hash),
        Arg::Float(metrics.top1),
        Arg::Float(metrics.top5),
        Arg::Time(now),
    ];
    db.execute(
        "INSERT INTO design_scores (design_id, dataset, recipe_hash, seeds, top1_mean, \
             top1_m2, top5_mean, updated_at, family) \
         VALUES ($1, $2, $3, 1, $4, 0, $5, $6, \
             (SELECT d.family FROM designs d WHERE d.id = $1)) \
         ON CONFLICT (design_id, dataset, recipe_hash) DO UPDATE SET \
             seeds = seeds + 1, \
             top1_mean = top1_mean + ($4 - top1_mean) / (seeds + 1), \
             top1_m2 = top1_m2 + ($4 - top1_mean) \
                 * ($4 - (top1_mean + ($4 - top1_mean) / (seeds + 1))), \
             top5_mean = top5_mean + ($5 - top5_mean) / (seeds + 1), \
             updated_at = $6",
        &design,
    )
    .await?;
    let sweeps = [
        Arg::Id(trial.id.0),
        Arg::Text(&trial.design_id),
        Arg::Text(&trial.dataset),
        Arg::Text(&trial.recipe_hash),
        Arg::Float(metrics.top1),
        Arg::Float(metrics.top5),
        Arg::Time(now),
    ];
    db.execute(
        "INSERT INTO sweep_scores (sweep_id, design_id, dataset, recipe_hash, family, seeds, \
             top1_mean, top1_m2, top5_mean, updated_at) \
         SELECT st.sweep_id, $2, $3, $4, d.family, 1, $5, 0, $6, $7 \
         FROM sweep_trials st JOIN designs d ON d.id = $2 \
         WHERE st.trial_id = $1 \
         ON CONFLICT (sweep_id, design_id, dataset, recipe_hash) DO UPDATE SET \
             seeds = seeds + 1, \
             top1_mean = top1_mean + ($5 - top1_mean) / (seeds + 1), \
             top1_m2 = top1_m2 + ($5 - top1_mean) \
                 * ($5 - (top1_mean + ($5 - top1_mean) / (seeds + 1))), \
             top5_mean = top5_mean + ($6 - top5_mean) / (seeds + 1), \
             updated_at = $7",
        &sweeps,
    )
    .await?;
    Ok(())
}

const INSERT_RESULT: &str = "INSERT INTO results (trial_id, attempt_id, top1, top5, test_loss, \
    train_seconds, epochs, dataset_hash, checkpoint, finished_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

const INSERT_LATE_RESULT: &str = "INSERT INTO late_results (trial_id, attempt_id, top1, top5, \
    test_loss, train_seconds, epochs, dataset_hash, checkpoint, received_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (attempt_id) DO NOTHING";

/// Runs `insert` (one of the two above) with an attempt's final metrics.
async fn insert_metrics(
    db: &mut Db<'_>,
    insert: &str,
    trial: TrialId,
    attempt: AttemptId,
    metrics: &FinalMetrics,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let args = [
        Arg::Id(trial.0),
        Arg::Id(attempt.0),
        Arg::Float(metrics.top1),
        Arg::Float(metrics.top5),
        Arg::Float(metrics.test_loss),
        Arg::Float(metrics.train_seconds),
        Arg::Int(metrics.epochs),
        Arg::Text(&metrics.dataset_hash),
        Arg::OptText(metrics.checkpoint.as_deref()),
        Arg::Time(now),
    ];
    db.execute(insert, &args).await?;
    Ok(())
}
