//! In-guest VT-d tests with the edu DMA engine (issue 5): a DMA lands
//! exactly where it is mapped and nowhere else; what is not mapped, not
//! writable, unmapped again or not attached is blocked, changes no byte,
//! and leaves a fault record naming the device and the address.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use portcullis_iommu::{IommuDomain, IotlbGather, Prot};
use portcullis_kernel::edu::Edu;
use portcullis_kernel::iommu::{SharedUnit, VtdDomain, vtd_unit};
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
    let r = UNIT.call_once(|| vtd_unit(format!("DRHD @{base:#x}"), base, true));
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
    if let Some(e) = d.domain.invalidator().error.clone() {
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
        ensure_eq!(hit.map(|r| r.reason), Some(5), "fault reason (write without W permission)");
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
