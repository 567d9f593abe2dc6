//! A served disk's reads sent from its local files (`Device::pieces`, sendfile): for
//! random ranges of a point with a log after its base, before and after hydration,
//! with writes in the overlay, the pieces hold exactly the bytes `read` gives; a
//! range that needs the store or touches the overlay has none (read the usual way);
//! and the same disk over NBD, serial and with reads in flight, reads back whole.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::*;
use ferry_agent::nbd::client::Client;
use ferry_agent::nbd::{serve, Device, Exports, Piece};
use ferry_agent::recover::ServedDisk;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The bytes `pieces` point at.
fn assemble(pieces: &[Piece<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match *p {
            Piece::File { file, offset, len } => {
                let mut b = vec![0u8; len as usize];
                file.read_exact_at(&mut b, offset).unwrap();
                out.extend_from_slice(&b);
            }
            Piece::Zero(len) => out.resize(out.len() + len as usize, 0),
        }
    }
    out
}

/// Checks `n` random ranges against `read`; returns how many had pieces.
fn check_ranges(served: &ServedDisk, rng: &mut StdRng, n: usize, overlay: (u64, u64)) -> usize {
    let mut with = 0;
    for _ in 0..n {
        let len = rng.gen_range(1..=MIB);
        let at = rng.gen_range(0..SIZE - len);
        let mut want = vec![0u8; len as usize];
        served.read(at, &mut want).unwrap();
        if let Some(p) = served.pieces(at, len) {
            assert!(
                at + len <= overlay.0 || at >= overlay.1,
                "pieces for [{at}, +{len}), which the overlay touches"
            );
            assert!(assemble(&p) == want, "pieces of [{at}, +{len}) differ");
            with += 1;
        }
    }
    with
}

#[test]
fn pieces_hold_exactly_what_a_read_gives() {
    let env = Env::new();
    let mut rng = StdRng::seed_from_u64(17);
    let (at_p, p, _) = seeded_disk(&env, &mut rng);
    let point = env.point(&p);
    let d = env.open("m", "d0");
    let state = env.store.block(d.load_state()).unwrap();
    let served = ServedDisk::open("d0", d, &state, &point, &env.path("overlay"), 4).unwrap();

    // Nothing hydrated: a range in an extent with data needs the store.
    let logged = served.log_ranges();
    let data_extent = (0..SIZE / EXTENT)
        .find(|i| {
            let (s, e) = (i * EXTENT, (i + 1) * EXTENT);
            served.has_extent(*i) && !logged.iter().any(|(ls, le)| *ls < e && *le > s)
        })
        .unwrap();
    assert!(served.pieces(data_extent * EXTENT, 4096).is_none());
    let none_before = check_ranges(&served, &mut rng, 200, (0, 0));

    for idx in served.to_hydrate() {
        served.hydrate_extent(idx).unwrap();
    }
    let overlay = (20 * MIB, 20 * MIB + 300_000);
    served
        .write(
            overlay.0,
            &vec![0xab; (overlay.1 - overlay.0) as usize],
            false,
        )
        .unwrap();
    let with = check_ranges(&served, &mut rng, 500, overlay);
    assert!(
        with > 400 && with > none_before,
        "after hydration most ranges are pieces: {with} of 500 (before: {none_before})"
    );
    // A whole-disk range spans the log's writes: more than one piece.
    assert!(served.pieces(0, overlay.0).unwrap().len() > 1);

    // Over NBD, serial and pipelined, everything reads back as `read` gives it.
    let mut model = at_p.clone();
    model[overlay.0 as usize..overlay.1 as usize].fill(0xab);
    let served = Arc::new(served);
    let mut exports = Exports::default();
    exports.add("d0", served.clone());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || serve(listener, Arc::new(exports), stop));
    let mut c = Client::connect(addr, "d0").unwrap();
    let mut back = vec![0u8; SIZE as usize];
    for (i, chunk) in back.chunks_mut((4 * MIB) as usize).enumerate() {
        c.read(i as u64 * 4 * MIB, chunk).unwrap();
    }
    assert!(back == model, "serial NBD reads differ from the disk");
    let offsets: Vec<u64> = (0..200)
        .map(|_| rng.gen_range(0..(SIZE - MIB) / 4096) * 4096)
        .collect();
    let mut n = 0;
    c.read_pipelined(&offsets, MIB as u32, 8, |o, b| {
        assert!(
            b == &model[o as usize..(o + MIB) as usize],
            "pipelined read at {o}"
        );
        n += 1;
    })
    .unwrap();
    assert_eq!(n, offsets.len());
    c.disconnect().unwrap();
}
