//! `ukvmi run`'s options: parsing them into a [`VmConfig`], and the limits
//! on vCPUs and RAM checked before the VM is built.

use std::path::PathBuf;
use std::time::Duration;

use ukvmi_introspector::wire::{event, msg};
use ukvmi_vmm::{BuiltinImage, Dialect, Image, IntrospectConfig, SerialSink, VmConfig};

use crate::args::{MissingValue, Style, Word, Words};

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

fn secs(opt: &str, v: &str) -> Result<Duration, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{opt} takes a number of seconds, not `{v}`"))
}

/// Refuses less RAM than the built-in guest `g` needs: it would die in its
/// first instructions (KVM_EXIT_INTERNAL_ERROR) with no word why.
fn check_memory(g: &ukvmi_guests::Guest, mib: u64, given: bool) -> Result<(), String> {
    if mib >= g.min_memory_mib {
        return Ok(());
    }
    let asked = if given { format!("--memory {mib}") } else { format!("the default {mib} MiB") };
    Err(format!(
        "{asked} is too little for guest {}: it needs at least {} MiB (give --memory {} or more)",
        g.name, g.min_memory_mib, g.min_memory_mib
    ))
}

/// What happens to the vCPUs the built-in guest `g` never starts, when the
/// VM has more than it uses; `None` when it uses them all.
pub(super) fn idle_vcpus_warning(g: &ukvmi_guests::Guest, vcpus: u16) -> Option<String> {
    if vcpus <= g.max_vcpus {
        return None;
    }
    let (idle, they, them) = if vcpus - g.max_vcpus == 1 {
        (format!("vCPU {} is", g.max_vcpus), "it stays", "it")
    } else {
        (format!("vCPUs {}-{} are", g.max_vcpus, vcpus - 1), "they stay", "them")
    };
    Some(format!(
        "warning: guest {} uses at most {} vCPU{} (--vcpus {vcpus}): {idle} created but never started; \
         {they} idle and KVMI vCPU commands to {them} answer -KVM_EAGAIN",
        g.name,
        g.max_vcpus,
        if g.max_vcpus == 1 { "" } else { "s" }
    ))
}

/// Guest RAM a Linux kernel gets when `--memory` is not given.
pub(super) const LINUX_DEFAULT_MEMORY_MIB: u64 = 256;

/// `image` as a Linux boot when its file is a Linux kernel (decided from its
/// bytes by the VMM); `--initrd`/`--cmdline` with anything else is refused.
fn linux_image(image: Image, initrd: Option<PathBuf>, cmdline: Option<String>, map: bool) -> Result<Image, String> {
    let linux = match &image {
        Image::Kernel(p) => {
            use ukvmi_vmm::KernelKind;
            let kind = ukvmi_vmm::kernel_kind(p).map_err(|e| e.to_string())?;
            matches!(kind, KernelKind::LinuxPvh { .. } | KernelKind::LinuxBzImage { .. })
        }
        _ => false,
    };
    match image {
        Image::Kernel(kernel) if linux => Ok(Image::Linux { kernel, initrd, cmdline }),
        other => {
            let opt = match (&initrd, &cmdline, map) {
                (Some(_), _, _) => "--initrd",
                (None, Some(_), _) => "--cmdline",
                (None, None, true) => "--map",
                (None, None, false) => return Ok(other),
            };
            let what = match &other {
                Image::Kernel(p) => format!("--kernel {}, which is not a Linux kernel", p.display()),
                _ => "a built-in guest".to_string(),
            };
            Err(format!(
                "{opt} is only for a Linux kernel (an ELF vmlinux built with CONFIG_PVH, or a bzImage), not for {what}"
            ))
        }
    }
}

/// The VM `args` ask for; `None` for `--help`.
pub(super) fn parse(args: &[String]) -> Result<Option<VmConfig>, String> {
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
        symbols: Vec::new(),
    };
    let mut image = None;
    let mut guest = None;
    let mut memory_given = false;
    let (mut initrd, mut cmdline) = (None::<PathBuf>, None::<String>);
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
                image = Some(Image::Builtin(BuiltinImage {
                    name: g.name,
                    bytes: g.image,
                    load_addr: g.load_addr,
                    entry: g.entry,
                }));
                guest = Some(g);
            }
            "--kernel" => {
                let p = PathBuf::from(val()?);
                if !p.is_file() {
                    return Err(format!("--kernel {}: no such file", p.display()));
                }
                image = Some(Image::Kernel(p));
                guest = None;
            }
            "--initrd" => {
                let p = PathBuf::from(val()?);
                if !p.is_file() {
                    return Err(format!("--initrd {}: no such file", p.display()));
                }
                initrd = Some(p);
            }
            "--cmdline" => cmdline = Some(val()?),
            "--map" => {
                let p = val()?;
                let map = crate::daemon::symbols::load_map(&p).map_err(|e| format!("--map {e}"))?;
                cfg.symbols = map.iter().map(|(name, addr)| (addr, name.to_string())).collect();
            }
            "--vcpus" => cfg.vcpus = val()?.parse().map_err(|_| "--vcpus takes a number from 1 to 65535")?,
            "--memory" => {
                memory_given = true;
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
    cfg.image = linux_image(cfg.image, initrd, cmdline, !cfg.symbols.is_empty())?;
    if let Image::Linux { kernel, .. } = &cfg.image {
        if !memory_given {
            cfg.memory_mib = LINUX_DEFAULT_MEMORY_MIB;
        }
        // Without --map, a vmlinux names its own symbols (its .symtab,
        // when it kept one) in the VMM's messages.
        if cfg.symbols.is_empty() {
            if let Ok(map) = crate::daemon::symbols::load_map(&kernel.to_string_lossy()) {
                cfg.symbols = map.iter().map(|(name, addr)| (addr, name.to_string())).collect();
            }
        }
    }
    if let Some(g) = guest {
        check_memory(g, cfg.memory_mib, memory_given)?;
    }
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
            Image::Kernel(p) | Image::Linux { kernel: p, .. } => {
                p.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            }
        };
    }
    Ok(Some(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn file(name: &str, bytes: &[u8]) -> String {
        let p = std::env::temp_dir().join(format!("ukvmi-run-options-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    }

    #[test]
    fn a_linux_kernel_takes_initrd_and_cmdline_and_256_mib() {
        // A tiny vmlinux with the Xen PVH note (what makes a file Linux).
        let vmlinux = ukvmi_kimage::testing::pvh_vmlinux(0x20_0000, &[0xf4; 16], 0x20_0000);
        let (k, i) = (file("vmlinux", &vmlinux), file("initrd", b"07070"));
        let cfg = parse(&args(&["--kernel", &k, "--initrd", &i, "--cmdline", "console=ttyS0 quiet"])).unwrap().unwrap();
        let want_initrd = Some(std::path::PathBuf::from(&i));
        assert!(
            matches!(&cfg.image, Image::Linux { kernel, initrd, cmdline }
                if kernel.display().to_string() == k && *initrd == want_initrd
                    && cmdline.as_deref() == Some("console=ttyS0 quiet")),
            "{:?}",
            cfg.image
        );
        assert_eq!(cfg.memory_mib, LINUX_DEFAULT_MEMORY_MIB);
        let map = file("System.map", b"ffffffff81000000 T _text\nffffffff81000100 t fpu__drop\n");
        let cfg = parse(&args(&["--kernel", &k, "--map", &map])).unwrap().unwrap();
        assert_eq!(
            cfg.symbols,
            vec![(0xffff_ffff_8100_0000, "_text".to_string()), (0xffff_ffff_8100_0100, "fpu__drop".into())]
        );
        assert!(parse(&args(&["--kernel", &k, "--map", &k])).unwrap_err().starts_with("--map "));
        std::fs::remove_file(map).unwrap();
        let cfg = parse(&args(&["--kernel", &k, "--memory", "128"])).unwrap().unwrap();
        assert!(matches!(cfg.image, Image::Linux { initrd: None, cmdline: None, .. }));
        assert_eq!(cfg.memory_mib, 128, "--memory given wins");
        for p in [k, i] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn initrd_and_cmdline_are_refused_for_other_images() {
        let (flat, i) = (file("flat", &[0xf4]), file("initrd2", b"x"));
        let e = parse(&args(&["--kernel", &flat, "--initrd", &i])).unwrap_err();
        assert!(e.starts_with("--initrd is only for a Linux kernel") && e.contains("not a Linux kernel"), "{e}");
        let e = parse(&args(&["--kernel", &flat, "--cmdline", "x"])).unwrap_err();
        assert!(e.starts_with("--cmdline is only for a Linux kernel"), "{e}");
        let map = file("map", b"ffffffff81000000 T _text\n");
        let e = parse(&args(&["--kernel", &flat, "--map", &map])).unwrap_err();
        assert!(e.starts_with("--map is only for a Linux kernel"), "{e}");
        std::fs::remove_file(map).unwrap();
        let e = parse(&args(&["--guest", "demo", "--cmdline", "x"])).unwrap_err();
        assert!(e.ends_with("not for a built-in guest"), "{e}");
        let cfg = parse(&args(&["--kernel", &flat])).unwrap().unwrap();
        assert!(matches!(cfg.image, Image::Kernel(_)));
        assert_eq!(cfg.memory_mib, 64);
        let e = parse(&args(&["--kernel", &flat, "--initrd", "/nonexistent/ukvmi-initrd"])).unwrap_err();
        assert_eq!(e, "--initrd /nonexistent/ukvmi-initrd: no such file");
        for p in [flat, i] {
            std::fs::remove_file(p).unwrap();
        }
    }
}
