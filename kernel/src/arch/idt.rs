//! Exception entry: an IDT whose 32 exception vectors lead to small assembly
//! stubs that save the registers and call [`exception_entry`], which reports
//! the fault (vector, error code, RIP, CR2, a stack trace of return
//! addresses) and ends the run through [`crate::fatal`]. Vectors 0x20-0x2f
//! and 0xff lead to the device-interrupt stubs of [`super::irq`].
//!
//! The stubs are plain `global_asm!` so the kernel builds on stable Rust
//! (no `x86-interrupt` ABI). Each stub pushes a zero where the CPU pushes no
//! error code, then the vector number, so every exception reaches the common
//! path with the same frame layout ([`ExceptionFrame`]).

use core::arch::global_asm;
use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::tables::lidt;
use x86_64::structures::DescriptorTablePointer;

/// Registers as saved by the stubs, lowest address first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

macro_rules! stubs {
    ($($vec:literal $kind:ident),* $(,)?) => {
        global_asm!(
            ".section .text.exception_stubs, \"ax\"",
            ".balign 16",
            ".global portcullis_exception_stubs",
            "portcullis_exception_stubs:",
            $( stubs!(@one $vec $kind), )*
            "exception_common:",
            "push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
            "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
            "mov rdi, rsp",
            "and rsp, -16",
            "call {entry}",
            "ud2",
            entry = sym exception_entry,
        );
    };
    (@one $vec:literal noerr) => { concat!(".balign 16\n push 0\n push ", $vec, "\n jmp exception_common") };
    (@one $vec:literal err) => { concat!(".balign 16\n push ", $vec, "\n jmp exception_common") };
}

stubs!(
    0 noerr, 1 noerr, 2 noerr, 3 noerr, 4 noerr, 5 noerr, 6 noerr, 7 noerr,
    8 err, 9 noerr, 10 err, 11 err, 12 err, 13 err, 14 err, 15 noerr,
    16 noerr, 17 err, 18 noerr, 19 noerr, 20 noerr, 21 err, 22 noerr, 23 noerr,
    24 noerr, 25 noerr, 26 noerr, 27 noerr, 28 noerr, 29 err, 30 err, 31 noerr,
);

unsafe extern "C" {
    static portcullis_exception_stubs: u8;
}

/// One 16-byte long-mode gate descriptor.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static IDT: Once<Idt> = Once::new();

/// Exception names by vector, for reports.
pub const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

/// Builds and loads the IDT. Call after [`super::gdt::init`].
pub fn init() {
    let idt = IDT.call_once(|| {
        let base = core::ptr::addr_of!(portcullis_exception_stubs) as u64;
        let cs = x86_64::instructions::segmentation::CS::get_reg().0;
        let mut gates = [Gate::default(); 256];
        for (vector, gate) in gates.iter_mut().enumerate().take(32) {
            let addr = base + 16 * vector as u64;
            // Double fault, NMI and machine check switch to the IST stack.
            let ist = if matches!(vector, 2 | 8 | 18) { super::gdt::FAULT_IST_INDEX as u8 + 1 } else { 0 };
            *gate = Gate {
                offset_low: addr as u16,
                selector: cs,
                ist,
                attributes: 0x8e, // present, DPL 0, 64-bit interrupt gate
                offset_mid: (addr >> 16) as u16,
                offset_high: (addr >> 32) as u32,
                reserved: 0,
            };
        }
        let gate = |addr: u64| Gate {
            offset_low: addr as u16,
            selector: cs,
            ist: 0,
            attributes: 0x8e,
            offset_mid: (addr >> 16) as u16,
            offset_high: (addr >> 32) as u32,
            reserved: 0,
        };
        // Device interrupts (see `irq`).
        for i in 0..super::irq::VECTORS {
            gates[super::irq::FIRST_VECTOR as usize + i] = gate(super::irq::stub(i));
        }
        gates[super::irq::SPURIOUS_VECTOR as usize] = gate(super::irq::spurious_stub());
        Idt(gates)
    });
    let ptr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::new(idt as *const Idt as u64),
    };
    // SAFETY: the IDT is 'static, every present gate points at a stub in
    // this image using the current code segment.
    unsafe { lidt(&ptr) };
}

use x86_64::instructions::segmentation::Segment as _;

/// Common Rust entry for every CPU exception. Never returns: all exceptions
/// are fatal in this kernel.
extern "C" fn exception_entry(frame: &ExceptionFrame) -> ! {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    crate::fatal::exception(frame, cr2)
}
