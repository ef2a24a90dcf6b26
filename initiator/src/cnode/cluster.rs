//! The cluster map: which D-nodes exist (a `cluster.toml`), a connection to
//! each, and whether each is up right now.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dase_erasure::NodeSlot;
use serde::{Deserialize, Serialize};

use crate::host::controller::{fnv1a, FNV_OFFSET};
use crate::host::{Controller, ControllerOptions, HostError, NamespaceInfo};

/// One D-node as the cluster file names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DNodeSpec {
    /// `host:port` of its NVMe/TCP listener.
    pub addr: String,
    pub nqn: String,
    #[serde(default = "one")]
    pub nsid: u32,
    /// Failure-domain label: no two strips of a stripe share one while avoidable.
    #[serde(default)]
    pub domain: String,
    /// Stable placement identity; defaults to a hash of the NQN. A replacement
    /// D-node takes over the identity of the one it replaces.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "placement_id"
    )]
    pub id: Option<u64>,
}

fn one() -> u32 {
    1
}

/// TOML integers are signed 64-bit: an identity is written as a hex
/// string and read back from either form.
mod placement_id {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(v) => s.serialize_str(&format!("{v:#018x}")),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Id {
            Int(u64),
            Str(String),
        }
        match Id::deserialize(d)? {
            Id::Int(v) => Ok(Some(v)),
            Id::Str(s) => {
                let h = s.strip_prefix("0x").unwrap_or(&s);
                u64::from_str_radix(h, 16).map(Some).map_err(|_| {
                    serde::de::Error::custom(format!("placement id '{s}' is not a hex number"))
                })
            }
        }
    }
}

impl DNodeSpec {
    pub fn placement_id(&self) -> u64 {
        self.id
            .unwrap_or_else(|| fnv1a(self.nqn.bytes(), FNV_OFFSET))
    }
}

/// `cluster.toml`: the D-nodes of one cluster, in a fixed order (strip
/// placement refers to them by index).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    #[serde(default, rename = "dnode")]
    pub dnodes: Vec<DNodeSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read cluster file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("invalid cluster file {path}: {error}")]
    Parse { path: String, error: String },
    #[error("invalid cluster file: {0}")]
    Invalid(String),
}

impl ClusterFile {
    pub fn load(path: &Path) -> Result<Self, ClusterError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ClusterError::Read {
            path: p.clone(),
            error,
        })?;
        let f: Self = toml::from_str(&text).map_err(|e| ClusterError::Parse {
            path: p,
            error: e.to_string(),
        })?;
        f.validate()?;
        Ok(f)
    }

    pub fn to_toml(&self) -> String {
        let mut s = String::from("# dase cluster: the D-nodes, in placement order.\n\n");
        s.push_str(&toml::to_string(self).expect("cluster file serializes"));
        s
    }

    pub fn validate(&self) -> Result<(), ClusterError> {
        if self.dnodes.is_empty() {
            return Err(ClusterError::Invalid("no [[dnode]] entries".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.dnodes {
            if !seen.insert((d.addr.clone(), d.nqn.clone(), d.nsid)) {
                return Err(ClusterError::Invalid(format!(
                    "D-node {} {} listed twice",
                    d.addr, d.nqn
                )));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for d in &self.dnodes {
            if !ids.insert(d.placement_id()) {
                return Err(ClusterError::Invalid(format!(
                    "two D-nodes share placement id {:#x}",
                    d.placement_id()
                )));
            }
        }
        Ok(())
    }
}

/// One D-node's live state.
pub struct Node {
    pub spec: DNodeSpec,
    ctrl: tokio::sync::RwLock<Option<Controller>>,
    ns: Mutex<Option<NamespaceInfo>>,
    up: AtomicBool,
    last_try: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
    /// A replacement D-node now serving this slot: (address, NQN).
    replaced_by: Mutex<Option<(String, String)>>,
}

/// Connections to every D-node of a cluster file.
pub struct Cluster {
    pub nodes: Vec<Node>,
    opts: ControllerOptions,
    /// Minimum time between attempts to bring a down node back.
    retry_every: Duration,
}

impl Cluster {
    /// Connects to every D-node at once. Unreachable ones are marked down,
    /// not fatal: callers decide how many they need.
    pub async fn connect(file: &ClusterFile, opts: ControllerOptions) -> Cluster {
        let nodes: Vec<Node> = file
            .dnodes
            .iter()
            .map(|s| Node {
                spec: s.clone(),
                ctrl: tokio::sync::RwLock::new(None),
                ns: Mutex::new(None),
                up: AtomicBool::new(false),
                last_try: Mutex::new(None),
                last_error: Mutex::new(None),
                replaced_by: Mutex::new(None),
            })
            .collect();
        let c = Cluster {
            nodes,
            opts,
            retry_every: Duration::from_millis(500),
        };
        let futs = (0..c.nodes.len()).map(|i| c.try_connect(i));
        crate::host::join_all(futs).await;
        c
    }

    async fn try_connect(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        *n.last_try.lock().unwrap() = Some(Instant::now());
        let (addr, nqn) = self.endpoint(i);
        let r = async {
            let ctrl = Controller::connect(&addr, &nqn, self.opts.clone()).await?;
            let ns = ctrl.namespace(n.spec.nsid).await?;
            Ok::<_, HostError>((ctrl, ns))
        }
        .await;
        match r {
            Ok((ctrl, ns)) => {
                *n.ctrl.write().await = Some(ctrl);
                *n.ns.lock().unwrap() = Some(ns);
                n.up.store(true, Ordering::Release);
                *n.last_error.lock().unwrap() = None;
                true
            }
            Err(e) => {
                // Loud once; a node that stays down is retried quietly.
                if n.last_error.lock().unwrap().is_none() {
                    tracing::warn!(dnode = %addr, error = %e, "D-node unreachable");
                } else {
                    tracing::debug!(dnode = %addr, error = %e, "D-node still unreachable");
                }
                n.up.store(false, Ordering::Release);
                *n.last_error.lock().unwrap() = Some(e.to_string());
                false
            }
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Where slot `i` is served now: the cluster file's D-node, or the
    /// replacement [`Cluster::retarget`] put there.
    pub fn endpoint(&self, i: usize) -> (String, String) {
        let n = &self.nodes[i];
        n.replaced_by
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| (n.spec.addr.clone(), n.spec.nqn.clone()))
    }

    /// Points slot `i` at a replacement D-node and connects to it.
    pub async fn retarget(&self, i: usize, addr: &str, nqn: &str) -> Result<(), HostError> {
        let n = &self.nodes[i];
        n.up.store(false, Ordering::Release);
        *n.replaced_by.lock().unwrap() = Some((addr.to_string(), nqn.to_string()));
        if let Some(old) = n.ctrl.write().await.take() {
            drop(old);
        }
        if self.try_connect(i).await {
            Ok(())
        } else {
            Err(HostError::Disconnected(
                self.last_error(i)
                    .unwrap_or_else(|| format!("cannot reach {addr}")),
            ))
        }
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].up.load(Ordering::Acquire)
    }

    pub fn up_count(&self) -> usize {
        (0..self.len()).filter(|&i| self.is_up(i)).count()
    }

    /// "address (last error)" of every node that is down, for messages.
    pub fn unreachable(&self) -> Vec<String> {
        (0..self.len())
            .filter(|&i| !self.is_up(i))
            .map(|i| {
                format!(
                    "{} ({})",
                    self.endpoint(i).0,
                    self.last_error(i).unwrap_or_default()
                )
            })
            .collect()
    }

    pub fn last_error(&self, i: usize) -> Option<String> {
        self.nodes[i].last_error.lock().unwrap().clone()
    }

    /// The namespace of node `i`, once it has been reached.
    pub fn namespace(&self, i: usize) -> Option<NamespaceInfo> {
        *self.nodes[i].ns.lock().unwrap()
    }

    /// Placement's view of the nodes.
    pub fn slots(&self) -> Vec<NodeSlot> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeSlot {
                id: n.spec.placement_id(),
                domain: n.spec.domain.clone(),
                up: self.is_up(i),
            })
            .collect()
    }

    /// Marks a node down after a transport failure; it is retried later.
    pub fn mark_down(&self, i: usize, why: &HostError) {
        if self.nodes[i].up.swap(false, Ordering::AcqRel) {
            tracing::warn!(dnode = %self.nodes[i].spec.addr, error = %why, "D-node marked down");
        }
        *self.nodes[i].last_error.lock().unwrap() = Some(why.to_string());
    }

    /// Tries to bring back nodes that are down (no more often than every
    /// `retry_every` per node). Returns how many came back.
    pub async fn revive(&self) -> usize {
        let due: Vec<usize> = (0..self.len())
            .filter(|&i| !self.is_up(i))
            .filter(|&i| {
                self.nodes[i]
                    .last_try
                    .lock()
                    .unwrap()
                    .is_none_or(|t| t.elapsed() >= self.retry_every)
            })
            .collect();
        let results = crate::host::join_all(due.iter().map(|&i| async move {
            // An existing controller reconnects in place; otherwise connect anew.
            let reconnected = {
                let g = self.nodes[i].ctrl.read().await;
                match g.as_ref() {
                    Some(c) => c.reconnect().await.is_ok(),
                    None => false,
                }
            };
            *self.nodes[i].last_try.lock().unwrap() = Some(Instant::now());
            if reconnected {
                self.nodes[i].up.store(true, Ordering::Release);
                tracing::info!(dnode = %self.nodes[i].spec.addr, "D-node back");
                true
            } else {
                self.try_connect(i).await
            }
        }))
        .await;
        results.into_iter().filter(|&b| b).count()
    }

    async fn with<T>(
        &self,
        i: usize,
        f: impl AsyncFnOnce(&Controller, &NamespaceInfo) -> Result<T, HostError>,
    ) -> Result<T, HostError> {
        if !self.is_up(i) {
            return Err(HostError::Disconnected(format!(
                "D-node {} is down",
                self.nodes[i].spec.addr
            )));
        }
        let ns = self
            .namespace(i)
            .ok_or_else(|| HostError::Disconnected("namespace unknown".into()))?;
        let g = self.nodes[i].ctrl.read().await;
        let ctrl = g
            .as_ref()
            .ok_or_else(|| HostError::Disconnected("not connected".into()))?;
        let r = f(ctrl, &ns).await;
        if let Err(e) = &r {
            if e.is_transport() {
                self.mark_down(i, e);
            }
        }
        r
    }

    /// Reads `len` bytes at byte `offset` of node `i`'s namespace (block aligned).
    pub async fn read(&self, i: usize, offset: u64, len: usize) -> Result<Bytes, HostError> {
        self.with(i, async |c, ns| {
            let bs = ns.block_size as u64;
            c.read(ns, offset / bs, (len as u64 / bs) as u32).await
        })
        .await
    }

    /// Writes block-aligned `data` at byte `offset` of node `i`'s namespace.
    pub async fn write(&self, i: usize, offset: u64, data: Bytes) -> Result<(), HostError> {
        self.with(i, async |c, ns| {
            c.write(ns, offset / ns.block_size as u64, data).await
        })
        .await
    }

    /// Atomically replaces `expected` with `new` at byte `offset` of node
    /// `i` (fused Compare and Write): `Ok(false)` when the media held
    /// something else and nothing was written.
    pub async fn compare_and_write(
        &self,
        i: usize,
        offset: u64,
        expected: Bytes,
        new: Bytes,
    ) -> Result<bool, HostError> {
        self.with(i, async |c, ns| {
            c.compare_and_write(ns, offset / ns.block_size as u64, expected, new)
                .await
        })
        .await
    }

    /// Makes node `i`'s completed writes durable.
    pub async fn flush(&self, i: usize) -> Result<(), HostError> {
        self.with(i, async |c, ns| c.flush(ns).await).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_files_round_trip_and_reject_duplicates() {
        let f = ClusterFile {
            dnodes: (0..3)
                .map(|i| DNodeSpec {
                    addr: format!("127.0.0.1:{}", 4420 + i),
                    nqn: format!("nqn.2026-11.io.dase:d{i}"),
                    nsid: 1,
                    domain: format!("rack{i}"),
                    id: (i == 1).then_some(u64::MAX - 5),
                })
                .collect(),
        };
        let back: ClusterFile = toml::from_str(&f.to_toml()).unwrap();
        assert_eq!(back, f);
        let mut dup = f.clone();
        dup.dnodes.push(f.dnodes[0].clone());
        assert!(dup.validate().is_err());
        assert!(ClusterFile::default().validate().is_err());
        assert!(toml::from_str::<ClusterFile>("[[dnode]]\naddr='x'\n").is_err());
    }
}
