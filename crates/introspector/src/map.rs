//! Zero-copy guest memory: `UKVMI_VM_MAP_MEMORY` (a ukvmi extension to
//! KVMI v12) and the mapped view it gives, [`GuestMemoryMap`].
//!
//! The VMM answers the command with the RAM layout and, as `SCM_RIGHTS`
//! ancillary data on the reply, a descriptor of its guest-RAM memfd. The
//! library maps it and closes the descriptor; the mapping lives until the
//! [`GuestMemoryMap`] is dropped, whether or not the connection is still up.
//!
//! The descriptor is received by the transport ([`crate::transport`]) and
//! routed to the request it answers by the multiplexer ([`crate::mux`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use ukvmi_wire::{frame, map_flags, msg, read_zext, Gpa, IntoBytes, VmMapMemory, VmMapMemoryReply};

use crate::error::{Error, MapProblem, ProtocolError, Result};
use crate::vm::{command_name, expect_len, reply_data, Vm};

/// A mapping of guest physical memory, from `UKVMI_VM_MAP_MEMORY`.
///
/// It is a second view of the guest's RAM pages, shared with the running
/// guest: what the guest writes shows up here at once, and (on a writable
/// map) what is written here the guest sees at once.
///
/// **No references into guest memory.** The guest (and the VMM) change
/// these bytes concurrently, at any time, so handing out `&[u8]` over them
/// would break Rust's aliasing rules (a shared reference promises the bytes
/// do not change). Every access copies instead, with
/// `ptr::copy_nonoverlapping` between the mapping and the caller's buffer:
/// the copy is a snapshot that may tear if the guest writes the same bytes
/// meanwhile, exactly as a DMA read would. [`GuestMemoryMap::read_u64`] on
/// an 8-byte-aligned gpa is one 8-byte load and does not tear. Callers who
/// need the address can take [`GuestMemoryMap::as_ptr`].
///
/// **Page-access restrictions do not apply here.** `KVMI_VM_SET_PAGE_ACCESS`
/// restricts the *guest's* accesses (the VMM enforces them in KVM's
/// memslots); reads and writes through this map are the tool's own, like
/// `KVMI_VM_READ/WRITE_PHYSICAL`, raise no PF event and are never blocked.
///
/// Bounds are checked on every access ([`Error::OutOfRange`]); a write to a
/// read-only map is [`Error::ReadOnlyMap`]. The mapping is removed on drop;
/// it stays valid after the connection closes (the VMM's RAM lives on in
/// the memfd for as long as any mapping of it exists).
#[derive(Debug)]
pub struct GuestMemoryMap {
    base: NonNull<u8>,
    /// Bytes mapped (`VmMapMemoryReply::size`).
    len: usize,
    /// Guest physical address at `base`.
    gpa: u64,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value; no method
// hands out references into it, every access is a bounds-checked copy, and
// concurrent copies from several threads are no different from the guest's
// own concurrent accesses.
unsafe impl Send for GuestMemoryMap {}
// SAFETY: as for Send: `&self` methods only copy in and out of the mapping.
unsafe impl Sync for GuestMemoryMap {}

impl GuestMemoryMap {
    /// Maps `fd` as the reply `r` describes; `writable` is what was asked.
    fn new(fd: OwnedFd, r: &VmMapMemoryReply, writable: bool) -> Result<GuestMemoryMap> {
        let name = command_name(msg::UKVMI_VM_MAP_MEMORY);
        let proto = |problem: MapProblem| Error::from(ProtocolError::Map { command: name, problem });
        let len = usize::try_from(r.size).map_err(|_| proto(MapProblem::TooLarge(r.size)))?;
        if len == 0 || r.gpa.checked_add(r.size).is_none() {
            return Err(proto(MapProblem::UnusableRange { gpa: r.gpa, size: r.size }));
        }
        if (r.flags & map_flags::WRITABLE != 0) != writable || r.flags & !map_flags::ALL != 0 || r.padding != 0 {
            return Err(proto(MapProblem::Flags(r.flags)));
        }
        check_fd(fd.as_fd(), r.size, writable).map_err(proto)?;
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a fresh shared mapping of `len` bytes of a file checked to
        // be at least that long and sealed against shrinking; the kernel
        // picks the address; the result is checked below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(Error::Io { context: "mmap of guest RAM", source: io::Error::last_os_error() });
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| proto(MapProblem::Null))?;
        // `fd` closes here; the mapping keeps the memory.
        Ok(GuestMemoryMap { base, len, gpa: r.gpa, writable })
    }

    /// Bytes of guest RAM mapped.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether nothing is mapped (never: an empty reply is refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// First guest physical address mapped (0 for the ukvmi VMM).
    pub fn gpa(&self) -> Gpa {
        Gpa(self.gpa)
    }

    /// Whether [`GuestMemoryMap::write`] is allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Offset of `gpa..gpa+len` in the mapping, if it lies inside.
    fn offset(&self, gpa: u64, len: usize) -> Result<usize> {
        let out = || Error::OutOfRange {
            gpa,
            len: len as u64,
            start: self.gpa,
            end: self.gpa.saturating_add(self.len as u64),
        };
        let off = usize::try_from(gpa.checked_sub(self.gpa).ok_or_else(out)?).map_err(|_| out())?;
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(off),
            _ => Err(out()),
        }
    }

    /// Copies guest memory at `gpa` into `buf` (any length, across pages).
    pub fn read(&self, gpa: impl Into<Gpa>, buf: &mut [u8]) -> Result<()> {
        let gpa = gpa.into().raw();
        let off = self.offset(gpa, buf.len())?;
        // SAFETY: `off + buf.len() <= len` (checked), so the source lies in
        // our live mapping; `buf` is a distinct, writable Rust buffer. A raw
        // copy, not a slice, because the guest may write the source meanwhile.
        unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr().add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// The little-endian u64 at `gpa`. Aligned: one 8-byte load (no tearing).
    pub fn read_u64(&self, gpa: impl Into<Gpa>) -> Result<u64> {
        let gpa = gpa.into().raw();
        let off = self.offset(gpa, 8)?;
        if gpa % 8 == 0 && (self.base.as_ptr() as usize + off) % 8 == 0 {
            // SAFETY: in bounds (checked) and 8-byte aligned; a volatile load
            // is one access to memory another party may change.
            return Ok(u64::from_le(unsafe { std::ptr::read_volatile(self.base.as_ptr().add(off).cast::<u64>()) }));
        }
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Copies `data` into guest memory at `gpa` (writable maps only). The
    /// guest sees it at once; page-access restrictions do not apply.
    pub fn write(&self, gpa: impl Into<Gpa>, data: &[u8]) -> Result<()> {
        let gpa = gpa.into().raw();
        if !self.writable {
            return Err(Error::ReadOnlyMap);
        }
        let off = self.offset(gpa, data.len())?;
        // SAFETY: in bounds (checked), the mapping is PROT_WRITE (writable),
        // and `data` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(off), data.len()) };
        Ok(())
    }

    /// The address of [`GuestMemoryMap::gpa`] in this process.
    ///
    /// # Safety
    ///
    /// The pointer is valid for [`GuestMemoryMap::len`] bytes while `self`
    /// lives. The guest and the VMM change that memory at any time: do not
    /// make Rust references (`&[u8]`, `&mut`) from it; use raw, volatile or
    /// atomic accesses. Writing through it on a read-only map faults
    /// (SIGSEGV).
    pub unsafe fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }
}

impl Drop for GuestMemoryMap {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `new` created; nothing refers to it
        // any more (no references were ever handed out).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The descriptor must be sealed against shrinking (or the VMM could make
/// our accesses SIGBUS), long enough, and open as asked.
fn check_fd(fd: BorrowedFd<'_>, size: u64, writable: bool) -> std::result::Result<(), MapProblem> {
    // SAFETY: F_GET_SEALS and F_GETFL on a descriptor we own; no argument.
    let (seals, fl) =
        unsafe { (libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS), libc::fcntl(fd.as_raw_fd(), libc::F_GETFL)) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(MapProblem::NotSealed);
    }
    let mode = fl & libc::O_ACCMODE;
    if fl < 0 || (writable && mode != libc::O_RDWR) {
        return Err(MapProblem::AccessMode(mode));
    }
    let file = std::fs::File::from(fd.try_clone_to_owned().map_err(MapProblem::Dup)?);
    let flen = file.metadata().map_err(MapProblem::Fstat)?.len();
    if flen < size {
        return Err(MapProblem::TooShort { file: flen, announced: size });
    }
    Ok(())
}

impl Vm {
    /// `UKVMI_VM_MAP_MEMORY` (ukvmi extension): maps guest RAM read-only.
    ///
    /// The descriptor the VMM sends is open read-only, so nothing in this
    /// process can map it writable. Fails with `-KVM_EPERM` when the
    /// command is not allowed and `-KVM_EOPNOTSUPP` where the VMM cannot
    /// share its RAM (a kernel KVMI answers `-KVM_ENOSYS`).
    pub fn map_memory(&self) -> Result<GuestMemoryMap> {
        self.map_memory_flags(0)
    }

    /// `UKVMI_VM_MAP_MEMORY` with a writable mapping. Needs
    /// `KVMI_VM_WRITE_PHYSICAL` allowed as well (else `-KVM_EPERM`).
    /// Writes through it are the tool's own: page-access restrictions do
    /// not apply to them, as with `KVMI_VM_WRITE_PHYSICAL`.
    pub fn map_memory_writable(&self) -> Result<GuestMemoryMap> {
        self.map_memory_flags(map_flags::WRITABLE)
    }

    fn map_memory_flags(&self, flags: u32) -> Result<GuestMemoryMap> {
        let id = msg::UKVMI_VM_MAP_MEMORY;
        let name = command_name(id);
        let req = VmMapMemory { flags, padding: 0 };
        let seq = self.mux.next_seq();
        let bytes = frame(id, seq, &[req.as_bytes()]).map_err(|e| Error::Refused(format!("{name}: {e}")))?;
        self.mux.expect_fd(seq);
        let reply = self.mux.roundtrip(id, seq, name, &bytes);
        // Taken whatever happened: the slot closes (a later descriptor is
        // closed on arrival) and ours is dropped on every error path.
        let fd = self.mux.take_received_fds(seq).into_iter().next();
        let reply = reply?;
        let data = reply_data(name, &reply)?;
        expect_len(id, data, std::mem::size_of::<VmMapMemoryReply>())?;
        let r: VmMapMemoryReply = read_zext(data);
        let fd = fd.ok_or(ProtocolError::Map { command: name, problem: MapProblem::NoDescriptor })?;
        GuestMemoryMap::new(fd, &r, flags & map_flags::WRITABLE != 0)
    }
}

#[cfg(test)]
mod tests;
