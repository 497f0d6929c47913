//! The VFIO container ioctls iommufd emulates (`/dev/vfio/vfio` backed by
//! iommufd, `drivers/iommu/iommufd/vfio_compat.c`) and their structs
//! (`include/uapi/linux/vfio.h`).
//!
//! # Rules (Linux 6.12, `iommufd_vfio_ioctl`)
//!
//! These numbers have nr < 0x80, so `iommufd_fops_ioctl` routes them here
//! without reading any size. The structs start with `argsz` (not `size`)
//! and there is **no** trailing-zero (E2BIG) check: the kernel reads and
//! writes only a fixed prefix (`minsz`) and ignores the rest.
//!
//! * `VFIO_GET_API_VERSION`: returns [`VFIO_API_VERSION`] (0) as the ioctl
//!   result; the argument is ignored.
//! * `VFIO_CHECK_EXTENSION` (argument is the extension number, not a
//!   pointer; `iommufd_vfio_check_extension`): TYPE1, TYPE1v2 and
//!   UNMAP_ALL → 1; DMA_CC_IOMMU → 1 if every domain of the compat IOAS
//!   enforces cache coherency, else 0, and ENODEV if there is no compat
//!   IOAS; TYPE1_NESTING, UPDATE_VADDR and anything else → 0.
//! * `VFIO_SET_IOMMU` (argument is the type; `iommufd_vfio_set_iommu`):
//!   not TYPE1/TYPE1v2 → EINVAL; no compat IOAS → ENODEV; TYPE1 disables
//!   huge pages on the IOAS (so any sub-range can be unmapped).
//! * `VFIO_IOMMU_GET_INFO` (`iommufd_vfio_iommu_get_info`): read
//!   [`GET_INFO_MINSZ`] (16) bytes, fault → EFAULT; `argsz < 16` → EINVAL;
//!   no compat IOAS → ENODEV. Output: `flags = PGSIZES | CAPS`,
//!   `iova_pgsizes`, a capability chain placed right after the 24-byte
//!   struct — first DMA_AVAIL (12 bytes, `avail = u32::MAX`) at offset 24,
//!   then IOVA_RANGE (16 + 16·n bytes) at offset 36 — each cap written
//!   only if it fits in `argsz`, `next` links written when they fit;
//!   `cap_offset = 24` only if all caps fit, else 0; `argsz` set to the
//!   total size needed; then `min(argsz, 24)` bytes of the struct are
//!   written back (fault → EFAULT).
//! * `VFIO_IOMMU_MAP_DMA` (`iommufd_vfio_map_dma`): read
//!   [`MAP_DMA_MINSZ`] (32) bytes, fault → EFAULT; `argsz < 32` **or**
//!   flags outside READ|WRITE → **EINVAL** (VADDR is refused); no compat
//!   IOAS → ENODEV; maps at the fixed `iova`. Nothing is written back.
//! * `VFIO_IOMMU_UNMAP_DMA` (`iommufd_vfio_unmap_dma`): read
//!   [`UNMAP_DMA_MINSZ`] (24) bytes, fault → EFAULT; `argsz < 24` or flags
//!   outside UNMAP_ALL → **EINVAL** (GET_DIRTY_BITMAP and VADDR refused);
//!   no compat IOAS → ENODEV; UNMAP_ALL with non-zero iova or size →
//!   EINVAL; otherwise unmap; `size` is replaced by the bytes unmapped and
//!   the 24-byte prefix written back even when the unmap failed (fault →
//!   EFAULT).
//! * `VFIO_IOMMU_DIRTY_PAGES` and every other number → ENOTTY.

use super::{IOMMUFD_TYPE, LeField, io};
use alloc::vec;
use alloc::vec::Vec;

/// VFIO's first ioctl nr: 100 (0x64).
pub const VFIO_BASE: u32 = 100;
/// The VFIO API version `VFIO_GET_API_VERSION` returns.
pub const VFIO_API_VERSION: i32 = 0;

pub const VFIO_GET_API_VERSION: u32 = io(IOMMUFD_TYPE, VFIO_BASE);
pub const VFIO_CHECK_EXTENSION: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 1);
pub const VFIO_SET_IOMMU: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 2);
pub const VFIO_IOMMU_GET_INFO: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 12);
pub const VFIO_IOMMU_MAP_DMA: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 13);
pub const VFIO_IOMMU_UNMAP_DMA: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 14);
pub const VFIO_IOMMU_ENABLE: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 15);
pub const VFIO_IOMMU_DISABLE: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 16);
/// Not emulated by iommufd (ENOTTY).
pub const VFIO_IOMMU_DIRTY_PAGES: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 17);

/// Extension / IOMMU type numbers (`VFIO_CHECK_EXTENSION`, `VFIO_SET_IOMMU`).
pub const VFIO_TYPE1_IOMMU: u32 = 1;
pub const VFIO_SPAPR_TCE_IOMMU: u32 = 2;
#[allow(non_upper_case_globals)]
pub const VFIO_TYPE1v2_IOMMU: u32 = 3;
pub const VFIO_DMA_CC_IOMMU: u32 = 4;
pub const VFIO_EEH: u32 = 5;
pub const VFIO_TYPE1_NESTING_IOMMU: u32 = 6;
pub const VFIO_SPAPR_TCE_V2_IOMMU: u32 = 7;
pub const VFIO_NOIOMMU_IOMMU: u32 = 8;
pub const VFIO_UNMAP_ALL: u32 = 9;
pub const VFIO_UPDATE_VADDR: u32 = 10;

/// `vfio_iommu_type1_info.flags`.
pub const VFIO_IOMMU_INFO_PGSIZES: u32 = 1 << 0;
pub const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;
/// Capability ids (all version 1).
pub const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;
pub const VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION: u16 = 2;
pub const VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: u16 = 3;

/// `vfio_iommu_type1_dma_map.flags`.
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
pub const VFIO_DMA_MAP_FLAG_VADDR: u32 = 1 << 2;
/// `vfio_iommu_type1_dma_unmap.flags`.
pub const VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
pub const VFIO_DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;
pub const VFIO_DMA_UNMAP_FLAG_VADDR: u32 = 1 << 2;

/// Flags iommufd's MAP_DMA accepts.
pub const MAP_DMA_SUPPORTED_FLAGS: u32 = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
/// Flags iommufd's UNMAP_DMA accepts.
pub const UNMAP_DMA_SUPPORTED_FLAGS: u32 = VFIO_DMA_UNMAP_FLAG_ALL;

uapi_struct! {
    /// VFIO_IOMMU_GET_INFO argument.
    pub struct VfioIommuType1Info ("vfio_iommu_type1_info", size 24) {
        argsz: u32 = 0,
        flags: u32 = 4,
        iova_pgsizes: u64 = 8,
        cap_offset: u32 = 16,
        pad: u32 = 20,
    }
}

uapi_struct! {
    /// Header of each capability in the GET_INFO chain; `next` is the
    /// offset of the next one from the start of the info struct, 0 ends.
    pub struct VfioInfoCapHeader ("vfio_info_cap_header", size 8) {
        id: u16 = 0,
        version: u16 = 2,
        next: u32 = 4,
    }
}

uapi_struct! {
    /// One inclusive range `[start, end]` of the IOVA_RANGE capability.
    pub struct VfioIovaRange ("vfio_iova_range", size 16) {
        start: u64 = 0,
        end: u64 = 8,
    }
}

uapi_struct! {
    /// IOVA_RANGE capability, followed by `nr_iovas` [`VfioIovaRange`]s.
    pub struct VfioIommuType1InfoCapIovaRange ("vfio_iommu_type1_info_cap_iova_range", size 16) {
        header: VfioInfoCapHeader = 0,
        nr_iovas: u32 = 8,
        reserved: u32 = 12,
    }
}

uapi_struct! {
    /// MIGRATION capability (not produced by iommufd).
    pub struct VfioIommuType1InfoCapMigration ("vfio_iommu_type1_info_cap_migration", size 32) {
        header: VfioInfoCapHeader = 0,
        flags: u32 = 8,
        pgsize_bitmap: u64 = 16,
        max_dirty_bitmap_size: u64 = 24,
    }
}

uapi_struct! {
    /// DMA_AVAIL capability (iommufd reports `avail = u32::MAX`).
    pub struct VfioIommuType1InfoDmaAvail ("vfio_iommu_type1_info_dma_avail", size 12) {
        header: VfioInfoCapHeader = 0,
        avail: u32 = 8,
    }
}

uapi_struct! {
    /// VFIO_IOMMU_MAP_DMA argument.
    pub struct VfioIommuType1DmaMap ("vfio_iommu_type1_dma_map", size 32) {
        argsz: u32 = 0,
        flags: u32 = 4,
        vaddr: u64 = 8,
        iova: u64 = 16,
        size: u64 = 24,
    }
}

uapi_struct! {
    /// VFIO_IOMMU_UNMAP_DMA argument (a dirty bitmap may follow; iommufd
    /// refuses that flag).
    pub struct VfioIommuType1DmaUnmap ("vfio_iommu_type1_dma_unmap", size 24) {
        argsz: u32 = 0,
        flags: u32 = 4,
        iova: u64 = 8,
        size: u64 = 16,
    }
}

uapi_struct! {
    /// Dirty bitmap descriptor following an UNMAP_DMA (not used by iommufd).
    pub struct VfioBitmap ("vfio_bitmap", size 24) {
        pgsize: u64 = 0,
        size: u64 = 8,
        data: u64 = 16,
    }
}

/// Bytes GET_INFO reads: up to the end of `iova_pgsizes`.
pub const GET_INFO_MINSZ: usize = end_of!(VfioIommuType1Info, iova_pgsizes);
/// Bytes MAP_DMA reads: up to the end of `size` (the whole struct).
pub const MAP_DMA_MINSZ: usize = end_of!(VfioIommuType1DmaMap, size);
/// Bytes UNMAP_DMA reads and writes back: up to the end of `size`.
pub const UNMAP_DMA_MINSZ: usize = end_of!(VfioIommuType1DmaUnmap, size);
const _: () = assert!(GET_INFO_MINSZ == 16 && MAP_DMA_MINSZ == 32 && UNMAP_DMA_MINSZ == 24);

/// The name of a VFIO container ioctl number.
pub fn command_name(cmd: u32) -> Option<&'static str> {
    Some(match cmd {
        VFIO_GET_API_VERSION => "VFIO_GET_API_VERSION",
        VFIO_CHECK_EXTENSION => "VFIO_CHECK_EXTENSION",
        VFIO_SET_IOMMU => "VFIO_SET_IOMMU",
        VFIO_IOMMU_GET_INFO => "VFIO_IOMMU_GET_INFO",
        VFIO_IOMMU_MAP_DMA => "VFIO_IOMMU_MAP_DMA",
        VFIO_IOMMU_UNMAP_DMA => "VFIO_IOMMU_UNMAP_DMA",
        VFIO_IOMMU_ENABLE => "VFIO_IOMMU_ENABLE",
        VFIO_IOMMU_DISABLE => "VFIO_IOMMU_DISABLE",
        VFIO_IOMMU_DIRTY_PAGES => "VFIO_IOMMU_DIRTY_PAGES",
        _ => return None,
    })
}

/// Whether iommufd 6.12 answers this VFIO number (the other VFIO
/// numbers give ENOTTY).
pub fn is_emulated(cmd: u32) -> bool {
    matches!(
        cmd,
        VFIO_GET_API_VERSION
            | VFIO_CHECK_EXTENSION
            | VFIO_SET_IOMMU
            | VFIO_IOMMU_GET_INFO
            | VFIO_IOMMU_MAP_DMA
            | VFIO_IOMMU_UNMAP_DMA
    )
}

/// The fixed-prefix read the compat handlers start with: `minsz` bytes
/// must be readable (else EFAULT); returns them. The caller then checks
/// `argsz >= minsz` (EINVAL) together with the flags.
pub fn read_prefix(buf: &[u8], minsz: usize) -> Result<Vec<u8>, crate::errno::Errno> {
    let src = buf.get(..minsz).ok_or(crate::errno::Errno::EFAULT)?;
    let mut v = vec![0u8; minsz];
    v.copy_from_slice(src);
    Ok(v)
}

/// `argsz` of a VFIO argument (first u32, little-endian).
pub fn argsz(prefix: &[u8]) -> u32 {
    u32::get(prefix, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errno::Errno;
    use crate::uapi::vfio;

    #[test]
    fn vfio_prefix() {
        assert_eq!(GET_INFO_MINSZ, 16);
        assert_eq!(MAP_DMA_MINSZ, 32);
        assert_eq!(UNMAP_DMA_MINSZ, 24);
        assert_eq!(vfio::read_prefix(&[0u8; 31], MAP_DMA_MINSZ), Err(Errno::EFAULT));
        let m = VfioIommuType1DmaMap { argsz: 32, flags: 3, vaddr: 1, iova: 2, size: 3 }.to_bytes();
        let p = vfio::read_prefix(&m, MAP_DMA_MINSZ).unwrap();
        assert_eq!(vfio::argsz(&p), 32);
    }
}
