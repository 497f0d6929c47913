//! What several integration tests share: a device whose domains are the
//! page-table engine, behind a gate that can hold or fail their maps and
//! fail their IOTLB syncs.
#![allow(dead_code)] // each test uses part of it

use iommufd::ctx::DeviceOps;
use portcullis_iommu::{DeviceHandle, DomainError, HwError, IommuDomain, IotlbGather, IovaRange, PhysRun, Prot};
use std::sync::Arc;

/// A device whose domains are the page-table engine on shared heap tables
/// (VT-d 4-level second stage, no invalidation hardware): they map and
/// unmap concurrently, so the IOAS fills and unloads areas outside its
/// lock. With a gate, every concurrent map first waits for the gate to
/// open (to hold an area in its "being filled" state), and one map can be
/// made to fail, or every IOTLB sync. An `exclusive` device's domains say
/// they cannot map concurrently: the IOAS then maps and unmaps them under
/// its lock.
pub struct EngineDevice {
    pub id: u64,
    pub gate: Option<Arc<Gate>>,
    pub exclusive: bool,
}

#[derive(Default)]
pub struct Gate {
    open: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
    pub waiting: std::sync::atomic::AtomicU64,
    pub fail_next: std::sync::atomic::AtomicBool,
    /// While set, every IOTLB sync fails as a unit that refused it.
    pub fail_sync: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn pass(&self) {
        self.waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.changed.wait(open).unwrap();
        }
        self.waiting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.changed.notify_all();
    }
}

type Engine =
    io_pgtable::PagingDomain<io_pgtable::VtdSecondStage, io_pgtable::SharedHeapTables, io_pgtable::NoInvalidator>;

/// The engine domain behind an optional gate.
struct GatedDomain {
    inner: Engine,
    gate: Option<Arc<Gate>>,
    exclusive: bool,
}

impl GatedDomain {
    fn sync_result(&self) -> Result<(), DomainError> {
        if self.gate.as_ref().is_some_and(|g| g.fail_sync.load(std::sync::atomic::Ordering::SeqCst)) {
            return Err(DomainError::Hardware {
                unit: 0xfed9_0000,
                cause: HwError::Rejected { register: "IOTLB_REG", value: 0 },
            });
        }
        Ok(())
    }
}

impl IommuDomain for GatedDomain {
    fn page_sizes(&self) -> u64 {
        self.inner.page_sizes()
    }
    fn aperture(&self) -> IovaRange {
        self.inner.aperture()
    }
    fn map(&mut self, iova: u64, phys: u64, length: u64, prot: Prot) -> Result<(), DomainError> {
        self.inner.map(iova, phys, length, prot)
    }
    fn map_runs(&mut self, iova: u64, runs: &[PhysRun], prot: Prot) -> Result<(), DomainError> {
        self.inner.map_runs(iova, runs, prot)
    }
    fn unmap(&mut self, iova: u64, length: u64, gather: &mut IotlbGather) -> u64 {
        self.inner.unmap(iova, length, gather)
    }
    fn iotlb_sync(&mut self, gather: &mut IotlbGather) -> Result<(), DomainError> {
        self.sync_result()?;
        self.inner.iotlb_sync(gather)
    }
    fn supports_shared(&self) -> bool {
        !self.exclusive && self.inner.supports_shared()
    }
    fn map_shared(&self, iova: u64, runs: &[PhysRun], prot: Prot) -> Result<(), DomainError> {
        if let Some(g) = &self.gate {
            g.pass();
            if g.fail_next.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(DomainError::NoMemory);
            }
        }
        self.inner.map_shared(iova, runs, prot)
    }
    fn unmap_shared(&self, iova: u64, length: u64, gather: &mut IotlbGather) -> Result<u64, DomainError> {
        self.inner.unmap_shared(iova, length, gather)
    }
    fn iotlb_sync_shared(&self, gather: &mut IotlbGather) -> Result<(), DomainError> {
        self.sync_result()?;
        self.inner.iotlb_sync_shared(gather)
    }
    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        self.inner.iova_to_phys(iova)
    }
    fn iova_to_phys_runs(&self, iova: u64, length: u64, out: &mut [PhysRun]) -> (usize, u64) {
        self.inner.iova_to_phys_runs(iova, length, out)
    }
    fn enforce_cache_coherency(&mut self) -> bool {
        self.inner.enforce_cache_coherency()
    }
    fn attach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        self.inner.attach_device(device)
    }
    fn detach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        self.inner.detach_device(device)
    }
}

impl DeviceOps for EngineDevice {
    fn handle(&self) -> DeviceHandle {
        DeviceHandle::Opaque(self.id)
    }
    fn alloc_domain(&self) -> Result<Box<dyn IommuDomain>, DomainError> {
        let f = io_pgtable::VtdSecondStage::from_caps([39, 48], 48, true, true, false).expect("format");
        let inner =
            io_pgtable::PagingDomain::new(f, io_pgtable::SharedHeapTables::new(true), io_pgtable::NoInvalidator)
                .map_err(|_| DomainError::NoMemory)?;
        Ok(Box::new(GatedDomain { inner, gate: self.gate.clone(), exclusive: self.exclusive }))
    }
}

pub fn engine(id: u64) -> Arc<EngineDevice> {
    Arc::new(EngineDevice { id, gate: None, exclusive: false })
}
