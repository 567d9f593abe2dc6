-- Durable jobs (controlplane/src/jobs/). Portable like 0001: TEXT, BIGINT, DOUBLE
-- PRECISION only; times in Unix seconds, except the lease's deadline in Unix
-- milliseconds (leases are seconds long).

CREATE TABLE jobs (
    -- Sortable by creation: 'j' + creation time in ms (13 digits) + '-' + random hex.
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    -- What the job works on (a machine's name for retention).
    subject TEXT NOT NULL,
    -- queued, running, waiting-for-input, succeeded, failed, cancelled.
    state TEXT NOT NULL,
    -- The kind's parameters, JSON, fixed when the job is queued.
    params TEXT NOT NULL,
    error TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    ended_at BIGINT,
    -- The control plane working on it, until when; NULL unless running. A lease
    -- past its deadline is free for any control plane to take.
    lease_owner TEXT,
    lease_until_ms BIGINT,
    -- 1 once someone asked a running job to stop; its runner stops between tasks.
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    -- 'KIND/SUBJECT' while the job is queued, running or waiting, NULL once it ended:
    -- unique, so that two control planes scheduling at once queue one job (a
    -- NOT EXISTS check alone lets both in under READ COMMITTED).
    active_key TEXT UNIQUE
);

CREATE INDEX jobs_by_state ON jobs (state, id);

CREATE TABLE job_tasks (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    -- 0, 1, ...: the order the tasks run in.
    seq BIGINT NOT NULL,
    name TEXT NOT NULL,
    -- pending, running, succeeded, failed.
    state TEXT NOT NULL,
    error TEXT,
    started_at BIGINT,
    ended_at BIGINT,
    -- 0.0 to 1.0.
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, seq)
);
