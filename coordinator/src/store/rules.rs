//! The lease protocol's decisions, as pure functions both backends share: backoff, what a
//! failure does to a trial, a sweep's derived state, and the trials a sweep needs.
//!
//! The backends only move rows; every "what happens next" is decided here, once, and unit
//! tested without a database.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, DurationRound, Utc};

use super::types::{NewSweep, RetryPolicy, TrialCounts};
use crate::model::{DesignId, FailureClass, SweepState, TrialState};

/// Rows a leaderboard returns when the filter's limit is 0.
pub(crate) const DEFAULT_LEADERBOARD_LIMIT: i64 = 100;

/// Returns `time` truncated to whole microseconds, the precision both backends store, so a
/// time the store returns equals the time it stored.
pub(crate) fn micros(time: DateTime<Utc>) -> DateTime<Utc> {
    time.duration_trunc(Duration::microseconds(1))
        .expect("a microsecond divides every representable time")
}

/// Returns `time` plus `ms` milliseconds (a negative `ms` counts as 0).
pub(crate) fn after_ms(time: DateTime<Utc>, ms: i64) -> DateTime<Utc> {
    time + Duration::milliseconds(ms.max(0))
}

/// Returns the backoff before a retry: `base * 2^earlier_retries`, capped at the policy's max.
pub(crate) fn backoff_ms(earlier_retries: i32, policy: &RetryPolicy) -> i64 {
    let base = policy.backoff_base_ms.max(0);
    let doublings = earlier_retries.clamp(0, 62) as u32;
    let delay = base.checked_mul(1_i64 << doublings).unwrap_or(i64::MAX);
    delay.min(policy.backoff_max_ms.max(0))
}

/// A trial's retry counters, as stored on its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RetryCounters {
    /// Deterministic failures so far (they count against `max_attempts`).
    pub counted_failures: i32,
    /// Requeues after lost workers and retryable failures so far.
    pub requeues: i32,
    pub max_attempts: i32,
}

/// What a failure does to its trial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Queued again, not before the given time.
    Requeue { not_before: DateTime<Utc> },
    /// No more automatic retries: `failed` (deterministic failures reached `max_attempts`)
    /// or `dead` (lost or retryable failures passed the policy's `max_requeues`).
    Stop(TrialState),
}

/// Decides what a failure of class `class` does to a trial with `counters`.
///
/// A deterministic failure counts: the trial is retried with backoff until it has failed
/// `max_attempts` times (or `max_attempts_override`, when given), then it is `failed`.
/// A retryable failure or a lost worker does not count against `max_attempts`; it is
/// retried with backoff until `max_requeues` requeues have been spent, then it is `dead`.
/// The backoff doubles with every earlier retry of the trial, whatever its class.
pub(crate) fn after_failure(
    class: FailureClass,
    counters: RetryCounters,
    max_attempts_override: Option<i32>,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> (RetryCounters, Verdict) {
    let earlier_retries = counters.counted_failures.saturating_add(counters.requeues);
    let requeue = Verdict::Requeue {
        not_before: after_ms(now, backoff_ms(earlier_retries, policy)),
    };
    let mut next = counters;
    let verdict = match class {
        FailureClass::Deterministic => {
            next.counted_failures = counters.counted_failures.saturating_add(1);
            let limit = max_attempts_override.unwrap_or(counters.max_attempts);
            if next.counted_failures >= limit {
                Verdict::Stop(TrialState::Failed)
            } else {
                requeue
            }
        }
        FailureClass::Retryable | FailureClass::Lost => {
            next.requeues = counters.requeues.saturating_add(1);
            if next.requeues > policy.max_requeues {
                Verdict::Stop(TrialState::Dead)
            } else {
                requeue
            }
        }
    };
    (next, verdict)
}

/// What a graceful hand-back does to a trial with `counters`: the trial is queued again at
/// once and no counter moves, so rolling restarts and preemptions never make a trial `dead`
/// (issue 24). A lease that simply expires is still a lost worker ([`after_failure`]).
pub(crate) fn after_hand_back(
    counters: RetryCounters,
    now: DateTime<Utc>,
) -> (RetryCounters, Verdict) {
    (counters, Verdict::Requeue { not_before: now })
}

/// Returns the state a sweep shows: a stored `active` sweep with no queued or running trial
/// left is `completed` (the reaper persists that; readers need not wait for it).
pub(crate) fn shown_sweep_state(stored: SweepState, counts: &TrialCounts) -> SweepState {
    if stored == SweepState::Active && counts.queued == 0 && counts.running == 0 {
        SweepState::Completed
    } else {
        stored
    }
}

/// Returns the leaderboard's row limit: the filter's, or the default for 0.
pub(crate) fn leaderboard_limit(limit: u32) -> i64 {
    if limit == 0 {
        DEFAULT_LEADERBOARD_LIMIT
    } else {
        i64::from(limit)
    }
}

/// The shape of a new sweep: what it stores and the trials it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SweepPlan {
    pub grid_points: u32,
    pub infeasible_points: u32,
    /// Distinct designs of the feasible points, in grid order.
    pub designs: Vec<DesignId>,
    /// One (design, seed) per trial, designs in grid order, seeds in the sweep's order.
    pub trials: Vec<(DesignId, i64)>,
}

/// Plans a sweep: the distinct designs of its feasible points times its distinct seeds.
pub(crate) fn plan_sweep(sweep: &NewSweep) -> SweepPlan {
    let mut seen = BTreeSet::new();
    let mut designs = Vec::new();
    for design in sweep
        .grid
        .iter()
        .filter_map(|point| point.design_id.as_ref())
    {
        if seen.insert(design.clone()) {
            designs.push(design.clone());
        }
    }
    let mut seen_seeds = BTreeSet::new();
    let seeds: Vec<i64> = sweep
        .seeds
        .iter()
        .copied()
        .filter(|seed| seen_seeds.insert(*seed))
        .collect();
    let trials = designs
        .iter()
        .flat_map(|design| seeds.iter().map(move |seed| (design.clone(), *seed)))
        .collect();
    let feasible = sweep.grid.iter().filter(|p| p.design_id.is_some()).count();
    SweepPlan {
        grid_points: sweep.grid.len() as u32,
        infeasible_points: (sweep.grid.len() - feasible) as u32,
        designs,
        trials,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const POLICY: RetryPolicy = RetryPolicy {
        backoff_base_ms: 1_000,
        backoff_max_ms: 10_000,
        max_requeues: 2,
    };

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap()
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_ms(0, &POLICY), 1_000);
        assert_eq!(backoff_ms(1, &POLICY), 2_000);
        assert_eq!(backoff_ms(3, &POLICY), 8_000);
        assert_eq!(backoff_ms(4, &POLICY), 10_000);
        assert_eq!(backoff_ms(i32::MAX, &POLICY), 10_000);
    }

    #[test]
    fn deterministic_failures_count_until_failed() {
        let counters = RetryCounters {
            counted_failures: 0,
            requeues: 0,
            max_attempts: 2,
        };
        let (counters, verdict) =
            after_failure(FailureClass::Deterministic, counters, None, &POLICY, t0());
        assert_eq!(
            verdict,
            Verdict::Requeue {
                not_before: t0() + Duration::seconds(1)
            }
        );
        let (counters, verdict) =
            after_failure(FailureClass::Deterministic, counters, None, &POLICY, t0());
        assert_eq!(verdict, Verdict::Stop(TrialState::Failed));
        assert_eq!(counters.counted_failures, 2);
        assert_eq!(counters.requeues, 0);
    }

    #[test]
    fn override_replaces_max_attempts() {
        let counters = RetryCounters {
            counted_failures: 0,
            requeues: 0,
            max_attempts: 5,
        };
        let (_, verdict) = after_failure(
            FailureClass::Deterministic,
            counters,
            Some(1),
            &POLICY,
            t0(),
        );
        assert_eq!(verdict, Verdict::Stop(TrialState::Failed));
    }

    #[test]
    fn a_hand_back_requeues_at_once_and_counts_nothing() {
        let counters = RetryCounters {
            counted_failures: 1,
            requeues: POLICY.max_requeues,
            max_attempts: 2,
        };
        let (next, verdict) = after_hand_back(counters, t0());
        assert_eq!(next, counters);
        assert_eq!(verdict, Verdict::Requeue { not_before: t0() });
    }

    #[test]
    fn lost_workers_do_not_count_but_end_dead() {
        let mut counters = RetryCounters {
            counted_failures: 0,
            requeues: 0,
            max_attempts: 1,
        };
        for expected_delay_s in [1, 2] {
            let (next, verdict) = after_failure(FailureClass::Lost, counters, None, &POLICY, t0());
            let not_before = t0() + Duration::seconds(expected_delay_s);
            assert_eq!(verdict, Verdict::Requeue { not_before });
            counters = next;
        }
        let (counters, verdict) =
            after_failure(FailureClass::Retryable, counters, None, &POLICY, t0());
        assert_eq!(verdict, Verdict::Stop(TrialState::Dead));
        assert_eq!(counters.counted_failures, 0);
    }

    #[test]
    fn an_active_sweep_without_open_trials_shows_completed() {
        let open = TrialCounts {
            running: 1,
            ..TrialCounts::default()
        };
        let done = TrialCounts {
            succeeded: 3,
            ..TrialCounts::default()
        };
        assert_eq!(
            shown_sweep_state(SweepState::Active, &open),
            SweepState::Active
        );
        assert_eq!(
            shown_sweep_state(SweepState::Active, &done),
            SweepState::Completed
        );
        assert_eq!(
            shown_sweep_state(SweepState::Cancelled, &done),
            SweepState::Cancelled
        );
    }

    #[test]
    fn micros_truncates_nanoseconds() {
        let time = t0() + Duration::nanoseconds(1_234_567);
        assert_eq!(micros(time), t0() + Duration::microseconds(1_234));
    }
}
