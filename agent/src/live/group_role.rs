//! The agent's place in its replication group, which a control plane's orders may
//! change at any heartbeat: a member (its listener answers the coordinator it names),
//! the coordinator (its point timer cuts with the members it lists), or neither. The
//! member's listener, bound at start from `--group-listen`, keeps running across
//! changes; what it accepts follows the membership of the moment.

use std::net::SocketAddr;

use super::group::{Coordinator, GroupPeer, GroupTls, Membership};
use super::Agent;

/// What the agent is to its group now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRole {
    None,
    /// Answers the cuts of `coordinator` for `group`.
    Member(Membership),
    /// Cuts group points of `group` with `peers` at every crash-point interval.
    Coordinator {
        group: String,
        peers: Vec<GroupPeer>,
    },
}

impl Agent {
    /// Where the member's listener is bound, if this agent has one.
    pub fn group_addr(&self) -> Option<SocketAddr> {
        self.group_addr
    }

    /// The group role now.
    pub fn group_role(&self) -> GroupRole {
        if let Some(c) = self.coordinator.lock().expect("coordinator lock").as_ref() {
            return GroupRole::Coordinator {
                group: c.group.clone(),
                peers: c.peers.clone(),
            };
        }
        match self.membership.lock().expect("membership lock").clone() {
            Some(m) => GroupRole::Member(m),
            None => GroupRole::None,
        }
    }

    /// Whether this agent cuts group points now.
    pub fn is_coordinator(&self) -> bool {
        self.coordinator.lock().expect("coordinator lock").is_some()
    }

    /// Takes `role` from now on; returns whether it changed. A coordinator's
    /// connections to its members are dropped with the old role (the next cut
    /// connects again); a member's open connections are closed at their next cut.
    /// Without the group channel's TLS (never loaded) no role but None can work: it
    /// is refused, and the agent keeps none.
    pub fn set_group_role(&self, role: GroupRole) -> Result<bool, NoGroupTls> {
        if self.group_role() == role {
            return Ok(false);
        }
        let tls = self.group_tls.lock().expect("group tls lock").clone();
        let (coordinator, membership) = match (role, tls) {
            (GroupRole::None, _) => (None, None),
            (GroupRole::Member(m), Some(_)) => (None, Some(m)),
            (GroupRole::Coordinator { group, peers }, Some(t)) => {
                (Some(Coordinator::new(group, peers, t.coordinator)), None)
            }
            (_, None) => {
                *self.coordinator.lock().expect("coordinator lock") = None;
                *self.membership.lock().expect("membership lock") = None;
                return Err(NoGroupTls);
            }
        };
        *self.coordinator.lock().expect("coordinator lock") = coordinator;
        *self.membership.lock().expect("membership lock") = membership;
        Ok(true)
    }

    /// The group channel's TLS from now on (a renewed certificate): a member's next
    /// connection and the coordinator's next connections use it.
    pub fn set_group_tls(&self, tls: GroupTls) {
        let mut c = self.coordinator.lock().expect("coordinator lock");
        if let Some(old) = c.take() {
            *c = Some(Coordinator::new(
                old.group,
                old.peers,
                tls.coordinator.clone(),
            ));
        }
        *self.group_tls.lock().expect("group tls lock") = Some(tls);
    }

    pub(super) fn membership_now(&self) -> Option<Membership> {
        self.membership.lock().expect("membership lock").clone()
    }

    pub(super) fn member_tls_now(&self) -> Option<std::sync::Arc<rustls::ServerConfig>> {
        self.group_tls
            .lock()
            .expect("group tls lock")
            .as_ref()
            .map(|t| t.member.clone())
    }
}

/// A group role asked of an agent started without the group channel's TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this agent has no certificate loaded for the group channel: it can take no group role")]
pub struct NoGroupTls;
