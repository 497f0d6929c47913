//! The PVH `hvm_start_info` hand-over, copied into a [`BootInfo`].
//!
//! Layout (Xen `arch-x86/hvm/start_info.h`, version 1):
//!
//! | offset | field            |
//! |--------|------------------|
//! | 0      | magic 0x336ec578 |
//! | 4      | version          |
//! | 8      | flags            |
//! | 12     | nr_modules       |
//! | 16     | modlist_paddr    |
//! | 24     | cmdline_paddr    |
//! | 32     | rsdp_paddr       |
//! | 40     | memmap_paddr     |
//! | 48     | memmap_entries   |
//!
//! Memory-map entries are 24 bytes: `addr: u64, size: u64, type: u32,
//! reserved: u32`, with E820 type numbers.
//!
//! The reader is a closure so that this module is ordinary safe code, tested
//! on the host against a fake physical memory.

/// Magic value at offset 0 of `hvm_start_info`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Most memory-map entries kept; later ones are counted in
/// [`BootInfo::memory_map_dropped`].
pub const MAX_MEMORY_REGIONS: usize = 128;
/// Longest command line kept (bytes, without the terminating NUL).
pub const MAX_CMDLINE: usize = 1024;

const FIXED_LEN: usize = 56;
const ENTRY_LEN: usize = 24;

/// Kind of a memory-map range (E820 numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Usable RAM (type 1).
    Ram,
    /// Reserved (type 2), also used for any unknown type.
    Reserved,
    /// ACPI tables, reclaimable after they are read (type 3).
    AcpiReclaimable,
    /// ACPI non-volatile storage (type 4).
    AcpiNvs,
    /// Bad memory (type 5).
    Unusable,
    /// A type number this code does not know.
    Other(u32),
}

impl MemoryKind {
    /// Kind for an E820 type number.
    pub fn from_e820(kind: u32) -> Self {
        match kind {
            1 => Self::Ram,
            2 => Self::Reserved,
            3 => Self::AcpiReclaimable,
            4 => Self::AcpiNvs,
            5 => Self::Unusable,
            other => Self::Other(other),
        }
    }

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ram => "RAM",
            Self::Reserved => "reserved",
            Self::AcpiReclaimable => "ACPI",
            Self::AcpiNvs => "ACPI NVS",
            Self::Unusable => "unusable",
            Self::Other(_) => "other",
        }
    }
}

/// One memory-map range, `[start, start + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First physical byte.
    pub start: u64,
    /// Length in bytes (never 0 in a [`BootInfo`]; zero-size entries are dropped).
    pub size: u64,
    /// What the range is.
    pub kind: MemoryKind,
}

impl MemoryRegion {
    /// One past the last byte, saturating at `u64::MAX`.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

/// Something wrong with the start info itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartInfoError {
    /// The fixed part could not be read at the address given in `%ebx`.
    Unreadable,
    /// Offset 0 did not hold [`START_INFO_MAGIC`].
    BadMagic(u32),
    /// The memory map could not be read (address out of range).
    MemoryMapUnreadable,
}

/// Everything the kernel needs from the boot protocol, copied into kernel
/// memory. Fixed capacity, so it can live in `.bss` before any allocator.
#[derive(Debug, Clone)]
pub struct BootInfo {
    /// Physical address `hvm_start_info` was found at.
    pub start_info_paddr: u64,
    /// `version` field (0 or 1 seen in practice).
    pub version: u32,
    /// `flags` field.
    pub flags: u32,
    /// RSDP physical address, if the loader gave one.
    pub rsdp_paddr: Option<u64>,
    /// Physical range of the memory-map array as handed over.
    pub memory_map_paddr: u64,
    regions: [MemoryRegion; MAX_MEMORY_REGIONS],
    region_count: usize,
    /// Memory-map entries that did not fit in [`MAX_MEMORY_REGIONS`].
    pub memory_map_dropped: u32,
    /// Physical address of the command line, if any.
    pub cmdline_paddr: Option<u64>,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// The command line was longer than [`MAX_CMDLINE`] and was cut.
    pub cmdline_truncated: bool,
    /// A problem found while reading; the kernel reports it.
    pub error: Option<StartInfoError>,
}

impl BootInfo {
    /// An empty hand-over (no memory, no RSDP) carrying `error`.
    pub const fn empty(error: Option<StartInfoError>) -> Self {
        Self {
            start_info_paddr: 0,
            version: 0,
            flags: 0,
            rsdp_paddr: None,
            memory_map_paddr: 0,
            regions: [MemoryRegion { start: 0, size: 0, kind: MemoryKind::Reserved }; MAX_MEMORY_REGIONS],
            region_count: 0,
            memory_map_dropped: 0,
            cmdline_paddr: None,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            cmdline_truncated: false,
            error,
        }
    }

    /// The memory map, in the order the loader gave it.
    pub fn memory_map(&self) -> &[MemoryRegion] {
        &self.regions[..self.region_count]
    }

    /// The command line as text (invalid UTF-8 is cut at the first bad byte).
    pub fn cmdline(&self) -> &str {
        let bytes = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }

    /// The value of `key=value` on the command line, if present.
    pub fn cmdline_value(&self, key: &str) -> Option<&str> {
        self.cmdline().split_ascii_whitespace().find_map(|word| {
            let (k, v) = word.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// Physical ranges the hand-over itself occupied (start info, memory
    /// map, command line); the frame allocator keeps them out until the
    /// kernel says otherwise. Empty ranges are `(0, 0)`.
    pub fn handover_ranges(&self) -> [(u64, u64); 3] {
        let mm_len = (self.region_count as u64 + self.memory_map_dropped as u64) * ENTRY_LEN as u64;
        let cmd = self.cmdline_paddr.map(|p| (p, p.saturating_add(self.cmdline_len as u64 + 1))).unwrap_or((0, 0));
        [
            (self.start_info_paddr, self.start_info_paddr.saturating_add(FIXED_LEN as u64)),
            (self.memory_map_paddr, self.memory_map_paddr.saturating_add(mm_len)),
            cmd,
        ]
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Reads the start info at `paddr` through `read(addr, buf)` (fills `buf`
/// from physical memory, `None` if the range cannot be read). Never fails:
/// problems are recorded in [`BootInfo::error`] for the kernel to report.
pub fn read_start_info(paddr: u64, read: impl Fn(u64, &mut [u8]) -> Option<()>) -> BootInfo {
    let mut info = BootInfo::empty(None);
    info.start_info_paddr = paddr;
    let mut fixed = [0u8; FIXED_LEN];
    if read(paddr, &mut fixed).is_none() {
        info.error = Some(StartInfoError::Unreadable);
        return info;
    }
    let magic = u32_at(&fixed, 0);
    if magic != START_INFO_MAGIC {
        info.error = Some(StartInfoError::BadMagic(magic));
        return info;
    }
    info.version = u32_at(&fixed, 4);
    info.flags = u32_at(&fixed, 8);
    let rsdp = u64_at(&fixed, 32);
    info.rsdp_paddr = (rsdp != 0).then_some(rsdp);

    // The memory map appeared in version 1; version 0 leaves these fields 0.
    let (memmap, entries) = if info.version >= 1 { (u64_at(&fixed, 40), u32_at(&fixed, 48)) } else { (0, 0) };
    info.memory_map_paddr = memmap;
    for i in 0..entries {
        let Some(addr) = (i as u64).checked_mul(ENTRY_LEN as u64).and_then(|o| memmap.checked_add(o)) else {
            info.error = Some(StartInfoError::MemoryMapUnreadable);
            break;
        };
        let mut e = [0u8; ENTRY_LEN];
        if read(addr, &mut e).is_none() {
            info.error = Some(StartInfoError::MemoryMapUnreadable);
            break;
        }
        let region =
            MemoryRegion { start: u64_at(&e, 0), size: u64_at(&e, 8), kind: MemoryKind::from_e820(u32_at(&e, 16)) };
        if region.size == 0 {
            continue;
        }
        if info.region_count == MAX_MEMORY_REGIONS {
            info.memory_map_dropped += 1;
        } else {
            info.regions[info.region_count] = region;
            info.region_count += 1;
        }
    }

    let cmdline = u64_at(&fixed, 24);
    if cmdline != 0 {
        info.cmdline_paddr = Some(cmdline);
        // Read byte-wise up to the NUL, bounded by the buffer.
        let mut len = 0;
        let mut byte = [0u8; 1];
        while len <= MAX_CMDLINE {
            if read(cmdline + len as u64, &mut byte).is_none() || byte[0] == 0 {
                break;
            }
            if len == MAX_CMDLINE {
                info.cmdline_truncated = true;
                break;
            }
            info.cmdline[len] = byte[0];
            len += 1;
        }
        info.cmdline_len = len;
    }
    info
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    struct Fake {
        base: u64,
        mem: Vec<u8>,
    }

    impl Fake {
        fn new() -> Self {
            Self { base: 0x1000, mem: std::vec![0; 0x4000] }
        }
        fn put(&mut self, addr: u64, bytes: &[u8]) {
            let o = (addr - self.base) as usize;
            self.mem[o..o + bytes.len()].copy_from_slice(bytes);
        }
        fn read(&self, addr: u64, buf: &mut [u8]) -> Option<()> {
            let o = usize::try_from(addr.checked_sub(self.base)?).ok()?;
            let src = self.mem.get(o..o.checked_add(buf.len())?)?;
            buf.copy_from_slice(src);
            Some(())
        }
    }

    fn start_info(f: &mut Fake, version: u32, cmdline: u64, rsdp: u64, memmap: u64, n: u32) {
        let mut b = [0u8; FIXED_LEN];
        b[0..4].copy_from_slice(&START_INFO_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&version.to_le_bytes());
        b[24..32].copy_from_slice(&cmdline.to_le_bytes());
        b[32..40].copy_from_slice(&rsdp.to_le_bytes());
        b[40..48].copy_from_slice(&memmap.to_le_bytes());
        b[48..52].copy_from_slice(&n.to_le_bytes());
        f.put(0x1000, &b);
    }

    fn entry(f: &mut Fake, at: u64, start: u64, size: u64, kind: u32) {
        let mut e = [0u8; ENTRY_LEN];
        e[0..8].copy_from_slice(&start.to_le_bytes());
        e[8..16].copy_from_slice(&size.to_le_bytes());
        e[16..20].copy_from_slice(&kind.to_le_bytes());
        f.put(at, &e);
    }

    #[test]
    fn reads_a_qemu_like_handover() {
        let mut f = Fake::new();
        start_info(&mut f, 1, 0x2000, 0xf52e0, 0x1100, 3);
        entry(&mut f, 0x1100, 0, 0x9fc00, 1);
        entry(&mut f, 0x1118, 0x10_0000, 0x3ff0_0000, 1);
        entry(&mut f, 0x1130, 0xfeff_c000, 0x4000, 2);
        f.put(0x2000, b"config=intel ktest.start=3\0");
        let info = read_start_info(0x1000, |a, b| f.read(a, b));
        assert_eq!(info.error, None);
        assert_eq!(info.rsdp_paddr, Some(0xf52e0));
        assert_eq!(info.memory_map().len(), 3);
        assert_eq!(info.memory_map()[1].kind, MemoryKind::Ram);
        assert_eq!(info.memory_map()[2].end(), 0xff00_0000);
        assert_eq!(info.cmdline(), "config=intel ktest.start=3");
        assert_eq!(info.cmdline_value("ktest.start"), Some("3"));
        assert_eq!(info.cmdline_value("config"), Some("intel"));
        assert_eq!(info.cmdline_value("nope"), None);
        assert_eq!(info.handover_ranges()[1], (0x1100, 0x1100 + 72));
    }

    #[test]
    fn bad_magic_is_reported_not_trusted() {
        let f = Fake::new();
        let info = read_start_info(0x1000, |a, b| f.read(a, b));
        assert_eq!(info.error, Some(StartInfoError::BadMagic(0)));
        assert!(info.memory_map().is_empty());
        let info = read_start_info(0x10, |a, b| f.read(a, b));
        assert_eq!(info.error, Some(StartInfoError::Unreadable));
    }

    #[test]
    fn hostile_memory_map_is_bounded() {
        let mut f = Fake::new();
        // Claims 4 billion entries; the map runs off the end of memory.
        start_info(&mut f, 1, 0, 0, 0x1100, u32::MAX);
        let info = read_start_info(0x1000, |a, b| f.read(a, b));
        assert_eq!(info.error, Some(StartInfoError::MemoryMapUnreadable));
        assert!(info.memory_map().len() <= MAX_MEMORY_REGIONS);
        // Memory map address that overflows.
        start_info(&mut f, 1, 0, 0, u64::MAX - 10, 2);
        let info = read_start_info(0x1000, |a, b| f.read(a, b));
        assert_eq!(info.error, Some(StartInfoError::MemoryMapUnreadable));
    }

    #[test]
    fn too_many_regions_are_counted_and_long_cmdline_cut() {
        let mut f = Fake::new();
        start_info(&mut f, 1, 0x3000, 0, 0x1100, 130);
        for i in 0..130u64 {
            entry(&mut f, 0x1100 + i * 24, i << 20, 0x1000, 1);
        }
        f.put(0x3000, &[b'a'; 2000]);
        let info = read_start_info(0x1000, |a, b| f.read(a, b));
        assert_eq!(info.memory_map().len(), MAX_MEMORY_REGIONS);
        assert_eq!(info.memory_map_dropped, 2);
        assert!(info.cmdline_truncated);
        assert_eq!(info.cmdline().len(), MAX_CMDLINE);
    }

    #[test]
    fn version_zero_has_no_memory_map() {
        let mut f = Fake::new();
        start_info(&mut f, 0, 0, 0, 0x1100, 3);
        let info = read_start_info(0x1000, |a, b| f.read(a, b));
        assert!(info.memory_map().is_empty());
        assert_eq!(info.error, None);
    }
}
