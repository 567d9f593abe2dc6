-- Several control planes on one database (docs/control-plane.md, "Running it highly
-- available"). Portable like 0001: TEXT and BIGINT only.

-- Named singleton leases: work that must run on one control plane at a time (the
-- health sweep, the retention schedule, pruning) is done only by the holder of its
-- lease. A lease past its deadline (Unix milliseconds) is free for any to take, so
-- a killed holder's work moves to another once its lease runs out.
CREATE TABLE singleton_leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);

-- The site's CA certificate (public), recorded by the first control plane to start
-- on the database: one that starts later must hold the same CA (its key copied, or
-- `--join DIR`), never make a second one.
CREATE TABLE site (
    -- Always 'ca': one row.
    name TEXT PRIMARY KEY,
    ca_pem TEXT NOT NULL,
    recorded_at BIGINT NOT NULL
);
