-- What a recovery host last said of the store (docs/recovery-hosts.md): NULL while
-- it reaches it, else why it cannot. A host that cannot is given no new work, and a
-- reprotect or failback naming it as master target is refused. Portable like 0001.

ALTER TABLE recovery_hosts ADD COLUMN store_error TEXT;
