//! What a VM is made from (`VmConfig`, `Image`, the introspector and
//! serial settings) and how it ends (`Exit`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use ukvmi_endpoint::Dialect;
use ukvmi_guests::Guest;

/// The most guest RAM a VM may have, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

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
