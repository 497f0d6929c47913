//! `IOMMU_IOAS_MAP_FILE` (Linux 6.13) and `IOMMU_IOAS_CHANGE_PROCESS`
//! (6.14) through the dispatcher: the order of the checks and their
//! errnos, the largest sizes and offsets a caller can send (no overflow,
//! no allocation sized by them, a clean errno, nothing left pinned or
//! held), and the pins a file mapping takes.

use iommufd::ctx::Ictx;
use iommufd::dispatch::ioctl;
use iommufd::errno::Errno;
use iommufd::memsrc::{FakeAddressSpace, FakeFileKind, MemorySource, PAGE_SIZE};
use iommufd::selftest::cmd::MockDevice;
use iommufd::selftest::mock::MOCK_APERTURE_START;
use iommufd::uapi::*;
use std::sync::Arc;

const RW: u32 = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
const FILE_PAGES: u64 = 8;

struct W {
    mem: Arc<FakeAddressSpace>,
    ictx: Ictx,
    /// An IOAS with a mock domain.
    dom: u32,
    /// An IOAS without domains.
    bare: u32,
    mfd: i32,
}

fn world() -> W {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(0x1000_0000, 16 * PAGE_SIZE, true);
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let dom = ictx.ioas_alloc().unwrap();
    let dev = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    ictx.attach(dev, dom).unwrap();
    let bare = ictx.ioas_alloc().unwrap();
    let mfd = mem.create_memfd(FILE_PAGES * PAGE_SIZE);
    W { mem, ictx, dom, bare, mfd }
}

impl W {
    /// IOAS_MAP_FILE with `c`; returns the result and the IOVA written back.
    fn map_file(&self, c: IommuIoasMapFile) -> (Result<(), Errno>, u64) {
        let mut buf = IommuIoasMapFile { size: IommuIoasMapFile::SIZE as u32, ..c }.to_bytes();
        let r = ioctl(&self.ictx, IOMMU_IOAS_MAP_FILE, &mut buf);
        (r, IommuIoasMapFile::read(&buf).iova)
    }
    fn file(&self, ioas_id: u32, start: u64, length: u64) -> IommuIoasMapFile {
        IommuIoasMapFile { flags: RW, ioas_id, fd: self.mfd, start, length, ..Default::default() }
    }
    fn change_process(&self, reserved: u32) -> Result<(), Errno> {
        let c = IommuIoasChangeProcess { size: IommuIoasChangeProcess::SIZE as u32, __reserved: reserved };
        ioctl(&self.ictx, IOMMU_IOAS_CHANGE_PROCESS, &mut c.to_bytes())
    }
    fn nothing_pinned_or_held(&self) {
        assert_eq!((self.mem.pinned_pages(), self.ictx.pinned_pages()), (0, 0));
        assert_eq!(self.mem.live_files(), 1, "only the descriptor holds the memfd");
    }
}

#[test]
fn checks_in_linux_order() {
    let w = world();
    let ok = w.file(w.dom, 0, PAGE_SIZE);
    // Unknown flag first, even with everything else wrong.
    let bad = IommuIoasMapFile { flags: 1 << 3, iova: u64::MAX, ioas_id: 99, fd: -1, ..ok };
    assert_eq!(w.map_file(bad).0, Err(Errno::EOPNOTSUPP));
    // Then the ULONG_MAX checks, then the protection, then the IOAS.
    let bad = IommuIoasMapFile { flags: 0, length: u64::MAX, ioas_id: 99, fd: -1, ..ok };
    assert_eq!(w.map_file(bad).0, Err(Errno::EOVERFLOW));
    let bad = IommuIoasMapFile { flags: IOMMU_IOAS_MAP_FIXED_IOVA, iova: u64::MAX, ..ok };
    assert_eq!(w.map_file(bad).0, Err(Errno::EOVERFLOW));
    let bad = IommuIoasMapFile { flags: IOMMU_IOAS_MAP_FIXED_IOVA, ioas_id: 99, fd: -1, ..ok };
    assert_eq!(w.map_file(bad).0, Err(Errno::EINVAL));
    assert_eq!(w.map_file(IommuIoasMapFile { ioas_id: 99, fd: -1, ..ok }).0, Err(Errno::ENOENT));
    // Then the descriptor, before the range.
    assert_eq!(w.map_file(IommuIoasMapFile { fd: -1, length: 0, ..ok }).0, Err(Errno::EBADF));
    assert_eq!(w.map_file(IommuIoasMapFile { fd: 1000, ..ok }).0, Err(Errno::EBADF));
    let ro = w.mem.dup_fd(w.mfd, false);
    assert_eq!(w.map_file(IommuIoasMapFile { fd: ro, ..ok }).0, Err(Errno::EPERM), "writable map, read-only fd");
    let read_only = IommuIoasMapFile { fd: ro, flags: IOMMU_IOAS_MAP_READABLE, ..ok };
    let (r, iova) = w.map_file(read_only);
    assert_eq!(r, Ok(()), "a read-only map of a read-only descriptor is fine");
    w.ictx.ioas_unmap(w.dom, iova, PAGE_SIZE).unwrap();
    w.mem.close_fd(ro).unwrap();
    assert_eq!(w.map_file(IommuIoasMapFile { length: 0, ..ok }).0, Err(Errno::EINVAL));
    // Then the map: IOVA checks, then the pins (past the file: EINVAL).
    let fixed = IommuIoasMapFile { flags: RW | IOMMU_IOAS_MAP_FIXED_IOVA, iova: 0x1000, ..ok };
    assert_eq!(w.map_file(fixed).0, Err(Errno::EINVAL), "outside the mock aperture (reserved)");
    assert_eq!(w.map_file(w.file(w.dom, 0, (FILE_PAGES + 1) * PAGE_SIZE)).0, Err(Errno::EINVAL));
    assert_eq!(w.map_file(w.file(w.dom, FILE_PAGES * PAGE_SIZE, PAGE_SIZE)).0, Err(Errno::EINVAL));
    let other = w.mem.create_file(PAGE_SIZE, FakeFileKind::Other);
    let not_memfd = IommuIoasMapFile { fd: other, ..ok };
    assert_eq!(w.map_file(not_memfd).0, Err(Errno::EINVAL), "not a memfd");
    w.mem.close_fd(other).unwrap();
    w.nothing_pinned_or_held();
    // A short struct (below the minimum of 40) never reaches the handler.
    let mut short = w.file(w.dom, 0, PAGE_SIZE).to_bytes();
    short[..4].copy_from_slice(&39u32.to_le_bytes());
    assert_eq!(ioctl(&w.ictx, IOMMU_IOAS_MAP_FILE, &mut short), Err(Errno::EINVAL));
}

#[test]
fn largest_sizes_and_offsets() {
    let w = world();
    let max_page = !(PAGE_SIZE - 1);
    // Ranges whose last byte is past u64::MAX.
    for (start, length) in [(u64::MAX, 2), (max_page, PAGE_SIZE + 1), (3, u64::MAX - 1)] {
        for ioas in [w.dom, w.bare] {
            assert_eq!(w.map_file(w.file(ioas, start, length)).0, Err(Errno::EOVERFLOW), "{start:#x}+{length:#x}");
        }
    }
    // Lengths within a page of u64::MAX: EINVAL, as Linux's page store.
    for length in [u64::MAX - 1, u64::MAX - PAGE_SIZE + 1] {
        assert_eq!(w.map_file(w.file(w.bare, 0, length)).0, Err(Errno::EINVAL));
    }
    // The largest length the page store accepts: IOVA allocation refuses
    // half the space or more (EOVERFLOW, Linux's `iopt_alloc_iova`).
    let huge = u64::MAX - PAGE_SIZE;
    assert_eq!(w.map_file(w.file(w.bare, 0, huge)).0, Err(Errno::EOVERFLOW));
    assert_eq!(w.map_file(w.file(w.dom, 0, huge)).0, Err(Errno::EINVAL), "not whole 2 KiB I/O pages");
    assert_eq!(w.map_file(w.file(w.dom, 0, huge & !0x7ff)).0, Err(Errno::EOVERFLOW));
    // 4 EiB of a 32 KiB memfd in an IOAS without domains: nothing is
    // pinned yet, so nothing is sized by the length, and it maps.
    let (r, big) = w.map_file(w.file(w.bare, 0, 1 << 62));
    assert_eq!(r, Ok(()));
    assert_eq!(w.ictx.ioas_unmap(w.bare, big, 1 << 62), Ok(1 << 62));
    let at = IommuIoasMapFile {
        flags: RW | IOMMU_IOAS_MAP_FIXED_IOVA,
        iova: MOCK_APERTURE_START,
        ..w.file(w.dom, 0, 1 << 62)
    };
    assert_eq!(w.map_file(at).0, Err(Errno::EINVAL), "past the mock aperture (reserved)");
    w.nothing_pinned_or_held();

    // The last byte of the offset space: nothing pins it in an IOAS
    // without domains (Linux: the same), so the map succeeds.
    let (r, iova) = w.map_file(w.file(w.bare, u64::MAX, 1));
    assert_eq!(r, Ok(()));
    assert_eq!(iova % PAGE_SIZE, PAGE_SIZE - 1, "the IOVA keeps the offset's place in its page");
    w.ictx.ioas_unmap(w.bare, 0, u64::MAX).unwrap();
    // The last page, inside the mock aperture: a domain that would have
    // to pin it cannot join (EINVAL, nothing changes), nor can an access
    // pin or read it.
    let last = IommuIoasMapFile {
        flags: RW | IOMMU_IOAS_MAP_FIXED_IOVA,
        iova: MOCK_APERTURE_START,
        ..w.file(w.bare, max_page, PAGE_SIZE)
    };
    assert_eq!(w.map_file(last).0, Ok(()));
    let dev = w.ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    let before = w.ictx.object_ids();
    assert_eq!(w.ictx.attach(dev, w.bare), Err(Errno::EINVAL));
    assert_eq!(w.ictx.object_ids(), before);
    let acc = w.ictx.access_create(Arc::new(iommufd::selftest::cmd::MockAccess::new(true))).unwrap();
    w.ictx.access_attach(acc, w.bare).unwrap();
    assert_eq!(w.ictx.access_pin_pages(acc, MOCK_APERTURE_START, PAGE_SIZE, false), Err(Errno::EINVAL));
    let mut byte = [0u8; 1];
    assert_eq!(w.ictx.access_rw(acc, MOCK_APERTURE_START + 5, &mut byte, false), Err(Errno::EINVAL));
    w.ictx.access_destroy(acc).unwrap();
    w.ictx.ioas_unmap(w.bare, 0, u64::MAX).unwrap();
    w.nothing_pinned_or_held();
    // With a domain: refused at once.
    assert_eq!(w.map_file(w.file(w.dom, max_page, PAGE_SIZE)).0, Err(Errno::EINVAL));
    assert_eq!(w.map_file(w.file(w.dom, 1 << 63, PAGE_SIZE)).0, Err(Errno::EINVAL));
    w.nothing_pinned_or_held();
}

#[test]
fn a_file_map_pins_the_file_pages_once() {
    let w = world();
    w.mem.map_file(0x2000_0000, w.mfd, 0, FILE_PAGES * PAGE_SIZE);
    let (r, iova) = w.map_file(w.file(w.dom, 0x1800, 3 * PAGE_SIZE));
    assert_eq!(r, Ok(()));
    assert_eq!(iova % PAGE_SIZE, 0x800);
    let hwpt = (1..10).find_map(|id| w.ictx.hwpt(id).ok()).unwrap();
    for k in 0..6 {
        let off = 0x1800 + k * 0x800;
        assert_eq!(hwpt.domain.lock().iova_to_phys(iova + k * 0x800), w.mem.file_phys(w.mfd, off), "{off:#x}");
    }
    let pins: Vec<u32> = (0..FILE_PAGES).map(|p| w.mem.pins(0x2000_0000 + p * PAGE_SIZE)).collect();
    assert_eq!(pins, [0, 1, 1, 1, 1, 0, 0, 0]);
    assert_eq!(w.ictx.pinned_pages(), 4);
    // Closing the descriptor changes nothing for the mapping.
    w.mem.close_fd(w.mfd).unwrap();
    assert_eq!(w.mem.live_files(), 1);
    w.ictx.ioas_unmap(w.dom, iova, 3 * PAGE_SIZE).unwrap();
    assert_eq!((w.mem.pinned_pages(), w.ictx.pinned_pages(), w.mem.live_files()), (0, 0, 0));
}

#[test]
fn change_process_from_the_own_process() {
    let w = world();
    assert_eq!(w.change_process(1), Err(Errno::EOPNOTSUPP), "__reserved first");
    assert_eq!(w.change_process(0), Ok(()), "nothing mapped");
    let (r, iova) = w.map_file(w.file(w.dom, 0, 2 * PAGE_SIZE));
    assert_eq!(r, Ok(()));
    assert_eq!(w.change_process(0), Ok(()), "file mappings only");
    let user = w.ictx.ioas_map(w.bare, None, 0x1000_0000, PAGE_SIZE, true, true).unwrap();
    assert_eq!(w.change_process(0), Err(Errno::EINVAL), "a user mapping in any IOAS");
    assert_eq!(w.change_process(1), Err(Errno::EOPNOTSUPP));
    w.ictx.ioas_unmap(w.bare, user, PAGE_SIZE).unwrap();
    assert_eq!(w.change_process(0), Ok(()));
    assert_eq!((w.mem.file_pins(w.mfd, PAGE_SIZE), w.ictx.pinned_pages()), (1, 2), "nothing moved");
    w.ictx.ioas_unmap(w.dom, iova, 2 * PAGE_SIZE).unwrap();
    w.nothing_pinned_or_held();
}
