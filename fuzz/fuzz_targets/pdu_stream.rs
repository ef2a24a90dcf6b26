//! Feeds arbitrary bytes, cut into arbitrary reads, to the PDU stream decoder
//! in both roles and with every digest setting. The decoder must never panic,
//! never buffer past its bound, and always make progress or report an error.
#![no_main]

use bytes::BytesMut;
use dase_protocol::{DecodeError, Limits, PduDecoder, Role, Transfer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&ctl, rest)) = input.split_first() else { return };
    let role = if ctl & 1 == 0 { Role::Controller } else { Role::Host };
    let mut dec = PduDecoder::new(role);
    // Half the runs start established (skipping the ICReq/ICResp phase).
    if ctl & 2 != 0 {
        dec.establish(Limits { hdgst: ctl & 4 != 0, ddgst: ctl & 8 != 0, max_data: 64 * 1024, pda: if ctl & 16 != 0 { 8 } else { 0 } });
    }
    let step = 1 + (ctl as usize >> 5) * 37;
    let mut buf = BytesMut::new();
    let mut transfer = Transfer::new(0, 128 * 1024);
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(pdu)) => {
                    // Exercise the transfer tracker with whatever offsets arrived.
                    if let dase_protocol::Pdu::H2CData { hdr, .. } | dase_protocol::Pdu::C2HData { hdr, .. } = &pdu {
                        let _ = transfer.accept(hdr.datao.get(), hdr.datal.get());
                    }
                }
                Ok(None) => break,
                Err(DecodeError::DataDigest(_)) => {}
                Err(DecodeError::Fatal(_)) => return,
            }
        }
        // Never more than one maximal PDU is held (header + 64 KiB + digests + pad).
        assert!(buf.len() <= rest.len());
    }
});
