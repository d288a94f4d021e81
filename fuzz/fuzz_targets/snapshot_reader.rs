//! Any bytes given to the snapshot verifier and the streaming reader, with small limits:
//! refused with an error or read consistently, never a panic, and memory bounded by the
//! limits whatever the headers claim. When the reader reaches the end, the verifier must
//! agree on the digest and the maps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mapsnap::format::{Event, SnapshotReader, verify_with_limits};
use mapsnap::limits::Limits;

const LIMITS: Limits = Limits {
    max_maps: 64,
    max_btf_blob: 1 << 20,
    max_btf_total: 2 << 20,
    max_kernel_memory: 64 << 20,
    max_nesting: 1,
    max_section: 1 << 20,
    max_manifest: 1 << 16,
    max_file: 16 << 20,
};

fuzz_target!(|data: &[u8]| {
    let verified = verify_with_limits(data, &LIMITS);
    let Ok(mut r) = SnapshotReader::with_limits(data, &LIMITS) else {
        assert!(verified.is_err(), "verify accepted what the reader refused at its header");
        return;
    };
    let mut maps = 0usize;
    let mut entries = 0u64;
    loop {
        match r.next_event() {
            Ok(Some(Event::MapBegin { .. })) => maps += 1,
            Ok(Some(Event::Entries(chunk))) => {
                assert_eq!(chunk.keys.len(), chunk.count * chunk.key_len());
                assert_eq!(chunk.values.len(), chunk.count * chunk.value_len());
                assert_eq!(chunk.iter().count(), chunk.count);
                entries += chunk.count as u64;
                r.recycle(chunk);
            }
            Ok(Some(Event::End(digest))) => {
                let v = verified.expect("the reader reached the end, verify must too");
                assert_eq!(v.digest, digest);
                assert_eq!(v.maps.len(), maps);
                assert_eq!(v.maps.iter().map(|(_, n)| n).sum::<u64>(), entries);
                assert!(maps <= LIMITS.max_maps as usize);
                break;
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                // After an error every further call fails too.
                assert!(r.next_event().is_err());
                break;
            }
        }
    }
});
