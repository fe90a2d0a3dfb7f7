-- The leaderboard's block-family filter read design_scores joined to designs and had to scan
-- every aggregate (55 ms p99 over a million results). The family is copied into the
-- aggregate row and indexed next to the rank, so the filtered top-N is an index read too.
-- A design's family never changes, so the copy cannot go stale.
ALTER TABLE design_scores ADD COLUMN family text;
UPDATE design_scores s SET family = d.family FROM designs d WHERE d.id = s.design_id;
ALTER TABLE design_scores ALTER COLUMN family SET NOT NULL;
CREATE INDEX design_scores_family_rank
    ON design_scores (family, top1_mean DESC, design_id, dataset, recipe_hash);
