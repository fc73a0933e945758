//! Kernel virtual addresses to guest-physical ones, and bounded reads of
//! kernel memory.
//!
//! vCPU 0's page tables first (kernel mappings are the same in every
//! address space); when that fails (paging not on yet, a translation the
//! VMM refused), the kernel's fixed maps without KASLR: the image at
//! `__START_KERNEL_map` and the direct map at `PAGE_OFFSET`.

use crate::guestos::GuestMemory;

/// `__START_KERNEL_map`: the kernel image's virtual base (physical 0).
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// Where the kernel image's mapping ends at the latest
/// (`KERNEL_IMAGE_SIZE` without KASLR; modules are mapped above, elsewhere
/// in physical memory).
pub const KERNEL_IMAGE_END: u64 = START_KERNEL_MAP + (512 << 20);
/// `PAGE_OFFSET` with 4-level paging and no memory randomisation.
pub const PAGE_OFFSET: u64 = 0xffff_8880_0000_0000;
/// Size of the direct map's range (64 TiB).
const DIRECT_MAP_SIZE: u64 = 64 << 40;

/// The gpa of kernel address `va`.
pub fn kva_to_pa(mem: &dyn GuestMemory, va: u64) -> Option<u64> {
    if let Some(pa) = mem.translate(0, va) {
        return Some(pa);
    }
    if (START_KERNEL_MAP..KERNEL_IMAGE_END).contains(&va) {
        return Some(va - START_KERNEL_MAP);
    }
    va.checked_sub(PAGE_OFFSET).filter(|&off| off < DIRECT_MAP_SIZE)
}

/// Reads `buf.len()` bytes of kernel memory at `va`, page by page.
pub fn read_kva(mem: &dyn GuestMemory, va: u64, buf: &mut [u8]) -> Option<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = va.checked_add(done as u64)?;
        let room = usize::try_from(0x1000 - (at & 0xfff)).ok()?;
        let n = room.min(buf.len() - done);
        let pa = kva_to_pa(mem, at)?;
        mem.read_phys(pa, buf.get_mut(done..done + n)?).ok()?;
        done += n;
    }
    Some(())
}

/// The little-endian `u64` at kernel address `va`.
pub fn read_u64(mem: &dyn GuestMemory, va: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    read_kva(mem, va, &mut b)?;
    Some(u64::from_le_bytes(b))
}

/// The little-endian `u32` at kernel address `va`.
pub fn read_u32(mem: &dyn GuestMemory, va: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    read_kva(mem, va, &mut b)?;
    Some(u32::from_le_bytes(b))
}
