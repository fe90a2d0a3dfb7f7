-- deepmad's schema on SQLite (the embedded backend). docs/schema.md describes every table,
-- column and index; migrations/postgres/0001_initial.sql is the same logical schema.
-- Never edit a migration once it has landed: add the next one.
--
-- Differences from PostgreSQL, all in encoding: tables are STRICT; uuids are TEXT (lowercase,
-- hyphenated); times are TEXT, RFC 3339 UTC with exactly six fractional digits
-- (2024-05-01T12:00:00.000000Z), so text order is time order; JSON is TEXT checked by
-- json_valid; floats are REAL.

-- A solved or imported architecture. Its id is the SHA-256 (hex) of architecture_json.
CREATE TABLE designs (
    id                TEXT NOT NULL,
    family            TEXT NOT NULL,
    objective_kind    TEXT NOT NULL,
    architecture_json TEXT NOT NULL CHECK (json_valid(architecture_json)),
    params            INTEGER NOT NULL,
    flops             INTEGER NOT NULL,
    layers            INTEGER NOT NULL,
    effectiveness     REAL NOT NULL,
    entropy           REAL NOT NULL,
    penalty           REAL NOT NULL,
    objective         REAL NOT NULL,
    resolution        INTEGER NOT NULL,
    num_classes       INTEGER NOT NULL,
    solver_version    TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    CONSTRAINT designs_pkey PRIMARY KEY (id)
) STRICT;

-- A user's request: a grid of solver problems, a recipe, a dataset and seeds.
CREATE TABLE sweeps (
    id                TEXT NOT NULL,
    name              TEXT NOT NULL,
    state             TEXT NOT NULL,
    created_by        TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    finished_at       TEXT,
    spec_json         TEXT NOT NULL CHECK (json_valid(spec_json)),
    dataset           TEXT NOT NULL,
    recipe_json       TEXT NOT NULL CHECK (json_valid(recipe_json)),
    recipe_hash       TEXT NOT NULL,
    seeds_json        TEXT NOT NULL CHECK (json_valid(seeds_json)),
    max_attempts      INTEGER NOT NULL,
    grid_points       INTEGER NOT NULL,
    infeasible_points INTEGER NOT NULL,
    distinct_designs  INTEGER NOT NULL,
    CONSTRAINT sweeps_pkey PRIMARY KEY (id),
    CONSTRAINT sweeps_state_check CHECK (state IN ('active', 'cancelled', 'completed')),
    CONSTRAINT sweeps_max_attempts_check CHECK (max_attempts >= 1)
) STRICT;
CREATE INDEX sweeps_newest ON sweeps (created_at DESC, id DESC);

-- One solver problem of a sweep and its outcome (a design, or why it was infeasible).
CREATE TABLE grid_points (
    sweep_id          TEXT NOT NULL,
    point_index       INTEGER NOT NULL,
    family            TEXT NOT NULL,
    objective_kind    TEXT NOT NULL,
    rho               REAL NOT NULL,
    alpha_json        TEXT NOT NULL CHECK (json_valid(alpha_json)),
    beta              REAL NOT NULL,
    params_budget     INTEGER,
    flops_budget      INTEGER,
    resolution        INTEGER NOT NULL,
    design_id         TEXT,
    infeasible_reason TEXT,
    solve_ms          REAL NOT NULL,
    CONSTRAINT grid_points_pkey PRIMARY KEY (sweep_id, point_index),
    CONSTRAINT grid_points_sweep_fkey FOREIGN KEY (sweep_id) REFERENCES sweeps (id),
    CONSTRAINT grid_points_design_fkey FOREIGN KEY (design_id) REFERENCES designs (id)
) STRICT;
-- The leaderboard's rho: the smallest rho of the points that produced a design.
CREATE INDEX grid_points_design_rho ON grid_points (design_id, rho);

-- (design, recipe, dataset, seed) to train; unique on that key, so results are reused.
CREATE TABLE trials (
    id               TEXT NOT NULL,
    design_id        TEXT NOT NULL,
    recipe_hash      TEXT NOT NULL,
    dataset          TEXT NOT NULL,
    seed             INTEGER NOT NULL,
    recipe_json      TEXT NOT NULL CHECK (json_valid(recipe_json)),
    state            TEXT NOT NULL,
    -- Deterministic failures allowed (from the sweep that created the trial).
    max_attempts     INTEGER NOT NULL,
    counted_failures INTEGER NOT NULL,
    requeues         INTEGER NOT NULL,
    -- How many linked sweeps are active: only trials with active_sweeps > 0 are leased.
    active_sweeps    INTEGER NOT NULL,
    not_before       TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    CONSTRAINT trials_pkey PRIMARY KEY (id),
    CONSTRAINT trials_key UNIQUE (design_id, recipe_hash, dataset, seed),
    CONSTRAINT trials_design_fkey FOREIGN KEY (design_id) REFERENCES designs (id),
    CONSTRAINT trials_state_check
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'dead')),
    CONSTRAINT trials_active_sweeps_check CHECK (active_sweeps >= 0)
) STRICT;
-- The work queue: claim walks it oldest first and skips locked rows.
CREATE INDEX trials_queue ON trials (created_at, id)
    WHERE state = 'queued' AND active_sweeps > 0;

CREATE TABLE sweep_trials (
    sweep_id TEXT NOT NULL,
    trial_id TEXT NOT NULL,
    CONSTRAINT sweep_trials_pkey PRIMARY KEY (sweep_id, trial_id),
    CONSTRAINT sweep_trials_sweep_fkey FOREIGN KEY (sweep_id) REFERENCES sweeps (id),
    CONSTRAINT sweep_trials_trial_fkey FOREIGN KEY (trial_id) REFERENCES trials (id)
) STRICT;
CREATE INDEX sweep_trials_trial ON sweep_trials (trial_id);

-- One row per worker process incarnation.
CREATE TABLE workers (
    id               TEXT NOT NULL,
    name             TEXT NOT NULL,
    devices_json     TEXT NOT NULL CHECK (json_valid(devices_json)),
    protocol_version INTEGER NOT NULL,
    registered_at    TEXT NOT NULL,
    last_seen_at     TEXT NOT NULL,
    CONSTRAINT workers_pkey PRIMARY KEY (id)
) STRICT;

-- One lease of a trial by a worker, fenced by lease_token.
CREATE TABLE attempts (
    id                         TEXT NOT NULL,
    trial_id                   TEXT NOT NULL,
    worker_id                  TEXT NOT NULL,
    lease_token                TEXT NOT NULL,
    state                      TEXT NOT NULL,
    leased_at                  TEXT NOT NULL,
    heartbeat_at               TEXT NOT NULL,
    lease_expires_at           TEXT NOT NULL,
    progress_epoch             INTEGER,
    progress_step              INTEGER,
    progress_loss              REAL,
    progress_top1              REAL,
    progress_images_per_second REAL,
    failure_class              TEXT,
    failure_message            TEXT,
    finished_at                TEXT,
    CONSTRAINT attempts_pkey PRIMARY KEY (id),
    CONSTRAINT attempts_trial_fkey FOREIGN KEY (trial_id) REFERENCES trials (id),
    CONSTRAINT attempts_worker_fkey FOREIGN KEY (worker_id) REFERENCES workers (id),
    CONSTRAINT attempts_state_check
        CHECK (state IN ('running', 'succeeded', 'failed', 'expired', 'cancelled')),
    CONSTRAINT attempts_failure_class_check
        CHECK (failure_class IN ('deterministic', 'retryable', 'lost'))
) STRICT;
CREATE INDEX attempts_trial ON attempts (trial_id, leased_at);
-- The reaper's scan and the start-up grace period.
CREATE INDEX attempts_running_expiry ON attempts (lease_expires_at) WHERE state = 'running';
-- A trial never has two live leases.
CREATE UNIQUE INDEX attempts_one_running ON attempts (trial_id) WHERE state = 'running';

-- Metrics of each finished epoch, per attempt.
CREATE TABLE epoch_metrics (
    attempt_id        TEXT NOT NULL,
    epoch             INTEGER NOT NULL,
    trial_id          TEXT NOT NULL,
    train_loss        REAL NOT NULL,
    test_loss         REAL NOT NULL,
    top1              REAL NOT NULL,
    top5              REAL NOT NULL,
    images_per_second REAL NOT NULL,
    learning_rate     REAL NOT NULL,
    recorded_at       TEXT NOT NULL,
    CONSTRAINT epoch_metrics_pkey PRIMARY KEY (attempt_id, epoch),
    CONSTRAINT epoch_metrics_attempt_fkey FOREIGN KEY (attempt_id) REFERENCES attempts (id),
    CONSTRAINT epoch_metrics_trial_fkey FOREIGN KEY (trial_id) REFERENCES trials (id)
) STRICT;
CREATE INDEX epoch_metrics_trial ON epoch_metrics (trial_id);

-- The final metrics of a trial: at most one, from the attempt that held the lease.
CREATE TABLE results (
    trial_id      TEXT NOT NULL,
    attempt_id    TEXT NOT NULL,
    top1          REAL NOT NULL,
    top5          REAL NOT NULL,
    test_loss     REAL NOT NULL,
    train_seconds REAL NOT NULL,
    epochs        INTEGER NOT NULL,
    dataset_hash  TEXT NOT NULL,
    checkpoint    TEXT,
    finished_at   TEXT NOT NULL,
    CONSTRAINT results_pkey PRIMARY KEY (trial_id),
    CONSTRAINT results_attempt_key UNIQUE (attempt_id),
    CONSTRAINT results_trial_fkey FOREIGN KEY (trial_id) REFERENCES trials (id),
    CONSTRAINT results_attempt_fkey FOREIGN KEY (attempt_id) REFERENCES attempts (id)
) STRICT;

-- Reports from attempts that no longer held the lease: kept, never counted.
CREATE TABLE late_results (
    attempt_id    TEXT NOT NULL,
    trial_id      TEXT NOT NULL,
    top1          REAL NOT NULL,
    top5          REAL NOT NULL,
    test_loss     REAL NOT NULL,
    train_seconds REAL NOT NULL,
    epochs        INTEGER NOT NULL,
    dataset_hash  TEXT NOT NULL,
    checkpoint    TEXT,
    received_at   TEXT NOT NULL,
    CONSTRAINT late_results_pkey PRIMARY KEY (attempt_id),
    CONSTRAINT late_results_attempt_fkey FOREIGN KEY (attempt_id) REFERENCES attempts (id),
    CONSTRAINT late_results_trial_fkey FOREIGN KEY (trial_id) REFERENCES trials (id)
) STRICT;
CREATE INDEX late_results_trial ON late_results (trial_id);

-- Running aggregates of results per (design, dataset, recipe), updated in the same
-- transaction as each result (Welford's update: top1_m2 is the sum of squared deviations from
-- top1_mean, so the population variance is top1_m2 / seeds), so the cross-sweep leaderboard
-- reads its top rows off an index instead of grouping every result. Results are never
-- deleted, so the aggregates only grow.
CREATE TABLE design_scores (
    design_id   TEXT NOT NULL,
    dataset     TEXT NOT NULL,
    recipe_hash TEXT NOT NULL,
    seeds       INTEGER NOT NULL,
    top1_mean   REAL NOT NULL,
    top1_m2     REAL NOT NULL,
    top5_mean   REAL NOT NULL,
    updated_at  TEXT NOT NULL,
    CONSTRAINT design_scores_pkey PRIMARY KEY (design_id, dataset, recipe_hash),
    CONSTRAINT design_scores_design_fkey FOREIGN KEY (design_id) REFERENCES designs (id)
) STRICT;
CREATE INDEX design_scores_rank
    ON design_scores (top1_mean DESC, design_id, dataset, recipe_hash);
CREATE INDEX design_scores_dataset_rank
    ON design_scores (dataset, top1_mean DESC, design_id, recipe_hash);
