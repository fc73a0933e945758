//! `UKVMI_VM_EVENT_CHANNEL` (a ukvmi extension): the VMM's side of the
//! shared-memory event channel, one slot per vCPU through which the vCPU
//! thread posts its events and takes their replies without the socket.
//!
//! Layout and who writes what: `ukvmi_wire::event_channel`. The file is a
//! sealed memfd (it cannot shrink or grow, so the tool cannot make the VMM's
//! mapping fault); the tool also gets the read end of a pipe whose write end
//! (non-blocking, our own open file description) wakes it when it sleeps.
//!
//! The tool can write any byte of the file at any time, so this side only
//! ever: writes an event into its slot; reads the reply seq and length
//! words; copies at most [`REPLY_MAX`] bytes out (volatile reads) for the
//! vCPU thread to validate like a socket reply; adds to the bell and wakes
//! it; sleeps on the bell with a timeout. Nothing read from the file is used
//! as an index or a size without a bound check, and no wait is unbounded.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use ukvmi_wire::event_channel::{
    file_size, slot_offset, BELL, EV_DATA, EV_LEN, EV_MAX, EV_SEQ, FEATURE_REPLY_REGS, HDR_FEATURES, HDR_MAGIC,
    HDR_NR_VCPUS, HDR_VERSION, MAGIC, REPLY_DATA, REPLY_FLAGS, REPLY_LEN, REPLY_MAX, REPLY_REGS, REPLY_REGS_SIZE,
    REPLY_SEQ, REPLY_WITH_REGS, TOOL_SLEEPERS, VCPU_SLEEPING, VERSION,
};
use ukvmi_wire::{read_zext, KvmRegs};

/// The VMM's mapping of one connection's channel file.
pub(crate) struct EventChannel {
    base: NonNull<u8>,
    len: usize,
    nr_vcpus: usize,
    memfd: OwnedFd,
    pipe_rd: OwnedFd,
    pipe_wr: OwnedFd,
}

// SAFETY: the mapping is plain shared memory owned by this value until drop;
// every access goes through atomics or volatile byte copies, never through
// references that assume exclusive access.
unsafe impl Send for EventChannel {}
// SAFETY: as above; concurrent use from several threads is what atomics and
// volatile accesses are for.
unsafe impl Sync for EventChannel {}

impl std::fmt::Debug for EventChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventChannel").field("len", &self.len).field("nr_vcpus", &self.nr_vcpus).finish()
    }
}

/// What the vCPU found in its slot's reply area.
#[derive(Debug)]
pub(crate) enum SlotReply {
    /// No reply for this event yet.
    NotYet,
    /// A copy of the reply message, to be validated, and a copy of the
    /// registers the tool put with it ([`REPLY_WITH_REGS`]).
    Bytes(Vec<u8>, Option<Box<KvmRegs>>),
    /// The announced length is impossible.
    TooLong,
    /// The flags word has a bit this VMM does not know.
    BadFlags,
}

fn os(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl EventChannel {
    /// A fresh channel for `nr_vcpus` vCPUs: memfd, seals, mapping, pipe.
    pub(crate) fn create(nr_vcpus: usize) -> io::Result<EventChannel> {
        let len = file_size(nr_vcpus);
        // SAFETY: the name is a NUL-terminated literal; flags are valid.
        let fd =
            unsafe { libc::memfd_create(c"ukvmi-event-channel".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `fd` was just returned to us and is owned by nobody else.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let size = libc::off_t::try_from(len).map_err(|_| io::Error::other("channel too large"))?;
        // SAFETY: ftruncate on a descriptor we own.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), size) } != 0 {
            return Err(os("ftruncate of the event channel"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a memfd created with MFD_ALLOW_SEALING.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(os("sealing the event channel"));
        }
        // SAFETY: a new shared mapping of `len` bytes of a file that is
        // exactly that long and can no longer shrink.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mapping the event channel"));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            // SAFETY: unmapping the mapping made above, used by nobody.
            unsafe { libc::munmap(base.as_ptr().cast(), len) };
            return Err(os("pipe2 for the event channel"));
        }
        // SAFETY: pipe2 just returned these two descriptors to us.
        let (pipe_rd, pipe_wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let ch = EventChannel { base, len, nr_vcpus, memfd, pipe_rd, pipe_wr };
        ch.store(HDR_MAGIC, MAGIC);
        ch.store(HDR_VERSION, VERSION);
        ch.store(HDR_NR_VCPUS, u32::try_from(nr_vcpus).unwrap_or(u32::MAX));
        ch.store(HDR_FEATURES, FEATURE_REPLY_REGS);
        Ok(ch)
    }

    /// Bytes of the file.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// vCPU slots.
    pub(crate) fn nr_vcpus(&self) -> usize {
        self.nr_vcpus
    }

    /// What the tool gets: the file and the pipe's read end (new duplicates).
    pub(crate) fn tool_fds(&self) -> io::Result<(OwnedFd, OwnedFd)> {
        Ok((self.memfd.try_clone()?, self.pipe_rd.try_clone()?))
    }

    /// The 32-bit word at `off` (header offsets), if in bounds.
    fn word(&self, off: usize) -> Option<&AtomicU32> {
        if off % 4 != 0 || off.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: in bounds (checked above) and 4-byte aligned (the mapping
        // is page-aligned, `off` a multiple of 4); the mapping lives as long
        // as `self`; AtomicU32 has u32's layout.
        Some(unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU32>() })
    }

    fn slot_word(&self, vcpu: u16, off: usize) -> Option<&AtomicU32> {
        if usize::from(vcpu) >= self.nr_vcpus {
            return None;
        }
        self.word(slot_offset(usize::from(vcpu)) + off)
    }

    fn store(&self, off: usize, v: u32) {
        if let Some(w) = self.word(off) {
            w.store(v, Ordering::SeqCst);
        }
    }

    /// Posts event message `bytes` (seq `seq`) in `vcpu`'s slot and wakes the
    /// tool if it sleeps. False (nothing posted) when it does not fit: the
    /// caller sends it on the socket.
    pub(crate) fn post(&self, vcpu: u16, seq: u32, bytes: &[u8]) -> bool {
        let (Some(seq_w), Some(len_w)) = (self.slot_word(vcpu, EV_SEQ), self.slot_word(vcpu, EV_LEN)) else {
            return false;
        };
        if bytes.len() > EV_MAX {
            return false;
        }
        let at = slot_offset(usize::from(vcpu)) + EV_DATA;
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: `at + i` < slot start + EV_DATA + EV_MAX, inside the
            // slot (the vCPU index was checked), so inside the mapping.
            unsafe { std::ptr::write_volatile(self.base.as_ptr().add(at + i), *b) };
        }
        len_w.store(bytes.len() as u32, Ordering::SeqCst);
        seq_w.store(seq, Ordering::SeqCst);
        self.wake_tool();
        true
    }

    /// Writes one byte to the pipe if a tool thread sleeps (never blocks: a
    /// full pipe already holds a wake-up).
    fn wake_tool(&self) {
        if self.word(TOOL_SLEEPERS).is_some_and(|w| w.load(Ordering::SeqCst) != 0) {
            let b = 1u8;
            // SAFETY: writes one byte from a live local to our own
            // non-blocking pipe write end.
            let _ = unsafe { libc::write(self.pipe_wr.as_raw_fd(), (&raw const b).cast(), 1) };
        }
    }

    /// Whether a reply for `seq` stands in `vcpu`'s slot.
    pub(crate) fn reply_ready(&self, vcpu: u16, seq: u32) -> bool {
        self.slot_word(vcpu, REPLY_SEQ).is_some_and(|w| w.load(Ordering::SeqCst) == seq)
    }

    /// Takes a copy of the reply to `seq`, if the tool wrote one.
    pub(crate) fn take_reply(&self, vcpu: u16, seq: u32) -> SlotReply {
        if !self.reply_ready(vcpu, seq) {
            return SlotReply::NotYet;
        }
        let Some(len_w) = self.slot_word(vcpu, REPLY_LEN) else { return SlotReply::NotYet };
        let len = len_w.load(Ordering::SeqCst) as usize;
        if len > REPLY_MAX {
            return SlotReply::TooLong;
        }
        let flags = self.slot_word(vcpu, REPLY_FLAGS).map_or(0, |w| w.load(Ordering::SeqCst));
        if flags & !REPLY_WITH_REGS != 0 {
            return SlotReply::BadFlags;
        }
        let slot = slot_offset(usize::from(vcpu));
        // `copy` keeps `len` within its area: both areas lie inside the slot.
        let bytes = self.copy(slot + REPLY_DATA, len);
        let regs = (flags & REPLY_WITH_REGS != 0)
            .then(|| Box::new(read_zext::<KvmRegs>(&self.copy(slot + REPLY_REGS, REPLY_REGS_SIZE))));
        SlotReply::Bytes(bytes, regs)
    }

    /// A volatile copy of `len` bytes at `at`, or nothing if that is not
    /// inside the mapping (callers pass areas of a checked slot).
    fn copy(&self, at: usize, len: usize) -> Vec<u8> {
        if at.checked_add(len).is_none_or(|end| end > self.len) {
            return Vec::new();
        }
        (0..len)
            // SAFETY: `at + i` < `at + len` <= `self.len` (checked above),
            // inside the mapping, which lives as long as `self`.
            .map(|i| unsafe { std::ptr::read_volatile(self.base.as_ptr().add(at + i)) })
            .collect()
    }

    /// The bell's value now (read before checking for work, then slept on).
    pub(crate) fn bell(&self, vcpu: u16) -> u32 {
        self.slot_word(vcpu, BELL).map_or(0, |w| w.load(Ordering::SeqCst))
    }

    /// Rings `vcpu`'s bell: something for it (a job) has come.
    pub(crate) fn ring(&self, vcpu: u16) {
        if let Some(w) = self.slot_word(vcpu, BELL) {
            w.fetch_add(1, Ordering::SeqCst);
            futex_wake(w);
        }
    }

    /// Sleeps while the bell still reads `seen`, at most `timeout`.
    pub(crate) fn sleep(&self, vcpu: u16, seen: u32, timeout: Duration) {
        let (Some(bell), Some(hint)) = (self.slot_word(vcpu, BELL), self.slot_word(vcpu, VCPU_SLEEPING)) else {
            std::thread::sleep(timeout);
            return;
        };
        hint.store(1, Ordering::SeqCst);
        futex_wait(bell, seen, timeout);
        hint.store(0, Ordering::SeqCst);
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `create`; no reference
        // into it outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// `FUTEX_WAIT` (shared: the word lives in a file mapping) with a timeout.
fn futex_wait(word: &AtomicU32, val: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: FUTEX_WAIT reads the aligned u32 behind `word` (alive for the
    // call) and sleeps at most `ts`; the unused arguments are null/0.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            val,
            &raw const ts,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
}

/// `FUTEX_WAKE` of every waiter on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address of the aligned u32 behind
    // `word` as a key; the unused arguments are null/0.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
}
