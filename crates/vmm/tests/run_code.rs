//! In-process VMM tests on /dev/kvm, in the style of kvm-ioctls'
//! `test_run_code`: a VM is built from a few bytes of 64-bit guest code
//! (loaded as a flat `--kernel` image at the guest ABI's load address) and
//! run to its end, and the test asserts on the `Exit` and the serial output.
//! They need /dev/kvm and fail (never skip) without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use ukvmi_guest_abi::layout;
use ukvmi_vmm::{Exit, Failure, FailureCause, FatalExit, Image, SerialSink, Vm, VmConfig};

/// Serial output collected in memory.
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

/// Writes `code` to a file of its own and returns the path.
fn code_file(code: &[u8]) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "ukvmi-vmm-run-code-{}-{}.bin",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&path, code).unwrap();
    path
}

/// A VM of `vcpus` vCPUs running `code`, and its serial output.
fn vm(code: &[u8], vcpus: u16) -> (Vm, Captured) {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests run guest code on KVM and need /dev/kvm, which this host does not have"
    );
    let serial = Captured::default();
    let path = code_file(code);
    let cfg = VmConfig {
        vcpus,
        memory_mib: 16,
        image: Image::Kernel(path.clone()),
        name: "run-code".into(),
        uuid: [0; 16],
        allow_commands: None,
        allow_events: None,
        serial: SerialSink::Writer(Box::new(serial.clone())),
        introspect: None,
        symbols: Vec::new(),
    };
    let vm = Vm::new(cfg, Arc::new(|_: &str| {})).unwrap_or_else(|e| panic!("creating a VM on /dev/kvm: {e}"));
    let _ = std::fs::remove_file(path);
    (vm, serial)
}

/// `mov al, v; out 0xf4, al`: power off with status `v`.
fn power_off(v: u8) -> [u8; 4] {
    [0xb0, v, 0xe6, layout::PORT_POWEROFF as u8]
}

/// `out 0xf4, al; jmp $`: power off with the status in AL.
fn power_off_al() -> [u8; 4] {
    [0xe6, layout::PORT_POWEROFF as u8, 0xeb, 0xfe]
}

#[test]
fn the_power_off_port_ends_the_vm_with_the_guests_status() {
    let mut code = power_off(42).to_vec();
    code.extend([0xeb, 0xfe]); // jmp $
    let (vm, serial) = vm(&code, 1);
    assert_eq!(vm.run(), Exit::PowerOff(42));
    assert!(serial.0.lock().unwrap().is_empty());
}

#[test]
fn serial_output_is_written_a_line_at_a_time() {
    let [lo, hi] = layout::PORT_SERIAL.to_le_bytes();
    let mut code = vec![0x66, 0xba, lo, hi]; // mov dx, PORT_SERIAL
    for b in *b"ok\n" {
        code.extend([0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code.extend(power_off(0));
    let (vm, serial) = vm(&code, 1);
    assert_eq!(vm.run(), Exit::PowerOff(0));
    assert_eq!(serial.0.lock().unwrap().as_slice(), b"ok\n");
}

#[test]
fn the_start_port_starts_a_vcpu_with_its_index_in_rdi() {
    let [lo, hi] = layout::PORT_START_VCPU.to_le_bytes();
    let code = [
        // 0x00: test edi, edi; jnz second (0x11)
        &[0x85, 0xff, 0x75, 0x0d][..],
        // 0x04: mov eax, 1; mov dx, PORT_START_VCPU; out dx, eax
        &[0xb8, 0x01, 0x00, 0x00, 0x00, 0x66, 0xba, lo, hi, 0xef],
        // 0x0e: hlt; jmp 0x0e
        &[0xf4, 0xeb, 0xfd],
        // 0x11, second: mov eax, edi; add al, 100; power off with al
        &[0x89, 0xf8, 0x04, 100],
        &power_off_al(),
    ]
    .concat();
    let (vm, _) = vm(&code, 2);
    assert_eq!(vm.run(), Exit::PowerOff(101));
}

#[test]
fn every_vcpu_is_told_the_vcpu_count_in_rsi() {
    // mov eax, esi; power off with al
    let code = [&[0x89, 0xf0][..], &power_off_al()].concat();
    let (vm, _) = vm(&code, 3);
    assert_eq!(vm.run(), Exit::PowerOff(3));
}

#[test]
fn a_hypercall_with_no_tool_answers_enosys_in_rax() {
    let [lo, hi] = layout::PORT_HYPERCALL.to_le_bytes();
    let code = [
        // mov eax, 34; mov edi, 24; xor esi, esi (KVMI's hypercall convention)
        &[0xb8, layout::HC_KVMI_NR as u8, 0, 0, 0][..],
        &[0xbf, layout::HC_KVMI_SUBFN as u8, 0, 0, 0],
        &[0x31, 0xf6],
        // mov dx, PORT_HYPERCALL; out dx, al
        &[0x66, 0xba, lo, hi, 0xee],
        // power off with the low byte of RAX
        &power_off_al(),
    ]
    .concat();
    let (vm, _) = vm(&code, 1);
    // -1000 (-KVM_ENOSYS) is ...fc18; RAX unchanged would be 34 (0x22).
    assert_eq!(vm.run(), Exit::PowerOff(0x18));
}

#[test]
fn an_int3_without_a_tool_goes_to_the_guest_which_has_no_idt() {
    // No tool: the guest gets its own #BP; the ABI's entry state has no IDT,
    // so that ends in a triple fault, reported with where it happened.
    let (vm, _) = vm(&[0x90, 0xcc, 0xeb, 0xfe], 1);
    match vm.run() {
        Exit::Failed(Failure { vcpu: 0, cause: FailureCause::Fatal { why, rip, code } }) => {
            assert_eq!(why, FatalExit::TripleFault { unmapped_table: None });
            assert!((layout::LOAD_ADDR..layout::LOAD_ADDR + 4).contains(&rip), "rip {rip:#x}");
            let at = usize::try_from(rip - layout::LOAD_ADDR).unwrap();
            assert_eq!(code[..4 - at], [0x90, 0xcc, 0xeb, 0xfe][at..], "the code bytes at rip {rip:#x}");
        }
        other => panic!("expected a triple fault, got {other:?}"),
    }
}

#[test]
fn a_spinning_guest_is_stopped_from_outside() {
    let (vm, _) = vm(&[0xeb, 0xfe], 1);
    let stop = vm.stop_handle();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        stop.stop();
    });
    assert_eq!(vm.run(), Exit::Stopped);
    t.join().unwrap();
}

#[test]
fn a_kernel_that_cannot_be_read_is_a_config_error() {
    let cfg = VmConfig {
        vcpus: 1,
        memory_mib: 16,
        image: Image::Kernel("/nonexistent/ukvmi-kernel".into()),
        name: "missing".into(),
        uuid: [0; 16],
        allow_commands: None,
        allow_events: None,
        serial: SerialSink::Stdout,
        introspect: None,
        symbols: Vec::new(),
    };
    let e = Vm::new(cfg, Arc::new(|_: &str| {})).unwrap_err();
    assert!(e.to_string().starts_with("cannot read kernel /nonexistent/ukvmi-kernel: "), "{e}");
}
