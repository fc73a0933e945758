/*
 * poweroff / poweroff7: vCPU 0 prints its banner and "bye", then writes the
 * byte at `exit_status` (EXIT_STATUS, set by build.rs) to port 0xf4. Any
 * other vCPU (never started by this guest) and vCPU 0, should the VMM
 * resume it after the power-off, just halt forever.
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
        jnz     halt_forever
        lea     bye_msg(%rip), %rsi
        call    lock_puts
        movzbl  exit_status(%rip), %eax
        mov     $PORT_POWEROFF, %dx
        out     %al, %dx
        .globl  halt_forever
halt_forever:
        hlt
        jmp     halt_forever

        .globl  exit_status
exit_status:    .byte   EXIT_STATUS
bye_msg:        .asciz  "bye\n"

#include "common.S"
