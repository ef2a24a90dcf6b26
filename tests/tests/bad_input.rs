//! Malformed PDUs and invalid commands sent to a real `dase dnode`: each gets
//! a C2HTermReq with the right FES/FEI (or the right NVMe status) and only the
//! offending connection closes; the target keeps serving everyone else.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dase_initiator::host::{Controller, ControllerOptions};
use dase_protocol::admin::ConnectData;
use dase_protocol::nvme::{admin_opc, nvm_opc, SglDescriptor};
use dase_protocol::pdu::{dgst, Fes};
use dase_protocol::{Pdu, PduEncoder, Sqe, Status};
use dase_tests::*;
use zerocopy::IntoBytes;

/// One D-node shared by every test in this file: each test also proves the
/// others' abuse did not hurt it.
fn dnode() -> &'static DNode {
    static D: OnceLock<DNode> = OnceLock::new();
    D.get_or_init(|| DNode::memory(&nqn("bad"), "4M", 512))
}

/// A fresh, well-behaved host can still connect and move data.
fn still_serves() {
    let d = dnode();
    rt().block_on(async {
        let o = ControllerOptions {
            hostnqn: HOSTNQN.into(),
            io_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let c = Controller::connect(&d.addr_string(), &d.nqn, o)
            .await
            .expect("target still accepts hosts");
        let ns = c.namespace(1).await.unwrap();
        // A region the raw tests (which write near LBA 0) never touch; every
        // caller writes the same bytes, so concurrent callers agree.
        let data = pattern(64 * 1024, 11);
        c.write(&ns, 4096, Bytes::from(data.clone())).await.unwrap();
        assert!(
            c.read(&ns, 4096, 128).await.unwrap()[..] == data[..],
            "data read back differs"
        );
        c.disconnect().await.unwrap();
    });
}

/// A raw connection with a live I/O queue (admin connect, enable, I/O connect).
fn io_queue(hd: bool, dd: bool) -> RawConn {
    let d = dnode();
    let mut a = RawConn::connect(d.addr, true, false, false);
    let cd = ConnectData::new([3; 16], 0xffff, &d.nqn, "nqn.2026-11.io.dase:raw");
    let cntlid = connect(&mut a, 0, &cd);
    let mut ps = Sqe::new(admin_opc::FABRICS, 2, 0);
    ps.cdw11 = 0x14.into();
    ps.cdw12 = (1u32 | 6 << 16 | 4 << 20).into();
    expect_status(&mut a, &ps, Status::SUCCESS);
    let mut q = RawConn::connect(d.addr, true, hd, dd);
    let cd = ConnectData::new([3; 16], cntlid, &d.nqn, "nqn.2026-11.io.dase:raw");
    connect(&mut q, 1, &cd);
    // Keep the admin queue (and so the controller) alive for the test.
    std::mem::forget(a);
    q
}

fn connect(c: &mut RawConn, qid: u16, cd: &ConnectData) -> u16 {
    let mut sqe = Sqe::new(admin_opc::FABRICS, 1, 1);
    sqe.cdw10 = ((qid as u32) << 16).into();
    sqe.cdw11 = 31.into();
    sqe.dptr = SglDescriptor::in_capsule(1024);
    let mut w = BytesMut::new();
    c.enc.capsule_cmd(&mut w, &sqe, cd.as_bytes());
    c.send(&w);
    match c.recv() {
        Some(Pdu::CapsuleResp(cqe)) => {
            assert_eq!(
                Status::from_word(cqe.status.get()),
                Status::SUCCESS,
                "connect"
            );
            cqe.dw0.get() as u16
        }
        other => panic!("{other:?}"),
    }
}

fn expect_status(c: &mut RawConn, sqe: &Sqe, want: Status) {
    let mut w = BytesMut::new();
    c.enc.capsule_cmd(&mut w, sqe, &[]);
    c.send(&w);
    loop {
        match c.recv() {
            Some(Pdu::CapsuleResp(cqe)) => {
                assert_eq!(cqe.cid.get(), sqe.cid.get());
                assert_eq!(Status::from_word(cqe.status.get()), want);
                return;
            }
            Some(Pdu::C2HData { .. }) => continue,
            other => panic!("{other:?}"),
        }
    }
}

fn capsule(enc: &PduEncoder, sqe: &Sqe, data: &[u8]) -> BytesMut {
    let mut w = BytesMut::new();
    enc.capsule_cmd(&mut w, sqe, data);
    w
}

fn write_sqe(cid: u16, slba: u64, nlb: u32, sgl: SglDescriptor) -> Sqe {
    let mut s = Sqe::new(nvm_opc::WRITE, cid, 1);
    s.set_slba(slba);
    s.cdw12 = (nlb - 1).into();
    s.dptr = sgl;
    s
}

/// Sends a write that the target answers with an R2T; returns its TTAG.
fn start_r2t_write(q: &mut RawConn, cid: u16, nlb: u32) -> u16 {
    let w = capsule(
        &q.enc,
        &write_sqe(cid, 0, nlb, SglDescriptor::transport(nlb * 512)),
        &[],
    );
    q.send(&w);
    match q.recv() {
        Some(Pdu::R2T(r)) => {
            assert_eq!(r.cccid.get(), cid);
            assert_eq!(r.r2tl.get(), nlb * 512);
            r.ttag.get()
        }
        other => panic!("expected R2T, got {other:?}"),
    }
}

#[test]
fn unknown_pdu_type() {
    let mut c = RawConn::connect(dnode().addr, true, false, false);
    let mut w = capsule(&c.enc, &Sqe::new(6, 1, 0), &[]);
    w[0] = 0x0f;
    c.send(&w);
    c.expect_term(Fes::InvalidHeaderField, Some(0));
    still_serves();
}

#[test]
fn controller_to_host_pdu_from_a_host() {
    let mut c = RawConn::connect(dnode().addr, true, false, false);
    let mut w = BytesMut::new();
    c.enc.r2t(&mut w, 1, 1, 0, 512);
    c.send(&w);
    c.expect_term(Fes::InvalidHeaderField, Some(0));
    still_serves();
}

#[test]
fn wrong_header_length() {
    let mut c = RawConn::connect(dnode().addr, true, false, false);
    let mut w = capsule(&c.enc, &Sqe::new(6, 1, 0), &[]);
    w[2] = 80;
    c.send(&w);
    c.expect_term(Fes::InvalidHeaderField, Some(2));
    still_serves();
}

#[test]
fn plen_shorter_than_the_header() {
    let mut c = RawConn::connect(dnode().addr, true, false, false);
    let mut w = capsule(&c.enc, &Sqe::new(6, 1, 0), &[]);
    w[4..8].copy_from_slice(&40u32.to_le_bytes());
    c.send(&w);
    c.expect_term(Fes::InvalidHeaderField, Some(4));
    still_serves();
}

#[test]
fn plen_beyond_the_data_limit() {
    let mut c = RawConn::connect(dnode().addr, true, false, false);
    let mut w = capsule(&c.enc, &Sqe::new(6, 1, 0), &[0u8; 64]);
    w[4..8].copy_from_slice(&(64u32 << 20).to_le_bytes());
    // Only the header is sent: the target must refuse without waiting for 64 MiB.
    c.send(&w[..72]);
    c.expect_term(Fes::DataTransferLimitExceeded, Some(4));
    still_serves();
}

#[test]
fn data_offset_inside_the_header() {
    let mut c = RawConn::connect(dnode().addr, true, false, false);
    let mut w = capsule(&c.enc, &Sqe::new(6, 1, 0), &[0u8; 64]);
    w[3] = 16;
    c.send(&w);
    c.expect_term(Fes::InvalidHeaderField, Some(3));
    still_serves();
}

#[test]
fn header_digest_flag_without_negotiation() {
    let mut c = RawConn::connect(dnode().addr, true, false, false);
    let enc = PduEncoder {
        hdgst: true,
        ddgst: false,
        pda: 0,
    };
    c.send(&capsule(&enc, &Sqe::new(6, 1, 0), &[]));
    c.expect_term(Fes::InvalidHeaderField, Some(1));
    still_serves();
}

#[test]
fn missing_data_digest_when_negotiated() {
    let mut c = RawConn::connect(dnode().addr, true, true, true);
    let enc = PduEncoder {
        hdgst: true,
        ddgst: false,
        pda: 0,
    };
    c.send(&capsule(&enc, &Sqe::new(6, 1, 0), &[0u8; 16]));
    c.expect_term(Fes::InvalidHeaderField, Some(1));
    still_serves();
}

#[test]
fn header_digest_error() {
    let mut c = RawConn::connect(dnode().addr, true, true, false);
    let mut w = capsule(&c.enc, &Sqe::new(6, 1, 0), &[]);
    w[40] ^= 0x55;
    c.send(&w);
    c.expect_term(Fes::HeaderDigestError, None);
    still_serves();
}

#[test]
fn data_digest_error_fails_only_the_command() {
    let mut q = io_queue(false, true);
    let data = pattern(1024, 5);
    let mut w = capsule(
        &q.enc,
        &write_sqe(9, 0, 2, SglDescriptor::in_capsule(1024)),
        &data,
    );
    let n = w.len();
    w[n - 20] ^= 1;
    q.send(&w);
    match q.recv() {
        Some(Pdu::CapsuleResp(cqe)) => {
            assert_eq!(cqe.cid.get(), 9);
            assert_eq!(
                Status::from_word(cqe.status.get()),
                Status::TRANSIENT_TRANSPORT_ERROR
            );
        }
        other => panic!("{other:?}"),
    }
    // The connection goes on.
    let mut r = Sqe::new(nvm_opc::READ, 10, 1);
    r.dptr = SglDescriptor::transport(512);
    expect_status(&mut q, &r, Status::SUCCESS);
    still_serves();
}

#[test]
fn capsule_before_icreq() {
    let mut c = RawConn::connect(dnode().addr, false, false, false);
    c.send(&capsule(&PduEncoder::default(), &Sqe::new(6, 1, 0), &[]));
    c.expect_term(Fes::PduSequenceError, Some(0));
    still_serves();
}

#[test]
fn second_icreq() {
    let mut c = RawConn::connect(dnode().addr, true, false, false);
    let mut w = BytesMut::new();
    PduEncoder::default().ic_req(&mut w, 0, 0, 0);
    c.send(&w);
    c.expect_term(Fes::PduSequenceError, Some(0));
    still_serves();
}

#[test]
fn icreq_with_an_unsupported_version() {
    let mut c = RawConn::connect(dnode().addr, false, false, false);
    let mut w = BytesMut::new();
    PduEncoder::default().ic_req(&mut w, 0, dgst::HDGST_ENABLE, 0);
    w[8] = 7;
    c.send(&w);
    c.expect_term(Fes::UnsupportedParameter, Some(8));
    still_serves();
}

#[test]
fn h2c_data_with_an_unknown_transfer_tag() {
    let mut q = io_queue(false, false);
    let ttag = start_r2t_write(&mut q, 4, 64);
    let mut w = BytesMut::new();
    q.enc.h2c_data(&mut w, 4, ttag + 100, 0, &[1u8; 512], false);
    q.send(&w);
    q.expect_term(Fes::InvalidHeaderField, Some(10));
    still_serves();
}

#[test]
fn h2c_data_for_the_wrong_command() {
    let mut q = io_queue(false, false);
    let ttag = start_r2t_write(&mut q, 4, 64);
    let mut w = BytesMut::new();
    q.enc.h2c_data(&mut w, 5, ttag, 0, &[1u8; 512], false);
    q.send(&w);
    q.expect_term(Fes::InvalidHeaderField, Some(8));
    still_serves();
}

#[test]
fn h2c_data_out_of_range() {
    let mut q = io_queue(false, false);
    let ttag = start_r2t_write(&mut q, 4, 64);
    let mut w = BytesMut::new();
    // The transfer is 32 KiB; data at offset 32 KiB - 512 of 1024 bytes overruns it.
    q.enc.h2c_data(&mut w, 4, ttag, 0, &[1u8; 31 * 1024], false);
    q.enc
        .h2c_data(&mut w, 4, ttag, 31 * 1024, &[1u8; 2048], true);
    q.send(&w);
    q.expect_term(Fes::DataTransferOutOfRange, Some(16));
    still_serves();
}

#[test]
fn h2c_data_out_of_order() {
    let mut q = io_queue(false, false);
    let ttag = start_r2t_write(&mut q, 4, 64);
    let mut w = BytesMut::new();
    q.enc.h2c_data(&mut w, 4, ttag, 4096, &[1u8; 4096], false);
    q.send(&w);
    q.expect_term(Fes::DataTransferOutOfRange, Some(12));
    still_serves();
}

#[test]
fn h2c_data_beyond_maxh2cdata() {
    let mut q = io_queue(false, false);
    let ttag = start_r2t_write(&mut q, 4, 1024);
    let mut w = BytesMut::new();
    // 512 KiB in one PDU: twice the advertised MAXH2CDATA.
    q.enc
        .h2c_data(&mut w, 4, ttag, 0, &vec![1u8; 512 * 1024], true);
    q.send(&w[..24]);
    q.expect_term(Fes::DataTransferLimitExceeded, Some(4));
    still_serves();
}

#[test]
fn commands_before_connect_are_a_sequence_error() {
    let mut c = RawConn::connect(dnode().addr, true, false, false);
    let mut id = Sqe::new(admin_opc::IDENTIFY, 3, 0);
    id.cdw10 = 1.into();
    id.dptr = SglDescriptor::transport(4096);
    expect_status(&mut c, &id, Status::COMMAND_SEQUENCE_ERROR);
    still_serves();
}

#[test]
fn invalid_io_commands_get_nvme_statuses_and_the_queue_continues() {
    let mut q = io_queue(false, false);
    let mut op = Sqe::new(0x7c, 20, 1);
    op.dptr = SglDescriptor::transport(0);
    expect_status(&mut q, &op, Status::INVALID_OPCODE);
    let mut r = Sqe::new(nvm_opc::READ, 21, 1);
    r.set_slba(8192);
    r.dptr = SglDescriptor::transport(512);
    expect_status(&mut q, &r, Status::LBA_OUT_OF_RANGE);
    let mut r = Sqe::new(nvm_opc::READ, 22, 2);
    r.dptr = SglDescriptor::transport(512);
    expect_status(&mut q, &r, Status::INVALID_NAMESPACE);
    // SGL length disagreeing with NLB.
    let mut r = Sqe::new(nvm_opc::READ, 23, 1);
    r.dptr = SglDescriptor::transport(1024);
    expect_status(&mut q, &r, Status::DATA_SGL_LENGTH_INVALID);
    // In-capsule data shorter than the SGL says.
    let w = capsule(
        &q.enc,
        &write_sqe(24, 0, 4, SglDescriptor::in_capsule(2048)),
        &[0u8; 512],
    );
    q.send(&w);
    match q.recv() {
        Some(Pdu::CapsuleResp(c)) => assert_eq!(
            Status::from_word(c.status.get()),
            Status::DATA_SGL_LENGTH_INVALID
        ),
        other => panic!("{other:?}"),
    }
    // Unsupported SGL descriptor type.
    let mut r = Sqe::new(nvm_opc::READ, 25, 1);
    r.dptr = SglDescriptor::transport(512);
    r.dptr.type_subtype = 0x20;
    expect_status(&mut q, &r, Status::SGL_DESCRIPTOR_TYPE_INVALID);
    // A fused second half without its first.
    let mut w2 = write_sqe(26, 0, 1, SglDescriptor::in_capsule(512));
    w2.flags |= dase_protocol::nvme::fuse::SECOND;
    let w = capsule(&q.enc, &w2, &[0u8; 512]);
    q.send(&w);
    match q.recv() {
        Some(Pdu::CapsuleResp(c)) => {
            assert_eq!(Status::from_word(c.status.get()), Status::MISSING_FUSED)
        }
        other => panic!("{other:?}"),
    }
    // A fused first half followed by an unrelated command.
    let mut c1 = write_sqe(27, 0, 1, SglDescriptor::in_capsule(512));
    c1.opcode = nvm_opc::COMPARE;
    c1.flags |= dase_protocol::nvme::fuse::FIRST;
    let mut w = capsule(&q.enc, &c1, &[0u8; 512]);
    let mut r = Sqe::new(nvm_opc::READ, 28, 1);
    r.dptr = SglDescriptor::transport(512);
    q.enc.capsule_cmd(&mut w, &r, &[]);
    q.send(&w);
    let mut saw = Vec::new();
    while saw.len() < 2 {
        match q.recv() {
            Some(Pdu::CapsuleResp(c)) => saw.push((c.cid.get(), Status::from_word(c.status.get()))),
            Some(Pdu::C2HData { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(saw.contains(&(27, Status::MISSING_FUSED)), "{saw:?}");
    assert!(
        saw.contains(&(28, Status::SUCCESS)) || saw.len() == 2,
        "{saw:?}"
    );
    still_serves();
}

#[test]
fn garbage_and_abrupt_disconnects_do_not_hurt_the_target() {
    use std::io::Write;
    for seed in 0..20u64 {
        let mut s = std::net::TcpStream::connect(dnode().addr).unwrap();
        let _ = s.write_all(&pattern(200 + seed as usize * 37, seed));
        drop(s);
    }
    // Half a PDU, then close.
    let mut c = RawConn::connect(dnode().addr, true, false, false);
    let w = capsule(&c.enc, &Sqe::new(6, 1, 0), &[]);
    c.send(&w[..30]);
    drop(c);
    still_serves();
}
