-- Documents a mongo_sync job could not load: marked `failed` in MongoDB (with
-- `sync_error`) and kept here with the reason and, when it could be rendered, the
-- document itself. One row per document: a reject seen again updates its row.
CREATE TABLE sync_rejects (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job         text        NOT NULL,
    mongo_id    text        NOT NULL,
    source_id   text,
    error       text        NOT NULL,
    document    jsonb,
    at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job, mongo_id)
);
CREATE INDEX sync_rejects_at_idx ON sync_rejects (at DESC);
