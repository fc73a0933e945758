//! Typed KVMI commands (spec §8), one method per command.

use ukvmi_wire::{
    get_registers_reply_size, msg, read_zext, tail, ControlEvents, FromBytes, GetVersionReply, IntoBytes, KvmMsrEntry,
    KvmRegs, KvmSregs, KvmXsave, PageAccessEntry, VcpuControlCr, VcpuControlMsr, VcpuControlSinglestep, VcpuGetCpuid,
    VcpuGetCpuidReply, VcpuGetInfoReply, VcpuGetMtrrType, VcpuGetMtrrTypeReply, VcpuGetRegisters,
    VcpuGetRegistersReply, VcpuGetXcr, VcpuGetXcrReply, VcpuHdr, VcpuInjectException, VcpuTranslateGva,
    VcpuTranslateGvaReply, VmCheck, VmControlCleanup, VmGetInfoReply, VmPauseVcpu, VmPhysical, VmSetPageAccess,
};
use ukvmi_wire::{Access, CommandId, EventId, Gpa, Gva, VcpuId};

use crate::error::{Error, ProtocolError, Result};
use crate::vm::{command_name, expect_len, Vm};

/// `KVMI_GET_VERSION` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionInfo {
    /// API version (1).
    pub version: u32,
    /// Largest message body the hypervisor accepts (8184).
    pub max_msg_size: u32,
    /// Whether `KVMI_VCPU_CONTROL_SINGLESTEP` is supported.
    pub singlestep: bool,
}

/// `KVMI_VCPU_GET_REGISTERS` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registers {
    /// Operand size in bytes: 2, 4 or 8.
    pub mode: u32,
    /// General registers.
    pub regs: KvmRegs,
    /// Special registers.
    pub sregs: KvmSregs,
    /// The MSRs asked for, in request order.
    pub msrs: Vec<KvmMsrEntry>,
}

/// The page size `KVMI_VM_READ_PHYSICAL` and `KVMI_VM_WRITE_PHYSICAL` stay within.
const PAGE_SIZE: u64 = 4096;

fn bool_u8(b: bool) -> u8 {
    u8::from(b)
}

fn u16_len(id: u16, what: &str, n: usize) -> Result<u16> {
    u16::try_from(n).map_err(|_| Error::Refused(format!("{}: {n} {what} do not fit in a u16", command_name(id))))
}

impl Vm {
    /// Sends a vCPU command: vCPU header, then `parts`.
    fn vcpu_command(&self, id: u16, vcpu: VcpuId, parts: &[&[u8]], len: usize) -> Result<Vec<u8>> {
        let hdr = VcpuHdr { vcpu: vcpu.raw(), ..Default::default() };
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all.push(hdr.as_bytes());
        all.extend_from_slice(parts);
        self.command_exact(id, &all, len)
    }

    // ------------------------------------------------------------ VM commands

    /// `KVMI_GET_VERSION`. Accepts the 16-byte v12 reply and the 8-byte reply
    /// of earlier revisions (then `singlestep` is false).
    pub fn get_version(&self) -> Result<VersionInfo> {
        let data = self.command(msg::GET_VERSION, &[])?;
        if data.len() != 8 && data.len() != 16 {
            expect_len(msg::GET_VERSION, &data, 16)?;
        }
        let r: GetVersionReply = read_zext(&data);
        Ok(VersionInfo { version: r.version, max_msg_size: r.max_msg_size, singlestep: r.features.singlestep != 0 })
    }

    /// `KVMI_VM_CHECK_COMMAND`: `Ok` if command `id` is known and allowed.
    pub fn check_command(&self, id: impl Into<CommandId>) -> Result<()> {
        let req = VmCheck { id: id.into().raw(), ..Default::default() };
        self.command_exact(msg::VM_CHECK_COMMAND, &[req.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VM_CHECK_EVENT`: `Ok` if event `id` is known and allowed.
    pub fn check_event(&self, id: impl Into<EventId>) -> Result<()> {
        let req = VmCheck { id: id.into().raw(), ..Default::default() };
        self.command_exact(msg::VM_CHECK_EVENT, &[req.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VM_GET_INFO`: the number of online vCPUs.
    pub fn vcpu_count(&self) -> Result<u32> {
        let data = self.command_exact(msg::VM_GET_INFO, &[], 16)?;
        Ok(read_zext::<VmGetInfoReply>(&data).vcpu_count)
    }

    /// `KVMI_VM_CONTROL_EVENTS`: enables or disables a VM event (only UNHOOK exists).
    pub fn control_vm_events(&self, event_id: impl Into<EventId>, enable: bool) -> Result<()> {
        let req = ControlEvents { event_id: event_id.into().raw(), enable: bool_u8(enable), ..Default::default() };
        self.command_exact(msg::VM_CONTROL_EVENTS, &[req.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VM_READ_PHYSICAL`: reads `size` bytes at `gpa` (within one page).
    pub fn read_physical(&self, gpa: impl Into<Gpa>, size: u16) -> Result<Vec<u8>> {
        let req = VmPhysical { gpa: gpa.into().raw(), size, ..Default::default() };
        self.command_exact(msg::VM_READ_PHYSICAL, &[req.as_bytes()], usize::from(size))
    }

    /// `KVMI_VM_READ_PHYSICAL` into `buf` (whose length is the size asked for).
    pub fn read_physical_into(&self, gpa: impl Into<Gpa>, buf: &mut [u8]) -> Result<()> {
        let size = u16_len(msg::VM_READ_PHYSICAL, "bytes", buf.len())?;
        let data = self.read_physical(gpa, size)?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Reads `buf.len()` bytes of guest physical memory at `gpa`, any size
    /// and alignment: one `KVMI_VM_READ_PHYSICAL` per page-bounded piece,
    /// pipelined (a window of requests is in flight at once; the receiving
    /// thread answers VM commands in order), so bulk reads stream instead of
    /// paying one round trip per page. On the first failed piece the
    /// requests still in flight are drained and that error is returned; the
    /// content of `buf` is then unspecified.
    pub fn read_physical_range(&self, gpa: impl Into<Gpa>, buf: &mut [u8]) -> Result<()> {
        let id = msg::VM_READ_PHYSICAL;
        let gpa = gpa.into().raw();
        if gpa.checked_add(buf.len() as u64).is_none() {
            return Err(Error::Refused(format!("{}: the range at {gpa:#x} wraps around", command_name(id))));
        }
        // Piece i covers buf[start..start + len] at gpa + start, never
        // crossing a page boundary.
        let mut start = 0usize;
        let total = buf.len();
        let pieces = std::iter::from_fn(move || {
            if start >= total {
                return None;
            }
            let at = gpa + start as u64;
            let in_page = (PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize;
            let len = in_page.min(total - start);
            let req = VmPhysical { gpa: at, size: len as u16, ..Default::default() };
            let piece = (start, len);
            start += len;
            Some((req.as_bytes().to_vec(), piece))
        });
        self.pipeline(id, pieces, |(at, len), data| {
            expect_len(id, data, len)?;
            let dst = buf.get_mut(at..at + len).ok_or(ProtocolError::ReplyLength {
                command: command_name(id),
                got: len,
                expected: 0,
            })?;
            dst.copy_from_slice(data);
            Ok(())
        })
    }

    /// `KVMI_VM_WRITE_PHYSICAL`: writes `data` at `gpa` (within one page).
    pub fn write_physical(&self, gpa: impl Into<Gpa>, data: &[u8]) -> Result<()> {
        let size = u16_len(msg::VM_WRITE_PHYSICAL, "bytes", data.len())?;
        let req = VmPhysical { gpa: gpa.into().raw(), size, ..Default::default() };
        self.command_exact(msg::VM_WRITE_PHYSICAL, &[req.as_bytes(), data], 0).map(drop)
    }

    /// `UKVMI_VM_WRITE_PHYSICAL_UNDO` (ukvmi extension): writes `data` at
    /// `gpa` like [`Vm::write_physical`], and the VMM keeps the bytes it
    /// overwrote. When this connection ends for any reason (the tool
    /// closes, dies, or is cut off), the VMM puts back every byte that
    /// still holds what the tool wrote, before a vCPU this connection held
    /// runs on. Meant for breakpoints. Writing a byte back to its original
    /// value forgets it; `-KVM_ENOMEM` past 64 KiB of recorded bytes.
    /// A VMM without the extension answers `-KVM_ENOSYS` (check with
    /// `check_command`).
    pub fn write_physical_undo(&self, gpa: impl Into<Gpa>, data: &[u8]) -> Result<()> {
        let id = msg::UKVMI_VM_WRITE_PHYSICAL_UNDO;
        let size = u16_len(id, "bytes", data.len())?;
        let req = VmPhysical { gpa: gpa.into().raw(), size, ..Default::default() };
        self.command_exact(id, &[req.as_bytes(), data], 0).map(drop)
    }

    /// `KVMI_VM_PAUSE_VCPU`: asks `vcpu` for one PAUSE event; with `wait` the
    /// reply comes once the vCPU has left guest mode.
    pub fn pause_vcpu(&self, vcpu: impl Into<VcpuId>, wait: bool) -> Result<()> {
        let req = VmPauseVcpu { vcpu: vcpu.into().raw(), wait: bool_u8(wait), ..Default::default() };
        self.command_exact(msg::VM_PAUSE_VCPU, &[req.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VM_CONTROL_CLEANUP`: whether interceptions are undone on unhook.
    pub fn control_cleanup(&self, enable: bool) -> Result<()> {
        let req = VmControlCleanup { enable: bool_u8(enable), ..Default::default() };
        self.command_exact(msg::VM_CONTROL_CLEANUP, &[req.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VM_SET_PAGE_ACCESS`: `(gpa, allowed access)` per page, in one
    /// message (at most 511 entries fit). Takes [`Gpa`] and [`Access`] or
    /// their raw integers (`u64`, `u8`).
    pub fn set_page_access<G, A>(&self, entries: &[(G, A)]) -> Result<()>
    where
        G: Copy + Into<Gpa>,
        A: Copy + Into<Access>,
    {
        let count = u16_len(msg::VM_SET_PAGE_ACCESS, "entries", entries.len())?;
        let head = VmSetPageAccess { count, ..Default::default() };
        let mut body = Vec::with_capacity(8 + 16 * entries.len());
        body.extend_from_slice(head.as_bytes());
        for &(gpa, access) in entries {
            let entry = PageAccessEntry { gpa: gpa.into().raw(), access: access.into().bits(), ..Default::default() };
            body.extend_from_slice(entry.as_bytes());
        }
        self.command_exact(msg::VM_SET_PAGE_ACCESS, &[&body], 0).map(drop)
    }

    // ---------------------------------------------------------- vCPU commands

    /// `KVMI_VCPU_GET_INFO`: the vCPU's TSC frequency in Hz (0 when unknown).
    pub fn tsc_frequency(&self, vcpu: impl Into<VcpuId>) -> Result<u64> {
        let data = self.vcpu_command(msg::VCPU_GET_INFO, vcpu.into(), &[], 8)?;
        Ok(read_zext::<VcpuGetInfoReply>(&data).tsc_speed)
    }

    /// `KVMI_VCPU_CONTROL_EVENTS`: enables or disables a vCPU event.
    pub fn control_events(&self, vcpu: impl Into<VcpuId>, event_id: impl Into<EventId>, enable: bool) -> Result<()> {
        let req = ControlEvents { event_id: event_id.into().raw(), enable: bool_u8(enable), ..Default::default() };
        self.vcpu_command(msg::VCPU_CONTROL_EVENTS, vcpu.into(), &[req.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VCPU_GET_REGISTERS`: registers plus the MSRs listed in `msrs`.
    pub fn get_registers(&self, vcpu: impl Into<VcpuId>, msrs: &[u32]) -> Result<Registers> {
        let id = msg::VCPU_GET_REGISTERS;
        let vcpu = vcpu.into();
        let nmsrs = u16_len(id, "MSRs", msrs.len())?;
        let head = VcpuGetRegisters { nmsrs, ..Default::default() };
        let data =
            self.vcpu_command(id, vcpu, &[head.as_bytes(), msrs.as_bytes()], get_registers_reply_size(msrs.len()))?;
        let fixed: VcpuGetRegistersReply = read_zext(&data);
        if usize::try_from(fixed.msrs.nmsrs).ok() != Some(msrs.len()) {
            let (got, asked) = (u64::from(fixed.msrs.nmsrs), msrs.len());
            return Err(ProtocolError::MsrCount { command: command_name(id), got, asked }.into());
        }
        let entries = tail(&data, size_of::<VcpuGetRegistersReply>())
            .chunks_exact(size_of::<KvmMsrEntry>())
            .map(read_zext::<KvmMsrEntry>)
            .collect();
        Ok(Registers { mode: fixed.mode, regs: fixed.regs, sregs: fixed.sregs, msrs: entries })
    }

    /// `KVMI_VCPU_SET_REGISTERS`: applied when the pending event gets its reply.
    pub fn set_registers(&self, vcpu: impl Into<VcpuId>, regs: &KvmRegs) -> Result<()> {
        self.vcpu_command(msg::VCPU_SET_REGISTERS, vcpu.into(), &[regs.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VCPU_GET_CPUID`: CPUID leaf `function`, sub-leaf `index`, as the guest sees it.
    pub fn get_cpuid(&self, vcpu: impl Into<VcpuId>, function: u32, index: u32) -> Result<VcpuGetCpuidReply> {
        let req = VcpuGetCpuid { function, index };
        let data = self.vcpu_command(msg::VCPU_GET_CPUID, vcpu.into(), &[req.as_bytes()], 16)?;
        Ok(read_zext(&data))
    }

    /// `KVMI_VCPU_CONTROL_CR`: selects CR0, CR3 or CR4 for CR events.
    pub fn control_cr(&self, vcpu: impl Into<VcpuId>, cr: u8, enable: bool) -> Result<()> {
        let req = VcpuControlCr { cr, enable: bool_u8(enable), ..Default::default() };
        self.vcpu_command(msg::VCPU_CONTROL_CR, vcpu.into(), &[req.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VCPU_INJECT_EXCEPTION`: a TRAP event follows.
    pub fn inject_exception(&self, vcpu: impl Into<VcpuId>, nr: u8, error_code: u32, address: u64) -> Result<()> {
        let req = VcpuInjectException { nr, error_code, address, ..Default::default() };
        self.vcpu_command(msg::VCPU_INJECT_EXCEPTION, vcpu.into(), &[req.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VCPU_GET_XCR` (only XCR0 exists).
    pub fn get_xcr(&self, vcpu: impl Into<VcpuId>, xcr: u8) -> Result<u64> {
        let req = VcpuGetXcr { xcr, ..Default::default() };
        let data = self.vcpu_command(msg::VCPU_GET_XCR, vcpu.into(), &[req.as_bytes()], 8)?;
        Ok(read_zext::<VcpuGetXcrReply>(&data).value)
    }

    /// `KVMI_VCPU_GET_XSAVE`: the 4096-byte XSAVE area.
    pub fn get_xsave(&self, vcpu: impl Into<VcpuId>) -> Result<Box<KvmXsave>> {
        let data = self.vcpu_command(msg::VCPU_GET_XSAVE, vcpu.into(), &[], size_of::<KvmXsave>())?;
        KvmXsave::read_from_bytes(&data).map(Box::new).map_err(|_| {
            let (command, got, expected) = (command_name(msg::VCPU_GET_XSAVE), data.len(), size_of::<KvmXsave>());
            ProtocolError::ReplyLength { command, got, expected }.into()
        })
    }

    /// `KVMI_VCPU_SET_XSAVE`.
    pub fn set_xsave(&self, vcpu: impl Into<VcpuId>, xsave: &KvmXsave) -> Result<()> {
        self.vcpu_command(msg::VCPU_SET_XSAVE, vcpu.into(), &[xsave.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VCPU_GET_MTRR_TYPE`: the guest memory type of the page at `gpa`.
    pub fn get_mtrr_type(&self, vcpu: impl Into<VcpuId>, gpa: impl Into<Gpa>) -> Result<u8> {
        let req = VcpuGetMtrrType { gpa: gpa.into().raw() };
        let data = self.vcpu_command(msg::VCPU_GET_MTRR_TYPE, vcpu.into(), &[req.as_bytes()], 8)?;
        Ok(read_zext::<VcpuGetMtrrTypeReply>(&data).type_)
    }

    /// `KVMI_VCPU_CONTROL_MSR`: selects an MSR for MSR events.
    pub fn control_msr(&self, vcpu: impl Into<VcpuId>, msr: u32, enable: bool) -> Result<()> {
        let req = VcpuControlMsr { enable: bool_u8(enable), msr, ..Default::default() };
        self.vcpu_command(msg::VCPU_CONTROL_MSR, vcpu.into(), &[req.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VCPU_CONTROL_SINGLESTEP` (VMX only).
    pub fn control_singlestep(&self, vcpu: impl Into<VcpuId>, enable: bool) -> Result<()> {
        let req = VcpuControlSinglestep { enable: bool_u8(enable), ..Default::default() };
        self.vcpu_command(msg::VCPU_CONTROL_SINGLESTEP, vcpu.into(), &[req.as_bytes()], 0).map(drop)
    }

    /// `KVMI_VCPU_TRANSLATE_GVA`: `None` when `gva` has no translation.
    pub fn translate_gva(&self, vcpu: impl Into<VcpuId>, gva: impl Into<Gva>) -> Result<Option<Gpa>> {
        let req = VcpuTranslateGva { gva: gva.into().raw() };
        let data = self.vcpu_command(msg::VCPU_TRANSLATE_GVA, vcpu.into(), &[req.as_bytes()], 8)?;
        let gpa = read_zext::<VcpuTranslateGvaReply>(&data).gpa;
        Ok((gpa != u64::MAX).then_some(Gpa(gpa)))
    }
}
