//! Putting the guest image into RAM: a built-in guest, or a kernel file that
//! is an ELF64 executable (its PT_LOAD segments at their physical
//! addresses) or, failing the ELF magic, a flat binary at the guest ABI's
//! load address.

use crate::error::{ImageError, LoadError};
use crate::memory::GuestRam;
use crate::vm::Image;
use ukvmi_guest_abi::layout;

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
pub(crate) fn load(ram: &GuestRam, bytes: &[u8]) -> Result<u64, LoadError> {
    if bytes.is_empty() {
        return Err(LoadError::Empty);
    }
    if bytes.get(..4) != Some(b"\x7fELF") {
        ram.write(layout::LOAD_ADDR, bytes)
            .map_err(|_| LoadError::FlatTooLarge { len: bytes.len(), at: layout::LOAD_ADDR })?;
        return Ok(layout::LOAD_ADDR);
    }
    let bad = || LoadError::Malformed;
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err(LoadError::NotElf64);
    }
    if u16_at(bytes, 18) != Some(62) {
        return Err(LoadError::NotX86_64);
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
        let data = off.checked_add(filesz).and_then(|end| bytes.get(off..end)).ok_or(LoadError::SegmentPastEnd)?;
        ram.write(paddr, data).map_err(|_| LoadError::SegmentTooLarge { paddr })?;
        let zeros = memsz.saturating_sub(filesz as u64);
        if zeros > 0 {
            let z = vec![0u8; usize::try_from(zeros).map_err(|_| bad())?];
            ram.write(paddr + filesz as u64, &z).map_err(|_| LoadError::BssTooLarge { paddr })?;
        }
        loaded += 1;
    }
    if loaded == 0 {
        return Err(LoadError::NoLoadableSegment);
    }
    Ok(entry)
}

/// Loads `image` into RAM and returns the entry point.
pub(crate) fn load_image(ram: &GuestRam, image: &Image) -> crate::error::Result<u64> {
    match image {
        Image::Builtin(g) => {
            ram.write(g.load_addr, g.bytes).map_err(|_| ImageError::BuiltinTooLarge { name: g.name })?;
            Ok(g.entry)
        }
        Image::Kernel(path) => {
            let bytes = std::fs::read(path).map_err(|source| ImageError::Read { path: path.clone(), source })?;
            Ok(load(ram, &bytes).map_err(|source| ImageError::Kernel { path: path.clone(), source })?)
        }
        // `Vm::new` boots Linux itself (`linux::pvh`); never asked here.
        Image::Linux { kernel, .. } => {
            Err(ImageError::Linux { path: kernel.clone(), source: crate::error::LinuxError::NoPvhEntry }.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ukvmi_kimage::testing::{ehdr, phdr};

    fn ram() -> GuestRam {
        GuestRam::new(4 << 20).unwrap()
    }

    /// A little-endian x86-64 ELF64 header with `phnum` program headers
    /// right after it, entry 0x20_0000.
    fn elf(phnum: u16) -> Vec<u8> {
        ehdr(0x20_0000, phnum)
    }

    #[test]
    fn a_flat_binary_goes_to_the_load_address() {
        let ram = ram();
        assert_eq!(load(&ram, &[0xf4, 0xeb, 0xfe]), Ok(layout::LOAD_ADDR));
        let mut b = [0u8; 3];
        ram.read(layout::LOAD_ADDR, &mut b).unwrap();
        assert_eq!(b, [0xf4, 0xeb, 0xfe]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let ram = ram();
        assert_eq!(load(&ram, &[]), Err(LoadError::Empty));
        let big = vec![0x90; 4 << 20];
        assert_eq!(load(&ram, &big), Err(LoadError::FlatTooLarge { len: 4 << 20, at: layout::LOAD_ADDR }));
        let mut elf32 = elf(0);
        elf32[4] = 1;
        assert_eq!(load(&ram, &elf32), Err(LoadError::NotElf64));
        let mut arm = elf(0);
        arm[18] = 183;
        assert_eq!(load(&ram, &arm), Err(LoadError::NotX86_64));
        assert_eq!(load(&ram, &elf(0)[..30]), Err(LoadError::Malformed));
        assert_eq!(load(&ram, &elf(0)), Err(LoadError::NoLoadableSegment));
        // A PT_NOTE is not loaded either.
        let note = [elf(1), phdr(4, 0, 0x20_0000, 4, 4)].concat();
        assert_eq!(load(&ram, &note), Err(LoadError::NoLoadableSegment));
        let past_end = [elf(1), phdr(1, 100, 0x20_0000, 4096, 4096)].concat();
        assert_eq!(load(&ram, &past_end), Err(LoadError::SegmentPastEnd));
        let outside = [elf(1), phdr(1, 0, 8 << 20, 64, 64)].concat();
        assert_eq!(load(&ram, &outside), Err(LoadError::SegmentTooLarge { paddr: 8 << 20 }));
        let bss = [elf(1), phdr(1, 0, 0x3f_ff00, 64, 0x1000)].concat();
        assert_eq!(load(&ram, &bss), Err(LoadError::BssTooLarge { paddr: 0x3f_ff00 }));
    }

    #[test]
    fn an_elf_segment_is_loaded_with_its_bss_zeroed() {
        let ram = ram();
        ram.write(0x20_0000, &[0xaa; 32]).unwrap();
        let mut file = [elf(1), phdr(1, 120, 0x20_0000, 4, 16)].concat();
        file.extend([1, 2, 3, 4]);
        assert_eq!(load(&ram, &file), Ok(0x20_0000));
        let mut b = [0u8; 20];
        ram.read(0x20_0000, &mut b).unwrap();
        assert_eq!(b[..4], [1, 2, 3, 4]);
        assert_eq!(b[4..16], [0; 12]);
        assert_eq!(b[16..], [0xaa; 4]);
    }
}
