//! The plugin's dump and restore logic without CRIU: map fds of this process go through
//! `Dumper::dump_file` into a directory, the maps are closed, and `Restorer` brings them back.
//! Fast checks of dedupe, access modes, inner-map identity and error messages; the real-CRIU
//! tests cover the same through `criu` and `runc`.

mod common;

use std::fs;
use std::os::fd::AsFd;

use mapsnap::model::map_type as T;
use mapsnap::sys::{CreateAttrs, Map, ObjKind};
use mapsnap_criu::images::{self, Access};
use mapsnap_criu::plugin::{DumpOutcome, Dumper, Restorer, restore_options};

fn create(name: &str, map_type: u32, key: u32, value: u32, max: u32) -> Map {
    Map::create(&CreateAttrs {
        map_type,
        name,
        key_size: key,
        value_size: value,
        max_entries: max,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("creating {name}: {e}"))
}

fn get(map: &Map, key: u32) -> Option<u64> {
    let mut v = [0u8; 8];
    map.lookup(Some(&key.to_ne_bytes()), &mut v, 0)
        .expect("lookup")
        .then(|| u64::from_ne_bytes(v))
}

fn saved(outcome: DumpOutcome) -> (images::FileRecord, Option<u64>) {
    match outcome {
        DumpOutcome::Saved { record, stats } => (record, stats.map(|s| s.entries)),
        other => panic!("expected a saved map, got {other:?}"),
    }
}

#[test]
fn dump_and_restore_through_the_plugin_logic() {
    common::require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();

    let counters = create("counters", T::HASH, 4, 8, 16);
    for k in 1..=3u32 {
        counters
            .update(Some(&k.to_ne_bytes()), &u64::from(k * 11).to_ne_bytes(), 0)
            .expect("update");
    }
    let id = counters.info().expect("info").id;
    let ro = Map::from_id_with_flags(id, Access::ReadOnly.bpf_open_flags()).expect("ro");
    let inner = create("inner", T::ARRAY, 4, 8, 2);
    inner
        .update(Some(&1u32.to_ne_bytes()), &77u64.to_ne_bytes(), 0)
        .expect("update");
    let outer = Map::create(&CreateAttrs {
        map_type: T::HASH_OF_MAPS,
        name: "outer",
        key_size: 4,
        value_size: 4,
        max_entries: 4,
        inner_map_fd: Some(inner.fd()),
        ..Default::default()
    })
    .expect("outer");
    let inner_fd = std::os::fd::AsRawFd::as_raw_fd(&inner.fd()) as u32;
    outer
        .update(Some(&5u32.to_ne_bytes()), &inner_fd.to_ne_bytes(), 0)
        .expect("insert inner");
    let ringbuf = create("events", T::RINGBUF, 0, 0, 4096);
    let file = fs::File::open("/proc/self/status").expect("open");

    let mut d = Dumper::default();
    let (r1, e1) = saved(d.dump_file(dir, counters.fd(), 1).expect("dump 1"));
    assert_eq!((r1.map_id, r1.access, e1), (id, Access::ReadWrite, Some(3)));
    let (r2, e2) = saved(d.dump_file(dir, ro.fd(), 2).expect("dump 2"));
    assert_eq!(
        (r2.map_id, r2.access, e2, &r2.snapshot),
        (id, Access::ReadOnly, None, &r1.snapshot),
        "a second fd of the same map is not dumped again"
    );
    // The inner map before its outer map (the order of fds is arbitrary).
    saved(d.dump_file(dir, inner.fd(), 3).expect("dump 3"));
    saved(d.dump_file(dir, outer.fd(), 4).expect("dump 4"));
    match d.dump_file(dir, ringbuf.fd(), 5).expect("dump 5") {
        DumpOutcome::Unsupported { map, reason } => {
            assert!(map.contains("\"events\" (ringbuf)"), "{map}");
            assert!(reason.contains("ring buffer"), "{reason}");
        }
        other => panic!("a ring buffer is not carried: {other:?}"),
    }
    assert!(matches!(
        d.dump_file(dir, file.as_fd(), 6).expect("dump 6"),
        DumpOutcome::NotAMap {
            kind: ObjKind::Other
        }
    ));
    assert_eq!(
        common::files_with_prefix(dir, "mapsnap-map-").len(),
        3,
        "counters, inner, outer"
    );
    assert_eq!(common::files_with_prefix(dir, "mapsnap-fd-").len(), 4);
    drop((counters, ro, inner, outer));

    let r = Restorer::prepare(dir, &restore_options()).expect("prepare");
    assert_eq!(
        r.counts(),
        (4, 2),
        "4 files; counters and outer (inner comes with outer)"
    );
    let open = |file_id| {
        let (fd, _) = r
            .open(file_id)
            .expect("open")
            .unwrap_or_else(|| panic!("file {file_id} is ours"));
        Map::from_fd(fd).expect("map")
    };
    let (rw, ro, inner, outer) = (open(1), open(2), open(3), open(4));
    let new_id = rw.info().expect("info").id;
    assert_ne!(new_id, id, "a new map");
    assert_eq!(
        ro.info().expect("info").id,
        new_id,
        "one map for both files"
    );
    assert_eq!(
        (1..=3).map(|k| get(&ro, k)).collect::<Vec<_>>(),
        vec![Some(11), Some(22), Some(33)]
    );
    let refused = ro.update(Some(&9u32.to_ne_bytes()), &1u64.to_ne_bytes(), 0);
    assert_eq!(refused.err().and_then(|e| e.errno()), Some(libc::EPERM));
    let mut in_outer = [0u8; 4];
    assert!(
        outer
            .lookup(Some(&5u32.to_ne_bytes()), &mut in_outer, 0)
            .expect("lookup")
    );
    assert_eq!(
        u32::from_ne_bytes(in_outer),
        inner.info().expect("info").id,
        "the fd of the inner map gets the map inside the restored outer map"
    );
    assert_eq!(get(&inner, 1), Some(77));
    assert!(r.open(6).expect("open").is_none(), "not our file");

    // A damaged snapshot: the error names the map and says why.
    let snap = dir.join(&r1.snapshot);
    let mut bytes = fs::read(&snap).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&snap, bytes).expect("write");
    let err = Restorer::prepare(dir, &restore_options())
        .expect_err("a damaged snapshot is refused")
        .to_string();
    assert!(
        err.contains(&format!("cannot restore map {id} \"counters\" (hash)"))
            && err.contains(&r1.snapshot),
        "{err}"
    );
}
