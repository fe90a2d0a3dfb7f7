//! SQL checks on a test's database (`docs/schema.md`): what the coordinator stored, read
//! directly rather than through the API under test.

use sqlx::PgPool;

/// One row of `attempts`, ids as text.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub id: String,
    pub worker: String,
    pub state: String,
    pub failure_class: Option<String>,
    pub progress_step: i64,
}

/// Returns the trial ids of a sweep.
pub async fn trials_of(pool: &PgPool, sweep: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT trial_id::text FROM sweep_trials WHERE sweep_id::text = $1 ORDER BY trial_id",
    )
    .bind(sweep)
    .fetch_all(pool)
    .await
    .expect("reading sweep_trials")
}

/// Returns a trial's attempts, oldest first.
pub async fn attempts_of(pool: &PgPool, trial: &str) -> Vec<Attempt> {
    let rows: Vec<(String, String, String, Option<String>, i64)> = sqlx::query_as(
        "SELECT id::text, worker_id::text, state, failure_class, coalesce(progress_step, 0) \
         FROM attempts WHERE trial_id::text = $1 ORDER BY leased_at, id",
    )
    .bind(trial)
    .fetch_all(pool)
    .await
    .expect("reading attempts");
    rows.into_iter()
        .map(
            |(id, worker, state, failure_class, progress_step)| Attempt {
                id,
                worker,
                state,
                failure_class,
                progress_step,
            },
        )
        .collect()
}

/// Returns the running attempts that reported at least `step` training steps.
pub async fn running_with_progress(pool: &PgPool, step: i64) -> Vec<Attempt> {
    let trials: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT trial_id::text FROM attempts \
         WHERE state = 'running' AND coalesce(progress_step, 0) >= $1",
    )
    .bind(step)
    .fetch_all(pool)
    .await
    .expect("reading attempts");
    let mut running = Vec::new();
    for trial in trials {
        running.extend(
            attempts_of(pool, &trial)
                .await
                .into_iter()
                .filter(|attempt| attempt.state == "running" && attempt.progress_step >= step),
        );
    }
    running
}

/// Returns `(trial, attempt)` of every stored result, ordered by trial.
pub async fn results(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT trial_id::text, attempt_id::text FROM results ORDER BY trial_id")
        .fetch_all(pool)
        .await
        .expect("reading results")
}

/// Returns `(trial, attempt)` of every late result, ordered by trial.
pub async fn late_results(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT trial_id::text, attempt_id::text FROM late_results ORDER BY trial_id, attempt_id",
    )
    .fetch_all(pool)
    .await
    .expect("reading late_results")
}

/// Returns how many rows `table` has.
pub async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|error| panic!("counting {table}: {error}"))
}
