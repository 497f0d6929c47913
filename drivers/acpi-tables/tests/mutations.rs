//! Damaged corpus tables: the parsers must never panic or loop, and every
//! error must point inside the table.
//!
//! The random properties recompute the checksum after mutating a table, so
//! the mutation reaches the structure parsers instead of stopping at the
//! checksum check.

mod common;

use std::sync::LazyLock;

use acpi_tables::dmar::Dmar;
use acpi_tables::ivrs::{Block, EntryKind, Ivrs};
use acpi_tables::{Error, ErrorKind, fix_checksum};
use proptest::prelude::*;

static CORPUS: LazyLock<Vec<(String, Vec<u8>)>> = LazyLock::new(common::corpus);

/// Parses with the parser the signature asks for (DMAR for anything else)
/// and, for IVRS, also resolves device ranges. Returns the first error.
fn parse_any(bytes: &[u8]) -> Result<(), Error> {
    if bytes.get(..4) == Some(b"IVRS".as_slice()) {
        let t = Ivrs::parse(bytes)?;
        for h in t.ivhds() {
            h.device_ranges()?;
        }
        Ok(())
    } else {
        Dmar::parse(bytes).map(|_| ())
    }
}

/// Parses and checks that any error names an offset inside the input.
fn check(name: &str, bytes: &[u8]) -> Result<(), Error> {
    let r = parse_any(bytes);
    if let Err(e) = &r {
        assert!(
            e.offset < bytes.len().max(1),
            "{name}: error offset {:#x} outside the {}-byte table: {e}",
            e.offset,
            bytes.len()
        );
        // Display must not panic either.
        let _ = e.to_string();
    }
    r
}

/// Offsets of every length field in a parsed corpus table, as
/// (offset, width in bytes): DMAR structures and device scopes, IVRS blocks,
/// and the UID length of ACPI HID entries.
fn length_fields(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    if let Ok(t) = Dmar::parse(bytes) {
        for s in &t.structures {
            v.push((s.offset() + 2, 2));
            for sc in s.scopes() {
                v.push((sc.offset + 1, 1));
            }
        }
    } else if let Ok(t) = Ivrs::parse(bytes) {
        for b in &t.blocks {
            let off = match b {
                Block::Ivhd(h) => {
                    for e in &h.entries {
                        if matches!(e.kind, EntryKind::AcpiHid { .. }) {
                            v.push((e.offset + 21, 1));
                        }
                    }
                    h.offset
                }
                Block::Ivmd(m) => m.offset,
                Block::Unknown { offset, .. } => *offset,
            };
            v.push((off + 2, 2));
        }
    }
    v
}

#[test]
fn every_truncation_of_every_corpus_table_is_an_error() {
    for (name, bytes) in CORPUS.iter() {
        assert!(check(name, bytes).is_ok(), "{name} must parse intact");
        for n in 0..bytes.len() {
            let cut = &bytes[..n];
            let e = check(name, cut).expect_err(&format!("{name} truncated to {n} bytes parsed"));
            // Too short for a header, or the header's length exceeds the slice.
            assert_eq!(e.structure, "table header", "{name} cut at {n}: {e}");
            assert!(matches!(e.kind, ErrorKind::Truncated { .. }), "{name} cut at {n}: {e}");
        }
    }
}

#[test]
fn bad_checksum_and_signature_are_reported() {
    for (name, bytes) in CORPUS.iter() {
        let mut b = bytes.clone();
        b[20] ^= 0x55;
        let e = check(name, &b).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::BadChecksum { .. }), "{name}: {e}");
        assert_eq!(e.offset, 9);
        let mut b = bytes.clone();
        b[0] = b'X';
        fix_checksum(&mut b);
        let e = check(name, &b).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::BadSignature { .. }), "{name}: {e}");
    }
}

#[test]
fn zeroed_or_huge_lengths_are_errors_for_every_length_field() {
    for (name, bytes) in CORPUS.iter() {
        for (off, width) in length_fields(bytes) {
            for value in [0u16, 1, 0xffff] {
                let mut b = bytes.clone();
                let le = value.to_le_bytes();
                b[off..off + width].copy_from_slice(&le[..width]);
                fix_checksum(&mut b);
                let r = check(name, &b);
                // A UID length may legitimately be 0 or 1; structure lengths may not.
                let is_uid = width == 1 && b.get(off - 21) == Some(&0xf0) && b[..4] == *b"IVRS";
                if !is_uid {
                    assert!(r.is_err(), "{name}: length field @{off:#x} = {value:#x} accepted");
                }
            }
        }
    }
}

fn pick() -> impl Strategy<Value = usize> {
    0..CORPUS.len()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_byte_flips_never_panic(idx in pick(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let (name, bytes) = &CORPUS[idx];
        let mut b = bytes.clone();
        for (i, v) in flips {
            let i = i.index(b.len());
            b[i] = v;
        }
        fix_checksum(&mut b);
        let _ = check(name, &b);
    }

    #[test]
    fn random_flips_past_the_header_never_panic(idx in pick(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16)) {
        // Keep the header intact so every mutation hits the structures.
        let (name, bytes) = &CORPUS[idx];
        let mut b = bytes.clone();
        for (i, v) in flips {
            let i = 36 + i.index(b.len() - 36);
            b[i] = v;
        }
        fix_checksum(&mut b);
        let _ = check(name, &b);
    }

    #[test]
    fn random_length_field_values_never_panic(idx in pick(), which in any::<prop::sample::Index>(), value in any::<u16>()) {
        let (name, bytes) = &CORPUS[idx];
        let fields = length_fields(bytes);
        prop_assume!(!fields.is_empty());
        let (off, width) = fields[which.index(fields.len())];
        let mut b = bytes.clone();
        b[off..off + width].copy_from_slice(&value.to_le_bytes()[..width]);
        fix_checksum(&mut b);
        let _ = check(name, &b);
    }

    #[test]
    fn truncated_and_relabelled_tables_never_panic(idx in pick(), cut in any::<prop::sample::Index>()) {
        // Cut the table and fix the header length to match, so the structure
        // parsers see a short table that is otherwise valid.
        let (name, bytes) = &CORPUS[idx];
        let n = 36 + cut.index(bytes.len() - 36);
        let mut b = bytes[..n].to_vec();
        b[4..8].copy_from_slice(&(n as u32).to_le_bytes());
        fix_checksum(&mut b);
        let _ = check(name, &b);
    }

    #[test]
    fn random_garbage_never_panics(sig in prop::sample::select(vec![*b"DMAR", *b"IVRS"]), body in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut b = sig.to_vec();
        b.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
        b.resize(36, 0);
        b.extend_from_slice(&body);
        fix_checksum(&mut b);
        let _ = check("garbage", &b);
    }
}
