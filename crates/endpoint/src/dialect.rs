//! Which KVMI dialect a connection speaks, and the kvmi-v7 codec: the one
//! place in the endpoint that knows v7 (its numbers and layouts are in
//! `ukvmi_wire::v7`).
//!
//! A v7 message is decoded on the receiving thread, in place, into the v12
//! message that serves it ([`V7Decoder::decode`]); from there it takes the
//! same path as a v12 message (the seed's validation, a job on its vCPU,
//! the reply from the vCPU thread), so v7 costs no extra hand-off. What a
//! v12 handler cannot know travels with the message in [`Wire`]: the v7 id
//! its reply carries, whether replies are suppressed, and the CR-class rule.
//! Outgoing, events are framed per dialect by [`frame_event`] and
//! [`frame_unhook`] on the thread that sends them.

use crate::session::{Message, Session};
use crate::vcpu_dispatch;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use ukvmi_wire::v7::{self, Route};
use ukvmi_wire::{
    event, frame, msg, read_zext, tail, ControlEvents, EventHdr, IntoBytes, KvmErrno, TooLarge, VcpuControlCr,
    VcpuEvent, VcpuHdr, VmCheck, VmPauseVcpu, VmSetPageAccess, PAGE_SIZE,
};

/// Where an endpoint's one-line notices go.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// The wire dialect of an endpoint's connections. A server cannot tell them
/// apart from the handshake or the first message, so the operator picks one
/// per VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// KVMI v12, the version proposed to Linux (`spec.md`).
    #[default]
    V12,
    /// kvmi-v7, the out-of-tree ABI of libkvmi master, which LibVMI,
    /// libmicrovmi, the `kvmi` crate and HVMI speak (`v7-dialect.md`).
    V7,
}

impl Dialect {
    /// `v12` or `v7`.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::V12 => "v12",
            Dialect::V7 => "v7",
        }
    }
}

impl std::str::FromStr for Dialect {
    type Err = String;
    fn from_str(s: &str) -> Result<Dialect, String> {
        match s {
            "v12" | "12" => Ok(Dialect::V12),
            "v7" | "7" => Ok(Dialect::V7),
            _ => Err(format!("unknown KVMI dialect `{s}` (v12 or v7)")),
        }
    }
}

/// Things logged once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice {
    /// A v7 tool enabled the CR event class.
    CrClass,
    /// A v7 PF reply asked for emulation (context data or a single step).
    PfEmulation,
}

impl Notice {
    pub fn bit(self) -> u8 {
        match self {
            Notice::CrClass => 1,
            Notice::PfEmulation => 2,
        }
    }

    pub fn line(self) -> &'static str {
        match self {
            Notice::CrClass => "the introspector enabled CR events; none can be delivered on this host",
            Notice::PfEmulation => {
                "the introspector's PF reply asks for emulation with context data or a single step, \
                 which this host cannot do; the reply's action is carried out without it"
            }
        }
    }
}

/// What became of a v7 message.
pub(crate) enum Decoded {
    /// Serve it as this v12 message (`hdr.id` and body rewritten).
    Serve(Message),
    /// Answer it now, on the receiving thread.
    Answer(Message, Result<Vec<u8>, KvmErrno>),
    /// Answer it once every suppressed vCPU job before it has completed.
    AnswerAfterQuietJobs(Message),
}

/// The receiving thread's v7 state: whether replies are on.
#[derive(Debug)]
pub(crate) struct V7Decoder {
    replies: bool,
}

impl V7Decoder {
    pub fn new() -> V7Decoder {
        V7Decoder { replies: true }
    }

    /// Turns one v7 message into what serves it (`v7-dialect.md` §3).
    pub fn decode(&mut self, sess: &Session, mut m: Message) -> Decoded {
        m.wire.quiet = !self.replies;
        let route = v7::route(m.hdr.id);
        let res = match route {
            Route::Same(id) => return serve(m, id),
            Route::EventReply => {
                event_reply(sess, &mut m.body);
                return serve(m, msg::VCPU_EVENT);
            }
            Route::ControlCmdResponse => return self.control_cmd_response(m),
            Route::GetVersion => {
                Ok(v7::V7GetVersionReply { version: v7::VERSION, ..Default::default() }.as_bytes().to_vec())
            }
            Route::CheckCommand => match check_command(&mut m.body) {
                Ok(()) => return serve(m, msg::VM_CHECK_COMMAND),
                Err(local) => local,
            },
            Route::CheckEvent => match check_event(&mut m.body) {
                Ok(()) => return serve(m, msg::VM_CHECK_EVENT),
                Err(local) => local,
            },
            Route::ControlEvents => {
                m.wire.cr_class = control_events(&mut m.body);
                return serve(m, msg::VCPU_CONTROL_EVENTS);
            }
            Route::PauseVcpu => match pause_vcpu(sess, &m.body) {
                Ok(body) => {
                    m.body = body;
                    return serve(m, msg::VM_PAUSE_VCPU);
                }
                Err(e) => Err(e),
            },
            Route::ControlCr => {
                control_cr(&mut m.body);
                return serve(m, msg::VCPU_CONTROL_CR);
            }
            Route::SetPageAccess => match set_page_access(&mut m.body) {
                Ok(()) => return serve(m, msg::VM_SET_PAGE_ACCESS),
                Err(e) => Err(e),
            },
            Route::GetMaxGfn => {
                let gfn = sess.vm.max_gpa().div_ceil(PAGE_SIZE as u64);
                Ok(v7::V7GetMaxGfnReply { gfn }.as_bytes().to_vec())
            }
            Route::GetEptView => {
                vcpu_dispatch::check(sess, &m.body).map(|_| v7::V7GetEptViewReply::default().as_bytes().to_vec())
            }
            Route::Refused => Err(KvmErrno::Eopnotsupp),
            Route::Unknown => Err(KvmErrno::Enosys),
        };
        Decoded::Answer(m, res)
    }

    /// `{enable, now}`: with `now` the setting covers this command too,
    /// otherwise it starts with the next one. A reply that is sent waits
    /// for the suppressed commands before it (§5).
    fn control_cmd_response(&mut self, mut m: Message) -> Decoded {
        let r: v7::V7ControlCmdResponse = read_zext(&m.body);
        if r.enable > 1 || r.now > 1 || r.padding1 != 0 || r.padding2 != 0 {
            return Decoded::Answer(m, Err(KvmErrno::Einval));
        }
        let enable = r.enable == 1;
        if r.now == 1 {
            m.wire.quiet = !enable;
        }
        self.replies = enable;
        Decoded::AnswerAfterQuietJobs(m)
    }
}

fn serve(mut m: Message, id: u16) -> Decoded {
    m.hdr.id = id;
    Decoded::Serve(m)
}

/// Offset of the event byte in an event reply: vCPU header, then `action`.
const REPLY_EVENT_AT: usize = 9;
/// vCPU header + `kvmi_event_reply`.
const REPLY_BASE: usize = 16;

/// The event byte to its v12 id; a PF reply's 272-byte payload (v12 has
/// none) comes off after a look at what it asks for. Whether the reply
/// answers a PF event is decided by the event its vCPU waits for, not by
/// the tool's event byte. Anything the v12 validation refuses (short body,
/// a payload larger than the v7 structure, a vCPU not waiting) is left for
/// it to refuse.
fn event_reply(sess: &Session, body: &mut Vec<u8>) {
    let h: VcpuHdr = read_zext(body);
    let Some(byte) = body.get_mut(REPLY_EVENT_AT) else { return };
    if let Some(id) = v7::event_to_v12(u16::from(*byte)) {
        // Every v12 event id is below 20: it fits the byte.
        *byte = id as u8;
    }
    let awaits_pf = sess.vcpus.get(usize::from(h.vcpu)).is_some_and(|v| v.awaiting.load(Ordering::SeqCst) == event::PF);
    let pf_reply = core::mem::size_of::<v7::V7EventPfReply>();
    let payload = body.len().saturating_sub(REPLY_BASE);
    if awaits_pf && payload > 0 && payload <= pf_reply {
        let r: v7::V7EventPfReply = read_zext(tail(body, REPLY_BASE));
        if r.ctx_size != 0 || r.singlestep != 0 {
            sess.notice_once(Notice::PfEmulation);
        }
        body.truncate(REPLY_BASE);
    }
}

/// CHECK_COMMAND: `Ok` when the body now names the v12 command to check,
/// else the local answer.
fn check_command(body: &mut [u8]) -> Result<(), Result<Vec<u8>, KvmErrno>> {
    let mut r: VmCheck = read_zext(body);
    if r.padding1 != 0 || r.padding2 != 0 {
        return Err(Err(KvmErrno::Einval));
    }
    if let Some(id) = v7::command_to_v12(r.id) {
        r.id = id;
        write_front(body, r.as_bytes());
        return Ok(());
    }
    Err(match v7::route(r.id) {
        Route::ControlCmdResponse | Route::GetMaxGfn | Route::GetEptView => Ok(Vec::new()),
        Route::Refused => Err(KvmErrno::Eopnotsupp),
        _ => Err(KvmErrno::Enoent),
    })
}

/// CHECK_EVENT with the v7 event id mapped; the v7-only events (CREATE_VCPU,
/// CPUID) are known but never delivered.
fn check_event(body: &mut [u8]) -> Result<(), Result<Vec<u8>, KvmErrno>> {
    let mut r: VmCheck = read_zext(body);
    if r.padding1 != 0 || r.padding2 != 0 {
        return Err(Err(KvmErrno::Einval));
    }
    match v7::event_to_v12(r.id) {
        Some(id) => {
            r.id = id;
            write_front(body, r.as_bytes());
            Ok(())
        }
        None if v7::is_v7_only_event(r.id) => Err(Err(KvmErrno::Eopnotsupp)),
        None => Err(Err(KvmErrno::Enoent)),
    }
}

/// CONTROL_EVENTS with the v7 event id mapped (an id v12 does not have
/// becomes one it rejects as invalid). True when this enables the CR class.
fn control_events(body: &mut [u8]) -> bool {
    let mut r: ControlEvents = read_zext(tail(body, VCPU_HDR));
    let cr_class = r.event_id == v7::event::CR && r.enable == 1;
    r.event_id = v7::event_to_v12(r.event_id).unwrap_or(u16::MAX);
    if let Some(rest) = body.get_mut(VCPU_HDR..) {
        write_front(rest, r.as_bytes());
    }
    cr_class
}

/// PAUSE_VCPU: v7 sends a vCPU header and `{wait}`, v12's VM command names
/// the vCPU in its body. Checked as a vCPU message first: permission, then
/// padding; the index is checked by the v12 command.
fn pause_vcpu(sess: &Session, body: &[u8]) -> Result<Vec<u8>, KvmErrno> {
    if !sess.perms.command_allowed(msg::VM_PAUSE_VCPU) {
        return Err(KvmErrno::Eperm);
    }
    let h: VcpuHdr = read_zext(body);
    let p: v7::V7PauseVcpu = read_zext(tail(body, VCPU_HDR));
    if h.padding1 != 0 || h.padding2 != 0 || p.padding1 != 0 || p.padding2 != 0 || p.padding3 != 0 {
        return Err(KvmErrno::Einval);
    }
    Ok(VmPauseVcpu { vcpu: h.vcpu, wait: p.wait, padding1: 0, padding2: 0 }.as_bytes().to_vec())
}

/// CONTROL_CR: `{enable; pad; cr (u32)}` to v12's `{cr (u8); enable; pad}`.
/// A register number over 255 becomes one v12 rejects.
fn control_cr(body: &mut Vec<u8>) {
    let r: v7::V7ControlCr = read_zext(tail(body, VCPU_HDR));
    let v12 = VcpuControlCr {
        cr: u8::try_from(r.cr).unwrap_or(u8::MAX),
        enable: r.enable,
        padding1: u16::from(r.padding1) | r.padding2,
        padding2: 0,
    };
    body.resize(VCPU_HDR + core::mem::size_of::<VcpuControlCr>(), 0);
    if let Some(rest) = body.get_mut(VCPU_HDR..) {
        write_front(rest, v12.as_bytes());
    }
}

/// SET_PAGE_ACCESS: the `{view, count}` header to v12's `{count}`; the
/// entries are the same. Only view 0 exists here.
fn set_page_access(body: &mut [u8]) -> Result<(), KvmErrno> {
    let r: v7::V7SetPageAccess = read_zext(body);
    if r.view != 0 {
        return Err(KvmErrno::Eopnotsupp);
    }
    let v12 = VmSetPageAccess { count: r.count, padding1: 0, padding2: r.padding };
    write_front(body, v12.as_bytes());
    Ok(())
}

const VCPU_HDR: usize = core::mem::size_of::<VcpuHdr>();

/// Overwrites the start of `body` with `bytes` (as far as the body goes:
/// a short body stays short, and reads as zero-extended as before).
fn write_front(body: &mut [u8], bytes: &[u8]) {
    for (d, s) in body.iter_mut().zip(bytes) {
        *d = *s;
    }
}

/// A vCPU event framed for `dialect`. v12: `kvmi_event_hdr` then
/// `kvmi_vcpu_event`; v7: `kvmi_event`, which is the same bytes with the v7
/// event id where v12 has padding.
pub(crate) fn frame_event(
    dialect: Dialect,
    seq: u32,
    id: u16,
    ev: &VcpuEvent,
    payload: &[u8],
) -> Result<Vec<u8>, TooLarge> {
    match dialect {
        Dialect::V12 => {
            let hdr = EventHdr { event: id, padding: [0; 3] };
            frame(msg::VCPU_EVENT, seq, &[hdr.as_bytes(), ev.as_bytes(), payload])
        }
        Dialect::V7 => {
            let mut out = frame(v7::msg::EVENT, seq, &[ev.as_bytes(), payload])?;
            let v7_id = v7::event_from_v12(id).and_then(|i| u8::try_from(i).ok()).unwrap_or(u8::MAX);
            if let Some(b) = out.get_mut(ukvmi_wire::MSG_HDR_SIZE + v7::EVENT_ID_OFFSET) {
                *b = v7_id;
            }
            Ok(out)
        }
    }
}

/// The UNHOOK event. v12: a VM event, the header alone; v7: a whole
/// `kvmi_event` (event 0, vCPU 0, no state).
pub(crate) fn frame_unhook(dialect: Dialect, seq: u32) -> Result<Vec<u8>, TooLarge> {
    match dialect {
        Dialect::V12 => {
            let hdr = EventHdr { event: event::UNHOOK, padding: [0; 3] };
            frame(msg::VM_EVENT, seq, &[hdr.as_bytes()])
        }
        Dialect::V7 => {
            let ev = v7::V7Event { size: core::mem::size_of::<v7::V7Event>() as u16, ..Default::default() };
            frame(v7::msg::EVENT, seq, &[ev.as_bytes()])
        }
    }
}
