//! The unit driver against a register-level model of a VT-d unit (the
//! behaviours QEMU-NOTES lists: GCMD acting on the difference from GSTS,
//! self-clearing CCMD.ICC / IOTLB.IVT, a queue processed on IQT writes with
//! wait descriptors writing their status, fault recording registers with
//! RW1C F bits).

use io_pgtable::TableMemory;
use portcullis_iommu::testing::{DeviceMemory, TickClock};
use std::sync::Arc;
use vtd::regs::{Fsts, Gsts};
use vtd::testing::{Config, ContextInvalidation, Invalidation, IotlbInvalidation, RegisterModel, Via};
use vtd::{Error, FaultRecord, HwError, Unit};

/// Heap tables shared by the driver and the model.
type Shared = vtd::testing::ModelTables;

/// The kinds (descriptor types: 1 context, 2 IOTLB, 4 IEC, 5 wait) of the
/// queued invalidations logged.
fn kinds(log: &[vtd::testing::Logged]) -> Vec<u8> {
    log.iter()
        .filter(|l| l.via == Via::Queue)
        .map(|l| match l.what {
            Invalidation::Context(_) => 1,
            Invalidation::Iotlb(_) => 2,
            Invalidation::InterruptEntries(_) => 4,
            Invalidation::Wait { .. } => 5,
            Invalidation::PasidIotlb { .. } => 6,
            Invalidation::PasidCache { .. } => 7,
            Invalidation::Other(d) => (d[0] & 0xf) as u8,
        })
        .collect()
}

/// The register base the test unit is named by.
const BASE: u64 = 0xfed9_0000;

fn unit() -> (RegisterModel, Unit<RegisterModel, Shared, TickClock>) {
    let (model, _, u) = unit_with(true, TickClock::default());
    (model, u)
}

/// A unit (not enabled) on memory its walks do (`coherent`) or do not
/// snoop, with `clock`; the memory too.
fn unit_with(coherent: bool, clock: TickClock) -> (RegisterModel, Shared, Unit<RegisterModel, Shared, TickClock>) {
    let mem = Shared::new(coherent);
    let model = RegisterModel::new(Config::QEMU, Arc::new(mem.clone()));
    let u = Unit::new(BASE, model.clone(), mem.clone(), clock).unwrap();
    (model, mem, u)
}

#[test]
fn bring_up_sets_root_invalidates_and_enables_qi_then_translation() {
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    let hw = model.state();
    assert!(hw.gsts.contains(Gsts::TE | Gsts::QIE));
    assert_ne!(hw.latched_root, 0);
    let by_register: Vec<Invalidation> = hw.log.iter().filter(|l| l.via == Via::Register).map(|l| l.what).collect();
    assert_eq!(
        by_register,
        [Invalidation::Context(ContextInvalidation::Global), Invalidation::Iotlb(IotlbInvalidation::Global)],
        "one global context and one global IOTLB invalidation"
    );
    assert!(u.queued());
}

#[test]
fn attach_writes_a_context_entry_and_invalidates_through_the_queue() {
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    let did = u.alloc_did().unwrap();
    let root = u.memory_mut().alloc_table().unwrap();
    u.attach(0x0008, root, 4, did).unwrap();
    let e = u.context_entry(0x0008);
    assert!(e.present());
    assert_eq!((e.root(), e.aw(), e.did()), (root, 2, did));
    assert!(!u.context_entry(0x0010).present(), "other devices stay blocked");
    let log = model.log();
    assert_eq!(kinds(&log), vec![1, 2, 5], "context, IOTLB domain, wait");
    assert!(log[log.len() - 3].what.covers_context(did, 0x0008));
    assert_eq!(log[log.len() - 2].what, Invalidation::Iotlb(IotlbInvalidation::Domain(did)));
    u.detach(0x0008).unwrap();
    assert!(!u.context_entry(0x0008).present());
}

#[test]
fn a_range_invalidation_is_one_wait() {
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    model.take_log();
    let before = u.stats;
    u.invalidate_range(1, 0x40_0000, 0x7f_ffff, true).unwrap();
    let log = model.log();
    assert_eq!(kinds(&log), vec![2, 5], "one 4 MiB page-selective invalidation (MAMV allows it) and one wait");
    assert_eq!(
        log[0].what,
        Invalidation::Iotlb(IotlbInvalidation::Pages { did: 1, addr: 0x40_0000, am: 10, ih: true })
    );
    assert_eq!(u.stats.waits - before.waits, 1);
}

#[test]
fn register_based_invalidation_without_qi() {
    let (model, mut u) = unit();
    u.enable(false).unwrap();
    assert!(!u.queued());
    u.invalidate_range(3, 0x1000, 0x1fff, false).unwrap();
    let last = model.log().last().copied().unwrap();
    assert_eq!(last.via, Via::Register);
    assert_eq!(
        last.what,
        Invalidation::Iotlb(IotlbInvalidation::Pages { did: 3, addr: 0x1000, am: 0, ih: false }),
        "page-selective through the register"
    );
}

/// IVT (or ICC) clearing only says the unit is done: with IAIG (CAIG) 0
/// it ignored the request, and the caller must hear that nothing was
/// invalidated.
#[test]
fn a_register_invalidation_the_unit_ignored_is_an_error() {
    let (model, mut u) = unit();
    u.enable(false).unwrap();
    model.state().reject_invalidation = true;
    let e = u.invalidate_range(3, 0x1000, 0x1fff, false).unwrap_err();
    assert!(matches!(e.cause, HwError::Rejected { register: "IOTLB", .. }), "{e:?}");
    assert!(e.to_string().contains("invalidation not performed"), "{e}");
    model.state().reject_invalidation = false;
    u.invalidate_range(3, 0x1000, 0x1fff, false).unwrap();
}

#[test]
fn hardware_that_never_answers_times_out_with_the_register_named() {
    let (model, mut u) = unit();
    model.state().stuck = true;
    match u.enable(true) {
        Err(Error { unit, cause: HwError::Timeout { register, .. } }) => {
            assert_eq!(unit, BASE);
            assert_eq!(register, "GSTS.RTPS");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn faults_are_decoded_cleared_and_logged() {
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    {
        let mut hw = model.state();
        hw.fault = [0x4000_0000, 1 << 63 | 5 << 32 | 0x0008];
        hw.fsts |= Fsts::PPF | Fsts::PFO;
    }
    let f = u.poll_faults();
    assert_eq!(f, vec![FaultRecord { source_id: 8, address: 0x4000_0000, reason: 5, write: true, pasid: None }]);
    let hw = model.state();
    assert_eq!(hw.fault[1] >> 63, 0, "F cleared");
    assert!(!hw.fsts.intersects(Fsts::PPF | Fsts::PFO));
    drop(hw);
    assert_eq!(u.fault_log().1, 1, "one overflow counted");
    assert!(u.poll_faults().is_empty());
}

#[test]
fn fault_event_interrupt_programs_the_message_and_rearms_after_polling() {
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    assert_eq!(u.fault_event_state(), (true, false), "masked at reset");
    u.enable_fault_event(0xfee0_1000, 0x28);
    assert_eq!(u.fault_event_state(), (false, false));
    model.record_fault(0x4000_0000, 1 << 63 | 5 << 32 | 0x0008);
    model.record_fault(0x4000_1000, 1 << 63 | 5 << 32 | 0x0008);
    assert_eq!(model.state().interrupts, vec![(0xfee0_1000, 0x28)], "one MSI while a fault is pending");
    assert_eq!(u.poll_faults().len(), 1);
    model.record_fault(0x4000_2000, 1 << 63 | 5 << 32 | 0x0008);
    assert_eq!(model.state().interrupts.len(), 2, "re-armed by polling");
    u.poll_faults();
    // Masked: IP instead of an MSI; polling services it.
    u.mask_fault_event();
    model.record_fault(0x4000_3000, 1 << 63 | 5 << 32 | 0x0008);
    assert_eq!(u.fault_event_state(), (true, true));
    assert_eq!(model.state().interrupts.len(), 2);
    assert_eq!(u.poll_faults().len(), 1);
    assert_eq!(u.fault_event_state(), (true, false));
}

#[test]
fn interrupt_remapping_table_entries_and_their_invalidation() {
    use vtd::ir::Irte;
    let (_, mut register_based) = unit();
    register_based.enable(false).unwrap();
    assert!(
        matches!(register_based.enable_interrupt_remapping(), Err(Error { cause: HwError::Unsupported(_), .. })),
        "needs the queue"
    );
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    u.enable_interrupt_remapping().unwrap();
    {
        let hw = model.state();
        assert!(hw.gsts.contains(Gsts::IRE | Gsts::TE | Gsts::QIE));
        assert!(!hw.gsts.contains(Gsts::CFI), "compatibility-format interrupts stay blocked");
        assert_eq!(hw.latched_irta & 0xf, 15, "65536 entries");
        assert_eq!(hw.latched_irta & !0xfff, hw.irta & !0xfff);
        let kinds = kinds(&hw.log);
        assert_eq!(&kinds[kinds.len() - 2..], [4, 5], "global interrupt entry cache invalidation, then a wait");
        assert_eq!(hw.log[hw.log.len() - 2].what, Invalidation::InterruptEntries(None), "global");
    }
    assert_eq!(model.interrupt_table_entries(), Some(65536));
    assert_eq!(u.interrupt_table_entries(), 65536);
    let table = model.state().irta & !0xfff;
    assert_eq!(model.interrupt_table(), Some(model.state().irta));
    let e = Irte::remapped(0x29, 0, false, 0x0008);
    u.set_irte(5, e).unwrap();
    assert_eq!(u.irte(5), Some(e));
    assert_eq!([u.memory().read(table, 10), u.memory().read(table, 11)], e.0, "entry 5 at 16 * 5");
    let iec = |m: &RegisterModel| -> Vec<Option<(u16, u8)>> {
        m.log()
            .iter()
            .filter_map(|l| match l.what {
                Invalidation::InterruptEntries(i) => Some(i),
                _ => None,
            })
            .collect()
    };
    assert_eq!(iec(&model).last(), Some(&Some((5, 0))), "index-selective for entry 5");
    // Replacing a present entry goes through not-present: two invalidations.
    let before = iec(&model).len();
    u.set_irte(5, Irte::remapped(0x2a, 0, false, 0x0010)).unwrap();
    assert_eq!(iec(&model).len(), before + 2);
    u.set_irte(5, Irte::default()).unwrap();
    assert!(!u.irte(5).unwrap().present());
    // Entries above 255 live in the table's later pages, where the unit
    // reads them (16 bytes each from IRTA), and are invalidated by index.
    for index in [256u16, 0x1234, 0xffff] {
        let e = Irte::remapped(0x30, 1, false, 0x0100);
        u.set_irte(index, e).unwrap();
        assert_eq!(u.irte(index), Some(e));
        assert_eq!(remap(&model, &mem_of(&u), index), Some((0x30, 1)), "entry {index:#x}");
        assert_eq!(iec(&model).last(), Some(&Some((index, 0))));
    }
    // The allocator hands out each entry once, lowest first, then refuses.
    let got: Vec<u16> = (0..65536).map(|_| u.alloc_irte().unwrap()).collect();
    assert!(got.iter().enumerate().all(|(i, &h)| h as usize == i));
    assert_eq!(u.alloc_irte(), Err(Error { unit: BASE, cause: HwError::TableFull }));
    u.set_irte(300, e).unwrap();
    u.free_irte(300).unwrap();
    assert!(!u.irte(300).unwrap().present(), "freeing clears the entry");
    assert_eq!(u.alloc_irte().unwrap(), 300);
    u.disable_interrupt_remapping().unwrap();
    assert!(!model.state().gsts.contains(Gsts::IRE));
    assert_eq!(model.interrupt_table(), None);
    assert_eq!(u.set_irte(5, e), Err(Error { unit: BASE, cause: HwError::NotEnabled }), "remapping is off");
    assert_eq!(u.interrupt_table_entries(), 0);
    assert_eq!(u.memory().0.lock().live_tables(), 3, "root, status page and queue: the table went");
}

/// The memory a unit's tables are in (shared with the model).
fn mem_of(u: &Unit<RegisterModel, Shared, TickClock>) -> Shared {
    u.memory().clone()
}

#[test]
fn without_a_contiguous_run_the_table_is_one_page() {
    use vtd::ir::Irte;
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    // The next allocation (the 1 MiB run) fails; the single page does not.
    u.memory().0.lock().fail_nth_alloc(Some(1));
    u.enable_interrupt_remapping().unwrap();
    assert_eq!(model.state().latched_irta & 0xf, 7, "256 entries");
    assert_eq!((model.interrupt_table_entries(), u.interrupt_table_entries()), (Some(256), 256));
    let got: Vec<u16> = (0..256).map(|_| u.alloc_irte().unwrap()).collect();
    assert_eq!(got, (0..256).collect::<Vec<u16>>());
    assert_eq!(u.alloc_irte(), Err(Error { unit: BASE, cause: HwError::TableFull }));
    let e = Irte::remapped(0x29, 0, false, 0x0008);
    u.set_irte(255, e).unwrap();
    assert_eq!(remap(&model, &mem_of(&u), 255), Some((0x29, 0)));
    assert!(matches!(u.set_irte(256, e), Err(Error { cause: HwError::Invalid(_), .. })), "beyond the table");
    assert_eq!(u.irte(256), None);
    u.disable_interrupt_remapping().unwrap();
    assert_eq!(u.memory().0.lock().live_tables(), 3, "the page went back");
}

#[test]
fn a_non_coherent_unit_flushes_the_whole_table_and_each_entry() {
    use vtd::ir::Irte;
    let (model, mem, mut u) = unit_with(false, TickClock::default());
    u.enable(true).unwrap();
    mem.0.lock().record_flushes(true);
    u.enable_interrupt_remapping().unwrap();
    let table = model.state().latched_irta & !0xfff;
    let log = mem.0.lock().take_flush_log();
    assert!((0..(1u64 << 20) / 64).all(|l| log.contains_key(&(table + l * 64))), "every line of the 1 MiB table");
    u.set_irte(0x1234, Irte::remapped(0x29, 0, false, 8)).unwrap();
    let log = mem.0.lock().take_flush_log();
    assert!(log.contains_key(&(table + 0x1234 * 16)), "the entry's line: {log:x?}");
}

#[test]
fn a_non_coherent_unit_flushes_only_the_queue_slots_written() {
    let (model, mem, mut u) = unit_with(false, TickClock::default());
    u.enable(true).unwrap();
    let page = model.state().iqa & !0xfff;
    // Odd slots from here on: [0, 0x2fff] takes two page-selective
    // descriptors (8 KiB and 4 KiB) and the wait.
    u.invalidate_range(1, 0, 0x2fff, true).unwrap();
    assert_eq!(model.state().iqt >> 4 & 1, 1);
    mem.0.lock().record_flushes(true);
    // 200 submissions of two 16-byte descriptors (the IOTLB one and the
    // wait): the 256-slot ring wraps at least once.
    let (mut wrapped, mut split) = (false, false);
    for _ in 0..200 {
        let before = model.state().iqt >> 4;
        u.invalidate_range(1, 0, 0xfff, true).unwrap();
        let after = model.state().iqt >> 4;
        wrapped |= after < before;
        split |= before == 255;
        let written: Vec<u64> = (0..2).map(|k| (before + k) % 256).collect();
        assert_eq!(written.last().map(|w| (w + 1) % 256), Some(after));
        let want: std::collections::BTreeSet<u64> = written.iter().map(|w| page + ((w * 16) & !63)).collect();
        let log = mem.0.lock().take_flush_log();
        let got: std::collections::BTreeSet<u64> = log.keys().copied().filter(|l| l & !0xfff == page).collect();
        assert_eq!(got, want, "slots {written:?}: their lines and no others of the queue page");
    }
    assert!(wrapped && split, "the ring wrapped, once between the two slots of one submission");
}

#[test]
fn the_queue_head_is_read_only_while_descriptors_may_be_unfetched() {
    // 10 ms a clock read: each time-out below takes a few polls.
    let (model, _, mut u) = unit_with(true, TickClock::with_step(10_000_000));
    u.enable(true).unwrap();
    // Every wait so far completed: the queue is empty, no IQH read needed.
    let reads = model.state().iqh_reads;
    u.invalidate_range(1, 0, 0xfff, true).unwrap();
    assert_eq!(model.state().iqh_reads, reads, "a drained queue has room");
    // A unit that fetches nothing: each submission times out waiting for
    // its status, and leaves its two descriptors in the ring.
    model.state().hold_queue = true;
    let mut timeouts = 0;
    let full = loop {
        match u.invalidate_range(1, 0, 0xfff, true) {
            Err(Error { cause: HwError::Timeout { register: "invalidation wait status", .. }, .. }) => timeouts += 1,
            Err(Error { cause: HwError::Timeout { register: "IQH", .. }, .. }) => break true,
            other => panic!("unexpected {other:?}"),
        }
        assert!(timeouts <= 128, "the ring never filled");
    };
    assert!(full && model.state().iqh_reads > reads);
    // 255 usable slots, two per submission: 127 submissions fit.
    assert_eq!(timeouts, 127);
    let (head, tail) = {
        let s = model.state();
        (s.iqh >> 4, s.iqt >> 4)
    };
    assert_eq!((tail + 256 - head) % 256, 254, "nothing unfetched was overwritten");
    // The unit catches up: the next submission runs everything.
    model.state().hold_queue = false;
    model.run_queue();
    let s = model.state();
    assert_eq!(s.iqh, s.iqt, "the unit caught up");
    drop(s);
    u.invalidate_range(1, 0, 0xfff, true).unwrap();
    let reads = model.state().iqh_reads;
    u.invalidate_range(1, 0, 0xfff, true).unwrap();
    assert_eq!(model.state().iqh_reads, reads, "drained again");
}

#[test]
fn a_queue_error_is_reported_with_the_fault_status() {
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    model.state().queue_error = true;
    let e = u.invalidate_range(1, 0, 0xfff, true).unwrap_err();
    assert_eq!(e, Error { unit: BASE, cause: HwError::QueueError { status: Fsts::IQE.bits() } });
    assert!(e.to_string().starts_with("IOMMU unit at 0xfed90000: invalidation queue error"), "{e}");
    // The queue is restarted: the error cleared, the failed descriptors
    // dropped (IQT back at IQH), and the next invalidation goes through.
    let s = model.state();
    assert!(!s.fsts.intersects(Fsts::QUEUE_ERRORS), "cleared: {:?}", s.fsts);
    assert_eq!(s.iqt, s.iqh, "nothing left queued");
    drop(s);
    model.state().queue_error = false;
    model.take_log();
    u.invalidate_range(1, 0, 0xfff, true).unwrap();
    assert!(!model.take_log().is_empty(), "the unit processed it");
}

#[test]
fn pasid_based_invalidation_needs_scalable_mode() {
    let (_, mut u) = unit();
    u.enable(true).unwrap();
    assert!(matches!(
        u.invalidate_range_pasid(1, 0, 0xfff, true),
        Err(Error { cause: HwError::Unsupported("not in scalable mode"), .. })
    ));
}

/// ECAP.EIM: extended interrupt mode (x2APIC destinations).
const ECAP_EIM: u64 = 1 << 4;

/// A unit model whose ECAP has `extra` too, and the memory it shares
/// with the driver.
fn model_with_ecap(extra: u64) -> (RegisterModel, Shared) {
    let mem = Shared::new(true);
    let config = Config { ecap: Config::QEMU.ecap | extra, ..Config::QEMU };
    (RegisterModel::new(config, Arc::new(mem.clone())), mem)
}

/// Where the unit sends the remappable MSI with handle `index`, as the
/// hardware reads the table it latched: (vector, destination APIC id);
/// `None` when the entry is not present. With IRTA.EIME the destination is
/// bits 63:32 whole, without it the xAPIC id in bits 47:40.
fn remap(model: &RegisterModel, mem: &Shared, index: u16) -> Option<(u8, u32)> {
    let irta = model.state().latched_irta;
    if index as usize >= model.interrupt_table_entries()? {
        return None;
    }
    let low = mem.read_u64((irta & !0xfff) + index as u64 * 16);
    if low & 1 == 0 {
        return None;
    }
    let dest = if irta & (1 << 11) != 0 { (low >> 32) as u32 } else { ((low >> 40) & 0xff) as u32 };
    Some(((low >> 16) as u8, dest))
}

#[test]
fn x2apic_destinations_need_eim() {
    use vtd::shared::BringUp;
    let eim_named = |e: &Error| matches!(e.cause, HwError::Unsupported(m) if m.contains("ECAP.EIM"));
    // The unit alone.
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    let e = u.enable_interrupt_remapping_with(true).unwrap_err();
    assert!(eim_named(&e), "{e}");
    assert!(!u.interrupt_remapping_on());
    assert!(!model.state().gsts.contains(Gsts::IRE));
    assert_eq!(model.state().irta, 0, "IRTA untouched");
    // Bring-up: refused before anything is enabled.
    let (model, mem) = model_with_ecap(0);
    let e = vtd::Shared::bring_up_with(
        BASE,
        model.clone(),
        mem,
        TickClock::default(),
        BringUp { mode: None, x2apic: true },
    )
    .unwrap_err();
    assert!(eim_named(&e), "{e}");
    assert_eq!(e.unit, BASE);
    assert!(e.to_string().contains("ECAP.EIM"), "{e}");
    assert_eq!(model.state().gsts, Gsts::empty(), "nothing enabled");
}

#[test]
fn x2apic_destinations_take_32_bit_apic_ids() {
    use portcullis_iommu::unit::IommuUnit;
    use vtd::shared::BringUp;
    let (model, mem) = model_with_ecap(ECAP_EIM);
    let options = BringUp { mode: None, x2apic: true };
    let table_mem = mem.clone();
    let unit = vtd::Shared::bring_up_with(BASE, model.clone(), mem, TickClock::default(), options).unwrap();
    {
        let hw = model.state();
        assert!(hw.gsts.contains(Gsts::IRE), "remapping on");
        assert_ne!(hw.latched_irta & (1 << 11), 0, "IRTA.EIME latched");
        assert_eq!(hw.latched_irta & 0xf, 15, "65536 entries");
    }
    assert!(unit.lock().x2apic_destinations());
    let route = unit.route_msi(0x0008, 0x29, 0x1234_5678).unwrap();
    let entry = unit.lock().irte(route.handle).unwrap();
    assert_eq!(entry.0[0] >> 32, 0x1234_5678, "the whole id in bits 63:32");
    assert_eq!(entry.0[1] & 0xffff, 0x0008, "source id");
    assert_eq!(remap(&model, &table_mem, route.handle), Some((0x29, 0x1234_5678)));
    // Retargeted to another 32-bit id, and to an 8-bit one.
    unit.retarget_msi(0x0008, route.handle, 0x2a, 0x100).unwrap();
    assert_eq!(remap(&model, &table_mem, route.handle), Some((0x2a, 0x100)));
    unit.retarget_msi(0x0008, route.handle, 0x2a, 3).unwrap();
    assert_eq!(remap(&model, &table_mem, route.handle), Some((0x2a, 3)));
    assert_eq!(unit.lock().irte(route.handle).unwrap().0[0] >> 32, 3, "8-bit ids in bits 63:32 too");
    // Asking for the other format on the running table is refused.
    let e = unit.lock().enable_interrupt_remapping().unwrap_err();
    assert!(matches!(e.cause, HwError::Invalid(_)), "{e}");
    unit.free_msi(0x0008, route.handle).unwrap();
    assert_eq!(remap(&model, &table_mem, route.handle), None);
}

#[test]
fn xapic_destinations_refuse_ids_above_255() {
    use portcullis_iommu::unit::IommuUnit;
    // A unit that could do x2APIC, brought up without it: EIME clear.
    let (model, mem) = model_with_ecap(ECAP_EIM);
    let table_mem = mem.clone();
    let unit = vtd::Shared::bring_up(BASE, model.clone(), mem, TickClock::default(), None).unwrap();
    assert_eq!(model.state().latched_irta & (1 << 11), 0, "IRTA.EIME clear");
    assert!(!unit.lock().x2apic_destinations());
    let route = unit.route_msi(0x0008, 0x29, 0xff).unwrap();
    assert_eq!(unit.lock().irte(route.handle).unwrap().0[0] >> 40 & 0xff, 0xff, "xAPIC id in bits 47:40");
    assert_eq!(remap(&model, &table_mem, route.handle), Some((0x29, 0xff)));
    let before = unit.lock().irte(route.handle);
    for dest in [0x100, 0x1_0000, u32::MAX] {
        let e = unit.route_msi(0x0008, 0x2a, dest).unwrap_err();
        assert!(matches!(e.cause, HwError::Invalid(m) if m.contains("255")), "{e}");
        let e = unit.retarget_msi(0x0008, route.handle, 0x2a, dest).unwrap_err();
        assert!(matches!(e.cause, HwError::Invalid(_)), "{e}");
    }
    assert_eq!(unit.lock().irte(route.handle), before, "a refused retarget changes nothing");
    // The refused routes took no entry: the next one is entry 1.
    assert_eq!(unit.route_msi(0x0008, 0x2a, 1).unwrap().handle, 1);
}

/// ECAP.SMTS and ECAP.SSTS: scalable mode with second-stage translation.
const ECAP_SCALABLE_SS: u64 = 1 << 43 | 1 << 46;
/// ECAP.SSADS: second-stage accessed/dirty bits.
const ECAP_SSADS: u64 = 1 << 45;

/// Sets D (bit 9) in the second-stage leaf translating `iova` for `sid`,
/// as a unit with SSADE does on a write: the walk from the PASID entry.
fn walker_writes(unit: &vtd::Shared<RegisterModel, Shared, TickClock>, mem: &Shared, sid: u16, iova: u64) {
    let pasid = unit.lock().scalable_entry(sid).unwrap().pasid;
    assert!(pasid.ssade(), "the unit records only with SSADE");
    let mut table = pasid.ss_root();
    let mut level = pasid.ss_levels() - 1;
    loop {
        let i = (iova >> (12 + 9 * level)) as usize & 511;
        let e = mem.read(table, i);
        assert_ne!(e & 3, 0, "{iova:#x} is mapped");
        if level == 0 || e & (1 << 7) != 0 {
            mem.clone().write(table, i, e | 1 << 9);
            return;
        }
        table = e & 0x000f_ffff_ffff_f000;
        level -= 1;
    }
}

#[test]
fn dirty_tracking_needs_scalable_second_stage_with_ssads() {
    use portcullis_iommu::unit::{Device, IommuUnit};
    use portcullis_iommu::{DeviceOps, DomainError, RequesterRef};
    let at = RequesterRef { unit: 0, requester_id: 8 };
    for (ecap, mode) in [
        (ECAP_SCALABLE_SS, Some(vtd::Mode::Scalable)),
        (ECAP_SSADS, None),
        (ECAP_SCALABLE_SS | ECAP_SSADS, Some(vtd::Mode::Legacy { queued: true })),
    ] {
        let (model, mem) = model_with_ecap(ecap);
        let unit = vtd::Shared::bring_up(BASE, model, mem, TickClock::default(), mode).unwrap();
        assert!(!unit.supports_dirty_tracking(), "ecap {ecap:#x} {mode:?}");
        let dev = Device::new(unit.clone(), at);
        assert!(!dev.supports_dirty_tracking());
        assert_eq!(dev.alloc_dirty_domain().err(), Some(DomainError::NotSupported));
        assert!(unit.new_dirty_domain().is_err());
        // Plain domains still do not track.
        assert!(!portcullis_iommu::IommuDomain::dirty_capable(&*dev.alloc_domain().unwrap()));
    }
}

#[test]
fn dirty_tracking_sets_ssade_and_reports_what_the_walker_marked() {
    use portcullis_iommu::unit::{Device, IommuUnit};
    use portcullis_iommu::{DeviceOps, IotlbGather, Prot, RequesterRef};
    const M2: u64 = 1 << 21;
    let (model, mem) = model_with_ecap(ECAP_SCALABLE_SS | ECAP_SSADS);
    let table_mem = mem.clone();
    let unit =
        vtd::Shared::bring_up(BASE, model.clone(), mem, TickClock::default(), Some(vtd::Mode::Scalable)).unwrap();
    assert!(unit.supports_dirty_tracking());
    let (a, b) = (RequesterRef { unit: 0, requester_id: 8 }, RequesterRef { unit: 0, requester_id: 0x10 });
    let dev = Device::new(unit.clone(), a);
    assert!(dev.supports_dirty_tracking());
    let mut d = dev.alloc_dirty_domain().unwrap();
    assert!(d.dirty_capable());
    d.map(0, 0x4000_0000, 2 * M2, Prot::RW).unwrap();
    d.map(2 * M2, 0x10_0000, 16 << 12, Prot::RW).unwrap();
    d.attach_device(a.handle()).unwrap();
    let ssade = |sid| unit.lock().scalable_entry(sid).unwrap().pasid.ssade();
    assert!(!ssade(8), "tracking is off: no SSADE");
    let mut g = IotlbGather::default();
    assert!(d.read_and_clear_dirty(0, M2, true, &mut g, &mut |_, _| {}).is_err(), "not tracking");

    // Start: SSADE set in place (the entry stays present) and the PASID
    // cache and IOTLB of the domain invalidated.
    model.take_log();
    d.set_dirty_tracking(true).unwrap();
    assert!(ssade(8));
    assert!(kinds(&model.take_log()).contains(&7), "PASID-cache invalidation");
    assert_eq!(unit.attached_domain(8), Some(unit.lock().scalable_entry(8).unwrap().pasid.did()));
    // A device attached while tracking gets SSADE too.
    d.attach_device(b.handle()).unwrap();
    assert!(ssade(0x10));

    // The walker marks a 2 MiB page and two 4 KiB pages.
    walker_writes(&unit, &table_mem, 8, M2 + 0x1234);
    walker_writes(&unit, &table_mem, 0x10, 2 * M2 + 3 * 4096);
    walker_writes(&unit, &table_mem, 8, 2 * M2 + 5 * 4096 + 8);
    let mut seen = Vec::new();
    d.read_and_clear_dirty(0, 4 * M2, true, &mut g, &mut |at, len| seen.push((at, len))).unwrap();
    assert_eq!(seen, [(M2, M2), (2 * M2 + 3 * 4096, 4096), (2 * M2 + 5 * 4096, 4096)]);
    d.iotlb_sync(&mut g).unwrap();
    seen.clear();
    d.read_and_clear_dirty(0, 4 * M2, true, &mut g, &mut |at, len| seen.push((at, len))).unwrap();
    assert_eq!(seen, [], "cleared");

    // Stop: SSADE cleared on both.
    d.set_dirty_tracking(false).unwrap();
    assert!(!ssade(8) && !ssade(0x10));
    assert!(d.read_and_clear_dirty(0, M2, true, &mut g, &mut |_, _| {}).is_err());
}
