//! Certificates for mutual TLS: a private CA, a server certificate and client
//! certificates signed by it, written as PEM files; and loading them into rustls
//! configurations. `ferry certs` and the tests use the generator so that nothing but
//! Ferry is needed on loopback; production hosts bring their own PKI.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, reason: impl ToString) -> CertError {
    CertError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The PEM files of one identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write_private(path: &Path, text: &str) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| file_err(path, e))
}

/// A CA that signs server and client certificates; kept in memory while generating.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

/// How long a leaf certificate is valid, relative to now.
#[derive(Debug, Clone, Copy)]
pub enum Validity {
    /// From yesterday for ten years.
    Current,
    /// Expired a year ago (for tests of refusal).
    Expired,
}

impl Authority {
    /// Creates a CA and writes `ca.pem` (and `ca.key`) into `dir`.
    pub fn create(dir: &Path, name: &str) -> Result<Authority, CertError> {
        fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        fs::write(dir.join("ca.pem"), issuer.pem()).map_err(|e| file_err(dir, e))?;
        write_private(&dir.join("ca.key"), &key_pem)?;
        Ok(Authority {
            issuer,
            dir: dir.to_path_buf(),
        })
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a certificate for `name` (a DNS name or IP address for servers, an agent
    /// name for clients) and writes `{file}.pem` and `{file}.key`.
    pub fn issue(
        &self,
        file: &str,
        name: &str,
        server: bool,
        validity: Validity,
    ) -> Result<Identity, CertError> {
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let day = 86_400;
        let (from, to) = match validity {
            Validity::Current => (now - day, now + 3650 * day),
            Validity::Expired => (now - 730 * day, now - 365 * day),
        };
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + time_secs(from);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + time_secs(to);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let id = Identity {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        fs::write(&id.cert, cert.pem()).map_err(|e| file_err(&id.cert, e))?;
        write_private(&id.key, &key.serialize_pem())?;
        Ok(id)
    }
}

fn time_secs(s: i64) -> std::time::Duration {
    std::time::Duration::from_secs(s.max(0) as u64)
}

/// Writes a CA, a server certificate for 127.0.0.1 and localhost, and `clients` client
/// certificates (`agent-0` ...) into `dir`: everything a loopback deployment needs.
pub fn generate_loopback(dir: &Path, clients: usize) -> Result<(), CertError> {
    let ca = Authority::create(dir, "Ferry loopback CA")?;
    ca.issue("server", "127.0.0.1", true, Validity::Current)?;
    // A second name on the same certificate would need another call; localhost users
    // connect by address.
    for i in 0..clients {
        ca.issue(
            &format!("agent-{i}"),
            &format!("agent-{i}"),
            false,
            Validity::Current,
        )?;
    }
    Ok(())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, format!("private key: {e}")))
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, CertError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| file_err(ca, e))?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 only, client certificates required and checked against `client_ca`.
pub fn server_config(cert: &Path, key: &Path, client_ca: &Path) -> Result<ServerConfig, CertError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(client_ca)?, provider())
        .build()
        .map_err(|e| CertError::Config(format!("client CA {}: {e}", client_ca.display())))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| file_err(cert, e))?;
    // Agents hold one long session; resumption tickets would only cost a write.
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A server certificate that can be replaced while the server runs: a process server
/// enrolled with a control plane renews its certificate without a restart, and
/// handshakes after the renewal present the new one.
#[derive(Debug)]
pub struct ServerCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ServerCert {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerCert>, CertError> {
        Ok(Arc::new(ServerCert {
            current: std::sync::RwLock::new(Arc::new(certified(cert, key)?)),
        }))
    }

    /// Serves `cert` and `key` from now on; on an error the old pair stays.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), CertError> {
        let new = Arc::new(certified(cert, key)?);
        *self.current.write().expect("server cert lock") = new;
        Ok(())
    }

    /// The certificate served now (DER).
    pub fn current(&self) -> CertificateDer<'static> {
        self.current.read().expect("server cert lock").cert[0].clone()
    }
}

fn certified(cert: &Path, key: &Path) -> Result<rustls::sign::CertifiedKey, CertError> {
    rustls::sign::CertifiedKey::from_der(load_certs(cert)?, load_key(key)?, &provider())
        .map_err(|e| file_err(cert, e))
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

/// `server_config` with a certificate that can be replaced while serving.
pub fn server_config_reloading(
    cert: Arc<ServerCert>,
    client_ca: &Path,
) -> Result<ServerConfig, CertError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(client_ca)?, provider())
        .build()
        .map_err(|e| CertError::Config(format!("client CA {}: {e}", client_ca.display())))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// An agent's side: its own certificate, and the CA the server's must chain to.
pub fn client_config(cert: &Path, key: &Path, ca: &Path) -> Result<ClientConfig, CertError> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| file_err(cert, e))
}

/// A client that presents no certificate (tests of refusal).
pub fn anonymous_client_config(ca: &Path) -> Result<ClientConfig, CertError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth())
}

/// The server name an agent checks for `host` (an IP address or DNS name).
pub fn server_name(host: &str) -> Result<ServerName<'static>, CertError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| CertError::Config(format!("server name {host}: {e}")))
}

/// Whether the certificate `der` names `name` (a machine name or address): the
/// process server's check that an agent writes only its own machine's disks, and the
/// group channel's that a peer is the member or coordinator it was told of.
pub fn cert_names(der: &[u8], name: &str) -> bool {
    ServerName::try_from(name).is_ok_and(|n| names(&CertificateDer::from(der), &n))
}

/// A certificate's serial number as the control plane lists revoked ones: lowercase
/// hex without leading zeros (the DER sign byte and any padding dropped, so the same
/// number always has one spelling). None if `der` is not a certificate.
pub fn cert_serial(der: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    // serialNumber INTEGER, ... } ... }: two headers in, past the version.
    let (tag, head, _) = der_header(der)?;
    let tbs = der.get(head..).filter(|_| tag == 0x30)?;
    let (tag, head, _) = der_header(tbs)?;
    let mut rest = tbs.get(head..).filter(|_| tag == 0x30)?;
    let (mut tag, mut head, mut len) = der_header(rest)?;
    if tag == 0xa0 {
        rest = rest.get(head + len..)?;
        (tag, head, len) = der_header(rest)?;
    }
    if tag != 0x02 || len == 0 {
        return None;
    }
    let bytes = rest.get(head..head + len)?;
    Some(normal_serial(&hex_lower(bytes)))
}

/// A serial in hex as the one spelling `cert_serial` gives: lowercase, no leading
/// zeros, no separators (":" as some tools print them).
pub fn normal_serial(hex: &str) -> String {
    let h: String = hex
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let t = h.trim_start_matches('0');
    if t.is_empty() {
        "0".into()
    } else {
        t.to_string()
    }
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A DER element's tag, header length and content length (definite lengths only).
fn der_header(b: &[u8]) -> Option<(u8, usize, usize)> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    if first < 0x80 {
        return Some((tag, 2, first));
    }
    let n = first & 0x7f;
    if n == 0 || n > 4 {
        return None;
    }
    let mut len = 0usize;
    for i in 0..n {
        len = (len << 8) | *b.get(2 + i)? as usize;
    }
    Some((tag, 2 + n, len))
}

fn names(der: &CertificateDer<'_>, name: &ServerName<'_>) -> bool {
    webpki::EndEntityCert::try_from(der)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(name).is_ok())
}

/// Agent to agent (a replication group's cuts): both ends are agents with
/// certificates of the same CA. The member's side is `server_config` with its own
/// agent certificate; the coordinator's side, this, presents its certificate and
/// accepts a peer whose certificate is an agent's (client use) chained to `ca` and
/// names the server name the connection was opened for: the member's machine name,
/// so another agent of the same CA listening at that address is refused. A
/// certificate for another use (the process server's) is refused too.
pub fn peer_client_config(cert: &Path, key: &Path, ca: &Path) -> Result<ClientConfig, CertError> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(|e| CertError::Config(format!("CA {}: {e}", ca.display())))?;
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier { inner }))
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| file_err(cert, e))
}

/// Checks a peer agent's certificate as the process server checks an agent's, and
/// that it names the machine the coordinator meant to reach.
#[derive(Debug)]
struct PeerVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        _ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if !names(end_entity, name) {
            return Err(rustls::Error::General(format!(
                "the peer's certificate does not name {}",
                name.to_str()
            )));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(serial: Option<Vec<u8>>) -> Vec<u8> {
        let mut p = CertificateParams::new(vec!["m1".to_string()]).unwrap();
        p.serial_number = serial.map(rcgen::SerialNumber::from);
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_serial_is_read_in_one_spelling() {
        assert_eq!(
            cert_serial(&self_signed(Some(vec![0x8f, 0x01, 0xab]))).as_deref(),
            Some("8f01ab")
        );
        assert_eq!(
            cert_serial(&self_signed(Some(vec![0x00, 0x00, 0x12]))).as_deref(),
            Some("12")
        );
        // rcgen's own random serial: read, and hex.
        let s = cert_serial(&self_signed(None)).unwrap();
        assert!(
            !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit()),
            "{s}"
        );
        assert_eq!(normal_serial("00:8F:01:AB"), "8f01ab");
        assert_eq!(normal_serial("000"), "0");
    }

    #[test]
    fn a_reloaded_server_certificate_is_served_and_a_bad_one_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Authority::create(tmp.path(), "test CA").unwrap();
        let a = ca.issue("a", "127.0.0.1", true, Validity::Current).unwrap();
        let b = ca.issue("b", "127.0.0.1", true, Validity::Current).unwrap();
        let der = |p: &Path| load_certs(p).unwrap()[0].clone();
        let served = ServerCert::load(&a.cert, &a.key).unwrap();
        server_config_reloading(served.clone(), &ca.ca_path()).unwrap();
        assert_eq!(served.current(), der(&a.cert));
        served.reload(&b.cert, &b.key).unwrap();
        assert_eq!(served.current(), der(&b.cert));
        let e = served.reload(&a.cert, &b.key).unwrap_err();
        assert!(e.to_string().contains("a.pem"), "{e}");
        assert_eq!(served.current(), der(&b.cert), "the old pair stays");
    }

    #[test]
    fn what_is_not_a_certificate_has_no_serial() {
        assert_eq!(cert_serial(b""), None);
        assert_eq!(cert_serial(b"\x30\x03\x02\x01"), None);
        let der = self_signed(Some(vec![1]));
        assert_eq!(cert_serial(&der[..6]), None);
    }
}
