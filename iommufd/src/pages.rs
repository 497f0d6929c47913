//! The pinned-page store.
//!
//! A [`Pages`] stands for one range of user memory or of a file that was
//! mapped (an `IOMMU_IOAS_MAP` or `IOMMU_IOAS_MAP_FILE` call, see
//! [`PagesOrigin`]). Areas of any number of IOAS refer to slices of it
//! (a copy makes a second area over the same `Pages`), and every user of a
//! page holds one *use*: an area that is loaded into domains holds one use
//! per page however many domains it is in, and an access that pinned a
//! page holds one per pin. A page is pinned in the [`MemorySource`] when its
//! first use appears and unpinned when its last goes: *each page is pinned
//! once*, and its physical address is kept here while pinned. Only the
//! pinning itself (`source_pin`) looks at the origin.
//!
//! Accounting: every page pinned through a `Pages` is charged to the
//! context's [`Accounting`] at pin time and credited at unpin; a pin that
//! would exceed the limit fails with `ENOMEM` and changes nothing.
//!
//! Locking: callers may hold an IOAS lock, never a domain lock. While
//! `Pages::table` is held, a read-back takes domain locks (one at a time)
//! and pinning takes the memory source's lock: the order is `Pages` →
//! domain → memory source. Holding the table across a read-back is what
//! keeps the uses of the pages read (so their pins, so the addresses read)
//! from going away before the new use is recorded. `Pages::holders` is a
//! leaf: the list is copied out before any domain is locked.

use crate::errno::{Errno, Result};
use crate::memsrc::{FileId, MemorySource, PAGE_SIZE, push_run};
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use portcullis_iommu::PhysRun;
use spin::Mutex;

/// How pinned pages are charged (Linux's `IOMMU_OPTION_RLIMIT_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountMode {
    /// Against the user's locked-memory limit (Linux's default, value 0).
    User,
    /// Against the process's pinned memory (value 1).
    Mm,
}

/// Where a context's pins are charged beyond the context itself. Linux
/// charges them to the context's user (`user->locked_vm`, RLIMIT_MODE 0)
/// or process (`mm->pinned_vm`, RLIMIT_MODE 1), counters that every
/// context of that user or process shares, checked against
/// `RLIMIT_MEMLOCK`. Without one ([`Accounting::share_with`]), each
/// context counts only its own pins. A charger is a leaf in the lock
/// order: it is called with the context's accounting locked and must not
/// call back into iommufd.
pub trait SharedCharge: Send + Sync + core::fmt::Debug {
    /// Adds `pages` to the counter `mode` names, or answers `ENOMEM` and
    /// adds nothing when its total would pass `limit` pages.
    fn charge(&self, mode: AccountMode, pages: u64, limit: u64) -> Result<()>;
    /// Takes `pages` (charged before under `mode`) off that counter.
    fn uncharge(&self, mode: AccountMode, pages: u64);
}

/// Fault injection for error-path sweeps: the `n`th *fault point* from
/// arming (object or page-store allocation, pin, domain allocation,
/// domain map) fails with `ENOMEM`. Off unless armed; each context has one,
/// in its [`Accounting`].
#[derive(Debug, Default)]
pub struct FaultPlan {
    calls: core::sync::atomic::AtomicU64,
    fail_at: core::sync::atomic::AtomicU64,
}

impl FaultPlan {
    /// Makes the `n`th fault point from now (1-based) fail; `None` disarms.
    pub fn arm(&self, n: Option<u64>) {
        use core::sync::atomic::Ordering::SeqCst;
        self.calls.store(0, SeqCst);
        self.fail_at.store(n.unwrap_or(0), SeqCst);
    }
    /// Fault points passed since arming (not counted while disarmed).
    pub fn calls(&self) -> u64 {
        self.calls.load(core::sync::atomic::Ordering::SeqCst)
    }
    /// One fault point: `ENOMEM` if this is the armed one.
    pub fn point(&self) -> Result<()> {
        use core::sync::atomic::Ordering::{Relaxed, SeqCst};
        // Disarmed (always, outside sweeps): one plain load per point.
        if self.fail_at.load(Relaxed) == 0 {
            return Ok(());
        }
        let n = self.calls.fetch_add(1, SeqCst) + 1;
        if self.fail_at.load(SeqCst) == n { Err(Errno::ENOMEM) } else { Ok(()) }
    }
}

/// Pinned-page accounting for one iommufd context (and its fault plan).
#[derive(Debug)]
pub struct Accounting {
    state: Mutex<AccountState>,
    /// Fault injection shared by everything in the context.
    pub faults: FaultPlan,
    /// The counters shared with other contexts, if any.
    shared: spin::Once<Arc<dyn SharedCharge>>,
}

#[derive(Debug)]
struct AccountState {
    mode: AccountMode,
    pinned: u64,
    limit: u64,
}

impl Accounting {
    /// Accounting with a limit in pages (`u64::MAX` = unlimited).
    pub fn new(limit_pages: u64) -> Self {
        Self {
            state: Mutex::new(AccountState { mode: AccountMode::User, pinned: 0, limit: limit_pages }),
            faults: FaultPlan::default(),
            shared: spin::Once::new(),
        }
    }
    /// Charges this context's pins to `shared` as well, from now on: the
    /// limit then applies to its counters (all the contexts sharing them),
    /// not to this context alone. `EBUSY` once anything is pinned or a
    /// charger is set.
    pub fn share_with(&self, shared: Arc<dyn SharedCharge>) -> Result<()> {
        let s = self.state.lock();
        if s.pinned != 0 || self.shared.is_completed() {
            return Err(Errno::EBUSY);
        }
        self.shared.call_once(|| shared);
        Ok(())
    }
    /// Pages charged now.
    pub fn pinned(&self) -> u64 {
        self.state.lock().pinned
    }
    /// The limit in pages.
    pub fn limit(&self) -> u64 {
        self.state.lock().limit
    }
    /// Changes the limit.
    pub fn set_limit(&self, pages: u64) {
        self.state.lock().limit = pages;
    }
    /// The accounting mode.
    pub fn mode(&self) -> AccountMode {
        self.state.lock().mode
    }
    /// Changes the mode; Linux refuses (`EBUSY`) while anything is pinned.
    pub fn set_mode(&self, mode: AccountMode) -> Result<()> {
        let mut s = self.state.lock();
        if s.mode != mode && s.pinned != 0 {
            return Err(Errno::EBUSY);
        }
        s.mode = mode;
        Ok(())
    }
    /// Moves the charge to a new owner with a limit of `limit_pages`
    /// (`IOMMU_IOAS_CHANGE_PROCESS`): `ENOMEM`, and nothing changes, when
    /// the pages charged now exceed it.
    pub fn move_to(&self, limit_pages: u64) -> Result<()> {
        let mut s = self.state.lock();
        if s.pinned > limit_pages {
            return Err(Errno::ENOMEM);
        }
        s.limit = limit_pages;
        Ok(())
    }
    fn charge(&self, pages: u64) -> Result<()> {
        let mut s = self.state.lock();
        let total = s.pinned.checked_add(pages).ok_or(Errno::ENOMEM)?;
        match self.shared.get() {
            Some(shared) if pages != 0 => shared.charge(s.mode, pages, s.limit)?,
            Some(_) => {}
            None if total > s.limit => return Err(Errno::ENOMEM),
            None => {}
        }
        s.pinned = total;
        Ok(())
    }
    fn credit(&self, pages: u64) {
        let mut s = self.state.lock();
        s.pinned = s.pinned.checked_sub(pages).expect("accounting went negative");
        if let Some(shared) = self.shared.get()
            && pages != 0
        {
            shared.uncharge(s.mode, pages);
        }
    }
}

const CHUNK: u64 = 512;

/// What a use of a page is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UseKind {
    /// An area loaded into domains (one use per page, whatever the number
    /// of domains). The domains hold the physical address: it is read back
    /// from them, not stored.
    Domain,
    /// Anything else (access pins, temporary pins for CPU copies): the
    /// physical address is stored while such a use exists.
    Other,
}

/// `Other` use counts of 512 consecutive pages and their physical
/// addresses (valid where the count is not zero).
struct Chunk {
    other: [u32; CHUNK as usize],
    phys: [u64; CHUNK as usize],
    used_pages: u32,
}

/// Domain uses as runs of pages with the same count: `start -> (last,
/// count)`, disjoint, counts above zero, neighbours with equal counts
/// merged. Domain uses always come a whole area (or one page, for a cut)
/// at a time, so a map or unmap of any size touches a few runs.
#[derive(Default)]
struct DomainUses {
    runs: BTreeMap<u64, (u64, u32)>,
}

impl DomainUses {
    fn count(&self, page: u64) -> u32 {
        match self.runs.range(..=page).next_back() {
            Some((_, &(l, c))) if l >= page => c,
            _ => 0,
        }
    }
    /// Makes `at` the start of a run if a run covers it.
    fn split(&mut self, at: u64) {
        if let Some((&s, &(l, c))) = self.runs.range(..at).next_back()
            && l >= at
        {
            self.runs.insert(s, (at - 1, c));
            self.runs.insert(at, (l, c));
        }
    }
    /// Merges equal-count neighbours between the run before `first` and
    /// the run starting after `last`, walking the runs in place.
    fn merge(&mut self, first: u64, last: u64) {
        let from = self.runs.range(..first).next_back().map_or(first, |(&s, _)| s);
        let end = last.saturating_add(1);
        let Some((&s, &(l, c))) = self.runs.range(from..=end).next() else { return };
        let (mut ps, mut pl, mut pc) = (s, l, c);
        // Runs are disjoint: the next one starts past the current's last page.
        while let Some((&s, &(l, c))) =
            pl.checked_add(1).filter(|&n| n <= end).and_then(|n| self.runs.range(n..=end).next())
        {
            if pc == c && pl + 1 == s {
                self.runs.remove(&s);
                self.runs.insert(ps, (l, c));
                pl = l;
            } else {
                (ps, pl, pc) = (s, l, c);
            }
        }
    }
    fn add(&mut self, first: u64, last: u64) {
        self.split(first);
        self.split(last + 1);
        let inside: Vec<(u64, u64)> = self.runs.range(first..=last).map(|(&s, &(l, _))| (s, l)).collect();
        let mut cur = first;
        for (s, l) in inside {
            if s > cur {
                self.runs.insert(cur, (s - 1, 1));
            }
            self.runs.get_mut(&s).expect("listed").1 += 1;
            cur = l + 1;
        }
        if cur <= last {
            self.runs.insert(cur, (last, 1));
        }
        self.merge(first, last);
    }
    fn remove(&mut self, first: u64, last: u64) {
        // One run exactly (an area unmapped whole, its pages in no other
        // domain): no split, and nothing can merge after it goes.
        if let Some(&(l, c)) = self.runs.get(&first)
            && l == last
        {
            if c == 1 {
                self.runs.remove(&first);
            } else {
                self.runs.insert(first, (l, c - 1));
                self.merge(first, last);
            }
            return;
        }
        self.split(first);
        self.split(last + 1);
        let inside: Vec<(u64, u64)> = self.runs.range(first..=last).map(|(&s, &(l, _))| (s, l)).collect();
        let mut cur = first;
        for (s, l) in inside {
            assert_eq!(s, cur, "unpin of page {cur} with no domain use");
            let c = &mut self.runs.get_mut(&s).expect("listed").1;
            *c -= 1;
            if *c == 0 {
                self.runs.remove(&s);
            }
            cur = l + 1;
        }
        assert!(cur > last, "unpin of page {cur} with no domain use");
        self.merge(first, last);
    }
    /// Ranges of `[first, last]` with no domain use, in order.
    fn gaps(&self, first: u64, last: u64, out: &mut Vec<(u64, u64)>) {
        self.gaps_each(first, last, |s, e| out.push((s, e)));
    }
    /// [`Self::gaps`], each range handed to `f` as it is found.
    fn gaps_each(&self, first: u64, last: u64, mut f: impl FnMut(u64, u64)) {
        let mut cur = first;
        let before = self.runs.range(..first).next_back().map(|(&s, &(l, _))| (s, l));
        for (s, l) in before.into_iter().chain(self.runs.range(first..=last).map(|(&s, &(l, _))| (s, l))) {
            if l < cur {
                continue;
            }
            if s > cur {
                f(cur, s - 1);
            }
            cur = l + 1;
            if cur > last {
                return;
            }
        }
        if cur <= last {
            f(cur, last);
        }
    }
}

/// Use counts of the pages of one [`Pages`]: domain uses as runs,
/// other uses per page in 512-page chunks (with the addresses they need),
/// allocated only where such pages are.
#[derive(Default)]
struct PinTable {
    domain: DomainUses,
    chunks: BTreeMap<u64, Box<Chunk>>,
    pinned_pages: u64,
    stored_pages: u64,
    /// Addresses of pages whose domain use stays for good with no domain
    /// left to read them from (an area whose unload's invalidation
    /// failed): (first page, last page, runs from the first page).
    kept: Vec<(u64, u64, Vec<PhysRun>)>,
}

impl PinTable {
    fn other(&self, page: u64) -> u32 {
        self.chunks.get(&(page / CHUNK)).map_or(0, |c| c.other[(page % CHUNK) as usize])
    }
    fn uses(&self, page: u64) -> u32 {
        self.domain.count(page) + self.other(page)
    }
    fn stored(&self, page: u64) -> Option<u64> {
        let c = self.chunks.get(&(page / CHUNK))?;
        let i = (page % CHUNK) as usize;
        (c.other[i] > 0).then(|| c.phys[i])
    }
    /// Splits `[first, last]` into maximal ranges of pages with and
    /// without an `Other` use: `f(start, last, has_other)` in order.
    fn other_ranges(&self, first: u64, last: u64, mut f: impl FnMut(u64, u64, bool)) {
        let mut cur = first; // first page not reported yet
        let mut run: Option<(u64, bool)> = None;
        let emit = |p: u64, has: bool, run: &mut Option<(u64, bool)>, f: &mut dyn FnMut(u64, u64, bool)| match *run {
            Some((_, h)) if h == has => {}
            Some((s, h)) => {
                f(s, p - 1, h);
                *run = Some((p, has));
            }
            None => *run = Some((p, has)),
        };
        for (&ci, c) in self.chunks.range(first / CHUNK..=last / CHUNK) {
            let lo = (ci * CHUNK).max(first);
            let hi = (ci * CHUNK + CHUNK - 1).min(last);
            if lo > cur {
                emit(cur, false, &mut run, &mut f);
            }
            for p in lo..=hi {
                emit(p, c.other[(p % CHUNK) as usize] > 0, &mut run, &mut f);
            }
            cur = hi + 1;
        }
        if cur <= last {
            emit(cur, false, &mut run, &mut f);
        }
        if let Some((s, h)) = run {
            f(s, last, h);
        }
    }
    /// Appends the kept addresses of pages `[first, last]` (see
    /// [`Pages::release_holder`]) as runs; false when some page has none.
    fn kept_runs(&self, first: u64, last: u64, out: &mut Vec<PhysRun>) -> bool {
        let mut page = first;
        'pages: while page <= last {
            for (f, l, runs) in &self.kept {
                if !(*f..=*l).contains(&page) {
                    continue;
                }
                // Walk the entry's runs to the one holding `page`.
                let mut at = *f;
                for r in runs {
                    let n = r.len / PAGE_SIZE;
                    if page < at + n {
                        let take = (at + n - page).min(last - page + 1).min(l - page + 1);
                        push_run(out, PhysRun::new(r.phys + (page - at) * PAGE_SIZE, take * PAGE_SIZE));
                        page += take;
                        continue 'pages;
                    }
                    at += n;
                }
            }
            return false;
        }
        true
    }
    /// Ranges of `[first, last]` whose pages have no use at all.
    fn unused(&self, first: u64, last: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        self.domain.gaps(first, last, &mut gaps);
        if self.chunks.is_empty() {
            return gaps;
        }
        let mut out = Vec::new();
        for (s, l) in gaps {
            self.other_ranges(s, l, |a, b, has| {
                if !has {
                    out.push((a, b));
                }
            });
        }
        out
    }
    /// Adds an `Other` use of each page of `[first, last]`; `phys` gives
    /// their addresses (runs from `first`).
    fn add_other(&mut self, first: u64, last: u64, phys: &[PhysRun]) {
        let mut page = first;
        for &PhysRun { phys: p, len } in phys {
            for k in 0..len / PAGE_SIZE {
                let c = self.chunks.entry(page / CHUNK).or_insert_with(|| {
                    Box::new(Chunk { other: [0; CHUNK as usize], phys: [0; CHUNK as usize], used_pages: 0 })
                });
                let i = (page % CHUNK) as usize;
                if c.other[i] == 0 {
                    c.phys[i] = p + k * PAGE_SIZE;
                    c.used_pages += 1;
                    self.stored_pages += 1;
                }
                c.other[i] += 1;
                page += 1;
            }
        }
        debug_assert_eq!(page, last + 1);
    }
    /// Drops an `Other` use of each page of `[first, last]`; `f(page,
    /// phys)` for each page whose last `Other` use this was.
    fn remove_other(&mut self, first: u64, last: u64, mut f: impl FnMut(u64, u64)) {
        for page in first..=last {
            let key = page / CHUNK;
            let c = self.chunks.get_mut(&key).expect("unpin of a page with no use");
            let i = (page % CHUNK) as usize;
            assert!(c.other[i] > 0, "unpin of page {page} with no other use");
            c.other[i] -= 1;
            if c.other[i] == 0 {
                f(page, c.phys[i]);
                c.used_pages -= 1;
                self.stored_pages -= 1;
                if c.used_pages == 0 {
                    self.chunks.remove(&key);
                }
            }
        }
    }
}

/// Reads runs of whole pages that start at page `base`, in increasing
/// page order.
struct RunCursor<'a> {
    runs: &'a [PhysRun],
    idx: usize,
    /// Page of `runs[idx]`'s first page.
    at: u64,
}

impl<'a> RunCursor<'a> {
    fn new(runs: &'a [PhysRun], base: u64) -> Self {
        Self { runs, idx: 0, at: base }
    }
    /// Appends the addresses of pages `[first, last]` (not before any
    /// page asked for earlier) to `out`; false if the runs end first.
    fn take(&mut self, first: u64, last: u64, out: &mut Vec<PhysRun>) -> bool {
        let mut page = first;
        while page <= last {
            let Some(&PhysRun { phys: p, len }) = self.runs.get(self.idx) else { return false };
            let n = len / PAGE_SIZE;
            if page >= self.at + n {
                self.at += n;
                self.idx += 1;
                continue;
            }
            let k = (last + 1).min(self.at + n) - page;
            push_run(out, PhysRun::new(p + (page - self.at) * PAGE_SIZE, k * PAGE_SIZE));
            page += k;
        }
        true
    }
}

/// A domain that maps some pages of a [`Pages`] and can tell their
/// physical addresses: an area loaded into its IOAS's domains registers
/// one, naming one of those domains.
#[derive(Clone)]
pub struct Holder {
    /// First and last page the area covers.
    pub first_page: u64,
    /// Last page (inclusive).
    pub last_page: u64,
    /// IOVA of the area's first byte.
    pub iova: u64,
    /// Offset of the area's first byte from the start of the pages.
    pub start_byte: u64,
    /// The domain to read from.
    pub domain: DomainRef,
}

/// Physical addresses of consecutive pages as runs of physically
/// contiguous whole pages, in page order (the form
/// `IommuDomain::map_runs` takes).
pub type PhysRuns = Vec<PhysRun>;

/// A domain as areas, holders and its HWPT share it.
pub type DomainRef = Arc<DomainLock>;

/// The lock around a domain: `lock` for exclusive use (every domain
/// method taking `&mut self`), `read` for the concurrent map and unmap of
/// an IOAS ([`portcullis_iommu::IommuDomain::map_shared`] and its
/// siblings), which domains that support it run from several threads at
/// once on disjoint ranges, and for lookups.
pub struct DomainLock(spin::RwLock<Box<dyn portcullis_iommu::IommuDomain>>);

impl core::fmt::Debug for DomainLock {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("DomainLock")
    }
}

impl DomainLock {
    /// `domain`, unlocked.
    pub fn new(domain: Box<dyn portcullis_iommu::IommuDomain>) -> Self {
        Self(spin::RwLock::new(domain))
    }
    /// The domain, exclusively.
    pub fn lock(&self) -> spin::RwLockWriteGuard<'_, Box<dyn portcullis_iommu::IommuDomain>> {
        self.0.write()
    }
    /// The domain, shared with other readers.
    pub fn read(&self) -> spin::RwLockReadGuard<'_, Box<dyn portcullis_iommu::IommuDomain>> {
        self.0.read()
    }
}

impl core::fmt::Debug for Holder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Holder(pages {}..={} at IOVA {:#x})", self.first_page, self.last_page, self.iova)
    }
}

impl Holder {
    /// The physical run from `page`: `(address of page, pages)`, at most
    /// `max_pages` pages, all inside this holder.
    fn phys_run(&self, page: u64, max_pages: u64) -> Option<(u64, u64)> {
        if page < self.first_page || page > self.last_page {
            return None;
        }
        let max_pages = max_pages.min(self.last_page - page + 1);
        let first_byte = (page * PAGE_SIZE).max(self.start_byte);
        let off = first_byte - page * PAGE_SIZE;
        let iova = self.iova + (first_byte - self.start_byte);
        let PhysRun { phys: p, len } = self.domain.read().iova_to_phys_run(iova, max_pages * PAGE_SIZE - off)?;
        Some((p - off, (off + len).div_ceil(PAGE_SIZE).min(max_pages)))
    }
}

/// The holders of a [`Pages`], and which of them are busy: registered
/// before their domains map the pages (a fill), or about to lose them (an
/// unload). A busy holder cannot be read from, and a page only a busy
/// holder covers is refused (`EBUSY`) rather than looked up elsewhere.
#[derive(Default)]
struct Holders {
    map: BTreeMap<u64, Holder>,
    busy: alloc::collections::BTreeSet<u64>,
}

impl Holders {
    fn remove(&mut self, key: u64) {
        self.map.remove(&key);
        self.busy.remove(&key);
    }
}

/// What [`Pages::read_back`] found.
#[derive(Debug, PartialEq, Eq)]
enum ReadBack {
    /// Every page.
    Found,
    /// A page no holder covers.
    Missing,
    /// A page only a busy holder covers.
    Busy,
}

/// Where the pages of a [`Pages`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagesOrigin {
    /// User memory (`IOMMU_IOAS_MAP`): page 0 is the page at this
    /// page-aligned user address.
    User {
        /// Page-aligned user address of page 0.
        uptr: u64,
    },
    /// A file (`IOMMU_IOAS_MAP_FILE`), held from the memory source while
    /// the `Pages` lives: page 0 is the page at this page-aligned byte
    /// offset of the file.
    File {
        /// The file, as the memory source names it.
        file: FileId,
        /// Page-aligned byte offset of page 0 in the file.
        start: u64,
    },
}

impl PagesOrigin {
    /// The page-aligned address (user address or file offset) of page 0:
    /// what IOVA allocation aligns to, as Linux does for both kinds.
    pub fn base(&self) -> u64 {
        match *self {
            PagesOrigin::User { uptr } => uptr,
            PagesOrigin::File { start, .. } => start,
        }
    }
    /// Whether the pages come from a file.
    pub fn is_file(&self) -> bool {
        matches!(self, PagesOrigin::File { .. })
    }
}

/// One mapped range of user memory or of a file, and its pins.
pub struct Pages {
    /// Where the pages come from.
    pub origin: PagesOrigin,
    /// Number of pages.
    pub npages: u64,
    /// Whether the memory may be mapped writable.
    pub writable: bool,
    source: Arc<dyn MemorySource>,
    accounting: Arc<Accounting>,
    table: Mutex<PinTable>,
    holders: Mutex<Holders>,
    next_holder: core::sync::atomic::AtomicU64,
}

impl core::fmt::Debug for Pages {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Pages({:?}, {} pages, {} pinned)", self.origin, self.npages, self.table.lock().pinned_pages)
    }
}

impl Drop for Pages {
    /// A file mapping gives its hold on the file back to the source.
    fn drop(&mut self) {
        if let PagesOrigin::File { file, .. } = self.origin {
            self.source.file_put(file);
        }
    }
}

impl Pages {
    /// Covers the user bytes `[uptr, uptr + length)`, whole pages.
    /// Returns the store and the byte offset of `uptr` inside page 0.
    pub fn new(
        source: Arc<dyn MemorySource>,
        accounting: Arc<Accounting>,
        uptr: u64,
        length: u64,
        writable: bool,
    ) -> Result<(Arc<Pages>, u64)> {
        if length == 0 {
            return Err(Errno::EINVAL);
        }
        let end = uptr.checked_add(length).ok_or(Errno::EOVERFLOW)?;
        let first = uptr & !(PAGE_SIZE - 1);
        let last_page_end = end.checked_next_multiple_of(PAGE_SIZE).ok_or(Errno::EOVERFLOW)?;
        let npages = (last_page_end - first) / PAGE_SIZE;
        accounting.faults.point()?;
        let pages = Pages {
            origin: PagesOrigin::User { uptr: first },
            npages,
            writable,
            source,
            accounting,
            table: Mutex::new(PinTable::default()),
            holders: Mutex::new(Holders::default()),
            next_holder: core::sync::atomic::AtomicU64::new(1),
        };
        Ok((Arc::new(pages), uptr - first))
    }

    /// Covers bytes `[start, start + length)` of `file`, whole pages, and
    /// takes over the caller's hold on the file (given back to the source
    /// when the `Pages` goes, or at once on error). Returns the store and
    /// the byte offset of `start` inside page 0. Checks in Linux 6.13's
    /// order (`iopt_alloc_file_pages`, `iopt_alloc_pages`): an empty
    /// range is `EINVAL`, a last byte past `u64::MAX` `EOVERFLOW`, a
    /// length within a page of `u64::MAX` `EINVAL`. Whether the range
    /// lies inside the file is only known when its pages are pinned.
    pub fn new_file(
        source: Arc<dyn MemorySource>,
        accounting: Arc<Accounting>,
        file: FileId,
        start: u64,
        length: u64,
        writable: bool,
    ) -> Result<(Arc<Pages>, u64)> {
        let checked = || -> Result<(u64, u64)> {
            if length != 0 && start.checked_add(length - 1).is_none() {
                return Err(Errno::EOVERFLOW);
            }
            if length == 0 || length > u64::MAX - PAGE_SIZE {
                return Err(Errno::EINVAL);
            }
            let start_byte = start % PAGE_SIZE;
            // Cannot overflow: length <= u64::MAX - PAGE_SIZE.
            let npages = (start_byte + length).div_ceil(PAGE_SIZE);
            accounting.faults.point()?;
            Ok((start_byte, npages))
        };
        let (start_byte, npages) = match checked() {
            Ok(v) => v,
            Err(e) => {
                source.file_put(file);
                return Err(e);
            }
        };
        let pages = Pages {
            origin: PagesOrigin::File { file, start: start - start_byte },
            npages,
            writable,
            source,
            accounting,
            table: Mutex::new(PinTable::default()),
            holders: Mutex::new(Holders::default()),
            next_holder: core::sync::atomic::AtomicU64::new(1),
        };
        Ok((Arc::new(pages), start_byte))
    }

    /// Pins pages `[first, first + n)` in the memory source (user
    /// addresses or file offsets) and appends their addresses as runs.
    fn source_pin(&self, first: u64, n: u64, out: &mut Vec<PhysRun>) -> Result<()> {
        // page < npages, so the offset stays below the end of the range,
        // which fits in 64 bits; checked anyway.
        let offset = |base: u64, err: Errno| first.checked_mul(PAGE_SIZE).and_then(|o| base.checked_add(o)).ok_or(err);
        match self.origin {
            PagesOrigin::User { uptr } => self.source.pin_runs(offset(uptr, Errno::EFAULT)?, n, self.writable, out),
            PagesOrigin::File { file, start } => {
                self.source.pin_file_runs(file, offset(start, Errno::EINVAL)?, n, self.writable, out)
            }
        }
    }

    /// Pages pinned now through this store.
    pub fn pinned_pages(&self) -> u64 {
        self.table.lock().pinned_pages
    }

    /// Pages whose physical address is stored here (the rest of the pinned
    /// pages are held by domains and read back from them).
    pub fn stored_pages(&self) -> u64 {
        self.table.lock().stored_pages
    }

    /// Use count of page `index` (for tests and the selftest's check_refs).
    pub fn uses(&self, index: u64) -> u32 {
        self.table.lock().uses(index)
    }

    /// A fault-injection point of the owning context (domain maps).
    pub fn fault_point(&self) -> Result<()> {
        self.accounting.faults.point()
    }

    /// The memory source behind these pages.
    pub fn source(&self) -> &Arc<dyn MemorySource> {
        &self.source
    }

    /// Registers a domain holding pages `[first, last]` (see [`Holder`]).
    /// Returns its key for [`Self::unregister`] / [`Self::retarget`].
    pub fn register(&self, holder: Holder) -> u64 {
        let key = self.next_holder.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        self.holders.lock().map.insert(key, holder);
        key
    }

    /// Registers a holder busy, before its domain maps the pages: until
    /// [`Self::set_busy`] clears it, a pin of pages only it covers is
    /// refused with `EBUSY` (their addresses are not readable yet).
    pub fn register_busy(&self, holder: Holder) -> u64 {
        let key = self.register(holder);
        self.set_busy(Some(key), true);
        key
    }

    /// Removes holder `key` (nothing when it is gone already).
    pub fn unregister(&self, key: u64) {
        self.holders.lock().remove(key);
    }

    /// Marks holder `key` (if any) busy (before its domain's mapping of
    /// the pages is cleared) or readable again.
    pub fn set_busy(&self, key: Option<u64>, busy: bool) {
        let Some(key) = key else { return };
        let mut h = self.holders.lock();
        if busy {
            h.busy.insert(key);
        } else {
            h.busy.remove(&key);
        }
    }

    /// Replaces holder `old` (if any) by `new`, in one step; returns the
    /// new keys.
    pub fn replace_holder<const N: usize>(&self, old: Option<u64>, new: [Holder; N]) -> [u64; N] {
        let mut h = self.holders.lock();
        if let Some(k) = old {
            h.remove(k);
        }
        new.map(|holder| {
            let key = self.next_holder.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            h.map.insert(key, holder);
            key
        })
    }

    /// Points a holder at another domain of the same IOAS (its domain is
    /// being removed).
    pub fn retarget(&self, key: u64, domain: DomainRef) {
        if let Some(h) = self.holders.lock().map.get_mut(&key) {
            h.domain = domain;
        }
    }

    /// Appends the addresses of pages `[first, last]` as runs, read back
    /// from the domains holding them (busy holders are not read).
    fn read_back(&self, first: u64, last: u64, out: &mut Vec<PhysRun>) -> ReadBack {
        let (holders, busy): (Vec<Holder>, Vec<(u64, u64)>) = {
            let h = self.holders.lock();
            let overlapping = h.map.iter().filter(|(_, x)| x.first_page <= last && first <= x.last_page);
            let (mut ready, mut busy) = (Vec::new(), Vec::new());
            for (k, x) in overlapping {
                if h.busy.contains(k) {
                    busy.push((x.first_page, x.last_page));
                } else {
                    ready.push(x.clone());
                }
            }
            (ready, busy)
        };
        let mut page = first;
        while page <= last {
            let Some((p, n)) = holders.iter().find_map(|h| h.phys_run(page, last - page + 1)) else {
                return if busy.iter().any(|&(f, l)| (f..=l).contains(&page)) {
                    ReadBack::Busy
                } else {
                    ReadBack::Missing
                };
            };
            push_run(out, PhysRun::new(p, n * PAGE_SIZE));
            page += n;
        }
        ReadBack::Found
    }

    /// Appends the addresses of pages `[first, last]`, which have uses
    /// (the caller holds the table lock, so they keep them): read back from
    /// the domains of the holders that are not busy, else the addresses
    /// kept when a failed invalidation left an unloaded area's pages
    /// pinned ([`Self::release_holder`]). A page that only a busy holder
    /// covers (an area of another IOAS being filled or unloaded) is
    /// `EBUSY`. A page in use that nothing names should not exist; it is
    /// looked up from the memory source as a last resort (pinned once
    /// more and that pin dropped at once).
    fn locate(&self, t: &PinTable, first: u64, last: u64, out: &mut Vec<PhysRun>) -> Result<()> {
        let mut found = Vec::new();
        let read = self.read_back(first, last, &mut found);
        if read != ReadBack::Found {
            found.clear();
            if !t.kept_runs(first, last, &mut found) {
                found.clear();
                if read == ReadBack::Busy {
                    // Mid-fill or mid-unload (in another IOAS): the address
                    // is not readable now, and the user address may no
                    // longer name the page that was pinned.
                    return Err(Errno::EBUSY);
                }
                self.source_pin(first, last - first + 1, &mut found)?;
                self.source.unpin_runs(&found, false);
            }
        }
        for run in found {
            push_run(out, run);
        }
        Ok(())
    }

    /// Lets go of holder `key` (if any) and of the domain use of pages
    /// `[first, last]` its area took, in one step under the table lock (so
    /// no pin in between finds the pages in use with nobody to name their
    /// addresses). `phys` are the pages' addresses (runs from `first`) as
    /// read when the domains were unloaded. With `unpin` (every
    /// invalidation succeeded) the use goes as [`Self::unpin`] drops it;
    /// without, it stays for good (a device may still reach the pages) and
    /// `phys` is kept as their addresses: a later user of these pages (a
    /// copy's new domain) takes them from here, not from the user address,
    /// which may name other memory by then.
    pub fn release_holder(&self, key: Option<u64>, first: u64, last: u64, phys: &[PhysRun], unpin: bool) {
        let mut t = self.table.lock();
        if let Some(k) = key {
            self.holders.lock().remove(k);
        }
        if unpin {
            self.unpin_locked(t, first, last, UseKind::Domain, Some(phys));
        } else {
            t.kept.push((first, last, phys.to_vec()));
        }
    }

    /// Whether these pages' domain pins are dropped by user address
    /// ([`MemorySource::pins_stay_at_user`]; user memory only): an unload
    /// then needs no addresses read back ([`Self::release_holder_by_user`]).
    pub fn unpins_by_user(&self) -> bool {
        matches!(self.origin, PagesOrigin::User { .. }) && self.source.pins_stay_at_user()
    }

    /// [`Self::release_holder`] without the pages' addresses, for pages
    /// that [`Self::unpins_by_user`]: pages that go are unpinned by user
    /// address. Without `unpin` nothing is kept besides the pins: a later
    /// user of the pages finds their addresses at the user address, where
    /// they stay.
    pub fn release_holder_by_user(&self, key: Option<u64>, first: u64, last: u64, unpin: bool) {
        debug_assert!(self.unpins_by_user(), "pages whose addresses are needed to unpin them");
        let t = self.table.lock();
        if let Some(k) = key {
            self.holders.lock().remove(k);
        }
        if unpin {
            self.unpin_locked(t, first, last, UseKind::Domain, None);
        }
    }

    /// Physical address of page `index` while it has a use: stored, or
    /// read back from a domain that holds it.
    pub fn phys(&self, index: u64) -> Option<u64> {
        let (uses, stored) = {
            let t = self.table.lock();
            (t.uses(index), t.stored(index))
        };
        if uses == 0 {
            return None;
        }
        stored.or_else(|| {
            let mut r = Vec::new();
            (self.read_back(index, index, &mut r) == ReadBack::Found).then(|| r[0].phys)
        })
    }

    /// Takes one use of `kind` of every page in `[first, last]`, pinning
    /// those that had none, and writes their physical addresses to `out`
    /// (if given, `out.len() == last - first + 1`). All or nothing.
    pub fn pin(&self, first: u64, last: u64, kind: UseKind, out: Option<&mut [u64]>) -> Result<()> {
        let runs = self.pin_runs(first, last, kind)?;
        if let Some(o) = out {
            let mut k = 0;
            for PhysRun { phys: p, len } in runs {
                for j in 0..len / PAGE_SIZE {
                    o[k] = p + j * PAGE_SIZE;
                    k += 1;
                }
            }
        }
        Ok(())
    }

    /// Takes one use of `kind` of every page in `[first, last]`, pinning
    /// those that had none (a run at a time in the memory source), and
    /// returns the addresses of all of them as runs in page order. All or
    /// nothing.
    pub fn pin_runs(&self, first: u64, last: u64, kind: UseKind) -> Result<PhysRuns> {
        if first > last || last >= self.npages {
            return Err(Errno::EINVAL);
        }
        let mut t = self.table.lock();
        let fresh = t.unused(first, last);
        let fresh_count: u64 = fresh.iter().map(|(s, e)| e - s + 1).sum();
        if fresh_count > 0 {
            self.accounting.faults.point()?;
        }
        self.accounting.charge(fresh_count)?;
        if fresh.len() == 1 && fresh[0] == (first, last) {
            // Nothing in the range was in use (a new mapping): the source's
            // runs are the answer.
            let mut all = Vec::new();
            if let Err(err) = self.source_pin(first, last - first + 1, &mut all) {
                self.accounting.credit(fresh_count);
                return Err(err);
            }
            t.pinned_pages += fresh_count;
            match kind {
                UseKind::Domain => t.domain.add(first, last),
                UseKind::Other => t.add_other(first, last, &all),
            }
            return Ok(all);
        }
        // Fresh pages are pinned run by run; `fresh_runs[ends[i - 1]..ends[i]]`
        // are the addresses of `fresh[i]`.
        let mut fresh_runs: Vec<PhysRun> = Vec::new();
        let mut ends: Vec<usize> = Vec::with_capacity(fresh.len());
        let undo = |runs: &[PhysRun]| {
            self.source.unpin_runs(runs, false);
            self.accounting.credit(fresh_count);
        };
        for &(s, e) in &fresh {
            // A fresh range's runs never merge with the previous range's.
            let before = fresh_runs.len();
            let mut mine = Vec::new();
            if let Err(err) = self.source_pin(s, e - s + 1, &mut mine) {
                undo(&fresh_runs);
                return Err(err);
            }
            fresh_runs.extend_from_slice(&mine);
            ends.push(before + mine.len());
        }
        // Every page's address in order: fresh ones from the source, the
        // others stored or located (read back from a domain holding them,
        // see `locate`). The table
        // stays locked, so those pages keep their uses (and pins) until
        // this use is recorded; taking domain locks under it follows the
        // order `Pages` → domain (no one holding a domain lock waits for
        // a `Pages` lock).
        let mut all: Vec<PhysRun> = Vec::new();
        let mut failed = Ok(());
        let mut page = first;
        let mut used = |a: u64, b: u64, all: &mut Vec<PhysRun>, t: &PinTable| {
            t.other_ranges(a, b, |x, y, stored| {
                if failed.is_err() {
                    return;
                }
                if stored {
                    for q in x..=y {
                        push_run(all, PhysRun::new(t.stored(q).expect("stored"), PAGE_SIZE));
                    }
                } else {
                    failed = self.locate(t, x, y, all);
                }
            });
        };
        for (i, &(s, e)) in fresh.iter().enumerate() {
            if s > page {
                used(page, s - 1, &mut all, &t);
            }
            let from = if i == 0 { 0 } else { ends[i - 1] };
            for &run in &fresh_runs[from..ends[i]] {
                push_run(&mut all, run);
            }
            page = e + 1;
        }
        if page <= last {
            used(page, last, &mut all, &t);
        }
        if let Err(e) = failed {
            // The memory source could not answer for a page in use.
            undo(&fresh_runs);
            return Err(e);
        }
        t.pinned_pages += fresh_count;
        match kind {
            UseKind::Domain => t.domain.add(first, last),
            UseKind::Other => t.add_other(first, last, &all),
        }
        Ok(all)
    }

    /// Drops one use of `kind` of every page in `[first, last]`; pages
    /// whose last use goes are unpinned. For `Domain` uses the caller passes
    /// the addresses it read back before unmapping the domains (`hint`,
    /// runs from `first`), since nothing else knows them any more.
    pub fn unpin(&self, first: u64, last: u64, kind: UseKind, hint: Option<&[PhysRun]>) {
        self.unpin_locked(self.table.lock(), first, last, kind, hint);
    }

    fn unpin_locked(
        &self,
        mut t: spin::MutexGuard<'_, PinTable>,
        first: u64,
        last: u64,
        kind: UseKind,
        hint: Option<&[PhysRun]>,
    ) {
        let mut release: Vec<PhysRun> = Vec::new();
        let mut count = 0u64;
        match kind {
            UseKind::Domain => {
                t.domain.remove(first, last);
                if hint.is_none()
                    && let PagesOrigin::User { uptr } = self.origin
                    && self.source.pins_stay_at_user()
                {
                    // The pages are where they were pinned: no addresses
                    // needed, each range that goes is unpinned by user
                    // address, with the pin table locked as for pinning
                    // (the source's own lock nests inside it there too).
                    let mut count = 0u64;
                    let table = &*t;
                    table.domain.gaps_each(first, last, |s, e| {
                        table.other_ranges(s, e, |a, b, has_other| {
                            if !has_other {
                                count += b - a + 1;
                                self.source.unpin_user(uptr + a * PAGE_SIZE, b - a + 1, self.writable);
                            }
                        })
                    });
                    t.pinned_pages -= count;
                    drop(t);
                    self.accounting.credit(count);
                    return;
                }
                let mut gone = Vec::new();
                t.domain.gaps(first, last, &mut gone);
                if let Some(h) = hint
                    && gone == [(first, last)]
                    && t.chunks.range(first / CHUNK..=last / CHUNK).next().is_none()
                {
                    // Every page goes (no other use anywhere in the range):
                    // the caller's addresses are the ones to release.
                    let count = last - first + 1;
                    t.pinned_pages -= count;
                    drop(t);
                    self.source.unpin_runs(h, self.writable);
                    self.accounting.credit(count);
                    return;
                }
                let mut cursor = hint.map(|h| RunCursor::new(h, first));
                for (s, e) in gone {
                    t.other_ranges(s, e, |a, b, has_other| {
                        if has_other {
                            return;
                        }
                        count += b - a + 1;
                        let found = cursor.as_mut().is_some_and(|c| c.take(a, b, &mut release))
                            || self.locate(&t, a, b, &mut release).is_ok();
                        assert!(found, "the address of a page being unpinned is known");
                    });
                }
            }
            UseKind::Other => {
                let mut gaps = Vec::new();
                t.domain.gaps(first, last, &mut gaps);
                let mut gi = 0;
                t.remove_other(first, last, |page, phys| {
                    while gi < gaps.len() && gaps[gi].1 < page {
                        gi += 1;
                    }
                    if gi < gaps.len() && gaps[gi].0 <= page {
                        count += 1;
                        push_run(&mut release, PhysRun::new(phys, PAGE_SIZE));
                    }
                });
            }
        }
        if count > 0 {
            t.pinned_pages -= count;
            drop(t);
            self.source.unpin_runs(&release, self.writable);
            self.accounting.credit(count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memsrc::FakeAddressSpace;

    fn setup(limit: u64) -> (Arc<FakeAddressSpace>, Arc<Accounting>) {
        let a = Arc::new(FakeAddressSpace::new());
        a.map(0x10_0000, 16 * PAGE_SIZE, true);
        (a, Arc::new(Accounting::new(limit)))
    }

    #[test]
    fn each_page_is_pinned_once_however_many_users() {
        let (a, acct) = setup(u64::MAX);
        let (p, off) = Pages::new(a.clone(), acct.clone(), 0x10_0800, 3 * PAGE_SIZE, true).unwrap();
        assert_eq!((p.npages, off), (4, 0x800));
        let mut phys = [0u64; 4];
        p.pin(0, 3, UseKind::Other, Some(&mut phys)).unwrap();
        p.pin(1, 2, UseKind::Other, None).unwrap();
        assert_eq!(a.pins(0x10_1000), 1);
        assert_eq!(p.uses(1), 2);
        assert_eq!(acct.pinned(), 4);
        assert_eq!(phys[1], a.phys_of(0x10_1000).unwrap());
        p.unpin(0, 3, UseKind::Other, None);
        assert_eq!(a.pinned_pages(), 2);
        assert_eq!(acct.pinned(), 2);
        p.unpin(1, 2, UseKind::Other, None);
        assert_eq!(a.pinned_pages(), 0);
        assert_eq!(acct.pinned(), 0);
        assert_eq!(p.pinned_pages(), 0);
    }

    proptest::proptest! {
        /// Domain uses against one count per page: counts, gaps, and runs
        /// kept merged (no two adjacent runs with one count), through
        /// adds and removes of whole earlier adds (as areas come and go)
        /// and of pieces of them.
        #[test]
        fn domain_uses_match_a_count_per_page(
            ops in proptest::collection::vec((0u64..48, 0u64..16, 0u8..3), 1..60)
        ) {
            let mut d = DomainUses::default();
            let mut model = [0u32; 64];
            let mut added: Vec<(u64, u64)> = Vec::new();
            for (a, len, kind) in ops {
                let (first, last) = (a, a + len);
                match kind {
                    0 => {
                        d.add(first, last);
                        added.push((first, last));
                        (first..=last).for_each(|p| model[p as usize] += 1);
                    }
                    // Remove a whole earlier add, or a piece of one.
                    _ if !added.is_empty() => {
                        let (f, l) = added.swap_remove((a as usize) % added.len());
                        let (f2, l2) = if kind == 1 { (f, l) } else { (f + (l - f) / 2, l) };
                        d.remove(f2, l2);
                        (f2..=l2).for_each(|p| model[p as usize] -= 1);
                        if f2 > f {
                            // The rest stays in use: remember it as an add.
                            added.push((f, f2 - 1));
                        }
                    }
                    _ => {}
                }
                for p in 0..64u64 {
                    proptest::prop_assert_eq!(d.count(p), model[p as usize], "page {}", p);
                }
                let mut gaps = Vec::new();
                d.gaps(0, 63, &mut gaps);
                let want: Vec<u64> = (0..64u64).filter(|&p| model[p as usize] == 0).collect();
                let got: Vec<u64> = gaps.iter().flat_map(|&(s, e)| s..=e).collect();
                proptest::prop_assert_eq!(got, want);
                let runs: Vec<(u64, u64, u32)> = d.runs.iter().map(|(&s, &(l, c))| (s, l, c)).collect();
                for w in runs.windows(2) {
                    proptest::prop_assert!(
                        !(w[0].1 + 1 == w[1].0 && w[0].2 == w[1].2),
                        "adjacent runs with one count: {:?}", w
                    );
                }
            }
        }
    }

    #[test]
    fn domain_uses_are_runs_with_counts() {
        let mut d = DomainUses::default();
        d.add(0, 9);
        d.add(5, 14);
        assert_eq!((d.count(0), d.count(5), d.count(9), d.count(10), d.count(15)), (1, 2, 2, 1, 0));
        assert_eq!(d.runs.len(), 3);
        d.add(0, 4);
        d.add(10, 14);
        assert_eq!(d.runs.len(), 1, "equal neighbours merge");
        let mut gaps = Vec::new();
        d.gaps(0, 20, &mut gaps);
        assert_eq!(gaps, [(15, 20)]);
        d.remove(0, 14);
        d.remove(3, 7);
        gaps.clear();
        d.gaps(0, 20, &mut gaps);
        assert_eq!(gaps, [(3, 7), (15, 20)]);
        d.remove(0, 2);
        d.remove(8, 14);
        assert!(d.runs.is_empty());
    }

    #[test]
    fn runs_mix_domain_and_other_uses() {
        let (a, acct) = setup(u64::MAX);
        let (p, _) = Pages::new(a.clone(), acct.clone(), 0x10_0000, 8 * PAGE_SIZE, true).unwrap();
        p.pin(2, 3, UseKind::Other, None).unwrap();
        let runs = p.pin_runs(0, 7, UseKind::Domain).unwrap();
        let base = a.phys_of(0x10_0000).unwrap();
        assert_eq!(runs, [PhysRun::new(base, 8 * PAGE_SIZE)], "one contiguous run over fresh and stored pages");
        assert_eq!((acct.pinned(), a.pinned_pages()), (8, 8));
        p.unpin(0, 7, UseKind::Domain, Some(&runs));
        assert_eq!((acct.pinned(), a.pinned_pages(), p.uses(2), p.uses(4)), (2, 2, 1, 0));
        p.unpin(2, 3, UseKind::Other, None);
        assert_eq!((acct.pinned(), a.pinned_pages(), p.stored_pages()), (0, 0, 0));
    }

    #[test]
    fn file_pages_pin_file_offsets_and_release_the_file() {
        let (a, acct) = setup(u64::MAX);
        let fd = a.create_memfd(8 * PAGE_SIZE);
        a.map_file(0x80_0000, fd, 0, 8 * PAGE_SIZE);
        let f = a.file_get(fd, true).unwrap();
        let (p, off) = Pages::new_file(a.clone(), acct.clone(), f, PAGE_SIZE + 0x10, 2 * PAGE_SIZE, true).unwrap();
        assert_eq!((p.npages, off, p.origin), (3, 0x10, PagesOrigin::File { file: f, start: PAGE_SIZE }));
        let runs = p.pin_runs(0, 2, UseKind::Other).unwrap();
        assert_eq!(runs, [PhysRun::new(a.phys_of(0x80_1000).unwrap(), 3 * PAGE_SIZE)]);
        assert_eq!((a.pins(0x80_3000), a.pins(0x80_4000), acct.pinned()), (1, 0, 3));
        p.unpin(0, 2, UseKind::Other, None);
        assert_eq!((a.pinned_pages(), acct.pinned()), (0, 0));
        a.close_fd(fd).unwrap();
        assert_eq!(a.live_files(), 1, "the pages hold the file");
        drop(p);
        assert_eq!(a.live_files(), 0);
    }

    #[test]
    fn file_ranges_are_checked_without_overflow() {
        let (a, acct) = setup(u64::MAX);
        let fd = a.create_memfd(PAGE_SIZE);
        let get = || a.file_get(fd, false).unwrap();
        let new = |start, length| {
            Pages::new_file(a.clone(), acct.clone(), get(), start, length, false).map(|(p, o)| (p.npages, o))
        };
        assert_eq!(new(0, 0), Err(Errno::EINVAL));
        assert_eq!(new(u64::MAX, 2), Err(Errno::EOVERFLOW));
        assert_eq!(new(2, u64::MAX), Err(Errno::EOVERFLOW));
        assert_eq!(new(1, u64::MAX), Err(Errno::EINVAL), "last byte is u64::MAX: no overflow, too long");
        assert_eq!(new(0, u64::MAX), Err(Errno::EINVAL));
        assert_eq!(new(0, u64::MAX - PAGE_SIZE + 1), Err(Errno::EINVAL));
        // The very last page of the offset space: fine until pinned.
        let (p, off) = Pages::new_file(a.clone(), acct.clone(), get(), u64::MAX - 0xfff, 0x1000, false).unwrap();
        assert_eq!((p.npages, off), (1, 0));
        assert_eq!(p.pin(0, 0, UseKind::Other, None), Err(Errno::EINVAL), "past the end of the file");
        assert_eq!(new(u64::MAX, 1), Ok((1, 0xfff)));
        assert_eq!(new(0, u64::MAX - PAGE_SIZE), Ok(((u64::MAX - PAGE_SIZE).div_ceil(PAGE_SIZE), 0)));
        drop(p);
        assert_eq!((acct.pinned(), a.pinned_pages()), (0, 0));
        a.close_fd(fd).unwrap();
        assert_eq!(a.live_files(), 0, "every failed or dropped Pages gave its hold back");
    }

    #[test]
    fn limit_and_source_failures_change_nothing() {
        let (a, acct) = setup(3);
        let (p, _) = Pages::new(a.clone(), acct.clone(), 0x10_0000, 8 * PAGE_SIZE, true).unwrap();
        p.pin(0, 1, UseKind::Other, None).unwrap();
        assert_eq!(p.pin(0, 3, UseKind::Other, None), Err(Errno::ENOMEM));
        assert_eq!((acct.pinned(), a.pinned_pages(), p.uses(0)), (2, 2, 1));
        acct.set_limit(u64::MAX);
        // Pages 4..=5 pin, then the second run (7..) fails in the source.
        a.fail_pin_at(Some(2));
        p.pin(4, 5, UseKind::Other, None).unwrap();
        p.pin(6, 6, UseKind::Other, None).unwrap_err();
        assert_eq!((acct.pinned(), a.pinned_pages()), (4, 4));
        // A range beyond the mapping faults and leaves the pins as they were.
        let (q, _) = Pages::new(a.clone(), acct.clone(), 0x10_e000, 4 * PAGE_SIZE, true).unwrap();
        assert_eq!(q.pin(0, 3, UseKind::Other, None), Err(Errno::EFAULT));
        assert_eq!((acct.pinned(), a.pinned_pages()), (4, 4));
    }

    /// Two counters shared by every context, as a user's and a process's.
    #[derive(Debug, Default)]
    struct Counters(Mutex<[u64; 2]>);

    impl SharedCharge for Counters {
        fn charge(&self, mode: AccountMode, pages: u64, limit: u64) -> Result<()> {
            let mut c = self.0.lock();
            let k = (mode == AccountMode::Mm) as usize;
            match c[k].checked_add(pages) {
                Some(t) if t <= limit => {
                    c[k] = t;
                    Ok(())
                }
                _ => Err(Errno::ENOMEM),
            }
        }
        fn uncharge(&self, mode: AccountMode, pages: u64) {
            self.0.lock()[(mode == AccountMode::Mm) as usize] -= pages;
        }
    }

    #[test]
    fn contexts_sharing_a_charger_share_the_limit() {
        let a = Arc::new(FakeAddressSpace::new());
        a.map(0x10_0000, 16 * PAGE_SIZE, true);
        let shared = Arc::new(Counters::default());
        let (one, two) = (Arc::new(Accounting::new(5)), Arc::new(Accounting::new(5)));
        one.share_with(shared.clone()).unwrap();
        two.share_with(shared.clone()).unwrap();
        assert_eq!(two.share_with(shared.clone()), Err(Errno::EBUSY), "set once");
        two.set_mode(AccountMode::Mm).unwrap();
        let (p, _) = Pages::new(a.clone(), one.clone(), 0x10_0000, 8 * PAGE_SIZE, true).unwrap();
        let (q, _) = Pages::new(a.clone(), two.clone(), 0x10_8000, 8 * PAGE_SIZE, true).unwrap();
        // Each context alone is under its limit of 5; the user counter is
        // what the first one charges, the process counter the second.
        p.pin(0, 3, UseKind::Other, None).unwrap();
        q.pin(0, 4, UseKind::Other, None).unwrap();
        assert_eq!(*shared.0.lock(), [4, 5]);
        let (r, _) = Pages::new(a.clone(), two.clone(), 0x10_0000, 8 * PAGE_SIZE, true).unwrap();
        assert_eq!(r.pin(5, 5, UseKind::Other, None), Err(Errno::ENOMEM), "the process counter is at 5");
        assert_eq!((two.pinned(), *shared.0.lock()), (5, [4, 5]), "a refused charge changes nothing");
        let three = Arc::new(Accounting::new(5));
        three.share_with(shared.clone()).unwrap();
        let (t, _) = Pages::new(a.clone(), three.clone(), 0x10_8000, 8 * PAGE_SIZE, true).unwrap();
        t.pin(0, 0, UseKind::Other, None).unwrap();
        assert_eq!(t.pin(1, 1, UseKind::Other, None), Err(Errno::ENOMEM), "the user counter is at 5");
        assert_eq!(two.set_mode(AccountMode::User), Err(Errno::EBUSY), "pins outstanding");
        for (pages, last) in [(&p, 3), (&q, 4), (&t, 0)] {
            pages.unpin(0, last, UseKind::Other, None);
        }
        assert_eq!(*shared.0.lock(), [0, 0], "every pin uncharged");
        assert_eq!(one.share_with(shared.clone()), Err(Errno::EBUSY));
    }
}
