//! Downstream evaluations on PostgreSQL: the lookup by a list of designs (an array here,
//! JSON on SQLite) and queueing, which is the SQL function `deepmad_queue_downstream`
//! (`migrations/postgres/0004_downstream.sql`). The rest is shared
//! (`store/common/downstream.rs`).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::PgStore;
use crate::model::SweepId;
use crate::store::common::downstream::{DownstreamRow, RECORD_COLUMNS};
use crate::store::types::DownstreamRecord;
use crate::store::StoreError;

impl PgStore {
    /// The finished downstream trials of `designs`, from any sweep, named `KIND:DATASET`.
    pub(crate) async fn downstream_of_designs(
        &self,
        designs: &[String],
    ) -> Result<Vec<DownstreamRecord>, StoreError> {
        let rows: Vec<DownstreamRow> = sqlx::query_as(&format!(
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
        rows.into_iter().map(DownstreamRow::into_record).collect()
    }
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
