//! The PVH entry: Xen ELF note, 32-bit start-up, switch to long mode.
//!
//! Entry state (PVH boot ABI): 32-bit protected mode, paging off, flat 4 GiB
//! segments, interrupts off, `%ebx` = physical address of `hvm_start_info`,
//! no stack. The code below runs at its link address, so it may use absolute
//! addresses of its own symbols.
//!
//! The boot page tables identity-map the low 4 GiB with 2 MiB pages. They only
//! have to carry the kernel until it builds its own tables (with a direct map
//! of all RAM, uncached MMIO and an unmapped stack guard page).

use crate::start_info::{BootInfo, read_start_info};
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;

// Xen ELF note (XEN_ELFNOTE_PHYS32_ENTRY = 18): name "Xen", a 4-byte
// descriptor holding the 32-bit physical entry address.
core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

    .section .bss.pvh_tables, "aw", @nobits
    .balign 4096
pvh_pml4:
    .skip 4096
pvh_pdpt:
    .skip 4096
pvh_pd:
    .skip 4096 * 4

    .section .bss.pvh_stack, "aw", @nobits
    .balign 4096
    .global pvh_stack_guard
    .global pvh_stack_bottom
    .global pvh_stack_top
pvh_stack_guard:
    .skip 4096
pvh_stack_bottom:
    .skip 256 * 1024
pvh_stack_top:

    .section .rodata.pvh_gdt, "a"
    .balign 16
pvh_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
pvh_gdt_end:
    .balign 4
    .word 0
pvh_gdt_ptr:
    .word pvh_gdt_end - pvh_gdt - 1
    .long pvh_gdt

    .section .text.pvh_entry, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi

    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb

    mov $pvh_stack_top, %esp

    mov $pvh_pdpt, %eax
    or $0x3, %eax
    mov %eax, pvh_pml4

    mov $pvh_pd, %eax
    or $0x3, %eax
    xor %ecx, %ecx
1:
    mov %eax, pvh_pdpt(,%ecx,8)
    add $4096, %eax
    inc %ecx
    cmp $4, %ecx
    jb 1b

    xor %ecx, %ecx
2:
    mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, pvh_pd(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 2b

    mov %cr4, %eax
    or $(1 << 5), %eax
    mov %eax, %cr4

    mov $pvh_pml4, %eax
    mov %eax, %cr3

    mov $0xc0000080, %ecx
    rdmsr
    or $((1 << 8) | (1 << 11)), %eax
    wrmsr

    mov %cr0, %eax
    or $((1 << 31) | (1 << 16) | 1), %eax
    mov %eax, %cr0

    lgdt pvh_gdt_ptr
    ljmp $0x08, $pvh_start64

    .code64
pvh_start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $pvh_stack_top, %rsp
    xor %ebp, %ebp
    mov %esi, %edi
    call pvh_rust_entry
3:
    hlt
    jmp 3b
    "#,
    options(att_syntax)
);

/// Where the start info is copied: the kernel's `.bss`, written once by
/// [`pvh_rust_entry`] before any other Rust code runs and read-only after.
struct BootInfoCell(UnsafeCell<MaybeUninit<BootInfo>>);

// SAFETY: written exactly once, on the only CPU, before the kernel entry runs
// and before any reference to it exists; shared read-only afterwards.
unsafe impl Sync for BootInfoCell {}

static BOOT_INFO: BootInfoCell = BootInfoCell(UnsafeCell::new(MaybeUninit::uninit()));

unsafe extern "Rust" {
    /// Defined by the kernel binary through [`crate::entry_point!`].
    fn __portcullis_kernel_main(info: &'static BootInfo) -> !;
}

/// First Rust code: copy the start info out of low RAM, then enter the kernel.
#[unsafe(no_mangle)]
extern "C" fn pvh_rust_entry(start_info_paddr: u64) -> ! {
    let info = read_start_info(start_info_paddr, |addr, buf| {
        // The boot tables identity-map the low 4 GiB; QEMU puts the start
        // info, its memory map and the command line in low RAM.
        let end = addr.checked_add(buf.len() as u64)?;
        if end > 1 << 32 || addr == 0 {
            return None;
        }
        // SAFETY: [addr, end) lies in the identity-mapped low 4 GiB and is
        // memory the boot protocol handed us to read; nothing writes it
        // concurrently (one CPU, interrupts off).
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        Some(())
    });
    // SAFETY: the single write to BOOT_INFO, before any reader exists (see
    // BootInfoCell); after it the cell is only read.
    let info: &'static BootInfo = unsafe {
        let slot = &mut *BOOT_INFO.0.get();
        slot.write(info)
    };
    // SAFETY: the kernel binary defines this symbol with the declared
    // signature through `entry_point!`.
    unsafe { __portcullis_kernel_main(info) }
}
