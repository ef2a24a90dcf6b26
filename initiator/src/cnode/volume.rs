//! Stripes over D-nodes: full-stripe writes of `k` data + `m` parity strips
//! to `k + m` distinct D-nodes in parallel, reads of just the byte range
//! needed, and degraded reads that reconstruct from any `k` good strips.
//!
//! On-media layout, version 1: each namespace reserves its first
//! [`DATA_OFFSET`] bytes (superblock copies, written by the layers above);
//! strip `s` of any stripe lives at `DATA_OFFSET + s * strip_size` on the
//! D-node placement chose for it. Every D-node that takes part in stripe `s`
//! uses the same slot, so nothing but the stripe number and the
//! [`StripeRecord`] is needed to find a strip again. (With more D-nodes than
//! `k + m`, each node leaves the slots of stripes it is not in unused: holes
//! on thin media; a per-node slot allocator is the step after this one.)
//!
//! Where a stripe went and the checksum of every strip are returned as a
//! [`StripeRecord`], for the metadata layer to store.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use dase_erasure::{place, strip_checksum, Codec, Geometry};

use super::cluster::Cluster;
use crate::host::{join_all, HostError};

/// Bytes reserved at the start of every namespace.
pub const DATA_OFFSET: u64 = 1 << 20;

/// The granularity of strip checksums for strips that are multiples of it:
/// a 4 KiB read checks 4 KiB, not the whole strip.
pub const CHECK_UNIT: usize = 4096;

/// The checksum granularity for strips of `strip_size` bytes.
pub fn check_unit(strip_size: usize) -> usize {
    if strip_size.is_multiple_of(CHECK_UNIT) {
        CHECK_UNIT
    } else {
        strip_size
    }
}

/// Whether `data`, bytes `[offset, offset + len)` of a strip, matches its
/// checksums (`sums`, one per unit of that strip); `offset` and `len` are
/// unit-aligned.
fn units_match(data: &[u8], offset: usize, unit: usize, sums: &[u32]) -> bool {
    data.chunks(unit)
        .zip(&sums[offset / unit..])
        .all(|(c, &sum)| strip_checksum(c) == sum)
}

/// How many times a stripe write is re-placed after D-nodes fail under it.
const WRITE_ATTEMPTS: usize = 3;

/// Where one stripe is and how to check it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StripeRecord {
    pub stripe: u64,
    /// The geometry actually used (narrower than the volume's when D-nodes were down).
    pub k: u16,
    pub m: u16,
    /// Cluster node index of each strip, data strips first.
    pub nodes: Vec<u16>,
    /// CRC32C of every [`check_unit`] of every strip, strip by strip
    /// (`crcs[j * units + u]`): a read of any part of a strip is checked.
    pub crcs: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Erasure(#[from] dase_erasure::Error),
    #[error("stripe {stripe}: {detail}")]
    Unrecoverable { stripe: u64, detail: String },
    #[error("D-node {node}: {error}")]
    Node { node: String, error: HostError },
    #[error("{0}")]
    Invalid(String),
}

pub struct Volume {
    cluster: Arc<Cluster>,
    geo: Geometry,
    /// Write repaired strips back (only a holder of the file system's lease
    /// may: to anyone else a stripe may have been freed and reused).
    repair: bool,
    /// A codec per data width `k` once used: building one inverts its
    /// matrix, 0.4 % of the mount's CPU when it was built per stripe.
    codecs: std::sync::Mutex<Vec<Option<Arc<Codec>>>>,
}

impl Volume {
    /// A volume of geometry `geo` over `cluster`. Every reachable namespace
    /// must hold whole strips in whole blocks.
    pub fn new(cluster: Arc<Cluster>, geo: Geometry) -> Result<Self, VolumeError> {
        if cluster.len() < geo.m() + 1 {
            return Err(VolumeError::Invalid(format!(
                "{} D-nodes cannot hold a {geo} stripe (at least {} needed)",
                cluster.len(),
                geo.m() + 1
            )));
        }
        for i in 0..cluster.len() {
            if let Some(ns) = cluster.namespace(i) {
                if !(geo.strip_size() as u64).is_multiple_of(ns.block_size as u64) {
                    return Err(VolumeError::Invalid(format!(
                        "strip size {} is not a multiple of {}'s {}-byte blocks",
                        geo.strip_size(),
                        cluster.nodes[i].spec.addr,
                        ns.block_size
                    )));
                }
            }
        }
        Ok(Self {
            cluster,
            geo,
            repair: true,
            codecs: std::sync::Mutex::new(vec![None; geo.k() + 1]),
        })
    }

    /// Reads that find a corrupt strip still reconstruct it, but do not
    /// write it back.
    pub fn without_repair(mut self) -> Self {
        self.repair = false;
        self
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    fn slot(&self, stripe: u64) -> u64 {
        DATA_OFFSET + stripe * self.geo.strip_size() as u64
    }

    /// Stripes every reachable namespace has room for.
    pub fn capacity_stripes(&self) -> u64 {
        (0..self.cluster.len())
            .filter_map(|i| self.cluster.namespace(i))
            .map(|ns| ns.bytes().saturating_sub(DATA_OFFSET) / self.geo.strip_size() as u64)
            .min()
            .unwrap_or(0)
    }

    fn codec(&self, k: usize) -> Result<Arc<Codec>, VolumeError> {
        if let Some(c) = self.codecs.lock().unwrap().get(k).and_then(Option::clone) {
            return Ok(c);
        }
        let g = if k == self.geo.k() {
            self.geo
        } else {
            self.geo.narrowed(k)?
        };
        let c = Arc::new(Codec::new(g)?);
        if let Some(slot) = self.codecs.lock().unwrap().get_mut(k) {
            *slot = Some(c.clone());
        }
        Ok(c)
    }

    /// Writes stripe `stripe` holding `data` (at most `k * strip_size` bytes;
    /// the rest is zero). All strips go out in parallel; when D-nodes fail
    /// under the write, the stripe is placed again over the survivors (narrower
    /// if need be) and written whole again.
    pub async fn write_stripe(
        &self,
        stripe: u64,
        data: &[u8],
    ) -> Result<StripeRecord, VolumeError> {
        let (rec, n) = self
            .write_placed(stripe, Bytes::copy_from_slice(data), self.geo, false)
            .await?;
        debug_assert_eq!(n, data.len());
        Ok(rec)
    }

    /// Writes as much of `data` as one stripe `stripe` can hold now, in a
    /// stripe only as wide as it needs: `ceil(len / strip_size)` data strips
    /// (at most `k`, fewer when D-nodes are down) plus full parity. Returns
    /// where it went and how many bytes it took; the caller puts the rest
    /// in further stripes. This is how a log writes a partly filled segment
    /// without padding it to `k` strips, and keeps writing while D-nodes are
    /// down.
    pub async fn write_prefix(
        &self,
        stripe: u64,
        data: Bytes,
    ) -> Result<(StripeRecord, usize), VolumeError> {
        let s = self.geo.strip_size();
        let want = data.len().div_ceil(s).clamp(1, self.geo.k());
        let geo = if want == self.geo.k() {
            self.geo
        } else {
            self.geo.narrowed(want)?
        };
        self.write_placed(stripe, data, geo, true).await
    }

    async fn write_placed(
        &self,
        stripe: u64,
        data: Bytes,
        shape: Geometry,
        prefix: bool,
    ) -> Result<(StripeRecord, usize), VolumeError> {
        if stripe >= self.capacity_stripes() {
            return Err(VolumeError::Invalid(format!(
                "stripe {stripe} is beyond the volume's {} stripes",
                self.capacity_stripes()
            )));
        }
        if data.len() > self.geo.data_bytes() {
            return Err(VolumeError::Invalid(format!(
                "{} bytes do not fit a {}-byte stripe",
                data.len(),
                self.geo.data_bytes()
            )));
        }
        let s = self.geo.strip_size();
        let mut last_err = None;
        for _ in 0..WRITE_ATTEMPTS {
            self.cluster.revive().await;
            let p = place(&shape, &self.cluster.slots(), stripe)?;
            let (k, m) = (p.geometry.k(), p.geometry.m());
            let data = if prefix && data.len() > k * s {
                data.slice(..k * s)
            } else {
                data.clone()
            };
            // Narrower stripes carry less data: what does not fit is an error
            // the caller sees (it splits its writes across more stripes).
            if data.len() > k * s {
                return Err(VolumeError::Invalid(format!(
                    "only {} D-nodes are up: a stripe now holds {} bytes, not {}",
                    self.cluster.up_count(),
                    k * s,
                    data.len()
                )));
            }
            let codec = self.codec(k)?;
            // Whole data strips go out as slices of the caller's bytes (a
            // segment: no copy); a short last one and any empty ones are
            // zero-padded copies, the parity a buffer of its own.
            let whole = data.len() / s;
            let mut strips: Vec<Bytes> =
                (0..whole).map(|j| data.slice(j * s..(j + 1) * s)).collect();
            if whole < k {
                let mut pad = Vec::with_capacity((k - whole) * s);
                pad.extend_from_slice(&data[whole * s..]);
                pad.resize((k - whole) * s, 0);
                let pad = Bytes::from(pad);
                strips.extend((0..k - whole).map(|j| pad.slice(j * s..(j + 1) * s)));
            }
            let mut parity = vec![0u8; m * s];
            {
                let dv: Vec<&[u8]> = strips.iter().map(|b| &b[..]).collect();
                let mut pv: Vec<&mut [u8]> = parity.chunks_mut(s).collect();
                codec.encode(&dv, &mut pv)?;
            }
            let parity = Bytes::from(parity);
            strips.extend((0..m).map(|j| parity.slice(j * s..(j + 1) * s)));
            let crcs: Vec<u32> = strips
                .iter()
                .flat_map(|b| b.chunks(check_unit(s)).map(strip_checksum))
                .collect();
            let offset = self.slot(stripe);
            let writes = p.nodes.iter().zip(&strips).map(|(&n, strip)| {
                let strip = strip.clone();
                async move { (n, self.cluster.write(n, offset, strip).await) }
            });
            let results = join_all(writes).await;
            let failed: Vec<(usize, HostError)> = results
                .into_iter()
                .filter_map(|(n, r)| r.err().map(|e| (n, e)))
                .collect();
            if failed.is_empty() {
                let rec = StripeRecord {
                    stripe,
                    k: k as u16,
                    m: m as u16,
                    nodes: p.nodes.iter().map(|&n| n as u16).collect(),
                    crcs,
                };
                return Ok((rec, data.len()));
            }
            for (n, e) in failed {
                if !e.is_transport() {
                    return Err(VolumeError::Node {
                        node: self.cluster.nodes[n].spec.addr.clone(),
                        error: e,
                    });
                }
                last_err = Some(VolumeError::Node {
                    node: self.cluster.nodes[n].spec.addr.clone(),
                    error: e,
                });
            }
        }
        Err(last_err.unwrap_or_else(|| VolumeError::Invalid("stripe write failed".into())))
    }

    /// Reads `len` bytes at `offset` of the stripe's data. Reads only the
    /// strips (and the part of each) that hold the range; falls back to
    /// reconstruction when a D-node is down or a whole strip read fails its
    /// checksum.
    pub async fn read(
        &self,
        rec: &StripeRecord,
        offset: usize,
        len: usize,
    ) -> Result<Bytes, VolumeError> {
        let s = self.geo.strip_size();
        let k = rec.k as usize;
        let unit = check_unit(s);
        let units = s / unit;
        if rec.nodes.len() != k + rec.m as usize || rec.crcs.len() != rec.nodes.len() * units {
            return Err(VolumeError::Invalid(format!(
                "stripe {}: malformed record",
                rec.stripe
            )));
        }
        if offset.checked_add(len).is_none_or(|e| e > k * s) {
            return Err(VolumeError::Invalid(format!(
                "range {offset}+{len} is outside stripe {}'s {} bytes",
                rec.stripe,
                k * s
            )));
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let first = offset / s;
        let last = (offset + len - 1) / s;
        let base = self.slot(rec.stripe);
        // The part of data strip `j` the range covers: the stripe's data is
        // its data strips end to end.
        let part = |j: usize| {
            (
                offset.max(j * s) - j * s,
                (offset + len).min((j + 1) * s) - j * s,
            )
        };
        let reads = (first..=last).map(|j| {
            let (lo, hi) = part(j);
            let node = rec.nodes[j] as usize;
            async move {
                // Whole checksum units (which are whole blocks too).
                let (alo, ahi) = (lo - lo % unit, hi.div_ceil(unit) * unit);
                let r = self.cluster.read(node, base + alo as u64, ahi - alo).await;
                let sums = &rec.crcs[j * units..(j + 1) * units];
                let r = r.and_then(|b| {
                    if units_match(&b, alo, unit, sums) {
                        Ok(b.slice(lo - alo..hi - alo))
                    } else {
                        Err(HostError::InvalidArgument("checksum mismatch".into()))
                    }
                });
                (j, r)
            }
        });
        let parts = join_all(reads).await;
        if parts.iter().all(|(_, r)| r.is_ok()) {
            let mut bufs: Vec<Bytes> = parts.into_iter().map(|(_, r)| r.unwrap()).collect();
            if bufs.len() == 1 {
                return Ok(bufs.pop().unwrap());
            }
            let mut out = BytesMut::with_capacity(len);
            for b in bufs {
                out.extend_from_slice(&b);
            }
            return Ok(out.freeze());
        }
        let bad: Vec<usize> = parts
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(j, _)| *j)
            .collect();
        tracing::debug!(stripe = rec.stripe, strips = ?bad, "degraded read: reconstructing");
        let strips = self.read_stripe(rec).await?;
        let mut out = BytesMut::with_capacity(len);
        for (j, strip) in strips.iter().enumerate().take(last + 1).skip(first) {
            let (lo, hi) = part(j);
            out.extend_from_slice(&strip[lo..hi]);
        }
        Ok(out.freeze())
    }

    /// Reads a whole stripe, checking every strip's checksum and rebuilding
    /// the ones that are unreachable or corrupt from the others. Returns all
    /// `k + m` strips, correct; strips that were corrupt (not merely
    /// unreachable) are written back repaired.
    pub async fn read_stripe(&self, rec: &StripeRecord) -> Result<Vec<Vec<u8>>, VolumeError> {
        let s = self.geo.strip_size();
        let k = rec.k as usize;
        let base = self.slot(rec.stripe);
        let reads = rec
            .nodes
            .iter()
            .enumerate()
            .map(|(j, &n)| async move { (j, self.cluster.read(n as usize, base, s).await) });
        let mut strips: Vec<Vec<u8>> = Vec::with_capacity(rec.nodes.len());
        let mut lost = Vec::new();
        let mut corrupt = Vec::new();
        let unit = check_unit(s);
        let units = s / unit;
        if rec.crcs.len() != rec.nodes.len() * units {
            return Err(VolumeError::Invalid(format!(
                "stripe {}: malformed record",
                rec.stripe
            )));
        }
        for (j, r) in join_all(reads).await {
            match r {
                Ok(b) if units_match(&b, 0, unit, &rec.crcs[j * units..(j + 1) * units]) => {
                    strips.push(b.to_vec())
                }
                Ok(_) => {
                    tracing::warn!(stripe = rec.stripe, strip = j, dnode = %self.cluster.nodes[rec.nodes[j] as usize].spec.addr, "strip checksum mismatch");
                    strips.push(vec![0; s]);
                    lost.push(j);
                    corrupt.push(j);
                }
                Err(_) => {
                    strips.push(vec![0; s]);
                    lost.push(j);
                }
            }
        }
        if lost.len() > rec.m as usize {
            return Err(VolumeError::Unrecoverable {
                stripe: rec.stripe,
                detail: format!(
                    "{} of {} strips unreadable; parity covers {}",
                    lost.len(),
                    rec.nodes.len(),
                    rec.m
                ),
            });
        }
        if !lost.is_empty() {
            let codec = self.codec(k)?;
            let mut v: Vec<&mut [u8]> = strips.iter_mut().map(|x| &mut x[..]).collect();
            codec.reconstruct(&mut v, &lost)?;
        }
        for j in corrupt.into_iter().filter(|_| self.repair) {
            let n = rec.nodes[j] as usize;
            let fixed = Bytes::copy_from_slice(&strips[j]);
            match self.cluster.write(n, base, fixed).await {
                Ok(()) => tracing::info!(stripe = rec.stripe, strip = j, "corrupt strip repaired"),
                Err(e) => {
                    tracing::warn!(stripe = rec.stripe, strip = j, error = %e, "repairing a corrupt strip failed")
                }
            }
        }
        Ok(strips)
    }

    /// Rewrites the strips of `rec` that sit on `old` onto `new` (another
    /// cluster node), reconstructing them from the others. Returns the
    /// updated record; the caller stores it.
    pub async fn move_strips(
        &self,
        rec: &StripeRecord,
        old: usize,
        new: usize,
    ) -> Result<StripeRecord, VolumeError> {
        if rec.nodes.contains(&(new as u16)) {
            return Err(VolumeError::Invalid(format!(
                "stripe {} already has a strip on node {new}",
                rec.stripe
            )));
        }
        let Some(j) = rec.nodes.iter().position(|&n| n as usize == old) else {
            return Ok(rec.clone());
        };
        let strips = self.read_stripe(rec).await?;
        let data = Bytes::copy_from_slice(&strips[j]);
        self.cluster
            .write(new, self.slot(rec.stripe), data)
            .await
            .map_err(|error| VolumeError::Node {
                node: self.cluster.nodes[new].spec.addr.clone(),
                error,
            })?;
        let mut out = rec.clone();
        out.nodes[j] = new as u16;
        Ok(out)
    }
}
