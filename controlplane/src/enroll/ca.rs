//! The site CA and the service's own certificate. The CA is made once, at the first
//! start; everything the control plane will sign later (agents', process servers')
//! chains to it, so `ca.pem` is the one file a client needs to trust the site.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::files::{read_if_exists, write_file, write_private};
use super::{Error, Result};

const CA_NAME: &str = "Ferry site CA";
const DAY_S: u64 = 86_400;

fn cert_err(op: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
    move |source| Error::Cert { op, source }
}

/// The CA's parameters. Rebuilt the same way at each start: signing needs only the
/// CA's name, key usages and key, so the certificate need not be parsed back.
fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, 20 * 365);
    Ok(params)
}

/// Valid from a day ago (clock skew between hosts) for `days`.
pub(crate) fn set_validity(params: &mut CertificateParams, days: u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(Duration::from_secs(DAY_S));
    params.not_after = epoch + now + Duration::from_secs(days * DAY_S);
}

/// The site CA: makes `ca.pem` and `ca.key` on the first start, loads the key after.
pub struct SiteCa {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    /// `ca.pem`: handed to enrolled parts and the root client certificates chain to.
    pub pem: String,
}

impl SiteCa {
    pub fn open_or_create(dir: &Path) -> Result<SiteCa> {
        let key_path = dir.join("ca.key");
        let pem_path = dir.join("ca.pem");
        let (key, ca_pem) = match read_if_exists(&key_path)? {
            Some(pem) => {
                let Some(ca_pem) = read_if_exists(&pem_path)? else {
                    return Err(Error::Bad {
                        path: pem_path,
                        why: "missing while ca.key exists (restore it from a backup)".into(),
                    });
                };
                (
                    KeyPair::from_pem(&pem).map_err(cert_err("reading ca.key"))?,
                    ca_pem,
                )
            }
            None => {
                let key = KeyPair::generate().map_err(cert_err("CA key"))?;
                let cert = ca_params()?
                    .self_signed(&key)
                    .map_err(cert_err("CA certificate"))?;
                // The key first: a crash between the two leaves a key without a
                // certificate, refused above, rather than a CA nobody can sign with.
                write_private(&key_path, &key.serialize_pem())?;
                let ca_pem = cert.pem();
                write_file(&pem_path, &ca_pem, 0o644)?;
                (key, ca_pem)
            }
        };
        Ok(SiteCa {
            issuer: Issuer::new(ca_params()?, key),
            pem: ca_pem,
        })
    }

    /// The service certificate for `names` (DNS names or IP addresses), reused while
    /// the names stay the same. Returns (certificate PEM, key PEM).
    pub fn service_cert(&self, dir: &Path, names: &[String]) -> Result<(String, String)> {
        let (cert_path, key_path, names_path) = (
            dir.join("server.pem"),
            dir.join("server.key"),
            dir.join("server.names"),
        );
        let wanted = names.join("\n");
        if let (Some(cert), Some(key), Some(had)) = (
            read_if_exists(&cert_path)?,
            read_if_exists(&key_path)?,
            read_if_exists(&names_path)?,
        ) {
            if had == wanted {
                return Ok((cert, key));
            }
        }
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(cert_err("server names"))?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map_or("ferry", |n| n.as_str()),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, 825);
        let key = KeyPair::generate().map_err(cert_err("server key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err("server certificate"))?;
        let (cert, key) = (cert.pem(), key.serialize_pem());
        write_private(&key_path, &key)?;
        write_file(&cert_path, &cert, 0o644)?;
        write_file(&names_path, &wanted, 0o644)?;
        Ok((cert, key))
    }
}

/// localhost, 127.0.0.1 and the host name: what a client on the host or beside it
/// would type.
pub fn default_server_names() -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && !names.iter().any(|n| n == host) {
            names.push(host.to_string());
        }
    }
    names
}
