//! Map/unmap cost of the engine on heap tables, in ns per call.
//!
//! Each case keeps one "keeper" mapping next to the pages it maps so the
//! tables already exist (no allocation on the measured path, as in a
//! steady-state domain), then maps a batch of calls, unmaps them, and
//! repeats; map and unmap are timed separately. Format: VT-d second stage,
//! 4 levels (48 bits), coherent walker unless the line says otherwise;
//! then the same cases on AMD-Vi v1, 4 levels (lines marked `AMD v1`).
//!
//! `cargo bench -p io-pgtable` (optimised). Linux's generic page table on
//! an i7-12700 for comparison: map 4 KiB 53-57 ns, unmap 4 KiB 69-72 ns,
//! map 256 x 4 KiB 391 ns.

use std::hint::black_box;
use std::time::{Duration, Instant};

use io_pgtable::{AmdV1, HeapTables, PageTable, Prot, PtFormat, VtdSecondStage};
use portcullis_iommu::IotlbGather;

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;

fn table<F: PtFormat>(format: F, coherent: bool) -> PageTable<F, HeapTables> {
    PageTable::new(format, HeapTables::new(coherent)).unwrap()
}

/// Maps and unmaps `iovas` (each `len` bytes) `rounds` times; returns
/// (map, unmap) time per call.
fn run<F: PtFormat>(pt: &mut PageTable<F, HeapTables>, iovas: &[u64], len: u64, rounds: usize) -> (f64, f64) {
    let (mut map_t, mut unmap_t) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let t = Instant::now();
        for &iova in iovas {
            pt.map(black_box(iova), black_box(iova + 0x40_0000_0000), len, Prot::RW).unwrap();
        }
        map_t += t.elapsed();
        let t = Instant::now();
        for &iova in iovas {
            let mut g = IotlbGather::default();
            black_box(pt.unmap(black_box(iova), len, &mut g));
            black_box(&g);
        }
        unmap_t += t.elapsed();
        pt.release_deferred();
    }
    let calls = (iovas.len() * rounds) as f64;
    (map_t.as_nanos() as f64 / calls, unmap_t.as_nanos() as f64 / calls)
}

fn case<F: PtFormat + Copy>(
    format: F,
    name: &str,
    coherent: bool,
    keeper: (u64, u64),
    iovas: Vec<u64>,
    len: u64,
    rounds: usize,
) {
    if !wanted(name, coherent) {
        return;
    }
    let mut pt = table(format, coherent);
    pt.map(keeper.0, 0x40_0000_0000 + keeper.0, keeper.1, Prot::RW).unwrap();
    // Warm up (and check it works), then measure.
    run(&mut pt, &iovas, len, 3);
    let tables = pt.memory().allocs();
    let (map, unmap) = repeated(|| run(&mut pt, &iovas, len, rounds));
    assert_eq!(pt.memory().allocs(), tables, "{name}: the measured loop allocated tables");
    print(name, coherent, &map, &unmap);
}

/// Whether the case is selected: every argument that is not an option is
/// a filter, and a case runs when its printed name (with `non-coherent`
/// for the flushing variant) contains one of them, or when there are none
/// (`cargo bench -p io-pgtable -- "AMD v1 4 KiB"`, for a profiler).
fn wanted(name: &str, coherent: bool) -> bool {
    let full = if coherent { name.to_string() } else { format!("{name} non-coherent") };
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    filters.is_empty() || filters.iter().any(|f| full.contains(f.as_str()))
}

/// Measurements per figure: each a separate timed loop.
const REPS: usize = 7;

/// `REPS` results of `f` as (map, unmap) samples.
fn repeated(mut f: impl FnMut() -> (f64, f64)) -> (Vec<f64>, Vec<f64>) {
    (0..REPS).map(|_| f()).unzip()
}

/// `median [min-max]` of `v`.
fn summary(v: &[f64]) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    format!("{:.1} [{:.1}-{:.1}]", v[v.len() / 2], v[0], v[v.len() - 1])
}

fn print(name: &str, coherent: bool, map: &[f64], unmap: &[f64]) {
    let suffix = if coherent { "" } else { " (non-coherent, batched flushes)" };
    println!("map {name}: {} ns/call, median [min-max] of {REPS}{suffix}", summary(map));
    println!("unmap {name}: {} ns/call, median [min-max] of {REPS}{suffix}", summary(unmap));
}

/// The machine's speed at the time, as two loops that do the same work on
/// any day, in ns per step, median [min-max] of `REPS`: a dependent chain
/// of xor-shift-multiplies (latency: the core's clock) and a sum over 16
/// KiB in L1 with four independent accumulators (throughput: what a busy
/// sibling hyperthread takes away). This VM's speed drifts by up to 2x
/// between minutes: the chain stays put while the sum and the engine's
/// figures move together (0.07 against 0.12 ns/word: 4 KiB map 7.5
/// against 14 ns), so figures of different runs are comparable only
/// beside these lines.
fn reference(steps: u64) -> String {
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!("{:.2} [{:.2}-{:.2}]", v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let chain = (0..REPS)
        .map(|_| {
            let t = Instant::now();
            let mut x = black_box(1u64);
            for _ in 0..steps {
                x = (x ^ (x >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            }
            black_box(x);
            t.elapsed().as_nanos() as f64 / steps as f64
        })
        .collect();
    let words: Vec<u64> = (0..2048u64).collect();
    let sum = (0..REPS)
        .map(|_| {
            let t = Instant::now();
            let mut acc = [0u64; 4];
            for _ in 0..steps / 2048 {
                for c in black_box(&words).chunks_exact(4) {
                    for (a, w) in acc.iter_mut().zip(c) {
                        *a = a.wrapping_add(*w);
                    }
                }
            }
            black_box(acc);
            t.elapsed().as_nanos() as f64 / (steps - steps % 2048) as f64
        })
        .collect();
    format!("chain {} ns/step, L1 sum {} ns/word", med(chain), med(sum))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || cfg!(debug_assertions);
    let scale = if quick { 1 } else { 20 };
    let steps = if quick { 1 << 16 } else { 1 << 22 };
    println!("reference (machine speed now): {}", reference(steps));
    let base = 5 * G1;
    // 4 KiB: 511 pages beside a keeper page in the same leaf table.
    let small: Vec<u64> = (1..512).map(|i| base + i * K4).collect();
    // 256 x 4 KiB in one call: 1 MiB halves of 2 MiB regions whose other
    // half holds a keeper page (phys misaligned by 1 MiB would not matter:
    // 1 MiB cannot use a 2 MiB page).
    let mib: Vec<u64> = (0..64).map(|i| base + 2 * G1 + i * M2).collect();
    // 2 MiB: 2 MiB pages beside a keeper 2 MiB page in the same table.
    let big: Vec<u64> = (1..512).map(|i| base + 4 * G1 + i * M2).collect();

    for coherent in [true, false] {
        cases(VtdSecondStage::new(4).unwrap(), "", coherent, &small, &mib, &big, scale);
    }
    for coherent in [true, false] {
        cases(AmdV1::new(4).unwrap(), "AMD v1 ", coherent, &small, &mib, &big, scale);
    }
    println!("reference (machine speed at the end): {}", reference(steps));
}

/// The three cases (4 KiB, 256 x 4 KiB, 2 MiB) on one format.
fn cases<F: PtFormat + Copy>(
    format: F,
    tag: &str,
    coherent: bool,
    small: &[u64],
    mib: &[u64],
    big: &[u64],
    scale: usize,
) {
    let base = small[0] - K4;
    case(format, &format!("{tag}4 KiB"), coherent, (base, K4), small.to_vec(), K4, 100 * scale / REPS);
    let name = format!("{tag}256 x 4 KiB (one 1 MiB call)");
    if wanted(&name, coherent) {
        mib_case(format, &name, coherent, mib, scale);
    }
    case(format, &format!("{tag}2 MiB"), coherent, (base + 4 * G1, M2), big.to_vec(), M2, 100 * scale / REPS);
}

/// 1 MiB calls into tables that already exist.
fn mib_case<F: PtFormat + Copy>(format: F, name: &str, coherent: bool, mib: &[u64], scale: usize) {
    let mut pt = table(format, coherent);
    for &iova in mib {
        pt.map(iova + M2 - K4, 0x40_0000_0000, K4, Prot::RW).unwrap();
    }
    run(&mut pt, mib, 1 << 20, 3);
    let (map, unmap) = repeated(|| run(&mut pt, mib, 1 << 20, 100 * scale / REPS));
    print(name, coherent, &map, &unmap);
}
