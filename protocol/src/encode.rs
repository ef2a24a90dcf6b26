//! PDU builders. They append to a caller-owned `BytesMut`, so a driver can
//! batch many PDUs into one buffer and send them with one syscall, and can
//! read payload straight into the space behind a data header.

use bytes::{BufMut, BytesMut};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromZeros, IntoBytes};

use crate::decode::FatalError;
use crate::digest::crc32c;
use crate::nvme::{Cqe, Sqe};
use crate::pdu::*;

/// Per-connection encoding parameters, fixed after ICReq/ICResp.
#[derive(Clone, Copy, Debug, Default)]
pub struct PduEncoder {
    pub hdgst: bool,
    pub ddgst: bool,
    /// Alignment in bytes the peer asked for the data offset (from its PDA).
    pub pda: usize,
}

/// Where a data section was placed by `begin_data`; passed to `end_data`.
#[derive(Clone, Copy, Debug)]
pub struct DataMark {
    pdu_start: usize,
    data_start: usize,
    data_len: usize,
}

impl DataMark {
    /// Byte range of the data section inside the output buffer.
    pub fn data_range(&self) -> core::ops::Range<usize> {
        self.data_start..self.data_start + self.data_len
    }
}

impl PduEncoder {
    fn header_total(&self, hlen: usize) -> usize {
        hlen + if self.hdgst { DIGEST_LEN } else { 0 }
    }

    fn data_offset(&self, hlen: usize) -> usize {
        align_up(self.header_total(hlen), self.pda.max(1))
    }

    fn put_header_digest(&self, out: &mut BytesMut, start: usize, hlen: usize) {
        if self.hdgst {
            let d = crc32c(&out[start..start + hlen]);
            out.put_u32_le(d);
        }
    }

    fn common(&self, t: PduType, mut fl: u8, data_len: usize) -> CommonHeader {
        let hlen = t.header_len();
        let (pdo, plen) = if data_len == 0 {
            (0, self.header_total(hlen))
        } else {
            let pdo = self.data_offset(hlen);
            let dd = if self.ddgst { DIGEST_LEN } else { 0 };
            (pdo, pdo + data_len + dd)
        };
        if self.hdgst {
            fl |= flags::HDGSTF;
        }
        if self.ddgst && data_len > 0 {
            fl |= flags::DDGSTF;
        }
        CommonHeader {
            pdu_type: t as u8,
            flags: fl,
            hlen: hlen as u8,
            pdo: pdo as u8,
            plen: U32::new(plen as u32),
        }
    }

    /// Writes a header (and header digest and pad) for a PDU whose data section
    /// the caller fills in next. Returns the mark to pass to `end_data`.
    fn begin(&self, out: &mut BytesMut, header: &[u8], data_len: usize) -> DataMark {
        let hlen = header.len();
        let pdu_start = out.len();
        out.extend_from_slice(header);
        self.put_header_digest(out, pdu_start, hlen);
        let data_start = if data_len == 0 {
            out.len()
        } else {
            pdu_start + self.data_offset(hlen)
        };
        out.resize(data_start, 0);
        DataMark {
            pdu_start,
            data_start,
            data_len,
        }
    }

    /// Closes a PDU opened by a `begin_*` call once its data has been written
    /// into `out[mark.data_range()]`: appends the data digest.
    pub fn end_data(&self, out: &mut BytesMut, mark: DataMark) {
        debug_assert_eq!(out.len(), mark.data_start + mark.data_len);
        if self.ddgst && mark.data_len > 0 {
            let d = crc32c(&out[mark.data_start..]);
            out.put_u32_le(d);
        }
        debug_assert!(out.len() > mark.pdu_start);
    }

    fn whole(&self, out: &mut BytesMut, header: &[u8], data: &[u8]) {
        let m = self.begin(out, header, data.len());
        out.extend_from_slice(data);
        self.end_data(out, m);
    }

    pub fn ic_req(&self, out: &mut BytesMut, hpda: u8, dgst_bits: u8, maxr2t: u32) {
        let mut p = IcReq::new_zeroed();
        p.ch = CommonHeader {
            pdu_type: PduType::IcReq as u8,
            flags: 0,
            hlen: 128,
            pdo: 0,
            plen: U32::new(128),
        };
        p.hpda = hpda;
        p.dgst = dgst_bits;
        p.maxr2t = U32::new(maxr2t);
        out.extend_from_slice(p.as_bytes());
    }

    pub fn ic_resp(&self, out: &mut BytesMut, cpda: u8, dgst_bits: u8, maxh2cdata: u32) {
        let mut p = IcResp::new_zeroed();
        p.ch = CommonHeader {
            pdu_type: PduType::IcResp as u8,
            flags: 0,
            hlen: 128,
            pdo: 0,
            plen: U32::new(128),
        };
        p.cpda = cpda;
        p.dgst = dgst_bits;
        p.maxh2cdata = U32::new(maxh2cdata);
        out.extend_from_slice(p.as_bytes());
    }

    /// A TermReq carrying the start of the offending header (at most 152 bytes).
    pub fn term_req(&self, out: &mut BytesMut, t: PduType, err: FatalError, offending: &[u8]) {
        let n = offending.len().min(TERM_REQ_MAX_DATA);
        let hdr = TermReqHeader {
            ch: CommonHeader {
                pdu_type: t as u8,
                flags: 0,
                hlen: 24,
                pdo: 0,
                plen: U32::new((24 + n) as u32),
            },
            fes: U16::new(err.fes as u16),
            fei: U32::new(err.fei),
            rsvd: [0; 10],
        };
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(&offending[..n]);
    }

    /// A command capsule with in-capsule `data` (may be empty).
    pub fn capsule_cmd(&self, out: &mut BytesMut, sqe: &Sqe, data: &[u8]) {
        let ch = self.common(PduType::CapsuleCmd, 0, data.len());
        let h = CapsuleCmdHeader { ch, sqe: *sqe };
        self.whole(out, h.as_bytes(), data);
    }

    pub fn capsule_resp(&self, out: &mut BytesMut, cqe: &Cqe) {
        let ch = self.common(PduType::CapsuleResp, 0, 0);
        let h = CapsuleRespHeader { ch, cqe: *cqe };
        self.whole(out, h.as_bytes(), &[]);
    }

    pub fn r2t(&self, out: &mut BytesMut, cccid: u16, ttag: u16, offset: u32, len: u32) {
        let ch = self.common(PduType::R2T, 0, 0);
        let h = R2THeader {
            ch,
            cccid: U16::new(cccid),
            ttag: U16::new(ttag),
            r2to: U32::new(offset),
            r2tl: U32::new(len),
            rsvd: [0; 4],
        };
        self.whole(out, h.as_bytes(), &[]);
    }

    fn data_header(
        &self,
        t: PduType,
        fl: u8,
        cccid: u16,
        ttag: u16,
        datao: u32,
        len: usize,
    ) -> DataHeader {
        DataHeader {
            ch: self.common(t, fl, len),
            cccid: U16::new(cccid),
            ttag: U16::new(ttag),
            datao: U32::new(datao),
            datal: U32::new(len as u32),
            rsvd: [0; 4],
        }
    }

    /// The framing of an H2CData PDU whose `data` the caller sends from
    /// its own buffer, right after what this writes into `out` (a vectored
    /// write, so the payload is never copied into `out`): the header, its
    /// digest and padding, then [`Self::end_spliced_data`].
    pub fn begin_h2c_data(
        &self,
        out: &mut BytesMut,
        cccid: u16,
        ttag: u16,
        datao: u32,
        len: usize,
        last: bool,
    ) -> DataMark {
        let fl = if last { flags::LAST_PDU } else { 0 };
        let h = self.data_header(PduType::H2CData, fl, cccid, ttag, datao, len);
        self.begin(out, h.as_bytes(), len)
    }

    /// Closes a PDU opened by [`Self::begin_h2c_data`] whose data section,
    /// `data`, goes on the wire between what `out` held and what this
    /// appends (the data digest, if on).
    pub fn end_spliced_data(&self, out: &mut BytesMut, mark: DataMark, data: &[u8]) {
        debug_assert_eq!(out.len(), mark.data_start);
        debug_assert_eq!(data.len(), mark.data_len);
        if self.ddgst && mark.data_len > 0 {
            out.put_u32_le(crc32c(data));
        }
    }

    /// An H2CData PDU carrying `data`.
    pub fn h2c_data(
        &self,
        out: &mut BytesMut,
        cccid: u16,
        ttag: u16,
        datao: u32,
        data: &[u8],
        last: bool,
    ) {
        let m = self.begin_h2c_data(out, cccid, ttag, datao, data.len(), last);
        out.extend_from_slice(data);
        self.end_data(out, m);
    }

    /// Opens a C2HData PDU of `len` data bytes; the caller appends exactly
    /// `len` bytes (e.g. reads them from a file straight into `out`) and
    /// calls `end_data`. `success` elides the response capsule.
    pub fn begin_c2h_data(
        &self,
        out: &mut BytesMut,
        cccid: u16,
        datao: u32,
        len: usize,
        last: bool,
        success: bool,
    ) -> DataMark {
        debug_assert!(len > 0);
        let mut fl = if last { flags::LAST_PDU } else { 0 };
        if success {
            fl |= flags::SUCCESS;
        }
        let h = self.data_header(PduType::C2HData, fl, cccid, 0, datao, len);
        self.begin(out, h.as_bytes(), len)
    }

    /// A whole C2HData PDU from a slice.
    pub fn c2h_data(
        &self,
        out: &mut BytesMut,
        cccid: u16,
        datao: u32,
        data: &[u8],
        last: bool,
        success: bool,
    ) {
        let m = self.begin_c2h_data(out, cccid, datao, data.len(), last, success);
        out.extend_from_slice(data);
        self.end_data(out, m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An H2CData PDU framed around a payload sent from elsewhere is, on
    /// the wire, byte for byte the PDU built with its payload copied in,
    /// whatever the digests and the data alignment.
    #[test]
    fn spliced_h2c_data_is_the_same_pdu_on_the_wire() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        for hdgst in [false, true] {
            for ddgst in [false, true] {
                for pda in [0, 32, 128] {
                    let enc = PduEncoder { hdgst, ddgst, pda };
                    let mut whole = BytesMut::from(&b"before"[..]);
                    enc.h2c_data(&mut whole, 7, 9, 4096, &data, true);
                    let mut out = BytesMut::from(&b"before"[..]);
                    let m = enc.begin_h2c_data(&mut out, 7, 9, 4096, data.len(), true);
                    let at = out.len();
                    enc.end_spliced_data(&mut out, m, &data);
                    let wire = [&out[..at], &data, &out[at..]].concat();
                    assert_eq!(wire, &whole[..], "hdgst {hdgst} ddgst {ddgst} pda {pda}");
                }
            }
        }
    }
}
