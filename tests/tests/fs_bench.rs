//! File system benchmarks, every figure and its ceilings measured in one
//! run on this machine (ignored by default; speed is never asserted):
//!
//! ```text
//! cargo build --release -p dase-tools
//! DASE_BIN=$PWD/build/release/dase cargo test --release -p dase-tests \
//!     --test fs_bench -- --ignored --nocapture --test-threads 1
//! ```
//!
//! `DASE_BENCH_SIZE` (default 2G) sets the sequential file size,
//! `DASE_BENCH_FILES` (default 1000000) the metadata test's file count.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use dase_erasure::Geometry;
use dase_initiator::cnode::{Cluster, ClusterFile, Volume};
use dase_initiator::host::{join_all, ControllerOptions};
use dase_tests::*;
use dase_tools::bench::report::Summary;

type Figure = Summary;

fn bench(args: &[&str]) -> Figure {
    let out = Command::new(dase_bin())
        .args(["bench", "--output-format", "json"])
        .args(args)
        .env("DASE_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "dase bench {args:?} failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Summary::of_job(&v, 0).expect("a job in the bench output")
}

fn dase(args: &[&str]) -> String {
    let out = Command::new(dase_bin())
        .args(args)
        .env("DASE_LOG", "warn")
        .output()
        .unwrap();
    let s = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dase {args:?}: {s}");
    s
}

/// The three sequential/random workloads on `file`.
/// Sequential 1 MiB O_DIRECT I/O at QD4 over `size` of `file`.
fn sequential(file: &str, size: &str, rw: &str) -> Figure {
    bench(&[
        "--filename",
        file,
        "--rw",
        rw,
        "--bs",
        "1M",
        "--iodepth",
        "4",
        "--direct",
        "1",
        "--size",
        size,
    ])
}

fn workloads(file: &str, size: &str) -> [Figure; 3] {
    let w = sequential(file, size, "write");
    let r = sequential(file, size, "read");
    let rr = bench(&[
        "--filename",
        file,
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--iodepth",
        "32",
        "--direct",
        "1",
        "--size",
        size,
        "--runtime",
        "10",
        "--time_based",
    ]);
    [w, r, rr]
}

fn row(what: &str, f: &Figure, ceiling: Option<&Figure>) {
    println!(
        "| {what} | {:.2} GB/s | {:.0} | {:.0} | {:.0} | {} |",
        f.bw_bytes / 1e9,
        f.iops,
        f.p50_us,
        f.p99_us,
        ceiling
            .map(|c| format!("{:.0} %", 100.0 * f.bw_bytes / c.bw_bytes))
            .unwrap_or_default()
    );
}

struct Cl {
    dir: PathBuf,
}

impl Drop for Cl {
    fn drop(&mut self) {
        let _ = Command::new(dase_bin())
            .args(["cluster", "down", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

fn cluster_up(dir: &Path, size: &str) -> (Cl, PathBuf) {
    dase(&[
        "cluster",
        "up",
        "--dir",
        dir.to_str().unwrap(),
        "--dnodes",
        "13",
        "--size",
        size,
    ]);
    (
        Cl {
            dir: dir.to_path_buf(),
        },
        dir.join("cluster.toml"),
    )
}

/// The stripe layer alone over the same D-nodes: full 10+3 stripes, 8 in flight.
fn raw_stripes(cluster: &Path, bytes: u64) -> (f64, f64) {
    let file = ClusterFile::load(cluster).unwrap();
    rt().block_on(async {
        let c = Arc::new(Cluster::connect(&file, ControllerOptions::default()).await);
        let v = Volume::new(c, Geometry::parse("10+3", 64 << 10).unwrap()).unwrap();
        let data = pattern(v.geometry().data_bytes(), 1);
        let n = bytes / data.len() as u64;
        let t = Instant::now();
        let mut recs = Vec::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
            for r in join_all(chunk.iter().map(|&s| v.write_stripe(s, &data))).await {
                recs.push(r.unwrap());
            }
        }
        let w = (n * data.len() as u64) as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for chunk in recs.chunks(8) {
            for r in join_all(chunk.iter().map(|r| v.read(r, 0, data.len()))).await {
                assert_eq!(r.unwrap().len(), data.len());
            }
        }
        let r = (n * data.len() as u64) as f64 / t.elapsed().as_secs_f64();
        (w, r)
    })
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (release build)"]
fn file_system_against_its_ceilings() {
    let size = std::env::var("DASE_BENCH_SIZE").unwrap_or_else(|_| "2G".into());
    let tmp = tempfile::tempdir().unwrap();
    let (_cl, cluster) = cluster_up(&tmp.path().join("c"), "4G");
    let c = cluster.to_str().unwrap();
    let bytes = dase_target_size(&size);
    let (raw_w, raw_r) = raw_stripes(&cluster, bytes);
    dase(&[
        "mkfs",
        "--cluster",
        c,
        "--force",
        "--reduce",
        &reduce_mode(),
    ]);
    let mp = tmp.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let m = Mount::start(&cluster, &mp, &[]).expect("mount");
    let file = mp.join("bench.dat");
    let f = file.to_str().unwrap();
    let [w, r, rr] = workloads(f, &size);
    // Degraded: m = 3 D-nodes down.
    let pids: Vec<i32> = std::fs::read_to_string(tmp.path().join("c/cluster.pids"))
        .unwrap()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let toml = std::fs::read_to_string(&cluster).unwrap();
    let field = |key: &str| -> Vec<String> {
        toml.lines()
            .filter_map(|l| l.strip_prefix(key))
            .map(|a| a.trim_end_matches('"').to_string())
            .collect()
    };
    let (addrs, nqns) = (field("addr = \""), field("nqn = \""));
    for &i in &[1usize, 5, 9] {
        // SAFETY: signalling a D-node this test started.
        unsafe { libc::kill(pids[i], libc::SIGKILL) };
    }
    let deg = sequential(f, &size, "read");
    // Rebuild one of them onto a fresh D-node while mounted.
    let img = tmp.path().join("fresh.img");
    let fresh = DNode::start(&[
        "--nqn",
        &nqns[5],
        "--namespace",
        img.to_str().unwrap(),
        "--size",
        "4G",
        "--poll-us",
        "0",
        "--threads",
        "1",
    ]);
    let t = Instant::now();
    let out = dase(&[
        "rebuild",
        "--cluster",
        c,
        "--replace",
        &format!("{}={}", addrs[5], fresh.addr),
    ]);
    let rebuild_s = t.elapsed().as_secs_f64();
    let restored: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("rebuild done: "))
        .and_then(|l| l.split_whitespace().next().map(|x| x.to_string()))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    let unit = if out.contains(" GiB restored") {
        1u64 << 30
    } else {
        1 << 20
    };
    drop(m);
    // The no-op FUSE ceiling, same bench, same machine, same run.
    let np = tmp.path().join("noop");
    std::fs::create_dir_all(&np).unwrap();
    let mut noop = spawn_tied({
        let mut cmd = Command::new(dase_bin());
        cmd.arg("noop-mount").arg(&np).stdout(Stdio::piped());
        cmd
    })
    .unwrap();
    {
        use std::io::BufRead;
        let mut l = String::new();
        std::io::BufReader::new(noop.stdout.take().unwrap())
            .read_line(&mut l)
            .unwrap();
        assert!(l.starts_with("mounted"), "{l}");
    }
    let [nw, nr, nrr] = workloads(np.join("data").to_str().unwrap(), &size);
    // SAFETY: our child.
    unsafe { libc::kill(noop.id() as i32, libc::SIGTERM) };
    let _ = noop.wait();

    println!("\n13 D-nodes (dase cluster up, files on this machine's disk), 10+3, 64 KiB strips; dase bench, O_DIRECT, {size} file\n");
    println!("| workload | throughput | IOPS | p50 µs | p99 µs | of no-op FUSE |");
    println!("|---|---|---|---|---|---|");
    row("no-op FUSE: write 1M QD4", &nw, None);
    row("no-op FUSE: read 1M QD4", &nr, None);
    row("no-op FUSE: randread 4K QD32", &nrr, None);
    row("dase mount: write 1M QD4", &w, Some(&nw));
    row("dase mount: read 1M QD4", &r, Some(&nr));
    row("dase mount: randread 4K QD32", &rr, Some(&nrr));
    row("dase mount: read 1M QD4, 3 D-nodes down", &deg, Some(&nr));
    println!();
    println!(
        "stripe layer alone over the same D-nodes (8 stripes in flight): write {:.2} GB/s, read {:.2} GB/s",
        raw_w / 1e9,
        raw_r / 1e9
    );
    println!(
        "mount as a fraction of the stripe layer: write {:.0} %, read {:.0} %",
        100.0 * w.bw_bytes / raw_w,
        100.0 * r.bw_bytes / raw_r
    );
    println!(
        "degraded read (3 of 13 down): {:.0} % of healthy",
        100.0 * deg.bw_bytes / r.bw_bytes
    );
    println!(
        "rebuild onto a fresh D-node while mounted: {:.0} MB of strips in {rebuild_s:.1} s = {:.2} GB/s",
        restored * unit as f64 / 1e6,
        restored * unit as f64 / rebuild_s / 1e9
    );
}

fn dase_target_size(s: &str) -> u64 {
    let (n, mult) = match s.chars().last() {
        Some('G') => (&s[..s.len() - 1], 1u64 << 30),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    n.parse::<u64>().unwrap() * mult
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (release build)"]
fn metadata_at_scale() {
    let n: usize = std::env::var("DASE_BENCH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir().unwrap();
    let (_cl, cluster) = cluster_up(&tmp.path().join("c"), "2G");
    dase(&[
        "mkfs",
        "--cluster",
        cluster.to_str().unwrap(),
        "--force",
        "--reduce",
        &reduce_mode(),
    ]);
    let mp = tmp.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let cache = std::env::var("DASE_BENCH_CACHE_PAGES").unwrap_or_else(|_| "512".into());
    let m = Mount::start(&cluster, &mp, &["--cache-pages", &cache]).expect("mount");
    let pid = m.child.id();
    let per_dir = 1000;
    let dirs = n.div_ceil(per_dir);
    println!("\nmetadata: {n} empty files in {dirs} directories of {per_dir}, one thread, --cache-pages {cache}\n");
    println!("| phase | files | ops/s | mount RSS |");
    println!("|---|---|---|---|");
    let t = Instant::now();
    let mut made = 0;
    for d in 0..dirs {
        let dp = mp.join(format!("d{d:05}"));
        std::fs::create_dir(&dp).unwrap();
        for f in 0..per_dir.min(n - made) {
            std::fs::File::create(dp.join(format!("f{f:04}"))).unwrap();
            made += 1;
        }
        if made % (n / 5).max(1) < per_dir {
            println!(
                "| create (so far) | {made} | {:.0} | {} MiB |",
                made as f64 / t.elapsed().as_secs_f64(),
                rss_kib(pid) / 1024
            );
        }
    }
    let create_s = t.elapsed().as_secs_f64();
    let create_rss = rss_kib(pid) / 1024;
    let t = Instant::now();
    let mut seen = 0;
    for d in 0..dirs {
        for e in std::fs::read_dir(mp.join(format!("d{d:05}"))).unwrap() {
            let e = e.unwrap();
            seen += 1;
            let _ = e.file_name();
        }
    }
    assert_eq!(seen, n);
    let list_s = t.elapsed().as_secs_f64();
    let list_rss = rss_kib(pid) / 1024;
    drop_caches();
    let t = Instant::now();
    for d in 0..dirs {
        for f in 0..per_dir.min(n - d * per_dir) {
            std::fs::metadata(mp.join(format!("d{d:05}/f{f:04}"))).unwrap();
        }
    }
    let stat_s = t.elapsed().as_secs_f64();
    println!(
        "| create | {n} | {:.0} | {create_rss} MiB |",
        n as f64 / create_s,
    );
    println!("| list | {n} | {:.0} | {list_rss} MiB |", n as f64 / list_s,);
    println!(
        "| stat (cold kernel cache) | {n} | {:.0} | {} MiB |",
        n as f64 / stat_s,
        rss_kib(pid) / 1024
    );
    let t = Instant::now();
    assert!(m.stop());
    println!("unmount (final commit): {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let m = Mount::start(&cluster, &mp, &[]).expect("remount");
    println!(
        "remount (replaying the metadata log): {:.1} s, RSS {} MiB",
        t.elapsed().as_secs_f64(),
        rss_kib(m.child.id()) / 1024
    );
    assert_eq!(
        std::fs::read_dir(mp.join("d00000")).unwrap().count(),
        per_dir.min(n)
    );
    assert!(m.stop());
}

/// DASE_BENCH_REDUCE: the file systems' reduction (default none: the figures
/// in BENCHMARKS.md's FUSE section are of the raw data path).
fn reduce_mode() -> String {
    std::env::var("DASE_BENCH_REDUCE").unwrap_or_else(|_| "none".into())
}
