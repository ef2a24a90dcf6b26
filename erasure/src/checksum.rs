//! Per-strip CRC32C, so a reader can tell a corrupt strip from a good one and
//! treat it as lost.

/// The checksum stored beside a strip.
#[inline]
pub fn strip_checksum(strip: &[u8]) -> u32 {
    crc32c::crc32c(strip)
}

/// Indices of strips whose content does not match its recorded checksum.
pub fn corrupt_strips<T: AsRef<[u8]>>(strips: &[T], sums: &[u32]) -> Vec<usize> {
    strips
        .iter()
        .zip(sums)
        .enumerate()
        .filter(|(_, (s, &c))| strip_checksum(s.as_ref()) != c)
        .map(|(i, _)| i)
        .collect()
}
