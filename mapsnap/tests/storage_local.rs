//! Snapshots in local files through the storage layer: the same 50 MB+ round trip as on S3,
//! addressed as `file://`, with its manifest, no temporary file left, and the overwrite rules.
//!
//! Needs root and bpffs (kernel maps).

mod common;
mod storage_common;

use std::time::Instant;

use storage_common::{assert_big_array, big_array, counters, error_line, mapsnap, text};

#[test]
fn file_round_trip_of_a_big_snapshot() {
    const N: u32 = 1 << 20;
    let src = common::fresh_pin_dir("file-big-src");
    let dst = common::fresh_pin_dir("file-big-dst");
    let work = tempfile::tempdir().expect("tempdir");
    let path = work.path().join("big.mapsnap");
    let url = format!("file://{}", path.display());
    let env = vec![(
        "MAPSNAP_CONFIG".to_string(),
        storage_common::empty_config().display().to_string(),
    )];
    let _m = big_array(&src.join("big"), "big", N, 11);

    let t = Instant::now();
    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", &url],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let dump_time = t.elapsed();
    let size = std::fs::metadata(&path).expect("snapshot").len();
    assert!(size > 50 << 20, "{size} bytes");
    let mut names: Vec<_> = std::fs::read_dir(work.path())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["big.mapsnap", "big.mapsnap.manifest.json"],
        "no temporary files"
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(work.path().join("big.mapsnap.manifest.json")).expect("manifest"),
    )
    .expect("json");
    assert_eq!(manifest["size"], size);
    assert_eq!(manifest["maps"][0]["entries"], u64::from(N));

    let t = Instant::now();
    let o = mapsnap(
        &["restore", &url, "--pin-root", dst.to_str().expect("utf8")],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let restore_time = t.elapsed();
    assert_big_array(&dst.join("big"), N, 11);
    eprintln!("file round trip: {size} bytes, dump {dump_time:.2?}, restore {restore_time:.2?}");

    let o = mapsnap(&["inspect", path.to_str().expect("utf8")], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("manifest "), "{}", text(&o));
}

#[test]
fn file_overwrite_rules_and_replaced_snapshot() {
    let src = common::fresh_pin_dir("file-ow-src");
    let work = tempfile::tempdir().expect("tempdir");
    let path = work.path().join("s.mapsnap");
    let p = path.to_str().expect("utf8");
    let m = counters(&src, 10, 0);
    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", p],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let first = std::fs::read(&path).expect("read");
    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", p],
        &[],
    );
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    assert!(error_line(&o).contains("already exists"), "{}", text(&o));
    assert_eq!(std::fs::read(&path).expect("read"), first);

    // A snapshot replaced by another valid one of the same size no longer matches its
    // manifest: refused.
    m.update(Some(&3u32.to_ne_bytes()), &4u64.to_ne_bytes(), 0)
        .expect("update");
    let other = work.path().join("other.mapsnap");
    let o = mapsnap(
        &[
            "dump",
            "--pin",
            src.to_str().expect("utf8"),
            "-o",
            other.to_str().expect("utf8"),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    std::fs::copy(&other, &path).expect("replace");
    let o = mapsnap(&["verify", p], &[]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(error_line(&o).contains("manifest"), "{}", text(&o));

    let o = mapsnap(
        &[
            "dump",
            "--pin",
            src.to_str().expect("utf8"),
            "-o",
            p,
            "--overwrite",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = mapsnap(&["verify", p], &[]);
    assert!(text(&o).contains("manifest: matches"), "{}", text(&o));
}

/// Deleting a local snapshot removes it and its manifest, and tolerates a second call.
#[test]
fn file_delete_removes_snapshot_and_manifest() {
    let src = common::fresh_pin_dir("file-del-src");
    let _m = counters(&src, 5, 0);
    let work = tempfile::tempdir().expect("tempdir");
    let snap = work.path().join("del.mapsnap");
    let snap_s = snap.to_str().expect("utf8");
    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", snap_s],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let manifest = work.path().join("del.mapsnap.manifest.json");
    assert!(snap.exists() && manifest.exists());
    let st = mapsnap::storage::Storage::open_str(snap_s, None).expect("open");
    assert!(st.delete().expect("delete"));
    assert!(!snap.exists() && !manifest.exists());
    assert!(!st.delete().expect("delete again"));
}
