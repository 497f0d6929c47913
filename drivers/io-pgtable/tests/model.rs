//! Model-based property test: random map/unmap sequences (large pages,
//! partial unmaps that split them, injected allocation failures, syncs)
//! against a reference map of extents, checking after every step every
//! translation and permission, that nothing else is mapped, the structural
//! invariants and the table accounting. Runs for VT-d second stage, x86
//! first stage and AMD-Vi v1 (3, 4 and 6 levels, whose raw NextLevel
//! encodings are checked along every mapped extent's walk).

use std::collections::BTreeMap;

use io_pgtable::*;
use portcullis_iommu::IotlbGather;
use proptest::prelude::*;

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;
/// IOVAs stay below this (keeps ranges colliding often).
const WINDOW: u64 = 8 * G1;

/// Reference: start → (length, phys, prot), non-overlapping.
type Model = BTreeMap<u64, (u64, u64, Prot)>;

#[derive(Debug, Clone)]
enum Op {
    Map { iova: u64, len: u64, phys: u64, prot: Prot, fail_nth: Option<u64> },
    Unmap { iova: u64, len: u64, fail_nth: Option<u64> },
    Sync,
}

fn granule() -> impl Strategy<Value = u64> {
    prop_oneof![2 => Just(K4), 3 => Just(M2), 1 => Just(G1)]
}

fn prot() -> impl Strategy<Value = Prot> {
    prop_oneof![
        Just(Prot::READ),
        Just(Prot::WRITE),
        Just(Prot::RW),
        Just(Prot::RW | Prot::CACHE),
        Just(Prot::READ | Prot::CACHE)
    ]
}

fn fail() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![6 => Just(None), 1 => (1u64..6).prop_map(Some)]
}

fn op() -> impl Strategy<Value = Op> {
    let map = (granule(), 0u64..8, 1u64..4, 0u64..3, 0u64..3, 0u64..64, any::<bool>(), prot(), fail()).prop_map(
        |(g, slot, count, head, tail, pslot, misalign, prot, fail_nth)| {
            let count = if g == G1 { count.min(2) } else { count };
            let iova = ((slot * g * 3) % WINDOW) + head * K4;
            let mut len = count * g + tail * K4;
            let mut phys = pslot * g.max(M2) + head * K4;
            if misalign {
                // Defeat large pages, and keep the page count sane.
                phys += K4;
                len = len.min(4 * M2 + tail * K4);
            }
            let len = len.min(WINDOW - iova);
            Op::Map { iova, len, phys, prot, fail_nth }
        },
    );
    let unmap_fail = prop_oneof![3 => Just(None), 1 => (1u64..3).prop_map(Some)];
    let unmap = (granule(), 0u64..24, 0u64..512, 1u64..3, 0u64..600, unmap_fail).prop_map(
        |(g, slot, off, count, extra, fail_nth)| {
            let iova = (slot * g + off * K4) % WINDOW;
            let len = (count * g + extra * K4).min(WINDOW - iova);
            Op::Unmap { iova, len, fail_nth }
        },
    );
    // Single pages, 2 at each end of the first two 2 MiB, so that one-page
    // maps and unmaps often follow a map in the same 2 MiB (the engine's
    // fast paths through the remembered walk) and often empty a table.
    let page = |p: u64| (p / 4) * M2 + [0, 1, 510, 511][p as usize % 4] * K4;
    let page_map = (0u64..8, 0u64..4096, prot()).prop_map(move |(p, f, prot)| Op::Map {
        iova: page(p),
        len: K4,
        phys: f * K4,
        prot,
        fail_nth: None,
    });
    let page_unmap = (0u64..8).prop_map(move |p| Op::Unmap { iova: page(p), len: K4, fail_nth: None });
    prop_oneof![5 => map, 4 => unmap, 3 => page_map, 2 => page_unmap, 1 => Just(Op::Sync)]
}

fn model_overlap(m: &Model, iova: u64, end: u64) -> Option<u64> {
    let before = m.range(..iova).next_back().filter(|(s, (l, _, _))| **s + *l > iova).map(|_| iova);
    before.or_else(|| m.range(iova..end).next().map(|(s, _)| *s))
}

/// Removes `[iova, end)` from the model; returns the bytes removed.
fn model_remove(m: &mut Model, iova: u64, end: u64) -> u64 {
    let hit: Vec<(u64, (u64, u64, Prot))> =
        m.range(..end).rev().take_while(|(s, (l, _, _))| **s + *l > iova).map(|(s, v)| (*s, *v)).collect();
    let mut removed = 0;
    for (s, (l, p, prot)) in hit {
        m.remove(&s);
        let (lo, hi) = (s.max(iova), (s + l).min(end));
        removed += hi - lo;
        if s < lo {
            m.insert(s, (lo - s, p, prot));
        }
        if s + l > hi {
            m.insert(hi, (s + l - hi, p + (hi - s), prot));
        }
    }
    removed
}

/// Merges touching pieces that continue each other.
fn normalise(pieces: impl IntoIterator<Item = (u64, u64, u64, Prot)>) -> Vec<(u64, u64, u64, Prot)> {
    let mut out: Vec<(u64, u64, u64, Prot)> = Vec::new();
    for (iova, len, phys, prot) in pieces {
        if let Some(last) = out.last_mut()
            && last.0 + last.1 == iova
            && last.2 + last.1 == phys
            && last.3 == prot
        {
            last.1 += len;
            continue;
        }
        out.push((iova, len, phys, prot));
    }
    out
}

fn check<F: PtFormat>(pt: &PageTable<F, HeapTables>, m: &Model) -> Result<(), TestCaseError> {
    let mut actual = Vec::new();
    pt.for_each_mapping(|iova, size, phys, prot| actual.push((iova, size, phys, prot)));
    let expected = normalise(m.iter().map(|(s, (l, p, prot))| (*s, *l, *p, *prot)));
    prop_assert_eq!(normalise(actual), expected);
    for (s, (l, p, prot)) in m {
        prop_assert_eq!(pt.iova_to_phys(*s), Some((*p, *prot)));
        prop_assert_eq!(pt.iova_to_phys(s + l - 1), Some((p + l - 1, *prot)));
    }
    if let Some((s, (l, _, _))) = m.iter().next_back() {
        prop_assert_eq!(pt.iova_to_phys(s + l), m.get(&(s + l)).map(|(_, p, prot)| (*p, *prot)));
    }
    pt.check_invariants().map_err(TestCaseError::fail)?;
    prop_assert_eq!(pt.memory().live_tables(), pt.table_count() + pt.deferred_count());
    Ok(())
}

/// Arms (or disarms) allocation failure. Only when there is something to
/// arm or disarm: `memory_mut` makes the engine forget its remembered
/// walks, and the one-page fast paths need them.
fn arm<F: PtFormat>(pt: &mut PageTable<F, HeapTables>, fail_nth: Option<u64>) {
    if fail_nth.is_some() || pt.memory().failure_armed() {
        pt.memory_mut().fail_nth_alloc(fail_nth);
    }
}

fn run<F: PtFormat>(format: F, coherent: bool, ops: Vec<Op>) -> Result<(), TestCaseError> {
    run_checked(format, coherent, ops, |_, _| Ok(()))
}

/// AMD-Vi v1: along the walk to the first and last byte of every mapped
/// extent, each table entry says NextLevel = its level with PR|IR|IW, and
/// the leaf says NextLevel 0.
fn amd_raw_check(pt: &PageTable<AmdV1, HeapTables>, m: &Model) -> Result<(), TestCaseError> {
    for (s, (l, _, _)) in m {
        for iova in [*s, s + l - 1] {
            let steps = pt.walk(iova);
            let (leaf, tables) = steps.split_last().unwrap();
            for t in tables {
                prop_assert_eq!(t.raw & !AMD_ADDR_MASK, AMD_IR | AMD_IW | u64::from(t.level) << 9 | AMD_PR);
            }
            prop_assert_eq!(amd_next_level(leaf.raw), 0, "leaf at {:#x}", iova);
            prop_assert_eq!(leaf.raw & (AMD_PR | AMD_U | AMD_D | 0x1fe), AMD_PR);
        }
    }
    Ok(())
}

fn run_checked<F: PtFormat>(
    format: F,
    coherent: bool,
    ops: Vec<Op>,
    raw_check: impl Fn(&PageTable<F, HeapTables>, &Model) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let mut pt = PageTable::new(format, HeapTables::new(coherent)).unwrap();
    let mut m = Model::new();
    let mut gather = IotlbGather::default();
    // Coverage, printed with MODEL_STATS=1 and --nocapture: maps done,
    // overlaps refused, maps out of memory, unmaps that removed something,
    // unmaps stopped by a failed split, then 1 GiB and 2 MiB leaves seen
    // (summed over steps).
    let mut stats = [0u64; 7];
    for op in ops {
        match op {
            Op::Map { iova, len, phys, prot, fail_nth } => {
                if len == 0 {
                    continue;
                }
                let end = iova + len;
                arm(&mut pt, fail_nth);
                let r = pt.map(iova, phys, len, prot);
                arm(&mut pt, None);
                let overlap = model_overlap(&m, iova, end);
                match r {
                    Ok(()) => {
                        prop_assert_eq!(overlap, None);
                        let hw = pt.format().leaf_prot(pt.format().leaf_entry(0, 0, prot));
                        m.insert(iova, (len, phys, hw));
                        stats[0] += 1;
                    }
                    Err(Error::AlreadyMapped { iova: at }) => {
                        stats[1] += 1;
                        prop_assert_eq!(Some(at), overlap)
                    }
                    Err(Error::NoMemory { .. }) => {
                        stats[2] += 1;
                        prop_assert!(fail_nth.is_some())
                    }
                    Err(e) => prop_assert!(false, "unexpected {e:?}"),
                }
            }
            Op::Unmap { iova, len, fail_nth } => {
                if len == 0 {
                    continue;
                }
                let before = gather.freed_tables;
                let deferred_before = pt.deferred_count();
                arm(&mut pt, fail_nth);
                let r = pt.try_unmap(iova, len, &mut gather);
                arm(&mut pt, None);
                match r {
                    Ok(n) => {
                        stats[3] += u64::from(n > 0);
                        prop_assert_eq!(n, model_remove(&mut m, iova, iova + len))
                    }
                    Err(p) => {
                        stats[4] += 1;
                        prop_assert!(fail_nth.is_some());
                        prop_assert!(p.iova >= iova && p.iova < iova + len);
                        let Error::NoMemory { iova: page, .. } = p.error else { panic!("{p:?}") };
                        prop_assert_eq!(page % M2, 0, "stops at a large page");
                        prop_assert_eq!(p.iova, page.max(iova));
                        prop_assert_eq!(p.unmapped, model_remove(&mut m, iova, p.iova));
                    }
                }
                prop_assert_eq!(gather.freed_tables - before, pt.deferred_count() - deferred_before);
            }
            Op::Sync => {
                let deferred = pt.deferred_count();
                prop_assert_eq!(pt.release_deferred(), deferred);
                prop_assert_eq!(pt.deferred_count(), 0);
                gather = IotlbGather::default();
            }
        }
        check(&pt, &m)?;
        raw_check(&pt, &m)?;
        pt.for_each_mapping(|_, size, _, _| {
            stats[5] += u64::from(size == G1);
            stats[6] += u64::from(size == M2);
        });
    }
    if std::env::var_os("MODEL_STATS").is_some() {
        eprintln!("STATS {stats:?}");
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: if cfg!(miri) { 3 } else { 200 },
        failure_persistence: if cfg!(miri) { None } else { ProptestConfig::default().failure_persistence },
        ..ProptestConfig::default()
    }
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..if cfg!(miri) { 6 } else { 40 })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn second_stage_3level_matches_model(coherent in any::<bool>(), ops in ops()) {
        run(VtdSecondStage::new(3).unwrap().with_snoop_control(true), coherent, ops)?;
    }

    #[test]
    fn second_stage_4level_2m_only_matches_model(ops in ops()) {
        run(VtdSecondStage::new(4).unwrap().with_large_pages(true, false), false, ops)?;
    }

    #[test]
    fn first_stage_matches_model(one_gib in any::<bool>(), ops in ops()) {
        run(X86FirstStage::four_level().with_1g_pages(one_gib), true, ops)?;
    }

    #[test]
    fn amd_v1_3level_matches_model(coherent in any::<bool>(), ops in ops()) {
        run_checked(AmdV1::new(3).unwrap(), coherent, ops, amd_raw_check)?;
    }

    #[test]
    fn amd_v1_4level_matches_model(
        two_mib in any::<bool>(),
        one_gib in any::<bool>(),
        force_coherent in any::<bool>(),
        ops in ops(),
    ) {
        let format = AmdV1::new(4).unwrap().with_large_pages(two_mib, one_gib).with_force_coherent(force_coherent);
        run_checked(format, false, ops, amd_raw_check)?;
    }

    #[test]
    fn amd_v1_6level_matches_model(ops in ops()) {
        run_checked(AmdV1::new(6).unwrap(), true, ops, amd_raw_check)?;
    }
}
