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

-- Claims in batches: every request of the batch in one statement (so one round trip and one
-- commit for all of them). Per request: touch the worker, pick the oldest ready trial
-- skipping rows other claims hold, mark it running, insert the attempt. Requests are served
-- in array order, the earliest request getting the oldest trial; a trial's `not_before` is
-- compared with the earliest `now` of the batch, so no request leases a trial early. One row
-- comes back per request (`slot`, from 1): `known` false for an unknown worker, a null
-- `trial_id` when there was no work for it.
CREATE FUNCTION deepmad_claim(p_workers uuid[], p_nows timestamptz[], p_attempts uuid[],
    p_tokens uuid[], p_expires timestamptz[])
RETURNS TABLE (slot bigint, known boolean, trial_id uuid, design_id text,
    architecture_json text, recipe_json text, dataset text, seed bigint, task text,
    parent_trial_id uuid, upload_weights boolean)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH request AS (
        SELECT r.worker, r.at, r.attempt, r.token, r.expires, r.slot
        FROM unnest(p_workers, p_nows, p_attempts, p_tokens, p_expires)
            WITH ORDINALITY AS r(worker, at, attempt, token, expires, slot)),
    touched AS (
        UPDATE workers w SET last_seen_at = (SELECT max(at) FROM request)
        WHERE w.id = ANY (p_workers) RETURNING w.id),
    eligible AS (
        SELECT request.*, row_number() OVER (ORDER BY request.slot) AS rank
        FROM request WHERE request.worker IN (SELECT id FROM touched)),
    candidate AS (
        SELECT c.id, row_number() OVER (ORDER BY c.created_at, c.id) AS rank
        FROM (SELECT t.id, t.created_at FROM trials t
            WHERE t.state = 'queued' AND t.active_sweeps > 0
                AND t.not_before <= (SELECT min(at) FROM request)
            ORDER BY t.created_at, t.id
            LIMIT (SELECT count(*) FROM eligible)
            FOR UPDATE OF t SKIP LOCKED) c),
    pair AS (
        SELECT eligible.*, candidate.id AS trial
        FROM eligible JOIN candidate ON candidate.rank = eligible.rank),
    leased AS (
        UPDATE trials t SET state = 'running', updated_at = pair.at
        FROM pair WHERE t.id = pair.trial
        RETURNING pair.slot, pair.worker, pair.at, pair.attempt, pair.token, pair.expires,
            t.id, t.design_id, t.recipe_json, t.dataset, t.seed, t.task, t.parent_trial_id),
    attempt AS (
        INSERT INTO attempts (id, trial_id, worker_id, lease_token, state, leased_at,
            heartbeat_at, lease_expires_at)
        SELECT leased.attempt, leased.id, leased.worker, leased.token, 'running', leased.at,
            leased.at, leased.expires
        FROM leased)
    SELECT request.slot, request.worker IN (SELECT id FROM touched), leased.id,
        leased.design_id, d.architecture_json::text, leased.recipe_json::text, leased.dataset,
        leased.seed, leased.task, leased.parent_trial_id,
        (leased.task = 'train' AND EXISTS (
            SELECT 1 FROM sweep_trials st JOIN sweep_tasks k ON k.sweep_id = st.sweep_id
            WHERE st.trial_id = leased.id))
    FROM request
        LEFT JOIN (leased JOIN designs d ON d.id = leased.design_id)
            ON leased.slot = request.slot
    ORDER BY request.slot;
END
$fn$;

-- Completions in batches: one call completes many attempts, each exactly as deepmad_complete
-- does and in its own subtransaction, so one completion's failure undoes only itself. One
-- outcome per completion, in order: deepmad_complete's text, NULL for an unknown attempt,
-- 'retry' when it must wait for the sweep lock (serialization_failure) or lost a deadlock
-- against another batch holding the same trials, 'error:SQLSTATE:message' for anything else.
-- Epoch metrics come flattened: completion i owns the next p_epoch_counts[i] entries.
-- Batches stay under 64 completions: a transaction with more subtransactions than that
-- overflows PostgreSQL's per-backend cache of them, which slows every snapshot on the server.
CREATE FUNCTION deepmad_complete_batch(
    p_attempts uuid[], p_tokens uuid[], p_nows timestamptz[], p_top1 double precision[],
    p_top5 double precision[], p_test_loss double precision[],
    p_train_seconds double precision[], p_epochs integer[], p_dataset_hashes text[],
    p_checkpoints text[], p_epoch_counts integer[], e_epoch integer[],
    e_train_loss double precision[], e_test_loss double precision[], e_top1 double precision[],
    e_top5 double precision[], e_images_per_second double precision[],
    e_learning_rate double precision[])
RETURNS text[] LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_outcomes text[] := '{}';
    v_outcome text;
    v_from integer := 1;
    v_to integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_attempts, 1), 0) LOOP
        v_to := v_from + p_epoch_counts[i] - 1;
        BEGIN
            v_outcome := deepmad_complete(p_attempts[i], p_tokens[i], p_nows[i], p_top1[i],
                p_top5[i], p_test_loss[i], p_train_seconds[i], p_epochs[i],
                p_dataset_hashes[i], p_checkpoints[i], e_epoch[v_from:v_to],
                e_train_loss[v_from:v_to], e_test_loss[v_from:v_to], e_top1[v_from:v_to],
                e_top5[v_from:v_to], e_images_per_second[v_from:v_to],
                e_learning_rate[v_from:v_to]);
        EXCEPTION
            WHEN serialization_failure OR deadlock_detected THEN
                v_outcome := 'retry';
            WHEN OTHERS THEN
                v_outcome := 'error:' || SQLSTATE || ':' || SQLERRM;
        END;
        v_outcomes := array_append(v_outcomes, v_outcome);
        v_from := v_to + 1;
    END LOOP;
    RETURN v_outcomes;
END
$fn$;
