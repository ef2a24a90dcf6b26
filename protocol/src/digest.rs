//! CRC32C header and data digests (NVMe/TCP 3.6.1.4 and 3.6.1.5).

/// CRC32C as NVMe/TCP uses it: the standard Castagnoli CRC (initial value and
/// final XOR of all ones), stored little-endian on the wire.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_vector() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(super::crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(super::crc32c(b"123456789"), 0xe306_9283);
    }
}
