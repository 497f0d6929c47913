//! [`ScalableTables`]: the scalable-mode root, context, PASID-directory and
//! PASID tables of one unit (allocation, installing and blocking entries in
//! a safe order, walking them back), and the [`Invalidations`] each change
//! calls for. The guarantees are listed in the [parent module](super).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use io_pgtable::TableMemory;

use super::entries::{
    FirstStageTable, PasidDirEntry, PasidEntry, Pgtt, RID_PASID, RTADDR_TTM_SCALABLE, ScalableContextEntry,
    ScalableRootEntry, Snoop,
};
use crate::qi::{ContextScope, Descriptor256, IotlbScope, PasidCacheScope, PasidIotlbScope};

mod pasids;
pub use pasids::DIRECTORY_PASID_BITS;

const CACHE_LINE: u64 = 64;

// ---------------------------------------------------------------------------
// Invalidations the unit must issue
// ---------------------------------------------------------------------------

/// One invalidation a table change calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// Global context-cache invalidation (a root entry changed).
    ContextCacheGlobal,
    /// Device-selective context-cache invalidation (the domain id in the
    /// descriptor is ignored in scalable mode; 0 is sent).
    ContextCacheDevice { sid: u16 },
    /// PASID-selective PASID-cache invalidation.
    PasidCache { did: u16, pasid: u32 },
    /// Domain-selective IOTLB invalidation: every PASID of the domain
    /// (second-stage, nested and pass-through entries).
    Iotlb { did: u16 },
    /// PASID-selective PASID-based IOTLB invalidation (first-stage and
    /// pass-through entries).
    PasidIotlb { did: u16, pasid: u32 },
}

impl Invalidation {
    /// The 256-bit descriptor for it.
    pub fn descriptor(self) -> Descriptor256 {
        match self {
            Self::ContextCacheGlobal => Descriptor256::context(ContextScope::Global),
            Self::ContextCacheDevice { sid } => Descriptor256::context(ContextScope::Device { did: 0, sid }),
            Self::PasidCache { did, pasid } => Descriptor256::pasid_cache(PasidCacheScope::Pasid { did, pasid }),
            Self::Iotlb { did } => Descriptor256::iotlb(IotlbScope::Domain(did)),
            Self::PasidIotlb { did, pasid } => Descriptor256::pasid_iotlb(PasidIotlbScope::Pasid { did, pasid }),
        }
    }

    /// The IOTLB invalidation that drops what `entry` may have cached.
    fn iotlb_for(entry: PasidEntry, pasid: u32) -> Self {
        match entry.pgtt() {
            Some(Pgtt::FirstStage | Pgtt::PassThrough) => Self::PasidIotlb { did: entry.did(), pasid },
            _ => Self::Iotlb { did: entry.did() },
        }
    }
}

/// What the unit must invalidate after a change, in this order, followed
/// by an invalidation wait.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "the unit must issue these invalidations"]
pub struct Invalidations {
    /// Needed whatever the unit: a present entry was removed.
    pub required: Vec<Invalidation>,
    /// Needed only when CAP.CM = 1 (caching mode: not-present entries may
    /// be cached). Without caching mode, not-present to present needs no
    /// invalidation.
    pub caching_mode: Vec<Invalidation>,
}

impl Invalidations {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.required.is_empty() && self.caching_mode.is_empty()
    }
    /// The list for a unit with or without caching mode.
    pub fn for_unit(&self, caching_mode: bool) -> Vec<Invalidation> {
        let mut v = self.required.clone();
        if caching_mode {
            v.extend_from_slice(&self.caching_mode);
        }
        v
    }
    /// The 256-bit descriptors for a unit with or without caching mode
    /// (the caller appends the wait).
    pub fn descriptors(&self, caching_mode: bool) -> Vec<Descriptor256> {
        self.for_unit(caching_mode).into_iter().map(Invalidation::descriptor).collect()
    }
}

// ---------------------------------------------------------------------------
// The tables
// ---------------------------------------------------------------------------

/// Why a table change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TablesError {
    /// No page for a table.
    NoMemory,
    /// The device's PASID-0 entry is present: [`ScalableTables::block`]
    /// it and issue the invalidations first.
    Busy { sid: u16, current: PasidEntry },
    /// A parameter no entry can encode.
    Invalid(&'static str),
}

impl fmt::Display for TablesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMemory => write!(f, "out of memory for scalable-mode tables"),
            Self::Busy { sid, current } => {
                write!(f, "device {sid:#06x} has a present PASID entry ({current:?}); block it first")
            }
            Self::Invalid(what) => write!(f, "invalid argument: {what}"),
        }
    }
}

/// Everything on one device's path, read back from the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceEntries {
    /// The root entry of its bus.
    pub root: ScalableRootEntry,
    /// Its context entry.
    pub context: ScalableContextEntry,
    /// The directory entry for PASID 0.
    pub dir: PasidDirEntry,
    /// Its PASID-0 entry.
    pub pasid: PasidEntry,
}

/// The pages of one device.
#[derive(Debug, Clone, Copy)]
struct DevicePages {
    dir: u64,
    table: u64,
}

/// Scalable-mode root, context, PASID-directory and PASID tables of one
/// unit. Point RTADDR at [`Self::rtaddr`].
#[derive(Debug)]
pub struct ScalableTables<T: TableMemory> {
    mem: T,
    root: u64,
    /// Context tables per bus: [lower, upper].
    context: BTreeMap<u8, [Option<u64>; 2]>,
    devices: BTreeMap<u16, DevicePages>,
    snoop: Snoop,
    pass_through_aw: u8,
    /// Entries of PASIDs other than RID_PASID (`pasids.rs`).
    pasids: pasids::PasidState,
}

impl<T: TableMemory> ScalableTables<T> {
    /// Allocates the root table; every device is blocked (no context
    /// entry).
    pub fn new(mut mem: T) -> Result<Self, TablesError> {
        let root = mem.alloc_table().ok_or(TablesError::NoMemory)?;
        Ok(Self {
            mem,
            root,
            context: BTreeMap::new(),
            devices: BTreeMap::new(),
            snoop: Snoop::default(),
            pass_through_aw: 2,
            pasids: pasids::PasidState::default(),
        })
    }

    /// Snoop controls for entries made from now on (set PGSNP only with
    /// ECAP.SC, PWSNP only with ECAP.SMPWC).
    pub fn set_snoop(&mut self, snoop: Snoop) {
        self.snoop = snoop;
    }

    /// AW written into pass-through entries (default 2).
    pub fn set_pass_through_aw(&mut self, aw: u8) {
        self.pass_through_aw = aw & 7;
    }

    /// The root table's address.
    pub fn root_table(&self) -> u64 {
        self.root
    }

    /// The RTADDR value: the root table with TTM = 01b (scalable mode).
    pub fn rtaddr(&self) -> u64 {
        self.root | RTADDR_TTM_SCALABLE
    }

    /// The table memory.
    pub fn memory(&self) -> &T {
        &self.mem
    }

    /// The table memory, mutably (domains allocate from the same pool).
    pub fn memory_mut(&mut self) -> &mut T {
        &mut self.mem
    }

    /// The context table serving `bus` and `devfn`, if made.
    pub fn context_table(&self, bus: u8, devfn: u8) -> Option<u64> {
        self.context.get(&bus).and_then(|h| h[ScalableRootEntry::half_for(devfn)])
    }

    /// The PASID directory and PASID-0 table of `sid`, if made.
    pub fn pasid_pages(&self, sid: u16) -> Option<(u64, u64)> {
        self.devices.get(&sid).map(|d| (d.dir, d.table))
    }

    /// Points `sid` at the second-stage table `root` of width `aw` for
    /// domain `did` (PGTT 010b).
    pub fn set_second_stage(&mut self, sid: u16, root: u64, aw: u8, did: u16) -> Result<Invalidations, TablesError> {
        check_table(root)?;
        let e =
            PasidEntry::second_stage(root, aw, did, self.snoop).ok_or(TablesError::Invalid("AW must be 1, 2 or 3"))?;
        self.install(sid, e)
    }

    /// As [`Self::set_second_stage`], with SSADE set when `ssade` (the unit
    /// records accessed and dirty bits in the table's leaves).
    pub fn set_second_stage_ad(
        &mut self,
        sid: u16,
        root: u64,
        aw: u8,
        did: u16,
        ssade: bool,
    ) -> Result<Invalidations, TablesError> {
        check_table(root)?;
        let e =
            PasidEntry::second_stage(root, aw, did, self.snoop).ok_or(TablesError::Invalid("AW must be 1, 2 or 3"))?;
        self.install(sid, e.with_ssade(ssade))
    }

    /// Turns SSADE on or off in `sid`'s present second-stage or nested
    /// PASID-0 entry (both walk a second-stage table),
    /// in place: word 0 is rewritten whole with P still set, so the device
    /// keeps translating (blocking it would fault its DMA in flight). The
    /// unit may hold the old entry in its PASID cache and translations in
    /// its IOTLB made without recording: both are invalidated. Nothing to
    /// do when SSADE already is as asked.
    pub fn set_ssade(&mut self, sid: u16, on: bool) -> Result<Invalidations, TablesError> {
        let dev = self.devices.get(&sid).copied().ok_or(TablesError::Invalid("device has no PASID entry"))?;
        let (_, first) = pasid_slot(RID_PASID);
        let old = self.read_pasid(dev.table, first);
        if !old.present() || !matches!(old.pgtt(), Some(Pgtt::SecondStage | Pgtt::Nested)) {
            return Err(TablesError::Invalid("SSADE needs a present second-stage or nested PASID entry"));
        }
        if old.ssade() == on {
            return Ok(Invalidations::default());
        }
        self.mem.write(dev.table, first, old.with_ssade(on).0[0]);
        self.flush(dev.table, first, 1);
        Ok(Invalidations {
            required: alloc::vec![
                Invalidation::PasidCache { did: old.did(), pasid: RID_PASID },
                Invalidation::Iotlb { did: old.did() }
            ],
            caching_mode: Vec::new(),
        })
    }

    /// The devices whose PASID-0 entry is present with domain `did`.
    pub fn devices_of(&self, did: u16) -> Vec<u16> {
        let (_, first) = pasid_slot(RID_PASID);
        self.devices
            .iter()
            .filter(|(_, d)| {
                let e = self.read_pasid(d.table, first);
                e.present() && e.did() == did
            })
            .map(|(sid, _)| *sid)
            .collect()
    }

    /// Points `sid` at the first-stage (x86) table `root` of `levels` (4 or
    /// 5) for domain `did` (PGTT 001b).
    pub fn set_first_stage(
        &mut self,
        sid: u16,
        root: u64,
        levels: u32,
        did: u16,
    ) -> Result<Invalidations, TablesError> {
        check_table(root)?;
        let e = PasidEntry::first_stage(root, levels, did, self.snoop)
            .ok_or(TablesError::Invalid("first-stage levels must be 4 or 5"))?;
        self.install(sid, e)
    }

    /// Points `sid` at nested translation (PGTT 011b): the caller's
    /// first-stage table `fs`, then the second-stage table `ss_root` of
    /// width `aw`, domain `did`, with SSADE when `ssade`.
    pub fn set_nested(
        &mut self,
        sid: u16,
        fs: FirstStageTable,
        ss_root: u64,
        aw: u8,
        did: u16,
        ssade: bool,
    ) -> Result<Invalidations, TablesError> {
        check_table(ss_root)?;
        let e = PasidEntry::nested(fs, ss_root, aw, did, self.snoop)
            .ok_or(TablesError::Invalid("nested: AW must be 1, 2 or 3 and first-stage levels 4 or 5"))?;
        self.install(sid, e.with_ssade(ssade))
    }

    /// Lets `sid` DMA untranslated (PGTT 100b, needs ECAP.PT), tagged with
    /// domain `did`.
    pub fn set_pass_through(&mut self, sid: u16, did: u16) -> Result<Invalidations, TablesError> {
        self.install(sid, PasidEntry::pass_through(did, self.pass_through_aw))
    }

    /// Blocks `sid`: clears its PASID-0 entry (present bit first). Returns
    /// the invalidations for the entry it removed (none if it was not
    /// present).
    pub fn block(&mut self, sid: u16) -> Invalidations {
        let Some(dev) = self.devices.get(&sid).copied() else { return Invalidations::default() };
        let table = dev.table;
        let (_, first) = pasid_slot(RID_PASID);
        let old = self.read_pasid(table, first);
        if !old.present() {
            return Invalidations::default();
        }
        self.mem.write(table, first, 0);
        for k in 1..8 {
            self.mem.write(table, first + k, 0);
        }
        self.flush(table, first, 8);
        Invalidations {
            required: alloc::vec![
                Invalidation::PasidCache { did: old.did(), pasid: RID_PASID },
                Invalidation::iotlb_for(old, RID_PASID)
            ],
            caching_mode: Vec::new(),
        }
    }

    /// What the unit sees for `sid`, followed from the root table; `None`
    /// when some level on the way is not present (the PASID entry itself
    /// is returned even when not present).
    pub fn entry(&self, sid: u16) -> Option<DeviceEntries> {
        let bus = (sid >> 8) as usize;
        let devfn = sid as u8;
        let root = ScalableRootEntry([self.mem.read(self.root, bus * 2), self.mem.read(self.root, bus * 2 + 1)]);
        let ctx_table = root.table_for(devfn)?;
        let ci = (devfn & 0x7f) as usize * 4;
        let context = ScalableContextEntry(core::array::from_fn(|k| self.mem.read(ctx_table, ci + k)));
        if !context.present() {
            return None;
        }
        let (dir_index, first) = pasid_slot(RID_PASID);
        let dir = PasidDirEntry(self.mem.read(context.pasid_dir(), dir_index));
        if !dir.present() {
            return None;
        }
        let pasid = self.read_pasid(dir.table(), first);
        Some(DeviceEntries { root, context, dir, pasid })
    }

    fn read_pasid(&self, table: u64, first: usize) -> PasidEntry {
        PasidEntry(core::array::from_fn(|k| self.mem.read(table, first + k)))
    }

    /// Flushes the lines covering `words` entries from `index` of `table`.
    fn flush(&mut self, table: u64, index: usize, words: usize) {
        if self.mem.coherent() {
            return;
        }
        let start = (table + index as u64 * 8) & !(CACHE_LINE - 1);
        let end = table + (index + words) as u64 * 8;
        self.mem.flush(start, end - start);
    }

    fn install(&mut self, sid: u16, entry: PasidEntry) -> Result<Invalidations, TablesError> {
        let bus = (sid >> 8) as u8;
        let devfn = sid as u8;
        let half = ScalableRootEntry::half_for(devfn);

        if let Some(dev) = self.devices.get(&sid) {
            let current = self.read_pasid(dev.table, pasid_slot(RID_PASID).1);
            if current.present() {
                return Err(TablesError::Busy { sid, current });
            }
        }

        // Allocate everything first, so a failure leaves the tables as
        // they were.
        let mut fresh: Vec<u64> = Vec::new();
        let alloc = |mem: &mut T, fresh: &mut Vec<u64>| -> Result<u64, TablesError> {
            match mem.alloc_table() {
                Some(t) => {
                    fresh.push(t);
                    Ok(t)
                }
                None => {
                    for t in fresh.drain(..) {
                        mem.free_table(t);
                    }
                    Err(TablesError::NoMemory)
                }
            }
        };
        let existing_ctx = self.context_table(bus, devfn);
        let ctx_table = match existing_ctx {
            Some(t) => t,
            None => alloc(&mut self.mem, &mut fresh)?,
        };
        let dev = match self.devices.get(&sid) {
            Some(d) => *d,
            None => {
                let dir = alloc(&mut self.mem, &mut fresh)?;
                let table = alloc(&mut self.mem, &mut fresh)?;
                DevicePages { dir, table }
            }
        };
        let new_device = !self.devices.contains_key(&sid);

        // 1. The PASID-table entry: words 7..1, then word 0 with P.
        let (_, first) = pasid_slot(RID_PASID);
        for k in (1..8).rev() {
            self.mem.write(dev.table, first + k, entry.0[k]);
        }
        self.mem.write(dev.table, first, entry.0[0]);
        self.flush(dev.table, first, 8);

        let mut caching_mode = Vec::new();
        if new_device {
            // 2. The directory entry for PASIDs 0-63.
            let (di, _) = pasid_slot(RID_PASID);
            self.mem.write(dev.dir, di, PasidDirEntry::new(dev.table).0);
            self.flush(dev.dir, di, 1);

            // 3. The context entry: words 3..1, then word 0 with P.
            let ctx = self.new_context_entry(dev.dir);
            let ci = (devfn & 0x7f) as usize * 4;
            for k in (1..4).rev() {
                self.mem.write(ctx_table, ci + k, ctx.0[k]);
            }
            self.mem.write(ctx_table, ci, ctx.0[0]);
            self.flush(ctx_table, ci, 4);
            self.devices.insert(sid, dev);

            // 4. The root entry's half, one word.
            if existing_ctx.is_none() {
                let ri = bus as usize * 2 + half;
                self.mem.write(self.root, ri, ScalableRootEntry::half_word(ctx_table));
                self.flush(self.root, ri, 1);
                self.context.entry(bus).or_default()[half] = Some(ctx_table);
                caching_mode.push(Invalidation::ContextCacheGlobal);
            } else {
                caching_mode.push(Invalidation::ContextCacheDevice { sid });
            }
        }
        caching_mode.push(Invalidation::PasidCache { did: entry.did(), pasid: RID_PASID });
        caching_mode.push(Invalidation::iotlb_for(entry, RID_PASID));
        Ok(Invalidations { required: Vec::new(), caching_mode })
    }
}

/// Where `pasid` lives: (its PASID-directory index, the index of its first
/// word in the PASID table).
fn pasid_slot(pasid: u32) -> (usize, usize) {
    ((pasid >> 6) as usize, (pasid & 0x3f) as usize * 8)
}

fn check_table(root: u64) -> Result<(), TablesError> {
    if root & 0xfff != 0 || root == 0 {
        return Err(TablesError::Invalid("table root must be a nonzero 4 KiB-aligned address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_descriptors() {
        use super::Descriptor256 as D;
        assert_eq!(Invalidation::ContextCacheGlobal.descriptor(), D([0x11, 0, 0, 0]));
        assert_eq!(Invalidation::ContextCacheDevice { sid: 0x108 }.descriptor(), D([0x31 | 0x108 << 32, 0, 0, 0]));
        assert_eq!(Invalidation::PasidCache { did: 4, pasid: 0 }.descriptor(), D([0x17 | 4 << 16, 0, 0, 0]));
        assert_eq!(Invalidation::Iotlb { did: 4 }.descriptor(), D([0x2 | 0x20 | 0xc0 | 4 << 16, 0, 0, 0]));
        assert_eq!(Invalidation::PasidIotlb { did: 4, pasid: 0 }.descriptor(), D([0x26 | 4 << 16, 0, 0, 0]));
    }
}
