//! `cargo xtask acpi FILE... [--json]`: decode DMAR / IVRS table dumps with
//! the `acpi-tables` crate, as readable text or one JSON object per line.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use acpi_tables::SdtHeader;
use acpi_tables::dmar::{self, DeviceScope, Dmar, Structure};
use acpi_tables::ivrs::{self, Block, EntryKind, Ivrs, Uid};
use acpi_tables::scope::Bdf;
use serde_json::{Map, Value, json};

/// Decodes each file (DMAR or IVRS, detected from its first four bytes) and
/// prints it to stdout. Returns `Ok(true)` if every file was read and
/// parsed; a file that fails is reported (as text, or as a JSON object with
/// an "error" member) and the rest are still processed.
pub fn run(files: &[PathBuf], json: bool) -> anyhow::Result<bool> {
    let mut all_ok = true;
    for file in files {
        let (out, ok) = render_file(file, json);
        all_ok &= ok;
        print!("{out}");
    }
    Ok(all_ok)
}

/// Renders one file; returns the text to print (newline-terminated) and
/// whether the file decoded.
fn render_file(file: &Path, json: bool) -> (String, bool) {
    let name = file.display().to_string();
    let result = std::fs::read(file).map_err(|e| format!("cannot read: {e}")).and_then(|bytes| decode(&bytes));
    match (result, json) {
        (Ok(table), true) => {
            // "file" first, then the table's own fields in their order.
            let mut out = Map::new();
            out.insert("file".into(), json!(name));
            if let Value::Object(m) = table.to_json() {
                out.extend(m);
            }
            (format!("{}\n", Value::Object(out)), true)
        }
        (Ok(table), false) => (format!("{name}:\n{}\n", table.describe()), true),
        (Err(e), true) => (format!("{}\n", json!({ "file": name, "error": e })), false),
        (Err(e), false) => (format!("{name}: error: {e}\n\n"), false),
    }
}

enum Table {
    Dmar(Dmar),
    Ivrs(Ivrs),
}

fn decode(bytes: &[u8]) -> Result<Table, String> {
    match bytes.get(..4) {
        Some(b"DMAR") => Dmar::parse(bytes).map(Table::Dmar).map_err(|e| e.to_string()),
        Some(b"IVRS") => Ivrs::parse(bytes).map(Table::Ivrs).map_err(|e| e.to_string()),
        Some(sig) => Err(format!("unsupported table signature \"{}\" (expected DMAR or IVRS)", sig.escape_ascii())),
        None => Err(format!("file too short for a table signature ({} bytes)", bytes.len())),
    }
}

impl Table {
    fn to_json(&self) -> Value {
        match self {
            Table::Dmar(d) => dmar_json(d),
            Table::Ivrs(t) => ivrs_json(t),
        }
    }

    fn describe(&self) -> String {
        match self {
            Table::Dmar(d) => describe_dmar(d),
            Table::Ivrs(t) => describe_ivrs(t),
        }
    }
}

// ---------------------------------------------------------------- JSON ----

fn scope_json(s: &DeviceScope) -> Value {
    json!({
        "type": s.scope_type,
        "enumeration_id": s.enumeration_id,
        "start_bus": s.start_bus,
        "path": s.path.iter().map(|&(d, f)| json!([d, f])).collect::<Vec<_>>(),
    })
}

fn scopes_json(scopes: &[DeviceScope]) -> Value {
    Value::Array(scopes.iter().map(scope_json).collect())
}

fn dmar_json(d: &Dmar) -> Value {
    let structures: Vec<Value> = d
        .structures
        .iter()
        .map(|s| match s {
            Structure::Drhd(x) => json!({
                "type": "DRHD", "offset": x.offset, "flags": x.flags, "size": x.size,
                "segment": x.segment, "register_base": x.register_base,
                "scopes": scopes_json(&x.scopes),
            }),
            Structure::Rmrr(x) => json!({
                "type": "RMRR", "offset": x.offset, "segment": x.segment, "base": x.base,
                "limit": x.limit, "scopes": scopes_json(&x.scopes),
            }),
            Structure::Atsr(x) => json!({
                "type": "ATSR", "offset": x.offset, "flags": x.flags, "segment": x.segment,
                "scopes": scopes_json(&x.scopes),
            }),
            Structure::Rhsa(x) => json!({
                "type": "RHSA", "offset": x.offset, "register_base": x.register_base,
                "proximity_domain": x.proximity_domain,
            }),
            Structure::Andd(x) => json!({
                "type": "ANDD", "offset": x.offset,
                "acpi_device_number": x.acpi_device_number, "object_name": x.object_name,
            }),
            Structure::Satc(x) => json!({
                "type": "SATC", "offset": x.offset, "flags": x.flags, "segment": x.segment,
                "scopes": scopes_json(&x.scopes),
            }),
            Structure::Sidp(x) => json!({
                "type": "SIDP", "offset": x.offset, "segment": x.segment,
                "scopes": scopes_json(&x.scopes),
            }),
            Structure::Unknown { kind, offset, length } => json!({
                "type": "unknown", "type_id": kind, "offset": offset, "length": length,
            }),
        })
        .collect();
    json!({
        "signature": "DMAR",
        "host_address_width": d.host_address_width,
        "flags": d.flags,
        "structures": structures,
    })
}

fn uid_json(uid: &Uid) -> Value {
    match uid {
        Uid::None => Value::Null,
        Uid::Integer(v) => json!(v),
        Uid::String(s) => json!(s),
        Uid::Other { format, bytes } => json!({ "format": format, "bytes": bytes }),
    }
}

fn entry_json(e: &ivrs::DeviceEntry) -> Value {
    let mut m = Map::new();
    m.insert("kind".into(), json!(e.kind.name()));
    m.insert("type".into(), json!(e.entry_type));
    m.insert("offset".into(), json!(e.offset));
    if let Some(id) = e.kind.device_id() {
        m.insert("device_id".into(), json!(id));
    }
    if let Some(ds) = e.kind.data_setting() {
        m.insert("data_setting".into(), json!(ds));
    }
    match &e.kind {
        EntryKind::AliasSelect { alias, .. } | EntryKind::AliasStartRange { alias, .. } => {
            m.insert("alias".into(), json!(alias));
        }
        EntryKind::ExtSelect { ext, .. } | EntryKind::ExtStartRange { ext, .. } => {
            m.insert("ext".into(), json!(ext));
        }
        EntryKind::Special { handle, variety, .. } => {
            m.insert("handle".into(), json!(handle));
            m.insert("variety".into(), json!(variety));
        }
        EntryKind::AcpiHid { hid, cid, uid, .. } => {
            m.insert("hid".into(), json!(ivrs::id_string(hid)));
            m.insert("cid".into(), json!(ivrs::id_string(cid)));
            m.insert("uid".into(), uid_json(uid));
        }
        EntryKind::Reserved { length } => {
            m.insert("length".into(), json!(length));
        }
        _ => {}
    }
    Value::Object(m)
}

fn ivrs_json(t: &Ivrs) -> Value {
    let blocks: Vec<Value> = t
        .blocks
        .iter()
        .map(|b| match b {
            Block::Ivhd(h) => {
                let mut m = Map::new();
                m.insert("type".into(), json!(h.kind));
                m.insert("offset".into(), json!(h.offset));
                m.insert("flags".into(), json!(h.flags));
                m.insert("device_id".into(), json!(h.device_id));
                m.insert("capability_offset".into(), json!(h.capability_offset));
                m.insert("base_address".into(), json!(h.base_address));
                m.insert("segment".into(), json!(h.segment));
                m.insert("info".into(), json!(h.info));
                if h.kind == ivrs::IVHD_TYPE_10 {
                    m.insert("feature".into(), json!(h.feature));
                } else {
                    m.insert("attributes".into(), json!(h.feature));
                }
                if let Some(efr) = h.efr {
                    m.insert("efr".into(), json!(efr));
                }
                if let Some(efr2) = h.efr2 {
                    m.insert("efr2".into(), json!(efr2));
                }
                m.insert("entries".into(), Value::Array(h.entries.iter().map(entry_json).collect()));
                Value::Object(m)
            }
            Block::Ivmd(x) => json!({
                "type": x.kind, "offset": x.offset, "flags": x.flags, "device_id": x.device_id,
                "aux_data": x.aux_data, "start": x.start, "length": x.length,
            }),
            Block::Unknown { kind, offset, length } => json!({
                "type": kind, "kind": "unknown", "offset": offset, "length": length,
            }),
        })
        .collect();
    json!({ "signature": "IVRS", "iv_info": t.iv_info, "blocks": blocks })
}

// ---------------------------------------------------------------- text ----

fn text(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

fn describe_header(out: &mut String, h: &SdtHeader) {
    let _ = writeln!(
        out,
        "  {} length {:#x} revision {} checksum {:#04x}",
        text(&h.signature),
        h.length,
        h.revision,
        h.checksum
    );
    let _ = writeln!(
        out,
        "  OEM \"{}\" table \"{}\" revision {:#x}, creator \"{}\" revision {:#x}",
        text(&h.oem_id),
        text(&h.oem_table_id),
        h.oem_revision,
        text(&h.creator_id),
        h.creator_revision
    );
}

/// One line per scope, e.g.
/// `PCI endpoint 00:02.0 (start bus 0x00 path [(2,0)])`.
fn describe_scope(out: &mut String, indent: &str, s: &DeviceScope) {
    let path: Vec<String> = s.path.iter().map(|(d, f)| format!("({d},{f})")).collect();
    let path = format!("[{}]", path.join(", "));
    // Without config space only a single-hop path names a BDF directly.
    let bdf = match s.path.as_slice() {
        [(d, f)] => format!(" {}", Bdf::new(s.start_bus, *d, *f)),
        _ => String::new(),
    };
    let id = match s.scope_type {
        dmar::SCOPE_IOAPIC => format!(" ID {:#04x}", s.enumeration_id),
        dmar::SCOPE_HPET => format!(" number {:#04x}", s.enumeration_id),
        dmar::SCOPE_ACPI_NAMESPACE_DEVICE => format!(" number {:#04x}", s.enumeration_id),
        _ => String::new(),
    };
    let ty = if matches!(s.scope_type, 1..=5) {
        s.type_name().to_string()
    } else {
        format!("scope type {:#04x}", s.scope_type)
    };
    let _ = writeln!(out, "{indent}{ty}{id}{bdf} (start bus {:#04x} path {path}) @{:#x}", s.start_bus, s.offset);
}

fn describe_dmar(d: &Dmar) -> String {
    let mut out = String::new();
    describe_header(&mut out, &d.header);
    let mut flags = Vec::new();
    for (bit, name) in [
        (dmar::FLAG_INTR_REMAP, "INTR_REMAP"),
        (dmar::FLAG_X2APIC_OPT_OUT, "X2APIC_OPT_OUT"),
        (dmar::FLAG_DMA_CTRL_PLATFORM_OPT_IN, "DMA_CTRL_PLATFORM_OPT_IN"),
    ] {
        if d.flags & bit != 0 {
            flags.push(name);
        }
    }
    let _ = writeln!(
        out,
        "  host address width {:#04x} ({} bits), flags {:#04x} [{}]",
        d.host_address_width,
        d.dma_address_bits(),
        d.flags,
        flags.join(" ")
    );
    for s in &d.structures {
        let _ = write!(out, "  {} @{:#x}: ", s.name(), s.offset());
        match s {
            Structure::Drhd(x) => {
                let _ = writeln!(
                    out,
                    "flags {:#04x}{} size {:#x} ({} KiB) segment {:#06x} register base {:#x}",
                    x.flags,
                    if x.include_pci_all() { " [INCLUDE_PCI_ALL]" } else { "" },
                    x.size,
                    x.register_set_bytes() / 1024,
                    x.segment,
                    x.register_base
                );
            }
            Structure::Rmrr(x) => {
                let _ = writeln!(out, "segment {:#06x} base {:#x} limit {:#x}", x.segment, x.base, x.limit);
            }
            Structure::Atsr(x) => {
                let _ = writeln!(
                    out,
                    "flags {:#04x}{} segment {:#06x}",
                    x.flags,
                    if x.all_ports() { " [ALL_PORTS]" } else { "" },
                    x.segment
                );
            }
            Structure::Rhsa(x) => {
                let _ =
                    writeln!(out, "register base {:#x} proximity domain {:#x}", x.register_base, x.proximity_domain);
            }
            Structure::Andd(x) => {
                let _ = writeln!(
                    out,
                    "ACPI device number {:#04x} object \"{}\"",
                    x.acpi_device_number,
                    x.object_name.escape_debug()
                );
            }
            Structure::Satc(x) => {
                let _ = writeln!(out, "flags {:#04x} segment {:#06x}", x.flags, x.segment);
            }
            Structure::Sidp(x) => {
                let _ = writeln!(out, "segment {:#06x}", x.segment);
            }
            Structure::Unknown { kind, length, .. } => {
                let _ = writeln!(out, "type {kind:#06x} length {length:#x} (skipped)");
            }
        }
        for sc in s.scopes() {
            describe_scope(&mut out, "      ", sc);
        }
    }
    out
}

fn dev(id: u16) -> String {
    format!("{:#06x} ({})", id, Bdf::from_requester_id(id))
}

fn describe_entry(out: &mut String, e: &ivrs::DeviceEntry) {
    let _ = write!(out, "      @{:#x} type {:#04x} ", e.offset, e.entry_type);
    let ds = |d: u8| format!("data setting {d:#04x}");
    let _ = match &e.kind {
        EntryKind::Pad4 => writeln!(out, "padding (4 bytes)"),
        EntryKind::Pad8 => writeln!(out, "padding (8 bytes)"),
        EntryKind::All { data_setting } => writeln!(out, "all devices, {}", ds(*data_setting)),
        EntryKind::Select { device_id, data_setting } => {
            writeln!(out, "select {}, {}", dev(*device_id), ds(*data_setting))
        }
        EntryKind::StartRange { device_id, data_setting } => {
            writeln!(out, "range start {}, {}", dev(*device_id), ds(*data_setting))
        }
        EntryKind::EndRange { device_id } => writeln!(out, "range end {}", dev(*device_id)),
        EntryKind::AliasSelect { device_id, data_setting, alias } => {
            writeln!(out, "alias select {} as {}, {}", dev(*device_id), dev(*alias), ds(*data_setting))
        }
        EntryKind::AliasStartRange { device_id, data_setting, alias } => {
            writeln!(out, "alias range start {} as {}, {}", dev(*device_id), dev(*alias), ds(*data_setting))
        }
        EntryKind::ExtSelect { device_id, data_setting, ext } => {
            writeln!(out, "extended select {}, {}, ext {:#010x}", dev(*device_id), ds(*data_setting), ext)
        }
        EntryKind::ExtStartRange { device_id, data_setting, ext } => {
            writeln!(out, "extended range start {}, {}, ext {:#010x}", dev(*device_id), ds(*data_setting), ext)
        }
        EntryKind::Special { handle, device_id, data_setting, variety } => {
            let what = match *variety {
                ivrs::VARIETY_IOAPIC => "IOAPIC".to_string(),
                ivrs::VARIETY_HPET => "HPET".to_string(),
                v => format!("variety {v:#04x}"),
            };
            writeln!(out, "special {what} handle {:#04x} source {}, {}", handle, dev(*device_id), ds(*data_setting))
        }
        EntryKind::AcpiHid { device_id, data_setting, hid, cid, uid } => {
            let uid = match uid {
                Uid::None => "none".to_string(),
                Uid::Integer(v) => format!("{v:#x}"),
                Uid::String(s) => format!("\"{}\"", s.escape_debug()),
                Uid::Other { format, bytes } => format!("format {format} bytes {bytes:02x?}"),
            };
            writeln!(
                out,
                "ACPI HID \"{}\" CID \"{}\" UID {} device {}, {}",
                ivrs::id_string(hid),
                ivrs::id_string(cid),
                uid,
                dev(*device_id),
                ds(*data_setting)
            )
        }
        EntryKind::Reserved { length } => writeln!(out, "reserved ({length} bytes, skipped)"),
    };
}

fn describe_ivrs(t: &Ivrs) -> String {
    let mut out = String::new();
    describe_header(&mut out, &t.header);
    let _ = writeln!(out, "  IVinfo {:#010x}", t.iv_info);
    for b in &t.blocks {
        match b {
            Block::Ivhd(h) => {
                let _ = writeln!(
                    out,
                    "  IVHD type {:#04x} @{:#x}: flags {:#04x} IOMMU {} capability offset {:#x} base {:#x} segment {:#06x} info {:#06x}",
                    h.kind,
                    h.offset,
                    h.flags,
                    dev(h.device_id),
                    h.capability_offset,
                    h.base_address,
                    h.segment,
                    h.info
                );
                if h.kind == ivrs::IVHD_TYPE_10 {
                    let _ = writeln!(out, "    feature reporting {:#010x}", h.feature);
                } else {
                    let _ = writeln!(
                        out,
                        "    attributes {:#010x} EFR {:#018x} EFR2 {:#018x}",
                        h.feature,
                        h.efr.unwrap_or(0),
                        h.efr2.unwrap_or(0)
                    );
                }
                for e in &h.entries {
                    describe_entry(&mut out, e);
                }
                match h.device_ranges() {
                    Ok(ranges) => {
                        for r in ranges {
                            let _ = write!(
                                out,
                                "    covers {}..={} data setting {:#04x}",
                                Bdf::from_requester_id(r.first),
                                Bdf::from_requester_id(r.last),
                                r.data_setting
                            );
                            if let Some(a) = r.alias {
                                let _ = write!(out, " alias {}", dev(a));
                            }
                            if let Some(x) = r.ext {
                                let _ = write!(out, " ext {x:#010x}");
                            }
                            out.push('\n');
                        }
                    }
                    Err(e) => {
                        let _ = writeln!(out, "    device ranges: {e}");
                    }
                }
            }
            Block::Ivmd(m) => {
                let _ = writeln!(
                    out,
                    "  IVMD type {:#04x} @{:#x}: flags {:#04x} device {} aux {:#06x} start {:#x} length {:#x}",
                    m.kind,
                    m.offset,
                    m.flags,
                    dev(m.device_id),
                    m.aux_data,
                    m.start,
                    m.length
                );
            }
            Block::Unknown { kind, offset, length } => {
                let _ = writeln!(out, "  block type {kind:#04x} @{offset:#x} length {length:#x} (skipped)");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../drivers/acpi-tables/tests/corpus")
    }

    fn first(sub: &str) -> PathBuf {
        let mut v: Vec<_> = std::fs::read_dir(corpus().join(sub)).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v.remove(0)
    }

    #[test]
    fn json_lines_for_corpus_tables() {
        for sub in ["dmar", "ivrs"] {
            let (out, ok) = render_file(&first(sub), true);
            assert!(ok, "{out}");
            assert_eq!(out.lines().count(), 1);
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["signature"], sub.to_uppercase());
            assert!(v["file"].is_string());
        }
    }

    #[test]
    fn text_for_corpus_tables() {
        let (out, ok) = render_file(&first("dmar"), false);
        assert!(ok);
        assert!(out.contains("DRHD @0x30"), "{out}");
        let (out, ok) = render_file(&first("ivrs"), false);
        assert!(ok);
        assert!(out.contains("IVHD type 0x10"), "{out}");
    }

    #[test]
    fn errors_are_reported_and_the_rest_processed() {
        let dir = std::env::temp_dir().join(format!("xtask-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.dat");
        let mut bytes = std::fs::read(first("dmar")).unwrap();
        bytes[9] = bytes[9].wrapping_add(1);
        std::fs::write(&bad, &bytes).unwrap();
        let (out, ok) = render_file(&bad, true);
        assert!(!ok);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v["error"].as_str().unwrap().contains("checksum"), "{out}");
        let (out, ok) = render_file(&dir.join("missing.dat"), true);
        assert!(!ok);
        assert!(out.contains("cannot read"));
        let ok = run(&[bad, first("ivrs")], false).unwrap();
        assert!(!ok);
        assert!(run(&[first("ivrs")], true).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
