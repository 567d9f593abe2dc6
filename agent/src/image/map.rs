//! A read-only memory map of a whole source image, so that a seed compresses straight
//! from the page cache instead of copying every byte into a buffer first (the copy was
//! about 6 % of a first seed's CPU, profiled).
//!
//! The one hazard of a map is a file that shrinks while mapped: touching a page past
//! its new end raises SIGBUS, which would kill the process. A handler installed once
//! catches SIGBUS at an address inside a registered map, maps a zero page over the
//! faulting page (so the access completes, reading zeros) and marks that map as shrunk;
//! the seed checks the mark after scanning each extent and fails, naming the image,
//! before anything read from it is committed. A SIGBUS anywhere else goes to the
//! handler that was there before (Rust's own, which reports stack overflows) or to the
//! default action.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// How many maps may be registered at once; a map that finds no free slot is not made
/// and the image is read with `pread` instead.
const SLOTS: usize = 8;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    shrunk: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only to build the array below
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    shrunk: AtomicBool::new(false),
};
static SLOTS_IN_USE: [Slot; SLOTS] = [FREE; SLOTS];

/// The SIGBUS action found when the handler was installed, and the page size; set
/// once, before any map is registered, and only read by the handler.
struct Installed {
    previous: libc::sigaction,
    page: usize,
}
static INSTALLED: OnceLock<Option<Installed>> = OnceLock::new();

pub struct Map {
    ptr: *mut libc::c_void,
    len: usize,
    slot: usize,
}

// SAFETY: the mapping is read-only and lives as long as the Map; nothing in it is
// owned by a thread.
unsafe impl Send for Map {}
unsafe impl Sync for Map {}

impl Map {
    /// Maps `len` bytes of `file` read-only, or None where that cannot be done (the
    /// handler could not be installed, no slot is free, or the kernel refuses the map):
    /// the caller then reads with `pread`.
    pub fn new(file: &File, len: u64) -> Option<Map> {
        let len = usize::try_from(len).ok().filter(|l| *l > 0)?;
        INSTALLED.get_or_init(install).as_ref()?;
        // SAFETY: a fresh read-only shared map of a descriptor we hold; the kernel
        // checks the arguments.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        for (i, s) in SLOTS_IN_USE.iter().enumerate() {
            // The length is stored before the start is published: the handler reads
            // the start first and finds a whole range or none.
            if s.start.load(Ordering::Acquire) != 0 {
                continue;
            }
            s.len.store(len, Ordering::Release);
            s.shrunk.store(false, Ordering::Release);
            if s.start
                .compare_exchange(0, ptr as usize, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Some(Map { ptr, len, slot: i });
            }
        }
        // SAFETY: unmapping what was mapped above, never handed out.
        unsafe { libc::munmap(ptr, len) };
        None
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` readable bytes at `ptr` for as long as self; a page whose file
        // data vanished reads as zeros (see the module's header), never faults fatally.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// Whether a page of the map was found past the file's end since it was made.
    pub fn shrunk(&self) -> bool {
        SLOTS_IN_USE[self.slot].shrunk.load(Ordering::Acquire)
    }

    /// Asks the kernel to map the page-cache pages of `[a, b)` now (reading them from
    /// disk if needed), in one call instead of a fault per few pages. An error means
    /// the range is past the file's end or unreadable.
    pub fn populate(&self, a: usize, b: usize) -> std::io::Result<()> {
        let Some((a, len)) = self.pages(a, b) else {
            return Ok(());
        };
        // SAFETY: advice on a range inside our own map.
        let r = unsafe {
            libc::madvise(
                self.ptr.cast::<u8>().add(a).cast(),
                len,
                libc::MADV_POPULATE_READ,
            )
        };
        match r {
            0 => Ok(()),
            _ => {
                let e = std::io::Error::last_os_error();
                // Kernels before 5.14 do not know the advice: the faults do the work.
                if e.raw_os_error() == Some(libc::EINVAL) {
                    return Ok(());
                }
                Err(e)
            }
        }
    }
}

impl Map {
    /// Unmaps the pages of `[a, b)` from this process (the page cache keeps them), so
    /// that the process's resident size stays that of the extents in flight rather
    /// than growing to the whole image. The next touch maps them again.
    pub fn release(&self, a: usize, b: usize) {
        if let Some((a, len)) = self.pages(a, b) {
            // SAFETY: advice on a range inside our own map; no view of it is
            // borrowed by the caller any more (Image::release takes &self after the
            // view's borrow ended), and a later read would fault it back in.
            unsafe {
                libc::madvise(
                    self.ptr.cast::<u8>().add(a).cast(),
                    len,
                    libc::MADV_DONTNEED,
                )
            };
        }
    }

    /// `[a, b)` widened to whole pages at its start and cut to the map: (start, length),
    /// or None when nothing is left.
    fn pages(&self, a: usize, b: usize) -> Option<(usize, usize)> {
        let page = INSTALLED
            .get()
            .and_then(|i| i.as_ref())
            .map_or(4096, |i| i.page);
        let a = a / page * page;
        let b = b.min(self.len);
        (a < b).then_some((a, b - a))
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // Unregistered first: a fault on the range after this is not ours.
        SLOTS_IN_USE[self.slot].start.store(0, Ordering::Release);
        // SAFETY: the map made in `new`, no longer borrowed (bytes() borrows self).
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

fn install() -> Option<Installed> {
    // SAFETY: sysconf and sigaction with fully initialised arguments.
    unsafe {
        let page = usize::try_from(libc::sysconf(libc::_SC_PAGESIZE)).ok()?;
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        // INSTALLED is set (by get_or_init) only after this returns, and no map is
        // registered before it is: the handler reads `previous` only through it.
        if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
            return None;
        }
        Some(Installed { previous, page })
    }
}

/// Only async-signal-safe work: atomics, mmap, sigaction.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let installed = INSTALLED.get().and_then(|i| i.as_ref());
    if let Some(inst) = installed {
        for s in &SLOTS_IN_USE {
            let start = s.start.load(Ordering::Acquire);
            if start == 0 || addr < start || addr >= start + s.len.load(Ordering::Acquire) {
                continue;
            }
            let page = addr & !(inst.page - 1);
            // SAFETY: replaces one page inside our own read-only map with zeros.
            let r = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    inst.page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                s.shrunk.store(true, Ordering::Release);
                return;
            }
        }
        let prev = inst.previous;
        if prev.sa_sigaction == libc::SIG_IGN {
            return;
        }
        if prev.sa_sigaction != libc::SIG_DFL && prev.sa_flags & libc::SA_SIGINFO != 0 {
            // SAFETY: the previous handler was installed with SA_SIGINFO, so it has
            // this signature.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(prev.sa_sigaction) };
            f(sig, info, ctx);
            return;
        }
        if prev.sa_sigaction != libc::SIG_DFL {
            // SAFETY: a plain handler, installed without SA_SIGINFO.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
            f(sig);
            return;
        }
    }
    // Not ours and no handler before us: the default action, when the access faults
    // again on return.
    // SAFETY: restoring the default disposition.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}
