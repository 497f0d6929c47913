//! An `LD_PRELOAD` library that serves `/dev/iommu` from Portcullis's
//! iommufd, so unmodified iommufd programs (Linux's selftests, a VMM's
//! iommufd code) run against Portcullis on any Linux host, without root,
//! a kernel module or an IOMMU. Devices are the selftest's mock devices
//! (`IOMMU_TEST_CMD`): there is no real DMA.
//!
//! ```text
//! cargo build -p portcullis-interposer
//! LD_PRELOAD=target/debug/libportcullis_interposer.so ./my-iommufd-program
//! ```
//!
//! - [`sys`]: the exported C functions (`open`, `openat`, their 64-bit
//!   and fortified variants, `ioctl`, `close`, `dup`, `dup2`, `dup3`,
//!   `fcntl`, `close_range`, `closefrom`, `read`, `write`, `pread`, `pwrite`,
//!   `opendir`) and every `unsafe` of the crate.
//! - [`shim`]: the descriptor table and the ioctl path (Linux's size rules
//!   against the caller's memory, bounded, then [`iommufd::dispatch`]).
//! - [`memory`]: the process's own pages as a
//!   [`MemorySource`](iommufd::memsrc::MemorySource), with Linux's pin
//!   semantics (pinned pages move into a store the library owns; the
//!   module docs say how and what that changes).
//!
//! - [`faultinj`]: Linux's `fail-nth` and debugfs fault-injection files,
//!   served by arming the core's fault plan.
//! - [`charge`]: pins charged per process and per user across contexts
//!   (and processes), as Linux's `IOMMU_OPTION_RLIMIT_MODE` says.
//!
//! What is and is not emulated is in `README.md`.

pub mod charge;
pub mod faultinj;
pub mod memory;
pub mod shim;
pub mod sys;
