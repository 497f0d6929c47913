//! IOVA allocation for maps without `IOMMU_IOAS_MAP_FIXED_IOVA`, giving
//! the same answer as Linux's `iopt_alloc_iova()`
//! (`drivers/iommu/iommufd/io_pagetable.c`) for the same state.
//!
//! # Linux's policy (as of the io_pagetable.c that also has
//! `iopt_map_file_pages`, v6.14 and later)
//!
//! `iopt_alloc_area_pages()` calls `iopt_alloc_iova(iopt, &iova, addr,
//! length)` with `addr` = the user VA of the first byte (for file maps, the
//! file offset) only after it has refused `length == 0` and a `length` that
//! is not a multiple of `iopt->iova_alignment` with `EINVAL`. Then:
//!
//! 1. `length == 0 || length >= ULONG_MAX / 2` gives `EOVERFLOW`.
//! 2. Alignment ([`iova_alignment`]): `roundup_pow_of_two(length)` (the
//!    smallest power of two `>= length`), lowered to the lowest set bit of
//!    `addr` when `addr != 0` (so the IOVA keeps the VA's alignment and huge
//!    pages stay possible), then capped at `HPAGE_SIZE` (2 MiB on x86-64)
//!    when the kernel has `CONFIG_TRANSPARENT_HUGEPAGE`, else at
//!    `PAGE_SIZE`. Kernels before that cap existed (the version still using
//!    an unchecked `ALIGN()`) did not cap at all and, for a one-byte length,
//!    accepted a candidate equal to the last byte of a hole.
//! 3. That alignment below `iopt->iova_alignment` gives `EINVAL`.
//! 4. Search, lowest address first, with `page_offset = addr % PAGE_SIZE`:
//!    * The allowed spans are walked in ascending order over the window
//!      `[PAGE_SIZE, ULONG_MAX - PAGE_SIZE]` (`interval_tree_for_each_span`
//!      over `allowed_itree`; spans are maximal unions of overlapping or
//!      touching allowed ranges, clipped to the window). With no allowed
//!      ranges the whole window is one span. So IOVA 0 (the whole first
//!      page) and the last page are never handed out.
//!    * Each span must pass the fit test below; the fitted start replaces
//!      the span's start.
//!    * Inside `[fitted start, span last]` the maximal holes not covered by
//!      any reserved range nor any area (`interval_tree_for_each_double_span`
//!      over `reserved_itree` and `area_itree`) are walked in ascending
//!      order; the first hole passing the fit test gives the IOVA: the
//!      fitted start of that hole.
//!    * Nothing found gives `ENOSPC`.
//!
//!    The fit test (`__alloc_iova_check_range`) on `[start, last]`:
//!    `aligned = ALIGN_UP(start, alignment) | page_offset`, failing if the
//!    round-up overflows; it passes iff `aligned < last` (strictly) and
//!    `last - aligned >= length - 1`.
//!
//! A domain's aperture is not a parameter in Linux: `iopt_table_add_domain`
//! reserves `[0, aperture_start - 1]` and `[aperture_end + 1, ULONG_MAX]` for
//! the domain. Clipping each hole to [`IovaSpace::aperture`] yields exactly
//! the holes those reservations would, so either way gives the same result.
//!
//! # This implementation
//!
//! [`IovaSpace::alloc`] does steps 4 with the same order and tests, walking
//! allowed spans in a [`RangeSet`] and holes between the (non-overlapping)
//! areas of an [`IntervalMap`] and the merged union of a
//! [`ReservedRanges`], each hop a `BTreeMap` range query. Its cost is
//! `O((s + k) log n)` for `s` allowed spans and `k` blockers visited, never
//! proportional to the number of bytes or pages.
//! [`IovaSpace::alloc_for_addr`] adds steps 1–3 and the errno.

use super::{IntervalMap, RangeSet, ReservedRanges};
use crate::errno::{Errno, Result};

/// Linux's `PAGE_SIZE` on x86-64.
pub const LINUX_PAGE_SIZE: u64 = 4096;

/// Page-table entries per table on x86-64; a PMD (huge) page maps this many
/// base pages.
pub const PTRS_PER_TABLE: u64 = 512;

/// Linux's `HPAGE_SIZE` for a base page size: the PMD page,
/// `page_size * 512` (2 MiB for 4 KiB pages on x86-64).
pub const fn huge_page_size(page_size: u64) -> u64 {
    page_size.saturating_mul(PTRS_PER_TABLE)
}

/// The IOVA alignment Linux's `iopt_alloc_iova()` picks for mapping
/// `length` bytes whose first byte is at user VA (or file offset) `uptr`,
/// for a kernel with base page `page_size` and transparent huge pages:
///
/// * `EOVERFLOW` if `length == 0 || length >= u64::MAX / 2`;
/// * else `a = length.next_power_of_two()` (`roundup_pow_of_two`);
/// * if `uptr != 0`, `a = min(a, 1 << uptr.trailing_zeros())`;
/// * then `a = min(a, huge_page_size(page_size))`.
///
/// The result is a power of two. (A kernel without
/// `CONFIG_TRANSPARENT_HUGEPAGE` caps at `page_size` instead.)
pub fn iova_alignment(length: u64, uptr: u64, page_size: u64) -> Result<u64> {
    if length == 0 || length >= u64::MAX / 2 {
        return Err(Errno::EOVERFLOW);
    }
    let mut align = length.next_power_of_two();
    if uptr != 0 {
        align = align.min(1u64 << uptr.trailing_zeros());
    }
    Ok(align.min(huge_page_size(page_size)))
}

/// Linux's fit test on the free range `[start, last]`: the candidate is
/// `ALIGN_UP(start, align) | page_offset`; see the module docs.
fn fit(start: u64, last: u64, length: u64, align: u64, page_offset: u64) -> Option<u64> {
    let mask = align - 1;
    let aligned = (start.checked_add(mask)? & !mask) | page_offset;
    (aligned < last && last - aligned >= length - 1).then_some(aligned)
}

/// Everything [`IovaSpace::alloc`] looks at: an IOAS's areas, allowed and
/// reserved ranges, plus the aperture and the page size.
#[derive(Debug)]
pub struct IovaSpace<'a, V, O> {
    /// The mapped areas.
    pub areas: &'a IntervalMap<V>,
    /// The allowed ranges (empty = everything allowed).
    pub allowed: &'a RangeSet,
    /// The reserved ranges.
    pub reserved: &'a ReservedRanges<O>,
    /// Only IOVAs in `[aperture.0, aperture.1]` are handed out; see the
    /// module docs. `(0, u64::MAX)` means no limit.
    pub aperture: (u64, u64),
    /// Linux's `PAGE_SIZE`: the first and last `page_size` bytes of the
    /// IOVA space are never handed out. Must be at least 1 and at most
    /// `u64::MAX / 2`.
    pub page_size: u64,
}

impl<'a, V, O: Copy + Eq> IovaSpace<'a, V, O> {
    /// A space with no aperture limit and 4 KiB pages.
    pub fn new(areas: &'a IntervalMap<V>, allowed: &'a RangeSet, reserved: &'a ReservedRanges<O>) -> Self {
        Self { areas, allowed, reserved, aperture: (0, u64::MAX), page_size: LINUX_PAGE_SIZE }
    }

    /// Sets [`Self::aperture`].
    pub fn with_aperture(mut self, aperture: (u64, u64)) -> Self {
        self.aperture = aperture;
        self
    }

    /// Sets [`Self::page_size`].
    pub fn with_page_size(mut self, page_size: u64) -> Self {
        self.page_size = page_size;
        self
    }

    /// The maximal free ranges inside `[start, last]` clipped to the
    /// aperture: free means covered by no area and no reserved range.
    /// Ascending.
    pub fn holes(&self, start: u64, last: u64) -> Holes<'a, V> {
        let start = start.max(self.aperture.0);
        let last = last.min(self.aperture.1);
        Holes { areas: self.areas, reserved: self.reserved.union(), next: (start <= last).then_some(start), last }
    }

    /// Linux's search (step 4 of the module docs) for `length` bytes with
    /// `align` and `page_offset`: the IOVA `iopt_alloc_iova()` would return,
    /// or `None` where it would fail with `ENOSPC`.
    ///
    /// `align` must be a power of two and `length` non-zero (else `None`).
    /// Linux always has `page_offset` a multiple of `align`; other values
    /// are applied the same way Linux would (OR-ed in).
    pub fn alloc(&self, length: u64, align: u64, page_offset: u64) -> Option<u64> {
        if length == 0 || !align.is_power_of_two() || self.page_size == 0 || self.page_size > u64::MAX / 2 {
            return None;
        }
        let (lo, hi) = (self.page_size, u64::MAX - self.page_size);
        if self.allowed.is_empty() {
            return self.alloc_in_span(lo, hi, length, align, page_offset);
        }
        self.allowed
            .iter_overlapping(lo, hi)
            .find_map(|(s, l)| self.alloc_in_span(s.max(lo), l.min(hi), length, align, page_offset))
    }

    fn alloc_in_span(&self, start: u64, last: u64, length: u64, align: u64, page_offset: u64) -> Option<u64> {
        let start = fit(start, last, length, align, page_offset)?;
        self.holes(start, last).find_map(|(hs, hl)| fit(hs, hl, length, align, page_offset))
    }

    /// The whole of Linux's `iopt_alloc_iova()` for a map of `length` bytes
    /// starting at user VA (or file offset) `addr`, in an IOAS whose
    /// `iova_alignment` is `iopt_alignment`: `EOVERFLOW` for a zero or huge
    /// length, `EINVAL` when the chosen alignment is below
    /// `iopt_alignment`, `ENOSPC` when nothing fits.
    pub fn alloc_for_addr(&self, addr: u64, length: u64, iopt_alignment: u64) -> Result<u64> {
        let align = iova_alignment(length, addr, self.page_size)?;
        if align < iopt_alignment {
            return Err(Errno::EINVAL);
        }
        self.alloc(length, align, addr % self.page_size).ok_or(Errno::ENOSPC)
    }
}

/// Iterator over maximal free ranges; see [`IovaSpace::holes`].
#[derive(Debug)]
pub struct Holes<'a, V> {
    areas: &'a IntervalMap<V>,
    reserved: &'a RangeSet,
    /// Where the next hole search starts; `None` when done.
    next: Option<u64>,
    last: u64,
}

impl<V> Iterator for Holes<'_, V> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let mut at = self.next.take()?;
        // Hop over whatever covers `at` until it is free.
        loop {
            let cover = match self.areas.get_containing(at) {
                Some((_, l, _)) => Some(l),
                None => self.reserved.span_containing(at).map(|(_, l)| l),
            };
            let Some(cover_last) = cover else { break };
            if cover_last >= self.last {
                return None;
            }
            at = cover_last + 1;
        }
        // `at` is free, so any blocker start found here is > at.
        let next_block = match (self.areas.next_start_at_or_after(at), self.reserved.next_start_at_or_after(at)) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        };
        let hole_last = match next_block {
            Some(b) if b <= self.last => b - 1,
            _ => self.last,
        };
        if hole_last < self.last {
            self.next = Some(hole_last + 1);
        }
        Some((at, hole_last))
    }
}

/// [`IovaSpace::alloc`] with page offset 0 and 4 KiB pages: the lowest
/// (Linux-policy) IOVA for `length` bytes aligned to `align`, inside the
/// allowed ranges (if any) and the aperture, clear of areas and reserved
/// ranges. `None` is Linux's `ENOSPC`.
pub fn alloc_iova<V, O: Copy + Eq>(
    length: u64,
    align: u64,
    areas: &IntervalMap<V>,
    allowed: &RangeSet,
    reserved: &ReservedRanges<O>,
    aperture: (u64, u64),
) -> Option<u64> {
    IovaSpace::new(areas, allowed, reserved).with_aperture(aperture).alloc(length, align, 0)
}
