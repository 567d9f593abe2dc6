//! The recovery host's side of the heartbeat (`/v1/heartbeat/recovery-host`, every
//! second): its NBD address, free space, whether it reaches the store and the reports
//! of its items out; its orders in.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_link::control::client::Heartbeater;
use ferry_link::control::wire::{RecoveryHostHeartbeat, RecoveryHostOrders};

use super::store_probe::StoreHealth;
use super::{Host, Sent};

/// The JSON bytes of reports one heartbeat carries at most: with the rest of the
/// body, well under the API's 64 KiB limit. More wait for the next heartbeat.
pub const REPORT_BUDGET_BYTES: usize = 48 << 10;

pub struct Beat {
    pub host: Arc<Host>,
    pub name: String,
    pub work_dir: PathBuf,
    pub store_health: Arc<StoreHealth>,
    /// What the last heartbeat carried.
    sent: Sent,
}

impl Beat {
    pub fn new(
        host: Arc<Host>,
        name: String,
        work_dir: PathBuf,
        store_health: Arc<StoreHealth>,
    ) -> Beat {
        Beat {
            host,
            name,
            work_dir,
            store_health,
            sent: Vec::new(),
        }
    }
}

/// Free bytes for an unprivileged user on the file system holding `dir`; 0 when
/// unknown (the control plane then sees a host with no room).
pub fn free_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the right type.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: statvfs succeeded, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    st.f_bavail.saturating_mul(st.f_frsize)
}

impl Heartbeater for Beat {
    type Report = RecoveryHostHeartbeat;
    type Orders = RecoveryHostOrders;
    const PATH: &'static str = "/v1/heartbeat/recovery-host";

    fn report(&mut self) -> RecoveryHostHeartbeat {
        let (reports, sent) = self.host.reports(REPORT_BUDGET_BYTES);
        self.sent = sent;
        RecoveryHostHeartbeat {
            name: self.name.clone(),
            nbd_address: self.host.nbd_address.clone(),
            work_dir_free_bytes: free_bytes(&self.work_dir),
            store_error: self.store_health.error(),
            reports,
        }
    }

    fn apply(&mut self, orders: RecoveryHostOrders) -> f64 {
        self.host.acked(&self.sent);
        self.host.apply(orders.work);
        orders.heartbeat_interval_s
    }
}
