//! What the benchmarks share: timing and statistics, the baselines measured
//! in the same run (bare UNIX-socket round trip, bare KVM exit, memcpy), the
//! `ukvmi run` child with its introspector connection, and (in `gdb`) QEMU's
//! gdbstub driven over the GDB remote serial protocol.
//!
//! Each bench binary includes this module with `mod common;` and uses only
//! part of it, hence the `dead_code` allowance.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

pub mod gdb;
pub mod guest_ram;
pub mod procfs;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use ukvmi_guests::layout;
use ukvmi_introspector::{Event, Listener, PendingEvent, Vm};

/// `cargo bench` passes `--bench`; `cargo test --benches/--all-targets` runs
/// bench binaries without it (or with `--list`). Returns false, after saying
/// so, when this is not a benchmark run: then nothing is started or timed.
pub fn is_bench_run(name: &str) -> bool {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list") {
        return true;
    }
    println!("{name}: benchmark skipped (run it with `cargo bench -p ukvmi --bench {name}`)");
    false
}

/// One figure: per-sample p50/p99 where each sample was timed, and the mean
/// (microseconds).
#[derive(Clone, Copy, Debug)]
pub struct Fig {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub mean: f64,
}

impl Fig {
    pub fn from_samples(mut v: Vec<Duration>) -> Fig {
        assert!(!v.is_empty());
        v.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mean = v.iter().map(|&d| us(d)).sum::<f64>() / v.len() as f64;
        let p99 = (v.len() * 99 / 100).min(v.len() - 1);
        Fig { p50: Some(us(v[v.len() / 2])), p99: Some(us(v[p99])), mean }
    }

    pub fn mean_only(mean_us: f64) -> Fig {
        Fig { p50: None, p99: None, mean: mean_us }
    }

    /// What ratios compare: the p50, or the mean where there are no samples.
    pub fn key(&self) -> f64 {
        self.p50.unwrap_or(self.mean)
    }

    /// "p50 / p99" (or the mean alone), µs, for tables.
    pub fn cell(&self) -> String {
        match (self.p50, self.p99) {
            (Some(a), Some(b)) => format!("{} / {}", num(a), num(b)),
            _ => format!("{} (mean)", num(self.mean)),
        }
    }
}

/// A number of µs with sensible precision.
pub fn num(x: f64) -> String {
    if x >= 1000.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// Runs `f` `warmup` times untimed, then `n` times timed.
pub fn measure(warmup: usize, n: usize, mut f: impl FnMut()) -> Fig {
    for _ in 0..warmup {
        f();
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    Fig::from_samples(v)
}

/// Bare UNIX-socket round trip: two threads, 24-byte ping-pong.
pub fn socket_rtt(warmup: usize, n: usize) -> Fig {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 24];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 24];
    let r = measure(warmup, n, || {
        a.write_all(&buf.clone()).unwrap();
        a.read_exact(&mut buf).unwrap();
    });
    drop(a);
    echo.join().unwrap();
    r
}

/// memcpy of `size` bytes from a source buffer of at least that size into a
/// fresh-enough destination (both touched beforehand, so no page faults are
/// timed).
pub fn memcpy(size: usize, warmup: usize, n: usize) -> Fig {
    let src: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut dst = vec![0u8; size];
    let f = measure(warmup, n, || {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    });
    assert_eq!(dst[size - 1], src[size - 1]);
    f
}

/// MB/s (10^6 bytes per second) of moving `size` bytes in `us` µs.
pub fn mbps(size: usize, us: f64) -> f64 {
    size as f64 / us
}

/// The bare KVM exit: a VM made here with kvm-ioctls, no VMM around it.
pub mod bare {
    use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
    use std::time::{Duration, Instant};

    /// 64 KiB of RAM ending at 4 GiB, so the reset vector (CS base
    /// 0xffff0000, IP 0xfff0) lands in it and no register needs setting.
    const MEM_BASE: u64 = 0xffff_0000;
    const MEM_SIZE: usize = 0x1_0000;
    const RESET_IP: usize = 0xfff0;
    const PORT: u16 = 0x500;
    /// Real mode: `mov $0x500,%dx; 1: out %al,(%dx); jmp 1b`.
    const CODE: [u8; 6] = [0xba, 0x00, 0x05, 0xee, 0xeb, 0xfd];

    /// Anonymous page-aligned memory, unmapped on drop.
    struct Mapping(*mut u8);

    impl Mapping {
        fn new() -> Result<Mapping, String> {
            // SAFETY: a fresh anonymous mapping chosen by the kernel; no
            // existing memory is touched.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    MEM_SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(format!("mmap: {}", std::io::Error::last_os_error()));
            }
            Ok(Mapping(p.cast()))
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: exactly what mmap returned; the VM using it is gone
            // (BareVm drops it last).
            unsafe { libc::munmap(self.0.cast(), MEM_SIZE) };
        }
    }

    /// A 1-vCPU VM. Fields drop in order: vCPU, VM, then RAM.
    pub struct BareVm {
        vcpu: VcpuFd,
        _vm: VmFd,
        _mem: Mapping,
    }

    impl BareVm {
        pub fn new() -> Result<BareVm, String> {
            let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
            let kvm = Kvm::new().map_err(e("/dev/kvm"))?;
            let vm = kvm.create_vm().map_err(e("KVM_CREATE_VM"))?;
            let mem = Mapping::new()?;
            // SAFETY: `mem` is MEM_SIZE writable bytes and the code fits
            // below its end (RESET_IP + 6 < 0x10000); no VM runs yet.
            unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), mem.0.add(RESET_IP), CODE.len()) };
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: MEM_BASE,
                memory_size: MEM_SIZE as u64,
                userspace_addr: mem.0 as u64,
            };
            // SAFETY: the region is `mem`, which outlives the VM (field
            // order of BareVm).
            unsafe { vm.set_user_memory_region(region) }.map_err(e("KVM_SET_USER_MEMORY_REGION"))?;
            // Only VMX without unrestricted guest needs it; other hosts may
            // refuse it, which is harmless. Three pages below the RAM.
            let _ = vm.set_tss_address(0xfffb_d000);
            let vcpu = vm.create_vcpu(0).map_err(e("KVM_CREATE_VCPU"))?;
            Ok(BareVm { vcpu, _vm: vm, _mem: mem })
        }

        /// One KVM_RUN, which must end in the guest's `out`.
        pub fn run_once(&mut self) -> Result<(), String> {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(PORT, _)) => Ok(()),
                other => Err(format!("expected KVM_EXIT_IO on {PORT:#x}, got {other:?}")),
            }
        }
    }

    /// `n` timed KVM_RUN → KVM_EXIT_IO round trips (after `warmup`).
    pub fn exit_loop(warmup: usize, n: usize) -> Result<Vec<Duration>, String> {
        let mut vm = BareVm::new()?;
        for _ in 0..warmup {
            vm.run_once()?;
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            vm.run_once()?;
            v.push(t.elapsed());
        }
        Ok(v)
    }
}

/// A `ukvmi run` child and its scratch directory: killed and removed on every
/// path out of the bench, panics included (drop runs while unwinding).
pub struct VmProcess {
    child: Child,
    dir: PathBuf,
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl VmProcess {
    /// The `ukvmi run` process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its scratch directory (removed on drop).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// What the VMM wrote to standard error so far (started with
    /// [`start_vm_with`]; empty otherwise).
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }
}

/// Like [`start_vm`], with `extra` arguments to `ukvmi run` (e.g.
/// `--reconnect`), and the path of the socket it connects to; the VMM's
/// standard error goes to [`VmProcess::stderr_text`].
pub fn start_vm_with(tag: &str, guest: &str, vcpus: u16, memory_mib: u64, extra: &[&str]) -> (VmProcess, Vm, PathBuf) {
    let dir = vm_scratch(&format!("ukvmi-bench-{tag}-{}", std::process::id()));
    let sock = dir.join("kvmi.sock");
    let listener = Listener::bind(&sock).unwrap().with_handshake_timeout(Duration::from_secs(20));
    let child = Command::new(env!("CARGO_BIN_EXE_ukvmi"))
        .args(["run", "--guest", guest])
        .args(["--vcpus", &vcpus.to_string(), "--memory", &memory_mib.to_string()])
        .arg("--serial")
        .arg(format!("file:{}", dir.join("serial").display()))
        .arg("--introspect")
        .arg(format!("unix:{}", sock.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .expect("start ukvmi run");
    let proc_ = VmProcess { child, dir };
    let vm = listener.accept().unwrap();
    (proc_, vm, sock)
}

/// Sums the VMM's "introspector disconnected (...) after N events (KIND n,
/// ...)" lines: (BREAKPOINT, SINGLESTEP, any other kind).
pub fn vmm_events(stderr: &str) -> (u64, u64, u64) {
    let (mut bp, mut ss, mut other) = (0, 0, 0);
    for line in stderr.lines().filter(|l| l.contains("introspector disconnected")) {
        let Some(kinds) = line.split(" events (").nth(1).and_then(|k| k.split(')').next()) else { continue };
        for kind in kinds.split(", ") {
            let (name, n) = kind.rsplit_once(' ').unwrap_or((kind, "0"));
            let n: u64 = n.parse().unwrap_or(0);
            match name {
                "BREAKPOINT" => bp += n,
                "SINGLESTEP" => ss += n,
                _ => other += n,
            }
        }
    }
    (bp, ss, other)
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Checks /dev/kvm (a benchmark fails, never skips, without it) and makes
/// an empty scratch directory `name` under the temporary directory.
pub fn vm_scratch(name: &str) -> std::path::PathBuf {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("the benchmarks start real VMs and need /dev/kvm, which cannot be opened: {e}");
    }
    let dir = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts `ukvmi run --guest GUEST --vcpus N --memory MIB` connected to a
/// fresh listener, and returns it with the accepted connection.
pub fn start_vm(tag: &str, guest: &str, vcpus: u16, memory_mib: u64) -> (VmProcess, Vm) {
    let (proc_, vm, _) = start_vm_with(tag, guest, vcpus, memory_mib, &[]);
    (proc_, vm)
}

/// A scratch directory under the temporary directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Makes an empty directory `name` under the temporary directory.
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    /// `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The u64 at guest-physical `gpa`.
pub fn read_u64(vm: &Vm, gpa: u64) -> u64 {
    u64::from_le_bytes(vm.read_physical(gpa, 8).unwrap().try_into().unwrap())
}

/// Switches the `bench` guest to loop `mode` (see `layout::BENCH_MODE`).
pub fn set_mode(vm: &Vm, mode: u64) {
    vm.write_physical(layout::BENCH_MODE, &mode.to_le_bytes()).unwrap();
}

/// The next event, which must be a vCPU's and come within `timeout`.
pub fn next_vcpu_event(vm: &Vm, timeout: Duration) -> PendingEvent {
    match vm.next_event(Some(timeout)).unwrap() {
        Some(Event::Vcpu(ev)) => ev,
        other => panic!("expected a vCPU event, got {other:?}"),
    }
}
