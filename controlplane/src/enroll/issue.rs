//! Certificates for enrolled agents and process servers, signed by the site CA from
//! the caller's CSR: the key never leaves its host, only its public half travels.
//! The shape is what `ferry_link::tls::certs::Authority::issue` makes, so the data
//! plane's checks (`cert_names`, the client and server verifiers) accept them: the
//! name as CN and as a SAN, digital signature, and the extended key usage of the role.

use ferry_link::control::wire::Kind;
use rand::RngCore;
use rcgen::{
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    KeyUsagePurpose, SerialNumber,
};
use sha2::{Digest, Sha256};

use super::ca::SiteCa;
use super::{Error, Result};

/// How long an enrolled certificate is valid; renewal issues another as long.
pub const LEAF_VALIDITY_DAYS: u64 = 30;

/// A certificate just signed.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub pem: String,
    /// SHA-256 of the DER, lowercase hex: how the certificate is found again when it
    /// is presented on mutual TLS.
    pub der_sha256: String,
    /// Lowercase hex, no separators.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// Parses a PEM CSR and checks its signature (proof that the caller holds the key).
/// The error is the caller's fault: a 400.
pub fn parse_csr(pem: &str) -> Result<CertificateSigningRequestParams, String> {
    CertificateSigningRequestParams::from_pem(pem).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            "the CSR's signature does not verify".to_string()
        }
        rcgen::Error::UnsupportedExtension => {
            "the CSR asks for an extension the control plane does not take".to_string()
        }
        other => format!("the CSR is not a PEM PKCS#10 request: {other}"),
    })
}

/// The host of `HOST:PORT` (`[v6]:PORT` too): what a process server's certificate
/// names beside its name. None when it is not of that form.
pub fn advertise_host(advertise: &str) -> Option<String> {
    if let Ok(sa) = advertise.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_string());
    }
    let (host, port) = advertise.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    ok.then(|| host.to_string())
}

/// A random positive serial of 16 bytes whose first byte is neither zero nor has its
/// top bit set, so that its DER INTEGER is exactly these bytes and its hex is what
/// any parser of the certificate prints.
fn random_serial() -> Vec<u8> {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[0] = (b[0] & 0x7f) | 0x40;
    b.to_vec()
}

impl SiteCa {
    /// Signs `csr`'s key for `names` (the first is the CN): an agent's certificate is
    /// for client authentication, a process server's for both ends (it serves agents
    /// and heartbeats to the control plane). Whatever the CSR asked for is ignored.
    pub fn issue(
        &self,
        mut csr: CertificateSigningRequestParams,
        kind: Kind,
        names: &[String],
    ) -> Result<Leaf> {
        let cert_err = |op| move |source| Error::Cert { op, source };
        let mut params = rcgen::CertificateParams::new(names.to_vec())
            .map_err(cert_err("the certificate's names"))?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map_or("ferry", |n| n.as_str()),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match kind {
            // A recovery host only calls the control plane: its NBD listener is not TLS.
            Kind::Agent | Kind::RecoveryHost => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Kind::ProcessServer => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from(serial.clone()));
        super::ca::set_validity(&mut params, LEAF_VALIDITY_DAYS);
        let not_after = params.not_after.unix_timestamp();
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(cert_err("signing the certificate"))?;
        Ok(Leaf {
            pem: cert.pem(),
            der_sha256: hex::encode(Sha256::digest(cert.der())),
            serial: hex::encode(serial),
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_hosts() {
        assert_eq!(advertise_host("10.0.0.5:7000").as_deref(), Some("10.0.0.5"));
        assert_eq!(advertise_host("[::1]:7000").as_deref(), Some("::1"));
        assert_eq!(
            advertise_host("ps1.example:7000").as_deref(),
            Some("ps1.example")
        );
        assert_eq!(advertise_host("ps1.example"), None);
        assert_eq!(advertise_host("a b:1"), None);
        assert_eq!(advertise_host(":1"), None);
    }

    #[test]
    fn issued_certificates_name_their_owner_and_chain_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SiteCa::open_or_create(dir.path()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(vec!["ignored".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let names = ["ps1".to_string(), "127.0.0.1".to_string()];
        let leaf = ca
            .issue(parse_csr(&csr).unwrap(), Kind::ProcessServer, &names)
            .unwrap();
        assert_eq!(leaf.serial.len(), 32);
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(leaf.pem.as_bytes())
            .map(|d: rustls_pki_types::CertificateDer| d.to_vec())
            .unwrap();
        assert!(ferry_link::tls::certs::cert_names(&der, "ps1"));
        assert!(ferry_link::tls::certs::cert_names(&der, "127.0.0.1"));
        assert!(!ferry_link::tls::certs::cert_names(&der, "ignored"));
        let days = (leaf.not_after - chrono::Utc::now().timestamp()) / 86_400;
        assert!((29..=30).contains(&days), "{days}");

        assert!(parse_csr("not a csr").is_err());
        // A CSR whose signature is not the key's: its body changed after signing.
        let mut der = rustls_pki_types::pem::PemObject::from_pem_slice(csr.as_bytes())
            .map(|d: rustls_pki_types::CertificateSigningRequestDer| d.as_ref().to_vec())
            .unwrap();
        let i = der.windows(7).position(|w| w == b"ignored").unwrap();
        der[i] = b'J';
        let forged = pem_of("CERTIFICATE REQUEST", &der);
        let err = parse_csr(&forged).unwrap_err();
        assert!(err.contains("signature"), "{err}");
    }

    fn pem_of(tag: &str, der: &[u8]) -> String {
        use std::fmt::Write;
        let b64 = base64_encode(der);
        let mut out = format!("-----BEGIN {tag}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            let _ = writeln!(out, "{}", std::str::from_utf8(chunk).unwrap());
        }
        let _ = writeln!(out, "-----END {tag}-----");
        out
    }

    fn base64_encode(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in data.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
