//! The endpoint serving kvmi-v7 over the conformance fake VM, driven by a
//! byte stream (`ukvmi_fuzz::endpoint`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ukvmi_fuzz::endpoint::run(ukvmi_endpoint::Dialect::V7, data));
