//! Any bytes read as a snapshot manifest: refused, or a manifest that passes its own checks,
//! serialises, and parses back to the same value. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mapsnap::storage::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::parse(data, 1 << 16) else {
        return;
    };
    m.validate().expect("a parsed manifest passes its checks");
    assert_eq!(m.sha256_bytes().map(|b| b.len()), Some(32));
    for map in &m.maps {
        if let Some(p) = &map.pin_path {
            assert!(!p.starts_with('/') && !p.split('/').any(|c| c == ".."), "{p:?}");
        }
    }
    let again = Manifest::from_json(&m.to_json()).expect("parse again");
    assert_eq!(again, m);
});
