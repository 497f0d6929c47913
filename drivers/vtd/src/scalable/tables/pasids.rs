//! PASIDs other than RID_PASID: the entries a device's requests tagged
//! with PASID `1..2^DIRECTORY_PASID_BITS` are translated through (VT-d spec
//! 9.5, 9.6), beside the PASID-0 entry the rest of [`ScalableTables`]
//! keeps.
//!
//! Where they live: PASID `p` has directory entry `p >> 6` and slot
//! `p & 63` of the PASID table that entry points at. PASIDs 0-63 share the
//! device's first table (the one holding PASID 0); every other group of 64
//! gets its own table (a *leaf*) when its first PASID is attached, and the
//! leaf is unlinked again once its last entry is cleared. The directory is
//! one page (PDTS = 2, 512 entries), so PASIDs stay below 2^15.
//!
//! The rules of the parent module hold here too: an entry is complete
//! before anything points at it, the word with the present bit is written
//! last and cleared first, lines are flushed for a walker that does not
//! snoop, no present entry is overwritten ([`TablesError::Busy`]), and no
//! invalidation is issued here: each change returns what the unit must
//! submit. An unlinked leaf is handed back, not freed: the unit frees it
//! after its caches dropped the directory entry.
//!
//! Domain ids of present entries are kept in memory (`users`), so the
//! unit can find every PASID a first-stage domain must invalidate under.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use io_pgtable::TableMemory;

use super::{DevicePages, Invalidation, Invalidations, ScalableTables, TablesError, check_table, pasid_slot};
use crate::scalable::entries::{
    PDTS_ONE_PAGE, PasidDirEntry, PasidEntry, Pgtt, RID_PASID, ScalableContextEntry, ScalableRootEntry,
};

/// PASID bits a one-page PASID directory covers: 512 directory entries of
/// 64 PASIDs each, PASIDs below 2^15.
pub const DIRECTORY_PASID_BITS: u32 = 15;

/// Words in a PASID-table entry (512 bits).
const ENTRY_WORDS: usize = 8;
/// Entries in a PASID table.
const TABLE_ENTRIES: usize = 64;

/// What the tables keep for PASIDs other than RID_PASID.
#[derive(Debug, Default)]
pub(super) struct PasidState {
    /// PASID tables beyond a device's first, by (requester id, directory
    /// index >= 1).
    leaves: BTreeMap<(u16, usize), u64>,
    /// Domain id of every present entry of a PASID >= 1, by (requester
    /// id, PASID).
    users: BTreeMap<(u16, u32), u16>,
    /// Context entries made from now on get PASIDE.
    paside: bool,
}

fn check_pasid(pasid: u32) -> Result<(), TablesError> {
    if pasid == RID_PASID {
        return Err(TablesError::Invalid("PASID 0 is the requester id's own entry"));
    }
    if pasid >> DIRECTORY_PASID_BITS != 0 {
        return Err(TablesError::Invalid("PASID beyond the one-page PASID directory (2^15)"));
    }
    Ok(())
}

impl<T: TableMemory> ScalableTables<T> {
    /// Context entries made from now on have PASIDE set (requests with a
    /// PASID are looked up in the device's PASID directory), for units with
    /// ECAP.PASID. Entries already present keep what they have.
    pub fn set_paside(&mut self, on: bool) {
        self.pasids.paside = on;
    }

    /// The context entry a new device gets: its PASID directory, one page.
    pub(super) fn new_context_entry(&self, dir: u64) -> ScalableContextEntry {
        let c = ScalableContextEntry::new(dir, PDTS_ONE_PAGE);
        if self.pasids.paside { c.with_paside() } else { c }
    }

    /// The PASID table holding the entries of directory index `dir_index`
    /// of `sid`, if made.
    fn leaf_of(&self, sid: u16, dir_index: usize) -> Option<u64> {
        let dev = self.devices.get(&sid)?;
        if dir_index == 0 { Some(dev.table) } else { self.pasids.leaves.get(&(sid, dir_index)).copied() }
    }

    /// The PASID table holding `pasid`'s entry of `sid`, if made.
    pub fn pasid_table(&self, sid: u16, pasid: u32) -> Option<u64> {
        self.leaf_of(sid, pasid_slot(pasid).0)
    }

    /// `sid`'s entry for `pasid` (present or not), `None` when the table
    /// that would hold it was never made.
    pub fn pasid_entry(&self, sid: u16, pasid: u32) -> Option<PasidEntry> {
        let (di, first) = pasid_slot(pasid);
        self.leaf_of(sid, di).map(|t| self.read_pasid(t, first))
    }

    /// The PASIDs (>= 1) whose present entry carries domain `did`, on any
    /// device, ascending and without repeats.
    pub fn pasids_of(&self, did: u16) -> Vec<u32> {
        let mut v: Vec<u32> = self.pasids.users.iter().filter(|(_, d)| **d == did).map(|((_, p), _)| *p).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The (requester id, PASID >= 1) pairs whose present entry carries
    /// domain `did`.
    pub fn pasid_users_of(&self, did: u16) -> Vec<(u16, u32)> {
        self.pasids.users.iter().filter(|(_, d)| **d == did).map(|(k, _)| *k).collect()
    }

    /// Points PASID `pasid` (1 up to 2^15 - 1) of `sid` at the
    /// second-stage table `root` of width `aw` for domain `did` (PGTT
    /// 010b), SSADE as `ssade`.
    pub fn set_pasid_second_stage(
        &mut self,
        sid: u16,
        pasid: u32,
        root: u64,
        aw: u8,
        did: u16,
        ssade: bool,
    ) -> Result<Invalidations, TablesError> {
        check_table(root)?;
        let e =
            PasidEntry::second_stage(root, aw, did, self.snoop).ok_or(TablesError::Invalid("AW must be 1, 2 or 3"))?;
        self.install_pasid(sid, pasid, e.with_ssade(ssade))
    }

    /// Points PASID `pasid` of `sid` at the first-stage (x86) table `root`
    /// of `levels` (4 or 5) for domain `did` (PGTT 001b).
    pub fn set_pasid_first_stage(
        &mut self,
        sid: u16,
        pasid: u32,
        root: u64,
        levels: u32,
        did: u16,
    ) -> Result<Invalidations, TablesError> {
        check_table(root)?;
        let e = PasidEntry::first_stage(root, levels, did, self.snoop)
            .ok_or(TablesError::Invalid("first-stage levels must be 4 or 5"))?;
        self.install_pasid(sid, pasid, e)
    }

    /// Turns SSADE on or off in the present second-stage entry of `pasid`
    /// (>= 1) of `sid`, in place (word 0 rewritten whole with P set, as
    /// [`Self::set_ssade`] does for PASID 0).
    pub fn set_pasid_ssade(&mut self, sid: u16, pasid: u32, on: bool) -> Result<Invalidations, TablesError> {
        check_pasid(pasid)?;
        let (di, first) = pasid_slot(pasid);
        let table = self.leaf_of(sid, di).ok_or(TablesError::Invalid("PASID has no entry"))?;
        let old = self.read_pasid(table, first);
        if !old.present() || old.pgtt() != Some(Pgtt::SecondStage) {
            return Err(TablesError::Invalid("SSADE needs a present second-stage PASID entry"));
        }
        if old.ssade() == on {
            return Ok(Invalidations::default());
        }
        self.mem.write(table, first, old.with_ssade(on).0[0]);
        self.flush(table, first, 1);
        Ok(Invalidations {
            required: alloc::vec![
                Invalidation::PasidCache { did: old.did(), pasid },
                Invalidation::Iotlb { did: old.did() }
            ],
            caching_mode: Vec::new(),
        })
    }

    /// Clears `sid`'s entry for `pasid` (present bit first, then the other
    /// words). Returns the invalidations for the entry removed (none if it
    /// was not present): PASID-selective PASID-cache invalidation under
    /// its domain id, then the IOTLB (PASID-based for first-stage and
    /// pass-through entries, domain-selective otherwise). PASID 0 is
    /// [`Self::block`].
    pub fn clear_pasid(&mut self, sid: u16, pasid: u32) -> Invalidations {
        if pasid == RID_PASID {
            return self.block(sid);
        }
        let (di, first) = pasid_slot(pasid);
        let Some(table) = self.leaf_of(sid, di) else { return Invalidations::default() };
        let old = self.read_pasid(table, first);
        if !old.present() {
            return Invalidations::default();
        }
        self.mem.write(table, first, 0);
        for k in 1..ENTRY_WORDS {
            self.mem.write(table, first + k, 0);
        }
        self.flush(table, first, ENTRY_WORDS);
        self.pasids.users.remove(&(sid, pasid));
        Invalidations {
            required: alloc::vec![
                Invalidation::PasidCache { did: old.did(), pasid },
                Invalidation::iotlb_for(old, pasid)
            ],
            caching_mode: Vec::new(),
        }
    }

    /// When no entry of the leaf holding `pasid` (a table beyond the
    /// device's first) is present any more: clears its directory entry and
    /// returns the leaf, which the caller frees once the unit's PASID cache
    /// was invalidated (it may hold entries read through the directory
    /// entry). `None` (nothing changed) otherwise.
    pub fn unlink_empty_leaf(&mut self, sid: u16, pasid: u32) -> Option<u64> {
        let (di, _) = pasid_slot(pasid);
        if di == 0 {
            return None;
        }
        let leaf = *self.pasids.leaves.get(&(sid, di))?;
        if (0..TABLE_ENTRIES).any(|k| self.read_pasid(leaf, k * ENTRY_WORDS).present()) {
            return None;
        }
        let dir = self.devices.get(&sid)?.dir;
        self.mem.write(dir, di, 0);
        self.flush(dir, di, 1);
        self.pasids.leaves.remove(&(sid, di));
        Some(leaf)
    }

    fn install_pasid(&mut self, sid: u16, pasid: u32, entry: PasidEntry) -> Result<Invalidations, TablesError> {
        check_pasid(pasid)?;
        if let Some(current) = self.pasid_entry(sid, pasid).filter(|e| e.present()) {
            return Err(TablesError::Busy { sid, current });
        }
        let (bus, devfn) = ((sid >> 8) as u8, sid as u8);
        let (di, first) = pasid_slot(pasid);
        let existing_ctx = self.context_table(bus, devfn);
        let existing_dev = self.devices.get(&sid).copied();
        let existing_leaf = self.leaf_of(sid, di);

        // Allocate everything first, so a failure leaves the tables as
        // they were: a context table for a new bus half, the directory
        // and first table of a new device, the leaf of a new group of 64.
        let want = usize::from(existing_ctx.is_none())
            + if existing_dev.is_none() { 2 } else { 0 }
            + usize::from(di != 0 && existing_leaf.is_none());
        let mut fresh: Vec<u64> = Vec::with_capacity(want);
        for _ in 0..want {
            match self.mem.alloc_table() {
                Some(t) => fresh.push(t),
                None => {
                    for t in fresh {
                        self.mem.free_table(t);
                    }
                    return Err(TablesError::NoMemory);
                }
            }
        }
        let mut next = fresh.into_iter();
        let mut take = || next.next().ok_or(TablesError::NoMemory);
        let ctx_table = match existing_ctx {
            Some(t) => t,
            None => take()?,
        };
        let dev = match existing_dev {
            Some(d) => d,
            None => DevicePages { dir: take()?, table: take()? },
        };
        let leaf = match (di, existing_leaf) {
            (0, _) => dev.table,
            (_, Some(t)) => t,
            (_, None) => take()?,
        };

        // 1. The entry: words 7..1, then word 0 with P.
        for k in (1..ENTRY_WORDS).rev() {
            self.mem.write(leaf, first + k, entry.0[k]);
        }
        self.mem.write(leaf, first, entry.0[0]);
        self.flush(leaf, first, ENTRY_WORDS);

        // 2. A new leaf into the directory.
        if di != 0 && existing_leaf.is_none() {
            self.mem.write(dev.dir, di, PasidDirEntry::new(leaf).0);
            self.flush(dev.dir, di, 1);
            self.pasids.leaves.insert((sid, di), leaf);
        }

        // 3. A new device: its first table, context and root entries.
        let mut caching_mode = Vec::new();
        if existing_dev.is_none() {
            caching_mode.push(self.link_device(sid, dev, ctx_table, existing_ctx.is_none()));
        }
        self.pasids.users.insert((sid, pasid), entry.did());
        caching_mode.push(Invalidation::PasidCache { did: entry.did(), pasid });
        caching_mode.push(Invalidation::iotlb_for(entry, pasid));
        Ok(Invalidations { required: Vec::new(), caching_mode })
    }

    /// Makes the device `sid` reachable, bottom up: directory entry 0 to
    /// its first table (whose PASID-0 entry stays not present: requests
    /// without PASID are blocked, as before), its context entry, and the
    /// root entry's half when `new_ctx_table`. Returns the context-cache
    /// invalidation a caching-mode unit needs.
    fn link_device(&mut self, sid: u16, dev: DevicePages, ctx_table: u64, new_ctx_table: bool) -> Invalidation {
        let (bus, devfn) = ((sid >> 8) as u8, sid as u8);
        let half = ScalableRootEntry::half_for(devfn);
        self.mem.write(dev.dir, 0, PasidDirEntry::new(dev.table).0);
        self.flush(dev.dir, 0, 1);
        let ctx = self.new_context_entry(dev.dir);
        let ci = (devfn & 0x7f) as usize * 4;
        for k in (1..4).rev() {
            self.mem.write(ctx_table, ci + k, ctx.0[k]);
        }
        self.mem.write(ctx_table, ci, ctx.0[0]);
        self.flush(ctx_table, ci, 4);
        self.devices.insert(sid, dev);
        if new_ctx_table {
            let ri = bus as usize * 2 + half;
            self.mem.write(self.root, ri, ScalableRootEntry::half_word(ctx_table));
            self.flush(self.root, ri, 1);
            self.context.entry(bus).or_default()[half] = Some(ctx_table);
            Invalidation::ContextCacheGlobal
        } else {
            Invalidation::ContextCacheDevice { sid }
        }
    }
}
