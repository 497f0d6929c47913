//! `portcullis-hv`: a tiny SVM hypervisor built on the `portcullis` crate.
//!
//! It boots like the report kernel, brings the IOMMUs up, gives each of
//! two 64-bit guests 4 MiB of host frames (not identity-placed) under
//! nested paging plus its own root-bus edu (its registers in the
//! guest-physical space, its DMA through the IOMMU at IOVA = GPA), runs
//! both, switching between them, and checks from the host that each
//! guest's DMA landed in its own frames and nowhere else. It tells a
//! reader what happens in plain words, ends with `guest passthrough: ok`
//! (or `guest passthrough: FAILED: <why>`), and prints a one-test KTAP
//! report so `cargo xtask test` can run it (`cargo xtask run --guest`).
//! With `bench=1` on its command line it prints the figures of
//! `cargo xtask bench` instead (`bench.rs`).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod bench;
#[cfg(target_os = "none")]
mod guest;
#[cfg(target_os = "none")]
mod hv;
#[cfg(target_os = "none")]
mod npt;
#[cfg(target_os = "none")]
mod svm;
#[cfg(target_os = "none")]
mod vmcb;

#[cfg(target_os = "none")]
portcullis_boot::entry_point!(hv_main);

#[cfg(target_os = "none")]
fn hv_main(boot: &'static portcullis_boot::BootInfo) -> ! {
    use portcullis_kernel::arch::exit::{ExitCode, exit_qemu};
    use portcullis_kernel::println;
    let platform = portcullis_kernel::init(boot);
    if boot.cmdline_value("bench").is_some() {
        bench::run(&platform);
        exit_qemu(ExitCode::Success)
    }
    println!("KTAP version 1");
    println!("1..1");
    println!("# running: guest_passthrough");
    match hv::run(&platform) {
        hv::Outcome::Ok => {
            println!("guest passthrough: ok");
            println!("ok 1 guest_passthrough");
            exit_qemu(ExitCode::Success)
        }
        hv::Outcome::Skip(why) => {
            println!("guest passthrough: skipped: {why}");
            println!("ok 1 guest_passthrough # SKIP {why}");
            exit_qemu(ExitCode::Success)
        }
        hv::Outcome::Fail(why) => {
            println!("guest passthrough: FAILED: {why}");
            println!("# {why}");
            println!("not ok 1 guest_passthrough");
            exit_qemu(ExitCode::Failure)
        }
    }
}

/// On the host this binary only exists so `cargo build --workspace` works.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("portcullis-hv is a kernel: run it with `cargo xtask run --guest`");
    std::process::exit(2);
}
