//! `dase demo`: the whole system in one command, each step the same
//! `dase` subcommand a user would run, then a table of what it measured.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dase_tools::bench::report::Summary;
use serde_json::Value;

#[derive(clap::Args)]
#[command(
    about = "Run the whole system on this machine: D-nodes, a file system, a mount, benchmarks, failures",
    long_about = "Starts D-nodes on sparse loopback files in a temporary directory, formats them as one \
erasure-coded file system, mounts it through FUSE, and runs `dase bench` on a file in the mount: a \
sequential 1 MiB write and read with verification, then 4 KiB random reads. Then it kills two D-nodes \
and reads everything back (verified) from what is left, and prints a table. Everything is torn down \
at the end, also on Ctrl-C.",
    after_help = "Examples:\n  dase demo\n  dase demo --dnodes 8 --ec 5+3 --file-size 256M\n  dase demo --dir /tmp/dase-demo --keep"
)]
pub struct DemoArgs {
    /// D-nodes to start.
    #[arg(long, default_value_t = 13)]
    dnodes: usize,
    /// Erasure code.
    #[arg(long, default_value = "10+3")]
    ec: String,
    /// Backing file size of each D-node.
    #[arg(long, default_value = "2G")]
    size: String,
    /// Size of the benchmark file in the mount.
    #[arg(long, default_value = "1G")]
    file_size: String,
    /// Seconds of 4 KiB random reads.
    #[arg(long, default_value_t = 10)]
    randread_seconds: u64,
    /// Work here instead of a fresh temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Leave the directory (backing files, logs) behind.
    #[arg(long)]
    keep: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn dase() -> Result<Command> {
    let exe = std::env::current_exe().context("locating the dase binary")?;
    let mut c = Command::new(exe);
    // A child must not outlive the demo: a mount unmounts itself on
    // SIGTERM, anything else just ends.
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    Ok(c)
}

/// Runs `dase ARGS`, returning its stdout; its stderr goes to `log`.
fn step(args: &[&str], log: &Path) -> Result<String> {
    interrupted()?;
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let out = dase()?
        .args(args)
        .stdin(Stdio::null())
        .stderr(err)
        .output()
        .with_context(|| format!("running dase {}", args.join(" ")))?;
    interrupted()?;
    if !out.status.success() {
        bail!(
            "dase {} failed ({}); see {}",
            args.join(" "),
            out.status,
            log.display()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Measured {
    what: &'static str,
    m: Summary,
    verified: Option<bool>,
}

fn bench(label: &'static str, args: &[&str], log: &Path, verify: bool) -> Result<Measured> {
    let mut all = vec!["bench", "--output-format", "json"];
    all.extend_from_slice(args);
    let out = step(&all, log)?;
    let v: Value = serde_json::from_str(&out).context("bench output")?;
    Ok(Measured {
        what: label,
        m: Summary::of_job(&v, 0).context("bench output has no job")?,
        verified: verify.then_some(true),
    })
}

struct Mount {
    child: Child,
    path: PathBuf,
}

impl Mount {
    fn start(cluster: &Path, path: &Path, log: &Path) -> Result<Self> {
        std::fs::create_dir_all(path)?;
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut child = dase()?
            .args(["mount", "--cluster"])
            .arg(cluster)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .context("starting dase mount")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        if !line.starts_with("mounted") {
            let _ = child.wait();
            bail!("dase mount did not come up; see {}", log.display());
        }
        Ok(Self {
            child,
            path: path.to_path_buf(),
        })
    }

    /// Unmounts (the mount commits and gives its lease back) and waits.
    fn stop(mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        crate::mount::detach(&self.path)?;
        bail!("the mount did not stop within 30 s; killed and detached")
    }
}

fn fmt_bw(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB/s", b / 1e9)
    } else {
        format!("{:.0} MB/s", b / 1e6)
    }
}

pub fn run(a: DemoArgs) -> Result<()> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("dase-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = dir.join("demo.log");
    println!("dase demo in {} (logs: {})", dir.display(), log.display());
    let mut mount = None;
    let r = demo(&a, &dir, &log, &mut mount);
    // Teardown whatever happened.
    if let Some(m) = mount.take() {
        if let Err(e) = Mount::stop(m) {
            eprintln!("dase demo: {e:#}");
        }
    }
    let _ = dase().and_then(|mut c| {
        c.args(["cluster", "down", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(Into::into)
    });
    if a.keep || r.is_err() && !INTERRUPTED.load(Ordering::SeqCst) {
        println!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    match r {
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            eprintln!("dase demo: interrupted; everything stopped and removed");
            std::process::exit(130);
        }
        r => r,
    }
}

fn demo(a: &DemoArgs, dir: &Path, log: &Path, mount: &mut Option<Mount>) -> Result<()> {
    let n = a.dnodes.to_string();
    let total = 7;
    let t0 = Instant::now();
    println!(
        "[1/{total}] starting {} D-nodes ({} backing files)",
        a.dnodes, a.size
    );
    let d = dir.to_string_lossy().to_string();
    step(
        &[
            "cluster", "up", "--dir", &d, "--dnodes", &n, "--size", &a.size,
        ],
        log,
    )?;
    let cluster = dir.join("cluster.toml");
    let c = cluster.to_string_lossy().to_string();
    println!("[2/{total}] formatting a {} file system", a.ec);
    step(&["mkfs", "--cluster", &c, "--ec", &a.ec, "--force"], log)?;
    let mnt = dir.join("mnt");
    println!("[3/{total}] mounting at {}", mnt.display());
    *mount = Some(Mount::start(&cluster, &mnt, log)?);
    let file = mnt.join("demo.dat").to_string_lossy().to_string();
    // Sequential 1 MiB I/O over the whole file, checked with crc32c.
    let seq = |label: &'static str, rw: &str| {
        bench(
            label,
            &[
                "--filename",
                &file,
                "--rw",
                rw,
                "--bs",
                "1M",
                "--iodepth",
                "4",
                "--direct",
                "1",
                "--size",
                &a.file_size,
                "--verify",
                "crc32c",
            ],
            log,
            true,
        )
    };
    let mut rows = Vec::new();
    println!(
        "[4/{total}] sequential 1 MiB writes of {} (verified by reading back)",
        a.file_size
    );
    rows.push(seq("seq write 1M QD4", "write")?);
    println!("[5/{total}] sequential 1 MiB reads, then 4 KiB random reads");
    rows.push(seq("seq read 1M QD4", "read")?);
    let secs = a.randread_seconds.to_string();
    rows.push(bench(
        "rand read 4K QD32",
        &[
            "--filename",
            &file,
            "--rw",
            "randread",
            "--bs",
            "4k",
            "--iodepth",
            "32",
            "--direct",
            "1",
            "--size",
            &a.file_size,
            "--runtime",
            &secs,
            "--time_based",
        ],
        log,
        false,
    )?);
    println!("[6/{total}] killing 2 D-nodes, reading everything back");
    let pids: Vec<i32> = std::fs::read_to_string(dir.join("cluster.pids"))?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    for p in pids.iter().step_by(5).take(2) {
        // SAFETY: signalling a D-node this demo started.
        unsafe { libc::kill(*p, libc::SIGKILL) };
    }
    const DEGRADED: &str = "degraded seq read 1M (2 D-nodes down)";
    let degraded = seq(DEGRADED, "read");
    let degraded_ok = degraded.is_ok();
    let ratio = degraded
        .as_ref()
        .ok()
        .map(|d| d.m.bw_bytes / rows[1].m.bw_bytes.max(1.0));
    match degraded {
        Ok(d) => rows.push(d),
        Err(e) => {
            rows.push(Measured {
                what: DEGRADED,
                m: Summary::default(),
                verified: Some(false),
            });
            eprintln!("dase demo: degraded read failed: {e:#}");
        }
    }
    println!("[7/{total}] usage");
    let stats = step(&["stats", "--cluster", &c], log)?;
    let field = |k: &str| {
        stats
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_string())
            .unwrap_or_default()
    };
    println!();
    println!(
        "  {:<40} {:>11} {:>10} {:>9} {:>9}  verify",
        "workload (file on the FUSE mount)", "throughput", "IOPS", "p50 µs", "p99 µs"
    );
    for r in &rows {
        println!(
            "  {:<40} {:>11} {:>10.0} {:>9.0} {:>9.0}  {}",
            r.what,
            fmt_bw(r.m.bw_bytes),
            r.m.iops,
            r.m.p50_us,
            r.m.p99_us,
            match r.verified {
                Some(true) => "ok",
                Some(false) => "FAILED",
                None => "-",
            }
        );
    }
    println!();
    println!("  erasure code          {} over {} D-nodes", a.ec, a.dnodes);
    println!("  raw-to-usable         {}", field("raw-to-usable"));
    println!("  stored                {}", field("stored (data)"));
    println!(
        "  degraded read         {} ({} of healthy read bandwidth)",
        if degraded_ok {
            "all data correct with 2 D-nodes down"
        } else {
            "FAILED"
        },
        ratio
            .map(|r| format!("{:.0}%", r * 100.0))
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "  total time            {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    if !degraded_ok {
        bail!("reading with 2 D-nodes down failed");
    }
    Ok(())
}
