//! Fixture `vfio_compat_mock_domain`: an IOAS with a mock domain made the
//! VFIO compat IOAS and set to type1v2 (`Ver1v2`) or type1 (`Ver1v0`).

use super::harness::*;
use iommufd::Errno;
use iommufd::uapi::vfio::*;
use iommufd::uapi::*;
use std::ops::Deref;

pub struct VfioFx {
    f: Fx,
    pub version: u32,
    pub ioas_id: u32,
}

impl Deref for VfioFx {
    type Target = Fx;
    fn deref(&self) -> &Fx {
        &self.f
    }
}

impl VfioFx {
    pub fn setup(version: u32) -> Self {
        let f = Fx::open();
        // What VFIO would call a group: an IOAS with a device.
        let ioas_id = f.ioas_alloc().unwrap();
        f.mock_domain(ioas_id).unwrap();
        // Made the compat IOAS.
        assert_eq!(f.vfio_ioas(IOMMU_VFIO_IOAS_SET, ioas_id).0, Ok(()));
        assert_eq!(f.vfio(VFIO_SET_IOMMU, version as u64), Ok(0));
        VfioFx { f, version, ioas_id }
    }

    /// `ioctl_check_buf`: runs `cmd` on the struct at `BUFFER` (its first
    /// u32 is its length) and checks that nothing past that length was
    /// written.
    fn ioctl_check_buf(&self, cmd: u32) {
        let len = u32::from_le_bytes(self.read_user(BUFFER, 4).try_into().unwrap()) as u64;
        self.fill_user(BUFFER + len, BUFFER_SIZE - len, 0xaa);
        assert_eq!(self.vfio(cmd, BUFFER), Ok(0));
        assert!(
            self.read_user(BUFFER + len, (BUFFER_SIZE - len) as usize).iter().all(|&b| b == 0xaa),
            "wrote past argsz {len}"
        );
    }

    fn info(&self) -> VfioIommuType1Info {
        VfioIommuType1Info::read(&self.read_user(BUFFER, VfioIommuType1Info::SIZE))
    }

    /// Walks the capability chain of the info struct at `BUFFER`.
    fn check_vfio_info_cap_chain(&self, info: &VfioIommuType1Info) {
        let hdr = VfioInfoCapHeader::SIZE as u64;
        assert!(info.argsz as u64 >= info.cap_offset as u64 + hdr);
        let mut cap = info.cap_offset as u64;
        loop {
            let h = VfioInfoCapHeader::read(&self.read_user(BUFFER + cap, VfioInfoCapHeader::SIZE));
            let cap_size = if h.next != 0 { h.next as u64 - cap } else { info.argsz as u64 - cap };
            match h.id {
                VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                    let d = VfioIommuType1InfoCapIovaRange::read(
                        &self.read_user(BUFFER + cap, VfioIommuType1InfoCapIovaRange::SIZE),
                    );
                    assert_eq!(d.header.version, 1);
                    assert_eq!(d.nr_iovas, 1);
                    let r = VfioIovaRange::read(
                        &self
                            .read_user(BUFFER + cap + VfioIommuType1InfoCapIovaRange::SIZE as u64, VfioIovaRange::SIZE),
                    );
                    assert_eq!((r.start, r.end), (MOCK_APERTURE_START, MOCK_APERTURE_LAST));
                }
                VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                    assert_eq!(h.version, 1);
                    assert_eq!(cap_size, VfioIommuType1InfoDmaAvail::SIZE as u64);
                }
                other => panic!("unexpected capability {other}"),
            }
            if h.next == 0 {
                break;
            }
            assert!(info.argsz as u64 >= h.next as u64 + hdr);
            assert!(h.next as u64 >= cap);
            cap = h.next as u64;
        }
    }
}

fn simple_close(_s: &mut VfioFx) {}

fn option_huge_pages(s: &mut VfioFx) {
    let (r, c) = s.option(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, s.ioas_id, 3);
    assert_eq!(r, Ok(()));
    // Type1 turns huge pages off so any range can be unmapped.
    assert_eq!(c.val64, if s.version == VFIO_TYPE1_IOMMU { 0 } else { 1 });
}

fn get_info(s: &mut VfioFx) {
    let both = VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS;
    let set = |argsz: u32| s.write_user(BUFFER, &VfioIommuType1Info { argsz, ..Default::default() }.to_bytes());

    // The ABI before capabilities: up to cap_offset.
    set(16);
    s.ioctl_check_buf(VFIO_IOMMU_GET_INFO);
    let info = s.info();
    assert_ne!(info.iova_pgsizes, 0);
    assert_eq!(info.flags, both);

    // The whole struct: learn the size of the capability chain.
    set(VfioIommuType1Info::SIZE as u32);
    s.ioctl_check_buf(VFIO_IOMMU_GET_INFO);
    let info = s.info();
    assert_ne!(info.iova_pgsizes, 0);
    assert_eq!(info.flags, both);
    assert_eq!(info.cap_offset, 0);
    assert!(info.argsz as usize > VfioIommuType1Info::SIZE);

    // Every size in between: never a corrupt chain.
    let caplen = info.argsz;
    for i in VfioIommuType1Info::SIZE as u32..caplen {
        set(i);
        s.ioctl_check_buf(VFIO_IOMMU_GET_INFO);
        let info = s.info();
        assert_eq!(info.flags, both);
        if info.cap_offset == 0 {
            continue;
        }
        s.check_vfio_info_cap_chain(&info);
    }
}

/// The selftest's Fisher-Yates-style shuffle, with our generator.
fn shuffle(v: &mut [u64], rng: &mut Rand) {
    let n = v.len();
    for i in 0..n {
        let other = rng.next_u16() as usize % (n - i);
        v.swap(i, other);
    }
}

fn map(s: &mut VfioFx) {
    let map_at = SCRATCH;
    let unmap_at = SCRATCH + 64;
    let mut m = VfioIommuType1DmaMap {
        argsz: VfioIommuType1DmaMap::SIZE as u32,
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr: BUFFER,
        size: BUFFER_SIZE,
        iova: MOCK_APERTURE_START,
    };
    let mut u = VfioIommuType1DmaUnmap {
        argsz: VfioIommuType1DmaUnmap::SIZE as u32,
        size: BUFFER_SIZE,
        iova: MOCK_APERTURE_START,
        ..Default::default()
    };
    let unmap = |u: &VfioIommuType1DmaUnmap| {
        let (r, out) = s.vfio_struct(VFIO_IOMMU_UNMAP_DMA, unmap_at, &u.to_bytes());
        (r, VfioIommuType1DmaUnmap::read(&out).size)
    };

    // Map and unmap.
    assert_eq!(s.vfio_struct(VFIO_IOMMU_MAP_DMA, map_at, &m.to_bytes()).0, Ok(0));
    assert_eq!(unmap(&u), (Ok(0), BUFFER_SIZE));
    // Unmapping an empty range succeeds (Linux 6.12.95).
    assert_eq!(unmap(&u), (Ok(0), 0));

    // Unmap-all wants iova and size 0.
    assert_eq!(s.vfio_struct(VFIO_IOMMU_MAP_DMA, map_at, &m.to_bytes()).0, Ok(0));
    u.flags = VFIO_DMA_UNMAP_FLAG_ALL;
    assert_eq!(unmap(&u).0, Err(Errno::EINVAL));
    u.iova = 0;
    u.size = 0;
    assert_eq!(unmap(&u), (Ok(0), BUFFER_SIZE));

    // Page by page, unmapped in random order.
    let mut pages_iova: Vec<u64> = (0..BUFFER_SIZE / PAGE_SIZE).map(|i| MOCK_APERTURE_START + i * PAGE_SIZE).collect();
    for (i, iova) in pages_iova.iter().enumerate() {
        m.iova = *iova;
        m.vaddr = BUFFER + i as u64 * PAGE_SIZE;
        m.size = PAGE_SIZE;
        assert_eq!(s.vfio_struct(VFIO_IOMMU_MAP_DMA, map_at, &m.to_bytes()).0, Ok(0));
    }
    shuffle(&mut pages_iova, &mut Rand::new(7));
    u.flags = 0;
    u.size = PAGE_SIZE;
    for iova in pages_iova {
        u.iova = iova;
        assert_eq!(unmap(&u).0, Ok(0), "page at {iova:#x}");
    }
}

fn huge_map(s: &mut VfioFx) {
    let buf_size = HUGEPAGE_SIZE * 2;
    let buf = s.mmap(buf_size);
    let m = VfioIommuType1DmaMap {
        argsz: VfioIommuType1DmaMap::SIZE as u32,
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr: buf,
        size: buf_size,
        iova: MOCK_APERTURE_START,
    };
    assert_eq!(s.vfio_struct(VFIO_IOMMU_MAP_DMA, SCRATCH, &m.to_bytes()).0, Ok(0));

    // Sixteen pieces, unmapped in random order: type1 cuts the mapping,
    // type1v2 refuses to.
    let piece = buf_size / 16;
    let mut pages_iova: Vec<u64> = (0..16).map(|i| MOCK_APERTURE_START + i * piece).collect();
    shuffle(&mut pages_iova, &mut Rand::new(11));
    for iova in pages_iova {
        let u = VfioIommuType1DmaUnmap {
            argsz: VfioIommuType1DmaUnmap::SIZE as u32,
            iova,
            size: piece,
            ..Default::default()
        };
        let r = s.vfio_struct(VFIO_IOMMU_UNMAP_DMA, SCRATCH + 64, &u.to_bytes()).0;
        if s.version == VFIO_TYPE1_IOMMU {
            assert_eq!(r, Ok(0), "piece at {iova:#x}");
        } else {
            assert_eq!(r, Err(Errno::ENOENT), "piece at {iova:#x}");
        }
    }
}

fn run(version: u32, test: fn(&mut VfioFx)) {
    let mut s = VfioFx::setup(version);
    test(&mut s);
}

macro_rules! cases {
    ($v:expr) => {
        const V: u32 = $v;
        case!(simple_close);
        case!(option_huge_pages);
        case!(get_info);
        case!(map);
        case!(huge_map);
    };
}

macro_rules! case {
    ($name:ident) => {
        #[test]
        fn $name() {
            super::run(V, super::$name)
        }
    };
}

#[allow(non_snake_case)]
mod Ver1v2 {
    cases!(iommufd::uapi::vfio::VFIO_TYPE1v2_IOMMU);
}

#[allow(non_snake_case)]
mod Ver1v0 {
    cases!(iommufd::uapi::vfio::VFIO_TYPE1_IOMMU);
}
