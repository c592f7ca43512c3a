-- Per-minute rollup of the plotted host values. A week of one host is 10,080 rows here
-- instead of 60,480 samples to aggregate, so long-range panels cost a range scan.
-- Sums and counts (not averages) so coarser buckets average correctly, and so a
-- minute can keep growing as its samples arrive in several batches.
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
)
-- Each minute's row is updated once per batch; free room on the page keeps those
-- updates HOT (no new index entries).
WITH (fillfactor = 70);
-- Retention deletes by time across hosts.
CREATE INDEX system_metrics_1m_minute_idx ON system_metrics_1m (minute);

-- Samples already stored before this migration.
INSERT INTO system_metrics_1m
SELECT host, date_bin('1 minute', ts, timestamptz 'epoch'), count(*),
       coalesce(sum(cpu_pct::float8), 0), count(cpu_pct), max(cpu_pct),
       coalesce(sum(mem_pct::float8), 0), count(mem_pct), max(mem_pct),
       coalesce(sum(net_rx_bytes_per_s), 0), coalesce(sum(net_tx_bytes_per_s), 0),
       count(net_rx_bytes_per_s)
FROM system_metrics
GROUP BY 1, 2;
