//! `dase bench`: a fio-like load generator that measures every layer of dase
//! with the same options — a raw NVMe/TCP namespace, a file on a dase mount,
//! or any local file or block device.

pub mod ceiling;
pub mod cli;
pub mod cpu;
pub mod engine;
pub mod options;
pub mod report;
pub mod verify;

use std::collections::HashSet;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;

use engine::{Engine, Target};
use options::{Filename, JobSpec, Rw, Verify};

/// Counters and latency histogram of one direction of one job.
pub struct OpStats {
    pub hist: Histogram<u64>,
    pub ios: u64,
    pub bytes: u64,
}

impl Default for OpStats {
    fn default() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds"),
            ios: 0,
            bytes: 0,
        }
    }
}

/// What one job did.
pub struct JobResult {
    pub name: String,
    pub spec: JobSpec,
    pub read: OpStats,
    pub write: OpStats,
    /// The measured window (after ramp).
    pub runtime: Duration,
    pub errors: Vec<String>,
    pub verify_failures: Vec<String>,
    /// Bytes read back and checked (during the run and after it).
    pub verified_bytes: u64,
}

/// Shared state of one job's `iodepth` workers.
struct JobState {
    spec: JobSpec,
    engine: Engine,
    region: (u64, u64),
    align: u64,
    static_buf: Bytes,
    seq_read: AtomicU64,
    seq_write: AtomicU64,
    issued: AtomicU64,
    total: u64,
    stop: AtomicBool,
    measuring: AtomicBool,
    next_gen: AtomicU64,
    /// Verify: generation last written per `align`-sized unit (0 = never).
    gens: Mutex<Vec<u64>>,
    inflight: Mutex<HashSet<u64>>,
    read: Mutex<OpStats>,
    write: Mutex<OpStats>,
    live: [AtomicU64; 4],
    errors: Mutex<Vec<String>>,
    verify_failures: Mutex<Vec<String>>,
    /// 512-byte units verified by reads during the run.
    checked: AtomicU64,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

impl JobState {
    fn fail(&self, msg: String) {
        let mut e = self.errors.lock().unwrap();
        if e.len() < 16 {
            e.push(msg);
        }
        self.stop.store(true, Ordering::Relaxed);
    }

    fn verify_failed(&self, msg: String) {
        let mut v = self.verify_failures.lock().unwrap();
        if v.len() < 16 {
            v.push(msg);
        }
        if self.spec.verify_fatal {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    /// Picks the next I/O, or None when the job's size is done.
    fn next(&self, rng: &mut u64) -> Option<(bool, u64, usize)> {
        let s = &self.spec;
        let is_read = match s.rw {
            Rw::Read | Rw::RandRead => true,
            Rw::Write | Rw::RandWrite => false,
            Rw::ReadWrite | Rw::RandRw => (xorshift(rng) % 100) < s.rwmixread as u64,
        };
        let (start, len) = self.region;
        let bs = s.bs.pick((xorshift(rng) % 100) as u32).max(self.align);
        let bs = bs - bs % self.align;
        let bs = bs.min(len - len % self.align);
        if !s.time_based {
            let done = self.issued.fetch_add(bs, Ordering::Relaxed);
            if done >= self.total {
                return None;
            }
        }
        let slots = (len - bs) / self.align + 1;
        let off = if s.rw.random() {
            start + (xorshift(rng) % slots) * self.align
        } else {
            let ctr = if is_read {
                &self.seq_read
            } else {
                &self.seq_write
            };
            let pos = ctr.fetch_add(bs, Ordering::Relaxed) % (len - len % bs);
            start + pos
        };
        Some((is_read, off, bs as usize))
    }

    fn unit_range(&self, off: u64, len: usize) -> std::ops::Range<usize> {
        let a = ((off - self.region.0) / self.align) as usize;
        a..a + len.div_ceil(self.align as usize)
    }

    /// Claims the block range for this I/O so verification never races a
    /// concurrent write to the same blocks.
    fn claim(&self, off: u64, len: usize) -> bool {
        let mut f = self.inflight.lock().unwrap();
        let r = self.unit_range(off, len);
        if r.clone().any(|u| f.contains(&(u as u64))) {
            return false;
        }
        f.extend(r.map(|u| u as u64));
        true
    }

    fn release(&self, off: u64, len: usize) {
        let mut f = self.inflight.lock().unwrap();
        for u in self.unit_range(off, len) {
            f.remove(&(u as u64));
        }
    }

    /// The one generation the whole range was last written with, if any.
    fn expected(&self, off: u64, len: usize) -> Option<u64> {
        let g = self.gens.lock().unwrap();
        let r = self.unit_range(off, len);
        let first = g[r.start];
        (first != 0 && r.clone().all(|u| g[u] == first)).then_some(first)
    }

    async fn one(&self, rng: &mut u64) -> bool {
        let Some((is_read, off, len)) = self.next(rng) else {
            return false;
        };
        let verifying = self.spec.verify.is_some();
        if verifying && !self.claim(off, len) {
            // Another worker is on these blocks; pick again (sequential jobs
            // only collide when the region wraps under a deep queue).
            if !self.spec.time_based {
                self.issued.fetch_sub(len as u64, Ordering::Relaxed);
            }
            tokio::task::yield_now().await;
            return true;
        }
        let t0 = Instant::now();
        let r = if is_read {
            self.engine.read(off, len).await.map(|data| {
                if verifying {
                    let known_history = self.spec.rw.writes();
                    let expected = if known_history {
                        self.expected(off, len)
                    } else {
                        None
                    };
                    // In a mixed job, blocks not written yet by this run are skipped.
                    if !known_history || expected.is_some() {
                        if let Err(f) = verify::check(&data, off, expected) {
                            self.verify_failed(f.to_string());
                        }
                        self.checked
                            .fetch_add((len / verify::UNIT) as u64, Ordering::Relaxed);
                    }
                }
            })
        } else {
            let data = if verifying {
                let gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
                let mut b = BytesMut::zeroed(len);
                verify::fill(&mut b, off, gen);
                let r = self.engine.write(off, b.freeze()).await;
                if r.is_ok() {
                    let mut g = self.gens.lock().unwrap();
                    for u in self.unit_range(off, len) {
                        g[u] = gen;
                    }
                }
                r
            } else {
                self.engine.write(off, self.static_buf.slice(..len)).await
            };
            data
        };
        let lat = t0.elapsed().as_nanos() as u64;
        if verifying {
            self.release(off, len);
        }
        if let Err(e) = r {
            self.fail(format!(
                "{} at offset {off} ({len} bytes): {e}",
                if is_read { "read" } else { "write" }
            ));
            return false;
        }
        let i = if is_read { 0 } else { 2 };
        self.live[i].fetch_add(1, Ordering::Relaxed);
        self.live[i + 1].fetch_add(len as u64, Ordering::Relaxed);
        if self.measuring.load(Ordering::Relaxed) {
            let mut s = if is_read {
                self.read.lock().unwrap()
            } else {
                self.write.lock().unwrap()
            };
            s.ios += 1;
            s.bytes += len as u64;
            let _ = s.hist.record(lat.max(1));
        }
        true
    }

    /// After the workload: read back every block this job wrote and check it.
    async fn verify_pass(&self) -> u64 {
        let gens = self.gens.lock().unwrap().clone();
        let a = self.align as usize;
        let mut checked = 0;
        let mut i = 0;
        while i < gens.len() {
            if gens[i] == 0 {
                i += 1;
                continue;
            }
            // Coalesce a run of same-generation units into one read of at most 1 MiB.
            let mut j = i + 1;
            while j < gens.len() && gens[j] == gens[i] && (j - i) * a < 1 << 20 {
                j += 1;
            }
            let off = self.region.0 + (i * a) as u64;
            match self.engine.read(off, (j - i) * a).await {
                Ok(data) => {
                    if let Err(f) = verify::check(&data, off, Some(gens[i])) {
                        self.verify_failed(f.to_string());
                        if self.spec.verify_fatal {
                            return checked;
                        }
                    }
                    checked += (j - i) as u64;
                }
                Err(e) => {
                    self.fail(format!("verify read at {off}: {e}"));
                    return checked;
                }
            }
            i = j;
        }
        checked
    }
}

/// Runs one job spec (all its `numjobs` copies) against an open target.
pub async fn run_job(
    spec: &JobSpec,
    target: &Target,
    quiet: bool,
) -> Result<Vec<JobResult>, String> {
    let size = target.size();
    let align = target.align().max(if spec.verify.is_some() {
        verify::UNIT as u64
    } else {
        1
    });
    if spec.bs.0.iter().any(|(b, _)| b % align != 0) {
        return Err(format!(
            "block size must be a multiple of {align} bytes for this target"
        ));
    }
    if spec.offset >= size {
        return Err(format!(
            "--offset {} is beyond the end of the target ({size} bytes)",
            spec.offset
        ));
    }
    let avail = size - spec.offset;
    let span = spec.size.unwrap_or(avail);
    if span > avail {
        return Err(format!(
            "--size {span} with --offset {} exceeds the target's {size} bytes",
            spec.offset
        ));
    }
    if span < spec.bs.max() {
        return Err(format!(
            "the target region ({span} bytes) is smaller than the block size {}",
            spec.bs.max()
        ));
    }
    // Verifying jobs get disjoint slices so they never overwrite each other.
    let share = if spec.verify.is_some() && spec.rw.writes() {
        span / spec.numjobs as u64
    } else {
        span
    };
    let share = share - share % spec.bs.max().max(align);
    if share < spec.bs.max() {
        return Err("the region is too small to split between the jobs".into());
    }
    let mut states = Vec::new();
    for j in 0..spec.numjobs {
        let start = spec.offset + if share == span { 0 } else { j as u64 * share };
        let units = if spec.verify.is_some() {
            (share / align) as usize
        } else {
            0
        };
        states.push(Arc::new(JobState {
            spec: spec.clone(),
            engine: target.engine(j).await?,
            region: (start, share),
            align,
            static_buf: Engine::static_buffer(spec.bs.max() as usize),
            seq_read: AtomicU64::new(0),
            seq_write: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            total: spec.size.unwrap_or(share),
            stop: AtomicBool::new(false),
            measuring: AtomicBool::new(spec.ramp_time.is_zero()),
            // Later runs write later generations, so data left by an earlier
            // run reads as older: milliseconds since the epoch, 2^20 writes of
            // room per run, 2^16 per job.
            next_gen: AtomicU64::new(run_generation_base() + ((j as u64) << 16)),
            gens: Mutex::new(vec![0; units]),
            inflight: Mutex::new(HashSet::new()),
            read: Mutex::new(OpStats::default()),
            write: Mutex::new(OpStats::default()),
            live: Default::default(),
            errors: Mutex::new(Vec::new()),
            verify_failures: Mutex::new(Vec::new()),
            checked: AtomicU64::new(0),
        }));
    }
    let mut workers = Vec::new();
    let active = Arc::new(AtomicU64::new((spec.numjobs * spec.iodepth) as u64));
    let all_done = Arc::new(tokio::sync::Notify::new());
    for (j, st) in states.iter().enumerate() {
        for d in 0..spec.iodepth {
            let st = st.clone();
            let (active, all_done) = (active.clone(), all_done.clone());
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (((j as u64) << 32) | (d as u64 + 1));
            workers.push(tokio::spawn(async move {
                while !st.stop.load(Ordering::Relaxed) {
                    if !st.one(&mut rng).await {
                        break;
                    }
                }
                if active.fetch_sub(1, Ordering::AcqRel) == 1 {
                    all_done.notify_one();
                }
            }));
        }
    }
    let started = Instant::now();
    let mut measured_from = if spec.ramp_time.is_zero() {
        Some(started)
    } else {
        None
    };
    let progress = !quiet && std::io::stderr().is_terminal();
    let mut last = [0u64; 4];
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_print = Instant::now();
    loop {
        let finished = tokio::select! {
            _ = tick.tick() => false,
            _ = all_done.notified() => true,
        };
        if finished {
            break;
        }
        if measured_from.is_none() && started.elapsed() >= spec.ramp_time {
            for s in &states {
                s.measuring.store(true, Ordering::Relaxed);
            }
            measured_from = Some(Instant::now());
        }
        if let (Some(rt), Some(from)) = (spec.runtime, measured_from) {
            if from.elapsed() >= rt {
                break;
            }
        }
        if progress && last_print.elapsed() >= Duration::from_secs(1) {
            let now: Vec<u64> = (0..4)
                .map(|i| {
                    states
                        .iter()
                        .map(|s| s.live[i].load(Ordering::Relaxed))
                        .sum()
                })
                .collect();
            let dt = last_print.elapsed().as_secs_f64();
            let rate = |i: usize| (now[i] - last[i]) as f64 / dt;
            let eta = spec.runtime.map(|r| {
                let done = measured_from.map(|f| f.elapsed()).unwrap_or_default();
                r.saturating_sub(done).as_secs()
                    + spec.ramp_time.saturating_sub(started.elapsed()).as_secs()
            });
            eprint!(
                "\r{}: [r {} IOPS {}/s][w {} IOPS {}/s][eta {}s]   ",
                spec.name,
                report::si(rate(0)),
                report::bytes_h(rate(1)),
                report::si(rate(2)),
                report::bytes_h(rate(3)),
                eta.map(|e| e.to_string()).unwrap_or_else(|| "-".into())
            );
            last = [now[0], now[1], now[2], now[3]];
            last_print = Instant::now();
        }
    }
    let measured = measured_from.map(|f| f.elapsed()).unwrap_or_default();
    for s in &states {
        s.stop.store(true, Ordering::Relaxed);
    }
    for w in workers {
        let _ = w.await;
    }
    if progress {
        eprint!("\r{}\r", " ".repeat(78));
    }
    let mut results = Vec::new();
    for (j, st) in states.iter().enumerate() {
        let mut verified = 0;
        if spec.verify.is_some() && spec.rw.writes() && st.errors.lock().unwrap().is_empty() {
            verified = st.verify_pass().await;
        }
        let take = |m: &Mutex<OpStats>| std::mem::take(&mut *m.lock().unwrap());
        results.push(JobResult {
            name: if spec.numjobs > 1 {
                format!("{}.{j}", spec.name)
            } else {
                spec.name.clone()
            },
            spec: spec.clone(),
            read: take(&st.read),
            write: take(&st.write),
            runtime: measured,
            errors: st.errors.lock().unwrap().clone(),
            verify_failures: st.verify_failures.lock().unwrap().clone(),
            verified_bytes: verified * align
                + st.checked.load(Ordering::Relaxed) * verify::UNIT as u64,
        });
    }
    Ok(results)
}

/// The first generation number of this run.
fn run_generation_base() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    1 + (ms << 20)
}

/// Opens the target a job names (creating a file laid out to `--size` when
/// a write job names a missing file, as fio does).
pub async fn open_target(spec: &JobSpec) -> Result<Target, String> {
    match &spec.filename {
        Filename::Nvme(u) => {
            Target::open_nvme(
                u,
                spec.numjobs,
                spec.iodepth,
                spec.hdr_digest,
                spec.data_digest,
                Duration::from_micros(spec.poll_us),
            )
            .await
        }
        Filename::Path(p) => {
            let write = spec.rw.writes();
            if !write && !p.exists() {
                return Err(format!(
                    "{}: no such file (a read job needs an existing file)",
                    p.display()
                ));
            }
            let want = spec.size.map(|s| s + spec.offset);
            if write && !p.exists() && want.is_none() {
                return Err(format!(
                    "{}: does not exist; give --size to create it",
                    p.display()
                ));
            }
            Target::open_file(p, spec.direct, write, want)
        }
    }
}

pub use options::parse_size;

/// The verification method for an option value (fio `--verify`).
pub fn parse_verify(s: &str) -> Result<Option<Verify>, String> {
    match s {
        "crc32c" | "crc32c-intel" | "1" => Ok(Some(Verify::Crc32c)),
        "0" | "none" | "" => Ok(None),
        _ => Err(format!("unsupported --verify '{s}': use crc32c")),
    }
}
