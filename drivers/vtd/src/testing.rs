//! A register-level model of one VT-d unit, for host tests (feature
//! `testing`): the driver's own tests and those of crates built on it run
//! against the same model.
//!
//! What it models (the behaviours QEMU's unit shows, listed in QEMU-NOTES):
//! * GCMD acting on the difference from GSTS: the persistent enables (TE,
//!   QIE, IRE, CFI) follow the value written, the one-shot commands (SRTP,
//!   SIRTP) latch RTADDR / IRTA and report it in GSTS;
//! * register-based invalidation: CCMD.ICC and IOTLB.IVT clear as soon as
//!   they are written (the invalidation is done);
//! * the invalidation queue, 128- or 256-bit descriptors (IQA.DW), run
//!   when IQT is written, fetched through the test's [`DeviceMemory`]; a
//!   wait descriptor with SW stores its status word there;
//! * one fault recording register (RW1C F bit), FSTS and the fault event
//!   (FECTL mask / pending, the message registers).
//!
//! Every invalidation the unit runs, register-based or queued, waits
//! included, is decoded (from the bits, independently of the driver's
//! encoders) into [`Invalidation`] and appended to a log with the memory's
//! ordering stamp ([`DeviceMemory::stamp`]), so a test can check that each
//! change to the tables was followed by the invalidation that covers it.
//!
//! The model does not translate DMA: tests walk the tables themselves from
//! [`RegisterModel::root_table`] and [`RegisterModel::interrupt_table`].

use crate::regs::{self, Fectl, Fsts, Gcmd, Gsts, Mmio};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
pub use portcullis_iommu::testing::DeviceMemory;
use spin::{Mutex, MutexGuard};

/// The capability registers the model reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// CAP.
    pub cap: u64,
    /// ECAP.
    pub ecap: u64,
}

impl Config {
    /// QEMU's default unit (QEMU-NOTES): 48-bit MGAW, 3- and 4-level
    /// tables, 2 MiB and 1 GiB pages, PSI with MAMV 18, one fault recording
    /// register at 0x220; queued invalidation, interrupt remapping,
    /// pass-through, IOTLB registers at 0xf0; ECAP.C = 0 (page walks do not
    /// snoop).
    pub const QEMU: Self = Self { cap: 0x00d2_008c_222f_0606, ecap: 0x00f0_0f4a };

    /// The same unit with ECAP.C (`coherent`) set or clear.
    pub const fn coherent(self, coherent: bool) -> Self {
        Self { ecap: self.ecap & !1 | coherent as u64, ..self }
    }

    /// Offset of the fault recording registers (CAP.FRO).
    pub const fn fro(self) -> usize {
        (((self.cap >> 24) & 0x3ff) * 16) as usize
    }

    /// Offset of the IOTLB registers (ECAP.IRO): IVA there, IOTLB at +8.
    pub const fn iro(self) -> usize {
        (((self.ecap >> 8) & 0x3ff) * 16) as usize
    }
}

/// How an invalidation reached the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Through CCMD or the IOTLB register.
    Register,
    /// Through the invalidation queue.
    Queue,
}

/// Granularity of a context-cache invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextInvalidation {
    /// Every entry.
    Global,
    /// The entries of one domain.
    Domain(u16),
    /// The entry of one source id (with function mask `fm`: 0 none, 1..=3
    /// masks the low 1..=3 bits of the function) in one domain.
    Device {
        /// Domain id.
        did: u16,
        /// Source id.
        sid: u16,
        /// Function mask.
        fm: u8,
    },
}

/// Granularity of an IOTLB invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotlbInvalidation {
    /// Everything.
    Global,
    /// One domain.
    Domain(u16),
    /// `2^am` pages from `addr` in one domain; `ih`: leaf entries only
    /// (paging-structure caches kept).
    Pages {
        /// Domain id.
        did: u16,
        /// First byte (the low 12 + `am` bits are ignored by the unit).
        addr: u64,
        /// Address mask.
        am: u8,
        /// Invalidation hint.
        ih: bool,
    },
}

/// One invalidation (or wait) the unit ran, decoded from its bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// Context-cache invalidation (type 1 or CCMD).
    Context(ContextInvalidation),
    /// IOTLB invalidation (type 2 or the IOTLB register).
    Iotlb(IotlbInvalidation),
    /// Interrupt entry cache invalidation (type 4): every entry (`None`)
    /// or `2^im` entries from `index`.
    InterruptEntries(Option<(u16, u8)>),
    /// PASID-based IOTLB invalidation (type 6): every mapping of `pasid`
    /// in `did` (`pages` `None`), or `2^am` pages from `addr`.
    PasidIotlb {
        /// Domain id.
        did: u16,
        /// PASID.
        pasid: u32,
        /// (addr, am, ih) for page-selective.
        pages: Option<(u64, u8, bool)>,
    },
    /// PASID-cache invalidation (type 7): granularity field `g` (0 domain,
    /// 1 PASID, 3 global).
    PasidCache {
        /// Granularity.
        g: u8,
        /// Domain id.
        did: u16,
        /// PASID.
        pasid: u32,
    },
    /// Invalidation wait (type 5): the status write it made (address,
    /// data), if SW.
    Wait {
        /// (address, data) stored.
        status: Option<(u64, u32)>,
    },
    /// A descriptor type the model does not decode (its four words).
    Other([u64; 4]),
}

impl Invalidation {
    /// Whether this drops cached context entries of source id `sid` that
    /// were tagged with domain `did`.
    pub fn covers_context(&self, did: u16, sid: u16) -> bool {
        match *self {
            Self::Context(ContextInvalidation::Global) => true,
            Self::Context(ContextInvalidation::Domain(d)) => d == did,
            Self::Context(ContextInvalidation::Device { did: d, sid: s, fm }) => {
                let mask = !((1u16 << fm.min(3)) - 1);
                d == did && s & mask == sid & mask
            }
            _ => false,
        }
    }

    /// Whether this drops IOTLB entries of domain `did` for `iova`; with
    /// `tables`, paging-structure cache entries too (no IH).
    pub fn covers_iotlb(&self, did: u16, iova: u64, tables: bool) -> bool {
        match *self {
            Self::Iotlb(IotlbInvalidation::Global) => true,
            Self::Iotlb(IotlbInvalidation::Domain(d)) => d == did,
            Self::Iotlb(IotlbInvalidation::Pages { did: d, addr, am, ih }) => {
                let size = 1u64 << (12 + am as u32).min(63);
                d == did && iova & !(size - 1) == addr & !(size - 1) && !(tables && ih)
            }
            _ => false,
        }
    }

    /// Whether this drops first-stage (PASID-tagged) IOTLB entries of
    /// `pasid` in domain `did` for `iova`; with `tables`, paging-structure
    /// cache entries too (no IH). A domain-selective IOTLB invalidation
    /// covers every PASID of the domain in scalable mode.
    pub fn covers_pasid_iotlb(&self, did: u16, pasid: u32, iova: u64, tables: bool) -> bool {
        match *self {
            Self::PasidIotlb { did: d, pasid: p, pages: None } => d == did && p == pasid,
            Self::PasidIotlb { did: d, pasid: p, pages: Some((addr, am, ih)) } => {
                let size = 1u64 << (12 + am as u32).min(63);
                d == did && p == pasid && iova & !(size - 1) == addr & !(size - 1) && !(tables && ih)
            }
            Self::Iotlb(IotlbInvalidation::Global) => true,
            Self::Iotlb(IotlbInvalidation::Domain(d)) => d == did,
            _ => false,
        }
    }

    /// Whether this drops the cached interrupt remapping entry `index`.
    pub fn covers_interrupt_entry(&self, index: u16) -> bool {
        match *self {
            Self::InterruptEntries(None) => true,
            Self::InterruptEntries(Some((first, im))) => {
                let n = 1u32 << im.min(16);
                (first as u32..first as u32 + n).contains(&(index as u32))
            }
            _ => false,
        }
    }
}

/// One entry of the model's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logged {
    /// What ran.
    pub what: Invalidation,
    /// How it was submitted.
    pub via: Via,
    /// [`DeviceMemory::stamp`] when it ran.
    pub stamp: u64,
}

/// The unit's register state, open to tests.
#[derive(Debug, Default)]
pub struct State {
    /// GSTS.
    pub gsts: Gsts,
    /// RTADDR as last written.
    pub rtaddr: u64,
    /// RTADDR as latched by the last SRTP (what the unit walks).
    pub latched_root: u64,
    /// CCMD as last written (ICC cleared: done).
    pub ccmd: u64,
    /// IVA as last written.
    pub iva: u64,
    /// IQA.
    pub iqa: u64,
    /// IQH.
    pub iqh: u64,
    /// IQT.
    pub iqt: u64,
    /// ICS.
    pub ics: u32,
    /// FSTS.
    pub fsts: Fsts,
    /// The fault recording register (low, high).
    pub fault: [u64; 2],
    /// FECTL (IM, IP).
    pub fectl: Fectl,
    /// FEDATA, FEADDR, FEUADDR.
    pub fe_msg: [u32; 3],
    /// IRTA as last written.
    pub irta: u64,
    /// IRTA as latched by the last SIRTP.
    pub latched_irta: u64,
    /// Fault event MSIs sent: (address, data).
    pub interrupts: Vec<(u64, u32)>,
    /// Every invalidation run, oldest first.
    pub log: Vec<Logged>,
    /// Test knob: GSTS never follows GCMD (timeouts).
    pub stuck: bool,
    /// Test knob: report an invalidation queue error (FSTS.IQE) instead of
    /// running the queue.
    pub queue_error: bool,
    /// Test knob: as `queue_error`, for this many submissions only.
    pub queue_errors_left: u32,
    /// Test knob: the `n`th submission from now (1-based) fails as with
    /// `queue_error`; the ones before it run.
    pub fail_submission: Option<u32>,
    /// Test knob: register-based invalidations finish without being done
    /// (CCMD.CAIG and IOTLB.IAIG read 0).
    pub reject_invalidation: bool,
    /// The IOTLB invalidate register as read back (IVT clear, IAIG set).
    pub iotlb_reg: u64,
    /// Test knob: the unit fetches no descriptor (IQH stays) while set;
    /// the next IQT write or [`RegisterModel::run_queue`] after it is
    /// cleared runs the queue.
    pub hold_queue: bool,
    /// Reads of IQH so far.
    pub iqh_reads: u64,
}

/// The model of one unit: an [`Mmio`] for the driver (clones share the
/// unit), and accessors for the test.
#[derive(Clone)]
pub struct RegisterModel {
    state: Arc<Mutex<State>>,
    mem: Arc<dyn DeviceMemory>,
    config: Config,
}

impl fmt::Debug for RegisterModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vtd::testing::RegisterModel({:x?})", self.config)
    }
}

fn decode(d: [u64; 4]) -> Invalidation {
    let [lo, hi, ..] = d;
    let g = ((lo >> 4) & 3) as u8;
    let did = (lo >> 16) as u16;
    match lo & 0xf {
        1 => Invalidation::Context(match g {
            1 => ContextInvalidation::Global,
            2 => ContextInvalidation::Domain(did),
            3 => ContextInvalidation::Device { did, sid: (lo >> 32) as u16, fm: ((lo >> 48) & 3) as u8 },
            _ => return Invalidation::Other(d),
        }),
        2 => Invalidation::Iotlb(match g {
            1 => IotlbInvalidation::Global,
            2 => IotlbInvalidation::Domain(did),
            3 => IotlbInvalidation::Pages { did, addr: hi & !0xfff, am: (hi & 0x3f) as u8, ih: hi >> 6 & 1 != 0 },
            _ => return Invalidation::Other(d),
        }),
        4 => {
            Invalidation::InterruptEntries((lo >> 4 & 1 != 0).then_some(((lo >> 32) as u16, ((lo >> 27) & 0x1f) as u8)))
        }
        5 => Invalidation::Wait { status: (lo >> 5 & 1 != 0).then_some((hi & !3, (lo >> 32) as u32)) },
        6 if g >= 2 => Invalidation::PasidIotlb {
            did,
            pasid: ((lo >> 32) & 0xf_ffff) as u32,
            pages: (g == 3).then_some((hi & !0xfff, (hi & 0x3f) as u8, hi >> 6 & 1 != 0)),
        },
        7 => Invalidation::PasidCache { g, did, pasid: ((lo >> 32) & 0xf_ffff) as u32 },
        _ => Invalidation::Other(d),
    }
}

impl RegisterModel {
    /// A unit with `config`'s capabilities, translation off, fetching from
    /// and storing to `mem`; the fault event starts masked (as at reset).
    pub fn new(config: Config, mem: Arc<dyn DeviceMemory>) -> Self {
        let state = State { fectl: Fectl::IM, ..State::default() };
        Self { state: Arc::new(Mutex::new(state)), mem, config }
    }

    /// Its capabilities.
    pub fn config(&self) -> Config {
        self.config
    }

    /// The register state (lock held while the guard lives: do not call
    /// the driver meanwhile).
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Runs what the queue holds, as the unit does on its own once it may
    /// fetch again (after [`State::hold_queue`] is cleared); the model
    /// otherwise runs the queue only when IQT is written.
    pub fn run_queue(&self) {
        let mut s = self.state.lock();
        self.process_queue(&mut s);
    }

    /// The invalidation log so far.
    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().log.clone()
    }

    /// The invalidation log so far, emptying it.
    pub fn take_log(&self) -> Vec<Logged> {
        core::mem::take(&mut self.state.lock().log)
    }

    /// The root table the unit walks (RTADDR as latched, TTM bits
    /// included) while translation is on.
    pub fn root_table(&self) -> Option<u64> {
        let s = self.state.lock();
        s.gsts.contains(Gsts::TE).then_some(s.latched_root)
    }

    /// The interrupt remapping table the unit uses (IRTA as latched) while
    /// remapping is on.
    pub fn interrupt_table(&self) -> Option<u64> {
        let s = self.state.lock();
        s.gsts.contains(Gsts::IRE).then_some(s.latched_irta)
    }

    /// Entries in the interrupt remapping table the unit uses, 2^(S + 1)
    /// from the latched IRTA.S, while remapping is on.
    pub fn interrupt_table_entries(&self) -> Option<usize> {
        self.interrupt_table().map(|irta| 2 << (irta & 0xf))
    }

    /// The hardware records a fault in its (single) fault recording
    /// register: a fault event MSI when unmasked and none was pending,
    /// FECTL.IP when masked. With a record still pending the fault is
    /// lost and FSTS.PFO (primary fault overflow) is set instead.
    pub fn record_fault(&self, lo: u64, hi: u64) {
        let mut s = self.state.lock();
        let was_pending = s.fsts.contains(Fsts::PPF);
        if was_pending {
            s.fsts |= Fsts::PFO;
            return;
        }
        s.fault = [lo, hi];
        s.fsts |= Fsts::PPF;
        if s.fectl.contains(Fectl::IM) {
            s.fectl |= Fectl::IP;
        } else {
            let msg = (s.fe_msg[1] as u64 | (s.fe_msg[2] as u64) << 32, s.fe_msg[0]);
            s.interrupts.push(msg);
        }
    }

    fn log_one(&self, s: &mut State, what: Invalidation, via: Via) {
        let stamp = self.mem.stamp();
        s.log.push(Logged { what, via, stamp });
    }

    fn process_queue(&self, s: &mut State) {
        if !s.gsts.contains(Gcmd::QIE) || s.hold_queue {
            return;
        }
        if let Some(n) = s.fail_submission
            && s.iqh != s.iqt
        {
            if n <= 1 {
                s.fail_submission = None;
                s.queue_errors_left += 1;
            } else {
                s.fail_submission = Some(n - 1);
            }
        }
        if s.queue_error || s.queue_errors_left > 0 {
            // The descriptor at IQH fails (when there is one): the unit
            // stops there until FSTS.IQE is cleared.
            if s.iqh != s.iqt && !s.fsts.contains(Fsts::IQE) {
                s.fsts |= Fsts::IQE;
                s.queue_errors_left = s.queue_errors_left.saturating_sub(1);
            }
            return;
        }
        let wide = s.iqa >> 11 & 1 != 0;
        let (shift, words) = if wide { (5, 4) } else { (4, 2) };
        let slots = (if wide { 128u64 } else { 256 }) << (s.iqa & 7);
        let base = s.iqa & !0xfff;
        while s.iqh != s.iqt {
            let slot = (s.iqh >> shift) % slots;
            let mut d = [0u64; 4];
            for (w, word) in d.iter_mut().enumerate().take(words) {
                *word = self.mem.read_u64(base + (slot << shift) + w as u64 * 8);
            }
            let what = decode(d);
            if let Invalidation::Wait { status: Some((addr, data)) } = what {
                self.mem.write_u32(addr, data);
            }
            self.log_one(s, what, Via::Queue);
            s.iqh = ((slot + 1) % slots) << shift;
        }
    }

    fn is_32bit(&self, off: usize) -> bool {
        [
            regs::VER,
            regs::GCMD,
            regs::GSTS,
            regs::FSTS,
            regs::FECTL,
            regs::FEDATA,
            regs::FEADDR,
            regs::FEUADDR,
            regs::ICS,
        ]
        .iter()
        .any(|r| r.offset() == off)
    }
}

impl Mmio for RegisterModel {
    fn read32(&self, off: usize) -> u32 {
        let s = self.state.lock();
        match off {
            o if o == regs::VER.offset() => 0x10,
            o if o == regs::GSTS.offset() => s.gsts.bits(),
            o if o == regs::FSTS.offset() => s.fsts.bits(),
            o if o == regs::FECTL.offset() => s.fectl.bits(),
            o if o == regs::ICS.offset() => s.ics,
            _ => panic!("VT-d model: unexpected 32-bit read at {off:#x}"),
        }
    }

    fn read64(&self, off: usize) -> u64 {
        assert!(!self.is_32bit(off), "VT-d model: 8-byte read of the 32-bit register at {off:#x}");
        let mut s = self.state.lock();
        let (fro, iro) = (self.config.fro(), self.config.iro());
        if off == regs::IQH.offset() {
            s.iqh_reads += 1;
        }
        match off {
            o if o == regs::CAP.offset() => self.config.cap,
            o if o == regs::ECAP.offset() => self.config.ecap,
            o if o == regs::RTADDR.offset() => s.rtaddr,
            o if o == regs::CCMD.offset() => s.ccmd,
            o if o == regs::IQH.offset() => s.iqh,
            o if o == regs::IQT.offset() => s.iqt,
            o if o == regs::IQA.offset() => s.iqa,
            o if o == regs::IRTA.offset() => s.irta,
            o if o == iro => s.iva,
            // IVT clears as soon as it is written: the invalidation is done.
            o if o == iro + 8 => s.iotlb_reg,
            o if o == fro => s.fault[0],
            o if o == fro + 8 => s.fault[1],
            _ => panic!("VT-d model: unexpected 64-bit read at {off:#x}"),
        }
    }

    fn write32(&self, off: usize, v: u32) {
        let mut s = self.state.lock();
        match off {
            o if o == regs::GCMD.offset() => {
                if s.stuck {
                    return;
                }
                // Acts on the difference: the persistent enables follow the
                // value written; one-shot commands latch and report.
                let v = Gcmd::from_bits_retain(v);
                if v.contains(Gcmd::SRTP) {
                    s.latched_root = s.rtaddr;
                    s.gsts |= Gsts::SRTP;
                }
                if v.contains(Gcmd::SIRTP) {
                    s.latched_irta = s.irta;
                    s.gsts |= Gsts::SIRTP;
                }
                if v.contains(Gcmd::QIE) && !s.gsts.contains(Gcmd::QIE) {
                    s.iqh = 0;
                }
                s.gsts = (s.gsts - Gsts::PERSISTENT) | (v & Gcmd::PERSISTENT);
            }
            o if o == regs::FSTS.offset() => {
                let was_stopped = s.fsts.contains(Fsts::IQE);
                s.fsts -= Fsts::from_bits_retain(v) & Fsts::W1C;
                if was_stopped && !s.fsts.contains(Fsts::IQE) {
                    // Fetching resumes at IQH (the descriptor that failed,
                    // unless software moved IQT back over it).
                    self.process_queue(&mut s);
                }
                // Serviced: a pending masked event clears once nothing is left.
                if !s.fsts.intersects(Fsts::PPF | Fsts::PFO) {
                    s.fectl -= Fectl::IP;
                }
            }
            o if o == regs::FECTL.offset() => {
                let v = Fectl::from_bits_retain(v);
                let unmasking = s.fectl.contains(Fectl::IM) && !v.contains(Fectl::IM);
                s.fectl = (s.fectl & Fectl::IP) | (v & Fectl::IM);
                if unmasking && s.fectl.contains(Fectl::IP) {
                    // A pending event is delivered on unmask.
                    s.fectl -= Fectl::IP;
                    let msg = (s.fe_msg[1] as u64 | (s.fe_msg[2] as u64) << 32, s.fe_msg[0]);
                    s.interrupts.push(msg);
                }
            }
            o if o == regs::FEDATA.offset() => s.fe_msg[0] = v,
            o if o == regs::FEADDR.offset() => s.fe_msg[1] = v,
            o if o == regs::FEUADDR.offset() => s.fe_msg[2] = v,
            o if o == regs::ICS.offset() => s.ics &= !v,
            o if o == self.config.fro() + 12 => {
                if v & (1 << 31) != 0 {
                    s.fault[1] &= !(1 << 63);
                    s.fsts -= Fsts::PPF;
                }
            }
            _ => panic!("VT-d model: 32-bit write at {off:#x} = {v:#x}"),
        }
    }

    fn write64(&self, off: usize, v: u64) {
        // 32-bit registers must not get 8-byte writes (QEMU aborts).
        assert!(!self.is_32bit(off), "VT-d model: 8-byte write to the 32-bit register at {off:#x}");
        let mut s = self.state.lock();
        let iro = self.config.iro();
        match off {
            o if o == regs::RTADDR.offset() => s.rtaddr = v,
            o if o == regs::IRTA.offset() => s.irta = v,
            o if o == regs::CCMD.offset() => {
                if v & regs::ccmd::ICC != 0 && !s.reject_invalidation {
                    let did = v as u16;
                    let what = match (v >> 61) & 3 {
                        1 => ContextInvalidation::Global,
                        2 => ContextInvalidation::Domain(did),
                        _ => ContextInvalidation::Device { did, sid: (v >> 16) as u16, fm: ((v >> 32) & 3) as u8 },
                    };
                    self.log_one(&mut s, Invalidation::Context(what), Via::Register);
                }
                // Done at once: ICC clear, CAIG = the granularity asked for
                // (0 when the test has the unit ignore requests).
                let caig = if s.reject_invalidation { 0 } else { (v >> 61) & 3 };
                s.ccmd = v & !regs::ccmd::ICC & !(3 << 59) | caig << 59;
            }
            o if o == regs::IQA.offset() => s.iqa = v,
            o if o == regs::IQT.offset() => {
                s.iqt = v;
                self.process_queue(&mut s);
            }
            o if o == iro => s.iva = v,
            o if o == iro + 8 => {
                let iaig = if s.reject_invalidation { 0 } else { (v >> 60) & 3 };
                s.iotlb_reg = v & !regs::iotlb::IVT & !regs::iotlb::IAIG | iaig << 57;
                if v & regs::iotlb::IVT != 0 && !s.reject_invalidation {
                    let did = (v >> 32) as u16;
                    let iva = s.iva;
                    let what = match (v >> 60) & 3 {
                        1 => IotlbInvalidation::Global,
                        2 => IotlbInvalidation::Domain(did),
                        _ => IotlbInvalidation::Pages {
                            did,
                            addr: iva & !0xfff,
                            am: (iva & 0x3f) as u8,
                            ih: iva >> 6 & 1 != 0,
                        },
                    };
                    self.log_one(&mut s, Invalidation::Iotlb(what), Via::Register);
                }
            }
            _ => panic!("VT-d model: 64-bit write at {off:#x} = {v:#x}"),
        }
    }
}

/// Heap page tables shared by a unit under test (its table memory) and
/// its [`RegisterModel`] (the memory the model fetches descriptors from
/// and stores wait status to): one set of pages behind a lock, cloned into
/// both.
#[derive(Clone, Debug)]
pub struct ModelTables(pub Arc<Mutex<io_pgtable::HeapTables>>);

impl ModelTables {
    /// Fresh heap tables; `coherent` is what [`TableMemory::coherent`]
    /// answers (see [`io_pgtable::HeapTables::new`]).
    pub fn new(coherent: bool) -> Self {
        Self(Arc::new(Mutex::new(io_pgtable::HeapTables::new(coherent))))
    }
}

impl io_pgtable::TableMemory for ModelTables {
    fn alloc_table(&mut self) -> Option<u64> {
        self.0.lock().alloc_table()
    }
    fn free_table(&mut self, t: u64) {
        self.0.lock().free_table(t)
    }
    fn read(&self, t: u64, i: usize) -> u64 {
        self.0.lock().read(t, i)
    }
    fn write(&mut self, t: u64, i: usize, v: u64) {
        self.0.lock().write(t, i, v)
    }
    fn coherent(&self) -> bool {
        self.0.lock().coherent()
    }
    fn flush(&mut self, p: u64, l: u64) {
        self.0.lock().flush(p, l)
    }
}

impl io_pgtable::ContiguousMemory for ModelTables {
    fn alloc_contiguous(&mut self, pages: usize) -> Option<u64> {
        self.0.lock().alloc_contiguous(pages)
    }
    fn free_contiguous(&mut self, base: u64, pages: usize) {
        self.0.lock().free_contiguous(base, pages)
    }
}

impl DeviceMemory for ModelTables {
    fn read_u64(&self, phys: u64) -> u64 {
        use io_pgtable::TableMemory;
        self.read(phys & !0xfff, (phys & 0xfff) as usize / 8)
    }
    fn write_u64(&self, phys: u64, value: u64) {
        use io_pgtable::TableMemory;
        self.clone().write(phys & !0xfff, (phys & 0xfff) as usize / 8, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qi::{ContextScope, Descriptor, Descriptor256, IotlbScope, PasidCacheScope, PasidIotlbScope};

    /// The model's decoder agrees with the driver's encoders.
    #[test]
    fn decodes_what_the_driver_encodes() {
        let d = |x: Descriptor| decode([x.0[0], x.0[1], 0, 0]);
        assert_eq!(d(Descriptor::context(ContextScope::Global)), Invalidation::Context(ContextInvalidation::Global));
        assert_eq!(
            d(Descriptor::context(ContextScope::Device { did: 3, sid: 0x8300 })),
            Invalidation::Context(ContextInvalidation::Device { did: 3, sid: 0x8300, fm: 0 })
        );
        assert_eq!(d(Descriptor::iotlb(IotlbScope::Domain(9))), Invalidation::Iotlb(IotlbInvalidation::Domain(9)));
        let p = d(Descriptor::iotlb(IotlbScope::Pages { did: 2, addr: 0x40_0000, am: 9, leaf_only: true }));
        assert_eq!(p, Invalidation::Iotlb(IotlbInvalidation::Pages { did: 2, addr: 0x40_0000, am: 9, ih: true }));
        assert!(p.covers_iotlb(2, 0x5f_f000, false) && !p.covers_iotlb(2, 0x60_0000, false));
        assert!(!p.covers_iotlb(2, 0x40_0000, true), "IH keeps the paging-structure caches");
        assert!(!p.covers_iotlb(3, 0x40_0000, false));
        assert_eq!(d(Descriptor::iec(Some((5, 0)))), Invalidation::InterruptEntries(Some((5, 0))));
        assert!(d(Descriptor::iec(None)).covers_interrupt_entry(200));
        assert_eq!(d(Descriptor::wait(0x1004, 7)), Invalidation::Wait { status: Some((0x1004, 7)) });
        let w = |x: Descriptor256| decode(x.0);
        assert_eq!(
            w(Descriptor256::pasid_iotlb(PasidIotlbScope::Pages {
                did: 4,
                pasid: 0,
                addr: 0x2000,
                am: 1,
                leaf_only: false
            })),
            Invalidation::PasidIotlb { did: 4, pasid: 0, pages: Some((0x2000, 1, false)) }
        );
        assert_eq!(
            w(Descriptor256::pasid_cache(PasidCacheScope::Pasid { did: 4, pasid: 0 })),
            Invalidation::PasidCache { g: 1, did: 4, pasid: 0 }
        );
        let c = Invalidation::Context(ContextInvalidation::Device { did: 1, sid: 0x0010, fm: 3 });
        assert!(c.covers_context(1, 0x0017) && !c.covers_context(1, 0x0018) && !c.covers_context(2, 0x0010));
    }
}
