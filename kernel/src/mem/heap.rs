//! The kernel heap: one contiguous run of frames, used through the direct
//! map, managed by `linked_list_allocator`, with size classes in front
//! for blocks up to 2 KiB (`size_classes`).

use super::frame::FRAME_SIZE;
use super::size_classes::SizeClasses;
use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: SizeClasses<LockedHeap> = SizeClasses::new(LockedHeap::empty());

/// Sets up the heap: an eighth of RAM, between 4 MiB and 512 MiB. Returns
/// (physical base, bytes).
pub fn init(ram_bytes: u64) -> (u64, u64) {
    let bytes = (ram_bytes / 8).clamp(4 << 20, 512 << 20) & !(FRAME_SIZE - 1);
    let mut size = bytes;
    let phys = loop {
        match super::FRAMES.lock().alloc((size / FRAME_SIZE) as usize, 0x20_0000, u64::MAX) {
            Ok(p) => break p,
            Err(_) if size > 1 << 20 => size /= 2,
            Err(e) => panic!("no memory for the kernel heap: {e}"),
        }
    };
    // SAFETY: [phys, phys + size) was just allocated for the heap alone and
    // is mapped writable in the direct map; it is handed over exactly once.
    unsafe { HEAP.backing().lock().init(super::phys_to_virt(phys), size as usize) };
    (phys, size)
}
