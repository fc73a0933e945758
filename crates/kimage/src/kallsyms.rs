//! Symbols from a kernel image's own kallsyms tables, for a vmlinux whose
//! `.symtab` was stripped (a distribution kernel unpacked from its bzImage).
//!
//! `CONFIG_KALLSYMS` puts the kernel's symbols in `.rodata` as tables that
//! `scripts/kallsyms` writes, each label aligned to 8 bytes:
//!
//! * `kallsyms_token_table`: 256 NUL-terminated tokens; a character that
//!   symbols use stands for itself (token `'0'` is `"0"`), the others for
//!   the most frequent substrings;
//! * `kallsyms_token_index`: 256 `u16` offsets of those tokens;
//! * `kallsyms_num_syms` (`u32`) and right after it `kallsyms_names`: per
//!   symbol a length (one byte, or two when the first has bit 7 set) and
//!   that many token numbers; the expanded text starts with the `nm` type
//!   letter;
//! * `kallsyms_markers`: a `u32` per 256 symbols, the offset of that
//!   symbol's entry in `kallsyms_names`;
//! * the addresses: `kallsyms_offsets` (`i32` each) and
//!   `kallsyms_relative_base` (`u64`), before `kallsyms_num_syms` (up to
//!   6.1) or after the token index (later kernels); or, without
//!   `CONFIG_KALLSYMS_BASE_RELATIVE`, `kallsyms_addresses` (`u64` each)
//!   before `kallsyms_num_syms`.
//!
//! No symbol names the tables, so they are found by their shape: the token
//! table by the digits' tokens and the index that must follow it, the name
//! list by a count whose entries end where markers agree with them, the
//! addresses by being sorted. Every guess is checked against the next
//! table; the image can lie, so every read is bounded.

use crate::bytes::{u16_at, u32_at, u64_at};
use crate::elf::Elf;
use crate::error::Error;
use crate::symbols::Symbol;

/// The most symbols believed (a large distribution kernel has ~100,000).
pub const MAX_KALLSYMS: usize = 4 << 20;
/// How far before the token table `kallsyms_num_syms` is looked for.
const MAX_NAMES_SPAN: usize = 64 << 20;
/// The longest expanded name kept (the kernel's `KSYM_NAME_LEN` is 512).
const MAX_NAME: usize = 512;
/// How many name entries all guesses together may read (a real kernel's
/// are read about twice; a file built to look like many counts stops here).
const MAX_WORK: usize = 32 << 20;
/// How many token-table candidates are tried.
const MAX_TABLE_CANDIDATES: usize = 64;
/// How many places holding the digits' tokens are looked at (a kernel
/// image has a handful).
const MAX_DIGIT_SITES: usize = 4096;
/// The longest token (the kernel's are a few bytes).
const MAX_TOKEN: usize = 255;
/// The tokens of `'0'..='9'`, in a row: where the token table is looked for.
const DIGITS: &[u8; 20] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
/// `-(1 << 63)`'s top: a kernel-half address.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

/// The token table: each token's bytes.
struct Tokens<'a> {
    tokens: Vec<&'a [u8]>,
    /// Offset of the token table in the searched bytes.
    start: usize,
    /// Offset just past the token index.
    index_end: usize,
}

/// Where `kallsyms_names` was found and what it holds.
struct Names {
    /// Offset of `kallsyms_num_syms`.
    count_at: usize,
    /// Each symbol's token numbers, as (offset, length) in the bytes.
    entries: Vec<(usize, usize)>,
}

impl<'a> Elf<'a> {
    /// The symbols of the kernel's kallsyms tables (in its `.rodata`, else
    /// anywhere in the file), in their order (by address).
    ///
    /// # Errors
    ///
    /// [`Error::NoKallsyms`] when no tables are found, or they disagree.
    pub fn kallsyms(&self) -> Result<Vec<Symbol>, Error> {
        match self.section_data(".rodata").map(kallsyms) {
            Some(Ok(syms)) => Ok(syms),
            _ => kallsyms(self.bytes()),
        }
    }
}

/// The symbols of the kallsyms tables found in `data` (a kernel's
/// `.rodata`, or a whole image), in their order (by address).
///
/// # Errors
///
/// [`Error::NoKallsyms`] when no tables are found, or they disagree.
pub fn kallsyms(data: &[u8]) -> Result<Vec<Symbol>, Error> {
    let mut last = Error::NoKallsyms { why: "no token table (the tokens of the digits in a row)" };
    let mut work = MAX_WORK;
    for tokens in token_tables(data).take(MAX_TABLE_CANDIDATES) {
        let Some(names) = find_names(data, &tokens, &mut work) else {
            last = Error::NoKallsyms { why: "a token table, but no symbol names before it that its markers confirm" };
            continue;
        };
        let Some(addrs) = find_addresses(data, &tokens, &names) else {
            last = Error::NoKallsyms { why: "symbol names, but no sorted address table next to them" };
            continue;
        };
        return Ok(symbols(data, &tokens, &names, &addrs));
    }
    Err(last)
}

/// Every place the token table may start, each with its index checked.
fn token_tables(data: &[u8]) -> impl Iterator<Item = Tokens<'_>> + '_ {
    let mut from = 0usize;
    let mut sites = 0usize;
    std::iter::from_fn(move || loop {
        sites += 1;
        if sites > MAX_DIGIT_SITES {
            return None;
        }
        let at = find(data, from, DIGITS)?;
        from = at.checked_add(1)?;
        if let Some(t) = token_table_with(data, at) {
            return Some(t);
        }
    })
}

/// The token table whose token 48 (`'0'`) is at `digits`, if its index
/// follows it.
fn token_table_with(data: &[u8], digits: usize) -> Option<Tokens<'_>> {
    // Back over the 48 tokens before '0' (no token is empty).
    let mut start = digits;
    for _ in 0..usize::from(b'0') {
        if start == 0 || *data.get(start.checked_sub(1)?)? != 0 {
            return None;
        }
        let end = start - 1;
        let lo = end.saturating_sub(MAX_TOKEN + 1);
        let nul = match data.get(lo..end)?.iter().rposition(|&c| c == 0) {
            Some(p) => lo + p + 1,
            None if lo == 0 => 0,
            None => return None,
        };
        if nul == end || end - nul > MAX_TOKEN {
            return None;
        }
        start = nul;
    }
    let mut tokens = Vec::with_capacity(256);
    let mut offsets = Vec::with_capacity(256);
    let mut at = start;
    for _ in 0..256 {
        let rest = data.get(at..)?;
        let len = rest.iter().take(MAX_TOKEN + 1).position(|&c| c == 0)?;
        if len == 0 {
            return None;
        }
        offsets.push(u16::try_from(at - start).ok()?);
        tokens.push(rest.get(..len)?);
        at = at.checked_add(len + 1)?;
    }
    // The index follows, 2-aligned, within the 8-byte alignment of its label.
    let first = at.checked_add(1)? & !1;
    (first..at + 8).step_by(2).find_map(|ix| {
        let ok = offsets.iter().enumerate().all(|(k, &o)| u16_at(data, ix + 2 * k) == Some(o));
        ok.then_some(Tokens { tokens: tokens.clone(), start, index_end: ix + 512 })
    })
}

/// The first `needle` in `data` at or after `from`.
fn find(data: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let hay = data.get(from..)?;
    let first = *needle.first()?;
    let mut i = 0usize;
    while let Some(rel) = hay.get(i..)?.iter().position(|&c| c == first) {
        let at = i + rel;
        if hay.get(at..at.checked_add(needle.len())?) == Some(needle) {
            return Some(from + at);
        }
        i = at + 1;
    }
    None
}

/// `kallsyms_names`: a count before the token table (8-aligned, with a zero
/// `u32` of padding after it) whose entries, read from just after it, are
/// followed (8-aligned) by markers that agree with them.
fn find_names(data: &[u8], tokens: &Tokens, work: &mut usize) -> Option<Names> {
    let lowest = tokens.start.saturating_sub(MAX_NAMES_SPAN);
    let mut at = tokens.start.checked_sub(8)? & !7;
    while at >= lowest {
        if let (Some(n), Some(0)) = (u32_at(data, at), u32_at(data, at + 4)) {
            let n = usize::try_from(n).ok()?;
            if (1..=MAX_KALLSYMS).contains(&n) {
                if let Some(names) = names_at(data, at, n, tokens.start, work) {
                    return Some(names);
                }
            }
        }
        if *work == 0 {
            return None;
        }
        at = at.checked_sub(8)?;
    }
    None
}

/// The `n` name entries after the count at `count_at`, if they end before
/// `limit` and the markers after them agree; each entry read costs a unit
/// of `work`.
fn names_at(data: &[u8], count_at: usize, n: usize, limit: usize, work: &mut usize) -> Option<Names> {
    let base = count_at + 8;
    let mut entries = Vec::with_capacity(n.min(1 << 16));
    let mut marks = Vec::with_capacity(n / 256 + 1);
    let mut at = base;
    for k in 0..n {
        *work = work.checked_sub(1)?;
        if k % 256 == 0 {
            marks.push(u32::try_from(at - base).ok()?);
        }
        let b0 = *data.get(at)?;
        let (len, head) = if b0 & 0x80 != 0 {
            (usize::from(b0 & 0x7f) | (usize::from(*data.get(at + 1)?) << 7), 2)
        } else {
            (usize::from(b0), 1)
        };
        if len == 0 || at + head + len > limit {
            return None;
        }
        entries.push((at + head, len));
        at += head + len;
    }
    let markers = (at + 7) & !7;
    let agree = marks.iter().enumerate().all(|(k, &m)| u32_at(data, markers + 4 * k) == Some(m));
    agree.then_some(Names { count_at, entries })
}

/// The symbols' addresses: base-relative offsets before the count or after
/// the token index, or absolute addresses before the count; the first
/// layout that gives sorted kernel addresses.
fn find_addresses(data: &[u8], tokens: &Tokens, names: &Names) -> Option<Vec<u64>> {
    let n = names.entries.len();
    let four = n.checked_mul(4)?.checked_add(7)? & !7;
    let eight = n.checked_mul(8)?;
    let before = names.count_at.checked_sub(8).and_then(|rb| Some((rb.checked_sub(four)?, rb)));
    let after_index = (tokens.index_end + 7) & !7;
    let after = Some((after_index, after_index + four));
    for (offsets, base) in [before, after].into_iter().flatten() {
        if let Some(a) = u64_at(data, base).and_then(|b| relative(data, offsets, n, b)) {
            return Some(a);
        }
    }
    let start = names.count_at.checked_sub(eight)?;
    let addrs: Vec<u64> = (0..n).map(|k| u64_at(data, start + 8 * k)).collect::<Option<_>>()?;
    plausible(&addrs).then_some(addrs)
}

/// The addresses of `n` base-relative offsets at `at` from `base`: with
/// `CONFIG_KALLSYMS_ABSOLUTE_PERCPU` (x86-64 SMP) a negative offset `o`
/// means `base - 1 - o` and others are absolute (per-cpu symbols); else
/// each is `base + o`.
fn relative(data: &[u8], at: usize, n: usize, base: u64) -> Option<Vec<u64>> {
    if base < KERNEL_HALF {
        return None;
    }
    let raw: Vec<u32> = (0..n).map(|k| u32_at(data, at + 4 * k)).collect::<Option<_>>()?;
    let percpu = raw.iter().any(|&o| o & 0x8000_0000 != 0);
    let addrs: Vec<u64> = raw
        .iter()
        .map(|&o| match percpu {
            true if o & 0x8000_0000 != 0 => base.wrapping_sub(1).wrapping_sub(i64::from(o as i32) as u64),
            true => u64::from(o),
            false => base.wrapping_add(u64::from(o)),
        })
        .collect();
    plausible(&addrs).then_some(addrs)
}

/// Sorted, and ending in the kernel half.
fn plausible(addrs: &[u64]) -> bool {
    addrs.windows(2).all(|w| matches!(w, [a, b] if a <= b)) && addrs.last().is_some_and(|&a| a >= KERNEL_HALF)
}

/// The symbols: each entry's tokens expanded, its first byte the type.
fn symbols(data: &[u8], tokens: &Tokens, names: &Names, addrs: &[u64]) -> Vec<Symbol> {
    let mut out = Vec::with_capacity(names.entries.len());
    let mut text = Vec::with_capacity(MAX_NAME);
    for (&(at, len), &addr) in names.entries.iter().zip(addrs) {
        text.clear();
        let Some(entry) = data.get(at..at + len) else { continue };
        for &t in entry {
            if let Some(tok) = tokens.tokens.get(usize::from(t)) {
                text.extend_from_slice(tok);
            }
            if text.len() > MAX_NAME + 1 {
                break;
            }
        }
        let (Some((&kind, name)), true) = (text.split_first(), text.len() <= MAX_NAME + 1) else { continue };
        if name.is_empty() || !kind.is_ascii_alphabetic() {
            continue;
        }
        out.push(Symbol { addr, kind: char::from(kind), name: String::from_utf8_lossy(name).into_owned() });
    }
    out
}

#[cfg(test)]
mod tests;
