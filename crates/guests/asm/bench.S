/*
 * bench: tight loops for benchmarks. vCPU 0 reads the mode word at
 * BENCH_MODE and runs the matching loop, incrementing the u64 at BENCH_COUNT
 * once per iteration and re-reading the mode every iteration, so a tool
 * switches loops with one WRITE_PHYSICAL. Mode 0 (and any unknown mode)
 * idles with hlt, so an idle benchmark VM does not burn a core. Other vCPUs,
 * if any, are started by vCPU 0 and only idle (hlt). See layout.h for the
 * modes.
 */
#include "layout.h"

/* Mode 6 (a guest that makes syscalls): BENCH_SYSCALL... are in layout.h. */
#define MSR_EFER                0xc0000080
#define MSR_STAR                0xc0000081
#define MSR_SFMASK              0xc0000084
#define SYS_GETPID              39

        .code64
        .text
        .globl  _start
_start:
        call    setup
        call    idt_init
        call    announce
        test    %r13, %r13
        jnz     bench_others
        call    start_others

        .globl  bench_dispatch
bench_dispatch:
        mov     BENCH_MODE, %rax
        cmp     $BENCH_OUT, %rax
        je      bench_out
        cmp     $BENCH_WRMSR, %rax
        je      bench_wrmsr
        cmp     $BENCH_INT3, %rax
        je      bench_int3
        cmp     $BENCH_PF, %rax
        je      bench_pf
        cmp     $BENCH_SPIN, %rax
        je      bench_spin
        cmp     $BENCH_SYSCALL, %rax
        je      bench_syscall
        .globl  bench_idle
bench_idle:
        hlt
        jmp     bench_dispatch

/* Mode 1: one port-I/O exit per iteration (nobody handles PORT_BENCH). */
bench_out:
        mov     $PORT_BENCH, %dx
        .globl  bench_out_loop
bench_out_loop:
        out     %al, %dx
        incq    BENCH_COUNT
        cmpq    $BENCH_OUT, BENCH_MODE
        je      bench_out_loop
        jmp     bench_dispatch

/* Mode 2: wrmsr LSTAR with LSTAR_TAG | (low 32 bits of the count), a new
 * canonical value every iteration. */
bench_wrmsr:
        mov     $MSR_LSTAR, %ecx
        mov     $LSTAR_TAG, %rdx
        shr     $32, %rdx
        .globl  bench_wrmsr_loop
bench_wrmsr_loop:
        incq    BENCH_COUNT
        mov     BENCH_COUNT, %eax
        .globl  bench_wrmsr_insn
bench_wrmsr_insn:
        wrmsr
        cmpq    $BENCH_WRMSR, BENCH_MODE
        je      bench_wrmsr_loop
        jmp     bench_dispatch

/* Mode 3: the guest's own int3; its #BP handler (idt_init) returns to
 * bench_after_int3. */
bench_int3:
        .globl  bench_int3_insn
bench_int3_insn:
        int3
        .globl  bench_after_int3
bench_after_int3:
        incq    BENCH_COUNT
        cmpq    $BENCH_INT3, BENCH_MODE
        je      bench_int3
        jmp     bench_dispatch

/* Mode 4: write the count to the first u64 of BENCH_PF_PAGE. */
bench_pf:
        incq    BENCH_COUNT
        mov     BENCH_COUNT, %rax
        .globl  bench_pf_write
bench_pf_write:
        mov     %rax, BENCH_PF_PAGE
        cmpq    $BENCH_PF, BENCH_MODE
        je      bench_pf
        jmp     bench_dispatch

/* Mode 5: no exits at all, the cost of the loop itself. */
bench_spin:
        incq    BENCH_COUNT
        cmpq    $BENCH_SPIN, BENCH_MODE
        je      bench_spin
        jmp     bench_dispatch

/* Mode 6: a guest doing its own work and making syscalls. Each iteration:
 * BENCH_SYSCALL_WORK rounds of a multiply-add, then `syscall` (getpid's
 * number in RAX) into the guest's own ring-0 handler, syscall_entry, which
 * counts it at BENCH_SYSCALLS and returns; every BENCH_SYSCALL_OUT_EVERY-th
 * iteration also one port-I/O exit (as a device access or a timer tick
 * would). On entry: EFER.SCE, STAR (CS 0x08, SS 0x10), LSTAR =
 * syscall_entry, SFMASK 0; nothing writes an MSR while the loop runs. */
bench_syscall:
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $1, %eax                /* SCE */
        wrmsr
        mov     $MSR_STAR, %ecx
        xor     %eax, %eax
        mov     $0x08, %edx             /* syscall CS = 0x08, SS = 0x10 */
        wrmsr
        mov     $MSR_LSTAR, %ecx
        mov     $syscall_entry, %eax
        xor     %edx, %edx
        wrmsr
        mov     $MSR_SFMASK, %ecx
        xor     %eax, %eax
        wrmsr
        mov     $PORT_BENCH, %dx
        mov     $1, %r8d
        .globl  bench_syscall_loop
bench_syscall_loop:
        mov     $BENCH_SYSCALL_WORK, %esi
1:      imul    $3, %r8, %r8
        add     %rsi, %r8
        dec     %esi
        jnz     1b
        mov     $SYS_GETPID, %eax
        .globl  bench_syscall_insn
bench_syscall_insn:
        syscall
        incq    BENCH_COUNT
        testq   $(BENCH_SYSCALL_OUT_EVERY - 1), BENCH_COUNT
        jnz     2f
        out     %al, %dx
2:      cmpq    $BENCH_SYSCALL, BENCH_MODE
        je      bench_syscall_loop
        jmp     bench_dispatch

/* The syscall entry (LSTAR in mode 6): RCX = the return address, R11 =
 * RFLAGS (unchanged, SFMASK is 0). Counts the call and returns to the
 * caller at ring 0. The syscall tracer's breakpoint goes here. */
        .balign 16
        .globl  syscall_entry
syscall_entry:
        incq    BENCH_SYSCALLS
        jmp     *%rcx

bench_others:
        hlt
        jmp     bench_others

#include "common.S"
