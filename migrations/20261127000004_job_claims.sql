-- Firings of `cluster`-scoped jobs claimed by a replica. Fire times are the same on
-- every replica (they are computed from the schedule, not from start-up), so the
-- first replica to insert (job, scheduled_at) runs that firing and the others stand
-- down. Rows older than a week are removed by later claims of the same job.
CREATE TABLE job_claims (
    job          text        NOT NULL,
    scheduled_at timestamptz NOT NULL,
    host         text        NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, scheduled_at)
);
