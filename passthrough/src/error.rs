//! Errors of the passthrough API: each names the function it concerns and
//! carries the typed cause from below (driver, platform, iommufd).

use crate::Bdf;
use crate::platform::PlatformError;
use crate::quiesce::QuiesceError;
use core::fmt;
use portcullis_iommu::UnitError;

/// Why a unit did not come up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BringUpError {
    /// Its registers could not be mapped.
    Platform(PlatformError),
    /// The driver failed (timeout, no memory, missing capability, ...).
    Unit(UnitError),
}

impl fmt::Display for BringUpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Platform(e) => write!(f, "{e}"),
            Self::Unit(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for BringUpError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Platform(e) => Some(e),
            Self::Unit(e) => Some(e),
        }
    }
}

/// A PCI function in a segment, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Function {
    /// Segment group.
    pub segment: u16,
    /// Bus, device, function.
    pub bdf: Bdf,
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{}", self.segment, self.bdf)
    }
}

/// Why a passthrough request failed. When one is returned, nothing changed
/// unless the variant says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassthroughError {
    /// No IOMMU unit translates the function: its DMA could reach all of
    /// memory, so it must not be given to a guest.
    NotIsolated(Function),
    /// The unit that covers the function did not come up.
    UnitDown(Function, BringUpError),
    /// The function is already assigned to this guest.
    AlreadyAssigned(Function),
    /// The function is not assigned to this guest.
    NotAssigned(Function),
    /// The function's isolation group belongs to someone else (the host or
    /// another guest); nothing changed.
    Owned(Function, crate::ownership::Owner),
    /// The unit refused to change the function's translation.
    Unit(Function, UnitError),
    /// The function's unit does not remap interrupts: the device could
    /// raise any interrupt on the host by writing the interrupt window.
    /// [`crate::GuestDma::allow_unsafe_interrupts`] accepts that risk.
    UnsafeInterrupts(Function),
    /// The unit refused an interrupt route (no remapping, table full,
    /// destination it cannot encode, or the hardware failed).
    Interrupt(Function, UnitError),
    /// The APIC id is not one of the guest's CPUs
    /// ([`crate::GuestDma::set_cpus`]).
    ForeignCpu(Function, u32),
    /// No such interrupt route (freed, or never made by this guest).
    NoSuchRoute,
    /// The host's IOAPIC with this id could not be routed
    /// ([`crate::Iommus::route_ioapic`]).
    Ioapic(u8, crate::ioapic::IoapicError),
    /// The memory range is not page aligned, is empty or wraps.
    BadRange {
        /// Guest physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// iommufd refused (what was being done, and its errno).
    Iommufd(&'static str, iommufd::Errno),
    /// [`crate::GuestDma::unassign`] took the function back all the same
    /// (its DMA view and interrupt routes are gone, it is no longer the
    /// guest's), but it did not quiesce: it does not answer, or did not
    /// come back from its reset. Its state is unknown.
    Quiesce(Function, QuiesceError),
    /// A guest view sharing the hypervisor's page table
    /// ([`crate::GuestDma::new_sharing_table`]) cannot do this.
    SharedTable(&'static str),
}

impl fmt::Display for PassthroughError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotIsolated(d) => write!(f, "{d} is behind no IOMMU: its DMA cannot be isolated"),
            Self::UnitDown(d, e) => write!(f, "{d}: its IOMMU unit is not running: {e}"),
            Self::AlreadyAssigned(d) => write!(f, "{d} is already assigned"),
            Self::NotAssigned(d) => write!(f, "{d} is not assigned"),
            Self::Owned(d, o) => write!(f, "{d} belongs to {o}"),
            Self::Unit(d, e) => write!(f, "{d}: {e}"),
            Self::UnsafeInterrupts(d) => {
                write!(f, "{d}: its IOMMU does not remap interrupts, so the device could inject any interrupt")
            }
            Self::Interrupt(d, e) => write!(f, "{d}: interrupt routing: {e}"),
            Self::NoSuchRoute => write!(f, "no such interrupt route"),
            Self::ForeignCpu(d, apic) => write!(f, "{d}: APIC id {apic:#x} is not one of the guest's CPUs"),
            Self::Ioapic(id, e) => write!(f, "IOAPIC {id}: {e}"),
            Self::BadRange { gpa, len } => write!(f, "guest memory {gpa:#x}+{len:#x} is not a page-aligned range"),
            Self::Iommufd(what, e) => write!(f, "{what}: {e:?}"),
            Self::Quiesce(d, e) => write!(f, "{d} was taken back but not quiesced: {e}"),
            Self::SharedTable(why) => write!(f, "shared page table: {why}"),
        }
    }
}

impl core::error::Error for PassthroughError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::UnitDown(_, e) => Some(e),
            Self::Interrupt(_, e) | Self::Unit(_, e) => Some(e),
            Self::Quiesce(_, e) => Some(e),
            Self::Ioapic(_, e) => Some(e),
            _ => None,
        }
    }
}
