//! CPUID as a Linux guest sees it: its APIC id, the hypervisor bit, and on
//! a PVM host the features the emulator lacks cleared (pure).

use kvm_bindings::CpuId;

/// Leaf 1 ECX: CMPXCHG16B, SSSE3, POPCNT, XSAVE, OSXSAVE, AVX.
const LEAF1_ECX_PVM_CLEAR: u32 = (1 << 13) | (1 << 9) | (1 << 23) | (1 << 26) | (1 << 27) | (1 << 28);
/// Leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 7.0 EBX: FSGSBASE, ERMS, SMAP.
const LEAF7_EBX_PVM_CLEAR: u32 = 1 | (1 << 9) | (1 << 20);
/// Leaf 7.0 EDX: FSRM.
const LEAF7_EDX_PVM_CLEAR: u32 = 1 << 4;

/// Edits KVM's supported CPUID for vCPU `apic_id` of a Linux guest. On a
/// PVM host (`pvm`) the features of [`LEAF1_ECX_PVM_CLEAR`] etc. are
/// cleared; only CX16 is known to be honoured at CPL0, the kernel command
/// line says the rest too (`cmdline::PVM_SWITCHES`).
pub(crate) fn adjust(cpuid: &mut CpuId, apic_id: u8, pvm: bool) {
    for e in cpuid.as_mut_slice() {
        match (e.function, e.index) {
            (1, _) => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(apic_id) << 24);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if pvm {
                    e.ecx &= !LEAF1_ECX_PVM_CLEAR;
                }
            }
            (7, 0) if pvm => {
                e.ebx &= !LEAF7_EBX_PVM_CLEAR;
                e.edx &= !LEAF7_EDX_PVM_CLEAR;
            }
            (0xb, _) => e.edx = u32::from(apic_id),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax: !0, ebx: !0, ecx: !0, edx: !0, ..Default::default() }
    }

    fn table() -> CpuId {
        CpuId::from_entries(&[entry(0, 0), entry(1, 0), entry(7, 0), entry(7, 1), entry(0xb, 0), entry(0xb, 1)])
            .unwrap()
    }

    fn get(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice().iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    #[test]
    fn a_pvm_host_clears_what_the_emulator_lacks() {
        let mut c = table();
        adjust(&mut c, 0, true);
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 0, "APIC id");
        assert_eq!(l1.ebx & 0xff_ffff, 0xff_ffff);
        for bit in [9, 13, 23, 26, 27, 28] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor");
        assert_eq!(l1.ecx | LEAF1_ECX_PVM_CLEAR, !0, "nothing else cleared");
        let l7 = get(&c, 7, 0);
        assert_eq!(l7.ebx, !LEAF7_EBX_PVM_CLEAR);
        assert_eq!(l7.edx, !(1 << 4));
        assert_eq!(get(&c, 7, 1).ebx, !0, "only subleaf 0");
        assert_eq!(get(&c, 0xb, 1).edx, 0);
        assert_eq!(get(&c, 0, 0).ecx, !0);
    }

    #[test]
    fn a_hardware_host_keeps_the_features() {
        let mut c =
            CpuId::from_entries(&[kvm_cpuid_entry2 { function: 1, ..Default::default() }, entry(7, 0)]).unwrap();
        adjust(&mut c, 3, false);
        let l1 = get(&c, 1, 0);
        assert_eq!((l1.ebx >> 24, l1.ecx), (3, 1 << 31));
        assert_eq!(get(&c, 7, 0).ebx, !0);
    }
}
