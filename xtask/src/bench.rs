//! `cargo xtask bench [--linux]`: the host benchmarks, then the in-guest
//! IOAS benchmark under QEMU TCG, summarised per configuration as one table
//! beside Linux's figures for the same map/unmap; with `--linux`, Linux
//! (the peer in ../shared/linux-peer, when it is built) is booted in the
//! same run on the same QEMU command line, alternating with our boots.
//!
//! Both sides are summarised the same way: median [min-max] of every
//! repetition, in ns per 4 KiB of IOVA.

use crate::{guest, qemu};
use anyhow::Result;
use portcullis_bench::{Backing, Summary};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Repetitions of each case per side: three boots of three with a live
/// Linux peer (alternating against drift), else one boot of nine.
const REPS: u32 = 9;
const ROUNDS: u32 = 3;

/// Time limits of one boot: ours, and the Linux peer's (about 45 s when it
/// works).
const OURS_LIMIT: Duration = Duration::from_secs(900);
const LINUX_LIMIT: Duration = Duration::from_secs(300);

/// Configurations with an in-guest IOAS benchmark.
const CONFIGS: [&str; 4] = ["none", "intel", "intel-fs", "amd"];

/// The Linux peer: a Linux 6.12 kernel and initramfs built by
/// ../shared/linux-peer/build.sh.
struct Peer {
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Peer {
    const DIR: &'static str = "/tmp/linux-peer";

    fn find() -> Option<Peer> {
        let dir = Path::new(Self::DIR);
        let kernel = dir.join("linux-source-6.12/arch/x86/boot/bzImage");
        let initrd = dir.join("initramfs.cpio.gz");
        (kernel.is_file() && initrd.is_file()).then_some(Peer { kernel, initrd })
    }
}

/// What Linux runs on a configuration: the peer's domain (`dom=` in its
/// `BENCH` lines), its kernel command line, and the path for the note.
struct LinuxSide {
    dom: &'static str,
    cmdline: &'static str,
    path: &'static str,
}

fn linux_side(config: &str) -> Option<LinuxSide> {
    // `no_timer_check`: under a loaded TCG host Linux's check that the
    // timer interrupt arrives through the remapped IO-APIC can time out and
    // panic the boot; it checks timing, not IOMMU behaviour.
    match config {
        "none" => Some(LinuxSide {
            dom: "mock",
            cmdline: "",
            path: "iommufd selftest mock domain (IOMMU_TEST_OP_MOCK_DOMAIN)",
        }),
        "intel" => Some(LinuxSide {
            dom: "cdev",
            cmdline: "intel_iommu=on",
            path: "intel-iommu second-stage domain of an edu bound to vfio-pci, attached through the vfio cdev",
        }),
        "amd" => Some(LinuxSide {
            dom: "cdev",
            // QEMU's amd-iommu offers interrupt remapping; with Linux using
            // it, the peer's output from user space never reached the serial
            // port under TCG and the boot hung. Portcullis's `amd`
            // configuration does not remap interrupts either (`amd-ir` does).
            cmdline: "intremap=off iommufd.allow_unsafe_interrupts=1",
            path: "amd-iommu v1 domain of an edu bound to vfio-pci, attached through the vfio cdev",
        }),
        _ => None,
    }
}

/// What Portcullis runs on a configuration, for the note.
fn our_path(config: &str) -> &'static str {
    match config {
        "none" => "iommufd (Ictx) IOAS onto the selftest mock domain (2 KiB pages, each stored)",
        "intel" => "iommufd (Ictx) IOAS onto a VT-d second-stage domain (legacy mode, queued invalidation)",
        "intel-fs" => "iommufd (Ictx) IOAS onto a VT-d first-stage domain (scalable mode)",
        "amd" => "iommufd (Ictx) IOAS onto an AMD-Vi v1 domain",
        _ => "iommufd (Ictx) IOAS",
    }
}

/// Linux's figures measured on another day (linux-peer/bench-table.txt,
/// -m 4G -smp 2): per (config, backing, MiB), map and unmap as (median of 9
/// over 3 boots, lowest and highest per-boot median), ns per 4 KiB.
type Stored = (&'static str, &'static str, u64, [f64; 3], [f64; 3]);
const ANOTHER_DAY: [Stored; 12] = [
    ("none", "4k", 64, [1201.0, 1145.0, 1219.0], [1197.0, 975.0, 1261.0]),
    ("none", "2m", 64, [866.0, 825.0, 871.0], [910.0, 898.0, 946.0]),
    ("none", "4k", 1024, [1174.0, 1097.0, 1200.0], [1298.0, 1128.0, 1305.0]),
    ("none", "2m", 1024, [889.0, 816.0, 939.0], [1004.0, 974.0, 1182.0]),
    ("intel", "4k", 64, [349.0, 344.0, 384.0], [217.0, 206.0, 233.0]),
    ("intel", "2m", 64, [40.0, 37.0, 65.0], [125.0, 123.0, 126.0]),
    ("intel", "4k", 1024, [354.0, 346.0, 356.0], [233.0, 206.0, 236.0]),
    ("intel", "2m", 1024, [33.0, 32.0, 33.0], [120.0, 119.0, 135.0]),
    ("amd", "4k", 64, [599.0, 442.0, 922.0], [372.0, 257.0, 493.0]),
    ("amd", "2m", 64, [42.0, 41.0, 44.0], [124.0, 121.0, 126.0]),
    ("amd", "4k", 1024, [737.0, 642.0, 742.0], [284.0, 273.0, 356.0]),
    ("amd", "2m", 1024, [39.0, 36.0, 40.0], [118.0, 114.0, 137.0]),
];

/// One case: (backing, size in MiB).
type Case = (Backing, u64);

/// Map and unmap samples (ns per 4 KiB) of each case, in first-seen order.
#[derive(Default)]
struct Samples {
    order: Vec<Case>,
    map: BTreeMap<(&'static str, u64), Vec<f64>>,
    unmap: BTreeMap<(&'static str, u64), Vec<f64>>,
}

impl Samples {
    fn add(&mut self, backing: Backing, mib: u64, map: f64, unmap: f64) {
        let k = (backing.key(), mib);
        if !self.map.contains_key(&k) {
            self.order.push((backing, mib));
        }
        self.map.entry(k).or_default().push(map);
        self.unmap.entry(k).or_default().push(unmap);
    }

    fn get(&mut self, (backing, mib): Case) -> Option<(Summary, Summary)> {
        let k = (backing.key(), mib);
        Some((Summary::of(self.map.get_mut(&k)?)?, Summary::of(self.unmap.get_mut(&k)?)?))
    }
}

/// `key=value` words of a line.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace().filter_map(|w| w.split_once('=')).collect()
}

/// Our `bench-rep: ioas ... map_ns= unmap_ns=` lines into `into`.
fn parse_ours(log: &str, into: &mut Samples) {
    for line in log.lines().filter_map(|l| l.trim_end_matches('\r').strip_prefix("bench-rep: ioas ")) {
        let f = fields(line);
        let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok());
        let (Some(backing), Some(mib), Some(map), Some(unmap)) =
            (f.get("backing").and_then(|b| Backing::from_key(b)), num("size_mib"), num("map_ns"), num("unmap_ns"))
        else {
            continue;
        };
        let pages = (mib << 20) as f64 / 4096.0;
        into.add(backing, mib, map as f64 / pages, unmap as f64 / pages);
    }
}

/// The peer's `BENCH dom=DOM pages=4K|2M size_mib= rep= ... map_ns_per_4k=
/// unmap_ns_per_4k=` lines into `into`; returns its `BENCH info` lines for
/// `dom` (how physically contiguous its buffers were).
fn parse_linux(log: &str, dom: &str, into: &mut Samples) -> Vec<String> {
    let mut info = Vec::new();
    for line in log.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(rest) = line.strip_prefix("BENCH info ") {
            if fields(rest).get("dom") == Some(&dom) {
                info.push(rest.to_string());
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("BENCH ") else { continue };
        let f = fields(rest);
        if f.get("dom") != Some(&dom) || !f.contains_key("rep") {
            continue;
        }
        let backing = match f.get("pages") {
            Some(&"4K") => Backing::Scattered4K,
            Some(&"2M") => Backing::Scattered2M,
            _ => continue,
        };
        let num = |k: &str| f.get(k).and_then(|v| v.parse::<f64>().ok());
        if let (Some(mib), Some(map), Some(unmap)) = (num("size_mib"), num("map_ns_per_4k"), num("unmap_ns_per_4k")) {
            into.add(backing, mib as u64, map, unmap);
        }
    }
    info
}

/// Boots `kernel` on configuration `name` with `-m 2G` (the in-guest
/// benchmarks' memory), `cmdline` and `extra` QEMU arguments, serial into
/// `log`, killed after `limit`; returns whether it exited with `success`
/// (any status when `None`) and the serial text.
fn boot(
    name: &str,
    kernel: &Path,
    cmdline: &str,
    extra: &[&str],
    log: &Path,
    success: Option<i32>,
    limit: Duration,
) -> Result<(bool, String)> {
    let c = qemu::config(name)?;
    std::fs::create_dir_all(log.parent().expect("log dir"))?;
    if log.exists() {
        std::fs::remove_file(log)?;
    }
    let mut more: Vec<String> = vec!["-m".into(), "2G".into()];
    more.extend(extra.iter().map(|s| s.to_string()));
    let args = qemu::args(&c, kernel, cmdline, &format!("file:{}", log.display()), &more);
    let ended = qemu::boot(&args, limit, Stdio::null(), || {})?;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let ok = match ended {
        qemu::Ended::Exited(s) => success.is_none_or(|code| s.code() == Some(code)),
        qemu::Ended::TimedOut => false,
    };
    Ok((ok, text))
}

/// Boots our test kernel with `bench=1` (round `round` of alternating
/// boots); prints its `bench:` lines on the first round and collects its
/// repetitions.
fn boot_ours(name: &str, kernel: &Path, reps: u32, round: u32, into: &mut Samples) -> Result<bool> {
    let log = qemu::target_dir().join("qemu-tests").join(format!("bench-{name}-{round}.log"));
    let cmdline = format!("config={name} bench=1 bench.reps={reps}");
    let (ok, text) = boot(name, kernel, &cmdline, &[], &log, Some(qemu::EXIT_SUCCESS), OURS_LIMIT)?;
    // Its other figures once (the later rounds repeat them).
    if round == 0 {
        for line in text.lines().filter_map(|l| l.trim_end_matches('\r').strip_prefix("bench: ")) {
            println!("  {line}");
        }
    }
    parse_ours(&text, into);
    if !ok {
        eprintln!("  the benchmark kernel failed on {name} (serial in {})", log.display());
    }
    Ok(ok)
}

/// Boots the Linux peer on configuration `name` (our QEMU command line,
/// Linux's kernel and initramfs) in its `bench` mode; collects its
/// repetitions. Returns the `BENCH info` lines, or why it failed.
fn boot_linux(
    peer: &Peer,
    name: &str,
    side: &LinuxSide,
    round: u32,
    into: &mut Samples,
) -> Result<Vec<String>, String> {
    let log = qemu::target_dir().join("qemu-tests").join(format!("linux-bench-{name}-{round}.log"));
    let cmdline = format!(
        "console=ttyS0 loglevel=4 panic=-1 no_timer_check iommu.passthrough=0 {} peer.mode=bench",
        side.cmdline
    );
    let initrd = peer.initrd.display().to_string();
    // Linux powers off; QEMU then exits 0 (a panic reboots, and -no-reboot
    // makes that an exit 0 too: the `PEER end` line tells them apart).
    let (ok, text) = boot(name, &peer.kernel, &cmdline, &["-initrd", &initrd], &log, None, LINUX_LIMIT)
        .map_err(|e| format!("{e:#}"))?;
    let before = into.map.values().map(Vec::len).sum::<usize>();
    let info = parse_linux(&text, side.dom, into);
    let after = into.map.values().map(Vec::len).sum::<usize>();
    if !ok || !text.contains("PEER end") || after == before {
        return Err(format!("the Linux peer gave no {} figures (serial in {})", side.dom, log.display()));
    }
    Ok(info)
}

/// Checks `--config` names; returns whether a configuration was asked
/// for (all of them when none was named).
fn chosen(configs: &[String]) -> Result<impl Fn(&str) -> bool + '_> {
    if let Some(bad) = configs.iter().find(|c| !CONFIGS.contains(&c.as_str())) {
        anyhow::bail!("no in-guest benchmark for configuration {bad:?}; known: {}", CONFIGS.join(", "));
    }
    Ok(move |name: &str| configs.is_empty() || configs.iter().any(|c| c == name))
}

/// `cargo xtask bench [--linux] [--config NAME]... [--no-host]`.
pub fn run(linux: bool, configs: &[String], no_host: bool) -> Result<bool> {
    let wanted = chosen(configs)?;
    if !no_host && !host()? {
        return Ok(false);
    }
    let version = qemu::ensure(&[qemu::Tool::BareMetalTarget, qemu::Tool::Qemu])?.unwrap_or_default();
    let kernel = qemu::build_kernel("qemu-tests", "portcullis-tests", true)?;
    let peer = if linux { Peer::find() } else { None };
    if linux && peer.is_none() {
        println!(
            "==> --linux: the Linux peer is not built ({}/linux-source-6.12/arch/x86/boot/bzImage and initramfs.cpio.gz; \
             ../shared/linux-peer/build.sh builds them): Linux's figures below were measured on another day",
            Peer::DIR
        );
    }
    let mut ok = true;
    for name in CONFIGS.into_iter().filter(|n| wanted(n)) {
        let side = linux_side(name);
        let live = peer.as_ref().zip(side.as_ref());
        println!(
            "==> QEMU ({version}), configuration {name}: in-guest IOAS map/unmap (release test kernel, -m 2G){}",
            if live.is_some() { ", alternating with Linux 6.12 on the same QEMU command line" } else { "" }
        );
        if live.is_some() {
            let c = qemu::config(name)?;
            let args = qemu::args(&c, Path::new("KERNEL"), "CMDLINE", "file:LOG", &["-m".into(), "2G".into()]);
            println!("  both sides boot: qemu-system-x86_64 {} (Linux adds -initrd)", args.join(" "));
        }
        let (mut ours, mut theirs) = (Samples::default(), Samples::default());
        let mut info = Vec::new();
        let mut linux_failed = None;
        match live {
            Some((peer, side)) => {
                for round in 0..ROUNDS {
                    ok &= boot_ours(name, &kernel, REPS / ROUNDS, round, &mut ours)?;
                    if linux_failed.is_none() {
                        match boot_linux(peer, name, side, round, &mut theirs) {
                            Ok(i) => info = i,
                            Err(why) => linux_failed = Some(why),
                        }
                    }
                }
            }
            None => ok &= boot_ours(name, &kernel, REPS, 0, &mut ours)?,
        }
        if let Some(why) = &linux_failed {
            println!("  {why}: Linux's figures below were measured on another day");
        }
        let measured = live.is_some() && linux_failed.is_none();
        print_table(name, &mut ours, measured.then_some(&mut theirs), side.as_ref());
        if measured {
            println!(
                "  Linux's buffers in its last boot (pfn_runs: physically contiguous runs; 262144 pages per GiB):"
            );
            for i in &info {
                println!("    {i}");
            }
        }
    }
    let hv = guest::build(true)?;
    for name in ["intel", "intel-fs", "amd"].into_iter().filter(|n| wanted(n)) {
        println!(
            "==> QEMU ({version}), configuration {name}: a 512 MiB guest's DMA view beside its NPT (release hypervisor, bench=1, -m 2G)"
        );
        let log = qemu::target_dir().join("qemu-tests").join(format!("hv-bench-{name}.log"));
        let (booted, text) =
            boot(name, &hv, &format!("config={name} bench=1"), &[], &log, Some(qemu::EXIT_SUCCESS), OURS_LIMIT)?;
        for line in text.lines().filter_map(|l| l.trim_end_matches('\r').strip_prefix("bench: ")) {
            println!("  {line}");
        }
        ok &= booted;
    }
    Ok(ok)
}

/// `cargo xtask bench --profile KEY [--config NAME]...`: boots the release
/// test kernel with `bench.profile=KEY` on each configuration (all four
/// when none is named) and prints, per phase, the functions the samples
/// fell in (innermost inlined function and the function it was inlined
/// into, from `addr2line`), most first.
pub fn profile(key: &str, configs: &[String]) -> Result<bool> {
    let (backing, mib) = key.split_once(':').unwrap_or((key, "1024"));
    anyhow::ensure!(
        Backing::from_key(backing).is_some() && mib.parse::<u64>().is_ok_and(|m| (1..=1024).contains(&m)),
        "--profile takes 4k, 2m or 1g, with :MIB (1-1024) after it to profile less than 1 GiB, not {key:?}"
    );
    let wanted = chosen(configs)?;
    let version = qemu::ensure(&[qemu::Tool::BareMetalTarget, qemu::Tool::Qemu])?.unwrap_or_default();
    let kernel = qemu::build_kernel("qemu-tests", "portcullis-tests", true)?;
    let mut ok = true;
    for name in CONFIGS.into_iter().filter(|n| wanted(n)) {
        println!(
            "==> QEMU ({version}), configuration {name}: where {mib} MiB of {backing} backing spends its map and unmap"
        );
        let log = qemu::target_dir().join("qemu-tests").join(format!("profile-{name}-{backing}-{mib}.log"));
        let cmdline = format!("config={name} bench=1 bench.reps=5 bench.profile={key}");
        let (booted, text) = boot(name, &kernel, &cmdline, &[], &log, Some(qemu::EXIT_SUCCESS), OURS_LIMIT)?;
        if !booted {
            eprintln!("  the profiling kernel failed on {name} (serial in {})", log.display());
            ok = false;
            continue;
        }
        let lines: Vec<BTreeMap<&str, &str>> =
            text.lines().filter_map(|l| l.trim_end_matches('\r').strip_prefix("bench-profile: ")).map(fields).collect();
        if let Some(head) = lines.iter().find(|f| f.contains_key("samples_map")) {
            println!(
                "  {} reps, a sample every {} ns: {} samples in map, {} in unmap ({} lost); {} ms in map, {} in unmap \
                 (a sample covers only code running with interrupts on)",
                head.get("reps").unwrap_or(&"?"),
                head.get("period_ns").unwrap_or(&"?"),
                head.get("samples_map").unwrap_or(&"?"),
                head.get("samples_unmap").unwrap_or(&"?"),
                head.get("lost").unwrap_or(&"?"),
                head.get("map_ms").unwrap_or(&"?"),
                head.get("unmap_ms").unwrap_or(&"?")
            );
        }
        for phase in ["map", "unmap"] {
            let rips: Vec<(u64, u64)> = lines
                .iter()
                .filter(|f| f.get("phase") == Some(&phase))
                .filter_map(|f| {
                    let rip = u64::from_str_radix(f.get("rip")?.trim_start_matches("0x"), 16).ok()?;
                    Some((rip, f.get("n")?.parse().ok()?))
                })
                .collect();
            let names = symbolize(&kernel, rips.iter().map(|r| r.0))?;
            let total: u64 = rips.iter().map(|r| r.1).sum();
            let mut by_fn: BTreeMap<&str, u64> = BTreeMap::new();
            for ((_, n), name) in rips.iter().zip(&names) {
                *by_fn.entry(name.as_str()).or_default() += n;
            }
            let mut by_fn: Vec<_> = by_fn.into_iter().collect();
            by_fn.sort_by_key(|e| std::cmp::Reverse(e.1));
            println!("  {phase}: {total} samples in the hottest addresses, by function (inlined in):");
            for (f, n) in by_fn.iter().take(25) {
                println!("    {:5.1}%  {f}", 100.0 * *n as f64 / total.max(1) as f64);
            }
            // The same samples by the function the code was compiled into.
            let mut by_outer: BTreeMap<&str, u64> = BTreeMap::new();
            for (f, n) in &by_fn {
                let outer = f.rsplit_once(" (in ").map_or(*f, |(_, o)| o.trim_end_matches(')'));
                *by_outer.entry(outer).or_default() += n;
            }
            let mut by_outer: Vec<_> = by_outer.into_iter().collect();
            by_outer.sort_by_key(|e| std::cmp::Reverse(e.1));
            println!("  {phase}, by the function the code is in:");
            for (f, n) in by_outer.into_iter().take(15) {
                println!("    {:5.1}%  {f}", 100.0 * n as f64 / total.max(1) as f64);
            }
        }
    }
    Ok(ok)
}

/// `function (in caller)` for each address, from `addr2line -f -i -C`
/// on the kernel's symbols (the innermost inlined frame and the outermost
/// function of the address).
fn symbolize(elf: &Path, rips: impl Iterator<Item = u64>) -> Result<Vec<String>> {
    let rips: Vec<u64> = rips.collect();
    if rips.is_empty() {
        return Ok(Vec::new());
    }
    // One query per address, each followed by a sentinel address that
    // resolves to "??", so the inline chains can be told apart.
    let mut input = String::new();
    for r in &rips {
        input.push_str(&format!("{r:#x}\n0x0\n"));
    }
    let mut child = Command::new("addr2line")
        .args(["-f", "-i", "-C", "-e"])
        .arg(elf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("addr2line (binutils): {e}"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Lines come in (function, file:line) pairs; a sentinel gives "??".
    let mut names = Vec::new();
    let mut frames: Vec<String> = Vec::new();
    let mut lines = text.lines();
    while let Some(func) = lines.next() {
        let _file = lines.next();
        if func == "??" {
            let name = match (frames.first(), frames.last()) {
                (Some(inner), Some(outer)) if inner != outer => format!("{} (in {})", short(inner), short(outer)),
                (Some(inner), _) => short(inner),
                _ => "?".to_string(),
            };
            names.push(name);
            frames.clear();
        } else {
            frames.push(func.to_string());
        }
    }
    names.resize(rips.len(), "?".to_string());
    Ok(names)
}

/// A demangled Rust path without its hash (`::h` and 16 hex digits),
/// cut to 110 characters.
fn short(name: &str) -> String {
    let name = match name.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => head,
        _ => name,
    };
    name.chars().take(110).collect()
}

/// The host benchmarks (optimised); true when both ran.
fn host() -> Result<bool> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("==> host: iommufd IOAS map/unmap (cargo bench -p iommufd --bench ioas)");
    let status = Command::new(&cargo)
        .current_dir(qemu::root())
        .args(["bench", "--quiet", "-p", "iommufd", "--features", "selftest", "--bench", "ioas"])
        .status()?;
    if !status.success() {
        return Ok(false);
    }
    println!("==> host: I/O page-table engine (cargo bench -p io-pgtable)");
    let status =
        Command::new(&cargo).current_dir(qemu::root()).args(["bench", "--quiet", "-p", "io-pgtable"]).status()?;
    if !status.success() {
        return Ok(false);
    }
    println!("  Linux generic page table (i7-12700): map 4 KiB 53-57 ns, unmap 4 KiB 69-72 ns, map 256 x 4 KiB 391 ns");
    Ok(true)
}

/// One table: our figures, Linux's (measured in this run when `linux` is
/// given, else the stored ones), the ratio of the medians, and what work
/// differs.
fn print_table(name: &str, ours: &mut Samples, mut linux: Option<&mut Samples>, side: Option<&LinuxSide>) {
    let reps = ours.order.first().and_then(|&c| ours.map.get(&(c.0.key(), c.1))).map_or(0, Vec::len);
    let linux_what = match (&linux, side) {
        (_, None) => "none for this configuration".to_string(),
        (Some(l), Some(_)) => {
            let n = l.order.first().and_then(|&c| l.map.get(&(c.0.key(), c.1))).map_or(0, Vec::len);
            format!("median [min-max] of {n} reps over {ROUNDS} boots, this run")
        }
        (None, Some(_)) => {
            "MEASURED ON ANOTHER DAY (-m 4G -smp 2): median of 9 reps over 3 boots [range of per-boot medians]".into()
        }
    };
    println!("  ns per 4 KiB of IOVA; Portcullis: median [min-max] of {reps} reps; Linux 6.12: {linux_what};");
    println!("  ratio: Portcullis's median / Linux's median");
    println!(
        "  {:>8}  {:<17} {:>17} {:>17}   {:>17} {:>17}   {:>5} {:>5}",
        "size", "backing", "Portcullis map", "unmap", "Linux map", "unmap", "ratio", "ratio"
    );
    println!("  {:>8}  {:<17} {:>17} {:>17}   {:>17} {:>17}   {:>5} {:>5}", "", "", "", "", "", "", "map", "unmap");
    for case in ours.order.clone() {
        let Some((m, u)) = ours.get(case) else { continue };
        let (backing, mib) = case;
        let theirs = match (&mut linux, side) {
            (Some(l), _) => l.get(case),
            (None, Some(_)) => stored(name, case),
            (None, None) => None,
        };
        let size = if mib >= 1024 { format!("{} GiB", mib >> 10) } else { format!("{mib} MiB") };
        match theirs {
            Some((lm, lu)) => println!(
                "  {size:>8}  {:<17} {m:>17} {u:>17}   {lm:>17} {lu:>17}   {:>5.2} {:>5.2}",
                backing.label(),
                m.median / lm.median,
                u.median / lu.median
            ),
            None => println!(
                "  {size:>8}  {:<17} {m:>17} {u:>17}   {:>35}",
                backing.label(),
                if backing == Backing::Contiguous {
                    "(Linux's anonymous memory is never one contiguous GiB)"
                } else {
                    "-"
                }
            ),
        }
    }
    println!(
        "  Work that differs: Linux's IOAS_MAP pins user pages (pin_user_pages_fast, drivers/iommu/iommufd/pages.c) \
         that the benchmark touched first and counts them in the mm's pinned_vm (the peer runs as root: with \
         CAP_IPC_LOCK it skips the locked_vm limit); Portcullis maps guest RAM the hypervisor already owns (here \
         described frames, never touched, pinned by counting)."
    );
    println!(
        "  Portcullis's frames: 4 KiB scattered: no two pages physically adjacent (262144 runs per GiB); \
         2 MiB scattered: 2 MiB-aligned, none adjacent (512 runs per GiB); contiguous: one run, 1 GiB-aligned."
    );
    println!("  Portcullis: {}.", our_path(name));
    if let Some(side) = side {
        println!("  Linux: IOMMU_IOAS_MAP/UNMAP of anonymous memory (MADV_NOHUGEPAGE or THP), {}.", side.path);
    }
}

/// Linux's stored figures for `case` on configuration `name`.
fn stored(name: &str, (backing, mib): Case) -> Option<(Summary, Summary)> {
    let s = |[median, min, max]: [f64; 3]| Summary { median, min, max, n: 9 };
    ANOTHER_DAY.iter().find(|r| r.0 == name && r.1 == backing.key() && r.2 == mib).map(|r| (s(r.3), s(r.4)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_parse_into_the_same_cases() {
        let ours = "bench: QEMU TCG (intel)\r\n\
                    bench-rep: ioas dom=vtd backing=4k size_mib=1024 rep=0 map_ns=262144000 unmap_ns=524288000\r\n\
                    bench-rep: ioas dom=vtd backing=2m size_mib=64 rep=0 map_ns=16384 unmap_ns=32768\n";
        let mut s = Samples::default();
        parse_ours(ours, &mut s);
        assert_eq!(s.order, [(Backing::Scattered4K, 1024), (Backing::Scattered2M, 64)]);
        let (m, u) = s.get((Backing::Scattered4K, 1024)).unwrap();
        assert_eq!((m.median, u.median, m.n), (1000.0, 2000.0, 1));
        let linux = "BENCH info dom=cdev pages=4K size_mib=1024 AnonHugePages_kB=0 pfn_runs=18102\r\n\
                     BENCH dom=cdev pages=4K size_mib=1024 rep=0 map_ms=105.30 unmap_ms=95.20 map_ns_per_4k=401.7 unmap_ns_per_4k=363.2\r\n\
                     BENCH dom=cdev pages=4K size_mib=1024 rep=1 map_ms=1 unmap_ms=1 map_ns_per_4k=400.0 unmap_ns_per_4k=300.0\n\
                     BENCH dom=compat pages=4K size_mib=1024 rep=0 map_ms=1 unmap_ms=1 map_ns_per_4k=9.0 unmap_ns_per_4k=9.0\n\
                     BENCH dom=mock unavailable: errno 22\n";
        let mut l = Samples::default();
        let info = parse_linux(linux, "cdev", &mut l);
        assert_eq!(info.len(), 1);
        let (m, u) = l.get((Backing::Scattered4K, 1024)).unwrap();
        assert_eq!((m.median, m.min, m.max, u.max, m.n), (400.85, 400.0, 401.7, 363.2, 2), "compat lines left out");
    }

    #[test]
    fn stored_figures_cover_the_linux_configurations() {
        for name in ["none", "intel", "amd"] {
            for case in [(Backing::Scattered4K, 64), (Backing::Scattered2M, 1024)] {
                assert!(stored(name, case).is_some(), "{name} {case:?}");
            }
            assert!(stored(name, (Backing::Contiguous, 1024)).is_none());
        }
    }
}
