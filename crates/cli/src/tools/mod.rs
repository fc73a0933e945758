//! The introspector commands (`ukvmi info`, `regs`, `ps`, `trace`, …): what
//! they share — where output goes ([`Out`]), what they run against
//! ([`Ctx`]), how they fail ([`Failure`]) — and [`run`], which parses a
//! command's words against the command table and runs it. The daemon runs
//! them for its clients (see `daemon/`), `ukvmi demo` reuses the pieces.

mod guest_os;
mod hooks;
mod lstar_stub;
mod memory;
mod streams;
mod target;
mod vm_state;
mod write;

use std::{
    io::{self, Write},
    time::Duration,
};

use ukvmi_monitor::{symbols::parse_number, Monitor, SubWaker, SymbolMap};

use crate::{
    args::{MissingValue, Style, Word, Words},
    commands::{self, Action},
};

pub use guest_os::print_ps;
pub(crate) use guest_os::{ps, symbols};
pub(crate) use memory::{dump, read};
pub(crate) use streams::{protect, trace, watch_msr};
pub(crate) use vm_state::{info, pause, regs, resume, translate};
pub(crate) use write::write;

/// The longest time a seconds option takes (a year).
const MAX_SECS: u64 = 365 * 24 * 3600;

/// Where a command's output goes: a client of the daemon, or a terminal.
///
/// A method's `Err` of kind `BrokenPipe` means the reader went away (`| head`
/// closed, the client quit): the command stops there, quietly; `?` turns it
/// into a [`Failure`] with status 0.
pub trait Out {
    /// One line of standard output.
    fn line(&mut self, s: &str) -> io::Result<()>;
    /// Raw bytes of standard output.
    fn raw(&mut self, b: &[u8]) -> io::Result<()>;
    /// One line of standard error.
    fn note(&mut self, s: &str) -> io::Result<()>;
    /// A progress line on standard error, redrawn in place (only on a terminal).
    fn progress(&mut self, s: &str) -> io::Result<()>;
    /// Whether standard error is a terminal (progress bars).
    fn stderr_tty(&self) -> bool;
    /// Whether the reader went away (Ctrl-C on the client).
    fn gone(&self) -> bool;
    /// Wakes `waker` when the reader goes away, so that a command waiting
    /// for records notices it at once. (Output whose reader cannot go away
    /// unseen need not.)
    fn wake_when_gone(&mut self, _waker: SubWaker) {}
}

/// Whether `e` says the reader of the output went away (EPIPE, as after
/// `ukvmi ... | head`): the command then ends quietly, with status 0.
pub(crate) fn reader_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// Writes `text` to standard output; a reader that went away is no error.
pub(crate) fn write_stdout(text: &str) -> io::Result<()> {
    let mut o = io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        Err(e) if reader_gone(&e) => Ok(()),
        r => r,
    }
}

/// What a command runs against.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The engine (and through it the connection).
    pub mon: &'a Monitor,
    /// Symbols of the guest kernel, if known.
    pub syms: Option<&'a SymbolMap>,
}

/// A command's failure: the message for the user and the exit status.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong, with context.
    pub msg: String,
    /// 1 for a failure, 2 for a usage error.
    pub status: u8,
}

impl Failure {
    pub(super) fn usage(msg: impl Into<String>) -> Failure {
        Failure { msg: msg.into(), status: 2 }
    }
}

impl From<ukvmi_monitor::MonitorError> for Failure {
    fn from(e: ukvmi_monitor::MonitorError) -> Failure {
        Failure { msg: e.to_string(), status: 1 }
    }
}

impl From<io::Error> for Failure {
    /// A reader that went away (EPIPE) stops the command, status 0: it is
    /// no failure of the command's (see [`reader_gone`]).
    fn from(e: io::Error) -> Failure {
        let status = if reader_gone(&e) { 0 } else { 1 };
        Failure { msg: format!("writing the output: {e}"), status }
    }
}

pub(super) fn kvmi(what: &str) -> impl FnOnce(ukvmi_introspector::Error) -> Failure + '_ {
    move |e| Failure { msg: format!("{what}: {e}"), status: 1 }
}

/// A tool command's body, as the command table holds it.
pub(crate) type ToolFn = fn(&Ctx<'_>, &Args<'_>, &mut dyn Out) -> Result<(), Failure>;

/// A tool command's words: its operands and options, in the order given,
/// and the input bytes its client sent (`write --file`).
#[derive(Debug)]
pub(crate) struct Args<'a> {
    pos: Vec<&'a str>,
    flags: Vec<(&'a str, Option<&'a str>)>,
    input: Option<&'a [u8]>,
}

impl<'a> Args<'a> {
    fn parse(args: &'a [String], valued: &'a [&'a str], input: Option<&'a [u8]>) -> Result<Args<'a>, Failure> {
        let mut pos = Vec::new();
        let mut flags = Vec::new();
        for w in Words::new(args, valued, Style::Tool) {
            match w {
                Ok(Word::Opt(k, v)) => flags.push((k, v)),
                Ok(Word::Operand(o)) => pos.push(o),
                Err(MissingValue(k)) => return Err(Failure::usage(format!("{k} needs a value"))),
            }
        }
        Ok(Args { pos, flags, input })
    }
    pub(super) fn has(&self, f: &str) -> bool {
        self.flags.iter().any(|(k, _)| *k == f)
    }
    pub(super) fn vals(&self, f: &str) -> Vec<&'a str> {
        self.flags.iter().filter(|(k, _)| *k == f).filter_map(|(_, v)| *v).collect()
    }
    pub(super) fn val(&self, f: &str) -> Option<&'a str> {
        self.flags.iter().rev().find(|(k, _)| *k == f).and_then(|(_, v)| *v)
    }
    fn check(&self, allowed: &[&str]) -> Result<(), Failure> {
        for (k, _) in &self.flags {
            if !allowed.contains(k) {
                return Err(Failure::usage(format!("unknown option {k} (allowed: {})", allowed.join(" "))));
            }
        }
        Ok(())
    }
    pub(super) fn num(&self, f: &str) -> Result<Option<u64>, Failure> {
        self.val(f)
            .map(|v| parse_number(v).ok_or_else(|| Failure::usage(format!("{f} takes a number, not `{v}`"))))
            .transpose()
    }
    /// A number of seconds, at most [`MAX_SECS`] (a longer wait is a
    /// mistake, and the clock cannot add some longer ones).
    pub(super) fn secs(&self, f: &str) -> Result<Option<Duration>, Failure> {
        self.val(f)
            .map(|v| {
                let d = v
                    .parse::<f64>()
                    .ok()
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .ok_or_else(|| Failure::usage(format!("{f} takes seconds, not `{v}`")))?;
                if d > Duration::from_secs(MAX_SECS) {
                    return Err(Failure::usage(format!("{f} takes at most {MAX_SECS} seconds (a year), not `{v}`")));
                }
                Ok(d)
            })
            .transpose()
    }
    pub(super) fn pos(&self, i: usize, what: &str) -> Result<&'a str, Failure> {
        self.pos.get(i).copied().ok_or_else(|| Failure::usage(format!("missing {what}")))
    }
}

/// Runs one tool command. `args[0]` is the command name; its options are
/// checked against the ones the command table lists for it. `input` is
/// what its client read for it (`write --file FILE`).
pub fn run(ctx: &Ctx<'_>, args: &[String], input: Option<&[u8]>, out: &mut dyn Out) -> Result<(), Failure> {
    let name = args.first().map(String::as_str).unwrap_or("");
    let valued = commands::tool_valued_options();
    let a = Args::parse(args.get(1..).unwrap_or(&[]), &valued, input)?;
    match commands::find(name) {
        Some(c) => match c.action {
            Action::Tool(body) => {
                let allowed: Vec<&str> = c.options.iter().map(|o| o.name).collect();
                a.check(&allowed)?;
                body(ctx, &a, out)
            }
            _ => Err(Failure::usage(format!("unknown command `{name}` (see `ukvmi help`)"))),
        },
        None => Err(Failure::usage(format!("unknown command `{name}` (see `ukvmi help`)"))),
    }
}
