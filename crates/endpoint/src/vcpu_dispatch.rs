//! The seed: "KVM: introspection: handle vCPU commands" (spec §7.2).
//!
//! Runs on the receiving thread for every odd message id. It checks, in this
//! order, and answers each failure itself:
//!
//! 1. the command is allowed (event replies are exempt) → else `-KVM_EPERM`;
//! 2. the vCPU header's padding is zero → else `-KVM_EINVAL`;
//! 3. the vCPU index is below the vCPU count → else `-KVM_EINVAL`;
//! 4. the vCPU is ready (started by the guest, or waiting in an event) → else
//!    `-KVM_EAGAIN`.
//!
//! A message that passes is moved, buffer and all, into that vCPU's FIFO job
//! queue and the vCPU is kicked. From then on the vCPU thread runs it and
//! sends the reply itself, always: even a GET_REGISTERS that could be
//! answered from the registers a waiting event captured goes through the
//! queue (the vCPU thread then answers it without an ioctl), so replies
//! about a vCPU come from its own thread, in its FIFO order.

use crate::session::{Disconnect, Job, Message, Session};
use std::sync::atomic::Ordering;
use ukvmi_wire::{msg, read_zext, KvmErrno, VcpuHdr};

/// What became of a message on the receiving thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Routed {
    /// Answered here.
    Answered,
    /// Queued for a vCPU thread that is running (or about to run) the guest.
    Queued,
    /// Queued for a vCPU thread that waits in an event: it answers at once,
    /// without needing the guest's CPU time.
    QueuedToWaiting,
}

/// Validates a vCPU message and queues it as a job on its vCPU.
pub(crate) fn validate_and_queue(sess: &Session, m: Message) -> Result<Routed, Disconnect> {
    let id = m.hdr.id;
    if id != msg::VCPU_EVENT && !sess.perms.command_allowed(id) {
        return sess.answer(&m, Err(KvmErrno::Eperm)).map(|()| Routed::Answered);
    }
    let (vcpu, waiting) = match check(sess, &m.body) {
        Ok(v) => v,
        Err(e) => return sess.answer(&m, Err(e)).map(|()| Routed::Answered),
    };
    sess.queue_job(vcpu, Job::Message(m))?;
    Ok(if waiting { Routed::QueuedToWaiting } else { Routed::Queued })
}

/// Checks 2 to 4 on a body that starts with the vCPU header: padding, index,
/// readiness. Returns the vCPU and whether it waits in an event.
pub(crate) fn check(sess: &Session, body: &[u8]) -> Result<(u16, bool), KvmErrno> {
    // A body shorter than the header is zero-extended: it names vCPU 0.
    let h: VcpuHdr = read_zext(body);
    if h.padding1 != 0 || h.padding2 != 0 {
        return Err(KvmErrno::Einval);
    }
    let vs = sess.vcpus.get(usize::from(h.vcpu)).ok_or(KvmErrno::Einval)?;
    let waiting = vs.waiting.load(Ordering::SeqCst);
    if !(waiting || sess.vm.vcpu_ready(h.vcpu)) {
        return Err(KvmErrno::Eagain);
    }
    Ok((h.vcpu, waiting))
}
