//! The PostgreSQL backend: the cluster's store.
//!
//! Claims are one statement (`FOR UPDATE SKIP LOCKED`), so many coordinators' workers lease
//! from one queue without blocking each other. Every transaction that changes a trial and its
//! attempts locks the trial row first; sweep-level changes take a transaction-scoped advisory
//! lock ([`SWEEPS_LOCK`]) so they never interleave. Leaderboard reads take no locks.
//!
//! Most statements are shared with SQLite (`store/common/`). What is PostgreSQL's own lives
//! here: the sweep lock, bulk inserts (`pg/sweeps.rs`, [`upsert_epochs`]), and the batched
//! calls of concurrent claims and completions of one coordinator (group commit):
//! `pg/batch.rs` is the queue, `pg/claims.rs` and `pg/completions.rs` the two batched calls,
//! `pg/lease.rs` their entry points.

mod batch;
mod claims;
mod completions;
mod downstream;
mod lease;
mod sweeps;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres, Transaction};

use super::sql::{Arg, Db, Tx};
use super::types::{EpochMetrics, PoolSettings};
use super::StoreError;
use crate::model::{AttemptId, TrialId};

/// The advisory lock key that serialises sweep-level changes (create, cancel, retry,
/// finish): the bytes of "deepmad" as a number.
const SWEEPS_LOCK: i64 = 0x0064_6565_706d_6164;

/// The store on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The batched claim queue (`pg/claims.rs`).
    claims: claims::Claims,
    /// The batched completion queue (`pg/completions.rs`).
    completions: completions::Completions,
}

impl PgStore {
    /// Connects to `url` and applies the embedded PostgreSQL migrations.
    pub(crate) async fn connect(url: &str, settings: &PoolSettings) -> Result<PgStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect(url)
            .await?;
        sqlx::migrate!("../migrations/postgres").run(&pool).await?;
        let claims = claims::start(pool.clone());
        let completions = completions::start(pool.clone());
        Ok(PgStore {
            pool,
            claims,
            completions,
        })
    }

    /// Closes the pool.
    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }

    /// Statements that only read run on the pool.
    pub(super) fn reader(&self) -> Db<'_> {
        Db::PgPool(&self.pool)
    }

    /// Begins a transaction.
    pub(super) async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(Tx::Postgres(self.pool.begin().await?))
    }

    /// Begins a transaction holding the sweep-level advisory lock.
    async fn begin_locked(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SWEEPS_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// [`PgStore::begin_locked`] for the statements shared with SQLite.
    pub(super) async fn begin_sweeps(&self) -> Result<Tx, StoreError> {
        Ok(Tx::Postgres(self.begin_locked().await?))
    }

    /// Runs one write statement on its own (autocommit); returns how many rows it changed.
    pub(super) async fn write_one(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        self.reader().execute(sql, args).await
    }
}

/// Inserts or replaces an attempt's epoch metrics, keyed by (attempt, epoch).
pub(super) async fn upsert_epochs(
    conn: &mut PgConnection,
    attempt: AttemptId,
    trial: TrialId,
    epochs: &[EpochMetrics],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), StoreError> {
    if epochs.is_empty() {
        return Ok(());
    }
    let query = sqlx::query(
        "INSERT INTO epoch_metrics (attempt_id, epoch, trial_id, train_loss, test_loss, top1, \
             top5, images_per_second, learning_rate, recorded_at) \
         SELECT $1, e.epoch, $2, e.train_loss, e.test_loss, e.top1, e.top5, \
             e.images_per_second, e.learning_rate, $3 \
         FROM UNNEST($4::integer[], $5::float8[], $6::float8[], $7::float8[], $8::float8[], \
             $9::float8[], $10::float8[]) \
             AS e(epoch, train_loss, test_loss, top1, top5, images_per_second, learning_rate) \
         ON CONFLICT ON CONSTRAINT epoch_metrics_pkey DO UPDATE SET \
             train_loss = EXCLUDED.train_loss, test_loss = EXCLUDED.test_loss, \
             top1 = EXCLUDED.top1, top5 = EXCLUDED.top5, \
             images_per_second = EXCLUDED.images_per_second, \
             learning_rate = EXCLUDED.learning_rate, recorded_at = EXCLUDED.recorded_at",
    )
    .bind(attempt.0)
    .bind(trial.0)
    .bind(now);
    let epochs: Vec<&EpochMetrics> = epochs.iter().collect();
    bind_epochs(query, &epochs).execute(conn).await?;
    Ok(())
}

/// Binds epoch metrics as seven arrays in `epoch_metrics`' column order: epoch, train_loss,
/// test_loss, top1, top5, images_per_second, learning_rate.
fn bind_epochs<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    epochs: &[&EpochMetrics],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let column =
        |pick: fn(&EpochMetrics) -> f64| epochs.iter().map(|e| pick(e)).collect::<Vec<f64>>();
    query
        .bind(epochs.iter().map(|e| e.epoch).collect::<Vec<i32>>())
        .bind(column(|e| e.train_loss))
        .bind(column(|e| e.test_loss))
        .bind(column(|e| e.top1))
        .bind(column(|e| e.top5))
        .bind(column(|e| e.images_per_second))
        .bind(column(|e| e.learning_rate))
}
