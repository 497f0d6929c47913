//! The ioctl numbers and the command table: which numbers are served
//! (Linux 6.12's, plus IOAS_MAP_FILE of 6.13 and IOAS_CHANGE_PROCESS of
//! 6.14), their names, and for each its minimum and full argument size.

use super::*;

// ioctl numbers

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

// The command table

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

/// The served iommufd ioctl table, ordered by nr: Linux 6.12's, plus
/// IOAS_MAP_FILE (6.13) and IOAS_CHANGE_PROCESS (6.14), with the minimum
/// sizes those kernels give them. The numbers between them (VIOMMU_ALLOC,
/// VDEVICE_ALLOC) are holes: ENOTTY.
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
    info("IOMMU_IOAS_MAP_FILE", IOMMUFD_CMD_IOAS_MAP_FILE, end_of!(IommuIoasMapFile, iova), IommuIoasMapFile::SIZE),
    info(
        "IOMMU_IOAS_CHANGE_PROCESS",
        IOMMUFD_CMD_IOAS_CHANGE_PROCESS,
        end_of!(IommuIoasChangeProcess, __reserved),
        IommuIoasChangeProcess::SIZE,
    ),
];

/// The selftest entry (present when the kernel has `CONFIG_IOMMUFD_TEST`,
/// here when the `selftest` feature is on).
pub const TEST_COMMAND: CommandInfo =
    info("IOMMU_TEST_CMD", IOMMUFD_CMD_TEST, end_of!(IommuTestCmd, last), IommuTestCmd::SIZE);

/// Table entries of commands newer than 6.12 that are not served, for
/// reference only: they are *not* accepted by [`command_info`] /
/// [`take_command`].
pub const NEWER_COMMANDS: &[CommandInfo] = &[
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
];

/// Number of slots in the served ioctl table: up to IOAS_CHANGE_PROCESS
/// (holes at 0x90 and 0x91), or up to IOMMU_TEST_CMD (holes 0x90, 0x91
/// and 0x93..=0x9f) with the selftest. (Linux 6.12's ended at
/// FAULT_QUEUE_ALLOC, so 0x8f..=0x92 went to the VFIO compat code there
/// without the selftest; ENOTTY either way for the holes.)
pub const IOCTL_TABLE_LEN: u32 = if cfg!(feature = "selftest") {
    IOMMUFD_CMD_TEST - IOMMUFD_CMD_BASE + 1
} else {
    IOMMUFD_CMD_IOAS_CHANGE_PROCESS - IOMMUFD_CMD_BASE + 1
};

/// The table entry whose full ioctl number is exactly `cmd`, if served
/// (the selftest entry only with the `selftest` feature).
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

#[cfg(test)]
mod tests {
    use crate::uapi::vfio::{self, *};
    use crate::uapi::*;
    use crate::uapi::{command_info, command_name};

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
            (0x3b8f, "IOMMU_IOAS_MAP_FILE", 40, 40),
            (0x3b92, "IOMMU_IOAS_CHANGE_PROCESS", 8, 8),
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
        // Newer than 6.12 and not served: named, but not in the table.
        assert_eq!(command_name(IOMMU_VIOMMU_ALLOC), Some("IOMMU_VIOMMU_ALLOC"));
        assert!(command_info(IOMMU_VIOMMU_ALLOC).is_none());
        let n = &NEWER_COMMANDS[0];
        assert_eq!((n.cmd, n.min_size, n.struct_size), (0x3b90, 24, 40));
        assert_eq!(IOMMU_IOAS_CHANGE_PROCESS, 0x3b92);
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
}
