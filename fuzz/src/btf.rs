//! `btf_offsets`: the Linux guest OS's BTF reader on arbitrary bytes (a
//! kernel's BTF can lie). It must return offsets or an error, never panic,
//! hang or overflow the stack; offsets it returns lie inside `task_struct`.

use ukvmi_monitor::guestos::linux::LinuxOffsets;

/// Reads `data` as a BTF blob.
pub fn check(data: &[u8]) {
    if let Ok(o) = LinuxOffsets::from_btf(data) {
        for (what, off) in [("tasks", o.tasks), ("pid", o.pid), ("comm", o.comm), ("mm", o.mm)] {
            assert!(off < o.task_size, "{what} at {off:#x} lies outside task_struct ({} bytes)", o.task_size);
        }
        assert!(o.comm_len > 0 && o.comm_len <= 64);
    }
}
