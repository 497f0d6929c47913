//! Every real-machine table in tests/corpus must parse without error.

use std::path::{Path, PathBuf};

use acpi_tables::dmar::Dmar;
use acpi_tables::ivrs::Ivrs;

fn corpus_files(sub: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(sub);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "dat"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus files in {}", dir.display());
    files
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn every_dmar_parses() {
    let mut failures = Vec::new();
    let files = corpus_files("dmar");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        match Dmar::parse(&bytes) {
            Ok(d) => {
                assert!(d.drhds().count() > 0, "{}: no DRHD", name(f));
            }
            Err(e) => failures.push(format!("{}: {e}", name(f))),
        }
    }
    assert!(failures.is_empty(), "{} of {} DMAR tables failed:\n{}", failures.len(), files.len(), failures.join("\n"));
}

#[test]
fn every_ivrs_parses() {
    let mut failures = Vec::new();
    let files = corpus_files("ivrs");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        match Ivrs::parse(&bytes) {
            Ok(t) => {
                if t.ivhds().count() == 0 {
                    failures.push(format!("{}: no IVHD", name(f)));
                }
                for h in t.ivhds() {
                    if let Err(e) = h.device_ranges() {
                        failures.push(format!("{}: device ranges of IVHD at {:#x}: {e}", name(f), h.offset));
                    }
                }
            }
            Err(e) => failures.push(format!("{}: {e}", name(f))),
        }
    }
    assert!(failures.is_empty(), "{} of {} IVRS tables failed:\n{}", failures.len(), files.len(), failures.join("\n"));
}
