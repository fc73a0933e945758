//! Linux mode on /dev/kvm without a kernel: a synthetic ELF with the PVH
//! note whose 32-bit entry code checks `hvm_start_info` through RBX, talks
//! to the 16550, touches a port no device has, runs `fwait` (which the VMM
//! completes where KVM emulates ring 0) and resets through the i8042.
//! They need /dev/kvm and fail (never skip) without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use ukvmi_vmm::{ConfigError, Error, Exit, HostKind, Image, KernelKind, SerialSink, Vm, VmConfig};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The entry code (32-bit protected mode).
fn entry_code() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.extend([0x8b, 0x03]); // mov eax, [ebx]
    c.extend([0x3d, 0x78, 0xc5, 0x6e, 0x33]); // cmp eax, 0x336ec578 (start_info magic)
    c.extend([0x75, 0x03]); // jne +3
    c.extend([0xb0, b'M', 0xee]); // mov al, 'M'; out dx, al
    c.extend([0xb0, b'\n', 0xee]); // mov al, '\n'; out dx, al
    c.extend([0x66, 0xba, 0xf8, 0x02, 0xec]); // mov dx, 0x2f8; in al, dx (no device)
    c.push(0x9b); // fwait
    c.extend([0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al (i8042 reset)
    c.extend([0xeb, 0xfe]); // jmp $
    c
}

fn config(kernel: std::path::PathBuf, vcpus: u16, serial: Captured) -> VmConfig {
    VmConfig {
        vcpus,
        memory_mib: 32,
        image: Image::Linux { kernel, initrd: None, cmdline: Some("console=ttyS0".into()) },
        name: "linux-mode".into(),
        uuid: [0; 16],
        allow_commands: None,
        allow_events: None,
        serial: SerialSink::Writer(Box::new(serial)),
        introspect: None,
        symbols: Vec::new(),
    }
}

fn kernel_file(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ukvmi-linux-mode-{}-{name}", std::process::id()));
    // `entry_code` in one PT_LOAD at 1 MiB, the PVH entry pointing at it.
    std::fs::write(&p, ukvmi_kimage::testing::pvh_vmlinux(0x10_0000, &entry_code(), 0x10_0000)).unwrap();
    p
}

#[test]
fn the_pvh_entry_gets_start_info_the_serial_port_and_the_reset() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test runs guest code on KVM and needs /dev/kvm, which this host does not have"
    );
    let path = kernel_file("boot");
    assert_eq!(ukvmi_vmm::kernel_kind(&path).unwrap(), KernelKind::LinuxPvh { entry: 0x10_0000 });
    let serial = Captured::default();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = Arc::clone(&lines);
    let vm =
        Vm::new(config(path.clone(), 1, serial.clone()), Arc::new(move |s: &str| l.lock().unwrap().push(s.into())))
            .unwrap_or_else(|e| panic!("creating a VM on /dev/kvm: {e}"));
    let _ = std::fs::remove_file(path);
    assert_eq!(vm.run(), Exit::Reset);
    assert_eq!(serial.0.lock().unwrap().as_slice(), b"M\n", "RBX pointed at hvm_start_info");
    let lines = lines.lock().unwrap();
    let summary = lines.iter().find(|s| s.starts_with("Linux guest: ")).expect("a summary at the end");
    assert!(summary.contains("0 int3s reached the VMM"), "{summary}");
    if HostKind::probe() == HostKind::Pvm {
        assert!(summary.contains("1 instructions completed for KVM's emulator at 1 sites"), "{summary}");
    }
    assert!(lines.iter().any(|s| s.contains("port 0x2f8: no device there")), "{lines:?}");
    if HostKind::probe() == HostKind::Pvm {
        assert!(lines.iter().any(|s| s.contains("completed fwait at 0x100018")), "{lines:?}");
        assert!(lines.iter().any(|s| s.starts_with("PVM host: added `noxsave")), "{lines:?}");
    }
}

#[test]
fn a_linux_guest_is_refused_more_than_one_vcpu() {
    let path = kernel_file("smp");
    let e = Vm::new(config(path.clone(), 2, Captured::default()), Arc::new(|_: &str| {})).unwrap_err();
    let _ = std::fs::remove_file(path);
    assert!(matches!(e, Error::Config(ConfigError::LinuxVcpus { requested: 2 })), "{e}");
}
