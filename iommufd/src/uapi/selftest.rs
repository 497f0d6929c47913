//! The selftest command `IOMMU_TEST_CMD` (`drivers/iommu/iommufd/iommufd_test.h`):
//! op numbers, mock driver constants, the command struct and the members
//! of its op-specific union.

/// Selftest op numbers (`iommu_test_cmd.op`).
pub const IOMMU_TEST_OP_ADD_RESERVED: u32 = 1;
pub const IOMMU_TEST_OP_MOCK_DOMAIN: u32 = 2;
pub const IOMMU_TEST_OP_MD_CHECK_MAP: u32 = 3;
pub const IOMMU_TEST_OP_MD_CHECK_REFS: u32 = 4;
pub const IOMMU_TEST_OP_CREATE_ACCESS: u32 = 5;
pub const IOMMU_TEST_OP_DESTROY_ACCESS_PAGES: u32 = 6;
pub const IOMMU_TEST_OP_ACCESS_PAGES: u32 = 7;
pub const IOMMU_TEST_OP_ACCESS_RW: u32 = 8;
pub const IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT: u32 = 9;
pub const IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: u32 = 10;
pub const IOMMU_TEST_OP_ACCESS_REPLACE_IOAS: u32 = 11;
pub const IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS: u32 = 12;
pub const IOMMU_TEST_OP_DIRTY: u32 = 13;
pub const IOMMU_TEST_OP_MD_CHECK_IOTLB: u32 = 14;
pub const IOMMU_TEST_OP_TRIGGER_IOPF: u32 = 15;
/// Linux 6.13+.
pub const IOMMU_TEST_OP_DEV_CHECK_CACHE: u32 = 16;
/// Linux 6.15+ (a vIOMMU event; not implemented here: no vIOMMU objects).
pub const IOMMU_TEST_OP_TRIGGER_VEVENT: u32 = 17;
/// Linux 6.15+: attach a PASID of the mock device `id` (a stdev id) to
/// `pasid_attach.pt_id` ([`IommuTestPasidAttach`]).
pub const IOMMU_TEST_OP_PASID_ATTACH: u32 = 18;
/// Linux 6.15+: move an attached PASID to another HWPT
/// ([`IommuTestPasidAttach`], the `pasid_replace` member).
pub const IOMMU_TEST_OP_PASID_REPLACE: u32 = 19;
/// Linux 6.15+: detach a PASID ([`IommuTestPasidDetach`]).
pub const IOMMU_TEST_OP_PASID_DETACH: u32 = 20;
/// Linux 6.15+: `EINVAL` unless the PASID is attached to `hwpt_id` (or,
/// with `hwpt_id` 0, to nothing) ([`IommuTestPasidCheck`]).
pub const IOMMU_TEST_OP_PASID_CHECK_HWPT: u32 = 21;

/// The mock domain's aperture: `[1 << 24, (1 << 31) - 1]`.
pub const MOCK_APERTURE_START: u64 = 1 << 24;
pub const MOCK_APERTURE_LAST: u64 = (1 << 31) - 1;

/// `access_pages.flags`.
pub const MOCK_FLAGS_ACCESS_WRITE: u32 = 1 << 0;
pub const MOCK_FLAGS_ACCESS_SYZ: u32 = 1 << 16;
/// `access_rw.flags`.
pub const MOCK_ACCESS_RW_WRITE: u32 = 1 << 0;
pub const MOCK_ACCESS_RW_SLOW_PATH: u32 = 1 << 2;
/// `create_access.flags`.
pub const MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES: u32 = 1 << 0;
/// `mock_domain_flags.dev_flags`.
pub const MOCK_FLAGS_DEVICE_NO_DIRTY: u32 = 1 << 0;
/// Linux 6.13+.
pub const MOCK_FLAGS_DEVICE_HUGE_IOVA: u32 = 1 << 1;
/// Linux 6.15+: the mock device issues PASID-tagged requests, with
/// [`MOCK_PASID_WIDTH`] PASID bits.
pub const MOCK_FLAGS_DEVICE_PASID: u32 = 1 << 2;
/// Linux 6.15+: PASID bits of a [`MOCK_FLAGS_DEVICE_PASID`] mock device
/// (`IOMMU_GET_HW_INFO`'s `out_max_pasid_log2`).
pub const MOCK_PASID_WIDTH: u32 = 20;
/// Linux 6.15+: the PASID on which the mock driver fails every second
/// attach (a replace's attach) with `ENOMEM`, so the selftest can check
/// that a failed replace leaves the PASID on its old HWPT. A detach
/// resets the alternation.
pub const IOMMU_TEST_PASID_RESERVED: u32 = 1024;
pub const MOCK_NESTED_DOMAIN_IOTLB_ID_MAX: u32 = 3;
pub const MOCK_NESTED_DOMAIN_IOTLB_NUM: u32 = 4;
/// GET_HW_INFO type / register value the mock driver reports.
pub const IOMMU_HW_INFO_TYPE_SELFTEST: u32 = 0xfeed_beef;
pub const IOMMU_HW_INFO_SELFTEST_REGVAL: u32 = 0xdead_beef;
/// HWPT_ALLOC data type of the mock nested domain.
pub const IOMMU_HWPT_DATA_SELFTEST: u32 = 0xdead;
pub const IOMMU_TEST_IOTLB_DEFAULT: u32 = 0x0bad_beef;
/// HWPT_INVALIDATE data types of the mock driver.
pub const IOMMU_HWPT_INVALIDATE_DATA_SELFTEST: u32 = 0xdead_beef;
pub const IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID: u32 = 0x0dad_beef;
pub const IOMMU_TEST_INVALIDATE_FLAG_ALL: u32 = 1 << 0;

/// Offset of the op-specific union inside [`IommuTestCmd`].
pub const IOMMU_TEST_CMD_UNION_OFFSET: usize = 16;
/// Size of that union (its largest member, `dirty`).
pub const IOMMU_TEST_CMD_UNION_SIZE: usize = 48;

uapi_struct! {
    /// IOMMU_TEST_CMD. The op-specific union is kept as raw bytes in
    /// `payload`; decode it with the `IommuTest*` structs below (each is
    /// read at offset 0 of `payload`, or at [`IOMMU_TEST_CMD_UNION_OFFSET`]
    /// of the whole command). `last` ends the minimum size (68). The union
    /// holds `u64`s, hence the 8-byte alignment (size 72, not 68).
    #[repr(align(8))]
    pub struct IommuTestCmd ("iommu_test_cmd", size 72) {
        size: u32 = 0,
        op: u32 = 4,
        id: u32 = 8,
        __reserved: u32 = 12,
        payload: [u8; 48] = 16,
        last: u32 = 64,
    }
}

uapi_struct! {
    /// `add_reserved`: reserve `[start, start + length)` in IOAS `id`.
    pub struct IommuTestAddReserved ("iommu_test_cmd.add_reserved", size 16, member "add_reserved") {
        start: u64 = 0,
        length: u64 = 8,
    }
}

uapi_struct! {
    /// `mock_domain`: outputs of creating a mock device attached to `id`.
    pub struct IommuTestMockDomain ("iommu_test_cmd.mock_domain", size 12, member "mock_domain") {
        out_stdev_id: u32 = 0,
        out_hwpt_id: u32 = 4,
        out_idev_id: u32 = 8,
    }
}

uapi_struct! {
    /// `mock_domain_flags`: `mock_domain` plus device flags.
    pub struct IommuTestMockDomainFlags ("iommu_test_cmd.mock_domain_flags", size 16, member "mock_domain_flags") {
        out_stdev_id: u32 = 0,
        out_hwpt_id: u32 = 4,
        out_idev_id: u32 = 8,
        dev_flags: u32 = 12,
    }
}

uapi_struct! {
    /// `mock_domain_replace`: re-attach mock device `id` to `pt_id`.
    pub struct IommuTestMockDomainReplace ("iommu_test_cmd.mock_domain_replace", size 4, member "mock_domain_replace") {
        pt_id: u32 = 0,
    }
}

uapi_struct! {
    /// `check_map`: verify the mock domain maps IOVA range to `uptr`.
    pub struct IommuTestCheckMap ("iommu_test_cmd.check_map", size 24, member "check_map") {
        iova: u64 = 0,
        length: u64 = 8,
        uptr: u64 = 16,
    }
}

uapi_struct! {
    /// `check_refs`: verify the pin count of the pages under `uptr`.
    pub struct IommuTestCheckRefs ("iommu_test_cmd.check_refs", size 24, member "check_refs") {
        length: u64 = 0,
        uptr: u64 = 8,
        refs: u32 = 16,
    }
}

uapi_struct! {
    /// `create_access`: make an access object on IOAS `id`, returning an fd.
    pub struct IommuTestCreateAccess ("iommu_test_cmd.create_access", size 8, member "create_access") {
        out_access_fd: u32 = 0,
        flags: u32 = 4,
    }
}

uapi_struct! {
    /// `destroy_access_pages`: unpin an earlier `access_pages`.
    pub struct IommuTestDestroyAccessPages ("iommu_test_cmd.destroy_access_pages", size 4, member "destroy_access_pages") {
        access_pages_id: u32 = 0,
    }
}

uapi_struct! {
    /// `access_pages`: pin pages through access fd `id`.
    pub struct IommuTestAccessPages ("iommu_test_cmd.access_pages", size 32, member "access_pages") {
        flags: u32 = 0,
        out_access_pages_id: u32 = 4,
        iova: u64 = 8,
        length: u64 = 16,
        uptr: u64 = 24,
    }
}

uapi_struct! {
    /// `access_rw`: CPU read/write through access fd `id`.
    pub struct IommuTestAccessRw ("iommu_test_cmd.access_rw", size 32, member "access_rw") {
        iova: u64 = 0,
        length: u64 = 8,
        uptr: u64 = 16,
        flags: u32 = 24,
    }
}

uapi_struct! {
    /// `memory_limit`: temporary batch memory limit (must be ≥ 12 on 64-bit).
    pub struct IommuTestMemoryLimit ("iommu_test_cmd.memory_limit", size 4, member "memory_limit") {
        limit: u32 = 0,
    }
}

uapi_struct! {
    /// `access_replace_ioas`: move access `id` to another IOAS.
    pub struct IommuTestAccessReplaceIoas ("iommu_test_cmd.access_replace_ioas", size 4, member "access_replace_ioas") {
        ioas_id: u32 = 0,
    }
}

uapi_struct! {
    /// `dirty`: set dirty bits in the mock domain from a user bitmap.
    pub struct IommuTestDirty ("iommu_test_cmd.dirty", size 48, member "dirty") {
        flags: u32 = 0,
        iova: u64 = 8,
        length: u64 = 16,
        page_size: u64 = 24,
        uptr: u64 = 32,
        out_nr_dirty: u64 = 40,
    }
}

uapi_struct! {
    /// `check_iotlb`: check a mock nested domain's IOTLB entry.
    pub struct IommuTestCheckIotlb ("iommu_test_cmd.check_iotlb", size 8, member "check_iotlb") {
        id: u32 = 0,
        iotlb: u32 = 4,
    }
}

uapi_struct! {
    /// `trigger_iopf`: inject a page fault for a mock device.
    pub struct IommuTestTriggerIopf ("iommu_test_cmd.trigger_iopf", size 24, member "trigger_iopf") {
        dev_id: u32 = 0,
        pasid: u32 = 4,
        grpid: u32 = 8,
        perm: u32 = 12,
        addr: u64 = 16,
    }
}

uapi_struct! {
    /// `pasid_attach` / `pasid_replace` (Linux 6.15+, same layout): attach
    /// or move PASID `pasid` of mock device `id` to `pt_id` (an IOAS or a
    /// HWPT); `pt_id` comes back as the HWPT used.
    pub struct IommuTestPasidAttach ("iommu_test_cmd.pasid_attach", size 8, member "pasid_attach") {
        pasid: u32 = 0,
        pt_id: u32 = 4,
    }
}

uapi_struct! {
    /// `pasid_detach` (Linux 6.15+): detach PASID `pasid` of mock device `id`.
    pub struct IommuTestPasidDetach ("iommu_test_cmd.pasid_detach", size 4, member "pasid_detach") {
        pasid: u32 = 0,
    }
}

uapi_struct! {
    /// `pasid_check` (Linux 6.15+): is PASID `pasid` of mock device `id`
    /// attached to HWPT `hwpt_id` (0: to nothing)?
    pub struct IommuTestPasidCheck ("iommu_test_cmd.pasid_check", size 8, member "pasid_check") {
        pasid: u32 = 0,
        hwpt_id: u32 = 4,
    }
}

// The union members must fit the union.
const _: () = assert!(IommuTestDirty::SIZE == IOMMU_TEST_CMD_UNION_SIZE);
const _: () = assert!(IommuTestAccessPages::SIZE <= IOMMU_TEST_CMD_UNION_SIZE);
const _: () = assert!(IommuTestAccessRw::SIZE <= IOMMU_TEST_CMD_UNION_SIZE);
const _: () = assert!(core::mem::offset_of!(IommuTestCmd, payload) == IOMMU_TEST_CMD_UNION_OFFSET);

uapi_struct! {
    /// HWPT_ALLOC data of the mock nested domain (`IOMMU_HWPT_DATA_SELFTEST`):
    /// the value every entry of its IOTLB starts with.
    pub struct IommuHwptSelftest ("iommu_hwpt_selftest", size 4) {
        iotlb: u32 = 0,
    }
}

uapi_struct! {
    /// One HWPT_INVALIDATE request for the mock nested domain
    /// (`IOMMU_HWPT_INVALIDATE_DATA_SELFTEST`): clear IOTLB entry
    /// `iotlb_id`, or all of them with `IOMMU_TEST_INVALIDATE_FLAG_ALL`.
    pub struct IommuHwptInvalidateSelftest ("iommu_hwpt_invalidate_selftest", size 8) {
        flags: u32 = 0,
        iotlb_id: u32 = 4,
    }
}
