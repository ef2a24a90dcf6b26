//! Which D-nodes hold the strips of a stripe.
//!
//! Rendezvous (highest-random-weight) hashing: every up node gets a
//! pseudo-random score per stripe and the best `k + m` win, spread over
//! failure domains. That makes placement
//! - declustered: each stripe picks its own set, so a lost node's rebuild
//!   reads from every survivor;
//! - balanced: every node wins about `width / N` of all stripes;
//! - stable: a node going down moves only the strips it held.
//!
//! It is a pure function of (geometry, node list, stripe number), so any
//! C-node computes the same answer without coordination.

use crate::geometry::Geometry;
use crate::Error;

/// A D-node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSlot {
    /// Stable identity (e.g. a hash of the D-node's NQN); scores derive from it.
    pub id: u64,
    /// Failure-domain label (rack, host, power feed …).
    pub domain: String,
    pub up: bool,
}

/// Where one stripe goes: strip `i` on node index `nodes[i]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub nodes: Vec<usize>,
    /// The geometry used: narrower than asked when too few nodes are up.
    pub geometry: Geometry,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser: a cheap, well-distributed 64-bit hash.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The score of `node` for `stripe`.
pub fn score(stripe: u64, node_id: u64) -> u64 {
    mix(stripe ^ mix(node_id))
}

/// Places `stripe` on distinct up nodes. With fewer than `k + m` up nodes it
/// narrows the stripe to `(up - m) + m`, keeping full parity; with `m` or
/// fewer up it fails.
pub fn place(geo: &Geometry, nodes: &[NodeSlot], stripe: u64) -> Result<Placement, Error> {
    let up: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].up).collect();
    let m = geo.m();
    let geometry = if up.len() >= geo.width() {
        *geo
    } else if up.len() > m {
        geo.narrowed(up.len() - m)?
    } else {
        return Err(Error::NotEnoughNodes {
            up: up.len(),
            needed: m + 1,
        });
    };
    let w = geometry.width();
    let mut ranked: Vec<(u64, usize)> = up
        .iter()
        .map(|&i| (score(stripe, nodes[i].id), i))
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    // At most ceil(w / domains) strips per failure domain while that can be met.
    let mut domains: Vec<&str> = up.iter().map(|&i| nodes[i].domain.as_str()).collect();
    domains.sort_unstable();
    domains.dedup();
    let cap = w.div_ceil(domains.len());
    let mut per_domain: Vec<(&str, usize)> = domains.iter().map(|d| (*d, 0)).collect();
    let mut chosen = Vec::with_capacity(w);
    let mut taken = vec![false; nodes.len()];
    for &(_, i) in &ranked {
        if chosen.len() == w {
            break;
        }
        let slot = per_domain
            .iter_mut()
            .find(|(d, _)| *d == nodes[i].domain)
            .expect("domain listed");
        if slot.1 < cap {
            slot.1 += 1;
            chosen.push(i);
            taken[i] = true;
        }
    }
    // Uneven domains: fill what is left by score alone.
    for &(_, i) in &ranked {
        if chosen.len() == w {
            break;
        }
        if !taken[i] {
            chosen.push(i);
            taken[i] = true;
        }
    }
    Ok(Placement {
        nodes: chosen,
        geometry,
    })
}
