//! Addresses fixed by the linker script and the entry code, for the kernel's
//! page-table builder and frame allocator.

/// Physical (= virtual, identity-mapped) range of one part of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// The kernel image's parts as linked, from the linker-script symbols.
#[derive(Debug, Clone, Copy)]
pub struct ImageLayout {
    /// The whole image, `.text` through `.bss` (includes boot page tables and stacks).
    pub image: Span,
    /// Executable code.
    pub text: Span,
    /// Read-only data (and the PVH note).
    pub rodata: Span,
    /// `.data` and `.bss`: writable, not executable.
    pub data: Span,
    /// The 4 KiB guard page below the boot stack, left unmapped so an
    /// overflow faults instead of corrupting `.bss`.
    pub stack_guard: Span,
    /// The boot stack (above the guard page).
    pub stack: Span,
}

#[cfg(target_os = "none")]
mod symbols {
    unsafe extern "C" {
        pub static __kernel_start: u8;
        pub static __kernel_end: u8;
        pub static __rodata_start: u8;
        pub static __data_start: u8;
        pub static pvh_stack_guard: u8;
        pub static pvh_stack_bottom: u8;
        pub static pvh_stack_top: u8;
    }
}

/// The image layout of the running kernel.
#[cfg(target_os = "none")]
pub fn image_layout() -> ImageLayout {
    use core::ptr::addr_of;
    use symbols::*;
    // Only the addresses of these linker symbols are taken; they are never read.
    let a = |p: *const u8| p as u64;
    let start = a(addr_of!(__kernel_start));
    let rodata = a(addr_of!(__rodata_start));
    let data = a(addr_of!(__data_start));
    let end = a(addr_of!(__kernel_end));
    ImageLayout {
        image: Span { start, end },
        text: Span { start, end: rodata },
        rodata: Span { start: rodata, end: data },
        data: Span { start: data, end },
        stack_guard: Span { start: a(addr_of!(pvh_stack_guard)), end: a(addr_of!(pvh_stack_bottom)) },
        stack: Span { start: a(addr_of!(pvh_stack_bottom)), end: a(addr_of!(pvh_stack_top)) },
    }
}
