//! The unit driver against a register-level model of an AMD-Vi unit:
//! registers with QEMU's write semantics (Status W1C, head/tail pointer
//! masks, the command head left at the ring size after the last slot), a
//! command processor that consumes the buffer on tail writes (or slowly,
//! one command per clock tick), completion-wait stores, a QEMU-like IOTLB
//! (cached per device and page, tagged and dropped by domain), and an event
//! log the test appends to, with overflow.

use amdvi::cmd::{self, PageRange};
use amdvi::event::{self, Event, flags};
use amdvi::regs::{self, Control, Status};
use amdvi::testing::{Dma, QEMU_EFR, RegisterModel};
use amdvi::unit::RING_BYTES;
use amdvi::{Command, ContiguousMemory, DeviceTableEntry, Error, HwError, Unit};
use io_pgtable::{HeapTables, TableMemory};
use portcullis_iommu::testing::{DeviceMemory, TickClock};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------------
// Memory: heap tables plus contiguous runs at their own fake addresses.
// ---------------------------------------------------------------------------

const CONTIG_BASE: u64 = 0x40_0000_0000;

struct MemInner {
    heap: HeapTables,
    runs: BTreeMap<u64, Vec<[u64; 512]>>,
    next_run: u64,
    attempts: u64,
    fail_at: Option<u64>,
    coherent: bool,
    flushes: Vec<(u64, u64)>,
    /// Every table write, in order: (table, word index, value).
    writes: Vec<(u64, usize, u64)>,
}

#[derive(Clone)]
struct Mem(Arc<Mutex<MemInner>>);

impl Mem {
    fn new(coherent: bool) -> Self {
        Self(Arc::new(Mutex::new(MemInner {
            heap: HeapTables::new(coherent),
            runs: BTreeMap::new(),
            next_run: CONTIG_BASE,
            attempts: 0,
            fail_at: None,
            coherent,
            flushes: Vec::new(),
            writes: Vec::new(),
        })))
    }
    /// Tables and contiguous pages allocated and not freed.
    fn live(&self) -> usize {
        let m = self.0.lock().unwrap();
        m.heap.live_tables() + m.runs.values().map(Vec::len).sum::<usize>()
    }
    fn attempts(&self) -> u64 {
        self.0.lock().unwrap().attempts
    }
    fn fail_nth(&self, n: u64) {
        let mut m = self.0.lock().unwrap();
        m.fail_at = Some(m.attempts + n);
    }
    fn take_flushes(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.0.lock().unwrap().flushes)
    }
    fn phys_read(&self, addr: u64) -> u64 {
        self.read(addr & !0xfff, ((addr & 0xfff) / 8) as usize)
    }
    fn phys_write(&self, addr: u64, v: u64) {
        self.clone().write(addr & !0xfff, ((addr & 0xfff) / 8) as usize, v)
    }
    fn try_alloc(m: &mut MemInner) -> bool {
        m.attempts += 1;
        if m.fail_at == Some(m.attempts) {
            m.fail_at = None;
            return false;
        }
        true
    }
}

impl MemInner {
    fn run_page(&mut self, page: u64) -> Option<&mut [u64; 512]> {
        let (&base, run) = self.runs.range_mut(..=page).next_back()?;
        run.get_mut(((page - base) / 4096) as usize)
    }
}

impl TableMemory for Mem {
    fn alloc_table(&mut self) -> Option<u64> {
        let mut m = self.0.lock().unwrap();
        if !Self::try_alloc(&mut m) {
            return None;
        }
        m.heap.alloc_table()
    }
    fn free_table(&mut self, t: u64) {
        self.0.lock().unwrap().heap.free_table(t)
    }
    fn read(&self, t: u64, i: usize) -> u64 {
        let mut m = self.0.lock().unwrap();
        if t >= CONTIG_BASE {
            return m.run_page(t).expect("read of a page that is not allocated")[i];
        }
        m.heap.read(t, i)
    }
    fn write(&mut self, t: u64, i: usize, v: u64) {
        let mut m = self.0.lock().unwrap();
        m.writes.push((t, i, v));
        if t >= CONTIG_BASE {
            m.run_page(t).expect("write to a page that is not allocated")[i] = v;
        } else {
            m.heap.write(t, i, v)
        }
    }
    fn coherent(&self) -> bool {
        self.0.lock().unwrap().coherent
    }
    fn flush(&mut self, p: u64, l: u64) {
        self.0.lock().unwrap().flushes.push((p, l));
    }
}

impl DeviceMemory for Mem {
    fn read_u64(&self, phys: u64) -> u64 {
        self.phys_read(phys)
    }
    fn write_u64(&self, phys: u64, value: u64) {
        self.phys_write(phys, value)
    }
}

impl ContiguousMemory for Mem {
    fn alloc_contiguous(&mut self, pages: usize) -> Option<u64> {
        let mut m = self.0.lock().unwrap();
        if !Self::try_alloc(&mut m) {
            return None;
        }
        let base = m.next_run;
        m.next_run += pages as u64 * 4096 + 4096;
        m.runs.insert(base, vec![[0; 512]; pages]);
        Some(base)
    }
    fn free_contiguous(&mut self, base: u64, pages: usize) {
        let run = self.0.lock().unwrap().runs.remove(&base).expect("free of an unknown run");
        assert_eq!(run.len(), pages, "freed with another page count");
    }
}

type TestUnit = Unit<RegisterModel, Mem, TickClock>;
type Model = RegisterModel;

/// The register base the test unit is named by.
const BASE: u64 = 0xfeb8_0000;

struct Setup {
    efr: u64,
    last: u16,
    coherent: bool,
    lazy: bool,
    stuck: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self { efr: QEMU_EFR, last: 0xff, coherent: true, lazy: false, stuck: false }
    }
}

fn build(s: Setup) -> (Model, Mem, TestUnit) {
    let mem = Mem::new(s.coherent);
    let model = RegisterModel::new(s.efr, Arc::new(mem.clone()));
    (model.state().lazy, model.state().stuck) = (s.lazy, s.stuck);
    // 1 µs per reading; with a lazy model each reading also lets the
    // hardware run one command.
    let ticked = model.clone();
    let clock = TickClock::new().on_read(move || {
        let lazy = ticked.state().lazy;
        if lazy {
            ticked.run(1);
        }
    });
    let u = Unit::new(BASE, model.clone(), mem.clone(), clock, s.last);
    (model, mem, u)
}

fn unit() -> (Model, Mem, TestUnit) {
    build(Setup::default())
}

fn enabled() -> (Model, Mem, TestUnit) {
    let (model, mem, mut u) = unit();
    u.enable().unwrap();
    model.processed();
    (model, mem, u)
}

const ROOT: u64 = 0x1234_5000;
const PDE: u64 = cmd::pages::PDE;

fn pages_cmd(domain: u16, w1: u64) -> Command {
    Command([0x3000_0000_0000_0000 | (domain as u64) << 32, w1])
}

fn opcodes(cmds: &[Command]) -> Vec<u8> {
    cmds.iter().map(|c| c.opcode()).collect()
}

// ---------------------------------------------------------------------------
// Bring-up.
// ---------------------------------------------------------------------------

#[test]
fn bring_up_programs_everything_before_iommu_en_with_every_entry_blocked() {
    let (model, mem, mut u) = unit();
    assert!(!u.is_enabled());
    u.enable().unwrap();
    let hw = model.state();
    let order: Vec<usize> = hw.writes.iter().map(|w| w.0).collect();
    let pos = |off: usize| order.iter().position(|&o| o == off).unwrap();
    let en = hw
        .writes
        .iter()
        .position(|w| w.0 == 0x18 && Control::from_bits_retain(w.1).contains(Control::IOMMU_EN))
        .unwrap();
    for off in [0x0, 0x8, 0x10, 0x20, 0x28, 0x2000, 0x2008, 0x2010, 0x2018] {
        assert!(pos(off) < en, "register {off:#x} programmed before IommuEn");
    }
    assert_eq!(hw.unblocked_at_enable, Some(0), "every entry blocked when translation starts");
    // 256 device ids -> 8 KiB -> two pages, Size = 1.
    assert_eq!(hw.dev_table & 0x1ff, 1);
    assert_eq!(u.dev_table_pages(), 2);
    assert_eq!(hw.cmd_base >> 56, 8, "ComLen: 256 entries");
    assert_eq!(hw.evt_base >> 56, 8, "EventLen: 256 entries");
    assert_eq!(hw.excl[0] & 1, 0, "exclusion range off");
    let want = Control::IOMMU_EN | Control::CMD_BUF_EN | Control::EVENT_LOG_EN | Control::COHERENT;
    assert_eq!(hw.control, want);
    let processed: Vec<Command> = hw.log.iter().map(|l| l.command).collect();
    assert_eq!(opcodes(&processed), [cmd::INVALIDATE_IOMMU_ALL, cmd::COMPLETION_WAIT]);
    assert_eq!(hw.illegal_commands, 0);
    drop(hw);
    assert_eq!((u.stats.commands, u.stats.waits), (1, 1));
    assert_eq!(mem.live(), 2 + 3, "device table pages, command buffer, event log, wait page");
    for d in [0, 0x18, 0xff] {
        assert_eq!(u.dte(d).unwrap(), DeviceTableEntry::blocked());
        assert_eq!(model.dma(d, 0x1000), Dma::Blocked);
    }
    assert_eq!(u.dte(0x100), None, "beyond the table");
    u.disable().unwrap();
    assert_eq!(mem.live(), 0);
    assert!(!model.state().control.intersects(Control::IOMMU_EN | Control::CMD_BUF_EN));
}

#[test]
fn device_table_is_sized_in_whole_pages() {
    for (last, pages) in [(0u16, 1usize), (0x7f, 1), (0x80, 2), (0xffff, 512)] {
        let (model, _, mut u) = build(Setup { last, ..Setup::default() });
        assert_eq!(u.dev_table_pages(), pages);
        u.enable().unwrap();
        assert_eq!((model.state().dev_table & 0x1ff) as usize, pages - 1);
        assert_eq!(model.state().unblocked_at_enable, Some(0));
    }
}

#[test]
fn without_invalidate_all_enable_flushes_each_entry_and_domain_zero() {
    let (model, _, mut u) = build(Setup { efr: QEMU_EFR & !amdvi::caps::efr::IA, ..Setup::default() });
    u.enable().unwrap();
    let p = model.processed();
    assert_eq!(p.len(), 256 + 1 + 1, "more than the ring holds: written in chunks");
    for (d, c) in p[..256].iter().enumerate() {
        assert_eq!(*c, Command::invalidate_devtab_entry(d as u16));
    }
    assert_eq!(p[256], pages_cmd(0, 0x7fff_ffff_ffff_f000 | PDE | 1));
    assert_eq!(p[257].opcode(), cmd::COMPLETION_WAIT);
    assert_eq!(u.stats.waits, 1);
    // A fresh domain id is flushed before use on such a unit.
    let d = u.alloc_domain_id().unwrap();
    assert_eq!(model.processed()[0], pages_cmd(d, 0x7fff_ffff_ffff_f003));
}

#[test]
fn firmware_left_on_is_turned_off_first() {
    let (model, _, mut u) = unit();
    model.state().control = Control::IOMMU_EN | Control::CMD_BUF_EN;
    u.enable().unwrap();
    let hw = model.state();
    assert_eq!(hw.writes[0], (0x18, 0), "control cleared before anything else");
}

// ---------------------------------------------------------------------------
// Device table entries.
// ---------------------------------------------------------------------------

#[test]
fn attach_and_detach_write_the_entry_and_flush_the_old_domain() {
    let (model, _, mut u) = enabled();
    let d = u.alloc_domain_id().unwrap();
    assert_eq!(d, 1);
    u.attach(0x18, ROOT, 4, d).unwrap();
    let e = u.dte(0x18).unwrap();
    assert_eq!(e.0, [0x6000_0000_1234_5803, 1, 1, 0], "V TV Mode=4 root IR IW; DomainID 1; IV with IntCtl abort");
    assert_eq!(u.attached_domain(0x18), Some(1));
    assert_eq!(u.attached_domain(0x10), None);
    let p = model.processed();
    assert_eq!(p[..2], [Command::invalidate_devtab_entry(0x18), pages_cmd(0, 0x7fff_ffff_ffff_f003)]);
    assert_eq!(opcodes(&p[2..]), [cmd::COMPLETION_WAIT]);
    assert_eq!(model.dma(0x18, 0x5000), Dma::Translated { domain: 1, root: ROOT });
    assert_eq!(model.dma(0x10, 0x5000), Dma::Blocked, "other devices stay blocked");

    // The translation is cached; detaching must drop it even though the
    // unit ignores INVALIDATE_DEVTAB_ENTRY.
    u.detach(0x18).unwrap();
    assert_eq!(u.dte(0x18).unwrap(), DeviceTableEntry::blocked());
    let p = model.processed();
    assert_eq!(p[..2], [Command::invalidate_devtab_entry(0x18), pages_cmd(1, 0x7fff_ffff_ffff_f003)]);
    assert_eq!(model.dma(0x18, 0x5000), Dma::Blocked, "no stale IOTLB entry");
    assert_eq!(u.attached_domain(0x18), None);
    // Detaching a blocked device changes nothing and issues nothing.
    let before = u.stats;
    u.detach(0x18).unwrap();
    assert_eq!(u.stats, before);
    assert_eq!(model.state().illegal_commands, 0);
}

#[test]
fn moving_a_device_between_domains_flushes_the_first() {
    let (model, _, mut u) = enabled();
    let (a, b) = (u.alloc_domain_id().unwrap(), u.alloc_domain_id().unwrap());
    u.attach(0x20, ROOT, 3, a).unwrap();
    assert_eq!(model.dma(0x20, 0x7000), Dma::Translated { domain: a, root: ROOT });
    model.processed();
    u.attach(0x20, 0x8000, 4, b).unwrap();
    assert_eq!(model.processed()[1], pages_cmd(a, 0x7fff_ffff_ffff_f003));
    assert_eq!(model.dma(0x20, 0x7000), Dma::Translated { domain: b, root: 0x8000 });
    assert_eq!(u.attached_domain(0x20), Some(b));
}

#[test]
fn pass_through_entry() {
    let (model, _, mut u) = enabled();
    u.pass_through(0x08).unwrap();
    assert_eq!(u.dte(0x08).unwrap().0, [0x6000_0000_0000_0003, 0, 1, 0]);
    assert_eq!(model.dma(0x08, 0xdead_b000), Dma::Untranslated);
    assert_eq!(u.attached_domain(0x08), None);
    u.detach(0x08).unwrap();
    assert_eq!(model.dma(0x08, 0xdead_b000), Dma::Blocked);
}

#[test]
fn bad_arguments_are_refused_with_the_unit_named() {
    let (_, _, mut u) = unit();
    assert_eq!(u.base(), BASE);
    assert_eq!(u.attach(0, ROOT, 4, 1), Err(Error { unit: BASE, cause: HwError::NotEnabled }));
    u.enable().unwrap();
    let e = u.attach(0x100, ROOT, 4, 1).unwrap_err();
    assert_eq!(e, Error { unit: BASE, cause: HwError::NoSuchDevice { device_id: 0x100, last_device_id: 0xff } });
    assert!(e.to_string().starts_with("IOMMU unit at 0xfeb80000: device id 0x0100"), "{e}");
    assert!(matches!(u.attach(1, ROOT, 7, 1), Err(Error { cause: HwError::Unsupported(_), .. })));
    assert!(matches!(u.attach(1, ROOT | 0x800, 4, 1), Err(Error { cause: HwError::Invalid(_), .. })));
    assert!(matches!(u.attach(1, ROOT, 0, 1), Err(Error { cause: HwError::Invalid(_), .. })));
    assert!(matches!(u.attach(1, ROOT, 4, 0), Err(Error { cause: HwError::Invalid(_), .. })));
    assert!(matches!(u.attach(1, ROOT, 4, 0x100), Err(Error { cause: HwError::Invalid(_), .. })));
    assert!(matches!(u.invalidate_range(1, 0x2000, 0x1000), Err(Error { cause: HwError::Invalid(_), .. })));
    // A unit whose HATS allows only 4 levels refuses 5.
    let (_, _, mut small) = build(Setup { efr: 0, ..Setup::default() });
    small.enable().unwrap();
    assert!(matches!(small.attach(1, ROOT, 5, 1), Err(Error { cause: HwError::Unsupported(_), .. })));
    small.attach(1, ROOT, 4, 1).unwrap();
}

#[test]
fn domain_ids_skip_zero_and_bit_8_and_are_reused() {
    let (_, _, mut u) = enabled();
    let ids: Vec<u16> = (0..300).map(|_| u.alloc_domain_id().unwrap()).collect();
    assert!(ids.iter().all(|&d| amdvi::unit::usable_domain_id(d)));
    assert_eq!(ids[254], 255);
    assert_eq!(ids[255], 0x200, "0x100..=0x1ff skipped");
    u.free_domain_id(7);
    u.free_domain_id(0);
    assert_eq!(u.alloc_domain_id().unwrap(), 7);
    let mut n = 300;
    while u.alloc_domain_id().is_ok() {
        n += 1;
    }
    assert_eq!(n, 32767);
    assert!(matches!(u.alloc_domain_id(), Err(Error { cause: HwError::NoDomainId, .. })));
}

#[test]
fn non_coherent_units_get_every_changed_line_flushed() {
    let (model, mem, mut u) = build(Setup { coherent: false, ..Setup::default() });
    assert!(u.flushes());
    u.enable().unwrap();
    let dt = model.state().dev_table & regs::BASE_MASK;
    let f = mem.take_flushes();
    assert!(f.contains(&(dt, 2 * 4096)), "whole device table before IommuEn: {f:x?}");
    u.attach(0x81, ROOT, 4, 1).unwrap();
    let f = mem.take_flushes();
    assert!(f.contains(&(dt + 0x81 * 32, 32)), "the changed entry: {f:x?}");
    let cmd_base = model.state().cmd_base & regs::BASE_MASK;
    assert!(f.iter().any(|&(p, _)| p & !0xfff == cmd_base), "the commands written: {f:x?}");
    // Coherent unit and memory: nothing flushed.
    let (_, mem, mut u) = enabled();
    mem.take_flushes();
    u.attach(0x81, ROOT, 4, 1).unwrap();
    assert!(mem.take_flushes().is_empty());
    // The unit's Coherent flag alone also forces flushes.
    let (model, _, mut u) = unit();
    u.set_coherent(false);
    u.enable().unwrap();
    assert!(u.flushes());
    assert!(!model.state().control.contains(Control::COHERENT));
}

// ---------------------------------------------------------------------------
// Invalidation.
// ---------------------------------------------------------------------------

#[test]
fn range_invalidations_use_the_size_encoding() {
    let (model, _, mut u) = enabled();
    let cases: [(u64, u64, &[u64]); 6] = [
        // One page.
        (0x1000, 0x1fff, &[0x1000 | PDE]),
        // 2 MiB aligned: bits 12..19 set, S.
        (0x20_0000, 0x3f_ffff, &[0x2f_f000 | PDE | 1]),
        // 3 + 4 + 1... pages: 0x3000, 0x4000-0x7fff, 0x8000.
        (0x3000, 0x8fff, &[0x3000 | PDE, 0x5000 | PDE | 1, 0x8000 | PDE]),
        // Unaligned inside a page: the page.
        (0x4_0123, 0x4_0456, &[0x4_0000 | PDE]),
        // Needs more than 8 exact blocks: one 128 MiB block at 0 covers it.
        (0x1000, 0x7fe_ffff, &[0x3ff_f000 | PDE | 1]),
        // Everything.
        (0, u64::MAX, &[0x7fff_ffff_ffff_f000 | PDE | 1]),
    ];
    for (start, last, words) in cases {
        let before = u.stats;
        u.invalidate_range(9, start, last).unwrap();
        let p = model.processed();
        let want: Vec<Command> = words.iter().map(|&w| pages_cmd(9, w)).collect();
        assert_eq!(p[..p.len() - 1], want[..], "[{start:#x}, {last:#x}]");
        assert_eq!(p.last().unwrap().opcode(), cmd::COMPLETION_WAIT);
        assert_eq!(u.stats.waits - before.waits, 1, "one wait per call");
        assert_eq!(u.stats.commands - before.commands, words.len() as u64);
    }
    assert_eq!(model.state().illegal_commands, 0, "no reserved bit set");
    // The decoded ranges cover the request.
    for c in cmd::range_commands(1, 0x3000, 0x8fff) {
        assert!(matches!(PageRange::decode(c.0[1]), PageRange::Block { .. }));
    }
}

#[test]
fn invalidate_all_is_one_command_and_one_wait() {
    let (model, mem, mut u) = enabled();
    u.invalidate_all().unwrap();
    assert_eq!(model.processed(), [Command::invalidate_all(), model_wait(&mem, 2)]);
}

/// The completion wait the unit issues as its `seq`th (the wait page is
/// the third heap page `enable` allocates, after the two rings).
fn model_wait(mem: &Mem, seq: u64) -> Command {
    let addr = mem.0.lock().unwrap().heap.live_addresses()[2];
    Command::completion_wait(addr, seq)
}

#[test]
fn completion_waits_store_a_fresh_sequence_number_and_the_ring_wraps() {
    let (model, _, mut u) = enabled();
    for i in 0..1000u64 {
        let start = (i * 7919 % 4096) << 12;
        u.invalidate_range(2, start, start + (i % 5) * 0x1000 + 0xfff).unwrap();
    }
    let p = model.processed();
    let waits: Vec<u64> = p.iter().filter(|c| c.opcode() == cmd::COMPLETION_WAIT).map(|c| c.0[1]).collect();
    assert_eq!(waits.len(), 1000);
    assert!(waits.windows(2).all(|w| w[1] == w[0] + 1), "sequence numbers increase by one");
    let hw = model.state();
    assert!(p.len() as u64 * 16 > 4 * RING_BYTES, "wrapped several times");
    assert!(hw.head_at_ring_end_seen, "the head register read as the ring size at least once");
    assert_eq!((hw.overruns, hw.illegal_commands), (0, 0));
    assert_eq!(u.stats.waits, 1001);
}

#[test]
fn a_slow_unit_is_never_overrun() {
    // One command per clock tick: the producer must wait for room.
    let (model, _, mut u) =
        build(Setup { efr: QEMU_EFR & !amdvi::caps::efr::IA, last: 0x3ff, lazy: true, ..Setup::default() });
    u.enable().unwrap();
    let p = model.processed();
    assert_eq!(p.len(), 1024 + 2);
    assert!(p[..1024].iter().enumerate().all(|(d, c)| *c == Command::invalidate_devtab_entry(d as u16)));
    assert_eq!(model.state().overruns, 0);
    u.attach(0x3ff, ROOT, 4, 1).unwrap();
    assert_eq!(opcodes(&model.processed()), [2, 3, 1]);
}

// ---------------------------------------------------------------------------
// Timeouts.
// ---------------------------------------------------------------------------

#[test]
fn a_unit_that_never_runs_times_out_and_leaves_nothing_behind() {
    let (model, mem, mut u) = build(Setup { stuck: true, ..Setup::default() });
    match u.enable() {
        Err(Error { unit, cause: HwError::Timeout { register, waited_ns } }) => {
            assert_eq!(unit, BASE);
            assert_eq!(register, "Status.CmdBufRun");
            assert!(waited_ns > amdvi::unit::TIMEOUT_NS);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(mem.live(), 0);
    assert_eq!(model.state().control, Control::empty());
    assert!(!u.is_enabled());
}

#[test]
fn a_unit_that_stops_mid_way_times_out_on_the_completion_wait() {
    let (model, _, mut u) = enabled();
    model.state().stuck = true;
    let e = u.invalidate_range(1, 0, 0xfff).unwrap_err();
    assert!(
        matches!(e.cause, HwError::Timeout { register: "Command Buffer Head (COMPLETION_WAIT store)", .. }),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("IOMMU unit at 0xfeb80000: timed out after"), "{e}");
    // The ring is now partly full; the next batches fill it and then the
    // producer waits for room.
    let mut last = None;
    for _ in 0..200 {
        if let Err(e) = u.invalidate_range(1, 0, 0xfff) {
            last = Some(e);
            if matches!(last, Some(Error { cause: HwError::Timeout { register: "Command Buffer Head", .. }, .. })) {
                break;
            }
        }
    }
    assert!(
        matches!(last, Some(Error { cause: HwError::Timeout { register: "Command Buffer Head", .. }, .. })),
        "{last:?}"
    );
    assert_eq!(model.state().overruns, 0);
}

// ---------------------------------------------------------------------------
// Command errors.
// ---------------------------------------------------------------------------

/// An enabled unit whose clock counts its readings (each one a poll of a
/// hardware wait: a 100 ms timeout takes 100 000 of them).
fn counted() -> (Model, Mem, TestUnit, Arc<AtomicU64>) {
    let mem = Mem::new(true);
    let model = RegisterModel::new(QEMU_EFR, Arc::new(mem.clone()));
    let reads = Arc::new(AtomicU64::new(0));
    let counter = reads.clone();
    let clock = TickClock::new().on_read(move || {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let mut u = Unit::new(BASE, model.clone(), mem.clone(), clock, 0xff);
    u.enable().unwrap();
    model.processed();
    (model, mem, u, reads)
}

/// Where the unit's command buffer is, and the tail it has reached.
fn ring(model: &Model) -> (u64, u64) {
    let hw = model.state();
    (hw.cmd_base & regs::BASE_MASK, hw.cmd_tail)
}

/// The spec's unit stops at an illegal command with CmdBufRun clear: the
/// batch fails at once with the Status register (no 100 ms timeout), the
/// rest of it is dropped, the command buffer restarted (CmdBufEn cleared,
/// the head set to the tail, CmdBufEn set), and the next batch runs.
#[test]
fn an_illegal_command_fails_its_batch_at_once_and_the_ring_restarts() {
    // The invalidation itself, then the completion wait after it.
    for n in [1usize, 2] {
        let (model, _, mut u, reads) = counted();
        let (base, tail) = ring(&model);
        model.state().fail_command = Some(n as u32);
        let before = reads.load(Ordering::Relaxed);
        let e = u.invalidate_range(1, 0, 0xfff).unwrap_err();
        assert_eq!(e, Error { unit: BASE, cause: HwError::QueueError { status: Status::EVENT_LOG_RUN.bits() as u32 } });
        assert!(reads.load(Ordering::Relaxed) - before < 1000, "failed at once, not after a timeout");
        assert_eq!(opcodes(&model.processed()), [cmd::INVALIDATE_IOMMU_PAGES][..n - 1], "what ran before it");
        {
            let hw = model.state();
            assert!(!hw.halted && hw.status.contains(Status::CMD_BUF_RUN), "restarted");
            assert_eq!(hw.cmd_head, hw.cmd_tail, "the rest of the batch dropped");
            assert_eq!(hw.head_writes_while_enabled, 0, "the head written only while CmdBufEn was clear");
        }
        assert!(
            model
                .state()
                .writes
                .iter()
                .any(|&(o, v)| o == regs::CONTROL.offset()
                    && !Control::from_bits_retain(v).contains(Control::CMD_BUF_EN))
        );
        // The event names the command the unit stopped at.
        assert_eq!(u.poll_events(), [Event::IllegalCommand { address: base + tail + 16 * (n as u64 - 1) }]);
        // Later batches run.
        u.invalidate_range(1, 0, 0xfff).unwrap();
        assert_eq!(opcodes(&model.processed()), [cmd::INVALIDATE_IOMMU_PAGES, cmd::COMPLETION_WAIT]);
        u.attach(0x10, ROOT, 4, 2).unwrap();
        assert_eq!(u.attached_domain(0x10), Some(2));
        assert_eq!(model.state().illegal_commands, 1);
    }
}

/// QEMU logs ILLEGAL_COMMAND_ERROR and runs on (CmdBufRun stays set, the
/// completion wait stores): the event naming a slot of the batch fails
/// it all the same. It is held against no later batch, stays for
/// `poll_events`, and an event naming another slot fails nothing.
#[test]
fn a_logged_illegal_command_fails_its_batch_on_a_unit_that_runs_on() {
    let (model, _, mut u, reads) = counted();
    let (base, first) = ring(&model);
    model.state().qemu_illegal_commands = true;
    // A command error naming the slot before this batch's: not its own.
    let old = Event::IllegalCommand { address: base + first - 16 };
    assert!(model.log_event(Event::encode(event::ILLEGAL_COMMAND_ERROR, 0, 0, 0, base + first - 16)));
    u.invalidate_range(1, 0, 0xfff).unwrap();
    model.processed();
    let (_, tail) = ring(&model);
    model.state().fail_command = Some(1);
    let before = reads.load(Ordering::Relaxed);
    let e = u.invalidate_range(1, 0, 0xfff).unwrap_err();
    assert!(reads.load(Ordering::Relaxed) - before < 1000, "failed at once, not after a timeout");
    match e.cause {
        HwError::QueueError { status } => {
            assert!(Status::from_bits_retain(status as u64).contains(Status::CMD_BUF_RUN), "{status:#x}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(opcodes(&model.processed()), [cmd::INVALIDATE_IOMMU_PAGES, cmd::COMPLETION_WAIT], "QEMU ran both");
    u.invalidate_range(1, 0, 0xfff).unwrap();
    assert_eq!(opcodes(&model.processed()), [cmd::INVALIDATE_IOMMU_PAGES, cmd::COMPLETION_WAIT]);
    let hw = model.state();
    assert!(hw.status.contains(Status::CMD_BUF_RUN));
    assert_eq!((hw.cmd_head, hw.head_writes_while_enabled), (hw.cmd_tail, 0));
    drop(hw);
    assert_eq!(u.poll_events(), [old, Event::IllegalCommand { address: base + tail }]);
}

/// A unit whose command processor does not run again after the restart
/// that follows an illegal command: the batch's caller hears it as a
/// timeout on CmdBufRun (the unit runs no command now), not as the
/// command error alone; once the unit can restart, the next batch finds
/// it stopped, restarts it and fails, and the one after runs.
#[test]
fn a_ring_that_does_not_restart_is_a_timeout_for_the_failed_batch() {
    let (model, _, mut u, _) = counted();
    model.state().fail_command = Some(1);
    model.state().stays_halted = true;
    match u.invalidate_range(1, 0, 0xfff).unwrap_err().cause {
        HwError::Timeout { register: "Status.CmdBufRun", .. } => {}
        other => panic!("{other:?}"),
    }
    assert!(model.state().halted);
    model.state().stays_halted = false;
    assert!(matches!(u.invalidate_range(1, 0, 0xfff).unwrap_err().cause, HwError::QueueError { .. }));
    model.processed();
    u.invalidate_range(1, 0, 0xfff).unwrap();
    assert_eq!(opcodes(&model.processed()), [cmd::INVALIDATE_IOMMU_PAGES, cmd::COMPLETION_WAIT]);
}

/// A batch longer than the ring whose first part stops at an illegal
/// command fails while waiting for room, not 100 ms later.
#[test]
fn a_long_batch_stopped_in_its_first_part_fails_without_waiting_for_room() {
    let (model, mem, mut u) = build(Setup { efr: QEMU_EFR & !amdvi::caps::efr::IA, last: 0x3ff, ..Setup::default() });
    model.state().fail_command = Some(10);
    match u.enable() {
        Err(Error { unit: BASE, cause: HwError::QueueError { status } }) => {
            assert!(!Status::from_bits_retain(status as u64).contains(Status::CMD_BUF_RUN))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(model.processed().len(), 9);
    assert_eq!(mem.live(), 0, "a failed enable leaves nothing behind");
    assert!(!u.is_enabled());
    u.enable().unwrap();
}

/// An interrupt table whose release met an illegal command stays
/// allocated (the unit may still hold entries from it), and the next
/// route works.
#[test]
fn a_release_that_meets_an_illegal_command_frees_nothing() {
    let (model, mem, mut u, _) = counted();
    let live = |t: u64| mem.0.lock().unwrap().heap.is_live(t);
    u.route_interrupt(0x18, 0x2b, 0).unwrap();
    let Some(amdvi::Interrupts::Remapped { table, .. }) = u.dte(0x18).unwrap().interrupts() else { panic!() };
    model.state().fail_command = Some(4);
    let e = u.release_interrupts(0x18).unwrap_err();
    assert!(matches!(e.cause, HwError::QueueError { .. }), "{e:?}");
    assert!(live(table), "a release the unit did not confirm frees nothing");
    assert_eq!(u.route_interrupt(0x20, 0x2c, 0).unwrap(), 0);
}

// ---------------------------------------------------------------------------
// Events.
// ---------------------------------------------------------------------------

#[test]
fn events_are_decoded_the_head_advances_and_entries_are_cleared() {
    let (model, mem, mut u) = enabled();
    let fault = Event::encode(event::IO_PAGE_FAULT, 0x18, 1, flags::RW | flags::PE | flags::PR, 0xabc_d000);
    let illegal = Event::encode(event::ILLEGAL_DEV_TABLE_ENTRY, 0x20, 0, flags::I, 0xfee0_0000);
    let other = Event::encode(event::PAGE_TAB_HARDWARE_ERROR, 0x18, 0, 0, 0x5000);
    for e in [fault, illegal, other] {
        assert!(model.log_event(e));
    }
    let got = u.poll_events();
    assert_eq!(
        got,
        [
            Event::IoPageFault { device_id: 0x18, domain_id: 1, address: 0xabc_d000, flags: 0x70 },
            Event::IllegalDevTableEntry { device_id: 0x20, address: 0xfee0_0000, flags: flags::I },
            Event::Other { code: event::PAGE_TAB_HARDWARE_ERROR, raw: other },
        ]
    );
    let hw = model.state();
    assert_eq!(hw.evt_head, 48);
    let base = hw.evt_base & regs::BASE_MASK;
    drop(hw);
    assert!((0..6).all(|i| mem.phys_read(base + i * 8) == 0), "read entries cleared");
    assert!(u.poll_events().is_empty());
    assert_eq!(u.event_log().0.len(), 3);
    assert_eq!(got[0].to_string(), "IO_PAGE_FAULT: DMA write from 00:03.0 domain 1 at 0xabcd000 PR PE");
}

#[test]
fn an_entry_not_yet_written_is_read_on_the_next_poll() {
    let (model, mem, mut u) = enabled();
    let (base, tail) = {
        let mut hw = model.state();
        hw.evt_tail = 16; // tail moved, entry still zero
        (hw.evt_base & regs::BASE_MASK, hw.evt_tail)
    };
    assert!(u.poll_events().is_empty());
    assert_eq!(model.state().evt_head, 0, "head not advanced past an unwritten entry");
    let raw = Event::encode(event::IO_PAGE_FAULT, 8, 2, 0, 0x1000);
    mem.phys_write(base, raw[0]);
    mem.phys_write(base + 8, raw[1]);
    assert_eq!(u.poll_events().len(), 1);
    assert_eq!(model.state().evt_head, tail);
}

#[test]
fn overflow_is_counted_and_logging_restarts() {
    let (model, _, mut u) = enabled();
    let mut logged = 0;
    for i in 0..300u64 {
        if model.log_event(Event::encode(event::IO_PAGE_FAULT, 8, 1, 0, i << 12)) {
            logged += 1;
        }
    }
    assert_eq!(logged, 255, "a 256-entry ring holds 255");
    let st = model.state().status;
    assert!(st.contains(Status::EVENT_OVERFLOW));
    assert!(!st.contains(Status::EVENT_LOG_RUN), "logging stopped");
    let got = u.poll_events();
    assert_eq!(got.len(), 255);
    assert_eq!(got[254], Event::IoPageFault { device_id: 8, domain_id: 1, address: 254 << 12, flags: 0 });
    assert_eq!(u.event_log().1, 1, "one overflow");
    let st = model.state().status;
    assert!(!st.contains(Status::EVENT_OVERFLOW), "cleared");
    assert!(st.contains(Status::EVENT_LOG_RUN), "restarted");
    // The log wraps and keeps working; the kept log is bounded.
    for round in 0..3u64 {
        for i in 0..200u64 {
            assert!(model.log_event(Event::encode(event::IO_PAGE_FAULT, 8, 1, 0, (round * 1000 + i) << 12)));
        }
        assert_eq!(u.poll_events().len(), 200);
    }
    let (log, overflows) = u.event_log();
    assert_eq!((log.len(), overflows), (amdvi::unit::EVENT_LOG_KEEP, 1));
    assert_eq!(
        log.last().map(|e| e.to_string()),
        Some("IO_PAGE_FAULT: DMA read from 00:01.0 domain 1 at 0x897000".into())
    );
}

// ---------------------------------------------------------------------------
// Out of memory.
// ---------------------------------------------------------------------------

#[test]
fn out_of_memory_at_each_allocation_leaves_nothing_behind() {
    let mut failures = 0;
    for n in 1.. {
        let (model, mem, mut u) = unit();
        mem.fail_nth(n);
        match u.enable() {
            Err(Error { unit, cause: HwError::NoMemory }) => {
                assert_eq!(unit, BASE);
                assert_eq!(mem.live(), 0, "failure at allocation {n}");
                assert!(!u.is_enabled());
                let hw = model.state();
                assert!(!hw.control.contains(Control::IOMMU_EN), "translation never turned on");
                failures += 1;
            }
            Ok(()) => {
                // Past the last allocation: attach and detach allocate
                // nothing, so an armed failure cannot hit them.
                let attempts = mem.attempts();
                mem.fail_nth(1);
                u.attach(0x10, ROOT, 4, 1).unwrap();
                u.detach(0x10).unwrap();
                u.invalidate_range(1, 0, 0xfff).unwrap();
                assert_eq!(mem.attempts(), attempts);
                u.disable().unwrap();
                assert_eq!(mem.live(), 0);
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(failures, 4, "device table, command buffer, event log, wait page");
}

#[test]
fn enable_is_idempotent_and_disable_needs_enable() {
    let (model, mem, mut u) = enabled();
    u.enable().unwrap();
    assert!(model.processed().is_empty());
    assert_eq!(mem.live(), 5);
    u.disable().unwrap();
    assert!(matches!(u.disable(), Err(Error { cause: HwError::NotEnabled, .. })));
    assert!(u.poll_events().is_empty());
    // And again from scratch.
    u.enable().unwrap();
    assert_eq!(u.dte(0).unwrap(), DeviceTableEntry::blocked());
}

#[test]
fn interrupt_routes_live_in_a_per_device_table() {
    use amdvi::irte::Irte;
    use amdvi::{DeviceTableEntry, Interrupts};
    let (model, mem, mut u) = enabled();
    assert_eq!(u.dte(0x10).unwrap().interrupts(), Some(Interrupts::Blocked), "every device starts blocked");
    let d = u.alloc_domain_id().unwrap();
    u.attach(0x10, ROOT, 4, d).unwrap();
    model.processed();
    let i = u.route_interrupt(0x10, 0x2b, 0).unwrap();
    assert_eq!(i, 0);
    let Some(Interrupts::Remapped { table, len_log2 }) = u.dte(0x10).unwrap().interrupts() else {
        panic!("not remapped: {:?}", u.dte(0x10))
    };
    assert_eq!(len_log2, amdvi::unit::IRQ_TABLE_LOG2);
    assert_eq!(u.dte(0x10).unwrap().0[..2], DeviceTableEntry::translated(ROOT, 4, d).unwrap().0[..2], "DMA unchanged");
    assert_eq!(u.irte(0x10, 0), Some(Irte::remapped(0x2b, 0)));
    assert_eq!(mem.read(table, 0) as u32, Irte::remapped(0x2b, 0).0, "entry 0 in the table's first word");
    let ops = opcodes(&model.processed());
    assert!(ops.contains(&cmd::INVALIDATE_INTERRUPT_TABLE), "{ops:?}");
    assert_eq!(u.route_interrupt(0x10, 0x2c, 0).unwrap(), 1, "second route, next entry");
    assert_eq!(mem.read(table, 0) >> 32, Irte::remapped(0x2c, 0).0 as u64, "entry 1 in the high half");
    // Detach keeps the routes; unroute and release undo them.
    u.detach(0x10).unwrap();
    assert_eq!(u.dte(0x10).unwrap().interrupts(), Some(Interrupts::Remapped { table, len_log2 }));
    u.unroute_interrupt(0x10, 0).unwrap();
    assert_eq!(u.irte(0x10, 0), Some(Irte::default()));
    assert_eq!(u.route_interrupt(0x10, 0x2d, 0).unwrap(), 0, "a freed entry is reused");
    u.release_interrupts(0x10).unwrap();
    assert_eq!(u.dte(0x10).unwrap(), DeviceTableEntry::blocked());
    assert_eq!(u.irte(0x10, 0), None);
    for _ in 0..64 {
        u.route_interrupt(0x18, 0x30, 0).unwrap();
    }
    assert_eq!(u.route_interrupt(0x18, 0x30, 0), Err(Error { unit: BASE, cause: HwError::TableFull }));
    assert_eq!(model.state().illegal_commands, 0);
}

const EFR_XT: u64 = amdvi::caps::efr::XT;

#[test]
fn reserved_tables_follow_the_vector_count() {
    use amdvi::Interrupts;
    use amdvi::unit::irq_table_log2;
    assert_eq!(
        [0, 1, 2, 3, 32, 37, 64, 65, 512, 513, 2048].map(irq_table_log2),
        [1, 1, 1, 2, 5, 6, 6, 7, 9, 9, 9],
        "next power of two, 2 to 512 entries"
    );
    let (model, mem, mut u) = enabled();
    let len_log2 = |u: &TestUnit, d: u16| match u.dte(d).unwrap().interrupts() {
        Some(Interrupts::Remapped { len_log2, .. }) => len_log2,
        other => panic!("{d:#x}: {other:?}"),
    };
    // One vector: two entries, then TableFull.
    u.reserve_interrupts(0x10, 1).unwrap();
    assert_eq!(u.interrupt_table_entries(0x10), None, "made on the first route");
    assert_eq!(u.route_interrupt(0x10, 0x30, 0).unwrap(), 0);
    assert_eq!(u.route_interrupt(0x10, 0x31, 0).unwrap(), 1);
    assert_eq!(u.route_interrupt(0x10, 0x32, 0), Err(Error { unit: BASE, cause: HwError::TableFull }));
    assert_eq!((len_log2(&u, 0x10), u.interrupt_table_entries(0x10)), (1, Some(2)));
    assert_eq!(u.irte(0x10, 2), None, "beyond the table");
    assert!(matches!(u.retarget_interrupt(0x10, 2, 0x33, 0), Err(Error { cause: HwError::Invalid(_), .. })));
    // A smaller reservation afterwards (another function with the same id)
    // keeps the larger table.
    u.reserve_interrupts(0x10, 1).unwrap();
    assert_eq!(u.interrupt_table_entries(0x10), Some(2));
    // 37 vectors: 64 entries; a table made before, still empty, is
    // replaced on the next route.
    u.route_interrupt(0x18, 0x30, 0).unwrap();
    u.unroute_interrupt(0x18, 0).unwrap();
    u.reserve_interrupts(0x18, 1).unwrap();
    assert_eq!(u.interrupt_table_entries(0x18), Some(64), "not smaller than before");
    u.reserve_interrupts(0x18, 100).unwrap();
    assert_eq!(u.interrupt_table_entries(0x18), None, "the empty 64-entry table went");
    for i in 0..128 {
        assert_eq!(u.route_interrupt(0x18, 0x40, 0).unwrap(), i);
    }
    assert_eq!(len_log2(&u, 0x18), 7);
    assert_eq!(u.route_interrupt(0x18, 0x40, 0), Err(Error { unit: BASE, cause: HwError::TableFull }));
    assert_eq!(remap(&model, &mem, 0x18, 127), Some((0x40, 0)));
    // 2048 MSI-X vectors: capped at 512 (QEMU remaps indexes below 512 only).
    u.reserve_interrupts(0x20, 2048).unwrap();
    for i in 0..512u16 {
        assert_eq!(u.route_interrupt(0x20, (i % 200) as u8 + 0x30, 1).unwrap(), i);
    }
    assert_eq!(len_log2(&u, 0x20), 9);
    assert_eq!(remap(&model, &mem, 0x20, 511), Some(((511 % 200) as u8 + 0x30, 1)));
    assert_eq!(u.route_interrupt(0x20, 0x30, 0), Err(Error { unit: BASE, cause: HwError::TableFull }));
    // Without a reservation: 64 entries, as before.
    u.route_interrupt(0x28, 0x30, 0).unwrap();
    assert_eq!(len_log2(&u, 0x28), amdvi::unit::IRQ_TABLE_LOG2);
    assert_eq!(model.state().illegal_commands, 0);
}

#[test]
fn a_512_entry_table_of_128_bit_entries_spans_two_contiguous_pages() {
    let (model, mem, mut u) = build(Setup { efr: QEMU_EFR | EFR_XT, ..Setup::default() });
    u.set_x2apic(true).unwrap();
    u.enable().unwrap();
    u.reserve_interrupts(0x10, 512).unwrap();
    for i in 0..512u16 {
        assert_eq!(u.route_interrupt(0x10, 0x30, i as u32 + 0x100).unwrap(), i);
    }
    assert_eq!(u.interrupt_table_entries(0x10), Some(512));
    // Entry 300 is in the second page (16 bytes each).
    assert_eq!(remap(&model, &mem, 0x10, 300), Some((0x30, 300 + 0x100)));
    assert_eq!(u.irte_ga(0x10, 511).unwrap().destination(), 511 + 0x100);
    u.retarget_interrupt(0x10, 300, 0x31, 7).unwrap();
    assert_eq!(remap(&model, &mem, 0x10, 300), Some((0x31, 7)));
    u.release_interrupts(0x10).unwrap();
    assert_eq!(u.interrupt_table_entries(0x10), None);
    assert_eq!(model.state().illegal_commands, 0);
}

/// Where the unit sends MSI data `index` of `device` (its interrupt table
/// as the device table entry in memory names it, read in the format the
/// Control register selects, as QEMU reads it): (vector, destination),
/// `None` when the entry is not remapping.
fn remap(model: &Model, mem: &Mem, device: u16, index: u16) -> Option<(u8, u32)> {
    let control = model.state().control;
    let base = model.state().dev_table & 0x000f_ffff_ffff_f000;
    let at = base + device as u64 * 32;
    let word = |k: u64| mem.read((at + 8 * k) & !0xfff, (((at + 8 * k) & 0xfff) / 8) as usize);
    let dte = amdvi::DeviceTableEntry([word(0), word(1), word(2), word(3)]);
    let Some(amdvi::Interrupts::Remapped { table, .. }) = dte.interrupts() else { return None };
    // Word `w` of a table that may span several contiguous pages.
    let word = |w: usize| mem.read(table + (w / 512) as u64 * 4096, w % 512);
    if control.contains(Control::GA_EN) {
        let lo = word(index as usize * 2);
        let hi = word(index as usize * 2 + 1);
        let high_byte = if control.contains(Control::XT_EN) { (hi >> 56) as u32 } else { 0 };
        let low = if control.contains(Control::XT_EN) { (lo >> 8) & 0xff_ffff } else { (lo >> 8) & 0xff };
        (lo & 1 != 0).then_some((hi as u8, low as u32 | high_byte << 24))
    } else {
        let e = (word(index as usize / 2) >> (32 * (index % 2))) as u32;
        (e & 1 != 0).then_some(((e >> 16) as u8, (e >> 8) & 0xff))
    }
}

impl Mem {
    /// Table writes since the last call.
    fn take_writes(&self) -> Vec<(u64, usize, u64)> {
        std::mem::take(&mut self.0.lock().unwrap().writes)
    }
}

#[test]
fn x2apic_destinations_need_xtsup_and_gasup() {
    let named = |e: &Error, what: &str| matches!(e.cause, HwError::Unsupported(m) if m.contains(what));
    // QEMU without xtsup=on: GASup, no XTSup.
    let (_, _, mut u) = unit();
    let e = u.set_x2apic(true).unwrap_err();
    assert!(named(&e, "EFR.XTSup"), "{e}");
    assert!(!u.x2apic_interrupts());
    let (_, _, mut u) = build(Setup { efr: (QEMU_EFR | EFR_XT) & !amdvi::caps::efr::GA, ..Setup::default() });
    let e = u.set_x2apic(true).unwrap_err();
    assert!(named(&e, "EFR.GASup"), "{e}");
    // Through bring-up: refused before the unit is touched.
    let mem = Mem::new(true);
    let model = RegisterModel::new(QEMU_EFR, Arc::new(mem.clone()));
    let info = amdvi::BringUp { last_device_id: 0xff, coherent: true, x2apic: true, ..amdvi::BringUp::default() };
    let e = amdvi::Shared::bring_up(BASE, model.clone(), mem, TickClock::new(), info).unwrap_err();
    assert!(named(&e, "EFR.XTSup") && e.unit == BASE, "{e}");
    assert!(e.to_string().contains("EFR.XTSup"), "{e}");
    assert_eq!(model.state().control, Control::empty(), "nothing enabled");
}

#[test]
fn xapic_routes_refuse_ids_above_255() {
    use amdvi::irte::Irte;
    let (model, mem, mut u) = enabled();
    assert_eq!(model.state().control & (Control::GA_EN | Control::XT_EN), Control::empty());
    for dest in [0x100, 0x1_0000, u32::MAX] {
        let e = u.route_interrupt(0x10, 0x2b, dest).unwrap_err();
        assert!(matches!(e.cause, HwError::Invalid(m) if m.contains("255")), "{e}");
    }
    assert_eq!(u.dte(0x10).unwrap().interrupts(), Some(amdvi::Interrupts::Blocked), "a refused route makes no table");
    let i = u.route_interrupt(0x10, 0x2b, 0xff).unwrap();
    assert_eq!(u.irte(0x10, i), Some(Irte::remapped(0x2b, 0xff)));
    assert_eq!(u.irte_ga(0x10, i), None, "no 128-bit entries without x2APIC destinations");
    assert_eq!(remap(&model, &mem, 0x10, i), Some((0x2b, 0xff)));
    assert!(matches!(u.retarget_interrupt(0x10, i, 0x2c, 0x100), Err(Error { cause: HwError::Invalid(_), .. })));
    assert_eq!(remap(&model, &mem, 0x10, i), Some((0x2b, 0xff)), "a refused retarget changes nothing");
}

#[test]
fn x2apic_routes_are_128_bit_entries_with_32_bit_ids() {
    use amdvi::irte::IrteGa;
    let (model, mem, mut u) = build(Setup { efr: QEMU_EFR | EFR_XT, ..Setup::default() });
    u.set_x2apic(true).unwrap();
    u.enable().unwrap();
    model.processed();
    assert!(model.state().control.contains(Control::IOMMU_EN | Control::GA_EN | Control::XT_EN));
    assert!(matches!(u.set_x2apic(false), Err(Error { cause: HwError::Invalid(_), .. })), "not while running");
    assert!(u.x2apic_interrupts());
    mem.take_writes();
    let i = u.route_interrupt(0x10, 0x2b, 0x1234_5678).unwrap();
    let Some(amdvi::Interrupts::Remapped { table, .. }) = u.dte(0x10).unwrap().interrupts() else { panic!() };
    let e = IrteGa::remapped(0x2b, 0x1234_5678);
    assert_eq!(u.irte_ga(0x10, i), Some(e));
    assert_eq!(u.irte(0x10, i), None, "no 32-bit view of a 128-bit entry");
    assert_eq!([mem.read(table, 0), mem.read(table, 1)], e.0, "entry 0 in the table's first 16 bytes");
    assert_eq!(remap(&model, &mem, 0x10, i), Some((0x2b, 0x1234_5678)));
    let entry_writes = |w: Vec<(u64, usize, u64)>| -> Vec<usize> {
        w.into_iter().filter(|&(t, _, _)| t == table).map(|(_, i, _)| i).collect()
    };
    assert_eq!(entry_writes(mem.take_writes()), [1, 0], "upper word first, RemapEn last");
    assert!(opcodes(&model.processed()).contains(&cmd::INVALIDATE_INTERRUPT_TABLE));
    // A second route: entry 1, words 2 and 3.
    let j = u.route_interrupt(0x10, 0x2c, 7).unwrap();
    assert_eq!(j, 1);
    assert_eq!([mem.read(table, 2), mem.read(table, 3)], IrteGa::remapped(0x2c, 7).0);
    mem.take_writes();
    // Retargets write only what changes: the vector (upper word) ...
    u.retarget_interrupt(0x10, i, 0x2d, 0x1234_5678).unwrap();
    assert_eq!(entry_writes(mem.take_writes()), [1]);
    // ... the low destination bits (lower word) ...
    u.retarget_interrupt(0x10, i, 0x2d, 0x1200_0001).unwrap();
    assert_eq!(entry_writes(mem.take_writes()), [0]);
    assert_eq!(remap(&model, &mem, 0x10, i), Some((0x2d, 0x1200_0001)));
    // ... or both, upper first.
    u.retarget_interrupt(0x10, i, 0x2e, 0x300).unwrap();
    assert_eq!(entry_writes(mem.take_writes()), [1, 0]);
    assert_eq!(remap(&model, &mem, 0x10, i), Some((0x2e, 0x300)));
    assert!(opcodes(&model.processed()).contains(&cmd::INVALIDATE_INTERRUPT_TABLE));
    // Removed: RemapEn first.
    u.unroute_interrupt(0x10, i).unwrap();
    assert_eq!(entry_writes(mem.take_writes()), [0, 1]);
    assert_eq!(remap(&model, &mem, 0x10, i), None);
    assert_eq!(u.irte_ga(0x10, i), Some(IrteGa::default()));
    assert_eq!(remap(&model, &mem, 0x10, j), Some((0x2c, 7)), "the other route stays");
    assert_eq!(u.route_interrupt(0x10, 0x2f, u32::MAX).unwrap(), 0, "the freed entry is reused, any 32-bit id");
    assert_eq!(remap(&model, &mem, 0x10, 0), Some((0x2f, u32::MAX)));
    assert_eq!(model.state().illegal_commands, 0);
}

/// Sets D (bit 6) in the host PTE translating `iova` for `device`, as a
/// unit with HAD = 11b does on a write: the walk from the DTE's root.
fn walker_writes(mem: &Mem, dte: DeviceTableEntry, iova: u64) {
    assert!(dte.host_dirty(), "the unit records only with HAD = 11b");
    let (mut table, mut level) = (dte.root(), dte.mode() - 1);
    loop {
        let at = table + ((iova >> (12 + 9 * level)) & 511) * 8;
        let e = mem.phys_read(at);
        assert_ne!(e & 1, 0, "{iova:#x} is mapped");
        if level == 0 || (e >> 9) & 7 == 0 {
            mem.phys_write(at, e | 1 << 6);
            return;
        }
        table = e & 0x000f_ffff_ffff_f000;
        level -= 1;
    }
}

#[test]
fn dirty_tracking_needs_hdsup_and_sets_had_in_the_dte() {
    use portcullis_iommu::unit::{Device, IommuUnit};
    use portcullis_iommu::{DeviceOps, DomainError, IotlbGather, Prot, RequesterRef};
    const M2: u64 = 1 << 21;
    let info = || amdvi::BringUp { last_device_id: 0xff, coherent: true, ..amdvi::BringUp::default() };
    let (a, b) = (RequesterRef { unit: 0, requester_id: 8 }, RequesterRef { unit: 0, requester_id: 0x10 });
    // QEMU's EFR has no HDSup: refused.
    let mem = Mem::new(true);
    let unit = amdvi::Shared::bring_up(
        BASE,
        RegisterModel::new(QEMU_EFR, Arc::new(mem.clone())),
        mem,
        TickClock::new(),
        info(),
    )
    .unwrap();
    assert!(!unit.supports_dirty_tracking());
    let dev = Device::new(unit.clone(), a);
    assert!(!dev.supports_dirty_tracking());
    assert_eq!(dev.alloc_dirty_domain().err(), Some(DomainError::NotSupported));
    assert!(!dev.alloc_domain().unwrap().dirty_capable());

    let mem = Mem::new(true);
    let efr = QEMU_EFR | amdvi::caps::efr::HD;
    let model = RegisterModel::new(efr, Arc::new(mem.clone()));
    let unit = amdvi::Shared::bring_up(BASE, model, mem.clone(), TickClock::new(), info()).unwrap();
    assert!(unit.supports_dirty_tracking());
    let dev = Device::new(unit.clone(), a);
    let mut d = dev.alloc_dirty_domain().unwrap();
    assert!(d.dirty_capable());
    d.map(0, 0x4000_0000, 2 * M2, Prot::RW).unwrap();
    d.map(2 * M2, 0x10_0000, 16 << 12, Prot::RW).unwrap();
    d.attach_device(a.handle()).unwrap();
    let dte = |id| unit.lock().dte(id).unwrap();
    assert!(!dte(8).host_dirty(), "tracking off: HAD = 00b");
    d.set_dirty_tracking(true).unwrap();
    assert!(dte(8).host_dirty());
    assert_eq!(dte(8).0[0] >> 7 & 3, 3, "HAD, bits 8:7");
    assert_eq!(unit.attached_domain(8), dte(8).tag(), "still translating");
    d.attach_device(b.handle()).unwrap();
    assert!(dte(0x10).host_dirty(), "attached while tracking");

    walker_writes(&mem, dte(8), M2 + 0x40);
    walker_writes(&mem, dte(0x10), 2 * M2 + 7 * 4096);
    let mut g = IotlbGather::default();
    let mut seen = Vec::new();
    d.read_and_clear_dirty(0, 4 * M2, true, &mut g, &mut |at, len| seen.push((at, len))).unwrap();
    assert_eq!(seen, [(M2, M2), (2 * M2 + 7 * 4096, 4096)]);
    d.iotlb_sync(&mut g).unwrap();
    seen.clear();
    d.read_and_clear_dirty(0, 4 * M2, true, &mut g, &mut |at, len| seen.push((at, len))).unwrap();
    assert_eq!(seen, []);

    d.set_dirty_tracking(false).unwrap();
    assert!(!dte(8).host_dirty() && !dte(0x10).host_dirty());
    assert_eq!(unit.attached_domain(0x10), dte(0x10).tag());
}

/// A domain dropped while devices still translate through it (its owner
/// never detached them): their entries are blocked first, then the
/// domain's id is invalidated and reused and its tables freed; when the
/// unit does not answer, the id and the tables are kept for good.
#[test]
fn a_domain_dropped_while_attached_blocks_its_devices_first() {
    use portcullis_iommu::unit::{Device, IommuUnit, UnitDomain};
    use portcullis_iommu::{DeviceOps, IommuDomain, Prot, RequesterRef};
    let info = || amdvi::BringUp { last_device_id: 0xff, coherent: true, ..amdvi::BringUp::default() };
    let (a, b) = (RequesterRef { unit: 0, requester_id: 8 }, RequesterRef { unit: 0, requester_id: 0x10 });
    let mem = Mem::new(true);
    let model = RegisterModel::new(QEMU_EFR, Arc::new(mem.clone()));
    let unit = amdvi::Shared::bring_up(BASE, model.clone(), mem.clone(), TickClock::new(), info()).unwrap();
    let mut other = Device::new(unit.clone(), b).alloc_domain().unwrap();
    let before = mem.live();
    let mut d = unit.new_amd_domain().unwrap();
    d.map(0, 0x4000_0000, 1 << 21, Prot::RW).unwrap();
    d.map(1 << 21, 0x10_0000, 4 << 12, Prot::RW).unwrap();
    let id = d.domain_id();
    d.attach_device(a.handle()).unwrap();
    d.attach_device(b.handle()).unwrap();
    // A device moved to another domain since is not touched.
    other.attach_device(b.handle()).unwrap();
    let other_id = unit.attached_domain(0x10).unwrap();
    assert_ne!(other_id, id);
    drop(d);
    assert_eq!(unit.attached_domain(8), None, "blocked");
    assert_eq!(unit.attached_domain(0x10), Some(other_id), "the other domain's device stays");
    assert_eq!(mem.live(), before, "the dropped domain's tables are freed");
    assert_eq!(unit.new_amd_domain().unwrap().domain_id(), id, "the id is reused");

    let mut d = unit.new_amd_domain().unwrap();
    d.map(0, 0x4000_0000, 4 << 12, Prot::RW).unwrap();
    let id = d.domain_id();
    d.attach_device(a.handle()).unwrap();
    let live = mem.live();
    model.state().stuck = true;
    drop(d);
    model.state().stuck = false;
    assert_eq!(mem.live(), live, "nothing freed: the unit never confirmed the detach");
    assert_ne!(unit.new_amd_domain().unwrap().domain_id(), id, "the id is not reused");
}

/// An interrupt table the device's entry may name is never freed before
/// the unit confirmed the change: neither when the first route's entry
/// change times out (the entry in memory already names the new table) nor
/// when releasing the routes times out.
#[test]
fn interrupt_tables_outlive_an_unconfirmed_entry_change() {
    use amdvi::Interrupts;
    let (model, mem, mut u) = enabled();
    let live = |t: u64| mem.0.lock().unwrap().heap.is_live(t);
    model.state().stuck = true;
    assert!(matches!(u.route_interrupt(0x10, 0x2b, 0), Err(Error { cause: HwError::Timeout { .. }, .. })));
    let Some(Interrupts::Remapped { table, .. }) = u.dte(0x10).unwrap().interrupts() else {
        panic!("the entry was written before the wait: {:?}", u.dte(0x10))
    };
    assert!(live(table), "the table the entry names stays allocated");
    assert_eq!(u.interrupt_table_entries(0x10), None, "and is forgotten");

    let (model, mem, mut u) = enabled();
    let live = |t: u64| mem.0.lock().unwrap().heap.is_live(t);
    u.route_interrupt(0x18, 0x2b, 0).unwrap();
    let Some(Interrupts::Remapped { table, .. }) = u.dte(0x18).unwrap().interrupts() else { panic!() };
    model.state().stuck = true;
    assert!(u.release_interrupts(0x18).is_err());
    assert!(live(table), "a release the unit did not confirm frees nothing");
}
