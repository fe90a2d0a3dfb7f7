//! The coordinator's use cases, independent of gRPC: [`Coordinator`] turns requests into
//! store transactions and solver runs. The gRPC handlers (`grpc/`) only convert and call it.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deepmad_design::recipe::Recipe;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::model::{AttemptId, FailureClass, LeaseToken, SweepId, TrialId, WorkerId};
use crate::store::{
    CompleteOutcome, DownstreamRecord, EpochMetrics, FailOutcome, FinalMetrics, HeartbeatOutcome,
    LeaderboardFilter, LeaderboardRow, Lease, NewGridPoint, NewWorker, Progress, ResultRecord,
    RetryPolicy, Store, StoreError, SweepCreated, SweepSummary, TrialHistory,
};
use crate::sweep::{assemble, solve_all, SweepSpec};
use crate::weights::WeightStore;

/// The protocol version workers must speak.
pub const PROTOCOL_VERSION: i32 = deepmad_proto::PROTOCOL_VERSION as i32;

/// The operating parameters of the work protocol (from the validated settings).
#[derive(Clone, Debug)]
pub struct WorkConfig {
    pub lease_ms: i64,
    pub heartbeat_interval_ms: i64,
    pub grace_ms: i64,
    pub reaper_interval_ms: i64,
    pub max_attempts: u32,
    pub max_grid_points: usize,
    /// Leases one worker id may hold at once.
    pub leases_per_worker: i64,
    pub retry: RetryPolicy,
    /// Threads that solve a sweep's grid points.
    pub solver_threads: usize,
    /// Where trained weights for downstream evaluations are kept.
    pub weights_dir: std::path::PathBuf,
}

/// Time as the coordinator sees it: the wall clock at start-up plus tokio's monotonic time
/// since, plus whatever tests [`Clock::advance`]d it by. Leases, expiries and backoffs are
/// all computed from it, so a test can jump past a lease's expiry without sleeping.
/// (tokio's paused time cannot do that here: sqlx's pool timeouts run on tokio time, and
/// auto-advance fires them while SQLite works on its own thread.)
#[derive(Clone, Debug)]
pub struct Clock {
    started_wall: DateTime<Utc>,
    started: tokio::time::Instant,
    /// Milliseconds added by [`Clock::advance`], shared by every clone.
    skew_ms: Arc<AtomicI64>,
}

impl Clock {
    /// Returns a clock starting now.
    pub fn new() -> Clock {
        Clock {
            started_wall: Utc::now(),
            started: tokio::time::Instant::now(),
            skew_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Returns the current time.
    pub fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now() - self.started;
        self.started_wall
            + chrono::Duration::from_std(elapsed).expect("uptime fits in chrono")
            + chrono::Duration::milliseconds(self.skew_ms.load(Ordering::SeqCst))
    }

    /// Moves this clock and all its clones forward by `by` (tests).
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).expect("an advance fits in i64 milliseconds");
        self.skew_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// The coordinator: one per process, shared by every handler.
#[derive(Debug)]
pub struct Coordinator {
    pub store: Store,
    pub config: WorkConfig,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    /// Trained weights kept for downstream evaluations.
    pub weights: WeightStore,
    /// Cancelled when the process shuts down: long-lived streams end on it.
    pub shutdown: CancellationToken,
    /// Set when a lease-protocol call found the store unavailable; cleared by the grace that
    /// the first call after the outage grants (see [`Coordinator::after_outage`]).
    store_was_down: AtomicBool,
    /// Turns at solving a sweep's grid: one at a time.
    solving: tokio::sync::Semaphore,
}

/// Tells a solve to stop when dropped: the future of a request whose client went away is
/// dropped by tonic, and this with it, before the solve returns.
#[derive(Debug, Default)]
struct Abandon(Arc<AtomicBool>);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Coordinator {
    /// Returns a coordinator over `store`.
    pub fn new(
        store: Store,
        config: WorkConfig,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Coordinator {
        Coordinator {
            store,
            weights: WeightStore::new(config.weights_dir.clone()),
            config,
            metrics,
            clock: Clock::new(),
            shutdown,
            store_was_down: AtomicBool::new(false),
            solving: tokio::sync::Semaphore::new(1),
        }
    }

    /// Notes a store outage seen by a lease-protocol call, and passes the result on.
    fn watch_store<T>(&self, result: Result<T, StoreError>) -> Result<T, Error> {
        if let Err(StoreError::Unavailable(_)) = &result {
            self.store_was_down.store(true, Ordering::SeqCst);
        }
        Ok(result?)
    }

    /// After a store outage, gives every running lease a grace period before anything else
    /// reads or reaps leases: workers could not heartbeat while the database was down, and
    /// their leases must not be charged for it (they would be fenced out and their finished
    /// work recorded as late and trained again). Runs once per outage.
    async fn after_outage(&self) -> Result<(), Error> {
        if !self.store_was_down.load(Ordering::SeqCst) {
            return Ok(());
        }
        let extended = self.watch_store(
            self.store
                .grant_grace(self.config.grace_ms, self.clock.now())
                .await,
        )?;
        if self.store_was_down.swap(false, Ordering::SeqCst) {
            warn!(
                extended,
                grace_ms = self.config.grace_ms,
                "store reachable again: running leases given a grace period"
            );
        }
        Ok(())
    }

    /// Gives every running lease a grace period, so this coordinator's own downtime is not
    /// charged to workers. Called once at start-up.
    pub async fn start_up(&self) -> Result<u32, Error> {
        let extended = self
            .store
            .grant_grace(self.config.grace_ms, self.clock.now())
            .await?;
        if extended > 0 {
            info!(
                extended,
                grace_ms = self.config.grace_ms,
                "running leases given a grace period"
            );
        }
        Ok(extended)
    }

    /// Solves the sweep's grid off the async runtime, stores designs, grid and trials in one
    /// transaction and returns what it did, with the infeasible points' reasons.
    pub async fn create_sweep(
        &self,
        spec: SweepSpec,
        created_by: &str,
    ) -> Result<(SweepId, SweepCreated, Vec<NewGridPoint>), Error> {
        let problems = spec.problems(self.config.max_grid_points)?;
        let threads = self.config.solver_threads;
        // One sweep solves at a time (each already uses `solver_threads` cores); others wait
        // their turn, and a request whose client leaves while it waits or solves is dropped,
        // which stops its solver ([`Abandon`]).
        let _turn = self
            .solving
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("the coordinator is shutting down".into()))?;
        let abandon = Abandon::default();
        let flag = abandon.0.clone();
        let metrics = self.metrics.clone();
        let solve = move || solve_all(problems, threads, &flag, &|| metrics.grid_point_solved());
        let solved = tokio::task::spawn_blocking(solve)
            .await
            .map_err(|error| Error::Internal(format!("solver task failed: {error}")))?
            .ok_or_else(|| Error::Internal("the solve was abandoned".into()))?;
        let id = SweepId::new();
        let sweep = assemble(id, &spec, created_by, &solved, self.config.max_attempts)?;
        let infeasible = sweep
            .grid
            .iter()
            .filter(|point| point.infeasible_reason.is_some())
            .cloned()
            .collect();
        let created = self.store.create_sweep(&sweep, self.clock.now()).await?;
        info!(sweep = %id, grid_points = created.grid_points, new_trials = created.new_trials, "sweep created");
        self.refresh_queue_metrics().await;
        Ok((id, created, infeasible))
    }

    pub async fn get_sweep(&self, id: SweepId) -> Result<SweepSummary, Error> {
        Ok(self.store.get_sweep(id).await?)
    }

    /// Returns the newest sweep, not cancelled, created from a spec equal to `spec`.
    pub async fn find_sweep(&self, spec: &SweepSpec) -> Result<Option<SweepId>, Error> {
        let spec_json = serde_json::to_string(spec).expect("specs serialize");
        Ok(self.store.find_sweep(&spec_json).await?)
    }

    pub async fn list_sweeps(&self, limit: u32) -> Result<Vec<SweepSummary>, Error> {
        Ok(self.store.list_sweeps(limit.clamp(1, 1000)).await?)
    }

    pub async fn cancel_sweep(&self, id: SweepId) -> Result<SweepSummary, Error> {
        let summary = self.store.cancel_sweep(id, self.clock.now()).await?;
        info!(sweep = %id, "sweep cancelled");
        Ok(summary)
    }

    pub async fn retry_trials(&self, id: SweepId) -> Result<u32, Error> {
        Ok(self.store.retry_trials(id, self.clock.now()).await?)
    }

    pub async fn register(&self, worker: NewWorker) -> Result<(), Error> {
        if worker.protocol_version != PROTOCOL_VERSION {
            return Err(Error::InvalidArgument {
                field: "protocol_version".into(),
                reason: format!(
                    "this coordinator speaks {PROTOCOL_VERSION}, the worker {}",
                    worker.protocol_version
                ),
            });
        }
        self.store
            .register_worker(&worker, self.clock.now())
            .await?;
        info!(worker = %worker.id, name = %worker.name, "worker registered");
        Ok(())
    }

    pub async fn lease(&self, worker: WorkerId) -> Result<Option<Lease>, Error> {
        self.after_outage().await?;
        // A worker that already holds its share gets no more work (issue 24: one worker id
        // leased a whole sweep and let the leases expire until every trial was dead). Two
        // concurrent calls from one id may both pass; the share is a bound, not a lock.
        let now = self.clock.now();
        let held = self.watch_store(self.store.leases_held(worker, now).await)?;
        if held >= self.config.leases_per_worker {
            info!(%worker, held, "worker holds its share of leases; no more work for it now");
            return Ok(None);
        }
        let lease = self.watch_store(
            self.store
                .claim(worker, self.config.lease_ms, self.clock.now())
                .await,
        )?;
        if let Some(lease) = &lease {
            self.metrics.lease_granted();
            info!(%worker, trial = %lease.trial, attempt = %lease.attempt, "trial leased");
        }
        Ok(lease)
    }

    pub async fn heartbeat(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        progress: &Progress,
        epochs: &[EpochMetrics],
    ) -> Result<HeartbeatOutcome, Error> {
        self.metrics.heartbeat();
        self.after_outage().await?;
        let mut reported = vec![("progress.epoch".to_string(), progress.epoch)];
        for (index, metrics) in epochs.iter().enumerate() {
            reported.push((format!("epochs[{index}].epoch"), metrics.epoch));
        }
        self.check_epochs(attempt, &reported).await?;
        let outcome = self.watch_store(
            self.store
                .heartbeat(
                    attempt,
                    token,
                    progress,
                    epochs,
                    self.config.lease_ms,
                    self.clock.now(),
                )
                .await,
        )?;
        if !matches!(outcome, HeartbeatOutcome::Continue { .. }) {
            info!(%attempt, ?outcome, "heartbeat told the worker to stop");
        }
        Ok(outcome)
    }

    pub async fn complete(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        metrics: &FinalMetrics,
    ) -> Result<CompleteOutcome, Error> {
        self.after_outage().await?;
        let mut reported = vec![("metrics.epochs".to_string(), metrics.epochs)];
        for (index, epoch) in metrics.epochs_metrics.iter().enumerate() {
            reported.push((format!("metrics.epoch_metrics[{index}].epoch"), epoch.epoch));
        }
        self.check_epochs(attempt, &reported).await?;
        let outcome = self.watch_store(
            self.store
                .complete(attempt, token, metrics, self.clock.now())
                .await,
        )?;
        self.metrics.completed(outcome);
        if outcome == CompleteOutcome::Recorded {
            self.metrics.trial_duration(metrics.train_seconds);
        }
        info!(%attempt, ?outcome, top1 = metrics.top1, "completion reported");
        self.refresh_queue_metrics().await;
        Ok(outcome)
    }

    /// Refuses a report that counts more epochs than its trial's recipe runs (issue 24): its
    /// numbers describe a run that cannot have happened. `reported` pairs each epoch count or
    /// number with its request field.
    async fn check_epochs(
        &self,
        attempt: AttemptId,
        reported: &[(String, i32)],
    ) -> Result<(), Error> {
        // An unknown attempt is left to the store, which answers it as it always has.
        let Some(recipe_json) = self.watch_store(self.store.attempt_recipe(attempt).await)? else {
            return Ok(());
        };
        // A recipe stored before sweeps were checked may not read; its trial cannot train.
        let recipe = serde_json::from_str(&recipe_json)
            .ok()
            .and_then(|json| Recipe::from_json(&json).ok());
        let Some(total) = recipe.map(|recipe| i64::from(recipe.total_epochs())) else {
            return Ok(());
        };
        match reported.iter().find(|(_, epoch)| i64::from(*epoch) > total) {
            None => Ok(()),
            Some((field, epoch)) => Err(Error::InvalidArgument {
                field: field.clone(),
                reason: format!("is {epoch}, but the trial's recipe runs {total} epochs"),
            }),
        }
    }

    pub async fn fail(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        class: FailureClass,
        message: &str,
    ) -> Result<FailOutcome, Error> {
        self.after_outage().await?;
        let outcome = self.watch_store(
            self.store
                .fail(
                    attempt,
                    token,
                    class,
                    message,
                    None,
                    &self.config.retry,
                    self.clock.now(),
                )
                .await,
        )?;
        self.metrics.retried(class);
        warn!(%attempt, %class, message, ?outcome, "attempt failed");
        self.refresh_queue_metrics().await;
        Ok(outcome)
    }

    /// A worker that is shutting down hands its trial back: queued again at once, counted
    /// against no limit ([`Store::hand_back`]).
    pub async fn hand_back(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
        message: &str,
    ) -> Result<FailOutcome, Error> {
        self.after_outage().await?;
        let outcome = self.watch_store(
            self.store
                .hand_back(attempt, token, message, self.clock.now())
                .await,
        )?;
        info!(%attempt, message, ?outcome, "trial handed back");
        self.refresh_queue_metrics().await;
        Ok(outcome)
    }

    /// Checks that `attempt` holds the lease of a training trial before its weights are
    /// uploaded.
    /// Checks that `attempt` may upload weights now and returns the most bytes it may send:
    /// only a leased training trial whose sweeps have a downstream task that will read them
    /// (issue 24: any training lease could upload 4 GiB), and at most 16 bytes per parameter
    /// of its design (weights, momentum buffers and BatchNorm statistics in f32 are about 8)
    /// plus 16 MiB for the file's header and small tensors.
    pub async fn authorize_upload(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
    ) -> Result<u64, Error> {
        let leased = self
            .store
            .leased_trial(attempt, token, self.clock.now())
            .await?;
        if leased.task != "train" {
            return Err(Error::InvalidArgument {
                field: "attempt_id".into(),
                reason: format!(
                    "attempt {attempt} runs a {} evaluation; only training trials upload weights",
                    leased.task
                ),
            });
        }
        if !leased.wants_weights {
            return Err(Error::InvalidArgument {
                field: "attempt_id".into(),
                reason: format!(
                    "attempt {attempt}: no downstream task of its sweeps reads this trial's weights"
                ),
            });
        }
        let params = u64::try_from(leased.design_params).unwrap_or(0);
        Ok(params.saturating_mul(16).saturating_add(16 << 20))
    }

    /// Returns the weights file a leased downstream trial starts from: its training trial's
    /// result attempt's upload.
    pub async fn weights_for(
        &self,
        attempt: AttemptId,
        token: LeaseToken,
    ) -> Result<std::path::PathBuf, Error> {
        let leased = self
            .store
            .leased_trial(attempt, token, self.clock.now())
            .await?;
        let (Some(parent), Some(source)) = (leased.parent, leased.parent_result_attempt) else {
            return Err(Error::InvalidArgument {
                field: "attempt_id".into(),
                reason: format!(
                    "attempt {attempt} is not a downstream evaluation with a trained parent"
                ),
            });
        };
        let path = self.weights.path(source);
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Err(Error::NotFound {
                what: "weights of trial".into(),
                id: format!(
                    "{parent} (attempt {source}): they were not uploaded, so the trial was \
                     trained before any sweep asked for downstream tasks, or the weights \
                     directory was lost"
                ),
            });
        }
        Ok(path)
    }

    pub async fn leaderboard(
        &self,
        filter: &LeaderboardFilter,
    ) -> Result<Vec<LeaderboardRow>, Error> {
        Ok(self.store.leaderboard(filter).await?)
    }

    pub async fn export_results(&self, sweep: SweepId) -> Result<Vec<ResultRecord>, Error> {
        Ok(self.store.export_results(sweep).await?)
    }

    /// A sweep's analytics ([`crate::analytics`]) from its results.
    pub async fn sweep_analytics(
        &self,
        sweep: SweepId,
    ) -> Result<crate::analytics::SweepAnalytics, Error> {
        let records = self.store.export_results(sweep).await?;
        let observations: Vec<crate::analytics::Observation> = records
            .iter()
            .map(|record| crate::analytics::Observation {
                design_id: record.design_id.0.clone(),
                rho: record.rho,
                params: u64::try_from(record.params).unwrap_or(0),
                flops: u64::try_from(record.flops).unwrap_or(0),
                entropy: record.entropy,
                top1: record.top1,
            })
            .collect();
        let mut analytics = crate::analytics::analyze(&observations);
        let downstream: Vec<crate::analytics::DownstreamObservation> = self
            .store
            .downstream_results(sweep)
            .await?
            .into_iter()
            .filter_map(|record| {
                Some(crate::analytics::DownstreamObservation {
                    top1: record.top1?,
                    design_id: record.design_id.0,
                    name: record.name,
                    kind: record.kind,
                    dataset: record.dataset,
                })
            })
            .collect();
        analytics.downstream = crate::analytics::rank_agreement(&analytics.designs, &downstream);
        Ok(analytics)
    }

    /// A sweep's downstream trials, with their results once they have them.
    pub async fn downstream_results(&self, sweep: SweepId) -> Result<Vec<DownstreamRecord>, Error> {
        Ok(self.store.downstream_results(sweep).await?)
    }

    /// Returns a stored design: its architecture JSON and the numbers stored with it.
    pub async fn get_design(
        &self,
        id: &crate::model::DesignId,
    ) -> Result<crate::store::NewDesign, Error> {
        Ok(self.store.get_design(id).await?)
    }

    pub async fn trial_history(&self, trial: TrialId) -> Result<TrialHistory, Error> {
        Ok(self.store.trial_history(trial).await?)
    }

    /// Returns expired leases' trials to the queue once.
    pub async fn reap(&self) -> Result<u32, Error> {
        self.after_outage().await?;
        let reaped = self.watch_store(
            self.store
                .reap_expired(&self.config.retry, self.clock.now())
                .await,
        )?;
        if reaped > 0 {
            self.metrics.reaped(reaped);
            warn!(reaped, "expired leases returned to the queue");
            self.refresh_queue_metrics().await;
        }
        Ok(reaped)
    }

    /// Runs the reaper every `reaper_interval_ms` until `shutdown` is cancelled. A database
    /// outage is logged and retried at the next tick, never fatal.
    pub async fn run_reaper(self: Arc<Self>, shutdown: CancellationToken) {
        let period = Duration::from_millis(self.config.reaper_interval_ms.max(1) as u64);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    if let Err(error) = self.reap().await {
                        warn!(%error, "reaper could not reach the store; retrying next tick");
                    }
                }
            }
        }
    }

    async fn refresh_queue_metrics(&self) {
        if let Ok(counts) = self.store.queue_counts().await {
            self.metrics.set_queue(counts);
        }
    }
}
