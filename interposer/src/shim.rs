//! The descriptor table and the hooks behind the exported C functions
//! (safe code; the C side is [`crate::sys`]).
//!
//! Each Portcullis descriptor is a real descriptor of the process: a
//! `memfd` of its own, so its number is unique while open, `close` or
//! `dup` of it by any path is harmless to the process, and its inode
//! identifies it. The table maps the number to the open file it stands
//! for (an [`OpenFile`], shared by duplicates the way Linux shares a
//! `struct file`): the context, one of its fault queues, or a selftest
//! access. The last descriptor of an open file going closes it in the
//! core (the context's `Drop`, `fault_fd_close`, `close_access_fd`).
//!
//! A lookup checks the descriptor's inode against the one recorded: a
//! number closed behind the library's back (a raw `close` system call,
//! `close_range`) and reused by an unrelated file is recognised, its stale
//! entry dropped and the call passed through.
//!
//! Lock order: the table lock is a leaf, held only to look up, insert or
//! remove entries; the core is always called without it, and entries are
//! dropped (which may call into the core) after it is released.

use crate::faultinj;
use crate::memory::ProcessMemory;
use crate::sys;
use iommufd::ctx::Ictx;
use iommufd::uapi::{self, IOMMU_FAULT_QUEUE_ALLOC, IOMMU_TEST_CMD};
use iommufd::{Errno, dispatch, vfio};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// What a hooked call does: pass to the next definition, or done here.
#[derive(Debug)]
pub enum Hook {
    /// Not ours: the next definition handles the call.
    Pass,
    /// Handled: the value or the errno to return.
    Done(Result<i64, Errno>),
}

/// What a Portcullis descriptor names.
#[derive(Debug)]
pub enum OpenFile {
    /// An iommufd context (`open("/dev/iommu")`).
    Iommufd(Arc<Ictx>),
    /// A fault queue of a context (`IOMMU_FAULT_QUEUE_ALLOC`); `fd` is
    /// the core's number for it.
    Fault {
        /// The context it belongs to (kept alive by the queue, as Linux's
        /// fault file holds its context).
        ictx: Arc<Ictx>,
        /// The core's descriptor number.
        fd: u32,
        /// The fault object.
        id: u32,
        /// What `poll` sees (see [`Readiness`]).
        ready: Readiness,
    },
    /// A thread's `fail-nth` file (see [`crate::faultinj`]).
    FailNth {
        /// The thread it arms.
        tid: i32,
    },
    /// A selftest access (`IOMMU_TEST_OP_CREATE_ACCESS`).
    Access {
        /// The context it belongs to.
        ictx: Arc<Ictx>,
        /// The core's descriptor number.
        fd: u32,
    },
}

/// A fault queue's descriptor is one end of a socket pair, so `poll`,
/// `select` and `epoll` on it answer as Linux's fault file does: always
/// writable, readable while fault groups wait to be read. The library
/// keeps one byte queued on the application's end exactly while the
/// queue has groups (refreshed after every ioctl on the context and every
/// read or write of the queue; faults only arrive through ioctls here).
/// `read` and `write` of the descriptor are the library's, so the byte
/// is never consumed by the application.
#[derive(Debug)]
pub struct Readiness {
    /// The other end: the byte is sent from here.
    peer: sys::Fd,
    /// A private duplicate of the application's end: drained from here.
    mine: sys::Fd,
    /// A byte is queued.
    signalled: std::sync::atomic::AtomicBool,
}

impl Readiness {
    /// Makes the queued byte match `pending`.
    fn set(&self, pending: bool) {
        use std::sync::atomic::Ordering::SeqCst;
        if pending && !self.signalled.load(SeqCst) && sys::send_byte(&self.peer) {
            self.signalled.store(true, SeqCst);
        } else if !pending && self.signalled.load(SeqCst) && sys::recv_byte(&self.mine) {
            self.signalled.store(false, SeqCst);
        }
    }
}

impl OpenFile {
    /// A fault queue's readiness, brought up to date.
    fn refresh(&self) {
        if let OpenFile::Fault { ictx, id, ready, .. } = self {
            ready.set(ictx.fault(*id).is_ok_and(|f| f.delivered() > 0));
        }
    }
}

/// Brings the readiness of every fault queue descriptor of `ictx` up to
/// date.
fn refresh_faults(ictx: &Arc<Ictx>) {
    let mut files: Vec<Arc<OpenFile>> = table()
        .values()
        .filter(|e| matches!(&*e.file, OpenFile::Fault { ictx: c, .. } if Arc::ptr_eq(c, ictx)))
        .map(|e| e.file.clone())
        .collect();
    files.dedup_by(|a, b| Arc::ptr_eq(a, b));
    for f in files {
        f.refresh();
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        match self {
            // The context closes with its last Arc (Ictx's Drop); a
            // fail-nth file leaves its count armed, as Linux's does.
            OpenFile::Iommufd(_) | OpenFile::FailNth { .. } => {}
            // Nothing to report to: close(2) of such files cannot fail
            // in Linux either, and the core's number is known to be open.
            OpenFile::Fault { ictx, fd, .. } => {
                let _ = ictx.fault_fd_close(*fd);
            }
            OpenFile::Access { ictx, fd } => {
                let _ = iommufd::selftest::cmd::close_access_fd(ictx, *fd);
            }
        }
    }
}

/// One table entry: the open file, the identity of the descriptor, and
/// the process it was made in.
#[derive(Debug, Clone)]
pub struct Entry {
    file: Arc<OpenFile>,
    dev: u64,
    ino: u64,
    pid: i32,
}

fn table() -> MutexGuard<'static, BTreeMap<i32, Entry>> {
    static TABLE: Mutex<BTreeMap<i32, Entry>> = Mutex::new(BTreeMap::new());
    // A panic while holding it aborts the process (panic = "abort"), so a
    // poisoned lock is never seen; recover the data if it were.
    TABLE.lock().unwrap_or_else(|p| p.into_inner())
}

static MEM: OnceLock<Arc<ProcessMemory>> = OnceLock::new();

/// The process's memory source, shared by every context (two contexts
/// pinning one page see one physical page, as on Linux). Made with the
/// first context; the `fork` handlers are registered then.
pub fn memory() -> Result<Arc<ProcessMemory>, Errno> {
    if let Some(m) = MEM.get() {
        return Ok(m.clone());
    }
    let m = Arc::new(ProcessMemory::new()?);
    static FORK_HANDLERS: OnceLock<bool> = OnceLock::new();
    FORK_HANDLERS.get_or_init(|| sys::at_fork(fork_prepare, fork_parent, fork_child));
    Ok(MEM.get_or_init(|| m).clone())
}

// `fork`: the thread forking holds every lock of the library across the
// fork (memory source, then table, then fault-injection counts, then the
// charger slot: the order they nest in elsewhere), so the child never inherits one taken by
// a thread it does not have. Then the child's memory is made as Linux
// leaves it (`ForkGuard::child`).
type ForkLocks = (
    Option<crate::memory::ForkGuard>,
    MutexGuard<'static, BTreeMap<i32, Entry>>,
    MutexGuard<'static, BTreeMap<i32, u64>>,
    MutexGuard<'static, Option<Arc<crate::charge::ProcessCharge>>>,
);

thread_local! {
    static FORK_LOCKS: std::cell::RefCell<Option<ForkLocks>> = const { std::cell::RefCell::new(None) };
}

extern "C" fn fork_prepare() {
    let mem = MEM.get().map(|m| m.lock_for_fork());
    let locks = (mem, table(), faultinj::lock_counts(), crate::charge::lock_for_fork());
    FORK_LOCKS.with(|f| *f.borrow_mut() = Some(locks));
}

extern "C" fn fork_parent() {
    if let Some((mem, t, c, k)) = FORK_LOCKS.with(|f| f.borrow_mut().take()) {
        drop((k, c, t));
        if let Some(m) = mem {
            m.parent();
        }
    }
}

extern "C" fn fork_child() {
    if let Some((mem, t, c, k)) = FORK_LOCKS.with(|f| f.borrow_mut().take()) {
        drop((k, c, t));
        if let Some(m) = mem {
            m.child();
        }
    }
}

/// The table entry of `fd`, if it is a live Portcullis descriptor.
fn entry(fd: i32) -> Option<Entry> {
    let e = table().get(&fd).cloned()?;
    match sys::fstat(fd) {
        Ok((dev, ino, _, _)) if dev == e.dev && ino == e.ino => Some(e),
        _ => {
            // Closed behind our back and maybe reused: forget it (dropped
            // after the lock is released).
            let stale = {
                let mut t = table();
                if t.get(&fd).is_some_and(|x| Arc::ptr_eq(&x.file, &e.file)) { t.remove(&fd) } else { None }
            };
            drop(stale);
            None
        }
    }
}

/// The open file behind `fd`: `None` if `fd` is not a Portcullis
/// descriptor, `EOPNOTSUPP` if it is one inherited across `fork`. The
/// context lives in the memory of the process that opened it; a child
/// has a copy that Linux's shared kernel object would not be, so its
/// use is refused rather than answered from a diverging copy.
pub fn lookup(fd: i32) -> Option<Result<Arc<OpenFile>, Errno>> {
    let e = entry(fd)?;
    Some(if e.pid == sys::getpid() { Ok(e.file) } else { Err(Errno::EOPNOTSUPP) })
}

/// [`lookup`] for the hooks: pass, refuse, or the file.
fn target(fd: i32) -> Result<Arc<OpenFile>, Hook> {
    match lookup(fd) {
        None => Err(Hook::Pass),
        Some(Err(e)) => Err(Hook::Done(Err(e))),
        Some(Ok(f)) => Ok(f),
    }
}

/// Removes `fd` from the table (it is being closed or replaced); the
/// caller drops the entry after the descriptor is gone.
pub fn forget(fd: i32) -> Option<Entry> {
    table().remove(&fd)
}

/// Removes the descriptors `[first, last]` from the table (closed by
/// `close_range` or `closefrom`); the caller drops them afterwards.
pub fn forget_range(first: u32, last: u32) -> Vec<Entry> {
    let (Ok(lo), hi) = (i32::try_from(first), i32::try_from(last).unwrap_or(i32::MAX)) else { return Vec::new() };
    if lo > hi {
        return Vec::new();
    }
    let mut t = table();
    let keys: Vec<i32> = t.range(lo..=hi).map(|(&k, _)| k).collect();
    keys.into_iter().filter_map(|k| t.remove(&k)).collect()
}

/// `new` is now a duplicate of `old`: it names the same open file.
pub fn duplicated(old: i32, new: i32) {
    // An inherited descriptor's duplicate is inherited too.
    let Some(e) = entry(old) else { return };
    let Ok((dev, ino, _, _)) = sys::fstat(new) else { return };
    let replaced = table().insert(new, Entry { dev, ino, ..e });
    drop(replaced);
}

/// Registers a new descriptor for `file`: a fresh memfd whose number the
/// application gets.
fn install(file: OpenFile, cloexec: bool) -> Result<i32, Errno> {
    install_as(file, sys::memfd_create(c"portcullis-iommufd", cloexec)?)
}

/// [`install`] for a file the application opened with `flags`: a
/// read-only or write-only open gets a descriptor of that mode (the
/// memfd opened again), so `F_GETFL` reports it and `read` and `write`
/// answer `EBADF` as Linux's VFS does. Where `/proc` is missing the
/// descriptor stays read-write. (`O_ACCMODE` 3, neither read nor write
/// on Linux, is treated as read-write.)
fn install_opened(file: OpenFile, flags: i32) -> Result<i32, Errno> {
    let cloexec = flags & libc::O_CLOEXEC != 0;
    let fd = sys::memfd_create(c"portcullis-iommufd", cloexec)?;
    let mode = flags & libc::O_ACCMODE;
    let fd = match mode {
        libc::O_RDONLY | libc::O_WRONLY => {
            sys::reopen(&fd, mode | if cloexec { libc::O_CLOEXEC } else { 0 }).unwrap_or(fd)
        }
        _ => fd,
    };
    install_as(file, fd)
}

/// `EBADF` when the descriptor was not opened for reading (`write`:
/// writing), the first check of Linux's `vfs_read` (`vfs_write`).
fn check_mode(fd: i32, write: bool) -> Result<(), Errno> {
    let mode = sys::fcntl_query(fd, libc::F_GETFL)? as i32 & libc::O_ACCMODE;
    let refused = if write { libc::O_RDONLY } else { libc::O_WRONLY };
    if mode == refused { Err(Errno::EBADF) } else { Ok(()) }
}

/// A fault queue's descriptor: the application's end of a socket pair
/// (see [`Readiness`]). If the pair cannot be made, the core's queue is
/// closed again (by the file's Drop) and the error returned.
fn install_fault(ictx: &Arc<Ictx>, fd: u32, id: u32) -> Result<i32, Errno> {
    let pair = sys::socketpair().and_then(|(app, peer)| Ok((sys::dup_private(app.raw())?, app, peer)));
    let (mine, app, peer) = match pair {
        Ok(p) => p,
        Err(e) => {
            // Never handed out: the queue goes, as Linux's does when it
            // cannot install the descriptor (nothing else holds either).
            let _ = ictx.fault_fd_close(fd);
            let _ = ictx.destroy(id);
            return Err(e);
        }
    };
    let ready = Readiness { peer, mine, signalled: false.into() };
    install_as(OpenFile::Fault { ictx: ictx.clone(), fd, id, ready }, app).inspect_err(|_| {
        // The file's Drop closed the descriptor; the object goes too.
        let _ = ictx.destroy(id);
    })
}

/// Registers `fd` as the descriptor of `file` and hands its number out.
fn install_as(file: OpenFile, fd: sys::Fd) -> Result<i32, Errno> {
    let (dev, ino, _, _) = sys::fstat(fd.raw())?;
    let n = fd.into_raw();
    let replaced = table().insert(n, Entry { file: Arc::new(file), dev, ino, pid: sys::getpid() });
    drop(replaced);
    Ok(n)
}

/// Longest path the hooks need to recognise.
const PATH_MAX_OURS: usize = 64;

/// The NUL-terminated path at `path` if it is short enough to be one of
/// ours (never faults: an unreadable path is not ours, and the next
/// definition reports EFAULT for it).
fn short_path(path: u64) -> Option<String> {
    let mut b = [0u8; PATH_MAX_OURS];
    let n = sys::read_mem(path, &mut b);
    let end = b[..n].iter().position(|&c| c == 0)?;
    String::from_utf8(b[..end].to_vec()).ok()
}

/// `open` and friends: `/dev/iommu`, and the fail-nth files.
pub fn open(path: u64, flags: i32) -> Hook {
    let Some(p) = short_path(path) else { return Hook::Pass };
    if p == "/dev/iommu" {
        return Hook::Done(faultinj::point().and_then(|()| open_iommufd(flags)).map(i64::from));
    }
    if let Some(tid) = faultinj::fail_nth_path(&p) {
        return Hook::Done(install_opened(OpenFile::FailNth { tid }, flags).map(i64::from));
    }
    Hook::Pass
}

/// `opendir`: the directory to open instead of `path`, if any.
pub fn opendir(path: u64) -> Option<std::ffi::CString> {
    let p = short_path(path)?;
    if faultinj::is_debugfs(&p) { faultinj::debugfs_dir() } else { None }
}

/// A new context and a descriptor for it (`flags` as given to `open`).
pub fn open_iommufd(flags: i32) -> Result<i32, Errno> {
    let mem = memory()?;
    let limit = mem.pin_limit_pages();
    let ictx = Arc::new(Ictx::new(mem, limit));
    if limit != u64::MAX {
        // Charged per process or per user across contexts, as Linux
        // charges (without CAP_IPC_LOCK; with it nothing is charged).
        ictx.accounting()
            .share_with(crate::charge::ProcessCharge::current())
            .expect("a new context has nothing pinned and no charger");
    }
    install_opened(OpenFile::Iommufd(ictx), flags)
}

/// `ioctl` on a descriptor.
pub fn ioctl(fd: i32, request: u64, arg: u64) -> Hook {
    let file = match target(fd) {
        Ok(f) => f,
        Err(h) => return h,
    };
    // The kernel takes the command as a 32-bit number.
    let cmd = request as u32;
    let r = match &*file {
        OpenFile::Iommufd(ictx) => {
            let r = faultinj::with_plan(ictx, || {
                if uapi::in_iommufd_range(cmd) { command(ictx, cmd, arg) } else { vfio::vfio_ioctl(ictx, cmd, arg) }
            });
            refresh_faults(ictx);
            r
        }
        // None has an ioctl in Linux.
        OpenFile::Fault { .. } | OpenFile::Access { .. } | OpenFile::FailNth { .. } => Err(Errno::ENOTTY),
    };
    if tracing() {
        let name = uapi::command_name(cmd).unwrap_or("?");
        eprintln!("portcullis: ioctl({fd}, {name} {cmd:#x}, {arg:#x}) = {r:?}");
    }
    Hook::Done(r)
}

/// Whether `PORTCULLIS_TRACE` is set: every ioctl on a Portcullis
/// descriptor is then logged to stderr with its result.
fn tracing() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PORTCULLIS_TRACE").is_some())
}

/// The file behind `fd` for a `read` or `write` (`write`), or with
/// `offset` a `pread` or `pwrite`, once Linux's VFS checks in their order
/// pass (`ksys_pread64`, `vfs_read`): a negative offset is `EINVAL`; fault
/// queues and accesses (anonymous files, never positioned) are `ESPIPE`
/// for the positioned calls; a descriptor not open for reading (writing)
/// is `EBADF`. What is left for the caller: a context (`/dev/iommu`, a
/// character device without read or write) is `EINVAL`.
fn io_target(fd: i32, write: bool, offset: Option<i64>) -> Result<Arc<OpenFile>, Hook> {
    let file = target(fd)?;
    let refuse = |e| Err(Hook::Done(Err(e)));
    if let Some(off) = offset {
        if off < 0 {
            return refuse(Errno::EINVAL);
        }
        if matches!(&*file, OpenFile::Fault { .. } | OpenFile::Access { .. }) {
            return refuse(Errno::ESPIPE);
        }
    }
    match check_mode(fd, write) {
        Ok(()) => Ok(file),
        Err(e) => refuse(e),
    }
}

/// `read` on a descriptor: fault queues give records (see [`io_target`]).
pub fn read(fd: i32, buf: u64, count: usize) -> Hook {
    let file = match io_target(fd, false, None) {
        Ok(f) => f,
        Err(h) => return h,
    };
    Hook::Done(match &*file {
        OpenFile::Fault { ictx, fd, .. } => {
            let r = ictx.fault_fd_read_user(*fd, buf, count).map(|n| n as i64);
            file.refresh();
            r
        }
        // The count is short: read from the start every time.
        OpenFile::FailNth { tid } => faultinj::read(*tid, buf, count, 0),
        _ => Err(Errno::EINVAL),
    })
}

/// `write` on a descriptor: fault queues take responses.
pub fn write(fd: i32, buf: u64, count: usize) -> Hook {
    let file = match io_target(fd, true, None) {
        Ok(f) => f,
        Err(h) => return h,
    };
    Hook::Done(match &*file {
        OpenFile::Fault { ictx, fd, .. } => {
            let r = ictx.fault_fd_write_user(*fd, buf, count).map(|n| n as i64);
            file.refresh();
            r
        }
        OpenFile::FailNth { tid } => faultinj::write(*tid, buf, count),
        _ => Err(Errno::EINVAL),
    })
}

/// `pread` on a descriptor: the fail-nth files read from the offset.
pub fn pread(fd: i32, buf: u64, count: usize, offset: i64) -> Hook {
    let file = match io_target(fd, false, Some(offset)) {
        Ok(f) => f,
        Err(h) => return h,
    };
    Hook::Done(match &*file {
        OpenFile::FailNth { tid } => faultinj::read(*tid, buf, count, offset as u64),
        _ => Err(Errno::EINVAL),
    })
}

/// `pwrite` on a descriptor (see [`pread`]).
pub fn pwrite(fd: i32, buf: u64, count: usize, offset: i64) -> Hook {
    let file = match io_target(fd, true, Some(offset)) {
        Ok(f) => f,
        Err(h) => return h,
    };
    Hook::Done(match &*file {
        OpenFile::FailNth { tid } => faultinj::write(*tid, buf, count),
        _ => Err(Errno::EINVAL),
    })
}

/// Offsets in `struct iommu_test_cmd` and `struct iommu_fault_alloc`.
const TEST_CMD_OP: usize = 4;
const TEST_CMD_ID: usize = 8;
const TEST_CMD_PAYLOAD: usize = 16;
const FAULT_ALLOC_OUT_ID: usize = 8;
const FAULT_ALLOC_OUT_FD: usize = 12;

/// Largest chunk of a caller's oversized struct tail scanned at once.
const TAIL_CHUNK: usize = 4096;

fn get_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    if let Some(d) = b.get_mut(at..at + 4) {
        d.copy_from_slice(&v.to_le_bytes());
    }
}

/// One iommufd command: Linux 6.12's generic path (`iommufd_fops_ioctl`,
/// see `iommufd::uapi::rules`) done against the caller's memory with
/// bounded reads, then the dispatcher on a kernel-sized copy, then the
/// bytes the dispatcher changed written back.
fn command(ictx: &Arc<Ictx>, cmd: u32, arg: u64) -> Result<i64, Errno> {
    let mut size = [0u8; 4];
    if sys::read_mem(arg, &mut size) != 4 {
        return Err(Errno::EFAULT);
    }
    let size = u32::from_le_bytes(size) as u64;
    let info = uapi::command_info(cmd).ok_or(Errno::ENOTTY)?;
    if size < info.min_size as u64 {
        return Err(Errno::EINVAL);
    }
    let ksize = info.struct_size as u64;
    if size > ksize {
        // The tail must be readable and zero; the first non-zero byte or
        // fault decides, a bounded chunk at a time.
        let mut at = ksize;
        let mut chunk = [0u8; TAIL_CHUNK];
        while at < size {
            let n = (size - at).min(TAIL_CHUNK as u64) as usize;
            let addr = arg.checked_add(at).ok_or(Errno::EFAULT)?;
            let got = sys::read_mem(addr, &mut chunk[..n]);
            if chunk[..got].iter().any(|&b| b != 0) {
                return Err(Errno::E2BIG);
            }
            if got < n {
                return Err(Errno::EFAULT);
            }
            at += n as u64;
        }
    }
    let n = size.min(ksize) as usize;
    let mut buf = vec![0u8; n];
    if sys::read_mem(arg, &mut buf) != n {
        return Err(Errno::EFAULT);
    }
    // What the caller has; the answer is written back as the bytes that
    // differ from it.
    let user = buf.clone();
    // The tail is checked: hand the dispatcher a struct-sized copy (the
    // answer it writes back is min(size, struct size) bytes either way).
    if size > ksize {
        put_u32(&mut buf, 0, ksize as u32);
    }
    if cmd == IOMMU_TEST_CMD {
        translate_access_id(ictx, &mut buf);
    }
    if cmd == uapi::IOMMU_OPTION && needs_sys_resource(&buf) {
        return Err(Errno::EPERM);
    }
    let r = dispatch::ioctl(ictx, cmd, &mut buf);
    // The fields rewritten on the way in go back as the caller had them.
    buf[..4].copy_from_slice(&user[..4]);
    if cmd == IOMMU_TEST_CMD
        && let Some(orig) = user.get(TEST_CMD_ID..TEST_CMD_ID + 4)
    {
        buf[TEST_CMD_ID..TEST_CMD_ID + 4].copy_from_slice(orig);
    }
    // A new fault queue or access gets a real descriptor.
    let mut installed: Option<i32> = None;
    if r.is_ok() {
        // (where the number goes, the core's number, the fault id if a queue)
        let created = if cmd == IOMMU_FAULT_QUEUE_ALLOC {
            match (get_u32(&buf, FAULT_ALLOC_OUT_ID), get_u32(&buf, FAULT_ALLOC_OUT_FD)) {
                (Some(id), Some(fd)) => Some((FAULT_ALLOC_OUT_FD, fd, Some(id))),
                _ => None,
            }
        } else if cmd == IOMMU_TEST_CMD
            && get_u32(&buf, TEST_CMD_OP) == Some(uapi::IOMMU_TEST_OP_CREATE_ACCESS)
            && buf.len() >= TEST_CMD_PAYLOAD + 4
        {
            get_u32(&buf, TEST_CMD_PAYLOAD).map(|fd| (TEST_CMD_PAYLOAD, fd, None))
        } else {
            None
        };
        if let Some((at, core_fd, fault)) = created {
            // Linux installs these descriptors O_CLOEXEC. On failure the
            // file's Drop closes what the core made.
            let fd = match fault {
                Some(id) => install_fault(ictx, core_fd, id)?,
                None => install(OpenFile::Access { ictx: ictx.clone(), fd: core_fd }, true)?,
            };
            put_u32(&mut buf, at, fd as u32);
            installed = Some(fd);
        }
    }
    // Write back only what changed (Linux writes only its answer).
    if let Some(first) = buf.iter().zip(&user).position(|(a, b)| a != b) {
        let last = buf.iter().zip(&user).rposition(|(a, b)| a != b).unwrap_or(first);
        let addr = arg.checked_add(first as u64).ok_or(Errno::EFAULT)?;
        if sys::write_mem(addr, &buf[first..=last]) != last + 1 - first {
            // Linux aborts a new object whose answer cannot be written.
            if let Some(fd) = installed {
                drop(forget(fd));
                sys::close_raw(fd);
            }
            return Err(Errno::EFAULT);
        }
    }
    r.map(|()| 0)
}

/// `CAP_SYS_RESOURCE`'s bit number (`linux/capability.h`).
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether `IOMMU_OPTION` (its kernel copy in `buf`) sets the
/// RLIMIT_MODE without `CAP_SYS_RESOURCE`: Linux 6.12's
/// `iommufd_option_rlimit_mode` answers `EPERM` after the reserved field,
/// the object id and the op are checked, before looking at the objects.
/// The core has no notion of capabilities; the process's are checked here.
fn needs_sys_resource(buf: &[u8]) -> bool {
    if buf.len() < uapi::IommuOption::SIZE {
        return false;
    }
    let c = uapi::IommuOption::read(buf);
    c.__reserved == 0
        && c.option_id == uapi::IOMMU_OPTION_RLIMIT_MODE
        && c.object_id == 0
        && c.op == uapi::IOMMU_OPTION_OP_SET
        && !crate::memory::has_cap(CAP_SYS_RESOURCE)
}

/// The selftest commands that name an access take the application's
/// descriptor; the core knows its own number for it.
fn translate_access_id(ictx: &Arc<Ictx>, buf: &mut [u8]) {
    let Some(op) = get_u32(buf, TEST_CMD_OP) else { return };
    if !matches!(
        op,
        uapi::IOMMU_TEST_OP_ACCESS_PAGES
            | uapi::IOMMU_TEST_OP_DESTROY_ACCESS_PAGES
            | uapi::IOMMU_TEST_OP_ACCESS_RW
            | uapi::IOMMU_TEST_OP_ACCESS_REPLACE_IOAS
    ) {
        return;
    }
    let Some(id) = get_u32(buf, TEST_CMD_ID) else { return };
    // Not an access of this context: a number the core never hands out
    // (its numbers start at 3), so it answers as for a wrong descriptor.
    let core = match lookup(id as i32) {
        Some(Ok(f)) => match &*f {
            OpenFile::Access { ictx: c, fd } if Arc::ptr_eq(c, ictx) => *fd,
            _ => 0,
        },
        _ => 0,
    };
    put_u32(buf, TEST_CMD_ID, core);
}
