//! A machine's start action: a command template (`actions.start`) the control plane
//! expands once the machine's disks are up, and a recovery host runs detached (a
//! `start` work item). Placeholders: `{nbd_url}` and `{disk_path}` (the first disk
//! by name), `{nbd_url:DISK}`, `{disk_path:DISK}`, `{machine}`, `{point}`; `{{` and
//! `}}` are literal braces. The environment carries FERRY_MACHINE, FERRY_POINT and
//! FERRY_DISKS (`DISK=path-or-url`, space separated).

use std::collections::BTreeMap;

use ferry_link::control::wire::ReadyDisk;

/// The longest template taken: a long qemu line is a few hundred bytes.
pub const MAX_TEMPLATE_BYTES: usize = 8 * 1024;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq)]
enum Piece<'a> {
    Text(&'a str),
    /// A placeholder's name and its disk, if it names one.
    Field(&'a str, Option<&'a str>),
}

/// Splits `t` into text and placeholders, refusing what it cannot expand.
fn parse(t: &str) -> Result<Vec<Piece<'_>>, String> {
    if t.trim().is_empty() {
        return Err("the start action is empty".into());
    }
    if t.len() > MAX_TEMPLATE_BYTES {
        return Err(format!(
            "the start action is {} bytes, over {MAX_TEMPLATE_BYTES}",
            t.len()
        ));
    }
    let mut out = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{{") {
            out.push(Piece::Text("{"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            out.push(Piece::Text("}"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| format!("the start action has a '{{' without its '}}': {rest:?}"))?;
            let inner = &r[..end];
            let (name, disk) = match inner.split_once(':') {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let known = match disk {
                None => matches!(name, "nbd_url" | "disk_path" | "machine" | "point"),
                Some(d) => {
                    matches!(name, "nbd_url" | "disk_path")
                        && ferry_replica::layout::check_name("disk", d).is_ok()
                }
            };
            if !known {
                return Err(format!(
                    "the start action has an unknown placeholder {{{inner}}}: known are \
                     {{nbd_url}}, {{disk_path}}, {{nbd_url:DISK}}, {{disk_path:DISK}}, \
                     {{machine}}, {{point}} (and {{{{ }}}} for braces)"
                ));
            }
            out.push(Piece::Field(name, disk));
            rest = &r[end + 1..];
        } else if rest.starts_with('}') {
            return Err(format!(
                "the start action has a '}}' without its '{{': {rest:?} (write }}}} for one)"
            ));
        } else {
            let end = rest.find(['{', '}']).unwrap_or(rest.len());
            out.push(Piece::Text(&rest[..end]));
            rest = &rest[end..];
        }
    }
    Ok(out)
}

/// Checks a template as `PATCH /v1/machines/{name}` takes it: the error is a 400.
pub fn check(t: &str) -> Result<(), String> {
    parse(t).map(|_| ())
}

/// Where a ready disk is: its NBD URL or its file, whichever it has.
fn location(d: &ReadyDisk) -> &str {
    d.nbd_url.as_deref().or(d.path.as_deref()).unwrap_or("")
}

/// The command and its environment for `machine`'s disks (sorted by name).
pub fn expand(
    t: &str,
    machine: &str,
    point: &str,
    disks: &[ReadyDisk],
) -> Result<(String, BTreeMap<String, String>), String> {
    let mut disks: Vec<&ReadyDisk> = disks.iter().collect();
    disks.sort_by(|a, b| a.disk.cmp(&b.disk));
    let first = disks
        .first()
        .ok_or_else(|| format!("machine {machine} has no disk up to start it with"))?;
    let mut cmd = String::new();
    for piece in parse(t)? {
        let (name, disk) = match piece {
            Piece::Text(s) => {
                cmd.push_str(s);
                continue;
            }
            Piece::Field(n, d) => (n, d),
        };
        let d = match disk {
            None => first,
            Some(want) => disks.iter().find(|d| d.disk == want).ok_or_else(|| {
                format!("the start action names disk {want}, which machine {machine} does not have")
            })?,
        };
        let value = match name {
            "machine" => machine,
            "point" => point,
            "nbd_url" => d.nbd_url.as_deref().ok_or_else(|| {
                format!(
                    "the start action uses {{nbd_url}}, but disk {} was built as a file: \
                     use {{disk_path}} or the nbd target",
                    d.disk
                )
            })?,
            _ => d.path.as_deref().ok_or_else(|| {
                format!(
                    "the start action uses {{disk_path}}, but disk {} is served over NBD: \
                     use {{nbd_url}} or a dir target",
                    d.disk
                )
            })?,
        };
        cmd.push_str(value);
    }
    let env = BTreeMap::from([
        ("FERRY_MACHINE".to_string(), machine.to_string()),
        ("FERRY_POINT".to_string(), point.to_string()),
        (
            "FERRY_DISKS".to_string(),
            disks
                .iter()
                .map(|d| format!("{}={}", d.disk, location(d)))
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ]);
    Ok((cmd, env))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, url: Option<&str>, path: Option<&str>) -> ReadyDisk {
        ReadyDisk {
            disk: name.into(),
            point: "p1".into(),
            path: path.map(str::to_string),
            nbd_url: url.map(str::to_string),
            bytes: 1 << 20,
        }
    }

    #[test]
    fn placeholders_expand_per_disk_and_the_environment_lists_every_disk() {
        let disks = [
            disk("sdb", Some("nbd://h:1/m1/sdb"), None),
            disk("sda", Some("nbd://h:1/m1/sda"), None),
        ];
        let (cmd, env) = expand(
            "qemu -drive {nbd_url} -drive {nbd_url:sdb} -name {machine}@{point} {{x}}",
            "m1",
            "p1",
            &disks,
        )
        .unwrap();
        assert_eq!(
            cmd,
            "qemu -drive nbd://h:1/m1/sda -drive nbd://h:1/m1/sdb -name m1@p1 {x}"
        );
        assert_eq!(env["FERRY_MACHINE"], "m1");
        assert_eq!(env["FERRY_POINT"], "p1");
        assert_eq!(
            env["FERRY_DISKS"],
            "sda=nbd://h:1/m1/sda sdb=nbd://h:1/m1/sdb"
        );
        let files = [disk("sda", None, Some("/w/items/x/sda.raw"))];
        let (cmd, _) = expand("boot {disk_path:sda}", "m1", "p1", &files).unwrap();
        assert_eq!(cmd, "boot /w/items/x/sda.raw");
    }

    #[test]
    fn what_cannot_expand_is_refused_naming_it() {
        for (t, want) in [
            ("run {nbd}", "unknown placeholder {nbd}"),
            ("run {nbd_url:../x}", "unknown placeholder {nbd_url:../x}"),
            ("run {machine", "without its '}'"),
            ("run }", "without its '{'"),
            ("  ", "empty"),
        ] {
            let e = check(t).unwrap_err();
            assert!(e.contains(want), "{t}: {e}");
        }
        assert!(check("run {nbd_url:sda} {{}}").is_ok());
        let served = [disk("sda", Some("nbd://h:1/m1/sda"), None)];
        let e = expand("boot {disk_path}", "m1", "p1", &served).unwrap_err();
        assert!(e.contains("served over NBD"), "{e}");
        let e = expand("boot {nbd_url:sdz}", "m1", "p1", &served).unwrap_err();
        assert!(e.contains("disk sdz"), "{e}");
    }
}
