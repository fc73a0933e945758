/*
 * msr: like spin, and every MSR_EVERY iterations each vCPU writes LSTAR
 * (LSTAR_TAG | its counter), then reads it back with its own rdmsr and
 * records both values, so a test can see whether a write went through.
 */
#include "layout.h"

        .code64
        .text
        .globl  _start
_start:
        call    setup
        call    announce
        test    %r13, %r13
        jnz     msr_loop
        call    start_others
        .globl  msr_loop
msr_loop:
        call    iterate
        test    $(MSR_EVERY - 1), %r14
        jnz     msr_loop
        mov     $LSTAR_TAG, %rax
        or      %r14, %rax
        mov     %rax, MSR_TRIED_BASE(,%r13,8)
        mov     %rax, %rdx
        shr     $32, %rdx
        mov     $MSR_LSTAR, %ecx
        .globl  msr_write
msr_write:
        wrmsr
        rdmsr
        shl     $32, %rdx
        mov     %eax, %eax
        or      %rdx, %rax
        mov     %rax, MSR_SEEN_BASE(,%r13,8)
        jmp     msr_loop

#include "common.S"
