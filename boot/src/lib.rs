//! PVH entry for the Portcullis kernel.
//!
//! QEMU (and Xen, Firecracker, cloud-hypervisor) boot an ELF kernel directly
//! when it carries a Xen `PHYS32_ENTRY` note. This crate provides:
//!
//! * the note and the 32-bit entry (`pvh_start32`, in `entry`): clear
//!   `.bss`, set up a stack and identity page tables for the low 4 GiB, enable
//!   long mode and jump to 64-bit code;
//! * the hand-over ([`start_info`]): the `hvm_start_info` block QEMU leaves in
//!   low RAM is copied, with its memory map and command line, into a
//!   [`BootInfo`] in the kernel's own `.bss` before anything can overwrite it;
//! * [`entry_point!`], which a kernel binary uses to name its Rust entry.
//!
//! The linker script `linker.ld` beside this crate lays the image out at
//! 2 MiB physical; kernel binaries pass it to the linker from their build
//! scripts.
//!
//! Invariant relied on by everything after the hand-over: the image runs at
//! its link address (identity-mapped), and [`BootInfo`] is the only copy of
//! the boot protocol's data the kernel reads.
#![cfg_attr(not(test), no_std)]

pub mod layout;
pub mod start_info;

#[cfg(target_os = "none")]
mod entry;

pub use start_info::{BootInfo, MemoryKind, MemoryRegion};

/// Declares the kernel's Rust entry point: `entry_point!(main)` where
/// `main: fn(&'static BootInfo) -> !`. The 64-bit entry code calls it once,
/// on the boot stack, with interrupts disabled.
#[macro_export]
macro_rules! entry_point {
    ($main:path) => {
        #[cfg(target_os = "none")]
        #[unsafe(no_mangle)]
        extern "Rust" fn __portcullis_kernel_main(info: &'static $crate::BootInfo) -> ! {
            let main: fn(&'static $crate::BootInfo) -> ! = $main;
            main(info)
        }
    };
}
