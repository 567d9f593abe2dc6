-- Portable between SQLite and PostgreSQL: only TEXT, BIGINT and DOUBLE PRECISION,
-- no autoincrement, times as Unix seconds (sqlx's Any driver maps none of the
-- backends' own time types).

CREATE TABLE policies (
    name TEXT PRIMARY KEY,
    crash_point_interval_s DOUBLE PRECISION NOT NULL,
    app_point_interval_s BIGINT NOT NULL,
    retention_hours BIGINT NOT NULL,
    rpo_warning_s BIGINT NOT NULL,
    rpo_critical_s BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

INSERT INTO policies (name, crash_point_interval_s, app_point_interval_s, retention_hours,
                      rpo_warning_s, rpo_critical_s, created_at, updated_at)
VALUES ('default', 5.0, 0, 24, 30, 120, 0, 0);

CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    -- SHA-256 of the secret, lowercase hex: the secret itself is never stored.
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
