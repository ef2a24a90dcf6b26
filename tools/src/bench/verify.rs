//! Data verification that names the fault.
//!
//! Every 512-byte unit of a written block starts with a 32-byte header —
//! magic, the unit's own byte offset, the write's generation, a CRC32C of the
//! unit, and its index within the write and the write's length in units —
//! followed by a pattern derived from (offset, generation). A read then tells
//! apart:
//! - a flipped bit or a unit torn inside (CRC),
//! - a misdirected write (the header names another offset),
//! - a torn write (a unit inside a write's extent older than that write:
//!   part of it never landed; newer units there are a later overwrite),
//! - a stale write (a whole block from an older generation than last written),
//! - a block never written (no header).

use std::fmt;

/// Verification granularity: the smallest sector any target uses.
pub const UNIT: usize = 512;
const HDR: usize = 32;
const MAGIC: u64 = u64::from_le_bytes(*b"daseVRFY");

/// What a verified read found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    NeverWritten {
        offset: u64,
    },
    Corrupt {
        offset: u64,
    },
    Misdirected {
        offset: u64,
        written_for: u64,
    },
    Torn {
        block: u64,
        generations: (u64, u64),
    },
    Stale {
        block: u64,
        found: u64,
        expected: u64,
    },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::NeverWritten { offset } => write!(f, "no verify header at offset {offset:#x}: never written by a verifying job"),
            Fault::Corrupt { offset } => write!(f, "checksum mismatch in the 512-byte unit at offset {offset:#x}: corrupt or torn inside the unit"),
            Fault::Misdirected { offset, written_for } => {
                write!(f, "misdirected write: offset {offset:#x} holds data written for offset {written_for:#x}")
            }
            Fault::Torn { block, generations } => write!(
                f,
                "torn write: block at offset {block:#x} mixes units of generations {} and {}",
                generations.0, generations.1
            ),
            Fault::Stale { block, found, expected } => {
                write!(f, "stale data: block at offset {block:#x} is generation {found}, last written as {expected}")
            }
        }
    }
}

fn unit_crc(unit: &[u8]) -> u32 {
    // CRC over everything but the CRC field itself (bytes 24..28).
    let c = crc32c::crc32c(&unit[..24]);
    crc32c::crc32c_append(c, &unit[28..])
}

/// Unit header fields after the CRC: index in its write, units in the write.
fn unit_pos(unit: &[u8]) -> (usize, usize) {
    let idx = u16::from_le_bytes(unit[28..30].try_into().unwrap()) as usize;
    let cnt = u16::from_le_bytes(unit[30..32].try_into().unwrap()) as usize;
    (idx, cnt.max(idx + 1))
}

/// Fills `buf`, a block to be written at `offset`, for generation `gen`.
/// Writes are at most 65535 units (32 MiB).
pub fn fill(buf: &mut [u8], offset: u64, gen: u64) {
    let count = (buf.len() / UNIT).min(u16::MAX as usize) as u16;
    for (i, unit) in buf.chunks_exact_mut(UNIT).enumerate() {
        let off = offset + (i * UNIT) as u64;
        unit[..8].copy_from_slice(&MAGIC.to_le_bytes());
        unit[8..16].copy_from_slice(&off.to_le_bytes());
        unit[16..24].copy_from_slice(&gen.to_le_bytes());
        unit[24..28].fill(0);
        unit[28..30].copy_from_slice(&(i as u16).to_le_bytes());
        unit[30..32].copy_from_slice(&count.to_le_bytes());
        let mut x = off ^ gen.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for w in unit[HDR..].chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let c = unit_crc(unit);
        unit[24..28].copy_from_slice(&c.to_le_bytes());
    }
}

/// Checks a block read from `offset`. `expected` is the generation last
/// written over the whole block, when this run knows it.
pub fn check(buf: &[u8], offset: u64, expected: Option<u64>) -> Result<(), Fault> {
    let n = buf.len() / UNIT;
    let mut gens = Vec::with_capacity(n);
    // Runs of consecutive units from one write: (first unit of the write, relative to the read; units; generation).
    let mut writes: Vec<(isize, usize, u64)> = Vec::new();
    for (i, unit) in buf.chunks_exact(UNIT).enumerate() {
        let off = offset + (i * UNIT) as u64;
        let word = |r: std::ops::Range<usize>| u64::from_le_bytes(unit[r].try_into().unwrap());
        if word(0..8) != MAGIC {
            return Err(Fault::NeverWritten { offset: off });
        }
        let crc = u32::from_le_bytes(unit[24..28].try_into().unwrap());
        if unit_crc(unit) != crc {
            return Err(Fault::Corrupt { offset: off });
        }
        let written_for = word(8..16);
        if written_for != off {
            return Err(Fault::Misdirected {
                offset: off,
                written_for,
            });
        }
        let g = word(16..24);
        let (idx, cnt) = unit_pos(unit);
        let w = (i as isize - idx as isize, cnt, g);
        if writes.last() != Some(&w) {
            writes.push(w);
        }
        gens.push(g);
    }
    // Every unit inside a write's extent must be that write or newer.
    for &(start, cnt, g) in &writes {
        let lo = start.max(0) as usize;
        let hi = ((start + cnt as isize).max(0) as usize).min(n);
        if let Some(j) = (lo..hi).find(|&j| gens[j] < g) {
            let block = (offset as i64 + start as i64 * UNIT as i64).max(0) as u64;
            return Err(Fault::Torn {
                block,
                generations: (g, gens[j]),
            });
        }
    }
    if let Some(expected) = expected {
        if let Some(&found) = gens.iter().find(|&&g| g != expected) {
            return Err(Fault::Stale {
                block: offset,
                found,
                expected,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(offset: u64, gen: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        fill(&mut b, offset, gen);
        b
    }

    #[test]
    fn good_data_passes() {
        let b = block(8192, 3, 4096);
        assert_eq!(check(&b, 8192, Some(3)), Ok(()));
        assert_eq!(check(&b, 8192, None), Ok(()));
    }

    #[test]
    fn catches_a_flipped_bit() {
        let mut b = block(0, 1, 4096);
        b[1000] ^= 4;
        assert_eq!(check(&b, 0, Some(1)), Err(Fault::Corrupt { offset: 512 }));
    }

    #[test]
    fn catches_a_misdirected_write() {
        // The block meant for 64 KiB landed at 0.
        let b = block(65536, 1, 4096);
        let e = check(&b, 0, Some(1)).unwrap_err();
        assert_eq!(
            e,
            Fault::Misdirected {
                offset: 0,
                written_for: 65536
            }
        );
        assert!(e.to_string().contains("misdirected"));
    }

    #[test]
    fn catches_a_torn_write() {
        // The first half of a new write landed; the second half is the old one.
        let old = block(4096, 1, 4096);
        let mut b = block(4096, 2, 4096);
        b[2048..].copy_from_slice(&old[2048..]);
        let e = check(&b, 4096, Some(2)).unwrap_err();
        assert_eq!(
            e,
            Fault::Torn {
                block: 4096,
                generations: (2, 1)
            }
        );
        assert!(e.to_string().contains("torn"));
    }

    #[test]
    fn a_newer_write_inside_an_older_one_is_not_torn() {
        // 16 KiB written, then a 4 KiB overwrite in its middle, read as one.
        let mut b = block(0, 1, 16384);
        b[4096..8192].copy_from_slice(&block(4096, 2, 4096));
        assert_eq!(check(&b, 0, None), Ok(()));
        // A read spanning two whole writes of different generations is fine too.
        let mut two = block(0, 3, 4096);
        two.extend_from_slice(&block(4096, 9, 4096));
        assert_eq!(check(&two, 0, None), Ok(()));
    }

    #[test]
    fn catches_a_stale_block_and_an_unwritten_one() {
        let b = block(0, 4, 4096);
        assert_eq!(
            check(&b, 0, Some(5)),
            Err(Fault::Stale {
                block: 0,
                found: 4,
                expected: 5
            })
        );
        assert_eq!(
            check(&[0u8; 4096], 0, None),
            Err(Fault::NeverWritten { offset: 0 })
        );
    }
}
