//! `ukvmi run --help`: the options, the built-in guests, and what a probe
//! of this host's /dev/kvm finds (the commands and events it can serve).

use ukvmi_introspector::wire::{event, msg};

/// The whole `ukvmi run --help` text.
pub(crate) fn help() -> String {
    let mut s = String::from(
        "\
ukvmi run: start a VM on /dev/kvm, optionally introspected over KVMI (v12 or kvmi-v7)

USAGE:
    ukvmi run --guest NAME|--kernel PATH [OPTIONS]

WHAT TO RUN:
    --guest NAME             a built-in guest (see below)
    --kernel PATH            a flat binary (loaded at 1 MiB) or an ELF64 file,
                             entered in 64-bit ring 0 (see crates/guests for the ABI);
                             or a Linux kernel, told from its bytes: a vmlinux built
                             with CONFIG_PVH (booted through PVH) or a bzImage (the
                             64-bit boot protocol; its decompressor runs in the guest,
                             slow on a PVM host), on a small PC: in-kernel irqchip and PIT, a 16550 on ttyS0 with its
                             IRQ, CMOS clock, i8042/0xcf9 reset, no PCI; one vCPU,
                             at most 3072 MiB
    --initrd FILE            Linux only: the initramfs (an uncompressed newc cpio
                             unpacks fastest)
    --cmdline TEXT           Linux only: the kernel command line (default
                             `console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1`).
                             On a PVM host ukvmi appends what its emulator needs
                             (noxsave, clearcpuid=..., nofsgsbase, nosmp) unless given,
                             and says so once
    --map FILE               Linux only: the kernel's System.map, to name the kernel
                             function in the VMM's messages (an instruction it
                             completed for the emulator, or one it could not run)
    --vcpus N                number of vCPUs (default 1); a built-in guest starts at
                             most the vCPUs it uses (below), the others stay idle
    --memory MIB             guest RAM in MiB (default 64, 256 for a Linux kernel); a
                             built-in guest refuses less than it needs (below)
    --serial stdio|file:PATH where the guest's serial console goes (default stdio)

INTROSPECTION (the VMM connects to the tool, as QEMU does):
    --introspect unix:PATH   connect to an introspector listening at PATH; the VM
                             runs whether or not it is there
    --key-file PATH          the tool must prove it knows the secret in PATH (SHA-1
                             cookie; one trailing newline is not part of it). Or set
                             UKVMI_KEY. Never on the command line: every local user
                             can read a process's arguments
    --introspector-uid UID   also let a tool running as UID introspect this VM (repeat);
                             by default only a listener running as this VMM's user or
                             root is talked to (its SO_PEERCRED is checked)
    --name NAME              VM name sent in the handshake
    --uuid UUID              VM UUID sent in the handshake (default: random)
    --reconnect SECS         retry the connection every SECS seconds (default 1, at
                             least 0.01)
    --handshake-timeout SECS give up on a tool that has not accepted and answered the
                             handshake within SECS (default 10, more than 0)
    --unhook-timeout SECS    at shutdown, wait up to SECS for the tool to close
                             after the UNHOOK event (default 10)
    --kvmi-dialect v12|v7    the wire dialect the tool speaks (default v12). Pick
                             v7 for the existing KVMI tools: libkvmi and its
                             hookguest, LibVMI's KVM driver, libmicrovmi, the kvmi
                             crate, HVMI, SmartVMI. Their ids differ from v12's, so
                             a v7 tool on a v12 VM fails at its second command
                             (Invalid argument). With v7 the VMM connects once the
                             guest has started every vCPU (at most 5 s after boot)
    --allow-command ID       allow only these commands (repeat; number or name,
                             e.g. 8 or KVMI_VM_GET_INFO, or the extension
                             UKVMI_VM_MAP_MEMORY); default: all
    --allow-event ID         allow only these events (repeat); default: all

SIGNALS:
    SIGINT, SIGTERM          send UNHOOK (if the tool enabled it), wait for the tool
                             to close (--unhook-timeout), stop the VM, exit 0
    SIGUSR1                  print the interceptions in force to stderr (watched
                             MSRs, guest debugging per vCPU, restricted pages)

EXIT STATUS:
    the guest's power-off status (0 for a normal power-off), 0 when stopped by
    SIGINT/SIGTERM or when a Linux guest resets the machine (reboot, or panic=-1
    after a panic), 2 when an introspector answered CRASH, 1 on any failure.

BUILT-IN GUESTS:
",
    );
    for g in ukvmi_guests::all() {
        s.push_str(&format!("    {:<12} {}\n", g.name, g.summary));
    }
    s.push_str(&needs_section());
    s.push_str(&host_section());
    s
}

/// What the built-in guests need: the common case, then each exception.
fn needs_section() -> String {
    let (mib, vcpus) = (ukvmi_guests::layout::MIN_MEM_SIZE >> 20, ukvmi_guests::layout::MAX_VCPUS);
    let plural = |n: u16| if n == 1 { "" } else { "s" };
    let mut s = format!("    each needs {mib} MiB of RAM and uses up to {vcpus} vCPUs, except:\n");
    for g in ukvmi_guests::all().iter().filter(|g| g.min_memory_mib != mib || g.max_vcpus != vcpus) {
        s.push_str(&format!(
            "    {:<12} needs {} MiB, uses {} vCPU{}\n",
            g.name,
            g.min_memory_mib,
            g.max_vcpus,
            plural(g.max_vcpus)
        ));
    }
    s
}

/// "ON THIS HOST": what a probe of /dev/kvm finds, as CHECK_COMMAND/EVENT
/// will report it. See docs/mechanisms.md for how each is served.
fn host_section() -> String {
    let mut s =
        String::from("\nON THIS HOST (what KVMI_VM_CHECK_COMMAND/EVENT report; the rest answer -KVM_EOPNOTSUPP):\n");
    let caps = match ukvmi_vmm::host_capabilities() {
        Ok(c) => c,
        Err(e) => {
            s.push_str(&format!("    cannot probe: {e}\n"));
            return s;
        }
    };
    let short = |n: &'static str| {
        n.trim_start_matches("KVMI_").trim_start_matches("VCPU_EVENT_").trim_start_matches("VM_EVENT_")
    };
    let list = |ids: &mut dyn Iterator<Item = u16>, name: fn(u16) -> Option<&'static str>| -> String {
        ids.filter_map(name).map(short).collect::<Vec<_>>().join(" ")
    };
    let cmds = || msg::VM_COMMANDS.into_iter().chain(msg::VCPU_COMMANDS);
    let evs = || std::iter::once(event::UNHOOK).chain(event::VCPU_EVENTS);
    let rows = [
        ("commands", list(&mut cmds().filter(|id| caps.commands.contains(*id)), msg::name)),
        ("events", list(&mut evs().filter(|id| caps.events.contains(*id)), event::name)),
        (
            "missing",
            list(&mut cmds().filter(|id| !caps.commands.contains(*id)), msg::name)
                + " "
                + &list(&mut evs().filter(|id| !caps.events.contains(*id)), event::name),
        ),
    ];
    for (what, names) in rows {
        s.push_str(&format!("    {what:<9}"));
        let mut col = 13;
        for w in names.split_whitespace() {
            if col + w.len() + 1 > 90 {
                s.push_str("\n             ");
                col = 13;
            }
            s.push(' ');
            s.push_str(w);
            col += w.len() + 1;
        }
        s.push('\n');
    }
    s.push_str(
        "    CR, XSETBV and DESCRIPTOR events (and CONTROL_CR) never work on a stock kernel: KVM\n             \
         has no exit to userspace for them. A ring-3 int3 or single step on a PVM host goes\n             \
         to the guest. HYPERCALL is the port-0x610 doorbell (docs/mechanisms.md).\n",
    );
    s.push_str(
        "    extension UKVMI_VM_MAP_MEMORY (0x4000): guest RAM's memfd passed to the tool (SCM_RIGHTS),\n             \
         read-only unless WRITE_PHYSICAL is allowed too; allowed by default, like every command\n",
    );
    s.push_str(
        "    extension UKVMI_VM_WRITE_PHYSICAL_UNDO (0x4002): WRITE_PHYSICAL whose bytes the VMM puts back\n             \
         when the connection ends (a dead tool leaves no int3); allowed by default\n",
    );
    s.push_str(
        "    extension UKVMI_VM_EVENT_CHANNEL (0x4006): events and their replies through shared memory\n             \
         (one slot per vCPU, futex wake-ups), the socket kept for the rest; v12 only; allowed by default\n",
    );
    s
}
