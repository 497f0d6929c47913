//! `cargo xtask linux-selftest`: Linux 6.12's own iommufd selftest
//! binaries, unmodified but for the Debian tree's uAPI mismatch, run
//! against Portcullis through the `LD_PRELOAD` interposer.
//!
//! 1. The source is Debian's `linux-source-6.12` package
//!    (`/usr/src/linux-source-6.12.tar.xz`, installed with apt-get when
//!    missing and we are root). Only the files the two programs need are
//!    unpacked, into `target/linux-selftest/src`.
//! 2. The tree carries a newer iommu selftest (stable backports) than its
//!    own uAPI (`IOMMU_HW_INFO_TYPE_DEFAULT`, `iommu_hw_info.in_data_type`,
//!    `MOCK_FLAGS_DEVICE_PASID`); the same edits as
//!    `../shared/linux-peer/build.sh` make it build (the input-type checks
//!    of `get_hw_info` then fail, on Linux too).
//! 3. `iommufd` and `iommufd_fail_nth` are built **dynamically linked**
//!    (a static binary ignores `LD_PRELOAD`) against the tree's uAPI
//!    headers, and run under the interposer with a time limit.
//! 4. Hugepages: 22 cases map `MAP_HUGETLB` buffers. As root the command
//!    reserves 128 (2 MiB) hugepages for the run and restores the old
//!    count afterwards; otherwise those cases fail at their `mmap` and the
//!    summary says so.
//!
//! The summary: kselftest totals per binary, each failing case with the
//! first assertion it printed, the cases the interposer cannot express
//! (counted apart, with why), and a closing `N passed, N failed`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
const TOP: &str = "linux-source-6.12";
/// Files of the tree the two programs need.
const MEMBERS: &[&str] = &[
    "tools/testing/selftests/iommu",
    "tools/testing/selftests/kselftest_harness.h",
    "tools/testing/selftests/kselftest.h",
    "drivers/iommu/iommufd/iommufd_test.h",
    "include/uapi/linux/iommufd.h",
    "include/uapi/linux/vfio.h",
];
const PROGRAMS: &[&str] = &["iommufd", "iommufd_fail_nth"];
const HUGEPAGES: u64 = 128;
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Whether this process has capability `bit` in `CapEff`.
fn has_cap(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|c| c & (1 << bit) != 0)
    })
}

fn has_cap_sys_resource() -> bool {
    has_cap(24)
}

/// Whether pins are limited below 128 MiB: no `CAP_IPC_LOCK` (bit 14)
/// and a smaller `RLIMIT_MEMLOCK` soft limit.
fn pins_limited() -> bool {
    let limit = std::fs::read_to_string("/proc/self/limits").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("Max locked memory"))
            .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
    });
    let small = limit.is_some_and(|v| v != "unlimited" && v.parse::<u64>().is_ok_and(|b| b < 128 << 20));
    !has_cap(14) && small
}

/// Cases an in-process interposer cannot express, or this host cannot
/// run, with why.
fn exception(case: &str) -> Option<&'static str> {
    if (case.contains(".domain_dirty64M") || case.contains(".domain_dirty128M")) && pins_limited() {
        return Some("pins 64 or 128 MiB: over RLIMIT_MEMLOCK without CAP_IPC_LOCK (ENOMEM, as on Linux)");
    }
    if case == "iommufd.global_options" && !has_cap_sys_resource() {
        return Some(
            "sets IOMMU_OPTION_RLIMIT_MODE, which needs CAP_SYS_RESOURCE: this process lacks it (EPERM, as on Linux)",
        );
    }
    if case.ends_with(".fork_present") || case.ends_with(".fork_gone") {
        return Some(
            "maps through the fd from a forked child and checks the parent: needs iommufd state shared across processes",
        );
    }
    if case.ends_with(".get_hw_info") {
        return Some(
            "fails on Linux 6.12.95 too: the tree's selftest expects a newer GET_HW_INFO (input type) than its uAPI",
        );
    }
    None
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

/// Unpacks the needed files (once) and returns the tree's top directory.
fn source(work: &Path) -> Result<PathBuf> {
    let top = work.join("src").join(TOP);
    if top.join(".unpacked").exists() {
        return Ok(top);
    }
    if !Path::new(TARBALL).exists() {
        if !is_root() {
            bail!("{TARBALL} is missing: install it with `apt-get install linux-source-6.12` (needs root)");
        }
        println!("==> installing linux-source-6.12 (apt-get)");
        run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends", "linux-source-6.12"]))?;
    }
    println!("==> unpacking the selftest and uAPI files from {TARBALL}");
    std::fs::create_dir_all(work.join("src"))?;
    let mut tar = Command::new("tar");
    tar.arg("xf").arg(TARBALL).arg("-C").arg(work.join("src"));
    for m in MEMBERS {
        tar.arg(format!("{TOP}/{m}"));
    }
    run(&mut tar)?;
    std::fs::write(top.join(".unpacked"), b"")?;
    Ok(top)
}

/// Rewrites the file at `path` with `f`.
fn edit(path: &Path, f: impl Fn(&str) -> String) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    std::fs::write(path, f(&text))?;
    Ok(())
}

/// Copies the selftests into a build tree, applies the Debian-tree edits
/// and the uAPI headers, and compiles both programs. Returns their paths.
fn build(work: &Path, top: &Path) -> Result<Vec<PathBuf>> {
    let b = work.join("build");
    let _ = std::fs::remove_dir_all(&b); // absent on the first run
    let sel = b.join("tools/testing/selftests");
    std::fs::create_dir_all(sel.join("iommu"))?;
    std::fs::create_dir_all(b.join("drivers/iommu/iommufd"))?;
    std::fs::create_dir_all(b.join("include/linux"))?;
    let copy = |from: &str, to: &Path| -> Result<()> {
        std::fs::copy(top.join(from), to).with_context(|| format!("copying {from}"))?;
        Ok(())
    };
    for f in std::fs::read_dir(top.join("tools/testing/selftests/iommu"))? {
        let f = f?;
        std::fs::copy(f.path(), sel.join("iommu").join(f.file_name()))?;
    }
    copy("tools/testing/selftests/kselftest_harness.h", &sel.join("kselftest_harness.h"))?;
    copy("tools/testing/selftests/kselftest.h", &sel.join("kselftest.h"))?;
    copy("drivers/iommu/iommufd/iommufd_test.h", &b.join("drivers/iommu/iommufd/iommufd_test.h"))?;
    // The uAPI headers as `make headers_install` would give them: these
    // two only need `__user` dropped.
    for h in ["iommufd.h", "vfio.h"] {
        let text = std::fs::read_to_string(top.join("include/uapi/linux").join(h))?;
        std::fs::write(b.join("include/linux").join(h), text.replace("__user", ""))?;
    }
    // No input data type in GET_HW_INFO; the PASID-capable mock domain
    // variant made plain (this kernel's mock has no PASID).
    edit(&sel.join("iommu/iommufd_utils.h"), |t| {
        let mut out = String::new();
        let mut skip_next = false;
        for line in t.lines() {
            if skip_next {
                skip_next = false;
                continue;
            }
            if line.contains(".in_data_type = data_type,") {
                continue;
            }
            if line.contains("if (data_type != IOMMU_HW_INFO_TYPE_DEFAULT)") {
                skip_next = true;
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    })?;
    edit(&sel.join("iommu/iommufd.c"), |t| t.replace(".pasid_capable = true,", ".pasid_capable = false,"))?;
    let mut out = Vec::new();
    for p in PROGRAMS {
        let exe = work.join(p);
        let mut cc = Command::new("gcc");
        cc.args(["-O2", "-Wall", "-Wno-unused-function", "-D_GNU_SOURCE"])
            .args(["-DIOMMU_HW_INFO_TYPE_DEFAULT=0", "-DMOCK_FLAGS_DEVICE_PASID=4", "-DMOCK_PASID_WIDTH=20"])
            .arg("-I")
            .arg(b.join("include"))
            .arg("-I")
            .arg(&sel)
            .arg("-o")
            .arg(&exe)
            .arg(sel.join("iommu").join(format!("{p}.c")))
            .arg("-lpthread");
        println!("==> building {p} (dynamically linked)");
        run(&mut cc)?;
        out.push(exe);
    }
    Ok(out)
}

/// Builds the interposer and returns the library's path.
fn interposer() -> Result<PathBuf> {
    println!("==> building the interposer");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).current_dir(crate::qemu::root()).args(["build", "-p", "portcullis-interposer"]))?;
    let lib = crate::qemu::target_dir().join("debug/libportcullis_interposer.so");
    if !lib.exists() {
        bail!("{} was not built", lib.display());
    }
    Ok(lib)
}

/// Reserves hugepages while alive (as root), restoring the old count.
struct Hugepages(Option<String>);

impl Hugepages {
    fn reserve() -> Self {
        let Ok(old) = std::fs::read_to_string(NR_HUGEPAGES) else { return Self(None) };
        if old.trim().parse::<u64>().is_ok_and(|n| n >= HUGEPAGES) || !is_root() {
            return Self(None);
        }
        match std::fs::write(NR_HUGEPAGES, HUGEPAGES.to_string()) {
            Ok(()) => Self(Some(old)),
            Err(_) => Self(None),
        }
    }

    fn available() -> bool {
        std::fs::read_to_string(NR_HUGEPAGES).is_ok_and(|s| s.trim().parse::<u64>().is_ok_and(|n| n > 0))
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        if let Some(old) = &self.0
            && std::fs::write(NR_HUGEPAGES, old.trim()).is_err()
        {
            eprintln!("warning: could not restore {NR_HUGEPAGES} to {}", old.trim());
        }
    }
}

/// What one program printed, parsed.
#[derive(Default)]
struct Outcome {
    totals: Option<String>,
    passed: Vec<String>,
    failed: Vec<(String, String)>,
    skipped: Vec<(String, String)>,
    timed_out: bool,
}

fn parse(text: &str) -> Outcome {
    let mut o = Outcome::default();
    let mut reason = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# Totals: ") {
            o.totals = Some(t.to_string());
        } else if line.starts_with("#  RUN ") {
            reason.clear();
        } else if let Some(rest) = line.strip_prefix("not ok ") {
            let name = rest.split_once(' ').map_or(rest, |(_, n)| n).to_string();
            let why = if reason.is_empty() { "no assertion printed".to_string() } else { reason.clone() };
            o.failed.push((name, why));
        } else if let Some(rest) = line.strip_prefix("ok ") {
            let rest = rest.split_once(' ').map_or(rest, |(_, n)| n);
            match rest.split_once(" # SKIP") {
                Some((name, why)) => o.skipped.push((name.to_string(), why.trim().to_string())),
                None => o.passed.push(rest.to_string()),
            }
        } else if reason.is_empty()
            && (line.contains("Expected") || line.contains("Assertion") || line.contains("terminated"))
        {
            let r = line.trim_start_matches("# ");
            // Paths of the build tree say nothing: keep `iommu/file:line`.
            reason = r.rsplit_once("selftests/").map_or(r, |(_, tail)| tail).to_string();
        }
    }
    o
}

/// Runs `exe` under the interposer, killing it after `limit`.
fn run_one(exe: &Path, lib: &Path, limit: Duration, log: &Path) -> Result<Outcome> {
    let file = std::fs::File::create(log)?;
    let mut child = Command::new(exe)
        .env("LD_PRELOAD", lib)
        .stdout(file.try_clone()?)
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let start = Instant::now();
    let mut timed_out = false;
    while child.try_wait()?.is_none() {
        if start.elapsed() > limit {
            // Already exited between the checks is fine too.
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut o = parse(&std::fs::read_to_string(log)?);
    o.timed_out = timed_out;
    Ok(o)
}

/// The command.
pub fn run_all(limit: Duration) -> Result<bool> {
    let work = crate::qemu::target_dir().join("linux-selftest");
    std::fs::create_dir_all(&work)?;
    let top = source(&work)?;
    let programs = build(&work, &top)?;
    let lib = interposer()?;
    let huge = Hugepages::reserve();
    let have_huge = Hugepages::available();
    let (mut pass, mut fail, mut apart, mut skip) = (0usize, 0usize, 0usize, 0usize);
    for exe in &programs {
        let name = exe.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let log = work.join(format!("{name}.log"));
        println!("==> {name} under the interposer (limit {} s, log {})", limit.as_secs(), log.display());
        let o = run_one(exe, &lib, limit, &log)?;
        println!("  kselftest totals: {}", o.totals.as_deref().unwrap_or("(none printed)"));
        if o.timed_out {
            println!("  TIMED OUT after {} s: the cases after the last one reported did not run", limit.as_secs());
            fail += 1;
        }
        pass += o.passed.len();
        for (case, why) in &o.failed {
            if let Some(e) = exception(case) {
                apart += 1;
                println!("  apart   {case}: {e}");
            } else {
                fail += 1;
                let hint = if !have_huge && (case.contains("huge") || case.contains("access_domain_destory")) {
                    " [no hugepages reserved: run as root]"
                } else {
                    ""
                };
                println!("  FAILED  {case}: {why}{hint}");
            }
        }
        for (case, why) in &o.skipped {
            skip += 1;
            println!("  skipped {case}: {why}");
        }
    }
    drop(huge);
    println!("{pass} passed, {fail} failed ({apart} counted apart, {skip} skipped)");
    // A skipped case did not run our code: not a success either.
    Ok(fail == 0 && skip == 0)
}
