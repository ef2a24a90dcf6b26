//! What a C-node reads back from the D-nodes is decoded as untrusted:
//! stored chunks (every encoding, with a reference; compression regions
//! and their member tables), chunk frame headers,
//! metadata frames (and which are of a newer version), pages (and the
//! range digests of their extents) and log records. None may panic, hang or
//! allocate without bound, and a chunk that decodes has exactly the
//! length its entry claims.
#![no_main]
use dase_initiator::cnode::meta::{self, CommitRecord, MetaPart, MetaRecord, PageBlob};
use dase_initiator::reduce::{region_members, Decoder, Encoding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let enc = match data[0] % 8 {
        0 => Encoding::Raw,
        1 => Encoding::Zstd,
        2 => Encoding::Delta,
        3 => Encoding::XorDelta,
        4 => Encoding::Region,
        5 => Encoding::Slice,
        6 => Encoding::Planes,
        _ => Encoding::XorPlanes,
    };
    // Up to twice the largest chunk.
    let len = u16::from_le_bytes([data[1], data[2]]) as usize * 2;
    let rest = &data[4..];
    let (base, stored) = rest.split_at(data[3] as usize * rest.len() / 256);
    let mut out = Vec::new();
    let mut d = Decoder::default();
    if d.decode(enc, stored, Some(base), len, &mut out).is_ok() {
        assert_eq!(out.len(), len);
    }
    let _ = d.decode(enc, stored, None, len, &mut out);
    let _ = region_members(stored);
    let _ = meta::parse_chunk_header(data);
    if let Ok(page) = meta::decode::<PageBlob>(data, "page") {
        // An extent page's extents are digested by range on load.
        let _ = meta::extent_page_of(page.page);
        for i in &page.inodes {
            if let meta::Content::File(m) = &i.content {
                let _ = meta::range_digests(m);
            }
        }
    }
    let _ = meta::newer_version(meta::COMMIT_MAGIC, data);
    let _ = meta::decode::<MetaRecord>(data, "record");
    let _ = meta::decode_record(data);
    let _ = meta::unframe::<MetaPart>(meta::META_MAGIC, data);
    let _ = meta::unframe::<CommitRecord>(meta::COMMIT_MAGIC, data);
});
