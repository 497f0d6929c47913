//! COM1 console through `uart_16550`, and the `log` backend on top of it.
//!
//! Output goes through one spin lock. The fatal path ([`crate::fatal`])
//! takes the port with [`force_unlock`] first, so a panic while printing
//! still gets its report out.

use core::fmt::{self, Write};
use spin::Mutex;
use uart_16550::{Config, Uart16550, backend::PioBackend};

struct Console {
    uart: Option<Uart16550<PioBackend>>,
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { uart: None });

/// COM1's I/O base.
pub const COM1: u16 = 0x3f8;

/// Initialises COM1. Without a UART (some hardware) output is dropped.
pub fn init() {
    // SAFETY: 0x3f8..0x400 is the standard COM1 register block; nothing else
    // in the kernel uses these ports.
    let uart = unsafe { Uart16550::new_port(COM1) };
    let mut console = CONSOLE.lock();
    console.uart = uart.ok().and_then(|mut u| u.init(Config::default()).ok().map(|_| u));
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(uart) = self.uart.as_mut() {
            for chunk in s.as_bytes().split_inclusive(|&b| b == b'\n') {
                if let Some((b'\n', body)) = chunk.split_last() {
                    uart.send_bytes_exact(body);
                    uart.send_bytes_exact(b"\r\n");
                } else {
                    uart.send_bytes_exact(chunk);
                }
            }
        }
        Ok(())
    }
}

/// Writes formatted text to the console (used by [`print!`](crate::print)).
pub fn write_fmt(args: fmt::Arguments<'_>) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        let _ = CONSOLE.lock().write_fmt(args);
    });
}

/// Nothing is buffered in software; kept so exit paths read naturally.
pub fn flush() {}

/// Breaks the console lock on the fatal path, where the holder will never
/// run again (single CPU, no return from the fatal handler).
pub fn force_unlock() {
    if CONSOLE.is_locked() {
        // SAFETY: called only from the fatal path with interrupts off on the
        // only running CPU; the previous holder was interrupted and never
        // resumes, so no two users of the UART run at once.
        unsafe { CONSOLE.force_unlock() };
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!($($arg)*)) };
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

struct Logger;

static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let ms = crate::time::uptime_ns() / 1_000_000;
            crate::println!("[{:>4}.{:03}] {:<5} {}", ms / 1000, ms % 1000, record.level(), record.args());
        }
    }
    fn flush(&self) {}
}

/// Installs the serial logger with the given maximum level.
pub fn init_logger(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
