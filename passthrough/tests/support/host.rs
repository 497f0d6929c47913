//! `ModelHost`: a [`Platform`] whose IOMMUs are the drivers' register
//! models and whose RAM is a sparse map on the heap.
//!
//! Memory has two views, as a machine whose IOMMU may not snoop the CPU's
//! caches has:
//! * the **CPU view**, what the driver reads and writes through the
//!   platform (and what a snooping unit sees);
//! * the **memory view**, what a unit that does not snoop (VT-d ECAP.C = 0,
//!   AMD-Vi without the IVHD Coherent flag) reads: it changes only when
//!   `flush_cache` writes lines back. Fresh frames hold [`POISON`] there
//!   until their zeroes are flushed; freed frames get poison in both views
//!   (someone else owns them now).
//!
//! The units' own DMA writes (completion stores, fault and event records)
//! land in both views. Every change a view takes advances one counter, the
//! stamp: each word remembers when it last changed in each view, and the
//! models log the stamp with every command they run, so a test can check
//! that an invalidation came after the change it covers.

use portcullis::{Bdf, PciFunction, PhysAddr, Platform, PlatformError};
use portcullis_iommu::mmio::Mmio;
use portcullis_iommu::testing::DeviceMemory;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// What a unit that does not snoop sees in a frame whose zeroes were never
/// flushed: present in every entry format (bits 0 and 1 set), pointing
/// nowhere.
pub const POISON: u64 = 0xdead_beef_0bad_f00f;

/// Where the frame allocator starts (IOMMU tables, rings, ...).
pub const FRAMES_BASE: u64 = 0x8_0000_0000;

/// A memory view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    /// What the CPU reads (and a snooping unit).
    Cpu,
    /// Memory itself (what a unit that does not snoop reads).
    Memory,
}

type Page = Box<[u64; 512]>;

#[derive(Default)]
struct ViewData {
    pages: BTreeMap<u64, Page>,
    /// Word address -> stamp of its last change.
    words: HashMap<u64, u64>,
    /// Page address -> stamp of the last whole-page reset (alloc, free).
    resets: HashMap<u64, u64>,
}

impl ViewData {
    fn get(&self, addr: u64) -> Option<u64> {
        self.pages.get(&(addr & !0xfff)).map(|p| p[(addr & 0xfff) as usize / 8])
    }
    fn changed_at(&self, addr: u64) -> u64 {
        let w = self.words.get(&(addr & !7)).copied().unwrap_or(0);
        w.max(self.resets.get(&(addr & !0xfff)).copied().unwrap_or(0))
    }
}

/// One freed run of frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freed {
    /// First frame.
    pub base: u64,
    /// Frames.
    pub count: usize,
    /// Stamp of the free.
    pub stamp: u64,
}

#[derive(Default)]
struct Inner {
    cpu: ViewData,
    memory: ViewData,
    stamp: u64,
    next: u64,
    live: BTreeMap<u64, usize>,
    free: Vec<(u64, usize)>,
    freed: Vec<Freed>,
    flushes: Vec<(u64, u64)>,
    /// Runs allocated whose first flush has not come yet (for
    /// `drop_alloc_flushes`).
    unflushed: BTreeMap<u64, usize>,
    drop_alloc_flushes: bool,
    guest: BTreeMap<u64, Box<[u8; 4096]>>,
    guest_ram: Vec<(u64, u64)>,
}

impl Inner {
    fn view(&mut self, v: View) -> &mut ViewData {
        match v {
            View::Cpu => &mut self.cpu,
            View::Memory => &mut self.memory,
        }
    }

    fn set(&mut self, v: View, addr: u64, value: u64) {
        let stamp = self.stamp + 1;
        let view = self.view(v);
        let page = view.pages.get_mut(&(addr & !0xfff)).unwrap_or_else(|| panic!("{addr:#x} is not RAM ({v:?})"));
        let slot = &mut page[(addr & 0xfff) as usize / 8];
        if *slot != value {
            *slot = value;
            view.words.insert(addr & !7, stamp);
            self.stamp = stamp;
        }
    }

    fn reset(&mut self, v: View, page: u64, value: u64) {
        self.stamp += 1;
        let stamp = self.stamp;
        let view = self.view(v);
        view.pages.insert(page, Box::new([value; 512]));
        // Words changed before keep older stamps: `changed_at` takes the
        // newer of the two.
        view.resets.insert(page, stamp);
    }

    fn live_frame(&self, addr: u64) -> bool {
        self.live.range(..=addr).next_back().is_some_and(|(&base, &n)| addr < base + n as u64 * 4096)
    }
}

/// The RAM of a [`ModelHost`], shared by the platform (the driver's
/// accesses) and the register models (the units').
#[derive(Default)]
pub struct Memory(Mutex<Inner>);

impl Memory {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap()
    }

    /// The current stamp.
    pub fn stamp(&self) -> u64 {
        self.lock().stamp
    }

    /// The word at `addr` in `view` (`None`: not RAM).
    pub fn read(&self, view: View, addr: u64) -> Option<u64> {
        let m = self.lock();
        match view {
            View::Cpu => m.cpu.get(addr),
            View::Memory => m.memory.get(addr),
        }
    }

    /// Whether `addr` lies in a frame allocated and not freed.
    pub fn is_live(&self, addr: u64) -> bool {
        self.lock().live_frame(addr)
    }

    /// Whether the cache line holding `addr` reads the same in both views
    /// (nothing the CPU wrote there is still waiting for a flush).
    pub fn line_clean(&self, addr: u64) -> bool {
        let m = self.lock();
        let line = addr & !63;
        (0..8).all(|i| m.cpu.get(line + i * 8) == m.memory.get(line + i * 8))
    }

    /// When the word at `addr` last changed in `view`.
    pub fn changed_at(&self, view: View, addr: u64) -> u64 {
        let m = self.lock();
        match view {
            View::Cpu => m.cpu.changed_at(addr),
            View::Memory => m.memory.changed_at(addr),
        }
    }

    /// Frames allocated and not freed.
    pub fn live_frames(&self) -> usize {
        self.lock().live.values().sum()
    }

    /// Every allocated run (base, frames), ascending.
    pub fn live_runs(&self) -> Vec<(u64, usize)> {
        self.lock().live.iter().map(|(&b, &n)| (b, n)).collect()
    }

    /// Every free so far.
    pub fn freed(&self) -> Vec<Freed> {
        self.lock().freed.clone()
    }

    /// Every `flush_cache` call so far.
    pub fn flushes(&self) -> Vec<(u64, u64)> {
        self.lock().flushes.clone()
    }

    /// Makes `flush_cache` ignore the first flush of each fresh run when
    /// it covers exactly that run (what a `Platform` user that forgot to
    /// write back zeroed frames would produce).
    pub fn drop_alloc_flushes(&self, on: bool) {
        self.lock().drop_alloc_flushes = on;
    }

    fn alloc(&self, count: usize, align: u64) -> Option<u64> {
        assert!(count > 0 && align.is_power_of_two() && align >= 4096);
        let mut m = self.lock();
        let base = match m.free.iter().position(|&(b, n)| n == count && b % align == 0) {
            Some(i) => m.free.swap_remove(i).0,
            None => {
                if m.next == 0 {
                    m.next = FRAMES_BASE;
                }
                let b = m.next.next_multiple_of(align);
                m.next = b + count as u64 * 4096;
                b
            }
        };
        for p in 0..count as u64 {
            let page = base + p * 4096;
            m.reset(View::Cpu, page, 0);
            m.reset(View::Memory, page, POISON);
        }
        m.live.insert(base, count);
        m.unflushed.insert(base, count);
        Some(base)
    }

    fn release(&self, base: u64, count: usize) {
        let mut m = self.lock();
        assert_eq!(m.live.remove(&base), Some(count), "free of {count} frames at {base:#x}, not an allocation");
        m.unflushed.remove(&base);
        for p in 0..count as u64 {
            m.reset(View::Cpu, base + p * 4096, POISON);
            m.reset(View::Memory, base + p * 4096, POISON);
        }
        let stamp = m.stamp;
        m.freed.push(Freed { base, count, stamp });
        m.free.push((base, count));
    }

    fn cpu_read(&self, addr: u64) -> u64 {
        let m = self.lock();
        assert!(m.live_frame(addr), "the driver read {addr:#x}, which is not in a live frame");
        m.cpu.get(addr).unwrap()
    }

    fn cpu_write(&self, addr: u64, value: u64) {
        let mut m = self.lock();
        assert!(m.live_frame(addr), "the driver wrote {addr:#x}, which is not in a live frame");
        m.set(View::Cpu, addr, value);
    }

    fn flush(&self, phys: u64, len: u64) {
        let mut m = self.lock();
        m.flushes.push((phys, len));
        if let Some(&n) = m.unflushed.get(&phys) {
            m.unflushed.remove(&phys);
            if m.drop_alloc_flushes && len == n as u64 * 4096 {
                return;
            }
        }
        let mut line = phys & !63;
        while line < phys + len {
            for w in 0..8 {
                let a = line + w * 8;
                if let Some(v) = m.cpu.get(a) {
                    m.set(View::Memory, a, v);
                }
            }
            line += 64;
        }
    }

    fn guest_ok(&self, m: &Inner, phys: u64, len: usize) -> bool {
        m.guest_ram.iter().any(|&(s, e)| phys >= s && phys + len as u64 <= e)
    }
}

/// How a register model reaches the RAM: through the view its unit reads.
#[derive(Clone)]
pub struct UnitMemory {
    mem: Arc<Memory>,
    view: View,
}

impl DeviceMemory for UnitMemory {
    fn read_u64(&self, phys: u64) -> u64 {
        self.mem.read(self.view, phys).unwrap_or_else(|| panic!("a unit read {phys:#x}, which is not RAM"))
    }
    fn write_u64(&self, phys: u64, value: u64) {
        // DMA writes snoop: both views.
        let mut m = self.mem.lock();
        m.set(View::Cpu, phys, value);
        m.set(View::Memory, phys, value);
    }
    fn stamp(&self) -> u64 {
        self.mem.stamp()
    }
}

/// One unit's registers.
#[derive(Clone, Debug)]
pub enum ModelMmio {
    /// A VT-d unit.
    Vtd(vtd::testing::RegisterModel),
    /// An AMD-Vi unit.
    Amd(amdvi::testing::RegisterModel),
}

impl Mmio for ModelMmio {
    fn read32(&self, offset: usize) -> u32 {
        match self {
            Self::Vtd(m) => m.read32(offset),
            Self::Amd(m) => m.read32(offset),
        }
    }
    fn read64(&self, offset: usize) -> u64 {
        match self {
            Self::Vtd(m) => m.read64(offset),
            Self::Amd(m) => m.read64(offset),
        }
    }
    fn write32(&self, offset: usize, value: u32) {
        match self {
            Self::Vtd(m) => m.write32(offset, value),
            Self::Amd(m) => m.write32(offset, value),
        }
    }
    fn write64(&self, offset: usize, value: u64) {
        match self {
            Self::Vtd(m) => m.write64(offset, value),
            Self::Amd(m) => m.write64(offset, value),
        }
    }
}

/// One modelled unit.
pub struct ModelUnit {
    /// Register base.
    pub base: u64,
    /// Its registers.
    pub mmio: ModelMmio,
    /// The view its walks read.
    pub view: View,
}

/// The test platform.
pub struct ModelHost {
    /// Its RAM.
    pub mem: Arc<Memory>,
    units: Vec<ModelUnit>,
    functions: Vec<PciFunction>,
    config: Mutex<BTreeMap<(u16, Bdf), BTreeMap<u16, u32>>>,
    /// Configuration writes, in order (segment, function, offset, value).
    pub config_writes: Mutex<Vec<(u16, Bdf, u16, u32)>>,
    dmar: Option<Vec<u8>>,
    ivrs: Option<Vec<u8>>,
    clock: AtomicU64,
}

/// What a [`ModelHost`] is built from.
#[derive(Default)]
pub struct HostBuilder {
    vtd: Vec<(u64, vtd::testing::Config)>,
    amd: Vec<(u64, u64, bool)>,
    functions: Vec<PciFunction>,
    extra_config: Vec<(u16, Bdf, u16, u32)>,
    dmar: Option<Vec<u8>>,
    ivrs: Option<Vec<u8>>,
    guest_ram: Vec<(u64, u64)>,
}

impl HostBuilder {
    /// A VT-d unit at `base` with `config`'s capabilities (it snoops when
    /// ECAP.C is set).
    pub fn vtd_unit(mut self, base: u64, config: vtd::testing::Config) -> Self {
        self.vtd.push((base, config));
        self
    }
    /// An AMD-Vi unit at `base` reporting `efr`; `coherent` as its IVHD
    /// says.
    pub fn amd_unit(mut self, base: u64, efr: u64, coherent: bool) -> Self {
        self.amd.push((base, efr, coherent));
        self
    }
    /// The PCI functions.
    pub fn functions(mut self, f: Vec<PciFunction>) -> Self {
        self.functions = f;
        self
    }
    /// One more configuration-space dword.
    pub fn config_dword(mut self, segment: u16, bdf: Bdf, offset: u16, value: u32) -> Self {
        self.extra_config.push((segment, bdf, offset, value));
        self
    }
    /// The DMAR.
    pub fn dmar(mut self, bytes: &[u8]) -> Self {
        self.dmar = Some(bytes.to_vec());
        self
    }
    /// The IVRS.
    pub fn ivrs(mut self, bytes: &[u8]) -> Self {
        self.ivrs = Some(bytes.to_vec());
        self
    }
    /// Host RAM `[start, start + len)` that guests may be given.
    pub fn guest_ram(mut self, start: u64, len: u64) -> Self {
        self.guest_ram.push((start, start + len));
        self
    }

    /// The platform.
    pub fn build(self) -> Arc<ModelHost> {
        let mem = Arc::new(Memory::default());
        mem.lock().guest_ram = self.guest_ram;
        let unit_mem = |snoop: bool| -> Arc<dyn DeviceMemory> {
            Arc::new(UnitMemory { mem: mem.clone(), view: if snoop { View::Cpu } else { View::Memory } })
        };
        let mut units = Vec::new();
        for (base, config) in self.vtd {
            let snoop = config.ecap & 1 != 0;
            let model = vtd::testing::RegisterModel::new(config, unit_mem(snoop));
            units.push(ModelUnit { base, mmio: ModelMmio::Vtd(model), view: view(snoop) });
        }
        for (base, efr, coherent) in self.amd {
            let model = amdvi::testing::RegisterModel::new(efr, unit_mem(coherent));
            units.push(ModelUnit { base, mmio: ModelMmio::Amd(model), view: view(coherent) });
        }
        let mut config: BTreeMap<(u16, Bdf), BTreeMap<u16, u32>> = BTreeMap::new();
        for f in &self.functions {
            config.insert((f.segment, f.bdf), config_space(f));
        }
        for (seg, bdf, off, v) in self.extra_config {
            config.get_mut(&(seg, bdf)).expect("config dword of a function not listed").insert(off, v);
        }
        Arc::new(ModelHost {
            mem,
            units,
            functions: self.functions,
            config: Mutex::new(config),
            config_writes: Mutex::new(Vec::new()),
            dmar: self.dmar,
            ivrs: self.ivrs,
            clock: AtomicU64::new(0),
        })
    }
}

fn view(snoop: bool) -> View {
    if snoop { View::Cpu } else { View::Memory }
}

/// The configuration space scope resolution and bring-up read: vendor and
/// device id, header type (1 for bridges), bus numbers, and a PCI Express
/// capability carrying the port type.
fn config_space(f: &PciFunction) -> BTreeMap<u16, u32> {
    let mut c = BTreeMap::new();
    c.insert(0x00, 0x1234_8086);
    c.insert(0x08, if f.bridge.is_some() { 0x0604_0000 } else { 0x0000_0000 });
    c.insert(0x0c, if f.bridge.is_some() { 0x0001_0000 } else { 0 });
    if let Some(b) = f.bridge {
        c.insert(0x18, f.bdf.bus as u32 | (b.secondary as u32) << 8 | (b.subordinate as u32) << 16);
    }
    if let Some(t) = f.pcie_port_type {
        c.insert(0x04, 1 << 20);
        c.insert(0x34, 0x40);
        c.insert(0x40, 0x10 | (2 | (t as u32) << 4) << 16);
    }
    c
}

impl ModelHost {
    /// A new builder.
    pub fn builder() -> HostBuilder {
        HostBuilder::default()
    }

    /// The unit at `base`.
    pub fn unit(&self, base: u64) -> &ModelUnit {
        self.units.iter().find(|u| u.base == base).unwrap_or_else(|| panic!("no unit at {base:#x}"))
    }

    /// The VT-d model at `base`.
    pub fn vtd(&self, base: u64) -> &vtd::testing::RegisterModel {
        match &self.unit(base).mmio {
            ModelMmio::Vtd(m) => m,
            ModelMmio::Amd(_) => panic!("{base:#x} is an AMD-Vi unit"),
        }
    }

    /// The AMD-Vi model at `base`.
    pub fn amd(&self, base: u64) -> &amdvi::testing::RegisterModel {
        match &self.unit(base).mmio {
            ModelMmio::Amd(m) => m,
            ModelMmio::Vtd(_) => panic!("{base:#x} is a VT-d unit"),
        }
    }

    /// Every unit's register base.
    pub fn bases(&self) -> Vec<u64> {
        self.units.iter().map(|u| u.base).collect()
    }
}

impl Platform for ModelHost {
    type Mmio = ModelMmio;

    fn map_mmio(&self, phys: PhysAddr, len: u64) -> Result<ModelMmio, PlatformError> {
        self.units
            .iter()
            .find(|u| u.base == phys.0)
            .map(|u| u.mmio.clone())
            .ok_or(PlatformError::MmioUnmappable { phys, len })
    }
    fn alloc_frames(&self, count: usize, align: u64) -> Option<PhysAddr> {
        self.mem.alloc(count, align).map(PhysAddr)
    }
    fn free_frames(&self, phys: PhysAddr, count: usize) {
        self.mem.release(phys.0, count)
    }
    fn read_u64(&self, phys: PhysAddr) -> u64 {
        assert_eq!(phys.0 % 8, 0);
        self.mem.cpu_read(phys.0)
    }
    fn write_u64(&self, phys: PhysAddr, value: u64) {
        assert_eq!(phys.0 % 8, 0);
        self.mem.cpu_write(phys.0, value)
    }
    fn read_phys(&self, phys: PhysAddr, buf: &mut [u8]) -> Result<(), PlatformError> {
        let m = self.mem.lock();
        if !self.mem.guest_ok(&m, phys.0, buf.len()) {
            return Err(PlatformError::NotRam { phys, len: buf.len() as u64 });
        }
        for (i, b) in buf.iter_mut().enumerate() {
            let a = phys.0 + i as u64;
            *b = m.guest.get(&(a & !0xfff)).map_or(0, |p| p[(a & 0xfff) as usize]);
        }
        Ok(())
    }
    fn write_phys(&self, phys: PhysAddr, buf: &[u8]) -> Result<(), PlatformError> {
        let mut m = self.mem.lock();
        if !self.mem.guest_ok(&m, phys.0, buf.len()) {
            return Err(PlatformError::NotRam { phys, len: buf.len() as u64 });
        }
        for (i, &b) in buf.iter().enumerate() {
            let a = phys.0 + i as u64;
            m.guest.entry(a & !0xfff).or_insert_with(|| Box::new([0; 4096]))[(a & 0xfff) as usize] = b;
        }
        Ok(())
    }
    fn flush_cache(&self, phys: PhysAddr, len: u64) {
        self.mem.flush(phys.0, len)
    }
    fn now_ns(&self) -> u64 {
        self.clock.fetch_add(1000, Ordering::Relaxed)
    }
    fn pci_read32(&self, segment: u16, bdf: Bdf, offset: u16) -> u32 {
        match self.config.lock().unwrap().get(&(segment, bdf)) {
            Some(c) => c.get(&(offset & !3)).copied().unwrap_or(0),
            None => u32::MAX,
        }
    }
    /// Recorded, and kept as plain storage (no register semantics: the
    /// functions here are not reset by it).
    fn pci_write32(&self, segment: u16, bdf: Bdf, offset: u16, value: u32) {
        self.config_writes.lock().unwrap().push((segment, bdf, offset, value));
        if let Some(c) = self.config.lock().unwrap().get_mut(&(segment, bdf)) {
            c.insert(offset & !3, value);
        }
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

/// PCI functions, briefly.
pub mod pci {
    use portcullis::{Bdf, BridgeBuses, PciFunction};

    /// `bus:dev.fn`.
    pub const fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
        Bdf::new(bus, device, function)
    }

    /// An endpoint (`pcie`: its PCI Express port type, `None` for a
    /// conventional PCI device) below `parent`.
    pub fn endpoint(at: Bdf, parent: Option<Bdf>, pcie: Option<u8>) -> PciFunction {
        PciFunction { segment: 0, bdf: at, parent, bridge: None, pcie_port_type: pcie, acs: false }
    }

    /// A bridge to buses `secondary..=subordinate`.
    pub fn bridge(at: Bdf, parent: Option<Bdf>, pcie: Option<u8>, secondary: u8, subordinate: u8) -> PciFunction {
        PciFunction {
            segment: 0,
            bdf: at,
            parent,
            bridge: Some(BridgeBuses { secondary, subordinate }),
            pcie_port_type: pcie,
            acs: false,
        }
    }

    /// PCI Express endpoint.
    pub const ENDPOINT: Option<u8> = Some(0);
    /// Root port.
    pub const ROOT_PORT: Option<u8> = Some(4);
    /// PCIe-to-PCI bridge.
    pub const PCIE_TO_PCI: Option<u8> = Some(7);
    /// Root-complex integrated endpoint.
    pub const INTEGRATED: Option<u8> = Some(9);
    /// Conventional PCI (no PCI Express capability).
    pub const CONVENTIONAL: Option<u8> = None;
}
