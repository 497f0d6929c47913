//! The in-kernel test runner. Test cases are plain functions over the
//! booted `Platform`; results go to serial as KTAP:
//!
//! ```text
//! KTAP version 1
//! # config: intel
//! 1..3
//! # running: memory_map_sane
//! ok 1 memory_map_sane
//! # running: dmar_found
//! # dmar_found: no DMAR table
//! not ok 2 dmar_found
//! ok 3 amd_only # SKIP needs config amd
//! ```
//!
//! A test that panics or faults is reported as `not ok` by the fatal path
//! (`on_fatal`) and the run ends with `ExitCode::Crash`; the host
//! (`cargo xtask test`) boots again with `ktest.start=N+1` to run the rest.
//! `# running:` lines let the host name the test that hangs.

use alloc::string::String;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

/// Why a test did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A check failed.
    Fail(String),
    /// The test does not apply here.
    Skip(String),
}

/// What a test returns.
pub type TestResult = Result<(), Outcome>;

/// One test case.
#[derive(Debug, Clone, Copy)]
pub struct TestCase<P> {
    /// Name (unique, no spaces).
    pub name: &'static str,
    /// The test.
    pub func: fn(&P) -> TestResult,
}

/// Fails the test with a formatted reason unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::ktest::Outcome::Fail(alloc::format!($($arg)+)));
        }
    };
}

/// Fails the test unless the two values are equal, showing both.
#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($arg:tt)+) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err($crate::ktest::Outcome::Fail(alloc::format!(
                "{}: {:#x?} != {:#x?}", format_args!($($arg)+), l, r
            )));
        }
    }};
}

/// Skips the test with a reason.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)+) => {
        return Err($crate::ktest::Outcome::Skip(alloc::format!($($arg)+)))
    };
}

/// Fixed-size text buffer for the fatal path, which must not allocate.
#[derive(Debug)]
pub struct ReasonBuf {
    buf: [u8; 256],
    len: usize,
}

impl ReasonBuf {
    /// Empty buffer.
    pub const fn new() -> Self {
        Self { buf: [0; 256], len: 0 }
    }
    /// Contents (cut at a character boundary if it overflowed).
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.buf[..self.len]) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&self.buf[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl Default for ReasonBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for ReasonBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Writes `text` as KTAP diagnostic lines prefixed by `# name: `.
pub fn format_diagnostic(out: &mut impl Write, name: &str, text: &str) -> fmt::Result {
    for line in text.lines() {
        writeln!(out, "# {}: {}", name, line)?;
    }
    Ok(())
}

/// Writes one KTAP result line.
pub fn format_result(out: &mut impl Write, number: usize, name: &str, result: &TestResult) -> fmt::Result {
    match result {
        Ok(()) => writeln!(out, "ok {} {}", number, name),
        Err(Outcome::Skip(why)) => writeln!(out, "ok {} {} # SKIP {}", number, name, why.replace('\n', " ")),
        Err(Outcome::Fail(why)) => {
            format_diagnostic(out, name, why)?;
            writeln!(out, "not ok {} {}", number, name)
        }
    }
}

// The running test, for the fatal path: number (0 = none) and name.
static CURRENT_NUMBER: AtomicUsize = AtomicUsize::new(0);
static CURRENT_NAME: spin::Mutex<&'static str> = spin::Mutex::new("");

/// Called by the fatal path: reports the running test (if any) as failed.
pub fn on_fatal(reason: &str) {
    let n = CURRENT_NUMBER.load(Ordering::SeqCst);
    if n == 0 {
        return;
    }
    // The lock may be held by the interrupted runner; never wait for it.
    let name = CURRENT_NAME.try_lock().map(|g| *g).unwrap_or("?");
    let mut out = Console;
    let _ = format_diagnostic(&mut out, name, reason);
    let _ = writeln!(out, "not ok {} {}", n, name);
}

struct Console;
impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        #[cfg(target_os = "none")]
        crate::serial::write_fmt(format_args!("{}", s));
        #[cfg(not(target_os = "none"))]
        let _ = s;
        Ok(())
    }
}

/// Totals of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Passed.
    pub passed: usize,
    /// Failed.
    pub failed: usize,
    /// Skipped.
    pub skipped: usize,
}

/// Runs `tests[start-1..]` and prints KTAP. Test numbers are 1-based
/// positions in `tests`, the same on every boot, so resumed runs line up.
/// `before(n)` runs just before test `n` (the test kernel uses it to inject
/// crashes and hangs that check the host's resume logic).
pub fn run<P>(platform: &P, tests: &[TestCase<P>], config: &str, start: usize, before: &dyn Fn(usize)) -> Summary {
    let mut out = Console;
    let mut summary = Summary::default();
    let _ = writeln!(out, "KTAP version 1");
    let _ = writeln!(out, "# config: {}", config);
    if start > 1 {
        let _ = writeln!(out, "# resuming at test {}", start);
    }
    let _ = writeln!(out, "1..{}", tests.len());
    for (i, t) in tests.iter().enumerate().skip(start.saturating_sub(1)) {
        let n = i + 1;
        let _ = writeln!(out, "# running: {}", t.name);
        *CURRENT_NAME.lock() = t.name;
        CURRENT_NUMBER.store(n, Ordering::SeqCst);
        before(n);
        let result = (t.func)(platform);
        CURRENT_NUMBER.store(0, Ordering::SeqCst);
        match &result {
            Ok(()) => summary.passed += 1,
            Err(Outcome::Skip(_)) => summary.skipped += 1,
            Err(Outcome::Fail(_)) => summary.failed += 1,
        }
        let _ = format_result(&mut out, n, t.name, &result);
    }
    let _ = writeln!(out, "# totals: pass:{} fail:{} skip:{}", summary.passed, summary.failed, summary.skipped);
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ktap_lines() {
        let mut s = String::new();
        format_result(&mut s, 1, "a", &Ok(())).unwrap();
        format_result(&mut s, 2, "b", &Err(Outcome::Skip("needs\namd".into()))).unwrap();
        format_result(&mut s, 3, "c", &Err(Outcome::Fail("x\ny".into()))).unwrap();
        assert_eq!(s, "ok 1 a\nok 2 b # SKIP needs amd\n# c: x\n# c: y\nnot ok 3 c\n");
    }

    #[test]
    fn reason_buffer_truncates_safely() {
        let mut r = ReasonBuf::new();
        for _ in 0..100 {
            let _ = write!(r, "é€");
        }
        assert!(r.as_str().len() <= 256);
        assert!(r.as_str().starts_with("é€"));
    }
}
