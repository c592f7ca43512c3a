-- Whether a failed attempt may be retried, as the job said: `permanent` failures (a
-- program that does not exist, an invalid URI or input) are never retried;
-- `retry_after_ms` is the pause a job asked for before its next attempt, in place of
-- the policy's backoff.
ALTER TABLE job_runs
    ADD COLUMN permanent boolean NOT NULL DEFAULT false,
    ADD COLUMN retry_after_ms bigint;
