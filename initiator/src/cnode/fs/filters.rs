//! What an index bucket no longer in the page cache holds, in brief: a new
//! chunk's lookups need not load its buckets to learn it is new.
//!
//! Fingerprints and super-features are random, so once the indexes
//! outgrow the page cache nearly every lookup of a new chunk (one
//! chunk-index bucket, two similarity buckets) would load a 64 KiB page
//! from the D-nodes to find nothing. When the cache evicts a bucket page,
//! a [`Filter`] of it is kept instead: the sorted 16-bit tags of its keys,
//! 2 bytes a key against ~120 in the page. A tag the filter lacks means the
//! key is not in the bucket; a tag it has (the key's, or one of ~n/65536
//! others') means the bucket must be loaded.
//!
//! Why this is exact: a bucket page changes only while it is resident
//! (merges and splits take it with `page_mut`), and the cache evicts only
//! pages whose content is committed, so a filter made at eviction
//! describes the bucket until the page is next loaded and changed — and a
//! resident page is always asked before its filter. Filters hold no state
//! of their own on the D-nodes. A C-node makes them as it evicts, and a
//! fresh one first *warms* them: it reads each bucket not in memory once
//! and keeps its filter, not its page (`FileSystem::warm_filters`). A
//! filter warmed from a page read at location L is kept only if the page
//! is still not resident and still at L when the read returns: a bucket
//! rewritten meanwhile has a new location. They live within a byte
//! budget, oldest made dropped first; a bucket without one is loaded as
//! before.

use lru::LruCache;

use crate::cnode::meta::{CHUNK_PAGES, SIMILAR_PAGES};
use crate::reduce::Fp;

/// A filter's bytes beyond its tags (the map's slot and the box).
const OVERHEAD: usize = 48;

/// The tag of a chunk fingerprint: bytes the bucket number does not use
/// (it takes the low bits of the first eight).
pub(super) fn chunk_tag(fp: &Fp) -> u16 {
    u16::from_le_bytes([fp[8], fp[9]])
}

/// The tag of a super-feature (a splitmix output, so its top bits are as
/// random as its low ones, which the bucket number takes).
pub(super) fn similar_tag(sf: u64) -> u16 {
    (sf >> 48) as u16
}

/// Whether page `p` is an index bucket (and so may have a filter).
pub(super) fn is_bucket(p: u64) -> bool {
    p >= CHUNK_PAGES
}

/// The sorted tags of one bucket's keys.
pub(super) struct Filter(Box<[u16]>);

impl Filter {
    pub(super) fn new(mut tags: Vec<u16>) -> Self {
        tags.sort_unstable();
        tags.dedup();
        Self(tags.into_boxed_slice())
    }

    /// Of a chunk-index bucket's fingerprints or a similarity bucket's
    /// super-features, by the page number.
    pub(super) fn of_bucket<'a>(
        p: u64,
        fps: impl Iterator<Item = &'a Fp>,
        sfs: impl Iterator<Item = &'a u64>,
    ) -> Self {
        if p >= SIMILAR_PAGES {
            Self::new(sfs.map(|&sf| similar_tag(sf)).collect())
        } else {
            Self::new(fps.map(chunk_tag).collect())
        }
    }

    pub(super) fn may_hold(&self, tag: u16) -> bool {
        self.0.binary_search(&tag).is_ok()
    }

    pub(super) fn bytes(&self) -> usize {
        self.0.len() * 2 + OVERHEAD
    }
}

/// The filters of evicted buckets, within a byte budget.
pub(super) struct Filters {
    map: LruCache<u64, Filter>,
    bytes: usize,
    budget: usize,
}

impl Default for Filters {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Filters {
    pub(super) fn new(budget: usize) -> Self {
        Self {
            map: LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    pub(super) fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        self.trim();
    }

    /// Keeps `f` for page `p` (replacing any older one), dropping the
    /// oldest while over budget.
    pub(super) fn insert(&mut self, p: u64, f: Filter) {
        if f.bytes() > self.budget {
            self.remove(p);
            return;
        }
        self.bytes += f.bytes();
        if let Some(old) = self.map.put(p, f) {
            self.bytes -= old.bytes();
        }
        self.trim();
    }

    pub(super) fn remove(&mut self, p: u64) {
        if let Some(f) = self.map.pop(&p) {
            self.bytes -= f.bytes();
        }
    }

    /// Whether bucket `p` may hold a key of `tag`; None when there is no
    /// filter of it (the bucket must be asked).
    pub(super) fn may_hold(&self, p: u64, tag: u16) -> Option<bool> {
        self.map.peek(&p).map(|f| f.may_hold(tag))
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether `f` fits beside the filters kept without dropping any.
    pub(super) fn has_room_for(&self, f: &Filter) -> bool {
        self.bytes + f.bytes() <= self.budget
    }

    pub(super) fn contains(&self, p: u64) -> bool {
        self.map.contains(&p)
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    fn trim(&mut self) {
        while self.bytes > self.budget {
            let Some((_, f)) = self.map.pop_lru() else {
                break;
            };
            self.bytes -= f.bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(i: u64) -> Fp {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    #[test]
    fn a_filter_never_denies_a_key_it_was_made_of_and_denies_most_others() {
        let keys: Vec<Fp> = (0..1000).map(fp).collect();
        let f = Filter::of_bucket(CHUNK_PAGES | 7, keys.iter(), [].iter());
        assert!(keys.iter().all(|k| f.may_hold(chunk_tag(k))));
        let others = (1000..101_000)
            .filter(|&i| f.may_hold(chunk_tag(&fp(i))))
            .count();
        // ~1000/65536 of them: 1.5 %.
        assert!(others < 3000, "{others} of 100000 other keys pass");
        let sfs: Vec<u64> = keys
            .iter()
            .map(|k| u64::from_le_bytes(k[16..24].try_into().unwrap()))
            .collect();
        let f = Filter::of_bucket(SIMILAR_PAGES | 3, [].iter(), sfs.iter());
        assert!(sfs.iter().all(|&s| f.may_hold(similar_tag(s))));
    }

    #[test]
    fn filters_stay_within_their_budget_oldest_dropped_first() {
        let mut fs = Filters::new(3 * (OVERHEAD + 200));
        for p in 0..5u64 {
            fs.insert(CHUNK_PAGES | p, Filter::new((0..100).collect()));
            assert!(fs.bytes() <= 3 * (OVERHEAD + 200));
        }
        assert_eq!(fs.len(), 3);
        assert_eq!(fs.may_hold(CHUNK_PAGES | 1, 5), None);
        assert_eq!(fs.may_hold(CHUNK_PAGES | 4, 5), Some(true));
        assert_eq!(fs.may_hold(CHUNK_PAGES | 4, 500), Some(false));
        // Replacing one keeps the count right.
        fs.insert(CHUNK_PAGES | 4, Filter::new(vec![1]));
        assert_eq!(fs.bytes(), 2 * (OVERHEAD + 200) + OVERHEAD + 2);
        fs.remove(CHUNK_PAGES | 4);
        fs.remove(CHUNK_PAGES | 4);
        assert_eq!(fs.bytes(), 2 * (OVERHEAD + 200));
        // No budget: nothing kept.
        fs.set_budget(0);
        assert_eq!((fs.len(), fs.bytes()), (0, 0));
        fs.insert(CHUNK_PAGES, Filter::new(vec![1]));
        assert_eq!(fs.len(), 0);
    }
}
