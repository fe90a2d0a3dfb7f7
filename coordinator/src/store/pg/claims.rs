//! Claims on PostgreSQL go to the database in batches (`batch.rs`): one call of
//! `deepmad_claim` (`migrations/postgres/0005_generic_plans.sql`) per batch, up to
//! [`MAX_BATCH`] claims, at most [`RUNNERS`] statements at a time. Every claim keeps its own
//! attempt, token, `now` and expiry; the earliest claim of a batch gets the oldest trial.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::Row;
use uuid::Uuid;

use super::batch::Batcher;
use crate::model::{AttemptId, DesignId, LeaseToken, TrialId, WorkerId};
use crate::store::rules::after_ms;
use crate::store::types::Lease;
use crate::store::StoreError;

/// Most claims one statement carries.
const MAX_BATCH: usize = 64;
/// Claim statements in flight at once (each holds a pool connection while it runs). On the
/// 2-core benchmark machine, measured before completions were batched too, 2 gave the lowest
/// claim latency at 2,000 claims/s (4: about twice the p99; 1: lower throughput).
const RUNNERS: usize = 2;

/// One claim: who asks, when, for how long.
pub(crate) struct Claim {
    worker: WorkerId,
    now: DateTime<Utc>,
    lease_ms: i64,
}

/// The queue of claims.
pub(crate) type Claims = Batcher<Claim, Option<Lease>>;

/// Starts the claim queue's runners.
pub(crate) fn start(pool: PgPool) -> Claims {
    Batcher::start("claim", RUNNERS, MAX_BATCH, pool, claim_batch)
}

/// Claims a trial for `worker`: `None` when no trial is ready, `NotFound` for a worker that
/// never registered.
pub(crate) async fn claim(
    claims: &Claims,
    worker: WorkerId,
    lease_ms: i64,
    now: DateTime<Utc>,
) -> Result<Option<Lease>, StoreError> {
    claims
        .call(Claim {
            worker,
            now,
            lease_ms,
        })
        .await
}

/// Runs one batch; returns one answer per claim, in order.
async fn claim_batch(
    pool: PgPool,
    batch: Vec<Claim>,
) -> Result<Vec<Result<Option<Lease>, StoreError>>, StoreError> {
    let attempts: Vec<(AttemptId, LeaseToken, DateTime<Utc>)> = batch
        .iter()
        .map(|c| {
            (
                AttemptId::new(),
                LeaseToken::new(),
                after_ms(c.now, c.lease_ms),
            )
        })
        .collect();
    let rows = sqlx::query("SELECT * FROM deepmad_claim($1, $2, $3, $4, $5)")
        .bind(batch.iter().map(|r| r.worker.0).collect::<Vec<Uuid>>())
        .bind(batch.iter().map(|r| r.now).collect::<Vec<DateTime<Utc>>>())
        .bind(attempts.iter().map(|a| a.0 .0).collect::<Vec<Uuid>>())
        .bind(attempts.iter().map(|a| a.1 .0).collect::<Vec<Uuid>>())
        .bind(attempts.iter().map(|a| a.2).collect::<Vec<DateTime<Utc>>>())
        .fetch_all(&pool)
        .await?;
    let mut answers = Vec::with_capacity(batch.len());
    for ((row, request), (attempt, token, expires_at)) in rows.iter().zip(&batch).zip(&attempts) {
        if !row.try_get::<bool, _>("known")? {
            answers.push(Err(StoreError::NotFound {
                what: "worker",
                id: request.worker.to_string(),
            }));
            continue;
        }
        let Some(trial) = row.try_get::<Option<Uuid>, _>("trial_id")? else {
            answers.push(Ok(None));
            continue;
        };
        answers.push(Ok(Some(Lease {
            attempt: *attempt,
            token: *token,
            trial: TrialId(trial),
            design_id: DesignId(row.try_get("design_id")?),
            architecture_json: row.try_get("architecture_json")?,
            recipe_json: row.try_get("recipe_json")?,
            dataset: row.try_get("dataset")?,
            seed: row.try_get("seed")?,
            expires_at: *expires_at,
            task: row.try_get("task")?,
            parent: row
                .try_get::<Option<Uuid>, _>("parent_trial_id")?
                .map(TrialId),
            upload_weights: row
                .try_get::<Option<bool>, _>("upload_weights")?
                .unwrap_or(false),
        })));
    }
    Ok(answers)
}
