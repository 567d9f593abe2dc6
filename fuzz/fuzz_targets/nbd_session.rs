//! Plays a hostile NBD client from memory: arbitrary bytes are the whole stream a
//! client sends, from its handshake flags through option haggling to requests. The
//! server must never panic and never size a buffer from the client beyond its bounds
//! (the run's RSS limit catches that); every request header it accepts must encode
//! back to the same 28 bytes.
#![no_main]

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_agent::nbd::server::session;
use ferry_agent::nbd::wire::Request;
use ferry_agent::nbd::{Device, Exports};
use libfuzzer_sys::fuzz_target;

/// A small disk in memory: reads and writes are checked against its size, as the
/// real device does, so a server bug that lets a request past its range panics here.
struct MemDevice(Mutex<Vec<u8>>);

impl Device for MemDevice {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        let at = offset as usize;
        buf.copy_from_slice(&d[at..at + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let at = offset as usize;
        d[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let at = offset as usize;
        d[at..at + len as usize].fill(0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Threads of this process now.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fuzz_target!(|data: &[u8]| {
    let before = threads();
    let mut exports = Exports::default();
    exports.add("d", Arc::new(MemDevice(Mutex::new(vec![0u8; 64 << 10]))));
    let mut r = data;
    let _ = session(&mut r, &mut io::sink(), &exports);
    // The session's reader threads are scoped: it returns once their closures have,
    // a moment before the threads exit and free their thread-locals. libFuzzer's
    // leak check after each input would see those mid-teardown, so wait for them.
    let end = Instant::now() + Duration::from_secs(5);
    while threads() > before && Instant::now() < end {
        std::thread::yield_now();
    }

    for h in data.chunks_exact(28) {
        let h: &[u8; 28] = h.try_into().unwrap();
        if let Ok(req) = Request::parse(h) {
            assert_eq!(&req.encode(), h, "request header round trip");
        }
    }
});
