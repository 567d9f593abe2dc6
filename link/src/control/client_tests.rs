use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use super::*;
use crate::tls::certs::{Authority, Validity as CertValidity};

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

#[test]
fn renewal_is_due_at_two_thirds_of_the_life() {
    let v = Validity {
        issued_at: t("2026-01-01T00:00:00Z"),
        not_after: t("2026-01-31T00:00:00Z"),
    };
    assert_eq!(v.renew_at(), t("2026-01-21T00:00:00Z"));
    assert!(!v.due(t("2026-01-20T23:59:59Z")));
    assert!(v.due(t("2026-01-21T00:00:00Z")));
    assert!(v.due(t("2026-02-01T00:00:00Z")), "expired: overdue");
}

/// A certificate from `ca` and its key, as enrollment would have them.
fn issued_with_key(ca: &Authority, name: &str, not_after: &str) -> (Issued, KeyPair) {
    let id = ca.issue(name, name, false, CertValidity::Current).unwrap();
    let key = KeyPair::from_pem(&std::fs::read_to_string(&id.key).unwrap()).unwrap();
    let issued = Issued {
        certificate_pem: std::fs::read_to_string(&id.cert).unwrap(),
        ca_pem: std::fs::read_to_string(ca.ca_path()).unwrap(),
        not_after: not_after.into(),
    };
    (issued, key)
}

fn issued_for(ca: &Authority, name: &str, not_after: &str) -> Issued {
    let id = ca.issue(name, name, false, CertValidity::Current).unwrap();
    Issued {
        certificate_pem: std::fs::read_to_string(&id.cert).unwrap(),
        ca_pem: std::fs::read_to_string(ca.ca_path()).unwrap(),
        not_after: not_after.into(),
    }
}

#[test]
fn an_identity_is_stored_with_a_private_key_and_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::create(&tmp.path().join("ca"), "test CA").unwrap();
    let dir = tmp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let files = IdentityFiles::in_dir(&dir);
    assert!(!files.present());
    let (_, csr) = key_and_csr("m1").unwrap();
    assert!(
        csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
        "{csr}"
    );
    assert!(!csr.contains("PRIVATE KEY"), "the CSR carries no key");
    let (issued, key) = issued_with_key(&ca, "m1", "2027-01-01T00:00:00Z");
    let now = t("2026-01-01T00:00:00Z");
    store(&files, &key, &issued, now).unwrap();
    assert!(files.present());
    let mode = std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is its owner's only");
    assert_eq!(
        std::fs::read_to_string(&files.key).unwrap(),
        key.serialize_pem()
    );
    assert_eq!(
        std::fs::read_to_string(&files.ca).unwrap(),
        issued.ca_pem,
        "the site CA is kept beside the certificate"
    );
    let v = read_validity(&files.issued).unwrap();
    assert_eq!(v.issued_at, now);
    assert_eq!(v.not_after, t("2027-01-01T00:00:00Z"));
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn a_certificate_for_another_key_never_replaces_the_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::create(&tmp.path().join("ca"), "test CA").unwrap();
    let files = IdentityFiles::in_dir(tmp.path());
    let (issued, key) = issued_with_key(&ca, "m1", "2027-01-01T00:00:00Z");
    store(&files, &key, &issued, Utc::now()).unwrap();
    let before = std::fs::read_to_string(&files.key).unwrap();
    // A renewal answered with someone else's certificate.
    let (ours, _) = key_and_csr("m1").unwrap();
    let other = issued_for(&ca, "m1", "2028-01-01T00:00:00Z");
    let e = store(&files, &ours, &other, Utc::now()).unwrap_err();
    assert!(
        e.to_string().contains("not a certificate for the key"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&files.key).unwrap(), before);
    assert_eq!(
        std::fs::read_to_string(&files.cert).unwrap(),
        issued.certificate_pem
    );
}

#[test]
fn a_bad_expiry_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::create(&tmp.path().join("ca"), "test CA").unwrap();
    let files = IdentityFiles::in_dir(tmp.path());
    let (key, _) = key_and_csr("m1").unwrap();
    let issued = issued_for(&ca, "m1", "next tuesday");
    let e = store(&files, &key, &issued, Utc::now()).unwrap_err();
    assert!(e.to_string().contains("next tuesday"), "{e}");
    assert!(!files.key.exists() && !files.cert.exists());
}

fn enrollment(dir: &Path, ca: &Path, url: &str) -> Enrollment {
    Enrollment {
        urls: vec![url.into()],
        ca: ca.into(),
        kind: Kind::Agent,
        name: "m1".into(),
        advertise: None,
        dir: dir.into(),
    }
}

#[test]
fn without_a_certificate_a_token_is_needed_and_the_url_must_be_https() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::create(&tmp.path().join("ca"), "test CA").unwrap();
    let e = enrollment(&tmp.path().join("s"), &ca.ca_path(), "https://127.0.0.1:1");
    let err = ControlClient::open(&e, None).err().unwrap();
    assert!(matches!(err, ControlError::NotEnrolled { .. }), "{err}");
    let e = enrollment(&tmp.path().join("s"), &ca.ca_path(), "http://127.0.0.1:1");
    let err = ControlClient::open(&e, Some("tok")).err().unwrap();
    assert!(matches!(err, ControlError::Url(_)), "{err}");
}

/// A one-request HTTPS server on loopback that answers every request with `status`
/// and `body` (no client certificate asked): for the client's error paths only.
fn fake_server(tmp: &Path, status: &str, body: &'static str) -> (String, PathBuf) {
    let ca = Authority::create(&tmp.join("fake-ca"), "fake CA").unwrap();
    let (url, _) = fake_server_of(&ca, status, body, 1);
    (url, ca.ca_path())
}

/// As `fake_server`, its certificate from `ca`, answering `requests` connections
/// one after the other; the count of those it answered.
fn fake_server_of(
    ca: &Authority,
    status: &str,
    body: &'static str,
    requests: usize,
) -> (String, Arc<AtomicUsize>) {
    let id = ca
        .issue("server", "127.0.0.1", true, CertValidity::Current)
        .unwrap();
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&id.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&id.key).unwrap();
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let status = status.to_string();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    std::thread::spawn(move || {
        for _ in 0..requests {
            let (tcp, _) = l.accept().unwrap();
            let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then the body as Content-Length says.
            loop {
                let n = s.read(&mut buf).unwrap();
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).to_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if req.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
            // The client may hang up first (an answer it will not read whole).
            let _ = s.write_all(resp.as_bytes());
            let _ = s.flush();
            s.conn.send_close_notify();
            let _ = s.flush();
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    (url, answered)
}

#[test]
fn a_refused_enrollment_shows_the_problem_detail_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, ca) = fake_server(
        tmp.path(),
        "403 Forbidden",
        r#"{"type":"about:blank","title":"Forbidden","status":403,"detail":"the enrollment token was already used"}"#,
    );
    let dir = tmp.path().join("state");
    let err = ControlClient::open(&enrollment(&dir, &ca, &url), Some("tok"))
        .err()
        .unwrap();
    match &err {
        ControlError::Refused {
            status,
            detail,
            what,
        } => {
            assert_eq!(*status, 403);
            assert_eq!(detail, "the enrollment token was already used");
            assert!(what.contains("/v1/enroll"), "{what}");
        }
        other => panic!("{other}"),
    }
    assert!(!IdentityFiles::in_dir(&dir).present());
    assert!(
        !dir.join("key.pem").exists(),
        "no key kept without a certificate"
    );
}

#[test]
fn a_refused_enrollment_never_shows_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, ca) = fake_server(
        tmp.path(),
        "401 Unauthorized",
        r#"{"type":"about:blank","title":"Unauthorized","status":401,"detail":"unknown enrollment token"}"#,
    );
    let secret = "ferry_enroll_0123456789abcdef";
    let err = ControlClient::open(&enrollment(&tmp.path().join("s"), &ca, &url), Some(secret))
        .err()
        .unwrap();
    // What the agent prints and logs: the request and the refusal, not the credential.
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(text.contains("unknown enrollment token"), "{text}");
        assert!(!text.contains(secret), "{text}");
    }
}

#[test]
fn an_answer_over_the_bound_is_refused_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let huge: &'static str = "x".repeat(MAX_ANSWER_BYTES + 1).leak();
    let (url, ca) = fake_server(tmp.path(), "200 OK", huge);
    let dir = tmp.path().join("state");
    let err = ControlClient::open(&enrollment(&dir, &ca, &url), Some("tok"))
        .err()
        .unwrap();
    match &err {
        ControlError::BadAnswer { why, .. } => assert!(why.contains("over"), "{why}"),
        other => panic!("{other}"),
    }
    assert!(!IdentityFiles::in_dir(&dir).present());
}

#[test]
fn a_stale_temporary_file_never_makes_the_key_readable_by_others() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::create(&tmp.path().join("ca"), "test CA").unwrap();
    let files = IdentityFiles::in_dir(tmp.path());
    // What a crash between creating and renaming the temporary file leaves, made by
    // another umask or program: readable by all.
    let stale = files.key.with_extension("tmp");
    std::fs::write(&stale, "half a key").unwrap();
    std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (issued, key) = issued_with_key(&ca, "m1", "2027-01-01T00:00:00Z");
    store(&files, &key, &issued, Utc::now()).unwrap();
    let mode = std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is its owner's only");
    assert_eq!(
        std::fs::read_to_string(&files.key).unwrap(),
        key.serialize_pem()
    );
}

#[test]
fn an_answer_that_is_not_an_issued_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, ca) = fake_server(tmp.path(), "200 OK", r#"{"certificate":"?"}"#);
    let dir = tmp.path().join("state");
    let err = ControlClient::open(&enrollment(&dir, &ca, &url), Some("tok"))
        .err()
        .unwrap();
    assert!(matches!(err, ControlError::BadAnswer { .. }), "{err}");
    assert!(!IdentityFiles::in_dir(&dir).present());
}

#[test]
fn problem_details_fall_back_to_title_then_text() {
    assert_eq!(problem_detail(br#"{"title":"Gone","detail":"d"}"#), "d");
    assert_eq!(problem_detail(br#"{"title":"Gone"}"#), "Gone");
    assert_eq!(problem_detail(b"bad gateway"), "bad gateway");
    assert_eq!(problem_detail(b""), "(no detail)");
}

#[test]
fn intervals_asked_for_are_kept_sane() {
    assert_eq!(clamp_interval(5.0), 5.0);
    assert_eq!(clamp_interval(0.0), MIN_INTERVAL_S);
    assert_eq!(clamp_interval(1e9), MAX_INTERVAL_S);
    assert_eq!(clamp_interval(f64::NAN), HEARTBEAT_INTERVAL_S);
}

/// Counts reports and applied orders.
struct Counting(Arc<Mutex<(u32, u32)>>);

impl Heartbeater for Counting {
    type Report = super::super::wire::RenewRequest;
    type Orders = super::super::wire::ProcessServerOrders;
    const PATH: &'static str = "/v1/heartbeat/process-server";
    fn report(&mut self) -> Self::Report {
        self.0.lock().unwrap().0 += 1;
        RenewRequest {
            csr_pem: String::new(),
        }
    }
    fn apply(&mut self, o: Self::Orders) -> f64 {
        self.0.lock().unwrap().1 += 1;
        o.heartbeat_interval_s
    }
}

#[test]
fn with_the_control_plane_down_heartbeats_retry_and_no_orders_are_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::create(&tmp.path().join("ca"), "test CA").unwrap();
    let dir = tmp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    // Long-lived, so no renewal is attempted.
    let not_after = (Utc::now() + chrono::Duration::days(365)).to_rfc3339();
    let (issued, key) = issued_with_key(&ca, "m1", &not_after);
    store(&IdentityFiles::in_dir(&dir), &key, &issued, Utc::now()).unwrap();
    // A port nothing listens on: the control plane is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = ControlClient::open(
        &enrollment(&dir, &ca.ca_path(), &format!("https://127.0.0.1:{port}")),
        None,
    )
    .unwrap();
    let counts = Arc::new(Mutex::new((0, 0)));
    let hb =
        Heartbeats::start(client, Counting(counts.clone()), Duration::from_millis(100)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counts.lock().unwrap().0 < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    hb.stop();
    let (reports, applied) = *counts.lock().unwrap();
    assert!(reports >= 3, "retried every interval: {reports}");
    assert_eq!(applied, 0, "no orders while the control plane is down");
}

#[test]
fn an_outage_is_logged_once_and_its_end_once() {
    let e = ControlError::Url("x".into());
    let mut o = Outage::default();
    assert!(!o.ok(), "no outage yet");
    assert!(o.failed("heartbeat", &e));
    assert!(!o.failed("heartbeat", &e), "not again while it lasts");
    assert!(!o.failed("heartbeat", &e));
    assert!(o.ok());
    assert!(!o.ok());
    assert!(o.failed("heartbeat", &e), "a new outage is logged again");
}

/// An identity from `ca` in `dir`, long-lived (no renewal is attempted).
fn enrolled_in(dir: &Path, ca: &Authority) {
    std::fs::create_dir_all(dir).unwrap();
    let not_after = (Utc::now() + chrono::Duration::days(365)).to_rfc3339();
    let (issued, key) = issued_with_key(ca, "m1", &not_after);
    store(&IdentityFiles::in_dir(dir), &key, &issued, Utc::now()).unwrap();
}

/// A loopback port nothing listens on: a control plane that is down.
fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("https://127.0.0.1:{port}")
}

#[test]
fn with_several_control_planes_a_request_goes_to_the_next_and_stays_there() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::create(&tmp.path().join("ca"), "site CA").unwrap();
    let dir = tmp.path().join("state");
    enrolled_in(&dir, &ca);
    // The first refuses (as a control plane that lost its database does), the
    // second is down, the third answers.
    let (refusing, refused) = fake_server_of(
        &ca,
        "503 Service Unavailable",
        r#"{"title":"Service Unavailable","status":503,"detail":"database unreachable"}"#,
        3,
    );
    let (answering, answered) = fake_server_of(&ca, "200 OK", r#"{"ok":true}"#, 3);
    let mut e = enrollment(&dir, &ca.ca_path(), &refusing);
    e.urls = vec![refusing.clone(), dead_url(), format!("{answering}/")];
    let client = ControlClient::open(&e, None).unwrap();
    assert_eq!(client.planes().current(), refusing);
    let got: serde_json::Value = client.call("/v1/heartbeat/agent", &"hi").unwrap();
    assert_eq!(got["ok"], true);
    assert_eq!(
        client.planes().current(),
        answering,
        "it stays with the one that answered"
    );
    let _: serde_json::Value = client.call("/v1/heartbeat/agent", &"again").unwrap();
    assert_eq!(answered.load(Ordering::SeqCst), 2);
    assert_eq!(
        refused.load(Ordering::SeqCst),
        1,
        "not asked again while the other answers"
    );
}

#[test]
fn when_every_control_plane_fails_the_error_names_each() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Authority::create(&tmp.path().join("ca"), "site CA").unwrap();
    let dir = tmp.path().join("state");
    enrolled_in(&dir, &ca);
    let (a, b) = (dead_url(), dead_url());
    let mut e = enrollment(&dir, &ca.ca_path(), &a);
    e.urls = vec![a.clone(), b.clone()];
    let client = ControlClient::open(&e, None).unwrap();
    let err = client
        .call::<_, serde_json::Value>("/v1/heartbeat/agent", &"hi")
        .unwrap_err();
    assert!(
        matches!(&err, ControlError::Every(all) if all.len() == 2),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.starts_with("every control plane failed: "), "{text}");
    assert!(text.contains(&a) && text.contains(&b), "{text}");
    assert_eq!(
        client.planes().current(),
        a,
        "nothing answered: where it was"
    );
}

#[test]
fn an_enrollment_refused_by_one_control_plane_is_taken_by_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    // The site's CA signs both servers: the token goes to the second after the
    // first fails; its answer (not a certificate) is then what is refused.
    let ca = Authority::create(&tmp.path().join("ca"), "site CA").unwrap();
    let (second, asked) = fake_server_of(&ca, "200 OK", r#"{"certificate":"?"}"#, 1);
    let dir = tmp.path().join("state");
    let mut e = enrollment(&dir, &ca.ca_path(), &second);
    e.urls = vec![dead_url(), second.clone()];
    let err = ControlClient::open(&e, Some("tok")).err().unwrap();
    assert!(
        matches!(&err, ControlError::Every(all) if all.len() == 2),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("POST {second}/v1/enroll")),
        "{err}"
    );
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert!(!IdentityFiles::in_dir(&dir).present());
}

#[test]
fn control_plane_urls_are_checked() {
    let one = |u: &str| vec![u.to_string()];
    assert!(matches!(
        ControlPlanes::new(&[]),
        Err(ControlError::Urls(w)) if w == "none given"
    ));
    assert!(matches!(
        ControlPlanes::new(&one("http://cp:8443")),
        Err(ControlError::Url(_))
    ));
    let many: Vec<String> = (0..=MAX_CONTROL_PLANES)
        .map(|i| format!("https://cp{i}:8443"))
        .collect();
    let e = ControlPlanes::new(&many).unwrap_err().to_string();
    assert!(e.contains("at most 16"), "{e}");
    let p = ControlPlanes::new(&[
        "https://a:1/".to_string(),
        " https://b:1".to_string(),
        "https://a:1".to_string(),
    ])
    .unwrap();
    assert_eq!(p.urls(), ["https://a:1", "https://b:1"]);
    assert_eq!(p.current(), "https://a:1");
}
