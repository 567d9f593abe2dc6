-- Recovery (docs/recovery.md): recovery hosts, the work the control plane gives them,
-- each machine's failover state, recovery plans, and the input a waiting job is
-- resumed with. Portable like 0001: TEXT, BIGINT and DOUBLE PRECISION only.

CREATE TABLE recovery_hosts (
    name TEXT PRIMARY KEY,
    -- HOST:PORT of its NBD listener: what `nbd_url`s name.
    nbd_address TEXT NOT NULL,
    work_dir_free_bytes BIGINT NOT NULL,
    registered_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    removed BIGINT NOT NULL DEFAULT 0
);

-- One unit of work given to one recovery host (wire::WorkItem). Its id is
-- deterministic per job task, so that a task run again finds it.
CREATE TABLE recovery_work (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    job_id TEXT NOT NULL,
    machine TEXT NOT NULL,
    -- build, serve, start, script, remove.
    op_kind TEXT NOT NULL,
    -- The whole wire::WorkOp, JSON.
    op TEXT NOT NULL,
    -- pending, running, succeeded, failed; removed once a remove item took it away.
    state TEXT NOT NULL,
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    bytes_per_s DOUBLE PRECISION NOT NULL DEFAULT 0,
    -- wire::WorkResult, JSON, once it succeeded.
    result TEXT,
    error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX recovery_work_by_host ON recovery_work (host, state);
CREATE INDEX recovery_work_by_job ON recovery_work (job_id);

-- A machine's failover; no row: protected at home, nothing failed over.
CREATE TABLE machine_recovery (
    machine TEXT PRIMARY KEY,
    -- preparing, failed-over, committed.
    state TEXT NOT NULL,
    -- home or recovery.
    active_site TEXT NOT NULL,
    planned BIGINT NOT NULL,
    -- The id the source's final point answers to (planned failover).
    prepare_id TEXT,
    -- wire::FailoverReport of the source, JSON, once it reported the final point.
    prepared TEXT,
    -- {disk: point id} failed over to, JSON.
    point TEXT,
    host TEXT,
    -- The live work item ids of this failover (disks, start), JSON list.
    items TEXT NOT NULL DEFAULT '[]',
    job_id TEXT,
    updated_at BIGINT NOT NULL
);

CREATE TABLE recovery_plans (
    name TEXT PRIMARY KEY,
    -- The plan as created (groups, machines, actions), JSON.
    spec TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- A machine's command template run once its disks are ready (actions.start).
ALTER TABLE machines ADD COLUMN start_action TEXT;

-- What a waiting job asks for, and what an operator resumed it with (JSON).
ALTER TABLE jobs ADD COLUMN prompt TEXT;
ALTER TABLE jobs ADD COLUMN input TEXT;
-- The key that keeps one active job per key (`active_key` while active): set where
-- it is not KIND/SUBJECT (recovery jobs: one per machine, whatever their kind).
ALTER TABLE jobs ADD COLUMN job_key TEXT;
