//! Finds the guest pages the CPU reads on its own, outside any instruction's
//! operands: the paging structures (walked from each vCPU's CR3) and the
//! descriptor tables (GDT, IDT, LDT, TSS, translated through them).
//!
//! `SET_PAGE_ACCESS` takes the memslot away from a page whose R or X is
//! removed (see `page_access`). An instruction's own access to such a page
//! exits to the VMM, which serves it; a page-table walk through it, or an
//! exception delivery that reads the IDT, GDT or TSS from it, fails inside
//! KVM with no exit to userspace: KVM injects #PF and the guest dies (a
//! triple fault on this host). No PF event can be raised for those, so such
//! restrictions are refused up front, and this module tells which pages
//! they are.
//!
//! Paging modes: 4- and 5-level long mode (CR4.LA57), PAE and 32-bit
//! paging (with CR4.PSE 4 MiB pages). Every table at every level is
//! collected, down to the page tables themselves (found from their parent
//! entries; their own entries point to data and are not read). Large pages
//! (1 GiB, 2 MiB, 4 MiB) end a walk. Not handled: EPT/NPT tables of a
//! nested hypervisor in the guest (data to this walk), SMM's own CR3, the
//! stacks exceptions are delivered on, and tables only reachable from a
//! CR3 (or descriptor-table register) no vCPU has loaded right now.

use kvm_bindings::kvm_sregs;
use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};

/// Bytes per page and per table.
const PAGE: usize = 4096;
/// Physical address bits 51:12 of a 64-bit entry (and of a long-mode CR3).
const ADDR_MASK_64: u64 = 0x000f_ffff_ffff_f000;
/// Physical address bits 31:12 of a 32-bit entry (and of a 32-bit CR3).
const ADDR_MASK_32: u64 = 0xffff_f000;
/// PAE CR3: bits 31:5 locate the four PDPTEs.
const PAE_CR3_MASK: u64 = 0xffff_ffe0;
const PRESENT: u64 = 1;
/// PS: a large page at this level (PDPTE: 1 GiB, PDE: 2 or 4 MiB).
const PAGE_SIZE_BIT: u64 = 1 << 7;

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// At most this many tables (that point to further tables) are read per
/// search, 4 KiB each: bounds the work a guest's tables can cause (they
/// may be huge, or loop). Page tables (the last level) are never read.
pub(crate) const MAX_TABLES: usize = 8192;
/// The most bytes of one descriptor table considered: a GDT or IDT has at
/// most 64 KiB; a TSS's limit may say more (its I/O bitmap ends within
/// 8 KiB of the 104-byte TSS), the rest is not read by the CPU here.
const MAX_DESCRIPTOR_BYTES: u64 = 0x1_0000;

/// A reader of guest RAM: fills the buffer from a guest-physical address;
/// false where that is not RAM.
pub(crate) type ReadRam<'a> = &'a dyn Fn(u64, &mut [u8]) -> bool;

/// The registers that decide how a vCPU translates addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl Paging {
    /// The state every vCPU starts in (`boot::enter_long_mode`: 4-level
    /// long mode on the VMM's identity tables).
    pub const BOOT: Paging =
        Paging { cr0: 0x8005_0033, cr3: ukvmi_guest_abi::layout::PML4_ADDR, cr4: 0x20, efer: 0x500 };

    pub fn from_sregs(s: &kvm_sregs) -> Paging {
        Paging { cr0: s.cr0, cr3: s.cr3, cr4: s.cr4, efer: s.efer }
    }

    /// The top table and how to read it; `None` with paging off.
    fn root(&self) -> Option<Table> {
        if self.cr0 & CR0_PG == 0 {
            return None;
        }
        Some(if self.efer & EFER_LMA != 0 {
            let level = if self.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
            Table { addr: self.cr3 & ADDR_MASK_64, level, format: Format::Long }
        } else if self.cr4 & CR4_PAE != 0 {
            Table { addr: self.cr3 & PAE_CR3_MASK, level: 3, format: Format::PaePdpt }
        } else {
            Table { addr: self.cr3 & ADDR_MASK_32, level: 2, format: Format::Bits32 { pse: self.cr4 & CR4_PSE != 0 } }
        })
    }
}

/// `KVM_GET_SREGS`: `_IOR(KVMIO, 0x83, struct kvm_sregs)`.
const KVM_GET_SREGS: libc::Ioctl =
    (2 << 30) | ((std::mem::size_of::<kvm_sregs>() as libc::Ioctl) << 16) | (0xae << 8) | 0x83;

/// What the CPU of the vCPU behind `fd` reads by itself. `fd` may be a
/// duplicate used by another thread: KVM serialises vCPU ioctls (this one
/// waits while the vCPU is inside `KVM_RUN`).
pub(crate) fn vcpu_tables(fd: &OwnedFd) -> std::io::Result<CpuTables> {
    let mut s = kvm_sregs::default();
    // SAFETY: KVM_GET_SREGS writes exactly one `kvm_sregs` (the size the
    // request encodes) through the pointer, to `s`, which outlives the
    // call; `fd` is an open descriptor (an unrelated fd type fails the
    // ioctl with an error, writing nothing).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_SREGS, &mut s as *mut kvm_sregs) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(CpuTables::from_sregs(&s))
}

/// What the CPU of one vCPU reads from guest memory by itself: the page
/// tables (from CR3) and the descriptor tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CpuTables {
    pub paging: Paging,
    /// (linear base, length in bytes) of each descriptor table in use.
    pub descriptors: Vec<(u64, u64)>,
}

impl CpuTables {
    /// Where every vCPU starts (`boot::enter_long_mode`): the boot page
    /// tables and the VMM's 5-entry GDT, no IDT, no TSS loaded.
    pub fn boot() -> CpuTables {
        CpuTables { paging: Paging::BOOT, descriptors: vec![(ukvmi_guest_abi::layout::GDT_ADDR, 40)] }
    }

    pub fn from_sregs(s: &kvm_sregs) -> CpuTables {
        let mut descriptors = Vec::new();
        // GDT and IDT: limit + 1 bytes. A limit of 0 holds no descriptor
        // or gate (how the VMM starts vCPUs without an IDT).
        for t in [s.gdt, s.idt] {
            if t.limit != 0 {
                descriptors.push((t.base, u64::from(t.limit) + 1));
            }
        }
        // LDT and TSS only once loaded: the reset state has selector 0
        // (and a TSS with base 0, which the CPU does not use then).
        for seg in [s.ldt, s.tr] {
            if seg.selector & !3 != 0 && seg.present != 0 && seg.unusable == 0 {
                descriptors.push((seg.base, u64::from(seg.limit) + 1));
            }
        }
        CpuTables { paging: Paging::from_sregs(s), descriptors }
    }
}

/// The guest frames holding the descriptor tables of `cpu` (at most 17
/// pages per table), translated through its page tables, sorted.
pub(crate) fn descriptor_pages(cpu: &CpuTables, read: ReadRam<'_>) -> Vec<u64> {
    let mut out = Vec::new();
    for &(base, len) in &cpu.descriptors {
        let len = len.clamp(1, MAX_DESCRIPTOR_BYTES);
        let first = base & !0xfff;
        let pages = (base.wrapping_add(len - 1) & !0xfff).wrapping_sub(first) >> 12;
        for i in 0..=pages.min(MAX_DESCRIPTOR_BYTES >> 12) {
            if let Some(gpa) = translate(&cpu.paging, first.wrapping_add(i << 12), read) {
                out.push(gpa >> 12);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The guest-physical address of linear address `gva` through `paging`
/// (`None`: not present, or a table outside RAM). Paging off: itself.
pub(crate) fn translate(paging: &Paging, gva: u64, read: ReadRam<'_>) -> Option<u64> {
    let Some(root) = paging.root() else { return Some(gva) };
    let entry = |addr: u64, size: usize| -> Option<u64> {
        let mut buf = [0u8; 8];
        let b = buf.get_mut(..size)?;
        read(addr, b).then(|| b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
    };
    match root.format {
        Format::Long | Format::PaePdpt => {
            let (mut table, mut format) = (root.addr, root.format);
            for level in (1..=root.level).rev() {
                let shift = 12 + 9 * u32::from(level - 1);
                let e = entry(table + 8 * ((gva >> shift) & 511), 8)?;
                if e & PRESENT == 0 {
                    return None;
                }
                let may_be_large = level == 2 || (level == 3 && format == Format::Long);
                if level == 1 || (may_be_large && e & PAGE_SIZE_BIT != 0) {
                    let offset = (1u64 << shift) - 1;
                    return Some((e & ADDR_MASK_64 & !offset) | (gva & offset));
                }
                (table, format) = (e & ADDR_MASK_64, Format::Long);
            }
            None
        }
        Format::Bits32 { pse } => {
            let pde = entry(root.addr + 4 * ((gva >> 22) & 1023), 4)?;
            if pde & PRESENT == 0 {
                return None;
            }
            if pse && pde & PAGE_SIZE_BIT != 0 {
                // 4 MiB; PSE-36: PDE bits 20:13 are physical bits 39:32.
                return Some((pde & 0xffc0_0000) | (((pde >> 13) & 0xff) << 32) | (gva & 0x3f_ffff));
            }
            let pte = entry((pde & ADDR_MASK_32) + 4 * ((gva >> 12) & 1023), 4)?;
            (pte & PRESENT != 0).then_some((pte & ADDR_MASK_32) | (gva & 0xfff))
        }
    }
}

/// How a table's entries are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Format {
    /// 512 64-bit entries (long mode at every level, PAE below the PDPT).
    Long,
    /// PAE's four 64-bit PDPTEs at a 32-byte aligned address.
    PaePdpt,
    /// 1024 32-bit entries; `pse`: PS in a PDE maps 4 MiB.
    Bits32 { pse: bool },
}

/// A table to read: its guest-physical address, its level (1 = page table)
/// and its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Table {
    addr: u64,
    level: u8,
    format: Format,
}

/// Where a search found a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    /// The page (guest frame number).
    pub gfn: u64,
    /// Which root (index into the roots given) reaches it.
    pub root: usize,
    /// Its level in that walk (1 = a page table; the root's level for the
    /// page CR3 points into).
    pub level: u8,
}

/// What a search found out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Search {
    /// A wanted page holds a paging structure.
    Found(Hit),
    /// Every table reachable from the roots was read; none is wanted.
    NotFound,
    /// [`MAX_TABLES`] (or the given budget) ran out first: not known.
    GaveUp,
}

/// The first page holding a paging structure reachable from any of
/// `roots` for which `wanted(gfn)` holds. `read` fills a 4 KiB buffer from
/// a page-aligned guest-physical address (false: not RAM, the table is
/// skipped). At most `budget` tables are read.
pub(crate) fn find(roots: &[Paging], wanted: &dyn Fn(u64) -> bool, read: ReadRam<'_>, budget: usize) -> Search {
    let mut seen: HashSet<Table> = HashSet::new();
    let mut buf = Box::new([0u8; PAGE]);
    let mut read_count = 0usize;
    for (root, paging) in roots.iter().enumerate() {
        let Some(top) = paging.root() else { continue };
        let mut stack = vec![top];
        while let Some(t) = stack.pop() {
            let gfn = t.addr >> 12;
            if wanted(gfn) {
                return Search::Found(Hit { gfn, root, level: t.level });
            }
            // Page tables are only collected; what they point to is data.
            if t.level <= 1 || !seen.insert(t) {
                continue;
            }
            if read_count >= budget {
                return Search::GaveUp;
            }
            read_count += 1;
            if !read(t.addr & !0xfff, &mut buf[..]) {
                continue;
            }
            children(&t, &buf, &mut stack);
        }
    }
    Search::NotFound
}

/// Pushes the tables `t`'s present entries point to.
fn children(t: &Table, page: &[u8; PAGE], out: &mut Vec<Table>) {
    let level = t.level.saturating_sub(1);
    match t.format {
        Format::Long | Format::PaePdpt => {
            let entries = if t.format == Format::PaePdpt {
                // Four PDPTEs at the (32-byte aligned) CR3 address.
                let at = (t.addr & 0xfe0) as usize;
                page.get(at..at + 32).unwrap_or_default()
            } else {
                page.as_slice()
            };
            for e in entries.chunks_exact(8).filter_map(|b| b.try_into().ok().map(u64::from_le_bytes)) {
                // PS means a large page in a PDPTE or PDE (long mode level
                // 3 and 2; PAE PDEs); it is reserved in PML5Es, PML4Es and
                // PAE PDPTEs, so those always point to tables.
                let large = t.format == Format::Long && matches!(t.level, 2 | 3) && e & PAGE_SIZE_BIT != 0;
                if e & PRESENT != 0 && !large {
                    out.push(Table { addr: e & ADDR_MASK_64, level, format: Format::Long });
                }
            }
        }
        Format::Bits32 { pse } => {
            for e in page.chunks_exact(4).filter_map(|b| b.try_into().ok().map(u32::from_le_bytes)).map(u64::from) {
                if e & PRESENT != 0 && !(pse && e & PAGE_SIZE_BIT != 0) {
                    out.push(Table { addr: e & ADDR_MASK_32, level, format: t.format });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Guest RAM as a map of pages.
    #[derive(Default)]
    struct Ram(BTreeMap<u64, Box<[u8; PAGE]>>);

    impl Ram {
        fn put64(&mut self, gpa: u64, v: u64) {
            let p = self.0.entry(gpa & !0xfff).or_insert_with(|| Box::new([0; PAGE]));
            let o = (gpa & 0xfff) as usize;
            p[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        fn put32(&mut self, gpa: u64, v: u32) {
            let p = self.0.entry(gpa & !0xfff).or_insert_with(|| Box::new([0; PAGE]));
            let o = (gpa & 0xfff) as usize;
            p[o..o + 4].copy_from_slice(&v.to_le_bytes());
        }
        fn find(&self, roots: &[Paging], gpa: u64) -> Search {
            find(roots, &|gfn| gfn == gpa >> 12, &|a, buf| self.read(a, buf), MAX_TABLES)
        }
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let o = (gpa & 0xfff) as usize;
            match self.0.get(&(gpa & !0xfff)).and_then(|p| p.get(o..o + buf.len())) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    fn long4(cr3: u64) -> Paging {
        Paging { cr3, ..Paging::BOOT }
    }

    fn found(gpa: u64, level: u8) -> Search {
        Search::Found(Hit { gfn: gpa >> 12, root: 0, level })
    }

    #[test]
    fn four_level_long_mode() {
        let mut ram = Ram::default();
        // PML4 0x1000 → PDPT 0x2000 → PD 0x3000 → PT 0x4000 → data 0x5000;
        // PD entry 1 a 2 MiB page at 0x20_0000; PDPT entry 1 a 1 GiB page.
        ram.put64(0x1000, 0x2000 | 0x23 | (1 << 63));
        ram.put64(0x2000, 0x3000 | 3);
        ram.put64(0x2008, 0x4000_0000 | 0x83);
        ram.put64(0x3000, 0x4000 | 3);
        ram.put64(0x3008, 0x20_0000 | 0x83);
        ram.put64(0x4000, 0x5000 | 3);
        // Not present: ignored.
        ram.put64(0x3010, 0x6000);
        let r = [long4(0x1000 | 0x5)]; // PCID bits
        assert_eq!(ram.find(&r, 0x1000), found(0x1000, 4));
        assert_eq!(ram.find(&r, 0x1ff8), found(0x1ff8, 4), "any byte of the page");
        assert_eq!(ram.find(&r, 0x2000), found(0x2000, 3));
        assert_eq!(ram.find(&r, 0x3000), found(0x3000, 2));
        assert_eq!(ram.find(&r, 0x4000), found(0x4000, 1), "a page table, found from its PDE");
        for data in [0x5000, 0x6000, 0x20_0000, 0x4000_0000, 0x7000] {
            assert_eq!(ram.find(&r, data), Search::NotFound, "{data:#x} is data");
        }
        // Paging off: nothing is a table.
        let off = [Paging { cr0: 0x11, ..long4(0x1000) }];
        assert_eq!(ram.find(&off, 0x1000), Search::NotFound);
        // The second root reaches it.
        let two = [off[0], r[0]];
        assert_eq!(ram.find(&two, 0x3000), Search::Found(Hit { gfn: 3, root: 1, level: 2 }));
    }

    #[test]
    fn five_level_and_loops() {
        let mut ram = Ram::default();
        let la57 = Paging { cr4: Paging::BOOT.cr4 | CR4_LA57, ..long4(0x9000) };
        ram.put64(0x9000, 0x1000 | 3); // PML5 → PML4
        ram.put64(0x9ff8, 0x9000 | 3); // a self-reference
        ram.put64(0x1000, 0x2000 | 3);
        ram.put64(0x1008, 0x1000 | 3); // the PML4 maps itself too (Windows style)
        ram.put64(0x2000, 0x3000 | 3);
        ram.put64(0x3000, 0x4000 | 3);
        let r = [la57];
        assert_eq!(ram.find(&r, 0x9000), found(0x9000, 5));
        // (Through the loops a page is reached at several levels; which
        // one is reported first does not matter.)
        for t in [0x1000, 0x2000, 0x3000, 0x4000] {
            assert!(matches!(ram.find(&r, t), Search::Found(_)), "{t:#x}");
        }
        assert_eq!(ram.find(&r, 0x8000), Search::NotFound, "terminates despite the loops");
    }

    #[test]
    fn pae_and_32_bit() {
        let mut ram = Ram::default();
        // PAE: PDPTEs at 0x7020 (32-byte aligned inside page 0x7000).
        let pae = Paging { cr0: 0x8000_0011, cr3: 0x7020, cr4: CR4_PAE, efer: 0 };
        ram.put64(0x7020, 0x3000 | 1);
        ram.put64(0x7000, 0xa000 | 1); // outside the four PDPTEs: not an entry
        ram.put64(0x3000, 0x4000 | 3);
        ram.put64(0x3008, 0x40_0000 | 0x83);
        assert_eq!(ram.find(&[pae], 0x7000), found(0x7000, 3));
        assert_eq!(ram.find(&[pae], 0x3000), found(0x3000, 2));
        assert_eq!(ram.find(&[pae], 0x4000), found(0x4000, 1));
        assert_eq!(ram.find(&[pae], 0xa000), Search::NotFound);
        assert_eq!(ram.find(&[pae], 0x40_0000), Search::NotFound);
        // 32-bit: PD at 0x8000; PDE 0 → PT 0xb000, PDE 1 a 4 MiB page (PSE).
        let b32 = Paging { cr0: 0x8000_0011, cr3: 0x8000, cr4: CR4_PSE, efer: 0 };
        ram.put32(0x8000, 0xb000 | 3);
        ram.put32(0x8004, 0x0080_0000 | 0x83);
        assert_eq!(ram.find(&[b32], 0x8000), found(0x8000, 2));
        assert_eq!(ram.find(&[b32], 0xb000), found(0xb000, 1));
        assert_eq!(ram.find(&[b32], 0x80_0000), Search::NotFound);
        // Without PSE the PS bit means nothing: 0x80_0000 is a page table.
        let b32_nopse = Paging { cr4: 0, ..b32 };
        assert_eq!(ram.find(&[b32_nopse], 0x80_0000), found(0x80_0000, 1));
    }

    #[test]
    fn the_budget_bounds_the_work() {
        let mut ram = Ram::default();
        // A PML4 whose 512 entries point to 512 distinct PDPTs of 1 GiB
        // pages: 513 tables to read.
        for i in 0..512u64 {
            ram.put64(0x1000 + 8 * i, (0x10_0000 + i * 0x1000) | 3);
            for j in 0..512u64 {
                ram.put64(0x10_0000 + i * 0x1000 + 8 * j, (j << 30) | 0x83);
            }
        }
        let read = |a: u64, buf: &mut [u8]| ram.read(a, buf);
        let never = |_| false;
        assert_eq!(find(&[long4(0x1000)], &never, &read, 100), Search::GaveUp);
        assert_eq!(find(&[long4(0x1000)], &never, &read, 1000), Search::NotFound);
        // Any predicate: the first table page at or above 0x10_0100 pages.
        let hit = find(&[long4(0x1000)], &|gfn| gfn >= 0x100, &read, 1000);
        assert!(matches!(hit, Search::Found(Hit { gfn, level: 3, .. }) if gfn >= 0x100), "{hit:?}");
        // Tables outside RAM are skipped, not fatal.
        assert_eq!(ram.find(&[long4(0x7f_f000)], 0x1000), Search::NotFound);
    }

    #[test]
    fn translation_in_every_mode() {
        let mut ram = Ram::default();
        // Long mode: as in `four_level_long_mode`.
        ram.put64(0x1000, 0x2003);
        ram.put64(0x2000, 0x3003);
        ram.put64(0x2008, 0x4000_0000 | 0x83);
        ram.put64(0x3000, 0x4003);
        ram.put64(0x3008, 0x20_0000 | 0x83);
        ram.put64(0x4000, 0x5003 | (1 << 63));
        let read = |a: u64, buf: &mut [u8]| ram.read(a, buf);
        let l4 = long4(0x1000);
        assert_eq!(translate(&l4, 0x123, &read), Some(0x5123));
        assert_eq!(translate(&l4, 0x20_1234, &read), Some(0x20_1234), "2 MiB page");
        assert_eq!(translate(&l4, 0x20_0000 + 0x1f_ffff, &read), Some(0x3f_ffff));
        assert_eq!(translate(&l4, 0x4000_5678, &read), Some(0x4000_5678), "1 GiB page");
        assert_eq!(translate(&l4, 0x1000, &read), None, "PT entry 1 not present");
        assert_eq!(translate(&l4, 0x60_0000, &read), None, "PD entry 3 not present");
        assert_eq!(translate(&Paging { cr0: 0x11, ..l4 }, 0x7777, &read), Some(0x7777), "paging off");
        // PAE: PDPTEs at 0x7020; PD 0x3000 → PT 0x4000 → 0xc000; PD[1] 2 MiB.
        let mut ram = Ram::default();
        ram.put64(0x7020, 0x3001);
        ram.put64(0x3000, 0x4003);
        ram.put64(0x3008, 0x40_0083);
        ram.put64(0x4000, 0xc001);
        let read = |a: u64, buf: &mut [u8]| ram.read(a, buf);
        let pae = Paging { cr0: 0x8000_0011, cr3: 0x7020, cr4: CR4_PAE, efer: 0 };
        assert_eq!(translate(&pae, 0x10, &read), Some(0xc010));
        assert_eq!(translate(&pae, 0x20_0005, &read), Some(0x40_0005));
        assert_eq!(translate(&pae, 0x4000_0000, &read), None, "PDPTE 1 not present");
        // 32-bit: PD 0x8000 → PT 0xb000 → 0xd000; PDE 1 a 4 MiB page at
        // 0x80_0000; PDE 2 a 4 MiB page above 4 GiB (PSE-36).
        let mut ram = Ram::default();
        ram.put32(0x8000, 0xb003);
        ram.put32(0x8004, 0x80_0083);
        ram.put32(0x8008, 0x0040_0083 | (1 << 13));
        ram.put32(0xb000, 0xd001);
        let read = |a: u64, buf: &mut [u8]| ram.read(a, buf);
        let b32 = Paging { cr0: 0x8000_0011, cr3: 0x8000, cr4: CR4_PSE, efer: 0 };
        assert_eq!(translate(&b32, 0x7, &read), Some(0xd007));
        assert_eq!(translate(&b32, 0x40_1234, &read), Some(0x80_1234));
        assert_eq!(translate(&b32, 0x80_0010, &read), Some(0x1_0040_0010));
    }

    #[test]
    fn descriptor_tables_in_use() {
        let mut ram = Ram::default();
        ram.put64(0x1000, 0x2003);
        ram.put64(0x2000, 0x3003);
        ram.put64(0x3000, 0x4003);
        ram.put64(0x3008, 0x20_0083);
        ram.put64(0x4000, 0x5003);
        let read = |a: u64, buf: &mut [u8]| ram.read(a, buf);
        let mut s = kvm_sregs { cr0: 0x8005_0033, cr3: 0x1000, cr4: 0x20, efer: 0x500, ..Default::default() };
        // GDT at GVA 0x123 (→ 0x5123), IDT straddling two pages of the
        // 2 MiB page; LDT and TSS with selector 0 are not loaded.
        s.gdt.base = 0x123;
        s.gdt.limit = 0x3f;
        s.idt.base = 0x20_0ff0;
        s.idt.limit = 0x1f;
        s.tr.base = 0x60_0000;
        s.tr.limit = 0x67;
        s.tr.present = 1;
        let cpu = CpuTables::from_sregs(&s);
        assert_eq!(cpu.descriptors, vec![(0x123, 0x40), (0x20_0ff0, 0x20)]);
        assert_eq!(descriptor_pages(&cpu, &read), vec![0x5, 0x200, 0x201]);
        // A loaded TSS counts (here at an unmapped GVA: nothing to find).
        s.tr.selector = 0x38;
        s.tr.base = 0x20_3000;
        let cpu = CpuTables::from_sregs(&s);
        assert_eq!(descriptor_pages(&cpu, &read), vec![0x5, 0x200, 0x201, 0x203]);
        // An IDT of limit 0 holds no gate; a huge TSS limit is capped.
        s.idt.limit = 0;
        s.tr.limit = u32::MAX;
        let pages = descriptor_pages(&CpuTables::from_sregs(&s), &read);
        assert_eq!(pages.len(), 1 + 16, "the GDT page and 64 KiB of the TSS");
        // The boot state: the VMM's GDT, identity-mapped.
        let mut ram = Ram::default();
        ram.put64(0x1000, 0x2003);
        ram.put64(0x2000, 0x3003);
        ram.put64(0x3000, 0x83);
        let read = |a: u64, buf: &mut [u8]| ram.read(a, buf);
        assert_eq!(descriptor_pages(&CpuTables::boot(), &read), vec![0]);
    }
}
