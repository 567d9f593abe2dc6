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
