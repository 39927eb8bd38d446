#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sidecar_shim::fuzz_targets::hpack_roundtrip(data));
