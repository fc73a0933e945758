//! A real Linux guest end to end: the test kernel scripts/linux builds
//! (`UKVMI_LINUX_KERNEL`, `UKVMI_LINUX_INITRD`, `UKVMI_LINUX_SYSTEM_MAP`;
//! scripts/test exports them) booted once by `ukvmi run --kernel`, with
//! guards armed before the boot, and the tools run against it.
//!
//! One boot serves every test (it takes minutes on a PVM host): the first
//! test to need it starts it ([`boot`]), the others wait for it, and all of
//! them then run at once against it, each only through the `ukvmi` binary
//! (the page-guard test plants its rootkit stub with `ukvmi write`). So no
//! test may disturb another's view: streams are per command, and the one
//! pause (while the stub goes in) is brief and let go on every path out.
//! Each test fails with the reason when /dev/kvm or the kernel is missing;
//! none skips.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{mpsc, Mutex, OnceLock},
    time::{Duration, Instant},
};

/// How long the boot may take to reach `Run /init` (a PVM host emulates
/// every ring-0 instruction).
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// The kernel command line the tests boot with (docs/plan-linux-guest.md
/// §4.2: no BTF self-check at boot, the spinning /init from the initramfs).
const CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 initcall_blacklist=kfunc_init rdinit=/init";

/// The function the breakpoint test hooks: in `.text` (not `.init.text`,
/// which the kernel frees), called once per kernel thread during boot.
const BP_SYMBOL: &str = "kthread_create_on_node";

/// What scripts/linux built.
struct Kernel {
    vmlinux: PathBuf,
    initrd: PathBuf,
    system_map: PathBuf,
}

fn env_path(var: &str) -> PathBuf {
    let p = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: the Linux tests need the test kernel; run scripts/linux (scripts/test exports it)")
    });
    let p = PathBuf::from(p);
    assert!(p.is_file(), "{var}={} does not exist: run scripts/linux", p.display());
    p
}

fn kernel() -> Kernel {
    Kernel {
        vmlinux: env_path("UKVMI_LINUX_KERNEL"),
        initrd: env_path("UKVMI_LINUX_INITRD"),
        system_map: env_path("UKVMI_LINUX_SYSTEM_MAP"),
    }
}

/// The address of `name` in the kernel's System.map.
fn symbol(k: &Kernel, name: &str) -> u64 {
    let map = std::fs::read_to_string(&k.system_map).unwrap();
    map.lines()
        .find_map(|l| {
            let mut p = l.split_whitespace();
            let (a, _, n) = (p.next()?, p.next()?, p.next()?);
            (n == name).then(|| u64::from_str_radix(a, 16).unwrap())
        })
        .unwrap_or_else(|| panic!("{name} is not in {}", k.system_map.display()))
}

/// The booted guest and the guards armed before it booted.
struct Boot {
    kernel: Kernel,
    dir: PathBuf,
    sock: PathBuf,
    serial: PathBuf,
    vmm_stderr: PathBuf,
    /// `watch-msr LSTAR --json`, started before the VM.
    lstar_out: PathBuf,
    /// `trace --breakpoint kthread_create_on_node --json`, started before the VM.
    bp_out: PathBuf,
    /// The processes (VMM and streams), killed when the test binary ends
    /// (PR_SET_PDEATHSIG against the keeper thread that started them).
    _children: Mutex<Vec<Child>>,
}

impl Boot {
    fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// The serial tail and the VMM's stderr, for failure messages.
    fn context(&self) -> String {
        let tail = |p: &Path| {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = t.lines().rev().take(25).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n    ")
        };
        format!(
            "\n--- serial (last lines):\n    {}\n--- the VMM's stderr:\n    {}\n--- scratch dir: {}",
            tail(&self.serial),
            tail(&self.vmm_stderr),
            self.dir.display()
        )
    }

    /// `ukvmi --vm SOCK ARGS`.
    fn tool(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ukvmi"))
            .arg("--vm")
            .arg(&self.sock)
            .arg("--map")
            .arg(&self.kernel.vmlinux)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn tool_ok(&self, args: &[&str]) -> String {
        let o = self.tool(args);
        assert!(
            o.status.success(),
            "ukvmi {args:?}: {}\nstderr: {}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            self.context()
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

/// A child process that dies with the thread that started it.
fn spawn(cmd: &mut Command) -> Child {
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl(2) and signal(2), which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// Starts everything once: the guards (they wait for the VM), the VM, then
/// waits for the console's `Run /init`. A boot that failed fails every test
/// with its reason (it is not tried again).
fn boot() -> &'static Boot {
    static BOOT: OnceLock<Result<Boot, String>> = OnceLock::new();
    let b = BOOT.get_or_init(|| {
        std::panic::catch_unwind(start_and_boot).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the boot panicked".into())
        })
    });
    match b {
        Ok(b) => b,
        Err(why) => panic!("the shared Linux boot failed: {why}"),
    }
}

/// The shared boot's scratch directory, removed when the test binary exits.
static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_scratch() {
    if let Some(d) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn start_and_boot() -> Boot {
    {
        common::require_kvm();
        let kernel = kernel();
        let dir = std::env::temp_dir().join(format!("ukvmi-linux-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if SCRATCH.set(dir.clone()).is_ok() {
            // SAFETY: registers a plain function with no arguments to run at
            // exit; it only removes a directory.
            unsafe { libc::atexit(remove_scratch) };
        }
        let sock = dir.join("vm.sock");
        let serial = dir.join("serial.log");
        let vmm_stderr = dir.join("vmm.err");
        let lstar_out = dir.join("lstar.out");
        let bp_out = dir.join("bp.out");
        let (tx, rx) = mpsc::channel();
        let (k, d, s, se, ve, lo, bo) = (
            kernel.vmlinux.clone(),
            kernel.initrd.clone(),
            sock.clone(),
            serial.clone(),
            vmm_stderr.clone(),
            lstar_out.clone(),
            bp_out.clone(),
        );
        // The keeper: starts the processes and lives as long as the test
        // binary, so their PDEATHSIG fires only when the binary ends.
        std::thread::spawn(move || {
            let stream = |args: &[&str], out: &Path, err: &Path| {
                let mut c = Command::new(env!("CARGO_BIN_EXE_ukvmi"));
                c.arg("--vm").arg(&s).arg("--wait").arg("900").arg("--map").arg(&k).args(args);
                c.stdout(std::fs::File::create(out).unwrap()).stderr(std::fs::File::create(err).unwrap());
                spawn(&mut c)
            };
            let mut children = vec![stream(&["watch-msr", "LSTAR", "--json"], &lo, &lo.with_extension("err"))];
            // The first command started the daemon; give it a moment so the
            // second finds it rather than racing it.
            std::thread::sleep(Duration::from_secs(2));
            children.push(stream(&["trace", "--breakpoint", BP_SYMBOL, "--json"], &bo, &bo.with_extension("err")));
            std::thread::sleep(Duration::from_secs(1));
            let mut vm = Command::new(env!("CARGO_BIN_EXE_ukvmi"));
            vm.arg("run")
                .arg("--kernel")
                .arg(&k)
                .arg("--initrd")
                .arg(&d)
                .args(["--cmdline", CMDLINE, "--memory", "128"])
                .arg("--serial")
                .arg(format!("file:{}", se.display()))
                .arg("--introspect")
                .arg(format!("unix:{}", s.display()))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&ve).unwrap());
            children.push(spawn(&mut vm));
            tx.send(children).unwrap();
            loop {
                std::thread::park();
            }
        });
        let children = rx.recv().unwrap();
        let b = Boot { kernel, dir, sock, serial, vmm_stderr, lstar_out, bp_out, _children: Mutex::new(children) };
        let t0 = Instant::now();
        loop {
            let text = b.serial_text();
            if text.contains("Run /init as init process") {
                break;
            }
            assert!(!text.contains("Kernel panic"), "the kernel panicked while booting{}", b.context());
            let vmm_done = b._children.lock().unwrap().last_mut().unwrap().try_wait().unwrap();
            assert!(vmm_done.is_none(), "ukvmi run exited ({vmm_done:?}) before `Run /init`{}", b.context());
            assert!(
                t0.elapsed() < BOOT_TIMEOUT,
                "no `Run /init` on the console within {BOOT_TIMEOUT:?}{}",
                b.context()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("linux: `Run /init` after {:.1} s", t0.elapsed().as_secs_f64());
        b
    }
}

/// The JSON objects (lines starting with `{`) in `path`.
fn json_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(str::to_string)
        .collect()
}

/// The raw value of `key` in one flat JSON object (strings unquoted).
fn field(json: &str, key: &str) -> Option<String> {
    let k = format!("\"{key}\":");
    let at = json.find(&k)? + k.len();
    let rest = &json[at..];
    // A row cut out of an array may have lost its closing brace.
    let end = if let Some(r) = rest.strip_prefix('"') {
        r.find('"')? + 2
    } else {
        rest.find([',', '}', ']']).unwrap_or(rest.len())
    };
    Some(rest[..end].trim_matches('"').to_string())
}

fn hex(v: &str) -> u64 {
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("not hex: {v}"))
}

#[test]
fn the_kernel_boots_to_its_kernel_threads_and_says_so() {
    let b = boot();
    let text = b.serial_text();
    assert!(text.contains("Linux version 6.1."), "no `Linux version 6.1.` banner{}", b.context());
    assert!(text.contains("Run /init as init process"), "{}", b.context());
    assert!(!text.contains("Kernel panic"), "{}", b.context());
    assert!(!text.contains("int3 selftest failed"), "the kernel's own int3s broke{}", b.context());
}

#[test]
fn ps_lists_the_kernels_tasks_with_their_names_and_pids() {
    let b = boot();
    // The console says `Run /init` just before the kernel execs it: until
    // then pid 1 is still named after the idle task it was forked from.
    let t0 = Instant::now();
    let out = loop {
        let out = b.tool_ok(&["ps", "--json"]);
        if out.contains("\"name\":\"init\"") || t0.elapsed() > Duration::from_secs(60) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(out.contains("\"os\":\"linux\""), "not the Linux task list: {out}");
    let body = out.split("\"processes\":[").nth(1).unwrap_or_else(|| panic!("no processes in {out}"));
    let rows: Vec<&str> = body.split("},{").collect();
    let find = |name: &str| -> Option<(u32, Option<u32>, bool)> {
        rows.iter().find(|r| field(r, "name").as_deref() == Some(name)).map(|r| {
            (
                field(r, "pid").unwrap().parse().unwrap(),
                field(r, "ppid").map(|p| p.parse().unwrap()),
                field(r, "kthread").as_deref() == Some("true"),
            )
        })
    };
    let missing = |n: &str| format!("no task `{n}` in ps: {out}{}", b.context());
    // The kernel's own fixed facts: the idle task is pid 0, init pid 1 and
    // kthreadd pid 2; kthreadd is every kernel thread's parent.
    let (idle, _, idle_k) = find("swapper/0").unwrap_or_else(|| panic!("{}", missing("swapper/0")));
    assert_eq!(idle, 0, "the idle task (init_task) is pid 0");
    assert!(idle_k, "the idle task is a kernel thread");
    let (init, init_parent, init_k) = find("init").unwrap_or_else(|| panic!("{}", missing("init")));
    assert_eq!((init, init_parent, init_k), (1, Some(0), false), "pid 1 is /init, a user process");
    let (kthreadd, _, k) = find("kthreadd").unwrap_or_else(|| panic!("{}", missing("kthreadd")));
    assert_eq!((kthreadd, k), (2, true));
    let (soft, soft_parent, k) = find("ksoftirqd/0").unwrap_or_else(|| panic!("{}", missing("ksoftirqd/0")));
    assert!(soft > 2 && k, "ksoftirqd/0 is a kernel thread with a later pid: {soft}");
    assert_eq!(soft_parent, Some(2), "kthreadd made ksoftirqd/0: {out}");
    assert!(field(&out, "incomplete").is_none(), "the walk (or a thread list's) stopped early: {out}");
    // Every task here leads its own thread group: kernel threads, and an
    // /init with one thread (user space cannot enter the kernel on the PVM
    // hosts, so it makes none). Each one's thread list was walked all the same.
    for r in &rows {
        assert_eq!(field(r, "thread").as_deref(), Some("false"), "a thread on a kernel that has none: {r}");
        assert_eq!(field(r, "tgid"), field(r, "pid"), "{r}");
    }
    // Pids come in the order the kernel made the tasks.
    let pids: Vec<u32> = rows.iter().filter_map(|r| field(r, "pid")?.parse().ok()).collect();
    assert!(pids.windows(2).all(|w| w[0] < w[1]), "task list not in creation order: {pids:?}");

    // The text form says the same, and `regs` names the current task.
    let text = b.tool_ok(&["ps"]);
    assert!(text.contains("[kthreadd]") && text.contains("init"), "{text}");
    let regs = b.tool_ok(&["regs", "0"]);
    assert!(regs.lines().next().unwrap().contains(" on it"), "regs names no current task: {regs}");
}

#[test]
fn a_breakpoint_by_symbol_sees_the_boot_and_the_boot_carries_on() {
    let b = boot();
    let want = symbol(&b.kernel, BP_SYMBOL);
    let hits: Vec<String> =
        json_lines(&b.bp_out).into_iter().filter(|l| field(l, "event").as_deref() == Some("breakpoint")).collect();
    assert!(
        !hits.is_empty(),
        "no breakpoint event at {BP_SYMBOL}: {}\nstderr: {}{}",
        std::fs::read_to_string(&b.bp_out).unwrap_or_default(),
        std::fs::read_to_string(b.bp_out.with_extension("err")).unwrap_or_default(),
        b.context()
    );
    for h in &hits {
        assert_eq!(hex(&field(h, "rip").unwrap()), want, "a hit elsewhere than {BP_SYMBOL}: {h}");
    }
    // The boot went on past the hits: to /init and its kernel threads.
    assert!(b.serial_text().contains("Run /init as init process"), "{}", b.context());
}

#[test]
fn the_kernels_lstar_write_is_seen_when_the_guard_is_armed_before_boot() {
    let b = boot();
    let entry = symbol(&b.kernel, "entry_SYSCALL_64");
    let writes: Vec<String> =
        json_lines(&b.lstar_out).into_iter().filter(|l| field(l, "event").as_deref() == Some("msr")).collect();
    let found = writes.iter().any(|w| field(w, "new").map(|v| hex(&v)) == Some(entry));
    assert!(
        found,
        "no LSTAR write of entry_SYSCALL_64 ({entry:#x}) among {writes:?}\nstream: {}\nstderr: {}{}",
        std::fs::read_to_string(&b.lstar_out).unwrap_or_default(),
        std::fs::read_to_string(b.lstar_out.with_extension("err")).unwrap_or_default(),
        b.context()
    );
    for w in &writes {
        assert_eq!(field(w, "blocked").as_deref(), Some("false"), "watch-msr without --deny refused a write: {w}");
    }
    // Armed before boot, the guard found LSTAR not set yet (0): that is
    // not a hijack.
    let both = format!(
        "{}\n{}",
        std::fs::read_to_string(&b.lstar_out).unwrap_or_default(),
        std::fs::read_to_string(b.lstar_out.with_extension("err")).unwrap_or_default()
    );
    let states: Vec<&str> = both.lines().filter(|l| l.contains("\"event\":\"state\"")).collect();
    assert!(!states.is_empty(), "no state line from watch-msr: {both}");
    for st in states {
        assert_ne!(field(st, "compromised").as_deref(), Some("true"), "an unset LSTAR called compromised: {st}");
    }
}

/// The stub the page-guard test plants in the body of a syscall this guest
/// never makes (`__x64_sys_ptrace`: user space never enters the kernel
/// here), entered through a 5-byte `jmp` over the start of the periodic
/// `update_process_times`: with CR0.WP off (the kernel maps `.rodata` and
/// `.text` read-only in its own page tables) it writes `A` over the first
/// byte of `linux_banner`, as a rootkit would, then puts the 5 bytes of
/// `update_process_times` back, restores CR0 and RAX and jumps there, so
/// the tick carries on as if nothing happened.
fn rootkit_stub(stub: u64, target: u64, hooked: u64, saved: [u8; 5]) -> Vec<u8> {
    let mut s: Vec<u8> = vec![0x50, 0x0f, 0x20, 0xc0, 0x50, 0x25, 0xff, 0xff, 0xfe, 0xff, 0x0f, 0x22, 0xc0];
    // `op [rip+disp32], imm`: disp counts from the end of the instruction.
    let rip_rel = |s: &mut Vec<u8>, op: &[u8], addr: u64, imm: &[u8]| {
        let end = stub + (s.len() + op.len() + 4 + imm.len()) as u64;
        s.extend_from_slice(op);
        s.extend_from_slice(&(addr.wrapping_sub(end) as i32).to_le_bytes());
        s.extend_from_slice(imm);
    };
    rip_rel(&mut s, &[0xc6, 0x05], target, b"A");
    rip_rel(&mut s, &[0xc7, 0x05], hooked, &saved[..4]);
    rip_rel(&mut s, &[0xc6, 0x05], hooked + 4, &saved[4..]);
    s.extend_from_slice(&[0x58, 0x0f, 0x22, 0xc0, 0x58, 0xe9]);
    let end = stub + s.len() as u64 + 4;
    s.extend_from_slice(&(hooked.wrapping_sub(end) as i32).to_le_bytes());
    s
}

/// A child process killed (and reaped) when dropped: a test that fails
/// mid-way leaves no stream running against the shared boot.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// While armed, dropping it (a failed assertion while the VM is paused)
/// lets the vCPUs go, so that the other tests on the shared boot go on.
struct ResumeOnDrop<'a> {
    boot: &'a Boot,
    armed: bool,
}

impl Drop for ResumeOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.boot.tool(&["resume"]);
        }
    }
}

/// A page guard with `--deny` on a `.rodata` page (`linux_banner`) reports
/// and refuses a write planted in the guest with `ukvmi write`; the guest
/// carries on. On the shared boot, with the tool's commands only: the VM is
/// paused for a moment while the stub goes in (the other tests' commands
/// are served meanwhile; a pause is no event of their streams).
#[test]
fn a_page_guard_on_rodata_refuses_a_planted_write() {
    let b = boot();
    let k = &b.kernel;
    let (banner, hooked, stub_at) =
        (symbol(k, "linux_banner"), symbol(k, "update_process_times"), symbol(k, "__x64_sys_ptrace"));
    let read = |what: &str, n: usize| -> Vec<u8> {
        let o = b.tool(&["read", what, &n.to_string(), "--raw"]);
        assert!(o.status.success(), "read {what}: {}{}", String::from_utf8_lossy(&o.stderr), b.context());
        o.stdout
    };
    let jiffies = || u64::from_le_bytes(read("jiffies_64", 8).try_into().unwrap());
    let gpa_of = |what: &str| hex(&field(&b.tool_ok(&["translate", "0", what, "--json"]), "gpa").unwrap());
    assert!(read("linux_banner", 13).starts_with(b"Linux version"));
    let banner_gpa = gpa_of("linux_banner");

    // The guard, as a stream; armed once it has shown the range's state.
    let (guard_out, guard_err) = (b.dir.join("guard.out"), b.dir.join("guard.err"));
    let mut c = Command::new(env!("CARGO_BIN_EXE_ukvmi"));
    c.arg("--vm").arg(&b.sock).arg("--map").arg(&k.vmlinux);
    c.args(["protect", "linux_banner", "1", "--deny", "--json", "--count", "1", "--duration", "180"]);
    c.stdin(Stdio::null());
    c.stdout(std::fs::File::create(&guard_out).unwrap()).stderr(std::fs::File::create(&guard_err).unwrap());
    let mut guard = KillOnDrop(c.spawn().unwrap());
    let guard_text = || {
        let (o, e) = (std::fs::read_to_string(&guard_out), std::fs::read_to_string(&guard_err));
        format!("stdout: {}\nstderr: {}", o.unwrap_or_default(), e.unwrap_or_default())
    };
    let t0 = Instant::now();
    while !std::fs::read_to_string(&guard_err).unwrap_or_default().contains("\"event\":\"state\"") {
        let st = guard.0.try_wait().unwrap();
        assert!(st.is_none(), "protect ended ({st:?}) before it was armed: {}{}", guard_text(), b.context());
        assert!(t0.elapsed() < Duration::from_secs(60), "protect not armed within 60 s: {}", guard_text());
        std::thread::sleep(Duration::from_millis(100));
    }

    // Plant, with every vCPU held outside the bytes concerned.
    let saved: [u8; 5] = read("update_process_times", 5).try_into().unwrap();
    let stub = rootkit_stub(stub_at, banner, hooked, saved);
    let stub_saved = read("__x64_sys_ptrace", stub.len());
    let mut jmp = vec![0xe9];
    jmp.extend_from_slice(&(stub_at.wrapping_sub(hooked + 5) as i32).to_le_bytes());
    let vcpus: u16 = field(&b.tool_ok(&["info", "--json"]), "vcpus").unwrap().parse().unwrap();
    let mut paused = ResumeOnDrop { boot: b, armed: false };
    let t0 = Instant::now();
    loop {
        b.tool_ok(&["pause", "--timeout", "10"]);
        paused.armed = true;
        let inside = (0..vcpus).find_map(|v| {
            let rip = hex(&field(&b.tool_ok(&["regs", &v.to_string(), "--json"]), "rip").unwrap());
            let patched = (hooked..hooked + 5).contains(&rip) || (stub_at..stub_at + stub.len() as u64).contains(&rip);
            patched.then_some((v, rip))
        });
        let Some((v, rip)) = inside else { break };
        b.tool_ok(&["resume"]);
        paused.armed = false;
        assert!(t0.elapsed() < Duration::from_secs(30), "vCPU {v} stays inside the bytes to patch (rip {rip:#x})");
    }
    let jiffies_before = jiffies();
    let j = b.tool_ok(&["write", "__x64_sys_ptrace", &hexbytes(&stub), "--json"]);
    let got = |key: &str| field(&j, key).unwrap_or_else(|| panic!("no {key} in {j}"));
    assert_eq!(hex(&got("addr")), stub_at, "{j}");
    assert_eq!(hex(&got("gpa")), gpa_of("__x64_sys_ptrace"), "{j}");
    assert_eq!((got("len"), got("paused")), (stub.len().to_string(), "true".to_string()), "{j}");
    let said = b.tool_ok(&["write", "update_process_times", &hexbytes(&jmp)]);
    assert!(said.contains("the vCPUs were paused already and stay paused"), "{said}");
    assert_eq!(read("__x64_sys_ptrace", stub.len()), stub, "the stub is in");
    assert_eq!(read("update_process_times", 5), jmp, "the jump is in");
    b.tool_ok(&["resume"]);
    paused.armed = false;

    // The guard reports the write and refuses it.
    let t0 = Instant::now();
    let event = loop {
        let page = json_lines(&guard_out).into_iter().find(|l| field(l, "event").as_deref() == Some("page"));
        if let Some(e) = page {
            break e;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no page event within 120 s (update_process_times never ran the stub?)\n{}{}",
            guard_text(),
            b.context()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let at = hex(&field(&event, "gpa").unwrap());
    let (how, blocked) = (field(&event, "access").unwrap(), field(&event, "blocked").unwrap());
    assert_eq!((at & !0xfff, how.as_str(), blocked.as_str()), (banner_gpa & !0xfff, "w", "true"), "{event}");
    assert_eq!(at, banner_gpa, "the write was at linux_banner: {event}");
    assert!(read("linux_banner", 13).starts_with(b"Linux version"), "the planted write went through");
    // --count 1: the guard ends by itself once it has reported.
    let t0 = Instant::now();
    while guard.0.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(20), "protect --count 1 did not end: {}", guard_text());
        std::thread::sleep(Duration::from_millis(100));
    }

    // The stub went on: it put update_process_times back, and the tick runs.
    let t0 = Instant::now();
    while read("update_process_times", 5) != saved {
        assert!(t0.elapsed() < Duration::from_secs(30), "the stub never put update_process_times back");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    while jiffies() <= jiffies_before + 5 {
        assert!(t0.elapsed() < Duration::from_secs(60), "jiffies stopped: the guest did not carry on{}", b.context());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!b.serial_text().contains("Oops"), "{}", b.context());
    // Put the syscall's bytes back, as the tools do (`write` holds the
    // vCPUs paused while they go in).
    let said = b.tool_ok(&["write", "__x64_sys_ptrace", &hexbytes(&stub_saved)]);
    assert!(said.contains("every vCPU was held paused for it"), "{said}");
    assert_eq!(read("__x64_sys_ptrace", stub.len()), stub_saved, "the syscall's bytes are back");
}

/// Bytes as `ukvmi write` takes them (HEXBYTES).
fn hexbytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_breakpoint_in_the_freed_init_code_is_refused() {
    let b = boot();
    let o = b.tool(&["trace", "--breakpoint", "do_one_initcall", "--count", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("init sections"), "{err}");
}
