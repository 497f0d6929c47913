//! Which IOMMU unit translates which PCI function, and with which
//! requester id its DMA arrives.
//!
//! * A function belongs to the unit whose device scope names it (PCI
//!   endpoint scope) or a bridge above it (sub-hierarchy scope: the bridge
//!   and every bus below it); otherwise to the segment's INCLUDE_PCI_ALL
//!   unit; otherwise to none (its DMA is not remapped).
//! * DMA from behind a PCIe-to-PCI bridge carries the bridge's secondary
//!   bus with device 0 function 0; behind a conventional PCI-to-PCI bridge,
//!   the bridge's own id. The id nearest the root wins (each bridge
//!   rewrites what passes it), and the driver programs that id's context
//!   entry.
//!
//! Plain data in, plain data out: host-tested with hand-built topologies.

use crate::Bdf;
use crate::platform::PciFunction;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// One unit's scope, with its device-scope paths already resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitScope {
    /// PCI segment.
    pub segment: u16,
    /// INCLUDE_PCI_ALL: every function of the segment no other unit names.
    pub include_all: bool,
    /// Functions named by PCI endpoint scopes.
    pub endpoints: Vec<Bdf>,
    /// Bridges named by PCI sub-hierarchy scopes.
    pub bridges: Vec<Bdf>,
}

/// Where a function's DMA goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// Index of the unit (in [`crate::Iommus::units`] order).
    pub unit: usize,
    /// The requester id its DMA carries (the context entry to program).
    pub requester_id: u16,
    /// The bridge that rewrote the id, if any.
    pub alias_bridge: Option<Bdf>,
}

fn ancestors<'a>(dev: &PciFunction, all: &'a [PciFunction]) -> Vec<&'a PciFunction> {
    let mut out = Vec::new();
    let mut cur = dev.parent;
    while let Some(p) = cur {
        let Some(pd) = all.iter().find(|d| d.segment == dev.segment && d.bdf == p) else { break };
        out.push(pd);
        cur = pd.parent;
        if out.len() > 32 {
            break;
        }
    }
    out
}

/// The requester id DMA from `dev` arrives with, and the aliasing bridge.
pub fn requester_id(dev: &PciFunction, all: &[PciFunction]) -> (u16, Option<Bdf>) {
    let mut rid = dev.bdf.requester_id();
    let mut alias = None;
    // From the device up; a bridge nearer the root overrides.
    for b in ancestors(dev, all) {
        match b.pcie_port_type {
            // PCIe-to-PCI bridge: secondary bus, devfn 0.
            Some(7) => {
                if let Some(buses) = b.bridge {
                    rid = (buses.secondary as u16) << 8;
                    alias = Some(b.bdf);
                }
            }
            // Conventional PCI-to-PCI bridge (no PCIe capability).
            None if b.bridge.is_some() => {
                rid = b.bdf.requester_id();
                alias = Some(b.bdf);
            }
            _ => {}
        }
    }
    (rid, alias)
}

/// Assigns every function to a unit (functions no unit covers are left
/// out).
pub fn assign(units: &[UnitScope], devices: &[PciFunction]) -> BTreeMap<(u16, Bdf), Assignment> {
    let mut out = BTreeMap::new();
    for dev in devices {
        let named = units.iter().position(|u| {
            u.segment == dev.segment
                && !u.include_all
                && (u.endpoints.contains(&dev.bdf)
                    || u.bridges.contains(&dev.bdf)
                    || u.bridges.iter().any(|b| {
                        devices
                            .iter()
                            .find(|d| d.segment == dev.segment && d.bdf == *b)
                            .and_then(|d| d.bridge)
                            .is_some_and(|r| (r.secondary..=r.subordinate).contains(&dev.bdf.bus))
                    }))
        });
        let unit = named.or_else(|| units.iter().position(|u| u.segment == dev.segment && u.include_all));
        if let Some(unit) = unit {
            let (requester_id, alias_bridge) = requester_id(dev, devices);
            out.insert((dev.segment, dev.bdf), Assignment { unit, requester_id, alias_bridge });
        }
    }
    out
}

/// The unit scopes of a DMAR, resolving each PCI scope's path through
/// configuration space (IOAPIC/HPET/ACPI scopes are not PCI functions).
/// Scopes that do not resolve are skipped and returned as errors.
pub fn unit_scopes(
    dmar: &acpi_tables::dmar::Dmar,
    cfg: &impl acpi_tables::scope::ConfigSpace,
) -> (Vec<UnitScope>, Vec<acpi_tables::scope::ResolveError>) {
    use acpi_tables::dmar::{SCOPE_PCI_ENDPOINT, SCOPE_PCI_SUB_HIERARCHY};
    let mut units = Vec::new();
    let mut errors = Vec::new();
    for d in dmar.drhds() {
        let mut u = UnitScope { segment: d.segment, include_all: d.include_pci_all(), ..Default::default() };
        for s in &d.scopes {
            if s.scope_type != SCOPE_PCI_ENDPOINT && s.scope_type != SCOPE_PCI_SUB_HIERARCHY {
                continue;
            }
            match acpi_tables::scope::resolve(d.segment, s, cfg) {
                Ok(b) => {
                    if s.scope_type == SCOPE_PCI_ENDPOINT {
                        u.endpoints.push(b)
                    } else {
                        u.bridges.push(b)
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        units.push(u);
    }
    (units, errors)
}

/// One AMD-Vi unit as the IVRS describes it: the device ids its IVHD
/// entries cover, and the aliases they declare.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IvrsUnit {
    /// PCI segment.
    pub segment: u16,
    /// MMIO base of the unit.
    pub base: u64,
    /// The unit's own requester id (its DMA is never remapped by itself).
    pub own_id: u16,
    /// Covered device ids as inclusive ranges, with the id their DMA
    /// carries when the firmware declares an alias.
    pub ranges: Vec<(u16, u16, Option<u16>)>,
    /// Highest device id covered.
    pub last_id: u16,
}

impl IvrsUnit {
    /// The device id DMA from requester id `rid` is looked up with, if the
    /// unit covers `rid`.
    pub fn lookup(&self, rid: u16) -> Option<u16> {
        self.ranges.iter().rev().find(|r| (r.0..=r.1).contains(&rid)).map(|r| r.2.unwrap_or(rid))
    }
}

/// The AMD-Vi units of an IVRS, one per IOMMU. Firmware describes each
/// IOMMU with several IVHD blocks (types 0x10, 0x11, 0x40) for parsers of
/// different ages; the newest type this parser reads is used. Blocks whose
/// device entries do not pair up are returned as errors and skipped.
pub fn ivrs_units(ivrs: &acpi_tables::ivrs::Ivrs) -> (Vec<IvrsUnit>, Vec<acpi_tables::Error>) {
    let mut chosen: BTreeMap<(u16, u64), &acpi_tables::ivrs::Ivhd> = BTreeMap::new();
    for h in ivrs.ivhds() {
        let key = (h.segment, h.base_address);
        if chosen.get(&key).is_none_or(|c| h.kind > c.kind) {
            chosen.insert(key, h);
        }
    }
    let mut units = Vec::new();
    let mut errors = Vec::new();
    for ((segment, base), h) in chosen {
        match h.device_ranges() {
            Ok(rs) => {
                let ranges: Vec<_> = rs.iter().map(|r| (r.first, r.last, r.alias)).collect();
                let last_id = ranges.iter().map(|r| r.1.max(r.2.unwrap_or(0))).max().unwrap_or(0);
                units.push(IvrsUnit { segment, base, own_id: h.device_id, ranges, last_id });
            }
            Err(e) => errors.push(e),
        }
    }
    (units, errors)
}

/// Assigns every function to the AMD-Vi unit covering the requester id its
/// DMA carries (bridge aliasing first, then any alias the IVRS declares);
/// the assignment's `requester_id` is the device id to program. The units'
/// own functions are left out.
pub fn assign_ivrs(units: &[IvrsUnit], devices: &[PciFunction]) -> BTreeMap<(u16, Bdf), Assignment> {
    let mut out = BTreeMap::new();
    for dev in devices {
        let (rid, alias_bridge) = requester_id(dev, devices);
        for (unit, u) in units.iter().enumerate() {
            if u.segment != dev.segment || dev.bdf.requester_id() == u.own_id {
                continue;
            }
            if let Some(id) = u.lookup(rid) {
                out.insert((dev.segment, dev.bdf), Assignment { unit, requester_id: id, alias_bridge });
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::BridgeBuses;

    fn dev(bus: u8, d: u8, parent: Option<Bdf>, pcie: Option<u8>, bridge: Option<(u8, u8)>) -> PciFunction {
        PciFunction {
            segment: 0,
            bdf: Bdf { bus, device: d, function: 0 },
            parent,
            bridge: bridge.map(|(s, e)| BridgeBuses { secondary: s, subordinate: e }),
            pcie_port_type: pcie,
            acs: false,
        }
    }

    fn bdf(bus: u8, d: u8) -> Bdf {
        Bdf { bus, device: d, function: 0 }
    }

    #[test]
    fn scopes_bridges_aliases_and_the_catch_all() {
        let devices = alloc::vec![
            dev(0, 1, None, Some(0), None),            // endpoint on the root bus
            dev(0, 2, None, Some(4), Some((1, 1))),    // root port
            dev(1, 0, Some(bdf(0, 2)), Some(0), None), // PCIe device below it
            dev(0, 5, None, Some(7), Some((2, 2))),    // PCIe-to-PCI bridge
            dev(2, 1, Some(bdf(0, 5)), None, None),    // conventional device below it
            dev(0, 6, None, None, Some((3, 3))),       // conventional PCI bridge
            dev(3, 4, Some(bdf(0, 6)), None, None),
            dev(0, 0x1f, None, None, None), // nobody names this one
        ];
        let units = alloc::vec![
            UnitScope {
                segment: 0,
                include_all: false,
                endpoints: alloc::vec![bdf(0, 1)],
                bridges: alloc::vec![bdf(0, 2), bdf(0, 5)]
            },
            UnitScope { segment: 0, include_all: true, ..Default::default() },
        ];
        let a = assign(&units, &devices);
        assert_eq!(a[&(0, bdf(0, 1))], Assignment { unit: 0, requester_id: 0x0008, alias_bridge: None });
        assert_eq!(a[&(0, bdf(1, 0))].unit, 0, "below a sub-hierarchy scope");
        assert_eq!(a[&(0, bdf(1, 0))].requester_id, 0x0100, "a root port does not alias");
        assert_eq!(a[&(0, bdf(2, 1))], Assignment { unit: 0, requester_id: 0x0200, alias_bridge: Some(bdf(0, 5)) });
        assert_eq!(a[&(0, bdf(3, 4))], Assignment { unit: 1, requester_id: 0x0030, alias_bridge: Some(bdf(0, 6)) });
        assert_eq!(a[&(0, bdf(0, 0x1f))].unit, 1, "INCLUDE_PCI_ALL catches the rest");
        let only_named = assign(&units[..1], &devices);
        assert!(!only_named.contains_key(&(0, bdf(0, 0x1f))), "no catch-all: not remapped");
    }

    #[test]
    fn ivrs_ranges_aliases_and_bridges() {
        let b = |bus, dev| Bdf { bus, device: dev, function: 0 };
        let devices = alloc::vec![
            dev(0, 1, None, Some(0), None),
            dev(0, 5, None, Some(7), Some((2, 2))),
            dev(2, 1, Some(b(0, 5)), None, None),
            dev(0, 3, None, Some(0), None), // the IOMMU itself
            dev(4, 0, None, Some(0), None), // outside every range
            dev(0, 9, None, Some(0), None), // aliased by the firmware
        ];
        let unit = IvrsUnit {
            segment: 0,
            base: 0xfed8_0000,
            own_id: 0x0018,
            ranges: alloc::vec![(0x0000, 0x02ff, None), (0x0048, 0x0048, Some(0x00a0))],
            last_id: 0x02ff,
        };
        let a = assign_ivrs(&[unit], &devices);
        assert_eq!(a[&(0, b(0, 1))], Assignment { unit: 0, requester_id: 0x0008, alias_bridge: None });
        assert_eq!(a[&(0, b(2, 1))], Assignment { unit: 0, requester_id: 0x0200, alias_bridge: Some(b(0, 5)) });
        assert!(!a.contains_key(&(0, b(0, 3))), "the IOMMU is not its own client");
        assert!(!a.contains_key(&(0, b(4, 0))), "not covered");
        assert_eq!(a[&(0, b(0, 9))].requester_id, 0x00a0, "firmware alias");
    }
}
