//! The VM: creating it (KVM objects, guest RAM, vCPU threads) and running
//! it until it ends.

mod config;
mod connection;
mod host;
mod shared;

pub use crate::exit::Exit;
pub use config::{BuiltinImage, Image, IntrospectConfig, SerialSink, VmConfig};
pub use host::{host_capabilities, HostKind};
pub(crate) use shared::{lock, Console, VmShared};

use crate::devices::serial::{IrqLine, SerialPort, SERIAL_GSI};
use crate::devices::PortBus;
use crate::error::{ConfigError, Error, ImageError, Result, SetupError, MAX_MEMORY_MIB};
use crate::kick;
use crate::linux::{LinuxEntry, LinuxState};
use crate::memory::GuestRam;
use crate::msr_filter::MsrFilter;
use crate::page_access::{self, GuestGate};
use crate::vcpu::{Debug, KvmVcpu, PfState, RegsCache};
use connection::connection_loop;
use host::{probe, register_ram};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use shared::VcpuShared;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use ukvmi_endpoint::handshake::VmIdentity;
use ukvmi_endpoint::{Dialect, Endpoint, HostCaps, Options, Permissions, VmBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Loads a Linux kernel (PVH or the 64-bit protocol), with the command line `user` (or the
/// default) plus, on a PVM host, the switches the emulator needs (said
/// once through `log`).
fn boot_linux(
    ram: &GuestRam,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    user: Option<&str>,
    host: HostKind,
    log: &dyn Fn(&str),
) -> Result<LinuxEntry> {
    use crate::linux::cmdline;
    let extra: &[&'static str] = if host == HostKind::Pvm { &cmdline::PVM_SWITCHES } else { &[] };
    let (line, added) = cmdline::build(user, extra);
    if !added.is_empty() {
        log(&format!("PVM host: added `{}` to the kernel command line", added.join(" ")));
    }
    crate::linux::load(ram, kernel, initrd, &line)
        .map_err(|source| ImageError::Linux { path: kernel.to_path_buf(), source }.into())
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

    /// Whether the guest has written to any port of the guest ABI (serial,
    /// power-off, start vCPU, hypercall) so far. A `--kernel` image that
    /// fails before it ever did most likely does not follow the ABI (not a
    /// 64-bit ring-0 flat binary or ELF64 image), which a front end can say.
    pub fn guest_spoke(&self) -> bool {
        self.0.has_spoken()
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
        config::check_limits(cfg.vcpus, cfg.memory_mib)?;
        let is_linux = matches!(cfg.image, Image::Linux { .. });
        if is_linux {
            config::check_linux_limits(cfg.vcpus, cfg.memory_mib)?;
        }
        kick::install();
        let kvm = Kvm::new().map_err(Error::NoKvm)?;
        let max = kvm.get_max_vcpus();
        if usize::from(cfg.vcpus) > max {
            return Err(ConfigError::HostVcpuLimit { requested: cfg.vcpus, max }.into());
        }
        let vmfd = kvm.create_vm().map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
        let bytes = cfg
            .memory_mib
            .checked_mul(1 << 20)
            .ok_or(ConfigError::TooMuchMemory { mib: cfg.memory_mib, max: MAX_MEMORY_MIB })?;
        let ram = GuestRam::new(bytes)?;
        let host_base = register_ram(&vmfd, &ram)?;
        let page_access = page_access::probe(&kvm, &vmfd, host_base, ram.size())?;
        let host_kind = HostKind::probe();
        let console = Arc::new(Mutex::new(Console::new(cfg.serial)));
        let (entry, linux) = match &cfg.image {
            Image::Linux { kernel, initrd, cmdline } => {
                let boot = boot_linux(&ram, kernel, initrd.as_deref(), cmdline.as_deref(), host_kind, &*log)?;
                crate::linux::platform::create(&vmfd)?;
                let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::os("creating the serial irqfd", e))?;
                vmfd.register_irqfd(&evt, SERIAL_GSI).map_err(|e| Error::kvm("KVM_IRQFD", e))?;
                let serial = SerialPort::new(IrqLine(evt), Arc::clone(&console));
                let state = LinuxState {
                    boot,
                    bus: Mutex::new(PortBus::pc(Arc::clone(&log), serial)),
                    completed: Mutex::new(HashSet::new()),
                    int3_sites: Mutex::new(HashSet::new()),
                    int3s: AtomicU64::new(0),
                    completions: AtomicU64::new(0),
                    symbols: {
                        let mut s = cfg.symbols.clone();
                        s.sort();
                        s
                    },
                };
                let entry = match boot {
                    LinuxEntry::Pvh { entry, .. } | LinuxEntry::Boot64 { entry, .. } => entry,
                };
                (entry, Some(state))
            }
            other => {
                crate::boot::write_tables(&ram)?;
                (crate::loader::load_image(&ram, other)?, None)
            }
        };
        let cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| Error::kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut fds = Vec::new();
        for i in 0..cfg.vcpus {
            let fd = vmfd.create_vcpu(u64::from(i)).map_err(|e| Error::kvm("KVM_CREATE_VCPU", e))?;
            if is_linux {
                let mut own = cpuid.clone();
                crate::linux::cpuid::adjust(&mut own, i as u8, host_kind == HostKind::Pvm);
                fd.set_cpuid2(&own).map_err(|e| Error::kvm("KVM_SET_CPUID2", e))?;
                crate::linux::platform::setup_vcpu(&fd)?;
            } else {
                fd.set_cpuid2(&cpuid).map_err(|e| Error::kvm("KVM_SET_CPUID2", e))?;
            }
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
            caps: HostCaps::from(probed),
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exited: Condvar::new(),
            serial: console,
            spoke: AtomicBool::new(false),
            log: Arc::clone(&log),
            linux,
        });
        let perms = Permissions::allow_all();
        if let Some(ids) = &cfg.allow_commands {
            let _ = perms.set_command(-1, false);
            for id in ids {
                perms
                    .set_command(i32::from(*id), true)
                    .map_err(|source| ConfigError::AllowCommand { id: *id, source })?;
            }
        }
        if let Some(ids) = &cfg.allow_events {
            let _ = perms.set_event(-1, false);
            for id in ids {
                perms.set_event(i32::from(*id), true).map_err(|source| ConfigError::AllowEvent { id: *id, source })?;
            }
        }
        let dialect = cfg.introspect.as_ref().map_or(Dialect::V12, |i| i.dialect);
        let options = Options { permissions: perms, dialect, log: Some(Arc::clone(&log)) };
        let endpoint = Arc::new(Endpoint::with_options(Arc::clone(&shared) as Arc<dyn VmBackend>, options));
        let mut threads = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            let index = i as u16;
            let port = endpoint.vcpu_port(index).ok_or(SetupError::NoVcpuPort)?;
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
                regs_cache: RegsCache::default(),
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
        // A Linux guest's last words need not end with a newline (a
        // panic's). (The ABI's guests keep today's line-only output.)
        if let Some(l) = &self.shared.linux {
            lock(&self.shared.serial).flush_line();
            (self.log)(&l.summary());
        }
        why
    }
}
