//! Fixture `iommufd_device_pasid` (Linux 6.15): one IOAS, a PASID-capable
//! mock device (`MOCK_FLAGS_DEVICE_PASID`) attached to it, and in the
//! `no_pasid` variant a second mock device without PASIDs
//! (`has_pasid`, `no_pasid`).
//!
//! `pasid_attach` is ported but for its vIOMMU part: Linux also
//! allocates a vIOMMU (`IOMMU_VIOMMU_ALLOC`, 6.13) and a nested HWPT on
//! it; there are no vIOMMU objects here. Besides the selftest's own
//! checks (`PASID_CHECK_HWPT`), the port checks what the mock's PASID
//! table says and that an attached PASID holds its HWPT (`EBUSY`).

use super::harness::*;
use iommufd::Errno;
use iommufd::selftest::mock::{MockDomain, MockNestedDomain};
use iommufd::uapi::*;
use std::ops::Deref;

#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub pasid_capable: bool,
}

pub struct PasidFx {
    f: Fx,
    pub variant: Variant,
    pub ioas_id: u32,
    pub hwpt_id: u32,
    pub stdev_id: u32,
    pub device_id: u32,
    pub no_pasid_stdev_id: u32,
    pub no_pasid_device_id: u32,
}

impl Deref for PasidFx {
    type Target = Fx;
    fn deref(&self) -> &Fx {
        &self.f
    }
}

impl PasidFx {
    pub fn setup(variant: Variant) -> Self {
        let f = Fx::open();
        let ioas_id = f.ioas_alloc().unwrap();
        let (stdev_id, hwpt_id, device_id) = f.mock_domain_flags(ioas_id, MOCK_FLAGS_DEVICE_PASID).unwrap();
        let (mut no_pasid_stdev_id, mut no_pasid_device_id) = (0, 0);
        if !variant.pasid_capable {
            (no_pasid_stdev_id, _, no_pasid_device_id) = f.mock_domain_flags(ioas_id, 0).unwrap();
        }
        PasidFx { f, variant, ioas_id, hwpt_id, stdev_id, device_id, no_pasid_stdev_id, no_pasid_device_id }
    }

    /// `test_cmd_pasid_attach` on the PASID-capable device.
    fn attach(&self, pasid: u32, pt_id: u32) -> R<u32> {
        self.pasid_attach(self.stdev_id, pasid, pt_id)
    }
    fn replace(&self, pasid: u32, pt_id: u32) -> R<u32> {
        self.pasid_replace(self.stdev_id, pasid, pt_id)
    }
    fn detach(&self, pasid: u32) -> R<()> {
        self.pasid_detach(self.stdev_id, pasid)
    }
    fn check(&self, pasid: u32, hwpt_id: u32) -> R<()> {
        self.pasid_check_hwpt(self.stdev_id, pasid, hwpt_id)
    }

    /// Whether the mock's PASID table points PASID `pasid` of the
    /// PASID-capable device at HWPT `hwpt_id`'s domain.
    fn domain_has(&self, hwpt_id: u32, pasid: u32) -> bool {
        let c = self.ictx();
        let dev = c.device(self.device_id).unwrap().handle();
        if let Ok(h) = c.hwpt(hwpt_id) {
            let mut d = h.domain.lock();
            let m = d.as_any_mut().and_then(|a| a.downcast_mut::<MockDomain>()).expect("a mock domain");
            return m.has_pasid(dev, pasid);
        }
        let n = c.hwpt_nested(hwpt_id).unwrap();
        let mut d = n.domain.lock();
        let m = d.as_any_mut().and_then(|a| a.downcast_mut::<MockNestedDomain>()).expect("a mock nested domain");
        m.has_pasid(dev, pasid)
    }
}

fn pasid_attach(s: &mut PasidFx) {
    // struct iommu_hwpt_selftest { __u32 iotlb; }
    let data = SCRATCH;
    s.write_user(data, &IOMMU_TEST_IOTLB_DEFAULT.to_le_bytes());
    let data_len = IommuHwptSelftest::SIZE as u32;
    let sel = IOMMU_HWPT_DATA_SELFTEST;
    let mut pasid = 100;

    assert_eq!(s.ictx().attached_hwpt(s.device_id), Ok(Some(s.hwpt_id)));
    // Detaching a PASID never attached is no error.
    s.detach(pasid).unwrap();

    // Two PASID-compatible nested HWPTs on one parent.
    let parent = s.hwpt_alloc(s.device_id, s.ioas_id, IOMMU_HWPT_ALLOC_NEST_PARENT).unwrap();
    let nested = |flags| s.hwpt_alloc_raw(s.device_id, parent, 0, flags, sel, data, data_len);
    let n0 = nested(IOMMU_HWPT_ALLOC_PASID).unwrap();
    let n1 = nested(IOMMU_HWPT_ALLOC_PASID).unwrap();

    // A fault queue and a PASID-compatible nested HWPT reporting to it.
    let (fault_id, fault_fd) = s.fault_alloc().unwrap();
    let iopf_hwpt = s
        .hwpt_alloc_raw(
            s.device_id,
            parent,
            fault_id,
            IOMMU_HWPT_FAULT_ID_VALID | IOMMU_HWPT_ALLOC_PASID,
            sel,
            data,
            data_len,
        )
        .unwrap();

    // (Linux: a vIOMMU on the parent and a nested HWPT on it; no vIOMMU here.)

    let s2 = s.hwpt_alloc(s.device_id, s.ioas_id, IOMMU_HWPT_ALLOC_PASID).unwrap();

    // The requester id on a HWPT that cannot sit under PASIDs: no PASID
    // attach.
    s.mock_domain_replace(s.stdev_id, parent).unwrap();
    assert_eq!(s.attach(pasid, s2), Err(Errno::EINVAL));
    // On a PASID-compatible one, a PASID attaches; then the requester id
    // cannot go back to an incompatible HWPT.
    s.mock_domain_replace(s.stdev_id, s2).unwrap();
    assert_eq!(s.attach(pasid, n0), Ok(n0));
    assert!(s.domain_has(n0, pasid));
    assert_eq!(s.mock_domain_replace(s.stdev_id, parent), Err(Errno::EINVAL));
    assert_eq!(s.ictx().attached_hwpt(s.device_id), Ok(Some(s2)), "the failed replace left the requester id");
    s.detach(pasid).unwrap();
    s.check(pasid, 0).unwrap();
    assert!(!s.domain_has(n0, pasid));

    if !s.variant.pasid_capable {
        // A PASID-compatible HWPT takes a device without PASIDs (on its
        // requester id), but no PASID of such a device attaches,
        // compatible HWPT or not.
        s.mock_domain_replace(s.no_pasid_stdev_id, n0).unwrap();
        s.mock_domain_replace(s.no_pasid_stdev_id, s.ioas_id).unwrap();
        assert_eq!(s.pasid_attach(s.no_pasid_stdev_id, pasid, parent), Err(Errno::EINVAL));
        assert_eq!(s.pasid_attach(s.no_pasid_stdev_id, pasid, s2), Err(Errno::EINVAL));
        assert_eq!(s.ictx().attached_pasids(s.no_pasid_device_id), Ok(vec![]));
    }

    // An incompatible HWPT: refused, nothing attached.
    assert_eq!(s.attach(pasid, parent), Err(Errno::EINVAL));
    s.check(pasid, 0).unwrap();
    // An IOAS: its automatic HWPTs never take PASIDs.
    let before = s.ictx().object_ids();
    assert_eq!(s.attach(pasid, s.ioas_id), Err(Errno::EINVAL));
    s.check(pasid, 0).unwrap();
    assert_eq!(s.ictx().object_ids(), before, "the automatic HWPT tried went away");

    // The PASID-compatible paging HWPT.
    assert_eq!(s.attach(pasid, s2), Ok(s2));
    s.check(pasid, s2).unwrap();
    assert!(s.domain_has(s2, pasid));
    assert_eq!(s.check(pasid, n0), Err(Errno::EINVAL), "a wrong HWPT");
    assert_eq!(s.check(pasid, s.ioas_id), Err(Errno::EINVAL), "not a HWPT");
    assert_eq!(s.check(pasid, 9999), Err(Errno::ENOENT));
    // Attach never overwrites: that is what replace is for.
    assert_eq!(s.attach(pasid, n0), Err(Errno::EBUSY));
    s.check(pasid, s2).unwrap();
    s.detach(pasid).unwrap();
    s.check(pasid, 0).unwrap();

    // A nested HWPT.
    assert_eq!(s.attach(pasid, n0), Ok(n0));
    s.check(pasid, n0).unwrap();
    assert_eq!(s.destroy(n0), Err(Errno::EBUSY), "an attached PASID holds its HWPT");
    assert_eq!(s.attach(pasid, n0), Err(Errno::EBUSY), "attached already, even to the same HWPT");
    s.detach(pasid).unwrap();

    // Replace.
    pasid = 200;
    assert_eq!(s.replace(pasid, s2), Err(Errno::EINVAL), "not attached");
    assert_eq!(s.attach(pasid, s2), Ok(s2));
    s.check(pasid, s2).unwrap();
    // An IOAS: no automatic HWPT takes the PASID; it stays where it was.
    assert_eq!(s.replace(pasid, s.ioas_id), Err(Errno::EINVAL));
    s.check(pasid, s2).unwrap();
    assert_eq!(s.replace(pasid, n0), Ok(n0));
    s.check(pasid, n0).unwrap();
    assert!(s.domain_has(n0, pasid) && !s.domain_has(s2, pasid));
    assert_eq!(s.replace(pasid, n1), Ok(n1));
    s.check(pasid, n1).unwrap();
    // Onto its own HWPT: nothing to do.
    assert_eq!(s.replace(pasid, n1), Ok(n1));
    s.destroy(n0).unwrap();
    s.detach(pasid).unwrap();
    s.check(pasid, 0).unwrap();

    // The mock fails every second attach of PASID 1024: a failed replace
    // leaves the PASID on its old HWPT.
    pasid = IOMMU_TEST_PASID_RESERVED;
    assert_eq!(s.attach(pasid, s2), Ok(s2));
    s.check(pasid, s2).unwrap();
    assert_eq!(s.replace(pasid, n1), Err(Errno::ENOMEM));
    s.check(pasid, s2).unwrap();
    assert!(s.domain_has(s2, pasid) && !s.domain_has(n1, pasid));
    s.detach(pasid).unwrap();

    // A HWPT with a fault queue: a page request tagged with the PASID
    // goes to that queue.
    pasid = 2048;
    assert_eq!(s.attach(pasid, iopf_hwpt), Ok(iopf_hwpt));
    s.check(pasid, iopf_hwpt).unwrap();
    s.trigger_iopf_pasid(s.device_id, pasid, fault_fd).unwrap();
    assert_eq!(s.replace(pasid, s2), Ok(s2));
    s.check(pasid, s2).unwrap();
    s.detach(pasid).unwrap();

    s.destroy(iopf_hwpt).unwrap();
    s.close_fault_fd(fault_fd).unwrap();
    s.destroy(fault_id).unwrap();

    // The requester id leaves the PASID-compatible HWPT.
    s.mock_domain_replace(s.stdev_id, s.ioas_id).unwrap();
}

fn run(variant: Variant, test: fn(&mut PasidFx)) {
    let mut s = PasidFx::setup(variant);
    test(&mut s);
}

mod no_pasid {
    #[test]
    fn pasid_attach() {
        super::run(super::Variant { pasid_capable: false }, super::pasid_attach)
    }
}

mod has_pasid {
    #[test]
    fn pasid_attach() {
        super::run(super::Variant { pasid_capable: true }, super::pasid_attach)
    }
}
