//! The kernel command line a Linux guest gets: the user's text (or the
//! default) plus, on a PVM host, the switches the emulator needs.

/// The command line when none is given: the serial console, early output,
/// and a reboot (which ends the VM) instead of a hang on panic.
pub(crate) const DEFAULT: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1";

/// What a PVM host needs (docs/plan-linux-guest.md §2.7): XSAVE stays
/// visible at CPL0 whatever CPUID says, and the emulator lacks SMAP's
/// clac/stac (completed anyway), popcnt, the SSSE3 crypto paths and
/// rd/wr{fs,gs}base; erms/fsrm make `rep movsb` byte-wise, which the
/// emulator runs slowly; one CPU (no MP table). `clearcpuid` takes the
/// features by number (`X86_FEATURE_*` = word * 32 + bit; the words follow
/// the CPUID leaves, stable across kernels): names need
/// `CONFIG_X86_FEATURE_NAMES`, which small kernels (tinyconfig) leave
/// out. 308 = SMAP (9*32+20), 151 = POPCNT (4*32+23), 137 = SSSE3
/// (4*32+9), 297 = ERMS (9*32+9), 580 = FSRM (18*32+4). (Clearing them in
/// CPUID is not enough on PVM: the kernel still patched popcnt in.)
pub(crate) const PVM_SWITCHES: [&str; 4] = ["noxsave", "clearcpuid=308,151,137,297,580", "nofsgsbase", "nosmp"];

/// The most bytes a command line may have, its NUL included
/// (x86's `COMMAND_LINE_SIZE`).
pub(crate) const MAX_LEN: usize = 2048;

/// `user` (or [`DEFAULT`]) followed by those of `extra` whose key (the
/// text before `=`) the user's line does not already have; returns the
/// line and what was added. Nothing of the user's text is removed.
pub(crate) fn build(user: Option<&str>, extra: &[&'static str]) -> (String, Vec<&'static str>) {
    let base = user.map(str::trim).unwrap_or(DEFAULT);
    let key = |t: &str| t.split('=').next().unwrap_or_default().to_string();
    let have: Vec<String> = base.split_whitespace().map(key).collect();
    let added: Vec<&'static str> = extra.iter().copied().filter(|s| !have.contains(&key(s))).collect();
    let mut line = base.to_string();
    for a in &added {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(a);
    }
    (line, added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gets_the_pvm_switches() {
        let (line, added) = build(None, &PVM_SWITCHES);
        assert_eq!(
            line,
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 noxsave \
             clearcpuid=308,151,137,297,580 nofsgsbase nosmp"
        );
        assert_eq!(added, PVM_SWITCHES.to_vec());
    }

    #[test]
    fn a_hardware_host_adds_nothing() {
        assert_eq!(build(Some("console=ttyS0 quiet"), &[]), ("console=ttyS0 quiet".to_string(), vec![]));
        assert_eq!(build(None, &[]).0, DEFAULT);
    }

    #[test]
    fn switches_the_user_gave_are_not_added_twice() {
        let (line, added) = build(Some("  clearcpuid=popcnt nosmp rdinit=/init "), &PVM_SWITCHES);
        assert_eq!(line, "clearcpuid=popcnt nosmp rdinit=/init noxsave nofsgsbase");
        assert_eq!(added, vec!["noxsave", "nofsgsbase"]);
        let (line, _) = build(Some(""), &PVM_SWITCHES);
        assert!(line.starts_with("noxsave "), "{line}");
    }
}
