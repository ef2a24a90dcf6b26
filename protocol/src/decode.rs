//! Streaming PDU decoder.
//!
//! Bytes are appended to a `BytesMut` by whoever owns the socket; `decode`
//! takes complete PDUs off its front. A PDU split across many reads waits for
//! the rest; many PDUs in one read come out one call at a time. Every field is
//! checked before any length is trusted, so a hostile peer can neither make us
//! buffer more than the negotiated maximum nor read past a PDU.
//!
//! Data section payloads are handed out as `Bytes` split off the receive
//! buffer: no copy.

use bytes::{Buf, Bytes, BytesMut};
use zerocopy::FromBytes;

use crate::digest::crc32c;
use crate::nvme::{Cqe, Sqe};
use crate::pdu::*;

/// Which end of the connection this decoder serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We are the controller (target): we receive host-to-controller PDUs.
    Controller,
    /// We are the host (initiator): we receive controller-to-host PDUs.
    Host,
}

/// A fatal transport error: the connection must be terminated with a TermReq
/// carrying `fes` and `fei`, then closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("NVMe/TCP fatal error {fes:?} (field info {fei})")]
pub struct FatalError {
    pub fes: Fes,
    pub fei: u32,
}

impl FatalError {
    pub const fn new(fes: Fes, fei: u32) -> Self {
        Self { fes, fei }
    }
    pub const fn header_field(offset: u32) -> Self {
        Self::new(Fes::InvalidHeaderField, offset)
    }
}

/// What can go wrong while decoding.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Terminate the connection.
    #[error(transparent)]
    Fatal(#[from] FatalError),
    /// The PDU was well formed but its data digest did not match. The PDU is
    /// returned so the command it belongs to can be failed and its lengths
    /// still accounted for; the connection may continue.
    #[error("data digest mismatch")]
    DataDigest(Box<Pdu>),
}

/// One decoded PDU.
#[derive(Debug, Clone)]
pub enum Pdu {
    IcReq(IcReq),
    IcResp(IcResp),
    /// H2CTermReq (received by a controller) or C2HTermReq (received by a host).
    TermReq {
        hdr: TermReqHeader,
        data: Bytes,
    },
    CapsuleCmd {
        sqe: Sqe,
        /// In-capsule data, possibly empty.
        data: Bytes,
    },
    CapsuleResp(Cqe),
    H2CData {
        hdr: DataHeader,
        data: Bytes,
    },
    C2HData {
        hdr: DataHeader,
        data: Bytes,
    },
    R2T(R2THeader),
}

impl Pdu {
    pub fn pdu_type(&self) -> PduType {
        match self {
            Pdu::IcReq(_) => PduType::IcReq,
            Pdu::IcResp(_) => PduType::IcResp,
            Pdu::TermReq { hdr, .. } => {
                PduType::from_u8(hdr.ch.pdu_type).unwrap_or(PduType::C2HTermReq)
            }
            Pdu::CapsuleCmd { .. } => PduType::CapsuleCmd,
            Pdu::CapsuleResp(_) => PduType::CapsuleResp,
            Pdu::H2CData { .. } => PduType::H2CData,
            Pdu::C2HData { .. } => PduType::C2HData,
            Pdu::R2T(_) => PduType::R2T,
        }
    }
}

/// Negotiated per-connection parameters that bound decoding.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Header digests are on.
    pub hdgst: bool,
    /// Data digests are on.
    pub ddgst: bool,
    /// Largest data section accepted in one PDU (in-capsule data, H2CData or C2HData).
    pub max_data: u32,
    /// Alignment (bytes) the peer must give PDO; 0 or 4 means none beyond dwords.
    pub pda: u32,
}

impl Limits {
    /// Before ICReq/ICResp: no digests, no data.
    pub const INITIAL: Limits = Limits {
        hdgst: false,
        ddgst: false,
        max_data: 0,
        pda: 0,
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the connection-initialization PDU.
    Init,
    Established,
    /// A fatal error was reported; nothing more is decoded.
    Failed,
}

/// The stream decoder for one connection.
#[derive(Debug)]
pub struct PduDecoder {
    role: Role,
    limits: Limits,
    phase: Phase,
}

impl PduDecoder {
    pub fn new(role: Role) -> Self {
        Self {
            role,
            limits: Limits::INITIAL,
            phase: Phase::Init,
        }
    }

    /// Applies the parameters negotiated by ICReq/ICResp. The driver calls this
    /// after sending (controller) or receiving (host) the ICResp.
    pub fn establish(&mut self, limits: Limits) {
        self.limits = limits;
        self.phase = Phase::Established;
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn expected_init(&self) -> PduType {
        match self.role {
            Role::Controller => PduType::IcReq,
            Role::Host => PduType::IcResp,
        }
    }

    fn accepts(&self, t: PduType) -> bool {
        match self.role {
            Role::Controller => matches!(
                t,
                PduType::IcReq | PduType::H2CTermReq | PduType::CapsuleCmd | PduType::H2CData
            ),
            Role::Host => matches!(
                t,
                PduType::IcResp
                    | PduType::C2HTermReq
                    | PduType::CapsuleResp
                    | PduType::C2HData
                    | PduType::R2T
            ),
        }
    }

    /// Decodes one PDU from the front of `buf`, or returns `Ok(None)` when more
    /// bytes are needed. On a fatal error the decoder stops for good.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Pdu>, DecodeError> {
        if self.phase == Phase::Failed {
            return Ok(None);
        }
        let r = self.decode_inner(buf);
        if let Err(DecodeError::Fatal(_)) = r {
            self.phase = Phase::Failed;
        }
        r
    }

    fn decode_inner(&mut self, buf: &mut BytesMut) -> Result<Option<Pdu>, DecodeError> {
        let Ok((ch, _)) = CommonHeader::read_from_prefix(&buf[..]) else {
            return Ok(None);
        };
        let Some(t) = PduType::from_u8(ch.pdu_type) else {
            return Err(FatalError::header_field(ch_offset::PDU_TYPE).into());
        };
        if !self.accepts(t) {
            return Err(FatalError::header_field(ch_offset::PDU_TYPE).into());
        }
        let is_term = matches!(t, PduType::H2CTermReq | PduType::C2HTermReq);
        match self.phase {
            Phase::Init if t != self.expected_init() && !is_term => {
                return Err(FatalError::new(Fes::PduSequenceError, 0).into())
            }
            Phase::Established if t == self.expected_init() => {
                return Err(FatalError::new(Fes::PduSequenceError, 0).into())
            }
            _ => {}
        }
        let hlen = t.header_len();
        if ch.hlen as usize != hlen {
            return Err(FatalError::header_field(ch_offset::HLEN).into());
        }

        // Digests are present exactly when negotiated, and never on the
        // connection-setup and termination PDUs.
        let digests = t.carries_digests();
        let hd = digests && self.limits.hdgst;
        if (ch.flags & flags::HDGSTF != 0) != hd {
            return Err(FatalError::header_field(ch_offset::FLAGS).into());
        }
        let allowed_flags = match t {
            PduType::H2CData => flags::HDGSTF | flags::DDGSTF | flags::LAST_PDU,
            PduType::C2HData => flags::HDGSTF | flags::DDGSTF | flags::LAST_PDU | flags::SUCCESS,
            _ if digests => flags::HDGSTF | flags::DDGSTF,
            _ => 0,
        };
        if ch.flags & !allowed_flags != 0 {
            return Err(FatalError::header_field(ch_offset::FLAGS).into());
        }
        let header_total = hlen + if hd { DIGEST_LEN } else { 0 };
        let plen = ch.plen.get() as usize;
        if plen < header_total {
            return Err(FatalError::header_field(ch_offset::PLEN).into());
        }

        // Locate the data section and bound it before waiting for it.
        let (data_start, data_len, dd) = if is_term {
            // TermReq data is the offending header and starts right after ours.
            if plen - hlen > TERM_REQ_MAX_DATA {
                return Err(FatalError::header_field(ch_offset::PLEN).into());
            }
            (hlen, plen - hlen, false)
        } else if plen == header_total {
            // No data. Some hosts put a PDO in data-less capsules; ignore it.
            if ch.flags & flags::DDGSTF != 0 {
                return Err(FatalError::header_field(ch_offset::FLAGS).into());
            }
            (plen, 0, false)
        } else {
            if !t.may_carry_data() {
                return Err(FatalError::header_field(ch_offset::PLEN).into());
            }
            let pdo = ch.pdo as usize;
            let pda = self.limits.pda as usize;
            if pdo < header_total || pdo > plen || (pda > 4 && !pdo.is_multiple_of(pda)) {
                return Err(FatalError::header_field(ch_offset::PDO).into());
            }
            let dd = digests && self.limits.ddgst;
            if (ch.flags & flags::DDGSTF != 0) != dd {
                return Err(FatalError::header_field(ch_offset::FLAGS).into());
            }
            let tail = if dd { DIGEST_LEN } else { 0 };
            if plen < pdo + tail {
                return Err(FatalError::header_field(ch_offset::PLEN).into());
            }
            let data_len = plen - pdo - tail;
            if data_len > self.limits.max_data as usize {
                return Err(
                    FatalError::new(Fes::DataTransferLimitExceeded, ch_offset::PLEN).into(),
                );
            }
            (pdo, data_len, dd)
        };

        if buf.len() < plen {
            // The header digest can be checked before the data arrives, so a
            // corrupt length is caught without buffering it.
            if hd && buf.len() >= header_total {
                check_header_digest(&buf[..header_total], hlen)?;
            }
            buf.reserve(plen - buf.len());
            return Ok(None);
        }
        if hd {
            check_header_digest(&buf[..header_total], hlen)?;
        }
        // The fixed header has been validated; its fields must now agree with
        // the data section actually present.
        let mut pdu_bytes = buf.split_to(plen);
        let header = pdu_bytes.split_to(hlen).freeze();
        pdu_bytes.advance(data_start - hlen);
        let mut data_and_digest = pdu_bytes;
        let data = data_and_digest.split_to(data_len).freeze();
        let digest_ok = !dd || {
            let got = u32::from_le_bytes(data_and_digest[..4].try_into().unwrap());
            crc32c(&data) == got
        };
        let pdu = build(t, &header, data)?;
        if !digest_ok {
            return Err(DecodeError::DataDigest(Box::new(pdu)));
        }
        if matches!(t, PduType::IcReq | PduType::IcResp) {
            // The caller switches us to Established once negotiation is done;
            // until then a second ICReq is still a sequence error.
            self.phase = Phase::Established;
        }
        Ok(Some(pdu))
    }
}

fn check_header_digest(h: &[u8], hlen: usize) -> Result<(), FatalError> {
    let got = u32::from_le_bytes(h[hlen..hlen + 4].try_into().unwrap());
    if crc32c(&h[..hlen]) != got {
        return Err(FatalError::new(Fes::HeaderDigestError, 0));
    }
    Ok(())
}

fn build(t: PduType, header: &[u8], data: Bytes) -> Result<Pdu, FatalError> {
    // Sizes were checked against `header_len`, so these reads cannot fail;
    // map a failure to a header error anyway rather than panic.
    let bad = FatalError::header_field(ch_offset::HLEN);
    Ok(match t {
        PduType::IcReq => {
            let h = IcReq::read_from_bytes(header).map_err(|_| bad)?;
            if h.pfv.get() != 0 {
                return Err(FatalError::new(Fes::UnsupportedParameter, 8));
            }
            if h.dgst & !(dgst::HDGST_ENABLE | dgst::DDGST_ENABLE) != 0 {
                return Err(FatalError::header_field(11));
            }
            if h.hpda > 31 {
                return Err(FatalError::new(Fes::UnsupportedParameter, 10));
            }
            Pdu::IcReq(h)
        }
        PduType::IcResp => {
            let h = IcResp::read_from_bytes(header).map_err(|_| bad)?;
            if h.pfv.get() != 0 {
                return Err(FatalError::new(Fes::UnsupportedParameter, 8));
            }
            if h.cpda > 31 {
                return Err(FatalError::new(Fes::UnsupportedParameter, 10));
            }
            let maxh2c = h.maxh2cdata.get();
            if maxh2c < 4096 || maxh2c % 4 != 0 {
                return Err(FatalError::new(Fes::UnsupportedParameter, 12));
            }
            Pdu::IcResp(h)
        }
        PduType::H2CTermReq | PduType::C2HTermReq => Pdu::TermReq {
            hdr: TermReqHeader::read_from_bytes(header).map_err(|_| bad)?,
            data,
        },
        PduType::CapsuleCmd => {
            let h = CapsuleCmdHeader::read_from_bytes(header).map_err(|_| bad)?;
            Pdu::CapsuleCmd { sqe: h.sqe, data }
        }
        PduType::CapsuleResp => Pdu::CapsuleResp(
            CapsuleRespHeader::read_from_bytes(header)
                .map_err(|_| bad)?
                .cqe,
        ),
        PduType::H2CData | PduType::C2HData => {
            let hdr = DataHeader::read_from_bytes(header).map_err(|_| bad)?;
            if hdr.datal.get() as usize != data.len() {
                return Err(FatalError::header_field(data_offset::DATAL));
            }
            if hdr.datal.get() == 0 {
                return Err(FatalError::header_field(data_offset::DATAL));
            }
            if t == PduType::H2CData {
                Pdu::H2CData { hdr, data }
            } else {
                let f = hdr.ch.flags;
                // SUCCESS is only meaningful on the last PDU of a transfer.
                if f & flags::SUCCESS != 0 && f & flags::LAST_PDU == 0 {
                    return Err(FatalError::header_field(ch_offset::FLAGS));
                }
                Pdu::C2HData { hdr, data }
            }
        }
        PduType::R2T => {
            let h = R2THeader::read_from_bytes(header).map_err(|_| bad)?;
            if h.r2tl.get() == 0 {
                return Err(FatalError::header_field(20));
            }
            Pdu::R2T(h)
        }
    })
}
