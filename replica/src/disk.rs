//! One protected disk in a store: its identity and keys (disk.json), loading its state
//! from the commit records, and committing. The commit protocol (docs/storage-format.md):
//! data objects are uploaded first under fresh unique names; then one commit record is
//! created with create-if-absent at the next number. A reader only follows commit
//! records, so it sees either all of a commit's objects or none of them.

use bytes::Bytes;
use chrono::Utc;
use futures::{StreamExt, TryStreamExt};

use crate::error::{Error, Result};
use crate::keys::{random_hex, DataKey, RecordKey, VaultKey, WrappedKey, SALT_BYTES};
use crate::layout::{number_of, DiskPaths};
use crate::meta::{self, CheckpointHint, Commit, DiskInfo, WrappedKeyInfo};
use crate::object::disk_id_bytes;
use crate::state::DiskState;
use crate::store::{Created, Store};

/// Default checksum and zero-detection granularity.
pub const DEFAULT_BLOCK_BYTES: u64 = 64 << 10;
/// Default disk address space per base extent object.
pub const DEFAULT_EXTENT_BYTES: u64 = 16 << 20;
/// Commit records fetched at once while loading a state.
const LOAD_PARALLEL: usize = 8;

pub struct Disk {
    pub store: Store,
    pub paths: DiskPaths,
    pub info: DiskInfo,
    pub disk_id: [u8; 16],
    key: Option<DataKey>,
    /// Authenticates commit records; present exactly when `key` is.
    record_key: Option<RecordKey>,
    /// The process server whose appends this handle commits (`set_writer`); None for
    /// every other writer.
    writer: Option<String>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Disk({})", self.paths.label())
    }
}

fn wrap_context(info: &DiskInfo) -> String {
    format!("{}/{}/{}", info.machine, info.disk, info.disk_id)
}

fn unwrap_key(info: &DiskInfo, vault: &VaultKey, object: &str) -> Result<DataKey> {
    if info.vault_key_id != vault.id() {
        return Err(Error::WrongKey(format!(
            "disk {}/{} is sealed under vault key {}, the key file holds key {}",
            info.machine,
            info.disk,
            info.vault_key_id,
            vault.id()
        )));
    }
    let corrupt = |what: &str| Error::corrupt(object, format!("data key {what} is malformed"));
    let salt: [u8; SALT_BYTES] = hex::decode(&info.data_key.salt)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| corrupt("salt"))?;
    let sealed = hex::decode(&info.data_key.wrapped).map_err(|_| corrupt("ciphertext"))?;
    DataKey::unwrap(
        vault,
        &info.data_key.id,
        &WrappedKey { salt, sealed },
        &wrap_context(info),
    )
    .ok_or_else(|| {
        Error::corrupt(
            object,
            "the data key does not unwrap under the vault key whose id it names",
        )
    })
}

impl Disk {
    /// Opens an existing disk. Without a vault key only metadata can be read.
    pub async fn open(
        store: &Store,
        machine: &str,
        disk: &str,
        vault: Option<&VaultKey>,
    ) -> Result<Disk> {
        let paths = DiskPaths::new(machine, disk)?;
        let object = paths.info();
        let bytes = store.get_opt(&object).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "no disk {disk} of machine {machine} in store {}",
                store.name()
            ))
        })?;
        Self::from_info(store, paths, &bytes, vault)
    }

    fn from_info(
        store: &Store,
        paths: DiskPaths,
        bytes: &[u8],
        vault: Option<&VaultKey>,
    ) -> Result<Disk> {
        let object = paths.info();
        let info: DiskInfo = meta::decode(&object, bytes)?;
        if info.machine != paths.machine || info.disk != paths.disk {
            return Err(Error::corrupt(&object, "names another machine or disk"));
        }
        if info.block_bytes == 0
            || info.extent_bytes == 0
            || !info.extent_bytes.is_multiple_of(info.block_bytes)
        {
            return Err(Error::corrupt(&object, "block or extent size is invalid"));
        }
        let disk_id =
            disk_id_bytes(&info.disk_id).map_err(|e| Error::corrupt(&object, e.to_string()))?;
        let key = vault.map(|v| unwrap_key(&info, v, &object)).transpose()?;
        let record_key = key.as_ref().map(|k| k.record_key(&disk_id));
        Ok(Disk {
            store: store.clone(),
            paths,
            info,
            disk_id,
            key,
            record_key,
            writer: None,
        })
    }

    /// Opens a disk, creating its identity and data key the first time (create-if-absent,
    /// so two writers racing to create it end up with the same one).
    pub async fn open_or_create(
        store: &Store,
        machine: &str,
        disk: &str,
        vault: &VaultKey,
        block_bytes: u64,
        extent_bytes: u64,
    ) -> Result<Disk> {
        let paths = DiskPaths::new(machine, disk)?;
        if let Some(bytes) = store.get_opt(&paths.info()).await? {
            return Self::from_info(store, paths, &bytes, Some(vault));
        }
        if block_bytes == 0 || !extent_bytes.is_multiple_of(block_bytes) || extent_bytes == 0 {
            return Err(Error::Invalid(
                "extent size must be a multiple of the block size".into(),
            ));
        }
        let data_key = DataKey::generate();
        let mut info = DiskInfo {
            format: meta::FORMAT,
            machine: machine.into(),
            disk: disk.into(),
            disk_id: random_hex(16),
            block_bytes,
            extent_bytes,
            created: Utc::now(),
            vault_key_id: vault.id().into(),
            data_key: WrappedKeyInfo {
                id: data_key.id.clone(),
                salt: String::new(),
                wrapped: String::new(),
            },
        };
        let wrapped = data_key.wrap(vault, &wrap_context(&info));
        info.data_key.salt = hex::encode(wrapped.salt);
        info.data_key.wrapped = hex::encode(&wrapped.sealed);
        let bytes = meta::encode(&info);
        match store
            .put_new(&paths.info(), Bytes::from(bytes.clone()))
            .await?
        {
            Created::Created => Self::from_info(store, paths, &bytes, Some(vault)),
            Created::AlreadyExists => {
                let bytes = store.get(&paths.info()).await?;
                Self::from_info(store, paths, &bytes, Some(vault))
            }
        }
    }

    /// The disk's data key; an error when the disk was opened without the vault key.
    pub fn key(&self) -> Result<&DataKey> {
        self.key.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "disk {} was opened without a key",
                self.paths.label()
            ))
        })
    }

    /// Reads the commit records from the newest checkpoint on and folds them. A disk
    /// opened with the vault key verifies every record's MAC and refuses a record that
    /// fails, naming it: everything that rebuilds, compacts or writes holds the key, so
    /// only a keyless listing (`ferry points`) reads records it cannot authenticate.
    pub async fn load_state(&self) -> Result<DiskState> {
        let checkpoints = self.store.list(&self.paths.checkpoints_dir()).await?;
        let start = checkpoints.iter().filter_map(|l| number_of(&l.path)).max();
        if let Some(n) = start {
            let object = self.paths.checkpoint(n);
            let hint: CheckpointHint = meta::decode(&object, &self.store.get(&object).await?)?;
            if hint.checkpoint != n {
                return Err(Error::corrupt(
                    object,
                    format!("names checkpoint {}", hint.checkpoint),
                ));
            }
        }
        let mut numbers: Vec<u64> = self
            .store
            .list(&self.paths.commits_dir())
            .await?
            .iter()
            .filter_map(|l| number_of(&l.path))
            .filter(|n| start.is_none_or(|s| *n >= s))
            .collect();
        numbers.sort_unstable();
        let mut objects = Vec::with_capacity(numbers.len());
        for (expect, n) in (start.unwrap_or(0)..).zip(numbers) {
            if n != expect {
                return Err(Error::corrupt(
                    self.paths.commit(expect),
                    format!("is missing while commit {n} exists"),
                ));
            }
            objects.push(self.paths.commit(n));
        }
        if let (Some(s), true) = (start, objects.is_empty()) {
            return Err(Error::corrupt(
                self.paths.commit(s),
                "is missing but its checkpoint hint exists",
            ));
        }
        let records: Vec<(String, Bytes)> = futures::stream::iter(objects)
            .map(|o| async move {
                let b = self.store.get(&o).await?;
                Ok::<_, Error>((o, b))
            })
            .buffered(LOAD_PARALLEL)
            .try_collect()
            .await?;
        let mut state = DiskState::default();
        for (i, (object, bytes)) in records.into_iter().enumerate() {
            let c: Commit = meta::decode_commit(&object, &bytes, self.record_key.as_ref())?;
            if i == 0 && start.is_some() && c.kind != meta::CommitKind::Checkpoint {
                return Err(Error::corrupt(
                    object,
                    "a checkpoint hint names it, but it is no checkpoint",
                ));
            }
            state.fold(&object, &c, &self.info.disk_id)?;
        }
        Ok(state)
    }

    /// Creates commit record `c.commit`. If the number is taken by a record with other
    /// content, another writer won: Conflict. The same content means an earlier attempt
    /// of ours landed before a retry.
    pub async fn commit(&self, state: &mut DiskState, c: Commit) -> Result<()> {
        let object = self.paths.commit(c.commit);
        // Validate against the state before publishing anything.
        let mut next = state.clone();
        next.fold(&object, &c, &self.info.disk_id)?;
        let key = self.record_key.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "disk {} was opened without a key and cannot commit",
                self.paths.label()
            ))
        })?;
        let bytes = meta::encode_commit(&object, &c, key);
        match self
            .store
            .put_new(&object, Bytes::from(bytes.clone()))
            .await?
        {
            Created::Created => {
                // A compaction deletes the commits below its checkpoint, after creating
                // the checkpoint's hint. A writer whose view predates that checkpoint
                // can then re-create a deleted number: the record lands, but below the
                // checkpoint, where no reader looks. A hint above our number exposes
                // that (the hint always exists before the deletes), so it is a conflict.
                let newest = self
                    .store
                    .list(&self.paths.checkpoints_dir())
                    .await?
                    .iter()
                    .filter_map(|l| number_of(&l.path))
                    .max();
                if newest.is_some_and(|h| h > c.commit) {
                    return Err(Error::Conflict {
                        disk: self.paths.label(),
                        commit: format!("checkpoint {} (above {object})", newest.unwrap_or(0)),
                    });
                }
            }
            Created::AlreadyExists => {
                let existing = self.store.get(&object).await?;
                if existing.as_ref() != bytes.as_slice() {
                    return Err(Error::Conflict {
                        disk: self.paths.label(),
                        commit: object,
                    });
                }
            }
        }
        *state = next;
        Ok(())
    }

    /// Uploads a data object under a fresh name. The name is unique to this writer, so
    /// "already exists" can only be an earlier attempt of the same upload.
    pub async fn upload(&self, object: &str, bytes: Bytes) -> Result<()> {
        self.store.put_new(object, bytes).await.map(|_| ())
    }

    /// A commit after `state`, in the state's writer epoch. A checkpoint replaces the
    /// whole state, so it carries the state's writer forward; an append names none
    /// but the one `set_writer` named (a process server's own).
    /// Names the process server whose appends this handle commits (None: a writer
    /// that is not one). It must hold the state's epoch, or the fold refuses them.
    pub fn set_writer(&mut self, writer: Option<String>) {
        self.writer = writer;
    }

    pub fn new_commit(&self, state: &DiskState, kind: meta::CommitKind, next_seq: u64) -> Commit {
        let writer = match kind {
            meta::CommitKind::Checkpoint => state.writer.clone(),
            meta::CommitKind::Append => self.writer.clone(),
        };
        Commit {
            format: meta::COMMIT_FORMAT,
            commit: state.next_commit(),
            disk_id: self.info.disk_id.clone(),
            kind,
            time: Utc::now(),
            next_seq,
            base: None,
            segments: Vec::new(),
            points: Vec::new(),
            epoch: state.epoch,
            writer,
        }
    }
}

/// Lists the disks of a machine.
pub async fn list_disks(store: &Store, machine: &str) -> Result<Vec<String>> {
    crate::layout::check_name("machine", machine)?;
    store.list_dirs(&crate::layout::disks_of(machine)).await
}

/// A new recovery point id: UTC time to the millisecond and 32 random bits, so ids
/// sort by time and never collide in practice.
pub fn new_point_id(time: chrono::DateTime<Utc>) -> String {
    format!("{}-{}", time.format("%Y%m%dT%H%M%S%3fZ"), random_hex(4))
}
