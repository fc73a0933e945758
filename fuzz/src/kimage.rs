//! `kimage`: every reader of `ukvmi-kimage` on arbitrary bytes (a kernel
//! file can lie). Nothing may panic, and what it reports must lie inside
//! the input.

use ukvmi_kimage::{detect, kallsyms, Elf, Kind};

/// Runs `detect`, the kallsyms reader and every `Elf` method on `data`.
pub fn check(data: &[u8]) {
    let kind = detect(data);
    if let Ok(syms) = kallsyms(data) {
        // Each symbol took at least a length byte and a token of the input.
        assert!(syms.len() * 2 <= data.len(), "more kallsyms than the input holds");
    }
    let Ok(elf) = Elf::parse(data) else {
        assert!(!matches!(kind, Kind::LinuxElf { .. } | Kind::Elf64), "detect found an ELF that does not parse");
        return;
    };
    for s in elf.sections() {
        if let Some(d) = elf.data_of(s) {
            assert_eq!(d.len() as u64, s.size, "section {} data has the wrong length", s.name);
        }
    }
    let _ = elf.section_data(".BTF");
    for n in elf.notes() {
        assert!(n.name.len() + n.desc.len() <= data.len(), "a note larger than the file");
    }
    let _ = elf.kallsyms();
    if let Ok(syms) = elf.symbols() {
        assert!(syms.len() * 24 <= data.len(), "more symbols than the file holds");
    }
    for seg in elf.segments() {
        let _ = elf.static_pa(seg.vaddr);
        let _ = elf.static_pa(seg.vaddr.wrapping_add(seg.memsz));
    }
}
