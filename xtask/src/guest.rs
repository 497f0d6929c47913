//! The hypervisor kernel (`hypervisor/`, binary `portcullis-hv`): one boot
//! runs a guest with edu passed through and ends with a verdict line,
//! `guest passthrough: ok`, `guest passthrough: skipped: <why>` (no SVM or
//! nested paging) or `guest passthrough: FAILED: <why>`.

use crate::qemu::{self, Config, EXIT_SUCCESS, Ended};
use anyhow::Result;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// The configurations `cargo xtask test` runs the guest on.
pub const CONFIGS: &[&str] = &["intel", "intel-sm", "intel-fs", "amd", "amd-ir"];

/// How a hypervisor boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `guest passthrough: ok` and a successful exit.
    Ok,
    /// The CPU cannot run the guest.
    Skipped(String),
    /// Anything else, with the reason.
    Failed(String),
}

/// Builds the hypervisor kernel; returns the ELF path.
pub fn build(release: bool) -> Result<std::path::PathBuf> {
    qemu::build_kernel("hypervisor", "portcullis-hv", release)
}

/// Boots the hypervisor on `c` with its serial in `log`, handing each
/// serial line to `line` as it arrives.
pub fn boot(
    c: &Config,
    kernel: &Path,
    log: &Path,
    extra: &[String],
    timeout: Duration,
    mut line: impl FnMut(&str),
) -> Result<Verdict> {
    let _ = std::fs::remove_file(log);
    let args = qemu::args(c, kernel, &format!("config={}", c.name), &format!("file:{}", log.display()), extra);
    let mut shown = 0;
    let mut show = |all: bool| {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // Whole lines only until the end.
        let upto = if all { text.len() } else { text.rfind('\n').map_or(0, |i| i + 1) };
        if upto > shown {
            for l in text[shown..upto].lines() {
                line(l.trim_end_matches('\r'));
            }
            shown = upto;
        }
    };
    let ended = qemu::boot(&args, timeout, Stdio::null(), || show(false))?;
    show(true);
    let text = std::fs::read_to_string(log).unwrap_or_default();
    Ok(verdict(&text, &ended, timeout))
}

fn verdict(text: &str, ended: &Ended, timeout: Duration) -> Verdict {
    let said = text.lines().rev().find_map(|l| l.trim_end_matches('\r').strip_prefix("guest passthrough: "));
    let success = matches!(ended, Ended::Exited(s) if s.code() == Some(EXIT_SUCCESS));
    match (said, ended) {
        (Some("ok"), _) if success => Verdict::Ok,
        (Some(s), _) if s.starts_with("skipped: ") && success => {
            Verdict::Skipped(s.trim_start_matches("skipped: ").to_string())
        }
        (Some(s), _) if s.starts_with("FAILED: ") => Verdict::Failed(s.trim_start_matches("FAILED: ").to_string()),
        (_, Ended::TimedOut) => Verdict::Failed(format!("no verdict within {timeout:?}")),
        (_, Ended::Exited(s)) => Verdict::Failed(format!("ended with QEMU status {s} and no verdict")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn exited(code: i32) -> Ended {
        Ended::Exited(std::process::ExitStatus::from_raw(code << 8))
    }

    #[test]
    fn verdicts() {
        let t = Duration::from_secs(1);
        assert_eq!(verdict("x\nguest passthrough: ok\nok 1 guest_passthrough\n", &exited(33), t), Verdict::Ok);
        assert!(matches!(verdict("guest passthrough: ok\n", &exited(37), t), Verdict::Failed(_)));
        assert_eq!(verdict("guest passthrough: skipped: no SVM\n", &exited(33), t), Verdict::Skipped("no SVM".into()));
        assert_eq!(verdict("guest passthrough: FAILED: boom\n", &exited(35), t), Verdict::Failed("boom".into()));
        assert!(matches!(verdict("", &Ended::TimedOut, t), Verdict::Failed(s) if s.contains("no verdict")));
    }
}
