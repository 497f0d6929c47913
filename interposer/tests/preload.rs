//! Loads the interposer with `LD_PRELOAD` into C programs built here and
//! checks what they report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The cdylib cargo built with this test (next to the test binary, or one
/// directory up).
fn library() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    for dir in [deps, deps.parent().expect("profile dir")] {
        let p = dir.join("libportcullis_interposer.so");
        if p.exists() {
            return p;
        }
    }
    panic!("libportcullis_interposer.so not found next to {}", exe.display());
}

/// Builds `tests/c/<name>.c` dynamically linked; needs a C compiler.
fn build(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c").join(format!("{name}.c"));
    // Tests run in parallel and may build the same program: each build
    // goes to its own file, renamed into place (atomic).
    static BUILDS: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out = dir.join(name);
    let tmp = dir.join(format!("{name}.{}.{}", std::process::id(), BUILDS.fetch_add(1, Ordering::Relaxed)));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .args(["-O1", "-g", "-Wall", "-Werror", "-pthread", "-o"])
        .arg(&tmp)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler {cc}: {e} (set CC)"));
    assert!(st.success(), "compiling {}", src.display());
    std::fs::rename(&tmp, &out).expect("move the program into place");
    out
}

fn run(prog: &Path) -> (bool, String) {
    let out = Command::new(prog).env("LD_PRELOAD", library()).output().expect("run the C program");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn an_unmodified_c_program_maps_checks_and_unmaps_through_a_mock_domain() {
    let (ok, text) = run(&build("basic"));
    assert!(ok, "the C program failed:\n{text}");
    for want in [
        "ok - IOAS_MAP",
        "ok - MD_CHECK_MAP: the domain maps the buffer's pages",
        "ok - MD_CHECK_REFS: each page pinned once",
        "ok - the IOAS still reads the unmapped pages",
        "ok - IOAS and process now see different pages",
        "ok - command at a wild pointer: EFAULT",
        "ok - IOAS_MAP of kernel addresses: EFAULT",
        "ok - non-zero tail: E2BIG",
        "ok - the fault descriptor is real and close-on-exec",
        "ok - the context lives on in the duplicate",
        "ok - read on a write-only context: EBADF",
        "ok - write on a read-only context: EBADF",
        "ok - ioctl on another file reaches the kernel",
        "done",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

/// The same program without `CAP_SYS_RESOURCE` (and `CAP_IPC_LOCK`):
/// setting the RLIMIT_MODE is `EPERM`, as on Linux. Needs root and
/// `setpriv` to drop the capabilities; a process without them already
/// takes that path in the test above.
#[test]
fn without_cap_sys_resource_the_rlimit_mode_is_eperm() {
    let prog = build("basic");
    let dropped = run_without_caps(&prog, "-sys_resource,-ipc_lock");
    let checked = dropped.is_some();
    let out = dropped.unwrap_or_else(|| Command::new(&prog).env("LD_PRELOAD", library()).output().expect("run"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("done"), "{text}");
    if checked {
        assert!(text.contains("ok - RLIMIT_MODE set without CAP_SYS_RESOURCE: EPERM"), "{text}");
    }
}

#[test]
fn without_the_library_dev_iommu_is_the_kernels() {
    // The same program without LD_PRELOAD must not reach our code: on a
    // host without iommufd it fails at the open, proving the test above
    // ran against the interposer (on a host with iommufd and no mock
    // domains it fails at MOCK_DOMAIN).
    let out = Command::new(build("basic")).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && !text.contains("done"), "{text}");
}

/// A thread storing to a buffer while another pins it (its pages move
/// into the store): no store is lost, and the domain maps the pages the
/// process sees afterwards.
#[test]
fn stores_racing_a_pin_are_not_lost() {
    let (ok, text) = run(&build("racing"));
    assert!(ok && text.contains("no store lost") && text.contains("done"), "{text}");
}

#[test]
fn threads_share_one_descriptor() {
    let (ok, text) = run(&build("threads"));
    assert!(ok && text.contains("ok - 4 threads x 100 map/check/unmap rounds on one descriptor"), "{text}");
}

#[test]
fn random_commands_and_pointers_never_crash() {
    let (ok, text) = run(&build("fuzz"));
    assert!(ok && text.contains("ok - 20000 random calls survived"), "{text}");
}

#[test]
fn fail_nth_sweeps_the_fault_points() {
    let (ok, text) = run(&build("failnth"));
    assert!(ok && text.contains("ok - fail-nth 1 fails the open with ENOMEM"), "{text}");
    assert!(text.contains("then succeeded"), "{text}");
}

#[test]
fn fork_copies_private_pinned_memory_and_refuses_inherited_descriptors() {
    let (ok, text) = run(&build("fork"));
    assert!(ok && text.contains("ok - the child's store to private memory stayed its own"), "{text}");
    assert!(text.contains("ok - child: the inherited descriptor is refused"), "{text}");
    assert!(text.contains("ok - shared memory stayed shared") && text.contains("done"), "{text}");
}

#[test]
fn a_shared_mapping_of_a_memfd_pins_the_files_pages() {
    let prog = build("memfd");
    let (ok, text) = run(&prog);
    assert!(ok && text.contains("ok - the same pages, pinned twice") && text.contains("done"), "{text}");
    // Without CAP_SYS_ADMIN and CAP_CHECKPOINT_RESTORE the file is found
    // among the open descriptors instead of /proc/self/map_files.
    if let Some(out) = run_without_caps(&prog, "-sys_admin,-checkpoint_restore") {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("done"), "{text}");
    }
}

/// Runs `prog` under the interposer with `caps` dropped from the bounding
/// set (`setpriv`), when root and `setpriv` make that possible.
fn run_without_caps(prog: &Path, caps: &str) -> Option<std::process::Output> {
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().find(|p| Path::new(p).exists())?;
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")));
    if !root {
        return None;
    }
    Some(
        Command::new(setpriv)
            .args(["--bounding-set", caps, "--"])
            .arg(prog)
            .env("LD_PRELOAD", library())
            .output()
            .expect("run under setpriv"),
    )
}

/// Pins charged per user across contexts and processes, and (with
/// `CAP_SYS_RESOURCE`, to set the mode) per process in RLIMIT_MODE 1, under
/// a lowered `RLIMIT_MEMLOCK`. As root, `CAP_IPC_LOCK` is dropped first
/// (with it nothing is charged, as on Linux). The user's ledger goes to a
/// directory of the test's own, so no other test's pins count.
#[test]
fn pins_are_charged_per_user_and_per_process_across_contexts() {
    let prog = build("accounting");
    let ledger = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ledger);
    std::fs::create_dir_all(&ledger).unwrap();
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")));
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().find(|p| Path::new(p).exists());
    let out = match (root, setpriv) {
        (true, Some(setpriv)) => Command::new(setpriv)
            .args(["--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock", "--"])
            .arg(&prog)
            .arg("mm")
            .env("LD_PRELOAD", library())
            .env("PORTCULLIS_LEDGER_DIR", &ledger)
            .output()
            .expect("run under setpriv"),
        // Unprivileged: no CAP_IPC_LOCK already, and no CAP_SYS_RESOURCE
        // to set the mode, so the user's counter only.
        (false, _) => Command::new(&prog)
            .env("LD_PRELOAD", library())
            .env("PORTCULLIS_LEDGER_DIR", &ledger)
            .output()
            .expect("run"),
        (true, None) => {
            eprintln!("root without setpriv: cannot drop CAP_IPC_LOCK, nothing is charged; not checked");
            return;
        }
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("done"), "{text}");
    // The process counter needs RLIMIT_MODE 1, which needs
    // CAP_SYS_RESOURCE: some machines do not give it even to root.
    if root && !text.contains("skip - RLIMIT_MODE 1") {
        assert!(text.contains("ok - 4 more: 16"), "the process counter was checked: {text}");
    }
    let _ = std::fs::remove_dir_all(&ledger);
}

/// 64 rounds of a fresh 4 MiB buffer moved into the store, mapped,
/// checked, unmapped and freed: the store's offsets are reused, so they
/// stay within a few buffers instead of growing by 256 MiB.
#[test]
fn store_offsets_are_reused() {
    let (ok, text) = run(&build("reuse"));
    assert!(ok && text.contains("done"), "{text}");
}

#[test]
fn a_fault_queue_polls_readable_while_faults_wait() {
    let (ok, text) = run(&build("iopf"));
    assert!(ok && text.contains("ok - now it polls readable") && text.contains("done"), "{text}");
}
