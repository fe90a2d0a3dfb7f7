//! Sweeps on PostgreSQL: creating one in a single transaction (bulk inserts with `UNNEST`),
//! reading summaries, cancelling, retrying and finishing.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{count, downstream, lock_sweeps, PgStore};
use crate::model::{SweepId, SweepState, TrialId};
use crate::store::assemble::{
    add_count, created, sweep_state, sweep_summary, trial_state, LinkedTrial, SweepRow,
};
use crate::store::rules::{plan_sweep, SweepPlan};
use crate::store::types::{LeaderboardFilter, NewSweep, SweepCreated, SweepSummary, TrialCounts};
use crate::store::StoreError;

impl PgStore {
    pub(crate) async fn create_sweep(
        &self,
        sweep: &NewSweep,
        now: DateTime<Utc>,
    ) -> Result<SweepCreated, StoreError> {
        let plan = plan_sweep(sweep);
        let mut tx = self.pool.begin().await?;
        lock_sweeps(&mut tx).await?;
        insert_designs(&mut tx, sweep, now).await?;
        insert_sweep(&mut tx, sweep, &plan, now).await?;
        downstream::insert_tasks(&mut tx, sweep).await?;
        insert_grid_points(&mut tx, sweep).await?;
        let linked = upsert_trials(&mut tx, sweep, &plan, now).await?;
        sqlx::query(
            "INSERT INTO sweep_trials (sweep_id, trial_id) SELECT $1, trial_id \
             FROM UNNEST($2::uuid[]) AS linked(trial_id)",
        )
        .bind(sweep.id.0)
        .bind(linked.iter().map(|trial| trial.id.0).collect::<Vec<Uuid>>())
        .execute(&mut *tx)
        .await?;
        // The results this sweep reuses. The trials were locked above, so a completion either
        // committed before (its result is read here) or waits for this commit and then adds
        // its result itself (see `deepmad_complete`).
        sqlx::query(
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
        )
        .bind(sweep.id.0)
        .bind(now)
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
        let row = sqlx::query(
            "SELECT id, name, state, created_by, created_at, dataset, grid_points, \
                 infeasible_points, distinct_designs \
             FROM sweeps WHERE id = $1",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| not_found(id))?;
        self.summary(sweep_row(&row)?).await
    }

    pub(crate) async fn find_sweep(&self, spec_json: &str) -> Result<Option<SweepId>, StoreError> {
        let id: Option<uuid::Uuid> = sqlx::query_scalar(
            "SELECT id FROM sweeps WHERE spec_json = $1::jsonb AND state <> 'cancelled' \
             ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .bind(spec_json)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id.map(SweepId))
    }

    pub(crate) async fn list_sweeps(&self, limit: u32) -> Result<Vec<SweepSummary>, StoreError> {
        let limit = if limit == 0 { 100 } else { i64::from(limit) };
        let rows = sqlx::query(
            "SELECT id, name, state, created_by, created_at, dataset, grid_points, \
                 infeasible_points, distinct_designs \
             FROM sweeps ORDER BY created_at DESC, id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        lock_sweeps(&mut tx).await?;
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
        let mut tx = self.pool.begin().await?;
        lock_sweeps(&mut tx).await?;
        let state = stored_state(&mut tx, id).await?;
        let requeued = sqlx::query(
            "UPDATE trials SET state = 'queued', not_before = $2, counted_failures = 0, \
                 requeues = 0, updated_at = $2 \
             WHERE id IN (SELECT trial_id FROM sweep_trials WHERE sweep_id = $1) \
                 AND state IN ('failed', 'dead')",
        )
        .bind(id.0)
        .bind(now)
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
        let mut tx = self.pool.begin().await?;
        lock_sweeps(&mut tx).await?;
        let finished: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE sweeps SET state = 'completed', finished_at = $1 \
             WHERE state = 'active' AND NOT EXISTS ( \
                 SELECT 1 FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
                 WHERE st.sweep_id = sweeps.id AND t.state IN ('queued', 'running')) \
             RETURNING id",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for id in &finished {
            change_active_sweeps(&mut tx, SweepId(*id), -1).await?;
        }
        tx.commit().await?;
        Ok(finished.len() as u32)
    }

    /// Returns a sweep's summary: its row, its trial counts and its best design.
    async fn summary(&self, row: SweepRow) -> Result<SweepSummary, StoreError> {
        let rows = sqlx::query(
            "SELECT t.state, count(*) AS trials \
             FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
             WHERE st.sweep_id = $1 GROUP BY t.state",
        )
        .bind(row.id.0)
        .fetch_all(&self.pool)
        .await?;
        let mut counts = TrialCounts::default();
        for state_row in &rows {
            let state = trial_state(state_row.try_get("state")?)?;
            add_count(&mut counts, state, count(state_row, "trials")?);
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

fn sweep_row(row: &sqlx::postgres::PgRow) -> Result<SweepRow, StoreError> {
    Ok(SweepRow {
        id: SweepId(row.try_get("id")?),
        name: row.try_get("name")?,
        state: sweep_state(row.try_get("state")?)?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        dataset: row.try_get("dataset")?,
        grid_points: row.try_get("grid_points")?,
        infeasible_points: row.try_get("infeasible_points")?,
        distinct_designs: row.try_get("distinct_designs")?,
    })
}

async fn stored_state(conn: &mut PgConnection, id: SweepId) -> Result<SweepState, StoreError> {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM sweeps WHERE id = $1")
        .bind(id.0)
        .fetch_optional(conn)
        .await?;
    sweep_state(&state.ok_or_else(|| not_found(id))?)
}

async fn has_open_trials(conn: &mut PgConnection, id: SweepId) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
             WHERE st.sweep_id = $1 AND t.state IN ('queued', 'running'))",
    )
    .bind(id.0)
    .fetch_one(conn)
    .await?)
}

async fn set_state(
    conn: &mut PgConnection,
    id: SweepId,
    state: SweepState,
    finished_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE sweeps SET state = $2, finished_at = $3 WHERE id = $1")
        .bind(id.0)
        .bind(state.as_str())
        .bind(finished_at)
        .execute(conn)
        .await?;
    Ok(())
}

/// Adds `delta` to `active_sweeps` of every trial of the sweep (the sweep became active or
/// stopped being active).
async fn change_active_sweeps(
    conn: &mut PgConnection,
    id: SweepId,
    delta: i32,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE trials SET active_sweeps = active_sweeps + $2 \
         WHERE id IN (SELECT trial_id FROM sweep_trials WHERE sweep_id = $1)",
    )
    .bind(id.0)
    .bind(delta)
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_designs(
    conn: &mut PgConnection,
    sweep: &NewSweep,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let designs = &sweep.designs;
    let text = |pick: fn(&crate::store::types::NewDesign) -> &str| {
        designs
            .iter()
            .map(|d| pick(d).to_string())
            .collect::<Vec<String>>()
    };
    let real = |pick: fn(&crate::store::types::NewDesign) -> f64| {
        designs.iter().map(pick).collect::<Vec<f64>>()
    };
    let int = |pick: fn(&crate::store::types::NewDesign) -> i32| {
        designs.iter().map(pick).collect::<Vec<i32>>()
    };
    sqlx::query(
        "INSERT INTO designs (id, family, objective_kind, architecture_json, params, flops, \
             layers, effectiveness, entropy, penalty, objective, resolution, num_classes, \
             solver_version, created_at) \
         SELECT d.id, d.family, d.objective_kind, d.architecture_json::json, d.params, d.flops, \
             d.layers, d.effectiveness, d.entropy, d.penalty, d.objective, d.resolution, \
             d.num_classes, d.solver_version, $15 \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
             $6::bigint[], $7::integer[], $8::float8[], $9::float8[], $10::float8[], \
             $11::float8[], $12::integer[], $13::integer[], $14::text[]) \
             AS d(id, family, objective_kind, architecture_json, params, flops, layers, \
                 effectiveness, entropy, penalty, objective, resolution, num_classes, \
                 solver_version) \
         ON CONFLICT ON CONSTRAINT designs_pkey DO NOTHING",
    )
    .bind(text(|d| &d.id.0))
    .bind(text(|d| &d.family))
    .bind(text(|d| &d.objective_kind))
    .bind(text(|d| &d.architecture_json))
    .bind(designs.iter().map(|d| d.params).collect::<Vec<i64>>())
    .bind(designs.iter().map(|d| d.flops).collect::<Vec<i64>>())
    .bind(int(|d| d.layers))
    .bind(real(|d| d.effectiveness))
    .bind(real(|d| d.entropy))
    .bind(real(|d| d.penalty))
    .bind(real(|d| d.objective))
    .bind(int(|d| d.resolution))
    .bind(int(|d| d.num_classes))
    .bind(text(|d| &d.solver_version))
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_sweep(
    conn: &mut PgConnection,
    sweep: &NewSweep,
    plan: &SweepPlan,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let seeds_json = serde_json::to_string(&sweep.seeds).expect("a list of integers is JSON");
    sqlx::query(
        "INSERT INTO sweeps (id, name, state, created_by, created_at, spec_json, dataset, \
             recipe_json, recipe_hash, seeds_json, max_attempts, grid_points, \
             infeasible_points, distinct_designs) \
         VALUES ($1, $2, 'active', $3, $4, $5::jsonb, $6, $7::json, $8, $9::jsonb, $10, $11, \
             $12, $13)",
    )
    .bind(sweep.id.0)
    .bind(&sweep.name)
    .bind(&sweep.created_by)
    .bind(now)
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

async fn insert_grid_points(conn: &mut PgConnection, sweep: &NewSweep) -> Result<(), StoreError> {
    let grid = &sweep.grid;
    sqlx::query(
        "INSERT INTO grid_points (sweep_id, point_index, family, objective_kind, rho, \
             alpha_json, beta, params_budget, flops_budget, resolution, design_id, \
             infeasible_reason, solve_ms) \
         SELECT $1, g.point_index, g.family, g.objective_kind, g.rho, g.alpha_json::jsonb, \
             g.beta, g.params_budget, g.flops_budget, g.resolution, g.design_id, \
             g.infeasible_reason, g.solve_ms \
         FROM UNNEST($2::integer[], $3::text[], $4::text[], $5::float8[], $6::text[], \
             $7::float8[], $8::bigint[], $9::bigint[], $10::integer[], $11::text[], \
             $12::text[], $13::float8[]) \
             AS g(point_index, family, objective_kind, rho, alpha_json, beta, params_budget, \
                 flops_budget, resolution, design_id, infeasible_reason, solve_ms)",
    )
    .bind(sweep.id.0)
    .bind(grid.iter().map(|g| g.index).collect::<Vec<i32>>())
    .bind(
        grid.iter()
            .map(|g| g.family.clone())
            .collect::<Vec<String>>(),
    )
    .bind(
        grid.iter()
            .map(|g| g.objective_kind.clone())
            .collect::<Vec<String>>(),
    )
    .bind(grid.iter().map(|g| g.rho).collect::<Vec<f64>>())
    .bind(
        grid.iter()
            .map(|g| g.alpha_json.clone())
            .collect::<Vec<String>>(),
    )
    .bind(grid.iter().map(|g| g.beta).collect::<Vec<f64>>())
    .bind(
        grid.iter()
            .map(|g| g.params_budget)
            .collect::<Vec<Option<i64>>>(),
    )
    .bind(
        grid.iter()
            .map(|g| g.flops_budget)
            .collect::<Vec<Option<i64>>>(),
    )
    .bind(grid.iter().map(|g| g.resolution).collect::<Vec<i32>>())
    .bind(
        grid.iter()
            .map(|g| g.design_id.as_ref().map(|d| d.0.clone()))
            .collect::<Vec<_>>(),
    )
    .bind(
        grid.iter()
            .map(|g| g.infeasible_reason.clone())
            .collect::<Vec<Option<String>>>(),
    )
    .bind(grid.iter().map(|g| g.solve_ms).collect::<Vec<f64>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts the sweep's trials; an existing trial with the same key gains an active sweep
/// and is linked instead.
async fn upsert_trials(
    conn: &mut PgConnection,
    sweep: &NewSweep,
    plan: &SweepPlan,
    now: DateTime<Utc>,
) -> Result<Vec<LinkedTrial>, StoreError> {
    let fresh_ids: Vec<Uuid> = plan.trials.iter().map(|_| TrialId::new().0).collect();
    let rows = sqlx::query(
        "INSERT INTO trials (id, design_id, recipe_hash, dataset, seed, recipe_json, state, \
             max_attempts, counted_failures, requeues, active_sweeps, not_before, created_at, \
             updated_at) \
         SELECT new.id, new.design_id, $4, $5, new.seed, $6::json, 'queued', $7, 0, 0, 1, \
             $8, $8, $8 \
         FROM UNNEST($1::uuid[], $2::text[], $3::bigint[]) AS new(id, design_id, seed) \
         ON CONFLICT ON CONSTRAINT trials_key \
             DO UPDATE SET active_sweeps = trials.active_sweeps + 1 \
         RETURNING id, state",
    )
    .bind(&fresh_ids)
    .bind(
        plan.trials
            .iter()
            .map(|(d, _)| d.0.clone())
            .collect::<Vec<String>>(),
    )
    .bind(
        plan.trials
            .iter()
            .map(|(_, seed)| *seed)
            .collect::<Vec<i64>>(),
    )
    .bind(&sweep.recipe_hash)
    .bind(&sweep.dataset)
    .bind(&sweep.recipe_json)
    .bind(sweep.max_attempts)
    .bind(now)
    .fetch_all(conn)
    .await?;
    let fresh: HashSet<Uuid> = fresh_ids.iter().copied().collect();
    rows.iter()
        .map(|row| {
            let id: Uuid = row.try_get("id")?;
            Ok(LinkedTrial {
                id: TrialId(id),
                new: fresh.contains(&id),
                state: trial_state(row.try_get("state")?)?,
            })
        })
        .collect()
}
