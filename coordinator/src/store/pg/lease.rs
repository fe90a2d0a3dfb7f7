//! The work protocol on PostgreSQL: register, claim, heartbeat, complete, fail, reap, grace.
//!
//! An attempt holds its trial's lease while it is `running`, its token matches and `now` is
//! not past `lease_expires_at`. Transactions that change an attempt lock its trial row, then
//! the attempt row ([`lock_attempt`]), so two reports of one trial are serialised and each
//! sees the other's outcome.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::completions::{Answer, Completion};
use super::{claims, upsert_epochs, PgStore};
use crate::model::{
    AttemptId, AttemptState, FailureClass, LeaseToken, TrialId, TrialState, WorkerId,
};
use crate::store::assemble::attempt_state;
use crate::store::rules::{after_failure, after_ms, RetryCounters, Verdict};
use crate::store::types::{
    CompleteOutcome, EpochMetrics, FailOutcome, FinalMetrics, HeartbeatOutcome, Lease, NewWorker,
    Progress, RetryPolicy,
};
use crate::store::{FailureReport, StoreError};

/// How often a completion is tried while the sweep lock is busy.
const RETRIES: u64 = 50;

/// Most expired attempts one reaper pass handles; the next pass takes the rest.
const REAP_BATCH: i64 = 1_000;

impl PgStore {
    pub(crate) async fn register_worker(
        &self,
        worker: &NewWorker,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO workers (id, name, devices_json, protocol_version, registered_at, \
                 last_seen_at) \
             VALUES ($1, $2, $3::jsonb, $4, $5, $5) \
             ON CONFLICT ON CONSTRAINT workers_pkey DO UPDATE SET name = EXCLUDED.name, \
                 devices_json = EXCLUDED.devices_json, \
                 protocol_version = EXCLUDED.protocol_version, last_seen_at = EXCLUDED.last_seen_at",
        )
        .bind(worker.id.0)
        .bind(&worker.name)
        .bind(&worker.devices_json)
        .bind(worker.protocol_version)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Claims a trial for `worker` (see `pg/claims.rs`: concurrent claims share a statement).
    pub(crate) async fn claim(
        &self,
        worker: WorkerId,
        lease_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<Lease>, StoreError> {
        claims::claim(&self.claims, worker, lease_ms, now).await
    }

    pub(crate) async fn heartbeat(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        progress: &Progress,
        epochs: &[EpochMetrics],
        lease_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<HeartbeatOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (trial, view) = lock_attempt(&mut tx, attempt).await?;
        check_token(&view, attempt, token)?;
        if view.state == AttemptState::Cancelled {
            // Roll back now: a dropped transaction releases its row locks only lazily.
            tx.rollback().await?;
            return Ok(HeartbeatOutcome::Cancelled);
        }
        if !view.holds_lease(now) {
            // An expired lease is lost now; the reaper requeues the trial under its policy.
            tx.rollback().await?;
            return Ok(HeartbeatOutcome::LeaseLost);
        }
        upsert_epochs(&mut tx, attempt, trial.id, epochs, now).await?;
        if trial.active_sweeps == 0 {
            cancel_attempt(&mut tx, trial.id, attempt, now).await?;
            tx.commit().await?;
            return Ok(HeartbeatOutcome::Cancelled);
        }
        let expires_at = after_ms(now, lease_ms);
        sqlx::query(
            "UPDATE attempts SET heartbeat_at = $2, lease_expires_at = $3, progress_epoch = $4, \
                 progress_step = $5, progress_loss = $6, progress_top1 = $7, \
                 progress_images_per_second = $8 \
             WHERE id = $1",
        )
        .bind(attempt.0)
        .bind(now)
        .bind(expires_at)
        .bind(progress.epoch)
        .bind(progress.step)
        .bind(progress.loss)
        .bind(progress.top1)
        .bind(progress.images_per_second)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(HeartbeatOutcome::Continue { expires_at })
    }

    /// Completes through the completion queue (`pg/completions.rs`: concurrent completions
    /// share a statement, each in its own subtransaction), with the transaction's semantics
    /// of `deepmad_complete` (`migrations/postgres/0003_sweep_scores.sql`, redefined in
    /// `0004_downstream.sql`): lock the trial and attempt rows, decide the outcome on the
    /// locked rows, write what that outcome writes, add a recorded result to its sweeps'
    /// aggregates and queue its downstream trials.
    pub(crate) async fn complete(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        metrics: &FinalMetrics,
        now: DateTime<Utc>,
    ) -> Result<CompleteOutcome, StoreError> {
        // A completion answers Retry, having written nothing, when it must queue downstream
        // trials while a sweep-level change holds the sweep lock
        // (migrations/postgres/0004_downstream.sql): such changes are short, so try again.
        for tries in 1..=RETRIES {
            let completion = Completion {
                attempt,
                token,
                metrics: metrics.clone(),
                now,
            };
            match self.completions.call(completion).await? {
                Answer::Done(text) => return outcome(text, attempt),
                Answer::Retry => {
                    tokio::time::sleep(std::time::Duration::from_millis(2 * tries)).await;
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "completion of attempt {attempt} still waits for the sweep lock after {RETRIES} tries"
        )))
    }

    pub(crate) async fn fail(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        report: &FailureReport<'_>,
        now: DateTime<Utc>,
    ) -> Result<FailOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (trial, view) = lock_attempt(&mut tx, attempt).await?;
        check_token(&view, attempt, token)?;
        if !view.holds_lease(now) {
            tx.rollback().await?;
            return Ok(FailOutcome::NotLeaseHolder);
        }
        finish_attempt(&mut tx, attempt, AttemptState::Failed, report, now).await?;
        let (counters, verdict) = after_failure(
            report.class,
            trial.counters,
            report.max_attempts_override,
            report.policy,
            now,
        );
        apply_verdict(&mut tx, trial.id, counters, verdict, now).await?;
        tx.commit().await?;
        Ok(match verdict {
            Verdict::Requeue { not_before } => FailOutcome::Requeued { not_before },
            Verdict::Stop(state) => FailOutcome::Stopped { state },
        })
    }

    pub(crate) async fn reap_expired(
        &self,
        policy: &RetryPolicy,
        now: DateTime<Utc>,
    ) -> Result<u32, StoreError> {
        let expired: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM attempts WHERE state = 'running' AND lease_expires_at < $1 \
             ORDER BY lease_expires_at LIMIT $2",
        )
        .bind(now)
        .bind(REAP_BATCH)
        .fetch_all(&self.pool)
        .await?;
        let mut reaped = 0;
        for attempt in expired {
            if self.reap_one(AttemptId(attempt), policy, now).await? {
                reaped += 1;
            }
        }
        self.finish_sweeps(now).await?;
        Ok(reaped)
    }

    /// Expires one attempt and requeues its trial, unless another transaction (another
    /// reaper, a report) holds the trial or already moved the attempt on.
    async fn reap_one(
        &self,
        attempt: AttemptId,
        policy: &RetryPolicy,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "{TRIAL_COLUMNS} WHERE id = (SELECT trial_id FROM attempts WHERE id = $1) \
             FOR UPDATE SKIP LOCKED"
        ))
        .bind(attempt.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(false) };
        let trial = locked_trial(&row)?;
        let expired = sqlx::query(
            "UPDATE attempts SET state = 'expired', failure_class = 'lost', \
                 failure_message = 'lease expired', finished_at = $2 \
             WHERE id = $1 AND state = 'running' AND lease_expires_at < $2",
        )
        .bind(attempt.0)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if expired == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        let (counters, verdict) =
            after_failure(FailureClass::Lost, trial.counters, None, policy, now);
        apply_verdict(&mut tx, trial.id, counters, verdict, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(crate) async fn grant_grace(
        &self,
        grace_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<u32, StoreError> {
        let until = after_ms(now, grace_ms);
        let extended = sqlx::query(
            "UPDATE attempts SET lease_expires_at = $1 \
             WHERE state = 'running' AND lease_expires_at < $1",
        )
        .bind(until)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(extended as u32)
    }
}

/// An attempt's lease as stored.
struct AttemptView {
    token: LeaseToken,
    state: AttemptState,
    lease_expires_at: DateTime<Utc>,
}

impl AttemptView {
    /// Returns whether the attempt holds its lease at `now` (its token was checked apart).
    fn holds_lease(&self, now: DateTime<Utc>) -> bool {
        self.state == AttemptState::Running && now <= self.lease_expires_at
    }
}

/// Locks an attempt's trial row, then the attempt row (`OF t, a` locks in that order, the
/// order every writer uses), and returns both as they are once locked: a row that changed
/// while we waited is read again at its new version.
async fn lock_attempt(
    conn: &mut PgConnection,
    attempt: AttemptId,
) -> Result<(LockedTrial, AttemptView), StoreError> {
    let row = sqlx::query(
        "SELECT t.id, t.counted_failures, t.requeues, t.max_attempts, t.active_sweeps, \
             a.lease_token, \
             a.state AS attempt_state, a.lease_expires_at \
         FROM trials t JOIN attempts a ON a.trial_id = t.id \
         WHERE a.id = $1 \
         FOR UPDATE OF t, a",
    )
    .bind(attempt.0)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| attempt_not_found(attempt))?;
    let view = AttemptView {
        token: LeaseToken(row.try_get("lease_token")?),
        state: attempt_state(row.try_get("attempt_state")?)?,
        lease_expires_at: row.try_get("lease_expires_at")?,
    };
    Ok((locked_trial(&row)?, view))
}

fn attempt_not_found(attempt: AttemptId) -> StoreError {
    StoreError::NotFound {
        what: "attempt",
        id: attempt.to_string(),
    }
}

/// A token that is not the attempt's is a forged or buggy report, not a late one.
fn check_token(
    view: &AttemptView,
    attempt: AttemptId,
    token: LeaseToken,
) -> Result<(), StoreError> {
    if view.token == token {
        Ok(())
    } else {
        Err(StoreError::NotLeaseHolder { attempt })
    }
}

/// A trial row read under its lock.
struct LockedTrial {
    id: TrialId,
    counters: RetryCounters,
    /// How many active sweeps need the trial (0: its sweeps were all cancelled).
    active_sweeps: i32,
}

const TRIAL_COLUMNS: &str =
    "SELECT id, counted_failures, requeues, max_attempts, active_sweeps FROM trials";

fn locked_trial(row: &sqlx::postgres::PgRow) -> Result<LockedTrial, StoreError> {
    Ok(LockedTrial {
        id: TrialId(row.try_get("id")?),
        counters: RetryCounters {
            counted_failures: row.try_get("counted_failures")?,
            requeues: row.try_get("requeues")?,
            max_attempts: row.try_get("max_attempts")?,
        },
        active_sweeps: row.try_get("active_sweeps")?,
    })
}

/// Ends an attempt whose sweeps were all cancelled and queues its trial again at once (a
/// later sweep may still need it; a cancellation is nobody's failure).
async fn cancel_attempt(
    conn: &mut PgConnection,
    trial: TrialId,
    attempt: AttemptId,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE attempts SET state = 'cancelled', finished_at = $2 WHERE id = $1")
        .bind(attempt.0)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE trials SET state = 'queued', not_before = $2, updated_at = $2 WHERE id = $1",
    )
    .bind(trial.0)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn finish_attempt(
    conn: &mut PgConnection,
    attempt: AttemptId,
    state: AttemptState,
    report: &FailureReport<'_>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE attempts SET state = $2, failure_class = $3, failure_message = $4, \
             finished_at = $5 WHERE id = $1",
    )
    .bind(attempt.0)
    .bind(state.as_str())
    .bind(report.class.as_str())
    .bind(report.message)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes a failure's verdict on the trial: queued with backoff, or stopped.
async fn apply_verdict(
    conn: &mut PgConnection,
    trial: TrialId,
    counters: RetryCounters,
    verdict: Verdict,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (state, not_before) = match verdict {
        Verdict::Requeue { not_before } => (TrialState::Queued, not_before),
        Verdict::Stop(state) => (state, now),
    };
    sqlx::query(
        "UPDATE trials SET state = $2, not_before = $3, counted_failures = $4, requeues = $5, \
             updated_at = $6 WHERE id = $1",
    )
    .bind(trial.0)
    .bind(state.as_str())
    .bind(not_before)
    .bind(counters.counted_failures)
    .bind(counters.requeues)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Reads `deepmad_complete`'s outcome text.
fn outcome(outcome: Option<String>, attempt: AttemptId) -> Result<CompleteOutcome, StoreError> {
    match outcome.ok_or_else(|| attempt_not_found(attempt))?.as_str() {
        "recorded" => Ok(CompleteOutcome::Recorded),
        "duplicate" => Ok(CompleteOutcome::Duplicate),
        "late" => Ok(CompleteOutcome::Late),
        // A token that is not the attempt's is a forged or buggy report, not a late one.
        _ => Err(StoreError::NotLeaseHolder { attempt }),
    }
}
