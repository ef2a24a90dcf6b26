//! The C-node's stripe layer over 13 real D-node processes (10+3).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dase_erasure::Geometry;
use dase_initiator::cnode::volume::DATA_OFFSET;
use dase_initiator::cnode::{Cluster, ClusterFile, StripeRecord, Volume, VolumeError};
use dase_initiator::host::{Controller, ControllerOptions};
use dase_tests::*;

const STRIP: usize = 64 * 1024;

struct Rig {
    _dir: tempfile::TempDir,
    nodes: Vec<DNode>,
    file: ClusterFile,
}

/// `n` file-backed D-nodes (so a restarted one keeps its data), one failure domain each.
fn rig(name: &str, n: usize) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, specs) = file_dnodes(dir.path(), name, n, "32M");
    Rig {
        _dir: dir,
        nodes,
        file: ClusterFile { dnodes: specs },
    }
}

fn opts() -> ControllerOptions {
    ControllerOptions {
        io_queues: 1,
        queue_depth: 32,
        io_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        reconnect_backoff: Duration::from_millis(100),
        ..Default::default()
    }
}

async fn volume(file: &ClusterFile) -> Volume {
    let cluster = Arc::new(Cluster::connect(file, opts()).await);
    Volume::new(cluster, Geometry::parse("10+3", STRIP).unwrap()).unwrap()
}

async fn check(v: &Volume, rec: &StripeRecord, data: &[u8]) {
    let all = v.read(rec, 0, data.len()).await.unwrap();
    assert!(all[..] == data[..], "stripe {} differs", rec.stripe);
    // Unaligned ranges inside one strip and across strip boundaries.
    for (off, len) in [
        (1, 1000),
        (STRIP - 10, 20),
        (3 * STRIP + 7, 2 * STRIP + 100),
        (data.len() - 1, 1),
    ] {
        if off + len <= data.len() {
            let got = v.read(rec, off, len).await.unwrap();
            assert!(
                got[..] == data[off..off + len],
                "stripe {} range {off}+{len}",
                rec.stripe
            );
        }
    }
}

#[test]
fn stripes_survive_three_dead_dnodes_and_writes_go_on() {
    let mut r = rig("vol-fail", 13);
    rt().block_on(async {
        let v = volume(&r.file).await;
        assert_eq!(v.cluster().up_count(), 13);
        let mut written: Vec<(StripeRecord, Vec<u8>)> = Vec::new();
        for s in 0..12u64 {
            let data = pattern(10 * STRIP - (s as usize * 4096), s + 1);
            let rec = v.write_stripe(s, &data).await.unwrap();
            assert_eq!((rec.k, rec.m, rec.nodes.len()), (10, 3, 13));
            let mut distinct = rec.nodes.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 13, "strips on distinct D-nodes");
            check(&v, &rec, &data).await;
            written.push((rec, data));
        }
        // kill -9 three D-nodes in the middle of the workload.
        for i in [2, 7, 11] {
            r.nodes[i].kill();
        }
        for (rec, data) in &written {
            check(&v, rec, data).await;
        }
        assert_eq!(v.cluster().up_count(), 10);
        // Writes go on, narrowed to 7+3 over the ten survivors.
        let data = pattern(7 * STRIP, 99);
        let rec = v.write_stripe(100, &data).await.unwrap();
        assert_eq!((rec.k, rec.m), (7, 3));
        assert!(rec.nodes.iter().all(|&n| ![2u16, 7, 11].contains(&n)));
        check(&v, &rec, &data).await;
        // A full-size write cannot fit a narrowed stripe: a clear error, no silent truncation.
        let e = v
            .write_stripe(101, &pattern(10 * STRIP, 5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("only 10 D-nodes are up"), "{e}");
        // A fourth loss in a full-width stripe exceeds m = 3.
        let victim = written[0]
            .0
            .nodes
            .iter()
            .map(|&n| n as usize)
            .find(|n| ![2, 7, 11].contains(n))
            .unwrap();
        r.nodes[victim].kill();
        match v.read(&written[0].0, 0, STRIP).await {
            Err(VolumeError::Unrecoverable { .. }) => {}
            other => panic!("expected Unrecoverable, got {:?}", other.map(|b| b.len())),
        }
        // The D-nodes come back (their files kept the strips): reconnected automatically.
        for i in [2, 7, 11, victim] {
            r.nodes[i].restart();
        }
        // Revival honours a per-node retry backoff; poll as a background task would.
        for _ in 0..50 {
            v.cluster().revive().await;
            if v.cluster().up_count() == 13 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(v.cluster().up_count(), 13);
        for (rec, data) in &written {
            check(&v, rec, data).await;
        }
        let rec = v.write_stripe(102, &pattern(10 * STRIP, 7)).await.unwrap();
        assert_eq!((rec.k, rec.m), (10, 3));
    });
}

#[test]
fn a_corrupt_strip_is_detected_served_from_parity_and_repaired() {
    let r = rig("vol-corrupt", 13);
    rt().block_on(async {
        let v = volume(&r.file).await;
        let data = pattern(10 * STRIP, 3);
        let rec = v.write_stripe(5, &data).await.unwrap();
        // Overwrite part of data strip 4 behind the volume's back.
        let node = rec.nodes[4] as usize;
        let spec = &r.file.dnodes[node];
        let c = Controller::connect(&spec.addr, &spec.nqn, ControllerOptions::default())
            .await
            .unwrap();
        let ns = c.namespace(1).await.unwrap();
        let slot = (DATA_OFFSET + 5 * STRIP as u64) / 4096;
        c.write(&ns, slot + 2, Bytes::from(vec![0xee; 4096]))
            .await
            .unwrap();
        // A read of that whole strip notices, serves the right bytes and repairs it.
        let got = v.read(&rec, 4 * STRIP, STRIP).await.unwrap();
        assert!(got[..] == data[4 * STRIP..5 * STRIP]);
        let on_media = c.read(&ns, slot, (STRIP / 4096) as u32).await.unwrap();
        assert!(
            on_media[..] == data[4 * STRIP..5 * STRIP],
            "strip repaired on the D-node"
        );
        // A full-stripe check finds everything consistent now.
        let strips = v.read_stripe(&rec).await.unwrap();
        assert_eq!(strips.len(), 13);
    });
}

#[test]
fn strips_move_to_a_replacement_dnode() {
    let mut r = rig("vol-move", 14);
    rt().block_on(async {
        // The stripe is written over the first 13 D-nodes; the 14th is a spare.
        let mut file = r.file.clone();
        let spare = file.dnodes.pop().unwrap();
        let v = volume(&file).await;
        let data = pattern(10 * STRIP, 11);
        let rec = v.write_stripe(3, &data).await.unwrap();
        let dead = rec.nodes[0] as usize;
        r.nodes[dead].kill();
        // With the spare added to the map, strip 0 is rebuilt onto it from the survivors.
        let mut with_spare = file.clone();
        with_spare.dnodes.push(spare);
        let v2 = volume(&with_spare).await;
        assert!(!v2.cluster().is_up(dead));
        let spare_index = with_spare.dnodes.len() - 1;
        let moved = v2.move_strips(&rec, dead, spare_index).await.unwrap();
        assert_eq!(moved.nodes[0] as usize, spare_index);
        assert_eq!(&moved.nodes[1..], &rec.nodes[1..]);
        // Reading the first strip now touches no dead node and needs no reconstruction.
        let got = v2.read(&moved, 0, STRIP).await.unwrap();
        assert!(got[..] == data[..STRIP]);
        check(&v2, &moved, &data).await;
        // Moving onto a node the stripe already uses is refused.
        assert!(v2
            .move_strips(&moved, moved.nodes[1] as usize, moved.nodes[2] as usize)
            .await
            .is_err());
    });
}

#[test]
fn cluster_up_and_down_keep_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(dase_bin())
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    /// Stops the cluster even when an assertion fails half-way.
    struct Down(String);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = std::process::Command::new(dase_bin())
                .args(["cluster", "down", "--dir", &self.0])
                .output();
        }
    }
    run(&[
        "cluster", "up", "--dir", d, "--dnodes", "13", "--size", "32M",
    ]);
    let guard = Down(d.to_string());
    let file = ClusterFile::load(&dir.path().join("cluster.toml")).unwrap();
    assert_eq!(file.dnodes.len(), 13);
    let pids: Vec<i32> = std::fs::read_to_string(dir.path().join("cluster.pids"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let data = pattern(10 * STRIP, 42);
    let rec = rt().block_on(async {
        let v = volume(&file).await;
        assert_eq!(v.cluster().up_count(), 13);
        v.write_stripe(9, &data).await.unwrap()
    });
    run(&["cluster", "down", "--dir", d]);
    assert!(
        pids.iter().all(|&p| unsafe { libc::kill(p, 0) } != 0),
        "every D-node exited"
    );
    // Up again: new ports, same backing files, same strips.
    run(&[
        "cluster", "up", "--dir", d, "--dnodes", "13", "--size", "32M",
    ]);
    let again = ClusterFile::load(&dir.path().join("cluster.toml")).unwrap();
    rt().block_on(async {
        let v = volume(&again).await;
        check(&v, &rec, &data).await;
    });
    drop(guard);
    assert!(!dir.path().join("cluster.pids").exists());
}

#[test]
fn mkfs_refuses_to_overwrite_and_mismatched_cluster_files_are_caught() {
    use dase_initiator::cnode::superblock::{self, SuperblockError};
    let r = rig("sb", 8);
    let geo = Geometry::parse("2+2", STRIP).unwrap();
    let a = ClusterFile {
        dnodes: r.file.dnodes[..4].to_vec(),
    };
    let b = ClusterFile {
        dnodes: r.file.dnodes[4..].to_vec(),
    };
    rt().block_on(async {
        let ca = Cluster::connect(&a, opts()).await;
        let cb = Cluster::connect(&b, opts()).await;
        let sa = superblock::format(&ca, &a, &geo, dase_initiator::reduce::AVG_CHUNK, false)
            .await
            .unwrap();
        let sb = superblock::format(&cb, &b, &geo, dase_initiator::reduce::AVG_CHUNK, false)
            .await
            .unwrap();
        assert_ne!(sa.uuid_string(), sb.uuid_string());
        let got = superblock::verify(&ca, &a).await.unwrap();
        assert_eq!(got.uuid_string(), sa.uuid_string());
        assert_eq!(got.geometry().unwrap(), geo);
        // Formatting over it again needs --force.
        match superblock::format(&ca, &a, &geo, dase_initiator::reduce::AVG_CHUNK, false).await {
            Err(SuperblockError::Exists(m)) => assert!(
                m.contains("--force") && m.contains(&sa.uuid_string()),
                "{m}"
            ),
            other => panic!("{:?}", other.map(|s| s.uuid_string())),
        }
        let again = superblock::format(&ca, &a, &geo, dase_initiator::reduce::AVG_CHUNK, true)
            .await
            .unwrap();
        assert_ne!(again.uuid_string(), sa.uuid_string());
        // A cluster file that reorders the D-nodes does not match.
        let mut swapped = a.clone();
        swapped.dnodes.swap(1, 2);
        let cs = Cluster::connect(&swapped, opts()).await;
        let e = superblock::verify(&cs, &swapped)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not match"), "{e}");
        // One that mixes D-nodes of two file systems is refused.
        let mut mixed = a.clone();
        mixed.dnodes[3] = b.dnodes[0].clone();
        let cm = Cluster::connect(&mixed, opts()).await;
        let e = superblock::verify(&cm, &mixed)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("two file systems") || e.contains("does not match"),
            "{e}"
        );
        // An unformatted D-node is named.
        let fresh = rig("sb-fresh", 1);
        let mut with_blank = a.clone();
        with_blank.dnodes.push(fresh.file.dnodes[0].clone());
        let cw = Cluster::connect(&with_blank, opts()).await;
        let e = superblock::verify(&cw, &with_blank)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no dase file system") || e.contains("does not match"),
            "{e}"
        );
    });
}

#[test]
fn mkfs_command_formats_and_refuses_to_reformat() {
    let r = rig("mkfs-cli", 5);
    let dir = tempfile::tempdir().unwrap();
    let cf = dir.path().join("cluster.toml");
    std::fs::write(&cf, r.file.to_toml()).unwrap();
    let mkfs = |extra: &[&str]| {
        std::process::Command::new(dase_bin())
            .args(["mkfs", "--cluster", cf.to_str().unwrap(), "--ec", "3+2"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = mkfs(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("formatted dase file system") && out.contains("3+2 (1.667 raw-to-usable"),
        "{out}"
    );
    let o = mkfs(&[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("use --force"));
    assert!(mkfs(&["--force"]).status.success());
    // A D-node down: formatting needs every one.
    drop(r);
    let o = mkfs(&["--force"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unreachable"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_mount_lease_admits_one_holder() {
    use dase_initiator::cnode::lease::{Lease, LeaseError};
    let mut r = rig("lease", 5);
    let fs = [7u8; 16];
    rt().block_on(async {
        let c = Arc::new(Cluster::connect(&r.file, opts()).await);
        let ttl = Duration::from_millis(1500);
        let mut a = Lease::new(fs, "host-a pid 1", ttl);
        let mut b = Lease::new(fs, "host-b pid 2", ttl);
        a.acquire(&c).await.unwrap();
        match b.acquire(&c).await {
            Err(LeaseError::Held { holder, .. }) => assert_eq!(holder, "host-a pid 1"),
            other => panic!(
                "second mount must be refused: {:?}",
                other.err().map(|e| e.to_string())
            ),
        }
        // Renewing keeps it: B stays out past the original expiry.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            a.renew(&c).await.unwrap();
            assert!(b.acquire(&c).await.is_err());
        }
        a.release(&c).await;
        b.acquire(&c).await.unwrap();
        // B dies without releasing: A gets in only once B's lease has expired.
        drop(b);
        let e = a.acquire(&c).await.unwrap_err();
        assert!(e.to_string().contains("mounted by host-b"), "{e}");
        tokio::time::sleep(ttl + Duration::from_millis(200)).await;
        a.acquire(&c).await.unwrap();
        a.release(&c).await;
        // Races between four would-be holders: someone always wins, and no two
        // tenures ever overlap (a loser may win later, after a release).
        for round in 0..3 {
            let tries = (0..4).map(|i| {
                let c = c.clone();
                tokio::spawn(async move {
                    let mut l = Lease::new(fs, &format!("racer {round}.{i}"), ttl);
                    if l.acquire(&c).await.is_err() {
                        return None;
                    }
                    let start = std::time::Instant::now();
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    let end = std::time::Instant::now();
                    l.release(&c).await;
                    Some((start, end))
                })
            });
            let mut tenures = Vec::new();
            for t in tries.collect::<Vec<_>>() {
                tenures.extend(t.await.unwrap());
            }
            assert!(!tenures.is_empty(), "round {round}: nobody won");
            tenures.sort();
            for w in tenures.windows(2) {
                assert!(w[0].1 <= w[1].0, "round {round}: two holders at once");
            }
        }
    });
    // A majority is enough; less is refused.
    r.nodes[0].kill();
    r.nodes[1].kill();
    rt().block_on(async {
        let c = Cluster::connect(&r.file, opts()).await;
        tokio::time::sleep(Duration::from_millis(1700)).await;
        let mut l = Lease::new(fs, "survivor", Duration::from_secs(5));
        l.acquire(&c).await.unwrap();
        l.release(&c).await;
    });
    r.nodes[2].kill();
    rt().block_on(async {
        let c = Cluster::connect(&r.file, opts()).await;
        let mut l = Lease::new(fs, "minority", Duration::from_secs(5));
        match l.acquire(&c).await {
            Err(LeaseError::NoQuorum {
                got: 2, needed: 3, ..
            }) => {}
            other => panic!("{:?}", other.err().map(|e| e.to_string())),
        }
    });
}
