//! Intel VT-d driver for Portcullis (Intel VT-d Architecture Specification
//! rev 4.x).
//!
//! * [`regs`]: the register block behind the [`regs::Mmio`] seam;
//! * [`entries`]: root and context entries (legacy mode);
//! * [`qi`]: queued-invalidation descriptors;
//! * [`fault`]: fault records;
//! * [`scalable`]: scalable-mode entry encodings and the tables that
//!   hold them;
//! * [`nested`]: nested translation (a user's first stage over a
//!   second-stage parent) and its first-stage invalidations;
//! * [`mod@unit`]: one DRHD brought up, devices attached or blocked,
//!   invalidations issued, faults collected;
//! * `testing` (feature `testing`): a register-level model of a unit for
//!   host tests, logging every invalidation it runs.
//!
//! Hardware access is behind traits (`Mmio`, `io_pgtable::TableMemory`,
//! [`unit::Clock`]), so all of this runs on the host against a register
//! model, and in the kernel against QEMU's emulated unit.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod entries;
mod external;
pub mod fault;
pub mod ir;
pub mod nested;
pub mod qi;
pub mod regs;
pub mod scalable;
pub mod shared;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod unit;

pub use fault::FaultRecord;
pub use shared::{BringUp, Mode, Shared, Stage, VtdDomain};
pub use unit::{Caps, Clock, Error, HwError, InvalidationStats, Unit, UnitError};
