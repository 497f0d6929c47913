//! Port I/O wrappers for the fixed legacy ports the kernel uses (PIT, port
//! 0x61, isa-debug-exit). Each port number here is a platform constant.

use x86_64::instructions::port::Port;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    let mut p = Port::<u8>::new(port);
    // SAFETY: callers use only the legacy PC ports named in this kernel
    // (PIT 0x40-0x43, 0x61, the PIC masks 0x21/0xa1, debug exit 0xf4); writing them has no memory effect.
    unsafe { p.write(value) }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let mut p = Port::<u8>::new(port);
    // SAFETY: as for `outb`: reads of legacy PC ports have no memory effect.
    unsafe { p.read() }
}

/// Writes a dword to an I/O port.
pub fn outl(port: u16, value: u32) {
    let mut p = Port::<u32>::new(port);
    // SAFETY: as for `outb`.
    unsafe { p.write(value) }
}
