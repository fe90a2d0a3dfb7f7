-- The lease hot path runs on generic plans.
--
-- A prepared statement's first executions are planned for their parameter values ("custom"
-- plans); PostgreSQL keeps planning every execution afresh while a custom plan looks cheaper
-- than the generic one, which for the claim's five-way CTE and the completion's statements
-- it always does. Their plans do not depend on the values (primary keys, the queue index), so
-- that planning is pure cost: it was the largest single item in a profile of the saturated
-- store benchmark. The setting is per function, so the leaderboards and every other query
-- keep PostgreSQL's default.

ALTER FUNCTION deepmad_complete(
    uuid, uuid, timestamptz, double precision, double precision, double precision,
    double precision, integer, text, text, integer[], double precision[], double precision[],
    double precision[], double precision[], double precision[], double precision[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION deepmad_queue_downstream(uuid[], uuid, timestamptz)
    SET plan_cache_mode = force_generic_plan;

-- The claim as one call (the statement PgStore::claim used to send): touch the worker, pick
-- the oldest ready trial skipping rows other claims hold, mark it running, insert the attempt.
-- No row back means an unknown worker; a row with a null trial_id, no work.
CREATE FUNCTION deepmad_claim(p_worker uuid, p_now timestamptz, p_attempt uuid, p_token uuid,
    p_expires timestamptz)
RETURNS TABLE (trial_id uuid, design_id text, architecture_json text, recipe_json text,
    dataset text, seed bigint, task text, parent_trial_id uuid, upload_weights boolean)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH worker AS (
        UPDATE workers SET last_seen_at = p_now WHERE id = p_worker RETURNING id),
    candidate AS (
        SELECT t.id FROM trials t
        WHERE t.state = 'queued' AND t.active_sweeps > 0 AND t.not_before <= p_now
            AND EXISTS (SELECT 1 FROM worker)
        ORDER BY t.created_at, t.id LIMIT 1
        FOR UPDATE OF t SKIP LOCKED),
    leased AS (
        UPDATE trials t SET state = 'running', updated_at = p_now
        FROM candidate WHERE t.id = candidate.id
        RETURNING t.id, t.design_id, t.recipe_json, t.dataset, t.seed, t.task,
            t.parent_trial_id),
    attempt AS (
        INSERT INTO attempts (id, trial_id, worker_id, lease_token, state, leased_at,
            heartbeat_at, lease_expires_at)
        SELECT p_attempt, leased.id, p_worker, p_token, 'running', p_now, p_now, p_expires
        FROM leased)
    SELECT leased.id, leased.design_id, d.architecture_json::text, leased.recipe_json::text,
        leased.dataset, leased.seed, leased.task, leased.parent_trial_id,
        (leased.task = 'train' AND EXISTS (
            SELECT 1 FROM sweep_trials st JOIN sweep_tasks k ON k.sweep_id = st.sweep_id
            WHERE st.trial_id = leased.id))
    FROM worker LEFT JOIN (leased JOIN designs d ON d.id = leased.design_id) ON true;
END
$fn$;
