//! Stripe-layer throughput over 13 D-node processes (10+3): healthy writes
//! and reads, then reads with 3 D-nodes killed. A benchmark, not a test: it
//! asserts only correctness and prints figures. Run with
//!
//! ```text
//! DASE_BIN=$PWD/build/release/dase cargo test --release -p dase-tests --test volume_bench -- --ignored --nocapture
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use dase_erasure::Geometry;
use dase_initiator::cnode::{Cluster, ClusterFile, StripeRecord, Volume};
use dase_initiator::host::{join_all, ControllerOptions};
use dase_tests::*;

const STRIP: usize = 128 * 1024;
const STRIPES: u64 = 384;
const IN_FLIGHT: usize = 8;

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (release build recommended)"]
fn volume_throughput_healthy_and_degraded() {
    let (mut nodes, specs) = start_dnodes("vbench", 13, "256M", |_| "memory".into());
    let file = ClusterFile { dnodes: specs };
    let data: Vec<Vec<u8>> = (0..IN_FLIGHT)
        .map(|i| pattern(10 * STRIP, i as u64 + 1))
        .collect();
    let (recs, write_s, read_s) = rt().block_on(async {
        let v = volume(&file).await;
        let t = Instant::now();
        let mut recs: Vec<StripeRecord> = Vec::new();
        for batch in (0..STRIPES).collect::<Vec<_>>().chunks(IN_FLIGHT) {
            let w = batch
                .iter()
                .map(|&s| v.write_stripe(s, &data[s as usize % IN_FLIGHT]));
            recs.extend(join_all(w).await.into_iter().map(|r| r.unwrap()));
        }
        let write_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        read_all(&v, &recs, &data).await;
        (recs, write_s, t.elapsed().as_secs_f64())
    });
    for i in [1, 5, 9] {
        nodes[i].kill();
    }
    let degraded_s = rt().block_on(async {
        let v = volume(&file).await;
        let t = Instant::now();
        read_all(&v, &recs, &data).await;
        t.elapsed().as_secs_f64()
    });
    let bytes = (STRIPES as usize * 10 * STRIP) as f64;
    println!("volume 10+3, {} KiB strips, {STRIPES} stripes, {IN_FLIGHT} in flight, 13 D-nodes on this machine:", STRIP / 1024);
    println!(
        "  write (with parity)   {:.2} GB/s of data",
        bytes / write_s / 1e9
    );
    println!("  read, healthy          {:.2} GB/s", bytes / read_s / 1e9);
    println!(
        "  read, 3 D-nodes down   {:.2} GB/s ({:.0} % of healthy)",
        bytes / degraded_s / 1e9,
        100.0 * read_s / degraded_s
    );
}

/// A 10+3 volume over `file`, its queues polling like the bench's.
async fn volume(file: &ClusterFile) -> Volume {
    let opts = ControllerOptions {
        io_queues: 2,
        queue_depth: 64,
        poll: Duration::from_micros(50),
        ..Default::default()
    };
    Volume::new(
        Arc::new(Cluster::connect(file, opts).await),
        Geometry::parse("10+3", STRIP).unwrap(),
    )
    .unwrap()
}

async fn read_all(v: &Volume, recs: &[StripeRecord], data: &[Vec<u8>]) {
    for batch in recs.chunks(IN_FLIGHT) {
        let r = batch.iter().map(|rec| v.read(rec, 0, 10 * STRIP));
        for (rec, got) in batch.iter().zip(join_all(r).await) {
            assert!(
                got.unwrap()[..] == data[rec.stripe as usize % IN_FLIGHT][..],
                "stripe {}",
                rec.stripe
            );
        }
    }
}
