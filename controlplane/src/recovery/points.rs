//! Recovery points of a machine, and choosing one for every disk.
//!
//! An id names the same instant on every disk that has it (the agent cuts one point
//! across all disks of a machine). `latest`, `latest-app` and a time choose among the
//! points that every disk has; a machine whose disks were seeded one by one has none in
//! common, so then each disk takes its own newest matching point and the caller is told.

use chrono::{DateTime, Utc};
use ferry_replica::disk::list_disks;
use ferry_replica::{Disk, DiskState, Point, PointKind, Store, VaultKey};
use serde::Serialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum PointSpec {
    Latest,
    LatestApp,
    Id(String),
    Time(DateTime<Utc>),
}

impl std::str::FromStr for PointSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why| Error::BadPointSpec {
            spec: s.to_string(),
            why,
        };
        match s {
            "" => Err(bad("is empty")),
            "latest" => Ok(PointSpec::Latest),
            "latest-app" => Ok(PointSpec::LatestApp),
            s => match DateTime::parse_from_rfc3339(s) {
                Ok(t) => Ok(PointSpec::Time(t.with_timezone(&Utc))),
                Err(_) if s.len() > 4 && s.as_bytes()[4] == b'-' && s.contains(':') => {
                    Err(bad("is neither a point id nor an RFC 3339 time"))
                }
                Err(_) => Ok(PointSpec::Id(s.to_string())),
            },
        }
    }
}

impl std::fmt::Display for PointSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointSpec::Latest => f.write_str("latest"),
            PointSpec::LatestApp => f.write_str("latest-app"),
            PointSpec::Id(id) => write!(f, "point {id}"),
            PointSpec::Time(t) => write!(f, "the newest point at or before {}", t.to_rfc3339()),
        }
    }
}

impl PointSpec {
    /// "a point ..." phrase for messages about a disk that has none.
    fn wanted(&self) -> String {
        match self {
            PointSpec::Latest => "recovery point".into(),
            PointSpec::LatestApp => "app-consistent point".into(),
            PointSpec::Id(id) => format!("point {id}"),
            PointSpec::Time(t) => format!("point at or before {}", t.to_rfc3339()),
        }
    }

    fn admits(&self, p: &Point) -> bool {
        match self {
            PointSpec::Latest => true,
            PointSpec::LatestApp => p.kind == PointKind::App,
            PointSpec::Id(id) => &p.id == id,
            PointSpec::Time(t) => p.time <= *t,
        }
    }
}

/// One disk of a machine, opened, with its state.
pub struct MachineDisk {
    pub name: String,
    pub disk: Disk,
    pub state: DiskState,
}

/// Opens every disk of `machine`.
pub fn open_machine(
    store: &Store,
    machine: &str,
    vault: Option<&VaultKey>,
) -> Result<Vec<MachineDisk>> {
    let names = store.block(list_disks(store, machine))?;
    if names.is_empty() {
        return Err(Error::NoMachine {
            machine: machine.to_string(),
            store: store.name().to_string(),
        });
    }
    names
        .into_iter()
        .map(|name| {
            let disk = store.block(Disk::open(store, machine, &name, vault))?;
            let state = store.block(disk.load_state())?;
            Ok(MachineDisk { name, disk, state })
        })
        .collect()
}

/// One row of `ferry points`.
#[derive(Debug, Clone, Serialize)]
pub struct PointRow {
    pub disk: String,
    #[serde(flatten)]
    pub point: Point,
}

/// Every point of every disk, newest first.
pub fn list_points(disks: &[MachineDisk]) -> Vec<PointRow> {
    let mut rows: Vec<PointRow> = disks
        .iter()
        .flat_map(|d| {
            d.state.points.iter().map(|p| PointRow {
                disk: d.name.clone(),
                point: p.clone(),
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        (b.point.time, b.point.seq, &a.disk).cmp(&(a.point.time, a.point.seq, &b.disk))
    });
    rows
}

/// The point chosen for each disk, in the order of `disks`, and a note when the disks
/// have no matching point in common.
pub fn choose(
    machine: &str,
    disks: &[MachineDisk],
    spec: &PointSpec,
) -> Result<(Vec<Point>, Option<String>)> {
    let newest = |d: &MachineDisk| -> Option<Point> {
        d.state
            .points
            .iter()
            .filter(|p| spec.admits(p))
            .max_by_key(|p| (p.time, p.seq))
            .cloned()
    };
    if let PointSpec::Id(id) = spec {
        let lacking: Vec<&str> = disks
            .iter()
            .filter(|d| d.state.point(id).is_none())
            .map(|d| d.name.as_str())
            .collect();
        if !lacking.is_empty() {
            return Err(Error::NotAPoint {
                id: id.clone(),
                machine: machine.to_string(),
                disks: lacking.join(", "),
            });
        }
        return Ok((
            disks
                .iter()
                .filter_map(|d| d.state.point(id).cloned())
                .collect(),
            None,
        ));
    }
    // Newest point admitted on the first disk whose id every disk has.
    let first = &disks[0];
    let mut shared: Vec<&Point> = first
        .state
        .points
        .iter()
        .filter(|p| spec.admits(p) && disks.iter().all(|d| d.state.point(&p.id).is_some()))
        .collect();
    shared.sort_by_key(|p| (p.time, p.seq));
    if let Some(p) = shared.last() {
        let chosen = disks
            .iter()
            .filter_map(|d| d.state.point(&p.id).cloned())
            .collect();
        return Ok((chosen, None));
    }
    let mut chosen = Vec::with_capacity(disks.len());
    for d in disks {
        chosen.push(newest(d).ok_or_else(|| Error::NoPoint {
            machine: machine.to_string(),
            disk: d.name.clone(),
            wanted: spec.wanted(),
        })?);
    }
    let note = (disks.len() > 1).then(|| {
        format!("the disks of machine {machine} share no point matching {spec}; each disk is rebuilt at its own")
    });
    Ok((chosen, note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_specs_parse_or_say_what_is_wrong() {
        assert_eq!("latest".parse::<PointSpec>().unwrap(), PointSpec::Latest);
        assert_eq!(
            "20260101T000000.000Z-0a".parse::<PointSpec>().unwrap(),
            PointSpec::Id("20260101T000000.000Z-0a".into())
        );
        let e = "2026-01-01 00:00".parse::<PointSpec>().unwrap_err();
        assert!(matches!(e, Error::BadPointSpec { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "point \"2026-01-01 00:00\" is neither a point id nor an RFC 3339 time"
        );
        assert!(matches!(
            "".parse::<PointSpec>(),
            Err(Error::BadPointSpec { .. })
        ));
    }
}
