//! Completions on PostgreSQL go to the database in batches (`batch.rs`): one call of
//! `deepmad_complete_batch` (`migrations/postgres/0005_generic_plans.sql`) per batch, which
//! runs `deepmad_complete` for each completion in its own subtransaction. One completion's
//! failure or retry therefore never undoes another's, and each keeps the single-call
//! semantics: lock the trial and attempt rows, decide on them, write that outcome, update
//! the sweeps' aggregates and queue downstream trials.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;

use sqlx::Row;

use super::batch::Batcher;
use super::bind_epochs;
use crate::model::{AttemptId, LeaseToken};
use crate::store::types::{EpochMetrics, FinalMetrics};
use crate::store::StoreError;

/// Most completions one statement carries (under the 64 subtransactions PostgreSQL caches
/// per backend: more would slow every snapshot on the server).
const MAX_BATCH: usize = 32;
/// Completion statements in flight at once (not tuned: the first value tried, which met the
/// benchmark's targets).
const RUNNERS: usize = 4;

/// One completion report.
pub(crate) struct Completion {
    pub attempt: AttemptId,
    pub token: LeaseToken,
    pub metrics: FinalMetrics,
    pub now: DateTime<Utc>,
}

/// What `deepmad_complete` answered for one completion.
pub(crate) enum Answer {
    /// Its outcome text (`None`: unknown attempt).
    Done(Option<String>),
    /// It must wait for the sweep lock (or lost a deadlock): nothing was written, try again.
    Retry,
}

/// The queue of completions.
pub(crate) type Completions = Batcher<Completion, Answer>;

/// Starts the completion queue's runners.
pub(crate) fn start(pool: PgPool) -> Completions {
    Batcher::start("completion", RUNNERS, MAX_BATCH, pool, complete_batch)
}

/// Runs one batch; returns one answer per completion, in order.
async fn complete_batch(
    pool: PgPool,
    batch: Vec<Completion>,
) -> Result<Vec<Result<Answer, StoreError>>, StoreError> {
    let each = |pick: fn(&Completion) -> f64| batch.iter().map(pick).collect::<Vec<f64>>();
    let epochs: Vec<&EpochMetrics> = batch
        .iter()
        .flat_map(|c| &c.metrics.epochs_metrics)
        .collect();
    let query = sqlx::query(
        "SELECT deepmad_complete_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
             $14, $15, $16, $17, $18)",
    )
    .bind(batch.iter().map(|c| c.attempt.0).collect::<Vec<_>>())
    .bind(batch.iter().map(|c| c.token.0).collect::<Vec<_>>())
    .bind(batch.iter().map(|c| c.now).collect::<Vec<_>>())
    .bind(each(|c| c.metrics.top1))
    .bind(each(|c| c.metrics.top5))
    .bind(each(|c| c.metrics.test_loss))
    .bind(each(|c| c.metrics.train_seconds))
    .bind(batch.iter().map(|c| c.metrics.epochs).collect::<Vec<i32>>())
    .bind(
        batch
            .iter()
            .map(|c| c.metrics.dataset_hash.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        batch
            .iter()
            .map(|c| c.metrics.checkpoint.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        batch
            .iter()
            .map(|c| c.metrics.epochs_metrics.len() as i32)
            .collect::<Vec<i32>>(),
    );
    let outcomes: Vec<Option<String>> = bind_epochs(query, &epochs)
        .fetch_one(&pool)
        .await?
        .try_get(0)?;
    Ok(outcomes
        .into_iter()
        .map(|outcome| match outcome.as_deref() {
            Some("retry") => Ok(Answer::Retry),
            Some(text) if text.starts_with("error:") => {
                Err(StoreError::Database(text["error:".len()..].to_string()))
            }
            _ => Ok(Answer::Done(outcome)),
        })
        .collect())
}
