//! The plugin's dump and restore logic without CRIU: map fds of this process go through
//! `Dumper::dump_file` into a directory, the maps are closed, and `Restorer` brings them back.
//! Fast checks of dedupe, access modes, inner-map identity and error messages; the real-CRIU
//! tests cover the same through `criu` and `runc`.

mod common;

use std::fs;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use mapsnap::anchor::Anchor;
use mapsnap::model::map_type as T;
use mapsnap::sys::{CreateAttrs, Map, ObjKind};
use mapsnap_criu::config::PluginConfig;
use mapsnap_criu::deadline::Deadline;
use mapsnap_criu::images::{self, Access, INDEX_NAME};
use mapsnap_criu::plugin::{DumpOutcome, Dumper, Restorer};

fn anchor(dir: &Path) -> Anchor {
    Anchor::open_trusted(dir, "test image directory").expect("anchor")
}

fn deadline() -> Deadline {
    Deadline::start(Duration::from_secs(60))
}

fn prepare(dir: &Path, cfg: &PluginConfig) -> Result<Restorer, mapsnap_criu::PluginError> {
    Restorer::prepare(&anchor(dir), cfg, &deadline())
}

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

    let dl = deadline();
    let mut d = Dumper::new(anchor(dir)).expect("dumper");
    let (r1, e1) = saved(d.dump_file(counters.fd(), 1, &dl).expect("dump 1"));
    assert_eq!((r1.map_id, r1.access, e1), (id, Access::ReadWrite, Some(3)));
    let (r2, e2) = saved(d.dump_file(ro.fd(), 2, &dl).expect("dump 2"));
    assert_eq!(
        (r2.map_id, r2.access, e2),
        (id, Access::ReadOnly, None),
        "a second fd of the same map is not dumped again"
    );
    // The inner map before its outer map (the order of fds is arbitrary).
    saved(d.dump_file(inner.fd(), 3, &dl).expect("dump 3"));
    saved(d.dump_file(outer.fd(), 4, &dl).expect("dump 4"));
    match d.dump_file(ringbuf.fd(), 5, &dl).expect("dump 5") {
        DumpOutcome::Unsupported { map, reason } => {
            assert!(map.contains("\"events\" (ringbuf)"), "{map}");
            assert!(reason.contains("ring buffer"), "{reason}");
        }
        other => panic!("a ring buffer is not carried: {other:?}"),
    }
    assert!(matches!(
        d.dump_file(file.as_fd(), 6, &dl).expect("dump 6"),
        DumpOutcome::NotAMap {
            kind: ObjKind::Other
        }
    ));
    assert_eq!(
        common::files_with_prefix(dir, "mapsnap-map-").len(),
        3,
        "counters, inner, outer"
    );
    let written = images::read_index(&anchor(dir), 1 << 20)
        .expect("read the index")
        .expect("an index");
    assert_eq!(written, *d.index(), "the index on disk is the dumper's");
    assert_eq!(written.files.len(), 4, "one record per CRIU file");
    assert_eq!(written.snapshots.len(), 3);
    for s in &written.snapshots {
        let bytes = fs::read(dir.join(s.name())).expect("snapshot");
        assert_eq!(bytes.len() as u64, s.size);
        assert_eq!(hex::encode(sha256(&bytes)), s.sha256, "{}", s.name());
    }
    drop((counters, ro, inner, outer));

    let r = prepare(dir, &PluginConfig::default()).expect("prepare");
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
    let snap = dir.join(images::snapshot_name(r1.map_id));
    let mut bytes = fs::read(&snap).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&snap, bytes).expect("write");
    let err = prepare(dir, &PluginConfig::default())
        .expect_err("a damaged snapshot is refused")
        .to_string();
    assert!(
        err.contains(&format!("cannot restore map {id} \"counters\" (hash)"))
            && err.contains(&images::snapshot_name(id))
            && err.contains("sha256"),
        "{err}"
    );
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Dumps two fresh hash maps (named `first`, `second` with a per-test prefix) into `dir`;
/// returns their dump-time ids. The maps are closed again.
fn dump_two(dir: &Path, prefix: &str) -> (u32, u32) {
    let a = create(&format!("{prefix}_first"), T::HASH, 4, 8, 8);
    let b = create(&format!("{prefix}_second"), T::HASH, 4, 8, 8);
    for (m, v) in [(&a, 5u64), (&b, 6u64)] {
        m.update(Some(&1u32.to_ne_bytes()), &v.to_ne_bytes(), 0)
            .expect("update");
    }
    let dl = deadline();
    let mut d = Dumper::new(anchor(dir)).expect("dumper");
    saved(d.dump_file(a.fd(), 1, &dl).expect("dump a"));
    saved(d.dump_file(b.fd(), 2, &dl).expect("dump b"));
    (a.info().expect("info").id, b.info().expect("info").id)
}

/// Kernel maps whose name is `name` right now.
fn live_maps_named(name: &str) -> usize {
    mapsnap::sys::loaded_map_ids()
        .expect("map ids")
        .into_iter()
        .filter_map(|id| Map::from_id(id).ok()?.info().ok())
        .filter(|i| i.name == name)
        .count()
}

/// Refused with `want` in the message, and every map made before the refusal is gone.
fn refused(dir: &Path, cfg: &PluginConfig, prefix: &str, want: &[&str]) -> String {
    let started = std::time::Instant::now();
    let err = prepare(dir, cfg).expect_err("refused").to_string();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    for w in want {
        assert!(err.contains(w), "{w:?} not in: {err}");
    }
    for suffix in ["first", "second"] {
        let name = format!("{prefix}_{suffix}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while live_maps_named(&name) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(live_maps_named(&name), 0, "{name} left behind after: {err}");
    }
    err
}

#[test]
fn hostile_image_files_are_refused_and_nothing_is_left() {
    common::require_root();
    let cfg = PluginConfig::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let (_, b) = dump_two(dir, "hs");
    let snap_b = dir.join(images::snapshot_name(b));
    let original = fs::read(&snap_b).expect("read");
    let restore_b = || {
        let _ = fs::remove_file(&snap_b);
        fs::write(&snap_b, &original).expect("write");
    };
    // The untouched directory restores (and the maps go away with the Restorer).
    let r = prepare(dir, &cfg).expect("clean directory");
    assert_eq!(r.counts(), (2, 2));
    drop(r);

    // A symlink to the real file (elsewhere), and one to /dev/zero.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let real = elsewhere.path().join("real.snap");
    fs::write(&real, &original).expect("write");
    fs::remove_file(&snap_b).expect("rm");
    std::os::unix::fs::symlink(&real, &snap_b).expect("symlink");
    refused(
        dir,
        &cfg,
        "hs",
        &["symbolic link", &images::snapshot_name(b)],
    );
    fs::remove_file(&snap_b).expect("rm");
    std::os::unix::fs::symlink("/dev/zero", &snap_b).expect("symlink");
    refused(dir, &cfg, "hs", &["symbolic link"]);

    // A FIFO nobody writes to: refused at once, not waited on.
    fs::remove_file(&snap_b).expect("rm");
    let c = std::ffi::CString::new(snap_b.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo reads a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    refused(dir, &cfg, "hs", &["not a regular file"]);

    // A directory in its place.
    fs::remove_file(&snap_b).expect("rm");
    fs::create_dir(&snap_b).expect("mkdir");
    refused(dir, &cfg, "hs", &["not a regular file"]);
    fs::remove_dir(&snap_b).expect("rmdir");
    restore_b();

    // Over the configured snapshot limit (checked before anything is read).
    let small = PluginConfig {
        max_snapshot_bytes: original.len() as u64 - 1,
        ..PluginConfig::default()
    };
    refused(
        dir,
        &small,
        "hs",
        &["more than the limit", "max_snapshot_bytes"],
    );

    // Grown by one byte (size differs from the index), or changed in place (sha256).
    fs::write(&snap_b, [&original[..], b"x"].concat()).expect("write");
    refused(dir, &cfg, "hs", &["the index records"]);
    let mut flipped = original.clone();
    flipped[10] ^= 0x40;
    fs::write(&snap_b, &flipped).expect("write");
    refused(dir, &cfg, "hs", &[&images::snapshot_name(b)]);
    restore_b();

    // An index over its limit, and a symlinked index.
    let tiny = PluginConfig {
        max_index_bytes: 64,
        ..PluginConfig::default()
    };
    refused(dir, &tiny, "hs", &[INDEX_NAME, "more than the limit"]);
    let index = dir.join(INDEX_NAME);
    fs::rename(&index, elsewhere.path().join("index.json")).expect("mv");
    std::os::unix::fs::symlink(elsewhere.path().join("index.json"), &index).expect("symlink");
    refused(dir, &cfg, "hs", &[INDEX_NAME, "symbolic link"]);
    fs::remove_file(&index).expect("rm");
    fs::rename(elsewhere.path().join("index.json"), &index).expect("mv");

    // Missing sha256: refused, not restored unchecked.
    let text = fs::read_to_string(&index).expect("index");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["snapshots"][1]
        .as_object_mut()
        .expect("object")
        .remove("sha256");
    fs::write(&index, serde_json::to_vec(&v).expect("json")).expect("write");
    refused(dir, &cfg, "hs", &[INDEX_NAME, "sha256"]);
    fs::write(&index, &text).expect("write");
    assert_eq!(prepare(dir, &cfg).expect("back to good").counts(), (2, 2));
}

#[test]
fn a_reused_image_directory_never_mixes_dumps() {
    common::require_root();
    let cfg = PluginConfig::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let old = tempfile::tempdir().expect("tempdir");
    let (a1, _) = dump_two(dir, "st1");
    let old_index = fs::read(dir.join(INDEX_NAME)).expect("index");
    let old_snap = fs::read(dir.join(images::snapshot_name(a1))).expect("snapshot");
    fs::copy(dir.join(INDEX_NAME), old.path().join(INDEX_NAME)).expect("cp");

    // A second dump into the same directory starts by removing the first one's files.
    let removed = images::remove_stale(&anchor(dir)).expect("remove stale");
    assert_eq!(removed, 3, "index and two snapshots");
    assert!(!dir.join(INDEX_NAME).exists());
    // ... and if it then fails before writing its own index, nothing can be restored.
    assert_eq!(prepare(dir, &cfg).expect("no index").counts(), (0, 0));

    let (a2, _) = dump_two(dir, "st2");
    // The first dump's snapshot put back under the second dump's name: refused.
    fs::write(dir.join(images::snapshot_name(a2)), &old_snap).expect("write");
    refused(dir, &cfg, "st2", &[&images::snapshot_name(a2)]);
    // The first dump's index put back beside the second dump's snapshots: its snapshots
    // are gone or are not the files it recorded.
    fs::write(dir.join(INDEX_NAME), &old_index).expect("write");
    refused(dir, &cfg, "st1", &[&images::snapshot_name(a1)]);
    // Even with the old snapshot back and its sha256 matching, a snapshot written by another
    // dump is refused by its dump id when the index is edited to name it.
    fs::write(dir.join(images::snapshot_name(a1)), &old_snap).expect("write");
    let mut v: serde_json::Value = serde_json::from_slice(&old_index).expect("json");
    v["dump_id"] = "0123456789abcdef0123456789abcdef".into();
    fs::write(dir.join(INDEX_NAME), serde_json::to_vec(&v).expect("json")).expect("write");
    refused(dir, &cfg, "st1", &["written by another dump"]);
}

#[test]
fn the_deadline_bounds_a_restore_and_names_the_map() {
    common::require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    dump_two(dir, "dl");
    let dl = Deadline::start(Duration::from_millis(300));
    let d2 = dl.clone();
    let a = anchor(dir);
    let cfg = PluginConfig::default();
    // The worker first sleeps past the deadline, as a read from a hung mount would keep it:
    // the caller gets the deadline error on time, and the late worker makes no map.
    let err = dl
        .run(move || {
            std::thread::sleep(Duration::from_millis(500));
            Restorer::prepare(&a, &cfg, &d2)
        })
        .expect_err("past the deadline");
    let msg = err.to_string();
    assert!(msg.contains("deadline of 300ms"), "{msg}");
    assert_eq!(err.errno(), libc::ETIMEDOUT);
    // The late worker itself stops at its first step and makes no map.
    std::thread::sleep(Duration::from_millis(600));
    for name in ["dl_first", "dl_second"] {
        assert_eq!(live_maps_named(name), 0, "{name}");
    }
    // A deadline that passes between steps names the step it stopped in.
    let late = Deadline::start(Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(5));
    let msg = Restorer::prepare(&anchor(dir), &PluginConfig::default(), &late)
        .expect_err("late")
        .to_string();
    assert!(msg.contains("deadline of 1ms passed while"), "{msg}");
}
