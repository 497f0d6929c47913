//! The hypervisor proper: SVM checks; for each of two guests its memory,
//! nested page table, DMA view through the `portcullis` crate (its own
//! edu) and VMCB (its own ASID); the run loop switching between them; the
//! host-side checks.

use crate::guest::{self, req};
use crate::npt::{Kind, Npt};
use crate::svm::{self, GuestRegs};
use crate::vmcb::{Segment, Vmcb, ctl, exit, intercept, save};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::x86_64::__cpuid;
use portcullis::{Function, GuestAddr, GuestFault, PhysAddr, Platform, Vendor};
use portcullis_kernel::Platform as Machine;
use portcullis_kernel::arch::irq;
use portcullis_kernel::host::{GuestDma, Iommus, KernelHost};
use portcullis_kernel::pci::PciDevice;
use portcullis_kernel::println;

/// How the run ended.
#[derive(Debug)]
pub enum Outcome {
    Ok,
    Skip(String),
    Fail(String),
}

/// Host frames on each side of each guest's RAM, filled with [`CANARY`].
const GUARD_PAGES: u64 = 2;
const CANARY: u8 = 0xc5;
/// More exits than this (both guests together): a guest is stuck in a
/// loop of them.
const MAX_EXITS: usize = 128;
/// The host vector each guest's edu MSI is routed to.
const HOST_VECTORS: [u8; 3] = [0x2a, 0x2b, 0x2c];
/// What each guest XORs into its pattern ([`guest::KEY`]).
const KEYS: [u64; 3] = [0, 0x0000_0000_2b2b_2b2b, 0x0000_0000_3c3c_3c3c];

macro_rules! fail {
    ($($t:tt)*) => { return Outcome::Fail(format!($($t)*)) };
}

/// Runs everything (see the crate documentation).
pub fn run(p: &Machine) -> Outcome {
    // SVM with nested paging, and not disabled by firmware.
    let max_ext = __cpuid(0x8000_0000).eax;
    if max_ext < 0x8000_000a || __cpuid(0x8000_0001).ecx & (1 << 2) == 0 {
        return Outcome::Skip("the CPU has no SVM (CPUID 0x8000_0001 ECX bit 2)".into());
    }
    let features = __cpuid(0x8000_000a);
    if features.edx & 1 == 0 {
        return Outcome::Skip("the CPU has SVM but no nested paging (CPUID 0x8000_000A EDX bit 0)".into());
    }
    if svm::vm_cr() & (1 << 4) != 0 {
        return Outcome::Skip("firmware disabled SVM (VM_CR.SVMDIS)".into());
    }
    println!("CPU: {} with SVM revision {}, {} ASIDs, nested paging", p.cpu.brand(), features.eax & 0xff, features.ebx);

    // The IOMMUs, every device blocked.
    let host = KernelHost::new(p);
    let options = portcullis::Options { x2apic: portcullis_kernel::arch::irq::x2apic(), ..Default::default() };
    let iommus = Iommus::bring_up_with(host.clone(), options);
    let vendors: Vec<&str> =
        iommus.units().iter().map(|u| if u.vendor == Vendor::IntelVtd { "Intel VT-d" } else { "AMD-Vi" }).collect();
    if vendors.is_empty() {
        fail!("no IOMMU on this machine: no device can be given to a guest (config {:?})", p.config);
    }
    println!("IOMMU: {} unit(s): {}", vendors.len(), vendors.join(", "));

    // The devices: the first three edus on the root bus, one per guest.
    let edus: Vec<&PciDevice> =
        p.pci.iter().filter(|d| d.vendor == 0x1234 && d.device == 0x11e8 && d.bdf.bus == 0).take(3).collect();
    if edus.len() < 3 {
        fail!("{} edu device(s) on the root bus, three guests need three", edus.len());
    }

    // SVM on; the host save area.
    let Some(PhysAddr(hsave)) = host.alloc_frames(1, 4096) else { fail!("no frame for the host save area") };
    svm::enable(hsave);
    let mut r = run_two(p, &host, &iommus, &edus);
    if matches!(r, Outcome::Ok) {
        r = run_shared(p, &host, &iommus, edus[2], features.edx & (1 << 6) != 0);
    }
    host.free_frames(PhysAddr(hsave), 1);
    r
}

fn run_two(p: &Machine, host: &KernelHost, iommus: &Iommus, edus: &[&PciDevice]) -> Outcome {
    let first = match Vm::new(p, host, iommus, 1, edus[0], guest::OUTSIDE, false) {
        Ok(v) => v,
        Err(why) => return Outcome::Fail(format!("guest 1: {why}")),
    };
    // The second guest's outside DMA aims at the first guest's copy, by
    // the host address of its frame.
    let target = first.ram + guest::DST;
    let second = match Vm::new(p, host, iommus, 2, edus[1], target, false) {
        Ok(v) => v,
        Err(why) => return Outcome::Fail(format!("guest 2: {why}")),
    };
    let mut vms = [first, second];
    let outcome = match run_loop(&mut vms) {
        Ok(()) => check_all(p, host, &mut vms),
        Err(why) => Outcome::Fail(why),
    };
    for vm in &mut vms {
        let (seg, bdf) = (vm.function.segment, vm.function.bdf);
        if let Err(e) = vm.dma.unassign(seg, bdf) {
            println!("guest {}: unassign: {e}", vm.n);
        }
    }
    outcome
}

/// Host frames, freed on drop.
#[derive(Debug)]
struct Frames<'h> {
    host: &'h KernelHost,
    base: u64,
    count: usize,
}

impl Drop for Frames<'_> {
    fn drop(&mut self) {
        self.host.free_frames(PhysAddr(self.base), self.count);
    }
}

/// What the guest told the hypervisor.
#[derive(Debug, Default)]
struct Report {
    hello: bool,
    copy: Option<(u64, bool, u64)>,
    outside: Option<(u64, bool)>,
    expect_npf: Option<(u64, u64)>,
    npf: Option<u64>,
    done: bool,
    halted: bool,
}

/// One guest: its device, DMA view, VMCB, nested page table and memory
/// (fields drop in this order: the device is detached before its memory
/// goes).
#[derive(Debug)]
struct Vm<'h> {
    /// 1 or 2 (also its ASID).
    n: u32,
    function: Function,
    dma: GuestDma,
    vmcb: Vmcb<'h>,
    npt: Npt<'h>,
    _frames: Frames<'h>,
    /// Host address of GPA 0.
    ram: u64,
    /// Guard frames (base, count) around the RAM.
    guards: [(u64, u64); 2],
    regs: GuestRegs,
    rep: Report,
    /// edu's MSI is routed to `vector` and injected.
    interrupts: bool,
    vector: u8,
    /// MSIs arrived on the host and not injected yet.
    pending: u64,
    arrived: u64,
    injected: u64,
    key: u64,
    /// Where its outside DMA goes.
    target: u64,
    /// Its fault stream as read so far, and how many were lost.
    faults: Vec<GuestFault>,
    lost: u64,
}

impl<'h> Vm<'h> {
    /// Guest `n`: memory, nested page table, DMA view with `dev`, VMCB.
    /// With `shared`, the guest runs the command program and its device
    /// walks its nested page table ([`GuestDma::new_sharing_table`]); an
    /// error starting with [`REFUSED`] is the crate refusing that.
    fn new(
        p: &Machine,
        host: &'h KernelHost,
        iommus: &Iommus,
        n: u32,
        dev: &PciDevice,
        target: u64,
        shared: bool,
    ) -> Result<Self, String> {
        let (seg, bdf) = (dev.segment, dev.bdf);
        let function = Function { segment: seg, bdf };
        let Some(bar0) = dev.bars.iter().find(|b| b.index == 0).map(|b| b.base) else {
            return Err(format!("edu {bdf} has no BAR0"));
        };
        // Memory decoding and bus mastering on (the kernel's edu driver
        // does that; the hypervisor never touches its registers itself).
        if portcullis_kernel::edu::Edu::new(&p.ecam, dev).is_none() {
            return Err(format!("edu {bdf} cannot be enabled"));
        }
        let vector = HOST_VECTORS[n as usize - 1];
        let key = KEYS[n as usize - 1];

        // Guest RAM: host frames with guard frames around them.
        let total = (guest::RAM_SIZE / 4096 + 2 * GUARD_PAGES) as usize;
        let Some(PhysAddr(base)) = host.alloc_frames(total, 4096) else {
            return Err(format!("no {total} free frames"));
        };
        let frames = Frames { host, base, count: total };
        let ram = base + GUARD_PAGES * 4096;
        let guards = [(base, GUARD_PAGES), (ram + guest::RAM_SIZE, GUARD_PAGES)];
        let canary = [CANARY; 4096];
        for &(base, pages) in &guards {
            for i in 0..pages {
                host.write_phys(PhysAddr(base + i * 4096), &canary).expect("guard frames are RAM");
            }
        }
        println!(
            "guest {n} memory: GPA {:#x}-{:#x} ({} MiB) is host {:#x}-{:#x} (not identity-placed); {} guard frames with canary {:#04x} on each side",
            0,
            guest::RAM_SIZE - 1,
            guest::RAM_SIZE >> 20,
            ram,
            ram + guest::RAM_SIZE - 1,
            GUARD_PAGES,
            CANARY
        );
        // The guest's own page tables, GDT and program, in its memory.
        let gw = |gpa: u64, v: u64| host.write_u64(PhysAddr(ram + gpa), v);
        gw(guest::PML4, guest::PDPT | 0x3);
        gw(guest::PDPT, guest::PD | 0x3);
        for i in 0..512u64 {
            // 2 MiB pages, present + writable; the device's uncached.
            let uncached = if i == guest::EDU >> 21 { 0x18 } else { 0 };
            gw(guest::PD + i * 8, i << 21 | 0x83 | uncached);
        }
        gw(guest::GDT, 0);
        gw(guest::GDT + 8, 0x00af_9a00_0000_ffff);
        gw(guest::GDT + 16, 0x00cf_9200_0000_ffff);
        gw(guest::KEY, key);
        gw(guest::TARGET, target);
        let image = if shared { svm::cmd_image() } else { svm::guest_image() };
        if image.len() as u64 > guest::CODE_MAX {
            return Err(format!(
                "the guest program is {} bytes, more than its {} byte slot",
                image.len(),
                guest::CODE_MAX
            ));
        }
        host.write_phys(PhysAddr(ram + guest::CODE), image).expect("guest RAM is RAM");
        println!(
            "guest {n} program: {} bytes at GPA {:#x}, its page tables at GPA {:#x}, GDT at {:#x}, stack below {:#x}; pattern key {key:#x}",
            image.len(),
            guest::CODE,
            guest::PML4,
            guest::GDT,
            guest::STACK_TOP
        );

        // The nested page table: the RAM, edu's register page, nothing else.
        let oom = |_| String::from("no frame for the nested page table");
        let mut npt = Npt::new(host).map_err(oom)?;
        for i in 0..guest::RAM_SIZE / 4096 {
            npt.map(i * 4096, ram + i * 4096, Kind::Ram).map_err(oom)?;
        }
        npt.map(guest::EDU, bar0, Kind::Mmio).map_err(oom)?;
        println!(
            "guest {n} nested page table: root {:#x}, {} KiB of tables; GPA {:#x} is edu {bdf}'s BAR0 (host {:#x}), uncached",
            npt.root,
            npt.table_bytes() / 1024,
            guest::EDU,
            bar0
        );

        // The guest's DMA view: the same memory at IOVA = GPA, and the edu.
        let err = |what: &str, e: portcullis::PassthroughError| format!("{what}: {e}");
        let mut dma = if shared {
            GuestDma::new_sharing_table(iommus, PhysAddr(npt.root))
                .map_err(|e| err("GuestDma::new_sharing_table", e))?
        } else {
            let mut dma = GuestDma::new(iommus, 1 << 20).map_err(|e| err("GuestDma::new", e))?;
            dma.add_memory(GuestAddr(0), PhysAddr(ram), guest::RAM_SIZE, true).map_err(|e| err("add_memory", e))?;
            dma
        };
        let isolated = iommus.interrupts_isolated(seg, bdf);
        if !isolated {
            println!(
                "note: this IOMMU does not remap edu {bdf}'s interrupts here; assigning it anyway (guest {n} polls, no MSI is routed)"
            );
            dma.allow_unsafe_interrupts(true);
        }
        match dma.assign(iommus, seg, bdf) {
            Err(e) if shared => return Err(format!("{REFUSED}{e}")),
            r => r.map_err(|e| err("assign", e))?,
        }
        println!(
            "guest {n} device: edu {bdf} (requester id {:#06x}) assigned; its DMA sees GPA {:#x}-{:#x} at IOVA = GPA{}",
            bdf.requester_id(),
            0,
            guest::RAM_SIZE - 1,
            if shared { ", through the guest's nested page table" } else { "" }
        );

        // edu's MSI: through interrupt remapping to a host vector,
        // injected into the guest on arrival.
        let interrupts = if isolated && !shared {
            let Some(apic) = irq::apic_id() else { return Err("no local APIC".into()) };
            let msi = dma.route_msi(seg, bdf, vector, apic).map_err(|e| err("route_msi", e))?;
            if !portcullis_kernel::edu::set_msi(&p.ecam, dev, Some((msi.address, msi.data))) {
                return Err(format!("edu {bdf} has no MSI capability"));
            }
            println!(
                "guest {n} interrupts: edu {bdf}'s MSI routed through interrupt remapping to host vector {vector:#x} (address {:#x}, data {:#x}); injected as vector {:#x} into guest {n}",
                msi.address,
                msi.data,
                guest::VECTOR
            );
            gw(guest::MAILBOX, 4);
            true
        } else {
            println!("guest {n} interrupts: none routed; the guest polls edu's status");
            false
        };

        let vmcb = Vmcb::new(host).ok_or("no frame for the VMCB")?;
        setup_vmcb(&vmcb, npt.root, n);
        println!(
            "guest {n} VMCB at {:#x}: ASID {n}, nested paging (nCR3 {:#x}), intercepts VMMCALL, HLT, INTR, SHUTDOWN, VMRUN",
            vmcb.pa, npt.root
        );
        Ok(Self {
            n,
            function,
            dma,
            vmcb,
            npt,
            _frames: frames,
            ram,
            guards,
            regs: GuestRegs::default(),
            rep: Report::default(),
            interrupts,
            vector,
            pending: 0,
            arrived: 0,
            injected: 0,
            key,
            target,
            faults: Vec::new(),
            lost: 0,
        })
    }

    /// Runs the guest until its next #VMEXIT and handles it.
    fn step(&mut self) -> Result<(), String> {
        let n = self.n;
        let vmcb = &self.vmcb;
        if self.pending > 0 {
            self.pending -= 1;
            self.injected += 1;
            vmcb.w64(ctl::EVENTINJ, guest::VECTOR | 1 << 31);
            println!("guest {n}: injecting vector {:#x} (edu's MSI)", guest::VECTOR);
        }
        svm::vmrun(vmcb.pa, &mut self.regs);
        // Only the first run flushes the TLB; an injection happens once.
        vmcb.set(ctl::TLB_CONTROL, 1, 0);
        vmcb.w64(ctl::EVENTINJ, 0);
        let code = vmcb.r64(ctl::EXITCODE);
        let rip = vmcb.r64(save::RIP);
        let prefix = format!("guest {n}: #VMEXIT {code:#x} {} at guest RIP {rip:#x}", exit::name(code));
        let rep = &mut self.rep;
        match code {
            exit::VMMCALL => {
                let rax = vmcb.r64(save::RAX);
                let what = vmcall(rep, rax, &self.regs);
                println!("{prefix}: {}", what.as_ref().unwrap_or_else(|e| e));
                vmcb.w64(save::RIP, rip + 3);
                what.map(|_| ())
            }
            exit::HLT => {
                println!("{prefix}: the guest halted; the hypervisor stops running it");
                rep.halted = true;
                Ok(())
            }
            exit::NPF => {
                let gpa = vmcb.r64(ctl::EXITINFO2);
                let info = vmcb.r64(ctl::EXITINFO1);
                match rep.expect_npf.take() {
                    Some((want, len)) if want == gpa => {
                        println!(
                            "{prefix}: GPA {gpa:#x} (error code {info:#x}) is not guest memory, as the guest expected; skipping its {len}-byte read"
                        );
                        rep.npf = Some(gpa);
                        vmcb.w64(save::RIP, rip + len);
                        Ok(())
                    }
                    _ => {
                        println!("{prefix}: GPA {gpa:#x} (error code {info:#x}) is not guest memory");
                        Err(format!("unexpected nested page fault at GPA {gpa:#x}, RIP {rip:#x}"))
                    }
                }
            }
            exit::INTR => {
                println!("{prefix}: a physical interrupt; the host takes it");
                Ok(())
            }
            _ => {
                println!(
                    "{prefix}: EXITINFO1 {:#x}, EXITINFO2 {:#x}",
                    vmcb.r64(ctl::EXITINFO1),
                    vmcb.r64(ctl::EXITINFO2)
                );
                Err(format!("#VMEXIT {code:#x} {} at guest RIP {rip:#x}", exit::name(code)))
            }
        }
    }
}

/// How [`Vm::new`]'s error starts when the crate refused the shared table.
const REFUSED: &str = "refused: ";

/// The shared-table guest: its GPA [`PAGE`] is remapped to another host
/// frame and then removed, in the one table its CPU and its edu walk.
const PAGE: u64 = 0x20_0000;
/// Where its edu copies [`PAGE`]'s first quadword.
const COPY: u64 = 0x20_1000;
/// What the hypervisor puts in the first, second and third frame behind
/// [`PAGE`].
const TOKENS: [u64; 3] = [0x1111_7ab1_e000_0001, 0x2222_7ab1_e000_0002, 0x3333_7ab1_e000_0003];
/// The result the hypervisor gives the guest's read that took a nested
/// page fault.
const NPF_MARK: u64 = 0xdead_0000_0000_0f00;

/// One table for the CPU and the device: guest 3's nested page table is
/// also its edu's first-stage table (VT-d scalable mode with first-stage
/// translation, `intel-fs`). Elsewhere the crate must refuse it with a
/// reason, and that is all this checks.
fn run_shared(p: &Machine, host: &KernelHost, iommus: &Iommus, dev: &PciDevice, flush_by_asid: bool) -> Outcome {
    let expected = p.config == "intel-fs";
    let Some(PhysAddr(spare)) = host.alloc_frames(2, 4096) else { fail!("no spare frames") };
    let _spare = Frames { host, base: spare, count: 2 };
    let mut vm = match Vm::new(p, host, iommus, 3, dev, 0, true) {
        Ok(vm) => vm,
        Err(why) if !expected && why.starts_with(REFUSED) => {
            println!("shared table: not on this configuration, the crate refuses it: {}", &why[REFUSED.len()..]);
            return Outcome::Ok;
        }
        Err(why) => fail!("guest 3 (shared table): {why}"),
    };
    let r = shared_steps(host, &mut vm, spare, flush_by_asid);
    let (seg, bdf) = (vm.function.segment, vm.function.bdf);
    if let Err(e) = vm.dma.unassign(seg, bdf) {
        println!("guest 3: unassign: {e}");
    }
    match r {
        Ok(()) => {
            if !expected {
                println!("shared table: works on this configuration too");
            }
            Outcome::Ok
        }
        Err(why) => Outcome::Fail(format!("guest 3 (shared table): {why}")),
    }
}

fn shared_steps(host: &KernelHost, vm: &mut Vm<'_>, spare: u64, flush_by_asid: bool) -> Result<(), String> {
    let root = vm.npt.root;
    if vm.dma.shared_table() != Some(PhysAddr(root)) {
        return Err(format!("the device's table is {:?}, not the NPT root {root:#x}", vm.dma.shared_table()));
    }
    println!(
        "guest 3: nCR3 {root:#x} is also edu {}'s first-stage table (PASID entry, PGTT = first stage): one table for the CPU and the device, {} KiB, none of the IOMMU's own",
        vm.function.bdf,
        vm.npt.table_bytes() / 1024
    );
    let frames = [vm.ram + PAGE, spare, spare + 4096];
    for (f, t) in frames.iter().zip(TOKENS) {
        host.write_u64(PhysAddr(*f), t);
    }
    // TLB control: 3 flushes this guest's ASID, 1 every ASID.
    let tlb = if flush_by_asid { 3 } else { 1 };
    let flush_cpu = |vm: &Vm<'_>| vm.vmcb.set(ctl::TLB_CONTROL, 1, tlb);
    let flush_iommu =
        |vm: &Vm<'_>| vm.dma.invalidate_table(GuestAddr(PAGE), 4096).map_err(|e| format!("invalidate_table: {e}"));
    let flush = |vm: &Vm<'_>| -> Result<(), String> {
        flush_cpu(vm);
        flush_iommu(vm)
    };
    let copy_at = |vm: &Vm<'_>| vm.npt.translate(COPY).map(|h| host.read_u64(PhysAddr(h)));
    let (mut stage, mut npf, mut cpu_stale) = (0, false, None);
    for _ in 0..MAX_EXITS {
        svm::vmrun(vm.vmcb.pa, &mut vm.regs);
        vm.vmcb.set(ctl::TLB_CONTROL, 1, 0);
        let code = vm.vmcb.r64(ctl::EXITCODE);
        let rip = vm.vmcb.r64(save::RIP);
        let prefix = format!("guest 3: #VMEXIT {code:#x} {} at guest RIP {rip:#x}", exit::name(code));
        match code {
            exit::VMMCALL if vm.vmcb.r64(save::RAX) == guest::NEXT => {
                vm.vmcb.w64(save::RIP, rip + 3);
                let got = vm.regs.rbx;
                let (op, a, b) = match stage {
                    0 => {
                        println!("{prefix}: the guest waits for commands; its CPU reads GPA {PAGE:#x}");
                        (guest::cmd::READ, PAGE, 0)
                    }
                    1 | 3 => {
                        let want = TOKENS[stage / 2];
                        if got != want {
                            return Err(format!("the guest's CPU read {got:#x} at GPA {PAGE:#x}, not {want:#x}"));
                        }
                        println!(
                            "{prefix}: the CPU read {got:#x} (host frame {:#x}); edu copies GPA {PAGE:#x} to GPA {COPY:#x}",
                            frames[stage / 2]
                        );
                        (guest::cmd::DMA, PAGE, COPY)
                    }
                    2 => {
                        let seen = copy_at(vm);
                        if got != 1 || seen != Some(TOKENS[0]) {
                            return Err(format!(
                                "edu's copy: done {got}, GPA {COPY:#x} holds {seen:x?}, not {:#x}",
                                TOKENS[0]
                            ));
                        }
                        vm.npt.map(PAGE, spare, Kind::Ram).map_err(|_| "no frame for the nested page table")?;
                        flush(vm)?;
                        println!(
                            "{prefix}: edu read {:#x} too; GPA {PAGE:#x} remapped to host {spare:#x} in the shared table, VMCB TLB control {tlb} and PASID-based IOTLB invalidation; the CPU reads it again",
                            TOKENS[0]
                        );
                        (guest::cmd::READ, PAGE, 0)
                    }
                    4 => {
                        let seen = copy_at(vm);
                        if got != 1 || seen != Some(TOKENS[1]) {
                            return Err(format!(
                                "edu's copy after the remap: done {got}, GPA {COPY:#x} holds {seen:x?}, not {:#x}",
                                TOKENS[1]
                            ));
                        }
                        // The negative test, device side: remap, flush only
                        // the CPU's nested TLB, leave the IOMMU's IOTLB.
                        vm.npt.map(PAGE, frames[2], Kind::Ram).map_err(|_| "no frame for the nested page table")?;
                        flush_cpu(vm);
                        println!(
                            "{prefix}: edu read {:#x} too, from the new frame; negative test: GPA {PAGE:#x} remapped to host {:#x}, VMCB TLB control {tlb} but NO IOTLB invalidation; edu copies it again",
                            TOKENS[1], frames[2]
                        );
                        (guest::cmd::DMA, PAGE, COPY)
                    }
                    5 => {
                        let seen = copy_at(vm);
                        if got != 1 || seen != Some(TOKENS[1]) {
                            return Err(format!(
                                "without the IOTLB invalidation edu's copy was done {got}, GPA {COPY:#x} holds {seen:x?}: not the old frame's {:#x} (the IOTLB kept nothing?)",
                                TOKENS[1]
                            ));
                        }
                        flush_iommu(vm)?;
                        println!(
                            "{prefix}: without the IOTLB invalidation edu still read the OLD frame's {:#x} (host {:#x}, no longer in the table): its IOTLB kept the stale translation; now PASID-based IOTLB invalidation, edu copies again",
                            TOKENS[1], frames[1]
                        );
                        (guest::cmd::DMA, PAGE, COPY)
                    }
                    6 => {
                        let seen = copy_at(vm);
                        if got != 1 || seen != Some(TOKENS[2]) {
                            return Err(format!(
                                "after the IOTLB invalidation edu's copy: done {got}, GPA {COPY:#x} holds {seen:x?}, not {:#x}",
                                TOKENS[2]
                            ));
                        }
                        println!(
                            "{prefix}: after the invalidation edu read the new frame's {:#x}; the CPU reads GPA {PAGE:#x} (caching host {:#x})",
                            TOKENS[2], frames[2]
                        );
                        (guest::cmd::READ, PAGE, 0)
                    }
                    7 => {
                        if got != TOKENS[2] {
                            return Err(format!(
                                "the guest's CPU read {got:#x} at GPA {PAGE:#x}, not {:#x}",
                                TOKENS[2]
                            ));
                        }
                        // The negative test, CPU side: remap, invalidate
                        // only the IOMMU, leave the nested TLB.
                        vm.npt.map(PAGE, frames[1], Kind::Ram).map_err(|_| "no frame for the nested page table")?;
                        flush_iommu(vm)?;
                        println!(
                            "{prefix}: the CPU read {got:#x}; negative test: GPA {PAGE:#x} remapped back to host {:#x}, PASID-based IOTLB invalidation but VMCB TLB control 0 (no nested TLB flush); the CPU reads it again",
                            frames[1]
                        );
                        (guest::cmd::READ, PAGE, 0)
                    }
                    8 => {
                        cpu_stale = Some(got);
                        if got == TOKENS[2] {
                            println!(
                                "{prefix}: without the nested TLB flush the CPU still read the OLD frame's {got:#x}; now VMCB TLB control {tlb}, the CPU reads again"
                            );
                        } else if got == TOKENS[1] {
                            println!(
                                "{prefix}: without the nested TLB flush the CPU read the NEW frame's {got:#x}: QEMU TCG kept no stale nested translation (it flushes its whole soft TLB at every VMRUN and #VMEXIT), so this half of the negative test cannot show staleness here; VMCB TLB control {tlb}, the CPU reads again"
                            );
                        } else {
                            return Err(format!(
                                "the guest's CPU read {got:#x} at GPA {PAGE:#x}, neither frame's token"
                            ));
                        }
                        flush_cpu(vm);
                        (guest::cmd::READ, PAGE, 0)
                    }
                    9 => {
                        if got != TOKENS[1] {
                            return Err(format!(
                                "after the nested TLB flush the CPU read {got:#x} at GPA {PAGE:#x}, not {:#x}",
                                TOKENS[1]
                            ));
                        }
                        if !vm.npt.unmap(PAGE) {
                            return Err(format!("GPA {PAGE:#x} was not mapped"));
                        }
                        flush(vm)?;
                        println!(
                            "{prefix}: the CPU read {got:#x}; GPA {PAGE:#x} removed from the shared table, both invalidated; edu copies it again"
                        );
                        (guest::cmd::DMA, PAGE, COPY)
                    }
                    10 => {
                        read_faults(core::slice::from_mut(vm));
                        let Some(f) =
                            vm.faults.iter().find(|f| f.function == vm.function && f.address == PAGE && !f.write)
                        else {
                            return Err(format!(
                                "edu's read of removed GPA {PAGE:#x} is not in the fault stream: {:x?} ({} lost)",
                                vm.faults, vm.lost
                            ));
                        };
                        println!(
                            "{prefix}: edu's read of GPA {PAGE:#x} was a first-stage fault (reason {:#x}) in the guest's fault stream; the CPU reads it",
                            f.reason
                        );
                        (guest::cmd::READ, PAGE, 0)
                    }
                    11 => {
                        if !npf || got != NPF_MARK {
                            return Err(format!(
                                "the CPU's read of removed GPA {PAGE:#x} gave {got:#x} without a nested page fault"
                            ));
                        }
                        println!("{prefix}: done; the guest halts");
                        (guest::cmd::HALT, 0, 0)
                    }
                    _ => return Err(format!("{prefix}: a request after the last command")),
                };
                stage += 1;
                (vm.regs.rbx, vm.regs.rcx, vm.regs.rdx) = (op, a, b);
            }
            exit::NPF if stage == 11 && vm.vmcb.r64(ctl::EXITINFO2) == PAGE => {
                println!(
                    "{prefix}: GPA {PAGE:#x} (error code {:#x}): the CPU faults on the removed page too; skipping the read",
                    vm.vmcb.r64(ctl::EXITINFO1)
                );
                npf = true;
                vm.regs.rbx = NPF_MARK;
                vm.vmcb.w64(save::RIP, rip + guest::cmd::READ_LEN);
            }
            exit::INTR => {
                let mut counts = [irq::count(vm.vector)];
                take_interrupts(core::slice::from_mut(vm), &mut counts);
            }
            exit::HLT if stage == 12 => {
                println!(
                    "{prefix}: the shared table served both: remap seen by the CPU and edu, removal faulted for both"
                );
                let cpu = if cpu_stale == Some(TOKENS[2]) {
                    "the CPU saw the old frame without the nested TLB flush"
                } else {
                    "the CPU saw the new frame even without the nested TLB flush (QEMU TCG caches no nested translation across VMRUN: not testable here)"
                };
                println!("guest 3: negative test: without the IOTLB invalidation edu saw the old frame; {cpu}");
                return Ok(());
            }
            _ => {
                return Err(format!(
                    "{prefix} at stage {stage}: EXITINFO1 {:#x}, EXITINFO2 {:#x}",
                    vm.vmcb.r64(ctl::EXITINFO1),
                    vm.vmcb.r64(ctl::EXITINFO2)
                ));
            }
        }
    }
    Err(format!("the guest did not finish within {MAX_EXITS} exits"))
}

/// Takes pending host interrupts (after an INTR exit) and hands each
/// guest's MSIs to it for injection.
fn take_interrupts(vms: &mut [Vm<'_>], counts: &mut [u64]) {
    let deadline = portcullis_kernel::time::uptime_ns() + 100_000_000;
    let changed = |counts: &[u64]| HOST_VECTORS.iter().zip(counts).any(|(&v, &c)| irq::count(v) != c);
    irq::enable();
    while !changed(counts) && portcullis_kernel::time::uptime_ns() < deadline {
        core::hint::spin_loop();
    }
    irq::disable();
    for (vm, c) in vms.iter_mut().zip(counts.iter_mut()) {
        let now = irq::count(vm.vector);
        let new = now - *c;
        *c = now;
        if new == 0 {
            continue;
        }
        vm.arrived += new;
        if vm.interrupts {
            vm.pending += new;
            println!("host: {new} MSI(s) of guest {}'s edu on host vector {:#x}", vm.n, vm.vector);
        }
    }
}

/// Reads each guest's fault stream.
fn read_faults(vms: &mut [Vm<'_>]) {
    for vm in vms {
        let batch = vm.dma.dma_faults();
        vm.faults.extend(batch.faults);
        vm.lost += batch.lost;
    }
}

/// Runs both guests, switching between them after every #VMEXIT, until
/// both halted.
fn run_loop(vms: &mut [Vm<'_>]) -> Result<(), String> {
    let mut counts: Vec<u64> = vms.iter().map(|v| irq::count(v.vector)).collect();
    let mut exits = 0;
    while vms.iter().any(|v| !v.rep.halted) {
        for i in 0..vms.len() {
            if vms[i].rep.halted {
                continue;
            }
            if exits >= MAX_EXITS {
                return Err(format!("the guests did not finish within {MAX_EXITS} exits"));
            }
            exits += 1;
            vms[i].step().map_err(|why| format!("guest {}: {why}", vms[i].n))?;
            if vms[i].vmcb.r64(ctl::EXITCODE) == exit::INTR {
                take_interrupts(vms, &mut counts);
            }
            // The fault streams after every exit, as a hypervisor would poll
            // them: the unit records a fault only while the one before was
            // read (QEMU drops the next one otherwise).
            read_faults(vms);
        }
    }
    println!("host: both guests halted after {exits} exits, the hypervisor switching between them after each");
    Ok(())
}

/// Handles one VMMCALL request; a description, or why it is wrong.
fn vmcall(rep: &mut Report, rax: u64, regs: &GuestRegs) -> Result<String, String> {
    let (rbx, rcx) = (regs.rbx, regs.rcx);
    match rax {
        req::HELLO if rbx == guest::HELLO => {
            rep.hello = true;
            Ok("hello from the guest, running in long mode on its own page tables".into())
        }
        req::COPY => {
            rep.copy = Some((rbx, rcx == 1, regs.rdx));
            Ok(format!(
                "the guest had edu copy GPA {:#x} to GPA {:#x} (4 KiB): DMAs {}, {} quadword(s) differ, its interrupt handler ran {} time(s)",
                guest::SRC,
                guest::DST,
                if rcx == 1 { "completed" } else { "timed out" },
                rbx,
                regs.rdx
            ))
        }
        req::OUTSIDE => {
            rep.outside = Some((rbx, rcx == 1));
            Ok(format!(
                "the guest had edu write 4 KiB to address {rbx:#x}, outside its RAM (edu {})",
                if rcx == 1 { "says done" } else { "timed out" }
            ))
        }
        req::EXPECT_NPF => {
            rep.expect_npf = Some((rbx, rcx));
            Ok(format!("the guest will read GPA {rbx:#x}, outside its RAM"))
        }
        req::DONE => {
            rep.done = true;
            Ok("the guest is done".into())
        }
        _ => Err(format!("unknown request RAX {rax:#x} (RBX {rbx:#x}, RCX {rcx:#x})")),
    }
}

fn setup_vmcb(v: &Vmcb<'_>, ncr3: u64, asid: u32) {
    v.set(ctl::INTERCEPT_MISC1, 4, intercept::INTR | intercept::HLT | intercept::SHUTDOWN);
    v.set(ctl::INTERCEPT_MISC2, 4, intercept::VMRUN | intercept::VMMCALL);
    v.set(ctl::ASID, 4, asid as u64);
    v.set(ctl::TLB_CONTROL, 1, 1);
    // Physical interrupts stay masked by the host's RFLAGS.IF.
    v.set(ctl::VINTR, 4, 1 << 24);
    v.w64(ctl::NP_ENABLE, 1);
    v.w64(ctl::N_CR3, ncr3);
    let flat = |selector, attrib| Segment { selector, attrib, limit: 0xffff_ffff, base: 0 };
    // 64-bit code: type 0xb, S, P; L; G.
    v.segment(save::CS, flat(0x08, 0x0a9b));
    // Data: type 3, S, P; D/B; G.
    for s in [save::ES, save::SS, save::DS] {
        v.segment(s, flat(0x10, 0x0c93));
    }
    v.segment(save::GDTR, Segment { selector: 0, attrib: 0, limit: 23, base: guest::GDT });
    // No IDT: an exception in the guest is a triple fault (SHUTDOWN).
    v.segment(save::IDTR, Segment { selector: 0, attrib: 0, limit: 0, base: 0 });
    v.set(save::CPL, 1, 0);
    // LME, LMA, SVME (VMRUN requires SVME in the guest's EFER).
    v.w64(save::EFER, 1 << 8 | 1 << 10 | svm::EFER_SVME);
    v.w64(save::CR4, 1 << 5);
    v.w64(save::CR3, guest::PML4);
    // PG, NE, ET, PE.
    v.w64(save::CR0, 1 << 31 | 1 << 5 | 1 << 4 | 1);
    v.w64(save::DR7, 0x400);
    v.w64(save::DR6, 0xffff_0ff0);
    v.w64(save::RFLAGS, 0x2);
    v.w64(save::RIP, guest::CODE);
    v.w64(save::RSP, guest::STACK_TOP);
    v.w64(save::RAX, 0);
    v.w64(save::G_PAT, 0x0007_0406_0007_0406);
}

/// The host-side checks of both guests.
fn check_all(p: &Machine, host: &KernelHost, vms: &mut [Vm<'_>]) -> Outcome {
    let vtd = p.dmar.is_some();
    read_faults(vms);
    for vm in vms.iter() {
        if let Err(why) = check(host, vm, vtd, &vm.faults, vm.lost) {
            return Outcome::Fail(format!("guest {}: {why}", vm.n));
        }
        // The other guest's device is never in this guest's stream.
        if let Some(f) = vm.faults.iter().find(|f| vms.iter().any(|o| o.n != vm.n && o.function == f.function)) {
            fail!("guest {}'s fault stream has a fault of another guest's device: {f:x?}", vm.n);
        }
    }
    // The second guest's copy went to its own frames, the first guest's
    // copy is still its own pattern (bytes checked), and its outside DMA
    // at the first guest's frame changed nothing there.
    let (a, b) = (&vms[0], &vms[1]);
    let a_dst = a.npt.translate(guest::DST).expect("checked");
    if let Err(why) = pattern_at(host, a_dst, a.key) {
        fail!("guest 1's copy at host {a_dst:#x} after guest 2 ran: {why}");
    }
    println!(
        "host: guest 2's edu DMA to the same GPAs landed in guest 2's frames; its DMA at guest 1's frame (host {:#x}) did not reach it: guest 1's copy is intact, all 512 quadwords",
        b.target
    );
    if vtd {
        println!("host: each guest's blocked DMA is in its own fault stream only");
    }
    Outcome::Ok
}

/// Checks the host frame at `hpa` holds the pattern of `key`.
fn pattern_at(host: &KernelHost, hpa: u64, key: u64) -> Result<(), String> {
    let mut page = [0u8; 4096];
    host.read_phys(PhysAddr(hpa), &mut page).expect("guest RAM is RAM");
    for (k, q) in page.chunks_exact(8).enumerate() {
        let got = u64::from_le_bytes(q.try_into().expect("8 bytes"));
        if got != guest::pattern(key, k as u64) {
            return Err(format!("quadword {k} is {got:#x}, not the pattern of key {key:#x}"));
        }
    }
    Ok(())
}

/// One guest's checks: its copy, its guard frames, its blocked DMA (and
/// its fault), its nested page fault, its interrupts.
fn check(host: &KernelHost, vm: &Vm<'_>, vtd: bool, faults: &[GuestFault], lost: u64) -> Result<(), String> {
    let (n, rep) = (vm.n, &vm.rep);
    if !rep.hello || !rep.done {
        return Err(format!("the guest did not say hello and done: {rep:?}"));
    }
    // The copy, as the guest saw it and in the host's frames.
    match rep.copy {
        Some((0, true, _)) => {}
        Some((bad, done, _)) => return Err(format!("the copy: {bad} quadword(s) differ, DMAs completed: {done}")),
        None => return Err("the guest did not report its copy".into()),
    }
    let Some(dst) = vm.npt.translate(guest::DST) else { return Err(format!("GPA {:#x} is not mapped", guest::DST)) };
    pattern_at(host, dst, vm.key).map_err(|why| format!("host frame {dst:#x} (GPA {:#x}): {why}", guest::DST))?;
    println!(
        "guest {n}: host: the copy is in the guest's frame at host {dst:#x} (GPA {:#x}), all 512 quadwords",
        guest::DST
    );
    // Nothing outside the guest's frames changed.
    let mut page = [0u8; 4096];
    for &(base, pages) in &vm.guards {
        for i in 0..pages {
            host.read_phys(PhysAddr(base + i * 4096), &mut page).expect("guard frames are RAM");
            if let Some(off) = page.iter().position(|&b| b != CANARY) {
                return Err(format!("host guard frame {:#x} changed at offset {off:#x}", base + i * 4096));
            }
        }
    }
    println!("guest {n}: host: the guard frames around the guest's memory are unchanged");
    // The DMA outside its RAM: blocked.
    let Some((outside, _)) = rep.outside else { return Err("the guest did not report its DMA outside its RAM".into()) };
    if outside != vm.target {
        return Err(format!("the outside DMA went to {outside:#x}, not {:#x}", vm.target));
    }
    if outside < guest::RAM_SIZE {
        return Err(format!("the outside DMA target {outside:#x} is inside the guest's RAM"));
    }
    let fault = faults.iter().find(|f| f.function == vm.function && f.address == outside && f.write);
    match (vtd, fault) {
        (_, Some(f)) => println!(
            "guest {n}: host: the DMA to {outside:#x} was blocked; this guest's fault stream has it (reason {:#x})",
            f.reason
        ),
        (true, None) => {
            return Err(format!(
                "the DMA to {outside:#x} is not in the guest's fault stream: {faults:x?} ({lost} lost)"
            ));
        }
        (false, None) => println!(
            "guest {n}: host: the DMA to {outside:#x} was blocked (AMD-Vi: QEMU's event log is not read; memory checked)"
        ),
    }
    match rep.npf {
        Some(gpa) if gpa == guest::NPF_PROBE => {}
        other => return Err(format!("no nested page fault at GPA {:#x} (got {other:?})", guest::NPF_PROBE)),
    }
    // Interrupts: 2 DMA completions, 2 MSIs, 2 injections, 2 handler runs.
    let handled = rep.copy.map_or(0, |c| c.2);
    if vm.interrupts {
        if (vm.arrived, vm.injected, handled) != (2, 2, 2) {
            return Err(format!(
                "2 DMA completions: {} MSI(s) arrived on the host, {} injected, the guest's handler ran {handled} time(s)",
                vm.arrived, vm.injected
            ));
        }
        println!(
            "guest {n}: host: 2 DMA completions, 2 MSIs on host vector {:#x}, 2 injected, the guest's handler ran exactly twice",
            vm.vector
        );
    } else if vm.arrived != 0 {
        return Err(format!("{} interrupt(s) on host vector {:#x} with no MSI routed", vm.arrived, vm.vector));
    }
    Ok(())
}
