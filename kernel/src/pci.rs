//! PCI enumeration over any configuration-space accessor.
//!
//! The walk starts at each ECAM region's first bus and follows every
//! PCI-to-PCI bridge to its secondary bus, so devices behind root ports and
//! PCIe-to-PCI bridges are found. It is bounded: each bus is scanned once
//! (a bridge loop in broken firmware cannot recurse forever), capability
//! lists are followed for at most 48 entries, and BAR sizing restores every
//! register it touches with decoding disabled meanwhile.
//!
//! The accessor is a trait so the walk runs on the host against a fake
//! config space (`tests`) and in the kernel against ECAM.

use alloc::vec::Vec;

/// A PCI function address within a segment (the one `Bdf` of the
/// workspace, from the ACPI parser).
pub use acpi_tables::scope::Bdf;

/// Reads and writes configuration space. Reads of an absent function return
/// all ones, as the hardware does.
pub trait ConfigAccess {
    /// Reads the dword at `offset` (4-aligned, < 4096).
    fn read32(&self, segment: u16, bdf: Bdf, offset: u16) -> u32;
    /// Writes the dword at `offset`.
    fn write32(&self, segment: u16, bdf: Bdf, offset: u16, value: u32);

    /// Reads a 16-bit value.
    fn read16(&self, segment: u16, bdf: Bdf, offset: u16) -> u16 {
        (self.read32(segment, bdf, offset & !3) >> ((offset & 2) * 8)) as u16
    }
    /// Reads a byte.
    fn read8(&self, segment: u16, bdf: Bdf, offset: u16) -> u8 {
        (self.read32(segment, bdf, offset & !3) >> ((offset & 3) * 8)) as u8
    }
}

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (uses two BAR slots).
    Mem64,
    /// I/O ports.
    Io,
}

/// One implemented BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// BAR slot (0-5).
    pub index: u8,
    /// Kind.
    pub kind: BarKind,
    /// Address programmed by firmware.
    pub base: u64,
    /// Decoded size in bytes.
    pub size: u64,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// A capability found in the standard list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// Capability id (0x05 MSI, 0x10 PCIe, 0x11 MSI-X, ...).
    pub id: u8,
    /// Offset in config space.
    pub offset: u8,
}

/// MSI capability summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiInfo {
    /// Capability offset.
    pub offset: u8,
    /// 64-bit message address capable.
    pub addr64: bool,
    /// Vectors the function may request (1-32).
    pub vectors: u8,
    /// Per-vector masking.
    pub maskable: bool,
}

/// MSI-X capability summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixInfo {
    /// Capability offset.
    pub offset: u8,
    /// Table entries.
    pub table_size: u16,
    /// BAR and offset of the table.
    pub table: (u8, u32),
    /// BAR and offset of the pending-bit array.
    pub pba: (u8, u32),
}

/// PCI Express capability summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcieInfo {
    /// Capability offset.
    pub offset: u8,
    /// Device/port type (0 endpoint, 4 root port, 7 PCIe-to-PCI bridge, 9 RC integrated endpoint, ...).
    pub port_type: u8,
    /// Capability version.
    pub version: u8,
}

impl PcieInfo {
    /// Readable device/port type.
    pub fn port_type_name(&self) -> &'static str {
        match self.port_type {
            0 => "endpoint",
            1 => "legacy endpoint",
            4 => "root port",
            5 => "upstream port",
            6 => "downstream port",
            7 => "PCIe-to-PCI bridge",
            8 => "PCI-to-PCIe bridge",
            9 => "RC integrated endpoint",
            10 => "RC event collector",
            _ => "other",
        }
    }
}

/// Bus numbers of a PCI-to-PCI bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeBuses {
    /// Primary bus.
    pub primary: u8,
    /// Secondary bus (directly below).
    pub secondary: u8,
    /// Highest bus below.
    pub subordinate: u8,
}

/// One PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// Segment group.
    pub segment: u16,
    /// Address.
    pub bdf: Bdf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: (u8, u8, u8),
    /// Revision.
    pub revision: u8,
    /// Header type (without the multifunction bit).
    pub header_type: u8,
    /// BARs that decode something.
    pub bars: Vec<Bar>,
    /// Standard capabilities in list order.
    pub capabilities: Vec<Capability>,
    /// MSI, if present.
    pub msi: Option<MsiInfo>,
    /// MSI-X, if present.
    pub msix: Option<MsixInfo>,
    /// PCIe, if present.
    pub pcie: Option<PcieInfo>,
    /// Bus numbers, for bridges.
    pub bridge: Option<BridgeBuses>,
    /// The bridge this function sits behind (None on a root bus).
    pub parent: Option<Bdf>,
    /// Problems found while reading this function (capability loop, ...).
    pub warnings: Vec<&'static str>,
}

impl PciDevice {
    /// Readable class name for reports.
    pub fn class_name(&self) -> &'static str {
        match (self.class.0, self.class.1) {
            (0x00, _) => "unclassified",
            (0x01, 0x06) => "SATA controller",
            (0x01, 0x08) => "NVMe controller",
            (0x01, _) => "storage",
            (0x02, _) => "network",
            (0x03, _) => "display",
            (0x06, 0x00) => "host bridge",
            (0x06, 0x01) => "ISA bridge",
            (0x06, 0x04) => "PCI bridge",
            (0x06, _) => "bridge",
            (0x08, 0x06) => "IOMMU",
            (0x08, _) => "system peripheral",
            (0x0c, 0x03) => "USB controller",
            (0x0c, 0x05) => "SMBus",
            (0x0c, _) => "serial bus",
            (0x00..=0xfe, _) => "other",
            (0xff, _) => "unassigned class",
        }
    }

    /// The capability with this id, if present.
    pub fn capability(&self, id: u8) -> Option<u8> {
        self.capabilities.iter().find(|c| c.id == id).map(|c| c.offset)
    }
}

/// A range of buses with config access (from the MCFG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    /// Segment group.
    pub segment: u16,
    /// First bus.
    pub start: u8,
    /// Last bus.
    pub end: u8,
}

/// Enumerates every function reachable from the ranges' first buses.
pub fn enumerate(cfg: &impl ConfigAccess, ranges: &[BusRange]) -> Vec<PciDevice> {
    let mut out = Vec::new();
    for r in ranges {
        let mut seen = [false; 256];
        scan_bus(cfg, *r, r.start, None, &mut seen, &mut out, 0);
    }
    out
}

fn scan_bus(
    cfg: &impl ConfigAccess,
    r: BusRange,
    bus: u8,
    parent: Option<Bdf>,
    seen: &mut [bool; 256],
    out: &mut Vec<PciDevice>,
    depth: u32,
) {
    if bus < r.start || bus > r.end || seen[bus as usize] || depth > 32 {
        return;
    }
    seen[bus as usize] = true;
    for device in 0..32u8 {
        let f0 = Bdf { bus, device, function: 0 };
        if cfg.read16(r.segment, f0, 0) == 0xffff {
            continue;
        }
        let multi = cfg.read8(r.segment, f0, 0x0e) & 0x80 != 0;
        for function in 0..if multi { 8 } else { 1 } {
            let bdf = Bdf { bus, device, function };
            if cfg.read16(r.segment, bdf, 0) == 0xffff {
                continue;
            }
            let dev = read_function(cfg, r.segment, bdf, parent);
            let child = dev.bridge.map(|b| b.secondary);
            out.push(dev);
            if let Some(secondary) = child
                && secondary > bus
            {
                scan_bus(cfg, r, secondary, Some(bdf), seen, out, depth + 1);
            }
        }
    }
}

fn read_function(cfg: &impl ConfigAccess, seg: u16, bdf: Bdf, parent: Option<Bdf>) -> PciDevice {
    let id = cfg.read32(seg, bdf, 0);
    let class = cfg.read32(seg, bdf, 8);
    let header_type = cfg.read8(seg, bdf, 0x0e) & 0x7f;
    let mut dev = PciDevice {
        segment: seg,
        bdf,
        vendor: id as u16,
        device: (id >> 16) as u16,
        class: ((class >> 24) as u8, (class >> 16) as u8, (class >> 8) as u8),
        revision: class as u8,
        header_type,
        bars: Vec::new(),
        capabilities: Vec::new(),
        msi: None,
        msix: None,
        pcie: None,
        bridge: None,
        parent,
        warnings: Vec::new(),
    };
    let bar_count = match header_type {
        0 => 6,
        1 => 2,
        _ => 0,
    };
    if header_type == 1 {
        let buses = cfg.read32(seg, bdf, 0x18);
        dev.bridge =
            Some(BridgeBuses { primary: buses as u8, secondary: (buses >> 8) as u8, subordinate: (buses >> 16) as u8 });
    }
    if bar_count > 0 {
        size_bars(cfg, seg, bdf, bar_count, &mut dev);
    }
    read_capabilities(cfg, seg, bdf, &mut dev);
    dev
}

fn size_bars(cfg: &impl ConfigAccess, seg: u16, bdf: Bdf, count: u8, dev: &mut PciDevice) {
    // Decoding off while BARs hold all-ones, so no stray cycles hit them.
    let command = cfg.read32(seg, bdf, 0x04);
    cfg.write32(seg, bdf, 0x04, command & 0xffff & !0x3);
    let mut i = 0;
    while i < count {
        let off = 0x10 + 4 * i as u16;
        let orig = cfg.read32(seg, bdf, off);
        cfg.write32(seg, bdf, off, 0xffff_ffff);
        let probe = cfg.read32(seg, bdf, off);
        cfg.write32(seg, bdf, off, orig);
        if orig & 1 == 1 {
            let mask = probe & 0xffff_fffc;
            if mask != 0 {
                let size = (!(mask | 0xffff_0000)).wrapping_add(1) as u64;
                dev.bars.push(Bar { index: i, kind: BarKind::Io, base: (orig & !3) as u64, size, prefetchable: false });
            }
            i += 1;
            continue;
        }
        let prefetchable = orig & 0x8 != 0;
        let is64 = (orig >> 1) & 3 == 2 && i + 1 < count;
        if is64 {
            let off_hi = off + 4;
            let orig_hi = cfg.read32(seg, bdf, off_hi);
            cfg.write32(seg, bdf, off_hi, 0xffff_ffff);
            let probe_hi = cfg.read32(seg, bdf, off_hi);
            cfg.write32(seg, bdf, off_hi, orig_hi);
            let mask = ((probe_hi as u64) << 32) | (probe & 0xffff_fff0) as u64;
            if mask != 0 {
                dev.bars.push(Bar {
                    index: i,
                    kind: BarKind::Mem64,
                    base: ((orig_hi as u64) << 32) | (orig & 0xffff_fff0) as u64,
                    size: (!mask).wrapping_add(1),
                    prefetchable,
                });
            }
            i += 2;
        } else {
            let mask = probe & 0xffff_fff0;
            if mask != 0 {
                dev.bars.push(Bar {
                    index: i,
                    kind: BarKind::Mem32,
                    base: (orig & 0xffff_fff0) as u64,
                    size: (!mask).wrapping_add(1) as u64,
                    prefetchable,
                });
            }
            i += 1;
        }
    }
    cfg.write32(seg, bdf, 0x04, command & 0xffff);
}

fn read_capabilities(cfg: &impl ConfigAccess, seg: u16, bdf: Bdf, dev: &mut PciDevice) {
    let status = cfg.read16(seg, bdf, 0x06);
    if status & 0x10 == 0 {
        return;
    }
    let mut ptr = cfg.read8(seg, bdf, 0x34) & 0xfc;
    let mut visited = [false; 64];
    for _ in 0..48 {
        if ptr < 0x40 {
            return;
        }
        if visited[ptr as usize / 4] {
            dev.warnings.push("capability list loops");
            return;
        }
        visited[ptr as usize / 4] = true;
        let header = cfg.read32(seg, bdf, ptr as u16);
        let id = header as u8;
        dev.capabilities.push(Capability { id, offset: ptr });
        let control = (header >> 16) as u16;
        match id {
            0x05 => {
                dev.msi = Some(MsiInfo {
                    offset: ptr,
                    addr64: control & (1 << 7) != 0,
                    vectors: 1 << ((control >> 1) & 7).min(5),
                    maskable: control & (1 << 8) != 0,
                })
            }
            0x11 => {
                let table = cfg.read32(seg, bdf, ptr as u16 + 4);
                let pba = cfg.read32(seg, bdf, ptr as u16 + 8);
                dev.msix = Some(MsixInfo {
                    offset: ptr,
                    table_size: (control & 0x7ff) + 1,
                    table: ((table & 7) as u8, table & !7),
                    pba: ((pba & 7) as u8, pba & !7),
                })
            }
            0x10 => {
                dev.pcie = Some(PcieInfo {
                    offset: ptr,
                    port_type: ((control >> 4) & 0xf) as u8,
                    version: (control & 0xf) as u8,
                })
            }
            _ => {}
        }
        ptr = ((header >> 8) as u8) & 0xfc;
    }
    dev.warnings.push("capability list longer than 48 entries");
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;
    use std::collections::BTreeMap;

    /// A config space with BAR sizing behaviour: writes to a BAR keep only
    /// the bits its size allows.
    #[derive(Default)]
    struct Fake {
        space: RefCell<BTreeMap<(u8, u8, u8), [u32; 1024]>>,
        bar_masks: BTreeMap<(u8, u8, u8, u16), u32>,
    }

    impl Fake {
        fn add(&mut self, b: Bdf, vendor_device: u32, class: u32, header: u8) -> &mut [u32; 1024] {
            let mut s = [0u32; 1024];
            s[0] = vendor_device;
            s[2] = class;
            s[3] = (header as u32) << 16;
            self.space.get_mut().insert((b.bus, b.device, b.function), s);
            self.space.get_mut().get_mut(&(b.bus, b.device, b.function)).unwrap()
        }
    }

    impl ConfigAccess for Fake {
        fn read32(&self, _: u16, b: Bdf, off: u16) -> u32 {
            self.space.borrow().get(&(b.bus, b.device, b.function)).map_or(0xffff_ffff, |s| s[off as usize / 4])
        }
        fn write32(&self, _: u16, b: Bdf, off: u16, v: u32) {
            // BARs without a registered size are unimplemented: hard-wired 0.
            let unimplemented_bar = (0x10..0x28).contains(&off).then_some(0);
            let mask = self.bar_masks.get(&(b.bus, b.device, b.function, off)).copied().or(unimplemented_bar);
            if let Some(s) = self.space.borrow_mut().get_mut(&(b.bus, b.device, b.function)) {
                let old = s[off as usize / 4];
                s[off as usize / 4] = match mask {
                    Some(m) => (v & m) | (old & !m),
                    // The status half of 0x04 is write-one-to-clear.
                    None if off == 4 => (v & 0xffff) | (old & !(v & 0xffff_0000) & 0xffff_0000),
                    None => v,
                };
            }
        }
    }

    fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
        Bdf { bus, device, function }
    }

    #[test]
    fn walks_bridges_sizes_bars_and_reads_capabilities() {
        let mut f = Fake::default();
        f.add(bdf(0, 0, 0), 0x29c0_8086, 0x0600_0000, 0);
        // edu-like device: 1 MiB 32-bit BAR0, MSI at 0x40 (64-bit), PCIe at 0x80.
        let edu = f.add(bdf(0, 2, 0), 0x11e8_1234, 0x00ff_0010, 0);
        edu[1] = 0x0010_0000; // status: capability list
        edu[4] = 0xfea0_0000;
        edu[0x34 / 4] = 0x40;
        edu[0x40 / 4] = 0x0080_8005; // MSI, next 0x80, control bit7 = 64-bit
        edu[0x80 / 4] = 0x0002_0010; // PCIe v2 endpoint, end
        f.bar_masks.insert((0, 2, 0, 0x10), 0xfff0_0000);
        // Root port bridging to bus 1, a 64-bit prefetchable BAR device behind it.
        let rp = f.add(bdf(0, 3, 0), 0x000c_1b36, 0x0604_0000, 1);
        rp[0x18 / 4] = 0x0001_0100;
        let nic = f.add(bdf(1, 0, 0), 0x10d3_8086, 0x0200_0000, 0);
        nic[4] = 0x0000_000c;
        nic[5] = 0x0000_0001;
        f.bar_masks.insert((1, 0, 0, 0x10), 0xffff_c000);
        f.bar_masks.insert((1, 0, 0, 0x14), 0xffff_ffff);
        let before = f.space.borrow().clone();

        let devs = enumerate(&f, &[BusRange { segment: 0, start: 0, end: 255 }]);
        assert_eq!(devs.len(), 4);
        let edu = devs.iter().find(|d| d.vendor == 0x1234).unwrap();
        assert_eq!(
            edu.bars,
            vec![Bar { index: 0, kind: BarKind::Mem32, base: 0xfea0_0000, size: 1 << 20, prefetchable: false }]
        );
        assert_eq!(edu.msi, Some(MsiInfo { offset: 0x40, addr64: true, vectors: 1, maskable: false }));
        assert_eq!(edu.pcie.map(|p| p.port_type), Some(0));
        let nic = devs.iter().find(|d| d.vendor == 0x8086 && d.bdf.bus == 1).unwrap();
        assert_eq!(nic.parent, Some(bdf(0, 3, 0)));
        assert_eq!(nic.bars[0].kind, BarKind::Mem64);
        assert_eq!(nic.bars[0].size, 0x4000);
        assert_eq!(nic.bars[0].base, 0x1_0000_0000);
        assert!(nic.bars[0].prefetchable);
        // Sizing restored every register.
        assert_eq!(*f.space.borrow(), before);
    }

    #[test]
    fn hostile_config_space_is_bounded() {
        let mut f = Fake::default();
        // A bridge whose secondary bus is its own bus, and one that points
        // back to bus 0 from bus 1: no endless recursion.
        let b = f.add(bdf(0, 1, 0), 0x0001_1b36, 0x0604_0000, 1);
        b[0x18 / 4] = 0x0000_0000;
        let b2 = f.add(bdf(0, 2, 0), 0x0001_1b36, 0x0604_0000, 1);
        b2[0x18 / 4] = 0x0001_0100;
        let b3 = f.add(bdf(1, 0, 0), 0x0001_1b36, 0x0604_0000, 1);
        b3[0x18 / 4] = 0x0000_0001;
        // A capability list that loops.
        let d = f.add(bdf(0, 3, 0), 0x0002_1234, 0, 0);
        d[1] = 0x0010_0000;
        d[0x34 / 4] = 0x40;
        d[0x40 / 4] = 0x0000_4009;
        let devs = enumerate(&f, &[BusRange { segment: 0, start: 0, end: 255 }]);
        assert_eq!(devs.len(), 4);
        let d = devs.iter().find(|d| d.bdf == bdf(0, 3, 0)).unwrap();
        assert_eq!(d.warnings, vec!["capability list loops"]);
        assert_eq!(d.capabilities.len(), 1);
    }

    #[test]
    fn requester_ids() {
        let b = bdf(0x12, 0x1f, 7);
        assert_eq!(b.requester_id(), 0x12ff);
        assert_eq!(Bdf::from_requester_id(0x12ff), b);
        assert_eq!(b.to_string(), "12:1f.7");
    }
}
