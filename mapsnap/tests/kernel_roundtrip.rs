//! Real-kernel round trips: maps of every supported type, filled with data, dumped,
//! destroyed, restored, and compared entry by entry and field by field.
//!
//! Runs as root with bpffs (mounted by the helpers when missing).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mapsnap::discover::{self, Source};
use mapsnap::dump::{self, DumpOptions};
use mapsnap::format::{self, WriterOptions};
use mapsnap::model::{SnapshotInfo, map_flags, map_type as mt, round_up8};
use mapsnap::progress::NoProgress;
use mapsnap::restore::{self, CpuPolicy, Destination, FillMode, IntoTarget, RestoreOptions};
use mapsnap::sys::{CreateAttrs, Map, possible_cpus};

/// Deterministic bytes for entry `i` of a map seeded `seed`.
fn bytes(len: usize, seed: u32, i: u32) -> Vec<u8> {
    (0..len)
        .map(|j| (seed.wrapping_mul(31) ^ i.wrapping_mul(131) ^ (j as u32).wrapping_mul(7)) as u8)
        .collect()
}

/// What a test map should contain after restore.
#[derive(Debug, Clone)]
enum Expect {
    /// Keyed entries (key -> full value bytes as the kernel returns them).
    Keyed(BTreeMap<Vec<u8>, Vec<u8>>),
    /// Queue/stack values in pop order.
    Popped(Vec<Vec<u8>>),
    /// Map of maps: outer key -> the inner map's entries.
    Outer(BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>>),
}

struct TestMap {
    name: String,
    expect: Expect,
}

fn create(name: &str, t: u32, k: u32, v: u32, max: u32, flags: u32, inner: Option<&Map>) -> Map {
    Map::create(&CreateAttrs {
        map_type: t,
        name,
        key_size: k,
        value_size: v,
        max_entries: max,
        flags,
        inner_map_fd: inner.map(|m| m.fd()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("creating {name}: {e}"))
}

fn pin(map: &Map, dir: &Path, name: &str) {
    map.pin(&dir.join(name))
        .unwrap_or_else(|e| panic!("pinning {name}: {e}"));
}

fn fill_keyed(map: &Map, n: u32, kl: usize, vl: usize, seed: u32) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut m = BTreeMap::new();
    for i in 0..n {
        let mut key = bytes(kl, seed, i);
        key[..4].copy_from_slice(&i.to_ne_bytes());
        let value = bytes(vl, seed + 1, i);
        map.update(Some(&key), &value, 0).expect("update");
        m.insert(key, value);
    }
    m
}

fn array_expect(
    map_len: u32,
    vl: usize,
    filled: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> BTreeMap<Vec<u8>, Vec<u8>> {
    (0..map_len)
        .map(|i| {
            let k = i.to_ne_bytes().to_vec();
            let v = filled.get(&k).cloned().unwrap_or_else(|| vec![0; vl]);
            (k, v)
        })
        .collect()
}

/// Creates, pins and fills one map of every supported type (plus a frozen one and the
/// BTF-typed maps of the clang-compiled object, spin lock included) under `dir`.
fn populate(dir: &Path) -> (Vec<TestMap>, aya::Ebpf) {
    let cpus = possible_cpus().expect("possible cpus") as usize;
    let mut out = Vec::new();
    let mut keyed =
        |name: &str, t: u32, k: u32, v: u32, max: u32, flags: u32, n: u32, vl: usize| {
            let m = create(name, t, k, v, max, flags, None);
            let filled = fill_keyed(&m, n, k as usize, vl, max + v);
            pin(&m, dir, name);
            let expect = if matches!(t, mt::ARRAY | mt::PERCPU_ARRAY) {
                array_expect(max, vl, &filled)
            } else {
                filled
            };
            out.push(TestMap {
                name: name.into(),
                expect: Expect::Keyed(expect),
            });
        };
    let pcpu = |v: u32| round_up8(v) as usize * cpus;
    keyed("hash", mt::HASH, 8, 64, 4096, 0, 3000, 64);
    keyed(
        "hash_noprealloc",
        mt::HASH,
        4,
        12,
        256,
        map_flags::NO_PREALLOC,
        100,
        12,
    );
    keyed("lru", mt::LRU_HASH, 4, 16, 512, 0, 200, 16);
    keyed("pcpu_hash", mt::PERCPU_HASH, 4, 12, 256, 0, 100, pcpu(12));
    keyed("lru_pcpu", mt::LRU_PERCPU_HASH, 4, 8, 256, 0, 50, pcpu(8));
    keyed("array", mt::ARRAY, 4, 24, 100, 0, 60, 24);
    keyed(
        "array_mmap",
        mt::ARRAY,
        4,
        8,
        64,
        map_flags::MMAPABLE,
        64,
        8,
    );
    keyed("pcpu_array", mt::PERCPU_ARRAY, 4, 16, 32, 0, 20, pcpu(16));

    // An LPM trie with canonical prefixes (a lookup is a longest-prefix match).
    let trie = create(
        "trie",
        mt::LPM_TRIE,
        8,
        8,
        256,
        map_flags::NO_PREALLOC,
        None,
    );
    let mut t = BTreeMap::new();
    for i in 0..40u32 {
        let (plen, addr) = if i % 4 == 0 {
            (16u32, [10, i as u8, 0, 0])
        } else {
            (24, [10, (i / 4) as u8, i as u8, 0])
        };
        let mut key = plen.to_ne_bytes().to_vec();
        key.extend_from_slice(&addr);
        let value = bytes(8, 77, i);
        trie.update(Some(&key), &value, 0).expect("trie update");
        t.insert(key, value);
    }
    pin(&trie, dir, "trie");
    out.push(TestMap {
        name: "trie".into(),
        expect: Expect::Keyed(t),
    });

    // Maps of maps, each inner map with data of its own.
    for (name, t) in [
        ("outer_hash", mt::HASH_OF_MAPS),
        ("outer_arr", mt::ARRAY_OF_MAPS),
    ] {
        let template = create("tmpl", mt::ARRAY, 4, 8, 4, 0, None);
        let outer = create(name, t, 4, 4, 8, 0, Some(&template));
        let mut e = BTreeMap::new();
        for i in 0..3u32 {
            let inner = create("inner", mt::ARRAY, 4, 8, 4, 0, None);
            let filled = fill_keyed(&inner, 4, 4, 8, 500 + i);
            let key = (i * 2).to_ne_bytes().to_vec();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&inner.fd()) as u32;
            outer
                .update(Some(&key), &fd.to_ne_bytes(), 0)
                .expect("outer update");
            e.insert(key, filled);
        }
        pin(&outer, dir, name);
        out.push(TestMap {
            name: name.into(),
            expect: Expect::Outer(e),
        });
    }

    // Queue and stack.
    for (name, t) in [("queue", mt::QUEUE), ("stack", mt::STACK)] {
        let q = create(name, t, 0, 16, 64, 0, None);
        let pushed: Vec<Vec<u8>> = (0..20).map(|i| bytes(16, 900, i)).collect();
        for v in &pushed {
            q.update(None, v, 0).expect("push");
        }
        let popped = if t == mt::STACK {
            pushed.iter().rev().cloned().collect()
        } else {
            pushed
        };
        pin(&q, dir, name);
        out.push(TestMap {
            name: name.into(),
            expect: Expect::Popped(popped),
        });
    }

    // Redirect maps pointing at the loopback device and CPU 0.
    let lo = 1u32.to_ne_bytes().to_vec();
    let devmap = create("devmap", mt::DEVMAP, 4, 4, 8, 0, None);
    devmap
        .update(Some(&2u32.to_ne_bytes()), &lo, 0)
        .expect("devmap update");
    pin(&devmap, dir, "devmap");
    out.push(TestMap {
        name: "devmap".into(),
        expect: Expect::Keyed([(2u32.to_ne_bytes().to_vec(), lo.clone())].into()),
    });
    let devhash = create("devhash", mt::DEVMAP_HASH, 4, 4, 8, 0, None);
    devhash
        .update(Some(&77u32.to_ne_bytes()), &lo, 0)
        .expect("devmap_hash update");
    pin(&devhash, dir, "devhash");
    out.push(TestMap {
        name: "devhash".into(),
        expect: Expect::Keyed([(77u32.to_ne_bytes().to_vec(), lo.clone())].into()),
    });
    let cpumap = create("cpumap", mt::CPUMAP, 4, 4, cpus as u32, 0, None);
    let qsize = 192u32.to_ne_bytes().to_vec();
    cpumap
        .update(Some(&0u32.to_ne_bytes()), &qsize, 0)
        .expect("cpumap update");
    pin(&cpumap, dir, "cpumap");
    out.push(TestMap {
        name: "cpumap".into(),
        expect: Expect::Keyed([(0u32.to_ne_bytes().to_vec(), qsize)].into()),
    });

    // A frozen map.
    let frozen = create("frozen", mt::ARRAY, 4, 8, 4, 0, None);
    let f = fill_keyed(&frozen, 4, 4, 8, 31);
    frozen.freeze().expect("freeze");
    pin(&frozen, dir, "frozen");
    out.push(TestMap {
        name: "frozen".into(),
        expect: Expect::Keyed(f),
    });

    // BTF-typed maps from the clang-compiled object, pinned by name in a subdirectory.
    let sub = dir.join("obj");
    std::fs::create_dir_all(&sub).expect("mkdir obj");
    let ebpf = common::load_test_object(&sub);
    let flows = Map::from_pin(&sub.join("flows")).expect("flows");
    let e = fill_keyed(&flows, 500, 16, 40, 1);
    out.push(TestMap {
        name: "obj/flows".into(),
        expect: Expect::Keyed(e),
    });
    let locked = Map::from_pin(&sub.join("locked")).expect("locked");
    let mut e = BTreeMap::new();
    for i in 0..10u32 {
        // The spin lock's 4 bytes read back as zero whatever is written there.
        let mut v = bytes(24, 5, i);
        v[..4].fill(0);
        locked
            .update(Some(&i.to_ne_bytes()), &v, 0)
            .expect("locked update");
        e.insert(i.to_ne_bytes().to_vec(), v);
    }
    out.push(TestMap {
        name: "obj/locked".into(),
        expect: Expect::Keyed(e),
    });
    // The object's maps of maps start empty; give each one inner map of its declared shape
    // (array, u32 -> u64, 4 entries) so the snapshot learns the template.
    for name in ["outer_hash", "outer_arr"] {
        let outer = Map::from_pin(&sub.join(name)).expect(name);
        let inner = create("obj_inner", mt::ARRAY, 4, 8, 4, 0, None);
        let filled = fill_keyed(&inner, 4, 4, 8, 70);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&inner.fd()) as u32;
        outer
            .update(Some(&1u32.to_ne_bytes()), &fd.to_ne_bytes(), 0)
            .expect("outer update");
        out.push(TestMap {
            name: format!("obj/{name}"),
            expect: Expect::Outer([(1u32.to_ne_bytes().to_vec(), filled)].into()),
        });
    }
    let pcpu_obj = Map::from_pin(&sub.join("pcpu")).expect("pcpu");
    let e = fill_keyed(&pcpu_obj, 10, 4, pcpu(16), 9);
    out.push(TestMap {
        name: "obj/pcpu".into(),
        expect: Expect::Keyed(e),
    });
    (out, ebpf)
}

/// Reads a keyed map element by element (not through the dump path) as key -> value.
fn read_keyed(map: &Map) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let info = map.info().expect("info");
    let cpus = possible_cpus().expect("cpus") as usize;
    let vl = match info.map_type {
        mt::PERCPU_HASH | mt::LRU_PERCPU_HASH | mt::PERCPU_ARRAY => {
            round_up8(info.value_size) as usize * cpus
        }
        _ => info.value_size as usize,
    };
    let kl = info.key_size as usize;
    let mut out = BTreeMap::new();
    let (mut cur, mut next) = (vec![0u8; kl], vec![0u8; kl]);
    let mut have = false;
    while map
        .next_key(have.then_some(cur.as_slice()), &mut next)
        .expect("next_key")
    {
        let mut v = vec![0u8; vl];
        if map.lookup(Some(&next), &mut v, 0).expect("lookup") {
            out.insert(next.clone(), v);
        }
        std::mem::swap(&mut cur, &mut next);
        have = true;
    }
    out
}

fn check_contents(map: &Map, expect: &Expect, name: &str) {
    match expect {
        Expect::Keyed(e) => assert_eq!(&read_keyed(map), e, "contents of {name}"),
        Expect::Popped(e) => {
            let vl = map.info().expect("info").value_size as usize;
            let mut got = Vec::new();
            let mut v = vec![0u8; vl];
            while map.lookup_and_delete(None, &mut v).expect("pop") {
                got.push(v.clone());
            }
            assert_eq!(&got, e, "pop order of {name}");
        }
        Expect::Outer(e) => {
            let mut got = BTreeMap::new();
            for (k, _) in read_keyed(map) {
                let mut id = [0u8; 4];
                assert!(map.lookup(Some(&k), &mut id, 0).expect("lookup outer"));
                let inner = Map::from_id(u32::from_ne_bytes(id)).expect("inner by id");
                got.insert(k, read_keyed(&inner));
            }
            assert_eq!(&got, e, "inner maps of {name}");
        }
    }
}

fn snapshot_info() -> SnapshotInfo {
    SnapshotInfo {
        tool: "test".into(),
        possible_cpus: possible_cpus().expect("cpus"),
        ..Default::default()
    }
}

fn dump_dir(dir: &Path) -> Vec<u8> {
    let found = discover::find(&[Source::Pin(dir.to_path_buf())]).expect("discover");
    let opts = DumpOptions {
        writer: WriterOptions {
            chunk_bytes: 4096,
            ..WriterOptions::default()
        },
        ..Default::default()
    };
    let (buf, _) =
        dump::dump(&found, Vec::new(), &snapshot_info(), &opts, &NoProgress).expect("dump");
    buf
}

#[test]
fn every_supported_type_round_trips_through_destroy_and_restore() {
    let src = common::fresh_pin_dir("rt-src");
    let (maps, ebpf) = populate(&src);
    // Metadata of the originals, keyed by relative pin path.
    let before: BTreeMap<String, (mapsnap::sys::MapInfo, bool)> =
        discover::find(&[Source::Pin(src.to_path_buf())])
            .expect("discover")
            .into_iter()
            .map(|f| (f.pin_rel.clone().expect("pin"), (f.info.clone(), f.frozen)))
            .collect();
    for tm in &maps {
        assert!(
            before.contains_key(&tm.name),
            "{} found under the pin dir: {:?}",
            tm.name,
            before.keys()
        );
    }
    let snap = dump_dir(&src);

    // Destroy the originals: drop every handle and pin.
    drop(ebpf);
    let src_path: PathBuf = src.to_path_buf();
    drop(src);
    assert!(!src_path.exists());

    let summary = format::verify(snap.as_slice()).expect("verify");
    let dst = common::fresh_pin_dir("rt-dst");
    let report = restore::restore(
        snap.as_slice(),
        Some(&summary),
        &Destination::PinRoot {
            dir: dst.to_path_buf(),
            overwrite: false,
        },
        &RestoreOptions::default(),
        &NoProgress,
    )
    .expect("restore");
    // Every top-level map of the source comes back, the object's unfilled ones included.
    assert_eq!(report.maps.len(), before.len());
    for name in before.keys() {
        assert!(dst.join(name).exists(), "{name} restored");
    }

    for tm in &maps {
        let path = dst.join(&tm.name);
        let map = Map::from_pin(&path).unwrap_or_else(|e| panic!("{} not restored: {e}", tm.name));
        let info = map.info().expect("info");
        let (orig, frozen) = &before[&tm.name];
        assert_eq!(info.map_type, orig.map_type, "{}: type", tm.name);
        assert_eq!(info.name, orig.name, "{}: name", tm.name);
        assert_eq!(info.key_size, orig.key_size, "{}: key size", tm.name);
        assert_eq!(info.value_size, orig.value_size, "{}: value size", tm.name);
        assert_eq!(
            info.max_entries, orig.max_entries,
            "{}: max entries",
            tm.name
        );
        assert_eq!(info.flags, orig.flags, "{}: flags", tm.name);
        assert_eq!(info.map_extra, orig.map_extra, "{}: map_extra", tm.name);
        assert_eq!(
            map.frozen().expect("frozen"),
            *frozen,
            "{}: frozen",
            tm.name
        );
        assert_eq!(info.btf_id != 0, orig.btf_id != 0, "{}: has BTF", tm.name);
        assert_eq!(
            info.btf_key_type_id, orig.btf_key_type_id,
            "{}: BTF key type",
            tm.name
        );
        assert_eq!(
            info.btf_value_type_id, orig.btf_value_type_id,
            "{}: BTF value type",
            tm.name
        );
        check_contents(&map, &tm.expect, &tm.name);
    }
    // The BTF of the object maps is the object's own: the spin-lock map proves it was used.
    assert!(before["obj/locked"].0.btf_id != 0);
}

#[test]
fn queue_and_stack_keep_their_values_after_a_dump() {
    let dir = common::fresh_pin_dir("queue-keep");
    let q = create("q", mt::QUEUE, 0, 8, 16, 0, None);
    let s = create("s", mt::STACK, 0, 8, 16, 0, None);
    for i in 0..5u64 {
        q.update(None, &i.to_ne_bytes(), 0).expect("push");
        s.update(None, &i.to_ne_bytes(), 0).expect("push");
    }
    pin(&q, &dir, "q");
    pin(&s, &dir, "s");
    let _ = dump_dir(&dir);
    let pops = |m: &Map| {
        let mut v = [0u8; 8];
        let mut got = Vec::new();
        while m.lookup_and_delete(None, &mut v).expect("pop") {
            got.push(u64::from_ne_bytes(v));
        }
        got
    };
    assert_eq!(pops(&q), vec![0, 1, 2, 3, 4]);
    assert_eq!(pops(&s), vec![4, 3, 2, 1, 0]);
}

/// A small snapshot of one hash map pinned as `counters` under a fresh dir.
fn one_map_snapshot(name: &str, n: u32) -> (common::PinDir, Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>) {
    let dir = common::fresh_pin_dir(name);
    let m = create("counters", mt::HASH, 4, 8, 1024, 0, None);
    let e = fill_keyed(&m, n, 4, 8, 3);
    pin(&m, &dir, "counters");
    let snap = dump_dir(&dir);
    (dir, snap, e)
}

fn restore_into_root(
    snap: &[u8],
    dir: &Path,
    overwrite: bool,
) -> mapsnap::Result<restore::RestoreReport> {
    restore_into_root_with(snap, dir, overwrite, &RestoreOptions::default())
}

fn restore_into_root_with(
    snap: &[u8],
    dir: &Path,
    overwrite: bool,
    opts: &RestoreOptions,
) -> mapsnap::Result<restore::RestoreReport> {
    let summary = format::verify(snap)?;
    restore::restore(
        snap,
        Some(&summary),
        &Destination::PinRoot {
            dir: dir.to_path_buf(),
            overwrite,
        },
        opts,
        &NoProgress,
    )
}

#[test]
fn corrupt_truncated_and_wrong_version_snapshots_leave_pins_untouched() {
    let (dir, snap, original) = one_map_snapshot("bad-input", 300);
    // The target already holds a different map at the same pin path.
    let target = common::fresh_pin_dir("bad-input-target");
    let existing = create("counters", mt::HASH, 4, 8, 1024, 0, None);
    let kept = fill_keyed(&existing, 7, 4, 8, 99);
    pin(&existing, &target, "counters");
    let id_before = existing.info().expect("info").id;

    let mut corrupt = snap.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    let truncated = snap[..snap.len() - 10].to_vec();
    let mut wrong_version = snap.clone();
    wrong_version[8] = 9;
    for (what, bad) in [
        ("corrupt", &corrupt),
        ("truncated", &truncated),
        ("wrong version", &wrong_version),
    ] {
        let err = restore_into_root(bad, &target, true).expect_err(what);
        let msg = err.to_string();
        assert!(matches!(err, mapsnap::Error::Format(_)), "{what}: {msg}");
        let after = Map::from_pin(&target.join("counters")).expect("still pinned");
        assert_eq!(
            after.info().expect("info").id,
            id_before,
            "{what}: pin replaced"
        );
        assert_eq!(read_keyed(&after), kept, "{what}: contents changed");
        let names: Vec<_> = std::fs::read_dir(&*target)
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{what}: stray pins {names:?}");
    }
    assert!(
        restore_into_root(&corrupt, &target, true)
            .expect_err("corrupt")
            .to_string()
            .contains("corrupt")
    );
    assert!(
        restore_into_root(&truncated, &target, true)
            .expect_err("trunc")
            .to_string()
            .contains("truncated")
    );
    assert!(
        restore_into_root(&wrong_version, &target, true)
            .expect_err("ver")
            .to_string()
            .contains("version 9")
    );

    // Without --overwrite an existing pin is refused by name; with it, replaced atomically.
    let err = restore_into_root(&snap, &target, false).expect_err("exists");
    assert!(matches!(err, mapsnap::Error::PinExists { .. }), "{err}");
    restore_into_root(&snap, &target, true).expect("overwrite");
    let replaced = Map::from_pin(&target.join("counters")).expect("pinned");
    assert_ne!(replaced.info().expect("info").id, id_before);
    assert_eq!(read_keyed(&replaced), original);
    drop(dir);
}

#[test]
fn fill_existing_maps_replace_merge_and_refuse_incompatible() {
    let (_dir, snap, original) = one_map_snapshot("into", 50);
    let summary = format::verify(snap.as_slice()).expect("verify");
    let target_dir = common::fresh_pin_dir("into-target");
    let target = create("counters", mt::HASH, 4, 8, 1024, 0, None);
    pin(&target, &target_dir, "counters");
    let extra_key = 5000u32.to_ne_bytes().to_vec();
    let extra_val = vec![1u8; 8];
    let run = |mode: FillMode| {
        restore::restore(
            snap.as_slice(),
            Some(&summary),
            &Destination::IntoRoot(target_dir.to_path_buf()),
            &RestoreOptions {
                mode,
                cpu_policy: CpuPolicy::Error,
                ..RestoreOptions::default()
            },
            &NoProgress,
        )
    };
    target
        .update(Some(&extra_key), &extra_val, 0)
        .expect("update");
    run(FillMode::Merge).expect("merge");
    let mut merged = original.clone();
    merged.insert(extra_key.clone(), extra_val.clone());
    assert_eq!(read_keyed(&target), merged, "merge keeps existing entries");
    run(FillMode::Replace).expect("replace");
    assert_eq!(
        read_keyed(&target),
        original,
        "replace leaves exactly the snapshot"
    );

    // Incompatible targets are refused before anything is written.
    let small = create("small", mt::HASH, 4, 16, 1024, 0, None);
    small
        .update(Some(&extra_key), &[2u8; 16], 0)
        .expect("update");
    let err = restore::restore(
        snap.as_slice(),
        Some(&summary),
        &Destination::Into(vec![IntoTarget {
            select: None,
            map: small.try_clone().expect("clone"),
        }]),
        &RestoreOptions::default(),
        &NoProgress,
    )
    .expect_err("incompatible");
    assert!(err.to_string().contains("key/value sizes"), "{err}");
    assert_eq!(read_keyed(&small).len(), 1, "incompatible target untouched");
}

#[test]
fn unsupported_types_are_named_or_skipped() {
    let dir = common::fresh_pin_dir("unsupported");
    let rb = create("events", mt::RINGBUF, 0, 0, 4096, 0, None);
    pin(&rb, &dir, "events");
    let h = create("kept", mt::HASH, 4, 4, 8, 0, None);
    h.update(Some(&1u32.to_ne_bytes()), &2u32.to_ne_bytes(), 0)
        .expect("update");
    pin(&h, &dir, "kept");
    let found = discover::find(&[Source::Pin(dir.to_path_buf())]).expect("discover");
    let err = dump::dump(
        &found,
        Vec::new(),
        &snapshot_info(),
        &DumpOptions::default(),
        &NoProgress,
    )
    .expect_err("ringbuf refused");
    let msg = err.to_string();
    assert!(
        msg.contains("ringbuf") && msg.contains("events") && msg.contains("--skip-unsupported"),
        "{msg}"
    );
    let opts = DumpOptions {
        skip_unsupported: true,
        ..Default::default()
    };
    let (buf, report) =
        dump::dump(&found, Vec::new(), &snapshot_info(), &opts, &NoProgress).expect("skip");
    assert_eq!(report.skipped.len(), 1);
    let names: BTreeSet<_> = format::verify(buf.as_slice())
        .expect("verify")
        .maps
        .into_iter()
        .map(|(m, n)| (m.name, n))
        .collect();
    assert_eq!(names, [("kept".to_string(), 1)].into());
}

/// Splitting a map between reader threads returns every entry exactly once, whatever the
/// thread count and batch size (small batches make every range end inside a batch).
#[test]
fn parallel_reads_return_every_entry_once() {
    for (t, max, n) in [
        (mt::HASH, 40_000u32, 30_000u32),
        (mt::PERCPU_HASH, 33_000, 20_000),
        (mt::ARRAY, 50_000, 50_000),
    ] {
        let cpus = possible_cpus().expect("cpus") as usize;
        let vl = if t == mt::PERCPU_HASH { 8 * cpus } else { 8 };
        let m = create("par", t, 4, 8, max, 0, None);
        let expect = if t == mt::ARRAY {
            array_expect(max, vl, &fill_keyed(&m, n, 4, vl, 11))
        } else {
            fill_keyed(&m, n, 4, vl, 11)
        };
        let meta = dump::meta_of(&m.info().expect("info"), false, None).expect("meta");
        assert!(dump::can_split(&meta));
        for threads in [1, 2, 3, 5] {
            for batch in [64, 5000] {
                let mut got: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                let total =
                    dump::read_entries_parallel(&m, &meta, batch, threads, &mut |c, k, v| {
                        for i in 0..c {
                            got.push((
                                k[i * 4..(i + 1) * 4].to_vec(),
                                v[i * vl..(i + 1) * vl].to_vec(),
                            ));
                        }
                        Ok(())
                    })
                    .expect("parallel read");
                assert_eq!(
                    total as usize,
                    expect.len(),
                    "type {t}, {threads} threads, batch {batch}"
                );
                let as_map: BTreeMap<_, _> = got.into_iter().collect();
                assert_eq!(as_map, expect, "type {t}, {threads} threads, batch {batch}");
            }
        }
    }
}

/// A resolver decides where each map is pinned; a refused path fails the restore before any
/// map is published.
#[test]
fn pin_mapped_destination_places_maps_and_refuses_paths() {
    let (_src, snap, original) = one_map_snapshot("mapped", 20);
    let summary = format::verify(snap.as_slice()).expect("verify");
    let dst = common::fresh_pin_dir("mapped-dst");
    let root = dst.to_path_buf();
    let resolve: restore::PinResolver =
        Box::new(move |rel: &str| restore::safe_join(&root.join("sub"), rel));
    std::fs::create_dir_all(dst.join("sub")).expect("mkdir");
    let dest = Destination::PinMapped {
        resolve,
        overwrite: false,
    };
    restore::restore(
        snap.as_slice(),
        Some(&summary),
        &dest,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .expect("restore");
    let m = Map::from_pin(&dst.join("sub/counters")).expect("pinned where the resolver said");
    assert_eq!(read_keyed(&m), original);

    let refuse: restore::PinResolver = Box::new(|rel: &str| {
        Err(mapsnap::Error::UnsafePinPath {
            path: rel.to_string(),
            reason: "not under a bpffs mount of the container",
        })
    });
    let dst2 = common::fresh_pin_dir("mapped-refused");
    let err = restore::restore(
        snap.as_slice(),
        Some(&summary),
        &Destination::PinMapped {
            resolve: refuse,
            overwrite: false,
        },
        &RestoreOptions::default(),
        &NoProgress,
    )
    .expect_err("refused");
    assert!(err.to_string().contains("not under a bpffs mount"), "{err}");
    assert_eq!(
        std::fs::read_dir(&*dst2).expect("ls").count(),
        0,
        "nothing pinned"
    );
}

/// Maps held by fd are found through the process and its container (here: this test
/// process, in the host's pid namespace, so its cgroup); a map of another process is not.
#[test]
fn discovery_by_process_and_container() {
    let mine = create("held_by_fd", mt::HASH, 4, 4, 8, 0, None);
    let id = mine.info().expect("info").id;
    for source in [
        Source::Pid(std::process::id()),
        Source::ContainerPid(std::process::id()),
    ] {
        let found = discover::find(std::slice::from_ref(&source)).expect("discover");
        let f = found
            .iter()
            .find(|f| f.info.id == id)
            .unwrap_or_else(|| panic!("{source:?} finds map {id}"));
        assert_eq!(f.info.name, "held_by_fd");
        assert!(!f.frozen);
        assert_eq!(
            found.iter().filter(|f| f.info.id == id).count(),
            1,
            "de-duplicated"
        );
    }
    // Same map through a pin and an id: one entry, with the pin path kept.
    let dir = common::fresh_pin_dir("dedup");
    pin(&mine, &dir, "held");
    let found =
        discover::find(&[Source::Id(id), Source::Pin(dir.to_path_buf())]).expect("discover");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].pin_rel.as_deref(), Some("held"));
    let err = discover::find(&[Source::Pid(u32::MAX - 1)]).expect_err("no such process");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

/// Restores `snap` under `dir` with `threads` fillers.
fn restore_threads(
    snap: &[u8],
    dir: &Path,
    threads: usize,
) -> mapsnap::Result<restore::RestoreReport> {
    restore_into_root_with(
        snap,
        dir,
        false,
        &RestoreOptions {
            fill_threads: threads,
            ..RestoreOptions::default()
        },
    )
}

/// Hash, per-CPU hash, arrays (one frozen), an LRU hash half full (filled by the filler
/// threads) and one full (filled in order), and a queue beside them: every entry comes back
/// whatever the number of filler threads, the frozen array is frozen after its last chunk,
/// and the queue keeps its order.
#[test]
fn parallel_fill_restores_every_entry_and_keeps_order_where_needed() {
    let cpus = possible_cpus().expect("cpus") as usize;
    let dir = common::fresh_pin_dir("par-fill-src");
    let mut expect: Vec<(&str, Expect)> = Vec::new();
    let h = create("h", mt::HASH, 4, 64, 40_000, 0, None);
    expect.push(("h", Expect::Keyed(fill_keyed(&h, 30_000, 4, 64, 5))));
    pin(&h, &dir, "h");
    let ph = create("ph", mt::PERCPU_HASH, 8, 8, 5_000, 0, None);
    expect.push(("ph", Expect::Keyed(fill_keyed(&ph, 3_000, 8, 8 * cpus, 6))));
    pin(&ph, &dir, "ph");
    let a = create("a", mt::ARRAY, 4, 16, 20_000, 0, None);
    let filled = fill_keyed(&a, 20_000, 4, 16, 7);
    expect.push(("a", Expect::Keyed(array_expect(20_000, 16, &filled))));
    a.freeze().expect("freeze");
    pin(&a, &dir, "a");
    let half = create("lru_half", mt::LRU_HASH, 4, 8, 8_192, 0, None);
    expect.push(("lru_half", Expect::Keyed(fill_keyed(&half, 2_000, 4, 8, 8))));
    pin(&half, &dir, "lru_half");
    let full = create("lru_full", mt::LRU_HASH, 4, 8, 512, 0, None);
    expect.push(("lru_full", Expect::Keyed(read_keyed_after(&full, 500))));
    pin(&full, &dir, "lru_full");
    let q = create("q", mt::QUEUE, 0, 8, 3_000, 0, None);
    let mut popped = Vec::new();
    for i in 0..3_000u32 {
        let v = bytes(8, 9, i);
        q.update(None, &v, 0).expect("push");
        popped.push(v);
    }
    expect.push(("q", Expect::Popped(popped)));
    pin(&q, &dir, "q");
    let snap = dump_dir(&dir);
    for threads in [1, 2, 3] {
        let target = common::fresh_pin_dir("par-fill-dst");
        let report = restore_threads(&snap, &target, threads).expect("restore");
        assert_eq!(report.maps.len(), expect.len());
        for (name, e) in &expect {
            let m = Map::from_pin(&target.join(name)).expect("restored pin");
            if *name == "a" {
                assert!(
                    m.frozen().expect("frozen"),
                    "{threads} threads: a is frozen"
                );
            }
            check_contents(&m, e, &format!("{name} with {threads} threads"));
        }
    }
}

/// Fills `n` keys into an LRU map and returns what the kernel kept (it may evict).
fn read_keyed_after(map: &Map, n: u32) -> BTreeMap<Vec<u8>, Vec<u8>> {
    fill_keyed(map, n, 4, 8, 10);
    read_keyed(map)
}

/// A chunk the kernel refuses on a filler thread (more entries than the map holds) fails the
/// restore with the kernel's reason, and nothing is published.
#[test]
fn filler_thread_errors_fail_the_restore_and_publish_nothing() {
    let small = create("small", mt::HASH, 4, 8, 100, 0, None);
    let mut meta = dump::meta_of(&small.info().expect("info"), false, None).expect("meta");
    meta.pin_path = Some("small".into());
    let mut w = format::SnapshotWriter::new(
        Vec::new(),
        &snapshot_info(),
        WriterOptions {
            chunk_bytes: 4096,
            ..WriterOptions::default()
        },
    )
    .expect("writer");
    w.begin_map(&meta).expect("begin");
    let n = 5_000usize;
    let keys: Vec<u8> = (0..n as u32).flat_map(u32::to_ne_bytes).collect();
    w.write_entries(n, &keys, &vec![1u8; n * 8])
        .expect("entries");
    w.end_map().expect("end");
    let (snap, _) = w.finish().expect("finish");
    for threads in [1, 2] {
        let target = common::fresh_pin_dir("par-fill-err");
        let err = restore_threads(&snap, &target, threads).expect_err("too many entries");
        assert!(
            err.to_string().contains("writing entry"),
            "{threads} threads: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(&*target)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(left.is_empty(), "{threads} threads: left behind {left:?}");
    }
}
