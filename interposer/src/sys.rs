//! Every `unsafe` of the interposer: the exported C entry points, the
//! calls to the next definition of each symbol (`dlsym(RTLD_NEXT)`), and
//! thin wrappers over the system calls the safe modules use.
//!
//! Rules of this module:
//! - The exported functions never dereference a caller's pointer. What
//!   they need from the caller's memory they read with [`read_mem`]
//!   (`process_vm_readv` on the own process), which reports a fault as a
//!   short count instead of crashing; pointers they do not need go to the
//!   next definition unchanged.
//! - The variadic C functions (`open`, `openat`, `ioctl`, `fcntl`) are
//!   defined with their optional argument as a plain third or fourth
//!   parameter: stable Rust cannot define a variadic function, and on the
//!   Linux ABIs this crate builds for (x86-64 System V, AArch64 AAPCS64)
//!   a variadic integer or pointer argument travels in the same register
//!   as a named one. The value is read only when the call has it (`mode`
//!   only with `O_CREAT` or `O_TMPFILE`, as the C library itself does).
//! - Our own descriptors are closed and duplicated with raw system calls,
//!   not through the exported hooks, so no table lock is ever taken
//!   re-entrantly.

#![allow(unsafe_code)]

use crate::shim::{self, Hook};
use iommufd::Errno;
use libc::{DIR, c_char, c_int, c_long, c_uint, c_ulong, c_void, off_t, size_t, ssize_t};
use std::ffi::CStr;
use std::sync::atomic::{AtomicUsize, Ordering};

#[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"))))]
compile_error!("the interposer relies on the Linux x86-64 / AArch64 calling convention for variadic arguments");

// ---------------------------------------------------------------------
// The next definitions.

/// A lazily resolved `dlsym(RTLD_NEXT, name)`.
struct Next {
    name: &'static CStr,
    addr: AtomicUsize,
}

impl Next {
    const fn new(name: &'static CStr) -> Self {
        Self { name, addr: AtomicUsize::new(0) }
    }

    /// The address of the next definition; aborts the process when there
    /// is none (the C library always defines these names, so this means
    /// the library was loaded into something that is not a C program).
    fn get(&self) -> usize {
        let a = self.addr.load(Ordering::Acquire);
        if a != 0 {
            return a;
        }
        // SAFETY: `name` is a NUL-terminated static string; dlsym with
        // RTLD_NEXT only reads it and returns an address or null.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) } as usize;
        if p == 0 {
            // Nothing sensible can be returned to a caller of `open` when
            // the C library has no `open`.
            std::process::abort();
        }
        self.addr.store(p, Ordering::Release);
        p
    }
}

static NEXT_OPEN: Next = Next::new(c"open");
static NEXT_OPEN64: Next = Next::new(c"open64");
static NEXT_OPENAT: Next = Next::new(c"openat");
static NEXT_OPENAT64: Next = Next::new(c"openat64");
static NEXT_OPEN_2: Next = Next::new(c"__open_2");
static NEXT_OPEN64_2: Next = Next::new(c"__open64_2");
static NEXT_IOCTL: Next = Next::new(c"ioctl");
static NEXT_CLOSE: Next = Next::new(c"close");
static NEXT_DUP: Next = Next::new(c"dup");
static NEXT_DUP2: Next = Next::new(c"dup2");
static NEXT_DUP3: Next = Next::new(c"dup3");
static NEXT_FCNTL: Next = Next::new(c"fcntl");
static NEXT_FCNTL64: Next = Next::new(c"fcntl64");
static NEXT_READ: Next = Next::new(c"read");
static NEXT_READ_CHK: Next = Next::new(c"__read_chk");
static NEXT_WRITE: Next = Next::new(c"write");
static NEXT_PREAD: Next = Next::new(c"pread");
static NEXT_PREAD64: Next = Next::new(c"pread64");
static NEXT_PWRITE: Next = Next::new(c"pwrite");
static NEXT_PWRITE64: Next = Next::new(c"pwrite64");
static NEXT_OPENDIR: Next = Next::new(c"opendir");
static NEXT_CLOSE_RANGE: Next = Next::new(c"close_range");
static NEXT_CLOSEFROM: Next = Next::new(c"closefrom");

type OpenFn = unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
type Open2Fn = unsafe extern "C" fn(*const c_char, c_int) -> c_int;
type OpenatFn = unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int;
type IoctlFn = unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;
type FcntlFn = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
type Fd1Fn = unsafe extern "C" fn(c_int) -> c_int;
type Fd2Fn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type Fd3Fn = unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
type ReadFn = unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t;
type ReadChkFn = unsafe extern "C" fn(c_int, *mut c_void, size_t, size_t) -> ssize_t;
type WriteFn = unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t;
type PreadFn = unsafe extern "C" fn(c_int, *mut c_void, size_t, off_t) -> ssize_t;
type PwriteFn = unsafe extern "C" fn(c_int, *const c_void, size_t, off_t) -> ssize_t;
type OpendirFn = unsafe extern "C" fn(*const c_char) -> *mut DIR;
type CloseRangeFn = unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int;
type CloseFromFn = unsafe extern "C" fn(c_int);

macro_rules! next_fn {
    ($next:expr, $ty:ty) => {{
        let a = $next.get();
        // SAFETY: `a` is the non-null address dlsym returned for this
        // C library function, whose C prototype `$ty` spells.
        unsafe { core::mem::transmute::<usize, $ty>(a) }
    }};
}

// ---------------------------------------------------------------------
// errno and return values.

/// Sets the calling thread's `errno`.
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location returns the calling thread's errno slot,
    // valid for the thread's lifetime.
    unsafe { *libc::__errno_location() = e };
}

fn errno() -> i32 {
    // SAFETY: as in `set_errno`.
    unsafe { *libc::__errno_location() }
}

fn to_errno(e: Errno) -> i32 {
    e.0
}

/// The C return value of a hooked call: the value, or -1 with `errno`.
fn ret_int(r: Result<i64, Errno>) -> c_int {
    match r {
        Ok(v) => v as c_int,
        Err(e) => {
            set_errno(to_errno(e));
            -1
        }
    }
}

fn ret_ssize(r: Result<i64, Errno>) -> ssize_t {
    match r {
        Ok(v) => v as ssize_t,
        Err(e) => {
            set_errno(to_errno(e));
            -1
        }
    }
}

/// `mode` of an open call: only present with `O_CREAT` or `O_TMPFILE`.
fn mode_of(flags: c_int, mode: c_uint) -> c_uint {
    if flags & libc::O_CREAT != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE { mode } else { 0 }
}

// ---------------------------------------------------------------------
// The exported entry points.

/// `open(2)`: `/dev/iommu` opens a Portcullis context.
///
/// # Safety
/// The C contract of `open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    match shim::open(path as u64, flags) {
        Hook::Done(r) => ret_int(r),
        Hook::Pass => {
            let f = next_fn!(NEXT_OPEN, OpenFn);
            // SAFETY: forwarding the caller's arguments unchanged; `mode`
            // only when the call carries one.
            unsafe { f(path, flags, mode_of(flags, mode)) }
        }
    }
}

/// `open64`: as [`open`].
///
/// # Safety
/// The C contract of `open64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    match shim::open(path as u64, flags) {
        Hook::Done(r) => ret_int(r),
        Hook::Pass => {
            let f = next_fn!(NEXT_OPEN64, OpenFn);
            // SAFETY: forwarding the caller's arguments unchanged.
            unsafe { f(path, flags, mode_of(flags, mode)) }
        }
    }
}

/// `__open_2` (the fortified `open` without a mode).
///
/// # Safety
/// The C contract of `__open_2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    match shim::open(path as u64, flags) {
        Hook::Done(r) => ret_int(r),
        Hook::Pass => {
            let f = next_fn!(NEXT_OPEN_2, Open2Fn);
            // SAFETY: forwarding the caller's arguments unchanged.
            unsafe { f(path, flags) }
        }
    }
}

/// `__open64_2` (the fortified `open64` without a mode).
///
/// # Safety
/// The C contract of `__open64_2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    match shim::open(path as u64, flags) {
        Hook::Done(r) => ret_int(r),
        Hook::Pass => {
            let f = next_fn!(NEXT_OPEN64_2, Open2Fn);
            // SAFETY: forwarding the caller's arguments unchanged.
            unsafe { f(path, flags) }
        }
    }
}

/// `openat(2)`: an absolute `/dev/iommu` opens a Portcullis context
/// (the directory descriptor does not matter for an absolute path).
///
/// # Safety
/// The C contract of `openat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat(dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    match shim::open(path as u64, flags) {
        Hook::Done(r) => ret_int(r),
        Hook::Pass => {
            let f = next_fn!(NEXT_OPENAT, OpenatFn);
            // SAFETY: forwarding the caller's arguments unchanged.
            unsafe { f(dirfd, path, flags, mode_of(flags, mode)) }
        }
    }
}

/// `openat64`: as [`openat`].
///
/// # Safety
/// The C contract of `openat64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat64(dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    match shim::open(path as u64, flags) {
        Hook::Done(r) => ret_int(r),
        Hook::Pass => {
            let f = next_fn!(NEXT_OPENAT64, OpenatFn);
            // SAFETY: forwarding the caller's arguments unchanged.
            unsafe { f(dirfd, path, flags, mode_of(flags, mode)) }
        }
    }
}

/// `ioctl(2)`: commands on a Portcullis descriptor go to the dispatcher.
///
/// # Safety
/// The C contract of `ioctl`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    match shim::ioctl(fd, request, arg as u64) {
        Hook::Done(r) => ret_int(r),
        Hook::Pass => {
            let f = next_fn!(NEXT_IOCTL, IoctlFn);
            // SAFETY: forwarding the caller's arguments unchanged.
            unsafe { f(fd, request, arg) }
        }
    }
}

/// `close(2)`: the last close of a Portcullis descriptor closes what it
/// names (the context, a fault queue, a selftest access).
///
/// # Safety
/// The C contract of `close`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    let f = next_fn!(NEXT_CLOSE, Fd1Fn);
    let taken = shim::forget(fd);
    // SAFETY: forwarding the caller's argument unchanged.
    let r = unsafe { f(fd) };
    let e = errno();
    // The entry goes after the descriptor is closed; dropping it may run
    // the core's close, which must not disturb the caller's errno.
    drop(taken);
    set_errno(e);
    r
}

/// `close_range(2)`: the Portcullis descriptors in the range close too
/// (with `CLOSE_RANGE_CLOEXEC` they only become close-on-exec, and stay).
///
/// # Safety
/// The C contract of `close_range`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let f = next_fn!(NEXT_CLOSE_RANGE, CloseRangeFn);
    // SAFETY: forwarding the caller's arguments unchanged.
    let r = unsafe { f(first, last, flags) };
    if r == 0 && flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
        let e = errno();
        drop(shim::forget_range(first, last));
        set_errno(e);
    }
    r
}

/// `closefrom(3)`: as [`close_range`] from `low` up.
///
/// # Safety
/// The C contract of `closefrom`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn closefrom(low: c_int) {
    let f = next_fn!(NEXT_CLOSEFROM, CloseFromFn);
    // SAFETY: forwarding the caller's argument unchanged.
    unsafe { f(low) };
    let e = errno();
    drop(shim::forget_range(low.max(0) as c_uint, c_uint::MAX));
    set_errno(e);
}

/// `dup(2)`.
///
/// # Safety
/// The C contract of `dup`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    let f = next_fn!(NEXT_DUP, Fd1Fn);
    // SAFETY: forwarding the caller's argument unchanged.
    let new = unsafe { f(fd) };
    if new >= 0 {
        shim::duplicated(fd, new);
    }
    new
}

/// `dup2(2)`.
///
/// # Safety
/// The C contract of `dup2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    let f = next_fn!(NEXT_DUP2, Fd2Fn);
    // SAFETY: forwarding the caller's arguments unchanged.
    let r = unsafe { f(old, new) };
    if r >= 0 && old != new {
        let e = errno();
        drop(shim::forget(new));
        shim::duplicated(old, new);
        set_errno(e);
    }
    r
}

/// `dup3(2)`.
///
/// # Safety
/// The C contract of `dup3`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    let f = next_fn!(NEXT_DUP3, Fd3Fn);
    // SAFETY: forwarding the caller's arguments unchanged.
    let r = unsafe { f(old, new, flags) };
    if r >= 0 {
        let e = errno();
        drop(shim::forget(new));
        shim::duplicated(old, new);
        set_errno(e);
    }
    r
}

fn fcntl_common(next: &Next, fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let f = next_fn!(next, FcntlFn);
    // SAFETY: forwarding the caller's arguments unchanged. Every fcntl
    // command takes at most one integer or pointer argument, which
    // travels in the register `arg` was read from.
    let r = unsafe { f(fd, cmd, arg) };
    if r >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) {
        shim::duplicated(fd, r);
    }
    r
}

/// `fcntl(2)`: `F_DUPFD` and `F_DUPFD_CLOEXEC` duplicate a Portcullis
/// descriptor; every other command passes through.
///
/// # Safety
/// The C contract of `fcntl`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    fcntl_common(&NEXT_FCNTL, fd, cmd, arg)
}

/// `fcntl64`: as [`fcntl`].
///
/// # Safety
/// The C contract of `fcntl64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    fcntl_common(&NEXT_FCNTL64, fd, cmd, arg)
}

/// `read(2)`: a fault-queue descriptor gives its fault records.
///
/// # Safety
/// The C contract of `read`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, count: size_t) -> ssize_t {
    match shim::read(fd, buf as u64, count) {
        Hook::Done(r) => ret_ssize(r),
        Hook::Pass => {
            let f = next_fn!(NEXT_READ, ReadFn);
            // SAFETY: forwarding the caller's arguments unchanged.
            unsafe { f(fd, buf, count) }
        }
    }
}

/// `__read_chk` (the fortified `read`).
///
/// # Safety
/// The C contract of `__read_chk`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __read_chk(fd: c_int, buf: *mut c_void, count: size_t, buflen: size_t) -> ssize_t {
    if count <= buflen
        && let Hook::Done(r) = shim::read(fd, buf as u64, count)
    {
        return ret_ssize(r);
    }
    let f = next_fn!(NEXT_READ_CHK, ReadChkFn);
    // SAFETY: forwarding the caller's arguments unchanged (the C library
    // reports the overflow when count > buflen).
    unsafe { f(fd, buf, count, buflen) }
}

/// `write(2)`: a fault-queue descriptor takes page responses.
///
/// # Safety
/// The C contract of `write`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    match shim::write(fd, buf as u64, count) {
        Hook::Done(r) => ret_ssize(r),
        Hook::Pass => {
            let f = next_fn!(NEXT_WRITE, WriteFn);
            // SAFETY: forwarding the caller's arguments unchanged.
            unsafe { f(fd, buf, count) }
        }
    }
}

fn pread_common(next: &Next, fd: c_int, buf: *mut c_void, count: size_t, offset: off_t) -> ssize_t {
    match shim::pread(fd, buf as u64, count, offset) {
        Hook::Done(r) => ret_ssize(r),
        Hook::Pass => {
            let f = next_fn!(next, PreadFn);
            // SAFETY: forwarding the caller's arguments unchanged.
            unsafe { f(fd, buf, count, offset) }
        }
    }
}

fn pwrite_common(next: &Next, fd: c_int, buf: *const c_void, count: size_t, offset: off_t) -> ssize_t {
    match shim::pwrite(fd, buf as u64, count, offset) {
        Hook::Done(r) => ret_ssize(r),
        Hook::Pass => {
            let f = next_fn!(next, PwriteFn);
            // SAFETY: forwarding the caller's arguments unchanged.
            unsafe { f(fd, buf, count, offset) }
        }
    }
}

/// `pread(2)`: the fail-nth files.
///
/// # Safety
/// The C contract of `pread`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pread(fd: c_int, buf: *mut c_void, count: size_t, offset: off_t) -> ssize_t {
    pread_common(&NEXT_PREAD, fd, buf, count, offset)
}

/// `pread64`: as [`pread`].
///
/// # Safety
/// The C contract of `pread64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pread64(fd: c_int, buf: *mut c_void, count: size_t, offset: off_t) -> ssize_t {
    pread_common(&NEXT_PREAD64, fd, buf, count, offset)
}

/// `pwrite(2)`: the fail-nth files.
///
/// # Safety
/// The C contract of `pwrite`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite(fd: c_int, buf: *const c_void, count: size_t, offset: off_t) -> ssize_t {
    pwrite_common(&NEXT_PWRITE, fd, buf, count, offset)
}

/// `pwrite64`: as [`pwrite`].
///
/// # Safety
/// The C contract of `pwrite64`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite64(fd: c_int, buf: *const c_void, count: size_t, offset: off_t) -> ssize_t {
    pwrite_common(&NEXT_PWRITE64, fd, buf, count, offset)
}

/// `opendir(3)`: `/sys/kernel/debug` is the library's fault-injection
/// settings directory (see [`crate::faultinj`]).
///
/// # Safety
/// The C contract of `opendir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn opendir(name: *const c_char) -> *mut DIR {
    let f = next_fn!(NEXT_OPENDIR, OpendirFn);
    match shim::opendir(name as u64) {
        // SAFETY: a NUL-terminated path we own, alive across the call.
        Some(ours) => unsafe { f(ours.as_ptr()) },
        // SAFETY: forwarding the caller's argument unchanged.
        None => unsafe { f(name) },
    }
}

// ---------------------------------------------------------------------
// Safe wrappers for the other modules.

fn check(r: c_long) -> Result<i64, Errno> {
    if r < 0 { Err(Errno(errno())) } else { Ok(r) }
}

/// Runs `f` when the process exits normally (`atexit`); false when the
/// C library has no room for it.
pub fn at_exit(f: extern "C" fn()) -> bool {
    // SAFETY: `f` is a plain function with no arguments, callable at any
    // time, as atexit requires.
    unsafe { libc::atexit(f) == 0 }
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The process id.
pub fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// Copies from the own address space at `addr` into `buf` without
/// touching the memory directly: returns how many bytes were readable
/// (a fault ends the copy early, it never crashes).
pub fn read_mem(addr: u64, buf: &mut [u8]) -> usize {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let local = libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() };
        let remote = libc::iovec { iov_base: addr.wrapping_add(done as u64) as *mut c_void, iov_len: rest.len() };
        // SAFETY: the local iovec covers `rest`, which we own mutably; the
        // remote one is only an address the kernel checks, reporting an
        // unmapped one as EFAULT or a short count.
        let n = unsafe { libc::process_vm_readv(getpid(), &local, 1, &remote, 1, 0) };
        if n <= 0 {
            break;
        }
        done += n as usize;
    }
    done
}

/// Copies `buf` into the own address space at `addr` (see [`read_mem`]):
/// returns how many bytes were written before a fault.
pub fn write_mem(addr: u64, buf: &[u8]) -> usize {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &buf[done..];
        let local = libc::iovec { iov_base: rest.as_ptr() as *mut c_void, iov_len: rest.len() };
        let remote = libc::iovec { iov_base: addr.wrapping_add(done as u64) as *mut c_void, iov_len: rest.len() };
        // SAFETY: the local iovec covers `rest` (only read); the remote
        // one is an address the kernel checks. Writing through it changes
        // memory of this process that no Rust reference of this library
        // covers: it is the caller's uAPI buffer, which the C caller
        // handed over for the kernel to write, as the real ioctl would.
        let n = unsafe { libc::process_vm_writev(getpid(), &local, 1, &remote, 1, 0) };
        if n <= 0 {
            break;
        }
        done += n as usize;
    }
    done
}

/// An owned descriptor of this library (closed with a raw `close` system
/// call when dropped, not through the hooks).
#[derive(Debug)]
pub struct Fd(i32);

impl Fd {
    /// The descriptor number.
    pub fn raw(&self) -> i32 {
        self.0
    }

    /// Gives the number up without closing it (it now belongs to the
    /// application).
    pub fn into_raw(self) -> i32 {
        let n = self.0;
        core::mem::forget(self);
        n
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closing a descriptor this value owns. An error (EINTR,
        // EIO) leaves nothing to undo: the number is released either way.
        unsafe { libc::syscall(libc::SYS_close, self.0 as c_long) };
    }
}

impl From<std::os::fd::OwnedFd> for Fd {
    fn from(f: std::os::fd::OwnedFd) -> Self {
        use std::os::fd::IntoRawFd;
        Fd(f.into_raw_fd())
    }
}

/// A connected pair of `AF_UNIX` stream sockets, close-on-exec.
pub fn socketpair() -> Result<(Fd, Fd), Errno> {
    let mut sv = [0 as c_int; 2];
    // SAFETY: `sv` is a writable array of the two ints socketpair fills.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) };
    check(r as c_long)?;
    Ok((Fd(sv[0]), Fd(sv[1])))
}

/// Sends one byte on a socket without blocking; whether it went.
pub fn send_byte(fd: &Fd) -> bool {
    let b = [1u8];
    // SAFETY: `b` is a readable one-byte buffer.
    unsafe { libc::send(fd.0, b.as_ptr().cast(), 1, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) == 1 }
}

/// Receives one byte from a socket without blocking; whether one came.
pub fn recv_byte(fd: &Fd) -> bool {
    let mut b = [0u8];
    // SAFETY: `b` is a writable one-byte buffer.
    unsafe { libc::recv(fd.0, b.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT) == 1 }
}

/// Closes `fd` with a raw system call (a descriptor this library made
/// and never handed out).
pub fn close_raw(fd: i32) {
    drop(Fd(fd));
}

/// `memfd_create(name, MFD_CLOEXEC?)`.
pub fn memfd_create(name: &CStr, cloexec: bool) -> Result<Fd, Errno> {
    let flags = if cloexec { libc::MFD_CLOEXEC } else { 0 };
    // SAFETY: `name` is NUL-terminated; memfd_create only reads it.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    check(fd as c_long).map(|_| Fd(fd))
}

/// A new open file of what `fd` names, opened again through
/// `/proc/self/fd` with `flags` (`O_RDONLY` or `O_WRONLY`, maybe
/// `O_CLOEXEC`), as a raw system call: its own access mode, which `F_GETFL`
/// reports and the kernel enforces.
pub fn reopen(fd: &Fd, flags: i32) -> Result<Fd, Errno> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.0)).map_err(|_| Errno::EINVAL)?;
    // SAFETY: `path` is NUL-terminated and outlives the call, which only
    // reads it.
    let r = unsafe {
        libc::syscall(libc::SYS_openat, libc::AT_FDCWD as c_long, path.as_ptr(), flags as c_long, 0 as c_long)
    };
    check(r).map(|n| Fd(n as i32))
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, 0)` as a raw system call: a private
/// duplicate (a hold on the open file).
pub fn dup_private(fd: i32) -> Result<Fd, Errno> {
    // SAFETY: fcntl F_DUPFD_CLOEXEC takes an integer and touches no memory.
    let r = unsafe { libc::syscall(libc::SYS_fcntl, fd as c_long, libc::F_DUPFD_CLOEXEC as c_long, 0 as c_long) };
    check(r).map(|n| Fd(n as i32))
}

/// `fcntl(fd, cmd)` for the integer-returning queries (`F_GETFL`,
/// `F_GET_SEALS`), as a raw system call.
pub fn fcntl_query(fd: i32, cmd: i32) -> Result<i64, Errno> {
    // SAFETY: these fcntl commands take no argument and touch no memory.
    check(unsafe { libc::syscall(libc::SYS_fcntl, fd as c_long, cmd as c_long, 0 as c_long) })
}

/// What `fstat` says about a descriptor: `(device, inode, size, mode)`.
pub fn fstat(fd: i32) -> Result<(u64, u64, u64, u32), Errno> {
    let mut st = core::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is a writable stat buffer of the right size.
    let r = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    check(r as c_long)?;
    // SAFETY: fstat succeeded, so it filled the buffer (and it was zeroed).
    let st = unsafe { st.assume_init() };
    Ok((st.st_dev, st.st_ino, st.st_size as u64, st.st_mode))
}

/// `pread` of up to `buf.len()` bytes; returns the count (short at the
/// end of the file).
pub fn read_at(fd: &Fd, off: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::pread(fd.0, rest.as_mut_ptr().cast(), rest.len(), (off + done as u64) as i64) };
        let n = check(n as c_long)?;
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// `pwrite` of all of `buf` at `off`.
pub fn write_at(fd: &Fd, off: u64, buf: &[u8]) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: `rest` is a readable buffer of `rest.len()` bytes.
        let n = unsafe { libc::pwrite(fd.0, rest.as_ptr().cast(), rest.len(), (off + done as u64) as i64) };
        let n = check(n as c_long)?;
        if n == 0 {
            return Err(Errno::EIO);
        }
        done += n as usize;
    }
    Ok(())
}

/// `ftruncate(fd, len)`.
pub fn ftruncate(fd: &Fd, len: u64) -> Result<(), Errno> {
    // SAFETY: no memory is touched.
    check(unsafe { libc::ftruncate(fd.0, len as i64) } as c_long).map(|_| ())
}

/// Frees the pages of `[off, off + len)` of a file (a hole reads zeroes).
pub fn punch_hole(fd: &Fd, off: u64, len: u64) -> Result<(), Errno> {
    // SAFETY: no memory is touched.
    let r = unsafe {
        libc::fallocate(fd.0, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off as i64, len as i64)
    };
    check(r as c_long).map(|_| ())
}

/// Replaces the pages of `[addr, addr + len)` of this process by a shared
/// mapping of `fd` from `off`, with protection `prot`
/// (`mmap(MAP_SHARED | MAP_FIXED)`).
///
/// The caller has copied the old contents to the file first, so the
/// memory reads the same before and after; what changes is that the
/// pages are now the file's. No Rust reference of this library points
/// into the range (it is application memory handed over by address).
pub fn map_shared_fixed(addr: u64, len: u64, prot: i32, fd: &Fd, off: u64) -> Result<(), Errno> {
    // SAFETY: see above; MAP_FIXED at a page-aligned application range
    // the caller has checked is mapped, backed by our own file.
    let p = unsafe {
        libc::mmap(addr as *mut c_void, len as usize, prot, libc::MAP_SHARED | libc::MAP_FIXED, fd.0, off as i64)
    };
    if p == libc::MAP_FAILED {
        return Err(Errno(errno()));
    }
    Ok(())
}

/// Replaces `[addr, addr + len)` of this process by fresh private
/// anonymous memory, readable and writable (`mmap(MAP_PRIVATE |
/// MAP_ANONYMOUS | MAP_FIXED)`). Used in a forked child on memory the
/// caller has just copied out (see `memory::privatize`).
pub fn map_anon_fixed(addr: u64, len: u64) -> Result<(), Errno> {
    // SAFETY: MAP_FIXED over an application range whose contents the
    // caller saved and writes back; no Rust reference of this library
    // points into it, and the child has only the calling thread.
    let p = unsafe {
        libc::mmap(
            addr as *mut c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Errno(errno()));
    }
    Ok(())
}

/// `mprotect(addr, len, prot)` of an application range.
pub fn protect(addr: u64, len: u64, prot: i32) -> Result<(), Errno> {
    // SAFETY: changes the protection of application memory to what its
    // mapping had before this library replaced it; no Rust reference of
    // this library points into it.
    check(unsafe { libc::mprotect(addr as *mut c_void, len as usize, prot) } as c_long).map(|_| ())
}

/// Registers `fork` handlers (`pthread_atfork`); false if the C library
/// refused.
pub fn at_fork(prepare: extern "C" fn(), parent: extern "C" fn(), child: extern "C" fn()) -> bool {
    // SAFETY: three plain functions without arguments, run by the C
    // library around fork in the forking thread.
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) == 0 }
}

/// `RLIMIT_MEMLOCK`'s soft limit in bytes (`None`: unlimited).
pub fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(r.rlim_cur)
}

/// `pwrite` of the own process's memory `[addr, addr + len)` to `fd` at
/// `off`: the kernel reads the memory (an unmapped or unreadable page
/// ends it with `EFAULT`, never a crash), so no buffer of this library is
/// written while it runs (see [`WriteFence`]).
pub fn write_at_from(fd: &Fd, off: u64, addr: u64, len: u64) -> Result<(), Errno> {
    let mut done = 0u64;
    while done < len {
        // SAFETY: the kernel only reads `[addr + done, addr + len)`, which
        // it checks itself: a bad address is EFAULT. No Rust reference is
        // involved.
        let n = unsafe {
            libc::syscall(
                libc::SYS_pwrite64,
                fd.0 as c_long,
                (addr + done) as c_long,
                (len - done) as c_long,
                (off + done) as c_long,
            )
        };
        match check(n)? {
            0 => return Err(Errno::EIO),
            n => done += n as u64,
        }
    }
    Ok(())
}

/// userfaultfd's uAPI (`linux/userfaultfd.h`), what [`WriteFence`] uses.
mod uffd {
    pub const API: u64 = 0xaa;
    pub const USER_MODE_ONLY: i32 = 1;
    pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
    pub const REGISTER_MODE_WP: u64 = 1 << 1;
    pub const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
    /// Bit of `uffdio_register.ioctls` saying the range takes
    /// `UFFDIO_WRITEPROTECT`.
    pub const HAS_WRITEPROTECT: u64 = 1 << 0x06;
    /// `_IOWR(0xAA, nr, size)`.
    const fn iowr(nr: u64, size: u64) -> u64 {
        (3 << 30) | (size << 16) | (0xaa << 8) | nr
    }
    pub const IOC_API: u64 = iowr(0x3f, 24);
    pub const IOC_REGISTER: u64 = iowr(0x00, 32);
    pub const IOC_WRITEPROTECT: u64 = iowr(0x06, 24);
    /// `_IOR(0xAA, 0x02, struct uffdio_range)`.
    pub const IOC_WAKE: u64 = (2 << 30) | (16 << 16) | (0xaa << 8) | 0x02;
}

/// Stalls other threads' stores to a range of this process while its
/// pages move into the store (`memory::move_range`): the range is
/// write-protected through a `userfaultfd` (`UFFDIO_WRITEPROTECT`), so a
/// thread storing to it waits in the kernel instead of writing a page
/// whose copy was already taken. Dropping the fence wakes the waiters,
/// and their stores then land in whatever maps the range: the store's
/// pages once they are mapped there, or the process's own pages again if
/// the move failed (write protection lifted first).
///
/// The moving thread itself must not store to the range while the fence
/// stands (it would wait for itself): [`WriteFence::new`] refuses a range
/// near the calling thread's stack, and the move copies with
/// [`write_at_from`] (the kernel reads the pages) and allocates nothing
/// until the fence is gone. Stores by the kernel on a thread's behalf
/// (a `read` into the range) wait too, or fail with `EFAULT` when the
/// process may only handle its own faults (`UFFD_USER_MODE_ONLY`, the
/// unprivileged case).
#[derive(Debug)]
pub struct WriteFence {
    uffd: Fd,
    start: u64,
    len: u64,
}

impl WriteFence {
    /// Write-protects `[start, start + len)` (page-aligned), or `None`
    /// when this kernel or sandbox offers no userfaultfd write protection
    /// for it (the move then runs unfenced, as it did before).
    pub fn new(start: u64, len: u64) -> Option<WriteFence> {
        // `PORTCULLIS_WRITE_FENCE=0`: never (a sandbox whose seccomp
        // filter kills a process that calls userfaultfd, rather than
        // refusing the call).
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *OFF.get_or_init(|| std::env::var_os("PORTCULLIS_WRITE_FENCE").is_some_and(|v| v == "0")) {
            return None;
        }
        let local = 0u8;
        let sp = core::ptr::addr_of!(local) as u64;
        const STACK_MARGIN: u64 = 1 << 20;
        if start < sp.saturating_add(STACK_MARGIN) && sp.saturating_sub(STACK_MARGIN) < start + len {
            return None;
        }
        let (uffd, unpopulated) = Self::open()?;
        if !unpopulated {
            // Each page read once, so that it is populated (the zero page
            // at worst) and the protection covers it.
            let mut byte = [0u8];
            for page in (start..start + len).step_by(4096) {
                read_mem(page, &mut byte);
            }
        }
        let fence = WriteFence { uffd, start, len };
        let mut reg = [start, len, uffd::REGISTER_MODE_WP, 0u64];
        fence.ioctl(uffd::IOC_REGISTER, reg.as_mut_ptr().cast()).ok()?;
        if reg[3] & uffd::HAS_WRITEPROTECT == 0 {
            return None;
        }
        let mut wp = [start, len, uffd::WRITEPROTECT_MODE_WP];
        fence.ioctl(uffd::IOC_WRITEPROTECT, wp.as_mut_ptr().cast()).ok()?;
        Some(fence)
    }

    /// A userfaultfd after the API handshake, with write protection of
    /// unpopulated pages and of shmem and hugetlb memory where the kernel
    /// has them (without the first, a page never touched before the fence
    /// could take a store unprotected: such pages are read in first).
    fn open() -> Option<(Fd, bool)> {
        let make = || -> Option<Fd> {
            for flags in [libc::O_CLOEXEC, libc::O_CLOEXEC | uffd::USER_MODE_ONLY] {
                // SAFETY: userfaultfd takes flags and touches no memory.
                let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as c_long) };
                if let Ok(n) = check(r) {
                    return Some(Fd(n as i32));
                }
            }
            None
        };
        let wanted = uffd::FEATURE_WP_UNPOPULATED | uffd::FEATURE_WP_HUGETLBFS_SHMEM;
        for features in [wanted, 0] {
            let fd = make()?;
            let mut api = [uffd::API, features, 0u64];
            // SAFETY: UFFDIO_API reads and writes the 24-byte struct
            // uffdio_api, which `api` is.
            let r =
                unsafe { libc::syscall(libc::SYS_ioctl, fd.0 as c_long, uffd::IOC_API as c_long, api.as_mut_ptr()) };
            if check(r).is_ok() {
                return Some((fd, features & uffd::FEATURE_WP_UNPOPULATED != 0));
            }
        }
        None
    }

    /// A userfaultfd ioctl on the fence's descriptor, `arg` the struct.
    fn ioctl(&self, cmd: u64, arg: *mut c_void) -> Result<i64, Errno> {
        // SAFETY: every caller passes the struct `cmd` reads and writes,
        // as a local array of the right size (see the uffd module).
        check(unsafe { libc::syscall(libc::SYS_ioctl, self.uffd.0 as c_long, cmd as c_long, arg) })
    }
}

impl Drop for WriteFence {
    fn drop(&mut self) {
        // Lift the protection (a range the move replaced is no longer
        // registered: that fails harmlessly), wake every waiter, and close
        // (which wakes them too, but a forked child could hold the
        // descriptor open).
        let mut wp = [self.start, self.len, 0u64];
        let _ = self.ioctl(uffd::IOC_WRITEPROTECT, wp.as_mut_ptr().cast());
        let mut range = [self.start, self.len];
        let _ = self.ioctl(uffd::IOC_WAKE, range.as_mut_ptr().cast());
    }
}
