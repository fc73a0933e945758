//! `UKVMI_VM_MAP_MEMORY` (a ukvmi extension): guest RAM handed to the tool
//! as a file descriptor, so it maps guest memory instead of moving it one
//! page per message.
//!
//! The descriptor travels as `SCM_RIGHTS` ancillary data on the command's
//! reply. It is never the VMM's own descriptor:
//!
//! * read-only (the default): a fresh `O_RDONLY` open of the RAM file
//!   through `/proc/self/fd/N`, so its open file description cannot be
//!   mapped `PROT_WRITE | MAP_SHARED` (`mmap` fails with `EACCES`);
//! * writable (asked for, and only while `KVMI_VM_WRITE_PHYSICAL` is
//!   allowed too): a duplicate of the VMM's read-write descriptor.
//!
//! Before anything is sent the file is checked against the
//! [`SharedMemoryOps`] contract: sealed against shrinking and growing, and
//! as long as the RAM it announces.

use crate::backend::SharedMemoryOps;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use thiserror::Error;
use ukvmi_wire::KvmErrno;

/// Why the RAM file could not be offered.
#[derive(Debug, Error)]
pub(crate) enum ShareError {
    /// The backend's file breaks the contract (not sealed, too short).
    #[error("guest RAM file unusable: {0}")]
    Contract(String),
    /// Opening or inspecting the file failed.
    #[error("{context}: {source}")]
    Os {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

impl ShareError {
    /// The code the tool receives.
    pub(crate) fn errno(&self) -> KvmErrno {
        match self {
            ShareError::Contract(_) => KvmErrno::Eopnotsupp,
            ShareError::Os { source, .. } => match source.raw_os_error() {
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM) => KvmErrno::Enomem,
                _ => KvmErrno::Einval,
            },
        }
    }
}

fn os(context: &'static str) -> impl FnOnce(io::Error) -> ShareError {
    move |source| ShareError::Os { context, source }
}

/// `fcntl(fd, cmd)` for the query commands that take no argument.
fn fcntl_query(fd: BorrowedFd<'_>, cmd: libc::c_int, context: &'static str) -> Result<libc::c_int, ShareError> {
    // SAFETY: F_GET_SEALS and F_GETFL read kernel state of a descriptor we
    // borrow for the duration of the call; they take no pointer argument.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), cmd) };
    if r < 0 {
        return Err(os(context)(io::Error::last_os_error()));
    }
    Ok(r)
}

/// The open file description's access mode (`O_RDONLY`, `O_RDWR`, ...).
pub(crate) fn access_mode(fd: BorrowedFd<'_>) -> Result<libc::c_int, ShareError> {
    Ok(fcntl_query(fd, libc::F_GETFL, "F_GETFL on the guest RAM descriptor")? & libc::O_ACCMODE)
}

/// Checks the backend's file against the contract of [`SharedMemoryOps`].
fn check_contract(shm: &dyn SharedMemoryOps) -> Result<(), ShareError> {
    let fd = shm.ram_fd();
    let seals = fcntl_query(fd, libc::F_GET_SEALS, "F_GET_SEALS on guest RAM")?;
    let need = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    if seals & need != need {
        return Err(ShareError::Contract(format!("seals {seals:#x} lack F_SEAL_SHRINK|F_SEAL_GROW")));
    }
    let len = std::fs::File::from(fd.try_clone_to_owned().map_err(os("duplicating the guest RAM descriptor"))?)
        .metadata()
        .map_err(os("fstat of guest RAM"))?
        .len();
    let end = shm.ram_size();
    if len < end {
        return Err(ShareError::Contract(format!("file has {len} bytes, RAM is {end}")));
    }
    Ok(())
}

/// A descriptor of guest RAM for the tool: read-only unless `writable`.
pub(crate) fn descriptor_for_tool(shm: &dyn SharedMemoryOps, writable: bool) -> Result<OwnedFd, ShareError> {
    check_contract(shm)?;
    let fd = shm.ram_fd();
    let out: OwnedFd = if writable {
        if access_mode(fd)? != libc::O_RDWR {
            return Err(ShareError::Contract("the VMM's descriptor is not read-write".into()));
        }
        fd.try_clone_to_owned().map_err(os("duplicating the guest RAM descriptor"))?
    } else {
        // A new open file description, read-only: a duplicate would share
        // the VMM's O_RDWR one and could be mapped writable.
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        OpenOptions::new().read(true).open(path).map_err(os("reopening guest RAM read-only"))?.into()
    };
    let want = if writable { libc::O_RDWR } else { libc::O_RDONLY };
    if access_mode(out.as_fd())? != want {
        return Err(ShareError::Contract("the descriptor has the wrong access mode".into()));
    }
    Ok(out)
}

/// Writes `bytes` to `stream` with `fds` as `SCM_RIGHTS` ancillary data on
/// the first byte. The caller holds the writer lock, so the message (and
/// the descriptors with it) goes out whole, unmixed with others.
pub(crate) fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let fd_len = (std::mem::size_of::<libc::c_int>() * fds.len()) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
    // u64 elements keep the buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
    // SAFETY: msghdr is a plain C struct for which all zeros is valid.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.as_mut_ptr().cast();
    mh.msg_controllen = space as _;
    // SAFETY: `mh` points at `control`, which holds CMSG_SPACE(n * sizeof(int))
    // bytes, so the first header and its n-int payload fit; the pointers
    // come from the CMSG_* macros over that buffer.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&mh);
        if c.is_null() {
            return Err(io::Error::other("no room for the control message"));
        }
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(fd_len) as _;
        let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
        for (i, fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
        }
    }
    let sent = loop {
        // SAFETY: `mh` describes `bytes` (read only by the kernel) and the
        // control buffer, both alive for the call; `stream` is a valid socket.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // A short send already carried the descriptors with its first byte; the
    // rest of the message follows as plain bytes.
    if let Some(rest) = bytes.get(sent..) {
        if !rest.is_empty() {
            io::Write::write_all(&mut &*stream, rest)?;
        }
    }
    Ok(())
}
