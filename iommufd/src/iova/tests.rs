use super::*;
use crate::errno::Errno;
use ::alloc::vec::Vec;
use proptest::prelude::*;

const MAX: u64 = u64::MAX;

fn collect<V: Clone>(m: &IntervalMap<V>) -> Vec<(u64, u64, V)> {
    m.iter().map(|(s, l, v)| (s, l, v.clone())).collect()
}

// ---------------------------------------------------------------- IntervalMap

#[test]
fn map_insert_and_overlap_rules() {
    let mut m = IntervalMap::new();
    assert!(m.is_empty());
    assert_eq!(m.insert(10, 19, 'a'), Ok(()));
    // Touching on both sides is fine.
    assert_eq!(m.insert(20, 29, 'b'), Ok(()));
    assert_eq!(m.insert(0, 9, 'c'), Ok(()));
    // Overlap by one byte at either end.
    assert_eq!(m.insert(29, 40, 'x'), Err(IntervalError::Overlap { start: 20, last: 29 }));
    assert_eq!(m.insert(5, 5, 'x'), Err(IntervalError::Overlap { start: 0, last: 9 }));
    // Reported conflict is the lowest one.
    assert_eq!(m.insert(9, 20, 'x'), Err(IntervalError::Overlap { start: 0, last: 9 }));
    // Covering several.
    assert_eq!(m.insert(0, MAX, 'x'), Err(IntervalError::Overlap { start: 0, last: 9 }));
    assert_eq!(m.insert(7, 6, 'x'), Err(IntervalError::Invalid { start: 7, last: 6 }));
    assert_eq!(m.len(), 3);
    assert_eq!(collect(&m), [(0, 9, 'c'), (10, 19, 'a'), (20, 29, 'b')]);
}

#[test]
fn map_bounds_zero_and_max() {
    let mut m = IntervalMap::new();
    m.insert(0, 0, 1).unwrap();
    m.insert(MAX, MAX, 2).unwrap();
    m.insert(1, MAX - 1, 3).unwrap();
    assert_eq!(m.get_containing(0).map(|x| x.2), Some(&1));
    assert_eq!(m.get_containing(MAX).map(|x| x.2), Some(&2));
    assert_eq!(m.get_containing(MAX - 1).map(|x| (x.0, x.1)), Some((1, MAX - 1)));
    assert!(m.span_is_fully_covered(0, MAX));
    assert_eq!(m.iter_overlapping(0, MAX).count(), 3);
    assert_eq!(m.iter_overlapping(MAX, MAX).count(), 1);
    assert_eq!(m.last_overlapping(0, MAX).map(|x| x.0), Some(MAX));
    assert_eq!(m.remove(MAX), Some((MAX, MAX, 2)));
    assert!(!m.span_is_fully_covered(0, MAX));
    assert!(m.span_is_fully_covered(0, MAX - 1));
    assert!(m.get_containing(MAX).is_none());
    assert!(m.split(MAX - 1, |_, off| {
        assert_eq!(off, MAX - 2);
        4
    }));
    assert_eq!(m.get(MAX - 1), Some((MAX - 1, &4)));
    assert_eq!(m.get(1), Some((MAX - 2, &3)));
}

#[test]
fn map_queries() {
    let mut m = IntervalMap::new();
    m.insert(100, 199, 1).unwrap();
    m.insert(300, 399, 2).unwrap();
    m.insert(400, 499, 3).unwrap();
    assert!(m.get_containing(99).is_none());
    assert_eq!(m.get_containing(100).map(|x| x.0), Some(100));
    assert_eq!(m.get_containing(199).map(|x| x.0), Some(100));
    assert!(m.get_containing(200).is_none());
    assert!(m.get_containing(299).is_none());
    assert_eq!(m.get_containing(400).map(|x| x.0), Some(400));
    let starts = |a, b| m.iter_overlapping(a, b).map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(starts(0, 99), []);
    assert_eq!(starts(0, 100), [100]);
    assert_eq!(starts(199, 300), [100, 300]);
    assert_eq!(starts(200, 299), []);
    assert_eq!(starts(150, 1000), [100, 300, 400]);
    assert_eq!(starts(399, 400), [300, 400]);
    assert_eq!(starts(500, 400), []); // inverted
    assert!(m.iter_overlapping(150, 450).rev().map(|x| x.0).eq([400, 300, 100]));
    assert!(m.any_overlap(199, 199));
    assert!(!m.any_overlap(200, 299));
    assert!(!m.any_overlap(5, 4));
    assert_eq!(m.first_overlapping(250, 1000).map(|x| x.0), Some(300));
    assert_eq!(m.last_overlapping(0, 350).map(|x| x.0), Some(300));
    assert_eq!(m.last_overlapping(0, 99), None);
    assert_eq!(m.last_overlapping(10, 9), None);
    assert_eq!(m.next_start_at_or_after(101), Some(300));
    assert_eq!(m.next_start_at_or_after(500), None);
    // get / get_mut are by exact start.
    assert_eq!(m.get(101), None);
    *m.get_mut(300).unwrap().1 = 20;
    assert_eq!(m.get(300), Some((399, &20)));
    *m.get_containing_mut(450).unwrap().2 = 30;
    assert_eq!(m.get(400), Some((499, &30)));
    for (_, _, v) in m.iter_mut() {
        *v += 1;
    }
    assert_eq!(collect(&m), [(100, 199, 2), (300, 399, 21), (400, 499, 31)]);
    assert_eq!(m.remove(301), None);
    assert_eq!(m.remove(300), Some((300, 399, 21)));
    m.clear();
    assert!(m.is_empty());
    assert_eq!(m.len(), 0);
}

#[test]
fn map_coverage_and_containment() {
    let mut m = IntervalMap::new();
    m.insert(10, 19, ()).unwrap();
    m.insert(20, 29, ()).unwrap();
    m.insert(31, 40, ()).unwrap();
    assert!(m.span_is_fully_covered(10, 29));
    assert!(m.span_is_fully_covered(15, 25));
    assert!(m.span_is_fully_covered(12, 12));
    assert!(!m.span_is_fully_covered(9, 29));
    assert!(!m.span_is_fully_covered(10, 30));
    assert!(!m.span_is_fully_covered(10, 35));
    assert!(!m.span_is_fully_covered(30, 30));
    assert!(!m.span_is_fully_covered(29, 28));
    assert!(!IntervalMap::<()>::new().span_is_fully_covered(0, 0));

    assert!(m.overlapping_are_within(10, 40));
    assert!(m.overlapping_are_within(0, MAX));
    assert!(m.overlapping_are_within(30, 30)); // none
    assert!(m.overlapping_are_within(20, 29));
    assert!(!m.overlapping_are_within(11, 40));
    assert!(!m.overlapping_are_within(10, 39));
    assert!(!m.overlapping_are_within(25, 25));
}

#[test]
fn map_split() {
    let mut m = IntervalMap::new();
    m.insert(100, 199, (7u32, 0u64)).unwrap();
    // At the start, below, above, or outside: nothing happens.
    let never = |_: &mut (u32, u64), _| -> (u32, u64) { panic!("called") };
    assert!(!m.split(100, never));
    assert!(!m.split(99, never));
    assert!(!m.split(200, never));
    assert!(!m.split(0, never));
    assert!(!IntervalMap::<u8>::new().split(5, |_, _| 0));
    // Cut at the last byte.
    assert!(m.split(199, |v, off| {
        assert_eq!(off, 99);
        v.0 = 8;
        (9, v.1 + off)
    }));
    assert_eq!(collect(&m), [(100, 198, (8, 0)), (199, 199, (9, 99))]);
    // Cut one past the start.
    assert!(m.split(101, |v, off| (v.0, v.1 + off)));
    assert_eq!(collect(&m), [(100, 100, (8, 0)), (101, 198, (8, 1)), (199, 199, (9, 99))]);
    assert!(m.span_is_fully_covered(100, 199));
}

// ------------------------------------------------------------------- RangeSet

#[test]
fn range_set_normalizes() {
    let s = RangeSet::from_ranges(&[(10, 19), (20, 29), (40, 49), (45, 60), (0, 0)]).unwrap();
    assert_eq!(s.iter().collect::<Vec<_>>(), [(0, 0), (10, 29), (40, 60)]);
    assert_eq!(s.len(), 3);
    assert_eq!(RangeSet::from_ranges(&[(1, 0)]), Err(IntervalError::Invalid { start: 1, last: 0 }));
    // Bridging several spans, touching at both ends.
    let mut s = s;
    s.insert(1, 39).unwrap();
    assert_eq!(s.iter().collect::<Vec<_>>(), [(0, 60)]);
    // Contained: no change.
    s.insert(5, 6).unwrap();
    assert_eq!(s.iter().collect::<Vec<_>>(), [(0, 60)]);
    // Bounds.
    let mut s = RangeSet::new();
    s.insert(MAX, MAX).unwrap();
    s.insert(0, 0).unwrap();
    assert_eq!(s.iter().collect::<Vec<_>>(), [(0, 0), (MAX, MAX)]);
    s.insert(2, MAX - 1).unwrap();
    assert_eq!(s.iter().collect::<Vec<_>>(), [(0, 0), (2, MAX)]);
    s.insert(1, 1).unwrap();
    assert_eq!(s.iter().collect::<Vec<_>>(), [(0, MAX)]);
    assert!(s.contains_range(0, MAX));
    s.clear();
    assert!(s.is_empty());
}

#[test]
fn range_set_strict_like_allow_iovas() {
    let s = RangeSet::from_disjoint_ranges(&[(20, 29), (0, 9), (10, 19), (MAX - 1, MAX)]).unwrap();
    assert_eq!(s.iter().collect::<Vec<_>>(), [(0, 29), (MAX - 1, MAX)]);
    assert_eq!(RangeSet::from_disjoint_ranges(&[(5, 5)]), Err(IntervalError::Invalid { start: 5, last: 5 }));
    assert_eq!(
        RangeSet::from_disjoint_ranges(&[(0, 9), (10, 19), (19, 30)]),
        Err(IntervalError::Overlap { start: 0, last: 19 })
    );
    assert_eq!(RangeSet::from_disjoint_ranges(&[]), Ok(RangeSet::new()));
}

#[test]
fn range_set_queries() {
    let s = RangeSet::from_ranges(&[(10, 19), (30, 39), (MAX - 9, MAX)]).unwrap();
    assert!(s.contains(10) && s.contains(19) && !s.contains(20) && !s.contains(9));
    assert!(s.contains(MAX));
    assert!(s.contains_range(10, 19));
    assert!(s.contains_range(12, 12));
    assert!(!s.contains_range(10, 20));
    assert!(!s.contains_range(9, 19));
    assert!(!s.contains_range(10, 39));
    assert!(!s.contains_range(12, 11));
    assert!(s.contains_range(MAX - 9, MAX));
    assert_eq!(s.span_containing(35), Some((30, 39)));
    assert_eq!(s.span_containing(25), None);
    assert!(s.any_overlap(0, 10));
    assert!(s.any_overlap(19, 30));
    assert!(!s.any_overlap(20, 29));
    assert!(!s.any_overlap(30, 29));
    assert_eq!(s.iter_overlapping(15, 35).collect::<Vec<_>>(), [(10, 19), (30, 39)]);
    assert_eq!(s.iter_overlapping(MAX, MAX).count(), 1);
    assert_eq!(s.next_start_at_or_after(11), Some(30));
    assert!(RangeSet::new().is_empty());
}

// ------------------------------------------------------------- ReservedRanges

#[test]
fn reserved_owners() {
    let mut r = ReservedRanges::new();
    assert!(r.is_empty());
    r.add(100, 199, 1u8).unwrap();
    r.add(150, 249, 2).unwrap(); // overlaps another owner
    r.add(100, 199, 2).unwrap(); // duplicate range, other owner
    r.add(0, 0, 3).unwrap();
    r.add(MAX, MAX, 3).unwrap();
    assert_eq!(r.add(5, 4, 1), Err(IntervalError::Invalid { start: 5, last: 4 }));
    assert_eq!(r.len(), 5);
    assert_eq!(r.iter().collect::<Vec<_>>(), [(0, 0, 3), (100, 199, 1), (100, 199, 2), (150, 249, 2), (MAX, MAX, 3)]);
    assert_eq!(r.union().iter().collect::<Vec<_>>(), [(0, 0), (100, 249), (MAX, MAX)]);
    assert!(r.any_overlap(249, 300) && !r.any_overlap(250, MAX - 1));
    assert!(r.contains(0) && r.contains(MAX) && !r.contains(1));
    assert_eq!(r.first_overlapping(160, 160), Some((100, 199, 1)));
    assert_eq!(r.first_overlapping(200, 300), Some((150, 249, 2)));
    assert_eq!(r.first_overlapping(250, 300), None);
    assert_eq!(r.iter_owner(2).collect::<Vec<_>>(), [(100, 199), (150, 249)]);

    assert_eq!(r.remove_owner(2), 2);
    assert_eq!(r.remove_owner(2), 0);
    assert_eq!(r.union().iter().collect::<Vec<_>>(), [(0, 0), (100, 199), (MAX, MAX)]);
    assert!(!r.any_overlap(200, 249));
    assert_eq!(r.remove_owner(1), 1);
    assert_eq!(r.remove_owner(3), 2);
    assert!(r.is_empty() && r.union().is_empty());
}

// ------------------------------------------------------------------ alignment

#[test]
fn alignment_follows_linux() {
    const P: u64 = 4096;
    const M: u64 = 1 << 20;
    assert_eq!(iova_alignment(0, 0, P), Err(Errno::EOVERFLOW));
    assert_eq!(iova_alignment(MAX / 2, 0, P), Err(Errno::EOVERFLOW));
    assert_eq!(iova_alignment(MAX, 0, P), Err(Errno::EOVERFLOW));
    // Round up, not down.
    assert_eq!(iova_alignment(0x3000, 0, P), Ok(0x4000));
    assert_eq!(iova_alignment(0x4000, 0, P), Ok(0x4000));
    assert_eq!(iova_alignment(1, 0, P), Ok(1));
    assert_eq!(iova_alignment(3, 0, P), Ok(4));
    // Lowest set bit of the address.
    assert_eq!(iova_alignment(0x3000, 0x7000_1000, P), Ok(0x1000));
    assert_eq!(iova_alignment(0x100, 0x1_0800, P), Ok(0x100));
    assert_eq!(iova_alignment(0x3000, 0x1003, P), Ok(1));
    // Capped at HPAGE_SIZE = 2 MiB.
    assert_eq!(huge_page_size(P), 2 * M);
    assert_eq!(iova_alignment(1 << 30, 1 << 30, P), Ok(2 * M));
    assert_eq!(iova_alignment(MAX / 2 - 1, 0, P), Ok(2 * M));
    assert_eq!(iova_alignment(3 * M, 0x40_0000, P), Ok(2 * M));
    assert_eq!(iova_alignment(M, 0, P), Ok(M));
}

// ------------------------------------------------------------------ allocation

type Space<'a> = IovaSpace<'a, (), u8>;

#[test]
fn alloc_empty_space_skips_page_zero() {
    let (a, al, r) = (IntervalMap::<()>::new(), RangeSet::new(), ReservedRanges::<u8>::new());
    let sp = Space::new(&a, &al, &r);
    assert_eq!(sp.alloc(0x1000, 0x1000, 0), Some(0x1000));
    assert_eq!(sp.alloc(1, 1, 0), Some(0x1000));
    assert_eq!(sp.alloc(0x3000, 0x4000, 0), Some(0x4000));
    assert_eq!(sp.alloc(0x1000, 0x20_0000, 0), Some(0x20_0000));
    // Page offset OR-ed in.
    assert_eq!(sp.alloc(0x100, 0x100, 0x800), Some(0x1800));
    // Bad arguments.
    assert_eq!(sp.alloc(0, 1, 0), None);
    assert_eq!(sp.alloc(1, 3, 0), None);
    assert_eq!(sp.alloc(1, 0, 0), None);
    // Whole window is [4096, MAX - 4096].
    let window = MAX - 0x1000 - 0x1000 + 1;
    assert_eq!(sp.alloc(window - 1, 1, 0), Some(0x1000));
    // Exactly the window's size still fits.
    assert_eq!(sp.alloc(window, 1, 0), Some(0x1000));
    assert_eq!(sp.alloc(window + 1, 1, 0), None);
    assert_eq!(alloc_iova(0x1000, 0x1000, &a, &al, &r, (0, MAX)), Some(0x1000));
}

#[test]
fn alloc_skips_areas_reserved_and_respects_allowed() {
    let mut a = IntervalMap::new();
    a.insert(0x1000, 0x1fff, ()).unwrap();
    a.insert(0x2000, 0x2fff, ()).unwrap(); // adjacent areas
    let mut r = ReservedRanges::new();
    r.add(0x3000, 0x3fff, 1u8).unwrap(); // touching the areas
    r.add(0x3800, 0x4fff, 2).unwrap(); // overlapping another reserved
    let al = RangeSet::new();
    let sp = IovaSpace::new(&a, &al, &r);
    assert_eq!(sp.alloc(0x1000, 0x1000, 0), Some(0x5000));
    assert_eq!(sp.alloc(0x2000, 0x2000, 0), Some(0x6000));
    // Allowed ranges: skip spans too small after alignment.
    let al = RangeSet::from_ranges(&[(0x1000, 0x5fff), (0x7001, 0x9000), (0x10000, 0x1ffff)]).unwrap();
    let sp = IovaSpace::new(&a, &al, &r);
    assert_eq!(sp.alloc(0x1000, 0x1000, 0), Some(0x5000));
    assert_eq!(sp.alloc(0x2000, 0x1000, 0), Some(0x10000));
    assert_eq!(sp.alloc(0x10, 0x10, 0), Some(0x5000));
    // Reserved sitting in the allowed span: hole search continues past it.
    assert_eq!(sp.alloc(0x1001, 1, 0), Some(0x7001));
    // Nothing fits: ENOSPC.
    assert_eq!(sp.alloc(0x10001, 1, 0), None);
    assert_eq!(sp.alloc_for_addr(0, 0x10001, 1), Err(Errno::ENOSPC));
    // Allowed ranges entirely inside page 0 or the last page: nothing.
    let al = RangeSet::from_ranges(&[(0, 0xfff), (MAX - 0xfff, MAX)]).unwrap();
    let sp = IovaSpace::new(&a, &al, &r);
    assert_eq!(sp.alloc(1, 1, 0), None);
}

#[test]
fn alloc_one_byte_quirk() {
    // Linux rejects a candidate equal to the last byte of a hole, even for
    // a one-byte length.
    let mut a = IntervalMap::new();
    a.insert(0x1001, 0x1fff, ()).unwrap();
    let (al, r) = (RangeSet::new(), ReservedRanges::<u8>::new());
    let sp = IovaSpace::new(&a, &al, &r);
    assert_eq!(sp.alloc(1, 1, 0), Some(0x2000));
    a.remove(0x1001);
    a.insert(0x1002, 0x1fff, ()).unwrap();
    let sp = IovaSpace::new(&a, &al, &r);
    assert_eq!(sp.alloc(1, 1, 0), Some(0x1000));
    assert_eq!(sp.alloc(2, 1, 0), Some(0x1000));
    assert_eq!(sp.alloc(3, 1, 0), Some(0x2000));
}

#[test]
fn alloc_top_of_space_and_align_overflow() {
    let mut a = IntervalMap::new();
    // Leave only [MAX - 0x3fff, MAX - 0x1000] (window ends at MAX - 0x1000).
    a.insert(0, MAX - 0x4000, ()).unwrap();
    let (al, r) = (RangeSet::new(), ReservedRanges::<u8>::new());
    let sp = IovaSpace::new(&a, &al, &r);
    assert_eq!(sp.alloc(0x3000, 0x1000, 0), Some(MAX - 0x3fff));
    assert_eq!(sp.alloc(0x3001, 0x1000, 0), None);
    assert_eq!(sp.alloc(0x1000, 0x4000, 0), Some(MAX - 0x3fff));
    assert_eq!(sp.alloc(0x1000, 0x4000, 0x1000), Some(MAX - 0x2fff));
    // Rounding the hole start up to 32 KiB or 2 MiB overflows: nothing,
    // no wrap-around to low addresses.
    assert_eq!(sp.alloc(0x1000, 0x8000, 0), None);
    assert_eq!(sp.alloc(0x1000, 0x20_0000, 0), None);
    assert_eq!(sp.alloc(1, 1 << 63, 0), None);
    // The aperture cuts the top.
    let sp = sp.with_aperture((0, MAX - 0x2000));
    assert_eq!(sp.alloc(0x2000, 0x1000, 0), Some(MAX - 0x3fff));
    assert_eq!(sp.alloc(0x3000, 0x1000, 0), None);
}

#[test]
fn alloc_aperture_equals_reserving_outside() {
    let mut a = IntervalMap::new();
    a.insert(0x10_0000, 0x10_ffff, ()).unwrap();
    let al = RangeSet::new();
    let r = ReservedRanges::<u8>::new();
    let ap = (0x8_0000, 0x1f_ffff);
    let via_aperture = IovaSpace::new(&a, &al, &r).with_aperture(ap);
    let mut r2 = ReservedRanges::new();
    r2.add(0, ap.0 - 1, 9u8).unwrap();
    r2.add(ap.1 + 1, MAX, 9).unwrap();
    let via_reserved = IovaSpace::new(&a, &al, &r2);
    for (len, align) in [(0x1000, 0x1000), (0x8_0000, 0x8_0000), (0x9_0000, 0x1000), (0x10_0000, 1)] {
        assert_eq!(via_aperture.alloc(len, align, 0), via_reserved.alloc(len, align, 0), "len {len:#x}");
    }
    assert_eq!(via_aperture.alloc(0x1000, 0x1000, 0), Some(0x8_0000));
    assert_eq!(via_aperture.alloc(0x8_0000, 0x8_0000, 0), Some(0x8_0000));
    assert_eq!(via_aperture.alloc(0x8_0001, 0x1000, 0), Some(0x11_0000));
    assert_eq!(via_aperture.alloc(0x10_0000, 1, 0), None);
}

#[test]
fn alloc_for_addr_errnos() {
    let (a, al, r) = (IntervalMap::<()>::new(), RangeSet::new(), ReservedRanges::<u8>::new());
    let sp = Space::new(&a, &al, &r);
    assert_eq!(sp.alloc_for_addr(0x7000, 0, 1), Err(Errno::EOVERFLOW));
    assert_eq!(sp.alloc_for_addr(0x7000, MAX / 2, 1), Err(Errno::EOVERFLOW));
    // VA aligned to 4 KiB only, but the IOAS needs 8 KiB.
    assert_eq!(sp.alloc_for_addr(0x7000, 0x2000, 0x2000), Err(Errno::EINVAL));
    // A 2 MiB-aligned VA with a 4 MiB length gets a 2 MiB-aligned IOVA.
    assert_eq!(sp.alloc_for_addr(0x4020_0000, 0x40_0000, 0x1000), Ok(0x20_0000));
    // Sub-page offset carried into the IOVA.
    assert_eq!(sp.alloc_for_addr(0x1_0800, 0x100, 1), Ok(0x1800));
    assert_eq!(sp.alloc_for_addr(0x1_0803, 0x100, 1), Ok(0x1803));
    // Null address: alignment from the length alone.
    assert_eq!(sp.alloc_for_addr(0, 0x3000, 1), Ok(0x4000));
}

#[test]
fn holes_walk() {
    let mut a = IntervalMap::new();
    a.insert(10, 19, ()).unwrap();
    a.insert(20, 29, ()).unwrap();
    a.insert(50, 59, ()).unwrap();
    let mut r = ReservedRanges::new();
    r.add(30, 34, 0u8).unwrap();
    r.add(55, 70, 0u8).unwrap();
    let al = RangeSet::new();
    let sp = IovaSpace::new(&a, &al, &r);
    let h = |s, l| sp.holes(s, l).collect::<Vec<_>>();
    assert_eq!(h(0, 100), [(0, 9), (35, 49), (71, 100)]);
    assert_eq!(h(12, 52), [(35, 49)]);
    assert_eq!(h(10, 34), []);
    assert_eq!(h(5, 5), [(5, 5)]);
    assert_eq!(h(6, 5), []);
    assert_eq!(h(71, MAX), [(71, MAX)]);
    let sp = sp.with_aperture((40, 80));
    assert_eq!(sp.holes(0, 100).collect::<Vec<_>>(), [(40, 49), (71, 80)]);
    assert_eq!(last_of(MAX, 1), Some(MAX));
    assert_eq!(last_of(MAX, 2), None);
    assert_eq!(last_of(5, 0), None);
}

// ----------------------------------------------------------------- proptests

/// Brute-force reference for IntervalMap: a plain list.
#[derive(Debug, Clone, Copy)]
enum MapOp {
    Insert(u64, u64),
    Remove(u64),
    Split(u64),
}

fn map_op(span: u64) -> impl Strategy<Value = MapOp> {
    prop_oneof![
        3 => (0..span, 0..span / 8).prop_map(|(s, len)| MapOp::Insert(s, len)),
        1 => (0..span).prop_map(MapOp::Remove),
        2 => (0..span).prop_map(MapOp::Split),
    ]
}

fn model_overlapping(v: &[(u64, u64, u64)], s: u64, l: u64) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<_> = v.iter().copied().filter(|&(a, b, _)| a <= l && b >= s).collect();
    out.sort_unstable();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random inserts/removes/splits against a Vec model, at the bottom or
    /// the very top of the u64 space.
    #[test]
    fn prop_interval_map_model(
        top in any::<bool>(),
        ops in prop::collection::vec(map_op(256), 1..60),
        probes in prop::collection::vec((0u64..300, 0u64..40), 8),
    ) {
        let base = if top { MAX - 255 } else { 0 };
        let mut m: IntervalMap<u64> = IntervalMap::new();
        let mut model: Vec<(u64, u64, u64)> = Vec::new();
        let mut next_id = 0u64;
        for op in ops {
            match op {
                MapOp::Insert(s, len) => {
                    let s = base + s;
                    let l = s.saturating_add(len).min(base + 255);
                    let clash = model_overlapping(&model, s, l);
                    let got = m.insert(s, l, next_id);
                    match clash.first() {
                        Some(&(cs, cl, _)) => prop_assert_eq!(got, Err(IntervalError::Overlap { start: cs, last: cl })),
                        None => {
                            prop_assert_eq!(got, Ok(()));
                            model.push((s, l, next_id));
                        }
                    }
                    next_id += 1;
                }
                MapOp::Remove(k) => {
                    // Aim at an existing start half of the time.
                    let k = if k % 2 == 0 && !model.is_empty() {
                        model[(k as usize / 2) % model.len()].0
                    } else {
                        base + k
                    };
                    let want = model.iter().position(|e| e.0 == k).map(|i| model.remove(i));
                    prop_assert_eq!(m.remove(k), want);
                }
                MapOp::Split(at) => {
                    let at = base + at;
                    let hit = model.iter().position(|&(s, l, _)| s < at && at <= l);
                    let did = m.split(at, |v, off| *v * 1000 + off);
                    prop_assert_eq!(did, hit.is_some());
                    if let Some(i) = hit {
                        let (s, l, v) = model[i];
                        model[i] = (s, at - 1, v);
                        model.push((at, l, v * 1000 + (at - s)));
                    }
                }
            }
            model.sort_unstable();
            prop_assert_eq!(collect(&m), model.clone());
            prop_assert_eq!(m.len(), model.len());
        }
        for (p, len) in probes {
            let s = base.saturating_add(p);
            let l = s.saturating_add(len);
            let want = model_overlapping(&model, s, l);
            let got: Vec<_> = m.iter_overlapping(s, l).map(|(a, b, v)| (a, b, *v)).collect();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(m.any_overlap(s, l), !want.is_empty());
            prop_assert_eq!(m.first_overlapping(s, l).map(|x| x.0), want.first().map(|x| x.0));
            prop_assert_eq!(m.last_overlapping(s, l).map(|x| x.0), want.last().map(|x| x.0));
            let cont = model.iter().find(|e| e.0 <= s && s <= e.1).map(|e| e.0);
            prop_assert_eq!(m.get_containing(s).map(|x| x.0), cont);
            let covered = (s..=l).all(|x| model.iter().any(|e| e.0 <= x && x <= e.1));
            prop_assert_eq!(m.span_is_fully_covered(s, l), covered);
            let within = want.iter().all(|e| e.0 >= s && e.1 <= l);
            prop_assert_eq!(m.overlapping_are_within(s, l), within);
        }
    }

    /// RangeSet against a bitmap over a 512-byte space (at 0 or at the top).
    #[test]
    fn prop_range_set_model(
        top in any::<bool>(),
        ranges in prop::collection::vec((0u64..512, 0u64..64), 0..12),
        probes in prop::collection::vec((0u64..512, 0u64..64), 8),
    ) {
        let base = if top { MAX - 511 } else { 0 };
        let mut bits = [false; 512];
        let mut rs = Vec::new();
        for (s, len) in ranges {
            let l = (s + len).min(511);
            bits[s as usize..=l as usize].iter_mut().for_each(|b| *b = true);
            rs.push((base + s, base + l));
        }
        let set = RangeSet::from_ranges(&rs).unwrap();
        // Normalized: sorted, disjoint, not touching.
        let spans: Vec<_> = set.iter().collect();
        for w in spans.windows(2) {
            prop_assert!(w[0].1 + 1 < w[1].0);
        }
        for (i, &b) in bits.iter().enumerate() {
            prop_assert_eq!(set.contains(base + i as u64), b);
        }
        prop_assert_eq!(set.is_empty(), !bits.iter().any(|&b| b));
        for (s, len) in probes {
            let l = (s + len).min(511);
            let all = bits[s as usize..=l as usize].iter().all(|&b| b);
            let any = bits[s as usize..=l as usize].iter().any(|&b| b);
            prop_assert_eq!(set.contains_range(base + s, base + l), all);
            prop_assert_eq!(set.any_overlap(base + s, base + l), any);
        }
    }

    /// ReservedRanges: adds and owner removals against a list.
    #[test]
    fn prop_reserved_model(
        ops in prop::collection::vec((0u8..4, 0u64..512, 0u64..64, any::<bool>()), 1..30),
        probes in prop::collection::vec((0u64..512, 0u64..64), 8),
    ) {
        let mut r = ReservedRanges::new();
        let mut model: Vec<(u64, u64, u8)> = Vec::new();
        for (owner, s, len, remove) in ops {
            if remove {
                let n = model.iter().filter(|e| e.2 == owner).count();
                model.retain(|e| e.2 != owner);
                prop_assert_eq!(r.remove_owner(owner), n);
            } else {
                r.add(s, s + len, owner).unwrap();
                model.push((s, s + len, owner));
            }
            let mut sorted = model.clone();
            sorted.sort_by_key(|e| (e.0, e.1));
            let got: Vec<_> = r.iter().collect();
            // Same multiset of entries, sorted by range.
            let mut a = got.clone();
            a.sort_unstable();
            let mut b = sorted.clone();
            b.sort_unstable();
            prop_assert_eq!(a, b);
            prop_assert!(got.windows(2).all(|w| (w[0].0, w[0].1) <= (w[1].0, w[1].1)));
        }
        for (s, len) in probes {
            let l = s + len;
            let want = model.iter().any(|e| e.0 <= l && e.1 >= s);
            prop_assert_eq!(r.any_overlap(s, l), want);
            let first = r.first_overlapping(s, l);
            prop_assert_eq!(first.is_some(), want);
            if let Some(f) = first {
                prop_assert!(f.0 <= l && f.1 >= s);
                prop_assert!(model.iter().filter(|e| e.0 <= l && e.1 >= s).all(|e| (e.0, e.1) >= (f.0, f.1)));
            }
        }
    }
}

/// The allocation scenario for the brute-force checks: a 16-bit space.
#[derive(Debug, Clone)]
struct Scene {
    areas: Vec<(u64, u64)>,
    reserved: Vec<(u64, u64)>,
    allowed: Vec<(u64, u64)>,
    aperture: (u64, u64),
    page_size: u64,
    length: u64,
    addr: u64,
}

const SPACE: u64 = 1 << 16;

fn range16(max_len: u64) -> impl Strategy<Value = (u64, u64)> {
    (0..SPACE, 0..max_len).prop_map(|(s, len)| (s, (s + len).min(SPACE - 1)))
}

fn scene() -> impl Strategy<Value = Scene> {
    (
        prop::collection::vec(range16(0x2000), 0..24),
        prop::collection::vec(range16(0x1000), 0..4),
        prop_oneof![
            1 => Just(Vec::new()),
            2 => prop::collection::vec(range16(0x8000), 1..5),
        ],
        (0..SPACE / 4, SPACE / 2..SPACE),
        prop::sample::select(&[1u64, 16, 256, 4096][..]),
        prop_oneof![1u64..64, 1u64..0x4000],
        prop_oneof![Just(0u64), 0..SPACE, (0..SPACE / 16).prop_map(|x| x * 16)],
    )
        .prop_map(|(areas, reserved, allowed, aperture, page_size, length, addr)| Scene {
            areas,
            reserved,
            allowed,
            aperture,
            page_size,
            length,
            addr,
        })
}

/// Linux's search re-done byte by byte on a bitmap: per allowed span
/// (clipped to the window), fit the span start, then scan for maximal free
/// runs and fit each. Shares no code with `IovaSpace::alloc`.
fn brute_linux(blocked: &[bool], spans: &[(u64, u64)], length: u64, align: u64, po: u64) -> Option<u64> {
    let fits = |s: u64, l: u64| -> Option<u64> {
        let up = s.checked_add(align - 1)? / align * align;
        let c = up | po;
        (c < l && l - c >= length - 1).then_some(c)
    };
    for &(s, l) in spans {
        let Some(a) = fits(s, l) else { continue };
        let mut i = a;
        while i <= l {
            if blocked[i as usize] {
                i += 1;
                continue;
            }
            let hs = i;
            while i <= l && !blocked[i as usize] {
                i += 1;
            }
            if let Some(c) = fits(hs, i - 1) {
                return Some(c);
            }
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    /// `alloc_for_addr` on a 16-bit space (aperture inside it) against a
    /// bitmap re-run of Linux's algorithm, plus direct checks that the
    /// answer is free, aligned, allowed, and (no page offset) the lowest
    /// such IOVA leaving at least two bytes of room.
    #[test]
    fn prop_alloc_matches_brute_force(sc in scene()) {
        let mut areas = IntervalMap::new();
        for &(s, l) in &sc.areas {
            let _ = areas.insert(s, l, ());
        }
        let mut reserved = ReservedRanges::new();
        for (i, &(s, l)) in sc.reserved.iter().enumerate() {
            reserved.add(s, l, i as u8).unwrap();
        }
        let allowed = RangeSet::from_ranges(&sc.allowed).unwrap();
        let space = IovaSpace::new(&areas, &allowed, &reserved)
            .with_aperture(sc.aperture)
            .with_page_size(sc.page_size);

        let align = iova_alignment(sc.length, sc.addr, sc.page_size).unwrap();
        prop_assert!(align.is_power_of_two() && align <= sc.page_size * 512);
        let po = sc.addr % sc.page_size;
        let got = space.alloc_for_addr(sc.addr, sc.length, 1);

        // Bitmap: blocked = area, reserved or outside the aperture.
        let mut blocked = vec![false; SPACE as usize];
        for (i, b) in blocked.iter_mut().enumerate() {
            let x = i as u64;
            *b = x < sc.aperture.0 || x > sc.aperture.1 || reserved.contains(x)
                || areas.get_containing(x).is_some();
        }
        // Allowed spans clipped to the window [page_size, ..] and to the
        // 16-bit space (the aperture ends inside it anyway).
        let raw: Vec<(u64, u64)> = if allowed.is_empty() {
            vec![(0, SPACE - 1)]
        } else {
            allowed.iter().collect()
        };
        let spans: Vec<(u64, u64)> = raw
            .iter()
            .filter(|&&(_, l)| l >= sc.page_size)
            .map(|&(s, l)| (s.max(sc.page_size), l.min(SPACE - 1)))
            .filter(|&(s, l)| s <= l)
            .collect();
        let want = brute_linux(&blocked, &spans, sc.length, align, po);
        prop_assert_eq!(got, want.ok_or(Errno::ENOSPC));

        // Direct property checks, independent of the Linux walk.
        let in_one_span = |v: u64, last: u64| spans.iter().any(|&(s, l)| s <= v && last <= l);
        let room = |v: u64| -> bool {
            // One-byte requests still need a second free byte (Linux quirk).
            let last = v + sc.length.max(2) - 1;
            last < SPACE && in_one_span(v, last) && (v..=last).all(|x| !blocked[x as usize])
        };
        if let Ok(v) = got {
            let last = v + sc.length - 1;
            prop_assert!(v >= sc.page_size);
            prop_assert!(last < SPACE);
            prop_assert!(!areas.any_overlap(v, last));
            prop_assert!(!reserved.any_overlap(v, last));
            prop_assert!(sc.aperture.0 <= v && last <= sc.aperture.1);
            prop_assert!(allowed.is_empty() || allowed.contains_range(v, last));
            prop_assert_eq!(v & (align - 1), po & (align - 1));
            prop_assert!(room(v));
        }
        if po == 0 {
            let lowest = (0..SPACE).step_by(align as usize).find(|&v| room(v));
            prop_assert_eq!(got.ok(), lowest);
        }
    }

    /// Near the top of the u64 space with the real window
    /// [4096, MAX - 4096]: results stay in range, never wrap, and agree
    /// with an aperture expressed as reserved ranges.
    #[test]
    fn prop_alloc_top_of_space(
        areas in prop::collection::vec((0u64..256, 0u64..16), 0..16),
        length in 1u64..0x40_0000,
        addr in any::<u64>(),
        ap_lo in 0u64..64,
    ) {
        let mut m = IntervalMap::new();
        for (s, n) in areas {
            let s = MAX - (s << 14);
            let _ = m.insert(s, s.saturating_add(n << 12), ());
        }
        let al = RangeSet::new();
        let r = ReservedRanges::<u8>::new();
        let ap = (MAX - (ap_lo << 20), MAX);
        let sp = IovaSpace::new(&m, &al, &r).with_aperture(ap);
        let mut r2 = ReservedRanges::new();
        if ap.0 > 0 {
            r2.add(0, ap.0 - 1, 1u8).unwrap();
        }
        let sp2 = IovaSpace::new(&m, &al, &r2);
        let got = sp.alloc_for_addr(addr, length, 1);
        prop_assert_eq!(got, sp2.alloc_for_addr(addr, length, 1));
        if let Ok(v) = got {
            let last = last_of(v, length).unwrap();
            prop_assert!(v >= ap.0 && last <= MAX - 4096);
            prop_assert!(!m.any_overlap(v, last));
        }
    }
}
