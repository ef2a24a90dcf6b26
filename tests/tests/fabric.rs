//! The host library against real `dase dnode` processes over loopback TCP.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dase_initiator::host::{discover, Controller, ControllerOptions, HostError, NamespaceInfo};
use dase_protocol::Status;
use dase_tests::*;

fn opts(hd: bool, dd: bool) -> ControllerOptions {
    ControllerOptions {
        hostnqn: HOSTNQN.into(),
        hdr_digest: hd,
        data_digest: dd,
        io_queues: 2,
        queue_depth: 64,
        io_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

async fn connect(d: &DNode, o: ControllerOptions) -> (Controller, NamespaceInfo) {
    let c = Controller::connect(&d.addr_string(), &d.nqn, o)
        .await
        .expect("connect");
    let ns = c.namespace(1).await.expect("namespace 1");
    (c, ns)
}

/// Sizes that cross every data path: tiny in-capsule, the in-capsule limit,
/// R2T with one H2CData, R2T with several (beyond MAXH2CDATA), and 4 MiB.
const SIZES: [usize; 8] = [1, 8, 16, 32, 33, 255, 600, 8192];

fn round_trip(block_size: u32, hd: bool, dd: bool) {
    let d = DNode::memory(
        &nqn(&format!("rt-{block_size}-{hd}-{dd}")),
        "64M",
        block_size,
    );
    rt().block_on(async {
        let (c, ns) = connect(&d, opts(hd, dd)).await;
        assert_eq!(ns.block_size, block_size);
        assert_eq!(ns.bytes(), 64 << 20);
        let mut slba = 3u64;
        for (i, blocks) in SIZES.iter().enumerate() {
            let nblocks = (*blocks * 512).div_ceil(block_size as usize);
            let data = pattern(nblocks * block_size as usize, i as u64 + 1);
            c.write(&ns, slba, Bytes::from(data.clone())).await.unwrap();
            let back = c.read(&ns, slba, nblocks as u32).await.unwrap();
            assert!(
                back[..] == data[..],
                "{nblocks} blocks at {slba}: data differs"
            );
            slba += nblocks as u64 + 7;
        }
        // The very last block of the namespace.
        let last = ns.blocks - 1;
        let data = pattern(block_size as usize, 99);
        c.write(&ns, last, Bytes::from(data.clone())).await.unwrap();
        assert_eq!(&c.read(&ns, last, 1).await.unwrap()[..], &data[..]);
        c.disconnect().await.unwrap();
    });
}

#[test]
fn round_trip_512_plain() {
    round_trip(512, false, false);
}

#[test]
fn round_trip_4096_with_header_and_data_digests() {
    round_trip(4096, true, true);
}

#[test]
fn round_trip_512_header_digest_only() {
    round_trip(512, true, false);
}

#[test]
fn file_backed_namespace_persists_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ns.img");
    let p = path.to_str().unwrap();
    let name = nqn("file");
    let mut d = DNode::start(&["--nqn", &name, "--namespace", p, "--size", "16M"]);
    let data = pattern(128 * 1024, 7);
    rt().block_on(async {
        let (c, ns) = connect(&d, opts(false, false)).await;
        c.write(&ns, 100, Bytes::from(data.clone())).await.unwrap();
        c.flush(&ns).await.unwrap();
        c.disconnect().await.unwrap();
    });
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 << 20);
    d.restart();
    rt().block_on(async {
        let (c, ns) = connect(&d, opts(false, false)).await;
        assert_eq!(&c.read(&ns, 100, 256).await.unwrap()[..], &data[..]);
    });
}

#[test]
fn write_zeroes_deallocate_and_compare() {
    let d = DNode::memory(&nqn("zeroes"), "8M", 512);
    rt().block_on(async {
        let (c, ns) = connect(&d, opts(false, false)).await;
        let data = pattern(64 * 512, 3);
        c.write(&ns, 0, Bytes::from(data.clone())).await.unwrap();
        assert!(c.compare(&ns, 0, Bytes::from(data.clone())).await.unwrap());
        let mut other = data.clone();
        other[700] ^= 1;
        assert!(!c.compare(&ns, 0, Bytes::from(other)).await.unwrap());
        c.write_zeroes(&ns, 8, 8).await.unwrap();
        c.deallocate(&ns, &[(32, 16), (60, 4)]).await.unwrap();
        let back = c.read(&ns, 0, 64).await.unwrap();
        for blk in 0..64usize {
            let got = &back[blk * 512..(blk + 1) * 512];
            let zero = (8..16).contains(&blk) || (32..48).contains(&blk) || (60..64).contains(&blk);
            if zero {
                assert!(got.iter().all(|&b| b == 0), "block {blk} not zeroed");
            } else {
                assert_eq!(
                    got,
                    &data[blk * 512..(blk + 1) * 512],
                    "block {blk} changed"
                );
            }
        }
    });
}

#[test]
fn invalid_commands_get_their_nvme_status() {
    let d = DNode::memory(&nqn("status"), "16M", 512);
    rt().block_on(async {
        let (c, ns) = connect(&d, opts(false, false)).await;
        let status = |r: Result<Bytes, HostError>| r.unwrap_err().status().expect("an NVMe status");
        assert_eq!(
            status(c.read(&ns, ns.blocks, 1).await),
            Status::LBA_OUT_OF_RANGE
        );
        assert_eq!(
            status(c.read(&ns, ns.blocks - 1, 2).await),
            Status::LBA_OUT_OF_RANGE
        );
        assert_eq!(
            status(c.read(&ns, u64::MAX, 1).await),
            Status::LBA_OUT_OF_RANGE
        );
        let bogus = NamespaceInfo { nsid: 7, ..ns };
        assert_eq!(
            status(c.read(&bogus, 0, 1).await),
            Status::INVALID_NAMESPACE
        );
        let e = c
            .write(&ns, ns.blocks, Bytes::from(vec![0u8; 512 * 40]))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(Status::LBA_OUT_OF_RANGE));
        // More than MDTS in one command.
        assert_eq!(status(c.read(&ns, 0, 9000).await), Status::INVALID_FIELD);
        // Unknown I/O and admin opcodes.
        let sqe = dase_protocol::Sqe::new(0x7e, 0, 1);
        assert_eq!(
            c.admin(sqe, 0).await.unwrap_err().status(),
            Some(Status::INVALID_OPCODE)
        );
        let mut lp = dase_protocol::Sqe::new(dase_protocol::nvme::admin_opc::GET_LOG_PAGE, 0, 0);
        lp.cdw10 = (0xc5u32 | 127 << 16).into();
        assert_eq!(
            c.admin(lp, 512).await.unwrap_err().status(),
            Some(Status::INVALID_LOG_PAGE)
        );
        // Failures are recorded in the error log (newest first).
        let mut lp = dase_protocol::Sqe::new(dase_protocol::nvme::admin_opc::GET_LOG_PAGE, 0, 0);
        lp.cdw10 = (1u32 | 15 << 16).into();
        let log = c.admin(lp, 64).await.unwrap();
        assert!(u64::from_le_bytes(log.data[..8].try_into().unwrap()) >= 5);
        // The controller still works.
        c.write(&ns, 0, Bytes::from(vec![1u8; 512])).await.unwrap();
    });
}

#[test]
fn discovery_lists_the_subsystems() {
    let d = DNode::memory(&nqn("disc"), "1M", 512);
    rt().block_on(async {
        let e = discover(&d.addr_string(), &opts(false, false))
            .await
            .unwrap();
        assert!(e.iter().any(|e| e.subnqn == d.nqn
            && e.subtype == 2
            && e.trsvcid == d.addr.port().to_string()));
        assert!(e
            .iter()
            .any(|e| e.subnqn == dase_protocol::nvme::DISCOVERY_NQN && e.subtype == 3));
    });
}

#[test]
fn access_control_refuses_unknown_hosts() {
    let name = nqn("acl");
    let d = DNode::start(&[
        "--nqn",
        &name,
        "--namespace",
        "memory",
        "--size",
        "1M",
        "--allow-host",
        HOSTNQN,
    ]);
    rt().block_on(async {
        let mut o = opts(false, false);
        o.hostnqn = "nqn.2026-11.io.dase:intruder".into();
        match Controller::connect(&d.addr_string(), &name, o).await {
            Err(HostError::ConnectRejected { status, .. }) => {
                assert_eq!(status, Status::CONNECT_INVALID_HOST)
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("unknown host was let in"),
        }
        // Discovery hides the subsystem from it too.
        let mut o = opts(false, false);
        o.hostnqn = "nqn.2026-11.io.dase:intruder".into();
        let e = discover(&d.addr_string(), &o).await.unwrap();
        assert!(!e.iter().any(|e| e.subnqn == name));
        // The allowed host gets in.
        connect(&d, opts(false, false)).await;
        // An unknown subsystem is an invalid parameter in the connect data.
        match Controller::connect(
            &d.addr_string(),
            "nqn.2026-11.io.dase:nope",
            opts(false, false),
        )
        .await
        {
            Err(HostError::ConnectRejected { status, .. }) => {
                assert_eq!(status, Status::CONNECT_INVALID_PARAMETERS)
            }
            other => panic!("{:?}", other.err()),
        }
    });
}

#[test]
fn concurrent_hosts_and_deep_queues() {
    let d = DNode::memory(&nqn("many"), "64M", 4096);
    rt().block_on(async {
        let mut hosts = Vec::new();
        for h in 0..4 {
            let mut o = opts(h % 2 == 1, h % 2 == 1);
            o.hostnqn = format!("nqn.2026-11.io.dase:host{h}");
            o.io_queues = 2;
            o.queue_depth = 128;
            hosts.push(Arc::new(connect(&d, o).await));
        }
        // 4 hosts x 64 tasks, each owning its own region, 8 rounds each.
        let mut tasks = Vec::new();
        for (h, host) in hosts.iter().enumerate() {
            for t in 0..64u64 {
                let host = host.clone();
                tasks.push(tokio::spawn(async move {
                    let (c, ns) = &*host;
                    let slba = (h as u64 * 64 + t) * 16;
                    for round in 0..8u64 {
                        let data = pattern(16 * 4096, slba ^ round << 32);
                        c.write(ns, slba, Bytes::from(data.clone())).await.unwrap();
                        assert_eq!(&c.read(ns, slba, 16).await.unwrap()[..], &data[..]);
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn compare_and_write_is_atomic_under_contention() {
    let d = DNode::memory(&nqn("caw"), "1M", 512);
    rt().block_on(async {
        // Several hosts increment one counter block with compare-and-write;
        // the final value must equal the number of successful swaps.
        let mut hosts = Vec::new();
        for h in 0..3 {
            let mut o = opts(false, false);
            o.hostnqn = format!("nqn.2026-11.io.dase:caw{h}");
            hosts.push(Arc::new(connect(&d, o).await));
        }
        let block = |v: u64| {
            let mut b = vec![0u8; 512];
            for chunk in b.chunks_mut(8) {
                chunk.copy_from_slice(&v.to_le_bytes());
            }
            Bytes::from(b)
        };
        let (c0, ns0) = &*hosts[0];
        c0.write(ns0, 0, block(0)).await.unwrap();
        let wins = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for host in &hosts {
            for _ in 0..4 {
                let host = host.clone();
                let wins = wins.clone();
                tasks.push(tokio::spawn(async move {
                    let (c, ns) = &*host;
                    let mut mine = 0;
                    while mine < 15 {
                        let cur = c.read(ns, 0, 1).await.unwrap();
                        let v = u64::from_le_bytes(cur[..8].try_into().unwrap());
                        // Any torn write would break the "all words equal" invariant.
                        assert!(cur.chunks(8).all(|w| w == &cur[..8]), "torn counter block");
                        if c.compare_and_write(ns, 0, block(v), block(v + 1))
                            .await
                            .unwrap()
                        {
                            mine += 1;
                            wins.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        // Plain writers elsewhere on the namespace keep running meanwhile.
        let noise = {
            let host = hosts[1].clone();
            tokio::spawn(async move {
                let (c, ns) = &*host;
                for i in 0..200u64 {
                    c.write(ns, 8 + i % 32, Bytes::from(vec![i as u8; 512]))
                        .await
                        .unwrap();
                }
            })
        };
        for t in tasks {
            t.await.unwrap();
        }
        noise.await.unwrap();
        let end = c0.read(ns0, 0, 1).await.unwrap();
        let v = u64::from_le_bytes(end[..8].try_into().unwrap());
        assert_eq!(v, wins.load(Ordering::Relaxed));
        assert_eq!(v, 3 * 4 * 15);
        // A compare-and-write with the wrong expectation changes nothing.
        assert!(!c0
            .compare_and_write(ns0, 0, block(1), block(1000))
            .await
            .unwrap());
        assert_eq!(c0.read(ns0, 0, 1).await.unwrap(), block(v));
    });
}

#[test]
fn keep_alive_expiry_tears_the_controller_down() {
    let d = DNode::memory(&nqn("kato"), "1M", 512);
    rt().block_on(async {
        // With keep-alive running, the controller survives well past KATO.
        let mut o = opts(false, false);
        o.kato = Duration::from_millis(600);
        let (c, ns) = connect(&d, o).await;
        tokio::time::sleep(Duration::from_millis(2000)).await;
        c.read(&ns, 0, 1)
            .await
            .expect("keep-alive kept the controller");
        let cntlid = c.cntlid().await.unwrap();

        // A raw association that never sends Keep Alive is torn down.
        use dase_protocol::admin::ConnectData;
        let mut raw = RawConn::connect(d.addr, true, false, false);
        let cd = ConnectData::new([7; 16], 0xffff, &d.nqn, "nqn.2026-11.io.dase:silent");
        let mut sqe = dase_protocol::Sqe::new(0x7f, 1, 1);
        sqe.cdw11 = 31.into();
        sqe.cdw12 = 300.into();
        sqe.dptr = dase_protocol::nvme::SglDescriptor::in_capsule(1024);
        let mut w = bytes::BytesMut::new();
        raw.enc
            .capsule_cmd(&mut w, &sqe, zerocopy::IntoBytes::as_bytes(&cd));
        raw.send(&w);
        match raw.recv() {
            Some(dase_protocol::Pdu::CapsuleResp(cqe)) => {
                assert!(Status::from_word(cqe.status.get()).is_success())
            }
            other => panic!("{other:?}"),
        }
        let t0 = std::time::Instant::now();
        assert!(
            raw.recv().is_none(),
            "target should close the expired association"
        );
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
            "closed after {waited:?}"
        );
        // The well-behaved host is unaffected.
        c.read(&ns, 0, 1).await.unwrap();
        assert_eq!(c.cntlid().await.unwrap(), cntlid);
    });
}

#[test]
fn host_reconnects_after_the_target_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.img");
    let name = nqn("restart");
    let mut d = DNode::start(&[
        "--nqn",
        &name,
        "--namespace",
        path.to_str().unwrap(),
        "--size",
        "4M",
    ]);
    rt().block_on(async {
        let (c, ns) = connect(&d, opts(false, false)).await;
        c.write(&ns, 0, Bytes::from(vec![5u8; 4096])).await.unwrap();
        c.flush(&ns).await.unwrap();
        let before = c.cntlid().await.unwrap();
        d.kill();
        assert!(c.read(&ns, 0, 8).await.unwrap_err().is_transport());
        d.restart();
        // Within a few backoff periods, operations succeed again on a new association.
        let mut ok = None;
        for _ in 0..40 {
            match c.read(&ns, 0, 8).await {
                Ok(b) => {
                    ok = Some(b);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(150)).await,
            }
        }
        assert_eq!(&ok.expect("reconnected")[..], &[5u8; 4096][..]);
        let _ = before;
    });
}

#[test]
fn target_rejects_bad_configuration_at_start() {
    let out = std::process::Command::new(dase_bin())
        .args([
            "dnode",
            "--nqn",
            "nqn.2026-11.io.dase:x",
            "--namespace",
            "/nonexistent/dir/x.img",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist") && err.contains("--size"),
        "{err}"
    );
    let out = std::process::Command::new(dase_bin())
        .args([
            "dnode",
            "--nqn",
            "bad nqn",
            "--namespace",
            "memory",
            "--size",
            "1M",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NQN"));
    let out = std::process::Command::new(dase_bin())
        .args([
            "dnode",
            "--nqn",
            "nqn.2026-11.io.dase:x",
            "--namespace",
            "memory",
            "--size",
            "1M",
            "--block-size",
            "1000",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("block size"));
}

#[test]
fn admin_commands_features_properties_and_logs() {
    use dase_protocol::nvme::{admin_opc, cns, fctype, feature, log_id, prop};
    use dase_protocol::Sqe;
    let d = DNode::memory(&nqn("admin"), "8M", 4096);
    rt().block_on(async {
        let (c, ns) = connect(&d, opts(false, false)).await;
        let admin = |opc: u8, nsid: u32, cdw10: u32, cdw11: u32| {
            let mut s = Sqe::new(opc, 0, nsid);
            s.cdw10 = cdw10.into();
            s.cdw11 = cdw11.into();
            s
        };
        let get_feature = |fid: u8| {
            let c = &c;
            async move {
                c.admin(admin(admin_opc::GET_FEATURES, 0, fid as u32, 0), 0)
                    .await
                    .unwrap()
            }
        };
        // Properties: CAP (8 bytes) has CSS NVM and MQES; VS is 1.4; CSTS ready.
        let mut p = Sqe::new(admin_opc::FABRICS, 0, fctype::PROPERTY_GET as u32);
        p.cdw10 = 1.into();
        p.cdw11 = prop::CAP.into();
        let cap = c.admin(p, 0).await.unwrap();
        let cap = cap.dw0 as u64 | (cap.dw1 as u64) << 32;
        assert!(cap & (1 << 37) != 0 && cap & 0xffff >= 127, "CAP {cap:#x}");
        let mut p = Sqe::new(admin_opc::FABRICS, 0, fctype::PROPERTY_GET as u32);
        p.cdw11 = prop::VS.into();
        assert_eq!(c.admin(p, 0).await.unwrap().dw0, 0x0001_0400);
        let mut p = Sqe::new(admin_opc::FABRICS, 0, fctype::PROPERTY_GET as u32);
        p.cdw11 = prop::CSTS.into();
        assert_eq!(c.admin(p, 0).await.unwrap().dw0 & 1, 1);
        // Features: number of queues, keep alive, async event config, write cache.
        let nq = get_feature(feature::NUMBER_OF_QUEUES).await;
        assert_eq!(
            nq.dw0 & 0xffff,
            1,
            "two I/O queues were granted (0's based)"
        );
        c.admin(
            admin(
                admin_opc::SET_FEATURES,
                0,
                feature::ASYNC_EVENT_CONFIG as u32,
                0x100,
            ),
            0,
        )
        .await
        .unwrap();
        let aec = get_feature(feature::ASYNC_EVENT_CONFIG).await;
        assert_eq!(aec.dw0, 0x100);
        c.admin(
            admin(
                admin_opc::SET_FEATURES,
                0,
                feature::VOLATILE_WRITE_CACHE as u32,
                0,
            ),
            0,
        )
        .await
        .unwrap();
        let vwc = get_feature(feature::VOLATILE_WRITE_CACHE).await;
        assert_eq!(vwc.dw0, 0);
        let kato = get_feature(feature::KEEP_ALIVE_TIMER).await;
        assert_eq!(kato.dw0, 10_000);
        let e = c
            .admin(admin(admin_opc::SET_FEATURES, 0, 0x80 | 1 << 31, 0), 0)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(Status::FEATURE_NOT_SAVEABLE));
        let e = c
            .admin(admin(admin_opc::GET_FEATURES, 0, 0x7e, 0), 0)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(Status::INVALID_FIELD));
        // Identify: active namespace list (CNS 2) and descriptors (CNS 3).
        let l = c
            .admin(
                admin(admin_opc::IDENTIFY, 0, cns::ACTIVE_NS_LIST as u32, 0),
                4096,
            )
            .await
            .unwrap();
        assert_eq!(&l.data[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        let ds = c
            .admin(
                admin(admin_opc::IDENTIFY, 1, cns::NS_DESCRIPTORS as u32, 0),
                4096,
            )
            .await
            .unwrap();
        assert_eq!((ds.data[0], ds.data[1]), (2, 16), "NGUID descriptor first");
        assert_eq!(
            &ds.data[4..20],
            &c.identify_namespace(1).await.unwrap().nguid
        );
        // Logs: SMART counts this host's I/O; the changed namespace list is empty.
        c.write(&ns, 0, Bytes::from(vec![1u8; 8192])).await.unwrap();
        let smart = c
            .admin(
                admin(
                    admin_opc::GET_LOG_PAGE,
                    0xffff_ffff,
                    log_id::SMART as u32 | 127 << 16,
                    0,
                ),
                512,
            )
            .await
            .unwrap();
        assert!(
            u64::from_le_bytes(smart.data[80..88].try_into().unwrap()) >= 1,
            "host writes"
        );
        let ch = c
            .admin(
                admin(
                    admin_opc::GET_LOG_PAGE,
                    0,
                    log_id::CHANGED_NS_LIST as u32 | 1023 << 16,
                    0,
                ),
                4096,
            )
            .await
            .unwrap();
        assert!(ch.data.iter().all(|&b| b == 0));
        // Abort: nothing is ever pending long enough, so "not aborted" (DW0 bit 0).
        let ab = c
            .admin(admin(admin_opc::ABORT, 0, 1 << 16 | 5, 0), 0)
            .await
            .unwrap();
        assert_eq!(ab.dw0 & 1, 1);
        // Keep Alive is accepted.
        c.admin(Sqe::new(admin_opc::KEEP_ALIVE, 0, 0), 0)
            .await
            .unwrap();
    });
}

#[test]
fn async_event_requests_wait_and_are_limited() {
    use bytes::BytesMut;
    use dase_protocol::admin::ConnectData;
    use dase_protocol::nvme::{admin_opc, SglDescriptor};
    use dase_protocol::{Pdu, Sqe};
    let d = DNode::memory(&nqn("aer"), "1M", 512);
    let mut raw = RawConn::connect(d.addr, true, false, false);
    let cd = ConnectData::new([9; 16], 0xffff, &d.nqn, HOSTNQN);
    let mut sqe = Sqe::new(admin_opc::FABRICS, 1, 1);
    sqe.cdw11 = 31.into();
    sqe.dptr = SglDescriptor::in_capsule(1024);
    let mut w = BytesMut::new();
    raw.enc
        .capsule_cmd(&mut w, &sqe, zerocopy::IntoBytes::as_bytes(&cd));
    // Five AERs: four stay outstanding (AERL = 3), the fifth is refused.
    for cid in 10..15u16 {
        raw.enc.capsule_cmd(
            &mut w,
            &Sqe::new(admin_opc::ASYNC_EVENT_REQUEST, cid, 0),
            &[],
        );
    }
    raw.enc
        .capsule_cmd(&mut w, &Sqe::new(admin_opc::KEEP_ALIVE, 20, 0), &[]);
    raw.send(&w);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match raw.recv() {
            Some(Pdu::CapsuleResp(c)) => {
                seen.push((c.cid.get(), Status::from_word(c.status.get())))
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            (1, Status::SUCCESS),
            (14, Status::AER_LIMIT_EXCEEDED),
            (20, Status::SUCCESS)
        ]
    );
}

#[test]
fn commands_time_out_on_a_frozen_target_and_recover_after() {
    let mut d = DNode::memory(&nqn("frozen"), "1M", 512);
    rt().block_on(async {
        let mut o = opts(false, false);
        o.io_timeout = Duration::from_millis(500);
        o.reconnect_backoff = Duration::from_millis(100);
        let (c, ns) = connect(&d, o).await;
        c.write(&ns, 0, Bytes::from(vec![3u8; 512])).await.unwrap();
        unsafe { libc::kill(d.child.id() as i32, libc::SIGSTOP) };
        // kill() returns before the stop takes effect: wait until it has.
        let stat = format!("/proc/{}/stat", d.child.id());
        let stopped = || {
            std::fs::read_to_string(&stat).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('T'))
            })
        };
        for _ in 0..100 {
            if stopped() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stopped(), "the D-node did not stop");
        let t0 = std::time::Instant::now();
        let e = c.read(&ns, 0, 1).await.unwrap_err();
        assert!(matches!(e, HostError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3));
        unsafe { libc::kill(d.child.id() as i32, libc::SIGCONT) };
        // The timed-out queue was dropped; the next operations reconnect.
        let mut back = None;
        for _ in 0..50 {
            if let Ok(b) = c.read(&ns, 0, 1).await {
                back = Some(b);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(&back.expect("recovered")[..], &[3u8; 512][..]);
    });
    assert!(d.alive());
}
