//! Fixture `iommufd_mock_domain`: one IOAS with one or two mock domains,
//! plus a private mapping of 8 pages, or of two huge pages in the
//! `*_hugepage` variants (`one_domain`, `two_domains`,
//! `one_domain_hugepage`, `two_domains_hugepage`), and Linux 6.13's
//! `one_domain_file`, `one_domain_file_hugepage`, whose tests map memfds
//! with `IOMMU_IOAS_MAP_FILE` where the others map user memory (`basic`,
//! `all_aligns`, `all_aligns_copy`, `user_copy`; the other tests do not
//! look at `file`).

use super::harness::*;
use iommufd::Errno;
use iommufd::uapi::*;
use std::ops::Deref;

#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub mock_domains: u32,
    pub hugepages: bool,
    /// Map memfds with IOAS_MAP_FILE (Linux 6.13+).
    pub file: bool,
}

pub struct MockFx {
    f: Fx,
    pub variant: Variant,
    pub ioas_id: u32,
    pub hwpt_id: u32,
    pub hwpt_ids: [u32; 2],
    pub stdev_ids: [u32; 2],
    pub idev_ids: [u32; 2],
    pub mmap_buf_size: u64,
}

impl Deref for MockFx {
    type Target = Fx;
    fn deref(&self) -> &Fx {
        &self.f
    }
}

impl MockFx {
    pub fn setup(variant: Variant) -> Self {
        let f = Fx::open();
        let ioas_id = f.ioas_alloc().unwrap();
        let mut s = MockFx {
            f,
            variant,
            ioas_id,
            hwpt_id: 0,
            hwpt_ids: [0; 2],
            stdev_ids: [0; 2],
            idev_ids: [0; 2],
            mmap_buf_size: PAGE_SIZE * 8,
        };
        assert!(variant.mock_domains <= 2);
        for i in 0..variant.mock_domains as usize {
            (s.stdev_ids[i], s.hwpt_ids[i], s.idev_ids[i]) = s.mock_domain(ioas_id).unwrap();
        }
        s.hwpt_id = s.hwpt_ids[0];
        if variant.hugepages {
            s.mmap_buf_size = HUGEPAGE_SIZE * 2;
        }
        s
    }

    /// `check_mock_iova`: the mock domain(s) translate `[iova, iova +
    /// length)` to the pages behind `uptr`.
    pub fn check_mock_iova(&self, uptr: u64, iova: u64, length: u64) {
        assert_eq!(self.check_map(self.hwpt_id, iova, length, uptr), Ok(()), "iova {iova:#x} len {length:#x}");
        if self.hwpt_ids[1] != 0 {
            assert_eq!(self.check_map(self.hwpt_ids[1], iova, length, uptr), Ok(()), "second domain");
        }
    }

    pub fn map(&self, uptr: u64, length: u64) -> R<u64> {
        self.ioas_map(self.ioas_id, uptr, length)
    }

    pub fn unmap(&self, iova: u64, length: u64) -> R<()> {
        self.ioas_unmap(self.ioas_id, iova, length)
    }
}

fn basic(s: &mut MockFx) {
    if s.variant.file { basic_file(s) } else { basic_mmap(s) }
}

/// `test_basic_file`.
fn basic_file(s: &mut MockFx) {
    let buf_size = s.mmap_buf_size;

    // One page of the shared memfd.
    let iova = s.ioas_map_file(s.ioas_id, s.mfd, 0, PAGE_SIZE).unwrap();
    s.check_mock_iova(MFD_BUFFER, iova, PAGE_SIZE);

    // One byte past the end of a memfd: EINVAL when the pages are pinned
    // (here at once: the IOAS has domains).
    let (_buf, mfd_tmp) = s.memfd_mmap(buf_size);
    assert_eq!(s.ioas_map_file(s.ioas_id, mfd_tmp, 0, buf_size + 1), Err(Errno::EINVAL));

    // Truncated to nothing: EINVAL.
    s.ftruncate(mfd_tmp, 0).unwrap();
    assert_eq!(s.ioas_map_file(s.ioas_id, mfd_tmp, 0, buf_size), Err(Errno::EINVAL));
    s.close(mfd_tmp).unwrap();
}

/// `test_basic_mmap`.
fn basic_mmap(s: &mut MockFx) {
    let buf_size = s.mmap_buf_size;

    // One page.
    let iova = s.map(BUFFER, PAGE_SIZE).unwrap();
    s.check_mock_iova(BUFFER, iova, PAGE_SIZE);

    // The second half of the mapping is gone: EFAULT half way through.
    let buf = s.reserve_va(buf_size);
    s.map_va(buf, buf_size / 2);
    assert_eq!(s.map(buf, buf_size), Err(Errno::EFAULT));

    // Nothing mapped at all: EFAULT on the first page.
    let gone = s.reserve_va(buf_size);
    assert_eq!(s.map(gone, buf_size), Err(Errno::EFAULT));
}

fn ro_unshare(s: &mut MockFx) {
    // A private, writable mapping pinned for reading: writing to it
    // afterwards must not move the page the domain points at.
    let buf = s.mmap(PAGE_SIZE);
    let mut iova = 0;
    s.ioas_map_raw(s.ioas_id, buf, PAGE_SIZE, &mut iova, IOMMU_IOAS_MAP_READABLE).unwrap();
    s.check_mock_iova(buf, iova, PAGE_SIZE);
    s.fill_user(buf, PAGE_SIZE, 1);
    s.check_mock_iova(buf, iova, PAGE_SIZE);
}

/// Page-rounded `[start, end)` of a byte range, as `(uptr, length)`.
fn page_span(buf: u64, start: u64, end: u64) -> (u64, u64) {
    let first = start / PAGE_SIZE * PAGE_SIZE;
    (buf + first, end / PAGE_SIZE * PAGE_SIZE - first)
}

/// The test buffer of `all_aligns` and `all_aligns_copy`: a private
/// mapping, or a memfd mapped shared in the file variants; returns its
/// address and the memfd.
fn aligns_buffer(s: &MockFx) -> (u64, Option<i32>) {
    if s.variant.file {
        let (buf, mfd) = s.memfd_mmap(s.mmap_buf_size);
        (buf, Some(mfd))
    } else {
        (s.mmap(s.mmap_buf_size), None)
    }
}

/// Maps `[start, start + length)` of the test buffer: by address, or by
/// offset in its memfd.
fn map_aligned(s: &MockFx, buf: u64, mfd: Option<i32>, start: u64, length: u64) -> u64 {
    match mfd {
        Some(fd) => s.ioas_map_file(s.ioas_id, fd, start, length).unwrap(),
        None => s.map(buf + start, length).unwrap(),
    }
}

fn all_aligns(s: &mut MockFx) {
    let test_step = if s.variant.hugepages { s.mmap_buf_size / 16 } else { MOCK_PAGE_SIZE };
    let buf_size = s.mmap_buf_size;
    let (buf, mfd) = aligns_buffer(s);
    s.check_refs(buf, buf_size, 0).unwrap();

    // Every start/length combination in MOCK_PAGE_SIZE steps (far fewer
    // with huge pages).
    let mut start = 0;
    while start < buf_size {
        let mut end = if s.variant.hugepages { buf_size } else { start + MOCK_PAGE_SIZE };
        while end < buf_size {
            let length = end - start;
            let iova = map_aligned(s, buf, mfd, start, length);
            s.check_mock_iova(buf + start, iova, length);
            let (uptr, len) = page_span(buf, start, end);
            assert_eq!(s.check_refs(uptr, len, 1), Ok(()), "start {start:#x} end {end:#x}");
            s.unmap(iova, length).unwrap();
            end += MOCK_PAGE_SIZE;
        }
        start += test_step;
    }
    s.check_refs(buf, buf_size, 0).unwrap();
    if let Some(fd) = mfd {
        s.close(fd).unwrap();
    }
}

fn all_aligns_copy(s: &mut MockFx) {
    let test_step = if s.variant.hugepages { s.mmap_buf_size / 16 } else { MOCK_PAGE_SIZE };
    let buf_size = s.mmap_buf_size;
    let (buf, mfd) = aligns_buffer(s);
    s.check_refs(buf, buf_size, 0).unwrap();

    let mut start = 0;
    while start < buf_size {
        let mut end = if s.variant.hugepages { buf_size } else { start + MOCK_PAGE_SIZE };
        while end < buf_size {
            let length = end - start;
            let iova = map_aligned(s, buf, mfd, start, length);

            // A domain added and destroyed while the area exists.
            let old_id = s.hwpt_ids[1];
            let (mock_stdev_id, hwpt, _) = s.mock_domain(s.ioas_id).unwrap();
            s.hwpt_ids[1] = hwpt;
            s.check_mock_iova(buf + start, iova, length);
            let (uptr, len) = page_span(buf, start, end);
            assert_eq!(s.check_refs(uptr, len, 1), Ok(()), "start {start:#x} end {end:#x}");
            s.destroy(mock_stdev_id).unwrap();
            s.hwpt_ids[1] = old_id;

            s.unmap(iova, length).unwrap();
            end += MOCK_PAGE_SIZE;
        }
        start += test_step;
    }
    s.check_refs(buf, buf_size, 0).unwrap();
    if let Some(fd) = mfd {
        s.close(fd).unwrap();
    }
}

fn user_copy(s: &mut MockFx) {
    // The file variants use the memfd buffer, mapped by offset.
    let buf = if s.variant.file { MFD_BUFFER } else { BUFFER };
    let map_buffer = |ioas_id| {
        if s.variant.file {
            s.ioas_map_file(ioas_id, s.mfd, 0, BUFFER_SIZE)
        } else {
            s.ioas_map(ioas_id, buf, BUFFER_SIZE)
        }
    };
    let copy = |src_ioas_id, src_iova| IommuIoasCopy {
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE,
        dst_ioas_id: s.ioas_id,
        dst_iova: MOCK_APERTURE_START,
        src_ioas_id,
        src_iova,
        length: BUFFER_SIZE,
        ..Default::default()
    };

    // Pages pinned by an access in a domain-less IOAS, copied into the
    // IOAS with the domains.
    let ioas_id = s.ioas_alloc().unwrap();
    let src_iova = map_buffer(ioas_id).unwrap();
    let access = s.create_access(ioas_id, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).unwrap();
    s.access_pages(access, 0, src_iova, BUFFER_SIZE, buf).unwrap();
    assert_eq!(s.ioas_copy(copy(ioas_id, src_iova)).0, Ok(()));
    s.check_mock_iova(buf, MOCK_APERTURE_START, BUFFER_SIZE);

    // Move the access to a new IOAS.
    let new_ioas_id = s.ioas_alloc().unwrap();
    let new_src_iova = map_buffer(new_ioas_id).unwrap();
    s.access_replace_ioas(access, new_ioas_id).unwrap();

    // Drop the copy and the old IOAS.
    s.unmap(MOCK_APERTURE_START, BUFFER_SIZE).unwrap();
    s.destroy(ioas_id).unwrap();

    // Same again from the new IOAS.
    let pages = s.access_pages(access, 0, new_src_iova, BUFFER_SIZE, buf).unwrap();
    assert_eq!(s.ioas_copy(copy(new_ioas_id, new_src_iova)).0, Ok(()));
    s.check_mock_iova(buf, MOCK_APERTURE_START, BUFFER_SIZE);

    s.destroy_access_pages(access, pages).unwrap();
    s.destroy_access(access).unwrap();
    s.destroy(new_ioas_id).unwrap();
}

fn replace(s: &mut MockFx) {
    let ioas_id = s.ioas_alloc().unwrap();
    s.mock_domain_replace(s.stdev_ids[0], ioas_id).unwrap();

    // With one device, moving it away freed its automatic HWPT.
    if s.variant.mock_domains == 1 {
        assert_eq!(s.mock_domain_replace(s.stdev_ids[0], s.hwpt_ids[0]), Err(Errno::ENOENT));
    }

    s.mock_domain_replace(s.stdev_ids[0], ioas_id).unwrap();
    if s.variant.mock_domains >= 2 {
        s.mock_domain_replace(s.stdev_ids[0], s.hwpt_ids[1]).unwrap();
        s.mock_domain_replace(s.stdev_ids[0], s.hwpt_ids[1]).unwrap();
        s.mock_domain_replace(s.stdev_ids[0], s.hwpt_ids[0]).unwrap();
    }

    s.mock_domain_replace(s.stdev_ids[0], s.ioas_id).unwrap();
    s.destroy(ioas_id).unwrap();
}

fn alloc_hwpt(s: &mut MockFx) {
    for i in 0..s.variant.mock_domains as usize {
        assert_eq!(s.hwpt_alloc(s.idev_ids[i], s.ioas_id, !IOMMU_HWPT_ALLOC_NEST_PARENT), Err(Errno::EOPNOTSUPP));
        let hwpt0 = s.hwpt_alloc(s.idev_ids[i], s.ioas_id, 0).unwrap();
        let hwpt1 = s.hwpt_alloc(s.idev_ids[i], s.ioas_id, IOMMU_HWPT_ALLOC_NEST_PARENT).unwrap();

        // Rotate the device through both HWPTs.
        s.mock_domain_replace(s.stdev_ids[i], hwpt0).unwrap();
        assert_eq!(s.destroy(hwpt0), Err(Errno::EBUSY));
        s.mock_domain_replace(s.stdev_ids[i], hwpt1).unwrap();
        assert_eq!(s.destroy(hwpt1), Err(Errno::EBUSY));
        s.mock_domain_replace(s.stdev_ids[i], s.ioas_id).unwrap();
        s.destroy(hwpt1).unwrap();

        let (stdev, _, _) = s.mock_domain(hwpt0).unwrap();
        s.destroy(stdev).unwrap();
        s.destroy(hwpt0).unwrap();
    }
}

fn run(variant: Variant, test: fn(&mut MockFx)) {
    let mut s = MockFx::setup(variant);
    test(&mut s);
}

macro_rules! cases {
    ($v:expr) => {
        const V: super::Variant = $v;
        case!(basic);
        case!(ro_unshare);
        case!(all_aligns);
        case!(all_aligns_copy);
        case!(replace);
        case!(alloc_hwpt);
        case!(user_copy);
    };
}

macro_rules! case {
    ($name:ident) => {
        #[test]
        fn $name() {
            super::run(V, super::$name)
        }
    };
    ($name:ident, ignore = $why:literal) => {
        #[test]
        #[ignore = $why]
        fn $name() {
            super::run(V, super::$name)
        }
    };
}

mod one_domain {
    cases!(super::Variant { mock_domains: 1, hugepages: false, file: false });
}

mod two_domains {
    cases!(super::Variant { mock_domains: 2, hugepages: false, file: false });
}

mod one_domain_hugepage {
    cases!(super::Variant { mock_domains: 1, hugepages: true, file: false });
}

mod two_domains_hugepage {
    cases!(super::Variant { mock_domains: 2, hugepages: true, file: false });
}

mod one_domain_file {
    cases!(super::Variant { mock_domains: 1, hugepages: false, file: true });
}

mod one_domain_file_hugepage {
    cases!(super::Variant { mock_domains: 1, hugepages: true, file: true });
}
