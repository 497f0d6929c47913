//! A test walker: what a unit does with a DMA or an MSI of a requester id,
//! decoded from the specifications (Intel VT-d rev 4.x chapters 3, 5 and 9;
//! AMD IOMMU pub. 48882 chapter 2) straight from the memory the unit reads,
//! without the driver's decoders.
//!
//! A unit that does not snoop reads memory, not the CPU's caches: for such
//! a unit the walker reads the memory view and refuses (an error, not a
//! result) any cache line the CPU changed without writing it back, so a
//! walk that succeeds used only flushed data.

use super::host::{Memory, ModelHost, ModelMmio, View};

/// Physical address bits of table pointers (51:12).
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// What a DMA meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It reaches host physical `hpa`, through a page of `size` bytes with
    /// these permissions.
    Page {
        /// Host physical address of the byte.
        hpa: u64,
        /// Page size.
        size: u64,
        /// Reads allowed.
        read: bool,
        /// Writes allowed.
        write: bool,
    },
    /// It is refused (why).
    Blocked(&'static str),
    /// It passes untranslated: it can reach any address.
    Untranslated,
}

/// A walk: the outcome, the domain the translation is tagged with, and
/// what was read.
#[derive(Debug, Clone)]
pub struct Walk {
    /// The outcome.
    pub outcome: Outcome,
    /// Domain id of the device's entry, when it has one.
    pub domain: Option<u16>,
    /// Words of the device's entries (root and context entries, PASID
    /// structures, or the device table entry).
    pub entry_words: Vec<u64>,
    /// Words of the page table read, top down.
    pub table_words: Vec<u64>,
    /// The page-table frames the walk went through.
    pub tables: Vec<u64>,
}

impl Walk {
    /// The host address, if the DMA is translated with the access
    /// allowed.
    pub fn hpa(&self, write: bool) -> Option<u64> {
        match self.outcome {
            Outcome::Page { hpa, read, write: w, .. } if (if write { w } else { read }) => Some(hpa),
            _ => None,
        }
    }
    /// Whether the DMA is refused.
    pub fn blocked(&self) -> bool {
        matches!(self.outcome, Outcome::Blocked(_))
    }
}

/// Why the walker could not decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalkError {
    /// It had to read outside every live frame (a pointer into freed
    /// memory, or out of poison).
    NotATable(u64),
    /// The unit does not snoop and the line holding `addr` was changed by
    /// the CPU and not written back: the unit would read `memory`.
    Stale {
        /// The word.
        addr: u64,
        /// What the unit reads.
        memory: u64,
        /// What the CPU wrote.
        cpu: u64,
    },
    /// A field holds a reserved or unsupported value.
    Reserved(&'static str, u64),
}

struct Reader<'a> {
    mem: &'a Memory,
    view: View,
    words: Vec<u64>,
}

impl Reader<'_> {
    fn read(&mut self, addr: u64) -> Result<u64, WalkError> {
        if !self.mem.is_live(addr) {
            return Err(WalkError::NotATable(addr));
        }
        let v = self.mem.read(self.view, addr).ok_or(WalkError::NotATable(addr))?;
        if self.view == View::Memory && !self.mem.line_clean(addr) {
            let cpu = self.mem.read(View::Cpu, addr).unwrap_or(0);
            return Err(WalkError::Stale { addr, memory: v, cpu });
        }
        self.words.push(addr);
        Ok(v)
    }
    fn take(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.words)
    }
}

fn done(outcome: Outcome, domain: Option<u16>, r: &mut Reader, entry_words: Vec<u64>, tables: Vec<u64>) -> Walk {
    Walk { outcome, domain, entry_words, table_words: r.take(), tables }
}

/// What the unit at `base` does with a DMA from `rid` to `iova` (a request
/// without PASID).
pub fn translate(host: &ModelHost, base: u64, rid: u16, iova: u64) -> Result<Walk, WalkError> {
    let unit = host.unit(base);
    let mut r = Reader { mem: &host.mem, view: unit.view, words: Vec::new() };
    match &unit.mmio {
        ModelMmio::Vtd(m) => vtd(m, &mut r, rid, iova),
        ModelMmio::Amd(m) => amd(m, &mut r, rid, iova),
    }
}

// ---------------------------------------------------------------------------
// VT-d.
// ---------------------------------------------------------------------------

fn vtd(m: &vtd::testing::RegisterModel, r: &mut Reader, rid: u16, iova: u64) -> Result<Walk, WalkError> {
    let Some(rtaddr) = m.root_table() else {
        return Ok(done(Outcome::Untranslated, None, r, Vec::new(), Vec::new()));
    };
    let sagaw = (m.config().cap >> 8) & 0x1f;
    let (bus, devfn) = ((rid >> 8) as u64, (rid & 0xff) as u64);
    let root = rtaddr & ADDR;
    match (rtaddr >> 10) & 3 {
        // Legacy mode (spec 9.1, 9.3): 128-bit root entry per bus, 128-bit
        // context entry per devfn.
        0 => {
            let lo = r.read(root + bus * 16)?;
            let hi = r.read(root + bus * 16 + 8)?;
            if lo & 1 == 0 {
                let w = r.take();
                return Ok(done(Outcome::Blocked("root entry not present"), None, r, w, Vec::new()));
            }
            if lo & 0xffe != 0 || hi != 0 {
                return Err(WalkError::Reserved("legacy root entry", lo));
            }
            let ctx = lo & ADDR;
            let c0 = r.read(ctx + devfn * 16)?;
            let c1 = r.read(ctx + devfn * 16 + 8)?;
            let entries = r.take();
            if c0 & 1 == 0 {
                return Ok(done(Outcome::Blocked("context entry not present"), None, r, entries, Vec::new()));
            }
            let did = (c1 >> 8) as u16;
            match (c0 >> 2) & 3 {
                0 | 1 => {}
                2 => return Ok(done(Outcome::Untranslated, Some(did), r, entries, Vec::new())),
                _ => return Err(WalkError::Reserved("context entry TT", c0)),
            }
            let aw = c1 & 7;
            if !(1..=3).contains(&aw) || sagaw >> aw & 1 == 0 {
                return Err(WalkError::Reserved("context entry AW not in SAGAW", c1));
            }
            second_stage(r, c0 & ADDR, aw as u32 + 2, iova, did, entries)
        }
        // Scalable mode (spec 9.4, 9.5, 9.6): root entry halves for devfn
        // 0-127 / 128-255, 256-bit context entries, PASID directory and
        // 512-bit PASID table entries; a request without PASID uses the
        // context entry's RID_PASID.
        1 => {
            let lo = r.read(root + bus * 16)?;
            let hi = r.read(root + bus * 16 + 8)?;
            let half = if devfn < 128 { lo } else { hi };
            if half & 1 == 0 {
                let w = r.take();
                return Ok(done(Outcome::Blocked("scalable root entry half not present"), None, r, w, Vec::new()));
            }
            let ce = (half & ADDR) + (devfn & 0x7f) * 32;
            let c0 = r.read(ce)?;
            let c1 = r.read(ce + 8)?;
            if c0 & 1 == 0 {
                let w = r.take();
                return Ok(done(Outcome::Blocked("scalable context entry not present"), None, r, w, Vec::new()));
            }
            let pasid = c1 & 0xf_ffff;
            let pdts = (c0 >> 9) & 7;
            if pasid >> 6 >= 1 << (pdts + 7) {
                return Err(WalkError::Reserved("RID_PASID beyond the PASID directory", c1));
            }
            let de = r.read((c0 & ADDR) + (pasid >> 6) * 8)?;
            if de & 1 == 0 {
                let w = r.take();
                return Ok(done(Outcome::Blocked("PASID directory entry not present"), None, r, w, Vec::new()));
            }
            let pe = (de & ADDR) + (pasid & 0x3f) * 64;
            let p0 = r.read(pe)?;
            let p1 = r.read(pe + 8)?;
            let p2 = r.read(pe + 16)?;
            let entries = r.take();
            if p0 & 1 == 0 {
                return Ok(done(Outcome::Blocked("PASID entry not present"), None, r, entries, Vec::new()));
            }
            let did = p1 as u16;
            match (p0 >> 6) & 7 {
                // First-stage only: x86 paging, 4 or 5 levels (FSPM).
                1 => {
                    let levels = match (p2 >> 2) & 3 {
                        0 => 4,
                        1 => 5,
                        _ => return Err(WalkError::Reserved("PASID entry FSPM", p2)),
                    };
                    first_stage(r, p2 & ADDR, levels, iova, did, entries)
                }
                2 => {
                    let aw = (p0 >> 2) & 7;
                    if !(1..=3).contains(&aw) || sagaw >> aw & 1 == 0 {
                        return Err(WalkError::Reserved("PASID entry AW not in SAGAW", p0));
                    }
                    second_stage(r, p0 & ADDR, aw as u32 + 2, iova, did, entries)
                }
                4 => Ok(done(Outcome::Untranslated, Some(did), r, entries, Vec::new())),
                _ => Err(WalkError::Reserved("PASID entry PGTT", p0)),
            }
        }
        _ => Err(WalkError::Reserved("RTADDR.TTM", rtaddr)),
    }
}

/// VT-d second-stage tables (spec 9.8): R bit 0, W bit 1, PS bit 7 (2 MiB
/// at level 2, 1 GiB at level 3), address 51:12; permissions ANDed down
/// the walk.
fn second_stage(
    r: &mut Reader,
    root: u64,
    levels: u32,
    iova: u64,
    did: u16,
    entries: Vec<u64>,
) -> Result<Walk, WalkError> {
    let width = 12 + 9 * levels;
    if width < 64 && iova >> width != 0 {
        return Ok(done(Outcome::Blocked("beyond the address width"), Some(did), r, entries, Vec::new()));
    }
    let (mut table, mut read, mut write) = (root, true, true);
    let mut tables = Vec::new();
    for level in (1..=levels).rev() {
        tables.push(table);
        let shift = 12 + 9 * (level - 1);
        let pte = r.read(table + ((iova >> shift) & 0x1ff) * 8)?;
        if pte & 3 == 0 {
            return Ok(done(Outcome::Blocked("second-stage entry not present"), Some(did), r, entries, tables));
        }
        read &= pte & 1 != 0;
        write &= pte & 2 != 0;
        if level == 1 || pte & (1 << 7) != 0 {
            if level > 3 {
                return Err(WalkError::Reserved("PS above level 3", pte));
            }
            let size = 1u64 << shift;
            if pte & ADDR & (size - 1) != 0 {
                return Err(WalkError::Reserved("misaligned large page", pte));
            }
            let hpa = pte & ADDR | iova & (size - 1);
            return Ok(done(Outcome::Page { hpa, size, read, write }, Some(did), r, entries, tables));
        }
        table = pte & ADDR;
    }
    unreachable!()
}

/// x86 first-stage tables (spec 3.6, 9.7): P bit 0, R/W bit 1, U/S bit 2,
/// PS bit 7, address 51:12; canonical addresses only; a request without
/// PASID is a user request, so U/S must be set at every level.
fn first_stage(
    r: &mut Reader,
    root: u64,
    levels: u32,
    iova: u64,
    did: u16,
    entries: Vec<u64>,
) -> Result<Walk, WalkError> {
    let width = 12 + 9 * levels;
    let sign = (iova as i64) >> (width - 1);
    if sign != 0 && sign != -1 {
        return Ok(done(Outcome::Blocked("non-canonical"), Some(did), r, entries, Vec::new()));
    }
    let (mut table, mut write) = (root, true);
    let mut tables = Vec::new();
    for level in (1..=levels).rev() {
        tables.push(table);
        let shift = 12 + 9 * (level - 1);
        let pte = r.read(table + ((iova >> shift) & 0x1ff) * 8)?;
        if pte & 1 == 0 {
            return Ok(done(Outcome::Blocked("first-stage entry not present"), Some(did), r, entries, tables));
        }
        if pte & 4 == 0 {
            return Ok(done(Outcome::Blocked("supervisor-only first-stage entry"), Some(did), r, entries, tables));
        }
        write &= pte & 2 != 0;
        if level == 1 || pte & (1 << 7) != 0 {
            if level > 3 {
                return Err(WalkError::Reserved("PS above level 3", pte));
            }
            let size = 1u64 << shift;
            let hpa = pte & ADDR & !(size - 1) | iova & (size - 1);
            return Ok(done(Outcome::Page { hpa, size, read: true, write }, Some(did), r, entries, tables));
        }
        table = pte & ADDR;
    }
    unreachable!()
}

// ---------------------------------------------------------------------------
// AMD-Vi.
// ---------------------------------------------------------------------------

fn amd_dte(m: &amdvi::testing::RegisterModel, r: &mut Reader, rid: u16) -> Result<Option<[u64; 4]>, WalkError> {
    let Some((table, entries)) = m.device_table() else { return Ok(None) };
    if rid as u32 >= entries {
        return Err(WalkError::Reserved("device id beyond the device table", rid as u64));
    }
    let at = table + rid as u64 * 32;
    Ok(Some([r.read(at)?, r.read(at + 8)?, r.read(at + 16)?, r.read(at + 24)?]))
}

/// Device table entry (spec 2.2.2: V bit 0, TV bit 1, Mode 11:9, root
/// 51:12, IR bit 61, IW bit 62, DomainID 79:64), then the AMD v1 tables
/// (spec 2.2.3: PR bit 0, NextLevel 11:9, address 51:12, IR 61, IW 62;
/// NextLevel 0 is a page of the level's size, 7 a page whose size the
/// address encodes, anything lower than the level the next table,
/// skipping levels whose index bits must be zero).
fn amd(m: &amdvi::testing::RegisterModel, r: &mut Reader, rid: u16, iova: u64) -> Result<Walk, WalkError> {
    let Some([w0, w1, ..]) = amd_dte(m, r, rid)? else {
        return Ok(done(Outcome::Untranslated, None, r, Vec::new(), Vec::new()));
    };
    let entries = r.take();
    let did = w1 as u16;
    // V = 0 (or TV = 0): the DMA is not translated.
    if w0 & 3 != 3 {
        return Ok(done(Outcome::Untranslated, Some(did), r, entries, Vec::new()));
    }
    let (ir, iw) = (w0 >> 61 & 1 != 0, w0 >> 62 & 1 != 0);
    let mode = ((w0 >> 9) & 7) as u32;
    match mode {
        0 if !ir && !iw => {
            return Ok(done(Outcome::Blocked("mode 0 without IR/IW"), Some(did), r, entries, Vec::new()));
        }
        0 => return Ok(done(Outcome::Untranslated, Some(did), r, entries, Vec::new())),
        7 => return Err(WalkError::Reserved("DTE mode 7", w0)),
        _ => {}
    }
    let width = 12 + 9 * mode;
    if width < 64 && iova >> width != 0 {
        return Ok(done(Outcome::Blocked("beyond the table's reach"), Some(did), r, entries, Vec::new()));
    }
    let (mut table, mut level, mut read, mut write) = (w0 & ADDR, mode, ir, iw);
    let mut tables = Vec::new();
    loop {
        tables.push(table);
        let shift = 12 + 9 * (level - 1);
        let pte = r.read(table + ((iova >> shift) & 0x1ff) * 8)?;
        if pte & 1 == 0 {
            return Ok(done(Outcome::Blocked("page table entry not present"), Some(did), r, entries, tables));
        }
        read &= pte >> 61 & 1 != 0;
        write &= pte >> 62 & 1 != 0;
        let addr = pte & ADDR;
        let size = match ((pte >> 9) & 7) as u32 {
            0 => 1u64 << shift,
            7 => {
                let size = 1u64 << (13 + (addr >> 12).trailing_ones());
                if size >= 1u64 << (shift + 9).min(63) {
                    return Err(WalkError::Reserved("page size beyond the level", pte));
                }
                size
            }
            next if next < level => {
                for skipped in next + 1..level {
                    if (iova >> (12 + 9 * (skipped - 1))) & 0x1ff != 0 {
                        return Ok(done(
                            Outcome::Blocked("skipped level index not zero"),
                            Some(did),
                            r,
                            entries,
                            tables,
                        ));
                    }
                }
                table = addr;
                level = next;
                continue;
            }
            _ => return Err(WalkError::Reserved("NextLevel not below the level", pte)),
        };
        let hpa = addr & !(size - 1) | iova & (size - 1);
        return Ok(done(Outcome::Page { hpa, size, read, write }, Some(did), r, entries, tables));
    }
}

// ---------------------------------------------------------------------------
// Interrupts.
// ---------------------------------------------------------------------------

/// Where a remapped MSI goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remapped {
    /// Vector.
    pub vector: u8,
    /// Destination APIC id.
    pub destination: u32,
    /// Index of the remapping entry.
    pub index: u32,
    /// Words read: the device's entry (AMD-Vi) and the remapping entry.
    pub words: Vec<u64>,
}

/// What a unit does with an MSI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msi {
    /// Remapped.
    Remapped(Remapped),
    /// Blocked (why).
    Blocked(&'static str),
    /// Passed on as it is (no remapping).
    Passed,
}

/// What the unit at `base` does with an MSI write of `data` to `address`
/// from `rid`.
pub fn msi(host: &ModelHost, base: u64, rid: u16, address: u64, data: u32) -> Result<Msi, WalkError> {
    let unit = host.unit(base);
    let mut r = Reader { mem: &host.mem, view: unit.view, words: Vec::new() };
    if address >> 20 != 0xfee {
        return Err(WalkError::Reserved("not an MSI address", address));
    }
    match &unit.mmio {
        ModelMmio::Vtd(m) => vtd_msi(m, &mut r, rid, address, data),
        ModelMmio::Amd(m) => amd_msi(m, &mut r, rid, data),
    }
}

/// VT-d (spec 5.1): the remappable format (address bit 4) names a handle
/// (bits 19:5, bit 2 for handle bit 15, plus the data's subhandle when
/// SHV, bit 3); the 128-bit entry: P bit 0, vector 23:16, destination
/// 63:32 (an xAPIC id in 47:40 without IRTA.EIME), SID 79:64, SQ 81:80,
/// SVT 83:82.
fn vtd_msi(
    m: &vtd::testing::RegisterModel,
    r: &mut Reader,
    rid: u16,
    address: u64,
    data: u32,
) -> Result<Msi, WalkError> {
    let Some(irta) = m.interrupt_table() else { return Ok(Msi::Passed) };
    if address >> 4 & 1 == 0 {
        return Ok(Msi::Blocked("compatibility format"));
    }
    let mut handle = ((address >> 5) & 0x7fff | ((address >> 2) & 1) << 15) as u32;
    if address >> 3 & 1 != 0 {
        handle += data & 0xffff;
    }
    if handle >= 2 << (irta & 0xf) {
        return Ok(Msi::Blocked("handle beyond the table"));
    }
    let at = (irta & ADDR) + handle as u64 * 16;
    let (lo, hi) = (r.read(at)?, r.read(at + 8)?);
    if lo & 1 == 0 {
        return Ok(Msi::Blocked("entry not present"));
    }
    if lo >> 15 & 1 != 0 {
        return Err(WalkError::Reserved("posted entry", lo));
    }
    let (sid, sq, svt) = (hi as u16, (hi >> 16) & 3, (hi >> 18) & 3);
    let ok = match svt {
        0 => true,
        1 => {
            let ignore = [0u16, 0b100, 0b110, 0b111][sq as usize];
            rid & !ignore == sid & !ignore
        }
        2 => ((sid >> 8)..=(sid & 0xff)).contains(&(rid >> 8)),
        _ => return Err(WalkError::Reserved("SVT", hi)),
    };
    if !ok {
        return Ok(Msi::Blocked("source id not allowed by the entry"));
    }
    let destination = if irta >> 11 & 1 != 0 { (lo >> 32) as u32 } else { ((lo >> 40) & 0xff) as u32 };
    Ok(Msi::Remapped(Remapped { vector: (lo >> 16) as u8, destination, index: handle, words: r.take() }))
}

/// AMD-Vi (spec 2.2.5): the device's entry (word 2: IV bit 0, IntTabLen
/// 4:1, table root 51:6, IntCtl 61:60) and its own table of 32-bit
/// entries indexed by the MSI data's bits 10:0 (RemapEn bit 0, IntType
/// 4:2, destination 15:8, vector 23:16).
fn amd_msi(m: &amdvi::testing::RegisterModel, r: &mut Reader, rid: u16, data: u32) -> Result<Msi, WalkError> {
    let Some([_, _, w2, _]) = amd_dte(m, r, rid)? else { return Ok(Msi::Passed) };
    if w2 & 1 == 0 {
        return Ok(Msi::Passed);
    }
    match (w2 >> 60) & 3 {
        0 => return Ok(Msi::Blocked("IntCtl: abort")),
        1 => return Ok(Msi::Passed),
        2 => {}
        _ => return Err(WalkError::Reserved("IntCtl", w2)),
    }
    let index = data & 0x7ff;
    if index >= 1 << ((w2 >> 1) & 0xf) {
        return Ok(Msi::Blocked("index beyond IntTabLen"));
    }
    let at = (w2 & 0x000f_ffff_ffff_ffc0) + index as u64 * 4;
    let irte = (r.read(at & !7)? >> ((at & 4) * 8)) as u32;
    if irte & 1 == 0 {
        return Ok(Msi::Blocked("RemapEn clear"));
    }
    if (irte >> 2) & 7 != 0 {
        return Err(WalkError::Reserved("IntType other than fixed", irte as u64));
    }
    Ok(Msi::Remapped(Remapped { vector: (irte >> 16) as u8, destination: (irte >> 8) & 0xff, index, words: r.take() }))
}
