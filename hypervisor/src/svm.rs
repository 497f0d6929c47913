//! The hypervisor's only `unsafe`: the SVM model-specific registers, the
//! VMRUN trampoline and the bytes of the guest image. Everything else
//! (VMCB, nested page tables, guest memory) is written through the
//! kernel's `portcullis::Platform`, which is safe to call.
//!
//! Facts from the AMD64 Architecture Programmer's Manual, volume 2,
//! chapter 15 (Secure Virtual Machine).

use core::arch::global_asm;
use x86_64::registers::model_specific::Msr;

/// EFER.
const MSR_EFER: u32 = 0xc000_0080;
/// VM_CR: bit 4 (SVMDIS) set means firmware disabled SVM.
const MSR_VM_CR: u32 = 0xc001_0114;
/// VM_HSAVE_PA: where VMRUN saves the host's state.
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
/// EFER.SVME.
pub const EFER_SVME: u64 = 1 << 12;

/// VM_CR (only meaningful when CPUID reports SVM).
pub fn vm_cr() -> u64 {
    // SAFETY: VM_CR exists on every CPU with CPUID 0x8000_0001 ECX.SVM,
    // which the caller checked; reading it has no side effect.
    unsafe { Msr::new(MSR_VM_CR).read() }
}

/// Sets EFER.SVME (SVM instructions enabled) and the host save area.
/// `hsave` is a 4 KiB-aligned frame the caller keeps for as long as it
/// runs guests.
pub fn enable(hsave: u64) {
    assert!(hsave.is_multiple_of(4096), "VM_HSAVE_PA must be page-aligned");
    let mut efer = Msr::new(MSR_EFER);
    // SAFETY: setting SVME on a CPU with SVM (checked by the caller) only
    // makes the SVM instructions legal; the rest of EFER is kept.
    unsafe { efer.write(efer.read() | EFER_SVME) };
    // SAFETY: the frame is RAM the caller allocated for the save area and
    // hands over for good; nothing else uses it.
    unsafe { Msr::new(MSR_VM_HSAVE_PA).write(hsave) };
}

/// The guest's general-purpose registers VMRUN does not load or save
/// (RAX, RSP, RIP and RFLAGS are in the VMCB). Order fixed for the
/// trampoline.
#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
pub struct GuestRegs {
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

// portcullis_hv_vmrun(vmcb_pa: rdi, regs: rsi): keeps the host's
// callee-saved registers on its stack, loads the guest's from `regs`,
// runs the guest with GIF clear around VMRUN and the host's IF set, so a
// physical interrupt during the guest is an INTR #VMEXIT (V_INTR_MASKING);
// after it IF is cleared before GIF is set again, so the interrupt stays
// pending for the host to take when it chooses. Stores the guest's
// registers back.
global_asm!(
    ".pushsection .text.portcullis_hv_vmrun,\"ax\"",
    ".global portcullis_hv_vmrun",
    "portcullis_hv_vmrun:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rsi",
    "mov rax, rdi",
    "mov rbx, [rsi + 0]",
    "mov rcx, [rsi + 8]",
    "mov rdx, [rsi + 16]",
    "mov rdi, [rsi + 32]",
    "mov rbp, [rsi + 40]",
    "mov r8, [rsi + 48]",
    "mov r9, [rsi + 56]",
    "mov r10, [rsi + 64]",
    "mov r11, [rsi + 72]",
    "mov r12, [rsi + 80]",
    "mov r13, [rsi + 88]",
    "mov r14, [rsi + 96]",
    "mov r15, [rsi + 104]",
    "mov rsi, [rsi + 24]",
    "clgi",
    "sti",
    "vmrun rax",
    "cli",
    "stgi",
    "push rsi",
    "mov rsi, [rsp + 8]",
    "mov [rsi + 0], rbx",
    "mov [rsi + 8], rcx",
    "mov [rsi + 16], rdx",
    "mov [rsi + 32], rdi",
    "mov [rsi + 40], rbp",
    "mov [rsi + 48], r8",
    "mov [rsi + 56], r9",
    "mov [rsi + 64], r10",
    "mov [rsi + 72], r11",
    "mov [rsi + 80], r12",
    "mov [rsi + 88], r13",
    "mov [rsi + 96], r14",
    "mov [rsi + 104], r15",
    "pop rax",
    "mov [rsi + 24], rax",
    "add rsp, 8",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    ".popsection",
);

unsafe extern "sysv64" {
    fn portcullis_hv_vmrun(vmcb: u64, regs: *mut GuestRegs);
}

/// Runs the guest of the VMCB at physical `vmcb` until its next #VMEXIT.
///
/// The VMCB must be complete (`crate::vmcb::Vmcb::new`): nested paging on
/// with a table that maps only the guest's frames and its device's
/// registers, so nothing the guest does reaches host memory; SVM enabled
/// (`enable`).
pub fn vmrun(vmcb: u64, regs: &mut GuestRegs) {
    // SAFETY: the trampoline follows the SysV ABI (callee-saved registers
    // restored, stack balanced); VMRUN restores the host's RSP, RIP, RAX,
    // control registers, segments and descriptor tables from the save
    // area on #VMEXIT. The guest runs under nested paging that maps only
    // its own frames and edu's registers, with ASID 1 (never the host's
    // 0), so it cannot change host memory or TLB entries. FS, GS, TR and
    // LDTR are neither loaded nor saved (no VMLOAD/VMSAVE): the guest does
    // not touch them, so the host's stay.
    unsafe { portcullis_hv_vmrun(vmcb, regs) }
}

unsafe extern "C" {
    static portcullis_guest_start: u8;
    static portcullis_guest_end: u8;
    static portcullis_cmd_start: u8;
    static portcullis_cmd_end: u8;
}

/// The guest program's bytes (`crate::guest`), to copy into its memory.
pub fn guest_image() -> &'static [u8] {
    // SAFETY: both symbols are labels of one read-only section defined in
    // `crate::guest`'s `global_asm!`, start before end; the bytes between
    // them are immutable for the program's life.
    unsafe {
        let start = &raw const portcullis_guest_start;
        let end = &raw const portcullis_guest_end;
        core::slice::from_raw_parts(start, end.offset_from(start) as usize)
    }
}

/// The shared-table guest's program (`crate::guest::cmd`).
pub fn cmd_image() -> &'static [u8] {
    // SAFETY: both symbols are labels of one read-only section defined in
    // `crate::guest`'s second `global_asm!`, start before end; the bytes
    // between them are immutable for the program's life.
    unsafe {
        let start = &raw const portcullis_cmd_start;
        let end = &raw const portcullis_cmd_end;
        core::slice::from_raw_parts(start, end.offset_from(start) as usize)
    }
}
