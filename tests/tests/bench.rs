//! `dase bench` end to end: real D-node processes, real TCP, real files.

use std::process::{Command, Output};

use bytes::Bytes;
use dase_initiator::host::{Controller, ControllerOptions};
use dase_tests::*;

fn bench(args: &[&str]) -> Output {
    Command::new(dase_bin())
        .arg("bench")
        .args(args)
        .output()
        .expect("run dase bench")
}

fn ok(args: &[&str]) -> String {
    let o = bench(args);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "dase bench {args:?} failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// A verifying 4 KiB write of the first MiB.
fn write_verify(u: &str) -> String {
    ok(&[
        "--filename",
        u,
        "--rw",
        "write",
        "--bs",
        "4k",
        "--size",
        "1m",
        "--verify",
        "crc32c",
    ])
}

/// Runs `f` with a host connection to namespace 1 of `d`, behind the bench's back.
fn raw<T>(
    d: &DNode,
    f: impl AsyncFnOnce(&Controller, &dase_initiator::host::NamespaceInfo) -> T,
) -> T {
    rt().block_on(async {
        let c = Controller::connect(&d.addr_string(), &d.nqn, ControllerOptions::default())
            .await
            .unwrap();
        let ns = c.namespace(1).await.unwrap();
        f(&c, &ns).await
    })
}

/// A verifying 4 KiB read of the first MiB.
fn read_verify(u: &str) -> Output {
    bench(&[
        "--filename",
        u,
        "--rw",
        "read",
        "--bs",
        "4k",
        "--size",
        "1m",
        "--verify",
        "crc32c",
    ])
}

fn uri(d: &DNode) -> String {
    format!("nvme-tcp://{}/{}/1", d.addr, d.nqn)
}

#[test]
fn every_mode_against_a_dnode_with_verify() {
    let d = DNode::memory(&nqn("bench-modes"), "64M", 512);
    let u = uri(&d);
    for (rw, extra) in [
        ("write", vec!["--bs", "128k", "--iodepth", "8"]),
        ("randwrite", vec!["--bs", "4k", "--iodepth", "16"]),
        (
            "rw",
            vec!["--bs", "64k", "--iodepth", "4", "--rwmixread", "30"],
        ),
        (
            "randrw",
            vec!["--bssplit", "4k/50:16k/30:64k/20", "--iodepth", "8"],
        ),
        ("read", vec!["--bs", "1m", "--iodepth", "2"]),
        (
            "randread",
            vec!["--bs", "8k", "--iodepth", "32", "--numjobs", "2"],
        ),
    ] {
        let mut args = vec![
            "--filename",
            &u,
            "--rw",
            rw,
            "--size",
            "8m",
            "--verify",
            "crc32c",
            "--verify_fatal=1",
        ];
        args.extend(extra);
        let out = ok(&args);
        assert!(out.contains("err=0"), "{rw}: {out}");
        if rw.contains("write") || rw.contains("rw") {
            assert!(out.contains("verify: OK"), "{rw}: {out}");
        }
    }
}

#[test]
fn json_output_reads_like_fio() {
    let d = DNode::memory(&nqn("bench-json"), "64M", 4096);
    let out = ok(&[
        "--filename",
        &uri(&d),
        "--rw",
        "randrw",
        "--bs",
        "4k",
        "--iodepth",
        "8",
        "--runtime",
        "1",
        "--time_based",
        "--output-format=json",
        "--name",
        "mix",
        "--ceiling",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    let j = &v["jobs"][0];
    assert_eq!(j["jobname"], "mix");
    for op in ["read", "write"] {
        assert!(j[op]["iops"].as_f64().unwrap() > 0.0, "{op} iops");
        assert!(j[op]["bw_bytes"].as_u64().unwrap() > 0);
        let p = &j[op]["clat_ns"]["percentile"];
        let p50 = p["50.000000"].as_u64().unwrap();
        let p99 = p["99.000000"].as_u64().unwrap();
        assert!(p50 > 0 && p99 >= p50 && p["99.990000"].as_u64().unwrap() >= p99);
        assert!(j[op]["runtime"].as_u64().unwrap() >= 900);
    }
    assert!(v["dase"]["ceiling"]["read_iops"].as_f64().unwrap() > 0.0);
    assert!(
        v["dase"]["cpu"]["bench_core_s_per_million_ios"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // The target is local: its CPU is found through its listening port.
    assert!(v["dase"]["cpu"]["target_core_seconds"].as_f64().is_some());
}

#[test]
fn verify_catches_a_misdirected_and_a_torn_write_through_the_stack() {
    let d = DNode::memory(&nqn("bench-faults"), "16M", 512);
    let u = uri(&d);
    write_verify(&u);
    assert!(read_verify(&u).status.success());
    // Misdirect: the 4 KiB written for offset 64 KiB also lands at 0.
    raw(&d, async |c, ns| {
        let b = c.read(ns, 128, 8).await.unwrap();
        c.write(ns, 0, b).await.unwrap();
    });
    let o = read_verify(&u);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success(),
        "a misdirected write must fail verification"
    );
    assert!(
        out.contains("misdirected write: offset 0x0 holds data written for offset 0x10000"),
        "{out}"
    );

    // Torn: rewrite everything, then put back the old second half of one block.
    let old = raw(&d, async |c, ns| c.read(ns, 16, 8).await.unwrap());
    write_verify(&u);
    raw(&d, async |c, ns| {
        c.write(ns, 20, Bytes::copy_from_slice(&old[2048..]))
            .await
            .unwrap()
    });
    let o = read_verify(&u);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success());
    assert!(out.contains("torn write: block at offset 0x2000"), "{out}");
}

#[test]
fn local_files_and_job_files() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("data");
    let fs = f.to_str().unwrap();
    ok(&[
        "--filename",
        fs,
        "--rw",
        "write",
        "--bs",
        "1m",
        "--size",
        "4m",
        "--verify",
        "crc32c",
    ]);
    let out = ok(&[
        "--filename",
        fs,
        "--rw",
        "randwrite",
        "--bs",
        "4k",
        "--size",
        "4m",
        "--iodepth",
        "4",
        "--verify",
        "crc32c",
    ]);
    assert!(out.contains("verify: OK"), "{out}");
    ok(&[
        "--filename",
        fs,
        "--rw",
        "read",
        "--bs",
        "64k",
        "--direct=1",
        "--verify",
        "crc32c",
    ]);
    let d = DNode::memory(&nqn("bench-jobfile"), "32M", 512);
    let jobs = dir.path().join("jobs.fio");
    std::fs::write(
        &jobs,
        format!("[global]\nsize=4m\nverify=crc32c\n\n[nvme-write]\nfilename={}\nrw=write\nbs=256k\niodepth=4\n\n[file-read]\nfilename={fs}\nrw=randread\nbs=4k\n", uri(&d)),
    )
    .unwrap();
    let out = ok(&[jobs.to_str().unwrap(), "--output-format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["jobname"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["nvme-write", "file-read"]);
}

#[test]
fn bad_input_is_one_line_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::write(&small, vec![0u8; 4096]).unwrap();
    let s = small.to_str().unwrap();
    for (args, want) in [
        (vec!["--filename", s, "--bs", "4q"], "invalid size '4q'"),
        (vec!["--filename", s, "--rw", "randomread"], "unknown --rw"),
        (
            vec![
                "--filename",
                "nvme-tcp://127.0.0.1:1/nqn.2026-11.io.dase:x/1",
            ],
            "cannot connect",
        ),
        (
            vec!["--filename", s, "--bs", "64k"],
            "smaller than the block size",
        ),
        (vec!["--filename", s, "--size", "1m"], "exceeds the target"),
        (vec!["--filename", "/nonexistent/f"], "no such file"),
        (vec!["--rw", "read"], "--filename is required"),
        (vec!["--filename", s, "--iodepth", "0"], "--iodepth"),
        (
            vec!["--filename", s, "--output-format", "xml"],
            "--output-format",
        ),
    ] {
        let o = bench(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
        assert_eq!(
            e.trim().lines().count(),
            1,
            "{args:?}: one line expected: {e}"
        );
    }
}
