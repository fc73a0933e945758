/*
 * smp: vCPU 0 first runs SMP_WARMUP loop iterations alone (hlt each, so at
 * least ~0.2 s), prints "starting vcpus", starts vCPUs 1..N-1 through port
 * 0x600 and keeps looping. The others loop from the moment they start.
 * See ../README.md for the ABI.
 */
#include "layout.h"

        .code64
        .text
        .globl  _start
_start:
        call    setup
        call    announce
        test    %r13, %r13
        jnz     smp_loop
        .globl  smp_warmup
smp_warmup:
1:      call    iterate
        cmp     $SMP_WARMUP, %r14
        jb      1b
        lea     starting_msg(%rip), %rsi
        call    lock_puts
        call    start_others
        .globl  smp_loop
smp_loop:
1:      call    iterate
        jmp     1b

starting_msg:   .asciz  "starting vcpus\n"

#include "common.S"
