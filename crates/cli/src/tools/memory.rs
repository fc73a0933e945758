//! The memory commands: `read` (a hex dump, raw bytes or JSON, physical or
//! through a vCPU's page tables) and `dump` (bulk, with a progress bar; the
//! bytes, a hex dump or JSON).

use std::time::{Duration, Instant};

use ukvmi_monitor::{json::Obj, symbols::parse_number};

use super::{kvmi, Args, Ctx, Failure, Out};

/// Reads `len` bytes at `gpa`, calling `sink` per chunk: 1 MiB at a time
/// from the zero-copy view when the VM granted one (and `socket` is false),
/// else a page per KVMI_VM_READ_PHYSICAL.
fn read_range(
    ctx: &Ctx<'_>,
    gpa: u64,
    len: u64,
    socket: bool,
    mut sink: impl FnMut(u64, &[u8]) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let vm = ctx.mon.vm();
    let map = ctx.mon.memory_map().filter(|_| !socket);
    let mut at = gpa;
    let end = gpa.checked_add(len).ok_or_else(|| Failure::usage("address range overflows"))?;
    // 1 MiB at a time either way: through the socket as pipelined
    // READ_PHYSICALs (one round trip per page would dominate).
    let mut buf = vec![0u8; 1 << 20];
    while at < end {
        let n = (buf.len() as u64).min(end - at) as usize;
        let chunk = buf.get_mut(..n).unwrap_or_default();
        match map {
            Some(m) => m
                .read(at, chunk)
                .map_err(|e| Failure { msg: format!("reading the mapped view at {at:#x}: {e}"), status: 1 })?,
            None => vm.read_physical_range(at, chunk).map_err(kvmi(&format!("KVMI_VM_READ_PHYSICAL at {at:#x}")))?,
        }
        sink(at, chunk)?;
        at += n as u64;
    }
    Ok(())
}

fn hexdump_line(addr: u64, b: &[u8]) -> String {
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    let ascii: String = b.iter().map(|&c| if c.is_ascii_graphic() || c == b' ' { c as char } else { '.' }).collect();
    format!("{addr:016x}  {:<47}  |{ascii}|", hex.join(" "))
}

pub(crate) fn read(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let what = a.pos(0, "ADDR (guest physical, or virtual with --vcpu N; a number, or a kernel symbol)")?;
    let len =
        a.pos.get(1).map_or(Some(64), |l| parse_number(l)).ok_or_else(|| Failure::usage("LEN must be a number"))?;
    if len > 1 << 20 {
        return Err(Failure::usage("read is for up to 1 MiB; use `ukvmi dump` for more"));
    }
    let vcpu = a.val("--vcpu").map(|v| ctx.vcpu(v)).transpose()?;
    let addr = match vcpu {
        Some(_) => ctx.addr(what)?,
        None => ctx.phys(what, len)?,
    };
    addr.checked_add(len).ok_or_else(|| Failure::usage("address range overflows"))?;
    let raw = a.has("--raw");
    let json = a.has("--json");
    if raw && (json || a.has("--hex")) {
        return Err(Failure::usage("--raw gives the bytes themselves: not with --hex or --json"));
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut line_at = addr;
    let mut sink = |chunk: &[u8]| -> Result<(), Failure> {
        if raw {
            return Ok(out.raw(chunk)?);
        }
        if json {
            pending.extend_from_slice(chunk);
            return Ok(());
        }
        pending.extend_from_slice(chunk);
        while pending.len() >= 16 {
            out.line(&hexdump_line(line_at, pending.get(..16).unwrap_or_default()))?;
            pending.drain(..16);
            line_at += 16;
        }
        Ok(())
    };
    match vcpu {
        // Virtual: page by page through the vCPU's page tables (whatever
        // address space it is in now; pause first for a stable view).
        Some(v) => {
            for (gpa, n) in ctx.virt_pieces(v, addr, len)? {
                let mut buf = vec![0u8; n as usize];
                ctx.mon
                    .read(gpa, &mut buf)
                    .map_err(|e| Failure { msg: format!("reading gpa {gpa:#x}: {e}"), status: 1 })?;
                sink(&buf)?;
            }
        }
        None => read_range(ctx, addr, len, false, |_, chunk| sink(chunk))?,
    }
    if json {
        let o = Obj::new().hex("addr", addr);
        let o = match vcpu {
            Some(v) => o.num("vcpu", u64::from(v)),
            None => o,
        };
        out.line(&o.num("len", len).str("hex", &hex_string(&pending)).build())?;
    } else if !raw && !pending.is_empty() {
        out.line(&hexdump_line(line_at, &pending))?;
    }
    Ok(())
}

/// The bytes as lowercase hex, two digits each, nothing between.
fn hex_string(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Standard base64 (RFC 4648, with `=` padding).
fn base64(b: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sym = |v: u32| char::from(ABC.get((v & 63) as usize).copied().unwrap_or(b'='));
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let byte = |i: usize| u32::from(c.get(i).copied().unwrap_or(0));
        let n = byte(0) << 16 | byte(1) << 8 | byte(2);
        s.push(sym(n >> 18));
        s.push(sym(n >> 12));
        s.push(if c.len() > 1 { sym(n >> 6) } else { '=' });
        s.push(if c.len() > 2 { sym(n) } else { '=' });
    }
    s
}

fn bar(done: u64, total: u64, started: Instant) -> String {
    let frac = if total == 0 { 1.0 } else { done as f64 / total as f64 };
    let filled = (frac * 30.0) as usize;
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    format!(
        "[{}{}] {:>3.0}%  {:.1}/{:.1} MiB  {:.1} MB/s",
        "#".repeat(filled),
        " ".repeat(30 - filled.min(30)),
        frac * 100.0,
        done as f64 / 1048576.0,
        total as f64 / 1048576.0,
        done as f64 / secs / 1e6
    )
}

pub(crate) fn dump(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let socket = match a.val("--via") {
        None | Some("map") => false,
        Some("socket") => true,
        Some(v) => {
            return Err(Failure::usage(format!(
                "--via takes `map` (the zero-copy view, default when granted) or `socket` (READ_PHYSICAL), not `{v}`"
            )))
        }
    };
    if a.val("--via") == Some("map") && ctx.mon.memory_map().is_none() {
        return Err(Failure {
            msg: "the VM did not grant a mapped view (UKVMI_VM_MAP_MEMORY not allowed or not supported)".into(),
            status: 1,
        });
    }
    let ram = ctx.mon.vm().info().max_gpa;
    let given =
        a.pos.get(1).map(|l| parse_number(l).ok_or_else(|| Failure::usage("LEN must be a number"))).transpose()?;
    let gpa = a.pos.first().map(|t| ctx.phys(t, given.unwrap_or(1))).transpose()?.unwrap_or(0);
    let len = given.unwrap_or_else(|| ram.saturating_sub(gpa));
    if gpa.checked_add(len).is_none_or(|e| e > ram) {
        return Err(Failure::usage(format!("{gpa:#x}+{len:#x} is past the end of guest RAM ({ram:#x})")));
    }
    let started = Instant::now();
    let mut last = Instant::now();
    let show = out.stderr_tty() && !a.has("--quiet") && len >= 1 << 20;
    let mut done = 0u64;
    let via = if socket || ctx.mon.memory_map().is_none() { "READ_PHYSICAL" } else { "the mapped view" };
    let (hex, json) = (a.has("--hex"), a.has("--json"));
    if hex && json {
        return Err(Failure::usage("--hex and --json are two ways to print the bytes: give one"));
    }
    read_range(ctx, gpa, len, socket, |at, chunk| {
        if out.gone() {
            return Err(Failure { msg: "the reader went away".into(), status: 1 });
        }
        if json {
            out.line(&Obj::new().hex("gpa", at).num("len", chunk.len() as u64).str("base64", &base64(chunk)).build())?;
        } else if hex {
            for (i, line) in chunk.chunks(16).enumerate() {
                out.line(&hexdump_line(at + 16 * i as u64, line))?;
            }
        } else {
            out.raw(chunk)?;
        }
        done += chunk.len() as u64;
        if show && last.elapsed() > Duration::from_millis(100) {
            last = Instant::now();
            out.progress(&bar(done, len, started))?;
        }
        Ok(())
    })?;
    if show {
        out.progress(&bar(done, len, started))?;
    }
    let secs = started.elapsed().as_secs_f64();
    if !a.has("--quiet") {
        out.note(&format!(
            "dumped {} bytes from {gpa:#x} in {secs:.2} s ({:.1} MB/s, through {via})",
            done,
            done as f64 / secs.max(1e-9) / 1e6
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_hex_encode_as_the_rfcs_say() {
        for (plain, want) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("foobar", "Zm9vYmFy")]
        {
            assert_eq!(base64(plain.as_bytes()), want, "{plain}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
        assert_eq!(hex_string(&[0x00, 0xab, 0x10]), "00ab10");
    }
}
