//! Reading what the user typed as addresses, guest-physical ranges and vCPU
//! numbers, against the attached VM and its symbols.

use ukvmi_monitor::symbols::parse_number;

use super::{kvmi, Ctx, Failure};

impl Ctx<'_> {
    pub(super) fn addr(&self, text: &str) -> Result<u64, Failure> {
        match self.syms {
            Some(s) => s.resolve(text),
            None => parse_number(text),
        }
        .ok_or_else(|| {
            Failure::usage(format!(
                "`{text}` is not an address{}",
                if self.syms.is_some() {
                    " or a known symbol"
                } else {
                    " (no symbol map: give --map FILE to use names)"
                }
            ))
        })
    }

    /// A guest-physical range from the command line. A number is physical
    /// as given. A symbol is a kernel virtual address: it is translated
    /// through vCPU 0's page tables (kernel mappings are the same in every
    /// address space), page by page, and the range must be contiguous in
    /// guest-physical memory. The demo kernel is identity-mapped, so there
    /// both agree; a Linux kernel's image is at its fixed gpa
    /// (`GuestOs::static_gpa`).
    pub(super) fn phys(&self, text: &str, len: u64) -> Result<u64, Failure> {
        let at = self.addr(text)?;
        if parse_number(text).is_some() {
            return Ok(at);
        }
        let end = at.checked_add(len.max(1)).ok_or_else(|| Failure::usage("address range overflows"))?;
        // A Linux kernel's image lies at a fixed gpa (no KASLR): usable
        // before the kernel turned paging on (guards armed before boot).
        if let Some(gpa) = self.mon.guest_os().static_gpa(at) {
            return Ok(gpa);
        }
        let vm = self.mon.vm();
        let walk = |va: u64| -> Result<u64, Failure> {
            vm.translate_gva(0, va).map_err(kvmi("KVMI_VCPU_TRANSLATE_GVA"))?.map(u64::from).ok_or_else(|| Failure {
                msg: format!("`{text}`: {va:#x} is not mapped in vCPU 0's address space"),
                status: 1,
            })
        };
        let gpa = walk(at)?;
        let mut page = (at | 0xfff).saturating_add(1);
        while page < end {
            if walk(page)? != gpa + (page - at) {
                return Err(Failure {
                    msg: format!("`{text}`+{len:#x} is not contiguous in guest-physical memory (at {page:#x}); give physical addresses"),
                    status: 1,
                });
            }
            page = page.saturating_add(0x1000);
        }
        Ok(gpa)
    }

    /// Where `len` bytes at virtual `va` lie in vCPU `v`'s address space
    /// (its page tables as they are now), in order: `(gpa, len)` a page at
    /// most each. Fails at the first page that is not mapped.
    pub(super) fn virt_pieces(&self, v: u16, va: u64, len: u64) -> Result<Vec<(u64, u64)>, Failure> {
        va.checked_add(len).ok_or_else(|| Failure::usage("address range overflows"))?;
        let mut pieces = Vec::new();
        for (at, n) in page_pieces(va, len) {
            let gpa = self
                .mon
                .vm()
                .translate_gva(v, at)
                .map_err(kvmi("KVMI_VCPU_TRANSLATE_GVA"))?
                .map(u64::from)
                .ok_or_else(|| Failure {
                    msg: format!("{at:#x} is not mapped in vCPU {v}'s address space"),
                    status: 1,
                })?;
            pieces.push((gpa, n));
        }
        Ok(pieces)
    }

    pub(super) fn vcpu(&self, text: &str) -> Result<u16, Failure> {
        let v = parse_number(text)
            .and_then(|v| u16::try_from(v).ok())
            .ok_or_else(|| Failure::usage(format!("bad vCPU `{text}`")))?;
        if v >= self.mon.vcpus() {
            return Err(Failure::usage(format!(
                "vCPU {v} does not exist: the VM has {} (0..{})",
                self.mon.vcpus(),
                self.mon.vcpus() - 1
            )));
        }
        Ok(v)
    }

    pub(super) fn describe(&self, a: u64) -> String {
        ukvmi_monitor::describe(self.syms, a)
    }
}

/// `len` bytes from `start` cut at page boundaries, in order: `(address,
/// len)` a page at most each (one KVMI memory command or translation
/// each). Empty when the range passes the end of the address space.
pub(super) fn page_pieces(start: u64, len: u64) -> Vec<(u64, u64)> {
    let Some(end) = start.checked_add(len) else { return Vec::new() };
    let mut v = Vec::new();
    let mut at = start;
    while at < end {
        let n = (0x1000 - (at & 0xfff)).min(end - at);
        v.push((at, n));
        at += n;
    }
    v
}
