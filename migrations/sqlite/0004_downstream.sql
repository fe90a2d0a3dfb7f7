-- Downstream evaluations: the same logical schema as migrations/postgres/0004_downstream.sql
-- (see there and docs/schema.md). The queueing that PostgreSQL does in
-- deepmad_queue_downstream is Rust code here (store/sqlite/downstream.rs), inside the
-- completion's write transaction.

CREATE TABLE sweep_tasks (
    sweep_id    TEXT NOT NULL,
    task_index  INTEGER NOT NULL,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    dataset     TEXT NOT NULL,
    recipe_json TEXT NOT NULL CHECK (json_valid(recipe_json)),
    task_hash   TEXT NOT NULL,
    CONSTRAINT sweep_tasks_pkey PRIMARY KEY (sweep_id, task_index),
    CONSTRAINT sweep_tasks_name_key UNIQUE (sweep_id, name),
    CONSTRAINT sweep_tasks_sweep_fkey FOREIGN KEY (sweep_id) REFERENCES sweeps (id),
    CONSTRAINT sweep_tasks_kind_check CHECK (kind IN ('linear-probe', 'finetune'))
) STRICT;

-- SQLite adds one column per statement, and a column's constraints must name only itself.
ALTER TABLE trials ADD COLUMN task TEXT NOT NULL DEFAULT 'train'
    CONSTRAINT trials_task_check CHECK (task IN ('train', 'linear-probe', 'finetune'));
ALTER TABLE trials ADD COLUMN task_hash TEXT;
ALTER TABLE trials ADD COLUMN parent_trial_id TEXT
    CONSTRAINT trials_parent_fkey REFERENCES trials (id);
CREATE INDEX trials_parent ON trials (parent_trial_id, task_hash)
    WHERE parent_trial_id IS NOT NULL;
