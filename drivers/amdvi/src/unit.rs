//! One AMD-Vi unit (one IVHD): bring-up, device table entries, the
//! command buffer with completion waits, invalidation, and the event log.
//!
//! Invariants:
//! * Every wait on the hardware has a timeout from the [`Clock`] and fails
//!   with an error naming the unit and the register.
//! * From [`Unit::enable`] on, every device id the device table covers has
//!   a valid entry (V = 1, TV = 1): blocked unless attached or passed
//!   through. No entry is ever invalid, since V = 0 lets DMA through
//!   untranslated.
//! * A device table entry changes in steps that are each safe to be seen:
//!   a live entry is first blocked, then the high words change, then word 0
//!   (V, TV, Mode, root, IR, IW) is written last in one 64-bit store.
//! * After an entry changes, the unit is told with INVALIDATE_DEVTAB_ENTRY
//!   *and* INVALIDATE_IOMMU_PAGES for the domain the old entry tagged its
//!   IOTLB entries with (QEMU ignores the first; its IOTLB is dropped by
//!   domain), then one COMPLETION_WAIT.
//! * Every batch of commands ends with one COMPLETION_WAIT storing a fresh
//!   sequence number; the driver waits for that store. A unit that stops
//!   fetching meanwhile (Status.CmdBufRun clear: an illegal command or a
//!   fetch error, the head left at it) fails the batch with
//!   [`HwError::QueueError`] at once, as does an ILLEGAL_COMMAND_ERROR or
//!   COMMAND_HARDWARE_ERROR event naming one of the batch's slots (QEMU logs
//!   one and runs on); either way the rest of the batch is dropped (the
//!   head set to the tail while CmdBufEn is clear) and the command buffer
//!   restarted before the error is returned, so later batches run (a
//!   unit that does not stop or run again for the restart makes the error
//!   a [`HwError::Timeout`] on Status.CmdBufRun instead). The
//!   caller keeps whatever the batch was to make safe. The producer reads
//!   the hardware head before reusing a slot and never fills the ring (one
//!   slot stays free, so head == tail always means empty).
//! * Domain id 0 is reserved for blocked and pass-through entries.
//! * Device table, command buffer, event log and completion-wait page come
//!   from the [`ContiguousMemory`]; all of them are allocated by `enable`
//!   and freed by `disable` (or by a failed `enable`, which leaves nothing
//!   behind). When the walker does not snoop, changed lines are flushed
//!   before the unit may see them.

use crate::caps::Caps;
use crate::cmd::{Command, PageRange, range_commands};
use crate::dte::{DeviceTableEntry, DteKind, Interrupts};
use crate::event::Event;
use crate::memory::ContiguousMemory;
use crate::regs::{self, Control, Mmio, Status};
use alloc::vec::Vec;
use core::fmt;
pub use portcullis_iommu::{HwError, UnitError};

/// Monotonic time for timeouts.
pub use portcullis_iommu::Clock;

/// How long any single hardware wait may take.
pub const TIMEOUT_NS: u64 = 100_000_000;

/// log2 of the command buffer and event log entry counts: 256 entries of
/// 16 bytes, one 4 KiB page each (the smallest size the spec allows).
pub const RING_LEN_LOG2: u32 = regs::log_len::MIN;
/// Bytes in the command buffer and in the event log.
pub const RING_BYTES: u64 = 16 << RING_LEN_LOG2;
pub use crate::cmd::MAX_RANGE_COMMANDS;
/// Events kept in [`Unit::event_log`].
pub const EVENT_LOG_KEEP: usize = 256;

/// A driver error: the unit's register base and what went wrong there
/// (plain data, no strings; see [`HwError`]).
pub type Error = UnitError;

/// Whether the allocator hands out `domain_id`: not 0 (blocked and
/// pass-through entries), and not with bit 8 set. QEMU before its
/// reserved-mask fix (upstream ff3dcb3bf6, "Fix masks for various IOMMU
/// reserved bits") treats DTE bit 72, DomainID bit 8, as reserved and
/// refuses DMA through such an entry; 32767 ids remain, more than any
/// hypervisor needs.
pub const fn usable_domain_id(domain_id: u16) -> bool {
    domain_id != 0 && domain_id & 0x100 == 0
}

/// Commands issued (for benchmarks and tests: "one wait per unmap").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InvalidationStats {
    /// Commands issued, completion waits excluded.
    pub commands: u64,
    /// COMPLETION_WAIT commands (each one waited for).
    pub waits: u64,
}

/// What `enable` allocated.
#[derive(Debug, Clone, Copy)]
struct Rings {
    dev_table: u64,
    dev_table_pages: usize,
    cmd_buf: u64,
    /// Next free byte offset in the command buffer (the tail we wrote).
    cmd_tail: u64,
    event_log: u64,
    /// Next byte offset to read in the event log (the head we wrote).
    event_head: u64,
    /// Entries from `event_head` on already looked at for command errors
    /// (see [`Unit::command_error_logged`]).
    events_checked: u64,
    wait_page: u64,
}

/// One AMD-Vi unit.
pub struct Unit<M: Mmio, T: ContiguousMemory, C: Clock> {
    /// Register base (the IVHD's), naming the unit in errors.
    base: u64,
    mmio: M,
    mem: T,
    clock: C,
    caps: Caps,
    last_device_id: u16,
    coherent: bool,
    rings: Option<Rings>,
    wait_seq: u64,
    next_domain: u32,
    free_domains: Vec<u16>,
    events: Vec<Event>,
    overflows: u64,
    unity: Vec<UnityRange>,
    /// Per-device interrupt remapping tables.
    irq_tables: alloc::collections::BTreeMap<u16, IrqTable>,
    /// The devices whose entry translates through each domain id (kept
    /// by [`Self::set_dte`], the one writer of single entries), so a
    /// domain going away finds what is still attached to it.
    domain_users: alloc::collections::BTreeMap<u16, alloc::collections::BTreeSet<u16>>,
    /// Table sizes (log2 of the entries) reserved per device with
    /// [`Self::reserve_interrupts`].
    irq_reserved: alloc::collections::BTreeMap<u16, u8>,
    /// x2APIC destinations: 128-bit table entries (Control.GAEn) with
    /// 32-bit APIC ids (Control.XTEn).
    x2apic: bool,
    /// Command counters.
    pub stats: InvalidationStats,
}

impl<M: Mmio, T: ContiguousMemory, C: Clock> fmt::Debug for Unit<M, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Unit(IVHD @{:#x}, {}, devices 0..={:#06x}, enabled {})",
            self.base,
            self.caps,
            self.last_device_id,
            self.rings.is_some()
        )
    }
}

/// A range the firmware requires identity-mapped for some devices (an IVMD
/// block with the unity or exclusion flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnityRange {
    /// First device id it applies to.
    pub first_id: u16,
    /// Last device id (inclusive).
    pub last_id: u16,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub last: u64,
    /// Devices may read it.
    pub read: bool,
    /// Devices may write it.
    pub write: bool,
}

impl UnityRange {
    /// The range an IVMD block asks for, if it asks for one: type 0x20 for
    /// every device, 0x21 for one, 0x22 for `device_id..=aux_data`; flags
    /// bit 0 (unity, with IR bit 1 and IW bit 2) or bit 3 (exclusion range:
    /// untranslated read-write access, which the driver gives by mapping
    /// it one-to-one read-write instead of enabling the exclusion
    /// registers). `None` for blocks with neither flag or an empty range.
    pub fn from_ivmd(kind: u8, flags: u8, device_id: u16, aux_data: u16, start: u64, length: u64) -> Option<Self> {
        let (first_id, last_id) = match kind {
            0x20 => (0, 0xffff),
            0x21 => (device_id, device_id),
            0x22 => (device_id, aux_data.max(device_id)),
            _ => return None,
        };
        let exclusion = flags & 8 != 0;
        if (flags & 1 == 0 && !exclusion) || length == 0 {
            return None;
        }
        let last = start.checked_add(length - 1)?;
        Some(Self {
            first_id,
            last_id,
            start,
            last,
            read: exclusion || flags & 2 != 0,
            write: exclusion || flags & 4 != 0,
        })
    }
}

/// Entries per device interrupt remapping table when none was reserved
/// ([`Unit::reserve_interrupts`]): 2^6 = 64.
pub const IRQ_TABLE_LOG2: u8 = 6;

/// The smallest reserved table: 2 entries (IntTabLen 1), even for a
/// function with one vector, so a VMM can route a new vector before it
/// frees the old one when the guest reprograms the MSI (and a function's
/// second route, as the in-guest `msi_through_route` makes on the one-vector
/// edu, still has an entry).
pub const IRQ_TABLE_MIN_LOG2: u8 = 1;

/// The largest table: 512 entries (IntTabLen 9), though IntTabLen allows
/// 2048. QEMU (10.0.2) reads the delivery mode from bits 10:8 of the MSI
/// data before it looks at the table and remaps only fixed (0) or
/// arbitrated (1) delivery, so an index from 512 up (bit 9 or 10 set) is
/// refused there (drivers/amdvi/README.md). Functions with more vectors
/// share the 512 entries.
pub const IRQ_TABLE_MAX_LOG2: u8 = 9;

/// log2 of the table a function with `vectors` MSI/MSI-X vectors gets: the
/// next power of two, between [`IRQ_TABLE_MIN_LOG2`] and
/// [`IRQ_TABLE_MAX_LOG2`].
pub const fn irq_table_log2(vectors: u16) -> u8 {
    let v = if vectors == 0 { 1 } else { vectors as u32 };
    let log2 = v.next_power_of_two().trailing_zeros() as u8;
    if log2 < IRQ_TABLE_MIN_LOG2 {
        IRQ_TABLE_MIN_LOG2
    } else if log2 > IRQ_TABLE_MAX_LOG2 {
        IRQ_TABLE_MAX_LOG2
    } else {
        log2
    }
}

/// One device's interrupt remapping table: `pages` pages from `base`
/// (contiguous when more than one), 2^`log2` entries, a bit per entry in
/// use.
struct IrqTable {
    base: u64,
    pages: usize,
    log2: u8,
    used: Vec<u64>,
}

impl IrqTable {
    fn entries(&self) -> usize {
        1 << self.log2
    }
    fn in_use(&self, index: u16) -> bool {
        (index as usize) < self.entries() && self.used[index as usize / 64] >> (index % 64) & 1 != 0
    }
    /// The page holding 64-bit word `word` of the table, and the word's
    /// index there.
    fn word(&self, word: usize) -> (u64, usize) {
        (self.base + (word / 512) as u64 * 4096, word % 512)
    }
}

impl<M: Mmio, T: ContiguousMemory, C: Clock> Unit<M, T, C> {
    /// Takes over the unit whose registers are at `base` (the IVHD's base
    /// address; `mmio` reaches them): reads its Extended Feature Register.
    /// Nothing is allocated or enabled yet. `last_device_id` is the highest device id
    /// (requester id) the unit must cover, from the IVHD's device entries;
    /// the device table is sized for `0..=last_device_id`, rounded up to
    /// whole 4 KiB pages (128 entries each).
    pub fn new(base: u64, mmio: M, mem: T, clock: C, last_device_id: u16) -> Self {
        let caps = Caps::from_efr(mmio.get64(regs::EXT_FEATURE));
        Self {
            base,
            mmio,
            mem,
            clock,
            caps,
            last_device_id,
            coherent: true,
            rings: None,
            wait_seq: 0,
            next_domain: 1,
            free_domains: Vec::new(),
            events: Vec::new(),
            overflows: 0,
            unity: Vec::new(),
            irq_tables: alloc::collections::BTreeMap::new(),
            domain_users: alloc::collections::BTreeMap::new(),
            irq_reserved: alloc::collections::BTreeMap::new(),
            x2apic: false,
            stats: InvalidationStats::default(),
        }
    }

    /// Adds the PCI capability header and Miscellaneous Information
    /// register 0 the kernel read from config space (optional; they refine
    /// [`Self::caps`]).
    pub fn set_pci_capability(&mut self, header: u32, misc: u32) {
        self.caps.cap_header = Some(header);
        self.caps.misc = Some(misc);
    }

    /// Whether the unit's fetches snoop CPU caches (the IVHD Coherent
    /// flag; default `true`). Takes effect at the next [`Self::enable`],
    /// which programs Control.Coherent from it; when `false` the driver
    /// flushes every line it changes in the unit's structures.
    pub fn set_coherent(&mut self, coherent: bool) {
        self.coherent = coherent;
    }

    /// Whether interrupt routes name 32-bit x2APIC ids (for a kernel whose
    /// local APICs run in x2APIC mode). Takes effect at the next
    /// [`Self::enable`], which then sets Control.GAEn (128-bit interrupt
    /// table entries, GuestMode clear) and Control.XTEn. Needs EFR.XTSup
    /// and EFR.GASup (the 32-bit entry holds an 8-bit id only); a unit
    /// without them is an error naming the missing one, as is a change
    /// while the unit runs (its tables would be in the other format).
    pub fn set_x2apic(&mut self, on: bool) -> Result<(), Error> {
        if on && !self.caps.x2apic() {
            return Err(self.err(HwError::Unsupported("x2APIC interrupt destinations (EFR.XTSup)")));
        }
        if on && !self.caps.guest_apic() {
            return Err(
                self.err(HwError::Unsupported("x2APIC destinations need 128-bit interrupt table entries (EFR.GASup)"))
            );
        }
        if self.rings.is_some() && on != self.x2apic {
            return Err(self.err(HwError::Invalid("the interrupt entry format changes only while the unit is off")));
        }
        self.x2apic = on;
        Ok(())
    }

    /// Whether interrupt routes name 32-bit x2APIC ids (see
    /// [`Self::set_x2apic`]).
    pub fn x2apic_interrupts(&self) -> bool {
        self.x2apic
    }

    /// The unit's register base (as the IVHD gives it; errors carry it).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Its capabilities.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// The highest device id the device table covers as asked for.
    pub fn last_device_id(&self) -> u16 {
        self.last_device_id
    }

    /// Whether [`Self::enable`] succeeded and [`Self::disable`] has not run.
    pub fn is_enabled(&self) -> bool {
        self.rings.is_some()
    }

    /// Device table pages for `0..=last_device_id`.
    pub fn dev_table_pages(&self) -> usize {
        ((self.last_device_id as usize + 1) * DeviceTableEntry::SIZE as usize).div_ceil(4096)
    }

    /// The table memory (domains allocate their page tables from the same
    /// pool).
    pub fn memory_mut(&mut self) -> &mut T {
        &mut self.mem
    }

    /// The table memory, read-only.
    pub fn memory(&self) -> &T {
        &self.mem
    }

    /// Whether changed lines are flushed for the unit to see them.
    pub fn flushes(&self) -> bool {
        !self.coherent || !self.mem.coherent()
    }

    /// An error of this unit.
    fn err(&self, cause: HwError) -> Error {
        UnitError { unit: self.base, cause }
    }

    fn err_no_memory(&self) -> Error {
        self.err(HwError::NoMemory)
    }

    fn not_enabled(&self) -> Error {
        self.err(HwError::NotEnabled)
    }

    fn wait_until(&self, register: &'static str, mut done: impl FnMut(&Self) -> bool) -> Result<(), Error> {
        let start = self.clock.now_ns();
        loop {
            if done(self) {
                return Ok(());
            }
            let waited = self.clock.now_ns().saturating_sub(start);
            if waited > TIMEOUT_NS {
                // One last look before giving up.
                if done(self) {
                    return Ok(());
                }
                return Err(self.err(HwError::Timeout { register, waited_ns: waited }));
            }
            core::hint::spin_loop();
        }
    }

    /// Allocates the device table, rings and completion-wait page; on
    /// failure frees what it got.
    fn allocate(&mut self) -> Result<Rings, Error> {
        let pages = self.dev_table_pages();
        let dev_table = self.mem.alloc_contiguous(pages).ok_or_else(|| self.err_no_memory())?;
        let mut got = Vec::with_capacity(3);
        for _ in 0..3 {
            match self.mem.alloc_table() {
                Some(p) => got.push(p),
                None => {
                    for p in got {
                        self.mem.free_table(p);
                    }
                    self.mem.free_contiguous(dev_table, pages);
                    return Err(self.err_no_memory());
                }
            }
        }
        Ok(Rings {
            dev_table,
            dev_table_pages: pages,
            cmd_buf: got[0],
            cmd_tail: 0,
            event_log: got[1],
            event_head: 0,
            events_checked: 0,
            wait_page: got[2],
        })
    }

    fn release(&mut self, r: Rings) {
        for (_, table) in core::mem::take(&mut self.irq_tables) {
            self.free_irq_table(table);
        }
        self.mem.free_table(r.wait_page);
        self.mem.free_table(r.event_log);
        self.mem.free_table(r.cmd_buf);
        self.mem.free_contiguous(r.dev_table, r.dev_table_pages);
    }

    /// Brings the unit up (spec §3.4 programming order): translation off,
    /// device table with every entry blocked, command buffer and event log
    /// programmed and enabled, exclusion range off, then IommuEn; then
    /// every cache flushed (INVALIDATE_IOMMU_ALL when EFR.IASup, else
    /// every device table entry and every domain id handed out so far) and
    /// one completion wait. QEMU runs commands only once IommuEn and
    /// CmdBufEn are both set, hence the flush after IommuEn; every entry is
    /// blocked by then. A failure turns the unit off again and frees
    /// everything.
    pub fn enable(&mut self) -> Result<(), Error> {
        if self.rings.is_some() {
            return Ok(());
        }
        // Firmware may have left it on: stop everything first.
        if regs::read_control(&self.mmio).intersects(Control::RUNNING) {
            self.mmio.set64(regs::CONTROL, 0);
        }
        let r = self.allocate()?;
        // Every entry of every page blocked, DMA and interrupts (the unit
        // may index any entry the Size field covers). Words 1 and 3 are
        // already zero.
        let blocked = DeviceTableEntry::blocked();
        self.domain_users.clear();
        for page in 0..r.dev_table_pages as u64 {
            for e in 0..(4096 / DeviceTableEntry::SIZE) as usize {
                self.mem.write(r.dev_table + page * 4096, e * 4 + 2, blocked.0[2]);
                self.mem.write(r.dev_table + page * 4096, e * 4, blocked.0[0]);
            }
        }
        if self.flushes() {
            self.mem.flush(r.dev_table, r.dev_table_pages as u64 * 4096);
        }
        self.mmio.set64(regs::DEV_TABLE_BASE, regs::dev_table::value(r.dev_table, r.dev_table_pages as u64));
        self.mmio.set64(regs::CMD_BUF_BASE, regs::log_len::value(r.cmd_buf, RING_LEN_LOG2));
        self.mmio.set64(regs::CMD_BUF_HEAD, 0);
        self.mmio.set64(regs::CMD_BUF_TAIL, 0);
        self.mmio.set64(regs::EVENT_LOG_BASE, regs::log_len::value(r.event_log, RING_LEN_LOG2));
        self.mmio.set64(regs::EVENT_LOG_HEAD, 0);
        self.mmio.set64(regs::EVENT_LOG_TAIL, 0);
        // An exclusion range would let DMA bypass translation.
        self.mmio.set64(regs::EXCLUSION_BASE, 0);
        self.mmio.set64(regs::EXCLUSION_LIMIT, 0);
        self.mmio.set64(regs::STATUS, Status::W1C.bits());
        let coherent = if self.coherent { Control::COHERENT } else { Control::empty() };
        let x2apic = if self.x2apic { Control::GA_EN | Control::XT_EN } else { Control::empty() };
        let ctrl = coherent | x2apic | Control::CMD_BUF_EN | Control::EVENT_LOG_EN;
        self.mmio.set64(regs::CONTROL, ctrl.bits());
        self.mmio.set64(regs::CONTROL, (ctrl | Control::IOMMU_EN).bits());
        self.rings = Some(r);
        let flushed = self
            .wait_until("Status.CmdBufRun", |u| regs::read_status(&u.mmio).contains(Status::CMD_BUF_RUN))
            .and_then(|()| self.flush_everything());
        if let Err(e) = flushed {
            self.mmio.set64(regs::CONTROL, 0);
            if let Some(r) = self.rings.take() {
                self.release(r);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Turns translation, the command buffer and the event log off and
    /// frees the unit's structures. Every device's DMA passes untranslated
    /// afterwards, so do this only when no device may DMA.
    pub fn disable(&mut self) -> Result<(), Error> {
        let r = self.rings.take().ok_or_else(|| self.not_enabled())?;
        let ctrl = regs::read_control(&self.mmio);
        self.mmio.set64(regs::CONTROL, (ctrl - Control::RUNNING).bits());
        self.release(r);
        Ok(())
    }

    /// The commands that drop every cached translation and entry.
    fn everything(&self) -> Vec<Command> {
        if self.caps.invalidate_all() {
            return alloc::vec![Command::invalidate_all()];
        }
        let mut cmds: Vec<Command> = (0..=self.last_device_id).map(Command::invalidate_devtab_entry).collect();
        let used = (0..self.next_domain).filter(|&d| d == 0 || usable_domain_id(d as u16));
        cmds.extend(used.map(|d| Command::invalidate_pages(d as u16, PageRange::All, true)));
        cmds
    }

    fn flush_everything(&mut self) -> Result<(), Error> {
        let cmds = self.everything();
        self.submit(&cmds)
    }

    /// Writes `cmds` and one COMPLETION_WAIT to the command buffer and
    /// waits until the unit has stored the wait's sequence number. A
    /// command error (see the invariants) is [`HwError::QueueError`] with
    /// the Status register's value, after the command buffer was emptied
    /// and restarted.
    fn submit(&mut self, cmds: &[Command]) -> Result<(), Error> {
        let r = self.rings.ok_or_else(|| self.not_enabled())?;
        // Sequence numbers only grow, so a stale store never matches and
        // the page needs no clearing (a CPU write there could race the
        // unit's store on a non-coherent path).
        self.wait_seq += 1;
        let seq = self.wait_seq;
        let mut all = cmds.to_vec();
        all.push(Command::completion_wait(r.wait_page, seq));
        let slots = RING_BYTES / Command::SIZE;
        let start = r.cmd_tail;
        let mut tail = start;
        for chunk in all.chunks(slots as usize - 1) {
            let need = chunk.len() as u64 * Command::SIZE;
            // Room: never overtake the hardware head; keep one slot free.
            // The head is reduced modulo the ring: QEMU leaves it at the
            // ring size for a moment after processing the last slot.
            let room = self.wait_commands("Command Buffer Head", |u| {
                let head = (u.mmio.get64(regs::CMD_BUF_HEAD) & regs::POINTER_MASK) % RING_BYTES;
                (head + RING_BYTES - tail - Command::SIZE) % RING_BYTES >= need
            })?;
            if let Some(status) = room {
                return Err(self.command_error(status, start, all.len()));
            }
            let first = tail;
            for c in chunk {
                let i = (tail / 8) as usize;
                self.mem.write(r.cmd_buf, i, c.0[0]);
                self.mem.write(r.cmd_buf, i + 1, c.0[1]);
                tail = (tail + Command::SIZE) % RING_BYTES;
            }
            if self.flushes() {
                if first < tail {
                    self.mem.flush(r.cmd_buf + first, tail - first);
                } else {
                    self.mem.flush(r.cmd_buf + first, RING_BYTES - first);
                    if tail > 0 {
                        self.mem.flush(r.cmd_buf, tail);
                    }
                }
            }
            self.mmio.set64(regs::CMD_BUF_TAIL, tail);
            if let Some(rr) = self.rings.as_mut() {
                rr.cmd_tail = tail;
            }
        }
        self.stats.commands += cmds.len() as u64;
        self.stats.waits += 1;
        let waited =
            self.wait_commands("Command Buffer Head (COMPLETION_WAIT store)", |u| u.mem.read(r.wait_page, 0) == seq)?;
        if let Some(status) = waited {
            return Err(self.command_error(status, start, all.len()));
        }
        // QEMU logs an illegal command and runs on (CmdBufRun stays set,
        // the wait stores): the event is the only sign.
        if self.command_error_logged(start, all.len()) {
            let status = regs::read_status(&self.mmio);
            return Err(self.command_error(status, start, all.len()));
        }
        Ok(())
    }

    /// Waits for `done` while the command processor runs: `Ok(None)` once
    /// done, `Ok(Some(status))` when the unit stopped fetching commands
    /// first (Status.CmdBufRun clear; `status` as read then).
    fn wait_commands(
        &self,
        register: &'static str,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<Option<Status>, Error> {
        let mut halted = None;
        self.wait_until(register, |u| {
            if done(u) {
                return true;
            }
            let status = regs::read_status(&u.mmio);
            if status.contains(Status::CMD_BUF_RUN) {
                return false;
            }
            // It may have finished just before it stopped.
            if done(u) {
                return true;
            }
            halted = Some(status);
            true
        })?;
        Ok(halted)
    }

    /// The error for a batch of `count` commands from ring offset `start`
    /// that met a command error, once the command buffer is running again
    /// (see [`Self::restart_commands`]).
    fn command_error(&mut self, status: Status, start: u64, count: usize) -> Error {
        // Events the batch caused are not held against a later one.
        self.command_error_logged(start, count);
        match self.restart_commands() {
            // The Status bits defined so far all fit in 32 bits.
            Ok(()) => self.err(HwError::QueueError { status: status.bits() as u32 }),
            // The worse news: the unit runs no command now.
            Err(e) => e,
        }
    }

    /// After a command error: the unit stopped at the command the head
    /// names (or, QEMU, went past it), and fetches again only once
    /// CmdBufEn is cleared and set. Everything up to the tail is dropped
    /// (the head register, writable only while CmdBufEn is clear, is set
    /// to the tail: the batch failed and its caller keeps what it was to
    /// make safe), then CmdBufEn is set again and CmdBufRun waited for. A
    /// unit that does not stop or does not run again is a
    /// [`HwError::Timeout`] on Status.CmdBufRun.
    fn restart_commands(&mut self) -> Result<(), Error> {
        let Some(r) = self.rings else { return Ok(()) };
        let ctrl = regs::read_control(&self.mmio);
        self.mmio.set64(regs::CONTROL, (ctrl - Control::CMD_BUF_EN).bits());
        let stopped =
            self.wait_until("Status.CmdBufRun", |u| !regs::read_status(&u.mmio).contains(Status::CMD_BUF_RUN));
        if stopped.is_ok() {
            self.mmio.set64(regs::CMD_BUF_HEAD, r.cmd_tail);
        }
        self.mmio.set64(regs::CONTROL, (ctrl | Control::CMD_BUF_EN).bits());
        let running = self.wait_until("Status.CmdBufRun", |u| regs::read_status(&u.mmio).contains(Status::CMD_BUF_RUN));
        stopped.and(running)
    }

    /// Whether an event not looked at before is an ILLEGAL_COMMAND_ERROR or
    /// COMMAND_HARDWARE_ERROR naming one of the `count` slots from ring
    /// offset `start`. Only reads memory: the unread entries from the
    /// driver's head up to the first not yet written (code 0); each is
    /// looked at once (the entries stay for [`Self::poll_events`]).
    fn command_error_logged(&mut self, start: u64, count: usize) -> bool {
        let Some(r) = self.rings else { return false };
        let span = count as u64 * Command::SIZE;
        let mut checked = r.events_checked;
        let mut found = false;
        while checked < RING_BYTES / 16 - 1 {
            let i = ((r.event_head + checked * 16) % RING_BYTES / 8) as usize;
            let raw = [self.mem.read(r.event_log, i), self.mem.read(r.event_log, i + 1)];
            let Some(e) = Event::decode(raw) else { break };
            checked += 1;
            let address = match e {
                Event::IllegalCommand { address } => address,
                Event::Other { code: crate::event::COMMAND_HARDWARE_ERROR, raw } => raw[1],
                _ => continue,
            };
            let Some(offset) = address.checked_sub(r.cmd_buf).filter(|&o| o < RING_BYTES) else { continue };
            found |= span >= RING_BYTES || (offset + RING_BYTES - start) % RING_BYTES < span;
        }
        if let Some(rr) = self.rings.as_mut() {
            rr.events_checked = checked;
        }
        found
    }

    /// Where entry `device_id` lives: (page, index of its first word).
    fn dte_slot(r: &Rings, device_id: u16) -> (u64, usize) {
        let byte = device_id as u64 * DeviceTableEntry::SIZE;
        (r.dev_table + byte / 4096 * 4096, (byte % 4096 / 8) as usize)
    }

    fn check_device(&self, device_id: u16) -> Result<Rings, Error> {
        let r = self.rings.ok_or_else(|| self.not_enabled())?;
        if device_id > self.last_device_id {
            return Err(self.err(HwError::NoSuchDevice { device_id, last_device_id: self.last_device_id }));
        }
        Ok(r)
    }

    /// The device table entry of `device_id` (`None` when not enabled or
    /// beyond the table).
    pub fn dte(&self, device_id: u16) -> Option<DeviceTableEntry> {
        let r = self.check_device(device_id).ok()?;
        let (page, i) = Self::dte_slot(&r, device_id);
        Some(DeviceTableEntry([
            self.mem.read(page, i),
            self.mem.read(page, i + 1),
            self.mem.read(page, i + 2),
            self.mem.read(page, i + 3),
        ]))
    }

    /// The domain `device_id` translates through, if attached.
    pub fn attached_domain(&self, device_id: u16) -> Option<u16> {
        match self.dte(device_id)?.kind() {
            DteKind::Translated { domain_id, .. } => Some(domain_id),
            _ => None,
        }
    }

    /// Replaces the entry of `device_id` and tells the unit.
    fn set_dte(&mut self, device_id: u16, new: DeviceTableEntry) -> Result<(), Error> {
        let r = self.check_device(device_id)?;
        let old = self.dte(device_id).unwrap_or_default();
        if old == new {
            return Ok(());
        }
        let (page, i) = Self::dte_slot(&r, device_id);
        let blocked = DeviceTableEntry::blocked().0[0];
        if old.0[1..] != new.0[1..] {
            if old.0[0] != blocked {
                self.mem.write(page, i, blocked);
            }
            for w in (1..4).rev() {
                self.mem.write(page, i + w, new.0[w]);
            }
        }
        self.mem.write(page, i, new.0[0]);
        if self.flushes() {
            self.mem.flush(page + i as u64 * 8, DeviceTableEntry::SIZE);
        }
        if let DteKind::Translated { domain_id, .. } = old.kind()
            && let Some(users) = self.domain_users.get_mut(&domain_id)
        {
            users.remove(&device_id);
            if users.is_empty() {
                self.domain_users.remove(&domain_id);
            }
        }
        if let DteKind::Translated { domain_id, .. } = new.kind() {
            self.domain_users.entry(domain_id).or_default().insert(device_id);
        }
        let old_domain = old.tag().unwrap_or(0);
        self.submit(&[
            Command::invalidate_devtab_entry(device_id),
            Command::invalidate_pages(old_domain, PageRange::All, true),
        ])
    }

    /// A free domain id: 1..=65535 without bit 8 ([`usable_domain_id`]);
    /// 0 is reserved for blocked and pass-through entries. On a unit
    /// without INVALIDATE_IOMMU_ALL an id used for the first time is
    /// flushed before it is handed out.
    pub fn alloc_domain_id(&mut self) -> Result<u16, Error> {
        if let Some(d) = self.free_domains.pop() {
            return Ok(d);
        }
        let mut next = self.next_domain;
        while next <= u16::MAX as u32 && !usable_domain_id(next as u16) {
            next += 1;
        }
        if next > u16::MAX as u32 {
            return Err(self.err(HwError::NoDomainId));
        }
        let d = next as u16;
        if self.rings.is_some() && !self.caps.invalidate_all() {
            self.submit(&[Command::invalidate_pages(d, PageRange::All, true)])?;
        }
        self.next_domain = next + 1;
        Ok(d)
    }

    /// Returns a domain id. No device may still be attached to it (detach
    /// flushed its IOTLB entries).
    pub fn free_domain_id(&mut self, domain_id: u16) {
        if usable_domain_id(domain_id)
            && (domain_id as u32) < self.next_domain
            && !self.free_domains.contains(&domain_id)
        {
            self.free_domains.push(domain_id);
        }
    }

    /// Points `device_id` at the host page table `root` (4 KiB aligned) of
    /// `levels` levels (1..=6, at most what EFR.HATS allows) in domain
    /// `domain_id` (not 0). The device translates from now on; its old
    /// entry's cached translations are invalidated.
    pub fn attach(&mut self, device_id: u16, root: u64, levels: u32, domain_id: u16) -> Result<(), Error> {
        if !usable_domain_id(domain_id) {
            return Err(self.err(HwError::Invalid("domain id 0 or with bit 8 set")));
        }
        if self.caps.max_levels().is_none_or(|max| levels > max) {
            return Err(self.err(HwError::Unsupported("page-table depth beyond EFR.HATS")));
        }
        let e = DeviceTableEntry::translated(root, levels, domain_id)
            .ok_or_else(|| self.err(HwError::Invalid("root must be 4 KiB aligned below 2^52 and levels 1..=6")))?;
        self.set_dte_keeping_interrupts(device_id, e)
    }

    /// As [`Self::attach`], with HAD = 11b in the DTE when `dirty`, so the
    /// unit sets D in the PTEs the device writes through (EFR.HDSup
    /// needed; refused otherwise).
    pub fn attach_dirty(
        &mut self,
        device_id: u16,
        root: u64,
        levels: u32,
        domain_id: u16,
        dirty: bool,
    ) -> Result<(), Error> {
        if !dirty {
            return self.attach(device_id, root, levels, domain_id);
        }
        if !self.caps.host_dirty() {
            return Err(self.err(HwError::Unsupported("dirty tracking (EFR.HDSup)")));
        }
        if !usable_domain_id(domain_id) {
            return Err(self.err(HwError::Invalid("domain id 0 or with bit 8 set")));
        }
        if self.caps.max_levels().is_none_or(|max| levels > max) {
            return Err(self.err(HwError::Unsupported("page-table depth beyond EFR.HATS")));
        }
        let e = DeviceTableEntry::translated(root, levels, domain_id)
            .ok_or_else(|| self.err(HwError::Invalid("root must be 4 KiB aligned below 2^52 and levels 1..=6")))?;
        self.set_dte_keeping_interrupts(device_id, e.with_host_dirty(true))
    }

    /// Sets HAD to 11b (`on`) or 00b in the DTE of every device translating
    /// through domain `domain_id`. Only word 0 changes, so each entry is
    /// rewritten in place (the device keeps translating), then the unit is
    /// told (INVALIDATE_DEVTAB_ENTRY, and the domain's pages: translations
    /// cached without dirty updates must be walked again).
    pub fn set_dirty_tracking(&mut self, domain_id: u16, on: bool) -> Result<(), Error> {
        if on && !self.caps.host_dirty() {
            return Err(self.err(HwError::Unsupported("dirty tracking (EFR.HDSup)")));
        }
        for device_id in 0..=self.last_device_id {
            let Some(e) = self.dte(device_id) else { continue };
            if matches!(e.kind(), DteKind::Translated { domain_id: d, .. } if d == domain_id) && e.host_dirty() != on {
                self.set_dte(device_id, e.with_host_dirty(on))?;
            }
        }
        Ok(())
    }

    /// Blocks `device_id`'s DMA again and invalidates what its old entry
    /// cached (its interrupt routes stay).
    pub fn detach(&mut self, device_id: u16) -> Result<(), Error> {
        self.set_dte_keeping_interrupts(device_id, DeviceTableEntry::blocked())
    }

    /// Blocks every device whose entry translates through `domain_id`
    /// (what a domain being dropped leaves attached): after `Ok`, no
    /// entry names it. Stops at the first failure.
    pub fn detach_domain(&mut self, domain_id: u16) -> Result<(), Error> {
        let users: Vec<u16> =
            self.domain_users.get(&domain_id).map(|u| u.iter().copied().collect()).unwrap_or_default();
        for device_id in users {
            self.detach(device_id)?;
        }
        Ok(())
    }

    /// Lets `device_id` DMA to physical addresses untranslated (V = 1,
    /// TV = 1, Mode 0, IR = IW = 1).
    pub fn pass_through(&mut self, device_id: u16) -> Result<(), Error> {
        self.set_dte_keeping_interrupts(device_id, DeviceTableEntry::pass_through())
    }

    /// The interrupt settings `device_id`'s entry carries.
    fn interrupts_of(&self, device_id: u16) -> Interrupts {
        match self.irq_tables.get(&device_id) {
            Some(t) => Interrupts::Remapped { table: t.base, len_log2: t.log2 },
            None => Interrupts::Blocked,
        }
    }

    fn set_dte_keeping_interrupts(&mut self, device_id: u16, e: DeviceTableEntry) -> Result<(), Error> {
        let e = e
            .with_interrupts(self.interrupts_of(device_id))
            .ok_or_else(|| self.err(HwError::Invalid("interrupt table cannot be encoded")))?;
        self.set_dte(device_id, e)
    }

    /// Sizes `device_id`'s interrupt remapping table for a function with
    /// `vectors` MSI/MSI-X vectors: 2^[`irq_table_log2`] entries (at least
    /// 2, at most 512). Functions sharing the device id (behind a
    /// PCIe-to-PCI bridge) share the table, so the largest reservation
    /// wins; it holds until the unit goes. A table made before (by a
    /// route) that is smaller and has no routes is freed, so the next
    /// route makes one of the reserved size; one with routes stays as it
    /// is until [`Self::release_interrupts`]. Without a reservation a
    /// device gets [`IRQ_TABLE_LOG2`] (64 entries).
    pub fn reserve_interrupts(&mut self, device_id: u16, vectors: u16) -> Result<(), Error> {
        self.check_device(device_id)?;
        let log2 = irq_table_log2(vectors);
        let reserved = self.irq_reserved.get(&device_id).map_or(log2, |&r| r.max(log2));
        self.irq_reserved.insert(device_id, reserved);
        match self.irq_tables.get(&device_id) {
            Some(t) if t.log2 < reserved && t.used.iter().all(|&w| w == 0) => self.release_interrupts(device_id),
            _ => Ok(()),
        }
    }

    /// Entries in `device_id`'s interrupt remapping table (`None` while it
    /// has none).
    pub fn interrupt_table_entries(&self, device_id: u16) -> Option<usize> {
        self.irq_tables.get(&device_id).map(IrqTable::entries)
    }

    /// A new, empty table for `device_id`, of the size reserved for it.
    fn alloc_irq_table(&mut self, device_id: u16) -> Result<IrqTable, Error> {
        let log2 = self.irq_reserved.get(&device_id).copied().unwrap_or(IRQ_TABLE_LOG2);
        let entry_bytes = if self.x2apic { 16 } else { 4 };
        let pages = ((entry_bytes << log2) as usize).div_ceil(4096);
        let base = if pages == 1 { self.mem.alloc_table() } else { self.mem.alloc_contiguous(pages) }
            .ok_or_else(|| self.err_no_memory())?;
        if self.flushes() {
            self.mem.flush(base, pages as u64 * 4096);
        }
        Ok(IrqTable { base, pages, log2, used: alloc::vec![0; (1usize << log2).div_ceil(64)] })
    }

    fn free_irq_table(&mut self, t: IrqTable) {
        if t.pages == 1 {
            self.mem.free_table(t.base);
        } else {
            self.mem.free_contiguous(t.base, t.pages);
        }
    }

    /// Routes one MSI of `device_id` to `vector` on the CPU with APIC id
    /// `dest`: an entry in the device's own interrupt remapping table
    /// (made on first use, of the size [`Self::reserve_interrupts`] set:
    /// its device table entry switches to remapped interrupts). Returns
    /// the entry's index; the device raises it with
    /// [`crate::irte::msi_message`]. Other MSIs of the device stay blocked.
    /// Every entry in use is `TableFull`. An id above 255 needs x2APIC
    /// destinations ([`Self::set_x2apic`]).
    pub fn route_interrupt(&mut self, device_id: u16, vector: u8, dest: u32) -> Result<u16, Error> {
        self.check_device(device_id)?;
        self.check_destination(dest)?;
        if !self.irq_tables.contains_key(&device_id) {
            let table = self.alloc_irq_table(device_id)?;
            self.irq_tables.insert(device_id, table);
            let current = self.dte(device_id).unwrap_or(DeviceTableEntry::blocked());
            if let Err(e) = self.set_dte_keeping_interrupts(device_id, current) {
                // The entry naming the table may have reached memory (and
                // the unit) before the invalidation failed: the table is
                // forgotten but never freed, so the unit can only ever
                // read an empty table there (every MSI blocked). The next
                // entry written for the device names no table or a new one.
                self.irq_tables.remove(&device_id);
                return Err(e);
            }
        }
        let t = &self.irq_tables[&device_id];
        let Some(index) = (0..t.entries() as u16).find(|&i| !t.in_use(i)) else {
            return Err(self.err(HwError::TableFull));
        };
        self.write_route(device_id, index, Some((vector, dest)));
        self.mark(device_id, index, true);
        if let Err(e) = self.submit(&[Command::invalidate_interrupt_table(device_id)]) {
            self.write_route(device_id, index, None);
            self.mark(device_id, index, false);
            return Err(e);
        }
        Ok(index)
    }

    fn mark(&mut self, device_id: u16, index: u16, used: bool) {
        if let Some(w) = self.irq_tables.get_mut(&device_id).and_then(|t| t.used.get_mut(index as usize / 64)) {
            if used {
                *w |= 1 << (index % 64);
            } else {
                *w &= !(1 << (index % 64));
            }
        }
    }

    fn check_destination(&self, dest: u32) -> Result<(), Error> {
        if dest > 0xff && !self.x2apic {
            return Err(self.err(HwError::Invalid(
                "an APIC id above 255 needs x2APIC destinations (the unit runs 32-bit entries)",
            )));
        }
        Ok(())
    }

    /// Points route `index` of `device_id` at a new vector and destination,
    /// then invalidates the device's interrupt table and waits; from the
    /// return on only the new vector can arrive. A 32-bit entry is
    /// rewritten in one access. A 128-bit entry (x2APIC destinations) is
    /// too when only its vector or only its low destination bits change;
    /// when both change it takes two 64-bit writes (vector and destination
    /// bits 31:24 first, then bits 23:0), and an MSI the unit remaps
    /// between them goes to the new vector at the old destination.
    pub fn retarget_interrupt(&mut self, device_id: u16, index: u16, vector: u8, dest: u32) -> Result<(), Error> {
        let Some(t) = self.irq_tables.get(&device_id) else {
            return Err(self.err(HwError::Invalid("retarget of a device with no routes")));
        };
        if !t.in_use(index) {
            return Err(self.err(HwError::Invalid("retarget of a route that does not exist")));
        }
        self.check_destination(dest)?;
        self.write_route(device_id, index, Some((vector, dest)));
        self.submit(&[Command::invalidate_interrupt_table(device_id)])
    }

    /// Removes route `index` of `device_id`: that MSI is blocked again.
    pub fn unroute_interrupt(&mut self, device_id: u16, index: u16) -> Result<(), Error> {
        if !self.irq_tables.get(&device_id).is_some_and(|t| t.in_use(index)) {
            return Ok(());
        }
        self.write_route(device_id, index, None);
        self.mark(device_id, index, false);
        self.submit(&[Command::invalidate_interrupt_table(device_id)])
    }

    /// Drops every route of `device_id`: its entry goes back to blocked
    /// interrupts and the table is freed, once the unit confirmed it no
    /// longer uses it. When the entry change or the invalidation fails the
    /// table is forgotten but never freed (the unit may still read it, or
    /// hold entries from it).
    pub fn release_interrupts(&mut self, device_id: u16) -> Result<(), Error> {
        let Some(table) = self.irq_tables.remove(&device_id) else { return Ok(()) };
        let current = self.dte(device_id).unwrap_or(DeviceTableEntry::blocked());
        self.set_dte_keeping_interrupts(device_id, current)?;
        self.submit(&[Command::invalidate_interrupt_table(device_id)])?;
        self.free_irq_table(table);
        Ok(())
    }

    /// Route `index` of `device_id` as the unit reads it, in the 32-bit
    /// format (`None` with x2APIC destinations: see [`Self::irte_ga`]).
    pub fn irte(&self, device_id: u16, index: u16) -> Option<crate::irte::Irte> {
        let t = self.irq_tables.get(&device_id)?;
        if index as usize >= t.entries() || self.x2apic {
            return None;
        }
        let (page, i) = t.word(index as usize / 2);
        let word = self.mem.read(page, i);
        Some(crate::irte::Irte((word >> (32 * (index % 2))) as u32))
    }

    /// Route `index` of `device_id` as the unit reads it, in the 128-bit
    /// format x2APIC destinations use (`None` without them).
    pub fn irte_ga(&self, device_id: u16, index: u16) -> Option<crate::irte::IrteGa> {
        let t = self.irq_tables.get(&device_id)?;
        if index as usize >= t.entries() || !self.x2apic {
            return None;
        }
        let (page, i) = t.word(index as usize * 2);
        Some(crate::irte::IrteGa([self.mem.read(page, i), self.mem.read(page, i + 1)]))
    }

    /// Writes entry `index` of `device_id`'s table in the unit's format:
    /// `vector` to `dest`, or not remapped (`None`).
    fn write_route(&mut self, device_id: u16, index: u16, route: Option<(u8, u32)>) {
        let Some(t) = self.irq_tables.get(&device_id) else { return };
        if self.x2apic {
            let at = t.word(index as usize * 2);
            let e = route.map_or(crate::irte::IrteGa::default(), |(v, d)| crate::irte::IrteGa::remapped(v, d));
            self.write_irte_ga(at, e);
        } else {
            let at = t.word(index as usize / 2);
            let e = route.map_or(crate::irte::Irte::default(), |(v, d)| crate::irte::Irte::remapped(v, d as u8));
            self.write_irte(at, index, e);
        }
    }

    /// A 32-bit entry at `(page, i)`, the 64-bit word holding it.
    fn write_irte(&mut self, (page, i): (u64, usize), index: u16, e: crate::irte::Irte) {
        // Entries are 32-bit; tables are written as 64-bit words.
        let shift = 32 * (index % 2) as u32;
        let word = self.mem.read(page, i) & !(0xffff_ffffu64 << shift) | (e.0 as u64) << shift;
        self.mem.write(page, i, word);
        if self.flushes() {
            self.mem.flush(page + i as u64 * 8, 8);
        }
    }

    /// A 128-bit entry at `(page, i)` in 64-bit writes, ordered so the unit
    /// never reads a remapping entry with half of it missing: a new entry's
    /// upper word goes first and RemapEn (lower word) last; a removed one
    /// loses RemapEn first; a retarget writes only the word that changes,
    /// or both (upper first) when both do.
    fn write_irte_ga(&mut self, (page, i): (u64, usize), e: crate::irte::IrteGa) {
        let old = [self.mem.read(page, i), self.mem.read(page, i + 1)];
        let order: [usize; 2] = if e.enabled() { [1, 0] } else { [0, 1] };
        for w in order {
            if old[w] != e.0[w] {
                self.mem.write(page, i + w, e.0[w]);
            }
        }
        if self.flushes() {
            self.mem.flush(page + i as u64 * 8, 16);
        }
    }

    /// Invalidates the IOTLB and page-directory caches of `domain_id` for
    /// `[start, last]` (inclusive): as few INVALIDATE_IOMMU_PAGES as the
    /// power-of-two encoding allows ([`range_commands`]: at most
    /// [`MAX_RANGE_COMMANDS`], else one covering block) and one completion
    /// wait.
    pub fn invalidate_range(&mut self, domain_id: u16, start: u64, last: u64) -> Result<(), Error> {
        if start > last {
            return Err(self.err(HwError::Invalid("range start after its last byte")));
        }
        let cmds = range_commands(domain_id, start, last);
        self.submit(&cmds)
    }

    /// Invalidates every cache of the unit (INVALIDATE_IOMMU_ALL, or every
    /// entry and domain when the unit lacks it) with one completion wait.
    pub fn invalidate_all(&mut self) -> Result<(), Error> {
        self.flush_everything()
    }

    /// Reads every new event log entry, advances the head, restarts a log
    /// that overflowed (spec: the unit stops logging and sets
    /// Status.EventOverflow; the driver clears it and re-enables), and
    /// appends the events to the log; returns the new ones.
    pub fn poll_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        let Some(r) = self.rings else { return out };
        let st = regs::read_status(&self.mmio);
        let tail = (self.mmio.get64(regs::EVENT_LOG_TAIL) & regs::POINTER_MASK) % RING_BYTES;
        let mut head = r.event_head;
        while head != tail {
            let i = (head / 8) as usize;
            let raw = [self.mem.read(r.event_log, i), self.mem.read(r.event_log, i + 1)];
            // Code 0: the entry has not landed yet; look again next time.
            let Some(e) = Event::decode(raw) else { break };
            out.push(e);
            // Cleared so that a slot not yet rewritten is recognised.
            self.mem.write(r.event_log, i, 0);
            self.mem.write(r.event_log, i + 1, 0);
            if self.flushes() {
                self.mem.flush(r.event_log + head, 16);
            }
            head = (head + 16) % RING_BYTES;
        }
        if head != r.event_head {
            self.mmio.set64(regs::EVENT_LOG_HEAD, head);
            if let Some(rr) = self.rings.as_mut() {
                let read = (head + RING_BYTES - rr.event_head) % RING_BYTES / 16;
                rr.event_head = head;
                rr.events_checked = rr.events_checked.saturating_sub(read);
            }
        }
        if st.contains(Status::EVENT_OVERFLOW) {
            self.overflows += 1;
            let ctrl = regs::read_control(&self.mmio);
            self.mmio.set64(regs::CONTROL, (ctrl - Control::EVENT_LOG_EN).bits());
            self.mmio.set64(regs::STATUS, Status::EVENT_OVERFLOW.bits());
            self.mmio.set64(regs::CONTROL, (ctrl | Control::EVENT_LOG_EN).bits());
        }
        let ack = st & (Status::EVENT_LOG_INT | Status::COM_WAIT_INT);
        if !ack.is_empty() {
            self.mmio.set64(regs::STATUS, ack.bits());
        }
        self.events.extend_from_slice(&out);
        if self.events.len() > EVENT_LOG_KEEP {
            let extra = self.events.len() - EVENT_LOG_KEEP;
            self.events.drain(..extra);
        }
        out
    }

    /// Records the firmware's unity-mapped ranges (IVMD blocks): devices
    /// keep DMAing there, so any domain such a device is attached to must
    /// map them one-to-one.
    pub fn set_unity_ranges(&mut self, ranges: Vec<UnityRange>) {
        self.unity = ranges;
    }

    /// The unity-mapped ranges that apply to `device_id`.
    pub fn unity_for(&self, device_id: u16) -> Vec<UnityRange> {
        self.unity.iter().filter(|r| (r.first_id..=r.last_id).contains(&device_id)).copied().collect()
    }

    /// The event log (latest [`EVENT_LOG_KEEP`]) and the number of
    /// overflows seen.
    pub fn event_log(&self) -> (&[Event], u64) {
        (&self.events, self.overflows)
    }
}

#[cfg(test)]
mod unity_tests {
    use super::UnityRange;

    #[test]
    fn ivmd_blocks_become_unity_ranges() {
        let r = UnityRange::from_ivmd(0x21, 0b011, 0x0010, 0, 0xd000_0000, 0x2000).unwrap();
        assert_eq!(
            (r.first_id, r.last_id, r.start, r.last, r.read, r.write),
            (0x10, 0x10, 0xd000_0000, 0xd000_1fff, true, false)
        );
        let all = UnityRange::from_ivmd(0x20, 0b111, 0x55, 0x66, 0x1000, 0x1000).unwrap();
        assert_eq!((all.first_id, all.last_id), (0, 0xffff));
        let range = UnityRange::from_ivmd(0x22, 0b1000, 0x100, 0x1ff, 0x1000, 0x1000).unwrap();
        assert_eq!(
            (range.first_id, range.last_id, range.read, range.write),
            (0x100, 0x1ff, true, true),
            "exclusion: RW"
        );
        assert_eq!(UnityRange::from_ivmd(0x21, 0b110, 1, 0, 0x1000, 0x1000), None, "no unity or exclusion flag");
        assert_eq!(UnityRange::from_ivmd(0x21, 1, 1, 0, 0x1000, 0), None, "empty");
        assert_eq!(UnityRange::from_ivmd(0x21, 1, 1, 0, u64::MAX, 2), None, "wraps");
        assert_eq!(UnityRange::from_ivmd(0x10, 1, 1, 0, 0x1000, 0x1000), None, "not an IVMD type");
    }
}
