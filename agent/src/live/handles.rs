//! The agent's narrow handles: what the group channel (`group::GroupSide`) and the
//! admin socket (`admin::Control`) may do with it, implemented here so that neither
//! module reaches into the agent.

use std::sync::MutexGuard;
use std::time::Duration;

use ferry_link::protocol::PointKindWire;

use super::capture::{Capture, State};
use super::{admin, group, Agent};
use crate::error::{Error, Result};

/// The group channel's view of the agent: points and held writes on its disks.
impl group::GroupSide for Agent {
    fn can_point(&self) -> Result<()> {
        Agent::can_point(self)
    }

    fn hold_writes(&self) -> Box<dyn group::HeldWrites + '_> {
        Box::new(Held(
            self.disks
                .iter()
                .map(|d| (&*d.capture, d.capture.state()))
                .collect(),
        ))
    }

    fn record_pause(&self, pause: Duration) {
        Agent::record_pause(self, pause)
    }

    fn membership(&self) -> Option<group::Membership> {
        self.membership_now()
    }

    fn member_tls(&self) -> Option<std::sync::Arc<rustls::ServerConfig>> {
        self.member_tls_now()
    }
}

/// Every disk's capture lock, taken in the disks' order: writes wait until dropped.
struct Held<'a>(Vec<(&'a Capture, MutexGuard<'a, State>)>);

impl group::HeldWrites for Held<'_> {
    fn journal_point(&mut self, group: &str, id: &str) -> Result<()> {
        for (cap, st) in &mut self.0 {
            cap.bookmark_locked(st, PointKindWire::Group, "", group, id)
                .map_err(|source| Error::Disk {
                    disk: cap.disk.clone(),
                    op: "journaling the group point",
                    source,
                })?;
        }
        Ok(())
    }
}

/// The admin socket's view of the agent: points, resyncs and status on request.
impl admin::Control for Agent {
    fn bookmark(&self, app: bool, label: Option<&str>) -> Result<String> {
        Agent::bookmark(self, app, label)
    }

    fn resync(&self, disk: Option<&str>) -> Result<Vec<String>> {
        Agent::resync(self, disk)
    }

    fn status(&self) -> Vec<serde_json::Value> {
        Agent::status(self)
    }
}
