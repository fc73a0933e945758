//! Unit tests of the page-access layout against a recording `SlotSink`.

use super::*;
use kvm_bindings::KVM_MEM_READONLY;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// Records the live slots like KVM does, refusing overlaps.
#[derive(Default)]
struct Fake {
    live: RefCell<BTreeMap<u32, kvm_userspace_memory_region>>,
    calls: RefCell<usize>,
    fail_after: RefCell<Option<usize>>,
    /// Guest RAM pages with content (the rest reads as not RAM).
    ram: RefCell<BTreeMap<u64, [u8; 4096]>>,
}

impl Fake {
    fn put64(&self, gpa: u64, v: u64) {
        let mut ram = self.ram.borrow_mut();
        let page = ram.entry(gpa & !0xfff).or_insert([0; 4096]);
        let o = (gpa & 0xfff) as usize;
        page[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }
}

impl GuestPages for Fake {
    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let o = (gpa & 0xfff) as usize;
        let ram = self.ram.borrow();
        match ram.get(&(gpa & !0xfff)).and_then(|p| p.get(o..o + buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

impl SlotSink for Fake {
    fn set_region(&self, r: kvm_userspace_memory_region) -> Result<(), SlotError> {
        *self.calls.borrow_mut() += 1;
        let fail_now = {
            let mut f = self.fail_after.borrow_mut();
            match f.as_mut() {
                Some(0) => {
                    *f = None;
                    true
                }
                Some(n) => {
                    *n -= 1;
                    false
                }
                None => false,
            }
        };
        if fail_now {
            return Err(SlotError(kvm_ioctls::Error::new(libc::EIO)));
        }
        let mut live = self.live.borrow_mut();
        if r.memory_size == 0 {
            live.remove(&r.slot).ok_or(SlotError(kvm_ioctls::Error::new(libc::EINVAL)))?;
            return Ok(());
        }
        if live.contains_key(&r.slot) {
            return Err(SlotError(kvm_ioctls::Error::new(libc::EEXIST)));
        }
        let end = r.guest_phys_addr + r.memory_size;
        if live.values().any(|o| r.guest_phys_addr < o.guest_phys_addr + o.memory_size && o.guest_phys_addr < end) {
            return Err(SlotError(kvm_ioctls::Error::new(libc::EEXIST)));
        }
        assert_eq!(r.userspace_addr, BASE + r.guest_phys_addr);
        live.insert(r.slot, r);
        Ok(())
    }
}

const BASE: u64 = 0x7f00_0000_0000;
const PAGES: u64 = 64;

/// A VM whose vCPUs all ended: no page tables are in use.
fn setup() -> (PageAccess, Fake) {
    let (pa, fake) = setup_booting();
    pa.vcpus.lock().unwrap().count = Some(0);
    (pa, fake)
}

/// A VM whose vCPUs have not started: they will use the boot tables.
fn setup_booting() -> (PageAccess, Fake) {
    let fake = Fake::default();
    fake.live.borrow_mut().insert(
        0,
        kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: PAGES << 12,
            userspace_addr: BASE,
        },
    );
    (PageAccess::new(BASE, PAGES << 12), fake)
}

/// Per page: None (no slot), Some(read-only?).
fn map(fake: &Fake) -> Vec<Option<bool>> {
    let mut m = vec![None; PAGES as usize];
    for r in fake.live.borrow().values() {
        for p in (r.guest_phys_addr >> 12)..((r.guest_phys_addr + r.memory_size) >> 12) {
            m[p as usize] = Some(r.flags & KVM_MEM_READONLY != 0);
        }
    }
    m
}

/// The live slots are maximal runs of equal kind (temporary pages alone).
fn assert_maximal(pa: &PageAccess, fake: &Fake) {
    let g = pa.lock();
    let live = fake.live.borrow();
    assert_eq!(live.len(), g.segs.len());
    let segs: Vec<(u64, Seg)> = g.segs.iter().map(|(s, seg)| (*s, *seg)).collect();
    for w in segs.windows(2) {
        let ((a, sa), (b, sb)) = (w[0], w[1]);
        assert!(!(a + sa.len == b && sa.kind.merges_with(sb.kind)), "{segs:?} not maximal");
    }
    for (s, seg) in &segs {
        let r = live.get(&seg.slot).expect("tracked slot is live");
        assert_eq!((r.guest_phys_addr >> 12, r.memory_size >> 12), (*s, seg.len));
    }
}

#[test]
fn kinds() {
    assert_eq!(kind_for(access::RWX), Some(Kind::Rw));
    assert_eq!(kind_for(access::R | access::X), Some(Kind::Ro));
    assert_eq!(kind_for(access::R | access::W), None);
    assert_eq!(kind_for(access::W | access::X), None);
    assert_eq!(kind_for(0), None);
}

#[test]
fn split_and_merge_back() {
    let (pa, fake) = setup();
    pa.set_with(&fake, 10 << 12, access::R | access::X).unwrap();
    let m = map(&fake);
    assert_eq!(m[10], Some(true));
    assert!(m.iter().enumerate().all(|(i, p)| i == 10 || *p == Some(false)));
    assert_eq!(fake.live.borrow().len(), 3);
    // A neighbour with the same restriction joins its slot.
    pa.set_with(&fake, 11 << 12, access::R | access::X).unwrap();
    assert_eq!(fake.live.borrow().len(), 3);
    assert_eq!(map(&fake)[11], Some(true));
    // Read removed: no slot.
    pa.set_with(&fake, 11 << 12, access::W | access::X).unwrap();
    assert_eq!(map(&fake)[11], None);
    assert_eq!(pa.state(11 << 12), Some(PageState { allowed: access::W | access::X, mapped: false }));
    assert_maximal(&pa, &fake);
    // Same kind again: no slot work at all.
    let calls = *fake.calls.borrow();
    pa.set_with(&fake, 11 << 12, access::W).unwrap();
    assert_eq!(*fake.calls.borrow(), calls);
    // Forget both: back to one slot.
    pa.set_with(&fake, 11 << 12, access::RWX).unwrap();
    pa.set_with(&fake, 10 << 12, access::RWX).unwrap();
    assert_eq!(fake.live.borrow().len(), 1);
    assert!(map(&fake).iter().all(|p| *p == Some(false)));
    assert_eq!(pa.counts(), (0, 1));
}

#[test]
fn edges_and_bounds() {
    let (pa, fake) = setup();
    pa.set_with(&fake, 0, 0).unwrap();
    pa.set_with(&fake, (PAGES - 1) << 12, access::R | access::X).unwrap();
    let m = map(&fake);
    assert_eq!((m[0], m[1], m[PAGES as usize - 1]), (None, Some(false), Some(true)));
    assert_maximal(&pa, &fake);
    assert!(matches!(pa.set_with(&fake, PAGES << 12, 0), Err(BackendError::Invalid(_))));
    assert_eq!(pa.state(PAGES << 12), None);
    pa.clear_with(&fake).unwrap();
    assert_eq!(fake.live.borrow().len(), 1);
    assert!(fake.live.borrow().contains_key(&0), "RAM is back in slot 0");
    assert!(map(&fake).iter().all(|p| *p == Some(false)));
}

#[test]
fn random_walk_stays_consistent() {
    let (pa, fake) = setup();
    let mut want = [access::RWX; PAGES as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..3000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = (x % PAGES) as usize;
        let allowed = ((x >> 8) % 8) as u8;
        pa.set_with(&fake, (page as u64) << 12, allowed).unwrap();
        want[page] = allowed;
        let m = map(&fake);
        for (i, a) in want.iter().enumerate() {
            let expect = kind_for(*a).map(|k| k == Kind::Ro);
            assert_eq!(m[i], expect, "page {i} allowed {a}");
            assert_eq!(pa.allowed((i as u64) << 12), *a);
        }
        assert_maximal(&pa, &fake);
    }
}

#[test]
fn exec_override_is_its_own_slot() {
    let (pa, fake) = setup();
    pa.set_with(&fake, 5 << 12, access::R | access::W).unwrap(); // X removed
    pa.set_with(&fake, 6 << 12, access::R | access::W).unwrap();
    assert_eq!(map(&fake)[5], None);
    let t = pa.begin_exec(&fake, 5 << 12).unwrap();
    assert_eq!(map(&fake)[5], Some(false));
    assert_eq!(map(&fake)[6], None);
    assert_eq!(pa.allowed(5 << 12), access::R | access::W, "still restricted");
    let t2 = pa.begin_exec(&fake, 5 << 12).unwrap(); // a second vCPU
    pa.end_exec(&fake, t).unwrap();
    assert_eq!(map(&fake)[5], Some(false), "the other vCPU still steps");
    pa.end_exec(&fake, t2).unwrap();
    assert_eq!(map(&fake)[5], None);
    assert_maximal(&pa, &fake);
    // Write-protected too: mapped back read-only.
    pa.set_with(&fake, 5 << 12, access::R).unwrap();
    let t = pa.begin_exec(&fake, 5 << 12).unwrap();
    assert_eq!(map(&fake)[5], Some(true));
    // A clear in between voids the token.
    pa.clear_with(&fake).unwrap();
    pa.end_exec(&fake, t).unwrap();
    assert_eq!(fake.live.borrow().len(), 1);
}

/// On real KVM: the probe succeeds here and leaves RAM whole in slot 0;
/// real splits and merges are accepted by KVM.
#[test]
#[allow(clippy::panic)]
fn probe_and_real_slots_on_this_host() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("this test uses /dev/kvm, which cannot be opened: {e}");
    }
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let ram = crate::memory::GuestRam::new(4 << 20).unwrap();
    let base = ram.host_base().unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: base,
    };
    set_region(&vm, region).unwrap();
    let pa = probe(&kvm, &vm, base, ram.size()).unwrap().expect("this host has read-only memslots and guest debug");
    assert_eq!(pa.counts(), (0, 1));
    assert_eq!(pa.lock().segs.get(&0).map(|s| s.slot), Some(0));
    pa.set_with(&vm, 0x10_0000, access::R | access::X).unwrap();
    pa.set_with(&vm, 0x10_1000, 0).unwrap();
    let t = pa.begin_exec(&vm, 0x10_1000).unwrap();
    assert_eq!(pa.counts(), (2, 4), "RAM, read-only page, stepped-over page (own slot), RAM");
    pa.end_exec(&vm, t).unwrap();
    pa.set_with(&vm, 0x10_0000, access::RWX).unwrap();
    assert_eq!(pa.counts(), (1, 2));
    pa.clear_with(&vm).unwrap();
    assert_eq!(pa.counts(), (0, 1));
    // KVM agrees that slot 0 is whole again: re-registering it unchanged is accepted.
    set_region(&vm, region).unwrap();
}

#[test]
fn unmapping_a_page_table_is_refused() {
    let (pa, fake) = setup_booting();
    // The boot tables (CR3 0x1000): PML4 → PDPT 0x2000 → PD 0x3000,
    // whose entries 0 and 2 point to page tables at 0x4000 and 0x8000
    // and entry 1 maps a 2 MiB page.
    assert_eq!(CpuTables::boot().paging.cr3, 0x1000);
    fake.put64(0x1000, 0x2003);
    fake.put64(0x2000, 0x3003);
    fake.put64(0x3000, 0x4003);
    fake.put64(0x3008, 0x20_0083);
    fake.put64(0x3010, 0x8003);
    for t in [0x1000, 0x2000, 0x3000, 0x4000, 0x8000] {
        for a in [access::W | access::X, access::R | access::W, 0, access::R] {
            let calls = *fake.calls.borrow();
            assert!(matches!(pa.set_with(&fake, t + 8, a), Err(BackendError::NotSupported)), "{t:#x} {a}");
            assert_eq!(*fake.calls.borrow(), calls, "no memslot touched");
            assert_eq!(pa.allowed(t), access::RWX, "nothing recorded");
        }
    }
    // Write protection keeps the slot: accepted, and then R cannot go.
    pa.set_with(&fake, 0x3000, access::R | access::X).unwrap();
    assert_eq!(map(&fake)[3], Some(true));
    assert!(matches!(pa.set_with(&fake, 0x3000, access::X), Err(BackendError::NotSupported)));
    assert_eq!(pa.allowed(0x3000), access::R | access::X, "the old restriction stays");
    assert_eq!(map(&fake)[3], Some(true));
    pa.set_with(&fake, 0x3000, access::RWX).unwrap();
    // Data pages are restricted as before.
    for d in [0x5000, 0x6000, 0x9000] {
        pa.set_with(&fake, d, 0).unwrap();
        assert_eq!(map(&fake)[(d >> 12) as usize], None);
    }
    // A page table mapped back for a step: the restriction is checked
    // at once (its slot would go when the step ends).
    let t = pa.begin_exec(&fake, 0x8000).unwrap();
    assert!(matches!(pa.set_with(&fake, 0x8000, access::R | access::W), Err(BackendError::NotSupported)));
    pa.end_exec(&fake, t).unwrap();
    assert_eq!(map(&fake)[8], Some(false));
    // The boot GDT's page (0x500, identity-mapped by a 2 MiB page).
    fake.put64(0x3000, 0x83);
    assert!(matches!(pa.set_with(&fake, 0x500, access::R | access::W), Err(BackendError::NotSupported)));
    pa.set_with(&fake, 0x500, access::R | access::X).unwrap();
    pa.set_with(&fake, 0x500, access::RWX).unwrap();
    // Once every vCPU has ended, the boot tables are nobody's.
    pa.vcpus.lock().unwrap().count = Some(0);
    pa.set_with(&fake, 0x1000, 0).unwrap();
    assert_eq!(map(&fake)[1], None);
    assert_maximal(&pa, &fake);
}

#[test]
fn failed_update_rolls_back() {
    let (pa, fake) = setup();
    *fake.fail_after.borrow_mut() = Some(2); // delete ok, first add ok, second add fails
    assert!(pa.set_with(&fake, 20 << 12, 0).is_err());
    *fake.fail_after.borrow_mut() = None;
    assert_eq!(pa.allowed(20 << 12), access::RWX);
    assert!(map(&fake).iter().all(|p| *p == Some(false)), "RAM fully mapped again");
    assert_maximal(&pa, &fake);
    pa.set_with(&fake, 20 << 12, 0).unwrap();
    assert_eq!(map(&fake)[20], None);
}
