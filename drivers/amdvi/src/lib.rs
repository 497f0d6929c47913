//! AMD-Vi unit driver for Portcullis (AMD I/O Virtualization Technology
//! (IOMMU) Specification, pub. 48882; section numbers below are from rev
//! 3.x of that document).
//!
//! * [`regs`]: the MMIO register block behind the [`regs::Mmio`] seam;
//! * [`caps`]: the Extended Feature Register and PCI capability decoded;
//! * [`dte`]: 256-bit device table entries;
//! * [`cmd`]: 128-bit command buffer entries and the range encoding;
//! * [`event`]: 128-bit event log entries;
//! * [`memory`]: [`ContiguousMemory`], the table-memory extension the
//!   device table needs;
//! * [`mod@unit`]: one IOMMU brought up, devices attached or blocked,
//!   invalidations issued, events collected;
//! * `testing` (feature `testing`): a register-level model of a unit for
//!   host tests, logging every command it runs.
//!
//! Hardware access is behind traits (`Mmio`, `ContiguousMemory` over
//! `io_pgtable::TableMemory`, [`unit::Clock`]), so all of this runs on the
//! host against a register model, and in the kernel against QEMU's
//! emulated unit.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod caps;
pub mod cmd;
pub mod dte;
pub mod event;
pub mod irte;
pub mod memory;
pub mod regs;
pub mod shared;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod unit;

pub use caps::Caps;
pub use cmd::Command;
pub use dte::{DeviceTableEntry, Interrupts};
pub use event::Event;
pub use memory::ContiguousMemory;
pub use shared::{AmdDomain, BringUp, Shared};
pub use unit::{Clock, Error, HwError, InvalidationStats, Unit, UnitError, UnityRange};
