//! `.symtab` symbols, typed as `nm` types them, so an ELF's symbols and a
//! System.map look alike to their users.

use crate::bytes::{cstr_at, u16_at, u64_at};
use crate::elf::{Elf, Section, SHT_NOBITS};
use crate::error::Error;

/// Size of an `Elf64_Sym`.
const SYM_SIZE: usize = 24;
/// Longest symbol name kept (longer ones are skipped).
const MAX_NAME: usize = 512;
/// `SHN_UNDEF`, `SHN_ABS`, `SHN_COMMON`.
const SHN_UNDEF: u16 = 0;
const SHN_ABS: u16 = 0xfff1;
const SHN_COMMON: u16 = 0xfff2;
/// Symbol types.
const STT_OBJECT: u8 = 1;
const STT_SECTION: u8 = 3;
const STT_FILE: u8 = 4;
/// Symbol bindings.
const STB_LOCAL: u8 = 0;
const STB_WEAK: u8 = 2;

/// A symbol of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// Its value (the address, for a linked kernel).
    pub addr: u64,
    /// Its type letter as `nm` prints it (`T` text, `D` data, `R` read-only
    /// data, `B` BSS, `A` absolute, `W`/`V` weak, `U` undefined, `N`
    /// debugging, `?` in a section not loaded; lower case for local symbols).
    pub kind: char,
    /// Its name (lossy UTF-8).
    pub name: String,
}

impl<'a> Elf<'a> {
    /// The `.symtab` symbols with a name, in table order (section and file
    /// symbols are left out, as `nm` does).
    pub fn symbols(&self) -> Result<Vec<Symbol>, Error> {
        let symtab = self.section(".symtab").ok_or(Error::NoSection { name: ".symtab" })?;
        let data = self.data_of(symtab).ok_or(Error::Malformed { what: ".symtab lies outside the file" })?;
        let strtab = usize::try_from(symtab.link)
            .ok()
            .and_then(|i| self.sections().get(i))
            .and_then(|s| self.data_of(s))
            .ok_or(Error::Malformed { what: ".symtab's string table" })?;
        let mut out = Vec::with_capacity(data.len() / SYM_SIZE);
        for e in data.chunks_exact(SYM_SIZE) {
            let (Some(name_off), Some(&info), Some(shndx), Some(addr)) =
                (crate::bytes::u32_at(e, 0), e.get(4), u16_at(e, 6), u64_at(e, 8))
            else {
                continue;
            };
            let kind = info & 0xf;
            if kind == STT_SECTION || kind == STT_FILE {
                continue;
            }
            let Some(name) = usize::try_from(name_off).ok().and_then(|o| cstr_at(strtab, o, MAX_NAME)) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            let letter = nm_letter(info >> 4, kind, shndx, self.sections().get(usize::from(shndx)));
            out.push(Symbol { addr, kind: letter, name: String::from_utf8_lossy(name).into_owned() });
        }
        Ok(out)
    }
}

/// The `nm` letter of a symbol with binding `bind`, type `kind`, in section
/// `shndx` (`section` when that index names one).
fn nm_letter(bind: u8, kind: u8, shndx: u16, section: Option<&Section>) -> char {
    let c = match shndx {
        SHN_UNDEF => {
            return match (bind, kind) {
                (STB_WEAK, STT_OBJECT) => 'v',
                (STB_WEAK, _) => 'w',
                _ => 'U',
            }
        }
        SHN_COMMON => return 'C',
        _ if bind == STB_WEAK => return if kind == STT_OBJECT { 'V' } else { 'W' },
        SHN_ABS => 'A',
        _ => match section {
            None => '?',
            Some(s) if s.flags & Section::EXEC != 0 => 'T',
            Some(s) if s.flags & Section::ALLOC == 0 && s.name.starts_with(".debug") => 'N',
            Some(s) if s.flags & Section::ALLOC == 0 => '?',
            Some(s) if s.kind == SHT_NOBITS => 'B',
            Some(s) if s.flags & Section::WRITE != 0 => 'D',
            Some(_) => 'R',
        },
    };
    if bind == STB_LOCAL {
        c.to_ascii_lowercase()
    } else {
        c
    }
}
