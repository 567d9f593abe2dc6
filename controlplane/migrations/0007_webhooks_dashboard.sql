-- Webhooks and the dashboard's sign-in sessions. Portable like 0001: TEXT, BIGINT
-- and DOUBLE PRECISION only, times as Unix seconds (leases in Unix milliseconds).

CREATE TABLE webhooks (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    -- The event kinds it is sent (JSON list).
    events TEXT NOT NULL,
    -- The HMAC key, kept as it was given out: signing needs the key itself, so unlike
    -- an API token it cannot be stored as a hash. Never listed after its creation.
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    -- The id of the last event delivered or given up on: the deliverer reads on from
    -- it, and advances it with a conditional UPDATE.
    cursor BIGINT NOT NULL,
    -- The control plane delivering for it, until when: one deliverer per webhook,
    -- however many control planes share the database.
    lease_owner TEXT,
    lease_until_ms BIGINT,
    -- The last attempt that failed, for `ferry cp webhooks show`.
    last_error TEXT,
    last_error_at BIGINT,
    delivered BIGINT NOT NULL DEFAULT 0,
    given_up BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE dashboard_sessions (
    -- SHA-256 of the cookie's random value: a copy of the database signs nobody in.
    id_sha256 TEXT PRIMARY KEY,
    -- The SHA-256 of the API token signed in with, as api_tokens keeps it: deleting
    -- or replacing the token ends its sessions.
    token_sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX dashboard_sessions_token ON dashboard_sessions (token_sha256, created_at);
