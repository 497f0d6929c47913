//! The pinned-page store.
//!
//! A [`Pages`] stands for one range of user memory that was mapped (an
//! `IOMMU_IOAS_MAP` call). Areas of any number of IOAS refer to slices of it
//! (a copy makes a second area over the same `Pages`), and every user of a
//! page holds one *use*: an area that is loaded into domains holds one use
//! per page however many domains it is in, and an access that pinned a
//! page holds one per pin. A page is pinned in the [`MemorySource`] when its
//! first use appears and unpinned when its last goes: *each page is pinned
//! once*, and its physical address is kept here while pinned.
//!
//! Accounting: every page pinned through a `Pages` is charged to the
//! context's [`Accounting`] at pin time and credited at unpin; a pin that
//! would exceed the limit fails with `ENOMEM` and changes nothing.
//!
//! Locking: `Pages::table` is a leaf lock except for the memory source's
//! own internal lock, taken inside it. Callers may hold an IOAS lock.

use crate::errno::{Errno, Result};
use crate::memsrc::{MemorySource, PAGE_SIZE};
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use spin::Mutex;

/// How pinned pages are charged (Linux's `IOMMU_OPTION_RLIMIT_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountMode {
    /// Against the user's locked-memory limit (Linux's default, value 0).
    User,
    /// Against the process's pinned memory (value 1).
    Mm,
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
    /// Fault points passed since arming.
    pub fn calls(&self) -> u64 {
        self.calls.load(core::sync::atomic::Ordering::SeqCst)
    }
    /// One fault point: `ENOMEM` if this is the armed one.
    pub fn point(&self) -> Result<()> {
        use core::sync::atomic::Ordering::SeqCst;
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
        }
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
    fn charge(&self, pages: u64) -> Result<()> {
        let mut s = self.state.lock();
        let total = s.pinned.checked_add(pages).ok_or(Errno::ENOMEM)?;
        if total > s.limit {
            return Err(Errno::ENOMEM);
        }
        s.pinned = total;
        Ok(())
    }
    fn credit(&self, pages: u64) {
        let mut s = self.state.lock();
        s.pinned = s.pinned.checked_sub(pages).expect("accounting went negative");
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

/// Use counts of 512 consecutive pages, and their physical addresses where
/// a use other than a domain's needs them.
struct Chunk {
    domain: [u32; CHUNK as usize],
    other: [u32; CHUNK as usize],
    /// Physical addresses, present while some page of the chunk has an
    /// `Other` use (valid exactly for those pages).
    phys: Option<Box<[u64; CHUNK as usize]>>,
    used_pages: u32,
    stored_pages: u32,
}

/// Per-page use counts, allocated in 512-page chunks only where something
/// is pinned.
#[derive(Default)]
struct PinTable {
    chunks: BTreeMap<u64, Box<Chunk>>,
    pinned_pages: u64,
    stored_pages: u64,
}

impl PinTable {
    fn counts(&self, page: u64) -> (u32, u32) {
        self.chunks.get(&(page / CHUNK)).map_or((0, 0), |c| {
            let i = (page % CHUNK) as usize;
            (c.domain[i], c.other[i])
        })
    }
    fn uses(&self, page: u64) -> u32 {
        let (d, o) = self.counts(page);
        d + o
    }
    fn stored(&self, page: u64) -> Option<u64> {
        let c = self.chunks.get(&(page / CHUNK))?;
        let i = (page % CHUNK) as usize;
        if c.other[i] > 0 { c.phys.as_ref().map(|p| p[i]) } else { None }
    }
    fn chunk(&mut self, page: u64) -> &mut Chunk {
        self.chunks.entry(page / CHUNK).or_insert_with(|| {
            Box::new(Chunk {
                domain: [0; CHUNK as usize],
                other: [0; CHUNK as usize],
                phys: None,
                used_pages: 0,
                stored_pages: 0,
            })
        })
    }
    /// Adds a use of `kind`; `phys` is the page's address (stored when it
    /// is the first `Other` use).
    fn add(&mut self, page: u64, kind: UseKind, phys: u64) {
        let i = (page % CHUNK) as usize;
        let mut newly_stored = false;
        let c = self.chunk(page);
        if c.domain[i] + c.other[i] == 0 {
            c.used_pages += 1;
        }
        match kind {
            UseKind::Domain => c.domain[i] += 1,
            UseKind::Other => {
                if c.other[i] == 0 {
                    c.phys.get_or_insert_with(|| Box::new([0; CHUNK as usize]))[i] = phys;
                    c.stored_pages += 1;
                    newly_stored = true;
                }
                c.other[i] += 1;
            }
        }
        if newly_stored {
            self.stored_pages += 1;
        }
    }
    /// Drops a use of `kind`; returns the stored address if it was the
    /// page's last `Other` use, and whether the page has no use left.
    fn remove(&mut self, page: u64, kind: UseKind) -> (Option<u64>, bool) {
        let i = (page % CHUNK) as usize;
        let key = page / CHUNK;
        let c = self.chunks.get_mut(&key).expect("unpin of a page with no use");
        let mut dropped = None;
        match kind {
            UseKind::Domain => {
                assert!(c.domain[i] > 0, "unpin of page {page} with no domain use");
                c.domain[i] -= 1;
            }
            UseKind::Other => {
                assert!(c.other[i] > 0, "unpin of page {page} with no other use");
                c.other[i] -= 1;
                if c.other[i] == 0 {
                    dropped = c.phys.as_ref().map(|p| p[i]);
                    c.stored_pages -= 1;
                    if c.stored_pages == 0 {
                        c.phys = None;
                    }
                }
            }
        }
        let gone = c.domain[i] + c.other[i] == 0;
        if gone {
            c.used_pages -= 1;
        }
        if dropped.is_some() {
            self.stored_pages -= 1;
        }
        if c.used_pages == 0 {
            self.chunks.remove(&key);
        }
        (dropped, gone)
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

/// A domain as areas and holders share it.
pub type DomainRef = Arc<Mutex<Box<dyn portcullis_iommu::IommuDomain>>>;

impl core::fmt::Debug for Holder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Holder(pages {}..={} at IOVA {:#x})", self.first_page, self.last_page, self.iova)
    }
}

impl Holder {
    fn phys(&self, page: u64) -> Option<u64> {
        if page < self.first_page || page > self.last_page {
            return None;
        }
        let first_byte = (page * PAGE_SIZE).max(self.start_byte);
        let iova = self.iova + (first_byte - self.start_byte);
        let p = self.domain.lock().iova_to_phys(iova)?;
        Some(p - (first_byte - page * PAGE_SIZE))
    }
}

/// One mapped range of user memory and its pins.
pub struct Pages {
    /// Page-aligned user address of page 0.
    pub uptr: u64,
    /// Number of pages.
    pub npages: u64,
    /// Whether the memory may be mapped writable.
    pub writable: bool,
    source: Arc<dyn MemorySource>,
    accounting: Arc<Accounting>,
    table: Mutex<PinTable>,
    holders: Mutex<BTreeMap<u64, Holder>>,
    next_holder: core::sync::atomic::AtomicU64,
}

impl core::fmt::Debug for Pages {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Pages(uptr {:#x}, {} pages, {} pinned)", self.uptr, self.npages, self.table.lock().pinned_pages)
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
            uptr: first,
            npages,
            writable,
            source,
            accounting,
            table: Mutex::new(PinTable::default()),
            holders: Mutex::new(BTreeMap::new()),
            next_holder: core::sync::atomic::AtomicU64::new(1),
        };
        Ok((Arc::new(pages), uptr - first))
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
        self.holders.lock().insert(key, holder);
        key
    }

    /// Removes a holder.
    pub fn unregister(&self, key: u64) {
        self.holders.lock().remove(&key);
    }

    /// Points a holder at another domain of the same IOAS (its domain is
    /// being removed).
    pub fn retarget(&self, key: u64, domain: DomainRef) {
        if let Some(h) = self.holders.lock().get_mut(&key) {
            h.domain = domain;
        }
    }

    fn read_back(&self, page: u64) -> Option<u64> {
        let holders: Vec<Holder> =
            self.holders.lock().values().filter(|h| h.first_page <= page && page <= h.last_page).cloned().collect();
        holders.iter().find_map(|h| h.phys(page))
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
        stored.or_else(|| self.read_back(index))
    }

    /// Takes one use of `kind` of every page in `[first, last]`, pinning
    /// those that had none, and writes their physical addresses to `out`
    /// (if given, `out.len() == last - first + 1`). All or nothing.
    pub fn pin(&self, first: u64, last: u64, kind: UseKind, out: Option<&mut [u64]>) -> Result<()> {
        if first > last || last >= self.npages {
            return Err(Errno::EINVAL);
        }
        let mut t = self.table.lock();
        // Runs of pages with no use yet need the source.
        let mut fresh: Vec<(u64, u64)> = Vec::new();
        let mut p = first;
        while p <= last {
            if t.uses(p) == 0 {
                let s = p;
                while p <= last && t.uses(p) == 0 {
                    p += 1;
                }
                fresh.push((s, p - 1));
            } else {
                p += 1;
            }
        }
        let fresh_count: u64 = fresh.iter().map(|(s, e)| e - s + 1).sum();
        if fresh_count > 0 {
            self.accounting.faults.point()?;
        }
        self.accounting.charge(fresh_count)?;
        // Fresh pages are pinned straight into their slots of `phys_all`.
        let n = (last - first + 1) as usize;
        let mut phys_all: Vec<u64> = alloc::vec![0; n];
        let mut pinned_runs: Vec<(usize, usize)> = Vec::with_capacity(fresh.len());
        let undo = |runs: &[(usize, usize)], phys_all: &[u64]| {
            for &(a, b) in runs {
                self.source.unpin(&phys_all[a..b], false);
            }
            self.accounting.credit(fresh_count);
        };
        for &(s, e) in &fresh {
            let (a, b) = ((s - first) as usize, (e - first + 1) as usize);
            if let Err(err) = self.source.pin(self.uptr + s * PAGE_SIZE, &mut phys_all[a..b], self.writable) {
                undo(&pinned_runs, &phys_all);
                return Err(err);
            }
            pinned_runs.push((a, b));
        }
        // Every other page's address: stored, or read back from a domain
        // holding it (the table stays locked: holders only take domain
        // locks, which never wait for this lock).
        let mut next_fresh = fresh.iter().peekable();
        let mut page = first;
        while page <= last {
            if let Some(&&(s, e)) = next_fresh.peek()
                && s == page
            {
                next_fresh.next();
                page = e + 1;
                continue;
            }
            match t.stored(page).or_else(|| self.read_back(page)) {
                Some(ph) => phys_all[(page - first) as usize] = ph,
                None => {
                    // A page in use that no one can locate: a broken
                    // holder registration. Refuse rather than guess.
                    undo(&pinned_runs, &phys_all);
                    return Err(Errno::EIO);
                }
            }
            page += 1;
        }
        t.pinned_pages += fresh_count;
        for (k, page) in (first..=last).enumerate() {
            t.add(page, kind, phys_all[k]);
        }
        if let Some(o) = out {
            o.copy_from_slice(&phys_all);
        }
        Ok(())
    }

    /// Drops one use of `kind` of every page in `[first, last]`; pages
    /// whose last use goes are unpinned. For `Domain` uses the caller passes
    /// the addresses it read back before unmapping the domains (`hint`,
    /// one per page), since nothing else knows them any more.
    pub fn unpin(&self, first: u64, last: u64, kind: UseKind, hint: Option<&[u64]>) {
        let mut t = self.table.lock();
        let mut release: Vec<u64> = Vec::new();
        for (k, page) in (first..=last).enumerate() {
            let stored = t.stored(page);
            let (dropped, gone) = t.remove(page, kind);
            if gone {
                let phys = dropped
                    .or(stored)
                    .or_else(|| hint.and_then(|h| h.get(k).copied()))
                    .or_else(|| self.read_back(page))
                    .expect("the address of a page being unpinned is known");
                release.push(phys);
            }
        }
        if !release.is_empty() {
            t.pinned_pages -= release.len() as u64;
            drop(t);
            self.source.unpin(&release, self.writable);
            self.accounting.credit(release.len() as u64);
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
}
