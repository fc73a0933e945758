//! Helpers shared by the conformance tests that drive the fake VM through
//! the introspector library: connecting, error codes, KVM_E* values.
#![allow(dead_code)]

use ukvmi_conformance::{FakeConfig, Setup};
use ukvmi_introspector::Vm;

/// `-KVM_EPERM`.
pub const EPERM: i32 = -1;
/// `-KVM_ENOENT`.
pub const ENOENT: i32 = -2;
/// `-KVM_EAGAIN`.
pub const EAGAIN: i32 = -11;
/// `-KVM_EINVAL`.
pub const EINVAL: i32 = -22;
/// `-KVM_EOPNOTSUPP`.
pub const EOPNOTSUPP: i32 = -95;
/// `-KVM_ENOSYS`.
pub const ENOSYS: i32 = -1000;

/// Starts a fake VM with `cfg` and connects the library to it (no handshake).
pub fn connect(cfg: &FakeConfig) -> (Setup, Vm) {
    let s = Setup::new(cfg);
    let vm = Vm::connect_raw(s.connect()).unwrap();
    (s, vm)
}

/// 0 for `Ok`, the raw `err` of a failed reply; panics on any other error.
pub fn code<X>(r: ukvmi_introspector::Result<X>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_err().unwrap_or_else(|| panic!("not a KVM error: {e}")),
    }
}

/// Sends one framed request on a raw socket and reads the reply with
/// `recvmsg`: (header, body, descriptors that came with it).
pub fn request_with_fds(
    sock: &std::os::unix::net::UnixStream,
    seq: u32,
    id: u16,
    body: &[u8],
) -> (ukvmi_wire::MsgHdr, Vec<u8>, Vec<std::os::fd::OwnedFd>) {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    (&*sock).write_all(&ukvmi_wire::frame(id, seq, &[body]).unwrap()).unwrap();
    let mut buf = vec![0u8; 8 + ukvmi_wire::MAX_MSG_SIZE];
    let mut control = [0u64; 16];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: all-zero msghdr is valid; pointers set below to live buffers.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: mh describes `buf` and `control`, alive for the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
    assert!(n >= 8, "recvmsg: {n} {}", std::io::Error::last_os_error());
    let hdr: ukvmi_wire::MsgHdr = ukvmi_wire::read_zext(&buf);
    assert_eq!(n as usize, 8 + usize::from(hdr.size), "one reply per read");
    let mut fds = Vec::new();
    // SAFETY: walks the control messages recvmsg wrote into `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    (hdr, buf[8..n as usize].to_vec(), fds)
}
