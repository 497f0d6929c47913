//! Pinned pages charged where Linux charges them, across contexts
//! ([`iommufd::pages::SharedCharge`]):
//!
//! - `IOMMU_OPTION_RLIMIT_MODE` 1 (the process, Linux's `mm->locked_vm`):
//!   one counter for every context of this process, checked together
//!   with the memory the process has locked itself (`mlock`, the `VmLck`
//!   line of `/proc/self/status`), as Linux's counter holds both.
//! - RLIMIT_MODE 0 (the user, Linux's `user->locked_vm`, the default): a
//!   ledger shared by every process of the user that uses the library,
//!   a small text file in `/dev/shm` (one `pid start-time pages` line per
//!   process), read and rewritten under an exclusive file lock. Lines of
//!   processes that have ended (the pid gone, or reused by a process that
//!   started at another time) are dropped when a charge would otherwise
//!   fail, so a process killed with pins outstanding does not hold the
//!   user's limit for good. Without `/dev/shm` the user counter is this
//!   process's alone.
//!
//! Both are checked against the context's limit: `RLIMIT_MEMLOCK` in
//! pages when the context was made. A process with `CAP_IPC_LOCK`
//! charges nothing (Linux's `IOPT_PAGES_ACCOUNT_NONE`); its contexts get
//! no charger.
//!
//! After `fork`, contexts inherited by the child keep the parent's
//! charger, which does nothing in the child (its pid is not the
//! charger's): the child's own contexts get a charger of its own, with
//! counters that start at zero as a new `mm` does.

use iommufd::Errno;
use iommufd::pages::{AccountMode, SharedCharge};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

type Result<T> = core::result::Result<T, Errno>;

/// The charger of one process (see the module docs).
#[derive(Debug)]
pub struct ProcessCharge {
    /// The process it charges for, and when it started.
    me: (i32, u64),
    /// Pages charged to the process (RLIMIT_MODE 1).
    mm: Mutex<u64>,
    /// The user's ledger, or a counter of this process's user-mode pins
    /// when there is no ledger.
    user: UserCharge,
}

#[derive(Debug)]
enum UserCharge {
    Ledger(PathBuf, Mutex<Unrecorded>),
    Local(Mutex<u64>),
}

/// Uncharges the ledger could not take (it could not be opened or
/// rewritten: `uncharge` cannot fail, since the pages are already gone).
/// They are taken off this process's line at the next ledger update that
/// works; until then the user's total is that much too high (never too
/// low). The first failure is reported on stderr.
#[derive(Debug, Default)]
struct Unrecorded {
    /// Pages uncharged but still on this process's line.
    pages: u64,
    /// Ledger updates of uncharges that failed.
    failures: u64,
}

static CURRENT: Mutex<Option<Arc<ProcessCharge>>> = Mutex::new(None);

/// Holds the charger slot across `fork` (see `shim`'s fork handlers), so
/// a child never inherits it locked.
pub fn lock_for_fork() -> std::sync::MutexGuard<'static, Option<Arc<ProcessCharge>>> {
    CURRENT.lock().unwrap_or_else(|p| p.into_inner())
}

impl ProcessCharge {
    /// The charger of the calling process: the same one for every context
    /// it makes, a new one in a child after `fork`.
    pub fn current() -> Arc<ProcessCharge> {
        let me = (crate::sys::getpid(), start_time(crate::sys::getpid()).unwrap_or(0));
        let mut slot = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some(c) if c.me == me => c.clone(),
            _ => {
                let dir =
                    std::env::var_os("PORTCULLIS_LEDGER_DIR").map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from);
                let c = Arc::new(ProcessCharge::new(me, &dir));
                *slot = Some(c.clone());
                c
            }
        }
    }

    /// A charger for process `me`, its user's ledger in `dir`.
    pub fn new(me: (i32, u64), dir: &std::path::Path) -> Self {
        let user = match real_uid() {
            Some(uid) if dir.is_dir() => {
                UserCharge::Ledger(dir.join(format!("portcullis-locked-vm-{uid}")), Mutex::new(Unrecorded::default()))
            }
            _ => UserCharge::Local(Mutex::new(0)),
        };
        Self { me, mm: Mutex::new(0), user }
    }

    /// Whether the calling process is the one this charger charges for.
    fn mine(&self) -> bool {
        crate::sys::getpid() == self.me.0
    }

    /// Pages this process has charged to its user (the ledger's line).
    pub fn user_pages(&self) -> u64 {
        match &self.user {
            UserCharge::Local(n) => *n.lock().unwrap_or_else(|p| p.into_inner()),
            UserCharge::Ledger(path, lock) => {
                let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
                Ledger::open(path).map_or(0, |l| l.lines.iter().find(|e| (e.0, e.1) == self.me).map_or(0, |e| e.2))
            }
        }
    }

    /// Uncharged pages the ledger has not taken yet, and how many ledger
    /// updates failed (see [`Unrecorded`]).
    pub fn unrecorded(&self) -> (u64, u64) {
        match &self.user {
            UserCharge::Local(_) => (0, 0),
            UserCharge::Ledger(_, lock) => {
                let u = lock.lock().unwrap_or_else(|p| p.into_inner());
                (u.pages, u.failures)
            }
        }
    }

    /// Pages this process has charged to itself (RLIMIT_MODE 1).
    pub fn mm_pages(&self) -> u64 {
        *self.mm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn charge_user(&self, pages: u64, limit: u64) -> Result<()> {
        match &self.user {
            UserCharge::Local(n) => add_within(&mut n.lock().unwrap_or_else(|p| p.into_inner()), pages, 0, limit),
            UserCharge::Ledger(path, lock) => {
                let mut owed = lock.lock().unwrap_or_else(|p| p.into_inner());
                let mut l = Ledger::open(path).map_err(|_| Errno::ENOMEM)?;
                let others = |l: &Ledger| l.lines.iter().filter(|e| (e.0, e.1) != self.me).map(|e| e.2).sum::<u64>();
                let recorded = l.lines.iter().find(|e| (e.0, e.1) == self.me).map_or(0, |e| e.2);
                let mut mine = recorded.saturating_sub(owed.pages);
                if add_within(&mut mine, pages, others(&l), limit).is_err() {
                    // Perhaps the ledger still holds processes that ended.
                    l.lines.retain(|e| (e.0, e.1) == self.me || start_time(e.0) == Some(e.1));
                    add_within(&mut mine, pages, others(&l), limit)?;
                }
                l.set(self.me, mine);
                l.store().map_err(|_| Errno::ENOMEM)?;
                owed.pages = 0;
                Ok(())
            }
        }
    }

    fn uncharge_user(&self, pages: u64) {
        match &self.user {
            UserCharge::Local(n) => {
                let mut n = n.lock().unwrap_or_else(|p| p.into_inner());
                *n = n.saturating_sub(pages);
            }
            UserCharge::Ledger(path, lock) => {
                let mut owed = lock.lock().unwrap_or_else(|p| p.into_inner());
                let total = owed.pages.saturating_add(pages);
                let stored = Ledger::open(path).and_then(|mut l| {
                    let mine = l.lines.iter().find(|e| (e.0, e.1) == self.me).map_or(0, |e| e.2);
                    l.set(self.me, mine.saturating_sub(total));
                    l.store()
                });
                match stored {
                    Ok(()) => owed.pages = 0,
                    Err(e) => {
                        owed.pages = total;
                        owed.failures += 1;
                        if owed.failures == 1 {
                            eprintln!(
                                "portcullis: could not update the locked-memory ledger {}: {e}; {total} pages stay \
                                 charged to the user until an update works or this process ends",
                                path.display()
                            );
                        }
                    }
                }
            }
        }
    }
}

impl SharedCharge for ProcessCharge {
    fn charge(&self, mode: AccountMode, pages: u64, limit: u64) -> Result<()> {
        if !self.mine() {
            // A context inherited across fork: not this process's to charge.
            return Ok(());
        }
        match mode {
            AccountMode::Mm => {
                let locked = locked_by_process();
                add_within(&mut self.mm.lock().unwrap_or_else(|p| p.into_inner()), pages, locked, limit)
            }
            AccountMode::User => self.charge_user(pages, limit),
        }
    }

    fn uncharge(&self, mode: AccountMode, pages: u64) {
        if !self.mine() {
            return;
        }
        match mode {
            AccountMode::Mm => {
                let mut n = self.mm.lock().unwrap_or_else(|p| p.into_inner());
                *n = n.saturating_sub(pages);
            }
            AccountMode::User => self.uncharge_user(pages),
        }
    }
}

/// Adds `pages` to `counter` when `counter + pages + others` stays within
/// `limit`; else `ENOMEM` and nothing changes.
fn add_within(counter: &mut u64, pages: u64, others: u64, limit: u64) -> Result<()> {
    let new = counter.checked_add(pages).ok_or(Errno::ENOMEM)?;
    match new.checked_add(others) {
        Some(total) if total <= limit => {
            *counter = new;
            Ok(())
        }
        _ => Err(Errno::ENOMEM),
    }
}

/// The ledger file, locked while this value lives.
struct Ledger {
    file: File,
    /// `(pid, start time, pages)` per process.
    lines: Vec<(i32, u64, u64)>,
}

impl Ledger {
    fn open(path: &std::path::Path) -> std::io::Result<Ledger> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
        file.lock()?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let lines = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_ascii_whitespace().map(str::parse::<u64>);
                let (pid, start, pages) = (f.next()?.ok()?, f.next()?.ok()?, f.next()?.ok()?);
                Some((i32::try_from(pid).ok()?, start, pages))
            })
            .collect();
        Ok(Ledger { file, lines })
    }

    fn set(&mut self, me: (i32, u64), pages: u64) {
        self.lines.retain(|e| (e.0, e.1) != me);
        if pages != 0 {
            self.lines.push((me.0, me.1, pages));
        }
    }

    /// Writes the lines back (the lock goes when the file closes).
    fn store(mut self) -> std::io::Result<()> {
        let text: String = self.lines.iter().map(|(p, s, n)| format!("{p} {s} {n}\n")).collect();
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(text.as_bytes())
    }
}

/// When process `pid` started (field 22 of `/proc/PID/stat`, in clock
/// ticks since boot), if it exists.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields after its closing parenthesis (field 3 on).
    stat.rsplit_once(')')?.1.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The real user id (the user Linux charges, `current_user()`).
fn real_uid() -> Option<u32> {
    crate::memory::status_field("Uid")?.split_ascii_whitespace().next()?.parse().ok()
}

/// Pages the process has locked itself (`VmLck`, in kB).
fn locked_by_process() -> u64 {
    crate::memory::status_field("VmLck")
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("portcullis-charge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn processes_of_a_user_share_the_ledger_and_ended_ones_are_dropped() {
        let dir = temp_dir("ledger");
        let me = (std::process::id() as i32, start_time(std::process::id() as i32).unwrap());
        let a = ProcessCharge::new(me, &dir);
        // Another live process of the user: pid 1 with its real start time
        // (it never ends); and one that ended (a start time that is not
        // pid 1's).
        let init = (1, start_time(1).unwrap());
        let gone = (1, init.1 + 12345);
        let other = ProcessCharge::new(init, &dir);
        let dead = ProcessCharge::new(gone, &dir);
        // Write their lines as they would have (they are not this process,
        // so go through the ledger directly).
        for (who, pages) in [(init, 3), (gone, 4)] {
            let mut l = Ledger::open(&dir.join(format!("portcullis-locked-vm-{}", real_uid().unwrap()))).unwrap();
            l.set(who, pages);
            l.store().unwrap();
        }
        assert_eq!((other.user_pages(), dead.user_pages()), (3, 4));
        // 3 + 4 + 2 = 9 fits a limit of 10; 1 more would not, until the
        // ended process's 4 are dropped.
        a.charge(AccountMode::User, 2, 10).unwrap();
        a.charge(AccountMode::User, 2, 10).unwrap();
        assert_eq!((a.user_pages(), dead.user_pages()), (4, 0), "the dead line went to make room");
        assert_eq!(a.charge(AccountMode::User, 4, 10), Err(Errno::ENOMEM), "3 + 4 + 4 > 10");
        assert_eq!(a.user_pages(), 4, "a refused charge changes nothing");
        a.uncharge(AccountMode::User, 4);
        assert_eq!((a.user_pages(), other.user_pages()), (0, 3));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_uncharge_the_ledger_cannot_take_is_taken_at_the_next_update() {
        let dir = temp_dir("unrecorded");
        let me = (std::process::id() as i32, start_time(std::process::id() as i32).unwrap());
        let a = ProcessCharge::new(me, &dir);
        let path = dir.join(format!("portcullis-locked-vm-{}", real_uid().unwrap()));
        a.charge(AccountMode::User, 6, 10).unwrap();
        // The ledger cannot be opened (a directory where the file was).
        let saved = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        a.uncharge(AccountMode::User, 4);
        a.uncharge(AccountMode::User, 1);
        assert_eq!(a.unrecorded(), (5, 2), "both uncharges owed, two failed updates");
        assert_eq!(a.charge(AccountMode::User, 1, 10), Err(Errno::ENOMEM), "no ledger, no charge");
        // The ledger is back, still saying 6: the next charge counts the
        // 5 owed (6 - 5 + 9 = 10 fits the limit; 6 + 9 would not).
        std::fs::remove_dir(&path).unwrap();
        std::fs::write(&path, saved).unwrap();
        assert_eq!(a.user_pages(), 6);
        a.charge(AccountMode::User, 9, 10).unwrap();
        assert_eq!((a.user_pages(), a.unrecorded()), (10, (0, 2)));
        // And an uncharge that works takes what is owed with it.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        a.uncharge(AccountMode::User, 3);
        std::fs::remove_dir(&path).unwrap();
        std::fs::write(&path, format!("{} {} 10\n", me.0, me.1)).unwrap();
        a.uncharge(AccountMode::User, 7);
        assert_eq!((a.user_pages(), a.unrecorded()), (0, (0, 3)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_process_counter_counts_every_context_and_an_inherited_charger_does_nothing() {
        let dir = temp_dir("mm");
        let me = (std::process::id() as i32, start_time(std::process::id() as i32).unwrap());
        let a = ProcessCharge::new(me, &dir);
        a.charge(AccountMode::Mm, 5, 8).unwrap();
        assert_eq!(a.charge(AccountMode::Mm, 4, 8), Err(Errno::ENOMEM));
        a.charge(AccountMode::Mm, 3, 8).unwrap();
        assert_eq!(a.mm_pages(), 8);
        a.uncharge(AccountMode::Mm, 8);
        assert_eq!(a.mm_pages(), 0);
        // A charger of another process (as a child sees its parent's).
        let parent = ProcessCharge::new((1, 0), &dir);
        parent.charge(AccountMode::Mm, 100, 1).unwrap();
        parent.charge(AccountMode::User, 100, 1).unwrap();
        assert_eq!((parent.mm_pages(), parent.user_pages()), (0, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn start_times_read_past_a_command_name_with_spaces_and_parentheses() {
        // Our own stat line: the name is whatever the test binary is
        // called; the start time is a number and stable.
        let me = std::process::id() as i32;
        assert_eq!(start_time(me), start_time(me));
        assert!(start_time(me).unwrap() > 0);
        assert_eq!(start_time(i32::MAX), None);
    }
}
