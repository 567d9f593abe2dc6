//! A real boot: a tiny bootable disk image and `qemu-system-x86_64` booting it from an
//! NBD export, waiting for the line the image prints on the serial console.
//!
//! The image is one hand-assembled 16-bit boot sector (the BIOS loads sector 0 at
//! 0000:7C00 and jumps there when it ends in 0x55AA): it writes a line to COM1 byte
//! by byte, then halts for good. Everything after the first MiB is random, so a served
//! disk that drops or misplaces data is not hidden by an image that is mostly zero;
//! the guest itself reads only sector 0, so the boot proves the served point is a
//! disk a BIOS accepts, and the caller's comparison proves the rest.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::Rng;

/// Where the message starts in the boot sector: right after the code below.
const MSG_AT: usize = 36;
/// The BIOS loads the boot sector here (segment 0).
const LOAD_ADDR: u16 = 0x7C00;
const SECTOR: usize = 512;
/// Random data starts here: the first MiB (the boot sector aside) is zero, like the
/// gap a partitioned disk has before its first partition.
const RANDOM_FROM: u64 = 1 << 20;

/// The boot sector that prints `line` and "\r\n" on COM1, then halts. Panics if the
/// line is not printable ASCII or does not fit (at most 471 bytes).
pub fn boot_sector(line: &str) -> [u8; SECTOR] {
    assert!(
        line.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "the boot line must be printable ASCII: {line:?}"
    );
    let msg_addr = (LOAD_ADDR + MSG_AT as u16).to_le_bytes();
    #[rustfmt::skip]
    let code: [u8; MSG_AT] = [
        // 0: cli: no interrupt may run (the BIOS's handlers are not needed).
        0xFA,
        // 1: xor ax, ax; 3: mov ds, ax: DS = 0, so [si] addresses the message at its
        // absolute address whether the BIOS jumped to 0000:7C00 or 07C0:0000.
        0x31, 0xC0,
        0x8E, 0xD8,
        // 5: mov si, MSG (absolute: 0x7C00 + 36).
        0xBE, msg_addr[0], msg_addr[1],
        // 8: cld: lodsb counts up.
        0xFC,
        // 9 next: lodsb (al = [si++]); test al, al; jz halt (+18 to 32): the NUL ends it.
        0xAC,
        0x84, 0xC0,
        0x74, 0x12,
        // 14: mov bl, al: keep the byte while al polls the line status.
        0x88, 0xC3,
        // 16: mov dx, 0x3FD (COM1 line status register).
        0xBA, 0xFD, 0x03,
        // 19 wait: in al, dx; test al, 0x20 (transmit holding register empty);
        // jz wait (-5 to 19): a real UART drops bytes written while it is busy.
        0xEC,
        0xA8, 0x20,
        0x74, 0xFB,
        // 24: mov dx, 0x3F8 (COM1 data); mov al, bl; out dx, al: send the byte.
        0xBA, 0xF8, 0x03,
        0x88, 0xD8,
        0xEE,
        // 30: jmp next (-23 to 9).
        0xEB, 0xE9,
        // 32 halt: cli; hlt; jmp halt (-4 to 32): halted for good, even if a
        // non-maskable interrupt wakes it.
        0xFA,
        0xF4,
        0xEB, 0xFC,
    ];
    let mut s = [0u8; SECTOR];
    s[..MSG_AT].copy_from_slice(&code);
    let msg = format!("{line}\r\n");
    // The message, its NUL, and the signature must fit in the sector.
    assert!(
        MSG_AT + msg.len() < SECTOR - 2,
        "boot line of {} bytes does not fit in the boot sector",
        line.len()
    );
    s[MSG_AT..MSG_AT + msg.len()].copy_from_slice(msg.as_bytes());
    // The signature the BIOS checks before it boots a disk.
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

/// Writes a bootable raw disk image of `size` bytes at `path`: the boot sector that
/// prints `line`, zero to the first MiB, then random data (from `rng`) in 1 MiB pieces
/// every other MiB, zero between them (so the disk has both data and holes).
pub fn boot_image(path: &Path, line: &str, size: u64, rng: &mut impl Rng) {
    assert!(size >= RANDOM_FROM, "a boot image needs at least 1 MiB");
    let f = std::fs::File::create(path)
        .unwrap_or_else(|e| panic!("creating boot image {}: {e}", path.display()));
    f.set_len(size).unwrap();
    f.write_all_at(&boot_sector(line), 0).unwrap();
    let mut piece = vec![0u8; 1 << 20];
    let mut at = RANDOM_FROM;
    while at < size {
        let n = (size - at).min(piece.len() as u64) as usize;
        rng.fill(&mut piece[..n]);
        f.write_all_at(&piece[..n], at)
            .unwrap_or_else(|e| panic!("writing boot image {}: {e}", path.display()));
        at += 2 << 20;
    }
    f.sync_all().unwrap();
}

/// Whether `qemu-system-x86_64` can be run here.
pub fn qemu_system_installed() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a boot test should run: yes when qemu-system-x86_64 is installed; when it
/// is not, a skip (with the reason printed) outside CI, and a failure in CI (env CI
/// set), where scripts/install-deps.sh installs it.
pub fn boot_test_runs(test: &str) -> bool {
    if qemu_system_installed() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: qemu-system-x86_64 is not installed (Debian package qemu-system-x86; \
         scripts/install-deps.sh installs it)"
    );
    eprintln!(
        "SKIPPED {test}: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    );
    false
}

/// KVM when this user can open /dev/kvm, else TCG (emulation: slower, same result).
pub fn accel() -> &'static str {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if usable {
        "kvm"
    } else {
        "tcg"
    }
}

/// A `qemu-system-x86_64` guest booting from one NBD export, its serial console read
/// as it comes; killed when dropped.
pub struct Guest {
    child: Child,
    serial: mpsc::Receiver<Vec<u8>>,
    /// Everything the console printed so far.
    pub console: Vec<u8>,
    pub started: Instant,
}

impl Guest {
    /// Starts the guest with `accel()`: 64 MiB of memory, no devices but the disk
    /// (`nbd_url`, raw, IDE, which every BIOS boots) and COM1 on stdout, no display,
    /// no reboot (a guest that crashes stops instead of looping).
    pub fn boot(nbd_url: &str) -> Guest {
        Guest::boot_with(nbd_url, accel())
    }

    /// As `boot`, with the accelerator named (`kvm` or `tcg`). On a machine that is
    /// itself a virtual machine (nested KVM) this tiny guest's BIOS takes seconds
    /// under KVM and a fraction of one under TCG: every port access exits twice.
    pub fn boot_with(nbd_url: &str, accel: &str) -> Guest {
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
            .args(["-accel", accel, "-m", "64", "-no-reboot"])
            .arg("-drive")
            .arg(format!("file={nbd_url},format=raw,if=ide"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting qemu-system-x86_64: {e}"));
        let started = Instant::now();
        // The console and qemu's own errors both go to the one channel: a drive qemu
        // cannot open ends the wait with its message rather than a timeout.
        let (tx, serial) = mpsc::sync_channel(64);
        for mut out in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
        }
        Guest {
            child,
            serial,
            console: Vec::new(),
            started,
        }
    }

    /// Waits until the console shows `line`; returns the time since the guest was
    /// started. Panics with what the console and qemu printed if it does not within
    /// `timeout` or qemu exits first.
    pub fn wait_line(&mut self, line: &str, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            if String::from_utf8_lossy(&self.console).contains(line) {
                return self.started.elapsed();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.serial.recv_timeout(left) {
                Ok(bytes) => self.console.extend_from_slice(&bytes),
                Err(e) => panic!(
                    "no {line:?} on the guest's console within {timeout:?} ({e}; exit: {:?}); \
                     it printed: {:?}",
                    self.child.try_wait().ok().flatten(),
                    String::from_utf8_lossy(&self.console)
                ),
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots `nbd_url` and waits for `line` on the console; the time it took. The guest is
/// stopped before it returns.
pub fn boot_and_wait(nbd_url: &str, line: &str, timeout: Duration) -> Duration {
    Guest::boot(nbd_url).wait_line(line, timeout)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use ferry_agent::nbd::{serve, Exports, FileDevice};
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn the_boot_sector_holds_its_message_and_signature() {
        let s = boot_sector("hello ferry");
        assert_eq!(&s[510..], &[0x55, 0xAA]);
        assert_eq!(&s[MSG_AT..MSG_AT + 13], b"hello ferry\r\n");
        assert_eq!(s[MSG_AT + 13], 0, "the message ends in NUL");
        // mov si points at the message where the BIOS loads the sector.
        assert_eq!(u16::from_le_bytes([s[6], s[7]]), 0x7C00 + MSG_AT as u16);
    }

    #[test]
    #[should_panic(expected = "printable ASCII")]
    fn a_line_with_a_control_byte_is_refused() {
        boot_sector("a\nb");
    }

    /// The image boots from an NBD export whose name holds a '/' (a recovery host's
    /// `MACHINE/DISK`): qemu takes the whole path after the address as the name.
    #[test]
    fn the_image_boots_from_an_export_named_machine_slash_disk() {
        if !boot_test_runs("the_image_boots_from_an_export_named_machine_slash_disk") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("boot.img");
        let mut rng = rand::rngs::StdRng::seed_from_u64(crate::seed());
        boot_image(&image, "ferry boot test: hello", 4 << 20, &mut rng);
        let mut exports = Exports::default();
        exports.add("m1/sda", Arc::new(FileDevice::open(&image).unwrap()));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::spawn(move || serve(listener, Arc::new(exports), stop));
        let took = boot_and_wait(
            &format!("nbd://{addr}/m1/sda"),
            "ferry boot test: hello",
            Duration::from_secs(60),
        );
        eprintln!("booted in {took:?} ({})", accel());
    }
}
