//! [`ProcessMemory`]: the process's own pages as an iommufd memory source.
//!
//! # Pinning: pages move into a store the library owns
//!
//! Linux's promise for a pinned page is that it stays what the IOAS and
//! accesses see, whatever the process does to its address space later
//! (`munmap`, `MAP_FIXED` over it, `madvise(MADV_DONTNEED)`), while the
//! process and the IOAS share it as long as the process keeps it mapped.
//! User space cannot hold a page of its own anonymous memory like that,
//! so pinning *moves* the page:
//!
//! 1. The library owns one `memfd`, the **store**. A "physical address"
//!    of a pinned page is its offset in the store (plus a base, below).
//! 2. Pinning a page that is not yet in the store copies its contents to
//!    a fresh store page and maps that store page back at the same address
//!    with `mmap(MAP_SHARED | MAP_FIXED)` and the same protection. From
//!    then on the process's loads and stores and the IOAS's accesses
//!    (`pread`/`pwrite` on the store) reach the same page.
//! 3. Pinning a page the process already maps from the store (found in
//!    `/proc/self/maps`: our store's inode, and the offset) takes another
//!    pin on that store page: one page, one physical address, pins
//!    counted per page across every context of the process.
//! 4. When the process unmaps or replaces the range, the store page stays
//!    (it is the store's), so the IOAS keeps seeing the pinned contents.
//!    An unpinned store page is freed (a hole punched) once no mapping of
//!    the process shows it any more; that check runs at the next pin.
//!    Freed offsets are reused by later moves before the store grows.
//!
//! Runs of pages are moved together into consecutive store pages whose
//! offset is congruent to the user address modulo 2 MiB, so a 2 MiB
//! aligned user buffer gets 2 MiB aligned "physical" runs, as transparent
//! huge pages often give on Linux. A `MAP_HUGETLB` range is moved in whole
//! 2 MiB pages (the kernel cannot replace part of a huge page); huge pages
//! of another size are refused by `mmap` and the pin fails with its errno.
//!
//! ## fork
//! A moved page is a shared mapping of the store, which a forked child
//! would share with its parent. The child's `fork` handler restores what
//! Linux gives a child: pages moved from private memory get a private
//! copy (Linux copies pinned anonymous pages at `fork`; the child's
//! stores never reach the parent's pinned page and the parent's never
//! reach the child), pages moved from shared memory stay shared. The
//! child has no pins and a store of its own
//! ([`ProcessMemory::child_after_fork`]). A page moved from a huge page
//! comes back as small pages.
//!
//! ## Other threads' stores during a move
//! A store by another thread between the copy and the `mmap` would land
//! in the old page and be lost. The move is fenced
//! ([`sys::WriteFence`]): the range is write-protected through a
//! `userfaultfd` for the copy and the `mmap`, so such a store waits in
//! the kernel and lands in the store's page once it is mapped. Where no
//! userfaultfd write protection is to be had (a kernel before 5.7, or a
//! sandbox that forbids the call) the move runs unfenced and the window
//! is back; a range within 1 MiB of the moving thread's own stack is
//! never fenced (it would wait for itself).
//!
//! ## What moving changes (stated, because Linux differs)
//! - **Kernel stores during a move**: a system call writing into a range
//!   being moved (a `read` into it by another thread) waits like a CPU
//!   store, or fails with `EFAULT` where the process may handle only its
//!   own user-mode faults (unprivileged, `vm.unprivileged_userfaultfd`
//!   0). Linux's pin has no such window.
//! - **`/proc/self/maps`, `mincore`, `madvise`**: moved pages show as a
//!   shared mapping of `/memfd:portcullis-store`; `MADV_DONTNEED` on them
//!   no longer zeroes them for the process (it does not on Linux either
//!   for shared mappings, but it does for the private original).
//! - The process changing its mappings *while* a pin call runs is not
//!   serialised with it (Linux holds `mmap_lock`).
//!
//! # Files (`IOMMU_IOAS_MAP_FILE`)
//! A descriptor given to `IOMMU_IOAS_MAP_FILE` is held with a private
//! duplicate ([`MemorySource::file_get`]); pages of a memfd (any file
//! `F_GET_SEALS` accepts) are pinned by offset, and their physical address
//! is `file base + offset`, so `IOMMU_IOAS_MAP` of a shared `mmap` of a
//! held memfd pins the very same pages. Accesses go through `pread` and
//! `pwrite` on the held descriptor. Not emulated: a pinned page cut off
//! by `ftruncate` keeps its contents on Linux; here reading or writing it
//! through the IOAS is `EFAULT` (never stale data).
//!
//! `IOMMU_IOAS_MAP` of a shared mapping of a file (guest RAM as QEMU keeps
//! it: an `mmap` of a memfd) pins the file's pages by offset too: the file
//! is held through `/proc/self/map_files` or, without the capability that
//! needs, through an open descriptor of it the process has. A file that is
//! not shmem, or that no descriptor can be had of, is `EOPNOTSUPP`
//! (moving its pages would cut the mapping off from its file).
//!
//! # Physical addresses
//! `(namespace << 40) + offset`: namespace 1 is the store, 2 and up the
//! held files. Namespace 0 is "no pinned page": [`MemorySource::peek_phys`]
//! of an address whose page was never pinned answers an address there,
//! which no mapping can hold (the selftest's `MD_CHECK_MAP` then reports
//! the mismatch, as Linux does for a page that is not the mapped one).
//!
//! # User memory
//! `read_user` and `write_user` use `process_vm_readv`/`process_vm_writev`
//! on the own process: a wild pointer is `EFAULT`, never a crash.
//!
//! # Accounting
//! The pin limit handed to the context is `RLIMIT_MEMLOCK` in pages, or
//! none when the process has `CAP_IPC_LOCK` (Linux does not charge such
//! a process's pins either). Pins are charged per process or per user
//! across contexts, as `IOMMU_OPTION_RLIMIT_MODE` says: see
//! [`crate::charge`].

use crate::sys;
use iommufd::Errno;
use iommufd::memsrc::{FileId, MemorySource, PAGE_SIZE, push_run};
use portcullis_iommu::PhysRun;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

type Result<T> = core::result::Result<T, Errno>;

/// Bits of a physical address that are the offset inside a namespace.
const NS_SHIFT: u32 = 40;
/// Size of one namespace (store or file): 1 TiB.
const NS_SPAN: u64 = 1 << NS_SHIFT;
/// The store's namespace.
const NS_STORE: u64 = 1;
/// The first file namespace.
const NS_FIRST_FILE: u64 = 2;
/// Huge page size assumed for `MAP_HUGETLB` ranges, and the alignment
/// store runs keep with their user addresses.
const HUGE: u64 = 2 << 20;
/// Pages copied at a time when a forked child makes moved pages private.
const COPY_PAGES: u64 = 64;

fn phys(ns: u64, off: u64) -> u64 {
    (ns << NS_SHIFT) + off
}

fn split(phys: u64) -> (u64, u64) {
    (phys >> NS_SHIFT, phys & (NS_SPAN - 1))
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone)]
struct Vma {
    start: u64,
    end: u64,
    read: bool,
    write: bool,
    exec: bool,
    shared: bool,
    offset: u64,
    dev: u64,
    ino: u64,
    path: String,
}

impl Vma {
    fn parse(line: &str) -> Option<Vma> {
        let mut it = line.split_ascii_whitespace();
        let (range, perms, offset, dev, ino) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
        let path = it.collect::<Vec<_>>().join(" ");
        let (s, e) = range.split_once('-')?;
        let (maj, min) = dev.split_once(':')?;
        let p = perms.as_bytes();
        Some(Vma {
            start: u64::from_str_radix(s, 16).ok()?,
            end: u64::from_str_radix(e, 16).ok()?,
            read: *p.first()? == b'r',
            write: *p.get(1)? == b'w',
            exec: *p.get(2)? == b'x',
            shared: *p.get(3)? == b's',
            offset: u64::from_str_radix(offset, 16).ok()?,
            dev: libc::makedev(u32::from_str_radix(maj, 16).ok()?, u32::from_str_radix(min, 16).ok()?),
            ino: ino.parse().ok()?,
            path,
        })
    }

    fn prot(&self) -> i32 {
        (if self.read { libc::PROT_READ } else { 0 })
            | (if self.write { libc::PROT_WRITE } else { 0 })
            | (if self.exec { libc::PROT_EXEC } else { 0 })
    }

    fn is_hugetlb(&self) -> bool {
        self.path.starts_with("/anon_hugepage")
    }

    /// The kernel's special mappings (`[vdso]`, `[vvar]`, `[vsyscall]`):
    /// not pinnable by `get_user_pages` either.
    fn is_special(&self) -> bool {
        self.path.starts_with('[') && self.path != "[heap]" && !self.path.starts_with("[stack")
    }

    /// Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`, System V
    /// shared memory): within the process, moving it changes nothing.
    fn is_shared_anon(&self) -> bool {
        self.path.starts_with("/dev/zero") || self.path.starts_with("/SYSV")
    }
}

/// The mappings of the process, in address order.
fn read_maps() -> Result<Vec<Vma>> {
    let text = std::fs::read_to_string("/proc/self/maps").map_err(|_| Errno::ENOMEM)?;
    Ok(text.lines().filter_map(Vma::parse).collect())
}

fn vma_at(maps: &[Vma], addr: u64) -> Option<&Vma> {
    let i = maps.partition_point(|v| v.end <= addr);
    maps.get(i).filter(|v| v.start <= addr)
}

/// A store page: its pins, and whether the memory it was moved from was
/// a shared mapping (a forked child keeps sharing those; private ones it
/// gets a copy of, see [`ProcessMemory::child_after_fork`]).
#[derive(Debug)]
struct Slot {
    pins: u32,
    shared: bool,
}

/// The store: a memfd and its identity in `/proc/self/maps`.
#[derive(Debug)]
struct Store {
    fd: sys::Fd,
    dev: u64,
    ino: u64,
}

impl Store {
    fn new() -> Result<Self> {
        let fd = sys::memfd_create(c"portcullis-store", true)?;
        let (dev, ino, _, _) = sys::fstat(fd.raw())?;
        Ok(Self { fd, dev, ino })
    }
}

/// A file held for `IOMMU_IOAS_MAP_FILE`.
#[derive(Debug)]
struct HeldFile {
    fd: sys::Fd,
    dev: u64,
    ino: u64,
    memfd: bool,
    writable: bool,
    /// `file_get` holds.
    holds: u32,
    /// Pins per file page (page index), only the pinned ones.
    pins: BTreeMap<u64, u32>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    /// A forked child could not make a store of its own: it must not pin
    /// into its parent's (`ENOMEM`).
    no_store: bool,
    store_size: u64,
    next_off: u64,
    /// Store extents freed (holes punched), start -> length in bytes,
    /// joined with their neighbours: reused before the store grows.
    free: BTreeMap<u64, u64>,
    /// Store page index -> slot, for pages pinned now or moved and maybe
    /// still mapped by the process.
    slots: BTreeMap<u64, Slot>,
    /// Store pages with no pin left (freed once no mapping shows them).
    released: BTreeSet<u64>,
    /// Namespace -> held file.
    files: BTreeMap<u64, HeldFile>,
    next_ns: u64,
}

/// How one piece of a pinned range is found.
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// Already in the store at this offset.
    Store { start: u64, end: u64, off: u64 },
    /// A shared mapping of a held file, at this file offset.
    File { start: u64, end: u64, ns: u64, off: u64 },
    /// To be moved: the user range `[start, end)` is pinned, `[mstart,
    /// mend)` (wider for huge pages) is moved, with protection `prot`.
    Move { start: u64, end: u64, mstart: u64, mend: u64, prot: i32, shared: bool },
}

impl Inner {
    fn is_store(&self, v: &Vma) -> bool {
        v.dev == self.store.dev && v.ino == self.store.ino
    }
}

/// The process's own memory (see the module docs).
#[derive(Debug)]
pub struct ProcessMemory {
    pin_limit_pages: u64,
    inner: Mutex<Inner>,
}

impl ProcessMemory {
    /// A new source with an empty store.
    pub fn new() -> Result<Self> {
        let store = Store::new()?;
        let pin_limit_pages =
            if has_cap_ipc_lock() { u64::MAX } else { sys::memlock_limit().map_or(u64::MAX, |b| b / PAGE_SIZE) };
        Ok(Self {
            pin_limit_pages,
            inner: Mutex::new(Inner {
                store,
                no_store: false,
                store_size: 0,
                next_off: 0,
                free: BTreeMap::new(),
                slots: BTreeMap::new(),
                released: BTreeSet::new(),
                files: BTreeMap::new(),
                next_ns: NS_FIRST_FILE,
            }),
        })
    }

    /// The pin limit a new context gets (see "Accounting").
    pub fn pin_limit_pages(&self) -> u64 {
        self.pin_limit_pages
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // panic = "abort": never poisoned; recover the data if it were.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees released store pages that no mapping shows any more.
    fn sweep(&self, inner: &mut Inner, maps: &[Vma]) {
        if inner.released.is_empty() {
            return;
        }
        let shown: Vec<(u64, u64)> =
            maps.iter().filter(|v| inner.is_store(v)).map(|v| (v.offset, v.offset + (v.end - v.start))).collect();
        let gone: Vec<u64> = inner
            .released
            .iter()
            .copied()
            .filter(|pg| {
                let off = pg * PAGE_SIZE;
                !shown.iter().any(|&(s, e)| s <= off && off < e)
            })
            .collect();
        for pg in gone {
            inner.released.remove(&pg);
            inner.slots.remove(&pg);
            // Failing to free keeps the page's memory allocated, and its
            // offset out of reuse.
            if sys::punch_hole(&inner.store.fd, pg * PAGE_SIZE, PAGE_SIZE).is_ok() {
                free_extent(&mut inner.free, pg * PAGE_SIZE, PAGE_SIZE);
            }
        }
    }

    /// Finds how each piece of `[uptr, end)` is pinned; nothing changes.
    fn plan(&self, inner: &mut Inner, maps: &[Vma], uptr: u64, end: u64, write: bool) -> Result<Vec<Piece>> {
        let r = self.plan_inner(inner, maps, uptr, end, write);
        if r.is_err() {
            prune_files(inner);
        }
        r
    }

    fn plan_inner(&self, inner: &mut Inner, maps: &[Vma], uptr: u64, end: u64, write: bool) -> Result<Vec<Piece>> {
        let mut out = Vec::new();
        let mut a = uptr;
        while a < end {
            let v = vma_at(maps, a).ok_or(Errno::EFAULT)?;
            let pend = v.end.min(end);
            if !v.read || (write && !v.write) || v.is_special() {
                return Err(Errno::EFAULT);
            }
            let off = v.offset.checked_add(a - v.start).ok_or(Errno::EFAULT)?;
            let file = |inner: &Inner| {
                inner.files.iter().find(|(_, f)| v.shared && f.dev == v.dev && f.ino == v.ino).map(|(&ns, _)| ns)
            };
            let piece = if inner.is_store(v) {
                Piece::Store { start: a, end: pend, off }
            } else if let Some(ns) = file(inner) {
                Piece::File { start: a, end: pend, ns, off }
            } else if v.shared && !v.is_shared_anon() && !v.is_hugetlb() {
                // A shared mapping of a file: its pages are the file's.
                let ns = adopt(inner, v).ok_or(Errno::EOPNOTSUPP)?;
                Piece::File { start: a, end: pend, ns, off }
            } else if v.is_hugetlb() {
                let ms = (a / HUGE * HUGE).max(v.start);
                let me = pend.div_ceil(HUGE).saturating_mul(HUGE).min(v.end);
                Piece::Move { start: a, end: pend, mstart: ms, mend: me, prot: v.prot(), shared: v.shared }
            } else {
                Piece::Move { start: a, end: pend, mstart: a, mend: pend, prot: v.prot(), shared: v.shared }
            };
            out.push(piece);
            a = pend;
        }
        Ok(out)
    }

    /// Moves `[start, end)` into fresh store pages; returns their offset.
    fn move_range(inner: &mut Inner, start: u64, end: u64, prot: i32, shared: bool) -> Result<u64> {
        let len = end - start;
        // A range of 2 MiB or more goes where its offset is congruent to
        // its address modulo 2 MiB (aligned runs, as THP gives); smaller
        // ones anywhere. Freed extents first, then fresh store.
        let congruent = if len >= HUGE { Some(start % HUGE) } else { None };
        let base = match take_extent(&mut inner.free, len, congruent) {
            Some(b) => b,
            None => {
                let base = inner.next_off.next_multiple_of(HUGE).checked_add(start % HUGE).ok_or(Errno::ENOMEM)?;
                let top = base.checked_add(len).filter(|&t| t <= NS_SPAN).ok_or(Errno::ENOMEM)?;
                if top > inner.store_size {
                    sys::ftruncate(&inner.store.fd, top)?;
                    inner.store_size = top;
                }
                inner.next_off = top;
                base
            }
        };
        // Other threads' stores wait from here until the store's pages
        // are mapped (none is lost between the copy and the mmap); this
        // thread allocates nothing and writes no memory of the range
        // until the fence is dropped (see `sys::WriteFence`).
        let fence = sys::WriteFence::new(start, len);
        let moved = sys::write_at_from(&inner.store.fd, base, start, len)
            .and_then(|()| sys::map_shared_fixed(start, len, prot, &inner.store.fd, base));
        drop(fence);
        if let Err(e) = moved {
            // The process still has its own pages: the copies go (a
            // failure only keeps their memory allocated).
            if sys::punch_hole(&inner.store.fd, base, len).is_ok() {
                free_extent(&mut inner.free, base, len);
            }
            return Err(e);
        }
        for k in 0..len / PAGE_SIZE {
            // Unpinned until `pin_store` pins it (a huge page's other
            // pages stay unpinned, to be freed once unmapped).
            inner.slots.insert(base / PAGE_SIZE + k, Slot { pins: 0, shared });
            inner.released.insert(base / PAGE_SIZE + k);
        }
        Ok(base)
    }

    fn pin_store(inner: &mut Inner, start: u64, end: u64, off: u64, out: &mut Vec<PhysRun>) {
        for k in 0..(end - start) / PAGE_SIZE {
            let pg = off / PAGE_SIZE + k;
            // A store page without a slot was moved by a process this one
            // was forked from: treat its origin as shared (kept so).
            let slot = inner.slots.entry(pg).or_insert(Slot { pins: 0, shared: true });
            slot.pins += 1;
            inner.released.remove(&pg);
        }
        push_run(out, PhysRun::new(phys(NS_STORE, off), end - start));
    }

    fn pin_file(inner: &mut Inner, ns: u64, off: u64, len: u64, out: &mut Vec<PhysRun>) -> Result<()> {
        let f = inner.files.get_mut(&ns).ok_or(Errno::EINVAL)?;
        for k in 0..len / PAGE_SIZE {
            *f.pins.entry(off / PAGE_SIZE + k).or_insert(0) += 1;
        }
        push_run(out, PhysRun::new(phys(ns, off), len));
        Ok(())
    }

    fn unpin_one(inner: &mut Inner, p: u64) {
        let (ns, off) = split(p);
        let pg = off / PAGE_SIZE;
        if ns == NS_STORE {
            if let Some(s) = inner.slots.get_mut(&pg)
                && s.pins > 0
            {
                s.pins -= 1;
                if s.pins == 0 {
                    inner.released.insert(pg);
                }
            }
        } else if let Some(f) = inner.files.get_mut(&ns)
            && let Some(c) = f.pins.get_mut(&pg)
        {
            *c -= 1;
            if *c == 0 {
                f.pins.remove(&pg);
            }
            if f.pins.is_empty() && f.holds == 0 {
                inner.files.remove(&ns);
            }
        }
    }

    /// The backing descriptor and offset of physical `[p, p + len)`.
    fn backing(inner: &Inner, p: u64, len: usize) -> Result<(&sys::Fd, u64)> {
        let (ns, off) = split(p);
        off.checked_add(len as u64).filter(|&e| e <= NS_SPAN).ok_or(Errno::EFAULT)?;
        if ns == NS_STORE {
            Ok((&inner.store.fd, off))
        } else {
            inner.files.get(&ns).map(|f| (&f.fd, off)).ok_or(Errno::EFAULT)
        }
    }

    /// Pin count and physical address of the page at `uptr`.
    fn inspect(&self, uptr: u64) -> Result<(u32, u64)> {
        let page = uptr / PAGE_SIZE * PAGE_SIZE;
        let maps = read_maps()?;
        let v = vma_at(&maps, page).ok_or(Errno::EFAULT)?;
        let off = v.offset + (page - v.start);
        let inner = self.lock();
        if inner.is_store(v) {
            let pins = inner.slots.get(&(off / PAGE_SIZE)).map_or(0, |s| s.pins);
            return Ok((pins, phys(NS_STORE, off) + uptr % PAGE_SIZE));
        }
        if v.shared
            && let Some((&ns, f)) = inner.files.iter().find(|(_, f)| f.dev == v.dev && f.ino == v.ino)
        {
            let pins = f.pins.get(&(off / PAGE_SIZE)).copied().unwrap_or(0);
            return Ok((pins, phys(ns, off) + uptr % PAGE_SIZE));
        }
        Ok((0, uptr % PAGE_SIZE))
    }
}

/// Lets go of files held by nothing (adopted for a pin that then failed).
fn prune_files(inner: &mut Inner) {
    inner.files.retain(|_, f| f.holds > 0 || !f.pins.is_empty());
}

/// Holds the file behind the shared mapping `v` so its pages can be
/// pinned by offset (`IOMMU_IOAS_MAP` of an `mmap` of a memfd, as QEMU
/// maps guest RAM): opened through `/proc/self/map_files` (needs
/// `CAP_SYS_ADMIN` or `CAP_CHECKPOINT_RESTORE`), else found among the
/// process's open descriptors (a writable one preferred). Only shmem
/// files (those `F_GET_SEALS` accepts: memfds, `/dev/shm`), whose pages
/// Linux pins for the long term; `None` for any other file or when no
/// descriptor of it can be had. Returns its namespace.
fn adopt(inner: &mut Inner, v: &Vma) -> Option<u64> {
    let matches = |fd: &sys::Fd| sys::fstat(fd.raw()).is_ok_and(|(d, i, _, _)| d == v.dev && i == v.ino);
    let writable = |fd: &sys::Fd| {
        sys::fcntl_query(fd.raw(), libc::F_GETFL).is_ok_and(|m| m as i32 & libc::O_ACCMODE != libc::O_RDONLY)
    };
    let path = format!("/proc/self/map_files/{:x}-{:x}", v.start, v.end);
    let opened = [true, false].into_iter().find_map(|w| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(w)
            .open(&path)
            .ok()
            .map(|f| sys::Fd::from(std::os::fd::OwnedFd::from(f)))
    });
    let fd = match opened.filter(|f| matches(f)) {
        Some(f) => f,
        None => {
            let mut best: Option<sys::Fd> = None;
            for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
                let Some(n) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
                let Ok(d) = sys::dup_private(n) else { continue };
                if matches(&d) && best.as_ref().is_none_or(|b| !writable(b) && writable(&d)) {
                    best = Some(d);
                }
            }
            best?
        }
    };
    sys::fcntl_query(fd.raw(), libc::F_GET_SEALS).ok()?;
    let w = writable(&fd);
    let ns = inner.next_ns;
    inner.next_ns += 1;
    inner
        .files
        .insert(ns, HeldFile { fd, dev: v.dev, ino: v.ino, memfd: true, writable: w, holds: 0, pins: BTreeMap::new() });
    Some(ns)
}

/// The source's lock, held by the thread calling `fork` from just before
/// to just after it (`pthread_atfork`), so the child never inherits it
/// taken by a thread that does not exist there.
#[derive(Debug)]
pub struct ForkGuard(MutexGuard<'static, Inner>);

impl ProcessMemory {
    /// Takes the lock for a `fork` (see [`ForkGuard`]).
    pub fn lock_for_fork(&'static self) -> ForkGuard {
        ForkGuard(self.lock())
    }
}

impl ForkGuard {
    /// In the parent after `fork`: nothing changes.
    pub fn parent(self) {}

    /// In the child after `fork`: see [`ProcessMemory::child_after_fork`].
    pub fn child(mut self) {
        ProcessMemory::child_after_fork(&mut self.0);
    }
}

impl ProcessMemory {
    /// A forked child's memory, made as Linux leaves it:
    /// - pages moved from private memory get a private copy in the child
    ///   (Linux copies pinned anonymous pages for the child at `fork`, and
    ///   copies the others on write: either way the child's stores stay
    ///   its own and the parent's do not reach it);
    /// - pages moved from shared memory stay shared with the parent, as
    ///   the original mapping was;
    /// - the child has no pins (pins are the parent's contexts'), and
    ///   gets a store of its own, so its pins never collide with the
    ///   parent's. Files held for the parent's mappings are let go.
    ///
    /// A page that cannot be copied (unreadable by now, or `mmap`
    /// failing) stays shared: there is no one to report to in a child
    /// just forked.
    fn child_after_fork(inner: &mut Inner) {
        if let Ok(maps) = read_maps() {
            for v in maps.iter().filter(|v| inner.is_store(v) && v.read) {
                let private = |x: u64| {
                    let pg = (v.offset + (x - v.start)) / PAGE_SIZE;
                    inner.slots.get(&pg).is_some_and(|s| !s.shared)
                };
                let mut a = v.start;
                while a < v.end {
                    if !private(a) {
                        a += PAGE_SIZE;
                        continue;
                    }
                    let mut e = a + PAGE_SIZE;
                    while e < v.end && private(e) {
                        e += PAGE_SIZE;
                    }
                    privatize(a, e, v.prot());
                    a = e;
                }
            }
        }
        inner.slots.clear();
        inner.released.clear();
        inner.files.clear();
        inner.free.clear();
        inner.store_size = 0;
        inner.next_off = 0;
        match Store::new() {
            Ok(st) => inner.store = st,
            Err(_) => inner.no_store = true,
        }
    }
}

/// Adds the freed store extent `[at, at + len)` to `free`, joined with the
/// extents it touches.
fn free_extent(free: &mut BTreeMap<u64, u64>, mut at: u64, mut len: u64) {
    if let Some((&s, &l)) = free.range(..at).next_back()
        && s + l == at
    {
        free.remove(&s);
        (at, len) = (s, l + len);
    }
    if let Some(l) = free.remove(&(at + len)) {
        len += l;
    }
    free.insert(at, len);
}

/// Takes `len` bytes from the first freed extent that holds them at an
/// offset congruent to `congruent` modulo 2 MiB (any page offset when
/// `None`); returns the offset.
fn take_extent(free: &mut BTreeMap<u64, u64>, len: u64, congruent: Option<u64>) -> Option<u64> {
    let (s, l, at) = free.iter().find_map(|(&s, &l)| {
        let at = match congruent {
            Some(c) => s + (c + HUGE - s % HUGE) % HUGE,
            None => s,
        };
        (at + len <= s + l).then_some((s, l, at))
    })?;
    free.remove(&s);
    if at > s {
        free.insert(s, at - s);
    }
    if at + len < s + l {
        free.insert(at + len, s + l - at - len);
    }
    Some(at)
}

/// Replaces `[start, end)` by private anonymous memory with the same
/// contents and protection `prot`, a chunk at a time (see
/// [`ProcessMemory::child_after_fork`]); a chunk that fails stays as it
/// was.
fn privatize(start: u64, end: u64, prot: i32) {
    let mut buf = vec![0u8; (COPY_PAGES * PAGE_SIZE) as usize];
    let mut a = start;
    while a < end {
        let n = (end - a).min(COPY_PAGES * PAGE_SIZE) as usize;
        if sys::read_mem(a, &mut buf[..n]) == n && sys::map_anon_fixed(a, n as u64).is_ok() {
            // Fresh writable zero pages now: the contents go back, then
            // the protection the mapping had.
            let written = sys::write_mem(a, &buf[..n]);
            debug_assert_eq!(written, n, "fresh anonymous memory is writable");
            if prot != libc::PROT_READ | libc::PROT_WRITE {
                // A failure leaves the chunk writable: more permissive than
                // the original, never a wrong byte.
                let _ = sys::protect(a, n as u64, prot);
            }
        }
        a += n as u64;
    }
}

/// `CAP_IPC_LOCK`'s bit number (`linux/capability.h`).
const CAP_IPC_LOCK: u32 = 14;

fn has_cap_ipc_lock() -> bool {
    has_cap(CAP_IPC_LOCK)
}

/// Whether the process has capability `bit` in `CapEff`.
pub fn has_cap(bit: u32) -> bool {
    status_field("CapEff")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|c| bit < 64 && c & (1 << bit) != 0)
}

/// The value of field `name` in `/proc/self/status`, trimmed.
pub fn status_field(name: &str) -> Option<String> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(|v| v.trim().to_string())
}

impl MemorySource for ProcessMemory {
    fn pin(&self, uptr: u64, out: &mut [u64], write: bool) -> Result<()> {
        let mut runs = Vec::new();
        self.pin_runs(uptr, out.len() as u64, write, &mut runs)?;
        let mut i = 0;
        for r in &runs {
            for k in 0..r.len / PAGE_SIZE {
                out[i] = r.phys + k * PAGE_SIZE;
                i += 1;
            }
        }
        Ok(())
    }

    fn pin_runs(&self, uptr: u64, npages: u64, write: bool, out: &mut Vec<PhysRun>) -> Result<()> {
        if !uptr.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let end = npages.checked_mul(PAGE_SIZE).and_then(|l| uptr.checked_add(l)).ok_or(Errno::EFAULT)?;
        if npages == 0 {
            return Ok(());
        }
        let mut inner = self.lock();
        if inner.no_store {
            return Err(Errno::ENOMEM);
        }
        let maps = read_maps()?;
        self.sweep(&mut inner, &maps);
        let plan = self.plan(&mut inner, &maps, uptr, end, write)?;
        // Move what is not in the store yet; a failure leaves pages moved
        // so far moved (same contents) and nothing pinned.
        let mut pieces = Vec::with_capacity(plan.len());
        for p in plan {
            pieces.push(match p {
                Piece::Move { start, end, mstart, mend, prot, shared } => {
                    let base = Self::move_range(&mut inner, mstart, mend, prot, shared)?;
                    Piece::Store { start, end, off: base + (start - mstart) }
                }
                other => other,
            });
        }
        let mut mine = Vec::new();
        for p in pieces {
            match p {
                Piece::Store { start, end, off } => Self::pin_store(&mut inner, start, end, off, &mut mine),
                Piece::File { start, end, ns, off } => Self::pin_file(&mut inner, ns, off, end - start, &mut mine)?,
                Piece::Move { .. } => unreachable!("moved above"),
            }
        }
        for r in mine {
            push_run(out, r);
        }
        Ok(())
    }

    fn unpin(&self, phys: &[u64], _dirty: bool) {
        let mut inner = self.lock();
        for &p in phys {
            Self::unpin_one(&mut inner, p);
        }
    }

    fn unpin_runs(&self, runs: &[PhysRun], _dirty: bool) {
        let mut inner = self.lock();
        for r in runs {
            for k in 0..r.len / PAGE_SIZE {
                Self::unpin_one(&mut inner, r.phys + k * PAGE_SIZE);
            }
        }
    }

    fn read_user(&self, uptr: u64, buf: &mut [u8]) -> Result<()> {
        uptr.checked_add(buf.len() as u64).ok_or(Errno::EFAULT)?;
        if sys::read_mem(uptr, buf) == buf.len() { Ok(()) } else { Err(Errno::EFAULT) }
    }

    fn write_user(&self, uptr: u64, buf: &[u8]) -> Result<()> {
        uptr.checked_add(buf.len() as u64).ok_or(Errno::EFAULT)?;
        if sys::write_mem(uptr, buf) == buf.len() { Ok(()) } else { Err(Errno::EFAULT) }
    }

    fn read_phys(&self, phys: u64, buf: &mut [u8]) -> Result<()> {
        let inner = self.lock();
        let (fd, off) = Self::backing(&inner, phys, buf.len())?;
        // Short: the file was truncated under the pin (see module docs).
        if sys::read_at(fd, off, buf)? == buf.len() { Ok(()) } else { Err(Errno::EFAULT) }
    }

    fn write_phys(&self, phys: u64, buf: &[u8]) -> Result<()> {
        let inner = self.lock();
        let (fd, off) = Self::backing(&inner, phys, buf.len())?;
        let size = sys::fstat(fd.raw())?.2;
        if off.checked_add(buf.len() as u64).is_none_or(|e| e > size) {
            return Err(Errno::EFAULT);
        }
        sys::write_at(fd, off, buf)
    }

    fn pin_count(&self, uptr: u64) -> Result<Option<u32>> {
        self.inspect(uptr).map(|(pins, _)| Some(pins))
    }

    fn peek_phys(&self, uptr: u64) -> Result<Option<u64>> {
        self.inspect(uptr).map(|(_, p)| Some(p))
    }

    fn file_get(&self, fd: i32, write: bool) -> Result<FileId> {
        let (dev, ino, _, _) = sys::fstat(fd).map_err(|_| Errno::EBADF)?;
        let mode = sys::fcntl_query(fd, libc::F_GETFL).map_err(|_| Errno::EBADF)? as i32 & libc::O_ACCMODE;
        let writable = mode != libc::O_RDONLY;
        if write && !writable {
            return Err(Errno::EPERM);
        }
        let memfd = sys::fcntl_query(fd, libc::F_GET_SEALS).is_ok();
        let mut inner = self.lock();
        if let Some((&ns, f)) = inner.files.iter_mut().find(|(_, f)| f.dev == dev && f.ino == ino) {
            if writable && !f.writable {
                f.fd = sys::dup_private(fd)?;
                f.writable = true;
            }
            f.holds += 1;
            return Ok(FileId(ns));
        }
        let ns = inner.next_ns;
        let held = sys::dup_private(fd)?;
        inner.next_ns += 1;
        inner.files.insert(ns, HeldFile { fd: held, dev, ino, memfd, writable, holds: 1, pins: BTreeMap::new() });
        Ok(FileId(ns))
    }

    fn file_put(&self, file: FileId) {
        let mut inner = self.lock();
        if let Some(f) = inner.files.get_mut(&file.0) {
            f.holds = f.holds.saturating_sub(1);
            if f.holds == 0 && f.pins.is_empty() {
                inner.files.remove(&file.0);
            }
        }
    }

    fn pin_file_runs(
        &self,
        file: FileId,
        offset: u64,
        npages: u64,
        _write: bool,
        out: &mut Vec<PhysRun>,
    ) -> Result<()> {
        let mut inner = self.lock();
        let f = inner.files.get(&file.0).ok_or(Errno::EINVAL)?;
        if !f.memfd || !offset.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let size = sys::fstat(f.fd.raw())?.2;
        let len = npages.checked_mul(PAGE_SIZE).ok_or(Errno::EINVAL)?;
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > size || end > NS_SPAN {
            return Err(Errno::EINVAL);
        }
        if npages == 0 {
            return Ok(());
        }
        Self::pin_file(&mut inner, file.0, offset, len, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_extents_join_and_are_taken_at_the_right_congruence() {
        let mut free = BTreeMap::new();
        free_extent(&mut free, 3 * PAGE_SIZE, PAGE_SIZE);
        free_extent(&mut free, 5 * PAGE_SIZE, PAGE_SIZE);
        free_extent(&mut free, 4 * PAGE_SIZE, PAGE_SIZE);
        assert_eq!(free.iter().map(|(&s, &l)| (s, l)).collect::<Vec<_>>(), [(3 * PAGE_SIZE, 3 * PAGE_SIZE)]);
        // Small ranges anywhere, from the front.
        assert_eq!(take_extent(&mut free, PAGE_SIZE, None), Some(3 * PAGE_SIZE));
        assert_eq!(take_extent(&mut free, 3 * PAGE_SIZE, None), None, "only 2 pages left");
        assert_eq!(take_extent(&mut free, 2 * PAGE_SIZE, None), Some(4 * PAGE_SIZE));
        assert!(free.is_empty());
        // A 2 MiB range at offset 0x1000 modulo 2 MiB, from a 6 MiB extent.
        free_extent(&mut free, HUGE, 3 * HUGE);
        assert_eq!(take_extent(&mut free, HUGE, Some(PAGE_SIZE)), Some(HUGE + PAGE_SIZE));
        assert_eq!(
            free.iter().map(|(&s, &l)| (s, l)).collect::<Vec<_>>(),
            [(HUGE, PAGE_SIZE), (2 * HUGE + PAGE_SIZE, 2 * HUGE - PAGE_SIZE)]
        );
        assert_eq!(take_extent(&mut free, 2 * HUGE, Some(0)), None, "no aligned 4 MiB left");
        free_extent(&mut free, HUGE + PAGE_SIZE, HUGE);
        assert_eq!(free.iter().map(|(&s, &l)| (s, l)).collect::<Vec<_>>(), [(HUGE, 3 * HUGE)], "joined again");
    }
}
