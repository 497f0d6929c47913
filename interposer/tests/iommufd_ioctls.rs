//! cloud-hypervisor's `iommufd-ioctls` crate (0.4, unmodified) against
//! Portcullis: the test re-runs itself with the interposer preloaded and
//! does what a VMM does with guest RAM: map a shared-memory file at a
//! fixed IOVA (`map_file`), map an anonymous buffer, check both through
//! the selftest's mock device, meet the usual errors, unmap, destroy.

use iommufd_bindings::iommufd::{
    iommu_ioas_map, iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as FIXED,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as WRITEABLE,
};
use iommufd_ioctls::{IommuFd, IommufdError, IommufdIoas};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

const CHILD: &str = "PORTCULLIS_IOMMUFD_IOCTLS_CHILD";
const PAGE: u64 = 4096;
/// The mock domain's aperture starts here (16 MiB).
const GUEST_RAM_IOVA: u64 = 1 << 24;
const GUEST_RAM: u64 = 2 << 20;

fn library() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    for dir in [deps, deps.parent().expect("profile dir")] {
        let p = dir.join("libportcullis_interposer.so");
        if p.exists() {
            return p;
        }
    }
    panic!("libportcullis_interposer.so not found next to {}", exe.display());
}

/// `IOMMU_TEST_CMD` (`_IO(';', 0xa0)`), `struct iommu_test_cmd` of 72 bytes.
const IOMMU_TEST_CMD: u64 = (b';' as u64) << 8 | 0xa0;

/// One selftest command: `op` on object `id` with `payload` at offset 16;
/// returns the struct as the "kernel" left it.
fn test_cmd(fd: RawFd, op: u32, id: u32, payload: &[u8]) -> Result<[u8; 72], i32> {
    let mut b = [0u8; 72];
    b[..4].copy_from_slice(&72u32.to_le_bytes());
    b[4..8].copy_from_slice(&op.to_le_bytes());
    b[8..12].copy_from_slice(&id.to_le_bytes());
    b[16..16 + payload.len()].copy_from_slice(payload);
    // SAFETY: the argument is a 72-byte buffer this function owns for the
    // call; the command reads and writes only those bytes (its size).
    let r = unsafe { libc::ioctl(fd, IOMMU_TEST_CMD as _, b.as_mut_ptr()) };
    if r == 0 { Ok(b) } else { Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn words(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn errno(e: &IommufdError) -> i32 {
    match e {
        IommufdError::IommuIoasMap(s)
        | IommufdError::IommuIoasMapFile(s)
        | IommufdError::IommuIoasUnmap(s)
        | IommufdError::IommuDestroy(s) => s.errno(),
        other => panic!("unexpected error {other}"),
    }
}

/// What runs inside the preloaded process.
fn body() {
    let iommufd = Arc::new(IommuFd::new().expect("open /dev/iommu through the interposer"));
    let fd = iommufd.as_raw_fd();
    let ioas = IommufdIoas::new(iommufd.clone()).expect("IOAS_ALLOC");

    // A mock device attached to the IOAS, as a VFIO device would be.
    let out = test_cmd(fd, 2, ioas.id(), &[]).expect("MOCK_DOMAIN");
    let (stdev, hwpt) = (u32_at(&out, 16), u32_at(&out, 20));

    // Guest RAM: a shared-memory file (cloud-hypervisor uses a memfd;
    // both are shmem), mapped at a fixed IOVA with map_file.
    let path = format!("/dev/shm/portcullis-iommufd-ioctls-{}", std::process::id());
    let ram = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("shm file");
    std::fs::remove_file(&path).expect("unlink the shm file");
    ram.set_len(GUEST_RAM).expect("size guest RAM");
    ram.write_all_at(b"guest RAM page 1", PAGE).expect("write guest RAM");
    ioas.map_file(ram.as_raw_fd(), 0, GUEST_RAM, GUEST_RAM_IOVA, true).expect("map_file guest RAM");

    // What the device sees at IOVA + 1 page is the file's page 1.
    let access = test_cmd(fd, 5, ioas.id(), &[]).map(|o| u32_at(&o, 16)).expect("CREATE_ACCESS");
    let mut seen = [0u8; 16];
    let p = seen.as_mut_ptr() as u64;
    test_cmd(fd, 8, access, &words(&[GUEST_RAM_IOVA + PAGE, 16, p, 0])).expect("ACCESS_RW read");
    assert_eq!(&seen, b"guest RAM page 1");

    // An anonymous buffer, mapped where the IOAS chooses.
    let mut heap = vec![0x5au8; 3 * PAGE as usize];
    let base = heap.as_mut_ptr() as u64;
    let buf = base.next_multiple_of(PAGE);
    let mut map = iommu_ioas_map {
        size: size_of::<iommu_ioas_map>() as u32,
        flags: READABLE | WRITEABLE,
        ioas_id: ioas.id(),
        user_va: buf,
        length: 2 * PAGE,
        ..Default::default()
    };
    iommufd.map_iommu_ioas(&map).expect("IOAS_MAP of an anonymous buffer");
    // The crate's map does not read the chosen IOVA back; map it again at
    // a fixed IOVA (1 GiB) instead, and check that one.
    map.flags |= FIXED;
    map.iova = 0x4000_0000;
    iommufd.map_iommu_ioas(&map).expect("IOAS_MAP at a fixed IOVA");
    test_cmd(fd, 3, hwpt, &words(&[map.iova, 2 * PAGE, buf])).expect("MD_CHECK_MAP of the buffer");
    test_cmd(fd, 4, 0, &words(&[2 * PAGE, buf, 2])).expect("MD_CHECK_REFS: each page pinned by both maps");
    assert!(heap[..].iter().all(|&b| b == 0x5a), "the buffer reads the same after pinning");

    // The errors a VMM meets.
    let again = ioas.map_file(ram.as_raw_fd(), 0, PAGE, GUEST_RAM_IOVA, true).unwrap_err();
    assert_eq!(errno(&again), libc::EEXIST, "{again}");
    let bad = ioas.map_file(-1, 0, PAGE, 0x5000_0000, true).unwrap_err();
    assert_eq!(errno(&bad), libc::EBADF, "{bad}");
    let none = ioas.unmap(0x7000_0000, PAGE).unwrap_err();
    assert_eq!(errno(&none), libc::ENOENT, "{none}");
    let gone = iommufd.destroy_iommu_object(0x7fff).unwrap_err();
    assert_eq!(errno(&gone), libc::ENOENT, "{gone}");

    // Unmap, detach, destroy.
    ioas.unmap(GUEST_RAM_IOVA, GUEST_RAM).expect("unmap guest RAM");
    ioas.unmap(map.iova, 2 * PAGE).expect("unmap the fixed buffer map");
    ioas.unmap(0, u64::MAX).expect("unmap everything left");
    test_cmd(fd, 4, 0, &words(&[2 * PAGE, buf, 0])).expect("MD_CHECK_REFS: nothing pinned");
    drop(std::fs::File::from(std::os::fd::OwnedFd::from(ram)));
    iommufd.destroy_iommu_object(stdev).expect("destroy the mock device");
    drop(heap);
    // The access holds the IOAS; closing its descriptor ends it.
    // SAFETY: `access` is a descriptor this process owns (from
    // CREATE_ACCESS) and nothing else uses it.
    assert_eq!(unsafe { libc::close(access as i32) }, 0);
    drop(ioas); // IOMMU_DESTROY of the IOAS (the crate logs a failure)
    assert_eq!(errno(&iommufd.destroy_iommu_object(1).unwrap_err()), libc::ENOENT, "the IOAS is gone");
    println!("iommufd-ioctls: all checks passed");
}

#[test]
fn cloud_hypervisor_iommufd_ioctls_against_portcullis() {
    if std::env::var_os(CHILD).is_some() {
        body();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "cloud_hypervisor_iommufd_ioctls_against_portcullis", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("LD_PRELOAD", library())
        .output()
        .expect("re-run under the interposer");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("iommufd-ioctls: all checks passed"), "{text}");
}
