/*
 * pf: like spin, and every PF_EVERY iterations each vCPU i < PF_MAX_VCPUS
 * exercises page accesses on its two data pages, A = PF_DATA_BASE +
 * i * PF_DATA_STRIDE and B = A + 0x1000, recording what it tried and saw
 * (u64 arrays indexed by i), so a test can compare with what the tool did:
 *   1. v = PF_TAG | counter; PF_TRIED[i] = v; store v at A      (pf_store)
 *   2. load A; PF_SEEN[i] = what it read                         (pf_load)
 *   3. s = straddle value of counter; PF_STRADDLE_TRIED[i] = s;
 *      8-byte store at A + 0xffc: 4 bytes in A, 4 in B          (pf_straddle)
 *   4. 8-byte load from A + 0xffc; PF_STRADDLE_SEEN[i]           (pf_straddle_load)
 *   5. call pf_func, alone in its own 4 KiB code page, which does
 *      PF_EXEC_COUNT[i] += 1 and returns                         (pf_call)
 *   6. PF_ROUNDS[i] += 1
 * The instruction after each store is the load of the same place, so a
 * write event (RIP already past the store) and the read event that follows
 * report the same RIP.
 */
#include "layout.h"

        .code64
        .text
        .globl  _start
_start:
        call    setup
        call    announce
        test    %r13, %r13
        jnz     pf_loop
        call    start_others
        .globl  pf_loop
pf_loop:
        call    iterate
        cmp     $PF_MAX_VCPUS, %r13
        jae     pf_loop
        test    $(PF_EVERY - 1), %r14
        jnz     pf_loop
        imul    $PF_DATA_STRIDE, %r13, %rdi
        add     $PF_DATA_BASE, %rdi
        mov     $PF_TAG, %rax
        or      %r14, %rax
        mov     %rax, PF_TRIED_BASE(,%r13,8)
        .globl  pf_store
pf_store:
        mov     %rax, (%rdi)
        .globl  pf_load
pf_load:
        mov     (%rdi), %rcx
        .globl  pf_load_done
pf_load_done:
        mov     %rcx, PF_SEEN_BASE(,%r13,8)
        /* s = PF_STRADDLE_TAG | c << 32 | c, c = counter & 0x0fffffff */
        mov     %r14, %rax
        and     $0x0fffffff, %eax
        mov     %rax, %rdx
        shl     $32, %rdx
        or      %rdx, %rax
        mov     $PF_STRADDLE_TAG, %rdx
        or      %rdx, %rax
        mov     %rax, PF_STRADDLE_TRIED_BASE(,%r13,8)
        .globl  pf_straddle
pf_straddle:
        mov     %rax, 0xffc(%rdi)
        .globl  pf_straddle_load
pf_straddle_load:
        mov     0xffc(%rdi), %rcx
        mov     %rcx, PF_STRADDLE_SEEN_BASE(,%r13,8)
        .globl  pf_call
pf_call:
        call    pf_func
        incq    PF_ROUNDS_BASE(,%r13,8)
        jmp     pf_loop

#include "common.S"

/* pf_func has a code page of its own, so that a test can remove execute
 * access from it alone: two instructions, so two fetch faults per call. */
        .balign 4096
        .globl  pf_func
pf_func:
        incq    PF_EXEC_COUNT_BASE(,%r13,8)
        .globl  pf_func_ret
pf_func_ret:
        ret
        .balign 4096
