//! Reads on SQLite: leaderboards, trial histories and counts, on the reader pool (WAL lets
//! them run while the writer writes). Mirrors `pg/reads.rs`.

use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::{get_optional_time, get_time, get_uuid, uuid_text, SqliteStore};
use crate::model::{AttemptId, DesignId, SweepId, TrialId, TrialState, WorkerId};
use crate::store::assemble::{
    add_count, attempt_state, failure_class, leaderboard_row, trial_history, trial_state,
    DesignColumns, Scores, TrialHead,
};
use crate::store::rules::leaderboard_limit;
use crate::store::types::{
    AttemptRecord, EpochMetrics, FinalMetrics, LeaderboardFilter, LeaderboardRow, ResultRecord,
    TrialCounts, TrialHistory,
};
use crate::store::StoreError;

/// The cross-sweep leaderboard: running aggregates in `top1_mean` order (see `pg/reads.rs`).
const LEADERBOARD_ALL: &str = "\
    SELECT s.design_id, d.family, s.dataset, s.recipe_hash, d.params, d.flops, d.layers, \
        d.effectiveness, d.entropy, \
        (SELECT min(g.rho) FROM grid_points g WHERE g.design_id = s.design_id) AS rho, \
        s.seeds AS seeds, s.top1_mean, s.top1_m2 / s.seeds AS top1_variance, s.top5_mean \
    FROM design_scores s JOIN designs d ON d.id = s.design_id \
    WHERE (?1 IS NULL OR s.dataset = ?1) AND (?2 IS NULL OR s.family = ?2) \
        AND (?3 IS NULL OR d.params >= ?3) AND (?4 IS NULL OR d.params <= ?4) \
        AND (?6 IS NULL OR d.flops <= ?6) \
    ORDER BY s.top1_mean DESC, s.design_id, s.dataset, s.recipe_hash \
    LIMIT ?5";

/// A sweep's leaderboard: the sweep's running aggregates in `top1_mean` order.
const LEADERBOARD_SWEEP: &str = "\
    SELECT s.design_id, s.family, s.dataset, s.recipe_hash, d.params, d.flops, d.layers, \
        d.effectiveness, d.entropy, \
        (SELECT min(p.rho) FROM grid_points p \
            WHERE p.sweep_id = ?7 AND p.design_id = s.design_id) AS rho, \
        s.seeds AS seeds, s.top1_mean, s.top1_m2 / s.seeds AS top1_variance, s.top5_mean \
    FROM sweep_scores s JOIN designs d ON d.id = s.design_id \
    WHERE s.sweep_id = ?7 AND (?1 IS NULL OR s.dataset = ?1) AND (?2 IS NULL OR s.family = ?2) \
        AND (?3 IS NULL OR d.params >= ?3) AND (?4 IS NULL OR d.params <= ?4) \
        AND (?6 IS NULL OR d.flops <= ?6) \
    ORDER BY s.top1_mean DESC, s.design_id, s.dataset, s.recipe_hash \
    LIMIT ?5";

impl SqliteStore {
    pub(crate) async fn leaderboard(
        &self,
        filter: &LeaderboardFilter,
    ) -> Result<Vec<LeaderboardRow>, StoreError> {
        let sql = match filter.sweep {
            Some(_) => LEADERBOARD_SWEEP,
            None => LEADERBOARD_ALL,
        };
        let mut query = sqlx::query(sql)
            .bind(&filter.dataset)
            .bind(&filter.family)
            .bind(filter.min_params)
            .bind(filter.max_params)
            .bind(leaderboard_limit(filter.limit))
            .bind(filter.max_flops);
        if let Some(sweep) = filter.sweep {
            query = query.bind(uuid_text(sweep.0));
        }
        let rows = query.fetch_all(&self.reader).await?;
        rows.iter().map(decode_leaderboard_row).collect()
    }

    pub(crate) async fn trial_history(&self, trial: TrialId) -> Result<TrialHistory, StoreError> {
        let head = sqlx::query("SELECT design_id, dataset, seed, state FROM trials WHERE id = ?1")
            .bind(uuid_text(trial.0))
            .fetch_optional(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: "trial",
                id: trial.to_string(),
            })?;
        let head = TrialHead {
            trial,
            design_id: DesignId(head.try_get("design_id")?),
            dataset: head.try_get("dataset")?,
            seed: head.try_get("seed")?,
            state: trial_state(head.try_get("state")?)?,
        };
        let attempts = self.attempts_of(trial).await?;
        let epochs = self.epochs_of(trial).await?;
        let result = sqlx::query(&format!(
            "{METRICS_COLUMNS} FROM results WHERE trial_id = ?1"
        ))
        .bind(uuid_text(trial.0))
        .fetch_optional(&self.reader)
        .await?
        .map(|row| decode_metrics(&row))
        .transpose()?;
        let late_results = sqlx::query(&format!(
            "{METRICS_COLUMNS} FROM late_results WHERE trial_id = ?1 \
             ORDER BY received_at, attempt_id"
        ))
        .bind(uuid_text(trial.0))
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(decode_metrics)
        .collect::<Result<Vec<_>, _>>()?;
        Ok(trial_history(head, attempts, epochs, result, late_results))
    }

    async fn attempts_of(&self, trial: TrialId) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, worker_id, state, leased_at, lease_expires_at, finished_at, \
                 failure_class, failure_message \
             FROM attempts WHERE trial_id = ?1 ORDER BY leased_at, id",
        )
        .bind(uuid_text(trial.0))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AttemptRecord {
                    id: AttemptId(get_uuid(row, "id")?),
                    worker: WorkerId(get_uuid(row, "worker_id")?),
                    state: attempt_state(row.try_get("state")?)?,
                    leased_at: get_time(row, "leased_at")?,
                    lease_expires_at: get_time(row, "lease_expires_at")?,
                    finished_at: get_optional_time(row, "finished_at")?,
                    failure_class: failure_class(row.try_get("failure_class")?)?,
                    failure_message: row.try_get("failure_message")?,
                })
            })
            .collect()
    }

    async fn epochs_of(
        &self,
        trial: TrialId,
    ) -> Result<Vec<(AttemptId, EpochMetrics)>, StoreError> {
        let rows = sqlx::query(
            "SELECT attempt_id, epoch, train_loss, test_loss, top1, top5, images_per_second, \
                 learning_rate \
             FROM epoch_metrics WHERE trial_id = ?1 ORDER BY attempt_id, epoch",
        )
        .bind(uuid_text(trial.0))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let metrics = EpochMetrics {
                    epoch: row.try_get("epoch")?,
                    train_loss: row.try_get("train_loss")?,
                    test_loss: row.try_get("test_loss")?,
                    top1: row.try_get("top1")?,
                    top5: row.try_get("top5")?,
                    images_per_second: row.try_get("images_per_second")?,
                    learning_rate: row.try_get("learning_rate")?,
                };
                Ok((AttemptId(get_uuid(row, "attempt_id")?), metrics))
            })
            .collect()
    }

    pub(crate) async fn queue_counts(&self) -> Result<TrialCounts, StoreError> {
        let rows = sqlx::query("SELECT state, count(*) AS trials FROM trials GROUP BY state")
            .fetch_all(&self.reader)
            .await?;
        let mut counts = TrialCounts::default();
        for row in &rows {
            add_count(
                &mut counts,
                trial_state(row.try_get("state")?)?,
                row.try_get("trials")?,
            );
        }
        Ok(counts)
    }

    pub(crate) async fn sweep_trials(
        &self,
        sweep: SweepId,
    ) -> Result<Vec<(TrialId, TrialState)>, StoreError> {
        self.ensure_sweep(sweep).await?;
        let rows = sqlx::query(
            "SELECT t.id, t.state FROM sweep_trials st JOIN trials t ON t.id = st.trial_id \
             WHERE st.sweep_id = ?1 ORDER BY t.id",
        )
        .bind(uuid_text(sweep.0))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    TrialId(get_uuid(row, "id")?),
                    trial_state(row.try_get("state")?)?,
                ))
            })
            .collect()
    }

    /// Returns every result of the sweep's trials with its design's numbers, by design and
    /// seed.
    pub(crate) async fn export_results(
        &self,
        sweep: SweepId,
    ) -> Result<Vec<ResultRecord>, StoreError> {
        self.ensure_sweep(sweep).await?;
        let rows = sqlx::query(EXPORT_RESULTS)
            .bind(uuid_text(sweep.0))
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(ResultRecord {
                    trial: TrialId(get_uuid(row, "trial_id")?),
                    design_id: DesignId(row.try_get("design_id")?),
                    family: row.try_get("family")?,
                    dataset: row.try_get("dataset")?,
                    recipe_hash: row.try_get("recipe_hash")?,
                    seed: row.try_get("seed")?,
                    rho: row.try_get("rho")?,
                    params: row.try_get("params")?,
                    flops: row.try_get("flops")?,
                    layers: row.try_get("layers")?,
                    effectiveness: row.try_get("effectiveness")?,
                    entropy: row.try_get("entropy")?,
                    top1: row.try_get("top1")?,
                    top5: row.try_get("top5")?,
                    test_loss: row.try_get("test_loss")?,
                    train_seconds: row.try_get("train_seconds")?,
                    epochs: row.try_get("epochs")?,
                })
            })
            .collect()
    }

    /// Returns `NotFound` unless the sweep exists.
    pub(super) async fn ensure_sweep(&self, sweep: SweepId) -> Result<(), StoreError> {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sweeps WHERE id = ?1)")
            .bind(uuid_text(sweep.0))
            .fetch_one(&self.reader)
            .await?;
        if exists {
            Ok(())
        } else {
            Err(StoreError::NotFound {
                what: "sweep",
                id: sweep.to_string(),
            })
        }
    }
}

/// A sweep's results, one row per trial, with the smallest rho of the sweep's grid points
/// that produced the design.
const EXPORT_RESULTS: &str = "\
    SELECT t.id AS trial_id, t.design_id, d.family, t.dataset, t.recipe_hash, t.seed, \
        (SELECT min(p.rho) FROM grid_points p \
            WHERE p.sweep_id = ?1 AND p.design_id = t.design_id) AS rho, \
        d.params, d.flops, d.layers, d.effectiveness, d.entropy, \
        r.top1, r.top5, r.test_loss, r.train_seconds, r.epochs \
    FROM sweep_trials st \
        JOIN trials t ON t.id = st.trial_id \
        JOIN results r ON r.trial_id = t.id \
        JOIN designs d ON d.id = t.design_id \
    WHERE st.sweep_id = ?1 AND t.task = 'train' \
    ORDER BY t.design_id, t.seed, t.id";

const METRICS_COLUMNS: &str = "SELECT attempt_id, top1, top5, test_loss, train_seconds, epochs, \
    dataset_hash, checkpoint";

fn decode_metrics(row: &SqliteRow) -> Result<(AttemptId, FinalMetrics), StoreError> {
    let metrics = FinalMetrics {
        top1: row.try_get("top1")?,
        top5: row.try_get("top5")?,
        test_loss: row.try_get("test_loss")?,
        train_seconds: row.try_get("train_seconds")?,
        epochs: row.try_get("epochs")?,
        dataset_hash: row.try_get("dataset_hash")?,
        checkpoint: row.try_get("checkpoint")?,
        epochs_metrics: Vec::new(),
    };
    Ok((AttemptId(get_uuid(row, "attempt_id")?), metrics))
}

fn decode_leaderboard_row(row: &SqliteRow) -> Result<LeaderboardRow, StoreError> {
    let design = DesignColumns {
        design_id: DesignId(row.try_get("design_id")?),
        family: row.try_get("family")?,
        dataset: row.try_get("dataset")?,
        recipe_hash: row.try_get("recipe_hash")?,
        params: row.try_get("params")?,
        flops: row.try_get("flops")?,
        layers: row.try_get("layers")?,
        effectiveness: row.try_get("effectiveness")?,
        entropy: row.try_get("entropy")?,
        rho: row.try_get("rho")?,
    };
    let scores = Scores {
        seeds: row.try_get("seeds")?,
        top1_mean: row.try_get("top1_mean")?,
        top1_variance: row.try_get("top1_variance")?,
        top5_mean: row.try_get("top5_mean")?,
    };
    Ok(leaderboard_row(design, scores))
}
