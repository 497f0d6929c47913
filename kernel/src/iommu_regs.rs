//! Decoding of the IOMMU identification registers for reports and checks:
//! Intel VT-d VER/CAP/ECAP and AMD-Vi's extended feature register. Plain
//! bit arithmetic on values, so it is host-tested; the register access
//! itself lives with the drivers.

/// VT-d register offsets used here (VT-d spec, chapter 11).
pub mod vtd {
    /// Version register (32-bit).
    pub const VER: usize = 0x00;
    /// Capability register (64-bit).
    pub const CAP: usize = 0x08;
    /// Extended capability register (64-bit).
    pub const ECAP: usize = 0x10;
    /// Global status (32-bit).
    pub const GSTS: usize = 0x1c;
    /// Fault status (32-bit).
    pub const FSTS: usize = 0x34;
}

/// AMD-Vi MMIO offsets used here (AMD IOMMU spec, chapter 3).
pub mod amd {
    /// Control register (64-bit).
    pub const CONTROL: usize = 0x18;
    /// Extended feature register (64-bit).
    pub const EFR: usize = 0x30;
    /// Status register (64-bit).
    pub const STATUS: usize = 0x2020;
}

/// A decoded VT-d capability pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdCaps {
    /// Raw CAP.
    pub cap: u64,
    /// Raw ECAP.
    pub ecap: u64,
}

impl VtdCaps {
    fn bit(v: u64, b: u32) -> bool {
        v >> b & 1 != 0
    }
    /// Number of domain ids (CAP.ND).
    pub fn domains(&self) -> u32 {
        1 << (4 + 2 * (self.cap & 7))
    }
    /// Write-buffer flushing required (CAP.RWBF).
    pub fn rwbf(&self) -> bool {
        Self::bit(self.cap, 4)
    }
    /// Caching mode (CAP.CM).
    pub fn caching_mode(&self) -> bool {
        Self::bit(self.cap, 7)
    }
    /// Supported adjusted guest address widths (CAP.SAGAW) as bit widths.
    pub fn sagaw_bits(&self) -> impl Iterator<Item = u32> + '_ {
        let sagaw = (self.cap >> 8) & 0x1f;
        [(1, 39), (2, 48), (3, 57)].into_iter().filter(move |(b, _)| sagaw >> b & 1 != 0).map(|(_, w)| w)
    }
    /// Maximum guest address width (CAP.MGAW + 1).
    pub fn mgaw(&self) -> u32 {
        ((self.cap >> 16) & 0x3f) as u32 + 1
    }
    /// Fault recording registers' offset in bytes (CAP.FRO * 16).
    pub fn fault_record_offset(&self) -> u64 {
        ((self.cap >> 24) & 0x3ff) * 16
    }
    /// Second-level large page sizes (CAP.SLLPS): 2 MiB, 1 GiB.
    pub fn second_level_large_pages(&self) -> (bool, bool) {
        let s = (self.cap >> 34) & 0xf;
        (s & 1 != 0, s & 2 != 0)
    }
    /// Page-selective invalidation (CAP.PSI).
    pub fn psi(&self) -> bool {
        Self::bit(self.cap, 39)
    }
    /// Number of fault recording registers (CAP.NFR + 1).
    pub fn fault_records(&self) -> u32 {
        ((self.cap >> 40) & 0xff) as u32 + 1
    }
    /// Maximum address mask value for page-selective invalidation (CAP.MAMV).
    pub fn mamv(&self) -> u32 {
        ((self.cap >> 48) & 0x3f) as u32
    }
    /// First-stage 1 GiB pages (CAP.FS1GP).
    pub fn first_stage_1g(&self) -> bool {
        Self::bit(self.cap, 56)
    }
    /// Page-walk coherency (ECAP.C).
    pub fn coherent(&self) -> bool {
        Self::bit(self.ecap, 0)
    }
    /// Queued invalidation (ECAP.QI).
    pub fn queued_invalidation(&self) -> bool {
        Self::bit(self.ecap, 1)
    }
    /// Device-TLB (ECAP.DT).
    pub fn device_tlb(&self) -> bool {
        Self::bit(self.ecap, 2)
    }
    /// Interrupt remapping (ECAP.IR).
    pub fn interrupt_remapping(&self) -> bool {
        Self::bit(self.ecap, 3)
    }
    /// Extended interrupt mode, x2APIC ids (ECAP.EIM).
    pub fn eim(&self) -> bool {
        Self::bit(self.ecap, 4)
    }
    /// Pass-through (ECAP.PT).
    pub fn pass_through(&self) -> bool {
        Self::bit(self.ecap, 6)
    }
    /// Snoop control (ECAP.SC).
    pub fn snoop_control(&self) -> bool {
        Self::bit(self.ecap, 7)
    }
    /// IOTLB registers' offset in bytes (ECAP.IRO * 16).
    pub fn iotlb_offset(&self) -> u64 {
        ((self.ecap >> 8) & 0x3ff) * 16
    }
    /// Nested translation (ECAP.NEST).
    pub fn nested(&self) -> bool {
        Self::bit(self.ecap, 26)
    }
    /// PASID support (ECAP.PASID).
    pub fn pasid(&self) -> bool {
        Self::bit(self.ecap, 40)
    }
    /// Scalable-mode translation (ECAP.SMTS).
    pub fn scalable_mode(&self) -> bool {
        Self::bit(self.ecap, 43)
    }
    /// First-stage translation (ECAP.FLTS).
    pub fn first_stage(&self) -> bool {
        Self::bit(self.ecap, 47)
    }
    /// Second-stage translation (ECAP.SLTS).
    pub fn second_stage(&self) -> bool {
        Self::bit(self.ecap, 46)
    }
    /// Second-stage accessed/dirty (ECAP.SSADS).
    pub fn dirty_tracking(&self) -> bool {
        Self::bit(self.ecap, 50)
    }
}

/// A decoded AMD-Vi extended feature register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmdFeatures(pub u64);

impl AmdFeatures {
    fn bit(&self, b: u32) -> bool {
        self.0 >> b & 1 != 0
    }
    /// Names of the single-bit features that are set.
    pub fn flags(&self) -> impl Iterator<Item = &'static str> + '_ {
        [
            (0, "PreF"),
            (1, "PPR"),
            (2, "XT"),
            (3, "NX"),
            (4, "GT"),
            (6, "IA"),
            (7, "GA"),
            (8, "HE"),
            (9, "PC"),
            (46, "GAM"),
            (49, "HD"),
            (52, "HDS"),
        ]
        .into_iter()
        .filter(|(b, _)| self.bit(*b))
        .map(|(_, n)| n)
    }
    /// Host page-table levels supported (HATS: 4, 5 or 6).
    pub fn host_levels(&self) -> u32 {
        4 + ((self.0 >> 10) & 3) as u32
    }
    /// Guest page-table levels (GATS: 4 or 5).
    pub fn guest_levels(&self) -> u32 {
        4 + ((self.0 >> 12) & 3) as u32
    }
    /// Maximum PASID width in bits (PASmax + 1), 0 when PASIDs are absent.
    pub fn pasid_bits(&self) -> u32 {
        let m = ((self.0 >> 32) & 0x1f) as u32;
        if m == 0 { 0 } else { m + 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_default_vtd_capabilities_decode() {
        let c = VtdCaps { cap: 0x00d2_008c_222f_0606, ecap: 0xf0_0f4a };
        assert_eq!(c.domains(), 65536);
        assert_eq!(c.sagaw_bits().collect::<Vec<_>>(), vec![39, 48]);
        assert_eq!(c.mgaw(), 48);
        assert_eq!(c.fault_record_offset(), 0x220);
        assert_eq!(c.fault_records(), 1);
        assert_eq!(c.second_level_large_pages(), (true, true));
        assert!(c.psi());
        assert!(!c.caching_mode());
        assert!(c.queued_invalidation() && c.interrupt_remapping() && c.pass_through());
        assert!(!c.coherent() && !c.scalable_mode());
        assert_eq!(c.iotlb_offset(), 0xf0);
        let sm = VtdCaps { cap: c.cap, ecap: 0x0000_4800_80f0_0f4a };
        assert!(sm.scalable_mode());
        assert!(sm.second_stage());
    }
}
