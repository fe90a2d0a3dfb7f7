//! Sweeps on SQLite: creating one in a single write transaction, reading summaries,
//! cancelling, retrying and finishing. Mirrors `pg/sweeps.rs`.

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::{downstream, get_time, get_uuid, time_text, uuid_text, SqliteStore};
use crate::model::{SweepId, SweepState, TrialId};
use crate::store::assemble::{
    add_count, created, sweep_state, sweep_summary, trial_state, LinkedTrial, SweepRow,
};
use crate::store::rules::{plan_sweep, SweepPlan};
use crate::store::types::{
    LeaderboardFilter, NewDesign, NewGridPoint, NewSweep, SweepCreated, SweepSummary, TrialCounts,
};
use crate::store::StoreError;

const SWEEP_COLUMNS: &str = "SELECT id, name, state, created_by, created_at, dataset, \
    grid_points, infeasible_points, distinct_designs FROM sweeps";

impl SqliteStore {
    pub(crate) async fn create_sweep(
        &self,
        sweep: &NewSweep,
        now: DateTime<Utc>,
    ) -> Result<SweepCreated, StoreError> {
        let plan = plan_sweep(sweep);
        let mut tx = self.write().await?;
        for design in &sweep.designs {
            insert_design(&mut tx, design, now).await?;
        }
        insert_sweep(&mut tx, sweep, &plan, now).await?;
        downstream::insert_tasks(&mut tx, sweep).await?;
        for point in &sweep.grid {
            insert_grid_point(&mut tx, sweep.id, point).await?;
        }
        let mut linked = Vec::with_capacity(plan.trials.len());
        for (design, seed) in &plan.trials {
            linked.push(upsert_trial(&mut tx, sweep, &design.0, *seed, now).await?);
        }
        for trial in &linked {
            sqlx::query("INSERT INTO sweep_trials (sweep_id, trial_id) VALUES (?1, ?2)")
                .bind(uuid_text(sweep.id.0))
                .bind(uuid_text(trial.id.0))
                .execute(&mut *tx)
                .await?;
        }
        // The results this sweep reuses (the single writer keeps completions out meanwhile).
        sqlx::query(
            "WITH sweep_results AS ( \
                 SELECT t.design_id, t.dataset, t.recipe_hash, r.top1, r.top5 \
                 FROM sweep_trials st \
                     JOIN trials t ON t.id = st.trial_id \
                     JOIN results r ON r.trial_id = t.id \
                 WHERE st.sweep_id = ?1), \
             groups AS ( \
                 SELECT design_id, dataset, recipe_hash, count(*) AS seeds, \
                     avg(top1) AS top1_mean, avg(top5) AS top5_mean \
                 FROM sweep_results GROUP BY design_id, dataset, recipe_hash) \
             INSERT INTO sweep_scores (sweep_id, design_id, dataset, recipe_hash, family, seeds, \
                 top1_mean, top1_m2, top5_mean, updated_at) \
             SELECT ?1, g.design_id, g.dataset, g.recipe_hash, d.family, g.seeds, g.top1_mean, \
                 sum((r.top1 - g.top1_mean) * (r.top1 - g.top1_mean)), g.top5_mean, ?2 \
             FROM groups g \
                 JOIN sweep_results r ON r.design_id = g.design_id AND r.dataset = g.dataset \
                     AND r.recipe_hash = g.recipe_hash \
                 JOIN designs d ON d.id = g.design_id \
             GROUP BY g.design_id, g.dataset, g.recipe_hash, d.family, g.seeds, g.top1_mean, \
                 g.top5_mean",
        )
        .bind(uuid_text(sweep.id.0))
        .bind(time_text(now))
        .execute(&mut *tx)
        .await?;
        let downstream_linked = if sweep.tasks.is_empty() {
            0
        } else {
            downstream::queue_for_sweep(&mut tx, sweep.id, now).await?
        };
        tx.commit().await?;
        Ok(SweepCreated {
            downstream_linked,
            ..created(&plan, &linked)
        })
    }

    pub(crate) async fn get_sweep(&self, id: SweepId) -> Result<SweepSummary, StoreError> {
        let row = sqlx::query(&format!("{SWEEP_COLUMNS} WHERE id = ?1"))
            .bind(uuid_text(id.0))
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| not_found(id))?;
        self.summary(sweep_row(&row)?).await
    }

    pub(crate) async fn find_sweep(&self, spec_json: &str) -> Result<Option<SweepId>, StoreError> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT id FROM sweeps WHERE json(spec_json) = json(?1) AND state <> 'cancelled' \
             ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .bind(spec_json)
        .fetch_optional(&self.reader)
        .await?;
        id.map(|text| {
            uuid::Uuid::parse_str(&text)
                .map(SweepId)
                .map_err(|_| StoreError::corrupt("uuid", &text))
        })
        .transpose()
    }

    pub(crate) async fn list_sweeps(&self, limit: u32) -> Result<Vec<SweepSummary>, StoreError> {
        let limit = if limit == 0 { 100 } else { i64::from(limit) };
        let rows = sqlx::query(&format!(
            "{SWEEP_COLUMNS} ORDER BY created_at DESC, id DESC LIMIT ?1"
        ))
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        let mut summaries = Vec::with_capacity(rows.len());
        for row in &rows {
            summaries.push(self.summary(sweep_row(row)?).await?);
        }
        Ok(summaries)
    }

    pub(crate) async fn cancel_sweep(
        &self,
        id: SweepId,
        now: DateTime<Utc>,
    ) -> Result<SweepSummary, StoreError> {
        let mut tx = self.write().await?;
        let state = stored_state(&mut tx, id).await?;
        if state == SweepState::Active {
            // A sweep with nothing left to run is completed, not cancelled.
            let next = if has_open_trials(&mut tx, id).await? {
                SweepState::Cancelled
            } else {
                SweepState::Completed
            };
            set_state(&mut tx, id, next, Some(now)).await?;
            change_active_sweeps(&mut tx, id, -1).await?;
        }
        tx.commit().await?;
        self.get_sweep(id).await
    }

    pub(crate) async fn retry_trials(
        &self,
        id: SweepId,
        now: DateTime<Utc>,
    ) -> Result<u32, StoreError> {
        let mut tx = self.write().await?;
        let state = stored_state(&mut tx, id).await?;
        let requeued = sqlx::query(
            "UPDATE trials SET state = 'queued', not_before = ?2, counted_failures = 0, \
                 requeues = 0, updated_at = ?2 \
             WHERE id IN (SELECT trial_id FROM sweep_trials WHERE sweep_id = ?1) \
                 AND state IN ('failed', 'dead')",
        )
        .bind(uuid_text(id.0))
        .bind(time_text(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if requeued > 0 && state != SweepState::Active {
            set_state(&mut tx, id, SweepState::Active, None).await?;
            change_active_sweeps(&mut tx, id, 1).await?;
        }
        tx.commit().await?;
        Ok(requeued as u32)
    }

    /// Marks active sweeps with no queued or running trial `completed`; returns how many.
    pub(crate) async fn finish_sweeps(&self, now: DateTime<Utc>) -> Result<u32, StoreError> {
        let mut tx = self.write().await?;
        let finished: Vec<String> = sqlx::query_scalar(
            "UPDATE sweeps SET state = 'completed', finished_at = ?1 \
             WHERE state = 'active' AND NOT EXISTS ( \
                 SELECT 1 FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
                 WHERE st.sweep_id = sweeps.id AND t.state IN ('queued', 'running')) \
             RETURNING id",
        )
        .bind(time_text(now))
        .fetch_all(&mut *tx)
        .await?;
        for id in &finished {
            let id = uuid::Uuid::parse_str(id).map_err(|_| StoreError::corrupt("uuid", id))?;
            change_active_sweeps(&mut tx, SweepId(id), -1).await?;
        }
        tx.commit().await?;
        Ok(finished.len() as u32)
    }

    /// Returns a sweep's summary: its row, its trial counts and its best design.
    async fn summary(&self, row: SweepRow) -> Result<SweepSummary, StoreError> {
        let rows = sqlx::query(
            "SELECT t.state, count(*) AS trials \
             FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
             WHERE st.sweep_id = ?1 GROUP BY t.state",
        )
        .bind(uuid_text(row.id.0))
        .fetch_all(&self.reader)
        .await?;
        let mut counts = TrialCounts::default();
        for state_row in &rows {
            let state = trial_state(state_row.try_get("state")?)?;
            add_count(&mut counts, state, state_row.try_get("trials")?);
        }
        let filter = LeaderboardFilter {
            sweep: Some(row.id),
            limit: 1,
            ..LeaderboardFilter::default()
        };
        let best = self.leaderboard(&filter).await?.into_iter().next();
        Ok(sweep_summary(row, counts, best))
    }
}

fn not_found(id: SweepId) -> StoreError {
    StoreError::NotFound {
        what: "sweep",
        id: id.to_string(),
    }
}

fn sweep_row(row: &SqliteRow) -> Result<SweepRow, StoreError> {
    Ok(SweepRow {
        id: SweepId(get_uuid(row, "id")?),
        name: row.try_get("name")?,
        state: sweep_state(row.try_get("state")?)?,
        created_by: row.try_get("created_by")?,
        created_at: get_time(row, "created_at")?,
        dataset: row.try_get("dataset")?,
        grid_points: row.try_get("grid_points")?,
        infeasible_points: row.try_get("infeasible_points")?,
        distinct_designs: row.try_get("distinct_designs")?,
    })
}

async fn stored_state(conn: &mut SqliteConnection, id: SweepId) -> Result<SweepState, StoreError> {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM sweeps WHERE id = ?1")
        .bind(uuid_text(id.0))
        .fetch_optional(conn)
        .await?;
    sweep_state(&state.ok_or_else(|| not_found(id))?)
}

async fn has_open_trials(conn: &mut SqliteConnection, id: SweepId) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
             WHERE st.sweep_id = ?1 AND t.state IN ('queued', 'running'))",
    )
    .bind(uuid_text(id.0))
    .fetch_one(conn)
    .await?)
}

async fn set_state(
    conn: &mut SqliteConnection,
    id: SweepId,
    state: SweepState,
    finished_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE sweeps SET state = ?2, finished_at = ?3 WHERE id = ?1")
        .bind(uuid_text(id.0))
        .bind(state.as_str())
        .bind(finished_at.map(time_text))
        .execute(conn)
        .await?;
    Ok(())
}

/// Adds `delta` to `active_sweeps` of every trial of the sweep.
async fn change_active_sweeps(
    conn: &mut SqliteConnection,
    id: SweepId,
    delta: i32,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE trials SET active_sweeps = active_sweeps + ?2 \
         WHERE id IN (SELECT trial_id FROM sweep_trials WHERE sweep_id = ?1)",
    )
    .bind(uuid_text(id.0))
    .bind(delta)
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_design(
    conn: &mut SqliteConnection,
    design: &NewDesign,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO designs (id, family, objective_kind, architecture_json, params, flops, \
             layers, effectiveness, entropy, penalty, objective, resolution, num_classes, \
             solver_version, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&design.id.0)
    .bind(&design.family)
    .bind(&design.objective_kind)
    .bind(&design.architecture_json)
    .bind(design.params)
    .bind(design.flops)
    .bind(design.layers)
    .bind(design.effectiveness)
    .bind(design.entropy)
    .bind(design.penalty)
    .bind(design.objective)
    .bind(design.resolution)
    .bind(design.num_classes)
    .bind(&design.solver_version)
    .bind(time_text(now))
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_sweep(
    conn: &mut SqliteConnection,
    sweep: &NewSweep,
    plan: &SweepPlan,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let seeds_json = serde_json::to_string(&sweep.seeds).expect("a list of integers is JSON");
    sqlx::query(
        "INSERT INTO sweeps (id, name, state, created_by, created_at, spec_json, dataset, \
             recipe_json, recipe_hash, seeds_json, max_attempts, grid_points, \
             infeasible_points, distinct_designs) \
         VALUES (?1, ?2, 'active', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )
    .bind(uuid_text(sweep.id.0))
    .bind(&sweep.name)
    .bind(&sweep.created_by)
    .bind(time_text(now))
    .bind(&sweep.spec_json)
    .bind(&sweep.dataset)
    .bind(&sweep.recipe_json)
    .bind(&sweep.recipe_hash)
    .bind(seeds_json)
    .bind(sweep.max_attempts)
    .bind(plan.grid_points as i32)
    .bind(plan.infeasible_points as i32)
    .bind(plan.designs.len() as i32)
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_grid_point(
    conn: &mut SqliteConnection,
    sweep: SweepId,
    point: &NewGridPoint,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO grid_points (sweep_id, point_index, family, objective_kind, rho, \
             alpha_json, beta, params_budget, flops_budget, resolution, design_id, \
             infeasible_reason, solve_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )
    .bind(uuid_text(sweep.0))
    .bind(point.index)
    .bind(&point.family)
    .bind(&point.objective_kind)
    .bind(point.rho)
    .bind(&point.alpha_json)
    .bind(point.beta)
    .bind(point.params_budget)
    .bind(point.flops_budget)
    .bind(point.resolution)
    .bind(point.design_id.as_ref().map(|design| design.0.as_str()))
    .bind(&point.infeasible_reason)
    .bind(point.solve_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts one trial of the sweep; an existing trial with the same key gains an active
/// sweep and is linked instead.
async fn upsert_trial(
    conn: &mut SqliteConnection,
    sweep: &NewSweep,
    design_id: &str,
    seed: i64,
    now: DateTime<Utc>,
) -> Result<LinkedTrial, StoreError> {
    let fresh = TrialId::new();
    let row = sqlx::query(
        "INSERT INTO trials (id, design_id, recipe_hash, dataset, seed, recipe_json, state, \
             max_attempts, counted_failures, requeues, active_sweeps, not_before, created_at, \
             updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, 0, 0, 1, ?8, ?8, ?8) \
         ON CONFLICT (design_id, recipe_hash, dataset, seed) \
             DO UPDATE SET active_sweeps = active_sweeps + 1 \
         RETURNING id, state",
    )
    .bind(uuid_text(fresh.0))
    .bind(design_id)
    .bind(&sweep.recipe_hash)
    .bind(&sweep.dataset)
    .bind(seed)
    .bind(&sweep.recipe_json)
    .bind(sweep.max_attempts)
    .bind(time_text(now))
    .fetch_one(conn)
    .await?;
    let id = TrialId(get_uuid(&row, "id")?);
    Ok(LinkedTrial {
        id,
        new: id == fresh,
        state: trial_state(row.try_get("state")?)?,
    })
}
