//! vCPU commands (odd ids), run as jobs on the vCPU's own thread after the
//! receiving thread validated the vCPU header. Each returns its reply data or
//! an error code; the caller sends the reply.

use crate::backend::{BackendError, Exception};
use crate::session::{lock, Message};
use crate::vcpu::{cpu_mode, Ctx, Local};
use std::sync::atomic::Ordering;
use ukvmi_wire::{
    event, get_registers_reply_size, msg, read_zext, tail, ControlEvents, IntoBytes, KvmErrno, KvmMsrEntry, KvmMsrsHdr,
    KvmRegs, KvmSregs, KvmXsave, VcpuControlCr, VcpuControlMsr, VcpuControlSinglestep, VcpuGetCpuid, VcpuGetCpuidReply,
    VcpuGetInfoReply, VcpuGetMtrrType, VcpuGetMtrrTypeReply, VcpuGetRegisters, VcpuGetRegistersReply, VcpuGetXcr,
    VcpuGetXcrReply, VcpuInjectException, VcpuTranslateGva, VcpuTranslateGvaReply, MAX_MSG_SIZE,
};

type Reply = Result<Vec<u8>, KvmErrno>;

const VCPU_HDR: usize = 8;

fn err(e: BackendError) -> KvmErrno {
    e.errno()
}

fn none() -> Reply {
    Ok(Vec::new())
}

/// Runs one vCPU command.
pub(crate) fn handle(cx: &mut Ctx<'_>, local: &mut Local, m: &Message) -> Reply {
    let id = m.hdr.id;
    let body = m.body.as_slice();
    let args = tail(body, VCPU_HDR);
    // Single-step has its own order of checks (spec §8.23).
    if id != msg::VCPU_CONTROL_SINGLESTEP && !cx.sess.caps.commands.contains(id) {
        return Err(KvmErrno::Eopnotsupp);
    }
    match id {
        msg::VCPU_GET_INFO => {
            let tsc_speed = cx.vcpu.tsc_khz().map_or(0, |k| u64::from(k) * 1000);
            Ok(VcpuGetInfoReply { tsc_speed }.as_bytes().to_vec())
        }
        msg::VCPU_CONTROL_EVENTS => control_events(cx, local, args),
        msg::VCPU_GET_REGISTERS => get_registers(cx, body),
        msg::VCPU_SET_REGISTERS => {
            if body.len() < VCPU_HDR + core::mem::size_of::<KvmRegs>() {
                return Err(KvmErrno::Einval);
            }
            if !local.waiting() {
                return Err(KvmErrno::Eopnotsupp);
            }
            local.delayed_regs = Some(read_zext(args));
            none()
        }
        msg::VCPU_GET_CPUID => {
            let r: VcpuGetCpuid = read_zext(args);
            let ops = cx.vcpu.support_cpuid().ok_or(KvmErrno::Eopnotsupp)?;
            let [eax, ebx, ecx, edx] = ops.cpuid(r.function, r.index).map_err(err)?.ok_or(KvmErrno::Enoent)?;
            Ok(VcpuGetCpuidReply { eax, ebx, ecx, edx }.as_bytes().to_vec())
        }
        msg::VCPU_CONTROL_CR => control_cr(cx, local, args),
        msg::VCPU_INJECT_EXCEPTION => inject_exception(cx, local, args),
        msg::VCPU_GET_XCR => {
            let r: VcpuGetXcr = read_zext(args);
            if r.padding.iter().any(|&b| b != 0) || r.xcr != 0 {
                return Err(KvmErrno::Einval);
            }
            let ops = cx.vcpu.support_xstate().ok_or(KvmErrno::Eopnotsupp)?;
            let value = ops.xcr0().map_err(err)?;
            Ok(VcpuGetXcrReply { value }.as_bytes().to_vec())
        }
        msg::VCPU_GET_XSAVE => {
            let ops = cx.vcpu.support_xstate().ok_or(KvmErrno::Eopnotsupp)?;
            Ok(ops.xsave().map_err(err)?.as_bytes().to_vec())
        }
        msg::VCPU_SET_XSAVE => {
            if body.len() < VCPU_HDR + core::mem::size_of::<KvmXsave>() {
                return Err(KvmErrno::Einval);
            }
            let area: Box<KvmXsave> = Box::new(read_zext(args));
            let ops = cx.vcpu.support_xstate().ok_or(KvmErrno::Eopnotsupp)?;
            ops.set_xsave(&area).map_err(|_| KvmErrno::Einval)?;
            none()
        }
        msg::VCPU_GET_MTRR_TYPE => {
            let r: VcpuGetMtrrType = read_zext(args);
            let ops = cx.vcpu.support_mtrr().ok_or(KvmErrno::Eopnotsupp)?;
            let type_ = ops.mtrr_type(r.gpa).map_err(err)?;
            Ok(VcpuGetMtrrTypeReply { type_, padding: [0; 7] }.as_bytes().to_vec())
        }
        msg::VCPU_CONTROL_MSR => control_msr(cx, local, args),
        msg::VCPU_CONTROL_SINGLESTEP => control_singlestep(cx, local, args),
        msg::VCPU_TRANSLATE_GVA => {
            let r: VcpuTranslateGva = read_zext(args);
            let ops = cx.vcpu.support_translate().ok_or(KvmErrno::Eopnotsupp)?;
            let gpa = ops.translate_gva(r.gva).map_err(err)?.unwrap_or(u64::MAX);
            Ok(VcpuTranslateGvaReply { gpa }.as_bytes().to_vec())
        }
        _ => Err(KvmErrno::Enosys),
    }
}

fn control_events(cx: &mut Ctx<'_>, local: &mut Local, args: &[u8]) -> Reply {
    let r: ControlEvents = read_zext(args);
    if r.padding1 != 0 || r.padding2 != 0 || r.enable > 1 {
        return Err(KvmErrno::Einval);
    }
    if !event::is_vcpu_event(r.event_id) {
        return Err(KvmErrno::Einval);
    }
    if !cx.sess.perms.event_allowed(r.event_id) {
        return Err(KvmErrno::Eperm);
    }
    let enable = r.enable == 1;
    if enable && !cx.sess.caps.events.contains(r.event_id) {
        return Err(KvmErrno::Eopnotsupp);
    }
    if let Some(ic) = cx.vcpu.support_intercepts() {
        if enable || local.intercepts.contains(r.event_id) {
            ic.set_event_intercept(r.event_id, enable).map_err(err)?;
        }
        local.intercepts =
            if enable { local.intercepts.with(r.event_id) } else { local.intercepts.without(r.event_id) };
    }
    local.enabled = if enable { local.enabled.with(r.event_id) } else { local.enabled.without(r.event_id) };
    none()
}

fn get_registers(cx: &mut Ctx<'_>, body: &[u8]) -> Reply {
    let snap = lock(&cx.vs.queue).snapshot.clone();
    if let Some(snap) = snap {
        // Waiting in an event: the registers it captured are current.
        let vcpu = &mut *cx.vcpu;
        let mut read_msrs = |indices: &[u32], values: &mut [u64]| vcpu.msrs(indices, values);
        if let Some(res) = get_registers_from(body, &snap.0, &snap.1, Some(&mut read_msrs)) {
            return res;
        }
    }
    let regs = cx.vcpu.regs().map_err(err)?;
    let sregs = cx.vcpu.sregs().map_err(err)?;
    let vcpu = &mut *cx.vcpu;
    let mut read_msrs = |indices: &[u32], values: &mut [u64]| vcpu.msrs(indices, values);
    get_registers_from(body, &regs, &sregs, Some(&mut read_msrs)).unwrap_or(Err(KvmErrno::Einval))
}

/// How GET_REGISTERS reads MSRs (on the vCPU thread).
type MsrReader<'a> = &'a mut dyn FnMut(&[u32], &mut [u64]) -> Result<(), BackendError>;

/// GET_REGISTERS (`body` with its vCPU header) answered from `regs` and
/// `sregs`; MSRs through `msrs`. `None` when MSRs are asked for and there is
/// no way to read them (then the vCPU thread must answer).
pub(crate) fn get_registers_from(
    body: &[u8],
    regs: &KvmRegs,
    sregs: &KvmSregs,
    msrs: Option<MsrReader<'_>>,
) -> Option<Reply> {
    let args = tail(body, VCPU_HDR);
    let r: VcpuGetRegisters = read_zext(args);
    if r.padding1 != 0 || r.padding2 != 0 {
        return Some(Err(KvmErrno::Einval));
    }
    let n = usize::from(r.nmsrs);
    let head = core::mem::size_of::<VcpuGetRegisters>();
    if body.len() < VCPU_HDR + head + 4 * n {
        return Some(Err(KvmErrno::Einval));
    }
    if 8 + get_registers_reply_size(n) > MAX_MSG_SIZE {
        return Some(Err(KvmErrno::Einval));
    }
    let indices: Vec<u32> =
        tail(args, head).chunks_exact(4).take(n).map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4]))).collect();
    let mut values = vec![0u64; n];
    if n > 0 {
        let read = msrs?;
        if read(&indices, &mut values).is_err() {
            return Some(Err(KvmErrno::Einval));
        }
    }
    let fixed = VcpuGetRegistersReply {
        mode: u32::from(cpu_mode(sregs)),
        padding: 0,
        regs: *regs,
        sregs: *sregs,
        msrs: KvmMsrsHdr { nmsrs: n as u32, pad: 0 },
    };
    let mut out = Vec::with_capacity(get_registers_reply_size(n));
    out.extend_from_slice(fixed.as_bytes());
    for (index, data) in indices.iter().zip(values) {
        out.extend_from_slice(KvmMsrEntry { index: *index, reserved: 0, data }.as_bytes());
    }
    Some(Ok(out))
}

fn control_cr(cx: &mut Ctx<'_>, local: &mut Local, args: &[u8]) -> Reply {
    let r: VcpuControlCr = read_zext(args);
    if r.padding1 != 0 || r.padding2 != 0 || r.enable > 1 {
        return Err(KvmErrno::Einval);
    }
    if !matches!(r.cr, 0 | 3 | 4) {
        return Err(KvmErrno::Einval);
    }
    if !cx.sess.caps.events.contains(event::CR) {
        return Err(KvmErrno::Eopnotsupp);
    }
    let ic = cx.vcpu.support_intercepts().ok_or(KvmErrno::Eopnotsupp)?;
    ic.set_cr_intercept(r.cr, r.enable == 1).map_err(err)?;
    if r.enable == 1 {
        local.crs |= 1 << r.cr;
    } else {
        local.crs &= !(1 << r.cr);
    }
    none()
}

/// The MSR ranges KVMI can watch (spec §8.21).
fn msr_in_range(msr: u32) -> bool {
    msr <= 0x1fff || (0xc000_0000..=0xc000_1fff).contains(&msr)
}

fn control_msr(cx: &mut Ctx<'_>, local: &mut Local, args: &[u8]) -> Reply {
    let r: VcpuControlMsr = read_zext(args);
    if r.padding1 != 0 || r.padding2 != 0 || r.enable > 1 {
        return Err(KvmErrno::Einval);
    }
    if !msr_in_range(r.msr) {
        return Err(KvmErrno::Einval);
    }
    if !cx.sess.caps.events.contains(event::MSR) {
        return Err(KvmErrno::Eopnotsupp);
    }
    let ic = cx.vcpu.support_intercepts().ok_or(KvmErrno::Eopnotsupp)?;
    ic.set_msr_intercept(r.msr, r.enable == 1).map_err(err)?;
    if r.enable == 1 {
        local.msrs.insert(r.msr);
    } else {
        local.msrs.remove(&r.msr);
    }
    none()
}

fn inject_exception(cx: &mut Ctx<'_>, local: &mut Local, args: &[u8]) -> Reply {
    if !cx.sess.perms.event_allowed(event::TRAP) {
        return Err(KvmErrno::Eperm);
    }
    let r: VcpuInjectException = read_zext(args);
    if r.padding1 != 0 || r.padding2 != 0 || !Exception::is_injectable(r.nr) {
        return Err(KvmErrno::Einval);
    }
    if local.pending_inject.is_some() || local.singlestep {
        return Err(KvmErrno::Ebusy);
    }
    if !cx.sess.caps.events.contains(event::TRAP) || cx.vcpu.support_inject().is_none() {
        return Err(KvmErrno::Eopnotsupp);
    }
    let error_code = if Exception::has_error_code(r.nr) { r.error_code } else { 0 };
    local.pending_inject = Some(Exception { nr: r.nr, error_code, address: r.address });
    // Make sure the vCPU comes back to perform it before its next entry.
    cx.vs.request.store(true, Ordering::SeqCst);
    none()
}

fn control_singlestep(cx: &mut Ctx<'_>, local: &mut Local, args: &[u8]) -> Reply {
    if !cx.sess.perms.event_allowed(event::SINGLESTEP) {
        return Err(KvmErrno::Eperm);
    }
    let r: VcpuControlSinglestep = read_zext(args);
    if r.padding.iter().any(|&b| b != 0) || r.enable > 1 {
        return Err(KvmErrno::Einval);
    }
    if !cx.sess.caps.singlestep || !cx.sess.caps.commands.contains(msg::VCPU_CONTROL_SINGLESTEP) {
        return Err(KvmErrno::Eopnotsupp);
    }
    let ops = cx.vcpu.support_singlestep().ok_or(KvmErrno::Eopnotsupp)?;
    ops.set_singlestep(r.enable == 1).map_err(err)?;
    local.singlestep = r.enable == 1;
    none()
}
