//! An item's files on the recovery host: `WORK_DIR/items/ID/` holds `item.json` (the
//! `wire::WorkItem` as ordered), `state.json` (its last `wire::WorkReport`, absent
//! while it waits for its turn) and whatever the item made (images, the overlay,
//! `output.log`). Both JSON files are replaced whole (written aside, synced,
//! renamed), so a kill -9 leaves the old or the new one, never half of one: this is
//! what a restart resumes from.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferry_link::control::wire::{WorkItem, WorkReport};

/// The folder of item `id` under `items`; an id that could escape it (a separator,
/// `..`) is refused, since ids come from the control plane.
pub fn item_dir(items: &Path, id: &str) -> Result<PathBuf> {
    if id.is_empty()
        || id.len() > 200
        || id.starts_with('.')
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("work item id {id:?} is not a plain name (letters, digits, - _ .)");
    }
    Ok(items.join(id))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// Creates the item's folder (owner only: images hold disks in the clear) and its
/// `item.json`.
pub fn save_item(dir: &Path, item: &WorkItem) -> Result<()> {
    ferry_replica::local::create_private_dir(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(item).context("encode a work item")?;
    write_atomic(&dir.join("item.json"), &json)
}

pub fn save_report(dir: &Path, report: &WorkReport) -> Result<()> {
    let json = serde_json::to_vec_pretty(report).context("encode a work report")?;
    write_atomic(&dir.join("state.json"), &json)
}

/// Every item found under `items`, with its last report if it had one. A folder
/// whose `item.json` is missing or unreadable (killed while creating it) is skipped:
/// the control plane orders it again and it starts over.
pub fn load_all(items: &Path) -> Result<Vec<(WorkItem, Option<WorkReport>)>> {
    let mut out = Vec::new();
    let list = match std::fs::read_dir(items) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("list {}", items.display())),
    };
    for e in list {
        let e = e.with_context(|| format!("list {}", items.display()))?;
        let dir = e.path();
        let item: WorkItem = match std::fs::read(dir.join("item.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(i) => i,
            None => {
                tracing::warn!(dir = %dir.display(), "an item folder without a readable item.json: skipped");
                continue;
            }
        };
        let report = match std::fs::read(dir.join("state.json")) {
            Ok(b) => Some(
                serde_json::from_slice(&b)
                    .with_context(|| format!("{}: state.json unreadable", dir.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("read {}/state.json", dir.display())),
        };
        out.push((item, report));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_link::control::wire::WorkOp;

    #[test]
    fn items_and_reports_come_back_and_ids_cannot_escape() {
        let tmp = tempfile::tempdir().unwrap();
        let items = tmp.path().join("items");
        assert!(load_all(&items).unwrap().is_empty());
        for bad in ["", "..", "../x", "a/b", ".hidden"] {
            assert!(item_dir(&items, bad).is_err(), "{bad:?}");
        }
        let item = WorkItem {
            id: "j1-0-m1".into(),
            machine: "m1".into(),
            op: WorkOp::Remove { items: vec![] },
        };
        let dir = item_dir(&items, &item.id).unwrap();
        save_item(&dir, &item).unwrap();
        assert_eq!(load_all(&items).unwrap(), vec![(item.clone(), None)]);
        let report = WorkReport {
            id: item.id.clone(),
            state: "succeeded".into(),
            progress: 1.0,
            bytes_per_s: 0.0,
            error: None,
            result: None,
            disks: Vec::new(),
        };
        save_report(&dir, &report).unwrap();
        assert_eq!(load_all(&items).unwrap(), vec![(item, Some(report))]);
        // A folder killed before its item.json was written is skipped.
        std::fs::create_dir(items.join("half")).unwrap();
        assert_eq!(load_all(&items).unwrap().len(), 1);
    }
}
