//! The receiving thread: one per connection. It reads each message, runs VM
//! commands itself (in order, answering each before reading the next), hands
//! vCPU messages to [`crate::vcpu_dispatch`], and on any hard error shuts the
//! connection down and releases every vCPU.

use crate::dialect::{Decoded, Dialect, V7Decoder};
use crate::session::{Disconnect, Message, Session, Wire};
use crate::vcpu_dispatch::Routed;
use crate::TRACE;
use crate::{vcpu_dispatch, vm_commands};
use std::io::{BufReader, ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ukvmi_event_trace::Point;
use ukvmi_wire::{msg, read_zext, KvmErrno, MsgHdr, MAX_MSG_SIZE, MSG_HDR_SIZE};

/// Body of the receiving thread.
///
/// Whatever happens, even a bug that panics, the connection is shut down and
/// every vCPU is released, so no vCPU stays blocked in an event.
pub(crate) fn run(sess: Arc<Session>, rd: UnixStream) {
    // Buffered: a tool that pipelines small requests (bulk READ_PHYSICAL)
    // has many in one read instead of two reads each.
    let mut rd = BufReader::with_capacity(RECV_BUFFER, rd);
    let mut answered = false;
    // Replies to a run of buffered READ_PHYSICALs, sent with one write.
    let mut batch: Vec<u8> = Vec::new();
    let mut v7 = (sess.dialect == Dialect::V7).then(V7Decoder::new);
    let looped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
        // Never sit on replies while the next read may block: unless a
        // whole message is already buffered, reading may wait for the tool.
        if !batch.is_empty() && !whole_message_buffered(rd.buffer()) {
            if let Err(why) = flush(&sess, &mut batch) {
                break why;
            }
        }
        // Spin only after answering a command here, or after handing a job
        // to a vCPU thread that waits in an event (it answers without the
        // guest); a vCPU thread that runs the guest needs the CPU more.
        if answered && rd.buffer().is_empty() {
            spin_until_readable(rd.get_ref(), SPIN);
        }
        let m = match read_message(&mut rd) {
            Ok(m) => m,
            Err(why) => break why,
        };
        let reply_seq = (m.hdr.id == msg::VCPU_EVENT).then_some(m.hdr.seq);
        if let Some(seq) = reply_seq {
            TRACE.mark(seq, Point::ReceiverRead, 0);
        }
        // A v7 message becomes the v12 one that serves it, or is answered here.
        let decoded = match v7.as_mut() {
            None => Decoded::Serve(m),
            Some(d) => d.decode(&sess, m),
        };
        let (m, res, after_quiet) = match decoded {
            Decoded::Serve(m) => (m, None, false),
            Decoded::Answer(m, res) => (m, Some(res), false),
            Decoded::AnswerAfterQuietJobs(m) => (m, Some(Ok(Vec::new())), true),
        };
        if let Some(res) = res {
            if let Err(why) = flush(&sess, &mut batch) {
                break why;
            }
            let res = res.as_deref().map_err(|e| *e);
            let sent = if after_quiet { sess.answer_after_quiet_jobs(&m, res) } else { sess.answer(&m, res) };
            if let Err(why) = sent {
                break why;
            }
            answered = true;
            continue;
        }
        if m.hdr.id == msg::VM_READ_PHYSICAL && !m.wire.quiet && sess.perms.command_allowed(m.hdr.id) {
            vm_commands::read_physical_batched(&sess, &m, &mut batch);
            answered = true;
            if batch.len() >= BATCH_MAX {
                if let Err(why) = flush(&sess, &mut batch) {
                    break why;
                }
            }
            continue;
        }
        // Anything else is answered after the replies before it.
        if let Err(why) = flush(&sess, &mut batch) {
            break why;
        }
        match route(&sess, m) {
            Ok(r) => answered = r != Routed::Queued,
            Err(why) => break why,
        }
        if let Some(seq) = reply_seq {
            TRACE.mark(seq, Point::JobQueued, 0);
        }
    }));
    let why = looped.unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Disconnect::Internal(format!("receiving thread panicked: {what}"))
    });
    sess.hard_error(why);
    // The tool's undoable writes go back before any vCPU it held is released.
    let (restored, left) = sess.undo_writes();
    if restored + left > 0 {
        sess.log(&format!(
            "put back {restored} byte(s) the introspector had written with undo{}",
            if left > 0 { format!("; {left} changed by the guest since were left as they are") } else { String::new() }
        ));
    }
    sess.receiver_finished();
    TRACE.flush();
}

/// How long the receiving thread polls for the next message without
/// sleeping once it has answered one: a tool's next command that comes
/// within it costs no wake-up (tens of µs on a nested host). Bounded, so an
/// idle connection never burns a core.
const SPIN: Duration = Duration::from_micros(50);

/// Polls `stream` without sleeping for at most `budget`; true once readable.
fn spin_until_readable(stream: &UnixStream, budget: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for a descriptor `stream` owns, count 1,
        // timeout 0 (never blocks).
        if unsafe { libc::poll(&mut pfd, 1, 0) } > 0 {
            return true;
        }
        if t0.elapsed() >= budget {
            return false;
        }
        // Let a thread woken on this CPU run (two cores are common here).
        std::thread::yield_now();
    }
}

/// Whether `buf` starts with a complete message (header and body), so that
/// reading it cannot block.
fn whole_message_buffered(buf: &[u8]) -> bool {
    let Some(h) = buf.get(..MSG_HDR_SIZE) else { return false };
    let hdr: MsgHdr = read_zext(h);
    buf.len() >= MSG_HDR_SIZE + usize::from(hdr.size)
}

/// Sends the batched replies, if any, in one write.
fn flush(sess: &Session, batch: &mut Vec<u8>) -> Result<(), Disconnect> {
    if batch.is_empty() {
        return Ok(());
    }
    let sent = sess.send(batch);
    batch.clear();
    sent
}

/// Most reply bytes batched before they are sent.
const BATCH_MAX: usize = 64 * 1024;

/// Bytes the receiving thread reads ahead.
const RECV_BUFFER: usize = 16 * 1024;

/// Reads until `buf` is full or the peer closes; returns the bytes read.
fn read_full(rd: &mut impl Read, buf: &mut [u8]) -> Result<usize, Disconnect> {
    let mut got = 0;
    while got < buf.len() {
        let Some(rest) = buf.get_mut(got..) else { break };
        match rd.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Disconnect::ReadFailed(e.to_string())),
        }
    }
    Ok(got)
}

/// Reads one message. EOF before a header is a clean close; anything short
/// after that, or a size over 8184, is a hard error.
pub(crate) fn read_message(rd: &mut impl Read) -> Result<Message, Disconnect> {
    let mut hb = [0u8; MSG_HDR_SIZE];
    match read_full(rd, &mut hb)? {
        0 => return Err(Disconnect::PeerClosed),
        MSG_HDR_SIZE => {}
        got => return Err(Disconnect::Truncated { id: 0, expected: MSG_HDR_SIZE, got }),
    }
    let hdr: MsgHdr = read_zext(&hb);
    let size = usize::from(hdr.size);
    if size > MAX_MSG_SIZE {
        return Err(Disconnect::Oversize { id: hdr.id, size: hdr.size });
    }
    let mut body = vec![0u8; size];
    let got = read_full(rd, &mut body)?;
    if got != size {
        return Err(Disconnect::Truncated { id: hdr.id, expected: size, got });
    }
    Ok(Message { hdr, body, wire: Wire::plain(hdr.id) })
}

/// Spec §7.1: VM commands (v12 and the ukvmi extensions) here, vCPU
/// messages to their queue, the rest ENOSYS.
fn route(sess: &Session, m: Message) -> Result<Routed, Disconnect> {
    let id = m.hdr.id;
    if msg::is_vcpu_message(id) {
        if id == msg::VCPU_EVENT || msg::is_known_command(id) {
            return vcpu_dispatch::validate_and_queue(sess, m);
        }
    } else if msg::is_command(id) {
        if !sess.perms.command_allowed(id) {
            return sess.answer(&m, Err(KvmErrno::Eperm)).map(|()| Routed::Answered);
        }
        return vm_commands::handle(sess, &m).map(|()| Routed::Answered);
    }
    sess.answer(&m, Err(KvmErrno::Enosys)).map(|()| Routed::Answered)
}
