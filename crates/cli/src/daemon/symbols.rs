//! Which symbol map an attached VM gets: `--map`, else the built-in guest
//! it really runs.

use std::sync::Arc;

use ukvmi_monitor::{Monitor, SymbolMap};

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
