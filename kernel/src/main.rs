//! `portcullis`: boots, brings the machine up and prints the platform and
//! IOMMU report to serial, then ends the QEMU run (`cargo xtask run`).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
portcullis_boot::entry_point!(kernel_main);

#[cfg(target_os = "none")]
fn kernel_main(boot: &'static portcullis_boot::BootInfo) -> ! {
    use portcullis_kernel::arch::exit::{ExitCode, exit_qemu};
    let platform = portcullis_kernel::init(boot);
    // Drive the IOMMUs: translation on, every device blocked until a
    // domain is attached; interrupt routes in the local APIC's format.
    let host = portcullis_kernel::host::KernelHost::new(&platform);
    let options = portcullis::Options { x2apic: portcullis_kernel::arch::irq::x2apic(), ..Default::default() };
    let iommus = portcullis_kernel::host::Iommus::bring_up_with(host, options);
    portcullis_kernel::report::print(&platform, &iommus);
    exit_qemu(ExitCode::Success)
}

/// On the host this binary only exists so `cargo build --workspace` works;
/// the kernel is built for `x86_64-unknown-none` by `cargo xtask`.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("portcullis is a kernel: run it with `cargo xtask run`");
    std::process::exit(2);
}
