//! Guest-virtual reads through one vCPU's own page tables.

use super::KvmVcpu;
use crate::page_tables::{self, Paging};

impl KvmVcpu {
    /// The gpa of `gva` through the vCPU's paging, if mapped: walked in
    /// guest RAM by the VMM when this exit's special registers are at hand
    /// (no ioctl), else `KVM_TRANSLATE`.
    pub(super) fn translate(&self, gva: u64) -> Option<u64> {
        match self.cached_sregs() {
            Some(s) => self.walk(&s, gva),
            None => self.fd.translate_gva(gva).ok().filter(|t| t.valid != 0).map(|t| t.physical_address),
        }
    }

    /// `gva` through the page tables `sregs` name, read from guest RAM.
    pub(super) fn walk(&self, sregs: &kvm_bindings::kvm_sregs, gva: u64) -> Option<u64> {
        let ram = &self.shared.ram;
        page_tables::translate(&Paging::from_sregs(sregs), gva, &|gpa, buf| ram.read(gpa, buf).is_ok())
    }

    /// Reads quadwords from guest-virtual `gva` on, translating once per
    /// page; returns how many it read before an unmapped page.
    pub(super) fn read_virt_qwords(&self, gva: u64, out: &mut [u64]) -> usize {
        let mut page: Option<(u64, u64)> = None;
        for (i, q) in out.iter_mut().enumerate() {
            let at = gva.wrapping_add(8 * i as u64);
            let value = if at & 0xfff > 0xff8 {
                // Straddles two pages (a misaligned stack).
                self.read_virt_u64(at)
            } else {
                let (va_page, pa_page) = match page {
                    Some(p) if p.0 == at & !0xfff => p,
                    _ => {
                        let Some(pa) = self.translate(at & !0xfff) else { return i };
                        (at & !0xfff, pa)
                    }
                };
                page = Some((va_page, pa_page));
                let mut b = [0u8; 8];
                self.shared.ram.read(pa_page + (at & 0xfff), &mut b).ok().map(|()| u64::from_le_bytes(b))
            };
            match value {
                Some(v) => *q = v,
                None => return i,
            }
        }
        out.len()
    }

    /// Reads a guest-virtual u64 through this vCPU's page tables.
    pub(super) fn read_virt_u64(&self, gva: u64) -> Option<u64> {
        let gpa = self.translate(gva)?;
        let mut b = [0u8; 8];
        self.shared.ram.read(gpa, &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
}
