//! `dase cluster up|down`: a cluster of D-node processes on this machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dase_initiator::cnode::{ClusterFile, DNodeSpec};

#[derive(clap::Args)]
#[command(
    about = "Start or stop a cluster of D-nodes on this machine (loopback, sparse backing files)"
)]
pub struct Args {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Start D-node processes on loopback ports with backing files under DIR and
    /// write DIR/cluster.toml. Existing backing files are reused (their data kept).
    #[command(after_help = "Example:\n  dase cluster up --dir /tmp/dase --dnodes 13 --size 2G")]
    Up {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 13)]
        dnodes: usize,
        /// Size of each D-node's namespace (created sparse).
        #[arg(long, default_value = "2G")]
        size: String,
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Cluster name, part of every D-node's NQN (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Stop the D-nodes started by `up` (SIGTERM: each flushes and exits); data stays.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
}

const PIDS: &str = "cluster.pids";

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn read_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join(PIDS))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

pub fn run(a: Args) -> Result<()> {
    match a.cmd {
        Sub::Up {
            dir,
            dnodes,
            size,
            block_size,
            name,
        } => up(&dir, dnodes, &size, block_size, name),
        Sub::Down { dir } => down(&dir),
    }
}

fn nqn_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

fn up(dir: &Path, n: usize, size: &str, block_size: u32, name: Option<String>) -> Result<()> {
    if n == 0 || n > 256 {
        bail!("--dnodes must be 1 to 256");
    }
    dase_target::parse_size(size).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if read_pids(&dir).into_iter().any(alive) {
        bail!(
            "a cluster is already running from {}; stop it with: dase cluster down --dir {}",
            dir.display(),
            dir.display()
        );
    }
    let name = nqn_safe(&name.unwrap_or_else(|| {
        dir.file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or("cluster".into())
    }));
    let exe = std::env::current_exe()?;
    // More D-nodes than cores (one machine standing in for many): polling
    // and extra worker threads only steal CPU from the other D-nodes.
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let tuning: Vec<&str> = if n > cores {
        vec!["--poll-us", "0", "--threads", "1"]
    } else {
        vec![]
    };
    let mut pids = Vec::new();
    let mut specs = Vec::new();
    let stop_all = |pids: &[i32]| {
        for &p in pids {
            // SAFETY: sending a signal to a child we started.
            unsafe { libc::kill(p, libc::SIGTERM) };
        }
    };
    for i in 0..n {
        let img = dir.join(format!("d{i}.img"));
        let out = dir.join(format!("d{i}.out"));
        let _ = std::fs::remove_file(&out);
        let nqn = format!("nqn.2026-11.io.dase:{name}-d{i}");
        let mut cmd = Command::new(&exe);
        cmd.args([
            "dnode",
            "--listen",
            "127.0.0.1:0",
            "--stats-interval",
            "0",
            "--nqn",
            &nqn,
        ])
        .args(&tuning)
        .arg("--namespace")
        .arg(&img)
        .args(["--block-size", &block_size.to_string()]);
        if !img.exists() {
            cmd.args(["--size", size]);
        }
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(dir.join(format!("d{i}.log")))?);
        // Own session: the D-nodes outlive this command and ignore the terminal's Ctrl-C.
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting a D-node")?;
        pids.push(child.id() as i32);
        // The D-node prints its bound address once it listens.
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if let Some(a) = text.lines().find_map(|l| l.strip_prefix("listening on ")) {
                break a.to_string();
            }
            if !alive(child.id() as i32) || Instant::now() > deadline {
                stop_all(&pids);
                let log =
                    std::fs::read_to_string(dir.join(format!("d{i}.log"))).unwrap_or_default();
                bail!(
                    "D-node {i} did not start: {}",
                    log.lines().last().unwrap_or("no output")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        specs.push(DNodeSpec {
            addr,
            nqn,
            nsid: 1,
            domain: format!("d{i}"),
            id: None,
        });
    }
    let file = ClusterFile { dnodes: specs };
    std::fs::write(dir.join("cluster.toml"), file.to_toml())?;
    std::fs::write(
        dir.join(PIDS),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )?;
    println!(
        "{} D-nodes up; cluster file: {}",
        n,
        dir.join("cluster.toml").display()
    );
    println!("stop them with: dase cluster down --dir {}", dir.display());
    Ok(())
}

fn down(dir: &Path) -> Result<()> {
    let pids = read_pids(dir);
    if pids.is_empty() {
        bail!("no cluster started from {} (no {PIDS})", dir.display());
    }
    for &p in &pids {
        // SAFETY: signalling the processes `up` started.
        unsafe { libc::kill(p, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stuck: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    for &p in &stuck {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    std::fs::remove_file(dir.join(PIDS))?;
    if stuck.is_empty() {
        println!(
            "{} D-nodes stopped; their data stays in {}",
            pids.len(),
            dir.display()
        );
    } else {
        println!(
            "{} D-nodes stopped ({} did not exit in 10 s and were killed)",
            pids.len(),
            stuck.len()
        );
    }
    Ok(())
}
