//! The hypervisor proper: SVM checks, the guest's memory and nested page
//! table, its DMA view through the `portcullis` crate, the VMCB, the run
//! loop and the host-side checks.

use crate::guest::{self, req};
use crate::npt::{Kind, Npt};
use crate::svm::{self, GuestRegs};
use crate::vmcb::{Segment, Vmcb, ctl, exit, intercept, save};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::x86_64::__cpuid;
use portcullis::{Function, GuestAddr, PhysAddr, Platform, Vendor};
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

/// Host frames on each side of the guest's RAM, filled with [`CANARY`].
const GUARD_PAGES: u64 = 2;
const CANARY: u8 = 0xc5;
/// More exits than this: the guest is stuck in a loop of them.
const MAX_EXITS: usize = 64;
/// The host vector edu's MSI is routed to.
const HOST_VECTOR: u8 = 0x2a;

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

    // The device: the first edu, on the root bus.
    let Some(dev) = p.find_pci(0x1234, 0x11e8) else { fail!("no edu device") };
    let bdf = dev.bdf;
    let Some(bar0) = dev.bars.iter().find(|b| b.index == 0).map(|b| b.base) else { fail!("edu {bdf} has no BAR0") };
    // Memory decoding and bus mastering on (the kernel's edu driver does
    // that; the hypervisor never touches its registers itself).
    if portcullis_kernel::edu::Edu::new(&p.ecam, dev).is_none() {
        fail!("edu {bdf} cannot be enabled");
    }

    // Guest RAM: host frames with guard frames around them.
    let ram_pages = guest::RAM_SIZE / 4096;
    let total = (ram_pages + 2 * GUARD_PAGES) as usize;
    let Some(PhysAddr(frames)) = host.alloc_frames(total, 4096) else { fail!("no {total} free frames") };
    let ram = frames + GUARD_PAGES * 4096;
    let guards = [(frames, GUARD_PAGES), (ram + guest::RAM_SIZE, GUARD_PAGES)];
    let canary = [CANARY; 4096];
    for &(base, pages) in &guards {
        for i in 0..pages {
            host.write_phys(PhysAddr(base + i * 4096), &canary).expect("guard frames are RAM");
        }
    }
    let r = run_guest(p, &host, &iommus, dev, bar0, ram, &guards);
    host.free_frames(PhysAddr(frames), total);
    r
}

#[allow(clippy::too_many_arguments)]
fn run_guest(
    p: &Machine,
    host: &KernelHost,
    iommus: &Iommus,
    dev: &PciDevice,
    bar0: u64,
    ram: u64,
    guards: &[(u64, u64)],
) -> Outcome {
    let (seg, bdf) = (dev.segment, dev.bdf);
    let function = Function { segment: seg, bdf };
    println!(
        "guest memory: GPA {:#x}-{:#x} ({} MiB) is host {:#x}-{:#x} (not identity-placed); {} guard frames with canary {:#04x} on each side",
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
    let image = svm::guest_image();
    if image.len() as u64 > guest::CODE_MAX {
        fail!("the guest program is {} bytes, more than its {} byte slot", image.len(), guest::CODE_MAX);
    }
    host.write_phys(PhysAddr(ram + guest::CODE), image).expect("guest RAM is RAM");
    println!(
        "guest program: {} bytes at GPA {:#x}, its page tables at GPA {:#x}, GDT at {:#x}, stack below {:#x}",
        image.len(),
        guest::CODE,
        guest::PML4,
        guest::GDT,
        guest::STACK_TOP
    );

    // The nested page table: the RAM, edu's register page, nothing else.
    let Ok(mut npt) = Npt::new(host) else { fail!("no frame for the nested page table") };
    for i in 0..guest::RAM_SIZE / 4096 {
        if npt.map(i * 4096, ram + i * 4096, Kind::Ram).is_err() {
            fail!("no frame for the nested page table");
        }
    }
    if npt.map(guest::EDU, bar0, Kind::Mmio).is_err() {
        fail!("no frame for the nested page table");
    }
    println!(
        "nested page table: root {:#x}, {} KiB of tables; GPA {:#x} is edu {bdf}'s BAR0 (host {:#x}), uncached",
        npt.root,
        npt.table_bytes() / 1024,
        guest::EDU,
        bar0
    );

    // The guest's DMA view: the same memory at IOVA = GPA, and the edu.
    let err = |what: &str, e: portcullis::PassthroughError| format!("{what}: {e}");
    let mut dma = match GuestDma::new(iommus, 1 << 20) {
        Ok(d) => d,
        Err(e) => fail!("{}", err("GuestDma::new", e)),
    };
    if let Err(e) = dma.add_memory(GuestAddr(0), PhysAddr(ram), guest::RAM_SIZE, true) {
        fail!("{}", err("add_memory", e));
    }
    let isolated = iommus.interrupts_isolated(seg, bdf);
    if !isolated {
        println!(
            "note: this IOMMU does not remap edu's interrupts here; assigning it anyway (the guest polls, no MSI is routed)"
        );
        dma.allow_unsafe_interrupts(true);
    }
    if let Err(e) = dma.assign(iommus, seg, bdf) {
        fail!("{}", err("assign", e));
    }
    println!(
        "device: edu {bdf} (requester id {:#06x}) assigned to the guest; its DMA sees GPA {:#x}-{:#x} at IOVA = GPA",
        bdf.requester_id(),
        0,
        guest::RAM_SIZE - 1
    );

    // edu's MSI: through interrupt remapping to a host vector, injected
    // into the guest on arrival.
    let interrupts = if isolated {
        let Some(apic) = irq::apic_id() else { fail!("no local APIC") };
        let msi = match dma.route_msi(seg, bdf, HOST_VECTOR, apic) {
            Ok(m) => m,
            Err(e) => fail!("{}", err("route_msi", e)),
        };
        if !portcullis_kernel::edu::set_msi(&p.ecam, dev, Some((msi.address, msi.data))) {
            fail!("edu {bdf} has no MSI capability");
        }
        println!(
            "interrupts: edu's MSI routed through interrupt remapping to host vector {HOST_VECTOR:#x} (address {:#x}, data {:#x}); the hypervisor injects each as vector {:#x} into the guest",
            msi.address,
            msi.data,
            guest::VECTOR
        );
        gw(guest::MAILBOX, 4);
        true
    } else {
        println!("interrupts: none routed; the guest polls edu's status");
        false
    };

    let outcome = match Vmcb::new(host) {
        Some(vmcb) => run_and_check(p, host, &vmcb, &npt, &mut dma, function, guards, interrupts),
        None => Outcome::Fail("no frame for the VMCB".into()),
    };
    if let Err(e) = dma.unassign(seg, bdf) {
        println!("unassign: {e}");
    }
    outcome
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

#[allow(clippy::too_many_arguments)]
fn run_and_check(
    p: &Machine,
    host: &KernelHost,
    vmcb: &Vmcb<'_>,
    npt: &Npt<'_>,
    dma: &mut GuestDma,
    function: Function,
    guards: &[(u64, u64)],
    interrupts: bool,
) -> Outcome {
    // SVM on; the host save area.
    let Some(PhysAddr(hsave)) = host.alloc_frames(1, 4096) else { fail!("no frame for the host save area") };
    svm::enable(hsave);
    setup_vmcb(vmcb, npt.root);
    println!(
        "VMCB at {:#x}: ASID 1, nested paging (nCR3 {:#x}), intercepts VMMCALL, HLT, INTR, SHUTDOWN, VMRUN",
        vmcb.pa, npt.root
    );

    let mut regs = GuestRegs::default();
    let mut rep = Report::default();
    let mut exits = 0;
    let mut failure = None;
    let host_count = irq::count(HOST_VECTOR);
    let mut injected = 0u64;
    while exits < MAX_EXITS && failure.is_none() && !rep.halted {
        svm::vmrun(vmcb.pa, &mut regs);
        exits += 1;
        // Only the first run flushes the TLB; an injection happens once.
        vmcb.set(ctl::TLB_CONTROL, 1, 0);
        vmcb.w64(ctl::EVENTINJ, 0);
        let code = vmcb.r64(ctl::EXITCODE);
        let rip = vmcb.r64(save::RIP);
        let prefix = format!("#VMEXIT {code:#x} {} at guest RIP {rip:#x}", exit::name(code));
        match code {
            exit::VMMCALL => {
                let rax = vmcb.r64(save::RAX);
                match vmcall(&mut rep, rax, &regs) {
                    Ok(what) => println!("{prefix}: {what}"),
                    Err(why) => {
                        println!("{prefix}: {why}");
                        failure = Some(why);
                    }
                }
                vmcb.w64(save::RIP, rip + 3);
            }
            exit::HLT => {
                println!("{prefix}: the guest halted; the hypervisor stops running it");
                rep.halted = true;
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
                    }
                    _ => {
                        println!("{prefix}: GPA {gpa:#x} (error code {info:#x}) is not guest memory");
                        failure = Some(format!("unexpected nested page fault at GPA {gpa:#x}, RIP {rip:#x}"));
                    }
                }
            }
            exit::INTR => {
                // Take it on the host (IF on until the vector is counted).
                let before = irq::count(HOST_VECTOR);
                let deadline = portcullis_kernel::time::uptime_ns() + 100_000_000;
                irq::enable();
                while irq::count(HOST_VECTOR) == before && portcullis_kernel::time::uptime_ns() < deadline {
                    core::hint::spin_loop();
                }
                irq::disable();
                if interrupts && irq::count(HOST_VECTOR) > before {
                    vmcb.w64(ctl::EVENTINJ, guest::VECTOR | 1 << 31);
                    injected += 1;
                    println!(
                        "{prefix}: edu's MSI arrived on host vector {HOST_VECTOR:#x}; injecting vector {:#x} into the guest",
                        guest::VECTOR
                    );
                } else {
                    println!("{prefix}: a host interrupt, not the guest's; resuming the guest");
                }
            }
            _ => {
                println!(
                    "{prefix}: EXITINFO1 {:#x}, EXITINFO2 {:#x}",
                    vmcb.r64(ctl::EXITINFO1),
                    vmcb.r64(ctl::EXITINFO2)
                );
                failure = Some(format!("#VMEXIT {code:#x} {} at guest RIP {rip:#x}", exit::name(code)));
            }
        }
    }
    host.free_frames(PhysAddr(hsave), 1);
    if let Some(why) = failure {
        return Outcome::Fail(why);
    }
    if !rep.halted {
        fail!("the guest did not finish within {MAX_EXITS} exits");
    }
    let arrived = irq::count(HOST_VECTOR) - host_count;
    if interrupts {
        let handled = rep.copy.map_or(0, |c| c.2);
        if (arrived, injected, handled) != (2, 2, 2) {
            fail!(
                "2 DMA completions: {arrived} MSI(s) arrived on the host, {injected} injected, the guest's handler ran {handled} time(s)"
            );
        }
        println!("host: 2 DMA completions, 2 MSIs on the host, 2 injected, the guest's handler ran exactly twice");
    } else if arrived != 0 {
        fail!("{arrived} interrupt(s) on host vector {HOST_VECTOR:#x} with no MSI routed");
    }
    check(p, host, npt, dma, function, guards, &rep)
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
                "the guest had edu write 4 KiB to GPA {rbx:#x}, outside its RAM (edu {})",
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

fn setup_vmcb(v: &Vmcb<'_>, ncr3: u64) {
    v.set(ctl::INTERCEPT_MISC1, 4, intercept::INTR | intercept::HLT | intercept::SHUTDOWN);
    v.set(ctl::INTERCEPT_MISC2, 4, intercept::VMRUN | intercept::VMMCALL);
    v.set(ctl::ASID, 4, 1);
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

#[allow(clippy::too_many_arguments)]
fn check(
    p: &Machine,
    host: &KernelHost,
    npt: &Npt<'_>,
    dma: &mut GuestDma,
    function: Function,
    guards: &[(u64, u64)],
    rep: &Report,
) -> Outcome {
    if !rep.hello || !rep.done {
        fail!("the guest did not say hello and done: {rep:?}");
    }
    // The copy, as the guest saw it and in the host's frames.
    match rep.copy {
        Some((0, true, _)) => {}
        Some((bad, done, _)) => fail!("the guest's copy: {bad} quadword(s) differ, DMAs completed: {done}"),
        None => fail!("the guest did not report its copy"),
    }
    let Some(dst) = npt.translate(guest::DST) else { fail!("GPA {:#x} is not mapped", guest::DST) };
    let mut page = [0u8; 4096];
    host.read_phys(PhysAddr(dst), &mut page).expect("guest RAM is RAM");
    for (k, q) in page.chunks_exact(8).enumerate() {
        let got = u64::from_le_bytes(q.try_into().expect("8 bytes"));
        if got != guest::pattern(k as u64) {
            fail!("host frame {dst:#x} (GPA {:#x}) quadword {k} is {got:#x}, not the pattern", guest::DST);
        }
    }
    println!("host: the copy is in the guest's frame at host {dst:#x} (GPA {:#x}), all 512 quadwords", guest::DST);
    // Nothing outside the guest's frames changed.
    for &(base, pages) in guards {
        for i in 0..pages {
            host.read_phys(PhysAddr(base + i * 4096), &mut page).expect("guard frames are RAM");
            if let Some(off) = page.iter().position(|&b| b != CANARY) {
                fail!("host guard frame {:#x} changed at offset {off:#x}", base + i * 4096);
            }
        }
    }
    println!("host: the guard frames around the guest's memory are unchanged");
    // The DMA outside its RAM: blocked (the frame after the RAM is a guard).
    let Some((outside, _)) = rep.outside else { fail!("the guest did not report its DMA outside its RAM") };
    if outside != guest::OUTSIDE {
        fail!("the guest's outside DMA went to {outside:#x}, not {:#x}", guest::OUTSIDE);
    }
    let vtd = p.dmar.is_some();
    let batch = dma.dma_faults();
    let fault = batch.faults.iter().find(|f| f.function == function && f.address == outside && f.write);
    match (vtd, fault) {
        (_, Some(f)) => {
            println!(
                "host: the DMA to GPA {outside:#x} was blocked; the guest's fault stream has it (reason {:#x})",
                f.reason
            )
        }
        (true, None) => fail!(
            "the DMA to GPA {outside:#x} is not in the guest's fault stream: {:x?} ({} lost)",
            batch.faults,
            batch.lost
        ),
        (false, None) => println!(
            "host: the DMA to GPA {outside:#x} was blocked: no host frame changed (AMD-Vi: QEMU's event log is not read)"
        ),
    }
    match rep.npf {
        Some(gpa) if gpa == guest::NPF_PROBE => {}
        other => fail!("no nested page fault at GPA {:#x} (got {other:?})", guest::NPF_PROBE),
    }
    Outcome::Ok
}
