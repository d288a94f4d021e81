//! Any bytes given to the snapshot verifier and the streaming reader, with small limits:
//! refused with an error or read consistently, never a panic, and memory bounded by the
//! limits whatever the headers claim. When the reader reaches the end, the verifier must
//! agree on the digest and the maps.
//!
//! Random mutations almost never keep a section's CRC32C (or the trailer's SHA-256) right,
//! which would stop every input at the first checksum. So each input is also read after its
//! checksums are recomputed, which lets mutations reach the structural checks, the JSON, the
//! limits and the entry decoding behind them.
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

/// `data` with every section CRC and the trailer's SHA-256 recomputed (a section header's
/// lengths are taken as they are; the walk stops where a section runs past the end).
fn fix_checksums(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut out = data.to_vec();
    let mut off = 16;
    while off + 16 <= out.len() {
        let kind = u16::from_le_bytes([out[off], out[off + 1]]);
        let stored = u32::from_le_bytes(out[off + 4..off + 8].try_into().unwrap_or_default());
        let end = off + 16 + stored as usize;
        if end > out.len() {
            break;
        }
        if kind == 0xFFFF && stored == 32 {
            let sha: [u8; 32] = sha2::Sha256::digest(&out[..off]).into();
            out[off + 16..end].copy_from_slice(&sha);
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[off..off + 12]), &out[off + 16..end]);
        out[off + 12..off + 16].copy_from_slice(&crc.to_le_bytes());
        off = end;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&fix_checksums(data));
});

fn check(data: &[u8]) {
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
}
