//! One vCPU: its thread's run loop and the `VcpuBackend` the endpoint uses
//! on that thread. All KVM vCPU ioctls happen here, on the owning thread.

use crate::convert::{regs_from_wire, regs_to_wire, sregs_to_wire};
use crate::error::{Error, Result};
use crate::kick;
use crate::vm::{Exit, VmShared};
use kvm_bindings::{kvm_msr_entry, kvm_segment, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use ukvmi_endpoint::{
    BackendError, BackendResult, CpuidOps, EventPayload, Flow, InterceptOps, MtrrOps, TranslateOps,
    VcpuBackend, VcpuPort, XstateOps,
};
use ukvmi_wire::Action;
use ukvmi_guests::layout;
use ukvmi_wire::{KvmRegs, KvmSregs, KvmXsave};

const MSR_MTRR_CAP: u32 = 0xfe;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_MTRR_PHYS_BASE0: u32 = 0x200;
const MTRR_FIX_64K: u32 = 0x250;
const MTRR_FIX_16K: [u32; 2] = [0x258, 0x259];
const MTRR_FIX_4K: [u32; 8] = [0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f];

/// What a vCPU exit asks the loop to do, copied out of `kvm_run`.
enum Step {
    Kicked,
    Out(u16, u32),
    In,
    Hlt,
    /// A guest write to a filtered MSR, not yet applied.
    Wrmsr(u32, u64),
    Fatal(String),
}

/// The vCPU thread's own state.
pub(crate) struct KvmVcpu {
    pub fd: VcpuFd,
    pub index: u16,
    pub shared: Arc<VmShared>,
    pub cpuid: CpuId,
}

fn io_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> BackendError {
    move |e| BackendError::Failed(format!("{what}: {e}"))
}

impl KvmVcpu {
    /// The thread body: run until the VM stops; returns how this vCPU ended it.
    pub fn run(mut self, port: VcpuPort) -> Option<Exit> {
        let shared = Arc::clone(&self.shared);
        shared.register_thread(self.index, true);
        kick::register(self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run);
        let end = self.run_loop(&port);
        kick::register(std::ptr::null_mut());
        shared.register_thread(self.index, false);
        end
    }

    fn run_loop(&mut self, port: &VcpuPort) -> Option<Exit> {
        let shared = Arc::clone(&self.shared);
        let me = shared.vcpu(self.index)?;
        let mut booted = false;
        loop {
            if self.shared.stopping() {
                return None;
            }
            if !me.started.load(Ordering::SeqCst) {
                self.shared.idle(self.index, Duration::from_millis(50));
                continue;
            }
            if !booted {
                if let Err(e) = self.enter_long_mode() {
                    return Some(Exit::Failed(format!("vCPU {}: {e}", self.index)));
                }
                booted = true;
            }
            if port.has_requests() && port.handle_requests(self) == Flow::Crash {
                return Some(Exit::Crashed(format!("the introspector answered CRASH on vCPU {}", self.index)));
            }
            me.in_guest.store(true, Ordering::SeqCst);
            let step = self.enter();
            me.in_guest.store(false, Ordering::SeqCst);
            me.exits.fetch_add(1, Ordering::SeqCst);
            match step {
                Step::Kicked => self.fd.set_kvm_immediate_exit(0),
                Step::Out(p, v) => {
                    if let Some(end) = self.io_out(p, v) {
                        return Some(end);
                    }
                }
                Step::In => {}
                Step::Hlt => {
                    if !port.has_requests() {
                        self.shared.idle(self.index, Duration::from_millis(1));
                    }
                }
                Step::Wrmsr(msr, data) => {
                    if let Some(end) = self.wrmsr(port, msr, data) {
                        return Some(end);
                    }
                }
                Step::Fatal(why) => return Some(Exit::Failed(format!("vCPU {}: {why}", self.index))),
            }
        }
    }

    /// One `KVM_RUN`, with the exit copied out.
    fn enter(&mut self) -> Step {
        let step = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut v = [0u8; 4];
                for (d, s) in v.iter_mut().zip(data.iter()) {
                    *d = *s;
                }
                Step::Out(port, u32::from_le_bytes(v))
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                // Serial LSR says "transmitter empty"; everything else reads as all ones.
                let v = if port == layout::PORT_SERIAL + 5 { 0x60 } else { 0xff };
                data.fill(v);
                Step::In
            }
            Ok(VcpuExit::Hlt) => Step::Hlt,
            Ok(VcpuExit::X86Wrmsr(w)) => {
                *w.error = 0;
                Step::Wrmsr(w.index, w.data)
            }
            Ok(VcpuExit::Shutdown) => Step::Fatal("the guest triple-faulted (KVM_EXIT_SHUTDOWN)".into()),
            Ok(VcpuExit::InternalError) => Step::Fatal("KVM_EXIT_INTERNAL_ERROR".into()),
            Ok(other) => Step::Fatal(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Kicked,
            Err(e) => Step::Fatal(format!("KVM_RUN failed: {e}")),
        };
        if let Step::Fatal(why) = step {
            let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
            let mut bytes = [0u8; 8];
            let _ = self.shared.ram.read(rip, &mut bytes);
            return Step::Fatal(format!("{why} at rip {rip:#x} (code bytes {bytes:02x?})"));
        }
        step
    }

    /// A guest MSR write stopped by the filter: report it if this vCPU's tool
    /// watches it, then write the value the tool chose (or the guest's). A
    /// value KVM refuses raises #GP in the guest, as the write itself would.
    fn wrmsr(&mut self, port: &VcpuPort, msr: u32, data: u64) -> Option<Exit> {
        let old = self.read_msrs(&[msr]).ok().and_then(|v| v.first().copied()).unwrap_or(0);
        let value = match port.raise(self, EventPayload::Msr { msr, old_value: old, new_value: data }) {
            None => data,
            Some(o) if o.action == Action::Crash => {
                return Some(Exit::Crashed(format!("the introspector answered CRASH to an MSR {msr:#x} write on vCPU {}", self.index)));
            }
            Some(o) => o.new_val.unwrap_or(data),
        };
        let ok = Msrs::from_entries(&[kvm_msr_entry { index: msr, data: value, ..Default::default() }])
            .ok()
            .and_then(|m| self.fd.set_msrs(&m).ok())
            == Some(1);
        if !ok {
            // The last exit was KVM_EXIT_X86_WRMSR, so `msr` is the active
            // member of the exit union until the next KVM_RUN.
            self.fd.get_kvm_run().__bindgen_anon_1.msr.error = 1;
        }
        None
    }

    fn io_out(&mut self, port: u16, value: u32) -> Option<Exit> {
        match port {
            layout::PORT_SERIAL => self.shared.serial_byte(value as u8),
            layout::PORT_POWEROFF => return Some(Exit::PowerOff(value as u8)),
            layout::PORT_START_VCPU => {
                if let Ok(i) = u16::try_from(value) {
                    self.shared.start_vcpu(i);
                }
            }
            _ => {}
        }
        None
    }

    /// Enters the guest ABI's starting state: 64-bit ring 0, identity paging.
    fn enter_long_mode(&mut self) -> Result<()> {
        let mut s = self.fd.get_sregs().map_err(|e| Error::kvm("KVM_GET_SREGS", e))?;
        let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db,
            s: 1,
            l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        s.cs = seg(0x08, 11, 1, 0);
        let d = seg(0x10, 3, 0, 1);
        (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
        s.gdt.base = layout::GDT_ADDR;
        s.gdt.limit = 39;
        s.idt.base = 0;
        s.idt.limit = 0;
        s.cr0 = 0x8005_0033;
        s.cr3 = layout::PML4_ADDR;
        s.cr4 = 0x20;
        s.efer = 0x500;
        self.fd.set_sregs(&s).map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
        let regs = kvm_bindings::kvm_regs {
            rip: self.shared.entry,
            rdi: u64::from(self.index),
            rsi: u64::from(self.shared.vcpu_count()),
            rsp: layout::STACK_TOP - u64::from(self.index) * layout::STACK_SIZE,
            rflags: 2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(|e| Error::kvm("KVM_SET_REGS", e))?;
        // As firmware would: MTRRs enabled, default write-back.
        let msrs = Msrs::from_entries(&[kvm_msr_entry { index: MSR_MTRR_DEF_TYPE, data: 0xc06, ..Default::default() }])
            .map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
        self.fd.set_msrs(&msrs).map_err(|e| Error::kvm("KVM_SET_MSRS", e))?;
        Ok(())
    }

    fn read_msrs(&self, indices: &[u32]) -> BackendResult<Vec<u64>> {
        if indices.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<kvm_msr_entry> =
            indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| BackendError::Failed(format!("{e:?}")))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(io_err("KVM_GET_MSRS"))?;
        if n != indices.len() {
            let bad = indices.get(n).copied().unwrap_or(0);
            return Err(BackendError::Invalid(format!("MSR {bad:#x} cannot be read")));
        }
        Ok(msrs.as_slice().iter().map(|e| e.data).collect())
    }
}

impl VcpuBackend for KvmVcpu {
    fn regs(&mut self) -> BackendResult<KvmRegs> {
        self.fd.get_regs().map(|r| regs_to_wire(&r)).map_err(io_err("KVM_GET_REGS"))
    }
    fn set_regs(&mut self, regs: &KvmRegs) -> BackendResult<()> {
        self.fd.set_regs(&regs_from_wire(regs)).map_err(io_err("KVM_SET_REGS"))
    }
    fn sregs(&mut self) -> BackendResult<KvmSregs> {
        self.fd.get_sregs().map(|s| sregs_to_wire(&s)).map_err(io_err("KVM_GET_SREGS"))
    }
    fn msrs(&mut self, indices: &[u32], out: &mut [u64]) -> BackendResult<()> {
        for (o, v) in out.iter_mut().zip(self.read_msrs(indices)?) {
            *o = v;
        }
        Ok(())
    }
    fn tsc_khz(&mut self) -> Option<u32> {
        self.fd.get_tsc_khz().ok()
    }
    fn support_cpuid(&mut self) -> Option<&mut dyn CpuidOps> {
        Some(self)
    }
    fn support_xstate(&mut self) -> Option<&mut dyn XstateOps> {
        Some(self)
    }
    fn support_mtrr(&mut self) -> Option<&mut dyn MtrrOps> {
        Some(self)
    }
    fn support_translate(&mut self) -> Option<&mut dyn TranslateOps> {
        Some(self)
    }
    fn support_intercepts(&mut self) -> Option<&mut dyn InterceptOps> {
        Some(self)
    }
}

impl InterceptOps for KvmVcpu {
    fn set_event_intercept(&mut self, _event: u16, _enable: bool) -> BackendResult<()> {
        // Events this host offers need no per-event switch: the MSR filter is
        // driven by CONTROL_MSR, PAUSE needs nothing.
        Ok(())
    }
    fn set_cr_intercept(&mut self, _cr: u8, _enable: bool) -> BackendResult<()> {
        Err(BackendError::NotSupported)
    }
    fn set_msr_intercept(&mut self, msr: u32, enable: bool) -> BackendResult<()> {
        let filter = self.shared.msr_filter.as_ref().ok_or(BackendError::NotSupported)?;
        filter.watch(&self.shared.vm, self.index, msr, enable)
    }
}

impl CpuidOps for KvmVcpu {
    fn cpuid(&mut self, function: u32, index: u32) -> BackendResult<Option<[u32; 4]>> {
        Ok(self
            .cpuid
            .as_slice()
            .iter()
            .find(|e| {
                e.function == function && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
            })
            .map(|e| [e.eax, e.ebx, e.ecx, e.edx]))
    }
}

impl XstateOps for KvmVcpu {
    fn xcr0(&mut self) -> BackendResult<u64> {
        let x = self.fd.get_xcrs().map_err(io_err("KVM_GET_XCRS"))?;
        let n = (x.nr_xcrs as usize).min(x.xcrs.len());
        Ok(x.xcrs.iter().take(n).find(|e| e.xcr == 0).map_or(1, |e| e.value))
    }
    fn xsave(&mut self) -> BackendResult<Box<KvmXsave>> {
        let x = self.fd.get_xsave().map_err(io_err("KVM_GET_XSAVE"))?;
        Ok(Box::new(KvmXsave { region: x.region }))
    }
    fn set_xsave(&mut self, area: &KvmXsave) -> BackendResult<()> {
        let x = kvm_bindings::kvm_xsave { region: area.region, ..Default::default() };
        // SAFETY: `x` is a whole legacy kvm_xsave; KVM reads exactly its 4096
        // bytes (no XSAVE2 tail is passed, so none is read).
        unsafe { self.fd.set_xsave(&x) }.map_err(|e| BackendError::Invalid(format!("KVM_SET_XSAVE: {e}")))
    }
}

impl MtrrOps for KvmVcpu {
    fn mtrr_type(&mut self, gpa: u64) -> BackendResult<u8> {
        let [cap, def] = <[u64; 2]>::try_from(self.read_msrs(&[MSR_MTRR_CAP, MSR_MTRR_DEF_TYPE])?)
            .map_err(|_| BackendError::Failed("MTRR MSRs".into()))?;
        if def & (1 << 11) == 0 {
            return Ok(0); // MTRRs disabled: everything uncacheable.
        }
        // Fixed ranges cover the first MiB.
        if def & (1 << 10) != 0 && cap & (1 << 8) != 0 && gpa < 0x10_0000 {
            let (msr, byte) = if gpa < 0x8_0000 {
                (MTRR_FIX_64K, gpa >> 16)
            } else if gpa < 0xc_0000 {
                let k = (gpa - 0x8_0000) >> 14;
                (MTRR_FIX_16K.get((k / 8) as usize).copied().unwrap_or(MTRR_FIX_16K[0]), k % 8)
            } else {
                let k = (gpa - 0xc_0000) >> 12;
                (MTRR_FIX_4K.get((k / 8) as usize).copied().unwrap_or(MTRR_FIX_4K[0]), k % 8)
            };
            let v = self.read_msrs(&[msr])?.first().copied().unwrap_or(0);
            return Ok((v >> (byte * 8)) as u8);
        }
        // Variable ranges: UC wins, then WT over WB (SDM 11.11.4.1).
        let count = (cap & 0xff) as u32;
        let idx: Vec<u32> = (0..count.min(16)).flat_map(|i| [MSR_MTRR_PHYS_BASE0 + 2 * i, MSR_MTRR_PHYS_BASE0 + 2 * i + 1]).collect();
        let vals = self.read_msrs(&idx)?;
        let mut found: Option<u8> = None;
        for pair in vals.chunks_exact(2) {
            let (base, mask) = (pair.first().copied().unwrap_or(0), pair.get(1).copied().unwrap_or(0));
            if mask & (1 << 11) == 0 {
                continue;
            }
            let m = mask & !0xfff;
            if gpa & m == base & m & !0xfff {
                let t = base as u8;
                found = Some(match (found, t) {
                    (_, 0) | (Some(0), _) => 0,
                    (Some(4), 6) | (Some(6), 4) => 4,
                    (_, t) => t,
                });
            }
        }
        Ok(found.unwrap_or(def as u8))
    }
}

impl TranslateOps for KvmVcpu {
    fn translate_gva(&mut self, gva: u64) -> BackendResult<Option<u64>> {
        let t = self.fd.translate_gva(gva).map_err(io_err("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }
}
