//! What the monitor saw, one record per event, printable as a line of text
//! for people or as one JSON object for pipes (`--json`).

use crate::{json::Obj, symbols::SymbolMap};

/// Who caused an event: the vCPU and, on the demo OS, the process on it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Who {
    /// vCPU index.
    pub vcpu: u16,
    /// Pid running on the vCPU (demo OS only).
    pub pid: Option<u32>,
    /// Its name.
    pub process: Option<String>,
}

impl Who {
    fn text(&self) -> String {
        match (&self.pid, &self.process) {
            (Some(p), Some(n)) => format!("pid {p} ({n})"),
            (Some(p), None) => format!("pid {p}"),
            _ => "the kernel".into(),
        }
    }

    fn json(&self, o: Obj) -> Obj {
        let o = o.num("vcpu", u64::from(self.vcpu));
        let o = match self.pid {
            Some(p) => o.num("pid", u64::from(p)),
            None => o,
        };
        match &self.process {
            Some(n) => o.str("process", n),
            None => o,
        }
    }
}

/// One thing the monitor observed (and what it did about it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// A syscall, seen at the breakpoint on the kernel's syscall entry.
    Syscall {
        /// Who made it.
        who: Who,
        /// Syscall number (RAX).
        nr: u64,
        /// Its name (`unknown` if the tools do not know it).
        name: &'static str,
        /// `name(args…)` with strings decoded where known.
        call: String,
    },
    /// A breakpoint of the tool's that is not a syscall entry.
    Breakpoint {
        /// Who hit it.
        who: Who,
        /// Its guest physical address.
        gpa: u64,
        /// RIP.
        rip: u64,
    },
    /// An MSR write the guest attempted.
    Msr {
        /// Who wrote it.
        who: Who,
        /// MSR index.
        msr: u32,
        /// The value in place.
        old: u64,
        /// The value the guest tried to write.
        new: u64,
        /// Whether the write was refused (old value kept).
        blocked: bool,
    },
    /// An access to a restricted page.
    Page {
        /// Who made it.
        who: Who,
        /// Guest physical address.
        gpa: u64,
        /// Guest virtual address (all ones if unknown).
        gva: u64,
        /// The access: `r`, `w` or `x`.
        access: char,
        /// RIP (past the instruction for writes on this host).
        rip: u64,
        /// Whether it was refused (the instruction skipped).
        blocked: bool,
    },
    /// The guest rang the hypercall doorbell.
    Hypercall {
        /// Who rang.
        who: Who,
        /// The message it passed (demo OS convention: R8 = buffer, R9 = length).
        message: String,
        /// What the monitor answered, if it answered with text.
        reply: Option<String>,
    },
    /// A vCPU is now held paused.
    Paused {
        /// vCPU index.
        vcpu: u16,
    },
    /// A held vCPU was let go.
    Resumed {
        /// vCPU index.
        vcpu: u16,
    },
    /// The VMM sent UNHOOK (it is shutting down); the monitor undid its hooks.
    Unhook,
    /// Records this reader missed because it fell behind.
    Lost {
        /// How many.
        count: u64,
    },
    /// The connection ended.
    Detached {
        /// Why.
        reason: String,
    },
}

/// MSR names for the ones people watch.
pub fn msr_name(msr: u32) -> Option<&'static str> {
    Some(match msr {
        0xc000_0080 => "EFER",
        0xc000_0081 => "STAR",
        0xc000_0082 => "LSTAR",
        0xc000_0083 => "CSTAR",
        0xc000_0084 => "SFMASK",
        0xc000_0100 => "FS_BASE",
        0xc000_0101 => "GS_BASE",
        0xc000_0102 => "KERNEL_GS_BASE",
        0x174 => "SYSENTER_CS",
        0x175 => "SYSENTER_ESP",
        0x176 => "SYSENTER_EIP",
        _ => return None,
    })
}

/// Parses an MSR given as a name (`LSTAR`, `IA32_LSTAR`) or a number.
pub fn parse_msr(text: &str) -> Option<u32> {
    let up = text.to_ascii_uppercase();
    let bare = up.strip_prefix("IA32_").or_else(|| up.strip_prefix("MSR_")).unwrap_or(&up);
    for msr in [
        0xc000_0080u32,
        0xc000_0081,
        0xc000_0082,
        0xc000_0083,
        0xc000_0084,
        0xc000_0100,
        0xc000_0101,
        0xc000_0102,
        0x174,
        0x175,
        0x176,
    ] {
        if msr_name(msr) == Some(bare) {
            return Some(msr);
        }
    }
    crate::symbols::parse_number(text).and_then(|v| u32::try_from(v).ok())
}

fn msr_text(msr: u32) -> String {
    msr_name(msr).map_or_else(|| format!("{msr:#x}"), str::to_string)
}

fn split_hex(v: u64) -> String {
    format!("{:#010x}_{:08x}", v >> 32, v & 0xffff_ffff)
}

impl Record {
    /// A short kind name, also the `"event"` field of the JSON form.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::Syscall { .. } => "syscall",
            Record::Breakpoint { .. } => "breakpoint",
            Record::Msr { .. } => "msr",
            Record::Page { .. } => "page",
            Record::Hypercall { .. } => "hypercall",
            Record::Paused { .. } => "paused",
            Record::Resumed { .. } => "resumed",
            Record::Unhook => "unhook",
            Record::Lost { .. } => "lost",
            Record::Detached { .. } => "detached",
        }
    }

    /// One line for people; `syms` names kernel addresses.
    pub fn text(&self, syms: Option<&SymbolMap>) -> String {
        let addr = |a: u64| syms.map_or_else(|| format!("{a:#x}"), |s| s.describe(a));
        match self {
            Record::Syscall { who, call, .. } => format!("syscall   vCPU {} {:<18} {call}", who.vcpu, who.text()),
            Record::Breakpoint { who, gpa, rip } => {
                format!("breakpoint vCPU {}: {} at {} (gpa {gpa:#x})", who.vcpu, who.text(), addr(*rip))
            }
            Record::Msr { who, msr, old, new, blocked } => format!(
                "{:<9} vCPU {}: MSR {} write {} -> {} by {}; {}",
                if *blocked { "BLOCKED" } else { "msr" },
                who.vcpu,
                msr_text(*msr),
                split_hex(*old),
                split_hex(*new),
                who.text(),
                if *blocked { "old value kept" } else { "allowed" }
            ),
            Record::Page { who, gpa, access, rip, blocked, .. } => {
                let what = match access {
                    'w' => "write to",
                    'r' => "read of",
                    _ => "execute in",
                };
                format!(
                    "{:<9} vCPU {}: {what} protected page at gpa {gpa:#x} ({}) by {}, rip {}; {}",
                    if *blocked { "BLOCKED" } else { "page" },
                    who.vcpu,
                    addr(*gpa),
                    who.text(),
                    addr(*rip),
                    if *blocked { "instruction skipped" } else { "allowed" }
                )
            }
            Record::Hypercall { who, message, reply } => match reply {
                Some(r) => format!("hypercall vCPU {}: {} says {:?}; answered {:?}", who.vcpu, who.text(), message, r),
                None => format!("hypercall vCPU {}: {} says {:?}", who.vcpu, who.text(), message),
            },
            Record::Paused { vcpu } => format!("paused    vCPU {vcpu}"),
            Record::Resumed { vcpu } => format!("resumed   vCPU {vcpu}"),
            Record::Unhook => "unhook    the VM is shutting down; hooks removed".into(),
            Record::Lost { count } => format!("lost      {count} record(s): this reader fell behind"),
            Record::Detached { reason } => format!("detached  {reason}"),
        }
    }

    /// One JSON object (no newline).
    pub fn json(&self) -> String {
        let o = Obj::new().str("event", self.kind());
        match self {
            Record::Syscall { who, nr, name, call } => {
                who.json(o).num("nr", *nr).str("name", name).str("call", call).build()
            }
            Record::Breakpoint { who, gpa, rip } => who.json(o).hex("gpa", *gpa).hex("rip", *rip).build(),
            Record::Msr { who, msr, old, new, blocked } => {
                let o = who.json(o).hex("msr", u64::from(*msr));
                let o = match msr_name(*msr) {
                    Some(n) => o.str("msr_name", n),
                    None => o,
                };
                o.hex("old", *old).hex("new", *new).bool("blocked", *blocked).build()
            }
            Record::Page { who, gpa, gva, access, rip, blocked } => who
                .json(o)
                .hex("gpa", *gpa)
                .hex("gva", *gva)
                .str("access", &access.to_string())
                .hex("rip", *rip)
                .bool("blocked", *blocked)
                .build(),
            Record::Hypercall { who, message, reply } => {
                let o = who.json(o).str("message", message);
                match reply {
                    Some(r) => o.str("reply", r).build(),
                    None => o.build(),
                }
            }
            Record::Paused { vcpu } | Record::Resumed { vcpu } => o.num("vcpu", u64::from(*vcpu)).build(),
            Record::Unhook => o.build(),
            Record::Lost { count } => o.num("count", *count).build(),
            Record::Detached { reason } => o.str("reason", reason).build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_names_round_trip() {
        assert_eq!(parse_msr("lstar"), Some(0xc000_0082));
        assert_eq!(parse_msr("IA32_LSTAR"), Some(0xc000_0082));
        assert_eq!(parse_msr("0x174"), Some(0x174));
        assert_eq!(parse_msr("bogus"), None);
        assert_eq!(parse_msr("0x1_0000_0000"), None);
    }

    #[test]
    fn records_print_for_people_and_pipes() {
        let who = Who { vcpu: 1, pid: Some(4), process: Some("rootkit".into()) };
        let r = Record::Msr { who, msr: 0xc000_0082, old: 0x100040, new: 0x400000, blocked: true };
        assert_eq!(
            r.text(None),
            "BLOCKED   vCPU 1: MSR LSTAR write 0x00000000_00100040 -> 0x00000000_00400000 by pid 4 (rootkit); old value kept"
        );
        assert_eq!(
            r.json(),
            r#"{"event":"msr","vcpu":1,"pid":4,"process":"rootkit","msr":"0xc0000082","msr_name":"LSTAR","old":"0x100040","new":"0x400000","blocked":true}"#
        );
        let h = Record::Hypercall { who: Who::default(), message: "hi \"x\"".into(), reply: None };
        assert!(h.json().contains(r#""message":"hi \"x\"""#));
        assert!(h.text(None).contains("the kernel says"));
    }
}
