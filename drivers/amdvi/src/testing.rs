//! A register-level model of one AMD-Vi unit, for host tests (feature
//! `testing`): the driver's own tests and those of crates built on it run
//! against the same model.
//!
//! What it models (QEMU's behaviour where the spec leaves room):
//! * the registers with QEMU's write semantics: Status W1C, head/tail
//!   pointer masks, the command head register left at the ring size for a
//!   moment after the last slot;
//! * a command processor that runs once IommuEn and CmdBufEn are both set,
//!   consuming the buffer on tail writes (or slowly, one command per call
//!   of [`RegisterModel::run`], when [`State::lazy`]), fetching commands
//!   through the test's [`DeviceMemory`]; COMPLETION_WAIT stores its data
//!   there;
//! * illegal commands (reserved bits QEMU checks, unknown opcodes, or one
//!   a test names with [`State::fail_command`]) as the spec has them: an
//!   ILLEGAL_COMMAND_ERROR event naming the command's address, CmdBufRun
//!   cleared, and the head left at the command, which does not run; the
//!   unit fetches again only once CmdBufEn is cleared and set. The head
//!   register takes writes only while CmdBufEn is clear. With
//!   [`State::qemu_illegal_commands`] it does what QEMU does instead: the
//!   event is logged and the command runs on, CmdBufRun left set;
//! * a QEMU-like IOTLB for [`RegisterModel::dma`]: translations cached per
//!   device and page, tagged and dropped by domain (INVALIDATE_DEVTAB_ENTRY
//!   drops nothing, as in QEMU);
//! * an event log the test appends to ([`RegisterModel::log_event`]), with
//!   overflow.
//!
//! Every command the unit runs is decoded (from the bits, independently of
//! the driver's encoders) into [`Invalidation`] and appended to a log with
//! the memory's ordering stamp ([`DeviceMemory::stamp`]), so a test can
//! check that each change to the tables was followed by the invalidation
//! that covers it.

use crate::cmd::{self, Command};
use crate::dte::{DeviceTableEntry, DteKind};
use crate::event::{self, Event};
use crate::regs::{self, Control, Mmio, Status};
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
pub use portcullis_iommu::testing::DeviceMemory;
use spin::{Mutex, MutexGuard};

/// QEMU's Extended Feature Register: PreF, PPR, GT, IA, GA, HE, GATS = 2,
/// HATS = 2 (6 levels).
pub const QEMU_EFR: u64 = 0x29d3;

/// One command the unit ran, decoded from its bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// COMPLETION_WAIT: the store it made (address, data), if S.
    CompletionWait {
        /// (address, data) stored.
        store: Option<(u64, u64)>,
    },
    /// INVALIDATE_DEVTAB_ENTRY.
    DeviceTableEntry(u16),
    /// INVALIDATE_IOMMU_PAGES of `domain_id` for `[start, last]`; `pde`
    /// also drops page-directory entries; `pasid` when GN.
    IommuPages {
        /// Domain id.
        domain_id: u16,
        /// First byte.
        start: u64,
        /// Last byte (inclusive; `u64::MAX` for every page).
        last: u64,
        /// PDE.
        pde: bool,
        /// The PASID, when GN = 1.
        pasid: Option<u32>,
    },
    /// INVALIDATE_INTERRUPT_TABLE.
    InterruptTable(u16),
    /// INVALIDATE_IOMMU_ALL.
    All,
    /// Any other command (its two words).
    Other([u64; 2]),
}

impl Invalidation {
    /// Whether this drops what the unit cached of `device_id`'s device
    /// table entry.
    pub fn covers_device(&self, device_id: u16) -> bool {
        matches!(*self, Self::All) || *self == Self::DeviceTableEntry(device_id)
    }

    /// Whether this drops IOTLB entries of `domain_id` (host translation,
    /// no PASID) for `iova`; with `tables`, page-directory entries too.
    pub fn covers_pages(&self, domain_id: u16, iova: u64, tables: bool) -> bool {
        match *self {
            Self::All => true,
            Self::IommuPages { domain_id: d, start, last, pde, pasid: None } => {
                d == domain_id && (start..=last).contains(&iova) && (pde || !tables)
            }
            _ => false,
        }
    }

    /// Whether this drops what the unit cached of `device_id`'s interrupt
    /// remapping table.
    pub fn covers_interrupts(&self, device_id: u16) -> bool {
        matches!(*self, Self::All) || *self == Self::InterruptTable(device_id)
    }
}

/// The byte range an INVALIDATE_IOMMU_PAGES word 1 names (spec §2.4.3):
/// one page without S; with S, the first zero address bit from bit 12 up
/// marks the size (bit n zero: 2^(n + 1) bytes).
fn page_range(w1: u64) -> (u64, u64) {
    let addr = w1 & !0xfff;
    if w1 & 1 == 0 {
        return (addr, addr | 0xfff);
    }
    let bits = ((addr >> 12).trailing_ones() + 13).min(64);
    if bits == 64 {
        return (0, u64::MAX);
    }
    let size = 1u64 << bits;
    let start = addr & !(size - 1);
    (start, start + (size - 1))
}

fn decode(c: Command) -> Invalidation {
    let [w0, w1] = c.0;
    match c.opcode() {
        cmd::COMPLETION_WAIT => {
            Invalidation::CompletionWait { store: (w0 & 1 != 0).then_some((w0 & 0x000f_ffff_ffff_fff8, w1)) }
        }
        cmd::INVALIDATE_DEVTAB_ENTRY => Invalidation::DeviceTableEntry(w0 as u16),
        cmd::INVALIDATE_IOMMU_PAGES => {
            let (start, last) = page_range(w1);
            Invalidation::IommuPages {
                domain_id: (w0 >> 32) as u16,
                start,
                last,
                pde: w1 >> 1 & 1 != 0,
                pasid: (w1 >> 2 & 1 != 0).then_some((w0 & 0xf_ffff) as u32),
            }
        }
        cmd::INVALIDATE_INTERRUPT_TABLE => Invalidation::InterruptTable(w0 as u16),
        cmd::INVALIDATE_IOMMU_ALL => Invalidation::All,
        _ => Invalidation::Other(c.0),
    }
}

/// One entry of the model's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logged {
    /// The command as fetched.
    pub command: Command,
    /// What it does.
    pub what: Invalidation,
    /// [`DeviceMemory::stamp`] when it ran.
    pub stamp: u64,
}

/// What a DMA of a device meets ([`RegisterModel::dma`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dma {
    /// Refused.
    Blocked,
    /// Passed on untranslated.
    Untranslated,
    /// Translated through the table at `root`, tagged `domain`.
    Translated {
        /// Domain id the IOTLB entry is tagged with.
        domain: u16,
        /// Page-table root.
        root: u64,
    },
}

/// The unit's register state, open to tests.
#[derive(Debug, Default)]
pub struct State {
    /// EFR.
    pub efr: u64,
    /// Device Table Base Address register.
    pub dev_table: u64,
    /// Command Buffer Base Address register.
    pub cmd_base: u64,
    /// Event Log Base Address register.
    pub evt_base: u64,
    /// Control.
    pub control: Control,
    /// Exclusion base and limit.
    pub excl: [u64; 2],
    /// Internal command head.
    pub cmd_head: u64,
    /// The command head register (QEMU leaves it at the ring size after
    /// the last slot).
    pub cmd_head_reg: u64,
    /// Command tail.
    pub cmd_tail: u64,
    /// Event log head.
    pub evt_head: u64,
    /// Event log tail.
    pub evt_tail: u64,
    /// Status.
    pub status: Status,
    /// Every register write, in order: (offset, value).
    pub writes: Vec<(usize, u64)>,
    /// Every command run, oldest first.
    pub log: Vec<Logged>,
    /// Entries not blocked when IommuEn was set (counted then).
    pub unblocked_at_enable: Option<usize>,
    /// The IOTLB: (device, page) -> (domain tag, translation).
    pub iotlb: BTreeMap<(u16, u64), (u16, Dma)>,
    /// Commands with reserved bits set, or unknown ones.
    pub illegal_commands: usize,
    /// The command processor stopped at an illegal command (the head names
    /// it): CmdBufRun reads 0 and nothing runs until software clears
    /// CmdBufEn and sets it again.
    pub halted: bool,
    /// Test knob: the `n`th command fetched from now (1-based) is illegal,
    /// as though a reserved bit were set; the ones before it run.
    pub fail_command: Option<u32>,
    /// Test knob: illegal commands as QEMU (10.x) treats them: the
    /// ILLEGAL_COMMAND_ERROR event is logged, the command runs anyway, the
    /// head moves past it and CmdBufRun stays set.
    pub qemu_illegal_commands: bool,
    /// Command head writes while CmdBufEn was set (undefined in the spec;
    /// the model ignores them).
    pub head_writes_while_enabled: usize,
    /// Test knob: never run commands or report CmdBufRun.
    pub stuck: bool,
    /// Test knob: a command processor halted at an illegal command does
    /// not restart when CmdBufEn is cleared and set again (a broken unit).
    pub stays_halted: bool,
    /// Test knob: run commands only in [`RegisterModel::run`].
    pub lazy: bool,
    /// The head register read as the ring size at least once.
    pub head_at_ring_end_seen: bool,
    /// Tail writes that passed the head.
    pub overruns: usize,
}

/// The model of one unit: an [`Mmio`] for the driver (clones share the
/// unit), and accessors for the test.
#[derive(Clone)]
pub struct RegisterModel {
    state: Arc<Mutex<State>>,
    mem: Arc<dyn DeviceMemory>,
}

impl fmt::Debug for RegisterModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "amdvi::testing::RegisterModel(EFR {:#x})", self.state.lock().efr)
    }
}

fn ring_bytes(base_reg: u64) -> u64 {
    16 << ((base_reg >> 56) & 0xf)
}

impl RegisterModel {
    /// A unit reporting `efr`, everything off, fetching from and storing
    /// to `mem`.
    pub fn new(efr: u64, mem: Arc<dyn DeviceMemory>) -> Self {
        Self { state: Arc::new(Mutex::new(State { efr, ..State::default() })), mem }
    }

    /// The register state (lock held while the guard lives: do not call
    /// the driver meanwhile).
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// The command log so far.
    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().log.clone()
    }

    /// The command log so far, emptying it.
    pub fn take_log(&self) -> Vec<Logged> {
        core::mem::take(&mut self.state.lock().log)
    }

    /// The commands run so far, emptying the log.
    pub fn processed(&self) -> Vec<Command> {
        self.take_log().into_iter().map(|l| l.command).collect()
    }

    /// The device table the unit reads (base and entries covered) while
    /// translation is on.
    pub fn device_table(&self) -> Option<(u64, u32)> {
        let s = self.state.lock();
        let entries = ((s.dev_table & regs::dev_table::MAX_SIZE) as u32 + 1) * 128;
        s.control.contains(Control::IOMMU_EN).then_some((s.dev_table & regs::BASE_MASK, entries))
    }

    fn running(s: &State) -> bool {
        !s.stuck && !s.halted && s.control.contains(Control::IOMMU_EN | Control::CMD_BUF_EN)
    }

    /// Whether `c` has a reserved bit set that QEMU checks, or an opcode
    /// the model does not know.
    fn reserved_bits_set(c: Command) -> bool {
        let [w0, w1] = c.0;
        match c.opcode() {
            cmd::COMPLETION_WAIT => w0 >> 52 & 0xff != 0,
            // QEMU caches neither: it checks the reserved bits only.
            cmd::INVALIDATE_DEVTAB_ENTRY | cmd::INVALIDATE_INTERRUPT_TABLE => {
                w0 >> 16 & ((1 << 44) - 1) != 0 || w1 != 0
            }
            cmd::INVALIDATE_IOMMU_PAGES => w0 >> 20 & 0xfff != 0 || w0 >> 48 & 0xfff != 0 || w1 >> 3 & 0x1ff != 0,
            cmd::INVALIDATE_IOMMU_ALL => w0 & ((1 << 60) - 1) != 0 || w1 != 0,
            _ => true,
        }
    }

    fn exec_one(&self, s: &mut State) {
        let size = ring_bytes(s.cmd_base);
        let at = (s.cmd_base & regs::BASE_MASK) + s.cmd_head;
        let c = Command([self.mem.read_u64(at), self.mem.read_u64(at + 8)]);
        let mut illegal = Self::reserved_bits_set(c);
        if let Some(n) = s.fail_command {
            if n <= 1 {
                s.fail_command = None;
                illegal = true;
            } else {
                s.fail_command = Some(n - 1);
            }
        }
        if illegal {
            s.illegal_commands += 1;
            self.log_event_locked(s, Event::encode(event::ILLEGAL_COMMAND_ERROR, 0, 0, 0, at));
            if !s.qemu_illegal_commands {
                // The spec: the processor stops here, the head names the
                // command, and it does not run.
                s.halted = true;
                s.status -= Status::CMD_BUF_RUN;
                return;
            }
        }
        let what = decode(c);
        match what {
            Invalidation::CompletionWait { store: Some((addr, data)) } => self.mem.write_u64(addr, data),
            // QEMU drops every entry of the domain, whatever the range.
            Invalidation::IommuPages { domain_id, .. } => s.iotlb.retain(|_, (d, _)| *d != domain_id),
            Invalidation::All => s.iotlb.clear(),
            _ => {}
        }
        let stamp = self.mem.stamp();
        s.log.push(Logged { command: c, what, stamp });
        s.cmd_head += 16;
        s.cmd_head_reg = s.cmd_head;
        if s.cmd_head >= size {
            s.head_at_ring_end_seen = true;
            s.cmd_head = 0;
        }
    }

    fn run_locked(&self, s: &mut State, limit: usize) {
        let mut n = 0;
        while Self::running(s) && s.cmd_head != s.cmd_tail && n < limit {
            self.exec_one(s);
            n += 1;
        }
    }

    /// Runs at most `limit` pending commands (a lazy unit runs only here).
    pub fn run(&self, limit: usize) {
        let mut s = self.state.lock();
        self.run_locked(&mut s, limit);
    }

    fn update_status(s: &mut State) {
        let on = s.control.contains(Control::IOMMU_EN);
        s.status -= Status::CMD_BUF_RUN | Status::EVENT_LOG_RUN;
        if Self::running(s) {
            s.status |= Status::CMD_BUF_RUN;
        }
        if on && s.control.contains(Control::EVENT_LOG_EN) && !s.status.contains(Status::EVENT_OVERFLOW) {
            s.status |= Status::EVENT_LOG_RUN;
        }
    }

    fn dte_locked(&self, s: &State, device: u16) -> DeviceTableEntry {
        let at = (s.dev_table & regs::BASE_MASK) + device as u64 * 32;
        DeviceTableEntry([0, 8, 16, 24].map(|o| self.mem.read_u64(at + o)))
    }

    /// A DMA by `device` to `addr`: the IOTLB first (as QEMU), then the
    /// device table entry; successful translations are cached.
    pub fn dma(&self, device: u16, addr: u64) -> Dma {
        let mut s = self.state.lock();
        if !s.control.contains(Control::IOMMU_EN) {
            return Dma::Untranslated;
        }
        let page = addr >> 12;
        if let Some((_, t)) = s.iotlb.get(&(device, page)) {
            return *t;
        }
        let e = self.dte_locked(&s, device);
        let t = match e.kind() {
            DteKind::Invalid | DteKind::PassThrough => Dma::Untranslated,
            DteKind::Translated { root, domain_id, .. } => Dma::Translated { domain: domain_id, root },
            _ => Dma::Blocked,
        };
        if t != Dma::Blocked {
            s.iotlb.insert((device, page), (e.domain_id(), t));
        }
        t
    }

    /// The unit logs an event (dropped while the log is off or overflowed;
    /// a full log sets EventOverflow and stops logging).
    pub fn log_event(&self, raw: [u64; 2]) -> bool {
        let mut s = self.state.lock();
        self.log_event_locked(&mut s, raw)
    }

    fn log_event_locked(&self, s: &mut State, raw: [u64; 2]) -> bool {
        if !s.status.contains(Status::EVENT_LOG_RUN) {
            return false;
        }
        let size = ring_bytes(s.evt_base);
        let next = (s.evt_tail + 16) % size;
        if next == s.evt_head {
            s.status |= Status::EVENT_OVERFLOW;
            s.status -= Status::EVENT_LOG_RUN;
            return false;
        }
        let at = (s.evt_base & regs::BASE_MASK) + s.evt_tail;
        self.mem.write_u64(at, raw[0]);
        self.mem.write_u64(at + 8, raw[1]);
        s.evt_tail = next;
        true
    }
}

impl Mmio for RegisterModel {
    fn read32(&self, off: usize) -> u32 {
        panic!("AMD-Vi model: 32-bit read at {off:#x}: every register the driver uses is 64-bit")
    }

    fn write32(&self, off: usize, v: u32) {
        panic!("AMD-Vi model: 32-bit write at {off:#x} = {v:#x}")
    }

    fn read64(&self, off: usize) -> u64 {
        let s = self.state.lock();
        match off {
            0x0000 => s.dev_table,
            0x0008 => s.cmd_base,
            0x0010 => s.evt_base,
            0x0018 => s.control.bits(),
            0x0020 => s.excl[0],
            0x0028 => s.excl[1],
            0x0030 => s.efr,
            0x2000 => s.cmd_head_reg,
            0x2008 => s.cmd_tail,
            0x2010 => s.evt_head,
            0x2018 => s.evt_tail,
            0x2020 => s.status.bits(),
            _ => panic!("AMD-Vi model: unexpected read at {off:#x}"),
        }
    }

    fn write64(&self, off: usize, v: u64) {
        let mut s = self.state.lock();
        s.writes.push((off, v));
        match off {
            0x0000 => s.dev_table = v,
            0x0008 => {
                s.cmd_base = v;
                (s.cmd_head, s.cmd_head_reg, s.cmd_tail) = (0, 0, 0);
            }
            0x0010 => {
                s.evt_base = v;
                (s.evt_head, s.evt_tail) = (0, 0);
            }
            0x0018 => {
                let was_on = s.control.contains(Control::IOMMU_EN);
                s.control = Control::from_bits_retain(v);
                if !s.control.contains(Control::CMD_BUF_EN) && !s.stays_halted {
                    // Restarted by clearing CmdBufEn (and setting it again).
                    s.halted = false;
                }
                if !was_on && s.control.contains(Control::IOMMU_EN) {
                    let pages = (s.dev_table & 0x1ff) + 1;
                    let bad =
                        (0..pages * 128).filter(|&d| self.dte_locked(&s, d as u16).kind() != DteKind::Blocked).count();
                    s.unblocked_at_enable = Some(bad);
                }
                Self::update_status(&mut s);
                if !s.lazy {
                    self.run_locked(&mut s, usize::MAX);
                }
            }
            0x0020 => s.excl[0] = v,
            0x0028 => s.excl[1] = v | 0xfff,
            0x2000 => {
                if s.control.contains(Control::CMD_BUF_EN) {
                    s.head_writes_while_enabled += 1;
                } else {
                    s.cmd_head = v & regs::POINTER_MASK;
                    s.cmd_head_reg = s.cmd_head;
                }
            }
            0x2008 => {
                let size = ring_bytes(s.cmd_base);
                let new = v & regs::POINTER_MASK;
                // The producer must not write past the consumer.
                let free = (s.cmd_head + size - s.cmd_tail - 16) % size;
                let added = (new + size - s.cmd_tail) % size;
                if added > free {
                    s.overruns += 1;
                }
                s.cmd_tail = new;
                if !s.lazy {
                    self.run_locked(&mut s, usize::MAX);
                }
            }
            0x2010 => s.evt_head = v & regs::POINTER_MASK,
            0x2018 => s.evt_tail = v & regs::POINTER_MASK,
            0x2020 => {
                s.status -= Status::from_bits_retain(v) & Status::W1C;
                Self::update_status(&mut s);
            }
            _ => panic!("AMD-Vi model: unexpected write at {off:#x} = {v:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::PageRange;

    /// The model's decoder agrees with the driver's encoders.
    #[test]
    fn decodes_what_the_driver_encodes() {
        assert_eq!(
            decode(Command::completion_wait(0x1234_5678, 9)),
            Invalidation::CompletionWait { store: Some((0x1234_5678, 9)) }
        );
        assert_eq!(decode(Command::invalidate_devtab_entry(0x0108)), Invalidation::DeviceTableEntry(0x108));
        assert_eq!(decode(Command::invalidate_interrupt_table(0x0600)), Invalidation::InterruptTable(0x600));
        assert_eq!(decode(Command::invalidate_all()), Invalidation::All);
        let one = decode(Command::invalidate_pages(5, PageRange::Block { addr: 0x4000, order: 0 }, false));
        assert_eq!(
            one,
            Invalidation::IommuPages { domain_id: 5, start: 0x4000, last: 0x4fff, pde: false, pasid: None }
        );
        assert!(one.covers_pages(5, 0x4abc, false) && !one.covers_pages(5, 0x4000, true));
        let two_m = decode(Command::invalidate_pages(5, PageRange::Block { addr: 0x20_0000, order: 9 }, true));
        assert_eq!(
            two_m,
            Invalidation::IommuPages { domain_id: 5, start: 0x20_0000, last: 0x3f_ffff, pde: true, pasid: None }
        );
        assert!(two_m.covers_pages(5, 0x3f_f000, true) && !two_m.covers_pages(5, 0x40_0000, true));
        let all = decode(Command::invalidate_pages(7, PageRange::All, true));
        assert!(all.covers_pages(7, u64::MAX, true) && !all.covers_pages(6, 0, false));
        assert!(Invalidation::All.covers_device(3) && Invalidation::All.covers_interrupts(3));
    }
}
