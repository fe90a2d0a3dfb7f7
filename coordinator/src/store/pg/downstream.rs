//! Downstream evaluations on PostgreSQL: a sweep's tasks, queueing (the work itself is
//! `deepmad_queue_downstream`, `migrations/postgres/0004_downstream.sql`), the records behind
//! the leaderboard's downstream columns, and the lease check of weights transfers.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::PgStore;
use crate::model::{AttemptId, DesignId, LeaseToken, SweepId, TrialId};
use crate::store::assemble::trial_state;
use crate::store::types::{DownstreamRecord, LeasedTrial, NewSweep};
use crate::store::StoreError;

/// The columns of a [`DownstreamRecord`]; `name` is chosen by the caller.
const RECORD_COLUMNS: &str = "\
    d.id AS trial_id, d.parent_trial_id, d.design_id, p.dataset AS upstream_dataset, \
    p.recipe_hash AS upstream_recipe_hash, d.seed, d.task AS kind, d.dataset, d.task_hash, \
    d.state, r.top1, r.top5, r.test_loss, r.epochs";

impl PgStore {
    pub(crate) async fn downstream_results(
        &self,
        sweep: SweepId,
    ) -> Result<Vec<DownstreamRecord>, StoreError> {
        self.ensure_sweep(sweep).await?;
        let rows = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS}, k.name \
             FROM sweep_tasks k \
                 JOIN sweep_trials st ON st.sweep_id = k.sweep_id \
                 JOIN trials d ON d.id = st.trial_id AND d.task_hash = k.task_hash \
                 JOIN trials p ON p.id = d.parent_trial_id \
                 LEFT JOIN results r ON r.trial_id = d.id \
             WHERE k.sweep_id = $1 \
             ORDER BY d.design_id, k.task_index, d.seed, d.id"
        ))
        .bind(sweep.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_record).collect()
    }

    /// The finished downstream trials of `designs`, from any sweep, named `KIND:DATASET`.
    pub(crate) async fn downstream_of_designs(
        &self,
        designs: &[String],
    ) -> Result<Vec<DownstreamRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS}, d.task || ':' || d.dataset AS name \
             FROM trials d \
                 JOIN trials p ON p.id = d.parent_trial_id \
                 JOIN results r ON r.trial_id = d.id \
             WHERE d.design_id = ANY($1) AND d.parent_trial_id IS NOT NULL \
             ORDER BY d.design_id, d.task_hash, d.seed, d.id"
        ))
        .bind(designs)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_record).collect()
    }

    pub(crate) async fn leased_trial(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        now: DateTime<Utc>,
    ) -> Result<LeasedTrial, StoreError> {
        let row = sqlx::query(
            "SELECT a.trial_id, a.lease_token, a.state, a.lease_expires_at, t.task, \
                 t.parent_trial_id, r.attempt_id AS parent_attempt \
             FROM attempts a \
                 JOIN trials t ON t.id = a.trial_id \
                 LEFT JOIN results r ON r.trial_id = t.parent_trial_id \
             WHERE a.id = $1",
        )
        .bind(attempt.0)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "attempt",
            id: attempt.to_string(),
        })?;
        let holds = row.try_get::<Uuid, _>("lease_token")? == token.0
            && row.try_get::<&str, _>("state")? == "running"
            && now <= row.try_get::<DateTime<Utc>, _>("lease_expires_at")?;
        if !holds {
            return Err(StoreError::NotLeaseHolder { attempt });
        }
        Ok(LeasedTrial {
            trial: TrialId(row.try_get("trial_id")?),
            task: row.try_get("task")?,
            parent: row
                .try_get::<Option<Uuid>, _>("parent_trial_id")?
                .map(TrialId),
            parent_result_attempt: row
                .try_get::<Option<Uuid>, _>("parent_attempt")?
                .map(AttemptId),
        })
    }
}

/// Writes a new sweep's downstream tasks.
pub(super) async fn insert_tasks(
    conn: &mut PgConnection,
    sweep: &NewSweep,
) -> Result<(), StoreError> {
    for task in &sweep.tasks {
        sqlx::query(
            "INSERT INTO sweep_tasks (sweep_id, task_index, name, kind, dataset, recipe_json, \
                 task_hash) \
             VALUES ($1, $2, $3, $4, $5, $6::json, $7)",
        )
        .bind(sweep.id.0)
        .bind(task.index)
        .bind(&task.name)
        .bind(&task.kind)
        .bind(&task.dataset)
        .bind(&task.recipe_json)
        .bind(&task.task_hash)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Queues (or links) the downstream trials of `sweep` for its succeeded training trials: the
/// results a new sweep reuses get their downstream evaluations too.
pub(super) async fn queue_for_sweep(
    conn: &mut PgConnection,
    sweep: SweepId,
    now: DateTime<Utc>,
) -> Result<u32, StoreError> {
    let links: i32 = sqlx::query_scalar(
        "SELECT deepmad_queue_downstream(ARRAY( \
             SELECT t.id FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
             WHERE st.sweep_id = $1 AND t.state = 'succeeded' AND t.task = 'train'), $1, $2)",
    )
    .bind(sweep.0)
    .bind(now)
    .fetch_one(conn)
    .await?;
    Ok(u32::try_from(links).unwrap_or(0))
}

fn decode_record(row: &PgRow) -> Result<DownstreamRecord, StoreError> {
    Ok(DownstreamRecord {
        trial: TrialId(row.try_get("trial_id")?),
        parent: TrialId(row.try_get("parent_trial_id")?),
        design_id: DesignId(row.try_get("design_id")?),
        upstream_dataset: row.try_get("upstream_dataset")?,
        upstream_recipe_hash: row.try_get("upstream_recipe_hash")?,
        seed: row.try_get("seed")?,
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        dataset: row.try_get("dataset")?,
        task_hash: row.try_get("task_hash")?,
        state: trial_state(row.try_get("state")?)?,
        top1: row.try_get("top1")?,
        top5: row.try_get("top5")?,
        test_loss: row.try_get("test_loss")?,
        epochs: row.try_get("epochs")?,
    })
}
