//! A map of disjoint byte ranges of a disk to where their bytes are, where a later
//! insert overrides whatever it overlaps: the shape of both the replica's log (later
//! records override earlier ones, byte by byte) and the overlay (later writes override
//! earlier ones).

use std::collections::BTreeMap;

/// Where the bytes of a range are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    /// They read as zero.
    Zero,
    /// The range's first byte is at this position of a local file; the rest follow.
    At(u64),
}

impl Src {
    fn skip(self, n: u64) -> Src {
        match self {
            Src::Zero => Src::Zero,
            Src::At(p) => Src::At(p + n),
        }
    }
}

/// start -> (end, source); ranges never overlap.
#[derive(Debug, Default, Clone)]
pub struct RangeMap {
    map: BTreeMap<u64, (u64, Src)>,
}

impl RangeMap {
    /// Makes `[start, end)` come from `src`, cutting back what it overlaps.
    pub fn insert(&mut self, start: u64, end: u64, src: Src) {
        if start >= end {
            return;
        }
        if let Some((&s, &(e, v))) = self.map.range(..start).next_back() {
            if e > start {
                self.map.insert(s, (start, v));
                if e > end {
                    self.map.insert(end, (e, v.skip(end - s)));
                }
            }
        }
        let inside: Vec<u64> = self.map.range(start..end).map(|(k, _)| *k).collect();
        for s in inside {
            if let Some((e, v)) = self.map.remove(&s) {
                if e > end {
                    self.map.insert(end, (e, v.skip(end - s)));
                }
            }
        }
        self.map.insert(start, (end, src));
    }

    /// The parts of `[start, end)` the map covers, clipped to it, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64, Src)> {
        let mut out = Vec::new();
        if let Some((&s, &(e, v))) = self.map.range(..start).next_back() {
            if e > start {
                out.push((start, e.min(end), v.skip(start - s)));
            }
        }
        for (&s, &(e, v)) in self.map.range(start..end) {
            out.push((s, e.min(end), v));
        }
        out
    }

    /// Every range, in order (for failback: exactly what was written).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.map.iter().map(|(s, (e, _))| (*s, *e)).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes covered.
    pub fn bytes(&self) -> u64 {
        self.map.iter().map(|(s, (e, _))| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-by-byte model: later inserts win.
    fn model(ops: &[(u64, u64, Src)], size: u64) -> Vec<Option<(u64, bool)>> {
        let mut m = vec![None; size as usize];
        for (s, e, src) in ops {
            for b in *s..*e {
                m[b as usize] = Some(match src {
                    Src::Zero => (0, true),
                    Src::At(p) => (p + (b - s), false),
                });
            }
        }
        m
    }

    #[test]
    fn later_ranges_override_earlier_ones_byte_by_byte() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut map = RangeMap::default();
            let mut ops = Vec::new();
            for i in 0..20u64 {
                let s = rng.gen_range(0..100u64);
                let e = s + rng.gen_range(0..30u64);
                let src = if rng.gen_bool(0.3) {
                    Src::Zero
                } else {
                    Src::At(i * 1000)
                };
                map.insert(s, e, src);
                ops.push((s, e, src));
            }
            let want = model(&ops, 140);
            let mut got = vec![None; 140];
            for (s, e, src) in map.overlapping(0, 140) {
                for b in s..e {
                    got[b as usize] = Some(match src {
                        Src::Zero => (0, true),
                        Src::At(p) => (p + (b - s), false),
                    });
                }
            }
            assert_eq!(got, want);
            // A window in the middle is the same, clipped.
            for (s, e, _) in map.overlapping(40, 60) {
                assert!(s >= 40 && e <= 60 && s < e);
            }
        }
    }
}
