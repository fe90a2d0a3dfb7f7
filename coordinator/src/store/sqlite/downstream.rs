//! Downstream evaluations on SQLite: the lookup by a list of designs (a JSON array here, an
//! array on PostgreSQL) and the queueing that PostgreSQL does in `deepmad_queue_downstream`,
//! written here, inside the caller's write transaction (the single writer keeps everything
//! else out meanwhile). The rest is shared (`store/common/downstream.rs`).

use chrono::{DateTime, Utc};

use super::SqliteStore;
use crate::model::{SweepId, TrialId};
use crate::store::common::downstream::{DownstreamRow, RECORD_COLUMNS};
use crate::store::sql::{uuid_text, Arg, Db, Id};
use crate::store::types::DownstreamRecord;
use crate::store::StoreError;
use deepmad_design::digest::sha256_hex;

impl SqliteStore {
    /// The finished downstream trials of `designs`, from any sweep, named `KIND:DATASET`.
    pub(crate) async fn downstream_of_designs(
        &self,
        designs: &[String],
    ) -> Result<Vec<DownstreamRecord>, StoreError> {
        let designs = serde_json::to_string(designs).expect("strings serialize");
        let sql = format!(
            "SELECT {RECORD_COLUMNS}, d.task || ':' || d.dataset AS name \
             FROM trials d \
                 JOIN trials p ON p.id = d.parent_trial_id \
                 JOIN results r ON r.trial_id = d.id \
             WHERE d.design_id IN (SELECT value FROM json_each($1)) \
                 AND d.parent_trial_id IS NOT NULL \
             ORDER BY d.design_id, d.task_hash, d.seed, d.id"
        );
        let rows: Vec<DownstreamRow> = self
            .reader()
            .fetch_all(&sql, &[Arg::Text(&designs)])
            .await?;
        rows.into_iter().map(DownstreamRow::into_record).collect()
    }
}

/// A downstream trial that a sweep's task wants for a parent.
#[derive(sqlx::FromRow)]
struct Wanted {
    sweep_id: Id,
    design_id: String,
    seed: i64,
    kind: String,
    dataset: String,
    recipe_json: String,
    task_hash: String,
    max_attempts: i32,
}

/// Queues the downstream trials of the succeeded training trial `parent`: one per task of
/// each active sweep holding it (only `sweep`'s when given). An existing trial with the same
/// key is linked instead; the parent's downstream trials then get their active sweeps
/// recounted. The recipe hash is SHA-256(task_hash ':' parent id), as on PostgreSQL.
pub(super) async fn queue(
    db: &mut Db<'_>,
    parent: TrialId,
    sweep: Option<SweepId>,
    now: DateTime<Utc>,
) -> Result<u32, StoreError> {
    let wanted: Vec<Wanted> = db
        .fetch_all(
            "SELECT st.sweep_id, p.design_id, p.seed, k.kind, k.dataset, k.recipe_json, \
                 k.task_hash, s.max_attempts \
             FROM trials p \
                 JOIN sweep_trials st ON st.trial_id = p.id \
                 JOIN sweeps s ON s.id = st.sweep_id AND s.state = 'active' \
                 JOIN sweep_tasks k ON k.sweep_id = st.sweep_id \
             WHERE p.id = $1 AND p.state = 'succeeded' AND p.task = 'train' \
                 AND ($2 IS NULL OR st.sweep_id = $2) \
             ORDER BY k.task_hash, s.max_attempts DESC",
            &[Arg::Id(parent.0), Arg::OptId(sweep.map(|sweep| sweep.0))],
        )
        .await?;
    if wanted.is_empty() {
        return Ok(0);
    }
    let mut links = 0;
    for task in &wanted {
        links += queue_one(db, parent, task, now).await?;
    }
    db.execute(
        "UPDATE trials SET active_sweeps = ( \
             SELECT count(*) FROM sweep_trials st JOIN sweeps s ON s.id = st.sweep_id \
             WHERE st.trial_id = trials.id AND s.state = 'active') \
         WHERE parent_trial_id = $1",
        &[Arg::Id(parent.0)],
    )
    .await?;
    Ok(links)
}

/// Inserts (or finds) one downstream trial and links it to the sweep that wants it;
/// returns how many links it added.
async fn queue_one(
    db: &mut Db<'_>,
    parent: TrialId,
    task: &Wanted,
    now: DateTime<Utc>,
) -> Result<u32, StoreError> {
    let key = format!("{}:{}", task.task_hash, uuid_text(parent.0));
    let recipe_hash = sha256_hex(key.as_str());
    let trial = [
        Arg::Id(TrialId::new().0),
        Arg::Text(&task.design_id),
        Arg::Text(&recipe_hash),
        Arg::Text(&task.dataset),
        Arg::BigInt(task.seed),
        Arg::Text(&task.recipe_json),
        Arg::Int(task.max_attempts),
        Arg::Time(now),
        Arg::Text(&task.kind),
        Arg::Text(&task.task_hash),
        Arg::Id(parent.0),
    ];
    db.execute(
        "INSERT INTO trials (id, design_id, recipe_hash, dataset, seed, recipe_json, state, \
             max_attempts, counted_failures, requeues, active_sweeps, not_before, \
             created_at, updated_at, task, task_hash, parent_trial_id) \
         VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, 0, 0, 0, $8, $8, $8, $9, $10, $11) \
         ON CONFLICT (design_id, recipe_hash, dataset, seed) DO NOTHING",
        &trial,
    )
    .await?;
    let link = [
        Arg::Id(task.sweep_id.0),
        Arg::Text(&task.design_id),
        Arg::Text(&recipe_hash),
        Arg::Text(&task.dataset),
        Arg::BigInt(task.seed),
    ];
    let linked = db
        .execute(
            "INSERT INTO sweep_trials (sweep_id, trial_id) \
             SELECT $1, id FROM trials \
             WHERE design_id = $2 AND recipe_hash = $3 AND dataset = $4 AND seed = $5 \
             ON CONFLICT (sweep_id, trial_id) DO NOTHING",
            &link,
        )
        .await?;
    Ok(linked as u32)
}

/// Queues the downstream trials of `sweep` for its succeeded training trials (the results a
/// new sweep reuses).
pub(super) async fn queue_for_sweep(
    db: &mut Db<'_>,
    sweep: SweepId,
    now: DateTime<Utc>,
) -> Result<u32, StoreError> {
    let parents: Vec<(Id,)> = db
        .fetch_all(
            "SELECT t.id FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
             WHERE st.sweep_id = $1 AND t.state = 'succeeded' AND t.task = 'train'",
            &[Arg::Id(sweep.0)],
        )
        .await?;
    let mut links = 0;
    for (parent,) in parents {
        links += queue(db, TrialId(parent.0), Some(sweep), now).await?;
    }
    Ok(links)
}
