//! The unit driver against a register-level model of a VT-d unit (the
//! behaviours QEMU-NOTES lists: GCMD acting on the difference from GSTS,
//! self-clearing CCMD.ICC / IOTLB.IVT, a queue processed on IQT writes with
//! wait descriptors writing their status, fault recording registers with
//! RW1C F bits).

use io_pgtable::{HeapTables, TableMemory};
use portcullis_iommu::testing::TickClock;
use std::sync::{Arc, Mutex};
use vtd::qi::Descriptor;
use vtd::regs::{Fectl, Fsts, Gcmd, Gsts, Mmio};
use vtd::{Error, FaultRecord, HwError, Unit};

/// Register offsets as plain numbers, for matching on accessed offsets.
mod off {
    use vtd::regs;
    pub const CAP: usize = regs::CAP.offset();
    pub const CCMD: usize = regs::CCMD.offset();
    pub const ECAP: usize = regs::ECAP.offset();
    pub const FEADDR: usize = regs::FEADDR.offset();
    pub const FECTL: usize = regs::FECTL.offset();
    pub const FEDATA: usize = regs::FEDATA.offset();
    pub const FEUADDR: usize = regs::FEUADDR.offset();
    pub const FSTS: usize = regs::FSTS.offset();
    pub const GCMD: usize = regs::GCMD.offset();
    pub const GSTS: usize = regs::GSTS.offset();
    pub const IQA: usize = regs::IQA.offset();
    pub const IQH: usize = regs::IQH.offset();
    pub const IQT: usize = regs::IQT.offset();
    pub const RTADDR: usize = regs::RTADDR.offset();
    pub const IRTA: usize = regs::IRTA.offset();
}

/// QEMU's default capability registers (QEMU-NOTES).
const CAP: u64 = 0x00d2_008c_222f_0606;
const ECAP: u64 = 0x00f0_0f4a;

#[derive(Clone)]
struct Shared(Arc<Mutex<HeapTables>>);

impl TableMemory for Shared {
    fn alloc_table(&mut self) -> Option<u64> {
        self.0.lock().unwrap().alloc_table()
    }
    fn free_table(&mut self, t: u64) {
        self.0.lock().unwrap().free_table(t)
    }
    fn read(&self, t: u64, i: usize) -> u64 {
        self.0.lock().unwrap().read(t, i)
    }
    fn write(&mut self, t: u64, i: usize, v: u64) {
        self.0.lock().unwrap().write(t, i, v)
    }
    fn coherent(&self) -> bool {
        true
    }
    fn flush(&mut self, p: u64, l: u64) {
        self.0.lock().unwrap().flush(p, l)
    }
}

#[derive(Default)]
struct Hw {
    gsts: Gsts,
    rtaddr: u64,
    latched_root: u64,
    ccmd_log: Vec<u64>,
    iotlb_log: Vec<u64>,
    iqa: u64,
    iqh: u64,
    iqt: u64,
    processed: Vec<Descriptor>,
    fsts: Fsts,
    fault: [u64; 2],
    /// FECTL (IM, IP), FEDATA, FEADDR, FEUADDR.
    fectl: Fectl,
    fe_msg: [u32; 3],
    irta: u64,
    latched_irta: u64,
    /// MSIs sent: (address, data).
    interrupts: Vec<(u64, u32)>,
    /// Make GSTS never follow (timeouts).
    stuck: bool,
    /// Report an invalidation queue error (FSTS.IQE) instead of running
    /// the queue.
    queue_error: bool,
    /// Bits ORed into the ECAP the model reports (EIM, say).
    extra_ecap: u64,
}

#[derive(Clone)]
struct Model {
    hw: Arc<Mutex<Hw>>,
    mem: Shared,
}

const FRO: usize = 0x220;
const IRO: usize = 0xf0;

impl Model {
    fn process_queue(&self, hw: &mut Hw) {
        if !hw.gsts.contains(Gcmd::QIE) {
            return;
        }
        if hw.queue_error {
            hw.fsts |= Fsts::IQE;
            return;
        }
        let page = hw.iqa & !0xfff;
        while hw.iqh != hw.iqt {
            let i = (hw.iqh >> 4) as usize;
            let d = Descriptor([self.mem.read(page, i * 2), self.mem.read(page, i * 2 + 1)]);
            if d.kind() == 5 && d.0[0] & (1 << 5) != 0 {
                // Status write: the status page's first entry.
                let mut m = self.mem.clone();
                m.write(d.0[1] & !0xfff, ((d.0[1] & 0xfff) / 8) as usize, d.0[0] >> 32);
            }
            hw.processed.push(d);
            hw.iqh = (((hw.iqh >> 4) + 1) % 256) << 4;
        }
    }
}

impl Mmio for Model {
    fn read32(&self, off: usize) -> u32 {
        let hw = self.hw.lock().unwrap();
        match off {
            off::GSTS => hw.gsts.bits(),
            off::FSTS => hw.fsts.bits(),
            off::FECTL => hw.fectl.bits(),
            _ => panic!("unexpected 32-bit read at {off:#x}"),
        }
    }
    fn read64(&self, off: usize) -> u64 {
        let hw = self.hw.lock().unwrap();
        match off {
            off::CAP => CAP,
            off::ECAP => ECAP | hw.extra_ecap,
            off::CCMD => 0,
            off::IQH => hw.iqh,
            o if o == IRO + 8 => 0,
            o if o == FRO => hw.fault[0],
            o if o == FRO + 8 => hw.fault[1],
            _ => panic!("unexpected 64-bit read at {off:#x}"),
        }
    }
    fn write32(&self, off: usize, v: u32) {
        let mut hw = self.hw.lock().unwrap();
        match off {
            off::GCMD => {
                if hw.stuck {
                    return;
                }
                // Acts on the difference: persistent bits follow the value.
                let v = Gcmd::from_bits_retain(v);
                let persistent = v & Gcmd::PERSISTENT;
                if v.contains(Gcmd::SRTP) {
                    hw.latched_root = hw.rtaddr;
                    hw.gsts |= Gsts::SRTP;
                }
                if v.contains(Gcmd::SIRTP) {
                    hw.latched_irta = hw.irta;
                    hw.gsts |= Gsts::SIRTP;
                }
                hw.gsts = (hw.gsts - Gsts::PERSISTENT) | persistent;
            }
            off::FSTS => {
                hw.fsts -= Fsts::from_bits_retain(v) & Fsts::W1C;
                // Serviced: a pending masked event clears once nothing is left.
                if !hw.fsts.intersects(Fsts::PPF | Fsts::PFO) {
                    hw.fectl -= Fectl::IP;
                }
            }
            off::FECTL => {
                let v = Fectl::from_bits_retain(v);
                let unmasking = hw.fectl.contains(Fectl::IM) && !v.contains(Fectl::IM);
                hw.fectl = (hw.fectl & Fectl::IP) | (v & Fectl::IM);
                if unmasking && hw.fectl.contains(Fectl::IP) {
                    // A pending event is delivered on unmask.
                    hw.fectl -= Fectl::IP;
                    let msg = (hw.fe_msg[1] as u64 | (hw.fe_msg[2] as u64) << 32, hw.fe_msg[0]);
                    hw.interrupts.push(msg);
                }
            }
            off::FEDATA => hw.fe_msg[0] = v,
            off::FEADDR => hw.fe_msg[1] = v,
            off::FEUADDR => hw.fe_msg[2] = v,
            o if o == FRO + 12 => {
                if v & (1 << 31) != 0 {
                    hw.fault[1] &= !(1 << 63);
                    hw.fsts -= Fsts::PPF;
                }
            }
            _ => panic!("32-bit write at {off:#x} = {v:#x}"),
        }
    }
    fn write64(&self, off: usize, v: u64) {
        // 32-bit registers must not get 8-byte writes (QEMU aborts).
        assert!(
            ![off::GCMD, off::GSTS, off::FSTS, off::FECTL, off::FEDATA, off::FEADDR, off::FEUADDR].contains(&off),
            "8-byte write to a 32-bit register"
        );
        let mut hw = self.hw.lock().unwrap();
        match off {
            off::RTADDR => hw.rtaddr = v,
            off::IRTA => hw.irta = v,
            off::CCMD => hw.ccmd_log.push(v),
            off::IQA => hw.iqa = v,
            off::IQT => {
                hw.iqt = v;
                let me = self.clone();
                me.process_queue(&mut hw);
            }
            o if o == IRO + 8 => hw.iotlb_log.push(v),
            o if o == IRO => {}
            _ => panic!("64-bit write at {off:#x}"),
        }
    }
}

/// The register base the test unit is named by.
const BASE: u64 = 0xfed9_0000;

fn unit() -> (Model, Unit<Model, Shared, TickClock>) {
    let mem = Shared(Arc::new(Mutex::new(HeapTables::new(true))));
    let hw = Hw { fectl: Fectl::IM, ..Hw::default() };
    let model = Model { hw: Arc::new(Mutex::new(hw)), mem: mem.clone() };
    let u = Unit::new(BASE, model.clone(), mem, TickClock::default()).unwrap();
    (model, u)
}

#[test]
fn bring_up_sets_root_invalidates_and_enables_qi_then_translation() {
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    let hw = model.hw.lock().unwrap();
    assert!(hw.gsts.contains(Gsts::TE | Gsts::QIE));
    assert_ne!(hw.latched_root, 0);
    assert_eq!(hw.ccmd_log.len(), 1, "one global context invalidation");
    assert_eq!(hw.iotlb_log.len(), 1, "one global IOTLB invalidation");
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
    let kinds: Vec<u8> = model.hw.lock().unwrap().processed.iter().map(|d| d.kind()).collect();
    assert_eq!(kinds, vec![1, 2, 5], "context, IOTLB domain, wait");
    u.detach(0x0008).unwrap();
    assert!(!u.context_entry(0x0008).present());
}

#[test]
fn a_range_invalidation_is_one_wait() {
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    model.hw.lock().unwrap().processed.clear();
    let before = u.stats;
    u.invalidate_range(1, 0x40_0000, 0x7f_ffff, true).unwrap();
    let hw = model.hw.lock().unwrap();
    let kinds: Vec<u8> = hw.processed.iter().map(|d| d.kind()).collect();
    assert_eq!(kinds, vec![2, 5], "one 4 MiB page-selective invalidation (MAMV allows it) and one wait");
    assert_eq!(u.stats.waits - before.waits, 1);
}

#[test]
fn register_based_invalidation_without_qi() {
    let (model, mut u) = unit();
    u.enable(false).unwrap();
    assert!(!u.queued());
    u.invalidate_range(3, 0x1000, 0x1fff, false).unwrap();
    let hw = model.hw.lock().unwrap();
    assert_eq!(hw.iotlb_log.last().map(|v| v >> 60 & 3), Some(3), "page-selective through the register");
}

#[test]
fn hardware_that_never_answers_times_out_with_the_register_named() {
    let (model, mut u) = unit();
    model.hw.lock().unwrap().stuck = true;
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
        let mut hw = model.hw.lock().unwrap();
        hw.fault = [0x4000_0000, 1 << 63 | 5 << 32 | 0x0008];
        hw.fsts |= Fsts::PPF | Fsts::PFO;
    }
    let f = u.poll_faults();
    assert_eq!(f, vec![FaultRecord { source_id: 8, address: 0x4000_0000, reason: 5, write: true, pasid: None }]);
    let hw = model.hw.lock().unwrap();
    assert_eq!(hw.fault[1] >> 63, 0, "F cleared");
    assert!(!hw.fsts.intersects(Fsts::PPF | Fsts::PFO));
    drop(hw);
    assert_eq!(u.fault_log().1, 1, "one overflow counted");
    assert!(u.poll_faults().is_empty());
}

impl Model {
    /// The hardware records a fault: an MSI when unmasked and none was
    /// pending, FECTL.IP when masked.
    fn record_fault(&self, lo: u64, hi: u64) {
        let mut hw = self.hw.lock().unwrap();
        let was_pending = hw.fsts.contains(Fsts::PPF);
        hw.fault = [lo, hi];
        hw.fsts |= Fsts::PPF;
        if was_pending {
            return;
        }
        if hw.fectl.contains(Fectl::IM) {
            hw.fectl |= Fectl::IP;
        } else {
            let msg = (hw.fe_msg[1] as u64 | (hw.fe_msg[2] as u64) << 32, hw.fe_msg[0]);
            hw.interrupts.push(msg);
        }
    }
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
    assert_eq!(model.hw.lock().unwrap().interrupts, vec![(0xfee0_1000, 0x28)], "one MSI while a fault is pending");
    assert_eq!(u.poll_faults().len(), 1);
    model.record_fault(0x4000_2000, 1 << 63 | 5 << 32 | 0x0008);
    assert_eq!(model.hw.lock().unwrap().interrupts.len(), 2, "re-armed by polling");
    u.poll_faults();
    // Masked: IP instead of an MSI; polling services it.
    u.mask_fault_event();
    model.record_fault(0x4000_3000, 1 << 63 | 5 << 32 | 0x0008);
    assert_eq!(u.fault_event_state(), (true, true));
    assert_eq!(model.hw.lock().unwrap().interrupts.len(), 2);
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
        let hw = model.hw.lock().unwrap();
        assert!(hw.gsts.contains(Gsts::IRE | Gsts::TE | Gsts::QIE));
        assert!(!hw.gsts.contains(Gsts::CFI), "compatibility-format interrupts stay blocked");
        assert_eq!(hw.latched_irta & 0xf, 7, "256 entries");
        assert_eq!(hw.latched_irta & !0xfff, hw.irta & !0xfff);
        let kinds: Vec<u8> = hw.processed.iter().map(|d| d.kind()).collect();
        assert_eq!(&kinds[kinds.len() - 2..], [4, 5], "global interrupt entry cache invalidation, then a wait");
        assert_eq!(hw.processed[hw.processed.len() - 2].0[0] & (1 << 4), 0, "global");
    }
    let table = model.hw.lock().unwrap().irta & !0xfff;
    let e = Irte::remapped(0x29, 0, false, 0x0008);
    u.set_irte(5, e).unwrap();
    assert_eq!(u.irte(5), Some(e));
    assert_eq!([model.mem.read(table, 10), model.mem.read(table, 11)], e.0, "entry 5 at 16 * 5");
    let iec = |hw: &Hw| -> Vec<(u64, u64)> {
        hw.processed.iter().filter(|d| d.kind() == 4).map(|d| ((d.0[0] >> 4) & 1, d.0[0] >> 32)).collect()
    };
    assert_eq!(iec(&model.hw.lock().unwrap()).last(), Some(&(1, 5)), "index-selective for entry 5");
    // Replacing a present entry goes through not-present: two invalidations.
    let before = iec(&model.hw.lock().unwrap()).len();
    u.set_irte(5, Irte::remapped(0x2a, 0, false, 0x0010)).unwrap();
    assert_eq!(iec(&model.hw.lock().unwrap()).len(), before + 2);
    u.set_irte(5, Irte::default()).unwrap();
    assert!(!u.irte(5).unwrap().present());
    // The allocator hands out each entry once, then refuses.
    let got: Vec<u16> = (0..256).map(|_| u.alloc_irte().unwrap()).collect();
    assert_eq!(got, (0..256).collect::<Vec<u16>>());
    assert_eq!(u.alloc_irte(), Err(Error { unit: BASE, cause: HwError::TableFull }));
    u.set_irte(7, e).unwrap();
    u.free_irte(7).unwrap();
    assert!(!u.irte(7).unwrap().present(), "freeing clears the entry");
    assert_eq!(u.alloc_irte().unwrap(), 7);
    assert!(matches!(u.set_irte(256, e), Err(Error { cause: HwError::Invalid(_), .. })), "beyond the table");
    u.disable_interrupt_remapping().unwrap();
    assert!(!model.hw.lock().unwrap().gsts.contains(Gsts::IRE));
    assert_eq!(u.set_irte(5, e), Err(Error { unit: BASE, cause: HwError::NotEnabled }), "remapping is off");
}

#[test]
fn a_queue_error_is_reported_with_the_fault_status() {
    let (model, mut u) = unit();
    u.enable(true).unwrap();
    model.hw.lock().unwrap().queue_error = true;
    let e = u.invalidate_range(1, 0, 0xfff, true).unwrap_err();
    assert_eq!(e, Error { unit: BASE, cause: HwError::QueueError { status: Fsts::IQE.bits() } });
    assert!(e.to_string().starts_with("IOMMU unit at 0xfed90000: invalidation queue error"), "{e}");
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

impl Model {
    /// A unit model whose ECAP has `extra` too.
    fn with_ecap(extra: u64) -> (Model, Shared) {
        let mem = Shared(Arc::new(Mutex::new(HeapTables::new(true))));
        let hw = Hw { fectl: Fectl::IM, extra_ecap: extra, ..Hw::default() };
        (Model { hw: Arc::new(Mutex::new(hw)), mem: mem.clone() }, mem)
    }

    /// Where the unit sends the remappable MSI with handle `index`, as the
    /// hardware reads the table it latched: (vector, destination APIC id);
    /// `None` when the entry is not present. With IRTA.EIME the destination
    /// is bits 63:32 whole, without it the xAPIC id in bits 47:40.
    fn remap(&self, index: u16) -> Option<(u8, u32)> {
        let irta = self.hw.lock().unwrap().latched_irta;
        let low = self.mem.read(irta & !0xfff, index as usize * 2);
        if low & 1 == 0 {
            return None;
        }
        let dest = if irta & (1 << 11) != 0 { (low >> 32) as u32 } else { ((low >> 40) & 0xff) as u32 };
        Some(((low >> 16) as u8, dest))
    }
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
    assert!(!model.hw.lock().unwrap().gsts.contains(Gsts::IRE));
    assert_eq!(model.hw.lock().unwrap().irta, 0, "IRTA untouched");
    // Bring-up: refused before anything is enabled.
    let (model, mem) = Model::with_ecap(0);
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
    assert_eq!(model.hw.lock().unwrap().gsts, Gsts::empty(), "nothing enabled");
}

#[test]
fn x2apic_destinations_take_32_bit_apic_ids() {
    use portcullis_iommu::unit::IommuUnit;
    use vtd::shared::BringUp;
    let (model, mem) = Model::with_ecap(ECAP_EIM);
    let options = BringUp { mode: None, x2apic: true };
    let unit = vtd::Shared::bring_up_with(BASE, model.clone(), mem, TickClock::default(), options).unwrap();
    {
        let hw = model.hw.lock().unwrap();
        assert!(hw.gsts.contains(Gsts::IRE), "remapping on");
        assert_ne!(hw.latched_irta & (1 << 11), 0, "IRTA.EIME latched");
        assert_eq!(hw.latched_irta & 0xf, 7, "256 entries");
    }
    assert!(unit.lock().x2apic_destinations());
    let route = unit.route_msi(0x0008, 0x29, 0x1234_5678).unwrap();
    let entry = unit.lock().irte(route.handle).unwrap();
    assert_eq!(entry.0[0] >> 32, 0x1234_5678, "the whole id in bits 63:32");
    assert_eq!(entry.0[1] & 0xffff, 0x0008, "source id");
    assert_eq!(model.remap(route.handle), Some((0x29, 0x1234_5678)));
    // Retargeted to another 32-bit id, and to an 8-bit one.
    unit.retarget_msi(0x0008, route.handle, 0x2a, 0x100).unwrap();
    assert_eq!(model.remap(route.handle), Some((0x2a, 0x100)));
    unit.retarget_msi(0x0008, route.handle, 0x2a, 3).unwrap();
    assert_eq!(model.remap(route.handle), Some((0x2a, 3)));
    assert_eq!(unit.lock().irte(route.handle).unwrap().0[0] >> 32, 3, "8-bit ids in bits 63:32 too");
    // Asking for the other format on the running table is refused.
    let e = unit.lock().enable_interrupt_remapping().unwrap_err();
    assert!(matches!(e.cause, HwError::Invalid(_)), "{e}");
    unit.free_msi(0x0008, route.handle).unwrap();
    assert_eq!(model.remap(route.handle), None);
}

#[test]
fn xapic_destinations_refuse_ids_above_255() {
    use portcullis_iommu::unit::IommuUnit;
    // A unit that could do x2APIC, brought up without it: EIME clear.
    let (model, mem) = Model::with_ecap(ECAP_EIM);
    let unit = vtd::Shared::bring_up(BASE, model.clone(), mem, TickClock::default(), None).unwrap();
    assert_eq!(model.hw.lock().unwrap().latched_irta & (1 << 11), 0, "IRTA.EIME clear");
    assert!(!unit.lock().x2apic_destinations());
    let route = unit.route_msi(0x0008, 0x29, 0xff).unwrap();
    assert_eq!(unit.lock().irte(route.handle).unwrap().0[0] >> 40 & 0xff, 0xff, "xAPIC id in bits 47:40");
    assert_eq!(model.remap(route.handle), Some((0x29, 0xff)));
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
