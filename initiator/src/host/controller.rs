//! A controller association: an admin queue, N I/O queues, keep-alive, and
//! reconnection after the target goes away and comes back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dase_protocol::admin::{ConnectData, IdentifyController, IdentifyNamespace};
use dase_protocol::nvme::{admin_opc, cns, fctype, feature, fuse, nvm_opc, prop};
use dase_protocol::Sqe;
use tokio::sync::Mutex as AsyncMutex;
use zerocopy::{FromBytes, FromZeros};

use super::queue::{Completion, QueuePair, QueueParams};
use super::HostError;

/// How to connect.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub hdr_digest: bool,
    pub data_digest: bool,
    /// I/O queues to ask for (each its own TCP connection); 0 for admin only.
    pub io_queues: u16,
    /// Entries per I/O queue (at most depth - 1 commands in flight each).
    pub queue_depth: u16,
    /// Keep-alive timeout asked of the controller; 0 disables keep-alive.
    pub kato: Duration,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    /// Minimum time between two reconnection attempts.
    pub reconnect_backoff: Duration,
    /// I/O queues keep polling their socket this long after traffic before
    /// sleeping: lower latency for CPU; zero never polls.
    pub poll: Duration,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        Self {
            hostnqn: default_hostnqn(),
            hostid: default_hostid(),
            hdr_digest: false,
            data_digest: false,
            io_queues: 1,
            queue_depth: 128,
            kato: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            reconnect_backoff: Duration::from_millis(500),
            poll: Duration::ZERO,
        }
    }
}

/// A host NQN derived from this machine's identity, stable across runs.
pub fn default_hostnqn() -> String {
    let id = default_hostid();
    let h =
        |r: std::ops::Range<usize>| id[r].iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!(
        "nqn.2014-08.org.nvmexpress:uuid:{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

fn default_hostid() -> [u8; 16] {
    let seed = std::fs::read_to_string("/etc/machine-id").unwrap_or_else(|_| "dase".into());
    let mut id = [0u8; 16];
    let a = fnv1a(seed.trim().bytes(), FNV_OFFSET);
    let b = fnv1a(a.to_le_bytes(), a);
    id[..8].copy_from_slice(&a.to_be_bytes());
    id[8..].copy_from_slice(&b.to_be_bytes());
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// FNV-1a's offset basis: the usual seed.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: a small, stable hash for identities derived from names (host IDs,
/// placement IDs, cluster fingerprints). Not for anything adversarial.
pub(crate) fn fnv1a(bytes: impl IntoIterator<Item = u8>, seed: u64) -> u64 {
    bytes
        .into_iter()
        .fold(seed, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// What a host needs to know of a namespace to address it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub nsid: u32,
    pub block_size: u32,
    pub blocks: u64,
}

impl NamespaceInfo {
    pub fn bytes(&self) -> u64 {
        self.blocks * self.block_size as u64
    }
}

struct Session {
    admin: Arc<QueuePair>,
    io: Vec<Arc<QueuePair>>,
    cntlid: u16,
    id: Box<IdentifyController>,
    keep_alive: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(k) = &self.keep_alive {
            k.abort();
        }
    }
}

impl Session {
    fn failure(&self) -> Option<HostError> {
        self.admin
            .failure()
            .or_else(|| self.io.iter().find_map(|q| q.failure()))
    }
}

/// A connection to one NVMe subsystem on one target, with reconnection.
///
/// Operations use a live session; when a queue fails the session is dropped
/// and the next operation reconnects (no more often than the backoff), so a
/// restarted target is picked up without the caller doing anything.
pub struct Controller {
    addr: String,
    subnqn: String,
    opts: ControllerOptions,
    session: std::sync::Mutex<Option<Arc<Session>>>,
    reconnect: AsyncMutex<Option<Instant>>,
    next_queue: AtomicUsize,
}

impl Controller {
    /// Connects the admin queue and `opts.io_queues` I/O queues.
    pub async fn connect(
        addr: &str,
        subnqn: &str,
        opts: ControllerOptions,
    ) -> Result<Self, HostError> {
        let c = Self {
            addr: addr.to_string(),
            subnqn: subnqn.to_string(),
            opts,
            session: std::sync::Mutex::new(None),
            reconnect: AsyncMutex::new(None),
            next_queue: AtomicUsize::new(0),
        };
        let s = c.establish().await?;
        *c.session.lock().unwrap() = Some(Arc::new(s));
        Ok(c)
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn subnqn(&self) -> &str {
        &self.subnqn
    }

    async fn establish(&self) -> Result<Session, HostError> {
        let o = &self.opts;
        let params = |qid: u16, depth: u16, inline_max: u32| QueueParams {
            addr: self.addr.clone(),
            qid,
            depth,
            hdr_digest: o.hdr_digest,
            data_digest: o.data_digest,
            connect_timeout: o.connect_timeout,
            inline_max,
            // The admin queue carries keep-alives only: never worth polling.
            poll: if qid == 0 { Duration::ZERO } else { o.poll },
        };
        let kato_ms = o.kato.as_millis() as u32;
        let admin = QueuePair::open(&params(0, 32, 8192)).await?;
        let cd = ConnectData::new(o.hostid, 0xffff, &self.subnqn, &o.hostnqn);
        let cntlid = admin.connect(&cd, 31, kato_ms, o.connect_timeout).await?;
        let admin = Arc::new(admin);

        let t = o.connect_timeout;
        enable(&admin, &self.addr, t).await?;
        let id = identify_controller(&admin, t).await?;
        if id.cntlid.get() != cntlid {
            return Err(HostError::Connect {
                addr: self.addr.clone(),
                reason: format!(
                    "identify reports controller {} but connect returned {cntlid}",
                    id.cntlid.get()
                ),
            });
        }
        let keep_alive = (kato_ms > 0).then(|| spawn_keep_alive(admin.clone(), o.kato));

        let mut io = Vec::new();
        if o.io_queues > 0 && id.cntrltype != 2 {
            let mut sqe = Sqe::new(admin_opc::SET_FEATURES, 0, 0);
            sqe.cdw10 = (feature::NUMBER_OF_QUEUES as u32).into();
            let n = o.io_queues as u32 - 1;
            sqe.cdw11 = (n | n << 16).into();
            let c = admin.submit(sqe, Bytes::new(), 0, t).await?.ok()?;
            let granted = ((c.dw0 & 0xffff).min(c.dw0 >> 16) + 1).min(o.io_queues as u32) as u16;
            // In-capsule data: what IOCCSZ allows beyond the 64-byte SQE.
            let inline_max = (id.ioccsz.get().saturating_mul(16)).saturating_sub(64);
            // Connect all I/O queues at once: each is a round trip or two.
            let futs = (1..=granted).map(|qid| {
                let p = params(qid, o.queue_depth.max(2), inline_max);
                // I/O queues join the controller the admin queue created.
                let cd = ConnectData::new(o.hostid, cntlid, &self.subnqn, &o.hostnqn);
                async move {
                    let q = QueuePair::open(&p).await?;
                    q.connect(&cd, p.depth - 1, 0, t).await?;
                    Ok::<_, HostError>(Arc::new(q))
                }
            });
            for r in join_all(futs).await {
                io.push(r?);
            }
        }
        Ok(Session {
            admin,
            io,
            cntlid,
            id: Box::new(id),
            keep_alive,
        })
    }

    /// The live session, reconnecting if the last one failed.
    async fn session(&self) -> Result<Arc<Session>, HostError> {
        if let Some(s) = self.session.lock().unwrap().as_ref() {
            if s.failure().is_none() {
                return Ok(s.clone());
            }
        }
        let mut last = self.reconnect.lock().await;
        // Another task may have reconnected while we waited.
        if let Some(s) = self.session.lock().unwrap().as_ref() {
            if s.failure().is_none() {
                return Ok(s.clone());
            }
        }
        if let Some(t) = *last {
            let since = t.elapsed();
            if since < self.opts.reconnect_backoff {
                return Err(HostError::Disconnected(format!(
                    "{} is unreachable; retrying in {} ms",
                    self.addr,
                    (self.opts.reconnect_backoff - since).as_millis()
                )));
            }
        }
        *last = Some(Instant::now());
        *self.session.lock().unwrap() = None;
        let s = Arc::new(self.establish().await?);
        tracing::info!(addr = %self.addr, subnqn = %self.subnqn, cntlid = s.cntlid, "reconnected");
        *self.session.lock().unwrap() = Some(s.clone());
        Ok(s)
    }

    /// Forces a reconnection now (used after a target restart).
    pub async fn reconnect(&self) -> Result<(), HostError> {
        *self.session.lock().unwrap() = None;
        *self.reconnect.lock().await = None;
        self.session().await.map(|_| ())
    }

    pub async fn cntlid(&self) -> Result<u16, HostError> {
        Ok(self.session().await?.cntlid)
    }

    pub async fn identify(&self) -> Result<IdentifyController, HostError> {
        Ok(*self.session().await?.id)
    }

    /// Number of connected I/O queues.
    pub async fn io_queue_count(&self) -> Result<usize, HostError> {
        Ok(self.session().await?.io.len())
    }

    /// One I/O queue, for callers that want a queue per worker.
    pub async fn io_queue(&self, i: usize) -> Result<Arc<QueuePair>, HostError> {
        let s = self.session().await?;
        if s.io.is_empty() {
            return Err(HostError::InvalidArgument("no I/O queue connected".into()));
        }
        Ok(s.io[i % s.io.len()].clone())
    }

    pub async fn admin(&self, sqe: Sqe, data_in_len: u32) -> Result<Completion, HostError> {
        let s = self.session().await?;
        s.admin
            .submit(sqe, Bytes::new(), data_in_len, self.opts.io_timeout)
            .await?
            .ok()
    }

    pub async fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace, HostError> {
        let mut sqe = Sqe::new(admin_opc::IDENTIFY, 0, nsid);
        sqe.cdw10 = (cns::NAMESPACE as u32).into();
        let c = self.admin(sqe, 4096).await?;
        let mut id = IdentifyNamespace::new_zeroed();
        let n = c.data.len().min(4096);
        zerocopy::IntoBytes::as_mut_bytes(&mut id)[..n].copy_from_slice(&c.data[..n]);
        Ok(id)
    }

    pub async fn active_namespaces(&self) -> Result<Vec<u32>, HostError> {
        let mut sqe = Sqe::new(admin_opc::IDENTIFY, 0, 0);
        sqe.cdw10 = (cns::ACTIVE_NS_LIST as u32).into();
        let c = self.admin(sqe, 4096).await?;
        Ok(c.data
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .take_while(|&n| n != 0)
            .collect())
    }

    pub async fn namespace(&self, nsid: u32) -> Result<NamespaceInfo, HostError> {
        let id = self.identify_namespace(nsid).await?;
        let bs = id.lba_size();
        if id.nsze.get() == 0 || bs == 0 {
            return Err(HostError::InvalidArgument(format!(
                "namespace {nsid} is not active"
            )));
        }
        Ok(NamespaceInfo {
            nsid,
            block_size: bs as u32,
            blocks: id.nsze.get(),
        })
    }

    async fn io(
        &self,
        sqe: Sqe,
        data_out: Bytes,
        data_in_len: u32,
    ) -> Result<Completion, HostError> {
        let q = self.pick_queue().await?;
        q.submit(sqe, data_out, data_in_len, self.opts.io_timeout)
            .await?
            .ok()
    }

    /// Reads `nlb` blocks of `block_size` bytes at `slba`.
    pub async fn read(&self, ns: &NamespaceInfo, slba: u64, nlb: u32) -> Result<Bytes, HostError> {
        let q = self.pick_queue().await?;
        read_on(&q, ns, slba, nlb, self.opts.io_timeout).await
    }

    /// Writes whole blocks at `slba`; `data` must be a multiple of the block size.
    pub async fn write(&self, ns: &NamespaceInfo, slba: u64, data: Bytes) -> Result<(), HostError> {
        let q = self.pick_queue().await?;
        write_on(&q, ns, slba, data, self.opts.io_timeout).await
    }

    async fn pick_queue(&self) -> Result<Arc<QueuePair>, HostError> {
        self.io_queue(self.next_queue.fetch_add(1, Ordering::Relaxed))
            .await
    }

    /// Compares the media with `data`: `Ok(false)` on a mismatch.
    pub async fn compare(
        &self,
        ns: &NamespaceInfo,
        slba: u64,
        data: Bytes,
    ) -> Result<bool, HostError> {
        let nlb = blocks_of(ns, data.len())?;
        let sqe = rw(nvm_opc::COMPARE, ns, slba, nlb)?;
        match self.io(sqe, data, 0).await {
            Ok(_) => Ok(true),
            Err(HostError::Status(s)) if s == dase_protocol::Status::COMPARE_FAILURE => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Atomically writes `new` if the media holds `expected` (fused Compare and
    /// Write). `Ok(false)`: the compare failed and nothing was written.
    pub async fn compare_and_write(
        &self,
        ns: &NamespaceInfo,
        slba: u64,
        expected: Bytes,
        new: Bytes,
    ) -> Result<bool, HostError> {
        if expected.len() != new.len() {
            return Err(HostError::InvalidArgument(
                "compare and write buffers differ in length".into(),
            ));
        }
        let nlb = blocks_of(ns, new.len())?;
        let mut c = rw(nvm_opc::COMPARE, ns, slba, nlb)?;
        c.flags |= fuse::FIRST;
        let mut w = rw(nvm_opc::WRITE, ns, slba, nlb)?;
        w.flags |= fuse::SECOND;
        let s = self.session().await?;
        let q =
            s.io.first()
                .ok_or_else(|| HostError::InvalidArgument("no I/O queue connected".into()))?;
        let (a, b) = q
            .submit_fused((c, expected), (w, new), self.opts.io_timeout)
            .await?;
        if a.status == dase_protocol::Status::COMPARE_FAILURE {
            return Ok(false);
        }
        a.ok()?;
        b.ok()?;
        Ok(true)
    }

    /// Makes completed writes durable.
    pub async fn flush(&self, ns: &NamespaceInfo) -> Result<(), HostError> {
        self.io(Sqe::new(nvm_opc::FLUSH, 0, ns.nsid), Bytes::new(), 0)
            .await
            .map(|_| ())
    }

    pub async fn write_zeroes(
        &self,
        ns: &NamespaceInfo,
        slba: u64,
        nlb: u32,
    ) -> Result<(), HostError> {
        let sqe = rw(nvm_opc::WRITE_ZEROES, ns, slba, nlb)?;
        self.io(sqe, Bytes::new(), 0).await.map(|_| ())
    }

    /// Deallocates (trims) `(slba, nlb)` ranges; they read back as zeros on dase D-nodes.
    pub async fn deallocate(
        &self,
        ns: &NamespaceInfo,
        ranges: &[(u64, u32)],
    ) -> Result<(), HostError> {
        if ranges.is_empty() || ranges.len() > 256 {
            return Err(HostError::InvalidArgument(
                "1 to 256 ranges per deallocate".into(),
            ));
        }
        let mut data = Vec::with_capacity(ranges.len() * 16);
        for &(slba, nlb) in ranges {
            data.extend_from_slice(&0u32.to_le_bytes());
            data.extend_from_slice(&nlb.to_le_bytes());
            data.extend_from_slice(&slba.to_le_bytes());
        }
        let mut sqe = Sqe::new(nvm_opc::DATASET_MANAGEMENT, 0, ns.nsid);
        sqe.cdw10 = (ranges.len() as u32 - 1).into();
        sqe.cdw11 = 0x4.into();
        self.io(sqe, Bytes::from(data), 0).await.map(|_| ())
    }

    /// Orderly shutdown: CC.SHN, then close every queue.
    pub async fn disconnect(&self) -> Result<(), HostError> {
        let s = self.session.lock().unwrap().take();
        let Some(s) = s else { return Ok(()) };
        let t = self.opts.connect_timeout;
        let r = async {
            let cc: u32 = 1 | 1 << 14 | 6 << 16 | 4 << 20;
            s.admin
                .submit(prop_set(prop::CC, cc), Bytes::new(), 0, t)
                .await?
                .ok()?;
            Ok::<_, HostError>(())
        }
        .await;
        for q in &s.io {
            q.close();
        }
        s.admin.close();
        r
    }
}

/// Reads on a given I/O queue (for callers that keep one queue per worker).
pub async fn read_on(
    q: &QueuePair,
    ns: &NamespaceInfo,
    slba: u64,
    nlb: u32,
    timeout: Duration,
) -> Result<Bytes, HostError> {
    let sqe = rw(nvm_opc::READ, ns, slba, nlb)?;
    Ok(q.submit(sqe, Bytes::new(), nlb * ns.block_size, timeout)
        .await?
        .ok()?
        .data)
}

/// Writes on a given I/O queue; `data` must be whole blocks.
pub async fn write_on(
    q: &QueuePair,
    ns: &NamespaceInfo,
    slba: u64,
    data: Bytes,
    timeout: Duration,
) -> Result<(), HostError> {
    let nlb = blocks_of(ns, data.len())?;
    let sqe = rw(nvm_opc::WRITE, ns, slba, nlb)?;
    q.submit(sqe, data, 0, timeout).await?.ok().map(|_| ())
}

fn blocks_of(ns: &NamespaceInfo, len: usize) -> Result<u32, HostError> {
    let bs = ns.block_size as usize;
    if len == 0 || !len.is_multiple_of(bs) || len / bs > 65536 {
        return Err(HostError::InvalidArgument(format!(
            "{len} bytes is not 1 to 65536 whole {bs}-byte blocks"
        )));
    }
    Ok((len / bs) as u32)
}

fn rw(opcode: u8, ns: &NamespaceInfo, slba: u64, nlb: u32) -> Result<Sqe, HostError> {
    if nlb == 0 || nlb > 65536 {
        return Err(HostError::InvalidArgument(format!(
            "{nlb} blocks: 1 to 65536 per command"
        )));
    }
    let mut sqe = Sqe::new(opcode, 0, ns.nsid);
    sqe.set_slba(slba);
    sqe.cdw12 = (nlb - 1).into();
    Ok(sqe)
}

fn prop_set(offset: u32, value: u32) -> Sqe {
    let mut sqe = Sqe::new(admin_opc::FABRICS, 0, fctype::PROPERTY_SET as u32);
    sqe.cdw10 = 0.into();
    sqe.cdw11 = offset.into();
    sqe.cdw12 = value.into();
    sqe
}

pub(crate) fn prop_get(offset: u32, wide: bool) -> Sqe {
    let mut sqe = Sqe::new(admin_opc::FABRICS, 0, fctype::PROPERTY_GET as u32);
    sqe.cdw10 = (wide as u32).into();
    sqe.cdw11 = offset.into();
    sqe
}

/// Sets CC.EN (64-byte SQEs, 16-byte CQEs) and waits for CSTS.RDY. Targets
/// refuse admin commands other than fabrics ones until then.
pub(crate) async fn enable(admin: &QueuePair, addr: &str, t: Duration) -> Result<(), HostError> {
    let cc: u32 = 1 | 6 << 16 | 4 << 20;
    admin
        .submit(prop_set(prop::CC, cc), Bytes::new(), 0, t)
        .await?
        .ok()?;
    let deadline = Instant::now() + t;
    loop {
        let c = admin
            .submit(prop_get(prop::CSTS, false), Bytes::new(), 0, t)
            .await?
            .ok()?;
        if c.dw0 & 1 != 0 {
            return Ok(());
        }
        if c.dw0 & 2 != 0 || Instant::now() > deadline {
            return Err(HostError::Connect {
                addr: addr.to_string(),
                reason: "controller did not become ready".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) async fn identify_controller(
    admin: &QueuePair,
    t: Duration,
) -> Result<IdentifyController, HostError> {
    let mut sqe = Sqe::new(admin_opc::IDENTIFY, 0, 0);
    sqe.cdw10 = (cns::CONTROLLER as u32).into();
    let c = admin.submit(sqe, Bytes::new(), 4096, t).await?.ok()?;
    IdentifyController::read_from_bytes(&c.data[..]).map_err(|_| {
        HostError::Disconnected(format!(
            "identify controller returned {} bytes, not 4096",
            c.data.len()
        ))
    })
}

fn spawn_keep_alive(admin: Arc<QueuePair>, kato: Duration) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(&admin);
    drop(admin);
    tokio::spawn(async move {
        // Well inside the timeout, so one delayed keep-alive does not kill us.
        let every = kato / 3;
        loop {
            tokio::time::sleep(every).await;
            let Some(q) = weak.upgrade() else { return };
            if q.failure().is_some() {
                return;
            }
            if let Err(e) = q
                .submit(Sqe::new(admin_opc::KEEP_ALIVE, 0, 0), Bytes::new(), 0, kato)
                .await
            {
                tracing::warn!(error = %e, "keep-alive failed");
                return;
            }
        }
    })
}

/// Runs all futures concurrently on the current task and returns their
/// outputs in order (tokio has no join_all of its own). Every wake-up polls
/// the unfinished ones: fine for the tens of futures (one per D-node or
/// queue) it is used for.
pub async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futs.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut results: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (slot, result) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(fut) = slot {
                if let std::task::Poll::Ready(v) = fut.as_mut().poll(cx) {
                    *result = Some(v);
                    *slot = None;
                }
            }
        }
        if pending.iter().all(Option::is_none) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| r.expect("every future completed"))
        .collect()
}
