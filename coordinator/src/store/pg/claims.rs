//! Claims on PostgreSQL go to the database in batches.
//!
//! Under load, what a claim costs the database is mostly per statement, not per row: the
//! round trip, a snapshot, starting the executor on a five-way CTE, and a commit with its WAL
//! flush. Concurrent claims therefore queue here and a few runners send whatever is queued
//! as one call of `deepmad_claim` (`migrations/postgres/0005_generic_plans.sql`), up to
//! [`MAX_BATCH`] requests per statement, at most [`RUNNERS`] statements at a time. When the
//! store is idle a claim goes out alone at once, so batching adds no waiting; under load the
//! batches grow by themselves while earlier ones run (group commit, as a database does it).
//! Every request keeps its own attempt, token, `now` and expiry; the earliest request of a
//! batch gets the oldest trial.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use crate::model::{AttemptId, DesignId, LeaseToken, TrialId, WorkerId};
use crate::store::rules::after_ms;
use crate::store::types::Lease;
use crate::store::StoreError;

/// Most claims one statement carries.
const MAX_BATCH: usize = 64;
/// Claim statements in flight at once (each holds a pool connection while it runs). On the
/// 2-core benchmark machine 2 gave the lowest claim latency at 2,000 claims/s (4: about twice
/// the p99; 1: lower throughput); more would mostly take connections from completions.
const RUNNERS: usize = 2;

type Reply = oneshot::Sender<Result<Option<Lease>, StoreError>>;

/// One queued claim: who asks, when, for how long, and where the answer goes.
struct Request {
    worker: WorkerId,
    now: DateTime<Utc>,
    lease_ms: i64,
    reply: Reply,
}

/// The queue of claims and its runners.
#[derive(Debug, Clone)]
pub(crate) struct Claims {
    sender: mpsc::UnboundedSender<Request>,
}

impl Claims {
    /// Starts the runners on the current tokio runtime. They stop when the last handle
    /// (every clone of the store) is dropped.
    pub(crate) fn start(pool: PgPool) -> Claims {
        let (sender, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..RUNNERS {
            tokio::spawn(run(pool.clone(), Arc::clone(&receiver)));
        }
        Claims { sender }
    }

    /// Claims a trial for `worker`: `None` when no trial is ready, `NotFound` for a worker
    /// that never registered.
    pub(crate) async fn claim(
        &self,
        worker: WorkerId,
        lease_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<Lease>, StoreError> {
        let stopped = || StoreError::Unavailable("the claim queue has stopped".to_string());
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request {
                worker,
                now,
                lease_ms,
                reply,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Takes whatever claims are queued (waiting for the first), sends them as one statement and
/// answers each; until every handle is gone.
async fn run(pool: PgPool, receiver: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>) {
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            batch
        };
        let attempts: Vec<(AttemptId, LeaseToken, DateTime<Utc>)> = batch
            .iter()
            .map(|r| {
                let expires = after_ms(r.now, r.lease_ms);
                (AttemptId::new(), LeaseToken::new(), expires)
            })
            .collect();
        match claim_batch(&pool, &batch, &attempts).await {
            Ok(answers) => {
                for (request, answer) in batch.into_iter().zip(answers) {
                    // A caller that gave up leaves its lease to expire, as a lost worker does.
                    let _ = request.reply.send(answer);
                }
            }
            Err(error) => {
                for request in batch {
                    let _ = request.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Runs one batch; returns one answer per request, in order.
async fn claim_batch(
    pool: &PgPool,
    batch: &[Request],
    attempts: &[(AttemptId, LeaseToken, DateTime<Utc>)],
) -> Result<Vec<Result<Option<Lease>, StoreError>>, StoreError> {
    let rows = sqlx::query("SELECT * FROM deepmad_claim($1, $2, $3, $4, $5)")
        .bind(batch.iter().map(|r| r.worker.0).collect::<Vec<Uuid>>())
        .bind(batch.iter().map(|r| r.now).collect::<Vec<DateTime<Utc>>>())
        .bind(attempts.iter().map(|a| a.0 .0).collect::<Vec<Uuid>>())
        .bind(attempts.iter().map(|a| a.1 .0).collect::<Vec<Uuid>>())
        .bind(attempts.iter().map(|a| a.2).collect::<Vec<DateTime<Utc>>>())
        .fetch_all(pool)
        .await?;
    if rows.len() != batch.len() {
        return Err(StoreError::Database(format!(
            "deepmad_claim answered {} of {} claims",
            rows.len(),
            batch.len()
        )));
    }
    let mut answers = Vec::with_capacity(batch.len());
    for ((row, request), (attempt, token, expires_at)) in rows.iter().zip(batch).zip(attempts) {
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
