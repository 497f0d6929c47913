//! The DMA Remapping Reporting (DMAR) table, Intel VT-d specification
//! chapter 8.
//!
//! Layout: the 36-byte ACPI header, host address width (1 byte), flags
//! (1 byte), 10 reserved bytes, then remapping structures back to back, each
//! starting with a 16-bit type and a 16-bit length.

use alloc::string::String;
use alloc::vec::Vec;
use bitflags::bitflags;

use crate::{Error, ErrorKind, Reader, checked_table};

bitflags! {
    /// DMAR table flags (VT-d spec 8.1, the byte at offset 37). Parsed
    /// values keep reserved bits (`from_bits_retain`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct DmarFlags: u8 {
        /// INTR_REMAP: the platform supports interrupt remapping.
        const INTR_REMAP = 1 << 0;
        /// X2APIC_OPT_OUT: firmware asks the OS not to enable x2APIC mode.
        const X2APIC_OPT_OUT = 1 << 1;
        /// DMA_CTRL_PLATFORM_OPT_IN: firmware set up DMA protection and
        /// opts in to the OS keeping it.
        const DMA_CTRL_PLATFORM_OPT_IN = 1 << 2;
    }
}

bitflags! {
    /// DRHD flags (VT-d spec 8.3, byte 4 of the structure).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct DrhdFlags: u8 {
        /// INCLUDE_PCI_ALL: the unit covers every PCI device of its segment
        /// not covered by another unit.
        const INCLUDE_PCI_ALL = 1 << 0;
    }
}

bitflags! {
    /// ATSR flags (VT-d spec 8.5, byte 4 of the structure).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct AtsrFlags: u8 {
        /// ALL_PORTS: ATS is allowed for every root port of the segment.
        const ALL_PORTS = 1 << 0;
    }
}

bitflags! {
    /// SATC flags (VT-d spec 8.8, byte 4 of the structure).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct SatcFlags: u8 {
        /// ATC_REQUIRED: the devices require ATC to function.
        const ATC_REQUIRED = 1 << 0;
    }
}

/// Table flag [`DmarFlags::INTR_REMAP`] as a raw byte.
pub const FLAG_INTR_REMAP: u8 = DmarFlags::INTR_REMAP.bits();
/// Table flag [`DmarFlags::X2APIC_OPT_OUT`] as a raw byte.
pub const FLAG_X2APIC_OPT_OUT: u8 = DmarFlags::X2APIC_OPT_OUT.bits();
/// Table flag [`DmarFlags::DMA_CTRL_PLATFORM_OPT_IN`] as a raw byte.
pub const FLAG_DMA_CTRL_PLATFORM_OPT_IN: u8 = DmarFlags::DMA_CTRL_PLATFORM_OPT_IN.bits();

/// DRHD flag [`DrhdFlags::INCLUDE_PCI_ALL`] as a raw byte.
pub const DRHD_INCLUDE_PCI_ALL: u8 = DrhdFlags::INCLUDE_PCI_ALL.bits();
/// ATSR flag [`AtsrFlags::ALL_PORTS`] as a raw byte.
pub const ATSR_ALL_PORTS: u8 = AtsrFlags::ALL_PORTS.bits();
/// SATC flag [`SatcFlags::ATC_REQUIRED`] as a raw byte.
pub const SATC_ATC_REQUIRED: u8 = SatcFlags::ATC_REQUIRED.bits();

/// Remapping structure type codes.
pub const TYPE_DRHD: u16 = 0;
pub const TYPE_RMRR: u16 = 1;
pub const TYPE_ATSR: u16 = 2;
pub const TYPE_RHSA: u16 = 3;
pub const TYPE_ANDD: u16 = 4;
pub const TYPE_SATC: u16 = 5;
pub const TYPE_SIDP: u16 = 6;

/// Device scope: a PCI endpoint device.
pub const SCOPE_PCI_ENDPOINT: u8 = 1;
/// Device scope: a PCI-PCI bridge and everything below it.
pub const SCOPE_PCI_SUB_HIERARCHY: u8 = 2;
/// Device scope: an I/O APIC (enumeration ID = APIC ID).
pub const SCOPE_IOAPIC: u8 = 3;
/// Device scope: an MSI-capable HPET (enumeration ID = HPET number).
pub const SCOPE_HPET: u8 = 4;
/// Device scope: an ACPI namespace device (enumeration ID = ANDD number).
pub const SCOPE_ACPI_NAMESPACE_DEVICE: u8 = 5;

/// Offset of the first remapping structure.
pub const STRUCTURES_OFFSET: usize = 48;
/// Size of a device scope without its path.
pub const SCOPE_FIXED_LEN: usize = 6;

/// A decoded DMAR table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dmar {
    pub header: crate::SdtHeader,
    /// Raw host address width field: the DMA address width minus one.
    pub host_address_width: u8,
    /// The raw flags byte; [`Dmar::flags`] decodes it.
    pub flags: u8,
    /// The remapping structures in table order.
    pub structures: Vec<Structure>,
}

/// One remapping structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Structure {
    Drhd(Drhd),
    Rmrr(Rmrr),
    Atsr(Atsr),
    Rhsa(Rhsa),
    Andd(Andd),
    Satc(Satc),
    Sidp(Sidp),
    /// A structure type this parser does not know; skipped by its length.
    Unknown {
        kind: u16,
        offset: usize,
        length: u16,
    },
}

impl Structure {
    /// Offset of the structure from the start of the table.
    pub fn offset(&self) -> usize {
        match self {
            Structure::Drhd(s) => s.offset,
            Structure::Rmrr(s) => s.offset,
            Structure::Atsr(s) => s.offset,
            Structure::Rhsa(s) => s.offset,
            Structure::Andd(s) => s.offset,
            Structure::Satc(s) => s.offset,
            Structure::Sidp(s) => s.offset,
            Structure::Unknown { offset, .. } => *offset,
        }
    }

    /// Short name: "DRHD", "RMRR", ..., or "unknown".
    pub fn name(&self) -> &'static str {
        match self {
            Structure::Drhd(_) => "DRHD",
            Structure::Rmrr(_) => "RMRR",
            Structure::Atsr(_) => "ATSR",
            Structure::Rhsa(_) => "RHSA",
            Structure::Andd(_) => "ANDD",
            Structure::Satc(_) => "SATC",
            Structure::Sidp(_) => "SIDP",
            Structure::Unknown { .. } => "unknown",
        }
    }

    /// The device scopes of the structure (empty for those without any).
    pub fn scopes(&self) -> &[DeviceScope] {
        match self {
            Structure::Drhd(s) => &s.scopes,
            Structure::Rmrr(s) => &s.scopes,
            Structure::Atsr(s) => &s.scopes,
            Structure::Satc(s) => &s.scopes,
            Structure::Sidp(s) => &s.scopes,
            Structure::Rhsa(_) | Structure::Andd(_) | Structure::Unknown { .. } => &[],
        }
    }
}

/// DMA Remapping Hardware unit Definition (type 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drhd {
    pub offset: usize,
    /// The raw flags byte; [`Drhd::flags`] decodes it.
    pub flags: u8,
    /// Register set size: 2^size pages of 4 KiB (bits 3:0; upper bits reserved).
    pub size: u8,
    pub segment: u16,
    pub register_base: u64,
    pub scopes: Vec<DeviceScope>,
}

impl Drhd {
    /// The flags, decoded (reserved bits kept).
    pub fn flags(&self) -> DrhdFlags {
        DrhdFlags::from_bits_retain(self.flags)
    }

    /// INCLUDE_PCI_ALL: the unit covers all devices of its segment that no
    /// other unit lists.
    pub fn include_pci_all(&self) -> bool {
        self.flags().contains(DrhdFlags::INCLUDE_PCI_ALL)
    }

    /// Size of the register set in bytes: 4 KiB << size (only the 4 defined
    /// bits of `size` are used, so at most 128 MiB).
    pub fn register_set_bytes(&self) -> u64 {
        4096u64 << (self.size & 0x0f)
    }
}

/// Reserved Memory Region Reporting structure (type 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rmrr {
    pub offset: usize,
    pub segment: u16,
    /// First byte of the region (4 KiB aligned per spec).
    pub base: u64,
    /// Last byte of the region (inclusive).
    pub limit: u64,
    pub scopes: Vec<DeviceScope>,
}

/// Root Port ATS Capability Reporting structure (type 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Atsr {
    pub offset: usize,
    /// The raw flags byte; [`Atsr::flags`] decodes it.
    pub flags: u8,
    pub segment: u16,
    pub scopes: Vec<DeviceScope>,
}

impl Atsr {
    /// The flags, decoded (reserved bits kept).
    pub fn flags(&self) -> AtsrFlags {
        AtsrFlags::from_bits_retain(self.flags)
    }

    /// ALL_PORTS flag.
    pub fn all_ports(&self) -> bool {
        self.flags().contains(AtsrFlags::ALL_PORTS)
    }
}

/// Remapping Hardware Static Affinity structure (type 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rhsa {
    pub offset: usize,
    pub register_base: u64,
    pub proximity_domain: u32,
}

/// ACPI Name-space Device Declaration structure (type 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Andd {
    pub offset: usize,
    pub acpi_device_number: u8,
    /// The object's full ACPI path, up to its terminating NUL (non-ASCII
    /// bytes are kept as the code point of the same value).
    pub object_name: String,
}

/// SoC Integrated Address Translation Cache structure (type 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Satc {
    pub offset: usize,
    /// The raw flags byte; [`Satc::flags`] decodes it.
    pub flags: u8,
    pub segment: u16,
    pub scopes: Vec<DeviceScope>,
}

impl Satc {
    /// The flags, decoded (reserved bits kept).
    pub fn flags(&self) -> SatcFlags {
        SatcFlags::from_bits_retain(self.flags)
    }

    /// ATC_REQUIRED flag.
    pub fn atc_required(&self) -> bool {
        self.flags().contains(SatcFlags::ATC_REQUIRED)
    }
}

/// SoC Integrated Device Property structure (type 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidp {
    pub offset: usize,
    pub segment: u16,
    pub scopes: Vec<DeviceScope>,
}

/// A device scope entry: which device(s) a structure applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceScope {
    pub offset: usize,
    /// One of the `SCOPE_*` constants.
    pub scope_type: u8,
    /// Scope flags (byte 2; defined for SIDP scopes in VT-d 4.x, otherwise
    /// reserved).
    pub flags: u8,
    /// IOAPIC ID, HPET number or ANDD device number, depending on the type.
    pub enumeration_id: u8,
    pub start_bus: u8,
    /// (device, function) hops from the start bus.
    pub path: Vec<(u8, u8)>,
}

impl DeviceScope {
    /// Human-readable name of the scope type.
    pub fn type_name(&self) -> &'static str {
        scope_type_name(self.scope_type)
    }
}

/// Human-readable name of a device scope type.
pub fn scope_type_name(scope_type: u8) -> &'static str {
    match scope_type {
        SCOPE_PCI_ENDPOINT => "PCI endpoint",
        SCOPE_PCI_SUB_HIERARCHY => "PCI sub-hierarchy",
        SCOPE_IOAPIC => "IOAPIC",
        SCOPE_HPET => "HPET",
        SCOPE_ACPI_NAMESPACE_DEVICE => "ACPI namespace device",
        _ => "reserved scope type",
    }
}

impl Dmar {
    /// Parses a whole DMAR table (header included) from `bytes`. Bytes past
    /// the header's length are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Dmar, Error> {
        let (header, table) = checked_table(bytes, b"DMAR", STRUCTURES_OFFSET)?;
        let t = Reader::new(table, 0, "DMAR");
        let host_address_width = t.u8(36)?;
        let flags = t.u8(37)?;
        let mut structures = Vec::new();
        let mut pos = STRUCTURES_OFFSET;
        while pos < t.len() {
            t.header_fits(pos, 4, "remapping structure")?;
            let kind = t.u16(pos)?;
            let length = t.u16(pos + 2)?;
            let s = parse_structure(&t, pos, kind, length)?;
            structures.push(s);
            pos += usize::from(length);
        }
        Ok(Dmar { header, host_address_width, flags, structures })
    }

    /// The DRHD structures in table order.
    pub fn drhds(&self) -> impl Iterator<Item = &Drhd> {
        self.structures.iter().filter_map(|s| match s {
            Structure::Drhd(d) => Some(d),
            _ => None,
        })
    }

    /// The RMRR structures in table order.
    pub fn rmrrs(&self) -> impl Iterator<Item = &Rmrr> {
        self.structures.iter().filter_map(|s| match s {
            Structure::Rmrr(r) => Some(r),
            _ => None,
        })
    }

    /// The ATSR structures in table order.
    pub fn atsrs(&self) -> impl Iterator<Item = &Atsr> {
        self.structures.iter().filter_map(|s| match s {
            Structure::Atsr(a) => Some(a),
            _ => None,
        })
    }

    /// DMA address width in bits (the raw field plus one).
    pub fn dma_address_bits(&self) -> u8 {
        self.host_address_width.saturating_add(1)
    }

    /// The table flags, decoded (reserved bits kept).
    pub fn flags(&self) -> DmarFlags {
        DmarFlags::from_bits_retain(self.flags)
    }

    /// Whether a table flag (a raw `FLAG_*` byte) is set; see also
    /// [`Self::flags`].
    pub fn has_flag(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Structure name used in errors for a remapping structure type.
fn structure_name(kind: u16) -> &'static str {
    match kind {
        TYPE_DRHD => "DRHD",
        TYPE_RMRR => "RMRR",
        TYPE_ATSR => "ATSR",
        TYPE_RHSA => "RHSA",
        TYPE_ANDD => "ANDD",
        TYPE_SATC => "SATC",
        TYPE_SIDP => "SIDP",
        _ => "remapping structure",
    }
}

/// Fixed-part size of each structure type.
fn fixed_len(kind: u16) -> usize {
    match kind {
        TYPE_DRHD => 16,
        TYPE_RMRR => 24,
        TYPE_ATSR | TYPE_SATC | TYPE_SIDP => 8,
        TYPE_RHSA => 20,
        TYPE_ANDD => 8,
        _ => 4,
    }
}

fn parse_structure(t: &Reader<'_>, pos: usize, kind: u16, length: u16) -> Result<Structure, Error> {
    let name = structure_name(kind);
    let s = t.sub(pos, usize::from(length), fixed_len(kind), name)?;
    let offset = s.base();
    Ok(match kind {
        TYPE_DRHD => Structure::Drhd(Drhd {
            offset,
            flags: s.u8(4)?,
            size: s.u8(5)?,
            segment: s.u16(6)?,
            register_base: s.u64(8)?,
            scopes: parse_scopes(&s, 16)?,
        }),
        TYPE_RMRR => Structure::Rmrr(Rmrr {
            offset,
            segment: s.u16(6)?,
            base: s.u64(8)?,
            limit: s.u64(16)?,
            scopes: parse_scopes(&s, 24)?,
        }),
        TYPE_ATSR => {
            Structure::Atsr(Atsr { offset, flags: s.u8(4)?, segment: s.u16(6)?, scopes: parse_scopes(&s, 8)? })
        }
        TYPE_RHSA => Structure::Rhsa(Rhsa { offset, register_base: s.u64(8)?, proximity_domain: s.u32(16)? }),
        TYPE_ANDD => Structure::Andd(Andd {
            offset,
            acpi_device_number: s.u8(7)?,
            object_name: crate::ascii_until_nul(s.bytes().get(8..).unwrap_or(&[])),
        }),
        TYPE_SATC => {
            Structure::Satc(Satc { offset, flags: s.u8(4)?, segment: s.u16(6)?, scopes: parse_scopes(&s, 8)? })
        }
        TYPE_SIDP => Structure::Sidp(Sidp { offset, segment: s.u16(6)?, scopes: parse_scopes(&s, 8)? }),
        _ => Structure::Unknown { kind, offset, length },
    })
}

/// Parses the device scopes filling structure `s` from relative offset
/// `start` to its end.
fn parse_scopes(s: &Reader<'_>, start: usize) -> Result<Vec<DeviceScope>, Error> {
    let mut scopes = Vec::new();
    let mut pos = start;
    while pos < s.len() {
        // The length byte is the second byte of the scope.
        s.header_fits(pos, 2, "device scope")?;
        let length = usize::from(s.u8(pos + 1)?);
        let sc = s.sub(pos, length, SCOPE_FIXED_LEN, "device scope")?;
        if !(length - SCOPE_FIXED_LEN).is_multiple_of(2) {
            return Err(sc.err(1, ErrorKind::BadLength { length, min: SCOPE_FIXED_LEN }));
        }
        let path = sc.bytes().get(SCOPE_FIXED_LEN..).unwrap_or(&[]).chunks_exact(2).map(|p| (p[0], p[1])).collect();
        scopes.push(DeviceScope {
            offset: sc.base(),
            scope_type: sc.u8(0)?,
            flags: sc.u8(2)?,
            enumeration_id: sc.u8(4)?,
            start_bus: sc.u8(5)?,
            path,
        });
        pos += length;
    }
    Ok(scopes)
}
