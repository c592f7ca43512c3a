-- Job health (issue: alerts on failure, absence and lateness, delivered once).

-- Each job's latest final outcome and last success, per scope (`''` for cluster jobs,
-- the replica's host for host-scoped ones): what health and staleness are judged on,
-- without reading the ledger.
CREATE TABLE job_health (
    job              text        NOT NULL,
    scope_key        text        NOT NULL,
    last_run_id      uuid        NOT NULL,
    last_status      text        NOT NULL,
    last_finished_at timestamptz NOT NULL,
    last_success_at  timestamptz,
    last_success_run uuid,
    PRIMARY KEY (job, scope_key)
);

-- An incident: opened once, resolved once. At most one open per job, scope and kind:
-- the unique index decides which replica opens it.
CREATE TABLE alert_incidents (
    id              uuid        PRIMARY KEY,
    job             text        NOT NULL,
    scope_key       text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('failed', 'stale', 'late')),
    opened_at       timestamptz NOT NULL,
    opened_by       text        NOT NULL,
    run_id          uuid,
    summary         text        NOT NULL,
    details         jsonb       NOT NULL,
    -- The notifiers told when it opened; the same are told when it resolves.
    notify          text[]      NOT NULL,
    resolved_at     timestamptz,
    resolved_by     text,
    resolved_run_id uuid
);
CREATE UNIQUE INDEX alert_incidents_open_idx
    ON alert_incidents (job, scope_key, kind) WHERE resolved_at IS NULL;

-- What is to be delivered: one row per incident, event and notifier, taken by one
-- replica at a time (a lease) and retried with backoff until delivered or given up.
CREATE TABLE alert_outbox (
    incident_id  uuid        NOT NULL REFERENCES alert_incidents (id) ON DELETE CASCADE,
    event        text        NOT NULL CHECK (event IN ('opened', 'resolved')),
    notifier     text        NOT NULL,
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL,
    due_at       timestamptz NOT NULL,
    attempts     integer     NOT NULL DEFAULT 0,
    lease_until  timestamptz,
    leased_by    text,
    delivered_at timestamptz,
    gave_up_at   timestamptz,
    last_error   text,
    PRIMARY KEY (incident_id, event, notifier)
);
CREATE INDEX alert_outbox_due_idx
    ON alert_outbox (due_at) WHERE delivered_at IS NULL AND gave_up_at IS NULL;

-- Every delivery attempt, delivered or not.
CREATE TABLE alert_deliveries (
    id          bigserial   PRIMARY KEY,
    incident_id uuid        NOT NULL,
    event       text        NOT NULL,
    notifier    text        NOT NULL,
    attempt     integer     NOT NULL,
    at          timestamptz NOT NULL,
    duration_ms double precision NOT NULL,
    outcome     text        NOT NULL CHECK (outcome IN ('delivered', 'failed')),
    http_status integer,
    error       text,
    host        text        NOT NULL
);
CREATE INDEX alert_deliveries_incident_idx ON alert_deliveries (incident_id, at);
CREATE INDEX alert_deliveries_at_idx ON alert_deliveries (at);

-- A job's last success, found without reading the runs between (first start after
-- this migration fills job_health from it).
CREATE INDEX job_runs_last_success_idx
    ON job_runs (job, finished_at DESC) WHERE status = 'succeeded';
