//! Both dialects' message decoding in ukvmi-wire on arbitrary bytes
//! (`ukvmi_fuzz::wire`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ukvmi_fuzz::wire::check(data));
