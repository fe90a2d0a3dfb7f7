-- deepmad's schema on PostgreSQL. docs/schema.md describes every table, column and index.
-- migrations/sqlite/0001_initial.sql is the same logical schema. Never edit a migration once
-- it has landed: add the next one.

-- A solved or imported architecture. Its id is the SHA-256 (hex) of architecture_json.
CREATE TABLE designs (
    id                text NOT NULL,
    family            text NOT NULL,
    objective_kind    text NOT NULL,
    -- json, not jsonb: json keeps the canonical bytes whose hash is the id.
    architecture_json json NOT NULL,
    params            bigint NOT NULL,
    flops             bigint NOT NULL,
    layers            integer NOT NULL,
    effectiveness     double precision NOT NULL,
    entropy           double precision NOT NULL,
    penalty           double precision NOT NULL,
    objective         double precision NOT NULL,
    resolution        integer NOT NULL,
    num_classes       integer NOT NULL,
    solver_version    text NOT NULL,
    created_at        timestamptz NOT NULL,
    CONSTRAINT designs_pkey PRIMARY KEY (id)
);

-- A user's request: a grid of solver problems, a recipe, a dataset and seeds.
CREATE TABLE sweeps (
    id                uuid NOT NULL,
    name              text NOT NULL,
    state             text NOT NULL,
    created_by        text NOT NULL,
    created_at        timestamptz NOT NULL,
    finished_at       timestamptz,
    spec_json         jsonb NOT NULL,
    dataset           text NOT NULL,
    recipe_json       json NOT NULL,
    recipe_hash       text NOT NULL,
    seeds_json        jsonb NOT NULL,
    max_attempts      integer NOT NULL,
    grid_points       integer NOT NULL,
    infeasible_points integer NOT NULL,
    distinct_designs  integer NOT NULL,
    CONSTRAINT sweeps_pkey PRIMARY KEY (id),
    CONSTRAINT sweeps_state_check CHECK (state IN ('active', 'cancelled', 'completed')),
    CONSTRAINT sweeps_max_attempts_check CHECK (max_attempts >= 1)
);
CREATE INDEX sweeps_newest ON sweeps (created_at DESC, id DESC);

-- One solver problem of a sweep and its outcome (a design, or why it was infeasible).
CREATE TABLE grid_points (
    sweep_id          uuid NOT NULL,
    point_index       integer NOT NULL,
    family            text NOT NULL,
    objective_kind    text NOT NULL,
    rho               double precision NOT NULL,
    alpha_json        jsonb NOT NULL,
    beta              double precision NOT NULL,
    params_budget     bigint,
    flops_budget      bigint,
    resolution        integer NOT NULL,
    design_id         text,
    infeasible_reason text,
    solve_ms          double precision NOT NULL,
    CONSTRAINT grid_points_pkey PRIMARY KEY (sweep_id, point_index),
    CONSTRAINT grid_points_sweep_fkey FOREIGN KEY (sweep_id) REFERENCES sweeps (id),
    CONSTRAINT grid_points_design_fkey FOREIGN KEY (design_id) REFERENCES designs (id)
);
-- The leaderboard's rho: the smallest rho of the points that produced a design.
CREATE INDEX grid_points_design_rho ON grid_points (design_id, rho);

-- (design, recipe, dataset, seed) to train; unique on that key, so results are reused.
CREATE TABLE trials (
    id               uuid NOT NULL,
    design_id        text NOT NULL,
    recipe_hash      text NOT NULL,
    dataset          text NOT NULL,
    seed             bigint NOT NULL,
    recipe_json      json NOT NULL,
    state            text NOT NULL,
    -- Deterministic failures allowed (from the sweep that created the trial).
    max_attempts     integer NOT NULL,
    counted_failures integer NOT NULL,
    requeues         integer NOT NULL,
    -- How many linked sweeps are active: only trials with active_sweeps > 0 are leased.
    active_sweeps    integer NOT NULL,
    not_before       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    CONSTRAINT trials_pkey PRIMARY KEY (id),
    CONSTRAINT trials_key UNIQUE (design_id, recipe_hash, dataset, seed),
    CONSTRAINT trials_design_fkey FOREIGN KEY (design_id) REFERENCES designs (id),
    CONSTRAINT trials_state_check
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'dead')),
    CONSTRAINT trials_active_sweeps_check CHECK (active_sweeps >= 0)
);
-- The work queue: claim walks it oldest first and skips locked rows.
CREATE INDEX trials_queue ON trials (created_at, id)
    WHERE state = 'queued' AND active_sweeps > 0;

CREATE TABLE sweep_trials (
    sweep_id uuid NOT NULL,
    trial_id uuid NOT NULL,
    CONSTRAINT sweep_trials_pkey PRIMARY KEY (sweep_id, trial_id),
    CONSTRAINT sweep_trials_sweep_fkey FOREIGN KEY (sweep_id) REFERENCES sweeps (id),
    CONSTRAINT sweep_trials_trial_fkey FOREIGN KEY (trial_id) REFERENCES trials (id)
);
CREATE INDEX sweep_trials_trial ON sweep_trials (trial_id);

-- One row per worker process incarnation.
CREATE TABLE workers (
    id               uuid NOT NULL,
    name             text NOT NULL,
    devices_json     jsonb NOT NULL,
    protocol_version integer NOT NULL,
    registered_at    timestamptz NOT NULL,
    last_seen_at     timestamptz NOT NULL,
    CONSTRAINT workers_pkey PRIMARY KEY (id)
);

-- One lease of a trial by a worker, fenced by lease_token.
CREATE TABLE attempts (
    id                         uuid NOT NULL,
    trial_id                   uuid NOT NULL,
    worker_id                  uuid NOT NULL,
    lease_token                uuid NOT NULL,
    state                      text NOT NULL,
    leased_at                  timestamptz NOT NULL,
    heartbeat_at               timestamptz NOT NULL,
    lease_expires_at           timestamptz NOT NULL,
    progress_epoch             integer,
    progress_step              bigint,
    progress_loss              double precision,
    progress_top1              double precision,
    progress_images_per_second double precision,
    failure_class              text,
    failure_message            text,
    finished_at                timestamptz,
    CONSTRAINT attempts_pkey PRIMARY KEY (id),
    CONSTRAINT attempts_trial_fkey FOREIGN KEY (trial_id) REFERENCES trials (id),
    CONSTRAINT attempts_worker_fkey FOREIGN KEY (worker_id) REFERENCES workers (id),
    CONSTRAINT attempts_state_check
        CHECK (state IN ('running', 'succeeded', 'failed', 'expired', 'cancelled')),
    CONSTRAINT attempts_failure_class_check
        CHECK (failure_class IN ('deterministic', 'retryable', 'lost'))
);
CREATE INDEX attempts_trial ON attempts (trial_id, leased_at);
-- The reaper's scan and the start-up grace period.
CREATE INDEX attempts_running_expiry ON attempts (lease_expires_at) WHERE state = 'running';
-- A trial never has two live leases.
CREATE UNIQUE INDEX attempts_one_running ON attempts (trial_id) WHERE state = 'running';

-- Metrics of each finished epoch, per attempt.
CREATE TABLE epoch_metrics (
    attempt_id        uuid NOT NULL,
    epoch             integer NOT NULL,
    trial_id          uuid NOT NULL,
    train_loss        double precision NOT NULL,
    test_loss         double precision NOT NULL,
    top1              double precision NOT NULL,
    top5              double precision NOT NULL,
    images_per_second double precision NOT NULL,
    learning_rate     double precision NOT NULL,
    recorded_at       timestamptz NOT NULL,
    CONSTRAINT epoch_metrics_pkey PRIMARY KEY (attempt_id, epoch),
    CONSTRAINT epoch_metrics_attempt_fkey FOREIGN KEY (attempt_id) REFERENCES attempts (id),
    CONSTRAINT epoch_metrics_trial_fkey FOREIGN KEY (trial_id) REFERENCES trials (id)
);
CREATE INDEX epoch_metrics_trial ON epoch_metrics (trial_id);

-- The final metrics of a trial: at most one, from the attempt that held the lease.
CREATE TABLE results (
    trial_id      uuid NOT NULL,
    attempt_id    uuid NOT NULL,
    top1          double precision NOT NULL,
    top5          double precision NOT NULL,
    test_loss     double precision NOT NULL,
    train_seconds double precision NOT NULL,
    epochs        integer NOT NULL,
    dataset_hash  text NOT NULL,
    checkpoint    text,
    finished_at   timestamptz NOT NULL,
    CONSTRAINT results_pkey PRIMARY KEY (trial_id),
    CONSTRAINT results_attempt_key UNIQUE (attempt_id),
    CONSTRAINT results_trial_fkey FOREIGN KEY (trial_id) REFERENCES trials (id),
    CONSTRAINT results_attempt_fkey FOREIGN KEY (attempt_id) REFERENCES attempts (id)
);

-- Reports from attempts that no longer held the lease: kept, never counted.
CREATE TABLE late_results (
    attempt_id    uuid NOT NULL,
    trial_id      uuid NOT NULL,
    top1          double precision NOT NULL,
    top5          double precision NOT NULL,
    test_loss     double precision NOT NULL,
    train_seconds double precision NOT NULL,
    epochs        integer NOT NULL,
    dataset_hash  text NOT NULL,
    checkpoint    text,
    received_at   timestamptz NOT NULL,
    CONSTRAINT late_results_pkey PRIMARY KEY (attempt_id),
    CONSTRAINT late_results_attempt_fkey FOREIGN KEY (attempt_id) REFERENCES attempts (id),
    CONSTRAINT late_results_trial_fkey FOREIGN KEY (trial_id) REFERENCES trials (id)
);
CREATE INDEX late_results_trial ON late_results (trial_id);

-- Running aggregates of results per (design, dataset, recipe), updated in the same
-- transaction as each result (Welford's update: top1_m2 is the sum of squared deviations from
-- top1_mean, so the population variance is top1_m2 / seeds), so the cross-sweep leaderboard
-- reads its top rows off an index instead of grouping every result. Results are never
-- deleted, so the aggregates only grow.
CREATE TABLE design_scores (
    design_id   text NOT NULL,
    dataset     text NOT NULL,
    recipe_hash text NOT NULL,
    seeds       integer NOT NULL,
    top1_mean   double precision NOT NULL,
    top1_m2     double precision NOT NULL,
    top5_mean   double precision NOT NULL,
    updated_at  timestamptz NOT NULL,
    CONSTRAINT design_scores_pkey PRIMARY KEY (design_id, dataset, recipe_hash),
    CONSTRAINT design_scores_design_fkey FOREIGN KEY (design_id) REFERENCES designs (id)
);
CREATE INDEX design_scores_rank
    ON design_scores (top1_mean DESC, design_id, dataset, recipe_hash);
CREATE INDEX design_scores_dataset_rank
    ON design_scores (dataset, top1_mean DESC, design_id, recipe_hash);
