//! Creating a sweep on SQLite: one write transaction, a row at a time (PostgreSQL inserts
//! in bulk, `pg/sweeps.rs`). Everything else about sweeps is shared
//! (`store/common/sweeps.rs`).

use chrono::{DateTime, Utc};

use super::{downstream, SqliteStore};
use crate::model::{SweepId, TrialId};
use crate::store::assemble::{created, trial_state, LinkedTrial};
use crate::store::common::downstream::insert_tasks;
use crate::store::common::sweeps::{add_reused_results, insert_sweep};
use crate::store::rules::plan_sweep;
use crate::store::sql::{Arg, Db, Id};
use crate::store::types::{NewDesign, NewGridPoint, NewSweep, SweepCreated};
use crate::store::StoreError;

impl SqliteStore {
    pub(crate) async fn create_sweep(
        &self,
        sweep: &NewSweep,
        now: DateTime<Utc>,
    ) -> Result<SweepCreated, StoreError> {
        let plan = plan_sweep(sweep);
        let mut tx = self.write().await?;
        let mut db = Db::SqliteConn(&mut tx);
        for design in &sweep.designs {
            insert_design(&mut db, design, now).await?;
        }
        insert_sweep(&mut db, sweep, &plan, now).await?;
        insert_tasks(&mut db, sweep).await?;
        for point in &sweep.grid {
            insert_grid_point(&mut db, sweep.id, point).await?;
        }
        let mut linked = Vec::with_capacity(plan.trials.len());
        for (design, seed) in &plan.trials {
            linked.push(upsert_trial(&mut db, sweep, &design.0, *seed, now).await?);
        }
        for trial in &linked {
            db.execute(
                "INSERT INTO sweep_trials (sweep_id, trial_id) VALUES ($1, $2)",
                &[Arg::Id(sweep.id.0), Arg::Id(trial.id.0)],
            )
            .await?;
        }
        add_reused_results(&mut db, sweep.id, now).await?;
        let downstream_linked = if sweep.tasks.is_empty() {
            0
        } else {
            downstream::queue_for_sweep(&mut db, sweep.id, now).await?
        };
        tx.commit().await?;
        Ok(SweepCreated {
            downstream_linked,
            ..created(&plan, &linked)
        })
    }
}

async fn insert_design(
    db: &mut Db<'_>,
    design: &NewDesign,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let args = [
        Arg::Text(&design.id.0),
        Arg::Text(&design.family),
        Arg::Text(&design.objective_kind),
        Arg::Text(&design.architecture_json),
        Arg::BigInt(design.params),
        Arg::BigInt(design.flops),
        Arg::Int(design.layers),
        Arg::Float(design.effectiveness),
        Arg::Float(design.entropy),
        Arg::Float(design.penalty),
        Arg::Float(design.objective),
        Arg::Int(design.resolution),
        Arg::Int(design.num_classes),
        Arg::Text(&design.solver_version),
        Arg::Time(now),
    ];
    db.execute(
        "INSERT INTO designs (id, family, objective_kind, architecture_json, params, flops, \
             layers, effectiveness, entropy, penalty, objective, resolution, num_classes, \
             solver_version, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT (id) DO NOTHING",
        &args,
    )
    .await?;
    Ok(())
}

async fn insert_grid_point(
    db: &mut Db<'_>,
    sweep: SweepId,
    point: &NewGridPoint,
) -> Result<(), StoreError> {
    let args = [
        Arg::Id(sweep.0),
        Arg::Int(point.index),
        Arg::Text(&point.family),
        Arg::Text(&point.objective_kind),
        Arg::Float(point.rho),
        Arg::Text(&point.alpha_json),
        Arg::Float(point.beta),
        Arg::OptBigInt(point.params_budget),
        Arg::OptBigInt(point.flops_budget),
        Arg::Int(point.resolution),
        Arg::OptText(point.design_id.as_ref().map(|design| design.0.as_str())),
        Arg::OptText(point.infeasible_reason.as_deref()),
        Arg::Float(point.solve_ms),
    ];
    db.execute(
        "INSERT INTO grid_points (sweep_id, point_index, family, objective_kind, rho, \
             alpha_json, beta, params_budget, flops_budget, resolution, design_id, \
             infeasible_reason, solve_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        &args,
    )
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct Upserted {
    id: Id,
    state: String,
}

/// Inserts one trial of the sweep; an existing trial with the same key gains an active
/// sweep and is linked instead.
async fn upsert_trial(
    db: &mut Db<'_>,
    sweep: &NewSweep,
    design_id: &str,
    seed: i64,
    now: DateTime<Utc>,
) -> Result<LinkedTrial, StoreError> {
    let fresh = TrialId::new();
    let args = [
        Arg::Id(fresh.0),
        Arg::Text(design_id),
        Arg::Text(&sweep.recipe_hash),
        Arg::Text(&sweep.dataset),
        Arg::BigInt(seed),
        Arg::Text(&sweep.recipe_json),
        Arg::Int(sweep.max_attempts),
        Arg::Time(now),
    ];
    let row: Upserted = db
        .fetch_one(
            "INSERT INTO trials (id, design_id, recipe_hash, dataset, seed, recipe_json, \
                 state, max_attempts, counted_failures, requeues, active_sweeps, not_before, \
                 created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, 0, 0, 1, $8, $8, $8) \
             ON CONFLICT (design_id, recipe_hash, dataset, seed) \
                 DO UPDATE SET active_sweeps = active_sweeps + 1 \
             RETURNING id, state",
            &args,
        )
        .await?;
    let id = TrialId(row.id.0);
    Ok(LinkedTrial {
        id,
        new: id == fresh,
        state: trial_state(&row.state)?,
    })
}
