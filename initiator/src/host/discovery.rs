//! Discovery: ask a discovery controller which subsystems it offers.

use std::time::Duration;

use bytes::Bytes;
use dase_protocol::admin::{ConnectData, DiscoveryLogEntry, DiscoveryLogHeader};
use dase_protocol::nvme::{admin_opc, log_id, DISCOVERY_NQN};
use dase_protocol::Sqe;
use zerocopy::FromBytes;

use super::controller::ControllerOptions;
use super::queue::{QueuePair, QueueParams};
use super::HostError;

/// One discovery log record, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEntry {
    pub subnqn: String,
    pub traddr: String,
    pub trsvcid: String,
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub portid: u16,
}

/// Upper bound on records we read: a hostile target cannot make us allocate more.
const MAX_RECORDS: u64 = 1024;

/// Connects to the discovery subsystem at `addr` and reads its log.
pub async fn discover(
    addr: &str,
    opts: &ControllerOptions,
) -> Result<Vec<DiscoveryEntry>, HostError> {
    let t = opts.connect_timeout;
    let q = QueuePair::open(&QueueParams {
        addr: addr.to_string(),
        qid: 0,
        depth: 32,
        hdr_digest: opts.hdr_digest,
        data_digest: opts.data_digest,
        connect_timeout: t,
        inline_max: 8192,
        poll: Duration::ZERO,
    })
    .await?;
    let cd = ConnectData::new(opts.hostid, 0xffff, DISCOVERY_NQN, &opts.hostnqn);
    // No keep-alive: the association lasts one log read.
    q.connect(&cd, 31, 0, t).await?;
    super::controller::enable(&q, addr, t).await?;
    let read = |offset: u64, len: u32| {
        let mut sqe = Sqe::new(admin_opc::GET_LOG_PAGE, 0, 0);
        let numd = len / 4 - 1;
        sqe.cdw10 = (log_id::DISCOVERY as u32 | (numd & 0xffff) << 16).into();
        sqe.cdw11 = (numd >> 16).into();
        sqe.cdw12 = (offset as u32).into();
        sqe.cdw13 = ((offset >> 32) as u32).into();
        let q = &q;
        async move { q.submit(sqe, Bytes::new(), len, t).await?.ok() }
    };
    // Header first for the record count, then the records; retry if the
    // generation changed in between (NVMe-oF 5.3).
    let mut attempts = 0;
    let entries = loop {
        let h = read(0, 1024).await?;
        let hdr = DiscoveryLogHeader::read_from_bytes(&h.data[..]).map_err(|_| {
            HostError::Disconnected(format!("discovery log header is {} bytes", h.data.len()))
        })?;
        let n = hdr.numrec.get().min(MAX_RECORDS);
        let mut entries = Vec::with_capacity(n as usize);
        if n > 0 {
            let body = read(1024, (n * 1024) as u32).await?;
            for chunk in body.data.chunks_exact(1024) {
                let e = DiscoveryLogEntry::read_from_bytes(chunk).expect("chunk is 1024 bytes");
                entries.push(DiscoveryEntry {
                    subnqn: e.subnqn(),
                    traddr: e.traddr(),
                    trsvcid: e.trsvcid(),
                    trtype: e.trtype,
                    adrfam: e.adrfam,
                    subtype: e.subtype,
                    portid: e.portid.get(),
                });
            }
        }
        let again = read(0, 1024).await?;
        let g2 = DiscoveryLogHeader::read_from_bytes(&again.data[..])
            .map(|h| h.genctr.get())
            .unwrap_or(0);
        attempts += 1;
        if g2 == hdr.genctr.get() || attempts >= 3 {
            break entries;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    q.close();
    Ok(entries)
}
