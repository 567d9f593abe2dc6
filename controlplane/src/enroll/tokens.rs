//! API token secrets. A token is `ferry_` and 64 hex digits (32 random bytes); the
//! store keeps only its SHA-256. A plain, fast hash is enough here because the secret
//! is 256 random bits, not a password a person chose: nobody can guess it, so a slow
//! password hash (argon2, bcrypt) would buy nothing, and a fast unsalted hash lets the
//! store find a token by an indexed lookup of its hash instead of trying each one.

use std::path::Path;

use rand::RngCore;
use sha2::{Digest, Sha256};

use super::files::{read_if_exists, write_private};
use super::{Error, Result};

const PREFIX: &str = "ferry_";

/// A new random token secret.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{PREFIX}{}", hex::encode(bytes))
}

/// A new one-time enrollment token: its own prefix, so that nobody mistakes it for
/// an API token (nor the API for one: it is looked up only in its own table).
pub fn new_enrollment_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("ferry_enroll_{}", hex::encode(bytes))
}

/// The hash the store keeps (lowercase hex).
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The admin token in `DIR/admin.token`: made on the first start, read after.
pub fn admin_token(dir: &Path) -> Result<String> {
    let path = dir.join("admin.token");
    match read_if_exists(&path)? {
        Some(t) => {
            let t = t.trim().to_string();
            if !t.starts_with(PREFIX) || t.len() != PREFIX.len() + 64 {
                return Err(Error::Bad {
                    path,
                    why: "not a ferry API token".into(),
                });
            }
            Ok(t)
        }
        None => {
            let t = new_secret();
            write_private(&path, &format!("{t}\n"))?;
            Ok(t)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_differ_and_hash_to_hex() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 70);
        assert_eq!(hash(&a).len(), 64);
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
    }
}
