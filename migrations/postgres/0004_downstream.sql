-- Downstream evaluations (docs/schema.md, "Downstream evaluations"). A sweep may name tasks
-- (a linear probe or a fine-tune on another dataset); when one of its training trials
-- succeeds, each task becomes a trial of its own, leased, fenced and retried like any other:
-- task says what it runs, parent_trial_id whose trained weights it starts from, task_hash
-- which task of the sweep it is. Its recipe_hash is SHA-256(task_hash || ':' || parent id),
-- so trials_key stays the identity of a job and a second sweep with the same task on the
-- same trained backbone reuses the result.

-- The downstream tasks of a sweep, in the order the user gave them.
CREATE TABLE sweep_tasks (
    sweep_id    uuid NOT NULL,
    task_index  integer NOT NULL,
    name        text NOT NULL,
    kind        text NOT NULL,
    dataset     text NOT NULL,
    recipe_json json NOT NULL,
    -- SHA-256 of the canonical {kind, dataset, recipe} JSON.
    task_hash   text NOT NULL,
    CONSTRAINT sweep_tasks_pkey PRIMARY KEY (sweep_id, task_index),
    CONSTRAINT sweep_tasks_name_key UNIQUE (sweep_id, name),
    CONSTRAINT sweep_tasks_sweep_fkey FOREIGN KEY (sweep_id) REFERENCES sweeps (id),
    CONSTRAINT sweep_tasks_kind_check CHECK (kind IN ('linear-probe', 'finetune'))
);

ALTER TABLE trials
    ADD COLUMN task text NOT NULL DEFAULT 'train',
    ADD COLUMN task_hash text,
    ADD COLUMN parent_trial_id uuid,
    ADD CONSTRAINT trials_task_check CHECK (task IN ('train', 'linear-probe', 'finetune')),
    ADD CONSTRAINT trials_parent_fkey FOREIGN KEY (parent_trial_id) REFERENCES trials (id),
    ADD CONSTRAINT trials_downstream_check
        CHECK ((task = 'train') = (parent_trial_id IS NULL AND task_hash IS NULL));
CREATE INDEX trials_parent ON trials (parent_trial_id, task_hash)
    WHERE parent_trial_id IS NOT NULL;

-- Queues the downstream trials of succeeded training trials `p_parents`: one per (parent,
-- task of an active sweep holding the parent), restricted to sweep `p_sweep` unless it is
-- NULL. An existing trial with the same key is linked instead. Every downstream trial of the
-- parents then gets its active_sweeps recounted. Returns the number of new links.
CREATE FUNCTION deepmad_queue_downstream(p_parents uuid[], p_sweep uuid, p_now timestamptz)
RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
    v_links integer;
BEGIN
    INSERT INTO trials (id, design_id, recipe_hash, dataset, seed, recipe_json, state,
        max_attempts, counted_failures, requeues, active_sweeps, not_before, created_at,
        updated_at, task, task_hash, parent_trial_id)
    SELECT gen_random_uuid(), w.design_id,
        encode(sha256(convert_to(w.task_hash || ':' || w.parent_id::text, 'UTF8')), 'hex'),
        w.dataset, w.seed, w.recipe_text::json, 'queued', w.max_attempts, 0, 0, 0, p_now,
        p_now, p_now, w.kind, w.task_hash, w.parent_id
    FROM (
        SELECT DISTINCT ON (p.id, k.task_hash) p.id AS parent_id, p.design_id, p.seed,
            k.kind, k.dataset, k.recipe_json::text AS recipe_text, k.task_hash,
            s.max_attempts
        FROM trials p
            JOIN sweep_trials st ON st.trial_id = p.id
            JOIN sweeps s ON s.id = st.sweep_id AND s.state = 'active'
            JOIN sweep_tasks k ON k.sweep_id = st.sweep_id
        WHERE p.id = ANY(p_parents) AND p.state = 'succeeded' AND p.task = 'train'
            AND (p_sweep IS NULL OR st.sweep_id = p_sweep)
        ORDER BY p.id, k.task_hash, s.max_attempts DESC) AS w
    ON CONFLICT ON CONSTRAINT trials_key DO NOTHING;

    INSERT INTO sweep_trials (sweep_id, trial_id)
    SELECT st.sweep_id, d.id
    FROM trials p
        JOIN sweep_trials st ON st.trial_id = p.id
        JOIN sweeps s ON s.id = st.sweep_id AND s.state = 'active'
        JOIN sweep_tasks k ON k.sweep_id = st.sweep_id
        JOIN trials d ON d.parent_trial_id = p.id AND d.task_hash = k.task_hash
    WHERE p.id = ANY(p_parents) AND p.state = 'succeeded' AND p.task = 'train'
        AND (p_sweep IS NULL OR st.sweep_id = p_sweep)
    ON CONFLICT ON CONSTRAINT sweep_trials_pkey DO NOTHING;
    GET DIAGNOSTICS v_links = ROW_COUNT;

    UPDATE trials d SET active_sweeps = (
        SELECT count(*) FROM sweep_trials st JOIN sweeps s ON s.id = st.sweep_id
        WHERE st.trial_id = d.id AND s.state = 'active')
    WHERE d.parent_trial_id = ANY(p_parents);
    RETURN v_links;
END
$fn$;

-- Completion as in 0003, with two changes:
-- * only training trials feed design_scores and sweep_scores (a downstream result is read
--   per (trial, task), see the leaderboard's downstream columns);
-- * a recorded training result of a trial held by a sweep with tasks queues its downstream
--   trials. Queueing must not interleave with a sweep being created, cancelled, retried or
--   finished (a cancel could miss a link it did not see yet), so it holds the sweep-level
--   advisory lock in shared mode (completions do not wait for each other). Those changes
--   take it exclusively and before any trial row, while this function already holds the
--   trial's row: waiting here could deadlock, so it only *tries* the lock, and when a
--   sweep-level change holds it, fails with serialization_failure (40001); the store
--   retries the whole call, which committed nothing. Trials of sweeps without tasks take no
--   lock at all.
CREATE OR REPLACE FUNCTION deepmad_complete(
    uuid, uuid, timestamptz, double precision, double precision, double precision,
    double precision, integer, text, text, integer[], double precision[], double precision[],
    double precision[], double precision[], double precision[], double precision[])
RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    v_outcome text;
    v_trial uuid;
    v_task text;
BEGIN
    WITH locked AS (
        SELECT t.id, t.design_id, t.dataset, t.recipe_hash, t.task,
            CASE WHEN a.lease_token <> $2 THEN 'forged'
                WHEN a.state = 'succeeded' THEN 'duplicate'
                WHEN a.state = 'running' AND $3 <= a.lease_expires_at
                    AND t.state = 'running' THEN 'recorded'
                ELSE 'late' END AS outcome
        FROM trials t JOIN attempts a ON a.trial_id = t.id
        WHERE a.id = $1
        FOR UPDATE OF t, a),
    epochs AS (
        INSERT INTO epoch_metrics (attempt_id, epoch, trial_id, train_loss, test_loss,
            top1, top5, images_per_second, learning_rate, recorded_at)
        SELECT $1, e.epoch, locked.id, e.train_loss, e.test_loss, e.top1, e.top5,
            e.images_per_second, e.learning_rate, $3
        FROM locked, UNNEST($11::integer[], $12::float8[], $13::float8[],
            $14::float8[], $15::float8[], $16::float8[], $17::float8[])
            AS e(epoch, train_loss, test_loss, top1, top5, images_per_second,
                learning_rate)
        WHERE locked.outcome IN ('recorded', 'late')
        ON CONFLICT ON CONSTRAINT epoch_metrics_pkey DO UPDATE SET
            train_loss = EXCLUDED.train_loss, test_loss = EXCLUDED.test_loss,
            top1 = EXCLUDED.top1, top5 = EXCLUDED.top5,
            images_per_second = EXCLUDED.images_per_second,
            learning_rate = EXCLUDED.learning_rate, recorded_at = EXCLUDED.recorded_at),
    result AS (
        INSERT INTO results (trial_id, attempt_id, top1, top5, test_loss,
            train_seconds, epochs, dataset_hash, checkpoint, finished_at)
        SELECT locked.id, $1, $4, $5, $6, $7, $8, $9, $10, $3 FROM locked
        WHERE locked.outcome = 'recorded'),
    trial AS (
        UPDATE trials t SET state = 'succeeded', updated_at = $3 FROM locked
        WHERE t.id = locked.id AND locked.outcome = 'recorded'),
    attempt AS (
        UPDATE attempts a SET state = 'succeeded', finished_at = $3 FROM locked
        WHERE a.id = $1 AND locked.outcome = 'recorded'),
    late AS (
        INSERT INTO late_results (attempt_id, trial_id, top1, top5, test_loss,
            train_seconds, epochs, dataset_hash, checkpoint, received_at)
        SELECT $1, locked.id, $4, $5, $6, $7, $8, $9, $10, $3 FROM locked
        WHERE locked.outcome = 'late'
        ON CONFLICT ON CONSTRAINT late_results_pkey DO NOTHING),
    score AS (
        INSERT INTO design_scores AS s (design_id, dataset, recipe_hash, seeds,
            top1_mean, top1_m2, top5_mean, updated_at, family)
        SELECT locked.design_id, locked.dataset, locked.recipe_hash, 1, $4, 0, $5,
            $3, d.family
        FROM locked JOIN designs d ON d.id = locked.design_id
        WHERE locked.outcome = 'recorded' AND locked.task = 'train'
        ON CONFLICT ON CONSTRAINT design_scores_pkey DO UPDATE SET
            seeds = s.seeds + 1,
            top1_mean = s.top1_mean + ($4 - s.top1_mean) / (s.seeds + 1),
            top1_m2 = s.top1_m2 + ($4 - s.top1_mean)
                * ($4 - (s.top1_mean + ($4 - s.top1_mean) / (s.seeds + 1))),
            top5_mean = s.top5_mean + ($5 - s.top5_mean) / (s.seeds + 1),
            updated_at = $3)
    SELECT locked.outcome, locked.id, locked.task INTO v_outcome, v_trial, v_task FROM locked;
    IF v_outcome = 'recorded' AND v_task = 'train' THEN
        INSERT INTO sweep_scores AS s (sweep_id, design_id, dataset, recipe_hash, family, seeds,
            top1_mean, top1_m2, top5_mean, updated_at)
        SELECT st.sweep_id, t.design_id, t.dataset, t.recipe_hash, d.family, 1, $4, 0, $5, $3
        FROM sweep_trials st
            JOIN trials t ON t.id = st.trial_id
            JOIN designs d ON d.id = t.design_id
        WHERE st.trial_id = v_trial
        ON CONFLICT ON CONSTRAINT sweep_scores_pkey DO UPDATE SET
            seeds = s.seeds + 1,
            top1_mean = s.top1_mean + ($4 - s.top1_mean) / (s.seeds + 1),
            top1_m2 = s.top1_m2 + ($4 - s.top1_mean)
                * ($4 - (s.top1_mean + ($4 - s.top1_mean) / (s.seeds + 1))),
            top5_mean = s.top5_mean + ($5 - s.top5_mean) / (s.seeds + 1),
            updated_at = $3;
        IF EXISTS (SELECT 1 FROM sweep_trials st JOIN sweep_tasks k ON k.sweep_id = st.sweep_id
                WHERE st.trial_id = v_trial) THEN
            -- The key is pg.rs's SWEEPS_LOCK ("deepmad" as a number).
            IF NOT pg_try_advisory_xact_lock_shared(28258984023384420) THEN
                RAISE EXCEPTION 'a sweep-level change holds the sweep lock: retry the completion'
                    USING ERRCODE = 'serialization_failure';
            END IF;
            PERFORM deepmad_queue_downstream(ARRAY[v_trial], NULL, $3);
        END IF;
    END IF;
    RETURN v_outcome;
END
$fn$;
