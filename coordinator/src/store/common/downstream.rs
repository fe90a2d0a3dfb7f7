//! Downstream evaluations on both backends: a sweep's tasks, the records behind the
//! leaderboard's downstream columns, and the lease check of weights transfers. Queueing
//! downstream trials is dialect code (`pg/downstream.rs`, `sqlite/downstream.rs`), and so is
//! the lookup by a list of designs (an array on PostgreSQL, JSON on SQLite).

use chrono::{DateTime, Utc};

use crate::model::{AttemptId, DesignId, LeaseToken, SweepId, TrialId};
use crate::store::assemble::trial_state;
use crate::store::sql::{Arg, Db, Id, Time};
use crate::store::types::{DownstreamRecord, LeasedTrial, NewSweep};
use crate::store::StoreError;

use super::reads::ensure_sweep;

/// The columns of a [`DownstreamRow`]; `name` is chosen by the caller.
pub(crate) const RECORD_COLUMNS: &str = "\
    d.id AS trial_id, d.parent_trial_id, d.design_id, p.dataset AS upstream_dataset, \
    p.recipe_hash AS upstream_recipe_hash, d.seed, d.task AS kind, d.dataset, d.task_hash, \
    d.state, r.top1, r.top5, r.test_loss, r.epochs";

/// A downstream trial with its result, if any, as [`RECORD_COLUMNS`] and a `name` read it.
#[derive(sqlx::FromRow)]
pub(crate) struct DownstreamRow {
    trial_id: Id,
    parent_trial_id: Id,
    design_id: String,
    upstream_dataset: String,
    upstream_recipe_hash: String,
    seed: i64,
    name: String,
    kind: String,
    dataset: String,
    task_hash: String,
    state: String,
    top1: Option<f64>,
    top5: Option<f64>,
    test_loss: Option<f64>,
    epochs: Option<i32>,
}

impl DownstreamRow {
    pub(crate) fn into_record(self) -> Result<DownstreamRecord, StoreError> {
        Ok(DownstreamRecord {
            trial: TrialId(self.trial_id.0),
            parent: TrialId(self.parent_trial_id.0),
            design_id: DesignId(self.design_id),
            upstream_dataset: self.upstream_dataset,
            upstream_recipe_hash: self.upstream_recipe_hash,
            seed: self.seed,
            name: self.name,
            kind: self.kind,
            dataset: self.dataset,
            task_hash: self.task_hash,
            state: trial_state(&self.state)?,
            top1: self.top1,
            top5: self.top5,
            test_loss: self.test_loss,
            epochs: self.epochs,
        })
    }
}

pub(crate) async fn downstream_results(
    db: &mut Db<'_>,
    sweep: SweepId,
) -> Result<Vec<DownstreamRecord>, StoreError> {
    ensure_sweep(db, sweep).await?;
    let sql = format!(
        "SELECT {RECORD_COLUMNS}, k.name \
         FROM sweep_tasks k \
             JOIN sweep_trials st ON st.sweep_id = k.sweep_id \
             JOIN trials d ON d.id = st.trial_id AND d.task_hash = k.task_hash \
             JOIN trials p ON p.id = d.parent_trial_id \
             LEFT JOIN results r ON r.trial_id = d.id \
         WHERE k.sweep_id = $1 \
         ORDER BY d.design_id, k.task_index, d.seed, d.id"
    );
    let rows: Vec<DownstreamRow> = db.fetch_all(&sql, &[Arg::Id(sweep.0)]).await?;
    rows.into_iter().map(DownstreamRow::into_record).collect()
}

#[derive(sqlx::FromRow)]
struct LeaseRow {
    trial_id: Id,
    lease_token: Id,
    state: String,
    lease_expires_at: Time,
    task: String,
    parent_trial_id: Option<Id>,
    parent_attempt: Option<Id>,
    wants_weights: bool,
    design_params: i64,
}

pub(crate) async fn leased_trial(
    db: &mut Db<'_>,
    attempt: AttemptId,
    token: LeaseToken,
    now: DateTime<Utc>,
) -> Result<LeasedTrial, StoreError> {
    let row: LeaseRow = db
        .fetch_optional(
            "SELECT a.trial_id, a.lease_token, a.state, a.lease_expires_at, t.task, \
                 t.parent_trial_id, r.attempt_id AS parent_attempt, \
                 EXISTS (SELECT 1 FROM sweep_trials st \
                     JOIN sweep_tasks k ON k.sweep_id = st.sweep_id \
                     WHERE st.trial_id = t.id) AS wants_weights, \
                 d.params AS design_params \
             FROM attempts a \
                 JOIN trials t ON t.id = a.trial_id \
                 JOIN designs d ON d.id = t.design_id \
                 LEFT JOIN results r ON r.trial_id = t.parent_trial_id \
             WHERE a.id = $1",
            &[Arg::Id(attempt.0)],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "attempt",
            id: attempt.to_string(),
        })?;
    let holds =
        row.lease_token.0 == token.0 && row.state == "running" && now <= row.lease_expires_at.0;
    if !holds {
        return Err(StoreError::NotLeaseHolder { attempt });
    }
    Ok(LeasedTrial {
        trial: TrialId(row.trial_id.0),
        task: row.task,
        parent: row.parent_trial_id.map(|id| TrialId(id.0)),
        parent_result_attempt: row.parent_attempt.map(|id| AttemptId(id.0)),
        wants_weights: row.wants_weights,
        design_params: row.design_params,
    })
}

/// Writes a new sweep's downstream tasks.
pub(crate) async fn insert_tasks(db: &mut Db<'_>, sweep: &NewSweep) -> Result<(), StoreError> {
    // PostgreSQL keeps the recipe as `json`, SQLite as TEXT.
    let sql = db.dialect().pick(
        "INSERT INTO sweep_tasks (sweep_id, task_index, name, kind, dataset, recipe_json, \
             task_hash) VALUES ($1, $2, $3, $4, $5, $6::json, $7)",
        "INSERT INTO sweep_tasks (sweep_id, task_index, name, kind, dataset, recipe_json, \
             task_hash) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    );
    for task in &sweep.tasks {
        let args = [
            Arg::Id(sweep.id.0),
            Arg::Int(task.index),
            Arg::Text(&task.name),
            Arg::Text(&task.kind),
            Arg::Text(&task.dataset),
            Arg::Text(&task.recipe_json),
            Arg::Text(&task.task_hash),
        ];
        db.execute(sql, &args).await?;
    }
    Ok(())
}
