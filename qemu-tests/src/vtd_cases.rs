//! In-guest VT-d tests with the edu DMA engine (issue 5): a DMA lands
//! exactly where it is mapped and nowhere else; what is not mapped, not
//! writable, unmapped again or not attached is blocked, changes no byte,
//! and leaves a fault record naming the device and the address.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use portcullis_iommu::{IommuDomain, IotlbGather, Prot};
use portcullis_kernel::edu::Edu;
use portcullis_kernel::iommu::{SharedUnit, Stage, UnitMode, VtdDomain, vtd_unit_in};
use portcullis_kernel::ktest::{Outcome, TestResult};
use portcullis_kernel::mem::{alloc_frames, free_frames, phys_to_virt};
use portcullis_kernel::{Platform, ensure, ensure_eq, skip};

const X: u64 = 0x100_0000;
const Y: u64 = 0x200_0000;
const Z: u64 = 0x300_0000;
const CANARY: u8 = 0xcc;

fn fail(s: String) -> Outcome {
    Outcome::Fail(s)
}

static UNIT: spin::Once<Result<SharedUnit, String>> = spin::Once::new();

/// The VT-d unit covering the edu devices, brought up once per boot.
fn unit(p: &Platform) -> Result<&'static SharedUnit, Outcome> {
    if !p.config.starts_with("intel") {
        skip!("needs an Intel IOMMU configuration");
    }
    let Some(Ok(dmar)) = &p.dmar else { return Err(fail("no parsed DMAR".into())) };
    let base = dmar.drhds().next().ok_or_else(|| fail("no DRHD".into()))?.register_base;
    // `intel-rb`: the same hardware as `intel`, driven without the
    // invalidation queue (register-based invalidation).
    let mode = (p.config == "intel-rb").then_some(UnitMode::Legacy { queued: false });
    let r = UNIT.call_once(|| vtd_unit_in(format!("DRHD @{base:#x}"), base, mode));
    r.as_ref().map_err(|e| fail(format!("bring-up: {e}")))
}

fn edus(p: &Platform) -> Vec<Edu> {
    p.pci.iter().filter_map(|d| Edu::new(&p.ecam, d)).collect()
}

/// Four frames: guard, A, B, guard; guards and B filled with the canary,
/// A with a pattern.
struct Buffers {
    base: u64,
}

impl Buffers {
    fn new() -> Result<Self, Outcome> {
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
    fn a(&self) -> u64 {
        self.base + 4096
    }
    fn b(&self) -> u64 {
        self.base + 2 * 4096
    }
    /// A copy of page `i`, read with volatile loads (devices write these
    /// frames behind the compiler's back).
    fn page(&self, i: usize) -> Vec<u8> {
        let p = phys_to_virt(self.base + i as u64 * 4096);
        // SAFETY: the frames were allocated for this test alone and are
        // direct-mapped; volatile reads of plain RAM are always valid.
        (0..4096).map(|k| unsafe { p.add(k).read_volatile() }).collect()
    }
    /// Fills page `i` with `f(offset)`.
    fn fill(&mut self, i: usize, f: impl Fn(usize) -> u8) {
        let p = phys_to_virt(self.base + i as u64 * 4096);
        for k in 0..4096 {
            // SAFETY: as for `page`; no device is writing while the test
            // prepares its buffers.
            unsafe { p.add(k).write_volatile(f(k)) }
        }
    }
    fn pattern(i: usize) -> u8 {
        (i * 7 + 3) as u8
    }
    /// Guards hold the canary; A holds the pattern.
    fn check_untouched(&self) -> TestResult {
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

fn sync(d: &mut VtdDomain, iova: u64, len: u64) -> Result<(), Outcome> {
    let mut g = IotlbGather::default();
    let n = d.domain.unmap(iova, len, &mut g);
    ensure_eq!(n, len, "bytes unmapped at {iova:#x}");
    d.domain.iotlb_sync(&mut g);
    if let Some(e) = d.domain.invalidator_error() {
        return Err(fail(e));
    }
    Ok(())
}

fn faults(u: &SharedUnit) -> Vec<vtd::FaultRecord> {
    u.lock().poll_faults()
}

pub fn vtd_mapped_dma_lands_exactly(p: &Platform) -> TestResult {
    let u = unit(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    faults(u);
    let bufs = Buffers::new()?;
    let mut d = VtdDomain::new(u).map_err(fail)?;
    d.domain.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("map X: {e}")))?;
    d.domain.map(Y, bufs.b(), 4096, Prot::RW).map_err(|e| fail(format!("map Y: {e}")))?;
    d.attach(edu.sid).map_err(fail)?;
    let r = (|| -> TestResult {
        edu.read_from(X, 4096).map_err(|_| fail("DMA read timed out".into()))?;
        edu.write_to(Y, 4096).map_err(|_| fail("DMA write timed out".into()))?;
        let bad = bufs.page(2).iter().enumerate().position(|(i, &x)| x != Buffers::pattern(i));
        ensure!(bad.is_none(), "page B differs from the pattern at {:?}", bad);
        bufs.check_untouched()?;
        let f = faults(u);
        ensure!(f.is_empty(), "unexpected faults: {:?}", f);
        Ok(())
    })();
    d.detach(edu.sid).map_err(fail)?;
    r
}

pub fn vtd_unmapped_iova_is_blocked_and_faults(p: &Platform) -> TestResult {
    let u = unit(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    faults(u);
    let bufs = Buffers::new()?;
    let mut d = VtdDomain::new(u).map_err(fail)?;
    d.domain.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("{e}")))?;
    d.attach(edu.sid).map_err(fail)?;
    let r = (|| -> TestResult {
        edu.read_from(X, 4096).map_err(|_| fail("DMA read timed out".into()))?;
        edu.write_to(Z, 4096).map_err(|_| fail("blocked DMA write timed out".into()))?;
        ensure!(bufs.page(2).iter().all(|&x| x == CANARY), "page B changed by a blocked DMA");
        bufs.check_untouched()?;
        let f = faults(u);
        let hit = f.iter().find(|r| r.source_id == edu.sid && r.address == Z && r.write);
        ensure!(hit.is_some(), "no write fault for {:#x} from the edu: {:?}", Z, f);
        let reason = hit.map(|r| r.reason).unwrap_or(0);
        ensure!(reason != 0, "fault without a reason");
        ensure!(faults(u).is_empty(), "fault not cleared");
        // The device works again: map Z to B and write.
        d.domain.map(Z, bufs.b(), 4096, Prot::RW).map_err(|e| fail(format!("{e}")))?;
        edu.write_to(Z, 4096).map_err(|_| fail("DMA after the fault timed out".into()))?;
        let bad = bufs.page(2).iter().enumerate().position(|(i, &x)| x != Buffers::pattern(i));
        ensure!(bad.is_none(), "DMA after the fault did not land (offset {:?})", bad);
        Ok(())
    })();
    d.detach(edu.sid).map_err(fail)?;
    r
}

/// The fault event interrupt (the option beside polling): a blocked DMA
/// raises the MSI on the programmed vector; reading the records re-arms it
/// for the next fault; masked, the unit sets FECTL.IP instead, and reading
/// the records clears that too.
pub fn vtd_fault_event_interrupt(p: &Platform) -> TestResult {
    use portcullis_kernel::arch::irq;
    use portcullis_kernel::iommu::{disable_fault_interrupt, enable_fault_interrupt, fault_events};
    const VECTOR: u8 = 0x28;
    let u = unit(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    faults(u);
    let bufs = Buffers::new()?;
    let mut d = VtdDomain::new(u).map_err(fail)?;
    d.domain.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("{e}")))?;
    d.attach(edu.sid).map_err(fail)?;
    enable_fault_interrupt(u, VECTOR).map_err(fail)?;
    let wait_event = |after: u64| {
        let deadline = portcullis_kernel::time::uptime_ns() + 2_000_000_000;
        while fault_events() == after && portcullis_kernel::time::uptime_ns() < deadline {
            core::hint::spin_loop();
        }
        fault_events()
    };
    irq::enable();
    let r = (|| -> TestResult {
        edu.read_from(X, 4096).map_err(|_| fail("DMA read timed out".into()))?;
        for round in 0..2 {
            let before = fault_events();
            let on_vector = irq::count(VECTOR);
            edu.write_to(Z, 4096).map_err(|_| fail("blocked DMA write timed out".into()))?;
            let after = wait_event(before);
            ensure!(after > before, "round {round}: no fault event interrupt within 2 s");
            ensure!(irq::count(VECTOR) > on_vector, "round {round}: the interrupt came on another vector");
            let f = faults(u);
            ensure!(
                f.iter().any(|r| r.source_id == edu.sid && r.address == Z && r.write),
                "round {round}: no fault record for the blocked write: {:?}",
                f
            );
        }
        bufs.check_untouched()?;
        ensure!(bufs.page(2).iter().all(|&x| x == CANARY), "page B changed by a blocked DMA");
        // Masked: no interrupt, FECTL.IP set until the records are read.
        disable_fault_interrupt(u);
        let before = fault_events();
        edu.write_to(Z, 4096).map_err(|_| fail("blocked DMA write timed out".into()))?;
        ensure_eq!(u.lock().fault_event_state(), (true, true), "FECTL (IM, IP) after a masked fault");
        ensure_eq!(fault_events(), before, "an interrupt arrived while masked");
        ensure!(!faults(u).is_empty(), "no fault record while masked");
        ensure_eq!(u.lock().fault_event_state(), (true, false), "FECTL (IM, IP) after reading the records");
        Ok(())
    })();
    irq::disable();
    disable_fault_interrupt(u);
    d.detach(edu.sid).map_err(fail)?;
    r
}

pub fn vtd_read_only_mapping_blocks_writes(p: &Platform) -> TestResult {
    let u = unit(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    faults(u);
    let bufs = Buffers::new()?;
    let mut d = VtdDomain::new(u).map_err(fail)?;
    d.domain.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("{e}")))?;
    d.domain.map(Y, bufs.b(), 4096, Prot::RW).map_err(|e| fail(format!("{e}")))?;
    d.attach(edu.sid).map_err(fail)?;
    let r = (|| -> TestResult {
        // Fill the edu buffer with B's canary bytes, then try to write them
        // over A through the read-only mapping. (Written before any read
        // through X: QEMU checks permissions of a cached IOTLB entry without
        // recording a fault, so the walk must happen on the write.)
        edu.read_from(Y, 4096).map_err(|_| fail("DMA read timed out".into()))?;
        edu.write_to(X, 4096).map_err(|_| fail("blocked DMA write timed out".into()))?;
        bufs.check_untouched()?;
        let f = faults(u);
        let hit = f.iter().find(|r| r.source_id == edu.sid && r.address == X && r.write);
        ensure!(hit.is_some(), "no write fault at {:#x}: {:?}", X, f);
        // A second-stage walk reports reason 5 (QEMU does so in scalable
        // mode too); a first-stage walk reports the scalable-mode code 0x85.
        let want = match d.domain.stage() {
            Stage::Second => vtd::fault::WRITE,
            Stage::First => vtd::fault::SM_WRITE,
        };
        ensure_eq!(hit.map(|r| r.reason), Some(want), "fault reason (write without W permission)");
        // Reading through the same mapping works: A's pattern comes back
        // out through Y into B.
        edu.read_from(X, 4096).map_err(|_| fail("DMA read timed out".into()))?;
        edu.write_to(Y, 4096).map_err(|_| fail("DMA write timed out".into()))?;
        let bad = bufs.page(2).iter().enumerate().position(|(i, &x)| x != Buffers::pattern(i));
        ensure!(bad.is_none(), "read through the read-only mapping failed (offset {:?})", bad);
        Ok(())
    })();
    d.detach(edu.sid).map_err(fail)?;
    r
}

pub fn vtd_unmap_then_remap(p: &Platform) -> TestResult {
    let u = unit(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    faults(u);
    let mut bufs = Buffers::new()?;
    let mut d = VtdDomain::new(u).map_err(fail)?;
    d.domain.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("{e}")))?;
    d.domain.map(Y, bufs.b(), 4096, Prot::RW).map_err(|e| fail(format!("{e}")))?;
    d.attach(edu.sid).map_err(fail)?;
    let r = (|| -> TestResult {
        edu.read_from(X, 4096).map_err(|_| fail("DMA read timed out".into()))?;
        edu.write_to(Y, 4096).map_err(|_| fail("DMA write timed out".into()))?;
        bufs.fill(2, |_| 0);
        let waits_before = u.lock().stats.waits;
        sync(&mut d, Y, 4096)?;
        ensure_eq!(u.lock().stats.waits - waits_before, 1, "invalidation waits for one unmap");
        edu.write_to(Y, 4096).map_err(|_| fail("blocked DMA write timed out".into()))?;
        ensure!(bufs.page(2).iter().all(|&x| x == 0), "a stale IOTLB entry let the write through");
        let f = faults(u);
        ensure!(f.iter().any(|r| r.source_id == edu.sid && r.address == Y), "no fault after unmap: {:?}", f);
        // Remap Y to the last guard page: the DMA goes there now.
        d.domain.map(Y, bufs.base + 3 * 4096, 4096, Prot::RW).map_err(|e| fail(format!("{e}")))?;
        edu.write_to(Y, 4096).map_err(|_| fail("DMA write timed out".into()))?;
        let bad = bufs.page(3).iter().enumerate().position(|(i, &x)| x != Buffers::pattern(i));
        ensure!(bad.is_none(), "the remapped page did not get the data (offset {:?})", bad);
        ensure!(bufs.page(2).iter().all(|&x| x == 0), "the old page changed after remap");
        Ok(())
    })();
    d.detach(edu.sid).map_err(fail)?;
    r
}

/// The unit runs in the mode its configuration offers (scalable when
/// ECAP.SMTS), domains get the stage the unit translates with, and an
/// attach programs exactly the entry that stage needs: a legacy context
/// entry, or a PASID-0 entry with the right PGTT, table root and depth.
pub fn vtd_unit_mode_and_stage_match_configuration(p: &Platform) -> TestResult {
    let u = unit(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    let (want_scalable, want_stage) = match p.config.as_str() {
        "intel-sm" => (true, Stage::Second),
        "intel-fs" => (true, Stage::First),
        _ => (false, Stage::Second),
    };
    ensure_eq!(u.lock().is_scalable(), want_scalable, "unit in scalable mode");
    ensure_eq!(u.lock().queued(), p.config != "intel-rb", "queued invalidation on");
    let d = VtdDomain::new(u).map_err(fail)?;
    ensure_eq!(d.domain.stage(), want_stage, "domain stage");
    d.attach(edu.sid).map_err(fail)?;
    let r = (|| -> TestResult {
        let unit = u.lock();
        ensure_eq!(unit.attached_domain(edu.sid), Some(d.did), "attached domain id");
        if want_scalable {
            use vtd::scalable::Pgtt;
            let e = unit.scalable_entry(edu.sid).ok_or_else(|| fail("no scalable-mode entries".into()))?;
            ensure!(e.pasid.present(), "PASID-0 entry not present");
            match want_stage {
                Stage::Second => {
                    ensure_eq!(e.pasid.pgtt(), Some(Pgtt::SecondStage), "PGTT");
                    ensure_eq!(e.pasid.ss_root(), d.domain.root(), "second-stage table root");
                    ensure_eq!(e.pasid.ss_levels(), d.domain.levels(), "second-stage depth");
                }
                Stage::First => {
                    ensure_eq!(e.pasid.pgtt(), Some(Pgtt::FirstStage), "PGTT");
                    ensure_eq!(e.pasid.fs_root(), d.domain.root(), "first-stage table root");
                    ensure_eq!(e.pasid.fs_levels(), 4, "first-stage depth");
                    ensure!(!e.pasid.sre(), "supervisor requests enabled");
                }
            }
        } else {
            let c = unit.context_entry(edu.sid);
            ensure!(c.present(), "context entry not present");
            ensure_eq!(c.did(), d.did, "context entry domain id");
            ensure_eq!(c.root(), d.domain.root(), "second-stage table root");
        }
        Ok(())
    })();
    d.detach(edu.sid).map_err(fail)?;
    ensure_eq!(u.lock().attached_domain(edu.sid), None, "attached after detach");
    r
}

pub fn vtd_unattached_device_is_blocked(p: &Platform) -> TestResult {
    let u = unit(p)?;
    let edus = edus(p);
    let Some(other) = edus.iter().find(|e| e.sid >> 8 != 0) else { skip!("no edu behind a bridge") };
    faults(u);
    let bufs = Buffers::new()?;
    // Without an IOMMU this DMA would land in B (IOVA = physical address).
    other.write_to(bufs.b(), 4096).map_err(|_| fail("blocked DMA write timed out".into()))?;
    ensure!(bufs.page(2).iter().all(|&x| x == CANARY), "an unattached device wrote memory");
    bufs.check_untouched()?;
    let f = faults(u);
    ensure!(f.iter().any(|r| r.source_id == other.sid && r.write), "no fault from {:#x}: {:?}", other.sid, f);
    Ok(())
}

/// The edu behind the root port (64-bit DMA mask) and the one behind the
/// PCIe-to-PCI bridge, by their parents' port types.
fn edu_behind(p: &Platform, port_type: u8) -> Option<(Edu, &portcullis_kernel::pci::PciDevice)> {
    let dev = p.pci.iter().find(|d| {
        (d.vendor, d.device) == (0x1234, 0x11e8)
            && d.parent.and_then(|b| p.pci.iter().find(|x| x.bdf == b)).and_then(|x| x.pcie).map(|x| x.port_type)
                == Some(port_type)
    })?;
    Some((Edu::new(&p.ecam, dev)?, dev))
}

fn ownership(
    p: &Platform,
) -> Result<
    alloc::collections::BTreeMap<(u16, portcullis_kernel::pci::Bdf), portcullis_kernel::ownership::Assignment>,
    Outcome,
> {
    let Some(Ok(dmar)) = &p.dmar else { return Err(fail("no parsed DMAR".into())) };
    let (units, errors) = portcullis_kernel::ownership::unit_scopes(dmar, &p.ecam);
    ensure!(errors.is_empty(), "unresolved scopes: {:?}", errors);
    Ok(portcullis_kernel::ownership::assign(&units, &p.pci))
}

pub fn vtd_ownership_matches_pci_and_dmar(p: &Platform) -> TestResult {
    unit(p)?;
    let owners = ownership(p)?;
    for d in &p.pci {
        let a = owners.get(&(d.segment, d.bdf));
        ensure!(a.is_some(), "{} {:04x}:{:04x} has no unit", d.bdf, d.vendor, d.device);
    }
    let (_, bridged) = edu_behind(p, 7).ok_or_else(|| fail("no edu behind a PCIe-to-PCI bridge".into()))?;
    let a = owners[&(bridged.segment, bridged.bdf)];
    ensure_eq!(
        a.requester_id,
        (bridged.bdf.bus as u16) << 8,
        "requester id behind the PCIe-to-PCI bridge (secondary bus, 0.0)"
    );
    let (_, rooted) = edu_behind(p, 4).ok_or_else(|| fail("no edu behind a root port".into()))?;
    ensure_eq!(owners[&(rooted.segment, rooted.bdf)].requester_id, rooted.bdf.rid(), "a root port does not alias");
    Ok(())
}

pub fn vtd_bridge_alias_isolated_and_translated(p: &Platform) -> TestResult {
    let u = unit(p)?;
    let owners = ownership(p)?;
    let (edu, dev) = edu_behind(p, 7).ok_or_else(|| fail("no edu behind a PCIe-to-PCI bridge".into()))?;
    let rid = owners[&(dev.segment, dev.bdf)].requester_id;
    faults(u);
    let bufs = Buffers::new()?;
    // Not attached yet: blocked, and the fault names the alias.
    edu.write_to(bufs.b(), 4096).map_err(|_| fail("DMA timed out".into()))?;
    ensure!(bufs.page(2).iter().all(|&x| x == CANARY), "the bridged edu wrote memory before being attached");
    let f = faults(u);
    ensure!(f.iter().any(|r| r.source_id == rid), "no fault with the alias {:#x}: {:?}", rid, f);
    let mut d = VtdDomain::new(u).map_err(fail)?;
    d.domain.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("{e}")))?;
    d.domain.map(Y, bufs.b(), 4096, Prot::RW).map_err(|e| fail(format!("{e}")))?;
    d.attach(rid).map_err(fail)?;
    let r = (|| -> TestResult {
        edu.read_from(X, 4096).map_err(|_| fail("DMA timed out".into()))?;
        edu.write_to(Y, 4096).map_err(|_| fail("DMA timed out".into()))?;
        let bad = bufs.page(2).iter().enumerate().position(|(i, &x)| x != Buffers::pattern(i));
        ensure!(bad.is_none(), "DMA through the alias's context entry did not land (offset {:?})", bad);
        bufs.check_untouched()
    })();
    d.detach(rid).map_err(fail)?;
    r
}

pub fn vtd_domains_isolate_and_share(p: &Platform) -> TestResult {
    let u = unit(p)?;
    let edus = edus(p);
    let e0 = edus.first().ok_or_else(|| fail("no edu".into()))?;
    let (e1, _) = edu_behind(p, 4).ok_or_else(|| fail("no second edu".into()))?;
    faults(u);
    let mut bufs = Buffers::new()?;
    let mut d1 = VtdDomain::new(u).map_err(fail)?;
    let mut d2 = VtdDomain::new(u).map_err(fail)?;
    d1.domain.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("{e}")))?;
    d1.domain.map(Y, bufs.b(), 4096, Prot::RW).map_err(|e| fail(format!("{e}")))?;
    d2.domain.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("{e}")))?;
    d1.attach(e0.sid).map_err(fail)?;
    d2.attach(e1.sid).map_err(fail)?;
    let r = (|| -> TestResult {
        e0.read_from(X, 4096).map_err(|_| fail("DMA timed out".into()))?;
        e1.read_from(X, 4096).map_err(|_| fail("DMA timed out".into()))?;
        // Y exists only in e0's domain.
        e1.write_to(Y, 4096).map_err(|_| fail("DMA timed out".into()))?;
        ensure!(bufs.page(2).iter().all(|&x| x == CANARY), "a device reached another domain's page");
        let f = faults(u);
        ensure!(
            f.iter().any(|r| r.source_id == e1.sid && r.address == Y),
            "no fault for the other domain's IOVA: {:?}",
            f
        );
        e0.write_to(Y, 4096).map_err(|_| fail("DMA timed out".into()))?;
        ensure!(bufs.page(2).iter().enumerate().all(|(i, &x)| x == Buffers::pattern(i)), "own domain's write missing");
        // Shared: move e1 into e0's domain; now Y reaches B for it too.
        bufs.fill(2, |_| CANARY);
        d1.attach(e1.sid).map_err(fail)?;
        e1.write_to(Y, 4096).map_err(|_| fail("DMA timed out".into()))?;
        ensure!(
            bufs.page(2).iter().enumerate().all(|(i, &x)| x == Buffers::pattern(i)),
            "shared domain: write missing"
        );
        bufs.check_untouched()
    })();
    let _ = d1.detach(e0.sid);
    let _ = d1.detach(e1.sid);
    let _ = &mut d2;
    r
}

pub fn vtd_large_pages_are_used_and_split(p: &Platform) -> TestResult {
    let u = unit(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    faults(u);
    let huge = alloc_frames(512, 2 << 20).map_err(|e| fail(format!("{e}")))?;
    let bufs = Buffers::new()?;
    let r = (|| -> TestResult {
        let iova = 0x400_0000;
        let mut d = VtdDomain::new(u).map_err(fail)?;
        d.domain.map(iova, huge, 2 << 20, Prot::RW).map_err(|e| fail(format!("{e}")))?;
        d.domain.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("{e}")))?;
        ensure_eq!(d.domain.page_size(iova + 0x12_3000), Some(2 << 20), "page size of an aligned 2 MiB map");
        d.attach(edu.sid).map_err(fail)?;
        edu.read_from(X, 4096).map_err(|_| fail("DMA timed out".into()))?;
        edu.write_to(iova + 0x12_3000, 4096).map_err(|_| fail("DMA timed out".into()))?;
        let at = |off: u64| {
            let p = phys_to_virt(huge + off);
            // SAFETY: `huge` is 2 MiB of frames allocated above, direct-mapped.
            (0..4096usize).all(|k| unsafe { p.add(k).read_volatile() } == Buffers::pattern(k))
        };
        ensure!(at(0x12_3000), "DMA inside the 2 MiB page did not land at its offset");
        // Unmapping one 4 KiB page in the middle splits the 2 MiB page.
        sync(&mut d, iova + 0x10_0000, 4096)?;
        ensure_eq!(d.domain.page_size(iova + 0x1000), Some(4096), "page size after the split");
        ensure_eq!(d.domain.iova_to_phys(iova + 0x1f_f000), Some(huge + 0x1f_f000), "rest of the page");
        edu.write_to(iova + 0x1000, 4096).map_err(|_| fail("DMA timed out".into()))?;
        ensure!(at(0x1000), "DMA to the split page's remainder did not land");
        edu.write_to(iova + 0x10_0000, 4096).map_err(|_| fail("DMA timed out".into()))?;
        ensure!(!at(0x10_0000), "DMA to the unmapped hole landed");
        let f = faults(u);
        ensure!(f.iter().any(|r| r.address == iova + 0x10_0000), "no fault for the hole: {:?}", f);
        sync(&mut d, iova, 0x10_0000)?;
        sync(&mut d, iova + 0x10_1000, 0xf_f000)?;
        sync(&mut d, X, 4096)?;
        // A 1 GiB identity page at IOVA 0 (1 GiB aligned): DMA to the
        // physical address of B lands in B.
        if d.domain.page_sizes() & (1 << 30) != 0 {
            d.domain.map(0, 0, 1 << 30, Prot::RW).map_err(|e| fail(format!("1 GiB map: {e}")))?;
            ensure_eq!(d.domain.page_size(bufs.b()), Some(1 << 30), "page size of the 1 GiB map");
            edu.write_to(bufs.b(), 4096).map_err(|_| fail("DMA timed out".into()))?;
            let ok = bufs.page(2).iter().enumerate().all(|(i, &x)| x == Buffers::pattern(i));
            ensure!(ok, "DMA through the 1 GiB page did not land");
            sync(&mut d, 0, 1 << 30)?;
        }
        d.detach(edu.sid).map_err(fail)?;
        bufs.check_untouched()
    })();
    let _ = free_frames(huge, 512);
    r
}

pub fn vtd_high_iovas_up_to_the_aperture(p: &Platform) -> TestResult {
    let u = unit(p)?;
    let (edu, _) = edu_behind(p, 4).ok_or_else(|| fail("no 64-bit edu".into()))?;
    faults(u);
    let mut bufs = Buffers::new()?;
    let mut d = VtdDomain::new(u).map_err(fail)?;
    let (_, last) = d.domain.aperture();
    let high = [0x1_2345_6000u64, (last + 1) - 4096];
    d.domain.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("{e}")))?;
    for iova in high {
        d.domain.map(iova, bufs.b(), 4096, Prot::RW).map_err(|e| fail(format!("map {iova:#x}: {e}")))?;
    }
    ensure!(d.domain.map(last + 1, bufs.b(), 4096, Prot::RW).is_err(), "a map beyond the aperture succeeded");
    d.attach(edu.sid).map_err(fail)?;
    let r = (|| -> TestResult {
        edu.read_from(X, 4096).map_err(|_| fail("DMA timed out".into()))?;
        for iova in high {
            bufs.fill(2, |_| CANARY);
            edu.write_to(iova, 4096).map_err(|_| fail("DMA timed out".into()))?;
            let ok = bufs.page(2).iter().enumerate().all(|(i, &x)| x == Buffers::pattern(i));
            ensure!(ok, "DMA at IOVA {:#x} did not land", iova);
        }
        let f = faults(u);
        ensure!(f.is_empty(), "faults: {:?}", f);
        bufs.check_untouched()
    })();
    d.detach(edu.sid).map_err(fail)?;
    r
}

/// The whole stack: guest memory as iommufd's memory source, an IOAS
/// mapped at IOVA = guest physical address, the edu bound and attached
/// through iommufd onto a VT-d domain. DMA to a guest address lands in the
/// right host frame; after the IOAS unmap it is blocked and nothing stays
/// pinned.
pub fn vtd_iommufd_passthrough_dma(p: &Platform) -> TestResult {
    use alloc::sync::Arc;
    use iommufd::ctx::Ictx;
    use iommufd::memsrc::{MemorySource, RegionMemory};
    use portcullis_kernel::iommu::VtdDevice;
    use portcullis_kernel::mem::DirectMap;
    let u = unit(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    faults(u);
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
            let b = if i == 2 { Buffers::pattern(k) } else { CANARY };
            // SAFETY: as above; no device is attached yet.
            unsafe { v.add(k).write_volatile(b) };
        }
    }
    let r = (|| -> TestResult {
        let mem = Arc::new(RegionMemory::new(DirectMap));
        mem.add_region(GPA, frames, PAGES as u64 * 4096, true).map_err(|e| fail(format!("{e}")))?;
        let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, 1 << 20);
        let ioas = ictx.ioas_alloc().map_err(|e| fail(format!("{e}")))?;
        let dev =
            ictx.bind_device(Arc::new(VtdDevice::new(u.clone(), 0, edu.sid))).map_err(|e| fail(format!("{e}")))?;
        ictx.attach(dev, ioas).map_err(|e| fail(format!("attach: {e}")))?;
        let (ranges, _) = ictx.ioas_iova_ranges(ioas).map_err(|e| fail(format!("{e}")))?;
        ensure!(
            !ranges.iter().any(|&(s, l)| s <= 0xfee0_0000 && l >= 0xfee0_0000),
            "MSI window not reserved: {:x?}",
            ranges
        );
        let iova = ictx
            .ioas_map(ioas, Some(GPA), GPA, PAGES as u64 * 4096, true, true)
            .map_err(|e| fail(format!("map: {e}")))?;
        ensure_eq!(iova, GPA, "IOVA = guest physical address");
        ensure_eq!(mem.pinned_pages(), PAGES as u64, "guest pages pinned");
        edu.read_from(GPA + 2 * 4096, 4096).map_err(|_| fail("DMA timed out".into()))?;
        edu.write_to(GPA + 5 * 4096, 4096).map_err(|_| fail("DMA timed out".into()))?;
        ensure!(
            page(5).iter().enumerate().all(|(k, &x)| x == Buffers::pattern(k)),
            "guest page 5 did not get the data"
        );
        for i in (0..PAGES).filter(|&i| i != 2 && i != 5) {
            ensure!(page(i).iter().all(|&x| x == CANARY), "guest page {} changed", i);
        }
        ensure!(faults(u).is_empty(), "unexpected faults");
        ensure_eq!(ictx.ioas_unmap(ioas, GPA, PAGES as u64 * 4096), Ok(PAGES as u64 * 4096), "unmap");
        ensure_eq!(mem.pinned_pages(), 0, "pins after unmap");
        edu.write_to(GPA + 7 * 4096, 4096).map_err(|_| fail("DMA timed out".into()))?;
        ensure!(page(7).iter().all(|&x| x == CANARY), "DMA after the unmap landed");
        let f = faults(u);
        ensure!(
            f.iter().any(|r| r.source_id == edu.sid && r.address == GPA + 7 * 4096),
            "no fault after unmap: {:?}",
            f
        );
        drop(ictx);
        ensure!(u.lock().attached_domain(edu.sid).is_none(), "the device is blocked again after close");
        Ok(())
    })();
    let _ = free_frames(frames, PAGES);
    r
}

/// RMRRs: a device's reserved memory range is identity-mapped in any
/// domain it attaches to and reserved in the IOAS. QEMU's DMAR has no
/// RMRR, so the test gives the unit one for the edu (a page of our own).
pub fn vtd_rmrr_identity_mapped_and_reserved(p: &Platform) -> TestResult {
    use alloc::sync::Arc;
    use iommufd::ctx::Ictx;
    use iommufd::memsrc::{MemorySource, RegionMemory};
    use portcullis_kernel::iommu::VtdDevice;
    use portcullis_kernel::mem::DirectMap;
    let u = unit(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    faults(u);
    let mut bufs = Buffers::new()?;
    let rmrr = bufs.b();
    u.lock().set_rmrrs(alloc::vec![(edu.sid, rmrr, rmrr + 0xfff)]);
    let r = (|| -> TestResult {
        let guest = alloc_frames(1, 4096).map_err(|e| fail(format!("{e}")))?;
        let mem = Arc::new(RegionMemory::new(DirectMap));
        mem.add_region(0x10_0000, guest, 4096, true).map_err(|e| fail(format!("{e}")))?;
        let ictx = Ictx::new(mem as Arc<dyn MemorySource>, 1024);
        let ioas = ictx.ioas_alloc().map_err(|e| fail(format!("{e}")))?;
        let dev =
            ictx.bind_device(Arc::new(VtdDevice::new(u.clone(), 0, edu.sid))).map_err(|e| fail(format!("{e}")))?;
        ictx.attach(dev, ioas).map_err(|e| fail(format!("attach: {e}")))?;
        let refused = ictx.ioas_map(ioas, Some(rmrr), 0x10_0000, 4096, true, true);
        ensure_eq!(refused, Err(iommufd::Errno::EINVAL), "mapping over the RMRR");
        // The device reaches the RMRR page one-to-one: it reads the page
        // into its buffer, the CPU clears the page, the device writes the
        // buffer back: only an identity mapping restores the pattern.
        bufs.fill(2, Buffers::pattern);
        edu.read_from(rmrr, 4096).map_err(|_| fail("DMA timed out".into()))?;
        bufs.fill(2, |_| 0);
        edu.write_to(rmrr, 4096).map_err(|_| fail("DMA timed out".into()))?;
        ensure!(bufs.page(2).iter().enumerate().all(|(k, &x)| x == Buffers::pattern(k)), "RMRR DMA did not round-trip");
        ensure!(faults(u).is_empty(), "faults on the RMRR");
        drop(ictx);
        let _ = free_frames(guest, 1);
        Ok(())
    })();
    u.lock().set_rmrrs(Vec::new());
    r
}
