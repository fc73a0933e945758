/*
 * demo: "ukos", a tiny demo operating system for introspection demos.
 *
 * A ring-0 kernel (identity-mapped, supervisor-only, below USER_BASE) runs
 * four ring-3 processes, each with its own page tables and frames, pinned
 * to vCPUs and scheduled cooperatively (yield/sleep; no timer, idle vCPUs
 * hlt). Processes enter the kernel with `syscall` (LSTAR = syscall_entry)
 * and return with `sysretq`. See demo.h for the contract and ../README.md
 * ("The demo guest") for the design, including how ring transitions work
 * on PVM hosts, where a ring-3 `syscall` does not leave ring 3: it jumps to
 * LSTAR at CPL3, the fetch from the supervisor-only kernel page faults, and
 * the #PF handler (pf_entry) completes the transition to ring 0 at LSTAR.
 *
 * Ring-0 code uses only general-purpose integer instructions (KVM's
 * emulator runs it on PVM hosts); ring-3 code runs natively.
 *
 * Kernel register conventions: syscall handlers get args in rdi, rsi, rdx,
 * rcx and rbx = this process's proc-table entry; they may clobber every
 * register but rsp (syscall_entry saved the user's). schedule preserves
 * rbx, rbp, r12-r15.
 */
#include "layout.h"
#include "demo.h"

#define PROC_ENTRIES    (PROC_TABLE + PROC_HEADER_SIZE)
#define TSS_SIZE        128
#define LINE_MAX        240

        .code64
        .text
        .globl  _start
_start:
        call    kernel_entry            /* never returns */

/* ---------------------------------------------------------------- boot -- */

/* rdi = vCPU index, rsi = vCPU count, rdx = TSC kHz; boot stack. */
kernel_entry:
        cld
        mov     %rdi, %r13              /* announce wants r13 = vCPU index */
        mov     %rsi, %rbx
        test    %rdi, %rdi
        jnz     ap_entry
        test    %rdx, %rdx
        jnz     1f
        mov     $ASSUMED_TSC_KHZ, %edx
        movq    $1, tsc_assumed
1:      mov     %rdx, tsc_khz
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        mov     %rax, tsc_boot
        cmp     $MAX_CPUS, %rbx
        jbe     2f
        mov     $MAX_CPUS, %ebx
2:      test    %rbx, %rbx
        jnz     3f
        mov     $1, %ebx
3:      mov     %rbx, ncpus
        call    announce
        call    lock_print
        lea     s_booting(%rip), %rsi
        call    puts
        mov     ncpus, %rax
        call    putdec
        lea     s_vcpus_tsc(%rip), %rsi
        call    puts
        mov     tsc_khz, %rax
        call    putdec
        lea     s_khz(%rip), %rsi
        call    puts
        cmpq    $0, tsc_assumed
        je      4f
        lea     s_assumed(%rip), %rsi
        call    puts
4:      mov     $'\n', %al
        call    putc
        call    unlock_print

        call    idt_build
        call    proc_table_init
        call    create_processes
        xor     %edi, %edi
        call    cpu_init
        movq    $1, boot_done
        cmpq    $1, ncpus
        jbe     5f
        mov     $1, %eax
        mov     $PORT_START_VCPU, %dx
        out     %eax, %dx
5:      call    update_ticks
        mov     %rax, %r12
        call    lock_print
        lea     s_boot_done(%rip), %rsi
        call    puts
        mov     %r12, %rax
        call    putdec
        lea     s_ms(%rip), %rsi
        call    puts
        call    unlock_print
        xor     %edi, %edi
        jmp     cpu_run

/* vCPU i > 0: wait for vCPU 0's boot, then schedule. vCPUs the kernel does
 * not use (index >= ncpus) halt for good. */
ap_entry:
        cmp     ncpus, %rdi
        jae     park
        cmpq    $0, boot_done
        jne     1f
        hlt
        jmp     ap_entry
1:      call    announce
        mov     %r13, %rdi
        call    cpu_init
        mov     %r13, %rdi
        jmp     cpu_run

cpu_run:
        mov     $-1, %esi
        call    schedule                /* switches to a process for good */
        .globl  park
park:
        hlt
        jmp     park

/* cpu_init: edi = vCPU. GDT, this vCPU's TSS (RSP0 = its boot stack top),
 * IDT, and the syscall MSRs. */
        .globl  cpu_init
cpu_init:
        mov     %edi, %r8d
        lgdt    gdtr
        /* TSS descriptor for tss0 + cpu*TSS_SIZE */
        mov     %r8, %rax
        shl     $7, %rax                /* * TSS_SIZE */
        add     $tss0, %rax
        mov     %r8, %rcx
        shl     $14, %rcx               /* * STACK_SIZE */
        mov     $STACK_TOP, %rdx
        sub     %rcx, %rdx
        mov     %rdx, 4(%rax)           /* RSP0 */
        movw    $104, 102(%rax)         /* I/O map base past the limit: no bitmap */
        mov     %r8, %rdi
        shl     $4, %rdi
        add     $(gdt + TSS_SEL0), %rdi
        mov     %rax, %rdx
        and     $0xffffff, %edx
        shl     $16, %rdx
        or      $0x67, %rdx             /* limit */
        mov     $0x89, %ecx             /* present, 64-bit TSS available */
        shl     $40, %rcx
        or      %rcx, %rdx
        mov     %rax, %rcx
        shr     $24, %rcx
        and     $0xff, %ecx
        shl     $56, %rcx
        or      %rcx, %rdx
        mov     %rdx, (%rdi)
        mov     %rax, %rcx
        shr     $32, %rcx
        mov     %rcx, 8(%rdi)
        mov     %r8d, %eax
        shl     $4, %eax
        add     $TSS_SEL0, %eax
        ltr     %ax
        lidt    idtr
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $1, %eax                /* SCE */
        wrmsr
        mov     $MSR_STAR, %ecx
        xor     %eax, %eax
        mov     $(((USER_CS32 & ~3) << 16) | KERNEL_CS), %edx
        wrmsr
        mov     $MSR_LSTAR_DEMO, %ecx
        mov     $syscall_entry, %eax
        xor     %edx, %edx
        wrmsr
        mov     $MSR_SFMASK, %ecx
        mov     $SFMASK_VALUE, %eax
        xor     %edx, %edx
        wrmsr
        ret

/* idt_build: 32 interrupt gates (DPL 0) to the stubs below. */
idt_build:
        xor     %ecx, %ecx
1:      mov     exc_stubs(,%rcx,8), %rax
        mov     %rax, %rdx
        and     $0xffff, %edx
        or      $(KERNEL_CS << 16), %rdx
        mov     $0x8e, %r8d
        shl     $40, %r8
        or      %r8, %rdx
        mov     %rax, %r8
        shr     $16, %r8
        and     $0xffff, %r8d
        shl     $48, %r8
        or      %r8, %rdx
        mov     %rcx, %rdi
        shl     $4, %rdi
        mov     %rdx, idt(%rdi)
        shr     $32, %rax
        mov     %rax, idt+8(%rdi)
        inc     %ecx
        cmp     $32, %ecx
        jb      1b
        ret

proc_table_init:
        mov     $PROC_TABLE, %rdi
        xor     %eax, %eax
        mov     $((PROC_HEADER_SIZE + MAX_PROCS * PROC_ENTRY_SIZE) / 8), %ecx
        rep stosq
        mov     $PROC_MAGIC, %rax
        mov     %rax, PROC_TABLE + PH_MAGIC
        movl    $PROC_VERSION, PROC_TABLE + PH_VERSION
        movl    $MAX_PROCS, PROC_TABLE + PH_MAX_PROCS
        movl    $PROC_ENTRY_SIZE, PROC_TABLE + PH_ENTRY_SIZE
        mov     ncpus, %eax
        mov     %eax, PROC_TABLE + PH_NCPUS
        ret

/* create_processes: slots 0..NPROCS-1 get pids 1..NPROCS. Runs on vCPU 0
 * with the VMM's 1 GiB identity map, so every frame is reachable. */
create_processes:
        xor     %r12d, %r12d            /* slot */
1:      mov     %r12, %r13
        shl     $15, %r13               /* * PBLK_SIZE */
        add     $PBLK_BASE, %r13        /* block: PML4 */
        mov     %r12, %r14
        shl     $22, %r14               /* * USER_FRAMES_SIZE */
        add     $USER_FRAMES_BASE, %r14 /* frames */
        /* page tables: kernel supervisor-only below USER_BASE, user pages above */
        lea     (PB_PDPT + 7)(%r13), %rax
        mov     %rax, (%r13)
        lea     (PB_PD + 7)(%r13), %rax
        mov     %rax, PB_PDPT(%r13)
        movq    $0x83, PB_PD(%r13)
        movq    $0x200083, PB_PD+8(%r13)
        lea     0x87(%r14), %rax
        mov     %rax, PB_PD+16(%r13)
        lea     0x200087(%r14), %rax
        mov     %rax, PB_PD+24(%r13)
        /* the user image */
        mov     $user_image_start, %rsi
        mov     %r14, %rdi
        mov     $((user_image_end - user_image_start + 7) / 8), %ecx
        rep movsq
        /* kernel stack: a syscall frame (user rsp, user rip, 12 zero regs)
         * under a schedule frame returning to first_user_entry */
        mov     prog_entries(,%r12,8), %r15
        sub     $user_image_start, %r15
        add     $USER_BASE, %r15        /* entry VA */
        lea     PB_KSTACK_TOP(%r13), %rdi
        movq    $USER_STACK_TOP, -8(%rdi)
        mov     %r15, -16(%rdi)
        movq    $first_user_entry, -120(%rdi)
        sub     $168, %rdi
        mov     %rdi, PB_SAVED_RSP(%r13)
        /* the process table entry */
        mov     %r12, %rbx
        shl     $6, %rbx
        add     $PROC_ENTRIES, %rbx
        lea     1(%r12), %eax
        mov     %eax, PE_PID(%rbx)
        movl    $PS_READY, PE_STATE(%rbx)
        xor     %eax, %eax
        cmpq    $1, ncpus
        jbe     2f
        mov     %r12d, %eax
        shr     $1, %eax                /* pids 1,2 on vCPU 0; 3,4 on vCPU 1 */
2:      mov     %eax, PE_CPU(%rbx)
        mov     %r13, PE_CR3(%rbx)
        mov     %r15, PE_USER_RIP(%rbx)
        mov     %r12, %rsi
        shl     $4, %rsi
        add     $prog_names, %rsi
        mov     (%rsi), %rax
        mov     %rax, PE_NAME(%rbx)
        mov     8(%rsi), %rax
        mov     %rax, PE_NAME+8(%rbx)
        /* "ukos: pid 1 (init) on vCPU 0, cr3 0x340000" */
        call    lock_print
        lea     s_pid(%rip), %rsi
        call    puts
        mov     PE_PID(%rbx), %eax
        call    putdec
        call    put_name
        lea     s_on_vcpu(%rip), %rsi
        call    puts
        mov     PE_CPU(%rbx), %eax
        call    putdec
        lea     s_cr3(%rip), %rsi
        call    puts
        mov     %r13, %rax
        call    puthex
        mov     $'\n', %al
        call    putc
        call    unlock_print
        inc     %r12
        cmp     $NPROCS, %r12
        jb      1b
        ret

/* ------------------------------------------------------------ syscalls -- */

/* The syscall entry (LSTAR). Entered at ring 0 with RSP = the user's,
 * RCX = user RIP; on hardware KVM straight from `syscall`, on PVM through
 * pf_entry. R11 is not used (the user's RFLAGS are not kept). */
        .balign 16
        .globl  syscall_entry
syscall_entry:
        mov     %rsp, %r11
        mov     %cr3, %rsp              /* CR3 = this process's block */
        add     $PB_KSTACK_TOP, %rsp
        push    %r11                    /* user rsp */
        push    %rcx                    /* user rip */
        push    %rbx
        push    %rbp
        push    %rdi
        push    %rsi
        push    %rdx
        push    %r8
        push    %r9
        push    %r10
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        mov     %cr3, %rbx
        sub     $PBLK_BASE, %rbx
        shr     $15, %rbx               /* slot */
        shl     $6, %rbx
        add     $PROC_ENTRIES, %rbx     /* rbx = this process's entry */
        incq    PE_SYSCALLS(%rbx)
        mov     %rcx, PE_USER_RIP(%rbx)
        cmp     $NR_SYSCALLS, %rax
        jae     1f
        mov     %r10, %rcx
        .globl  syscall_dispatch
syscall_dispatch:
        call    *syscall_table(,%rax,8)
        jmp     syscall_exit
1:      mov     $-ENOSYS, %rax
        .globl  syscall_exit
syscall_exit:
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdx
        pop     %rsi
        pop     %rdi
        pop     %rbp
        pop     %rbx
        pop     %rcx                    /* user rip */
        pop     %rsp                    /* user rsp */
        mov     $2, %r11d               /* user RFLAGS */
        sysretq

/* A new process's first return to user mode (see create_processes). */
first_user_entry:
        xor     %eax, %eax
        jmp     syscall_exit

/* rbx = entry -> esi = slot */
slot_of:
        mov     %rbx, %rsi
        sub     $PROC_ENTRIES, %rsi
        shr     $6, %rsi
        ret

sys_nosys:
        mov     $-ENOSYS, %rax
        ret

/* write(fd, buf, len): fd 1 and 2 go to the serial console. */
        .globl  sys_write
sys_write:
        cmp     $1, %rdi
        je      1f
        cmp     $2, %rdi
        je      1f
        mov     $-EBADF, %rax
        ret
1:      cmp     $4096, %rdx
        ja      9f
        cmp     $USER_BASE, %rsi
        jb      9f
        lea     (%rsi,%rdx), %rax
        cmp     $USER_STACK_TOP, %rax
        ja      9f
        mov     %rsi, %r8
        mov     %rdx, %r9
        mov     %rdx, %rcx
        call    lock_print
        mov     $PORT_SERIAL, %dx
        test    %rcx, %rcx
        jz      3f
2:      mov     (%r8), %al
        out     %al, %dx
        inc     %r8
        dec     %rcx
        jnz     2b
3:      call    unlock_print
        mov     %r9, %rax
        ret
9:      mov     $-EFAULT, %rax
        ret

sys_yield:
        movl    $PS_READY, PE_STATE(%rbx)
        mov     PE_CPU(%rbx), %edi
        call    slot_of
        call    schedule
        xor     %eax, %eax
        ret

/* sleep(ms), at most an hour */
sys_sleep:
        cmp     $3600000, %rdi
        jbe     1f
        mov     $3600000, %edi
1:      mov     %rdi, %r12
        call    update_ticks
        add     %r12, %rax
        mov     %rax, PE_WAKE_TICK(%rbx)
        movl    $PS_SLEEPING, PE_STATE(%rbx)
        mov     PE_CPU(%rbx), %edi
        call    slot_of
        call    schedule
        xor     %eax, %eax
        ret

sys_getpid:
        mov     PE_PID(%rbx), %eax
        ret

sys_exit:
        mov     %edi, PE_EXIT_CODE(%rbx)
        movl    $PS_EXITED, PE_STATE(%rbx)
        call    lock_print
        lea     s_pid(%rip), %rsi
        call    puts
        mov     PE_PID(%rbx), %eax
        call    putdec
        call    put_name
        lea     s_exited(%rip), %rsi
        call    puts
        mov     PE_EXIT_CODE(%rbx), %eax
        call    putdec
        mov     $'\n', %al
        call    putc
        call    unlock_print
        mov     PE_CPU(%rbx), %edi
        call    slot_of
        call    schedule                /* never comes back: exited */
        jmp     park

/* debug_wrmsr(msr, value): the "leftover debug syscall". Writes any MSR and
 * returns what rdmsr reads back, or -EIO if either faults (#GP: see
 * exc_entry's fixup). */
        .globl  sys_debug_wrmsr
sys_debug_wrmsr:
        mov     %edi, %ecx
        mov     %rsi, %rax
        mov     %rsi, %rdx
        shr     $32, %rdx
        .globl  debug_wrmsr_insn
debug_wrmsr_insn:
        wrmsr
        .globl  debug_rdmsr_insn
debug_rdmsr_insn:
        rdmsr
        shl     $32, %rdx
        or      %rdx, %rax
        ret
msr_fixup:
        mov     $-EIO, %rax
        ret

/* debug_poke(kaddr, value): writes a u64 anywhere below USER_BASE and
 * returns the u64 read back from there. */
        .globl  sys_debug_poke
sys_debug_poke:
        cmp     $(USER_BASE - 8), %rdi
        ja      1f
        .globl  debug_poke_store
debug_poke_store:
        mov     %rsi, (%rdi)
        mov     (%rdi), %rax
        ret
1:      mov     $-EFAULT, %rax
        ret

/* agent(msg, len, reply_buf, reply_cap): the message (at most
 * AGENT_BUF_SIZE bytes) goes to agent_buf, the doorbell rings with R8 =
 * agent_buf, R9 = length; its RAX comes back. If RAX > 0, the tool left
 * that many bytes of reply in agent_buf: min(RAX, cap, AGENT_BUF_SIZE) are
 * copied to reply_buf. */
        .globl  sys_agent
sys_agent:
        cmp     $AGENT_BUF_SIZE, %rsi
        jbe     1f
        mov     $AGENT_BUF_SIZE, %esi
1:      cmp     $AGENT_BUF_SIZE, %rcx
        jbe     2f
        mov     $AGENT_BUF_SIZE, %ecx
2:      mov     %rdi, %r12              /* msg */
        mov     %rsi, %r13              /* len */
        mov     %rdx, %r14              /* reply */
        mov     %rcx, %r15              /* cap */
        cmp     $USER_BASE, %r12
        jb      9f
        lea     (%r12,%r13), %rax
        cmp     $USER_STACK_TOP, %rax
        ja      9f
        test    %r15, %r15
        jz      3f
        cmp     $USER_BASE, %r14
        jb      9f
        lea     (%r14,%r15), %rax
        cmp     $USER_STACK_TOP, %rax
        ja      9f
3:      mov     $1, %eax                /* agent_buf has one user at a time */
        xchg    %eax, agent_lock
        test    %eax, %eax
        jz      4f
        hlt
        jmp     3b
4:      mov     %r12, %rsi
        mov     $agent_buf, %rdi
        mov     %r13, %rcx
        rep movsb
        mov     $agent_buf, %r8
        mov     %r13, %r9
        call    hypercall
        mov     %rax, %rbp
        test    %rax, %rax
        jle     5f
        mov     %rax, %rcx
        cmp     %r15, %rcx
        jbe     6f
        mov     %r15, %rcx
6:      mov     $agent_buf, %rsi
        mov     %r14, %rdi
        rep movsb
5:      movl    $0, agent_lock
        mov     %rbp, %rax
        ret
9:      mov     $-EFAULT, %rax
        ret

/* ----------------------------------------------------------- scheduler -- */

/* update_ticks: rax = ms since boot, also stored in the table header.
 * Clobbers rdx. */
update_ticks:
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        sub     tsc_boot, %rax
        xor     %edx, %edx
        divq    tsc_khz
        mov     %rax, PROC_TABLE + PH_TICKS
        ret

/* schedule(edi = vCPU, esi = current slot or -1): wake this vCPU's sleepers
 * that are due, pick the next ready process after the current one (round
 * robin, the current one last), and switch to it; with none ready, mark the
 * vCPU idle (current_pid 0) and hlt (~1 ms) until one is. Returns when the
 * current process is picked again. */
        .globl  schedule
schedule:
        push    %rbx
        push    %rbp
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        mov     %edi, %r12d             /* vCPU */
        movslq  %esi, %r13              /* current slot, -1 = none */
sched_loop:
        call    update_ticks
        mov     %rax, %r15              /* now */
        mov     $-1, %r14               /* earliest wake tick of the rest */
        xor     %ecx, %ecx
1:      mov     %rcx, %rbx
        shl     $6, %rbx
        add     $PROC_ENTRIES, %rbx
        cmpl    $0, PE_PID(%rbx)
        je      2f
        cmp     PE_CPU(%rbx), %r12d
        jne     2f
        cmpl    $PS_SLEEPING, PE_STATE(%rbx)
        jne     2f
        mov     PE_WAKE_TICK(%rbx), %rax
        cmp     %rax, %r15
        jae     7f
        cmp     %r14, %rax
        jae     2f
        mov     %rax, %r14
        jmp     2f
7:      movl    $PS_READY, PE_STATE(%rbx)
2:      inc     %ecx
        cmp     $MAX_PROCS, %ecx
        jb      1b
        /* pick */
        lea     1(%r13), %rbp           /* first candidate (0 when none) */
        xor     %ecx, %ecx
3:      lea     (%rbp,%rcx), %rax
        and     $(MAX_PROCS - 1), %eax
        mov     %rax, %rbx
        shl     $6, %rbx
        add     $PROC_ENTRIES, %rbx
        cmpl    $0, PE_PID(%rbx)
        je      4f
        cmp     PE_CPU(%rbx), %r12d
        jne     4f
        cmpl    $PS_READY, PE_STATE(%rbx)
        je      found
4:      inc     %ecx
        cmp     $MAX_PROCS, %ecx
        jb      3b
        /* idle: only a sleeper's wake tick can make one ready here */
        movl    $0, PROC_TABLE + PH_CURRENT_PID(,%r12,4)
        .globl  idle_hlt
idle_hlt:
        hlt
        call    update_ticks
        cmp     %r14, %rax
        jb      idle_hlt
        jmp     sched_loop
found:  /* rax = slot, rbx = its entry */
        movl    $PS_RUNNING, PE_STATE(%rbx)
        mov     PE_PID(%rbx), %edx
        mov     %edx, PROC_TABLE + PH_CURRENT_PID(,%r12,4)
        cmp     %r13, %rax
        je      6f
        /* where to save the current context */
        lea     cpu_boot_save(,%r12,8), %rdi
        test    %r13, %r13
        js      5f
        mov     %r13, %rdi
        shl     $15, %rdi
        add     $(PBLK_BASE + PB_SAVED_RSP), %rdi
5:      shl     $15, %rax
        add     $PBLK_BASE, %rax        /* next block = its CR3 */
        mov     %rsp, (%rdi)
        .globl  context_switch
context_switch:
        mov     %rax, %cr3
        mov     PB_SAVED_RSP(%rax), %rsp
6:      pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbp
        pop     %rbx
        ret

/* ---------------------------------------------------------- exceptions -- */

/* #PF. From ring 3 with CR2 == RIP == LSTAR it is a `syscall` that stayed
 * at CPL3 (PVM) and could not fetch the supervisor-only entry: continue at
 * LSTAR in ring 0, on the user's stack, as `syscall` does on hardware
 * (RCX = the user's RIP is intact; R11 is used for the jump). */
        .globl  pf_entry
pf_entry:
        testb   $3, 16(%rsp)            /* err, rip, cs, rflags, rsp, ss */
        jz      2f
        push    %rax
        mov     %cr2, %rax
        cmp     16(%rsp), %rax
        jne     1f
        push    %rcx
        push    %rdx
        mov     $MSR_LSTAR_DEMO, %ecx
        rdmsr
        shl     $32, %rdx
        or      %rdx, %rax
        pop     %rdx
        pop     %rcx
        cmp     16(%rsp), %rax
        jne     1f
        lock incq syscall_gate_count
        mov     16(%rsp), %r11
        pop     %rax
        mov     32(%rsp), %rsp
        jmp     *%r11
1:      pop     %rax
2:      push    $14
        jmp     exc_entry

/* exc_entry: frame vector, err, rip, cs, rflags, rsp, ss. A ring-3 fault
 * kills the process; ring 0: a faulting debug wrmsr/rdmsr returns -EIO, a
 * #BP or #DB is counted and resumed (exc_common in common.S), anything
 * else halts this vCPU with a message. */
exc_entry:
        testb   $3, 24(%rsp)
        jnz     user_fault
        cmpq    $13, (%rsp)
        jne     1f
        push    %rax
        mov     24(%rsp), %rax
        cmp     $debug_wrmsr_insn, %rax
        je      2f
        cmp     $debug_rdmsr_insn, %rax
        je      2f
        pop     %rax
        jmp     1f
2:      mov     48(%rsp), %rsp          /* the interrupted stack */
        jmp     msr_fixup
1:      cmpq    $3, (%rsp)
        je      exc_common
        cmpq    $1, (%rsp)
        je      exc_common
        mov     %rsp, %rbp
        call    lock_print
        lea     s_kfault(%rip), %rsi
        call    puts
        call    put_frame
        lea     s_halted(%rip), %rsi
        call    puts
        call    unlock_print
        jmp     park

user_fault:
        mov     %rsp, %rbp
        mov     %cr3, %rbx
        sub     $PBLK_BASE, %rbx
        shr     $15, %rbx
        shl     $6, %rbx
        add     $PROC_ENTRIES, %rbx
        mov     (%rbp), %eax
        add     $128, %eax
        mov     %eax, PE_EXIT_CODE(%rbx)
        movl    $PS_EXITED, PE_STATE(%rbx)
        call    lock_print
        lea     s_pid(%rip), %rsi
        call    puts
        mov     PE_PID(%rbx), %eax
        call    putdec
        call    put_name
        lea     s_killed(%rip), %rsi
        call    puts
        call    put_frame
        mov     $'\n', %al
        call    putc
        call    unlock_print
        mov     %cr3, %rax
        add     $PB_KSTACK_TOP, %rax
        mov     %rax, %rsp
        mov     PE_CPU(%rbx), %edi
        call    slot_of
        call    schedule                /* exited: never comes back */
        jmp     park

/* put_frame: "exception V (err E) at rip R, cr2 C" from the frame at rbp. */
put_frame:
        lea     s_exception(%rip), %rsi
        call    puts
        mov     (%rbp), %rax
        call    putdec
        lea     s_err(%rip), %rsi
        call    puts
        mov     8(%rbp), %rax
        call    puthex
        lea     s_at_rip(%rip), %rsi
        call    puts
        mov     16(%rbp), %rax
        call    puthex
        lea     s_cr2(%rip), %rsi
        call    puts
        mov     %cr2, %rax
        call    puthex
        ret

.macro DEMO_STUB v
demo_exc_\v:
.if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
        push    $\v
.else
        push    $0
        push    $\v
.endif
        jmp     exc_entry
.endm
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        DEMO_STUB \v
.endr
        .balign 8
exc_stubs:
.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13
        .quad   demo_exc_\v
.endr
        .quad   pf_entry
.irp v, 15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad   demo_exc_\v
.endr

/* ------------------------------------------------------------- output -- */

/* put_name: " (name)" of the entry at rbx. */
put_name:
        mov     $PORT_SERIAL, %dx
        mov     $' ', %al
        out     %al, %dx
        mov     $'(', %al
        out     %al, %dx
        lea     PE_NAME(%rbx), %rsi
        mov     $16, %ecx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        dec     %ecx
        jnz     1b
2:      mov     $')', %al
        out     %al, %dx
        ret

/* puthex: "0x" and rax in hex, no leading zeros. Clobbers rax, rcx, rdx, r8. */
puthex:
        mov     %rax, %r8
        mov     $PORT_SERIAL, %dx
        mov     $'0', %al
        out     %al, %dx
        mov     $'x', %al
        out     %al, %dx
        mov     $60, %ecx
1:      mov     %r8, %rax               /* skip leading zero digits */
        shr     %cl, %rax
        test    $15, %al
        jnz     2f
        test    %ecx, %ecx
        jz      2f
        sub     $4, %ecx
        jmp     1b
2:      mov     %r8, %rax
        shr     %cl, %rax
        and     $15, %eax
        cmp     $10, %eax
        jb      3f
        add     $('a' - '0' - 10), %eax
3:      add     $'0', %eax
        out     %al, %dx
        sub     $4, %ecx
        jns     2b
        ret

s_booting:      .asciz  "ukos: kernel booting on "
s_vcpus_tsc:    .asciz  " vCPU(s), TSC "
s_khz:          .asciz  " kHz"
s_assumed:      .asciz  " (assumed: the VMM passed none)"
s_boot_done:    .asciz  "ukos: boot done at "
s_ms:           .asciz  " ms, starting processes\n"
s_pid:          .asciz  "ukos: pid "
s_on_vcpu:      .asciz  " on vCPU "
s_cr3:          .asciz  ", cr3 "
s_exited:       .asciz  " exited with code "
s_killed:       .asciz  " killed by "
s_kfault:       .asciz  "ukos: kernel "
s_halted:       .asciz  ": vCPU halted\n"
s_exception:    .asciz  "exception "
s_err:          .asciz  " (err "
s_at_rip:       .asciz  ") at rip "
s_cr2:          .asciz  ", cr2 "

prog_names:
        .ascii  "init"
        .fill   12, 1, 0
        .ascii  "shell"
        .fill   11, 1, 0
        .ascii  "worker"
        .fill   10, 1, 0
        .ascii  "rootkit"
        .fill   9, 1, 0
        .balign 8
prog_entries:
        .quad   u_init, u_shell, u_worker, u_rootkit

/* ------------------------------------------------------- user programs -- */

/* Everything from user_image_start to user_image_end is copied to each
 * process's frames and runs at USER_BASE + (label - user_image_start), at
 * ring 3. Position-independent: own labels RIP-relative, kernel symbols
 * absolute. Each process has its own copy, data included. */

.macro USYS nr
        mov     $\nr, %eax
        syscall
.endm

        .balign 4096
        .globl  user_image_start
user_image_start:

/* u_lb_*: a line buffer, flushed with one write() so lines never mix. */
u_lb_reset:
        movq    $0, u_len(%rip)
        ret
/* rsi = NUL-terminated string */
u_lb_str:
        mov     %rsi, %rdi
        xor     %edx, %edx
1:      cmpb    $0, (%rdi,%rdx)
        je      u_lb_mem
        inc     %rdx
        jmp     1b
/* rsi = bytes, rdx = length */
u_lb_mem:
        mov     u_len(%rip), %rcx
        lea     u_line(%rip), %rdi
1:      test    %rdx, %rdx
        jz      2f
        cmp     $LINE_MAX, %rcx
        jae     2f
        mov     (%rsi), %al
        mov     %al, (%rdi,%rcx)
        inc     %rsi
        inc     %rcx
        dec     %rdx
        jmp     1b
2:      mov     %rcx, u_len(%rip)
        ret
/* rax = unsigned number */
u_lb_dec:
        lea     u_num_end(%rip), %rsi
        mov     $10, %ecx
1:      xor     %edx, %edx
        div     %rcx
        add     $'0', %dl
        dec     %rsi
        mov     %dl, (%rsi)
        test    %rax, %rax
        jnz     1b
        lea     u_num_end(%rip), %rdx
        sub     %rsi, %rdx
        jmp     u_lb_mem
/* rax = signed number */
u_lb_sdec:
        test    %rax, %rax
        jns     u_lb_dec
        push    %rax
        lea     u_s_minus(%rip), %rsi
        call    u_lb_str
        pop     %rax
        neg     %rax
        jmp     u_lb_dec
/* rax: "0x..." */
u_lb_hex:
        lea     u_num_end(%rip), %rsi
1:      mov     %eax, %edx
        and     $15, %edx
        cmp     $10, %edx
        jb      2f
        add     $('a' - '0' - 10), %edx
2:      add     $'0', %edx
        dec     %rsi
        mov     %dl, (%rsi)
        shr     $4, %rax
        jnz     1b
        dec     %rsi
        movb    $'x', (%rsi)
        dec     %rsi
        movb    $'0', (%rsi)
        lea     u_num_end(%rip), %rdx
        sub     %rsi, %rdx
        jmp     u_lb_mem
/* write(1, line, len); reset */
u_lb_flush:
        mov     $1, %edi
        lea     u_line(%rip), %rsi
        mov     u_len(%rip), %rdx
        USYS    SYS_WRITE
        jmp     u_lb_reset
/* edi = ms */
u_sleep:
        USYS    SYS_SLEEP
        ret

/* init: a boot line, then every INIT_PERIOD_MS ask the agent (the tool,
 * through the hypercall doorbell) and print what it said. */
        .globl  u_init
u_init:
        call    u_lb_reset
        lea     u_s_init(%rip), %rsi
        call    u_lb_str
        USYS    SYS_GETPID
        call    u_lb_dec
        lea     u_s_nl(%rip), %rsi
        call    u_lb_str
        call    u_lb_flush
1:      lea     u_s_agent_msg(%rip), %rdi
        mov     $(u_s_agent_msg_end - u_s_agent_msg), %esi
        lea     u_reply(%rip), %rdx
        mov     $200, %r10d
        USYS    SYS_AGENT
        mov     %rax, %rbx
        call    u_lb_reset
        test    %rbx, %rbx
        jle     2f
        lea     u_s_replied(%rip), %rsi
        call    u_lb_str
        lea     u_reply(%rip), %rsi
        mov     %rbx, %rdx
        cmp     $200, %rdx
        jbe     5f
        mov     $200, %edx
5:      call    u_lb_mem
        jmp     4f
2:      jl      3f
        lea     u_s_acked(%rip), %rsi
        call    u_lb_str
        jmp     4f
3:      lea     u_s_noanswer(%rip), %rsi
        call    u_lb_str
        mov     %rbx, %rax
        call    u_lb_sdec
        lea     u_s_rparen(%rip), %rsi
        call    u_lb_str
4:      lea     u_s_nl(%rip), %rsi
        call    u_lb_str
        call    u_lb_flush
        mov     $INIT_PERIOD_MS, %edi
        call    u_sleep
        jmp     1b

/* shell: "shell: hello" every SHELL_PERIOD_MS. */
        .globl  u_shell
u_shell:
        mov     $1, %edi
        lea     u_s_hello(%rip), %rsi
        mov     $(u_s_hello_end - u_s_hello), %edx
        USYS    SYS_WRITE
        mov     $SHELL_PERIOD_MS, %edi
        call    u_sleep
        jmp     u_shell

/* worker: computes a little natively, yields after each round, sleeps
 * 200 ms every 4 rounds (mostly asleep), reports every 40 rounds. */
        .globl  u_worker
u_worker:
        xor     %r12d, %r12d            /* rounds */
        mov     $0x9e3779b97f4a7c15, %r13
1:      mov     $50000, %ecx
        mov     $6364136223846793005, %rax
2:      imul    %rax, %r13
        add     %rcx, %r13
        dec     %ecx
        jnz     2b
        inc     %r12
        USYS    SYS_YIELD
        test    $3, %r12
        jnz     3f
        mov     $200, %edi
        call    u_sleep
3:      mov     %r12, %rax
        xor     %edx, %edx
        mov     $40, %ecx
        div     %rcx
        test    %rdx, %rdx
        jnz     1b
        call    u_lb_reset
        lea     u_s_worker(%rip), %rsi
        call    u_lb_str
        mov     %r12, %rax
        call    u_lb_dec
        lea     u_s_checksum(%rip), %rsi
        call    u_lb_str
        mov     %r13, %rax
        call    u_lb_hex
        lea     u_s_nl(%rip), %rsi
        call    u_lb_str
        call    u_lb_flush
        jmp     1b

/* rootkit: ROOTKIT_DELAY_MS after start, then every ROOTKIT_PERIOD_MS:
 * loads its hooks into kernel memory (module_area) with debug_poke, then
 * (a) points LSTAR at its syscall hook with debug_wrmsr and (b) points
 * syscall_table[SYS_WRITE] at its write hook with debug_poke, and says
 * what happened (the read-back values tell). */
        .globl  u_rootkit
u_rootkit:
        mov     $ROOTKIT_DELAY_MS, %edi
        call    u_sleep
        xor     %r12d, %r12d            /* attempts */
rk_round:
        inc     %r12
        /* load the hooks, 8 bytes at a time, checking each read-back */
        lea     rk_hooks(%rip), %r13
        mov     $module_area, %r14
        mov     $((rk_hooks_end - rk_hooks) / 8), %r15d
1:      mov     %r14, %rdi
        mov     (%r13), %rsi
        USYS    SYS_DEBUG_POKE
        cmp     (%r13), %rax
        jne     rk_load_failed
        add     $8, %r13
        add     $8, %r14
        dec     %r15d
        jnz     1b
        /* (a) LSTAR */
        mov     $MSR_LSTAR_DEMO, %edi
        mov     $(module_area + (rk_lstar_hook - rk_hooks)), %rsi
        USYS    SYS_DEBUG_WRMSR
        mov     %rax, %rbx
        lea     u_s_rk_lstar(%rip), %rsi
        mov     $(module_area + (rk_lstar_hook - rk_hooks)), %rdx
        call    rk_report
        /* (b) syscall_table[SYS_WRITE] */
        mov     $(syscall_table + 8 * SYS_WRITE), %edi
        mov     $(module_area + (rk_write_hook - rk_hooks)), %rsi
        USYS    SYS_DEBUG_POKE
        mov     %rax, %rbx
        lea     u_s_rk_table(%rip), %rsi
        mov     $(module_area + (rk_write_hook - rk_hooks)), %rdx
        call    rk_report
        jmp     rk_sleep

/* rk_report: one line on an attack. rsi = what was attacked, rbx = the
 * value read back, rdx = the value the rootkit wanted: "<what>succeeded"
 * or "<what>failed (read back <rbx>)", then the attempt number. */
rk_report:
        push    %rdx
        call    u_lb_reset
        call    u_lb_str
        pop     %rax
        cmp     %rax, %rbx
        jne     1f
        lea     u_s_succeeded(%rip), %rsi
        call    u_lb_str
        jmp     rk_attempt
1:      lea     u_s_failed(%rip), %rsi
        call    u_lb_str
        mov     %rbx, %rax
        call    u_lb_hex
        lea     u_s_rparen(%rip), %rsi
        call    u_lb_str
        jmp     rk_attempt
rk_load_failed:
        call    u_lb_reset
        lea     u_s_rk_load(%rip), %rsi
        call    u_lb_str
        call    rk_attempt
rk_sleep:
        mov     $ROOTKIT_PERIOD_MS, %edi
        call    u_sleep
        jmp     rk_round
/* " (attempt N)\n", flush */
rk_attempt:
        lea     u_s_attempt(%rip), %rsi
        call    u_lb_str
        mov     %r12, %rax
        call    u_lb_dec
        lea     u_s_rparen_nl(%rip), %rsi
        call    u_lb_str
        jmp     u_lb_flush

/* The rootkit's hooks: ring-0 code, position-independent (absolute kernel
 * addresses only), copied into module_area. On hardware KVM the syscall
 * hook is entered by `syscall` itself, on PVM through pf_entry; both count
 * into kernel variables and chain to the real code. */
        .balign 8
rk_hooks:
rk_lstar_hook:
        lock incq hijacked_syscalls
        movabs  $syscall_entry, %r11
        jmp     *%r11
        .balign 8
rk_write_hook:
        lock incq hooked_writes
        movabs  $sys_write, %r11
        jmp     *%r11
        .balign 8
rk_hooks_end:

u_s_init:       .asciz  "init: ukos init running as pid "
u_s_agent_msg:  .ascii  "hello from the guest"
u_s_agent_msg_end:
                .byte   0
u_s_replied:    .asciz  "init: agent replied: "
u_s_acked:      .asciz  "init: agent answered (no text)"
u_s_noanswer:   .asciz  "init: nobody answered the agent ("
u_s_hello:      .ascii  "shell: hello\n"
u_s_hello_end:
u_s_worker:     .asciz  "worker: round "
u_s_checksum:   .asciz  ", checksum "
u_s_rk_lstar:   .asciz  "rootkit: LSTAR hijack "
u_s_rk_table:   .asciz  "rootkit: syscall_table[write] hook "
u_s_rk_load:    .asciz  "rootkit: loading hooks into module_area failed"
u_s_succeeded:  .asciz  "succeeded"
u_s_failed:     .asciz  "failed (read back "
u_s_attempt:    .asciz  " (attempt "
u_s_rparen:     .asciz  ")"
u_s_rparen_nl:  .asciz  ")\n"
u_s_minus:      .asciz  "-"
u_s_nl:         .asciz  "\n"
        .balign 8
u_len:          .quad   0
u_num:          .fill   24, 1, 0
u_num_end:
u_line:         .fill   LINE_MAX + 8, 1, 0
u_reply:        .fill   208, 1, 0
        .balign 8
        .globl  user_image_end
user_image_end:

/* -------------------------------------------------------- kernel data -- */

        .balign 8
tsc_boot:               .quad   0
tsc_khz:                .quad   0
tsc_assumed:            .quad   0
ncpus:                  .quad   0
boot_done:              .quad   0
        .globl  hijacked_syscalls
hijacked_syscalls:      .quad   0       /* counted by the rootkit's syscall hook */
        .globl  hooked_writes
hooked_writes:          .quad   0       /* counted by the rootkit's write hook */
        .globl  syscall_gate_count
syscall_gate_count:     .quad   0       /* syscalls that entered through pf_entry (PVM) */
agent_lock:             .quad   0
cpu_boot_save:          .quad   0, 0

        .balign 16
gdt:
        .quad   0
        .quad   0x00af9b000000ffff      /* 0x08 kernel code, 64-bit */
        .quad   0x00cf93000000ffff      /* 0x10 kernel data */
        .quad   0                       /* 0x18 */
        .quad   0x00cffb000000ffff      /* 0x20 user code, 32-bit (STAR base) */
        .quad   0x00cff3000000ffff      /* 0x28 user data */
        .quad   0x00affb000000ffff      /* 0x30 user code, 64-bit */
        .quad   0, 0                    /* 0x38 TSS of vCPU 0 */
        .quad   0, 0                    /* 0x48 TSS of vCPU 1 */
gdt_end:
        .balign 8
gdtr:   .word   gdt_end - gdt - 1
        .quad   gdt
        .balign 8
idtr:   .word   32 * 16 - 1
        .quad   idt
        .balign 16
idt:    .fill   32 * 16, 1, 0
        .balign 16
tss0:   .fill   TSS_SIZE * MAX_CPUS, 1, 0

        .balign 16
        .globl  agent_buf
agent_buf:      .fill   AGENT_BUF_SIZE, 1, 0

/* The syscall table: 512 handler addresses, exactly one page, alone on it. */
        .balign 4096
        .globl  syscall_table
syscall_table:
        .set    .Lnr, 0
        .rept   NR_SYSCALLS
        .if     .Lnr == SYS_WRITE
        .quad   sys_write
        .elseif .Lnr == SYS_YIELD
        .quad   sys_yield
        .elseif .Lnr == SYS_SLEEP
        .quad   sys_sleep
        .elseif .Lnr == SYS_GETPID
        .quad   sys_getpid
        .elseif .Lnr == SYS_EXIT
        .quad   sys_exit
        .elseif .Lnr == SYS_DEBUG_WRMSR
        .quad   sys_debug_wrmsr
        .elseif .Lnr == SYS_DEBUG_POKE
        .quad   sys_debug_poke
        .elseif .Lnr == SYS_AGENT
        .quad   sys_agent
        .else
        .quad   sys_nosys
        .endif
        .set    .Lnr, .Lnr + 1
        .endr
        .globl  syscall_table_end
syscall_table_end:

/* Kernel memory for loadable code ("modules"): where the rootkit puts its
 * hooks. */
        .globl  module_area
module_area:
        .fill   4096, 1, 0

        .globl  proc_table
        .set    proc_table, PROC_TABLE

#include "common.S"
