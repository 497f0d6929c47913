//! Nested page tables: the x86-64 4-level format (AMD APM vol. 2, 15.25),
//! 4 KiB leaves (2 MiB ones for the benchmark only), built in frames from
//! the platform. Guest accesses count
//! as user accesses in the nested walk, so every level has U/S set.

use alloc::vec::Vec;
use portcullis::{PhysAddr, Platform};
use portcullis_kernel::host::KernelHost;

/// Present.
const P: u64 = 1 << 0;
/// Writable.
const RW: u64 = 1 << 1;
/// User (every guest access is a user access to the nested walk).
const US: u64 = 1 << 2;
/// Write-through.
const PWT: u64 = 1 << 3;
/// Cache disable.
const PCD: u64 = 1 << 4;
/// Page size (a 2 MiB leaf in a page directory).
const PS: u64 = 1 << 7;
/// Bits 51:12 of an entry.
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// How a page is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Guest RAM: write-back.
    Ram,
    /// Device registers: uncached.
    Mmio,
}

/// A nested page table.
#[derive(Debug)]
pub struct Npt<'h> {
    host: &'h KernelHost,
    /// Root (nCR3).
    pub root: u64,
    /// Every table frame, the root first.
    tables: Vec<u64>,
}

/// The NPT could not get a frame for a table.
#[derive(Debug, Clone, Copy)]
pub struct OutOfFrames;

impl<'h> Npt<'h> {
    /// An empty table.
    pub fn new(host: &'h KernelHost) -> Result<Self, OutOfFrames> {
        let root = host.alloc_frames(1, 4096).ok_or(OutOfFrames)?.0;
        Ok(Self { host, root, tables: alloc::vec![root] })
    }

    /// Page-table memory in bytes.
    pub fn table_bytes(&self) -> u64 {
        self.tables.len() as u64 * 4096
    }

    /// Maps the 4 KiB page at `gpa` to host frame `hpa`.
    pub fn map(&mut self, gpa: u64, hpa: u64, kind: Kind) -> Result<(), OutOfFrames> {
        assert!(gpa.is_multiple_of(4096) && hpa.is_multiple_of(4096));
        let mut table = self.root;
        for level in [3u32, 2, 1] {
            let slot = table + ((gpa >> (12 + 9 * level)) & 511) * 8;
            let entry = self.host.read_u64(PhysAddr(slot));
            table = if entry & P != 0 {
                entry & ADDR
            } else {
                let next = self.host.alloc_frames(1, 4096).ok_or(OutOfFrames)?.0;
                self.tables.push(next);
                self.host.write_u64(PhysAddr(slot), next | P | RW | US);
                next
            };
        }
        let leaf = match kind {
            Kind::Ram => hpa | P | RW | US,
            Kind::Mmio => hpa | P | RW | US | PWT | PCD,
        };
        self.host.write_u64(PhysAddr(table + ((gpa >> 12) & 511) * 8), leaf);
        Ok(())
    }

    /// Maps the 2 MiB guest RAM page at `gpa` to host `hpa` (both 2 MiB
    /// aligned; nothing mapped there before in 4 KiB pages).
    pub fn map_2m(&mut self, gpa: u64, hpa: u64) -> Result<(), OutOfFrames> {
        assert!(gpa.is_multiple_of(1 << 21) && hpa.is_multiple_of(1 << 21));
        let mut table = self.root;
        for level in [3u32, 2] {
            let slot = table + ((gpa >> (12 + 9 * level)) & 511) * 8;
            let entry = self.host.read_u64(PhysAddr(slot));
            table = if entry & P != 0 {
                entry & ADDR
            } else {
                let next = self.host.alloc_frames(1, 4096).ok_or(OutOfFrames)?.0;
                self.tables.push(next);
                self.host.write_u64(PhysAddr(slot), next | P | RW | US);
                next
            };
        }
        self.host.write_u64(PhysAddr(table + ((gpa >> 21) & 511) * 8), hpa | P | RW | US | PS);
        Ok(())
    }

    /// Removes the 4 KiB page at `gpa` (tables stay). False when it was
    /// not mapped.
    pub fn unmap(&mut self, gpa: u64) -> bool {
        let mut table = self.root;
        for level in [3u32, 2, 1] {
            let entry = self.host.read_u64(PhysAddr(table + ((gpa >> (12 + 9 * level)) & 511) * 8));
            if entry & P == 0 {
                return false;
            }
            table = entry & ADDR;
        }
        let slot = PhysAddr(table + ((gpa >> 12) & 511) * 8);
        let was = self.host.read_u64(slot) & P != 0;
        self.host.write_u64(slot, 0);
        was
    }

    /// The host frame `gpa` maps to, if any.
    pub fn translate(&self, gpa: u64) -> Option<u64> {
        let mut table = self.root;
        for level in [3u32, 2, 1, 0] {
            let entry = self.host.read_u64(PhysAddr(table + ((gpa >> (12 + 9 * level)) & 511) * 8));
            if entry & P == 0 {
                return None;
            }
            if level == 1 && entry & PS != 0 {
                return Some((entry & ADDR & !0x1f_ffff) | (gpa & 0x1f_ffff));
            }
            table = entry & ADDR;
        }
        Some(table | (gpa & 0xfff))
    }
}

impl Drop for Npt<'_> {
    fn drop(&mut self) {
        for &t in &self.tables {
            self.host.free_frames(PhysAddr(t), 1);
        }
    }
}
