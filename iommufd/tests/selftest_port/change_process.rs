//! Fixture `change_process` (Linux 6.14): a context with one IOAS and a
//! mock domain; `basic` checks that `IOMMU_IOAS_CHANGE_PROCESS` refuses
//! while user memory is mapped, works from the process that mapped a
//! memfd, and from another process, which then carries the pinned pages.
//!
//! Linux's second process is a `fork`ed child calling the ioctl on the
//! inherited descriptor and reading both processes' `VmPin`/`VmLck` from
//! `/proc`. A context here has one memory source and the dispatcher's
//! caller is always its own process, so the child's part is the Rust
//! API, `Ictx::change_process` with the child's memory and pin limit,
//! and the charge is read from the context's accounting. It runs in both
//! accounting modes (`IOMMU_OPTION_RLIMIT_MODE` 0 and 1, set before any
//! object exists).

use super::harness::*;
use iommufd::Errno;
use iommufd::memsrc::{FakeAddressSpace, MemorySource};
use iommufd::uapi::*;
use std::sync::Arc;

struct ChangeFx {
    f: Fx,
    ioas_id: u32,
}

fn setup(mm_mode: bool) -> ChangeFx {
    let f = Fx::open();
    assert_eq!(f.option(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, mm_mode as u64).0, Ok(()));
    let ioas_id = f.ioas_alloc().unwrap();
    f.mock_domain(ioas_id).unwrap();
    ChangeFx { f, ioas_id }
}

fn basic_in(mm_mode: bool) {
    let ChangeFx { f, ioas_id } = setup(mm_mode);

    // A user memory mapping cannot change process.
    let iova = f.ioas_map(ioas_id, BUFFER, PAGE_SIZE).unwrap();
    assert_eq!(f.change_process(), Err(Errno::EINVAL));
    f.ioas_unmap(ioas_id, iova, PAGE_SIZE).unwrap();

    // A memfd mapping can, in the process that mapped it: nothing moves.
    let iova = f.ioas_map_file(ioas_id, f.mfd, 0, PAGE_SIZE).unwrap();
    assert_eq!(f.change_process(), Ok(()));
    assert_eq!((f.ictx().pinned_pages(), f.mem.pins(MFD_BUFFER)), (1, 1));

    // From another process (Linux: a forked child): the charge moves to
    // it, the page stays pinned and mapped, and the context's memory is
    // the child's from now on.
    let child = Arc::new(FakeAddressSpace::new());
    f.ictx().change_process(child.clone(), 1).unwrap();
    assert_eq!((f.ictx().pinned_pages(), f.ictx().accounting().limit()), (1, 1));
    assert!(Arc::ptr_eq(&f.ictx().source(), &(child.clone() as Arc<dyn MemorySource>)));
    assert_eq!(f.mem.pins(MFD_BUFFER), 1);
    assert_eq!(child.pinned_pages(), 0);
    // The parent's descriptors mean nothing in the child.
    assert_eq!(f.ioas_map_file(ioas_id, f.mfd, 0, PAGE_SIZE), Err(Errno::EBADF));
    f.ioas_unmap(ioas_id, iova, PAGE_SIZE).unwrap();
    assert_eq!((f.ictx().pinned_pages(), f.mem.pinned_pages()), (0, 0));
}

#[test]
fn basic() {
    basic_in(false);
    basic_in(true);
}
