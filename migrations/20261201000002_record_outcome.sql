-- A run's final outcome in one round trip when there is nothing to resolve (the common
-- case: a success while no incident is open, or any other status). Under the job's
-- alert lock, as opening an incident is, so no incident can open unseen meanwhile:
-- `true` means open incidents wait to be resolved, which the caller then does in a
-- transaction of its own that also queues their notifications.
CREATE FUNCTION vigil_record_outcome(
    p_job text, p_scope text, p_run uuid, p_status text, p_finished timestamptz
) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('vigil.alerts:' || p_job || ':' || p_scope, 0));
    INSERT INTO job_health AS h (job, scope_key, last_run_id, last_status, last_finished_at,
                                 last_success_at, last_success_run)
    VALUES (p_job, p_scope, p_run, p_status, p_finished,
            CASE WHEN p_status = 'succeeded' THEN p_finished END,
            CASE WHEN p_status = 'succeeded' THEN p_run END)
    ON CONFLICT (job, scope_key) DO UPDATE SET
        last_run_id = EXCLUDED.last_run_id,
        last_status = EXCLUDED.last_status,
        last_finished_at = EXCLUDED.last_finished_at,
        last_success_at = coalesce(EXCLUDED.last_success_at, h.last_success_at),
        last_success_run = coalesce(EXCLUDED.last_success_run, h.last_success_run)
    WHERE h.last_finished_at <= EXCLUDED.last_finished_at;
    IF p_status <> 'succeeded' THEN
        RETURN false;
    END IF;
    RETURN EXISTS (SELECT 1 FROM alert_incidents
                   WHERE job = p_job AND scope_key = p_scope AND resolved_at IS NULL);
END
$$;
