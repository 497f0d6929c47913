//! Physical memory, the kernel's page tables and the heap.
//!
//! Virtual layout after `init`:
//!
//! | range                                   | what                                  |
//! |-----------------------------------------|---------------------------------------|
//! | image link addresses (2 MiB +)          | kernel image, W^X, stack guard unmapped |
//! | `DIRECT_MAP_BASE + phys`                | all RAM/ACPI memory, write-back, NX   |
//! | `DIRECT_MAP_BASE + phys` (on demand)    | other firmware memory, see `map_phys` |
//! | `MMIO_BASE + phys` (on demand)          | device registers, uncached, NX        |
//!
//! Nothing else is mapped: in particular low memory (null page included)
//! faults.

pub mod frame;
#[cfg(target_os = "none")]
mod heap;
#[cfg(target_os = "none")]
pub mod paging;
pub mod size_classes;

#[cfg(target_os = "none")]
pub use imp::*;

/// Base of the direct map of physical memory.
pub const DIRECT_MAP_BASE: u64 = 0xffff_8000_0000_0000;
/// Base of the uncached device-register window.
pub const MMIO_BASE: u64 = 0xffff_c000_0000_0000;
/// Physical memory the frame bitmap can track (64 GiB).
pub const MAX_PHYS: u64 = 64 << 30;

/// Summary for reports and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryStats {
    /// Usable RAM in the memory map (bytes).
    pub ram_bytes: u64,
    /// Frames under the allocator's management after reservations.
    pub managed_frames: usize,
    /// Frames free now.
    pub free_frames: usize,
    /// Heap size in bytes and its physical base.
    pub heap_bytes: u64,
    /// Physical base of the heap.
    pub heap_phys: u64,
    /// RAM above [`MAX_PHYS`] that is not used.
    pub ignored_bytes: u64,
    /// 4 KiB / 2 MiB pages in the direct map built at boot.
    pub direct_map_pages: (usize, usize),
}

#[cfg(target_os = "none")]
mod imp {
    use super::frame::{FRAME_SIZE, FrameAllocator, FrameError};
    use super::*;
    use portcullis_boot::{BootInfo, MemoryKind};
    use spin::Mutex;

    const WORDS: usize = (MAX_PHYS / FRAME_SIZE / 64) as usize;
    pub(super) static FRAMES: Mutex<FrameAllocator<[u64; WORDS]>> = Mutex::new(FrameAllocator::new([0; WORDS]));

    /// Frames below this address are never handed out: the BIOS area,
    /// real-mode structures and whatever firmware left there.
    pub const LOW_MEMORY_END: u64 = 0x10_0000;

    /// Virtual address of physical `phys` in the direct map.
    #[inline]
    pub fn phys_to_virt(phys: u64) -> *mut u8 {
        (DIRECT_MAP_BASE + phys) as *mut u8
    }

    /// Allocates `count` zeroed contiguous frames aligned to `align` bytes.
    pub fn alloc_frames(count: usize, align: u64) -> Result<u64, FrameError> {
        let p = FRAMES.lock().alloc(count, align, u64::MAX)?;
        // SAFETY: the frames were just allocated to us and lie in RAM, which
        // the direct map covers; nobody else refers to them.
        unsafe { core::ptr::write_bytes(phys_to_virt(p), 0, count * FRAME_SIZE as usize) };
        Ok(p)
    }

    /// Returns frames from [`alloc_frames`].
    pub fn free_frames(phys: u64, count: usize) -> Result<(), FrameError> {
        FRAMES.lock().free(phys, count)
    }

    /// Whether the frame at `phys` is free in the allocator.
    pub fn frame_is_free(phys: u64) -> bool {
        FRAMES.lock().is_frame_free(phys)
    }

    /// Current allocator counters.
    pub fn stats() -> MemoryStats {
        let mut s = *STATS.lock();
        let f = FRAMES.lock();
        s.free_frames = f.free_frames();
        s.managed_frames = f.managed_frames();
        s
    }

    static STATS: Mutex<MemoryStats> = Mutex::new(MemoryStats {
        ram_bytes: 0,
        managed_frames: 0,
        free_frames: 0,
        heap_bytes: 0,
        heap_phys: 0,
        ignored_bytes: 0,
        direct_map_pages: (0, 0),
    });

    /// Builds the frame allocator from the memory map, switches to the
    /// kernel's own page tables and starts the heap.
    pub fn init(boot: &BootInfo) {
        let layout = portcullis_boot::layout::image_layout();
        let mut ram = 0;
        {
            let mut f = FRAMES.lock();
            for r in boot.memory_map() {
                if r.kind == MemoryKind::Ram {
                    ram += r.size;
                    f.add_free(r.start, r.end());
                }
            }
            f.reserve(0, LOW_MEMORY_END);
            f.reserve(layout.image.start, layout.image.end);
            for (s, e) in boot.handover_ranges() {
                f.reserve(s, e);
            }
            // Non-RAM ranges overlapping RAM ones (buggy maps) stay reserved.
            for r in boot.memory_map() {
                if r.kind != MemoryKind::Ram {
                    f.reserve(r.start, r.end());
                }
            }
            f.finish();
            let mut s = STATS.lock();
            s.ram_bytes = ram;
            s.ignored_bytes = f.ignored_bytes;
        }
        let pages = paging::init(boot, &layout);
        let heap = heap::init(ram);
        record_direct_ranges(boot);
        let mut s = STATS.lock();
        s.direct_map_pages = pages;
        s.heap_phys = heap.0;
        s.heap_bytes = heap.1;
    }

    pub use paging::{map_mmio, map_phys};

    /// Physical ranges the direct map covers (RAM and ACPI memory), set
    /// once at boot after the heap exists and read without a lock (every
    /// table-entry view of the IOMMU drivers checks its frame here).
    static DIRECT_RANGES: spin::Once<alloc::vec::Vec<(u64, u64)>> = spin::Once::new();

    pub(super) fn record_direct_ranges(boot: &BootInfo) {
        DIRECT_RANGES.call_once(|| {
            boot.memory_map()
                .iter()
                .filter(|m| matches!(m.kind, MemoryKind::Ram | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs))
                .map(|m| (m.start, m.end().min(MAX_PHYS)))
                .collect()
        });
    }

    /// Whether `[phys, phys + len)` is RAM the direct map covers.
    pub fn is_direct_mapped(phys: u64, len: u64) -> bool {
        direct_mapped(phys, len as usize)
    }

    fn direct_mapped(phys: u64, len: usize) -> bool {
        let Some(end) = phys.checked_add(len as u64) else { return false };
        DIRECT_RANGES.get().is_some_and(|r| r.iter().any(|&(s, e)| s <= phys && end <= e))
    }

    /// Byte access to RAM through the direct map, for iommufd's memory
    /// sources (guest memory, accesses). Anything outside RAM is `EFAULT`.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct DirectMap;

    impl iommufd::memsrc::PhysMemory for DirectMap {
        fn read(&self, phys: u64, buf: &mut [u8]) -> iommufd::Result<()> {
            if !direct_mapped(phys, buf.len()) {
                return Err(iommufd::Errno::EFAULT);
            }
            // SAFETY: [phys, phys + len) lies in RAM, which the direct map
            // covers; the bytes are plain memory the caller pinned or owns.
            unsafe { core::ptr::copy_nonoverlapping(phys_to_virt(phys), buf.as_mut_ptr(), buf.len()) };
            Ok(())
        }
        fn write(&self, phys: u64, buf: &[u8]) -> iommufd::Result<()> {
            if !direct_mapped(phys, buf.len()) {
                return Err(iommufd::Errno::EFAULT);
            }
            // SAFETY: as for read; the destination is RAM the caller pinned.
            unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), phys_to_virt(phys), buf.len()) };
            Ok(())
        }
    }
}
