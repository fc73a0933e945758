//! Attach to a VM started with `ukvmi run --introspect unix:PATH`: listen,
//! accept it, pause vCPU 0, read its registers and some memory, resume.
//!
//! ```sh
//! cargo run -p ukvmi --example attach -- /tmp/ukvmi.sock &
//! cargo run -p ukvmi -- run --guest spin --vcpus 2 --introspect unix:/tmp/ukvmi.sock
//! ```

use std::time::Duration;
use ukvmi_introspector::{Event, EventReply, Listener};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "/tmp/ukvmi.sock".into());
    let listener = Listener::bind(&path)?;
    eprintln!("listening on {path}; start the VM with --introspect unix:{path}");
    let vm = listener.accept()?;
    let info = vm.info();
    println!(
        "attached to {:?}: {} vCPUs, {} MiB, KVMI v{}",
        info.name,
        vm.vcpu_count()?,
        info.max_gpa >> 20,
        info.version
    );

    vm.pause_vcpu(0, true)?;
    let Some(Event::Vcpu(ev)) = vm.next_event(Some(Duration::from_secs(10)))? else {
        return Err("no PAUSE event".into());
    };
    let regs = vm.get_registers(0, &[0xc000_0080])?;
    let efer = regs.msrs.first().map_or(0, |m| m.data);
    println!("vCPU 0 paused at rip {:#x} (mode {}-bit), EFER {efer:#x}", regs.regs.rip, regs.mode * 8);
    let bytes = vm.read_physical(0x20_0000, 16)?;
    println!("first bytes of vCPU 0's pattern page: {bytes:02x?}");
    vm.reply(&ev, EventReply::Continue)?;
    println!("resumed");
    Ok(())
}
