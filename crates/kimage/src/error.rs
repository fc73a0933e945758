//! Why a kernel file could not be read.

use std::fmt;

/// A kernel file that could not be read as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// Not a 64-bit little-endian ELF file.
    NotElf64,
    /// A structure the file describes lies (partly) outside it, or is
    /// malformed.
    Malformed {
        /// Which structure.
        what: &'static str,
    },
    /// The file has no section of that name.
    NoSection {
        /// The section looked for.
        name: &'static str,
    },
    /// No kallsyms tables were found (or they did not agree).
    NoKallsyms {
        /// What was missing.
        why: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotElf64 => write!(f, "not a 64-bit little-endian ELF file"),
            Error::Malformed { what } => write!(f, "malformed ELF file: {what}"),
            Error::NoSection { name } => write!(f, "the ELF file has no {name} section"),
            Error::NoKallsyms { why } => write!(f, "no kallsyms tables in the kernel image: {why}"),
        }
    }
}

impl std::error::Error for Error {}
