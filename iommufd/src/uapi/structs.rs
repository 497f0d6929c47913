//! The iommufd argument structs (`include/uapi/linux/iommufd.h`, 6.12
//! layout, plus the newer commands' for reference) and their flag and enum
//! values. Every struct asserts its size and field offsets at compile time
//! (see [`layout`](super::layout)).

// Flag and enum values

/// `enum iommufd_ioas_map_flags` (IOAS_MAP, IOAS_COPY, IOAS_MAP_FILE).
pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;
/// All flags IOAS_MAP / IOAS_COPY accept.
pub const IOMMU_IOAS_MAP_VALID_FLAGS: u32 =
    IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;

/// `enum iommufd_option`.
pub const IOMMU_OPTION_RLIMIT_MODE: u32 = 0;
pub const IOMMU_OPTION_HUGE_PAGES: u32 = 1;
/// `enum iommufd_option_ops`.
pub const IOMMU_OPTION_OP_SET: u16 = 0;
pub const IOMMU_OPTION_OP_GET: u16 = 1;

/// `enum iommufd_vfio_ioas_op`.
pub const IOMMU_VFIO_IOAS_GET: u16 = 0;
pub const IOMMU_VFIO_IOAS_SET: u16 = 1;
pub const IOMMU_VFIO_IOAS_CLEAR: u16 = 2;

/// `enum iommufd_hwpt_alloc_flags`.
pub const IOMMU_HWPT_ALLOC_NEST_PARENT: u32 = 1 << 0;
pub const IOMMU_HWPT_ALLOC_DIRTY_TRACKING: u32 = 1 << 1;
/// Since 6.11 (with the fault queue). In 6.12 only nested HWPTs accept it.
pub const IOMMU_HWPT_FAULT_ID_VALID: u32 = 1 << 2;
/// Not in 6.12; used by PASID attach (Linux 6.15): the HWPT may be attached to PASIDs,
/// and to the requester id of a device with PASIDs attached. Accepted by
/// paging and nested HWPTs.
pub const IOMMU_HWPT_ALLOC_PASID: u32 = 1 << 3;
/// Flags a 6.12 paging (IOAS-backed) HWPT accepts.
pub const IOMMU_HWPT_ALLOC_PAGING_VALID_FLAGS_6_12: u32 =
    IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
/// Flags a 6.12 nested HWPT accepts.
pub const IOMMU_HWPT_ALLOC_NESTED_VALID_FLAGS_6_12: u32 = IOMMU_HWPT_FAULT_ID_VALID;

/// `enum iommu_hwpt_data_type`.
pub const IOMMU_HWPT_DATA_NONE: u32 = 0;
pub const IOMMU_HWPT_DATA_VTD_S1: u32 = 1;
pub const IOMMU_HWPT_DATA_ARM_SMMUV3: u32 = 2;

/// `enum iommu_hwpt_vtd_s1_flags`.
pub const IOMMU_VTD_S1_SRE: u64 = 1 << 0;
pub const IOMMU_VTD_S1_EAFE: u64 = 1 << 1;
pub const IOMMU_VTD_S1_WPE: u64 = 1 << 2;

/// `enum iommu_hw_info_type`.
pub const IOMMU_HW_INFO_TYPE_NONE: u32 = 0;
pub const IOMMU_HW_INFO_TYPE_INTEL_VTD: u32 = 1;
pub const IOMMU_HW_INFO_TYPE_ARM_SMMUV3: u32 = 2;
/// `enum iommu_hw_info_vtd_flags`.
pub const IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17: u32 = 1 << 0;
/// `enum iommufd_hw_capabilities`.
pub const IOMMU_HW_CAP_DIRTY_TRACKING: u64 = 1 << 0;
/// Linux 6.14+.
pub const IOMMU_HW_CAP_PCI_PASID_EXEC: u64 = 1 << 1;
/// Linux 6.14+.
pub const IOMMU_HW_CAP_PCI_PASID_PRIV: u64 = 1 << 2;

/// `enum iommufd_hwpt_set_dirty_tracking_flags`.
pub const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 = 1;
/// `enum iommufd_hwpt_get_dirty_bitmap_flags`.
pub const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: u32 = 1;

/// `enum iommu_hwpt_invalidate_data_type`.
pub const IOMMU_HWPT_INVALIDATE_DATA_VTD_S1: u32 = 0;
pub const IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3: u32 = 1;
/// `enum iommu_hwpt_vtd_s1_invalidate_flags`.
pub const IOMMU_VTD_INV_FLAGS_LEAF: u32 = 1 << 0;

/// `enum iommu_hwpt_pgfault_flags`.
pub const IOMMU_PGFAULT_FLAGS_PASID_VALID: u32 = 1 << 0;
pub const IOMMU_PGFAULT_FLAGS_LAST_PAGE: u32 = 1 << 1;
/// Portcullis's own flag, never set by Linux: the record is an
/// unrecoverable DMA (translation) fault a hypervisor forwarded with
/// `Ictx::report_dma_fault`, not a page request; its response goes to no
/// device. Only queues a VMM asked to receive such faults on carry it.
pub const PORTCULLIS_PGFAULT_FLAGS_UNRECOVERABLE: u32 = 1 << 31;
/// `enum iommu_hwpt_pgfault_perm`.
pub const IOMMU_PGFAULT_PERM_READ: u32 = 1 << 0;
pub const IOMMU_PGFAULT_PERM_WRITE: u32 = 1 << 1;
pub const IOMMU_PGFAULT_PERM_EXEC: u32 = 1 << 2;
pub const IOMMU_PGFAULT_PERM_PRIV: u32 = 1 << 3;
/// `enum iommufd_page_response_code`.
pub const IOMMUFD_PAGE_RESP_SUCCESS: u32 = 0;
pub const IOMMUFD_PAGE_RESP_INVALID: u32 = 1;

// Structs

uapi_struct! {
    /// IOMMU_DESTROY: destroy any object by id.
    pub struct IommuDestroy ("iommu_destroy", size 8) {
        size: u32 = 0,
        id: u32 = 4,
    }
}

uapi_struct! {
    /// IOMMU_IOAS_ALLOC: make a new, empty I/O address space.
    pub struct IommuIoasAlloc ("iommu_ioas_alloc", size 12) {
        size: u32 = 0,
        flags: u32 = 4,
        out_ioas_id: u32 = 8,
    }
}

uapi_struct! {
    /// One inclusive IOVA interval `[start, last]`, element of the arrays of
    /// IOAS_IOVA_RANGES and IOAS_ALLOW_IOVAS.
    pub struct IommuIovaRange ("iommu_iova_range", size 16) {
        start: u64 = 0,
        last: u64 = 8,
    }
}

uapi_struct! {
    /// IOMMU_IOAS_IOVA_RANGES: report the usable IOVA holes of an IOAS.
    pub struct IommuIoasIovaRanges ("iommu_ioas_iova_ranges", size 32) {
        size: u32 = 0,
        ioas_id: u32 = 4,
        num_iovas: u32 = 8,
        __reserved: u32 = 12,
        allowed_iovas: u64 = 16,
        out_iova_alignment: u64 = 24,
    }
}

uapi_struct! {
    /// IOMMU_IOAS_ALLOW_IOVAS: replace the list of ranges that must stay
    /// usable.
    pub struct IommuIoasAllowIovas ("iommu_ioas_allow_iovas", size 24) {
        size: u32 = 0,
        ioas_id: u32 = 4,
        num_iovas: u32 = 8,
        __reserved: u32 = 12,
        allowed_iovas: u64 = 16,
    }
}

uapi_struct! {
    /// IOMMU_IOAS_MAP: map user memory into an IOAS.
    pub struct IommuIoasMap ("iommu_ioas_map", size 40) {
        size: u32 = 0,
        flags: u32 = 4,
        ioas_id: u32 = 8,
        __reserved: u32 = 12,
        user_va: u64 = 16,
        length: u64 = 24,
        iova: u64 = 32,
    }
}

uapi_struct! {
    /// IOMMU_IOAS_MAP_FILE (Linux 6.13+): map a memfd range into an IOAS.
    pub struct IommuIoasMapFile ("iommu_ioas_map_file", size 40) {
        size: u32 = 0,
        flags: u32 = 4,
        ioas_id: u32 = 8,
        fd: i32 = 12,
        start: u64 = 16,
        length: u64 = 24,
        iova: u64 = 32,
    }
}

uapi_struct! {
    /// IOMMU_IOAS_COPY: map an existing mapping of one IOAS into another.
    pub struct IommuIoasCopy ("iommu_ioas_copy", size 40) {
        size: u32 = 0,
        flags: u32 = 4,
        dst_ioas_id: u32 = 8,
        src_ioas_id: u32 = 12,
        length: u64 = 16,
        dst_iova: u64 = 24,
        src_iova: u64 = 32,
    }
}

uapi_struct! {
    /// IOMMU_IOAS_UNMAP: remove mappings; `length` returns the bytes unmapped.
    pub struct IommuIoasUnmap ("iommu_ioas_unmap", size 24) {
        size: u32 = 0,
        ioas_id: u32 = 4,
        iova: u64 = 8,
        length: u64 = 16,
    }
}

uapi_struct! {
    /// IOMMU_OPTION: get or set a global or per-IOAS option.
    pub struct IommuOption ("iommu_option", size 24) {
        size: u32 = 0,
        option_id: u32 = 4,
        op: u16 = 8,
        __reserved: u16 = 10,
        object_id: u32 = 12,
        val64: u64 = 16,
    }
}

uapi_struct! {
    /// IOMMU_VFIO_IOAS: get/set/clear the IOAS the VFIO compat ioctls use.
    pub struct IommuVfioIoas ("iommu_vfio_ioas", size 12) {
        size: u32 = 0,
        ioas_id: u32 = 4,
        op: u16 = 8,
        __reserved: u16 = 10,
    }
}

uapi_struct! {
    /// Intel VT-d stage-1 table description (HWPT_ALLOC data, VTD_S1).
    pub struct IommuHwptVtdS1 ("iommu_hwpt_vtd_s1", size 24) {
        flags: u64 = 0,
        pgtbl_addr: u64 = 8,
        addr_width: u32 = 16,
        __reserved: u32 = 20,
    }
}

uapi_struct! {
    /// IOMMU_HWPT_ALLOC: allocate a paging or nested hardware page table.
    /// `fault_id`/`__reserved2` exist since 6.11 (fault queues); the
    /// minimum size still ends at `__reserved` (24).
    pub struct IommuHwptAlloc ("iommu_hwpt_alloc", size 48) {
        size: u32 = 0,
        flags: u32 = 4,
        dev_id: u32 = 8,
        pt_id: u32 = 12,
        out_hwpt_id: u32 = 16,
        __reserved: u32 = 20,
        data_type: u32 = 24,
        data_len: u32 = 28,
        data_uptr: u64 = 32,
        fault_id: u32 = 40,
        __reserved2: u32 = 44,
    }
}

uapi_struct! {
    /// Intel VT-d hardware information returned by GET_HW_INFO.
    pub struct IommuHwInfoVtd ("iommu_hw_info_vtd", size 24) {
        flags: u32 = 0,
        __reserved: u32 = 4,
        cap_reg: u64 = 8,
        ecap_reg: u64 = 16,
    }
}

uapi_struct! {
    /// IOMMU_GET_HW_INFO: query the IOMMU behind a bound device.
    ///
    /// Layout of the 6.12.y stable kernels (and 6.14+): the word after
    /// `out_data_type`, a `__u32 __reserved` in 6.12.0, is split into
    /// `out_max_pasid_log2` and three reserved bytes (same offsets, same
    /// size). Only the three reserved bytes must be zero on input;
    /// `out_max_pasid_log2` is output only. Later kernels also read
    /// `out_data_type` as `in_data_type` (not here).
    pub struct IommuHwInfo ("iommu_hw_info", size 40) {
        size: u32 = 0,
        flags: u32 = 4,
        dev_id: u32 = 8,
        data_len: u32 = 12,
        data_uptr: u64 = 16,
        out_data_type: u32 = 24,
        out_max_pasid_log2: u8 = 28,
        __reserved: [u8; 3] = 29,
        out_capabilities: u64 = 32,
    }
}

uapi_struct! {
    /// IOMMU_HWPT_SET_DIRTY_TRACKING: switch dirty tracking of a paging HWPT.
    pub struct IommuHwptSetDirtyTracking ("iommu_hwpt_set_dirty_tracking", size 16) {
        size: u32 = 0,
        flags: u32 = 4,
        hwpt_id: u32 = 8,
        __reserved: u32 = 12,
    }
}

uapi_struct! {
    /// IOMMU_HWPT_GET_DIRTY_BITMAP: read (and by default clear) dirty bits.
    pub struct IommuHwptGetDirtyBitmap ("iommu_hwpt_get_dirty_bitmap", size 48) {
        size: u32 = 0,
        hwpt_id: u32 = 4,
        flags: u32 = 8,
        __reserved: u32 = 12,
        iova: u64 = 16,
        length: u64 = 24,
        page_size: u64 = 32,
        data: u64 = 40,
    }
}

uapi_struct! {
    /// Intel VT-d stage-1 invalidation request (HWPT_INVALIDATE entry).
    pub struct IommuHwptVtdS1Invalidate ("iommu_hwpt_vtd_s1_invalidate", size 24) {
        addr: u64 = 0,
        npages: u64 = 8,
        flags: u32 = 16,
        __reserved: u32 = 20,
    }
}

uapi_struct! {
    /// IOMMU_HWPT_INVALIDATE: pass an array of cache invalidation requests.
    pub struct IommuHwptInvalidate ("iommu_hwpt_invalidate", size 32) {
        size: u32 = 0,
        hwpt_id: u32 = 4,
        data_uptr: u64 = 8,
        data_type: u32 = 16,
        entry_len: u32 = 20,
        entry_num: u32 = 24,
        __reserved: u32 = 28,
    }
}

uapi_struct! {
    /// One page-fault message read from a fault queue fd.
    pub struct IommuHwptPgfault ("iommu_hwpt_pgfault", size 40) {
        flags: u32 = 0,
        dev_id: u32 = 4,
        pasid: u32 = 8,
        grpid: u32 = 12,
        perm: u32 = 16,
        __reserved: u32 = 20,
        addr: u64 = 24,
        length: u32 = 32,
        cookie: u32 = 36,
    }
}

uapi_struct! {
    /// One page-fault response written to a fault queue fd.
    pub struct IommuHwptPageResponse ("iommu_hwpt_page_response", size 8) {
        cookie: u32 = 0,
        code: u32 = 4,
    }
}

uapi_struct! {
    /// IOMMU_FAULT_QUEUE_ALLOC: make a fault queue object and its fd.
    pub struct IommuFaultAlloc ("iommu_fault_alloc", size 16) {
        size: u32 = 0,
        flags: u32 = 4,
        out_fault_id: u32 = 8,
        out_fault_fd: u32 = 12,
    }
}

uapi_struct! {
    /// IOMMU_VIOMMU_ALLOC (Linux 6.13+).
    pub struct IommuViommuAlloc ("iommu_viommu_alloc", size 40) {
        size: u32 = 0,
        flags: u32 = 4,
        r#type: u32 = 8,
        dev_id: u32 = 12,
        hwpt_id: u32 = 16,
        out_viommu_id: u32 = 20,
        data_len: u32 = 24,
        __reserved: u32 = 28,
        data_uptr: u64 = 32,
    }
}

uapi_struct! {
    /// IOMMU_VDEVICE_ALLOC (Linux 6.13+).
    pub struct IommuVdeviceAlloc ("iommu_vdevice_alloc", size 24) {
        size: u32 = 0,
        viommu_id: u32 = 4,
        dev_id: u32 = 8,
        out_vdevice_id: u32 = 12,
        virt_id: u64 = 16,
    }
}

uapi_struct! {
    /// IOMMU_IOAS_CHANGE_PROCESS (Linux 6.14+).
    pub struct IommuIoasChangeProcess ("iommu_ioas_change_process", size 8) {
        size: u32 = 0,
        __reserved: u32 = 4,
    }
}

#[cfg(test)]
mod tests {
    use crate::uapi::vfio::*;
    use crate::uapi::*;

    #[test]
    fn round_trips() {
        let m = IommuIoasMap {
            size: 40,
            flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE,
            ioas_id: 7,
            __reserved: 0,
            user_va: 0x1122_3344_5566_7788,
            length: 0x10_0000,
            iova: 0xdead_b000,
        };
        let b = m.to_bytes();
        assert_eq!(b.len(), IommuIoasMap::SIZE);
        assert_eq!(&b[0..4], &40u32.to_le_bytes());
        assert_eq!(&b[16..24], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[32..40], &0xdead_b000u64.to_le_bytes());
        assert_eq!(IommuIoasMap::read(&b), m);

        let o = IommuOption { size: 24, option_id: 1, op: 1, __reserved: 0xabcd, object_id: 3, val64: 9 };
        let b = o.to_bytes();
        assert_eq!(&b[8..10], &1u16.to_le_bytes());
        assert_eq!(&b[10..12], &0xabcdu16.to_le_bytes());
        assert_eq!(IommuOption::read(&b), o);

        let mut t = IommuTestCmd { size: 72, op: IOMMU_TEST_OP_ACCESS_RW, id: 5, ..Default::default() };
        let rw = IommuTestAccessRw { iova: 0x100_0000, length: 16, uptr: 0x7fff_0000, flags: MOCK_ACCESS_RW_WRITE };
        rw.write(&mut t.payload);
        let b = t.to_bytes();
        assert_eq!(&b[16 + 24..16 + 28], &1u32.to_le_bytes());
        let back = IommuTestCmd::read(&b);
        assert_eq!(back, t);
        assert_eq!(IommuTestAccessRw::read(&back.payload), rw);
        let ap = IommuTestAccessPages::read(&b[IOMMU_TEST_CMD_UNION_OFFSET..]);
        assert_eq!(ap.iova, rw.length); // union aliasing: access_pages.iova overlays access_rw.length

        let u = VfioIommuType1DmaUnmap { argsz: 24, flags: VFIO_DMA_UNMAP_FLAG_ALL, iova: 1, size: 2 };
        assert_eq!(VfioIommuType1DmaUnmap::read(&u.to_bytes()), u);
        let h = VfioInfoCapHeader { id: VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, version: 1, next: 36 };
        assert_eq!(VfioInfoCapHeader::read(&h.to_bytes()), h);
        let f = IommuIoasMapFile { size: 40, fd: -1, ..Default::default() };
        assert_eq!(IommuIoasMapFile::read(&f.to_bytes()).fd, -1);
    }
}
