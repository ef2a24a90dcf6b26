//! Data-phase bookkeeping for one command: every data PDU must fall inside
//! the part of the transfer that is currently expected, in order.

use crate::decode::FatalError;
use crate::pdu::{data_offset, Fes};

/// The expected window of a command's data transfer: `[next, end)`.
///
/// For a read the window is the whole transfer (C2HData); for a write it is
/// the range the last R2T asked for (H2CData).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    next: u32,
    end: u32,
}

impl Transfer {
    pub const fn new(offset: u32, len: u32) -> Self {
        Self {
            next: offset,
            end: offset.saturating_add(len),
        }
    }

    /// Bytes still expected in this window.
    pub const fn remaining(&self) -> u32 {
        self.end - self.next
    }

    pub const fn is_complete(&self) -> bool {
        self.next == self.end
    }

    /// Accepts a data PDU with `datao`/`datal`; returns whether the window is
    /// now complete. Out-of-order or out-of-range data is a fatal error with
    /// the offset of the offending field, as a TermReq reports it.
    pub fn accept(&mut self, datao: u32, datal: u32) -> Result<bool, FatalError> {
        if datao != self.next {
            return Err(FatalError::new(
                Fes::DataTransferOutOfRange,
                data_offset::DATAO,
            ));
        }
        match datao.checked_add(datal) {
            Some(e) if e <= self.end => {
                self.next = e;
                Ok(self.is_complete())
            }
            _ => Err(FatalError::new(
                Fes::DataTransferOutOfRange,
                data_offset::DATAL,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_completes() {
        let mut t = Transfer::new(0, 8192);
        assert_eq!(t.accept(0, 4096), Ok(false));
        assert_eq!(t.accept(4096, 4096), Ok(true));
    }

    #[test]
    fn gaps_overlaps_and_overruns_are_fatal() {
        let mut t = Transfer::new(4096, 4096);
        assert_eq!(
            t.accept(0, 4096).unwrap_err().fes,
            Fes::DataTransferOutOfRange
        );
        assert_eq!(t.accept(4096, 8192).unwrap_err().fei, data_offset::DATAL);
        assert_eq!(
            t.accept(4096, u32::MAX).unwrap_err().fei,
            data_offset::DATAL
        );
    }
}
