//! The host library against the Linux kernel NVMe/TCP target (nvmet-tcp),
//! booted under QEMU by `../shared/kernel-peer/target.sh`.
//!
//! Ignored by default (the emulated kernel takes ~15 s to boot and moves only
//! a few MiB/s). Run it with:
//!
//! ```text
//! cargo test -p dase-tests --test kernel_target -- --ignored --nocapture
//! ```
//!
//! It starts `target.sh` itself, or uses a running one named by
//! `DASE_KERNEL_TARGET=127.0.0.1:PORT`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use dase_initiator::host::{discover, Controller, ControllerOptions};
use dase_protocol::Status;
use dase_tests::*;

const KERNEL_NQN: &str = "nqn.2014-08.org.example:kernel-target";

struct KernelTarget {
    addr: String,
    child: Option<std::process::Child>,
}

impl Drop for KernelTarget {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            // SIGTERM lets target.sh stop its QEMU.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

fn kernel_target() -> KernelTarget {
    if let Ok(a) = std::env::var("DASE_KERNEL_TARGET") {
        return KernelTarget {
            addr: a,
            child: None,
        };
    }
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/kernel-peer/target.sh");
    assert!(
        script.exists(),
        "{} not found: run from a checkout with shared/ beside it",
        script.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // One boot at a time: on a fresh machine the first one runs the
    // kernel peer's setup (apt, a kernel build), which two at once break.
    static BOOTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BOOTING.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg(port.to_string())
        .arg("128")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = spawn_tied(cmd).expect("start target.sh");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("READY ") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(240))
        .expect("kernel target did not become READY");
    KernelTarget {
        addr: format!("127.0.0.1:{port}"),
        child: Some(child),
    }
}

fn opts(hd: bool, dd: bool) -> ControllerOptions {
    ControllerOptions {
        hostnqn: HOSTNQN.into(),
        hdr_digest: hd,
        data_digest: dd,
        io_queues: 2,
        queue_depth: 32,
        // Emulated: everything is slow.
        io_timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

#[test]
#[ignore = "boots a Linux kernel under QEMU; run with --ignored"]
fn host_library_against_the_linux_kernel_target() {
    let k = kernel_target();
    rt().block_on(async {
        let entries = discover(&k.addr, &opts(false, false))
            .await
            .expect("discovery");
        assert!(
            entries.iter().any(|e| e.subnqn == KERNEL_NQN),
            "{entries:?}"
        );

        for (hd, dd) in [(false, false), (true, true)] {
            let c = Controller::connect(&k.addr, KERNEL_NQN, opts(hd, dd))
                .await
                .expect("connect");
            let id = c.identify().await.unwrap();
            assert_eq!(dase_protocol::admin::get_str(&id.subnqn), KERNEL_NQN);
            let nsids = c.active_namespaces().await.unwrap();
            assert_eq!(nsids, vec![1]);
            let ns = c.namespace(1).await.unwrap();
            assert!(ns.bytes() >= 64 << 20);
            let bs = ns.block_size as usize;
            // In-capsule (small), R2T with one and with several H2CData PDUs.
            for (i, len) in [bs, 8 * 1024, 64 * 1024, 1 << 20].into_iter().enumerate() {
                let slba = (i as u64 + 1) * 4096 + hd as u64 * 100_000 / bs as u64;
                let data = pattern(len, i as u64 + 100 * hd as u64);
                c.write(&ns, slba, Bytes::from(data.clone())).await.unwrap();
                let back = c.read(&ns, slba, (len / bs) as u32).await.unwrap();
                assert!(
                    back[..] == data[..],
                    "{len} bytes at {slba} differ (digests {hd}/{dd})"
                );
            }
            c.flush(&ns).await.unwrap();
            // The last block.
            let last = ns.blocks - 1;
            c.write(&ns, last, Bytes::from(vec![0xab; bs]))
                .await
                .unwrap();
            assert_eq!(
                &c.read(&ns, last, 1).await.unwrap()[..],
                &vec![0xab; bs][..]
            );
            c.write_zeroes(&ns, last, 1).await.unwrap();
            assert!(c.read(&ns, last, 1).await.unwrap().iter().all(|&b| b == 0));
            // Out of range is an NVMe status, not a transport failure. (nvmet
            // on a brd ramdisk in 6.1 says Internal Error rather than LBA Out
            // of Range; either way the queue must stay usable.)
            let e = c.read(&ns, ns.blocks, 1).await.unwrap_err();
            let st = e
                .status()
                .unwrap_or_else(|| panic!("transport error instead of a status: {e}"));
            assert!(
                st == Status::LBA_OUT_OF_RANGE || st == Status::INTERNAL_ERROR.dnr(),
                "{st}"
            );
            assert_eq!(&c.read(&ns, last, 1).await.unwrap()[..], &vec![0u8; bs][..]);
            c.disconnect().await.unwrap();
        }
    });
}

#[test]
#[ignore = "boots a Linux kernel under QEMU; run with --ignored"]
fn the_kernel_target_serves_as_a_dnode_in_a_cluster() {
    use std::sync::Arc;

    use dase_erasure::Geometry;
    use dase_initiator::cnode::lease::{Lease, LeaseError};
    use dase_initiator::cnode::{Cluster, ClusterFile, DNodeSpec, Volume};

    let k = kernel_target();
    let mut nodes = Vec::new();
    let mut specs = vec![DNodeSpec {
        addr: k.addr.clone(),
        nqn: KERNEL_NQN.into(),
        nsid: 1,
        domain: "kernel".into(),
        id: None,
    }];
    for i in 0..4 {
        let d = DNode::memory(&nqn(&format!("kmix-d{i}")), "64M", 512);
        specs.push(DNodeSpec {
            addr: d.addr_string(),
            nqn: d.nqn.clone(),
            nsid: 1,
            domain: format!("d{i}"),
            id: None,
        });
        nodes.push(d);
    }
    let file = ClusterFile { dnodes: specs };
    rt().block_on(async {
        let cluster = Arc::new(Cluster::connect(&file, opts(false, false)).await);
        assert_eq!(
            cluster.up_count(),
            5,
            "kernel target and four D-nodes reachable"
        );
        let v = Volume::new(cluster.clone(), Geometry::parse("3+2", 64 * 1024).unwrap()).unwrap();
        for s in 0..4u64 {
            let data = pattern(3 * 64 * 1024, s + 1);
            let rec = v.write_stripe(s, &data).await.unwrap();
            assert!(
                rec.nodes.contains(&0),
                "every 5-wide stripe uses the kernel target"
            );
            assert!(v.read(&rec, 0, data.len()).await.unwrap()[..] == data[..]);
            assert!(v.read(&rec, 1000, 70_000).await.unwrap()[..] == data[1000..71_000]);
        }
        // nvmet has no fused compare-and-write, so it cannot grant the lease;
        // the four dase D-nodes are still a majority of five.
        let mut l = Lease::new([1; 16], "test", Duration::from_secs(5));
        l.acquire(&cluster).await.unwrap();
        l.release(&cluster).await;
        // With it plus one dase D-node, no majority is possible: refused, naming it.
        let two = ClusterFile {
            dnodes: file.dnodes[..2].to_vec(),
        };
        let c2 = Cluster::connect(&two, opts(false, false)).await;
        let mut l = Lease::new([1; 16], "test", Duration::from_secs(5));
        match l.acquire(&c2).await {
            Err(LeaseError::Unsupported { addr, .. }) => assert_eq!(addr, k.addr),
            other => panic!("{:?}", other.err().map(|e| e.to_string())),
        }
    });
    // The whole file system with the kernel target as one of its D-nodes:
    // mkfs, mount, write, remount, read back, fsck.
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.toml");
    std::fs::write(&cluster, file.to_toml()).unwrap();
    let c = cluster.to_str().unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(dase_bin()).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "dase {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    run(&["mkfs", "--cluster", c, "--ec", "3+2", "--force"]);
    let mp = dir.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let data = pattern(2 << 20, 77);
    let m = Mount::start(&cluster, &mp, &[]).expect("mount over the kernel target");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(mp.join("f")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    assert!(m.stop());
    let m = Mount::start(&cluster, &mp, &[]).expect("remount");
    drop_caches();
    assert!(std::fs::read(mp.join("f")).unwrap() == data);
    assert!(m.stop());
    assert!(run(&["fsck", "--cluster", c]).contains("clean"));
}
