//! Downstream evaluations on SQLite: the same as `pg/downstream.rs`, with the queueing that
//! PostgreSQL does in `deepmad_queue_downstream` written here, inside the caller's write
//! transaction (the single writer keeps everything else out meanwhile).

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::{get_time, get_uuid, time_text, uuid_text, SqliteStore};
use crate::model::{AttemptId, DesignId, LeaseToken, SweepId, TrialId};
use crate::store::assemble::trial_state;
use crate::store::types::{DownstreamRecord, LeasedTrial, NewSweep};
use crate::store::StoreError;
use crate::sweep::sha256_hex;

/// The columns of a [`DownstreamRecord`]; `name` is chosen by the caller.
const RECORD_COLUMNS: &str = "\
    d.id AS trial_id, d.parent_trial_id, d.design_id, p.dataset AS upstream_dataset, \
    p.recipe_hash AS upstream_recipe_hash, d.seed, d.task AS kind, d.dataset, d.task_hash, \
    d.state, r.top1, r.top5, r.test_loss, r.epochs";

impl SqliteStore {
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
             WHERE k.sweep_id = ?1 \
             ORDER BY d.design_id, k.task_index, d.seed, d.id"
        ))
        .bind(uuid_text(sweep.0))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(decode_record).collect()
    }

    /// The finished downstream trials of `designs`, from any sweep, named `KIND:DATASET`.
    pub(crate) async fn downstream_of_designs(
        &self,
        designs: &[String],
    ) -> Result<Vec<DownstreamRecord>, StoreError> {
        let designs = serde_json::to_string(designs).expect("strings serialize");
        let rows = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS}, d.task || ':' || d.dataset AS name \
             FROM trials d \
                 JOIN trials p ON p.id = d.parent_trial_id \
                 JOIN results r ON r.trial_id = d.id \
             WHERE d.design_id IN (SELECT value FROM json_each(?1)) \
                 AND d.parent_trial_id IS NOT NULL \
             ORDER BY d.design_id, d.task_hash, d.seed, d.id"
        ))
        .bind(designs)
        .fetch_all(&self.reader)
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
             WHERE a.id = ?1",
        )
        .bind(uuid_text(attempt.0))
        .fetch_optional(&self.reader)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "attempt",
            id: attempt.to_string(),
        })?;
        let holds = get_uuid(&row, "lease_token")? == token.0
            && row.try_get::<&str, _>("state")? == "running"
            && now <= get_time(&row, "lease_expires_at")?;
        if !holds {
            return Err(StoreError::NotLeaseHolder { attempt });
        }
        let optional_uuid = |column: &str| -> Result<Option<uuid::Uuid>, StoreError> {
            match row.try_get::<Option<&str>, _>(column)? {
                Some(_) => Ok(Some(get_uuid(&row, column)?)),
                None => Ok(None),
            }
        };
        Ok(LeasedTrial {
            trial: TrialId(get_uuid(&row, "trial_id")?),
            task: row.try_get("task")?,
            parent: optional_uuid("parent_trial_id")?.map(TrialId),
            parent_result_attempt: optional_uuid("parent_attempt")?.map(AttemptId),
        })
    }
}

/// Writes a new sweep's downstream tasks.
pub(super) async fn insert_tasks(
    conn: &mut SqliteConnection,
    sweep: &NewSweep,
) -> Result<(), StoreError> {
    for task in &sweep.tasks {
        sqlx::query(
            "INSERT INTO sweep_tasks (sweep_id, task_index, name, kind, dataset, recipe_json, \
                 task_hash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(uuid_text(sweep.id.0))
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

/// Queues the downstream trials of the succeeded training trial `parent`: one per task of
/// each active sweep holding it (only `sweep`'s when given). An existing trial with the same
/// key is linked instead; the parent's downstream trials then get their active sweeps
/// recounted. The recipe hash is SHA-256(task_hash ':' parent id), as on PostgreSQL.
pub(super) async fn queue(
    conn: &mut SqliteConnection,
    parent: TrialId,
    sweep: Option<SweepId>,
    now: DateTime<Utc>,
) -> Result<u32, StoreError> {
    let wanted = sqlx::query(
        "SELECT st.sweep_id, p.design_id, p.seed, k.kind, k.dataset, k.recipe_json, \
             k.task_hash, s.max_attempts \
         FROM trials p \
             JOIN sweep_trials st ON st.trial_id = p.id \
             JOIN sweeps s ON s.id = st.sweep_id AND s.state = 'active' \
             JOIN sweep_tasks k ON k.sweep_id = st.sweep_id \
         WHERE p.id = ?1 AND p.state = 'succeeded' AND p.task = 'train' \
             AND (?2 IS NULL OR st.sweep_id = ?2) \
         ORDER BY k.task_hash, s.max_attempts DESC",
    )
    .bind(uuid_text(parent.0))
    .bind(sweep.map(|sweep| uuid_text(sweep.0)))
    .fetch_all(&mut *conn)
    .await?;
    if wanted.is_empty() {
        return Ok(0);
    }
    let mut links = 0;
    let parent_text = uuid_text(parent.0);
    for row in &wanted {
        let task_hash: String = row.try_get("task_hash")?;
        let recipe_hash = sha256_hex(&format!("{task_hash}:{parent_text}"));
        let design_id: String = row.try_get("design_id")?;
        let dataset: String = row.try_get("dataset")?;
        let seed: i64 = row.try_get("seed")?;
        sqlx::query(
            "INSERT INTO trials (id, design_id, recipe_hash, dataset, seed, recipe_json, state, \
                 max_attempts, counted_failures, requeues, active_sweeps, not_before, \
                 created_at, updated_at, task, task_hash, parent_trial_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, 0, 0, 0, ?8, ?8, ?8, ?9, ?10, ?11) \
             ON CONFLICT (design_id, recipe_hash, dataset, seed) DO NOTHING",
        )
        .bind(uuid_text(TrialId::new().0))
        .bind(&design_id)
        .bind(&recipe_hash)
        .bind(&dataset)
        .bind(seed)
        .bind(row.try_get::<String, _>("recipe_json")?)
        .bind(row.try_get::<i64, _>("max_attempts")?)
        .bind(time_text(now))
        .bind(row.try_get::<String, _>("kind")?)
        .bind(&task_hash)
        .bind(&parent_text)
        .execute(&mut *conn)
        .await?;
        links += sqlx::query(
            "INSERT INTO sweep_trials (sweep_id, trial_id) \
             SELECT ?1, id FROM trials \
             WHERE design_id = ?2 AND recipe_hash = ?3 AND dataset = ?4 AND seed = ?5 \
             ON CONFLICT (sweep_id, trial_id) DO NOTHING",
        )
        .bind(row.try_get::<String, _>("sweep_id")?)
        .bind(&design_id)
        .bind(&recipe_hash)
        .bind(&dataset)
        .bind(seed)
        .execute(&mut *conn)
        .await?
        .rows_affected() as u32;
    }
    sqlx::query(
        "UPDATE trials SET active_sweeps = ( \
             SELECT count(*) FROM sweep_trials st JOIN sweeps s ON s.id = st.sweep_id \
             WHERE st.trial_id = trials.id AND s.state = 'active') \
         WHERE parent_trial_id = ?1",
    )
    .bind(parent_text)
    .execute(conn)
    .await?;
    Ok(links)
}

/// Queues the downstream trials of `sweep` for its succeeded training trials (the results a
/// new sweep reuses).
pub(super) async fn queue_for_sweep(
    conn: &mut SqliteConnection,
    sweep: SweepId,
    now: DateTime<Utc>,
) -> Result<u32, StoreError> {
    let parents: Vec<String> = sqlx::query_scalar(
        "SELECT t.id FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
         WHERE st.sweep_id = ?1 AND t.state = 'succeeded' AND t.task = 'train'",
    )
    .bind(uuid_text(sweep.0))
    .fetch_all(&mut *conn)
    .await?;
    let mut links = 0;
    for parent in parents {
        let parent =
            uuid::Uuid::parse_str(&parent).map_err(|_| StoreError::corrupt("trial id", &parent))?;
        links += queue(conn, TrialId(parent), Some(sweep), now).await?;
    }
    Ok(links)
}

fn decode_record(row: &SqliteRow) -> Result<DownstreamRecord, StoreError> {
    Ok(DownstreamRecord {
        trial: TrialId(get_uuid(row, "trial_id")?),
        parent: TrialId(get_uuid(row, "parent_trial_id")?),
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
