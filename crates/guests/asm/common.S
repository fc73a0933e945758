/*
 * Routines shared by every guest, #included at the end of each guest source
 * (after its _start, so that _start stays at LOAD_ADDR).
 *
 * Register use while a guest runs (callee-saved by every routine here):
 *   rbx = number of vCPUs (RSI at entry, clamped to MAX_VCPUS)
 *   r12 = R12_TAG | i    r13 = i (vCPU index, RDI at entry)
 *   r14 = loop counter   r15 = R15_MAGIC
 * Routines may clobber rax, rcx, rdx, rsi, rdi, r8-r11 and flags.
 *
 * Only plain integer instructions are used: the PVM host runs ring-0 code in
 * KVM's instruction emulator (no int3/int n, no SSE, no popcnt, no xsave).
 * Ports above 0xff are always reached through %dx: `out %al,$0x3f8` would be
 * silently truncated to port 0xf8.
 */

#define STR_(x) #x
#define STR(x) STR_(x)

/* setup: rdi = vCPU index, rsi = vCPU count. Sets rbx, r12-r15, zeroes this
 * vCPU's counter and fills its pattern page with (j + i) & 0xff. */
setup:
        cld
        mov     %rdi, %r13
        mov     %rsi, %rbx
        cmp     $MAX_VCPUS, %rbx
        jbe     1f
        mov     $MAX_VCPUS, %ebx
1:      mov     $R12_TAG, %r12
        or      %r13, %r12
        mov     $R15_MAGIC, %r15
        xor     %r14d, %r14d
        movq    $0, COUNTER_BASE(,%r13,8)
        mov     %r13, %rdi
        shl     $12, %rdi
        add     $PATTERN_BASE, %rdi
        mov     %r13d, %eax             /* al = (0 + i) & 0xff */
        mov     $PATTERN_SIZE, %ecx
2:      mov     %al, (%rdi)
        inc     %al
        inc     %rdi
        dec     %ecx
        jnz     2b
        ret

/* announce: vCPU 0 prints the banner, vCPU i > 0 prints "vcpu <i> up". */
announce:
        call    lock_print
        test    %r13, %r13
        jnz     1f
        lea     banner(%rip), %rsi
        call    puts
        jmp     unlock_print
1:      lea     vcpu_msg(%rip), %rsi
        call    puts
        mov     %r13, %rax
        call    putdec
        lea     up_msg(%rip), %rsi
        call    puts
        jmp     unlock_print

/* start_others: ask the VMM to start vCPUs 1 .. rbx-1 (port 0x600, eax = index). */
start_others:
        mov     $1, %ecx
1:      cmp     %rbx, %rcx
        jae     2f
        mov     %ecx, %eax
        mov     $PORT_START_VCPU, %dx
        out     %eax, %dx
        inc     %ecx
        jmp     1b
2:      ret

/* iterate: one loop iteration. Counter in r14 and in memory, a tick line
 * from vCPU 0 every TICK_EVERY iterations, then hlt (the VMM sleeps ~1 ms).
 * At the hlt, r14 == the counter in memory. */
iterate:
        inc     %r14
        mov     %r14, COUNTER_BASE(,%r13,8)
        test    %r13, %r13
        jnz     1f
        test    $(TICK_EVERY - 1), %r14
        jnz     1f
        call    lock_print
        lea     tick_msg(%rip), %rsi
        call    puts
        mov     %r14, %rax
        call    putdec
        mov     $'\n', %al
        call    putc
        call    unlock_print
1:      hlt
        ret

/* lock_puts: print the NUL-terminated string at rsi under the print lock. */
lock_puts:
        call    lock_print
        call    puts
        jmp     unlock_print

/* Print lock: a u32 at PRINT_LOCK, taken with xchg (implicitly locked).
 * A waiter halts between attempts instead of spinning flat out. */
lock_print:
1:      mov     $1, %eax
        xchg    %eax, PRINT_LOCK
        test    %eax, %eax
        jz      2f
        hlt
        jmp     1b
2:      ret

unlock_print:
        movl    $0, PRINT_LOCK
        ret

/* puts: print the NUL-terminated string at rsi. */
puts:
        mov     $PORT_SERIAL, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      ret

/* putc: print al. */
putc:
        mov     $PORT_SERIAL, %dx
        out     %al, %dx
        ret

/* putdec: print rax as an unsigned decimal number (div by 10 into a
 * 24-byte buffer on the stack, most significant digit first). */
putdec:
        sub     $24, %rsp
        lea     24(%rsp), %rdi          /* one past the buffer's end */
        mov     %rdi, %r8
        mov     $10, %ecx
1:      xor     %edx, %edx
        div     %rcx
        add     $'0', %dl
        dec     %rdi
        mov     %dl, (%rdi)
        test    %rax, %rax
        jnz     1b
        mov     $PORT_SERIAL, %dx
2:      mov     (%rdi), %al
        out     %al, %dx
        inc     %rdi
        cmp     %r8, %rdi
        jb      2b
        add     $24, %rsp
        ret

/* Strings live in .text too: the image is the .text section only. */
banner:         .ascii  "ukvmi guest "
                .ascii  STR(GUEST_NAME)
                .asciz  ": vcpu 0 up\n"
vcpu_msg:       .asciz  "vcpu "
up_msg:         .asciz  " up\n"
tick_msg:       .asciz  "tick "
