-- What each run used, measured by the kernel (a cgroup of its own, or its process
-- tree): CPU seconds in user and system mode, peak resident memory, bytes read and
-- written. Measured for `command` runs; NULL for other kinds and for every run
-- recorded before this migration (no meaning is given to old rows).
ALTER TABLE job_runs
    ADD COLUMN cpu_user_s double precision,
    ADD COLUMN cpu_system_s double precision,
    ADD COLUMN peak_rss_bytes bigint,
    ADD COLUMN read_bytes bigint,
    ADD COLUMN written_bytes bigint,
    ADD COLUMN resources_measured_by text
        CHECK (resources_measured_by IN ('cgroup', 'process_tree'));
