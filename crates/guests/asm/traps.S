/*
 * traps: like spin, with an IDT, and events to catch. Each iteration vCPU i
 * runs the instruction at bp_target (a counter increment, where a tool can
 * plant a breakpoint); every INT3_EVERY iterations it executes its own int3
 * at guest_int3 (its #BP handler counts it, then INT3_DONE counts that the
 * guest went on); every HC_EVERY iterations it rings the hypercall doorbell
 * and records the result. Exceptions a tool injects are recorded by the
 * handlers (see layout.h).
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
        jnz     traps_loop
        call    start_others
        .globl  traps_loop
traps_loop:
        call    iterate
        .globl  bp_target
bp_target:
        incq    BP_TARGET_RUNS(,%r13,8)
        test    $(INT3_EVERY - 1), %r14
        jnz     1f
        .globl  guest_int3
guest_int3:
        int3
        .globl  after_int3
after_int3:
        incq    INT3_DONE(,%r13,8)
1:      test    $(HC_EVERY - 1), %r14
        jnz     traps_loop
        call    hypercall
        mov     %rax, HC_RESULT_BASE(,%r13,8)
        incq    HC_COUNT_BASE(,%r13,8)
        jmp     traps_loop

#include "common.S"
