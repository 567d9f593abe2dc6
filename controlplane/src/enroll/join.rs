//! One site CA for every control plane of a site. The first control plane to start
//! on a database records its CA certificate there (`db::site`); one that starts later
//! on the same database must hold the same CA key, copied from the first one's state
//! directory (`--join DIR` copies it), and the same admin token, else it refuses to
//! start and names what to copy. The CA key is thus made once per site, never once
//! per control plane: every certificate any of them issues chains to the one
//! `ca.pem` that agents and process servers trust.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::files::{read_if_exists, write_file};
use super::{Error, Result};

/// The files a control plane of a site shares with the others: the CA's certificate
/// and key, and the admin token (one secret per site, since the database keeps one).
pub const SHARED: [(&str, u32); 3] = [("ca.pem", 0o644), ("ca.key", 0o600), ("admin.token", 0o600)];

/// Copies the shared files from `from` (another control plane's state directory)
/// into `dir`. A file `dir` already has is kept if it is the same and refused if it
/// differs: joining never replaces a CA.
pub fn copy_shared(from: &Path, dir: &Path) -> Result<()> {
    for (name, mode) in SHARED {
        let src = from.join(name);
        let text = read_if_exists(&src)?.ok_or_else(|| Error::Bad {
            path: src.clone(),
            why: "missing: --join names the state directory of a control plane of the site".into(),
        })?;
        let dst = dir.join(name);
        match read_if_exists(&dst)? {
            Some(have) if have.trim() == text.trim() => {}
            Some(_) => {
                return Err(Error::Bad {
                    path: dst,
                    why: format!(
                        "differs from {}: this state directory belongs to another site \
                         (use an empty state directory to join)",
                        src.display()
                    ),
                })
            }
            None => write_file(&dst, &text, mode)?,
        }
    }
    Ok(())
}

/// Which of the shared files `dir` lacks.
pub fn missing_shared(dir: &Path) -> Vec<PathBuf> {
    SHARED
        .iter()
        .map(|(name, _)| dir.join(name))
        .filter(|p| !p.is_file())
        .collect()
}

/// Whether two PEM texts hold the same certificate (the same DER; whitespace and
/// line ends may differ).
pub fn same_certificate(a: &str, b: &str) -> bool {
    let der = |pem: &str| -> Option<Vec<Vec<u8>>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| c.ok().map(|c| c.as_ref().to_vec()))
            .collect()
    };
    match (der(a), der(b)) {
        (Some(x), Some(y)) => !x.is_empty() && x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_copies_the_shared_files_once_and_never_replaces_a_ca() {
        let first = tempfile::tempdir().unwrap();
        let ca = super::super::ca::SiteCa::open_or_create(first.path()).unwrap();
        super::super::tokens::admin_token(first.path()).unwrap();
        let second = tempfile::tempdir().unwrap();
        assert_eq!(missing_shared(second.path()).len(), 3);
        copy_shared(first.path(), second.path()).unwrap();
        assert!(missing_shared(second.path()).is_empty());
        copy_shared(first.path(), second.path()).unwrap();
        let joined = super::super::ca::SiteCa::open_or_create(second.path()).unwrap();
        assert!(same_certificate(&ca.pem, &joined.pem));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(second.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A directory with a CA of its own is another site: refused, kept.
        let other = tempfile::tempdir().unwrap();
        let own = super::super::ca::SiteCa::open_or_create(other.path()).unwrap();
        assert!(!same_certificate(&ca.pem, &own.pem));
        let e = copy_shared(first.path(), other.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca.pem") && e.contains("another site"), "{e}");
        let kept = std::fs::read_to_string(other.path().join("ca.pem")).unwrap();
        assert_eq!(kept, own.pem);

        // Joining a directory that is not a control plane's names what is missing.
        let empty = tempfile::tempdir().unwrap();
        let e = copy_shared(empty.path(), second.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca.pem") && e.contains("missing"), "{e}");
    }

    #[test]
    fn same_certificate_compares_der_not_text() {
        let dir = tempfile::tempdir().unwrap();
        let ca = super::super::ca::SiteCa::open_or_create(dir.path()).unwrap();
        assert!(same_certificate(&ca.pem, &ca.pem.replace('\n', "\r\n")));
        assert!(!same_certificate(&ca.pem, "not a certificate"));
        assert!(!same_certificate("", ""));
    }
}
