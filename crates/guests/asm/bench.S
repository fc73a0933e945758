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

bench_others:
        hlt
        jmp     bench_others

#include "common.S"
