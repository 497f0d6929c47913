//! PASIDs other than 0 on a scalable-mode unit, over the register model:
//! the entries written for them (decoded here from the memory the unit
//! reads, bit by bit from the spec, without the driver's decoders), the
//! invalidations a replace and a detach run and their order, the
//! requester id's own translation (PASID 0) left alone, and the units and
//! PASIDs that are refused.

use io_pgtable::{ContiguousMemory, HeapTables, TableMemory};
use portcullis_iommu::testing::{DeviceMemory, TickClock};
use portcullis_iommu::unit::{Device, IommuUnit, UnitDomain};
use portcullis_iommu::{DeviceHandle, DeviceOps, DomainError, IommuDomain, IotlbGather, Prot, RequesterRef};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vtd::testing::{Config, ContextInvalidation, Invalidation, IotlbInvalidation, Logged, RegisterModel};
use vtd::{Mode, Stage};

const BASE: u64 = 0xfed9_0000;
/// ECAP.SMTS, SSTS and FSTS: scalable mode with both stages.
const ECAP_SM: u64 = 1 << 43 | 1 << 46 | 1 << 47;
/// ECAP.PASID (bit 40) with PSS (bits 39:35) = `bits - 1`.
const fn ecap_pasid(bits: u64) -> u64 {
    1 << 40 | (bits - 1) << 35
}
/// ECAP.SSADS: second-stage accessed/dirty bits.
const ECAP_SSADS: u64 = 1 << 45;
/// CAP.CM: caching mode.
const CAP_CM: u64 = 1 << 7;
/// 00:01.0.
const RID: u16 = 0x0008;
/// Table pointers (bits 63:12 below the host width).
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Heap tables shared by the driver and the model; every write advances
/// a stamp, and the stamp of the last write to each word is kept.
#[derive(Clone)]
struct Mem {
    tables: Arc<Mutex<HeapTables>>,
    stamp: Arc<AtomicU64>,
    written: Arc<Mutex<BTreeMap<u64, u64>>>,
}

impl Mem {
    fn new() -> Self {
        Self { tables: Arc::new(Mutex::new(HeapTables::new(true))), stamp: Arc::default(), written: Arc::default() }
    }
    /// The stamp of the last write to the word at `phys`.
    fn written_at(&self, phys: u64) -> u64 {
        self.written.lock().unwrap().get(&phys).copied().unwrap_or(0)
    }
    fn word(&self, phys: u64) -> u64 {
        self.read_u64(phys)
    }
}

impl TableMemory for Mem {
    fn alloc_table(&mut self) -> Option<u64> {
        self.tables.lock().unwrap().alloc_table()
    }
    fn free_table(&mut self, t: u64) {
        self.tables.lock().unwrap().free_table(t)
    }
    fn read(&self, t: u64, i: usize) -> u64 {
        self.tables.lock().unwrap().read(t, i)
    }
    fn write(&mut self, t: u64, i: usize, v: u64) {
        let s = self.stamp.fetch_add(1, Ordering::SeqCst) + 1;
        self.written.lock().unwrap().insert(t + i as u64 * 8, s);
        self.tables.lock().unwrap().write(t, i, v)
    }
    fn coherent(&self) -> bool {
        true
    }
    fn flush(&mut self, p: u64, l: u64) {
        self.tables.lock().unwrap().flush(p, l)
    }
}

impl ContiguousMemory for Mem {
    fn alloc_contiguous(&mut self, pages: usize) -> Option<u64> {
        self.tables.lock().unwrap().alloc_contiguous(pages)
    }
    fn free_contiguous(&mut self, base: u64, pages: usize) {
        self.tables.lock().unwrap().free_contiguous(base, pages)
    }
}

impl DeviceMemory for Mem {
    fn read_u64(&self, phys: u64) -> u64 {
        self.read(phys & !0xfff, (phys & 0xfff) as usize / 8)
    }
    fn write_u64(&self, phys: u64, value: u64) {
        self.clone().write(phys & !0xfff, (phys & 0xfff) as usize / 8, value)
    }
    fn stamp(&self) -> u64 {
        self.stamp.load(Ordering::SeqCst)
    }
}

type Unit = vtd::Shared<RegisterModel, Mem, TickClock>;

fn bring_up(cap: u64, ecap: u64, mode: Mode) -> (RegisterModel, Mem, Arc<Unit>) {
    let mem = Mem::new();
    let config = Config { cap: Config::QEMU.cap | cap, ecap: Config::QEMU.ecap | ecap };
    let model = RegisterModel::new(config, Arc::new(mem.clone()));
    let unit = vtd::Shared::bring_up(BASE, model.clone(), mem.clone(), TickClock::default(), Some(mode)).unwrap();
    (model, mem, unit)
}

fn handle() -> DeviceHandle {
    RequesterRef { unit: 0, requester_id: RID }.handle()
}

/// What the unit reads for a request of `rid` tagged with `pasid`,
/// followed from the latched root table (spec 9.2, 9.4, 9.5, 9.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Path {
    /// Context entry word 0.
    context: u64,
    /// Address of the PASID directory entry.
    dir_entry_at: u64,
    /// Address of the PASID-table entry.
    entry_at: u64,
    /// The PASID-table entry.
    entry: [u64; 8],
}

/// `Err(why)` when a level on the way is not present.
fn path(model: &RegisterModel, mem: &Mem, rid: u16, pasid: u32) -> Result<Path, &'static str> {
    let rtaddr = model.root_table().ok_or("no root table latched")?;
    assert_eq!(rtaddr >> 10 & 3, 1, "scalable-mode root table (TTM = 01b)");
    let (bus, devfn) = ((rid >> 8) as u64, (rid & 0xff) as u64);
    let half = mem.word((rtaddr & ADDR) + bus * 16 + if devfn < 128 { 0 } else { 8 });
    if half & 1 == 0 {
        return Err("root entry half not present");
    }
    let ce = (half & ADDR) + (devfn & 0x7f) * 32;
    let context = mem.word(ce);
    if context & 1 == 0 {
        return Err("context entry not present");
    }
    let pdts = context >> 9 & 7;
    if (pasid as u64) >> 6 >= 1 << (pdts + 7) {
        return Err("PASID beyond the directory");
    }
    let dir_entry_at = (context & ADDR) + (pasid as u64 >> 6) * 8;
    let de = mem.word(dir_entry_at);
    if de & 1 == 0 {
        return Err("PASID directory entry not present");
    }
    let entry_at = (de & ADDR) + (pasid as u64 & 0x3f) * 64;
    let entry = std::array::from_fn(|k| mem.word(entry_at + k as u64 * 8));
    Ok(Path { context, dir_entry_at, entry_at, entry })
}

/// A PASID-table entry's fields (spec 9.6), decoded here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fields {
    present: bool,
    pgtt: u64,
    did: u16,
    aw: u64,
    ss_root: u64,
    fs_root: u64,
    fspm: u64,
    sre: bool,
    ssade: bool,
}

fn fields(e: [u64; 8]) -> Fields {
    Fields {
        present: e[0] & 1 != 0,
        pgtt: e[0] >> 6 & 7,
        did: e[1] as u16,
        aw: e[0] >> 2 & 7,
        ss_root: e[0] & ADDR,
        fs_root: e[2] & ADDR,
        fspm: e[2] >> 2 & 3,
        sre: e[2] & 1 != 0,
        ssade: e[0] >> 9 & 1 != 0,
    }
}

/// A second-stage walk of `iova` from the table `root` of `aw + 2`
/// levels: the physical address, when mapped readable.
fn second_stage(mem: &Mem, root: u64, aw: u64, iova: u64) -> Option<u64> {
    let mut table = root;
    for level in (0..aw as u32 + 2).rev() {
        let shift = 12 + 9 * level;
        let e = mem.word(table + (iova >> shift & 511) * 8);
        if e & 3 == 0 {
            return None;
        }
        if level == 0 || e >> 7 & 1 != 0 {
            return Some((e & ADDR & !((1 << shift) - 1)) | iova & ((1 << shift) - 1));
        }
        table = e & ADDR;
    }
    None
}

/// The invalidations logged, waits left out.
fn invalidations(log: &[Logged]) -> Vec<Invalidation> {
    log.iter().map(|l| l.what).filter(|w| !matches!(w, Invalidation::Wait { .. })).collect()
}

/// Every invalidation was followed by a wait (the last entry is one).
fn ends_with_wait(log: &[Logged]) -> bool {
    matches!(log.last().map(|l| l.what), Some(Invalidation::Wait { status: Some(_) }))
}

#[test]
fn two_pasids_on_two_domains_replaced_and_detached_beside_the_rid() {
    let (model, mem, unit) = bring_up(0, ECAP_SM | ecap_pasid(20), Mode::Scalable);
    let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
    assert_eq!(dev.max_pasid_log2(), 15, "20-bit PSS, bounded by the one-page PASID directory");

    // The requester id's own translation: domain 0, IOVA 1 MiB -> 1 GiB.
    let mut d0 = dev.new_domain().unwrap();
    d0.map(0x10_0000, 0x4000_0000, 0x1000, Prot::RW).unwrap();
    d0.attach_device(handle()).unwrap();
    let rid_before = path(&model, &mem, RID, 0).unwrap();
    let rid = fields(rid_before.entry);
    assert_eq!(second_stage(&mem, rid.ss_root, rid.aw, 0x10_0234), Some(0x4000_0234));

    // Second-stage domain 1 at PASID 5, first-stage domain 2 at 0x1234.
    let mut d1 = dev.new_domain().unwrap();
    d1.map(0x10_0000, 0x5000_0000, 0x1000, Prot::RW).unwrap();
    let mut d2 = unit.new_domain_in(Stage::First).unwrap();
    d2.map(0x10_0000, 0x6000_0000, 0x1000, Prot::RW).unwrap();
    model.take_log();
    d1.attach_device_pasid(handle(), 5).unwrap();
    d2.attach_device_pasid(handle(), 0x1234).unwrap();
    assert_eq!(invalidations(&model.take_log()), [], "not present to present needs nothing without caching mode");

    let p5 = path(&model, &mem, RID, 5).unwrap();
    let f5 = fields(p5.entry);
    let t1 = d1.table_info();
    assert_eq!(
        f5,
        Fields {
            present: true,
            pgtt: 2,
            did: d1.domain_id(),
            aw: t1.levels as u64 - 2,
            ss_root: t1.root,
            fs_root: 0,
            fspm: 0,
            sre: false,
            ssade: false
        },
        "PASID 5: second stage through domain 1"
    );
    assert_eq!(p5.entry[2..], [0; 6]);
    assert_eq!(second_stage(&mem, f5.ss_root, f5.aw, 0x10_0010), Some(0x5000_0010));
    let p = path(&model, &mem, RID, 0x1234).unwrap();
    let f = fields(p.entry);
    let t2 = d2.table_info();
    assert_eq!((f.present, f.pgtt, f.did), (true, 1, d2.domain_id()), "PASID 0x1234: first stage, domain 2");
    assert_eq!((f.fs_root, f.fspm, t2.levels), (t2.root, 0, 4), "4-level first-stage table");
    assert!(!f.sre, "supervisor requests stay off");
    assert_eq!(p.entry[3..], [0; 5]);
    assert_ne!(p.entry_at & !0xfff, p5.entry_at & !0xfff, "PASIDs 5 and 0x1234 sit in different PASID tables");
    assert_eq!(p.dir_entry_at - (p5.dir_entry_at & !0xfff), 0x48 * 8, "directory entry 0x1234 >> 6");
    assert_eq!(p5.entry_at & 0xfff, 5 * 64);
    assert_eq!(p.entry_at & 0xfff, 0x34 * 64);
    assert_ne!(p5.context >> 3 & 1, 0, "PASIDE: requests with PASID are looked up");
    assert_eq!(path(&model, &mem, RID, 0).unwrap(), rid_before, "the requester id's entry is untouched");
    assert_eq!(unit.attached_domain(RID), Some(d0.domain_id()));

    // A first-stage domain at a PASID is invalidated under that PASID.
    let mut g = IotlbGather::default();
    assert_eq!(d2.unmap(0x10_0000, 0x1000, &mut g), 0x1000);
    d2.iotlb_sync(&mut g).unwrap();
    let log = invalidations(&model.take_log());
    for pasid in [0, 0x1234] {
        assert!(
            log.iter().any(|i| i.covers_pasid_iotlb(d2.domain_id(), pasid, 0x10_0000, false)),
            "unmap: PASID {pasid:#x} of domain 2 invalidated: {log:?}"
        );
    }

    // Replace: PASID 5 moves from domain 1 to domain 2, through not
    // present: PASID cache and IOTLB of the old entry, after the clear.
    d2.attach_device_pasid(handle(), 5).unwrap();
    let log = model.take_log();
    assert_eq!(
        invalidations(&log),
        [
            Invalidation::PasidCache { g: 1, did: d1.domain_id(), pasid: 5 },
            Invalidation::Iotlb(IotlbInvalidation::Domain(d1.domain_id())),
        ]
    );
    assert!(ends_with_wait(&log));
    let p5 = path(&model, &mem, RID, 5).unwrap();
    assert!(mem.written_at(p5.entry_at) > log[0].stamp, "the new entry was written after the invalidation");
    let f5 = fields(p5.entry);
    assert_eq!((f5.present, f5.pgtt, f5.did, f5.fs_root), (true, 1, d2.domain_id(), t2.root));
    assert_eq!(fields(path(&model, &mem, RID, 0x1234).unwrap().entry).did, d2.domain_id(), "0x1234 kept");
    assert_eq!(path(&model, &mem, RID, 0).unwrap(), rid_before);

    // Detach from a domain the PASID does not use: refused, nothing done.
    assert_eq!(d1.detach_device_pasid(handle(), 5), Err(DomainError::Incompatible));
    assert_eq!(model.take_log(), []);
    assert!(fields(path(&model, &mem, RID, 5).unwrap().entry).present);

    // Detach 0x1234: cleared (present bit first), PASID cache, PASID-based
    // IOTLB; its table is then empty, unlinked, and freed after a global
    // PASID-cache invalidation.
    let leaf = unit.lock().pasid_table(RID, 0x1234).unwrap();
    let at = p.entry_at;
    d2.detach_device_pasid(handle(), 0x1234).unwrap();
    let log = model.take_log();
    assert_eq!(
        invalidations(&log),
        [
            Invalidation::PasidCache { g: 1, did: d2.domain_id(), pasid: 0x1234 },
            Invalidation::PasidIotlb { did: d2.domain_id(), pasid: 0x1234, pages: None },
            Invalidation::PasidCache { g: 3, did: 0, pasid: 0 },
        ]
    );
    assert!(mem.written_at(at) < log[0].stamp, "the entry was cleared before the invalidation");
    assert!(mem.written_at(at) < mem.written_at(at + 8), "present bit (word 0) cleared first");
    assert!(mem.written_at(p.dir_entry_at) < log[3].stamp, "directory entry cleared before the global flush");
    assert_eq!(mem.word(p.dir_entry_at), 0);
    assert_eq!(path(&model, &mem, RID, 0x1234), Err("PASID directory entry not present"));
    assert_eq!(unit.lock().pasid_table(RID, 0x1234), None);
    assert!(!mem.tables.lock().unwrap().is_live(leaf), "the empty PASID table was freed");

    // Detach 5: the first table stays (PASID 0 lives there).
    d2.detach_device_pasid(handle(), 5).unwrap();
    let log = model.take_log();
    assert_eq!(
        invalidations(&log),
        [
            Invalidation::PasidCache { g: 1, did: d2.domain_id(), pasid: 5 },
            Invalidation::PasidIotlb { did: d2.domain_id(), pasid: 5, pages: None },
        ]
    );
    assert_eq!(path(&model, &mem, RID, 5).unwrap().entry, [0; 8]);
    assert_eq!(d2.detach_device_pasid(handle(), 5), Err(DomainError::Incompatible), "not attached any more");

    // The requester id translated through domain 0 all along.
    let now = path(&model, &mem, RID, 0).unwrap();
    assert_eq!(now, rid_before);
    assert_eq!(second_stage(&mem, fields(now.entry).ss_root, fields(now.entry).aw, 0x10_0234), Some(0x4000_0234));
    d0.detach_device(handle()).unwrap();
    assert!(!fields(path(&model, &mem, RID, 0).unwrap().entry).present);
}

#[test]
fn a_pasid_on_a_device_never_attached_leaves_its_rid_blocked() {
    // Caching mode: making entries present needs invalidations too.
    let (model, mem, unit) = bring_up(CAP_CM, ECAP_SM | ecap_pasid(20), Mode::Scalable);
    let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
    let mut d = dev.new_domain().unwrap();
    model.take_log();
    d.attach_device_pasid(handle(), 0x41).unwrap();
    let did = d.domain_id();
    let log = model.take_log();
    assert_eq!(
        invalidations(&log),
        [
            Invalidation::Context(ContextInvalidation::Global),
            Invalidation::PasidCache { g: 1, did, pasid: 0x41 },
            Invalidation::Iotlb(IotlbInvalidation::Domain(did)),
        ]
    );
    let p = path(&model, &mem, RID, 0x41).unwrap();
    assert!(log[0].stamp >= mem.written_at(p.entry_at), "invalidated after the entry was written");
    assert_eq!(fields(p.entry).did, did);
    let rid = path(&model, &mem, RID, 0).unwrap();
    assert_eq!(rid.entry, [0; 8], "requests without PASID stay blocked (PASID-0 entry not present)");
    assert_eq!(unit.attached_domain(RID), None);
    // Attaching the requester id afterwards fills PASID 0 of the same tables.
    d.attach_device(handle()).unwrap();
    assert_eq!(fields(path(&model, &mem, RID, 0).unwrap().entry).did, did);
    assert_eq!(path(&model, &mem, RID, 0x41).unwrap(), p);
    d.detach_device_pasid(handle(), 0x41).unwrap();
    d.detach_device(handle()).unwrap();
}

#[test]
fn pasids_beyond_the_width_and_units_without_pasids_are_refused() {
    // PSS = 3: 4-bit PASIDs.
    let (model, mem, unit) = bring_up(0, ECAP_SM | ecap_pasid(4), Mode::Scalable);
    let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
    assert_eq!(dev.max_pasid_log2(), 4);
    let mut d = dev.new_domain().unwrap();
    model.take_log();
    for pasid in [0, 16, 0x1234, u32::MAX] {
        assert_eq!(d.attach_device_pasid(handle(), pasid), Err(DomainError::Incompatible), "PASID {pasid:#x}");
    }
    let mut raw = unit.new_domain_in(Stage::Second).unwrap();
    assert_eq!(raw.attach_device_pasid(handle(), 16), Err(DomainError::Incompatible), "the driver checks too");
    assert!(matches!(
        raw.attach_pasid(RID, 16),
        Err(e) if matches!(e.cause, vtd::HwError::Invalid(_))
    ));
    assert_eq!(model.take_log(), []);
    assert_eq!(path(&model, &mem, RID, 15), Err("root entry half not present"), "nothing written");
    d.attach_device_pasid(handle(), 15).unwrap();
    assert!(fields(path(&model, &mem, RID, 15).unwrap().entry).present);
    d.detach_device_pasid(handle(), 15).unwrap();

    // 20 bits in ECAP: still below 2^15 (one-page directory).
    let (_, _, unit) = bring_up(0, ECAP_SM | ecap_pasid(20), Mode::Scalable);
    let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
    let mut d = dev.new_domain().unwrap();
    assert_eq!(d.attach_device_pasid(handle(), 1 << 15), Err(DomainError::Incompatible));
    d.attach_device_pasid(handle(), (1 << 15) - 1).unwrap();
    d.detach_device_pasid(handle(), (1 << 15) - 1).unwrap();

    // Scalable without ECAP.PASID, and legacy mode (even with ECAP.PASID):
    // no PASIDs.
    for (ecap, mode) in [
        (ECAP_SM, Mode::Scalable),
        (ECAP_SM | ecap_pasid(20), Mode::Legacy { queued: true }),
        (ECAP_SM | ecap_pasid(20), Mode::Legacy { queued: false }),
    ] {
        let (model, _, unit) = bring_up(0, ecap, mode);
        assert_eq!(unit.max_pasid_log2(RID), 0, "{mode:?}");
        let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
        assert_eq!(dev.max_pasid_log2(), 0);
        let mut d = dev.new_domain().unwrap();
        model.take_log();
        assert_eq!(d.attach_device_pasid(handle(), 1), Err(DomainError::NotSupported), "{mode:?}");
        assert_eq!(d.detach_device_pasid(handle(), 1), Err(DomainError::NotSupported));
        let mut raw = unit.new_domain_in(Stage::Second).unwrap();
        assert_eq!(raw.attach_device_pasid(handle(), 1), Err(DomainError::NotSupported), "{mode:?}");
        assert_eq!(model.take_log(), []);
    }
}

#[test]
fn a_dirty_tracking_domain_at_a_pasid_sets_ssade_there_too() {
    let (model, mem, unit) = bring_up(0, ECAP_SM | ECAP_SSADS | ecap_pasid(20), Mode::Scalable);
    let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
    let mut d = dev.alloc_dirty_domain().unwrap();
    d.attach_device_pasid(handle(), 7).unwrap();
    let ssade = || fields(path(&model, &mem, RID, 7).unwrap().entry).ssade;
    assert!(!ssade());
    model.take_log();
    d.set_dirty_tracking(true).unwrap();
    assert!(ssade(), "turned on in place");
    let log = invalidations(&model.take_log());
    assert!(log.iter().any(|i| matches!(i, Invalidation::PasidCache { g: 1, pasid: 7, .. })), "{log:?}");
    // Attached while tracking: SSADE from the start.
    d.attach_device_pasid(handle(), 8).unwrap();
    assert!(fields(path(&model, &mem, RID, 8).unwrap().entry).ssade);
    d.set_dirty_tracking(false).unwrap();
    assert!(!ssade() && !fields(path(&model, &mem, RID, 8).unwrap().entry).ssade);
    d.detach_device_pasid(handle(), 7).unwrap();
    d.detach_device_pasid(handle(), 8).unwrap();
}

#[test]
fn a_failed_invalidation_is_reported_and_frees_nothing() {
    let (model, mem, unit) = bring_up(0, ECAP_SM | ecap_pasid(20), Mode::Scalable);
    let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
    let mut d1 = dev.new_domain().unwrap();
    let mut d2 = dev.new_domain().unwrap();
    d1.attach_device_pasid(handle(), 0x1234).unwrap();
    let leaf = unit.lock().pasid_table(RID, 0x1234).unwrap();
    model.state().queue_error = true;
    // A replace whose invalidation of the old entry fails: reported; the
    // PASID is left blocked (the old entry cleared, not the new one
    // written) and its table kept.
    let e = d2.attach_device_pasid(handle(), 0x1234).unwrap_err();
    assert!(matches!(e, DomainError::Hardware { cause: vtd::HwError::QueueError { .. }, .. }), "{e:?}");
    assert!(!fields(path(&model, &mem, RID, 0x1234).unwrap().entry).present);
    assert_eq!(unit.lock().pasid_table(RID, 0x1234), Some(leaf));
    model.state().queue_error = false;
    d2.attach_device_pasid(handle(), 0x1234).unwrap();
    // A detach whose invalidation fails: reported, the table stays linked
    // and allocated (the unit may still hold entries read from it).
    model.state().queue_error = true;
    let e = d2.detach_device_pasid(handle(), 0x1234).unwrap_err();
    assert!(matches!(e, DomainError::Hardware { cause: vtd::HwError::QueueError { .. }, .. }), "{e:?}");
    assert_eq!(unit.lock().pasid_table(RID, 0x1234), Some(leaf));
    assert!(mem.tables.lock().unwrap().is_live(leaf));
    assert_eq!(path(&model, &mem, RID, 0x1234).map(|p| p.entry_at & !0xfff), Ok(leaf), "still linked");
}

/// A domain dropped while still attached (its owner never detached): the
/// requester id and the PASID are blocked first, then everything under
/// the domain id is invalidated, and only then are the id reused and the
/// tables freed.
#[test]
fn a_domain_dropped_while_attached_blocks_its_requester_and_pasid_first() {
    let (model, mem, unit) = bring_up(0, ECAP_SM | ecap_pasid(20), Mode::Scalable);
    let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
    let mut d = dev.new_domain().unwrap();
    d.map(0x10_0000, 0x4000_0000, 0x1000, Prot::RW).unwrap();
    d.attach_device(handle()).unwrap();
    d.attach_device_pasid(handle(), 5).unwrap();
    let (did, root) = (d.domain_id(), d.table_info().root);
    assert!(fields(path(&model, &mem, RID, 5).unwrap().entry).present);
    model.take_log();
    drop(d);
    assert!(!fields(path(&model, &mem, RID, 0).unwrap().entry).present, "the requester id is blocked");
    assert!(!path(&model, &mem, RID, 5).is_ok_and(|p| fields(p.entry).present), "PASID 5 is blocked");
    let log = model.take_log();
    let inv = invalidations(&log);
    assert_eq!(inv.last(), Some(&Invalidation::Iotlb(IotlbInvalidation::Domain(did))), "{inv:?}");
    assert!(inv.len() > 1, "the entries' own invalidations come first: {inv:?}");
    assert!(ends_with_wait(&log));
    assert!(!mem.tables.lock().unwrap().is_live(root), "the page table is freed");
    assert_eq!(dev.new_domain().unwrap().domain_id(), did, "the id is reused");
}

/// The same when the unit cannot confirm the detach: the entries' owner
/// is told nothing (a drop cannot fail), so the domain keeps its id and
/// its tables for good rather than let a device walk reused memory.
#[test]
fn a_domain_dropped_while_attached_keeps_id_and_tables_when_the_unit_fails() {
    let (model, mem, unit) = bring_up(0, ECAP_SM | ecap_pasid(20), Mode::Scalable);
    let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
    let mut d = dev.new_domain().unwrap();
    d.map(0x10_0000, 0x4000_0000, 0x1000, Prot::RW).unwrap();
    d.attach_device_pasid(handle(), 5).unwrap();
    let (did, root) = (d.domain_id(), d.table_info().root);
    let live = mem.tables.lock().unwrap().live_tables();
    model.state().queue_error = true;
    drop(d);
    model.state().queue_error = false;
    assert!(mem.tables.lock().unwrap().is_live(root), "the page table stays allocated");
    assert_eq!(mem.tables.lock().unwrap().live_tables(), live, "nothing freed");
    assert_ne!(dev.new_domain().unwrap().domain_id(), did, "the id is not reused");
}

/// Legacy mode: a domain dropped while a requester's context entry still
/// names it clears that entry (context-cache invalidation) first.
#[test]
fn a_legacy_domain_dropped_while_attached_clears_the_context_entry_first() {
    let (model, mem, unit) = bring_up(0, 0, Mode::Legacy { queued: true });
    let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
    let mut d = dev.new_domain().unwrap();
    d.map(0x10_0000, 0x4000_0000, 0x1000, Prot::RW).unwrap();
    d.attach_device(handle()).unwrap();
    let (did, root) = (d.domain_id(), d.table_info().root);
    assert!(unit.lock().context_entry(RID).present());
    model.take_log();
    drop(d);
    assert!(!unit.lock().context_entry(RID).present(), "the context entry is cleared");
    let inv = invalidations(&model.take_log());
    assert!(matches!(inv.first(), Some(Invalidation::Context(_))), "{inv:?}");
    assert_eq!(inv.last(), Some(&Invalidation::Iotlb(IotlbInvalidation::Domain(did))), "{inv:?}");
    assert!(!mem.tables.lock().unwrap().is_live(root));
    assert_eq!(dev.new_domain().unwrap().domain_id(), did);
}

/// Pass-through entries share one domain id, taken once: passing
/// requesters through and blocking them again uses no more ids, and a
/// pass-through whose invalidation failed leaves its id out of the free
/// list (its entry may be live).
#[test]
fn pass_through_uses_one_domain_id_that_is_never_reused() {
    for mode in [Mode::Legacy { queued: true }, Mode::Scalable] {
        let (model, _mem, unit) = bring_up(0, ECAP_SM | ecap_pasid(20), mode);
        let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
        let first = dev.new_domain().unwrap().domain_id();
        unit.pass_through(RID).unwrap();
        let pt = unit.lock().pass_through_did().unwrap();
        unit.pass_through(RID + 1).unwrap();
        unit.block(RID).unwrap();
        unit.block(RID + 1).unwrap();
        unit.pass_through(RID).unwrap();
        if mode != Mode::Scalable {
            assert_eq!(unit.lock().context_entry(RID).did(), pt, "{mode:?}");
        }
        // Legacy mode flushes every new context entry; scalable mode only
        // what caching mode needs (none here), so there it succeeds.
        model.state().queue_error = true;
        assert_eq!(unit.pass_through(RID + 2).is_err(), mode != Mode::Scalable, "{mode:?}");
        model.state().queue_error = false;
        let ids: Vec<u16> = (0..3).map(|_| unit.lock().alloc_did().unwrap()).collect();
        assert!(!ids.contains(&pt), "{mode:?}: {ids:?} against {pt}");
        // The dropped domain's id went to pass-through; the rest follow
        // it, none taken by the passes and blocks in between.
        assert_eq!(pt, first, "{mode:?}");
        assert_eq!(ids, [pt + 1, pt + 2, pt + 3], "{mode:?}: nothing leaked");
    }
}

/// Scalable-mode bring-up drops everything an earlier owner left cached:
/// context cache, PASID cache and IOTLB, all global, in that order.
#[test]
fn scalable_bring_up_invalidates_every_cache_globally() {
    let (model, _mem, _unit) = bring_up(0, ECAP_SM | ecap_pasid(20), Mode::Scalable);
    let inv = invalidations(&model.take_log());
    let first: Vec<_> = inv.iter().take(3).collect();
    assert!(matches!(first[0], Invalidation::Context(ContextInvalidation::Global)), "{inv:?}");
    assert!(matches!(first[1], Invalidation::PasidCache { g: 3, .. }), "{inv:?}");
    assert_eq!(first[2], &Invalidation::Iotlb(IotlbInvalidation::Global), "{inv:?}");
}

/// Legacy mode: a live context entry is cleared present bit first (the
/// low word before the high one that holds the domain id), so the unit
/// never walks a present entry with domain id 0.
#[test]
fn a_legacy_context_entry_is_cleared_present_bit_first() {
    let (model, mem, unit) = bring_up(0, 0, Mode::Legacy { queued: true });
    let dev = Device::new(unit.clone(), RequesterRef { unit: 0, requester_id: RID });
    let mut d = dev.new_domain().unwrap();
    d.attach_device(handle()).unwrap();
    let root_entry = model.state().rtaddr + u64::from(RID >> 8) * 16;
    let entry = (mem.word(root_entry) & !0xfff) + u64::from(RID & 0xff) * 16;
    d.detach_device(handle()).unwrap();
    assert_eq!((mem.word(entry), mem.word(entry + 8)), (0, 0));
    assert!(mem.written_at(entry) < mem.written_at(entry + 8), "low (present) word first");
}

/// An invalidation longer than the 128-slot scalable queue (a domain at
/// ten PASIDs, a range of about twenty page-selective blocks each) goes
/// in chunks that each wait for room: as many descriptors reach the unit
/// for each PASID, and one wait ends it all.
#[test]
fn an_invalidation_longer_than_the_queue_goes_in_chunks() {
    let (model, _, unit) = bring_up(0, ECAP_SM | ecap_pasid(20), Mode::Scalable);
    let mut d = unit.new_domain_in(Stage::First).unwrap();
    let (first, last) = (0x1000u64, (1u64 << 32) - 1);
    d.map(first, 0x4000_0000, 0x1000, Prot::RW).unwrap();
    d.map(last - 0xfff, 0x4000_1000, 0x1000, Prot::RW).unwrap();
    for pasid in 1..=9 {
        d.attach_device_pasid(handle(), pasid).unwrap();
    }
    model.take_log();
    let mut g = IotlbGather::default();
    assert_eq!(d.unmap(first, last + 1 - first, &mut g), 0x2000);
    d.iotlb_sync(&mut g).unwrap();
    let log = model.take_log();
    let inv = invalidations(&log);
    assert!(inv.len() > 127, "longer than the ring: {} descriptors", inv.len());
    // PASID 0 (always invalidated for a first-stage domain) and the nine.
    assert_eq!(inv.len() % 10, 0, "the same blocks for each PASID");
    assert_eq!(log.iter().filter(|l| matches!(l.what, Invalidation::Wait { .. })).count(), 1);
    assert!(ends_with_wait(&log));
    let s = model.state();
    assert_eq!(s.iqh, s.iqt, "the unit ran everything");
}
