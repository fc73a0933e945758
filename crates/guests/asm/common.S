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

/* idt_init: build the 32-vector IDT at IDT_ADDR (idempotent: every vCPU may
 * run it) and load it. Vector 3 has DPL 3 so a ring-3 int3 reaches it. */
idt_init:
        lea     exc_table(%rip), %rsi
        mov     $IDT_ADDR, %rdi
        xor     %ecx, %ecx
1:      mov     (%rsi,%rcx,8), %rax     /* handler address */
        mov     %rax, %rdx
        and     $0xffff, %edx           /* offset 15:0 */
        or      $(0x08 << 16), %rdx     /* selector */
        mov     $0x8e, %r8d             /* present, DPL 0, 64-bit interrupt gate */
        cmp     $3, %ecx
        jne     2f
        mov     $0xee, %r8d             /* DPL 3 for #BP */
2:      shl     $40, %r8
        or      %r8, %rdx
        mov     %rax, %r8
        shr     $16, %r8
        and     $0xffff, %r8d
        shl     $48, %r8                /* offset 31:16 */
        or      %r8, %rdx
        mov     %rdx, (%rdi)
        shr     $32, %rax               /* offset 63:32 */
        mov     %rax, 8(%rdi)
        add     $16, %rdi
        inc     %ecx
        cmp     $32, %ecx
        jb      1b
        sub     $16, %rsp
        movw    $(32 * 16 - 1), (%rsp)
        movq    $IDT_ADDR, 2(%rsp)
        lidt    (%rsp)
        add     $16, %rsp
        ret

/* One stub per vector: push a 0 error code where the CPU pushes none, then
 * the vector. */
.macro EXC_STUB v
exc_stub_\v:
.if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
        push    $\v
.else
        push    $0
        push    $\v
.endif
        jmp     exc_common
.endm
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        EXC_STUB \v
.endr
        .balign 8
exc_table:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad   exc_stub_\v
.endr

/* exc_common: count and record the exception, then return without iretq
 * (KVM's emulator, which runs ring-0 code on PVM hosts, has no 64-bit
 * iret): the return RIP and RFLAGS are copied below the interrupted stack
 * and restored with popfq; ret. Same-privilege exceptions only.
 * Frame after the four pushes: +32 vector, +40 error, +48 rip, +56 cs,
 * +64 rflags, +72 rsp, +80 ss. */
        .globl  exc_common
exc_common:
        push    %rax
        push    %rbx
        push    %rcx
        push    %rdx
        mov     32(%rsp), %rax
        and     $31, %eax
        lock incq EXC_COUNT_BASE(,%rax,8)
        mov     %r13, %rbx
        and     $31, %ebx
        shl     $5, %rbx
        add     $EXC_INFO_BASE, %rbx
        mov     %rax, (%rbx)
        mov     40(%rsp), %rax
        mov     %rax, 8(%rbx)
        mov     48(%rsp), %rax
        mov     %rax, 16(%rbx)
        mov     %cr2, %rax
        mov     %rax, 24(%rbx)
        /* Read everything the copy below would overwrite first. */
        mov     48(%rsp), %rax          /* rip */
        mov     64(%rsp), %rbx          /* rflags */
        mov     72(%rsp), %rcx          /* interrupted rsp */
        mov     %rax, -8(%rcx)
        mov     %rbx, -16(%rcx)
        mov     24(%rsp), %rax
        mov     %rax, -24(%rcx)         /* rax */
        mov     16(%rsp), %rax
        mov     %rax, -32(%rcx)         /* rbx */
        mov     8(%rsp), %rax
        mov     %rax, -40(%rcx)         /* rcx */
        mov     (%rsp), %rax
        mov     %rax, -48(%rcx)         /* rdx */
        lea     -48(%rcx), %rsp
        pop     %rdx
        pop     %rcx
        pop     %rbx
        pop     %rax
        popfq
        ret

/* hypercall: the KVMI hypercall through the doorbell port; returns RAX. */
        .globl  hypercall
hypercall:
        mov     $HC_KVMI_NR, %eax
        mov     $HC_KVMI_SUBFN, %edi
        xor     %esi, %esi
        mov     $PORT_HYPERCALL, %dx
        .globl  hypercall_out
hypercall_out:
        out     %eax, %dx
        ret
