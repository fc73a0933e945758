//! `write`: bytes into guest memory, at a guest-physical address or a
//! symbol, or virtual through a vCPU's page tables (`--vcpu N`), as a
//! debugger's memory write (gdb's `M`, LibVMI's `vmi_write`).
//!
//! The bytes are HEXBYTES on the command line or a file (`--file`, read by
//! the client and sent with the request: at most 1 MiB). Every check that
//! needs no VM comes first, then every vCPU is held paused (unless they are
//! already, or `--no-pause`), the whole range is translated and checked, and
//! only then is anything written: a bad address writes nothing, and no vCPU
//! runs while a patch is half in. The vCPUs go on when the command ends,
//! however it ends; vCPUs paused before it (`ukvmi pause`) stay paused.

use std::{fmt, time::Duration};

use ukvmi_introspector::wire::msg;
use ukvmi_monitor::{
    json::{self, Obj},
    GuardedWriteError, HeldVcpus, Monitor,
};

use super::{target::page_pieces, Args, Ctx, Failure, Out};

/// The most bytes one `write` takes (what a request may carry).
const MAX_WRITE: usize = crate::control::MAX_DATA as usize;

/// How long `write` waits for every vCPU to pause before it gives up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What is wrong with the bytes given to `write` (all usage errors).
#[derive(Debug, PartialEq, Eq)]
enum BytesError {
    /// Neither HEXBYTES nor `--file`.
    Missing,
    /// Both HEXBYTES and `--file`.
    Both,
    /// `--file` without the bytes its client should have sent.
    NotSent,
    /// HEXBYTES starting with `0x`: it is bytes in order, not a number.
    NumberPrefix,
    /// A character that is not a hex digit (and its 1-based position).
    NotHex { at: usize, c: char },
    /// An odd number of hex digits.
    OddDigits(usize),
    /// No bytes at all (`file`: from an empty `--file`).
    Empty { file: bool },
    /// More than [`MAX_WRITE`] bytes.
    TooMany(usize),
}

impl fmt::Display for BytesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BytesError::Missing => write!(f, "missing the bytes: HEXBYTES (e.g. 90c3) or --file FILE"),
            BytesError::Both => write!(f, "HEXBYTES or --file FILE: give one, not both"),
            BytesError::NotSent => write!(f, "the bytes of --file did not come with the command"),
            BytesError::NumberPrefix => write!(
                f,
                "HEXBYTES is the bytes in order, two hex digits each (e.g. 90c3 for 0x90 then 0xc3), \
                 not a number: drop the `0x`"
            ),
            BytesError::NotHex { at, c } => write!(
                f,
                "HEXBYTES: `{}` (character {at}) is not a hex digit; give two hex digits per byte, e.g. 90c3",
                c.escape_debug()
            ),
            BytesError::OddDigits(n) => {
                write!(f, "HEXBYTES has {n} hex digits, an odd number: two per byte (0x9 is 09)")
            }
            BytesError::Empty { file: true } => write!(f, "nothing to write: the file is empty"),
            BytesError::Empty { file: false } => write!(f, "nothing to write: HEXBYTES is empty"),
            BytesError::TooMany(n) => write!(
                f,
                "{n} bytes: `write` takes at most {MAX_WRITE} (1 MiB) at a time; write a larger range in parts"
            ),
        }
    }
}

/// HEXBYTES: pairs of hex digits, the bytes in order; ASCII whitespace
/// between them is ignored (`"90 90 c3"`, `xxd -p` output).
fn parse_hex(text: &str) -> Result<Vec<u8>, BytesError> {
    if text.starts_with("0x") || text.starts_with("0X") {
        return Err(BytesError::NumberPrefix);
    }
    let mut digits = Vec::with_capacity(text.len());
    for (i, c) in text.chars().enumerate() {
        if c.is_ascii_whitespace() {
            continue;
        }
        let d = c.to_digit(16).ok_or(BytesError::NotHex { at: i + 1, c })?;
        digits.push(d as u8);
    }
    if digits.len() % 2 == 1 {
        return Err(BytesError::OddDigits(digits.len()));
    }
    Ok(digits.chunks(2).map(|p| p.first().copied().unwrap_or(0) << 4 | p.get(1).copied().unwrap_or(0)).collect())
}

/// The bytes to write: the operands after ADDR (HEXBYTES, which may be
/// several words), or the input of `--file`.
fn bytes_of(hex: &[&str], file: Option<&str>, input: Option<&[u8]>) -> Result<Vec<u8>, BytesError> {
    let b = match (hex.is_empty(), file) {
        (true, None) => return Err(BytesError::Missing),
        (false, Some(_)) => return Err(BytesError::Both),
        (true, Some(_)) => input.ok_or(BytesError::NotSent)?.to_vec(),
        (false, None) => parse_hex(&hex.join(" "))?,
    };
    if b.is_empty() {
        return Err(BytesError::Empty { file: file.is_some() });
    }
    if b.len() > MAX_WRITE {
        return Err(BytesError::TooMany(b.len()));
    }
    Ok(b)
}

/// Where the bytes go.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Virtual, through this vCPU's page tables.
    Virtual(u16),
    /// Guest-physical, from this address.
    Physical(u64),
}

/// How the vCPUs stood while the bytes went in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Paused {
    /// Held paused by this command, for the write.
    ForTheWrite,
    /// Held paused already (`ukvmi pause`): they stay paused.
    Already,
    /// Running (`--no-pause`).
    No,
}

/// Every vCPU held paused for the write (a scoped hold: it nests with a
/// `ukvmi pause` from any client and ends with the command, on every path
/// out of it; vCPUs paused before it stay paused).
struct Hold<'a> {
    _held: Option<HeldVcpus<'a>>,
    how: Paused,
}

impl<'a> Hold<'a> {
    fn new(mon: &'a Monitor, pause: bool) -> Result<Hold<'a>, Failure> {
        // Paused already by the tool's own pause (`ukvmi pause`): they stay
        // paused after the write, whatever --no-pause says.
        let already = mon.pause_holders().tool && mon.held().len() == usize::from(mon.vcpus());
        if !pause {
            return Ok(Hold { _held: None, how: if already { Paused::Already } else { Paused::No } });
        }
        let held = mon.hold_all(PAUSE_TIMEOUT).map_err(|e| Failure {
            msg: format!(
                "pausing the vCPUs for the write: {e}; nothing was written (--no-pause writes while they run)"
            ),
            status: 1,
        })?;
        Ok(Hold { _held: Some(held), how: if already { Paused::Already } else { Paused::ForTheWrite } })
    }
}

/// The pieces merged where they follow each other in guest-physical memory.
fn runs(pieces: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    for &(gpa, n) in pieces {
        match v.last_mut() {
            Some((g, l)) if *g + *l == gpa => *l += n,
            _ => v.push((gpa, n)),
        }
    }
    v
}

pub(crate) fn write(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let what = a.pos(0, "ADDR (guest physical, or virtual with --vcpu N; a number, or a kernel symbol)")?;
    let bytes =
        bytes_of(a.pos.get(1..).unwrap_or(&[]), a.val("--file"), a.input).map_err(|e| Failure::usage(e.to_string()))?;
    let len = bytes.len() as u64;
    // Where the bytes go: virtual through vCPU N's tables (translated once
    // the vCPUs are held), or physical (a symbol through vCPU 0's tables or
    // the kernel's fixed map, now: kernel mappings stay put).
    let addr = ctx.addr(what)?;
    addr.checked_add(len).ok_or_else(|| Failure::usage("address range overflows"))?;
    let ram = ctx.mon.vm().info().max_gpa;
    let target = match a.val("--vcpu").map(|v| ctx.vcpu(v)).transpose()? {
        Some(v) => Target::Virtual(v),
        None => {
            let gpa = ctx.phys(what, len)?;
            if gpa.checked_add(len).is_none_or(|e| e > ram) {
                return Err(Failure::usage(format!("{gpa:#x}+{len:#x} is past the end of guest RAM ({ram:#x})")));
            }
            Target::Physical(gpa)
        }
    };
    ctx.mon.vm().check_command(msg::VM_WRITE_PHYSICAL).map_err(|e| Failure {
        msg: format!("this VM does not let the introspector write its memory (KVMI_VM_WRITE_PHYSICAL: {e})"),
        status: 1,
    })?;
    let hold = Hold::new(ctx.mon, !a.has("--no-pause"))?;
    let pieces = match target {
        Target::Virtual(v) => ctx.virt_pieces(v, addr, len)?,
        Target::Physical(gpa) => page_pieces(gpa, len),
    };
    for &(gpa, n) in &pieces {
        if gpa.checked_add(n).is_none_or(|e| e > ram) {
            return Err(Failure {
                msg: format!(
                    "{addr:#x}+{len:#x} reaches gpa {gpa:#x}, outside guest RAM ({ram:#x}); nothing was written"
                ),
                status: 1,
            });
        }
    }
    let mut chunks = Vec::with_capacity(pieces.len());
    let mut at = 0usize;
    for &(gpa, n) in &pieces {
        let end = at.saturating_add(n as usize);
        chunks.push((gpa, bytes.get(at..end).unwrap_or_default()));
        at = end;
    }
    ctx.mon.write_unless_breakpoint(&chunks).map_err(|e| Failure {
        msg: match e {
            GuardedWriteError::Breakpoint { gpa: bp } => format!(
                "gpa {bp:#x} holds the int3 of a breakpoint (a `trace --breakpoint` or `trace --syscalls`): \
                 the byte under it would come back when the trace ends; stop that trace first. Nothing was written"
            ),
            GuardedWriteError::Write { gpa, written: 0, source } => {
                format!("KVMI_VM_WRITE_PHYSICAL at gpa {gpa:#x}: {source}; nothing was written")
            }
            GuardedWriteError::Write { gpa, written, source } => {
                format!("KVMI_VM_WRITE_PHYSICAL at gpa {gpa:#x}: {source}; {written} of {len} bytes were written")
            }
            other => other.to_string(),
        },
        status: 1,
    })?;
    let paused = hold.how;
    drop(hold);
    let runs = runs(&pieces);
    let gpa = runs.first().map_or(0, |r| r.0);
    if a.has("--json") {
        let o = Obj::new().hex("addr", addr);
        let o = match target {
            Target::Virtual(v) => o.num("vcpu", u64::from(v)),
            Target::Physical(_) => o,
        };
        let mut o = o.hex("gpa", gpa).num("len", len).bool("paused", paused != Paused::No);
        if runs.len() > 1 {
            let list = runs.iter().map(|&(g, n)| Obj::new().hex("gpa", g).num("len", n).build());
            o = o.raw("runs", &json::array(list));
        }
        return Ok(out.line(&o.build())?);
    }
    let at = match target {
        Target::Physical(g) if g == addr => format!("gpa {gpa:#x}"),
        Target::Physical(_) => format!("{addr:#x} (gpa {gpa:#x})"),
        Target::Virtual(v) => format!("{addr:#x} in vCPU {v}'s address space (gpa {gpa:#x})"),
    };
    let named = match ctx.syms.and_then(|s| s.symbolize(addr)) {
        Some(_) => format!(" ({})", ctx.describe(addr)),
        None => String::new(),
    };
    let split = if runs.len() > 1 { format!(", in {} physical pieces", runs.len()) } else { String::new() };
    out.line(&format!(
        "wrote {len} bytes at {at}{named}{split}; {}",
        match paused {
            Paused::ForTheWrite => "every vCPU was held paused for it",
            Paused::Already => "the vCPUs were paused already and stay paused",
            Paused::No => "the vCPUs kept running (--no-pause)",
        }
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hexbytes_are_pairs_of_digits_in_order() {
        assert_eq!(parse_hex("90c3"), Ok(vec![0x90, 0xc3]));
        assert_eq!(parse_hex("DEad bE ef\n"), Ok(vec![0xde, 0xad, 0xbe, 0xef]));
        assert_eq!(parse_hex(""), Ok(vec![]));
        assert_eq!(parse_hex("0x90"), Err(BytesError::NumberPrefix));
        assert_eq!(parse_hex("90g1"), Err(BytesError::NotHex { at: 3, c: 'g' }));
        assert_eq!(parse_hex("90é1"), Err(BytesError::NotHex { at: 3, c: 'é' }));
        assert_eq!(parse_hex("909"), Err(BytesError::OddDigits(3)));
        assert_eq!(parse_hex("9 09"), Err(BytesError::OddDigits(3)));
    }

    #[test]
    fn the_bytes_come_from_one_place_and_are_bounded() {
        assert_eq!(bytes_of(&["90", "c3"], None, None), Ok(vec![0x90, 0xc3]), "HEXBYTES may be several words");
        assert_eq!(bytes_of(&[], Some("f"), Some(&[1, 2])), Ok(vec![1, 2]));
        assert_eq!(bytes_of(&[], None, None), Err(BytesError::Missing));
        assert_eq!(bytes_of(&["90"], Some("f"), Some(&[1])), Err(BytesError::Both));
        assert_eq!(bytes_of(&[], Some("f"), None), Err(BytesError::NotSent));
        assert_eq!(bytes_of(&[], Some("f"), Some(&[])), Err(BytesError::Empty { file: true }));
        assert_eq!(bytes_of(&[" "], None, None), Err(BytesError::Empty { file: false }));
        let max = vec![0u8; MAX_WRITE];
        assert_eq!(bytes_of(&[], Some("f"), Some(&max)).map(|b| b.len()), Ok(MAX_WRITE));
        let over = vec![0u8; MAX_WRITE + 1];
        assert_eq!(bytes_of(&[], Some("f"), Some(&over)), Err(BytesError::TooMany(MAX_WRITE + 1)));
        assert!(BytesError::TooMany(MAX_WRITE + 1).to_string().contains("at most 1048576 (1 MiB)"));
    }

    #[test]
    fn pieces_stay_within_pages_and_runs_merge_what_follows() {
        assert_eq!(page_pieces(0x1ffe, 4), vec![(0x1ffe, 2), (0x2000, 2)]);
        assert_eq!(page_pieces(0x3000, 0x2000), vec![(0x3000, 0x1000), (0x4000, 0x1000)]);
        assert_eq!(page_pieces(0x10, 1), vec![(0x10, 1)]);
        assert_eq!(page_pieces(u64::MAX - 1, 4), vec![], "a range past the end of the address space: none");
        assert_eq!(runs(&[(0x1ffe, 2), (0x2000, 2)]), vec![(0x1ffe, 4)]);
        assert_eq!(runs(&[(0x5ffe, 2), (0x9000, 2)]), vec![(0x5ffe, 2), (0x9000, 2)]);
    }
}
