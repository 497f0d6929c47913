//! QEMU configurations, the version check, building the kernels and booting
//! one of them with a time limit.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// One QEMU machine configuration of the test matrix.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Name (passed to the guest as `config=NAME`).
    pub name: &'static str,
    /// Devices beyond the common arguments.
    pub devices: &'static [&'static str],
    /// What it is for.
    pub about: &'static str,
    /// Kernel command line words beyond `config=NAME` (empty for most).
    pub cmdline: &'static str,
}

/// Five edu DMA engines: one on the root bus; one behind a PCIe root port
/// (a sub-hierarchy scope) that can address all 64 bits; one behind a
/// PCIe-to-PCI bridge, whose DMA carries the bridge's requester id; a
/// second 64-bit one on the root bus at slot 6 and a third root-bus one at
/// slot 7 (QEMU's AMD-Vi sees devices behind bridges under bus 0, so its
/// tests use root-bus devices: two guests and the host need three).
const EDUS: [&str; 14] = [
    "-device",
    "edu",
    "-device",
    "pcie-root-port,id=rp1,chassis=1,slot=1",
    "-device",
    "edu,bus=rp1,dma_mask=0xffffffffffffffff",
    "-device",
    "pcie-pci-bridge,id=pb1,bus=pcie.0,addr=0x5",
    "-device",
    "edu,bus=pb1,addr=0x1",
    "-device",
    "edu,addr=0x6,dma_mask=0xffffffffffffffff",
    "-device",
    "edu,addr=0x7",
];

macro_rules! devices {
    ($($d:expr),*) => {
        &[$($d,)* EDUS[0], EDUS[1], EDUS[2], EDUS[3], EDUS[4], EDUS[5], EDUS[6], EDUS[7], EDUS[8], EDUS[9], EDUS[10], EDUS[11], EDUS[12], EDUS[13]]
    };
}

/// The test matrix, in the order `cargo xtask test` runs it.
pub const CONFIGS: &[Config] = &[
    Config { name: "none", devices: devices!(), about: "no IOMMU", cmdline: "" },
    Config {
        name: "intel",
        devices: devices!("-device", "intel-iommu"),
        about: "Intel VT-d, legacy mode",
        cmdline: "",
    },
    Config {
        name: "intel-sm",
        devices: devices!("-device", "intel-iommu,x-scalable-mode=on,x-pasid-mode=on"),
        about: "Intel VT-d, scalable mode, requests with PASID (ECAP.PASID)",
        cmdline: "",
    },
    Config {
        name: "intel-fs",
        devices: devices!("-device", "intel-iommu,x-scalable-mode=on,x-flts=on,aw-bits=48"),
        about: "Intel VT-d, scalable mode, first-stage translation",
        cmdline: "",
    },
    Config {
        name: "intel-rb",
        devices: devices!("-device", "intel-iommu"),
        about: "Intel VT-d, legacy mode, register-based invalidation",
        cmdline: "",
    },
    Config {
        name: "intel-cm",
        devices: devices!("-device", "intel-iommu,caching-mode=on"),
        about: "Intel VT-d, caching mode",
        cmdline: "",
    },
    Config { name: "amd", devices: devices!("-device", "amd-iommu,pt=off"), about: "AMD-Vi, translating", cmdline: "" },
    Config {
        name: "amd-ir",
        devices: devices!("-device", "amd-iommu,pt=off,intremap=on"),
        about: "AMD-Vi, translating, interrupt remapping",
        cmdline: "",
    },
    Config {
        name: "intel-x2apic",
        devices: devices!("-device", "intel-iommu,intremap=on,eim=on"),
        about: "Intel VT-d, interrupt remapping with x2APIC destinations (EIM), local APIC in x2APIC mode",
        cmdline: "x2apic=1",
    },
    Config {
        name: "amd-x2apic",
        devices: devices!("-device", "amd-iommu,pt=off,intremap=on,xtsup=on"),
        about: "AMD-Vi, translating, interrupt remapping with x2APIC destinations (XTSup), local APIC in x2APIC mode",
        cmdline: "x2apic=1",
    },
];

/// The configuration `cargo xtask run` boots by default.
pub const DEFAULT_RUN_CONFIG: &str = "intel";

/// Looks a configuration up by name.
pub fn config(name: &str) -> Result<Config> {
    CONFIGS.iter().find(|c| c.name == name).copied().with_context(|| {
        let names: Vec<_> = CONFIGS.iter().map(|c| c.name).collect();
        format!("unknown configuration {name:?}; known: {}", names.join(", "))
    })
}

/// QEMU exit statuses written by the kernel through isa-debug-exit
/// (`(value << 1) | 1`; values in kernel/src/arch/exit.rs).
pub const EXIT_SUCCESS: i32 = 33;
/// At least one test failed.
pub const EXIT_FAILURE: i32 = 35;
/// A panic or CPU exception.
pub const EXIT_CRASH: i32 = 37;

const QEMU: &str = "qemu-system-x86_64";

/// Fails with instructions unless QEMU 10 or newer is installed.
pub fn check_qemu() -> Result<String> {
    let hint = "Portcullis needs qemu-system-x86_64 10.0 or newer. On Debian bookworm it comes from \
                bookworm-backports: run `bash .ci/setup` (as root or with sudo), or add the \
                bookworm-backports suite and `apt-get install -t bookworm-backports qemu-system-x86`.";
    let out = match Command::new(QEMU).arg("--version").output() {
        Ok(o) => o,
        Err(_) => bail!("{QEMU} not found.\n{hint}"),
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let first = text.lines().next().unwrap_or("").to_string();
    let major: Option<u32> =
        first.split("version ").nth(1).and_then(|v| v.split('.').next()).and_then(|m| m.trim().parse().ok());
    match major {
        Some(m) if m >= 10 => Ok(first),
        Some(_) => bail!("{first} is too old.\n{hint}"),
        None => bail!("could not read the QEMU version from {first:?}.\n{hint}"),
    }
}

/// What `cargo xtask` needs from the machine besides the Rust toolchain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `qemu-system-x86_64` 10.0 or newer.
    Qemu,
    /// `iasl` (acpica-tools), for the parser's cross-check.
    Iasl,
    /// The `x86_64-unknown-none` standard library.
    BareMetalTarget,
}

impl Tool {
    fn present(self) -> bool {
        match self {
            Self::Qemu => check_qemu().is_ok(),
            Self::Iasl => Command::new("iasl").arg("-v").output().is_ok(),
            Self::BareMetalTarget => {
                let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
                Command::new(rustc)
                    .current_dir(root())
                    .args(["--print", "target-libdir", "--target", "x86_64-unknown-none"])
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string()))
                    .is_some_and(|dir| dir.join("libcore.rlib").exists() || has_core(&dir))
            }
        }
    }
    fn what(self) -> &'static str {
        match self {
            Self::Qemu => "QEMU 10 (qemu-system-x86, from bookworm-backports)",
            Self::Iasl => "iasl (acpica-tools)",
            Self::BareMetalTarget => "the x86_64-unknown-none target (rustup, from rust-toolchain.toml)",
        }
    }
}

fn has_core(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .is_ok_and(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().starts_with("libcore-")))
}

/// Installs what of `tools` is missing with `.ci/setup` (saying what it
/// installs first), unless `PORTCULLIS_NO_SETUP` is set; then checks again.
/// Returns QEMU's version line when QEMU was asked for.
pub fn ensure(tools: &[Tool]) -> Result<Option<String>> {
    let missing: Vec<Tool> = tools.iter().copied().filter(|t| !t.present()).collect();
    if !missing.is_empty() {
        let list: Vec<&str> = missing.iter().map(|t| t.what()).collect();
        if std::env::var_os("PORTCULLIS_NO_SETUP").is_some() {
            println!("==> missing: {} (PORTCULLIS_NO_SETUP is set: not installing)", list.join(", "));
        } else {
            println!("==> missing: {}; installing with `bash .ci/setup` (apt-get needs root or sudo)", list.join(", "));
            let status = Command::new("bash").arg(root().join(".ci/setup")).current_dir(root()).status()?;
            if !status.success() {
                bail!(".ci/setup failed ({status}); install {} by hand", list.join(", "));
            }
        }
        let still: Vec<Tool> = missing.iter().copied().filter(|t| !t.present()).collect();
        // Without iasl one test passes vacuously; without the others
        // nothing can run.
        if still.iter().any(|t| *t != Tool::Iasl) {
            let list: Vec<&str> = still.iter().map(|t| t.what()).collect();
            bail!("still missing: {}", list.join(", "));
        }
        if still.contains(&Tool::Iasl) {
            println!("==> iasl is still missing: the parser's iasl cross-check passes vacuously");
        }
    }
    if tools.contains(&Tool::Qemu) { check_qemu().map(Some) } else { Ok(None) }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Builds a kernel binary for the bare-metal target; returns the ELF path.
pub fn build_kernel(package: &str, bin: &str, release: bool) -> Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "--package", package, "--bin", bin, "--target", "x86_64-unknown-none"]);
    if release {
        c.arg("--release");
    }
    let status = c.status().context("running cargo build")?;
    if !status.success() {
        bail!("building {bin} failed");
    }
    let dir = target_dir().join("x86_64-unknown-none").join(if release { "release" } else { "debug" });
    Ok(dir.join(bin))
}

/// Cargo's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

/// The full QEMU argument list for one boot.
pub fn args(config: &Config, kernel: &Path, cmdline: &str, serial: &str, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "1G",
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(config.devices.iter().map(|s| s.to_string()));
    a.extend(extra.iter().cloned());
    a.extend(["-serial".into(), serial.into(), "-kernel".into(), kernel.display().to_string()]);
    let cmdline = if config.cmdline.is_empty() { cmdline.to_string() } else { format!("{cmdline} {}", config.cmdline) };
    a.extend(["-append".into(), cmdline]);
    a
}

/// How one boot ended.
#[derive(Debug)]
pub enum Ended {
    /// QEMU exited with this status.
    Exited(ExitStatus),
    /// The time limit ran out and QEMU was killed.
    TimedOut,
}

/// Starts QEMU (its stdout going to `stdout`: serial when `-serial stdio`) and waits at most `limit`, calling
/// `tick` about ten times a second (for progress).
pub fn boot(args: &[String], limit: Duration, stdout: Stdio, mut tick: impl FnMut()) -> Result<Ended> {
    let mut child: Child = Command::new(QEMU)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {QEMU}"))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if status.code() == Some(1) || status.code().is_none() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                if !err.trim().is_empty() {
                    eprintln!("qemu: {}", err.trim());
                }
            }
            return Ok(Ended::Exited(status));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Ended::TimedOut);
        }
        tick();
        std::thread::sleep(Duration::from_millis(100));
    }
}
