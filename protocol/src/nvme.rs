//! NVMe submission/completion queue entries, SGL descriptors, opcodes and
//! status codes (NVMe Base Specification 2.0, NVMe over Fabrics 1.1).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// SGL descriptor (16 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct SglDescriptor {
    pub addr: U64,
    pub length: U32,
    pub rsvd: [u8; 3],
    /// Descriptor type in bits 7:4, subtype in bits 3:0.
    pub type_subtype: u8,
}

/// SGL descriptor type/subtype bytes used by NVMe/TCP.
pub mod sgl {
    /// Data Block, subtype Offset: data is in the capsule at `addr` bytes past its start.
    pub const DATA_BLOCK_OFFSET: u8 = 0x01;
    /// Transport SGL Data Block (subtype 0): data moves through R2T/H2CData or C2HData.
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x50;
    /// Transport SGL Data Block with the Transport-specific subtype 0xA, as some hosts send it.
    pub const TRANSPORT_DATA_BLOCK_A: u8 = 0x5A;
}

impl SglDescriptor {
    pub fn in_capsule(len: u32) -> Self {
        Self {
            addr: U64::new(0),
            length: U32::new(len),
            rsvd: [0; 3],
            type_subtype: sgl::DATA_BLOCK_OFFSET,
        }
    }

    /// Data moves through R2T/H2CData or C2HData (either transport subtype).
    pub fn is_transport(&self) -> bool {
        matches!(
            self.type_subtype,
            sgl::TRANSPORT_DATA_BLOCK | sgl::TRANSPORT_DATA_BLOCK_A
        )
    }

    pub fn transport(len: u32) -> Self {
        Self {
            addr: U64::new(0),
            length: U32::new(len),
            rsvd: [0; 3],
            type_subtype: sgl::TRANSPORT_DATA_BLOCK,
        }
    }
}

/// Submission queue entry (64 bytes). Fabrics commands overlay `nsid`'s low
/// byte with FCTYPE; accessors below name the overlaid fields.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Sqe {
    pub opcode: u8,
    /// FUSE in bits 1:0, PSDT in bits 7:6.
    pub flags: u8,
    pub cid: U16,
    pub nsid: U32,
    pub cdw2: U32,
    pub cdw3: U32,
    pub mptr: U64,
    pub dptr: SglDescriptor,
    pub cdw10: U32,
    pub cdw11: U32,
    pub cdw12: U32,
    pub cdw13: U32,
    pub cdw14: U32,
    pub cdw15: U32,
}

/// Completion queue entry (16 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Cqe {
    pub dw0: U32,
    pub dw1: U32,
    pub sqhd: U16,
    pub sqid: U16,
    pub cid: U16,
    /// Phase tag in bit 0, status field in bits 15:1.
    pub status: U16,
}

const _: () = assert!(size_of::<SglDescriptor>() == 16);
const _: () = assert!(size_of::<Sqe>() == 64);
const _: () = assert!(size_of::<Cqe>() == 16);
const _: () = assert!(core::mem::offset_of!(Sqe, dptr) == 24);
const _: () = assert!(core::mem::offset_of!(Sqe, cdw10) == 40);

/// Fused operation bits in SQE flags.
pub mod fuse {
    pub const NONE: u8 = 0b00;
    pub const FIRST: u8 = 0b01;
    pub const SECOND: u8 = 0b10;
    pub const MASK: u8 = 0b11;
}

/// PSDT = SGL for data (bits 7:6 of SQE flags).
pub const PSDT_SGL: u8 = 0x40;

impl Sqe {
    pub fn new(opcode: u8, cid: u16, nsid: u32) -> Self {
        Self {
            opcode,
            flags: PSDT_SGL,
            cid: U16::new(cid),
            nsid: U32::new(nsid),
            ..Self::new_zeroed()
        }
    }

    pub fn fuse(&self) -> u8 {
        self.flags & fuse::MASK
    }

    /// Fabrics command type (byte 4) when `opcode == FABRICS`.
    pub fn fctype(&self) -> u8 {
        self.nsid.get() as u8
    }

    /// Starting LBA of an NVM I/O command (CDW10-11).
    pub fn slba(&self) -> u64 {
        (self.cdw10.get() as u64) | ((self.cdw11.get() as u64) << 32)
    }

    pub fn set_slba(&mut self, lba: u64) {
        self.cdw10 = U32::new(lba as u32);
        self.cdw11 = U32::new((lba >> 32) as u32);
    }

    /// Number of logical blocks of an NVM I/O command (CDW12 bits 15:0, 0's based).
    pub fn nlb(&self) -> u32 {
        (self.cdw12.get() & 0xffff) + 1
    }

    /// Connect: queue ID (bytes 42-43).
    pub fn connect_qid(&self) -> u16 {
        (self.cdw10.get() >> 16) as u16
    }

    /// Connect: record format (bytes 40-41).
    pub fn connect_recfmt(&self) -> u16 {
        self.cdw10.get() as u16
    }

    /// Connect: submission queue size, 0's based (bytes 44-45).
    pub fn connect_sqsize(&self) -> u16 {
        self.cdw11.get() as u16
    }

    /// Connect: keep alive timeout in milliseconds (bytes 48-51).
    pub fn connect_kato(&self) -> u32 {
        self.cdw12.get()
    }

    /// Property Get/Set: attribute byte (0 = 4-byte property, 1 = 8-byte).
    pub fn prop_attrib(&self) -> u8 {
        self.cdw10.get() as u8
    }

    /// Property Get/Set: property offset.
    pub fn prop_offset(&self) -> u32 {
        self.cdw11.get()
    }

    /// Property Set: value (bytes 48-55).
    pub fn prop_value(&self) -> u64 {
        (self.cdw12.get() as u64) | ((self.cdw13.get() as u64) << 32)
    }
}

/// Status code type.
pub mod sct {
    pub const GENERIC: u8 = 0;
    pub const COMMAND_SPECIFIC: u8 = 1;
    pub const MEDIA: u8 = 2;
    pub const PATH: u8 = 3;
}

/// An NVMe completion status (SCT, SC, DNR), without the phase bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

impl Status {
    pub const fn new(sct: u8, sc: u8) -> Self {
        Self {
            sct,
            sc,
            dnr: false,
        }
    }

    /// The same status with Do Not Retry set: the error is in the command itself.
    pub const fn dnr(self) -> Self {
        Self {
            sct: self.sct,
            sc: self.sc,
            dnr: true,
        }
    }

    pub const fn is_success(self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// Encodes into the CQE status word (phase bit 0 left clear).
    pub const fn to_word(self) -> u16 {
        ((self.sc as u16) << 1) | (((self.sct & 0x7) as u16) << 9) | ((self.dnr as u16) << 15)
    }

    pub const fn from_word(w: u16) -> Self {
        Self {
            sc: (w >> 1) as u8,
            sct: ((w >> 9) & 0x7) as u8,
            dnr: w & 0x8000 != 0,
        }
    }

    pub const SUCCESS: Self = Self::new(sct::GENERIC, 0x00);
    pub const INVALID_OPCODE: Self = Self::new(sct::GENERIC, 0x01).dnr();
    pub const INVALID_FIELD: Self = Self::new(sct::GENERIC, 0x02).dnr();
    pub const CID_CONFLICT: Self = Self::new(sct::GENERIC, 0x03).dnr();
    pub const DATA_TRANSFER_ERROR: Self = Self::new(sct::GENERIC, 0x04);
    pub const INTERNAL_ERROR: Self = Self::new(sct::GENERIC, 0x06);
    pub const ABORT_REQUESTED: Self = Self::new(sct::GENERIC, 0x07);
    pub const ABORTED_SQ_DELETION: Self = Self::new(sct::GENERIC, 0x08);
    pub const FAILED_FUSED: Self = Self::new(sct::GENERIC, 0x09);
    pub const MISSING_FUSED: Self = Self::new(sct::GENERIC, 0x0a).dnr();
    pub const INVALID_NAMESPACE: Self = Self::new(sct::GENERIC, 0x0b).dnr();
    pub const COMMAND_SEQUENCE_ERROR: Self = Self::new(sct::GENERIC, 0x0c).dnr();
    pub const DATA_SGL_LENGTH_INVALID: Self = Self::new(sct::GENERIC, 0x0f).dnr();
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Self = Self::new(sct::GENERIC, 0x11).dnr();
    pub const SGL_OFFSET_INVALID: Self = Self::new(sct::GENERIC, 0x16).dnr();
    pub const TRANSIENT_TRANSPORT_ERROR: Self = Self::new(sct::GENERIC, 0x22);
    pub const LBA_OUT_OF_RANGE: Self = Self::new(sct::GENERIC, 0x80).dnr();
    pub const CAPACITY_EXCEEDED: Self = Self::new(sct::GENERIC, 0x81).dnr();

    pub const INVALID_QUEUE_SIZE: Self = Self::new(sct::COMMAND_SPECIFIC, 0x02).dnr();
    pub const ABORT_LIMIT_EXCEEDED: Self = Self::new(sct::COMMAND_SPECIFIC, 0x03).dnr();
    pub const AER_LIMIT_EXCEEDED: Self = Self::new(sct::COMMAND_SPECIFIC, 0x05).dnr();
    pub const INVALID_LOG_PAGE: Self = Self::new(sct::COMMAND_SPECIFIC, 0x09).dnr();
    pub const FEATURE_NOT_SAVEABLE: Self = Self::new(sct::COMMAND_SPECIFIC, 0x0d).dnr();
    pub const FEATURE_NOT_CHANGEABLE: Self = Self::new(sct::COMMAND_SPECIFIC, 0x0e).dnr();
    pub const CONNECT_INCOMPATIBLE_FORMAT: Self = Self::new(sct::COMMAND_SPECIFIC, 0x80).dnr();
    pub const CONNECT_CONTROLLER_BUSY: Self = Self::new(sct::COMMAND_SPECIFIC, 0x81);
    pub const CONNECT_INVALID_PARAMETERS: Self = Self::new(sct::COMMAND_SPECIFIC, 0x82).dnr();
    pub const CONNECT_INVALID_HOST: Self = Self::new(sct::COMMAND_SPECIFIC, 0x84).dnr();

    pub const WRITE_FAULT: Self = Self::new(sct::MEDIA, 0x80);
    pub const UNRECOVERED_READ_ERROR: Self = Self::new(sct::MEDIA, 0x81);
    pub const COMPARE_FAILURE: Self = Self::new(sct::MEDIA, 0x85).dnr();

    /// A short name for logs and error messages.
    pub fn name(self) -> &'static str {
        let plain = Self { dnr: false, ..self };
        let table: &[(Status, &str)] = &[
            (Self::SUCCESS, "Success"),
            (Self::INVALID_OPCODE, "Invalid Command Opcode"),
            (Self::INVALID_FIELD, "Invalid Field in Command"),
            (Self::CID_CONFLICT, "Command ID Conflict"),
            (Self::DATA_TRANSFER_ERROR, "Data Transfer Error"),
            (Self::INTERNAL_ERROR, "Internal Error"),
            (Self::ABORT_REQUESTED, "Command Abort Requested"),
            (
                Self::ABORTED_SQ_DELETION,
                "Command Aborted due to SQ Deletion",
            ),
            (
                Self::FAILED_FUSED,
                "Command Aborted due to Failed Fused Command",
            ),
            (
                Self::MISSING_FUSED,
                "Command Aborted due to Missing Fused Command",
            ),
            (Self::INVALID_NAMESPACE, "Invalid Namespace or Format"),
            (Self::COMMAND_SEQUENCE_ERROR, "Command Sequence Error"),
            (Self::DATA_SGL_LENGTH_INVALID, "Data SGL Length Invalid"),
            (
                Self::SGL_DESCRIPTOR_TYPE_INVALID,
                "SGL Descriptor Type Invalid",
            ),
            (Self::SGL_OFFSET_INVALID, "SGL Offset Invalid"),
            (Self::TRANSIENT_TRANSPORT_ERROR, "Transient Transport Error"),
            (Self::LBA_OUT_OF_RANGE, "LBA Out of Range"),
            (Self::CAPACITY_EXCEEDED, "Capacity Exceeded"),
            (Self::INVALID_QUEUE_SIZE, "Invalid Queue Size"),
            (Self::ABORT_LIMIT_EXCEEDED, "Abort Command Limit Exceeded"),
            (
                Self::AER_LIMIT_EXCEEDED,
                "Asynchronous Event Request Limit Exceeded",
            ),
            (Self::INVALID_LOG_PAGE, "Invalid Log Page"),
            (
                Self::FEATURE_NOT_SAVEABLE,
                "Feature Identifier Not Saveable",
            ),
            (Self::FEATURE_NOT_CHANGEABLE, "Feature Not Changeable"),
            (
                Self::CONNECT_INCOMPATIBLE_FORMAT,
                "Connect Incompatible Format",
            ),
            (Self::CONNECT_CONTROLLER_BUSY, "Connect Controller Busy"),
            (
                Self::CONNECT_INVALID_PARAMETERS,
                "Connect Invalid Parameters",
            ),
            (Self::CONNECT_INVALID_HOST, "Connect Invalid Host"),
            (Self::WRITE_FAULT, "Write Fault"),
            (Self::UNRECOVERED_READ_ERROR, "Unrecovered Read Error"),
            (Self::COMPARE_FAILURE, "Compare Failure"),
        ];
        table
            .iter()
            .find(|(s, _)| Self { dnr: false, ..*s } == plain)
            .map(|(_, n)| *n)
            .unwrap_or("Unknown Status")
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} (sct {:#x}, sc {:#04x}{})",
            self.name(),
            self.sct,
            self.sc,
            if self.dnr { ", dnr" } else { "" }
        )
    }
}

/// Admin command opcodes.
pub mod admin_opc {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Fabrics commands share this opcode on every queue.
    pub const FABRICS: u8 = 0x7f;
}

/// NVM command set I/O opcodes.
pub mod nvm_opc {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Fabrics command types (FCTYPE).
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECV: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// Controller property offsets (NVMe over Fabrics 1.1, figure 37).
pub mod prop {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1c;
    pub const NSSR: u32 = 0x20;
}

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_DESCRIPTORS: u8 = 0x03;
}

/// Log page identifiers.
pub mod log_id {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NS_LIST: u8 = 0x04;
    pub const DISCOVERY: u8 = 0x70;
}

/// Feature identifiers.
pub mod feature {
    pub const ARBITRATION: u8 = 0x01;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
}

/// Well-known NQN of a discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
