//! Sweeps on both backends: reading summaries, cancelling, retrying and finishing, and the
//! statements that creating one shares. Creating the rest of a sweep is dialect code: bulk
//! `UNNEST` inserts on PostgreSQL (`pg/sweeps.rs`), a row at a time on SQLite.
//!
//! Sweep-level changes run in [`Store::begin_sweeps`]'s transaction, which serialises them.

use chrono::{DateTime, Utc};

use crate::model::{SweepId, SweepState};
use crate::store::assemble::{sweep_state, sweep_summary, SweepRow};
use crate::store::rules::SweepPlan;
use crate::store::sql::{Arg, Db, Id, Time};
use crate::store::types::{LeaderboardFilter, NewSweep, SweepSummary};
use crate::store::{Store, StoreError};

use super::reads::{leaderboard, sweep_counts};

const SWEEP_COLUMNS: &str = "SELECT id, name, state, created_by, created_at, dataset, \
    grid_points, infeasible_points, distinct_designs FROM sweeps";

#[derive(sqlx::FromRow)]
struct SweepColumns {
    id: Id,
    name: String,
    state: String,
    created_by: String,
    created_at: Time,
    dataset: String,
    grid_points: i32,
    infeasible_points: i32,
    distinct_designs: i32,
}

impl SweepColumns {
    fn into_row(self) -> Result<SweepRow, StoreError> {
        Ok(SweepRow {
            id: SweepId(self.id.0),
            name: self.name,
            state: sweep_state(&self.state)?,
            created_by: self.created_by,
            created_at: self.created_at.0,
            dataset: self.dataset,
            grid_points: self.grid_points,
            infeasible_points: self.infeasible_points,
            distinct_designs: self.distinct_designs,
        })
    }
}

pub(crate) async fn get_sweep(db: &mut Db<'_>, id: SweepId) -> Result<SweepSummary, StoreError> {
    let row: SweepColumns = db
        .fetch_optional(&format!("{SWEEP_COLUMNS} WHERE id = $1"), &[Arg::Id(id.0)])
        .await?
        .ok_or_else(|| not_found(id))?;
    summary(db, row.into_row()?).await
}

pub(crate) async fn find_sweep(
    db: &mut Db<'_>,
    spec_json: &str,
) -> Result<Option<SweepId>, StoreError> {
    // Specs compare as JSON values: `jsonb` on PostgreSQL, `json()`'s text on SQLite.
    let sql = db.dialect().pick(
        "SELECT id FROM sweeps WHERE spec_json = $1::jsonb AND state <> 'cancelled' \
         ORDER BY created_at DESC, id DESC LIMIT 1",
        "SELECT id FROM sweeps WHERE json(spec_json) = json($1) AND state <> 'cancelled' \
         ORDER BY created_at DESC, id DESC LIMIT 1",
    );
    let id: Option<(Id,)> = db.fetch_optional(sql, &[Arg::Text(spec_json)]).await?;
    Ok(id.map(|(id,)| SweepId(id.0)))
}

pub(crate) async fn list_sweeps(
    db: &mut Db<'_>,
    limit: u32,
) -> Result<Vec<SweepSummary>, StoreError> {
    let limit = if limit == 0 { 100 } else { i64::from(limit) };
    let rows: Vec<SweepColumns> = db
        .fetch_all(
            &format!("{SWEEP_COLUMNS} ORDER BY created_at DESC, id DESC LIMIT $1"),
            &[Arg::BigInt(limit)],
        )
        .await?;
    let mut summaries = Vec::with_capacity(rows.len());
    for row in rows {
        summaries.push(summary(db, row.into_row()?).await?);
    }
    Ok(summaries)
}

/// Returns a sweep's summary: its row, its trial counts and its best design.
async fn summary(db: &mut Db<'_>, row: SweepRow) -> Result<SweepSummary, StoreError> {
    let counts = sweep_counts(db, row.id).await?;
    let filter = LeaderboardFilter {
        sweep: Some(row.id),
        limit: 1,
        ..LeaderboardFilter::default()
    };
    let best = leaderboard(db, &filter).await?.into_iter().next();
    Ok(sweep_summary(row, counts, best))
}

pub(crate) async fn cancel_sweep(
    store: &Store,
    id: SweepId,
    now: DateTime<Utc>,
) -> Result<SweepSummary, StoreError> {
    let mut tx = store.begin_sweeps().await?;
    let mut db = tx.db();
    let state = stored_state(&mut db, id).await?;
    if state == SweepState::Active {
        // A sweep with nothing left to run is completed, not cancelled.
        let next = if has_open_trials(&mut db, id).await? {
            SweepState::Cancelled
        } else {
            SweepState::Completed
        };
        set_state(&mut db, id, next, Some(now)).await?;
        change_active_sweeps(&mut db, id, -1).await?;
    }
    tx.commit().await?;
    get_sweep(&mut store.reader(), id).await
}

pub(crate) async fn retry_trials(
    store: &Store,
    id: SweepId,
    now: DateTime<Utc>,
) -> Result<u32, StoreError> {
    let mut tx = store.begin_sweeps().await?;
    let mut db = tx.db();
    let state = stored_state(&mut db, id).await?;
    let requeued = db
        .execute(
            "UPDATE trials SET state = 'queued', not_before = $2, counted_failures = 0, \
                 requeues = 0, updated_at = $2 \
             WHERE id IN (SELECT trial_id FROM sweep_trials WHERE sweep_id = $1) \
                 AND state IN ('failed', 'dead')",
            &[Arg::Id(id.0), Arg::Time(now)],
        )
        .await?;
    if requeued > 0 && state != SweepState::Active {
        set_state(&mut db, id, SweepState::Active, None).await?;
        change_active_sweeps(&mut db, id, 1).await?;
    }
    tx.commit().await?;
    Ok(requeued as u32)
}

/// Marks active sweeps with no queued or running trial `completed`; returns how many.
pub(crate) async fn finish_sweeps(store: &Store, now: DateTime<Utc>) -> Result<u32, StoreError> {
    let mut tx = store.begin_sweeps().await?;
    let mut db = tx.db();
    let finished: Vec<(Id,)> = db
        .fetch_all(
            "UPDATE sweeps SET state = 'completed', finished_at = $1 \
             WHERE state = 'active' AND NOT EXISTS ( \
                 SELECT 1 FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
                 WHERE st.sweep_id = sweeps.id AND t.state IN ('queued', 'running')) \
             RETURNING id",
            &[Arg::Time(now)],
        )
        .await?;
    for (id,) in &finished {
        change_active_sweeps(&mut db, SweepId(id.0), -1).await?;
    }
    tx.commit().await?;
    Ok(finished.len() as u32)
}

fn not_found(id: SweepId) -> StoreError {
    StoreError::NotFound {
        what: "sweep",
        id: id.to_string(),
    }
}

async fn stored_state(db: &mut Db<'_>, id: SweepId) -> Result<SweepState, StoreError> {
    let state: Option<(String,)> = db
        .fetch_optional("SELECT state FROM sweeps WHERE id = $1", &[Arg::Id(id.0)])
        .await?;
    sweep_state(&state.ok_or_else(|| not_found(id))?.0)
}

async fn has_open_trials(db: &mut Db<'_>, id: SweepId) -> Result<bool, StoreError> {
    let (open,): (bool,) = db
        .fetch_one(
            "SELECT EXISTS (SELECT 1 FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
                 WHERE st.sweep_id = $1 AND t.state IN ('queued', 'running'))",
            &[Arg::Id(id.0)],
        )
        .await?;
    Ok(open)
}

async fn set_state(
    db: &mut Db<'_>,
    id: SweepId,
    state: SweepState,
    finished_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    db.execute(
        "UPDATE sweeps SET state = $2, finished_at = $3 WHERE id = $1",
        &[
            Arg::Id(id.0),
            Arg::Text(state.as_str()),
            Arg::OptTime(finished_at),
        ],
    )
    .await?;
    Ok(())
}

/// Adds `delta` to `active_sweeps` of every trial of the sweep (the sweep became active or
/// stopped being active).
async fn change_active_sweeps(db: &mut Db<'_>, id: SweepId, delta: i32) -> Result<(), StoreError> {
    db.execute(
        "UPDATE trials SET active_sweeps = active_sweeps + $2 \
         WHERE id IN (SELECT trial_id FROM sweep_trials WHERE sweep_id = $1)",
        &[Arg::Id(id.0), Arg::Int(delta)],
    )
    .await?;
    Ok(())
}

/// Inserts the sweep's row.
pub(crate) async fn insert_sweep(
    db: &mut Db<'_>,
    sweep: &NewSweep,
    plan: &SweepPlan,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let seeds_json = serde_json::to_string(&sweep.seeds).expect("a list of integers is JSON");
    // PostgreSQL keeps the JSON columns as `json`/`jsonb`, SQLite as TEXT.
    let sql = db.dialect().pick(
        "INSERT INTO sweeps (id, name, state, created_by, created_at, spec_json, dataset, \
             recipe_json, recipe_hash, seeds_json, max_attempts, grid_points, \
             infeasible_points, distinct_designs) \
         VALUES ($1, $2, 'active', $3, $4, $5::jsonb, $6, $7::json, $8, $9::jsonb, $10, $11, \
             $12, $13)",
        "INSERT INTO sweeps (id, name, state, created_by, created_at, spec_json, dataset, \
             recipe_json, recipe_hash, seeds_json, max_attempts, grid_points, \
             infeasible_points, distinct_designs) \
         VALUES ($1, $2, 'active', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    );
    let args = [
        Arg::Id(sweep.id.0),
        Arg::Text(&sweep.name),
        Arg::Text(&sweep.created_by),
        Arg::Time(now),
        Arg::Text(&sweep.spec_json),
        Arg::Text(&sweep.dataset),
        Arg::Text(&sweep.recipe_json),
        Arg::Text(&sweep.recipe_hash),
        Arg::Text(&seeds_json),
        Arg::Int(sweep.max_attempts),
        Arg::Int(plan.grid_points as i32),
        Arg::Int(plan.infeasible_points as i32),
        Arg::Int(plan.designs.len() as i32),
    ];
    db.execute(sql, &args).await?;
    Ok(())
}

/// Adds the results a new sweep reuses to its aggregates (`sweep_scores`), once its trials
/// are linked. A completion cannot slip in between: on PostgreSQL the linked trials are
/// locked, so a completion either committed before (its result is read here) or waits for
/// this commit and then adds its result itself (see `deepmad_complete`); on SQLite the
/// single writer keeps completions out meanwhile.
pub(crate) async fn add_reused_results(
    db: &mut Db<'_>,
    sweep: SweepId,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    db.execute(
        "WITH sweep_results AS ( \
             SELECT t.design_id, t.dataset, t.recipe_hash, r.top1, r.top5 \
             FROM sweep_trials st \
                 JOIN trials t ON t.id = st.trial_id \
                 JOIN results r ON r.trial_id = t.id \
             WHERE st.sweep_id = $1), \
         groups AS ( \
             SELECT design_id, dataset, recipe_hash, count(*) AS seeds, \
                 avg(top1) AS top1_mean, avg(top5) AS top5_mean \
             FROM sweep_results GROUP BY design_id, dataset, recipe_hash) \
         INSERT INTO sweep_scores (sweep_id, design_id, dataset, recipe_hash, family, seeds, \
             top1_mean, top1_m2, top5_mean, updated_at) \
         SELECT $1, g.design_id, g.dataset, g.recipe_hash, d.family, g.seeds, g.top1_mean, \
             sum((r.top1 - g.top1_mean) * (r.top1 - g.top1_mean)), g.top5_mean, $2 \
         FROM groups g \
             JOIN sweep_results r ON r.design_id = g.design_id AND r.dataset = g.dataset \
                 AND r.recipe_hash = g.recipe_hash \
             JOIN designs d ON d.id = g.design_id \
         GROUP BY g.design_id, g.dataset, g.recipe_hash, d.family, g.seeds, g.top1_mean, \
             g.top5_mean",
        &[Arg::Id(sweep.0), Arg::Time(now)],
    )
    .await?;
    Ok(())
}
