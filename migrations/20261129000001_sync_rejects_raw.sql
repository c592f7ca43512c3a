-- A quarantined document is kept exactly as MongoDB sent it (BSON), whatever it holds:
-- `bytea` stores any bytes, where `jsonb` and `text` refuse U+0000. `document` stays a
-- readable, best-effort JSON view. An oversize document keeps only its first bytes;
-- `raw_size` is its whole size.
ALTER TABLE sync_rejects
    ADD COLUMN raw bytea,
    ADD COLUMN raw_size bigint;
COMMENT ON COLUMN sync_rejects.raw IS 'the document as BSON (its first bytes when raw_size is larger)';
COMMENT ON COLUMN sync_rejects.raw_size IS 'the whole document''s BSON size in bytes';
