//! The mount lease: one active C-node per file system for now.
//!
//! Every D-node namespace has a lease block at [`LEASE_OFFSET`]. A C-node
//! holds the file system when it holds the lease on a majority of D-nodes.
//! Each block changes only through fused Compare-and-Write against the
//! content just read, so two C-nodes racing for the same block cannot both
//! win it, and two majorities cannot exist at once. The holder renews before
//! expiry; a C-node that dies simply stops renewing, and the lease can be
//! taken over once it has expired.
//!
//! Expiry is wall-clock time of the C-nodes: they must agree on time to
//! well within the lease duration (NTP), as with any lease.
//!
//! Third-party targets without fused Compare-and-Write (Linux's nvmet, for
//! one) cannot grant the lease, and are never written with a racy
//! read-then-write instead. They simply do not count towards the majority,
//! which is still taken out of all N D-nodes, so any two majorities still
//! share a D-node that arbitrates. When such targets keep a majority out of
//! reach, leasing fails with `Unsupported`: the file system cannot then be
//! protected against a second mount.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::cluster::Cluster;
use crate::host::{join_all, HostError};
use dase_protocol::nvme::sct;

/// Byte offset of the lease block (after the two superblock copies).
pub const LEASE_OFFSET: u64 = 8192;
const SIZE: usize = 4096;
const MAGIC: [u8; 8] = *b"DASELEAS";

/// On-media lease block, version 1 (4096 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct LeaseBlock {
    magic: [u8; 8],
    version: U32,
    rsvd0: U32,
    fs_uuid: [u8; 16],
    /// Random per mount; all zero when free.
    holder: [u8; 16],
    /// Unix milliseconds after which the lease is free for the taking.
    expires_ms: U64,
    generation: U64,
    /// Who holds it, for error messages: "host pid N".
    desc: [u8; 64],
    rsvd1: [u8; 3964],
    crc: U32,
}

const _: () = assert!(size_of::<LeaseBlock>() == SIZE);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl LeaseBlock {
    fn parse(b: &[u8]) -> Option<Self> {
        let l = LeaseBlock::read_from_bytes(b.get(..SIZE)?).ok()?;
        (l.magic == MAGIC && crc32c::crc32c(&b[..SIZE - 4]) == l.crc.get()).then_some(l)
    }

    fn seal(mut self) -> Self {
        self.crc = U32::new(crc32c::crc32c(&self.as_bytes()[..SIZE - 4]));
        self
    }

    fn desc(&self) -> String {
        dase_protocol::admin::get_str(&self.desc)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the file system is mounted by {holder}; its lease expires in {}s (a second mount is refused until then)", .expires_in.as_secs())]
    Held {
        holder: String,
        expires_in: Duration,
    },
    #[error("lease not acquired: only {got} of {needed} D-nodes granted it ({detail})")]
    NoQuorum {
        got: usize,
        needed: usize,
        detail: String,
    },
    #[error("D-node {addr} does not support fused compare-and-write, which the mount lease needs: {error}")]
    Unsupported { addr: String, error: HostError },
}

/// A held (or to-be-held) lease.
pub struct Lease {
    fs_uuid: [u8; 16],
    holder: [u8; 16],
    desc: String,
    ttl: Duration,
}

enum NodeOutcome {
    Granted,
    /// Held by another: its identity, description and expiry.
    HeldBy([u8; 16], String, u64),
    /// The block changed under every attempt: others are racing for it.
    Contended,
    Failed(HostError),
}

impl Lease {
    pub fn new(fs_uuid: [u8; 16], desc: &str, ttl: Duration) -> Self {
        Self {
            fs_uuid,
            holder: super::random_id(),
            desc: desc.to_string(),
            ttl,
        }
    }

    fn block(&self, generation: u64, expires_ms: u64, free: bool) -> Bytes {
        let mut l = LeaseBlock::new_zeroed();
        l.magic = MAGIC;
        l.version = U32::new(1);
        l.fs_uuid = self.fs_uuid;
        if !free {
            l.holder = self.holder;
            dase_protocol::admin::put_cstr(&mut l.desc, &self.desc);
        }
        l.expires_ms = U64::new(expires_ms);
        l.generation = U64::new(generation);
        Bytes::copy_from_slice(l.seal().as_bytes())
    }

    /// One node: take the lease if free, expired or already ours.
    async fn try_node(&self, cluster: &Cluster, i: usize) -> NodeOutcome {
        for _ in 0..4 {
            let cur = match cluster.read(i, LEASE_OFFSET, SIZE).await {
                Ok(b) => b,
                Err(e) => return NodeOutcome::Failed(e),
            };
            let parsed = LeaseBlock::parse(&cur);
            let gen = parsed.map(|l| l.generation.get()).unwrap_or(0);
            if let Some(l) = parsed {
                let free = l.holder == [0; 16];
                if !free && l.holder != self.holder && l.expires_ms.get() > now_ms() {
                    return NodeOutcome::HeldBy(l.holder, l.desc(), l.expires_ms.get());
                }
            }
            let new = self.block(gen + 1, now_ms() + self.ttl.as_millis() as u64, false);
            match cluster.compare_and_write(i, LEASE_OFFSET, cur, new).await {
                Ok(true) => return NodeOutcome::Granted,
                // Someone changed it between our read and our write: look again.
                Ok(false) => continue,
                Err(e) => return NodeOutcome::Failed(e),
            }
        }
        NodeOutcome::Contended
    }
}

/// What one round over all D-nodes found.
struct Round {
    got: usize,
    /// Another holder with a majority of its own, if any.
    holder: Option<(String, u64)>,
    /// Some nodes were held by others but none of them has a majority:
    /// racing acquirers split the nodes; retrying after a backoff resolves it.
    contended: bool,
    failures: Vec<String>,
    unsupported: Option<(String, HostError)>,
}

impl Lease {
    /// Tries every D-node at once.
    async fn round(&self, cluster: &Cluster) -> Round {
        let outcomes = join_all(
            (0..cluster.len()).map(|i| async move { (i, self.try_node(cluster, i).await) }),
        )
        .await;
        let mut r = Round {
            got: 0,
            holder: None,
            contended: false,
            failures: Vec::new(),
            unsupported: None,
        };
        let needed = cluster.len() / 2 + 1;
        let mut others: Vec<([u8; 16], String, u64, usize)> = Vec::new();
        for (i, o) in outcomes {
            let addr = cluster.nodes[i].spec.addr.clone();
            match o {
                NodeOutcome::Granted => r.got += 1,
                NodeOutcome::HeldBy(id, d, exp) => {
                    r.failures.push(format!("{addr}: held by {d}"));
                    match others.iter_mut().find(|o| o.0 == id) {
                        Some(o) => o.3 += 1,
                        None => others.push((id, d, exp, 1)),
                    }
                }
                NodeOutcome::Contended => {
                    r.contended = true;
                    r.failures
                        .push(format!("{addr}: lease block kept changing"));
                }
                NodeOutcome::Failed(e) => {
                    r.failures.push(format!("{addr}: {e}"));
                    // A target without fused compare-and-write refuses the
                    // command itself (Invalid Opcode or Invalid Field).
                    let refused = e
                        .status()
                        .is_some_and(|s| s.sct == sct::GENERIC && (s.sc == 0x01 || s.sc == 0x02));
                    if refused {
                        r.unsupported = Some((addr, e));
                    }
                }
            }
        }
        match others.into_iter().max_by_key(|o| o.3) {
            Some((_, d, exp, n)) if n >= needed => r.holder = Some((d, exp)),
            Some(_) => r.contended = true,
            None => {}
        }
        r
    }

    /// Takes the lease on a majority of the cluster's D-nodes, or explains
    /// who holds it. On failure, whatever was taken is given back.
    pub async fn acquire(&mut self, cluster: &Cluster) -> Result<(), LeaseError> {
        let needed = cluster.len() / 2 + 1;
        let mut attempt = 0u64;
        let r = loop {
            let r = self.round(cluster).await;
            if r.got >= needed {
                return Ok(());
            }
            self.release(cluster).await;
            attempt += 1;
            if !r.contended || attempt >= 8 {
                break r;
            }
            // Racers split the D-nodes: back off a random while, then retry.
            let jitter =
                u64::from_le_bytes(super::random_id()[..8].try_into().unwrap()) % (20 * attempt);
            tokio::time::sleep(Duration::from_millis(5 + jitter)).await;
        };
        if let Some((addr, error)) = r.unsupported {
            return Err(LeaseError::Unsupported { addr, error });
        }
        match r.holder {
            Some((h, exp)) => Err(LeaseError::Held {
                holder: h,
                expires_in: Duration::from_millis(exp.saturating_sub(now_ms())),
            }),
            None if r.contended => Err(LeaseError::NoQuorum {
                got: r.got,
                needed,
                detail: format!(
                    "still contended after {attempt} attempts: {}",
                    r.failures.join("; ")
                ),
            }),
            None => Err(LeaseError::NoQuorum {
                got: r.got,
                needed,
                detail: r.failures.join("; "),
            }),
        }
    }

    /// Extends the lease where held, and takes it where not yet held (a
    /// D-node that came back). Fails when a majority can no longer be kept:
    /// the caller must then stop writing.
    pub async fn renew(&mut self, cluster: &Cluster) -> Result<(), LeaseError> {
        let needed = cluster.len() / 2 + 1;
        let r = self.round(cluster).await;
        if r.got >= needed {
            Ok(())
        } else {
            Err(LeaseError::NoQuorum {
                got: r.got,
                needed,
                detail: r.failures.join("; "),
            })
        }
    }

    /// Gives the lease back on every node where this holder still has it.
    pub async fn release(&mut self, cluster: &Cluster) {
        join_all((0..cluster.len()).map(|i| self.release_node(cluster, i))).await;
    }

    /// Frees node `i`'s lease block if it is still ours. From what is read
    /// there now, not from the copy kept at the last renewal: a renewal
    /// whose completion was lost (a timeout) may still have landed, and a
    /// compare against the older copy would then fail and leave the lease
    /// held until it expires.
    async fn release_node(&self, cluster: &Cluster, i: usize) {
        for _ in 0..4 {
            let Ok(cur) = cluster.read(i, LEASE_OFFSET, SIZE).await else {
                return;
            };
            // Only if it is still ours: a lost lease is not ours to free.
            let Some(l) = LeaseBlock::parse(&cur).filter(|l| l.holder == self.holder) else {
                return;
            };
            let free = self.block(l.generation.get() + 1, 0, true);
            match cluster.compare_and_write(i, LEASE_OFFSET, cur, free).await {
                // Changed between the read and the write: look again.
                Ok(false) => continue,
                _ => return,
            }
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}
