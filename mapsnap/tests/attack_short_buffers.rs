//! Attack: a caller hands the syscall layer buffers shorter than the map's key or value
//! (e.g. per-CPU values sized without the possible-CPU count). The kernel would copy the bytes
//! past the slice (our heap) into the map, or write past it. Every element and batch call must
//! refuse before the syscall, and the map must be unchanged. Runs on the real kernel as root.
#![allow(clippy::unwrap_used)]

mod common;

use mapsnap::sys::{CreateAttrs, Map, possible_cpus};

fn create(map_type: u32, key: u32, value: u32, max: u32) -> Map {
    common::ensure_bpffs();
    Map::create(&CreateAttrs {
        map_type,
        name: "shortbuf",
        key_size: key,
        value_size: value,
        max_entries: max,
        ..CreateAttrs::default()
    })
    .unwrap()
}

/// Every (key, value) of a map, walked with full-size buffers.
fn contents(m: &Map) -> Vec<(Vec<u8>, Vec<u8>)> {
    let s = m.sizes();
    let mut out = Vec::new();
    let mut cur: Option<Vec<u8>> = None;
    let mut next = vec![0u8; s.key];
    while m.next_key(cur.as_deref(), &mut next).unwrap() {
        let mut v = vec![0u8; s.value];
        if m.lookup(Some(&next), &mut v, 0).unwrap() {
            out.push((next.clone(), v));
        }
        cur = Some(next.clone());
    }
    out
}

fn assert_refused<T: std::fmt::Debug>(r: Result<T, mapsnap::sys::SysError>, what: &str) {
    let e = r.expect_err(what);
    let msg = e.to_string();
    assert!(
        msg.contains("refused before the call") && msg.contains("bytes but the map needs"),
        "{what}: {msg}"
    );
    assert_eq!(e.errno(), None, "{what}: must fail before the syscall");
}

#[test]
fn short_element_buffers_are_refused_and_nothing_is_written() {
    let m = create(1, 8, 32, 64); // HASH, 8-byte keys, 32-byte values
    let k = 7u64.to_ne_bytes();
    m.update(Some(&k), &[0xAA; 32], 0).unwrap();
    let before = contents(&m);
    assert_eq!(before.len(), 1);

    // The attack: a 4-byte key / 16-byte value where the kernel reads 8 / 32.
    assert_refused(m.update(Some(&[1, 2, 3, 4]), &[0xBB; 32], 0), "short key");
    assert_refused(m.update(Some(&k), &[0xBB; 16], 0), "short value");
    assert_refused(m.update(Some(&9u64.to_ne_bytes()), &[], 0), "empty value");
    let mut small = [0u8; 31];
    assert_refused(m.lookup(Some(&k), &mut small, 0), "short lookup value");
    assert_refused(
        m.lookup(Some(&k[..7]), &mut [0u8; 32], 0),
        "short lookup key",
    );
    assert_refused(
        m.lookup_and_delete(Some(&k[..1]), &mut [0u8; 32]),
        "short lookup_and_delete key",
    );
    assert_refused(m.delete(&k[..4]), "short delete key");
    assert_refused(m.next_key(None, &mut [0u8; 4]), "short next key");
    assert_refused(m.next_key(Some(&k[..3]), &mut [0u8; 8]), "short cursor key");
    assert_eq!(contents(&m), before, "the map changed");
}

#[test]
fn short_batch_buffers_are_refused_and_nothing_is_written() {
    let m = create(1, 4, 16, 64);
    m.update(Some(&1u32.to_ne_bytes()), &[1; 16], 0).unwrap();
    let before = contents(&m);
    // 4 entries claimed, keys for 4 but values for 3.
    let keys: Vec<u8> = (10u32..14).flat_map(|i| i.to_ne_bytes()).collect();
    let r = m.update_batch(&keys, &[2u8; 48], 4, 0);
    let (done, e) = r.expect_err("short batch values");
    assert_eq!(done, 0);
    assert!(e.to_string().contains("refused before the call"), "{e}");
    let r = m.update_batch(&keys[..12], &[2u8; 64], 4, 0);
    assert!(r.is_err(), "short batch keys");
    // A count that overflows usize arithmetic is refused, not wrapped.
    assert!(m.update_batch(&keys, &[2u8; 64], u32::MAX, 0).is_err());
    assert_eq!(contents(&m), before, "the map changed");

    // Lookup batch: out buffers for 2 entries, asking for 8.
    let mut out = [0u8; 4];
    let (mut k, mut v) = (vec![0u8; 8], vec![0u8; 32]);
    assert_refused(
        m.lookup_batch(None, &mut out, &mut k, &mut v, 8),
        "short lookup_batch keys",
    );
    let mut tiny_cursor = [0u8; 2];
    let (mut k, mut v) = (vec![0u8; 32], vec![0u8; 128]);
    assert_refused(
        m.lookup_batch(None, &mut tiny_cursor, &mut k, &mut v, 8),
        "short cursor",
    );
    // Right sizes work, and read back exactly what is there.
    let r = m.lookup_batch(None, &mut out, &mut k, &mut v, 8).unwrap();
    assert_eq!(r.count, 1);
    assert_eq!(&v[..16], &[1u8; 16]);
}

#[test]
fn per_cpu_values_need_every_possible_cpu() {
    let cpus = possible_cpus().unwrap() as usize;
    let m = create(6, 4, 12, 4); // PERCPU_ARRAY, value_size 12 -> 16-byte slots
    assert_eq!(m.sizes().value, 16 * cpus);
    let full: Vec<u8> = (0..16 * cpus).map(|i| i as u8).collect();
    m.update(Some(&0u32.to_ne_bytes()), &full, 0).unwrap();
    let before = contents(&m);
    // value_size bytes only (the per-CPU layout forgotten): the kernel would read 16*cpus.
    assert_refused(
        m.update(Some(&1u32.to_ne_bytes()), &[0xCC; 12], 0),
        "per-CPU value without CPUs",
    );
    assert_refused(
        m.update(Some(&1u32.to_ne_bytes()), &full[..16 * cpus - 1], 0),
        "per-CPU value one byte short",
    );
    let mut one_slot = vec![0u8; 16];
    if cpus > 1 {
        assert_refused(
            m.lookup(Some(&0u32.to_ne_bytes()), &mut one_slot, 0),
            "per-CPU lookup into one slot",
        );
    }
    assert_eq!(contents(&m), before);
    assert_eq!(before[1].1, vec![0u8; 16 * cpus], "slot 1 still zero");
}

#[test]
fn map_in_map_values_are_four_bytes() {
    let inner = create(2, 4, 8, 4);
    let outer = Map::create(&CreateAttrs {
        map_type: 12, // ARRAY_OF_MAPS
        name: "outer",
        key_size: 4,
        value_size: 4,
        max_entries: 2,
        inner_map_fd: Some(inner.fd()),
        ..CreateAttrs::default()
    })
    .unwrap();
    assert_eq!(outer.sizes().value, 4);
    assert_refused(
        outer.update(Some(&0u32.to_ne_bytes()), &[0, 0], 0),
        "2-byte fd",
    );
    let mut id = [0u8; 4];
    assert!(!outer.lookup(Some(&0u32.to_ne_bytes()), &mut id, 0).unwrap());
}
