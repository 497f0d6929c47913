//! Ending a QEMU run with a status through `isa-debug-exit` (port 0xf4).
//!
//! QEMU exits with `(value << 1) | 1`. The values are shared with xtask,
//! which maps the exit status back to an outcome.

/// I/O port of `-device isa-debug-exit,iobase=0xf4,iosize=4`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// Everything passed / the report finished (QEMU status 33).
    Success = 0x10,
    /// At least one test failed, cleanly (QEMU status 35).
    Failure = 0x11,
    /// A panic or CPU exception ended the run (QEMU status 37); a test
    /// runner restarts after the test that was running.
    Crash = 0x12,
}

/// Ends the QEMU run. On hardware (no debug-exit device) the write does
/// nothing and the CPU halts.
pub fn exit_qemu(code: ExitCode) -> ! {
    crate::serial::flush();
    super::port::outl(DEBUG_EXIT_PORT, code as u32);
    super::halt_forever()
}
