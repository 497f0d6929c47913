//! Nested translation against the register model of a unit with ECAP.NEST
//! (QEMU 10 does not offer it, so these host tests are where the nested
//! PASID entry is checked, field by field, against the specification's
//! layout, 9.6), and the first-stage invalidations it takes.

use portcullis_iommu::testing::TickClock;
use portcullis_iommu::unit::UnitDomain;
use portcullis_iommu::{IommuDomain, Prot};
use std::sync::Arc;
use vtd::nested::{FirstStageRange, NestParent, NestedError, S1_EAFE, S1_SRE, S1_WPE, StageOne};
use vtd::scalable::Pgtt;
use vtd::testing::{Config, Invalidation, IotlbInvalidation, RegisterModel};

/// Heap tables shared by the driver and the model.
type Mem = vtd::testing::ModelTables;

const BASE: u64 = 0xfed9_0000;
/// ECAP.NEST (26), SRS (31), EAFS (34), SMTS (43), SSTS (46), FSTS (47),
/// and ECAP.C (page walks snoop).
const ECAP_NEST: u64 = 1 << 26 | 1 << 31 | 1 << 34 | 1 << 43 | 1 << 46 | 1 << 47 | 1;
/// CAP.FS5LP (60).
const CAP_FS5LP: u64 = 1 << 60;

type Unit = vtd::Shared<RegisterModel, Mem, TickClock>;

fn unit(cap: u64, ecap: u64) -> (RegisterModel, Arc<Unit>) {
    let mem = Mem::new(true);
    let config = Config { cap: Config::QEMU.cap | cap, ecap: Config::QEMU.ecap | ecap };
    let model = RegisterModel::new(config, Arc::new(mem.clone()));
    let u = vtd::Shared::bring_up(BASE, model.clone(), mem, TickClock::default(), Some(vtd::Mode::Scalable)).unwrap();
    (model, u)
}

fn queued(model: &RegisterModel) -> Vec<Invalidation> {
    model.take_log().into_iter().map(|l| l.what).filter(|w| !matches!(w, Invalidation::Wait { .. })).collect()
}

#[test]
fn the_nested_entry_takes_the_first_stage_from_the_user_and_the_second_from_the_parent() {
    let (model, u) = unit(CAP_FS5LP, ECAP_NEST);
    assert!(u.can_nest());
    let mut parent = u.new_domain_in(vtd::Stage::Second).unwrap();
    parent.map(0, 0x10_0000, 0x4000, Prot::RW).unwrap();
    let info = parent.table_info();
    parent.attach_requester(8).unwrap();
    let parent_did = parent.domain_id();

    let s1 = StageOne { flags: S1_SRE | S1_WPE | S1_EAFE, pgtbl_addr: 0x1_2345_6000, addr_width: 57 };
    let mut nested = u.new_nested_domain(s1).unwrap();
    let did = nested.domain_id();
    assert_ne!(did, parent_did, "a nested domain has its own domain id");
    model.take_log();
    let p = NestParent { root: info.root, levels: info.levels, dirty_tracking: false };
    nested.attach_requester(8, &p).unwrap();

    let e = u.lock().scalable_entry(8).unwrap().pasid;
    // Word 0: P (0), FPD (1) clear, AW (4:2) = 2 for the 4-level parent,
    // SSEE (5) clear, PGTT (8:6) = 011b, SSADE (9) clear, SSPTPTR (63:12).
    assert_eq!(e.0[0], 1 | 2 << 2 | 3 << 6 | info.root);
    // Word 1: DID (79:64) the nested domain's; PWSNP / PGSNP clear.
    assert_eq!(e.0[1], did as u64);
    // Word 2: SRE (128), FSPM (131:130) = 01b, WPE (132), EAFE (135),
    // FSPTPTR (191:140).
    assert_eq!(e.0[2], 0x1_2345_6000 | 1 | 1 << 2 | 1 << 4 | 1 << 7);
    assert_eq!(e.0[3..], [0; 5]);
    assert_eq!(e.pgtt(), Some(Pgtt::Nested));
    assert_eq!(nested.attached().collect::<Vec<_>>(), [8]);
    // The parent's entry was live: blocked, then its PASID cache and IOTLB
    // invalidated before the nested one went in.
    assert_eq!(
        queued(&model),
        [
            Invalidation::PasidCache { g: 1, did: parent_did, pasid: 0 },
            Invalidation::Iotlb(IotlbInvalidation::Domain(parent_did)),
        ]
    );

    // First-stage invalidations: PASID-based, for (nested id, PASID 0).
    nested.invalidate(FirstStageRange::Pages { addr: 0x4000, npages: 4, leaf_only: true }).unwrap();
    nested.invalidate(FirstStageRange::All).unwrap();
    nested.invalidate(FirstStageRange::Pages { addr: 0x4000, npages: 0, leaf_only: false }).unwrap();
    assert_eq!(
        queued(&model),
        [
            Invalidation::PasidIotlb { did, pasid: 0, pages: Some((0x4000, 2, true)) },
            Invalidation::PasidIotlb { did, pasid: 0, pages: None },
        ]
    );
    // The parent's second stage changed: IOTLB invalidation under the
    // nested id.
    nested.invalidate_parent_range(0x1000, 0x1fff, true).unwrap();
    assert_eq!(queued(&model), [Invalidation::Iotlb(IotlbInvalidation::Pages { did, addr: 0x1000, am: 0, ih: true })]);

    // Detach: blocked, PASID cache and IOTLB of the nested id dropped.
    nested.detach_requester(8).unwrap();
    assert!(!u.lock().scalable_entry(8).unwrap().pasid.present());
    assert_eq!(
        queued(&model),
        [Invalidation::PasidCache { g: 1, did, pasid: 0 }, Invalidation::Iotlb(IotlbInvalidation::Domain(did))]
    );
    // Dropping the domain drops everything under its id, then the id is
    // reused.
    drop(nested);
    assert_eq!(queued(&model), [Invalidation::Iotlb(IotlbInvalidation::Domain(did))]);
    assert_eq!(u.new_nested_domain(s1).unwrap().domain_id(), did);
}

#[test]
fn ssade_follows_the_parent_and_four_levels_is_fspm_zero() {
    let (_model, u) = unit(0, ECAP_NEST);
    let parent = u.new_domain_in(vtd::Stage::Second).unwrap();
    let info = parent.table_info();
    let mut nested = u.new_nested_domain(StageOne { flags: 0, pgtbl_addr: 0x7000, addr_width: 48 }).unwrap();
    nested.attach_requester(0x10, &NestParent { root: info.root, levels: info.levels, dirty_tracking: true }).unwrap();
    let e = u.lock().scalable_entry(0x10).unwrap().pasid;
    assert_eq!(e.0[0], 1 | 2 << 2 | 3 << 6 | 1 << 9 | info.root);
    assert_eq!(e.0[2], 0x7000, "FSPM 00b, no SRE, WPE or EAFE");
}

#[test]
fn the_first_stage_is_checked_against_the_unit_when_attached() {
    // No FS5LP, SRS or EAFS.
    let (model, u) = unit(0, ECAP_NEST & !(1 << 31 | 1 << 34));
    let parent = u.new_domain_in(vtd::Stage::Second).unwrap();
    let info = parent.table_info();
    let p = NestParent { root: info.root, levels: info.levels, dirty_tracking: false };
    for (s1, want) in [
        (StageOne { flags: 0, pgtbl_addr: 0x7000, addr_width: 39 }, NestedError::AddressWidth(39)),
        (StageOne { flags: 0, pgtbl_addr: 0x7000, addr_width: 57 }, NestedError::FiveLevel),
        (StageOne { flags: S1_SRE, pgtbl_addr: 0x7000, addr_width: 48 }, NestedError::SupervisorRequests),
        (StageOne { flags: S1_EAFE, pgtbl_addr: 0x7000, addr_width: 48 }, NestedError::ExtendedAccessed),
    ] {
        // Allocation accepts it, as Linux's does; the attach refuses.
        let mut nested = u.new_nested_domain(s1).unwrap();
        model.take_log();
        assert_eq!(nested.attach_requester(8, &p), Err(want), "{s1:?}");
        assert_eq!(u.lock().scalable_entry(8), None, "nothing written");
        assert_eq!(queued(&model), []);
    }
    // A parent depth outside SAGAW.
    let mut nested = u.new_nested_domain(StageOne { flags: 0, pgtbl_addr: 0x7000, addr_width: 48 }).unwrap();
    let deep = NestParent { levels: 5, ..p };
    assert_eq!(nested.attach_requester(8, &deep), Err(NestedError::Parent));
}

#[test]
fn units_without_nesting_refuse() {
    let s1 = StageOne { flags: 0, pgtbl_addr: 0x7000, addr_width: 48 };
    // QEMU's scalable unit (no NEST, no FSTS), and one with NEST but
    // running legacy.
    let (_m, u) = unit(0, 1 << 43 | 1 << 46);
    assert!(!u.can_nest());
    assert_eq!(u.new_nested_domain(s1).err(), Some(NestedError::NotSupported));
    let mem = Mem::new(true);
    let config = Config { cap: Config::QEMU.cap, ecap: Config::QEMU.ecap | ECAP_NEST };
    let model = RegisterModel::new(config, Arc::new(mem.clone()));
    let legacy =
        vtd::Shared::bring_up(BASE, model, mem, TickClock::default(), Some(vtd::Mode::Legacy { queued: true }))
            .unwrap();
    assert!(!legacy.can_nest());
    assert_eq!(legacy.new_nested_domain(s1).err(), Some(NestedError::NotSupported));
}

/// A requester attached to a nested domain and then moved to another
/// domain belongs to that one: detaching it from the nested domain, or
/// dropping the nested domain, leaves it attached where it is.
#[test]
fn a_requester_moved_away_is_not_blocked_by_its_old_nested_domain() {
    let (_model, u) = unit(CAP_FS5LP, ECAP_NEST);
    let parent = u.new_domain_in(vtd::Stage::Second).unwrap();
    let info = parent.table_info();
    let p = NestParent { root: info.root, levels: info.levels, dirty_tracking: false };
    let s1 = StageOne { flags: S1_SRE, pgtbl_addr: 0x1_2345_6000, addr_width: 48 };
    for drop_it in [false, true] {
        let mut nested = u.new_nested_domain(s1).unwrap();
        nested.attach_requester(8, &p).unwrap();
        let other = u.new_domain_in(vtd::Stage::Second).unwrap();
        other.attach_requester(8).unwrap();
        let did = other.domain_id();
        if drop_it {
            drop(nested);
        } else {
            nested.detach_requester(8).unwrap();
            assert_eq!(nested.attached().count(), 0);
        }
        assert_eq!(u.lock().attached_domain(8), Some(did), "drop: {drop_it}");
        other.detach_requester(8).unwrap();
    }
}
