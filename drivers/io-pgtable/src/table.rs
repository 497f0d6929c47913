//! The engine: one radix tree of 512-entry tables, walked iteratively.
//!
//! Invariants (hold between public calls):
//! * The root table exists for the whole life of a `PageTable` and is
//!   never freed before `Drop`.
//! * Every non-root table linked into the tree has at least one present
//!   entry. Map creates tables only to fill them (and unwinds empty ones on
//!   failure); unmap unlinks a table as soon as it becomes empty. Hence a
//!   present table entry always means "something is mapped below", which
//!   is how map detects overlaps without scanning.
//! * A table unlinked from the tree is not freed: it goes to the deferred
//!   list, because the walker may still hold or walk it until the IOTLB and
//!   paging-structure caches are invalidated. [`PageTable::release_deferred`]
//!   (called by the domain's `iotlb_sync`) frees them.
//! * `tables` counts the tables linked into the tree, root included;
//!   deferred tables are counted separately. Together they are everything
//!   this page table holds in its `TableMemory`.
//! * Every leaf maps a page aligned to its size at an output address below
//!   `1 << output_bits`, and lies inside the aperture.
//! * Entries are only ever replaced whole: not present → leaf or table,
//!   leaf or table → not present, large leaf → table of equivalent smaller
//!   leaves (split). A walker racing with the engine sees the old or the
//!   new translation, never a mix.
//!
//! Ownership: the `PageTable` owns its `TableMemory` and every table in it.
//! It is not internally synchronised: the caller serialises map/unmap (the
//! domain is `&mut self` throughout).

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::Ordering::Relaxed;
use core::sync::atomic::{AtomicBool, AtomicUsize};

use portcullis_iommu::{IotlbGather, IovaRange, PhysRun, Prot, push_run};

use crate::access::{Access, Concurrent, Exclusive};
use crate::flush::{FlushBatch, flush_lines, lines_of};
use crate::format::{Entry, PtFormat};
use crate::geometry::{index_of, level_shift, level_size, sizes_of_leaf_levels};

/// The leaf levels the engine uses from those a format allows: level 0 and
/// every level above it up to the first one missing. Splitting a leaf makes
/// leaves one level down, so a large page is only used when every smaller
/// size is allowed too (a unit offering 1 GiB but not 2 MiB pages gets
/// 4 KiB pages only).
fn usable_leaf_levels(allowed: u32) -> u32 {
    let mut levels = 1;
    while levels < 32 && allowed >> levels & 1 != 0 {
        levels += 1;
    }
    if levels >= 32 { u32::MAX } else { (1 << levels) - 1 }
}
use crate::memory::TableMemory;
use crate::{ENTRIES, Error, MAX_LEVELS, PAGE_SHIFT, PAGE_SIZE, TABLE_SIZE};

/// An unmap that stopped early because a large page that the range only
/// partly covers could not be split (no memory for the smaller table).
///
/// Contract: everything in `[start, iova)` is unmapped and added to the
/// gather; from `iova` to the end of the range everything translates
/// exactly as before (the large page at fault, named in `error`, may have
/// been split into smaller pages with the same translations by an earlier
/// level of the same split). `unmapped` counts the bytes removed. The
/// caller may retry `[iova, end)` later, or widen the unmap to the whole
/// large page (which needs no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialUnmap {
    /// Bytes unmapped before stopping.
    pub unmapped: u64,
    /// Where the unmap stopped: the start of the range or of the large
    /// page that could not be split, whichever is higher.
    pub iova: u64,
    /// Why ([`Error::NoMemory`], or [`Error::BadRange`] with nothing done).
    pub error: Error,
}

/// One step of a walk: the entry read at `level` from `table[index]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkStep {
    /// Level of the entry (0 = 4 KiB pages).
    pub level: u32,
    /// Physical address of the table holding the entry.
    pub table: u64,
    /// Index of the entry in that table.
    pub index: usize,
    /// The raw entry.
    pub raw: u64,
}

/// What a dirty-bit walk carries down the tree.
struct DirtyWalk<'a> {
    start: u64,
    end: u64,
    bit: u64,
    clear: bool,
    gather: &'a mut IotlbGather,
    record: &'a mut dyn FnMut(u64, u64),
    batch: &'a mut FlushBatch,
}

/// An I/O page table of format `F` in memory `M`.
pub struct PageTable<F: PtFormat, M: TableMemory> {
    format: F,
    mem: M,
    root: u64,
    top: u32,
    last: u64,
    output_limit: u64,
    leaf_levels: u32,
    coherent: bool,
    force_snoop: bool,
    tables: AtomicUsize,
    deferred: Vec<u64>,
    /// The walk to the last leaf a map wrote, [`Walk`], and the table a lookup last found its leaf in:
    /// `(iova >> level_shift(level + 1), table, level)` (`u64::MAX` when
    /// none). Consecutive small maps and lookups start there instead of at
    /// the root. Tables leave the tree only through unmap and a failed
    /// map's unwind, which clear both. Behind locks only so that the
    /// concurrent path can clear them; the exclusive path reaches them
    /// through `get_mut`, and a lookup that finds the lock taken walks
    /// from the root.
    map_path: spin::Mutex<Option<Walk>>,
    lookup_leaf: spin::Mutex<(u64, u64, u32)>,
    /// A concurrent call ran: empty tables may be linked (see
    /// [`PageTable::map_shared`]).
    shared_used: AtomicBool,
    /// Tables stay allocated when the table is dropped
    /// ([`PageTable::keep_tables`]).
    kept: bool,
}

/// A remembered walk: the IOVA of the last byte a map wrote, the level of
/// its leaf, and the tables by level; those from the leaf's level up to
/// the root lead to it (lower slots are stale). A map whose first byte
/// shares the span of one of those tables starts its walk there.
type Walk = (u64, u32, [u64; MAX_LEVELS]);

/// The lookup cache when it names no table.
const NO_LOOKUP: (u64, u64, u32) = (u64::MAX, 0, 0);

impl<F: PtFormat, M: TableMemory> fmt::Debug for PageTable<F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageTable")
            .field("format", &self.format)
            .field("root", &format_args!("{:#x}", self.root))
            .field("page_sizes", &format_args!("{:#x}", self.page_sizes()))
            .field("tables", &self.table_count())
            .field("deferred", &self.deferred.len())
            .field("force_snoop", &self.force_snoop)
            .finish()
    }
}

impl<F: PtFormat, M: TableMemory> PageTable<F, M> {
    /// An empty page table (just the root). Fails only if the root cannot
    /// be allocated.
    pub fn new(format: F, mut mem: M) -> Result<Self, Error> {
        let geometry = *format.geometry();
        let levels = geometry.levels();
        assert!((1..=MAX_LEVELS as u32).contains(&levels), "format with {levels} levels");
        let root = mem.alloc_table().ok_or(Error::NoMemory { iova: 0, level: levels - 1 })?;
        // The engine works with exclusive ends (`iova + length`), so the
        // page that ends at 2^64 stays outside the aperture: a map there is
        // refused as out of range rather than overflowing.
        let last = geometry.aperture_last().min(u64::MAX - PAGE_SIZE);
        let output_limit = 1u64 << geometry.output_bits().min(63);
        let leaf_levels = usable_leaf_levels(geometry.leaf_levels() & ((1 << levels) - 1));
        Ok(Self {
            coherent: mem.coherent(),
            format,
            mem,
            root,
            top: levels - 1,
            last,
            output_limit,
            leaf_levels,
            force_snoop: false,
            tables: AtomicUsize::new(1),
            deferred: Vec::new(),
            map_path: spin::Mutex::new(None),
            lookup_leaf: spin::Mutex::new(NO_LOOKUP),
            shared_used: AtomicBool::new(false),
            kept: false,
        })
    }

    /// The format.
    pub fn format(&self) -> &F {
        &self.format
    }
    /// The table memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }
    /// The table memory, mutably (fault injection in tests). Writing
    /// entries through it behind the engine's back breaks its invariants.
    pub fn memory_mut(&mut self) -> &mut M {
        self.forget_walks();
        &mut self.mem
    }
    /// Physical address of the root table (what the context or PASID
    /// entry points at).
    pub fn root(&self) -> u64 {
        self.root
    }
    /// First and last (inclusive) IOVA.
    pub fn aperture(&self) -> IovaRange {
        IovaRange::new(0, self.last)
    }
    /// Page sizes map may use (bit n = 2^n bytes).
    pub fn page_sizes(&self) -> u64 {
        sizes_of_leaf_levels(self.leaf_levels)
    }
    /// Restricts the page sizes to those in `sizes` (and the format's);
    /// 4 KiB always stays. Existing mappings are not changed.
    pub fn set_page_sizes(&mut self, sizes: u64) {
        let mut mask = 1;
        for l in 1..=self.top {
            if sizes & level_size(l) != 0 {
                mask |= 1 << l;
            }
        }
        self.leaf_levels = usable_leaf_levels(self.format.leaf_levels() & mask);
    }
    /// Whether new mappings get [`Prot::CACHE`] added.
    pub fn force_snoop(&self) -> bool {
        self.force_snoop
    }
    /// Adds [`Prot::CACHE`] to every later mapping. Returns false (and
    /// changes nothing) if the format cannot encode snooping.
    pub fn set_force_snoop(&mut self) -> bool {
        if self.format.snoop_control() {
            self.force_snoop = true;
        }
        self.force_snoop
    }
    /// Tables linked into the tree, root included.
    pub fn table_count(&self) -> usize {
        self.tables.load(Relaxed)
    }
    /// Tables unlinked and waiting for [`PageTable::release_deferred`].
    pub fn deferred_count(&self) -> usize {
        self.deferred.len()
    }
    /// Bytes of table memory held (tree and deferred).
    pub fn table_bytes(&self) -> u64 {
        (self.table_count() + self.deferred.len()) as u64 * TABLE_SIZE
    }
    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty(self.root)
    }

    fn forget_walks(&mut self) {
        *self.map_path.get_mut() = None;
        *self.lookup_leaf.get_mut() = NO_LOOKUP;
    }

    /// Keeps every table (the linked ones and those waiting in the
    /// deferred list) allocated for good: dropping the page table then
    /// frees nothing. For an owner that could not confirm a device has
    /// stopped walking the table (a detach or an invalidation that failed
    /// or timed out): leaking the memory is safe, reusing it is not.
    pub fn keep_tables(&mut self) {
        self.kept = true;
    }

    /// Frees the tables unlinked since the last call. Call only after the
    /// IOTLB and paging-structure caches were invalidated for every range
    /// unmapped since then. Returns how many were freed.
    pub fn release_deferred(&mut self) -> usize {
        let n = self.deferred.len();
        for t in self.deferred.drain(..) {
            self.mem.free_table(t);
        }
        n
    }

    /// Checks `[iova, iova + length)` against the granule and the aperture;
    /// returns the exclusive end.
    fn check_range(&self, iova: u64, length: u64) -> Result<u64, Error> {
        let bad = Error::BadRange { iova, length };
        if length == 0 || (iova | length) & (PAGE_SIZE - 1) != 0 {
            return Err(bad);
        }
        let last = iova.checked_add(length - 1).ok_or(bad)?;
        if last > self.last {
            return Err(bad);
        }
        Ok(last + 1)
    }

    /// Maps `[iova, iova + length)` to `[phys, phys + length)` with `prot`,
    /// each piece with the largest page size that the alignment of both
    /// addresses, the remaining length and [`PageTable::page_sizes`] allow.
    ///
    /// All or nothing: on error nothing in the range changed (tables the
    /// call linked and had to unlink again wait in the deferred list, as
    /// the walker may have seen them). Errors: [`Error::BadRange`] (zero,
    /// not 4 KiB aligned, outside the aperture), [`Error::BadPhys`] (not 4
    /// KiB aligned or beyond the output width), [`Error::BadProt`] (neither
    /// read nor write), [`Error::AlreadyMapped`] with the first mapped IOVA
    /// found, [`Error::NoMemory`] with the IOVA and level of the table that
    /// could not be allocated.
    pub fn map(&mut self, iova: u64, phys: u64, length: u64, prot: Prot) -> Result<(), Error> {
        self.map_runs(iova, &[PhysRun::new(phys, length)], prot)
    }

    /// Maps consecutive pieces from `iova`: `runs[k]` at
    /// `iova` plus the lengths before it, each as [`PageTable::map`] would
    /// (largest pages that fit). One call for a range whose physical pages
    /// are scattered; all or nothing over the whole range, with the errors
    /// of `map` (a bad range names the whole range when it is the total
    /// that is wrong, the piece when it is one piece).
    pub fn map_runs(&mut self, iova: u64, runs: &[PhysRun], prot: Prot) -> Result<(), Error> {
        if let [run] = runs
            && run.len == PAGE_SIZE
            && self.map_page_cached(iova, run.phys, prot)
        {
            return Ok(());
        }
        if let [run] = runs
            && self.map_run_cached(iova, run.phys, run.len, prot)
        {
            return Ok(());
        }
        let prot = self.check_map(iova, runs, prot)?;
        let mut batch = FlushBatch::new(!self.coherent);
        let cached = self.map_path.get_mut().take();
        let mut op = Op::new(&self.format, Exclusive(&mut self.mem), self.root, self.top, self.leaf_levels);
        let (result, path) = op.map_range(iova, runs, prot, &mut batch, cached);
        if let Err((stopped, _)) = result {
            // Everything in [iova, stopped) was mapped by this call with
            // pages that fit in it, so this never needs to split.
            if stopped > iova {
                let mut scratch = IotlbGather::default();
                let undone = op.unmap_range(iova, stopped, &mut scratch, &mut batch);
                debug_assert_eq!(undone, Ok(stopped - iova));
            }
            op.prune(stopped, &mut batch);
        }
        batch.finish(&mut op.acc);
        let (added, unlinked) = (op.added, op.unlinked);
        self.account(added, &unlinked);
        if !unlinked.is_empty() {
            self.deferred.extend(unlinked);
        }
        if result.is_err() {
            self.forget_walks();
        } else {
            *self.map_path.get_mut() = path;
        }
        result.map_err(|(_, e)| e)
    }

    /// The leaf table of the remembered walk when it covers the 4 KiB page
    /// at `iova` (which must be aligned and inside the aperture): the
    /// walk's tables, all live while it is remembered.
    #[inline]
    fn cached_walk(&mut self, iova: u64) -> Option<[u64; MAX_LEVELS]> {
        match *self.map_path.get_mut() {
            Some((last, 0, path))
                if last >> level_shift(1) == iova >> level_shift(1)
                    && iova & (PAGE_SIZE - 1) == 0
                    && iova <= self.last =>
            {
                Some(path)
            }
            _ => None,
        }
    }

    /// Writes one entry outside an operation (the one-page fast paths)
    /// and, for a walker that does not snoop, flushes its line at once.
    #[inline]
    fn write_flushed(&mut self, t: u64, i: usize, value: u64) {
        self.mem.write(t, i, value);
        if !self.coherent {
            let line = (i / crate::ENTRIES_PER_LINE) as u64 * crate::CACHE_LINE;
            self.mem.flush(t + line, crate::CACHE_LINE);
        }
    }

    /// The fast path of a one-page map (consecutive 4 KiB maps, as a
    /// caller mapping scattered pages one call each makes them): when the
    /// remembered walk covers `iova`, its slot is free and the arguments
    /// are good, writes the leaf and returns true. Anything else (an error
    /// to name precisely, a walk to make) is left to the general path.
    #[inline]
    fn map_page_cached(&mut self, iova: u64, phys: u64, prot: Prot) -> bool {
        if phys & (PAGE_SIZE - 1) != 0 || phys >= self.output_limit - (PAGE_SIZE - 1) {
            return false;
        }
        let Some(path) = self.cached_walk(iova) else { return false };
        let Ok(prot) = self.map_prot(prot) else { return false };
        let (t, i) = (path[0], index_of(iova, 0));
        if self.mem.read(t, i) != 0 {
            return false;
        }
        self.write_flushed(t, i, self.format.leaf_entry(phys, 0, prot));
        true
    }

    /// The fast path of one run of 4 KiB pages inside one leaf table (a
    /// run shorter than 2 MiB that does not cross a 2 MiB boundary) when
    /// the remembered walk's level-1 table covers it and already links
    /// that leaf table: checks the arguments, fills the leaves, flushes
    /// their lines for a walker that does not snoop and remembers the
    /// walk, as the general path would (on a 1 MiB map it costs about a
    /// quarter less). Anything else (an error to name precisely, a slot in
    /// use, a table to make) is left to the general path; a partial fill
    /// is cleared first (those slots were empty).
    #[inline]
    fn map_run_cached(&mut self, iova: u64, phys: u64, len: u64, prot: Prot) -> bool {
        if len >= level_size(1)
            || phys & (PAGE_SIZE - 1) != 0
            || phys.checked_add(len).is_none_or(|end| end > self.output_limit)
            || self.check_range(iova, len).is_err()
        {
            return false;
        }
        let last = iova + len - 1;
        if iova >> level_shift(1) != last >> level_shift(1) {
            return false;
        }
        let Some((seen, level, mut path)) = *self.map_path.get_mut() else { return false };
        if level > 1 || self.top < 1 || seen >> level_shift(2) != iova >> level_shift(2) {
            return false;
        }
        let Ok(prot) = self.map_prot(prot) else { return false };
        let e = self.mem.read(path[1], index_of(iova, 1));
        if !self.format.is_present(e) || self.format.is_leaf(e, 1) {
            return false;
        }
        let t = self.format.table_address(e);
        let (i, count) = (index_of(iova, 0), (len / PAGE_SIZE) as usize);
        let written = self.mem.fill(t, i, count, self.format.leaf_entry(phys, 0, prot), PAGE_SIZE);
        if written < count {
            self.mem.clear(t, i, written);
        }
        if !self.coherent && written > 0 {
            flush_lines(&mut Exclusive(&mut self.mem), t, lines_of(i, written));
        }
        if written < count {
            return false;
        }
        path[0] = t;
        *self.map_path.get_mut() = Some((last, 0, path));
        true
    }

    /// The fast path of a one-page unmap, through the remembered walk when
    /// it covers `iova`: clears the leaf, and unlinks the tables that
    /// leaves empty (`Op::prune`, forgetting the walk then) as the general
    /// path would. `None` when the walk does not cover `iova`.
    fn unmap_page_cached(&mut self, iova: u64, gather: &mut IotlbGather) -> Option<u64> {
        let path = self.cached_walk(iova)?;
        let (t, i) = (path[0], index_of(iova, 0));
        if self.mem.read(t, i) == 0 {
            return Some(0);
        }
        self.write_flushed(t, i, 0);
        gather.add(iova, iova + PAGE_SIZE - 1);
        if !self.mem.is_empty_except(t, i, 1) {
            return Some(PAGE_SIZE);
        }
        // The tables this leaves empty go as after a failed map (the
        // cleared leaf's line is already flushed, before any unlink).
        let mut batch = FlushBatch::new(!self.coherent);
        let mut op = Op::new(&self.format, Exclusive(&mut self.mem), self.root, self.top, self.leaf_levels);
        op.prune(iova, &mut batch);
        batch.finish(&mut op.acc);
        let unlinked = op.unlinked;
        if !unlinked.is_empty() {
            gather.freed_tables += unlinked.len();
            self.account(0, &unlinked);
            self.deferred.extend(unlinked);
            self.forget_walks();
        }
        Some(PAGE_SIZE)
    }

    /// Checks a map's arguments; returns the permissions to map with.
    fn check_map(&self, iova: u64, runs: &[PhysRun], prot: Prot) -> Result<Prot, Error> {
        self.check_map_len(iova, runs, prot).map(|(prot, _)| prot)
    }

    /// [`Self::check_map`], also returning the runs' total length.
    fn check_map_len(&self, iova: u64, runs: &[PhysRun], prot: Prot) -> Result<(Prot, u64), Error> {
        // One pass that only accumulates (the common case, every run
        // good); the precise checks below name the first bad run.
        let (mut total, mut overflow, mut bits, mut empty, mut top) = (0u64, false, 0u64, false, 0u64);
        for r in runs {
            let (t, o) = total.overflowing_add(r.len);
            let (end, o2) = r.phys.overflowing_add(r.len);
            (total, overflow) = (t, overflow | o | o2);
            bits |= r.phys | r.len;
            empty |= r.len == 0;
            top = top.max(end);
        }
        if !overflow {
            self.check_range(iova, total)?;
            if bits & (PAGE_SIZE - 1) == 0 && !empty && top <= self.output_limit {
                return Ok((self.map_prot(prot)?, total));
            }
        }
        let total = runs.iter().try_fold(0u64, |a, r| a.checked_add(r.len));
        let total = total.ok_or(Error::BadRange { iova, length: u64::MAX })?;
        self.check_range(iova, total)?;
        let mut at = iova;
        for &PhysRun { phys, len: length } in runs {
            if length == 0 || length & (PAGE_SIZE - 1) != 0 {
                return Err(Error::BadRange { iova: at, length });
            }
            if phys & (PAGE_SIZE - 1) != 0 || phys.checked_add(length).is_none_or(|e| e > self.output_limit) {
                return Err(Error::BadPhys { phys, length });
            }
            at += length;
        }
        // Every run was good after all (the fast pass only overflowed on
        // a sum this pass also checked): not reached with a bad run.
        Ok((self.map_prot(prot)?, total))
    }

    /// The protection a map writes for `prot`, if the format takes it.
    fn map_prot(&self, prot: Prot) -> Result<Prot, Error> {
        if !self.format.accepts(prot) {
            return Err(Error::BadProt { prot });
        }
        Ok(if self.force_snoop { prot | Prot::CACHE } else { prot })
    }

    /// Counts the tables an operation linked and unlinked.
    fn account(&self, added: usize, unlinked: &[u64]) {
        if added > 0 {
            self.tables.fetch_add(added, Relaxed);
        }
        if !unlinked.is_empty() {
            self.tables.fetch_sub(unlinked.len(), Relaxed);
        }
    }

    /// Unmaps everything in `[iova, iova + length)` and returns the bytes
    /// that were mapped there, adding the IOVA span to `gather` (and the
    /// number of tables that became empty to `gather.freed_tables`; those
    /// tables are held until [`PageTable::release_deferred`]).
    ///
    /// A large page that the range only partly covers is split: a table of
    /// the next smaller pages takes its place (translating identically)
    /// and the pages inside the range are removed, so the rest of the large
    /// page keeps translating. Returns 0 for a bad range. If a split cannot
    /// allocate its table, the unmap stops there: see [`PartialUnmap`] for
    /// what holds then, and [`PageTable::try_unmap`] to learn of it.
    pub fn unmap(&mut self, iova: u64, length: u64, gather: &mut IotlbGather) -> u64 {
        match self.try_unmap(iova, length, gather) {
            Ok(n) => n,
            Err(partial) => partial.unmapped,
        }
    }

    /// [`PageTable::unmap`], reporting a bad range or a split that could
    /// not allocate.
    pub fn try_unmap(&mut self, iova: u64, length: u64, gather: &mut IotlbGather) -> Result<u64, PartialUnmap> {
        if length == PAGE_SIZE
            && let Some(unmapped) = self.unmap_page_cached(iova, gather)
        {
            return Ok(unmapped);
        }
        let end = self.check_range(iova, length).map_err(|error| PartialUnmap { unmapped: 0, iova, error })?;
        self.forget_walks();
        let mut batch = FlushBatch::new(!self.coherent);
        let mut op = Op::new(&self.format, Exclusive(&mut self.mem), self.root, self.top, self.leaf_levels);
        let result = op.unmap_range(iova, end, gather, &mut batch);
        batch.finish(&mut op.acc);
        let (added, unlinked) = (op.added, op.unlinked);
        gather.freed_tables += unlinked.len();
        self.account(added, &unlinked);
        if !unlinked.is_empty() {
            self.deferred.extend(unlinked);
        }
        result
    }
}

/// The concurrent path: map and unmap through `&self`, from several
/// threads at once, as long as no two calls running at the same time touch
/// overlapping IOVA ranges (a caller bug, which the engine does not
/// detect: overlapping calls may each see the other's entries). Used by
/// domains whose users map disjoint ranges in parallel (iommufd's IOAS
/// fills areas outside its lock).
///
/// Differences from the exclusive methods:
/// * Tables on the way are installed with a compare-and-swap; a caller
///   that loses the race frees its new table and uses the winner's. A
///   large page two unmaps split at once is split by one of them.
/// * A table is unlinked only when the unmap covers its whole span (no
///   other caller can be inside it then). A table that a partial unmap
///   leaves empty stays linked: it translates nothing, costs 4 KiB, and is
///   reused by the next map below it or unlinked by an unmap covering it.
///   So "a present table entry means something is mapped below" no longer
///   holds, and a map meeting such an empty table where it would put a
///   large page maps smaller pages inside it instead.
/// * Tables a call unlinks are handed to the caller (`unlinked`), not
///   kept in the deferred list: the caller frees them with
///   [`PageTable::free_unlinked`] once the walker's caches were
///   invalidated for the range, so one thread's IOTLB sync never frees
///   another's tables before their invalidation.
/// * Each call walks from the root: nothing is remembered between calls,
///   and a lookup cache entry is dropped by every unmap.
/// * For walkers that do not snoop, a call also flushes the line of every
///   table entry it went through: another caller may have installed (or
///   split) it and not flushed it yet, and the walker must see the path
///   to this call's leaves when it returns.
///
/// Only memories that offer the concurrent seam
/// ([`TableMemory::shared`]) can: the others answer [`Error::NotShared`].
impl<F: PtFormat, M: TableMemory> PageTable<F, M> {
    /// Whether the concurrent path works on this table's memory.
    pub fn concurrent(&self) -> bool {
        self.mem.shared().is_some()
    }

    /// [`PageTable::map_runs`] through `&self` (see the rules above);
    /// returns the bytes mapped (the runs' total). All or nothing; on
    /// error, tables the unwind unlinked are added to `unlinked`.
    pub fn map_shared(&self, iova: u64, runs: &[PhysRun], prot: Prot, unlinked: &mut Vec<u64>) -> Result<u64, Error> {
        let mem = self.mem.shared().ok_or(Error::NotShared)?;
        let (prot, length) = self.check_map_len(iova, runs, prot)?;
        self.shared_used.store(true, Relaxed);
        let mut batch = FlushBatch::new(!self.coherent);
        let mut op = Op::new(&self.format, Concurrent(mem), self.root, self.top, self.leaf_levels);
        let (result, _) = op.map_range(iova, runs, prot, &mut batch, None);
        if let Err((stopped, _)) = result
            && stopped > iova
        {
            let mut scratch = IotlbGather::default();
            let undone = op.unmap_range(iova, stopped, &mut scratch, &mut batch);
            debug_assert_eq!(undone, Ok(stopped - iova));
        }
        batch.finish(&mut op.acc);
        self.account(op.added, &op.unlinked);
        if !op.unlinked.is_empty() {
            self.forget_shared_walks();
        }
        unlinked.append(&mut op.unlinked);
        result.map(|()| length).map_err(|(_, e)| e)
    }

    /// [`PageTable::try_unmap`] through `&self` (see the rules above).
    /// Tables unlinked are added to `unlinked` (and counted in
    /// `gather.freed_tables`).
    pub fn unmap_shared(
        &self,
        iova: u64,
        length: u64,
        gather: &mut IotlbGather,
        unlinked: &mut Vec<u64>,
    ) -> Result<u64, PartialUnmap> {
        self.unmap_shared_inner(iova, length, gather, unlinked, None)
    }

    /// [`PageTable::unmap_shared`], also adding the physical ranges the
    /// cleared leaves pointed at to `out`, in IOVA order, adjacent ranges
    /// joined: what a read-back before the unmap would have found, in
    /// the same pass.
    pub fn unmap_shared_collect(
        &self,
        iova: u64,
        length: u64,
        gather: &mut IotlbGather,
        unlinked: &mut Vec<u64>,
        out: &mut Vec<PhysRun>,
    ) -> Result<u64, PartialUnmap> {
        self.unmap_shared_inner(iova, length, gather, unlinked, Some(out))
    }

    fn unmap_shared_inner(
        &self,
        iova: u64,
        length: u64,
        gather: &mut IotlbGather,
        unlinked: &mut Vec<u64>,
        collect: Option<&mut Vec<PhysRun>>,
    ) -> Result<u64, PartialUnmap> {
        let refuse = |error| PartialUnmap { unmapped: 0, iova, error };
        let mem = self.mem.shared().ok_or(refuse(Error::NotShared))?;
        let end = self.check_range(iova, length).map_err(refuse)?;
        self.shared_used.store(true, Relaxed);
        let mut batch = FlushBatch::new(!self.coherent);
        let mut op = Op::new(&self.format, Concurrent(mem), self.root, self.top, self.leaf_levels);
        let mut runs = collect.map(RunJoiner::new);
        let result = op.unmap_range_collect(iova, end, gather, &mut batch, runs.as_mut());
        if let Some(runs) = runs {
            runs.finish();
        }
        batch.finish(&mut op.acc);
        gather.freed_tables += op.unlinked.len();
        self.account(op.added, &op.unlinked);
        // A lookup or a remembered map walk may name a table of the range.
        self.forget_shared_walks();
        unlinked.append(&mut op.unlinked);
        result
    }

    /// Frees tables a concurrent call unlinked (and empties `tables`).
    /// Call only after the IOTLB and paging-structure caches were
    /// invalidated for the ranges that unlinked them.
    /// On a memory without the concurrent seam the tables stay in
    /// `tables` (no concurrent call can have unlinked any).
    pub fn free_unlinked(&self, tables: &mut Vec<u64>) {
        if let Some(mem) = self.mem.shared() {
            for t in tables.drain(..) {
                mem.free_shared(t);
            }
        }
    }

    fn forget_shared_walks(&self) {
        *self.map_path.lock() = None;
        *self.lookup_leaf.lock() = NO_LOOKUP;
    }
}

/// Collects the output ranges of cleared leaves in IOVA order, joining
/// each to the one before when it continues it; the run being built stays
/// in registers until a gap (or [`RunJoiner::finish`]) sends it to `out`.
pub(crate) struct RunJoiner<'a> {
    out: &'a mut Vec<PhysRun>,
    cur: PhysRun,
}

impl<'a> RunJoiner<'a> {
    fn new(out: &'a mut Vec<PhysRun>) -> Self {
        // The last run already in `out` may be continued too.
        let cur = out.pop().unwrap_or_default();
        Self { out, cur }
    }

    #[inline]
    fn add(&mut self, phys: u64, len: u64) {
        // Output addresses fit in 52 bits: the sum cannot wrap.
        if self.cur.len != 0 && self.cur.phys.wrapping_add(self.cur.len) == phys {
            self.cur.len += len;
        } else {
            if self.cur.len != 0 {
                self.out.push(self.cur);
            }
            self.cur = PhysRun::new(phys, len);
        }
    }

    fn finish(self) {
        if self.cur.len != 0 {
            self.out.push(self.cur);
        }
    }
}

/// One map or unmap in progress: the tree's shape, the way to its memory,
/// and what the operation linked and unlinked (applied to the page table
/// when it ends).
struct Op<'p, F: PtFormat, A: Access> {
    format: &'p F,
    acc: A,
    root: u64,
    top: u32,
    leaf_levels: u32,
    /// Tables linked into the tree.
    added: usize,
    /// Tables unlinked, to be freed after the caller's invalidation.
    unlinked: Vec<u64>,
}

impl<'p, F: PtFormat, A: Access> Op<'p, F, A> {
    fn new(format: &'p F, acc: A, root: u64, top: u32, leaf_levels: u32) -> Self {
        Self { format, acc, root, top, leaf_levels, added: 0, unlinked: Vec::new() }
    }

    /// The leaf level for the next piece at `addr_bits = iova | phys` with
    /// `remaining` bytes left.
    #[inline]
    fn leaf_level(&self, addr_bits: u64, remaining: u64) -> u32 {
        let align = addr_bits.trailing_zeros();
        let mut l = self.top;
        loop {
            if l == 0 || (self.leaf_levels >> l & 1 != 0 && level_shift(l) <= align && level_size(l) <= remaining) {
                return l;
            }
            l -= 1;
        }
    }

    /// The table below `table[i]` (a level-`l` entry) for a map at `cur`:
    /// the one there, or a new one installed with a compare-and-swap (the
    /// loser of a race frees its own and takes the winner's).
    #[inline]
    fn table_below(&mut self, t: u64, i: usize, l: u32, cur: u64, batch: &mut FlushBatch) -> Result<u64, Error> {
        let mut e = self.acc.read(t, i);
        loop {
            if self.format.is_present(e) {
                if self.format.is_leaf(e, l) {
                    return Err(Error::AlreadyMapped { iova: cur });
                }
                if A::SHARED {
                    // Another caller may have installed it and not yet
                    // flushed the line: this call must not return before
                    // the walker can follow the entry.
                    batch.mark(&mut self.acc, l, t, i);
                }
                return Ok(self.format.table_address(e));
            }
            let new = self.acc.alloc().ok_or(Error::NoMemory { iova: cur, level: l - 1 })?;
            match self.acc.cas(t, i, e, self.format.table_entry(new, l)) {
                Ok(()) => {
                    self.added += 1;
                    batch.mark(&mut self.acc, l, t, i);
                    return Ok(new);
                }
                Err(current) => {
                    // Never linked: nobody saw it.
                    self.acc.free(new);
                    e = current;
                }
            }
        }
    }

    /// The body of `map`. On error returns the IOVA reached (everything
    /// before it is mapped) with the error; on success also the walk to
    /// the last 4 KiB leaf table written, if the map ended with one.
    #[allow(clippy::type_complexity)]
    fn map_range(
        &mut self,
        iova: u64,
        runs: &[PhysRun],
        prot: Prot,
        batch: &mut FlushBatch,
        cached: Option<Walk>,
    ) -> (Result<(), (u64, Error)>, Option<Walk>) {
        let top = self.top;
        let mut path = [0u64; MAX_LEVELS];
        path[top as usize] = self.root;
        // path[valid..=top] are the tables covering `cur`.
        let mut valid = top;
        if let Some((last, level, walk)) = cached {
            // The lowest table of the walk whose span holds `iova`.
            let mut l = level;
            while l < top && last >> level_shift(l + 1) != iova >> level_shift(l + 1) {
                l += 1;
            }
            path = walk;
            valid = l;
        }
        let mut cur = iova;
        let mut last_level = top;
        // Below `cap_until`, pieces use leaves of level `cap` at most: a
        // table with nothing mapped in it sits where a larger leaf would
        // go (left by a concurrent unmap), and is used instead.
        let (mut cap, mut cap_until) = (top, 0u64);
        let mut k = 0;
        while k < runs.len() {
            let PhysRun { phys, len: length } = runs[k];
            if length == PAGE_SIZE && valid == 0 {
                // Single 4 KiB pieces (scattered memory) into the leaf table
                // we are in: one entry each, lines marked once.
                let t = path[0];
                let first = index_of(cur, 0);
                let count = runs[k..].iter().take(ENTRIES - first).take_while(|r| r.len == PAGE_SIZE).count();
                // The leaf bits once (see `PtFormat::leaf_entry`): per
                // entry only the address changes.
                let (bits, pieces) = (self.format.leaf_entry(0, 0, prot), &runs[k..k + count]);
                let written = self.acc.fill_with(t, first, count, |j| pieces[j].phys | bits);
                k += written;
                cur += written as u64 * PAGE_SIZE;
                if written > 0 {
                    batch.mark_lines(&mut self.acc, 0, t, lines_of(first, written));
                }
                if written < count {
                    return (Err((cur, Error::AlreadyMapped { iova: cur })), None);
                }
                last_level = 0;
                while valid < top && cur >> level_shift(valid + 1) != (cur - 1) >> level_shift(valid + 1) {
                    valid += 1;
                }
                continue;
            }
            k += 1;
            let (run_iova, end) = (cur, cur + length);
            while cur < end {
                let pa = phys + (cur - run_iova);
                // Pieces shorter than 2 MiB take 4 KiB pages whatever the alignment.
                let mut level = if end - cur < level_size(1) { 0 } else { self.leaf_level(cur | pa, end - cur) };
                if cur < cap_until {
                    level = level.min(cap);
                }
                if valid < level {
                    // Only a cached walk starts below a large piece's level:
                    // the tables above are the cached ones, still covering `cur`.
                    valid = level;
                }
                last_level = level;
                debug_assert!(valid >= level);
                let mut l = valid;
                while l > level {
                    let t = path[l as usize];
                    let i = index_of(cur, l);
                    let next = match self.table_below(t, i, l, cur, batch) {
                        Ok(next) => next,
                        Err(e) => return (Err((cur, e)), None),
                    };
                    l -= 1;
                    path[l as usize] = next;
                }
                // A run of leaves in one table, as far as the table, the
                // length and the page size go.
                let t = path[level as usize];
                let size = level_size(level);
                let i = index_of(cur, level);
                let count = ((ENTRIES - i) as u64).min((end - cur) >> level_shift(level)) as usize;
                let written = self.acc.fill(t, i, count, self.format.leaf_entry(pa, level, prot), size);
                if written > 0 {
                    batch.mark_lines(&mut self.acc, level, t, lines_of(i, written));
                    cur += written as u64 * size;
                }
                if written < count {
                    let e = self.acc.read(t, i + written);
                    let below = if self.format.is_leaf(e, level) {
                        Some(0)
                    } else {
                        self.first_mapped(self.format.table_address(e), level - 1)
                    };
                    let Some(off) = below else {
                        // An empty table where this leaf would go: this
                        // call's range covers its span, so it is ours to
                        // fill with smaller pages.
                        (cap, cap_until) = (level - 1, cur + size);
                        valid = level;
                        continue;
                    };
                    return (Err((cur, Error::AlreadyMapped { iova: cur + off })), None);
                }
                valid = level;
                while valid < top && cur >> level_shift(valid + 1) != (cur - 1) >> level_shift(valid + 1) {
                    valid += 1;
                }
            }
        }
        // path[last_level..=top] lead to the last leaf written.
        (Ok(()), Some((cur - 1, last_level, path)))
    }

    /// Offset of the first mapped byte below `table` (a level-`level`
    /// table), searching depth first.
    fn first_mapped(&self, table: u64, level: u32) -> Option<u64> {
        for i in 0..ENTRIES {
            let e = self.acc.read(table, i);
            if !self.format.is_present(e) {
                continue;
            }
            let off = i as u64 * level_size(level);
            if level == 0 || self.format.is_leaf(e, level) {
                return Some(off);
            }
            if let Some(below) = self.first_mapped(self.format.table_address(e), level - 1) {
                return Some(off + below);
            }
        }
        None
    }

    /// Unlinks the empty non-root tables on the path to `iova`, bottom up
    /// (the unwind of a failed map: tables it created for a piece it never
    /// wrote; a one-page unmap that emptied its leaf table). Exclusive path only: concurrently, another caller may be
    /// about to use such a table.
    fn prune(&mut self, iova: u64, batch: &mut FlushBatch) {
        let top = self.top;
        let mut path = [0u64; MAX_LEVELS];
        path[top as usize] = self.root;
        let mut l = top;
        while l > 0 {
            let e = self.acc.read(path[l as usize], index_of(iova, l));
            if !self.format.is_present(e) || self.format.is_leaf(e, l) {
                break;
            }
            l -= 1;
            path[l as usize] = self.format.table_address(e);
        }
        while l < top && self.acc.is_empty(path[l as usize]) {
            let parent = path[l as usize + 1];
            let i = index_of(iova, l + 1);
            self.acc.write(parent, i, 0);
            batch.mark(&mut self.acc, l + 1, parent, i);
            self.unlinked.push(path[l as usize]);
            l += 1;
        }
    }

    /// The body of `unmap`.
    fn unmap_range(
        &mut self,
        iova: u64,
        end: u64,
        gather: &mut IotlbGather,
        batch: &mut FlushBatch,
    ) -> Result<u64, PartialUnmap> {
        self.unmap_range_collect(iova, end, gather, batch, None)
    }

    /// [`Self::unmap_range`], adding the output range of every leaf it
    /// clears to `collect` (in IOVA order, adjacent ranges joined) when
    /// given.
    fn unmap_range_collect(
        &mut self,
        iova: u64,
        end: u64,
        gather: &mut IotlbGather,
        batch: &mut FlushBatch,
        mut collect: Option<&mut RunJoiner<'_>>,
    ) -> Result<u64, PartialUnmap> {
        let top = self.top;
        let mut path = [0u64; MAX_LEVELS];
        // base[l]: the IOVA where the span of path[l] starts.
        let mut base_of = [0u64; MAX_LEVELS];
        // slot[l]: index in path[l] of the entry that points at path[l - 1].
        let mut slot = [0usize; MAX_LEVELS];
        // touched[l]: an entry of path[l] was cleared since we entered it.
        let mut touched = [false; MAX_LEVELS];
        // The entries of path[0] the last clear went over (all zero now):
        // a leaf table is left right after its one clear, so its
        // emptiness check reads only the rest.
        let mut cleared0 = (0usize, 0usize);
        path[top as usize] = self.root;
        let mut valid = top;
        let mut cur = iova;
        let mut unmapped = 0;
        while cur < end {
            let mut l = valid;
            let mut failure = None;
            loop {
                let t = path[l as usize];
                let i = index_of(cur, l);
                if l == 0 {
                    // Every present level-0 entry is a 4 KiB leaf inside
                    // the range: clear the run in one go.
                    let count = ((ENTRIES - i) as u64).min((end - cur) >> PAGE_SHIFT) as usize;
                    cleared0 = (i, count);
                    let c = match collect.as_deref_mut() {
                        Some(runs) => {
                            let format = self.format;
                            self.acc.clear_each(t, i, count, |e| runs.add(format.leaf_address(e, 0), PAGE_SIZE))
                        }
                        None => self.acc.clear(t, i, count),
                    };
                    if c.count > 0 {
                        batch.mark_lines(&mut self.acc, 0, t, c.lines);
                        touched[0] = true;
                        unmapped += c.count as u64 * PAGE_SIZE;
                        let table_base = cur - i as u64 * PAGE_SIZE;
                        gather.add(
                            table_base + c.first as u64 * PAGE_SIZE,
                            table_base + c.last as u64 * PAGE_SIZE + PAGE_SIZE - 1,
                        );
                    }
                    cur += count as u64 * PAGE_SIZE;
                    break;
                }
                let e = self.acc.read(t, i);
                let size = level_size(l);
                let base = cur & !(size - 1);
                if !self.format.is_present(e) {
                    cur = base + size;
                    break;
                }
                if self.format.is_leaf(e, l) {
                    if base >= iova && base + size <= end {
                        // This leaf and the ones after it in this table
                        // that the range covers whole (2 MiB pages of a
                        // GiB) are cleared in a row, up to a table entry,
                        // the table's end or the range's end.
                        let (mut k, mut e, mut at) = (i, e, base);
                        let mut cleared_end;
                        loop {
                            if let Some(runs) = collect.as_deref_mut() {
                                runs.add(self.format.leaf_address(e, l), size);
                            }
                            self.acc.write(t, k, 0);
                            batch.mark(&mut self.acc, l, t, k);
                            unmapped += size;
                            (k, at) = (k + 1, at + size);
                            cleared_end = at;
                            // The next present entry, if it is a leaf the
                            // range covers whole.
                            let mut next = None;
                            while k < ENTRIES && at.checked_add(size).is_some_and(|x| x <= end) {
                                let n = self.acc.read(t, k);
                                if !self.format.is_present(n) {
                                    (k, at) = (k + 1, at + size);
                                    continue;
                                }
                                if self.format.is_leaf(n, l) {
                                    next = Some(n);
                                }
                                break;
                            }
                            match next {
                                Some(n) => e = n,
                                None => break,
                            }
                        }
                        touched[l as usize] = true;
                        gather.add(base, cleared_end - 1);
                        cur = at;
                        break;
                    }
                    match self.split(t, i, e, l, batch) {
                        Ok(Some(new)) => {
                            gather.add(base, base + size - 1);
                            slot[l as usize] = i;
                            l -= 1;
                            path[l as usize] = new;
                            base_of[l as usize] = base;
                            continue;
                        }
                        // Another caller split it (or changed it) first:
                        // read the entry again.
                        Ok(None) => continue,
                        Err(()) => {
                            let error = Error::NoMemory { iova: base, level: l - 1 };
                            failure = Some(PartialUnmap { unmapped, iova: base.max(iova), error });
                            break;
                        }
                    }
                }
                if A::SHARED {
                    // As in `table_below`: the entry may be another
                    // caller's split, not yet flushed.
                    batch.mark(&mut self.acc, l, t, i);
                }
                slot[l as usize] = i;
                l -= 1;
                path[l as usize] = self.format.table_address(e);
                base_of[l as usize] = base;
            }
            // Leave the tables that no longer cover `cur`, unlinking those
            // this call emptied: exclusively, those that became empty;
            // concurrently, those whose whole span the range covers (no
            // other caller can be inside them), only when nothing failed.
            let leave_all = failure.is_some() || cur >= end;
            let mut v = l;
            while v < top && (leave_all || cur >> level_shift(v + 1) != (cur - 1) >> level_shift(v + 1)) {
                let vi = v as usize;
                let unlink = if A::SHARED {
                    let span = level_size(v + 1);
                    failure.is_none() && base_of[vi] >= iova && end - base_of[vi] >= span
                } else {
                    touched[vi]
                        && if v == 0 {
                            self.acc.is_empty_except(path[0], cleared0.0, cleared0.1)
                        } else {
                            self.acc.is_empty(path[vi])
                        }
                };
                touched[vi] = false;
                if unlink {
                    let parent = path[vi + 1];
                    self.acc.write(parent, slot[vi + 1], 0);
                    batch.mark(&mut self.acc, v + 1, parent, slot[vi + 1]);
                    touched[vi + 1] = true;
                    self.unlinked.push(path[vi]);
                }
                v += 1;
            }
            if let Some(f) = failure {
                return Err(f);
            }
            valid = v;
        }
        Ok(unmapped)
    }

    /// Replaces the large leaf `e` at `table[i]` (level `level`) by a table
    /// of 512 leaves one level down that translate the same way. The new
    /// table reaches memory before the entry that links it. `Ok(None)`
    /// when the entry no longer held `e` (a concurrent split won: the new
    /// table is freed), `Err` when no table could be allocated.
    fn split(&mut self, table: u64, i: usize, e: u64, level: u32, batch: &mut FlushBatch) -> Result<Option<u64>, ()> {
        let child_level = level - 1;
        let base_phys = self.format.leaf_address(e, level);
        let prot = self.format.leaf_prot(e);
        // A dirty large page makes every smaller page dirty: which part was
        // written is not known, and losing a write would lose it for good.
        let dirty = e & self.format.dirty_bit();
        let new = self.acc.alloc().ok_or(())?;
        let child = level_size(child_level);
        for k in 0..ENTRIES {
            self.acc.write(new, k, self.format.leaf_entry(base_phys + k as u64 * child, child_level, prot) | dirty);
        }
        if batch.active() {
            self.acc.flush(new, TABLE_SIZE);
        }
        if self.acc.cas(table, i, e, self.format.table_entry(new, level)).is_err() {
            self.acc.free(new);
            return Ok(None);
        }
        self.added += 1;
        batch.mark(&mut self.acc, level, table, i);
        Ok(Some(new))
    }
}

impl<F: PtFormat, M: TableMemory> PageTable<F, M> {
    /// Whether the format records writes in its leaves
    /// ([`PtFormat::dirty_bit`]), so [`Self::read_and_clear_dirty`] means
    /// something.
    pub fn dirty_capable(&self) -> bool {
        self.format.dirty_bit() != 0
    }

    /// Calls `record(iova, len)` for every leaf in `[iova, iova + length)`
    /// whose dirty bit the walker set, in ascending IOVA order, clipped to
    /// the range (a large page reports all of itself that the range
    /// covers: which part was written is not known). With `clear`, clears
    /// the dirty bit of each such leaf the range covers whole, one atomic
    /// read-modify-write per entry ([`TableMemory::clear_bits`]), flushing
    /// the changed lines on non-coherent memory, and adds the leaf to
    /// `gather`: the unit may hold the entry, dirty, in its IOTLB and would
    /// not mark it again until invalidated. A large page the range covers
    /// only partly stays dirty (it is reported again, which is safe; the
    /// writes outside the range are not lost). Unmapped parts are skipped.
    ///
    /// On memory the walker does not snoop, the lines of each leaf table
    /// are flushed before they are read, so the walker's updates in memory
    /// are what the CPU reads. Formats without a dirty bit report nothing.
    /// Errors: [`Error::BadRange`] as for `unmap`.
    pub fn read_and_clear_dirty(
        &mut self,
        iova: u64,
        length: u64,
        clear: bool,
        gather: &mut IotlbGather,
        record: &mut dyn FnMut(u64, u64),
    ) -> Result<(), Error> {
        let end = self.check_range(iova, length)?;
        let bit = self.format.dirty_bit();
        if bit == 0 {
            return Ok(());
        }
        let mut batch = FlushBatch::new(!self.coherent && clear);
        let mut walk = DirtyWalk { start: iova, end, bit, clear, gather, record, batch: &mut batch };
        self.dirty_table(self.root, self.top, 0, &mut walk);
        batch.finish(&mut Exclusive(&mut self.mem));
        Ok(())
    }

    fn dirty_table(&mut self, table: u64, level: u32, base: u64, w: &mut DirtyWalk<'_>) {
        let size = level_size(level);
        // Only tables overlapping the range are visited: base <= end - 1.
        let first = if w.start > base { ((w.start - base) / size) as usize } else { 0 };
        let last = (((w.end - 1) - base) / size).min(ENTRIES as u64 - 1) as usize;
        if !self.coherent {
            // Fetch what the walker wrote to memory.
            let lines = lines_of(first, last + 1 - first);
            let mut scratch = FlushBatch::new(true);
            let mut acc = Exclusive(&mut self.mem);
            scratch.mark_lines(&mut acc, level, table, lines);
            scratch.finish(&mut acc);
        }
        for i in first..=last {
            let e = self.mem.read(table, i);
            if !self.format.is_present(e) {
                continue;
            }
            let at = base + i as u64 * size;
            if !self.format.is_leaf(e, level) {
                self.dirty_table(self.format.table_address(e), level - 1, at, w);
                continue;
            }
            if e & w.bit == 0 {
                continue;
            }
            let from = at.max(w.start);
            let to = (at + (size - 1)).min(w.end - 1);
            (w.record)(from, to - from + 1);
            if w.clear && at >= w.start && at + (size - 1) < w.end {
                self.mem.clear_bits(table, i, w.bit);
                w.batch.mark(&mut Exclusive(&mut self.mem), level, table, i);
                w.gather.add(at, at + (size - 1));
            }
        }
    }

    /// Sets the dirty bit of the leaf translating `iova`, as the walker
    /// does on a write through it (for tests of what drives the engine:
    /// no emulated unit sets dirty bits). False when `iova` is unmapped or
    /// the format records no writes.
    #[cfg(any(test, feature = "testing"))]
    pub fn mark_dirty(&mut self, iova: u64) -> bool {
        let bit = self.format.dirty_bit();
        let Some(step) = self.leaf_step(iova) else { return false };
        if bit == 0 {
            return false;
        }
        self.mem.write(step.table, step.index, step.raw | bit);
        if !self.coherent {
            self.mem.flush(step.table + step.index as u64 * 8, 8);
        }
        true
    }

    /// Whether the leaf translating `iova` is dirty (`None` if unmapped).
    pub fn is_dirty(&self, iova: u64) -> Option<bool> {
        self.leaf_step(iova).map(|s| s.raw & self.format.dirty_bit() != 0)
    }

    /// The physical address and permissions `iova` translates to.
    pub fn iova_to_phys(&self, iova: u64) -> Option<(u64, Prot)> {
        let step = self.leaf_step(iova)?;
        let size = level_size(step.level);
        Some((self.format.leaf_address(step.raw, step.level) + (iova & (size - 1)), self.format.leaf_prot(step.raw)))
    }

    /// The physically contiguous run from `iova`: `{ phys, len }` with
    /// `1 <= len <= max_len`, `[iova, iova + len)` translating to
    /// `[phys, phys + len)`. One walk from the root; the run then extends
    /// over the following leaves of the same table while they continue it.
    pub fn phys_run(&self, iova: u64, max_len: u64) -> Option<PhysRun> {
        if max_len == 0 {
            return None;
        }
        let step = self.leaf_step(iova)?;
        let size = level_size(step.level);
        let phys = self.format.leaf_address(step.raw, step.level) + (iova & (size - 1));
        let mut len = size - (iova & (size - 1));
        let mut next = phys + len;
        let mut i = step.index + 1;
        while len < max_len && i < ENTRIES {
            let raw = self.mem.read(step.table, i);
            if !self.format.is_present(raw)
                || !self.format.is_leaf(raw, step.level)
                || self.format.leaf_address(raw, step.level) != next
            {
                break;
            }
            len += size;
            next += size;
            i += 1;
        }
        Some(PhysRun::new(phys, len.min(max_len)))
    }

    /// `[iova, iova + length)` as physically contiguous runs in `out`
    /// (see `IommuDomain::iova_to_phys_runs`): `(runs, bytes covered)`.
    /// One walk per leaf table (from the lookup cache when it covers the
    /// start), then the leaves of that table in a row.
    pub fn phys_runs(&self, iova: u64, length: u64, out: &mut [PhysRun]) -> (usize, u64) {
        let (mut n, mut done) = (0usize, 0u64);
        'walks: while done < length {
            let cur = iova.wrapping_add(done);
            let Some(step) = self.leaf_step(cur) else { break };
            let size = level_size(step.level);
            let off = cur & (size - 1);
            let len = (size - off).min(length - done);
            if !push_run(out, &mut n, PhysRun::new(self.format.leaf_address(step.raw, step.level) + off, len)) {
                break;
            }
            done += len;
            for i in step.index + 1..ENTRIES {
                if done >= length {
                    break 'walks;
                }
                let raw = self.mem.read(step.table, i);
                if !self.format.is_present(raw) || !self.format.is_leaf(raw, step.level) {
                    break;
                }
                let len = size.min(length - done);
                if !push_run(out, &mut n, PhysRun::new(self.format.leaf_address(raw, step.level), len)) {
                    break 'walks;
                }
                done += len;
            }
        }
        (n, done)
    }

    /// Size of the page that translates `iova`, if mapped.
    pub fn page_size(&self, iova: u64) -> Option<u64> {
        self.leaf_step(iova).map(|s| level_size(s.level))
    }

    fn leaf_step(&self, iova: u64) -> Option<WalkStep> {
        if iova > self.last {
            return None;
        }
        // A lookup racing another (concurrent path) walks from the root.
        let (key, cached, level) = self.lookup_leaf.try_lock().map_or(NO_LOOKUP, |c| *c);
        let (mut t, mut l) = if level < self.top && key == iova >> level_shift(level + 1) {
            // The level-`level` table covering `iova` is in the tree.
            (cached, level)
        } else {
            (self.root, self.top)
        };
        let start = l;
        loop {
            let index = index_of(iova, l);
            let raw = self.mem.read(t, index);
            if !self.format.is_present(raw) {
                return None;
            }
            if self.format.is_leaf(raw, l) {
                if l != start
                    && l < self.top
                    && let Some(mut c) = self.lookup_leaf.try_lock()
                {
                    *c = (iova >> level_shift(l + 1), t, l);
                }
                return Some(WalkStep { level: l, table: t, index, raw });
            }
            t = self.format.table_address(raw);
            l -= 1;
        }
    }

    /// Every entry the walker reads to translate `iova`, root first, ending
    /// at a leaf or a non-present entry. Empty outside the aperture.
    pub fn walk(&self, iova: u64) -> Vec<WalkStep> {
        let mut steps = Vec::new();
        if iova > self.last {
            return steps;
        }
        let mut table = self.root;
        let mut level = self.top;
        loop {
            let index = index_of(iova, level);
            let raw = self.mem.read(table, index);
            steps.push(WalkStep { level, table, index, raw });
            if !self.format.is_present(raw) || self.format.is_leaf(raw, level) {
                return steps;
            }
            table = self.format.table_address(raw);
            level -= 1;
        }
    }

    /// A step's entry with a decoding `Debug`.
    pub fn describe(&self, step: &WalkStep) -> Entry<'_, F> {
        Entry { format: &self.format, level: step.level, raw: step.raw }
    }

    /// Calls `f(iova, size, phys, prot)` for every leaf, in IOVA order.
    pub fn for_each_mapping(&self, mut f: impl FnMut(u64, u64, u64, Prot)) {
        self.visit(self.root, self.top, 0, &mut f);
    }

    fn visit(&self, table: u64, level: u32, base: u64, f: &mut impl FnMut(u64, u64, u64, Prot)) {
        for i in 0..ENTRIES {
            let e = self.mem.read(table, i);
            if !self.format.is_present(e) {
                continue;
            }
            let iova = base + i as u64 * level_size(level);
            if self.format.is_leaf(e, level) {
                f(iova, level_size(level), self.format.leaf_address(e, level), self.format.leaf_prot(e));
            } else {
                self.visit(self.format.table_address(e), level - 1, iova, f);
            }
        }
    }

    /// Checks the structural invariants (every non-root table non-empty,
    /// `table_count` right, addresses aligned); returns the first violation.
    /// For tests; walks the whole tree. Once the concurrent path ran, empty
    /// tables may stay linked (see [`PageTable::map_shared`]) and are not
    /// a violation.
    pub fn check_invariants(&self) -> Result<(), alloc::string::String> {
        let mut count = 1;
        self.check_table(self.root, self.top, &mut count)?;
        if count != self.table_count() {
            return Err(alloc::format!("table_count {} but {} tables linked", self.table_count(), count));
        }
        Ok(())
    }

    fn check_table(&self, table: u64, level: u32, count: &mut usize) -> Result<(), alloc::string::String> {
        for i in 0..ENTRIES {
            let e = self.mem.read(table, i);
            if !self.format.is_present(e) {
                if e != 0 {
                    return Err(alloc::format!("non-present entry {e:#x} at {table:#x}[{i}] is not zero"));
                }
                continue;
            }
            if self.format.is_leaf(e, level) {
                // Leaves at a level the format forbids (a later
                // set_page_sizes does not make existing leaves invalid).
                if level > 0 && self.format.leaf_levels() >> level & 1 == 0 {
                    return Err(alloc::format!("leaf at level {level} at {table:#x}[{i}]"));
                }
                if self.format.leaf_address(e, level) + level_size(level) > self.output_limit {
                    return Err(alloc::format!("leaf beyond output width at {table:#x}[{i}]"));
                }
                continue;
            }
            let child = self.format.table_address(e);
            if self.mem.is_empty(child) && !self.shared_used.load(Relaxed) {
                return Err(alloc::format!("empty table {child:#x} linked at {table:#x}[{i}] level {level}"));
            }
            *count += 1;
            self.check_table(child, level - 1, count)?;
        }
        Ok(())
    }

    fn free_tree(&mut self, table: u64, level: u32) {
        if level > 0 {
            for i in 0..ENTRIES {
                let e = self.mem.read(table, i);
                if self.format.is_present(e) && !self.format.is_leaf(e, level) {
                    self.free_tree(self.format.table_address(e), level - 1);
                }
            }
        }
        self.mem.free_table(table);
    }
}

impl<F: PtFormat, M: TableMemory> Drop for PageTable<F, M> {
    /// Frees every table. The walker must no longer use this table (the
    /// devices are detached and the caches invalidated); when its owner
    /// could not confirm that, [`PageTable::keep_tables`] keeps them all.
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        self.release_deferred();
        self.free_tree(self.root, self.top);
    }
}
