//! The format seam: what the engine needs to know about one kind of page
//! table entry.
//!
//! Invariants every [`PtFormat`] must keep (the engine relies on them and
//! the unit tests of each format check them):
//! * The zero entry is not present, at every level. Freshly allocated
//!   tables are zero, so they translate nothing.
//! * `is_present(table_entry(t, l))` and `!is_leaf(table_entry(t, l), l)`;
//!   `is_present(leaf_entry(p, l, prot))` and `is_leaf(leaf_entry(..), l)`
//!   for every prot the format accepts ([`PtFormat::accepts`]).
//! * Round trip: `table_address(table_entry(t, l)) == t`,
//!   `leaf_address(leaf_entry(p, l, prot), l) == p` and
//!   `leaf_entry(leaf_address(e, l), l, leaf_prot(e))` rebuilds a leaf `e`
//!   up to the level-dependent bits, which is how the engine splits a large
//!   page into smaller ones that translate identically.
//! * Every level-0 entry that is present is a leaf.
//! * The address is a plain field: `leaf_entry(p + level_size(l), l, prot)
//!   == leaf_entry(p, l, prot) + level_size(l)`, so the engine writes a run
//!   of leaves by adding the page size ([`crate::TableMemory::fill`]).
//! * A non-present entry the engine writes is 0 (it never leaves other
//!   bits behind), so "nonzero" and "present" agree for the engine's own
//!   entries.

use crate::geometry::Geometry;
use core::fmt;
use portcullis_iommu::Prot;

/// One page-table format: the geometry of the tree and the encoding of its
/// entries.
///
/// The geometry (levels, aperture, output width, leaf levels) is one
/// [`Geometry`] the format holds and returns from [`PtFormat::geometry`];
/// the four geometry methods below answer from it and are not meant to be
/// overridden. Every format shares the granule: 4 KiB tables of 512 64-bit
/// entries, 9 IOVA bits per level, level 0 holding 4 KiB pages, so level
/// `l` entries each cover `1 << (12 + 9 * l)` bytes and the root table
/// holds entries of level `levels() - 1`.
///
/// Methods take `&self` because some properties are per unit rather than
/// per format (the number of levels from CAP.SAGAW, large pages from
/// CAP.SLLPS, snoop control from ECAP.SC). They are small and the engine is
/// generic over the format, so they inline into the walk.
///
/// Formats without a page-size bit (AMD-Vi v1 encodes the level of the
/// next table in each entry) compute it from the level, which is why
/// [`PtFormat::table_entry`] and [`PtFormat::leaf_entry`] receive the level
/// of the entry being built and [`PtFormat::is_leaf`] the level being
/// decoded.
pub trait PtFormat: fmt::Debug {
    /// The shape of the tree: levels, aperture, output width, leaf levels.
    fn geometry(&self) -> &Geometry;

    /// Levels of the tree (3 for a 39-bit VT-d second stage, 4 for 48-bit).
    #[inline]
    fn levels(&self) -> u32 {
        self.geometry().levels()
    }

    /// Last IOVA (inclusive) the tree may translate; the aperture starts
    /// at 0. At most `(1 << (12 + 9 * levels())) - 1`, less where the unit
    /// translates fewer bits (CAP.MGAW) or the format needs canonical
    /// addresses (x86 first stage keeps to the lower half).
    #[inline]
    fn aperture_last(&self) -> u64 {
        self.geometry().aperture_last()
    }

    /// Width of the output (physical) addresses the entries can hold.
    #[inline]
    fn output_bits(&self) -> u32 {
        self.geometry().output_bits()
    }

    /// Bit `l` set when a present level-`l` entry may be a leaf. Bit 0 is
    /// always set.
    #[inline]
    fn leaf_levels(&self) -> u32 {
        self.geometry().leaf_levels()
    }

    /// Whether the format can express the permissions `prot` (at least one
    /// of read and write).
    fn accepts(&self, prot: Prot) -> bool {
        prot.readable() || prot.writable()
    }

    /// Whether `pte` is present (points at a table or maps a page).
    fn is_present(&self, pte: u64) -> bool;

    /// Whether the present entry `pte` at `level` maps a page rather than
    /// pointing at the next table.
    fn is_leaf(&self, pte: u64, level: u32) -> bool;

    /// Physical address of the next table of the present non-leaf `pte`.
    fn table_address(&self, pte: u64) -> u64;

    /// Physical address of the page mapped by the present leaf `pte`.
    fn leaf_address(&self, pte: u64, level: u32) -> u64;

    /// Permissions of the present leaf `pte`, as the hardware applies them
    /// (for example a write-only request maps as read-write on x86 first
    /// stage, which cannot express write without read).
    fn leaf_prot(&self, pte: u64) -> Prot;

    /// A level-`level` entry pointing at the table at `table`.
    fn table_entry(&self, table: u64, level: u32) -> u64;

    /// A level-`level` leaf mapping `phys` with `prot`. `phys` is aligned to
    /// the level's page size and fits [`PtFormat::output_bits`]. The
    /// address goes into the entry as it is, beside bits that depend only
    /// on `level` and `prot`: `leaf_entry(phys, l, p)` is
    /// `phys | leaf_entry(0, l, p)` (the engine builds runs of small leaves
    /// that way; `tests/formats.rs` checks it for every format).
    fn leaf_entry(&self, phys: u64, level: u32, prot: Prot) -> u64;

    /// Whether a leaf can force snooping ([`Prot::CACHE`] is honoured).
    fn snoop_control(&self) -> bool {
        false
    }

    /// The bit the walker sets in a leaf when a device writes through it,
    /// if this format was made to track writes (VT-d second stage with
    /// SSADS, AMD v1 with host dirty, x86 first stage); 0, the default,
    /// when it records none. The bit is not part of the address,
    /// permissions or leaf-ness of an entry, and [`Self::leaf_entry`]
    /// never sets it: a fresh mapping is clean.
    fn dirty_bit(&self) -> u64 {
        0
    }

    /// Writes a decoded form of `pte` at `level` (used by [`Entry`]'s
    /// `Debug`).
    fn fmt_entry(&self, pte: u64, level: u32, f: &mut fmt::Formatter<'_>) -> fmt::Result;
}

/// A raw entry together with its format and level, whose `Debug` decodes
/// the fields.
#[derive(Clone, Copy)]
pub struct Entry<'a, F: PtFormat> {
    /// The format that decodes the entry.
    pub format: &'a F,
    /// The level the entry sits at.
    pub level: u32,
    /// The raw 64-bit value.
    pub raw: u64,
}

impl<F: PtFormat> fmt::Debug for Entry<'_, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{} {:#018x} ", self.level, self.raw)?;
        if !self.format.is_present(self.raw) {
            return write!(f, "(not present)");
        }
        self.format.fmt_entry(self.raw, self.level, f)
    }
}
