-- Automatic rebalancing (controlplane/src/fleet/). When each machine last moved, by
-- an operator or by the rebalancer: it is not moved again automatically within the
-- rate window (docs/control-plane.md, "Rebalancing"). Null: never moved.
ALTER TABLE machines ADD COLUMN moved_at BIGINT;
-- Since when each process server has been seen normal without a break (Unix
-- seconds; null while it is not normal): machines are shed back to one only after it
-- has settled.
ALTER TABLE process_servers ADD COLUMN normal_since BIGINT;
