//! The failback verbs of `ferry cp machines` (docs/failback.md): reprotect, failback
//! and re-enable. They POST to `/v1/machines/{name}/reprotect`, `.../failover` with
//! the direction home, and `.../re-enable`, and follow the job like the recovery
//! verbs.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use ferry_replica::layout::check_name;
use serde_json::{json, Value};

use super::client::cell;
use super::recovery::Wait;

#[derive(clap::Args, Debug)]
pub struct Reprotect {
    /// The machine, failed over and committed
    pub name: String,
    /// The recovery host at the home site that writes the home disks (`ferry cp
    /// recovery-hosts list`)
    #[arg(long, value_name = "HOST")]
    pub master_target: String,
    /// A disk and its home disk on the master target (the original, or a new disk at
    /// least its size), as DISK=PATH; one for every disk of the machine
    #[arg(long = "disk", value_name = "DISK=PATH")]
    pub disks: Vec<String>,
    #[command(flatten)]
    pub wait: Wait,
}

/// One `--disk KEY=PATH` argument (`shape` names its form in errors): the key and
/// the home disk's path, which must be absolute.
pub fn home_disk_arg<'a>(arg: &'a str, shape: &str) -> Result<(&'a str, &'a str)> {
    let Some((key, path)) = arg.split_once('=') else {
        bail!("--disk {arg:?} must be {shape}");
    };
    if !path.starts_with('/') {
        bail!("--disk {arg}: the home disk's path must be absolute");
    }
    Ok((key, path))
}

/// The request `reprotect` makes: its path and JSON body.
pub fn reprotect(a: &Reprotect) -> Result<(String, Value)> {
    check_name("machine", &a.name)?;
    check_name("master target", &a.master_target)?;
    let mut disks = BTreeMap::new();
    for d in &a.disks {
        let (disk, path) = home_disk_arg(d, "DISK=PATH")?;
        check_name("disk", disk)?;
        if disks.insert(disk.to_string(), path.to_string()).is_some() {
            bail!("--disk {disk} is given twice");
        }
    }
    Ok((
        format!("/v1/machines/{}/reprotect", a.name),
        json!({"master_target": a.master_target, "disks": disks}),
    ))
}

#[derive(clap::Args, Debug)]
pub struct Failback {
    /// The machine, reprotected (direction reverse)
    pub name: String,
    /// The recovery site is lost: apply the newest reverse point in the store (or
    /// applied so far) instead of freezing the machine there and taking a final point
    #[arg(long)]
    pub unplanned: bool,
    #[command(flatten)]
    pub wait: Wait,
}

/// The request `failback` makes: its path and JSON body.
pub fn failback(a: &Failback) -> Result<(String, Value)> {
    check_name("machine", &a.name)?;
    Ok((
        format!("/v1/machines/{}/failover", a.name),
        json!({"direction": "home", "planned": !a.unplanned}),
    ))
}

/// What a failback job's, its commit's and a re-enable's params say, one line each
/// (after a reprotect's synced disks): applied points, things deleted or left, the
/// home agent's resynced disks.
pub fn lines(job: &Value) -> Vec<String> {
    let mut out = synced_lines(job);
    let Some(p) = job.get("params") else {
        return out;
    };
    let machine = cell(p, "machine");
    let list = |k: &str| {
        p.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    for d in list("applied") {
        let verified = match d.get("verified").and_then(Value::as_bool) {
            Some(true) => "verified",
            Some(false) => "not verified",
            None => "not checked",
        };
        out.push(format!(
            "{machine} {} applied: point {}, {} bytes written, {verified}",
            cell(&d, "disk"),
            cell(&d, "point"),
            d.get("total_bytes_written")
                .and_then(Value::as_u64)
                .unwrap_or(0)
        ));
    }
    for (key, what) in [("deleted", "deleted"), ("left", "left")] {
        for d in list(key) {
            out.push(format!("{machine} {what}: {}", d.as_str().unwrap_or("?")));
        }
    }
    for d in list("resynced") {
        let n = |k: &str| {
            d.get("resync")
                .and_then(|r| r.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        out.push(format!(
            "{machine} {} resynced: {}, {} of {} bytes compared, {} bytes sent, newest point {}",
            cell(&d, "name"),
            cell(&d, "state"),
            n("compared_bytes"),
            n("total_bytes"),
            n("sent_bytes"),
            d.get("newest_uploaded_point")
                .map_or_else(|| "-".to_string(), |pt| cell(pt, "id"))
        ));
    }
    out
}

/// `MACHINE DISK synced: ...`, one per disk a reprotect job synced (its
/// `params.synced`).
pub fn synced_lines(job: &Value) -> Vec<String> {
    let machine = job
        .get("params")
        .map_or_else(|| "-".to_string(), |p| cell(p, "machine"));
    job.get("params")
        .and_then(|p| p.get("synced"))
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|d| {
            let n = |k: &str| d.get(k).and_then(Value::as_u64).unwrap_or(0);
            format!(
                "{machine} {} synced: {} of {} blocks differed, {} bytes written, {} bytes \
                 fetched, {} bytes stored{}",
                cell(d, "disk"),
                n("blocks_differing"),
                n("blocks"),
                n("bytes_written"),
                n("bytes_fetched"),
                n("bytes_stored"),
                if d.get("identical") == Some(&Value::Bool(true)) {
                    ", identical"
                } else {
                    ""
                }
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        r: Reprotect,
    }

    fn parse(args: &[&str]) -> Result<(String, Value)> {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        reprotect(&Cli::try_parse_from(all).unwrap().r)
    }

    #[test]
    fn the_body_follows_the_api_and_bad_disks_are_refused_before_sending() {
        let (path, body) = parse(&[
            "m1",
            "--master-target",
            "rh1",
            "--disk",
            "sda=/dev/sdb",
            "--disk",
            "sdb=/h/b.raw",
        ])
        .unwrap();
        assert_eq!(path, "/v1/machines/m1/reprotect");
        assert_eq!(
            body,
            json!({"master_target": "rh1", "disks": {"sda": "/dev/sdb", "sdb": "/h/b.raw"}})
        );
        for (bad, says) in [
            ("sda", "DISK=PATH"),
            ("sda=rel", "absolute"),
            ("../x=/a", "disk"),
        ] {
            let e = parse(&["m1", "--master-target", "rh1", "--disk", bad]).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{bad}: {e:#}");
        }
        let e = parse(&[
            "m1",
            "--master-target",
            "rh1",
            "--disk",
            "sda=/a",
            "--disk",
            "sda=/b",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[derive(Parser)]
    struct FbCli {
        #[command(flatten)]
        f: Failback,
    }

    #[test]
    fn failback_posts_the_direction_home_planned_unless_unplanned() {
        let f = |args: &[&str]| {
            let mut all = vec!["x"];
            all.extend_from_slice(args);
            failback(&FbCli::try_parse_from(all).unwrap().f)
        };
        assert_eq!(
            f(&["m1"]).unwrap(),
            (
                "/v1/machines/m1/failover".to_string(),
                json!({"direction": "home", "planned": true})
            )
        );
        assert_eq!(
            f(&["m1", "--unplanned"]).unwrap().1,
            json!({"direction": "home", "planned": false})
        );
        assert!(f(&["../m"]).is_err());
    }

    #[test]
    fn failback_commit_and_re_enable_print_what_they_did() {
        let job = json!({"params": {"machine": "m1",
            "applied": [{"disk": "sda", "point": "RF", "total_bytes_written": 8192,
                "verified": true}],
            "deleted": ["rh1: file /w/items/j-1-m1"], "left": ["rh2: work item x (host not live)"],
            "resynced": [{"name": "sda", "state": "protected",
                "newest_uploaded_point": {"id": "H1"},
                "resync": {"compared_bytes": 4096, "total_bytes": 4096, "sent_bytes": 512}}]}});
        assert_eq!(
            lines(&job),
            [
                "m1 sda applied: point RF, 8192 bytes written, verified",
                "m1 deleted: rh1: file /w/items/j-1-m1",
                "m1 left: rh2: work item x (host not live)",
                "m1 sda resynced: protected, 4096 of 4096 bytes compared, 512 bytes sent, newest point H1",
            ]
        );
    }

    #[test]
    fn synced_disks_print_what_they_took() {
        let job = json!({"params": {"machine": "m1", "synced": [{"disk": "sda", "blocks": 256,
            "blocks_differing": 3, "bytes_written": 12288, "bytes_fetched": 99,
            "bytes_stored": 4112, "identical": true}]}});
        assert_eq!(
            synced_lines(&job),
            [
                "m1 sda synced: 3 of 256 blocks differed, 12288 bytes written, 99 bytes fetched, \
              4112 bytes stored, identical"
            ]
        );
    }
}
