//! Results as fio prints them, and as fio's JSON (same field names, so
//! existing fio tooling reads it: `jobs[].read.iops`, `jobs[].read.bw_bytes`,
//! `jobs[].read.clat_ns.percentile["99.000000"]`).

use serde_json::{json, Map, Value};

use super::ceiling::Ceiling;
use super::{JobResult, OpStats};

/// fio's default percentile list.
pub const PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

/// CPU figures for a run, in core-seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    pub bench_s: f64,
    pub target_s: Option<f64>,
    pub wall_s: f64,
}

pub fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

pub fn bytes_h(v: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = v;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    format!("{x:.1}{}", units[u])
}

fn op_json(s: &OpStats, runtime_ms: u64) -> Value {
    let secs = (runtime_ms as f64 / 1000.0).max(1e-9);
    let h = &s.hist;
    let n = s.ios > 0;
    let mut pct = Map::new();
    for p in PERCENTILES {
        pct.insert(
            format!("{p:.6}"),
            json!(if n { h.value_at_quantile(p / 100.0) } else { 0 }),
        );
    }
    let lat = json!({
        "min": if n { h.min() } else { 0 },
        "max": if n { h.max() } else { 0 },
        "mean": if n { h.mean() } else { 0.0 },
        "stddev": if n { h.stdev() } else { 0.0 },
        "N": s.ios,
        "percentile": pct,
    });
    json!({
        "io_bytes": s.bytes,
        "io_kbytes": s.bytes / 1024,
        "bw_bytes": (s.bytes as f64 / secs) as u64,
        "bw": (s.bytes as f64 / secs / 1024.0) as u64,
        "iops": s.ios as f64 / secs,
        "runtime": runtime_ms,
        "total_ios": s.ios,
        "short_ios": 0,
        "drop_ios": 0,
        // Submission to completion as the caller sees it: dase reports the
        // same figure as completion and total latency.
        "clat_ns": lat.clone(),
        "lat_ns": lat,
        "slat_ns": {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0},
    })
}

/// The whole run as fio-compatible JSON, with dase's extras under `dase`.
pub fn to_json(results: &[JobResult], cpu: &CpuUse, ceiling: Option<&Ceiling>) -> Value {
    let jobs: Vec<Value> = results
        .iter()
        .map(|r| {
            let ms = r.runtime.as_millis() as u64;
            let errs = r.errors.len() + r.verify_failures.len();
            json!({
                "jobname": r.name,
                "groupid": 0,
                "error": if errs > 0 { 5 } else { 0 },
                "job options": {
                    "name": r.spec.name, "rw": r.spec.rw.name(), "bs": r.spec.bs.max().to_string(),
                    "iodepth": r.spec.iodepth.to_string(), "numjobs": r.spec.numjobs.to_string(),
                },
                "read": op_json(&r.read, ms),
                "write": op_json(&r.write, ms),
                "trim": op_json(&OpStats::default(), ms),
                "job_runtime": ms,
                "usr_cpu": 100.0 * cpu.bench_s / cpu.wall_s.max(1e-9) / results.len() as f64,
                "sys_cpu": 0.0,
                "dase": {"errors": r.errors, "verify_failures": r.verify_failures, "verified_bytes": r.verified_bytes},
            })
        })
        .collect();
    let total_ios: u64 = results.iter().map(|r| r.read.ios + r.write.ios).sum();
    let per_m = |s: f64| {
        if total_ios > 0 {
            s / (total_ios as f64 / 1e6)
        } else {
            0.0
        }
    };
    json!({
        "fio version": concat!("dase-bench-", env!("CARGO_PKG_VERSION")),
        "timestamp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "jobs": jobs,
        "dase": {
            "cpu": {
                "bench_core_seconds": cpu.bench_s,
                "target_core_seconds": cpu.target_s,
                "bench_core_s_per_million_ios": per_m(cpu.bench_s),
                "target_core_s_per_million_ios": cpu.target_s.map(per_m),
            },
            "ceiling": ceiling.map(|c| json!({
                "read_iops": c.read_iops, "read_bw_bytes": c.read_bw,
                "write_iops": c.write_iops, "write_bw_bytes": c.write_bw,
                "qd1_read_round_trip_us": c.qd1_read_us,
            })),
        }
    })
}

fn op_text(out: &mut String, what: &str, s: &OpStats, secs: f64, ceiling: Option<(f64, f64)>) {
    if s.ios == 0 {
        return;
    }
    let h = &s.hist;
    let iops = s.ios as f64 / secs;
    let bw = s.bytes as f64 / secs;
    out.push_str(&format!(
        "  {what}: IOPS={}, BW={}/s ({:.1}MB/s)({}/{}msec)\n",
        si(iops),
        bytes_h(bw),
        bw / 1e6,
        bytes_h(s.bytes as f64),
        (secs * 1000.0) as u64
    ));
    out.push_str(&format!(
        "    clat (usec): min={:.1}, max={:.1}, avg={:.2}, stdev={:.2}\n",
        h.min() as f64 / 1e3,
        h.max() as f64 / 1e3,
        h.mean() / 1e3,
        h.stdev() / 1e3
    ));
    out.push_str("     clat percentiles (usec):");
    for (i, p) in [1.0, 50.0, 90.0, 99.0, 99.9, 99.99].iter().enumerate() {
        if i % 3 == 0 {
            out.push_str("\n     |");
        }
        out.push_str(&format!(
            " {p:6.2}th=[{:>9.1}],",
            h.value_at_quantile(p / 100.0) as f64 / 1e3
        ));
    }
    out.push('\n');
    if let Some((c_iops, c_bw)) = ceiling {
        out.push_str(&format!(
            "    vs. wire ceiling: {:.0}% of {} IOPS, {:.0}% of {}/s\n",
            100.0 * iops / c_iops.max(1e-9),
            si(c_iops),
            100.0 * bw / c_bw.max(1e-9),
            bytes_h(c_bw)
        ));
    }
}

/// fio-like human-readable report.
pub fn to_text(results: &[JobResult], cpu: &CpuUse, ceiling: Option<&Ceiling>) -> String {
    let mut out = String::new();
    for r in results {
        let secs = r.runtime.as_secs_f64().max(1e-9);
        let errs = r.errors.len() + r.verify_failures.len();
        out.push_str(&format!(
            "{}: (rw={}, bs={}, iodepth={}): err={}\n",
            r.name,
            r.spec.rw.name(),
            bytes_h(r.spec.bs.max() as f64),
            r.spec.iodepth,
            errs
        ));
        op_text(
            &mut out,
            "read",
            &r.read,
            secs,
            ceiling.map(|c| (c.read_iops, c.read_bw)),
        );
        op_text(
            &mut out,
            "write",
            &r.write,
            secs,
            ceiling.map(|c| (c.write_iops, c.write_bw)),
        );
        if r.spec.verify.is_some() {
            out.push_str(&format!(
                "  verify: {} ({} checked)\n",
                if r.verify_failures.is_empty() {
                    "OK"
                } else {
                    "FAILED"
                },
                bytes_h(r.verified_bytes as f64)
            ));
        }
        for e in &r.errors {
            out.push_str(&format!("  error: {e}\n"));
        }
        for e in &r.verify_failures {
            out.push_str(&format!("  verify error: {e}\n"));
        }
    }
    let total_ios: u64 = results.iter().map(|r| r.read.ios + r.write.ios).sum();
    if total_ios > 0 {
        let per_m = |s: f64| s / (total_ios as f64 / 1e6);
        out.push_str(&format!(
            "cpu: bench {:.2} cores ({:.2} core-s per million I/Os)",
            cpu.bench_s / cpu.wall_s.max(1e-9),
            per_m(cpu.bench_s)
        ));
        match cpu.target_s {
            Some(t) => out.push_str(&format!(
                ", target {:.2} cores ({:.2} core-s per million I/Os)\n",
                t / cpu.wall_s.max(1e-9),
                per_m(t)
            )),
            None => out.push_str(", target not local or not visible\n"),
        }
    }
    if let Some(c) = ceiling {
        out.push_str(&format!(
            "ceiling (plain TCP, same endpoints and sizes): read {} IOPS {}/s, write {} IOPS {}/s, QD1 read round trip {:.1} us\n",
            si(c.read_iops),
            bytes_h(c.read_bw),
            si(c.write_iops),
            bytes_h(c.write_bw),
            c.qd1_read_us
        ));
    }
    out
}

/// The headline of one job in fio-compatible JSON (as [`to_json`] writes
/// it): whichever direction moved data.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub bw_bytes: f64,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Summary {
    /// Job `i` of a run's JSON output; None when it is not there.
    pub fn of_job(run: &Value, i: usize) -> Option<Summary> {
        let j = run.get("jobs")?.get(i)?;
        let side = if j["write"]["io_bytes"].as_u64().unwrap_or(0) > 0 {
            &j["write"]
        } else {
            &j["read"]
        };
        let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1e3;
        Some(Summary {
            bw_bytes: side["bw_bytes"].as_f64()?,
            iops: side["iops"].as_f64()?,
            p50_us: pct("50.000000"),
            p99_us: pct("99.000000"),
        })
    }
}
