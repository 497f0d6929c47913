//! Quiescing a function before its DMA view goes: [`quiesce`] stops its
//! DMA and interrupts at the function itself and resets it, so nothing it
//! started for one owner is still in flight, or still in its state, when
//! the IOMMU blocks it or hands it to the next.
//!
//! The order, all through configuration space:
//!
//! 1. Command register: Bus Master Enable off (no more DMA, and with it no
//!    MSI, which is a memory write) and Interrupt Disable on (no INTx
//!    either, so turning MSI off cannot fall back to a legacy interrupt).
//!    Memory and I/O decode stay as they are: they let the CPU reach the
//!    function's registers, not the function reach memory, and a VMM may
//!    still need them (to read its MSI-X table, say) before the reset
//!    clears them anyway.
//! 2. MSI capability (0x05): MSI Enable off.
//! 3. MSI-X capability (0x11): Function Mask on and MSI-X Enable off, in
//!    one write.
//! 4. A reset, the first the function supports:
//!    * PCIe Function Level Reset, when Device Capabilities says FLR
//!      (bit 28): Transactions Pending polled first (at most
//!      [`PENDING_TIMEOUT_NS`]; then the FLR goes ahead anyway, as the
//!      specification allows once the completion timeout has passed),
//!      Initiate FLR, [`RESET_RECOVERY_NS`], then the function must answer
//!      its vendor id within [`READY_TIMEOUT_NS`];
//!    * the same through the conventional PCI Advanced Features capability
//!      (0x13) when it offers both FLR and Transactions Pending;
//!    * a secondary bus reset through the parent bridge's Bridge Control
//!      (bit 6), when the function is alone below that bridge (no other
//!      function the platform enumerated sits on a bus the reset reaches):
//!      asserted for [`BUS_RESET_HOLD_NS`], deasserted, then the same
//!      recovery and readiness wait;
//!    * else none: [`Reset::NotPossible`]. That is not an error (DMA and
//!      interrupts are off; the function keeps its internal state).
//!
//! A reset returns the function's configuration space to its defaults:
//! BARs, command register, MSI and MSI-X capabilities. Restoring them
//! (from the VMM's virtual config space, or its own snapshot) before the
//! function is used again is the VMM's business, not this crate's.
//!
//! Every wait is bounded by [`Platform::now_ns`] and busy-polls it (the
//! platform offers no sleep); a wait that runs out is a typed
//! [`QuiesceError::Timeout`] naming what it waited for.

use crate::Bdf;
use crate::error::Function;
use crate::platform::{PciFunction, Platform};
use core::fmt;

/// How long Transactions Pending may stay set before the FLR is started
/// anyway: twice the top of the default Completion Timeout range (50 ms).
pub const PENDING_TIMEOUT_NS: u64 = 100_000_000;
/// How long after an FLR, or after a secondary bus reset is deasserted,
/// before the function's configuration space is read again (the 100 ms the
/// specification requires).
pub const RESET_RECOVERY_NS: u64 = 100_000_000;
/// How long Secondary Bus Reset stays asserted (the specification's minimum
/// is 1 ms).
pub const BUS_RESET_HOLD_NS: u64 = 2_000_000;
/// How long after the recovery time the function may take to answer its
/// vendor id (it may answer "retry" for up to 1 s after a reset).
pub const READY_TIMEOUT_NS: u64 = 1_000_000_000;

/// The reset [`quiesce`] gave the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    /// A PCI Express Function Level Reset.
    Flr,
    /// A Function Level Reset through the Advanced Features capability of
    /// a conventional PCI function.
    AdvancedFeaturesFlr,
    /// A secondary bus reset of the bus below `bridge` (the function was
    /// the only one there).
    SecondaryBus {
        /// The bridge (root port, switch port or PCI bridge) whose
        /// secondary bus was reset.
        bridge: Bdf,
    },
    /// The function has no FLR and shares its bus (or sits on a root bus):
    /// it was not reset. Its DMA and interrupts are off, but whatever state
    /// it holds (buffers, queues, keys of the previous owner) survives.
    NotPossible,
}

impl fmt::Display for Reset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flr => f.write_str("function level reset"),
            Self::AdvancedFeaturesFlr => f.write_str("function level reset (advanced features)"),
            Self::SecondaryBus { bridge } => write!(f, "secondary bus reset below {bridge}"),
            Self::NotPossible => f.write_str("no reset possible"),
        }
    }
}

/// What a timed-out wait was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The function answering configuration reads after its FLR.
    ReadyAfterFlr,
    /// The function answering configuration reads after the secondary bus
    /// reset below `bridge`.
    ReadyAfterBusReset {
        /// The bridge that reset its bus.
        bridge: Bdf,
    },
}

/// Why [`quiesce`] did not finish. DMA and interrupts were turned off
/// before any of these can happen, except for [`Self::Absent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuiesceError {
    /// The function does not answer configuration reads (vendor id all
    /// ones): removed, powered off or dead. Nothing was written.
    Absent,
    /// The function did not come back from its reset in time.
    Timeout {
        /// What was waited for.
        waited_for: Wait,
        /// How long, from the end of the reset, in nanoseconds.
        ns: u64,
    },
}

impl fmt::Display for QuiesceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Absent => f.write_str("the function does not answer configuration reads"),
            Self::Timeout { waited_for: Wait::ReadyAfterFlr, ns } => {
                write!(f, "the function did not answer within {} ms of its FLR", ns / 1_000_000)
            }
            Self::Timeout { waited_for: Wait::ReadyAfterBusReset { bridge }, ns } => write!(
                f,
                "the function did not answer within {} ms of the secondary bus reset below {bridge}",
                ns / 1_000_000
            ),
        }
    }
}

impl core::error::Error for QuiesceError {}

// Configuration space, as far as quiescing goes.
const COMMAND: u16 = 0x04;
const CMD_BUS_MASTER: u32 = 1 << 2;
const CMD_INTX_DISABLE: u32 = 1 << 10;
/// Status register (upper half of dword 0x04): a capability list exists.
const STATUS_CAP_LIST: u32 = 1 << 20;
const HEADER_TYPE: u16 = 0x0c;
const CAP_POINTER: u16 = 0x34;
/// Interrupt line/pin and, in a type 1 header, Bridge Control above them.
const BRIDGE_CONTROL: u16 = 0x3c;
/// Bridge Control bit 6, in the dword at 0x3c.
const BRIDGE_SBR: u32 = 1 << (16 + 6);
/// Bridge Control bit 10, Discard Timer Status (write one to clear): never
/// written back as read.
const BRIDGE_DISCARD_STATUS: u32 = 1 << (16 + 10);

const CAP_MSI: u8 = 0x05;
/// MSI Enable, in the capability's first dword.
const MSI_ENABLE: u32 = 1 << 16;
const CAP_MSIX: u8 = 0x11;
/// MSI-X Enable and Function Mask, in the capability's first dword.
const MSIX_ENABLE: u32 = 1 << 31;
const MSIX_MASK: u32 = 1 << 30;
const CAP_PCIE: u8 = 0x10;
/// Device Capabilities (PCIe capability + 4): Function Level Reset.
const DEVCAP_FLR: u32 = 1 << 28;
/// Device Control / Device Status (PCIe capability + 8): Initiate FLR, and
/// Transactions Pending in the status half.
const DEVCTL_FLR: u32 = 1 << 15;
const DEVSTA_PENDING: u32 = 1 << (16 + 5);
const CAP_AF: u8 = 0x13;
/// The PASID extended capability.
const EXT_CAP_PASID: u16 = 0x1b;
/// Extended capabilities walked at most (4 KiB of space, 4-byte headers).
const MAX_EXT_CAPS: usize = 960;
/// AF Capabilities (byte 3 of the first dword): TP and FLR.
const AF_TP_FLR: u32 = 0b11 << 24;
/// AF Control (byte 4) Initiate FLR; AF Status (byte 5) Transactions
/// Pending.
const AF_INITIATE_FLR: u32 = 1;
const AF_PENDING: u32 = 1 << 8;

/// A capability list is at most this long (48 entries of 4 bytes fill the
/// 192 bytes after the header): a loop in a broken list ends here.
const MAX_CAPS: usize = 48;

/// One function's configuration space through the platform.
struct Config<'a, P: Platform + ?Sized> {
    platform: &'a P,
    segment: u16,
    bdf: Bdf,
}

impl<P: Platform + ?Sized> Config<'_, P> {
    fn read(&self, offset: u16) -> u32 {
        self.platform.pci_read32(self.segment, self.bdf, offset)
    }

    fn write(&self, offset: u16, value: u32) {
        self.platform.pci_write32(self.segment, self.bdf, offset, value)
    }

    /// The function answers with a vendor id: neither all ones (absent) nor
    /// the "retry" answer a function still initialising gives (vendor id
    /// 0x0001 with the rest all ones).
    fn ready(&self) -> bool {
        let id = self.read(0);
        id & 0xffff != 0xffff && id != 0xffff_0001
    }

    /// Offset of the first capability `id` in the standard list.
    fn capability(&self, id: u8) -> Option<u16> {
        if self.read(COMMAND) & STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut at = (self.read(CAP_POINTER) & 0xfc) as u16;
        for _ in 0..MAX_CAPS {
            if at < 0x40 {
                return None;
            }
            let header = self.read(at);
            if header as u8 == id {
                return Some(at);
            }
            at = ((header >> 8) & 0xfc) as u16;
        }
        None
    }

    /// Offset of the first extended capability `id` (the list from 0x100:
    /// id in bits 15:0 of each header, the next offset in bits 31:20).
    /// `None` when the function has no extended space (all ones or zero
    /// at 0x100) or no such capability; the walk is bounded.
    fn extended_capability(&self, id: u16) -> Option<u16> {
        let mut at = 0x100u16;
        for _ in 0..MAX_EXT_CAPS {
            let header = self.read(at);
            if header == 0 || header == u32::MAX {
                return None;
            }
            if header as u16 == id {
                return Some(at);
            }
            let next = ((header >> 20) & 0xffc) as u16;
            if next < 0x100 {
                return None;
            }
            at = next;
        }
        None
    }
}

/// How many PASID bits `function` supports: the Max PASID Width (bits
/// 12:8 of the PASID Capability register, at +4 of the PASID extended
/// capability, id 0x1b), 0 for a function without one (a conventional PCI
/// function has no extended configuration space at all) or absent.
pub(crate) fn pasid_bits<P: Platform + ?Sized>(platform: &P, function: Function) -> u32 {
    let cfg = Config { platform, segment: function.segment, bdf: function.bdf };
    if !cfg.ready() {
        return 0;
    }
    cfg.extended_capability(EXT_CAP_PASID).map_or(0, |at| (cfg.read(at + 4) >> 8) & 0x1f)
}

/// How many interrupt vectors `function` can use: MSI's Multiple Message
/// Capable (bits 3:1 of Message Control, 2^n, at most 32) and MSI-X's
/// Table Size (bits 10:0 of Message Control, plus one, at most 2048), the
/// larger of the two, at least 1 (a function with neither, or absent).
pub(crate) fn msi_vectors<P: Platform + ?Sized>(platform: &P, function: Function) -> u16 {
    let cfg = Config { platform, segment: function.segment, bdf: function.bdf };
    if !cfg.ready() {
        return 1;
    }
    let msi = cfg.capability(CAP_MSI).map_or(0, |at| 1u16 << ((cfg.read(at) >> 17) & 7).min(5));
    let msix = cfg.capability(CAP_MSIX).map_or(0, |at| ((cfg.read(at) >> 16) & 0x7ff) as u16 + 1);
    msi.max(msix).max(1)
}

/// Busy-waits until `done` or `ns` nanoseconds pass; whether it is done.
fn poll<P: Platform + ?Sized>(platform: &P, ns: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = platform.now_ns();
    loop {
        if done() {
            return true;
        }
        if platform.now_ns().saturating_sub(start) >= ns {
            return done();
        }
        core::hint::spin_loop();
    }
}

/// Busy-waits `ns` nanoseconds.
fn delay<P: Platform + ?Sized>(platform: &P, ns: u64) {
    poll(platform, ns, || false);
}

/// After a reset: the recovery time, then the function must answer.
fn recover<P: Platform + ?Sized>(cfg: &Config<'_, P>, waited_for: Wait) -> Result<(), QuiesceError> {
    let start = cfg.platform.now_ns();
    delay(cfg.platform, RESET_RECOVERY_NS);
    if poll(cfg.platform, READY_TIMEOUT_NS, || cfg.ready()) {
        Ok(())
    } else {
        Err(QuiesceError::Timeout { waited_for, ns: cfg.platform.now_ns().saturating_sub(start) })
    }
}

/// Stops `function`'s DMA and interrupts and resets it (see the module
/// documentation for the order and the waits). `functions` is what the
/// platform enumerated ([`Platform::pci_functions`]): it tells the parent
/// bridge and whether the function is alone below it.
///
/// Returns the reset it got ([`Reset::NotPossible`] when none could be
/// done: DMA and interrupts are off all the same). The function's
/// configuration space is left at its reset defaults for the VMM to
/// restore.
pub fn quiesce<P: Platform + ?Sized>(
    platform: &P,
    functions: &[PciFunction],
    function: Function,
) -> Result<Reset, QuiesceError> {
    let cfg = Config { platform, segment: function.segment, bdf: function.bdf };
    if cfg.read(0) & 0xffff == 0xffff {
        return Err(QuiesceError::Absent);
    }
    // The status half is written as zeros: its error bits clear on a one.
    let command = cfg.read(COMMAND) & 0xffff;
    cfg.write(COMMAND, (command & !CMD_BUS_MASTER) | CMD_INTX_DISABLE);
    // The capability header (id, next) is read-only: written back as read.
    if let Some(msi) = cfg.capability(CAP_MSI) {
        cfg.write(msi, cfg.read(msi) & !MSI_ENABLE);
    }
    if let Some(msix) = cfg.capability(CAP_MSIX) {
        cfg.write(msix, (cfg.read(msix) | MSIX_MASK) & !MSIX_ENABLE);
    }

    if let Some(exp) = cfg.capability(CAP_PCIE)
        && cfg.read(exp + 4) & DEVCAP_FLR != 0
    {
        poll(platform, PENDING_TIMEOUT_NS, || cfg.read(exp + 8) & DEVSTA_PENDING == 0);
        // Device Status (upper half) has write-one-to-clear bits: zeros.
        cfg.write(exp + 8, (cfg.read(exp + 8) & 0xffff) | DEVCTL_FLR);
        recover(&cfg, Wait::ReadyAfterFlr)?;
        return Ok(Reset::Flr);
    }
    if let Some(af) = cfg.capability(CAP_AF)
        && cfg.read(af) & AF_TP_FLR == AF_TP_FLR
    {
        poll(platform, PENDING_TIMEOUT_NS, || cfg.read(af + 4) & AF_PENDING == 0);
        cfg.write(af + 4, AF_INITIATE_FLR);
        recover(&cfg, Wait::ReadyAfterFlr)?;
        return Ok(Reset::AdvancedFeaturesFlr);
    }
    let Some(bridge) = alone_below(platform, functions, function) else {
        return Ok(Reset::NotPossible);
    };
    let b = Config { platform, segment: function.segment, bdf: bridge };
    let control = b.read(BRIDGE_CONTROL) & !BRIDGE_DISCARD_STATUS & !BRIDGE_SBR;
    b.write(BRIDGE_CONTROL, control | BRIDGE_SBR);
    delay(platform, BUS_RESET_HOLD_NS);
    b.write(BRIDGE_CONTROL, control);
    recover(&cfg, Wait::ReadyAfterBusReset { bridge })?;
    Ok(Reset::SecondaryBus { bridge })
}

/// The bridge whose secondary bus reset reaches `function` and no other
/// function the platform enumerated (every bus from its secondary to its
/// subordinate is reset), if there is one and it has a type 1 header.
fn alone_below<P: Platform + ?Sized>(platform: &P, functions: &[PciFunction], function: Function) -> Option<Bdf> {
    let me = functions.iter().find(|f| f.segment == function.segment && f.bdf == function.bdf)?;
    let bridge = me.parent?;
    let buses = functions
        .iter()
        .find(|f| f.segment == function.segment && f.bdf == bridge)
        .and_then(|f| f.bridge)
        .map_or(function.bdf.bus..=function.bdf.bus, |b| b.secondary..=b.subordinate);
    if !buses.contains(&function.bdf.bus) {
        return None;
    }
    let others =
        functions.iter().any(|f| f.segment == function.segment && f.bdf != function.bdf && buses.contains(&f.bdf.bus));
    let header = platform.pci_read32(function.segment, bridge, HEADER_TYPE);
    (!others && header != u32::MAX && (header >> 16) & 0x7f == 1).then_some(bridge)
}

#[cfg(test)]
mod tests;
