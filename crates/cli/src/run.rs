//! `ukvmi run`: parse the options, build the VM, run it, map the outcome to
//! an exit status with a one-line reason.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use ukvmi_vmm::{Dialect, Exit, Image, IntrospectConfig, SerialSink, Vm, VmConfig};
use ukvmi_wire::{event, msg};

use crate::args::{MissingValue, Style, Word, Words};

pub(crate) fn help() -> String {
    let mut s = String::from(
        "\
ukvmi run: start a VM on /dev/kvm, optionally introspected over KVMI (v12 or kvmi-v7)

USAGE:
    ukvmi run --guest NAME|--kernel PATH [OPTIONS]

WHAT TO RUN:
    --guest NAME             a built-in guest (see below)
    --kernel PATH            a flat binary (loaded at 1 MiB) or an ELF64 file,
                             entered in 64-bit ring 0 (see crates/guests for the ABI)
    --vcpus N                number of vCPUs (default 1)
    --memory MIB             guest RAM in MiB (default 64)
    --serial stdio|file:PATH where the guest's serial console goes (default stdio)

INTROSPECTION (the VMM connects to the tool, as QEMU does):
    --introspect unix:PATH   connect to an introspector listening at PATH; the VM
                             runs whether or not it is there
    --key-file PATH          the tool must prove it knows the secret in PATH (SHA-1
                             cookie; one trailing newline is not part of it). Or set
                             UKVMI_KEY. Never on the command line: every local user
                             can read a process's arguments
    --introspector-uid UID   also let a tool running as UID introspect this VM (repeat);
                             by default only a listener running as this VMM's user or
                             root is talked to (its SO_PEERCRED is checked)
    --name NAME              VM name sent in the handshake
    --uuid UUID              VM UUID sent in the handshake (default: random)
    --reconnect SECS         retry the connection every SECS seconds (default 1, at
                             least 0.01)
    --handshake-timeout SECS give up on a tool that has not accepted and answered the
                             handshake within SECS (default 10, more than 0)
    --unhook-timeout SECS    at shutdown, wait up to SECS for the tool to close
                             after the UNHOOK event (default 10)
    --kvmi-dialect v12|v7    the wire dialect the tool speaks (default v12). Pick
                             v7 for the existing KVMI tools: libkvmi and its
                             hookguest, LibVMI's KVM driver, libmicrovmi, the kvmi
                             crate, HVMI, SmartVMI. Their ids differ from v12's, so
                             a v7 tool on a v12 VM fails at its second command
                             (Invalid argument). With v7 the VMM connects once the
                             guest has started every vCPU (at most 5 s after boot)
    --allow-command ID       allow only these commands (repeat; number or name,
                             e.g. 8 or KVMI_VM_GET_INFO, or the extension
                             UKVMI_VM_MAP_MEMORY); default: all
    --allow-event ID         allow only these events (repeat); default: all

SIGNALS:
    SIGINT, SIGTERM          send UNHOOK (if the tool enabled it), wait for the tool
                             to close (--unhook-timeout), stop the VM, exit 0
    SIGUSR1                  print the interceptions in force to stderr (watched
                             MSRs, guest debugging per vCPU, restricted pages)

EXIT STATUS:
    the guest's power-off status (0 for a normal power-off), 0 when stopped by
    SIGINT/SIGTERM, 2 when an introspector answered CRASH, 1 on any failure.

BUILT-IN GUESTS:
",
    );
    for g in ukvmi_guests::all() {
        s.push_str(&format!("    {:<12} {}\n", g.name, g.summary));
    }
    s.push_str(&host_section());
    s
}

/// "ON THIS HOST": what a probe of /dev/kvm finds, as CHECK_COMMAND/EVENT
/// will report it. See docs/mechanisms.md for how each is served.
fn host_section() -> String {
    let mut s =
        String::from("\nON THIS HOST (what KVMI_VM_CHECK_COMMAND/EVENT report; the rest answer -KVM_EOPNOTSUPP):\n");
    let caps = match ukvmi_vmm::host_capabilities() {
        Ok(c) => c,
        Err(e) => {
            s.push_str(&format!("    cannot probe: {e}\n"));
            return s;
        }
    };
    let short = |n: &'static str| {
        n.trim_start_matches("KVMI_").trim_start_matches("VCPU_EVENT_").trim_start_matches("VM_EVENT_")
    };
    let list = |ids: &mut dyn Iterator<Item = u16>, name: fn(u16) -> Option<&'static str>| -> String {
        ids.filter_map(name).map(short).collect::<Vec<_>>().join(" ")
    };
    let cmds = || msg::VM_COMMANDS.into_iter().chain(msg::VCPU_COMMANDS);
    let evs = || std::iter::once(event::UNHOOK).chain(event::VCPU_EVENTS);
    let rows = [
        ("commands", list(&mut cmds().filter(|id| caps.commands.contains(*id)), msg::name)),
        ("events", list(&mut evs().filter(|id| caps.events.contains(*id)), event::name)),
        (
            "missing",
            list(&mut cmds().filter(|id| !caps.commands.contains(*id)), msg::name)
                + " "
                + &list(&mut evs().filter(|id| !caps.events.contains(*id)), event::name),
        ),
    ];
    for (what, names) in rows {
        s.push_str(&format!("    {what:<9}"));
        let mut col = 13;
        for w in names.split_whitespace() {
            if col + w.len() + 1 > 90 {
                s.push_str("\n             ");
                col = 13;
            }
            s.push(' ');
            s.push_str(w);
            col += w.len() + 1;
        }
        s.push('\n');
    }
    s.push_str(
        "    CR, XSETBV and DESCRIPTOR events (and CONTROL_CR) never work on a stock kernel: KVM\n             \
         has no exit to userspace for them. A ring-3 int3 or single step on a PVM host goes\n             \
         to the guest. HYPERCALL is the port-0x610 doorbell (docs/mechanisms.md).\n",
    );
    s.push_str(
        "    extension UKVMI_VM_MAP_MEMORY (0x4000): guest RAM's memfd passed to the tool (SCM_RIGHTS),\n             \
         read-only unless WRITE_PHYSICAL is allowed too; allowed by default, like every command\n",
    );
    s.push_str(
        "    extension UKVMI_VM_WRITE_PHYSICAL_UNDO (0x4002): WRITE_PHYSICAL whose bytes the VMM puts back\n             \
         when the connection ends (a dead tool leaves no int3); allowed by default\n",
    );
    s
}

fn parse_id(kind: &str, v: &str, name_of: fn(u16) -> Option<&'static str>) -> Result<u16, String> {
    if let Ok(n) = v.parse::<u16>() {
        return Ok(n);
    }
    // KVMI_* names (v12) and UKVMI_* names (ukvmi extensions), with or
    // without their prefix.
    let short = |n: &str| -> String {
        let n = n.to_ascii_uppercase();
        n.strip_prefix("KVMI_").or_else(|| n.strip_prefix("UKVMI_")).unwrap_or(&n).to_string()
    };
    let want = short(v);
    (0..64u16)
        .chain(msg::EXTENSION_COMMANDS)
        .find(|&id| name_of(id).is_some_and(|n| short(n) == want))
        .ok_or_else(|| format!("unknown {kind} `{v}` (give a number or a name such as KVMI_VM_GET_INFO)"))
}

fn parse_uuid(v: &str) -> Result<[u8; 16], String> {
    let hex: String = v.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return Err(format!("bad --uuid `{v}`: expected 32 hex digits"));
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let pair = hex.get(2 * i..2 * i + 2).ok_or("bad --uuid")?;
        *o = u8::from_str_radix(pair, 16).map_err(|_| format!("bad --uuid `{v}`: not hex"))?;
    }
    Ok(out)
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    // SAFETY: getrandom writes at most u.len() bytes into the buffer.
    let _ = unsafe { libc::getrandom(u.as_mut_ptr().cast(), u.len(), 0) };
    u
}

/// A warning when the socket's directory lets other users create files:
/// one of them could listen at the path before the tool does (the VMM then
/// refuses it by its uid, but the real tool cannot attach either).
fn shared_directory_warning(sock: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dir = sock.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let meta = std::fs::metadata(dir).ok()?;
    (meta.mode() & 0o002 != 0).then(|| {
        format!(
            "warning: {} is writable by every user: another user could listen at {} first. \
             ukvmi only talks to a listener running as its own user or root, but prefer a private directory",
            dir.display(),
            sock.display()
        )
    })
}

/// One line to stderr. Never panics: a closed or broken stderr (a pipe whose
/// reader left) must not take a thread down with it.
pub(crate) fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn secs(opt: &str, v: &str) -> Result<Duration, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{opt} takes a number of seconds, not `{v}`"))
}

fn parse(args: &[String]) -> Result<Option<VmConfig>, String> {
    let mut cfg = VmConfig {
        vcpus: 1,
        memory_mib: 64,
        image: Image::Kernel(PathBuf::new()),
        name: String::new(),
        uuid: random_uuid(),
        allow_commands: None,
        allow_events: None,
        serial: SerialSink::Stdout,
        introspect: None,
    };
    let mut image = None;
    let mut path = None;
    let (mut key_file, mut reconnect, mut hs, mut unhook) =
        (None::<String>, Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(10));
    let mut dialect = Dialect::V12;
    let mut allowed_uids = Vec::new();
    let valued = crate::commands::find("run").map(crate::commands::valued_options).unwrap_or_default();
    for w in Words::new(args, &valued, Style::Options) {
        let (a, value) = match w {
            Ok(Word::Opt(a, v)) => (a, v),
            Ok(Word::Operand(a)) => (a, None),
            Err(MissingValue(a)) => return Err(format!("{a} needs a value")),
        };
        if a == "-h" || a == "--help" {
            return Ok(None);
        }
        // Every valued option has its value here: `Words` took it.
        let val = || value.map(str::to_string).ok_or_else(|| format!("{a} needs a value"));
        match a {
            "--guest" => {
                let v = val()?;
                let g = ukvmi_guests::find(&v).ok_or_else(|| {
                    let names: Vec<&str> = ukvmi_guests::all().iter().map(|g| g.name).collect();
                    format!("no built-in guest `{v}` (there are: {})", names.join(", "))
                })?;
                image = Some(Image::Builtin(g));
            }
            "--kernel" => {
                let p = PathBuf::from(val()?);
                if !p.is_file() {
                    return Err(format!("--kernel {}: no such file", p.display()));
                }
                image = Some(Image::Kernel(p));
            }
            "--vcpus" => cfg.vcpus = val()?.parse().map_err(|_| "--vcpus takes a number from 1 to 65535")?,
            "--memory" => {
                let v = val()?;
                cfg.memory_mib =
                    v.parse().ok().filter(|m| (4..=ukvmi_vmm::MAX_MEMORY_MIB).contains(m)).ok_or_else(|| {
                        format!(
                            "--memory takes a size in MiB, at least 4 MiB and at most {} (1 TiB), not `{v}`",
                            ukvmi_vmm::MAX_MEMORY_MIB
                        )
                    })?;
            }
            "--introspect" => {
                let v = val()?;
                let p = v.strip_prefix("unix:").ok_or_else(|| format!("--introspect takes unix:PATH, not `{v}`"))?;
                if p.is_empty() {
                    return Err("--introspect unix:PATH needs a path".into());
                }
                path = Some(PathBuf::from(p));
            }
            "--key" => {
                return Err("--key would put the secret on the command line, where every local user can read it \
                            (/proc/PID/cmdline): use --key-file PATH or the UKVMI_KEY environment variable"
                    .into())
            }
            "--key-file" => key_file = Some(val()?),
            "--introspector-uid" => {
                let v = val()?;
                allowed_uids.push(v.parse().map_err(|_| format!("--introspector-uid takes a numeric uid, not `{v}`"))?);
            }
            "--name" => cfg.name = val()?,
            "--uuid" => cfg.uuid = parse_uuid(&val()?)?,
            "--reconnect" => {
                reconnect = secs(a, &val()?)?;
                if reconnect < Duration::from_millis(10) {
                    return Err("--reconnect must be at least 0.01 seconds (0 would retry in a busy loop)".into());
                }
            }
            "--handshake-timeout" => {
                hs = secs(a, &val()?)?;
                if hs.is_zero() {
                    return Err("--handshake-timeout must be more than 0 seconds".into());
                }
            }
            "--unhook-timeout" => unhook = secs(a, &val()?)?,
            "--kvmi-dialect" => dialect = val()?.parse::<Dialect>().map_err(|e| format!("--kvmi-dialect: {e}"))?,
            "--allow-command" => {
                let id = parse_id("command", &val()?, msg::name)?;
                cfg.allow_commands.get_or_insert_with(Vec::new).push(id);
            }
            "--allow-event" => {
                let id = parse_id("event", &val()?, event::name)?;
                cfg.allow_events.get_or_insert_with(Vec::new).push(id);
            }
            "--serial" => {
                let v = val()?;
                cfg.serial = if v == "stdio" {
                    SerialSink::Stdout
                } else if let Some(p) = v.strip_prefix("file:") {
                    let f = std::fs::File::create(p).map_err(|e| format!("--serial file:{p}: {e}"))?;
                    SerialSink::Writer(Box::new(f))
                } else {
                    return Err(format!("--serial takes stdio or file:PATH, not `{v}`"));
                };
            }
            other => return Err(format!("unknown option `{other}` (see ukvmi run --help)")),
        }
    }
    cfg.image = image.ok_or("give --guest NAME or --kernel PATH (see ukvmi run --help)")?;
    let key = crate::control::load_key(key_file.as_deref())?;
    cfg.introspect = path.map(|path| IntrospectConfig {
        path,
        key,
        reconnect,
        handshake_timeout: hs,
        unhook_timeout: unhook,
        dialect,
        allowed_uids,
    });
    if cfg.name.is_empty() {
        cfg.name = match &cfg.image {
            Image::Builtin(g) => g.name.to_string(),
            Image::Kernel(p) => p.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        };
    }
    Ok(Some(cfg))
}

/// The vCPU count and RAM size `ukvmi` supports, checked before the VM is
/// built (the host's own vCPU limit is the VMM's to report).
fn check_limits(cfg: &VmConfig) -> Result<(), String> {
    let max_vcpus = ukvmi_guests::layout::MAX_VCPUS;
    if cfg.vcpus == 0 {
        return Err("--vcpus must be at least 1".into());
    }
    if cfg.vcpus > max_vcpus {
        return Err(format!(
            "--vcpus {} is more than the guest ABI's {max_vcpus} (one 16 KiB stack each below 512 KiB)",
            cfg.vcpus
        ));
    }
    if cfg.memory_mib < 4 {
        return Err("--memory must be at least 4 MiB".into());
    }
    if cfg.memory_mib > ukvmi_vmm::MAX_MEMORY_MIB {
        return Err(format!(
            "--memory {} MiB is more than the {} MiB (1 TiB) ukvmi supports",
            cfg.memory_mib,
            ukvmi_vmm::MAX_MEMORY_MIB
        ));
    }
    if cfg.memory_mib.checked_mul(1 << 20).is_none() {
        return Err("--memory is too large".into());
    }
    Ok(())
}

/// SIGINT/SIGTERM (stop) and SIGUSR1 (report the interceptions in force)
/// are blocked in every thread and taken by one waiter thread.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

pub(crate) fn main(args: &[String]) -> ExitCode {
    let cfg = match parse(args) {
        Ok(Some(c)) => c,
        Ok(None) => {
            print!("{}", help());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            say(&format!("ukvmi run: {e}"));
            return ExitCode::from(1);
        }
    };
    if let Some(w) = cfg.introspect.as_ref().and_then(|i| shared_directory_warning(&i.path)) {
        say(&format!("ukvmi: {w}"));
    }
    let set = block_stop_signals();
    let log: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(|m: &str| say(&format!("ukvmi: {m}")));
    if let Err(e) = check_limits(&cfg) {
        say(&format!("ukvmi run: {e}"));
        return ExitCode::from(1);
    }
    let vm = match Vm::new(cfg, Arc::clone(&log)) {
        Ok(vm) => vm,
        Err(e) => {
            say(&format!("ukvmi run: {e}"));
            return ExitCode::from(1);
        }
    };
    let stop = vm.stop_handle();
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || {
        loop {
            let mut sig = 0;
            // SAFETY: sigwait on a valid set, writing the signal number to `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            if sig == libc::SIGUSR1 {
                say(&format!("ukvmi: {}", stop.interceptions()));
                continue;
            }
            // Stop first: nothing said afterwards can keep the VM running.
            stop.stop();
            say(&format!("ukvmi: signal {sig}: stopping the VM"));
            return;
        }
    });
    match vm.run() {
        Exit::PowerOff(s) => {
            if s != 0 {
                say(&format!("ukvmi: the guest powered off with status {s}"));
            }
            ExitCode::from(s)
        }
        Exit::Stopped => ExitCode::SUCCESS,
        Exit::Crashed(why) => {
            say(&format!("ukvmi: VM crashed: {why}"));
            ExitCode::from(2)
        }
        Exit::Failed(why) => {
            say(&format!("ukvmi: VM failed: {why}"));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vcpus: u16, memory_mib: u64) -> VmConfig {
        VmConfig {
            vcpus,
            memory_mib,
            image: Image::Kernel(PathBuf::new()),
            name: String::new(),
            uuid: [0; 16],
            allow_commands: None,
            allow_events: None,
            serial: SerialSink::Stdout,
            introspect: None,
        }
    }

    #[test]
    fn limits_are_checked_with_the_vmm_wording() {
        assert_eq!(check_limits(&cfg(1, 4)), Ok(()));
        assert_eq!(check_limits(&cfg(31, ukvmi_vmm::MAX_MEMORY_MIB)), Ok(()));
        assert_eq!(check_limits(&cfg(0, 64)), Err("--vcpus must be at least 1".to_string()));
        assert_eq!(
            check_limits(&cfg(32, 64)),
            Err("--vcpus 32 is more than the guest ABI's 31 (one 16 KiB stack each below 512 KiB)".to_string())
        );
        assert_eq!(check_limits(&cfg(1, 3)), Err("--memory must be at least 4 MiB".to_string()));
        assert_eq!(
            check_limits(&cfg(1, ukvmi_vmm::MAX_MEMORY_MIB + 1)),
            Err("--memory 1048577 MiB is more than the 1048576 MiB (1 TiB) ukvmi supports".to_string())
        );
    }
}
