//! The dump index (`mapsnap-criu.json`) as read from an image directory: any bytes must
//! either be refused or give an index that passes its own checks, serialises, and parses
//! back to the same value. Never a panic, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mapsnap_criu::images::DumpIndex;

fuzz_target!(|data: &[u8]| {
    let Ok(index) = DumpIndex::parse(data) else {
        return;
    };
    index.check().expect("a parsed index passes its checks");
    for s in &index.snapshots {
        assert_eq!(s.sha256_bytes().expect("checked sha256").len(), 32);
    }
    for f in &index.files {
        assert!(
            index.snapshot(f.map_id).is_some(),
            "every file has a snapshot"
        );
    }
    let again = serde_json::to_vec(&index).expect("serialise");
    assert_eq!(DumpIndex::parse(&again).expect("parse again"), index);
});
