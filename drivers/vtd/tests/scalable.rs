//! Scalable-mode tables on heap memory: where entries land, the order they
//! are written in, what reads back, what blocking leaves, which lines are
//! flushed on a non-coherent walker, and the invalidations each change
//! asks for.

use io_pgtable::{HeapTables, TableMemory};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use vtd::qi::Descriptor256;
use vtd::scalable::{
    DeviceEntries, Invalidation, PasidEntry, Pgtt, RTADDR_TTM_SCALABLE, ScalableContextEntry, ScalableTables, Snoop,
    TablesError,
};

/// One memory operation, in program order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write { table: u64, index: usize, value: u64 },
    Flush { phys: u64, len: u64 },
}

/// Heap tables that log every write and flush.
#[derive(Clone)]
struct Recorder {
    mem: Arc<Mutex<HeapTables>>,
    log: Arc<Mutex<Vec<Op>>>,
}

impl Recorder {
    fn new(coherent: bool) -> Self {
        Self { mem: Arc::new(Mutex::new(HeapTables::new(coherent))), log: Arc::default() }
    }
    fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl TableMemory for Recorder {
    fn alloc_table(&mut self) -> Option<u64> {
        self.mem.lock().unwrap().alloc_table()
    }
    fn free_table(&mut self, t: u64) {
        self.mem.lock().unwrap().free_table(t)
    }
    fn read(&self, t: u64, i: usize) -> u64 {
        self.mem.lock().unwrap().read(t, i)
    }
    fn write(&mut self, t: u64, i: usize, v: u64) {
        self.log.lock().unwrap().push(Op::Write { table: t, index: i, value: v });
        self.mem.lock().unwrap().write(t, i, v)
    }
    fn coherent(&self) -> bool {
        self.mem.lock().unwrap().coherent()
    }
    fn flush(&mut self, p: u64, l: u64) {
        self.log.lock().unwrap().push(Op::Flush { phys: p, len: l });
        self.mem.lock().unwrap().flush(p, l)
    }
}

const SS_ROOT: u64 = 0x7_0000_0000;
const FS_ROOT: u64 = 0x7_0000_1000;

fn nonzero_words(mem: &impl TableMemory, table: u64) -> Vec<(usize, u64)> {
    (0..512).map(|i| (i, mem.read(table, i))).filter(|&(_, v)| v != 0).collect()
}

#[test]
fn entries_land_in_the_right_table_page_and_offset() {
    let mut t = ScalableTables::new(HeapTables::new(true)).unwrap();
    assert_eq!(t.rtaddr(), t.root_table() | RTADDR_TTM_SCALABLE);
    assert_eq!(t.root_table() & 0xfff, 0);

    // 00:01.0 (devfn 0x08, lower), 01:11.0 (devfn 0x88, upper), 01:1f.7
    // (devfn 0xff, upper), 01:00.1 (devfn 0x01, lower).
    let _ = t.set_second_stage(0x0008, SS_ROOT, 2, 1).unwrap();
    let _ = t.set_first_stage(0x0188, FS_ROOT, 4, 2).unwrap();
    let _ = t.set_pass_through(0x01ff, 3).unwrap();
    let _ = t.set_second_stage(0x0101, SS_ROOT, 1, 4).unwrap();

    let mem = t.memory();
    let root = t.root_table();
    let bus0_lo = t.context_table(0, 0x08).unwrap();
    let bus1_lo = t.context_table(1, 0x01).unwrap();
    let bus1_hi = t.context_table(1, 0x88).unwrap();
    assert_eq!(t.context_table(1, 0xff), Some(bus1_hi));
    assert_eq!(t.context_table(0, 0x80), None, "no upper table for bus 0");
    assert!(bus1_lo != bus1_hi);

    // Root: bus 0 lower half only; bus 1 both halves.
    assert_eq!(nonzero_words(mem, root), vec![(0, bus0_lo | 1), (2, bus1_lo | 1), (3, bus1_hi | 1)]);

    // Context entries at (devfn & 0x7f) * 4 words.
    let (dir8, tab8) = t.pasid_pages(0x0008).unwrap();
    assert_eq!(nonzero_words(mem, bus0_lo), vec![(8 * 4, dir8 | 2 << 9 | 1)]);
    let (dir88, _) = t.pasid_pages(0x0188).unwrap();
    let (dirff, _) = t.pasid_pages(0x01ff).unwrap();
    assert_eq!(nonzero_words(mem, bus1_hi), vec![(0x08 * 4, dir88 | 2 << 9 | 1), (0x7f * 4, dirff | 2 << 9 | 1)]);
    let (dir1, _) = t.pasid_pages(0x0101).unwrap();
    assert_eq!(nonzero_words(mem, bus1_lo), vec![(4, dir1 | 2 << 9 | 1)]);

    // PASID directory entry 0 -> PASID table; PASID 0 entry in words 0-7.
    assert_eq!(nonzero_words(mem, dir8), vec![(0, tab8 | 1)]);
    let expect = PasidEntry::second_stage(SS_ROOT, 2, 1, Snoop::default()).unwrap();
    assert_eq!(nonzero_words(mem, tab8), vec![(0, expect.0[0]), (1, expect.0[1])]);

    // Root, 3 context tables, 4 x (directory + table).
    assert_eq!(mem.live_tables(), 1 + 3 + 8);
}

#[test]
fn rereading_decodes_what_was_set() {
    let mut t = ScalableTables::new(HeapTables::new(true)).unwrap();
    t.set_snoop(Snoop { page_walk: false, page: true });
    let _ = t.set_second_stage(0x0010, SS_ROOT, 2, 9).unwrap();
    let _ = t.set_first_stage(0x0290, FS_ROOT, 5, 10).unwrap();
    t.set_pass_through_aw(1);
    let _ = t.set_pass_through(0x0018, 11).unwrap();

    let ss = t.entry(0x0010).unwrap();
    assert_eq!(ss.pasid, PasidEntry::second_stage(SS_ROOT, 2, 9, Snoop { page_walk: false, page: true }).unwrap());
    assert_eq!(
        (ss.pasid.pgtt(), ss.pasid.ss_root(), ss.pasid.ss_levels(), ss.pasid.did()),
        (Some(Pgtt::SecondStage), SS_ROOT, 4, 9)
    );
    assert!(ss.pasid.snoop().page && !ss.pasid.snoop().page_walk);
    assert_eq!(ss.context, ScalableContextEntry::new(t.pasid_pages(0x0010).unwrap().0, 2));
    assert_eq!(ss.context.dir_entries(), 512);
    assert_eq!(ss.dir.table(), t.pasid_pages(0x0010).unwrap().1);
    assert_eq!(ss.root.lower(), t.context_table(0, 0x10));

    let fs = t.entry(0x0290).unwrap();
    assert_eq!(
        (fs.pasid.pgtt(), fs.pasid.fs_root(), fs.pasid.fs_levels(), fs.pasid.did()),
        (Some(Pgtt::FirstStage), FS_ROOT, 5, 10)
    );
    assert_eq!(fs.root.upper(), t.context_table(2, 0x90));
    assert_eq!(fs.root.lower(), None);
    assert!(!fs.pasid.sre() && !fs.pasid.wpe());

    let pt = t.entry(0x0018).unwrap();
    assert_eq!((pt.pasid.pgtt(), pt.pasid.did(), pt.pasid.aw()), (Some(Pgtt::PassThrough), 11, 1));

    assert_eq!(t.entry(0x0020), None, "never attached: no context entry");
    assert_eq!(t.entry(0x0310), None, "bus without context table");
    let shown = format!("{:?}", t.entry(0x0010).unwrap().pasid);
    assert_eq!(shown, format!("PasidEntry(did 9, second stage {SS_ROOT:#x} aw 2 PGSNP)"));
}

/// Position of the first and last write to `[table, index..index+n)`.
fn writes_to(log: &[Op], table: u64, index: usize, n: usize) -> Vec<(usize, usize, u64)> {
    log.iter()
        .enumerate()
        .filter_map(|(pos, op)| match *op {
            Op::Write { table: t, index: i, value } if t == table && (index..index + n).contains(&i) => {
                Some((pos, i, value))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn present_bits_are_written_last_and_bottom_up() {
    let rec = Recorder::new(true);
    let mut t = ScalableTables::new(rec.clone()).unwrap();
    let _ = t.set_second_stage(0x0188, SS_ROOT, 2, 1).unwrap();
    let log = rec.take();
    let (dir, tab) = t.pasid_pages(0x0188).unwrap();
    let ctx = t.context_table(1, 0x88).unwrap();

    let pe = writes_to(&log, tab, 0, 8);
    assert_eq!(pe.len(), 8, "every word of the PASID entry written once");
    assert_eq!(pe.last().unwrap().1, 0, "word 0 (P) last");
    assert_eq!(pe.last().unwrap().2 & 1, 1);
    let de = writes_to(&log, dir, 0, 1);
    let ce = writes_to(&log, ctx, 8 * 4, 4);
    assert_eq!(ce.len(), 4);
    assert_eq!(ce.last().unwrap().1, 8 * 4, "context word 0 (P) last");
    let re = writes_to(&log, t.root_table(), 3, 1);
    assert_eq!(re.len(), 1, "only the upper half of bus 1's root entry");
    assert!(writes_to(&log, t.root_table(), 2, 1).is_empty());
    // Bottom-up: PASID entry, then directory, then context, then root.
    assert!(pe.last().unwrap().0 < de[0].0);
    assert!(de[0].0 < ce[0].0);
    assert!(ce.last().unwrap().0 < re[0].0);
    // Nothing present was ever written before what it points at.
    assert_eq!(log.len(), 8 + 1 + 4 + 1);

    // Re-attach after block: only the PASID entry is rewritten.
    let _ = t.block(0x0188);
    let cleared = rec.take();
    let w = writes_to(&cleared, tab, 0, 8);
    assert_eq!((w[0].1, w[0].2), (0, 0), "clearing: P goes first");
    assert_eq!(w.len(), 8);
    let _ = t.set_first_stage(0x0188, FS_ROOT, 4, 2).unwrap();
    let again = rec.take();
    assert_eq!(again.len(), 8);
    assert!(matches!(again[7], Op::Write { index: 0, .. }));
}

#[test]
fn blocking_clears_the_entry_and_asks_for_the_right_invalidations() {
    let mut t = ScalableTables::new(HeapTables::new(true)).unwrap();
    let _ = t.set_second_stage(0x0008, SS_ROOT, 2, 5).unwrap();
    let _ = t.set_first_stage(0x0009, FS_ROOT, 4, 6).unwrap();
    let _ = t.set_pass_through(0x000a, 7).unwrap();

    let inv = t.block(0x0008);
    assert_eq!(inv.required, vec![Invalidation::PasidCache { did: 5, pasid: 0 }, Invalidation::Iotlb { did: 5 }]);
    assert!(inv.caching_mode.is_empty());
    let e = t.entry(0x0008).unwrap();
    assert_eq!(e.pasid, PasidEntry::default(), "all 512 bits cleared");
    assert!(e.context.present() && e.dir.present(), "context and directory stay");
    let (_, tab) = t.pasid_pages(0x0008).unwrap();
    assert!(t.memory().is_empty(tab));

    let inv = t.block(0x0009);
    assert_eq!(
        inv.required,
        vec![Invalidation::PasidCache { did: 6, pasid: 0 }, Invalidation::PasidIotlb { did: 6, pasid: 0 }]
    );
    let inv = t.block(0x000a);
    assert_eq!(
        inv.required,
        vec![Invalidation::PasidCache { did: 7, pasid: 0 }, Invalidation::PasidIotlb { did: 7, pasid: 0 }]
    );
    assert_eq!(
        inv.descriptors(false),
        vec![Descriptor256([0x17 | 7 << 16, 0, 0, 0]), Descriptor256([0x26 | 7 << 16, 0, 0, 0])]
    );

    assert!(t.block(0x0008).is_empty(), "blocking twice asks for nothing");
    assert!(t.block(0x0100).is_empty(), "never attached");
    // Other devices' entries untouched.
    assert_eq!(t.memory().live_tables(), 1 + 1 + 6);
}

#[test]
fn a_live_entry_is_never_overwritten() {
    let mut t = ScalableTables::new(HeapTables::new(true)).unwrap();
    let _ = t.set_second_stage(0x0008, SS_ROOT, 2, 5).unwrap();
    let before = t.entry(0x0008).unwrap();
    match t.set_first_stage(0x0008, FS_ROOT, 4, 6) {
        Err(TablesError::Busy { sid: 0x0008, current }) => assert_eq!(current, before.pasid),
        other => panic!("expected Busy, got {other:?}"),
    }
    assert_eq!(t.entry(0x0008).unwrap(), before);
    let _ = t.block(0x0008);
    let inv = t.set_first_stage(0x0008, FS_ROOT, 4, 6).unwrap();
    assert!(inv.required.is_empty());
    assert_eq!(
        inv.caching_mode,
        vec![Invalidation::PasidCache { did: 6, pasid: 0 }, Invalidation::PasidIotlb { did: 6, pasid: 0 }]
    );
    assert!(inv.for_unit(false).is_empty());
    assert_eq!(t.entry(0x0008).unwrap().pasid.pgtt(), Some(Pgtt::FirstStage));
}

#[test]
fn caching_mode_invalidations_follow_what_became_present() {
    let mut t = ScalableTables::new(HeapTables::new(true)).unwrap();
    // New root half: global context-cache invalidation.
    let inv = t.set_second_stage(0x0008, SS_ROOT, 2, 5).unwrap();
    assert_eq!(
        inv.caching_mode,
        vec![
            Invalidation::ContextCacheGlobal,
            Invalidation::PasidCache { did: 5, pasid: 0 },
            Invalidation::Iotlb { did: 5 }
        ]
    );
    // Same context table, new context entry: device-selective.
    let inv = t.set_pass_through(0x0010, 6).unwrap();
    assert_eq!(
        inv.for_unit(true),
        vec![
            Invalidation::ContextCacheDevice { sid: 0x0010 },
            Invalidation::PasidCache { did: 6, pasid: 0 },
            Invalidation::PasidIotlb { did: 6, pasid: 0 }
        ]
    );
    let d = inv.descriptors(true);
    assert_eq!(d[0], Descriptor256([0x31 | 0x10 << 32, 0, 0, 0]));
    assert!(d.iter().all(|d| d.0[2] == 0 && d.0[3] == 0));
}

#[test]
fn non_coherent_walker_gets_each_changed_line_flushed_once() {
    let mut mem = HeapTables::new(false);
    mem.record_flushes(true);
    let mut t = ScalableTables::new(mem).unwrap();
    let _ = t.set_second_stage(0x0108, SS_ROOT, 2, 5).unwrap();
    let (dir, tab) = t.pasid_pages(0x0108).unwrap();
    let ctx = t.context_table(1, 0x08).unwrap();
    let root = t.root_table();
    // The cache line holding a byte address.
    let line = |addr: u64| addr & !63;
    // Context entry of devfn 8 at byte 8 * 32; root entry of bus 1 at byte 16.
    let expect: BTreeMap<u64, u32> =
        [(tab, 1), (dir, 1), (line(ctx + 8 * 32), 1), (line(root + 16), 1)].into_iter().collect();
    assert_eq!(t.memory_mut().take_flush_log(), expect);

    // Second device in the same context-table line (devfn 9): no root flush.
    let _ = t.set_pass_through(0x0109, 6).unwrap();
    let (dir9, tab9) = t.pasid_pages(0x0109).unwrap();
    let expect: BTreeMap<u64, u32> = [(tab9, 1), (dir9, 1), (line(ctx + 9 * 32), 1)].into_iter().collect();
    assert_eq!(t.memory_mut().take_flush_log(), expect);

    // Blocking flushes the PASID entry's line only.
    let _ = t.block(0x0108);
    assert_eq!(t.memory_mut().take_flush_log(), [(tab, 1)].into_iter().collect());

    // A changed line is flushed after its last write and before anything
    // pointing at it is written.
    let rec = Recorder::new(false);
    let mut r = ScalableTables::new(rec.clone()).unwrap();
    let _ = r.set_second_stage(0x0008, SS_ROOT, 2, 5).unwrap();
    let log = rec.take();
    let (rdir, rtab) = r.pasid_pages(0x0008).unwrap();
    let pos = |want: Op| log.iter().position(|&o| o == want).unwrap();
    let flush_tab = pos(Op::Flush { phys: rtab, len: 64 });
    let dir_write = log.iter().position(|o| matches!(o, Op::Write { table, .. } if *table == rdir)).unwrap();
    assert!(flush_tab < dir_write);
    let flush_dir = pos(Op::Flush { phys: rdir, len: 8 });
    let rctx = r.context_table(0, 8).unwrap();
    let ctx_write = log.iter().position(|o| matches!(o, Op::Write { table, .. } if *table == rctx)).unwrap();
    assert!(flush_dir < ctx_write);

    // Coherent: never flushed.
    let mut c = ScalableTables::new(HeapTables::new(true)).unwrap();
    let _ = c.set_second_stage(0x0008, SS_ROOT, 2, 5).unwrap();
    let _ = c.block(0x0008);
    assert_eq!(c.memory().flush_stats(), (0, 0));
}

#[test]
fn running_out_of_memory_leaves_nothing_behind() {
    for n in 1..=3 {
        let mut t = ScalableTables::new(HeapTables::new(true)).unwrap();
        t.memory_mut().fail_nth_alloc(Some(n));
        assert_eq!(t.set_second_stage(0x0208, SS_ROOT, 2, 5), Err(TablesError::NoMemory), "failing alloc {n}");
        assert_eq!(t.memory().live_tables(), 1, "only the root table is left");
        assert!(t.memory().is_empty(t.root_table()));
        assert_eq!(t.entry(0x0208), None);
        // And it works afterwards.
        let _ = t.set_second_stage(0x0208, SS_ROOT, 2, 5).unwrap();
        assert!(t.entry(0x0208).unwrap().pasid.present());
    }
    let mut mem = HeapTables::new(true);
    mem.fail_nth_alloc(Some(1));
    assert_eq!(ScalableTables::new(mem).err(), Some(TablesError::NoMemory));
}

#[test]
fn arguments_no_entry_can_encode_are_refused() {
    let mut t = ScalableTables::new(HeapTables::new(true)).unwrap();
    assert!(matches!(t.set_second_stage(8, SS_ROOT, 0, 1), Err(TablesError::Invalid(_))));
    assert!(matches!(t.set_second_stage(8, SS_ROOT, 4, 1), Err(TablesError::Invalid(_))));
    assert!(matches!(t.set_second_stage(8, SS_ROOT | 0x800, 2, 1), Err(TablesError::Invalid(_))));
    assert!(matches!(t.set_first_stage(8, FS_ROOT, 3, 1), Err(TablesError::Invalid(_))));
    assert!(matches!(t.set_first_stage(8, 0, 4, 1), Err(TablesError::Invalid(_))));
    assert_eq!(t.memory().live_tables(), 1, "nothing allocated for refused calls");
    let e = TablesError::Busy { sid: 0x10, current: PasidEntry::pass_through(3, 2) };
    assert!(e.to_string().contains("0x0010"));
}

#[derive(Debug, Clone)]
enum Step {
    Ss { sid: u16, did: u16 },
    Fs { sid: u16, did: u16 },
    Pt { sid: u16, did: u16 },
    Block { sid: u16 },
}

fn step() -> impl Strategy<Value = Step> {
    // A few buses, both halves of each.
    let sid = (0u16..3, prop::sample::select(vec![0x00u8, 0x08, 0x7f, 0x80, 0x88, 0xff]))
        .prop_map(|(bus, devfn)| bus << 8 | devfn as u16);
    prop_oneof![
        (sid.clone(), 1u16..100).prop_map(|(sid, did)| Step::Ss { sid, did }),
        (sid.clone(), 1u16..100).prop_map(|(sid, did)| Step::Fs { sid, did }),
        (sid.clone(), 1u16..100).prop_map(|(sid, did)| Step::Pt { sid, did }),
        sid.prop_map(|sid| Step::Block { sid }),
    ]
}

proptest! {
    /// Against a model (sid -> entry): every device reads back what the
    /// model says, busy devices are refused, every removed entry asks for
    /// its PASID-cache and IOTLB invalidation, and pages are exactly root +
    /// context tables + 2 per device ever attached.
    #[test]
    fn tables_follow_a_model(steps in prop::collection::vec(step(), 1..60), coherent in any::<bool>()) {
        let mut t = ScalableTables::new(HeapTables::new(coherent)).unwrap();
        let mut model: BTreeMap<u16, PasidEntry> = BTreeMap::new();
        let mut attached = std::collections::BTreeSet::new();
        let mut halves = std::collections::BTreeSet::new();
        for s in steps {
            let (sid, want, r) = match s {
                Step::Ss { sid, did } => (sid, PasidEntry::second_stage(SS_ROOT, 2, did, Snoop::default()), t.set_second_stage(sid, SS_ROOT, 2, did)),
                Step::Fs { sid, did } => (sid, PasidEntry::first_stage(FS_ROOT, 4, did, Snoop::default()), t.set_first_stage(sid, FS_ROOT, 4, did)),
                Step::Pt { sid, did } => (sid, Some(PasidEntry::pass_through(did, 2)), t.set_pass_through(sid, did)),
                Step::Block { sid } => {
                    let inv = t.block(sid);
                    match model.remove(&sid) {
                        Some(old) => {
                            prop_assert_eq!(inv.required.len(), 2);
                            prop_assert_eq!(inv.required[0], Invalidation::PasidCache { did: old.did(), pasid: 0 });
                        }
                        None => prop_assert!(inv.is_empty()),
                    }
                    continue;
                }
            };
            let want = want.unwrap();
            match model.get(&sid) {
                Some(cur) => prop_assert_eq!(r, Err(TablesError::Busy { sid, current: *cur })),
                None => {
                    prop_assert!(r.is_ok());
                    model.insert(sid, want);
                    attached.insert(sid);
                    halves.insert((sid >> 8, sid & 0x80));
                }
            }
        }
        for sid in &attached {
            let e: DeviceEntries = t.entry(*sid).unwrap();
            prop_assert_eq!(e.pasid, model.get(sid).copied().unwrap_or_default());
            prop_assert!(e.context.present());
        }
        prop_assert_eq!(t.memory().live_tables(), 1 + halves.len() + 2 * attached.len());
    }
}
