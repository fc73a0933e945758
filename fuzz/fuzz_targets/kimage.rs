//! Kernel image reading (`ukvmi-kimage`) on arbitrary bytes
//! (`ukvmi_fuzz::kimage`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ukvmi_fuzz::kimage::check(data));
