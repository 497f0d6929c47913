//! Where pinned pages come from.
//!
//! iommufd maps *user* memory: a range of the calling context's address
//! space (a guest's memory in a hypervisor, a process's in the host
//! interposer). A [`MemorySource`] turns such a range into physical pages,
//! keeps them from moving while pinned, and gives byte access to both user
//! addresses (for uAPI arrays and `access_rw` buffers) and physical pages
//! (for accesses that read or write through pinned pages).
//!
//! [`FakeAddressSpace`] is the host-test source: it counts pins per page so
//! tests can check "each page is pinned once" exactly, holds page contents
//! so reads and writes through mappings can be checked, and can fail the
//! Nth pin for fault-injection sweeps.

use crate::errno::{Errno, Result};
use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use portcullis_iommu::PhysRun;
use spin::Mutex;

/// CPU page size of every memory source in Portcullis.
pub const PAGE_SIZE: u64 = 4096;

/// A context's memory, as iommufd needs it.
///
/// Implementations must be internally synchronised: iommufd calls them
/// without holding its own locks where it can.
pub trait MemorySource: Send + Sync {
    /// Pins the `out.len()` pages starting at page-aligned user address
    /// `uptr` and writes their physical addresses into `out`. All or
    /// nothing: on error no page stays pinned. `write` asks for pages the
    /// device may write. Unmapped addresses give `EFAULT`.
    fn pin(&self, uptr: u64, out: &mut [u64], write: bool) -> Result<()>;
    /// Drops one pin on each page (physical addresses from [`Self::pin`]).
    /// `dirty` marks them written.
    fn unpin(&self, phys: &[u64], dirty: bool);
    /// Pins the `npages` pages starting at page-aligned `uptr`, like
    /// [`Self::pin`], and appends their physical addresses to `out` as
    /// runs of physically contiguous pages (lengths multiples of
    /// [`PAGE_SIZE`]), in order.
    /// All or nothing (on error `out` is as it was and nothing is pinned).
    ///
    /// The default goes through [`Self::pin`] and coalesces; sources that
    /// know their physical layout answer a run at a time.
    fn pin_runs(&self, uptr: u64, npages: u64, write: bool, out: &mut Vec<PhysRun>) -> Result<()> {
        let mut phys = vec![0u64; usize::try_from(npages).map_err(|_| Errno::ENOMEM)?];
        self.pin(uptr, &mut phys, write)?;
        for p in phys {
            push_run(out, PhysRun::new(p, PAGE_SIZE));
        }
        Ok(())
    }
    /// Drops one pin on each page of each run (as [`Self::unpin`]). The
    /// default expands the runs into pages.
    fn unpin_runs(&self, runs: &[PhysRun], dirty: bool) {
        let mut buf: Vec<u64> = Vec::new();
        for &PhysRun { phys, len } in runs {
            for k in 0..len / PAGE_SIZE {
                buf.push(phys + k * PAGE_SIZE);
                if buf.len() == 512 {
                    self.unpin(&buf, dirty);
                    buf.clear();
                }
            }
        }
        if !buf.is_empty() {
            self.unpin(&buf, dirty);
        }
    }
    /// Copies from user memory at `uptr`.
    fn read_user(&self, uptr: u64, buf: &mut [u8]) -> Result<()>;
    /// Copies to user memory at `uptr`.
    fn write_user(&self, uptr: u64, buf: &[u8]) -> Result<()>;
    /// Copies from a pinned physical page range.
    fn read_phys(&self, phys: u64, buf: &mut [u8]) -> Result<()>;
    /// Copies to a pinned physical page range.
    fn write_phys(&self, phys: u64, buf: &[u8]) -> Result<()>;
    /// Pins held on the page containing `uptr`, if the source can tell
    /// (the selftest's `check_refs`); `EFAULT` if unmapped.
    fn pin_count(&self, uptr: u64) -> Result<Option<u32>> {
        let _ = uptr;
        Ok(None)
    }
    /// Physical address of the page containing `uptr` without pinning it
    /// (the selftest's `check_map`), if the source can tell.
    fn peek_phys(&self, uptr: u64) -> Result<Option<u64>> {
        let _ = uptr;
        Ok(None)
    }

    // Files (`IOMMU_IOAS_MAP_FILE`, Linux 6.13+).

    /// Takes a hold on the file descriptor `fd` names (Linux's `fget`),
    /// for a mapping of it: the file stays alive, and its pages pinnable
    /// through the returned [`FileId`], until [`Self::file_put`], whatever
    /// happens to the descriptor. `write` asks for a mapping the device
    /// may write: a descriptor not opened for writing is `EPERM`.
    ///
    /// The default has no descriptors: every `fd` is `EBADF`, Linux's
    /// answer for a number that names no open file.
    fn file_get(&self, fd: i32, write: bool) -> Result<FileId> {
        let _ = (fd, write);
        Err(Errno::EBADF)
    }
    /// Drops a hold from [`Self::file_get`].
    fn file_put(&self, file: FileId) {
        let _ = file;
    }
    /// Pins the `npages` pages of `file` from page-aligned byte `offset`
    /// and appends their physical addresses as runs, like
    /// [`Self::pin_runs`]. All or nothing. A file whose pages cannot be
    /// pinned this way (not memfd-like), or a range that does not lie
    /// inside the file, is `EINVAL` (Linux's `memfd_pin_folios`).
    ///
    /// The default knows no pinnable file: `EINVAL`.
    fn pin_file_runs(&self, file: FileId, offset: u64, npages: u64, write: bool, out: &mut Vec<PhysRun>) -> Result<()> {
        let _ = (file, offset, npages, write, out);
        Err(Errno::EINVAL)
    }

    // Sources whose pages cannot move.

    /// Whether a page pinned at a user address stays the page at that
    /// address until its last pin goes: guest RAM a hypervisor owns (its
    /// regions cannot be removed or remapped while pinned), unlike a
    /// process's memory, where a munmap and mmap put other memory under
    /// the address while the old page stays pinned. When true, iommufd
    /// drops a domain's pins with [`Self::unpin_user`] and its unmap reads
    /// no physical addresses back from the page table. The default: false.
    fn pins_stay_at_user(&self) -> bool {
        false
    }
    /// Drops one pin on each of the `npages` pages at page-aligned user
    /// address `uptr`, each pinned there before (as [`Self::unpin`]);
    /// called only when [`Self::pins_stay_at_user`] is true. The default
    /// learns the pages' addresses by pinning them once more, then drops
    /// both pins; sources answer by address directly.
    fn unpin_user(&self, uptr: u64, npages: u64, dirty: bool) {
        let mut runs = Vec::new();
        self.pin_runs(uptr, npages, false, &mut runs)
            .unwrap_or_else(|e| panic!("pinned pages at {uptr:#x} cannot be pinned again: {e:?}"));
        self.unpin_runs(&runs, false);
        self.unpin_runs(&runs, dirty);
    }
}

/// A file held by a memory source for a file mapping (see
/// [`MemorySource::file_get`]): the source's own name for the file, not
/// a descriptor number (descriptors can be closed and their numbers
/// reused while the mapping lives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileId(pub u64);

/// Appends `run` to a run list, extending the last run when it ends
/// where `run` starts (an empty run changes nothing).
#[inline]
pub fn push_run(runs: &mut Vec<PhysRun>, run: PhysRun) {
    if run.len == 0 {
        return;
    }
    if let Some(last) = runs.last_mut()
        && last.phys + last.len == run.phys
    {
        last.len += run.len;
        return;
    }
    runs.push(run);
}

/// One physical page of a [`FakeAddressSpace`]: its pins and contents.
/// Pages are never freed (a page that was unmapped or cut off a file
/// while pinned stays valid for the pins), so every address a pin
/// returned can be unpinned.
struct Frame {
    pins: u32,
    data: Option<Vec<u8>>,
}

/// A user page: which physical page backs it.
#[derive(Clone, Copy)]
struct UserPage {
    phys_page: u64,
    writable: bool,
}

/// What kind of file a descriptor of a [`FakeAddressSpace`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeFileKind {
    /// A memfd (shmem): its pages can be pinned by `IOMMU_IOAS_MAP_FILE`.
    Memfd,
    /// Any other file (a regular file on disk, a pipe): it can be opened
    /// and mapped, but its pages cannot be pinned (`EINVAL`, as Linux's
    /// `memfd_pin_folios` answers).
    Other,
}

struct FakeFile {
    kind: FakeFileKind,
    /// Physical page of each page of the file, in file order; the file's
    /// size is `pages.len()` pages.
    pages: Vec<u64>,
    /// Descriptors naming it plus holds from `file_get`; the file goes
    /// when this reaches 0.
    refs: u32,
}

struct FakeInner {
    /// Physical page number -> page.
    frames: BTreeMap<u64, Frame>,
    /// User page number -> its physical page.
    pages: BTreeMap<u64, UserPage>,
    /// Open descriptors: number -> (file id, opened for writing).
    fds: BTreeMap<i32, (u64, bool)>,
    /// Files by id (ids are never reused, unlike descriptor numbers).
    files: BTreeMap<u64, FakeFile>,
    next_fd: i32,
    next_file: u64,
    next_phys_page: u64,
    pin_calls: u64,
    fail_pin_at: Option<u64>,
    pinned_pages: u64,
}

impl FakeInner {
    /// `n` fresh physical pages, the first aligned like `hint` modulo
    /// 1 GiB (so 2 MiB-aligned ranges get 2 MiB-aligned physical runs).
    fn alloc_frames(&mut self, hint: u64, n: u64) -> u64 {
        let want = (hint / PAGE_SIZE) % (1 << 18);
        let base = self.next_phys_page.next_multiple_of(1 << 18) + want;
        self.next_phys_page = base + n;
        for k in 0..n {
            self.frames.insert(base + k, Frame { pins: 0, data: None });
        }
        base
    }

    /// Checks that `fail_pin_at` does not fail this pin call.
    fn pin_call(&mut self) -> Result<()> {
        self.pin_calls += 1;
        if self.fail_pin_at == Some(self.pin_calls) { Err(Errno::ENOMEM) } else { Ok(()) }
    }

    /// Takes one pin on each physical page of `phys_pages` (which exist).
    fn pin_frames(&mut self, phys_pages: impl Iterator<Item = u64>, out: &mut Vec<PhysRun>) {
        for pp in phys_pages {
            let f = self.frames.get_mut(&pp).expect("pages and files name existing frames");
            f.pins += 1;
            if f.pins == 1 {
                self.pinned_pages += 1;
            }
            push_run(out, PhysRun::new(pp * PAGE_SIZE, PAGE_SIZE));
        }
    }

    fn file_of_fd(&self, fd: i32) -> Result<&FakeFile> {
        let (id, _) = self.fds.get(&fd).ok_or(Errno::EBADF)?;
        Ok(self.files.get(id).expect("an open descriptor names a live file"))
    }

    fn drop_file_ref(&mut self, id: u64) {
        let f = self.files.get_mut(&id).expect("a held file is live");
        f.refs -= 1;
        if f.refs == 0 {
            self.files.remove(&id);
        }
    }
}

/// A fake user address space for host tests: map ranges, pin pages,
/// count pins, read and write contents.
///
/// It also has a descriptor table of memfd-like files
/// ([`Self::create_memfd`]) for `IOMMU_IOAS_MAP_FILE`. A file's pages can
/// be mapped at user addresses too ([`Self::map_file`], a shared `mmap`
/// of the memfd): pinning the user address and pinning the file offset
/// then pin the same physical page, counted once per pin either way.
pub struct FakeAddressSpace {
    inner: Mutex<FakeInner>,
}

impl core::fmt::Debug for FakeAddressSpace {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let i = self.inner.lock();
        write!(f, "FakeAddressSpace({} pages, {} files, {} pinned)", i.pages.len(), i.files.len(), i.pinned_pages)
    }
}

impl Default for FakeAddressSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeAddressSpace {
    /// An empty address space. Physical addresses of its pages start at
    /// 4 GiB so they are easy to tell from IOVAs in test output.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(FakeInner {
                frames: BTreeMap::new(),
                pages: BTreeMap::new(),
                fds: BTreeMap::new(),
                files: BTreeMap::new(),
                next_fd: 3,
                next_file: 1,
                next_phys_page: 0x10_0000,
                pin_calls: 0,
                fail_pin_at: None,
                pinned_pages: 0,
            }),
        }
    }

    /// Maps `length` bytes at page-aligned `uptr` (fresh zero pages).
    /// Physically contiguous in 2 MiB-aligned runs where the user range is
    /// 2 MiB aligned, so huge-page paths get exercised.
    pub fn map(&self, uptr: u64, length: u64, writable: bool) {
        assert!(uptr.is_multiple_of(PAGE_SIZE) && length.is_multiple_of(PAGE_SIZE), "fake mappings are page aligned");
        let mut i = self.inner.lock();
        let base = i.alloc_frames(uptr, length / PAGE_SIZE);
        for k in 0..length / PAGE_SIZE {
            i.pages.insert(uptr / PAGE_SIZE + k, UserPage { phys_page: base + k, writable });
        }
    }

    /// Removes the user pages of `[uptr, uptr + length)` (`munmap`); pins
    /// on them stay with their physical pages.
    pub fn unmap(&self, uptr: u64, length: u64) {
        let mut i = self.inner.lock();
        for k in 0..length / PAGE_SIZE {
            i.pages.remove(&(uptr / PAGE_SIZE + k));
        }
    }

    /// `memfd_create` + `ftruncate(length)`: a new memfd of `length`
    /// bytes (whole pages) of fresh zero pages, physically contiguous in
    /// 2 MiB runs from offset 0. Returns its descriptor, opened for
    /// reading and writing.
    pub fn create_memfd(&self, length: u64) -> i32 {
        self.create_file(length, FakeFileKind::Memfd)
    }

    /// A new file of `kind` and `length` bytes (whole pages); returns its
    /// descriptor, opened for reading and writing.
    pub fn create_file(&self, length: u64, kind: FakeFileKind) -> i32 {
        assert!(length.is_multiple_of(PAGE_SIZE), "fake files are whole pages");
        let mut i = self.inner.lock();
        let n = length / PAGE_SIZE;
        let base = i.alloc_frames(0, n);
        let id = i.next_file;
        i.next_file += 1;
        i.files.insert(id, FakeFile { kind, pages: (base..base + n).collect(), refs: 1 });
        let fd = i.next_fd;
        i.next_fd += 1;
        i.fds.insert(fd, (id, true));
        fd
    }

    /// `dup` of `fd` (or opening the same file again), for writing or
    /// read-only. Panics if `fd` is not open.
    pub fn dup_fd(&self, fd: i32, writable: bool) -> i32 {
        let mut i = self.inner.lock();
        let (id, _) = *i.fds.get(&fd).expect("dup of an open descriptor");
        i.files.get_mut(&id).expect("live").refs += 1;
        let new = i.next_fd;
        i.next_fd += 1;
        i.fds.insert(new, (id, writable));
        new
    }

    /// `close(fd)`: the file stays while something holds it (a mapping
    /// made with `IOMMU_IOAS_MAP_FILE` does). `EBADF` if not open.
    pub fn close_fd(&self, fd: i32) -> Result<()> {
        let mut i = self.inner.lock();
        let (id, _) = i.fds.remove(&fd).ok_or(Errno::EBADF)?;
        i.drop_file_ref(id);
        Ok(())
    }

    /// `ftruncate(fd, length)`: shrinking cuts pages off the end (pins on
    /// them stay with their physical pages, user mappings of them stay),
    /// growing adds fresh zero pages.
    pub fn truncate(&self, fd: i32, length: u64) -> Result<()> {
        if !length.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let mut i = self.inner.lock();
        let (id, _) = *i.fds.get(&fd).ok_or(Errno::EBADF)?;
        let want = length / PAGE_SIZE;
        let have = i.files[&id].pages.len() as u64;
        if want <= have {
            i.files.get_mut(&id).expect("live").pages.truncate(want as usize);
        } else {
            let base = i.alloc_frames(have * PAGE_SIZE, want - have);
            i.files.get_mut(&id).expect("live").pages.extend(base..base + (want - have));
        }
        Ok(())
    }

    /// `mmap(uptr, length, MAP_SHARED, fd, offset)`: the user pages of
    /// `[uptr, uptr + length)` become the file's pages from `offset`.
    /// Panics if the range is not page aligned or runs past the file.
    pub fn map_file(&self, uptr: u64, fd: i32, offset: u64, length: u64) {
        assert!((uptr | offset | length).is_multiple_of(PAGE_SIZE), "fake mappings are page aligned");
        let mut i = self.inner.lock();
        let (id, writable) = *i.fds.get(&fd).expect("mmap of an open descriptor");
        let first = (offset / PAGE_SIZE) as usize;
        let phys: Vec<u64> = i.files[&id].pages[first..first + (length / PAGE_SIZE) as usize].to_vec();
        for (k, phys_page) in phys.into_iter().enumerate() {
            i.pages.insert(uptr / PAGE_SIZE + k as u64, UserPage { phys_page, writable });
        }
    }

    /// Pins held on the page at byte `offset` of the file `fd` has open
    /// (0 past its end or for a closed descriptor).
    pub fn file_pins(&self, fd: i32, offset: u64) -> u32 {
        let i = self.inner.lock();
        let Ok(f) = i.file_of_fd(fd) else { return 0 };
        let Some(&pp) = f.pages.get((offset / PAGE_SIZE) as usize) else { return 0 };
        i.frames[&pp].pins
    }

    /// Physical address of byte `offset` of the file `fd` has open.
    pub fn file_phys(&self, fd: i32, offset: u64) -> Option<u64> {
        let i = self.inner.lock();
        let f = i.file_of_fd(fd).ok()?;
        f.pages.get((offset / PAGE_SIZE) as usize).map(|pp| pp * PAGE_SIZE + offset % PAGE_SIZE)
    }

    /// Files alive (open, or held by a mapping).
    pub fn live_files(&self) -> usize {
        self.inner.lock().files.len()
    }

    /// Pins currently held on the page containing `uptr` (0 if unmapped).
    pub fn pins(&self, uptr: u64) -> u32 {
        let i = self.inner.lock();
        i.pages.get(&(uptr / PAGE_SIZE)).map_or(0, |p| i.frames[&p.phys_page].pins)
    }

    /// Pages with at least one pin.
    pub fn pinned_pages(&self) -> u64 {
        self.inner.lock().pinned_pages
    }

    /// Physical address backing `uptr`, if mapped.
    pub fn phys_of(&self, uptr: u64) -> Option<u64> {
        self.inner.lock().pages.get(&(uptr / PAGE_SIZE)).map(|p| p.phys_page * PAGE_SIZE + uptr % PAGE_SIZE)
    }

    /// Makes the `n`th call to `pin` from now (1-based) fail with ENOMEM;
    /// `None` turns injection off. File pins count as pin calls.
    pub fn fail_pin_at(&self, n: Option<u64>) {
        let mut i = self.inner.lock();
        i.fail_pin_at = n.map(|n| i.pin_calls + n);
    }

    fn with_bytes(
        &self,
        frame_of: impl Fn(&FakeInner, u64) -> Option<u64>,
        addr: u64,
        len: usize,
        mut f: impl FnMut(&mut Vec<u8>, usize, usize, usize),
    ) -> Result<()> {
        let mut i = self.inner.lock();
        // Check first so a fault changes nothing.
        // The range must not wrap (its last byte at most u64::MAX: the
        // last page of the address space is reachable).
        if len > 0 && addr.checked_add(len as u64 - 1).is_none() {
            return Err(Errno::EFAULT);
        }
        let (mut done, mut a) = (0usize, addr);
        while done < len {
            let off = (a % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(len - done);
            frame_of(&i, a).ok_or(Errno::EFAULT)?;
            done += n;
            a = a.wrapping_add(n as u64);
        }
        let (mut done, mut a) = (0usize, addr);
        while done < len {
            let off = (a % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(len - done);
            let pp = frame_of(&i, a).ok_or(Errno::EFAULT)?;
            let frame = i.frames.get_mut(&pp).ok_or(Errno::EFAULT)?;
            let data = frame.data.get_or_insert_with(|| vec![0; PAGE_SIZE as usize]);
            f(data, off, done, n);
            done += n;
            // Checked above: no overflow while bytes remain.
            a = a.wrapping_add(n as u64);
        }
        Ok(())
    }

    fn user_frame(i: &FakeInner, uptr: u64) -> Option<u64> {
        i.pages.get(&(uptr / PAGE_SIZE)).map(|p| p.phys_page)
    }

    fn phys_frame(i: &FakeInner, phys: u64) -> Option<u64> {
        let pp = phys / PAGE_SIZE;
        i.frames.contains_key(&pp).then_some(pp)
    }
}

impl MemorySource for FakeAddressSpace {
    fn pin(&self, uptr: u64, out: &mut [u64], write: bool) -> Result<()> {
        let mut runs = Vec::new();
        self.pin_runs(uptr, out.len() as u64, write, &mut runs)?;
        let mut k = 0;
        for PhysRun { phys, len } in runs {
            for j in 0..len / PAGE_SIZE {
                out[k] = phys + j * PAGE_SIZE;
                k += 1;
            }
        }
        Ok(())
    }

    fn pin_runs(&self, uptr: u64, npages: u64, write: bool, out: &mut Vec<PhysRun>) -> Result<()> {
        let mut i = self.inner.lock();
        i.pin_call()?;
        if !uptr.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let first = uptr / PAGE_SIZE;
        let end = first.checked_add(npages).ok_or(Errno::EFAULT)?;
        // All or nothing: every page mapped (and writable if asked)
        // before any pin is taken.
        let mut expect = first;
        for (&u, p) in i.pages.range(first..end) {
            if u != expect || (write && !p.writable) {
                return Err(Errno::EFAULT);
            }
            expect += 1;
        }
        if expect != end {
            return Err(Errno::EFAULT);
        }
        let frames: Vec<u64> = i.pages.range(first..end).map(|(_, p)| p.phys_page).collect();
        i.pin_frames(frames.into_iter(), out);
        Ok(())
    }

    fn unpin(&self, phys: &[u64], _dirty: bool) {
        let mut i = self.inner.lock();
        for &p in phys {
            let Some(frame) = i.frames.get_mut(&(p / PAGE_SIZE)) else {
                panic!("unpin of a page this address space never pinned: {p:#x}");
            };
            assert!(frame.pins > 0, "unpin of an unpinned page {p:#x}");
            frame.pins -= 1;
            if frame.pins == 0 {
                i.pinned_pages -= 1;
            }
        }
    }

    fn read_user(&self, uptr: u64, buf: &mut [u8]) -> Result<()> {
        self.with_bytes(Self::user_frame, uptr, buf.len(), |d, off, done, n| {
            buf[done..done + n].copy_from_slice(&d[off..off + n])
        })
    }

    fn write_user(&self, uptr: u64, buf: &[u8]) -> Result<()> {
        self.with_bytes(Self::user_frame, uptr, buf.len(), |d, off, done, n| {
            d[off..off + n].copy_from_slice(&buf[done..done + n])
        })
    }

    fn read_phys(&self, phys: u64, buf: &mut [u8]) -> Result<()> {
        self.with_bytes(Self::phys_frame, phys, buf.len(), |d, off, done, n| {
            buf[done..done + n].copy_from_slice(&d[off..off + n])
        })
    }

    fn write_phys(&self, phys: u64, buf: &[u8]) -> Result<()> {
        self.with_bytes(Self::phys_frame, phys, buf.len(), |d, off, done, n| {
            d[off..off + n].copy_from_slice(&buf[done..done + n])
        })
    }

    fn pin_count(&self, uptr: u64) -> Result<Option<u32>> {
        let i = self.inner.lock();
        let p = i.pages.get(&(uptr / PAGE_SIZE)).ok_or(Errno::EFAULT)?;
        Ok(Some(i.frames[&p.phys_page].pins))
    }

    fn peek_phys(&self, uptr: u64) -> Result<Option<u64>> {
        self.phys_of(uptr).map(Some).ok_or(Errno::EFAULT)
    }

    fn file_get(&self, fd: i32, write: bool) -> Result<FileId> {
        let mut i = self.inner.lock();
        let &(id, fd_writable) = i.fds.get(&fd).ok_or(Errno::EBADF)?;
        if write && !fd_writable {
            return Err(Errno::EPERM);
        }
        i.files.get_mut(&id).expect("an open descriptor names a live file").refs += 1;
        Ok(FileId(id))
    }

    fn file_put(&self, file: FileId) {
        self.inner.lock().drop_file_ref(file.0);
    }

    fn pin_file_runs(
        &self,
        file: FileId,
        offset: u64,
        npages: u64,
        _write: bool,
        out: &mut Vec<PhysRun>,
    ) -> Result<()> {
        let mut i = self.inner.lock();
        i.pin_call()?;
        let f = i.files.get(&file.0).expect("pins only of files held with file_get");
        if f.kind != FakeFileKind::Memfd || !offset.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        // The range must lie inside the file (a range past its end, or
        // one whose end does not even fit in 64 bits, is EINVAL).
        let first = offset / PAGE_SIZE;
        let end = first.checked_add(npages).ok_or(Errno::EINVAL)?;
        if end > f.pages.len() as u64 {
            return Err(Errno::EINVAL);
        }
        let frames: Vec<u64> = f.pages[first as usize..end as usize].to_vec();
        i.pin_frames(frames.into_iter(), out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_counted_and_all_or_nothing() {
        let a = FakeAddressSpace::new();
        a.map(0x10_0000, 0x4000, true);
        let mut out = [0u64; 4];
        a.pin(0x10_0000, &mut out, true).unwrap();
        assert_eq!(a.pins(0x10_3000), 1);
        assert_eq!(a.pinned_pages(), 4);
        // One page past the end is unmapped: nothing more gets pinned.
        let mut five = [0u64; 5];
        assert_eq!(a.pin(0x10_0000, &mut five, false), Err(Errno::EFAULT));
        assert_eq!(a.pins(0x10_0000), 1);
        a.unpin(&out, false);
        assert_eq!(a.pinned_pages(), 0);
        assert_eq!(out[1], out[0] + PAGE_SIZE);
    }

    #[test]
    fn bytes_through_user_and_physical_addresses() {
        let a = FakeAddressSpace::new();
        a.map(0x20_0000, 0x2000, true);
        a.write_user(0x20_0ffe, &[1, 2, 3, 4]).unwrap();
        let phys = a.phys_of(0x20_0ffe).unwrap();
        let mut b = [0u8; 4];
        a.read_phys(phys, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(a.read_user(0x20_1ffe, &mut b), Err(Errno::EFAULT));
    }

    #[test]
    fn a_memfd_mapped_at_a_user_address_pins_the_same_pages() {
        let a = FakeAddressSpace::new();
        let fd = a.create_memfd(4 * PAGE_SIZE);
        a.map_file(0x40_0000, fd, PAGE_SIZE, 2 * PAGE_SIZE);
        let f = a.file_get(fd, true).unwrap();
        let mut runs = Vec::new();
        a.pin_file_runs(f, PAGE_SIZE, 3, true, &mut runs).unwrap();
        assert_eq!(runs, [PhysRun::new(a.file_phys(fd, PAGE_SIZE).unwrap(), 3 * PAGE_SIZE)], "one contiguous run");
        assert_eq!(a.phys_of(0x40_0000), a.file_phys(fd, PAGE_SIZE));
        let mut by_va = [0u64; 2];
        a.pin(0x40_0000, &mut by_va, true).unwrap();
        assert_eq!(by_va[1], runs[0].phys + PAGE_SIZE, "the user page is the file page");
        assert_eq!((a.pins(0x40_1000), a.file_pins(fd, 2 * PAGE_SIZE), a.pinned_pages()), (2, 2, 3));
        // Closing the descriptor leaves the file to its holder.
        a.close_fd(fd).unwrap();
        assert_eq!(a.live_files(), 1);
        a.unpin_runs(&runs, false);
        a.unpin(&by_va, false);
        assert_eq!(a.pinned_pages(), 0);
        a.file_put(f);
        assert_eq!(a.live_files(), 0);
        assert_eq!(a.file_get(fd, false), Err(Errno::EBADF));
    }

    #[test]
    fn file_pins_check_kind_range_and_mode() {
        let a = FakeAddressSpace::new();
        let fd = a.create_memfd(2 * PAGE_SIZE);
        let ro = a.dup_fd(fd, false);
        assert_eq!(a.file_get(ro, true), Err(Errno::EPERM), "writable map of a read-only descriptor");
        let f = a.file_get(ro, false).unwrap();
        let mut runs = Vec::new();
        assert_eq!(a.pin_file_runs(f, 0, 3, false, &mut runs), Err(Errno::EINVAL), "past the end");
        assert_eq!(a.pin_file_runs(f, 0x800, 1, false, &mut runs), Err(Errno::EINVAL), "unaligned");
        assert_eq!(a.pin_file_runs(f, !(PAGE_SIZE - 1), 2, false, &mut runs), Err(Errno::EINVAL));
        assert_eq!(a.pin_file_runs(f, PAGE_SIZE, u64::MAX, false, &mut runs), Err(Errno::EINVAL));
        assert!(runs.is_empty());
        assert_eq!(a.pinned_pages(), 0);
        a.truncate(fd, 0).unwrap();
        assert_eq!(a.pin_file_runs(f, 0, 1, false, &mut runs), Err(Errno::EINVAL), "truncated away");
        a.truncate(fd, PAGE_SIZE).unwrap();
        a.pin_file_runs(f, 0, 1, false, &mut runs).unwrap();
        a.unpin_runs(&runs, false);
        a.file_put(f);
        let other = a.create_file(PAGE_SIZE, FakeFileKind::Other);
        let g = a.file_get(other, true).unwrap();
        assert_eq!(a.pin_file_runs(g, 0, 1, true, &mut runs), Err(Errno::EINVAL), "not a memfd");
        a.file_put(g);
        // A source without files.
        let none = RegionMemory::new(NoPhysAccess);
        assert_eq!(none.file_get(fd, false), Err(Errno::EBADF));
    }

    #[test]
    fn the_last_page_of_the_address_space_is_usable() {
        let m = FakeAddressSpace::new();
        let top = u64::MAX - PAGE_SIZE + 1;
        m.map(top, PAGE_SIZE, true);
        m.write_user(u64::MAX - 7, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let mut b = [0u8; 8];
        m.read_user(u64::MAX - 7, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut nine = [0u8; 9];
        assert_eq!(m.read_user(u64::MAX - 7, &mut nine), Err(Errno::EFAULT), "one byte past the top");
        assert_eq!(m.pin_count(u64::MAX), Ok(Some(0)));
    }

    #[test]
    fn injected_pin_failure() {
        let a = FakeAddressSpace::new();
        a.map(0, 0x1000, true);
        a.fail_pin_at(Some(2));
        let mut o = [0u64; 1];
        a.pin(0, &mut o, false).unwrap();
        assert_eq!(a.pin(0, &mut o, false), Err(Errno::ENOMEM));
        assert_eq!(a.pins(0), 1);
    }
}

/// Pin counts of `len` consecutive pages, kept per *chunk* of pages while
/// pins and unpins cover whole chunks, and per page otherwise.
///
/// A source whose memory comes in frames larger than a page (a 2 MiB huge
/// page, a contiguous guest RAM region) pins and unpins mostly whole
/// frames; counting those one page at a time made the count, not the page
/// tables, the bulk of mapping and unmapping a GiB (262144 increments, and
/// as many checked decrements). Here a pin covering a whole chunk is one
/// increment of the chunk's count; a page's count is its chunk's count plus
/// its own. An unpin of part of a chunk whose pages hold no pins of their
/// own moves one of the chunk's pins down onto each of its pages first.
pub struct PinCounts {
    /// log2 of pages per chunk.
    shift: u32,
    len: usize,
    /// Pins covering every page of the chunk.
    whole: Vec<u32>,
    /// Each page's pins beyond its chunk's (empty with one-page chunks).
    pages: Vec<u32>,
}

impl core::fmt::Debug for PinCounts {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PinCounts({} pages, {} per chunk)", self.len, 1usize << self.shift)
    }
}

impl PinCounts {
    /// `len` unpinned pages, counted in chunks of `chunk` pages (a power of
    /// two; chunk `i` is pages `[i * chunk, (i + 1) * chunk)`, the last one
    /// possibly short).
    pub fn new(len: usize, chunk: usize) -> Self {
        assert!(chunk.is_power_of_two(), "chunks are a power of two pages");
        let shift = chunk.trailing_zeros();
        let pages = if shift == 0 { Vec::new() } else { vec![0; len] };
        Self { shift, len, whole: vec![0; len.div_ceil(chunk)], pages }
    }

    /// Pages counted.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no pages are counted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages of chunk `c`.
    fn chunk_range(&self, c: usize) -> core::ops::Range<usize> {
        (c << self.shift)..((c + 1) << self.shift).min(self.len)
    }

    /// Calls `whole(chunk)` for each chunk `[first, first + n)` covers
    /// entirely and `part(chunk, pages)` for each it covers in part.
    fn split(
        &mut self,
        first: usize,
        n: usize,
        mut whole: impl FnMut(&mut Self, usize),
        mut part: impl FnMut(&mut Self, usize, core::ops::Range<usize>),
    ) {
        let end = first + n;
        assert!(end <= self.len, "pages {first}..{end} outside the {} counted", self.len);
        let mut p = first;
        while p < end {
            let c = p >> self.shift;
            let r = self.chunk_range(c);
            let stop = end.min(r.end);
            if p == r.start && stop == r.end {
                whole(self, c);
            } else {
                part(self, c, p..stop);
            }
            p = stop;
        }
    }

    /// One more pin on each of pages `[first, first + n)`.
    pub fn pin(&mut self, first: usize, n: usize) {
        if self.shift == 0 {
            // One page per chunk: a plain count per page.
            self.whole[first..first + n].iter_mut().for_each(|x| *x += 1);
            return;
        }
        self.split(first, n, |s, c| s.whole[c] += 1, |s, _, r| s.pages[r].iter_mut().for_each(|x| *x += 1));
    }

    /// One pin fewer on each of pages `[first, first + n)`; panics if one
    /// of them is not pinned (an unpin nobody pinned is a bug of the
    /// caller's, and the counts would be wrong from then on).
    pub fn unpin(&mut self, first: usize, n: usize) {
        if self.shift == 0 {
            for (p, x) in self.whole[first..first + n].iter_mut().enumerate() {
                *x = x.checked_sub(1).unwrap_or_else(|| panic!("unpin of unpinned page {}", first + p));
            }
            return;
        }
        self.split(
            first,
            n,
            |s, c| {
                if s.whole[c] > 0 {
                    s.whole[c] -= 1;
                } else {
                    let r = s.chunk_range(c);
                    s.unpin_pages(c, r);
                }
            },
            Self::unpin_pages,
        );
    }

    /// Unpins pages `r` of chunk `c` one by one (chunks of more than one
    /// page: `unpin` counts one-page chunks itself).
    fn unpin_pages(&mut self, c: usize, r: core::ops::Range<usize>) {
        for p in r {
            if self.pages[p] > 0 {
                self.pages[p] -= 1;
                continue;
            }
            assert!(self.whole[c] > 0, "unpin of unpinned page {p}");
            // Move one of the chunk's pins onto its pages, then take it
            // off this one.
            self.whole[c] -= 1;
            let all = self.chunk_range(c);
            self.pages[all].iter_mut().for_each(|x| *x += 1);
            self.pages[p] -= 1;
        }
    }

    /// Pins on page `p`.
    pub fn count(&self, p: usize) -> u32 {
        assert!(p < self.len, "page {p} outside the {} counted", self.len);
        self.whole[p >> self.shift] + if self.shift == 0 { 0 } else { self.pages[p] }
    }

    /// Pages pinned at least once.
    pub fn pinned_pages(&self) -> usize {
        (0..self.whole.len())
            .map(|c| {
                let r = self.chunk_range(c);
                if self.whole[c] > 0 {
                    r.len()
                } else if self.shift == 0 {
                    0
                } else {
                    self.pages[r].iter().filter(|&&x| x > 0).count()
                }
            })
            .sum()
    }

    /// Whether any page is pinned.
    pub fn any_pinned(&self) -> bool {
        self.whole.iter().any(|&x| x > 0) || self.pages.iter().any(|&x| x > 0)
    }
}

/// Byte access to physical memory, for [`RegionMemory`]: the kernel's
/// direct map in Portcullis, nothing (reads fail) in host benchmarks.
pub trait PhysMemory: Send + Sync {
    /// Copies from physical memory.
    fn read(&self, phys: u64, buf: &mut [u8]) -> Result<()>;
    /// Copies to physical memory.
    fn write(&self, phys: u64, buf: &[u8]) -> Result<()>;
}

/// Physical memory that cannot be touched (host benchmarks): every access
/// is `EOPNOTSUPP`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPhysAccess;

impl PhysMemory for NoPhysAccess {
    fn read(&self, _: u64, _: &mut [u8]) -> Result<()> {
        Err(Errno::EOPNOTSUPP)
    }
    fn write(&self, _: u64, _: &[u8]) -> Result<()> {
        Err(Errno::EOPNOTSUPP)
    }
}

struct Region {
    uptr: u64,
    phys: u64,
    len: u64,
    writable: bool,
    pins: PinCounts,
}

/// Pages per [`PinCounts`] chunk in a [`RegionMemory`]: 2 MiB.
const REGION_CHUNK: usize = 512;

/// A memfd that backs guest RAM at `[uptr, uptr + len)` of a
/// [`RegionMemory`].
struct RegionFile {
    uptr: u64,
    len: u64,
    /// Whether the descriptor was opened for writing.
    writable: bool,
    /// The descriptor (while open) plus holds from `file_get`.
    refs: u32,
}

#[derive(Default)]
struct RegionFiles {
    /// Open descriptors -> file id.
    fds: BTreeMap<i32, u64>,
    files: BTreeMap<u64, RegionFile>,
    next: u64,
}

/// A memory source made of regions of user (guest-physical) addresses,
/// each backed by one physically contiguous host range: how a hypervisor
/// sees its guest's RAM. Pins are counted per page.
///
/// It also knows the memfds behind the regions ([`Self::add_file`]): a
/// file's offset `o` is the user address `uptr + o`, so
/// `IOMMU_IOAS_MAP_FILE` of the memfd and `IOMMU_IOAS_MAP` of the guest
/// RAM pin the same pages, counted together.
pub struct RegionMemory<P> {
    regions: Mutex<Vec<Region>>,
    files: Mutex<RegionFiles>,
    phys: P,
}

impl<P> core::fmt::Debug for RegionMemory<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "RegionMemory({} regions)", self.regions.lock().len())
    }
}

impl<P: PhysMemory> RegionMemory<P> {
    /// No regions yet.
    pub fn new(phys: P) -> Self {
        Self { regions: Mutex::new(Vec::new()), files: Mutex::new(RegionFiles::default()), phys }
    }

    /// Names the memfd behind the user range `[uptr, uptr + len)` as
    /// descriptor `fd`, opened for writing or not. Page aligned, not empty
    /// (`EINVAL`); `EEXIST` if `fd` is already open. The range need not
    /// be added as regions yet: pinning it needs them.
    pub fn add_file(&self, fd: i32, uptr: u64, len: u64, writable: bool) -> Result<()> {
        if !(uptr | len).is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(Errno::EINVAL);
        }
        uptr.checked_add(len).ok_or(Errno::EOVERFLOW)?;
        let mut f = self.files.lock();
        if f.fds.contains_key(&fd) {
            return Err(Errno::EEXIST);
        }
        let id = f.next;
        f.next += 1;
        f.fds.insert(fd, id);
        f.files.insert(id, RegionFile { uptr, len, writable, refs: 1 });
        Ok(())
    }

    /// Closes descriptor `fd` (`EBADF` if not open); mappings made from
    /// it keep the file.
    pub fn close_file(&self, fd: i32) -> Result<()> {
        let mut f = self.files.lock();
        let id = f.fds.remove(&fd).ok_or(Errno::EBADF)?;
        Self::drop_file_ref(&mut f, id);
        Ok(())
    }

    /// Files alive (open, or held by a mapping).
    pub fn live_files(&self) -> usize {
        self.files.lock().files.len()
    }

    fn drop_file_ref(f: &mut RegionFiles, id: u64) {
        let file = f.files.get_mut(&id).expect("a held file is live");
        file.refs -= 1;
        if file.refs == 0 {
            f.files.remove(&id);
        }
    }

    /// Adds `[uptr, uptr + len)` backed by host physical `[phys, phys + len)`.
    /// Page aligned; must not overlap an existing region (`EEXIST`).
    pub fn add_region(&self, uptr: u64, phys: u64, len: u64, writable: bool) -> Result<()> {
        if !(uptr | phys | len).is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(Errno::EINVAL);
        }
        let end = uptr.checked_add(len).ok_or(Errno::EOVERFLOW)?;
        let mut r = self.regions.lock();
        if r.iter().any(|x| uptr < x.uptr + x.len && x.uptr < end) {
            return Err(Errno::EEXIST);
        }
        r.push(Region { uptr, phys, len, writable, pins: PinCounts::new((len / PAGE_SIZE) as usize, REGION_CHUNK) });
        r.sort_by_key(|x| x.uptr);
        Ok(())
    }

    /// Whether a region was added as exactly `[uptr, uptr + len)`.
    pub fn has_region(&self, uptr: u64, len: u64) -> bool {
        self.regions.lock().iter().any(|x| x.uptr == uptr && x.len == len)
    }

    /// Removes the region added as exactly `[uptr, uptr + len)`: `ENOENT`
    /// if there is none, `EBUSY` while any of its pages is pinned (unmap
    /// it from every IOAS first).
    pub fn remove_region(&self, uptr: u64, len: u64) -> Result<()> {
        let mut r = self.regions.lock();
        let i = r.iter().position(|x| x.uptr == uptr && x.len == len).ok_or(Errno::ENOENT)?;
        if r[i].pins.any_pinned() {
            return Err(Errno::EBUSY);
        }
        r.remove(i);
        Ok(())
    }

    /// Pages pinned at least once, over all regions.
    pub fn pinned_pages(&self) -> u64 {
        self.regions.lock().iter().map(|r| r.pins.pinned_pages() as u64).sum()
    }

    fn region_of(regions: &[Region], uptr: u64) -> Option<usize> {
        let i = regions.partition_point(|r| r.uptr <= uptr).checked_sub(1)?;
        (uptr < regions[i].uptr + regions[i].len).then_some(i)
    }

    /// `EFAULT` unless every page of the user range `[uptr, end)` lies in
    /// a region, writable if `write`.
    fn check_range(regions: &[Region], uptr: u64, end: u64, write: bool) -> Result<()> {
        let mut a = uptr;
        while a < end {
            let i = Self::region_of(regions, a).ok_or(Errno::EFAULT)?;
            if write && !regions[i].writable {
                return Err(Errno::EFAULT);
            }
            a = regions[i].uptr + regions[i].len;
        }
        Ok(())
    }

    /// Calls `f(region, first page, pages)` for each region's share of the
    /// user range `[uptr, end)`, in order; every page lies in a region
    /// ([`Self::check_range`], or pinned there before).
    fn each_piece(regions: &mut [Region], uptr: u64, end: u64, mut f: impl FnMut(&mut Region, usize, usize)) {
        let mut a = uptr;
        while a < end {
            let i = Self::region_of(regions, a).expect("a page outside every region");
            let reg = &mut regions[i];
            let first = ((a - reg.uptr) / PAGE_SIZE) as usize;
            let n = (reg.pins.len() - first).min(((end - a) / PAGE_SIZE) as usize);
            f(reg, first, n);
            a += n as u64 * PAGE_SIZE;
        }
    }

    fn user_to_phys(&self, uptr: u64, len: usize) -> Result<u64> {
        let r = self.regions.lock();
        let i = Self::region_of(&r, uptr).ok_or(Errno::EFAULT)?;
        let reg = &r[i];
        if uptr + len as u64 > reg.uptr + reg.len {
            return Err(Errno::EFAULT);
        }
        Ok(reg.phys + (uptr - reg.uptr))
    }
}

impl<P: PhysMemory> MemorySource for RegionMemory<P> {
    fn pin(&self, uptr: u64, out: &mut [u64], write: bool) -> Result<()> {
        if !uptr.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let mut regions = self.regions.lock();
        let end = uptr.checked_add(out.len() as u64 * PAGE_SIZE).ok_or(Errno::EFAULT)?;
        Self::check_range(&regions, uptr, end, write)?;
        let mut k = 0;
        Self::each_piece(&mut regions, uptr, end, |reg, first, n| {
            reg.pins.pin(first, n);
            for (j, o) in out[k..k + n].iter_mut().enumerate() {
                *o = reg.phys + (first + j) as u64 * PAGE_SIZE;
            }
            k += n;
        });
        Ok(())
    }

    fn pin_runs(&self, uptr: u64, npages: u64, write: bool, out: &mut Vec<PhysRun>) -> Result<()> {
        if !uptr.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let mut regions = self.regions.lock();
        let end = npages.checked_mul(PAGE_SIZE).and_then(|l| uptr.checked_add(l)).ok_or(Errno::EFAULT)?;
        Self::check_range(&regions, uptr, end, write)?;
        Self::each_piece(&mut regions, uptr, end, |reg, first, n| {
            reg.pins.pin(first, n);
            push_run(out, PhysRun::new(reg.phys + first as u64 * PAGE_SIZE, n as u64 * PAGE_SIZE));
        });
        Ok(())
    }

    fn unpin_runs(&self, runs: &[PhysRun], _dirty: bool) {
        let mut regions = self.regions.lock();
        for &PhysRun { phys, len } in runs {
            let (mut p, end) = (phys, phys + len);
            while p < end {
                let reg = regions
                    .iter_mut()
                    .find(|r| p >= r.phys && p < r.phys + r.len)
                    .expect("unpin of a page outside every region");
                let first = ((p - reg.phys) / PAGE_SIZE) as usize;
                let k = (reg.pins.len() - first).min(((end - p) / PAGE_SIZE) as usize);
                reg.pins.unpin(first, k);
                p += k as u64 * PAGE_SIZE;
            }
        }
    }

    fn unpin(&self, phys: &[u64], _dirty: bool) {
        let mut regions = self.regions.lock();
        for &p in phys {
            let reg = regions
                .iter_mut()
                .find(|r| p >= r.phys && p < r.phys + r.len)
                .expect("unpin of a page outside every region");
            let idx = ((p - reg.phys) / PAGE_SIZE) as usize;
            reg.pins.unpin(idx, 1);
        }
    }

    fn read_user(&self, uptr: u64, buf: &mut [u8]) -> Result<()> {
        let p = self.user_to_phys(uptr, buf.len())?;
        self.phys.read(p, buf)
    }

    fn write_user(&self, uptr: u64, buf: &[u8]) -> Result<()> {
        let p = self.user_to_phys(uptr, buf.len())?;
        self.phys.write(p, buf)
    }

    fn read_phys(&self, phys: u64, buf: &mut [u8]) -> Result<()> {
        self.phys.read(phys, buf)
    }

    fn write_phys(&self, phys: u64, buf: &[u8]) -> Result<()> {
        self.phys.write(phys, buf)
    }

    fn pins_stay_at_user(&self) -> bool {
        // A region cannot be removed while one of its pages is pinned,
        // and regions never overlap.
        true
    }

    fn unpin_user(&self, uptr: u64, npages: u64, _dirty: bool) {
        let mut regions = self.regions.lock();
        Self::each_piece(&mut regions, uptr, uptr + npages * PAGE_SIZE, |reg, first, n| reg.pins.unpin(first, n));
    }

    fn pin_count(&self, uptr: u64) -> Result<Option<u32>> {
        let r = self.regions.lock();
        let i = Self::region_of(&r, uptr).ok_or(Errno::EFAULT)?;
        Ok(Some(r[i].pins.count(((uptr - r[i].uptr) / PAGE_SIZE) as usize)))
    }

    fn peek_phys(&self, uptr: u64) -> Result<Option<u64>> {
        self.user_to_phys(uptr, 1).map(Some)
    }

    fn file_get(&self, fd: i32, write: bool) -> Result<FileId> {
        let mut f = self.files.lock();
        let id = *f.fds.get(&fd).ok_or(Errno::EBADF)?;
        let file = f.files.get_mut(&id).expect("an open descriptor names a live file");
        if write && !file.writable {
            return Err(Errno::EPERM);
        }
        file.refs += 1;
        Ok(FileId(id))
    }

    fn file_put(&self, file: FileId) {
        Self::drop_file_ref(&mut self.files.lock(), file.0);
    }

    /// Pins the user pages behind the file offsets. A range not inside
    /// the file is `EINVAL`; one whose guest RAM is not (or no longer)
    /// added as regions is `EFAULT`, as for user addresses.
    fn pin_file_runs(&self, file: FileId, offset: u64, npages: u64, write: bool, out: &mut Vec<PhysRun>) -> Result<()> {
        let (uptr, len) = {
            let f = self.files.lock();
            let file = f.files.get(&file.0).expect("pins only of files held with file_get");
            (file.uptr, file.len)
        };
        let bytes = npages.checked_mul(PAGE_SIZE).ok_or(Errno::EINVAL)?;
        let end = offset.checked_add(bytes).ok_or(Errno::EINVAL)?;
        if !offset.is_multiple_of(PAGE_SIZE) || end > len {
            return Err(Errno::EINVAL);
        }
        // Cannot overflow: uptr + len fits (add_file checked it).
        self.pin_runs(uptr + offset, npages, write, out)
    }
}

#[cfg(test)]
mod region_tests {
    use super::*;

    /// A region source that answers [`MemorySource::unpin_user`] with the
    /// trait's default (pin again to learn the addresses).
    struct DefaultUnpin(RegionMemory<NoPhysAccess>);

    impl MemorySource for DefaultUnpin {
        fn pin(&self, uptr: u64, out: &mut [u64], write: bool) -> Result<()> {
            self.0.pin(uptr, out, write)
        }
        fn unpin(&self, phys: &[u64], dirty: bool) {
            self.0.unpin(phys, dirty)
        }
        fn read_user(&self, uptr: u64, buf: &mut [u8]) -> Result<()> {
            self.0.read_user(uptr, buf)
        }
        fn write_user(&self, uptr: u64, buf: &[u8]) -> Result<()> {
            self.0.write_user(uptr, buf)
        }
        fn read_phys(&self, phys: u64, buf: &mut [u8]) -> Result<()> {
            self.0.read_phys(phys, buf)
        }
        fn write_phys(&self, phys: u64, buf: &[u8]) -> Result<()> {
            self.0.write_phys(phys, buf)
        }
        fn pins_stay_at_user(&self) -> bool {
            true
        }
    }

    #[test]
    fn unpin_by_user_address_default_and_regions() {
        let d = DefaultUnpin(RegionMemory::new(NoPhysAccess));
        d.0.add_region(0x10_0000, 0x8000_0000, 0x40_0000, true).unwrap();
        d.0.add_region(0x50_0000, 0x9000_0000, 0x1000, true).unwrap();
        let mut runs = Vec::new();
        // 2 MiB + 3 pages from 0x10_0000, twice; then the second region.
        d.0.pin_runs(0x10_0000, 515, false, &mut runs).unwrap();
        d.0.pin_runs(0x10_0000, 515, false, &mut runs).unwrap();
        d.0.pin_runs(0x50_0000, 1, false, &mut runs).unwrap();
        d.unpin_user(0x10_1000, 513, false);
        assert_eq!(d.0.pin_count(0x10_0000), Ok(Some(2)));
        assert_eq!(d.0.pin_count(0x10_1000), Ok(Some(1)));
        assert_eq!(d.0.pin_count(0x30_1000), Ok(Some(1)));
        assert_eq!(d.0.pin_count(0x30_2000), Ok(Some(2)), "past the unpinned range");
        assert_eq!(d.0.pin_count(0x30_3000), Ok(Some(0)));
        // The region source's own answer.
        d.0.unpin_user(0x10_0000, 515, false);
        d.0.unpin_user(0x10_0000, 1, false);
        d.0.unpin_user(0x30_2000, 1, false);
        d.0.unpin_user(0x50_0000, 1, true);
        assert_eq!(d.0.pinned_pages(), 0);
    }

    #[test]
    fn regions_translate_and_count_pins() {
        let m = RegionMemory::new(NoPhysAccess);
        m.add_region(0, 0x1_0000_0000, 0x20_0000, true).unwrap();
        m.add_region(0x20_0000, 0x3_0000_0000, 0x1000, false).unwrap();
        assert_eq!(m.add_region(0x1000, 0, 0x1000, true), Err(Errno::EEXIST));
        let mut three = [0u64; 3];
        assert_eq!(m.pin(0x1f_f000, &mut three, false), Err(Errno::EFAULT), "runs off the second region");
        assert_eq!(m.pinned_pages(), 0);
        let mut out = [0u64; 2];
        m.pin(0x1f_f000, &mut out, false).unwrap();
        assert_eq!(out, [0x1_001f_f000, 0x3_0000_0000]);
        assert_eq!(m.pin(0x1f_f000, &mut out, true), Err(Errno::EFAULT), "second region is read-only");
        assert_eq!(m.pin_count(0x20_0000), Ok(Some(1)));
        assert_eq!(m.peek_phys(0x20_0010), Ok(Some(0x3_0000_0010)));
        m.unpin(&out, false);
        assert_eq!(m.pinned_pages(), 0);
        let mut runs = Vec::new();
        assert_eq!(m.pin_runs(0x1f_f000, 3, false, &mut runs), Err(Errno::EFAULT));
        assert!(runs.is_empty());
        m.pin_runs(0x1f_e000, 3, false, &mut runs).unwrap();
        assert_eq!(runs, [PhysRun::new(0x1_001f_e000, 0x2000), PhysRun::new(0x3_0000_0000, 0x1000)]);
        assert_eq!(m.pin_count(0x1f_f000), Ok(Some(1)));
        m.unpin_runs(&runs, false);
        assert_eq!(m.pinned_pages(), 0);
    }

    #[test]
    fn a_file_behind_guest_ram_pins_the_same_pages() {
        let m = RegionMemory::new(NoPhysAccess);
        m.add_region(0x10_0000, 0x1_0000_0000, 0x4000, true).unwrap();
        m.add_file(7, 0x10_0000, 0x4000, true).unwrap();
        assert_eq!(m.add_file(7, 0, 0x1000, true), Err(Errno::EEXIST));
        assert_eq!(m.add_file(8, 0x800, 0x1000, true), Err(Errno::EINVAL));
        assert_eq!(m.add_file(8, !0xfff, 0x2000, true), Err(Errno::EOVERFLOW));
        assert_eq!(m.file_get(9, false), Err(Errno::EBADF));
        let f = m.file_get(7, true).unwrap();
        let mut runs = Vec::new();
        m.pin_file_runs(f, 0x1000, 2, true, &mut runs).unwrap();
        assert_eq!(runs, [PhysRun::new(0x1_0000_1000, 0x2000)]);
        let mut one = [0u64; 1];
        m.pin(0x10_2000, &mut one, false).unwrap();
        assert_eq!(m.pin_count(0x10_2000), Ok(Some(2)), "file offset 0x2000 is guest RAM 0x10_2000");
        assert_eq!(m.pin_file_runs(f, 0x3000, 2, false, &mut runs), Err(Errno::EINVAL), "past the file");
        assert_eq!(m.pin_file_runs(f, 0, u64::MAX, false, &mut runs), Err(Errno::EINVAL));
        assert_eq!(m.pin_file_runs(f, !0xfff, 1, false, &mut runs), Err(Errno::EINVAL));
        m.unpin_runs(&runs, false);
        m.unpin(&one, false);
        assert_eq!(m.pinned_pages(), 0);
        m.close_file(7).unwrap();
        assert_eq!(m.live_files(), 1, "held by the mapping");
        m.file_put(f);
        assert_eq!(m.live_files(), 0);
        // Read-only descriptors map read-only only; guest RAM not added
        // as a region faults.
        m.add_file(3, 0x80_0000, 0x1000, false).unwrap();
        assert_eq!(m.file_get(3, true), Err(Errno::EPERM));
        let g = m.file_get(3, false).unwrap();
        assert_eq!(m.pin_file_runs(g, 0, 1, false, &mut runs), Err(Errno::EFAULT));
        m.file_put(g);
    }

    #[test]
    fn regions_are_removed_only_whole_and_unpinned() {
        let m = RegionMemory::new(NoPhysAccess);
        m.add_region(0x10_0000, 0x1_0000_0000, 0x4000, true).unwrap();
        let mut out = [0u64; 1];
        m.pin(0x10_2000, &mut out, true).unwrap();
        assert_eq!(m.remove_region(0x10_0000, 0x2000), Err(Errno::ENOENT), "not the whole region");
        assert!(m.has_region(0x10_0000, 0x4000) && !m.has_region(0x10_0000, 0x2000));
        assert_eq!(m.remove_region(0x10_0000, 0x4000), Err(Errno::EBUSY), "a page is pinned");
        m.unpin(&out, false);
        m.remove_region(0x10_0000, 0x4000).unwrap();
        assert_eq!(m.pin(0x10_0000, &mut out, false), Err(Errno::EFAULT), "gone");
        m.add_region(0x10_0000, 0x2_0000_0000, 0x1000, true).unwrap();
    }
}

#[cfg(test)]
mod pin_count_tests {
    use super::PinCounts;
    use alloc::vec;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    #[test]
    fn whole_chunks_then_parts() {
        // 10 pages in chunks of 4: [0,4) [4,8) [8,10).
        let mut c = PinCounts::new(10, 4);
        c.pin(0, 10);
        assert_eq!((0..10).map(|p| c.count(p)).collect::<Vec<_>>(), vec![1; 10]);
        assert_eq!(c.pinned_pages(), 10);
        // Part of a chunk pinned by the whole: its pins move to the pages.
        c.unpin(5, 2);
        assert_eq!((0..10).map(|p| c.count(p)).collect::<Vec<_>>(), [1, 1, 1, 1, 1, 0, 0, 1, 1, 1]);
        c.unpin(4, 1);
        c.unpin(7, 1);
        // The whole chunk again, now counted per page.
        c.pin(4, 4);
        c.unpin(4, 4);
        assert_eq!(c.pinned_pages(), 6);
        c.unpin(0, 4);
        c.unpin(8, 2);
        assert!(!c.any_pinned());
        assert_eq!(c.pinned_pages(), 0);
    }

    #[test]
    #[should_panic(expected = "unpin of unpinned page 3")]
    fn unpin_of_an_unpinned_page_panics() {
        let mut c = PinCounts::new(8, 4);
        c.pin(0, 3);
        c.unpin(0, 4);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn pin_past_the_end_panics() {
        PinCounts::new(8, 4).pin(6, 3);
    }

    proptest! {
        /// Any sequence of pins, and unpins of pinned pages, counts as one
        /// counter per page does.
        #[test]
        fn counts_as_per_page(
            shift in 0u32..4,
            len in 1usize..40,
            ops in proptest::collection::vec((any::<bool>(), 0usize..40, 1usize..20), 0..60),
        ) {
            let mut c = PinCounts::new(len, 1 << shift);
            let mut model = vec![0u32; len];
            for (pin, first, n) in ops {
                let first = first % len;
                let n = n.min(len - first);
                if pin {
                    c.pin(first, n);
                    model[first..first + n].iter_mut().for_each(|x| *x += 1);
                } else if model[first..first + n].iter().all(|&x| x > 0) {
                    c.unpin(first, n);
                    model[first..first + n].iter_mut().for_each(|x| *x -= 1);
                }
                for (p, &m) in model.iter().enumerate() {
                    prop_assert_eq!(c.count(p), m, "page {}", p);
                }
                prop_assert_eq!(c.pinned_pages(), model.iter().filter(|&&x| x > 0).count());
                prop_assert_eq!(c.any_pinned(), model.iter().any(|&x| x > 0));
            }
        }
    }
}
