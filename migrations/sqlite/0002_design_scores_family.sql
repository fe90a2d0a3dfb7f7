-- The leaderboard's block-family filter read design_scores joined to designs and had to scan
-- every aggregate. The family is copied into the aggregate row and indexed next to the rank.
-- A design's family never changes, so the copy cannot go stale. (SQLite cannot add a NOT NULL
-- column without a default; every insert sets it.)
ALTER TABLE design_scores ADD COLUMN family TEXT NOT NULL DEFAULT '';
UPDATE design_scores
    SET family = (SELECT d.family FROM designs d WHERE d.id = design_scores.design_id);
CREATE INDEX design_scores_family_rank
    ON design_scores (family, top1_mean DESC, design_id, dataset, recipe_hash);
