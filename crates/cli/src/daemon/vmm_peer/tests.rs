//! Unit tests of the record of the VM served and of the change notice.

use super::*;

fn vm(uuid: &str, pid: i32, command: &str) -> ServedVm {
    ServedVm { name: "demo".into(), uuid: uuid.into(), vmm: Some(VmmPeer { pid, command: command.into() }) }
}

#[test]
fn the_record_keeps_the_vm_and_the_program_but_not_its_arguments() {
    let served = vm("00ff", 42, "/usr/bin/ukvmi run --guest demo --introspect unix:vm.sock");
    let record = served.to_record();
    assert!(!record.contains("--guest"), "{record}");
    let back = ServedVm::from_record(&record).unwrap();
    assert_eq!(back, vm("00ff", 42, "ukvmi"));
    assert_eq!(ServedVm::from_record("garbage\n"), None, "no uuid, no record");
    assert_eq!(ServedVm::from_record(""), None);
}

#[test]
fn only_a_different_uuid_is_announced() {
    let before = vm("aa", 1, "ukvmi");
    assert_eq!(change_notice(None, &before, "vm.sock"), None);
    assert_eq!(change_notice(Some(&before), &vm("aa", 2, "ukvmi run"), "vm.sock"), None, "the same VM, reconnected");
    let n = change_notice(Some(&before), &vm("bb", 3, "ukvmi run"), "vm.sock").unwrap();
    assert!(n.contains("vm.sock is now served by another VM: `demo` (uuid bb, VMM pid 3: ukvmi run)"), "{n}");
    assert!(n.contains("before, it was `demo` (uuid aa, VMM pid 1: ukvmi)"), "{n}");
}
