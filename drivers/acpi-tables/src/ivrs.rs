//! The I/O Virtualization Reporting Structure (IVRS), AMD IOMMU
//! specification chapter 5.
//!
//! Layout: the 36-byte ACPI header, IVinfo (4 bytes), 8 reserved bytes, then
//! IVHD (hardware definition) and IVMD (memory definition) blocks back to
//! back, each starting with an 8-bit type, 8-bit flags and a 16-bit length.
//!
//! IVHD device entries have no length field: the entry type determines the
//! size. Types 0x00–0x3F are 4 bytes, 0x40–0x7F are 8 bytes, and types from
//! 0x80 up are variable-length; the only variable-length type defined so far
//! is 0xF0 (ACPI HID device), whose size is 22 bytes plus the UID length
//! stored in its byte 21. Any other variable-length type cannot be skipped
//! and is reported as [`ErrorKind::UnknownEntrySize`].

use alloc::string::String;
use alloc::vec::Vec;
use bitflags::bitflags;

use crate::{Error, ErrorKind, Reader, checked_table};

bitflags! {
    /// IVHD flags (AMD IOMMU spec chapter 5, IVHD block byte 1): how the
    /// platform set up the IOMMU's HyperTransport and coherency controls,
    /// and what it supports. Parsed values keep every bit.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct IvhdFlags: u8 {
        /// HtTunEn: HyperTransport tunnel translation.
        const HT_TUN_EN = 1 << 0;
        /// PassPW: posted-write ordering pass.
        const PASS_PW = 1 << 1;
        /// ResPassPW: response pass posted write.
        const RES_PASS_PW = 1 << 2;
        /// Isoc: isochronous traffic.
        const ISOC = 1 << 3;
        /// IotlbSup: the IOMMU supports remote IOTLBs (ATS).
        const IOTLB_SUP = 1 << 4;
        /// Coherent: the IOMMU's table walks snoop processor caches.
        const COHERENT = 1 << 5;
        /// PreFSup: prefetch IOMMU pages command supported.
        const PREF_SUP = 1 << 6;
        /// PPRSup: peripheral page requests supported.
        const PPR_SUP = 1 << 7;
    }
}

bitflags! {
    /// IVMD flags (AMD IOMMU spec chapter 5, IVMD block byte 1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct IvmdFlags: u8 {
        /// Unity: the range must be identity-mapped for the devices, with
        /// the IR and IW permissions.
        const UNITY = 1 << 0;
        /// IR: devices may read the unity range.
        const IR = 1 << 1;
        /// IW: devices may write the unity range.
        const IW = 1 << 2;
        /// ExclusionRange: the range is accessed untranslated (read-write).
        const EXCLUSION_RANGE = 1 << 3;
    }
}

/// Offset of the first IVHD/IVMD block.
pub const BLOCKS_OFFSET: usize = 48;

/// IVHD with the legacy (IOMMU feature reporting) layout.
pub const IVHD_TYPE_10: u8 = 0x10;
/// IVHD with the EFR register image, fixed device entries.
pub const IVHD_TYPE_11: u8 = 0x11;
/// IVHD with the EFR register image, also describing ACPI HID devices.
pub const IVHD_TYPE_40: u8 = 0x40;
/// IVMD applying to all devices.
pub const IVMD_TYPE_ALL: u8 = 0x20;
/// IVMD applying to one device.
pub const IVMD_TYPE_SELECT: u8 = 0x21;
/// IVMD applying to a device ID range (`device_id..=aux_data`).
pub const IVMD_TYPE_RANGE: u8 = 0x22;

/// Special device entry varieties.
pub const VARIETY_IOAPIC: u8 = 1;
pub const VARIETY_HPET: u8 = 2;

/// IVHD device entry type codes.
pub const ENTRY_PAD4: u8 = 0x00;
pub const ENTRY_ALL: u8 = 0x01;
pub const ENTRY_SELECT: u8 = 0x02;
pub const ENTRY_START_RANGE: u8 = 0x03;
pub const ENTRY_END_RANGE: u8 = 0x04;
pub const ENTRY_PAD8: u8 = 0x40;
pub const ENTRY_ALIAS_SELECT: u8 = 0x42;
pub const ENTRY_ALIAS_START_RANGE: u8 = 0x43;
pub const ENTRY_EXT_SELECT: u8 = 0x46;
pub const ENTRY_EXT_START_RANGE: u8 = 0x47;
pub const ENTRY_SPECIAL: u8 = 0x48;
pub const ENTRY_ACPI_HID: u8 = 0xF0;

/// UID formats of an ACPI HID entry.
pub const UID_NONE: u8 = 0;
pub const UID_INTEGER: u8 = 1;
pub const UID_STRING: u8 = 2;

/// A decoded IVRS table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ivrs {
    pub header: crate::SdtHeader,
    /// IVinfo: virtual/physical/guest address sizes, ATS range flag, ...
    pub iv_info: u32,
    /// The blocks in table order.
    pub blocks: Vec<Block>,
}

/// One IVRS block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    Ivhd(Ivhd),
    Ivmd(Ivmd),
    /// A block type this parser does not know; skipped by its length.
    Unknown {
        kind: u8,
        offset: usize,
        length: u16,
    },
}

/// I/O virtualization hardware definition block (types 0x10, 0x11, 0x40).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ivhd {
    pub offset: usize,
    /// 0x10, 0x11 or 0x40.
    pub kind: u8,
    /// The raw flags byte; [`Ivhd::flags`] decodes it.
    pub flags: u8,
    /// PCI requester ID of the IOMMU itself.
    pub device_id: u16,
    /// Offset of the IOMMU's capability block in its config space.
    pub capability_offset: u16,
    /// MMIO base of the IOMMU's registers.
    pub base_address: u64,
    pub segment: u16,
    /// IOMMU info (MSI number, unit ID).
    pub info: u16,
    /// The 32-bit field at offset 20: "IOMMU feature reporting" for type
    /// 0x10, "IOMMU attributes" for types 0x11/0x40.
    pub feature: u32,
    /// Image of the Extended Feature Register (types 0x11/0x40).
    pub efr: Option<u64>,
    /// Image of the Extended Feature 2 Register (types 0x11/0x40; reserved,
    /// usually zero, in older firmware).
    pub efr2: Option<u64>,
    pub entries: Vec<DeviceEntry>,
}

/// One IVHD device entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    /// Offset of the entry from the start of the table.
    pub offset: usize,
    pub entry_type: u8,
    pub kind: EntryKind,
}

/// Decoded content of an IVHD device entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// Type 0x00: 4-byte padding.
    Pad4,
    /// Type 0x01: applies to every device ID.
    All { data_setting: u8 },
    /// Type 0x02: one device.
    Select { device_id: u16, data_setting: u8 },
    /// Type 0x03: first device of a range closed by the next `EndRange`.
    StartRange { device_id: u16, data_setting: u8 },
    /// Type 0x04: last device of a range.
    EndRange { device_id: u16 },
    /// Type 0x42: one device whose requests carry the alias ID.
    AliasSelect { device_id: u16, data_setting: u8, alias: u16 },
    /// Type 0x43: range start with an alias ID.
    AliasStartRange { device_id: u16, data_setting: u8, alias: u16 },
    /// Type 0x46: one device with extended settings.
    ExtSelect { device_id: u16, data_setting: u8, ext: u32 },
    /// Type 0x47: range start with extended settings.
    ExtStartRange { device_id: u16, data_setting: u8, ext: u32 },
    /// Type 0x48: an IOAPIC or HPET (`variety` 1 or 2) with the given
    /// handle (IOAPIC ID / HPET number) whose interrupts carry `device_id`.
    Special { handle: u8, device_id: u16, data_setting: u8, variety: u8 },
    /// Type 0xF0: an ACPI device named by HID/CID/UID.
    AcpiHid {
        device_id: u16,
        data_setting: u8,
        /// Hardware ID as stored (ASCII, e.g. `AMDI0020`, or an integer).
        hid: [u8; 8],
        /// Compatible ID as stored (all zero if absent).
        cid: [u8; 8],
        uid: Uid,
    },
    /// Type 0x40: 8-byte padding.
    Pad8,
    /// A reserved type of known size (4 or 8 bytes); skipped.
    Reserved { length: u8 },
}

/// Unique ID of an ACPI HID entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uid {
    /// Format 0: no UID.
    None,
    /// Format 1: an integer (little-endian, up to 8 bytes).
    Integer(u64),
    /// Format 2: an ASCII string (up to its first NUL).
    String(String),
    /// Any other format, or an integer longer than 8 bytes: the raw bytes.
    Other { format: u8, bytes: Vec<u8> },
}

impl EntryKind {
    /// Short snake-case name ("select", "start_range", "acpi_hid", ...).
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::Pad4 => "pad4",
            EntryKind::All { .. } => "all",
            EntryKind::Select { .. } => "select",
            EntryKind::StartRange { .. } => "start_range",
            EntryKind::EndRange { .. } => "end_range",
            EntryKind::AliasSelect { .. } => "alias_select",
            EntryKind::AliasStartRange { .. } => "alias_start_range",
            EntryKind::ExtSelect { .. } => "ext_select",
            EntryKind::ExtStartRange { .. } => "ext_start_range",
            EntryKind::Special { .. } => "special",
            EntryKind::AcpiHid { .. } => "acpi_hid",
            EntryKind::Pad8 => "pad8",
            EntryKind::Reserved { .. } => "reserved",
        }
    }

    /// The device ID the entry names, if any (for `Special`, the source ID).
    pub fn device_id(&self) -> Option<u16> {
        match *self {
            EntryKind::Select { device_id, .. }
            | EntryKind::StartRange { device_id, .. }
            | EntryKind::EndRange { device_id }
            | EntryKind::AliasSelect { device_id, .. }
            | EntryKind::AliasStartRange { device_id, .. }
            | EntryKind::ExtSelect { device_id, .. }
            | EntryKind::ExtStartRange { device_id, .. }
            | EntryKind::Special { device_id, .. }
            | EntryKind::AcpiHid { device_id, .. } => Some(device_id),
            _ => None,
        }
    }

    /// The DTE data setting of the entry, if it has one.
    pub fn data_setting(&self) -> Option<u8> {
        match *self {
            EntryKind::All { data_setting }
            | EntryKind::Select { data_setting, .. }
            | EntryKind::StartRange { data_setting, .. }
            | EntryKind::AliasSelect { data_setting, .. }
            | EntryKind::AliasStartRange { data_setting, .. }
            | EntryKind::ExtSelect { data_setting, .. }
            | EntryKind::ExtStartRange { data_setting, .. }
            | EntryKind::Special { data_setting, .. }
            | EntryKind::AcpiHid { data_setting, .. } => Some(data_setting),
            _ => None,
        }
    }
}

/// A resolved run of device IDs sharing one DTE setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRange {
    pub first: u16,
    /// Inclusive.
    pub last: u16,
    pub data_setting: u8,
    /// Requester ID the devices' requests appear with, if aliased.
    pub alias: Option<u16>,
    /// Extended setting of `ExtSelect` / `ExtStartRange` entries.
    pub ext: Option<u32>,
}

/// I/O virtualization memory definition block (types 0x20, 0x21, 0x22).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ivmd {
    pub offset: usize,
    pub kind: u8,
    /// The raw flags byte; [`Ivmd::flags`] decodes it.
    pub flags: u8,
    pub device_id: u16,
    /// For type 0x22 the last device ID of the range; otherwise reserved.
    pub aux_data: u16,
    pub start: u64,
    pub length: u64,
}

impl Ivmd {
    /// The flags, decoded (reserved bits kept).
    pub fn flags(&self) -> IvmdFlags {
        IvmdFlags::from_bits_retain(self.flags)
    }
}

impl Ivrs {
    /// Parses a whole IVRS table (header included) from `bytes`. Bytes past
    /// the header's length are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Ivrs, Error> {
        let (header, table) = checked_table(bytes, b"IVRS", BLOCKS_OFFSET)?;
        let t = Reader::new(table, 0, "IVRS");
        let iv_info = t.u32(36)?;
        let mut blocks = Vec::new();
        let mut pos = BLOCKS_OFFSET;
        while pos < t.len() {
            t.header_fits(pos, 4, "IVRS block")?;
            let kind = t.u8(pos)?;
            let length = t.u16(pos + 2)?;
            blocks.push(parse_block(&t, pos, kind, length)?);
            pos += usize::from(length);
        }
        Ok(Ivrs { header, iv_info, blocks })
    }

    /// The IVHD blocks in table order (an IOMMU described by several IVHD
    /// types appears once per type).
    pub fn ivhds(&self) -> impl Iterator<Item = &Ivhd> {
        self.blocks.iter().filter_map(|b| match b {
            Block::Ivhd(h) => Some(h),
            _ => None,
        })
    }

    /// The IVMD blocks in table order.
    pub fn ivmds(&self) -> impl Iterator<Item = &Ivmd> {
        self.blocks.iter().filter_map(|b| match b {
            Block::Ivmd(m) => Some(m),
            _ => None,
        })
    }
}

fn parse_block(t: &Reader<'_>, pos: usize, kind: u8, length: u16) -> Result<Block, Error> {
    let len = usize::from(length);
    match kind {
        IVHD_TYPE_10 | IVHD_TYPE_11 | IVHD_TYPE_40 => {
            let (name, fixed) = if kind == IVHD_TYPE_10 {
                ("IVHD type 0x10", 24)
            } else if kind == IVHD_TYPE_11 {
                ("IVHD type 0x11", 40)
            } else {
                ("IVHD type 0x40", 40)
            };
            let b = t.sub(pos, len, fixed, name)?;
            let (efr, efr2) = if kind == IVHD_TYPE_10 { (None, None) } else { (Some(b.u64(24)?), Some(b.u64(32)?)) };
            Ok(Block::Ivhd(Ivhd {
                offset: b.base(),
                kind,
                flags: b.u8(1)?,
                device_id: b.u16(4)?,
                capability_offset: b.u16(6)?,
                base_address: b.u64(8)?,
                segment: b.u16(16)?,
                info: b.u16(18)?,
                feature: b.u32(20)?,
                efr,
                efr2,
                entries: parse_entries(&b, fixed)?,
            }))
        }
        IVMD_TYPE_ALL | IVMD_TYPE_SELECT | IVMD_TYPE_RANGE => {
            let b = t.sub(pos, len, 32, "IVMD")?;
            Ok(Block::Ivmd(Ivmd {
                offset: b.base(),
                kind,
                flags: b.u8(1)?,
                device_id: b.u16(4)?,
                aux_data: b.u16(6)?,
                start: b.u64(16)?,
                length: b.u64(24)?,
            }))
        }
        _ => {
            let b = t.sub(pos, len, 4, "IVRS block")?;
            Ok(Block::Unknown { kind, offset: b.base(), length })
        }
    }
}

/// Size of the device entry of type `ty` at `pos` in block `b`, or the
/// error explaining why it cannot be sized.
fn entry_len(b: &Reader<'_>, pos: usize, ty: u8) -> Result<usize, Error> {
    match ty {
        0x00..=0x3f => Ok(4),
        0x40..=0x7f => Ok(8),
        ENTRY_ACPI_HID => {
            b.header_fits(pos, 22, "IVHD entry")?;
            Ok(22 + usize::from(b.u8(pos + 21)?))
        }
        _ => Err(Error {
            offset: b.base().saturating_add(pos),
            structure: "IVHD entry",
            kind: ErrorKind::UnknownEntrySize { entry_type: ty },
        }),
    }
}

fn parse_entries(b: &Reader<'_>, start: usize) -> Result<Vec<DeviceEntry>, Error> {
    let mut entries = Vec::new();
    let mut pos = start;
    while pos < b.len() {
        let ty = b.u8(pos)?;
        let len = entry_len(b, pos, ty)?;
        let e = b.sub(pos, len, 4, "IVHD entry")?;
        let device_id = e.u16(1)?;
        let data_setting = e.u8(3)?;
        let kind = match ty {
            ENTRY_PAD4 => EntryKind::Pad4,
            ENTRY_ALL => EntryKind::All { data_setting },
            ENTRY_SELECT => EntryKind::Select { device_id, data_setting },
            ENTRY_START_RANGE => EntryKind::StartRange { device_id, data_setting },
            ENTRY_END_RANGE => EntryKind::EndRange { device_id },
            ENTRY_PAD8 => EntryKind::Pad8,
            ENTRY_ALIAS_SELECT => EntryKind::AliasSelect { device_id, data_setting, alias: e.u16(5)? },
            ENTRY_ALIAS_START_RANGE => EntryKind::AliasStartRange { device_id, data_setting, alias: e.u16(5)? },
            ENTRY_EXT_SELECT => EntryKind::ExtSelect { device_id, data_setting, ext: e.u32(4)? },
            ENTRY_EXT_START_RANGE => EntryKind::ExtStartRange { device_id, data_setting, ext: e.u32(4)? },
            ENTRY_SPECIAL => {
                EntryKind::Special { handle: e.u8(4)?, device_id: e.u16(5)?, data_setting, variety: e.u8(7)? }
            }
            ENTRY_ACPI_HID => {
                let format = e.u8(20)?;
                let raw = e.bytes().get(22..).unwrap_or(&[]);
                let uid = match format {
                    UID_NONE if raw.is_empty() => Uid::None,
                    UID_INTEGER if raw.len() <= 8 => {
                        let mut v = [0u8; 8];
                        v[..raw.len()].copy_from_slice(raw);
                        Uid::Integer(u64::from_le_bytes(v))
                    }
                    UID_STRING => Uid::String(crate::ascii_until_nul(raw)),
                    _ => Uid::Other { format, bytes: raw.to_vec() },
                };
                EntryKind::AcpiHid { device_id, data_setting, hid: e.array(4)?, cid: e.array(12)?, uid }
            }
            // Reserved types of 4 or 8 bytes (variable-length ones were
            // rejected by `entry_len`).
            _ => EntryKind::Reserved { length: len as u8 },
        };
        entries.push(DeviceEntry { offset: e.base(), entry_type: ty, kind });
        pos += len;
    }
    Ok(entries)
}

impl Ivhd {
    /// The flags, decoded (reserved bits kept).
    pub fn flags(&self) -> IvhdFlags {
        IvhdFlags::from_bits_retain(self.flags)
    }

    /// The Coherent flag: the IOMMU's table walks snoop processor caches.
    pub fn coherent(&self) -> bool {
        self.flags().contains(IvhdFlags::COHERENT)
    }

    /// Resolves the device entries into device ID ranges: `All` becomes
    /// 0..=0xFFFF, select entries a one-device range, and each range start
    /// (plain, alias or extended) is paired with the `EndRange` that must
    /// follow it (other entries, such as special or HID entries, may sit in
    /// between). Special, ACPI HID, padding and reserved entries produce no
    /// range.
    pub fn device_ranges(&self) -> Result<Vec<DeviceRange>, Error> {
        let mut out = Vec::new();
        // Entry offset and range (with `last` still unknown) of an open range start.
        let mut open: Option<(usize, DeviceRange)> = None;
        for e in &self.entries {
            let range =
                |first: u16, data_setting: u8, alias, ext| DeviceRange { first, last: first, data_setting, alias, ext };
            let start = match e.kind {
                EntryKind::All { data_setting } => {
                    out.push(DeviceRange { last: 0xffff, ..range(0, data_setting, None, None) });
                    None
                }
                EntryKind::Select { device_id, data_setting } => {
                    out.push(range(device_id, data_setting, None, None));
                    None
                }
                EntryKind::AliasSelect { device_id, data_setting, alias } => {
                    out.push(range(device_id, data_setting, Some(alias), None));
                    None
                }
                EntryKind::ExtSelect { device_id, data_setting, ext } => {
                    out.push(range(device_id, data_setting, None, Some(ext)));
                    None
                }
                EntryKind::StartRange { device_id, data_setting } => Some(range(device_id, data_setting, None, None)),
                EntryKind::AliasStartRange { device_id, data_setting, alias } => {
                    Some(range(device_id, data_setting, Some(alias), None))
                }
                EntryKind::ExtStartRange { device_id, data_setting, ext } => {
                    Some(range(device_id, data_setting, None, Some(ext)))
                }
                EntryKind::EndRange { device_id } => {
                    let Some((_, r)) = open.take() else {
                        return Err(range_err(e.offset, ErrorKind::UnpairedRangeEnd));
                    };
                    if device_id < r.first {
                        return Err(range_err(e.offset, ErrorKind::InvertedRange { first: r.first, last: device_id }));
                    }
                    out.push(DeviceRange { last: device_id, ..r });
                    None
                }
                _ => None,
            };
            if let Some(r) = start {
                if let Some((off, _)) = open {
                    return Err(range_err(off, ErrorKind::UnpairedRangeStart));
                }
                open = Some((e.offset, r));
            }
        }
        if let Some((off, _)) = open {
            return Err(range_err(off, ErrorKind::UnpairedRangeStart));
        }
        Ok(out)
    }

    /// The special (IOAPIC/HPET) entries as (variety, handle, device ID).
    pub fn specials(&self) -> impl Iterator<Item = (u8, u8, u16)> + '_ {
        self.entries.iter().filter_map(|e| match e.kind {
            EntryKind::Special { handle, device_id, variety, .. } => Some((variety, handle, device_id)),
            _ => None,
        })
    }
}

fn range_err(offset: usize, kind: ErrorKind) -> Error {
    Error { offset, structure: "IVHD entry", kind }
}

/// Renders an 8-byte HID/CID field: ASCII up to the first NUL if it is
/// printable, otherwise the little-endian integer in hex (`0x...`).
/// Returns an empty string for an all-zero field.
pub fn id_string(raw: &[u8; 8]) -> String {
    use core::fmt::Write;
    if raw.iter().all(|&b| b == 0) {
        return String::new();
    }
    let text: Vec<u8> = raw.iter().copied().take_while(|&b| b != 0).collect();
    if !text.is_empty() && text.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return text.iter().map(|&b| char::from(b)).collect();
    }
    let mut s = String::new();
    let _ = write!(s, "{:#x}", u64::from_le_bytes(*raw));
    s
}
