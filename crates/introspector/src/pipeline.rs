//! Pipelining: one VM command sent many times with a window of requests in
//! flight, replies taken in request order (bulk guest-memory reads).

use std::collections::VecDeque;

use ukvmi_wire::frame;

use crate::error::{Error, Result};
use crate::vm::{command_name, reply_data, Vm};

/// Requests [`Vm::pipeline`] keeps in flight: enough to keep the socket
/// busy, few enough that the replies (4 KiB pages for bulk reads) fit in the
/// socket buffers.
const PIPELINE_WINDOW: usize = 32;

impl Vm {
    /// Sends command `id` once per body that `bodies` yields, keeping up to
    /// [`PIPELINE_WINDOW`] requests in flight (written in batches, one write
    /// each), and hands each reply's data, after a successful
    /// `kvmi_error_code`, to `take` together with the body's tag, in request
    /// order. Meant for VM commands, which the receiving thread answers in
    /// order. The first error stops sending; replies already owed are still
    /// collected (unless the connection failed or timed out) so none is
    /// left to arrive unmatched, then that error is returned.
    pub(crate) fn pipeline<T>(
        &self,
        id: u16,
        bodies: impl Iterator<Item = (Vec<u8>, T)>,
        mut take: impl FnMut(T, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let name = command_name(id);
        let mut bodies = bodies;
        let mut inflight: VecDeque<(u32, T)> = VecDeque::with_capacity(PIPELINE_WINDOW);
        let mut failed: Option<Error> = None;
        let mut batch = Vec::new();
        loop {
            if failed.is_none() && inflight.len() <= PIPELINE_WINDOW / 2 {
                batch.clear();
                let sent_from = inflight.len();
                while inflight.len() < PIPELINE_WINDOW {
                    let Some((body, tag)) = bodies.next() else { break };
                    let seq = self.mux.next_seq();
                    match frame(id, seq, &[&body]).map_err(|e| Error::Refused(format!("{name}: {e}"))) {
                        Ok(bytes) => batch.extend_from_slice(&bytes),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                    match self.mux.register(seq, id) {
                        Ok(()) => inflight.push_back((seq, tag)),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if failed.is_some() {
                    // What was framed but not written will never be answered.
                    batch.clear();
                    while inflight.len() > sent_from {
                        if let Some((seq, _)) = inflight.pop_back() {
                            self.mux.unregister(seq);
                        }
                    }
                }
                if !batch.is_empty() {
                    if let Err(e) = self.mux.write(&batch) {
                        failed = Some(e);
                        while inflight.len() > sent_from {
                            if let Some((seq, _)) = inflight.pop_back() {
                                self.mux.unregister(seq);
                            }
                        }
                    }
                }
            }
            let Some((seq, tag)) = inflight.pop_front() else { break };
            if matches!(failed, Some(Error::Closed | Error::Timeout { .. })) {
                self.mux.unregister(seq);
                continue;
            }
            let res = self.mux.wait_reply(seq, name).and_then(|m| take(tag, reply_data(name, &m)?));
            if let Err(e) = res {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }
}
