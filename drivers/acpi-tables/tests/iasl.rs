//! Cross-checks the parser against the ACPICA disassembler (`iasl -d`) on
//! every corpus table.
//!
//! `iasl -d` prints one line per field, prefixed with the field's offset from
//! the start of the table: `[038h 0056   8]  Register Base Address : ...`.
//! The test indexes those lines by (offset, field name) and, for every field
//! the parser decoded, looks up the line at the same absolute offset and
//! compares the values. It also checks that both sides found the same
//! structures, device scopes and IVHD device entries (same offsets), so an
//! item skipped or invented by the parser is reported too.
//!
//! If `iasl` is not installed the test prints a note and passes (CI installs
//! Debian's acpica-tools via .ci/setup).
//!
//! # Known iasl limitations (compared only where iasl is right)
//!
//! The Debian bookworm iasl is version 20200925, which predates some
//! structure types found in the corpus:
//!
//! 1. DMAR SATC (type 5) and SIDP (type 6): iasl prints
//!    "Unknown DMAR subtable type" and stops decoding the table there. For
//!    such a structure only its type and length are compared; everything from
//!    it to the end of the table is exempt.
//! 2. IVHD type 0x40 (and hence its ACPI HID device entries, type 0xF0,
//!    which only occur in 0x40 blocks in this corpus): iasl prints
//!    "Unknown IVRS subtable type 0x40" and skips the block by its length.
//!    Only the block type and length are compared with iasl; the block's
//!    contents are instead cross-checked in this file against the type 0x11
//!    block describing the same IOMMU (same base address, device ID, EFR
//!    image and the same non-HID device entries), which iasl does decode.
//! 3. IVRS block type 0x51 (two tables): unknown to both iasl and the
//!    parser, kept as `Block::Unknown`; type and length are compared.
//!
//! Naming differences (not limitations): iasl shows the DRHD register-set
//! size byte (offset 5, defined since VT-d 2.x) as "Reserved", the IVHD
//! offset-20 field as "Attributes" for 0x11 blocks, and the EFR2 image at
//! offset 32 as "Reserved"; they are compared under those names. In special
//! (0x48) entries iasl's "Device ID" is the spec's reserved bytes 1-2, which
//! the parser does not expose, so it is not compared.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use acpi_tables::dmar::{DeviceScope, Dmar, Structure};
use acpi_tables::ivrs::{Block, EntryKind, Ivhd, Ivrs, Uid};

/// One decoded iasl field line.
#[derive(Debug, Clone)]
struct Line {
    name: String,
    value: String,
}

/// The iasl output of one table, indexed by absolute offset.
struct Dsl {
    lines: BTreeMap<usize, Vec<Line>>,
    /// [start, end) regions iasl could not decode (see the module docs).
    exempt: Vec<(usize, usize)>,
}

impl Dsl {
    fn parse(text: &str, table_len: usize) -> Dsl {
        let mut lines: BTreeMap<usize, Vec<Line>> = BTreeMap::new();
        for raw in text.lines() {
            let Some(rest) = raw.trim_start().strip_prefix('[') else {
                continue;
            };
            let Some((pos, rest)) = rest.split_once(']') else {
                continue;
            };
            let Some(hex) = pos.split_whitespace().next().and_then(|h| h.strip_suffix('h')) else {
                continue;
            };
            let Ok(offset) = usize::from_str_radix(hex, 16) else {
                continue;
            };
            let Some((name, value)) = rest.split_once(" : ") else {
                continue;
            };
            lines
                .entry(offset)
                .or_default()
                .push(Line { name: name.trim().to_string(), value: value.trim().to_string() });
        }
        let subtables: Vec<(usize, bool)> = lines
            .iter()
            .flat_map(|(&off, ls)| {
                ls.iter().filter(|l| l.name == "Subtable Type").map(move |l| (off, l.value.contains("Unknown")))
            })
            .collect();
        let mut exempt = Vec::new();
        for (i, &(off, unknown)) in subtables.iter().enumerate() {
            if unknown {
                let end = subtables.get(i + 1).map_or(table_len, |&(next, _)| next);
                exempt.push((off, end));
            }
        }
        Dsl { lines, exempt }
    }

    fn is_exempt(&self, off: usize) -> bool {
        self.exempt.iter().any(|&(s, e)| off >= s && off < e)
    }

    fn get(&self, off: usize, name: &str) -> Option<&Line> {
        self.lines.get(&off)?.iter().find(|l| l.name == name || l.name.starts_with(&format!("{name} (")))
    }

    fn offsets_named(&self, name: &str) -> BTreeSet<usize> {
        self.lines
            .iter()
            .filter(|(_, ls)| ls.iter().any(|l| l.name == name))
            .map(|(&o, _)| o)
            .filter(|&o| !self.is_exempt(o))
            .collect()
    }
}

/// Collects mismatches for one file.
struct Check<'a> {
    file: &'a str,
    dsl: &'a Dsl,
    problems: &'a mut Vec<String>,
    /// Number of fields compared with iasl.
    fields: usize,
}

fn hex_value(v: &str) -> Option<u64> {
    u64::from_str_radix(v.split_whitespace().next()?, 16).ok()
}

impl Check<'_> {
    fn report(&mut self, off: usize, what: &str, msg: String) {
        self.problems.push(format!("{} @{off:#x} {what}: {msg}", self.file));
    }

    /// Compares a numeric field, unless it lies in a region iasl could not
    /// decode.
    fn num(&mut self, off: usize, name: &str, ours: u64) {
        if self.dsl.is_exempt(off) {
            return;
        }
        self.num_always(off, name, ours);
    }

    /// Compares a numeric field even inside a region iasl could not decode,
    /// provided iasl printed anything at that offset at all (after an
    /// unknown DMAR structure it prints nothing more).
    fn num_always(&mut self, off: usize, name: &str, ours: u64) {
        if self.dsl.is_exempt(off) && !self.dsl.lines.contains_key(&off) {
            return;
        }
        self.fields += 1;
        match self.dsl.get(off, name).map(|l| l.value.clone()) {
            None => self.report(off, name, format!("iasl has no such field (parser: {ours:#x})")),
            Some(v) => match hex_value(&v) {
                Some(theirs) if theirs == ours => {}
                _ => self.report(off, name, format!("iasl {v:?} != parser {ours:#x}")),
            },
        }
    }

    fn text(&mut self, off: usize, name: &str, ours: &str) {
        if self.dsl.is_exempt(off) {
            return;
        }
        self.fields += 1;
        match self.dsl.get(off, name).map(|l| l.value.clone()) {
            None => self.report(off, name, format!("iasl has no such field (parser: {ours:?})")),
            Some(v) if v.trim_matches('"') == ours => {}
            Some(v) => self.report(off, name, format!("iasl {v} != parser {ours:?}")),
        }
    }

    fn same_set(&mut self, what: &str, iasl: BTreeSet<usize>, ours: BTreeSet<usize>) {
        for off in iasl.difference(&ours) {
            self.report(*off, what, "decoded by iasl but not by the parser".into());
        }
        for off in ours.difference(&iasl) {
            self.report(*off, what, "decoded by the parser but not by iasl".into());
        }
    }

    fn scope(&mut self, s: &DeviceScope) {
        let o = s.offset;
        self.num(o, "Device Scope Type", s.scope_type.into());
        self.num(o + 1, "Entry Length", (6 + 2 * s.path.len()) as u64);
        self.num(o + 4, "Enumeration ID", s.enumeration_id.into());
        self.num(o + 5, "PCI Bus Number", s.start_bus.into());
        for (i, &(d, f)) in s.path.iter().enumerate() {
            let po = o + 6 + 2 * i;
            if self.dsl.is_exempt(po) {
                continue;
            }
            let v = self.dsl.get(po, "PCI Path").map(|l| l.value.clone());
            let theirs = v.as_deref().and_then(|v| {
                let (a, b) = v.split_once(',')?;
                Some((u8::from_str_radix(a.trim(), 16).ok()?, u8::from_str_radix(b.trim(), 16).ok()?))
            });
            self.fields += 1;
            if theirs != Some((d, f)) {
                self.report(po, "PCI Path", format!("iasl {v:?} != parser ({d:02x},{f:02x})"));
            }
        }
    }

    fn dmar(&mut self, t: &Dmar) {
        self.num(0x24, "Host Address Width", t.host_address_width.into());
        self.num(0x25, "Flags", t.flags.into());
        let mut ours = BTreeSet::new();
        let mut scopes = BTreeSet::new();
        for s in &t.structures {
            let o = s.offset();
            // Type and length are compared even for structures iasl does
            // not know.
            let (kind, len) = match s {
                Structure::Unknown { kind, length, .. } => (*kind, *length),
                _ => (structure_type(s), structure_len(t, s)),
            };
            self.num_always(o, "Subtable Type", kind.into());
            self.num_always(o + 2, "Length", len.into());
            if !self.dsl.is_exempt(o) {
                ours.insert(o);
            }
            match s {
                Structure::Drhd(x) => {
                    self.num(o + 4, "Flags", x.flags.into());
                    self.num(o + 5, "Reserved", x.size.into());
                    self.num(o + 6, "PCI Segment Number", x.segment.into());
                    self.num(o + 8, "Register Base Address", x.register_base);
                }
                Structure::Rmrr(x) => {
                    self.num(o + 6, "PCI Segment Number", x.segment.into());
                    self.num(o + 8, "Base Address", x.base);
                    self.num(o + 16, "End Address (limit)", x.limit);
                }
                Structure::Atsr(x) => {
                    self.num(o + 4, "Flags", x.flags.into());
                    self.num(o + 6, "PCI Segment Number", x.segment.into());
                }
                Structure::Rhsa(x) => {
                    self.num(o + 8, "Base Address", x.register_base);
                    self.num(o + 16, "Proximity Domain", x.proximity_domain.into());
                }
                Structure::Andd(x) => {
                    self.num(o + 7, "Device Number", x.acpi_device_number.into());
                    self.text(o + 8, "Device Name", &x.object_name);
                }
                Structure::Satc(x) => {
                    self.num(o + 4, "Flags", x.flags.into());
                    self.num(o + 6, "PCI Segment Number", x.segment.into());
                }
                Structure::Sidp(x) => {
                    self.num(o + 6, "PCI Segment Number", x.segment.into());
                }
                Structure::Unknown { .. } => {}
            }
            for sc in s.scopes() {
                if !self.dsl.is_exempt(sc.offset) {
                    scopes.insert(sc.offset);
                }
                self.scope(sc);
            }
        }
        self.same_set("structure", self.dsl.offsets_named("Subtable Type"), ours);
        self.same_set("device scope", self.dsl.offsets_named("Device Scope Type"), scopes);
    }

    fn ivrs(&mut self, t: &Ivrs) {
        self.num(0x24, "Virtualization Info", t.iv_info.into());
        let mut blocks = BTreeSet::new();
        let mut entries = BTreeSet::new();
        for b in &t.blocks {
            let (o, kind, len) = match b {
                Block::Ivhd(h) => (h.offset, h.kind, block_len(t, h.offset)),
                Block::Ivmd(m) => (m.offset, m.kind, block_len(t, m.offset)),
                Block::Unknown { kind, offset, length } => (*offset, *kind, *length),
            };
            self.num_always(o, "Subtable Type", kind.into());
            self.num_always(o + 2, "Length", len.into());
            if !self.dsl.is_exempt(o) {
                blocks.insert(o);
            }
            match b {
                Block::Ivhd(h) => {
                    self.num(o + 1, "Flags", h.flags.into());
                    self.num(o + 4, "DeviceId", h.device_id.into());
                    self.num(o + 6, "Capability Offset", h.capability_offset.into());
                    self.num(o + 8, "Base Address", h.base_address);
                    self.num(o + 16, "PCI Segment Group", h.segment.into());
                    self.num(o + 18, "Virtualization Info", h.info.into());
                    if h.kind == 0x10 {
                        self.num(o + 20, "Feature Reporting", h.feature.into());
                    } else {
                        self.num(o + 20, "Attributes", h.feature.into());
                        self.num(o + 24, "EFR Image", h.efr.unwrap_or(0));
                        self.num(o + 32, "Reserved", h.efr2.unwrap_or(0));
                    }
                    for e in &h.entries {
                        if !self.dsl.is_exempt(e.offset) {
                            entries.insert(e.offset);
                        }
                        self.entry(e);
                    }
                }
                Block::Ivmd(m) => {
                    self.num(o + 1, "Flags", m.flags.into());
                    self.num(o + 4, "DeviceId", m.device_id.into());
                    self.num(o + 6, "Auxiliary Data", m.aux_data.into());
                    self.num(o + 16, "Start Address", m.start);
                    self.num(o + 24, "Memory Length", m.length);
                }
                Block::Unknown { .. } => {}
            }
        }
        self.same_set("IVRS block", self.dsl.offsets_named("Subtable Type"), blocks);
        self.same_set("IVHD entry", self.dsl.offsets_named("Entry Type"), entries);
    }

    fn entry(&mut self, e: &acpi_tables::ivrs::DeviceEntry) {
        let o = e.offset;
        self.num(o, "Entry Type", e.entry_type.into());
        match e.kind {
            EntryKind::Special { handle, device_id, data_setting, variety } => {
                self.num(o + 3, "Data Setting", data_setting.into());
                self.num(o + 4, "Handle", handle.into());
                self.num(o + 5, "Source Used Device ID", device_id.into());
                self.num(o + 7, "Variety", variety.into());
            }
            EntryKind::AcpiHid { device_id, data_setting, .. } => {
                self.num(o + 1, "Device ID", device_id.into());
                self.num(o + 3, "Data Setting", data_setting.into());
            }
            ref k => {
                if let Some(id) = k.device_id() {
                    self.num(o + 1, "Device ID", id.into());
                }
                if let Some(ds) = k.data_setting() {
                    self.num(o + 3, "Data Setting", ds.into());
                }
                match *k {
                    EntryKind::AliasSelect { alias, .. } | EntryKind::AliasStartRange { alias, .. } => {
                        self.num(o + 5, "Source Used Device ID", alias.into());
                    }
                    EntryKind::ExtSelect { ext, .. } | EntryKind::ExtStartRange { ext, .. } => {
                        self.num(o + 4, "Extended Data", ext.into());
                    }
                    _ => {}
                }
            }
        }
    }
}

fn structure_type(s: &Structure) -> u16 {
    match s {
        Structure::Drhd(_) => 0,
        Structure::Rmrr(_) => 1,
        Structure::Atsr(_) => 2,
        Structure::Rhsa(_) => 3,
        Structure::Andd(_) => 4,
        Structure::Satc(_) => 5,
        Structure::Sidp(_) => 6,
        Structure::Unknown { kind, .. } => *kind,
    }
}

/// Length of the structure at `s.offset()`: the distance to the next one.
fn structure_len(t: &Dmar, s: &Structure) -> u16 {
    let next = t.structures.iter().map(Structure::offset).find(|&o| o > s.offset()).unwrap_or(t.header.length as usize);
    (next - s.offset()) as u16
}

fn block_len(t: &Ivrs, off: usize) -> u16 {
    let next = t
        .blocks
        .iter()
        .map(|b| match b {
            Block::Ivhd(h) => h.offset,
            Block::Ivmd(m) => m.offset,
            Block::Unknown { offset, .. } => *offset,
        })
        .find(|&o| o > off)
        .unwrap_or(t.header.length as usize);
    (next - off) as u16
}

/// Type 0x40 blocks are not decoded by iasl 20200925; check them against
/// the 0x11 block for the same IOMMU, which iasl does decode.
fn check_ivhd40(file: &str, t: &Ivrs, problems: &mut Vec<String>) {
    let blocks: Vec<&Ivhd> = t.ivhds().collect();
    for h40 in blocks.iter().filter(|h| h.kind == 0x40) {
        let Some(h11) = blocks
            .iter()
            .find(|h| h.kind == 0x11 && h.base_address == h40.base_address && h.device_id == h40.device_id)
        else {
            problems.push(format!("{file} @{:#x}: IVHD 0x40 without a matching 0x11 block", h40.offset));
            continue;
        };
        if (h40.flags, h40.capability_offset, h40.segment, h40.info, h40.efr)
            != (h11.flags, h11.capability_offset, h11.segment, h11.info, h11.efr)
        {
            problems.push(format!("{file} @{:#x}: IVHD 0x40 header differs from 0x11 block", h40.offset));
        }
        let plain = |h: &Ivhd| -> Vec<EntryKind> {
            h.entries.iter().filter(|e| !matches!(e.kind, EntryKind::AcpiHid { .. })).map(|e| e.kind.clone()).collect()
        };
        if plain(h40) != plain(h11) {
            problems.push(format!("{file} @{:#x}: IVHD 0x40 entries differ from 0x11 block", h40.offset));
        }
        for e in &h40.entries {
            if let EntryKind::AcpiHid { hid, uid, .. } = &e.kind {
                let ok_hid = hid.iter().all(|b| b.is_ascii_alphanumeric());
                let ok_uid = match uid {
                    Uid::None | Uid::Integer(_) => true,
                    Uid::String(s) => !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic()),
                    Uid::Other { .. } => false,
                };
                if !ok_hid || !ok_uid {
                    problems.push(format!("{file} @{:#x}: implausible ACPI HID entry {:?}", e.offset, e.kind));
                }
            }
        }
    }
}

fn iasl_available() -> bool {
    Command::new("iasl").arg("-v").output().map(|o| o.status.success()).unwrap_or(false)
}

fn corpus() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut v = Vec::new();
    for sub in ["dmar", "ivrs"] {
        for e in std::fs::read_dir(root.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "dat") {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

#[test]
fn parser_agrees_with_iasl() {
    if !iasl_available() {
        eprintln!("note: iasl not found on PATH; skipping the iasl cross-check (install acpica-tools)");
        return;
    }
    let tmp = std::env::temp_dir().join(format!("acpi-tables-iasl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let mut problems = Vec::new();
    let files = corpus();
    let mut compared = 0;
    let mut fields = 0;
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(f).unwrap();
        let copy = tmp.join(&name);
        std::fs::write(&copy, &bytes).unwrap();
        let out = Command::new("iasl").arg("-d").arg(&copy).current_dir(&tmp).output().unwrap();
        let dsl_path = copy.with_extension("dsl");
        let Ok(text) = std::fs::read_to_string(&dsl_path) else {
            problems.push(format!(
                "{name}: iasl produced no .dsl (status {}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
            continue;
        };
        let dsl = Dsl::parse(&text, bytes.len());
        let mut check = Check { file: &name, dsl: &dsl, problems: &mut problems, fields: 0 };
        match &bytes[..4] {
            b"DMAR" => match Dmar::parse(&bytes) {
                Ok(t) => check.dmar(&t),
                Err(e) => check.problems.push(format!("{name}: parse error {e}")),
            },
            b"IVRS" => match Ivrs::parse(&bytes) {
                Ok(t) => {
                    check.ivrs(&t);
                    check_ivhd40(&name, &t, check.problems);
                }
                Err(e) => check.problems.push(format!("{name}: parse error {e}")),
            },
            other => check.problems.push(format!("{name}: unexpected signature {other:?}")),
        }
        fields += check.fields;
        compared += 1;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("compared {fields} fields of {compared} tables with iasl");
    assert_eq!(compared, files.len());
    // Guard against a silently broken comparison (e.g. iasl output format
    // change making every lookup vanish into exempt regions).
    assert!(fields > 5000, "only {fields} fields compared");
    assert!(problems.is_empty(), "{} mismatches with iasl:\n{}", problems.len(), problems.join("\n"));
}
