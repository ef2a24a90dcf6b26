//! Round-trip and bounds properties of the PDU encoder and stream decoder.

use bytes::BytesMut;
use dase_protocol::nvme::{admin_opc, Cqe, SglDescriptor, Sqe, Status};
use dase_protocol::pdu::{self, dgst, flags, Fes, PduType};
use dase_protocol::{DecodeError, Limits, Pdu, PduDecoder, PduEncoder, Role};
use proptest::prelude::*;
use zerocopy::little_endian::U16;

const MAX_DATA: u32 = 64 * 1024;

fn established(role: Role, hd: bool, dd: bool) -> PduDecoder {
    let mut d = PduDecoder::new(role);
    d.establish(Limits {
        hdgst: hd,
        ddgst: dd,
        max_data: MAX_DATA,
        pda: 0,
    });
    d
}

/// Feeds `wire` to `dec` in pieces cut at `cuts`, collecting every PDU.
fn feed(dec: &mut PduDecoder, wire: &[u8], cuts: &[usize]) -> Result<Vec<Pdu>, DecodeError> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    cuts.push(wire.len());
    cuts.sort();
    for c in cuts {
        buf.extend_from_slice(&wire[pos..c.max(pos)]);
        pos = c.max(pos);
        while let Some(p) = dec.decode(&mut buf)? {
            out.push(p);
        }
    }
    assert!(buf.is_empty(), "{} bytes left undecoded", buf.len());
    Ok(out)
}

fn sqe(opcode: u8, cid: u16, len: u32) -> Sqe {
    let mut s = Sqe::new(opcode, cid, 1);
    s.dptr = SglDescriptor::in_capsule(len);
    s
}

proptest! {
    #[test]
    fn host_to_controller_stream_round_trips(
        hd: bool, dd: bool,
        cmds in prop::collection::vec((any::<u16>(), prop::collection::vec(any::<u8>(), 0..9000)), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let enc = PduEncoder { hdgst: hd, ddgst: dd, pda: 0 };
        let mut wire = BytesMut::new();
        for (cid, data) in &cmds {
            enc.capsule_cmd(&mut wire, &sqe(0x01, *cid, data.len() as u32), data);
            if !data.is_empty() {
                enc.h2c_data(&mut wire, *cid, 7, 0, data, true);
            }
        }
        let got = feed(&mut established(Role::Controller, hd, dd), &wire, &cuts).unwrap();
        let mut it = got.iter();
        for (cid, data) in &cmds {
            match it.next().unwrap() {
                Pdu::CapsuleCmd { sqe, data: d } => {
                    prop_assert_eq!(sqe.cid.get(), *cid);
                    prop_assert_eq!(&d[..], &data[..]);
                }
                p => prop_assert!(false, "unexpected {:?}", p.pdu_type()),
            }
            if !data.is_empty() {
                match it.next().unwrap() {
                    Pdu::H2CData { hdr, data: d } => {
                        prop_assert_eq!(hdr.cccid.get(), *cid);
                        prop_assert!(hdr.ch.flags & flags::LAST_PDU != 0);
                        prop_assert_eq!(&d[..], &data[..]);
                    }
                    p => prop_assert!(false, "unexpected {:?}", p.pdu_type()),
                }
            }
        }
        prop_assert!(it.next().is_none());
    }

    #[test]
    fn controller_to_host_stream_round_trips(
        hd: bool, dd: bool, pda in 0u8..4,
        data in prop::collection::vec(any::<u8>(), 1..20000),
        cid: u16, dw0: u32, cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let enc = PduEncoder { hdgst: hd, ddgst: dd, pda: pdu::pda_bytes(pda) };
        let mut wire = BytesMut::new();
        enc.r2t(&mut wire, cid, 3, 0, 4096);
        enc.c2h_data(&mut wire, cid, 0, &data, true, false);
        let cqe = Cqe {
            cid: U16::new(cid),
            dw0: dw0.into(),
            status: U16::new(Status::COMPARE_FAILURE.to_word()),
            ..Default::default()
        };
        enc.capsule_resp(&mut wire, &cqe);
        let mut dec = PduDecoder::new(Role::Host);
        dec.establish(Limits { hdgst: hd, ddgst: dd, max_data: 20000, pda: pdu::pda_bytes(pda) as u32 });
        let got = feed(&mut dec, &wire, &cuts).unwrap();
        prop_assert_eq!(got.len(), 3);
        match &got[1] { Pdu::C2HData { data: d, .. } => prop_assert_eq!(&d[..], &data[..]), _ => prop_assert!(false) }
        match &got[2] {
            Pdu::CapsuleResp(c) => {
                prop_assert_eq!(c.dw0.get(), dw0);
                prop_assert_eq!(Status::from_word(c.status.get()), Status::COMPARE_FAILURE);
            }
            _ => prop_assert!(false),
        }
    }

    /// Arbitrary bytes never panic the decoder, never make it buffer beyond
    /// the bound, and every error is reportable.
    #[test]
    fn arbitrary_bytes_are_handled(role_host: bool, hd: bool, dd: bool,
                                   bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let role = if role_host { Role::Host } else { Role::Controller };
        let mut dec = established(role, hd, dd);
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..16 {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn status_word_round_trips(sct in 0u8..8, sc: u8, dnr: bool) {
        let s = Status { sct, sc, dnr };
        prop_assert_eq!(Status::from_word(s.to_word()), s);
    }
}

fn one(role: Role, hd: bool, dd: bool, wire: &[u8]) -> Result<Option<Pdu>, DecodeError> {
    established(role, hd, dd).decode(&mut BytesMut::from(wire))
}

fn fatal(r: Result<Option<Pdu>, DecodeError>) -> (Fes, u32) {
    match r {
        Err(DecodeError::Fatal(f)) => (f.fes, f.fei),
        other => panic!("expected a fatal error, got {other:?}"),
    }
}

fn capsule(hd: bool, dd: bool, data: &[u8]) -> BytesMut {
    let mut w = BytesMut::new();
    PduEncoder {
        hdgst: hd,
        ddgst: dd,
        pda: 0,
    }
    .capsule_cmd(
        &mut w,
        &sqe(admin_opc::IDENTIFY, 1, data.len() as u32),
        data,
    );
    w
}

#[test]
fn wrong_hlen_is_an_invalid_header_field_at_offset_2() {
    let mut w = capsule(false, false, &[]);
    w[2] = 64;
    assert_eq!(
        fatal(one(Role::Controller, false, false, &w)),
        (Fes::InvalidHeaderField, 2)
    );
}

#[test]
fn pdu_of_the_other_direction_is_rejected() {
    let mut w = BytesMut::new();
    PduEncoder::default().r2t(&mut w, 1, 1, 0, 4096);
    assert_eq!(
        fatal(one(Role::Controller, false, false, &w)),
        (Fes::InvalidHeaderField, 0)
    );
}

#[test]
fn digest_flags_must_match_negotiation() {
    let w = capsule(true, false, &[]);
    assert_eq!(
        fatal(one(Role::Controller, false, false, &w)),
        (Fes::InvalidHeaderField, 1)
    );
    let w = capsule(false, false, &[]);
    assert_eq!(
        fatal(one(Role::Controller, true, false, &w)),
        (Fes::InvalidHeaderField, 1)
    );
    let w = capsule(false, false, &[1, 2, 3, 4]);
    assert_eq!(
        fatal(one(Role::Controller, false, true, &w)),
        (Fes::InvalidHeaderField, 1)
    );
}

#[test]
fn header_digest_error_is_detected_before_the_data_arrives() {
    let mut w = capsule(true, false, &[9; 4096]);
    w[20] ^= 0xff;
    // Only the header and its digest are present.
    let mut dec = established(Role::Controller, true, false);
    let mut buf = BytesMut::from(&w[..76]);
    assert!(
        matches!(dec.decode(&mut buf), Err(DecodeError::Fatal(f)) if f.fes == Fes::HeaderDigestError)
    );
}

#[test]
fn data_digest_error_returns_the_pdu() {
    let mut w = capsule(false, true, &[9; 100]);
    let n = w.len();
    w[n - 10] ^= 1;
    match one(Role::Controller, false, true, &w) {
        Err(DecodeError::DataDigest(p)) if matches!(*p, Pdu::CapsuleCmd { .. }) => {
            let Pdu::CapsuleCmd { sqe, data } = *p else {
                unreachable!()
            };
            assert_eq!(sqe.cid.get(), 1);
            assert_eq!(data.len(), 100);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn plen_beyond_the_negotiated_maximum_is_refused_without_buffering() {
    let mut w = capsule(false, false, &[0; 16]);
    w[4..8].copy_from_slice(&(MAX_DATA + 1000).to_le_bytes());
    assert_eq!(
        fatal(one(Role::Controller, false, false, &w[..80])),
        (Fes::DataTransferLimitExceeded, 4)
    );
}

#[test]
fn plen_smaller_than_the_header_is_refused() {
    let mut w = capsule(false, false, &[]);
    w[4..8].copy_from_slice(&10u32.to_le_bytes());
    assert_eq!(
        fatal(one(Role::Controller, false, false, &w)),
        (Fes::InvalidHeaderField, 4)
    );
}

#[test]
fn pdo_inside_the_header_is_refused() {
    let mut w = capsule(false, false, &[0; 16]);
    w[3] = 8;
    assert_eq!(
        fatal(one(Role::Controller, false, false, &w)),
        (Fes::InvalidHeaderField, 3)
    );
}

#[test]
fn second_icreq_is_a_sequence_error() {
    let mut w = BytesMut::new();
    PduEncoder::default().ic_req(&mut w, 0, dgst::HDGST_ENABLE, 0);
    assert_eq!(
        fatal(one(Role::Controller, false, false, &w)),
        (Fes::PduSequenceError, 0)
    );
}

#[test]
fn capsule_before_icreq_is_a_sequence_error() {
    let w = capsule(false, false, &[]);
    let mut dec = PduDecoder::new(Role::Controller);
    assert_eq!(
        fatal(dec.decode(&mut BytesMut::from(&w[..]))),
        (Fes::PduSequenceError, 0)
    );
}

#[test]
fn icreq_with_unknown_pfv_is_an_unsupported_parameter() {
    let mut w = BytesMut::new();
    PduEncoder::default().ic_req(&mut w, 0, 0, 0);
    w[8] = 1;
    let mut dec = PduDecoder::new(Role::Controller);
    assert_eq!(fatal(dec.decode(&mut w)), (Fes::UnsupportedParameter, 8));
}

#[test]
fn c2h_success_without_last_is_refused() {
    let mut w = BytesMut::new();
    PduEncoder::default().c2h_data(&mut w, 1, 0, &[1; 8], true, true);
    w[1] &= !flags::LAST_PDU;
    assert_eq!(
        fatal(one(Role::Host, false, false, &w)),
        (Fes::InvalidHeaderField, 1)
    );
}

#[test]
fn datal_must_match_the_data_present() {
    let mut w = BytesMut::new();
    PduEncoder::default().h2c_data(&mut w, 1, 1, 0, &[1; 64], true);
    w[16..20].copy_from_slice(&65u32.to_le_bytes());
    assert_eq!(
        fatal(one(Role::Controller, false, false, &w)),
        (Fes::InvalidHeaderField, 16)
    );
}

#[test]
fn every_pdu_type_has_its_spec_header_length() {
    for (t, l) in [
        (PduType::IcReq, 128),
        (PduType::IcResp, 128),
        (PduType::H2CTermReq, 24),
        (PduType::C2HTermReq, 24),
        (PduType::CapsuleCmd, 72),
        (PduType::CapsuleResp, 24),
        (PduType::H2CData, 24),
        (PduType::C2HData, 24),
        (PduType::R2T, 24),
    ] {
        assert_eq!(t.header_len(), l);
        assert_eq!(PduType::from_u8(t as u8), Some(t));
    }
}
