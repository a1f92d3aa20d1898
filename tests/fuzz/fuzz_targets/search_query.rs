#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| custodian::fuzzing::search_query(data));
