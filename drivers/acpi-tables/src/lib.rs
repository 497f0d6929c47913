//! Bounds-checked parsers for the two ACPI tables that describe IOMMUs:
//!
//! * [`dmar`] — the DMA Remapping Reporting table (Intel VT-d specification,
//!   revision 4.x, chapter 8);
//! * [`ivrs`] — the I/O Virtualization Reporting Structure (AMD I/O
//!   Virtualization Technology specification, revision 3.x, chapter 5).
//!
//! [`scope`] turns a DMAR device scope (start bus plus a path of
//! device/function hops through PCI-PCI bridges) into a bus/device/function
//! by walking PCI configuration space through a caller-supplied accessor.
//!
//! # Robustness
//!
//! Input is firmware-provided and untrusted. Every parser:
//!
//! * checks the table signature, that the header's `length` fits inside the
//!   given slice, and that all `length` bytes sum to zero (the checksum);
//! * bounds every structure and entry length against its parent before
//!   reading anything inside it, and rejects zero lengths and lengths shorter
//!   than the structure's fixed part, so every loop makes progress;
//! * reports any problem as an [`Error`] naming the byte offset (from the
//!   start of the table), the structure being decoded and what is wrong;
//! * never panics, and allocates at most a small constant times the table
//!   length (every allocated element consumes at least two input bytes).
//!
//! Structure types the parser does not know are kept as `Unknown` records
//! and skipped by their length; they are not errors.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

use core::fmt;

pub mod dmar;
pub mod ivrs;
pub mod scope;

/// Size of the standard ACPI system description table header.
pub const SDT_HEADER_LEN: usize = 36;

/// A parse failure: where it happened, in which structure, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// Byte offset from the start of the table of the structure (or field)
    /// that is bad.
    pub offset: usize,
    /// Name of the structure being decoded ("table header", "DRHD",
    /// "device scope", "IVHD entry", ...).
    pub structure: &'static str,
    /// What is wrong.
    pub kind: ErrorKind,
}

/// The different ways a table can be malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input slice ends before the data the structure needs.
    Truncated {
        /// Bytes the structure needs from `offset`.
        needed: usize,
        /// Bytes actually available from `offset`.
        available: usize,
    },
    /// A length field is zero, shorter than the structure's fixed part, or
    /// not a size the structure can have.
    BadLength {
        /// The length found.
        length: usize,
        /// The smallest length the structure can have.
        min: usize,
    },
    /// A structure's length runs past the end of its parent.
    Overrun {
        /// The structure's length.
        length: usize,
        /// Bytes left in the parent from `offset`.
        available: usize,
    },
    /// The table bytes do not sum to zero.
    BadChecksum {
        /// The 8-bit sum of all bytes (should be 0).
        sum: u8,
    },
    /// The table signature is not the expected one.
    BadSignature {
        /// The signature that was expected.
        expected: [u8; 4],
        /// The signature found.
        found: [u8; 4],
    },
    /// An IVHD device entry type whose size is not defined by the
    /// specification (variable-length types other than 0xF0), so the rest of
    /// the block cannot be decoded.
    UnknownEntrySize {
        /// The entry type.
        entry_type: u8,
    },
    /// A range-start IVHD entry not followed by an end-of-range entry.
    UnpairedRangeStart,
    /// An end-of-range IVHD entry without a preceding range start.
    UnpairedRangeEnd,
    /// A device range whose last device ID is below its first.
    InvertedRange {
        /// First device ID of the range.
        first: u16,
        /// Last device ID of the range.
        last: u16,
    },
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ErrorKind::Truncated { needed, available } => {
                write!(f, "truncated: needs {needed} bytes but only {available} are available")
            }
            ErrorKind::BadLength { length, min } => {
                if length < min {
                    write!(f, "bad length {length} (shorter than the minimum of {min})")
                } else {
                    write!(f, "bad length {length} (not a valid size; minimum {min})")
                }
            }
            ErrorKind::Overrun { length, available } => {
                write!(f, "length {length} overruns its parent ({available} bytes left)")
            }
            ErrorKind::BadChecksum { sum } => {
                write!(f, "bad checksum (bytes sum to {sum:#04x}, expected 0)")
            }
            ErrorKind::BadSignature { expected, found } => {
                write!(f, "bad signature {} (expected {})", Sig(&found), Sig(&expected))
            }
            ErrorKind::UnknownEntrySize { entry_type } => {
                write!(f, "entry type {entry_type:#04x} has no defined size; cannot continue")
            }
            ErrorKind::UnpairedRangeStart => {
                write!(f, "range start not followed by an end-of-range entry")
            }
            ErrorKind::UnpairedRangeEnd => {
                write!(f, "end-of-range entry without a preceding range start")
            }
            ErrorKind::InvertedRange { first, last } => {
                write!(f, "range {first:#06x}..={last:#06x} ends before it starts")
            }
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at offset {:#x}: {}", self.structure, self.offset, self.kind)
    }
}

impl core::error::Error for Error {}

/// Prints a 4-byte signature, escaping anything that is not printable ASCII.
struct Sig<'a>(&'a [u8]);

impl fmt::Display for Sig<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for &b in self.0 {
            if b.is_ascii_graphic() || b == b' ' {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_str("\"")
    }
}

/// The standard 36-byte header of an ACPI system description table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdtHeader {
    pub signature: [u8; 4],
    pub length: u32,
    pub revision: u8,
    pub checksum: u8,
    pub oem_id: [u8; 6],
    pub oem_table_id: [u8; 8],
    pub oem_revision: u32,
    pub creator_id: [u8; 4],
    pub creator_revision: u32,
}

impl SdtHeader {
    /// Decodes the header at the start of `bytes` without validating
    /// anything but its size.
    pub fn read(bytes: &[u8]) -> Result<SdtHeader, Error> {
        let r = Reader::new(bytes, 0, "table header");
        r.need(0, SDT_HEADER_LEN)?;
        Ok(SdtHeader {
            signature: r.array(0)?,
            length: r.u32(4)?,
            revision: r.u8(8)?,
            checksum: r.u8(9)?,
            oem_id: r.array(10)?,
            oem_table_id: r.array(16)?,
            oem_revision: r.u32(24)?,
            creator_id: r.array(28)?,
            creator_revision: r.u32(32)?,
        })
    }
}

/// Validates the header of a table with signature `sig` whose body needs at
/// least `min_len` bytes, and returns the header together with exactly the
/// `length` bytes of the table.
pub(crate) fn checked_table<'a>(
    bytes: &'a [u8],
    sig: &[u8; 4],
    min_len: usize,
) -> Result<(SdtHeader, &'a [u8]), Error> {
    let header = SdtHeader::read(bytes)?;
    if &header.signature != sig {
        return Err(Error {
            offset: 0,
            structure: "table header",
            kind: ErrorKind::BadSignature { expected: *sig, found: header.signature },
        });
    }
    let length = header.length as usize;
    if length < min_len {
        return Err(Error {
            offset: 4,
            structure: "table header",
            kind: ErrorKind::BadLength { length, min: min_len },
        });
    }
    let Some(table) = bytes.get(..length) else {
        return Err(Error {
            offset: 0,
            structure: "table header",
            kind: ErrorKind::Truncated { needed: length, available: bytes.len() },
        });
    };
    let sum = table.iter().fold(0u8, |acc, &b| acc.wrapping_add(b));
    if sum != 0 {
        return Err(Error { offset: 9, structure: "table header", kind: ErrorKind::BadChecksum { sum } });
    }
    Ok((header, table))
}

/// Recomputes the checksum byte (offset 9) of a table so its first
/// `length` bytes sum to zero. Does nothing if the slice is shorter than the
/// header or than the length field says. Useful for building test tables.
pub fn fix_checksum(table: &mut [u8]) {
    let Ok(h) = SdtHeader::read(table) else {
        return;
    };
    let Some(body) = table.get_mut(..h.length as usize) else {
        return;
    };
    if body.len() < SDT_HEADER_LEN {
        return;
    }
    body[9] = 0;
    let sum = body.iter().fold(0u8, |acc, &b| acc.wrapping_add(b));
    body[9] = 0u8.wrapping_sub(sum);
}

/// Little-endian field reader over a structure `[base, base + bytes.len())`
/// of a table; offsets passed to it are relative to the structure, offsets
/// in errors are absolute (from the start of the table).
#[derive(Clone, Copy)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    base: usize,
    structure: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], base: usize, structure: &'static str) -> Self {
        Reader { bytes, base, structure }
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn err(&self, rel: usize, kind: ErrorKind) -> Error {
        Error { offset: self.base.saturating_add(rel), structure: self.structure, kind }
    }

    /// Ensures `n` bytes are available at `rel`.
    pub(crate) fn need(&self, rel: usize, n: usize) -> Result<&'a [u8], Error> {
        rel.checked_add(n).and_then(|end| self.bytes.get(rel..end)).ok_or_else(|| {
            self.err(rel, ErrorKind::Truncated { needed: n, available: self.bytes.len().saturating_sub(rel) })
        })
    }

    pub(crate) fn array<const N: usize>(&self, rel: usize) -> Result<[u8; N], Error> {
        let s = self.need(rel, N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    pub(crate) fn u8(&self, rel: usize) -> Result<u8, Error> {
        Ok(self.array::<1>(rel)?[0])
    }

    pub(crate) fn u16(&self, rel: usize) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array(rel)?))
    }

    pub(crate) fn u32(&self, rel: usize) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array(rel)?))
    }

    pub(crate) fn u64(&self, rel: usize) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array(rel)?))
    }

    /// The sub-structure `[rel, rel + len)` named `structure`, after checking
    /// that `len` is at least `min` and fits in this structure.
    pub(crate) fn sub(&self, rel: usize, len: usize, min: usize, structure: &'static str) -> Result<Reader<'a>, Error> {
        let abs = self.base.saturating_add(rel);
        let available = self.bytes.len().saturating_sub(rel);
        if len < min || len == 0 {
            return Err(Error { offset: abs, structure, kind: ErrorKind::BadLength { length: len, min: min.max(1) } });
        }
        if len > available {
            return Err(Error { offset: abs, structure, kind: ErrorKind::Overrun { length: len, available } });
        }
        Ok(Reader { bytes: &self.bytes[rel..rel + len], base: abs, structure })
    }

    /// Checks that the `n`-byte header of a sub-structure named `structure`
    /// at `rel` fits in this structure (a "Truncated" error otherwise).
    pub(crate) fn header_fits(&self, rel: usize, n: usize, structure: &'static str) -> Result<(), Error> {
        let available = self.bytes.len().saturating_sub(rel);
        if available < n {
            return Err(Error {
                offset: self.base.saturating_add(rel),
                structure,
                kind: ErrorKind::Truncated { needed: n, available },
            });
        }
        Ok(())
    }

    pub(crate) fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub(crate) fn base(&self) -> usize {
        self.base
    }
}

/// Renders a byte string as ASCII up to the first NUL; other non-ASCII bytes
/// map to the Unicode code point of the same value (Latin-1), so no byte is
/// lost.
pub(crate) fn ascii_until_nul(bytes: &[u8]) -> alloc::string::String {
    bytes.iter().take_while(|&&b| b != 0).map(|&b| char::from(b)).collect()
}
