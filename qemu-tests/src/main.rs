//! `portcullis-tests`: the in-guest test kernel. Boots like the report
//! kernel, then runs every test case in `cases` and prints KTAP to serial
//! (see `portcullis_kernel::ktest`).
//!
//! Command line (set by `cargo xtask test`):
//! * `config=NAME`: the QEMU configuration, so tests know what hardware to
//!   expect (`none`, `intel`, `intel-sm`, `intel-fs`, `intel-rb`, `intel-cm`, `amd`, `amd-ir`,
//!   `intel-x2apic`, `amd-x2apic`);
//! * `x2apic=1`: run the local APIC in x2APIC mode (`intel-x2apic`, `amd-x2apic`);
//! * `ktest.start=N`: resume at test N after a crash of test N-1;
//! * `ktest.crash=KIND`: instead of the tests, deliberately take a fault
//!   (`pf`, `ud`, `panic`, `stack`) so the host can check the fatal report;
//! * `bench=1`: run the in-guest benchmarks instead of the tests;
//!   `bench.reps=N`: time each IOAS map/unmap case N times (default 9);
//!   `bench.profile=KEY[:MIB]` (`4k`, `2m`, `1g`; 1024 MiB unless given):
//!   instead, sample where the map and unmap of that backing spend their
//!   time;
//! * `ktest.inject=N:panic,M:hang`: test N panics and test M hangs instead
//!   of running, so the host can check that it resumes after both.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod amd_cases;
#[cfg(target_os = "none")]
mod bench;
#[cfg(target_os = "none")]
mod cases;
#[cfg(target_os = "none")]
mod dma_cases;
#[cfg(target_os = "none")]
mod ioapic_cases;
#[cfg(target_os = "none")]
mod vtd_cases;

#[cfg(target_os = "none")]
portcullis_boot::entry_point!(kernel_main);

#[cfg(target_os = "none")]
fn kernel_main(boot: &'static portcullis_boot::BootInfo) -> ! {
    use portcullis_kernel::arch::exit::{ExitCode, exit_qemu};
    let platform = portcullis_kernel::init(boot);
    if let Some(kind) = boot.cmdline_value("ktest.crash") {
        cases::crash(kind);
    }
    if boot.cmdline_value("bench").is_some() {
        let reps = boot.cmdline_value("bench.reps").and_then(|s| s.parse().ok()).unwrap_or(9);
        let profile = boot.cmdline_value("bench.profile").and_then(|v| {
            let (key, mib) = v.split_once(':').unwrap_or((v, "1024"));
            Some((portcullis_bench::Backing::from_key(key)?, mib.parse::<u64>().ok()? << 20))
        });
        bench::run(&platform, reps, profile);
        exit_qemu(ExitCode::Success);
    }
    let start = boot.cmdline_value("ktest.start").and_then(|s| s.parse().ok()).unwrap_or(1);
    let inject = boot.cmdline_value("ktest.inject").unwrap_or("");
    let before = |n: usize| {
        for item in inject.split(',') {
            match item.split_once(':') {
                Some((k, "panic")) if k.parse() == Ok(n) => panic!("injected panic in test {n}"),
                Some((k, "hang")) if k.parse() == Ok(n) => loop {
                    core::hint::spin_loop();
                },
                _ => {}
            }
        }
    };
    let summary = portcullis_kernel::ktest::run(&platform, cases::ALL, &platform.config, start, &before);
    exit_qemu(if summary.failed == 0 { ExitCode::Success } else { ExitCode::Failure })
}

/// On the host this binary only exists so `cargo build --workspace` works.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("portcullis-tests is a test kernel: run it with `cargo xtask test`");
    std::process::exit(2);
}
