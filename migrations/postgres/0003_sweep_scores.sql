-- Per-sweep running aggregates, so a sweep's leaderboard is an index read like the
-- cross-sweep one (it grouped the sweep's results at query time: 200 ms for a 10,000-result
-- sweep among 1,000,000 results). One row per (sweep, design, dataset, recipe) with results;
-- Welford's update as in design_scores (top1_m2 / seeds is the population variance over the
-- sweep's seeds). Written by deepmad_complete (below) and, for the results a new sweep reuses,
-- at sweep creation. Results are never deleted, so the rows only grow.
CREATE TABLE sweep_scores (
    sweep_id    uuid NOT NULL,
    design_id   text NOT NULL,
    dataset     text NOT NULL,
    recipe_hash text NOT NULL,
    family      text NOT NULL,
    seeds       integer NOT NULL,
    top1_mean   double precision NOT NULL,
    top1_m2     double precision NOT NULL,
    top5_mean   double precision NOT NULL,
    updated_at  timestamptz NOT NULL,
    CONSTRAINT sweep_scores_pkey PRIMARY KEY (sweep_id, design_id, dataset, recipe_hash),
    CONSTRAINT sweep_scores_sweep_fkey FOREIGN KEY (sweep_id) REFERENCES sweeps (id),
    CONSTRAINT sweep_scores_design_fkey FOREIGN KEY (design_id) REFERENCES designs (id)
);
CREATE INDEX sweep_scores_rank
    ON sweep_scores (sweep_id, top1_mean DESC, design_id, dataset, recipe_hash);

-- The results already stored (two passes: exact squared deviations from each group's mean).
WITH sweep_results AS (
    SELECT st.sweep_id, t.design_id, t.dataset, t.recipe_hash, r.top1, r.top5
    FROM sweep_trials st
        JOIN trials t ON t.id = st.trial_id
        JOIN results r ON r.trial_id = t.id),
groups AS (
    SELECT sweep_id, design_id, dataset, recipe_hash, count(*) AS seeds,
        avg(top1) AS top1_mean, avg(top5) AS top5_mean
    FROM sweep_results GROUP BY sweep_id, design_id, dataset, recipe_hash)
INSERT INTO sweep_scores (sweep_id, design_id, dataset, recipe_hash, family, seeds, top1_mean,
    top1_m2, top5_mean, updated_at)
SELECT g.sweep_id, g.design_id, g.dataset, g.recipe_hash, d.family, g.seeds, g.top1_mean,
    sum((r.top1 - g.top1_mean) * (r.top1 - g.top1_mean)), g.top5_mean, now()
FROM groups g
    JOIN sweep_results r ON r.sweep_id = g.sweep_id AND r.design_id = g.design_id
        AND r.dataset = g.dataset AND r.recipe_hash = g.recipe_hash
    JOIN designs d ON d.id = g.design_id
GROUP BY g.sweep_id, g.design_id, g.dataset, g.recipe_hash, d.family, g.seeds, g.top1_mean,
    g.top5_mean;

-- Completion, in one call (one round trip). The first statement locks the trial and attempt
-- rows (FOR UPDATE OF t, a: a row that changed while it waited is read at its new version),
-- decides the outcome on them (forged, duplicate, recorded or late) and writes what that
-- outcome writes. The second runs only for a recorded result and adds it to the aggregates of
-- every sweep that holds the trial. It is a separate statement on purpose: it takes a fresh
-- snapshot after the first one holds the trial's lock, so it sees the links of a sweep created
-- while the first waited (sweep creation locks the trials it links), and a sweep created after
-- this commit computes its aggregates from the stored result instead. Returns NULL for an
-- unknown attempt.
CREATE FUNCTION deepmad_complete(
    uuid, uuid, timestamptz, double precision, double precision, double precision,
    double precision, integer, text, text, integer[], double precision[], double precision[],
    double precision[], double precision[], double precision[], double precision[])
RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    v_outcome text;
    v_trial uuid;
BEGIN
    WITH locked AS (
        SELECT t.id, t.design_id, t.dataset, t.recipe_hash,
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
        WHERE locked.outcome = 'recorded'
        ON CONFLICT ON CONSTRAINT design_scores_pkey DO UPDATE SET
            seeds = s.seeds + 1,
            top1_mean = s.top1_mean + ($4 - s.top1_mean) / (s.seeds + 1),
            top1_m2 = s.top1_m2 + ($4 - s.top1_mean)
                * ($4 - (s.top1_mean + ($4 - s.top1_mean) / (s.seeds + 1))),
            top5_mean = s.top5_mean + ($5 - s.top5_mean) / (s.seeds + 1),
            updated_at = $3)
    SELECT locked.outcome, locked.id INTO v_outcome, v_trial FROM locked;
    IF v_outcome = 'recorded' THEN
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
    END IF;
    RETURN v_outcome;
END
$fn$;
