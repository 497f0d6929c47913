//! `cargo xtask`: build, boot and test Portcullis.
//!
//! * `cargo xtask run [--config NAME]`: boot the kernel under QEMU and show
//!   its platform and IOMMU report; with `--guest`, boot the hypervisor
//!   (`hypervisor/`) instead and run its guest.
//! * `cargo xtask test [--config NAME]... [--qemu-args "..."]`: host tests,
//!   then the in-guest tests on every QEMU configuration.
//! * `cargo xtask acpi FILE... [--json]`: decode DMAR/IVRS table dumps.
//! * `cargo xtask bench [--linux]`: benchmarks (host: iommufd IOAS
//!   map/unmap; in QEMU: the same, in tables beside Linux's figures, with
//!   `--linux` Linux booted on the same QEMU in the same run; then the
//!   hypervisor's 512 MiB guest: DMA view beside NPT build, time and
//!   page-table memory, separate and shared tables).
//! * `cargo xtask uapi-replay FILE.jsonl...`: replay recorded Linux iommufd
//!   uAPI calls against `iommufd` and report every differing answer.
//! * `cargo xtask linux-selftest`: Linux 6.12's `iommufd` and
//!   `iommufd_fail_nth` selftest binaries, built from Debian's
//!   `linux-source-6.12`, run against Portcullis under the `LD_PRELOAD`
//!   interposer (`interposer/`).

mod acpi;
mod bench;
mod guest;
mod ktap;
mod linux_selftest;
mod qemu;
mod replay;
mod test;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, boot and test Portcullis")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the kernel under QEMU and print the platform and IOMMU report.
    Run {
        /// QEMU configuration: none, intel, intel-sm, intel-fs, intel-rb, intel-cm, amd, amd-ir, intel-x2apic, amd-x2apic.
        #[arg(long, default_value = qemu::DEFAULT_RUN_CONFIG)]
        config: String,
        /// Extra QEMU arguments (split at whitespace), e.g. "-device edu".
        #[arg(long, allow_hyphen_values = true)]
        qemu_args: Option<String>,
        /// Build the kernel with optimisations.
        #[arg(long)]
        release: bool,
        /// Boot the SVM hypervisor and its guest (edu passed through)
        /// instead of the report kernel; exits 0 only on
        /// `guest passthrough: ok`.
        #[arg(long)]
        guest: bool,
    },
    /// Run host tests and the in-guest tests on the QEMU matrix.
    Test {
        /// Run only this configuration (repeatable): none, intel, intel-sm, intel-fs, intel-rb, intel-cm, amd, amd-ir, intel-x2apic, amd-x2apic.
        #[arg(long)]
        config: Vec<String>,
        /// Extra QEMU arguments for every boot (split at whitespace).
        #[arg(long, allow_hyphen_values = true)]
        qemu_args: Option<String>,
        /// Skip the host tests.
        #[arg(long)]
        no_host: bool,
        /// Skip the QEMU tests.
        #[arg(long)]
        no_qemu: bool,
        /// Time limit for one QEMU boot, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Configurations to run at once (default: number of CPUs).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Decode ACPI DMAR/IVRS table files.
    Acpi {
        /// Table files (raw binary, header included).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// One JSON object per line per file.
        #[arg(long)]
        json: bool,
    },
    /// Run the benchmarks.
    Bench {
        /// Boot the Linux peer (../shared/linux-peer, built in
        /// /tmp/linux-peer) on the same QEMU in the same run, alternating
        /// with our boots; without it, Linux's stored figures are shown.
        #[arg(long)]
        linux: bool,
        /// Run only this configuration in QEMU (repeatable): none, intel, intel-fs, amd.
        #[arg(long)]
        config: Vec<String>,
        /// Skip the host benchmarks.
        #[arg(long)]
        no_host: bool,
        /// Instead of timing, sample where the in-guest map and unmap of
        /// this backing (4k, 2m, 1g; 1 GiB, or 4k:64 for 64 MiB) spend
        /// their time, per configuration, and print the hottest functions.
        #[arg(long)]
        profile: Option<String>,
    },
    /// Replay recorded Linux uAPI calls (JSONL) against iommufd and compare.
    UapiReplay {
        /// Recordings (iommufd/tests/data/linux-uapi/*.jsonl).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print every call, not only the differences.
        #[arg(long)]
        verbose: bool,
        /// Allow-list of deliberate differences (default:
        /// iommufd/tests/data/linux-uapi/allow.toml).
        #[arg(long)]
        allow: Option<PathBuf>,
    },
    /// Run Linux 6.12's iommufd selftest binaries under the interposer.
    LinuxSelftest {
        /// Time limit for one binary, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

fn split(args: &Option<String>) -> Vec<String> {
    args.as_deref().map(|s| s.split_whitespace().map(String::from).collect()).unwrap_or_default()
}

fn run_kernel(config: &str, qemu_args: &[String], release: bool, guest: bool) -> Result<bool> {
    let c = qemu::config(config)?;
    let version = qemu::ensure(&[qemu::Tool::BareMetalTarget, qemu::Tool::Qemu])?.unwrap_or_default();
    if guest {
        return run_guest(&c, &version, qemu_args, release);
    }
    let kernel = qemu::build_kernel("portcullis-kernel", "portcullis", release)?;
    let args = qemu::args(&c, &kernel, &format!("config={}", c.name), "stdio", qemu_args);
    println!("==> {version}: booting configuration '{}' ({})", c.name, c.about);
    println!("    qemu-system-x86_64 {}", args.join(" "));
    match qemu::boot(&args, Duration::from_secs(120), std::process::Stdio::inherit(), || {})? {
        qemu::Ended::Exited(s) if s.code() == Some(qemu::EXIT_SUCCESS) => Ok(true),
        qemu::Ended::Exited(s) => {
            eprintln!("kernel ended with QEMU status {s} (crash or failure; report above)");
            Ok(false)
        }
        qemu::Ended::TimedOut => bail!("the kernel did not finish within 120 s"),
    }
}

/// `cargo xtask run --guest`: the hypervisor and its guest, serial shown
/// as it comes; true only on `guest passthrough: ok`.
fn run_guest(c: &qemu::Config, version: &str, qemu_args: &[String], release: bool) -> Result<bool> {
    let kernel = guest::build(release)?;
    let log = qemu::target_dir().join("qemu-tests").join(format!("{}-guest.log", c.name));
    std::fs::create_dir_all(log.parent().expect("log dir"))?;
    println!("==> {version}: booting the hypervisor on configuration '{}' ({})", c.name, c.about);
    let verdict = guest::boot(c, &kernel, &log, qemu_args, Duration::from_secs(120), |l| println!("{l}"))?;
    match verdict {
        guest::Verdict::Ok => Ok(true),
        guest::Verdict::Skipped(why) => {
            eprintln!("the guest could not run here: {why}");
            Ok(false)
        }
        guest::Verdict::Failed(why) => {
            eprintln!("guest passthrough failed: {why} (serial in {})", log.display());
            Ok(false)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run { config, qemu_args, release, guest } => run_kernel(&config, &split(&qemu_args), release, guest),
        Cmd::Test { config, qemu_args, no_host, no_qemu, timeout, jobs } => {
            let opts = test::Options {
                configs: config,
                qemu_args: split(&qemu_args),
                no_host,
                no_qemu,
                boot_timeout: Duration::from_secs(timeout),
                jobs: jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            };
            test::validate(&opts).and_then(|()| test::run(&opts))
        }
        Cmd::Acpi { files, json } => acpi::run(&files, json),
        Cmd::Bench { profile: Some(key), config, .. } => bench::profile(&key, &config),
        Cmd::Bench { linux, config, no_host, profile: None } => bench::run(linux, &config, no_host),
        Cmd::UapiReplay { files, verbose, allow } => replay::run(&files, allow.as_deref(), verbose),
        Cmd::LinuxSelftest { timeout } => linux_selftest::run_all(Duration::from_secs(timeout)),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
