-- vigil's schema. Applied by `vigil migrate` and at start-up, as the owning role;
-- afterwards vigil needs only the grants listed in the README.

-- The run ledger: one row per attempt of a job run, and one per refused firing.
CREATE TABLE job_runs (
    id           uuid        PRIMARY KEY,
    job          text        NOT NULL,
    kind         text        NOT NULL,
    trigger      text        NOT NULL CHECK (trigger IN ('schedule', 'manual', 'retry', 'catch_up')),
    attempt      integer     NOT NULL CHECK (attempt >= 1),
    -- For attempts after the first: the id of the first attempt.
    -- No foreign key: the ledger may write a retry before (or without) its first attempt.
    retry_of     uuid,
    scheduled_at timestamptz NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    status       text        NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'timed_out', 'skipped', 'abandoned')),
    items        bigint,
    error        text,
    host         text        NOT NULL,
    duration_ms  double precision GENERATED ALWAYS AS (extract(epoch FROM finished_at - started_at) * 1000) STORED
);
-- Run history of one job, newest first (API, "last run", catch-up).
CREATE INDEX job_runs_job_started_idx ON job_runs (job, started_at DESC);
-- Dashboards: all runs over a time range.
CREATE INDEX job_runs_started_idx ON job_runs (started_at);
-- Start-up: find the runs this host left running.
CREATE INDEX job_runs_running_idx ON job_runs (host) WHERE status = 'running';
CREATE INDEX job_runs_retry_of_idx ON job_runs (retry_of) WHERE retry_of IS NOT NULL;

-- Host samples, one row per (host, sample time): a re-sent sample cannot duplicate.
-- The values dashboards plot are copied into typed generated columns and carried in
-- the primary key's index, so "CPU % per minute for one host over a week" is an
-- index-only scan that never touches the JSON.
CREATE TABLE system_metrics (
    ts                 timestamptz NOT NULL,
    host               text        NOT NULL,
    metrics            jsonb       NOT NULL,
    cpu_pct            real GENERATED ALWAYS AS ((metrics #>> '{cpu,usage_pct}')::real) STORED,
    mem_pct            real GENERATED ALWAYS AS ((metrics #>> '{memory,used_pct}')::real) STORED,
    net_rx_bytes_per_s double precision
        GENERATED ALWAYS AS ((metrics #>> '{network,total,rx_bytes_per_s}')::double precision) STORED,
    net_tx_bytes_per_s double precision
        GENERATED ALWAYS AS ((metrics #>> '{network,total,tx_bytes_per_s}')::double precision) STORED,
    CONSTRAINT system_metrics_pkey PRIMARY KEY (host, ts)
        INCLUDE (cpu_pct, mem_pct, net_rx_bytes_per_s, net_tx_bytes_per_s)
);
-- Retention deletes by time across hosts.
CREATE INDEX system_metrics_ts_idx ON system_metrics (ts);

-- Documents synced from MongoDB. `source_id` makes a re-delivered document a no-op.
CREATE TABLE reading_analytics (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id   text        NOT NULL UNIQUE,
    payload     jsonb       NOT NULL,
    occurred_at timestamptz,
    synced_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reading_analytics_synced_idx ON reading_analytics (synced_at DESC, id DESC);
CREATE INDEX reading_analytics_occurred_idx ON reading_analytics (occurred_at);
