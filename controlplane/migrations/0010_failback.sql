-- Failback (docs/failback.md): which way a failed-over machine replicates, the
-- master target that writes its home disks, and those disks. Portable like 0001.

-- forward: home -> recovery site (also while failed over, before reprotect);
-- reverse: recovery site -> home, once reprotected.
ALTER TABLE machine_recovery ADD COLUMN direction TEXT NOT NULL DEFAULT 'forward';
-- The recovery host at the home site that wrote the home disks (reprotect).
ALTER TABLE machine_recovery ADD COLUMN master_target TEXT;
-- {disk: path on the master target}, JSON.
ALTER TABLE machine_recovery ADD COLUMN home_disks TEXT NOT NULL DEFAULT '{}';
