//! VFIO type1 compatibility: the container ioctls (`VFIO_GET_API_VERSION`,
//! `VFIO_CHECK_EXTENSION`, `VFIO_SET_IOMMU`, `VFIO_IOMMU_GET_INFO`,
//! `VFIO_IOMMU_MAP_DMA`, `VFIO_IOMMU_UNMAP_DMA`) on the context's
//! compatibility IOAS (`IOMMU_VFIO_IOAS`), with Linux 6.12's answers.
//!
//! Unlike the iommufd commands these take an `unsigned long` argument that
//! is a value for some and a user pointer for others, and return a value,
//! so they have their own entry point, [`vfio_ioctl`]; user memory is
//! reached through the context's memory source.
//!
//! Type1 (not v2) is emulated as Linux does: large pages are disabled on
//! the IOAS so any range can be cut, and an unmap first cuts the areas at
//! its ends.

use crate::ctx::Ictx;
use crate::errno::{Errno, Result};
use crate::memsrc::PAGE_SIZE;
use crate::uapi::vfio::*;

/// Runs a VFIO container ioctl. `arg` is the ioctl's argument (a value or
/// a user pointer). Returns the ioctl's non-negative result.
pub fn vfio_ioctl(ictx: &Ictx, cmd: u32, arg: u64) -> Result<i64> {
    match cmd {
        VFIO_GET_API_VERSION => Ok(VFIO_API_VERSION as i64),
        VFIO_CHECK_EXTENSION => check_extension(ictx, arg),
        VFIO_SET_IOMMU => set_iommu(ictx, arg).map(|()| 0),
        VFIO_IOMMU_GET_INFO => get_info(ictx, arg).map(|()| 0),
        VFIO_IOMMU_MAP_DMA => map_dma(ictx, arg).map(|()| 0),
        VFIO_IOMMU_UNMAP_DMA => unmap_dma(ictx, arg).map(|()| 0),
        _ => Err(Errno::ENOTTY),
    }
}

fn compat(ictx: &Ictx) -> Result<u32> {
    ictx.compat_ioas().ok_or(Errno::ENODEV)
}

fn check_extension(ictx: &Ictx, ext: u64) -> Result<i64> {
    match u32::try_from(ext) {
        Ok(t) if t == VFIO_TYPE1_IOMMU || t == VFIO_TYPE1v2_IOMMU || t == VFIO_UNMAP_ALL => Ok(1),
        Ok(VFIO_DMA_CC_IOMMU) => {
            let ioas = compat(ictx)?;
            Ok(ictx.ioas_hwpts_coherent(ioas)? as i64)
        }
        _ => Ok(0),
    }
}

fn set_iommu(ictx: &Ictx, kind: u64) -> Result<()> {
    let kind = u32::try_from(kind).map_err(|_| Errno::EINVAL)?;
    if kind != VFIO_TYPE1_IOMMU && kind != VFIO_TYPE1v2_IOMMU {
        return Err(Errno::EINVAL);
    }
    let ioas = ictx.ioas(compat(ictx)?)?;
    if kind == VFIO_TYPE1_IOMMU {
        let _domains = ioas.domains_rw.write();
        ioas.iopt.lock().disable_large_pages()?;
    }
    Ok(())
}

fn read<const N: usize>(ictx: &Ictx, uptr: u64) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    ictx.source().read_user(uptr, &mut b)?;
    Ok(b)
}

fn map_dma(ictx: &Ictx, arg: u64) -> Result<()> {
    let m = VfioIommuType1DmaMap::read(&read::<MAP_DMA_MINSZ>(ictx, arg)?);
    if (m.argsz as usize) < MAP_DMA_MINSZ || m.flags & !MAP_DMA_SUPPORTED_FLAGS != 0 {
        return Err(Errno::EINVAL);
    }
    let ioas = compat(ictx)?;
    ictx.ioas_map(
        ioas,
        Some(m.iova),
        m.vaddr,
        m.size,
        m.flags & VFIO_DMA_MAP_FLAG_READ != 0,
        m.flags & VFIO_DMA_MAP_FLAG_WRITE != 0,
    )
    .map(|_| ())
}

fn unmap_dma(ictx: &Ictx, arg: u64) -> Result<()> {
    let mut u = VfioIommuType1DmaUnmap::read(&read::<UNMAP_DMA_MINSZ>(ictx, arg)?);
    if (u.argsz as usize) < UNMAP_DMA_MINSZ || u.flags & !UNMAP_DMA_SUPPORTED_FLAGS != 0 {
        return Err(Errno::EINVAL);
    }
    let ioas_id = compat(ictx)?;
    let mut unmapped = 0;
    let rc = if u.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
        if u.iova != 0 || u.size != 0 {
            return Err(Errno::EINVAL);
        }
        ictx.ioas_unmap(ioas_id, 0, u64::MAX).map(|n| unmapped = n)
    } else {
        let ioas = ictx.ioas(ioas_id)?;
        let cut = {
            let mut iopt = ioas.iopt.lock();
            if iopt.large_pages_disabled() {
                // Type1: cut at the range's ends so it can be unmapped alone.
                let ends = [u.iova.wrapping_add(u.size).wrapping_sub(1), u.iova.wrapping_sub(1)];
                iopt.cut(&ends[..if u.iova != 0 { 2 } else { 1 }])
            } else {
                Ok(())
            }
        };
        cut.and_then(|()| ictx.ioas_unmap(ioas_id, u.iova, u.size).map(|n| unmapped = n)).or_else(|e| {
            // Linux 6.12.95 (the stable backport of "iommufd: Make
            // vfio_compat's unmap succeed if the range is already empty"):
            // a range no area touches unmaps nothing successfully here;
            // IOMMU_IOAS_UNMAP keeps its ENOENT. A range that cuts an
            // area is still ENOENT.
            let last = u.iova.checked_add(u.size.max(1) - 1);
            let empty = last.is_some_and(|l| !ioas.iopt.lock().areas().any(|(s, al, _)| s <= l && u.iova <= al));
            if e == Errno::ENOENT && u.size != 0 && empty { Ok(()) } else { Err(e) }
        })
    };
    // The struct goes back (with the bytes unmapped) whatever happened.
    u.size = unmapped;
    let mut out = [0u8; UNMAP_DMA_MINSZ];
    u.write(&mut out);
    ictx.source().write_user(arg, &out)?;
    rc
}

/// Page sizes for GET_INFO: what every domain supports, sub-page sizes
/// folded into PAGE_SIZE, at least the IOAS alignment.
fn page_sizes(bitmap: u64, alignment: u64) -> u64 {
    let mut b = bitmap;
    if b & (PAGE_SIZE - 1) != 0 {
        b = (b & !(PAGE_SIZE - 1)) | PAGE_SIZE;
    }
    b.max(alignment)
}

fn get_info(ictx: &Ictx, arg: u64) -> Result<()> {
    let mut info = VfioIommuType1Info::read(&read::<GET_INFO_MINSZ>(ictx, arg)?);
    if (info.argsz as usize) < GET_INFO_MINSZ {
        return Err(Errno::EINVAL);
    }
    let copy_len = (info.argsz as usize).min(VfioIommuType1Info::SIZE);
    let ioas = ictx.ioas(compat(ictx)?)?;
    let iopt = ioas.iopt.lock();
    info.flags = VFIO_IOMMU_INFO_PGSIZES;
    info.iova_pgsizes = page_sizes(iopt.page_size_bitmap(), iopt.iova_alignment());
    info.cap_offset = 0;
    let argsz = info.argsz as u64;
    let ranges = iopt.iova_ranges();
    let mut total = VfioIommuType1Info::SIZE as u64;
    let mut last_cap: Option<u64> = None;
    for cap in 0..2 {
        // Addresses past the top of the address space are EFAULT, never
        // a wrapped address.
        let at = |off: u64| arg.checked_add(off).ok_or(Errno::EFAULT);
        let (cur, avail) = if argsz > total { (Some(at(total)?), argsz - total) } else { (None, 0) };
        let size = match cap {
            // DMA_AVAIL: iommufd reports u32::MAX.
            0 => {
                let c = VfioIommuType1InfoDmaAvail {
                    header: VfioInfoCapHeader { id: VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, version: 1, next: 0 },
                    avail: u32::MAX,
                };
                if let Some(cur) = cur
                    && avail >= VfioIommuType1InfoDmaAvail::SIZE as u64
                {
                    ictx.source().write_user(cur, &c.to_bytes())?;
                }
                VfioIommuType1InfoDmaAvail::SIZE as u64
            }
            // IOVA_RANGE: the holes between reserved ranges.
            _ => {
                let head = VfioIommuType1InfoCapIovaRange::SIZE as u64;
                let elem = VfioIovaRange::SIZE as u64;
                for (k, range) in ranges.iter().enumerate() {
                    if let Some(cur) = cur
                        && avail >= head + elem * (k as u64 + 1)
                    {
                        let r = VfioIovaRange { start: range.start, end: range.last };
                        let a = cur.checked_add(head + elem * k as u64).ok_or(Errno::EFAULT)?;
                        ictx.source().write_user(a, &r.to_bytes())?;
                    }
                }
                let n = ranges.len() as u64;
                if let Some(cur) = cur
                    && avail >= head + elem * n
                {
                    let c = VfioIommuType1InfoCapIovaRange {
                        header: VfioInfoCapHeader { id: VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, version: 1, next: 0 },
                        nr_iovas: n as u32,
                        reserved: 0,
                    };
                    ictx.source().write_user(cur, &c.to_bytes())?;
                }
                head + elem * n
            }
        };
        if let Some(prev) = last_cap
            && argsz >= total
        {
            ictx.source().write_user(prev.checked_add(4).ok_or(Errno::EFAULT)?, &(total as u32).to_le_bytes())?;
        }
        last_cap = Some(at(total)?);
        total += size;
    }
    if argsz >= total {
        info.cap_offset = VfioIommuType1Info::SIZE as u32;
    }
    info.argsz = total as u32;
    info.flags |= VFIO_IOMMU_INFO_CAPS;
    let bytes = info.to_bytes();
    ictx.source().write_user(arg, &bytes[..copy_len])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memsrc::{FakeAddressSpace, MemorySource};
    use crate::selftest::cmd::MockDevice;
    use alloc::sync::Arc;

    const ARG: u64 = 0x7000_0000;
    const BUF: u64 = 0x1000_0000;

    fn setup() -> (Arc<FakeAddressSpace>, Ictx, u32) {
        let mem = Arc::new(FakeAddressSpace::new());
        mem.map(ARG, 0x1000, true);
        mem.map(BUF, 0x10_0000, true);
        let ictx = Ictx::new(mem.clone(), u64::MAX);
        let ioas = ictx.ioas_alloc().unwrap();
        (mem, ictx, ioas)
    }

    #[test]
    fn container_ioctls_need_a_compat_ioas() {
        let (_, ictx, ioas) = setup();
        assert_eq!(vfio_ioctl(&ictx, VFIO_GET_API_VERSION, 0), Ok(0));
        assert_eq!(vfio_ioctl(&ictx, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU as u64), Ok(1));
        assert_eq!(vfio_ioctl(&ictx, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR as u64), Ok(0));
        assert_eq!(vfio_ioctl(&ictx, VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU as u64), Err(Errno::ENODEV));
        assert_eq!(vfio_ioctl(&ictx, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU as u64), Err(Errno::ENODEV));
        ictx.set_compat_ioas(Some(ioas));
        assert_eq!(vfio_ioctl(&ictx, VFIO_SET_IOMMU, 7), Err(Errno::EINVAL));
        assert_eq!(vfio_ioctl(&ictx, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU as u64), Ok(0));
        assert_eq!(vfio_ioctl(&ictx, VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU as u64), Ok(1));
        assert_eq!(vfio_ioctl(&ictx, VFIO_IOMMU_DIRTY_PAGES, 0), Err(Errno::ENOTTY));
    }

    #[test]
    fn map_unmap_and_type1_partial_unmap() {
        let (mem, ictx, ioas) = setup();
        ictx.set_compat_ioas(Some(ioas));
        let dev = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
        ictx.attach(dev, ioas).unwrap();
        // Type1 (large pages off) is accepted while nothing is mapped yet.
        vfio_ioctl(&ictx, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU as u64).unwrap();
        let iova = 1 << 24;
        let map = VfioIommuType1DmaMap {
            argsz: 32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: BUF,
            iova,
            size: 0x8000,
        };
        mem.write_user(ARG, &map.to_bytes()).unwrap();
        assert_eq!(vfio_ioctl(&ictx, VFIO_IOMMU_MAP_DMA, ARG), Ok(0));
        assert_eq!(mem.pinned_pages(), 8);
        // Unmap a page in the middle: type1 cuts the area.
        let un = VfioIommuType1DmaUnmap { argsz: 24, flags: 0, iova: iova + 0x2000, size: 0x1000 };
        mem.write_user(ARG, &un.to_bytes()).unwrap();
        assert_eq!(vfio_ioctl(&ictx, VFIO_IOMMU_UNMAP_DMA, ARG), Ok(0));
        let mut back = [0u8; 24];
        mem.read_user(ARG, &mut back).unwrap();
        assert_eq!(VfioIommuType1DmaUnmap::read(&back).size, 0x1000);
        assert_eq!(mem.pinned_pages(), 7);
        // Unmap all.
        let all = VfioIommuType1DmaUnmap { argsz: 24, flags: VFIO_DMA_UNMAP_FLAG_ALL, iova: 0, size: 0 };
        mem.write_user(ARG, &all.to_bytes()).unwrap();
        assert_eq!(vfio_ioctl(&ictx, VFIO_IOMMU_UNMAP_DMA, ARG), Ok(0));
        mem.read_user(ARG, &mut back).unwrap();
        assert_eq!(VfioIommuType1DmaUnmap::read(&back).size, 0x7000);
        assert_eq!(mem.pinned_pages(), 0);
        let _ = dev;
        // Unknown flags are EINVAL in the VFIO convention.
        let bad = VfioIommuType1DmaMap { flags: 8, ..map };
        mem.write_user(ARG, &bad.to_bytes()).unwrap();
        assert_eq!(vfio_ioctl(&ictx, VFIO_IOMMU_MAP_DMA, ARG), Err(Errno::EINVAL));
    }

    #[test]
    fn get_info_reports_page_sizes_and_iova_ranges() {
        let (mem, ictx, ioas) = setup();
        ictx.set_compat_ioas(Some(ioas));
        let dev = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
        ictx.attach(dev, ioas).unwrap();
        // Too small for the capabilities: argsz tells how much is needed.
        let info = VfioIommuType1Info { argsz: 24, ..Default::default() };
        mem.write_user(ARG, &info.to_bytes()).unwrap();
        vfio_ioctl(&ictx, VFIO_IOMMU_GET_INFO, ARG).unwrap();
        let mut b = [0u8; 24];
        mem.read_user(ARG, &mut b).unwrap();
        let got = VfioIommuType1Info::read(&b);
        assert_eq!(got.iova_pgsizes, PAGE_SIZE, "mock 2 KiB pages fold into 4 KiB");
        assert_eq!(got.cap_offset, 0);
        let need = got.argsz;
        assert_eq!(need, 24 + 12 + 16 + 16, "dma_avail + one IOVA range (the mock aperture)");
        // Big enough: the chain is there.
        let info = VfioIommuType1Info { argsz: need, ..Default::default() };
        mem.write_user(ARG, &info.to_bytes()).unwrap();
        vfio_ioctl(&ictx, VFIO_IOMMU_GET_INFO, ARG).unwrap();
        let mut all = [0u8; 68];
        mem.read_user(ARG, &mut all).unwrap();
        let got = VfioIommuType1Info::read(&all);
        assert_eq!(got.cap_offset, 24);
        let dma = VfioIommuType1InfoDmaAvail::read(&all[24..]);
        assert_eq!((dma.header.id, dma.header.next, dma.avail), (3, 36, u32::MAX));
        let cap = VfioIommuType1InfoCapIovaRange::read(&all[36..]);
        assert_eq!((cap.header.id, cap.nr_iovas), (1, 1));
        let r = VfioIovaRange::read(&all[52..]);
        assert_eq!((r.start, r.end), (1 << 24, (1 << 31) - 1));
    }
}
