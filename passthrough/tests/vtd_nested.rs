//! Nested HWPTs of iommufd on a VT-d unit that can nest (ECAP.NEST, with
//! first- and second-stage translation in scalable mode; QEMU 10 offers no
//! NEST, so the register model plays such a unit): a function bound to an
//! iommufd context with nesting, a NEST_PARENT HWPT and a nested
//! `IOMMU_HWPT_DATA_VTD_S1` HWPT on it, the nested PASID entry read back
//! from table memory field by field, `IOMMU_HWPT_INVALIDATE` with its
//! descriptors and partial progress, every errno Linux gives for bad
//! stage-1 data, and a unit without NEST refusing.
//!
//! The DMAR is the corpus's `dmar-0d29630957f2.dat` (as in `vtd.rs`); the
//! function is 00:1b.0, the only endpoint of the DRHD at 0xf3ffd000.

mod support;

use iommufd::ctx::Ictx;
use iommufd::dispatch::ioctl;
use iommufd::memsrc::{FakeAddressSpace, MemorySource};
use iommufd::uapi::*;
use iommufd::{Errno, ctx::ReplaceError};
use portcullis::nesting::{VtdNested, VtdParent};
use portcullis::{Iommus, Options, Platform, PlatformClock, PlatformTables};
use std::sync::Arc;
use support::host::ModelHost;
use support::host::View;
use support::host::pci::{INTEGRATED, bdf, endpoint};
use vtd::testing::{Config, Invalidation, IotlbInvalidation};

const DMAR: &[u8] = include_bytes!("../../drivers/acpi-tables/tests/corpus/dmar/dmar-0d29630957f2.dat");
const UNIT_A: u64 = 0xfbff_c000;
const UNIT_B: u64 = 0xf3ff_d000;
const UNIT_C: u64 = 0xf3ff_c000;
/// 00:1b.0's requester id.
const RID: u16 = 0x00d8;

/// ECAP.C (0), NEST (26), SRS (31), EAFS (34), SMTS (43), SSADS (45),
/// SSTS (46), FSTS (47) on QEMU's unit.
const NEST_ECAP: u64 = Config::QEMU.ecap | 1 | 1 << 26 | 1 << 31 | 1 << 34 | 1 << 43 | 1 << 45 | 1 << 46 | 1 << 47;
/// CAP.FS5LP (60) on QEMU's unit.
const NEST_CAP: u64 = Config::QEMU.cap | 1 << 60;
const NEST: Config = Config { cap: NEST_CAP, ecap: NEST_ECAP };

/// The caller's memory (user addresses) in the iommufd context.
const USER: u64 = 0x4000_0000;
/// Where the stage-1 data and invalidation arrays are written.
const DATA: u64 = USER + 0x10_0000;
/// The guest's first-stage table (a guest-physical address).
const GUEST_PGD: u64 = 0x1234_5000;

type Model = ModelHost;
type Parent = VtdParent<<Model as Platform>::Mmio, PlatformTables<Model>, PlatformClock<Model>>;
type Nested = VtdNested<<Model as Platform>::Mmio, PlatformTables<Model>, PlatformClock<Model>>;

fn host(config: Config) -> Arc<ModelHost> {
    ModelHost::builder()
        .vtd_unit(UNIT_A, config)
        .vtd_unit(UNIT_B, config)
        .vtd_unit(UNIT_C, config)
        .functions(vec![endpoint(bdf(0, 0x1b, 0), None, INTEGRATED)])
        .dmar(DMAR)
        .build()
}

/// A host whose units have `config`, brought up in scalable mode, and an
/// iommufd context with 00:1b.0 bound with nesting and an IOAS mapping
/// 16 KiB of the caller's memory at IOVA 1 MiB: (host, iommus, ctx,
/// memory, device id, IOAS id).
fn world(config: Config) -> (Arc<ModelHost>, Iommus<ModelHost>, Ictx, Arc<FakeAddressSpace>, u32, u32) {
    let host = host(config);
    let iommus =
        Iommus::bring_up_with(host.clone(), Options { vtd_mode: Some(vtd::Mode::Scalable), ..Default::default() });
    assert!(iommus.units().iter().all(|u| u.state.is_ok()), "{:?}", iommus.units());
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, 16 << 20, true);
    let ictx = Ictx::new(mem.clone(), u64::MAX);
    let dev = iommus.vtd_nesting_device(0, bdf(0, 0x1b, 0)).unwrap();
    let id = ictx.bind_nesting_device(Arc::new(dev)).unwrap();
    let ioas = ictx.ioas_alloc().unwrap();
    ictx.ioas_map(ioas, Some(0x10_0000), USER, 0x4000, true, true).unwrap();
    (host, iommus, ictx, mem, id, ioas)
}

/// `IOMMU_HWPT_ALLOC` through the uAPI, data (if any) at [`DATA`].
fn hwpt_alloc(c: &Ictx, dev_id: u32, pt_id: u32, flags: u32, data_type: u32, data_len: u32) -> Result<u32, Errno> {
    hwpt_alloc_at(c, dev_id, pt_id, flags, data_type, data_len, DATA)
}

/// `IOMMU_HWPT_ALLOC` through the uAPI, data (if any) at `uptr`.
fn hwpt_alloc_at(
    c: &Ictx,
    dev_id: u32,
    pt_id: u32,
    flags: u32,
    data_type: u32,
    data_len: u32,
    uptr: u64,
) -> Result<u32, Errno> {
    let a = IommuHwptAlloc {
        size: IommuHwptAlloc::SIZE as u32,
        flags,
        dev_id,
        pt_id,
        data_type,
        data_len,
        data_uptr: if data_len == 0 { 0 } else { uptr },
        ..Default::default()
    };
    let mut buf = a.to_bytes();
    ioctl(c, IOMMU_HWPT_ALLOC, &mut buf)?;
    Ok(IommuHwptAlloc::read(&buf).out_hwpt_id)
}

/// Writes a `struct iommu_hwpt_vtd_s1` at [`DATA`].
fn write_s1(mem: &FakeAddressSpace, flags: u64, pgtbl_addr: u64, addr_width: u32) {
    let s1 = IommuHwptVtdS1 { flags, pgtbl_addr, addr_width, __reserved: 0 };
    mem.write_user(DATA, &s1.to_bytes()).unwrap();
}

/// `IOMMU_HWPT_INVALIDATE` of `entries` (written at [`DATA`]) through the
/// uAPI: the result and the `entry_num` written back.
fn invalidate(
    c: &Ictx,
    mem: &FakeAddressSpace,
    hwpt_id: u32,
    data_type: u32,
    entries: &[IommuHwptVtdS1Invalidate],
) -> (Result<(), Errno>, u32) {
    for (i, e) in entries.iter().enumerate() {
        mem.write_user(DATA + (i * IommuHwptVtdS1Invalidate::SIZE) as u64, &e.to_bytes()).unwrap();
    }
    let cmd = IommuHwptInvalidate {
        size: IommuHwptInvalidate::SIZE as u32,
        hwpt_id,
        data_uptr: DATA,
        data_type,
        entry_len: IommuHwptVtdS1Invalidate::SIZE as u32,
        entry_num: entries.len() as u32,
        __reserved: 0,
    };
    let mut buf = cmd.to_bytes();
    let r = ioctl(c, IOMMU_HWPT_INVALIDATE, &mut buf);
    (r, IommuHwptInvalidate::read(&buf).entry_num)
}

fn inv(addr: u64, npages: u64, flags: u32) -> IommuHwptVtdS1Invalidate {
    IommuHwptVtdS1Invalidate { addr, npages, flags, __reserved: 0 }
}

/// The eight words of `rid`'s PASID-0 entry on unit `base`, read from
/// table memory (CPU view: the units snoop) down from the root table the
/// unit latched.
fn pasid_entry(host: &ModelHost, base: u64, rid: u16) -> [u64; 8] {
    let read = |a: u64| host.mem.read(View::Cpu, a).unwrap();
    let rtaddr = host.vtd(base).root_table().unwrap();
    assert_eq!(rtaddr >> 10 & 3, 1, "scalable mode");
    let (bus, devfn) = ((rid >> 8) as u64, (rid & 0xff) as u64);
    let half = read((rtaddr & !0xfff) + bus * 16 + (devfn >> 7) * 8);
    let ctx = read((half & !0xfff) + (devfn & 0x7f) * 32);
    assert_eq!(ctx & 1, 1, "context entry present");
    let dir = read(ctx & !0xfff);
    assert_eq!(dir & 1, 1, "PASID directory entry present");
    core::array::from_fn(|k| read((dir & !0xfff) + 8 * k as u64))
}

/// The parent HWPT's second-stage table root and domain id.
fn parent_table(c: &Ictx, parent: u32) -> (u64, u32, u16) {
    let hwpt = c.hwpt(parent).unwrap();
    let mut d = hwpt.domain.lock();
    let p = d.as_any_mut().and_then(|a| a.downcast_mut::<Parent>()).expect("a VT-d nest parent");
    let info = p.domain().table_info();
    (info.root, info.levels, p.domain().domain_id())
}

/// The nested HWPT's domain id.
fn nested_did(c: &Ictx, nested: u32) -> u16 {
    let hwpt = c.hwpt_nested(nested).unwrap();
    let mut d = hwpt.domain.lock();
    d.as_any_mut().and_then(|a| a.downcast_mut::<Nested>()).expect("a VT-d nested domain").inner().domain_id()
}

/// What unit B ran since the last call, waits left out.
fn ran(host: &ModelHost) -> Vec<Invalidation> {
    host.vtd(UNIT_B)
        .take_log()
        .into_iter()
        .map(|l| l.what)
        .filter(|w| !matches!(w, Invalidation::Wait { .. }))
        .collect()
}

#[test]
fn nested_hwpt_attach_invalidate_replace_destroy() {
    let (host, _iommus, c, mem, dev, ioas) = world(NEST);
    let parent =
        hwpt_alloc(&c, dev, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING, 0, 0).unwrap();
    c.attach(dev, parent).unwrap();
    let (root, levels, parent_did) = parent_table(&c, parent);
    assert_eq!(levels, 4);
    let e = pasid_entry(&host, UNIT_B, RID);
    assert_eq!(e[0], 1 | 2 << 2 | 2 << 6 | root, "second stage through the parent");

    write_s1(&mem, 0b111, GUEST_PGD, 57);
    let nested = hwpt_alloc(&c, dev, parent, 0, IOMMU_HWPT_DATA_VTD_S1, IommuHwptVtdS1::SIZE as u32).unwrap();
    let did = nested_did(&c, nested);
    assert_ne!(did, parent_did, "the nested domain has its own domain id");
    ran(&host);
    c.replace(dev, nested).unwrap();
    assert_eq!(c.attached_hwpt(dev), Ok(Some(nested)));

    // The nested PASID entry (spec 9.6), field by field.
    let e = pasid_entry(&host, UNIT_B, RID);
    assert_eq!(e[0] & 1, 1, "P");
    assert_eq!(e[0] >> 1 & 1, 0, "FPD clear: faults reported");
    assert_eq!(e[0] >> 2 & 7, 2, "AW: the parent's 4-level second stage");
    assert_eq!(e[0] >> 5 & 1, 0, "SSEE");
    assert_eq!(e[0] >> 6 & 7, 3, "PGTT = nested");
    assert_eq!(e[0] >> 9 & 1, 0, "SSADE: the parent is not tracking");
    assert_eq!(e[0] >> 10 & 3, 0, "reserved");
    assert_eq!(e[0] & !0xfff, root, "SSPTPTR: the parent's table");
    assert_eq!(e[1] & 0xffff, did as u64, "DID: the nested domain's");
    assert_eq!(e[1] >> 16, 0, "PWSNP, PGSNP and memory-type fields clear");
    assert_eq!(e[2] & 1, 1, "SRE");
    assert_eq!(e[2] >> 2 & 3, 1, "FSPM: 5-level");
    assert_eq!(e[2] >> 4 & 1, 1, "WPE");
    assert_eq!(e[2] >> 5 & 3, 0, "NXE, SMEP");
    assert_eq!(e[2] >> 7 & 1, 1, "EAFE");
    assert_eq!(e[2] >> 8 & 0xf, 0, "reserved");
    assert_eq!(e[2] & !0xfff, GUEST_PGD, "FSPTPTR: the guest's table");
    assert_eq!(e[3..], [0; 5]);
    // Leaving the parent: its entry blocked, then its PASID cache and
    // IOTLB invalidated (not-present to present needs nothing more
    // without caching mode).
    assert_eq!(
        ran(&host),
        [
            Invalidation::PasidCache { g: 1, did: parent_did, pasid: 0 },
            Invalidation::Iotlb(IotlbInvalidation::Domain(parent_did)),
        ]
    );

    // Stage-1 invalidations: PASID-based IOTLB for (nested id, PASID 0).
    let leaf = IOMMU_VTD_INV_FLAGS_LEAF;
    let good = [inv(0x20_0000, 512, leaf), inv(0x3000, 1, 0), inv(0, u64::MAX, 0)];
    assert_eq!(invalidate(&c, &mem, nested, IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, &good), (Ok(()), 3));
    assert_eq!(
        ran(&host),
        [
            Invalidation::PasidIotlb { did, pasid: 0, pages: Some((0x20_0000, 9, true)) },
            Invalidation::PasidIotlb { did, pasid: 0, pages: Some((0x3000, 0, false)) },
            Invalidation::PasidIotlb { did, pasid: 0, pages: None },
        ]
    );
    // A bad entry in the middle: the ones before it are done, entry_num
    // says how many.
    for (bad, errno) in [
        (inv(0x4000, 1, 2), Errno::EOPNOTSUPP),
        (IommuHwptVtdS1Invalidate { __reserved: 1, ..inv(0x4000, 1, 0) }, Errno::EOPNOTSUPP),
        (inv(0x4800, 1, 0), Errno::EINVAL),
        (inv(0x4000, u64::MAX, 0), Errno::EINVAL),
    ] {
        let r =
            invalidate(&c, &mem, nested, IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, &[inv(0x1000, 2, 0), bad, inv(0, 1, 0)]);
        assert_eq!(r, (Err(errno), 1), "{bad:?}");
        // Pages 1-2 are no aligned block: the smallest covering one, 0-3.
        assert_eq!(ran(&host), [Invalidation::PasidIotlb { did, pasid: 0, pages: Some((0, 2, false)) }]);
    }
    // Another array type: nothing handled.
    let r = invalidate(&c, &mem, nested, IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, &[inv(0x1000, 1, 0)]);
    assert_eq!(r, (Err(Errno::EINVAL), 0));
    // An entry shorter than the struct.
    let mut short = IommuHwptInvalidate {
        size: IommuHwptInvalidate::SIZE as u32,
        hwpt_id: nested,
        data_uptr: DATA,
        data_type: IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
        entry_len: 16,
        entry_num: 1,
        __reserved: 0,
    }
    .to_bytes();
    assert_eq!(ioctl(&c, IOMMU_HWPT_INVALIDATE, &mut short), Err(Errno::EINVAL));
    assert_eq!(IommuHwptInvalidate::read(&short).entry_num, 0);
    assert_eq!(ran(&host), []);

    // The parent's mappings change: the unit may hold nested translations
    // through them under the nested id, so that is invalidated too.
    c.ioas_unmap(ioas, 0x10_0000, 0x4000).unwrap();
    let log = ran(&host);
    assert!(log.iter().any(|i| i.covers_iotlb(parent_did, 0x10_0000, true)), "{log:?}");
    assert!(log.iter().any(|i| i.covers_iotlb(did, 0x10_0000, true)), "{log:?}");
    assert!(log.iter().any(|i| i.covers_iotlb(did, 0x10_3000, true)), "{log:?}");

    // Dirty tracking of the parent reaches the nested entry.
    c.hwpt_set_dirty_tracking(parent, true).unwrap();
    assert_eq!(pasid_entry(&host, UNIT_B, RID)[0] >> 9 & 1, 1, "SSADE");
    let log = ran(&host);
    assert!(log.contains(&Invalidation::PasidCache { g: 1, did, pasid: 0 }), "{log:?}");
    c.hwpt_set_dirty_tracking(parent, false).unwrap();
    assert_eq!(pasid_entry(&host, UNIT_B, RID)[0] >> 9 & 1, 0, "SSADE off again");

    // Busy objects.
    assert_eq!(c.destroy(parent), Err(Errno::EBUSY));
    assert_eq!(c.destroy(nested), Err(Errno::EBUSY));

    // Back to the parent: the nested entry blocked and invalidated.
    ran(&host);
    c.replace(dev, parent).unwrap();
    let e = pasid_entry(&host, UNIT_B, RID);
    assert_eq!((e[0] >> 6 & 7, e[0] & !0xfff, e[1] & 0xffff), (2, root, parent_did as u64));
    assert_eq!(
        ran(&host),
        [Invalidation::PasidCache { g: 1, did, pasid: 0 }, Invalidation::Iotlb(IotlbInvalidation::Domain(did))]
    );
    // Destroying the nested HWPT drops what is cached under its id.
    c.destroy(nested).unwrap();
    assert_eq!(ran(&host), [Invalidation::Iotlb(IotlbInvalidation::Domain(did))]);
    c.detach(dev).unwrap();
    c.destroy(parent).unwrap();
    assert_eq!(pasid_entry(&host, UNIT_B, RID)[0] & 1, 0, "blocked");
}

#[test]
fn bad_stage_one_data_gets_linux_errnos() {
    // No FS5LP, SRS or EAFS.
    let config = Config { cap: Config::QEMU.cap, ecap: NEST_ECAP & !(1 << 31 | 1 << 34) };
    let (host, _iommus, c, mem, dev, ioas) = world(config);
    let parent = hwpt_alloc(&c, dev, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT, 0, 0).unwrap();
    let plain = hwpt_alloc(&c, dev, ioas, 0, 0, 0).unwrap();
    c.attach(dev, parent).unwrap();
    let before = pasid_entry(&host, UNIT_B, RID);
    let len = IommuHwptVtdS1::SIZE as u32;
    write_s1(&mem, 0, GUEST_PGD, 48);

    // Allocation (Linux's intel_iommu_domain_alloc_user with a parent).
    assert_eq!(hwpt_alloc(&c, dev, parent, 0, IOMMU_HWPT_DATA_SELFTEST, len), Err(Errno::EOPNOTSUPP), "data type");
    assert_eq!(hwpt_alloc(&c, dev, parent, 0, IOMMU_HWPT_DATA_VTD_S1, len - 1), Err(Errno::EINVAL), "short data");
    assert_eq!(hwpt_alloc(&c, dev, parent, 0, IOMMU_HWPT_DATA_VTD_S1, len + 8), Err(Errno::EINVAL), "long data");
    assert_eq!(hwpt_alloc(&c, dev, plain, 0, IOMMU_HWPT_DATA_VTD_S1, len), Err(Errno::EINVAL), "not NEST_PARENT");
    assert_eq!(
        hwpt_alloc(&c, dev, parent, IOMMU_HWPT_ALLOC_NEST_PARENT, IOMMU_HWPT_DATA_VTD_S1, len),
        Err(Errno::EOPNOTSUPP),
        "flags"
    );
    let far = IommuHwptAlloc {
        size: IommuHwptAlloc::SIZE as u32,
        dev_id: dev,
        pt_id: parent,
        data_type: IOMMU_HWPT_DATA_VTD_S1,
        data_len: len,
        data_uptr: 0x10,
        ..Default::default()
    };
    assert_eq!(ioctl(&c, IOMMU_HWPT_ALLOC, &mut far.to_bytes()), Err(Errno::EFAULT), "unreadable data");

    // The stage-1 fields are checked at attach (intel_pasid_setup_nested):
    // allocation succeeds, the attach is EINVAL and the device stays on
    // its parent, its entry untouched.
    for (flags, width, what) in [
        (0, 39, "3-level width"),
        (0, 0, "no width"),
        (0, 57, "5-level without CAP.FS5LP"),
        (1, 48, "SRE without ECAP.SRS"),
        (2, 48, "EAFE without ECAP.EAFS"),
    ] {
        write_s1(&mem, flags, GUEST_PGD, width);
        let nested = hwpt_alloc(&c, dev, parent, 0, IOMMU_HWPT_DATA_VTD_S1, len).unwrap();
        assert!(matches!(c.replace(dev, nested), Err(ReplaceError::Stayed(Errno::EINVAL))), "{what}");
        assert_eq!(c.attached_hwpt(dev), Ok(Some(parent)), "{what}");
        assert_eq!(pasid_entry(&host, UNIT_B, RID), before, "{what}");
        c.destroy(nested).unwrap();
    }
    // What Linux ignores: flags outside SRE, EAFE and WPE, WPE without
    // SRE, `__reserved`, the low bits of the table pointer.
    let s1 = IommuHwptVtdS1 { flags: 1 << 2 | 1 << 9, pgtbl_addr: GUEST_PGD | 0xabc, addr_width: 48, __reserved: 7 };
    mem.write_user(DATA, &s1.to_bytes()).unwrap();
    let nested = hwpt_alloc(&c, dev, parent, 0, IOMMU_HWPT_DATA_VTD_S1, len).unwrap();
    c.replace(dev, nested).unwrap();
    let e = pasid_entry(&host, UNIT_B, RID);
    assert_eq!(e[2], GUEST_PGD, "4-level, no SRE, WPE or EAFE");
}

#[test]
fn a_unit_without_nest_refuses_nest_parents() {
    // QEMU's scalable-mode unit (x-scalable-mode=on: SMTS, SRS and SSTS
    // added), no NEST.
    let qemu = Config { cap: Config::QEMU.cap, ecap: Config::QEMU.ecap | 1 << 31 | 1 << 43 | 1 << 46 | 1 };
    let (_host, _iommus, c, mem, dev, ioas) = world(qemu);
    assert_eq!(hwpt_alloc(&c, dev, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT, 0, 0), Err(Errno::EOPNOTSUPP));
    // Plain paging HWPTs as before; nested on one is the core's EINVAL.
    let plain = hwpt_alloc(&c, dev, ioas, 0, 0, 0).unwrap();
    write_s1(&mem, 0, GUEST_PGD, 48);
    let len = IommuHwptVtdS1::SIZE as u32;
    assert_eq!(hwpt_alloc(&c, dev, plain, 0, IOMMU_HWPT_DATA_VTD_S1, len), Err(Errno::EINVAL));
    c.attach(dev, plain).unwrap();
}

/// Where a request without PASID from `rid` to `iova` lands through a
/// nested PASID entry, walked from table memory as the specification
/// describes it (3.8): every first-stage table pointer and the final
/// output are guest-physical addresses, each translated through the
/// second stage; x86 first-stage entries (P bit 0, R/W bit 1, U/S bit 2
/// needed by a request without PASID, PS bit 7), VT-d second-stage entries
/// (R bit 0, W bit 1, PS bit 7). `None`: the DMA is refused. Returns the
/// host address and whether a write is allowed.
fn nested_dma(host: &ModelHost, base: u64, rid: u16, iova: u64) -> Option<(u64, bool)> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let read = |a: u64| host.mem.read(View::Cpu, a).unwrap();
    let e = pasid_entry(host, base, rid);
    assert_eq!((e[0] & 1, e[0] >> 6 & 7), (1, 3), "a present nested entry");
    let (ss_root, ss_levels) = (e[0] & ADDR, (e[0] >> 2 & 7) as u32 + 2);
    let second = |gpa: u64| -> Option<(u64, bool)> {
        let (mut table, mut write) = (ss_root, true);
        for level in (1..=ss_levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let pte = read(table + (gpa >> shift & 0x1ff) * 8);
            if pte & 1 == 0 {
                return None;
            }
            write &= pte & 2 != 0;
            if level == 1 || pte & 1 << 7 != 0 {
                return Some((pte & ADDR & !((1 << shift) - 1) | gpa & ((1 << shift) - 1), write));
            }
            table = pte & ADDR;
        }
        unreachable!()
    };
    let fs_levels = (e[2] >> 2 & 3) as u32 + 4;
    let (mut table_gpa, mut write) = (e[2] & ADDR, true);
    for level in (1..=fs_levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let (table, _) = second(table_gpa)?;
        let pte = read(table + (iova >> shift & 0x1ff) * 8);
        if pte & 1 == 0 || pte & 4 == 0 {
            return None;
        }
        write &= pte & 2 != 0;
        if level == 1 || pte & 1 << 7 != 0 {
            let gpa = pte & ADDR & !((1 << shift) - 1) | iova & ((1 << shift) - 1);
            let (hpa, w) = second(gpa)?;
            return Some((hpa, write && w));
        }
        table_gpa = pte & ADDR;
    }
    unreachable!()
}

/// A guest's own page table in its memory (which the parent maps at IOVA =
/// guest physical address), used by the device through the nested entry:
/// DMA reaches exactly what the guest's table maps, through the parent.
#[test]
fn dma_goes_through_the_guest_table_then_the_parent() {
    use portcullis::{GuestAddr, GuestDma, PhysAddr};
    let host = ModelHost::builder()
        .vtd_unit(UNIT_A, NEST)
        .vtd_unit(UNIT_B, NEST)
        .vtd_unit(UNIT_C, NEST)
        .functions(vec![endpoint(bdf(0, 0x1b, 0), None, INTEGRATED)])
        .dmar(DMAR)
        .guest_ram(0x2_0000_0000, 1 << 20)
        .build();
    let iommus =
        Iommus::bring_up_with(host.clone(), Options { vtd_mode: Some(vtd::Mode::Scalable), ..Default::default() });
    let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
    // Guest RAM at GPA 1 MiB: five frames the test can read as the unit
    // does (the guest's four table levels and one data page).
    const G: u64 = 0x10_0000;
    let frames = host.alloc_frames(5, 4096).unwrap().0;
    guest.add_memory(GuestAddr(G), PhysAddr(frames), 5 * 4096, true).unwrap();
    // And a page for the caller's data at GPA 2 MiB.
    const D: u64 = 0x20_0000;
    guest.add_memory(GuestAddr(D), PhysAddr(0x2_0000_0000), 4096, true).unwrap();
    // The guest maps IOVA 0x7000_0000 to its data page (GPA G + 0x4000):
    // P, R/W, U/S at every level.
    const IOVA: u64 = 0x7000_0000;
    let pte = |gpa: u64| gpa | 0b111;
    let hpa = |gpa: u64| frames + (gpa - G);
    host.write_u64(PhysAddr(hpa(G) + (IOVA >> 39 & 0x1ff) * 8), pte(G + 0x1000));
    host.write_u64(PhysAddr(hpa(G + 0x1000) + (IOVA >> 30 & 0x1ff) * 8), pte(G + 0x2000));
    host.write_u64(PhysAddr(hpa(G + 0x2000) + (IOVA >> 21 & 0x1ff) * 8), pte(G + 0x3000));
    host.write_u64(PhysAddr(hpa(G + 0x3000) + (IOVA >> 12 & 0x1ff) * 8), pte(G + 0x4000));

    let c = guest.ictx();
    let dev = c.bind_nesting_device(Arc::new(iommus.vtd_nesting_device(0, bdf(0, 0x1b, 0)).unwrap())).unwrap();
    let parent = hwpt_alloc_at(c, dev, guest.ioas(), IOMMU_HWPT_ALLOC_NEST_PARENT, 0, 0, 0).unwrap();
    c.attach(dev, parent).unwrap();
    let s1 = IommuHwptVtdS1 { flags: 0, pgtbl_addr: G, addr_width: 48, __reserved: 0 };
    host.write_phys(PhysAddr(0x2_0000_0000), &s1.to_bytes()).unwrap();
    let len = IommuHwptVtdS1::SIZE as u32;
    let nested = hwpt_alloc_at(c, dev, parent, 0, IOMMU_HWPT_DATA_VTD_S1, len, D).unwrap();
    c.replace(dev, nested).unwrap();

    assert_eq!(nested_dma(&host, UNIT_B, RID, IOVA + 0x123), Some((hpa(G + 0x4000) + 0x123, true)));
    assert_eq!(nested_dma(&host, UNIT_B, RID, IOVA + 0x1000), None, "the guest maps one page");
    assert_eq!(nested_dma(&host, UNIT_B, RID, G), None, "guest-physical addresses are not IOVAs now");
    // The guest's table itself must be reachable through the parent: with
    // its memory gone from the IOAS, nothing translates.
    c.ioas_unmap(guest.ioas(), G, 5 * 4096).unwrap();
    assert_eq!(nested_dma(&host, UNIT_B, RID, IOVA), None);
    c.replace(dev, parent).unwrap();
    c.detach(dev).unwrap();
    c.unbind_device(dev).unwrap();
}

/// Domains belong to one unit here: a NEST_PARENT HWPT of one unit is no
/// parent for a function of another (`EINVAL`, where Linux, whose domains
/// may span units, refuses only at attach), and a function of another unit
/// cannot attach to a nested HWPT (`EINVAL`).
#[test]
fn a_nested_domain_belongs_to_its_unit() {
    let host = ModelHost::builder()
        .vtd_unit(UNIT_A, NEST)
        .vtd_unit(UNIT_B, NEST)
        .vtd_unit(UNIT_C, NEST)
        .functions(vec![endpoint(bdf(0, 0x1b, 0), None, INTEGRATED), endpoint(bdf(0, 0x19, 0), None, INTEGRATED)])
        .dmar(DMAR)
        .build();
    let iommus =
        Iommus::bring_up_with(host.clone(), Options { vtd_mode: Some(vtd::Mode::Scalable), ..Default::default() });
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, 16 << 20, true);
    let c = Ictx::new(mem.clone(), u64::MAX);
    let on_b = c.bind_nesting_device(Arc::new(iommus.vtd_nesting_device(0, bdf(0, 0x1b, 0)).unwrap())).unwrap();
    let on_c = c.bind_nesting_device(Arc::new(iommus.vtd_nesting_device(0, bdf(0, 0x19, 0)).unwrap())).unwrap();
    let ioas = c.ioas_alloc().unwrap();
    let parent = hwpt_alloc(&c, on_b, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT, 0, 0).unwrap();
    write_s1(&mem, 0, GUEST_PGD, 48);
    let len = IommuHwptVtdS1::SIZE as u32;
    assert_eq!(hwpt_alloc(&c, on_c, parent, 0, IOMMU_HWPT_DATA_VTD_S1, len), Err(Errno::EINVAL));
    let nested = hwpt_alloc(&c, on_b, parent, 0, IOMMU_HWPT_DATA_VTD_S1, len).unwrap();
    assert_eq!(c.attach(on_c, nested), Err(Errno::EINVAL));
    assert_eq!(c.attached_hwpt(on_c), Ok(None));
    c.attach(on_b, nested).unwrap();
    assert_eq!(pasid_entry(&host, UNIT_B, RID)[0] >> 6 & 7, 3, "nested");
}

/// With caching mode a parent's map is invalidated under its own domain id
/// and then under every nested domain's: whichever of those fails, the map
/// fails and the parent maps nothing new (all or nothing, as the domain
/// trait asks), and the IOAS keeps no area.
#[test]
fn a_parent_map_whose_nested_invalidation_fails_maps_nothing() {
    const CAP_CM: u64 = 1 << 7;
    let (host, _iommus, c, mem, dev, ioas) = world(Config { cap: NEST_CAP | CAP_CM, ecap: NEST_ECAP });
    let parent = hwpt_alloc(&c, dev, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT, 0, 0).unwrap();
    write_s1(&mem, 0b111, GUEST_PGD, 57);
    let nested = hwpt_alloc(&c, dev, parent, 0, IOMMU_HWPT_DATA_VTD_S1, IommuHwptVtdS1::SIZE as u32).unwrap();
    c.attach(dev, nested).unwrap();
    const IOVA: u64 = 0x80_0000;
    for (failures, n) in (1..8).enumerate() {
        host.vtd(UNIT_B).state().fail_submission = Some(n);
        let r = c.ioas_map(ioas, Some(IOVA), USER + 0x10_0000, 0x4000, true, true);
        host.vtd(UNIT_B).state().fail_submission = None;
        if r.is_ok() {
            assert!(failures >= 2, "both the parent's and the nested id's invalidation failed in turn");
            return;
        }
        let mapped = c.hwpt(parent).unwrap().domain.lock().iova_to_phys(IOVA);
        assert_eq!(mapped, None, "submission {n} failed: the parent maps nothing new");
        assert!(c.ioas(ioas).unwrap().iopt.lock().area_at(IOVA).is_none());
    }
    panic!("the map never succeeded");
}
