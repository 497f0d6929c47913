//! Device interrupts: the local APIC, and IDT vectors 0x20-0x2f that call
//! handlers registered at run time.
//!
//! Interrupts stay disabled (IF = 0) unless a caller enables them with
//! [`enable`]; the legacy 8259 PICs are masked so that only message-signalled
//! interrupts sent to the local APIC (an IOMMU's fault event, say) arrive.
//! A handler runs with interrupts disabled on the interrupted stack; it must
//! not take a lock that interrupted code may hold (the heap's included), so
//! handlers record the event (atomics) and leave the work to normal code.

use core::arch::global_asm;
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// First device vector.
pub const FIRST_VECTOR: u8 = 0x20;
/// Number of device vectors with stubs.
pub const VECTORS: usize = 16;
/// The local APIC's spurious-interrupt vector (no EOI for it).
pub const SPURIOUS_VECTOR: u8 = 0xff;

// Stubs: push the vector, save the registers a SysV call may clobber (the
// kernel target has no SSE state and no red zone), call `irq_entry` on a
// 16-byte aligned stack, restore and return from the interrupt.
macro_rules! irq_stubs {
    ($($vec:literal),* $(,)?) => {
        global_asm!(
            ".section .text.irq_stubs, \"ax\"",
            ".balign 16",
            ".global portcullis_irq_stubs",
            "portcullis_irq_stubs:",
            $( concat!(".balign 16\n push ", $vec, "\n jmp irq_common"), )*
            ".balign 16",
            ".global portcullis_irq_spurious",
            "portcullis_irq_spurious:",
            "iretq",
            "irq_common:",
            "push rax", "push rcx", "push rdx", "push rsi", "push rdi",
            "push r8", "push r9", "push r10", "push r11", "push rbx",
            "mov rbx, rsp",
            "mov rdi, [rsp + 80]",
            "and rsp, -16",
            "cld",
            "call {entry}",
            "mov rsp, rbx",
            "pop rbx", "pop r11", "pop r10", "pop r9", "pop r8",
            "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rax",
            "add rsp, 8",
            "iretq",
            entry = sym irq_entry,
        );
    };
}

irq_stubs!(32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47);

unsafe extern "C" {
    static portcullis_irq_stubs: u8;
    static portcullis_irq_spurious: u8;
}

/// Address of the stub for device vector `FIRST_VECTOR + i`.
pub(super) fn stub(i: usize) -> u64 {
    core::ptr::addr_of!(portcullis_irq_stubs) as u64 + 16 * i as u64
}

/// Address of the spurious-vector stub.
pub(super) fn spurious_stub() -> u64 {
    core::ptr::addr_of!(portcullis_irq_spurious) as u64
}

/// Registered handlers (fn pointers as usize; 0 = none).
static HANDLERS: [AtomicUsize; VECTORS] = [const { AtomicUsize::new(0) }; VECTORS];
/// Interrupts taken per vector (handled or not).
static COUNTS: [AtomicU64; VECTORS] = [const { AtomicU64::new(0) }; VECTORS];

/// Why a vector cannot be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqError {
    /// Outside `FIRST_VECTOR .. FIRST_VECTOR + VECTORS`.
    NoStub(u8),
    /// Someone else's handler is there.
    Busy(u8),
    /// The local APIC is not set up (see [`init`]).
    NoApic,
}

impl core::fmt::Display for IrqError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoStub(v) => write!(f, "vector {v:#x} has no interrupt stub"),
            Self::Busy(v) => write!(f, "vector {v:#x} already has a handler"),
            Self::NoApic => write!(f, "the local APIC is not set up"),
        }
    }
}

fn slot(vector: u8) -> Result<usize, IrqError> {
    let i = vector.wrapping_sub(FIRST_VECTOR) as usize;
    if i < VECTORS { Ok(i) } else { Err(IrqError::NoStub(vector)) }
}

/// Installs `handler` for `vector`.
pub fn register(vector: u8, handler: fn()) -> Result<(), IrqError> {
    let i = slot(vector)?;
    HANDLERS[i]
        .compare_exchange(0, handler as usize, Ordering::AcqRel, Ordering::Acquire)
        .map(|_| ())
        .map_err(|_| IrqError::Busy(vector))
}

/// Whether `handler` is the one registered for `vector`.
pub fn handler_is(vector: u8, handler: fn()) -> bool {
    slot(vector).is_ok_and(|i| HANDLERS[i].load(Ordering::Acquire) == handler as usize)
}

/// Removes the handler of `vector`.
pub fn unregister(vector: u8) {
    if let Ok(i) = slot(vector) {
        HANDLERS[i].store(0, Ordering::Release);
    }
}

/// Interrupts taken on `vector` so far.
pub fn count(vector: u8) -> u64 {
    slot(vector).map_or(0, |i| COUNTS[i].load(Ordering::Acquire))
}

extern "C" fn irq_entry(vector: u64) {
    if let Ok(i) = slot(vector as u8) {
        COUNTS[i].fetch_add(1, Ordering::AcqRel);
        let h = HANDLERS[i].load(Ordering::Acquire);
        if h != 0 {
            // SAFETY: only `register` stores here, and it stores `fn()`
            // pointers.
            let f: fn() = unsafe { core::mem::transmute::<usize, fn()>(h) };
            f();
        }
    }
    eoi();
}

// ---------------------------------------------------------------------------
// Local APIC (xAPIC, memory-mapped)
// ---------------------------------------------------------------------------

const LAPIC_ID: usize = 0x20;
const LAPIC_TPR: usize = 0x80;
const LAPIC_EOI: usize = 0xb0;
const LAPIC_SVR: usize = 0xf0;

static LAPIC: AtomicPtr<u32> = AtomicPtr::new(core::ptr::null_mut());

fn lapic_reg(offset: usize) -> Option<*mut u32> {
    let base = LAPIC.load(Ordering::Acquire);
    // In bounds of the 4 KiB register page mapped by `init`.
    (!base.is_null()).then(|| base.wrapping_byte_add(offset))
}

fn lapic_write(offset: usize, value: u32) {
    if let Some(r) = lapic_reg(offset) {
        // SAFETY: `r` is a register of the local APIC page mapped uncached
        // by `init`; registers are 32-bit and 16-byte aligned.
        unsafe { r.write_volatile(value) }
    }
}

fn lapic_read(offset: usize) -> Option<u32> {
    // SAFETY: as for `lapic_write`.
    lapic_reg(offset).map(|r| unsafe { r.read_volatile() })
}

fn eoi() {
    lapic_write(LAPIC_EOI, 0);
}

/// Masks the 8259 PICs and software-enables the local APIC at `base`
/// (from the MADT) with the spurious vector 0xff. Interrupts stay off.
pub fn init(base: u64) -> Result<(), crate::mem::paging::MapError> {
    // Firmware leaves the PICs delivering the timer at vector 8 (a double
    // fault for us): mask every line.
    super::port::outb(0x21, 0xff);
    super::port::outb(0xa1, 0xff);
    let regs = crate::mem::map_mmio(base, 4096)?;
    LAPIC.store(regs.cast(), Ordering::Release);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR as u32);
    Ok(())
}

/// This CPU's local APIC id, if the APIC is set up.
pub fn apic_id() -> Option<u8> {
    lapic_read(LAPIC_ID).map(|v| (v >> 24) as u8)
}

/// The MSI address and data that deliver `vector` to this CPU (fixed
/// delivery, physical destination, edge).
pub fn msi_for(vector: u8) -> Result<(u64, u32), IrqError> {
    slot(vector)?;
    let id = apic_id().ok_or(IrqError::NoApic)?;
    Ok((0xfee0_0000 | (id as u64) << 12, vector as u32))
}

/// Sets IF: registered interrupts are taken from now on.
pub fn enable() {
    x86_64::instructions::interrupts::enable();
}

/// Clears IF.
pub fn disable() {
    x86_64::instructions::interrupts::disable();
}
