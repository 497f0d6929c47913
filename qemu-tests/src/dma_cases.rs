//! DMA isolation and translation cases every IOMMU driver must pass, with
//! the edu DMA engine: a DMA lands exactly where it is mapped and nowhere
//! else; what is not mapped, not writable, unmapped again or not attached
//! is blocked and changes no byte. Each driver supplies a [`Backend`]
//! (`vtd_cases`, `amd_cases`) and runs these under its own test names.
//!
//! Blocking is always proven by memory: guard pages and canaries that must
//! survive. Fault records are checked too where the unit records them
//! (QEMU's AMD-Vi records none: its event log does not work).

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use portcullis::drivers::vtd;
use portcullis::{Device, Domain, Driver, IommuUnit, RequesterRef, Vendor};
use portcullis_iommu::unit::{FirmwareRange, IovaRange};
use portcullis_iommu::{IommuDomain, IotlbGather, Prot};
use portcullis_kernel::edu::Edu;
use portcullis_kernel::host::{Iommus, KernelHost};
use portcullis_kernel::ktest::{Outcome, TestResult};
use portcullis_kernel::mem::{alloc_frames, free_frames, phys_to_virt};
use portcullis_kernel::{Platform, ensure, ensure_eq, skip};

pub const X: u64 = 0x100_0000;
pub const Y: u64 = 0x200_0000;
pub const Z: u64 = 0x300_0000;
pub const CANARY: u8 = 0xcc;

pub fn fail(s: String) -> Outcome {
    Outcome::Fail(s)
}

/// A fault record, as the cases need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Requester (device) id.
    pub source: u16,
    /// Page address.
    pub address: u64,
    /// A write was refused.
    pub write: bool,
    /// The unit's reason code.
    pub reason: u8,
}

/// One IOMMU unit as the cases drive it.
pub trait Backend {
    /// Its domain type.
    type Domain;
    /// A new empty domain.
    fn new_domain(&self) -> Result<Self::Domain, String>;
    /// The domain's page table.
    fn paging<'a>(&self, d: &'a mut Self::Domain) -> &'a mut dyn IommuDomain;
    /// Points device `id` at `d` (the unit's entry only).
    fn attach(&self, d: &Self::Domain, id: u16) -> Result<(), String>;
    /// Blocks device `id` again.
    fn detach(&self, d: &Self::Domain, id: u16) -> Result<(), String>;
    /// Size of the page mapping `iova` in `d`, from the walk.
    fn page_size(&self, d: &Self::Domain, iova: u64) -> Option<u64>;
    /// Invalidation waits the unit has issued so far.
    fn waits(&self) -> u64;
    /// New fault records, or `None` when the unit cannot record them.
    fn faults(&self) -> Option<Vec<Fault>>;
    /// The reason code of a write to a read-only page of `d`, if the unit
    /// reports one.
    fn write_denied_reason(&self, d: &Self::Domain) -> Option<u8>;
    /// The device id the unit knows the function `edu` by (after bridge
    /// and firmware aliasing).
    fn device_id(&self, p: &Platform, edu: &Edu) -> Result<u16, Outcome>;
    /// The device as iommufd binds it.
    fn device_ops(&self, id: u16) -> Arc<dyn iommufd::ctx::DeviceOps>;
    /// The domain id device `id` is attached to.
    fn attached(&self, id: u16) -> Option<u16>;
    /// Gives device `id` a firmware-reserved range `[base, limit]` (a VT-d
    /// RMRR, an AMD-Vi unity range), or none again with `None`.
    fn set_firmware_range(&self, range: Option<(u16, u64, u64)>);
}

/// The first running unit of one vendor, through the passthrough crate's
/// public API only (the generic unit and domain; the driver's own type
/// where a case needs vendor-specific state).
pub struct UnitBackend {
    /// Every unit of the machine.
    pub iommus: &'static Iommus,
    /// Index of this unit.
    pub index: u16,
    /// The unit, vendor-neutral.
    pub unit: Arc<dyn IommuUnit>,
    /// The unit, as its driver's type.
    pub driver: Driver<KernelHost>,
}

impl UnitBackend {
    /// The first `vendor` unit of the machine, running.
    pub fn first(p: &Platform, vendor: Vendor) -> Result<Self, Outcome> {
        let iommus = iommus(p);
        let (index, u) = iommus
            .units()
            .iter()
            .enumerate()
            .find(|(_, u)| u.vendor == vendor)
            .ok_or_else(|| fail(format!("no {vendor:?} unit in the firmware tables")))?;
        let driver = u.state.as_ref().map_err(|e| fail(format!("bring-up: {e}")))?.clone();
        Ok(Self { iommus, index: index as u16, unit: driver.generic(), driver })
    }
}

impl Backend for UnitBackend {
    type Domain = Domain;
    fn new_domain(&self) -> Result<Domain, String> {
        Domain::new(self.unit.clone(), self.index).map_err(|e| format!("{e}"))
    }
    fn paging<'a>(&self, d: &'a mut Domain) -> &'a mut dyn IommuDomain {
        d
    }
    fn attach(&self, d: &Domain, id: u16) -> Result<(), String> {
        d.unit_domain().attach_requester(id).map_err(|e| format!("{e}"))
    }
    fn detach(&self, d: &Domain, id: u16) -> Result<(), String> {
        d.unit_domain().detach_requester(id).map_err(|e| format!("{e}"))
    }
    fn page_size(&self, d: &Domain, iova: u64) -> Option<u64> {
        d.page_size(iova)
    }
    fn waits(&self) -> u64 {
        self.unit.invalidation_waits()
    }
    fn faults(&self) -> Option<Vec<Fault>> {
        let f = self.unit.poll_faults();
        match self.unit.vendor() {
            Vendor::IntelVtd => Some(
                f.iter()
                    .map(|r| Fault { source: r.requester_id, address: r.address, write: r.write, reason: r.reason })
                    .collect(),
            ),
            // QEMU 10.0.2 writes no usable event log: read it (so the
            // driver path runs) but do not rely on it.
            Vendor::AmdVi => None,
        }
    }
    fn write_denied_reason(&self, d: &Domain) -> Option<u8> {
        match self.unit.vendor() {
            // A second-stage walk reports reason 5 (QEMU does so in
            // scalable mode too); a first-stage walk reports the
            // scalable-mode code 0x85.
            Vendor::IntelVtd if d.table_info().format == "x86 first stage" => Some(vtd::fault::SM_WRITE),
            Vendor::IntelVtd => Some(vtd::fault::WRITE),
            Vendor::AmdVi => None,
        }
    }
    fn device_id(&self, p: &Platform, edu: &Edu) -> Result<u16, Outcome> {
        let dev = edu_device(p, edu)?;
        if self.unit.vendor() == Vendor::AmdVi && dev.bdf.bus != 0 {
            // QEMU 10.0's AMD-Vi names a device by the bus number its bus
            // had when the device was created (0 for every bus behind a
            // bridge, numbered later by firmware): its DMA is looked up
            // under device id (0, devfn), not the id real hardware uses.
            skip!(
                "QEMU's AMD-Vi looks {} up under bus 0 (bus numbers fixed at creation), not as {:#06x}",
                dev.bdf,
                edu.sid
            );
        }
        match self.iommus.assignment(dev.segment, dev.bdf) {
            Some(a) if a.unit == self.index as usize => Ok(a.requester_id),
            Some(a) => Err(fail(format!("{} is translated by unit {}, not {}", dev.bdf, a.unit, self.index))),
            None => Err(fail(format!("no unit translates {}", dev.bdf))),
        }
    }
    fn device_ops(&self, id: u16) -> Arc<dyn iommufd::ctx::DeviceOps> {
        Arc::new(Device::new(self.unit.clone(), RequesterRef { unit: self.index, requester_id: id }))
    }
    fn attached(&self, id: u16) -> Option<u16> {
        self.unit.attached_domain(id)
    }
    fn set_firmware_range(&self, range: Option<(u16, u64, u64)>) {
        let ranges = range.map(|(requester_id, start, last)| FirmwareRange {
            requester_id,
            range: IovaRange { start, last },
            prot: Prot::RW,
        });
        self.unit.set_firmware_ranges(ranges.into_iter().collect());
    }
}

/// Checks that a fault matching `pred` was recorded, where the unit
/// records faults.
fn expect_fault<B: Backend>(b: &B, what: &str, pred: impl Fn(&Fault) -> bool) -> TestResult {
    if let Some(f) = b.faults() {
        ensure!(f.iter().any(pred), "no fault {}: {:?}", what, f);
    }
    Ok(())
}

fn expect_no_fault<B: Backend>(b: &B) -> TestResult {
    let f = b.faults().unwrap_or_default();
    ensure!(f.is_empty(), "unexpected faults: {:?}", f);
    Ok(())
}

static IOMMUS: spin::Once<Iommus> = spin::Once::new();

/// Every IOMMU of the machine, brought up once per boot the way a
/// hypervisor embedding Portcullis does it (`intel-rb`: the VT-d unit
/// driven without its invalidation queue; routes to x2APIC ids when the
/// kernel's local APIC runs in x2APIC mode, `intel-x2apic`).
pub fn iommus(p: &Platform) -> &'static Iommus {
    IOMMUS.call_once(|| {
        let vtd_mode = (p.config == "intel-rb").then_some(vtd::Mode::Legacy { queued: false });
        let x2apic = portcullis_kernel::arch::irq::x2apic();
        Iommus::bring_up_with(KernelHost::new(p), portcullis::Options { vtd_mode, x2apic })
    })
}

pub fn edus(p: &Platform) -> Vec<Edu> {
    p.pci.iter().filter_map(|d| Edu::new(&p.ecam, d)).collect()
}

/// The PCI function `edu` drives.
pub fn edu_device<'a>(p: &'a Platform, edu: &Edu) -> Result<&'a portcullis_kernel::pci::PciDevice, Outcome> {
    p.pci.iter().find(|d| d.bdf.requester_id() == edu.sid).ok_or_else(|| fail("edu not enumerated".into()))
}

/// Raises the edu's interrupt, waits up to `wait_ms` for it to arrive on
/// `vector`, acknowledges it; true when it arrived.
pub fn raise_and_wait(edu: &Edu, vector: u8, wait_ms: u64) -> bool {
    use portcullis_kernel::arch::irq;
    let before = irq::count(vector);
    edu.raise_interrupt(1);
    let deadline = portcullis_kernel::time::uptime_ns() + wait_ms * 1_000_000;
    while irq::count(vector) == before && portcullis_kernel::time::uptime_ns() < deadline {
        core::hint::spin_loop();
    }
    edu.ack_interrupt(1);
    irq::count(vector) > before
}

/// The x2APIC retargeting round trip both vendors' tests make: the edu
/// `dev` programmed with route `msi` (to this CPU, x2APIC id `apic`)
/// interrupts this CPU; retargeted to `wide` (the same low byte, another
/// id) `check_wide` sees the rewritten entry and nothing reaches this CPU;
/// retargeted back it interrupts this CPU again. The edu's MSI is turned
/// off again however it ends.
pub fn x2apic_retarget_round_trip(
    p: &Platform,
    edu: &Edu,
    dev: &portcullis_kernel::pci::PciDevice,
    guest: &mut portcullis_kernel::host::GuestDma,
    msi: &portcullis::Msi,
    (vector, apic, wide): (u8, u32, u32),
    check_wide: impl Fn() -> TestResult,
) -> TestResult {
    use portcullis_kernel::arch::irq;
    let err = |e: portcullis::PassthroughError| fail(format!("{e}"));
    ensure!(portcullis_kernel::edu::set_msi(&p.ecam, dev, Some((msi.address, msi.data))), "the edu has no MSI");
    irq::enable();
    let delivered = (|| -> TestResult {
        ensure!(raise_and_wait(edu, vector, 2000), "the MSI routed to x2APIC id {:#x} did not arrive", apic);
        guest.retarget_msi(msi.handle, vector, wide).map_err(err)?;
        check_wide()?;
        ensure!(!raise_and_wait(edu, vector, 200), "an MSI for x2APIC id {:#x} reached CPU {:#x}", wide, apic);
        guest.retarget_msi(msi.handle, vector, apic).map_err(err)?;
        ensure!(raise_and_wait(edu, vector, 2000), "the MSI did not arrive after retargeting back");
        Ok(())
    })();
    irq::disable();
    portcullis_kernel::edu::set_msi(&p.ecam, dev, None);
    delivered
}

/// Defines the common DMA cases under a driver's test names: each
/// `name => case` becomes `pub fn name(p)` running `case` with the backend
/// `$backend(p)` returns.
macro_rules! dma_cases_for {
    ($backend:ident; $($name:ident => $case:ident),* $(,)?) => {
        $(
            pub fn $name(p: &Platform) -> TestResult {
                $crate::dma_cases::$case(&$backend(p)?, p)
            }
        )*
    };
}
pub(crate) use dma_cases_for;

fn first_edu(p: &Platform) -> Result<Edu, Outcome> {
    edus(p).into_iter().next().ok_or_else(|| fail("no edu".into()))
}

/// The slot of the second 64-bit edu on the root bus (xtask's EDUS).
pub const ROOT_WIDE_EDU_SLOT: u8 = 6;

/// An edu that can address all 64 bits and that `b` translates: the one
/// behind the root port, else the one on the root bus at
/// [`ROOT_WIDE_EDU_SLOT`].
fn wide_edu<B: Backend>(b: &B, p: &Platform) -> Result<(Edu, u16), Outcome> {
    let root = p.pci.iter().find(|d| d.bdf.bus == 0 && d.bdf.device == ROOT_WIDE_EDU_SLOT);
    let candidates = edu_behind(p, 4).map(|(e, _)| e).into_iter().chain(root.and_then(|d| Edu::new(&p.ecam, d)));
    let mut why = None;
    for e in candidates {
        match b.device_id(p, &e) {
            Ok(id) => return Ok((e, id)),
            Err(o) => why = Some(o),
        }
    }
    Err(why.unwrap_or_else(|| fail("no 64-bit edu".into())))
}

/// Four frames: guard, A, B, guard; guards and B filled with the canary,
/// A with a pattern.
pub struct Buffers {
    pub base: u64,
}

impl Buffers {
    pub fn new() -> Result<Self, Outcome> {
        let base = alloc_frames(4, 4096).map_err(|e| fail(format!("{e}")))?;
        if base + 4 * 4096 > 1 << 28 {
            let _ = free_frames(base, 4);
            return Err(fail(format!("buffers at {base:#x} beyond edu's 28-bit DMA mask")));
        }
        let mut b = Self { base };
        for i in [0, 2, 3] {
            b.fill(i, |_| CANARY);
        }
        b.fill(1, Self::pattern);
        Ok(b)
    }
    pub fn a(&self) -> u64 {
        self.base + 4096
    }
    pub fn b(&self) -> u64 {
        self.base + 2 * 4096
    }
    /// A copy of page `i`, read with volatile loads (devices write these
    /// frames behind the compiler's back).
    pub fn page(&self, i: usize) -> Vec<u8> {
        let p = phys_to_virt(self.base + i as u64 * 4096);
        // SAFETY: the frames were allocated for this test alone and are
        // direct-mapped; volatile reads of plain RAM are always valid.
        (0..4096).map(|k| unsafe { p.add(k).read_volatile() }).collect()
    }
    /// Fills page `i` with `f(offset)`.
    pub fn fill(&mut self, i: usize, f: impl Fn(usize) -> u8) {
        let p = phys_to_virt(self.base + i as u64 * 4096);
        for k in 0..4096 {
            // SAFETY: as for `page`; no device is writing while the test
            // prepares its buffers.
            unsafe { p.add(k).write_volatile(f(k)) }
        }
    }
    pub fn pattern(i: usize) -> u8 {
        (i * 7 + 3) as u8
    }
    /// Guards hold the canary; A holds the pattern.
    pub fn check_untouched(&self) -> TestResult {
        let g0 = self.page(0).iter().position(|&x| x != CANARY);
        let g3 = self.page(3).iter().position(|&x| x != CANARY);
        ensure!(g0.is_none() && g3.is_none(), "guard page changed (offsets {:?} {:?})", g0, g3);
        let a = self.page(1).iter().enumerate().position(|(i, &x)| x != Self::pattern(i));
        ensure!(a.is_none(), "page A changed at {:?}", a);
        Ok(())
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        let _ = free_frames(self.base, 4);
    }
}

/// The edu behind the root port (64-bit DMA mask) and the one behind the
/// PCIe-to-PCI bridge, by their parents' port types.
pub fn edu_behind(p: &Platform, port_type: u8) -> Option<(Edu, &portcullis_kernel::pci::PciDevice)> {
    let dev = p.pci.iter().find(|d| {
        (d.vendor, d.device) == (0x1234, 0x11e8)
            && d.parent.and_then(|b| p.pci.iter().find(|x| x.bdf == b)).and_then(|x| x.pcie).map(|x| x.port_type)
                == Some(port_type)
    })?;
    Some((Edu::new(&p.ecam, dev)?, dev))
}

/// The first edu and its device id, with pending faults drained.
fn device<B: Backend>(b: &B, p: &Platform) -> Result<(Edu, u16), Outcome> {
    let edu = first_edu(p)?;
    let id = b.device_id(p, &edu)?;
    b.faults();
    Ok((edu, id))
}

/// The usual set-up: the first edu, fresh buffers, and a domain with A at X
/// (read-only) and, when `with_y`, B at Y (read-write).
fn setup<B: Backend>(b: &B, p: &Platform, with_y: bool) -> Result<(Edu, u16, Buffers, B::Domain), Outcome> {
    let (edu, id) = device(b, p)?;
    let bufs = Buffers::new()?;
    let mut d = b.new_domain().map_err(fail)?;
    map(b, &mut d, X, bufs.a(), 4096, Prot::READ)?;
    if with_y {
        map(b, &mut d, Y, bufs.b(), 4096, Prot::RW)?;
    }
    Ok((edu, id, bufs, d))
}

fn map<B: Backend>(b: &B, d: &mut B::Domain, iova: u64, phys: u64, len: u64, prot: Prot) -> TestResult {
    b.paging(d).map(iova, phys, len, prot).map_err(|e| fail(format!("map {iova:#x}: {e}")))
}

fn unmap<B: Backend>(b: &B, d: &mut B::Domain, iova: u64, len: u64) -> TestResult {
    let mut g = IotlbGather::default();
    let n = b.paging(d).unmap(iova, len, &mut g);
    ensure_eq!(n, len, "bytes unmapped at {iova:#x}");
    b.paging(d).iotlb_sync(&mut g).map_err(|e| fail(format!("sync: {e}")))
}

fn dma_read(edu: &Edu, iova: u64) -> TestResult {
    edu.read_from(iova, 4096).map_err(|_| fail(format!("DMA read from {iova:#x} timed out")))
}

fn dma_write(edu: &Edu, iova: u64) -> TestResult {
    edu.write_to(iova, 4096).map_err(|_| fail(format!("DMA write to {iova:#x} timed out")))
}

/// Runs `body` with `id` attached to `d`, detaching afterwards whatever
/// the outcome.
fn attached<B: Backend>(b: &B, d: &B::Domain, id: u16, body: impl FnOnce() -> TestResult) -> TestResult {
    b.attach(d, id).map_err(fail)?;
    let r = body();
    b.detach(d, id).map_err(fail)?;
    r
}

fn holds_pattern(page: &[u8]) -> bool {
    page.iter().enumerate().all(|(i, &x)| x == Buffers::pattern(i))
}

/// Case 1: A mapped at X (read-only), B at Y: edu copies X to Y; B holds
/// the pattern, guards and A are untouched.
pub fn mapped_dma_lands_exactly<B: Backend>(b: &B, p: &Platform) -> TestResult {
    let (edu, id, bufs, d) = setup(b, p, true)?;
    attached(b, &d, id, || {
        dma_read(&edu, X)?;
        dma_write(&edu, Y)?;
        let bad = bufs.page(2).iter().enumerate().position(|(i, &x)| x != Buffers::pattern(i));
        ensure!(bad.is_none(), "page B differs from the pattern at {:?}", bad);
        bufs.check_untouched()?;
        expect_no_fault(b)
    })
}

/// Case 2: a write to an unmapped IOVA changes nothing, is recorded, and
/// the device works again once the IOVA is mapped.
pub fn unmapped_iova_is_blocked<B: Backend>(b: &B, p: &Platform) -> TestResult {
    let (edu, id, bufs, mut d) = setup(b, p, false)?;
    b.attach(&d, id).map_err(fail)?;
    let r = (|| {
        dma_read(&edu, X)?;
        dma_write(&edu, Z)?;
        ensure!(bufs.page(2).iter().all(|&x| x == CANARY), "page B changed by a blocked DMA");
        bufs.check_untouched()?;
        expect_fault(b, "for the unmapped write", |r| r.source == id && r.address == Z && r.write && r.reason != 0)?;
        expect_no_fault(b)?;
        map(b, &mut d, Z, bufs.b(), 4096, Prot::RW)?;
        dma_write(&edu, Z)?;
        ensure!(holds_pattern(&bufs.page(2)), "DMA after the blocked one did not land");
        Ok(())
    })();
    b.detach(&d, id).map_err(fail)?;
    r
}

/// Case 3: a read-only mapping lets the device read and blocks its write.
pub fn read_only_mapping_blocks_writes<B: Backend>(b: &B, p: &Platform) -> TestResult {
    let (edu, id, bufs, d) = setup(b, p, true)?;
    let want = b.write_denied_reason(&d);
    attached(b, &d, id, || {
        // Fill the edu buffer with B's canary bytes, then try to write them
        // over A through the read-only mapping. (Written before any read
        // through X: QEMU's VT-d checks permissions of a cached IOTLB entry
        // without recording a fault, so the walk must happen on the write.)
        dma_read(&edu, Y)?;
        dma_write(&edu, X)?;
        bufs.check_untouched()?;
        expect_fault(b, "for the write through the read-only mapping", |r| {
            r.source == id && r.address == X && r.write && want.is_none_or(|w| r.reason == w)
        })?;
        // Reading through the same mapping works: A's pattern comes back
        // out through Y into B.
        dma_read(&edu, X)?;
        dma_write(&edu, Y)?;
        ensure!(holds_pattern(&bufs.page(2)), "read through the read-only mapping failed");
        Ok(())
    })
}

/// Case 4: after an unmap the DMA is blocked (no stale IOTLB entry) and
/// the unmap cost one invalidation wait; a remap sends it to the new page.
pub fn unmap_then_remap<B: Backend>(b: &B, p: &Platform) -> TestResult {
    let (edu, id, mut bufs, mut d) = setup(b, p, true)?;
    b.attach(&d, id).map_err(fail)?;
    let r = (|| {
        dma_read(&edu, X)?;
        dma_write(&edu, Y)?;
        bufs.fill(2, |_| 0);
        let waits = b.waits();
        unmap(b, &mut d, Y, 4096)?;
        ensure_eq!(b.waits() - waits, 1, "invalidation waits for one unmap");
        dma_write(&edu, Y)?;
        ensure!(bufs.page(2).iter().all(|&x| x == 0), "a stale IOTLB entry let the write through");
        expect_fault(b, "after unmap", |r| r.source == id && r.address == Y)?;
        // Remap Y to the last guard page: the DMA goes there now.
        map(b, &mut d, Y, bufs.base + 3 * 4096, 4096, Prot::RW)?;
        dma_write(&edu, Y)?;
        ensure!(holds_pattern(&bufs.page(3)), "the remapped page did not get the data");
        ensure!(bufs.page(2).iter().all(|&x| x == 0), "the old page changed after remap");
        Ok(())
    })();
    b.detach(&d, id).map_err(fail)?;
    r
}

/// Case 6a: a device no domain is attached to is blocked.
pub fn unattached_device_is_blocked<B: Backend>(b: &B, p: &Platform) -> TestResult {
    // Any edu but the first (which other cases attach), that `b` sees.
    let Some((other, id)) = edus(p).into_iter().skip(1).find_map(|e| b.device_id(p, &e).ok().map(|id| (e, id))) else {
        skip!("no second edu this unit translates")
    };
    ensure_eq!(b.attached(id), None, "attached before the test");
    b.faults();
    let bufs = Buffers::new()?;
    // Without an IOMMU this DMA would land in B (IOVA = physical address).
    dma_write(&other, bufs.b())?;
    ensure!(bufs.page(2).iter().all(|&x| x == CANARY), "an unattached device wrote memory");
    bufs.check_untouched()?;
    expect_fault(b, "from the unattached device", |r| r.source == id && r.write)
}

/// Case 8: the edu behind the PCIe-to-PCI bridge is known by the bridge's
/// alias; it is blocked until that id is attached, then translated.
pub fn bridge_alias_isolated_and_translated<B: Backend>(b: &B, p: &Platform) -> TestResult {
    let (edu, dev) = edu_behind(p, 7).ok_or_else(|| fail("no edu behind a PCIe-to-PCI bridge".into()))?;
    let id = b.device_id(p, &edu)?;
    ensure_eq!(id, (dev.bdf.bus as u16) << 8, "device id behind the PCIe-to-PCI bridge (secondary bus, 0.0)");
    b.faults();
    let bufs = Buffers::new()?;
    dma_write(&edu, bufs.b())?;
    ensure!(bufs.page(2).iter().all(|&x| x == CANARY), "the bridged edu wrote memory before being attached");
    expect_fault(b, "with the alias", |r| r.source == id)?;
    let mut d = b.new_domain().map_err(fail)?;
    map(b, &mut d, X, bufs.a(), 4096, Prot::READ)?;
    map(b, &mut d, Y, bufs.b(), 4096, Prot::RW)?;
    attached(b, &d, id, || {
        dma_read(&edu, X)?;
        dma_write(&edu, Y)?;
        ensure!(holds_pattern(&bufs.page(2)), "DMA through the alias's entry did not land");
        bufs.check_untouched()
    })
}

/// Case 6b: two devices in different domains cannot reach each other's
/// pages; in the same domain they share it.
pub fn domains_isolate_and_share<B: Backend>(b: &B, p: &Platform) -> TestResult {
    let e0 = first_edu(p)?;
    let id0 = b.device_id(p, &e0)?;
    let (e1, id1) = wide_edu(b, p)?;
    b.faults();
    let mut bufs = Buffers::new()?;
    let mut d1 = b.new_domain().map_err(fail)?;
    let mut d2 = b.new_domain().map_err(fail)?;
    map(b, &mut d1, X, bufs.a(), 4096, Prot::READ)?;
    map(b, &mut d1, Y, bufs.b(), 4096, Prot::RW)?;
    map(b, &mut d2, X, bufs.a(), 4096, Prot::READ)?;
    b.attach(&d1, id0).map_err(fail)?;
    b.attach(&d2, id1).map_err(fail)?;
    let r = (|| {
        dma_read(&e0, X)?;
        dma_read(&e1, X)?;
        // Y exists only in e0's domain.
        dma_write(&e1, Y)?;
        ensure!(bufs.page(2).iter().all(|&x| x == CANARY), "a device reached another domain's page");
        expect_fault(b, "for the other domain's IOVA", |r| r.source == id1 && r.address == Y)?;
        dma_write(&e0, Y)?;
        ensure!(holds_pattern(&bufs.page(2)), "own domain's write missing");
        // Shared: move e1 into e0's domain; now Y reaches B for it too.
        bufs.fill(2, |_| CANARY);
        b.attach(&d1, id1).map_err(fail)?;
        dma_write(&e1, Y)?;
        ensure!(holds_pattern(&bufs.page(2)), "shared domain: write missing");
        bufs.check_untouched()
    })();
    let _ = b.detach(&d1, id0);
    let _ = b.detach(&d1, id1);
    drop(d2);
    r
}

/// Case 5: aligned 2 MiB and 1 GiB maps use large pages (checked with
/// the walk), DMA at offsets inside them lands right, a partial unmap
/// splits and the rest still translates.
pub fn large_pages_are_used_and_split<B: Backend>(b: &B, p: &Platform) -> TestResult {
    let (edu, id) = device(b, p)?;
    let huge = alloc_frames(512, 2 << 20).map_err(|e| fail(format!("{e}")))?;
    let bufs = Buffers::new()?;
    let r = (|| -> TestResult {
        let iova = 0x400_0000;
        let mut d = b.new_domain().map_err(fail)?;
        map(b, &mut d, iova, huge, 2 << 20, Prot::RW)?;
        map(b, &mut d, X, bufs.a(), 4096, Prot::READ)?;
        ensure_eq!(b.page_size(&d, iova + 0x12_3000), Some(2 << 20), "page size of an aligned 2 MiB map");
        b.attach(&d, id).map_err(fail)?;
        dma_read(&edu, X)?;
        dma_write(&edu, iova + 0x12_3000)?;
        let at = |off: u64| {
            let p = phys_to_virt(huge + off);
            // SAFETY: `huge` is 2 MiB of frames allocated above, direct-mapped.
            (0..4096usize).all(|k| unsafe { p.add(k).read_volatile() } == Buffers::pattern(k))
        };
        ensure!(at(0x12_3000), "DMA inside the 2 MiB page did not land at its offset");
        // Unmapping one 4 KiB page in the middle splits the 2 MiB page.
        unmap(b, &mut d, iova + 0x10_0000, 4096)?;
        ensure_eq!(b.page_size(&d, iova + 0x1000), Some(4096), "page size after the split");
        ensure_eq!(b.paging(&mut d).iova_to_phys(iova + 0x1f_f000), Some(huge + 0x1f_f000), "rest of the page");
        dma_write(&edu, iova + 0x1000)?;
        ensure!(at(0x1000), "DMA to the split page's remainder did not land");
        dma_write(&edu, iova + 0x10_0000)?;
        ensure!(!at(0x10_0000), "DMA to the unmapped hole landed");
        expect_fault(b, "for the hole", |r| r.address == iova + 0x10_0000)?;
        unmap(b, &mut d, iova, 0x10_0000)?;
        unmap(b, &mut d, iova + 0x10_1000, 0xf_f000)?;
        unmap(b, &mut d, X, 4096)?;
        // A 1 GiB identity page at IOVA 0 (1 GiB aligned): DMA to the
        // physical address of B lands in B.
        if b.paging(&mut d).page_sizes() & (1 << 30) != 0 {
            map(b, &mut d, 0, 0, 1 << 30, Prot::RW)?;
            ensure_eq!(b.page_size(&d, bufs.b()), Some(1 << 30), "page size of the 1 GiB map");
            dma_write(&edu, bufs.b())?;
            ensure!(holds_pattern(&bufs.page(2)), "DMA through the 1 GiB page did not land");
            unmap(b, &mut d, 0, 1 << 30)?;
        }
        b.detach(&d, id).map_err(fail)?;
        bufs.check_untouched()
    })();
    let _ = free_frames(huge, 512);
    r
}

/// Case 7: IOVAs above 4 GiB up to the last page of the aperture (the
/// edu behind the root port has a 64-bit DMA mask); beyond it a map fails.
pub fn high_iovas_up_to_the_aperture<B: Backend>(b: &B, p: &Platform) -> TestResult {
    let (edu, id) = wide_edu(b, p)?;
    b.faults();
    let mut bufs = Buffers::new()?;
    let mut d = b.new_domain().map_err(fail)?;
    let last = b.paging(&mut d).aperture().last;
    let high = [0x1_2345_6000u64, (last + 1) - 4096];
    map(b, &mut d, X, bufs.a(), 4096, Prot::READ)?;
    for iova in high {
        map(b, &mut d, iova, bufs.b(), 4096, Prot::RW)?;
    }
    ensure!(b.paging(&mut d).map(last + 1, bufs.b(), 4096, Prot::RW).is_err(), "a map beyond the aperture succeeded");
    attached(b, &d, id, || {
        dma_read(&edu, X)?;
        for iova in high {
            bufs.fill(2, |_| CANARY);
            dma_write(&edu, iova)?;
            ensure!(holds_pattern(&bufs.page(2)), "DMA at IOVA {:#x} did not land", iova);
        }
        expect_no_fault(b)?;
        bufs.check_untouched()
    })
}

/// The whole stack: guest memory as iommufd's memory source, an IOAS
/// mapped at IOVA = guest physical address, the edu bound and attached
/// through iommufd onto the driver's domain. DMA to a guest address lands
/// in the right host frame; after the IOAS unmap it is blocked and nothing
/// stays pinned; closing the context blocks the device again.
pub fn iommufd_passthrough_dma<B: Backend>(b: &B, p: &Platform) -> TestResult {
    use iommufd::ctx::Ictx;
    use iommufd::memsrc::{MemorySource, RegionMemory};
    use portcullis_kernel::mem::DirectMap;
    let (edu, id) = device(b, p)?;
    const GPA: u64 = 0x80_0000;
    const PAGES: usize = 16;
    let frames = alloc_frames(PAGES, 4096).map_err(|e| fail(format!("{e}")))?;
    let page = |i: usize| -> Vec<u8> {
        let v = phys_to_virt(frames + i as u64 * 4096);
        // SAFETY: the guest frames were allocated above and are direct-mapped.
        (0..4096).map(|k| unsafe { v.add(k).read_volatile() }).collect()
    };
    for i in 0..PAGES {
        let v = phys_to_virt(frames + i as u64 * 4096);
        for k in 0..4096 {
            let byte = if i == 2 { Buffers::pattern(k) } else { CANARY };
            // SAFETY: as above; no device is attached yet.
            unsafe { v.add(k).write_volatile(byte) };
        }
    }
    let r = (|| -> TestResult {
        let mem = Arc::new(RegionMemory::new(DirectMap));
        mem.add_region(GPA, frames, PAGES as u64 * 4096, true).map_err(|e| fail(format!("{e}")))?;
        let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, 1 << 20);
        let ioas = ictx.ioas_alloc().map_err(|e| fail(format!("{e}")))?;
        let dev = ictx.bind_device(b.device_ops(id)).map_err(|e| fail(format!("{e}")))?;
        ictx.attach(dev, ioas).map_err(|e| fail(format!("attach: {e}")))?;
        let (ranges, _) = ictx.ioas_iova_ranges(ioas).map_err(|e| fail(format!("{e}")))?;
        ensure!(
            !ranges.iter().any(|r| r.start <= 0xfee0_0000 && r.last >= 0xfee0_0000),
            "MSI window not reserved: {:x?}",
            ranges
        );
        let iova = ictx
            .ioas_map(ioas, Some(GPA), GPA, PAGES as u64 * 4096, true, true)
            .map_err(|e| fail(format!("map: {e}")))?;
        ensure_eq!(iova, GPA, "IOVA = guest physical address");
        ensure_eq!(mem.pinned_pages(), PAGES as u64, "guest pages pinned");
        dma_read(&edu, GPA + 2 * 4096)?;
        dma_write(&edu, GPA + 5 * 4096)?;
        ensure!(holds_pattern(&page(5)), "guest page 5 did not get the data");
        for i in (0..PAGES).filter(|&i| i != 2 && i != 5) {
            ensure!(page(i).iter().all(|&x| x == CANARY), "guest page {} changed", i);
        }
        expect_no_fault(b)?;
        ensure_eq!(ictx.ioas_unmap(ioas, GPA, PAGES as u64 * 4096), Ok(PAGES as u64 * 4096), "unmap");
        ensure_eq!(mem.pinned_pages(), 0, "pins after unmap");
        dma_write(&edu, GPA + 7 * 4096)?;
        ensure!(page(7).iter().all(|&x| x == CANARY), "DMA after the unmap landed");
        expect_fault(b, "after unmap", |r| r.source == id && r.address == GPA + 7 * 4096)?;
        drop(ictx);
        ensure!(b.attached(id).is_none(), "the device is blocked again after close");
        Ok(())
    })();
    let _ = free_frames(frames, PAGES);
    r
}

/// Firmware-reserved ranges (VT-d RMRRs, AMD-Vi IVMD unity ranges): the
/// range is identity-mapped in any domain its device attaches to and
/// reserved in the IOAS. QEMU's tables have none, so the test gives the
/// unit one for the edu (a page of our own).
pub fn firmware_ranges_identity_mapped_and_reserved<B: Backend>(b: &B, p: &Platform) -> TestResult {
    use iommufd::ctx::Ictx;
    use iommufd::memsrc::{MemorySource, RegionMemory};
    use portcullis_kernel::mem::DirectMap;
    let (edu, id) = device(b, p)?;
    let mut bufs = Buffers::new()?;
    let range = bufs.b();
    b.set_firmware_range(Some((id, range, range + 0xfff)));
    let r = (|| -> TestResult {
        let guest = alloc_frames(1, 4096).map_err(|e| fail(format!("{e}")))?;
        let mem = Arc::new(RegionMemory::new(DirectMap));
        mem.add_region(0x10_0000, guest, 4096, true).map_err(|e| fail(format!("{e}")))?;
        let ictx = Ictx::new(mem as Arc<dyn MemorySource>, 1024);
        let ioas = ictx.ioas_alloc().map_err(|e| fail(format!("{e}")))?;
        let dev = ictx.bind_device(b.device_ops(id)).map_err(|e| fail(format!("{e}")))?;
        ictx.attach(dev, ioas).map_err(|e| fail(format!("attach: {e}")))?;
        let refused = ictx.ioas_map(ioas, Some(range), 0x10_0000, 4096, true, true);
        ensure_eq!(refused, Err(iommufd::Errno::EINVAL), "mapping over the reserved range");
        // The device reaches the page one-to-one: it reads the page into
        // its buffer, the CPU clears the page, the device writes the buffer
        // back: only an identity mapping restores the pattern.
        bufs.fill(2, Buffers::pattern);
        dma_read(&edu, range)?;
        bufs.fill(2, |_| 0);
        dma_write(&edu, range)?;
        ensure!(holds_pattern(&bufs.page(2)), "DMA to the reserved range did not round-trip");
        expect_no_fault(b)?;
        drop(ictx);
        let _ = free_frames(guest, 1);
        Ok(())
    })();
    b.set_firmware_range(None);
    r
}

/// The embedding API a hypervisor uses (the `portcullis` crate, through
/// the kernel's `Platform`): guest RAM at IOVA = GPA, a device assigned,
/// DMA to guest addresses lands in the right host frames and nowhere else;
/// unassigned or after the memory is removed it is blocked; misuse is
/// refused and changes nothing. Without an IOMMU, assigning is refused
/// (the DMA could not be isolated).
pub fn guest_dma_api_passes_a_device_through(p: &Platform) -> TestResult {
    use portcullis::{Function, GuestAddr, PassthroughError, PhysAddr};
    use portcullis_kernel::host::GuestDma;
    // Below 256 MiB: the first edu has a 28-bit DMA mask.
    const GPA: u64 = 0xa0_0000;
    const PAGES: usize = 16;
    let iommus = iommus(p);
    let edu = first_edu(p)?;
    let dev = edu_device(p, &edu)?;
    let (seg, bdf) = (dev.segment, dev.bdf);
    let function = Function { segment: seg, bdf };
    let frames = alloc_frames(PAGES, 4096).map_err(|e| fail(format!("{e}")))?;
    let page = |i: usize| -> Vec<u8> {
        let v = phys_to_virt(frames + i as u64 * 4096);
        // SAFETY: the guest frames were allocated above and are direct-mapped.
        (0..4096).map(|k| unsafe { v.add(k).read_volatile() }).collect()
    };
    for i in 0..PAGES {
        let v = phys_to_virt(frames + i as u64 * 4096);
        for k in 0..4096 {
            let byte = if i == 2 { Buffers::pattern(k) } else { CANARY };
            // SAFETY: as above; no device is attached yet.
            unsafe { v.add(k).write_volatile(byte) };
        }
    }
    let untouched = |except: &[usize]| -> TestResult {
        for i in (0..PAGES).filter(|i| !except.contains(i)) {
            ensure!(page(i).iter().all(|&x| x == CANARY), "guest page {} changed", i);
        }
        Ok(())
    };
    let r = (|| -> TestResult {
        let err = |e: PassthroughError| fail(format!("{e}"));
        let mut guest = GuestDma::new(iommus, 1 << 20).map_err(err)?;
        guest.add_memory(GuestAddr(GPA), PhysAddr(frames), PAGES as u64 * 4096, true).map_err(err)?;
        let overlap = guest.add_memory(GuestAddr(GPA + 4096), PhysAddr(frames), 4096, true);
        ensure!(overlap.is_err(), "overlapping guest memory accepted");
        ensure!(
            matches!(
                guest.add_memory(GuestAddr(0x123), PhysAddr(frames), 4096, true),
                Err(PassthroughError::BadRange { .. })
            ),
            "misaligned guest memory accepted"
        );
        if iommus.units().is_empty() {
            ensure_eq!(
                guest.assign(iommus, seg, bdf),
                Err(PassthroughError::NotIsolated(function)),
                "assign without IOMMU"
            );
            return Ok(());
        }
        // Without interrupt remapping the device could raise any host
        // interrupt: refused unless the VMM accepts that.
        let isolated = iommus.interrupts_isolated(seg, bdf);
        if !isolated {
            ensure_eq!(guest.assign(iommus, seg, bdf), Err(PassthroughError::UnsafeInterrupts(function)), "assign");
            guest.allow_unsafe_interrupts(true);
        }
        guest.assign(iommus, seg, bdf).map_err(err)?;
        // Pinned once the IOAS has a domain to fill, each page once.
        ensure_eq!(guest.pinned_pages(), PAGES as u64, "guest pages pinned");
        ensure_eq!(guest.assign(iommus, seg, bdf), Err(PassthroughError::AlreadyAssigned(function)), "second assign");
        // (QEMU 10.0.2's AMD-Vi remaps a device's MSIs through its table
        // on `amd` too, not only with `intremap=on`.)
        if isolated {
            msi_through_route(&mut guest, p, &edu, seg, bdf)?;
        }
        dma_read(&edu, GPA + 2 * 4096)?;
        dma_write(&edu, GPA + 5 * 4096)?;
        ensure!(holds_pattern(&page(5)), "guest page 5 did not get the data");
        untouched(&[2, 5])?;
        // Taken back: blocked (bus mastering, which the unassign turned
        // off, on again so the DMA reaches the IOMMU).
        guest.unassign(seg, bdf).map_err(err)?;
        ensure_eq!(guest.unassign(seg, bdf), Err(PassthroughError::NotAssigned(function)), "second unassign");
        let edu = Edu::new(&p.ecam, dev).ok_or_else(|| fail("the edu cannot be taken over again".into()))?;
        dma_write(&edu, GPA + 7 * 4096)?;
        untouched(&[2, 5])?;
        // (QEMU's VT-d has one fault recording register: read it so the
        // next fault is recorded.)
        drain_faults(iommus);
        // Given again, then the memory removed: blocked, nothing pinned.
        guest.assign(iommus, seg, bdf).map_err(err)?;
        guest.remove_memory(GuestAddr(GPA), PAGES as u64 * 4096).map_err(err)?;
        ensure_eq!(guest.pinned_pages(), 0, "pins after removing the memory");
        dma_write(&edu, GPA + 9 * 4096)?;
        untouched(&[2, 5])?;
        if iommus.units().iter().any(|u| u.vendor == Vendor::IntelVtd) {
            let f = guest.dma_faults().faults;
            ensure!(
                f.iter().any(|f| f.function == function && f.address == GPA + 9 * 4096 && f.write),
                "the blocked write is not among the guest's faults: {:x?}",
                f
            );
            // The same stream through an iommufd fault queue: the VMM reads
            // the blocked DMA as a record naming the function's device.
            drain_faults(iommus);
            let (fault, _fd) = guest.ictx().fault_alloc().map_err(|e| fail(format!("fault queue: {e}")))?;
            dma_write(&edu, GPA + 10 * 4096)?;
            untouched(&[2, 5])?;
            let left = guest.forward_dma_faults(fault).map_err(err)?;
            ensure!(left.faults.is_empty(), "faults not forwarded: {:x?}", left.faults);
            let mut rec = [0u8; iommufd::ctx::FAULT_RECORD_SIZE];
            let n = guest.ictx().fault_read(fault, &mut rec).map_err(|e| fail(format!("fault read: {e}")))?;
            ensure_eq!(n, rec.len(), "one record read");
            let r = iommufd::uapi::IommuHwptPgfault::read(&rec);
            let dev = guest.device_id(seg, bdf).ok_or_else(|| fail("no iommufd device id".into()))?;
            ensure_eq!(
                (r.dev_id, r.addr, r.perm),
                (dev, GPA + 10 * 4096, iommufd::uapi::IOMMU_PGFAULT_PERM_WRITE),
                "the forwarded record"
            );
            ensure!(r.flags & iommufd::uapi::PORTCULLIS_PGFAULT_FLAGS_UNRECOVERABLE != 0, "not marked unrecoverable");
        }
        ensure!(guest.remove_memory(GuestAddr(GPA), 4096).is_err(), "removing memory that is not there");
        guest.unassign(seg, bdf).map_err(err)?;
        ensure!(iommus.attached_domain(seg, bdf).is_none(), "the device is still attached after unassign");
        drain_faults(iommus);
        Ok(())
    })();
    let _ = free_frames(frames, PAGES);
    r
}

/// Device lifecycle: `unassign` quiesces a function before its DMA view
/// goes. QEMU's edu is a conventional PCI function with one MSI and
/// neither PCIe FLR nor AF FLR, so the root-bus edu cannot be reset, and
/// the edus alone behind the root port and the PCIe-to-PCI bridge get a
/// secondary bus reset. For each: assigned, DMA and a routed MSI work;
/// unassigned, the reset is the expected one, bus mastering and MSI are
/// off (a reset also clears BAR0); with bus mastering and MSI turned on
/// again by hand a DMA is blocked and no interrupt arrives; assigned
/// again and reprogrammed, DMA lands and the MSI arrives.
pub fn guest_dma_unassign_quiesces_the_device(p: &Platform) -> TestResult {
    use portcullis::Reset;
    let iommus = iommus(p);
    if iommus.units().is_empty() {
        skip!("no IOMMU: nothing can be assigned");
    }
    let first = first_edu(p)?;
    let root = edu_device(p, &first)?;
    ensure!(root.parent.is_none(), "the first edu is not on the root bus");
    let mut cases = alloc::vec![(root, Reset::NotPossible)];
    for port_type in [4, 7] {
        let (_, dev) =
            edu_behind(p, port_type).ok_or_else(|| fail(format!("no edu behind a type {port_type} port")))?;
        let bridge = dev.parent.ok_or_else(|| fail("a bridged edu without parent".into()))?;
        cases.push((dev, Reset::SecondaryBus { bridge }));
    }
    for (dev, reset) in cases {
        lifecycle(p, iommus, dev, reset).map_err(|o| match o {
            Outcome::Fail(why) => fail(format!("{}: {why}", dev.bdf)),
            other => other,
        })?;
    }
    Ok(())
}

/// [`guest_dma_unassign_quiesces_the_device`] for one edu.
fn lifecycle(
    p: &Platform,
    iommus: &Iommus,
    dev: &portcullis_kernel::pci::PciDevice,
    expected: portcullis::Reset,
) -> TestResult {
    use portcullis::{GuestAddr, PassthroughError, PhysAddr, Reset};
    use portcullis_kernel::arch::irq;
    use portcullis_kernel::edu::set_msi;
    use portcullis_kernel::host::GuestDma;
    use portcullis_kernel::pci::ConfigAccess;
    const GPA: u64 = 0xb0_0000;
    const PAGES: usize = 4;
    const VECTOR: u8 = 0x2d;
    let (seg, bdf) = (dev.segment, dev.bdf);
    let msi_cap = dev.msi.ok_or_else(|| fail("the edu has no MSI capability".into()))?.offset as u16;
    // QEMU's AMD-Vi looks a bridged device's DMA up under bus 0 (see
    // `UnitBackend::device_id`): its DMA is checked on VT-d only.
    let amd = iommus.units().iter().any(|u| u.vendor == Vendor::AmdVi);
    let dma = !amd || bdf.bus == 0;
    let isolated = iommus.interrupts_isolated(seg, bdf);
    let msi = isolated;
    let take_over = || Edu::new(&p.ecam, dev).ok_or_else(|| fail("the edu cannot be taken over".into()));
    let frames = alloc_frames(PAGES, 4096).map_err(|e| fail(format!("{e}")))?;
    let page = |i: usize| -> Vec<u8> {
        let v = phys_to_virt(frames + i as u64 * 4096);
        // SAFETY: the guest frames were allocated above and are direct-mapped.
        (0..4096).map(|k| unsafe { v.add(k).read_volatile() }).collect()
    };
    for i in 0..PAGES {
        let v = phys_to_virt(frames + i as u64 * 4096);
        for k in 0..4096 {
            let byte = if i == 0 { Buffers::pattern(k) } else { CANARY };
            // SAFETY: as above; no device is attached yet.
            unsafe { v.add(k).write_volatile(byte) };
        }
    }
    let apic = irq::apic_id().ok_or_else(|| fail("no local APIC".into()))? as u32;
    irq::enable();
    let r = (|| -> TestResult {
        let err = |e: PassthroughError| fail(format!("{e}"));
        let mut guest = GuestDma::new(iommus, 1 << 20).map_err(err)?;
        guest.allow_unsafe_interrupts(!isolated);
        guest.add_memory(GuestAddr(GPA), PhysAddr(frames), PAGES as u64 * 4096, true).map_err(err)?;
        // Assigned: DMA lands, the routed MSI arrives.
        guest.assign(iommus, seg, bdf).map_err(err)?;
        let edu = take_over()?;
        if dma {
            dma_read(&edu, GPA)?;
            dma_write(&edu, GPA + 4096)?;
            ensure!(holds_pattern(&page(1)), "the assigned edu's DMA did not land");
        }
        let mut message = None;
        if msi {
            let m = guest.route_msi(seg, bdf, VECTOR, apic).map_err(err)?;
            set_msi(&p.ecam, dev, Some((m.address, m.data)));
            ensure!(raise_and_wait(&edu, VECTOR, 2000), "the routed MSI did not arrive");
            message = Some((m.address, m.data));
        }
        // Unassigned: quiesced, with the reset the function allows.
        let bar0 = dev.bars.iter().find(|b| b.index == 0).map_or(0, |b| b.base as u32);
        ensure_eq!(guest.unassign(seg, bdf).map_err(err)?, expected, "reset");
        let command = p.ecam.read32(seg, bdf, 4);
        ensure_eq!(command & 0x4, 0, "bus mastering after unassign (command {:#06x})", command & 0xffff);
        ensure_eq!(p.ecam.read32(seg, bdf, msi_cap) >> 16 & 1, 0, "MSI enable after unassign");
        match expected {
            Reset::NotPossible => ensure!(command & 0x400 != 0, "INTx not disabled (command {:#06x})", command),
            _ => ensure!(p.ecam.read32(seg, bdf, 0x10) & !0xf != bar0, "BAR0 survived the reset"),
        }
        // Bus mastering and MSI on again by hand: the DMA is blocked, no
        // interrupt arrives.
        let edu = take_over()?;
        if let Some(m) = message {
            set_msi(&p.ecam, dev, Some(m));
            let before = irq::count(VECTOR);
            ensure!(!raise_and_wait(&edu, VECTOR, 200), "an MSI arrived after unassign");
            ensure_eq!(irq::count(VECTOR), before, "interrupts after unassign");
        }
        if dma {
            dma_write(&edu, GPA + 2 * 4096)?;
            ensure!(page(2).iter().all(|&x| x == CANARY), "a DMA after unassign reached guest memory");
        }
        drain_faults(iommus);
        // Assigned again and reprogrammed: it works.
        guest.assign(iommus, seg, bdf).map_err(err)?;
        if dma {
            dma_write(&edu, GPA + 3 * 4096)?;
            ensure!(holds_pattern(&page(3)), "the DMA did not land after assigning the edu again");
        }
        if msi {
            let m = guest.route_msi(seg, bdf, VECTOR, apic).map_err(err)?;
            set_msi(&p.ecam, dev, Some((m.address, m.data)));
            ensure!(raise_and_wait(&edu, VECTOR, 2000), "the MSI did not arrive after assigning the edu again");
        }
        ensure_eq!(guest.unassign(seg, bdf).map_err(err)?, expected, "reset the second time");
        ensure!(page(0).iter().enumerate().all(|(k, &x)| x == Buffers::pattern(k)), "the source page changed");
        Ok(())
    })();
    irq::disable();
    drain_faults(iommus);
    // Left as enumeration found it, for the cases after this one.
    let _ = Edu::new(&p.ecam, dev);
    set_msi(&p.ecam, dev, None);
    let _ = free_frames(frames, PAGES);
    r
}

/// The assigned edu's MSI, routed through the API, arrives on the vector
/// it names; retargeted, only on the new one; freed, on none; a second
/// route coexists with the first; a new route reuses a freed entry.
fn msi_through_route(
    guest: &mut portcullis_kernel::host::GuestDma,
    p: &Platform,
    edu: &Edu,
    seg: u16,
    bdf: portcullis_kernel::pci::Bdf,
) -> TestResult {
    use portcullis_kernel::arch::irq;
    const VECTOR: u8 = 0x2a;
    const OTHER: u8 = 0x2c;
    let dev = p.pci.iter().find(|d| d.segment == seg && d.bdf == bdf).ok_or_else(|| fail("no such device".into()))?;
    let apic = irq::apic_id().ok_or_else(|| fail("no local APIC".into()))?;
    let err = |e: portcullis::PassthroughError| fail(format!("{e}"));
    let msi = guest.route_msi(seg, bdf, VECTOR, apic).map_err(err)?;
    // A second route of the same function (another MSI-X vector would use
    // it): a different entry.
    let second = guest.route_msi(seg, bdf, OTHER, apic).map_err(err)?;
    ensure!((second.address, second.data) != (msi.address, msi.data), "two routes share an entry");
    ensure!(
        portcullis_kernel::edu::set_msi(&p.ecam, dev, Some((msi.address, msi.data))),
        "the edu has no MSI capability"
    );
    irq::enable();
    let r = (|| -> TestResult {
        let (a0, b0) = (irq::count(VECTOR), irq::count(OTHER));
        ensure!(raise_and_wait(edu, VECTOR, 2000), "the routed MSI did not arrive on vector {:#x}", VECTOR);
        ensure_eq!(irq::count(OTHER), b0, "the MSI also arrived on the other vector");
        // Retargeted: the same address/data now arrive on OTHER only.
        guest.retarget_msi(msi.handle, OTHER, apic).map_err(err)?;
        let a1 = irq::count(VECTOR);
        ensure!(raise_and_wait(edu, OTHER, 2000), "the retargeted MSI did not arrive on vector {:#x}", OTHER);
        ensure_eq!(irq::count(VECTOR), a1, "the old vector arrived after the retarget");
        ensure!(a1 > a0, "counted nothing on the first vector");
        // Freed: nothing arrives, on either vector.
        guest.free_msi(msi.handle).map_err(err)?;
        let (a2, b2) = (irq::count(VECTOR), irq::count(OTHER));
        ensure!(!raise_and_wait(edu, OTHER, 200), "an MSI arrived through a freed route");
        ensure_eq!((irq::count(VECTOR), irq::count(OTHER)), (a2, b2), "an interrupt arrived after the free");
        ensure!(guest.free_msi(msi.handle).is_err(), "a route freed twice");
        // A new route reuses the freed entry.
        let again = guest.route_msi(seg, bdf, VECTOR, apic).map_err(err)?;
        ensure_eq!((again.address, again.data), (msi.address, msi.data), "the freed entry was not reused");
        ensure!(raise_and_wait(edu, VECTOR, 2000), "the MSI did not arrive through the reused entry");
        guest.free_msi(again.handle).map_err(err)?;
        guest.free_msi(second.handle).map_err(err)?;
        Ok(())
    })();
    irq::disable();
    portcullis_kernel::edu::set_msi(&p.ecam, dev, None);
    r
}

/// Reads and drops pending fault records so later cases start clean.
fn drain_faults(iommus: &Iommus) {
    for u in iommus.units() {
        if let Ok(d) = &u.state {
            d.generic().poll_faults();
        }
    }
}

/// Host frames for one owner's memory: `PAGES` frames, page 2 holding the
/// pattern and the rest the canary; freed on drop.
struct Ram {
    base: u64,
}

impl Ram {
    const PAGES: usize = 16;
    fn new() -> Result<Self, Outcome> {
        let base = alloc_frames(Self::PAGES, 4096).map_err(|e| fail(format!("{e}")))?;
        if base + (Self::PAGES as u64) * 4096 > 1 << 28 {
            let _ = free_frames(base, Self::PAGES);
            return Err(fail(format!("frames at {base:#x} beyond the edu's 28-bit DMA mask")));
        }
        for i in 0..Self::PAGES {
            let v = phys_to_virt(base + i as u64 * 4096);
            for k in 0..4096 {
                let byte = if i == 2 { Buffers::pattern(k) } else { CANARY };
                // SAFETY: the frames were allocated above for this test and
                // are direct-mapped; no device is attached yet.
                unsafe { v.add(k).write_volatile(byte) };
            }
        }
        Ok(Self { base })
    }
    fn page(&self, i: usize) -> Vec<u8> {
        let v = phys_to_virt(self.base + i as u64 * 4096);
        // SAFETY: as in `new`; volatile reads of plain RAM are always valid.
        (0..4096).map(|k| unsafe { v.add(k).read_volatile() }).collect()
    }
    /// Every page but `changed` holds what `new` wrote.
    fn untouched_but(&self, changed: &[usize], who: &str) -> TestResult {
        for i in (0..Self::PAGES).filter(|i| !changed.contains(i)) {
            let ok = if i == 2 { holds_pattern(&self.page(i)) } else { self.page(i).iter().all(|&x| x == CANARY) };
            ensure!(ok, "{who}'s page {i} changed");
        }
        Ok(())
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        let _ = free_frames(self.base, Self::PAGES);
    }
}

/// Two guests and the host at once, each with its own root-bus edu (issue
/// 9): every owner's device reaches its own memory only (the guests use
/// the same guest-physical addresses, backed by different frames; bytes
/// checked in all three); a function another owner has is refused, naming
/// the owner; a blocked DMA shows up in its guest's fault stream only; the
/// host's device works translated through a host domain (identity-mapped
/// host RAM) and, where the unit offers it, in pass-through.
pub fn two_guests_and_the_host_share_the_machine(p: &Platform) -> TestResult {
    use portcullis::{Function, GuestAddr, HostUse, Owner, PassthroughError, PhysAddr};
    use portcullis_kernel::host::GuestDma;
    const GPA: u64 = 0xa0_0000;
    const OUTSIDE: u64 = 0x1a0_0000;
    let iommus = iommus(p);
    if iommus.units().is_empty() {
        skip!("no IOMMU: nothing can be isolated");
    }
    let root: Vec<&portcullis_kernel::pci::PciDevice> =
        p.pci.iter().filter(|d| (d.vendor, d.device) == (0x1234, 0x11e8) && d.bdf.bus == 0).collect();
    ensure!(root.len() >= 3, "expected three root-bus edus, found {}", root.len());
    let (da, db, dh) = (root[0], root[2], root[1]);
    let f = |d: &portcullis_kernel::pci::PciDevice| Function { segment: d.segment, bdf: d.bdf };
    let edu = |d| Edu::new(&p.ecam, d).ok_or_else(|| fail("an edu cannot be taken over".into()));
    let (ra, rb, rh) = (Ram::new()?, Ram::new()?, Ram::new()?);
    let err = |e: PassthroughError| fail(format!("{e}"));
    let mut a = GuestDma::new(iommus, 1 << 20).map_err(err)?;
    let mut b = GuestDma::new(iommus, 1 << 20).map_err(err)?;
    let len = Ram::PAGES as u64 * 4096;
    a.add_memory(GuestAddr(GPA), PhysAddr(ra.base), len, true).map_err(err)?;
    b.add_memory(GuestAddr(GPA), PhysAddr(rb.base), len, true).map_err(err)?;
    // (QEMU's AMD-Vi without `intremap=on`, and VT-d without its queue,
    // do not remap interrupts: DMA isolation is what is tested here.)
    a.allow_unsafe_interrupts(true);
    b.allow_unsafe_interrupts(true);
    a.assign(iommus, da.segment, da.bdf).map_err(err)?;
    b.assign(iommus, db.segment, db.bdf).map_err(err)?;
    ensure_eq!(b.assign(iommus, da.segment, da.bdf), Err(PassthroughError::Owned(f(da), a.owner())), "B takes A's");
    ensure_eq!(
        iommus.claim_for_host(da.segment, da.bdf, HostUse::Blocked),
        Err(PassthroughError::Owned(f(da), a.owner())),
        "the host takes A's"
    );
    drain_faults(iommus);
    let (ea, eb) = (edu(da)?, edu(db)?);
    // Each guest's device, the same GPAs: its own frames only.
    dma_read(&ea, GPA + 2 * 4096)?;
    dma_write(&ea, GPA + 5 * 4096)?;
    dma_read(&eb, GPA + 2 * 4096)?;
    dma_write(&eb, GPA + 7 * 4096)?;
    ensure!(holds_pattern(&ra.page(5)), "A's DMA did not land in A's frames");
    ensure!(holds_pattern(&rb.page(7)), "B's DMA did not land in B's frames");
    ra.untouched_but(&[5], "A")?;
    rb.untouched_but(&[7], "B")?;
    rh.untouched_but(&[], "the host")?;
    // A's device outside A's memory: blocked, in A's stream only.
    dma_write(&ea, OUTSIDE)?;
    ra.untouched_but(&[5], "A")?;
    rb.untouched_but(&[7], "B")?;
    if iommus.units().iter().any(|u| u.vendor == Vendor::IntelVtd) {
        let fa = a.dma_faults();
        ensure!(
            fa.faults.iter().any(|x| x.function == f(da) && x.address == OUTSIDE && x.write),
            "A's blocked write is not in A's stream: {:x?}",
            fa
        );
        let fb = b.dma_faults();
        ensure!(fb.faults.is_empty(), "B's stream has faults: {:x?}", fb);
        ensure!(a.dma_faults().faults.is_empty(), "A's fault was read twice");
    }
    // The host's device, translated through a host domain: host RAM at
    // IOVA = its physical address.
    let mut h = GuestDma::new_host(iommus, 1 << 20).map_err(err)?;
    h.add_memory(GuestAddr(rh.base), PhysAddr(rh.base), len, true).map_err(err)?;
    h.allow_unsafe_interrupts(true);
    h.assign(iommus, dh.segment, dh.bdf).map_err(err)?;
    ensure_eq!(iommus.owner_of(dh.segment, dh.bdf), Some(Owner::Host), "owner of the host's device");
    ensure_eq!(
        a.assign(iommus, dh.segment, dh.bdf),
        Err(PassthroughError::Owned(f(dh), Owner::Host)),
        "A takes the host's"
    );
    let eh = edu(dh)?;
    dma_read(&eh, rh.base + 2 * 4096)?;
    dma_write(&eh, rh.base + 9 * 4096)?;
    ensure!(holds_pattern(&rh.page(9)), "the host's DMA did not land");
    rh.untouched_but(&[9], "the host")?;
    ra.untouched_but(&[5], "A")?;
    rb.untouched_but(&[7], "B")?;
    h.unassign(dh.segment, dh.bdf).map_err(err)?;
    drop(h);
    ensure_eq!(iommus.owner_of(dh.segment, dh.bdf), None, "owner after the host's view went");
    // Pass-through, where the unit offers it (VT-d ECAP.PT).
    let vtd_pt = iommus.units().iter().any(|u| u.vendor == Vendor::IntelVtd);
    if vtd_pt {
        iommus.claim_for_host(dh.segment, dh.bdf, HostUse::PassThrough).map_err(err)?;
        let eh = edu(dh)?;
        dma_read(&eh, rh.base + 2 * 4096)?;
        dma_write(&eh, rh.base + 11 * 4096)?;
        ensure!(holds_pattern(&rh.page(11)), "the host's pass-through DMA did not land");
        rh.untouched_but(&[9, 11], "the host")?;
        iommus.release_host(dh.segment, dh.bdf).map_err(err)?;
        ensure!(iommus.attached_domain(dh.segment, dh.bdf).is_none(), "blocked again after release");
    }
    a.unassign(da.segment, da.bdf).map_err(err)?;
    b.unassign(db.segment, db.bdf).map_err(err)?;
    drop(a);
    drop(b);
    ensure_eq!(iommus.owner_of(da.segment, da.bdf), None, "A's device after A went");
    drain_faults(iommus);
    // Later cases take the edus over again.
    for d in [da, db, dh] {
        edu(d)?;
    }
    Ok(())
}

/// Isolation groups follow the topology the IOMMU sees (issue 9): every
/// translated function is in exactly one group; the edu behind the
/// PCIe-to-PCI bridge is grouped under the bridge's alias requester id; a
/// root-bus edu under its own; a group passes from nobody to a guest and
/// back as the guest takes and gives its function.
pub fn isolation_groups_follow_the_topology(p: &Platform) -> TestResult {
    use portcullis::{GuestDma, Owner};
    let iommus = iommus(p);
    if iommus.units().is_empty() {
        skip!("no IOMMU: no groups");
    }
    let mut seen = alloc::collections::BTreeSet::new();
    for g in iommus.groups() {
        for f in &g.functions {
            ensure!(seen.insert(*f), "{f} in two groups");
            ensure_eq!(iommus.group_of(f.segment, f.bdf).map(|x| x.id), Some(g.id), "group of {}", f);
        }
    }
    for (f, a) in iommus.assignments() {
        let g = iommus.group_of(f.segment, f.bdf).ok_or_else(|| fail(format!("{f} has no group")))?;
        ensure!(g.requester_ids.contains(&a.requester_id), "{f}'s requester id {:#x} not in its group", a.requester_id);
    }
    let vtd = iommus.units().iter().any(|u| u.vendor == Vendor::IntelVtd);
    if vtd {
        let (_, bridged) = edu_behind(p, 7).ok_or_else(|| fail("no edu behind a PCIe-to-PCI bridge".into()))?;
        let g = iommus.group_of(bridged.segment, bridged.bdf).ok_or_else(|| fail("bridged edu has no group".into()))?;
        ensure_eq!(g.requester_ids, [(bridged.bdf.bus as u16) << 8], "the bridged edu's group id");
    }
    let root = first_edu(p)?;
    let dev = edu_device(p, &root)?;
    let g = iommus.group_of(dev.segment, dev.bdf).ok_or_else(|| fail("root edu has no group".into()))?;
    ensure_eq!(g.requester_ids, [dev.bdf.requester_id()], "a root-bus edu's group id");
    ensure_eq!(iommus.owner_of(dev.segment, dev.bdf), None, "owner before");
    let mut guest = GuestDma::new(iommus, 1 << 10).map_err(|e| fail(format!("{e}")))?;
    guest.allow_unsafe_interrupts(true);
    guest.assign(iommus, dev.segment, dev.bdf).map_err(|e| fail(format!("{e}")))?;
    ensure_eq!(iommus.owner_of(dev.segment, dev.bdf), Some(guest.owner()), "owner while assigned");
    ensure!(matches!(guest.owner(), Owner::Guest(_)), "a guest's view owned by {:?}", guest.owner());
    guest.unassign(dev.segment, dev.bdf).map_err(|e| fail(format!("{e}")))?;
    ensure_eq!(iommus.owner_of(dev.segment, dev.bdf), None, "owner after");
    drop(guest);
    Edu::new(&p.ecam, dev).ok_or_else(|| fail("the edu cannot be taken over again".into()))?;
    Ok(())
}
