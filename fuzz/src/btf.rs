//! `btf_offsets`: the Linux guest OS's BTF reader on arbitrary bytes (a
//! kernel's BTF can lie). It must return offsets or an error, never panic,
//! hang or overflow the stack; offsets it returns lie inside `task_struct`.

use ukvmi_monitor::guestos::linux::{LinuxOffsets, ThreadLinks};

/// Reads `data` as a BTF blob.
pub fn check(data: &[u8]) {
    if let Ok(o) = LinuxOffsets::from_btf(data) {
        let mut fields = vec![("tasks", o.tasks), ("pid", o.pid), ("comm", o.comm), ("mm", o.mm)];
        match o.threads {
            ThreadLinks::Signal { signal, thread_node, .. } => {
                fields.extend([("signal", signal), ("thread_node", thread_node)]);
            }
            ThreadLinks::Group { thread_group } => fields.push(("thread_group", thread_group)),
            ThreadLinks::LeadersOnly => {}
        }
        for (what, off) in fields {
            assert!(off < o.task_size, "{what} at {off:#x} lies outside task_struct ({} bytes)", o.task_size);
        }
        assert!(o.comm_len > 0 && o.comm_len <= 64);
    }
}
