//! The kernel's GDT and TSS, replacing the boot GDT. The TSS supplies an
//! interrupt stack (IST 1) so a double fault (for example a kernel stack
//! overflow into the guard page) still reaches the handler.

use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;

/// IST slot (0-based, as the IDT wants it) used for #DF, #NMI and #MC.
pub const FAULT_IST_INDEX: u16 = 0;
const FAULT_STACK_SIZE: usize = 32 * 1024;

#[repr(align(16))]
struct FaultStack(core::cell::UnsafeCell<[u8; FAULT_STACK_SIZE]>);

// SAFETY: Rust code never reads or writes the stack's bytes; only the CPU
// uses them as a stack, through the TSS.
unsafe impl Sync for FaultStack {}

static FAULT_STACK: FaultStack = FaultStack(core::cell::UnsafeCell::new([0; FAULT_STACK_SIZE]));
static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, SegmentSelector, SegmentSelector, SegmentSelector)> = Once::new();

/// The IST stack's range, for the stack-trace walker.
pub fn fault_stack_range() -> (u64, u64) {
    let start = FAULT_STACK.0.get() as u64;
    (start, start + FAULT_STACK_SIZE as u64)
}

/// Loads the GDT, reloads the segment registers and loads the TSS.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        let (_, top) = fault_stack_range();
        tss.interrupt_stack_table[FAULT_IST_INDEX as usize] = VirtAddr::new(top);
        tss
    });
    let gdt = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        (gdt, code, data, tss_sel)
    });
    gdt.0.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which
    // is 'static; the code segment is a 64-bit kernel code segment and the
    // data selector a flat data segment, so execution continues unchanged.
    unsafe {
        CS::set_reg(gdt.1);
        DS::set_reg(gdt.2);
        ES::set_reg(gdt.2);
        SS::set_reg(gdt.2);
        load_tss(gdt.3);
    }
}
