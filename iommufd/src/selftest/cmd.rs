//! `IOMMU_TEST_CMD`: the selftest operations, on the mock domain.
//!
//! Implemented: ADD_RESERVED, MOCK_DOMAIN, MOCK_DOMAIN_FLAGS,
//! MOCK_DOMAIN_REPLACE, MD_CHECK_MAP, MD_CHECK_REFS, SET_TEMP_MEMORY_LIMIT.
//! The access operations (CREATE_ACCESS, ACCESS_PAGES, ACCESS_RW,
//! DESTROY_ACCESS_PAGES, ACCESS_REPLACE_IOAS), DIRTY, MD_CHECK_IOTLB and
//! TRIGGER_IOPF are not implemented yet and answer `EOPNOTSUPP`.

use super::mock::{MOCK_IO_PAGE_SIZE, MockDomain};
use crate::ctx::{DeviceOps, Ictx};
use crate::dispatch::{add_test_reserved, respond};
use crate::errno::{Errno, Result};
use crate::memsrc::PAGE_SIZE;
use crate::uapi::*;
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain};

static NEXT_MOCK_DEVICE: AtomicU64 = AtomicU64::new(1);

/// A mock device: gets mock domains, reports the selftest hw_info.
#[derive(Debug)]
pub struct MockDevice {
    handle: DeviceHandle,
    /// MOCK_FLAGS_DEVICE_* bits.
    pub flags: u32,
}

impl MockDevice {
    /// A new mock device with a unique handle.
    pub fn new(flags: u32) -> Self {
        Self { handle: DeviceHandle(NEXT_MOCK_DEVICE.fetch_add(1, Ordering::Relaxed)), flags }
    }
}

impl DeviceOps for MockDevice {
    fn handle(&self) -> DeviceHandle {
        self.handle
    }
    fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        Ok(Box::new(MockDomain::new()))
    }
    fn hw_info(&self) -> (u32, Vec<u8>) {
        // struct iommu_test_hw_info { __u32 flags; __u32 test_reg; }
        let mut v = Vec::with_capacity(8);
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&IOMMU_HW_INFO_SELFTEST_REGVAL.to_le_bytes());
        (IOMMU_HW_INFO_TYPE_SELFTEST, v)
    }
}

/// Runs one selftest operation.
pub fn test_cmd(ictx: &Ictx, kbuf: &[u8], user_size: u32, buf: &mut [u8]) -> Result<()> {
    let mut c = IommuTestCmd::read(kbuf);
    match c.op {
        IOMMU_TEST_OP_ADD_RESERVED => {
            let a = IommuTestAddReserved::read(&c.payload);
            add_test_reserved(ictx, c.id, a.start, a.length)
        }
        IOMMU_TEST_OP_MOCK_DOMAIN | IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS => {
            let flags = if c.op == IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS {
                IommuTestMockDomainFlags::read(&c.payload).dev_flags
            } else {
                0
            };
            if flags & !(MOCK_FLAGS_DEVICE_NO_DIRTY | MOCK_FLAGS_DEVICE_HUGE_IOVA) != 0 {
                return Err(Errno::EINVAL);
            }
            ictx.ioas(c.id).map(|_| ()).or_else(|_| ictx.hwpt(c.id).map(|_| ()))?;
            let (owner, dev) = ictx.bind_owned_device(Arc::new(MockDevice::new(flags)))?;
            let hwpt = match ictx.attach(dev, c.id) {
                Ok(h) => h,
                Err(e) => {
                    let _ = ictx.destroy(owner);
                    return Err(e);
                }
            };
            let out = IommuTestMockDomain { out_stdev_id: owner, out_hwpt_id: hwpt, out_idev_id: dev };
            out.write(&mut c.payload);
            respond(&c.to_bytes(), user_size, buf)
        }
        IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE => {
            let mut r = IommuTestMockDomainReplace::read(&c.payload);
            let owner = ictx.device_owner(c.id)?;
            let dev = owner.dev_id.load(Ordering::SeqCst);
            r.pt_id = ictx.replace(dev, r.pt_id)?;
            r.write(&mut c.payload);
            respond(&c.to_bytes(), user_size, buf)
        }
        IOMMU_TEST_OP_MD_CHECK_MAP => {
            let m = IommuTestCheckMap::read(&c.payload);
            if !m.iova.is_multiple_of(MOCK_IO_PAGE_SIZE)
                || !m.length.is_multiple_of(MOCK_IO_PAGE_SIZE)
                || !m.uptr.is_multiple_of(MOCK_IO_PAGE_SIZE)
                || m.uptr.checked_add(m.length).is_none()
            {
                return Err(Errno::EINVAL);
            }
            let hwpt = ictx.hwpt(c.id)?;
            let domain = hwpt.domain.lock();
            let (mut iova, mut uptr) = (m.iova, m.uptr);
            for _ in 0..m.length / MOCK_IO_PAGE_SIZE {
                let want = ictx.source().peek_phys(uptr)?.ok_or(Errno::EOPNOTSUPP)?;
                if domain.iova_to_phys(iova) != Some(want) {
                    return Err(Errno::EINVAL);
                }
                iova += MOCK_IO_PAGE_SIZE;
                uptr += MOCK_IO_PAGE_SIZE;
            }
            Ok(())
        }
        IOMMU_TEST_OP_MD_CHECK_REFS => {
            let r = IommuTestCheckRefs::read(&c.payload);
            if !r.length.is_multiple_of(PAGE_SIZE) || !r.uptr.is_multiple_of(PAGE_SIZE) {
                return Err(Errno::EINVAL);
            }
            let mut uptr = r.uptr;
            for _ in 0..r.length / PAGE_SIZE {
                let pins = ictx.source().pin_count(uptr)?.ok_or(Errno::EOPNOTSUPP)?;
                if pins != r.refs {
                    return Err(Errno::EIO);
                }
                uptr += PAGE_SIZE;
            }
            Ok(())
        }
        IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT => {
            // Linux bounds its PFN batch memory with this; our store has no
            // such batch, so the value only has to be accepted.
            let _ = IommuTestMemoryLimit::read(&c.payload);
            Ok(())
        }
        _ => Err(Errno::EOPNOTSUPP),
    }
}
