//! `cargo xtask test`: host tests, then the QEMU matrix.
//!
//! Each configuration boots the test kernel; results come back as KTAP on a
//! serial log under `target/qemu-tests/`. A boot that crashes (panic or CPU
//! exception in a test) or hangs is restarted after the test that was
//! running, so one bad test costs one failure, not the rest of the run.
//! Configurations run in parallel, as many at once as there are cores.
//! On the configurations in `guest::CONFIGS` the hypervisor kernel also
//! boots once and runs its guest (a row `NAME guest` of its own: passed,
//! skipped when the CPU has no SVM or nested paging, or failed).

use crate::guest;
use crate::ktap::{self, Status};
use crate::qemu::{self, Config, EXIT_CRASH, EXIT_FAILURE, EXIT_SUCCESS, Ended};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Options of `cargo xtask test`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Configurations to run (empty = all).
    pub configs: Vec<String>,
    /// Extra QEMU arguments for every boot.
    pub qemu_args: Vec<String>,
    /// Skip the host tests.
    pub no_host: bool,
    /// Skip the QEMU matrix.
    pub no_qemu: bool,
    /// Time limit for one boot.
    pub boot_timeout: Duration,
    /// Configurations run at once.
    pub jobs: usize,
}

/// One configuration's outcome.
#[derive(Debug, Default, Clone)]
struct Row {
    name: String,
    passed: usize,
    failed: usize,
    skipped: usize,
    boots: usize,
    time: Duration,
    failures: Vec<String>,
}

/// Runs everything; returns whether all passed.
pub fn run(opts: &Options) -> Result<bool> {
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut tools = Vec::new();
    if !opts.no_host {
        tools.push(qemu::Tool::Iasl);
    }
    if !opts.no_qemu {
        tools.extend([qemu::Tool::BareMetalTarget, qemu::Tool::Qemu]);
    }
    qemu::ensure(&tools)?;
    if !opts.no_host {
        rows.push(host_tests()?);
    }
    if !opts.no_qemu {
        let qemu = qemu::check_qemu()?;
        let configs: Vec<Config> = if opts.configs.is_empty() {
            qemu::CONFIGS.to_vec()
        } else {
            opts.configs.iter().map(|c| qemu::config(c)).collect::<Result<_>>()?
        };
        println!("==> building the test kernel");
        let kernel = qemu::build_kernel("qemu-tests", "portcullis-tests", false)?;
        let hv = if configs.iter().any(|c| guest::CONFIGS.contains(&c.name)) {
            println!("==> building the hypervisor kernel");
            Some(guest::build(false)?)
        } else {
            None
        };
        let logs = qemu::target_dir().join("qemu-tests");
        std::fs::create_dir_all(&logs)?;
        println!(
            "==> QEMU matrix ({}): {} configuration(s), {} at a time, logs in {}",
            qemu,
            configs.len(),
            opts.jobs,
            logs.display()
        );
        rows.extend(run_matrix(&configs, &kernel, hv.as_deref(), &logs, opts));
    }
    print_summary(&rows, started.elapsed());
    Ok(rows.iter().all(|r| r.failed == 0))
}

fn host_tests() -> Result<Row> {
    println!("==> host tests: cargo test --workspace");
    let start = Instant::now();
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(qemu::root())
        .args(["test", "--workspace", "--color", "never"])
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut row = Row { name: "host (cargo test)".into(), boots: 0, ..Row::default() };
    let out = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(out).lines() {
        let line = line?;
        // Passing tests are only counted; everything else is shown.
        if !(line.is_empty() || line.starts_with("test ") && line.ends_with(" ... ok")) {
            println!("{line}");
        }
        // "test result: ok. 12 passed; 0 failed; 1 ignored; ..."
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let words: Vec<&str> = part.split_whitespace().collect();
                let n = |i: usize| words.get(i).and_then(|w| w.parse::<usize>().ok()).unwrap_or(0);
                match words.as_slice() {
                    [.., _, "passed"] => row.passed += n(words.len() - 2),
                    [.., _, "failed"] => row.failed += n(words.len() - 2),
                    [.., _, "ignored"] => row.skipped += n(words.len() - 2),
                    _ => {}
                }
            }
        } else if line.starts_with("---- ") {
            row.failures.push(line.trim_matches('-').trim().to_string());
        }
    }
    let status = child.wait()?;
    if !status.success() && row.failed == 0 {
        // Did not compile, or a test binary crashed.
        row.failed = 1;
        row.failures.push(format!("cargo test exited with {status}"));
    }
    row.time = start.elapsed();
    Ok(row)
}

fn run_matrix(configs: &[Config], kernel: &Path, hv: Option<&Path>, logs: &Path, opts: &Options) -> Vec<Row> {
    let queue = Mutex::new(configs.iter().enumerate().rev().collect::<Vec<_>>());
    let results = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.max(1) {
            s.spawn(|| {
                loop {
                    let next = queue.lock().unwrap().pop();
                    let Some((i, c)) = next else { break };
                    let row = run_config(c, kernel, logs, opts);
                    results.lock().unwrap().insert((i, 0), row);
                    if let Some(hv) = hv.filter(|_| guest::CONFIGS.contains(&c.name)) {
                        let row = run_guest(c, hv, logs, opts);
                        results.lock().unwrap().insert((i, 1), row);
                    }
                }
            });
        }
    });
    results.into_inner().unwrap().into_values().collect()
}

fn progress(config: &str, msg: &str) {
    println!("[{config:>8}] {msg}");
}

/// Boots one configuration until every test has a result.
fn run_config(c: &Config, kernel: &Path, logs: &Path, opts: &Options) -> Row {
    let start = Instant::now();
    progress(c.name, &format!("started ({})", c.about));
    let mut row = run_boots(c, c.name, "", kernel, logs, opts);
    if c.name == "none" {
        let cases = row.passed + row.failed + row.skipped;
        fatal_checks(c, kernel, logs, opts, &mut row);
        resume_check(c, kernel, logs, opts, cases, &mut row);
    }
    row.time = start.elapsed();
    progress(
        c.name,
        &format!(
            "finished: {} passed, {} failed, {} skipped in {:.1}s ({} boot(s))",
            row.passed,
            row.failed,
            row.skipped,
            row.time.as_secs_f64(),
            row.boots
        ),
    );
    row
}

/// Boots the hypervisor on `c` once: its guest's passthrough check.
fn run_guest(c: &Config, hv: &Path, logs: &Path, opts: &Options) -> Row {
    let start = Instant::now();
    let label = format!("{} guest", c.name);
    let mut row = Row { name: label.clone(), boots: 1, ..Row::default() };
    let log = logs.join(format!("{}-guest.log", c.name));
    match guest::boot(c, hv, &log, &opts.qemu_args, opts.boot_timeout, |_| {}) {
        Ok(guest::Verdict::Ok) => row.passed = 1,
        Ok(guest::Verdict::Skipped(why)) => {
            row.skipped = 1;
            progress(&label, &format!("skipped: {why}"));
        }
        Ok(guest::Verdict::Failed(why)) => {
            row.failed = 1;
            row.failures.push(format!("{label} guest_passthrough: {why}; see {}", log.display()));
        }
        Err(e) => {
            row.failed = 1;
            row.failures.push(format!("{label}: could not start QEMU: {e:#}"));
        }
    }
    row.time = start.elapsed();
    progress(&label, &format!("finished: {} passed, {} failed, {} skipped", row.passed, row.failed, row.skipped));
    row
}

/// Checks the resume logic itself: with test 2 made to panic and test 4 to
/// hang, the run must report exactly those two as failed, with the right
/// reasons, and still run every other test.
fn resume_check(c: &Config, kernel: &Path, logs: &Path, opts: &Options, cases: usize, row: &mut Row) {
    let short = Options { boot_timeout: Duration::from_secs(10), ..opts.clone() };
    let r = run_boots(c, "none-resume", "ktest.inject=2:panic,4:hang", kernel, logs, &short);
    let f = &r.failures;
    let ok = r.failed == 2
        && r.boots == 3
        && f.iter().any(|x| x.contains("#2") && x.contains("injected panic in test 2"))
        && f.iter().any(|x| x.contains("#4") && x.contains("hung"))
        && r.passed + r.skipped + r.failed == cases;
    row.boots += r.boots;
    if ok {
        row.passed += 1;
    } else {
        row.failed += 1;
        row.failures.push(format!("resume after crash/hang: got {} failed in {} boots: {:?}", r.failed, r.boots, f));
    }
}

/// Boots `c` (resuming after crashes and hangs) until every test has a
/// result. `label` names the logs; `extra` is appended to the command line.
fn run_boots(c: &Config, label: &str, extra: &str, kernel: &Path, logs: &Path, opts: &Options) -> Row {
    let mut row = Row { name: c.name.to_string(), ..Row::default() };
    let log = logs.join(format!("{label}.log"));
    let _ = std::fs::remove_file(&log);
    let mut results: BTreeMap<usize, ktap::TestLine> = BTreeMap::new();
    let mut next = 1;
    let mut plan = None;
    loop {
        row.boots += 1;
        let boot_log = logs.join(format!("{label}.boot{}.log", row.boots));
        let _ = std::fs::remove_file(&boot_log);
        let cmdline = format!("config={} ktest.start={} {extra}", c.name, next);
        let args = qemu::args(c, kernel, &cmdline, &format!("file:{}", boot_log.display()), &opts.qemu_args);
        let mut last_running = None;
        let ended = qemu::boot(&args, opts.boot_timeout, Stdio::null(), || {
            let p = ktap::parse(&std::fs::read_to_string(&boot_log).unwrap_or_default());
            if p.running != last_running {
                if let Some(r) = &p.running
                    && std::env::var_os("XTASK_VERBOSE").is_some()
                {
                    progress(label, &format!("running {r}"));
                }
                last_running = p.running;
            }
        });
        let text = std::fs::read_to_string(&boot_log).unwrap_or_default();
        append(&log, &text);
        let parsed = ktap::parse(&text);
        plan = plan.or(parsed.plan);
        for r in parsed.results.iter().filter(|r| r.number >= next) {
            results.insert(r.number, r.clone());
        }
        let last = results.keys().next_back().copied().unwrap_or(next - 1);
        let ended = match ended {
            Ok(e) => e,
            Err(e) => {
                row.failed += 1;
                row.failures.push(format!("{}: could not start QEMU: {e:#}", c.name));
                break;
            }
        };
        let code = match &ended {
            Ended::Exited(s) => s.code(),
            Ended::TimedOut => None,
        };
        match (ended, code) {
            (Ended::Exited(_), Some(EXIT_SUCCESS | EXIT_FAILURE)) => break,
            (Ended::Exited(_), Some(EXIT_CRASH)) if plan.is_some() => {
                progress(label, &format!("crashed in test {}; resuming; see {}", last, boot_log.display()));
            }
            (Ended::TimedOut, _) if plan.is_some() => {
                let n = last + 1;
                let name = parsed.running.clone().unwrap_or_else(|| "?".into());
                progress(label, &format!("test {n} ({name}) hung: no result after {:?}", opts.boot_timeout));
                results.insert(
                    n,
                    ktap::TestLine {
                        number: n,
                        name,
                        status: Status::Fail(vec![format!("hung: killed after {:?}", opts.boot_timeout)]),
                    },
                );
            }
            (ended, _) => {
                // Died before the test runner started: nothing to resume.
                row.failed += 1;
                row.failures.push(format!(
                    "{}: the kernel did not reach the test runner ({:?}); see {}",
                    c.name,
                    ended,
                    boot_log.display()
                ));
                break;
            }
        }
        next = results.keys().next_back().copied().unwrap_or(0) + 1;
        if plan.is_some_and(|p| next > p) {
            break;
        }
    }
    if let Some(p) = plan {
        for n in 1..=p {
            match results.get(&n).map(|r| &r.status) {
                Some(Status::Pass) => row.passed += 1,
                Some(Status::Skip(_)) => row.skipped += 1,
                Some(Status::Fail(diag)) => {
                    row.failed += 1;
                    let r = &results[&n];
                    row.failures.push(format!("{} #{} {}: {}", c.name, n, r.name, diag.join(" | ")));
                }
                None => {
                    row.failed += 1;
                    row.failures.push(format!("{} #{}: no result", c.name, n));
                }
            }
        }
    }
    row
}

/// Boots with `ktest.crash=KIND` and checks the fatal report: exit status,
/// the exception or panic line, and a stack trace.
fn fatal_checks(c: &Config, kernel: &Path, logs: &Path, opts: &Options, row: &mut Row) {
    let checks: [(&str, &[&str]); 4] = [
        (
            "pf",
            &[
                "CPU exception 14 (#PF page fault)",
                "CR2 0x0000000000000008",
                "page fault: not present on read",
                "#1 0x",
            ],
        ),
        ("ud", &["CPU exception 6 (#UD invalid opcode)", "#1 0x"]),
        ("stack", &["CPU exception 8 (#DF double fault)", "kernel stack overflow", "repeated"]),
        ("panic", &["!!! panic at qemu-tests/src/cases.rs", "deliberate panic (panic)", "#1 0x"]),
    ];
    for (kind, wanted) in checks {
        row.boots += 1;
        let log = logs.join(format!("{}.fatal-{kind}.log", c.name));
        let _ = std::fs::remove_file(&log);
        let args = qemu::args(
            c,
            kernel,
            &format!("config={} ktest.crash={kind}", c.name),
            &format!("file:{}", log.display()),
            &opts.qemu_args,
        );
        let ended = qemu::boot(&args, opts.boot_timeout, Stdio::null(), || {});
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let missing: Vec<_> = wanted.iter().filter(|w| !text.contains(*w)).collect();
        let code = match &ended {
            Ok(Ended::Exited(s)) => s.code(),
            _ => None,
        };
        if code == Some(EXIT_CRASH) && missing.is_empty() {
            row.passed += 1;
        } else {
            row.failed += 1;
            row.failures.push(format!(
                "{} fatal report for {kind}: exit {:?} (want {EXIT_CRASH}), missing {:?}; see {}",
                c.name,
                code,
                missing,
                log.display()
            ));
        }
    }
}

fn append(path: &PathBuf, text: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(text.as_bytes());
    }
}

fn print_summary(rows: &[Row], total: Duration) {
    println!();
    println!("{:<20} {:>7} {:>7} {:>8} {:>6} {:>8}", "configuration", "passed", "failed", "skipped", "boots", "time");
    println!("{}", "-".repeat(61));
    for r in rows {
        println!(
            "{:<20} {:>7} {:>7} {:>8} {:>6} {:>7.1}s",
            r.name,
            r.passed,
            r.failed,
            r.skipped,
            r.boots,
            r.time.as_secs_f64()
        );
    }
    let failures: Vec<&String> = rows.iter().flat_map(|r| &r.failures).collect();
    if !failures.is_empty() {
        println!();
        println!("failures:");
        for f in failures {
            println!("  {f}");
        }
    }
    let passed: usize = rows.iter().map(|r| r.passed).sum();
    let failed: usize = rows.iter().map(|r| r.failed).sum();
    println!();
    println!("total time {:.1}s", total.as_secs_f64());
    println!("{passed} passed, {failed} failed");
}

/// Fails unless the configuration names are known (checked before any work).
pub fn validate(opts: &Options) -> Result<()> {
    for c in &opts.configs {
        qemu::config(c)?;
    }
    if opts.no_host && opts.no_qemu {
        bail!("--no-host and --no-qemu together leave nothing to run");
    }
    Ok(())
}
