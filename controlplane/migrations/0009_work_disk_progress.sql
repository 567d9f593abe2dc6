-- Per-disk progress of build and serve work items (docs/recovery.md): what the
-- recovery host last reported of each disk, a JSON list of
-- {disk, progress, bytes_per_s, bytes_done, bytes}. Portable like 0001.

ALTER TABLE recovery_work ADD COLUMN disk_progress TEXT NOT NULL DEFAULT '[]';
