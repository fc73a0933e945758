//! The endpoint serving KVMI v12 over the conformance fake VM, driven by a
//! byte stream (`ukvmi_fuzz::endpoint`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ukvmi_fuzz::endpoint::run(ukvmi_endpoint::Dialect::V12, data));
