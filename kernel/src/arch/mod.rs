//! CPU set-up: descriptor tables, exception entry, port I/O, QEMU exit.
//!
//! Everything here touches the processor directly and is compiled for the
//! bare-metal target only.

pub mod exit;
pub mod gdt;
pub mod idt;
pub mod ioapic;
pub mod irq;
pub mod port;

/// CPU identification for the platform report.
#[derive(Debug, Clone)]
pub struct CpuInfo {
    /// Vendor string ("GenuineIntel", "AuthenticAMD", ...).
    pub vendor: [u8; 12],
    /// Brand string (up to 48 bytes), trimmed.
    pub brand: [u8; 48],
    /// Family, model, stepping (display values).
    pub family: u32,
    /// Model (with extended model folded in).
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// Physical address bits (CPUID 0x8000_0008).
    pub phys_bits: u8,
    /// 1 GiB pages supported.
    pub page_1g: bool,
    /// Invariant TSC.
    pub invariant_tsc: bool,
}

impl CpuInfo {
    /// Vendor as text.
    pub fn vendor(&self) -> &str {
        core::str::from_utf8(&self.vendor).unwrap_or("?")
    }
    /// Brand as text.
    pub fn brand(&self) -> &str {
        let end = self.brand.iter().position(|&b| b == 0).unwrap_or(self.brand.len());
        core::str::from_utf8(&self.brand[..end]).unwrap_or("?").trim()
    }
}

/// Reads CPUID leaves for [`CpuInfo`].
pub fn cpu_info() -> CpuInfo {
    use core::arch::x86_64::__cpuid;
    let l0 = __cpuid(0);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&l0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&l0.edx.to_le_bytes());
    vendor[8..12].copy_from_slice(&l0.ecx.to_le_bytes());
    let l1 = __cpuid(1);
    let base_family = (l1.eax >> 8) & 0xf;
    let family = if base_family == 0xf { base_family + ((l1.eax >> 20) & 0xff) } else { base_family };
    let base_model = (l1.eax >> 4) & 0xf;
    let model =
        if base_family == 0x6 || base_family == 0xf { base_model | (((l1.eax >> 16) & 0xf) << 4) } else { base_model };
    let max_ext = __cpuid(0x8000_0000).eax;
    let mut brand = [0u8; 48];
    if max_ext >= 0x8000_0004 {
        for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
            let r = __cpuid(leaf);
            for (j, reg) in [r.eax, r.ebx, r.ecx, r.edx].iter().enumerate() {
                let o = i * 16 + j * 4;
                brand[o..o + 4].copy_from_slice(&reg.to_le_bytes());
            }
        }
    }
    let page_1g = max_ext >= 0x8000_0001 && __cpuid(0x8000_0001).edx & (1 << 26) != 0;
    let invariant_tsc = max_ext >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0;
    let phys_bits = if max_ext >= 0x8000_0008 { __cpuid(0x8000_0008).eax as u8 } else { 36 };
    CpuInfo { vendor, brand, family, model, stepping: l1.eax & 0xf, phys_bits, page_1g, invariant_tsc }
}

/// Stops this CPU for good (interrupts off, `hlt` loop).
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
