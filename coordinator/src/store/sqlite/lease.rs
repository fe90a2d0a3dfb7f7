//! The work protocol on SQLite: register, claim, heartbeat, complete, fail, reap, grace.
//! Mirrors `pg/lease.rs`; every write transaction holds SQLite's write lock from its start,
//! which serialises them as PostgreSQL's row locks do.

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::{downstream, get_time, get_uuid, time_text, upsert_epochs, uuid_text, SqliteStore};
use crate::model::{
    AttemptId, AttemptState, DesignId, FailureClass, LeaseToken, TrialId, TrialState, WorkerId,
};
use crate::store::assemble::{attempt_state, trial_state};
use crate::store::rules::{after_failure, after_ms, RetryCounters, Verdict};
use crate::store::types::{
    CompleteOutcome, EpochMetrics, FailOutcome, FinalMetrics, HeartbeatOutcome, Lease, NewWorker,
    Progress, RetryPolicy,
};
use crate::store::{FailureReport, StoreError};

/// Most expired attempts one reaper pass handles; the next pass takes the rest.
const REAP_BATCH: i64 = 1_000;

impl SqliteStore {
    pub(crate) async fn register_worker(
        &self,
        worker: &NewWorker,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO workers (id, name, devices_json, protocol_version, registered_at, \
                 last_seen_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
                 devices_json = excluded.devices_json, \
                 protocol_version = excluded.protocol_version, last_seen_at = excluded.last_seen_at",
        )
        .bind(uuid_text(worker.id.0))
        .bind(&worker.name)
        .bind(&worker.devices_json)
        .bind(worker.protocol_version)
        .bind(time_text(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn claim(
        &self,
        worker: WorkerId,
        lease_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<Lease>, StoreError> {
        let mut tx = self.write().await?;
        let seen = sqlx::query("UPDATE workers SET last_seen_at = ?2 WHERE id = ?1")
            .bind(uuid_text(worker.0))
            .bind(time_text(now))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if seen == 0 {
            return Err(StoreError::NotFound {
                what: "worker",
                id: worker.to_string(),
            });
        }
        let candidate = sqlx::query(
            "SELECT t.id, t.design_id, d.architecture_json, t.recipe_json, t.dataset, t.seed, \
                 t.task, t.parent_trial_id, \
                 (t.task = 'train' AND EXISTS ( \
                     SELECT 1 FROM sweep_trials st \
                         JOIN sweep_tasks k ON k.sweep_id = st.sweep_id \
                     WHERE st.trial_id = t.id)) AS upload_weights \
             FROM trials t JOIN designs d ON d.id = t.design_id \
             WHERE t.state = 'queued' AND t.active_sweeps > 0 AND t.not_before <= ?1 \
             ORDER BY t.created_at, t.id LIMIT 1",
        )
        .bind(time_text(now))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(candidate) = candidate else {
            tx.commit().await?;
            return Ok(None);
        };
        let lease = new_lease(&candidate, after_ms(now, lease_ms))?;
        sqlx::query("UPDATE trials SET state = 'running', updated_at = ?2 WHERE id = ?1")
            .bind(uuid_text(lease.trial.0))
            .bind(time_text(now))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO attempts (id, trial_id, worker_id, lease_token, state, leased_at, \
                 heartbeat_at, lease_expires_at) \
             VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?5, ?6)",
        )
        .bind(uuid_text(lease.attempt.0))
        .bind(uuid_text(lease.trial.0))
        .bind(uuid_text(worker.0))
        .bind(uuid_text(lease.token.0))
        .bind(time_text(now))
        .bind(time_text(lease.expires_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(lease))
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
        let mut tx = self.write().await?;
        let view = read_attempt(&mut tx, attempt).await?;
        check_token(&view, attempt, token)?;
        if view.state == AttemptState::Cancelled {
            return Ok(HeartbeatOutcome::Cancelled);
        }
        if !view.holds_lease(now) {
            // An expired lease is lost now; the reaper requeues the trial under its policy.
            return Ok(HeartbeatOutcome::LeaseLost);
        }
        upsert_epochs(&mut tx, attempt, view.trial, epochs, now).await?;
        if view.active_sweeps == 0 {
            cancel_attempt(&mut tx, view.trial, attempt, now).await?;
            tx.commit().await?;
            return Ok(HeartbeatOutcome::Cancelled);
        }
        let expires_at = after_ms(now, lease_ms);
        sqlx::query(
            "UPDATE attempts SET heartbeat_at = ?2, lease_expires_at = ?3, progress_epoch = ?4, \
                 progress_step = ?5, progress_loss = ?6, progress_top1 = ?7, \
                 progress_images_per_second = ?8 \
             WHERE id = ?1",
        )
        .bind(uuid_text(attempt.0))
        .bind(time_text(now))
        .bind(time_text(expires_at))
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

    pub(crate) async fn complete(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        metrics: &FinalMetrics,
        now: DateTime<Utc>,
    ) -> Result<CompleteOutcome, StoreError> {
        let mut tx = self.write().await?;
        let view = read_attempt(&mut tx, attempt).await?;
        check_token(&view, attempt, token)?;
        if view.state == AttemptState::Succeeded {
            return Ok(CompleteOutcome::Duplicate);
        }
        let trial = read_trial(&mut tx, view.trial).await?;
        upsert_epochs(&mut tx, attempt, trial.id, &metrics.epochs_metrics, now).await?;
        let outcome = if view.holds_lease(now) && trial.state == TrialState::Running {
            record_result(&mut tx, &trial, attempt, metrics, now).await?;
            CompleteOutcome::Recorded
        } else {
            insert_late_result(&mut tx, trial.id, attempt, metrics, now).await?;
            CompleteOutcome::Late
        };
        tx.commit().await?;
        Ok(outcome)
    }

    pub(crate) async fn fail(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        report: &FailureReport<'_>,
        now: DateTime<Utc>,
    ) -> Result<FailOutcome, StoreError> {
        let mut tx = self.write().await?;
        let view = read_attempt(&mut tx, attempt).await?;
        check_token(&view, attempt, token)?;
        if !view.holds_lease(now) {
            return Ok(FailOutcome::NotLeaseHolder);
        }
        let trial = read_trial(&mut tx, view.trial).await?;
        sqlx::query(
            "UPDATE attempts SET state = 'failed', failure_class = ?2, failure_message = ?3, \
                 finished_at = ?4 WHERE id = ?1",
        )
        .bind(uuid_text(attempt.0))
        .bind(report.class.as_str())
        .bind(report.message)
        .bind(time_text(now))
        .execute(&mut *tx)
        .await?;
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
        let expired: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM attempts WHERE state = 'running' AND lease_expires_at < ?1 \
             ORDER BY lease_expires_at LIMIT ?2",
        )
        .bind(time_text(now))
        .bind(REAP_BATCH)
        .fetch_all(&self.reader)
        .await?;
        let mut reaped = 0;
        for attempt in expired {
            let attempt = uuid::Uuid::parse_str(&attempt)
                .map_err(|_| StoreError::corrupt("uuid", &attempt))?;
            if self.reap_one(AttemptId(attempt), policy, now).await? {
                reaped += 1;
            }
        }
        self.finish_sweeps(now).await?;
        Ok(reaped)
    }

    /// Expires one attempt and requeues its trial, unless a report moved it on meanwhile.
    async fn reap_one(
        &self,
        attempt: AttemptId,
        policy: &RetryPolicy,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let expired = sqlx::query(
            "UPDATE attempts SET state = 'expired', failure_class = 'lost', \
                 failure_message = 'lease expired', finished_at = ?2 \
             WHERE id = ?1 AND state = 'running' AND lease_expires_at < ?2 \
             RETURNING trial_id",
        )
        .bind(uuid_text(attempt.0))
        .bind(time_text(now))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(expired) = expired else {
            return Ok(false);
        };
        let trial = read_trial(&mut tx, TrialId(get_uuid(&expired, "trial_id")?)).await?;
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
        let until = time_text(after_ms(now, grace_ms));
        let mut tx = self.write().await?;
        let extended = sqlx::query(
            "UPDATE attempts SET lease_expires_at = ?1 \
             WHERE state = 'running' AND lease_expires_at < ?1",
        )
        .bind(until)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(extended as u32)
    }
}

fn new_lease(candidate: &SqliteRow, expires_at: DateTime<Utc>) -> Result<Lease, StoreError> {
    Ok(Lease {
        attempt: AttemptId::new(),
        token: LeaseToken::new(),
        trial: TrialId(get_uuid(candidate, "id")?),
        design_id: DesignId(candidate.try_get("design_id")?),
        architecture_json: candidate.try_get("architecture_json")?,
        recipe_json: candidate.try_get("recipe_json")?,
        dataset: candidate.try_get("dataset")?,
        seed: candidate.try_get("seed")?,
        expires_at,
        task: candidate.try_get("task")?,
        parent: match candidate.try_get::<Option<&str>, _>("parent_trial_id")? {
            Some(_) => Some(TrialId(get_uuid(candidate, "parent_trial_id")?)),
            None => None,
        },
        upload_weights: candidate.try_get("upload_weights")?,
    })
}

/// An attempt's lease as stored, with its trial's count of active sweeps.
struct AttemptView {
    trial: TrialId,
    token: LeaseToken,
    state: AttemptState,
    lease_expires_at: DateTime<Utc>,
    active_sweeps: i32,
}

impl AttemptView {
    /// Returns whether the attempt holds its lease at `now` (its token was checked apart).
    fn holds_lease(&self, now: DateTime<Utc>) -> bool {
        self.state == AttemptState::Running && now <= self.lease_expires_at
    }
}

async fn read_attempt(
    conn: &mut SqliteConnection,
    attempt: AttemptId,
) -> Result<AttemptView, StoreError> {
    let row = sqlx::query(
        "SELECT a.trial_id, a.lease_token, a.state, a.lease_expires_at, t.active_sweeps \
         FROM attempts a JOIN trials t ON t.id = a.trial_id WHERE a.id = ?1",
    )
    .bind(uuid_text(attempt.0))
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        what: "attempt",
        id: attempt.to_string(),
    })?;
    Ok(AttemptView {
        trial: TrialId(get_uuid(&row, "trial_id")?),
        token: LeaseToken(get_uuid(&row, "lease_token")?),
        state: attempt_state(row.try_get("state")?)?,
        lease_expires_at: get_time(&row, "lease_expires_at")?,
        active_sweeps: row.try_get("active_sweeps")?,
    })
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

/// A trial row read inside a write transaction.
struct TrialRow {
    id: TrialId,
    state: TrialState,
    design_id: String,
    dataset: String,
    recipe_hash: String,
    /// `train` or a downstream task.
    task: String,
    counters: RetryCounters,
}

async fn read_trial(conn: &mut SqliteConnection, trial: TrialId) -> Result<TrialRow, StoreError> {
    let row = sqlx::query(
        "SELECT state, design_id, dataset, recipe_hash, task, counted_failures, requeues, \
             max_attempts FROM trials WHERE id = ?1",
    )
    .bind(uuid_text(trial.0))
    .fetch_one(conn)
    .await?;
    Ok(TrialRow {
        id: trial,
        state: trial_state(row.try_get("state")?)?,
        design_id: row.try_get("design_id")?,
        dataset: row.try_get("dataset")?,
        recipe_hash: row.try_get("recipe_hash")?,
        task: row.try_get("task")?,
        counters: RetryCounters {
            counted_failures: row.try_get("counted_failures")?,
            requeues: row.try_get("requeues")?,
            max_attempts: row.try_get("max_attempts")?,
        },
    })
}

/// Ends an attempt whose sweeps were all cancelled and queues its trial again at once.
async fn cancel_attempt(
    conn: &mut SqliteConnection,
    trial: TrialId,
    attempt: AttemptId,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE attempts SET state = 'cancelled', finished_at = ?2 WHERE id = ?1")
        .bind(uuid_text(attempt.0))
        .bind(time_text(now))
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE trials SET state = 'queued', not_before = ?2, updated_at = ?2 WHERE id = ?1",
    )
    .bind(uuid_text(trial.0))
    .bind(time_text(now))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn record_result(
    conn: &mut SqliteConnection,
    trial: &TrialRow,
    attempt: AttemptId,
    metrics: &FinalMetrics,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    insert_metrics(conn, INSERT_RESULT, trial.id, attempt, metrics, now).await?;
    sqlx::query("UPDATE trials SET state = 'succeeded', updated_at = ?2 WHERE id = ?1")
        .bind(uuid_text(trial.id.0))
        .bind(time_text(now))
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE attempts SET state = 'succeeded', finished_at = ?2 WHERE id = ?1")
        .bind(uuid_text(attempt.0))
        .bind(time_text(now))
        .execute(&mut *conn)
        .await?;
    if trial.task != "train" {
        // A downstream result is read per (trial, task); it feeds no design aggregate.
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO design_scores (design_id, dataset, recipe_hash, seeds, top1_mean, \
             top1_m2, top5_mean, updated_at, family) \
         VALUES (?1, ?2, ?3, 1, ?4, 0, ?5, ?6, \
             (SELECT d.family FROM designs d WHERE d.id = ?1)) \
         ON CONFLICT (design_id, dataset, recipe_hash) DO UPDATE SET \
             seeds = seeds + 1, \
             top1_mean = top1_mean + (?4 - top1_mean) / (seeds + 1), \
             top1_m2 = top1_m2 + (?4 - top1_mean) \
                 * (?4 - (top1_mean + (?4 - top1_mean) / (seeds + 1))), \
             top5_mean = top5_mean + (?5 - top5_mean) / (seeds + 1), \
             updated_at = ?6",
    )
    .bind(&trial.design_id)
    .bind(&trial.dataset)
    .bind(&trial.recipe_hash)
    .bind(metrics.top1)
    .bind(metrics.top5)
    .bind(time_text(now))
    .execute(&mut *conn)
    .await?;
    // The aggregates of every sweep that holds the trial (Welford's update, as above).
    sqlx::query(
        "INSERT INTO sweep_scores (sweep_id, design_id, dataset, recipe_hash, family, seeds, \
             top1_mean, top1_m2, top5_mean, updated_at) \
         SELECT st.sweep_id, ?2, ?3, ?4, d.family, 1, ?5, 0, ?6, ?7 \
         FROM sweep_trials st JOIN designs d ON d.id = ?2 \
         WHERE st.trial_id = ?1 \
         ON CONFLICT (sweep_id, design_id, dataset, recipe_hash) DO UPDATE SET \
             seeds = seeds + 1, \
             top1_mean = top1_mean + (?5 - top1_mean) / (seeds + 1), \
             top1_m2 = top1_m2 + (?5 - top1_mean) \
                 * (?5 - (top1_mean + (?5 - top1_mean) / (seeds + 1))), \
             top5_mean = top5_mean + (?6 - top5_mean) / (seeds + 1), \
             updated_at = ?7",
    )
    .bind(uuid_text(trial.id.0))
    .bind(&trial.design_id)
    .bind(&trial.dataset)
    .bind(&trial.recipe_hash)
    .bind(metrics.top1)
    .bind(metrics.top5)
    .bind(time_text(now))
    .execute(&mut *conn)
    .await?;
    downstream::queue(conn, trial.id, None, now).await?;
    Ok(())
}

/// Keeps a fenced-out attempt's report; a second report of the same attempt changes nothing.
async fn insert_late_result(
    conn: &mut SqliteConnection,
    trial: TrialId,
    attempt: AttemptId,
    metrics: &FinalMetrics,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    insert_metrics(conn, INSERT_LATE_RESULT, trial, attempt, metrics, now).await
}

const INSERT_RESULT: &str = "INSERT INTO results (trial_id, attempt_id, top1, top5, test_loss, \
    train_seconds, epochs, dataset_hash, checkpoint, finished_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

const INSERT_LATE_RESULT: &str = "INSERT INTO late_results (trial_id, attempt_id, top1, top5, \
    test_loss, train_seconds, epochs, dataset_hash, checkpoint, received_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (attempt_id) DO NOTHING";

/// Runs `insert` (one of the two above) with an attempt's final metrics.
async fn insert_metrics(
    conn: &mut SqliteConnection,
    insert: &str,
    trial: TrialId,
    attempt: AttemptId,
    metrics: &FinalMetrics,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(insert)
        .bind(uuid_text(trial.0))
        .bind(uuid_text(attempt.0))
        .bind(metrics.top1)
        .bind(metrics.top5)
        .bind(metrics.test_loss)
        .bind(metrics.train_seconds)
        .bind(metrics.epochs)
        .bind(&metrics.dataset_hash)
        .bind(&metrics.checkpoint)
        .bind(time_text(now))
        .execute(conn)
        .await?;
    Ok(())
}

/// Writes a failure's verdict on the trial: queued with backoff, or stopped.
async fn apply_verdict(
    conn: &mut SqliteConnection,
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
        "UPDATE trials SET state = ?2, not_before = ?3, counted_failures = ?4, requeues = ?5, \
             updated_at = ?6 WHERE id = ?1",
    )
    .bind(uuid_text(trial.0))
    .bind(state.as_str())
    .bind(time_text(not_before))
    .bind(counters.counted_failures)
    .bind(counters.requeues)
    .bind(time_text(now))
    .execute(conn)
    .await?;
    Ok(())
}
