//! The IOAPIC: indirect register access (IOREGSEL at offset 0, IOWIN at
//! 0x10, EOI at 0x40 from version 0x20 on) and its redirection entries.
//!
//! With interrupt remapping on, a pin reaches a CPU only through a
//! remapping entry: the entry to program comes from the IOMMU layer
//! (`portcullis::Iommus::route_ioapic`), in the form the unit remaps
//! (VT-d: remappable format naming the entry; AMD-Vi: the entry's index in
//! the vector field). This driver only writes what it is given, masked
//! while half written.
//!
//! Not for interrupt context: each register access holds a lock so that no
//! other access selects another register between IOREGSEL and IOWIN.

use crate::acpi::{AcpiInfo, IoApic as MadtIoApic};
use crate::mem::paging::MapError;
use core::fmt;

const IOREGSEL: usize = 0x00;
const IOWIN: usize = 0x10;
const IOEOI: usize = 0x40;
const REG_VER: u32 = 0x01;
const REG_REDTBL: u32 = 0x10;

/// Mask bit of a redirection entry.
pub const RTE_MASKED: u64 = 1 << 16;

/// One IOAPIC, its registers mapped uncached.
pub struct IoApic {
    id: u8,
    gsi_base: u32,
    pins: u8,
    version: u8,
    /// Virtual address of the 4 KiB register page; the lock orders
    /// IOREGSEL/IOWIN pairs.
    regs: spin::Mutex<usize>,
}

impl fmt::Debug for IoApic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IOAPIC {} (version {:#x}, GSIs {}..{})", self.id, self.version, self.gsi_base, self.gsi_end())
    }
}

impl IoApic {
    /// Maps the IOAPIC the MADT describes and reads its version register.
    pub fn new(madt: &MadtIoApic) -> Result<Self, MapError> {
        let regs = crate::mem::map_mmio(madt.address as u64, 4096)? as usize;
        let mut a = Self { id: madt.id, gsi_base: madt.gsi_base, pins: 0, version: 0, regs: spin::Mutex::new(regs) };
        let ver = a.read(REG_VER);
        a.version = ver as u8;
        a.pins = ((ver >> 16) & 0xff) as u8 + 1;
        Ok(a)
    }

    /// The IOAPIC of `acpi` whose pins include global system interrupt
    /// `gsi`, and that pin.
    pub fn for_gsi(acpi: &AcpiInfo, gsi: u32) -> Option<(Self, u8)> {
        for m in acpi.ioapics.iter().filter(|m| m.gsi_base <= gsi) {
            let Ok(a) = Self::new(m) else { continue };
            if gsi < a.gsi_end() {
                let pin = (gsi - a.gsi_base) as u8;
                return Some((a, pin));
            }
        }
        None
    }

    /// Its id (the MADT's, which the DMAR and IVRS name it by).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The global system interrupt of pin 0.
    pub fn gsi_base(&self) -> u32 {
        self.gsi_base
    }

    /// One past the last global system interrupt it serves.
    pub fn gsi_end(&self) -> u32 {
        self.gsi_base + self.pins as u32
    }

    /// Number of pins (redirection entries).
    pub fn pins(&self) -> u8 {
        self.pins
    }

    /// The version register's version (0x11, or 0x20 with an EOI
    /// register).
    pub fn version(&self) -> u8 {
        self.version
    }

    fn read(&self, reg: u32) -> u32 {
        let base = self.regs.lock();
        // SAFETY: `*base` is the IOAPIC's register page mapped uncached by
        // `new`; IOREGSEL and IOWIN are 32-bit registers inside it, and the
        // held lock keeps the select/read pair together.
        unsafe {
            ((*base + IOREGSEL) as *mut u32).write_volatile(reg);
            ((*base + IOWIN) as *const u32).read_volatile()
        }
    }

    fn write(&self, reg: u32, value: u32) {
        let base = self.regs.lock();
        // SAFETY: as in `read`.
        unsafe {
            ((*base + IOREGSEL) as *mut u32).write_volatile(reg);
            ((*base + IOWIN) as *mut u32).write_volatile(value);
        }
    }

    /// The redirection entry of `pin`.
    pub fn rte(&self, pin: u8) -> u64 {
        assert!(pin < self.pins, "pin {pin} of {self:?}");
        let reg = REG_REDTBL + 2 * pin as u32;
        (self.read(reg + 1) as u64) << 32 | self.read(reg) as u64
    }

    /// Writes `rte` to `pin`: masked first, the high half, then the low
    /// half as given (so the pin is never live with half an entry).
    pub fn set_rte(&self, pin: u8, rte: u64) {
        assert!(pin < self.pins, "pin {pin} of {self:?}");
        let reg = REG_REDTBL + 2 * pin as u32;
        self.write(reg, self.read(reg) | RTE_MASKED as u32);
        self.write(reg + 1, (rte >> 32) as u32);
        self.write(reg, rte as u32);
    }

    /// Masks or unmasks `pin`, its entry otherwise unchanged.
    pub fn set_masked(&self, pin: u8, masked: bool) {
        assert!(pin < self.pins, "pin {pin} of {self:?}");
        let reg = REG_REDTBL + 2 * pin as u32;
        let low = self.read(reg) & !(RTE_MASKED as u32);
        self.write(reg, low | if masked { RTE_MASKED as u32 } else { 0 });
    }

    /// Ends a level-triggered interrupt of the entries whose vector field
    /// is `vector` (their Remote IRR clears) through the EOI register;
    /// false when the IOAPIC has none (version below 0x20).
    pub fn eoi(&self, vector: u8) -> bool {
        if self.version < 0x20 {
            return false;
        }
        let base = self.regs.lock();
        // SAFETY: as in `read`; the EOI register is a 32-bit register of
        // the same page (version 0x20 and later).
        unsafe { ((*base + IOEOI) as *mut u32).write_volatile(vector as u32) };
        true
    }
}
