//! Devices: binding (directly, or under an owner object as the selftest's
//! mock device is), attach to a HWPT or an IOAS, detach and replace
//! (Linux's `device.c`).
//!
//! Invariants: a device is attached to at most one HWPT (`attached`) and
//! holds one reference on it; while attached, its reserved regions are
//! reserved in that HWPT's IOAS under `Owner::Device(id)`; an automatic
//! HWPT goes away with its last device. A device attached to nothing is
//! blocked: the IOMMU refuses its DMA.
//!
//! PASIDs (Linux 6.15): besides its requester id, each PASID of a device
//! may be attached to one HWPT (`pasids`, PASID -> HWPT id), holding one
//! reference on it. Only HWPTs allocated with `IOMMU_HWPT_ALLOC_PASID`
//! take PASIDs, and while a device has PASIDs attached its requester id
//! takes only such HWPTs too (Linux's `iommufd_hwpt_pasid_compat`).
//! Automatic HWPTs never have that flag, so they never hold a PASID. A
//! PASID attach reserves nothing in the IOAS: Linux reserves a device's
//! regions for its requester-id attach only. See DESIGN.md, "PASID".

use super::{Ictx, Object};
use crate::ctx::fault::{Fault, PageRequest};
use crate::ctx::hw_pagetable::Hwpt;
use crate::ctx::ioas::Ioas;
use crate::ctx::nested::{HwptNested, NestingOps};
use crate::errno::{Errno, Result};
use crate::iopt::Owner;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
use portcullis_iommu::{DeviceHandle, DeviceOps, DomainError};
use spin::Mutex;

/// Why [`Ictx::replace`] failed, and where that left the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplaceError {
    /// The move failed; the device is still attached to its old HWPT,
    /// exactly as before the call.
    Stayed(Errno),
    /// The device is attached to the new HWPT `hwpt`, but releasing the
    /// old automatic HWPT it left failed its final invalidation (that
    /// HWPT is gone; the pages it mapped stay pinned).
    Moved {
        /// The HWPT the device is attached to now.
        hwpt: u32,
        /// The failed invalidation.
        error: Errno,
    },
    /// The move failed (`error`), and the device could not go back: its
    /// old IOAS no longer leaves its reserved regions free, or its old
    /// domain refused it (`back`, a hardware refusal). The device is
    /// attached to nothing, so the IOMMU blocks its DMA; it holds no
    /// HWPT (an automatic old HWPT without other devices is gone) and can
    /// be attached again.
    Blocked {
        /// Why the new attach failed.
        error: Errno,
        /// Why going back failed.
        back: Errno,
    },
}

impl ReplaceError {
    /// The errno the uAPI reports: the failure of the move, or of the old
    /// HWPT's release when the device did move.
    pub fn errno(self) -> Errno {
        match self {
            Self::Stayed(e) | Self::Moved { error: e, .. } | Self::Blocked { error: e, .. } => e,
        }
    }
}

impl From<ReplaceError> for Errno {
    fn from(e: ReplaceError) -> Errno {
        e.errno()
    }
}

impl core::fmt::Display for ReplaceError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Stayed(e) => write!(f, "replace failed ({e}); the device stays on its old HWPT"),
            Self::Moved { hwpt, error } => {
                write!(f, "the device moved to HWPT {hwpt}, but releasing the old HWPT failed ({error})")
            }
            Self::Blocked { error, back } => {
                write!(f, "replace failed ({error}) and the device could not go back ({back}): it is blocked")
            }
        }
    }
}

impl core::error::Error for ReplaceError {}

/// A bound device.
pub struct Device {
    pub(super) ops: Arc<dyn DeviceOps>,
    /// The driver's nested-domain support, if it has any.
    pub(super) nesting: Option<Arc<dyn NestingOps>>,
    /// The HWPT it is attached to.
    pub(super) attached: Mutex<Option<u32>>,
    /// Its PASIDs attached to HWPTs: PASID -> HWPT id. Held across a whole
    /// attach, replace or detach of the device's requester id or of a
    /// PASID, so those of one device run one at a time (Linux's group
    /// lock); taken before the object table, an IOAS and a domain, never
    /// under them.
    pub(super) pasids: Mutex<BTreeMap<u32, u32>>,
    pub(super) refs: AtomicU32,
    /// How many attaches to HWPTs with a fault queue have IOPF on (0 or
    /// 1, 2 for a moment during a replace between two such HWPTs).
    pub(super) iopf_enabled: AtomicU32,
    /// Page requests of groups whose LAST_PAGE request has not come yet.
    pub(super) iopf_partial: Mutex<Vec<PageRequest>>,
}

impl Device {
    /// The device's handle (what its domains know it by).
    pub fn handle(&self) -> DeviceHandle {
        self.ops.handle()
    }
    /// The driver's hardware information for `IOMMU_GET_HW_INFO`.
    pub fn hw_info(&self) -> (u32, Vec<u8>) {
        self.ops.hw_info()
    }
    /// Whether its IOPF (page requests) is on: it is attached to a HWPT
    /// with a fault queue (the count of such attaches).
    pub fn iopf_enabled(&self) -> u32 {
        self.iopf_enabled.load(Ordering::SeqCst)
    }
    /// Whether its unit can track dirty pages (`IOMMU_HW_CAP_DIRTY_TRACKING`).
    pub fn supports_dirty_tracking(&self) -> bool {
        self.ops.supports_dirty_tracking()
    }
    /// Its PASID width (`IOMMU_GET_HW_INFO`'s `out_max_pasid_log2`): PASIDs
    /// `1..1 << n` can be attached; 0 when it has no PASIDs.
    pub fn max_pasid_log2(&self) -> u32 {
        self.ops.max_pasid_log2()
    }
    /// Whether PASID `pasid` exists on this device (the IOMMU core's range
    /// check: below `1 << max_pasid_log2`; never PASID 0, the requester
    /// id's own translation).
    fn pasid_in_range(&self, pasid: u32) -> bool {
        let bits = self.ops.max_pasid_log2();
        pasid != 0 && bits > 0 && (bits >= 32 || pasid < 1u32 << bits)
    }
}

impl core::fmt::Debug for Device {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Device({:?}, attached {:?})", self.ops.handle(), self.attached.lock())
    }
}

/// See [`Object::DeviceOwner`].
#[derive(Debug)]
pub struct DeviceOwner {
    /// The bound device's object id (0 until bound).
    pub dev_id: AtomicU32,
    pub(super) refs: AtomicU32,
}

impl Ictx {
    /// Binds a device; returns its object id. It starts detached.
    pub fn bind_device(&self, ops: Arc<dyn DeviceOps>) -> Result<u32> {
        self.bind_device_with(ops, None)
    }

    /// Binds a device whose driver can also build nested domains.
    pub fn bind_nesting_device<T: DeviceOps + NestingOps + 'static>(&self, ops: Arc<T>) -> Result<u32> {
        self.bind_device_with(ops.clone(), Some(ops))
    }

    fn bind_device_with(&self, ops: Arc<dyn DeviceOps>, nesting: Option<Arc<dyn NestingOps>>) -> Result<u32> {
        let dev = Device {
            ops,
            nesting,
            attached: Mutex::new(None),
            pasids: Mutex::new(BTreeMap::new()),
            refs: AtomicU32::new(0),
            iopf_enabled: AtomicU32::new(0),
            iopf_partial: Mutex::new(Vec::new()),
        };
        self.insert(Object::Device(Arc::new(dev)))
    }

    /// Takes an id for an owner object and binds `ops` under it (the
    /// selftest's mock device). Returns `(owner_id, device_id)`; the owner
    /// stays invisible until [`Self::finalize_owner`] (or goes with
    /// [`Self::abort_owner`]), as Linux's object under construction.
    pub fn bind_owned_device(&self, ops: Arc<dyn DeviceOps>) -> Result<(u32, u32)> {
        self.bind_owned_device_with(ops, None)
    }

    /// [`Self::bind_owned_device`] for a driver that can build nested
    /// domains.
    pub fn bind_owned_nesting_device<T: DeviceOps + NestingOps + 'static>(&self, ops: Arc<T>) -> Result<(u32, u32)> {
        self.bind_owned_device_with(ops.clone(), Some(ops))
    }

    fn bind_owned_device_with(
        &self,
        ops: Arc<dyn DeviceOps>,
        nesting: Option<Arc<dyn NestingOps>>,
    ) -> Result<(u32, u32)> {
        let owner_id = self.insert(Object::Placeholder(Arc::new(AtomicU32::new(0))))?;
        match self.bind_device_with(ops, nesting) {
            Ok(dev_id) => Ok((owner_id, dev_id)),
            Err(e) => {
                self.objects.lock().remove(&owner_id);
                Err(e)
            }
        }
    }

    /// Makes the owner from [`Self::bind_owned_device`] visible; destroying
    /// it from then on unbinds the device.
    pub fn finalize_owner(&self, owner_id: u32, dev_id: u32) {
        let owner = Arc::new(DeviceOwner { dev_id: AtomicU32::new(dev_id), refs: AtomicU32::new(0) });
        self.objects.lock().insert(owner_id, Object::DeviceOwner(owner));
    }

    /// Undoes [`Self::bind_owned_device`].
    pub fn abort_owner(&self, owner_id: u32, dev_id: u32) {
        let _ = self.unbind_device(dev_id);
        self.objects.lock().remove(&owner_id);
    }

    /// The owner object `id`.
    pub fn device_owner(&self, id: u32) -> Result<Arc<DeviceOwner>> {
        match self.get(id)? {
            Object::DeviceOwner(o) => Ok(o),
            _ => Err(Errno::ENOENT),
        }
    }

    /// Unbinds a device, detaching its PASIDs (in PASID order) and then
    /// its requester id first. A detach the hardware refuses stops the
    /// unbind there with its error: the device stays bound, with what is
    /// still attached (as [`Self::detach`] leaves it).
    pub fn unbind_device(&self, dev_id: u32) -> Result<()> {
        let dev = self.device(dev_id)?;
        let pasids: Vec<u32> = dev.pasids.lock().keys().copied().collect();
        for pasid in pasids {
            self.detach_pasid(dev_id, pasid)?;
        }
        self.detach(dev_id)?;
        if dev.refs.load(Ordering::SeqCst) != 0 {
            return Err(Errno::EBUSY);
        }
        self.objects.lock().remove(&dev_id);
        Ok(())
    }

    pub(super) fn reserve_device(&self, dev_id: u32, dev: &Device, ioas: &Ioas) -> Result<()> {
        let mut iopt = ioas.iopt.lock();
        for range in dev.ops.reserved_regions() {
            if let Err(e) = iopt.reserve(range, Owner::Device(dev_id)) {
                iopt.remove_reserved(Owner::Device(dev_id));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Attaches a device to a HWPT, or to an IOAS (reusing a compatible
    /// automatic HWPT or making one). Returns the HWPT id. `EINVAL` if the
    /// device is already attached (use [`Self::replace`]).
    pub fn attach(&self, dev_id: u32, pt_id: u32) -> Result<u32> {
        let dev = self.device(dev_id)?;
        // Held throughout: no PASID changes under the attach.
        let pasids = dev.pasids.lock();
        if dev.attached.lock().is_some() {
            return Err(Errno::EINVAL);
        }
        self.attach_to(dev_id, &dev, pt_id, !pasids.is_empty())
    }

    /// The requester-id attach of `dev` to `pt_id`; `has_pasids` says
    /// whether the device has PASIDs attached (the caller holds its
    /// `pasids`).
    pub(super) fn attach_to(&self, dev_id: u32, dev: &Arc<Device>, pt_id: u32, has_pasids: bool) -> Result<u32> {
        let handle = dev.ops.handle();
        let try_hwpt = |hwpt_id: u32, pt: &Pt| -> Result<u32> {
            // A domain tracking dirty pages takes only devices whose unit
            // records them.
            if matches!(pt, Pt::Paging(h) if h.dirty) && !dev.ops.supports_dirty_tracking() {
                return Err(Errno::EINVAL);
            }
            // A HWPT with a fault queue turns the device's IOPF on first.
            let iopf = Ictx::iopf_enable_for(dev, pt.fault().is_some());
            let iopf_off = || {
                if iopf {
                    Ictx::iopf_disable(dev);
                }
            };
            self.reserve_device(dev_id, dev, pt.ioas()).inspect_err(|_| iopf_off())?;
            // With PASIDs attached, the requester id takes only a HWPT
            // that can sit under them (Linux 6.15, after the reservation).
            if !pt.pasid_compat() && has_pasids {
                pt.ioas().iopt.lock().remove_reserved(Owner::Device(dev_id));
                iopf_off();
                return Err(Errno::EINVAL);
            }
            if let Err(e) = pt.attach_device(handle) {
                pt.ioas().iopt.lock().remove_reserved(Owner::Device(dev_id));
                iopf_off();
                // Incompatible is EINVAL (the caller tries the next
                // automatic HWPT); a hardware refusal EIO or ETIMEDOUT.
                return Err(crate::iopt::domain_errno(e));
            }
            pt.refs().fetch_add(1, Ordering::SeqCst);
            *dev.attached.lock() = Some(hwpt_id);
            Ok(hwpt_id)
        };
        match self.get(pt_id)? {
            Object::Hwpt(hwpt) => try_hwpt(pt_id, &Pt::Paging(hwpt)),
            Object::HwptNested(hwpt) => try_hwpt(pt_id, &Pt::Nested(hwpt)),
            Object::Ioas(ioas) => {
                let autos = ioas.auto_hwpts.lock().clone();
                for id in autos {
                    if let Ok(hwpt) = self.hwpt(id) {
                        match try_hwpt(id, &Pt::Paging(hwpt)) {
                            Ok(id) => return Ok(id),
                            Err(Errno::EINVAL) => continue,
                            Err(e) => return Err(e),
                        }
                    }
                }
                let (id, hwpt) = self.new_hwpt(pt_id, &ioas, dev, true, 0)?;
                match try_hwpt(id, &Pt::Paging(hwpt.clone())) {
                    Ok(id) => Ok(id),
                    Err(e) => {
                        self.objects.lock().remove(&id);
                        // A failed invalidation of the new domain is the
                        // more serious error.
                        self.release_hwpt(id, &hwpt)?;
                        Err(e)
                    }
                }
            }
            // Linux's iommufd_device_change_pt: any other object type.
            Object::Device(_)
            | Object::DeviceOwner(_)
            | Object::Access(_)
            | Object::Fault(_)
            | Object::Placeholder(_) => Err(Errno::EINVAL),
        }
    }

    /// Detaches a device (no-op when detached). An automatic HWPT goes
    /// away with its last device. When the domain cannot block the device
    /// (a hardware error), nothing changes: the device stays attached, so
    /// its HWPT, IOAS and pins stay too, and the error is returned.
    pub fn detach(&self, dev_id: u32) -> Result<()> {
        let dev = self.device(dev_id)?;
        // Held throughout: no PASID attach sees the requester id half-way.
        let _pasids = dev.pasids.lock();
        let Some(hwpt_id) = *dev.attached.lock() else { return Ok(()) };
        let pt = self.pt(hwpt_id)?;
        pt.detach_device(dev.ops.handle()).map_err(crate::iopt::domain_errno)?;
        *dev.attached.lock() = None;
        pt.ioas().iopt.lock().remove_reserved(Owner::Device(dev_id));
        Self::iopf_leave(dev_id, &dev, hwpt_id, 0, &pt);
        if pt.refs().fetch_sub(1, Ordering::SeqCst) == 1
            && let Pt::Paging(hwpt) = &pt
            && hwpt.auto
        {
            self.objects.lock().remove(&hwpt_id);
            // The device is detached either way.
            self.release_hwpt(hwpt_id, hwpt)?;
        }
        Ok(())
    }

    /// Moves an attached device to another HWPT or IOAS; returns the new
    /// HWPT id. The device is detached from its old domain first and, if
    /// the new attach fails, attached to it again: then it stays where it
    /// was ([`ReplaceError::Stayed`]). If going back fails too (the old
    /// IOAS now maps something in the device's reserved regions, or the
    /// old domain refuses the device: a hardware error), the device is
    /// left blocked, attached to nothing ([`ReplaceError::Blocked`]); it
    /// never panics.
    pub fn replace(&self, dev_id: u32, pt_id: u32) -> core::result::Result<u32, ReplaceError> {
        let dev = self.device(dev_id).map_err(ReplaceError::Stayed)?;
        // Held throughout: no PASID attach sees the requester id blocked
        // half-way through the move.
        let pasids = dev.pasids.lock();
        let Some(old) = *dev.attached.lock() else { return Err(ReplaceError::Stayed(Errno::EINVAL)) };
        if old == pt_id {
            return Ok(old);
        }
        // Keep the old HWPT alive while trying the new one.
        let old_hwpt = self.pt(old).map_err(ReplaceError::Stayed)?;
        // A domain that cannot let the device go keeps it: nothing changed.
        old_hwpt.detach_device(dev.ops.handle()).map_err(|e| ReplaceError::Stayed(crate::iopt::domain_errno(e)))?;
        old_hwpt.refs().fetch_add(1, Ordering::SeqCst);
        *dev.attached.lock() = None;
        old_hwpt.ioas().iopt.lock().remove_reserved(Owner::Device(dev_id));
        match self.attach_to(dev_id, &dev, pt_id, !pasids.is_empty()) {
            Ok(new) => {
                // The old HWPT's pending faults of this device are
                // answered; its IOPF hold goes.
                Self::iopf_leave(dev_id, &dev, old, 0, &old_hwpt);
                // Drop the attach's reference and our keep-alive.
                old_hwpt.refs().fetch_sub(1, Ordering::SeqCst);
                if old_hwpt.refs().fetch_sub(1, Ordering::SeqCst) == 1
                    && let Pt::Paging(h) = &old_hwpt
                    && h.auto
                {
                    self.objects.lock().remove(&old);
                    // The device is on the new HWPT either way; the old
                    // domain's failed invalidation is still reported.
                    self.release_hwpt(old, h).map_err(|error| ReplaceError::Moved { hwpt: new, error })?;
                }
                Ok(new)
            }
            Err(error) => match self.reattach(dev_id, &dev, &old_hwpt) {
                Ok(()) => {
                    old_hwpt.refs().fetch_sub(1, Ordering::SeqCst);
                    *dev.attached.lock() = Some(old);
                    Err(ReplaceError::Stayed(error))
                }
                Err(back) => {
                    // Blocked: drop the device's reference and our
                    // keep-alive, as a detach would.
                    Self::iopf_leave(dev_id, &dev, old, 0, &old_hwpt);
                    old_hwpt.refs().fetch_sub(1, Ordering::SeqCst);
                    if old_hwpt.refs().fetch_sub(1, Ordering::SeqCst) == 1
                        && let Pt::Paging(h) = &old_hwpt
                        && h.auto
                    {
                        self.objects.lock().remove(&old);
                        // A failed invalidation here leaves the old pages
                        // pinned; the replace's own failure is reported.
                        let _ = self.release_hwpt(old, h);
                    }
                    Err(ReplaceError::Blocked { error, back })
                }
            },
        }
    }

    /// Puts a device back on the HWPT a failed replace took it from: its
    /// reservations in the old IOAS, then the old domain. All or nothing.
    fn reattach(&self, dev_id: u32, dev: &Device, old: &Pt) -> Result<()> {
        self.reserve_device(dev_id, dev, old.ioas())?;
        if let Err(e) = old.attach_device(dev.ops.handle()) {
            old.ioas().iopt.lock().remove_reserved(Owner::Device(dev_id));
            return Err(crate::iopt::domain_errno(e));
        }
        Ok(())
    }

    /// A HWPT a device can be attached to: paging or nested.
    fn pt(&self, id: u32) -> Result<Pt> {
        match self.get(id)? {
            Object::Hwpt(h) => Ok(Pt::Paging(h)),
            Object::HwptNested(h) => Ok(Pt::Nested(h)),
            _ => Err(Errno::ENOENT),
        }
    }

    /// A device's requester id (`pasid` 0) or PASID `pasid` left HWPT
    /// `hwpt_id`: if it has a fault queue, the groups that came through
    /// that attachment are answered `INVALID` and its IOPF hold goes.
    fn iopf_leave(dev_id: u32, dev: &Device, hwpt_id: u32, pasid: u32, pt: &Pt) {
        if let Some(f) = pt.fault() {
            f.auto_respond(dev_id, hwpt_id, pasid);
            Self::iopf_disable(dev);
        }
    }

    /// The HWPT a device is attached to. Waits for an attach, replace or
    /// detach under way on the device, so a replace is never seen
    /// half-way (detached).
    pub fn attached_hwpt(&self, dev_id: u32) -> Result<Option<u32>> {
        let dev = self.device(dev_id)?;
        let _settled = dev.pasids.lock();
        Ok(*dev.attached.lock())
    }

    /// The HWPT PASID `pasid` of a device is attached to (`None` when it
    /// is blocked).
    pub fn attached_pasid_hwpt(&self, dev_id: u32, pasid: u32) -> Result<Option<u32>> {
        Ok(self.device(dev_id)?.pasids.lock().get(&pasid).copied())
    }

    /// The PASIDs of a device that are attached, with their HWPTs, in
    /// PASID order.
    pub fn attached_pasids(&self, dev_id: u32) -> Result<Vec<(u32, u32)>> {
        Ok(self.device(dev_id)?.pasids.lock().iter().map(|(p, h)| (*p, *h)).collect())
    }

    /// Attaches PASID `pasid` of a device to a HWPT, or to an IOAS (an
    /// automatic HWPT of it); returns the HWPT id (Linux 6.15's
    /// `iommufd_device_attach` with a PASID). The PASID's DMA then goes
    /// through that HWPT's domain; the requester id and other PASIDs are
    /// untouched.
    ///
    /// Errors, in Linux's order: `ENOENT` for a missing object, `EINVAL`
    /// for one that is not an IOAS or HWPT; per HWPT tried: `EBUSY` when
    /// the PASID is already attached (use [`Self::replace_pasid`]);
    /// `EINVAL` when the HWPT was not allocated with
    /// `IOMMU_HWPT_ALLOC_PASID` (automatic HWPTs never are, so an IOAS
    /// always ends in `EINVAL`, after trying a new automatic HWPT that is
    /// then released), or when the requester id is attached to such a
    /// HWPT; `EINVAL` for PASID 0 (the requester id: [`Self::attach`]) or
    /// a PASID past the device's width; then the driver's answer
    /// (`EOPNOTSUPP` from a domain without PASID support). On any error
    /// nothing changed.
    pub fn attach_pasid(&self, dev_id: u32, pasid: u32, pt_id: u32) -> Result<u32> {
        let dev = self.device(dev_id)?;
        let mut pasids = dev.pasids.lock();
        self.change_pasid(dev_id, &dev, &mut pasids, pasid, pt_id, false)
    }

    /// Moves an attached PASID to another HWPT (or an IOAS); returns the
    /// new HWPT id. `EINVAL` when the PASID is not attached; the new HWPT
    /// is checked as in [`Self::attach_pasid`] (but an attached PASID is
    /// no `EBUSY`, and its own HWPT is a success that changes nothing).
    /// The domain switches the PASID over in one step: when it fails, the
    /// PASID stays on its old HWPT, exactly as before.
    pub fn replace_pasid(&self, dev_id: u32, pasid: u32, pt_id: u32) -> Result<u32> {
        let dev = self.device(dev_id)?;
        let mut pasids = dev.pasids.lock();
        self.change_pasid(dev_id, &dev, &mut pasids, pasid, pt_id, true)
    }

    /// Detaches PASID `pasid` of a device: its DMA is blocked again. A
    /// PASID that is not attached is left alone (success), as in Linux.
    /// When the domain cannot block the PASID (a hardware error), nothing
    /// changes: the PASID stays attached and its HWPT referenced, and the
    /// error is returned (as [`Self::detach`] does for the requester id).
    pub fn detach_pasid(&self, dev_id: u32, pasid: u32) -> Result<()> {
        let dev = self.device(dev_id)?;
        let mut pasids = dev.pasids.lock();
        let Some(&hwpt_id) = pasids.get(&pasid) else { return Ok(()) };
        let pt = self.pt(hwpt_id)?;
        pt.detach_device_pasid(dev.ops.handle(), pasid).map_err(crate::iopt::domain_errno)?;
        pasids.remove(&pasid);
        Self::iopf_leave(dev_id, &dev, hwpt_id, pasid, &pt);
        // Never the last reference of an automatic HWPT: those hold no
        // PASIDs (module docs).
        pt.refs().fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    /// Attach (`replace` false) or replace of a PASID onto `pt_id`, with
    /// the device's PASID table held.
    fn change_pasid(
        &self,
        dev_id: u32,
        dev: &Device,
        pasids: &mut BTreeMap<u32, u32>,
        pasid: u32,
        pt_id: u32,
        replace: bool,
    ) -> Result<u32> {
        match self.get(pt_id)? {
            Object::Hwpt(h) => self.pasid_to(dev_id, dev, pasids, pasid, pt_id, &Pt::Paging(h), replace),
            Object::HwptNested(h) => self.pasid_to(dev_id, dev, pasids, pasid, pt_id, &Pt::Nested(h), replace),
            Object::Ioas(ioas) => {
                let autos = ioas.auto_hwpts.lock().clone();
                for id in autos {
                    if let Ok(hwpt) = self.hwpt(id) {
                        match self.pasid_to(dev_id, dev, pasids, pasid, id, &Pt::Paging(hwpt), replace) {
                            Err(Errno::EINVAL) => continue,
                            r => return r,
                        }
                    }
                }
                let (id, hwpt) = self.new_hwpt(pt_id, &ioas, dev, true, 0)?;
                match self.pasid_to(dev_id, dev, pasids, pasid, id, &Pt::Paging(hwpt.clone()), replace) {
                    Ok(id) => Ok(id),
                    Err(e) => {
                        self.objects.lock().remove(&id);
                        // A failed invalidation of the new domain is the
                        // more serious error.
                        self.release_hwpt(id, &hwpt)?;
                        Err(e)
                    }
                }
            }
            Object::Device(_)
            | Object::DeviceOwner(_)
            | Object::Access(_)
            | Object::Fault(_)
            | Object::Placeholder(_) => Err(Errno::EINVAL),
        }
    }

    /// One HWPT tried for a PASID attach or replace: all or nothing.
    #[allow(clippy::too_many_arguments)]
    fn pasid_to(
        &self,
        dev_id: u32,
        dev: &Device,
        pasids: &mut BTreeMap<u32, u32>,
        pasid: u32,
        hwpt_id: u32,
        pt: &Pt,
        replace: bool,
    ) -> Result<u32> {
        let old = pasids.get(&pasid).copied();
        match (replace, old) {
            (false, Some(_)) => return Err(Errno::EBUSY),
            (true, None) => return Err(Errno::EINVAL),
            (true, Some(o)) if o == hwpt_id => return Ok(hwpt_id),
            _ => {}
        }
        // Linux's iommufd_hwpt_pasid_compat: the HWPT, and the one under
        // the requester id, must both take PASIDs.
        if !pt.pasid_compat() {
            return Err(Errno::EINVAL);
        }
        let rid = *dev.attached.lock();
        if let Some(rid) = rid
            && !self.pt(rid).is_ok_and(|p| p.pasid_compat())
        {
            return Err(Errno::EINVAL);
        }
        // The IOMMU core's range check.
        if !dev.pasid_in_range(pasid) {
            return Err(Errno::EINVAL);
        }
        let old_pt = match old {
            Some(o) => Some(self.pt(o)?),
            None => None,
        };
        self.accounting.faults.point()?;
        let iopf = Ictx::iopf_enable_for(dev, pt.fault().is_some());
        if let Err(e) = pt.attach_device_pasid(dev.ops.handle(), pasid) {
            if iopf {
                Ictx::iopf_disable(dev);
            }
            return Err(crate::iopt::domain_errno(e));
        }
        pt.refs().fetch_add(1, Ordering::SeqCst);
        pasids.insert(pasid, hwpt_id);
        if let (Some(o), Some(old_pt)) = (old, old_pt) {
            // The old HWPT's pending groups of this PASID are answered;
            // its IOPF hold and its reference go (never an automatic
            // HWPT's last: module docs).
            Self::iopf_leave(dev_id, dev, o, pasid, &old_pt);
            old_pt.refs().fetch_sub(1, Ordering::SeqCst);
        }
        Ok(hwpt_id)
    }
}

/// A HWPT a device attaches to. A nested one reserves the device's
/// regions in its parent's IOAS (the IOAS its stage 2 mirrors).
enum Pt {
    Paging(Arc<Hwpt>),
    Nested(Arc<HwptNested>),
}

impl Pt {
    /// Its fault queue (only nested HWPTs have one in 6.12).
    fn fault(&self) -> Option<&Arc<Fault>> {
        match self {
            Pt::Paging(_) => None,
            Pt::Nested(n) => n.fault.as_ref(),
        }
    }
    fn pasid_compat(&self) -> bool {
        match self {
            Pt::Paging(h) => h.pasid_compat,
            Pt::Nested(n) => n.pasid_compat,
        }
    }
    fn ioas(&self) -> &Arc<Ioas> {
        match self {
            Pt::Paging(h) => &h.ioas,
            Pt::Nested(n) => &n.parent.ioas,
        }
    }
    fn refs(&self) -> &AtomicU32 {
        match self {
            Pt::Paging(h) => &h.refs,
            Pt::Nested(n) => &n.refs,
        }
    }
    fn attach_device(&self, dev: DeviceHandle) -> core::result::Result<(), DomainError> {
        match self {
            Pt::Paging(h) => h.domain.lock().attach_device(dev),
            Pt::Nested(n) => n.domain.lock().attach_device(dev),
        }
    }
    fn detach_device(&self, dev: DeviceHandle) -> core::result::Result<(), DomainError> {
        match self {
            Pt::Paging(h) => h.domain.lock().detach_device(dev),
            Pt::Nested(n) => n.domain.lock().detach_device(dev),
        }
    }
    fn attach_device_pasid(&self, dev: DeviceHandle, pasid: u32) -> core::result::Result<(), DomainError> {
        match self {
            Pt::Paging(h) => h.domain.lock().attach_device_pasid(dev, pasid),
            Pt::Nested(n) => n.domain.lock().attach_device_pasid(dev, pasid),
        }
    }
    fn detach_device_pasid(&self, dev: DeviceHandle, pasid: u32) -> core::result::Result<(), DomainError> {
        match self {
            Pt::Paging(h) => h.domain.lock().detach_device_pasid(dev, pasid),
            Pt::Nested(n) => n.domain.lock().detach_device_pasid(dev, pasid),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ctx::DeviceOps;
    use crate::ctx::tests::{MockDev, ctx};
    use crate::errno::Errno;
    use crate::selftest::mock::{MOCK_APERTURE_START, MockDomain};
    use alloc::boxed::Box;
    use alloc::sync::Arc;
    use alloc::vec::Vec;
    use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain, IotlbGather, IovaRange, Prot};

    #[test]
    fn attach_reuses_domains_and_pins_once() {
        let (mem, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let iova = c.ioas_map(ioas, Some(MOCK_APERTURE_START), 0x4000_0000, 0x10000, true, true).unwrap();
        assert_eq!(mem.pinned_pages(), 0);
        let d1 = c.bind_device(Arc::new(MockDev(1))).unwrap();
        let d2 = c.bind_device(Arc::new(MockDev(2))).unwrap();
        let h1 = c.attach(d1, ioas).unwrap();
        let h2 = c.attach(d2, ioas).unwrap();
        assert_eq!(h1, h2, "the compatible automatic domain is shared");
        assert_eq!(mem.pinned_pages(), 16);
        let h3 = c.hwpt_alloc(d1, ioas).unwrap();
        c.replace(d1, h3).unwrap();
        assert_eq!(mem.pinned_pages(), 16, "two domains, one pin per page");
        assert_eq!(c.hwpt(h3).unwrap().domain.lock().iova_to_phys(iova), mem.phys_of(0x4000_0000));
        let other = c.ioas_alloc().unwrap();
        c.ioas_copy(other, ioas, iova, None, 0x4000, true, false).unwrap();
        assert_eq!(mem.pinned_pages(), 16);
        c.ioas_unmap(ioas, 0, u64::MAX).unwrap();
        assert_eq!(mem.pinned_pages(), 0, "the copy in a domain-less IOAS pins nothing");
        drop(c);
        assert_eq!(mem.pinned_pages(), 0);
    }

    struct MsiDev;
    impl DeviceOps for MsiDev {
        fn handle(&self) -> DeviceHandle {
            DeviceHandle::Opaque(77)
        }
        fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
            Ok(Box::new(MockDomain::new()))
        }
        fn reserved_regions(&self) -> Vec<IovaRange> {
            alloc::vec![IovaRange::new(0x400_0000, 0x40f_ffff)] // an MSI window
        }
    }

    #[test]
    fn device_reserved_regions_conflict_and_reserve() {
        let (mem, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let iova = c.ioas_map(ioas, Some(0x400_0000), 0x4000_0000, 0x1000, true, true).unwrap();
        let d = c.bind_device(Arc::new(MsiDev)).unwrap();
        let before = c.object_ids();
        assert_eq!(c.attach(d, ioas), Err(Errno::EADDRINUSE), "a mapping sits in the device's MSI window");
        assert_eq!(c.object_ids(), before, "the failed attach left no HWPT behind");
        assert_eq!(mem.pinned_pages(), 0);
        c.ioas_unmap(ioas, iova, 0x1000).unwrap();
        c.attach(d, ioas).unwrap();
        let (ranges, _) = c.ioas_iova_ranges(ioas).unwrap();
        assert!(ranges.iter().all(|r| r.last < 0x400_0000 || r.start > 0x40f_ffff), "window reserved: {ranges:x?}");
        assert_eq!(c.ioas_map(ioas, Some(0x400_0000), 0x4000_0000, 0x1000, true, true), Err(Errno::EINVAL));
        c.detach(d).unwrap();
        assert!(c.ioas_iova_ranges(ioas).unwrap().0.iter().any(|r| r.start <= 0x400_0000 && r.last >= 0x40f_ffff));
    }

    /// A mock domain whose driver has no PASID support (the seam's
    /// defaults).
    struct NoPasidDomain(MockDomain);
    impl IommuDomain for NoPasidDomain {
        fn page_sizes(&self) -> u64 {
            self.0.page_sizes()
        }
        fn aperture(&self) -> IovaRange {
            self.0.aperture()
        }
        fn map(&mut self, iova: u64, phys: u64, length: u64, prot: Prot) -> Result<(), DomainError> {
            self.0.map(iova, phys, length, prot)
        }
        fn unmap(&mut self, iova: u64, length: u64, gather: &mut IotlbGather) -> u64 {
            self.0.unmap(iova, length, gather)
        }
        fn iotlb_sync(&mut self, gather: &mut IotlbGather) -> Result<(), DomainError> {
            self.0.iotlb_sync(gather)
        }
        fn iova_to_phys(&self, iova: u64) -> Option<u64> {
            self.0.iova_to_phys(iova)
        }
        fn enforce_cache_coherency(&mut self) -> bool {
            self.0.enforce_cache_coherency()
        }
        fn attach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
            self.0.attach_device(device)
        }
        fn detach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
            self.0.detach_device(device)
        }
    }

    /// A device with 8 PASID bits whose domains may lack PASID support.
    struct PasidDev {
        handle: u64,
        pasid_domains: bool,
    }
    impl DeviceOps for PasidDev {
        fn handle(&self) -> DeviceHandle {
            DeviceHandle::Opaque(self.handle)
        }
        fn alloc_domain(&self) -> Result<Box<dyn IommuDomain>, DomainError> {
            if self.pasid_domains {
                Ok(Box::new(MockDomain::new()))
            } else {
                Ok(Box::new(NoPasidDomain(MockDomain::new())))
            }
        }
        fn max_pasid_log2(&self) -> u32 {
            8
        }
    }

    #[test]
    fn pasid_checks_and_errnos() {
        let (_, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let d = c.bind_device(Arc::new(PasidDev { handle: 0x0005_a51d_0001, pasid_domains: true })).unwrap();
        let plain = c.hwpt_alloc(d, ioas).unwrap();
        let h = c.hwpt_alloc_pasid(d, ioas, false, false, true).unwrap();
        assert!(c.hwpt(h).unwrap().pasid_compat && !c.hwpt(plain).unwrap().pasid_compat);
        assert_eq!(c.attach_pasid(d, 0, h), Err(Errno::EINVAL), "PASID 0 is the requester id");
        assert_eq!(c.attach_pasid(d, 256, h), Err(Errno::EINVAL), "past the device's 8 bits");
        assert_eq!(c.attach_pasid(d, 1, plain), Err(Errno::EINVAL), "no IOMMU_HWPT_ALLOC_PASID");
        assert_eq!(c.attach_pasid(d, 1, 999), Err(Errno::ENOENT));
        assert_eq!(c.attach_pasid(d, 1, d), Err(Errno::EINVAL), "not an IOAS or HWPT");
        assert_eq!(c.attach_pasid(d, 255, h), Ok(h));
        assert_eq!(c.hwpt(h).unwrap().refs(), 1);
        // The requester id: only PASID-compatible HWPTs now, and not
        // through the IOAS (its automatic HWPTs are not).
        let before = c.object_ids();
        assert_eq!(c.attach(d, plain), Err(Errno::EINVAL));
        assert_eq!(c.attach(d, ioas), Err(Errno::EINVAL));
        assert_eq!(c.object_ids(), before, "the automatic HWPT tried went away");
        assert_eq!(c.attach(d, h), Ok(h));
        assert_eq!(c.hwpt(h).unwrap().refs(), 2);
        assert_eq!(c.detach_pasid(d, 255), Ok(()));
        assert_eq!(c.detach_pasid(d, 255), Ok(()), "detaching a detached PASID is no error");
        assert_eq!(c.hwpt(h).unwrap().refs(), 1);
        assert_eq!(c.replace_pasid(d, 255, h), Err(Errno::EINVAL), "not attached");
        c.detach(d).unwrap();

        // A domain without PASID support: the driver's EOPNOTSUPP, and
        // nothing attached.
        let n = c.bind_device(Arc::new(PasidDev { handle: 0x0005_a51d_0002, pasid_domains: false })).unwrap();
        let nh = c.hwpt_alloc_pasid(n, ioas, false, false, true).unwrap();
        assert_eq!(c.attach_pasid(n, 3, nh), Err(Errno::EOPNOTSUPP));
        assert_eq!(c.attached_pasids(n), Ok(Vec::new()));
        assert_eq!(c.hwpt(nh).unwrap().refs(), 0);

        // HWPT_ALLOC: the flag on paging and nested HWPTs, nothing unknown.
        use crate::dispatch::ioctl;
        use crate::uapi::*;
        let alloc = |flags: u32| {
            let a = IommuHwptAlloc {
                size: IommuHwptAlloc::SIZE as u32,
                flags,
                dev_id: d,
                pt_id: ioas,
                ..Default::default()
            };
            let mut buf = a.to_bytes();
            ioctl(&c, IOMMU_HWPT_ALLOC, &mut buf).map(|()| IommuHwptAlloc::read(&buf).out_hwpt_id)
        };
        let id = alloc(IOMMU_HWPT_ALLOC_PASID | IOMMU_HWPT_ALLOC_NEST_PARENT).unwrap();
        assert!(c.hwpt(id).unwrap().pasid_compat && c.hwpt(id).unwrap().nest_parent);
        assert_eq!(alloc(IOMMU_HWPT_ALLOC_PASID | 1 << 31), Err(Errno::EOPNOTSUPP));
        assert_eq!(alloc(IOMMU_HWPT_ALLOC_PASID | IOMMU_HWPT_FAULT_ID_VALID), Err(Errno::EOPNOTSUPP));
    }
}
