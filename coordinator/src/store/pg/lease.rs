//! Claims and completions on PostgreSQL: both go through their batched calls
//! (`pg/claims.rs`, `pg/completions.rs`). The rest of the work protocol is shared with
//! SQLite (`store/common/lease.rs`).

use chrono::{DateTime, Utc};

use super::completions::{Answer, Completion};
use super::{claims, PgStore};
use crate::model::{AttemptId, LeaseToken, WorkerId};
use crate::store::common::lease::attempt_not_found;
use crate::store::types::{CompleteOutcome, FinalMetrics, Lease};
use crate::store::StoreError;

/// How often a completion is tried while the sweep lock is busy.
const RETRIES: u64 = 50;

impl PgStore {
    /// Claims a trial for `worker` (see `pg/claims.rs`: concurrent claims share a statement).
    pub(crate) async fn claim(
        &self,
        worker: WorkerId,
        lease_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<Lease>, StoreError> {
        claims::claim(&self.claims, worker, lease_ms, now).await
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
