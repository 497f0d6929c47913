//! Command buffer entries (spec §2.4): 128 bits each, opcode in bits
//! 63:60 of the first word. The unit fetches them from its head to the
//! tail software writes.
//!
//! Only the commands the driver issues are built here. Reserved fields are
//! always zero: QEMU logs an ILLEGAL_COMMAND_ERROR event for any reserved
//! bit it checks.

use alloc::vec::Vec;
use core::fmt;

/// COMPLETION_WAIT opcode.
pub const COMPLETION_WAIT: u8 = 0x1;
/// INVALIDATE_DEVTAB_ENTRY opcode.
pub const INVALIDATE_DEVTAB_ENTRY: u8 = 0x2;
/// INVALIDATE_IOMMU_PAGES opcode.
pub const INVALIDATE_IOMMU_PAGES: u8 = 0x3;
/// INVALIDATE_IOTLB_PAGES opcode (device IOTLBs; not issued).
pub const INVALIDATE_IOTLB_PAGES: u8 = 0x4;
/// INVALIDATE_INTERRUPT_TABLE opcode.
pub const INVALIDATE_INTERRUPT_TABLE: u8 = 0x5;
/// INVALIDATE_IOMMU_ALL opcode (needs EFR.IASup).
pub const INVALIDATE_IOMMU_ALL: u8 = 0x8;

const OPCODE_SHIFT: u32 = 60;

/// COMPLETION_WAIT word-0 bits.
pub mod wait {
    /// S: store the 64-bit data at the address when done.
    pub const STORE: u64 = 1 << 0;
    /// I: set Status.ComWaitInt (and interrupt when enabled).
    pub const INTERRUPT: u64 = 1 << 1;
    /// F: flush queue (wait for all earlier commands before later ones).
    pub const FLUSH: u64 = 1 << 2;
    /// Store address field (bits 51:3: 8-byte aligned).
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_fff8;
}

/// INVALIDATE_IOMMU_PAGES word-1 bits.
pub mod pages {
    /// S: the address encodes a power-of-two range (first zero bit from
    /// bit 12 up marks its size).
    pub const SIZE: u64 = 1 << 0;
    /// PDE: also invalidate cached page-directory entries.
    pub const PDE: u64 = 1 << 1;
    /// GN: the PASID field is valid (guest translation; never set here).
    pub const GN: u64 = 1 << 2;
    /// The address that, with S = 1, means every page of the domain.
    pub const ALL_ADDRESS: u64 = 0x7fff_ffff_ffff_f000;
    /// Ranges of 2^MAX_ORDER pages and more are sent as "all": from there on
    /// the first zero bit is at 51 or above, which QEMU treats as all.
    pub const MAX_ORDER: u32 = 40;
}

/// Which pages of a domain an INVALIDATE_IOMMU_PAGES names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageRange {
    /// `2^order` 4 KiB pages from `addr`, which is aligned to that size.
    Block {
        /// First byte (aligned to the block size).
        addr: u64,
        /// log2 of the page count.
        order: u32,
    },
    /// Every page.
    All,
}

impl PageRange {
    /// The word-1 encoding (address and S bit).
    pub const fn encode(self) -> u64 {
        match self {
            Self::Block { addr, order: 0 } => addr & !0xfff,
            Self::Block { order, .. } if order >= pages::MAX_ORDER => pages::ALL_ADDRESS | pages::SIZE,
            Self::Block { addr, order } => {
                // Bits 12 .. 12 + order - 1 set, bit 12 + order - 1 ... the
                // first zero at bit 11 + order makes the size 2^(12 + order).
                let ones = (1u64 << (11 + order)) - 1;
                (addr & !((1u64 << (12 + order)) - 1)) | (ones & !0xfff) | pages::SIZE
            }
            Self::All => pages::ALL_ADDRESS | pages::SIZE,
        }
    }

    /// Decodes word 1 of an INVALIDATE_IOMMU_PAGES back to a range, as the
    /// hardware reads it (an address whose first zero bit is at 51 or
    /// above means all).
    pub const fn decode(w1: u64) -> Self {
        let addr = w1 & !0xfff;
        if w1 & pages::SIZE == 0 {
            return Self::Block { addr, order: 0 };
        }
        let first_zero = (addr | 0xfff).trailing_ones();
        if first_zero >= 51 {
            return Self::All;
        }
        let order = first_zero + 1 - 12;
        Self::Block { addr: addr & !((1u64 << (12 + order)) - 1), order }
    }
}

/// Splits `[start, last]` (inclusive, 4 KiB granular) into the fewest
/// naturally aligned power-of-two blocks that cover exactly those pages.
pub fn exact_blocks(start: u64, last: u64) -> Vec<PageRange> {
    let mut out = Vec::new();
    let mut page = start >> 12;
    let end = last >> 12; // inclusive
    loop {
        let remaining = end - page + 1; // >= 1
        let align = if page == 0 { 63 } else { page.trailing_zeros() };
        let fit = 63 - remaining.leading_zeros();
        let order = align.min(fit);
        out.push(PageRange::Block { addr: page << 12, order });
        match page.checked_add(1u64 << order) {
            Some(next) if next <= end => page = next,
            _ => return out,
        }
    }
}

/// The smallest single aligned block containing `[start, last]` (or all).
pub fn covering_block(start: u64, last: u64) -> PageRange {
    let (first, end) = (start >> 12, last >> 12);
    let order = 64 - (first ^ end).leading_zeros();
    if order >= pages::MAX_ORDER {
        PageRange::All
    } else {
        PageRange::Block { addr: (first >> order << order) << 12, order }
    }
}

/// Range invalidations that would need more INVALIDATE_IOMMU_PAGES than
/// this are sent as one command over the smallest aligned block covering
/// the range (invalidating more than asked is always correct).
pub const MAX_RANGE_COMMANDS: usize = 8;

/// The INVALIDATE_IOMMU_PAGES commands (PDE set: directory entries may
/// have been freed) for `[start, last]` (inclusive) of `domain_id`: the
/// exact blocks, or one covering block when more than
/// [`MAX_RANGE_COMMANDS`] would be needed.
pub fn range_commands(domain_id: u16, start: u64, last: u64) -> Vec<Command> {
    let mut blocks = exact_blocks(start, last);
    if blocks.len() > MAX_RANGE_COMMANDS {
        blocks = alloc::vec![covering_block(start, last)];
    }
    blocks.into_iter().map(|b| Command::invalidate_pages(domain_id, b, true)).collect()
}

/// One command buffer entry.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Command(pub [u64; 2]);

// Layout: two 64-bit words, 16 bytes (spec §2.4).
const _: () = assert!(core::mem::size_of::<Command>() == 16);

impl Command {
    /// Size of an entry in bytes.
    pub const SIZE: u64 = 16;

    const fn op(op: u8) -> u64 {
        (op as u64) << OPCODE_SHIFT
    }

    /// COMPLETION_WAIT (spec §2.4.1) storing `data` at `addr` (8-byte
    /// aligned) once every earlier command has completed.
    pub const fn completion_wait(addr: u64, data: u64) -> Self {
        Self([Self::op(COMPLETION_WAIT) | (addr & wait::ADDR_MASK) | wait::STORE, data])
    }

    /// INVALIDATE_DEVTAB_ENTRY (spec §2.4.2) for `device_id`.
    pub const fn invalidate_devtab_entry(device_id: u16) -> Self {
        Self([Self::op(INVALIDATE_DEVTAB_ENTRY) | device_id as u64, 0])
    }

    /// INVALIDATE_IOMMU_PAGES (spec §2.4.3) of `domain_id` over `range`;
    /// `pde` also drops cached page-directory entries. PASID 0, GN = 0.
    pub const fn invalidate_pages(domain_id: u16, range: PageRange, pde: bool) -> Self {
        let w1 = range.encode() | if pde { pages::PDE } else { 0 };
        Self([Self::op(INVALIDATE_IOMMU_PAGES) | (domain_id as u64) << 32, w1])
    }

    /// INVALIDATE_INTERRUPT_TABLE (spec §2.4.5): drops what the unit
    /// cached of `device_id`'s interrupt remapping table.
    pub const fn invalidate_interrupt_table(device_id: u16) -> Self {
        Self([Self::op(INVALIDATE_INTERRUPT_TABLE) | device_id as u64, 0])
    }

    /// INVALIDATE_IOMMU_ALL (spec §2.4.7; EFR.IASup).
    pub const fn invalidate_all() -> Self {
        Self([Self::op(INVALIDATE_IOMMU_ALL), 0])
    }

    /// The opcode.
    pub const fn opcode(self) -> u8 {
        (self.0[0] >> OPCODE_SHIFT) as u8
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [w0, w1] = self.0;
        match self.opcode() {
            COMPLETION_WAIT => write!(f, "COMPLETION_WAIT(store {:#x} data {:#x})", w0 & wait::ADDR_MASK, w1),
            INVALIDATE_DEVTAB_ENTRY => write!(f, "INVALIDATE_DEVTAB_ENTRY({:#06x})", w0 as u16),
            INVALIDATE_INTERRUPT_TABLE => write!(f, "INVALIDATE_INTERRUPT_TABLE({:#06x})", w0 as u16),
            INVALIDATE_IOMMU_PAGES => write!(
                f,
                "INVALIDATE_IOMMU_PAGES(domain {} {:?} pde {})",
                (w0 >> 32) as u16,
                PageRange::decode(w1),
                w1 & pages::PDE != 0
            ),
            INVALIDATE_IOMMU_ALL => write!(f, "INVALIDATE_IOMMU_ALL"),
            op => write!(f, "Command(op {op:#x} {w0:#x} {w1:#x})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_words() {
        assert_eq!(Command::completion_wait(0x1234_5678, 9).0, [0x1000_0000_1234_5679, 9]);
        assert_eq!(Command::invalidate_devtab_entry(0x0108).0, [0x2000_0000_0000_0108, 0]);
        assert_eq!(Command::invalidate_all().0, [0x8000_0000_0000_0000, 0]);
        let p = Command::invalidate_pages(5, PageRange::Block { addr: 0x4000, order: 0 }, false);
        assert_eq!(p.0, [0x3000_0005_0000_0000, 0x4000]);
        let all = Command::invalidate_pages(0xffff, PageRange::All, true);
        assert_eq!(all.0, [0x3000_ffff_0000_0000, 0x7fff_ffff_ffff_f003]);
        assert_eq!(format!("{all:?}"), "INVALIDATE_IOMMU_PAGES(domain 65535 All pde true)");
    }

    #[test]
    fn size_encoding() {
        // 2 pages at 0x2000: bit 12 zero, S = 1 -> 8 KiB.
        assert_eq!(PageRange::Block { addr: 0x2000, order: 1 }.encode(), 0x2001);
        // 2 MiB at 2 MiB: bits 12..19 set, bit 20 zero.
        assert_eq!(PageRange::Block { addr: 0x20_0000, order: 9 }.encode(), 0x2f_f001);
        // 1 GiB at 3 GiB.
        assert_eq!(PageRange::Block { addr: 0xc000_0000, order: 18 }.encode(), 0xdfff_f001);
        for order in 0..pages::MAX_ORDER {
            let addr = 5u64 << (12 + order);
            let r = PageRange::Block { addr, order };
            assert_eq!(PageRange::decode(r.encode()), r, "order {order}");
        }
        assert_eq!(PageRange::decode(PageRange::All.encode()), PageRange::All);
        assert_eq!(PageRange::Block { addr: 0, order: 45 }.encode(), PageRange::All.encode());
    }

    #[test]
    fn exact_blocks_are_minimal_and_cover() {
        use PageRange::Block as B;
        assert_eq!(exact_blocks(0x1000, 0x1fff), [B { addr: 0x1000, order: 0 }]);
        assert_eq!(exact_blocks(0, 0x3f_ffff), [B { addr: 0, order: 10 }]);
        assert_eq!(
            exact_blocks(0x3000, 0x8fff),
            [B { addr: 0x3000, order: 0 }, B { addr: 0x4000, order: 2 }, B { addr: 0x8000, order: 0 }]
        );
        assert_eq!(exact_blocks(0xffff_ffff_ffff_f000, u64::MAX), [B { addr: 0xffff_ffff_ffff_f000, order: 0 }]);
        // Brute-force check: covered pages are exactly the range.
        for s in 0..40u64 {
            for l in s..40 {
                let blocks = exact_blocks(s << 12, (l << 12) | 0xfff);
                let mut pages = Vec::new();
                for b in &blocks {
                    let B { addr, order } = *b else { panic!() };
                    assert_eq!((addr >> 12) % (1 << order), 0, "aligned");
                    pages.extend((addr >> 12)..(addr >> 12) + (1 << order));
                }
                assert_eq!(pages, (s..=l).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn covering_block_contains_the_range() {
        assert_eq!(covering_block(0x1000, 0x1fff), PageRange::Block { addr: 0x1000, order: 0 });
        assert_eq!(covering_block(0x1f_f000, 0x20_0fff), PageRange::Block { addr: 0, order: 10 });
        assert_eq!(covering_block(0, u64::MAX), PageRange::All);
    }
}
