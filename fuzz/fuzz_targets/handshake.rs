//! The VMM's and the tool's handshake readers on a byte stream
//! (`ukvmi_fuzz::handshake`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ukvmi_fuzz::handshake::check(data));
