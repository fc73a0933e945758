//! The Linux guest OS's BTF offsets on arbitrary bytes (`ukvmi_fuzz::btf`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ukvmi_fuzz::btf::check(data));
