//! Reads a `ukvmi run` child's guest RAM from outside, through its memfd,
//! with no KVMI connection: a benchmark can then count the guest's progress
//! while no introspector is attached, and without adding a single command
//! to the connection while one is.
//!
//! The VMM keeps guest RAM in a memfd named `ukvmi-guest-ram` (mode 0400,
//! gpa 0 at offset 0). Its owner (this benchmark runs the VMM as a child,
//! with the same uid) can open it read-only through `/proc/PID/fd/N` and
//! map it shared, so the guest's stores are seen as they happen.

use std::os::fd::AsRawFd;
use std::path::Path;

/// A read-only shared mapping of a VMM's guest RAM, unmapped on drop.
#[derive(Debug)]
pub struct GuestRam {
    ptr: *const u8,
    len: usize,
}

impl GuestRam {
    /// Maps the guest RAM of the `ukvmi run` process `pid`.
    pub fn of_process(pid: u32) -> Result<GuestRam, String> {
        let fds = Path::new("/proc").join(pid.to_string()).join("fd");
        let entries = std::fs::read_dir(&fds).map_err(|e| format!("{}: {e}", fds.display()))?;
        for entry in entries.flatten() {
            let is_ram = std::fs::read_link(entry.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:ukvmi-guest-ram"));
            if !is_ram {
                continue;
            }
            let file = std::fs::File::open(entry.path()).map_err(|e| format!("{}: {e}", entry.path().display()))?;
            let len = usize::try_from(file.metadata().map_err(|e| e.to_string())?.len()).map_err(|e| e.to_string())?;
            // SAFETY: a fresh read-only shared mapping of the whole file,
            // chosen by the kernel; nothing in this process aliases it. The
            // memfd is sealed against shrinking, so the mapping stays
            // backed; the fd may close once the mapping exists.
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0)
            };
            if p == libc::MAP_FAILED {
                return Err(format!("mmap of guest RAM: {}", std::io::Error::last_os_error()));
            }
            return Ok(GuestRam { ptr: p.cast(), len });
        }
        Err(format!("process {pid} has no ukvmi-guest-ram memfd"))
    }

    /// The u64 at guest-physical `gpa`, as the guest last stored it.
    pub fn u64_at(&self, gpa: u64) -> u64 {
        let off = usize::try_from(gpa).expect("gpa fits usize");
        assert!(off.checked_add(8).is_some_and(|end| end <= self.len), "gpa {gpa:#x} beyond guest RAM");
        assert_eq!(gpa % 8, 0, "an aligned u64 (one load, never torn)");
        // SAFETY: off..off+8 lies inside the page-aligned mapping and is
        // 8-byte aligned (checked above); the guest writes it concurrently,
        // hence a volatile read (one aligned load on x86; any value is a
        // valid u64).
        u64::from_le(unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u64>()) })
    }

    /// `len` bytes at guest-physical `gpa`.
    pub fn bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
        let off = usize::try_from(gpa).expect("gpa fits usize");
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len), "gpa {gpa:#x}+{len} beyond guest RAM");
        // SAFETY: off..off+len lies inside the mapping (checked above).
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }.to_vec()
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `of_process`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast_mut().cast(), self.len) };
    }
}
