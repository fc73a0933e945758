//! The PC platform a Linux guest expects from KVM: the in-kernel irqchip
//! (PIC, IOAPIC, LAPIC) and PIT, and each LAPIC in virtual-wire mode.

use crate::error::{Error, Result};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{VcpuFd, VmFd};

/// LAPIC register offsets of LVT LINT0 and LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// LVT delivery modes (bits 8–10).
const DELIVERY_EXTINT: u32 = 7;
const DELIVERY_NMI: u32 = 4;

/// Creates the irqchip and the PIT on `vm`; before any vCPU exists.
/// `KVM_SET_TSS_ADDR`/`KVM_SET_IDENTITY_MAP_ADDR` are needed on VMX and
/// harmless elsewhere (they lie above the 3 GiB of RAM a Linux guest has).
pub(crate) fn create(vm: &VmFd) -> Result<()> {
    vm.set_tss_address(0xfffb_d000).map_err(|e| Error::kvm("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(0xfffb_c000).map_err(|e| Error::kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.create_irq_chip().map_err(|e| Error::kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(|e| Error::kvm("KVM_CREATE_PIT2", e))?;
    Ok(())
}

/// `reg` with its delivery mode set to `mode`.
pub(crate) fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | ((mode & 7) << 8)
}

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(regs.iter().skip(off)) {
        *d = *s as u8;
    }
    u32::from_le_bytes(b)
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, v: u32) {
    for (d, s) in regs.iter_mut().skip(off).zip(v.to_le_bytes()) {
        *d = s as std::os::raw::c_char;
    }
}

/// Virtual-wire mode on vCPU `fd`'s LAPIC: LINT0 takes the PIC's
/// interrupts (ExtINT), LINT1 is NMI.
pub(crate) fn setup_vcpu(fd: &VcpuFd) -> Result<()> {
    let mut lapic = fd.get_lapic().map_err(|e| Error::kvm("KVM_GET_LAPIC", e))?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(&mut lapic.regs, APIC_LVT0, with_delivery_mode(lvt0, DELIVERY_EXTINT));
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(&mut lapic.regs, APIC_LVT1, with_delivery_mode(lvt1, DELIVERY_NMI));
    fd.set_lapic(&lapic).map_err(|e| Error::kvm("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_modes_replace_bits_8_to_10_only() {
        assert_eq!(with_delivery_mode(0x1_0000, DELIVERY_EXTINT), 0x1_0700);
        assert_eq!(with_delivery_mode(0x1_07ff, DELIVERY_NMI), 0x1_04ff);
    }

    #[test]
    fn lapic_registers_are_little_endian_words() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT1, 0x1234_0400);
        assert_eq!(lapic_reg(&regs, APIC_LVT1), 0x1234_0400);
        assert_eq!(regs[APIC_LVT1] as u8, 0);
        assert_eq!(regs[APIC_LVT1 + 1] as u8, 4);
        assert_eq!(lapic_reg(&regs, APIC_LVT0), 0);
    }
}
