//! The VMCB (AMD APM vol. 2, appendix B): one 4 KiB frame, control area at
//! 0, state save area at 0x400, written field by field through the
//! platform (no `unsafe` here).

use portcullis::{PhysAddr, Platform};
use portcullis_kernel::host::KernelHost;

/// Control-area offsets.
pub mod ctl {
    /// Intercept vector 3: INTR bit 0, HLT bit 24, SHUTDOWN bit 31.
    pub const INTERCEPT_MISC1: usize = 0x0c;
    /// Intercept vector 4: VMRUN bit 0, VMMCALL bit 1.
    pub const INTERCEPT_MISC2: usize = 0x10;
    /// Guest ASID (32 bits).
    pub const ASID: usize = 0x58;
    /// TLB control (8 bits): 1 flushes every ASID's entries at VMRUN.
    pub const TLB_CONTROL: usize = 0x5c;
    /// Virtual interrupt control: V_INTR_MASKING bit 24.
    pub const VINTR: usize = 0x60;
    /// Exit code.
    pub const EXITCODE: usize = 0x70;
    /// Exit information 1 (NPF: error code).
    pub const EXITINFO1: usize = 0x78;
    /// Exit information 2 (NPF: the guest-physical address).
    pub const EXITINFO2: usize = 0x80;
    /// Nested paging enable: bit 0.
    pub const NP_ENABLE: usize = 0x90;
    /// Event injection: vector bits 7:0, type bits 10:8 (0: external
    /// interrupt), valid bit 31.
    pub const EVENTINJ: usize = 0xa8;
    /// The nested page table's root.
    pub const N_CR3: usize = 0xb0;
}

/// Intercept bits.
pub mod intercept {
    pub const INTR: u64 = 1 << 0;
    pub const HLT: u64 = 1 << 24;
    pub const SHUTDOWN: u64 = 1 << 31;
    pub const VMRUN: u64 = 1 << 0;
    pub const VMMCALL: u64 = 1 << 1;
}

/// State-save-area offsets.
pub mod save {
    pub const ES: usize = 0x400;
    pub const CS: usize = 0x410;
    pub const SS: usize = 0x420;
    pub const DS: usize = 0x430;
    pub const GDTR: usize = 0x460;
    pub const IDTR: usize = 0x480;
    pub const CPL: usize = 0x4cb;
    pub const EFER: usize = 0x4d0;
    pub const CR4: usize = 0x548;
    pub const CR3: usize = 0x550;
    pub const CR0: usize = 0x558;
    pub const DR7: usize = 0x560;
    pub const DR6: usize = 0x568;
    pub const RFLAGS: usize = 0x570;
    pub const RIP: usize = 0x578;
    pub const RSP: usize = 0x5d8;
    pub const RAX: usize = 0x5f8;
    pub const G_PAT: usize = 0x668;
}

/// #VMEXIT codes this hypervisor knows by name.
pub mod exit {
    pub const INTR: u64 = 0x60;
    pub const SHUTDOWN: u64 = 0x7f;
    pub const HLT: u64 = 0x78;
    pub const VMRUN: u64 = 0x80;
    pub const VMMCALL: u64 = 0x81;
    pub const NPF: u64 = 0x400;
    pub const INVALID: u64 = u64::MAX;

    /// A name for an exit code.
    pub fn name(code: u64) -> &'static str {
        match code {
            INTR => "INTR (physical interrupt)",
            SHUTDOWN => "SHUTDOWN (triple fault)",
            HLT => "HLT",
            VMRUN => "VMRUN",
            VMMCALL => "VMMCALL",
            NPF => "NPF (nested page fault)",
            INVALID => "INVALID (the VMCB's guest state failed VMRUN's checks)",
            _ => "unexpected",
        }
    }
}

/// One segment register of the state save area.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub selector: u16,
    /// Attributes: type, S, DPL, P (bits 0-7), AVL, L, D/B, G (bits 8-11).
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

/// A VMCB in a frame of its own.
#[derive(Debug)]
pub struct Vmcb<'h> {
    host: &'h KernelHost,
    /// Its physical address (what VMRUN takes).
    pub pa: u64,
}

impl<'h> Vmcb<'h> {
    /// A zeroed VMCB.
    pub fn new(host: &'h KernelHost) -> Option<Self> {
        let pa = host.alloc_frames(1, 4096)?.0;
        Some(Self { host, pa })
    }

    /// Reads the 64-bit field at `off`.
    pub fn r64(&self, off: usize) -> u64 {
        self.host.read_u64(PhysAddr(self.pa + off as u64))
    }

    /// Writes the 64-bit field at `off`.
    pub fn w64(&self, off: usize, v: u64) {
        self.host.write_u64(PhysAddr(self.pa + off as u64), v)
    }

    /// Writes the `bytes`-wide field at `off` (inside one quadword).
    pub fn set(&self, off: usize, bytes: usize, v: u64) {
        let word = off & !7;
        let shift = (off - word) * 8;
        assert!(shift + bytes * 8 <= 64, "field at {off:#x} crosses a quadword");
        let mask = if bytes == 8 { u64::MAX } else { ((1u64 << (bytes * 8)) - 1) << shift };
        let old = self.r64(word);
        self.w64(word, (old & !mask) | ((v << shift) & mask));
    }

    /// Writes a segment register.
    pub fn segment(&self, off: usize, s: Segment) {
        self.w64(off, s.selector as u64 | (s.attrib as u64) << 16 | (s.limit as u64) << 32);
        self.w64(off + 8, s.base);
    }
}

impl Drop for Vmcb<'_> {
    fn drop(&mut self) {
        self.host.free_frames(PhysAddr(self.pa), 1);
    }
}
