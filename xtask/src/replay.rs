//! `cargo xtask uapi-replay FILE.jsonl...`: differential replay of recorded
//! Linux iommufd uAPI calls against `iommufd::dispatch::ioctl`.
//!
//! A recording (made by the Linux peer's `uapi_record` under QEMU, see
//! `iommufd/tests/data/linux-uapi/README.md`) holds one JSON object per
//! call: `seed`, `step`, `cmd` (hex string), `in` (hex of the argument
//! struct plus 16 bytes past it), `aux_in` (128 bytes of the aux page before
//! the call), `ret`, `errno`, `out`, `aux_out`.
//!
//! Every seed is replayed on a fresh [`Ictx`] over a [`FakeAddressSpace`]
//! laid out like the recorder's process: a 64 MiB arena at [`ARENA`]
//! (page k starts with the byte `k & 0xff`, the rest zero) and one aux page
//! at [`AUX`] whose first 128 bytes are set to `aux_in` before each call.
//! Nothing else is mapped, and pins are unlimited (the recorder runs as
//! root, whose CAP_IPC_LOCK exempts it from Linux's pinned-page limit).
//!
//! Object ids are opaque: every id Linux returned is mapped to the id we
//! returned for the same call, id fields of the input are translated before
//! the call, and id fields of Linux's output are translated before the
//! outputs are compared. A *new* id that differs numerically from Linux's
//! is itself reported (both sides allocate the lowest free id, so it means
//! the set of live objects already differs).
//!
//! Descriptors a call creates (a fault queue's `out_fault_fd`) are paired
//! the same way in their own map, and their numbering is never compared
//! (Linux numbers them from the process's lowest free descriptor).
//!
//! Two pseudo-commands stand for the `read(2)` and `write(2)` of a fault
//! queue descriptor (recorder mix 2): [`PSEUDO_READ`] and
//! [`PSEUDO_WRITE`], whose `in` is `{u32 fd, u32 count}` (plus 16 zero
//! bytes), whose buffer is the aux page and whose `ret` is the byte count.
//!
//! Differences can be allowed by `allow.toml`-like lines, see [`Allow`].

use anyhow::{Context, Result, bail};
use iommufd::ctx::Ictx;
use iommufd::dispatch::ioctl;
use iommufd::errno::Errno;
use iommufd::memsrc::{FakeAddressSpace, MemorySource};
use iommufd::uapi::*;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Base of the recorder's 64 MiB arena (`user_va` targets).
pub const ARENA: u64 = 0x1000_0000_0000;
/// Length of the arena.
pub const ARENA_LEN: u64 = 64 << 20;
/// The aux page (iova range arrays).
pub const AUX: u64 = 0x2000_0000_0000;
/// Bytes of the aux page the recording holds.
pub const AUX_REC_LEN: usize = 128;
/// Pseudo-command: `read(fd, aux page, count)` of a fault queue.
pub const PSEUDO_READ: u32 = 0xf000_0001;
/// Pseudo-command: `write(fd, aux page, count)` of a fault queue.
pub const PSEUDO_WRITE: u32 = 0xf000_0002;

fn is_pseudo(cmd: u32) -> bool {
    cmd == PSEUDO_READ || cmd == PSEUDO_WRITE
}

/// The recorder's argument buffer (`uint8_t buf[256]`, zero past the struct).
const ARG_BUF_LEN: usize = 256;
const PAGE: u64 = 4096;

// ---------------------------------------------------------------------------
// Hex
// ---------------------------------------------------------------------------

/// Decodes a string of hex digit pairs (either case).
pub fn hex_decode(s: &str) -> Result<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        bail!("odd number of hex digits ({})", b.len());
    }
    b.chunks(2)
        .enumerate()
        .map(|(i, p)| match (nibble(p[0]), nibble(p[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => bail!("bad hex digit at offset {}", 2 * i),
        })
        .collect()
}

/// Encodes bytes as lower-case hex.
pub fn hex_encode(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 * b.len());
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

// ---------------------------------------------------------------------------
// Recorded calls
// ---------------------------------------------------------------------------

/// One recorded call.
#[derive(Clone, Debug)]
pub struct Call {
    /// Where it came from, `file:line`.
    pub origin: String,
    pub seed: i64,
    pub step: i64,
    pub cmd: u32,
    pub input: Vec<u8>,
    pub aux_in: Vec<u8>,
    pub ret: i64,
    pub errno: i32,
    pub out: Vec<u8>,
    pub aux_out: Vec<u8>,
}

fn parse_line(v: &serde_json::Value) -> Result<Call> {
    let int = |k: &str| v.get(k).and_then(|x| x.as_i64()).with_context(|| format!("missing integer field `{k}`"));
    let hex = |k: &str| -> Result<Vec<u8>> {
        let s = v.get(k).and_then(|x| x.as_str()).with_context(|| format!("missing string field `{k}`"))?;
        hex_decode(s).with_context(|| format!("field `{k}`"))
    };
    let cmd_s = v.get("cmd").and_then(|x| x.as_str()).context("missing string field `cmd`")?;
    let cmd = u32::from_str_radix(cmd_s.trim_start_matches("0x").trim_start_matches("0X"), 16)
        .with_context(|| format!("bad cmd {cmd_s:?}"))?;
    let c = Call {
        origin: String::new(),
        seed: int("seed")?,
        step: int("step")?,
        cmd,
        input: hex("in")?,
        aux_in: hex("aux_in")?,
        ret: int("ret")?,
        errno: int("errno")? as i32,
        out: hex("out")?,
        aux_out: hex("aux_out")?,
    };
    if c.out.len() != c.input.len() {
        bail!("`out` has {} bytes, `in` {}", c.out.len(), c.input.len());
    }
    if c.aux_in.len() != AUX_REC_LEN || c.aux_out.len() != AUX_REC_LEN {
        bail!("`aux_in`/`aux_out` have {}/{} bytes, not {AUX_REC_LEN}", c.aux_in.len(), c.aux_out.len());
    }
    // A pseudo-command's `ret` is a byte count; an ioctl's is 0.
    let ok = if is_pseudo(c.cmd) { c.ret >= 0 } else { c.ret == 0 };
    if ok != (c.errno == 0) {
        bail!("ret {} with errno {}", c.ret, c.errno);
    }
    Ok(c)
}

/// Parses a JSONL recording. Lines that are not JSON objects (a stray
/// `done` marker, blank lines) are skipped.
pub fn parse_recording(text: &str, name: &str) -> Result<Vec<Call>> {
    let mut calls = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if !line.starts_with('{') {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{name}:{}: not JSON", i + 1))?;
        let mut c = parse_line(&v).with_context(|| format!("{name}:{}", i + 1))?;
        c.origin = format!("{name}:{}", i + 1);
        calls.push(c);
    }
    Ok(calls)
}

// ---------------------------------------------------------------------------
// Names and summaries (fields from `iommufd::uapi::command_fields`, whose
// offsets come from the structs' own declarations)
// ---------------------------------------------------------------------------

/// `sizeof` the command's struct, if known.
fn struct_size(cmd: u32) -> Option<usize> {
    if cmd == IOMMU_TEST_CMD {
        return Some(IommuTestCmd::SIZE);
    }
    COMMANDS.iter().find(|c| c.cmd == cmd).map(|c| c.struct_size as usize)
}

/// A printable name: the ioctl name, plus the op for IOMMU_TEST_CMD.
pub fn call_name(cmd: u32, input: &[u8]) -> String {
    match cmd {
        PSEUDO_READ => return "read(fault fd)".into(),
        PSEUDO_WRITE => return "write(fault fd)".into(),
        _ => {}
    }
    let base = command_name(cmd).map_or_else(|| format!("ioctl {cmd:#x}"), str::to_string);
    if cmd != IOMMU_TEST_CMD {
        return base;
    }
    let op = u32::get(input, 4);
    match test_op(op) {
        Some(o) => format!("{base}/{}", o.name),
        None => format!("{base}/op={op}"),
    }
}

/// The name of the field (or byte) at offset `off` of the argument bytes.
fn field_at(fields: &[ArgField], ssize: Option<usize>, off: usize) -> (String, Option<ArgField>) {
    if let Some(f) = fields.iter().find(|f| off >= f.offset && off < f.offset + f.size) {
        return (f.name.to_string(), Some(*f));
    }
    match ssize {
        Some(s) if off >= s => (format!("tail+{}", off - s), None),
        _ => (format!("byte {off}"), None),
    }
}

fn show(v: u64) -> String {
    if v < 10 { v.to_string() } else { format!("{v:#x}") }
}

/// `{size=40 flags=0x7 ioas_id=1 ...}`: the input's fields (zero
/// `__reserved` fields left out), plus any non-zero tail bytes.
pub fn summarize(cmd: u32, input: &[u8]) -> String {
    if is_pseudo(cmd) {
        return format!("{{fd={} count={}}}", u32::get(input, 0), u32::get(input, 4));
    }
    let fields = command_fields(cmd, input);
    let mut s = String::from("{");
    for f in &fields {
        let Some(v) = f.get(input) else { continue };
        if v == 0 && (f.name.ends_with("__reserved") || f.name == "last") {
            continue;
        }
        if f.name.starts_with("mock_domain") && v == 0 {
            continue;
        }
        if s.len() > 1 {
            s.push(' ');
        }
        let _ = write!(s, "{}={}", f.name, show(v));
    }
    if fields.is_empty() {
        let _ = write!(s, "bytes={}", hex_encode(input));
    } else if let Some(ss) = struct_size(cmd) {
        let tail: Vec<String> = input
            .iter()
            .enumerate()
            .skip(ss)
            .filter(|(_, b)| **b != 0)
            .map(|(i, b)| format!("tail+{}={b:#04x}", i - ss))
            .collect();
        if !tail.is_empty() {
            let _ = write!(s, " {}", tail.join(" "));
        }
    }
    s.push('}');
    s
}

fn errno_name(e: i32) -> String {
    if e == 0 {
        return "OK".into();
    }
    match Errno(e).name() {
        "E?" => format!("errno {e}"),
        n => n.to_string(),
    }
}

fn parse_errno(s: &str) -> Option<i32> {
    if s == "OK" || s == "0" {
        return Some(0);
    }
    if let Ok(n) = s.parse::<i32>() {
        return Some(n);
    }
    (1..200).find(|&e| Errno(e).name() == s)
}

// ---------------------------------------------------------------------------
// Allow-list
// ---------------------------------------------------------------------------

/// One allowed difference: `COMMAND key=value... -- reason`.
///
/// `COMMAND` is a call name as the report prints it (`IOMMU_IOAS_MAP`,
/// `IOMMU_TEST_CMD/MOCK_DOMAIN`) or `*`. Keys: `linux=` and `ours=` (errno
/// name or number, `OK` for success), `field=` (the first differing output
/// field, or `aux`, or `id`), `seed=`, `step=`. The reason after ` -- ` is
/// required. `#` starts a comment line.
#[derive(Clone, Debug)]
pub struct Allow {
    command: String,
    linux: Option<i32>,
    ours: Option<i32>,
    field: Option<String>,
    seed: Option<i64>,
    step: Option<i64>,
    pub reason: String,
    pub line: usize,
}

/// Parses an allow-list.
pub fn parse_allow(text: &str, name: &str) -> Result<Vec<Allow>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let ctx = || format!("{name}:{}", i + 1);
        let (cond, reason) = line.split_once(" -- ").with_context(|| format!("{}: no ` -- reason`", ctx()))?;
        let reason = reason.trim();
        if reason.is_empty() {
            bail!("{}: empty reason", ctx());
        }
        let mut words = cond.split_whitespace();
        let command = words.next().with_context(|| format!("{}: no command", ctx()))?.to_string();
        let mut a = Allow {
            command,
            linux: None,
            ours: None,
            field: None,
            seed: None,
            step: None,
            reason: reason.to_string(),
            line: i + 1,
        };
        for w in words {
            let (k, v) = w.split_once('=').with_context(|| format!("{}: `{w}` is not key=value", ctx()))?;
            let bad = || format!("{}: bad value in `{w}`", ctx());
            match k {
                "linux" => a.linux = Some(parse_errno(v).with_context(bad)?),
                "ours" => a.ours = Some(parse_errno(v).with_context(bad)?),
                "field" => a.field = Some(v.to_string()),
                "seed" => a.seed = Some(v.parse().with_context(bad)?),
                "step" => a.step = Some(v.parse().with_context(bad)?),
                _ => bail!("{}: unknown key `{k}`", ctx()),
            }
        }
        out.push(a);
    }
    Ok(out)
}

impl Allow {
    fn matches(&self, d: &Diff) -> bool {
        (self.command == "*" || self.command == d.name)
            && self.linux.is_none_or(|e| e == d.linux_errno)
            && self.ours.is_none_or(|e| e == d.our_errno)
            && self.field.as_ref().is_none_or(|f| Some(f) == d.field.as_ref())
            && self.seed.is_none_or(|s| s == d.seed)
            && self.step.is_none_or(|s| s == d.step)
    }
}

// ---------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------

/// One differing call.
#[derive(Clone, Debug)]
pub struct Diff {
    pub origin: String,
    pub seed: i64,
    pub step: i64,
    pub name: String,
    pub summary: String,
    pub linux_errno: i32,
    pub our_errno: i32,
    /// First differing output field (`aux` for the aux page, `id` for a
    /// new id numbered differently), if any.
    pub field: Option<String>,
    /// Human-readable detail of that field.
    pub detail: String,
    /// The first difference of its seed.
    pub first_in_seed: bool,
    /// Line and reason of the allow-list entry that covers it.
    pub allowed_by: Option<(usize, String)>,
}

impl Diff {
    fn line(&self) -> String {
        let mut s = format!(
            "seed {} step {} {} {}: Linux {}, ours {}",
            self.seed,
            self.step,
            self.name,
            self.summary,
            errno_name(self.linux_errno),
            errno_name(self.our_errno)
        );
        if !self.detail.is_empty() {
            let _ = write!(s, "; {}", self.detail);
        }
        if (self.linux_errno == 0) != (self.our_errno == 0) {
            s.push_str(" [one side changed state: later calls of this seed may differ because of it]");
        }
        if let Some((l, r)) = &self.allowed_by {
            let _ = write!(s, " [allowed by allow-list line {l}: {r}]");
        }
        s
    }
}

/// The result of a replay.
#[derive(Debug, Default)]
pub struct Report {
    pub calls: usize,
    pub agree: usize,
    pub diffs: Vec<Diff>,
}

impl Report {
    /// Differences no allow-list entry covers.
    pub fn unexpected(&self) -> usize {
        self.diffs.iter().filter(|d| d.allowed_by.is_none()).count()
    }
}

/// Linux id ↔ our id, one seed's worth.
#[derive(Default)]
struct IdMap {
    to_ours: HashMap<u64, u64>,
    to_linux: HashMap<u64, u64>,
}

impl IdMap {
    fn ours(&self, linux: u64) -> u64 {
        self.to_ours.get(&linux).copied().unwrap_or(linux)
    }
    fn learn(&mut self, linux: u64, ours: u64) {
        if linux == 0 || ours == 0 || self.to_ours.get(&linux) == Some(&ours) {
            return;
        }
        if let Some(old) = self.to_ours.remove(&linux) {
            self.to_linux.remove(&old);
        }
        if let Some(old) = self.to_linux.remove(&ours) {
            self.to_ours.remove(&old);
        }
        self.to_ours.insert(linux, ours);
        self.to_linux.insert(ours, linux);
    }
    fn translate(&self, fields: &[ArgField], b: &mut [u8]) {
        for f in fields.iter().filter(|f| f.is_id()) {
            if let Some(v) = f.get(b) {
                f.put(b, self.ours(v));
            }
        }
    }
}

/// The address space of the recorder's process.
pub fn recorder_memory() -> Arc<FakeAddressSpace> {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(ARENA, ARENA_LEN, true);
    for k in 0..ARENA_LEN / PAGE {
        let b = (k & 0xff) as u8;
        if b != 0 {
            mem.write_user(ARENA + k * PAGE, &[b]).expect("arena is mapped");
        }
    }
    mem.map(AUX, PAGE, true);
    mem
}

/// What the panic hook reports if iommufd panics mid-call.
static CURRENT: Mutex<String> = Mutex::new(String::new());

/// Replays `calls` (seeds in order; each seed on a fresh context).
pub fn replay(calls: &[Call], allow: &[Allow], verbose: bool) -> Report {
    let mut report = Report::default();
    let mut i = 0;
    while i < calls.len() {
        let seed = calls[i].seed;
        let end = calls[i..].iter().position(|c| c.seed != seed).map_or(calls.len(), |n| i + n);
        replay_seed(&calls[i..end], allow, verbose, &mut report);
        i = end;
    }
    report
}

fn replay_seed(calls: &[Call], allow: &[Allow], verbose: bool, report: &mut Report) {
    let mem = recorder_memory();
    let ictx = Ictx::new(mem.clone(), u64::MAX);
    let mut ids = IdMap::default();
    let mut fds = IdMap::default();
    let mut seen_diff = false;
    for c in calls {
        report.calls += 1;
        let fields = command_fields(c.cmd, &c.input);
        let name = call_name(c.cmd, &c.input);
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) =
            format!("{} seed {} step {} {} {}", c.origin, c.seed, c.step, name, summarize(c.cmd, &c.input));

        // Memory and argument as the recorder had them.
        let mut aux = vec![0u8; c.aux_in.len()];
        aux.copy_from_slice(&c.aux_in);
        mem.write_user(AUX, &aux).expect("aux page is mapped");
        let mut buf = vec![0u8; ARG_BUF_LEN.max(c.input.len())];
        buf[..c.input.len()].copy_from_slice(&c.input);
        ids.translate(&fields, &mut buf[..c.input.len()]);

        // (ret, errno): an ioctl's ret is 0 or -1, a read's or write's
        // the byte count.
        let (our_ret, our_errno) = if is_pseudo(c.cmd) {
            let fd = fds.ours(u32::get(&c.input, 0) as u64) as u32;
            let count = u32::get(&c.input, 4) as usize;
            let r = if c.cmd == PSEUDO_READ {
                ictx.fault_fd_read_user(fd, AUX, count)
            } else {
                ictx.fault_fd_write_user(fd, AUX, count)
            };
            match r {
                Ok(n) => (n as i64, 0),
                Err(e) => (-1, e.0),
            }
        } else {
            match ioctl(&ictx, c.cmd, &mut buf) {
                Ok(()) => (0, 0),
                Err(e) => (-1, e.0),
            }
        };
        let mut our_aux = vec![0u8; c.aux_out.len()];
        mem.read_user(AUX, &mut our_aux).expect("aux page is mapped");
        let ours = &buf[..c.input.len()];

        // New ids: learn the pairing, and note numbering differences.
        let mut id_note = None;
        if c.errno == 0 && our_errno == 0 {
            for f in fields.iter().filter(|f| f.kind == FieldKind::NewId) {
                let (Some(l), Some(o)) = (f.get(&c.out), f.get(ours)) else { continue };
                if l != 0 && o != 0 && l != o && ids.ours(l) != o && id_note.is_none() {
                    id_note = Some(format!("{}: new id Linux {l}, ours {o}", f.name));
                }
                ids.learn(l, o);
            }
            for f in fields.iter().filter(|f| f.kind == FieldKind::NewFd) {
                if let (Some(l), Some(o)) = (f.get(&c.out), f.get(ours)) {
                    fds.learn(l, o);
                }
            }
        }

        // Compare.
        let mut expect = c.out.clone();
        ids.translate(&fields, &mut expect);
        for f in fields.iter().filter(|f| f.kind == FieldKind::NewFd) {
            if let Some(v) = f.get(&expect) {
                f.put(&mut expect, fds.ours(v));
            }
        }
        let out_diff = expect.iter().zip(ours).position(|(a, b)| a != b);
        let aux_diff = c.aux_out.iter().zip(&our_aux).position(|(a, b)| a != b);
        let (field, detail) = if let Some(off) = out_diff {
            let (fname, f) = field_at(&fields, struct_size(c.cmd), off);
            let detail = match f {
                Some(f) => {
                    let l = f.get(&c.out).unwrap_or(0);
                    let o = f.get(ours).unwrap_or(0);
                    if f.is_id() {
                        format!("{fname}: Linux {} (ours would be {}), ours {}", show(l), show(ids.ours(l)), show(o))
                    } else {
                        format!("{fname}: Linux {}, ours {}", show(l), show(o))
                    }
                }
                None => format!("{fname}: Linux {:#04x}, ours {:#04x}", c.out[off], ours[off]),
            };
            (Some(fname), detail)
        } else if let Some(off) = aux_diff {
            let r = off / 16;
            let detail = format!(
                "aux page: range[{r}] Linux {{start={} last={}}}, ours {{start={} last={}}}",
                show(u64::get(&c.aux_out, r * 16)),
                show(u64::get(&c.aux_out, r * 16 + 8)),
                show(u64::get(&our_aux, r * 16)),
                show(u64::get(&our_aux, r * 16 + 8)),
            );
            (Some("aux".to_string()), detail)
        } else if let Some(n) = id_note {
            (Some("id".to_string()), n)
        } else if c.errno == 0 && our_errno == 0 && c.ret != our_ret {
            (Some("ret".to_string()), format!("returned Linux {}, ours {}", c.ret, our_ret))
        } else {
            (None, String::new())
        };

        if c.errno == our_errno && field.is_none() {
            report.agree += 1;
            if verbose {
                println!(
                    "  ok   seed {} step {} {} {}: {}",
                    c.seed,
                    c.step,
                    name,
                    summarize(c.cmd, &c.input),
                    errno_name(our_errno)
                );
            }
            continue;
        }
        let mut d = Diff {
            origin: c.origin.clone(),
            seed: c.seed,
            step: c.step,
            name,
            summary: summarize(c.cmd, &c.input),
            linux_errno: c.errno,
            our_errno,
            field,
            detail,
            first_in_seed: !seen_diff,
            allowed_by: None,
        };
        d.allowed_by = allow.iter().find(|a| a.matches(&d)).map(|a| (a.line, a.reason.clone()));
        if d.allowed_by.is_none() {
            seen_diff = true;
        } else {
            d.first_in_seed = false;
        }
        if verbose {
            println!("  DIFF {}", d.line());
        }
        report.diffs.push(d);
    }
}

/// Prints the report: per seed the first difference (prominently) and a
/// few later ones, then the differences grouped by kind, then the summary.
pub fn print_report(report: &Report, verbose: bool) {
    let mut by_seed: BTreeMap<i64, Vec<&Diff>> = BTreeMap::new();
    for d in &report.diffs {
        by_seed.entry(d.seed).or_default().push(d);
    }
    if !verbose {
        for (seed, ds) in &by_seed {
            let unexpected: Vec<&&Diff> = ds.iter().filter(|d| d.allowed_by.is_none()).collect();
            let allowed = ds.len() - unexpected.len();
            println!(
                "== seed {seed}: {} difference(s){}",
                unexpected.len(),
                if allowed > 0 { format!(", {allowed} allowed") } else { String::new() }
            );
            for d in &unexpected {
                if d.first_in_seed {
                    println!("   FIRST: {}", d.line());
                    println!("          ({}; later differences in this seed may follow from this one)", d.origin);
                } else {
                    println!("   later: {}", d.line());
                }
            }
            for d in ds.iter().filter(|d| d.allowed_by.is_some()) {
                println!("   allowed: {}", d.line());
            }
        }
    }
    // Group: command, errnos, first field.
    type Key = (String, String, String, String);
    let mut groups: BTreeMap<Key, (usize, usize, &Diff)> = BTreeMap::new();
    for d in report.diffs.iter().filter(|d| d.allowed_by.is_none()) {
        let key = (
            d.name.clone(),
            errno_name(d.linux_errno),
            errno_name(d.our_errno),
            d.field.clone().unwrap_or_else(|| "-".into()),
        );
        let e = groups.entry(key).or_insert((0, 0, d));
        e.0 += 1;
        if d.first_in_seed {
            e.1 += 1;
        }
    }
    if !groups.is_empty() {
        println!(
            "\n== differences by kind (command, Linux errno -> ours, first differing output field): count, first-in-seed count, example"
        );
        let mut g: Vec<_> = groups.into_iter().collect();
        g.sort_by(|a, b| b.1.1.cmp(&a.1.1).then(b.1.0.cmp(&a.1.0)));
        for ((name, l, o, f), (n, first, ex)) in g {
            println!("{n:6} {first:4}  {name}: Linux {l} -> ours {o}, field {f}");
            println!("              e.g. {}", ex.line());
        }
    }
    let allowed = report.diffs.len() - report.unexpected();
    println!();
    if allowed > 0 {
        println!("{allowed} of the differences are allowed by the allow-list");
    }
    println!("{} calls, {} agree, {} differ", report.calls, report.agree, report.diffs.len());
}

/// The default allow-list, next to the recordings.
pub fn default_allow_path() -> PathBuf {
    crate::qemu::root().join("iommufd/tests/data/linux-uapi/allow.toml")
}

/// `cargo xtask uapi-replay FILE...`: true when every difference is allowed.
pub fn run(files: &[PathBuf], allow_file: Option<&Path>, verbose: bool) -> Result<bool> {
    let allow_path = allow_file.map_or_else(default_allow_path, Path::to_path_buf);
    let allow = if allow_path.exists() {
        let t = std::fs::read_to_string(&allow_path).with_context(|| format!("reading {}", allow_path.display()))?;
        parse_allow(&t, &allow_path.display().to_string())?
    } else if allow_file.is_some() {
        bail!("no allow-list {}", allow_path.display());
    } else {
        Vec::new()
    };
    let mut calls = Vec::new();
    for f in files {
        let t = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let c = parse_recording(&t, &f.display().to_string())?;
        println!("==> {}: {} calls", f.display(), c.len());
        calls.extend(c);
    }
    println!("==> allow-list {}: {} entries", allow_path.display(), allow.len());
    std::panic::set_hook(Box::new(|info| {
        let cur = CURRENT.lock().map(|s| s.clone()).unwrap_or_default();
        eprintln!("\niommufd panicked while replaying {cur}:\n{info}");
    }));
    let report = replay(&calls, &allow, verbose);
    let _ = std::panic::take_hook();
    print_report(&report, verbose);
    Ok(report.unexpected() == 0)
}

#[cfg(test)]
mod tests {
    /// The committed recordings of Linux 6.12 replay with no difference
    /// beyond the written allow-list: conformance is a test, not a tool run.
    #[test]
    fn committed_linux_recordings_agree() {
        let dir = crate::qemu::root().join("iommufd/tests/data/linux-uapi");
        let allow_text = std::fs::read_to_string(dir.join("allow.toml")).unwrap();
        let allow = parse_allow(&allow_text, "allow.toml").unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no recordings in {}", dir.display());
        let mut total = 0;
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let calls = parse_recording(&text, &f.display().to_string()).unwrap();
            let report = replay(&calls, &allow, false);
            total += report.calls;
            assert_eq!(report.unexpected(), 0, "{}: {} calls differ from Linux", f.display(), report.unexpected());
        }
        assert!(total >= 9000, "only {total} calls replayed");
    }

    use super::*;

    fn line(seed: i64, step: i64, cmd: u32, input: &[u8], errno: i32, out: &[u8], aux_out: &[u8]) -> String {
        let aux_in = [0u8; AUX_REC_LEN];
        format!(
            r#"{{"seed":{seed},"step":{step},"cmd":"{cmd:#x}","in":"{}","aux_in":"{}","ret":{},"errno":{errno},"out":"{}","aux_out":"{}"}}"#,
            hex_encode(input),
            hex_encode(&aux_in),
            if errno == 0 { 0 } else { -1 },
            hex_encode(out),
            hex_encode(aux_out)
        )
    }

    fn padded(mut v: Vec<u8>) -> Vec<u8> {
        v.extend_from_slice(&[0u8; 16]);
        v
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex_decode("00ff7fA0").unwrap(), vec![0, 0xff, 0x7f, 0xa0]);
        assert!(hex_decode("0").is_err());
        assert!(hex_decode("zz").is_err());
        assert_eq!(hex_encode(&[1, 0xab]), "01ab");
    }

    #[test]
    fn replays_a_tiny_recording() {
        let none = [0u8; AUX_REC_LEN];
        let mut lines = Vec::new();
        // A literal line in the recorder's format: IOAS_ALLOC (size 12), Linux gives id 1.
        lines.push(format!(
            r#"{{"seed":1,"step":0,"cmd":"0x3b81","in":"0c000000000000000000000000000000000000000000000000000000","aux_in":"{z}","ret":0,"errno":0,"out":"0c000000000000000100000000000000000000000000000000000000","aux_out":"{z}"}}"#,
            z = hex_encode(&none)
        ));
        // MAP 16 KiB of the arena at a fixed IOVA.
        let map = IommuIoasMap {
            size: 40,
            flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: 1,
            __reserved: 0,
            user_va: ARENA,
            length: 0x4000,
            iova: 0x100_0000,
        };
        let m = padded(map.to_bytes());
        lines.push(line(1, 1, IOMMU_IOAS_MAP, &m, 0, &m, &none));
        // IOVA_RANGES into the aux page: one range, the whole space.
        let r = IommuIoasIovaRanges { size: 32, ioas_id: 1, num_iovas: 2, allowed_iovas: AUX, ..Default::default() };
        let rin = padded(r.to_bytes());
        // No domain yet: Linux reports alignment 1.
        let rout = padded(IommuIoasIovaRanges { num_iovas: 1, out_iova_alignment: 1, ..r }.to_bytes());
        let mut aux = none;
        aux[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        lines.push(line(1, 2, IOMMU_IOAS_IOVA_RANGES, &rin, 0, &rout, &aux));
        // A wrong recording: DESTROY of a missing id "succeeded" in Linux.
        let d = padded(IommuDestroy { size: 8, id: 9 }.to_bytes());
        lines.push(line(1, 3, IOMMU_DESTROY, &d, 0, &d, &none));
        // A wrong aux page: Linux "wrote" a range that we do not.
        let mut bad_aux = aux;
        bad_aux[0] = 0x10;
        lines.push(line(1, 4, IOMMU_IOAS_IOVA_RANGES, &rin, 0, &rout, &bad_aux));
        // A wrong output field: alignment 2 instead of 1.
        let rout2 = padded(IommuIoasIovaRanges { num_iovas: 1, out_iova_alignment: 2, ..r }.to_bytes());
        lines.push(line(1, 5, IOMMU_IOAS_IOVA_RANGES, &rin, 0, &rout2, &aux));
        // Seed 2: Linux numbered its IOAS 5; we say 1. The MAP names 5
        // and must reach our 1.
        let a = padded(IommuIoasAlloc { size: 12, ..Default::default() }.to_bytes());
        let a5 = padded(IommuIoasAlloc { size: 12, out_ioas_id: 5, ..Default::default() }.to_bytes());
        lines.push(line(2, 0, IOMMU_IOAS_ALLOC, &a, 0, &a5, &none));
        let m5 = padded(IommuIoasMap { ioas_id: 5, ..map }.to_bytes());
        lines.push(line(2, 1, IOMMU_IOAS_MAP, &m5, 0, &m5, &none));
        // A bad size: E2BIG from the non-zero tail byte, in both.
        let mut big = padded(IommuIoasMap { size: 48, ioas_id: 5, ..map }.to_bytes());
        big[43] = 0x5a;
        lines.push(line(2, 2, IOMMU_IOAS_MAP, &big, 7, &big, &none));
        // The mock domain ids: stdev 6, idev 7, hwpt 8 in Linux (2, 3, 4 here).
        let mut t = IommuTestCmd { size: 72, op: IOMMU_TEST_OP_MOCK_DOMAIN, id: 5, ..Default::default() }.to_bytes();
        let tin = padded(t.clone());
        IommuTestMockDomain { out_stdev_id: 6, out_hwpt_id: 8, out_idev_id: 7 }.write(&mut t[16..]);
        lines.push(line(2, 3, IOMMU_TEST_CMD, &tin, 0, &padded(t), &none));
        // Destroying the IOAS is refused while the mock domain's HWPT holds it.
        let d5 = padded(IommuDestroy { size: 8, id: 5 }.to_bytes());
        lines.push(line(2, 4, IOMMU_DESTROY, &d5, 16, &d5, &none));
        // Destroying the stdev (Linux 6) releases everything; then the IOAS.
        let d6 = padded(IommuDestroy { size: 8, id: 6 }.to_bytes());
        lines.push(line(2, 5, IOMMU_DESTROY, &d6, 0, &d6, &none));
        lines.push(line(2, 6, IOMMU_DESTROY, &d5, 0, &d5, &none));
        lines.push("REC done".to_string());

        let calls = parse_recording(&lines.join("\n"), "test").unwrap();
        assert_eq!(calls.len(), 13);
        assert_eq!(calls[0].cmd, IOMMU_IOAS_ALLOC);
        let report = replay(&calls, &[], false);
        print_report(&report, false);
        assert_eq!(report.calls, 13);
        let got: Vec<(i64, i64, Option<&str>)> =
            report.diffs.iter().map(|d| (d.seed, d.step, d.field.as_deref())).collect();
        // The wrong DESTROY, aux page and output field, and the two renumbered
        // creations differ.
        assert_eq!(
            got,
            vec![
                (1, 3, None),
                (1, 4, Some("aux")),
                (1, 5, Some("out_iova_alignment")),
                (2, 0, Some("id")),
                (2, 3, Some("id"))
            ]
        );
        assert_eq!(report.diffs[0].our_errno, Errno::ENOENT.0);
        assert!(report.diffs[0].first_in_seed && !report.diffs[1].first_in_seed);
        assert!(report.diffs[3].first_in_seed && !report.diffs[4].first_in_seed);
        assert_eq!(report.agree, 8);

        // The allow-list can cover the DESTROY difference.
        let allow = parse_allow(
            "# comment\nIOMMU_DESTROY linux=OK ours=ENOENT seed=1 -- a deliberately wrong recording\n",
            "allow",
        )
        .unwrap();
        let report = replay(&calls, &allow, false);
        assert_eq!(report.diffs[0].allowed_by.as_ref().map(|a| a.0), Some(2));
        assert_eq!(report.unexpected(), 4);
        assert!(report.diffs[1].first_in_seed, "the first unexpected difference of seed 1 is now the aux one");
        assert!(parse_allow("IOMMU_DESTROY linux=OK", "x").is_err(), "reason required");
        assert!(parse_allow("IOMMU_DESTROY bogus=1 -- r", "x").is_err());
    }

    #[test]
    fn field_tables_follow_the_uapi_structs() {
        let f = command_fields(IOMMU_IOAS_COPY, &[]);
        let names: Vec<&str> = f.iter().map(|f| f.name).collect();
        assert_eq!(names, ["size", "flags", "dst_ioas_id", "src_ioas_id", "length", "dst_iova", "src_iova"]);
        assert_eq!((f[3].offset, f[3].size, f[3].kind), (12, 4, FieldKind::Id));
        let mut t = IommuTestCmd { op: IOMMU_TEST_OP_MOCK_DOMAIN, ..Default::default() }.to_bytes();
        t[4] = IOMMU_TEST_OP_MOCK_DOMAIN as u8;
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
        assert_eq!(field_at(&f, Some(72), 75).0, "tail+3");
        assert_eq!(call_name(IOMMU_TEST_CMD, &t), "IOMMU_TEST_CMD/MOCK_DOMAIN");
    }
}
