//! The iommufd object model: I/O address spaces (IOAS), hardware page
//! tables, devices and accesses, with a pinned-page store, following the
//! Linux "IOMMUFD Generic interface" and its uAPI (see `DESIGN.md`).
//!
//! `no_std` + `alloc`, no `unsafe`. The hardware sits behind
//! [`portcullis_iommu::IommuDomain`]; memory behind [`memsrc::MemorySource`].
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod ctx;
pub mod dirty;
pub mod dispatch;
pub mod errno;
pub mod iopt;
pub mod iova;
pub mod memsrc;
pub mod pages;
#[cfg(feature = "selftest")]
pub mod selftest;
pub mod uapi;
pub mod vfio;

pub use errno::{Errno, Result};
