//! The one way a run ends badly: a panic or a CPU exception. Prints what
//! happened and a stack trace of return addresses to serial, tells the test
//! runner (so a crash is reported as the running test's failure), then ends
//! QEMU with [`ExitCode::Crash`].

use crate::arch::exit::{ExitCode, exit_qemu};
use crate::arch::idt::{EXCEPTION_NAMES, ExceptionFrame};
use crate::println;
use core::sync::atomic::{AtomicBool, Ordering};

static IN_FATAL: AtomicBool = AtomicBool::new(false);

/// Called from the exception stubs.
pub fn exception(frame: &ExceptionFrame, cr2: u64) -> ! {
    enter();
    let name = EXCEPTION_NAMES.get(frame.vector as usize).copied().unwrap_or("?");
    println!();
    println!("!!! CPU exception {} ({}), error code {:#x}", frame.vector, name, frame.error_code);
    println!("    RIP {:#018x}  CS {:#x}  RFLAGS {:#x}", frame.rip, frame.cs, frame.rflags);
    println!("    RSP {:#018x}  SS {:#x}  CR2 {:#018x}", frame.rsp, frame.ss, cr2);
    println!("    RAX {:#x} RBX {:#x} RCX {:#x} RDX {:#x}", frame.rax, frame.rbx, frame.rcx, frame.rdx);
    println!("    RSI {:#x} RDI {:#x} RBP {:#x}", frame.rsi, frame.rdi, frame.rbp);
    if frame.vector == 14 {
        let e = frame.error_code;
        println!(
            "    page fault: {} {} {}{}",
            if e & 1 != 0 { "protection violation" } else { "not present" },
            if e & 2 != 0 { "on write" } else { "on read" },
            if e & 16 != 0 { "(instruction fetch)" } else { "" },
            if e & 8 != 0 { " (reserved bit set)" } else { "" },
        );
    }
    let guard = portcullis_boot::layout::image_layout().stack_guard;
    if (guard.start..guard.end).contains(&cr2) {
        println!("    CR2 lies in the boot stack's guard page: kernel stack overflow");
    }
    stack_trace(frame.rip, frame.rbp);
    let mut reason = crate::ktest::ReasonBuf::new();
    let _ = core::fmt::write(
        &mut reason,
        format_args!("CPU exception {} ({}) at RIP {:#x}", frame.vector, name, frame.rip),
    );
    finish(reason.as_str())
}

/// The panic handler of every kernel binary.
#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    enter();
    println!();
    match info.location() {
        Some(l) => println!("!!! panic at {}:{}:{}: {}", l.file(), l.line(), l.column(), info.message()),
        None => println!("!!! panic: {}", info.message()),
    }
    let rbp: u64;
    // SAFETY: reads the frame pointer register; no memory is touched.
    unsafe { core::arch::asm!("mov {}, rbp", out(reg) rbp, options(nomem, nostack, preserves_flags)) };
    stack_trace(0, rbp);
    let mut reason = crate::ktest::ReasonBuf::new();
    let _ = core::fmt::write(&mut reason, format_args!("panic: {}", info.message()));
    finish(reason.as_str())
}

fn enter() {
    x86_64::instructions::interrupts::disable();
    if IN_FATAL.swap(true, Ordering::SeqCst) {
        // A fault inside the fatal path: do not recurse, just stop.
        exit_qemu(ExitCode::Crash);
    }
    crate::serial::force_unlock();
}

fn finish(reason: &str) -> ! {
    crate::ktest::on_fatal(reason);
    exit_qemu(ExitCode::Crash)
}

/// Walks the frame-pointer chain (the kernel is built with frame pointers)
/// while it stays inside a known stack, printing return addresses.
fn stack_trace(rip: u64, mut rbp: u64) {
    println!("    stack trace (return addresses):");
    if rip != 0 {
        println!("      #0 {:#018x}", rip);
    }
    let boot = portcullis_boot::layout::image_layout().stack;
    let ist = crate::arch::gdt::fault_stack_range();
    let on_stack = |a: u64| (a >= boot.start && a + 16 <= boot.end) || (a >= ist.0 && a + 16 <= ist.1);
    // Runs of one return address (deep recursion) print once with a count.
    let (mut last, mut repeats) = (0u64, 0u32);
    let mut depth = 1;
    for _ in 0..4096 {
        if !rbp.is_multiple_of(8) || !on_stack(rbp) {
            break;
        }
        // SAFETY: rbp lies 8-aligned inside a kernel stack that is mapped
        // (checked just above), so both words are readable.
        let (next, ret) = unsafe { (*(rbp as *const u64), *((rbp + 8) as *const u64)) };
        if ret == 0 {
            break;
        }
        if ret == last {
            repeats += 1;
        } else {
            if repeats > 0 {
                println!("      ... {:#018x} repeated {} more time(s)", last, repeats);
            }
            if depth <= 32 {
                println!("      #{} {:#018x}", depth, ret);
            }
            depth += 1;
            (last, repeats) = (ret, 0);
        }
        if next <= rbp {
            break;
        }
        rbp = next;
    }
    if repeats > 0 {
        println!("      ... {:#018x} repeated {} more time(s)", last, repeats);
    }
}
