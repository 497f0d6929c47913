//! Each command's argument as named fields: where each field is in the
//! argument bytes, how big it is, and whether it holds an object id.
//!
//! The offsets and sizes are not written here: they come from each
//! struct's [`UapiStruct::FIELDS`], which the struct's declaration checks
//! against the Rust layout at compile time. What this table adds is which
//! fields name objects, checked at compile time to be fields of that
//! struct. A tool that replays recorded calls (`cargo xtask uapi-replay`)
//! uses it to print arguments and to renumber object ids.

use super::*;
use alloc::vec::Vec;

/// What a field of an argument holds, for tools that renumber objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// A plain value.
    Plain,
    /// The id of an existing object (an input).
    Id,
    /// An id the call may create or report (an output, or an in/out
    /// field like `IOMMU_VFIO_IOAS`'s `ioas_id`).
    NewId,
    /// A file descriptor the call creates (`IOMMU_FAULT_QUEUE_ALLOC`'s
    /// `out_fault_fd`). Its number is the process's business (Linux's
    /// count from the lowest free descriptor of the process): a tool pairs
    /// descriptors like ids but never compares their numbering.
    NewFd,
}

/// One field of a command's argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgField {
    /// Its name (`"mock_domain.out_hwpt_id"` inside the selftest union).
    pub name: &'static str,
    /// Byte offset from the start of the argument.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
    /// What it holds.
    pub kind: FieldKind,
}

impl ArgField {
    /// The field's value (its first 8 bytes for a wider one), or `None`
    /// when `b` ends before the field does.
    pub fn get(&self, b: &[u8]) -> Option<u64> {
        let s = b.get(self.offset..self.offset + self.size)?;
        let n = self.size.min(8);
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(&s[..n]);
        Some(u64::from_le_bytes(v))
    }

    /// Stores `val` in the field (its first 8 bytes for a wider one); does
    /// nothing when `b` ends before the field does.
    pub fn put(&self, b: &mut [u8], val: u64) {
        if let Some(s) = b.get_mut(self.offset..self.offset + self.size) {
            let n = self.size.min(8);
            s[..n].copy_from_slice(&val.to_le_bytes()[..n]);
        }
    }

    /// Whether the field names an object.
    pub fn is_id(&self) -> bool {
        matches!(self.kind, FieldKind::Id | FieldKind::NewId)
    }
}

/// A struct's fields and the ones among them that name objects.
#[derive(Clone, Copy, Debug)]
pub struct ArgLayout {
    fields: &'static [FieldLayout],
    ids: &'static [(&'static str, FieldKind)],
    size: usize,
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const fn has_field(fields: &[FieldLayout], name: &str) -> bool {
    let mut i = 0;
    while i < fields.len() {
        if str_eq(fields[i].name, name) {
            return true;
        }
        i += 1;
    }
    false
}

/// `T`'s layout with the id fields `ids`; a name that is not a field of
/// `T` fails the build.
const fn layout<T: UapiStruct>(ids: &'static [(&'static str, FieldKind)]) -> ArgLayout {
    let mut i = 0;
    while i < ids.len() {
        assert!(has_field(T::FIELDS, ids[i].0), "an id field that the struct does not have");
        i += 1;
    }
    ArgLayout { fields: T::FIELDS, ids, size: T::SIZE }
}

impl ArgLayout {
    /// `sizeof` the struct.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The fields at `base` in the argument, with their kinds; `skip`
    /// leaves a field out.
    fn push(&self, base: usize, skip: Option<&str>, out: &mut Vec<ArgField>) {
        for f in self.fields.iter().filter(|f| Some(f.name) != skip) {
            let kind = self.ids.iter().find(|(n, _)| *n == f.name).map_or(FieldKind::Plain, |&(_, k)| k);
            out.push(ArgField { name: f.name, offset: base + f.offset, size: f.size, kind });
        }
    }
}

use FieldKind::{Id, NewFd, NewId};

/// The argument of each iommufd command of the served table (Linux 6.12's
/// plus IOAS_MAP_FILE and IOAS_CHANGE_PROCESS).
pub const COMMAND_LAYOUTS: &[(u32, ArgLayout)] = &[
    (IOMMU_DESTROY, layout::<IommuDestroy>(&[("id", Id)])),
    (IOMMU_IOAS_ALLOC, layout::<IommuIoasAlloc>(&[("out_ioas_id", NewId)])),
    (IOMMU_IOAS_ALLOW_IOVAS, layout::<IommuIoasAllowIovas>(&[("ioas_id", Id)])),
    (IOMMU_IOAS_COPY, layout::<IommuIoasCopy>(&[("dst_ioas_id", Id), ("src_ioas_id", Id)])),
    (IOMMU_IOAS_IOVA_RANGES, layout::<IommuIoasIovaRanges>(&[("ioas_id", Id)])),
    (IOMMU_IOAS_MAP, layout::<IommuIoasMap>(&[("ioas_id", Id)])),
    (IOMMU_IOAS_UNMAP, layout::<IommuIoasUnmap>(&[("ioas_id", Id)])),
    (IOMMU_OPTION, layout::<IommuOption>(&[("object_id", Id)])),
    // GET answers with the compat IOAS: an output id.
    (IOMMU_VFIO_IOAS, layout::<IommuVfioIoas>(&[("ioas_id", NewId)])),
    (
        IOMMU_HWPT_ALLOC,
        layout::<IommuHwptAlloc>(&[("dev_id", Id), ("pt_id", Id), ("out_hwpt_id", NewId), ("fault_id", Id)]),
    ),
    (IOMMU_GET_HW_INFO, layout::<IommuHwInfo>(&[("dev_id", Id)])),
    (IOMMU_HWPT_SET_DIRTY_TRACKING, layout::<IommuHwptSetDirtyTracking>(&[("hwpt_id", Id)])),
    (IOMMU_HWPT_GET_DIRTY_BITMAP, layout::<IommuHwptGetDirtyBitmap>(&[("hwpt_id", Id)])),
    (IOMMU_HWPT_INVALIDATE, layout::<IommuHwptInvalidate>(&[("hwpt_id", Id)])),
    (IOMMU_FAULT_QUEUE_ALLOC, layout::<IommuFaultAlloc>(&[("out_fault_id", NewId), ("out_fault_fd", NewFd)])),
    (IOMMU_IOAS_MAP_FILE, layout::<IommuIoasMapFile>(&[("ioas_id", Id)])),
    (IOMMU_IOAS_CHANGE_PROCESS, layout::<IommuIoasChangeProcess>(&[])),
];

/// One selftest op: its number and name, what `iommu_test_cmd.id` holds
/// for it (an object id, or an access "fd"), and its union member.
#[derive(Clone, Copy, Debug)]
pub struct TestOpInfo {
    /// `iommu_test_cmd.op`.
    pub op: u32,
    /// The op's name without `IOMMU_TEST_OP_`.
    pub name: &'static str,
    /// What `iommu_test_cmd.id` holds.
    pub id: FieldKind,
    /// The union member.
    pub member: ArgLayout,
}

const fn op(op: u32, name: &'static str, id: FieldKind, member: ArgLayout) -> TestOpInfo {
    TestOpInfo { op, name, id, member }
}

use FieldKind::Plain;

/// The selftest ops Linux 6.12 has.
pub const TEST_OPS: &[TestOpInfo] = &[
    op(IOMMU_TEST_OP_ADD_RESERVED, "ADD_RESERVED", Id, layout::<IommuTestAddReserved>(&[])),
    op(
        IOMMU_TEST_OP_MOCK_DOMAIN,
        "MOCK_DOMAIN",
        Id,
        layout::<IommuTestMockDomain>(&[
            ("mock_domain.out_stdev_id", NewId),
            ("mock_domain.out_hwpt_id", NewId),
            ("mock_domain.out_idev_id", NewId),
        ]),
    ),
    op(IOMMU_TEST_OP_MD_CHECK_MAP, "MD_CHECK_MAP", Id, layout::<IommuTestCheckMap>(&[])),
    op(IOMMU_TEST_OP_MD_CHECK_REFS, "MD_CHECK_REFS", Plain, layout::<IommuTestCheckRefs>(&[])),
    op(IOMMU_TEST_OP_CREATE_ACCESS, "CREATE_ACCESS", Id, layout::<IommuTestCreateAccess>(&[])),
    op(IOMMU_TEST_OP_DESTROY_ACCESS_PAGES, "DESTROY_ACCESS_PAGES", Plain, layout::<IommuTestDestroyAccessPages>(&[])),
    op(IOMMU_TEST_OP_ACCESS_PAGES, "ACCESS_PAGES", Plain, layout::<IommuTestAccessPages>(&[])),
    op(IOMMU_TEST_OP_ACCESS_RW, "ACCESS_RW", Plain, layout::<IommuTestAccessRw>(&[])),
    op(IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT, "SET_TEMP_MEMORY_LIMIT", Plain, layout::<IommuTestMemoryLimit>(&[])),
    op(
        IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE,
        "MOCK_DOMAIN_REPLACE",
        Id,
        layout::<IommuTestMockDomainReplace>(&[("mock_domain_replace.pt_id", NewId)]),
    ),
    op(
        IOMMU_TEST_OP_ACCESS_REPLACE_IOAS,
        "ACCESS_REPLACE_IOAS",
        Plain,
        layout::<IommuTestAccessReplaceIoas>(&[("access_replace_ioas.ioas_id", Id)]),
    ),
    op(
        IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS,
        "MOCK_DOMAIN_FLAGS",
        Id,
        layout::<IommuTestMockDomainFlags>(&[
            ("mock_domain_flags.out_stdev_id", NewId),
            ("mock_domain_flags.out_hwpt_id", NewId),
            ("mock_domain_flags.out_idev_id", NewId),
        ]),
    ),
    op(IOMMU_TEST_OP_DIRTY, "DIRTY", Id, layout::<IommuTestDirty>(&[])),
    op(IOMMU_TEST_OP_MD_CHECK_IOTLB, "MD_CHECK_IOTLB", Id, layout::<IommuTestCheckIotlb>(&[])),
    op(
        IOMMU_TEST_OP_TRIGGER_IOPF,
        "TRIGGER_IOPF",
        Plain,
        layout::<IommuTestTriggerIopf>(&[("trigger_iopf.dev_id", Id)]),
    ),
    // Linux 6.15 (PASID attach).
    op(
        IOMMU_TEST_OP_PASID_ATTACH,
        "PASID_ATTACH",
        Id,
        layout::<IommuTestPasidAttach>(&[("pasid_attach.pt_id", NewId)]),
    ),
    op(
        IOMMU_TEST_OP_PASID_REPLACE,
        "PASID_REPLACE",
        Id,
        layout::<IommuTestPasidAttach>(&[("pasid_attach.pt_id", NewId)]),
    ),
    op(IOMMU_TEST_OP_PASID_DETACH, "PASID_DETACH", Id, layout::<IommuTestPasidDetach>(&[])),
    op(
        IOMMU_TEST_OP_PASID_CHECK_HWPT,
        "PASID_CHECK_HWPT",
        Id,
        layout::<IommuTestPasidCheck>(&[("pasid_check.hwpt_id", Id)]),
    ),
];

/// The selftest op `op`, if Linux 6.12 has it (or it is one of the
/// PASID ops of 6.15 implemented here).
pub fn test_op(op: u32) -> Option<&'static TestOpInfo> {
    TEST_OPS.iter().find(|o| o.op == op)
}

/// The fields of command `cmd`'s argument in offset order; for
/// `IOMMU_TEST_CMD` those of the op `input` names (the header, the op's
/// union member, `last`; only the header and `last` for an unknown op).
/// Empty for a command not in the table.
pub fn command_fields(cmd: u32, input: &[u8]) -> Vec<ArgField> {
    let mut out = Vec::new();
    if cmd == IOMMU_TEST_CMD {
        let t = IommuTestCmd::read(input);
        let op = test_op(t.op);
        let header = ArgLayout { fields: IommuTestCmd::FIELDS, ids: &[], size: IommuTestCmd::SIZE };
        let start = out.len();
        header.push(0, Some("payload"), &mut out);
        // `last` goes after the union.
        let last = out.pop().expect("iommu_test_cmd ends with `last`");
        if let Some(o) = op {
            if let Some(id) = out[start..].iter_mut().find(|f| f.name == "id") {
                id.kind = o.id;
            }
            o.member.push(IOMMU_TEST_CMD_UNION_OFFSET, None, &mut out);
        }
        out.push(last);
    } else if let Some((_, l)) = COMMAND_LAYOUTS.iter().find(|(c, _)| *c == cmd) {
        l.push(0, None, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_of_the_table_has_its_fields() {
        assert_eq!(COMMAND_LAYOUTS.len(), COMMANDS.len());
        for (c, (cmd, l)) in COMMANDS.iter().zip(COMMAND_LAYOUTS) {
            assert_eq!(c.cmd, *cmd, "same order as the command table");
            assert_eq!(l.size(), c.struct_size as usize, "{}", c.name);
            let f = command_fields(*cmd, &[]);
            assert_eq!(f.iter().filter(|f| f.kind != FieldKind::Plain).count(), l.ids.len(), "{}", c.name);
            assert!(f.windows(2).all(|w| w[0].offset + w[0].size <= w[1].offset), "{}", c.name);
        }
        for o in TEST_OPS {
            assert!(o.member.size() <= IOMMU_TEST_CMD_UNION_SIZE, "{}", o.name);
        }
    }

    #[test]
    fn copy_and_mock_domain() {
        let f = command_fields(IOMMU_IOAS_COPY, &[]);
        let names: Vec<&str> = f.iter().map(|f| f.name).collect();
        assert_eq!(names, ["size", "flags", "dst_ioas_id", "src_ioas_id", "length", "dst_iova", "src_iova"]);
        assert_eq!((f[3].offset, f[3].size, f[3].kind), (12, 4, FieldKind::Id));
        let t = IommuTestCmd { op: IOMMU_TEST_OP_MOCK_DOMAIN, ..Default::default() }.to_bytes();
        let f = command_fields(IOMMU_TEST_CMD, &t);
        let ids: Vec<(&str, usize)> = f.iter().filter(|f| f.is_id()).map(|f| (f.name, f.offset)).collect();
        assert_eq!(
            ids,
            [
                ("id", 8),
                ("mock_domain.out_stdev_id", 16),
                ("mock_domain.out_hwpt_id", 20),
                ("mock_domain.out_idev_id", 24)
            ]
        );
        assert_eq!(f.last().map(|f| (f.name, f.offset)), Some(("last", 64)));
        // An unknown op: the header and `last`, `id` plain.
        let t = IommuTestCmd { op: 99, ..Default::default() }.to_bytes();
        let f = command_fields(IOMMU_TEST_CMD, &t);
        assert_eq!(f.iter().map(|f| f.name).collect::<Vec<_>>(), ["size", "op", "id", "__reserved", "last"]);
        assert!(!f[2].is_id());
        // Served since 6.13: its fields, the IOAS id an id.
        let f = command_fields(IOMMU_IOAS_MAP_FILE, &[]);
        let names: Vec<(&str, usize, bool)> = f.iter().map(|f| (f.name, f.offset, f.is_id())).collect();
        assert_eq!(
            names,
            [
                ("size", 0, false),
                ("flags", 4, false),
                ("ioas_id", 8, true),
                ("fd", 12, false),
                ("start", 16, false),
                ("length", 24, false),
                ("iova", 32, false)
            ]
        );
        assert_eq!(command_fields(IOMMU_IOAS_CHANGE_PROCESS, &[]).len(), 2);
        // Not served: no fields.
        assert!(command_fields(IOMMU_VIOMMU_ALLOC, &[]).is_empty());
    }

    #[test]
    fn get_and_put() {
        let f = ArgField { name: "x", offset: 2, size: 2, kind: FieldKind::Plain };
        let mut b = [0u8; 4];
        f.put(&mut b, 0x1_2345);
        assert_eq!(b, [0, 0, 0x45, 0x23]);
        assert_eq!(f.get(&b), Some(0x2345));
        assert_eq!(f.get(&b[..3]), None);
    }
}
