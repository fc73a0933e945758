/*
 * ringprobe: the probe behind the demo guest's ring transitions (not built
 * by build.rs; kept to re-check a host). Build and run:
 *
 *   gcc -c -nostdinc -Iasm -o /tmp/p.o probe/ringprobe.S
 *   ld -m elf_x86_64 -nostdlib -static -e _start -Ttext=0x100000 -o /tmp/p.elf /tmp/p.o
 *   objcopy -O binary -j .text /tmp/p.elf /tmp/p.bin
 *   ukvmi run --kernel /tmp/p.bin
 *
 * It enters ring 3 with a 64-bit sysexit, runs `syscall` there (LSTAR on a
 * supervisor-only page), runs a ring-3 hlt (#GP), then tries sysretq from
 * ring 0, printing every exception frame. On the PVM host (6.18) it showed:
 * sysexit64 and sysretq both work from ring 0; a ring-3 `syscall` jumps to
 * LSTAR but stays at CPL3 (RCX/R11 set, RSP unchanged), so the fetch from
 * the supervisor page raises #PF (err 5, CR2 = RIP = LSTAR), delivered to
 * the ring-0 IDT on TSS.RSP0; ring-3 #GP likewise. See ../README.md.
 */
#include "layout.h"
#define PGT     0x500000        /* PML4, PDPT, PD for the user-accessible identity map */
#define RES     0x520000        /* results, u64s */
#define USTACK  0x530000
#define KSTACK0 0x540000        /* TSS.RSP0 */
        .code64
        .text
        .globl _start
_start:
        mov     $0x70000, %rsp
        lea     hello(%rip), %rsi
        call    puts
        /* GDT */
        lgdt    gdtr(%rip)
        /* TSS base fixup */
        lea     tss(%rip), %rax
        lea     gdt(%rip), %rdi
        mov     %ax, 0x40+2(%rdi)
        shr     $16, %rax
        mov     %al, 0x40+4(%rdi)
        mov     %ah, 0x40+7(%rdi)
        shr     $16, %rax
        mov     %eax, 0x40+8(%rdi)
        movq    $KSTACK0, tss+4(%rip)
        mov     $0x40, %ax
        ltr     %ax
        lea     s_tss(%rip), %rsi
        call    puts
        /* IDT */
        call    idt_build
        lea     s_idt(%rip), %rsi
        call    puts
        /* page tables: 1 GiB identity, user-accessible */
        mov     $PGT, %rdi
        movq    $(PGT + 0x1007), (%rdi)
        movq    $(PGT + 0x2007), 0x1000(%rdi)
        xor     %ecx, %ecx
1:      mov     %rcx, %rax
        shl     $21, %rax
        or      $0x87, %rax
        test    %ecx, %ecx
        jnz     5f
        and     $~4, %rax
5:      mov     %rax, 0x2000(%rdi,%rcx,8)
        inc     %ecx
        cmp     $512, %ecx
        jb      1b
        mov     $PGT, %rax
        mov     %rax, %cr3
        lea     s_cr3(%rip), %rsi
        call    puts
        /* MSRs */
        mov     $0xc0000080, %ecx
        rdmsr
        or      $1, %eax
        wrmsr
        mov     $0xc0000081, %ecx       /* STAR */
        xor     %eax, %eax
        mov     $((0x20 << 16) | 0x08), %edx
        wrmsr
        mov     $0xc0000082, %ecx       /* LSTAR */
        lea     landing(%rip), %rax
        mov     %rax, %rdx
        shr     $32, %rdx
        wrmsr
        mov     $0xc0000084, %ecx       /* SFMASK */
        mov     $0x700, %eax
        xor     %edx, %edx
        wrmsr
        mov     $0x174, %ecx            /* SYSENTER_CS */
        mov     $0x10, %eax
        xor     %edx, %edx
        wrmsr
        lea     s_msr(%rip), %rsi
        call    puts
        /* rdtsc at ring 0 */
        rdtsc
        lea     s_tsc(%rip), %rsi
        call    puts
        /* test 1: sysexit to user1 */
        lea     s_sysexit(%rip), %rsi
        call    puts
        movq    $0, RES
        lea     user1(%rip), %rsi
        mov     $0x200000, %rdi
        mov     $(user_end - user1), %ecx
        rep movsb
        mov     $0x200000, %rdx
        mov     $USTACK, %rcx
        rex.w sysexit
        hlt

/* syscall landing at ring 0 */
landing:
        mov     %rcx, RES+8
        mov     %r11, RES+16
        mov     %rsp, RES+24
        mov     %rax, RES+32
        xor     %eax, %eax
        mov     %cs, %ax
        mov     %rax, RES+40
        mov     $0x70000, %rsp
        lea     s_landed(%rip), %rsi
        call    puts
        mov     $RES, %rbx
        xor     %r12d, %r12d
2:      mov     (%rbx,%r12,8), %rax
        call    puthex
        mov     $' ', %al
        call    putc
        inc     %r12
        cmp     $8, %r12
        jb      2b
        mov     $'\n', %al
        call    putc
        /* next: which test are we in? RES+48 = phase */
        mov     RES+48, %rax
        cmp     $0, %rax
        je      phase_gp
        cmp     $1, %rax
        je      phase_sysret
        hlt
phase_gp:
        /* test 2: from ring 3, hlt -> #GP */
        movq    $1, RES+48
        lea     s_gp(%rip), %rsi
        call    puts
        mov     $(0x200000 + user_gp - user1), %rdx
        mov     $USTACK, %rcx
        rex.w sysexit
phase_sysret:
        lea     s_sysret(%rip), %rsi
        call    puts
        movq    $2, RES+48
        mov     $0x200000, %rcx
        mov     $0x202, %r11d
        mov     $USTACK, %rsp
        sysretq
        hlt

/* ring 3 code */
user1:
        xor     %eax, %eax
        mov     %cs, %ax
        mov     %rax, RES
        mov     %ss, %ax
        mov     %rax, RES+56
        rdtsc
        mov     $0x1234, %eax
        mov     $0x5555, %r11d
        syscall
user1_after:
        jmp     user1
user_gp:
        mov     $0x77, %eax
        hlt
        jmp     user_gp
user_end:

/* exception handlers */
exc_handler:    /* stack: vector, error, rip, cs, rflags, rsp, ss */
        mov     %rsp, %rbp
        mov     $0x70000, %rsp
        lea     s_exc(%rip), %rsi
        call    puts
        mov     %cr2, %rax
        call    puthex
        mov     $' ', %al
        call    putc
        mov     %rbp, %rax
        call    puthex
        xor     %r12d, %r12d
3:      mov     $' ', %al
        call    putc
        mov     (%rbp,%r12,8), %rax
        call    puthex
        inc     %r12
        cmp     $7, %r12
        jb      3b
        mov     $'\n', %al
        call    putc
        mov     $RES, %rbx
        xor     %r12d, %r12d
4:      mov     (%rbx,%r12,8), %rax
        call    puthex
        mov     $' ', %al
        call    putc
        inc     %r12
        cmp     $8, %r12
        jb      4b
        mov     $'\n', %al
        call    putc
        mov     RES+48, %rax
        cmp     $0, %rax
        je      phase_gp
        cmp     $1, %rax
        je      phase_sysret
        hlt
        jmp     .

.macro STUB v
stub_\v:
.if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 14) || (\v == 17)
        push    $\v
.else
        push    $0
        push    $\v
.endif
        jmp     exc_handler
.endm
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19
        STUB \v
.endr
        .balign 8
stubs:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19
        .quad   stub_\v
.endr
idt_build:
        lea     stubs(%rip), %rsi
        lea     idt(%rip), %rdi
        xor     %ecx, %ecx
1:      mov     (%rsi,%rcx,8), %rax
        mov     %rax, %rdx
        and     $0xffff, %edx
        or      $(0x08 << 16), %rdx
        mov     $0x8e, %r8d
        shl     $40, %r8
        or      %r8, %rdx
        mov     %rax, %r8
        shr     $16, %r8
        and     $0xffff, %r8d
        shl     $48, %r8
        or      %r8, %rdx
        mov     %rdx, (%rdi)
        shr     $32, %rax
        mov     %rax, 8(%rdi)
        add     $16, %rdi
        inc     %ecx
        cmp     $20, %ecx
        jb      1b
        lidt    idtr(%rip)
        ret

puthex:
        mov     %rax, %r8
        mov     $16, %ecx
        mov     $PORT_SERIAL, %dx
1:      rol     $4, %r8
        mov     %r8d, %eax
        and     $15, %eax
        cmp     $10, %eax
        jb      2f
        add     $('a' - '0' - 10), %eax
2:      add     $'0', %eax
        out     %al, %dx
        dec     %ecx
        jnz     1b
        ret
puts:
        mov     $PORT_SERIAL, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      ret
putc:
        mov     $PORT_SERIAL, %dx
        out     %al, %dx
        ret

hello:  .asciz "probe: start\n"
s_tss:  .asciz "probe: tss loaded\n"
s_idt:  .asciz "probe: idt loaded\n"
s_cr3:  .asciz "probe: cr3 loaded\n"
s_msr:  .asciz "probe: msrs set\n"
s_tsc:  .asciz "probe: rdtsc at ring 0 ok\n"
s_sysexit: .asciz "probe: trying sysexit64\n"
s_landed: .asciz "probe: syscall landed: user_cs rcx r11 rsp rax cs phase user_ss\n"
s_gp:   .asciz "probe: ring-3 hlt\n"
s_exc:  .asciz "probe: exception cr2 / at rsp / vector err rip cs rflags rsp ss: "
s_sysret: .asciz "probe: trying sysretq\n"

        .balign 16
gdt:
        .quad 0
        .quad 0x00af9b000000ffff        /* 0x08 kernel code64 */
        .quad 0x00cf93000000ffff        /* 0x10 kernel data */
        .quad 0
        .quad 0x00cffb000000ffff        /* 0x20 user code32 */
        .quad 0x00cff3000000ffff        /* 0x28 user data */
        .quad 0x00affb000000ffff        /* 0x30 user code64 */
        .quad 0x00cff3000000ffff        /* 0x38 user data */
        .quad 0x0000890000000067        /* 0x40 TSS (base patched) */
        .quad 0
gdt_end:
gdtr:   .word gdt_end - gdt - 1
        .quad gdt
        .balign 16
tss:    .fill 104, 1, 0
        .balign 16
idt:    .fill 20*16, 1, 0
idtr:   .word 20*16-1
        .quad idt
