//! The VMM's typed errors in the words of `ukvmi run`'s options: what only
//! the VMM can check (the host's vCPU limit, allowed ids) names the option
//! that asked for it.

use ukvmi_vmm::{ConfigError, Error};

/// `e` as `ukvmi run` says it (after "ukvmi run: ").
pub(crate) fn describe(e: &Error) -> String {
    let Error::Config(c) = e else { return e.to_string() };
    match c {
        ConfigError::NoVcpus => "--vcpus must be at least 1".into(),
        ConfigError::AbiVcpuLimit { requested, max } => {
            format!("--vcpus {requested} is more than the guest ABI's {max} (one 16 KiB stack each below 512 KiB)")
        }
        ConfigError::HostVcpuLimit { requested, max } => {
            format!("--vcpus {requested} exceeds this host's limit of {max}")
        }
        ConfigError::TooLittleMemory { min, .. } => format!("--memory must be at least {min} MiB"),
        ConfigError::TooMuchMemory { mib, max } => {
            format!("--memory {mib} MiB is more than the {max} MiB (1 TiB) ukvmi supports")
        }
        ConfigError::LinuxVcpus { requested } => format!(
            "--vcpus {requested}: a Linux kernel runs on one vCPU here (the VMM gives it no MP table or ACPI \
             to find more); give --vcpus 1"
        ),
        ConfigError::LinuxMemory { mib, max } => {
            format!("--memory {mib} MiB is more than the {max} MiB a Linux kernel may have here (RAM must stay below the IOAPIC/LAPIC)")
        }
        ConfigError::AllowCommand { id, source } => format!("--allow-command {id}: {source}"),
        ConfigError::AllowEvent { id, source } => format!("--allow-event {id}: {source}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ukvmi_vmm::PermissionError;

    fn say(c: ConfigError) -> String {
        describe(&Error::Config(c))
    }

    #[test]
    fn limits_are_worded_as_the_options() {
        assert_eq!(say(ConfigError::NoVcpus), "--vcpus must be at least 1");
        assert_eq!(
            say(ConfigError::AbiVcpuLimit { requested: 40, max: 31 }),
            "--vcpus 40 is more than the guest ABI's 31 (one 16 KiB stack each below 512 KiB)"
        );
        assert_eq!(
            say(ConfigError::HostVcpuLimit { requested: 30, max: 16 }),
            "--vcpus 30 exceeds this host's limit of 16"
        );
        assert_eq!(say(ConfigError::TooLittleMemory { mib: 2, min: 4 }), "--memory must be at least 4 MiB");
        assert_eq!(
            say(ConfigError::TooMuchMemory { mib: 2 << 20, max: 1 << 20 }),
            "--memory 2097152 MiB is more than the 1048576 MiB (1 TiB) ukvmi supports"
        );
    }

    #[test]
    fn linux_limits_name_the_option() {
        let v = say(ConfigError::LinuxVcpus { requested: 2 });
        assert!(v.starts_with("--vcpus 2: a Linux kernel runs on one vCPU") && v.ends_with("give --vcpus 1"), "{v}");
        let m = say(ConfigError::LinuxMemory { mib: 4096, max: 3072 });
        assert!(m.starts_with("--memory 4096 MiB is more than the 3072 MiB a Linux kernel may have"), "{m}");
    }

    #[test]
    fn refused_ids_name_the_option_and_the_reason() {
        let source = PermissionError::OutOfRange(200);
        assert_eq!(say(ConfigError::AllowCommand { id: 200, source }), "--allow-command 200: id 200 is out of range");
        assert_eq!(say(ConfigError::AllowEvent { id: 200, source }), "--allow-event 200: id 200 is out of range");
    }

    #[test]
    fn other_errors_keep_the_vmms_words() {
        let e = Error::Image(ukvmi_vmm::ImageError::BuiltinTooLarge { name: "spin" });
        assert_eq!(describe(&e), "guest spin does not fit in RAM");
    }
}
