//! The SQLite backend: the embedded store of a one-machine run.
//!
//! SQLite has one writer at a time, so the store keeps one writer connection (every write
//! transaction is `BEGIN IMMEDIATE`: it takes the write lock up front, so a transaction that
//! reads then writes never fails half-way for another process) and a pool of readers, which
//! WAL mode lets read while the writer writes.
//!
//! Encodings (see `migrations/sqlite/0001_initial.sql` and `store/sql.rs`): uuids are
//! lowercase hyphenated TEXT; times are TEXT in RFC 3339 UTC with exactly six fractional
//! digits, so comparing the text compares the times; JSON is TEXT.
//!
//! Most statements are shared with PostgreSQL (`store/common/`). What is SQLite's own lives
//! here: creating a sweep a row at a time (`sqlite/sweeps.rs`), claiming and completing in
//! one write transaction (`sqlite/lease.rs`) and queueing downstream trials, which
//! PostgreSQL does in a SQL function (`sqlite/downstream.rs`).

mod downstream;
mod lease;
mod sweeps;

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use super::sql::{Arg, Db, Tx};
use super::types::{EpochMetrics, PoolSettings};
use super::StoreError;
use crate::model::{AttemptId, TrialId};

/// How long a write waits for another process's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The store on an SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the file of `url` and applies the SQLite migrations.
    pub(crate) async fn connect(
        url: &str,
        settings: &PoolSettings,
    ) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("../migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(options)
            .await?;
        Ok(SqliteStore { writer, reader })
    }

    /// Closes both pools.
    pub(crate) async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    /// Statements that only read run on the reader pool.
    pub(super) fn reader(&self) -> Db<'_> {
        Db::SqlitePool(&self.reader)
    }

    /// Begins a write transaction holding SQLite's write lock.
    async fn write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// [`SqliteStore::write`] for the statements shared with PostgreSQL.
    pub(super) async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(Tx::Sqlite(self.write().await?))
    }

    /// Runs one write statement in its own write transaction; returns how many rows it
    /// changed.
    pub(super) async fn write_one(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let changed = tx.db().execute(sql, args).await?;
        tx.commit().await?;
        Ok(changed)
    }
}

/// Inserts or replaces an attempt's epoch metrics, keyed by (attempt, epoch).
pub(super) async fn upsert_epochs(
    db: &mut Db<'_>,
    attempt: AttemptId,
    trial: TrialId,
    epochs: &[EpochMetrics],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    for epoch in epochs {
        let args = [
            Arg::Id(attempt.0),
            Arg::Int(epoch.epoch),
            Arg::Id(trial.0),
            Arg::Float(epoch.train_loss),
            Arg::Float(epoch.test_loss),
            Arg::Float(epoch.top1),
            Arg::Float(epoch.top5),
            Arg::Float(epoch.images_per_second),
            Arg::Float(epoch.learning_rate),
            Arg::Time(now),
        ];
        db.execute(
            "INSERT INTO epoch_metrics (attempt_id, epoch, trial_id, train_loss, test_loss, top1, \
                 top5, images_per_second, learning_rate, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (attempt_id, epoch) DO UPDATE SET \
                 train_loss = excluded.train_loss, test_loss = excluded.test_loss, \
                 top1 = excluded.top1, top5 = excluded.top5, \
                 images_per_second = excluded.images_per_second, \
                 learning_rate = excluded.learning_rate, recorded_at = excluded.recorded_at",
            &args,
        )
        .await?;
    }
    Ok(())
}
