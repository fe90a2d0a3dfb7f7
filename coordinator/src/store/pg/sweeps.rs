//! Creating a sweep on PostgreSQL: one transaction under the sweep lock, with bulk inserts
//! (`UNNEST`). Everything else about sweeps is shared with SQLite
//! (`store/common/sweeps.rs`).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{downstream, PgStore};
use crate::model::TrialId;
use crate::store::assemble::{created, trial_state, LinkedTrial};
use crate::store::common::downstream::insert_tasks;
use crate::store::common::sweeps::{add_reused_results, insert_sweep};
use crate::store::rules::{plan_sweep, SweepPlan};
use crate::store::sql::Db;
use crate::store::types::{NewDesign, NewSweep, SweepCreated};
use crate::store::StoreError;

impl PgStore {
    pub(crate) async fn create_sweep(
        &self,
        sweep: &NewSweep,
        now: DateTime<Utc>,
    ) -> Result<SweepCreated, StoreError> {
        let plan = plan_sweep(sweep);
        let mut tx = self.begin_locked().await?;
        insert_designs(&mut tx, sweep, now).await?;
        insert_sweep(&mut Db::PgConn(&mut tx), sweep, &plan, now).await?;
        insert_tasks(&mut Db::PgConn(&mut tx), sweep).await?;
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
        // The results this sweep reuses; the trials upserted above stay locked until commit.
        add_reused_results(&mut Db::PgConn(&mut tx), sweep.id, now).await?;
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
}

async fn insert_designs(
    conn: &mut PgConnection,
    sweep: &NewSweep,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let designs = &sweep.designs;
    let text = |pick: fn(&NewDesign) -> &str| {
        designs
            .iter()
            .map(|d| pick(d).to_string())
            .collect::<Vec<String>>()
    };
    let real = |pick: fn(&NewDesign) -> f64| designs.iter().map(pick).collect::<Vec<f64>>();
    let int = |pick: fn(&NewDesign) -> i32| designs.iter().map(pick).collect::<Vec<i32>>();
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
