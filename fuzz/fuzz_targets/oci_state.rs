//! Any bytes as the container state a runtime passes the hook on stdin: refused or parsed,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = mapsnap_hook::state::parse(data) {
        let _ = s.pid();
    }
});
