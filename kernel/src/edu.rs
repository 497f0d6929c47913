//! The QEMU `edu` device (PCI 1234:11e8) as a DMA engine for tests: it
//! copies between its 4 KiB internal buffer (device address 0x40000) and
//! a DMA address, so a test can make a device read or write any IOVA.
//!
//! Registers (BAR0): 0x80 source, 0x88 destination, 0x90 count, 0x98
//! command (bit 0 start / busy, bit 1 direction: 1 = buffer to RAM).

use crate::ecam::Ecam;
use crate::pci::{BarKind, ConfigAccess, PciDevice};
use core::time::Duration;

/// The edu buffer's device address.
pub const EDU_BUFFER: u64 = 0x40000;
/// Its size.
pub const EDU_BUFFER_SIZE: u64 = 4096;

/// One edu device, memory decoding and bus mastering on.
#[derive(Debug)]
pub struct Edu {
    regs: *mut u8,
    /// Requester id.
    pub sid: u16,
}

/// A DMA that did not finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaTimeout;

impl Edu {
    /// Takes over `dev` (must be an edu with its BAR0): its BARs as
    /// enumerated (put back after a reset), memory decode and bus mastering
    /// on.
    pub fn new(ecam: &Ecam, dev: &PciDevice) -> Option<Self> {
        if (dev.vendor, dev.device) != (0x1234, 0x11e8) {
            return None;
        }
        let bar = dev.bars.iter().find(|b| b.index == 0)?;
        restore_bars(ecam, dev);
        let cmd = ecam.read32(dev.segment, dev.bdf, 4);
        // Memory space + bus master.
        ecam.write32(dev.segment, dev.bdf, 4, (cmd & 0xffff) | 0x6);
        let regs = crate::mem::map_mmio(bar.base, 0x100).ok()?;
        Some(Self { regs, sid: dev.bdf.requester_id() })
    }

    fn w64(&self, off: usize, v: u64) {
        // SAFETY: `regs` maps the edu's 1 MiB BAR0 uncached; these offsets
        // are its DMA registers.
        unsafe { self.regs.add(off).cast::<u64>().write_volatile(v) }
    }

    fn r64(&self, off: usize) -> u64 {
        // SAFETY: as for w64.
        unsafe { self.regs.add(off).cast::<u64>().read_volatile() }
    }

    fn run(&self, src: u64, dst: u64, len: u64, to_ram: bool) -> Result<(), DmaTimeout> {
        assert!(len <= EDU_BUFFER_SIZE);
        self.w64(0x80, src);
        self.w64(0x88, dst);
        self.w64(0x90, len);
        self.w64(0x98, 1 | (to_ram as u64) << 1);
        // A transfer takes about 100 ms of virtual time.
        crate::time::poll_until(Duration::from_secs(5), || (self.r64(0x98) & 1 == 0).then_some(()))
            .map_err(|_| DmaTimeout)
    }

    fn w32(&self, off: usize, v: u32) {
        // SAFETY: as for w64; the interrupt registers take 32-bit accesses.
        unsafe { self.regs.add(off).cast::<u32>().write_volatile(v) }
    }

    fn r32(&self, off: usize) -> u32 {
        // SAFETY: as for w32.
        unsafe { self.regs.add(off).cast::<u32>().read_volatile() }
    }

    /// Raises the device's interrupt with status bits `status` (register
    /// 0x60): an MSI when MSI is enabled.
    pub fn raise_interrupt(&self, status: u32) {
        self.w32(0x60, status);
    }

    /// Acknowledges status bits `status` (register 0x64).
    pub fn ack_interrupt(&self, status: u32) {
        self.w32(0x64, status);
    }

    /// Pending interrupt status bits (register 0x24).
    pub fn interrupt_status(&self) -> u32 {
        self.r32(0x24)
    }

    /// The device reads `len` bytes at DMA address `src` into its buffer.
    pub fn read_from(&self, src: u64, len: u64) -> Result<(), DmaTimeout> {
        self.run(src, EDU_BUFFER, len, false)
    }

    /// The device writes `len` bytes of its buffer to DMA address `dst`.
    pub fn write_to(&self, dst: u64, len: u64) -> Result<(), DmaTimeout> {
        self.run(EDU_BUFFER, dst, len, true)
    }
}

/// Puts back the BARs enumeration found where they changed: a reset (an
/// FLR, a secondary bus reset when the passthrough crate takes the device
/// back) returns them to zero, and restoring them is the VMM's business,
/// here the test's.
fn restore_bars(ecam: &Ecam, dev: &PciDevice) {
    for b in &dev.bars {
        let off = 0x10 + 4 * b.index as u16;
        let flags = if b.kind == BarKind::Io { 0x3 } else { 0xf };
        if ecam.read32(dev.segment, dev.bdf, off) & !flags != b.base as u32 & !flags {
            ecam.write32(dev.segment, dev.bdf, off, b.base as u32 & !flags);
        }
        if b.kind == BarKind::Mem64 && ecam.read32(dev.segment, dev.bdf, off + 4) != (b.base >> 32) as u32 {
            ecam.write32(dev.segment, dev.bdf, off + 4, (b.base >> 32) as u32);
        }
    }
}

/// Programs (or, with `None`, disables) the MSI capability of `dev`: one
/// vector, message `address`/`data`. `false` when the function has no MSI
/// capability.
pub fn set_msi(ecam: &Ecam, dev: &PciDevice, message: Option<(u64, u32)>) -> bool {
    let Some(msi) = dev.msi else { return false };
    let (seg, bdf, off) = (dev.segment, dev.bdf, msi.offset as u16);
    let header = ecam.read32(seg, bdf, off);
    // Control is the upper half of the first dword: clear Enable and
    // Multiple Message Enable first.
    let control = (header >> 16) & !(1 | 0x70);
    ecam.write32(seg, bdf, off, header & 0xffff | control << 16);
    if let Some((address, data)) = message {
        ecam.write32(seg, bdf, off + 4, address as u32);
        let data_off = if msi.addr64 {
            ecam.write32(seg, bdf, off + 8, (address >> 32) as u32);
            off + 12
        } else {
            off + 8
        };
        ecam.write32(seg, bdf, data_off, data & 0xffff);
        ecam.write32(seg, bdf, off, header & 0xffff | (control | 1) << 16);
    }
    true
}
