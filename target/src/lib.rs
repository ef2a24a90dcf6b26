//! dase D-node: an NVMe/TCP target.
//!
//! It serves subsystems whose namespaces are backed by files, block devices
//! or memory, to any NVMe/TCP host (the Linux kernel, SPDK, dase C-nodes).
//! It knows nothing of stripes or files: a C-node sees plain namespaces.
//!
//! - [`config`]: flags and TOML.
//! - [`backend`]: positional I/O on a file, block device or memfd.
//! - [`subsystem`]: subsystems, namespaces, controllers (dynamic model).
//! - `conn`: the per-connection driver around the sans-IO protocol crate.
//! - `admin`, `io`: command handlers.

mod admin;
pub mod backend;
pub mod config;
mod conn;
mod io;
pub mod subsystem;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use backend::{parse_size, Backend, BackendError};
pub use config::{NamespaceConfig, SubsystemConfig, TargetConfig};
pub use subsystem::{Namespace, Subsystem, Target};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("namespace {nsid} of {nqn}: {error}")]
    Backend {
        nqn: String,
        nsid: u32,
        error: BackendError,
    },
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// Opens every namespace's backing store; any failure is reported with its
/// subsystem and namespace before anything listens.
pub fn build_target(cfg: &TargetConfig) -> Result<Target, StartError> {
    cfg.validate()?;
    let mut subsystems = Vec::new();
    for s in &cfg.subsystems {
        let mut namespaces = Vec::new();
        for (i, n) in s.namespaces.iter().enumerate() {
            let nsid = i as u32 + 1;
            let backend = match (&n.path, n.memory) {
                (Some(p), _) => Backend::open(p, n.size, n.block_size),
                (None, _) => Backend::memory(n.size.unwrap_or(0), n.block_size),
            }
            .map_err(|error| StartError::Backend {
                nqn: s.nqn.clone(),
                nsid,
                error,
            })?;
            namespaces.push(Arc::new(Namespace::new(
                nsid,
                backend,
                n.block_size,
                &s.nqn,
            )));
        }
        let serial = s.serial.clone().unwrap_or_else(|| {
            format!(
                "dase{:016x}",
                subsystem::fnv1a(s.nqn.as_bytes(), 0xcbf2_9ce4_8422_2325)
            )
        });
        subsystems.push(Arc::new(Subsystem {
            nqn: s.nqn.clone(),
            serial,
            allow_hosts: s.allow_hosts.clone(),
            namespaces,
        }));
    }
    Ok(Target::new(subsystems, cfg.listen.clone()))
}

/// A running target: its bound listeners (ports resolved when 0 was asked for).
pub struct Running {
    pub target: Arc<Target>,
    pub bound: Vec<SocketAddr>,
}

/// Binds every listener (plus the discovery port if configured) and starts
/// accepting. Returns once all are bound, so callers can print the ports.
pub async fn start(cfg: &TargetConfig) -> Result<Running, StartError> {
    let mut target = build_target(cfg)?;
    let mut listeners = Vec::new();
    let mut bound = Vec::new();
    for addr in &cfg.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|error| StartError::Listen { addr: *addr, error })?;
        bound.push(l.local_addr().unwrap_or(*addr));
        listeners.push(l);
    }
    if let Some(p) = cfg.discovery_port {
        for addr in &cfg.listen {
            let a = SocketAddr::new(addr.ip(), p);
            if bound.contains(&a) {
                continue;
            }
            let l = TcpListener::bind(a)
                .await
                .map_err(|error| StartError::Listen { addr: a, error })?;
            listeners.push(l);
        }
    }
    // The discovery log advertises the ports actually bound.
    target.listen = bound.clone();
    target.poll = Duration::from_micros(cfg.poll_us);
    let target = Arc::new(target);
    for l in listeners {
        let t = target.clone();
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, peer)) => {
                        tracing::debug!(%peer, "connection accepted");
                        tokio::spawn(conn::serve(s, t.clone()));
                    }
                    Err(e) => {
                        // Out of descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    if cfg.stats_interval_secs > 0 {
        let t = target.clone();
        let every = Duration::from_secs(cfg.stats_interval_secs);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                log_counters(&t);
            }
        });
    }
    Ok(Running { target, bound })
}

/// Logs every namespace's counters (also on SIGUSR1).
pub fn log_counters(t: &Target) {
    for s in &t.subsystems {
        for ns in &s.namespaces {
            let [r, w, rb, wb, o, e] = ns.counters.snapshot();
            tracing::info!(
                subsystem = %s.nqn, nsid = ns.nsid, backing = ns.backend.label(),
                reads = r, writes = w, read_bytes = rb, write_bytes = wb, other = o, errors = e,
                "namespace counters"
            );
        }
    }
    tracing::info!(controllers = t.controllers().len(), "controllers");
}

/// Makes every namespace durable; called on shutdown.
pub fn flush_all(t: &Target) {
    for s in &t.subsystems {
        for ns in &s.namespaces {
            if let Err(e) = ns.backend.flush() {
                tracing::error!(subsystem = %s.nqn, nsid = ns.nsid, error = %e, "flush failed");
            }
        }
    }
}
