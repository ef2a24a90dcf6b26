//! One NVMe/TCP queue pair (one TCP connection), host side.
//!
//! Submitters encode capsules straight into a shared send buffer under a
//! short lock; a writer task sends whatever has accumulated with one write,
//! so concurrent submitters share syscalls. A reader task decodes responses
//! and data, answers R2Ts, and wakes the submitter whose command finished.
//! A command slot is indexed by its CID and reused: nothing is allocated per
//! command beyond the data itself.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dase_protocol::admin::ConnectData;
use dase_protocol::nvme::{admin_opc, fctype, SglDescriptor};
use dase_protocol::pdu::{dgst, flags, pda_bytes, Fes, PduType};
use dase_protocol::{
    Cqe, DecodeError, FatalError, Limits, Pdu, PduDecoder, PduEncoder, Role, Sqe, Status, Transfer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use zerocopy::IntoBytes;

use super::HostError;

/// Largest controller-to-host data section we accept in one PDU.
const MAX_C2H_DATA: u32 = 16 << 20;
/// Receive buffer growth step. Each re-allocation copies the partial PDU
/// at the tail along, but a buffer is held by every response slice handed
/// out of it, per queue pair: 256 KiB instead of 2 MiB took the mount's
/// peak RSS at 4 GiB of ingest from 416 to 355 MiB (26 queue pairs) with
/// 128 KiB and 1 MiB reads at the same speed and host CPU.
const READ_CHUNK: usize = 256 << 10;
/// Send buffer capacity: headers and small payloads (larger ones are
/// spliced in, not copied), so it seldom grows past this.
const SEND_BUF: usize = 256 << 10;
/// Payloads of H2CData PDUs at least this long are sent from the caller's
/// buffer by a vectored write; shorter ones are copied (an iovec entry and
/// a reference cost more than copying them).
const SPLICE_MIN: usize = 4096;
/// Iovec entries per `writev` (Linux takes up to 1024).
const IOV_BATCH: usize = 64;

/// A completed command.
#[derive(Clone, Debug)]
pub struct Completion {
    pub status: Status,
    pub dw0: u32,
    pub dw1: u32,
    /// Controller-to-host data; a slice of the receive buffer when it came in one PDU.
    pub data: Bytes,
}

impl Completion {
    /// Turns an error status into an error.
    pub fn ok(self) -> Result<Self, HostError> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(HostError::Status(self.status))
        }
    }
}

#[derive(Default)]
struct Slot {
    busy: bool,
    /// The submitter gave up (timeout, cancellation): free the slot on completion.
    abandoned: bool,
    data_out: Bytes,
    rx: Option<Transfer>,
    rx_one: Option<Bytes>,
    rx_buf: BytesMut,
    /// Some of the command's data failed its digest: complete it with an error.
    bad_digest: bool,
    done: Option<Result<Completion, HostError>>,
    waker: Option<Waker>,
}

struct State {
    out: Outgoing,
    slots: Vec<Slot>,
    free: Vec<u16>,
    failed: Option<HostError>,
}

struct Shared {
    st: Mutex<State>,
    wake_writer: Notify,
    closing: AtomicBool,
    enc: PduEncoder,
    maxh2cdata: u32,
    inline_max: u32,
}

/// Parameters of one queue's connection.
#[derive(Clone, Debug)]
pub struct QueueParams {
    pub addr: String,
    pub qid: u16,
    /// Queue entries; at most `depth - 1` commands are outstanding.
    pub depth: u16,
    pub hdr_digest: bool,
    pub data_digest: bool,
    pub connect_timeout: Duration,
    /// Largest in-capsule data this queue may send (admin: 8 KiB; I/O: from IOCCSZ).
    pub inline_max: u32,
    /// Keep polling the socket this long after traffic before sleeping.
    pub poll: Duration,
}

/// One connected queue.
pub struct QueuePair {
    shared: Arc<Shared>,
    permits: Semaphore,
    qid: u16,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl QueuePair {
    /// Opens the TCP connection and runs ICReq/ICResp; Connect is sent by the caller.
    pub async fn open(p: &QueueParams) -> Result<Self, HostError> {
        let cto = p.connect_timeout;
        let conn_err = |reason: String| HostError::Connect {
            addr: p.addr.clone(),
            reason,
        };
        let mut s = tokio::time::timeout(cto, TcpStream::connect(&p.addr))
            .await
            .map_err(|_| conn_err(format!("no answer within {} ms", cto.as_millis())))?
            .map_err(|e| conn_err(e.to_string()))?;
        let _ = s.set_nodelay(true);

        let mut bits = 0;
        if p.hdr_digest {
            bits |= dgst::HDGST_ENABLE;
        }
        if p.data_digest {
            bits |= dgst::DDGST_ENABLE;
        }
        let mut w = BytesMut::new();
        PduEncoder::default().ic_req(&mut w, 0, bits, 0);
        let mut dec = PduDecoder::new(Role::Host);
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        let ic = tokio::time::timeout(cto, async {
            s.write_all(&w).await.map_err(|e| conn_err(e.to_string()))?;
            loop {
                match dec.decode(&mut rbuf) {
                    Ok(Some(Pdu::IcResp(ic))) => return Ok(ic),
                    Ok(Some(Pdu::TermReq { hdr, .. })) => {
                        return Err(HostError::Terminated {
                            fes: Fes::from_u16(hdr.fes.get()),
                            fei: hdr.fei.get(),
                        })
                    }
                    Ok(Some(_)) => {
                        return Err(HostError::Protocol(FatalError::new(
                            Fes::PduSequenceError,
                            0,
                        )))
                    }
                    Ok(None) => {}
                    Err(DecodeError::Fatal(f)) => return Err(HostError::Protocol(f)),
                    Err(DecodeError::DataDigest(_)) => return Err(HostError::DataDigest),
                }
                if s.read_buf(&mut rbuf)
                    .await
                    .map_err(|e| conn_err(e.to_string()))?
                    == 0
                {
                    return Err(conn_err("target closed the connection during ICReq".into()));
                }
            }
        })
        .await
        .map_err(|_| HostError::Timeout {
            what: "ICResp",
            ms: cto.as_millis() as u64,
        })??;
        if ic.dgst != bits {
            return Err(conn_err(format!(
                "target answered digest bits {:#x} to our {:#x}",
                ic.dgst, bits
            )));
        }
        let enc = PduEncoder {
            hdgst: p.hdr_digest,
            ddgst: p.data_digest,
            pda: pda_bytes(ic.cpda),
        };
        dec.establish(Limits {
            hdgst: p.hdr_digest,
            ddgst: p.data_digest,
            max_data: MAX_C2H_DATA,
            pda: 0,
        });

        let depth = p.depth.max(2);
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                out: Outgoing::default(),
                slots: (0..depth).map(|_| Slot::default()).collect(),
                free: (0..depth).rev().collect(),
                failed: None,
            }),
            wake_writer: Notify::new(),
            closing: AtomicBool::new(false),
            enc,
            maxh2cdata: ic.maxh2cdata.get(),
            inline_max: p.inline_max,
        });
        let (rd, wr) = s.into_split();
        let reader = tokio::spawn(reader(shared.clone(), rd, dec, rbuf, p.poll));
        let writer = tokio::spawn(writer(shared.clone(), wr));
        Ok(Self {
            shared,
            permits: Semaphore::new(depth as usize - 1),
            qid: p.qid,
            tasks: [reader, writer],
        })
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The reason this queue stopped working, if it did.
    pub fn failure(&self) -> Option<HostError> {
        self.shared.st.lock().unwrap().failed.clone()
    }

    /// Sends Fabrics Connect on this queue; returns the controller ID.
    pub async fn connect(
        &self,
        data: &ConnectData,
        sqsize: u16,
        kato_ms: u32,
        timeout: Duration,
    ) -> Result<u16, HostError> {
        let mut sqe = Sqe::new(admin_opc::FABRICS, 0, fctype::CONNECT as u32);
        sqe.cdw10 = ((self.qid as u32) << 16).into();
        // CATTR bit 2: SQ flow control disabled, so the target may use C2HData SUCCESS.
        sqe.cdw11 = (sqsize as u32 | 0x4 << 16).into();
        sqe.cdw12 = kato_ms.into();
        let c = self
            .submit(sqe, Bytes::copy_from_slice(data.as_bytes()), 0, timeout)
            .await?;
        if !c.status.is_success() {
            let detail = if c.status == Status::CONNECT_INVALID_PARAMETERS {
                let (iattr, ipo) = (c.dw0 & 0xff, c.dw0 >> 16);
                format!(
                    " (invalid {} at byte {ipo})",
                    if iattr & 1 != 0 {
                        "connect data"
                    } else {
                        "command field"
                    }
                )
            } else {
                String::new()
            };
            return Err(HostError::ConnectRejected {
                subnqn: dase_protocol::admin::get_str(&data.subnqn),
                status: c.status,
                detail,
            });
        }
        Ok(c.dw0 as u16)
    }

    /// Submits a command. `data_out` is host-to-controller data (sent in the
    /// capsule when it fits, else on R2T); `data_in_len` is the
    /// controller-to-host transfer length. Waits for the completion.
    pub async fn submit(
        &self,
        sqe: Sqe,
        data_out: Bytes,
        data_in_len: u32,
        timeout: Duration,
    ) -> Result<Completion, HostError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| HostError::Disconnected("queue closed".into()))?;
        let cid = self.enqueue(&mut [(sqe, data_out, data_in_len)])?[0];
        self.wait(cid, timeout).await
    }

    /// Submits a fused pair (e.g. Compare + Write) back to back on the wire,
    /// so nothing can be placed between them.
    pub async fn submit_fused(
        &self,
        first: (Sqe, Bytes),
        second: (Sqe, Bytes),
        timeout: Duration,
    ) -> Result<(Completion, Completion), HostError> {
        let _p = self
            .permits
            .acquire_many(2)
            .await
            .map_err(|_| HostError::Disconnected("queue closed".into()))?;
        let cids = self.enqueue(&mut [(first.0, first.1, 0), (second.0, second.1, 0)])?;
        let a = self.wait(cids[0], timeout).await;
        let b = self.wait(cids[1], timeout).await;
        Ok((a?, b?))
    }

    /// Encodes `N` capsules back to back under one lock (no allocation).
    fn enqueue<const N: usize>(
        &self,
        cmds: &mut [(Sqe, Bytes, u32); N],
    ) -> Result<[u16; N], HostError> {
        let sh = &self.shared;
        let mut cids = [0u16; N];
        {
            let mut st = sh.st.lock().unwrap();
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            if st.free.len() < cmds.len() {
                return Err(HostError::Disconnected(
                    "no free command slot (commands abandoned by timeouts)".into(),
                ));
            }
            for (n, (sqe, data_out, data_in_len)) in cmds.iter_mut().enumerate() {
                let cid = st.free.pop().expect("checked above");
                sqe.cid = cid.into();
                let inline = !data_out.is_empty() && data_out.len() <= sh.inline_max as usize;
                sqe.dptr = if inline {
                    SglDescriptor::in_capsule(data_out.len() as u32)
                } else if !data_out.is_empty() {
                    SglDescriptor::transport(data_out.len() as u32)
                } else {
                    SglDescriptor::transport(*data_in_len)
                };
                let State { out, slots, .. } = &mut *st;
                let out = &mut out.bytes;
                let slot = &mut slots[cid as usize];
                *slot = Slot {
                    busy: true,
                    data_out: if inline {
                        Bytes::new()
                    } else {
                        data_out.clone()
                    },
                    rx: (*data_in_len > 0).then(|| Transfer::new(0, *data_in_len)),
                    rx_buf: std::mem::take(&mut slot.rx_buf),
                    ..Slot::default()
                };
                sh.enc
                    .capsule_cmd(out, sqe, if inline { data_out } else { &[] });
                cids[n] = cid;
            }
        }
        sh.wake_writer.notify_one();
        Ok(cids)
    }

    async fn wait(&self, cid: u16, timeout: Duration) -> Result<Completion, HostError> {
        let fut = Wait {
            shared: &self.shared,
            cid,
            finished: false,
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => {
                // An unresponsive target: the queue cannot be trusted any more.
                let e = HostError::Timeout {
                    what: "NVMe command",
                    ms: timeout.as_millis() as u64,
                };
                fail(&self.shared, e.clone());
                Err(e)
            }
        }
    }

    /// Stops the queue's tasks (the TCP connection closes).
    pub fn close(&self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        fail(&self.shared, HostError::Disconnected("queue closed".into()));
        self.shared.wake_writer.notify_one();
    }
}

/// Waits for one command's completion; frees its slot when dropped.
struct Wait<'a> {
    shared: &'a Shared,
    cid: u16,
    finished: bool,
}

impl Future for Wait<'_> {
    type Output = Result<Completion, HostError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.shared.st.lock().unwrap();
        let cid = self.cid as usize;
        if let Some(r) = st.slots[cid].done.take() {
            st.slots[cid].busy = false;
            st.slots[cid].data_out = Bytes::new();
            st.free.push(self.cid);
            drop(st);
            self.finished = true;
            return Poll::Ready(r);
        }
        st.slots[cid].waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut st = self.shared.st.lock().unwrap();
        let slot = &mut st.slots[self.cid as usize];
        if slot.done.is_some() {
            slot.done = None;
            slot.busy = false;
            st.free.push(self.cid);
        } else {
            slot.abandoned = true;
            slot.waker = None;
        }
    }
}

/// Marks the queue failed and completes every outstanding command with `e`.
fn fail(sh: &Shared, e: HostError) {
    let mut st = sh.st.lock().unwrap();
    if st.failed.is_none() {
        st.failed = Some(e.clone());
    }
    let mut freed = Vec::new();
    for (cid, s) in st.slots.iter_mut().enumerate() {
        if s.busy && s.done.is_none() {
            if s.abandoned {
                s.busy = false;
                freed.push(cid as u16);
            } else {
                s.done = Some(Err(e.clone()));
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            }
        }
    }
    st.free.extend(freed);
    drop(st);
    sh.wake_writer.notify_one();
}

/// What the writer sends next: `bytes`, with payloads spliced in at the
/// offsets `spliced` names (each goes on the wire after `bytes[..at]`, in
/// order), so a write's data goes from the caller's buffer to the socket.
struct Outgoing {
    bytes: BytesMut,
    spliced: Vec<(usize, Bytes)>,
}

impl Default for Outgoing {
    fn default() -> Self {
        Self {
            bytes: BytesMut::with_capacity(SEND_BUF),
            spliced: Vec::new(),
        }
    }
}

impl Outgoing {
    fn clear(&mut self) {
        self.bytes.clear();
        self.spliced.clear();
    }

    /// Fills `iov` with the wire's pieces from byte `skip` on; returns how
    /// many it filled (0: all sent).
    fn pieces<'a>(&'a self, mut skip: usize, iov: &mut [IoSlice<'a>]) -> usize {
        let mut from = 0;
        let last = self.spliced.last().map_or(0, |&(at, _)| at);
        let wire = self
            .spliced
            .iter()
            .flat_map(|(at, payload)| {
                let framing = &self.bytes[from..*at];
                from = *at;
                [framing, &payload[..]]
            })
            .chain(std::iter::once(&self.bytes[last..]));
        let mut n = 0;
        for piece in wire {
            if n == iov.len() {
                break;
            }
            if skip >= piece.len() {
                skip -= piece.len();
            } else {
                iov[n] = IoSlice::new(&piece[skip..]);
                skip = 0;
                n += 1;
            }
        }
        n
    }

    /// Sends everything with as few `writev` calls as the socket allows.
    async fn send(&self, wr: &mut OwnedWriteHalf) -> std::io::Result<()> {
        let mut sent = 0;
        let mut iov = [IoSlice::new(&[]); IOV_BATCH];
        loop {
            let n = self.pieces(sent, &mut iov);
            if n == 0 {
                return Ok(());
            }
            match wr.write_vectored(&iov[..n]).await? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                k => sent += k,
            }
        }
    }
}

async fn writer(sh: Arc<Shared>, mut wr: OwnedWriteHalf) {
    let mut sending = Outgoing::default();
    loop {
        sh.wake_writer.notified().await;
        loop {
            {
                let mut st = sh.st.lock().unwrap();
                std::mem::swap(&mut st.out, &mut sending);
            }
            if sending.bytes.is_empty() {
                break;
            }
            if let Err(e) = sending.send(&mut wr).await {
                fail(&sh, HostError::Disconnected(format!("write: {e}")));
                return;
            }
            sending.clear();
        }
        if sh.closing.load(Ordering::Relaxed) || sh.st.lock().unwrap().failed.is_some() {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

async fn reader(
    sh: Arc<Shared>,
    mut rd: OwnedReadHalf,
    mut dec: PduDecoder,
    mut rbuf: BytesMut,
    poll: Duration,
) {
    loop {
        loop {
            let r = match dec.decode(&mut rbuf) {
                Ok(Some(pdu)) => on_pdu(&sh, pdu),
                Ok(None) => break,
                Err(DecodeError::Fatal(f)) => {
                    let n = rbuf.len().min(dase_protocol::pdu::TERM_REQ_MAX_DATA);
                    let offending = rbuf[..n].to_vec();
                    Err((f, offending))
                }
                Err(DecodeError::DataDigest(pdu)) => {
                    on_data_digest_error(&sh, *pdu);
                    Ok(())
                }
            };
            if let Err((f, offending)) = r {
                {
                    let mut st = sh.st.lock().unwrap();
                    sh.enc
                        .term_req(&mut st.out.bytes, PduType::H2CTermReq, f, &offending);
                }
                fail(&sh, HostError::Protocol(f));
                return;
            }
        }
        if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
        // Poll briefly before sleeping (a wake-up costs more than a small I/O).
        if !poll.is_zero() {
            let until = std::time::Instant::now() + poll;
            let mut got = false;
            let mut spins = 0u32;
            // The clock costs more than a spin: look at it every 16.
            while !got && (!spins.is_multiple_of(16) || std::time::Instant::now() < until) {
                spins += 1;
                match rd.try_read_buf(&mut rbuf) {
                    Ok(0) => {
                        return fail(
                            &sh,
                            HostError::Disconnected("target closed the connection".into()),
                        )
                    }
                    Ok(_) => got = true,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        tokio::task::yield_now().await
                    }
                    Err(e) => return fail(&sh, HostError::Disconnected(format!("read: {e}"))),
                }
            }
            if got {
                continue;
            }
        }
        match rd.read_buf(&mut rbuf).await {
            Ok(0) => {
                return fail(
                    &sh,
                    HostError::Disconnected("target closed the connection".into()),
                )
            }
            Ok(_) => {}
            Err(e) => return fail(&sh, HostError::Disconnected(format!("read: {e}"))),
        }
    }
}

fn finish(st: &mut State, cid: u16, r: Result<Completion, HostError>) {
    let slot = &mut st.slots[cid as usize];
    let r = if slot.bad_digest {
        Err(HostError::DataDigest)
    } else {
        r
    };
    if slot.abandoned {
        *slot = Slot {
            rx_buf: std::mem::take(&mut slot.rx_buf),
            ..Slot::default()
        };
        st.free.push(cid);
        return;
    }
    slot.done = Some(r);
    if let Some(w) = slot.waker.take() {
        w.wake();
    }
}

fn take_data(slot: &mut Slot) -> Bytes {
    if let Some(b) = slot.rx_one.take() {
        return b;
    }
    if slot.rx_buf.is_empty() {
        return Bytes::new();
    }
    // Multi-PDU data was gathered into the slot's buffer: hand it over.
    slot.rx_buf.split().freeze()
}

type PduResult = Result<(), (FatalError, Vec<u8>)>;

fn on_pdu(sh: &Shared, pdu: Pdu) -> PduResult {
    use dase_protocol::pdu::data_offset as off;
    let mut st = sh.st.lock().unwrap();
    let nslots = st.slots.len();
    match pdu {
        Pdu::CapsuleResp(cqe) => {
            let cid = cqe.cid.get();
            if cid as usize >= nslots
                || !st.slots[cid as usize].busy
                || st.slots[cid as usize].done.is_some()
            {
                return Err((FatalError::header_field(8 + 12), cqe.as_bytes().to_vec()));
            }
            let data = take_data(&mut st.slots[cid as usize]);
            let c = complete_from(&cqe, data);
            finish(&mut st, cid, Ok(c));
        }
        Pdu::C2HData { hdr, data } => {
            let cid = hdr.cccid.get();
            // The offending header, copied only if there is an error to report.
            let hb = || hdr.as_bytes().to_vec();
            let Some(slot) = st
                .slots
                .get_mut(cid as usize)
                .filter(|s| s.busy && s.done.is_none())
            else {
                return Err((FatalError::header_field(off::CCCID), hb()));
            };
            let Some(rx) = slot.rx.as_mut() else {
                return Err((FatalError::header_field(off::CCCID), hb()));
            };
            let datao = hdr.datao.get();
            let complete = rx.accept(datao, hdr.datal.get()).map_err(|f| (f, hb()))?;
            if datao == 0 && complete {
                slot.rx_one = Some(data);
            } else {
                slot.rx_buf.extend_from_slice(&data);
            }
            if hdr.ch.flags & flags::SUCCESS != 0 {
                if !complete {
                    return Err((FatalError::header_field(1), hb()));
                }
                let data = take_data(slot);
                let c = Completion {
                    status: Status::SUCCESS,
                    dw0: 0,
                    dw1: 0,
                    data,
                };
                finish(&mut st, cid, Ok(c));
            }
        }
        Pdu::R2T(r) => {
            let cid = r.cccid.get();
            let hb = || r.as_bytes().to_vec();
            let State { out, slots, .. } = &mut *st;
            let Some(slot) = slots
                .get(cid as usize)
                .filter(|s| s.busy && !s.data_out.is_empty())
            else {
                return Err((FatalError::header_field(off::CCCID), hb()));
            };
            let (o, l) = (r.r2to.get() as usize, r.r2tl.get() as usize);
            if o.checked_add(l).is_none_or(|e| e > slot.data_out.len()) {
                return Err((
                    FatalError::new(Fes::DataTransferOutOfRange, off::DATAO),
                    hb(),
                ));
            }
            let max = sh.maxh2cdata as usize;
            let mut pos = o;
            while pos < o + l {
                let n = (o + l - pos).min(max);
                let last = pos + n == o + l;
                let (ttag, data) = (r.ttag.get(), &slot.data_out[pos..pos + n]);
                if n >= SPLICE_MIN {
                    let m = sh
                        .enc
                        .begin_h2c_data(&mut out.bytes, cid, ttag, pos as u32, n, last);
                    out.spliced
                        .push((out.bytes.len(), slot.data_out.slice(pos..pos + n)));
                    sh.enc.end_spliced_data(&mut out.bytes, m, data);
                } else {
                    sh.enc
                        .h2c_data(&mut out.bytes, cid, ttag, pos as u32, data, last);
                }
                pos += n;
            }
            drop(st);
            sh.wake_writer.notify_one();
        }
        Pdu::TermReq { hdr, .. } => {
            drop(st);
            fail(
                sh,
                HostError::Terminated {
                    fes: Fes::from_u16(hdr.fes.get()),
                    fei: hdr.fei.get(),
                },
            );
        }
        // The decoder admits only controller-to-host PDUs; a second ICResp is a sequence error there.
        _ => return Err((FatalError::new(Fes::PduSequenceError, 0), Vec::new())),
    }
    Ok(())
}

fn on_data_digest_error(sh: &Shared, pdu: Pdu) {
    // The data is bad but the stream is intact: fail just that command.
    if let Pdu::C2HData { hdr, .. } = &pdu {
        let mut st = sh.st.lock().unwrap();
        if let Some(s) = st
            .slots
            .get_mut(hdr.cccid.get() as usize)
            .filter(|s| s.busy && s.done.is_none())
        {
            s.bad_digest = true;
        }
    }
    // Account the data as usual so the transfer and completion stay in step.
    if let Err((f, _)) = on_pdu(sh, pdu) {
        fail(sh, HostError::Protocol(f));
    }
}

fn complete_from(cqe: &Cqe, data: Bytes) -> Completion {
    Completion {
        status: Status::from_word(cqe.status.get()),
        dw0: cqe.dw0.get(),
        dw1: cqe.dw1.get(),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However a short `writev` leaves it, the writer resumes at the next
    /// unsent byte: from every offset, with iovec batches of every size,
    /// the pieces are the rest of the wire in order.
    #[test]
    fn outgoing_pieces_resume_anywhere() {
        let mut o = Outgoing::default();
        let mut wire = Vec::new();
        for (i, len) in [5000usize, 4096, 9000].into_iter().enumerate() {
            let framing = vec![i as u8; 24 + i];
            o.bytes.extend_from_slice(&framing);
            wire.extend_from_slice(&framing);
            let payload: Bytes = (0..len).map(|j| (j * 31 + i) as u8).collect();
            o.spliced.push((o.bytes.len(), payload.clone()));
            wire.extend_from_slice(&payload);
            // A data digest after the payload, on the second only.
            if i == 1 {
                o.bytes.extend_from_slice(&[0xdd; 4]);
                wire.extend_from_slice(&[0xdd; 4]);
            }
        }
        o.bytes.extend_from_slice(b"capsule after");
        wire.extend_from_slice(b"capsule after");
        for batch in [1, 2, 3, IOV_BATCH] {
            for skip in (0..=wire.len())
                .step_by(97)
                .chain([wire.len() - 1, wire.len()])
            {
                let mut got = Vec::new();
                let mut at = skip;
                loop {
                    let mut iov = [IoSlice::new(&[]); IOV_BATCH];
                    let n = o.pieces(at, &mut iov[..batch]);
                    if n == 0 {
                        break;
                    }
                    assert!(iov[..n].iter().all(|s| !s.is_empty()));
                    for s in &iov[..n] {
                        got.extend_from_slice(s);
                        at += s.len();
                    }
                }
                assert_eq!(got, &wire[skip..], "skip {skip}, batch {batch}");
            }
        }
    }
}
