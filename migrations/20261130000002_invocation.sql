-- Jobs invoked like functions: input, output, idempotency keys, pauses, callbacks.

-- The input a run was invoked with (every attempt of it).
ALTER TABLE job_runs ADD COLUMN input jsonb;

-- What a run produced for its caller (a command's stdout, capped), by run id (the first
-- attempt's): the last attempt's output.
CREATE TABLE run_outputs (
    run_id      uuid        PRIMARY KEY,
    job         text        NOT NULL,
    output      bytea       NOT NULL,
    truncated   boolean     NOT NULL,
    total_bytes bigint      NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX run_outputs_created_idx ON run_outputs (created_at);

-- Idempotency-Key: the run a key started, for 24 hours, across replicas and restarts.
CREATE TABLE idempotency_keys (
    job        text        NOT NULL,
    key        text        NOT NULL,
    input_hash text        NOT NULL,
    run_id     uuid        NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (job, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);

-- Paused jobs: every replica's firings of them are skipped until resumed (or `until`).
CREATE TABLE job_pauses (
    job       text        PRIMARY KEY,
    paused_at timestamptz NOT NULL,
    until     timestamptz,
    paused_by text        NOT NULL
);

-- Callback-Url: the final run POSTed there once it ends, retried with backoff.
CREATE TABLE callback_deliveries (
    run_id       uuid        PRIMARY KEY,
    job          text        NOT NULL,
    url          text        NOT NULL,
    created_at   timestamptz NOT NULL,
    -- Set when the run ended: then the delivery is due.
    payload      jsonb,
    due_at       timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    lease_until  timestamptz,
    leased_by    text,
    delivered_at timestamptz,
    gave_up_at   timestamptz,
    last_error   text
);
CREATE INDEX callback_deliveries_due_idx
    ON callback_deliveries (due_at) WHERE delivered_at IS NULL AND gave_up_at IS NULL AND due_at IS NOT NULL;

CREATE TABLE callback_attempts (
    id          bigserial   PRIMARY KEY,
    run_id      uuid        NOT NULL,
    attempt     integer     NOT NULL,
    at          timestamptz NOT NULL,
    duration_ms double precision NOT NULL,
    outcome     text        NOT NULL CHECK (outcome IN ('delivered', 'failed')),
    http_status integer,
    error       text,
    host        text        NOT NULL
);
CREATE INDEX callback_attempts_run_idx ON callback_attempts (run_id, at);
