//! The allowed-command and allowed-event sets (spec §6), with the semantics
//! of the kernel's `KVM_INTROSPECTION_COMMAND` / `..._EVENT` ioctls.

use crate::backend::IdSet;
use std::sync::atomic::{AtomicU32, Ordering};
use thiserror::Error;
use ukvmi_wire::{event, msg};

/// Why a permission change was refused (the ioctl's errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PermissionError {
    /// `id` outside `-1..bitmap size` (`EINVAL`).
    #[error("id {0} is out of range")]
    OutOfRange(i32),
    /// Tried to disallow GET_VERSION, CHECK_COMMAND or CHECK_EVENT (`EPERM`).
    #[error("command {0} is always allowed")]
    AlwaysAllowed(u16),
}

/// Allowed commands and events of one VM. Read lock-free by the receiving
/// thread; changed by the device manager at any time.
///
/// The v12 commands live in the kernel's bitmap (ids below 30); the ukvmi
/// extension commands (`msg::EXTENSION_COMMANDS`, ids from `msg::EXT_FIRST`)
/// in a second one, with the same semantics: "all" includes them.
#[derive(Debug)]
pub struct Permissions {
    commands: AtomicU32,
    extensions: AtomicU32,
    events: AtomicU32,
}

/// The bit of an extension command in `Permissions::extensions`.
fn ext_bit(id: u16) -> Option<u32> {
    if !msg::is_extension_command(id) {
        return None;
    }
    let n = id.checked_sub(msg::EXT_FIRST)? >> 1;
    (n < 32).then(|| 1u32 << n)
}

fn all_extensions() -> u32 {
    msg::EXTENSION_COMMANDS.iter().filter_map(|id| ext_bit(*id)).fold(0, |a, b| a | b)
}

fn always_allowed() -> u32 {
    msg::ALWAYS_ALLOWED.iter().fold(IdSet::EMPTY, |s, id| s.with(*id)).bits()
}

fn mask(n: u16) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

impl Default for Permissions {
    fn default() -> Self {
        Self::allow_all()
    }
}

impl Permissions {
    /// The kernel's state right after hooking: only the three always-allowed
    /// commands, no events.
    pub fn hook_defaults() -> Permissions {
        Permissions {
            commands: AtomicU32::new(always_allowed()),
            extensions: AtomicU32::new(0),
            events: AtomicU32::new(0),
        }
    }

    /// What QEMU sets when given no `command=`/`event=` lists: everything.
    pub fn allow_all() -> Permissions {
        Permissions {
            commands: AtomicU32::new(mask(msg::NUM_COMMANDS)),
            extensions: AtomicU32::new(all_extensions()),
            events: AtomicU32::new(mask(event::NUM_EVENTS)),
        }
    }

    /// Allows or disallows command `id`; `-1` means all (the extension
    /// commands included). Disallowing all leaves the always-allowed
    /// commands. Extension ids are accepted by id; other ids must be below
    /// the v12 bitmap size.
    pub fn set_command(&self, id: i32, allow: bool) -> Result<(), PermissionError> {
        let all = mask(msg::NUM_COMMANDS);
        if id == -1 {
            let v = if allow { all } else { always_allowed() };
            self.commands.store(v, Ordering::SeqCst);
            self.extensions.store(if allow { all_extensions() } else { 0 }, Ordering::SeqCst);
            return Ok(());
        }
        if let Some(bit) = u16::try_from(id).ok().and_then(ext_bit) {
            self.update(&self.extensions, bit, allow);
            return Ok(());
        }
        let bit = Self::bit(id, msg::NUM_COMMANDS)?;
        if !allow && always_allowed() & bit != 0 {
            // The range check above guarantees id fits in u16.
            return Err(PermissionError::AlwaysAllowed(id as u16));
        }
        self.update(&self.commands, bit, allow);
        Ok(())
    }

    /// Allows or disallows event `id`; `-1` means all.
    pub fn set_event(&self, id: i32, allow: bool) -> Result<(), PermissionError> {
        if id == -1 {
            let v = if allow { mask(event::NUM_EVENTS) } else { 0 };
            self.events.store(v, Ordering::SeqCst);
            return Ok(());
        }
        let bit = Self::bit(id, event::NUM_EVENTS)?;
        self.update(&self.events, bit, allow);
        Ok(())
    }

    /// Whether command `id` is allowed.
    pub fn command_allowed(&self, id: u16) -> bool {
        if let Some(bit) = ext_bit(id) {
            return self.extensions.load(Ordering::SeqCst) & bit != 0;
        }
        IdSet::from_bits(self.commands.load(Ordering::SeqCst)).contains(id)
    }

    /// Whether event `id` is allowed.
    pub fn event_allowed(&self, id: u16) -> bool {
        IdSet::from_bits(self.events.load(Ordering::SeqCst)).contains(id)
    }

    fn bit(id: i32, size: u16) -> Result<u32, PermissionError> {
        if id < 0 || id >= i32::from(size) {
            return Err(PermissionError::OutOfRange(id));
        }
        Ok(1u32 << id)
    }

    fn update(&self, set: &AtomicU32, bit: u32, allow: bool) {
        if allow {
            set.fetch_or(bit, Ordering::SeqCst);
        } else {
            set.fetch_and(!bit, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_semantics() {
        let p = Permissions::hook_defaults();
        assert!(p.command_allowed(msg::GET_VERSION));
        assert!(!p.command_allowed(msg::VM_GET_INFO));
        assert!(!p.event_allowed(event::UNHOOK));
        for id in msg::ALWAYS_ALLOWED {
            assert_eq!(p.set_command(i32::from(id), false), Err(PermissionError::AlwaysAllowed(id)));
        }
        assert_eq!(p.set_command(30, true), Err(PermissionError::OutOfRange(30)));
        assert_eq!(p.set_command(-2, true), Err(PermissionError::OutOfRange(-2)));
        assert_eq!(p.set_event(20, true), Err(PermissionError::OutOfRange(20)));
        p.set_command(-1, true).unwrap();
        assert!(p.command_allowed(msg::VCPU_TRANSLATE_GVA));
        // In-range ids that are not commands are accepted and just set a bit.
        p.set_command(22, false).unwrap();
        p.set_command(-1, false).unwrap();
        assert!(p.command_allowed(msg::VM_CHECK_EVENT));
        assert!(!p.command_allowed(msg::VM_GET_INFO));
        p.set_event(-1, true).unwrap();
        assert!(p.event_allowed(event::SINGLESTEP));
        p.set_event(i32::from(event::PAUSE), false).unwrap();
        assert!(!p.event_allowed(event::PAUSE));
        assert!(p.event_allowed(event::UNHOOK));
        p.set_event(-1, false).unwrap();
        assert!(!p.event_allowed(event::UNHOOK));
    }

    #[test]
    fn extension_commands_follow_the_same_rules() {
        let map = msg::UKVMI_VM_MAP_MEMORY;
        assert!(!Permissions::hook_defaults().command_allowed(map));
        let p = Permissions::allow_all();
        assert!(p.command_allowed(map), "\"all\" includes the extensions");
        p.set_command(-1, false).unwrap();
        assert!(!p.command_allowed(map));
        p.set_command(i32::from(map), true).unwrap();
        assert!(p.command_allowed(map));
        assert!(!p.command_allowed(msg::VM_READ_PHYSICAL), "only the one allowed");
        // Its bit does not alias a v12 command, nor the reverse.
        p.set_command(i32::from(map), false).unwrap();
        p.set_command(i32::from(msg::VM_EVENT), true).unwrap();
        assert!(!p.command_allowed(map));
        p.set_command(i32::from(map), true).unwrap();
        assert!(!p.command_allowed(msg::VM_GET_INFO));
        // Ids in the extension range that name nothing are out of range.
        let unknown = i32::from(msg::EXT_FIRST + 4);
        assert_eq!(p.set_command(unknown, true), Err(PermissionError::OutOfRange(unknown)));
        assert!(!p.command_allowed(msg::EXT_FIRST + 4));
        p.set_command(-1, true).unwrap();
        assert!(p.command_allowed(map));
    }
}
