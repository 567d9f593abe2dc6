//! Each stage's own speed on one core, timed alone on the benchmark's data in the same
//! run: the ceilings the pipelines are held against.

use std::io::{Read, Write};
use std::sync::Arc;

use anyhow::Result;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::sample::{rate, CHUNK};

/// zstd level 1, MB/s of input.
pub fn zstd(sample: &[Vec<u8>]) -> Result<f64> {
    let mut z = zstd::bulk::Compressor::new(1)?;
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(CHUNK));
    Ok(rate(sample, 2.0, |c| {
        let _ = z.compress_to_buffer(c, &mut out);
    }))
}

/// AES-256-GCM sealing in place (ring), MB/s.
pub fn aes(sample: &[Vec<u8>]) -> f64 {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).expect("key"));
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    rate(sample, 2.0, |c| {
        buf[..c.len()].copy_from_slice(c);
        n += 1;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let _ = key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(b"x"),
            &mut buf[..c.len()],
        );
    })
}

/// TLS 1.3 receive with rustls (decrypt and hand out plaintext), MB/s; the client's
/// encryption is not timed.
pub fn tls_receive(
    sample: &[Vec<u8>],
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Result<f64> {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let mut c = rustls::ClientConnection::new(client, name)?;
    let mut s = rustls::ServerConnection::new(server)?;
    let mut wire = Vec::new();
    // Handshake in memory.
    while c.is_handshaking() || s.is_handshaking() {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire)?;
        }
        let mut r = &wire[..];
        while !r.is_empty() {
            s.read_tls(&mut r)?;
            s.process_new_packets()?;
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire)?;
        }
        let mut r = &wire[..];
        while !r.is_empty() {
            c.read_tls(&mut r)?;
            c.process_new_packets()?;
        }
    }
    // Whole 1 MiB chunks are encrypted at once: lift the client's send-buffer bound.
    c.set_buffer_limit(None);
    let mut plain = vec![0u8; 64 << 10];
    let mut timed = 0.0f64;
    let mut bytes = 0usize;
    let min = crate::sample::seconds();
    while timed < min {
        for chunk in sample {
            wire.clear();
            c.writer().write_all(chunk)?;
            while c.wants_write() {
                c.write_tls(&mut wire)?;
            }
            let t = crate::sample::thread_cpu_s();
            let mut r = &wire[..];
            while !r.is_empty() {
                s.read_tls(&mut r)?;
                s.process_new_packets()?;
                while let Ok(n) = s.reader().read(&mut plain) {
                    if n == 0 {
                        break;
                    }
                }
            }
            timed += crate::sample::thread_cpu_s() - t;
            bytes += chunk.len();
        }
    }
    Ok(bytes as f64 / timed / 1e6)
}

/// One timing of the ingest ceiling's stages, each MB/s on one core.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stages {
    pub tls: f64,
    pub zstd: f64,
    pub aes: f64,
}

impl Stages {
    /// What one core could do if receiving and sealing added nothing to the stages.
    pub fn composed(&self) -> f64 {
        1.0 / (1.0 / self.tls + 1.0 / self.zstd + 1.0 / self.aes)
    }
}

/// A ceiling that moved more than this fraction of its mean while a run was measured
/// makes that run's ratio unreliable, and the result line says so.
pub const MOVED_LIMIT: f64 = 0.10;

/// The ceiling over several timings of it around one run: the host's speed (its
/// neighbours, the VM's host) can change between them, and a ratio against a single
/// timing then swings with it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Drift {
    /// The mean of the composed ceilings, MB/s.
    pub mean: f64,
    /// (max - min) / mean of the composed ceilings.
    pub spread: f64,
    /// The stage whose own spread was largest, with its lowest and highest rate.
    pub widest: (&'static str, f64, f64),
}

impl Drift {
    pub fn of(timings: &[Stages]) -> Drift {
        let range = |f: &dyn Fn(&Stages) -> f64| {
            let lo = timings.iter().map(f).fold(f64::INFINITY, f64::min);
            let hi = timings.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
            (lo, hi)
        };
        let composed: Vec<f64> = timings.iter().map(Stages::composed).collect();
        let mean = composed.iter().sum::<f64>() / composed.len().max(1) as f64;
        let (lo, hi) = range(&|s| s.composed());
        let stages: [(&'static str, (f64, f64)); 3] = [
            ("TLS receive", range(&|s| s.tls)),
            ("zstd-1", range(&|s| s.zstd)),
            ("AES-256-GCM", range(&|s| s.aes)),
        ];
        let (name, (slo, shi)) = stages
            .into_iter()
            .max_by(|a, b| {
                let rel = |(lo, hi): (f64, f64)| (hi - lo) / hi.max(1e-9);
                rel(a.1).total_cmp(&rel(b.1))
            })
            .unwrap_or(("none", (0.0, 0.0)));
        Drift {
            mean,
            spread: (hi - lo) / mean.max(1e-9),
            widest: (name, slo, shi),
        }
    }

    pub fn moved(&self) -> bool {
        self.spread > MOVED_LIMIT
    }

    /// "ceiling 358 MB/s (mean of 2 timings, spread 3 %)".
    pub fn describe(&self, timings: usize) -> String {
        format!(
            "ceiling {:.0} MB/s (mean of {timings} timings, spread {:.0} %)",
            self.mean,
            self.spread * 100.0
        )
    }

    /// Appended to a result line: empty, or why its ratio is not to be trusted.
    pub fn warning(&self) -> String {
        match self.moved() {
            false => String::new(),
            true => format!(
                "; CEILING MOVED {:.0} % WITHIN THE RUN ({} {:.0} to {:.0} MB/s): the host changed speed, the ratio is unreliable",
                self.spread * 100.0,
                self.widest.0,
                self.widest.1,
                self.widest.2
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stages(zstd: f64) -> Stages {
        Stages {
            tls: 2000.0,
            zstd,
            aes: 2400.0,
        }
    }

    #[test]
    fn a_steady_ceiling_is_its_mean_and_says_nothing() {
        let d = Drift::of(&[stages(500.0), stages(510.0)]);
        let (a, b) = (stages(500.0).composed(), stages(510.0).composed());
        assert!((d.mean - (a + b) / 2.0).abs() < 1e-9);
        assert!(d.spread < MOVED_LIMIT && !d.moved());
        assert_eq!(d.warning(), "");
        assert_eq!(d.widest.0, "zstd-1");
    }

    #[test]
    fn a_ceiling_that_moved_over_ten_percent_says_so() {
        // The two runs of the issue: zstd at 283 and 356 MB/s.
        let d = Drift::of(&[stages(283.0), stages(356.0)]);
        assert!(d.moved(), "{d:?}");
        let w = d.warning();
        assert!(w.contains("CEILING MOVED"), "{w}");
        assert!(w.contains("zstd-1 283 to 356 MB/s"), "{w}");
        assert!(d
            .describe(2)
            .starts_with(&format!("ceiling {:.0} MB/s (mean of 2", d.mean)));
    }
}
