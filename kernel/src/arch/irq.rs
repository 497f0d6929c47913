//! Device interrupts: the local APIC (xAPIC or x2APIC mode), and IDT
//! vectors 0x20-0x2f that call handlers registered at run time.
//!
//! Interrupts stay disabled (IF = 0) unless a caller enables them with
//! [`enable`]; the legacy 8259 PICs are masked so that only message-signalled
//! interrupts sent to the local APIC (an IOMMU's fault event, say) arrive.
//! A handler runs with interrupts disabled on the interrupted stack; it must
//! not take a lock that interrupted code may hold (the heap's included), so
//! handlers record the event (atomics) and leave the work to normal code.

use core::arch::global_asm;
use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicU64, AtomicUsize, Ordering};

/// First device vector.
pub const FIRST_VECTOR: u8 = 0x20;
/// Number of device vectors with stubs.
pub const VECTORS: usize = 16;
/// The local APIC's spurious-interrupt vector (no EOI for it).
pub const SPURIOUS_VECTOR: u8 = 0xff;

// Stubs: push the vector, save the registers a SysV call may clobber (the
// kernel target has no SSE state and no red zone), call `irq_entry` with
// the vector and the interrupted RIP (just above the vector in the frame)
// on a 16-byte aligned stack, restore and return from the interrupt.
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
            "mov rsi, [rsp + 88]",
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
    /// A compatibility-format MSI cannot name this (x2APIC) id.
    WideApicId(u32),
}

impl core::fmt::Display for IrqError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoStub(v) => write!(f, "vector {v:#x} has no interrupt stub"),
            Self::Busy(v) => write!(f, "vector {v:#x} already has a handler"),
            Self::NoApic => write!(f, "the local APIC is not set up"),
            Self::WideApicId(id) => write!(f, "APIC id {id:#x} does not fit a compatibility-format MSI (8 bits)"),
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

extern "C" fn irq_entry(vector: u64, rip: u64) {
    if vector as u8 == crate::profile::VECTOR && crate::profile::sample(rip) {
        eoi();
        return;
    }
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
// Local APIC: xAPIC (memory-mapped page) or x2APIC (MSRs)
// ---------------------------------------------------------------------------

/// How the local APIC is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicMode {
    /// xAPIC: registers in the 4 KiB page at the MADT's address, 8-bit ids.
    XApic,
    /// x2APIC: registers are MSRs 0x800-0x8ff, 32-bit ids.
    X2Apic,
}

// Register offsets in the xAPIC page; the x2APIC MSR of the same register
// is 0x800 + offset / 16.
const LAPIC_ID: usize = 0x20;
const LAPIC_TPR: usize = 0x80;
const LAPIC_EOI: usize = 0xb0;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_ICR_LOW: usize = 0x300;
const LAPIC_ICR_HIGH: usize = 0x310;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_TIMER_INITIAL: usize = 0x380;
const LAPIC_TIMER_DIVIDE: usize = 0x3e0;
/// LVT timer: periodic mode (bit 17) and masked (bit 16).
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
const LVT_MASKED: u32 = 1 << 16;

/// IA32_APIC_BASE and its enable bits.
const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_EXTD: u64 = 1 << 10;
const APIC_BASE_EN: u64 = 1 << 11;

/// CPUID.1:ECX bit 21: the CPU has x2APIC mode.
const CPUID1_ECX_X2APIC: u32 = 1 << 21;

static LAPIC: AtomicPtr<u32> = AtomicPtr::new(core::ptr::null_mut());
/// 0: not set up; 1: xAPIC; 2: x2APIC.
static MODE: AtomicU8 = AtomicU8::new(0);

fn x2apic_msr(offset: usize) -> u32 {
    0x800 + (offset / 16) as u32
}

fn rdmsr(msr: u32) -> u64 {
    // SAFETY: only architectural MSRs this CPU has (IA32_APIC_BASE, and
    // the x2APIC range once x2APIC mode is on) are read.
    unsafe { x86_64::registers::model_specific::Msr::new(msr).read() }
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: as for `rdmsr`; the values written are the ones the SDM
    // allows for the register (EOI 0, enable bits in order, ...).
    unsafe { x86_64::registers::model_specific::Msr::new(msr).write(value) }
}

fn lapic_reg(offset: usize) -> Option<*mut u32> {
    let base = LAPIC.load(Ordering::Acquire);
    // In bounds of the 4 KiB register page mapped by `init`.
    (!base.is_null()).then(|| base.wrapping_byte_add(offset))
}

fn lapic_write(offset: usize, value: u32) {
    match mode() {
        Some(ApicMode::X2Apic) => wrmsr(x2apic_msr(offset), value as u64),
        Some(ApicMode::XApic) => {
            if let Some(r) = lapic_reg(offset) {
                // SAFETY: `r` is a register of the local APIC page mapped
                // uncached by `init`; registers are 32-bit and 16-byte
                // aligned.
                unsafe { r.write_volatile(value) }
            }
        }
        None => {}
    }
}

fn lapic_read(offset: usize) -> Option<u32> {
    match mode()? {
        ApicMode::X2Apic => Some(rdmsr(x2apic_msr(offset)) as u32),
        // SAFETY: as for `lapic_write`.
        ApicMode::XApic => lapic_reg(offset).map(|r| unsafe { r.read_volatile() }),
    }
}

fn eoi() {
    // (x2APIC: a non-zero write to the EOI MSR is a #GP.)
    lapic_write(LAPIC_EOI, 0);
}

/// Whether the CPU can run its local APIC in x2APIC mode.
pub fn cpu_has_x2apic() -> bool {
    core::arch::x86_64::__cpuid(1).ecx & CPUID1_ECX_X2APIC != 0
}

/// Masks the 8259 PICs and software-enables the local APIC with the
/// spurious vector 0xff. Interrupts stay off.
///
/// With `x2apic` asked and the CPU able (CPUID.1:ECX.x2APIC), the APIC is
/// switched to x2APIC mode (IA32_APIC_BASE: EN, then EXTD) and driven
/// through its MSRs; otherwise it stays in xAPIC mode, driven through the
/// register page at `base` (from the MADT). An APIC the firmware left in
/// x2APIC mode stays there (leaving it needs a full disable). Returns the
/// mode it runs in.
pub fn init(base: u64, x2apic: bool) -> Result<ApicMode, crate::mem::paging::MapError> {
    // Firmware leaves the PICs delivering the timer at vector 8 (a double
    // fault for us): mask every line.
    super::port::outb(0x21, 0xff);
    super::port::outb(0xa1, 0xff);
    let apic_base = rdmsr(IA32_APIC_BASE);
    let already = apic_base & (APIC_BASE_EN | APIC_BASE_EXTD) == APIC_BASE_EN | APIC_BASE_EXTD;
    if already || (x2apic && cpu_has_x2apic()) {
        // Disabled -> x2APIC directly is an invalid transition: enable
        // xAPIC first.
        if apic_base & APIC_BASE_EN == 0 {
            wrmsr(IA32_APIC_BASE, apic_base | APIC_BASE_EN);
        }
        wrmsr(IA32_APIC_BASE, apic_base | APIC_BASE_EN | APIC_BASE_EXTD);
        MODE.store(2, Ordering::Release);
    } else {
        let regs = crate::mem::map_mmio(base, 4096)?;
        LAPIC.store(regs.cast(), Ordering::Release);
        MODE.store(1, Ordering::Release);
    }
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR as u32);
    Ok(mode().unwrap_or(ApicMode::XApic))
}

/// How the local APIC runs (`None`: not set up).
pub fn mode() -> Option<ApicMode> {
    match MODE.load(Ordering::Acquire) {
        1 => Some(ApicMode::XApic),
        2 => Some(ApicMode::X2Apic),
        _ => None,
    }
}

/// Whether the local APIC runs in x2APIC mode.
pub fn x2apic() -> bool {
    mode() == Some(ApicMode::X2Apic)
}

/// This CPU's local APIC id, if the APIC is set up: the 8-bit xAPIC id
/// (ID register bits 31:24), or the 32-bit x2APIC id.
pub fn apic_id() -> Option<u32> {
    let v = lapic_read(LAPIC_ID)?;
    Some(if x2apic() { v } else { v >> 24 })
}

/// IA32_APIC_BASE as it is now (EN bit 11, EXTD bit 10), for tests and
/// the report.
pub fn apic_base_msr() -> u64 {
    rdmsr(IA32_APIC_BASE)
}

/// Sends `vector` to this CPU as a fixed interrupt through the ICR
/// (destination shorthand "self"; in x2APIC mode one 64-bit MSR write).
pub fn self_ipi(vector: u8) -> Result<(), IrqError> {
    slot(vector)?;
    let low = 1 << 18 | vector as u32;
    match mode().ok_or(IrqError::NoApic)? {
        ApicMode::X2Apic => wrmsr(x2apic_msr(LAPIC_ICR_LOW), low as u64),
        ApicMode::XApic => {
            lapic_write(LAPIC_ICR_HIGH, 0);
            lapic_write(LAPIC_ICR_LOW, low);
        }
    }
    Ok(())
}

/// The MSI address and data that deliver `vector` to this CPU (fixed
/// delivery, physical destination, edge) in compatibility format, which
/// holds an 8-bit destination only: an APIC id above 255 is refused.
pub fn msi_for(vector: u8) -> Result<(u64, u32), IrqError> {
    slot(vector)?;
    let id = apic_id().ok_or(IrqError::NoApic)?;
    let id8 = u8::try_from(id).map_err(|_| IrqError::WideApicId(id))?;
    Ok((0xfee0_0000 | (id8 as u64) << 12, vector as u32))
}

/// Starts the local APIC timer in periodic mode: `vector` every `count`
/// bus clocks (divide by 1).
pub fn timer_periodic(vector: u8, count: u32) -> Result<(), IrqError> {
    slot(vector)?;
    mode().ok_or(IrqError::NoApic)?;
    lapic_write(LAPIC_TIMER_DIVIDE, 0b1011);
    lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_PERIODIC | vector as u32);
    lapic_write(LAPIC_TIMER_INITIAL, count);
    Ok(())
}

/// Stops the local APIC timer (masked, count 0).
pub fn timer_stop() {
    lapic_write(LAPIC_TIMER_INITIAL, 0);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
}

/// Sets IF: registered interrupts are taken from now on.
pub fn enable() {
    x86_64::instructions::interrupts::enable();
}

/// Clears IF.
pub fn disable() {
    x86_64::instructions::interrupts::disable();
}
