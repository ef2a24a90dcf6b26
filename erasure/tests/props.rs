//! Properties of the codec and placement over random geometries, data and
//! loss patterns.

use dase_erasure::*;
use proptest::prelude::*;

fn stripe(geo: &Geometry, len: usize, seed: u64) -> Vec<Vec<u8>> {
    let codec = Codec::new(*geo).unwrap();
    let mut x = seed | 1;
    let mut byte = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    let data: Vec<Vec<u8>> = (0..geo.k())
        .map(|_| (0..len).map(|_| byte()).collect())
        .collect();
    let mut parity = vec![vec![0u8; len]; geo.m()];
    let d: Vec<&[u8]> = data.iter().map(|v| &v[..]).collect();
    let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
    codec.encode(&d, &mut p).unwrap();
    data.into_iter().chain(parity).collect()
}

/// Zeroes the lost strips and reconstructs them.
fn lose_and_rebuild(
    codec: &Codec,
    good: &[Vec<u8>],
    lost: &[usize],
) -> Result<Vec<Vec<u8>>, Error> {
    let mut s: Vec<Vec<u8>> = good.to_vec();
    for &i in lost {
        s[i].fill(0xee);
    }
    let mut v: Vec<&mut [u8]> = s.iter_mut().map(|v| &mut v[..]).collect();
    codec.reconstruct(&mut v, lost)?;
    Ok(s)
}

fn geometry() -> impl Strategy<Value = Geometry> {
    (1usize..48, 1usize..10, 1usize..6, any::<bool>()).prop_filter_map(
        "valid",
        |(k, m, strips64, lrc)| {
            let layout = if lrc && m >= 2 {
                Layout::Lrc {
                    groups: (m / 2).clamp(1, k),
                }
            } else {
                Layout::ReedSolomon
            };
            Geometry::new(k, m, strips64 * 64, layout).ok()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_guaranteed_loss_pattern_reconstructs_exactly(geo in geometry(), seed: u64, picks in prop::collection::vec(any::<prop::sample::Index>(), 0..10)) {
        let codec = Codec::new(geo).unwrap();
        let good = stripe(&geo, geo.strip_size(), seed);
        let mut lost: Vec<usize> = picks.iter().map(|p| p.index(geo.width())).collect();
        lost.sort_unstable();
        lost.dedup();
        lost.truncate(geo.guaranteed_losses());
        let got = lose_and_rebuild(&codec, &good, &lost).unwrap();
        prop_assert_eq!(got, good);
    }

    /// Beyond the guarantee an LRC may still recover; when it says it did,
    /// the data is exact, and otherwise it reports the loss.
    #[test]
    fn beyond_the_guarantee_it_is_exact_or_an_error(geo in geometry(), seed: u64, picks in prop::collection::vec(any::<prop::sample::Index>(), 1..12)) {
        let codec = Codec::new(geo).unwrap();
        let good = stripe(&geo, 64, seed);
        let mut lost: Vec<usize> = picks.iter().map(|p| p.index(geo.width())).collect();
        lost.sort_unstable();
        lost.dedup();
        match lose_and_rebuild(&codec, &good, &lost) {
            Ok(got) => prop_assert_eq!(got, good),
            Err(Error::TooManyLosses { .. }) => prop_assert!(lost.len() > geo.guaranteed_losses()),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn verify_catches_any_single_corruption(geo in geometry(), seed: u64, at in any::<prop::sample::Index>(), byte in 1u8..) {
        let codec = Codec::new(geo).unwrap();
        let mut s = stripe(&geo, 64, seed);
        let refs: Vec<&[u8]> = s.iter().map(|v| &v[..]).collect();
        prop_assert!(codec.verify(&refs).unwrap());
        let i = at.index(geo.width() * 64);
        s[i / 64][i % 64] ^= byte;
        let refs: Vec<&[u8]> = s.iter().map(|v| &v[..]).collect();
        prop_assert!(!codec.verify(&refs).unwrap());
    }

    #[test]
    fn placement_uses_distinct_up_nodes(n in 1usize..40, down_mask: u64, stripe_no: u64, domains in 1usize..6) {
        let geo = Geometry::parse("10+3", 4096).unwrap();
        let nodes: Vec<NodeSlot> = (0..n).map(|i| NodeSlot { id: i as u64 * 7919, domain: format!("rack{}", i % domains), up: down_mask >> (i % 64) & 1 == 0 || i % 3 == 0 }).collect();
        let up = nodes.iter().filter(|x| x.up).count();
        match place(&geo, &nodes, stripe_no) {
            Ok(p) => {
                prop_assert_eq!(p.nodes.len(), p.geometry.width());
                prop_assert_eq!(p.geometry.m(), 3);
                prop_assert_eq!(p.geometry.width(), up.min(13));
                let mut s = p.nodes.clone();
                s.sort_unstable();
                s.dedup();
                prop_assert_eq!(s.len(), p.nodes.len());
                prop_assert!(p.nodes.iter().all(|&i| nodes[i].up));
            }
            Err(Error::NotEnoughNodes { .. }) => prop_assert!(up <= 3),
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let geo = Geometry::parse("4+2", 64).unwrap();
    let codec = Codec::new(geo).unwrap();
    let good = stripe(&geo, 64, 1);
    assert!(matches!(
        lose_and_rebuild(&codec, &good, &[0, 1, 2]),
        Err(Error::TooManyLosses { .. })
    ));
    assert!(matches!(
        lose_and_rebuild(&codec, &good, &[1, 1]),
        Err(Error::BadIndex(_))
    ));
    let mut s = good.clone();
    let mut v: Vec<&mut [u8]> = s.iter_mut().map(|v| &mut v[..]).collect();
    assert!(matches!(
        codec.reconstruct(&mut v, &[6]),
        Err(Error::BadIndex(_))
    ));
    let mut s = good.clone();
    s[2].truncate(32);
    let mut v: Vec<&mut [u8]> = s.iter_mut().map(|v| &mut v[..]).collect();
    assert!(matches!(
        codec.reconstruct(&mut v, &[0]),
        Err(Error::StripSize(_))
    ));
    let d: Vec<&[u8]> = good[..3].iter().map(|v| &v[..]).collect();
    let mut p = vec![vec![0u8; 64]; 2];
    let mut pr: Vec<&mut [u8]> = p.iter_mut().map(|v| &mut v[..]).collect();
    assert!(matches!(
        codec.encode(&d, &mut pr),
        Err(Error::StripCount { .. })
    ));
}

#[test]
fn corrupt_strips_are_found_by_checksum_and_rebuilt() {
    let geo = Geometry::parse("10+3", 4096).unwrap();
    let codec = Codec::new(geo).unwrap();
    let good = stripe(&geo, 4096, 9);
    let sums: Vec<u32> = good.iter().map(|s| strip_checksum(s)).collect();
    let mut s = good.clone();
    s[4][100] ^= 1;
    s[11][7] ^= 0x80;
    let bad = corrupt_strips(&s, &sums);
    assert_eq!(bad, vec![4, 11]);
    let mut v: Vec<&mut [u8]> = s.iter_mut().map(|v| &mut v[..]).collect();
    codec.reconstruct(&mut v, &bad).unwrap();
    assert_eq!(s, good);
}

#[test]
fn lrc_repairs_a_single_loss_from_its_group_alone() {
    // Poison everything outside the group: the repair must not read it.
    let geo = Geometry::parse("20+2+4", 64).unwrap();
    let codec = Codec::new(geo).unwrap();
    let good = stripe(&geo, 64, 3);
    let mut s = good.clone();
    s[5].fill(0);
    for (i, strip) in s.iter_mut().enumerate() {
        if !geo.repair_sources(5).contains(&i) && i != 5 {
            strip.fill(0x5a);
        }
    }
    let mut v: Vec<&mut [u8]> = s.iter_mut().map(|v| &mut v[..]).collect();
    codec.reconstruct(&mut v, &[5]).unwrap();
    assert_eq!(s[5], good[5]);
}

#[test]
fn placement_is_balanced_declustered_and_stable() {
    let geo = Geometry::parse("10+3", 4096).unwrap();
    let n = 20;
    let mut nodes: Vec<NodeSlot> = (0..n)
        .map(|i| NodeSlot {
            id: 1000 + i as u64,
            domain: format!("d{i}"),
            up: true,
        })
        .collect();
    let stripes = 20_000u64;
    let mut count = vec![0usize; n];
    let mut with0 = vec![0usize; n];
    let before: Vec<Vec<usize>> = (0..stripes)
        .map(|s| place(&geo, &nodes, s).unwrap().nodes)
        .collect();
    for p in &before {
        for &i in p {
            count[i] += 1;
        }
        if p.contains(&0) {
            for &i in p {
                with0[i] += 1;
            }
        }
    }
    let mean = stripes as f64 * 13.0 / n as f64;
    for (i, &c) in count.iter().enumerate() {
        assert!(
            (c as f64 - mean).abs() / mean < 0.03,
            "node {i}: {c} strips vs mean {mean}"
        );
    }
    // Declustered: node 0's stripes involve every other node about equally.
    let peers: Vec<usize> = with0[1..].to_vec();
    let pm = peers.iter().sum::<usize>() as f64 / peers.len() as f64;
    assert!(
        peers.iter().all(|&c| (c as f64 - pm).abs() / pm < 0.1),
        "{peers:?}"
    );
    // Stable: with node 7 down, only stripes that used node 7 change.
    nodes[7].up = false;
    for (s, old) in before.iter().enumerate() {
        let new = place(&geo, &nodes, s as u64).unwrap().nodes;
        if !old.contains(&7) {
            assert_eq!(&new, old, "stripe {s} moved without cause");
        } else {
            assert!(!new.contains(&7));
            let kept = old.iter().filter(|i| **i != 7 && new.contains(i)).count();
            assert_eq!(kept, 12, "stripe {s}: survivors should stay");
        }
    }
}

#[test]
fn placement_spreads_failure_domains_and_narrows_when_nodes_are_few() {
    let geo = Geometry::parse("10+3", 4096).unwrap();
    // 26 nodes in 13 racks: no rack holds more than one strip of a stripe.
    let nodes: Vec<NodeSlot> = (0..26)
        .map(|i| NodeSlot {
            id: i,
            domain: format!("rack{}", i % 13),
            up: true,
        })
        .collect();
    for s in 0..2000 {
        let p = place(&geo, &nodes, s).unwrap();
        let mut racks: Vec<&str> = p.nodes.iter().map(|&i| nodes[i].domain.as_str()).collect();
        racks.sort_unstable();
        racks.dedup();
        assert_eq!(racks.len(), 13, "stripe {s}");
    }
    // 13 nodes with 2 down: 8+3 over the 11 survivors.
    let mut few: Vec<NodeSlot> = (0..13)
        .map(|i| NodeSlot {
            id: i,
            domain: "a".into(),
            up: true,
        })
        .collect();
    few[2].up = false;
    few[9].up = false;
    let p = place(&geo, &few, 5).unwrap();
    assert_eq!((p.geometry.k(), p.geometry.m()), (8, 3));
    for (i, n) in few.iter_mut().enumerate() {
        n.up = i < 3;
    }
    assert!(matches!(
        place(&geo, &few, 5),
        Err(Error::NotEnoughNodes { up: 3, needed: 4 })
    ));
}
