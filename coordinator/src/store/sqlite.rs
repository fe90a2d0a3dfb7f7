//! The SQLite backend: the embedded store of a one-machine run.
//!
//! SQLite has one writer at a time, so the store keeps one writer connection (every write
//! transaction is `BEGIN IMMEDIATE`: it takes the write lock up front, so a transaction that
//! reads then writes never fails half-way for another process) and a pool of readers, which
//! WAL mode lets read while the writer writes.
//!
//! Encodings (see `migrations/sqlite/0001_initial.sql`): uuids are lowercase hyphenated
//! TEXT; times are TEXT in RFC 3339 UTC with exactly six fractional digits, so comparing
//! the text compares the times; JSON is TEXT.
//!
//! The methods live in `sqlite/sweeps.rs`, `sqlite/lease.rs` and `sqlite/reads.rs`, which
//! mirror the PostgreSQL files one for one.

mod designs;
mod downstream;
mod lease;
mod reads;
mod sweeps;

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqliteConnection, Transaction};
use uuid::Uuid;

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

    /// Begins a write transaction holding SQLite's write lock.
    async fn write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Returns the stored text of a time: RFC 3339 UTC, six fractional digits.
fn time_text(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Returns the stored text of a uuid.
fn uuid_text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|_| StoreError::corrupt("time", text))
}

/// Reads a time column.
fn get_time(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, StoreError> {
    parse_time(row.try_get(column)?)
}

/// Reads a nullable time column.
fn get_optional_time(row: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    row.try_get::<Option<&str>, _>(column)?
        .map(parse_time)
        .transpose()
}

/// Reads a uuid column.
fn get_uuid(row: &SqliteRow, column: &str) -> Result<Uuid, StoreError> {
    let text: &str = row.try_get(column)?;
    Uuid::parse_str(text).map_err(|_| StoreError::corrupt("uuid", text))
}

/// Inserts or replaces an attempt's epoch metrics, keyed by (attempt, epoch).
async fn upsert_epochs(
    conn: &mut SqliteConnection,
    attempt: AttemptId,
    trial: TrialId,
    epochs: &[EpochMetrics],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    for epoch in epochs {
        sqlx::query(
            "INSERT INTO epoch_metrics (attempt_id, epoch, trial_id, train_loss, test_loss, top1, \
                 top5, images_per_second, learning_rate, recorded_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
             ON CONFLICT (attempt_id, epoch) DO UPDATE SET \
                 train_loss = excluded.train_loss, test_loss = excluded.test_loss, \
                 top1 = excluded.top1, top5 = excluded.top5, \
                 images_per_second = excluded.images_per_second, \
                 learning_rate = excluded.learning_rate, recorded_at = excluded.recorded_at",
        )
        .bind(uuid_text(attempt.0))
        .bind(epoch.epoch)
        .bind(uuid_text(trial.0))
        .bind(epoch.train_loss)
        .bind(epoch.test_loss)
        .bind(epoch.top1)
        .bind(epoch.top5)
        .bind(epoch.images_per_second)
        .bind(epoch.learning_rate)
        .bind(time_text(now))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration as ChronoDuration, TimeZone};

    #[test]
    fn time_text_has_fixed_width_and_round_trips() {
        let whole = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap();
        let later = whole + ChronoDuration::microseconds(1);
        assert_eq!(time_text(whole), "2024-05-01T12:00:00.000000Z");
        assert_eq!(time_text(later), "2024-05-01T12:00:00.000001Z");
        assert!(time_text(whole) < time_text(later));
        assert_eq!(parse_time(&time_text(later)).unwrap(), later);
    }
}
