//! The VM: KVM objects, guest RAM, vCPU threads, the serial console, and the
//! introspection connection that comes and goes.

use crate::error::{Error, Result};
use crate::kick;
use crate::memory::GuestRam;
use crate::msr_filter::{self, MsrFilter};
use crate::page_access::{self, GuestGate, PageAccess, SlotSink};
use crate::vcpu::{Debug, KvmVcpu, PfState};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ukvmi_endpoint::handshake::{self, VmIdentity};
use ukvmi_endpoint::{
    BackendResult, Dialect, Endpoint, HostCaps, Options, PageAccessOps, Permissions, SharedMemoryOps, VmBackend,
};
use ukvmi_guests::{layout, Guest};
use ukvmi_wire::{event, msg};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What runs in the VM.
#[derive(Debug, Clone)]
pub enum Image {
    /// A built-in guest.
    Builtin(&'static Guest),
    /// A flat binary (loaded at 1 MiB) or an ELF64 file.
    Kernel(PathBuf),
}

/// How to reach the introspector.
#[derive(Debug, Clone)]
pub struct IntrospectConfig {
    /// UNIX socket the tool listens on.
    pub path: PathBuf,
    /// Shared secret the tool must prove (SHA-1 cookie).
    pub key: Option<Vec<u8>>,
    /// Seconds between connection attempts.
    pub reconnect: Duration,
    /// How long the tool has to answer the handshake.
    pub handshake_timeout: Duration,
    /// How long to wait for the tool to close after UNHOOK at shutdown.
    pub unhook_timeout: Duration,
    /// The KVMI dialect the tool speaks.
    pub dialect: Dialect,
    /// User ids the listening tool may run as (`SO_PEERCRED`); empty: the
    /// VMM's own uid and root.
    pub allowed_uids: Vec<u32>,
}

/// Where serial output goes.
pub enum SerialSink {
    /// The VMM's stdout.
    Stdout,
    /// Any writer (a file, a test buffer).
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for SerialSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SerialSink::Stdout => "Stdout",
            SerialSink::Writer(_) => "Writer",
        })
    }
}

/// Everything `ukvmi run` can set.
#[derive(Debug)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u16,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The guest.
    pub image: Image,
    /// VM name sent in the handshake.
    pub name: String,
    /// VM UUID sent in the handshake.
    pub uuid: [u8; 16],
    /// Allowed commands (None: all).
    pub allow_commands: Option<Vec<u16>>,
    /// Allowed events (None: all).
    pub allow_events: Option<Vec<u16>>,
    /// Serial console.
    pub serial: SerialSink,
    /// The introspector, if any.
    pub introspect: Option<IntrospectConfig>,
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The guest wrote its status to the power-off port.
    PowerOff(u8),
    /// Stopped from outside (a signal).
    Stopped,
    /// An event reply asked for CRASH.
    Crashed(String),
    /// The guest or the VMM failed.
    Failed(String),
}

pub(crate) struct VcpuShared {
    pub started: AtomicBool,
    /// The `KVM_SET_GUEST_DEBUG` control last applied (for reports).
    pub debug_control: std::sync::atomic::AtomicU32,
    pub in_guest: AtomicBool,
    pub exits: AtomicU64,
    thread: Mutex<Option<libc::pthread_t>>,
    wake: Mutex<bool>,
    woken: Condvar,
}

/// State shared by every thread of the VM; the endpoint's `VmBackend`.
pub(crate) struct VmShared {
    /// The VM fd, for VM-wide interception (MSR filter). Declared before
    /// `ram` so that it is closed (dropping KVM's use of the memory) before
    /// the RAM mapping goes.
    pub vm: VmFd,
    pub ram: GuestRam,
    /// Watched MSRs (present when the host delivers MSR-write exits).
    pub msr_filter: Option<MsrFilter>,
    /// Page restrictions (present when the host has read-only memslots and
    /// guest debug, see `page_access`).
    pub page_access: Option<PageAccess>,
    /// Closed while memslots change: no vCPU runs guest code then.
    pub gate: GuestGate,
    pub entry: u64,
    vcpus: Vec<VcpuShared>,
    caps: HostCaps,
    stop: AtomicBool,
    exit: Mutex<Option<Exit>>,
    exited: Condvar,
    serial: Mutex<(SerialSink, Vec<u8>)>,
}

impl VmShared {
    pub fn vcpu(&self, i: u16) -> Option<&VcpuShared> {
        self.vcpus.get(usize::from(i))
    }

    pub fn vcpu_count(&self) -> u16 {
        self.vcpus.len() as u16
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn register_thread(&self, i: u16, alive: bool) {
        if let Some(v) = self.vcpu(i) {
            // SAFETY: pthread_self has no preconditions.
            *lock(&v.thread) = alive.then(|| unsafe { libc::pthread_self() });
        }
    }

    /// Sleeps up to `t`, or until kicked.
    pub fn idle(&self, i: u16, t: Duration) {
        if let Some(v) = self.vcpu(i) {
            let g = lock(&v.wake);
            let (mut g, _) = v.woken.wait_timeout_while(g, t, |k| !*k).unwrap_or_else(|e| e.into_inner());
            *g = false;
        }
    }

    pub fn start_vcpu(&self, i: u16) {
        if let Some(v) = self.vcpu(i) {
            v.started.store(true, Ordering::SeqCst);
            self.kick(i, false);
        }
    }

    pub fn serial_byte(&self, b: u8) {
        let mut s = lock(&self.serial);
        s.1.push(b);
        if b == b'\n' || s.1.len() >= 256 {
            let line = std::mem::take(&mut s.1);
            let _ = match &mut s.0 {
                SerialSink::Stdout => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&line).and_then(|()| o.flush())
                }
                SerialSink::Writer(w) => w.write_all(&line).and_then(|()| w.flush()),
            };
        }
    }

    /// See [`StopHandle::interceptions`].
    pub fn interceptions(&self) -> String {
        let msrs = self.msr_filter.as_ref().map(MsrFilter::watched).unwrap_or_default();
        let msrs = if msrs.is_empty() {
            "none".to_string()
        } else {
            msrs.iter().map(|m| format!("{m:#x}")).collect::<Vec<_>>().join(",")
        };
        let mut debug = Vec::new();
        for (i, v) in self.vcpus.iter().enumerate() {
            let c = v.debug_control.load(Ordering::SeqCst);
            if c != 0 {
                let mut what = Vec::new();
                if c & kvm_bindings::KVM_GUESTDBG_SINGLESTEP != 0 {
                    what.push("singlestep");
                }
                if c & kvm_bindings::KVM_GUESTDBG_USE_SW_BP != 0 {
                    what.push("int3");
                }
                debug.push(format!("vcpu{i}:{}", what.join("+")));
            }
        }
        let debug = if debug.is_empty() { "none".to_string() } else { debug.join(",") };
        format!("interceptions: msr-writes={msrs} guest-debug={debug}")
    }

    /// Records how the VM ended (the first reason wins) and stops every vCPU.
    pub fn finish(&self, why: Exit) {
        {
            let mut e = lock(&self.exit);
            if e.is_none() {
                *e = Some(why);
            }
            self.exited.notify_all();
        }
        self.stop.store(true, Ordering::SeqCst);
        for i in 0..self.vcpu_count() {
            self.kick(i, false);
        }
    }
}

impl VmBackend for VmShared {
    fn vcpu_count(&self) -> u16 {
        self.vcpus.len() as u16
    }

    fn vcpu_ready(&self, vcpu: u16) -> bool {
        self.vcpu(vcpu).is_some_and(|v| v.started.load(Ordering::SeqCst))
    }

    fn kick(&self, vcpu: u16, wait: bool) {
        let Some(v) = self.vcpu(vcpu) else { return };
        let before = v.exits.load(Ordering::SeqCst);
        *lock(&v.wake) = true;
        v.woken.notify_all();
        if let Some(t) = *lock(&v.thread) {
            kick::signal(t);
        }
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
        self.ram.read(gpa, buf)
    }

    fn write_physical(&self, gpa: u64, data: &[u8]) -> BackendResult<()> {
        self.ram.write(gpa, data)
    }

    fn max_gpa(&self) -> u64 {
        self.ram.size()
    }

    fn caps(&self) -> HostCaps {
        self.caps
    }

    fn support_page_access(&self) -> Option<&dyn PageAccessOps> {
        self.page_access.is_some().then_some(self as &dyn PageAccessOps)
    }

    fn support_shared_memory(&self) -> Option<&dyn SharedMemoryOps> {
        Some(self as &dyn SharedMemoryOps)
    }
}

/// `UKVMI_VM_MAP_MEMORY`: guest RAM is one sealed memfd from gpa 0. The
/// tool's mapping is a second view of the same pages; it does not go
/// through KVM's memslots, so page-access restrictions (which live in the
/// memslot layout) keep applying to the guest and never to the tool.
impl SharedMemoryOps for VmShared {
    fn ram_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ram.fd()
    }

    fn ram_size(&self) -> u64 {
        self.ram.size()
    }
}

impl PageAccessOps for VmShared {
    fn set_page_access(&self, gpa: u64, access: u8) -> BackendResult<()> {
        let pa = self.page_access.as_ref().ok_or(ukvmi_endpoint::BackendError::NotSupported)?;
        pa.set_with(self, gpa, access)
    }

    fn clear_page_access(&self) {
        if let Some(pa) = &self.page_access {
            if let Err(e) = pa.clear_with(self) {
                // Nothing to answer to (unhook); the guest may now fault on
                // RAM it should see, so say it loudly.
                // Never panics, even with stderr closed.
                let _ = writeln!(std::io::stderr(), "ukvmi: removing page restrictions failed: {e}");
            }
        }
    }
}

/// What the probe found on this host.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Probed {
    /// MSR-write exits through the MSR filter.
    pub msr_events: bool,
    /// `KVM_SET_GUEST_DEBUG` (single-step, int3 exits).
    pub guest_debug: bool,
    /// `KVM_GET/SET_VCPU_EVENTS` (exception injection, #BP re-injection).
    pub vcpu_events: bool,
    /// Page restrictions by memslot surgery work (`page_access::probe`).
    pub page_access: bool,
}

/// Probes `vm` (a VM of `kvm`): capabilities, and the MSR filter's exit
/// reason, which it enables on `vm` as a side effect.
fn probe(kvm: &Kvm, vm: &VmFd) -> Probed {
    let cap = |c: u32| kvm.check_extension_raw(u64::from(c)) > 0;
    Probed {
        msr_events: msr_filter::probe(kvm, vm),
        guest_debug: cap(kvm_bindings::KVM_CAP_SET_GUEST_DEBUG),
        vcpu_events: cap(kvm_bindings::KVM_CAP_VCPU_EVENTS),
        page_access: false,
    }
}

/// Registers all of `ram` as memslot 0 of `vm`; returns its host address.
/// The caller keeps `ram` mapped for as long as `vm` exists.
fn register_ram(vm: &VmFd, ram: &GuestRam) -> Result<u64> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base()?,
    };
    // SAFETY: the region is `ram`'s own mapping, which the caller keeps
    // alive while `vm` (the only user of the slot) exists: `VmShared`
    // declares `vm` before `ram`, and `host_capabilities` drops them in
    // that order.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    Ok(region.userspace_addr)
}

/// What KVMI commands and events this host serves: probes `/dev/kvm` with a
/// throwaway VM, exactly as [`Vm::new`] does for a real one.
pub fn host_capabilities() -> Result<HostCaps> {
    let kvm = Kvm::new().map_err(|e| Error::NoKvm(e.to_string()))?;
    let vm = kvm.create_vm().map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
    let mut probed = probe(&kvm, &vm);
    // Page restrictions are probed by really splitting a memslot of RAM.
    let ram = GuestRam::new(1 << 20)?;
    // `vm` is dropped (with its memslots) below, before `ram`.
    let host_base = register_ram(&vm, &ram)?;
    probed.page_access = page_access::probe(&kvm, &vm, host_base, ram.size()).map_err(Error::Config)?.is_some();
    drop(vm);
    drop(ram);
    Ok(host_caps(probed))
}

/// Memslot changes for page restrictions, with every vCPU out of guest mode.
impl SlotSink for VmShared {
    fn set_region(&self, region: kvm_userspace_memory_region) -> std::result::Result<(), String> {
        page_access::set_region(&self.vm, region)
    }
    fn begin_update(&self) {
        self.gate.close(&|| {
            for i in 0..self.vcpu_count() {
                self.kick(i, false);
            }
        });
    }
    fn end_update(&self) {
        self.gate.open();
    }
}

/// What this host can do through stock KVM, decided by probing. What is
/// missing answers `-KVM_EOPNOTSUPP` up front, never failing later.
///
/// CR, XSETBV and DESCRIPTOR events (and CONTROL_CR) have no exit to
/// userspace on a stock kernel. BREAKPOINT needs #BP re-injection
/// (VCPU_EVENTS); HYPERCALL is the VMM's own doorbell and always works.
fn host_caps(p: Probed) -> HostCaps {
    let mut caps = HostCaps::full().without_command(msg::VCPU_CONTROL_CR);
    if !p.vcpu_events {
        caps = caps.without_command(msg::VCPU_INJECT_EXCEPTION);
    }
    if !p.guest_debug {
        caps = caps.without_command(msg::VCPU_CONTROL_SINGLESTEP);
    }
    if !p.msr_events {
        caps = caps.without_command(msg::VCPU_CONTROL_MSR);
    }
    if !p.page_access {
        caps = caps.without_command(msg::VM_SET_PAGE_ACCESS);
    }
    for id in event::VCPU_EVENTS {
        let have = match id {
            event::PAUSE | event::HYPERCALL => true,
            event::MSR => p.msr_events,
            event::BREAKPOINT | event::TRAP => p.vcpu_events,
            event::SINGLESTEP => p.guest_debug,
            event::PF => p.page_access,
            _ => false,
        };
        if !have {
            caps = caps.without_event(id);
        }
    }
    caps
}

/// Loads the image into RAM and returns the entry point.
fn load(ram: &GuestRam, image: &Image) -> Result<u64> {
    match image {
        Image::Builtin(g) => {
            ram.write(g.load_addr, g.image)
                .map_err(|_| Error::Config(format!("guest {} does not fit in RAM", g.name)))?;
            Ok(g.entry)
        }
        Image::Kernel(path) => {
            let bytes = std::fs::read(path)
                .map_err(|e| Error::Config(format!("cannot read kernel {}: {e}", path.display())))?;
            crate::loader::load(ram, &bytes).map_err(|e| Error::Config(format!("kernel {}: {e}", path.display())))
        }
    }
}

/// Writes the GDT and identity page tables of the guest ABI.
fn write_tables(ram: &GuestRam) -> Result<()> {
    let gdt: [u64; 5] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8900_0000_0067, 0];
    let fail = |_| Error::Config("RAM too small for page tables".into());
    for (i, e) in gdt.iter().enumerate() {
        ram.write_u64(layout::GDT_ADDR + 8 * i as u64, *e).map_err(fail)?;
    }
    let pdpt = layout::PML4_ADDR + 0x1000;
    let pd = layout::PML4_ADDR + 0x2000;
    ram.write_u64(layout::PML4_ADDR, pdpt | 3).map_err(fail)?;
    ram.write_u64(pdpt, pd | 3).map_err(fail)?;
    for i in 0..512u64 {
        ram.write_u64(pd + 8 * i, (i << 21) | 0x83).map_err(fail)?;
    }
    // The ABI's alias: GVA 1 GiB (PDPT[1]) → one 2 MiB page at ALIAS_GPA.
    ram.write_u64(pdpt + 8, layout::ALIAS_PD_ADDR | 3).map_err(fail)?;
    ram.write_u64(layout::ALIAS_PD_ADDR, layout::ALIAS_GPA | 0x83).map_err(fail)?;
    Ok(())
}

/// A handle to stop a running VM from another thread (e.g. on SIGTERM).
#[derive(Clone)]
pub struct StopHandle(Arc<VmShared>);

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StopHandle")
    }
}

impl StopHandle {
    /// One line describing every interception in force now: the MSRs the
    /// filter stops, guest debugging per vCPU, restricted pages. After an
    /// unhook with cleanup, all are gone.
    pub fn interceptions(&self) -> String {
        self.0.interceptions()
    }

    /// Asks the VM to stop; `Vm::run` then unhooks cleanly and returns.
    pub fn stop(&self) {
        let mut e = lock(&self.0.exit);
        if e.is_none() {
            *e = Some(Exit::Stopped);
        }
        self.0.exited.notify_all();
    }
}

/// A created VM, ready to run.
pub struct Vm {
    shared: Arc<VmShared>,
    endpoint: Arc<Endpoint>,
    threads: Vec<JoinHandle<Option<Exit>>>,
    introspect: Option<IntrospectConfig>,
    identity: VmIdentity,
    log: Arc<dyn Fn(&str) + Send + Sync>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("vcpus", &self.shared.vcpu_count()).finish()
    }
}

impl Vm {
    /// Creates the VM and its vCPU threads (vCPU 0 starts at once).
    /// `log` receives one-line status messages (connections, errors).
    pub fn new(cfg: VmConfig, log: Arc<dyn Fn(&str) + Send + Sync>) -> Result<Vm> {
        if cfg.vcpus == 0 {
            return Err(Error::Config("--vcpus must be at least 1".into()));
        }
        if cfg.vcpus > layout::MAX_VCPUS {
            return Err(Error::Config(format!(
                "--vcpus {} is more than the guest ABI's {} (one 16 KiB stack each below 512 KiB)",
                cfg.vcpus,
                layout::MAX_VCPUS
            )));
        }
        if cfg.memory_mib < 4 {
            return Err(Error::Config("--memory must be at least 4 MiB".into()));
        }
        if cfg.memory_mib > MAX_MEMORY_MIB {
            return Err(Error::Config(format!(
                "--memory {} MiB is more than the {MAX_MEMORY_MIB} MiB (1 TiB) ukvmi supports",
                cfg.memory_mib
            )));
        }
        kick::install();
        let kvm = Kvm::new().map_err(|e| Error::NoKvm(e.to_string()))?;
        let max = kvm.get_max_vcpus();
        if usize::from(cfg.vcpus) > max {
            return Err(Error::Config(format!("--vcpus {} exceeds this host's limit of {max}", cfg.vcpus)));
        }
        let vmfd = kvm.create_vm().map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
        let bytes = cfg.memory_mib.checked_mul(1 << 20).ok_or_else(|| Error::Config("--memory is too large".into()))?;
        let ram = GuestRam::new(bytes)?;
        let host_base = register_ram(&vmfd, &ram)?;
        let page_access = page_access::probe(&kvm, &vmfd, host_base, ram.size()).map_err(Error::Config)?;
        write_tables(&ram)?;
        let entry = load(&ram, &cfg.image)?;
        let cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| Error::kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut fds = Vec::new();
        for i in 0..cfg.vcpus {
            let fd = vmfd.create_vcpu(u64::from(i)).map_err(|e| Error::kvm("KVM_CREATE_VCPU", e))?;
            fd.set_cpuid2(&cpuid).map_err(|e| Error::kvm("KVM_SET_CPUID2", e))?;
            fds.push(fd);
        }
        let mut probed = probe(&kvm, &vmfd);
        probed.page_access = page_access.is_some();
        let shared = Arc::new(VmShared {
            ram,
            vm: vmfd,
            msr_filter: probed.msr_events.then(MsrFilter::default),
            page_access,
            gate: GuestGate::default(),
            entry,
            vcpus: (0..cfg.vcpus)
                .map(|i| VcpuShared {
                    started: AtomicBool::new(i == 0),
                    debug_control: std::sync::atomic::AtomicU32::new(0),
                    in_guest: AtomicBool::new(false),
                    exits: AtomicU64::new(0),
                    thread: Mutex::new(None),
                    wake: Mutex::new(false),
                    woken: Condvar::new(),
                })
                .collect(),
            caps: host_caps(probed),
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exited: Condvar::new(),
            serial: Mutex::new((cfg.serial, Vec::new())),
        });
        let perms = Permissions::allow_all();
        if let Some(ids) = &cfg.allow_commands {
            let _ = perms.set_command(-1, false);
            for id in ids {
                perms
                    .set_command(i32::from(*id), true)
                    .map_err(|e| Error::Config(format!("--allow-command {id}: {e}")))?;
            }
        }
        if let Some(ids) = &cfg.allow_events {
            let _ = perms.set_event(-1, false);
            for id in ids {
                perms.set_event(i32::from(*id), true).map_err(|e| Error::Config(format!("--allow-event {id}: {e}")))?;
            }
        }
        let dialect = cfg.introspect.as_ref().map_or(Dialect::V12, |i| i.dialect);
        let options = Options { permissions: perms, dialect, log: Some(Arc::clone(&log)) };
        let endpoint = Arc::new(Endpoint::with_options(Arc::clone(&shared) as Arc<dyn VmBackend>, options));
        let mut threads = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            let index = i as u16;
            let port = endpoint.vcpu_port(index).ok_or_else(|| Error::Config("vCPU port".into()))?;
            let v = KvmVcpu {
                fd,
                index,
                shared: Arc::clone(&shared),
                cpuid: cpuid.clone(),
                debug: Debug::default(),
                pf: PfState::default(),
                emul_retry: None,
                tf_frames: Vec::new(),
                drain_steps: 0,
                last_step: None,
                pending_exception: None,
            };
            let sh = Arc::clone(&shared);
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    let end = v.run(port);
                    if let Some(e) = &end {
                        sh.finish(e.clone());
                    }
                    end
                })
                .map_err(|e| Error::os("spawning a vCPU thread", e))?;
            threads.push(h);
        }
        let start_time =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let identity = VmIdentity { uuid: cfg.uuid, name: cfg.name, start_time, max_gpa: shared.ram.size() };
        Ok(Vm { shared, endpoint, threads, introspect: cfg.introspect, identity, log })
    }

    /// A handle that stops the VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(Arc::clone(&self.shared))
    }

    /// The KVMI endpoint (for embedding and tests).
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Runs until the guest powers off, fails, is crashed, or is stopped.
    pub fn run(mut self) -> Exit {
        let conn = self.introspect.clone().map(|cfg| {
            let ep = Arc::clone(&self.endpoint);
            let sh = Arc::clone(&self.shared);
            let id = self.identity.clone();
            let log = Arc::clone(&self.log);
            std::thread::Builder::new()
                .name("kvmi-connect".into())
                .spawn(move || connection_loop(&ep, &sh, &cfg, &id, &*log))
        });
        let why = {
            let e = lock(&self.shared.exit);
            let e = self.shared.exited.wait_while(e, |e| e.is_none()).unwrap_or_else(|p| p.into_inner());
            e.clone().unwrap_or(Exit::Stopped)
        };
        // A connected tool is told first (if it asked) and given time to
        // clean up. From here on no new tool is hooked (connection_loop
        // checks `exit` under its lock before hooking).
        if let Some(cfg) = &self.introspect {
            if self.endpoint.is_connected() {
                self.pre_unhook(cfg.unhook_timeout);
            }
        }
        self.shared.finish(why.clone());
        self.endpoint.unhook();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        if let Some(Ok(h)) = conn {
            let _ = h.join();
        }
        self.endpoint.unhook();
        why
    }
}

impl Vm {
    /// Sends UNHOOK and waits up to `timeout` for the tool to close. A tool
    /// that stopped reading its socket can block the send itself: then the
    /// connection is shut down at the deadline, which ends the send.
    fn pre_unhook(&self, timeout: Duration) {
        let ep = &self.endpoint;
        let log = &self.log;
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            s.spawn(move || {
                let _ = tx.send(ep.pre_unhook(timeout));
            });
            match rx.recv_timeout(timeout + Duration::from_millis(500)) {
                Ok(Ok(true)) => log("introspector closed after UNHOOK"),
                Ok(Ok(false)) => log("introspector did not close within the unhook timeout"),
                Ok(Err(_)) => {}
                Err(_) => {
                    log("introspector is not reading its socket; closing the connection");
                    ep.unhook();
                }
            }
        });
    }
}

/// "3 events (PAUSE 2, PF 1)" for the disconnect line.
fn events_line(sent: &[(u16, u32)]) -> String {
    let total: u32 = sent.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return "0 events".into();
    }
    let kinds: Vec<String> = sent
        .iter()
        .map(|&(id, n)| {
            let name = event::name(id).unwrap_or("?");
            format!("{} {n}", name.trim_start_matches("KVMI_VCPU_EVENT_"))
        })
        .collect();
    format!("{total} events ({})", kinds.join(", "))
}

/// The most guest RAM a VM may have, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// How long a v7 connection waits for the guest to start its vCPUs.
const V7_START_WAIT: Duration = Duration::from_secs(5);

/// Waits until the guest has started every vCPU (at most `limit`; false if
/// it had not by then, or the VM is stopping). v7 tools (libmicrovmi) give
/// up on the `-KVM_EAGAIN` a vCPU that is not started yet answers, and a
/// tool already listening when the VM starts would connect within
/// milliseconds of boot, before the guest brought its other vCPUs up.
fn wait_for_vcpus(sh: &VmShared, limit: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        let all = (0..sh.vcpu_count()).all(|i| sh.vcpu(i).is_some_and(|v| v.started.load(Ordering::SeqCst)));
        if all {
            return true;
        }
        if t0.elapsed() >= limit || sh.stopping() || lock(&sh.exit).is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Connects to the tool, serves it until it goes, and tries again every
/// `reconnect`, as QEMU's `reconnect=N` chardev does. The guest never waits.
fn connection_loop(ep: &Endpoint, sh: &VmShared, cfg: &IntrospectConfig, id: &VmIdentity, log: &dyn Fn(&str)) {
    if cfg.dialect == Dialect::V7 && !wait_for_vcpus(sh, V7_START_WAIT) {
        log(&format!(
            "not every vCPU was started within {V7_START_WAIT:?}; connecting anyway \
             (a v7 tool may get -KVM_EAGAIN for the others)"
        ));
    }
    let mut last_err = String::new();
    while !sh.stopping() && lock(&sh.exit).is_none() {
        let stop = || sh.stopping() || lock(&sh.exit).is_some();
        let opts = handshake::ConnectOptions {
            key: cfg.key.as_deref(),
            timeout: cfg.handshake_timeout,
            allowed_uids: &cfg.allowed_uids,
            cancel: &stop,
        };
        match handshake::connect_with(&cfg.path, id, &opts) {
            Ok(stream) => {
                last_err.clear();
                // Hook under the exit lock: once `Vm::run` has seen the VM
                // end, no new session can start behind its back.
                let hooked = {
                    let exit = lock(&sh.exit);
                    if exit.is_some() || sh.stopping() {
                        return;
                    }
                    ep.hook(stream)
                };
                if let Err(e) = hooked {
                    log(&format!("introspection: {e}"));
                } else {
                    log(&format!("introspector connected at {}", cfg.path.display()));
                    while !ep.wait_disconnected(Some(Duration::from_millis(100))) {
                        if sh.stopping() || lock(&sh.exit).is_some() {
                            return;
                        }
                    }
                    let events = events_line(&ep.events_sent());
                    let why = ep.unhook();
                    log(&format!(
                        "introspector disconnected ({}) after {events}; the guest keeps running",
                        why.map_or_else(|| "closed".to_string(), |w| w.to_string())
                    ));
                }
            }
            Err(e) => {
                let s = e.to_string();
                if s != last_err {
                    log(&format!("introspection: {s}; retrying every {:?}", cfg.reconnect));
                    last_err = s;
                }
            }
        }
        let t0 = Instant::now();
        while t0.elapsed() < cfg.reconnect {
            if sh.stopping() || lock(&sh.exit).is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20).min(cfg.reconnect));
        }
    }
}
