-- Per-sweep running aggregates, so a sweep's leaderboard is an index read like the
-- cross-sweep one (see migrations/postgres/0003_sweep_scores.sql). Written in the completion
-- transaction and, for the results a new sweep reuses, at sweep creation; SQLite's single
-- writer serialises the two.
CREATE TABLE sweep_scores (
    sweep_id    TEXT NOT NULL,
    design_id   TEXT NOT NULL,
    dataset     TEXT NOT NULL,
    recipe_hash TEXT NOT NULL,
    family      TEXT NOT NULL,
    seeds       INTEGER NOT NULL,
    top1_mean   REAL NOT NULL,
    top1_m2     REAL NOT NULL,
    top5_mean   REAL NOT NULL,
    updated_at  TEXT NOT NULL,
    CONSTRAINT sweep_scores_pkey PRIMARY KEY (sweep_id, design_id, dataset, recipe_hash),
    CONSTRAINT sweep_scores_sweep_fkey FOREIGN KEY (sweep_id) REFERENCES sweeps (id),
    CONSTRAINT sweep_scores_design_fkey FOREIGN KEY (design_id) REFERENCES designs (id)
) STRICT;
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
    sum((r.top1 - g.top1_mean) * (r.top1 - g.top1_mean)), g.top5_mean,
    strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
FROM groups g
    JOIN sweep_results r ON r.sweep_id = g.sweep_id AND r.design_id = g.design_id
        AND r.dataset = g.dataset AND r.recipe_hash = g.recipe_hash
    JOIN designs d ON d.id = g.design_id
GROUP BY g.sweep_id, g.design_id, g.dataset, g.recipe_hash, d.family, g.seeds, g.top1_mean,
    g.top5_mean;
