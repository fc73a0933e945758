#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]
//! Reads kernel image files (vmlinux, bzImage) without trusting them.
//!
//! The VMM (what image is it, where does it start), the monitor (symbols,
//! the `.BTF` section, static virtual → physical addresses) and the CLI all
//! need the same few facts from a kernel file. This crate gives them, from
//! bytes, with every read bounds-checked: a truncated or lying file gives an
//! [`Error`] or less information, never a panic.
//!
//! * [`detect`]: a Linux ELF (and its PVH entry), a bzImage (its boot
//!   protocol header), another ELF64, or a flat binary.
//! * [`Elf`]: sections by name, `.symtab` symbols as `(address, nm type
//!   letter, name)` ([`Symbol`]), `PT_LOAD` segments ([`Segment`]) and the
//!   static address translation they give ([`Elf::static_pa`]), notes.
//! * [`kallsyms`] / [`Elf::kallsyms`]: the symbols of a stripped kernel
//!   (no `.symtab`) from its own kallsyms tables.

mod bytes;
mod bzimage;
mod elf;
mod error;
mod kallsyms;
mod symbols;
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod testing;

pub use bzimage::BzImage;
pub use elf::{Elf, Note, Section, Segment};
pub use error::Error;
pub use kallsyms::{kallsyms, MAX_KALLSYMS};
pub use symbols::Symbol;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the type of the `Xen` note that holds a
/// kernel's PVH entry point (a physical address).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What a kernel file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// An x86-64 ELF vmlinux: it carries a note named `Linux`.
    LinuxElf {
        /// The PVH entry (`Xen` note of type 18), if the kernel was built
        /// with `CONFIG_PVH`.
        pvh_entry: Option<u64>,
    },
    /// A bzImage: the boot protocol's `HdrS` signature at 0x202.
    BzImage(BzImage),
    /// Another well-formed 64-bit ELF file.
    Elf64,
    /// Anything else: loaded as a flat binary.
    Flat,
}

/// What `bytes` hold. A file that starts like an ELF but does not parse is
/// [`Kind::Flat`]: nothing of it can be trusted.
pub fn detect(bytes: &[u8]) -> Kind {
    if bytes.starts_with(elf::MAGIC) {
        let Ok(elf) = Elf::parse(bytes) else { return Kind::Flat };
        let notes = elf.notes();
        if notes.iter().any(|n| n.name == b"Linux") {
            let pvh_entry =
                notes.iter().find(|n| n.name == b"Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY).and_then(|n| {
                    match n.desc.len() {
                        4 => bytes::u32_at(n.desc, 0).map(u64::from),
                        8 => bytes::u64_at(n.desc, 0),
                        _ => None,
                    }
                });
            return Kind::LinuxElf { pvh_entry };
        }
        return Kind::Elf64;
    }
    match BzImage::parse(bytes) {
        Some(b) => Kind::BzImage(b),
        None => Kind::Flat,
    }
}

#[cfg(test)]
mod tests;
