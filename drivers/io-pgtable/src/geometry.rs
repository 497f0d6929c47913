//! The shape of a radix I/O page table, shared by every format.
//!
//! All three formats (VT-d second stage, x86-64 first stage, AMD-Vi v1)
//! are trees of 4 KiB tables of 512 eight-byte entries: level 0 entries
//! map 4 KiB, and each level up translates 9 more IOVA bits. What differs
//! is the number of levels, how much of the space they cover is usable
//! (the aperture), how wide an output address may be, and which levels may
//! hold leaves. [`Geometry`] holds exactly that and derives the rest (level
//! shifts and sizes, the index of an IOVA in a table, the page-size bitmap,
//! the last IOVA). Each format keeps one and answers the geometry half of
//! [`PtFormat`](crate::PtFormat) from it.

use crate::{BITS_PER_LEVEL, ENTRIES, MAX_LEVELS, PAGE_SHIFT};

/// Bytes covered by one entry at `level` (4 KiB at 0, 2 MiB at 1, 1 GiB
/// at 2, ...). `level` is below 6, so the size fits 64 bits.
#[inline]
pub const fn level_size(level: u32) -> u64 {
    1 << level_shift(level)
}

/// log2 of [`level_size`]: the lowest IOVA bit a level-`level` entry
/// translates. Also defined for `level` = the number of levels, where it is
/// the number of IOVA bits the whole tree covers (66 for six levels).
#[inline]
pub const fn level_shift(level: u32) -> u32 {
    PAGE_SHIFT + BITS_PER_LEVEL * level
}

/// The page-size bitmap (bit n set = 2^n bytes) of a leaf-level mask.
pub const fn sizes_of_leaf_levels(leaf_levels: u32) -> u64 {
    let mut sizes = 0;
    let mut l = 0;
    while l < MAX_LEVELS as u32 {
        if leaf_levels >> l & 1 != 0 {
            sizes |= level_size(l);
        }
        l += 1;
    }
    sizes
}

/// Index of the entry translating `iova` in the level-`level` table that
/// covers it.
#[inline]
pub(crate) const fn index_of(iova: u64, level: u32) -> usize {
    ((iova >> level_shift(level)) as usize) & (ENTRIES - 1)
}

/// The shape of one page table: levels, aperture, output width and leaf
/// levels, over a 4 KiB granule and 9 IOVA bits per level.
///
/// Built with [`Geometry::new`] (4 KiB pages only, the whole space the
/// levels cover, 52-bit output) and narrowed with the `with_*` methods,
/// which clamp rather than fail, as the capability registers they come
/// from may report more than a format can use.
///
/// The granule and the bits per level are the same for every format
/// Portcullis drives, and the engine's table layout and cache-line masks
/// are built on them, so they are constants ([`Geometry::GRANULE_SHIFT`],
/// [`Geometry::BITS_PER_LEVEL`]) rather than fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    levels: u32,
    input_bits: u32,
    output_bits: u32,
    leaf_levels: u32,
}

impl Geometry {
    /// log2 of the smallest page and of a table (4 KiB).
    pub const GRANULE_SHIFT: u32 = PAGE_SHIFT;
    /// IOVA bits translated per level (512 entries per table).
    pub const BITS_PER_LEVEL: u32 = BITS_PER_LEVEL;
    /// Widest output address any format's entries hold (bits 51:12).
    pub const MAX_OUTPUT_BITS: u32 = 52;

    /// A tree of `levels` levels (1 to [`MAX_LEVELS`]) with 4 KiB leaves
    /// only, an aperture of everything the levels cover (capped at the
    /// 64-bit space) and 52-bit output. `None` for other level counts.
    pub const fn new(levels: u32) -> Option<Self> {
        if levels == 0 || levels > MAX_LEVELS as u32 {
            return None;
        }
        let covered = Self::bits_covered(levels);
        Some(Self {
            levels,
            input_bits: if covered > 64 { 64 } else { covered },
            output_bits: Self::MAX_OUTPUT_BITS,
            leaf_levels: 1,
        })
    }

    /// IOVA bits a tree of `levels` levels translates: 39 for three, 48
    /// for four, 57 for five, 66 for six (more than the 64-bit space).
    #[inline]
    pub const fn bits_covered(levels: u32) -> u32 {
        level_shift(levels)
    }

    /// The fewest levels (at least 1, at most [`MAX_LEVELS`]) whose tree
    /// covers `bits` of IOVA.
    pub const fn levels_covering(bits: u32) -> u32 {
        let mut levels = 1;
        while levels < MAX_LEVELS as u32 && Self::bits_covered(levels) < bits {
            levels += 1;
        }
        levels
    }

    /// Limits the aperture to `bits` of IOVA: never more than the levels
    /// cover or than 64, never fewer than 12 (one page).
    pub const fn with_input_bits(mut self, bits: u32) -> Self {
        let covered = Self::bits_covered(self.levels);
        let max = if covered > 64 { 64 } else { covered };
        self.input_bits = if bits > max {
            max
        } else if bits < Self::GRANULE_SHIFT {
            Self::GRANULE_SHIFT
        } else {
            bits
        };
        self
    }

    /// Limits output addresses to `bits`; at most [`Geometry::MAX_OUTPUT_BITS`].
    pub const fn with_output_bits(mut self, bits: u32) -> Self {
        self.output_bits = if bits > Self::MAX_OUTPUT_BITS { Self::MAX_OUTPUT_BITS } else { bits };
        self
    }

    /// Sets which levels may hold leaves (bit `l` = level `l`); level 0
    /// always may.
    pub const fn with_leaf_levels(mut self, leaf_levels: u32) -> Self {
        self.leaf_levels = leaf_levels | 1;
        self
    }

    /// Allows 4 KiB leaves and, as asked, 2 MiB (level 1) and 1 GiB
    /// (level 2) ones.
    pub const fn with_large_pages(self, two_mib: bool, one_gib: bool) -> Self {
        self.with_leaf_levels(1 | (two_mib as u32) << 1 | (one_gib as u32) << 2)
    }

    /// Number of levels.
    #[inline]
    pub const fn levels(&self) -> u32 {
        self.levels
    }

    /// Level of the root table's entries (`levels - 1`).
    #[inline]
    pub const fn top_level(&self) -> u32 {
        self.levels - 1
    }

    /// IOVA bits the levels cover (see [`Geometry::bits_covered`]).
    #[inline]
    pub const fn covered_bits(&self) -> u32 {
        Self::bits_covered(self.levels)
    }

    /// Width of the aperture in bits.
    #[inline]
    pub const fn input_bits(&self) -> u32 {
        self.input_bits
    }

    /// Width of output addresses in bits.
    #[inline]
    pub const fn output_bits(&self) -> u32 {
        self.output_bits
    }

    /// Bit `l` set when level `l` may hold leaves.
    #[inline]
    pub const fn leaf_levels(&self) -> u32 {
        self.leaf_levels
    }

    /// Last IOVA (inclusive) of the aperture, which starts at 0.
    #[inline]
    pub const fn aperture_last(&self) -> u64 {
        if self.input_bits >= 64 { u64::MAX } else { (1 << self.input_bits) - 1 }
    }

    /// log2 of the bytes one level-`level` entry covers.
    #[inline]
    pub const fn level_shift(&self, level: u32) -> u32 {
        level_shift(level)
    }

    /// Bytes one level-`level` entry covers (`level` below
    /// [`Geometry::levels`]).
    #[inline]
    pub const fn level_size(&self, level: u32) -> u64 {
        level_size(level)
    }

    /// Index of the entry that translates `iova` in the level-`level`
    /// table covering it.
    #[inline]
    pub const fn index(&self, iova: u64, level: u32) -> usize {
        index_of(iova, level)
    }

    /// How many root entries the aperture reaches (512 unless the aperture
    /// is narrower than the levels: 256 for the lower canonical half, 128
    /// for six levels over the 64-bit space).
    pub const fn root_entries(&self) -> usize {
        (self.aperture_last() >> level_shift(self.top_level())) as usize + 1
    }

    /// The page sizes leaves may have (bit n = 2^n bytes), from the leaf
    /// levels that exist in this tree.
    pub const fn page_sizes(&self) -> u64 {
        let below = if self.levels >= 32 { u32::MAX } else { (1 << self.levels) - 1 };
        sizes_of_leaf_levels(self.leaf_levels & below)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K4: u64 = 1 << 12;
    const M2: u64 = 1 << 21;
    const G1: u64 = 1 << 30;
    const T512: u64 = 1 << 39;

    fn g(levels: u32) -> Geometry {
        Geometry::new(levels).unwrap()
    }

    #[test]
    fn level_counts_and_widths() {
        assert_eq!(Geometry::new(0), None);
        assert_eq!(Geometry::new(MAX_LEVELS as u32 + 1), None);
        let widths: [u32; 6] = core::array::from_fn(|i| Geometry::bits_covered(i as u32 + 1));
        assert_eq!(widths, [21, 30, 39, 48, 57, 66]);
        // The aperture is everything covered, capped at 64 bits.
        let inputs: [u32; 6] = core::array::from_fn(|i| g(i as u32 + 1).input_bits());
        assert_eq!(inputs, [21, 30, 39, 48, 57, 64]);
        assert_eq!(g(3).aperture_last(), T512 - 1);
        assert_eq!(g(4).aperture_last(), (1 << 48) - 1);
        assert_eq!(g(5).aperture_last(), (1 << 57) - 1);
        assert_eq!(g(6).aperture_last(), u64::MAX);
        assert_eq!((g(4).levels(), g(4).top_level(), g(6).covered_bits()), (4, 3, 66));
        assert_eq!(g(4).output_bits(), 52);
    }

    #[test]
    fn levels_covering_widths() {
        let cases = [(0, 1), (12, 1), (21, 1), (22, 2), (39, 3), (40, 4), (48, 4), (49, 5), (57, 5), (58, 6), (64, 6)];
        for (bits, levels) in cases {
            assert_eq!(Geometry::levels_covering(bits), levels, "{bits} bits");
        }
        // Nothing covers more than 66 bits; the answer stays at the most.
        assert_eq!(Geometry::levels_covering(100), MAX_LEVELS as u32);
    }

    #[test]
    fn shifts_and_sizes_per_level() {
        let geo = g(6);
        let shifts: [u32; 6] = core::array::from_fn(|l| geo.level_shift(l as u32));
        assert_eq!(shifts, [12, 21, 30, 39, 48, 57]);
        assert_eq!([0, 1, 2, 3].map(|l| geo.level_size(l)), [K4, M2, G1, T512]);
        assert_eq!(geo.level_size(5), 1 << 57);
        // The free functions and the methods agree.
        for l in 0..6 {
            assert_eq!(geo.level_size(l), level_size(l));
            assert_eq!(geo.level_shift(l), level_shift(l));
        }
    }

    #[test]
    fn index_of_an_iova_at_every_level() {
        let geo = g(4);
        // 3 in the root, 5 at level 2, 7 at level 1, 9 at level 0, plus an
        // offset inside the page.
        let iova = 3 * T512 + 5 * G1 + 7 * M2 + 9 * K4 + 0x123;
        assert_eq!([3, 2, 1, 0].map(|l| geo.index(iova, l)), [3, 5, 7, 9]);
        // The last entry of every table.
        let last = geo.aperture_last();
        assert_eq!([3, 2, 1, 0].map(|l| geo.index(last, l)), [511; 4]);
        // Bits above the tree do not leak into the root index.
        assert_eq!(geo.index((1 << 48) | (2 * T512), 3), 2);
    }

    #[test]
    fn top_of_the_64_bit_space() {
        let geo = g(6);
        assert_eq!(geo.aperture_last(), u64::MAX);
        // The sixth level translates bits 63:57, 128 of its 512 entries.
        assert_eq!(geo.root_entries(), 128);
        assert_eq!(geo.index(u64::MAX, 5), 127);
        assert_eq!([4, 3, 2, 1, 0].map(|l| geo.index(u64::MAX, l)), [511; 5]);
        assert_eq!(geo.index(1 << 63, 5), 64);
        assert_eq!(geo.index((1 << 57) - 1, 5), 0);
        assert_eq!(geo.index(1 << 57, 5), 1);
        // A narrower aperture on six levels: the root is used sparsely.
        let narrow = geo.with_input_bits(60);
        assert_eq!((narrow.aperture_last(), narrow.root_entries()), ((1 << 60) - 1, 8));
        // Wider than 64 bits is clamped to the space.
        assert_eq!(geo.with_input_bits(70).input_bits(), 64);
    }

    #[test]
    fn root_entries_follow_the_aperture() {
        assert_eq!(g(3).root_entries(), 512);
        assert_eq!(g(4).root_entries(), 512);
        assert_eq!(g(5).root_entries(), 512);
        // x86 first stage: the lower canonical half.
        assert_eq!(g(4).with_input_bits(47).root_entries(), 256);
        assert_eq!(g(5).with_input_bits(56).root_entries(), 256);
        // A 4-level tree limited to 39 bits reaches one root entry.
        assert_eq!(g(4).with_input_bits(39).root_entries(), 1);
    }

    #[test]
    fn input_and_output_widths_clamp() {
        // VT-d CAP.MGAW below and above the levels.
        assert_eq!(g(4).with_input_bits(39).aperture_last(), T512 - 1);
        assert_eq!(g(3).with_input_bits(48).aperture_last(), T512 - 1);
        assert_eq!(g(4).with_input_bits(3).input_bits(), 12);
        assert_eq!(g(4).with_input_bits(3).aperture_last(), K4 - 1);
        assert_eq!(g(4).with_output_bits(60).output_bits(), 52);
        assert_eq!(g(4).with_output_bits(40).output_bits(), 40);
    }

    #[test]
    fn page_size_bitmaps() {
        assert_eq!(g(4).page_sizes(), K4);
        assert_eq!(g(4).with_large_pages(true, true).page_sizes(), K4 | M2 | G1);
        assert_eq!(g(4).with_large_pages(true, false).page_sizes(), K4 | M2);
        // The bitmap says what the unit allows; the engine additionally
        // drops 1 GiB without 2 MiB (it splits one level at a time).
        assert_eq!(g(4).with_large_pages(false, true).page_sizes(), K4 | G1);
        assert_eq!(g(4).with_large_pages(false, true).leaf_levels(), 0b101);
        // Level 0 always holds leaves.
        assert_eq!(g(4).with_leaf_levels(0b110).leaf_levels(), 0b111);
        // Levels the tree does not have are not in the bitmap.
        assert_eq!(g(2).with_large_pages(true, true).page_sizes(), K4 | M2);
        assert_eq!(g(2).with_large_pages(true, true).leaf_levels(), 0b111);
        // AMD's six levels with leaves at every level below the root.
        let all = g(6).with_leaf_levels(0b11_1111);
        assert_eq!(all.page_sizes(), K4 | M2 | G1 | T512 | (1 << 48) | (1 << 57));
        assert_eq!(sizes_of_leaf_levels(0b111), K4 | M2 | G1);
    }

    #[test]
    fn each_format_holds_its_geometry() {
        use crate::{AmdV1, PtFormat, VtdSecondStage, X86FirstStage};
        // VT-d second stage: 3, 4, 5 levels, the whole space they cover.
        for levels in 3..=5 {
            let f = VtdSecondStage::new(levels).unwrap();
            assert_eq!(*f.geometry(), g(levels).with_large_pages(true, true));
        }
        let f = VtdSecondStage::from_caps([39, 48], 46, true, false, false).unwrap();
        assert_eq!(*f.geometry(), g(4).with_input_bits(46).with_large_pages(true, false));
        // x86 first stage: the lower canonical half, 2 MiB pages.
        let fs = X86FirstStage::four_level();
        assert_eq!(*fs.geometry(), g(4).with_input_bits(47).with_large_pages(true, false));
        assert_eq!(fs.geometry().aperture_last(), 0x7fff_ffff_ffff);
        let fs5 = X86FirstStage::five_level().with_1g_pages(true).with_output_bits(46);
        assert_eq!(*fs5.geometry(), g(5).with_input_bits(56).with_large_pages(true, true).with_output_bits(46));
        // AMD v1: 3 to 6 levels, six reaching the top of the 64-bit space.
        for levels in 3..=6 {
            let f = AmdV1::new(levels).unwrap();
            assert_eq!(*f.geometry(), g(levels).with_large_pages(true, true));
            assert_eq!(f.aperture_last(), f.geometry().aperture_last());
        }
        let top = AmdV1::new(6).unwrap();
        assert_eq!((top.aperture_last(), top.geometry().root_entries()), (u64::MAX, 128));
        // AMD keeps 1 GiB pages only together with 2 MiB ones.
        let amd = AmdV1::new(4).unwrap().with_large_pages(false, true);
        assert_eq!(amd.geometry().page_sizes(), K4);
    }
}
