//! Zero-copy guest memory: `UKVMI_VM_MAP_MEMORY` (a ukvmi extension to
//! KVMI v12) and the mapped view it gives, [`GuestMemoryMap`].
//!
//! The VMM answers the command with the RAM layout and, as `SCM_RIGHTS`
//! ancillary data on the reply, a descriptor of its guest-RAM memfd. The
//! library maps it and closes the descriptor; the mapping lives until the
//! [`GuestMemoryMap`] is dropped, whether or not the connection is still up.
//!
//! This module also holds the socket reading that accepts descriptors:
//! every message is read with `recvmsg`, and descriptors that arrive are
//! either kept for the `UKVMI_VM_MAP_MEMORY` reply they came with or closed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;

use ukvmi_wire::{frame, map_flags, msg, read_zext, IntoBytes, VmMapMemory, VmMapMemoryReply};

use crate::error::{Error, Result};
use crate::vm::{command_name, expect_len, Vm};

/// Most descriptors taken from one `recvmsg`; more are closed by the kernel
/// (`MSG_CTRUNC`). KVMI sends at most one per message.
const MAX_FDS: usize = 8;

/// One `recvmsg` into `buf` (at least one byte unless `buf` is empty; as
/// many as have arrived, up to its length), collecting any descriptors that
/// arrive with them into `fds` (close-on-exec). `UnexpectedEof` if the peer
/// has closed. The kernel ends a read right after the bytes that carried
/// descriptors, so they belong to the message holding the last byte read.
pub(crate) fn recv_some(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let int = std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(int * MAX_FDS as u32) } as usize;
    // u64 elements keep the buffer aligned for `cmsghdr`.
    let mut control = [0u64; 32];
    let control = control.get_mut(..space.div_ceil(8)).ok_or_else(|| io::Error::other("control buffer too small"))?;
    loop {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: msghdr is a plain C struct for which all zeros is valid.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = control.as_mut_ptr().cast();
        mh.msg_controllen = space as _;
        // SAFETY: `mh` points at `buf` (writable, `iov_len` bytes) and at
        // `control` (at least `space` bytes), both alive for the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        take_fds(&mh, fds);
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        return Ok(n as usize);
    }
}

/// Moves every `SCM_RIGHTS` descriptor of a received message into `fds`,
/// so that each is owned (and closed) by someone.
fn take_fds(mh: &libc::msghdr, fds: &mut Vec<OwnedFd>) {
    let int = std::mem::size_of::<libc::c_int>();
    // SAFETY: `mh` was filled by recvmsg: its control pointer and (updated)
    // length describe the control messages the kernel wrote into our
    // buffer, which the CMSG_* macros walk without leaving it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let bytes = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..bytes / int {
                    let raw = std::ptr::read_unaligned(data.add(i * int).cast::<libc::c_int>());
                    if raw >= 0 {
                        // The kernel installed this descriptor for us; we own it.
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            c = libc::CMSG_NXTHDR(mh, c);
        }
    }
}

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
        let proto = |what: String| Error::Protocol(format!("{name}: {what}"));
        let len = usize::try_from(r.size).map_err(|_| proto(format!("RAM size {} does not fit", r.size)))?;
        if len == 0 || r.gpa.checked_add(r.size).is_none() {
            return Err(proto(format!("unusable RAM range {:#x}+{:#x}", r.gpa, r.size)));
        }
        if (r.flags & map_flags::WRITABLE != 0) != writable || r.flags & !map_flags::ALL != 0 || r.padding != 0 {
            return Err(proto(format!("reply flags {:#x} do not match the request", r.flags)));
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
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| proto("mmap returned NULL".into()))?;
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
    pub fn gpa(&self) -> u64 {
        self.gpa
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
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.offset(gpa, buf.len())?;
        // SAFETY: `off + buf.len() <= len` (checked), so the source lies in
        // our live mapping; `buf` is a distinct, writable Rust buffer. A raw
        // copy, not a slice, because the guest may write the source meanwhile.
        unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr().add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// The little-endian u64 at `gpa`. Aligned: one 8-byte load (no tearing).
    pub fn read_u64(&self, gpa: u64) -> Result<u64> {
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
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
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
fn check_fd(fd: BorrowedFd<'_>, size: u64, writable: bool) -> std::result::Result<(), String> {
    // SAFETY: F_GET_SEALS and F_GETFL on a descriptor we own; no argument.
    let (seals, fl) =
        unsafe { (libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS), libc::fcntl(fd.as_raw_fd(), libc::F_GETFL)) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err("the descriptor is not sealed against shrinking".into());
    }
    let mode = fl & libc::O_ACCMODE;
    if fl < 0 || (writable && mode != libc::O_RDWR) {
        return Err(format!("the descriptor's access mode {mode:#x} does not allow the mapping asked for"));
    }
    let file = std::fs::File::from(fd.try_clone_to_owned().map_err(|e| format!("dup: {e}"))?);
    let flen = file.metadata().map_err(|e| format!("fstat: {e}"))?.len();
    if flen < size {
        return Err(format!("the file has {flen} bytes, the reply announces {size}"));
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
        let seq = self.next_seq();
        let bytes = frame(id, seq, &[req.as_bytes()]).map_err(|e| Error::Refused(format!("{name}: {e}")))?;
        self.expect_fd(seq);
        let reply = self.request_bytes(id, seq, &bytes);
        // Taken whatever happened: the slot closes (a later descriptor is
        // closed on arrival) and ours is dropped on every error path.
        let fd = self.take_received_fd(seq);
        let reply = reply?;
        if reply.err != 0 {
            return Err(Error::from_reply(name, reply.err));
        }
        expect_len(id, &reply.data, std::mem::size_of::<VmMapMemoryReply>())?;
        let r: VmMapMemoryReply = read_zext(&reply.data);
        let fd = fd.ok_or_else(|| Error::Protocol(format!("{name}: the reply carried no file descriptor")))?;
        GuestMemoryMap::new(fd, &r, flags & map_flags::WRITABLE != 0)
    }
}

#[cfg(test)]
mod tests {
    //! Descriptor handling against a scripted VMM on the other end of a
    //! socket pair. Leaks are seen through pipes: the peer sends the write
    //! end of a pipe and closes its own copy, so the read end reports
    //! hang-up exactly when the library has closed what it received.

    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;
    use ukvmi_wire::{ErrorCode, GetVersionReply, MsgHdr};

    fn pair() -> (Vm, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let vm = Vm::connect_raw(a).unwrap();
        vm.set_timeout(Duration::from_secs(5));
        (vm, b)
    }

    fn read_msg(s: &mut UnixStream) -> (MsgHdr, Vec<u8>) {
        let mut h = [0u8; 8];
        s.read_exact(&mut h).unwrap();
        let hdr: MsgHdr = read_zext(&h);
        let mut body = vec![0u8; usize::from(hdr.size)];
        s.read_exact(&mut body).unwrap();
        (hdr, body)
    }

    /// Writes `bytes` with `fd` attached (SCM_RIGHTS).
    fn send_fd(s: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) {
        let mut control = [0u64; 4];
        let mut iov = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
        // SAFETY: all-zero msghdr is valid; pointers set to live buffers; the
        // control buffer (32 bytes) holds one cmsg with one int.
        unsafe {
            let mut mh: libc::msghdr = std::mem::zeroed();
            mh.msg_iov = &mut iov;
            mh.msg_iovlen = 1;
            mh.msg_control = control.as_mut_ptr().cast();
            mh.msg_controllen = libc::CMSG_SPACE(4) as _;
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd.as_raw_fd());
            assert_eq!(libc::sendmsg(s.as_raw_fd(), &mh, 0), bytes.len() as isize);
        }
    }

    fn reply_bytes(id: u16, seq: u32, err: i32, data: &[u8]) -> Vec<u8> {
        frame(id, seq, &[ErrorCode { err, padding: 0 }.as_bytes(), data]).unwrap()
    }

    /// A pipe: (read end, write end).
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut p = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `p`.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are fresh descriptors we own.
        unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
    }

    /// Whether every write end of the pipe is closed within `t`.
    fn hung_up(rd: &OwnedFd, t: Duration) -> bool {
        let mut p = libc::pollfd { fd: rd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, t.as_millis() as i32) };
        n == 1 && p.revents & libc::POLLHUP != 0
    }

    /// A sealed memfd of `len` bytes (sealed only if `seal`).
    fn memfd(len: u64, seal: bool) -> std::fs::File {
        // SAFETY: a NUL-terminated name and flags; checked.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        if seal {
            // SAFETY: F_ADD_SEALS with an int argument on our memfd.
            assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) }, 0);
        }
        f
    }

    fn map_reply(size: u64, flags: u32) -> Vec<u8> {
        VmMapMemoryReply { gpa: 0, size, flags, padding: 0 }.as_bytes().to_vec()
    }

    #[test]
    fn descriptors_on_other_messages_are_closed() {
        let (vm, mut peer) = pair();
        std::thread::scope(|sc| {
            let (rd, wr) = pipe();
            let (rd2, wr2) = pipe();
            let p = sc.spawn(move || {
                let (h, _) = read_msg(&mut peer);
                let v = GetVersionReply { version: 1, max_msg_size: 8184, ..Default::default() };
                // An unsolicited id-MAP reply nobody waits for, then the real one.
                send_fd(&peer, &reply_bytes(MAP, 9999, 0, &map_reply(4096, 0)), wr2.as_fd());
                drop(wr2);
                send_fd(&peer, &reply_bytes(h.id, h.seq, 0, v.as_bytes()), wr.as_fd());
                drop(wr);
                peer
            });
            assert_eq!(vm.get_version().unwrap().version, 1);
            assert!(hung_up(&rd, Duration::from_secs(5)), "the descriptor sent with GET_VERSION's reply leaked");
            assert!(hung_up(&rd2, Duration::from_secs(5)), "the descriptor of an unmatched reply leaked");
            let peer = p.join().unwrap();
            // An event with a descriptor: queued as usual, the descriptor closed.
            let (rd3, wr3) = pipe();
            let body = ukvmi_wire::EventHdr { event: ukvmi_wire::event::UNHOOK, padding: [0; 3] };
            send_fd(&peer, &frame(msg::VM_EVENT, 1, &[body.as_bytes()]).unwrap(), wr3.as_fd());
            drop(wr3);
            assert!(vm.next_event(Some(Duration::from_secs(5))).unwrap().is_some());
            assert!(hung_up(&rd3, Duration::from_secs(5)), "the descriptor sent with an event leaked");
        });
    }

    const MAP: u16 = msg::UKVMI_VM_MAP_MEMORY;

    /// Answers one MAP request with `data` and, if given, `fd`.
    fn answer_map(
        vm: &Vm,
        mut peer: UnixStream,
        data: Vec<u8>,
        fd: Option<OwnedFd>,
        writable: bool,
    ) -> Result<GuestMemoryMap> {
        std::thread::scope(|sc| {
            sc.spawn(move || {
                let (h, body) = read_msg(&mut peer);
                assert_eq!(h.id, MAP);
                let req: VmMapMemory = read_zext(&body);
                assert_eq!((body.len(), req.flags), (8, u32::from(writable)));
                let bytes = reply_bytes(h.id, h.seq, 0, &data);
                match &fd {
                    Some(f) => send_fd(&peer, &bytes, f.as_fd()),
                    None => peer.write_all(&bytes).unwrap(),
                }
            });
            if writable {
                vm.map_memory_writable()
            } else {
                vm.map_memory()
            }
        })
    }

    #[test]
    fn a_good_reply_maps_and_the_map_outlives_the_connection() {
        let (vm, peer) = pair();
        let f = memfd(3 * 4096, true);
        (&f).write_all(b"hello").unwrap();
        let map = answer_map(&vm, peer, map_reply(3 * 4096, 0), Some(f.try_clone().unwrap().into()), false).unwrap();
        assert_eq!((map.len(), map.is_writable()), (3 * 4096, false));
        let mut b = [0u8; 5];
        map.read(0, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        vm.close();
        drop(vm);
        std::os::unix::fs::FileExt::write_all_at(&f, &42u64.to_le_bytes(), 8192).unwrap();
        assert_eq!(map.read_u64(8192).unwrap(), 42, "still mapped, still live");
    }

    #[test]
    fn a_descriptor_reaches_its_reply_among_messages_read_ahead_together() {
        // The library reads ahead: several messages may come in one
        // recvmsg. Messages before and after the reply that carries the
        // descriptor, already waiting in the socket, must not take it.
        let (vm, mut peer) = pair();
        let f = memfd(4096, true);
        (&f).write_all(b"mine").unwrap();
        let unhook = ukvmi_wire::EventHdr { event: ukvmi_wire::event::UNHOOK, padding: [0; 3] };
        let map = std::thread::scope(|sc| {
            sc.spawn(|| {
                let (h, _) = read_msg(&mut peer);
                let mut before = Vec::new();
                for seq in 1..=5 {
                    before.extend_from_slice(&frame(msg::VM_EVENT, seq, &[unhook.as_bytes()]).unwrap());
                    before.extend_from_slice(&reply_bytes(msg::GET_VERSION, 7000 + seq, 0, &[0; 16]));
                }
                peer.write_all(&before).unwrap();
                send_fd(&peer, &reply_bytes(h.id, h.seq, 0, &map_reply(4096, 0)), f.as_fd());
                peer.write_all(&frame(msg::VM_EVENT, 6, &[unhook.as_bytes()]).unwrap()).unwrap();
            });
            vm.map_memory()
        })
        .unwrap();
        let mut b = [0u8; 4];
        map.read(0, &mut b).unwrap();
        assert_eq!(&b, b"mine");
        for seq in 1..=6 {
            let ev = vm.next_event(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(ev.map(|e| e.seq()), Some(seq), "events in order");
        }
        assert_eq!(vm.unmatched_count(), 5, "the replies nobody asked for");
    }

    #[test]
    fn bad_replies_are_protocol_errors_and_close_the_descriptor() {
        // No descriptor at all.
        let (vm, peer) = pair();
        assert!(matches!(answer_map(&vm, peer, map_reply(4096, 0), None, false), Err(Error::Protocol(_))));
        // Not sealed, so the VMM could shrink it under us.
        let (vm, peer) = pair();
        let r = answer_map(&vm, peer, map_reply(4096, 0), Some(memfd(4096, false).into()), false);
        assert!(matches!(r, Err(Error::Protocol(ref m)) if m.contains("sealed")), "{r:?}");
        // Shorter than announced.
        let (vm, peer) = pair();
        let r = answer_map(&vm, peer, map_reply(8192, 0), Some(memfd(4096, true).into()), false);
        assert!(matches!(r, Err(Error::Protocol(ref m)) if m.contains("bytes")), "{r:?}");
        // Writable asked, read-only descriptor given.
        let (vm, peer) = pair();
        let rw = memfd(4096, true);
        let ro: OwnedFd = std::fs::File::open(format!("/proc/self/fd/{}", rw.as_raw_fd())).unwrap().into();
        let r = answer_map(&vm, peer, map_reply(4096, map_flags::WRITABLE), Some(ro), true);
        assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
        // Flags that do not match the request; zero size.
        let (vm, peer) = pair();
        let r = answer_map(&vm, peer, map_reply(4096, map_flags::WRITABLE), Some(memfd(4096, true).into()), false);
        assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
        let (vm, peer) = pair();
        assert!(matches!(
            answer_map(&vm, peer, map_reply(0, 0), Some(memfd(0, true).into()), false),
            Err(Error::Protocol(_))
        ));
        // A pipe instead of a memfd: refused, and closed.
        let (vm, peer) = pair();
        let (rd, wr) = pipe();
        assert!(matches!(answer_map(&vm, peer, map_reply(4096, 0), Some(wr), false), Err(Error::Protocol(_))));
        assert!(hung_up(&rd, Duration::from_secs(5)), "a refused descriptor leaked");
    }

    fn no_slots_left(vm: &Vm) -> bool {
        (0..4).all(|seq| vm.take_received_fd(seq).is_none())
    }

    #[test]
    fn a_raw_request_never_keeps_a_descriptor() {
        // request_raw opens no slot: the descriptor is closed on arrival.
        let (vm, mut peer) = pair();
        let (rd, wr) = pipe();
        std::thread::scope(|sc| {
            sc.spawn(move || {
                let (h, _) = read_msg(&mut peer);
                send_fd(&peer, &reply_bytes(h.id, h.seq, 0, &map_reply(4096, 0)), wr.as_fd());
            });
            let r = vm.request_raw(MAP, VmMapMemory::default().as_bytes()).unwrap();
            assert_eq!((r.err, r.data.len()), (0, 24));
        });
        assert!(hung_up(&rd, Duration::from_secs(5)), "the raw reply's descriptor leaked");
    }

    #[test]
    fn a_reply_after_the_request_gave_up_has_its_descriptor_closed() {
        let (vm, mut peer) = pair();
        vm.set_timeout(Duration::from_millis(100));
        let (rd, wr) = pipe();
        std::thread::scope(|sc| {
            sc.spawn(move || {
                let (h, _) = read_msg(&mut peer);
                std::thread::sleep(Duration::from_millis(400));
                send_fd(&peer, &reply_bytes(h.id, h.seq, 0, &map_reply(4096, 0)), wr.as_fd());
            });
            assert!(matches!(vm.map_memory(), Err(Error::Timeout { .. })));
        });
        assert!(hung_up(&rd, Duration::from_secs(5)), "the late descriptor leaked");
        // The request had seq 1; nothing was kept for it.
        assert!(vm.take_received_fd(1).is_none());
        assert!(no_slots_left(&vm));
    }
}
