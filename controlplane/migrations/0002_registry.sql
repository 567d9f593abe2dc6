-- The registry: enrollment tokens, issued certificates, machines, process servers
-- and events. Portable between SQLite and PostgreSQL like 0001: TEXT, BIGINT and
-- DOUBLE PRECISION only, times as Unix seconds, lists as JSON text.

CREATE TABLE enrollment_tokens (
    -- SHA-256 of the secret, lowercase hex: the secret itself is never stored.
    secret_sha256 TEXT PRIMARY KEY,
    -- 'agent' or 'process-server'.
    kind TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    -- Set, with the name enrolled, in the transaction that issues the certificate.
    used_at BIGINT,
    used_by TEXT
);

CREATE TABLE issued_certs (
    -- Lowercase hex, no separators: what process servers compare.
    serial TEXT PRIMARY KEY,
    -- SHA-256 of the DER: how a client certificate is found again on mutual TLS.
    cert_sha256 TEXT NOT NULL UNIQUE,
    owner_kind TEXT NOT NULL,
    owner_name TEXT NOT NULL,
    -- The names the certificate holds (JSON list), reissued alike on renewal.
    names TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    revoked BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX issued_certs_owner ON issued_certs (owner_kind, owner_name);

CREATE TABLE process_servers (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    cache_used_bytes BIGINT NOT NULL,
    cache_free_bytes BIGINT NOT NULL,
    ingest_bytes_per_s DOUBLE PRECISION NOT NULL,
    upload_lag_s DOUBLE PRECISION NOT NULL,
    cpu_percent DOUBLE PRECISION NOT NULL,
    -- Its own verdict and reasons (JSON list), as it reported them.
    reported_health TEXT NOT NULL,
    reported_reasons TEXT NOT NULL,
    -- Machines connected to it now (JSON list).
    connected TEXT NOT NULL,
    -- The health the last sweep computed: a change is an event.
    health TEXT NOT NULL DEFAULT 'normal',
    registered_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    removed BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE machines (
    name TEXT PRIMARY KEY,
    process_server TEXT,
    policy TEXT NOT NULL DEFAULT 'default',
    group_name TEXT,
    state TEXT NOT NULL,
    -- The disks of its last heartbeat (JSON list of wire::DiskReport).
    disks TEXT NOT NULL,
    last_error TEXT,
    registered_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    -- The oldest of its disks' newest uploaded points (Unix seconds, fractional):
    -- the machine's RPO runs from it. Null before the first.
    newest_uploaded_at DOUBLE PRECISION,
    health TEXT NOT NULL DEFAULT 'normal',
    removed BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX machines_process_server ON machines (process_server);

CREATE TABLE events (
    -- Assigned as the greatest id + 1 (no autoincrement that both backends share).
    id BIGINT PRIMARY KEY,
    time BIGINT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    message TEXT NOT NULL
);
