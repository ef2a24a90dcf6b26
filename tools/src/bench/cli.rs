//! `dase bench` command line: fio's option names and meanings.

use std::io::{BufRead, BufReader};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::ceiling::{self, Ceiling};
use super::cpu;
use super::options::*;
use super::report::{self, CpuUse};
use super::{open_target, parse_verify, run_job, JobResult};

#[derive(clap::Args, Clone, Debug)]
#[command(
    about = "Measure I/O like fio: a raw NVMe/TCP namespace, a file on a dase mount, or any local file or device",
    long_about = "Measure I/O like fio, with fio's option names, against a raw NVMe/TCP namespace \
(nvme-tcp://HOST:PORT/NQN/NSID, through dase's host library: one I/O queue per job), a file on a \
dase mount, or any local file or block device.\n\n\
Without --time_based a job moves --size bytes (default: the whole target) or runs for --runtime, \
whichever ends first. --verify=crc32c stamps every 512-byte unit with its offset, a generation and \
a checksum: write jobs read everything back at the end, mixed jobs also check as they go, read \
jobs check what an earlier verifying write left. Misdirected, torn and stale writes are reported \
with their offset. --ceiling also measures plain TCP between the same endpoints with the same \
sizes, so results read as a fraction of what the wire allows.",
    after_help = "Examples:\n  dase bench --filename nvme-tcp://127.0.0.1:4420/nqn.2026-11.io.dase:d0/1 --rw randread --bs 4k --iodepth 32 --runtime 10 --time_based --ceiling\n  dase bench --filename /mnt/dase/f --rw write --bs 1m --size 1g --verify crc32c\n  dase bench --filename /tmp/x --size 256m --rw randrw --rwmixread 70 --bssplit 4k/50:64k/50 --output-format json\n  dase bench jobs.fio"
)]
pub struct Args {
    /// fio-style job file (ini: [global] and one [section] per job).
    pub jobfile: Option<PathBuf>,
    /// Target: nvme-tcp://HOST:PORT/NQN/NSID or a path.
    #[arg(long)]
    pub filename: Option<String>,
    /// read, write, randread, randwrite, rw (readwrite) or randrw.
    #[arg(long, default_value = "read")]
    pub rw: String,
    /// Percentage of reads in rw/randrw jobs.
    #[arg(long, default_value_t = 50)]
    pub rwmixread: u32,
    /// Block size (4k, 128k, 1m …).
    #[arg(long, default_value = "4k")]
    pub bs: String,
    /// Weighted block size mix, e.g. 4k/50:64k/30:1m/20.
    #[arg(long)]
    pub bssplit: Option<String>,
    /// I/Os in flight per job.
    #[arg(long, default_value_t = 1)]
    pub iodepth: usize,
    /// Parallel jobs (on NVMe/TCP, one I/O queue each).
    #[arg(long, default_value_t = 1)]
    pub numjobs: usize,
    /// Bytes of the target to use, and (without --time_based) to move per job.
    #[arg(long)]
    pub size: Option<String>,
    /// Start offset in the target.
    #[arg(long, default_value = "0")]
    pub offset: String,
    /// Run time limit (10, 500ms, 2m).
    #[arg(long)]
    pub runtime: Option<String>,
    /// Run for --runtime even when --size is done, wrapping around.
    #[arg(long = "time_based", num_args = 0..=1, default_missing_value = "1", default_value = "0")]
    pub time_based: String,
    /// Run this long before measuring.
    #[arg(long = "ramp_time", default_value = "0")]
    pub ramp_time: String,
    /// O_DIRECT for files (--direct or --direct=1).
    #[arg(long, num_args = 0..=1, default_missing_value = "1", default_value = "0")]
    pub direct: String,
    /// Verify data: crc32c.
    #[arg(long)]
    pub verify: Option<String>,
    /// Stop at the first verify failure.
    #[arg(long = "verify_fatal", num_args = 0..=1, default_missing_value = "1", default_value = "0")]
    pub verify_fatal: String,
    /// Job name.
    #[arg(long, default_value = "dase-bench")]
    pub name: String,
    /// normal or json.
    #[arg(long = "output-format", default_value = "normal")]
    pub output_format: String,
    /// Also write the report to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Also measure plain TCP between the same endpoints (NVMe/TCP targets).
    #[arg(long)]
    pub ceiling: bool,
    /// Pin the bench to these CPUs (e.g. 1 or 0-1).
    #[arg(long = "cpus_allowed")]
    pub cpus_allowed: Option<String>,
    /// NVMe/TCP header digests.
    #[arg(long)]
    pub hdr_digest: bool,
    /// NVMe/TCP data digests.
    #[arg(long)]
    pub data_digest: bool,
    /// NVMe/TCP: microseconds each queue keeps polling for completions before
    /// sleeping, as SPDK's perf polls (0: sleep at once, saving CPU).
    #[arg(long = "poll_us", default_value_t = 50)]
    pub poll_us: u64,
}

fn flag(s: &str, what: &str) -> Result<bool, String> {
    match s {
        "1" | "true" | "yes" | "" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err(format!("--{what} takes 0 or 1, not '{s}'")),
    }
}

impl Args {
    fn base_spec(&self) -> Result<JobSpec, String> {
        let bs = match &self.bssplit {
            Some(s) => BlockSizes::parse_split(s)?,
            None => BlockSizes::single(parse_size(&self.bs)?),
        };
        Ok(JobSpec {
            name: self.name.clone(),
            filename: Filename::Path(PathBuf::new()),
            rw: Rw::parse(&self.rw)?,
            rwmixread: self.rwmixread,
            bs,
            iodepth: self.iodepth,
            numjobs: self.numjobs,
            size: self.size.as_deref().map(parse_size).transpose()?,
            offset: parse_size(&self.offset)?,
            runtime: self.runtime.as_deref().map(parse_duration).transpose()?,
            time_based: flag(&self.time_based, "time_based")?,
            ramp_time: parse_duration(&self.ramp_time)?,
            direct: flag(&self.direct, "direct")?,
            verify: self
                .verify
                .as_deref()
                .map(parse_verify)
                .transpose()?
                .flatten(),
            verify_fatal: flag(&self.verify_fatal, "verify_fatal")?,
            hdr_digest: self.hdr_digest,
            data_digest: self.data_digest,
            poll_us: self.poll_us,
        })
    }

    /// Every job this invocation asks for, validated.
    pub fn jobs(&self) -> Result<Vec<JobSpec>, String> {
        let mut base = self.base_spec()?;
        let cli_filename = self.filename.as_deref().map(Filename::parse).transpose()?;
        let mut jobs = Vec::new();
        match &self.jobfile {
            None => {
                base.filename =
                    cli_filename.ok_or("--filename is required (or give a job file)")?;
                jobs.push(base);
            }
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
                for (name, kv) in parse_job_file(&text)? {
                    let mut j = base.clone();
                    j.name = name.clone();
                    let mut fname = cli_filename.clone();
                    let mut bssplit = None;
                    for (k, v) in kv {
                        let e = |m: String| format!("job [{name}]: {m}");
                        match k.as_str() {
                            "filename" => fname = Some(Filename::parse(&v).map_err(e)?),
                            "rw" | "readwrite" => j.rw = Rw::parse(&v).map_err(e)?,
                            "rwmixread" => {
                                j.rwmixread =
                                    v.parse().map_err(|_| e(format!("rwmixread '{v}'")))?
                            }
                            "bs" | "blocksize" => {
                                j.bs = BlockSizes::single(parse_size(&v).map_err(e)?)
                            }
                            "bssplit" => bssplit = Some(BlockSizes::parse_split(&v).map_err(e)?),
                            "iodepth" => {
                                j.iodepth = v.parse().map_err(|_| e(format!("iodepth '{v}'")))?
                            }
                            "numjobs" => {
                                j.numjobs = v.parse().map_err(|_| e(format!("numjobs '{v}'")))?
                            }
                            "size" => j.size = Some(parse_size(&v).map_err(e)?),
                            "offset" => j.offset = parse_size(&v).map_err(e)?,
                            "runtime" => j.runtime = Some(parse_duration(&v).map_err(e)?),
                            "time_based" => j.time_based = flag(&v, "time_based").map_err(e)?,
                            "ramp_time" => j.ramp_time = parse_duration(&v).map_err(e)?,
                            "direct" => j.direct = flag(&v, "direct").map_err(e)?,
                            "verify" => j.verify = parse_verify(&v).map_err(e)?,
                            "verify_fatal" => {
                                j.verify_fatal = flag(&v, "verify_fatal").map_err(e)?
                            }
                            "name" => j.name = v,
                            // Accepted for fio compatibility; dase has one engine per target kind.
                            "ioengine" | "group_reporting" | "stonewall" | "thread" => {}
                            other => return Err(e(format!("unsupported option '{other}'"))),
                        }
                    }
                    if let Some(b) = bssplit {
                        j.bs = b;
                    }
                    j.filename = fname.ok_or_else(|| {
                        format!(
                            "job [{name}] has no filename (set it in the file or with --filename)"
                        )
                    })?;
                    jobs.push(j);
                }
            }
        }
        for j in &jobs {
            j.validate()?;
        }
        if !matches!(self.output_format.as_str(), "normal" | "json") {
            return Err(format!(
                "--output-format '{}': use normal or json",
                self.output_format
            ));
        }
        Ok(jobs)
    }
}

/// One job spec's results with what was measured around it.
pub struct Group {
    pub results: Vec<JobResult>,
    pub cpu: CpuUse,
    pub ceiling: Option<Ceiling>,
}

fn spawn_ceiling_server(
    ip: std::net::IpAddr,
    pin_like: Option<i32>,
) -> Result<(std::process::Child, std::net::SocketAddr)> {
    let exe = std::env::current_exe().context("locating the dase binary")?;
    let mut child = Command::new(exe)
        .args([
            "ceiling-server",
            "--listen",
            &std::net::SocketAddr::new(ip, 0).to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the ceiling server")?;
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .transpose()?
        .unwrap_or_default();
    let addr = line
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("ceiling server said '{line}'"))?;
    if let Some(cpus) = pin_like.and_then(cpu::affinity) {
        let _ = cpu::set_affinity(child.id() as i32, &cpus);
    }
    Ok((child, addr))
}

/// Runs everything `args` asks for; returns whether every job passed.
pub fn run(args: &Args) -> Result<bool> {
    let jobs = args.jobs().map_err(anyhow::Error::msg)?;
    if let Some(c) = &args.cpus_allowed {
        cpu::set_affinity(0, &cpu::parse_cpus(c).map_err(anyhow::Error::msg)?)
            .map_err(anyhow::Error::msg)?;
    }
    let json = args.output_format == "json";
    // One thread for the whole bench: the measure of per-core efficiency.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut groups = Vec::new();
    for spec in &jobs {
        let target = rt.block_on(open_target(spec)).map_err(anyhow::Error::msg)?;
        let endpoint = match &spec.filename {
            Filename::Nvme(u) => u.addr.to_socket_addrs().ok().and_then(|mut a| a.next()),
            Filename::Path(_) => None,
        };
        let target_pid = endpoint
            .filter(|a| a.ip().is_loopback())
            .and_then(|a| cpu::listener_pid(a.port()));
        let (c0, t0, w0) = (
            cpu::self_cpu(),
            target_pid.and_then(cpu::proc_cpu),
            Instant::now(),
        );
        let results = rt
            .block_on(run_job(spec, &target, json))
            .map_err(anyhow::Error::msg)?;
        let wall = w0.elapsed();
        let cpu_use = CpuUse {
            bench_s: (cpu::self_cpu() - c0).as_secs_f64(),
            target_s: match (t0, target_pid.and_then(cpu::proc_cpu)) {
                (Some(a), Some(b)) => Some((b - a).as_secs_f64()),
                _ => None,
            },
            wall_s: wall.as_secs_f64(),
        };
        rt.block_on(target.close());
        let ceiling = match (args.ceiling, endpoint) {
            (true, Some(ep)) => {
                let (mut child, addr) = spawn_ceiling_server(ep.ip(), target_pid)?;
                let dur = spec
                    .runtime
                    .unwrap_or(Duration::from_secs(3))
                    .clamp(Duration::from_secs(1), Duration::from_secs(5));
                let r = ceiling::measure(
                    addr,
                    spec.bs.max() as usize,
                    spec.iodepth,
                    spec.numjobs,
                    dur,
                );
                let _ = child.kill();
                let _ = child.wait();
                Some(r.context("measuring the TCP ceiling")?)
            }
            (true, None) => {
                eprintln!(
                    "dase bench: --ceiling applies to nvme-tcp:// targets; skipped for {}",
                    spec.name
                );
                None
            }
            _ => None,
        };
        groups.push(Group {
            results,
            cpu: cpu_use,
            ceiling,
        });
    }
    let text = if json {
        let docs: Vec<serde_json::Value> = groups
            .iter()
            .map(|g| report::to_json(&g.results, &g.cpu, g.ceiling.as_ref()))
            .collect();
        let doc = if docs.len() == 1 {
            docs.into_iter().next().unwrap()
        } else {
            // Several job sections: one fio document with every job.
            let mut first = docs[0].clone();
            let all: Vec<serde_json::Value> = docs
                .iter()
                .flat_map(|d| d["jobs"].as_array().cloned().unwrap_or_default())
                .collect();
            first["jobs"] = serde_json::Value::Array(all);
            first["dase"]["groups"] =
                serde_json::Value::Array(docs.iter().map(|d| d["dase"].clone()).collect());
            first
        };
        serde_json::to_string_pretty(&doc)? + "\n"
    } else {
        groups
            .iter()
            .map(|g| report::to_text(&g.results, &g.cpu, g.ceiling.as_ref()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    print!("{text}");
    if let Some(p) = &args.output {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    let ok = groups.iter().all(|g| {
        g.results
            .iter()
            .all(|r| r.errors.is_empty() && r.verify_failures.is_empty())
    });
    if !ok && json {
        eprintln!("dase bench: errors or verify failures; see the report");
    }
    if groups
        .iter()
        .all(|g| g.results.iter().all(|r| r.read.ios + r.write.ios == 0))
    {
        bail!("no I/O completed");
    }
    Ok(ok)
}
