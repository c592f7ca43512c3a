-- A fleet on one PostgreSQL: host samples and their rollup partitioned by time, so
-- retention drops whole partitions instead of deleting rows, and a job's last run is
-- one index probe.

-- The API's order (newest first, then id) straight from the job's index: "last run"
-- and a job's pages read only the rows they return.
DROP INDEX job_runs_job_started_idx;
CREATE INDEX job_runs_job_started_idx ON job_runs (job, started_at DESC, id DESC);
-- A job's runs of one status (`?status=failed`): a probe, not a walk through the job's
-- runs (or the time index) testing each row's status.
CREATE INDEX job_runs_job_status_started_idx ON job_runs (job, status, started_at DESC, id DESC);

-- system_metrics by day. The table as it was becomes one partition, `_legacy`, holding
-- everything before the day after its newest row (attached, not copied: no row moves);
-- `_default` takes any sample no partition covers (an old spooled one, a skewed clock).
-- vigil creates the daily partitions ahead (store/partitions.rs).
ALTER TABLE system_metrics RENAME TO system_metrics_legacy;
ALTER TABLE system_metrics_legacy RENAME CONSTRAINT system_metrics_pkey TO system_metrics_legacy_pkey;
ALTER INDEX system_metrics_ts_idx RENAME TO system_metrics_legacy_ts_idx;

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
) PARTITION BY RANGE (ts);
-- No time index on the daily partitions (retention drops them; panels go by host):
-- only the partitions that retention prunes row by row carry one.
CREATE TABLE system_metrics_default PARTITION OF system_metrics DEFAULT;
CREATE INDEX system_metrics_default_ts_idx ON system_metrics_default (ts);

-- The rollup by month, the same way.
ALTER TABLE system_metrics_1m RENAME TO system_metrics_1m_legacy;
ALTER TABLE system_metrics_1m_legacy RENAME CONSTRAINT system_metrics_1m_pkey TO system_metrics_1m_legacy_pkey;
ALTER INDEX system_metrics_1m_minute_idx RENAME TO system_metrics_1m_legacy_minute_idx;

CREATE TABLE system_metrics_1m (
    host        text        NOT NULL,
    minute      timestamptz NOT NULL,
    samples     integer     NOT NULL,
    cpu_sum     double precision NOT NULL DEFAULT 0,
    cpu_n       integer     NOT NULL DEFAULT 0,
    cpu_max     real,
    mem_sum     double precision NOT NULL DEFAULT 0,
    mem_n       integer     NOT NULL DEFAULT 0,
    mem_max     real,
    net_rx_sum  double precision NOT NULL DEFAULT 0,
    net_tx_sum  double precision NOT NULL DEFAULT 0,
    net_n       integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (host, minute)
) PARTITION BY RANGE (minute);
-- Each minute's row is updated once per batch: room on the page keeps that HOT.
CREATE TABLE system_metrics_1m_default PARTITION OF system_metrics_1m DEFAULT
    WITH (fillfactor = 70);
CREATE INDEX system_metrics_1m_default_minute_idx ON system_metrics_1m_default (minute);

DO $$
DECLARE
    newest timestamptz;
BEGIN
    SELECT max(ts) INTO newest FROM system_metrics_legacy;
    IF newest IS NULL THEN
        DROP TABLE system_metrics_legacy;
    ELSE
        -- Attaching checks every row against the bound once; nothing is copied.
        EXECUTE format(
            'ALTER TABLE system_metrics ATTACH PARTITION system_metrics_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
            date_trunc('day', greatest(newest, now()), 'UTC') + interval '1 day');
    END IF;

    SELECT max(minute) INTO newest FROM system_metrics_1m_legacy;
    IF newest IS NULL THEN
        DROP TABLE system_metrics_1m_legacy;
    ELSE
        EXECUTE format(
            'ALTER TABLE system_metrics_1m ATTACH PARTITION system_metrics_1m_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
            date_trunc('month', greatest(newest, now()), 'UTC') + interval '1 month');
    END IF;
END
$$;
