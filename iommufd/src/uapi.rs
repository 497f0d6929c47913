//! The iommufd and VFIO-type1 user ABI: ioctl numbers, argument structs and
//! the generic size/extensibility rules, as Linux 6.12 applies them.
//!
//! Everything here is written from the published ABI facts (numbers, field
//! offsets, errno rules) of `include/uapi/linux/iommufd.h`,
//! `include/uapi/linux/vfio.h`, `drivers/iommu/iommufd/iommufd_test.h` and
//! the behaviour of `drivers/iommu/iommufd/main.c` / `vfio_compat.c`; no code
//! or comment text is taken from there.
//!
//! # Struct model
//!
//! Each argument struct is a `#[repr(C)]` Rust struct whose fields carry the
//! header's names. Because the crate forbids `unsafe`, nothing is
//! transmuted: every struct has `SIZE`, `read(&[u8])` and `write(&mut [u8])`
//! which (de)serialise little-endian fields at the header's byte offsets.
//! The offsets are written down once, in the field list given to the
//! `uapi_struct!` macro, and compile-time asserts check that the Rust layout
//! (`size_of`, `offset_of!`) agrees with them, so a typo in either place
//! fails the build.
//!
//! `read` treats bytes beyond the slice as zero and `write` stores only the
//! bytes that fit in the slice (a field cut by the end is written partially,
//! low bytes first). That is exactly a byte copy of a prefix of the struct,
//! which is what the kernel does when user and kernel sizes differ.
//!
//! # The generic command path (Linux 6.12 `iommufd_fops_ioctl`)
//!
//! Given `(cmd, buf)` where `buf` is the user memory the argument pointer
//! reaches (its length models where a fault would happen), the kernel does,
//! in this order:
//!
//! 1. `nr = cmd & 0xff`. If `nr < 0x80` or `nr - 0x80` is past the end of
//!    its ioctl table, the command is not an iommufd command at all and is
//!    handed to the VFIO compatibility code (`iommufd_vfio_ioctl`), which
//!    answers the six VFIO ioctls listed under [`vfio`] and otherwise gives
//!    `ENOIOCTLCMD`, which the VFS turns into **ENOTTY**. The table length
//!    is 15 (last entry `FAULT_QUEUE_ALLOC`, 0x8e) without the selftest, and
//!    33 (last entry `IOMMU_TEST_CMD`, 0xa0) with `CONFIG_IOMMUFD_TEST`.
//! 2. Read the first `u32` (`size`) from user memory: fault → **EFAULT**.
//!    This happens *before* the full command is matched, so a command whose
//!    `nr` is in range but which is otherwise unknown reports EFAULT, not
//!    ENOTTY, when the pointer is bad.
//! 3. The table slot's full ioctl number must equal `cmd` (type `;`, no
//!    direction/size bits, a hole in the table never matches) → else
//!    **ENOTTY** (again via `ENOIOCTLCMD`).
//! 4. `size < min_size` → **EINVAL**. `min_size` is the end offset of the
//!    last field the first version of the struct had (`IOCTL_OP`'s
//!    `offsetofend(_struct, _last)`), not the current struct size.
//! 5. `copy_struct_from_user(kernel_buf, struct_size, user, size)`:
//!    * `size < struct_size`: copy `size` bytes, zero the rest;
//!    * `size > struct_size`: the bytes `[struct_size, size)` are checked
//!      first: a fault while scanning → **EFAULT**, any non-zero byte →
//!      **E2BIG**; then `struct_size` bytes are copied;
//!    * a fault during the copy → **EFAULT**.
//! 6. The handler runs (see the per-command table below).
//!
//! Results go back with `iommufd_ucmd_respond`, which copies
//! `min(user size, sizeof(kernel struct))` bytes of the kernel struct to the
//! start of the user buffer; a fault there → **EFAULT** (the object being
//! created is then aborted). See [`give_back`]. Exception: `IOMMU_OPTION`
//! writes back only its `val64` field (bytes 16..24), for both GET and SET.
//!
//! # Per-command validation (Linux 6.12)
//!
//! General convention of the native iommufd commands: an unknown `flags`
//! bit and a non-zero `__reserved` field both give **EOPNOTSUPP** (never
//! EINVAL); a field whose meaning is understood but whose value is wrong
//! gives EINVAL; a missing object gives ENOENT. The VFIO compatibility
//! ioctls use the VFIO convention instead: unknown flags → **EINVAL**.
//!
//! "ioas(x)" below means an IOAS lookup of id `x`: no such object, or not an
//! IOAS → ENOENT. The checks are listed in the order the handler makes them;
//! the first failing one decides the errno.
//!
//! | command (nr) | handler | unknown `flags` | `__reserved` ≠ 0 | order of the other checks |
//! |---|---|---|---|---|
//! | DESTROY (0x80) | `iommufd_destroy` → `iommufd_object_remove` | – (no flags) | – | id not found (or still being created) → ENOENT; object still referenced → EBUSY |
//! | IOAS_ALLOC (0x81) | `iommufd_ioas_alloc_ioctl` | any bit → EOPNOTSUPP (flags must be 0) | – | allocation → ENOMEM; respond fault → EFAULT (IOAS aborted) |
//! | IOAS_ALLOW_IOVAS (0x82) | `iommufd_ioas_allow_iovas` | – | EOPNOTSUPP (first check) | ioas(ioas_id); per range: unreadable → EFAULT, `start >= last` → EINVAL, overlaps an earlier range of the list → EINVAL; then `iopt_set_allow_iova` (EINVAL if current mappings/reservations conflict) |
//! | IOAS_COPY (0x83) | `iommufd_ioas_copy` | bits outside FIXED_IOVA\|WRITEABLE\|READABLE → EOPNOTSUPP (first check) | – (no reserved field) | any of length/src_iova/dst_iova ≥ `ULONG_MAX` → EOVERFLOW; neither WRITEABLE nor READABLE → EINVAL; ioas(src_ioas_id); source range lookup (`iopt_get_pages`, ENOENT if not exactly mapped); ioas(dst_ioas_id); map |
//! | IOAS_IOVA_RANGES (0x84) | `iommufd_ioas_iova_ranges` | – | EOPNOTSUPP (first check) | ioas(ioas_id); each range copied out while `num_iovas` has room (fault → EFAULT); respond (EFAULT); if the array was too small → **EMSGSIZE** *after* the struct (with the needed `num_iovas`) was written back |
//! | IOAS_MAP (0x85) | `iommufd_ioas_map` | bits outside FIXED_IOVA\|WRITEABLE\|READABLE → EOPNOTSUPP | EOPNOTSUPP (same check as flags) | iova or length ≥ `ULONG_MAX` → EOVERFLOW; neither WRITEABLE nor READABLE → EINVAL; ioas(ioas_id); `iopt_map_user_pages` |
//! | IOAS_UNMAP (0x86) | `iommufd_ioas_unmap` | – (no flags) | – (no reserved) | ioas(ioas_id) **first**; `iova == 0 && length == u64::MAX` → unmap everything; otherwise iova or length ≥ `ULONG_MAX` → EOVERFLOW, then `iopt_unmap_iova`; `length` is rewritten with the bytes unmapped and responded |
//! | OPTION (0x87) | `iommufd_option` | – | EOPNOTSUPP (first check) | `option_id` unknown → EOPNOTSUPP. RLIMIT_MODE (`iommufd_option_rlimit_mode`): `object_id != 0` → EOPNOTSUPP; GET ok; SET: no CAP_SYS_RESOURCE → EPERM, context already holds objects → EBUSY, `val64 ∉ {0,1}` → EINVAL; other op → EOPNOTSUPP. HUGE_PAGES (`iommufd_ioas_option`): ioas(object_id) **before** the op is looked at; GET ok; SET `val64 ∉ {0,1}` → EINVAL; other op → EOPNOTSUPP. Only `val64` is written back. |
//! | VFIO_IOAS (0x88) | `iommufd_vfio_ioas` | – | EOPNOTSUPP (first check) | op GET: no compat IOAS → ENODEV, else `ioas_id` responded; SET: ioas(ioas_id); CLEAR: always ok; other op → EOPNOTSUPP |
//! | HWPT_ALLOC (0x89) | `iommufd_hwpt_alloc` | checked **late**, inside `iommufd_hwpt_paging_alloc` (bits outside NEST_PARENT\|DIRTY_TRACKING → EOPNOTSUPP — FAULT_ID_VALID on a paging HWPT is refused in 6.12 and accepted from 6.13 (my reading of the history; verify against the peer); DIRTY_TRACKING without hardware support → EOPNOTSUPP) or `iommufd_hwpt_nested_alloc` (bits other than FAULT_ID_VALID → EOPNOTSUPP) | `__reserved` → EOPNOTSUPP (first check); `__reserved2` is **not** checked | `(data_type == NONE) != (data_len == 0)` → EINVAL; device(dev_id) → ENOENT; pt_id not found → **EINVAL** (not ENOENT); pt is IOAS → paging alloc; pt is a paging HWPT → nested alloc (parent not NEST_PARENT / auto domain → EINVAL); any other object type → EINVAL; FAULT_ID_VALID: fault(fault_id) → ENOENT |
//! | GET_HW_INFO (0x8a) | `iommufd_get_hw_info` | any bit → EOPNOTSUPP (flags must be 0 in 6.12) | EOPNOTSUPP (same check) | device(dev_id) → ENOENT; driver data copied to `data_uptr` (min of both lengths, fault → EFAULT), the rest of a longer user buffer zeroed (fault → EFAULT); `data_len`, `out_data_type`, `out_capabilities` responded |
//! | HWPT_SET_DIRTY_TRACKING (0x8b) | `iommufd_hwpt_set_dirty_tracking` | bits other than ENABLE → EOPNOTSUPP | **not checked** | paging hwpt(hwpt_id) → ENOENT; domain without dirty ops → EOPNOTSUPP |
//! | HWPT_GET_DIRTY_BITMAP (0x8c) | `iommufd_hwpt_get_dirty_bitmap` | bits other than NO_CLEAR → EOPNOTSUPP | EOPNOTSUPP (same check) | paging hwpt(hwpt_id) → ENOENT; then `iopt_read_and_clear_dirty_data` (range/page-size checks, EINVAL / EOVERFLOW) |
//! | HWPT_INVALIDATE (0x8d) | `iommufd_hwpt_invalidate` | – (no flags) | EOPNOTSUPP (first check) | `entry_num != 0 && (data_uptr == 0 \|\| entry_len == 0)` → EINVAL; nested hwpt(hwpt_id) → ENOENT; driver callback. **Always** responds with `entry_num` = requests handled (0 on early errors), even when failing; a respond fault turns the result into EFAULT |
//! | FAULT_QUEUE_ALLOC (0x8e) | `iommufd_fault_alloc` | any bit → EOPNOTSUPP | – | allocation / fd errors; respond fault → EFAULT |
//! | IOMMU_TEST_CMD (0xa0, selftest) | `iommufd_test` | per op | `__reserved` **not checked** | unknown `op` → EOPNOTSUPP; then the op's own checks |
//!
//! Newer kernels (not 6.12): 6.13 adds IOAS_MAP_FILE (0x8f), VIOMMU_ALLOC
//! (0x90), VDEVICE_ALLOC (0x91), lets paging HWPTs take FAULT_ID_VALID and
//! lets HWPT_INVALIDATE target a vIOMMU; 6.14 adds IOAS_CHANGE_PROCESS
//! (0x92), the HWPT_ALLOC `PASID` flag and `out_max_pasid_log2` in
//! `iommu_hw_info` (carved out of its `__reserved`); 6.15 adds
//! VEVENTQ_ALLOC (0x93); later kernels add HW_QUEUE_ALLOC (0x94) and the
//! GET_HW_INFO `INPUT_TYPE` flag. In 6.12 these numbers give ENOTTY.

use alloc::vec;
use alloc::vec::Vec;

use crate::errno::Errno;

// ---------------------------------------------------------------------------
// Little-endian field access
// ---------------------------------------------------------------------------

/// A plain integer (or byte array) field that can live in a uAPI struct.
pub trait LeField: Copy {
    /// Reads the field at `off`; bytes past the end of `b` read as zero.
    fn get(b: &[u8], off: usize) -> Self;
    /// Writes the field at `off`; bytes past the end of `b` are dropped.
    fn put(self, b: &mut [u8], off: usize);
}

fn get_bytes<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        if let Some(v) = off.checked_add(i).and_then(|p| b.get(p)) {
            *o = *v;
        }
    }
    out
}

fn put_bytes(src: &[u8], b: &mut [u8], off: usize) {
    for (i, v) in src.iter().enumerate() {
        if let Some(d) = off.checked_add(i).and_then(|p| b.get_mut(p)) {
            *d = *v;
        }
    }
}

macro_rules! le_int {
    ($($t:ty),*) => {$(
        impl LeField for $t {
            fn get(b: &[u8], off: usize) -> Self {
                <$t>::from_le_bytes(get_bytes(b, off))
            }
            fn put(self, b: &mut [u8], off: usize) {
                put_bytes(&self.to_le_bytes(), b, off)
            }
        }
    )*};
}
le_int!(u8, u16, u32, u64, i32);

impl<const N: usize> LeField for [u8; N] {
    fn get(b: &[u8], off: usize) -> Self {
        get_bytes(b, off)
    }
    fn put(self, b: &mut [u8], off: usize) {
        put_bytes(&self, b, off)
    }
}

/// Declares a `#[repr(C)]` uAPI struct from one field list `name: type @
/// offset`, with `SIZE`, `read`, `write` and compile-time layout asserts for
/// the total size and for every field offset.
macro_rules! uapi_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident ($cname:literal, size $size:literal) {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty = $off:literal ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[doc = concat!("\n\nC name: `struct ", $cname, "`, ", stringify!($size), " bytes.")]
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $name {
            /// `sizeof` of the C struct.
            pub const SIZE: usize = $size;
            /// The C struct name.
            pub const C_NAME: &'static str = $cname;

            /// Decodes the struct from its little-endian byte image; bytes
            /// missing at the end of `bytes` read as zero.
            pub fn read(bytes: &[u8]) -> Self {
                Self { $( $field: <$ty as LeField>::get(bytes, $off), )* }
            }

            /// Encodes the struct into `bytes` (padding bytes are left
            /// untouched; bytes past the end of `bytes` are dropped).
            pub fn write(&self, bytes: &mut [u8]) {
                $( LeField::put(self.$field, bytes, $off); )*
            }

            /// The byte image of the struct, `SIZE` bytes, padding zeroed.
            pub fn to_bytes(&self) -> Vec<u8> {
                let mut v = vec![0u8; $size];
                self.write(&mut v);
                v
            }
        }

        impl Default for $name {
            /// All fields zero.
            fn default() -> Self {
                Self::read(&[])
            }
        }

        impl LeField for $name {
            fn get(b: &[u8], off: usize) -> Self {
                Self::read(b.get(off..).unwrap_or(&[]))
            }
            fn put(self, b: &mut [u8], off: usize) {
                if let Some(s) = b.get_mut(off..) {
                    self.write(s)
                }
            }
        }

        const _: () = assert!(core::mem::size_of::<$name>() == $size);
        $( const _: () = assert!(core::mem::offset_of!($name, $field) == $off); )*
    };
}

/// Offset of the end of a field (`offsetofend`), for the tables.
macro_rules! end_of {
    ($t:ty, $f:ident) => {
        core::mem::offset_of!($t, $f) + {
            // Size of the field's type, through a never-called closure so
            // that no value is needed.
            const fn size_of_ret<T, F: FnOnce(&$t) -> T>(_f: &F) -> usize {
                core::mem::size_of::<T>()
            }
            size_of_ret(&|s: &$t| s.$f)
        }
    };
}

// ---------------------------------------------------------------------------
// ioctl numbers
// ---------------------------------------------------------------------------

/// The ioctl "type" byte of both iommufd and VFIO: `';'`.
pub const IOMMUFD_TYPE: u32 = b';' as u32;

/// `_IO(type, nr)`: no direction and no size bits.
pub const fn io(ty: u32, nr: u32) -> u32 {
    (ty << 8) | nr
}

/// The `nr` byte of an ioctl number (`_IOC_NR`).
pub const fn ioc_nr(cmd: u32) -> u32 {
    cmd & 0xff
}

/// First iommufd command number.
pub const IOMMUFD_CMD_BASE: u32 = 0x80;
pub const IOMMUFD_CMD_DESTROY: u32 = 0x80;
pub const IOMMUFD_CMD_IOAS_ALLOC: u32 = 0x81;
pub const IOMMUFD_CMD_IOAS_ALLOW_IOVAS: u32 = 0x82;
pub const IOMMUFD_CMD_IOAS_COPY: u32 = 0x83;
pub const IOMMUFD_CMD_IOAS_IOVA_RANGES: u32 = 0x84;
pub const IOMMUFD_CMD_IOAS_MAP: u32 = 0x85;
pub const IOMMUFD_CMD_IOAS_UNMAP: u32 = 0x86;
pub const IOMMUFD_CMD_OPTION: u32 = 0x87;
pub const IOMMUFD_CMD_VFIO_IOAS: u32 = 0x88;
pub const IOMMUFD_CMD_HWPT_ALLOC: u32 = 0x89;
pub const IOMMUFD_CMD_GET_HW_INFO: u32 = 0x8a;
pub const IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING: u32 = 0x8b;
pub const IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP: u32 = 0x8c;
pub const IOMMUFD_CMD_HWPT_INVALIDATE: u32 = 0x8d;
pub const IOMMUFD_CMD_FAULT_QUEUE_ALLOC: u32 = 0x8e;
/// Linux 6.13+, not in 6.12.
pub const IOMMUFD_CMD_IOAS_MAP_FILE: u32 = 0x8f;
/// Linux 6.13+, not in 6.12.
pub const IOMMUFD_CMD_VIOMMU_ALLOC: u32 = 0x90;
/// Linux 6.13+, not in 6.12.
pub const IOMMUFD_CMD_VDEVICE_ALLOC: u32 = 0x91;
/// Linux 6.14+, not in 6.12.
pub const IOMMUFD_CMD_IOAS_CHANGE_PROCESS: u32 = 0x92;
/// Linux 6.15+, not in 6.12.
pub const IOMMUFD_CMD_VEVENTQ_ALLOC: u32 = 0x93;
/// Later than 6.15, not in 6.12.
pub const IOMMUFD_CMD_HW_QUEUE_ALLOC: u32 = 0x94;
/// The selftest command's nr: base + 32.
pub const IOMMUFD_CMD_TEST: u32 = IOMMUFD_CMD_BASE + 32;

pub const IOMMU_DESTROY: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY);
pub const IOMMU_IOAS_ALLOC: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC);
pub const IOMMU_IOAS_ALLOW_IOVAS: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOW_IOVAS);
pub const IOMMU_IOAS_COPY: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_COPY);
pub const IOMMU_IOAS_IOVA_RANGES: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES);
pub const IOMMU_IOAS_MAP: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP);
pub const IOMMU_IOAS_UNMAP: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP);
pub const IOMMU_OPTION: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_OPTION);
pub const IOMMU_VFIO_IOAS: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_VFIO_IOAS);
pub const IOMMU_HWPT_ALLOC: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC);
pub const IOMMU_GET_HW_INFO: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO);
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING);
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP);
pub const IOMMU_HWPT_INVALIDATE: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_INVALIDATE);
pub const IOMMU_FAULT_QUEUE_ALLOC: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_FAULT_QUEUE_ALLOC);
/// Linux 6.13+.
pub const IOMMU_IOAS_MAP_FILE: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP_FILE);
/// Linux 6.13+.
pub const IOMMU_VIOMMU_ALLOC: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_VIOMMU_ALLOC);
/// Linux 6.13+.
pub const IOMMU_VDEVICE_ALLOC: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_VDEVICE_ALLOC);
/// Linux 6.14+.
pub const IOMMU_IOAS_CHANGE_PROCESS: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_CHANGE_PROCESS);
/// Linux 6.15+.
pub const IOMMU_VEVENTQ_ALLOC: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_VEVENTQ_ALLOC);
/// After 6.15.
pub const IOMMU_HW_QUEUE_ALLOC: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_HW_QUEUE_ALLOC);
/// The selftest multiplexer, `0x3ba0`.
pub const IOMMU_TEST_CMD: u32 = io(IOMMUFD_TYPE, IOMMUFD_CMD_TEST);

// ---------------------------------------------------------------------------
// Flag and enum values
// ---------------------------------------------------------------------------

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
/// Linux 6.14+, not in 6.12.
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
/// `enum iommu_hwpt_pgfault_perm`.
pub const IOMMU_PGFAULT_PERM_READ: u32 = 1 << 0;
pub const IOMMU_PGFAULT_PERM_WRITE: u32 = 1 << 1;
pub const IOMMU_PGFAULT_PERM_EXEC: u32 = 1 << 2;
pub const IOMMU_PGFAULT_PERM_PRIV: u32 = 1 << 3;
/// `enum iommufd_page_response_code`.
pub const IOMMUFD_PAGE_RESP_SUCCESS: u32 = 0;
pub const IOMMUFD_PAGE_RESP_INVALID: u32 = 1;

// ---------------------------------------------------------------------------
// iommufd structs (include/uapi/linux/iommufd.h, 6.12 layout)
// ---------------------------------------------------------------------------

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
    /// 6.12 layout. From 6.14 the `__reserved` word is split into
    /// `out_max_pasid_log2: u8` + `__reserved: [u8; 3]` (same offsets), and
    /// later `out_data_type` doubles as `in_data_type`.
    pub struct IommuHwInfo ("iommu_hw_info", size 40) {
        size: u32 = 0,
        flags: u32 = 4,
        dev_id: u32 = 8,
        data_len: u32 = 12,
        data_uptr: u64 = 16,
        out_data_type: u32 = 24,
        __reserved: u32 = 28,
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

// ---------------------------------------------------------------------------
// Selftest (drivers/iommu/iommufd/iommufd_test.h)
// ---------------------------------------------------------------------------

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
    pub struct IommuTestAddReserved ("iommu_test_cmd.add_reserved", size 16) {
        start: u64 = 0,
        length: u64 = 8,
    }
}

uapi_struct! {
    /// `mock_domain`: outputs of creating a mock device attached to `id`.
    pub struct IommuTestMockDomain ("iommu_test_cmd.mock_domain", size 12) {
        out_stdev_id: u32 = 0,
        out_hwpt_id: u32 = 4,
        out_idev_id: u32 = 8,
    }
}

uapi_struct! {
    /// `mock_domain_flags`: `mock_domain` plus device flags.
    pub struct IommuTestMockDomainFlags ("iommu_test_cmd.mock_domain_flags", size 16) {
        out_stdev_id: u32 = 0,
        out_hwpt_id: u32 = 4,
        out_idev_id: u32 = 8,
        dev_flags: u32 = 12,
    }
}

uapi_struct! {
    /// `mock_domain_replace`: re-attach mock device `id` to `pt_id`.
    pub struct IommuTestMockDomainReplace ("iommu_test_cmd.mock_domain_replace", size 4) {
        pt_id: u32 = 0,
    }
}

uapi_struct! {
    /// `check_map`: verify the mock domain maps IOVA range to `uptr`.
    pub struct IommuTestCheckMap ("iommu_test_cmd.check_map", size 24) {
        iova: u64 = 0,
        length: u64 = 8,
        uptr: u64 = 16,
    }
}

uapi_struct! {
    /// `check_refs`: verify the pin count of the pages under `uptr`.
    pub struct IommuTestCheckRefs ("iommu_test_cmd.check_refs", size 24) {
        length: u64 = 0,
        uptr: u64 = 8,
        refs: u32 = 16,
    }
}

uapi_struct! {
    /// `create_access`: make an access object on IOAS `id`, returning an fd.
    pub struct IommuTestCreateAccess ("iommu_test_cmd.create_access", size 8) {
        out_access_fd: u32 = 0,
        flags: u32 = 4,
    }
}

uapi_struct! {
    /// `destroy_access_pages`: unpin an earlier `access_pages`.
    pub struct IommuTestDestroyAccessPages ("iommu_test_cmd.destroy_access_pages", size 4) {
        access_pages_id: u32 = 0,
    }
}

uapi_struct! {
    /// `access_pages`: pin pages through access fd `id`.
    pub struct IommuTestAccessPages ("iommu_test_cmd.access_pages", size 32) {
        flags: u32 = 0,
        out_access_pages_id: u32 = 4,
        iova: u64 = 8,
        length: u64 = 16,
        uptr: u64 = 24,
    }
}

uapi_struct! {
    /// `access_rw`: CPU read/write through access fd `id`.
    pub struct IommuTestAccessRw ("iommu_test_cmd.access_rw", size 32) {
        iova: u64 = 0,
        length: u64 = 8,
        uptr: u64 = 16,
        flags: u32 = 24,
    }
}

uapi_struct! {
    /// `memory_limit`: temporary batch memory limit (must be ≥ 12 on 64-bit).
    pub struct IommuTestMemoryLimit ("iommu_test_cmd.memory_limit", size 4) {
        limit: u32 = 0,
    }
}

uapi_struct! {
    /// `access_replace_ioas`: move access `id` to another IOAS.
    pub struct IommuTestAccessReplaceIoas ("iommu_test_cmd.access_replace_ioas", size 4) {
        ioas_id: u32 = 0,
    }
}

uapi_struct! {
    /// `dirty`: set dirty bits in the mock domain from a user bitmap.
    pub struct IommuTestDirty ("iommu_test_cmd.dirty", size 48) {
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
    pub struct IommuTestCheckIotlb ("iommu_test_cmd.check_iotlb", size 8) {
        id: u32 = 0,
        iotlb: u32 = 4,
    }
}

uapi_struct! {
    /// `trigger_iopf`: inject a page fault for a mock device.
    pub struct IommuTestTriggerIopf ("iommu_test_cmd.trigger_iopf", size 24) {
        dev_id: u32 = 0,
        pasid: u32 = 4,
        grpid: u32 = 8,
        perm: u32 = 12,
        addr: u64 = 16,
    }
}

// The union members must fit the union.
const _: () = assert!(IommuTestDirty::SIZE == IOMMU_TEST_CMD_UNION_SIZE);
const _: () = assert!(IommuTestAccessPages::SIZE <= IOMMU_TEST_CMD_UNION_SIZE);
const _: () = assert!(IommuTestAccessRw::SIZE <= IOMMU_TEST_CMD_UNION_SIZE);
const _: () = assert!(core::mem::offset_of!(IommuTestCmd, payload) == IOMMU_TEST_CMD_UNION_OFFSET);

// ---------------------------------------------------------------------------
// Command table and the generic size rules
// ---------------------------------------------------------------------------

/// One entry of the ioctl table (`IOCTL_OP` in Linux's main.c).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandInfo {
    /// The ioctl macro name, e.g. `"IOMMU_IOAS_MAP"`.
    pub name: &'static str,
    /// Full ioctl number, e.g. `0x3b85`.
    pub cmd: u32,
    /// Smallest accepted user `size`: end offset of the struct's last
    /// original field. Smaller → EINVAL.
    pub min_size: u32,
    /// `sizeof` the kernel's struct: the kernel copy's length; user bytes
    /// beyond it must be zero (else E2BIG).
    pub struct_size: u32,
}

const fn info(name: &'static str, nr: u32, min_size: usize, struct_size: usize) -> CommandInfo {
    CommandInfo { name, cmd: io(IOMMUFD_TYPE, nr), min_size: min_size as u32, struct_size: struct_size as u32 }
}

/// The Linux 6.12 iommufd ioctl table, ordered by nr.
pub const COMMANDS: &[CommandInfo] = &[
    info("IOMMU_DESTROY", IOMMUFD_CMD_DESTROY, end_of!(IommuDestroy, id), IommuDestroy::SIZE),
    info("IOMMU_IOAS_ALLOC", IOMMUFD_CMD_IOAS_ALLOC, end_of!(IommuIoasAlloc, out_ioas_id), IommuIoasAlloc::SIZE),
    info(
        "IOMMU_IOAS_ALLOW_IOVAS",
        IOMMUFD_CMD_IOAS_ALLOW_IOVAS,
        end_of!(IommuIoasAllowIovas, allowed_iovas),
        IommuIoasAllowIovas::SIZE,
    ),
    info("IOMMU_IOAS_COPY", IOMMUFD_CMD_IOAS_COPY, end_of!(IommuIoasCopy, src_iova), IommuIoasCopy::SIZE),
    info(
        "IOMMU_IOAS_IOVA_RANGES",
        IOMMUFD_CMD_IOAS_IOVA_RANGES,
        end_of!(IommuIoasIovaRanges, out_iova_alignment),
        IommuIoasIovaRanges::SIZE,
    ),
    info("IOMMU_IOAS_MAP", IOMMUFD_CMD_IOAS_MAP, end_of!(IommuIoasMap, iova), IommuIoasMap::SIZE),
    info("IOMMU_IOAS_UNMAP", IOMMUFD_CMD_IOAS_UNMAP, end_of!(IommuIoasUnmap, length), IommuIoasUnmap::SIZE),
    info("IOMMU_OPTION", IOMMUFD_CMD_OPTION, end_of!(IommuOption, val64), IommuOption::SIZE),
    info("IOMMU_VFIO_IOAS", IOMMUFD_CMD_VFIO_IOAS, end_of!(IommuVfioIoas, __reserved), IommuVfioIoas::SIZE),
    info("IOMMU_HWPT_ALLOC", IOMMUFD_CMD_HWPT_ALLOC, end_of!(IommuHwptAlloc, __reserved), IommuHwptAlloc::SIZE),
    info("IOMMU_GET_HW_INFO", IOMMUFD_CMD_GET_HW_INFO, end_of!(IommuHwInfo, __reserved), IommuHwInfo::SIZE),
    info(
        "IOMMU_HWPT_SET_DIRTY_TRACKING",
        IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING,
        end_of!(IommuHwptSetDirtyTracking, __reserved),
        IommuHwptSetDirtyTracking::SIZE,
    ),
    info(
        "IOMMU_HWPT_GET_DIRTY_BITMAP",
        IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP,
        end_of!(IommuHwptGetDirtyBitmap, data),
        IommuHwptGetDirtyBitmap::SIZE,
    ),
    info(
        "IOMMU_HWPT_INVALIDATE",
        IOMMUFD_CMD_HWPT_INVALIDATE,
        end_of!(IommuHwptInvalidate, __reserved),
        IommuHwptInvalidate::SIZE,
    ),
    info(
        "IOMMU_FAULT_QUEUE_ALLOC",
        IOMMUFD_CMD_FAULT_QUEUE_ALLOC,
        end_of!(IommuFaultAlloc, out_fault_fd),
        IommuFaultAlloc::SIZE,
    ),
];

/// The selftest entry (present when the kernel has `CONFIG_IOMMUFD_TEST`,
/// here when the `selftest` feature is on).
pub const TEST_COMMAND: CommandInfo =
    info("IOMMU_TEST_CMD", IOMMUFD_CMD_TEST, end_of!(IommuTestCmd, last), IommuTestCmd::SIZE);

/// Table entries of commands newer than 6.12, for reference only: they are
/// *not* accepted by [`command_info`] / [`take_command`].
pub const NEWER_COMMANDS: &[CommandInfo] = &[
    info("IOMMU_IOAS_MAP_FILE", IOMMUFD_CMD_IOAS_MAP_FILE, end_of!(IommuIoasMapFile, iova), IommuIoasMapFile::SIZE),
    info(
        "IOMMU_VIOMMU_ALLOC",
        IOMMUFD_CMD_VIOMMU_ALLOC,
        end_of!(IommuViommuAlloc, out_viommu_id),
        IommuViommuAlloc::SIZE,
    ),
    info(
        "IOMMU_VDEVICE_ALLOC",
        IOMMUFD_CMD_VDEVICE_ALLOC,
        end_of!(IommuVdeviceAlloc, virt_id),
        IommuVdeviceAlloc::SIZE,
    ),
    info(
        "IOMMU_IOAS_CHANGE_PROCESS",
        IOMMUFD_CMD_IOAS_CHANGE_PROCESS,
        end_of!(IommuIoasChangeProcess, __reserved),
        IommuIoasChangeProcess::SIZE,
    ),
];

/// Number of slots in Linux 6.12's ioctl table: up to FAULT_QUEUE_ALLOC, or
/// up to IOMMU_TEST_CMD (with holes 0x8f..=0x9f) with the selftest.
pub const IOCTL_TABLE_LEN: u32 = if cfg!(feature = "selftest") {
    IOMMUFD_CMD_TEST - IOMMUFD_CMD_BASE + 1
} else {
    IOMMUFD_CMD_FAULT_QUEUE_ALLOC - IOMMUFD_CMD_BASE + 1
};

/// Whether `cmd`'s nr falls inside the iommufd ioctl table (step 1 of the
/// module docs). If not, Linux sends it to the VFIO compat code instead.
pub fn in_iommufd_range(cmd: u32) -> bool {
    let nr = ioc_nr(cmd);
    nr >= IOMMUFD_CMD_BASE && nr - IOMMUFD_CMD_BASE < IOCTL_TABLE_LEN
}

/// The table entry whose full ioctl number is exactly `cmd`, if Linux 6.12
/// knows it (the selftest entry only with the `selftest` feature).
pub fn command_info(cmd: u32) -> Option<CommandInfo> {
    if cfg!(feature = "selftest") && cmd == TEST_COMMAND.cmd {
        return Some(TEST_COMMAND);
    }
    COMMANDS.iter().copied().find(|c| c.cmd == cmd)
}

/// The name of any known iommufd, selftest or VFIO ioctl number (all
/// versions), for logs.
pub fn command_name(cmd: u32) -> Option<&'static str> {
    COMMANDS
        .iter()
        .chain(NEWER_COMMANDS.iter())
        .chain(core::iter::once(&TEST_COMMAND))
        .find(|c| c.cmd == cmd)
        .map(|c| c.name)
        .or_else(|| vfio::command_name(cmd))
}

/// The user-declared size: the first `u32` of the buffer, or `None` if the
/// buffer is too short to hold it (a fault reading it).
pub fn user_size(buf: &[u8]) -> Option<u32> {
    let b: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

/// Linux 6.12's copy-in of an iommufd command, see the module docs for the
/// exact order. On success returns the kernel copy: `struct_size` bytes,
/// the first `min(size, struct_size)` from the user, the rest zero.
///
/// Errors: ENOTTY (not an iommufd command of 6.12; note that VFIO compat
/// numbers also give ENOTTY here — dispatch those with [`vfio`] first),
/// EFAULT (buffer shorter than 4 bytes, or than the bytes that must be
/// read), EINVAL (`size < min_size`), E2BIG (non-zero byte in
/// `[struct_size, size)`).
///
/// Fault model: `buf.len()` is where readable memory ends. The trailing
/// zero check scans from `struct_size` upwards and reports E2BIG on the
/// first non-zero byte it can read, EFAULT if it reaches unreadable memory
/// first (Linux scans in machine words, which only differs when a non-zero
/// byte shares a word with unreadable memory — impossible with page-granular
/// faults).
pub fn take_command(cmd: u32, buf: &[u8]) -> Result<Vec<u8>, Errno> {
    if !in_iommufd_range(cmd) {
        return Err(Errno::ENOTTY);
    }
    let size = user_size(buf).ok_or(Errno::EFAULT)? as usize;
    let op = command_info(cmd).ok_or(Errno::ENOTTY)?;
    if size < op.min_size as usize {
        return Err(Errno::EINVAL);
    }
    copy_struct_from_user(op.struct_size as usize, buf, size)
}

/// Model of Linux's `copy_struct_from_user(dst, ksize, src, usize)` with
/// `src` readable for `user.len()` bytes. Returns the `ksize`-byte kernel
/// copy.
pub fn copy_struct_from_user(ksize: usize, user: &[u8], usize_: usize) -> Result<Vec<u8>, Errno> {
    let copy = usize_.min(ksize);
    if usize_ > ksize {
        let readable_end = usize_.min(user.len());
        if user.get(ksize..readable_end).is_some_and(|t| t.iter().any(|&b| b != 0)) {
            return Err(Errno::E2BIG);
        }
        if user.len() < usize_ {
            return Err(Errno::EFAULT);
        }
    }
    let src = user.get(..copy).ok_or(Errno::EFAULT)?;
    let mut k = vec![0u8; ksize];
    k[..copy].copy_from_slice(src);
    Ok(k)
}

/// Linux's `iommufd_ucmd_respond`: copies `min(user_size, kernel.len())`
/// bytes of the kernel struct to the start of the user buffer. After a
/// successful [`take_command`] on the same buffer this always fits; if it
/// does not, only the bytes that fit are written (use [`give_back_checked`]
/// to get the EFAULT Linux would return).
pub fn give_back(kernel: &[u8], user_size: u32, buf: &mut [u8]) {
    let n = (user_size as usize).min(kernel.len()).min(buf.len());
    buf[..n].copy_from_slice(&kernel[..n]);
}

/// [`give_back`], reporting EFAULT (and writing nothing) when the user
/// buffer is shorter than the bytes to copy.
pub fn give_back_checked(kernel: &[u8], user_size: u32, buf: &mut [u8]) -> Result<(), Errno> {
    let n = (user_size as usize).min(kernel.len());
    let dst = buf.get_mut(..n).ok_or(Errno::EFAULT)?;
    dst.copy_from_slice(&kernel[..n]);
    Ok(())
}

// ---------------------------------------------------------------------------
// VFIO type1 compatibility
// ---------------------------------------------------------------------------

/// The VFIO container ioctls iommufd emulates (`/dev/vfio/vfio` backed by
/// iommufd, `drivers/iommu/iommufd/vfio_compat.c`) and their structs
/// (`include/uapi/linux/vfio.h`).
///
/// # Rules (Linux 6.12, `iommufd_vfio_ioctl`)
///
/// These numbers have nr < 0x80, so `iommufd_fops_ioctl` routes them here
/// without reading any size. The structs start with `argsz` (not `size`)
/// and there is **no** trailing-zero (E2BIG) check: the kernel reads and
/// writes only a fixed prefix (`minsz`) and ignores the rest.
///
/// * `VFIO_GET_API_VERSION`: returns [`VFIO_API_VERSION`] (0) as the ioctl
///   result; the argument is ignored.
/// * `VFIO_CHECK_EXTENSION` (argument is the extension number, not a
///   pointer; `iommufd_vfio_check_extension`): TYPE1, TYPE1v2 and
///   UNMAP_ALL → 1; DMA_CC_IOMMU → 1 if every domain of the compat IOAS
///   enforces cache coherency, else 0, and ENODEV if there is no compat
///   IOAS; TYPE1_NESTING, UPDATE_VADDR and anything else → 0.
/// * `VFIO_SET_IOMMU` (argument is the type; `iommufd_vfio_set_iommu`):
///   not TYPE1/TYPE1v2 → EINVAL; no compat IOAS → ENODEV; TYPE1 disables
///   huge pages on the IOAS (so any sub-range can be unmapped).
/// * `VFIO_IOMMU_GET_INFO` (`iommufd_vfio_iommu_get_info`): read
///   [`GET_INFO_MINSZ`] (16) bytes, fault → EFAULT; `argsz < 16` → EINVAL;
///   no compat IOAS → ENODEV. Output: `flags = PGSIZES | CAPS`,
///   `iova_pgsizes`, a capability chain placed right after the 24-byte
///   struct — first DMA_AVAIL (12 bytes, `avail = u32::MAX`) at offset 24,
///   then IOVA_RANGE (16 + 16·n bytes) at offset 36 — each cap written
///   only if it fits in `argsz`, `next` links written when they fit;
///   `cap_offset = 24` only if all caps fit, else 0; `argsz` set to the
///   total size needed; then `min(argsz, 24)` bytes of the struct are
///   written back (fault → EFAULT).
/// * `VFIO_IOMMU_MAP_DMA` (`iommufd_vfio_map_dma`): read
///   [`MAP_DMA_MINSZ`] (32) bytes, fault → EFAULT; `argsz < 32` **or**
///   flags outside READ|WRITE → **EINVAL** (VADDR is refused); no compat
///   IOAS → ENODEV; maps at the fixed `iova`. Nothing is written back.
/// * `VFIO_IOMMU_UNMAP_DMA` (`iommufd_vfio_unmap_dma`): read
///   [`UNMAP_DMA_MINSZ`] (24) bytes, fault → EFAULT; `argsz < 24` or flags
///   outside UNMAP_ALL → **EINVAL** (GET_DIRTY_BITMAP and VADDR refused);
///   no compat IOAS → ENODEV; UNMAP_ALL with non-zero iova or size →
///   EINVAL; otherwise unmap; `size` is replaced by the bytes unmapped and
///   the 24-byte prefix written back even when the unmap failed (fault →
///   EFAULT).
/// * `VFIO_IOMMU_DIRTY_PAGES` and every other number → ENOTTY.
pub mod vfio {
    use super::{IOMMUFD_TYPE, LeField, io};
    use alloc::vec;
    use alloc::vec::Vec;

    /// VFIO's first ioctl nr: 100 (0x64).
    pub const VFIO_BASE: u32 = 100;
    /// The VFIO API version `VFIO_GET_API_VERSION` returns.
    pub const VFIO_API_VERSION: i32 = 0;

    pub const VFIO_GET_API_VERSION: u32 = io(IOMMUFD_TYPE, VFIO_BASE);
    pub const VFIO_CHECK_EXTENSION: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 1);
    pub const VFIO_SET_IOMMU: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 2);
    pub const VFIO_IOMMU_GET_INFO: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 12);
    pub const VFIO_IOMMU_MAP_DMA: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 13);
    pub const VFIO_IOMMU_UNMAP_DMA: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 14);
    pub const VFIO_IOMMU_ENABLE: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 15);
    pub const VFIO_IOMMU_DISABLE: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 16);
    /// Not emulated by iommufd (ENOTTY).
    pub const VFIO_IOMMU_DIRTY_PAGES: u32 = io(IOMMUFD_TYPE, VFIO_BASE + 17);

    /// Extension / IOMMU type numbers (`VFIO_CHECK_EXTENSION`, `VFIO_SET_IOMMU`).
    pub const VFIO_TYPE1_IOMMU: u32 = 1;
    pub const VFIO_SPAPR_TCE_IOMMU: u32 = 2;
    #[allow(non_upper_case_globals)]
    pub const VFIO_TYPE1v2_IOMMU: u32 = 3;
    pub const VFIO_DMA_CC_IOMMU: u32 = 4;
    pub const VFIO_EEH: u32 = 5;
    pub const VFIO_TYPE1_NESTING_IOMMU: u32 = 6;
    pub const VFIO_SPAPR_TCE_V2_IOMMU: u32 = 7;
    pub const VFIO_NOIOMMU_IOMMU: u32 = 8;
    pub const VFIO_UNMAP_ALL: u32 = 9;
    pub const VFIO_UPDATE_VADDR: u32 = 10;

    /// `vfio_iommu_type1_info.flags`.
    pub const VFIO_IOMMU_INFO_PGSIZES: u32 = 1 << 0;
    pub const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;
    /// Capability ids (all version 1).
    pub const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;
    pub const VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION: u16 = 2;
    pub const VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: u16 = 3;

    /// `vfio_iommu_type1_dma_map.flags`.
    pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
    pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
    pub const VFIO_DMA_MAP_FLAG_VADDR: u32 = 1 << 2;
    /// `vfio_iommu_type1_dma_unmap.flags`.
    pub const VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
    pub const VFIO_DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;
    pub const VFIO_DMA_UNMAP_FLAG_VADDR: u32 = 1 << 2;

    /// Flags iommufd's MAP_DMA accepts.
    pub const MAP_DMA_SUPPORTED_FLAGS: u32 = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
    /// Flags iommufd's UNMAP_DMA accepts.
    pub const UNMAP_DMA_SUPPORTED_FLAGS: u32 = VFIO_DMA_UNMAP_FLAG_ALL;

    uapi_struct! {
        /// VFIO_IOMMU_GET_INFO argument.
        pub struct VfioIommuType1Info ("vfio_iommu_type1_info", size 24) {
            argsz: u32 = 0,
            flags: u32 = 4,
            iova_pgsizes: u64 = 8,
            cap_offset: u32 = 16,
            pad: u32 = 20,
        }
    }

    uapi_struct! {
        /// Header of each capability in the GET_INFO chain; `next` is the
        /// offset of the next one from the start of the info struct, 0 ends.
        pub struct VfioInfoCapHeader ("vfio_info_cap_header", size 8) {
            id: u16 = 0,
            version: u16 = 2,
            next: u32 = 4,
        }
    }

    uapi_struct! {
        /// One inclusive range `[start, end]` of the IOVA_RANGE capability.
        pub struct VfioIovaRange ("vfio_iova_range", size 16) {
            start: u64 = 0,
            end: u64 = 8,
        }
    }

    uapi_struct! {
        /// IOVA_RANGE capability, followed by `nr_iovas` [`VfioIovaRange`]s.
        pub struct VfioIommuType1InfoCapIovaRange ("vfio_iommu_type1_info_cap_iova_range", size 16) {
            header: VfioInfoCapHeader = 0,
            nr_iovas: u32 = 8,
            reserved: u32 = 12,
        }
    }

    uapi_struct! {
        /// MIGRATION capability (not produced by iommufd).
        pub struct VfioIommuType1InfoCapMigration ("vfio_iommu_type1_info_cap_migration", size 32) {
            header: VfioInfoCapHeader = 0,
            flags: u32 = 8,
            pgsize_bitmap: u64 = 16,
            max_dirty_bitmap_size: u64 = 24,
        }
    }

    uapi_struct! {
        /// DMA_AVAIL capability (iommufd reports `avail = u32::MAX`).
        pub struct VfioIommuType1InfoDmaAvail ("vfio_iommu_type1_info_dma_avail", size 12) {
            header: VfioInfoCapHeader = 0,
            avail: u32 = 8,
        }
    }

    uapi_struct! {
        /// VFIO_IOMMU_MAP_DMA argument.
        pub struct VfioIommuType1DmaMap ("vfio_iommu_type1_dma_map", size 32) {
            argsz: u32 = 0,
            flags: u32 = 4,
            vaddr: u64 = 8,
            iova: u64 = 16,
            size: u64 = 24,
        }
    }

    uapi_struct! {
        /// VFIO_IOMMU_UNMAP_DMA argument (a dirty bitmap may follow; iommufd
        /// refuses that flag).
        pub struct VfioIommuType1DmaUnmap ("vfio_iommu_type1_dma_unmap", size 24) {
            argsz: u32 = 0,
            flags: u32 = 4,
            iova: u64 = 8,
            size: u64 = 16,
        }
    }

    uapi_struct! {
        /// Dirty bitmap descriptor following an UNMAP_DMA (not used by iommufd).
        pub struct VfioBitmap ("vfio_bitmap", size 24) {
            pgsize: u64 = 0,
            size: u64 = 8,
            data: u64 = 16,
        }
    }

    /// Bytes GET_INFO reads: up to the end of `iova_pgsizes`.
    pub const GET_INFO_MINSZ: usize = end_of!(VfioIommuType1Info, iova_pgsizes);
    /// Bytes MAP_DMA reads: up to the end of `size` (the whole struct).
    pub const MAP_DMA_MINSZ: usize = end_of!(VfioIommuType1DmaMap, size);
    /// Bytes UNMAP_DMA reads and writes back: up to the end of `size`.
    pub const UNMAP_DMA_MINSZ: usize = end_of!(VfioIommuType1DmaUnmap, size);
    const _: () = assert!(GET_INFO_MINSZ == 16 && MAP_DMA_MINSZ == 32 && UNMAP_DMA_MINSZ == 24);

    /// The name of a VFIO container ioctl number.
    pub fn command_name(cmd: u32) -> Option<&'static str> {
        Some(match cmd {
            VFIO_GET_API_VERSION => "VFIO_GET_API_VERSION",
            VFIO_CHECK_EXTENSION => "VFIO_CHECK_EXTENSION",
            VFIO_SET_IOMMU => "VFIO_SET_IOMMU",
            VFIO_IOMMU_GET_INFO => "VFIO_IOMMU_GET_INFO",
            VFIO_IOMMU_MAP_DMA => "VFIO_IOMMU_MAP_DMA",
            VFIO_IOMMU_UNMAP_DMA => "VFIO_IOMMU_UNMAP_DMA",
            VFIO_IOMMU_ENABLE => "VFIO_IOMMU_ENABLE",
            VFIO_IOMMU_DISABLE => "VFIO_IOMMU_DISABLE",
            VFIO_IOMMU_DIRTY_PAGES => "VFIO_IOMMU_DIRTY_PAGES",
            _ => return None,
        })
    }

    /// Whether iommufd 6.12 answers this VFIO number (the other VFIO
    /// numbers give ENOTTY).
    pub fn is_emulated(cmd: u32) -> bool {
        matches!(
            cmd,
            VFIO_GET_API_VERSION
                | VFIO_CHECK_EXTENSION
                | VFIO_SET_IOMMU
                | VFIO_IOMMU_GET_INFO
                | VFIO_IOMMU_MAP_DMA
                | VFIO_IOMMU_UNMAP_DMA
        )
    }

    /// The fixed-prefix read the compat handlers start with: `minsz` bytes
    /// must be readable (else EFAULT); returns them. The caller then checks
    /// `argsz >= minsz` (EINVAL) together with the flags.
    pub fn read_prefix(buf: &[u8], minsz: usize) -> Result<Vec<u8>, crate::errno::Errno> {
        let src = buf.get(..minsz).ok_or(crate::errno::Errno::EFAULT)?;
        let mut v = vec![0u8; minsz];
        v.copy_from_slice(src);
        Ok(v)
    }

    /// `argsz` of a VFIO argument (first u32, little-endian).
    pub fn argsz(prefix: &[u8]) -> u32 {
        u32::get(prefix, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::vfio::*;
    use super::*;
    use super::{command_info, command_name};

    #[test]
    fn ioctl_numbers() {
        assert_eq!(IOMMUFD_TYPE, 0x3b);
        assert_eq!(IOMMU_DESTROY, 0x3b80);
        assert_eq!(IOMMU_IOAS_ALLOC, 0x3b81);
        assert_eq!(IOMMU_IOAS_ALLOW_IOVAS, 0x3b82);
        assert_eq!(IOMMU_IOAS_COPY, 0x3b83);
        assert_eq!(IOMMU_IOAS_IOVA_RANGES, 0x3b84);
        assert_eq!(IOMMU_IOAS_MAP, 0x3b85);
        assert_eq!(IOMMU_IOAS_UNMAP, 0x3b86);
        assert_eq!(IOMMU_OPTION, 0x3b87);
        assert_eq!(IOMMU_VFIO_IOAS, 0x3b88);
        assert_eq!(IOMMU_HWPT_ALLOC, 0x3b89);
        assert_eq!(IOMMU_GET_HW_INFO, 0x3b8a);
        assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING, 0x3b8b);
        assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP, 0x3b8c);
        assert_eq!(IOMMU_HWPT_INVALIDATE, 0x3b8d);
        assert_eq!(IOMMU_FAULT_QUEUE_ALLOC, 0x3b8e);
        assert_eq!(IOMMU_IOAS_MAP_FILE, 0x3b8f);
        assert_eq!(IOMMU_TEST_CMD, 0x3ba0);
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3b65);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
    }

    #[test]
    fn table_names_and_sizes() {
        let expect: &[(u32, &str, u32, u32)] = &[
            (0x3b80, "IOMMU_DESTROY", 8, 8),
            (0x3b81, "IOMMU_IOAS_ALLOC", 12, 12),
            (0x3b82, "IOMMU_IOAS_ALLOW_IOVAS", 24, 24),
            (0x3b83, "IOMMU_IOAS_COPY", 40, 40),
            (0x3b84, "IOMMU_IOAS_IOVA_RANGES", 32, 32),
            (0x3b85, "IOMMU_IOAS_MAP", 40, 40),
            (0x3b86, "IOMMU_IOAS_UNMAP", 24, 24),
            (0x3b87, "IOMMU_OPTION", 24, 24),
            (0x3b88, "IOMMU_VFIO_IOAS", 12, 12),
            (0x3b89, "IOMMU_HWPT_ALLOC", 24, 48),
            (0x3b8a, "IOMMU_GET_HW_INFO", 32, 40),
            (0x3b8b, "IOMMU_HWPT_SET_DIRTY_TRACKING", 16, 16),
            (0x3b8c, "IOMMU_HWPT_GET_DIRTY_BITMAP", 48, 48),
            (0x3b8d, "IOMMU_HWPT_INVALIDATE", 32, 32),
            (0x3b8e, "IOMMU_FAULT_QUEUE_ALLOC", 16, 16),
        ];
        assert_eq!(COMMANDS.len(), expect.len());
        for &(cmd, name, min, size) in expect {
            let i = command_info(cmd).unwrap();
            assert_eq!((i.cmd, i.name, i.min_size, i.struct_size), (cmd, name, min, size));
            assert_eq!(command_name(cmd), Some(name));
        }
        assert_eq!((TEST_COMMAND.cmd, TEST_COMMAND.min_size, TEST_COMMAND.struct_size), (0x3ba0, 68, 72));
        assert_eq!(command_info(IOMMU_TEST_CMD).is_some(), cfg!(feature = "selftest"));
        assert_eq!(command_name(IOMMU_TEST_CMD), Some("IOMMU_TEST_CMD"));
        // Newer than 6.12: named, but not in the table.
        assert_eq!(command_name(IOMMU_IOAS_MAP_FILE), Some("IOMMU_IOAS_MAP_FILE"));
        assert!(command_info(IOMMU_IOAS_MAP_FILE).is_none());
        let n = &NEWER_COMMANDS[1];
        assert_eq!((n.cmd, n.min_size, n.struct_size), (0x3b90, 24, 40));
        for (cmd, name) in [
            (0x3b64, "VFIO_GET_API_VERSION"),
            (0x3b65, "VFIO_CHECK_EXTENSION"),
            (0x3b66, "VFIO_SET_IOMMU"),
            (0x3b70, "VFIO_IOMMU_GET_INFO"),
            (0x3b71, "VFIO_IOMMU_MAP_DMA"),
            (0x3b72, "VFIO_IOMMU_UNMAP_DMA"),
        ] {
            assert_eq!(command_name(cmd), Some(name));
            assert!(vfio::is_emulated(cmd));
            assert!(!in_iommufd_range(cmd));
        }
        assert!(!vfio::is_emulated(VFIO_IOMMU_DIRTY_PAGES));
        assert_eq!(command_name(0x3b7f), None);
    }

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

    #[test]
    fn short_read_and_write_are_prefix_copies() {
        let m = IommuIoasUnmap { size: 24, ioas_id: 2, iova: 0x1000, length: 0x0102_0304_0506_0708 };
        let mut short = [0u8; 20];
        m.write(&mut short);
        assert_eq!(&short[..], &m.to_bytes()[..20]);
        let r = IommuIoasUnmap::read(&short);
        assert_eq!(r.length, 0x0506_0708);
        assert_eq!(r.iova, 0x1000);
    }

    fn user(size: u32, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[..4].copy_from_slice(&size.to_le_bytes());
        v
    }

    #[test]
    fn take_exact() {
        let mut u =
            IommuIoasMap { size: 40, flags: 6, ioas_id: 1, user_va: 0x5000, length: 0x1000, ..Default::default() }
                .to_bytes();
        let k = take_command(IOMMU_IOAS_MAP, &u).unwrap();
        assert_eq!(k, u);
        let mut km = IommuIoasMap::read(&k);
        km.iova = 0x4000;
        let mut kb = k.clone();
        km.write(&mut kb);
        give_back(&kb, 40, &mut u);
        assert_eq!(IommuIoasMap::read(&u).iova, 0x4000);
    }

    #[test]
    fn take_too_small() {
        assert_eq!(take_command(IOMMU_IOAS_MAP, &user(39, 64)), Err(Errno::EINVAL));
        assert_eq!(take_command(IOMMU_IOAS_MAP, &user(0, 64)), Err(Errno::EINVAL));
        // HWPT_ALLOC accepts its pre-fault-queue size (24) and zero-fills the rest.
        let mut u = user(24, 24);
        u[8..12].copy_from_slice(&3u32.to_le_bytes());
        let k = take_command(IOMMU_HWPT_ALLOC, &u).unwrap();
        assert_eq!(k.len(), 48);
        let h = IommuHwptAlloc::read(&k);
        assert_eq!((h.size, h.dev_id, h.fault_id, h.data_uptr), (24, 3, 0, 0));
        assert_eq!(take_command(IOMMU_HWPT_ALLOC, &user(23, 64)), Err(Errno::EINVAL));
        assert_eq!(take_command(IOMMU_GET_HW_INFO, &user(31, 64)), Err(Errno::EINVAL));
        assert!(take_command(IOMMU_GET_HW_INFO, &user(32, 64)).is_ok());
    }

    #[test]
    fn take_larger_zero_tail() {
        let mut u = user(64, 64);
        u[4..8].copy_from_slice(&9u32.to_le_bytes());
        let k = take_command(IOMMU_DESTROY, &u).unwrap();
        assert_eq!(k.len(), 8);
        assert_eq!(IommuDestroy::read(&k).id, 9);
        // Extra readable memory past `size` is never looked at.
        let mut u = user(8, 100);
        u[50] = 1;
        assert!(take_command(IOMMU_DESTROY, &u).is_ok());
    }

    #[test]
    fn take_larger_nonzero_tail() {
        let mut u = user(48, 48);
        u[47] = 1;
        assert_eq!(take_command(IOMMU_IOAS_MAP, &u), Err(Errno::E2BIG));
        u[47] = 0;
        u[40] = 0x80;
        assert_eq!(take_command(IOMMU_IOAS_MAP, &u), Err(Errno::E2BIG));
        u[40] = 0;
        u[39] = 0xff; // inside the struct: fine
        assert!(take_command(IOMMU_IOAS_MAP, &u).is_ok());
    }

    #[test]
    fn take_beyond_buffer() {
        // size larger than the memory: fault.
        assert_eq!(take_command(IOMMU_IOAS_MAP, &user(40, 39)), Err(Errno::EFAULT));
        assert_eq!(take_command(IOMMU_IOAS_MAP, &user(4096, 40)), Err(Errno::EFAULT));
        // Non-zero tail byte before the fault point wins (E2BIG).
        let mut u = user(4096, 48);
        u[45] = 1;
        assert_eq!(take_command(IOMMU_IOAS_MAP, &u), Err(Errno::E2BIG));
        // Cannot even read `size`.
        assert_eq!(take_command(IOMMU_IOAS_MAP, &[0u8; 3]), Err(Errno::EFAULT));
        assert_eq!(take_command(IOMMU_IOAS_MAP, &[]), Err(Errno::EFAULT));
        // size check comes before the copy: too small and short → EINVAL.
        assert_eq!(take_command(IOMMU_IOAS_MAP, &user(8, 8)), Err(Errno::EINVAL));
    }

    #[test]
    fn take_unknown() {
        // Outside the table: ENOTTY without touching memory.
        assert_eq!(take_command(0x3b7f, &[]), Err(Errno::ENOTTY));
        assert_eq!(take_command(VFIO_IOMMU_MAP_DMA, &[]), Err(Errno::ENOTTY));
        assert_eq!(take_command(0x3bff, &[]), Err(Errno::ENOTTY));
        // 6.13 command: ENOTTY on 6.12 (after reading size when in range).
        let r = take_command(IOMMU_IOAS_MAP_FILE, &user(40, 40));
        assert_eq!(r, Err(Errno::ENOTTY));
        // nr in range but wrong type or direction bits: size is read first.
        assert_eq!(take_command(0x1280, &user(8, 8)), Err(Errno::ENOTTY));
        assert_eq!(take_command(0xc008_3b80, &user(8, 8)), Err(Errno::ENOTTY));
        assert_eq!(take_command(0x1280, &[]), Err(Errno::EFAULT));
        // A hole in the table.
        if cfg!(feature = "selftest") {
            assert!(in_iommufd_range(0x3b95));
            assert_eq!(take_command(0x3b95, &[]), Err(Errno::EFAULT));
            assert_eq!(take_command(0x3b95, &user(8, 8)), Err(Errno::ENOTTY));
            assert!(!in_iommufd_range(0x3ba1));
        } else {
            assert!(!in_iommufd_range(IOMMU_TEST_CMD));
            assert_eq!(take_command(IOMMU_TEST_CMD, &[]), Err(Errno::ENOTTY));
        }
    }

    #[cfg(feature = "selftest")]
    #[test]
    fn take_test_cmd() {
        assert_eq!(take_command(IOMMU_TEST_CMD, &user(67, 72)), Err(Errno::EINVAL));
        let k = take_command(IOMMU_TEST_CMD, &user(68, 68)).unwrap();
        assert_eq!(k.len(), 72);
    }

    #[test]
    fn give_back_min_of_sizes() {
        let kernel = IommuIoasAlloc { size: 12, flags: 0, out_ioas_id: 0x55 }.to_bytes();
        // User declared a larger struct: only 12 bytes written.
        let mut u = vec![0xeeu8; 20];
        give_back(&kernel, 20, &mut u);
        assert_eq!(&u[..12], &kernel[..]);
        assert_eq!(&u[12..], &[0xee; 8]);
        // Checked variant reports a fault.
        let mut small = vec![0u8; 8];
        assert_eq!(give_back_checked(&kernel, 12, &mut small), Err(Errno::EFAULT));
        assert_eq!(give_back_checked(&kernel, 8, &mut small), Ok(()));
    }

    #[test]
    fn vfio_prefix() {
        assert_eq!(GET_INFO_MINSZ, 16);
        assert_eq!(MAP_DMA_MINSZ, 32);
        assert_eq!(UNMAP_DMA_MINSZ, 24);
        assert_eq!(vfio::read_prefix(&[0u8; 31], MAP_DMA_MINSZ), Err(Errno::EFAULT));
        let m = VfioIommuType1DmaMap { argsz: 32, flags: 3, vaddr: 1, iova: 2, size: 3 }.to_bytes();
        let p = vfio::read_prefix(&m, MAP_DMA_MINSZ).unwrap();
        assert_eq!(vfio::argsz(&p), 32);
    }
}
