//! The control socket's paths and wire format, between one-shot tool
//! commands and the daemon that holds the KVMI connection (see `daemon/`
//! for why there is one). The client side is in `client.rs`; who may talk
//! to whom, and what is private, in `private.rs`.
//!
//! A client sends one request — `UKVMI1`, a flags byte (bit 0: its stderr is
//! a terminal; bit 1: a key follows; bit 2: a wait follows; bit 3: a symbol
//! map's path follows), a u32 length and the command's arguments separated
//! by NUL, then with bit 1 a u32 length and the key, with bit 2 a u32 count
//! of milliseconds (how long to wait for a VM), with bit 3 a u32 length and
//! the path, with bit 4 a u32 length and the command's input bytes (`write
//! --file`, read by the client) — and reads frames `[kind u8][len u32 LE][data]` until an exit frame:
//! stdout bytes, stderr text, a progress line, or the exit status. Closing
//! the socket (Ctrl-C) tells the daemon to stop the command and undo what
//! it set up.
//!
//! The socket, like every file the daemon makes, is 0600, and both ends
//! check the other's uid (`SO_PEERCRED`): the daemon serves only its own
//! user and root, and a client talks only to a daemon running as itself or
//! root (it may be about to send the key).

mod client;
mod private;

use std::{
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

pub use client::{client, Session};
pub use private::{load_key, my_uid, open_private, peer_cred, served_users, trusted_uid};

pub const MAGIC: &[u8; 6] = b"UKVMI1";
pub const MAX_REQUEST: u32 = 64 * 1024;
/// The longest key a request may carry.
pub const MAX_KEY: u32 = 4096;

/// Request flag: the client's stderr is a terminal.
pub const FLAG_TTY: u8 = 1;
/// Request flag: a key follows the arguments.
pub const FLAG_KEY: u8 = 2;
/// Request flag: how long to wait for a VM follows (u32 milliseconds).
pub const FLAG_WAIT: u8 = 4;
/// Request flag: the path of a symbol map (`--map`) follows.
pub const FLAG_MAP: u8 = 8;
/// The longest `--map` path a request may carry.
pub const MAX_MAP_PATH: u32 = 4096;
/// Request flag: the command's input bytes follow (`write --file`).
pub const FLAG_DATA: u8 = 16;
/// The most input bytes a request may carry (what `write` takes at once).
pub const MAX_DATA: u32 = 1 << 20;

/// The environment variable that holds the key (tools, daemon and VMM).
pub const KEY_ENV: &str = "UKVMI_KEY";

pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const PROGRESS: u8 = 3;
pub const EXIT: u8 = 9;

/// The daemon's control socket for the KVMI socket at `vm`.
pub fn ctl_path(vm: &Path) -> PathBuf {
    let mut p = vm.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// The file the daemon for the KVMI socket at `vm` holds locked (flock)
/// for as long as it runs, so that only one serves a path.
pub fn lock_path(vm: &Path) -> PathBuf {
    let mut p = vm.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// The daemon's exit status when another daemon already serves (or is
/// starting to serve) the same path: its client then talks to that one.
pub const ALREADY_SERVED: u8 = 3;

/// The daemon's log for the KVMI socket at `vm`.
pub fn log_path(vm: &Path) -> PathBuf {
    let mut p = vm.as_os_str().to_owned();
    p.push(".log");
    PathBuf::from(p)
}

/// Writes one reply frame: its kind, length and data.
pub fn write_frame(w: &mut impl Write, kind: u8, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(data)
}

/// One request: the flags byte, the arguments, and the key, the wait and
/// the symbol map, if given.
#[derive(Debug, PartialEq, Eq, Default)]
pub struct Request {
    pub flags: u8,
    pub args: Vec<String>,
    pub key: Option<Vec<u8>>,
    /// How long to wait for a VM (`--wait`), in milliseconds.
    pub wait_ms: Option<u32>,
    /// The symbol map the command wants (`--map`, an absolute path).
    pub map: Option<String>,
    /// The command's input bytes (`write --file FILE`: the client reads
    /// FILE, with the user's permissions and working directory).
    pub data: Option<Vec<u8>>,
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut l = [0u8; 4];
    r.read_exact(&mut l)?;
    Ok(u32::from_le_bytes(l))
}

/// Reads a u32 length, refused over `max` (before anything is allocated),
/// and that many bytes.
fn read_sized(r: &mut impl Read, max: u32, what: &str) -> io::Result<Vec<u8>> {
    let len = read_u32(r)?;
    if len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what} of {len} bytes (at most {max})")));
    }
    let mut b = vec![0u8; len as usize];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// Reads a request.
pub fn read_request(r: &mut impl Read) -> io::Result<Request> {
    let mut head = [0u8; 11];
    r.read_exact(&mut head)?;
    if &head[..6] != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a ukvmi control request"));
    }
    let flags = head[6];
    let len = u32::from_le_bytes([head[7], head[8], head[9], head[10]]);
    if len > MAX_REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request of {len} bytes (at most {MAX_REQUEST})"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    let text =
        String::from_utf8(body).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "request is not UTF-8"))?;
    let args = if text.is_empty() { Vec::new() } else { text.split('\0').map(str::to_string).collect() };
    let key = if flags & FLAG_KEY != 0 { Some(read_sized(r, MAX_KEY, "key")?) } else { None };
    let wait_ms = if flags & FLAG_WAIT != 0 { Some(read_u32(r)?) } else { None };
    let map = if flags & FLAG_MAP != 0 {
        let path = read_sized(r, MAX_MAP_PATH, "map path")?;
        Some(String::from_utf8(path).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "map path is not UTF-8"))?)
    } else {
        None
    };
    let data = if flags & FLAG_DATA != 0 { Some(read_sized(r, MAX_DATA, "input")?) } else { None };
    Ok(Request { flags, args, key, wait_ms, map, data })
}

/// Writes a request (the key, the wait, the map and the input, if any,
/// after the arguments, in that order). The flags for them are set here.
fn write_request(w: &mut impl Write, req: &Request) -> io::Result<()> {
    let Request { flags, args, key, wait_ms, map, data } = req;
    let key = key.as_deref();
    let body = args.join("\0");
    let len = u32::try_from(body.len()).ok().filter(|&l| l <= MAX_REQUEST).ok_or_else(|| {
        io::Error::other(format!(
            "the command's words are {} bytes long, more than the {} KiB a command may have \
             (`write` takes its bytes from a file with --file)",
            body.len(),
            MAX_REQUEST / 1024
        ))
    })?;
    let mut msg = Vec::with_capacity(15 + body.len() + key.map_or(0, <[u8]>::len));
    msg.extend_from_slice(MAGIC);
    msg.push(
        flags
            | if key.is_some() { FLAG_KEY } else { 0 }
            | if wait_ms.is_some() { FLAG_WAIT } else { 0 }
            | if map.is_some() { FLAG_MAP } else { 0 }
            | if data.is_some() { FLAG_DATA } else { 0 },
    );
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(body.as_bytes());
    if let Some(k) = key {
        let klen =
            u32::try_from(k.len()).ok().filter(|&l| l <= MAX_KEY).ok_or_else(|| io::Error::other("key too long"))?;
        msg.extend_from_slice(&klen.to_le_bytes());
        msg.extend_from_slice(k);
    }
    if let Some(ms) = wait_ms {
        msg.extend_from_slice(&ms.to_le_bytes());
    }
    if let Some(m) = map {
        let mlen = u32::try_from(m.len())
            .ok()
            .filter(|&l| l <= MAX_MAP_PATH)
            .ok_or_else(|| io::Error::other("the --map path is too long"))?;
        msg.extend_from_slice(&mlen.to_le_bytes());
        msg.extend_from_slice(m.as_bytes());
    }
    if let Some(d) = data {
        let dlen = u32::try_from(d.len())
            .ok()
            .filter(|&l| l <= MAX_DATA)
            .ok_or_else(|| io::Error::other(format!("more than {} MiB of input", MAX_DATA >> 20)))?;
        msg.extend_from_slice(&dlen.to_le_bytes());
        msg.extend_from_slice(d);
    }
    w.write_all(&msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(flags: u8, args: &[String], key: Option<&[u8]>) -> Request {
        Request { flags, args: args.to_vec(), key: key.map(<[u8]>::to_vec), ..Request::default() }
    }

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        let mut buf = Vec::new();
        let args = vec!["read".to_string(), "0x1000".to_string(), "16".to_string()];
        write_request(&mut buf, &request(1, &args, None)).unwrap();
        let req = read_request(&mut buf.as_slice()).unwrap();
        assert_eq!(req, Request { flags: 1, args: args.clone(), ..Request::default() });
        let mut keyed = Vec::new();
        write_request(&mut keyed, &request(0, &args, Some(b"s3cret"))).unwrap();
        let req = read_request(&mut keyed.as_slice()).unwrap();
        assert_eq!(
            req,
            Request { flags: FLAG_KEY, args: args.clone(), key: Some(b"s3cret".to_vec()), ..Request::default() }
        );
        keyed.truncate(keyed.len() - 1);
        assert!(read_request(&mut keyed.as_slice()).is_err(), "a cut key is refused");
        let mut lying = Vec::new();
        write_request(&mut lying, &request(0, &args, Some(b"k"))).unwrap();
        let at = lying.len() - 5;
        lying[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_request(&mut lying.as_slice()).is_err(), "a lying key length is refused before allocating");
        assert!(read_request(&mut &b"GARBAGE-XXXX"[..]).is_err());
        let mut huge = Vec::from(&MAGIC[..]);
        huge.push(0);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_request(&mut huge.as_slice()).is_err(), "a lying length is refused before allocating");
        let mut cut = Vec::new();
        write_request(&mut cut, &request(0, &args, None)).unwrap();
        cut.truncate(cut.len() - 3);
        assert!(read_request(&mut cut.as_slice()).is_err());
    }

    #[test]
    fn the_wait_and_the_map_round_trip_and_a_lying_map_length_is_refused() {
        let args = vec!["info".to_string()];
        let full = Request {
            flags: FLAG_TTY,
            args: args.clone(),
            key: Some(b"k".to_vec()),
            wait_ms: Some(30_000),
            map: Some("/tmp/System.map".into()),
            data: None,
        };
        let mut buf = Vec::new();
        write_request(&mut buf, &full).unwrap();
        let got = read_request(&mut buf.as_slice()).unwrap();
        assert_eq!(got, Request { flags: FLAG_TTY | FLAG_KEY | FLAG_WAIT | FLAG_MAP, ..full });
        let only_wait = Request { args: args.clone(), wait_ms: Some(0), ..Request::default() };
        let mut buf = Vec::new();
        write_request(&mut buf, &only_wait).unwrap();
        assert_eq!(read_request(&mut buf.as_slice()).unwrap(), Request { flags: FLAG_WAIT, ..only_wait });
        let mut lying = Vec::new();
        write_request(&mut lying, &Request { args, map: Some("m".into()), ..Request::default() }).unwrap();
        let at = lying.len() - 5;
        lying[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_request(&mut lying.as_slice()).is_err(), "a lying map length is refused before allocating");
    }

    #[test]
    fn input_bytes_round_trip_after_the_map_and_are_bounded() {
        let args = vec!["write".to_string(), "0x1000".to_string()];
        let with_data = Request {
            args: args.clone(),
            map: Some("/m".into()),
            data: Some(vec![0, 0xff, 0x90, b'\n']),
            ..Request::default()
        };
        let mut buf = Vec::new();
        write_request(&mut buf, &with_data).unwrap();
        assert_eq!(read_request(&mut buf.as_slice()).unwrap(), Request { flags: FLAG_MAP | FLAG_DATA, ..with_data });
        // Empty input is input (an empty --file), not none.
        let empty = Request { args: args.clone(), data: Some(Vec::new()), ..Request::default() };
        let mut buf = Vec::new();
        write_request(&mut buf, &empty).unwrap();
        assert_eq!(read_request(&mut buf.as_slice()).unwrap().data, Some(Vec::new()));
        // The most a request carries, and one byte more is refused by both ends.
        let max = Request { args: args.clone(), data: Some(vec![7; MAX_DATA as usize]), ..Request::default() };
        let mut buf = Vec::new();
        write_request(&mut buf, &max).unwrap();
        assert_eq!(read_request(&mut buf.as_slice()).unwrap().data.map(|d| d.len()), Some(MAX_DATA as usize));
        let over = Request { args: args.clone(), data: Some(vec![7; MAX_DATA as usize + 1]), ..Request::default() };
        assert!(write_request(&mut Vec::new(), &over).is_err());
        let mut lying = Vec::new();
        write_request(&mut lying, &Request { args, data: Some(vec![1]), ..Request::default() }).unwrap();
        let at = lying.len() - 5;
        lying[at..at + 4].copy_from_slice(&(MAX_DATA + 1).to_le_bytes());
        let e = read_request(&mut lying.as_slice()).unwrap_err();
        assert!(e.to_string().contains("at most 1048576"), "{e}");
        let cut = &buf[..buf.len() - 1];
        assert!(read_request(&mut &cut[..]).is_err(), "cut input is refused");
    }
}
