//! `UKVMI_VM_MAP_MEMORY`, the ukvmi extension that hands guest RAM to the
//! tool as a file descriptor: reported by CHECK_COMMAND only where the
//! backend can share its RAM, permissions, body validation, the descriptor
//! itself (read-only open file description, sealed), and the library's
//! mapped view, against the fake VM over a real socket pair.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::os::fd::AsRawFd;
use ukvmi_conformance::{FakeConfig, Setup};
use ukvmi_introspector::{Error, Vm};
use ukvmi_wire::*;

mod common;
use common::{code, connect, request_with_fds, EINVAL, EOPNOTSUPP, EPERM};

const MAP: u16 = msg::UKVMI_VM_MAP_MEMORY;
const MEM: usize = 1 << 20;

fn with_memfd() -> (Setup, Vm) {
    connect(&FakeConfig { memfd: true, memory: MEM, ..Default::default() })
}

fn without_memfd() -> (Setup, Vm) {
    let s = Setup::new(&FakeConfig::default());
    let vm = Vm::connect_raw(s.connect()).unwrap();
    (s, vm)
}

fn err_of(body: &[u8]) -> i32 {
    read_zext::<ErrorCode>(body).err
}

#[test]
fn check_command_reports_it_only_where_the_backend_can_share_ram() {
    let (_s, vm) = without_memfd();
    assert_eq!(code(vm.check_command(MAP)), EOPNOTSUPP);
    let (s, vm) = with_memfd();
    assert_eq!(code(vm.check_command(MAP)), 0);
    // Not allowed: EPERM, as for any command (the permission check comes first).
    s.endpoint.permissions().set_command(MAP.into(), false).unwrap();
    assert_eq!(code(vm.check_command(MAP)), EPERM);
    // Ids next to it in the extension range are unknown.
    for id in [msg::EXT_FIRST + 1, msg::EXT_FIRST + 4, msg::EXT_END] {
        assert_eq!(code(vm.check_command(id)), -2, "id {id:#x}");
    }
}

#[test]
fn unsupported_backend_answers_eopnotsupp() {
    let (s, vm) = without_memfd();
    assert_eq!(code(vm.map_memory()), EOPNOTSUPP);
    assert_eq!(code(vm.map_memory_writable()), EOPNOTSUPP);
    // The connection is fine afterwards.
    assert_eq!(vm.read_physical(0, 8).unwrap(), vec![0; 8]);
    s.assert_guest_runs(&[0]);
}

#[test]
fn not_allowed_is_eperm_and_writable_needs_write_physical() {
    let (s, vm) = with_memfd();
    let p = s.endpoint.permissions();
    p.set_command(MAP.into(), false).unwrap();
    assert_eq!(code(vm.map_memory()), EPERM);
    assert_eq!(code(vm.map_memory_writable()), EPERM);
    p.set_command(MAP.into(), true).unwrap();
    p.set_command(msg::VM_WRITE_PHYSICAL.into(), false).unwrap();
    assert_eq!(code(vm.map_memory_writable()), EPERM, "writable needs WRITE_PHYSICAL allowed");
    let ro = vm.map_memory().unwrap();
    assert!(!ro.is_writable());
    p.set_command(msg::VM_WRITE_PHYSICAL.into(), true).unwrap();
    assert!(vm.map_memory_writable().unwrap().is_writable());
    // "All" (the default, and -1) includes the extension.
    p.set_command(-1, false).unwrap();
    assert_eq!(code(vm.map_memory()), EPERM);
    p.set_command(-1, true).unwrap();
    assert_eq!(code(vm.map_memory()), 0);
}

#[test]
fn malformed_request_bodies_are_einval() {
    for (s, _vm) in [with_memfd(), without_memfd()] {
        let sock = s.connect();
        let good = VmMapMemory { flags: 0, padding: 0 };
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 4],
            vec![0; 7],
            vec![0; 9],
            vec![0; 16],
            VmMapMemory { flags: 2, padding: 0 }.as_bytes().to_vec(),
            VmMapMemory { flags: 0x8000_0001, padding: 0 }.as_bytes().to_vec(),
            VmMapMemory { flags: 0, padding: 1 }.as_bytes().to_vec(),
        ];
        for (i, body) in cases.iter().enumerate() {
            let (hdr, reply, fds) = request_with_fds(&sock, 100 + i as u32, MAP, body);
            assert_eq!((hdr.id, hdr.seq, hdr.size), (MAP, 100 + i as u32, 8));
            assert_eq!(err_of(&reply), EINVAL, "body {body:?}");
            assert!(fds.is_empty(), "an error reply carries no descriptor");
        }
        // The connection survives; a good request still gets its answer.
        let (_, reply, _) = request_with_fds(&sock, 200, MAP, good.as_bytes());
        assert!(err_of(&reply) == 0 || err_of(&reply) == EOPNOTSUPP);
        s.assert_guest_runs(&[0]);
    }
}

#[test]
fn read_only_descriptor_cannot_be_mapped_writable() {
    let (s, _vm) = with_memfd();
    let sock = s.connect();
    let (hdr, body, fds) = request_with_fds(&sock, 7, MAP, VmMapMemory::default().as_bytes());
    assert_eq!((hdr.id, hdr.seq), (MAP, 7));
    assert_eq!(err_of(&body), 0);
    let r: VmMapMemoryReply = read_zext(&body[8..]);
    assert_eq!(body.len(), 8 + 24);
    assert_eq!((r.gpa, r.size, r.flags, r.padding), (0, MEM as u64, 0, 0));
    assert_eq!(fds.len(), 1, "exactly one descriptor with the reply");
    let fd = fds[0].as_raw_fd();
    // SAFETY: fcntl queries on a descriptor we own.
    let (fl, seals) = unsafe { (libc::fcntl(fd, libc::F_GETFL), libc::fcntl(fd, libc::F_GET_SEALS)) };
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY, "a read-only open file description");
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(seals & want, want, "sealed against resizing and new seals");
    let file = std::fs::File::from(fds.into_iter().next().unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o400);
    assert!(file.set_len(0).is_err(), "cannot truncate through it");
    // SAFETY: mmap calls on our descriptor; results are checked and unmapped.
    unsafe {
        let w = libc::mmap(std::ptr::null_mut(), MEM, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
        assert_eq!(w, libc::MAP_FAILED, "PROT_WRITE|MAP_SHARED must fail on a read-only descriptor");
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EACCES));
        let r = libc::mmap(std::ptr::null_mut(), MEM, libc::PROT_READ, libc::MAP_SHARED, fd, 0);
        assert_ne!(r, libc::MAP_FAILED);
        s.vm.poke_mem(0x1234, b"seen");
        assert_eq!(std::slice::from_raw_parts(r.cast::<u8>().add(0x1234), 4), b"seen");
        libc::munmap(r, MEM);
    }
    // A writable request gets a read-write descriptor.
    let (_, body, fds) =
        request_with_fds(&sock, 8, MAP, VmMapMemory { flags: map_flags::WRITABLE, padding: 0 }.as_bytes());
    assert_eq!(err_of(&body), 0);
    assert_eq!(read_zext::<VmMapMemoryReply>(&body[8..]).flags, map_flags::WRITABLE);
    // SAFETY: fcntl query on a descriptor we own.
    assert_eq!(unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFL) } & libc::O_ACCMODE, libc::O_RDWR);
}

#[test]
fn the_view_is_guest_memory_live_both_ways() {
    let (s, vm) = with_memfd();
    let map = vm.map_memory().unwrap();
    assert_eq!((map.len(), map.gpa().raw(), map.is_writable()), (MEM as u64, 0, false));
    // Equal to READ_PHYSICAL over a range, across page boundaries.
    for (i, b) in (0..3 * 4096u64).step_by(8).enumerate() {
        s.vm.poke_mem(0x10_000 + b, &(i as u64 * 0x0101_0101).to_le_bytes());
    }
    let mut view = vec![0u8; 3 * 4096];
    map.read(0x10_000, &mut view).unwrap();
    for page in 0..3u64 {
        let want = vm.read_physical(0x10_000 + page * 4096, 4096).unwrap();
        assert_eq!(&view[page as usize * 4096..][..4096], &want[..], "page {page}");
    }
    // Guest writes are seen at once.
    s.vm.poke_mem(0x2000, &0xfeed_f00d_u64.to_le_bytes());
    assert_eq!(map.read_u64(0x2000).unwrap(), 0xfeed_f00d);
    assert_eq!(map.read_u64(0x2001).unwrap(), 0xfeed_f00d >> 8, "unaligned reads too");
    // Bounds and read-only are typed errors, never panics.
    let mut b = [0u8; 16];
    assert!(matches!(map.read(MEM as u64 - 8, &mut b), Err(Error::OutOfRange { .. })));
    assert!(matches!(map.read(u64::MAX - 4, &mut b), Err(Error::OutOfRange { .. })));
    assert!(matches!(map.read_u64(MEM as u64 - 4), Err(Error::OutOfRange { .. })));
    assert!(map.read(MEM as u64 - 16, &mut b).is_ok());
    assert!(map.read(MEM as u64, &mut []).is_ok(), "an empty read at the end is in range");
    assert!(matches!(map.write(0x2000, &[1]), Err(Error::ReadOnlyMap)));
    // Writable: our writes reach the guest and READ_PHYSICAL.
    let rw = vm.map_memory_writable().unwrap();
    rw.write(0x3ffc, b"straddle").unwrap();
    assert_eq!(s.vm.peek(0x3ffc, 8), b"straddle");
    assert_eq!(vm.read_physical(0x4000, 4).unwrap(), b"ddle");
    assert_eq!(map.read_u64(0x3ffc).unwrap(), u64::from_le_bytes(*b"straddle"));
    assert!(matches!(rw.write(MEM as u64 - 1, &[0, 0]), Err(Error::OutOfRange { .. })));
    // Both maps outlive the connection.
    vm.close();
    s.vm.poke_mem(0x2000, &7u64.to_le_bytes());
    assert_eq!(map.read_u64(0x2000).unwrap(), 7);
    rw.write(0x2000, &8u64.to_le_bytes()).unwrap();
    assert_eq!(s.vm.peek(0x2000, 8), 8u64.to_le_bytes());
    s.assert_guest_runs(&[0]);
}
