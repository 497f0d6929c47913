//! Small allocations in size classes, in front of a general allocator.
//!
//! `linked_list_allocator` keeps one list of free holes, in address order,
//! and walks it on every allocation and every free. Once the heap is cut
//! into many holes (after a few thousand allocations of different sizes),
//! a 64-byte allocation and its free took 0.2-1.8 us under QEMU TCG,
//! several per IOAS map or unmap call. Blocks of up to [`MAX_CLASS`] bytes
//! are therefore rounded up to a power of two and, once freed, kept on a
//! free list of their class (a word at the start of each free block links
//! the next), so a later allocation of that class is a pop. Blocks of a
//! class come from the general allocator aligned to their size, so they
//! serve any alignment up to it; they never go back to it (the memory a
//! class holds is its peak use, small next to the heap).

use core::alloc::{GlobalAlloc, Layout};
use spin::Mutex;

/// The smallest class: room for the link word, and 16-byte alignment.
const MIN_CLASS: usize = 16;
/// The largest class; larger blocks go to the general allocator.
pub const MAX_CLASS: usize = 2048;
/// Classes 16, 32, ... [`MAX_CLASS`] bytes.
const CLASSES: usize = (MAX_CLASS / MIN_CLASS).trailing_zeros() as usize + 1;

/// Free blocks of one class: the address of the first (0: none).
struct FreeList {
    head: usize,
}

/// `backing` with size classes in front (see the module documentation).
pub struct SizeClasses<B> {
    lists: [Mutex<FreeList>; CLASSES],
    backing: B,
}

impl<B> core::fmt::Debug for SizeClasses<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "SizeClasses(free blocks per class: {:?})", self.free_blocks())
    }
}

impl<B> SizeClasses<B> {
    /// Size classes in front of `backing`, all lists empty.
    pub const fn new(backing: B) -> Self {
        Self { lists: [const { Mutex::new(FreeList { head: 0 }) }; CLASSES], backing }
    }

    /// The general allocator behind the classes.
    pub fn backing(&self) -> &B {
        &self.backing
    }
}

/// The class of `layout` (its index), if it has one.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(MIN_CLASS);
    if size > MAX_CLASS {
        return None;
    }
    Some((size.next_power_of_two() / MIN_CLASS).trailing_zeros() as usize)
}

/// The layout every block of class `c` has in the general allocator.
fn class_layout(c: usize) -> Layout {
    let size = MIN_CLASS << c;
    Layout::from_size_align(size, size).expect("a power of two up to MAX_CLASS")
}

// SAFETY: blocks handed out are either the backing allocator's (for
// layouts without a class, passed through unchanged) or blocks of
// `class_layout(c)` from it, each on at most one free list or in use by
// one caller: `alloc` pops a block before returning it and `dealloc` pushes
// the caller's block, each under the class's lock. A class block is at
// least as large and as aligned as every layout of its class, so it fits
// the caller's layout; `dealloc` and `realloc` get the same layout (hence
// the same class) the block was allocated with, as `GlobalAlloc` requires.
unsafe impl<B: GlobalAlloc> GlobalAlloc for SizeClasses<B> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class_of(layout) else {
            // SAFETY: the caller's layout, passed on (non-zero size: the
            // caller's duty).
            return unsafe { self.backing.alloc(layout) };
        };
        {
            let mut list = self.lists[c].lock();
            if list.head != 0 {
                let block = list.head as *mut usize;
                // SAFETY: `head` is a free block of this class (pushed by
                // `dealloc`), at least 16 bytes and aligned, whose first
                // word links the next free one; nobody else holds it.
                list.head = unsafe { block.read() };
                return block.cast();
            }
        }
        // SAFETY: a non-zero size and a power-of-two alignment.
        unsafe { self.backing.alloc(class_layout(c)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(c) = class_of(layout) else {
            // SAFETY: the block came from `backing` with this layout.
            return unsafe { self.backing.dealloc(ptr, layout) };
        };
        if ptr.is_null() {
            return;
        }
        let mut list = self.lists[c].lock();
        // SAFETY: `ptr` is a block of class `c` the caller gives back (at
        // least 16 bytes, aligned to at least 16): its first word now
        // links the rest of the list.
        unsafe { ptr.cast::<usize>().write(list.head) };
        list.head = ptr as usize;
    }
}

impl<B> SizeClasses<B> {
    /// Free blocks on each class's list (16 bytes first).
    pub fn free_blocks(&self) -> [usize; CLASSES] {
        core::array::from_fn(|c| {
            let list = self.lists[c].lock();
            let mut n = 0;
            let mut at = list.head;
            while at != 0 {
                n += 1;
                // SAFETY: every block on the list is free and links the
                // next by its first word (see `dealloc`); the lock is held.
                at = unsafe { (at as *const usize).read() };
            }
            n
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::alloc::System;
    use std::vec::Vec;

    #[test]
    fn classes() {
        let l = |size, align| Layout::from_size_align(size, align).unwrap();
        assert_eq!(class_of(l(1, 1)), Some(0));
        assert_eq!(class_of(l(16, 8)), Some(0));
        assert_eq!(class_of(l(17, 8)), Some(1));
        assert_eq!(class_of(l(8, 64)), Some(2), "alignment counts");
        assert_eq!(class_of(l(2048, 8)), Some(7));
        assert_eq!(class_of(l(2049, 8)), None);
        assert_eq!(class_of(l(8, 4096)), None);
        assert_eq!(CLASSES, 8);
    }

    #[test]
    fn freed_blocks_are_reused_aligned_and_distinct() {
        let h = SizeClasses::new(System);
        let layouts: Vec<Layout> = [(8, 8), (24, 8), (64, 64), (100, 4), (2048, 16), (5000, 8)]
            .iter()
            .map(|&(s, a)| Layout::from_size_align(s, a).unwrap())
            .collect();
        let mut blocks = Vec::new();
        for round in 0..3u8 {
            for &l in &layouts {
                for k in 0..4u8 {
                    // SAFETY: non-zero sizes.
                    let p = unsafe { h.alloc(l) };
                    assert!(!p.is_null());
                    assert_eq!(p as usize % l.align(), 0);
                    // SAFETY: the block is ours, `l.size()` bytes.
                    unsafe { p.write_bytes(round ^ k, l.size()) };
                    blocks.push((p, l, round ^ k));
                }
            }
            // Every block still holds what was written: none overlaps
            // another.
            for &(p, l, v) in &blocks {
                // SAFETY: live blocks of `l.size()` bytes.
                let s = unsafe { core::slice::from_raw_parts(p, l.size()) };
                assert!(s.iter().all(|&b| b == v));
            }
            // Free every other block; the next round reuses them.
            let mut keep = Vec::new();
            for (i, (p, l, v)) in blocks.drain(..).enumerate() {
                if i % 2 == 0 {
                    // SAFETY: allocated above with `l`, freed once.
                    unsafe { h.dealloc(p, l) };
                } else {
                    keep.push((p, l, v));
                }
            }
            blocks = keep;
        }
        let free = h.free_blocks();
        assert!(free.iter().sum::<usize>() > 0);
        let before = free;
        // A pop takes the last block freed of its class.
        let l = Layout::from_size_align(64, 64).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { h.alloc(l) };
        assert_eq!(h.free_blocks()[2], before[2] - 1);
        // SAFETY: allocated above with `l`.
        unsafe { h.dealloc(p, l) };
        for (p, l, _) in blocks {
            // SAFETY: allocated with `l`, freed once.
            unsafe { h.dealloc(p, l) };
        }
    }
}
