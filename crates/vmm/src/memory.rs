//! Guest RAM: one memfd, mapped into the VMM with vm-memory and registered
//! as KVM memslot 0, and handed to the tool by `UKVMI_VM_MAP_MEMORY`.
//!
//! The memfd is sized once and then sealed with `F_SEAL_SHRINK |
//! F_SEAL_GROW | F_SEAL_SEAL`: a tool holding a writable descriptor cannot
//! truncate it under the VMM (whose accesses past the end would SIGBUS)
//! nor add seals of its own (`F_SEAL_FUTURE_WRITE` would stop the VMM from
//! mapping it again). Its mode is 0400, so a tool of another uid cannot
//! reopen a read-only descriptor read-write through `/proc/self/fd`; the
//! VMM's own read-write descriptor and mappings are unaffected.

use crate::error::{Error, Result, SetupError};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use ukvmi_endpoint::{BackendError, BackendResult};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The guest's RAM, from gpa 0.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
    /// The memfd (a duplicate of the one vm-memory maps), read-write.
    file: File,
}

impl GuestRam {
    /// Allocates `size` bytes of RAM in a memfd.
    pub fn new(size: u64) -> Result<GuestRam> {
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it
        // returns a new fd or -1, checked below.
        let fd = unsafe { libc::memfd_create(c"ukvmi-guest-ram".as_ptr(), flags) };
        if fd < 0 {
            return Err(Error::os("memfd_create for guest RAM", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(|e| Error::os("sizing guest RAM", e))?;
        seal(&file)?;
        let len = usize::try_from(size).map_err(|_| SetupError::RamTooLarge { bytes: size })?;
        let mapped = file.try_clone().map_err(|e| Error::os("duplicating the guest RAM memfd", e))?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), len, Some(FileOffset::new(mapped, 0)))])
            .map_err(SetupError::MapRam)?;
        Ok(GuestRam { mem, size, file })
    }

    /// The vm-memory view of RAM (for linux-loader, which writes into it).
    pub(crate) fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The guest-RAM memfd (read-write, sealed against resizing, mode 0400).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
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
            .map_err(|e| Error::Setup(SetupError::NoHostMapping(e)))
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

/// Seals a sized RAM memfd against resizing and further seals, and makes it
/// owner-read-only (see the module docs).
fn seal(file: &File) -> Result<()> {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int argument; `file` is a valid memfd
    // created with MFD_ALLOW_SEALING.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Error::os("sealing the guest RAM memfd", std::io::Error::last_os_error()));
    }
    // SAFETY: fchmod on a valid descriptor we own; no pointers.
    if unsafe { libc::fchmod(file.as_raw_fd(), 0o400) } < 0 {
        return Err(Error::os("chmod of the guest RAM memfd", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_memfd_is_sealed_and_owner_read_only() {
        let ram = GuestRam::new(1 << 20).unwrap();
        // SAFETY: F_GET_SEALS on a valid descriptor, no argument.
        let seals = unsafe { libc::fcntl(ram.fd().as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL);
        let f = ram.file.try_clone().unwrap();
        assert!(f.set_len(4096).is_err(), "shrinking must fail");
        assert!(f.set_len(2 << 20).is_err(), "growing must fail");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o400);
        // The VMM's own accesses still work.
        ram.write_u64(0x1000, 0xfeed).unwrap();
        let mut b = [0u8; 8];
        ram.read(0x1000, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0xfeed);
    }
}
