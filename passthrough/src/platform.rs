//! What the host gives Portcullis: the [`Platform`] trait, implemented once
//! by the hypervisor (or kernel) that embeds the crate, and the adapters
//! that turn it into the drivers' seams (table memory, clock, physical
//! memory for iommufd, configuration space for scope resolution).
//!
//! Everything the crate touches outside its own heap goes through here:
//! no global allocator, statics or fixed addresses of its own.

use crate::{Bdf, PhysAddr};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::AtomicU64;
use portcullis_iommu::mmio::Mmio;

/// Why the platform refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformError {
    /// The register block cannot be mapped uncached.
    MmioUnmappable {
        /// Its physical base.
        phys: PhysAddr,
        /// Its length.
        len: u64,
    },
    /// The range is not RAM the platform lets the crate touch.
    NotRam {
        /// Its first byte.
        phys: PhysAddr,
        /// Its length.
        len: u64,
    },
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MmioUnmappable { phys, len } => write!(f, "cannot map {len:#x} bytes of registers at {phys}"),
            Self::NotRam { phys, len } => write!(f, "{len:#x} bytes at {phys} are not RAM"),
        }
    }
}

impl core::error::Error for PlatformError {}

/// Bus numbers of a PCI-to-PCI bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeBuses {
    /// Secondary bus (directly below the bridge).
    pub secondary: u8,
    /// Highest bus below the bridge.
    pub subordinate: u8,
}

/// One PCI function, as far as DMA isolation cares: where it sits in the
/// topology (requester ids are rewritten by some bridges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciFunction {
    /// Segment group.
    pub segment: u16,
    /// Bus, device, function.
    pub bdf: Bdf,
    /// The bridge this function sits behind (`None` on a root bus).
    pub parent: Option<Bdf>,
    /// Its bus numbers, when the function is a bridge.
    pub bridge: Option<BridgeBuses>,
    /// The device/port type of its PCI Express capability (0 endpoint,
    /// 4 root port, 7 PCIe-to-PCI bridge, ...), `None` without one.
    pub pcie_port_type: Option<u8>,
    /// It has an Access Control Services extended capability (so the
    /// functions of its device cannot reach each other peer to peer
    /// around the IOMMU when all have it).
    pub acs: bool,
}

/// The services a host gives Portcullis. Implement it once; every method
/// may be called from any CPU (hence `Send + Sync`), never from interrupt
/// context.
pub trait Platform: Send + Sync + 'static {
    /// Access to one IOMMU unit's register block (uncached, volatile,
    /// 32-bit accesses to 32-bit registers).
    type Mmio: Mmio + Send + Sync + 'static;

    /// Maps `len` bytes of device registers at `phys` uncached.
    fn map_mmio(&self, phys: PhysAddr, len: u64) -> Result<Self::Mmio, PlatformError>;

    /// Allocates `count` physically contiguous 4 KiB frames, zeroed (as the
    /// CPU sees them), at a multiple of `align` (a power of two, at least
    /// 4096). `None` when out of memory.
    fn alloc_frames(&self, count: usize, align: u64) -> Option<PhysAddr>;

    /// Returns frames from [`Self::alloc_frames`].
    fn free_frames(&self, phys: PhysAddr, count: usize);

    /// Reads the naturally aligned 64-bit word at `phys`, in frames this
    /// crate allocated (IOMMU tables), as one access.
    fn read_u64(&self, phys: PhysAddr) -> u64;

    /// Writes the naturally aligned 64-bit word at `phys` in one access (the
    /// IOMMU may read it at any moment and must never see half of it).
    fn write_u64(&self, phys: PhysAddr, value: u64);

    /// The 4 KiB frame at `phys` (one this crate allocated for an I/O page
    /// table) as 512 atomic words, the same memory [`Self::read_u64`] and
    /// [`Self::write_u64`] reach, valid while the frame stays allocated.
    /// With it, page tables map and unmap disjoint ranges from several
    /// threads at once (compare-and-swap installs, see the io-pgtable
    /// engine's concurrent path). `None`, the default: the platform offers
    /// no such view, and each domain maps under its lock. A platform
    /// returns `Some` for every such frame or for none, and says which
    /// with [`Self::has_table_words`].
    fn table_words(&self, phys: PhysAddr) -> Option<&[AtomicU64; 512]> {
        let _ = phys;
        None
    }

    /// Whether [`Self::table_words`] gives views. No, by default.
    fn has_table_words(&self) -> bool {
        false
    }

    /// Copies RAM at `phys` into `buf` (guest memory, for emulated
    /// accesses).
    fn read_phys(&self, phys: PhysAddr, buf: &mut [u8]) -> Result<(), PlatformError>;

    /// Copies `buf` into RAM at `phys`.
    fn write_phys(&self, phys: PhysAddr, buf: &[u8]) -> Result<(), PlatformError>;

    /// Writes back the CPU cache lines covering `[phys, phys + len)` and
    /// orders that before later device-visible writes (x86: `clflush`
    /// each line, then `mfence`). Called only for units whose table walks
    /// do not snoop.
    fn flush_cache(&self, phys: PhysAddr, len: u64);

    /// A monotonic clock in nanoseconds (bounds every wait on hardware).
    fn now_ns(&self) -> u64;

    /// Reads the aligned dword at `offset` of a function's configuration
    /// space; all ones for an absent function, as the hardware answers.
    fn pci_read32(&self, segment: u16, bdf: Bdf, offset: u16) -> u32;

    /// Writes `value` to the aligned dword at `offset` of a function's
    /// configuration space, as one access; ignored for an absent function.
    /// The crate writes only to quiesce a function it is taking back (see
    /// [`mod@crate::quiesce`]): its command register, MSI and MSI-X control,
    /// PCIe Device Control or AF Control (FLR), and its parent bridge's
    /// Bridge Control (secondary bus reset). The platform must not cache
    /// or emulate these registers.
    fn pci_write32(&self, segment: u16, bdf: Bdf, offset: u16, value: u32);

    /// The ACPI DMAR table's bytes, when the firmware has one.
    fn dmar(&self) -> Option<&[u8]>;

    /// The ACPI IVRS table's bytes, when the firmware has one.
    fn ivrs(&self) -> Option<&[u8]>;

    /// Every PCI function the host enumerated.
    fn pci_functions(&self) -> Vec<PciFunction>;
}

/// I/O page tables, IOMMU root/context/device tables and command rings, in
/// frames the platform allocates. Zeroed tables are written back before
/// any unit can see them when the unit does not snoop.
pub struct PlatformTables<P: Platform> {
    platform: Arc<P>,
    coherent: bool,
    /// The platform gives whole-table views ([`Platform::table_words`]).
    shared: bool,
}

impl<P: Platform> Clone for PlatformTables<P> {
    fn clone(&self) -> Self {
        Self { platform: self.platform.clone(), coherent: self.coherent, shared: self.shared }
    }
}

impl<P: Platform> fmt::Debug for PlatformTables<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlatformTables(coherent {})", self.coherent)
    }
}

impl<P: Platform> PlatformTables<P> {
    /// Tables for a unit whose walks do (`coherent`) or do not snoop.
    pub fn new(platform: Arc<P>, coherent: bool) -> Self {
        let shared = platform.has_table_words();
        Self { platform, coherent, shared }
    }

    fn fresh(&self, pages: usize, align: u64) -> Option<u64> {
        let phys = self.platform.alloc_frames(pages, align)?;
        if !self.coherent {
            // The frames are zero as the CPU sees them; the unit reads
            // memory, which may still hold what was there before.
            self.platform.flush_cache(phys, pages as u64 * 4096);
        }
        Some(phys.0)
    }
}

impl<P: Platform> io_pgtable::TableMemory for PlatformTables<P> {
    fn alloc_table(&mut self) -> Option<u64> {
        self.fresh(1, 4096)
    }
    fn free_table(&mut self, table: u64) {
        self.platform.free_frames(PhysAddr(table), 1);
    }
    fn read(&self, table: u64, index: usize) -> u64 {
        assert!(index < 512, "table index {index} out of range");
        self.platform.read_u64(PhysAddr(table + index as u64 * 8))
    }
    fn write(&mut self, table: u64, index: usize, value: u64) {
        assert!(index < 512, "table index {index} out of range");
        self.platform.write_u64(PhysAddr(table + index as u64 * 8), value)
    }
    fn coherent(&self) -> bool {
        self.coherent
    }
    fn flush(&mut self, phys: u64, len: u64) {
        self.platform.flush_cache(PhysAddr(phys), len)
    }
    fn shared(&self) -> Option<&dyn io_pgtable::SharedTableMemory> {
        if self.shared { Some(self) } else { None }
    }
}

/// Only used when the platform gives whole-table views
/// ([`io_pgtable::TableMemory::shared`] says so).
impl<P: Platform> io_pgtable::SharedTableMemory for PlatformTables<P> {
    fn alloc_shared(&self) -> Option<u64> {
        self.fresh(1, 4096)
    }
    fn free_shared(&self, table: u64) {
        self.platform.free_frames(PhysAddr(table), 1);
    }
    fn entries(&self, table: u64) -> &[AtomicU64; 512] {
        match self.platform.table_words(PhysAddr(table)) {
            Some(words) => words,
            None => panic!("the platform gave a view of one table frame but not of {table:#x}"),
        }
    }
    fn flush_shared(&self, phys: u64, len: u64) {
        self.platform.flush_cache(PhysAddr(phys), len)
    }
}

impl<P: Platform> amdvi::ContiguousMemory for PlatformTables<P> {
    fn alloc_contiguous(&mut self, pages: usize) -> Option<u64> {
        // Naturally aligned up to 2 MiB: the device table's base needs
        // only 4 KiB, but an aligned run never straddles a large page.
        let align = (pages.next_power_of_two() as u64 * 4096).min(2 << 20);
        self.fresh(pages, align)
    }
    fn free_contiguous(&mut self, base: u64, pages: usize) {
        self.platform.free_frames(PhysAddr(base), pages)
    }
}

/// The platform's clock as the drivers' [`portcullis_iommu::Clock`].
pub struct PlatformClock<P: Platform>(pub(crate) Arc<P>);

impl<P: Platform> portcullis_iommu::Clock for PlatformClock<P> {
    fn now_ns(&self) -> u64 {
        self.0.now_ns()
    }
}

impl<P: Platform> fmt::Debug for PlatformClock<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlatformClock")
    }
}

/// The platform's RAM as iommufd's physical memory (guest RAM regions and
/// accesses read and write through it).
pub struct PlatformPhys<P: Platform>(pub(crate) Arc<P>);

impl<P: Platform> fmt::Debug for PlatformPhys<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlatformPhys")
    }
}

impl<P: Platform> iommufd::memsrc::PhysMemory for PlatformPhys<P> {
    fn read(&self, phys: u64, buf: &mut [u8]) -> iommufd::Result<()> {
        self.0.read_phys(PhysAddr(phys), buf).map_err(|_| iommufd::Errno::EFAULT)
    }
    fn write(&self, phys: u64, buf: &[u8]) -> iommufd::Result<()> {
        self.0.write_phys(PhysAddr(phys), buf).map_err(|_| iommufd::Errno::EFAULT)
    }
}

/// Configuration space for resolving DMAR device scopes.
pub(crate) struct ConfigSpace<'a, P: Platform>(pub(crate) &'a P);

impl<P: Platform> acpi_tables::scope::ConfigSpace for ConfigSpace<'_, P> {
    fn read_u32(&self, segment: u16, bdf: Bdf, offset: u16) -> Option<u32> {
        let v = self.0.pci_read32(segment, bdf, offset);
        // An absent function answers all ones (vendor id 0xffff).
        (self.0.pci_read32(segment, bdf, 0) != u32::MAX).then_some(v)
    }
}
