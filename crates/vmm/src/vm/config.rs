//! What a VM is made from: `VmConfig`, `Image`, the introspector and
//! serial settings, and the limits they must keep.

use crate::error::{ConfigError, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use ukvmi_endpoint::Dialect;
use ukvmi_guest_abi::layout;

/// What runs in the VM.
#[derive(Debug, Clone)]
pub enum Image {
    /// A built-in guest: a flat image the caller already has in memory.
    Builtin(BuiltinImage),
    /// A flat binary (loaded at 1 MiB) or an ELF64 file.
    Kernel(PathBuf),
    /// A Linux kernel (an ELF vmlinux with a PVH entry, see
    /// [`kernel_kind`](crate::kernel_kind)), booted with the PVH protocol
    /// on a PC platform (irqchip, PIT, 16550, CMOS, i8042).
    Linux {
        /// The vmlinux.
        kernel: PathBuf,
        /// An initramfs (uncompressed cpio, or one the kernel can unpack).
        initrd: Option<PathBuf>,
        /// The kernel command line (`None`: the VMM's default); on a PVM
        /// host the VMM appends the switches the emulator needs.
        cmdline: Option<String>,
    },
}

/// A flat guest image linked at a fixed address (the built-in guests of
/// `ukvmi-guests`; the VMM does not depend on that crate).
#[derive(Debug, Clone, Copy)]
pub struct BuiltinImage {
    /// Short name, for messages.
    pub name: &'static str,
    /// The bytes, loaded at `load_addr`.
    pub bytes: &'static [u8],
    /// Guest physical (= virtual) address of `bytes[0]`.
    pub load_addr: u64,
    /// Where every vCPU begins.
    pub entry: u64,
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
#[non_exhaustive]
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
    /// Kernel symbols (address, name) for the VMM's messages about a Linux
    /// guest (an instruction it completed or could not run); empty: bare
    /// addresses.
    pub symbols: Vec<(u64, String)>,
}

/// Checks the vCPU count and RAM size against what the guest ABI and the
/// VMM support (the host's own vCPU limit is checked on `/dev/kvm`).
pub(crate) fn check_limits(vcpus: u16, memory_mib: u64) -> Result<(), ConfigError> {
    if vcpus == 0 {
        return Err(ConfigError::NoVcpus);
    }
    if vcpus > layout::MAX_VCPUS {
        return Err(ConfigError::AbiVcpuLimit { requested: vcpus, max: layout::MAX_VCPUS });
    }
    if memory_mib < MIN_MEMORY_MIB {
        return Err(ConfigError::TooLittleMemory { mib: memory_mib, min: MIN_MEMORY_MIB });
    }
    if memory_mib > MAX_MEMORY_MIB {
        return Err(ConfigError::TooMuchMemory { mib: memory_mib, max: MAX_MEMORY_MIB });
    }
    Ok(())
}

/// The limits of a Linux guest: one vCPU (no MP table or ACPI to announce
/// more) and RAM below the IOAPIC/LAPIC.
pub(crate) fn check_linux_limits(vcpus: u16, memory_mib: u64) -> Result<(), ConfigError> {
    if vcpus > 1 {
        return Err(ConfigError::LinuxVcpus { requested: vcpus });
    }
    let max = crate::linux::LINUX_MAX_MEMORY_MIB;
    if memory_mib > max {
        return Err(ConfigError::LinuxMemory { mib: memory_mib, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limits_are_inclusive() {
        assert_eq!(check_limits(1, MIN_MEMORY_MIB), Ok(()));
        assert_eq!(check_limits(layout::MAX_VCPUS, MAX_MEMORY_MIB), Ok(()));
    }

    #[test]
    fn each_limit_is_reported_with_its_numbers() {
        assert_eq!(check_limits(0, 64), Err(ConfigError::NoVcpus));
        assert_eq!(
            check_limits(layout::MAX_VCPUS + 1, 64),
            Err(ConfigError::AbiVcpuLimit { requested: layout::MAX_VCPUS + 1, max: layout::MAX_VCPUS })
        );
        assert_eq!(check_limits(1, 3), Err(ConfigError::TooLittleMemory { mib: 3, min: 4 }));
        assert_eq!(
            check_limits(1, MAX_MEMORY_MIB + 1),
            Err(ConfigError::TooMuchMemory { mib: MAX_MEMORY_MIB + 1, max: MAX_MEMORY_MIB })
        );
    }

    #[test]
    fn a_linux_guest_has_one_vcpu_and_at_most_3_gib() {
        assert_eq!(check_linux_limits(1, 3072), Ok(()));
        assert_eq!(check_linux_limits(2, 256), Err(ConfigError::LinuxVcpus { requested: 2 }));
        assert_eq!(check_linux_limits(1, 3073), Err(ConfigError::LinuxMemory { mib: 3073, max: 3072 }));
        for e in [check_linux_limits(2, 256), check_linux_limits(1, 4096)] {
            let msg = e.unwrap_err().to_string();
            assert!(!msg.contains("--"), "{msg}");
        }
    }

    #[test]
    fn the_messages_name_no_command_line_flag() {
        for e in [
            check_limits(0, 64),
            check_limits(layout::MAX_VCPUS + 1, 64),
            check_limits(1, 1),
            check_limits(1, u64::MAX),
        ] {
            let msg = e.unwrap_err().to_string();
            assert!(!msg.contains("--"), "{msg}");
        }
    }
}
