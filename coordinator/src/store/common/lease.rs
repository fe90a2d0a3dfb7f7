//! The work protocol on both backends: register, heartbeat, fail, reap, grace, and the
//! pieces of claim and complete that both backends share. Claims and completions themselves
//! are dialect code: batched statements on PostgreSQL (`pg/claims.rs`,
//! `pg/completions.rs`), plain transactions on SQLite (`sqlite/lease.rs`).
//!
//! An attempt holds its trial's lease while it is `running`, its token matches and `now` is
//! not past `lease_expires_at`. Transactions that change an attempt read it with
//! [`lock_attempt`]: on PostgreSQL that locks its trial row, then the attempt row, so two
//! reports of one trial are serialised and each sees the other's outcome; on SQLite the
//! transaction holds the write lock from its start, which serialises them the same way.

use chrono::{DateTime, Utc};

use crate::model::{AttemptId, AttemptState, FailureClass, LeaseToken, TrialId, TrialState};
use crate::store::assemble::attempt_state;
use crate::store::rules::{after_failure, after_hand_back, after_ms, RetryCounters, Verdict};
use crate::store::sql::{Arg, Db, Dialect, Id, Time, Tx};
use crate::store::types::{
    EpochMetrics, FailOutcome, HeartbeatOutcome, NewWorker, Progress, RetryPolicy,
};
use crate::store::{pg, sqlite, FailureReport, Store, StoreError};

/// Most expired attempts one reaper pass handles; the next pass takes the rest.
const REAP_BATCH: i64 = 1_000;

pub(crate) async fn register_worker(
    store: &Store,
    worker: &NewWorker,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    // PostgreSQL keeps the devices as `jsonb`, SQLite as TEXT.
    let sql = store.dialect().pick(
        "INSERT INTO workers (id, name, devices_json, protocol_version, registered_at, \
             last_seen_at) \
         VALUES ($1, $2, $3::jsonb, $4, $5, $5) \
         ON CONFLICT ON CONSTRAINT workers_pkey DO UPDATE SET name = EXCLUDED.name, \
             devices_json = EXCLUDED.devices_json, \
             protocol_version = EXCLUDED.protocol_version, last_seen_at = EXCLUDED.last_seen_at",
        "INSERT INTO workers (id, name, devices_json, protocol_version, registered_at, \
             last_seen_at) \
         VALUES ($1, $2, $3, $4, $5, $5) \
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
             devices_json = excluded.devices_json, \
             protocol_version = excluded.protocol_version, last_seen_at = excluded.last_seen_at",
    );
    let args = [
        Arg::Id(worker.id.0),
        Arg::Text(&worker.name),
        Arg::Text(&worker.devices_json),
        Arg::Int(worker.protocol_version),
        Arg::Time(now),
    ];
    store.write_one(sql, &args).await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)] // One argument per field of the heartbeat message.
pub(crate) async fn heartbeat(
    store: &Store,
    attempt: AttemptId,
    token: LeaseToken,
    progress: &Progress,
    epochs: &[EpochMetrics],
    lease_ms: i64,
    now: DateTime<Utc>,
) -> Result<HeartbeatOutcome, StoreError> {
    let mut tx = store.begin().await?;
    let (trial, view) = lock_attempt(&mut tx.db(), attempt).await?;
    check_token(&view, attempt, token)?;
    if view.state == AttemptState::Cancelled {
        tx.rollback().await?;
        return Ok(HeartbeatOutcome::Cancelled);
    }
    if !view.holds_lease(now) {
        // An expired lease is lost now; the reaper requeues the trial under its policy.
        tx.rollback().await?;
        return Ok(HeartbeatOutcome::LeaseLost);
    }
    upsert_epochs(&mut tx, attempt, trial.id, epochs, now).await?;
    let mut db = tx.db();
    if trial.active_sweeps == 0 {
        cancel_attempt(&mut db, trial.id, attempt, now).await?;
        tx.commit().await?;
        return Ok(HeartbeatOutcome::Cancelled);
    }
    let expires_at = after_ms(now, lease_ms);
    let args = [
        Arg::Id(attempt.0),
        Arg::Time(now),
        Arg::Time(expires_at),
        Arg::Int(progress.epoch),
        Arg::BigInt(progress.step),
        Arg::OptFloat(progress.loss),
        Arg::OptFloat(progress.top1),
        Arg::OptFloat(progress.images_per_second),
    ];
    db.execute(
        "UPDATE attempts SET heartbeat_at = $2, lease_expires_at = $3, progress_epoch = $4, \
             progress_step = $5, progress_loss = $6, progress_top1 = $7, \
             progress_images_per_second = $8 \
         WHERE id = $1",
        &args,
    )
    .await?;
    tx.commit().await?;
    Ok(HeartbeatOutcome::Continue { expires_at })
}

/// Inserts or replaces an attempt's epoch metrics, keyed by (attempt, epoch): in one
/// statement on PostgreSQL, a row at a time on SQLite.
pub(crate) async fn upsert_epochs(
    tx: &mut Tx,
    attempt: AttemptId,
    trial: TrialId,
    epochs: &[EpochMetrics],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    match tx {
        Tx::Postgres(tx) => pg::upsert_epochs(tx, attempt, trial, epochs, now).await,
        Tx::Sqlite(tx) => {
            sqlite::upsert_epochs(&mut Db::SqliteConn(tx), attempt, trial, epochs, now).await
        }
    }
}

pub(crate) async fn fail(
    store: &Store,
    attempt: AttemptId,
    token: LeaseToken,
    report: &FailureReport<'_>,
    now: DateTime<Utc>,
) -> Result<FailOutcome, StoreError> {
    let decide = |counters| {
        let policy = report.policy;
        after_failure(
            report.class,
            counters,
            report.max_attempts_override,
            policy,
            now,
        )
    };
    end_attempt(
        store,
        attempt,
        token,
        (report.class, report.message),
        decide,
        now,
    )
    .await
}

/// A graceful hand-back: the attempt ends as a retryable failure with `message`, and the
/// trial is queued again at once without counting ([`after_hand_back`]).
pub(crate) async fn hand_back(
    store: &Store,
    attempt: AttemptId,
    token: LeaseToken,
    message: &str,
    now: DateTime<Utc>,
) -> Result<FailOutcome, StoreError> {
    let decide = |counters| after_hand_back(counters, now);
    end_attempt(
        store,
        attempt,
        token,
        (FailureClass::Retryable, message),
        decide,
        now,
    )
    .await
}

/// Ends a leased attempt as failed with `(class, message)` and applies what `decide` makes
/// of the trial's counters, in one transaction; an attempt that no longer holds its lease
/// changes nothing.
async fn end_attempt(
    store: &Store,
    attempt: AttemptId,
    token: LeaseToken,
    (class, message): (FailureClass, &str),
    decide: impl FnOnce(RetryCounters) -> (RetryCounters, Verdict),
    now: DateTime<Utc>,
) -> Result<FailOutcome, StoreError> {
    let mut tx = store.begin().await?;
    let mut db = tx.db();
    let (trial, view) = lock_attempt(&mut db, attempt).await?;
    check_token(&view, attempt, token)?;
    if !view.holds_lease(now) {
        tx.rollback().await?;
        return Ok(FailOutcome::NotLeaseHolder);
    }
    db.execute(
        "UPDATE attempts SET state = $2, failure_class = $3, failure_message = $4, \
             finished_at = $5 WHERE id = $1",
        &[
            Arg::Id(attempt.0),
            Arg::Text(AttemptState::Failed.as_str()),
            Arg::Text(class.as_str()),
            Arg::Text(message),
            Arg::Time(now),
        ],
    )
    .await?;
    let (counters, verdict) = decide(trial.counters);
    apply_verdict(&mut db, trial.id, counters, verdict, now).await?;
    tx.commit().await?;
    Ok(match verdict {
        Verdict::Requeue { not_before } => FailOutcome::Requeued { not_before },
        Verdict::Stop(state) => FailOutcome::Stopped { state },
    })
}

pub(crate) async fn reap_expired(
    store: &Store,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> Result<u32, StoreError> {
    let expired: Vec<(Id,)> = store
        .reader()
        .fetch_all(
            "SELECT id FROM attempts WHERE state = 'running' AND lease_expires_at < $1 \
             ORDER BY lease_expires_at LIMIT $2",
            &[Arg::Time(now), Arg::BigInt(REAP_BATCH)],
        )
        .await?;
    let mut reaped = 0;
    for (attempt,) in expired {
        if reap_one(store, AttemptId(attempt.0), policy, now).await? {
            reaped += 1;
        }
    }
    super::sweeps::finish_sweeps(store, now).await?;
    Ok(reaped)
}

#[derive(sqlx::FromRow)]
struct CountersRow {
    id: Id,
    counted_failures: i32,
    requeues: i32,
    max_attempts: i32,
}

/// Expires one attempt and requeues its trial, unless another transaction (another
/// reaper, a report) holds the trial or already moved the attempt on. On PostgreSQL a
/// trial that another transaction holds is skipped, not waited for; SQLite's single writer
/// leaves none to skip.
async fn reap_one(
    store: &Store,
    attempt: AttemptId,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let mut tx = store.begin().await?;
    let mut db = tx.db();
    let skip_locked = match db.dialect() {
        Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        Dialect::Sqlite => "",
    };
    let sql = format!(
        "SELECT id, counted_failures, requeues, max_attempts FROM trials \
         WHERE id = (SELECT trial_id FROM attempts WHERE id = $1){skip_locked}"
    );
    let trial: Option<CountersRow> = db.fetch_optional(&sql, &[Arg::Id(attempt.0)]).await?;
    let Some(trial) = trial else { return Ok(false) };
    let expired = db
        .execute(
            "UPDATE attempts SET state = 'expired', failure_class = 'lost', \
                 failure_message = 'lease expired', finished_at = $2 \
             WHERE id = $1 AND state = 'running' AND lease_expires_at < $2",
            &[Arg::Id(attempt.0), Arg::Time(now)],
        )
        .await?;
    if expired == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    let counters = RetryCounters {
        counted_failures: trial.counted_failures,
        requeues: trial.requeues,
        max_attempts: trial.max_attempts,
    };
    let (counters, verdict) = after_failure(FailureClass::Lost, counters, None, policy, now);
    apply_verdict(&mut db, TrialId(trial.id.0), counters, verdict, now).await?;
    tx.commit().await?;
    Ok(true)
}

pub(crate) async fn grant_grace(
    store: &Store,
    grace_ms: i64,
    now: DateTime<Utc>,
) -> Result<u32, StoreError> {
    let until = after_ms(now, grace_ms);
    let extended = store
        .write_one(
            "UPDATE attempts SET lease_expires_at = $1 \
             WHERE state = 'running' AND lease_expires_at < $1",
            &[Arg::Time(until)],
        )
        .await?;
    Ok(extended as u32)
}

/// An attempt's lease as stored.
pub(crate) struct AttemptView {
    token: LeaseToken,
    pub state: AttemptState,
    lease_expires_at: DateTime<Utc>,
}

impl AttemptView {
    /// Returns whether the attempt holds its lease at `now` (its token was checked apart).
    pub(crate) fn holds_lease(&self, now: DateTime<Utc>) -> bool {
        self.state == AttemptState::Running && now <= self.lease_expires_at
    }
}

/// A trial row read under its lock.
pub(crate) struct LockedTrial {
    pub id: TrialId,
    pub counters: RetryCounters,
    /// How many active sweeps need the trial (0: its sweeps were all cancelled).
    pub active_sweeps: i32,
}

#[derive(sqlx::FromRow)]
struct LockedRow {
    id: Id,
    counted_failures: i32,
    requeues: i32,
    max_attempts: i32,
    active_sweeps: i32,
    lease_token: Id,
    attempt_state: String,
    lease_expires_at: Time,
}

/// Reads an attempt and its trial in a write transaction, as they are once locked. On
/// PostgreSQL this locks the trial row, then the attempt row (`OF t, a` locks in that
/// order, the order every writer uses): a row that changed while we waited is read again at
/// its new version.
pub(crate) async fn lock_attempt(
    db: &mut Db<'_>,
    attempt: AttemptId,
) -> Result<(LockedTrial, AttemptView), StoreError> {
    let lock = match db.dialect() {
        Dialect::Postgres => " FOR UPDATE OF t, a",
        Dialect::Sqlite => "",
    };
    let sql = format!(
        "SELECT t.id, t.counted_failures, t.requeues, t.max_attempts, t.active_sweeps, \
             a.lease_token, a.state AS attempt_state, a.lease_expires_at \
         FROM trials t JOIN attempts a ON a.trial_id = t.id \
         WHERE a.id = $1{lock}"
    );
    let row: LockedRow = db
        .fetch_optional(&sql, &[Arg::Id(attempt.0)])
        .await?
        .ok_or_else(|| attempt_not_found(attempt))?;
    let view = AttemptView {
        token: LeaseToken(row.lease_token.0),
        state: attempt_state(&row.attempt_state)?,
        lease_expires_at: row.lease_expires_at.0,
    };
    let trial = LockedTrial {
        id: TrialId(row.id.0),
        counters: RetryCounters {
            counted_failures: row.counted_failures,
            requeues: row.requeues,
            max_attempts: row.max_attempts,
        },
        active_sweeps: row.active_sweeps,
    };
    Ok((trial, view))
}

pub(crate) fn attempt_not_found(attempt: AttemptId) -> StoreError {
    StoreError::NotFound {
        what: "attempt",
        id: attempt.to_string(),
    }
}

/// A token that is not the attempt's is a forged or buggy report, not a late one.
pub(crate) fn check_token(
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

/// Ends an attempt whose sweeps were all cancelled and queues its trial again at once (a
/// later sweep may still need it; a cancellation is nobody's failure).
async fn cancel_attempt(
    db: &mut Db<'_>,
    trial: TrialId,
    attempt: AttemptId,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    db.execute(
        "UPDATE attempts SET state = 'cancelled', finished_at = $2 WHERE id = $1",
        &[Arg::Id(attempt.0), Arg::Time(now)],
    )
    .await?;
    db.execute(
        "UPDATE trials SET state = 'queued', not_before = $2, updated_at = $2 WHERE id = $1",
        &[Arg::Id(trial.0), Arg::Time(now)],
    )
    .await?;
    Ok(())
}

/// Writes a failure's verdict on the trial: queued with backoff, or stopped.
pub(crate) async fn apply_verdict(
    db: &mut Db<'_>,
    trial: TrialId,
    counters: RetryCounters,
    verdict: Verdict,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (state, not_before) = match verdict {
        Verdict::Requeue { not_before } => (TrialState::Queued, not_before),
        Verdict::Stop(state) => (state, now),
    };
    let args = [
        Arg::Id(trial.0),
        Arg::Text(state.as_str()),
        Arg::Time(not_before),
        Arg::Int(counters.counted_failures),
        Arg::Int(counters.requeues),
        Arg::Time(now),
    ];
    db.execute(
        "UPDATE trials SET state = $2, not_before = $3, counted_failures = $4, requeues = $5, \
             updated_at = $6 WHERE id = $1",
        &args,
    )
    .await?;
    Ok(())
}
