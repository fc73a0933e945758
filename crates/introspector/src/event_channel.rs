//! The tool's side of the shared-memory event channel
//! (`UKVMI_VM_EVENT_CHANNEL`, a ukvmi extension): asking for it
//! ([`Vm::enable_event_channel`]), taking events out of the vCPU slots and
//! putting replies into them.
//!
//! Layout: `ukvmi_wire::event_channel`. Once the channel is on, the VMM
//! posts every vCPU event in its vCPU's slot instead of writing it to the
//! socket; [`Vm::next_event`] looks at the slots as well as the socket, and
//! [`Vm::reply`] answers an event that came through a slot through the same
//! slot (anything else on the socket, as before). The socket stays for every
//! command, for VM events, and as the fallback: a reply sent on the socket
//! is still taken.

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ukvmi_wire::event_channel::{
    slot_offset, VmEventChannel, VmEventChannelReply, BELL, EV_DATA, EV_LEN, EV_MAX, EV_SEQ, FEATURE_REPLY_REGS,
    HDR_FEATURES, HDR_MAGIC, HDR_NR_VCPUS, HDR_VERSION, MAGIC, REPLY_DATA, REPLY_FLAGS, REPLY_LEN, REPLY_MAX,
    REPLY_REGS, REPLY_SEQ, REPLY_WITH_REGS, TOOL_SLEEPERS, VCPU_SLEEPING, VERSION,
};
use ukvmi_wire::{frame, msg, read_zext, IntoBytes, KvmRegs};

use crate::error::{Error, ProtocolError, Result};
use crate::events::{self, EventReply};
use crate::mux::lock;
use crate::pending::PendingEvent;
use crate::transport::poll_fds;
use crate::vm::{expect_len, reply_data, Vm};
use crate::wake::Waker;

fn bad(problem: &'static str) -> Error {
    ProtocolError::EventChannel { problem }.into()
}

/// The tool's mapping of the channel file and the wake-up pipe.
pub(crate) struct Channel {
    base: NonNull<u8>,
    len: usize,
    nr_vcpus: usize,
    pipe: OwnedFd,
    /// The VMM takes registers with a reply ([`FEATURE_REPLY_REGS`]).
    reply_regs: bool,
    /// Per slot, the seq of the last event taken out of it.
    taken: Mutex<Vec<u32>>,
}

// SAFETY: the mapping is shared memory owned by this value until drop; all
// accesses go through atomics or volatile byte copies.
unsafe impl Send for Channel {}
// SAFETY: as above.
unsafe impl Sync for Channel {}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("len", &self.len).field("nr_vcpus", &self.nr_vcpus).finish()
    }
}

impl Channel {
    fn map(file: &OwnedFd, pipe: OwnedFd, r: &VmEventChannelReply) -> Result<Channel> {
        let len = usize::try_from(r.size).map_err(|_| bad("size does not fit"))?;
        let nr_vcpus = r.nr_vcpus as usize;
        if r.version != VERSION {
            return Err(bad("unknown layout version"));
        }
        if len != ukvmi_wire::event_channel::file_size(nr_vcpus) {
            return Err(bad("size does not match the vCPU count"));
        }
        // SAFETY: fstat into a zeroed stat buffer for a descriptor we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 || (st.st_size as u64) < r.size {
            return Err(bad("the file is shorter than announced"));
        }
        // SAFETY: F_GET_SEALS takes no argument.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(bad("the file is not sealed against shrinking"));
        }
        // SAFETY: a new shared mapping of `len` bytes of a file at least that
        // long that cannot shrink.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Io { context: "mapping the event channel", source: std::io::Error::last_os_error() });
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| bad("mmap returned NULL"))?;
        // SAFETY: F_SETFL on the pipe's read end (our own open file description).
        unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut ch = Channel { base, len, nr_vcpus, pipe, reply_regs: false, taken: Mutex::new(vec![0; nr_vcpus]) };
        ch.reply_regs = ch.word(HDR_FEATURES).load(Ordering::SeqCst) & FEATURE_REPLY_REGS != 0;
        let ok = ch.word(HDR_MAGIC).load(Ordering::SeqCst) == MAGIC
            && ch.word(HDR_VERSION).load(Ordering::SeqCst) == VERSION
            && ch.word(HDR_NR_VCPUS).load(Ordering::SeqCst) as usize == nr_vcpus;
        if !ok {
            return Err(bad("the header does not match the reply"));
        }
        Ok(ch)
    }

    /// The word at `off`; offsets come from the layout constants, which
    /// `map` checked fit (the file holds the header and every slot).
    fn word(&self, off: usize) -> &AtomicU32 {
        let off = off.min(self.len.saturating_sub(4)) & !3;
        // SAFETY: in bounds (clamped above) and 4-byte aligned in a
        // page-aligned mapping that lives as long as `self`.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU32>() }
    }

    fn slot_word(&self, vcpu: usize, off: usize) -> Option<&AtomicU32> {
        (vcpu < self.nr_vcpus).then(|| self.word(slot_offset(vcpu) + off))
    }

    /// Whether some slot holds an event not taken yet (no copy, no lock).
    pub(crate) fn has_event(&self) -> bool {
        let taken = lock(&self.taken);
        (0..self.nr_vcpus).any(|i| {
            let s = self.word(slot_offset(i) + EV_SEQ).load(Ordering::SeqCst);
            s != 0 && taken.get(i).is_some_and(|t| *t != s)
        })
    }

    /// Takes the next event not taken yet: its whole message (header and
    /// body), copied out.
    pub(crate) fn take_event(&self) -> Option<Vec<u8>> {
        let mut taken = lock(&self.taken);
        for (i, t) in taken.iter_mut().enumerate() {
            let s = self.word(slot_offset(i) + EV_SEQ).load(Ordering::SeqCst);
            if s == 0 || s == *t {
                continue;
            }
            *t = s;
            let len = (self.word(slot_offset(i) + EV_LEN).load(Ordering::SeqCst) as usize).min(EV_MAX);
            let at = slot_offset(i) + EV_DATA;
            let bytes = (0..len)
                // SAFETY: `at + k` is inside slot `i` (EV_DATA + EV_MAX <
                // SLOT_SIZE), inside the mapping.
                .map(|k| unsafe { std::ptr::read_volatile(self.base.as_ptr().add(at + k)) })
                .collect();
            return Some(bytes);
        }
        None
    }

    /// Puts reply message `bytes` to event `seq` in `vcpu`'s slot if that
    /// event came through it (and the reply fits), with `regs` to be set as
    /// by a SET_REGISTERS during the event if given; false otherwise (also
    /// when `regs` are given and the VMM does not take them with a reply):
    /// nothing was written, the caller uses the socket.
    pub(crate) fn reply(&self, vcpu: u16, seq: u32, bytes: &[u8], regs: Option<&KvmRegs>) -> bool {
        let vcpu = usize::from(vcpu);
        let Some(ev_seq) = self.slot_word(vcpu, EV_SEQ) else { return false };
        if ev_seq.load(Ordering::SeqCst) != seq || bytes.len() > REPLY_MAX || (regs.is_some() && !self.reply_regs) {
            return false;
        }
        let slot = slot_offset(vcpu);
        let areas = [(REPLY_DATA, bytes), (REPLY_REGS, regs.map_or(&[][..], |r| r.as_bytes()))];
        for (area, data) in areas {
            for (k, b) in data.iter().enumerate() {
                // SAFETY: `slot + area + k` is inside the slot (the reply fits
                // REPLY_MAX; the registers fit after it, checked by the
                // layout's const asserts), and so inside the mapping.
                unsafe { std::ptr::write_volatile(self.base.as_ptr().add(slot + area + k), *b) };
            }
        }
        // Written with every reply (0 without registers): a flag left from
        // an earlier reply must not apply old registers.
        let flags = if regs.is_some() { REPLY_WITH_REGS } else { 0 };
        if self.reply_regs {
            self.word(slot + REPLY_FLAGS).store(flags, Ordering::SeqCst);
        }
        self.word(slot_offset(vcpu) + REPLY_LEN).store(bytes.len() as u32, Ordering::SeqCst);
        self.word(slot_offset(vcpu) + REPLY_SEQ).store(seq, Ordering::SeqCst);
        let bell = self.word(slot_offset(vcpu) + BELL);
        bell.fetch_add(1, Ordering::SeqCst);
        if self.word(slot_offset(vcpu) + VCPU_SLEEPING).load(Ordering::SeqCst) != 0 {
            // SAFETY: FUTEX_WAKE uses the aligned word's address as a key only.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    bell.as_ptr(),
                    libc::FUTEX_WAKE,
                    1,
                    std::ptr::null::<libc::timespec>(),
                    std::ptr::null::<u32>(),
                    0u32,
                )
            };
        }
        true
    }

    /// Blocks until `stream` is readable, the VMM posts an event, `wake`
    /// fires (it is drained), or `timeout` (`None`: no limit); true when
    /// the socket is readable.
    pub(crate) fn wait(
        &self,
        stream: &std::os::unix::net::UnixStream,
        wake: &Waker,
        timeout: Option<Duration>,
    ) -> bool {
        let sleepers = self.word(TOOL_SLEEPERS);
        sleepers.fetch_add(1, Ordering::SeqCst);
        let mut fds = [
            libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.pipe.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.fd(), events: libc::POLLIN, revents: 0 },
        ];
        if !self.has_event() {
            poll_fds(&mut fds, timeout);
        }
        sleepers.fetch_sub(1, Ordering::SeqCst);
        if fds[1].revents != 0 {
            let mut sink = [0u8; 64];
            // SAFETY: reads into a live local buffer from our non-blocking pipe end.
            while unsafe { libc::read(self.pipe.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) } > 0 {}
        }
        if fds[2].revents != 0 {
            wake.drain();
        }
        fds[0].revents != 0
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl Vm {
    /// Asks the VMM for the shared-memory event channel
    /// (`UKVMI_VM_EVENT_CHANNEL`, a ukvmi extension; check it with
    /// [`Vm::check_command`]). From then on vCPU events come through shared
    /// memory, and [`Vm::next_event`] and [`Vm::reply`] use it without
    /// anything else changing for the caller. Asking again does nothing.
    pub fn enable_event_channel(&self) -> Result<()> {
        if self.mux.channel.get().is_some() {
            return Ok(());
        }
        let (id, name) = (msg::UKVMI_VM_EVENT_CHANNEL, "UKVMI_VM_EVENT_CHANNEL");
        let seq = self.mux.next_seq();
        let req = VmEventChannel { flags: 0, padding: 0 };
        let bytes = frame(id, seq, &[req.as_bytes()]).map_err(|e| Error::Refused(format!("{name}: {e}")))?;
        self.mux.expect_fd(seq);
        let reply = self.mux.roundtrip(id, seq, name, &bytes);
        let mut fds = self.mux.take_received_fds(seq).into_iter();
        let reply = reply?;
        let data = reply_data(name, &reply)?;
        expect_len(id, data, std::mem::size_of::<VmEventChannelReply>())?;
        let r: VmEventChannelReply = read_zext(data);
        let (Some(file), Some(pipe)) = (fds.next(), fds.next()) else {
            return Err(bad("the reply did not carry the file and the pipe"));
        };
        let ch = Channel::map(&file, pipe, &r)?;
        let _ = self.mux.channel.set(ch);
        Ok(())
    }

    /// Answers `ev` with `reply` and has the VMM set `regs` first, exactly
    /// as [`Vm::set_registers`] during the event followed by [`Vm::reply`]
    /// would (the registers are applied when the reply is taken, before the
    /// guest resumes). Through the event channel, when the event came
    /// through it and the VMM takes registers with a reply, this is one
    /// write to the vCPU's slot; otherwise it is those two messages on the
    /// socket. Same checks as [`Vm::reply`]; nothing is sent if the reply is
    /// refused, and nothing more if SET_REGISTERS fails on the socket (the
    /// event stays unanswered then).
    ///
    /// Through the channel, a VMM where SET_REGISTERS is not allowed refuses
    /// the whole reply and ends the connection (the vCPU resumes as if
    /// CONTINUE, without the registers), where the socket way gets
    /// `-KVM_EPERM` for the SET_REGISTERS: check the permission with
    /// [`Vm::check_command`] first if it may be missing.
    pub fn reply_with_registers(&self, ev: &PendingEvent, reply: EventReply, regs: &KvmRegs) -> Result<()> {
        let body = events::reply_body(ev, reply)?;
        let bytes = frame(msg::VCPU_EVENT, ev.seq, &[&body]).map_err(|e| Error::Refused(e.to_string()))?;
        if !self.mux.send_event_reply_with_regs(ev.vcpu.raw(), ev.seq, &bytes, regs)? {
            self.set_registers(ev.vcpu, regs)?;
            self.mux.send_event_reply(ev.vcpu.raw(), ev.seq, &bytes)?;
        }
        ev.mark_answered();
        Ok(())
    }

    /// Whether vCPU events come through the shared-memory channel.
    pub fn event_channel_enabled(&self) -> bool {
        self.mux.channel.get().is_some()
    }
}
