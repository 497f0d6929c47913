//! The hypervisor kernel links with the PVH linker script on the bare-metal target.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default() == "none" {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        let script = std::path::Path::new(&dir).join("../boot/linker.ld");
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        println!("cargo:rerun-if-changed={}", script.display());
    }
}
