//! Loading `--kernel` images: an ELF64 executable (its PT_LOAD segments at
//! their physical addresses) or, failing the ELF magic, a flat binary at
//! the guest ABI's load address.
//! Also puts a built-in guest or a `--kernel` file into RAM (`load_image`).

use crate::error::Error;
use crate::memory::GuestRam;
use crate::vm::Image;
use ukvmi_guests::layout;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Loads `bytes` and returns the entry point.
pub(crate) fn load(ram: &GuestRam, bytes: &[u8]) -> Result<u64, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    if bytes.get(..4) != Some(b"\x7fELF") {
        ram.write(layout::LOAD_ADDR, bytes)
            .map_err(|_| format!("{} bytes do not fit in guest RAM at {:#x}", bytes.len(), layout::LOAD_ADDR))?;
        return Ok(layout::LOAD_ADDR);
    }
    let bad = || "truncated or malformed ELF header".to_string();
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err("only little-endian ELF64 is supported".into());
    }
    if u16_at(bytes, 18) != Some(62) {
        return Err("not an x86-64 ELF".into());
    }
    let entry = u64_at(bytes, 24).ok_or_else(bad)?;
    let phoff = usize::try_from(u64_at(bytes, 32).ok_or_else(bad)?).map_err(|_| bad())?;
    let phentsize = usize::from(u16_at(bytes, 54).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(bytes, 56).ok_or_else(bad)?);
    let mut loaded = 0;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize).ok_or_else(bad)?).ok_or_else(bad)?;
        if u32_at(bytes, ph) != Some(1) {
            continue; // not PT_LOAD
        }
        let off = usize::try_from(u64_at(bytes, ph + 8).ok_or_else(bad)?).map_err(|_| bad())?;
        let paddr = u64_at(bytes, ph + 24).ok_or_else(bad)?;
        let filesz = usize::try_from(u64_at(bytes, ph + 32).ok_or_else(bad)?).map_err(|_| bad())?;
        let memsz = u64_at(bytes, ph + 40).ok_or_else(bad)?;
        let data = off
            .checked_add(filesz)
            .and_then(|end| bytes.get(off..end))
            .ok_or("segment data past the end of the file")?;
        ram.write(paddr, data).map_err(|_| format!("segment at {paddr:#x} does not fit in guest RAM"))?;
        let zeros = memsz.saturating_sub(filesz as u64);
        if zeros > 0 {
            let z = vec![0u8; usize::try_from(zeros).map_err(|_| bad())?];
            ram.write(paddr + filesz as u64, &z).map_err(|_| format!("bss at {paddr:#x} does not fit in guest RAM"))?;
        }
        loaded += 1;
    }
    if loaded == 0 {
        return Err("no loadable segment".into());
    }
    Ok(entry)
}

/// Loads `image` into RAM and returns the entry point.
pub(crate) fn load_image(ram: &GuestRam, image: &Image) -> crate::error::Result<u64> {
    match image {
        Image::Builtin(g) => {
            ram.write(g.load_addr, g.image)
                .map_err(|_| Error::Config(format!("guest {} does not fit in RAM", g.name)))?;
            Ok(g.entry)
        }
        Image::Kernel(path) => {
            let bytes = std::fs::read(path)
                .map_err(|e| Error::Config(format!("cannot read kernel {}: {e}", path.display())))?;
            load(ram, &bytes).map_err(|e| Error::Config(format!("kernel {}: {e}", path.display())))
        }
    }
}
