//! Certificates the control plane revoked (machines and process servers removed),
//! as the process server's heartbeat brings them: a Hello from one is refused, and an
//! open session from one is closed at its next frame (agents ping every few seconds).

use ferry_link::tls::certs::{cert_serial, normal_serial};

use super::listed::Listed;

#[derive(Debug, Default)]
pub struct Revoked {
    serials: Listed,
}

impl Revoked {
    /// Replaces the list (serials in hex, any case or padding); returns whether it
    /// changed.
    pub fn replace(&self, serials: &[String]) -> bool {
        self.serials
            .replace(serials.iter().map(|s| normal_serial(s)))
    }

    pub fn generation(&self) -> u64 {
        self.serials.generation()
    }

    pub fn len(&self) -> usize {
        self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }

    /// Why a peer with this certificate is refused, if its serial is revoked.
    pub fn refusal(&self, peer_cert: Option<&[u8]>) -> Option<String> {
        let serial = cert_serial(peer_cert?)?;
        self.serials.contains(&serial).then(|| format!("the client certificate (serial {serial}) was revoked by the control plane: its machine was removed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(serial: &[u8]) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(vec!["m1".to_string()]).unwrap();
        p.serial_number = Some(rcgen::SerialNumber::from(serial.to_vec()));
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_revoked_serial_is_refused_in_any_spelling_and_others_pass() {
        let r = Revoked::default();
        let (bad, good) = (cert(&[0x0a, 0xbc]), cert(&[0x0a, 0xbd]));
        assert_eq!(r.refusal(Some(&bad)), None);
        assert!(r.replace(&["0ABC".to_string()]));
        let why = r.refusal(Some(&bad)).unwrap();
        assert!(why.contains("abc") && why.contains("revoked"), "{why}");
        assert_eq!(r.refusal(Some(&good)), None);
        assert_eq!(r.refusal(None), None, "no certificate: refused elsewhere");
        let g = r.generation();
        assert!(
            !r.replace(&["abc".to_string()]),
            "the same list is no change"
        );
        assert_eq!(r.generation(), g);
        assert!(r.replace(&[]));
        assert_eq!(r.refusal(Some(&bad)), None, "un-revoked");
        assert!(r.generation() > g);
    }
}
