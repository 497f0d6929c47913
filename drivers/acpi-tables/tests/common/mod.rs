//! Helpers shared by the integration tests: loading the corpus and building
//! tables by hand.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// All corpus tables as (file name, bytes), sorted by name.
pub fn corpus() -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<PathBuf> = Vec::new();
    for sub in ["dmar", "ivrs"] {
        for e in std::fs::read_dir(root.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "dat") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

/// Builds a table: 36-byte header with `sig`, then `body`; fixes the length
/// and checksum.
pub fn table(sig: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(sig);
    t.extend_from_slice(&0u32.to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(b"BOCHS ");
    t.extend_from_slice(b"BXPC    ");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"BXPC");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    finish(&mut t);
    t
}

/// Sets the length field to the vector's length and fixes the checksum.
pub fn finish(t: &mut [u8]) {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    acpi_tables::fix_checksum(t);
}

/// DMAR body: host address width, flags, reserved, structures.
pub fn dmar(haw: u8, flags: u8, structures: &[Vec<u8>]) -> Vec<u8> {
    let mut b = vec![haw, flags];
    b.extend_from_slice(&[0; 10]);
    for s in structures {
        b.extend_from_slice(s);
    }
    table(b"DMAR", 1, &b)
}

/// A device scope.
pub fn scope(ty: u8, enum_id: u8, bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
    let mut s = vec![ty, (6 + 2 * path.len()) as u8, 0, 0, enum_id, bus];
    for &(d, f) in path {
        s.push(d);
        s.push(f);
    }
    s
}

/// A remapping structure with type, the given fixed-part body (after the
/// 4-byte type/length header) and scopes.
pub fn structure(ty: u16, fixed: &[u8], scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&ty.to_le_bytes());
    s.extend_from_slice(&0u16.to_le_bytes());
    s.extend_from_slice(fixed);
    for sc in scopes {
        s.extend_from_slice(sc);
    }
    let len = s.len() as u16;
    s[2..4].copy_from_slice(&len.to_le_bytes());
    s
}

pub fn drhd(flags: u8, size: u8, segment: u16, base: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![flags, size];
    f.extend_from_slice(&segment.to_le_bytes());
    f.extend_from_slice(&base.to_le_bytes());
    structure(0, &f, scopes)
}

pub fn rmrr(segment: u16, base: u64, limit: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![0, 0];
    f.extend_from_slice(&segment.to_le_bytes());
    f.extend_from_slice(&base.to_le_bytes());
    f.extend_from_slice(&limit.to_le_bytes());
    structure(1, &f, scopes)
}

pub fn atsr(flags: u8, segment: u16, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![flags, 0];
    f.extend_from_slice(&segment.to_le_bytes());
    structure(2, &f, scopes)
}

/// IVRS body: IVinfo, reserved, blocks.
pub fn ivrs(iv_info: u32, blocks: &[Vec<u8>]) -> Vec<u8> {
    let mut b = iv_info.to_le_bytes().to_vec();
    b.extend_from_slice(&[0; 8]);
    for bl in blocks {
        b.extend_from_slice(bl);
    }
    table(b"IVRS", 2, &b)
}

/// An IVHD block of type `kind` (0x10, 0x11 or 0x40) with the given entries
/// (already encoded).
#[allow(clippy::too_many_arguments)]
pub fn ivhd(kind: u8, flags: u8, device_id: u16, base: u64, feature: u32, efr: u64, entries: &[Vec<u8>]) -> Vec<u8> {
    let mut b = vec![kind, flags, 0, 0];
    b.extend_from_slice(&device_id.to_le_bytes());
    b.extend_from_slice(&0x40u16.to_le_bytes()); // capability offset
    b.extend_from_slice(&base.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes()); // segment
    b.extend_from_slice(&0u16.to_le_bytes()); // info
    b.extend_from_slice(&feature.to_le_bytes());
    if kind != 0x10 {
        b.extend_from_slice(&efr.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
    }
    for e in entries {
        b.extend_from_slice(e);
    }
    let len = b.len() as u16;
    b[2..4].copy_from_slice(&len.to_le_bytes());
    b
}

/// A 4-byte IVHD entry.
pub fn e4(ty: u8, device_id: u16, ds: u8) -> Vec<u8> {
    let d = device_id.to_le_bytes();
    vec![ty, d[0], d[1], ds]
}

/// An 8-byte IVHD entry with the given bytes 4..8.
pub fn e8(ty: u8, device_id: u16, ds: u8, tail: [u8; 4]) -> Vec<u8> {
    let mut e = e4(ty, device_id, ds);
    e.extend_from_slice(&tail);
    e
}

/// A special (0x48) entry.
pub fn special(handle: u8, source: u16, ds: u8, variety: u8) -> Vec<u8> {
    let s = source.to_le_bytes();
    vec![0x48, 0, 0, ds, handle, s[0], s[1], variety]
}

/// An ACPI HID (0xF0) entry.
pub fn hid_entry(device_id: u16, ds: u8, hid: &[u8; 8], cid: &[u8; 8], uid_format: u8, uid: &[u8]) -> Vec<u8> {
    let mut e = e4(0xf0, device_id, ds);
    e.extend_from_slice(hid);
    e.extend_from_slice(cid);
    e.push(uid_format);
    e.push(uid.len() as u8);
    e.extend_from_slice(uid);
    e
}

pub fn ivmd(kind: u8, flags: u8, device_id: u16, aux: u16, start: u64, length: u64) -> Vec<u8> {
    let mut b = vec![kind, flags, 32, 0];
    b.extend_from_slice(&device_id.to_le_bytes());
    b.extend_from_slice(&aux.to_le_bytes());
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&start.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    b
}
