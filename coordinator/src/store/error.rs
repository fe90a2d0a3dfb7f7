//! The store's one error type, and the mapping from database errors onto it.
//!
//! Constraint violations become [`StoreError::Conflict`] keyed on the constraint's name, the
//! same name on both backends (PostgreSQL reports it; SQLite reports the columns of a unique
//! key, which [`sqlite_constraint_name`] translates). Connection trouble becomes
//! [`StoreError::Unavailable`] so the gRPC layer can answer `UNAVAILABLE` and clients retry.

use thiserror::Error;

use super::sql::Corrupt;
use crate::model::AttemptId;

/// Everything that can go wrong in the store.
#[derive(Clone, Debug, Error)]
pub enum StoreError {
    /// The named record does not exist.
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    /// A report carried a lease token that is not the attempt's: a forged or buggy report.
    #[error("attempt {attempt} is not the lease holder")]
    NotLeaseHolder { attempt: AttemptId },
    /// A write broke the named constraint (for example `sweeps_pkey`: the sweep id is taken).
    #[error("constraint {constraint} violated")]
    Conflict { constraint: String },
    /// The database cannot be reached (connection refused, pool timed out): retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Any other database error; clients get a generic message, the detail is logged.
    #[error("database error: {0}")]
    Database(String),
    /// The embedded migrations could not be applied.
    #[error("migration failed: {0}")]
    Migration(String),
}

impl StoreError {
    /// Returns the error for a record that could not be decoded (a corrupt or foreign row).
    pub(crate) fn corrupt(what: &str, value: &str) -> StoreError {
        StoreError::Database(format!("stored {what} {value:?} is not valid"))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
                StoreError::Unavailable(error.to_string())
            }
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) => StoreError::Unavailable(error.to_string()),
            sqlx::Error::Database(database_error) => from_database_error(&*database_error),
            // A stored uuid or time that does not parse (`sql.rs`): the same message as
            // `StoreError::corrupt`, without sqlx's column prefix.
            sqlx::Error::ColumnDecode { source, .. } if source.is::<Corrupt>() => {
                StoreError::Database(source.to_string())
            }
            other => StoreError::Database(other.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migration(error.to_string())
    }
}

/// PostgreSQL error codes that mean "the server cannot serve now" rather than "bad request":
/// too many connections, shutting down, starting up.
const UNAVAILABLE_CODES: [&str; 5] = ["53300", "57P01", "57P02", "57P03", "08006"];

fn from_database_error(error: &dyn sqlx::error::DatabaseError) -> StoreError {
    let violation = error.is_unique_violation()
        || error.is_foreign_key_violation()
        || error.is_check_violation();
    if violation {
        let constraint = match error.constraint() {
            Some(name) => name.to_string(),
            None => sqlite_constraint_name(error.message()),
        };
        return StoreError::Conflict { constraint };
    }
    if let Some(code) = error.code() {
        if UNAVAILABLE_CODES.contains(&code.as_ref()) {
            return StoreError::Unavailable(error.message().to_string());
        }
    }
    StoreError::Database(error.message().to_string())
}

/// SQLite names the columns of a violated unique key, not the constraint: these are the
/// PostgreSQL names of the same keys, so both backends report one name.
const SQLITE_UNIQUE_KEYS: [(&str, &str); 11] = [
    ("designs.id", "designs_pkey"),
    ("sweeps.id", "sweeps_pkey"),
    (
        "grid_points.sweep_id, grid_points.point_index",
        "grid_points_pkey",
    ),
    ("trials.id", "trials_pkey"),
    (
        "trials.design_id, trials.recipe_hash, trials.dataset, trials.seed",
        "trials_key",
    ),
    (
        "sweep_trials.sweep_id, sweep_trials.trial_id",
        "sweep_trials_pkey",
    ),
    ("workers.id", "workers_pkey"),
    ("attempts.id", "attempts_pkey"),
    ("attempts.trial_id", "attempts_one_running"),
    ("results.trial_id", "results_pkey"),
    ("results.attempt_id", "results_attempt_key"),
];

/// Returns the constraint name of an SQLite constraint message.
///
/// `UNIQUE constraint failed: sweeps.id` becomes `sweeps_pkey`; a named CHECK constraint
/// keeps its name; SQLite does not say which foreign key failed, so that is `foreign_key`.
pub(crate) fn sqlite_constraint_name(message: &str) -> String {
    if let Some(columns) = message.strip_prefix("UNIQUE constraint failed: ") {
        return SQLITE_UNIQUE_KEYS
            .iter()
            .find(|(key_columns, _)| *key_columns == columns)
            .map(|(_, name)| name.to_string())
            .unwrap_or_else(|| columns.to_string());
    }
    if let Some(name) = message.strip_prefix("CHECK constraint failed: ") {
        return name.to_string();
    }
    if message.starts_with("FOREIGN KEY constraint failed") {
        return "foreign_key".to_string();
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_unique_messages_map_to_postgres_names() {
        assert_eq!(
            sqlite_constraint_name("UNIQUE constraint failed: sweeps.id"),
            "sweeps_pkey"
        );
        assert_eq!(
            sqlite_constraint_name(
                "UNIQUE constraint failed: trials.design_id, trials.recipe_hash, trials.dataset, trials.seed"
            ),
            "trials_key"
        );
        assert_eq!(
            sqlite_constraint_name("CHECK constraint failed: sweeps_max_attempts_check"),
            "sweeps_max_attempts_check"
        );
        assert_eq!(
            sqlite_constraint_name("FOREIGN KEY constraint failed"),
            "foreign_key"
        );
    }
}
