//! # Portcullis: device passthrough for Rust hypervisors
//!
//! This crate brings up every Intel VT-d and AMD-Vi IOMMU a machine's ACPI
//! tables describe and gives each guest a DMA view: the guest's RAM mapped
//! at IOVA = guest physical address, the devices it is given translated
//! through that map, their MSIs remapped to the vectors the hypervisor
//! chooses. A device's DMA then reaches exactly the guest's memory and
//! nothing else; a device nobody was given stays blocked.
//!
//! It is `no_std` + `alloc`, has no global allocator, panic handler,
//! statics or fixed addresses, and reaches the machine only through the
//! [`Platform`] trait the hypervisor implements once.
//!
//! ```text
//!   hypervisor ── Platform (MMIO, frames, RAM, clock, PCI, ACPI bytes)
//!       │
//!       ├─ Iommus::bring_up(platform)      every unit up, every device blocked;
//!       │    groups, owners, claim_for_host / release_host, host_faults
//!       └─ GuestDma (one per guest, or    iommufd IOAS with RAM at IOVA = GPA
//!          new_host for the host's own)
//!             ├─ add_memory / remove_memory
//!             ├─ assign / unassign          claims the isolation group; attach through
//!             │                              the generic Device/Domain; unassign
//!             │                              quiesces and resets first (quiesce)
//!             ├─ route_msi / retarget_msi / free_msi, set_cpus
//!             └─ dma_faults                  the guest's own fault stream
//!       Iommus::route_ioapic / retarget_ioapic / free_ioapic
//!                                          the host's IOAPIC pins through remapping
//! ```
//!
//! Ownership is machine-wide ([`ownership`]): functions the IOMMU cannot
//! tell apart form an isolation group, and a group belongs to the host,
//! one guest, or nobody (blocked), never to two.
//!
//! Underneath are the vendor-generic unit traits of `portcullis_iommu::unit`
//! (implemented by the `vtd` and `amdvi` drivers) and the iommufd object
//! model ([`GuestDma::ictx`]), which a VMM can use directly for more (several
//! IOAS, accesses for emulated devices, the Linux uAPI dispatcher).
//!
//! ## Example
//!
//! A platform with neither DMAR nor IVRS: nothing can be isolated, so
//! nothing can be assigned, but guest memory can be described.
//!
//! ```
//! use portcullis::{Bdf, GuestAddr, GuestDma, Iommus, PassthroughError, PciFunction, PhysAddr, Platform, PlatformError};
//! use std::sync::{Arc, Mutex};
//!
//! /// A host with 16 MiB of "RAM" on the heap at physical 0x100_0000.
//! struct Host { ram: Mutex<Vec<u8>>, next: Mutex<u64> }
//! const BASE: u64 = 0x100_0000;
//!
//! struct NoMmio;
//! impl portcullis::Mmio for NoMmio {
//!     fn read32(&self, _: usize) -> u32 { !0 }
//!     fn read64(&self, _: usize) -> u64 { !0 }
//!     fn write32(&self, _: usize, _: u32) {}
//!     fn write64(&self, _: usize, _: u64) {}
//! }
//!
//! impl Platform for Host {
//!     type Mmio = NoMmio;
//!     fn map_mmio(&self, phys: PhysAddr, len: u64) -> Result<NoMmio, PlatformError> {
//!         Err(PlatformError::MmioUnmappable { phys, len })
//!     }
//!     fn alloc_frames(&self, count: usize, _align: u64) -> Option<PhysAddr> {
//!         let mut next = self.next.lock().unwrap();
//!         let at = *next;
//!         *next += count as u64 * 4096;
//!         Some(PhysAddr(at))
//!     }
//!     fn free_frames(&self, _: PhysAddr, _: usize) {}
//!     fn read_u64(&self, p: PhysAddr) -> u64 {
//!         let i = (p.0 - BASE) as usize;
//!         u64::from_le_bytes(self.ram.lock().unwrap()[i..i + 8].try_into().unwrap())
//!     }
//!     fn write_u64(&self, p: PhysAddr, v: u64) {
//!         let i = (p.0 - BASE) as usize;
//!         self.ram.lock().unwrap()[i..i + 8].copy_from_slice(&v.to_le_bytes());
//!     }
//!     fn read_phys(&self, p: PhysAddr, buf: &mut [u8]) -> Result<(), PlatformError> {
//!         let i = (p.0 - BASE) as usize;
//!         buf.copy_from_slice(&self.ram.lock().unwrap()[i..i + buf.len()]);
//!         Ok(())
//!     }
//!     fn write_phys(&self, p: PhysAddr, buf: &[u8]) -> Result<(), PlatformError> {
//!         let i = (p.0 - BASE) as usize;
//!         self.ram.lock().unwrap()[i..i + buf.len()].copy_from_slice(buf);
//!         Ok(())
//!     }
//!     fn flush_cache(&self, _: PhysAddr, _: u64) {}
//!     fn now_ns(&self) -> u64 { 0 }
//!     fn pci_read32(&self, _: u16, _: Bdf, _: u16) -> u32 { !0 }
//!     fn pci_write32(&self, _: u16, _: Bdf, _: u16, _: u32) {}
//!     fn dmar(&self) -> Option<&[u8]> { None }
//!     fn ivrs(&self) -> Option<&[u8]> { None }
//!     fn pci_functions(&self) -> Vec<PciFunction> { Vec::new() }
//! }
//!
//! let host = Arc::new(Host { ram: Mutex::new(vec![0; 16 << 20]), next: Mutex::new(BASE) });
//! let iommus = Iommus::bring_up(host);
//! let mut guest = GuestDma::new(&iommus, 1 << 20)?;
//! // Guest RAM: GPA 0..2 MiB is host physical 0x180_0000..
//! guest.add_memory(GuestAddr(0), PhysAddr(0x180_0000), 2 << 20, true)?;
//! // No IOMMU translates 00:03.0, so it cannot be given to the guest.
//! let bdf = Bdf::new(0, 3, 0);
//! assert!(matches!(guest.assign(&iommus, 0, bdf), Err(PassthroughError::NotIsolated(_))));
//! guest.remove_memory(GuestAddr(0), 2 << 20)?;
//! # Ok::<(), PassthroughError>(())
//! ```
//!
//! With a DMAR or IVRS the same calls bring the units up, `assign`
//! attaches the device (VT-d context or PASID entry, AMD-Vi device table
//! entry) to the guest's domain, and `route_msi` returns the address/data
//! pair to program into the device.
//!
//! ## One table for the CPU and the device
//!
//! [`GuestDma::new_sharing_table`] is a per-guest choice (separate tables,
//! [`GuestDma::new`], stay the default): the guest's devices walk the
//! hypervisor's own x86-64 4-level table, its AMD nested page table, at
//! IOVA = GPA, so the IOMMU keeps no page table of its own and a change
//! is made once; after each change the hypervisor flushes the CPU's
//! nested TLB (VMCB TLB control) and calls [`GuestDma::invalidate_table`]
//! (PASID-based IOTLB invalidation). Only VT-d in scalable mode with
//! first-stage translation (ECAP.FSTS; QEMU `x-scalable-mode=on,x-flts=on`)
//! can: the device is attached through a PASID entry with PGTT = first
//! stage at the table's root. [`GuestDma::assign`] refuses, naming the
//! reason, on AMD-Vi (v1 tables have another format), VT-d legacy mode and
//! VT-d second stage (EPT's format; QEMU TCG emulates no VMX, so no EPT
//! could be shared either). The table needs U/S on every level (nested
//! walks and first-stage requests without supervisor privilege are both
//! user accesses); both walkers set accessed/dirty bits in it; the whole
//! table is the device's view, MMIO pages the guest's CPU reaches
//! included.
//!
//! ## What the crate does not do for you
//!
//! * Enumerate PCI or find the ACPI tables: the platform hands both over.
//! * Program the device: the VMM (or the guest, through the VMM's virtual
//!   config space) writes the MSI address/data `route_msi` returns.
//! * Restore a device's configuration space after `unassign` or guest
//!   teardown reset it ([`mod@quiesce`]): BARs, command register and MSI
//!   capabilities are at their reset defaults then.
//! * Run the guest, its nested page tables, or deliver the interrupt into
//!   it.
//! * Decide which guest gets which device: it only refuses to give anyone
//!   a function whose isolation group someone else owns.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

mod error;
mod guest;
pub mod ioapic;
mod iommus;
mod machine;
pub mod nesting;
pub mod ownership;
mod platform;
pub mod quiesce;
pub mod topology;

pub use acpi_tables::scope::Bdf;
pub use error::{BringUpError, Function, PassthroughError};
pub use guest::{GuestDma, GuestFault, Msi, MsiHandle};
pub use ioapic::{IoapicError, IoapicHandle, IoapicRoute, IoapicSource, PinMode};
pub use iommus::{AmdUnit, Driver, HostUse, Iommus, Options, TableProblem, Unit, VtdUnit};
pub use machine::{FAULT_QUEUE, FaultBatch, RoutedFault};
pub use ownership::{Group, GroupId, GuestId, Owner};
pub use platform::{BridgeBuses, PciFunction, Platform, PlatformClock, PlatformError, PlatformPhys, PlatformTables};
pub use portcullis_iommu::mmio::Mmio;
pub use portcullis_iommu::unit::{Device, DmaFault, Domain, IommuUnit, RequesterRef, UnitDomain, Vendor};
pub use portcullis_iommu::{DomainError, HwError, IommuDomain, Prot, UnitError};
pub use quiesce::{QuiesceError, Reset, quiesce};

/// The drivers, for vendor-specific access through [`Driver`].
pub mod drivers {
    pub use amdvi;
    pub use iommufd;
    pub use vtd;
}

/// A host physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PhysAddr(pub u64);

/// A guest physical address (which is also the IOVA the guest's devices
/// use: guest memory is mapped at IOVA = GPA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestAddr(pub u64);

impl core::fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl core::fmt::Display for GuestAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "GPA {:#x}", self.0)
    }
}
