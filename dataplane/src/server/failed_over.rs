//! Machines that failed over to the recovery site, as the process server's heartbeat
//! brings them (`ProcessServerOrders::failed_over`; docs/recovery.md, "No split brain"): a
//! Hello for one of their disks is refused with Error(failed over), and an open
//! session of one is closed before its next frame reaches the cache. The source of a
//! failed-over machine must not write to the replica any more: the machine runs at
//! the recovery site, and writes of the old source would be a second, diverging
//! history (split brain).

use super::listed::Listed;

#[derive(Debug, Default)]
pub struct FailedOver {
    machines: Listed,
}

impl FailedOver {
    /// Replaces the list; returns whether it changed.
    pub fn replace(&self, machines: &[String]) -> bool {
        self.machines.replace(machines.iter().cloned())
    }

    pub fn generation(&self) -> u64 {
        self.machines.generation()
    }

    pub fn len(&self) -> usize {
        self.machines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.machines.is_empty()
    }

    /// Why `machine`'s agent is refused, if it failed over.
    pub fn refusal(&self, machine: &str) -> Option<String> {
        self.machines.contains(machine).then(|| {
            format!(
                "machine {machine} failed over to the recovery site: its source may not \
                     replicate any more (stop writing; its disks are read-only)"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_over_machine_is_refused_until_the_list_drops_it() {
        let f = FailedOver::default();
        assert_eq!(f.refusal("m1"), None);
        let g = f.generation();
        assert!(f.replace(&["m1".to_string()]));
        assert!(f.generation() > g);
        let why = f.refusal("m1").unwrap();
        assert!(why.contains("m1") && why.contains("failed over"), "{why}");
        assert_eq!(f.refusal("m2"), None);
        let g = f.generation();
        assert!(
            !f.replace(&["m1".to_string()]),
            "the same list is no change"
        );
        assert_eq!(f.generation(), g);
        assert!(f.replace(&[]));
        assert_eq!(f.refusal("m1"), None, "the failover was cancelled");
        assert!(f.is_empty());
    }
}
