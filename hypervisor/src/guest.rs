//! The guest: its guest-physical layout and the 64-bit program it runs.
//!
//! The program knows nothing of the host. It runs in long mode on page
//! tables of its own (identity map of its first GiB, 2 MiB pages, the
//! device page uncached), writes a pattern, has edu copy it with
//! guest-physical addresses, checks the copy, asks edu to write outside
//! its RAM (where the hypervisor says), touches an address outside its RAM itself, and reports each
//! step with VMMCALL: RAX = request, RBX / RCX = values.
//!
//! The bytes are assembled into the hypervisor's read-only data (they are
//! never executed there) and copied into guest memory at [`CODE`]; the
//! code is position independent (relative jumps, absolute GPAs as
//! immediates).

use core::arch::global_asm;

/// Guest RAM: GPA 0 up to this (4 MiB).
pub const RAM_SIZE: u64 = 4 << 20;
/// The guest's page-map level 4; the PDPT and PD follow it.
pub const PML4: u64 = 0x1000;
/// Its page-directory-pointer table.
pub const PDPT: u64 = 0x2000;
/// Its page directory (512 x 2 MiB: GPA 0 to 1 GiB).
pub const PD: u64 = 0x3000;
/// Its GDT: null, 64-bit code (selector 8), data (selector 0x10).
pub const GDT: u64 = 0x4000;
/// Where the program is loaded and starts.
pub const CODE: u64 = 0x8000;
/// Room for the program.
pub const CODE_MAX: u64 = 0x8000;
/// Top of its stack.
pub const STACK_TOP: u64 = 0x2_0000;
/// The pattern it writes (one page).
pub const SRC: u64 = 0x10_0000;
/// Where edu copies it.
pub const DST: u64 = 0x10_1000;
/// edu's registers (its BAR0's first page) in guest-physical space.
pub const EDU: u64 = 0x800_0000;
/// The DMA outside its RAM: the page just past its end.
pub const OUTSIDE: u64 = RAM_SIZE;
/// The address its CPU touches outside its RAM (not in the nested table).
pub const NPF_PROBE: u64 = 0x60_0000;
/// A quadword the hypervisor sets before the guest starts: 4 (edu's
/// "raise an interrupt on completion" command bit) when edu's MSI reaches
/// the guest as [`VECTOR`], 0 when the guest must poll.
pub const MAILBOX: u64 = 0x5000;
/// The guest's count of interrupts its handler took.
pub const IRQ_COUNT: u64 = 0x5008;
/// A quadword the hypervisor sets: XORed into the pattern, so each guest
/// writes its own bytes (0 for the first guest).
pub const KEY: u64 = 0x5010;
/// A quadword the hypervisor sets: the address the guest has edu write
/// to outside its RAM ([`OUTSIDE`] for the first guest; for the second,
/// the host address of the first guest's [`DST`] frame).
pub const TARGET: u64 = 0x5018;
/// Its IDT pseudo-descriptor (10 bytes).
pub const IDT_PTR: u64 = 0x5ff0;
/// Its IDT (vectors 0 to [`VECTOR`]; only [`VECTOR`] is present).
pub const IDT: u64 = 0x6000;
/// The vector edu's interrupt arrives on in the guest.
pub const VECTOR: u64 = 0x30;
/// edu's internal buffer, as a DMA address.
pub const EDU_BUFFER: u64 = 0x4_0000;

/// VMMCALL requests (RAX).
pub mod req {
    /// RBX = [`super::HELLO`]: the guest is running.
    pub const HELLO: u64 = 1;
    /// The copy: RBX = quadwords of DST that differ from SRC, RCX = 1 when
    /// both DMAs completed (0: timed out), RDX = interrupts its handler
    /// took.
    pub const COPY: u64 = 2;
    /// The DMA outside RAM: RBX = its GPA, RCX = 1 when edu finished it.
    pub const OUTSIDE: u64 = 3;
    /// The next instruction reads GPA RBX, outside RAM; it is RCX bytes
    /// long (expect a nested page fault there).
    pub const EXPECT_NPF: u64 = 4;
    /// Finished; a HLT follows.
    pub const DONE: u64 = 5;
}

/// The HELLO value.
pub const HELLO: u64 = 0x600d_9e57;

/// Quadword `k` of the pattern the guest with [`KEY`] `key` writes at
/// [`SRC`].
pub fn pattern(key: u64, k: u64) -> u64 {
    k.wrapping_mul(0x0101_0101_0101_0101) ^ 0x5a17_c0de_0000_0000 ^ key
}

/// Polls of edu's status before the guest gives up on a DMA.
const POLLS: u64 = 20_000_000;

global_asm!(
    ".pushsection .rodata.portcullis_guest,\"a\"",
    ".global portcullis_guest_start",
    ".global portcullis_guest_end",
    "portcullis_guest_start:",
    // Hello.
    "mov eax, {hello_req}",
    "mov ebx, {hello}",
    "vmmcall",
    // Interrupts or polling; with interrupts, an IDT entry for VECTOR.
    "mov rax, {mailbox}",
    "mov r13, [rax]",
    "xor r14d, r14d",
    "test r13, r13",
    "jz .Lg_no_idt",
    "lea rax, [rip + .Lg_isr]",
    "mov rdi, {idt} + {vector} * 16",
    "mov word ptr [rdi], ax",
    "mov word ptr [rdi + 2], 0x08",
    "mov word ptr [rdi + 4], 0x8e00",
    "shr rax, 16",
    "mov word ptr [rdi + 6], ax",
    "shr rax, 16",
    "mov dword ptr [rdi + 8], eax",
    "mov dword ptr [rdi + 12], 0",
    "mov rdi, {idt_ptr}",
    "mov word ptr [rdi], {vector} * 16 + 15",
    "mov qword ptr [rdi + 2], {idt}",
    "lidt [rdi]",
    "sti",
    ".Lg_no_idt:",
    // The pattern at SRC.
    "mov rdi, {src}",
    "mov r8, 0x5a17c0de00000000",
    "mov rax, {key}",
    "xor r8, [rax]",
    "mov r9, 0x0101010101010101",
    "xor ecx, ecx",
    ".Lg_fill:",
    "mov rax, rcx",
    "imul rax, r9",
    "xor rax, r8",
    "mov [rdi + rcx * 8], rax",
    "inc rcx",
    "cmp rcx, 512",
    "jne .Lg_fill",
    // edu: SRC into its buffer, then its buffer to DST.
    "mov rsi, {edu}",
    "mov qword ptr [rsi + 0x80], {src}",
    "mov qword ptr [rsi + 0x88], {buffer}",
    "mov qword ptr [rsi + 0x90], 4096",
    "mov rax, 1",
    "or rax, r13",
    "mov [rsi + 0x98], rax",
    "call .Lg_wait",
    "mov r12, rax",
    "mov qword ptr [rsi + 0x80], {buffer}",
    "mov qword ptr [rsi + 0x88], {dst}",
    "mov qword ptr [rsi + 0x90], 4096",
    "mov rax, 3",
    "or rax, r13",
    "mov [rsi + 0x98], rax",
    "call .Lg_wait",
    "and r12, rax",
    // Compare.
    "mov rdi, {src}",
    "mov rdx, {dst}",
    "xor ecx, ecx",
    "xor ebx, ebx",
    ".Lg_cmp:",
    "mov rax, [rdi + rcx * 8]",
    "cmp rax, [rdx + rcx * 8]",
    "je .Lg_same",
    "inc rbx",
    ".Lg_same:",
    "inc rcx",
    "cmp rcx, 512",
    "jne .Lg_cmp",
    "mov eax, {copy_req}",
    "mov rcx, r12",
    "mov rdx, {irq_count}",
    "mov rdx, [rdx]",
    "vmmcall",
    // edu writes its buffer outside RAM, at TARGET (polled).
    "xor r13d, r13d",
    "mov r15, {target}",
    "mov r15, [r15]",
    "mov qword ptr [rsi + 0x80], {buffer}",
    "mov [rsi + 0x88], r15",
    "mov qword ptr [rsi + 0x90], 4096",
    "mov qword ptr [rsi + 0x98], 3",
    "call .Lg_wait",
    "mov rcx, rax",
    "mov eax, {outside_req}",
    "mov rbx, r15",
    "vmmcall",
    // The CPU reads outside RAM: `mov eax, [rbx]` is 2 bytes (8b 03).
    "mov eax, {npf_req}",
    "mov ebx, {probe}",
    "mov ecx, 2",
    "vmmcall",
    "mov eax, [rbx]",
    // Done.
    "mov eax, {done_req}",
    "vmmcall",
    ".Lg_halt:",
    "hlt",
    "jmp .Lg_halt",
    // RAX = 1 once edu's command register says idle (or, with
    // interrupts, once the handler counted one more), 0 after POLLS reads.
    ".Lg_wait:",
    "mov rcx, {polls}",
    "test r13, r13",
    "jnz .Lg_wait_irq",
    ".Lg_poll:",
    "mov rax, [rsi + 0x98]",
    "test al, 1",
    "jz .Lg_idle",
    "pause",
    "dec rcx",
    "jnz .Lg_poll",
    "xor eax, eax",
    "ret",
    ".Lg_idle:",
    "mov eax, 1",
    "ret",
    ".Lg_wait_irq:",
    "inc r14",
    "mov rdx, {irq_count}",
    ".Lg_wait_count:",
    "cmp [rdx], r14",
    "jae .Lg_idle",
    "pause",
    "dec rcx",
    "jnz .Lg_wait_count",
    "xor eax, eax",
    "ret",
    // edu's interrupt: acknowledge its status, count.
    ".Lg_isr:",
    "push rax",
    "push rsi",
    "mov rsi, {edu}",
    "mov eax, dword ptr [rsi + 0x24]",
    "mov dword ptr [rsi + 0x64], eax",
    "mov rax, {irq_count}",
    "lock inc qword ptr [rax]",
    "pop rsi",
    "pop rax",
    "iretq",
    "portcullis_guest_end:",
    ".popsection",
    hello_req = const req::HELLO,
    hello = const HELLO,
    copy_req = const req::COPY,
    outside_req = const req::OUTSIDE,
    npf_req = const req::EXPECT_NPF,
    done_req = const req::DONE,
    src = const SRC,
    dst = const DST,
    edu = const EDU,
    buffer = const EDU_BUFFER,
    key = const KEY,
    target = const TARGET,
    probe = const NPF_PROBE,
    polls = const POLLS,
    mailbox = const MAILBOX,
    irq_count = const IRQ_COUNT,
    idt = const IDT,
    idt_ptr = const IDT_PTR,
    vector = const VECTOR,
);

/// The second program, for the shared-table guest: a loop of commands
/// the hypervisor hands it at each VMMCALL ([`req::NEXT`], RBX = the
/// result of the last command): RBX = [`cmd::READ`] reads the quadword at
/// GPA RCX with the CPU, [`cmd::DMA`] has edu copy 8 bytes from GPA RCX to
/// GPA RDX (through its buffer, polled; the result is 1 when both DMAs
/// completed), anything else halts.
pub mod cmd {
    /// The guest's CPU reads GPA RCX (the instruction is 3 bytes long).
    pub const READ: u64 = 1;
    /// edu copies 8 bytes from GPA RCX to GPA RDX.
    pub const DMA: u64 = 2;
    /// Halt.
    pub const HALT: u64 = 3;
    /// Length of the READ instruction (`mov rbx, [rcx]`).
    pub const READ_LEN: u64 = 3;
}

/// The shared-table guest's request: RBX = the last command's result.
pub const NEXT: u64 = 6;

global_asm!(
    ".pushsection .rodata.portcullis_cmd_guest,\"a\"",
    ".global portcullis_cmd_start",
    ".global portcullis_cmd_end",
    "portcullis_cmd_start:",
    "xor ebx, ebx",
    ".Lc_loop:",
    "mov eax, {next}",
    "vmmcall",
    "cmp rbx, {read}",
    "je .Lc_read",
    "cmp rbx, {dma}",
    "je .Lc_dma",
    ".Lc_halt:",
    "hlt",
    "jmp .Lc_halt",
    ".Lc_read:",
    // 48 8b 19: 3 bytes (cmd::READ_LEN).
    "mov rbx, [rcx]",
    "jmp .Lc_loop",
    ".Lc_dma:",
    "mov rsi, {edu}",
    "mov [rsi + 0x80], rcx",
    "mov qword ptr [rsi + 0x88], {buffer}",
    "mov qword ptr [rsi + 0x90], 8",
    "mov qword ptr [rsi + 0x98], 1",
    "call .Lc_wait",
    "mov rbx, rax",
    "mov qword ptr [rsi + 0x80], {buffer}",
    "mov [rsi + 0x88], rdx",
    "mov qword ptr [rsi + 0x90], 8",
    "mov qword ptr [rsi + 0x98], 3",
    "call .Lc_wait",
    "and rbx, rax",
    "jmp .Lc_loop",
    // RAX = 1 once edu's command register says idle, 0 after POLLS reads.
    ".Lc_wait:",
    "mov r8, {polls}",
    ".Lc_poll:",
    "mov rax, [rsi + 0x98]",
    "test al, 1",
    "jz .Lc_idle",
    "pause",
    "dec r8",
    "jnz .Lc_poll",
    "xor eax, eax",
    "ret",
    ".Lc_idle:",
    "mov eax, 1",
    "ret",
    "portcullis_cmd_end:",
    ".popsection",
    next = const NEXT,
    read = const cmd::READ,
    dma = const cmd::DMA,
    edu = const EDU,
    buffer = const EDU_BUFFER,
    polls = const POLLS,
);
