//! A loopback deployment driven through the `ferry` binary, as a person would: the
//! arguments of a process server and an agent over the PKI, vault key and store that
//! `ferry certs` and `ferry keygen` made under one directory, and the agent's admin
//! socket (`ferry agent ctl`). Every function takes the binary's path (see `process`).

use std::path::Path;
use std::time::Duration;

use crate::process::run_ok;
use crate::wait::wait_ok;

/// Makes `d/pki` (certificates for `agents` agents), `d/vault.key` and an empty
/// `d/store`; returns the store's URL.
pub fn site(bin: &Path, d: &Path, agents: usize) -> String {
    let p = |s: &str| d.join(s).display().to_string();
    std::fs::create_dir_all(d.join("store")).expect("making the store directory");
    run_ok(
        bin,
        &["certs", "--out", &p("pki"), "--agents", &agents.to_string()],
    );
    run_ok(bin, &["keygen", "--out", &p("vault.key")]);
    format!("file://{}", p("store"))
}

/// `ferry process-server` on `listen` for the site under `d` (its cache in `d/cache`),
/// two shards, 20 ms batches, a cache of `cache_gib`.
pub fn server_args(d: &Path, listen: &str, cache_gib: &str) -> Vec<String> {
    let p = |s: &str| d.join(s).display().to_string();
    let args = [
        "process-server",
        "--listen",
        listen,
        "--metrics-listen",
        "127.0.0.1:0",
        "--cache-dir",
        &p("cache"),
        "--store",
        &format!("file://{}", p("store")),
        "--key-file",
        &p("vault.key"),
        "--tls-cert",
        &p("pki/server.pem"),
        "--tls-key",
        &p("pki/server.key"),
        "--client-ca",
        &p("pki/ca.pem"),
        "--shards",
        "2",
        "--batch-ms",
        "20",
        "--cache-gib",
        cache_gib,
    ];
    args.iter().map(|s| s.to_string()).collect()
}

/// The process server's agent address, from the first line it prints.
pub fn server_addr(first_line: &str) -> String {
    first_line
        .split_whitespace()
        .nth(4)
        .unwrap_or_else(|| panic!("no address in {first_line:?}"))
        .to_string()
}

/// `ferry agent` for machine `machine` with agent certificate `cert` (`agent-0`, ...)
/// of the site under `d`, its disk `disk` (NAME=PATH), its journal in `d/journal`.
pub fn agent_args(
    d: &Path,
    server: &str,
    machine: &str,
    cert: &str,
    disk: &str,
    nbd_listen: &str,
) -> Vec<String> {
    let p = |s: &str| d.join(s).display().to_string();
    let args = [
        "agent",
        "--process-server",
        server,
        "--machine",
        machine,
        "--disk",
        disk,
        "--nbd-listen",
        nbd_listen,
        "--journal-dir",
        &p("journal"),
        "--tls-cert",
        &p(&format!("pki/{cert}.pem")),
        "--tls-key",
        &p(&format!("pki/{cert}.key")),
        "--ca",
        &p("pki/ca.pem"),
    ];
    args.iter().map(|s| s.to_string()).collect()
}

/// The first disk's status, from `ferry agent ctl status --json`.
pub fn status(bin: &Path, sock: &Path) -> serde_json::Value {
    let sock = sock.display().to_string();
    let out = run_ok(
        bin,
        &["agent", "ctl", "--admin-socket", &sock, "status", "--json"],
    );
    let all: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status {out:?}: {e}"));
    all[0].clone()
}

/// Waits (up to a minute) until the agent is connected, copying done, and every write
/// it journaled is uploaded.
pub fn wait_uploaded(bin: &Path, sock: &Path) {
    wait_ok("every write uploaded", Duration::from_secs(60), || {
        let s = status(bin, sock);
        if s["mode"] == "data"
            && s["uploaded"].as_u64() >= s["next_seq"].as_u64()
            && s["connected"] == true
        {
            Ok(())
        } else {
            Err(s)
        }
    })
}

/// Takes a point now through the agent's admin socket (`ferry agent ctl bookmark
/// --label LABEL`); returns its id.
pub fn bookmark(bin: &Path, sock: &Path, label: &str) -> String {
    let sock = sock.display().to_string();
    let out = run_ok(
        bin,
        &[
            "agent",
            "ctl",
            "--admin-socket",
            &sock,
            "bookmark",
            "--label",
            label,
        ],
    );
    out.lines()
        .last()
        .unwrap_or_else(|| panic!("bookmark printed nothing"))
        .trim()
        .to_string()
}
