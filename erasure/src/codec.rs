//! The stripe codec: encode parity, reconstruct lost strips, verify a stripe.
//!
//! Galois-field arithmetic comes from `rustfs-erasure-codec` (AVX-512/GFNI
//! kernels here), picked by measurement; it stays behind this API so it can
//! change. Strip order in a stripe is always: data `0..k`, then for an LRC
//! the local parities `k..k+l`, then the global parities.

use std::ops::Range;

use rustfs_erasure_codec::galois_8::{self, ReedSolomon};

use crate::geometry::{Geometry, Layout};
use crate::Error;

pub struct Codec {
    geo: Geometry,
    /// Reed-Solomon over the data and the global parities.
    rs: ReedSolomon,
    /// LRC: the coefficients of each global parity over the data strips,
    /// read off the Reed-Solomon encoder so both paths agree bit for bit.
    global_rows: Vec<Vec<u8>>,
    groups: Vec<Range<usize>>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Codec({})", self.geo)
    }
}

fn backend_err(e: impl std::fmt::Debug) -> Error {
    Error::Codec(format!("{e:?}"))
}

impl Codec {
    pub fn new(geo: Geometry) -> Result<Self, Error> {
        let g = geo.global_parities();
        let rs = ReedSolomon::new(geo.k(), g).map_err(backend_err)?;
        let mut global_rows = Vec::new();
        if let Layout::Lrc { .. } = geo.layout() {
            // Encode each unit vector: parity j of e_i is coefficient (j, i).
            global_rows = vec![vec![0u8; geo.k()]; g];
            for i in 0..geo.k() {
                let data: Vec<[u8; 1]> = (0..geo.k()).map(|x| [(x == i) as u8]).collect();
                let mut parity = vec![[0u8; 1]; g];
                rs.encode_sep(&data, &mut parity).map_err(backend_err)?;
                for (row, p) in global_rows.iter_mut().zip(&parity) {
                    row[i] = p[0];
                }
            }
        }
        Ok(Self {
            groups: geo.groups(),
            geo,
            rs,
            global_rows,
        })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// Name of the SIMD kernel in use (for benchmark reports).
    pub fn backend() -> &'static str {
        galois_8::active_backend_name()
    }

    fn check_len<T: AsRef<[u8]>>(strips: &[T]) -> Result<usize, Error> {
        let len = strips.first().map(|s| s.as_ref().len()).unwrap_or(0);
        if len == 0 {
            return Err(Error::StripSize("strips must not be empty".into()));
        }
        if let Some((i, s)) = strips
            .iter()
            .enumerate()
            .find(|(_, s)| s.as_ref().len() != len)
        {
            return Err(Error::StripSize(format!(
                "strip {i} is {} bytes, strip 0 is {len}",
                s.as_ref().len()
            )));
        }
        Ok(len)
    }

    /// Checks a whole stripe's shape; returns the strip length.
    fn check_stripe<T: AsRef<[u8]>>(&self, strips: &[T]) -> Result<usize, Error> {
        if strips.len() != self.geo.width() {
            return Err(Error::StripeWidth {
                expected: self.geo.width(),
                got: strips.len(),
            });
        }
        Self::check_len(strips)
    }

    /// Computes the `m` parity strips of `k` data strips into caller buffers.
    pub fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), Error> {
        let (k, m) = (self.geo.k(), self.geo.m());
        if data.len() != k || parity.len() != m {
            return Err(Error::StripCount {
                expected: (k, m),
                got: (data.len(), parity.len()),
            });
        }
        let len = Self::check_len(data)?;
        if parity.iter().any(|p| p.len() != len) {
            return Err(Error::StripSize(format!(
                "parity strips must be {len} bytes like the data"
            )));
        }
        let l = self.groups.len();
        let (local, global) = parity.split_at_mut(l);
        for (dst, g) in local.iter_mut().zip(&self.groups) {
            xor_of(dst, g.clone().map(|i| data[i]));
        }
        self.rs.encode_sep(data, global).map_err(backend_err)
    }

    /// Rebuilds the strips listed in `lost` (data or parity) in place from
    /// the others. More losses than the code can take, duplicate or
    /// out-of-range indices, or unequal strip sizes are errors.
    pub fn reconstruct(&self, strips: &mut [&mut [u8]], lost: &[usize]) -> Result<(), Error> {
        let w = self.geo.width();
        let len = self.check_stripe(strips)?;
        let mut missing = vec![false; w];
        for &i in lost {
            if i >= w {
                return Err(Error::BadIndex(format!(
                    "strip {i} does not exist in a {w}-strip stripe"
                )));
            }
            if std::mem::replace(&mut missing[i], true) {
                return Err(Error::BadIndex(format!("strip {i} is listed twice")));
            }
        }
        if lost.is_empty() {
            return Ok(());
        }
        if lost.len() > self.geo.m() {
            return Err(Error::TooManyLosses {
                lost: lost.len(),
                tolerable: self.geo.m(),
            });
        }
        match self.geo.layout() {
            Layout::ReedSolomon => {
                let mut v: Vec<(&mut [u8], bool)> = strips
                    .iter_mut()
                    .enumerate()
                    .map(|(i, s)| (&mut **s, !missing[i]))
                    .collect();
                self.rs.reconstruct(&mut v).map_err(backend_err)
            }
            Layout::Lrc { .. } => self.reconstruct_lrc(strips, &mut missing, len),
        }
    }

    fn reconstruct_lrc(
        &self,
        strips: &mut [&mut [u8]],
        missing: &mut [bool],
        len: usize,
    ) -> Result<(), Error> {
        let k = self.geo.k();
        let l = self.groups.len();
        let g = self.global_rows.len();
        let mut tmp = vec![0u8; len];
        // 1. One loss in a group (its data and its local parity): XOR of the rest.
        for (j, grp) in self.groups.iter().enumerate() {
            let members: Vec<usize> = grp.clone().chain(std::iter::once(k + j)).collect();
            let gone: Vec<usize> = members.iter().copied().filter(|&i| missing[i]).collect();
            if let [x] = gone[..] {
                xor_of(
                    &mut tmp,
                    members.iter().filter(|&&i| i != x).map(|&i| &*strips[i]),
                );
                strips[x].copy_from_slice(&tmp);
                missing[x] = false;
            }
        }
        // 2. Remaining lost data: solve with surviving global parities and the
        //    local parities of groups that still miss data, jointly.
        let unknown: Vec<usize> = (0..k).filter(|&i| missing[i]).collect();
        if !unknown.is_empty() {
            let mut eqs: Vec<(usize, Vec<u8>)> = Vec::new();
            for j in 0..g {
                if !missing[k + l + j] {
                    eqs.push((k + l + j, self.global_rows[j].clone()));
                }
            }
            for (j, grp) in self.groups.iter().enumerate() {
                if !missing[k + j] && unknown.iter().any(|i| grp.contains(i)) {
                    let mut row = vec![0u8; k];
                    grp.clone().for_each(|i| row[i] = 1);
                    eqs.push((k + j, row));
                }
            }
            let chosen = pick_independent(&eqs, &unknown).ok_or(Error::TooManyLosses {
                lost: missing.iter().filter(|&&x| x).count(),
                tolerable: self.geo.guaranteed_losses(),
            })?;
            let a: Vec<Vec<u8>> = chosen
                .iter()
                .map(|&e| unknown.iter().map(|&i| eqs[e].1[i]).collect())
                .collect();
            let inv =
                invert(a).ok_or_else(|| Error::Codec("singular system after rank check".into()))?;
            // rhs_e = parity_e - sum over known data of coefficient * data
            let mut rhs: Vec<Vec<u8>> = Vec::with_capacity(chosen.len());
            for &e in &chosen {
                let (pidx, row) = &eqs[e];
                let mut r = strips[*pidx].to_vec();
                for (i, &c) in row.iter().enumerate() {
                    if c != 0 && !missing[i] {
                        galois_8::mul_slice_xor(c, strips[i], &mut r);
                    }
                }
                rhs.push(r);
            }
            for (ui, &i) in unknown.iter().enumerate() {
                tmp.fill(0);
                for (e, r) in rhs.iter().enumerate() {
                    let c = inv[ui][e];
                    if c != 0 {
                        galois_8::mul_slice_xor(c, r, &mut tmp);
                    }
                }
                strips[i].copy_from_slice(&tmp);
                missing[i] = false;
            }
        }
        // 3. Lost parities, now that all data is present.
        for (j, grp) in self.groups.iter().enumerate() {
            if missing[k + j] {
                xor_of(&mut tmp, grp.clone().map(|i| &*strips[i]));
                strips[k + j].copy_from_slice(&tmp);
                missing[k + j] = false;
            }
        }
        for j in 0..g {
            if missing[k + l + j] {
                tmp.fill(0);
                for (i, &c) in self.global_rows[j].iter().enumerate() {
                    if c != 0 {
                        galois_8::mul_slice_xor(c, strips[i], &mut tmp);
                    }
                }
                strips[k + l + j].copy_from_slice(&tmp);
                missing[k + l + j] = false;
            }
        }
        Ok(())
    }

    /// Recomputes parity and compares: `Ok(false)` when any parity disagrees.
    pub fn verify(&self, strips: &[&[u8]]) -> Result<bool, Error> {
        let len = self.check_stripe(strips)?;
        let k = self.geo.k();
        let l = self.groups.len();
        let mut tmp = vec![0u8; len];
        for (j, grp) in self.groups.iter().enumerate() {
            xor_of(&mut tmp, grp.clone().map(|i| strips[i]));
            if tmp[..] != *strips[k + j] {
                return Ok(false);
            }
        }
        let rs_view: Vec<&[u8]> = strips[..k]
            .iter()
            .chain(&strips[k + l..])
            .copied()
            .collect();
        self.rs.verify(&rs_view).map_err(backend_err)
    }
}

/// `dst = XOR of srcs` (GF(2^8) addition), using the SIMD kernel.
fn xor_of<'a>(dst: &mut [u8], mut srcs: impl Iterator<Item = &'a [u8]>) {
    match srcs.next() {
        Some(first) => dst.copy_from_slice(first),
        None => return dst.fill(0),
    }
    for s in srcs {
        galois_8::mul_slice_xor(1, s, dst);
    }
}

/// Picks equations whose rows, restricted to the `unknown` columns, are
/// linearly independent and as many as the unknowns; None if rank is short.
fn pick_independent(eqs: &[(usize, Vec<u8>)], unknown: &[usize]) -> Option<Vec<usize>> {
    let u = unknown.len();
    let mut basis: Vec<Vec<u8>> = Vec::new();
    let mut pivots: Vec<usize> = Vec::new();
    let mut chosen = Vec::new();
    for (e, (_, row)) in eqs.iter().enumerate() {
        let mut r: Vec<u8> = unknown.iter().map(|&i| row[i]).collect();
        for (b, &p) in basis.iter().zip(&pivots) {
            if r[p] != 0 {
                let f = galois_8::div(r[p], b[p]);
                for (x, &y) in r.iter_mut().zip(b) {
                    *x ^= galois_8::mul(f, y);
                }
            }
        }
        if let Some(p) = r.iter().position(|&x| x != 0) {
            basis.push(r);
            pivots.push(p);
            chosen.push(e);
            if chosen.len() == u {
                return Some(chosen);
            }
        }
    }
    None
}

/// Inverts a square matrix over GF(2^8) (Gauss-Jordan).
fn invert(mut a: Vec<Vec<u8>>) -> Option<Vec<Vec<u8>>> {
    let n = a.len();
    let mut inv: Vec<Vec<u8>> = (0..n)
        .map(|i| (0..n).map(|j| (i == j) as u8).collect())
        .collect();
    for col in 0..n {
        let p = (col..n).find(|&r| a[r][col] != 0)?;
        a.swap(col, p);
        inv.swap(col, p);
        let f = galois_8::div(1, a[col][col]);
        for j in 0..n {
            a[col][j] = galois_8::mul(a[col][j], f);
            inv[col][j] = galois_8::mul(inv[col][j], f);
        }
        for r in 0..n {
            if r != col && a[r][col] != 0 {
                let f = a[r][col];
                for j in 0..n {
                    a[r][j] ^= galois_8::mul(f, a[col][j]);
                    inv[r][j] ^= galois_8::mul(f, inv[col][j]);
                }
            }
        }
    }
    Some(inv)
}
