//! Fabrics (Connect, Property Get/Set, Disconnect) and admin commands.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dase_protocol::admin::*;
use dase_protocol::nvme::{admin_opc, cns, fctype, feature, log_id, prop, DISCOVERY_NQN};
use dase_protocol::{Sqe, Status};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::conn::{Conn, Queue, ADMIN_INLINE, IO_INLINE, MAX_QUEUE_ENTRIES, MDTS};
use crate::subsystem::{Controller, ControllerKind, Target, MAX_AERS, MAX_IO_QUEUES};

/// NVMe version we report: 1.4.
const VERSION: u32 = 0x0001_0400;

/// Connect Invalid Parameters carries where the bad field is: IATTR (0 = in
/// the SQE, 1 = in the Connect data) and the byte offset (IPO).
fn invalid_param(in_data: bool, offset: u16) -> (Status, u32) {
    (
        Status::CONNECT_INVALID_PARAMETERS,
        (offset as u32) << 16 | in_data as u32,
    )
}

impl Conn {
    pub(crate) fn fabrics(&mut self, sqe: Sqe, data: Bytes) {
        let cid = sqe.cid.get();
        match sqe.fctype() {
            fctype::CONNECT => match self.connect(&sqe, &data) {
                Ok(cntlid) => self.complete(cid, Status::SUCCESS, cntlid as u32, 0),
                Err((st, dw0)) => {
                    tracing::info!(peer = %self.peer, %st, "connect refused");
                    self.complete(cid, st, dw0, 0)
                }
            },
            fctype::PROPERTY_GET | fctype::PROPERTY_SET
                if self.queue.as_ref().is_some_and(|q| q.qid != 0) =>
            {
                self.complete(cid, Status::INVALID_FIELD, 0, 0)
            }
            fctype::PROPERTY_GET => match self.property_get(&sqe) {
                Ok(v) => self.complete(cid, Status::SUCCESS, v as u32, (v >> 32) as u32),
                Err(st) => self.complete(cid, st, 0, 0),
            },
            fctype::PROPERTY_SET => {
                let st = self.property_set(&sqe);
                self.complete(cid, st, 0, 0)
            }
            fctype::DISCONNECT => {
                self.complete(cid, Status::SUCCESS, 0, 0);
                self.close = true;
            }
            _ => self.complete(cid, Status::INVALID_OPCODE, 0, 0),
        }
    }

    fn connect(&mut self, sqe: &Sqe, data: &[u8]) -> Result<u16, (Status, u32)> {
        if sqe.connect_recfmt() != 0 {
            return Err((Status::CONNECT_INCOMPATIBLE_FORMAT, 0));
        }
        let cd = ConnectData::read_from_bytes(data).map_err(|_| (Status::INVALID_FIELD, 0))?;
        let qid = sqe.connect_qid();
        let entries = sqe.connect_sqsize() as u32 + 1;
        if !(2..=MAX_QUEUE_ENTRIES).contains(&entries) {
            return Err(invalid_param(false, 44));
        }
        let subnqn = get_str(&cd.subnqn);
        let hostnqn = get_str(&cd.hostnqn);
        if hostnqn.is_empty() {
            return Err(invalid_param(true, 512));
        }
        let kind = if subnqn == DISCOVERY_NQN {
            ControllerKind::Discovery
        } else {
            let s = self
                .target
                .subsystem(&subnqn)
                .ok_or(invalid_param(true, 256))?;
            if !s.allows(&hostnqn) {
                tracing::warn!(host = %hostnqn, subsystem = %subnqn, peer = %self.peer, "host not allowed");
                return Err((Status::CONNECT_INVALID_HOST, 1));
            }
            ControllerKind::Nvm(s.clone())
        };
        let sq_flow_disabled = sqe.cdw11.get() >> 16 & 0x4 != 0;
        let ctrl = if qid == 0 {
            if cd.cntlid.get() != 0xffff {
                // Only the dynamic controller model is offered.
                return Err(invalid_param(true, 16));
            }
            let kato = sqe.connect_kato();
            let ctrl = self
                .target
                .add_controller(|id| Controller::new(id, kind, hostnqn.clone(), cd.hostid, kato))
                .ok_or((Status::CONNECT_CONTROLLER_BUSY, 0))?;
            self.owns_controller = true;
            spawn_keep_alive(self.target.clone(), ctrl.clone());
            tracing::info!(cntlid = ctrl.cntlid, host = %hostnqn, subsystem = %subnqn, peer = %self.peer, kato, "controller created");
            ctrl
        } else {
            let ctrl = self
                .target
                .controller(cd.cntlid.get())
                .ok_or(invalid_param(true, 16))?;
            let same_subsystem = match (&ctrl.kind, &kind) {
                (ControllerKind::Nvm(a), ControllerKind::Nvm(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            if !same_subsystem
                || ctrl.hostnqn != hostnqn
                || ctrl.hostid != cd.hostid
                || !ctrl.enabled()
            {
                return Err(invalid_param(true, 16));
            }
            if qid > ctrl.io_queues.load(Ordering::Relaxed) {
                return Err(invalid_param(false, 42));
            }
            ctrl
        };
        let cntlid = ctrl.cntlid;
        self.queue = Some(Queue {
            ctrl,
            qid,
            entries,
            sqhd: 1 % entries as u16,
            sq_flow_disabled,
        });
        Ok(cntlid)
    }

    fn ctrl(&self) -> &Arc<Controller> {
        &self
            .queue
            .as_ref()
            .expect("admin commands run after connect")
            .ctrl
    }

    fn property_get(&self, sqe: &Sqe) -> Result<u64, Status> {
        let wide = sqe.prop_attrib() & 0x7 == 1;
        let ctrl = self.ctrl();
        let regs = *ctrl.regs.lock().unwrap();
        let v = match (sqe.prop_offset(), wide) {
            (prop::CAP, true) => {
                // MQES, CQR, TO = 15 s (in 500 ms units), CSS = NVM command set.
                (MAX_QUEUE_ENTRIES as u64 - 1) | 1 << 16 | 30 << 24 | 1 << 37
            }
            (prop::CAP, false) => (MAX_QUEUE_ENTRIES as u64 - 1) | 1 << 16 | 30 << 24,
            (prop::VS, false) => VERSION as u64,
            (prop::CC, false) => regs.cc as u64,
            (prop::CSTS, false) => regs.csts as u64,
            _ => return Err(Status::INVALID_FIELD),
        };
        Ok(v)
    }

    fn property_set(&mut self, sqe: &Sqe) -> Status {
        if sqe.prop_offset() != prop::CC || sqe.prop_attrib() & 0x7 != 0 {
            return Status::INVALID_FIELD;
        }
        let cc = sqe.prop_value() as u32;
        let ctrl = self.ctrl().clone();
        let shutdown = {
            let mut r = ctrl.regs.lock().unwrap();
            let was_enabled = r.cc & 1 != 0;
            r.cc = cc;
            if cc & 1 != 0 {
                r.csts |= 1;
            } else if was_enabled {
                // Reset: not ready, shutdown status cleared.
                r.csts = 0;
            }
            let shn = (cc >> 14) & 0x3;
            if shn == 0 {
                r.csts &= !(0x3 << 2);
            }
            shn != 0
        };
        if shutdown {
            if let Some(s) = ctrl.subsystem() {
                for ns in &s.namespaces {
                    if let Err(e) = ns.backend.flush() {
                        tracing::error!(ns = ns.nsid, error = %e, "flush at shutdown failed");
                    }
                }
            }
            let mut r = ctrl.regs.lock().unwrap();
            r.csts = (r.csts & !(0x3 << 2)) | (0x2 << 2);
        }
        Status::SUCCESS
    }

    pub(crate) fn admin(&mut self, sqe: Sqe) {
        let cid = sqe.cid.get();
        let discovery = matches!(self.ctrl().kind, ControllerKind::Discovery);
        match sqe.opcode {
            admin_opc::IDENTIFY => match self.identify(&sqe) {
                Ok(page) => self.complete_with_data(&sqe, &page, 0),
                Err(st) => self.complete(cid, st, 0, 0),
            },
            admin_opc::GET_LOG_PAGE => match self.get_log_page(&sqe) {
                Ok(page) => self.complete_with_data(&sqe, &page, 0),
                Err(st) => self.complete(cid, st, 0, 0),
            },
            admin_opc::SET_FEATURES => match self.set_features(&sqe) {
                Ok(dw0) => self.complete(cid, Status::SUCCESS, dw0, 0),
                Err(st) => self.complete(cid, st, 0, 0),
            },
            admin_opc::GET_FEATURES => match self.get_features(&sqe) {
                Ok(dw0) => self.complete(cid, Status::SUCCESS, dw0, 0),
                Err(st) => self.complete(cid, st, 0, 0),
            },
            admin_opc::KEEP_ALIVE => self.complete(cid, Status::SUCCESS, 0, 0),
            admin_opc::ASYNC_EVENT_REQUEST => {
                // No events are generated while namespaces are static, so the
                // request stays outstanding; it dies with the controller.
                if self.aers.len() >= MAX_AERS {
                    self.complete(cid, Status::AER_LIMIT_EXCEEDED, 0, 0)
                } else {
                    self.aers.push(cid)
                }
            }
            // Commands finish as they arrive, so there is never one to abort:
            // DW0 bit 0 set means "not aborted".
            admin_opc::ABORT if !discovery => self.complete(cid, Status::SUCCESS, 1, 0),
            _ => self.complete(cid, Status::INVALID_OPCODE, 0, 0),
        }
    }

    fn identify(&self, sqe: &Sqe) -> Result<Vec<u8>, Status> {
        let cns = sqe.cdw10.get() as u8;
        let ctrl = self.ctrl();
        let nsid = sqe.nsid.get();
        match (cns, ctrl.subsystem()) {
            (cns::CONTROLLER, s) => Ok(identify_controller(&self.target, ctrl, s.map(|s| &**s))
                .as_bytes()
                .to_vec()),
            (cns::NAMESPACE, Some(s)) => {
                let ns = s.namespace(nsid).ok_or(Status::INVALID_NAMESPACE)?;
                let mut id = IdentifyNamespace::new_zeroed();
                id.nsze = U64::new(ns.nlbas);
                id.ncap = U64::new(ns.nlbas);
                id.nuse = U64::new(ns.nlbas);
                // Deallocated blocks read as zeros; Write Zeroes may deallocate.
                id.dlfeat = 0x09;
                // Shared namespace: many hosts, one media.
                id.nmic = 1;
                id.nguid = ns.nguid;
                id.eui64.copy_from_slice(&ns.nguid[..8]);
                id.lbaf[0].lbads = ns.block_shift as u8;
                Ok(id.as_bytes().to_vec())
            }
            (cns::ACTIVE_NS_LIST, Some(s)) => {
                if nsid >= 0xffff_fffe {
                    return Err(Status::INVALID_NAMESPACE);
                }
                let mut ids: Vec<u32> = s
                    .namespaces
                    .iter()
                    .map(|n| n.nsid)
                    .filter(|&n| n > nsid)
                    .collect();
                ids.sort_unstable();
                let mut page = vec![0u8; 4096];
                for (i, id) in ids.iter().take(1024).enumerate() {
                    page[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                }
                Ok(page)
            }
            (cns::NS_DESCRIPTORS, Some(s)) => {
                let ns = s.namespace(nsid).ok_or(Status::INVALID_NAMESPACE)?;
                let mut page = Vec::with_capacity(4096);
                let mut put = |t: u8, id: &[u8]| {
                    page.extend_from_slice(
                        NsDescriptorHeader {
                            nidt: t,
                            nidl: id.len() as u8,
                            rsvd: [0; 2],
                        }
                        .as_bytes(),
                    );
                    page.extend_from_slice(id);
                };
                put(nidt::NGUID, &ns.nguid);
                // A UUID (v4 layout) derived from the NGUID.
                let mut uuid = ns.nguid;
                uuid[6] = (uuid[6] & 0x0f) | 0x40;
                uuid[8] = (uuid[8] & 0x3f) | 0x80;
                put(nidt::UUID, &uuid);
                put(nidt::CSI, &[0]);
                page.resize(4096, 0);
                Ok(page)
            }
            (_, None) => Err(Status::INVALID_FIELD),
            _ => Err(Status::INVALID_FIELD),
        }
    }

    fn get_log_page(&self, sqe: &Sqe) -> Result<Vec<u8>, Status> {
        let lid = sqe.cdw10.get() as u8;
        let numd = ((sqe.cdw11.get() & 0xffff) << 16 | sqe.cdw10.get() >> 16) as u64 + 1;
        let offset = sqe.cdw12.get() as u64 | (sqe.cdw13.get() as u64) << 32;
        if !offset.is_multiple_of(4) {
            return Err(Status::INVALID_FIELD);
        }
        let ctrl = self.ctrl();
        let page: Vec<u8> = match (lid, &ctrl.kind) {
            (log_id::DISCOVERY, ControllerKind::Discovery) => {
                discovery_log(&self.target, &ctrl.hostnqn, self.local)
            }
            (log_id::ERROR, _) => ctrl
                .error_log()
                .iter()
                .flat_map(|e| e.as_bytes().to_vec())
                .collect(),
            (log_id::SMART, ControllerKind::Nvm(s)) => {
                let mut log = SmartLog::new_zeroed();
                log.temperature = U16::new(300);
                log.avail_spare = 100;
                log.spare_thresh = 10;
                let (mut r, mut w, mut rb, mut wb, mut errs) = (0, 0, 0, 0, 0);
                for ns in &s.namespaces {
                    let [a, b, c, d, _, e] = ns.counters.snapshot();
                    (r, w, rb, wb, errs) = (r + a, w + b, rb + c, wb + d, errs + e);
                }
                // Data units are thousands of 512-byte units, rounded up.
                put_u128(&mut log.data_units_read, (rb / 512).div_ceil(1000));
                put_u128(&mut log.data_units_written, (wb / 512).div_ceil(1000));
                put_u128(&mut log.host_reads, r);
                put_u128(&mut log.host_writes, w);
                put_u128(
                    &mut log.power_on_hours,
                    self.target.started.elapsed().as_secs() / 3600,
                );
                put_u128(&mut log.media_errors, errs);
                put_u128(&mut log.num_err_log_entries, ctrl.error_log().len() as u64);
                log.as_bytes().to_vec()
            }
            (log_id::CHANGED_NS_LIST, ControllerKind::Nvm(_)) => vec![0u8; 4096],
            (log_id::FIRMWARE_SLOT, ControllerKind::Nvm(_)) => {
                let mut p = vec![0u8; 512];
                p[0] = 1;
                p[8..16].copy_from_slice(&fw_rev());
                p
            }
            _ => return Err(Status::INVALID_LOG_PAGE),
        };
        // Return exactly the window asked for, zero-filled past the page's end.
        let want = (numd * 4) as usize;
        let start = (offset as usize).min(page.len());
        let mut out = page[start..].to_vec();
        out.resize(want.min(1 << 20), 0);
        Ok(out)
    }

    fn set_features(&mut self, sqe: &Sqe) -> Result<u32, Status> {
        if sqe.cdw10.get() & (1 << 31) != 0 {
            return Err(Status::FEATURE_NOT_SAVEABLE);
        }
        let ctrl = self.ctrl().clone();
        let v = sqe.cdw11.get();
        let nvm = ctrl.subsystem().is_some();
        match sqe.cdw10.get() as u8 {
            feature::NUMBER_OF_QUEUES if nvm => {
                let (nsq, ncq) = (v & 0xffff, v >> 16);
                if nsq == 0xffff || ncq == 0xffff {
                    return Err(Status::INVALID_FIELD);
                }
                let granted = (nsq.min(ncq) + 1).min(MAX_IO_QUEUES as u32);
                ctrl.io_queues.store(granted as u16, Ordering::Relaxed);
                Ok((granted - 1) | (granted - 1) << 16)
            }
            feature::KEEP_ALIVE_TIMER => {
                ctrl.kato_ms.store(v, Ordering::Relaxed);
                Ok(0)
            }
            feature::ASYNC_EVENT_CONFIG => {
                ctrl.async_event_config.store(v, Ordering::Relaxed);
                Ok(0)
            }
            feature::VOLATILE_WRITE_CACHE if nvm => {
                ctrl.volatile_write_cache
                    .store(v & 1 != 0, Ordering::Relaxed);
                Ok(0)
            }
            feature::ARBITRATION if nvm => Ok(0),
            _ => Err(Status::INVALID_FIELD),
        }
    }

    fn get_features(&self, sqe: &Sqe) -> Result<u32, Status> {
        let ctrl = self.ctrl();
        let sel = (sqe.cdw10.get() >> 8) & 0x7;
        let fid = sqe.cdw10.get() as u8;
        let nvm = ctrl.subsystem().is_some();
        if sel == 3 {
            // Supported capabilities: changeable, not saveable.
            return match fid {
                feature::NUMBER_OF_QUEUES
                | feature::VOLATILE_WRITE_CACHE
                | feature::ARBITRATION
                    if nvm =>
                {
                    Ok(0x4)
                }
                feature::KEEP_ALIVE_TIMER | feature::ASYNC_EVENT_CONFIG => Ok(0x4),
                _ => Err(Status::INVALID_FIELD),
            };
        }
        let default = sel == 1;
        match fid {
            feature::NUMBER_OF_QUEUES if nvm => {
                let n = if default {
                    MAX_IO_QUEUES
                } else {
                    ctrl.io_queues.load(Ordering::Relaxed)
                } as u32
                    - 1;
                Ok(n | n << 16)
            }
            feature::KEEP_ALIVE_TIMER => Ok(if default {
                0
            } else {
                ctrl.kato_ms.load(Ordering::Relaxed)
            }),
            feature::ASYNC_EVENT_CONFIG => Ok(if default {
                0
            } else {
                ctrl.async_event_config.load(Ordering::Relaxed)
            }),
            feature::VOLATILE_WRITE_CACHE if nvm => Ok(if default {
                1
            } else {
                ctrl.volatile_write_cache.load(Ordering::Relaxed) as u32
            }),
            feature::ARBITRATION if nvm => Ok(0),
            _ => Err(Status::INVALID_FIELD),
        }
    }
}

fn fw_rev() -> [u8; 8] {
    let mut f = [b' '; 8];
    put_ascii_padded(&mut f, env!("CARGO_PKG_VERSION"));
    f
}

fn identify_controller(
    target: &Target,
    ctrl: &Controller,
    s: Option<&crate::subsystem::Subsystem>,
) -> IdentifyController {
    let mut id = IdentifyController::new_zeroed();
    let nqn = s.map(|s| s.nqn.as_str()).unwrap_or(DISCOVERY_NQN);
    put_ascii_padded(
        &mut id.sn,
        s.map(|s| s.serial.as_str()).unwrap_or("discovery"),
    );
    put_ascii_padded(&mut id.mn, "dase D-node");
    id.fr = fw_rev();
    id.rab = 6;
    // Several controllers (hosts) may share the subsystem.
    id.cmic = 0x02;
    id.mdts = MDTS;
    id.cntlid = U16::new(ctrl.cntlid);
    id.ver = U32::new(VERSION);
    id.cntrltype = if s.is_some() { 1 } else { 2 };
    id.acl = 3;
    id.aerl = (MAX_AERS - 1) as u8;
    // Log page offset and extended data supported.
    id.lpa = 0x04;
    id.elpe = (crate::subsystem::ERROR_LOG_ENTRIES - 1) as u8;
    // Keep Alive granularity: 100 ms units.
    id.kas = U16::new(1);
    id.sqes = 0x66;
    id.cqes = 0x44;
    id.maxcmd = U16::new(MAX_QUEUE_ENTRIES as u16);
    put_cstr(&mut id.subnqn, nqn);
    // Dynamic controller model; SGLs only.
    id.sgls = U32::new(1 | 1 << 20);
    id.msdbd = 1;
    if let Some(s) = s {
        id.oaes = U32::new(1 << 8);
        id.nn = U32::new(s.max_nsid());
        id.mnan = U32::new(s.max_nsid());
        id.oncs = U16::new(oncs::COMPARE | oncs::DSM | oncs::WRITE_ZEROES);
        // Compare and Write fused operation.
        id.fuses = U16::new(1);
        id.vwc = 1;
        // Compare-and-write is atomic over any length we accept.
        id.acwu = U16::new(0xffff);
        id.ioccsz = U32::new((64 + IO_INLINE) / 16);
        id.iorcsz = U32::new(1);
    } else {
        id.ioccsz = U32::new((64 + ADMIN_INLINE) / 16);
        id.iorcsz = U32::new(1);
    }
    let _ = target;
    id
}

/// The discovery log: one entry per NVM subsystem this host may connect to,
/// on every listener, plus the discovery subsystem itself.
fn discovery_log(target: &Target, hostnqn: &str, local: std::net::SocketAddr) -> Vec<u8> {
    let mut entries = Vec::new();
    let addrs: Vec<std::net::SocketAddr> = target
        .listen
        .iter()
        .map(|a| {
            if a.ip().is_unspecified() {
                std::net::SocketAddr::new(local.ip(), a.port())
            } else {
                *a
            }
        })
        .collect();
    let mut push = |nqn: &str, subtype: u8, addr: &std::net::SocketAddr, portid: u16| {
        let mut e = DiscoveryLogEntry::new_zeroed();
        e.trtype = discovery::TRTYPE_TCP;
        e.adrfam = if addr.is_ipv4() {
            discovery::ADRFAM_IPV4
        } else {
            discovery::ADRFAM_IPV6
        };
        e.subtype = subtype;
        e.treq = discovery::TREQ_NOT_REQUIRED;
        e.portid = U16::new(portid);
        e.cntlid = U16::new(0xffff);
        e.asqsz = U16::new(32);
        put_cstr(&mut e.trsvcid, &addr.port().to_string());
        put_cstr(&mut e.traddr, &addr.ip().to_string());
        put_cstr(&mut e.subnqn, nqn);
        entries.push(e);
    };
    for (i, a) in addrs.iter().enumerate() {
        for s in target.subsystems.iter().filter(|s| s.allows(hostnqn)) {
            push(&s.nqn, discovery::SUBTYPE_NVME, a, i as u16 + 1);
        }
        push(
            DISCOVERY_NQN,
            discovery::SUBTYPE_CURRENT_DISCOVERY,
            a,
            i as u16 + 1,
        );
    }
    let mut hdr = DiscoveryLogHeader::new_zeroed();
    // The generation counter changes only when the configuration does; it is static here.
    hdr.genctr = U64::new(1);
    hdr.numrec = U64::new(entries.len() as u64);
    let mut page = hdr.as_bytes().to_vec();
    for e in &entries {
        page.extend_from_slice(e.as_bytes());
    }
    page
}

/// Tears the controller down when the host stops sending keep-alives.
fn spawn_keep_alive(target: Arc<Target>, ctrl: Arc<Controller>) {
    tokio::spawn(async move {
        let mut dead = ctrl.watch_dead();
        loop {
            let kato = ctrl.kato_ms.load(Ordering::Relaxed);
            let tick = if kato == 0 { 1000 } else { (kato / 4).max(50) };
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(tick as u64)) => {}
                _ = dead.changed() => return,
            }
            if ctrl.is_dead() {
                return;
            }
            // A little slack for timer jitter on a loaded machine.
            if kato != 0 && ctrl.idle_for() > Duration::from_millis(kato as u64 + kato as u64 / 8) {
                tracing::warn!(cntlid = ctrl.cntlid, host = %ctrl.hostnqn, kato_ms = kato, "keep-alive timeout; tearing the controller down");
                target.remove_controller(ctrl.cntlid);
                return;
            }
        }
    });
}
