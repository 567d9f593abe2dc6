//! Key hierarchy: a vault key (32 bytes in a key file, held by the operator) wraps one
//! random data key per disk; every sealed object derives its own AES-256-GCM key from
//! the disk's data key and a fresh 32-byte salt (HKDF-SHA256). Because each object has
//! its own key and chunk nonces are the chunk index, a (key, nonce) pair can only repeat
//! if two objects draw the same 256-bit salt — no counter state that a crash could
//! rewind. See docs/storage-format.md, "Keys".

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};

use crate::error::{Error, Result};

pub const KEY_BYTES: usize = 32;
pub const SALT_BYTES: usize = 32;
pub const TAG_BYTES: usize = 16;

const WRAP_INFO: &[u8] = b"ferry wrap key v1";
const OBJECT_INFO: &[u8] = b"ferry object key v1";
const KEY_ID_DOMAIN: &[u8] = b"ferry vault key id v1";
const WRAP_AAD_DOMAIN: &[u8] = b"ferry data key v1";
const RECORD_MAC_INFO: &[u8] = b"ferry commit mac v1";
const RECORD_MAC_DOMAIN: &[u8] = b"ferry commit record v2";
pub const MAC_BYTES: usize = 32;

/// Fill `buf` from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) {
    // SystemRandom reads getrandom(2); it only fails if the kernel has no entropy
    // source at all, in which case no key could be made safely anyway.
    SystemRandom::new()
        .fill(buf)
        .expect("the operating system's random number generator failed");
}

/// A random identifier as lowercase hex (`bytes` random bytes).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    random_bytes(&mut buf);
    hex::encode(buf)
}

/// The operator's key. Never logged: `Debug` prints only its id.
pub struct VaultKey {
    bytes: [u8; KEY_BYTES],
    id: String,
}

impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VaultKey(id {})", self.id)
    }
}

impl VaultKey {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(KEY_ID_DOMAIN);
        ctx.update(&bytes);
        // 8 bytes of a SHA-256 identify the key without revealing it.
        let id = hex::encode(&ctx.finish().as_ref()[..8]);
        VaultKey { bytes, id }
    }

    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_BYTES];
        random_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    /// Reads a key file: exactly 32 bytes.
    pub fn load(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let data = fs::read(path).map_err(|e| Error::KeyFile {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let bytes: [u8; KEY_BYTES] = data.as_slice().try_into().map_err(|_| Error::KeyFile {
            path: shown,
            reason: format!(
                "holds {} bytes; a vault key file holds exactly {KEY_BYTES} (make one with `ferry keygen`)",
                data.len()
            ),
        })?;
        Ok(Self::from_bytes(bytes))
    }

    /// Writes the key to a new file readable only by its owner; refuses to overwrite.
    pub fn save_new(&self, path: &Path) -> Result<()> {
        let shown = path.display().to_string();
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::KeyFile {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        f.write_all(&self.bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::KeyFile {
                path: shown,
                reason: e.to_string(),
            })
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

/// A disk's data key, unwrapped.
#[derive(Clone)]
pub struct DataKey {
    bytes: [u8; KEY_BYTES],
    pub id: String,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey(id {})", self.id)
    }
}

/// A data key sealed under the vault key, as stored in disk.json.
#[derive(Debug, Clone)]
pub struct WrappedKey {
    pub salt: [u8; SALT_BYTES],
    pub sealed: Vec<u8>,
}

fn derive(ikm: &[u8], salt: &[u8], info: &[&[u8]]) -> LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let okm = prk
        .expand(info, &AES_256_GCM)
        .expect("HKDF output length of one AES-256 key is always valid");
    LessSafeKey::new(UnboundKey::from(okm))
}

fn wrap_aad(context: &str) -> Vec<u8> {
    let mut aad = WRAP_AAD_DOMAIN.to_vec();
    aad.extend_from_slice(context.as_bytes());
    aad
}

impl DataKey {
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_BYTES];
        random_bytes(&mut bytes);
        DataKey {
            bytes,
            id: random_hex(16),
        }
    }

    /// A data key from known bytes: fixed keys for tests and the fuzz targets, whose
    /// inputs must mean the same thing on every run.
    pub fn from_bytes(bytes: [u8; KEY_BYTES], id: &str) -> Self {
        DataKey {
            bytes,
            id: id.to_string(),
        }
    }

    /// Seals the data key under the vault key; `context` (disk identity) is bound as
    /// associated data so a wrapped key cannot be moved to another disk.
    pub fn wrap(&self, vault: &VaultKey, context: &str) -> WrappedKey {
        let mut salt = [0u8; SALT_BYTES];
        random_bytes(&mut salt);
        let key = derive(&vault.bytes, &salt, &[WRAP_INFO]);
        let mut sealed = self.bytes.to_vec();
        // The wrap key is fresh (random salt), so the all-zero nonce is used once.
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key([0u8; 12]),
            Aad::from(wrap_aad(context)),
            &mut sealed,
        )
        .expect("sealing 32 bytes cannot fail");
        WrappedKey { salt, sealed }
    }

    pub fn unwrap(
        vault: &VaultKey,
        id: &str,
        wrapped: &WrappedKey,
        context: &str,
    ) -> Option<DataKey> {
        let key = derive(&vault.bytes, &wrapped.salt, &[WRAP_INFO]);
        let mut buf = wrapped.sealed.clone();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key([0u8; 12]),
                Aad::from(wrap_aad(context)),
                &mut buf,
            )
            .ok()?;
        let bytes: [u8; KEY_BYTES] = (&*plain).try_into().ok()?;
        Some(DataKey {
            bytes,
            id: id.to_string(),
        })
    }

    /// The HMAC-SHA256 key that authenticates this disk's commit records. Derived from
    /// the data key (itself only reachable through the vault key) under its own HKDF
    /// label, so it is independent of every object key; the disk id in the label makes
    /// it one key per disk. Deriving from the data key rather than the vault key keeps
    /// records valid when the data key is re-wrapped under a new vault key.
    pub fn record_key(&self, disk_id: &[u8]) -> RecordKey {
        // The data key is uniformly random, so HKDF needs no salt (RFC 5869, 3.1).
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(&self.bytes);
        let info = [RECORD_MAC_INFO, disk_id];
        let okm = prk
            .expand(&info, hmac::HMAC_SHA256)
            .expect("HKDF output length of one HMAC-SHA256 key is always valid");
        RecordKey(hmac::Key::from(okm))
    }

    /// The AES-256-GCM key of one sealed object.
    pub(crate) fn object_key(&self, salt: &[u8; SALT_BYTES], disk_id: &[u8]) -> ObjectKey {
        ObjectKey(derive(&self.bytes, salt, &[OBJECT_INFO, disk_id]))
    }
}

pub(crate) struct ObjectKey(LessSafeKey);

fn chunk_nonce(index: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&index.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl ObjectKey {
    /// Encrypts `buf` in place and returns the tag. The nonce is the chunk index, unique
    /// within the object whose key this is.
    pub(crate) fn seal(&self, index: u64, aad: &[u8], buf: &mut [u8]) -> [u8; TAG_BYTES] {
        let tag = self
            .0
            .seal_in_place_separate_tag(chunk_nonce(index), Aad::from(aad), buf)
            .expect("AES-GCM seal of a chunk within size limits cannot fail");
        let mut out = [0u8; TAG_BYTES];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Decrypts `buf` (ciphertext followed by the tag) in place; returns the plaintext
    /// length, or None when authentication fails.
    pub(crate) fn open(&self, index: u64, aad: &[u8], buf: &mut [u8]) -> Option<usize> {
        self.0
            .open_in_place(chunk_nonce(index), Aad::from(aad), buf)
            .ok()
            .map(|p| p.len())
    }
}

/// Authenticates commit records (docs/decisions/0013-authenticated-commit-records.md).
pub struct RecordKey(hmac::Key);

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKey")
    }
}

/// What the MAC covers: a domain label, the record's own path (length-prefixed) and
/// its JSON line exactly as stored. Binding the path keeps a valid record from being
/// copied to another number or another disk's folder.
fn mac_input(object: &str, json: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(RECORD_MAC_DOMAIN.len() + 4 + object.len() + json.len());
    input.extend_from_slice(RECORD_MAC_DOMAIN);
    input.extend_from_slice(&(object.len() as u32).to_le_bytes());
    input.extend_from_slice(object.as_bytes());
    input.extend_from_slice(json);
    input
}

impl RecordKey {
    /// The MAC of commit record `object` whose JSON line is `json`.
    pub fn sign(&self, object: &str, json: &[u8]) -> [u8; MAC_BYTES] {
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(hmac::sign(&self.0, &mac_input(object, json)).as_ref());
        out
    }

    /// True when `mac` authenticates `json` as record `object` (compared in constant
    /// time).
    pub fn verify(&self, object: &str, json: &[u8], mac: &[u8]) -> bool {
        hmac::verify(&self.0, &mac_input(object, json), mac).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trip_and_context_binding() {
        let vault = VaultKey::generate();
        let dk = DataKey::generate();
        let w = dk.wrap(&vault, "m/d/1");
        let back = DataKey::unwrap(&vault, &dk.id, &w, "m/d/1").unwrap();
        assert_eq!(back.bytes, dk.bytes);
        assert!(DataKey::unwrap(&vault, &dk.id, &w, "m/d/2").is_none());
        assert!(DataKey::unwrap(&VaultKey::generate(), &dk.id, &w, "m/d/1").is_none());
    }

    #[test]
    fn record_macs_bind_key_disk_path_and_bytes() {
        let dk = DataKey::generate();
        let k = dk.record_key(&[1; 16]);
        let mac = k.sign("c/1", b"{}");
        assert!(k.verify("c/1", b"{}", &mac));
        assert!(!k.verify("c/2", b"{}", &mac), "bound to its path");
        assert!(!k.verify("c/1", b"{ }", &mac), "bound to its bytes");
        assert!(
            !dk.record_key(&[2; 16]).verify("c/1", b"{}", &mac),
            "per disk"
        );
        assert!(!DataKey::generate()
            .record_key(&[1; 16])
            .verify("c/1", b"{}", &mac));
    }

    #[test]
    fn key_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let v = VaultKey::generate();
        v.save_new(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(VaultKey::load(&p).unwrap().id(), v.id());
        assert!(v.save_new(&p).is_err(), "must not overwrite");
        fs::write(dir.path().join("short"), b"abc").unwrap();
        let e = VaultKey::load(&dir.path().join("short")).unwrap_err();
        assert!(e.to_string().contains("holds 3 bytes"), "{e}");
        assert!(!format!("{v:?}").contains(&hex::encode(v.bytes)));
    }
}
