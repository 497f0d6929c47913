//! The kernel's page tables (built once at boot, replacing the PVH boot
//! tables) and on-demand mappings of firmware memory and device registers.
//!
//! Table pages come from the frame allocator. They are built while the boot
//! tables (identity map of the low 4 GiB) are live, so the builder takes its
//! frames below 4 GiB and reaches them at their physical address; after the
//! switch the same tables are reached through the direct map.

use super::frame::{FRAME_SIZE, FrameAllocator};
use super::{DIRECT_MAP_BASE, FRAMES, MMIO_BASE};
use portcullis_boot::layout::ImageLayout;
use portcullis_boot::{BootInfo, MemoryKind};
use spin::Mutex;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::mapper::{MapToError, Mapper, Translate};
use x86_64::structures::paging::{
    FrameAllocator as X86FrameAllocator, OffsetPageTable, Page, PageTable, PageTableFlags as F, PhysFrame, Size2MiB,
    Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

static MAPPER: Mutex<Option<OffsetPageTable<'static>>> = Mutex::new(None);

struct TableFrames<'a, S> {
    frames: &'a mut FrameAllocator<S>,
    below: u64,
}

// SAFETY: every frame returned is freshly allocated, unused and 4 KiB aligned.
unsafe impl<S: AsRef<[u64]> + AsMut<[u64]>> X86FrameAllocator<Size4KiB> for TableFrames<'_, S> {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let p = self.frames.alloc(1, FRAME_SIZE, self.below).ok()?;
        Some(PhysFrame::containing_address(PhysAddr::new(p)))
    }
}

/// Error from an on-demand mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// No frame for a page table.
    OutOfMemory,
    /// The range wraps or lies beyond the physical address space.
    BadRange { phys: u64, len: u64 },
    /// The page is already mapped to something else.
    Conflict { virt: u64 },
}

impl core::fmt::Display for MapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfMemory => write!(f, "out of memory for page tables"),
            Self::BadRange { phys, len } => write!(f, "bad physical range {:#x}+{:#x}", phys, len),
            Self::Conflict { virt } => {
                write!(f, "virtual page {:#x} already mapped differently", virt)
            }
        }
    }
}

fn map_4k(
    m: &mut OffsetPageTable<'static>,
    fa: &mut impl X86FrameAllocator<Size4KiB>,
    virt: u64,
    phys: u64,
    flags: F,
) -> Result<(), MapError> {
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt));
    let frame = PhysFrame::containing_address(PhysAddr::new(phys));
    // SAFETY: the kernel maps only (a) its own image at its link address,
    // (b) physical memory at a fixed offset in windows nothing else uses;
    // neither aliases memory Rust code holds references to.
    match unsafe { m.map_to_with_table_flags(page, frame, flags, F::PRESENT | F::WRITABLE, fa) } {
        Ok(flush) => {
            flush.flush();
            Ok(())
        }
        Err(MapToError::FrameAllocationFailed) => Err(MapError::OutOfMemory),
        Err(MapToError::PageAlreadyMapped(f)) if f == frame => Ok(()),
        Err(_) => Err(MapError::Conflict { virt }),
    }
}

/// Builds and loads the kernel page tables. Returns the number of 4 KiB and
/// 2 MiB pages in the direct map.
pub fn init(boot: &BootInfo, layout: &ImageLayout) -> (usize, usize) {
    let mut frames = FRAMES.lock();
    let mut fa = TableFrames { frames: &mut frames, below: 1 << 32 };
    let pml4_phys = fa.allocate_frame().expect("no frame for the kernel PML4");
    let pml4_ptr = pml4_phys.start_address().as_u64() as *mut PageTable;
    // SAFETY: the boot tables identity-map the low 4 GiB and the frame is
    // below 4 GiB, fresh and exclusively ours; writing an empty table into it
    // is sound, and the reference lives as long as the tables (forever).
    let pml4: &'static mut PageTable = unsafe {
        pml4_ptr.write(PageTable::new());
        &mut *pml4_ptr
    };
    // SAFETY: with offset 0, physical == virtual for every table frame,
    // which holds while the boot identity map is live and frames are < 4 GiB.
    let mut m = unsafe { OffsetPageTable::new(pml4, VirtAddr::new(0)) };

    // The image, W^X, guard page left out.
    let mut map_span = |m: &mut OffsetPageTable<'static>, start: u64, end: u64, flags: F| {
        let mut a = start & !(FRAME_SIZE - 1);
        while a < end {
            if !(layout.stack_guard.start <= a && a < layout.stack_guard.end) {
                map_4k(m, &mut fa, a, a, flags).expect("mapping the kernel image");
            }
            a += FRAME_SIZE;
        }
    };
    map_span(&mut m, layout.text.start, layout.text.end, F::PRESENT | F::GLOBAL);
    map_span(&mut m, layout.rodata.start, layout.rodata.end, F::PRESENT | F::GLOBAL | F::NO_EXECUTE);
    map_span(&mut m, layout.data.start, layout.data.end, F::PRESENT | F::WRITABLE | F::GLOBAL | F::NO_EXECUTE);

    // Direct map of RAM and ACPI memory: 2 MiB pages where a whole 2 MiB
    // block lies inside one range, 4 KiB pages at the edges.
    let data = F::PRESENT | F::WRITABLE | F::GLOBAL | F::NO_EXECUTE;
    let (mut small, mut large) = (0, 0);
    for r in boot.memory_map() {
        if !matches!(r.kind, MemoryKind::Ram | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs) {
            continue;
        }
        let end = r.end().min(super::MAX_PHYS);
        let mut a = r.start & !(FRAME_SIZE - 1);
        while a < end {
            if a.is_multiple_of(0x20_0000) && a + 0x20_0000 <= end {
                let page = Page::<Size2MiB>::containing_address(VirtAddr::new(DIRECT_MAP_BASE + a));
                let frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(a));
                // SAFETY: as in map_4k: a fixed-offset window of physical memory.
                match unsafe { m.map_to_with_table_flags(page, frame, data, F::PRESENT | F::WRITABLE, &mut fa) } {
                    Ok(f) => f.ignore(),
                    Err(MapToError::PageAlreadyMapped(_)) => {}
                    Err(e) => panic!("direct map at {:#x}: {:?}", a, e),
                }
                large += 1;
                a += 0x20_0000;
            } else {
                match map_4k(&mut m, &mut fa, DIRECT_MAP_BASE + a, a, data) {
                    Ok(()) | Err(MapError::Conflict { .. }) => {}
                    Err(e) => panic!("direct map at {:#x}: {}", a, e),
                }
                small += 1;
                a += FRAME_SIZE;
            }
        }
    }

    drop(frames);

    // SAFETY: the new tables map the running code, its stack and all data
    // at the same addresses as before (the image is identity-mapped), so
    // execution continues; the boot tables stay in .bss untouched.
    unsafe { Cr3::write(pml4_phys, Cr3Flags::empty()) };
    // SAFETY: from now on the tables are reached through the direct map,
    // which covers every frame the builder used (all are RAM).
    let m = unsafe {
        let pml4 = &mut *((DIRECT_MAP_BASE + pml4_phys.start_address().as_u64()) as *mut PageTable);
        OffsetPageTable::new(pml4, VirtAddr::new(DIRECT_MAP_BASE))
    };
    *MAPPER.lock() = Some(m);
    (small, large)
}

fn map_window(base: u64, phys: u64, len: u64, flags: F) -> Result<*mut u8, MapError> {
    let bad = MapError::BadRange { phys, len };
    let end = phys.checked_add(len.max(1)).ok_or(bad)?;
    if end > 1 << 52 {
        return Err(bad);
    }
    let mut guard = MAPPER.lock();
    let m = guard.as_mut().expect("paging not initialised");
    let mut frames = FRAMES.lock();
    let mut fa = TableFrames { frames: &mut frames, below: super::MAX_PHYS };
    let mut a = phys & !(FRAME_SIZE - 1);
    while a < end {
        let virt = base + a;
        if m.translate_addr(VirtAddr::new(virt)).map(|p| p.as_u64()) != Some(a) {
            map_4k(m, &mut fa, virt, a, flags)?;
        }
        a += FRAME_SIZE;
    }
    Ok((base + phys) as *mut u8)
}

/// Maps device registers `[phys, phys + len)` uncached and returns their
/// virtual address. Idempotent: mapping the same registers again returns
/// the same address.
pub fn map_mmio(phys: u64, len: u64) -> Result<*mut u8, MapError> {
    map_window(MMIO_BASE, phys, len, F::PRESENT | F::WRITABLE | F::NO_CACHE | F::WRITE_THROUGH | F::NO_EXECUTE)
}

/// Maps firmware memory (ACPI tables in reserved ranges, the BIOS area)
/// write-back, read-only, at its direct-map address; RAM is already there.
pub fn map_phys(phys: u64, len: u64) -> Result<*const u8, MapError> {
    map_window(DIRECT_MAP_BASE, phys, len, F::PRESENT | F::NO_EXECUTE).map(|p| p as *const u8)
}
