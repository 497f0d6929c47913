//! Requests with a PASID on a scalable-mode unit: attaching, replacing and
//! detaching the PASID-table entry of a PASID other than 0 (PASID 0 is the
//! requester id's own translation, [`Unit::attach`] and [`Unit::detach`]).
//!
//! The order of a detach, as the spec's guidance to software (6.5.3.3)
//! asks and Linux's `intel_pasid_tear_down_entry` does it: the present bit
//! is cleared (then the rest of the entry) and the line flushed; a
//! PASID-selective PASID-cache invalidation under the old domain id; the
//! IOTLB of the old translation (PASID-selective PASID-based IOTLB
//! invalidation for a first-stage entry, domain-selective IOTLB
//! invalidation for a second-stage one); a Device-TLB invalidation would
//! follow with ATS, which this driver never enables; then one wait.
//!
//! A replace (a PASID moving from one domain to another) goes the same way
//! through not present before the new entry is written: a 512-bit entry
//! cannot be rewritten atomically, and the tables never overwrite a
//! present entry (see [`crate::scalable`]). Requests tagged with that PASID
//! fault while it is not present. (Linux 6.14's `intel_pasid_replace_*`
//! rewrites the entry in place and then flushes under the old domain id;
//! the parent module's rule keeps the walker from ever reading half of
//! one.)
//!
//! A failed invalidation is reported with the entry already cleared and
//! nothing freed: a leaf table whose directory entry was cleared is freed
//! only after the unit confirmed its PASID cache was invalidated.

use super::{Error, Unit};
use crate::Caps;
use crate::qi::{Descriptor256, PasidCacheScope};
use crate::scalable::{DIRECTORY_PASID_BITS, Invalidations, PasidEntry, RID_PASID, ScalableTables, TablesError};
use alloc::vec::Vec;
use io_pgtable::TableMemory;
use portcullis_iommu::mmio::Mmio;
use portcullis_iommu::{Clock, HwError, UnitError};

impl Caps {
    /// PASID width the unit supports: ECAP.PSS (bits 39:35, spec 11.4.3)
    /// plus one, when ECAP.PASID (bit 40) is set; 0 otherwise.
    pub fn pasid_bits(&self) -> u32 {
        if self.pasid() { ((self.ecap >> 35) & 0x1f) as u32 + 1 } else { 0 }
    }
}

impl<M: Mmio, T: TableMemory, C: Clock> Unit<M, T, C> {
    /// How many PASID bits requests through this unit may carry: PASIDs
    /// `1..1 << n` can be attached with [`Self::attach_pasid_second_stage`]
    /// and [`Self::attach_pasid_first_stage`]. 0 in legacy mode and on
    /// units without ECAP.PASID; otherwise ECAP.PSS + 1, at most 15 (the
    /// PASID directory is one page). The device's own PCI PASID capability
    /// is not read here: whoever enables PASID on the function bounds it
    /// by its width too.
    pub fn max_pasid_log2(&self) -> u32 {
        if self.scalable.is_none() { 0 } else { self.caps.pasid_bits().min(DIRECTORY_PASID_BITS) }
    }

    fn check_pasid(&self, pasid: u32) -> Result<(), Error> {
        if self.scalable.is_none() {
            return Err(self.err(HwError::Unsupported("requests with PASID need scalable mode")));
        }
        if !self.caps.pasid() {
            return Err(self.err(HwError::Unsupported("the unit takes no requests with PASID (ECAP.PASID)")));
        }
        if pasid == RID_PASID {
            return Err(self.err(HwError::Invalid("PASID 0 is the requester id's own translation")));
        }
        if pasid >> self.max_pasid_log2() != 0 {
            return Err(self.err(HwError::Invalid("PASID beyond the unit's PASID width")));
        }
        Ok(())
    }

    /// PASID `pasid` of device `sid` translates through the second-stage
    /// table `root` (`levels` levels) of domain `did`, SSADE set when
    /// `ssade`. A PASID attached elsewhere is moved (see the module
    /// documentation); the device's other PASIDs and PASID 0 are left
    /// alone.
    pub fn attach_pasid_second_stage(
        &mut self,
        sid: u16,
        pasid: u32,
        root: u64,
        levels: u32,
        did: u16,
        ssade: bool,
    ) -> Result<(), Error> {
        self.check_pasid(pasid)?;
        if ssade && !self.caps.dirty_tracking() {
            return Err(self.err(HwError::Unsupported("dirty tracking (ECAP.SSADS)")));
        }
        let aw = crate::entries::aw_for_levels(levels)
            .filter(|aw| self.caps.sagaw() >> aw & 1 != 0)
            .ok_or_else(|| self.err(HwError::Unsupported("page-table depth not in SAGAW")))?;
        self.pasid_change(sid, pasid, |t| t.set_pasid_second_stage(sid, pasid, root, aw, did, ssade))
    }

    /// PASID `pasid` of device `sid` translates through the first-stage
    /// table `root` (`levels` levels) of domain `did` (ECAP.FSTS needed).
    pub fn attach_pasid_first_stage(
        &mut self,
        sid: u16,
        pasid: u32,
        root: u64,
        levels: u32,
        did: u16,
    ) -> Result<(), Error> {
        self.check_pasid(pasid)?;
        if !self.caps.first_stage() {
            return Err(self.err(HwError::Unsupported("first-stage translation (ECAP.FSTS)")));
        }
        self.pasid_change(sid, pasid, |t| t.set_pasid_first_stage(sid, pasid, root, levels, did))
    }

    /// Blocks PASID `pasid` of device `sid` again; it must be attached to
    /// domain `did` (refused otherwise, nothing changed). The entry is
    /// cleared and invalidated (PASID cache, then IOTLB); a PASID table
    /// left with no present entry is unlinked from the directory and freed
    /// after a global PASID-cache invalidation.
    pub fn detach_pasid(&mut self, sid: u16, pasid: u32, did: u16) -> Result<(), Error> {
        self.check_pasid(pasid)?;
        match self.pasid_entry(sid, pasid) {
            Some(e) if e.present() && e.did() == did => {}
            _ => return Err(self.err(HwError::Invalid("the PASID is not attached to this domain"))),
        }
        let cm = self.caps.caching_mode();
        let inv = self.tables_mut()?.clear_pasid(sid, pasid);
        self.submit256(&inv.descriptors(cm))?;
        if let Some(leaf) = self.tables_mut()?.unlink_empty_leaf(sid, pasid) {
            // The unit may hold entries it read through the directory entry
            // just cleared: the leaf is reused only once they are gone.
            self.submit256(&[Descriptor256::pasid_cache(PasidCacheScope::Global)])?;
            self.tables_mut()?.memory_mut().free_table(leaf);
        }
        Ok(())
    }

    /// `sid`'s PASID-table entry for `pasid` as the unit reads it (`None`
    /// in legacy mode or when no table holds it).
    pub fn pasid_entry(&self, sid: u16, pasid: u32) -> Option<PasidEntry> {
        self.scalable.as_ref().and_then(|t| t.pasid_entry(sid, pasid))
    }

    /// The PASID table holding `sid`'s entry for `pasid`, if made.
    pub fn pasid_table(&self, sid: u16, pasid: u32) -> Option<u64> {
        self.scalable.as_ref().and_then(|t| t.pasid_table(sid, pasid))
    }

    /// The PASIDs a first-stage domain `did` is invalidated under: 0 and
    /// every PASID whose entry carries `did`.
    pub(super) fn pasids_to_invalidate(&self, did: u16) -> Vec<u32> {
        let mut v = alloc::vec![RID_PASID];
        if let Some(t) = &self.scalable {
            v.extend(t.pasids_of(did));
        }
        v
    }

    /// SSADE on or off in every second-stage entry of a PASID >= 1 that
    /// carries `did` (PASID 0's are done by [`Self::set_dirty_tracking`]).
    pub(super) fn set_pasids_dirty_tracking(&mut self, did: u16, on: bool) -> Result<(), Error> {
        let users = match &self.scalable {
            Some(t) => t.pasid_users_of(did),
            None => return Ok(()),
        };
        let cm = self.caps.caching_mode();
        for (sid, pasid) in users {
            let inv = self.tables_mut()?.set_pasid_ssade(sid, pasid, on).map_err(|e| self.tables_err(e))?;
            self.submit_invalidations(&inv, cm)?;
        }
        Ok(())
    }

    fn tables_mut(&mut self) -> Result<&mut ScalableTables<T>, Error> {
        let unit = self.base;
        self.scalable.as_mut().ok_or(UnitError { unit, cause: HwError::Unsupported("not in scalable mode") })
    }

    fn tables_err(&self, e: TablesError) -> Error {
        self.err(match e {
            TablesError::NoMemory => HwError::NoMemory,
            TablesError::Invalid(what) => HwError::Invalid(what),
            TablesError::Busy { .. } => HwError::Invalid("PASID entry still present after clearing it"),
        })
    }

    fn submit_invalidations(&mut self, inv: &Invalidations, caching_mode: bool) -> Result<(), Error> {
        let d = inv.descriptors(caching_mode);
        if d.is_empty() { Ok(()) } else { self.submit256(&d) }
    }

    /// Runs the table change `f` for `pasid` of `sid`; when the PASID is
    /// attached elsewhere, clears it and invalidates first, then runs `f`
    /// again. Submits what the change asks for.
    fn pasid_change(
        &mut self,
        sid: u16,
        pasid: u32,
        f: impl Fn(&mut ScalableTables<T>) -> Result<Invalidations, TablesError>,
    ) -> Result<(), Error> {
        let cm = self.caps.caching_mode();
        let inv = match f(self.tables_mut()?) {
            Ok(inv) => inv,
            Err(TablesError::Busy { .. }) => {
                let cleared = self.tables_mut()?.clear_pasid(sid, pasid);
                self.submit_invalidations(&cleared, cm)?;
                f(self.tables_mut()?).map_err(|e| self.tables_err(e))?
            }
            Err(e) => return Err(self.tables_err(e)),
        };
        self.submit_invalidations(&inv, cm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pasid_width_from_ecap() {
        // QEMU 10.0.2, `x-scalable-mode=on,x-pasid-mode=on`: ECAP.PASID
        // with PSS = 0, one PASID bit.
        let qemu = Caps { cap: 0x00d2_008c_222f_0606, ecap: 0x0000_4900_80f0_0f4a };
        assert!(qemu.pasid());
        assert_eq!(qemu.pasid_bits(), 1);
        assert_eq!(Caps { cap: 0, ecap: 1 << 40 | 19 << 35 }.pasid_bits(), 20);
        assert_eq!(Caps { cap: 0, ecap: 19 << 35 }.pasid_bits(), 0, "PSS means nothing without ECAP.PASID");
    }
}
