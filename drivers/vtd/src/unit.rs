//! One DMA-remapping hardware unit (a DRHD): bring-up, context entries,
//! invalidation (queued, or register-based when ECAP.QI is clear) and fault
//! recording.
//!
//! Invariants:
//! * Every wait on the hardware has a timeout from the [`Clock`] and fails
//!   with an error naming the unit and the register.
//! * GCMD is always written as GSTS's persistent enables plus the one bit
//!   being changed (GCMD acts on the difference, QEMU-NOTES).
//! * A device with no context entry is blocked: nothing is passed through
//!   by default.
//! * Root, context and queue pages come from the [`TableMemory`]; entries
//!   are written high half first and present bit last, then flushed when the
//!   walker is not coherent.

use crate::entries::{ContextEntry, RootEntry, TranslationType};
use crate::fault::FaultRecord;
use crate::qi::{ContextScope, Descriptor, Descriptor256, IotlbScope, PasidIotlbScope, page_blocks};
use crate::regs::{self, Fectl, Fsts, Gcmd, Mmio, ccmd, iotlb};
use crate::scalable::{Invalidations, ScalableTables, TablesError};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use io_pgtable::{ContiguousMemory, TableMemory};
pub use portcullis_iommu::{HwError, UnitError};

mod pasid;

/// Monotonic time for timeouts.
pub use portcullis_iommu::Clock;

/// How long any single hardware wait may take.
pub const TIMEOUT_NS: u64 = 100_000_000;

/// A driver error: the unit's register base and what went wrong there
/// (plain data, no strings; see [`HwError`]).
pub type Error = UnitError;

/// The Capability (CAP, VT-d spec 11.4.2) and Extended Capability (ECAP,
/// spec 11.4.3) registers, decoded for the driver and the platform report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Raw CAP.
    pub cap: u64,
    /// Raw ECAP.
    pub ecap: u64,
}

impl Caps {
    /// Number of domain ids.
    pub fn domains(&self) -> u32 {
        1 << (4 + 2 * (self.cap & 7))
    }
    /// Write-buffer flush required.
    pub fn rwbf(&self) -> bool {
        self.cap >> 4 & 1 != 0
    }
    /// Caching mode: non-present entries may be cached.
    pub fn caching_mode(&self) -> bool {
        self.cap >> 7 & 1 != 0
    }
    /// SAGAW bits.
    pub fn sagaw(&self) -> u8 {
        ((self.cap >> 8) & 0x1f) as u8
    }
    /// The second-stage input widths SAGAW offers, in bits, smallest
    /// first: bit 1 is 39 bits (3 levels), bit 2 48 (4), bit 3 57 (5)
    /// (spec 11.4.2; bits 0 and 4 are reserved).
    pub fn sagaw_widths(&self) -> impl Iterator<Item = u32> + use<> {
        let sagaw = self.sagaw();
        [(1u8, 39u32), (2, 48), (3, 57)].into_iter().filter(move |(b, _)| sagaw >> b & 1 != 0).map(|(_, w)| w)
    }
    /// MGAW + 1.
    pub fn mgaw(&self) -> u32 {
        ((self.cap >> 16) & 0x3f) as u32 + 1
    }
    /// Fault recording registers' offset.
    pub fn fro(&self) -> usize {
        (((self.cap >> 24) & 0x3ff) * 16) as usize
    }
    /// SLLPS bits.
    pub fn sllps(&self) -> u8 {
        ((self.cap >> 34) & 0xf) as u8
    }
    /// Second-stage 2 MiB pages (SLLPS bit 0, spec 11.4.2).
    pub fn second_stage_2m(&self) -> bool {
        self.sllps() & 1 != 0
    }
    /// Second-stage 1 GiB pages (SLLPS bit 1, spec 11.4.2).
    pub fn second_stage_1g(&self) -> bool {
        self.sllps() & 2 != 0
    }
    /// Page-selective invalidation supported.
    pub fn psi(&self) -> bool {
        self.cap >> 39 & 1 != 0
    }
    /// Number of fault recording registers.
    pub fn nfr(&self) -> usize {
        ((self.cap >> 40) & 0xff) as usize + 1
    }
    /// Maximum address mask value.
    pub fn mamv(&self) -> u8 {
        ((self.cap >> 48) & 0x3f) as u8
    }
    /// Page walks snoop (ECAP.C).
    pub fn coherent(&self) -> bool {
        self.ecap & 1 != 0
    }
    /// Queued invalidation (ECAP.QI).
    pub fn qi(&self) -> bool {
        self.ecap >> 1 & 1 != 0
    }
    /// Device-TLBs: ATS translation requests are answered (ECAP.DT,
    /// spec 11.4.3).
    pub fn device_tlb(&self) -> bool {
        self.ecap >> 2 & 1 != 0
    }
    /// Interrupt remapping (ECAP.IR).
    pub fn interrupt_remapping(&self) -> bool {
        self.ecap >> 3 & 1 != 0
    }
    /// x2APIC destinations in remapped interrupts (ECAP.EIM).
    pub fn eim(&self) -> bool {
        self.ecap >> 4 & 1 != 0
    }
    /// Pass-through (ECAP.PT).
    pub fn pass_through(&self) -> bool {
        self.ecap >> 6 & 1 != 0
    }
    /// Snoop control (ECAP.SC).
    pub fn snoop_control(&self) -> bool {
        self.ecap >> 7 & 1 != 0
    }
    /// IOTLB registers' offset.
    pub fn iro(&self) -> usize {
        (((self.ecap >> 8) & 0x3ff) * 16) as usize
    }
    /// Nested translation (ECAP.NEST, bit 26, spec 11.4.3).
    pub fn nested(&self) -> bool {
        self.ecap >> 26 & 1 != 0
    }
    /// Requests with a PASID (ECAP.PASID, bit 40, spec 11.4.3).
    pub fn pasid(&self) -> bool {
        self.ecap >> 40 & 1 != 0
    }
    /// Scalable mode (ECAP.SMTS).
    pub fn scalable(&self) -> bool {
        self.ecap >> 43 & 1 != 0
    }
    /// Second-stage translation in scalable mode (ECAP.SSTS).
    pub fn second_stage(&self) -> bool {
        self.ecap >> 46 & 1 != 0
    }
    /// First-stage translation in scalable mode (ECAP.FSTS).
    pub fn first_stage(&self) -> bool {
        self.ecap >> 47 & 1 != 0
    }
    /// Second-stage accessed/dirty bits, what dirty tracking needs
    /// (ECAP.SSADS, bit 45, spec 11.4.3; SLADS in earlier revisions).
    pub fn dirty_tracking(&self) -> bool {
        self.ecap >> 45 & 1 != 0
    }
    /// First-stage 1 GiB pages (CAP.FS1GP).
    pub fn first_stage_1g(&self) -> bool {
        self.cap >> 56 & 1 != 0
    }
    /// First-stage 5-level paging (CAP.FS5LP, bit 60; FL5LP in earlier
    /// revisions).
    pub fn first_stage_5level(&self) -> bool {
        self.cap >> 60 & 1 != 0
    }
    /// Supervisor requests in first-stage translation (ECAP.SRS, bit 31).
    pub fn supervisor_requests(&self) -> bool {
        self.ecap >> 31 & 1 != 0
    }
    /// The extended accessed flag in first-stage entries (ECAP.EAFS,
    /// bit 34).
    pub fn extended_accessed(&self) -> bool {
        self.ecap >> 34 & 1 != 0
    }
    /// The deepest second-stage table the unit supports: (levels, AW).
    pub fn best_levels(&self) -> Option<(u32, u8)> {
        let s = self.sagaw();
        if s & 4 != 0 {
            Some((4, 2))
        } else if s & 2 != 0 {
            Some((3, 1))
        } else {
            None
        }
    }
}

/// The invalidation queue: one 4 KiB page of 256 128-bit descriptors, or
/// of 128 256-bit ones in scalable mode (IQA.DW).
struct Queue {
    page: u64,
    tail: u64,
    wide: bool,
    /// Everything submitted was processed (the last wait completed, or
    /// the queue was restarted empty): there is room for a whole ring
    /// without reading IQH.
    drained: bool,
}

impl Queue {
    fn slots(&self) -> u64 {
        if self.wide { 128 } else { 256 }
    }
    fn words(&self) -> usize {
        if self.wide { 4 } else { 2 }
    }
    fn shift(&self) -> u32 {
        if self.wide { 5 } else { 4 }
    }
}

/// The interrupt remapping table: `pages` contiguous pages from `base`
/// (256 entries each), and which entries `alloc_irte` handed out.
struct Irt {
    base: u64,
    pages: usize,
    /// A bit per entry, set while handed out.
    used: Vec<u64>,
}

impl Irt {
    fn entries(&self) -> usize {
        self.pages * crate::ir::IRTES_PER_PAGE
    }
    /// The page holding entry `index` and the entry's first word in it.
    fn slot(&self, index: u16) -> (u64, usize) {
        let i = index as usize;
        let page = self.base + (i / crate::ir::IRTES_PER_PAGE) as u64 * 4096;
        (page, i % crate::ir::IRTES_PER_PAGE * 2)
    }
}

/// Invalidations issued (for benchmarks and tests: "one wait per unmap").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InvalidationStats {
    /// Invalidation-wait descriptors (queued) or register waits.
    pub waits: u64,
    /// Descriptors or register invalidations issued, waits excluded.
    pub invalidations: u64,
}

/// One VT-d unit.
pub struct Unit<M: Mmio, T: TableMemory, C: Clock> {
    /// Register base (the DRHD's), naming the unit in errors.
    base: u64,
    mmio: M,
    mem: T,
    clock: C,
    caps: Caps,
    root: u64,
    context_tables: BTreeMap<u8, u64>,
    queue: Option<Queue>,
    status_page: u64,
    wait_seq: u32,
    next_did: u32,
    free_dids: Vec<u16>,
    /// The domain id every pass-through entry carries (taken once, kept).
    pass_through_did: Option<u16>,
    faults: Vec<FaultRecord>,
    overflows: u64,
    rmrrs: Vec<(u16, u64, u64)>,
    scalable: Option<ScalableTables<T>>,
    /// The interrupt remapping table while on.
    irt: Option<Irt>,
    /// The table runs in extended interrupt mode (IRTA.EIME): 32-bit
    /// x2APIC destinations.
    irt_x2apic: bool,
    /// Invalidation counters.
    pub stats: InvalidationStats,
}

impl<M: Mmio, T: TableMemory, C: Clock> fmt::Debug for Unit<M, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Unit(DRHD @{:#x}, caps {:x?}, queued {})", self.base, self.caps, self.queue.is_some())
    }
}

impl<M: Mmio, T: TableMemory, C: Clock> Unit<M, T, C> {
    /// Takes over the unit whose registers are at `base` (the DRHD's
    /// register base address; `mmio` reaches them) with translation off:
    /// reads its capabilities and allocates its root table. Nothing is
    /// enabled yet.
    pub fn new(base: u64, mmio: M, mut mem: T, clock: C) -> Result<Self, Error> {
        let caps = Caps { cap: mmio.get64(regs::CAP), ecap: mmio.get64(regs::ECAP) };
        let no_memory = UnitError { unit: base, cause: HwError::NoMemory };
        let root = mem.alloc_table().ok_or(no_memory)?;
        let Some(status_page) = mem.alloc_table() else {
            mem.free_table(root);
            return Err(no_memory);
        };
        // Domain id 0 is reserved when caching mode is on; keep it unused
        // everywhere for simplicity.
        Ok(Self {
            base,
            mmio,
            mem,
            clock,
            caps,
            root,
            context_tables: BTreeMap::new(),
            queue: None,
            status_page,
            wait_seq: 0,
            next_did: 1,
            free_dids: Vec::new(),
            pass_through_did: None,
            faults: Vec::new(),
            overflows: 0,
            rmrrs: Vec::new(),
            scalable: None,
            irt: None,
            irt_x2apic: false,
            stats: InvalidationStats::default(),
        })
    }

    /// The unit's register base (as the DRHD gives it; errors carry it).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// An error of this unit.
    /// An `Invalid` error of this unit (for callers outside the module).
    pub fn err_invalid(&self, what: &'static str) -> Error {
        self.err(HwError::Invalid(what))
    }

    fn err(&self, cause: HwError) -> Error {
        UnitError { unit: self.base, cause }
    }

    /// Its capabilities.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Whether the unit runs in scalable mode.
    pub fn is_scalable(&self) -> bool {
        self.scalable.is_some()
    }

    /// Whether queued invalidation is in use.
    pub fn queued(&self) -> bool {
        self.queue.is_some()
    }

    /// The table memory (domains allocate from the same pool).
    pub fn memory(&self) -> &T {
        &self.mem
    }

    /// The table memory, mutably.
    pub fn memory_mut(&mut self) -> &mut T {
        &mut self.mem
    }

    fn wait_for(&self, register: &'static str, mut done: impl FnMut(&M) -> bool) -> Result<(), Error> {
        let start = self.clock.now_ns();
        loop {
            if done(&self.mmio) {
                return Ok(());
            }
            let waited = self.clock.now_ns().saturating_sub(start);
            if waited > TIMEOUT_NS {
                // One last look before giving up.
                if done(&self.mmio) {
                    return Ok(());
                }
                return Err(self.err(HwError::Timeout { register, waited_ns: waited }));
            }
            core::hint::spin_loop();
        }
    }

    /// Sets or clears one GCMD bit and waits for GSTS to follow.
    fn gcmd(&self, bit: Gcmd, on: bool) -> Result<(), Error> {
        let persistent = regs::read_gsts(&self.mmio) & Gcmd::PERSISTENT;
        let value = if on { persistent | bit } else { persistent - bit };
        self.mmio.set32(regs::GCMD, value.bits());
        self.wait_for("GSTS", |m| regs::read_gsts(m).contains(bit) == on)
    }

    /// One-shot GCMD commands (SRTP, WBF): GSTS shows completion.
    fn gcmd_oneshot(&self, bit: Gcmd, register: &'static str) -> Result<(), Error> {
        let persistent = regs::read_gsts(&self.mmio) & Gcmd::PERSISTENT;
        self.mmio.set32(regs::GCMD, (persistent | bit).bits());
        if bit == Gcmd::WBF {
            // WBFS clears when the flush is done.
            self.wait_for(register, |m| !regs::read_gsts(m).contains(Gcmd::WBF))
        } else {
            // RTPS (IRTPS) sets when the new root (table) is latched.
            self.wait_for(register, |m| regs::read_gsts(m).contains(bit))
        }
    }

    /// Brings the unit up: root table, global invalidations, queued
    /// invalidation (when supported and `use_qi`), then translation. Every
    /// device stays blocked until [`Self::attach`].
    pub fn enable(&mut self, use_qi: bool) -> Result<(), Error> {
        if self.caps.best_levels().is_none() {
            return Err(self.err(HwError::Unsupported("no 3- or 4-level second-stage width (SAGAW)")));
        }
        if regs::read_gsts(&self.mmio).contains(Gcmd::TE) {
            self.gcmd(Gcmd::TE, false)?;
        }
        self.mmio.set64(regs::RTADDR, self.root | regs::rtaddr::TTM_LEGACY);
        self.gcmd_oneshot(Gcmd::SRTP, "GSTS.RTPS")?;
        if self.caps.rwbf() {
            self.gcmd_oneshot(Gcmd::WBF, "GSTS.WBFS")?;
        }
        self.register_context_invalidate(ccmd::GLOBAL)?;
        self.register_iotlb_invalidate(iotlb::GLOBAL)?;
        if use_qi && self.caps.qi() {
            let page = self.mem.alloc_table().ok_or_else(|| self.err(HwError::NoMemory))?;
            self.mmio.set64(regs::IQT, 0);
            // QS = 0: one 4 KiB page, 256 128-bit descriptors; DW = 0.
            self.mmio.set64(regs::IQA, page);
            if let Err(e) = self.gcmd(Gcmd::QIE, true) {
                self.mem.free_table(page);
                return Err(e);
            }
            self.queue = Some(Queue { page, tail: 0, wide: false, drained: true });
        }
        self.gcmd(Gcmd::TE, true)
    }

    /// Brings the unit up in scalable mode (ECAP.SMTS and QI needed):
    /// scalable root table, queued invalidation with 256-bit descriptors,
    /// global context and IOTLB invalidation, then translation. Every
    /// device stays blocked until attached.
    pub fn enable_scalable(&mut self) -> Result<(), Error>
    where
        T: Clone,
    {
        if !self.caps.scalable() || !self.caps.qi() {
            return Err(self.err(HwError::Unsupported("scalable mode needs ECAP.SMTS and ECAP.QI")));
        }
        if regs::read_gsts(&self.mmio).contains(Gcmd::TE) {
            self.gcmd(Gcmd::TE, false)?;
        }
        let mut tables = ScalableTables::new(self.mem.clone()).map_err(|_| self.err(HwError::NoMemory))?;
        tables.set_paside(self.caps.pasid());
        self.mmio.set64(regs::RTADDR, tables.rtaddr());
        self.scalable = Some(tables);
        self.gcmd_oneshot(Gcmd::SRTP, "GSTS.RTPS")?;
        let page = self.mem.alloc_table().ok_or_else(|| self.err(HwError::NoMemory))?;
        self.mmio.set64(regs::IQT, 0);
        self.mmio.set64(regs::IQA, page | crate::qi::iq256::IQA_DW);
        if let Err(e) = self.gcmd(Gcmd::QIE, true) {
            self.mem.free_table(page);
            return Err(e);
        }
        self.queue = Some(Queue { page, tail: 0, wide: true, drained: true });
        // Whatever an earlier owner (firmware, a previous kernel) left
        // cached goes, PASID-cache entries included: they are tagged with
        // domain ids this driver hands out again.
        self.submit256(&[
            Descriptor::context(ContextScope::Global).into(),
            Descriptor256::pasid_cache(crate::qi::PasidCacheScope::Global),
            Descriptor::iotlb(IotlbScope::Global).into(),
        ])?;
        self.gcmd(Gcmd::TE, true)
    }

    /// Turns interrupt remapping on with an empty table and xAPIC (8-bit)
    /// destinations; see [`Self::enable_interrupt_remapping_with`].
    pub fn enable_interrupt_remapping(&mut self) -> Result<(), Error>
    where
        T: ContiguousMemory,
    {
        self.enable_interrupt_remapping_with(false)
    }

    /// Turns interrupt remapping on with an empty table: from now on every
    /// MSI from a device is blocked (and recorded as a fault) unless its
    /// table entry says where it goes; compatibility-format interrupts are
    /// blocked. The table is as large as the unit allows,
    /// [`crate::ir::MAX_IRTES`] entries (1 MiB of contiguous memory, IRTA.S
    /// = 15), as Linux sizes it; when the memory cannot give such a run it
    /// falls back to one page of [`crate::ir::IRTES_PER_PAGE`] entries
    /// (IRTA.S = 7) rather than leaving interrupts unremapped
    /// ([`Self::interrupt_table_entries`] says which).
    ///
    /// Needs ECAP.IR and queued invalidation (the interrupt entry cache is
    /// only invalidated through the queue). With `x2apic` the table runs in
    /// extended interrupt mode (IRTA.EIME = 1): entries name 32-bit x2APIC
    /// ids, for a kernel whose local APICs run in x2APIC mode; that needs
    /// ECAP.EIM. Already on in the other mode is an error (the table would
    /// have to be rewritten).
    pub fn enable_interrupt_remapping_with(&mut self, x2apic: bool) -> Result<(), Error>
    where
        T: ContiguousMemory,
    {
        if !self.caps.interrupt_remapping() {
            return Err(self.err(HwError::Unsupported("interrupt remapping (ECAP.IR)")));
        }
        if self.queue.is_none() {
            return Err(self.err(HwError::Unsupported("interrupt remapping needs queued invalidation")));
        }
        if x2apic && !self.caps.eim() {
            return Err(self.err(HwError::Unsupported("x2APIC destinations need extended interrupt mode (ECAP.EIM)")));
        }
        if self.irt.is_some() {
            if self.irt_x2apic != x2apic {
                return Err(self.err_invalid("interrupt remapping is already on with the other destination format"));
            }
            return Ok(());
        }
        let full = crate::ir::MAX_IRTES / crate::ir::IRTES_PER_PAGE;
        let (base, pages) = match self.mem.alloc_contiguous(full) {
            Some(base) => (base, full),
            None => (self.mem.alloc_table().ok_or_else(|| self.err(HwError::NoMemory))?, 1),
        };
        let irt = Irt { base, pages, used: alloc::vec![0; pages * crate::ir::IRTES_PER_PAGE / 64] };
        if !self.mem.coherent() {
            self.mem.flush(base, pages as u64 * 4096);
        }
        let s = crate::ir::irta_size(irt.entries());
        self.mmio.set64(regs::IRTA, crate::ir::irta(base, s, x2apic));
        let on = self
            .gcmd_oneshot(Gcmd::SIRTP, "GSTS.IRTPS")
            .and_then(|()| self.submit(&[Descriptor::iec(None)]))
            .and_then(|()| self.gcmd(Gcmd::IRE, true));
        if let Err(e) = on {
            // IRE may have taken after all: the table is freed only once
            // the unit confirms remapping is off. Otherwise its frames are
            // leaked (the unit may still read them), and the first error
            // is the one reported.
            if self.gcmd(Gcmd::IRE, false).is_ok() {
                self.free_irt(irt);
            }
            return Err(e);
        }
        self.irt = Some(irt);
        self.irt_x2apic = x2apic;
        Ok(())
    }

    fn free_irt(&mut self, irt: Irt)
    where
        T: ContiguousMemory,
    {
        if irt.pages == 1 {
            self.mem.free_table(irt.base);
        } else {
            self.mem.free_contiguous(irt.base, irt.pages);
        }
    }

    /// Entries in the interrupt remapping table (0 while remapping is off).
    pub fn interrupt_table_entries(&self) -> usize {
        self.irt.as_ref().map_or(0, Irt::entries)
    }

    /// Whether remapping is on with x2APIC (32-bit) destinations
    /// (IRTA.EIME).
    pub fn x2apic_destinations(&self) -> bool {
        self.irt.is_some() && self.irt_x2apic
    }

    /// The entry that routes `vector` to the CPU with APIC id `dest` for
    /// requester `sid`, in the destination format the table runs with: an
    /// id above 255 needs x2APIC destinations.
    pub fn route_entry(&self, vector: u8, dest: u32, sid: u16) -> Result<crate::ir::Irte, Error> {
        if dest > 0xff && !self.irt_x2apic {
            return Err(self.err_invalid(
                "an APIC id above 255 needs x2APIC destinations (interrupt remapping was enabled without them)",
            ));
        }
        Ok(crate::ir::Irte::remapped(vector, dest, self.irt_x2apic, sid))
    }

    /// Turns interrupt remapping off again (MSIs pass unremapped) and
    /// frees the table.
    pub fn disable_interrupt_remapping(&mut self) -> Result<(), Error>
    where
        T: ContiguousMemory,
    {
        if self.irt.is_none() {
            return Ok(());
        }
        self.gcmd(Gcmd::IRE, false)?;
        self.irt_x2apic = false;
        if let Some(irt) = self.irt.take() {
            self.free_irt(irt);
        }
        Ok(())
    }

    /// Whether interrupt remapping is on.
    pub fn interrupt_remapping_on(&self) -> bool {
        self.irt.is_some()
    }

    /// The table's page holding entry `index` and the entry's first word
    /// there; `NotEnabled` while off, `Invalid` beyond the table.
    fn irte_slot(&self, index: u16) -> Result<(u64, usize), Error> {
        let irt = self.irt.as_ref().ok_or(self.err(HwError::NotEnabled))?;
        if index as usize >= irt.entries() {
            return Err(self.err(HwError::Invalid("interrupt remapping table index out of range")));
        }
        Ok(irt.slot(index))
    }

    /// Writes table entry `index` (`Irte::default()` to remove it) and
    /// invalidates the unit's cached copy, waiting for it. A present entry
    /// is replaced through not-present, so the unit never sees half of one.
    pub fn set_irte(&mut self, index: u16, entry: crate::ir::Irte) -> Result<(), Error> {
        let (page, i) = self.irte_slot(index)?;
        let old = self.mem.read(page, i);
        if old & 1 != 0 {
            self.mem.write(page, i, old & !1);
            self.flush_irte(page, i);
            self.submit(&[Descriptor::iec(Some((index, 0)))])?;
        }
        // High half first, present bit (low half) last.
        self.mem.write(page, i + 1, entry.0[1]);
        self.mem.write(page, i, entry.0[0]);
        self.flush_irte(page, i);
        self.submit(&[Descriptor::iec(Some((index, 0)))])
    }

    /// Points present entry `index` at a new vector and destination without
    /// a gap: only the low 64 bits change (present, vector, destination;
    /// the source-id check in the high half stays), written in one access,
    /// then the unit's cached copy is invalidated and waited for. From the
    /// return on, only the new vector can arrive. `entry`'s high half must
    /// equal the present one's.
    pub fn retarget_irte(&mut self, index: u16, entry: crate::ir::Irte) -> Result<(), Error> {
        let (page, i) = self.irte_slot(index)?;
        if self.mem.read(page, i) & 1 == 0 || self.mem.read(page, i + 1) != entry.0[1] || entry.0[0] & 1 == 0 {
            return Err(self.err(HwError::Invalid("retarget of an absent entry or with another source check")));
        }
        self.mem.write(page, i, entry.0[0]);
        self.flush_irte(page, i);
        self.submit(&[Descriptor::iec(Some((index, 0)))])
    }

    /// A free table entry index (not handed out), lowest first, or
    /// `TableFull` when all are in use.
    pub fn alloc_irte(&mut self) -> Result<u16, Error> {
        let irt = self.irt.as_mut().ok_or(UnitError { unit: self.base, cause: HwError::NotEnabled })?;
        for (w, word) in irt.used.iter_mut().enumerate() {
            if *word != u64::MAX {
                let bit = (!*word).trailing_zeros();
                *word |= 1 << bit;
                return Ok((w * 64) as u16 + bit as u16);
            }
        }
        Err(self.err(HwError::TableFull))
    }

    /// A free entry (as [`Self::alloc_irte`]) written with `entry`. When
    /// the write fails the entry may be half-written: it is cleared and
    /// freed again, and stays handed out if even that fails (the first
    /// error, which covers the second, is the one reported).
    pub fn install_irte(&mut self, entry: crate::ir::Irte) -> Result<u16, Error> {
        let index = self.alloc_irte()?;
        if let Err(e) = self.set_irte(index, entry) {
            let _ = self.free_irte(index);
            return Err(e);
        }
        Ok(index)
    }

    /// Clears entry `index` (blocking its interrupts) and makes it free.
    pub fn free_irte(&mut self, index: u16) -> Result<(), Error> {
        self.set_irte(index, crate::ir::Irte::default())?;
        if let Some(word) = self.irt.as_mut().and_then(|t| t.used.get_mut(index as usize / 64)) {
            *word &= !(1 << (index % 64));
        }
        Ok(())
    }

    /// Table entry `index` as the unit sees it.
    pub fn irte(&self, index: u16) -> Option<crate::ir::Irte> {
        let (page, i) = self.irte_slot(index).ok()?;
        Some(crate::ir::Irte([self.mem.read(page, i), self.mem.read(page, i + 1)]))
    }

    /// Writes back entry word `i` of `page` (and the other half: an entry
    /// is 16 aligned bytes, within one cache line).
    fn flush_irte(&mut self, page: u64, i: usize) {
        if !self.mem.coherent() {
            self.mem.flush(page + i as u64 * 8, 16);
        }
    }

    /// Turns translation (and queued invalidation) off.
    pub fn disable(&mut self) -> Result<(), Error> {
        self.gcmd(Gcmd::TE, false)?;
        if let Some(q) = self.queue.take() {
            self.gcmd(Gcmd::QIE, false)?;
            self.mem.free_table(q.page);
        }
        Ok(())
    }

    fn register_context_invalidate(&mut self, what: u64) -> Result<(), Error> {
        self.mmio.set64(regs::CCMD, ccmd::ICC | what);
        self.stats.invalidations += 1;
        self.stats.waits += 1;
        self.wait_for("CCMD.ICC", |m| m.get64(regs::CCMD) & ccmd::ICC == 0)?;
        let value = self.mmio.get64(regs::CCMD);
        if value & ccmd::CAIG == 0 {
            return Err(self.err(HwError::Rejected { register: "CCMD", value }));
        }
        Ok(())
    }

    fn register_iotlb_invalidate(&mut self, what: u64) -> Result<(), Error> {
        let reg = self.caps.iro() + 8;
        self.mmio.write64(reg, iotlb::IVT | iotlb::DR | iotlb::DW | what);
        self.stats.invalidations += 1;
        self.stats.waits += 1;
        self.wait_for("IOTLB.IVT", |m| m.read64(reg) & iotlb::IVT == 0)?;
        let value = self.mmio.read64(reg);
        if value & iotlb::IAIG == 0 {
            return Err(self.err(HwError::Rejected { register: "IOTLB", value }));
        }
        Ok(())
    }

    /// Submits `descs` followed by one invalidation wait, and waits for it.
    fn submit(&mut self, descs: &[Descriptor]) -> Result<(), Error> {
        self.submit_each(descs.len(), |i| Descriptor256::from(descs[i]))
    }

    /// As [`Self::submit`], for descriptors in their 256-bit form (legacy
    /// queues use their first 128 bits).
    pub(crate) fn submit256(&mut self, descs: &[Descriptor256]) -> Result<(), Error> {
        self.submit_each(descs.len(), |i| descs[i])
    }

    /// Submits descriptors `desc(0)..desc(count - 1)`, then the wait, and
    /// waits for it (nothing copied into a list first).
    fn submit_each(&mut self, count: usize, desc: impl Fn(usize) -> Descriptor256) -> Result<(), Error> {
        let Some((tail, page, slots, words, shift, mut drained)) =
            self.queue.as_ref().map(|q| (q.tail, q.page, q.slots(), q.words(), q.shift(), q.drained))
        else {
            return Err(self.err(HwError::NotEnabled));
        };
        self.wait_seq = self.wait_seq.wrapping_add(1).max(1);
        let seq = self.wait_seq;
        let status = self.status_page;
        self.mem.write(status, 0, 0);
        let wait = Descriptor256::from(Descriptor::wait(status, seq));
        let item = |i: usize| if i < count { desc(i) } else { wait };
        let total = count + 1;
        let mut t = tail;
        let mut next = 0;
        while next < total {
            let chunk = next..total.min(next + (slots - 1) as usize);
            next = chunk.end;
            // Room: the hardware head must not be overtaken. A drained
            // queue has room for any chunk (at most `slots - 1`).
            let n = chunk.len() as u64;
            if !drained {
                self.wait_for("IQH", |m| {
                    let head = (m.get64(regs::IQH) >> shift) % slots;
                    (head + slots - t - 1) % slots >= n
                })?;
            }
            drained = false;
            let first = t;
            for d in chunk.map(item) {
                for w in 0..words {
                    self.mem.write(page, t as usize * words + w, d.0[w]);
                }
                t = (t + 1) % slots;
            }
            if !self.mem.coherent() {
                // Only the slots just written (two pieces when they wrap
                // past the end of the ring).
                let bytes = words as u64 * 8;
                let upto = if t > first { t } else { slots };
                self.mem.flush(page + first * bytes, (upto - first) * bytes);
                if t <= first && t > 0 {
                    self.mem.flush(page, t * bytes);
                }
            }
            self.mmio.set64(regs::IQT, t << shift);
            if let Some(q) = self.queue.as_mut() {
                q.tail = t;
                q.drained = false;
            }
        }
        self.stats.invalidations += count as u64;
        self.stats.waits += 1;
        let mut error = None;
        // The status first: a written status means every descriptor
        // before the wait completed (a queue error stops the unit before
        // it, and a time-out error aborts the wait), so a fast unit costs
        // no register read here.
        let r = self.wait_for("invalidation wait status", |m| {
            if self.mem.read(status, 0) as u32 == seq {
                return true;
            }
            let f = regs::read_fsts(m);
            if f.intersects(Fsts::QUEUE_ERRORS) {
                error = Some(f.bits());
                return true;
            }
            false
        });
        if let Some(f) = error {
            self.restart_queue(shift, slots);
            return Err(self.err(HwError::QueueError { status: f }));
        }
        if r.is_ok()
            && let Some(q) = self.queue.as_mut()
        {
            q.drained = true;
        }
        r
    }

    /// After a queue error (IQE, ICE or ITE in FSTS): the unit stopped at
    /// the descriptor IQH names and fetches nothing more until the error
    /// is cleared, and would fetch the same descriptor again. Everything
    /// from there on is dropped (IQT moved back to IQH: this submission
    /// failed, and its caller keeps what the invalidation was to make
    /// safe), then the error bits are cleared, so the next submission
    /// runs on an empty queue instead of failing for good.
    fn restart_queue(&mut self, shift: u32, slots: u64) {
        let head = (self.mmio.get64(regs::IQH) >> shift) % slots;
        self.mmio.set64(regs::IQT, head << shift);
        if let Some(q) = self.queue.as_mut() {
            q.tail = head;
            q.drained = true;
        }
        self.mmio.set32(regs::FSTS, Fsts::QUEUE_ERRORS.bits());
    }

    /// Invalidates the context cache and then the whole IOTLB of `did`.
    fn flush_context(&mut self, scope: ContextScope, did: u16) -> Result<(), Error> {
        if self.queue.is_some() {
            self.submit(&[Descriptor::context(scope), Descriptor::iotlb(IotlbScope::Domain(did))])
        } else {
            let what = match scope {
                ContextScope::Global => ccmd::GLOBAL,
                ContextScope::Domain(d) => ccmd::DOMAIN | d as u64,
                ContextScope::Device { did, sid } => ccmd::DEVICE | did as u64 | (sid as u64) << 16,
            };
            self.register_context_invalidate(what)?;
            self.register_iotlb_invalidate(iotlb::DOMAIN | iotlb::did(did))
        }
    }

    /// Invalidates the IOTLB for `[start, last]` of domain `did` with as few
    /// page-selective invalidations as the address mask allows, or the
    /// whole domain, and one wait for all of them.
    pub fn invalidate_range(&mut self, did: u16, start: u64, last: u64, leaf_only: bool) -> Result<(), Error> {
        let blocks = if self.caps.psi() { page_blocks(start, last, self.caps.mamv(), 32) } else { None };
        if self.queue.is_some() {
            let descs: Vec<Descriptor> = match blocks {
                Some(b) => b
                    .into_iter()
                    .map(|(addr, am)| Descriptor::iotlb(IotlbScope::Pages { did, addr, am, leaf_only }))
                    .collect(),
                None => alloc::vec![Descriptor::iotlb(IotlbScope::Domain(did))],
            };
            self.submit(&descs)
        } else {
            match blocks {
                Some(b) => {
                    for (addr, am) in b {
                        let iva = self.caps.iro();
                        self.mmio.write64(iva, addr | (leaf_only as u64) << 6 | am as u64);
                        self.register_iotlb_invalidate(iotlb::PAGE | iotlb::did(did))?;
                    }
                    Ok(())
                }
                None => self.register_iotlb_invalidate(iotlb::DOMAIN | iotlb::did(did)),
            }
        }
    }

    /// Flushes the write buffer (CAP.RWBF units need it after page-table
    /// updates before the hardware may see them); a no-op otherwise.
    pub fn flush_write_buffer(&mut self) -> Result<(), Error> {
        if self.caps.rwbf() { self.gcmd_oneshot(Gcmd::WBF, "GSTS.WBFS") } else { Ok(()) }
    }

    /// Records the RMRR ranges (`[base, limit]`) of devices this unit
    /// translates, by requester id: firmware keeps DMAing there, so any
    /// domain such a device is attached to must map them one-to-one.
    pub fn set_rmrrs(&mut self, rmrrs: Vec<(u16, u64, u64)>) {
        self.rmrrs = rmrrs;
    }

    /// The RMRR ranges of device `sid`.
    pub fn rmrrs_for(&self, sid: u16) -> Vec<(u64, u64)> {
        self.rmrrs.iter().filter(|r| r.0 == sid).map(|r| (r.1, r.2)).collect()
    }

    /// Invalidates `[start, last]` of a first-stage domain `did` under
    /// PASID 0 and every other PASID attached to it: PASID-based IOTLB
    /// invalidation, scalable mode only.
    pub fn invalidate_range_pasid(&mut self, did: u16, start: u64, last: u64, leaf_only: bool) -> Result<(), Error> {
        if self.scalable.is_none() {
            // A 128-bit queue cannot carry the PASID-based descriptor.
            return Err(self.err(HwError::Unsupported("not in scalable mode")));
        }
        let blocks = page_blocks(start, last, self.caps.mamv(), 32);
        // First-stage translations are cached per PASID: every PASID the
        // domain is attached at (PASID 0 and those of `pasid.rs`).
        let pasids = self.pasids_to_invalidate(did);
        let descs: Vec<Descriptor256> = match blocks {
            Some(b) => pasids
                .iter()
                .flat_map(|&pasid| {
                    b.iter().map(move |&(addr, am)| {
                        Descriptor256::pasid_iotlb(PasidIotlbScope::Pages { did, pasid, addr, am, leaf_only })
                    })
                })
                .collect(),
            None => {
                pasids.iter().map(|&pasid| Descriptor256::pasid_iotlb(PasidIotlbScope::Pasid { did, pasid })).collect()
            }
        };
        self.submit256(&descs)
    }

    pub(crate) fn scalable_change(
        &mut self,
        f: impl Fn(&mut ScalableTables<T>) -> Result<Invalidations, TablesError>,
        sid: u16,
    ) -> Result<(), Error> {
        let cm = self.caps.caching_mode();
        let unit = self.base;
        let cause = |e: TablesError| match e {
            TablesError::NoMemory => HwError::NoMemory,
            TablesError::Invalid(what) => HwError::Invalid(what),
            // Only after a block: the entry came back (cannot happen with
            // the unit holding the tables alone).
            TablesError::Busy { .. } => HwError::Invalid("PASID entry still present after blocking"),
        };
        let not_scalable = UnitError { unit, cause: HwError::Unsupported("not in scalable mode") };
        let tables = self.scalable.as_mut().ok_or(not_scalable)?;
        let inv = match f(tables) {
            Ok(inv) => inv,
            Err(TablesError::Busy { .. }) => {
                // Replace a live entry: block, invalidate, then install.
                let blocked = tables.block(sid);
                let d = blocked.descriptors(cm);
                self.submit256(&d)?;
                let tables = self.scalable.as_mut().expect("still scalable");
                f(tables).map_err(|e| UnitError { unit, cause: cause(e) })?
            }
            Err(e) => return Err(UnitError { unit, cause: cause(e) }),
        };
        let d = inv.descriptors(cm);
        if d.is_empty() { Ok(()) } else { self.submit256(&d) }
    }

    /// Scalable mode: device `sid` translates through the first-stage table
    /// `root` (`levels` levels) of domain `did`.
    pub fn attach_first_stage(&mut self, sid: u16, root: u64, levels: u32, did: u16) -> Result<(), Error> {
        if !self.caps.first_stage() {
            return Err(self.err(HwError::Unsupported("first-stage translation (ECAP.FSTS)")));
        }
        self.scalable_change(|t| t.set_first_stage(sid, root, levels, did), sid)
    }

    /// Scalable mode: the root, context, PASID-directory and PASID-0
    /// entries the unit walks for `sid` (`None` in legacy mode or when a
    /// level on the way is not present).
    pub fn scalable_entry(&self, sid: u16) -> Option<crate::scalable::DeviceEntries> {
        self.scalable.as_ref().and_then(|t| t.entry(sid))
    }

    /// The domain device `sid` is attached to, in either mode.
    pub fn attached_domain(&self, sid: u16) -> Option<u16> {
        match &self.scalable {
            Some(t) => t.entry(sid).filter(|e| e.pasid.present()).map(|e| e.pasid.did()),
            None => Some(self.context_entry(sid)).filter(|e| e.present()).map(|e| e.did()),
        }
    }

    /// A free domain id.
    pub fn alloc_did(&mut self) -> Result<u16, Error> {
        if let Some(d) = self.free_dids.pop() {
            return Ok(d);
        }
        if self.next_did >= self.caps.domains().min(1 << 16) {
            return Err(self.err(HwError::NoDomainId));
        }
        let d = self.next_did as u16;
        self.next_did += 1;
        Ok(d)
    }

    /// Returns a domain id.
    pub fn free_did(&mut self, did: u16) {
        self.free_dids.push(did);
    }

    fn write_entry(&mut self, table: u64, index: usize, e: [u64; 2]) {
        // High half first, present bit (low half) last.
        self.mem.write(table, index * 2 + 1, e[1]);
        self.mem.write(table, index * 2, e[0]);
        if !self.mem.coherent() {
            self.mem.flush(table + index as u64 * 16, 16);
        }
    }

    /// Clears a live root or context entry: the low half (present bit)
    /// first, so a walk in between finds it not present rather than
    /// present with a zeroed domain id and address width.
    fn clear_entry(&mut self, table: u64, index: usize) {
        self.mem.write(table, index * 2, 0);
        self.mem.write(table, index * 2 + 1, 0);
        if !self.mem.coherent() {
            self.mem.flush(table + index as u64 * 16, 16);
        }
    }

    /// Points device `sid` (requester id) at the second-stage table `root`
    /// of `levels` levels, domain `did`. The device translates from now on.
    pub fn attach(&mut self, sid: u16, root: u64, levels: u32, did: u16) -> Result<(), Error> {
        let aw = crate::entries::aw_for_levels(levels)
            .filter(|aw| self.caps.sagaw() >> aw & 1 != 0)
            .ok_or_else(|| self.err(HwError::Unsupported("page-table depth not in SAGAW")))?;
        if self.scalable.is_some() {
            return self.scalable_change(|t| t.set_second_stage(sid, root, aw, did), sid);
        }
        self.set_context(sid, ContextEntry::new(TranslationType::Translate, root, aw, did), did)
    }

    /// Scalable mode: as [`Self::attach`], with SSADE in the PASID entry
    /// when `ssade`, so the unit records accessed and dirty bits in the
    /// table's leaves (ECAP.SSADS needed; refused otherwise and in legacy
    /// mode).
    pub fn attach_dirty(&mut self, sid: u16, root: u64, levels: u32, did: u16, ssade: bool) -> Result<(), Error> {
        if !ssade {
            return self.attach(sid, root, levels, did);
        }
        if self.scalable.is_none() || !self.caps.dirty_tracking() {
            return Err(self.err(HwError::Unsupported("dirty tracking (scalable mode with ECAP.SSADS)")));
        }
        let aw = crate::entries::aw_for_levels(levels)
            .filter(|aw| self.caps.sagaw() >> aw & 1 != 0)
            .ok_or_else(|| self.err(HwError::Unsupported("page-table depth not in SAGAW")))?;
        self.scalable_change(|t| t.set_second_stage_ad(sid, root, aw, did, true), sid)
    }

    /// Scalable mode: turns SSADE on or off in the second-stage PASID
    /// entry of every device attached to domain `did`, in place, with the
    /// PASID-cache and IOTLB invalidations that makes the unit see it.
    pub fn set_dirty_tracking(&mut self, did: u16, on: bool) -> Result<(), Error> {
        if on && !self.caps.dirty_tracking() {
            return Err(self.err(HwError::Unsupported("dirty tracking (ECAP.SSADS)")));
        }
        let sids = match &self.scalable {
            Some(t) => t.devices_of(did),
            None if on => return Err(self.err(HwError::Unsupported("dirty tracking needs scalable mode"))),
            None => return Ok(()),
        };
        for sid in sids {
            self.scalable_change(|t| t.set_ssade(sid, on), sid)?;
        }
        self.set_pasids_dirty_tracking(did, on)
    }

    /// The domain id for pass-through entries: one for all of them,
    /// taken the first time and never returned (an id given back while
    /// an entry, or a cache entry the unit has not dropped, still carries
    /// it would tag a translating domain's entries the same way).
    pub fn pass_through_did(&mut self) -> Result<u16, Error> {
        if let Some(did) = self.pass_through_did {
            return Ok(did);
        }
        let did = self.alloc_did()?;
        self.pass_through_did = Some(did);
        Ok(did)
    }

    /// Lets device `sid` DMA to physical addresses untranslated (ECAP.PT),
    /// tagged `did` (use [`Self::pass_through_did`]).
    pub fn pass_through(&mut self, sid: u16, did: u16) -> Result<(), Error> {
        if !self.caps.pass_through() {
            return Err(self.err(HwError::Unsupported("pass-through (ECAP.PT)")));
        }
        if self.scalable.is_some() {
            return self.scalable_change(|t| t.set_pass_through(sid, did), sid);
        }
        let aw = self.caps.best_levels().map(|(_, aw)| aw).unwrap_or(1);
        self.set_context(sid, ContextEntry::new(TranslationType::PassThrough, 0, aw, did), did)
    }

    fn set_context(&mut self, sid: u16, entry: ContextEntry, did: u16) -> Result<(), Error> {
        let bus = (sid >> 8) as u8;
        let table = match self.context_tables.get(&bus) {
            Some(t) => *t,
            None => {
                let t = self.mem.alloc_table().ok_or_else(|| self.err(HwError::NoMemory))?;
                self.context_tables.insert(bus, t);
                self.write_entry(self.root, bus as usize, RootEntry::new(t).0);
                t
            }
        };
        let old = ContextEntry([
            self.mem.read(table, (sid & 0xff) as usize * 2),
            self.mem.read(table, (sid & 0xff) as usize * 2 + 1),
        ]);
        if old.present() {
            // Changing a live entry: block first, flush, then install.
            self.clear_entry(table, (sid & 0xff) as usize);
            self.flush_context(ContextScope::Device { did: old.did(), sid }, old.did())?;
        }
        self.write_entry(table, (sid & 0xff) as usize, entry.0);
        // Not-present -> present needs no invalidation without caching
        // mode; doing it anyway is cheap and covers CM = 1.
        self.flush_context(ContextScope::Device { did, sid }, did)
    }

    /// Blocks device `sid` again (its context entry goes away).
    pub fn detach(&mut self, sid: u16) -> Result<(), Error> {
        if let Some(t) = self.scalable.as_mut() {
            let cm = self.caps.caching_mode();
            let d = t.block(sid).descriptors(cm);
            return if d.is_empty() { Ok(()) } else { self.submit256(&d) };
        }
        let bus = (sid >> 8) as u8;
        let Some(&table) = self.context_tables.get(&bus) else { return Ok(()) };
        let idx = (sid & 0xff) as usize;
        let old = ContextEntry([self.mem.read(table, idx * 2), self.mem.read(table, idx * 2 + 1)]);
        if !old.present() {
            return Ok(());
        }
        self.clear_entry(table, idx);
        self.flush_context(ContextScope::Device { did: old.did(), sid }, old.did())
    }

    /// Blocks every requester and every PASID whose entry points at
    /// domain `did` (what a domain being dropped leaves attached): after
    /// `Ok`, no entry of this unit names `did`. Stops at the first failure
    /// (an entry whose invalidation did not complete may still be in use).
    pub fn detach_domain(&mut self, did: u16) -> Result<(), Error> {
        if let Some(t) = &self.scalable {
            for (sid, pasid) in t.pasid_users_of(did) {
                self.detach_pasid(sid, pasid, did)?;
            }
            let devices = self.scalable.as_ref().map(|t| t.devices_of(did)).unwrap_or_default();
            for sid in devices {
                self.detach(sid)?;
            }
            return Ok(());
        }
        let mut users = Vec::new();
        for (&bus, &table) in &self.context_tables {
            for idx in 0..256usize {
                let e = ContextEntry([self.mem.read(table, idx * 2), self.mem.read(table, idx * 2 + 1)]);
                if e.present() && e.did() == did {
                    users.push(u16::from(bus) << 8 | idx as u16);
                }
            }
        }
        for sid in users {
            self.detach(sid)?;
        }
        Ok(())
    }

    /// The context entry of `sid` (for tests and reports).
    pub fn context_entry(&self, sid: u16) -> ContextEntry {
        match self.context_tables.get(&((sid >> 8) as u8)) {
            Some(&t) => {
                let i = (sid & 0xff) as usize;
                ContextEntry([self.mem.read(t, i * 2), self.mem.read(t, i * 2 + 1)])
            }
            None => ContextEntry::default(),
        }
    }

    /// Reads and clears every pending fault record (and a primary fault
    /// overflow), appending them to the unit's log; returns the new ones.
    pub fn poll_faults(&mut self) -> Vec<FaultRecord> {
        let mut out = Vec::new();
        let status = regs::read_fsts(&self.mmio);
        if status.contains(Fsts::PPF) {
            let nfr = self.caps.nfr();
            let first = status.fri() as usize % nfr;
            for k in 0..nfr {
                let i = (first + k) % nfr;
                let off = self.caps.fro() + i * 16;
                let hi = self.mmio.read64(off + 8);
                if hi >> 63 == 0 {
                    continue;
                }
                let lo = self.mmio.read64(off);
                out.push(FaultRecord::decode(lo, hi));
                // F is RW1C, in the upper dword: a 32-bit write.
                self.mmio.write32(off + 12, 1 << 31);
            }
        }
        if status.contains(Fsts::PFO) {
            self.overflows += 1;
        }
        if status.intersects(Fsts::PFO | Fsts::PPF) {
            // Writing the status back (PFO is RW1C, PPF read-only) marks
            // the event serviced: a pending masked event (FECTL.IP) clears.
            self.mmio.set32(regs::FSTS, (Fsts::PFO | Fsts::PPF).bits());
        }
        self.faults.extend_from_slice(&out);
        if self.faults.len() > 256 {
            let extra = self.faults.len() - 256;
            self.faults.drain(..extra);
        }
        out
    }

    /// Signals fault events as the message-signalled interrupt
    /// `address`/`data` (an x86 MSI: address 0xfeeX_X000 naming the
    /// destination APIC, data the vector) and unmasks it. The unit raises
    /// it when a fault is recorded while none was pending; the handler
    /// should wake whoever calls [`Self::poll_faults`], which clears the
    /// records and so re-arms the event. Polling works with or without it.
    pub fn enable_fault_event(&mut self, address: u64, data: u32) {
        // Mask while the message is changed, then unmask.
        self.mmio.set32(regs::FECTL, Fectl::IM.bits());
        self.mmio.set32(regs::FEDATA, data);
        self.mmio.set32(regs::FEADDR, address as u32);
        self.mmio.set32(regs::FEUADDR, (address >> 32) as u32);
        self.mmio.set32(regs::FECTL, Fectl::empty().bits());
    }

    /// Masks the fault event interrupt (faults are still recorded; FECTL.IP
    /// shows one arrived while masked).
    pub fn mask_fault_event(&mut self) {
        self.mmio.set32(regs::FECTL, Fectl::IM.bits());
    }

    /// FECTL: whether the fault event is masked and whether one is pending.
    pub fn fault_event_state(&self) -> (bool, bool) {
        let v = regs::read_fectl(&self.mmio);
        (v.contains(Fectl::IM), v.contains(Fectl::IP))
    }

    /// The fault log (latest 256) and the number of overflows seen.
    pub fn fault_log(&self) -> (&[FaultRecord], u64) {
        (&self.faults, self.overflows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's default CAP and ECAP (intel-iommu, legacy mode).
    const QEMU_CAP: u64 = 0x00d2_008c_222f_0606;
    const QEMU_ECAP: u64 = 0xf0_0f4a;
    /// ECAP with x-scalable-mode=on (SMTS and SSTS added).
    const QEMU_ECAP_SM: u64 = 0x0000_4800_80f0_0f4a;

    #[test]
    fn qemu_default_capabilities_decode() {
        let c = Caps { cap: QEMU_CAP, ecap: QEMU_ECAP };
        assert_eq!(c.domains(), 65536);
        assert_eq!(c.sagaw_widths().collect::<Vec<_>>(), [39, 48]);
        assert_eq!(c.mgaw(), 48);
        assert_eq!(c.fro(), 0x220);
        assert_eq!(c.nfr(), 1);
        assert_eq!((c.second_stage_2m(), c.second_stage_1g()), (true, true));
        assert!(c.psi());
        assert!(!c.caching_mode());
        assert!(c.qi() && c.interrupt_remapping() && c.pass_through());
        assert!(!c.coherent() && !c.scalable());
        assert_eq!(c.iro(), 0xf0);
        assert!(!c.nested() && !c.pasid() && !c.dirty_tracking() && !c.device_tlb());
        let sm = Caps { cap: QEMU_CAP, ecap: QEMU_ECAP_SM };
        assert!(sm.scalable());
        assert!(sm.second_stage());
        assert!(!sm.first_stage());
    }

    #[test]
    fn single_bit_fields_sit_where_the_spec_puts_them() {
        let ecap = |b: u32| Caps { cap: 0, ecap: 1 << b };
        assert!(ecap(2).device_tlb());
        assert!(ecap(26).nested());
        assert!(ecap(31).supervisor_requests() && ecap(34).extended_accessed());
        assert!(Caps { cap: 1 << 60, ecap: 0 }.first_stage_5level());
        assert!(!Caps { cap: QEMU_CAP, ecap: QEMU_ECAP_SM }.first_stage_5level());
        assert!(ecap(40).pasid());
        assert!(ecap(45).dirty_tracking());
        assert!(!ecap(50).dirty_tracking(), "bit 50 is not SSADS");
        assert!(ecap(47).first_stage() && ecap(46).second_stage() && ecap(43).scalable());
        // SAGAW bit 3 is 5-level (57-bit); bits 0 and 4 name no width here.
        let sagaw = |bits: u64| Caps { cap: bits << 8, ecap: 0 }.sagaw_widths().collect::<Vec<_>>();
        assert_eq!(sagaw(0b1_1111), [39, 48, 57]);
        assert_eq!(sagaw(0b1_0001), [] as [u32; 0]);
        // SLLPS bit 1 alone: 1 GiB without 2 MiB.
        let c = Caps { cap: 2 << 34, ecap: 0 };
        assert!(!c.second_stage_2m() && c.second_stage_1g());
    }
}
