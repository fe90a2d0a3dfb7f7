//! The coordinator's store: designs, sweeps, trials, leases and results, on PostgreSQL
//! ([`PgStore`]) or on an embedded SQLite file ([`SqliteStore`]).
//!
//! [`Store`] has one method per use case; both backends run the same conformance suite
//! (`coordinator/tests/store.rs`). Start with [`Store::claim`], [`Store::heartbeat`] and
//! [`Store::complete`]: the leased, fenced work protocol described in `docs/architecture.md`.
//! The decisions they share (backoff, retry limits, derived sweep state) are pure functions
//! in `rules.rs`; the schema is `migrations/` and `docs/schema.md`.
//!
//! Most statements are written once, in `common/`, on the query layer of `sql.rs`, which
//! runs them on either database. Only what differs between the databases is dialect code,
//! in `pg/` and `sqlite/`: PostgreSQL's batched claims and completions, bulk inserts and
//! sweep lock; SQLite's single-writer transactions and its downstream queueing.
//!
//! Times are parameters (`now`), never read from the clock, and are truncated to
//! microseconds, the precision both backends keep.
//!
//! Locking rule, so transactions cannot deadlock: sweep-level changes (create, cancel, retry,
//! finish) are serialised (an advisory lock on PostgreSQL, the single writer on SQLite); a
//! transaction that changes a trial and its attempts locks the trial row first.

mod assemble;
mod common;
mod error;
mod pg;
mod rules;
mod sql;
mod sqlite;
pub mod types;

use chrono::{DateTime, Utc};

pub use error::StoreError;
pub use pg::PgStore;
pub use sqlite::SqliteStore;
pub use types::*;

use crate::model::{
    AttemptId, DesignId, FailureClass, LeaseToken, SweepId, TrialId, TrialState, WorkerId,
};
use common::{designs, downstream, lease, reads, sweeps};
use rules::micros;
use sql::{Arg, Db, Dialect, Tx};

/// A failure report's arguments, as the backends take them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FailureReport<'a> {
    pub class: FailureClass,
    pub message: &'a str,
    pub max_attempts_override: Option<i32>,
    pub policy: &'a RetryPolicy,
}

/// Calls the same method on whichever backend the store is on: the dialect code of `pg/`
/// and `sqlite/`.
macro_rules! on_backend {
    ($store:expr, $backend:ident => $call:expr) => {
        match $store {
            Store::Postgres($backend) => $call,
            Store::Sqlite($backend) => $call,
        }
    };
}

/// The store on one of its backends. Cloning it is cheap: clones share the connection pool.
#[derive(Debug, Clone)]
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

impl Store {
    /// Connects to `postgres://...` or `sqlite://PATH` (the file is created if missing) with
    /// default pool settings, and applies that backend's embedded migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Store::connect_with(url, &PoolSettings::default()).await
    }

    /// Connects like [`Store::connect`] with the given pool settings.
    pub async fn connect_with(url: &str, pool: &PoolSettings) -> Result<Store, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(PgStore::connect(url, pool).await?))
        } else if url.starts_with("sqlite:") {
            Ok(Store::Sqlite(SqliteStore::connect(url, pool).await?))
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            Err(StoreError::Database(format!(
                "unsupported database url scheme {scheme:?}: use postgres:// or sqlite://"
            )))
        }
    }

    /// Returns `"postgres"` or `"sqlite"`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// Closes the connection pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        on_backend!(self, store => store.close().await)
    }

    /// Writes a sweep in one transaction: its designs (insert-or-ignore by id), the sweep,
    /// its grid points, one trial per distinct (feasible design, seed) — an existing trial
    /// with the same (design, recipe, dataset, seed) is linked instead — and the links.
    /// Nothing is written on any error; a taken sweep id is `Conflict { "sweeps_pkey" }`.
    pub async fn create_sweep(
        &self,
        sweep: &NewSweep,
        now: DateTime<Utc>,
    ) -> Result<SweepCreated, StoreError> {
        on_backend!(self, store => store.create_sweep(sweep, micros(now)).await)
    }

    /// Returns a sweep's summary; an `active` sweep with no queued or running trial shows
    /// as `completed`.
    pub async fn get_sweep(&self, id: SweepId) -> Result<SweepSummary, StoreError> {
        sweeps::get_sweep(&mut self.reader(), id).await
    }

    /// Returns the newest sweep, not cancelled, created from exactly this spec (its JSON as
    /// [`NewSweep::spec_json`] holds it): an embedded run that is started again resumes it.
    pub async fn find_sweep(&self, spec_json: &str) -> Result<Option<SweepId>, StoreError> {
        sweeps::find_sweep(&mut self.reader(), spec_json).await
    }

    /// Returns the newest `limit` sweeps (0 means 100), newest first.
    pub async fn list_sweeps(&self, limit: u32) -> Result<Vec<SweepSummary>, StoreError> {
        sweeps::list_sweeps(&mut self.reader(), limit).await
    }

    /// Cancels an active sweep: trials no active sweep needs any more are not leased, and
    /// their running attempts are told `Cancelled` at their next heartbeat. A completed or
    /// cancelled sweep is returned unchanged.
    pub async fn cancel_sweep(
        &self,
        id: SweepId,
        now: DateTime<Utc>,
    ) -> Result<SweepSummary, StoreError> {
        sweeps::cancel_sweep(self, id, micros(now)).await
    }

    /// Requeues the sweep's `failed` and `dead` trials now, with their retry counters reset,
    /// and makes the sweep active again if it was not. Returns how many were requeued.
    pub async fn retry_trials(
        &self,
        sweep: SweepId,
        now: DateTime<Utc>,
    ) -> Result<u32, StoreError> {
        sweeps::retry_trials(self, sweep, micros(now)).await
    }

    /// Records a worker incarnation (registering the same id again updates it).
    pub async fn register_worker(
        &self,
        worker: &NewWorker,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        lease::register_worker(self, worker, micros(now)).await
    }

    /// Leases the oldest queued trial whose backoff has passed and that an active sweep
    /// needs, atomically: the trial becomes `running` under a new attempt with a fresh lease
    /// token until `now + lease_ms`. Returns `None` when there is no such trial; an unknown
    /// worker is `NotFound`.
    pub async fn claim(
        &self,
        worker: WorkerId,
        lease_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<Lease>, StoreError> {
        on_backend!(self, store => store.claim(worker, lease_ms, micros(now)).await)
    }

    /// Records progress and epoch metrics and extends the lease to `now + lease_ms`, while
    /// the attempt holds its lease (running, and `now` not past its expiry). A lease past its
    /// expiry is `LeaseLost` at once, even before the reaper has run: the reaper then
    /// requeues the trial under the retry policy, which a heartbeat does not carry. An
    /// attempt whose sweeps were all cancelled is told `Cancelled`, ends `cancelled`, and its
    /// trial is queued again (not leased until an active sweep needs it). A token that is not
    /// the attempt's is `NotLeaseHolder`.
    #[allow(clippy::too_many_arguments)] // One argument per field of the heartbeat message.
    pub async fn heartbeat(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        progress: &Progress,
        epochs: &[EpochMetrics],
        lease_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<HeartbeatOutcome, StoreError> {
        let now = micros(now);
        lease::heartbeat(self, attempt, token, progress, epochs, lease_ms, now).await
    }

    /// Records an attempt's final metrics in one transaction, idempotently: the lease
    /// holder's first report is the trial's result (`Recorded`); a repeat is `Duplicate`; a
    /// report from an attempt that no longer holds the lease (expired, reaped, re-leased,
    /// cancelled) is kept in `late_results` and never counted (`Late`, again `Late` for a
    /// repeat). A token that is not the attempt's is `NotLeaseHolder`.
    pub async fn complete(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        metrics: &FinalMetrics,
        now: DateTime<Utc>,
    ) -> Result<CompleteOutcome, StoreError> {
        on_backend!(self, store => store.complete(attempt, token, metrics, micros(now)).await)
    }

    /// Records a failed attempt and decides the trial's fate: a deterministic failure counts
    /// against the trial's `max_attempts` (or `max_attempts_override`) and at the limit the
    /// trial is `failed`; a retryable failure or a lost worker does not count, but past the
    /// policy's `max_requeues` the trial is `dead`; otherwise it is requeued with backoff
    /// `base * 2^(earlier retries)`, capped. An attempt that no longer holds the lease
    /// changes nothing (`FailOutcome::NotLeaseHolder`).
    #[allow(clippy::too_many_arguments)] // One argument per field of the failure message.
    pub async fn fail(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        class: FailureClass,
        message: &str,
        max_attempts_override: Option<i32>,
        policy: &RetryPolicy,
        now: DateTime<Utc>,
    ) -> Result<FailOutcome, StoreError> {
        let report = FailureReport {
            class,
            message,
            max_attempts_override,
            policy,
        };
        lease::fail(self, attempt, token, &report, micros(now)).await
    }

    /// Returns how many attempts `worker` holds a lease on at `now` (running, not expired).
    pub async fn leases_held(
        &self,
        worker: WorkerId,
        now: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        reads::leases_held(&mut self.reader(), worker, micros(now)).await
    }

    /// Ends a leased attempt whose worker is shutting down and hands its trial back: the
    /// attempt is stored as a retryable failure with `message`, and the trial is queued again
    /// at once, counting against neither `max_attempts` nor `max_requeues` and with no
    /// backoff. An attempt that no longer holds the lease changes nothing
    /// (`FailOutcome::NotLeaseHolder`).
    pub async fn hand_back(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        message: &str,
        now: DateTime<Utc>,
    ) -> Result<FailOutcome, StoreError> {
        lease::hand_back(self, attempt, token, message, micros(now)).await
    }

    /// Expires running attempts whose lease ended before `now` and requeues their trials
    /// with backoff (a lost worker does not count against `max_attempts`). Safe to run from
    /// several coordinators at once. Also marks active sweeps with no open trial
    /// `completed`. Returns how many attempts it expired.
    pub async fn reap_expired(
        &self,
        policy: &RetryPolicy,
        now: DateTime<Utc>,
    ) -> Result<u32, StoreError> {
        lease::reap_expired(self, policy, micros(now)).await
    }

    /// Extends every running lease to at least `now + grace_ms`, so the coordinator's own
    /// downtime is not charged to workers. Returns how many leases it extended.
    pub async fn grant_grace(&self, grace_ms: i64, now: DateTime<Utc>) -> Result<u32, StoreError> {
        lease::grant_grace(self, grace_ms, micros(now)).await
    }

    /// Returns the best designs by mean top-1 over seeds, per (design, dataset, recipe),
    /// each with its downstream results per task (the sweep's tasks when the filter names a
    /// sweep, every task of any sweep otherwise).
    pub async fn leaderboard(
        &self,
        filter: &LeaderboardFilter,
    ) -> Result<Vec<LeaderboardRow>, StoreError> {
        let mut rows = reads::leaderboard(&mut self.reader(), filter).await?;
        if rows.is_empty() {
            return Ok(rows);
        }
        let records = match filter.sweep {
            Some(sweep) => self.downstream_results(sweep).await?,
            None => {
                let mut designs: Vec<String> =
                    rows.iter().map(|row| row.design_id.0.clone()).collect();
                designs.sort();
                designs.dedup();
                on_backend!(self, store => store.downstream_of_designs(&designs).await?)
            }
        };
        assemble::attach_downstream(&mut rows, &records);
        Ok(rows)
    }

    /// Returns every downstream trial of a sweep (queued, running or finished), with its
    /// result once it has one, by design, task and seed.
    pub async fn downstream_results(
        &self,
        sweep: SweepId,
    ) -> Result<Vec<DownstreamRecord>, StoreError> {
        downstream::downstream_results(&mut self.reader(), sweep).await
    }

    /// Returns the trial that `attempt` leases, with its parent's result attempt, while the
    /// attempt holds its lease (running, token matching, not expired at `now`); otherwise
    /// `NotLeaseHolder` (or `NotFound` for an unknown attempt). Weights uploads and downloads
    /// are fenced by this check.
    pub async fn leased_trial(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        now: DateTime<Utc>,
    ) -> Result<LeasedTrial, StoreError> {
        downstream::leased_trial(&mut self.reader(), attempt, token, micros(now)).await
    }

    /// Returns the recipe (JSON) of the trial that `attempt` trains, or `None` for an unknown
    /// attempt: reports are checked against it before they are recorded.
    pub async fn attempt_recipe(&self, attempt: AttemptId) -> Result<Option<String>, StoreError> {
        reads::attempt_recipe(&mut self.reader(), attempt).await
    }

    /// Returns every result of a sweep's trials, with its design's numbers, by design and
    /// seed (`deepmad results export`).
    pub async fn export_results(&self, sweep: SweepId) -> Result<Vec<ResultRecord>, StoreError> {
        reads::export_results(&mut self.reader(), sweep).await
    }

    /// Returns a stored design (its architecture and the numbers stored with it); an unknown
    /// id is `NotFound`.
    pub async fn get_design(&self, id: &DesignId) -> Result<NewDesign, StoreError> {
        designs::get_design(&mut self.reader(), id).await
    }

    /// Returns a trial with its attempts, epoch metrics, result and late results.
    pub async fn trial_history(&self, trial: TrialId) -> Result<TrialHistory, StoreError> {
        reads::get_trial_history(&mut self.reader(), trial).await
    }

    /// Returns how many trials are in each state, over all sweeps.
    pub async fn queue_counts(&self) -> Result<TrialCounts, StoreError> {
        reads::queue_counts(&mut self.reader()).await
    }

    /// Returns a sweep's trials and their states, by trial id.
    pub async fn sweep_trials(
        &self,
        sweep: SweepId,
    ) -> Result<Vec<(TrialId, TrialState)>, StoreError> {
        reads::sweep_trials(&mut self.reader(), sweep).await
    }

    /// The SQL dialect of the backend, for the few statements whose text differs.
    fn dialect(&self) -> Dialect {
        match self {
            Store::Postgres(_) => Dialect::Postgres,
            Store::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// Where statements that only read run: PostgreSQL's pool, SQLite's reader pool.
    fn reader(&self) -> Db<'_> {
        on_backend!(self, store => store.reader())
    }

    /// Begins a transaction that changes trials and attempts (on SQLite, one holding the
    /// write lock).
    async fn begin(&self) -> Result<Tx, StoreError> {
        on_backend!(self, store => store.begin().await)
    }

    /// Begins a transaction of a sweep-level change, serialised with every other one (the
    /// advisory lock on PostgreSQL, the single writer on SQLite).
    async fn begin_sweeps(&self) -> Result<Tx, StoreError> {
        match self {
            Store::Postgres(store) => store.begin_sweeps().await,
            Store::Sqlite(store) => store.begin().await,
        }
    }

    /// Runs one write statement on its own: autocommit on PostgreSQL, a write transaction
    /// on SQLite. Returns how many rows it changed.
    async fn write_one(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        on_backend!(self, store => store.write_one(sql, args).await)
    }
}
