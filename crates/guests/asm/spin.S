/*
 * spin: vCPU 0 prints its banner and at once starts vCPUs 1..N-1 through
 * port 0x600; every vCPU then runs the counter loop forever (hlt each
 * iteration). See ../README.md for the ABI.
 */
#include "layout.h"

        .code64
        .text
        .globl  _start
_start:
        call    setup
        call    announce
        test    %r13, %r13
        jnz     1f
        call    start_others
        .globl  spin_loop
spin_loop:
1:      call    iterate
        jmp     1b

#include "common.S"
