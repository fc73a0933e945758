//! Guest RAM: one memfd (so a later extension can share it with the tool),
//! mapped into the VMM with vm-memory and registered as KVM memslot 0.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::fd::FromRawFd;
use ukvmi_endpoint::{BackendError, BackendResult};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The guest's RAM, from gpa 0.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// Allocates `size` bytes of RAM in a memfd.
    pub fn new(size: u64) -> Result<GuestRam> {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it
        // returns a new fd or -1, checked below.
        let fd = unsafe { libc::memfd_create(c"ukvmi-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::os("memfd_create for guest RAM", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(|e| Error::os("sizing guest RAM", e))?;
        let len = usize::try_from(size).map_err(|_| Error::Config(format!("memory size {size} too large")))?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), len, Some(FileOffset::new(file, 0)))])
            .map_err(|e| Error::Config(format!("mapping guest RAM: {e}")))?;
        Ok(GuestRam { mem, size })
    }

    /// RAM size in bytes (also the first gpa past RAM).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of gpa 0, for the memslot.
    pub fn host_base(&self) -> Result<u64> {
        self.mem
            .get_host_address(GuestAddress(0))
            .map(|p| p as u64)
            .map_err(|e| Error::Config(format!("guest RAM has no host mapping: {e}")))
    }

    /// Reads guest memory; unbacked addresses are `NotFound`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> BackendResult<()> {
        self.check(gpa, buf.len())?;
        self.mem.read_slice(buf, GuestAddress(gpa)).map_err(|_| BackendError::NotFound)
    }

    /// Writes guest memory; unbacked addresses are `NotFound`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> BackendResult<()> {
        self.check(gpa, data.len())?;
        self.mem.write_slice(data, GuestAddress(gpa)).map_err(|_| BackendError::NotFound)
    }

    /// Writes a little-endian u64.
    pub fn write_u64(&self, gpa: u64, v: u64) -> BackendResult<()> {
        self.write(gpa, &v.to_le_bytes())
    }

    fn check(&self, gpa: u64, len: usize) -> BackendResult<()> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BackendError::NotFound),
        }
    }
}
