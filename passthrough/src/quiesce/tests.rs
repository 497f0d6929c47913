//! [`quiesce`] over a fake configuration space: functions with and without
//! FLR, behind bridges alone or not, slow to come back or never; every
//! write recorded with the (fake) time it happened.

use super::*;
use crate::platform::{BridgeBuses, PlatformError};
use crate::{PciFunction, PhysAddr};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;

/// The fake clock advances this much on every read of it.
const TICK: u64 = 10_000;
const MS: u64 = 1_000_000;

/// One fake function.
#[derive(Clone, Default)]
struct Space {
    regs: BTreeMap<u16, u32>,
    /// What a reset puts back.
    defaults: BTreeMap<u16, u32>,
    /// Offset of the PCIe capability (FLR through Device Control).
    pcie: Option<u16>,
    /// Offset of the AF capability.
    af: Option<u16>,
    /// Bus numbers, for a bridge.
    buses: Option<(u8, u8)>,
    /// Transactions Pending reads set until this time.
    pending_until: u64,
    /// How long after a reset ends the function takes to answer.
    ready_after: u64,
    /// In reset (or not answering yet) until this time.
    down_until: u64,
    /// Answers "retry" (0xffff0001) rather than all ones while down.
    crs: bool,
}

impl Space {
    fn new(vendor_device: u32) -> Self {
        let mut s = Self { ready_after: 0, ..Default::default() };
        s.regs.insert(0, vendor_device);
        s.regs.insert(COMMAND, 0);
        s.regs.insert(HEADER_TYPE, 0);
        s
    }

    /// Appends a capability with `control` in the upper half of its first
    /// dword and `rest` after it; returns its offset.
    fn add_cap(&mut self, id: u8, control: u16, rest: &[u32]) -> u16 {
        let at = 0x40 + 0x10 * self.regs.keys().filter(|&&k| k >= 0x40 && k % 0x10 == 0).count() as u16;
        // Link it from the previous one (or the capability pointer).
        let mut prev = None;
        let mut p = self.regs.get(&CAP_POINTER).copied().unwrap_or(0) as u16;
        while p >= 0x40 {
            prev = Some(p);
            p = ((self.regs[&p] >> 8) & 0xfc) as u16;
        }
        match prev {
            Some(p) => *self.regs.get_mut(&p).unwrap() |= (at as u32) << 8,
            None => {
                self.regs.insert(CAP_POINTER, at as u32);
                *self.regs.get_mut(&COMMAND).unwrap() |= STATUS_CAP_LIST;
            }
        }
        self.regs.insert(at, id as u32 | (control as u32) << 16);
        for (i, &w) in rest.iter().enumerate() {
            self.regs.insert(at + 4 + 4 * i as u16, w);
        }
        at
    }

    fn msi(mut self, control: u16) -> Self {
        self.add_cap(CAP_MSI, control, &[0xfee0_0000, 0, 0x41]);
        self
    }

    fn msix(mut self, control: u16) -> Self {
        self.add_cap(CAP_MSIX, control, &[0x2000, 0x3000]);
        self
    }

    /// A PCIe endpoint capability; `flr` sets Device Capabilities bit 28.
    fn pcie(mut self, flr: bool, devctl: u16) -> Self {
        let devcap = 0x8000 | if flr { DEVCAP_FLR } else { 0 };
        self.pcie = Some(self.add_cap(CAP_PCIE, 0x0002, &[devcap, devctl as u32]));
        self
    }

    fn af(mut self, caps: u8) -> Self {
        let at = self.add_cap(CAP_AF, 0x0006, &[0]);
        *self.regs.get_mut(&at).unwrap() |= (caps as u32) << 24;
        self.af = Some(at);
        self
    }

    fn bridge(mut self, secondary: u8, subordinate: u8) -> Self {
        self.regs.insert(HEADER_TYPE, 1 << 16);
        // Interrupt line 0x0b, pin 1; Bridge Control: SERR enable and a
        // set Discard Timer Status (write one to clear).
        self.regs.insert(BRIDGE_CONTROL, 0x0000_010b | BRIDGE_DISCARD_STATUS | 1 << (16 + 1));
        self.buses = Some((secondary, subordinate));
        self
    }

    fn pending_until(mut self, t: u64) -> Self {
        self.pending_until = t;
        self
    }

    fn ready_after(mut self, ns: u64, crs: bool) -> Self {
        self.ready_after = ns;
        self.crs = crs;
        self
    }

    /// Bus mastering, memory decode and whatever else the device was
    /// given, as the running state (its defaults keep a zero command).
    fn running(mut self, command: u16) -> Self {
        self.defaults = self.regs.clone();
        *self.regs.get_mut(&COMMAND).unwrap() |= command as u32;
        self
    }
}

/// Who wrote what, when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Write {
    bdf: Bdf,
    offset: u16,
    value: u32,
    at: u64,
}

#[derive(Default)]
struct Fake {
    clock: AtomicU64,
    spaces: Mutex<BTreeMap<Bdf, Space>>,
    writes: Mutex<Vec<Write>>,
}

impl Fake {
    fn with(spaces: &[(Bdf, Space)]) -> Self {
        let f = Self::default();
        f.spaces.lock().extend(spaces.iter().cloned().map(|(b, mut s)| {
            if s.defaults.is_empty() {
                s.defaults = s.regs.clone();
            }
            (b, s)
        }));
        f
    }

    fn now(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    fn writes(&self) -> Vec<(Bdf, u16, u32)> {
        self.writes.lock().iter().map(|w| (w.bdf, w.offset, w.value)).collect()
    }

    fn reg(&self, bdf: Bdf, offset: u16) -> u32 {
        self.spaces.lock()[&bdf].regs.get(&offset).copied().unwrap_or(0)
    }

    /// The functions a platform would enumerate from the fake.
    fn functions(&self, parents: &[(Bdf, Bdf)]) -> Vec<PciFunction> {
        self.spaces
            .lock()
            .iter()
            .map(|(&bdf, s)| PciFunction {
                segment: 0,
                bdf,
                parent: parents.iter().find(|(c, _)| *c == bdf).map(|&(_, p)| p),
                bridge: s.buses.map(|(secondary, subordinate)| BridgeBuses { secondary, subordinate }),
                pcie_port_type: s.pcie.map(|_| 0),
                acs: false,
            })
            .collect()
    }
}

fn reset(s: &mut Space, down_until: u64) {
    s.regs = s.defaults.clone();
    s.down_until = down_until;
}

impl Platform for Fake {
    type Mmio = NoMmio;
    fn map_mmio(&self, phys: PhysAddr, len: u64) -> Result<NoMmio, PlatformError> {
        Err(PlatformError::MmioUnmappable { phys, len })
    }
    fn alloc_frames(&self, _: usize, _: u64) -> Option<PhysAddr> {
        None
    }
    fn free_frames(&self, _: PhysAddr, _: usize) {}
    fn read_u64(&self, _: PhysAddr) -> u64 {
        unreachable!()
    }
    fn write_u64(&self, _: PhysAddr, _: u64) {
        unreachable!()
    }
    fn read_phys(&self, phys: PhysAddr, buf: &mut [u8]) -> Result<(), PlatformError> {
        Err(PlatformError::NotRam { phys, len: buf.len() as u64 })
    }
    fn write_phys(&self, phys: PhysAddr, buf: &[u8]) -> Result<(), PlatformError> {
        Err(PlatformError::NotRam { phys, len: buf.len() as u64 })
    }
    fn flush_cache(&self, _: PhysAddr, _: u64) {}
    fn now_ns(&self) -> u64 {
        self.clock.fetch_add(TICK, Ordering::Relaxed) + TICK
    }
    fn pci_read32(&self, segment: u16, bdf: Bdf, offset: u16) -> u32 {
        let now = self.now();
        let spaces = self.spaces.lock();
        let Some(s) = spaces.get(&bdf).filter(|_| segment == 0) else { return u32::MAX };
        if now < s.down_until {
            return if s.crs && offset == 0 { 0xffff_0001 } else { u32::MAX };
        }
        let v = s.regs.get(&offset).copied().unwrap_or(0);
        let pending = now < s.pending_until;
        match (s.pcie, s.af) {
            (Some(exp), _) if offset == exp + 8 && pending => v | DEVSTA_PENDING,
            (_, Some(af)) if offset == af + 4 && pending => v | AF_PENDING,
            _ => v,
        }
    }
    fn pci_write32(&self, segment: u16, bdf: Bdf, offset: u16, value: u32) {
        assert_eq!(segment, 0);
        let now = self.now();
        self.writes.lock().push(Write { bdf, offset, value, at: now });
        let mut spaces = self.spaces.lock();
        let Some(s) = spaces.get_mut(&bdf) else { return };
        assert!(now >= s.down_until, "{bdf} written while in reset");
        let old = s.regs.get(&offset).copied().unwrap_or(0);
        // The status half of the command dword is read-only here (its
        // write-one-to-clear bits are never set).
        let value = if offset == COMMAND { value & 0xffff | old & 0xffff_0000 } else { value };
        s.regs.insert(offset, value);
        let flr = match (s.pcie, s.af) {
            (Some(exp), _) if offset == exp + 8 => value & DEVCTL_FLR != 0,
            (_, Some(af)) if offset == af + 4 => value & AF_INITIATE_FLR != 0,
            _ => false,
        };
        if flr {
            let until = now.saturating_add(s.ready_after);
            reset(s, until);
            return;
        }
        let Some((secondary, subordinate)) = s.buses.filter(|_| offset == BRIDGE_CONTROL) else { return };
        let (was, is) = (old & BRIDGE_SBR != 0, value & BRIDGE_SBR != 0);
        for (b, child) in spaces.iter_mut().filter(|(b, _)| (secondary..=subordinate).contains(&b.bus)) {
            match (was, is) {
                (false, true) => reset(child, u64::MAX),
                (true, false) => child.down_until = now.saturating_add(child.ready_after),
                _ => assert!(child.down_until != u64::MAX || is, "{b} left in reset"),
            }
        }
    }
    fn dmar(&self) -> Option<&[u8]> {
        None
    }
    fn ivrs(&self) -> Option<&[u8]> {
        None
    }
    fn pci_functions(&self) -> Vec<PciFunction> {
        self.functions(&[])
    }
}

struct NoMmio;
impl crate::Mmio for NoMmio {
    fn read32(&self, _: usize) -> u32 {
        !0
    }
    fn read64(&self, _: usize) -> u64 {
        !0
    }
    fn write32(&self, _: usize, _: u32) {}
    fn write64(&self, _: usize, _: u64) {}
}

fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
    Bdf { bus, device, function }
}

fn at(b: Bdf) -> Function {
    Function { segment: 0, bdf: b }
}

const DEV: u32 = 0x11e8_1234;
/// Memory decode and bus mastering.
const MEM_BM: u16 = 0x6;

/// A PCIe endpoint with FLR, MSI and MSI-X enabled and bus mastering on:
/// command first (bus mastering off, INTx off, decode kept), MSI, MSI-X
/// (mask and disable in one write), then Initiate FLR with Device Control's
/// other bits kept; nothing read until 100 ms later; reset state after.
#[test]
fn flr_after_dma_and_interrupts_are_off() {
    let ep = bdf(3, 0, 0);
    let space = Space::new(DEV).msi(0x0081 | 0x20).msix(0x8003).pcie(true, 0x2810).running(MEM_BM);
    let (msi, msix, exp) = (0x40, 0x50, 0x60);
    let fake = Fake::with(&[(ep, space)]);
    let functions = fake.functions(&[]);
    assert_eq!(quiesce(&fake, &functions, at(ep)), Ok(Reset::Flr));
    assert_eq!(
        fake.writes(),
        [
            (ep, COMMAND, (MEM_BM as u32 & !CMD_BUS_MASTER) | CMD_INTX_DISABLE),
            (ep, msi, CAP_MSI as u32 | 0x50 << 8 | 0x00a0 << 16),
            (ep, msix, CAP_MSIX as u32 | 0x60 << 8 | (0x4003 << 16)),
            (ep, exp + 8, 0x2810 | DEVCTL_FLR),
        ]
    );
    let flr_at = fake.writes.lock()[3].at;
    assert!(fake.now() >= flr_at + RESET_RECOVERY_NS, "returned {} ns after the FLR", fake.now() - flr_at);
    assert_eq!(fake.reg(ep, COMMAND) & 0xffff, 0, "reset: command register at its default");
}

/// Transactions Pending set: the FLR waits for it to clear; still set
/// after [`PENDING_TIMEOUT_NS`], the FLR goes ahead anyway.
#[test]
fn flr_waits_for_pending_transactions() {
    let ep = bdf(0, 4, 0);
    for (clears, earliest, latest) in
        [(30 * MS, 30 * MS, 31 * MS), (u64::MAX, PENDING_TIMEOUT_NS, PENDING_TIMEOUT_NS + MS)]
    {
        let fake = Fake::with(&[(ep, Space::new(DEV).pcie(true, 0).pending_until(clears).running(MEM_BM))]);
        assert_eq!(quiesce(&fake, &fake.functions(&[]), at(ep)), Ok(Reset::Flr));
        let w = *fake.writes.lock().last().unwrap();
        assert_eq!((w.offset, w.value), (0x48, DEVCTL_FLR));
        assert!((earliest..=latest).contains(&w.at), "FLR at {} ms", w.at / MS);
    }
}

/// A conventional function with the AF capability (TP and FLR) gets an AF
/// FLR; with FLR but no TP, AF is not used.
#[test]
fn advanced_features_flr() {
    let ep = bdf(0, 5, 0);
    let fake = Fake::with(&[(ep, Space::new(DEV).af(0b11).pending_until(5 * MS).running(MEM_BM))]);
    assert_eq!(quiesce(&fake, &fake.functions(&[]), at(ep)), Ok(Reset::AdvancedFeaturesFlr));
    let w = *fake.writes.lock().last().unwrap();
    assert_eq!((w.offset, w.value), (0x44, AF_INITIATE_FLR));
    assert!(w.at >= 5 * MS, "initiated while transactions were pending");

    let fake = Fake::with(&[(ep, Space::new(DEV).af(0b10).running(MEM_BM))]);
    assert_eq!(quiesce(&fake, &fake.functions(&[]), at(ep)), Ok(Reset::NotPossible));
    assert_eq!(fake.writes().len(), 1, "only the command register: {:x?}", fake.writes());
}

/// A PCIe function without FLR behind a root port: PCIe FLR not
/// advertised, so the root port resets its bus; assert held at least the
/// hold time with the rest of Bridge Control (and the interrupt line) kept
/// and Discard Timer Status not cleared; the function answers again.
#[test]
fn alone_below_its_bridge_gets_a_secondary_bus_reset() {
    let port = bdf(0, 2, 0);
    let ep = bdf(1, 0, 0);
    let fake = Fake::with(&[
        (port, Space::new(0x000c_1b36).bridge(1, 1).running(0x7)),
        (ep, Space::new(DEV).msi(0x0081).pcie(false, 0).ready_after(150 * MS, true).running(MEM_BM)),
    ]);
    let functions = fake.functions(&[(ep, port)]);
    assert_eq!(quiesce(&fake, &functions, at(ep)), Ok(Reset::SecondaryBus { bridge: port }));
    let w = fake.writes.lock().clone();
    let kept = 0x0000_010b | 1 << (16 + 1);
    assert_eq!(
        w.iter().map(|w| (w.bdf, w.offset, w.value)).collect::<Vec<_>>(),
        [
            (ep, COMMAND, 0x2 | CMD_INTX_DISABLE),
            (ep, 0x40, CAP_MSI as u32 | 0x50 << 8 | 0x0080 << 16),
            (port, BRIDGE_CONTROL, kept | BRIDGE_SBR),
            (port, BRIDGE_CONTROL, kept),
        ]
    );
    assert!(w[3].at - w[2].at >= BUS_RESET_HOLD_NS, "held {} ns", w[3].at - w[2].at);
    assert!(fake.now() - w[3].at >= 150 * MS, "returned before the function was ready");
    assert_eq!(fake.reg(ep, COMMAND) & 0xffff, 0, "the function was reset");
    assert_eq!(fake.reg(port, COMMAND) & 0xffff, 0x7, "the bridge itself was not");
}

/// A fake's functions and their parents.
type Case<'a> = (&'a [(Bdf, Space)], &'a [(Bdf, Bdf)]);

/// Sharing the bus (another function, or a function on a bus below), on a
/// root bus, or the parent not a bridge after all: no reset, only the
/// command register and capabilities written.
#[test]
fn no_reset_when_not_alone() {
    let port = bdf(0, 2, 0);
    let ep = bdf(1, 0, 0);
    let cases: [Case<'_>; 4] = [
        (
            &[
                (port, Space::new(0x000c_1b36).bridge(1, 1)),
                (ep, Space::new(DEV).running(MEM_BM)),
                (bdf(1, 0, 1), Space::new(DEV)),
            ],
            &[(ep, port), (bdf(1, 0, 1), port)],
        ),
        (
            &[
                (port, Space::new(0x000c_1b36).bridge(1, 2)),
                (ep, Space::new(DEV).running(MEM_BM)),
                (bdf(2, 3, 0), Space::new(DEV)),
            ],
            &[(ep, port)],
        ),
        (&[(bdf(0, 3, 0), Space::new(DEV).running(MEM_BM))], &[]),
        (&[(port, Space::new(DEV)), (ep, Space::new(DEV).running(MEM_BM))], &[(ep, port)]),
    ];
    for (i, (spaces, parents)) in cases.into_iter().enumerate() {
        let fake = Fake::with(spaces);
        let target = if spaces.len() == 1 { bdf(0, 3, 0) } else { ep };
        assert_eq!(quiesce(&fake, &fake.functions(parents), at(target)), Ok(Reset::NotPossible), "case {i}");
        assert_eq!(fake.writes(), [(target, COMMAND, 0x2 | CMD_INTX_DISABLE)], "case {i}");
    }
}

/// A function that never answers again is a timeout naming the reset,
/// after the recovery time and the readiness bound; one answering "retry"
/// for a while is waited for.
#[test]
fn timeouts_name_what_was_waited_for() {
    let ep = bdf(0, 4, 0);
    let fake = Fake::with(&[(ep, Space::new(DEV).pcie(true, 0).ready_after(u64::MAX, false).running(MEM_BM))]);
    match quiesce(&fake, &fake.functions(&[]), at(ep)) {
        Err(QuiesceError::Timeout { waited_for: Wait::ReadyAfterFlr, ns }) => {
            assert!(ns >= RESET_RECOVERY_NS + READY_TIMEOUT_NS, "gave up after {ns} ns")
        }
        other => panic!("{other:?}"),
    }

    let port = bdf(0, 2, 0);
    let ep = bdf(1, 0, 0);
    let spaces = |ready| {
        [(port, Space::new(0x000c_1b36).bridge(1, 1)), (ep, Space::new(DEV).ready_after(ready, true).running(MEM_BM))]
    };
    let fake = Fake::with(&spaces(u64::MAX));
    let e = quiesce(&fake, &fake.functions(&[(ep, port)]), at(ep));
    assert!(
        matches!(e, Err(QuiesceError::Timeout { waited_for: Wait::ReadyAfterBusReset { bridge }, .. }) if bridge == port),
        "{e:?}"
    );
    assert_eq!(fake.reg(port, BRIDGE_CONTROL) & BRIDGE_SBR, 0, "the bus was left in reset");

    let fake = Fake::with(&spaces(800 * MS));
    assert_eq!(quiesce(&fake, &fake.functions(&[(ep, port)]), at(ep)), Ok(Reset::SecondaryBus { bridge: port }));
}

/// An absent function: an error, and nothing written.
#[test]
fn absent_function_is_not_touched() {
    let fake = Fake::with(&[]);
    assert_eq!(quiesce(&fake, &[], at(bdf(0, 9, 0))), Err(QuiesceError::Absent));
    assert!(fake.writes().is_empty());
}

/// A capability list that loops ends; the function still gets its
/// command register written.
#[test]
fn looping_capability_list_ends() {
    let ep = bdf(0, 4, 0);
    let mut space = Space::new(DEV).running(MEM_BM);
    let cap = space.add_cap(0x09, 0, &[]);
    *space.regs.get_mut(&cap).unwrap() |= (cap as u32) << 8;
    let fake = Fake::with(&[(ep, space)]);
    assert_eq!(quiesce(&fake, &fake.functions(&[]), at(ep)), Ok(Reset::NotPossible));
    assert_eq!(fake.writes(), [(ep, COMMAND, 0x2 | CMD_INTX_DISABLE)]);
}

/// The PASID width comes from the PASID extended capability wherever it
/// sits in the list; none without one, without extended space, or when
/// the list loops.
#[test]
fn pasid_width_from_the_extended_capability() {
    let (with, without, none, looping) = (bdf(3, 0, 0), bdf(3, 1, 0), bdf(3, 2, 0), bdf(3, 3, 0));
    let mut a = Space::new(DEV);
    // ACS at 0x100 (next 0x140), PASID at 0x140: Max PASID Width 20.
    a.regs.insert(0x100, 0x000d | 1 << 16 | 0x140 << 20);
    a.regs.insert(0x140, EXT_CAP_PASID as u32 | 1 << 16);
    a.regs.insert(0x144, 20 << 8 | 0b110);
    let mut b = Space::new(DEV);
    b.regs.insert(0x100, 0x000d | 1 << 16);
    let c = Space::new(DEV);
    let mut d = Space::new(DEV);
    d.regs.insert(0x100, 0x000d | 1 << 16 | 0x100 << 20);
    let fake = Fake::with(&[(with, a), (without, b), (none, c), (looping, d)]);
    assert_eq!(pasid_bits(&fake, at(with)), 20);
    assert_eq!(pasid_bits(&fake, at(without)), 0);
    assert_eq!(pasid_bits(&fake, at(none)), 0, "no extended space");
    assert_eq!(pasid_bits(&fake, at(looping)), 0, "a looping list ends");
    assert_eq!(pasid_bits(&fake, at(bdf(9, 0, 0))), 0, "absent");
}
