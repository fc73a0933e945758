//! Field-by-field conversion between kvm-bindings' structs and the wire
//! crate's identical ones (no transmutes).

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use ukvmi_wire::{KvmDtable, KvmRegs, KvmSegment, KvmSregs};

pub(crate) fn regs_to_wire(r: &kvm_regs) -> KvmRegs {
    KvmRegs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(crate) fn regs_from_wire(r: &KvmRegs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn seg(s: &kvm_segment) -> KvmSegment {
    KvmSegment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

fn dt(d: &kvm_dtable) -> KvmDtable {
    KvmDtable { base: d.base, limit: d.limit, padding: [0; 3] }
}

pub(crate) fn sregs_to_wire(s: &kvm_sregs) -> KvmSregs {
    KvmSregs {
        cs: seg(&s.cs),
        ds: seg(&s.ds),
        es: seg(&s.es),
        fs: seg(&s.fs),
        gs: seg(&s.gs),
        ss: seg(&s.ss),
        tr: seg(&s.tr),
        ldt: seg(&s.ldt),
        gdt: dt(&s.gdt),
        idt: dt(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: s.interrupt_bitmap,
    }
}
