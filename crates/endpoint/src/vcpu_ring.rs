//! The vCPU thread's wait for an event reply through the shared-memory
//! event channel: taking the reply out of its slot and validating it there
//! (the reply is for the event this very thread waits on), bounded spins,
//! and sleeps on the slot's bell.
//!
//! Why the vCPU thread validates a channel reply, not the receiving thread:
//! the seed's rule is that vCPU messages are validated and queued by the
//! receiving thread and answered by the vCPU's thread, so that a vCPU's
//! state changes only on its own thread, in FIFO order. A channel reply
//! never passes through the receiving thread; the vCPU thread copies it out
//! of shared memory once and runs every check the two threads would have
//! run (the seed's framing and vCPU-header checks, then spec §7.3's) on its
//! private copy before anything takes effect. The intent holds: nothing the
//! tool wrote acts unvalidated, and only the vCPU's own thread touches its
//! state. Commands keep going through the socket and the receiving thread.

use crate::event_channel::{EventChannel, SlotReply};
use crate::session::{lock, Disconnect, Message, Wire};
use crate::vcpu::{Ctx, Local, SPIN};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use ukvmi_wire::{msg, read_zext, MsgHdr, VcpuHdr, MSG_HDR_SIZE};

/// Longest single sleep on the event-channel bell before the vCPU looks at
/// its slot and queue again (normally a bell or a job wakes it sooner).
const RING_SLEEP: Duration = Duration::from_millis(20);

impl Ctx<'_> {
    /// One round of waiting for the reply to event `seq` with the channel on:
    /// takes a reply from the slot (validated here, on the vCPU thread the
    /// reply is for), else spins (bounded) for a slot reply or a job, else
    /// sleeps on the slot's bell (bounded: a tool that scribbles on the bell
    /// can delay the vCPU's look at its queue by at most [`RING_SLEEP`]).
    pub(crate) fn wait_ring(&mut self, ch: &EventChannel, local: &mut Local, seq: u32) {
        if self.ring_reply(ch, local, seq) {
            return;
        }
        let t0 = Instant::now();
        while t0.elapsed() < SPIN {
            if ch.reply_ready(self.index, seq) || !lock(&self.vs.queue).jobs.is_empty() {
                return;
            }
            std::thread::yield_now();
        }
        let seen = ch.bell(self.index);
        // Ours, read by the receiving thread after it queues a job (it then
        // rings the bell): set before looking at the queue, so no job is missed.
        self.vs.ring_sleeping.store(true, Ordering::SeqCst);
        if lock(&self.vs.queue).jobs.is_empty() && !ch.reply_ready(self.index, seq) {
            ch.sleep(self.index, seen, RING_SLEEP);
        }
        self.vs.ring_sleeping.store(false, Ordering::SeqCst);
    }

    /// Takes the reply to `seq` out of the channel if the tool wrote one and
    /// validates the copy as the seed and spec §7.3 validate a socket reply
    /// (framing, vCPU header, then `event_reply`). Registers that came with
    /// it become the event's delayed registers, as a SET_REGISTERS during
    /// the event would, only once the whole reply is valid and only where
    /// SET_REGISTERS is allowed and supported; otherwise the whole reply is
    /// refused like any malformed one. True when the wait ended.
    pub(crate) fn ring_reply(&mut self, ch: &EventChannel, local: &mut Local, seq: u32) -> bool {
        let vcpu = self.index;
        let mut regs = None;
        let bytes = match ch.take_reply(vcpu, seq) {
            SlotReply::NotYet => return false,
            SlotReply::TooLong => Err("channel reply longer than its area"),
            SlotReply::BadFlags => Err("channel reply flags have an unknown bit"),
            SlotReply::Bytes(b, r) => {
                let id = msg::VCPU_SET_REGISTERS;
                let allowed = self.sess.perms.command_allowed(id) && self.sess.caps.commands.contains(id);
                regs = r;
                if regs.is_some() && !allowed {
                    Err("registers with a channel reply, but SET_REGISTERS is not allowed")
                } else {
                    Ok(b)
                }
            }
        };
        let m = bytes.and_then(|b| {
            let hdr: MsgHdr = read_zext(&b);
            let body = b.get(MSG_HDR_SIZE..).unwrap_or_default().to_vec();
            let h: VcpuHdr = read_zext(&body);
            if b.len() < MSG_HDR_SIZE || usize::from(hdr.size) != body.len() || hdr.id != msg::VCPU_EVENT {
                Err("channel reply is not one whole KVMI_VCPU_EVENT message")
            } else if h.padding1 != 0 || h.padding2 != 0 || h.vcpu != vcpu {
                Err("channel reply names another vCPU or has non-zero padding")
            } else {
                Ok(Message { hdr, body, wire: Wire::plain(hdr.id) })
            }
        });
        let res = match m {
            Ok(m) => self.event_reply(local, &m).map(|()| {
                if let Some(r) = regs {
                    local.delayed_regs = Some(*r);
                }
            }),
            Err(why) => {
                local.expect = None;
                local.reply = Some(None);
                Err(Disconnect::BadEventReply { vcpu, why })
            }
        };
        if let Err(why) = res {
            self.sess.hard_error(why);
        }
        true
    }
}
