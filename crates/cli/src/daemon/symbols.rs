//! Which symbol map and guest OS an attached VM gets: `--map` (a System.map
//! or a Linux vmlinux), else the built-in guest it really runs.

use std::sync::Arc;

use ukvmi_introspector::Vm;
use ukvmi_monitor::{
    guestos::linux::{self, LinuxOffsets, LinuxOs, LinuxSymbols, MAX_BTF, START_KERNEL_MAP},
    DemoOs, GuestOs, Monitor, PhysRead, SymbolMap,
};

use super::log::log;

/// Whether the VM runs the built-in guest `name`: the first page of its
/// image is in guest memory at the load address, but for at most a few
/// bytes (int3s a tool may have planted).
fn runs_builtin(mon: &Monitor, name: &str) -> bool {
    const PLANTED: usize = 16;
    let Some(g) = ukvmi_guests::find(name) else { return false };
    // The first page: code (data the guest writes comes after it).
    let len = g.image.len().min(4096);
    let mut mem = vec![0u8; len];
    if mon.read(g.load_addr, &mut mem).is_err() {
        return false;
    }
    let differ = mem.iter().zip(g.image).filter(|(a, b)| a != b).count();
    differ <= PLANTED
}

/// The symbols for an attached VM: `--map`, else those of the built-in
/// guest its name names, if it really runs that guest (checked against its
/// memory; a VM merely named like one gets none).
pub(super) fn symbols_for_vm(mon: &Monitor, map: Option<&Arc<SymbolMap>>) -> Option<Arc<SymbolMap>> {
    let name = &mon.vm().info().name;
    if map.is_none() && ukvmi_guests::find(name).is_some() && !runs_builtin(mon, name) {
        log(&format!("VM `{name}` does not run the built-in `{name}` guest: no symbols (give --map FILE)"));
        return None;
    }
    symbols_for(name, map)
}

/// The symbol map for a VM: `--map`, else the built-in guest of that name.
pub(crate) fn symbols_for(vm_name: &str, map: Option<&Arc<SymbolMap>>) -> Option<Arc<SymbolMap>> {
    if let Some(m) = map {
        return Some(Arc::clone(m));
    }
    if vm_name == "demo" {
        // The demo kernel's System.map from its build: every symbol, user
        // program labels at their user addresses.
        return SymbolMap::parse(ukvmi_guests::demo::SYSTEM_MAP).ok().map(Arc::new);
    }
    let g = ukvmi_guests::find(vm_name)?;
    let text: String = g.symbols.iter().map(|(n, a)| format!("{a:016x} T {n}\n")).collect();
    SymbolMap::parse(&text).ok().map(Arc::new)
}

/// Reads `--map FILE`: a System.map (text), or a kernel ELF (a Linux
/// vmlinux: its `.symtab`).
pub(crate) fn load_map(path: &str) -> Result<Arc<SymbolMap>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    if bytes.starts_with(b"\x7fELF") {
        return linux::symbol_map_of(&bytes).map(Arc::new).map_err(|e| format!("{path}: {e}"));
    }
    let text = String::from_utf8(bytes).map_err(|_| format!("{path}: neither an ELF file nor a System.map"))?;
    SymbolMap::parse(&text).map(Arc::new).map_err(|e| format!("{path}: {e}"))
}

/// The guest OS of a VM that attaches while `--map` is `map`: Linux when
/// the map names a Linux kernel (it has `init_task`) whose BTF can be read
/// (the vmlinux's `.BTF`, or for a System.map the kernel's own copy in
/// guest memory), else the demo OS.
pub(super) fn guest_os_for(vm: &Vm, map: Option<&(String, Arc<SymbolMap>)>) -> Arc<dyn GuestOs> {
    let Some((path, syms)) = map else { return Arc::new(DemoOs::new()) };
    if syms.addr("init_task").is_none() {
        return Arc::new(DemoOs::new());
    }
    match linux_os(vm, path, syms) {
        Ok(os) => {
            log(&format!("guest OS: {} from {path}", os.describe()));
            Arc::new(os)
        }
        Err(e) => {
            log(&format!("{path} names a Linux kernel, but {e}: ps and the current task are not available"));
            Arc::new(DemoOs::new())
        }
    }
}

/// The Linux OS of the kernel `path` (ELF or System.map with symbols `syms`).
fn linux_os(vm: &Vm, path: &str, syms: &SymbolMap) -> Result<LinuxOs, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading it again: {e}"))?;
    if bytes.starts_with(b"\x7fELF") {
        return LinuxOs::from_kernel(&bytes, syms).map_err(|e| e.to_string());
    }
    // A System.map: the kernel's BTF is in its image, in guest memory.
    let (Some(start), Some(stop)) = (syms.addr("__start_BTF"), syms.addr("__stop_BTF")) else {
        return Err("its map has no __start_BTF/__stop_BTF (give the vmlinux as --map)".into());
    };
    let len = stop.checked_sub(start).and_then(|l| usize::try_from(l).ok()).filter(|&l| l > 0 && l <= MAX_BTF);
    let (Some(len), Some(gpa)) = (len, start.checked_sub(START_KERNEL_MAP)) else {
        return Err(format!("its BTF bounds {start:#x}..{stop:#x} are unusable"));
    };
    let mut blob = vec![0u8; len];
    vm.read_phys(gpa, &mut blob).map_err(|e| format!("its BTF cannot be read from guest memory: {e}"))?;
    let offsets = LinuxOffsets::from_btf(&blob).map_err(|e| e.to_string())?;
    Ok(LinuxOs::new(offsets, LinuxSymbols::from_map(syms).map_err(|e| e.to_string())?))
}
