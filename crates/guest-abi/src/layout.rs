//! Addresses, ports and register values of the test guests' boot ABI.
//!
//! The VMM builds this memory map (GDT, identity page tables, per-vCPU
//! stacks) and loads every image at [`LOAD_ADDR`]; the guests' `asm/layout.h`
//! holds the same values (a unit test of `ukvmi-guests` checks they agree).

/// Where every image is loaded; `_start` is its first byte.
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Largest image that fits below [`PATTERN_BASE`].
pub const MAX_IMAGE_SIZE: u64 = PATTERN_BASE - LOAD_ADDR;

/// GDT (written by the VMM): null, code64, data; 5 entries of room.
pub const GDT_ADDR: u64 = 0x500;
/// 64-bit code segment selector.
pub const CODE64_SELECTOR: u16 = 0x08;
/// Data segment selector (DS, ES, FS, GS, SS).
pub const DATA_SELECTOR: u16 = 0x10;
/// PML4 (CR3); entry 0 points to [`PDPT_ADDR`].
pub const PML4_ADDR: u64 = 0x1000;
/// PDPT; entry 0 points to [`PD_ADDR`].
pub const PDPT_ADDR: u64 = 0x2000;
/// Page directory: 512 identity 2 MiB pages.
pub const PD_ADDR: u64 = 0x3000;
/// Size of the identity map (GVA == GPA below this).
pub const IDENTITY_MAP_SIZE: u64 = 1 << 30;

/// Top of vCPU 0's stack; vCPU i starts with RSP = `STACK_TOP - i * STACK_SIZE`.
pub const STACK_TOP: u64 = 0x8_0000;
/// Stack size per vCPU.
pub const STACK_SIZE: u64 = 0x4000;
/// Most vCPUs whose stacks fit between the page tables and [`STACK_TOP`]
/// (guests clamp RSI to this).
pub const MAX_VCPUS: u16 = 31;

/// vCPU i fills the page at `PATTERN_BASE + i * PATTERN_SIZE`.
pub const PATTERN_BASE: u64 = 0x20_0000;
/// Size of each vCPU's pattern page.
pub const PATTERN_SIZE: u64 = 0x1000;
/// vCPU i's loop counter is the u64 at `COUNTER_BASE + i * 8`.
pub const COUNTER_BASE: u64 = 0x30_0000;
/// `msr` guest: the MSR it writes (LSTAR).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `msr` guest: the value written is `LSTAR_TAG | counter`.
pub const LSTAR_TAG: u64 = 0xffff_8000_0000_0000;
/// `msr` guest: writes every this many iterations.
pub const MSR_EVERY: u64 = 16;
/// `msr` guest: u64 per vCPU, the value it is about to write.
pub const MSR_TRIED_BASE: u64 = 0x30_0400;
/// `msr` guest: u64 per vCPU, what its rdmsr saw right after the write.
pub const MSR_SEEN_BASE: u64 = 0x30_0600;
/// Guests that call `idt_init` load a 32-vector IDT here.
pub const IDT_ADDR: u64 = 0x3f_c000;
/// u64 per vector: how many times the guest's handlers saw it (all vCPUs).
pub const EXC_COUNT_BASE: u64 = 0x3f_d000;
/// Per vCPU, [`EXC_INFO_SIZE`] bytes: the last exception's vector, error
/// code (0 if none), return RIP and CR2, as four u64.
pub const EXC_INFO_BASE: u64 = 0x3f_d100;
/// Size of one vCPU's exception record.
pub const EXC_INFO_SIZE: u64 = 32;
/// `traps` guest: u64 per vCPU, runs of the instruction at `bp_target`.
pub const BP_TARGET_RUNS: u64 = 0x30_0800;
/// `traps` guest: u64 per vCPU, times the guest went on after its own int3.
pub const INT3_DONE: u64 = 0x30_0900;
/// `traps` guest: u64 per vCPU, RAX returned by the last hypercall.
pub const HC_RESULT_BASE: u64 = 0x3f_d500;
/// `traps` guest: u64 per vCPU, hypercalls made.
pub const HC_COUNT_BASE: u64 = 0x3f_d600;
/// `traps` guest: its own int3 every this many iterations.
pub const INT3_EVERY: u64 = 8;
/// `traps` guest: a hypercall every this many iterations.
pub const HC_EVERY: u64 = 4;
/// The hypercall doorbell and its registers (declared in [`crate::hypercall`]).
pub use crate::hypercall::{HC_KVMI_NR, HC_KVMI_SUBFN, HC_NOBODY, PORT_HYPERCALL};

/// `bench` guest: u64 mode word vCPU 0 re-reads every iteration (one of
/// the `BENCH_*` modes below; anything else idles). Set it with
/// WRITE_PHYSICAL to switch loops.
pub const BENCH_MODE: u64 = 0x30_0c00;
/// `bench` guest: u64 iteration counter of the current loop.
pub const BENCH_COUNT: u64 = 0x30_0c08;
/// `bench` guest: the page mode [`BENCH_PF`] writes (its first u64 gets the count).
pub const BENCH_PF_PAGE: u64 = 0x32_0000;
/// `bench` guest: the port mode [`BENCH_OUT`] writes to (nobody handles it).
pub const PORT_BENCH: u16 = 0x620;
/// `bench` mode: `hlt` loop (the VMM sleeps, no core burnt).
pub const BENCH_IDLE: u64 = 0;
/// `bench` mode: `out %al,%dx` to [`PORT_BENCH`], one port-I/O exit per iteration.
pub const BENCH_OUT: u64 = 1;
/// `bench` mode: `wrmsr` of LSTAR with `LSTAR_TAG | count` (a new value every time).
pub const BENCH_WRMSR: u64 = 2;
/// `bench` mode: `int3`, handled by the guest's own #BP handler.
pub const BENCH_INT3: u64 = 3;
/// `bench` mode: a write of the count to [`BENCH_PF_PAGE`].
pub const BENCH_PF: u64 = 4;
/// `bench` mode: counter increment only, no exits.
pub const BENCH_SPIN: u64 = 5;
/// `bench` mode: a guest that works and makes syscalls. Each iteration does
/// [`BENCH_SYSCALL_WORK`] multiply-adds, then `syscall` into the guest's own
/// ring-0 handler (symbol `syscall_entry`, which counts at
/// [`BENCH_SYSCALLS`]), and every [`BENCH_SYSCALL_OUT_EVERY`]-th iteration
/// one `out` to [`PORT_BENCH`]. Entering it sets EFER.SCE, STAR, LSTAR and
/// SFMASK once; the loop writes no MSR.
pub const BENCH_SYSCALL: u64 = 6;
/// `bench` guest: u64, syscalls its handler took (mode [`BENCH_SYSCALL`]).
pub const BENCH_SYSCALLS: u64 = 0x30_0c10;
/// `bench` mode [`BENCH_SYSCALL`]: multiply-adds per iteration.
pub const BENCH_SYSCALL_WORK: u64 = 16;
/// `bench` mode [`BENCH_SYSCALL`]: one port-I/O exit every this many iterations.
pub const BENCH_SYSCALL_OUT_EVERY: u64 = 16;

/// Address of vCPU `vcpu`'s exception record (vector, error, rip, cr2).
#[must_use]
pub const fn exc_info_addr(vcpu: u16) -> u64 {
    EXC_INFO_BASE + vcpu as u64 * EXC_INFO_SIZE
}

/// `pf` guest: vCPU i's data page A is at `PF_DATA_BASE + i * PF_DATA_STRIDE`,
/// its page B (where the straddling store ends) right after it.
pub const PF_DATA_BASE: u64 = 0x31_0000;
/// `pf` guest: distance between two vCPUs' data pages (A and B each).
pub const PF_DATA_STRIDE: u64 = 0x2000;
/// `pf` guest: vCPUs from this index on only loop.
pub const PF_MAX_VCPUS: u16 = 8;
/// `pf` guest: one round of accesses every this many iterations.
pub const PF_EVERY: u64 = 4;
/// `pf` guest: the value stored at A is `PF_TAG | counter`.
pub const PF_TAG: u64 = 0x5046_0000_0000_0000;
/// `pf` guest: see [`pf_straddle_value`].
pub const PF_STRADDLE_TAG: u64 = 0xb000_0000_a000_0000;
/// `pf` guest: u64 per vCPU, the value it is about to store at A.
pub const PF_TRIED_BASE: u64 = 0x30_0a00;
/// `pf` guest: u64 per vCPU, what its load of A then read.
pub const PF_SEEN_BASE: u64 = 0x30_0a40;
/// `pf` guest: u64 per vCPU, the value it is about to store at A + 0xffc.
pub const PF_STRADDLE_TRIED_BASE: u64 = 0x30_0a80;
/// `pf` guest: u64 per vCPU, what its load of A + 0xffc then read.
pub const PF_STRADDLE_SEEN_BASE: u64 = 0x30_0ac0;
/// `pf` guest: u64 per vCPU, how many times `pf_func` ran to its end.
pub const PF_EXEC_COUNT_BASE: u64 = 0x30_0b00;
/// `pf` guest: u64 per vCPU, completed rounds.
pub const PF_ROUNDS_BASE: u64 = 0x30_0b40;

/// `pf` guest: vCPU `vcpu`'s data page A.
#[must_use]
pub const fn pf_data_addr(vcpu: u16) -> u64 {
    PF_DATA_BASE + vcpu as u64 * PF_DATA_STRIDE
}

/// `pf` guest: the straddling store's value for loop counter `counter`:
/// low half `0xa000_0000 | c`, high half `0xb000_0000 | c`, with
/// `c = counter & 0x0fff_ffff`.
#[must_use]
pub const fn pf_straddle_value(counter: u64) -> u64 {
    let c = counter & 0x0fff_ffff;
    PF_STRADDLE_TAG | c << 32 | c
}

/// u32 spinlock serialising serial output (0 free, 1 taken).
pub const PRINT_LOCK: u64 = 0x3f_f000;
/// A non-identity mapping the VMM adds (guests never use it), so that
/// address translation can be checked: the 2 MiB of GVA at `ALIAS_GVA`
/// (PDPT entry 1) map the 2 MiB of gpa at `ALIAS_GPA`.
pub const ALIAS_GVA: u64 = 0x4000_0000;
/// Physical start of the aliased 2 MiB (the page holding the pattern pages).
pub const ALIAS_GPA: u64 = 0x20_0000;
/// The page directory holding the alias (written by the VMM).
pub const ALIAS_PD_ADDR: u64 = 0x3f_e000;
/// Guest RAM the guests need (everything above lies below 4 MiB).
pub const MIN_MEM_SIZE: u64 = 0x40_0000;

/// Serial transmit: `out` of one byte prints it.
pub const PORT_SERIAL: u16 = 0x3f8;
/// Power-off: `out` of one byte (the exit status) ends the VM.
pub const PORT_POWEROFF: u16 = 0xf4;
/// Start vCPU: `out` of four bytes, the vCPU index.
pub const PORT_START_VCPU: u16 = 0x600;

/// R12 holds `R12_TAG | i` on vCPU i while it loops.
pub const R12_TAG: u64 = 0x5a5a_0000_0000_0000;
/// R15 holds this on every vCPU while it loops.
pub const R15_MAGIC: u64 = 0x1234_5678_9abc_def0;
/// vCPU 0 prints `tick <n>` when its counter n is a multiple of this.
pub const TICK_EVERY: u64 = 64;
/// `smp`: loop iterations vCPU 0 runs before it starts the others.
pub const SMP_WARMUP_ITERATIONS: u64 = 200;

/// The byte vCPU `vcpu` writes at `offset` of its pattern page:
/// `(offset + vcpu) & 0xff`.
#[must_use]
pub const fn pattern_byte(vcpu: u16, offset: usize) -> u8 {
    // Truncation to the low byte is the definition.
    offset.wrapping_add(vcpu as usize) as u8
}

/// Address of vCPU `vcpu`'s pattern page.
#[must_use]
pub const fn pattern_addr(vcpu: u16) -> u64 {
    PATTERN_BASE + vcpu as u64 * PATTERN_SIZE
}

/// Address of vCPU `vcpu`'s u64 loop counter.
#[must_use]
pub const fn counter_addr(vcpu: u16) -> u64 {
    COUNTER_BASE + vcpu as u64 * 8
}

/// Initial RSP of vCPU `vcpu`, or `None` beyond [`MAX_VCPUS`].
#[must_use]
pub const fn stack_top(vcpu: u16) -> Option<u64> {
    if vcpu < MAX_VCPUS {
        Some(STACK_TOP - vcpu as u64 * STACK_SIZE)
    } else {
        None
    }
}

/// R12 of vCPU `vcpu` while it loops.
#[must_use]
pub const fn r12_value(vcpu: u16) -> u64 {
    R12_TAG | vcpu as u64
}

// The regions must not overlap (checked at compile time).
const _: () = {
    assert!(GDT_ADDR + 5 * 8 <= PML4_ADDR);
    assert!(PML4_ADDR < PDPT_ADDR && PDPT_ADDR < PD_ADDR);
    // vCPU MAX_VCPUS-1's stack bottom stays above the page directory.
    assert!(STACK_TOP - MAX_VCPUS as u64 * STACK_SIZE >= PD_ADDR + 0x1000);
    assert!(STACK_TOP <= LOAD_ADDR);
    assert!(pattern_addr(MAX_VCPUS) <= COUNTER_BASE);
    assert!(counter_addr(MAX_VCPUS) <= PRINT_LOCK);
    // pf: counters in 0x300a00..0x300c00, data pages in 0x310000..0x320000.
    assert!(counter_addr(MAX_VCPUS) <= PF_TRIED_BASE);
    assert!(MSR_SEEN_BASE + 8 * MAX_VCPUS as u64 <= PF_TRIED_BASE);
    assert!(PF_ROUNDS_BASE + 8 * PF_MAX_VCPUS as u64 <= 0x30_0c00);
    assert!(pf_data_addr(PF_MAX_VCPUS) <= 0x32_0000);
    assert!(PF_EVERY.is_power_of_two());
    assert!(PRINT_LOCK + 4 <= MIN_MEM_SIZE);
    assert!(IDT_ADDR + 32 * 16 <= EXC_COUNT_BASE && EXC_COUNT_BASE + 32 * 8 <= EXC_INFO_BASE);
    assert!(exc_info_addr(MAX_VCPUS) <= HC_RESULT_BASE);
    assert!(HC_RESULT_BASE + MAX_VCPUS as u64 * 8 <= HC_COUNT_BASE);
    assert!(HC_COUNT_BASE + MAX_VCPUS as u64 * 8 <= ALIAS_PD_ADDR);
    assert!(counter_addr(MAX_VCPUS) <= MSR_TRIED_BASE && BP_TARGET_RUNS + MAX_VCPUS as u64 * 8 <= INT3_DONE);
    assert!(INT3_DONE + MAX_VCPUS as u64 * 8 <= BENCH_MODE && BENCH_COUNT + 8 <= 0x30_0d00);
    assert!(BENCH_COUNT + 8 <= BENCH_SYSCALLS && BENCH_SYSCALLS + 8 <= 0x30_0d00);
    assert!(BENCH_SYSCALL_OUT_EVERY.is_power_of_two());
    assert!(BENCH_PF_PAGE % 0x1000 == 0 && BENCH_PF_PAGE >= 0x30_1000 && BENCH_PF_PAGE + 0x1000 <= IDT_ADDR);
    assert!(MIN_MEM_SIZE <= IDENTITY_MAP_SIZE);
    assert!(TICK_EVERY.is_power_of_two());
};

/// The full 4 KiB page vCPU `vcpu` writes at [`pattern_addr`].
#[must_use]
pub fn pattern_page(vcpu: u16) -> Vec<u8> {
    (0..PATTERN_SIZE as usize).map(|j| pattern_byte(vcpu, j)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_byte_matches_definition() {
        assert_eq!(pattern_byte(0, 0), 0);
        assert_eq!(pattern_byte(0, 255), 255);
        assert_eq!(pattern_byte(0, 256), 0);
        assert_eq!(pattern_byte(1, 0), 1);
        assert_eq!(pattern_byte(1, 255), 0);
        assert_eq!(pattern_byte(3, 4095), ((4095 + 3) & 0xff) as u8);
        assert_eq!(pattern_byte(300, 10), ((300 + 10) & 0xff) as u8);
        let page = pattern_page(2);
        assert_eq!(page.len(), 4096);
        assert_eq!(page[0], 2);
        assert_eq!(page[254], 0);
        assert_eq!(pattern_addr(2), 0x20_2000);
        assert_eq!(counter_addr(2), 0x30_0010);
        assert_eq!(stack_top(0), Some(0x8_0000));
        assert_eq!(stack_top(1), Some(0x7_c000));
        assert_eq!(stack_top(30), Some(0x8000));
        assert_eq!(stack_top(31), None);
        assert_eq!(r12_value(5), 0x5a5a_0000_0000_0005);
    }
}
