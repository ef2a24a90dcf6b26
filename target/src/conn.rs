//! One NVMe/TCP connection (one queue) on the controller side.
//!
//! A single task owns the socket. Each wake-up it reads whatever arrived,
//! decodes and executes every complete PDU, and sends all the resulting PDUs
//! with one write: syscalls are batched per wake-up, not per command. Reads of
//! memory or page-cached data run inline into the send buffer (one copy);
//! only flushes, which may block on the device, leave the task.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use dase_protocol::nvme::{admin_opc, fctype, fuse, nvm_opc, sgl};
use dase_protocol::pdu::{dgst, pda_bytes, DataHeader, PduType};
use dase_protocol::{
    Cqe, DecodeError, FatalError, Limits, Pdu, PduDecoder, PduEncoder, Role, Sqe, Status, Transfer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use zerocopy::little_endian::{U16, U32};
use zerocopy::IntoBytes;

use crate::subsystem::{Controller, Namespace, Target};

/// Largest data section of one H2CData PDU we accept (advertised in ICResp).
pub const MAXH2CDATA: u32 = 256 * 1024;
/// In-capsule data accepted on the admin queue (the Linux host assumes 8 KiB).
pub const ADMIN_INLINE: u32 = 8192;
/// In-capsule data accepted on I/O queues (IOCCSZ = (64 + this) / 16).
pub const IO_INLINE: u32 = 16384;
/// MDTS as a power of two of 4 KiB pages: 4 MiB per command.
pub const MDTS: u8 = 10;
pub const MAX_TRANSFER: u32 = 4096 << MDTS;
/// Maximum queue entries (CAP.MQES is this minus one).
pub const MAX_QUEUE_ENTRIES: u32 = 1024;
/// Send once this much output is batched, even mid-read, to bound memory.
const OUT_HIGH_WATER: usize = 4 << 20;
// Large: each re-allocation copies the partial PDU at the tail along.
const READ_CHUNK: usize = 2 << 20;

/// Where an R2T'd command's data goes as it arrives.
pub(crate) enum Sink {
    /// Plain write: each H2CData goes straight to the media at its offset.
    Direct { ns: Arc<Namespace>, offset: u64 },
    /// Commands that need the whole payload first (compare, fused, connect, DSM).
    Buffer(BytesMut),
}

pub(crate) struct Pending {
    pub sqe: Sqe,
    pub transfer: Transfer,
    pub sink: Sink,
    pub status: Status,
}

/// A fused compare-and-write in assembly: the two halves and their data.
#[derive(Default)]
pub(crate) struct FusedPair {
    pub first: Option<Sqe>,
    pub first_data: Option<Bytes>,
    pub second: Option<Sqe>,
    pub second_data: Option<Bytes>,
}

pub(crate) struct Queue {
    pub ctrl: Arc<Controller>,
    pub qid: u16,
    pub entries: u32,
    pub sqhd: u16,
    /// CATTR bit 2: the host disabled SQ flow control, so C2HData SUCCESS may
    /// stand in for a response capsule.
    pub sq_flow_disabled: bool,
}

/// Completions of work that left the connection task (flushes).
pub(crate) struct AsyncDone {
    pub cid: u16,
    pub status: Status,
    pub nsid: u32,
}

pub(crate) struct Conn {
    pub target: Arc<Target>,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub enc: PduEncoder,
    pub out: BytesMut,
    pub queue: Option<Queue>,
    pub pending: Vec<Option<Pending>>,
    pub free_ttags: Vec<u16>,
    pub fused: Option<FusedPair>,
    pub aers: Vec<u16>,
    pub async_tx: mpsc::UnboundedSender<AsyncDone>,
    /// Set by Disconnect: close after sending what is queued.
    pub close: bool,
    /// Set on the admin queue: the controller dies with this connection.
    pub owns_controller: bool,
}

/// Serves one accepted connection until the host disconnects, the controller
/// dies, or the host sends something fatal.
pub async fn serve(mut stream: TcpStream, target: Arc<Target>) {
    let poll = target.poll;
    let _ = stream.set_nodelay(true);
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    let (async_tx, mut async_rx) = mpsc::unbounded_channel();
    let mut c = Conn {
        target,
        local,
        peer,
        enc: PduEncoder::default(),
        out: BytesMut::with_capacity(READ_CHUNK),
        queue: None,
        pending: Vec::new(),
        free_ttags: Vec::new(),
        fused: None,
        aers: Vec::new(),
        async_tx,
        close: false,
        owns_controller: false,
    };
    let mut dec = PduDecoder::new(Role::Controller);
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    // Replaced by the controller's watch once Connect succeeds.
    let (_never_tx, mut dead) = watch::channel(false);
    let mut watching = false;
    let reason = loop {
        // Execute every complete PDU that has arrived. Every fatal path has
        // queued its TermReq by the time it breaks out here.
        let fatal = loop {
            match dec.decode(&mut rbuf) {
                Ok(Some(pdu)) => {
                    if let Err(f) = c.on_pdu(pdu, &mut dec) {
                        break Some(f);
                    }
                }
                Ok(None) => break None,
                Err(DecodeError::Fatal(f)) => {
                    // The offending PDU is still at the front of the buffer.
                    let n = rbuf.len().min(dase_protocol::pdu::TERM_REQ_MAX_DATA);
                    c.enc
                        .term_req(&mut c.out, PduType::C2HTermReq, f, &rbuf[..n]);
                    break Some(f);
                }
                Err(DecodeError::DataDigest(pdu)) => {
                    if let Err(f) = c.on_data_digest_error(*pdu) {
                        break Some(f);
                    }
                }
            }
            if c.out.len() >= OUT_HIGH_WATER {
                if stream.write_all(&c.out).await.is_err() {
                    return c.teardown();
                }
                c.out.clear();
            }
        };
        if let Some(f) = fatal {
            tracing::warn!(peer = %c.peer, fes = ?f.fes, fei = f.fei, "fatal transport error from host; closing");
            let _ = stream.write_all(&c.out).await;
            let _ = stream.flush().await;
            break "fatal error";
        }
        if !watching {
            if let Some(q) = &c.queue {
                dead = q.ctrl.watch_dead();
                watching = true;
            }
        }
        if !c.out.is_empty() {
            if stream.write_all(&c.out).await.is_err() {
                break "write failed";
            }
            c.out.clear();
        }
        if c.close {
            let _ = stream.flush().await;
            break "disconnect";
        }
        if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
        // Poll briefly before sleeping: waking a sleeping process costs tens
        // of microseconds on a VM, more than a small I/O itself.
        let mut progressed = false;
        if !poll.is_zero() {
            let until = std::time::Instant::now() + poll;
            let mut spins = 0u32;
            loop {
                match stream.try_read_buf(&mut rbuf) {
                    Ok(0) => break,
                    Ok(_) => {
                        progressed = true;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
                if let Ok(done) = async_rx.try_recv() {
                    c.on_async(done);
                    progressed = true;
                    break;
                }
                spins += 1;
                // The clock costs more than a spin: look at it every 16.
                if spins.is_multiple_of(16)
                    && (std::time::Instant::now() >= until || *dead.borrow())
                {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        if !progressed {
            tokio::select! {
                r = stream.read_buf(&mut rbuf) => match r {
                    Ok(0) => break "host closed the connection",
                    Ok(_) => {}
                    Err(_) => break "read failed",
                },
                Some(done) = async_rx.recv() => c.on_async(done),
                _ = dead.changed(), if watching => break "controller torn down",
            }
        }
        // Gather completions that are ready too, so they share the next write.
        while let Ok(done) = async_rx.try_recv() {
            c.on_async(done);
        }
    };
    tracing::debug!(peer = %c.peer, reason, "connection closed");
    c.teardown();
}

impl Conn {
    fn teardown(&mut self) {
        if self.owns_controller {
            if let Some(q) = &self.queue {
                tracing::info!(cntlid = q.ctrl.cntlid, host = %q.ctrl.hostnqn, "controller removed");
                self.target.remove_controller(q.ctrl.cntlid);
            }
        }
    }

    fn on_pdu(&mut self, pdu: Pdu, dec: &mut PduDecoder) -> Result<(), FatalError> {
        match pdu {
            Pdu::IcReq(ic) => {
                let hd = ic.dgst & dgst::HDGST_ENABLE != 0;
                let dd = ic.dgst & dgst::DDGST_ENABLE != 0;
                // Our own data offsets honour the host's alignment request.
                PduEncoder::default().ic_resp(&mut self.out, 0, ic.dgst, MAXH2CDATA);
                self.enc = PduEncoder {
                    hdgst: hd,
                    ddgst: dd,
                    pda: pda_bytes(ic.hpda),
                };
                dec.establish(Limits {
                    hdgst: hd,
                    ddgst: dd,
                    max_data: MAXH2CDATA.max(IO_INLINE),
                    pda: 0,
                });
                Ok(())
            }
            Pdu::TermReq { hdr, .. } => {
                tracing::warn!(peer = %self.peer, fes = hdr.fes.get(), fei = hdr.fei.get(), "host terminated the connection");
                self.close = true;
                Ok(())
            }
            Pdu::CapsuleCmd { sqe, data } => {
                self.on_capsule(sqe, data);
                Ok(())
            }
            Pdu::H2CData { hdr, data } => self
                .on_h2c_data(hdr, data, true)
                .inspect_err(|f| self.term(*f, &hdr)),
            // The decoder admits only host-to-controller PDUs.
            _ => Err(FatalError::header_field(0)).inspect_err(|f| {
                self.enc
                    .term_req(&mut self.out, PduType::C2HTermReq, *f, &[])
            }),
        }
    }

    fn on_data_digest_error(&mut self, pdu: Pdu) -> Result<(), FatalError> {
        tracing::warn!(peer = %self.peer, "data digest error");
        match pdu {
            Pdu::CapsuleCmd { sqe, .. } => {
                self.advance_sqhd();
                self.complete(sqe.cid.get(), Status::TRANSIENT_TRANSPORT_ERROR, 0, 0);
                Ok(())
            }
            Pdu::H2CData { hdr, data } => self
                .on_h2c_data(hdr, data, false)
                .inspect_err(|f| self.term(*f, &hdr)),
            _ => Err(FatalError::header_field(0)).inspect_err(|f| {
                self.enc
                    .term_req(&mut self.out, PduType::C2HTermReq, *f, &[])
            }),
        }
    }

    fn advance_sqhd(&mut self) {
        if let Some(q) = &mut self.queue {
            q.sqhd = ((q.sqhd as u32 + 1) % q.entries) as u16;
        }
    }

    /// Sends a response capsule, recording failures in the error log.
    pub(crate) fn complete(&mut self, cid: u16, status: Status, dw0: u32, dw1: u32) {
        let (sqhd, sqid) = self
            .queue
            .as_ref()
            .map(|q| (q.sqhd, q.qid))
            .unwrap_or((0, 0));
        if !status.is_success() {
            if let Some(q) = &self.queue {
                q.ctrl.record_error(sqid, cid, status, 0, 0);
            }
            tracing::debug!(peer = %self.peer, cid, %status, "command failed");
        }
        let cqe = Cqe {
            dw0: U32::new(dw0),
            dw1: U32::new(dw1),
            sqhd: U16::new(sqhd),
            sqid: U16::new(sqid),
            cid: U16::new(cid),
            status: U16::new(status.to_word()),
        };
        self.enc.capsule_resp(&mut self.out, &cqe);
    }

    /// Returns controller-to-host data for an admin command, then its response.
    pub(crate) fn complete_with_data(&mut self, sqe: &Sqe, data: &[u8], dw0: u32) {
        let cid = sqe.cid.get();
        if !sqe.dptr.is_transport() {
            return self.complete(cid, Status::SGL_DESCRIPTOR_TYPE_INVALID, 0, 0);
        }
        let n = (sqe.dptr.length.get() as usize).min(data.len());
        if n > 0 {
            self.enc
                .c2h_data(&mut self.out, cid, 0, &data[..n], true, false);
        }
        self.complete(cid, Status::SUCCESS, dw0, 0);
    }

    fn on_async(&mut self, d: AsyncDone) {
        if !d.status.is_success() {
            if let Some(ns) = self.namespace(d.nsid) {
                ns.counters
                    .errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.complete(d.cid, d.status, 0, 0);
    }

    pub(crate) fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.queue
            .as_ref()?
            .ctrl
            .subsystem()?
            .namespace(nsid)
            .cloned()
    }

    fn on_capsule(&mut self, sqe: Sqe, data: Bytes) {
        let cid = sqe.cid.get();
        let is_connect = sqe.opcode == admin_opc::FABRICS && sqe.fctype() == fctype::CONNECT;
        let Some(q) = &self.queue else {
            if !is_connect {
                return self.complete(cid, Status::COMMAND_SEQUENCE_ERROR, 0, 0);
            }
            return self.receive_data(sqe, data);
        };
        q.ctrl.touch();
        self.advance_sqhd();
        if is_connect {
            return self.complete(cid, Status::COMMAND_SEQUENCE_ERROR, 0, 0);
        }
        let qid = self.queue.as_ref().map(|q| q.qid).unwrap_or(0);

        // Fused commands must arrive as an adjacent FIRST/SECOND pair.
        let f = sqe.fuse();
        if f == fuse::MASK {
            return self.complete(cid, Status::INVALID_FIELD, 0, 0);
        }
        if let Some(pair) = &self.fused {
            if pair.second.is_none() && f != fuse::SECOND {
                let first = pair.first.map(|s| s.cid.get()).unwrap_or(0);
                self.fused = None;
                self.complete(first, Status::MISSING_FUSED, 0, 0);
            }
        }
        if f != fuse::NONE {
            if qid == 0
                || (f == fuse::FIRST && sqe.opcode != nvm_opc::COMPARE)
                || (f == fuse::SECOND && sqe.opcode != nvm_opc::WRITE)
            {
                return self.complete(cid, Status::INVALID_FIELD, 0, 0);
            }
            if f == fuse::FIRST {
                self.fused = Some(FusedPair {
                    first: Some(sqe),
                    ..Default::default()
                });
            } else {
                match &mut self.fused {
                    Some(p)
                        if p.second.is_none() && p.first.is_some_and(|a| same_range(&a, &sqe)) =>
                    {
                        p.second = Some(sqe)
                    }
                    Some(p) => {
                        let first = p.first.map(|s| s.cid.get()).unwrap_or(0);
                        self.fused = None;
                        self.complete(first, Status::MISSING_FUSED, 0, 0);
                        return self.complete(cid, Status::MISSING_FUSED, 0, 0);
                    }
                    None => return self.complete(cid, Status::MISSING_FUSED, 0, 0),
                }
            }
        }

        let data_out = match sqe.opcode {
            admin_opc::FABRICS => false,
            op if qid > 0 => matches!(
                op,
                nvm_opc::WRITE | nvm_opc::COMPARE | nvm_opc::DATASET_MANAGEMENT
            ),
            _ => false,
        };
        if data_out {
            self.receive_data(sqe, data)
        } else if sqe.opcode == admin_opc::FABRICS {
            self.fabrics(sqe, Bytes::new())
        } else if qid == 0 {
            self.admin(sqe)
        } else {
            self.io(sqe, Bytes::new())
        }
    }

    /// Host-to-controller data: take it from the capsule, or ask for it with an R2T.
    fn receive_data(&mut self, sqe: Sqe, data: Bytes) {
        let cid = sqe.cid.get();
        let len = sqe.dptr.length.get();
        match sqe.dptr.type_subtype {
            sgl::DATA_BLOCK_OFFSET => {
                let inline_max = match &self.queue {
                    Some(q) if q.qid > 0 => IO_INLINE,
                    _ => ADMIN_INLINE,
                };
                if sqe.dptr.addr.get() != 0 {
                    return self.complete(cid, Status::SGL_OFFSET_INVALID, 0, 0);
                }
                if len as usize != data.len() || len > inline_max {
                    return self.complete(cid, Status::DATA_SGL_LENGTH_INVALID, 0, 0);
                }
                self.data_ready(sqe, data)
            }
            sgl::TRANSPORT_DATA_BLOCK | sgl::TRANSPORT_DATA_BLOCK_A => {
                if !data.is_empty() {
                    return self.complete(cid, Status::DATA_SGL_LENGTH_INVALID, 0, 0);
                }
                if len == 0 {
                    return self.data_ready(sqe, Bytes::new());
                }
                // Refuse a bad command before asking for its data.
                let sink = match self.check_data_out(&sqe) {
                    Ok(s) => s,
                    Err(st) => return self.complete(cid, st, 0, 0),
                };
                if self.pending.len() >= MAX_QUEUE_ENTRIES as usize && self.free_ttags.is_empty() {
                    return self.complete(cid, Status::INTERNAL_ERROR, 0, 0);
                }
                let p = Pending {
                    sqe,
                    transfer: Transfer::new(0, len),
                    sink,
                    status: Status::SUCCESS,
                };
                let ttag = match self.free_ttags.pop() {
                    Some(t) => {
                        self.pending[t as usize] = Some(p);
                        t
                    }
                    None => {
                        self.pending.push(Some(p));
                        (self.pending.len() - 1) as u16
                    }
                };
                self.enc.r2t(&mut self.out, cid, ttag, 0, len);
            }
            _ => self.complete(cid, Status::SGL_DESCRIPTOR_TYPE_INVALID, 0, 0),
        }
    }

    /// Validates a data-out command and picks where its R2T'd data will go.
    fn check_data_out(&self, sqe: &Sqe) -> Result<Sink, Status> {
        let len = sqe.dptr.length.get();
        if sqe.opcode == admin_opc::FABRICS {
            return if len as usize == size_of::<dase_protocol::admin::ConnectData>() {
                Ok(Sink::Buffer(BytesMut::with_capacity(len as usize)))
            } else {
                Err(Status::INVALID_FIELD)
            };
        }
        if sqe.opcode == nvm_opc::DATASET_MANAGEMENT {
            let ranges = (sqe.cdw10.get() & 0xff) + 1;
            return if len == ranges * 16 {
                Ok(Sink::Buffer(BytesMut::with_capacity(len as usize)))
            } else {
                Err(Status::DATA_SGL_LENGTH_INVALID)
            };
        }
        let (ns, offset, bytes) = self.check_io(sqe)?;
        if bytes != len as u64 {
            return Err(Status::DATA_SGL_LENGTH_INVALID);
        }
        if sqe.opcode == nvm_opc::WRITE && sqe.fuse() == fuse::NONE {
            Ok(Sink::Direct { ns, offset })
        } else {
            Ok(Sink::Buffer(BytesMut::with_capacity(len as usize)))
        }
    }

    /// Namespace, byte offset and byte length of an NVM I/O command, range-checked.
    pub(crate) fn check_io(&self, sqe: &Sqe) -> Result<(Arc<Namespace>, u64, u64), Status> {
        let ns = self
            .namespace(sqe.nsid.get())
            .ok_or(Status::INVALID_NAMESPACE)?;
        let slba = sqe.slba();
        let nlb = sqe.nlb() as u64;
        match slba.checked_add(nlb) {
            Some(end) if end <= ns.nlbas => {}
            _ => return Err(Status::LBA_OUT_OF_RANGE),
        }
        let bytes = nlb << ns.block_shift;
        if bytes > MAX_TRANSFER as u64 {
            return Err(Status::INVALID_FIELD);
        }
        let offset = slba << ns.block_shift;
        Ok((ns, offset, bytes))
    }

    fn on_h2c_data(
        &mut self,
        hdr: DataHeader,
        data: Bytes,
        digest_ok: bool,
    ) -> Result<(), FatalError> {
        use dase_protocol::pdu::data_offset as off;
        let ttag = hdr.ttag.get() as usize;
        let Some(Some(p)) = self.pending.get_mut(ttag) else {
            return Err(FatalError::header_field(off::TTAG));
        };
        if p.sqe.cid.get() != hdr.cccid.get() {
            return Err(FatalError::header_field(off::CCCID));
        }
        let datao = hdr.datao.get();
        let done = p.transfer.accept(datao, hdr.datal.get())?;
        if !digest_ok {
            p.status = Status::TRANSIENT_TRANSPORT_ERROR;
        }
        match &mut p.sink {
            Sink::Direct { ns, offset } => {
                if p.status.is_success() {
                    let _shared = ns.atomic.read().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = ns.backend.write_at(&data, *offset + datao as u64) {
                        tracing::error!(ns = ns.nsid, error = %e, "write failed");
                        p.status = Status::WRITE_FAULT;
                    }
                }
            }
            Sink::Buffer(b) => b.extend_from_slice(&data),
        }
        if !done {
            return Ok(());
        }
        let p = self.pending[ttag].take().expect("checked above");
        self.free_ttags.push(ttag as u16);
        let cid = p.sqe.cid.get();
        if !p.status.is_success() {
            if p.sqe.fuse() != fuse::NONE {
                self.fail_fused(cid, p.status);
            }
            self.count_io(&p.sqe, false);
            self.complete(cid, p.status, 0, 0);
            return Ok(());
        }
        match p.sink {
            Sink::Direct { ns, .. } => {
                ns.counters
                    .record(p.sqe.opcode, p.sqe.dptr.length.get() as u64, true);
                self.complete(cid, Status::SUCCESS, 0, 0);
            }
            Sink::Buffer(b) => self.data_ready(p.sqe, b.freeze()),
        }
        Ok(())
    }

    /// A data-out command has all its data: execute it.
    fn data_ready(&mut self, sqe: Sqe, data: Bytes) {
        if sqe.opcode == admin_opc::FABRICS {
            self.fabrics(sqe, data)
        } else {
            self.io(sqe, data)
        }
    }

    /// Counts a finished command when its namespace is not at hand.
    pub(crate) fn count_io(&self, sqe: &Sqe, ok: bool) {
        if let Some(ns) = self.namespace(sqe.nsid.get()) {
            ns.counters
                .record(sqe.opcode, (sqe.nlb() as u64) << ns.block_shift, ok);
        }
    }

    pub(crate) fn fail_fused(&mut self, cid: u16, status: Status) {
        // One half failed before execution: the other half is aborted.
        let Some(pair) = self.fused.take() else {
            return;
        };
        for s in [pair.first, pair.second].into_iter().flatten() {
            if s.cid.get() != cid {
                let st = if status == Status::MISSING_FUSED {
                    status
                } else {
                    Status::FAILED_FUSED
                };
                self.complete(s.cid.get(), st, 0, 0);
            }
        }
    }
}

fn same_range(a: &Sqe, b: &Sqe) -> bool {
    a.nsid.get() == b.nsid.get() && a.slba() == b.slba() && a.nlb() == b.nlb()
}

impl Conn {
    /// Queues a C2HTermReq quoting the data header that broke the rules.
    fn term(&mut self, f: FatalError, h: &DataHeader) {
        self.enc
            .term_req(&mut self.out, PduType::C2HTermReq, f, h.as_bytes());
    }
}
