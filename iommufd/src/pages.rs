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

/// Pins of 512 consecutive pages: physical address and use count.
struct Chunk {
    phys: [u64; CHUNK as usize],
    uses: [u32; CHUNK as usize],
    used_pages: u32,
}

/// Per-page use counts and physical addresses, allocated in 512-page
/// chunks only where something is pinned.
#[derive(Default)]
struct PinTable {
    chunks: BTreeMap<u64, Box<Chunk>>,
    pinned_pages: u64,
}

impl PinTable {
    fn uses(&self, page: u64) -> u32 {
        self.chunks.get(&(page / CHUNK)).map_or(0, |c| c.uses[(page % CHUNK) as usize])
    }
    fn phys(&self, page: u64) -> Option<u64> {
        let c = self.chunks.get(&(page / CHUNK))?;
        let i = (page % CHUNK) as usize;
        (c.uses[i] > 0).then_some(c.phys[i])
    }
    fn slot(&mut self, page: u64) -> (&mut u64, &mut u32, &mut u32) {
        let c = self
            .chunks
            .entry(page / CHUNK)
            .or_insert_with(|| Box::new(Chunk { phys: [0; CHUNK as usize], uses: [0; CHUNK as usize], used_pages: 0 }));
        let i = (page % CHUNK) as usize;
        (&mut c.phys[i], &mut c.uses[i], &mut c.used_pages)
    }
    fn drop_empty(&mut self, page: u64) {
        if self.chunks.get(&(page / CHUNK)).is_some_and(|c| c.used_pages == 0) {
            self.chunks.remove(&(page / CHUNK));
        }
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
        let pages = Pages { uptr: first, npages, writable, source, accounting, table: Mutex::new(PinTable::default()) };
        Ok((Arc::new(pages), uptr - first))
    }

    /// Pages pinned now through this store.
    pub fn pinned_pages(&self) -> u64 {
        self.table.lock().pinned_pages
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

    /// Takes one use of every page in `[first, last]`, pinning those that
    /// had none, and writes their physical addresses to `out` (if given,
    /// `out.len() == last - first + 1`). All or nothing.
    pub fn pin(&self, first: u64, last: u64, mut out: Option<&mut [u64]>) -> Result<()> {
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
        let mut done: Vec<(u64, Vec<u64>)> = Vec::with_capacity(fresh.len());
        for &(s, e) in &fresh {
            let mut phys = alloc::vec![0u64; (e - s + 1) as usize];
            if let Err(err) = self.source.pin(self.uptr + s * PAGE_SIZE, &mut phys, self.writable) {
                for (_, phys) in &done {
                    self.source.unpin(phys, false);
                }
                self.accounting.credit(fresh_count);
                return Err(err);
            }
            done.push((s, phys));
        }
        for (s, phys) in done {
            for (k, ph) in phys.into_iter().enumerate() {
                let (slot, _, used_pages) = t.slot(s + k as u64);
                *slot = ph;
                *used_pages += 1;
            }
        }
        t.pinned_pages += fresh_count;
        for page in first..=last {
            let (phys, uses, _) = t.slot(page);
            *uses += 1;
            if let Some(o) = out.as_deref_mut() {
                o[(page - first) as usize] = *phys;
            }
        }
        Ok(())
    }

    /// Drops one use of every page in `[first, last]`; pages whose last use
    /// goes are unpinned.
    pub fn unpin(&self, first: u64, last: u64) {
        let mut t = self.table.lock();
        let mut release: Vec<u64> = Vec::new();
        for page in first..=last {
            let (phys, uses, used_pages) = t.slot(page);
            assert!(*uses > 0, "unpin of page {page} with no use");
            *uses -= 1;
            if *uses == 0 {
                release.push(*phys);
                *used_pages -= 1;
                *phys = 0;
            }
            t.drop_empty(page);
        }
        if !release.is_empty() {
            t.pinned_pages -= release.len() as u64;
            drop(t);
            self.source.unpin(&release, self.writable);
            self.accounting.credit(release.len() as u64);
        }
    }

    /// Physical address of page `index` while it has a use.
    pub fn phys(&self, index: u64) -> Option<u64> {
        self.table.lock().phys(index)
    }

    /// Physical addresses of pages `[first, last]`, all of which must have a
    /// use (the caller holds one).
    pub fn phys_range(&self, first: u64, last: u64, out: &mut Vec<u64>) {
        let t = self.table.lock();
        out.clear();
        out.extend((first..=last).map(|p| t.phys(p).expect("page has a use")));
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
        p.pin(0, 3, Some(&mut phys)).unwrap();
        p.pin(1, 2, None).unwrap();
        assert_eq!(a.pins(0x10_1000), 1);
        assert_eq!(p.uses(1), 2);
        assert_eq!(acct.pinned(), 4);
        assert_eq!(phys[1], a.phys_of(0x10_1000).unwrap());
        p.unpin(0, 3);
        assert_eq!(a.pinned_pages(), 2);
        assert_eq!(acct.pinned(), 2);
        p.unpin(1, 2);
        assert_eq!(a.pinned_pages(), 0);
        assert_eq!(acct.pinned(), 0);
        assert_eq!(p.pinned_pages(), 0);
    }

    #[test]
    fn limit_and_source_failures_change_nothing() {
        let (a, acct) = setup(3);
        let (p, _) = Pages::new(a.clone(), acct.clone(), 0x10_0000, 8 * PAGE_SIZE, true).unwrap();
        p.pin(0, 1, None).unwrap();
        assert_eq!(p.pin(0, 3, None), Err(Errno::ENOMEM));
        assert_eq!((acct.pinned(), a.pinned_pages(), p.uses(0)), (2, 2, 1));
        acct.set_limit(u64::MAX);
        // Pages 4..=5 pin, then the second run (7..) fails in the source.
        a.fail_pin_at(Some(2));
        p.pin(4, 5, None).unwrap();
        p.pin(6, 6, None).unwrap_err();
        assert_eq!((acct.pinned(), a.pinned_pages()), (4, 4));
        // A range beyond the mapping faults and leaves the pins as they were.
        let (q, _) = Pages::new(a.clone(), acct.clone(), 0x10_e000, 4 * PAGE_SIZE, true).unwrap();
        assert_eq!(q.pin(0, 3, None), Err(Errno::EFAULT));
        assert_eq!((acct.pinned(), a.pinned_pages()), (4, 4));
    }
}
