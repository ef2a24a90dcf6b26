//! Stripe geometry: how many data and parity strips, how big, which code.

use std::fmt;
use std::ops::Range;

use crate::Error;

/// Strip sizes are multiples of this: the SIMD kernels' natural width and a
/// divisor of every sector size.
pub const STRIP_ALIGN: usize = 64;

/// GF(2^8) codes have at most 256 strips per stripe.
pub const MAX_STRIPS: usize = 256;

/// How parity is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Plain Reed-Solomon: `m` global parities, any `m` losses survivable.
    ReedSolomon,
    /// Locally repairable code in the style of Azure's LRC(k, l, g): the data
    /// strips form `groups` groups, each with one XOR parity; the remaining
    /// `m - groups` parities are global Reed-Solomon parities. One lost strip
    /// in a group is rebuilt from that group alone.
    Lrc { groups: usize },
}

/// A stripe's shape: `k` data strips, `m` parity strips of `strip_size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    k: usize,
    m: usize,
    strip_size: usize,
    layout: Layout,
}

/// Named presets (all at or below 1.3 raw-to-usable).
pub const PRESETS: &[(&str, usize, usize, Layout)] = &[
    ("10+3", 10, 3, Layout::ReedSolomon),
    ("20+6", 20, 6, Layout::ReedSolomon),
    ("40+12", 40, 12, Layout::ReedSolomon),
    ("146+4", 146, 4, Layout::ReedSolomon),
    ("100+30", 100, 30, Layout::ReedSolomon),
    ("20+2+4", 20, 6, Layout::Lrc { groups: 2 }),
    ("40+4+8", 40, 12, Layout::Lrc { groups: 4 }),
    ("146+2+2", 146, 4, Layout::Lrc { groups: 2 }),
    ("100+10+20", 100, 30, Layout::Lrc { groups: 10 }),
];

/// The default: 10+3, 1.30 raw-to-usable.
pub const DEFAULT_GEOMETRY: &str = "10+3";

impl Geometry {
    pub fn new(k: usize, m: usize, strip_size: usize, layout: Layout) -> Result<Self, Error> {
        let bad = |s: String| Err(Error::Geometry(s));
        if k == 0 {
            return bad("k (data strips) must be at least 1".into());
        }
        if m == 0 {
            return bad("m (parity strips) must be at least 1".into());
        }
        if k + m > MAX_STRIPS {
            return bad(format!(
                "k + m = {} exceeds the codec's {MAX_STRIPS} strips per stripe",
                k + m
            ));
        }
        if strip_size == 0 || !strip_size.is_multiple_of(STRIP_ALIGN) {
            return bad(format!(
                "strip size {strip_size} must be a positive multiple of {STRIP_ALIGN} bytes"
            ));
        }
        if let Layout::Lrc { groups } = layout {
            if groups == 0 || groups > k {
                return bad(format!(
                    "an LRC needs 1 to k = {k} local groups, not {groups}"
                ));
            }
            if groups >= m {
                return bad(format!("an LRC with {groups} local parities needs m > {groups} to leave a global parity"));
            }
        }
        Ok(Self {
            k,
            m,
            strip_size,
            layout,
        })
    }

    /// Parses `k+m` (Reed-Solomon) or `k+l+g` (LRC with l local groups and g
    /// global parities).
    pub fn parse(spec: &str, strip_size: usize) -> Result<Self, Error> {
        let parts: Vec<&str> = spec.trim().split('+').collect();
        let num = |s: &str| {
            s.trim().parse::<usize>().map_err(|_| {
                Error::Geometry(format!("'{spec}' is not k+m or k+l+g (e.g. 10+3, 20+2+4)"))
            })
        };
        match parts.as_slice() {
            [k, m] => Self::new(num(k)?, num(m)?, strip_size, Layout::ReedSolomon),
            [k, l, g] => {
                let (l, g) = (num(l)?, num(g)?);
                Self::new(num(k)?, l + g, strip_size, Layout::Lrc { groups: l })
            }
            _ => Err(Error::Geometry(format!(
                "'{spec}' is not k+m or k+l+g (e.g. 10+3, 20+2+4)"
            ))),
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }
    pub fn m(&self) -> usize {
        self.m
    }
    /// Strips per stripe.
    pub fn width(&self) -> usize {
        self.k + self.m
    }
    pub fn strip_size(&self) -> usize {
        self.strip_size
    }
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// User data per stripe.
    pub fn data_bytes(&self) -> usize {
        self.k * self.strip_size
    }

    /// Raw-to-usable ratio, e.g. 1.30 for 10+3.
    pub fn overhead(&self) -> f64 {
        self.width() as f64 / self.k as f64
    }

    /// The same code shape with another strip size.
    pub fn with_strip_size(&self, strip_size: usize) -> Result<Self, Error> {
        Self::new(self.k, self.m, strip_size, self.layout)
    }

    /// The same layout over fewer data strips (when too few D-nodes are up).
    pub fn narrowed(&self, k: usize) -> Result<Self, Error> {
        let layout = match self.layout {
            Layout::Lrc { groups } => Layout::Lrc {
                groups: groups.min(k),
            },
            l => l,
        };
        Self::new(k, self.m, self.strip_size, layout)
    }

    /// Losses any stripe of this geometry always survives.
    pub fn guaranteed_losses(&self) -> usize {
        match self.layout {
            Layout::ReedSolomon => self.m,
            Layout::Lrc { groups } => self.m - groups,
        }
    }

    /// Global parities (all parities for Reed-Solomon).
    pub fn global_parities(&self) -> usize {
        match self.layout {
            Layout::ReedSolomon => self.m,
            Layout::Lrc { groups } => self.m - groups,
        }
    }

    /// Data strip indices of each local group (LRC only; empty for Reed-Solomon).
    pub fn groups(&self) -> Vec<Range<usize>> {
        match self.layout {
            Layout::ReedSolomon => Vec::new(),
            Layout::Lrc { groups } => (0..groups)
                .map(|j| j * self.k / groups..(j + 1) * self.k / groups)
                .collect(),
        }
    }

    /// Strips read to rebuild lost strip `index` when nothing else is lost.
    pub fn repair_sources(&self, index: usize) -> Vec<usize> {
        let (k, m) = (self.k, self.m);
        match self.layout {
            Layout::ReedSolomon => (0..k + m).filter(|&i| i != index).take(k).collect(),
            Layout::Lrc { groups } => {
                let gs = self.groups();
                let group_of = |i: usize| -> Option<usize> {
                    if i < k {
                        gs.iter().position(|r| r.contains(&i))
                    } else if i < k + groups {
                        Some(i - k)
                    } else {
                        None
                    }
                };
                match group_of(index) {
                    Some(g) => gs[g]
                        .clone()
                        .chain(std::iter::once(k + g))
                        .filter(|&i| i != index)
                        .collect(),
                    // A global parity is recomputed from all data.
                    None => (0..k).collect(),
                }
            }
        }
    }

    /// Mean strips read per strip rebuilt, over every strip position.
    pub fn rebuild_read_amplification(&self) -> f64 {
        let total: usize = (0..self.width())
            .map(|i| self.repair_sources(i).len())
            .sum();
        total as f64 / self.width() as f64
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.layout {
            Layout::ReedSolomon => write!(f, "{}+{}", self.k, self.m),
            Layout::Lrc { groups } => write!(f, "{}+{}+{}", self.k, groups, self.m - groups),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_within_1_3() {
        for (name, k, m, layout) in PRESETS {
            let g = Geometry::new(*k, *m, 4096, *layout).unwrap();
            assert_eq!(g.to_string(), *name);
            assert_eq!(Geometry::parse(name, 4096).unwrap(), g);
            assert!(
                g.overhead() <= 1.3 + 1e-9,
                "{name} overhead {}",
                g.overhead()
            );
        }
        assert_eq!(
            Geometry::parse(DEFAULT_GEOMETRY, 4096).unwrap().overhead(),
            1.3
        );
    }

    #[test]
    fn invalid_geometries_are_clear_errors() {
        for (k, m, s, l) in [
            (0, 3, 4096, Layout::ReedSolomon),
            (10, 0, 4096, Layout::ReedSolomon),
            (250, 10, 4096, Layout::ReedSolomon),
            (10, 3, 100, Layout::ReedSolomon),
            (10, 3, 0, Layout::ReedSolomon),
            (10, 3, 4096, Layout::Lrc { groups: 3 }),
            (4, 6, 4096, Layout::Lrc { groups: 5 }),
        ] {
            let e = Geometry::new(k, m, s, l).unwrap_err();
            assert!(!e.to_string().is_empty());
        }
        assert!(Geometry::parse("10-3", 4096).is_err());
        assert!(Geometry::parse("10+x", 4096).is_err());
        assert!(Geometry::parse("1+2+3+4", 4096).is_err());
    }

    #[test]
    fn lrc_rebuilds_one_strip_from_its_group() {
        let g = Geometry::parse("20+2+4", 4096).unwrap();
        assert_eq!(g.groups(), vec![0..10, 10..20]);
        assert_eq!(g.repair_sources(3).len(), 10);
        assert_eq!(g.repair_sources(20), (0..10).collect::<Vec<_>>());
        assert_eq!(g.repair_sources(25).len(), 20);
        let rs = Geometry::parse("20+6", 4096).unwrap();
        assert!(g.rebuild_read_amplification() < 0.7 * rs.rebuild_read_amplification());
    }
}
