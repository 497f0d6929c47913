//! The iommufd object model: I/O address spaces (IOAS), hardware page tables,
//! devices and accesses, with a pinned-page store, following the Linux
//! "IOMMUFD Generic interface" (see `DESIGN.md` once it exists).
//!
//! Issue 3 only reserves the crate's place in the workspace; issue 4 builds
//! the object model. Nothing here claims to work yet.
#![no_std]
#![forbid(unsafe_code)]

/// What a caller gets for any iommufd operation until the core exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The iommufd core is not implemented yet (issue 4).
    NotImplemented,
}
