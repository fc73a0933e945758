//! VM commands (even ids), run on the receiving thread in arrival order.
//! Each handler validates in the order of spec §8 and sends its reply before
//! the next message is read.

use crate::backend::IdSet;
use crate::event_channel::EventChannel;
use crate::session::{lock, Disconnect, Message, Session};
use crate::shared_memory;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use ukvmi_wire::event_channel::{VmEventChannel, VmEventChannelReply, VERSION};
use ukvmi_wire::{
    access, event, map_flags, msg, read_zext, tail, ControlEvents, ErrorCode, Features, GetVersionReply, IntoBytes,
    KvmErrno, MsgHdr, PageAccessEntry, VmCheck, VmControlCleanup, VmGetInfoReply, VmMapMemory, VmMapMemoryReply,
    VmPauseVcpu, VmPhysical, VmSetPageAccess, KVMI_VERSION, MAX_MSG_SIZE, MAX_PENDING_PAUSES, PAGE_SIZE,
};

type Reply = Result<Vec<u8>, KvmErrno>;

/// Runs one allowed VM command and sends its reply.
pub(crate) fn handle(sess: &Session, m: &Message) -> Result<(), Disconnect> {
    let body = m.body.as_slice();
    let res: Reply = match m.hdr.id {
        msg::GET_VERSION => Ok(get_version(sess)),
        msg::VM_CHECK_COMMAND => check_command(sess, body),
        msg::VM_CHECK_EVENT => check_event(sess, body),
        msg::VM_GET_INFO => Ok(get_info(sess)),
        msg::VM_CONTROL_EVENTS => control_events(sess, body),
        msg::VM_READ_PHYSICAL => read_physical(sess, body),
        msg::VM_WRITE_PHYSICAL => write_physical(sess, body)?,
        msg::VM_PAUSE_VCPU => pause_vcpu(sess, body),
        msg::VM_CONTROL_CLEANUP => control_cleanup(sess, body),
        msg::VM_SET_PAGE_ACCESS => set_page_access(sess, body)?,
        msg::UKVMI_VM_MAP_MEMORY => return map_memory(sess, m),
        msg::UKVMI_VM_WRITE_PHYSICAL_UNDO => write_physical_undo(sess, body)?,
        msg::UKVMI_VM_EVENT_CHANNEL => return event_channel(sess, m),
        _ => Err(KvmErrno::Enosys),
    };
    match res {
        Ok(data) => sess.answer(m, Ok(&data)),
        Err(e) => sess.answer(m, Err(e)),
    }
}

fn get_version(sess: &Session) -> Vec<u8> {
    GetVersionReply {
        version: KVMI_VERSION,
        max_msg_size: MAX_MSG_SIZE as u32,
        features: Features { singlestep: u8::from(sess.caps.singlestep), padding: [0; 7] },
    }
    .as_bytes()
    .to_vec()
}

/// Spec §6.3, plus what the host cannot do: `-KVM_EOPNOTSUPP`.
fn check_command(sess: &Session, body: &[u8]) -> Reply {
    let r: VmCheck = read_zext(body);
    if r.padding1 != 0 || r.padding2 != 0 {
        return Err(KvmErrno::Einval);
    }
    if !msg::is_command(r.id) {
        return Err(KvmErrno::Enoent);
    }
    if !sess.perms.command_allowed(r.id) {
        return Err(KvmErrno::Eperm);
    }
    let supported = match r.id {
        msg::UKVMI_VM_MAP_MEMORY => sess.vm.support_shared_memory().is_some(),
        msg::UKVMI_VM_WRITE_PHYSICAL_UNDO => true,
        msg::UKVMI_VM_EVENT_CHANNEL => sess.dialect == crate::Dialect::V12,
        id => sess.caps.commands.contains(id),
    };
    if !supported {
        return Err(KvmErrno::Eopnotsupp);
    }
    Ok(Vec::new())
}

fn check_event(sess: &Session, body: &[u8]) -> Reply {
    let r: VmCheck = read_zext(body);
    if r.padding1 != 0 || r.padding2 != 0 {
        return Err(KvmErrno::Einval);
    }
    if !event::is_known(r.id) {
        return Err(KvmErrno::Enoent);
    }
    if !sess.perms.event_allowed(r.id) {
        return Err(KvmErrno::Eperm);
    }
    if !sess.caps.events.contains(r.id) {
        return Err(KvmErrno::Eopnotsupp);
    }
    Ok(Vec::new())
}

fn get_info(sess: &Session) -> Vec<u8> {
    VmGetInfoReply { vcpu_count: sess.vcpus.len() as u32, padding: [0; 3] }.as_bytes().to_vec()
}

fn control_events(sess: &Session, body: &[u8]) -> Reply {
    let r: ControlEvents = read_zext(body);
    if r.padding1 != 0 || r.padding2 != 0 || r.enable > 1 {
        return Err(KvmErrno::Einval);
    }
    if !event::is_vm_event(r.event_id) {
        return Err(KvmErrno::Einval);
    }
    if !sess.perms.event_allowed(r.event_id) {
        return Err(KvmErrno::Eperm);
    }
    let bit = IdSet::EMPTY.with(r.event_id).bits();
    if r.enable == 1 {
        sess.vm_events.fetch_or(bit, Ordering::SeqCst);
    } else {
        sess.vm_events.fetch_and(!bit, Ordering::SeqCst);
    }
    Ok(Vec::new())
}

/// gpa/size/padding rules shared by READ and WRITE_PHYSICAL.
fn check_physical(r: &VmPhysical) -> Result<(), KvmErrno> {
    let size = usize::from(r.size);
    let offset = (r.gpa % PAGE_SIZE as u64) as usize;
    if size == 0 || size > PAGE_SIZE || offset + size > PAGE_SIZE || r.padding1 != 0 || r.padding2 != 0 {
        return Err(KvmErrno::Einval);
    }
    Ok(())
}

fn read_physical(sess: &Session, body: &[u8]) -> Reply {
    let r: VmPhysical = read_zext(body);
    check_physical(&r)?;
    let mut buf = vec![0u8; usize::from(r.size)];
    sess.vm.read_physical(r.gpa, &mut buf).map_err(|e| e.errno())?;
    Ok(buf)
}

/// `KVMI_VM_READ_PHYSICAL` (allowed: the caller checked) with its whole
/// reply, framed, appended to `out` instead of sent: the receiving thread
/// answers a run of buffered reads with one write. The guest memory is read
/// straight into `out`. Same validation and answers as [`handle`]; the
/// caller keeps suppressed (v7) reads off this path.
pub(crate) fn read_physical_batched(sess: &Session, m: &Message, out: &mut Vec<u8>) {
    let r: VmPhysical = read_zext(&m.body);
    let start = out.len();
    let size = usize::from(r.size);
    let fail = |out: &mut Vec<u8>, e: KvmErrno| {
        out.truncate(start);
        let hdr = MsgHdr { id: m.wire.id, size: 8, seq: m.hdr.seq };
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(ErrorCode { err: e.wire(), padding: 0 }.as_bytes());
    };
    if let Err(e) = check_physical(&r) {
        return fail(out, e);
    }
    // check_physical: size <= PAGE_SIZE, so 8 + size fits the u16.
    let hdr = MsgHdr { id: m.wire.id, size: (8 + size) as u16, seq: m.hdr.seq };
    out.extend_from_slice(hdr.as_bytes());
    out.extend_from_slice(ErrorCode { err: 0, padding: 0 }.as_bytes());
    let at = out.len();
    out.resize(at + size, 0);
    let res = match out.get_mut(at..) {
        Some(dst) => sess.vm.read_physical(r.gpa, dst).map_err(|e| e.errno()),
        None => Err(KvmErrno::Einval),
    };
    if let Err(e) = res {
        fail(out, e);
    }
}

/// The size check against the received body is a hard error (spec §8.7,
/// §11: `16 + size > body`, so a body shorter than the header fails it too).
fn write_physical(sess: &Session, body: &[u8]) -> Result<Reply, Disconnect> {
    Ok(match physical_write(body)? {
        Ok((gpa, data)) => sess.vm.write_physical(gpa, data).map(|()| Vec::new()).map_err(|e| e.errno()),
        Err(e) => Err(e),
    })
}

/// A WRITE_PHYSICAL body checked: the gpa and the data, or the soft error.
fn physical_write(body: &[u8]) -> Result<Result<(u64, &[u8]), KvmErrno>, Disconnect> {
    let r: VmPhysical = read_zext(body);
    let head = core::mem::size_of::<VmPhysical>();
    let data = tail(body, head);
    if head + usize::from(r.size) > body.len() {
        return Err(Disconnect::WritePhysicalOverflow { size: r.size, available: data.len() });
    }
    if let Err(e) = check_physical(&r) {
        return Ok(Err(e));
    }
    Ok(Ok((r.gpa, data.get(..usize::from(r.size)).unwrap_or(&[]))))
}

/// `UKVMI_VM_WRITE_PHYSICAL_UNDO` (extension): WRITE_PHYSICAL that keeps
/// the bytes it overwrites in the session's undo log (`Session::undo_writes`
/// puts them back when the connection ends). `-KVM_ENOMEM` once the log
/// holds `MAX_UNDO_BYTES` bytes.
fn write_physical_undo(sess: &Session, body: &[u8]) -> Result<Reply, Disconnect> {
    let (gpa, data) = match physical_write(body)? {
        Ok(w) => w,
        Err(e) => return Ok(Err(e)),
    };
    let mut old = vec![0u8; data.len()];
    if let Err(e) = sess.vm.read_physical(gpa, &mut old) {
        return Ok(Err(e.errno()));
    }
    if let Err(e) = sess.record_undo(gpa, &old, data) {
        return Ok(Err(e));
    }
    Ok(sess.vm.write_physical(gpa, data).map(|()| Vec::new()).map_err(|e| e.errno()))
}

fn pause_vcpu(sess: &Session, body: &[u8]) -> Reply {
    let r: VmPauseVcpu = read_zext(body);
    if r.wait > 1 || r.padding1 != 0 || r.padding2 != 0 {
        return Err(KvmErrno::Einval);
    }
    if !sess.perms.event_allowed(event::PAUSE) {
        return Err(KvmErrno::Eperm);
    }
    let Some(vs) = sess.vcpus.get(usize::from(r.vcpu)) else {
        return Err(KvmErrno::Einval);
    };
    {
        let mut q = lock(&vs.queue);
        if q.pauses > MAX_PENDING_PAUSES {
            return Err(KvmErrno::Ebusy);
        }
        q.pauses += 1;
    }
    sess.poke(r.vcpu, vs, r.wait == 1);
    Ok(Vec::new())
}

fn control_cleanup(sess: &Session, body: &[u8]) -> Reply {
    let r: VmControlCleanup = read_zext(body);
    if r.padding.iter().any(|&b| b != 0) || r.enable > 1 {
        return Err(KvmErrno::Einval);
    }
    sess.cleanup.store(r.enable == 1, Ordering::SeqCst);
    Ok(Vec::new())
}

/// `UKVMI_VM_MAP_MEMORY` (extension): the reply carries the RAM layout and,
/// as `SCM_RIGHTS`, a descriptor of guest RAM (see `shared_memory`).
fn map_memory(sess: &Session, m: &Message) -> Result<(), Disconnect> {
    match map_memory_fd(sess, &m.body) {
        Ok((reply, fd)) => sess.reply_with_fds(m, reply.as_bytes(), &[fd.as_fd()]),
        Err(e) => sess.answer(m, Err(e)),
    }
    // `fd` (our copy) is closed here; the tool holds its own.
}

/// Checks, in order: body (exactly 8 bytes, known flags, zero padding) →
/// `-KVM_EINVAL`; backend support → `-KVM_EOPNOTSUPP`; a writable map
/// while `KVMI_VM_WRITE_PHYSICAL` is not allowed → `-KVM_EPERM`.
fn map_memory_fd(sess: &Session, body: &[u8]) -> Result<(VmMapMemoryReply, OwnedFd), KvmErrno> {
    if body.len() != core::mem::size_of::<VmMapMemory>() {
        return Err(KvmErrno::Einval);
    }
    let r: VmMapMemory = read_zext(body);
    if r.padding != 0 || r.flags & !map_flags::ALL != 0 {
        return Err(KvmErrno::Einval);
    }
    let Some(shm) = sess.vm.support_shared_memory() else {
        return Err(KvmErrno::Eopnotsupp);
    };
    let writable = r.flags & map_flags::WRITABLE != 0;
    if writable && !sess.perms.command_allowed(msg::VM_WRITE_PHYSICAL) {
        return Err(KvmErrno::Eperm);
    }
    let fd = shared_memory::descriptor_for_tool(shm, writable).map_err(|e| e.errno())?;
    let reply = VmMapMemoryReply {
        gpa: shm.ram_gpa(),
        size: shm.ram_size(),
        flags: if writable { map_flags::WRITABLE } else { 0 },
        padding: 0,
    };
    Ok((reply, fd))
}

/// `UKVMI_VM_EVENT_CHANNEL` (extension): creates the connection's event
/// channel (once; asking again hands out the same one) and sends its file
/// and the wake-up pipe's read end with the reply. Body: exactly 8 zero
/// bytes, else `-KVM_EINVAL`; v7 connections: `-KVM_EOPNOTSUPP`.
fn event_channel(sess: &Session, m: &Message) -> Result<(), Disconnect> {
    let r: VmEventChannel = read_zext(&m.body);
    let res = if m.body.len() != core::mem::size_of::<VmEventChannel>() || r.flags != 0 || r.padding != 0 {
        Err(KvmErrno::Einval)
    } else if sess.dialect != crate::Dialect::V12 {
        Err(KvmErrno::Eopnotsupp)
    } else if let Some(ch) = sess.channel.get() {
        Ok(ch)
    } else {
        match EventChannel::create(sess.vcpus.len()) {
            Ok(ch) => Ok(sess.channel.get_or_init(|| ch)),
            Err(e) => {
                sess.log(&format!("event channel: {e}"));
                Err(KvmErrno::Enomem)
            }
        }
    };
    let fds = res.and_then(|ch| {
        let fds = ch.tool_fds().map_err(|_| KvmErrno::Enomem)?;
        let reply = VmEventChannelReply { size: ch.len() as u64, nr_vcpus: ch.nr_vcpus() as u32, version: VERSION };
        Ok((reply, fds))
    });
    match fds {
        Ok((reply, (file, pipe))) => sess.reply_with_fds(m, reply.as_bytes(), &[file.as_fd(), pipe.as_fd()]),
        Err(e) => sess.answer(m, Err(e)),
    }
}

/// Every entry is attempted; the first error is reported; no rollback.
fn set_page_access(sess: &Session, body: &[u8]) -> Result<Reply, Disconnect> {
    let r: VmSetPageAccess = read_zext(body);
    let entry_size = core::mem::size_of::<PageAccessEntry>();
    let head = core::mem::size_of::<VmSetPageAccess>();
    if head + entry_size * usize::from(r.count) > body.len() {
        return Err(Disconnect::PageAccessOverflow { count: r.count, body: body.len() });
    }
    if r.padding1 != 0 || r.padding2 != 0 {
        return Ok(Err(KvmErrno::Einval));
    }
    let Some(pa) = sess.vm.support_page_access() else {
        return Ok(Err(KvmErrno::Eopnotsupp));
    };
    let mut first: Option<KvmErrno> = None;
    for chunk in tail(body, head).chunks_exact(entry_size).take(usize::from(r.count)) {
        let e: PageAccessEntry = read_zext(chunk);
        let res = if e.access & !access::RWX != 0 || e.padding.iter().any(|&b| b != 0) {
            Err(KvmErrno::Einval)
        } else {
            pa.set_page_access(e.gpa, e.access).map_err(|err| err.errno())
        };
        if let (Err(err), None) = (res, first) {
            first = Some(err);
        }
    }
    Ok(match first {
        Some(e) => Err(e),
        None => Ok(Vec::new()),
    })
}
