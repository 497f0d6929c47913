//! Fault queues: I/O page faults (PCI PRI page requests) of devices
//! attached to a HWPT allocated with `IOMMU_HWPT_FAULT_ID_VALID`, handed
//! to user space to resolve (Linux 6.11+ `IOMMU_FAULT_QUEUE_ALLOC`).
//!
//! A fault object ([`Fault`], `Object::Fault`) is a queue with two sides:
//! groups *delivered* (reported by a device, not yet read) in arrival
//! order, and groups *read* and waiting for their response, keyed by a
//! cookie. Linux gives user space a file descriptor read with `read(2)`
//! and written with `write(2)`; here the context keeps a table of
//! "descriptors" (numbers from 3 up, never reused, shared with the
//! selftest's access descriptors) and the reads and writes are methods:
//! [`Ictx::fault_fd_read`] / [`Ictx::fault_fd_write`] on a descriptor,
//! [`Ictx::fault_read`] / [`Ictx::fault_write`] on the object id for
//! in-kernel users, and `_user` variants that move the records through the
//! memory source at a user address, as `read(2)`/`write(2)` would.
//!
//! Rules (Linux 6.12's `fault.c`, facts only):
//! - reads and writes come in whole records: a count that is not a
//!   multiple of `struct iommu_hwpt_pgfault` (40 bytes) or `struct
//!   iommu_hwpt_page_response` (8 bytes) is `ESPIPE`, so a buffer smaller
//!   than one record is `ESPIPE`; a count of 0 reads or writes nothing;
//! - a read hands out whole groups only: a group that does not fit in
//!   what is left of the buffer stays queued (a read may return 0). Each
//!   group read gets a cookie, the lowest free from 1, repeated in every
//!   record of the group;
//! - a write answers groups by cookie, in order, and stops at the first
//!   bad response: a code other than SUCCESS/INVALID or an unknown cookie
//!   is `EINVAL`, unreadable memory `EFAULT`; what was done before the
//!   bad one is reported (a partial write), the error only when nothing
//!   was done;
//! - when a device leaves a HWPT with a fault queue (detach, replace,
//!   unbind), its groups still queued or awaiting a response are answered
//!   `INVALID` to the device; so are the groups left when the fault object
//!   is destroyed.
//!
//! References: a HWPT allocated with the fault holds it, as does an open
//! descriptor, so `IOMMU_DESTROY` of the fault is `EBUSY` until both are
//! gone. A device's IOPF is enabled (a count, [`Device::iopf_enabled`])
//! while it is attached to a HWPT with a fault queue.
//!
//! Nothing here is sized by the caller: records are composed one at a
//! time into a 40-byte buffer and responses read one at a time into an
//! 8-byte one, whatever the count; the queues grow only with the faults
//! devices report.
//!
//! Locking: `Fault::queue` is a leaf. It is never held while calling a
//! driver (responses are sent after it is released) nor while taking any
//! other lock of the order except the memory source, which the `_user`
//! variants write and read under it (the memory source is last in the
//! order and takes nothing inside).

use super::device::Device;
use super::{Ictx, Object};
use crate::errno::{Errno, Result};
use crate::uapi::{
    IOMMU_PGFAULT_FLAGS_LAST_PAGE, IOMMU_PGFAULT_PERM_READ, IOMMU_PGFAULT_PERM_WRITE, IOMMUFD_PAGE_RESP_INVALID,
    IOMMUFD_PAGE_RESP_SUCCESS, IommuHwptPageResponse, IommuHwptPgfault, PORTCULLIS_PGFAULT_FLAGS_UNRECOVERABLE,
};

/// How many unrecoverable DMA faults ([`Ictx::report_dma_fault`]) a fault
/// queue holds at most, read or not.
pub const MAX_DMA_FAULTS: usize = 1024;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
use spin::Mutex;

/// Size of one record read from a fault queue.
pub const FAULT_RECORD_SIZE: usize = IommuHwptPgfault::SIZE;
/// Size of one response written to a fault queue.
pub const RESPONSE_RECORD_SIZE: usize = IommuHwptPageResponse::SIZE;

/// One page request a device reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// `IOMMU_PGFAULT_FLAGS_*` (PASID_VALID, LAST_PAGE).
    pub flags: u32,
    /// The PASID, when `PASID_VALID`.
    pub pasid: u32,
    /// The page request group index.
    pub grpid: u32,
    /// `IOMMU_PGFAULT_PERM_*`.
    pub perm: u32,
    /// The faulting address.
    pub addr: u64,
}

/// A response for a group of page requests, sent to the device's driver:
/// the PASID and group of the group's last request, and the code
/// (`IOMMUFD_PAGE_RESP_SUCCESS` or `IOMMUFD_PAGE_RESP_INVALID`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageResponse {
    /// The last request's flags (PASID_VALID tells whether `pasid` is).
    pub flags: u32,
    /// PASID of the group.
    pub pasid: u32,
    /// Group index.
    pub grpid: u32,
    /// Response code.
    pub code: u32,
}

/// A group of page requests from one device, ending with a LAST_PAGE one.
struct Group {
    dev: Arc<Device>,
    dev_id: u32,
    hwpt_id: u32,
    /// The attachment it came through: the PASID attached to `hwpt_id`,
    /// or 0 for the requester id's.
    attach_pasid: u32,
    requests: Vec<PageRequest>,
    /// A page request group (answered to the device's driver), or an
    /// unrecoverable DMA fault (`Ictx::report_dma_fault`: no answer).
    recoverable: bool,
}

impl Group {
    fn response(&self, code: u32) -> PageResponse {
        let last = self.requests.last().copied().unwrap_or_default();
        PageResponse { flags: last.flags, pasid: last.pasid, grpid: last.grpid, code }
    }
    fn respond(&self, code: u32) {
        if !self.recoverable {
            return;
        }
        if let Some(n) = &self.dev.nesting {
            n.page_response(self.dev.ops.handle(), &self.response(code));
        }
    }
}

#[derive(Default)]
struct Queue {
    deliver: VecDeque<Group>,
    response: BTreeMap<u32, Group>,
    /// Unrecoverable DMA faults queued (delivered or awaiting a response).
    dma_faults: usize,
    /// Unrecoverable DMA faults dropped because [`MAX_DMA_FAULTS`] were
    /// queued.
    dma_faults_lost: u64,
}

impl Queue {
    /// The lowest free cookie from 1, or `None` when all 2^32 - 1 are in
    /// use (Linux's `xa_alloc` failing).
    fn free_cookie(&self) -> Option<u32> {
        let mut want = 1u32;
        for &k in self.response.keys() {
            if k != want {
                break;
            }
            want = want.checked_add(1)?;
        }
        Some(want)
    }
}

/// A fault object.
pub struct Fault {
    queue: Mutex<Queue>,
    pub(super) refs: AtomicU32,
}

impl core::fmt::Debug for Fault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let q = self.queue.lock();
        write!(f, "Fault({} delivered, {} awaiting response)", q.deliver.len(), q.response.len())
    }
}

impl Fault {
    /// Groups reported and not yet read.
    pub fn delivered(&self) -> usize {
        self.queue.lock().deliver.len()
    }

    /// Groups read and not yet answered.
    pub fn awaiting_response(&self) -> usize {
        self.queue.lock().response.len()
    }

    /// Reads whole groups as records, one at a time through `put(offset,
    /// record)`, into at most `count` bytes. Returns the bytes read; when
    /// `put` fails, the group being read goes back to the head of the
    /// queue, and the call returns what the earlier groups read or, if
    /// none, the error.
    fn read_with(&self, count: usize, mut put: impl FnMut(usize, &[u8]) -> Result<()>) -> Result<usize> {
        if !count.is_multiple_of(FAULT_RECORD_SIZE) {
            return Err(Errno::ESPIPE);
        }
        let mut q = self.queue.lock();
        let mut done = 0usize;
        let mut rc = Ok(());
        while let Some(group) = q.deliver.front() {
            let need = group.requests.len().saturating_mul(FAULT_RECORD_SIZE);
            if done >= count || need > count - done {
                break;
            }
            let Some(cookie) = q.free_cookie() else {
                rc = Err(Errno::EBUSY);
                break;
            };
            let mut at = done;
            for r in &group.requests {
                let rec = IommuHwptPgfault {
                    flags: r.flags,
                    dev_id: group.dev_id,
                    pasid: r.pasid,
                    grpid: r.grpid,
                    perm: r.perm,
                    __reserved: 0,
                    addr: r.addr,
                    length: 0,
                    cookie,
                };
                if let Err(e) = put(at, &rec.to_bytes()) {
                    rc = Err(e);
                    break;
                }
                at += FAULT_RECORD_SIZE;
            }
            if rc.is_err() {
                break;
            }
            let group = q.deliver.pop_front().expect("front exists");
            q.response.insert(cookie, group);
            done = at;
        }
        match rc {
            Err(e) if done == 0 => Err(e),
            _ => Ok(done),
        }
    }

    /// Answers groups from `count` bytes of responses, read one at a time
    /// through `get(offset, record)`. Returns the bytes consumed, or the
    /// error when the first response already failed.
    fn write_with(&self, count: usize, mut get: impl FnMut(usize, &mut [u8]) -> Result<()>) -> Result<usize> {
        if !count.is_multiple_of(RESPONSE_RECORD_SIZE) {
            return Err(Errno::ESPIPE);
        }
        let mut done = 0usize;
        let mut rc = Ok(());
        while count > done {
            let mut rec = [0u8; RESPONSE_RECORD_SIZE];
            if let Err(e) = get(done, &mut rec) {
                rc = Err(e);
                break;
            }
            let resp = IommuHwptPageResponse::read(&rec);
            if resp.code != IOMMUFD_PAGE_RESP_SUCCESS && resp.code != IOMMUFD_PAGE_RESP_INVALID {
                rc = Err(Errno::EINVAL);
                break;
            }
            let taken = {
                let mut q = self.queue.lock();
                let g = q.response.remove(&resp.cookie);
                if g.as_ref().is_some_and(|g| !g.recoverable) {
                    q.dma_faults -= 1;
                }
                g
            };
            let Some(group) = taken else {
                rc = Err(Errno::EINVAL);
                break;
            };
            // The driver is called with no lock of ours held.
            group.respond(resp.code);
            done += RESPONSE_RECORD_SIZE;
        }
        match rc {
            Err(e) if done == 0 => Err(e),
            _ => Ok(done),
        }
    }

    /// Queues a group for reading.
    fn deliver(&self, group: Group) {
        self.queue.lock().deliver.push_back(group);
    }

    /// Unrecoverable DMA faults dropped so far because the queue held
    /// [`MAX_DMA_FAULTS`] of them.
    pub fn dma_faults_lost(&self) -> u64 {
        self.queue.lock().dma_faults_lost
    }

    /// Takes out every group that came through attachment `(dev_id,
    /// hwpt_id, pasid)` (both queued and awaiting a response), or every
    /// group when `which` is `None`.
    fn take(&self, which: Option<(u32, u32, u32)>) -> Vec<Group> {
        let mut q = self.queue.lock();
        let hit = |g: &Group| which.is_none_or(|(d, h, p)| g.dev_id == d && g.hwpt_id == h && g.attach_pasid == p);
        let mut out = Vec::new();
        let deliver = core::mem::take(&mut q.deliver);
        for g in deliver {
            if hit(&g) { out.push(g) } else { q.deliver.push_back(g) }
        }
        let cookies: Vec<u32> = q.response.iter().filter(|(_, g)| hit(g)).map(|(c, _)| *c).collect();
        for c in cookies {
            out.extend(q.response.remove(&c));
        }
        q.dma_faults -= out.iter().filter(|g| !g.recoverable).count();
        out
    }

    /// Answers `INVALID` to the groups that came through a device's
    /// attachment to HWPT `hwpt_id` when it leaves: of its requester id
    /// (`pasid` 0) or of PASID `pasid`.
    pub(super) fn auto_respond(&self, dev_id: u32, hwpt_id: u32, pasid: u32) {
        for g in self.take(Some((dev_id, hwpt_id, pasid))) {
            g.respond(IOMMUFD_PAGE_RESP_INVALID);
        }
    }
}

impl Ictx {
    /// `IOMMU_FAULT_QUEUE_ALLOC` (flags checked by the caller): a fault
    /// object and a descriptor for it. Returns `(fault_id, fd)`.
    pub fn fault_alloc(&self) -> Result<(u32, u32)> {
        let fault = Arc::new(Fault { queue: Mutex::new(Queue::default()), refs: AtomicU32::new(0) });
        let id = self.insert(Object::Fault(fault.clone()))?;
        let fd = self.alloc_fd();
        fault.refs.fetch_add(1, Ordering::SeqCst);
        self.fault_fds.lock().insert(fd, id);
        Ok((id, fd))
    }

    /// The fault object `id`.
    pub fn fault(&self, id: u32) -> Result<Arc<Fault>> {
        match self.get(id)? {
            Object::Fault(f) => Ok(f),
            _ => Err(Errno::ENOENT),
        }
    }

    /// The fault object behind descriptor `fd` (`EBADF` when not open).
    fn fault_of_fd(&self, fd: u32) -> Result<Arc<Fault>> {
        let id = *self.fault_fds.lock().get(&fd).ok_or(Errno::EBADF)?;
        // An open descriptor holds its object: it cannot be gone.
        self.fault(id).map_err(|_| Errno::EBADF)
    }

    /// Closes a fault descriptor (`close(2)`): its hold on the object goes.
    pub fn fault_fd_close(&self, fd: u32) -> Result<()> {
        let id = self.fault_fds.lock().remove(&fd).ok_or(Errno::EBADF)?;
        if let Ok(f) = self.fault(id) {
            f.refs.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// `read(2)` of a fault descriptor into `buf`: whole groups of
    /// `struct iommu_hwpt_pgfault` records. Returns the bytes read.
    pub fn fault_fd_read(&self, fd: u32, buf: &mut [u8]) -> Result<usize> {
        read_slice(&self.fault_of_fd(fd)?, buf)
    }

    /// `write(2)` of `struct iommu_hwpt_page_response` records to a fault
    /// descriptor. Returns the bytes consumed.
    pub fn fault_fd_write(&self, fd: u32, buf: &[u8]) -> Result<usize> {
        write_slice(&self.fault_of_fd(fd)?, buf)
    }

    /// `read(2)` of a fault descriptor into `count` bytes of user memory
    /// at `uptr` (through the memory source, a record at a time).
    pub fn fault_fd_read_user(&self, fd: u32, uptr: u64, count: usize) -> Result<usize> {
        let f = self.fault_of_fd(fd)?;
        f.read_with(count, |at, rec| {
            let a = uptr.checked_add(at as u64).ok_or(Errno::EFAULT)?;
            a.checked_add(rec.len() as u64).ok_or(Errno::EFAULT)?;
            self.source().write_user(a, rec)
        })
    }

    /// `write(2)` to a fault descriptor of `count` bytes of user memory at
    /// `uptr` (read a response at a time).
    pub fn fault_fd_write_user(&self, fd: u32, uptr: u64, count: usize) -> Result<usize> {
        let f = self.fault_of_fd(fd)?;
        f.write_with(count, |at, rec| {
            let a = uptr.checked_add(at as u64).ok_or(Errno::EFAULT)?;
            a.checked_add(rec.len() as u64).ok_or(Errno::EFAULT)?;
            self.source().read_user(a, rec)
        })
    }

    /// Reads fault object `fault_id`'s queue into `buf` (in-kernel users;
    /// the rules of [`Self::fault_fd_read`]).
    pub fn fault_read(&self, fault_id: u32, buf: &mut [u8]) -> Result<usize> {
        read_slice(&self.fault(fault_id)?, buf)
    }

    /// Answers groups of fault object `fault_id` from `buf` (the rules of
    /// [`Self::fault_fd_write`]).
    pub fn fault_write(&self, fault_id: u32, buf: &[u8]) -> Result<usize> {
        write_slice(&self.fault(fault_id)?, buf)
    }

    /// A device reports a page request (the IOMMU driver's fault path;
    /// the selftest's `TRIGGER_IOPF`). Requests without LAST_PAGE wait in
    /// the device until the LAST_PAGE request of their group arrives;
    /// then the group goes to the fault queue of the HWPT the request's
    /// PASID (when tagged with an attached one) or else the device's
    /// requester id is attached to, or, when that HWPT has none, is
    /// answered `INVALID`.
    /// A device without IOPF enabled drops the request (`ENODEV`).
    pub fn report_iopf(&self, dev_id: u32, req: PageRequest) -> Result<()> {
        let dev = self.device(dev_id)?;
        if dev.iopf_enabled() == 0 {
            return Err(Errno::ENODEV);
        }
        if req.flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE == 0 {
            dev.iopf_partial.lock().push(req);
            return Ok(());
        }
        let mut requests: Vec<PageRequest> = Vec::new();
        dev.iopf_partial.lock().retain(|p| {
            if p.grpid == req.grpid {
                requests.push(*p);
                false
            } else {
                true
            }
        });
        requests.push(req);
        // A request tagged with an attached PASID goes through that PASID's
        // HWPT; any other through the requester id's (the mock, like a
        // driver with user-managed PASID tables, sends other PASIDs there).
        let by_pasid = if req.flags & crate::uapi::IOMMU_PGFAULT_FLAGS_PASID_VALID != 0 {
            dev.pasids.lock().get(&req.pasid).copied()
        } else {
            None
        };
        let (hwpt_id, attach_pasid) = match by_pasid {
            Some(h) => (Some(h), req.pasid),
            None => (*dev.attached.lock(), 0),
        };
        let target = hwpt_id.and_then(|h| self.hwpt_nested(h).ok().and_then(|n| n.fault.clone()).map(|f| (h, f)));
        let group = Group {
            dev: dev.clone(),
            dev_id,
            hwpt_id: hwpt_id.unwrap_or(0),
            attach_pasid,
            requests,
            recoverable: true,
        };
        match target {
            Some((_, fault)) => fault.deliver(group),
            None => group.respond(IOMMUFD_PAGE_RESP_INVALID),
        }
        Ok(())
    }

    /// Queues an unrecoverable DMA (translation) fault of device `dev_id`
    /// on fault object `fault_id`, for a VMM that wants its devices'
    /// faults (to inject into a virtual IOMMU's fault log, say) through
    /// the same queue as page requests: one record, a group of its own,
    /// with `LAST_PAGE` and [`PORTCULLIS_PGFAULT_FLAGS_UNRECOVERABLE`]
    /// set, `perm` READ or WRITE, `addr` the faulting IOVA. It is read and
    /// answered like any group (the answer frees its cookie and goes to
    /// no device: the DMA was refused already).
    ///
    /// Linux 6.12 has no such report (its fault queues carry page
    /// requests only); nothing delivers one unless the VMM asks, so
    /// Linux programs never see the flag.
    ///
    /// At most [`MAX_DMA_FAULTS`] of them are queued at a time: a device
    /// that faults faster than the VMM reads cannot grow the queue
    /// without bound. One more is dropped, counted
    /// ([`Fault::dma_faults_lost`]) and answered `ENOSPC`.
    pub fn report_dma_fault(&self, fault_id: u32, dev_id: u32, addr: u64, write: bool) -> Result<()> {
        let fault = self.fault(fault_id)?;
        let dev = self.device(dev_id)?;
        let hwpt_id = dev.attached.lock().unwrap_or(0);
        let perm = if write { IOMMU_PGFAULT_PERM_WRITE } else { IOMMU_PGFAULT_PERM_READ };
        let req = PageRequest {
            flags: IOMMU_PGFAULT_FLAGS_LAST_PAGE | PORTCULLIS_PGFAULT_FLAGS_UNRECOVERABLE,
            pasid: 0,
            grpid: 0,
            perm,
            addr,
        };
        let mut q = fault.queue.lock();
        if q.dma_faults >= MAX_DMA_FAULTS {
            q.dma_faults_lost += 1;
            return Err(Errno::ENOSPC);
        }
        q.dma_faults += 1;
        q.deliver.push_back(Group {
            dev,
            dev_id,
            hwpt_id,
            attach_pasid: 0,
            requests: alloc::vec![req],
            recoverable: false,
        });
        Ok(())
    }

    /// Releases a destroyed fault object: what it still queues is
    /// answered `INVALID`.
    pub(super) fn release_fault(&self, f: &Fault) {
        for g in f.take(None) {
            g.respond(IOMMUFD_PAGE_RESP_INVALID);
        }
    }

    /// Turns a device's IOPF on for an attach to `hwpt` when it has a
    /// fault queue. Returns whether it did.
    pub(super) fn iopf_enable_for(dev: &Device, has_fault: bool) -> bool {
        if has_fault {
            dev.iopf_enabled.fetch_add(1, Ordering::SeqCst);
        }
        has_fault
    }

    /// Undoes [`Self::iopf_enable_for`]; the last disable drops the
    /// device's partial groups.
    pub(super) fn iopf_disable(dev: &Device) {
        if dev.iopf_enabled.fetch_sub(1, Ordering::SeqCst) == 1 {
            dev.iopf_partial.lock().clear();
        }
    }
}

fn read_slice(f: &Arc<Fault>, buf: &mut [u8]) -> Result<usize> {
    f.read_with(buf.len(), |at, rec| {
        buf[at..at + rec.len()].copy_from_slice(rec);
        Ok(())
    })
}

fn write_slice(f: &Arc<Fault>, buf: &[u8]) -> Result<usize> {
    f.write_with(buf.len(), |at, rec| {
        rec.copy_from_slice(&buf[at..at + rec.len()]);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::tests::ctx;
    use crate::ctx::{NestedDomain, NestingOps, UserData};
    use crate::memsrc::{FakeAddressSpace, MemorySource};
    use crate::selftest::cmd::MockDevice;
    use crate::uapi::*;
    use alloc::boxed::Box;
    use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain};

    const MEM: u64 = 0x4000_0000;
    const MEM_END: u64 = MEM + (16 << 20);

    /// A mock device that records the page responses it is sent.
    struct RecDev {
        inner: MockDevice,
        responses: Mutex<Vec<PageResponse>>,
    }
    impl portcullis_iommu::DeviceOps for RecDev {
        fn handle(&self) -> DeviceHandle {
            self.inner.handle()
        }
        fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
            self.inner.alloc_domain()
        }
        fn max_pasid_log2(&self) -> u32 {
            self.inner.max_pasid_log2()
        }
    }
    impl NestingOps for RecDev {
        fn alloc_nested_domain(
            &self,
            parent: &mut dyn IommuDomain,
            flags: u32,
            data: &UserData<'_>,
        ) -> Result<Box<dyn NestedDomain>> {
            self.inner.alloc_nested_domain(parent, flags, data)
        }
        fn page_response(&self, _device: DeviceHandle, response: &PageResponse) {
            self.responses.lock().push(*response);
        }
    }

    struct World {
        c: Ictx,
        mem: Arc<FakeAddressSpace>,
        rec: Arc<RecDev>,
        dev: u32,
        ioas: u32,
        parent: u32,
        fault: u32,
        fd: u32,
        hwpt: u32,
    }

    /// A device attached to a nested HWPT with a fault queue.
    fn world() -> World {
        let (mem, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let rec = Arc::new(RecDev { inner: MockDevice::new(0), responses: Mutex::new(Vec::new()) });
        let dev = c.bind_nesting_device(rec.clone()).unwrap();
        c.attach(dev, ioas).unwrap();
        let parent = c.hwpt_alloc_flags(dev, ioas, false, true).unwrap();
        mem.write_user(MEM, &IOMMU_TEST_IOTLB_DEFAULT.to_le_bytes()).unwrap();
        let (fault, fd) = c.fault_alloc().unwrap();
        let data = UserData::new(&*mem, IOMMU_HWPT_DATA_SELFTEST, MEM, 4);
        let hwpt = c.hwpt_nested_alloc(dev, parent, IOMMU_HWPT_FAULT_ID_VALID, fault, &data).unwrap();
        assert_eq!(c.device(dev).unwrap().iopf_enabled(), 0);
        c.replace(dev, hwpt).unwrap();
        assert_eq!(c.device(dev).unwrap().iopf_enabled(), 1);
        World { c, mem, rec, dev, ioas, parent, fault, fd, hwpt }
    }

    fn req(grpid: u32, addr: u64, last: bool) -> PageRequest {
        let flags = if last { IOMMU_PGFAULT_FLAGS_LAST_PAGE } else { 0 };
        PageRequest { flags, pasid: 0, grpid, perm: IOMMU_PGFAULT_PERM_READ, addr }
    }

    fn resp(cookie: u32, code: u32) -> Vec<u8> {
        IommuHwptPageResponse { cookie, code }.to_bytes()
    }

    #[test]
    fn whole_records_and_whole_groups() {
        let w = world();
        let c = &w.c;
        let mut buf = [0u8; 3 * FAULT_RECORD_SIZE];
        assert_eq!(c.fault_fd_read(w.fd, &mut buf[..0]), Ok(0));
        assert_eq!(c.fault_fd_read(w.fd, &mut buf[..FAULT_RECORD_SIZE - 1]), Err(Errno::ESPIPE));
        assert_eq!(c.fault_fd_read(w.fd, &mut buf[..FAULT_RECORD_SIZE + 1]), Err(Errno::ESPIPE));
        assert_eq!(c.fault_fd_write(w.fd, &[0u8; 7]), Err(Errno::ESPIPE));
        assert_eq!(c.fault_fd_read(w.fd, &mut buf), Ok(0), "nothing queued");
        // A group of three requests (two wait for the LAST_PAGE one; a
        // request of another group in between is its own group).
        c.report_iopf(w.dev, req(7, 0x1000, false)).unwrap();
        c.report_iopf(w.dev, req(7, 0x2000, false)).unwrap();
        c.report_iopf(w.dev, req(9, 0x9000, true)).unwrap();
        c.report_iopf(w.dev, req(7, 0x3000, true)).unwrap();
        let f = c.fault(w.fault).unwrap();
        assert_eq!(f.delivered(), 2);
        // The first group (one record) fits in two records' room; the
        // second (three) does not, and stays.
        assert_eq!(c.fault_fd_read(w.fd, &mut buf[..2 * FAULT_RECORD_SIZE]), Ok(FAULT_RECORD_SIZE));
        let r = IommuHwptPgfault::read(&buf);
        assert_eq!((r.dev_id, r.grpid, r.addr, r.cookie, r.length), (w.dev, 9, 0x9000, 1, 0));
        assert_eq!(r.flags, IOMMU_PGFAULT_FLAGS_LAST_PAGE);
        assert_eq!(c.fault_fd_read(w.fd, &mut buf[..2 * FAULT_RECORD_SIZE]), Ok(0));
        assert_eq!(c.fault_read(w.fault, &mut buf), Ok(3 * FAULT_RECORD_SIZE));
        let recs: Vec<IommuHwptPgfault> = buf.chunks(FAULT_RECORD_SIZE).map(IommuHwptPgfault::read).collect();
        assert_eq!(recs.iter().map(|r| r.addr).collect::<Vec<_>>(), [0x1000, 0x2000, 0x3000]);
        assert!(recs.iter().all(|r| r.cookie == 2 && r.grpid == 7));
        assert_eq!((f.delivered(), f.awaiting_response()), (0, 2));
        // Responses: a bad code, an unknown cookie, then a partial write.
        assert_eq!(c.fault_fd_write(w.fd, &resp(1, 2)), Err(Errno::EINVAL));
        assert_eq!(c.fault_fd_write(w.fd, &resp(5, 0)), Err(Errno::EINVAL));
        let mut two = [0u8; 16];
        two[..8].copy_from_slice(&resp(2, IOMMUFD_PAGE_RESP_SUCCESS));
        two[8..].copy_from_slice(&resp(2, IOMMUFD_PAGE_RESP_SUCCESS));
        assert_eq!(c.fault_fd_write(w.fd, &two), Ok(8), "the second answers a cookie already answered");
        let got = w.rec.responses.lock().clone();
        assert_eq!(got, [PageResponse { flags: IOMMU_PGFAULT_FLAGS_LAST_PAGE, pasid: 0, grpid: 7, code: 0 }]);
        // Cookie 2 is free again and cookie 1 still waits.
        assert_eq!(f.awaiting_response(), 1);
        c.report_iopf(w.dev, req(3, 0x4000, true)).unwrap();
        assert_eq!(c.fault_fd_read(w.fd, &mut buf), Ok(FAULT_RECORD_SIZE));
        assert_eq!(IommuHwptPgfault::read(&buf).cookie, 2);
    }

    /// Page requests tagged with an attached PASID go to the fault queue
    /// of that PASID's HWPT; the PASID's detach answers only its groups.
    #[test]
    fn pasid_requests_follow_the_pasid_attachment() {
        let (mem, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let rec =
            Arc::new(RecDev { inner: MockDevice::new(MOCK_FLAGS_DEVICE_PASID), responses: Mutex::new(Vec::new()) });
        let dev = c.bind_nesting_device(rec.clone()).unwrap();
        let s2 = c.hwpt_alloc_pasid(dev, ioas, false, false, true).unwrap();
        c.attach(dev, s2).unwrap();
        let parent = c.hwpt_alloc_flags(dev, ioas, false, true).unwrap();
        mem.write_user(MEM, &IOMMU_TEST_IOTLB_DEFAULT.to_le_bytes()).unwrap();
        let (fault, fd) = c.fault_alloc().unwrap();
        let data = UserData::new(&*mem, IOMMU_HWPT_DATA_SELFTEST, MEM, 4);
        let flags = IOMMU_HWPT_FAULT_ID_VALID | IOMMU_HWPT_ALLOC_PASID;
        let hwpt = c.hwpt_nested_alloc(dev, parent, flags, fault, &data).unwrap();
        assert_eq!(c.attach_pasid(dev, 5, hwpt), Ok(hwpt));
        assert_eq!(c.device(dev).unwrap().iopf_enabled(), 1);
        let tagged = |pasid, grpid| PageRequest {
            flags: IOMMU_PGFAULT_FLAGS_LAST_PAGE | IOMMU_PGFAULT_FLAGS_PASID_VALID,
            pasid,
            grpid,
            perm: IOMMU_PGFAULT_PERM_READ,
            addr: 0x1000,
        };
        c.report_iopf(dev, tagged(5, 1)).unwrap();
        let mut buf = [0u8; FAULT_RECORD_SIZE];
        assert_eq!(c.fault_fd_read(fd, &mut buf), Ok(FAULT_RECORD_SIZE));
        let rec1 = IommuHwptPgfault::read(&buf);
        assert_eq!((rec1.dev_id, rec1.pasid, rec1.grpid), (dev, 5, 1));
        // Another PASID goes the requester id's way: a HWPT without a
        // fault queue, so it is answered INVALID at once.
        c.report_iopf(dev, tagged(6, 2)).unwrap();
        assert_eq!(
            rec.responses.lock().clone(),
            [PageResponse {
                flags: IOMMU_PGFAULT_FLAGS_LAST_PAGE | IOMMU_PGFAULT_FLAGS_PASID_VALID,
                pasid: 6,
                grpid: 2,
                code: IOMMUFD_PAGE_RESP_INVALID
            }]
        );
        c.report_iopf(dev, tagged(5, 3)).unwrap();
        let f = c.fault(fault).unwrap();
        assert_eq!((f.delivered(), f.awaiting_response()), (1, 1));
        // The requester id moving does not touch the PASID's groups.
        let s2b = c.hwpt_alloc_pasid(dev, ioas, false, false, true).unwrap();
        c.replace(dev, s2b).unwrap();
        assert_eq!((f.delivered(), f.awaiting_response()), (1, 1));
        // The PASID's detach answers both of its groups.
        c.detach_pasid(dev, 5).unwrap();
        let got: Vec<(u32, u32, u32)> = rec.responses.lock().iter().map(|r| (r.pasid, r.grpid, r.code)).collect();
        assert_eq!(got[1..], [(5, 3, IOMMUFD_PAGE_RESP_INVALID), (5, 1, IOMMUFD_PAGE_RESP_INVALID)]);
        assert_eq!((f.delivered(), f.awaiting_response()), (0, 0));
        assert_eq!(c.device(dev).unwrap().iopf_enabled(), 0);
        assert_eq!(c.hwpt_nested(hwpt).unwrap().refs(), 0);
    }

    #[test]
    fn leaving_the_hwpt_answers_invalid() {
        let w = world();
        let c = &w.c;
        c.report_iopf(w.dev, req(1, 0x1000, true)).unwrap();
        c.report_iopf(w.dev, req(2, 0x2000, true)).unwrap();
        c.report_iopf(w.dev, req(3, 0x3000, false)).unwrap();
        let mut buf = [0u8; FAULT_RECORD_SIZE];
        assert_eq!(c.fault_fd_read(w.fd, &mut buf), Ok(FAULT_RECORD_SIZE));
        // One group read and waiting, one queued, one partial: moving the
        // device away answers the first two INVALID, drops the third.
        c.replace(w.dev, w.parent).unwrap();
        let codes: Vec<(u32, u32)> = w.rec.responses.lock().iter().map(|r| (r.grpid, r.code)).collect();
        assert_eq!(codes, [(2, IOMMUFD_PAGE_RESP_INVALID), (1, IOMMUFD_PAGE_RESP_INVALID)]);
        let f = c.fault(w.fault).unwrap();
        assert_eq!((f.delivered(), f.awaiting_response()), (0, 0));
        let dev = c.device(w.dev).unwrap();
        assert_eq!((dev.iopf_enabled(), dev.iopf_partial.lock().len()), (0, 0));
        // IOPF off: requests are dropped.
        assert_eq!(c.report_iopf(w.dev, req(4, 0, true)), Err(Errno::ENODEV));
        assert_eq!(c.fault_fd_write(w.fd, &resp(1, 0)), Err(Errno::EINVAL), "its cookie is gone");
        // Back on, then unbinding the device answers too.
        c.replace(w.dev, w.hwpt).unwrap();
        c.report_iopf(w.dev, req(5, 0x5000, true)).unwrap();
        c.unbind_device(w.dev).unwrap();
        assert_eq!(w.rec.responses.lock().last().map(|r| (r.grpid, r.code)), Some((5, IOMMUFD_PAGE_RESP_INVALID)));
        assert_eq!(f.delivered(), 0);
        let _ = w.ioas;
    }

    #[test]
    fn references_and_descriptors() {
        let w = world();
        let c = &w.c;
        assert_eq!(c.destroy(w.fault), Err(Errno::EBUSY), "held by the HWPT and the fd");
        c.replace(w.dev, w.parent).unwrap();
        c.destroy(w.hwpt).unwrap();
        assert_eq!(c.destroy(w.fault), Err(Errno::EBUSY), "held by the fd");
        c.fault_fd_close(w.fd).unwrap();
        assert_eq!(c.fault_fd_close(w.fd), Err(Errno::EBADF));
        assert_eq!(c.fault_fd_read(w.fd, &mut [0u8; 40]), Err(Errno::EBADF));
        c.destroy(w.fault).unwrap();
        // Paging HWPTs refuse a fault id in 6.12 (dispatch: EOPNOTSUPP);
        // a fault that is not there is ENOENT after the domain is made.
        let data = UserData::new(&*w.mem, IOMMU_HWPT_DATA_SELFTEST, MEM, 4);
        assert_eq!(c.hwpt_nested_alloc(w.dev, w.parent, IOMMU_HWPT_FAULT_ID_VALID, w.fault, &data), Err(Errno::ENOENT));
        // A fault id naming another object type.
        assert_eq!(c.hwpt_nested_alloc(w.dev, w.parent, IOMMU_HWPT_FAULT_ID_VALID, w.ioas, &data), Err(Errno::ENOENT));
        assert!(!c.object_ids().contains(&w.fault));
        // Closing the context with an open fd and a HWPT holding a fault.
        let (f2, fd2) = c.fault_alloc().unwrap();
        assert_ne!(fd2, w.fd, "descriptors are never reused");
        let h2 = c.hwpt_nested_alloc(w.dev, w.parent, IOMMU_HWPT_FAULT_ID_VALID, f2, &data).unwrap();
        c.replace(w.dev, h2).unwrap();
        c.report_iopf(w.dev, req(1, 0, true)).unwrap();
        let mem = w.mem.clone();
        drop(w);
        assert_eq!(mem.pinned_pages(), 0);
    }

    #[test]
    fn largest_sizes_allocate_nothing() {
        let w = world();
        let c = &w.c;
        let top = usize::MAX - usize::MAX % FAULT_RECORD_SIZE;
        assert_eq!(c.fault_fd_read_user(w.fd, MEM, usize::MAX), Err(Errno::ESPIPE));
        assert_eq!(c.fault_fd_read_user(w.fd, MEM, top), Ok(0));
        c.report_iopf(w.dev, req(1, 0x1000, true)).unwrap();
        c.report_iopf(w.dev, req(2, 0x2000, true)).unwrap();
        // Memory ends after one record: the first group is read, the
        // second stays queued.
        let at = MEM_END - FAULT_RECORD_SIZE as u64;
        assert_eq!(c.fault_fd_read_user(w.fd, at, top), Ok(FAULT_RECORD_SIZE));
        assert_eq!(c.fault_fd_read_user(w.fd, MEM_END, top), Err(Errno::EFAULT));
        assert_eq!(c.fault_fd_read_user(w.fd, u64::MAX - 8, top), Err(Errno::EFAULT));
        assert_eq!(c.fault(w.fault).unwrap().delivered(), 1);
        // The largest write: one good response, then memory ends.
        let wtop = usize::MAX - usize::MAX % RESPONSE_RECORD_SIZE;
        let at = MEM_END - 8;
        w.mem.write_user(at, &resp(1, 0)).unwrap();
        assert_eq!(c.fault_fd_write_user(w.fd, at, wtop), Ok(8));
        assert_eq!(c.fault_fd_write_user(w.fd, MEM_END, wtop), Err(Errno::EFAULT));
        assert_eq!(c.fault_fd_write_user(w.fd, u64::MAX - 4, wtop), Err(Errno::EFAULT));
        assert_eq!(w.rec.responses.lock().len(), 1);
    }

    #[test]
    fn fault_queue_alloc_through_the_uapi() {
        let (_mem, c) = ctx();
        let mut a = IommuFaultAlloc { size: IommuFaultAlloc::SIZE as u32, flags: 1, ..Default::default() };
        let mut buf = a.to_bytes();
        assert_eq!(crate::dispatch::ioctl(&c, IOMMU_FAULT_QUEUE_ALLOC, &mut buf), Err(Errno::EOPNOTSUPP));
        assert_eq!(c.object_count(), 0);
        a.flags = 0;
        let mut buf = a.to_bytes();
        crate::dispatch::ioctl(&c, IOMMU_FAULT_QUEUE_ALLOC, &mut buf).unwrap();
        let out = IommuFaultAlloc::read(&buf);
        assert_eq!((out.out_fault_id, out.out_fault_fd), (1, 3));
        assert!(c.fault(out.out_fault_id).is_ok());
        assert_eq!(c.fault_fd_read(out.out_fault_fd, &mut [0u8; FAULT_RECORD_SIZE]), Ok(0));
    }

    #[test]
    fn unrecoverable_dma_faults_are_records_of_their_own_answered_to_nobody() {
        let w = world();
        w.c.report_dma_fault(w.fault, w.dev, 0xdead_b000, true).unwrap();
        w.c.report_iopf(w.dev, req(7, 0x5000, true)).unwrap();
        w.c.report_dma_fault(w.fault, w.dev, 0xbeef_0000, false).unwrap();
        let mut buf = [0u8; 3 * FAULT_RECORD_SIZE];
        assert_eq!(w.c.fault_fd_read(w.fd, &mut buf), Ok(buf.len()));
        let recs: Vec<IommuHwptPgfault> = buf.chunks(FAULT_RECORD_SIZE).map(IommuHwptPgfault::read).collect();
        let unrec = IOMMU_PGFAULT_FLAGS_LAST_PAGE | PORTCULLIS_PGFAULT_FLAGS_UNRECOVERABLE;
        assert_eq!(
            recs.iter().map(|r| (r.flags, r.dev_id, r.perm, r.addr, r.cookie)).collect::<Vec<_>>(),
            [
                (unrec, w.dev, IOMMU_PGFAULT_PERM_WRITE, 0xdead_b000, 1),
                (IOMMU_PGFAULT_FLAGS_LAST_PAGE, w.dev, IOMMU_PGFAULT_PERM_READ, 0x5000, 2),
                (unrec, w.dev, IOMMU_PGFAULT_PERM_READ, 0xbeef_0000, 3),
            ]
        );
        let mut answers = resp(1, IOMMUFD_PAGE_RESP_SUCCESS);
        answers.extend(resp(2, IOMMUFD_PAGE_RESP_SUCCESS));
        answers.extend(resp(3, IOMMUFD_PAGE_RESP_INVALID));
        assert_eq!(w.c.fault_fd_write(w.fd, &answers), Ok(answers.len()));
        let got = w.rec.responses.lock().clone();
        assert_eq!(got.iter().map(|r| r.grpid).collect::<Vec<_>>(), [7], "only the page request is answered");
        // Unknown fault object or device: nothing queued.
        assert_eq!(w.c.report_dma_fault(w.hwpt, w.dev, 0, false), Err(Errno::ENOENT));
        assert_eq!(w.c.report_dma_fault(w.fault, w.ioas, 0, false), Err(Errno::ENOENT));
        assert_eq!(w.c.fault(w.fault).unwrap().delivered(), 0);
    }

    #[test]
    fn unrecoverable_dma_faults_are_bounded() {
        let w = world();
        for k in 0..MAX_DMA_FAULTS as u64 {
            w.c.report_dma_fault(w.fault, w.dev, k << 12, false).unwrap();
        }
        assert_eq!(w.c.report_dma_fault(w.fault, w.dev, 0, false), Err(Errno::ENOSPC));
        let f = w.c.fault(w.fault).unwrap();
        assert_eq!((f.delivered(), f.dma_faults_lost()), (MAX_DMA_FAULTS, 1));
        // Page requests are not bounded by it: the device's own PRI
        // limits them.
        w.c.report_iopf(w.dev, req(1, 0, true)).unwrap();
        // Read ones still count until answered.
        let mut one = [0u8; FAULT_RECORD_SIZE];
        assert_eq!(w.c.fault_fd_read(w.fd, &mut one), Ok(FAULT_RECORD_SIZE));
        assert_eq!(w.c.report_dma_fault(w.fault, w.dev, 0, false), Err(Errno::ENOSPC));
        assert_eq!(w.c.fault_fd_write(w.fd, &resp(1, IOMMUFD_PAGE_RESP_SUCCESS)), Ok(8));
        w.c.report_dma_fault(w.fault, w.dev, 0, false).unwrap();
        // A device leaving its HWPT takes its queued faults with it.
        w.c.replace(w.dev, w.ioas).unwrap();
        assert_eq!(f.delivered(), 0);
        w.c.report_dma_fault(w.fault, w.dev, 0, false).unwrap();
        assert_eq!(f.dma_faults_lost(), 2);
    }
}
