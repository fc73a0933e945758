//! QEMU's gdbstub, the baseline users have today on stock KVM: Debian's
//! `qemu-system-x86_64` with `-enable-kvm -S -gdb tcp:...`, driven here over
//! the GDB remote serial protocol (packets `$payload#xx`), written from the
//! protocol description: `g` (registers), `m addr,len` (memory, at most
//! 2 KiB per packet, as QEMU's packet size allows), `s` (one step), the
//! interrupt byte 0x03 and `c` (continue). Like gdb itself, the client
//! switches acknowledgements off (`QStartNoAckMode`) when QEMU offers it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Largest `m` request: QEMU's packets hold at most 4096 payload bytes,
/// two hex digits per memory byte.
pub const MAX_M: usize = 2048;

/// A QEMU process, killed on drop.
pub struct Qemu {
    child: Child,
    log: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The command line used, for the report.
pub fn qemu_args(port: u16, smp: u16, mem_mib: u64) -> Vec<String> {
    [
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        &smp.to_string(),
        "-m",
        &mem_mib.to_string(),
        "-S",
        "-gdb",
        &format!("tcp:127.0.0.1:{port}"),
        "-display",
        "none",
        "-nodefaults",
        "-monitor",
        "none",
        "-serial",
        "none",
        "-no-reboot",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect()
}

pub const QEMU: &str = "qemu-system-x86_64";

/// `qemu-system-x86_64 --version`'s first line, or why it cannot run.
pub fn qemu_version() -> Result<String, String> {
    let out = Command::new(QEMU).arg("--version").output().map_err(|e| format!("{QEMU}: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string())
}

/// Starts QEMU stopped (`-S`) with its gdbstub on a free local port and
/// connects to it.
pub fn start(smp: u16, mem_mib: u64) -> Result<(Qemu, Gdb), String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free port: {e}"))?
        .port();
    let log = std::env::temp_dir().join(format!("ukvmi-bench-qemu-{}.log", std::process::id()));
    let child = Command::new(QEMU)
        .args(qemu_args(port, smp, mem_mib))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("{QEMU}: {e} (install Debian's qemu-system-x86; scripts/bench does)"))?;
    let mut q = Qemu { child, log };
    let t0 = Instant::now();
    let stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => {
                if let Ok(Some(st)) = q.child.try_wait() {
                    let why = std::fs::read_to_string(&q.log).unwrap_or_default();
                    return Err(format!("QEMU exited ({st}): {}", why.trim()));
                }
                if t0.elapsed() > Duration::from_secs(20) {
                    return Err(format!("QEMU's gdbstub on port {port} did not answer: {e}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let gdb = Gdb::new(stream)?;
    Ok((q, gdb))
}

/// A GDB remote-protocol client.
pub struct Gdb {
    w: TcpStream,
    r: BufReader<TcpStream>,
    ack: bool,
}

fn hex_val(c: u8) -> Result<u8, String> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("not a hex digit: {:?}", c as char)),
    }
}

/// Decodes hex pairs into `out` (which must be exactly half as long).
pub fn unhex(hex: &[u8], out: &mut [u8]) -> Result<(), String> {
    if hex.len() != 2 * out.len() {
        return Err(format!("{} hex digits for {} bytes", hex.len(), out.len()));
    }
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = hex_val(pair[0])? << 4 | hex_val(pair[1])?;
    }
    Ok(())
}

impl Gdb {
    fn new(stream: TcpStream) -> Result<Gdb, String> {
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let r = BufReader::with_capacity(64 * 1024, stream.try_clone().map_err(|e| e.to_string())?);
        let mut g = Gdb { w: stream, r, ack: true };
        let sup = g.cmd("qSupported:multiprocess+;swbreak+;hwbreak+;no-resumed+")?;
        if String::from_utf8_lossy(&sup).contains("QStartNoAckMode+") {
            let ok = g.cmd("QStartNoAckMode")?;
            if ok == b"OK" {
                g.ack = false;
            }
        }
        let why = g.cmd("?")?;
        if !matches!(why.first(), Some(b'T' | b'S')) {
            return Err(format!("`?` answered {:?}", String::from_utf8_lossy(&why)));
        }
        Ok(g)
    }

    /// Sends one packet (and, in ack mode, waits for its `+`).
    pub fn send(&mut self, payload: &str) -> Result<(), String> {
        let sum = payload.bytes().fold(0u8, u8::wrapping_add);
        let pkt = format!("${payload}#{sum:02x}");
        self.w.write_all(pkt.as_bytes()).map_err(|e| format!("gdbstub write: {e}"))?;
        if self.ack {
            let mut b = [0u8; 1];
            loop {
                self.r.read_exact(&mut b).map_err(|e| format!("gdbstub ack: {e}"))?;
                match b[0] {
                    b'+' => break,
                    b'-' => self.w.write_all(pkt.as_bytes()).map_err(|e| e.to_string())?,
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Receives one packet's payload (escapes and run-length encoding undone,
    /// checksum verified).
    pub fn recv(&mut self) -> Result<Vec<u8>, String> {
        let e = |e: std::io::Error| format!("gdbstub read: {e}");
        let mut junk = Vec::new();
        self.r.read_until(b'$', &mut junk).map_err(e)?;
        if junk.last() != Some(&b'$') {
            return Err("gdbstub closed the connection".into());
        }
        let mut raw = Vec::with_capacity(8192);
        self.r.read_until(b'#', &mut raw).map_err(e)?;
        if raw.pop() != Some(b'#') {
            return Err("gdbstub closed inside a packet".into());
        }
        let mut cs = [0u8; 2];
        self.r.read_exact(&mut cs).map_err(e)?;
        let sum = raw.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        if sum != hex_val(cs[0])? << 4 | hex_val(cs[1])? {
            return Err("gdbstub packet with a bad checksum".into());
        }
        if self.ack {
            self.w.write_all(b"+").map_err(|e| e.to_string())?;
        }
        let mut out = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            match raw[i] {
                b'}' if i + 1 < raw.len() => {
                    out.push(raw[i + 1] ^ 0x20);
                    i += 2;
                }
                b'*' if i + 1 < raw.len() && !out.is_empty() => {
                    let last = *out.last().unwrap();
                    let n = usize::from(raw[i + 1]).saturating_sub(29);
                    out.extend(std::iter::repeat_n(last, n));
                    i += 2;
                }
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        Ok(out)
    }

    /// One command and its reply.
    pub fn cmd(&mut self, payload: &str) -> Result<Vec<u8>, String> {
        self.send(payload)?;
        self.recv()
    }

    /// `g`: the register block (hex decoded); its length depends on the
    /// target description (x86-64: 560 bytes).
    pub fn read_regs(&mut self) -> Result<Vec<u8>, String> {
        let hex = self.cmd("g")?;
        if hex.first() == Some(&b'E') || hex.len() % 2 != 0 {
            return Err(format!("`g` answered {:?}", String::from_utf8_lossy(&hex)));
        }
        let mut out = vec![0u8; hex.len() / 2];
        unhex(&hex, &mut out)?;
        Ok(out)
    }

    /// `m`: reads `buf.len()` bytes at `addr` in packets of at most 2 KiB.
    pub fn read_mem(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut off = 0usize;
        for chunk in buf.chunks_mut(MAX_M) {
            let a = addr + off as u64;
            let hex = self.cmd(&format!("m{a:x},{:x}", chunk.len()))?;
            if hex.first() == Some(&b'E') {
                return Err(format!("`m` at {a:#x} answered {:?}", String::from_utf8_lossy(&hex)));
            }
            unhex(&hex, chunk)?;
            off += chunk.len();
        }
        Ok(())
    }

    /// `s`: one step; the stop reply must say SIGTRAP (5).
    pub fn step(&mut self) -> Result<(), String> {
        let r = self.cmd("s")?;
        if r.len() >= 3 && matches!(r[0], b'T' | b'S') && &r[1..3] == b"05" {
            Ok(())
        } else {
            Err(format!("`s` answered {:?}", String::from_utf8_lossy(&r)))
        }
    }

    /// `c`: resume; the stub answers only when the target stops again.
    pub fn cont(&mut self) -> Result<(), String> {
        self.send("c")
    }

    /// The interrupt byte (0x03, outside any packet) and the stop reply.
    pub fn interrupt(&mut self) -> Result<(), String> {
        self.w.write_all(&[0x03]).map_err(|e| format!("gdbstub write: {e}"))?;
        let r = self.recv()?;
        if matches!(r.first(), Some(b'T' | b'S')) {
            Ok(())
        } else {
            Err(format!("the interrupt answered {:?}", String::from_utf8_lossy(&r)))
        }
    }
}
