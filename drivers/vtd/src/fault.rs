//! Fault records (VT-d spec 11.4.11) and their decoding.

use core::fmt;

/// One primary fault record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRecord {
    /// Requester id (bus << 8 | dev << 3 | fn).
    pub source_id: u16,
    /// Faulting address (page granular as reported, low 12 bits zero).
    pub address: u64,
    /// Fault reason code (spec appendix A).
    pub reason: u8,
    /// The request was a write (else a read).
    pub write: bool,
    /// PASID, when the request carried one.
    pub pasid: Option<u32>,
}

impl FaultRecord {
    /// Decodes the two 64-bit halves of a fault recording register (the F
    /// bit must be set).
    pub fn decode(lo: u64, hi: u64) -> Self {
        // T (bit 126): 0 write, 1 read. PP (bit 95) says whether PV (bits
        // 123:104) holds a PASID.
        let write = hi >> 62 & 1 == 0;
        let pasid = (hi >> 31 & 1 == 1).then_some(((hi >> 40) & 0xf_ffff) as u32);
        Self { source_id: hi as u16, address: lo & !0xfff, reason: (hi >> 32) as u8, write, pasid }
    }

    /// A short description of the reason.
    pub fn reason_name(&self) -> &'static str {
        reason_name(self.reason)
    }
}

/// Legacy mode: a write to a page without write permission.
pub const WRITE: u8 = 0x5;
/// Scalable mode: a write to a page without write permission.
pub const SM_WRITE: u8 = 0x85;

/// Description of a fault reason (spec appendix A). Legacy-mode codes are
/// below 0x30, scalable-mode codes from 0x30 on.
pub fn reason_name(reason: u8) -> &'static str {
    match reason {
        0x1 => "root entry not present",
        0x2 => "context entry not present",
        0x3 => "invalid context entry",
        0x4 => "address beyond the address width",
        0x5 => "write to a page without write permission",
        0x6 => "read of a page without read permission",
        0x7 => "second-stage table entry not readable",
        0x8 => "root table address not accessible",
        0x9 => "context table address not accessible",
        0xa => "reserved bits set in a root entry",
        0xb => "reserved bits set in a context entry",
        0xc => "reserved bits set in a page-table entry",
        0xd => "translation request blocked by the context entry",
        0x20 => "interrupt request with reserved fields set",
        0x21 => "interrupt index beyond the remapping table",
        0x22 => "interrupt remapping table entry not present",
        0x23 => "interrupt remapping table not accessible",
        0x24 => "reserved bits set in an interrupt remapping table entry",
        0x25 => "compatibility-format interrupt blocked",
        0x26 => "interrupt from a source the table entry does not allow",
        0x70 => "first-stage entry address not accessible",
        0x71 => "first-stage entry not present",
        0x72 => "reserved bits set in a first-stage entry",
        0x80 => "non-canonical first-stage address",
        0x81 => "user request through a supervisor-only first-stage entry",
        0x85 => "write to a page without write permission (scalable mode)",
        0x30..=0xff => "scalable-mode fault",
        _ => "other",
    }
}

impl fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DMA {} fault from {:02x}:{:02x}.{} at {:#x}: reason {:#x} ({})",
            if self.write { "write" } else { "read" },
            self.source_id >> 8,
            (self.source_id >> 3) & 0x1f,
            self.source_id & 7,
            self.address,
            self.reason,
            self.reason_name()
        )?;
        if let Some(p) = self.pasid {
            write!(f, " PASID {p:#x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_blocked_write() {
        // F set, T = 0 (write), reason 5, SID 00:01.0.
        let hi = 1u64 << 63 | 5 << 32 | 0x0008;
        let r = FaultRecord::decode(0x1234_5000, hi);
        assert_eq!(r, FaultRecord { source_id: 8, address: 0x1234_5000, reason: 5, write: true, pasid: None });
        assert_eq!(
            r.to_string(),
            "DMA write fault from 00:01.0 at 0x12345000: reason 0x5 (write to a page without write permission)"
        );
        let read = FaultRecord::decode(0, 1u64 << 63 | 1 << 62 | 6 << 32);
        assert!(!read.write);
    }
}
