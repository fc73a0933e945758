//! Kicking a vCPU out of `KVM_RUN`: a real-time signal sent to its thread.
//! The signal handler sets `kvm_run.immediate_exit` through a thread-local
//! pointer, so a signal that lands just before `KVM_RUN` still makes it
//! return `EINTR` at once (the race KVM's documentation describes).

use std::cell::Cell;
use std::sync::Once;

thread_local! {
    /// This thread's `kvm_run` mapping, or null.
    static RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
pub(crate) fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int) {
    let p = RUN.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` was registered by this very thread (a kick is sent to
        // the vCPU thread itself, so this handler interrupts that thread) and
        // stays valid until the thread's `Registration` drops, before its
        // VcpuFd does. The thread itself only touches `immediate_exit`
        // through `set_immediate_exit`, also one volatile byte store, so the
        // interrupted code never holds a reference to the byte; a volatile
        // store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&raw mut (*p).immediate_exit, 1) };
    }
}

/// Installs the handler once per process (no SA_RESTART: KVM_RUN must return).
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; we set a
        // handler that only touches a thread-local pointer and an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// This thread's registration of its `kvm_run` for kicks; unregisters when
/// dropped, also when the thread unwinds from a panic.
pub(crate) struct Registration(());

impl Drop for Registration {
    fn drop(&mut self) {
        RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Registers this thread's `kvm_run` (which must outlive the returned guard).
pub(crate) fn register(run: *mut kvm_bindings::kvm_run) -> Registration {
    RUN.with(|c| c.set(run));
    Registration(())
}

/// Sets or clears `immediate_exit` of this thread's registered `kvm_run`
/// (a volatile store, like the signal handler's). No-op when unregistered.
pub(crate) fn set_immediate_exit(v: u8) {
    let p = RUN.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: as in `on_kick`: registered by this thread, valid while
        // registered; only ever accessed with volatile byte stores.
        unsafe { std::ptr::write_volatile(&raw mut (*p).immediate_exit, v) };
    }
}

/// Sends the kick signal to a live thread.
pub(crate) fn signal(thread: libc::pthread_t) {
    // SAFETY: the caller guarantees `thread` is alive (it checks the vCPU's
    // liveness under the same lock the thread takes before exiting).
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}
