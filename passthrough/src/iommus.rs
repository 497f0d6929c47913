//! Every IOMMU of the machine: brought up once from the firmware's tables,
//! every device blocked, and the map from PCI function to the unit and
//! requester id its DMA arrives with.

use crate::error::{BringUpError, Function, PassthroughError};
use crate::machine::{FaultBatch, Holder, Machine, RoutedFault};
use crate::ownership::{Group, Groups, Owner};
use crate::platform::{ConfigSpace, Platform, PlatformClock, PlatformTables};
use crate::topology::{self, Assignment};
use crate::{Bdf, PhysAddr};
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use portcullis_iommu::Prot;
use portcullis_iommu::mmio::Mmio;
use portcullis_iommu::unit::{Device, FirmwareRange, IommuUnit, IovaRange, RequesterRef, Vendor};

/// A VT-d unit driven over the platform.
pub type VtdUnit<P> = vtd::Shared<<P as Platform>::Mmio, PlatformTables<P>, PlatformClock<P>>;
/// An AMD-Vi unit driven over the platform.
pub type AmdUnit<P> = amdvi::Shared<<P as Platform>::Mmio, PlatformTables<P>, PlatformClock<P>>;

/// A running unit with its driver's own type, for what the generic
/// [`IommuUnit`] does not cover (reports, vendor-specific tests).
pub enum Driver<P: Platform> {
    /// Intel VT-d.
    Vtd(Arc<VtdUnit<P>>),
    /// AMD-Vi.
    Amd(Arc<AmdUnit<P>>),
}

impl<P: Platform> Clone for Driver<P> {
    fn clone(&self) -> Self {
        match self {
            Self::Vtd(u) => Self::Vtd(u.clone()),
            Self::Amd(u) => Self::Amd(u.clone()),
        }
    }
}

impl<P: Platform> fmt::Debug for Driver<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vtd(u) => write!(f, "{u:?}"),
            Self::Amd(u) => write!(f, "{u:?}"),
        }
    }
}

impl<P: Platform> Driver<P> {
    /// The unit behind the vendor-generic trait.
    pub fn generic(&self) -> Arc<dyn IommuUnit> {
        match self {
            Self::Vtd(u) => u.clone(),
            Self::Amd(u) => u.clone(),
        }
    }
}

/// One IOMMU unit the firmware describes.
pub struct Unit<P: Platform> {
    /// Register base.
    pub base: PhysAddr,
    /// PCI segment it serves.
    pub segment: u16,
    /// Its architecture.
    pub vendor: Vendor,
    /// The running unit, or why it did not come up.
    pub state: Result<Driver<P>, BringUpError>,
}

impl<P: Platform> fmt::Debug for Unit<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} unit at {} (segment {}): {:?}", self.vendor, self.base, self.segment, self.state)
    }
}

/// A problem in the firmware's tables met during bring-up (the rest came
/// up; the functions it concerns stay unassignable or unaliased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableProblem {
    /// The DMAR does not parse.
    Dmar(acpi_tables::Error),
    /// The IVRS does not parse, or an IVHD's device entries do not.
    Ivrs(acpi_tables::Error),
    /// A DMAR device scope names no function that exists.
    Scope(acpi_tables::scope::ResolveError),
    /// An RMRR names a function no running unit translates.
    RmrrOrphan {
        /// The function.
        function: Function,
        /// The range.
        range: IovaRange,
    },
}

/// How to bring the units up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// The mode of every VT-d unit (`None`: the best each offers).
    pub vtd_mode: Option<vtd::Mode>,
    /// The host's local APICs run in x2APIC mode: interrupt routes name
    /// 32-bit APIC ids (VT-d: IRTA.EIME, AMD-Vi: 128-bit entries with
    /// XTEn; a unit without ECAP.EIM or EFR.XTSup/GASup fails).
    pub x2apic: bool,
}

/// Every IOMMU of the platform, brought up with every device blocked.
pub struct Iommus<P: Platform> {
    platform: Arc<P>,
    units: Vec<Unit<P>>,
    owners: BTreeMap<(u16, Bdf), Assignment>,
    problems: Vec<TableProblem>,
    machine: Arc<Machine>,
    ioapic_routes: crate::ioapic::Routes,
}

/// What a function the host claims does with its DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostUse {
    /// Stays blocked: the host reserves it (nobody may assign it).
    Blocked,
    /// Untranslated: its DMA reaches physical addresses, as without an
    /// IOMMU (VT-d ECAP.PT; AMD-Vi always). For the hypervisor's own
    /// trusted devices; use a host [`crate::GuestDma`] (identity-mapped host
    /// RAM, or any map) to keep translation.
    PassThrough,
}

impl<P: Platform> fmt::Debug for Iommus<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Iommus({} unit(s), {} function(s) translated)", self.units.len(), self.owners.len())
    }
}

impl<P: Platform> Iommus<P> {
    /// Brings up every unit the platform's DMAR and IVRS describe, each
    /// VT-d unit in the best mode it offers: translation on, every device's
    /// DMA blocked, interrupt remapping on with an empty table where the
    /// unit can (so device MSIs are blocked too until routed).
    pub fn bring_up(platform: Arc<P>) -> Self {
        Self::bring_up_with(platform, Options::default())
    }

    /// As [`Self::bring_up`], with `options`.
    pub fn bring_up_with(platform: Arc<P>, options: Options) -> Self {
        let mut s = Self {
            platform,
            units: Vec::new(),
            owners: BTreeMap::new(),
            problems: Vec::new(),
            machine: Arc::new(Machine::new(Groups::default(), Vec::new())),
            ioapic_routes: Default::default(),
        };
        let functions = s.platform.pci_functions();
        s.bring_up_vtd(&functions, options);
        s.bring_up_amd(&functions, options);
        let assigned: Vec<(Function, Assignment)> = s.assignments().collect();
        let acs = |f: Function| functions.iter().any(|x| x.segment == f.segment && x.bdf == f.bdf && x.acs);
        let groups = Groups::build(&assigned, acs);
        let units = s.units.iter().map(|u| u.state.as_ref().ok().map(|d| d.generic())).collect();
        s.machine = Arc::new(Machine::new(groups, units));
        s
    }

    fn map(&self, base: u64, len: u64) -> Result<P::Mmio, BringUpError> {
        self.platform.map_mmio(PhysAddr(base), len).map_err(BringUpError::Platform)
    }

    fn bring_up_vtd(&mut self, functions: &[crate::PciFunction], options: Options) {
        let Some(bytes) = self.platform.dmar() else { return };
        let dmar = match acpi_tables::dmar::Dmar::parse(bytes) {
            Ok(d) => d,
            Err(e) => return self.problems.push(TableProblem::Dmar(e)),
        };
        let first = self.units.len();
        for d in dmar.drhds() {
            let base = d.register_base;
            let state = self.map(base, 0x1000).and_then(|mmio| {
                let caps = vtd::Caps { cap: mmio.get64(vtd::regs::CAP), ecap: mmio.get64(vtd::regs::ECAP) };
                let mem = PlatformTables::new(self.platform.clone(), caps.coherent());
                let clock = PlatformClock(self.platform.clone());
                let vtd_options = vtd::BringUp { mode: options.vtd_mode, x2apic: options.x2apic };
                vtd::Shared::bring_up_with(base, mmio, mem, clock, vtd_options)
                    .map(Driver::Vtd)
                    .map_err(BringUpError::Unit)
            });
            self.units.push(Unit { base: PhysAddr(base), segment: d.segment, vendor: Vendor::IntelVtd, state });
        }
        let (scopes, errors) = topology::unit_scopes(&dmar, &ConfigSpace(&*self.platform));
        self.problems.extend(errors.into_iter().map(TableProblem::Scope));
        for ((seg, bdf), mut a) in topology::assign(&scopes, functions) {
            a.unit += first;
            self.owners.insert((seg, bdf), a);
        }
        // RMRRs, per unit, under the requester id the DMA carries.
        let mut per_unit: BTreeMap<usize, Vec<FirmwareRange>> = BTreeMap::new();
        for r in dmar.rmrrs() {
            let range = IovaRange { start: r.base, last: r.limit };
            for s in &r.scopes {
                match acpi_tables::scope::resolve(r.segment, s, &ConfigSpace(&*self.platform)) {
                    Ok(bdf) => match self.owners.get(&(r.segment, bdf)) {
                        Some(a) => per_unit.entry(a.unit).or_default().push(FirmwareRange {
                            requester_id: a.requester_id,
                            range,
                            prot: Prot::RW,
                        }),
                        None => self
                            .problems
                            .push(TableProblem::RmrrOrphan { function: Function { segment: r.segment, bdf }, range }),
                    },
                    Err(e) => self.problems.push(TableProblem::Scope(e)),
                }
            }
        }
        for (unit, ranges) in per_unit {
            if let Ok(d) = &self.units[unit].state {
                d.generic().set_firmware_ranges(ranges);
            }
        }
    }

    fn bring_up_amd(&mut self, functions: &[crate::PciFunction], options: Options) {
        let Some(bytes) = self.platform.ivrs() else { return };
        let ivrs = match acpi_tables::ivrs::Ivrs::parse(bytes) {
            Ok(t) => t,
            Err(e) => return self.problems.push(TableProblem::Ivrs(e)),
        };
        let (scopes, errors) = topology::ivrs_units(&ivrs);
        self.problems.extend(errors.into_iter().map(TableProblem::Ivrs));
        let first = self.units.len();
        for ((seg, bdf), mut a) in topology::assign_ivrs(&scopes, functions) {
            a.unit += first;
            self.owners.insert((seg, bdf), a);
        }
        let unity: Vec<amdvi::UnityRange> = ivrs
            .ivmds()
            .filter_map(|m| amdvi::UnityRange::from_ivmd(m.kind, m.flags, m.device_id, m.aux_data, m.start, m.length))
            .collect();
        for s in scopes {
            let ivhd =
                ivrs.ivhds().filter(|h| h.segment == s.segment && h.base_address == s.base).max_by_key(|h| h.kind);
            let coherent = ivhd.is_some_and(|h| h.flags & (1 << 5) != 0);
            let pci_capability = ivhd.and_then(|h| {
                let bdf = Bdf::from_requester_id(h.device_id);
                functions.iter().find(|f| f.segment == h.segment && f.bdf == bdf)?;
                let off = h.capability_offset;
                Some((
                    self.platform.pci_read32(h.segment, bdf, off),
                    self.platform.pci_read32(h.segment, bdf, off + 0x10),
                ))
            });
            // The table covers every id, not just the IVRS ranges: QEMU does
            // not bound a lookup by the table's Size field, so an id beyond a
            // smaller table would read its entry from whatever memory
            // follows (Linux also always uses the full 2 MiB table).
            let info = amdvi::BringUp {
                last_device_id: 0xffff,
                coherent,
                pci_capability,
                unity: unity.clone(),
                x2apic: options.x2apic,
            };
            let state = self.map(s.base, amdvi::regs::BLOCK as u64).and_then(|mmio| {
                let mem = PlatformTables::new(self.platform.clone(), coherent);
                let clock = PlatformClock(self.platform.clone());
                amdvi::Shared::bring_up(s.base, mmio, mem, clock, info).map(Driver::Amd).map_err(BringUpError::Unit)
            });
            self.units.push(Unit { base: PhysAddr(s.base), segment: s.segment, vendor: Vendor::AmdVi, state });
        }
    }

    /// The platform.
    pub fn platform(&self) -> &Arc<P> {
        &self.platform
    }

    /// Who holds which requester id.
    pub(crate) fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }

    /// The host's IOAPIC routes (`crate::ioapic`).
    pub(crate) fn ioapic_routes(&self) -> &crate::ioapic::Routes {
        &self.ioapic_routes
    }

    /// Every isolation group: functions the IOMMU cannot tell apart (one
    /// requester id, or an ACS-less multi-function device). A group is
    /// assigned whole, to one owner.
    pub fn groups(&self) -> &[Group] {
        self.machine.groups.all()
    }

    /// The group of `segment:bdf` (`None`: no unit translates it).
    pub fn group_of(&self, segment: u16, bdf: Bdf) -> Option<&Group> {
        self.machine.groups.of(Function { segment, bdf })
    }

    /// Who owns `segment:bdf`'s group now (`None`: nobody; its DMA is
    /// blocked).
    pub fn owner_of(&self, segment: u16, bdf: Bdf) -> Option<Owner> {
        self.group_of(segment, bdf).and_then(|g| self.machine.owner(g.id))
    }

    /// Keeps `segment:bdf` (and its whole group) for the host, `how`: no
    /// guest can be given it until [`Self::release_host`]. Refused, with
    /// the owner named, when a guest has the group or one of the host's
    /// own DMA views ([`crate::GuestDma::new_host`]) has the function.
    ///
    /// When passing through fails, the group's requester ids are blocked
    /// again, the one that failed included (its entry may have been
    /// written before the unit failed to confirm it), and a claim this
    /// call made is dropped; a function claimed before stays claimed,
    /// blocked. A requester id that cannot be blocked keeps the group the
    /// host's (as `release_host` does when blocking fails): no guest is
    /// given what it reaches.
    pub fn claim_for_host(&self, segment: u16, bdf: Bdf, how: HostUse) -> Result<(), PassthroughError> {
        let function = Function { segment, bdf };
        let (d, _) = self.locate(segment, bdf)?;
        let group = self.group_of(segment, bdf).ok_or(PassthroughError::NotIsolated(function))?.clone();
        let claimed_before = self.machine.holds(function, group.id, Holder::Claim);
        self.machine
            .hold(function, group.id, Owner::Host, Holder::Claim)
            .map_err(|t| PassthroughError::Owned(function, t.owner))?;
        if how == HostUse::PassThrough {
            let unit = d.generic();
            for (k, r) in group.requesters().enumerate() {
                if let Err(e) = unit.pass_through(r.requester_id) {
                    let stuck = group.requesters().take(k + 1).filter(|r| unit.block(r.requester_id).is_err()).count();
                    if stuck == 0 && !claimed_before {
                        self.machine.unhold(function, group.id, Owner::Host, Holder::Claim);
                    }
                    return Err(PassthroughError::Unit(function, e));
                }
            }
        }
        Ok(())
    }

    /// Gives a function the host claimed back: once no function of its
    /// group is claimed any more, the group's DMA is blocked again and any
    /// guest may be given it.
    pub fn release_host(&self, segment: u16, bdf: Bdf) -> Result<(), PassthroughError> {
        let function = Function { segment, bdf };
        let (d, _) = self.locate(segment, bdf)?;
        let group = self.group_of(segment, bdf).ok_or(PassthroughError::NotIsolated(function))?.clone();
        // Only a claim is released here: a function one of the host's own
        // DMA views was given is that view's to give back.
        if !self.machine.holds(function, group.id, Holder::Claim) {
            return Err(PassthroughError::NotAssigned(function));
        }
        let unit = d.generic();
        let last = self.machine.holds_left(group.id) <= 1;
        if last {
            for r in group.requesters() {
                unit.block(r.requester_id).map_err(|e| PassthroughError::Unit(function, e))?;
            }
        }
        self.machine.unhold(function, group.id, Owner::Host, Holder::Claim);
        Ok(())
    }

    /// DMA faults of functions no guest owns (the host's, and blocked
    /// ones), not read before, and how many were lost.
    pub fn host_faults(&self) -> FaultBatch<RoutedFault> {
        self.machine.route_faults();
        self.machine.take_faults(Owner::Host)
    }

    /// Every unit, in bring-up order (VT-d in DMAR order, then AMD-Vi);
    /// [`Assignment::unit`] indexes this.
    pub fn units(&self) -> &[Unit<P>] {
        &self.units
    }

    /// Problems the firmware's tables had.
    pub fn problems(&self) -> &[TableProblem] {
        &self.problems
    }

    /// Every function a unit translates, with its unit and requester id.
    pub fn assignments(&self) -> impl Iterator<Item = (Function, Assignment)> + '_ {
        self.owners.iter().map(|(&(segment, bdf), &a)| (Function { segment, bdf }, a))
    }

    /// The unit and requester id of `segment:bdf`, if a unit translates it.
    pub fn assignment(&self, segment: u16, bdf: Bdf) -> Option<Assignment> {
        self.owners.get(&(segment, bdf)).copied()
    }

    /// The running unit translating `segment:bdf` and where.
    pub fn locate(&self, segment: u16, bdf: Bdf) -> Result<(Driver<P>, RequesterRef), PassthroughError> {
        let function = Function { segment, bdf };
        let a = self.owners.get(&(segment, bdf)).ok_or(PassthroughError::NotIsolated(function))?;
        let d = self.units[a.unit].state.as_ref().map_err(|e| PassthroughError::UnitDown(function, *e))?;
        Ok((d.clone(), RequesterRef { unit: a.unit as u16, requester_id: a.requester_id }))
    }

    /// The function as iommufd binds it (its unit, its requester id).
    pub fn device(&self, segment: u16, bdf: Bdf) -> Result<Device, PassthroughError> {
        let (d, at) = self.locate(segment, bdf)?;
        let bits = crate::quiesce::pasid_bits(&**self.platform(), Function { segment, bdf });
        Ok(Device::new(d.generic(), at).with_function_pasid_bits(bits))
    }

    /// The domain id `segment:bdf` translates through (`None`: blocked, or
    /// no running unit translates it).
    pub fn attached_domain(&self, segment: u16, bdf: Bdf) -> Option<u16> {
        let (d, at) = self.locate(segment, bdf).ok()?;
        d.generic().attached_domain(at.requester_id)
    }

    /// Whether the function's MSIs are remapped (so it can raise only the
    /// interrupts it is given).
    pub fn interrupts_isolated(&self, segment: u16, bdf: Bdf) -> bool {
        self.locate(segment, bdf).is_ok_and(|(d, _)| d.generic().remaps_interrupts())
    }

    /// The first running unit (tests and single-unit machines).
    pub fn first_running(&self) -> Option<Driver<P>> {
        self.units.iter().find_map(|u| u.state.as_ref().ok().cloned())
    }

    /// The errors of every unit that did not come up.
    pub fn down(&self) -> impl Iterator<Item = (PhysAddr, BringUpError)> + '_ {
        self.units.iter().filter_map(|u| u.state.as_ref().err().map(|e| (u.base, *e)))
    }
}
