//! Unit tests on hand-built images, and on the test kernel when it is built.

use super::*;
use crate::testing::note;

/// Builds a small x86-64 ELF vmlinux look-alike: two PT_LOADs (text at a
/// kernel address, per-cpu data linked at 0), a PT_NOTE with `Linux` and
/// `Xen` (PVH entry) notes, and sections .text, .data..percpu, .notes, .BTF,
/// .bss, .symtab, .strtab, .shstrtab.
struct Builder {
    pvh: Option<Vec<u8>>,
    linux_note: bool,
}

fn sym(name: u32, info: u8, shndx: u16, value: u64) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&name.to_le_bytes());
    v.push(info);
    v.push(0);
    v.extend_from_slice(&shndx.to_le_bytes());
    v.extend_from_slice(&value.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v
}

const TEXT_VA: u64 = 0xffff_ffff_8100_0000;

impl Builder {
    fn build(&self) -> Vec<u8> {
        let mut notes = Vec::new();
        if self.linux_note {
            notes.extend(note(b"Linux", 1, b"6.1\0"));
        }
        if let Some(d) = &self.pvh {
            notes.extend(note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, d));
        }
        let text = vec![0x90u8; 0x40];
        let percpu = vec![0u8; 0x20];
        let btf = b"\x9f\xeb\x01\x00btf".to_vec();
        let strtab = b"\0init_task\0_stext\0local_fn\0weak_fn\0__bss_start\0undef\0abs_sym\0percpu_var\0".to_vec();
        let name = |n: &str| -> u32 {
            let needle = format!("\0{n}\0");
            strtab.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() as u32 + 1
        };
        // Section indices: 1 .text, 2 .data..percpu, 3 .notes, 4 .BTF, 5 .bss, 6 .symtab, 7 .strtab, 8 .shstrtab
        let mut symtab = sym(0, 0, 0, 0); // the null symbol
        symtab.extend(sym(0, 3, 1, TEXT_VA)); // a section symbol: left out
        symtab.extend(sym(name("_stext"), 0x10, 1, TEXT_VA));
        symtab.extend(sym(name("local_fn"), 0x02, 1, TEXT_VA + 0x10));
        symtab.extend(sym(name("weak_fn"), 0x22, 1, TEXT_VA + 0x20));
        symtab.extend(sym(name("init_task"), 0x11, 4, TEXT_VA + 0x1000));
        symtab.extend(sym(name("__bss_start"), 0x11, 5, TEXT_VA + 0x2000));
        symtab.extend(sym(name("undef"), 0x10, 0, 0));
        symtab.extend(sym(name("abs_sym"), 0x10, 0xfff1, 0x1234));
        symtab.extend(sym(name("percpu_var"), 0x11, 2, 0x18));
        symtab.extend(sym(0xffff, 0x11, 2, 0x18)); // name outside .strtab: skipped
        let shstr = b"\0.text\0.data..percpu\0.notes\0.BTF\0.bss\0.symtab\0.strtab\0.shstrtab\0".to_vec();
        let sname = |n: &str| -> u32 {
            let needle = format!("\0{n}\0");
            shstr.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() as u32 + 1
        };

        let mut file = vec![0u8; 64 + 3 * 56];
        let place = |data: &[u8], file: &mut Vec<u8>| -> u64 {
            while file.len() % 8 != 0 {
                file.push(0);
            }
            let at = file.len() as u64;
            file.extend_from_slice(data);
            at
        };
        let text_at = place(&text, &mut file);
        let percpu_at = place(&percpu, &mut file);
        let notes_at = place(&notes, &mut file);
        let btf_at = place(&btf, &mut file);
        let symtab_at = place(&symtab, &mut file);
        let strtab_at = place(&strtab, &mut file);
        let shstr_at = place(&shstr, &mut file);
        while file.len() % 8 != 0 {
            file.push(0);
        }
        let shoff = file.len() as u64;
        // (name, type, flags, addr, offset, size, link)
        let secs: [(u32, u32, u64, u64, u64, u64, u32); 9] = [
            (0, 0, 0, 0, 0, 0, 0),
            (sname(".text"), 1, 6, TEXT_VA, text_at, text.len() as u64, 0),
            (sname(".data..percpu"), 1, 3, 0, percpu_at, percpu.len() as u64, 0),
            (sname(".notes"), 7, 2, TEXT_VA + 0x800, notes_at, notes.len() as u64, 0),
            (sname(".BTF"), 1, 2, TEXT_VA + 0x1000, btf_at, btf.len() as u64, 0),
            (sname(".bss"), 8, 3, TEXT_VA + 0x2000, 0x7fff_ffff, 0x1000, 0),
            (sname(".symtab"), 2, 0, 0, symtab_at, symtab.len() as u64, 7),
            (sname(".strtab"), 3, 0, 0, strtab_at, strtab.len() as u64, 0),
            (sname(".shstrtab"), 3, 0, 0, shstr_at, shstr.len() as u64, 0),
        ];
        for (n, t, f, a, o, s, l) in secs {
            let mut e = Vec::new();
            e.extend_from_slice(&n.to_le_bytes());
            e.extend_from_slice(&t.to_le_bytes());
            e.extend_from_slice(&f.to_le_bytes());
            e.extend_from_slice(&a.to_le_bytes());
            e.extend_from_slice(&o.to_le_bytes());
            e.extend_from_slice(&s.to_le_bytes());
            e.extend_from_slice(&l.to_le_bytes());
            e.extend_from_slice(&[0u8; 20]);
            assert_eq!(e.len(), 64);
            file.extend(e);
        }
        // Header.
        let mut h = Vec::new();
        h.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        h.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        h.extend_from_slice(&62u16.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&TEXT_VA.to_le_bytes());
        h.extend_from_slice(&64u64.to_le_bytes()); // phoff
        h.extend_from_slice(&shoff.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 3, 64, 9, 8] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        file[..64].copy_from_slice(&h);
        // Program headers: (type, flags, offset, vaddr, paddr, filesz, memsz)
        let phdrs = [
            (1u32, 5u32, text_at, TEXT_VA, 0x100_0000u64, 0x3000u64, 0x3000u64),
            (1, 6, percpu_at, 0, 0x18a_7000, 0x20, 0x20),
            (4, 4, notes_at, TEXT_VA + 0x800, 0x100_0800, notes.len() as u64, notes.len() as u64),
        ];
        for (i, (t, f, o, v, p, fs, ms)) in phdrs.into_iter().enumerate() {
            let mut e = Vec::new();
            e.extend_from_slice(&t.to_le_bytes());
            e.extend_from_slice(&f.to_le_bytes());
            for x in [o, v, p, fs, ms, 0x1000] {
                e.extend_from_slice(&x.to_le_bytes());
            }
            file[64 + i * 56..64 + (i + 1) * 56].copy_from_slice(&e);
        }
        file
    }
}

fn vmlinux() -> Vec<u8> {
    Builder { pvh: Some(0x10004a0u64.to_le_bytes().to_vec()), linux_note: true }.build()
}

#[test]
fn detects_a_linux_elf_and_its_pvh_entry() {
    assert_eq!(detect(&vmlinux()), Kind::LinuxElf { pvh_entry: Some(0x10004a0) });
    let four = Builder { pvh: Some(0x1000850u32.to_le_bytes().to_vec()), linux_note: true }.build();
    assert_eq!(detect(&four), Kind::LinuxElf { pvh_entry: Some(0x1000850) }, "a 4-byte PVH note");
    let odd = Builder { pvh: Some(vec![1, 2, 3]), linux_note: true }.build();
    assert_eq!(detect(&odd), Kind::LinuxElf { pvh_entry: None }, "a PVH note of a wrong size is no entry");
    let no_pvh = Builder { pvh: None, linux_note: true }.build();
    assert_eq!(detect(&no_pvh), Kind::LinuxElf { pvh_entry: None });
    let plain = Builder { pvh: Some(vec![0; 8]), linux_note: false }.build();
    assert_eq!(detect(&plain), Kind::Elf64, "without a Linux note it is some other ELF");
}

/// The other crates' tests boot `testing::pvh_vmlinux` as Linux: it must
/// be what `detect` calls a Linux ELF, its code where the header says.
#[test]
fn the_test_util_vmlinux_is_a_pvh_linux_elf() {
    let code = [0xf4, 0xeb, 0xfe];
    let f = testing::pvh_vmlinux(0x20_0000, &code, 0x20_0002);
    assert_eq!(detect(&f), Kind::LinuxElf { pvh_entry: Some(0x20_0002) });
    let elf = Elf::parse(&f).unwrap();
    assert_eq!(elf.entry(), 0x20_0000);
    let seg = elf.segments();
    assert_eq!(seg.len(), 1);
    assert_eq!((seg[0].paddr, seg[0].vaddr, seg[0].filesz), (0x20_0000, 0x20_0000, 3));
    assert_eq!(&f[seg[0].offset as usize..][..3], &code);
    let notes = elf.notes();
    assert_eq!(
        notes.iter().map(|n| (n.name, n.kind)).collect::<Vec<_>>(),
        [(&b"Linux"[..], 1), (&b"Xen"[..], XEN_ELFNOTE_PHYS32_ENTRY)]
    );
    assert_eq!(detect(&testing::elf(0x20_0000, &code, &[])), Kind::Elf64, "no notes: not Linux");
}

#[test]
fn detects_bzimage_and_flat() {
    let mut bz = vec![0u8; 0x300];
    bz[0x1f1] = 27;
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x236..0x238].copy_from_slice(&0x7fu16.to_le_bytes());
    bz[0x248..0x24c].copy_from_slice(&0x3a5u32.to_le_bytes());
    bz[0x24c..0x250].copy_from_slice(&0x1234u32.to_le_bytes());
    let Kind::BzImage(b) = detect(&bz) else { panic!("not a bzImage: {:?}", detect(&bz)) };
    assert_eq!((b.version, b.setup_sects, b.xloadflags), (0x020f, 27, 0x7f));
    assert_eq!((b.payload_offset, b.payload_length), (0x3a5, 0x1234));
    assert!(b.has_64bit_entry());
    // An old protocol: no xloadflags, no payload fields.
    bz[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
    let Kind::BzImage(old) = detect(&bz) else { panic!("not a bzImage") };
    assert_eq!((old.xloadflags, old.payload_offset), (0, 0));
    assert!(!old.has_64bit_entry());
    assert_eq!(detect(&bz[..0x205]), Kind::Flat, "cut inside the signature");
    assert_eq!(detect(&[0xf4, 0xeb, 0xfe]), Kind::Flat);
    assert_eq!(detect(&[]), Kind::Flat);
    assert_eq!(detect(b"\x7fELF\x01\x01\x01"), Kind::Flat, "a 32-bit ELF header, cut short");
}

#[test]
fn sections_by_name_and_their_bytes() {
    let f = vmlinux();
    let elf = Elf::parse(&f).unwrap();
    assert_eq!(elf.machine(), 62);
    assert_eq!(elf.entry(), TEXT_VA);
    let names: Vec<&str> = elf.sections().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["", ".text", ".data..percpu", ".notes", ".BTF", ".bss", ".symtab", ".strtab", ".shstrtab"]);
    assert_eq!(elf.section_data(".BTF"), Some(&b"\x9f\xeb\x01\x00btf"[..]));
    assert_eq!(elf.section(".BTF").unwrap().addr, TEXT_VA + 0x1000);
    assert_eq!(elf.section_data(".bss"), None, "NOBITS has no file bytes (its offset lies)");
    assert!(elf.section(".nope").is_none());
    let notes = elf.notes();
    assert_eq!(notes.len(), 2);
    assert_eq!((notes[0].name, notes[0].kind, notes[0].desc), (&b"Linux"[..], 1, &b"6.1\0"[..]));
}

#[test]
fn symbols_have_nm_letters() {
    let f = vmlinux();
    let syms = Elf::parse(&f).unwrap().symbols().unwrap();
    let got: Vec<(u64, char, &str)> = syms.iter().map(|s| (s.addr, s.kind, s.name.as_str())).collect();
    assert_eq!(
        got,
        [
            (TEXT_VA, 'T', "_stext"),
            (TEXT_VA + 0x10, 't', "local_fn"),
            (TEXT_VA + 0x20, 'W', "weak_fn"),
            (TEXT_VA + 0x1000, 'R', "init_task"),
            (TEXT_VA + 0x2000, 'B', "__bss_start"),
            (0, 'U', "undef"),
            (0x1234, 'A', "abs_sym"),
            (0x18, 'D', "percpu_var"),
        ]
    );
}

#[test]
fn static_translation_skips_the_percpu_segment() {
    let f = vmlinux();
    let elf = Elf::parse(&f).unwrap();
    assert_eq!(elf.segments().len(), 2);
    assert_eq!(elf.static_pa(TEXT_VA), Some(0x100_0000));
    assert_eq!(elf.static_pa(TEXT_VA + 0x2fff), Some(0x100_2fff));
    assert_eq!(elf.static_pa(TEXT_VA + 0x3000), None, "past memsz");
    assert_eq!(elf.static_pa(0x18), None, "per-cpu offsets are not addresses");
}

#[test]
fn truncated_and_lying_files_are_errors_not_panics() {
    let f = vmlinux();
    for cut in 0..f.len() {
        let part = &f[..cut];
        let _ = detect(part);
        if let Ok(elf) = Elf::parse(part) {
            let _ = elf.symbols();
            let _ = elf.notes();
            let _ = elf.section_data(".BTF");
        }
    }
    assert_eq!(Elf::parse(&f[..40]).unwrap_err(), Error::Malformed { what: "header" });
    assert_eq!(Elf::parse(b"MZ").unwrap_err(), Error::NotElf64);
    // Section headers pointing past the end.
    let mut bad = f.clone();
    bad[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(Elf::parse(&bad).unwrap_err(), Error::Malformed { what: "section headers" });
    // A too-small entry size.
    let mut bad = f.clone();
    bad[54..56].copy_from_slice(&8u16.to_le_bytes());
    assert_eq!(Elf::parse(&bad).unwrap_err(), Error::Malformed { what: "program headers" });
    // Every byte flipped in turn: never a panic.
    for i in 0..f.len() {
        let mut g = f.clone();
        g[i] ^= 0xff;
        if let Ok(elf) = Elf::parse(&g) {
            let _ = elf.symbols();
            let _ = elf.notes();
            let _ = elf.static_pa(TEXT_VA);
        }
        let _ = detect(&g);
    }
    let mut no_sections = f.clone();
    no_sections[60..62].copy_from_slice(&0u16.to_le_bytes());
    let no_symtab = Elf::parse(&no_sections).unwrap();
    assert!(no_symtab.sections().is_empty());
    assert_eq!(no_symtab.notes().len(), 2, "notes still come from PT_NOTE");
    assert_eq!(no_symtab.symbols().unwrap_err(), Error::NoSection { name: ".symtab" });
    assert_eq!(Error::NoSection { name: ".symtab" }.to_string(), "the ELF file has no .symtab section");
}

/// The test kernel scripts/linux builds: its PVH entry, symbols and BTF.
#[test]
fn the_test_kernel() {
    let path = std::env::var_os("UKVMI_LINUX_KERNEL")
        .expect("UKVMI_LINUX_KERNEL is not set: run scripts/linux (or scripts/test, which exports it)");
    let f = std::fs::read(&path).unwrap_or_else(|e| panic!("reading the test kernel {path:?}: {e}"));
    assert_eq!(detect(&f), Kind::LinuxElf { pvh_entry: Some(0x10004a0) });
    let elf = Elf::parse(&f).unwrap();
    let btf = elf.section_data(".BTF").expect("the test kernel has a .BTF section");
    assert_eq!(&btf[..2], &[0x9f, 0xeb], "BTF magic");
    let syms = elf.symbols().unwrap();
    let init_task = syms.iter().find(|s| s.name == "init_task").expect("init_task in .symtab");
    assert_eq!(init_task.kind, 'D');
    let banner = syms.iter().find(|s| s.name == "linux_banner").expect("linux_banner");
    assert_eq!(
        banner.kind, 'D',
        "nm says D: vmlinux's .rodata section is flagged writable (the kernel maps it read-only)"
    );
    assert_eq!(elf.static_pa(banner.addr), Some(banner.addr - 0xffff_ffff_8000_0000));
    let percpu = syms.iter().find(|s| s.name == "current_task").expect("current_task");
    assert!(percpu.addr < 0x10_0000, "per-cpu symbols are offsets: {:#x}", percpu.addr);
    assert_eq!(elf.static_pa(percpu.addr), None);
}

/// Every line of the test kernel's System.map is one of the symbols read
/// from its `.symtab`, address, letter and name alike.
#[test]
fn the_test_kernel_symbols_match_its_system_map() {
    let path = std::env::var_os("UKVMI_LINUX_KERNEL")
        .expect("UKVMI_LINUX_KERNEL is not set: run scripts/linux (or scripts/test, which exports it)");
    let map = std::env::var_os("UKVMI_LINUX_SYSTEM_MAP")
        .expect("UKVMI_LINUX_SYSTEM_MAP is not set: run scripts/linux (or scripts/test, which exports it)");
    let f = std::fs::read(&path).unwrap_or_else(|e| panic!("reading the test kernel {path:?}: {e}"));
    let map = std::fs::read_to_string(&map).unwrap_or_else(|e| panic!("reading {map:?}: {e}"));
    let syms: std::collections::HashSet<(u64, char, String)> =
        Elf::parse(&f).unwrap().symbols().unwrap().into_iter().map(|s| (s.addr, s.kind, s.name)).collect();
    let mut lines = 0;
    for line in map.lines() {
        let mut p = line.split_whitespace();
        let (a, k, n) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
        let a = u64::from_str_radix(a, 16).unwrap();
        let k = k.chars().next().unwrap();
        assert!(syms.contains(&(a, k, n.to_string())), "System.map's `{line}` is not in .symtab as read");
        lines += 1;
    }
    assert!(lines > 10_000, "only {lines} lines in System.map");
}
