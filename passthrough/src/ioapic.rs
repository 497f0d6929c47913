//! The host's IOAPIC interrupts with interrupt remapping on.
//!
//! Bring-up turns remapping on with an empty table (VT-d: compatibility
//! format blocked too; AMD-Vi: every device table entry aborting
//! interrupts), so an IOAPIC pin programmed the usual way no longer
//! reaches a CPU. An IOAPIC's messages reach the unit that covers it with
//! a source id of their own: the DMAR names it in an IOAPIC device scope
//! of the unit's DRHD (enumeration id = IOAPIC id, path = the id's
//! bus/device/function), the IVRS in an IOAPIC special entry (type 0x48,
//! variety 1, handle = IOAPIC id) of the unit's IVHD. A route is a table
//! entry for that source id (VT-d: an IRTE verifying all 16 bits of it;
//! AMD-Vi: an entry in the device table entry's own interrupt table) and
//! the redirection entry the host programs into the IOAPIC pin to use it:
//!
//! ```text
//!   VT-d    63:49 handle[14:0]  48 format = 1  16 mask  15 trigger
//!           13 polarity  11 handle[15]  10:8 000  7:0 the entry's vector
//!   AMD-Vi  63:56 0  16 mask  15 trigger  13 polarity  11 physical
//!           10:8 fixed  7:0 the entry's index in the source's table
//! ```
//!
//! The host keeps the pin masked while it writes the entry (high half
//! first), then unmasks it. For a level-triggered pin, the EOI the IOAPIC
//! needs names the vector field of the redirection entry
//! ([`IoapicRoute::eoi_vector`]): on VT-d it equals the delivered vector,
//! so the local APIC's broadcast EOI works; on AMD-Vi it is the index, so
//! the host writes it to the IOAPIC's EOI register (version 0x20).
//!
//! Locking: the routes' lock is held across the unit operation (taken
//! before a unit's own lock, never after), so a handle is freed or
//! retargeted by one caller at a time.

use crate::PhysAddr;
use crate::error::{BringUpError, PassthroughError};
use crate::iommus::Iommus;
use crate::ownership::Owner;
use crate::platform::{ConfigSpace, Platform};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use portcullis_iommu::UnitError;
use portcullis_iommu::unit::{IoapicRte, Vendor};

pub use portcullis_iommu::unit::PinMode;

/// An IOAPIC the firmware's tables place behind a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoapicSource {
    /// The IOAPIC's id (as the MADT gives it).
    pub id: u8,
    /// The unit its messages reach ([`Iommus::units`] index).
    pub unit: usize,
    /// The source (requester) id they carry.
    pub source_id: u16,
}

/// An IOAPIC pin's route, as [`Iommus::route_ioapic`] hands it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoapicHandle(u32);

/// What [`Iommus::route_ioapic`] made: the handle to retarget or free the
/// route with, and the redirection entry to program into the pin (mask
/// bit, 16, clear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoapicRoute {
    /// The route.
    pub handle: IoapicHandle,
    /// Redirection entry, low half (IOAPIC register 0x10 + 2 * pin).
    pub rte_low: u32,
    /// Redirection entry, high half (register 0x11 + 2 * pin).
    pub rte_high: u32,
}

impl IoapicRoute {
    fn new(handle: IoapicHandle, rte: u64) -> Self {
        Self { handle, rte_low: rte as u32, rte_high: (rte >> 32) as u32 }
    }

    /// The whole redirection entry.
    pub fn rte(&self) -> u64 {
        (self.rte_high as u64) << 32 | self.rte_low as u64
    }

    /// The vector a level-triggered pin's EOI names (the redirection
    /// entry's vector field; see the [module](self) documentation).
    pub fn eoi_vector(&self) -> u8 {
        self.rte_low as u8
    }
}

/// Why an IOAPIC route could not be made or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoapicError {
    /// Neither the DMAR nor the IVRS names the IOAPIC: no unit knows its
    /// source id.
    NotDescribed,
    /// The unit its messages reach did not come up.
    UnitDown(PhysAddr, BringUpError),
    /// The function whose requester id the IOAPIC's messages carry (an
    /// AMD southbridge IOAPIC shares 00:14.0's) belongs to a guest, whose
    /// device could then raise the host's IOAPIC vectors.
    SourceOwned(Owner),
    /// The unit refused (no remapping, table full, a destination it
    /// cannot encode, or the hardware failed).
    Unit(UnitError),
}

impl fmt::Display for IoapicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotDescribed => write!(f, "no DMAR device scope or IVRS special entry names it"),
            Self::UnitDown(base, e) => write!(f, "its IOMMU unit at {base} is not running: {e}"),
            Self::SourceOwned(o) => write!(f, "the function carrying its source id belongs to {o}"),
            Self::Unit(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for IoapicError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::UnitDown(_, e) => Some(e),
            Self::Unit(e) => Some(e),
            _ => None,
        }
    }
}

/// One made route.
#[derive(Debug, Clone, Copy)]
struct Route {
    ioapic: u8,
    unit: usize,
    source_id: u16,
    entry: u16,
    pin: PinMode,
}

/// Every IOAPIC route of one [`Iommus`].
#[derive(Debug, Default)]
pub(crate) struct Routes {
    state: spin::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next: u32,
    routes: BTreeMap<IoapicHandle, Route>,
}

fn fail(ioapic: u8, e: IoapicError) -> PassthroughError {
    PassthroughError::Ioapic(ioapic, e)
}

impl<P: Platform> Iommus<P> {
    /// Every IOAPIC the DMAR's device scopes and the IVRS's special
    /// entries place behind a unit, by IOAPIC id then unit. Scopes that do
    /// not resolve, and units that are not listed, are left out.
    pub fn ioapic_sources(&self) -> Vec<IoapicSource> {
        let unit = |vendor: Vendor, segment: u16, base: u64| {
            self.units().iter().position(|u| u.vendor == vendor && u.segment == segment && u.base == PhysAddr(base))
        };
        let mut found: Vec<IoapicSource> = Vec::new();
        if let Some(Ok(dmar)) = self.platform().dmar().map(acpi_tables::dmar::Dmar::parse) {
            for d in dmar.drhds() {
                let Some(unit) = unit(Vendor::IntelVtd, d.segment, d.register_base) else { continue };
                for s in d.scopes.iter().filter(|s| s.scope_type == acpi_tables::dmar::SCOPE_IOAPIC) {
                    if let Ok(bdf) = acpi_tables::scope::resolve(d.segment, s, &ConfigSpace(&**self.platform())) {
                        found.push(IoapicSource { id: s.enumeration_id, unit, source_id: bdf.requester_id() });
                    }
                }
            }
        }
        if let Some(Ok(ivrs)) = self.platform().ivrs().map(acpi_tables::ivrs::Ivrs::parse) {
            for h in ivrs.ivhds() {
                let Some(unit) = unit(Vendor::AmdVi, h.segment, h.base_address) else { continue };
                for e in &h.entries {
                    if let acpi_tables::ivrs::EntryKind::Special { handle, device_id, variety, .. } = e.kind
                        && variety == acpi_tables::ivrs::VARIETY_IOAPIC
                    {
                        found.push(IoapicSource { id: handle, unit, source_id: device_id });
                    }
                }
            }
        }
        // An IVHD of type 0x10 and one of type 0x11 describe the same unit.
        found.sort();
        found.dedup();
        found
    }

    /// Routes the interrupt of one pin, signalling as `pin`, of the
    /// IOAPIC with id `ioapic_id` to `vector` on the CPU with APIC id
    /// `apic_id`, through a remapping entry of the unit its messages
    /// reach that accepts them from its source id only. Returns the
    /// route's handle and the redirection entry to program into the pin
    /// (masked while written, then unmasked). One route per pin: several
    /// pins never share one. Refused while the function whose requester id
    /// the IOAPIC's messages carry belongs to a guest.
    pub fn route_ioapic(
        &self,
        ioapic_id: u8,
        pin: PinMode,
        vector: u8,
        apic_id: u32,
    ) -> Result<IoapicRoute, PassthroughError> {
        let source = self
            .ioapic_sources()
            .into_iter()
            .find(|s| s.id == ioapic_id)
            .ok_or(fail(ioapic_id, IoapicError::NotDescribed))?;
        let unit = &self.units()[source.unit];
        let driver = unit.state.as_ref().map_err(|e| fail(ioapic_id, IoapicError::UnitDown(unit.base, *e)))?;
        if let Some(g) = self.machine().groups.by_requester(source.unit, source.source_id)
            && let Some(owner @ Owner::Guest(_)) = self.machine().owner(g.id)
        {
            return Err(fail(ioapic_id, IoapicError::SourceOwned(owner)));
        }
        let mut s = self.ioapic_routes().state.lock();
        let IoapicRte { handle: entry, rte } = driver
            .generic()
            .route_ioapic(source.source_id, pin, vector, apic_id)
            .map_err(|e| fail(ioapic_id, IoapicError::Unit(e)))?;
        let handle = IoapicHandle(s.next);
        s.next += 1;
        s.routes
            .insert(handle, Route { ioapic: ioapic_id, unit: source.unit, source_id: source.source_id, entry, pin });
        Ok(IoapicRoute::new(handle, rte))
    }

    /// Points route `handle` at another vector and CPU; once this
    /// returns, the old vector never arrives. Returns the route's
    /// redirection entry now: on VT-d its vector field follows the new
    /// vector (write it again for a level-triggered pin, whose EOI is
    /// matched against it); on AMD-Vi it is unchanged.
    pub fn retarget_ioapic(
        &self,
        handle: IoapicHandle,
        vector: u8,
        apic_id: u32,
    ) -> Result<IoapicRoute, PassthroughError> {
        let s = self.ioapic_routes().state.lock();
        let r = *s.routes.get(&handle).ok_or(PassthroughError::NoSuchRoute)?;
        let driver = self.running(&r)?;
        let IoapicRte { rte, .. } = driver
            .generic()
            .retarget_ioapic(r.source_id, r.entry, r.pin, vector, apic_id)
            .map_err(|e| fail(r.ioapic, IoapicError::Unit(e)))?;
        Ok(IoapicRoute::new(handle, rte))
    }

    /// Frees route `handle`: the pin's interrupts are blocked again (mask
    /// the pin first) and the entry can be reused. When the unit fails,
    /// the route stays.
    pub fn free_ioapic(&self, handle: IoapicHandle) -> Result<(), PassthroughError> {
        let mut s = self.ioapic_routes().state.lock();
        let r = *s.routes.get(&handle).ok_or(PassthroughError::NoSuchRoute)?;
        let driver = self.running(&r)?;
        driver.generic().free_msi(r.source_id, r.entry).map_err(|e| fail(r.ioapic, IoapicError::Unit(e)))?;
        s.routes.remove(&handle);
        Ok(())
    }

    /// Whether an IOAPIC whose messages carry `requester_id` on unit
    /// `unit` has live routes (its group then serves the host: no guest
    /// may be given it).
    pub fn ioapic_source_routed(&self, unit: usize, requester_id: u16) -> bool {
        self.ioapic_routes().state.lock().routes.values().any(|r| r.unit == unit && r.source_id == requester_id)
    }

    /// The remapping entry (unit-specific index) and source id of route
    /// `handle`, for reports and tests.
    pub fn ioapic_route_entry(&self, handle: IoapicHandle) -> Option<(IoapicSource, u16)> {
        let s = self.ioapic_routes().state.lock();
        let r = s.routes.get(&handle)?;
        Some((IoapicSource { id: r.ioapic, unit: r.unit, source_id: r.source_id }, r.entry))
    }

    fn running(&self, r: &Route) -> Result<&crate::Driver<P>, PassthroughError> {
        let unit = &self.units()[r.unit];
        unit.state.as_ref().map_err(|e| fail(r.ioapic, IoapicError::UnitDown(unit.base, *e)))
    }
}
