//! The kernel as a `portcullis::Platform`: what the passthrough crate needs
//! of a host, implemented over this kernel's uncached MMIO window, frame
//! allocator, direct map, TSC clock, ECAM (read, and written to quiesce a device) and ACPI
//! copies.
//!
//! This is the only IOMMU-related `unsafe` in the kernel: volatile register
//! accesses, table words through the direct map (one at a time, or a whole
//! table as atomics for concurrent map/unmap), cache-line flushes. Every
//! VT-d and AMD-Vi decision lives in the drivers and the passthrough crate;
//! the kernel is one implementation of the platform, as a hypervisor
//! embedding Portcullis would write its own.

use crate::ecam::Ecam;
use crate::mem::{alloc_frames, free_frames, map_mmio, phys_to_virt};
use crate::pci::ConfigAccess;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::AtomicU64;
use portcullis::{Bdf, BridgeBuses, PciFunction, PhysAddr, PlatformError};

/// A unit's register block, mapped uncached.
#[derive(Debug, Clone, Copy)]
pub struct KernelMmio {
    base: *mut u8,
    len: usize,
}

// SAFETY: the pointer is to device registers mapped for the kernel's whole
// lifetime; register accesses are independent volatile operations.
unsafe impl Send for KernelMmio {}
// SAFETY: as above.
unsafe impl Sync for KernelMmio {}

impl KernelMmio {
    /// Maps `len` bytes of registers at physical `base`.
    pub fn map(base: u64, len: usize) -> Result<Self, crate::mem::paging::MapError> {
        Ok(Self { base: map_mmio(base, len as u64)?, len })
    }

    #[inline]
    fn at<T>(&self, offset: usize) -> *mut T {
        assert!(offset + core::mem::size_of::<T>() <= self.len, "register offset {offset:#x} outside the block");
        assert!(offset.is_multiple_of(core::mem::size_of::<T>()), "misaligned register access at {offset:#x}");
        // In bounds of the mapping, checked above.
        self.base.wrapping_add(offset).cast()
    }
}

impl portcullis::Mmio for KernelMmio {
    #[inline]
    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: `at` checked the offset lies in the mapped, aligned block.
        unsafe { self.at::<u32>(offset).read_volatile() }
    }
    #[inline]
    fn read64(&self, offset: usize) -> u64 {
        // SAFETY: as for read32.
        unsafe { self.at::<u64>(offset).read_volatile() }
    }
    #[inline]
    fn write32(&self, offset: usize, value: u32) {
        // SAFETY: as for read32; writing an IOMMU register affects DMA only.
        unsafe { self.at::<u32>(offset).write_volatile(value) }
    }
    #[inline]
    fn write64(&self, offset: usize, value: u64) {
        // SAFETY: as for write32.
        unsafe { self.at::<u64>(offset).write_volatile(value) }
    }
}

/// The kernel's platform: the ACPI tables and PCI functions found at boot.
#[derive(Debug)]
pub struct KernelHost {
    dmar: Option<Vec<u8>>,
    ivrs: Option<Vec<u8>>,
    functions: Vec<PciFunction>,
    ecam: Ecam,
}

impl KernelHost {
    /// The platform `p` describes.
    pub fn new(p: &crate::Platform) -> Arc<Self> {
        let acpi = p.acpi.as_ref().ok();
        let regions = acpi.map(|a| a.mcfg.clone()).unwrap_or_default();
        let functions = p
            .pci
            .iter()
            .map(|d| PciFunction {
                segment: d.segment,
                bdf: d.bdf,
                parent: d.parent,
                bridge: d.bridge.map(|b| BridgeBuses { secondary: b.secondary, subordinate: b.subordinate }),
                pcie_port_type: d.pcie.map(|x| x.port_type),
                acs: d.pcie.is_some() && has_acs(&p.ecam, d.segment, d.bdf),
            })
            .collect();
        Arc::new(Self {
            dmar: acpi.and_then(|a| a.dmar.clone()),
            ivrs: acpi.and_then(|a| a.ivrs.clone()),
            functions,
            ecam: Ecam::new(&regions),
        })
    }
}

/// Whether the function has an Access Control Services extended capability
/// (ID 0x000d) in its PCI Express extended configuration space.
fn has_acs(ecam: &Ecam, segment: u16, bdf: Bdf) -> bool {
    let mut offset = 0x100u16;
    // At most (4096 - 256) / 4 headers; a loop in the list ends here.
    for _ in 0..960 {
        let header = ecam.read32(segment, bdf, offset);
        if header == 0 || header == u32::MAX {
            return false;
        }
        if header & 0xffff == 0x000d {
            return true;
        }
        let next = (header >> 20) as u16 & !3;
        if next < 0x100 {
            return false;
        }
        offset = next;
    }
    false
}

/// Whether `[phys, phys + len)` is frames the kernel's RAM covers.
fn ram(phys: u64, len: u64) -> Result<(), PlatformError> {
    if crate::mem::is_direct_mapped(phys, len) {
        Ok(())
    } else {
        Err(PlatformError::NotRam { phys: PhysAddr(phys), len })
    }
}

impl portcullis::Platform for KernelHost {
    type Mmio = KernelMmio;

    fn map_mmio(&self, phys: PhysAddr, len: u64) -> Result<KernelMmio, PlatformError> {
        KernelMmio::map(phys.0, len as usize).map_err(|_| PlatformError::MmioUnmappable { phys, len })
    }
    fn alloc_frames(&self, count: usize, align: u64) -> Option<PhysAddr> {
        alloc_frames(count, align).ok().map(PhysAddr)
    }
    fn free_frames(&self, phys: PhysAddr, count: usize) {
        if let Err(e) = free_frames(phys.0, count) {
            // Frames the crate did not get from us: a bug above; the
            // frames stay as they are.
            log::error!("free_frames({phys}, {count}): {e:?}");
        }
    }
    #[inline]
    fn read_u64(&self, phys: PhysAddr) -> u64 {
        assert!(phys.0.is_multiple_of(8), "misaligned table word at {phys}");
        // SAFETY: `phys` is an aligned word in a frame the passthrough crate
        // allocated from us (RAM, direct-mapped); the unit may write it
        // (status words), hence volatile.
        unsafe { phys_to_virt(phys.0).cast::<u64>().read_volatile() }
    }
    #[inline]
    fn write_u64(&self, phys: PhysAddr, value: u64) {
        assert!(phys.0.is_multiple_of(8), "misaligned table word at {phys}");
        // SAFETY: as for read_u64; the word is written whole.
        unsafe { phys_to_virt(phys.0).cast::<u64>().write_volatile(value) }
    }
    fn has_table_words(&self) -> bool {
        true
    }
    fn table_words(&self, phys: PhysAddr) -> Option<&[AtomicU64; 512]> {
        if !phys.0.is_multiple_of(4096) || ram(phys.0, 4096).is_err() {
            return None;
        }
        // SAFETY: `phys` is a 4 KiB-aligned RAM frame, and the direct map
        // covers all RAM for the kernel's whole life, so the pointer is
        // valid and aligned for 512 `AtomicU64`, which have the layout of
        // `u64`. Every access to these words is a whole aligned 8-byte
        // access: atomics here, volatile ones in read_u64/write_u64 (used
        // under the domain's lock, never at the same time as the atomics
        // of a concurrent map), and the IOMMU's own.
        Some(unsafe { &*phys_to_virt(phys.0).cast::<[AtomicU64; 512]>() })
    }
    fn read_phys(&self, phys: PhysAddr, buf: &mut [u8]) -> Result<(), PlatformError> {
        ram(phys.0, buf.len() as u64)?;
        // SAFETY: [phys, phys + len) lies in RAM, which the direct map
        // covers; the bytes are plain memory the caller pinned or owns.
        unsafe { core::ptr::copy_nonoverlapping(phys_to_virt(phys.0), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    fn write_phys(&self, phys: PhysAddr, buf: &[u8]) -> Result<(), PlatformError> {
        ram(phys.0, buf.len() as u64)?;
        // SAFETY: as for read_phys; the destination is RAM the caller pinned.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), phys_to_virt(phys.0), buf.len()) };
        Ok(())
    }
    #[inline]
    fn flush_cache(&self, phys: PhysAddr, len: u64) {
        let mut line = phys.0 & !63;
        while line < phys.0 + len {
            // SAFETY: clflush of a direct-mapped RAM line has no effect on
            // memory contents; the line lies in a frame the crate owns.
            unsafe { core::arch::x86_64::_mm_clflush(phys_to_virt(line)) };
            line += 64;
        }
        // SAFETY: a fence orders the flushes before later device-visible
        // writes (the register write that makes the hardware look).
        unsafe { core::arch::x86_64::_mm_mfence() };
    }
    #[inline]
    fn now_ns(&self) -> u64 {
        crate::time::uptime_ns()
    }
    fn pci_read32(&self, segment: u16, bdf: Bdf, offset: u16) -> u32 {
        self.ecam.read32(segment, bdf, offset)
    }
    fn pci_write32(&self, segment: u16, bdf: Bdf, offset: u16, value: u32) {
        self.ecam.write32(segment, bdf, offset, value)
    }
    fn dmar(&self) -> Option<&[u8]> {
        self.dmar.as_deref()
    }
    fn ivrs(&self) -> Option<&[u8]> {
        self.ivrs.as_deref()
    }
    fn pci_functions(&self) -> Vec<PciFunction> {
        self.functions.clone()
    }
}

/// The IOMMUs of this kernel's machine.
pub type Iommus = portcullis::Iommus<KernelHost>;
/// A guest's DMA view on this kernel's machine.
pub type GuestDma = portcullis::GuestDma<KernelHost>;
