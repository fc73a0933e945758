//! Kernel symbol maps in System.map format (`ADDRESS TYPE NAME` per line),
//! as the demo guest's build and Linux's write them, or from an ELF's symbols.

use std::collections::HashMap;

/// A parsed symbol map: name → address, and address → name.
#[derive(Debug, Clone, Default)]
pub struct SymbolMap {
    by_addr: Vec<(u64, String)>,
    by_name: HashMap<String, u64>,
}

/// A line of a map that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("symbol map line {line}: {reason}: `{text}`")]
pub struct MapError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: &'static str,
    /// The line as found.
    pub text: String,
}

impl SymbolMap {
    /// Parses System.map text. Blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<SymbolMap, MapError> {
        let mut by_addr = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let err = |reason| MapError { line: i + 1, reason, text: line.to_string() };
            let mut parts = l.split_whitespace();
            let (Some(addr), Some(_kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(err("expected `ADDRESS TYPE NAME`"));
            };
            let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).map_err(|_| err("bad hex address"))?;
            by_addr.push((addr, name.to_string()));
        }
        by_addr.sort();
        let by_name = by_addr.iter().map(|(a, n)| (n.clone(), *a)).collect();
        Ok(SymbolMap { by_addr, by_name })
    }

    /// A map of `(address, name)` pairs (an ELF's symbols, say).
    pub fn from_symbols(symbols: impl IntoIterator<Item = (u64, String)>) -> SymbolMap {
        let mut by_addr: Vec<(u64, String)> = symbols.into_iter().collect();
        by_addr.sort();
        let by_name = by_addr.iter().map(|(a, n)| (n.clone(), *a)).collect();
        SymbolMap { by_addr, by_name }
    }

    /// The address of `name`.
    pub fn addr(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    /// The bytes from `addr` to the next symbol above it (how far the
    /// object that starts there extends), if there is one.
    pub fn extent(&self, addr: u64) -> Option<u64> {
        let i = self.by_addr.partition_point(|(a, _)| *a <= addr);
        self.by_addr.get(i).map(|(a, _)| a - addr)
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// Every symbol, as `(name, address)`, by address.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.by_addr.iter().map(|(a, n)| (n.as_str(), *a))
    }

    /// The symbol at or below `addr` and the offset from it, if `addr` is
    /// within 64 KiB of it.
    pub fn symbolize(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.by_addr.partition_point(|(a, _)| *a <= addr);
        let (a, n) = self.by_addr.get(i.checked_sub(1)?)?;
        let off = addr - a;
        (off < 0x10000).then_some((n.as_str(), off))
    }

    /// `name+0x12` for an address, or the bare hex address.
    pub fn describe(&self, addr: u64) -> String {
        match self.symbolize(addr) {
            Some((n, 0)) => n.to_string(),
            Some((n, off)) => format!("{n}+{off:#x}"),
            None => format!("{addr:#x}"),
        }
    }

    /// Resolves `text`: a hex (`0x…`) or decimal number, a symbol name, or
    /// `symbol+offset`.
    pub fn resolve(&self, text: &str) -> Option<u64> {
        if let Some(v) = parse_number(text) {
            return Some(v);
        }
        let (name, off) = match text.split_once('+') {
            Some((n, o)) => (n, parse_number(o)?),
            None => (text, 0),
        };
        self.addr(name)?.checked_add(off)
    }
}

/// Parses `0x…` hex or plain decimal (underscores allowed).
pub fn parse_number(text: &str) -> Option<u64> {
    let t: String = text.chars().filter(|&c| c != '_').collect();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        t.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_resolves_and_symbolizes() {
        let m = SymbolMap::parse(
            "0000000000100000 T _start\n# c\n\n0000000000100040 t syscall_entry\n0000000000102000 D syscall_table\n",
        )
        .unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m.addr("syscall_entry"), Some(0x100040));
        assert_eq!(m.resolve("syscall_table+0x8"), Some(0x102008));
        assert_eq!(m.resolve("0x10"), Some(16));
        assert_eq!(m.resolve("1_000"), Some(1000));
        assert_eq!(m.resolve("nope"), None);
        assert_eq!(m.describe(0x100042), "syscall_entry+0x2");
        assert_eq!(m.describe(0x100000), "_start");
        assert_eq!(m.describe(0x50), "0x50");
        assert_eq!(m.extent(0x100040), Some(0x1fc0), "up to syscall_table");
        assert_eq!(m.extent(0x100041), Some(0x1fbf));
        assert_eq!(m.extent(0x102000), None, "nothing above the last symbol");
        let e = SymbolMap::parse("zz T x").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(SymbolMap::parse("100").is_err());
    }
}
