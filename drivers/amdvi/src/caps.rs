//! What a unit can do: the Extended Feature Register (spec §3.4, MMIO
//! 0030h) and, when the kernel passes them, the IOMMU PCI capability
//! header and Miscellaneous Information register 0 (spec §3.2.2.1 and
//! §3.2.2.5).

use alloc::vec::Vec;
use core::fmt;

/// EFR bits (MMIO 0030h).
pub mod efr {
    /// PreFSup: PREFETCH_IOMMU_PAGES.
    pub const PREF: u64 = 1 << 0;
    /// PPRSup: peripheral page requests.
    pub const PPR: u64 = 1 << 1;
    /// XTSup: x2APIC interrupt format.
    pub const XT: u64 = 1 << 2;
    /// NXSup: no-execute protection.
    pub const NX: u64 = 1 << 3;
    /// GTSup: guest (nested) translation.
    pub const GT: u64 = 1 << 4;
    /// IASup: INVALIDATE_IOMMU_ALL.
    pub const IA: u64 = 1 << 6;
    /// GASup: guest virtual APIC.
    pub const GA: u64 = 1 << 7;
    /// HESup: hardware error registers.
    pub const HE: u64 = 1 << 8;
    /// PCSup: performance counters.
    pub const PC: u64 = 1 << 9;
    /// HATS (bits 11:10): host page-table levels, 0 = 4, 1 = 5, 2 = 6, 3
    /// reserved.
    pub const HATS_SHIFT: u32 = 10;
    /// GATS (bits 13:12): guest page-table levels (0 = 4, 1 = 5).
    pub const GATS_SHIFT: u32 = 12;
    /// PASmax (bits 36:32): largest PASID is 2^(PASmax + 1) - 1.
    pub const PASMAX_SHIFT: u32 = 32;
    /// DevTblSegSup (bits 39:38): device table segmentation.
    pub const DEV_TBL_SEG_SHIFT: u32 = 38;
    /// HASup: host access bit.
    pub const HA: u64 = 1 << 49;
    /// HDSup: host dirty bit.
    pub const HD: u64 = 1 << 52;
    /// SNPSup: SEV-SNP.
    pub const SNP: u64 = 1 << 63;
}

/// IOMMU capability header bits (PCI capability offset 00h).
pub mod cap_header {
    /// Capability id of the IOMMU's secure device capability.
    pub const ID: u32 = 0x0f;
    /// IotlbSup: remote (device) IOTLBs.
    pub const IOTLB_SUP: u32 = 1 << 24;
    /// HtTunnel.
    pub const HT_TUNNEL: u32 = 1 << 25;
    /// NpCache: the unit caches not-present entries; software must
    /// invalidate after making an entry present.
    pub const NP_CACHE: u32 = 1 << 26;
    /// EFRSup: the Extended Feature Register exists.
    pub const EFR_SUP: u32 = 1 << 27;
    /// CapExt: the capability has the extended fields.
    pub const CAP_EXT: u32 = 1 << 28;
}

/// A unit's capabilities, as the driver and the platform report need them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// Raw Extended Feature Register.
    pub efr: u64,
    /// Raw PCI capability header, when the kernel read it.
    pub cap_header: Option<u32>,
    /// Raw Miscellaneous Information register 0, when the kernel read it.
    pub misc: Option<u32>,
}

impl Caps {
    /// Capabilities from the EFR alone.
    pub const fn from_efr(efr: u64) -> Self {
        Self { efr, cap_header: None, misc: None }
    }

    const fn bit(&self, b: u64) -> bool {
        self.efr & b != 0
    }

    /// INVALIDATE_IOMMU_ALL is implemented (IASup).
    pub const fn invalidate_all(&self) -> bool {
        self.bit(efr::IA)
    }
    /// PREFETCH_IOMMU_PAGES is implemented (PreFSup).
    pub const fn prefetch(&self) -> bool {
        self.bit(efr::PREF)
    }
    /// Peripheral page requests (PPRSup).
    pub const fn ppr(&self) -> bool {
        self.bit(efr::PPR)
    }
    /// x2APIC interrupt format (XTSup).
    pub const fn x2apic(&self) -> bool {
        self.bit(efr::XT)
    }
    /// No-execute protection (NXSup).
    pub const fn nx(&self) -> bool {
        self.bit(efr::NX)
    }
    /// Guest translation (GTSup).
    pub const fn guest_translation(&self) -> bool {
        self.bit(efr::GT)
    }
    /// Guest virtual APIC (GASup).
    pub const fn guest_apic(&self) -> bool {
        self.bit(efr::GA)
    }
    /// Hardware error registers (HESup).
    pub const fn hardware_errors(&self) -> bool {
        self.bit(efr::HE)
    }
    /// Performance counters (PCSup).
    pub const fn perf_counters(&self) -> bool {
        self.bit(efr::PC)
    }
    /// SEV-SNP support (SNPSup).
    pub const fn snp(&self) -> bool {
        self.bit(efr::SNP)
    }
    /// Host dirty bits (EFR.HDSup, bit 52): with HAD = 11b in a DTE the
    /// unit sets D in the host PTEs a device writes through, what dirty
    /// tracking needs.
    pub const fn host_dirty(&self) -> bool {
        self.bit(efr::HD)
    }
    /// Raw HATS field.
    pub const fn hats(&self) -> u8 {
        ((self.efr >> efr::HATS_SHIFT) & 3) as u8
    }
    /// The most host page-table levels a device table entry may name
    /// (4, 5 or 6); `None` when HATS holds the reserved value 3 (host
    /// translation unusable).
    pub const fn max_levels(&self) -> Option<u32> {
        match self.hats() {
            3 => None,
            h => Some(4 + h as u32),
        }
    }
    /// Raw GATS field.
    pub const fn gats(&self) -> u8 {
        ((self.efr >> efr::GATS_SHIFT) & 3) as u8
    }
    /// Guest page-table levels (GATS: 4 or 5; `None` when reserved).
    pub const fn guest_levels(&self) -> Option<u32> {
        match self.gats() {
            0 => Some(4),
            1 => Some(5),
            _ => None,
        }
    }
    /// PASmax field.
    pub const fn pasmax(&self) -> u8 {
        ((self.efr >> efr::PASMAX_SHIFT) & 0x1f) as u8
    }
    /// PASID width in bits: the largest PASID is 2^(PASmax + 1) - 1
    /// (spec §3.4, EFR PASmax), so PASmax + 1 bits. `None` when the unit
    /// takes no PASIDs at all (neither GTSup nor PPRSup), where PASmax
    /// means nothing.
    pub const fn pasid_bits(&self) -> Option<u32> {
        if self.guest_translation() || self.ppr() { Some(self.pasmax() as u32 + 1) } else { None }
    }
    /// DevTblSegSup field (0: one device table).
    pub const fn dev_table_segments(&self) -> u8 {
        ((self.efr >> efr::DEV_TBL_SEG_SHIFT) & 3) as u8
    }
    /// The unit caches not-present entries (capability header NpCache;
    /// `true` when the header is unknown, the safe assumption).
    pub fn np_cache(&self) -> bool {
        self.cap_header.is_none_or(|h| h & cap_header::NP_CACHE != 0)
    }
    /// Device IOTLBs (capability header IotlbSup).
    pub fn device_iotlb(&self) -> Option<bool> {
        self.cap_header.map(|h| h & cap_header::IOTLB_SUP != 0)
    }
    /// Virtual address size in bits (misc VAsize, bits 21:15).
    pub fn va_bits(&self) -> Option<u8> {
        self.misc.map(|m| ((m >> 15) & 0x7f) as u8)
    }
    /// Physical address size in bits (misc PAsize, bits 14:8).
    pub fn pa_bits(&self) -> Option<u8> {
        self.misc.map(|m| ((m >> 8) & 0x7f) as u8)
    }
    /// MSI message number for events (misc MsiNum, bits 4:0).
    pub fn msi_num(&self) -> Option<u8> {
        self.misc.map(|m| (m & 0x1f) as u8)
    }

    /// Names of the EFR features that are set, for the platform report.
    pub fn feature_names(&self) -> Vec<&'static str> {
        const NAMES: [(u64, &str); 12] = [
            (efr::PREF, "PreF"),
            (efr::PPR, "PPR"),
            (efr::XT, "XT"),
            (efr::NX, "NX"),
            (efr::GT, "GT"),
            (efr::IA, "IA"),
            (efr::GA, "GA"),
            (efr::HE, "HE"),
            (efr::PC, "PC"),
            (efr::HA, "HA"),
            (efr::HD, "HD"),
            (efr::SNP, "SNP"),
        ];
        NAMES.iter().filter(|(b, _)| self.efr & b != 0).map(|(_, n)| *n).collect()
    }
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EFR {:#x}", self.efr)?;
        match self.max_levels() {
            Some(l) => write!(f, ", host tables up to {l} levels")?,
            None => write!(f, ", host translation unusable (HATS reserved)")?,
        }
        write!(f, ", features [{}]", self.feature_names().join(" "))?;
        if let (Some(va), Some(pa)) = (self.va_bits(), self.pa_bits()) {
            write!(f, ", VA {va} bits, PA {pa} bits")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's EFR (PreF, PPR, GT, IA, GA, HE, GATS = 2, HATS = 2).
    const QEMU_EFR: u64 = 0x29d3;

    #[test]
    fn decodes_qemus_efr() {
        let c = Caps::from_efr(QEMU_EFR);
        assert!(c.invalidate_all() && c.prefetch() && c.ppr() && c.guest_translation() && c.hardware_errors());
        assert!(!c.x2apic() && !c.nx() && !c.perf_counters());
        assert_eq!(c.max_levels(), Some(6));
        assert_eq!(c.guest_levels(), None, "QEMU reports the reserved GATS value 2");
        assert_eq!(c.gats(), 2);
        assert_eq!(c.pasmax(), 0);
        assert_eq!(c.pasid_bits(), Some(1), "GTSup with PASmax 0: PASIDs 0 and 1");
        assert_eq!(c.feature_names(), ["PreF", "PPR", "GT", "IA", "GA", "HE"]);
        assert!(c.np_cache(), "unknown header: assume not-present caching");
    }

    #[test]
    fn feature_bits_levels_and_pasids() {
        // The single-bit features the report names, at the spec's positions
        // (HASup 49, HDSup 52, SNPSup 63; bit 46 is none of them).
        assert_eq!(Caps::from_efr(1 << 49 | 1 << 52 | 1 << 63).feature_names(), ["HA", "HD", "SNP"]);
        assert!(Caps::from_efr(1 << 46).feature_names().is_empty());
        assert_eq!(Caps::from_efr(0).guest_levels(), Some(4));
        assert_eq!(Caps::from_efr(1 << 12).guest_levels(), Some(5));
        assert_eq!(Caps::from_efr(3 << 12).guest_levels(), None);
        // PASmax 15: 16-bit PASIDs; no GTSup and no PPRSup: no PASIDs.
        assert_eq!(Caps::from_efr(efr::GT | 15 << 32).pasid_bits(), Some(16));
        assert_eq!(Caps::from_efr(efr::PPR | 19 << 32).pasid_bits(), Some(20));
        assert_eq!(Caps::from_efr(15 << 32).pasid_bits(), None);
    }

    #[test]
    fn hats_levels_and_header_fields() {
        assert_eq!(Caps::from_efr(0).max_levels(), Some(4));
        assert_eq!(Caps::from_efr(1 << 10).max_levels(), Some(5));
        assert_eq!(Caps::from_efr(3 << 10).max_levels(), None);
        // QEMU's capability header and misc register.
        let c = Caps { efr: QEMU_EFR, cap_header: Some(0x1f03_000f), misc: Some(0x0018_2e00) };
        assert!(c.np_cache());
        assert_eq!(c.device_iotlb(), Some(true));
        assert_eq!((c.va_bits(), c.pa_bits(), c.msi_num()), (Some(48), Some(46), Some(0)));
        assert_eq!(
            c.to_string(),
            "EFR 0x29d3, host tables up to 6 levels, features [PreF PPR GT IA GA HE], VA 48 bits, PA 46 bits"
        );
    }
}
