//! NVMe/TCP PDU headers (NVMe/TCP Transport Specification 1.0, section 3.6).
//!
//! Every header is a `zerocopy` type whose size is checked against the
//! specification at compile time, so a header is parsed by reinterpreting
//! bytes, never by hand-written offset arithmetic.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::nvme::{Cqe, Sqe};

/// PDU types (NVMe/TCP 3.6.1, figure "PDU Type").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PduType {
    IcReq = 0x00,
    IcResp = 0x01,
    H2CTermReq = 0x02,
    C2HTermReq = 0x03,
    CapsuleCmd = 0x04,
    CapsuleResp = 0x05,
    H2CData = 0x06,
    C2HData = 0x07,
    R2T = 0x09,
}

impl PduType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x00 => Self::IcReq,
            0x01 => Self::IcResp,
            0x02 => Self::H2CTermReq,
            0x03 => Self::C2HTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2CData,
            0x07 => Self::C2HData,
            0x09 => Self::R2T,
            _ => return None,
        })
    }

    /// The fixed header length (HLEN) the specification requires for this type.
    pub const fn header_len(self) -> usize {
        match self {
            Self::IcReq | Self::IcResp => 128,
            Self::H2CTermReq | Self::C2HTermReq => 24,
            Self::CapsuleCmd => 72,
            Self::CapsuleResp => 24,
            Self::H2CData | Self::C2HData | Self::R2T => 24,
        }
    }

    /// Whether a header digest follows the header once digests are negotiated.
    /// The connection-setup and termination PDUs never carry digests.
    pub const fn carries_digests(self) -> bool {
        !matches!(
            self,
            Self::IcReq | Self::IcResp | Self::H2CTermReq | Self::C2HTermReq
        )
    }

    /// Whether this PDU type may carry a data section.
    pub const fn may_carry_data(self) -> bool {
        matches!(
            self,
            Self::CapsuleCmd | Self::H2CData | Self::C2HData | Self::H2CTermReq | Self::C2HTermReq
        )
    }
}

/// Common header flags (NVMe/TCP 3.6.1).
pub mod flags {
    /// A header digest follows the PDU header.
    pub const HDGSTF: u8 = 0x01;
    /// A data digest follows the PDU data.
    pub const DDGSTF: u8 = 0x02;
    /// H2CData / C2HData: last PDU of the data transfer.
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command completed successfully; no CapsuleResp follows.
    pub const SUCCESS: u8 = 0x08;
}

/// Length of a CRC32C digest on the wire.
pub const DIGEST_LEN: usize = 4;

/// Maximum data carried by a TermReq: the offending PDU header (NVMe/TCP 3.6.2.4).
pub const TERM_REQ_MAX_DATA: usize = 152;

/// Common header, 8 bytes, at the start of every PDU.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct CommonHeader {
    pub pdu_type: u8,
    pub flags: u8,
    pub hlen: u8,
    /// PDU data offset from the start of the PDU, or 0 when there is no data.
    pub pdo: u8,
    /// Total PDU length including header, digests, padding and data.
    pub plen: U32,
}

/// Field offsets inside the common header, used as Fatal Error Information.
pub mod ch_offset {
    pub const PDU_TYPE: u32 = 0;
    pub const FLAGS: u32 = 1;
    pub const HLEN: u32 = 2;
    pub const PDO: u32 = 3;
    pub const PLEN: u32 = 4;
}

/// Digest negotiation bits in ICReq / ICResp.
pub mod dgst {
    pub const HDGST_ENABLE: u8 = 0x01;
    pub const DDGST_ENABLE: u8 = 0x02;
}

/// Initialize Connection Request, host to controller (128 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct IcReq {
    pub ch: CommonHeader,
    /// PDU format version; 0 is the only defined value.
    pub pfv: U16,
    /// Host PDU data alignment, in dwords, 0's based.
    pub hpda: u8,
    pub dgst: u8,
    /// Maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: U32,
    pub rsvd: [u8; 112],
}

/// Initialize Connection Response, controller to host (128 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct IcResp {
    pub ch: CommonHeader,
    pub pfv: U16,
    /// Controller PDU data alignment, in dwords, 0's based.
    pub cpda: u8,
    pub dgst: u8,
    /// Maximum data bytes in one H2CData PDU.
    pub maxh2cdata: U32,
    pub rsvd: [u8; 112],
}

/// H2CTermReq / C2HTermReq header (24 bytes); the offending header follows as data.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct TermReqHeader {
    pub ch: CommonHeader,
    /// Fatal error status.
    pub fes: U16,
    /// Fatal error information (a byte offset for header-field errors).
    pub fei: U32,
    pub rsvd: [u8; 10],
}

/// Command capsule header: common header followed by the 64-byte SQE (72 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct CapsuleCmdHeader {
    pub ch: CommonHeader,
    pub sqe: Sqe,
}

/// Response capsule: common header followed by the 16-byte CQE (24 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct CapsuleRespHeader {
    pub ch: CommonHeader,
    pub cqe: Cqe,
}

/// H2CData and C2HData header (24 bytes). `ttag` is reserved in C2HData.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct DataHeader {
    pub ch: CommonHeader,
    /// Command capsule CID the data belongs to.
    pub cccid: U16,
    /// Transfer tag from the R2T (H2CData only).
    pub ttag: U16,
    /// Offset of this PDU's data within the command's whole transfer.
    pub datao: U32,
    pub datal: U32,
    pub rsvd: [u8; 4],
}

/// Field offsets inside a data header, used as Fatal Error Information.
pub mod data_offset {
    pub const CCCID: u32 = 8;
    pub const TTAG: u32 = 10;
    pub const DATAO: u32 = 12;
    pub const DATAL: u32 = 16;
}

/// Ready to Transfer, controller to host (24 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct R2THeader {
    pub ch: CommonHeader,
    pub cccid: U16,
    pub ttag: U16,
    pub r2to: U32,
    pub r2tl: U32,
    pub rsvd: [u8; 4],
}

const _: () = assert!(size_of::<CommonHeader>() == 8);
const _: () = assert!(size_of::<IcReq>() == 128);
const _: () = assert!(size_of::<IcResp>() == 128);
const _: () = assert!(size_of::<TermReqHeader>() == 24);
const _: () = assert!(size_of::<CapsuleCmdHeader>() == 72);
const _: () = assert!(size_of::<CapsuleRespHeader>() == 24);
const _: () = assert!(size_of::<DataHeader>() == 24);
const _: () = assert!(size_of::<R2THeader>() == 24);
const _: () = assert!(size_of::<IcReq>() == PduType::IcReq.header_len());
const _: () = assert!(size_of::<CapsuleCmdHeader>() == PduType::CapsuleCmd.header_len());
const _: () = assert!(core::mem::offset_of!(DataHeader, datao) == data_offset::DATAO as usize);
const _: () = assert!(core::mem::offset_of!(DataHeader, ttag) == data_offset::TTAG as usize);
const _: () = assert!(core::mem::offset_of!(DataHeader, datal) == data_offset::DATAL as usize);

/// Fatal error status values carried by a TermReq (NVMe/TCP 3.6.2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Fes {
    InvalidHeaderField = 0x01,
    PduSequenceError = 0x02,
    HeaderDigestError = 0x03,
    DataTransferOutOfRange = 0x04,
    /// "R2T Limit Exceeded" in the host-to-controller direction shares this value.
    DataTransferLimitExceeded = 0x05,
    UnsupportedParameter = 0x06,
}

impl Fes {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0x01 => Self::InvalidHeaderField,
            0x02 => Self::PduSequenceError,
            0x03 => Self::HeaderDigestError,
            0x04 => Self::DataTransferOutOfRange,
            0x05 => Self::DataTransferLimitExceeded,
            0x06 => Self::UnsupportedParameter,
            _ => return None,
        })
    }
}

/// Rounds `v` up to a multiple of `align` (a power of two or any positive value).
pub const fn align_up(v: usize, align: usize) -> usize {
    if align <= 1 {
        v
    } else {
        v.div_ceil(align) * align
    }
}

/// Converts a 0's based PDA value (dwords) into an alignment in bytes.
pub const fn pda_bytes(pda: u8) -> usize {
    (pda as usize + 1) * 4
}
