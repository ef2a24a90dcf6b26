//! NVM command set: Read, Write, Flush, Write Zeroes, Dataset Management,
//! Compare, and fused Compare-and-Write.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use dase_protocol::nvme::{fuse, nvm_opc};
use dase_protocol::{Sqe, Status};

use crate::conn::{AsyncDone, Conn, FusedPair};
use crate::subsystem::Namespace;

impl Conn {
    /// Executes an I/O-queue command; `data` holds a data-out command's payload.
    pub(crate) fn io(&mut self, sqe: Sqe, data: Bytes) {
        let cid = sqe.cid.get();
        let r = match sqe.opcode {
            nvm_opc::READ => return self.read(&sqe),
            nvm_opc::WRITE if sqe.fuse() == fuse::SECOND => return self.fused_data(sqe, data),
            nvm_opc::WRITE => self.write(&sqe, &data),
            nvm_opc::COMPARE if sqe.fuse() == fuse::FIRST => return self.fused_data(sqe, data),
            nvm_opc::COMPARE => self.compare(&sqe, &data),
            nvm_opc::FLUSH => return self.flush(&sqe),
            nvm_opc::WRITE_ZEROES => self.write_zeroes(&sqe),
            nvm_opc::DATASET_MANAGEMENT => self.dsm(&sqe, &data),
            _ => Err(Status::INVALID_OPCODE),
        };
        let st = r.err().unwrap_or(Status::SUCCESS);
        if sqe.opcode != nvm_opc::COMPARE || st != Status::COMPARE_FAILURE {
            self.count_io(&sqe, st.is_success());
        }
        self.complete(cid, st, 0, 0);
    }

    fn read(&mut self, sqe: &Sqe) {
        let cid = sqe.cid.get();
        let (ns, offset, len) = match self.check_io(sqe) {
            Ok(v) => v,
            Err(st) => {
                self.count_io(sqe, false);
                return self.complete(cid, st, 0, 0);
            }
        };
        if !sqe.dptr.is_transport() {
            self.count_io(sqe, false);
            return self.complete(cid, Status::SGL_DESCRIPTOR_TYPE_INVALID, 0, 0);
        }
        if sqe.dptr.length.get() as u64 != len {
            self.count_io(sqe, false);
            return self.complete(cid, Status::DATA_SGL_LENGTH_INVALID, 0, 0);
        }
        let success = self.queue.as_ref().is_some_and(|q| q.sq_flow_disabled);
        let rollback = self.out.len();
        let mark = self
            .enc
            .begin_c2h_data(&mut self.out, cid, 0, len as usize, true, success);
        let r = {
            let _shared = ns.atomic.read().unwrap_or_else(|e| e.into_inner());
            ns.backend.read_append(&mut self.out, len as usize, offset)
        };
        match r {
            Ok(()) => {
                self.enc.end_data(&mut self.out, mark);
                ns.counters.record(sqe.opcode, len, true);
                if !success {
                    self.complete(cid, Status::SUCCESS, 0, 0);
                }
            }
            Err(e) => {
                tracing::error!(ns = ns.nsid, offset, error = %e, "read failed");
                self.out.truncate(rollback);
                ns.counters.record(sqe.opcode, len, false);
                self.complete(cid, Status::UNRECOVERED_READ_ERROR, 0, 0);
            }
        }
    }

    /// In-capsule write (R2T'd plain writes go straight to the media as data arrives).
    fn write(&self, sqe: &Sqe, data: &[u8]) -> Result<(), Status> {
        let (ns, offset, len) = self.check_io(sqe)?;
        if data.len() as u64 != len {
            return Err(Status::DATA_SGL_LENGTH_INVALID);
        }
        let _shared = ns.atomic.read().unwrap_or_else(|e| e.into_inner());
        ns.backend.write_at(data, offset).map_err(|e| {
            tracing::error!(ns = ns.nsid, offset, error = %e, "write failed");
            Status::WRITE_FAULT
        })
    }

    fn compare(&self, sqe: &Sqe, data: &[u8]) -> Result<(), Status> {
        let (ns, offset, len) = self.check_io(sqe)?;
        if data.len() as u64 != len {
            return Err(Status::DATA_SGL_LENGTH_INVALID);
        }
        let _shared = ns.atomic.read().unwrap_or_else(|e| e.into_inner());
        compare_range(&ns, offset, data)
    }

    fn write_zeroes(&self, sqe: &Sqe) -> Result<(), Status> {
        let ns = self
            .namespace(sqe.nsid.get())
            .ok_or(Status::INVALID_NAMESPACE)?;
        let (offset, len) = lba_range(&ns, sqe.slba(), sqe.nlb() as u64)?;
        let _shared = ns.atomic.read().unwrap_or_else(|e| e.into_inner());
        ns.backend
            .zero_range(offset, len)
            .map_err(|_| Status::WRITE_FAULT)
    }

    fn dsm(&self, sqe: &Sqe, data: &[u8]) -> Result<(), Status> {
        let ns = self
            .namespace(sqe.nsid.get())
            .ok_or(Status::INVALID_NAMESPACE)?;
        // Attribute Deallocate (AD); integral read/write hints need no action.
        if sqe.cdw11.get() & 0x4 == 0 {
            return Ok(());
        }
        let mut ranges = Vec::with_capacity(data.len() / 16);
        for r in data.chunks_exact(16) {
            let nlb = u32::from_le_bytes(r[4..8].try_into().unwrap()) as u64;
            let slba = u64::from_le_bytes(r[8..16].try_into().unwrap());
            ranges.push(lba_range(&ns, slba, nlb)?);
        }
        let _shared = ns.atomic.read().unwrap_or_else(|e| e.into_inner());
        for (offset, len) in ranges {
            ns.backend
                .deallocate(offset, len)
                .map_err(|_| Status::WRITE_FAULT)?;
        }
        Ok(())
    }

    /// Flush may wait on the device: run it off the connection task and
    /// complete it from there, so other commands keep flowing.
    fn flush(&mut self, sqe: &Sqe) {
        let cid = sqe.cid.get();
        let nsid = sqe.nsid.get();
        let targets: Vec<Arc<Namespace>> = if nsid == 0xffff_ffff {
            self.queue
                .as_ref()
                .and_then(|q| q.ctrl.subsystem())
                .map(|s| s.namespaces.clone())
                .unwrap_or_default()
        } else {
            match self.namespace(nsid) {
                Some(ns) => vec![ns],
                None => return self.complete(cid, Status::INVALID_NAMESPACE, 0, 0),
            }
        };
        for ns in &targets {
            ns.counters.other.fetch_add(1, Relaxed);
        }
        let tx = self.async_tx.clone();
        tokio::task::spawn_blocking(move || {
            let mut status = Status::SUCCESS;
            for ns in &targets {
                if let Err(e) = ns.backend.flush() {
                    tracing::error!(ns = ns.nsid, error = %e, "flush failed");
                    status = Status::WRITE_FAULT;
                }
            }
            let _ = tx.send(AsyncDone { cid, status, nsid });
        });
    }

    /// Collects the data of one half of a fused compare-and-write; executes
    /// the pair once both halves are complete.
    fn fused_data(&mut self, sqe: Sqe, data: Bytes) {
        let cid = sqe.cid.get();
        let Some(pair) = &mut self.fused else {
            // The pair was already broken up (and this half answered).
            return;
        };
        if pair.first.is_some_and(|s| s.cid.get() == cid) && sqe.fuse() == fuse::FIRST {
            pair.first_data = Some(data);
        } else if pair.second.is_some_and(|s| s.cid.get() == cid) {
            pair.second_data = Some(data);
        } else {
            return;
        }
        if pair.first_data.is_none() || pair.second_data.is_none() {
            return;
        }
        let pair = self.fused.take().expect("checked above");
        self.compare_and_write(pair);
    }

    fn compare_and_write(&mut self, pair: FusedPair) {
        let (Some(c), Some(w), Some(cdata), Some(wdata)) =
            (pair.first, pair.second, pair.first_data, pair.second_data)
        else {
            return;
        };
        let (ccid, wcid) = (c.cid.get(), w.cid.get());
        let r = (|| {
            let (ns, offset, len) = self.check_io(&c)?;
            if cdata.len() as u64 != len || wdata.len() as u64 != len {
                return Err(Status::DATA_SGL_LENGTH_INVALID);
            }
            // Exclusive: no other command on this namespace runs between the
            // compare and the write.
            let _excl = ns.atomic.write().unwrap_or_else(|e| e.into_inner());
            compare_range(&ns, offset, &cdata)?;
            ns.backend
                .write_at(&wdata, offset)
                .map_err(|_| Status::WRITE_FAULT)
        })();
        match r {
            Ok(()) => {
                self.count_io(&w, true);
                self.complete(ccid, Status::SUCCESS, 0, 0);
                self.complete(wcid, Status::SUCCESS, 0, 0);
            }
            Err(Status::COMPARE_FAILURE) => {
                self.complete(ccid, Status::COMPARE_FAILURE, 0, 0);
                self.complete(wcid, Status::FAILED_FUSED, 0, 0);
            }
            Err(st) => {
                self.complete(ccid, st, 0, 0);
                self.complete(wcid, Status::FAILED_FUSED, 0, 0);
            }
        }
    }
}

fn lba_range(ns: &Namespace, slba: u64, nlb: u64) -> Result<(u64, u64), Status> {
    match slba.checked_add(nlb) {
        Some(end) if end <= ns.nlbas => Ok((slba << ns.block_shift, nlb << ns.block_shift)),
        _ => Err(Status::LBA_OUT_OF_RANGE),
    }
}

/// Compares the media at `offset` with `data`, a bounded chunk at a time.
fn compare_range(ns: &Namespace, offset: u64, data: &[u8]) -> Result<(), Status> {
    let chunk = data.len().clamp(1, 1 << 20);
    let mut buf = vec![0u8; chunk];
    for (i, want) in data.chunks(chunk).enumerate() {
        let got = &mut buf[..want.len()];
        ns.backend
            .read_at(got, offset + (i * chunk) as u64)
            .map_err(|_| Status::UNRECOVERED_READ_ERROR)?;
        if got != want {
            return Err(Status::COMPARE_FAILURE);
        }
    }
    Ok(())
}
