//! `ferry agent` and `ferry process-server` with `--control-plane`, as far as they go
//! without the control plane's enrollment endpoint answering yes: the two modes'
//! flags are not mixed, a first start needs a token, and a refused enrollment says
//! the control plane's reason and leaves no key behind.

use std::path::Path;

use ferry_testkit::process::{run, spawn};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn fails<S: AsRef<str>>(args: &[S]) -> String {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let args = &args[..];
    let out = run(Path::new(FERRY), args);
    assert!(!out.status.success(), "ferry {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn standalone_and_control_plane_flags_are_not_mixed() {
    let base = [
        "agent",
        "--machine",
        "m1",
        "--disk",
        "sda=/nonexistent",
        "--ca",
        "/nonexistent/ca.pem",
        "--control-plane",
        "https://127.0.0.1:1",
        "--state-dir",
        "/nonexistent/state",
    ];
    for extra in [
        &["--process-server", "127.0.0.1:9443"][..],
        &["--journal-dir", "/tmp/j"],
        &["--tls-cert", "/tmp/c.pem"],
        &["--crash-point-interval-s", "2"],
        // The group is the control plane's to give; only where to listen is a flag.
        &["--group", "g1"],
        &[
            "--group-listen",
            "127.0.0.1:20004",
            "--group-coordinator",
            "m0",
        ],
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let e = fails(&args);
        assert!(e.contains("cannot be used with"), "{extra:?}: {e}");
    }
    let e = fails(&base[..base.len() - 2]);
    assert!(e.contains("--state-dir"), "{e}");
    let e = fails(&[
        "process-server",
        "--cache-dir",
        "/tmp/c",
        "--store",
        "file:///tmp/s",
        "--key-file",
        "/tmp/k",
        "--control-plane",
        "https://127.0.0.1:1",
        "--ca",
        "/tmp/ca.pem",
    ]);
    assert!(e.contains("--advertise"), "{e}");
    let e = fails(&[
        "process-server",
        "--cache-dir",
        "/tmp/c",
        "--store",
        "file:///tmp/s",
        "--key-file",
        "/tmp/k",
        "--control-plane",
        "https://127.0.0.1:1",
        "--ca",
        "/tmp/ca.pem",
        "--advertise",
        "127.0.0.1:9443",
        "--tls-cert",
        "/tmp/c.pem",
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
}

#[test]
fn a_first_start_needs_a_token_and_a_refused_one_leaves_no_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cp_dir = tmp.path().join("cp");
    let (_cp, line) = spawn(
        Path::new(FERRY),
        &[
            "control-plane",
            "--state-dir",
            cp_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let url = line.trim().to_string();
    let ca = cp_dir.join("ca.pem");
    let state = tmp.path().join("agent");
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("sda={}", disk.display());
    let args = |token: Option<&'static str>| {
        let mut a = vec![
            "agent".to_string(),
            "--control-plane".into(),
            url.clone(),
            "--ca".into(),
            ca.display().to_string(),
            "--machine".into(),
            "m1".into(),
            "--disk".into(),
            disk_arg.clone(),
            "--nbd-listen".into(),
            "127.0.0.1:0".into(),
            "--state-dir".into(),
            state.display().to_string(),
        ];
        if let Some(t) = token {
            a.extend(["--enroll-token".to_string(), t.to_string()]);
        }
        a
    };
    let no_token = args(None);
    let e = fails(&no_token);
    assert!(
        e.contains("no certificate yet") && e.contains("--enroll-token"),
        "{e}"
    );

    let forged = args(Some("ferry_enroll_forged"));
    let e = fails(&forged);
    eprintln!("a forged token: {e}");
    // The control plane's status and problem detail, on the request's line.
    assert!(e.contains(&format!("POST {url}/v1/enroll: 4")), "{e}");
    assert!(
        !state.join("key.pem").exists(),
        "no key kept without a certificate"
    );
    assert!(!state.join("cert.pem").exists());

    // Several control planes, as a comma list: the token goes to the next when the
    // first is down, and the error names what each said.
    let down = "https://127.0.0.1:1";
    let mut listed = forged.clone();
    listed[2] = format!("{down},{url}");
    let e = fails(&listed);
    assert!(e.contains("every control plane failed"), "{e}");
    assert!(e.contains(&format!("POST {down}/v1/enroll")), "{e}");
    assert!(e.contains(&format!("POST {url}/v1/enroll: 4")), "{e}");
    // Or the flag repeated: each URL is checked.
    let mut repeated = forged.clone();
    repeated.extend(["--control-plane".to_string(), "http://127.0.0.1:2".into()]);
    let e = fails(&repeated);
    assert!(
        e.contains("control plane URL http://127.0.0.1:2 must start with https://"),
        "{e}"
    );
    assert!(!state.join("key.pem").exists());
}
