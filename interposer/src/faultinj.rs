//! Linux's fault-injection files, served for Portcullis (so
//! `iommufd_fail_nth` sweeps the core's unwind paths instead of skipping).
//!
//! - `/proc/self/task/<tid>/fail-nth` (also `/proc/<pid>/task/<tid>/` and
//!   `/proc/thread-self/`): writing `N` makes the `N`th fault point of that
//!   thread from now fail with `ENOMEM`, `0` disarms; reading gives what is
//!   left of the count, `0` once the fault was injected (Linux's
//!   `proc_fail_nth_write` / `proc_fail_nth_read`).
//! - `opendir("/sys/kernel/debug")` opens a directory of this library's
//!   (`$TMPDIR/portcullis-debugfs-<pid>`) holding the `failslab` and
//!   `fail_page_alloc` settings a fault-injection test writes, so it sees
//!   fault injection as available. The settings change nothing here.
//!
//! Fault points are the core's ([`iommufd::pages::FaultPlan`]: object and
//! page-store allocation, pin, domain allocation and map) plus one for
//! opening `/dev/iommu` (Linux's file allocation). A thread's armed count
//! is handed to the context of each ioctl it makes, and what the ioctl
//! consumed comes back. Not emulated: Linux counts every slab and page
//! allocation of the thread, in any system call; and a context shared with
//! other threads during an armed ioctl sees their fault points too.
//!
//! Set `PORTCULLIS_FAULT_INJECTION=0` to leave both paths to the kernel.

use crate::sys;
use iommufd::Errno;
use iommufd::ctx::Ictx;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// Whether the files are served (`PORTCULLIS_FAULT_INJECTION` not `0`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PORTCULLIS_FAULT_INJECTION").is_none_or(|v| v != "0"))
}

/// Armed counts per thread id (absent: disarmed).
fn counts() -> std::sync::MutexGuard<'static, BTreeMap<i32, u64>> {
    static COUNTS: Mutex<BTreeMap<i32, u64>> = Mutex::new(BTreeMap::new());
    COUNTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The counts' lock, for the `fork` handlers (see `shim`).
pub fn lock_counts() -> std::sync::MutexGuard<'static, BTreeMap<i32, u64>> {
    counts()
}

/// The thread id a `fail-nth` path names, if it is one.
pub fn fail_nth_path(path: &str) -> Option<i32> {
    if !enabled() {
        return None;
    }
    if path == "/proc/thread-self/fail-nth" {
        return Some(sys::gettid());
    }
    let rest = path.strip_prefix("/proc/")?.strip_suffix("/fail-nth")?;
    let (who, task) = rest.split_once("/task/")?;
    if who != "self" && who.parse::<u32>().ok()? as i32 != sys::getpid() {
        return None;
    }
    let tid: u32 = task.parse().ok()?;
    i32::try_from(tid).ok()
}

/// `pread` of a `fail-nth` file of thread `tid`.
pub fn read(tid: i32, buf: u64, count: usize, offset: u64) -> Result<i64, Errno> {
    let text = format!("{}\n", counts().get(&tid).copied().unwrap_or(0));
    let from = usize::try_from(offset).unwrap_or(usize::MAX).min(text.len());
    let n = (text.len() - from).min(count);
    if n > 0 && sys::write_mem(buf, &text.as_bytes()[from..from + n]) != n {
        return Err(Errno::EFAULT);
    }
    Ok(n as i64)
}

/// `pwrite` of a `fail-nth` file of thread `tid`: a decimal count (a
/// trailing newline allowed), `0` disarms.
pub fn write(tid: i32, buf: u64, count: usize) -> Result<i64, Errno> {
    let mut b = [0u8; 32];
    if count == 0 || count > b.len() {
        return Err(Errno::EINVAL);
    }
    if sys::read_mem(buf, &mut b[..count]) != count {
        return Err(Errno::EFAULT);
    }
    let text = std::str::from_utf8(&b[..count]).map_err(|_| Errno::EINVAL)?;
    let n: u32 = text.trim_end_matches('\n').parse().map_err(|_| Errno::EINVAL)?;
    let mut c = counts();
    if n == 0 {
        c.remove(&tid);
    } else {
        c.insert(tid, n.into());
    }
    Ok(count as i64)
}

/// One fault point outside the core (opening `/dev/iommu`): `ENOMEM`
/// when it is the calling thread's armed one.
pub fn point() -> Result<(), Errno> {
    let tid = sys::gettid();
    let mut c = counts();
    match c.get_mut(&tid) {
        Some(n) if *n > 1 => {
            *n -= 1;
            Ok(())
        }
        Some(n) if *n == 1 => {
            *n = 0;
            Err(Errno::ENOMEM)
        }
        _ => Ok(()),
    }
}

/// Runs `f` (an ioctl on `ictx`) with the calling thread's armed count
/// handed to the context's fault plan, and takes back what is left.
pub fn with_plan<T>(ictx: &Ictx, f: impl FnOnce() -> T) -> T {
    let tid = sys::gettid();
    let armed = counts().get(&tid).copied().filter(|&n| n > 0);
    let Some(n) = armed else { return f() };
    let plan = &ictx.accounting().faults;
    plan.arm(Some(n));
    let r = f();
    let used = plan.calls();
    plan.arm(None);
    if let Some(left) = counts().get_mut(&tid) {
        *left = n.saturating_sub(used);
    }
    r
}

fn debugfs_path() -> PathBuf {
    std::env::temp_dir().join(format!("portcullis-debugfs-{}", sys::getpid()))
}

extern "C" fn remove_debugfs_dir() {
    // At exit: a directory left behind only takes a few bytes of /tmp.
    let _ = std::fs::remove_dir_all(debugfs_path());
}

/// The directory served for `/sys/kernel/debug` (made once per process,
/// removed at exit).
pub fn debugfs_dir() -> Option<CString> {
    static DIR: OnceLock<Option<CString>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = debugfs_path();
        // Not removed at exit if atexit is full: only a few bytes left.
        let _ = sys::at_exit(remove_debugfs_dir);
        for (sub, files) in [
            ("failslab", &["ignore-gfp-wait", "verbose"][..]),
            ("fail_page_alloc", &["ignore-gfp-wait", "ignore-gfp-highmem", "verbose"][..]),
        ] {
            std::fs::create_dir_all(dir.join(sub)).ok()?;
            for f in files {
                std::fs::write(dir.join(sub).join(f), b"Y\n").ok()?;
            }
        }
        CString::new(dir.into_os_string().into_encoded_bytes()).ok()
    })
    .clone()
}

/// Whether `path` is the debugfs mount point.
pub fn is_debugfs(path: &str) -> bool {
    enabled() && (path == "/sys/kernel/debug" || path == "/sys/kernel/debug/")
}
