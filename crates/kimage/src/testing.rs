//! Hand-built kernel files for tests (feature `test-util`; not part of the
//! API): ELF headers and program headers, and a tiny x86-64 ELF vmlinux
//! with the PVH note, so that Linux detection and the PVH boot path can be
//! tested without a real kernel.
//!
//! [`pvh_vmlinux`] is what [`detect`](crate::detect) calls a Linux ELF and
//! what a PVH loader (linux-loader's) loads: one `PT_LOAD` whose virtual and
//! physical address is `paddr`, `e_entry = paddr`, and a `PT_NOTE` after
//! the code. No section headers.

use crate::XEN_ELFNOTE_PHYS32_ENTRY;

/// One ELF note: `name` (given without its NUL, which is added) and `desc`,
/// each padded to 4 bytes.
pub fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend((name.len() as u32 + 1).to_le_bytes());
    v.extend((desc.len() as u32).to_le_bytes());
    v.extend(kind.to_le_bytes());
    v.extend(name);
    v.push(0);
    v.resize(v.len().next_multiple_of(4), 0);
    v.extend(desc);
    v.resize(v.len().next_multiple_of(4), 0);
    v
}

/// The notes of a vmlinux built with `CONFIG_PVH`: a `Linux` note (what
/// makes an ELF Linux) and the `Xen` note of type
/// [`XEN_ELFNOTE_PHYS32_ENTRY`] holding `entry` (4 bytes).
pub fn pvh_notes(entry: u32) -> Vec<u8> {
    let mut notes = note(b"Linux", 1, b"6.1\0");
    notes.extend(note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, &entry.to_le_bytes()));
    notes
}

/// An x86-64 ELF64 executable's header (little endian, `ET_EXEC`): entry
/// `entry`, `phnum` program headers of 56 bytes right after it, no section
/// headers.
pub fn ehdr(entry: u64, phnum: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend(b"\x7fELF\x02\x01\x01"); // ELFCLASS64, little endian, version 1
    b.extend([0u8; 9]);
    b.extend(2u16.to_le_bytes()); // ET_EXEC
    b.extend(62u16.to_le_bytes()); // EM_X86_64
    b.extend(1u32.to_le_bytes()); // e_version
    b.extend(entry.to_le_bytes());
    b.extend(64u64.to_le_bytes()); // e_phoff
    b.extend(0u64.to_le_bytes()); // e_shoff
    b.extend(0u32.to_le_bytes()); // e_flags
                                  // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
    for v in [64u16, 56, phnum, 0, 0, 0] {
        b.extend(v.to_le_bytes());
    }
    b
}

/// A program header of type `p_type` for `filesz` bytes at file offset
/// `off`, at `addr` (virtual and physical) with `memsz` bytes in memory.
pub fn phdr(p_type: u32, off: u64, addr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(56);
    p.extend(p_type.to_le_bytes());
    p.extend(0u32.to_le_bytes()); // p_flags
                                  // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
    for v in [off, addr, addr, filesz, memsz, 0] {
        p.extend(v.to_le_bytes());
    }
    p
}

/// A minimal x86-64 ELF executable: `code` in one `PT_LOAD` at `paddr`
/// (also its virtual address and the ELF entry) and, unless `notes` is
/// empty, a `PT_NOTE` holding `notes` (see [`note`]) after the code.
pub fn elf(paddr: u64, code: &[u8], notes: &[u8]) -> Vec<u8> {
    let phnum: u16 = if notes.is_empty() { 1 } else { 2 };
    let code_off = 64 + 56 * u64::from(phnum);
    let (code_len, notes_len) = (code.len() as u64, notes.len() as u64);
    let mut b = ehdr(paddr, phnum);
    b.extend(phdr(1, code_off, paddr, code_len, code_len)); // PT_LOAD
    if !notes.is_empty() {
        b.extend(phdr(4, code_off + code_len, 0, notes_len, notes_len)); // PT_NOTE
    }
    b.extend(code);
    b.extend(notes);
    b
}

/// A PVH vmlinux look-alike: [`elf`] with [`pvh_notes`]`(entry)`.
pub fn pvh_vmlinux(paddr: u64, code: &[u8], entry: u32) -> Vec<u8> {
    elf(paddr, code, &pvh_notes(entry))
}
