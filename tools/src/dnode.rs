//! `dase dnode`: run a D-node (NVMe/TCP target).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dase_target::{NamespaceConfig, SubsystemConfig, TargetConfig};

#[derive(clap::Args)]
#[command(
    about = "Serve files, block devices or memory as NVMe namespaces over NVMe/TCP",
    long_about = "Serve files, block devices or memory as NVMe namespaces over NVMe/TCP.\n\n\
Each --namespace is a path (a regular file, created sparse with --size when missing, or a block \
device) or the word `memory`. The discovery subsystem (nqn.2014-08.org.nvmexpress.discovery) \
answers on the same listener. Counters are logged every --stats-interval seconds and on SIGUSR1. \
SIGINT/SIGTERM flush every namespace and exit.",
    after_help = "Examples:\n  dase dnode --nqn nqn.2026-11.io.dase:d0 --namespace /tmp/d0.img --size 1G\n  dase dnode --listen 127.0.0.1:0 --nqn nqn.2026-11.io.dase:m --namespace memory --size 256M --block-size 4096\n  dase dnode --config dnode.toml"
)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:4420")]
    listen: Vec<SocketAddr>,
    /// NQN of the subsystem to serve.
    #[arg(long)]
    nqn: Option<String>,
    /// Backing store of a namespace: a file path, a block device, or `memory`. Repeatable; NSIDs count from 1.
    #[arg(long = "namespace", value_name = "PATH")]
    namespaces: Vec<String>,
    /// Size of each namespace created from --namespace (k, M, G, T suffixes). Required for `memory` and new files.
    #[arg(long)]
    size: Option<String>,
    /// Logical block size in bytes: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// Host NQN allowed to connect (repeatable). Without it, any host may connect.
    #[arg(long = "allow-host", value_name = "NQN")]
    allow_hosts: Vec<String>,
    /// Also answer discovery on this port (8009 is the well-known one).
    #[arg(long)]
    discovery_port: Option<u16>,
    /// Seconds between counter logs; 0 turns them off.
    #[arg(long, default_value_t = 60)]
    stats_interval: u64,
    /// TOML configuration; flags above add to it (see `dase_target::config` docs for the format).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Microseconds each connection keeps polling its socket after traffic
    /// before sleeping: trades idle CPU for latency; 0 never polls.
    #[arg(long, default_value_t = 50)]
    poll_us: u64,
    /// Worker threads for the runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn to_config(a: &Args) -> Result<TargetConfig> {
    let mut cfg = match &a.config {
        Some(p) => TargetConfig::from_file(p)?,
        None => TargetConfig {
            listen: vec![],
            discovery_port: None,
            stats_interval_secs: a.stats_interval,
            poll_us: a.poll_us,
            subsystems: vec![],
        },
    };
    if a.config.is_none() || a.listen != vec!["127.0.0.1:4420".parse::<SocketAddr>().unwrap()] {
        cfg.listen = a.listen.clone();
    }
    if a.discovery_port.is_some() {
        cfg.discovery_port = a.discovery_port;
    }
    if a.config.is_none() {
        cfg.stats_interval_secs = a.stats_interval;
        cfg.poll_us = a.poll_us;
    }
    let size = a
        .size
        .as_deref()
        .map(dase_target::parse_size)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    match (&a.nqn, a.namespaces.is_empty()) {
        (Some(nqn), false) => cfg.subsystems.push(SubsystemConfig {
            nqn: nqn.clone(),
            allow_hosts: a.allow_hosts.clone(),
            serial: None,
            namespaces: a
                .namespaces
                .iter()
                .map(|n| NamespaceConfig {
                    path: (n != "memory").then(|| PathBuf::from(n)),
                    memory: n == "memory",
                    size,
                    block_size: a.block_size,
                })
                .collect(),
        }),
        (Some(_), true) => bail!("--nqn needs at least one --namespace"),
        (None, false) => bail!("--namespace needs --nqn"),
        (None, true) if a.config.is_none() => {
            bail!("nothing to serve: give --nqn and --namespace, or --config")
        }
        (None, true) => {}
    }
    Ok(cfg)
}

pub fn run(a: Args) -> Result<()> {
    let cfg = to_config(&a)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let running = dase_target::start(&cfg).await?;
        for s in &running.target.subsystems {
            for ns in &s.namespaces {
                tracing::info!(subsystem = %s.nqn, nsid = ns.nsid, backing = ns.backend.label(),
                    bytes = ns.backend.size(), block_size = ns.block_size, "namespace");
            }
        }
        for b in &running.bound {
            // Machine-readable: scripts and tests read the bound port from here.
            println!("listening on {b}");
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = usr1.recv() => dase_target::log_counters(&running.target),
            }
        }
        tracing::info!("shutting down: flushing namespaces");
        dase_target::flush_all(&running.target);
        Ok::<_, anyhow::Error>(())
    })
}
