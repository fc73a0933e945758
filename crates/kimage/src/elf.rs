//! ELF64 little-endian files: the header, sections by name, program
//! headers and notes.

use crate::bytes::{cstr_at, range, u16_at, u32_at, u64_at};
use crate::error::Error;

/// The ELF magic.
pub(crate) const MAGIC: &[u8] = b"\x7fELF";
/// `PT_LOAD`.
const PT_LOAD: u32 = 1;
/// `PT_NOTE`.
const PT_NOTE: u32 = 4;
/// `SHT_NOTE`.
const SHT_NOTE: u32 = 7;
/// `SHT_NOBITS`.
pub(crate) const SHT_NOBITS: u32 = 8;
/// Longest section name kept.
const MAX_NAME: usize = 256;
/// Most notes read (a vmlinux has about ten).
const MAX_NOTES: usize = 256;

/// A section header, with its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Its name (`.text`, `.BTF`, …; lossy UTF-8).
    pub name: String,
    /// `sh_type`.
    pub kind: u32,
    /// `sh_flags`.
    pub flags: u64,
    /// `sh_addr`: where it is linked.
    pub addr: u64,
    /// `sh_offset`: where it is in the file.
    pub offset: u64,
    /// `sh_size`.
    pub size: u64,
    /// `sh_link`.
    pub link: u32,
}

impl Section {
    /// `SHF_WRITE`.
    pub const WRITE: u64 = 1;
    /// `SHF_ALLOC`.
    pub const ALLOC: u64 = 2;
    /// `SHF_EXECINSTR`.
    pub const EXEC: u64 = 4;
}

/// A loadable segment (`PT_LOAD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// `p_vaddr`: where it is linked.
    pub vaddr: u64,
    /// `p_paddr`: where it is loaded.
    pub paddr: u64,
    /// `p_offset`: where its bytes are in the file.
    pub offset: u64,
    /// `p_filesz`.
    pub filesz: u64,
    /// `p_memsz` (BSS included).
    pub memsz: u64,
    /// `p_flags` (1 = X, 2 = W, 4 = R).
    pub flags: u32,
}

/// An ELF note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Note<'a> {
    /// Its owner's name, without the NUL (`Linux`, `Xen`, `GNU`).
    pub name: &'a [u8],
    /// Its type.
    pub kind: u32,
    /// Its descriptor.
    pub desc: &'a [u8],
}

/// A parsed ELF64 little-endian file, borrowing its bytes.
#[derive(Debug, Clone)]
pub struct Elf<'a> {
    bytes: &'a [u8],
    entry: u64,
    machine: u16,
    sections: Vec<Section>,
    segments: Vec<Segment>,
    notes_at: Vec<(u64, u64)>,
}

/// Reads the `count` fixed-size table entries at `off`, `size` bytes each
/// (at least `min`), with `f`.
fn table<T>(
    b: &[u8],
    off: u64,
    count: u16,
    size: u16,
    min: u16,
    what: &'static str,
    f: impl Fn(&[u8]) -> Option<T>,
) -> Result<Vec<T>, Error> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if size < min {
        return Err(Error::Malformed { what });
    }
    let all = range(b, off, u64::from(count) * u64::from(size)).ok_or(Error::Malformed { what })?;
    all.chunks_exact(usize::from(size)).map(|e| f(e).ok_or(Error::Malformed { what })).collect()
}

impl<'a> Elf<'a> {
    /// Parses the header, the section headers (with their names) and the
    /// program headers.
    pub fn parse(bytes: &'a [u8]) -> Result<Elf<'a>, Error> {
        // ELFCLASS64, ELFDATA2LSB, EV_CURRENT.
        if !bytes.starts_with(MAGIC) || bytes.get(4..7) != Some(&[2, 1, 1]) {
            return Err(Error::NotElf64);
        }
        let h16 = |off| u16_at(bytes, off).ok_or(Error::Malformed { what: "header" });
        let h64 = |off| u64_at(bytes, off).ok_or(Error::Malformed { what: "header" });
        let machine = h16(18)?;
        let entry = h64(24)?;
        let phoff = h64(32)?;
        let shoff = h64(40)?;
        let (phentsize, phnum) = (h16(54)?, h16(56)?);
        let (shentsize, shnum, shstrndx) = (h16(58)?, h16(60)?, h16(62)?);

        let phdrs = table(bytes, phoff, phnum, phentsize, 56, "program headers", |e| {
            Some((
                u32_at(e, 0)?,
                Segment {
                    flags: u32_at(e, 4)?,
                    offset: u64_at(e, 8)?,
                    vaddr: u64_at(e, 16)?,
                    paddr: u64_at(e, 24)?,
                    filesz: u64_at(e, 32)?,
                    memsz: u64_at(e, 40)?,
                },
            ))
        })?;
        let segments = phdrs.iter().filter(|(t, _)| *t == PT_LOAD).map(|(_, s)| *s).collect();
        let mut notes_at: Vec<(u64, u64)> =
            phdrs.iter().filter(|(t, _)| *t == PT_NOTE).map(|(_, s)| (s.offset, s.filesz)).collect();

        let raw = table(bytes, shoff, shnum, shentsize, 64, "section headers", |e| {
            Some((
                u32_at(e, 0)?,
                Section {
                    name: String::new(),
                    kind: u32_at(e, 4)?,
                    flags: u64_at(e, 8)?,
                    addr: u64_at(e, 16)?,
                    offset: u64_at(e, 24)?,
                    size: u64_at(e, 32)?,
                    link: u32_at(e, 40)?,
                },
            ))
        })?;
        let names = match raw.get(usize::from(shstrndx)) {
            Some((_, s)) if s.kind != SHT_NOBITS => range(bytes, s.offset, s.size).unwrap_or(&[]),
            _ => &[],
        };
        let sections: Vec<Section> = raw
            .into_iter()
            .map(|(name_off, mut s)| {
                let name = usize::try_from(name_off).ok().and_then(|o| cstr_at(names, o, MAX_NAME)).unwrap_or(&[]);
                s.name = String::from_utf8_lossy(name).into_owned();
                s
            })
            .collect();
        if notes_at.is_empty() {
            notes_at = sections.iter().filter(|s| s.kind == SHT_NOTE).map(|s| (s.offset, s.size)).collect();
        }
        Ok(Elf { bytes, entry, machine, sections, segments, notes_at })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// `e_entry`.
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// `e_machine` (62 = x86-64).
    pub fn machine(&self) -> u16 {
        self.machine
    }

    /// Every section header, in file order.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// The first section named `name`.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The bytes of section `name` in the file (`None` if there is no such
    /// section, it occupies no file bytes, or it lies outside the file).
    pub fn section_data(&self, name: &str) -> Option<&'a [u8]> {
        let s = self.section(name)?;
        self.data_of(s)
    }

    /// The bytes of section `s` in the file.
    pub fn data_of(&self, s: &Section) -> Option<&'a [u8]> {
        if s.kind == SHT_NOBITS {
            return None;
        }
        range(self.bytes, s.offset, s.size)
    }

    /// The loadable segments (`PT_LOAD`), in file order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The physical address the image puts virtual address `va` at, from
    /// the `PT_LOAD` headers (`p_vaddr` → `p_paddr`). Segments linked at
    /// virtual address 0 but loaded elsewhere (Linux's `.data..percpu`:
    /// its addresses are offsets, not addresses) are not used.
    pub fn static_pa(&self, va: u64) -> Option<u64> {
        self.segments
            .iter()
            .filter(|s| !(s.vaddr == 0 && s.paddr != 0))
            .find(|s| va >= s.vaddr && va - s.vaddr < s.memsz)
            .and_then(|s| s.paddr.checked_add(va - s.vaddr))
    }

    /// The notes of the `PT_NOTE` segments (or, without those, of the
    /// `SHT_NOTE` sections); a malformed note ends its segment's list.
    pub fn notes(&self) -> Vec<Note<'a>> {
        let mut out = Vec::new();
        for &(off, len) in &self.notes_at {
            let Some(mut rest) = range(self.bytes, off, len) else { continue };
            while out.len() < MAX_NOTES {
                let Some(note) = next_note(&mut rest) else { break };
                out.push(note);
            }
        }
        out
    }
}

/// Rounds `n` up to a multiple of 4.
fn align4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|v| v & !3)
}

/// The note at the start of `rest`, advancing it past the note.
fn next_note<'a>(rest: &mut &'a [u8]) -> Option<Note<'a>> {
    let namesz = usize::try_from(u32_at(rest, 0)?).ok()?;
    let descsz = usize::try_from(u32_at(rest, 4)?).ok()?;
    let kind = u32_at(rest, 8)?;
    let name_end = 12usize.checked_add(namesz)?;
    let name = rest.get(12..name_end)?;
    let name = name.strip_suffix(&[0]).unwrap_or(name);
    let desc_at = 12usize.checked_add(align4(namesz)?)?;
    let desc = rest.get(desc_at..desc_at.checked_add(descsz)?)?;
    let next = desc_at.checked_add(align4(descsz)?)?;
    *rest = rest.get(next..).unwrap_or(&[]);
    Some(Note { name, kind, desc })
}
