//! The fake VM: guest memory in a `Vec` (or a sealed memfd, see
//! [`FakeConfig::memfd`]), vCPUs as threads, every optional backend feature
//! implemented so each command can be exercised.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ukvmi_endpoint::{
    BackendError, BackendResult, CpuidOps, Dialect, Endpoint, EventPayload, Exception, Flow, HostCaps, InjectOps,
    InterceptOps, MtrrOps, Options, PageAccessOps, Permissions, SharedMemoryOps, SinglestepOps, TranslateOps,
    VcpuBackend, VcpuPort, VmBackend, XstateOps,
};
use ukvmi_wire::{Action, KvmRegs, KvmSegment, KvmSregs, KvmXsave};

/// Guest virtual addresses at `KERNEL_BASE + x` map to gpa `x`.
pub const KERNEL_BASE: u64 = 0xffff_8000_0000_0000;
/// MSR the fake guest refuses to read (to test unreadable MSRs).
pub const UNREADABLE_MSR: u32 = 0xdead;
/// The TSC frequency the fake vCPUs report, in kHz.
pub const TSC_KHZ: u32 = 2_500_000;

/// How to build the fake VM.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Number of vCPUs.
    pub vcpus: u16,
    /// vCPUs the guest starts at once; the others wait for [`FakeVm::start_vcpu`].
    pub started: u16,
    /// Guest RAM in bytes, from gpa 0 (anything above is unbacked).
    pub memory: usize,
    /// What the "host" supports.
    pub caps: HostCaps,
    /// Keep guest RAM in a sealed memfd and offer it to the tool
    /// (`UKVMI_VM_MAP_MEMORY`); without it the command is unsupported.
    pub memfd: bool,
    /// The KVMI dialect the endpoint serves (default v12).
    pub dialect: Dialect,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            vcpus: 1,
            started: u16::MAX,
            memory: 1 << 20,
            caps: HostCaps::full(),
            memfd: false,
            dialect: Dialect::V12,
        }
    }
}

/// Something the fake guest does on its next exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestAction {
    /// `int3` at the current RIP.
    Int3,
    /// The agent hypercall.
    Hypercall,
    /// `wrmsr`.
    WriteMsr {
        /// Index.
        msr: u32,
        /// Value.
        value: u64,
    },
    /// `mov crN, value`.
    WriteCr {
        /// 0, 3 or 4.
        cr: u8,
        /// Value.
        value: u64,
    },
    /// `xsetbv` of XCR0.
    Xsetbv {
        /// New XCR0.
        value: u64,
    },
    /// `lgdt` (write) or `sgdt`.
    Gdt {
        /// Load rather than store.
        write: bool,
    },
    /// One-byte write to guest memory.
    Write {
        /// Guest physical address.
        gpa: u64,
        /// Byte.
        value: u8,
    },
}

/// What the fake guest observed, for tests to assert on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// `raise` returned (None = no event was sent).
    Event {
        /// The action that caused it.
        cause: GuestAction,
        /// The outcome.
        outcome: Option<ukvmi_endpoint::EventOutcome>,
    },
    /// A PAUSE/TRAP event or an event reply asked for CRASH.
    Crashed,
    /// An exception went into the guest.
    Injected(Exception),
}

struct VcpuShared {
    ready: AtomicBool,
    /// Skips `handle_requests` while set (`FakeVm::hold`).
    held: AtomicBool,
    in_guest: AtomicBool,
    exits: AtomicU64,
    progress: AtomicU64,
    kick: Mutex<bool>,
    kicked: Condvar,
    script: Mutex<VecDeque<GuestAction>>,
    log: Mutex<Vec<Observed>>,
    /// Registers the test can look at without going through KVMI.
    msrs: Mutex<BTreeMap<u32, u64>>,
    crs: Mutex<[u64; 5]>,
    /// Interceptions the endpoint asked for.
    intercepts: Mutex<Intercepts>,
}

/// Interceptions a fake vCPU has on, as the endpoint set them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Intercepts {
    /// #BP exits.
    pub breakpoint: bool,
    /// Single-stepping.
    pub singlestep: bool,
    /// Watched MSR writes.
    pub msrs: BTreeSet<u32>,
    /// Watched CR writes.
    pub crs: BTreeSet<u8>,
}

/// The fake VM.
pub struct FakeVm {
    vcpus: Vec<VcpuShared>,
    memory: RwLock<FakeRam>,
    caps: HostCaps,
    pages: Mutex<BTreeMap<u64, u8>>,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The endpoint's one-line notices (its `Options::log`), in order.
    notices: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for FakeVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeVm").field("vcpus", &self.vcpus.len()).finish()
    }
}

impl FakeVm {
    /// Builds the VM and its endpoint, and starts the vCPU threads.
    pub fn start(cfg: &FakeConfig) -> (Arc<FakeVm>, Endpoint) {
        let vm = Arc::new(FakeVm {
            vcpus: (0..cfg.vcpus)
                .map(|i| VcpuShared {
                    ready: AtomicBool::new(i < cfg.started),
                    held: AtomicBool::new(false),
                    in_guest: AtomicBool::new(false),
                    exits: AtomicU64::new(0),
                    progress: AtomicU64::new(0),
                    kick: Mutex::new(false),
                    kicked: Condvar::new(),
                    script: Mutex::new(VecDeque::new()),
                    log: Mutex::new(Vec::new()),
                    msrs: Mutex::new(BTreeMap::new()),
                    crs: Mutex::new([0x8001_0033, 0, 0, 0x1000, 0x20]),
                    intercepts: Mutex::new(Intercepts::default()),
                })
                .collect(),
            memory: RwLock::new(if cfg.memfd { FakeRam::memfd(cfg.memory) } else { FakeRam::Vec(vec![0; cfg.memory]) }),
            caps: cfg.caps,
            pages: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            notices: Arc::new(Mutex::new(Vec::new())),
        });
        let notices = Arc::clone(&vm.notices);
        let log: ukvmi_endpoint::Log = Arc::new(move |line: &str| {
            notices.lock().unwrap_or_else(|e| e.into_inner()).push(line.to_string());
        });
        let options = Options { permissions: Permissions::allow_all(), dialect: cfg.dialect, log: Some(log) };
        let endpoint = Endpoint::with_options(Arc::clone(&vm) as Arc<dyn VmBackend>, options);
        for i in 0..cfg.vcpus {
            let port = endpoint.vcpu_port(i).unwrap();
            let vm2 = Arc::clone(&vm);
            let h = std::thread::Builder::new()
                .name(format!("fake-vcpu{i}"))
                .spawn(move || FakeVcpu::new(vm2, i).run(port))
                .unwrap();
            vm.threads.lock().unwrap().push(h);
        }
        (vm, endpoint)
    }

    /// Holds vCPU `i` off its requests (or lets it go): it goes on running
    /// the guest but does not call `handle_requests`, like a vCPU thread
    /// busy elsewhere for a while.
    pub fn hold(&self, i: u16, held: bool) {
        self.vcpu(i).held.store(held, Ordering::SeqCst);
        self.kick(i, false);
    }

    /// Stops the vCPU threads and reports whether any of them panicked.
    pub fn stop(&self) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        for i in 0..self.vcpus.len() {
            self.kick(i as u16, false);
        }
        let mut ok = true;
        for h in self.threads.lock().unwrap().drain(..) {
            ok &= h.join().is_ok();
        }
        ok
    }

    fn vcpu(&self, i: u16) -> &VcpuShared {
        &self.vcpus[usize::from(i)]
    }

    /// The guest starts vCPU `i` (INIT/SIPI).
    pub fn start_vcpu(&self, i: u16) {
        self.vcpu(i).ready.store(true, Ordering::SeqCst);
        self.kick(i, false);
    }

    /// Guest progress counter of vCPU `i`: it grows while the vCPU runs guest code.
    pub fn progress(&self, i: u16) -> u64 {
        self.vcpu(i).progress.load(Ordering::SeqCst)
    }

    /// Waits until vCPU `i` has run at least `n` more guest slices; false on timeout.
    pub fn wait_progress(&self, i: u16, n: u64, timeout: Duration) -> bool {
        let start = self.progress(i);
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.progress(i) >= start + n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Makes the guest on vCPU `i` perform `a` on its next exit.
    pub fn guest_does(&self, i: u16, a: GuestAction) {
        self.vcpu(i).script.lock().unwrap().push_back(a);
        self.kick(i, false);
    }

    /// What vCPU `i` has observed so far (drained).
    pub fn take_log(&self, i: u16) -> Vec<Observed> {
        std::mem::take(&mut *self.vcpu(i).log.lock().unwrap())
    }

    /// Waits for vCPU `i` to log something matching `pred`.
    pub fn wait_log(&self, i: u16, timeout: Duration, pred: impl Fn(&Observed) -> bool) -> Option<Observed> {
        let t0 = Instant::now();
        loop {
            {
                let mut log = self.vcpu(i).log.lock().unwrap();
                if let Some(pos) = log.iter().position(&pred) {
                    return Some(log.remove(pos));
                }
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Guest MSR value as the guest sees it.
    pub fn msr(&self, i: u16, msr: u32) -> u64 {
        self.vcpu(i).msrs.lock().unwrap().get(&msr).copied().unwrap_or(0)
    }

    /// Guest control register value.
    pub fn cr(&self, i: u16, cr: u8) -> u64 {
        self.vcpu(i).crs.lock().unwrap()[usize::from(cr)]
    }

    /// Reads guest memory directly (what the guest would see).
    pub fn peek(&self, gpa: u64, len: usize) -> Vec<u8> {
        let m = self.memory.read().unwrap();
        m[gpa as usize..gpa as usize + len].to_vec()
    }

    /// Writes guest memory directly (as the guest would).
    pub fn poke_mem(&self, gpa: u64, data: &[u8]) {
        let mut m = self.memory.write().unwrap();
        m[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
    }

    /// Interceptions vCPU `i` has on.
    pub fn intercepts(&self, i: u16) -> Intercepts {
        self.vcpu(i).intercepts.lock().unwrap().clone()
    }

    /// Current page-access restrictions.
    pub fn page_restrictions(&self) -> BTreeMap<u64, u8> {
        self.pages.lock().unwrap().clone()
    }

    /// Every line the endpoint logged so far (not drained), oldest first.
    pub fn notices(&self) -> Vec<String> {
        self.notices.lock().unwrap().clone()
    }

    /// How many logged lines start with `prefix`.
    pub fn notices_starting_with(&self, prefix: &str) -> usize {
        self.notices.lock().unwrap().iter().filter(|l| l.starts_with(prefix)).count()
    }
}

impl VmBackend for FakeVm {
    fn vcpu_count(&self) -> u16 {
        self.vcpus.len() as u16
    }

    fn vcpu_ready(&self, vcpu: u16) -> bool {
        self.vcpus.get(usize::from(vcpu)).is_some_and(|v| v.ready.load(Ordering::SeqCst))
    }

    fn kick(&self, vcpu: u16, wait: bool) {
        let Some(v) = self.vcpus.get(usize::from(vcpu)) else { return };
        let before = v.exits.load(Ordering::SeqCst);
        *v.kick.lock().unwrap() = true;
        v.kicked.notify_all();
        if wait {
            let t0 = Instant::now();
            while v.in_guest.load(Ordering::SeqCst)
                && v.exits.load(Ordering::SeqCst) == before
                && t0.elapsed() < Duration::from_secs(5)
            {
                std::thread::yield_now();
            }
        }
    }

    fn read_physical(&self, gpa: u64, buf: &mut [u8]) -> BackendResult<()> {
        let m = self.memory.read().unwrap();
        let start = usize::try_from(gpa).map_err(|_| BackendError::NotFound)?;
        let src = m.get(start..start + buf.len()).ok_or(BackendError::NotFound)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_physical(&self, gpa: u64, data: &[u8]) -> BackendResult<()> {
        let mut m = self.memory.write().unwrap();
        let start = usize::try_from(gpa).map_err(|_| BackendError::NotFound)?;
        let dst = m.get_mut(start..start + data.len()).ok_or(BackendError::NotFound)?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn max_gpa(&self) -> u64 {
        self.memory.read().unwrap().len() as u64
    }

    fn caps(&self) -> HostCaps {
        self.caps
    }

    fn support_page_access(&self) -> Option<&dyn PageAccessOps> {
        if self.caps.commands.contains(ukvmi_wire::msg::VM_SET_PAGE_ACCESS) {
            Some(self)
        } else {
            None
        }
    }

    fn support_shared_memory(&self) -> Option<&dyn SharedMemoryOps> {
        matches!(*self.memory.read().unwrap(), FakeRam::Memfd { .. }).then_some(self as &dyn SharedMemoryOps)
    }
}

impl SharedMemoryOps for FakeVm {
    fn ram_fd(&self) -> BorrowedFd<'_> {
        // The file is never replaced, so its descriptor outlives the guard.
        let fd = match &*self.memory.read().unwrap() {
            FakeRam::Memfd { file, .. } => file.as_raw_fd(),
            FakeRam::Vec(_) => -1,
        };
        // SAFETY: `fd` belongs to the memfd `self.memory` holds for as long
        // as `self` lives (support_shared_memory only offers this when it
        // exists); -1 is never handed out (the endpoint asks only then).
        unsafe { BorrowedFd::borrow_raw(fd) }
    }

    fn ram_size(&self) -> u64 {
        self.memory.read().unwrap().len() as u64
    }
}

/// The fake's guest RAM: a `Vec`, or a shared mapping of a memfd sealed
/// like the real VMM's (shrink, grow, seal; mode 0400). The fake guest
/// touches it through slices, which is fine for a test double whose
/// scripted guest writes do not race with the tests' own reads.
pub(crate) enum FakeRam {
    Vec(Vec<u8>),
    Memfd { file: std::fs::File, base: std::ptr::NonNull<u8>, len: usize },
}

// SAFETY: the memfd mapping is owned by the FakeRam and only reached
// through it (behind the FakeVm's RwLock), like the Vec.
unsafe impl Send for FakeRam {}
// SAFETY: as for Send.
unsafe impl Sync for FakeRam {}

impl FakeRam {
    fn memfd(len: usize) -> FakeRam {
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: a NUL-terminated name and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fake-guest-ram".as_ptr(), flags) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len as u64).unwrap();
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS with an int argument on our memfd.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }, 0);
        // SAFETY: fchmod on our descriptor.
        assert_eq!(unsafe { libc::fchmod(fd, 0o400) }, 0);
        // SAFETY: a new shared read-write mapping of `len` bytes of the
        // sealed file; checked below.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        FakeRam::Memfd { file, base: std::ptr::NonNull::new(p.cast()).unwrap(), len }
    }
}

impl std::ops::Deref for FakeRam {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FakeRam::Vec(v) => v,
            // SAFETY: `len` bytes mapped at `base` for as long as self lives.
            FakeRam::Memfd { base, len, .. } => unsafe { std::slice::from_raw_parts(base.as_ptr(), *len) },
        }
    }
}

impl std::ops::DerefMut for FakeRam {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            FakeRam::Vec(v) => v,
            // SAFETY: as in deref, and `&mut self` makes this the only slice.
            FakeRam::Memfd { base, len, .. } => unsafe { std::slice::from_raw_parts_mut(base.as_ptr(), *len) },
        }
    }
}

impl Drop for FakeRam {
    fn drop(&mut self) {
        if let FakeRam::Memfd { base, len, .. } = self {
            // SAFETY: the mapping made in `memfd`; no slice of it outlives self.
            unsafe { libc::munmap(base.as_ptr().cast(), *len) };
        }
    }
}

impl PageAccessOps for FakeVm {
    fn set_page_access(&self, gpa: u64, access: u8) -> BackendResult<()> {
        if gpa >= self.memory.read().unwrap().len() as u64 {
            return Err(BackendError::Invalid("gfn is not guest memory".into()));
        }
        let gfn = gpa >> 12;
        let mut p = self.pages.lock().unwrap();
        if access == ukvmi_wire::access::RWX {
            p.remove(&gfn);
        } else {
            p.insert(gfn, access);
        }
        Ok(())
    }

    fn clear_page_access(&self) {
        self.pages.lock().unwrap().clear();
    }
}

/// The vCPU thread's own state.
struct FakeVcpu {
    vm: Arc<FakeVm>,
    index: u16,
    regs: KvmRegs,
    sregs: KvmSregs,
    xcr0: u64,
    xsave: Box<KvmXsave>,
    singlestep: bool,
    pending_exception: Option<Exception>,
}

impl FakeVcpu {
    fn new(vm: Arc<FakeVm>, index: u16) -> FakeVcpu {
        let cs = KvmSegment {
            selector: 0x10,
            type_: 11,
            present: 1,
            s: 1,
            l: 1,
            g: 1,
            limit: 0xffff_ffff,
            ..Default::default()
        };
        let crs = *vm.vcpu(index).crs.lock().unwrap();
        let sregs = KvmSregs { cs, cr0: crs[0], cr3: crs[3], cr4: crs[4], efer: 0xd00, ..Default::default() };
        let regs = KvmRegs {
            rip: KERNEL_BASE + 0x1000,
            rsp: KERNEL_BASE + 0x8000,
            rflags: 2,
            rax: u64::from(index),
            ..Default::default()
        };
        let mut xsave = Box::<KvmXsave>::default();
        xsave.region[0] = 0x037f;
        FakeVcpu { vm, index, regs, sregs, xcr0: 1, xsave, singlestep: false, pending_exception: None }
    }

    fn shared(&self) -> &VcpuShared {
        self.vm.vcpu(self.index)
    }

    fn log(&self, o: Observed) {
        self.shared().log.lock().unwrap().push(o);
    }

    fn run(mut self, port: VcpuPort) {
        let vm = Arc::clone(&self.vm);
        let me = vm.vcpu(self.index);
        while !vm.stop.load(Ordering::SeqCst) {
            if me.ready.load(Ordering::SeqCst) {
                // "Guest mode": one slice of guest code, ended early by a kick.
                me.in_guest.store(true, Ordering::SeqCst);
                if let Some(exc) = self.pending_exception.take() {
                    self.log(Observed::Injected(exc));
                }
                {
                    let k = me.kick.lock().unwrap();
                    let (mut k, _) = me.kicked.wait_timeout_while(k, Duration::from_millis(1), |k| !*k).unwrap();
                    *k = false;
                }
                me.progress.fetch_add(1, Ordering::SeqCst);
                self.regs.rip = self.regs.rip.wrapping_add(1);
                me.in_guest.store(false, Ordering::SeqCst);
                me.exits.fetch_add(1, Ordering::SeqCst);
                if self.singlestep {
                    if let Some(o) = port.raise(&mut self, EventPayload::Singlestep { failed: false }) {
                        if o.action == Action::Crash {
                            self.log(Observed::Crashed);
                        }
                    }
                }
                let action = me.script.lock().unwrap().pop_front();
                if let Some(a) = action {
                    self.perform(&port, a);
                }
            } else {
                let k = me.kick.lock().unwrap();
                let (mut k, _) = me.kicked.wait_timeout_while(k, Duration::from_millis(2), |k| !*k).unwrap();
                *k = false;
            }
            if !me.held.load(Ordering::SeqCst)
                && port.has_requests()
                && matches!(port.handle_requests(&mut self), Flow::Crash(_))
            {
                self.log(Observed::Crashed);
            }
        }
    }

    fn perform(&mut self, port: &VcpuPort, a: GuestAction) {
        let ev = match a {
            GuestAction::Int3 => {
                let gpa = self.regs.rip.wrapping_sub(KERNEL_BASE);
                EventPayload::Breakpoint { gpa, insn_len: 1 }
            }
            GuestAction::Hypercall => EventPayload::Hypercall,
            GuestAction::WriteMsr { msr, value } => {
                EventPayload::Msr { msr, old_value: self.vm.msr(self.index, msr), new_value: value }
            }
            GuestAction::WriteCr { cr, value } => {
                EventPayload::Cr { cr, old_value: self.vm.cr(self.index, cr), new_value: value }
            }
            GuestAction::Xsetbv { value } => EventPayload::Xsetbv { xcr: 0, old_value: self.xcr0, new_value: value },
            GuestAction::Gdt { write } => EventPayload::Descriptor { descriptor: ukvmi_wire::desc::GDTR, write },
            GuestAction::Write { gpa, .. } => {
                let restricted = self.vm.pages.lock().unwrap().get(&(gpa >> 12)).copied();
                match restricted {
                    Some(acc) if acc & ukvmi_wire::access::W == 0 => {
                        EventPayload::Pf { gva: gpa + KERNEL_BASE, gpa, access: ukvmi_wire::access::W }
                    }
                    _ => {
                        self.apply(a, None);
                        self.log(Observed::Event { cause: a, outcome: None });
                        return;
                    }
                }
            }
        };
        if matches!(a, GuestAction::Xsetbv { value } if value != self.xcr0) {
            // XSETBV is informational: the new value is already in place.
            if let GuestAction::Xsetbv { value } = a {
                self.xcr0 = value;
            }
        }
        let outcome = port.raise(self, ev);
        // Logged once the action took effect, so a test that saw the log
        // line sees its result too.
        match outcome {
            None => self.apply(a, None),
            Some(o) if o.action == Action::Crash => {
                self.log(Observed::Event { cause: a, outcome });
                self.log(Observed::Crashed);
                return;
            }
            Some(o) if o.action == Action::Continue => self.apply(a, o.new_val),
            Some(_) => {
                // RETRY: re-enter without completing the action. A memory
                // access is re-executed (the tool relaxed the page, or it
                // faults again); an int3 is not (the tool moved RIP past it).
                if matches!(a, GuestAction::Write { .. }) {
                    self.shared().script.lock().unwrap().push_front(a);
                }
            }
        }
        self.log(Observed::Event { cause: a, outcome });
    }

    /// Completes a guest action, with the tool's value for CR/MSR writes.
    fn apply(&mut self, a: GuestAction, new_val: Option<u64>) {
        match a {
            GuestAction::Int3 => {
                // The guest's own #BP: injected at the next entry, after int3.
                self.pending_exception.get_or_insert(Exception { nr: 3, error_code: 0, address: 0 });
            }
            GuestAction::WriteMsr { msr, value } => {
                self.vm.vcpu(self.index).msrs.lock().unwrap().insert(msr, new_val.unwrap_or(value));
            }
            GuestAction::WriteCr { cr, value } => {
                let v = new_val.unwrap_or(value);
                self.vm.vcpu(self.index).crs.lock().unwrap()[usize::from(cr)] = v;
                match cr {
                    0 => self.sregs.cr0 = v,
                    3 => self.sregs.cr3 = v,
                    4 => self.sregs.cr4 = v,
                    _ => {}
                }
            }
            GuestAction::Write { gpa, value } => self.vm.poke_mem(gpa, &[value]),
            GuestAction::Hypercall | GuestAction::Xsetbv { .. } | GuestAction::Gdt { .. } => {}
        }
    }
}

impl VcpuBackend for FakeVcpu {
    fn regs(&mut self) -> BackendResult<KvmRegs> {
        Ok(self.regs)
    }
    fn set_regs(&mut self, regs: &KvmRegs) -> BackendResult<()> {
        self.regs = *regs;
        Ok(())
    }
    fn sregs(&mut self) -> BackendResult<KvmSregs> {
        Ok(self.sregs)
    }
    fn msrs(&mut self, indices: &[u32], out: &mut [u64]) -> BackendResult<()> {
        let m = self.shared().msrs.lock().unwrap();
        for (i, idx) in indices.iter().enumerate() {
            if *idx == UNREADABLE_MSR || *idx == u32::MAX {
                return Err(BackendError::Invalid(format!("MSR {idx:#x}")));
            }
            out[i] = m.get(idx).copied().unwrap_or(0);
        }
        Ok(())
    }
    fn tsc_khz(&mut self) -> Option<u32> {
        Some(TSC_KHZ)
    }
    fn support_cpuid(&mut self) -> Option<&mut dyn CpuidOps> {
        Some(self)
    }
    fn support_xstate(&mut self) -> Option<&mut dyn XstateOps> {
        Some(self)
    }
    fn support_mtrr(&mut self) -> Option<&mut dyn MtrrOps> {
        Some(self)
    }
    fn support_translate(&mut self) -> Option<&mut dyn TranslateOps> {
        Some(self)
    }
    fn support_intercepts(&mut self) -> Option<&mut dyn InterceptOps> {
        Some(self)
    }
    fn support_singlestep(&mut self) -> Option<&mut dyn SinglestepOps> {
        if self.vm.caps.singlestep {
            Some(self)
        } else {
            None
        }
    }
    fn support_inject(&mut self) -> Option<&mut dyn InjectOps> {
        Some(self)
    }
}

impl CpuidOps for FakeVcpu {
    fn cpuid(&mut self, function: u32, index: u32) -> BackendResult<Option<[u32; 4]>> {
        Ok(match (function, index) {
            // "GenuineFake" style vendor leaf.
            (0, _) => Some([0xd, 0x756e_6547, 0x6c61_7665, 0x4b61_6b65]),
            (1, _) => Some([0x000a_0f12, u32::from(self.index) << 24, 1 << 26, 0]),
            _ => None,
        })
    }
}

impl XstateOps for FakeVcpu {
    fn xcr0(&mut self) -> BackendResult<u64> {
        Ok(self.xcr0)
    }
    fn xsave(&mut self) -> BackendResult<Box<KvmXsave>> {
        Ok(self.xsave.clone())
    }
    fn set_xsave(&mut self, area: &KvmXsave) -> BackendResult<()> {
        // Like KVM: reserved bits of the header's XSTATE_BV must be clear.
        if area.region[128] & !0x7 != 0 {
            return Err(BackendError::Invalid("reserved XSTATE_BV bits".into()));
        }
        *self.xsave = *area;
        Ok(())
    }
}

impl MtrrOps for FakeVcpu {
    fn mtrr_type(&mut self, gpa: u64) -> BackendResult<u8> {
        // Legacy VGA hole uncacheable, the rest write-back.
        Ok(if (0xa0000..0xc0000).contains(&gpa) { 0 } else { 6 })
    }
}

impl TranslateOps for FakeVcpu {
    fn translate_gva(&mut self, gva: u64) -> BackendResult<Option<u64>> {
        let mem = self.vm.memory.read().unwrap().len() as u64;
        Ok(gva.checked_sub(KERNEL_BASE).filter(|gpa| *gpa < mem))
    }
}

impl InterceptOps for FakeVcpu {
    fn set_event_intercept(&mut self, event: u16, enable: bool) -> BackendResult<()> {
        if event == ukvmi_wire::event::BREAKPOINT {
            self.shared().intercepts.lock().unwrap().breakpoint = enable;
        }
        Ok(())
    }
    fn set_cr_intercept(&mut self, cr: u8, enable: bool) -> BackendResult<()> {
        let mut ic = self.shared().intercepts.lock().unwrap();
        if enable {
            ic.crs.insert(cr);
        } else {
            ic.crs.remove(&cr);
        }
        Ok(())
    }
    fn set_msr_intercept(&mut self, msr: u32, enable: bool) -> BackendResult<()> {
        // The device manager filters this one (as KVM_X86_SET_MSR_FILTER would).
        if msr == 0x10 && enable {
            return Err(BackendError::Denied("MSR 0x10 is filtered by the VMM".into()));
        }
        let mut ic = self.shared().intercepts.lock().unwrap();
        if enable {
            ic.msrs.insert(msr);
        } else {
            ic.msrs.remove(&msr);
        }
        Ok(())
    }
}

impl SinglestepOps for FakeVcpu {
    fn set_singlestep(&mut self, enable: bool) -> BackendResult<()> {
        self.singlestep = enable;
        self.shared().intercepts.lock().unwrap().singlestep = enable;
        Ok(())
    }
}

impl InjectOps for FakeVcpu {
    fn inject(&mut self, exc: Exception) -> BackendResult<Exception> {
        // An exception already pending (e.g. a re-injected #BP) wins.
        let actual = *self.pending_exception.get_or_insert(exc);
        Ok(actual)
    }
}
