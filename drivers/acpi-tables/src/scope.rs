//! Resolving DMAR device scopes to PCI bus/device/function numbers.
//!
//! A device scope names a device by a start bus and a path of
//! (device, function) hops. Every hop but the last is a PCI-PCI bridge; the
//! next hop lives on that bridge's secondary bus, which is read from PCI
//! configuration space (header type 1, secondary bus number at offset 0x19).

use core::fmt;

use crate::dmar::{self, DeviceScope};

/// A PCI bus/device/function within a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl Bdf {
    pub const fn new(bus: u8, device: u8, function: u8) -> Bdf {
        Bdf { bus, device, function }
    }

    /// The 16-bit requester ID (bus << 8 | device << 3 | function).
    pub const fn requester_id(self) -> u16 {
        ((self.bus as u16) << 8) | (((self.device & 0x1f) as u16) << 3) | ((self.function & 7) as u16)
    }

    /// The inverse of [`Bdf::requester_id`] (also the AMD "device ID").
    pub const fn from_requester_id(id: u16) -> Bdf {
        Bdf { bus: (id >> 8) as u8, device: ((id >> 3) & 0x1f) as u8, function: (id & 7) as u8 }
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.device, self.function)
    }
}

/// Read access to PCI configuration space.
pub trait ConfigSpace {
    /// Reads the aligned dword at `offset` of function `bdf` in `segment`;
    /// `None` if there is no such function.
    fn read_u32(&self, segment: u16, bdf: Bdf, offset: u16) -> Option<u32>;
}

/// Why a device scope could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveError {
    /// Offset of the device scope in its table.
    pub scope_offset: usize,
    /// Index of the path element at which resolution failed.
    pub hop: usize,
    pub kind: ResolveErrorKind,
}

/// The ways resolving a scope can fail.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResolveErrorKind {
    /// The scope has no path elements.
    EmptyPath,
    /// A path element names a device above 31 or a function above 7.
    InvalidPathElement { device: u8, function: u8 },
    /// No function responds at this address.
    DeviceAbsent { bdf: Bdf },
    /// An intermediate hop is not a PCI-PCI bridge.
    NotABridge { bdf: Bdf, header_type: u8 },
    /// A bridge's secondary bus number is 0 or not above its own bus, i.e.
    /// the bridge has not been configured.
    UnconfiguredBridge { bdf: Bdf, secondary_bus: u8 },
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device scope at offset {:#x}, path element {}: ", self.scope_offset, self.hop)?;
        match self.kind {
            ResolveErrorKind::EmptyPath => write!(f, "empty path"),
            ResolveErrorKind::InvalidPathElement { device, function } => {
                write!(f, "invalid path element ({device:#x},{function:#x})")
            }
            ResolveErrorKind::DeviceAbsent { bdf } => write!(f, "no device at {bdf}"),
            ResolveErrorKind::NotABridge { bdf, header_type } => {
                write!(f, "{bdf} is not a PCI-PCI bridge (header type {header_type:#04x})")
            }
            ResolveErrorKind::UnconfiguredBridge { bdf, secondary_bus } => {
                write!(f, "bridge {bdf} has unusable secondary bus {secondary_bus:#04x}")
            }
        }
    }
}

impl core::error::Error for ResolveError {}

/// Configuration-space offsets used by the walk.
const VENDOR_ID: u16 = 0x00;
const HEADER_TYPE_DWORD: u16 = 0x0c;
const BUS_NUMBERS_DWORD: u16 = 0x18;

/// Walks `scope`'s path from its start bus through PCI-PCI bridges and
/// returns the bus/device/function it names.
///
/// Every intermediate hop must be present and be a bridge (header type 1);
/// the next hop is taken on its secondary bus. The final function must be
/// present for PCI endpoint and sub-hierarchy scopes. For IOAPIC, HPET and
/// ACPI namespace device scopes the final element is only a source ID that
/// often has no configuration space of its own, so its presence is not
/// checked.
pub fn resolve(segment: u16, scope: &DeviceScope, cfg: &impl ConfigSpace) -> Result<Bdf, ResolveError> {
    let err = |hop, kind| ResolveError { scope_offset: scope.offset, hop, kind };
    if scope.path.is_empty() {
        return Err(err(0, ResolveErrorKind::EmptyPath));
    }
    let must_exist = matches!(scope.scope_type, dmar::SCOPE_PCI_ENDPOINT | dmar::SCOPE_PCI_SUB_HIERARCHY);
    let last = scope.path.len() - 1;
    let mut bus = scope.start_bus;
    for (hop, &(device, function)) in scope.path.iter().enumerate() {
        if device > 31 || function > 7 {
            return Err(err(hop, ResolveErrorKind::InvalidPathElement { device, function }));
        }
        let bdf = Bdf { bus, device, function };
        if hop == last {
            if must_exist && !present(cfg, segment, bdf) {
                return Err(err(hop, ResolveErrorKind::DeviceAbsent { bdf }));
            }
            return Ok(bdf);
        }
        if !present(cfg, segment, bdf) {
            return Err(err(hop, ResolveErrorKind::DeviceAbsent { bdf }));
        }
        let header_type = cfg
            .read_u32(segment, bdf, HEADER_TYPE_DWORD)
            .map(|v| ((v >> 16) & 0x7f) as u8)
            .ok_or(err(hop, ResolveErrorKind::DeviceAbsent { bdf }))?;
        if header_type != 1 {
            return Err(err(hop, ResolveErrorKind::NotABridge { bdf, header_type }));
        }
        let secondary_bus = cfg
            .read_u32(segment, bdf, BUS_NUMBERS_DWORD)
            .map(|v| (v >> 8) as u8)
            .ok_or(err(hop, ResolveErrorKind::DeviceAbsent { bdf }))?;
        if secondary_bus <= bus {
            return Err(err(hop, ResolveErrorKind::UnconfiguredBridge { bdf, secondary_bus }));
        }
        bus = secondary_bus;
    }
    // The loop always returns on the last hop.
    Err(err(0, ResolveErrorKind::EmptyPath))
}

fn present(cfg: &impl ConfigSpace, segment: u16, bdf: Bdf) -> bool {
    matches!(cfg.read_u32(segment, bdf, VENDOR_ID), Some(v) if v & 0xffff != 0xffff)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use alloc::vec;
    use alloc::vec::Vec;
    use std::collections::HashMap;

    use super::*;
    use crate::dmar::{SCOPE_HPET, SCOPE_IOAPIC, SCOPE_PCI_ENDPOINT, SCOPE_PCI_SUB_HIERARCHY};

    /// Fake configuration space: (segment, bdf) -> dwords by offset.
    #[derive(Default)]
    struct Fake(HashMap<(u16, Bdf), HashMap<u16, u32>>);

    impl Fake {
        fn endpoint(mut self, seg: u16, bdf: Bdf) -> Self {
            let f = self.0.entry((seg, bdf)).or_default();
            f.insert(0x00, 0x1234_8086);
            f.insert(0x0c, 0x0000_0000);
            self
        }

        fn bridge(mut self, seg: u16, bdf: Bdf, secondary: u8) -> Self {
            let f = self.0.entry((seg, bdf)).or_default();
            f.insert(0x00, 0x1234_8086);
            // Multi-function bit set too: only bits 6:0 are the layout.
            f.insert(0x0c, 0x0081_0000);
            f.insert(0x18, u32::from(secondary) << 8 | u32::from(bdf.bus) | 0x00ff_0000);
            self
        }

        fn absent_but_answering(mut self, seg: u16, bdf: Bdf) -> Self {
            self.0.entry((seg, bdf)).or_default().insert(0x00, 0xffff_ffff);
            self
        }
    }

    impl ConfigSpace for Fake {
        fn read_u32(&self, segment: u16, bdf: Bdf, offset: u16) -> Option<u32> {
            self.0.get(&(segment, bdf)).map(|f| f.get(&offset).copied().unwrap_or(0))
        }
    }

    fn scope(ty: u8, bus: u8, path: Vec<(u8, u8)>) -> DeviceScope {
        DeviceScope { offset: 0x40, scope_type: ty, flags: 0, enumeration_id: 0, start_bus: bus, path }
    }

    #[test]
    fn bdf_display_and_requester_id() {
        let b = Bdf::new(0x3a, 0x1f, 7);
        assert_eq!(alloc::format!("{b}"), "3a:1f.7");
        assert_eq!(b.requester_id(), 0x3aff);
        assert_eq!(Bdf::from_requester_id(0x3aff), b);
        assert_eq!(alloc::format!("{}", Bdf::new(0, 2, 0)), "00:02.0");
    }

    #[test]
    fn single_hop_endpoint() {
        let cfg = Fake::default().endpoint(0, Bdf::new(0, 2, 0));
        let s = scope(SCOPE_PCI_ENDPOINT, 0, vec![(2, 0)]);
        assert_eq!(resolve(0, &s, &cfg), Ok(Bdf::new(0, 2, 0)));
        // Same device on another segment is not there.
        let e = resolve(1, &s, &cfg).unwrap_err();
        assert_eq!(e.kind, ResolveErrorKind::DeviceAbsent { bdf: Bdf::new(0, 2, 0) });
    }

    #[test]
    fn walks_through_two_bridges() {
        let cfg = Fake::default()
            .bridge(0, Bdf::new(0, 0x1c, 4), 0x02)
            .bridge(0, Bdf::new(2, 0, 0), 0x05)
            .endpoint(0, Bdf::new(5, 0, 1));
        let s = scope(SCOPE_PCI_ENDPOINT, 0, vec![(0x1c, 4), (0, 0), (0, 1)]);
        assert_eq!(resolve(0, &s, &cfg), Ok(Bdf::new(5, 0, 1)));
        let s = scope(SCOPE_PCI_SUB_HIERARCHY, 0, vec![(0x1c, 4), (0, 0)]);
        assert_eq!(resolve(0, &s, &cfg), Ok(Bdf::new(2, 0, 0)));
    }

    #[test]
    fn error_paths_name_scope_offset_and_hop() {
        let cfg = Fake::default()
            .bridge(0, Bdf::new(0, 1, 0), 0x01)
            .endpoint(0, Bdf::new(0, 2, 0))
            .bridge(0, Bdf::new(0, 3, 0), 0x00)
            .absent_but_answering(0, Bdf::new(1, 0, 0));

        let e = resolve(0, &scope(SCOPE_PCI_ENDPOINT, 0, vec![]), &cfg).unwrap_err();
        assert_eq!((e.scope_offset, e.hop, e.kind.clone()), (0x40, 0, ResolveErrorKind::EmptyPath));
        assert_eq!(alloc::format!("{e}"), "device scope at offset 0x40, path element 0: empty path");

        // Endpoint missing on the bridge's secondary bus (vendor 0xffff).
        let e = resolve(0, &scope(SCOPE_PCI_ENDPOINT, 0, vec![(1, 0), (0, 0)]), &cfg).unwrap_err();
        assert_eq!((e.hop, e.kind.clone()), (1, ResolveErrorKind::DeviceAbsent { bdf: Bdf::new(1, 0, 0) }));
        assert!(alloc::format!("{e}").contains("no device at 01:00.0"));

        // First hop absent.
        let e = resolve(0, &scope(SCOPE_PCI_ENDPOINT, 0, vec![(9, 0), (0, 0)]), &cfg).unwrap_err();
        assert_eq!((e.hop, e.kind.clone()), (0, ResolveErrorKind::DeviceAbsent { bdf: Bdf::new(0, 9, 0) }));

        // Intermediate hop that is an endpoint.
        let e = resolve(0, &scope(SCOPE_PCI_ENDPOINT, 0, vec![(2, 0), (0, 0)]), &cfg).unwrap_err();
        assert_eq!(
            (e.hop, e.kind.clone()),
            (0, ResolveErrorKind::NotABridge { bdf: Bdf::new(0, 2, 0), header_type: 0 })
        );
        assert!(alloc::format!("{e}").contains("00:02.0 is not a PCI-PCI bridge"));

        // Bridge with secondary bus 0 (not configured).
        let e = resolve(0, &scope(SCOPE_PCI_ENDPOINT, 0, vec![(3, 0), (0, 0)]), &cfg).unwrap_err();
        assert_eq!(e.kind, ResolveErrorKind::UnconfiguredBridge { bdf: Bdf::new(0, 3, 0), secondary_bus: 0 });

        // Device number out of range.
        let e = resolve(0, &scope(SCOPE_PCI_ENDPOINT, 0, vec![(32, 0)]), &cfg).unwrap_err();
        assert_eq!(e.kind, ResolveErrorKind::InvalidPathElement { device: 32, function: 0 });
        let e = resolve(0, &scope(SCOPE_PCI_ENDPOINT, 0, vec![(1, 0), (0, 8)]), &cfg).unwrap_err();
        assert_eq!((e.hop, e.kind), (1, ResolveErrorKind::InvalidPathElement { device: 0, function: 8 }));
    }

    #[test]
    fn ioapic_and_hpet_sources_need_no_config_space() {
        let cfg = Fake::default();
        // Typical Intel IOAPIC scope: pseudo bus 0xf0, device 0x1f.
        let s = scope(SCOPE_IOAPIC, 0xf0, vec![(0x1f, 0)]);
        assert_eq!(resolve(0, &s, &cfg), Ok(Bdf::new(0xf0, 0x1f, 0)));
        let s = scope(SCOPE_HPET, 0x00, vec![(0x1f, 7)]);
        assert_eq!(resolve(0, &s, &cfg), Ok(Bdf::new(0, 0x1f, 7)));
        // But intermediate bridges must still exist.
        let s = scope(SCOPE_IOAPIC, 0, vec![(1, 0), (0, 0)]);
        assert!(matches!(resolve(0, &s, &cfg).unwrap_err().kind, ResolveErrorKind::DeviceAbsent { .. }));
    }
}
