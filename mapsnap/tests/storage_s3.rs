//! Snapshots in S3, against a real S3-compatible server (moto) started on a free loopback port
//! by each test: multipart round trip of a 50 MB+ snapshot, server stopped mid-upload,
//! transient faults, corrupt / truncated / replaced objects, wrong credentials, missing
//! objects and unreachable endpoints, `--overwrite` rules, aborted uploads.
//!
//! Needs root and bpffs (kernel maps) and the server (`make deps` runs scripts/install-s3.sh).

mod common;
mod storage_common;

use std::io::Write;
use std::time::Instant;

use mapsnap::storage::{ErrorKind, Location, Storage, StorageConfig};
use storage_common::{
    BUCKET, Fault, Moto, Proxy, assert_big_array, big_array, counter, counters, error_line,
    mapsnap, text,
};

fn s3(key: &str) -> String {
    format!("s3://{BUCKET}/{key}")
}

fn with(env: &[(String, String)], extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = env.to_vec();
    e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    e
}

/// 1M entries of 64 pseudo-random bytes: a 70 MB snapshot, 9 parts of 8 MiB.
#[test]
fn s3_round_trip_of_a_multipart_snapshot() {
    const N: u32 = 1 << 20;
    let src = common::fresh_pin_dir("s3-big-src");
    let dst = common::fresh_pin_dir("s3-big-dst");
    let moto = Moto::start();
    let env = moto.env(&moto.endpoint());
    let _m = big_array(&src.join("big"), "big", N, 7);

    let t = Instant::now();
    let o = mapsnap(
        &[
            "dump",
            "--pin",
            src.to_str().expect("utf8"),
            "-o",
            &s3("node-a/big.mapsnap"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let dump_time = t.elapsed();
    let object = moto.object("node-a/big.mapsnap").expect("object uploaded");
    assert!(object.len() > 50 << 20, "{} bytes", object.len());
    let etag = moto.etag("node-a/big.mapsnap").expect("etag");
    assert!(
        etag.ends_with("-9"),
        "a 9-part multipart upload, ETag {etag}"
    );
    assert_eq!(moto.uploads_in_progress(), 0);

    // The manifest beside it: version, digest, size, source, maps.
    let manifest: serde_json::Value = serde_json::from_slice(
        &moto
            .object("node-a/big.mapsnap.manifest.json")
            .expect("manifest uploaded"),
    )
    .expect("manifest JSON");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&object))
    };
    assert_eq!(manifest["sha256"], sha.as_str());
    assert_eq!(manifest["size"], object.len() as u64);
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["maps"][0]["name"], "big");
    assert_eq!(manifest["maps"][0]["type"], "array");
    assert_eq!(manifest["maps"][0]["entries"], u64::from(N));
    assert_eq!(manifest["maps"][0]["bytes"], u64::from(N) * 68);
    assert!(manifest["source"]["host"].is_string());
    assert!(
        manifest["created"]
            .as_str()
            .expect("created")
            .ends_with('Z')
    );

    let o = mapsnap(
        &["inspect", &s3("node-a/big.mapsnap"), "--manifest", "--json"],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(shown, manifest);
    let o = mapsnap(&["verify", &s3("node-a/big.mapsnap")], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("manifest: matches"), "{}", text(&o));

    let t = Instant::now();
    let o = mapsnap(
        &[
            "restore",
            &s3("node-a/big.mapsnap"),
            "--pin-root",
            dst.to_str().expect("utf8"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let restore_time = t.elapsed();
    assert_big_array(&dst.join("big"), N, 7);
    eprintln!(
        "s3 round trip: {} bytes, dump+upload {:.2?}, download+restore {:.2?}",
        object.len(),
        dump_time,
        restore_time
    );

    let o = mapsnap(
        &[
            "diff",
            &s3("node-a/big.mapsnap"),
            "--pin",
            dst.join("big").to_str().expect("utf8"),
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// The server is killed in the middle of a multipart upload: a clear error, nothing under the
/// key, and the same command succeeds once the server is back.
#[test]
fn s3_server_stopped_during_upload() {
    let src = common::fresh_pin_dir("s3-stop-src");
    let mut moto = Moto::start();
    let mut proxy = Proxy::start(moto.port);
    let env = with(
        &moto.env(&proxy.endpoint()),
        &[("MAPSNAP_STORAGE_RETRIES", "2")],
    );
    let _m = big_array(&src.join("big"), "big", 400_000, 3); // ~27 MB, 4 parts
    let pid = moto.pid();
    proxy.add(Fault::StopUp(
        12 << 20,
        Box::new(move || {
            // SAFETY: kill(2) on the server process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }),
    ));

    let key = "stop/big.mapsnap";
    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", &s3(key)],
        &env,
    );
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert_eq!(proxy.fired(), 1, "the server was stopped mid-upload");
    let line = error_line(&o);
    assert!(line.contains(&s3(key)), "{line}");
    assert!(line.contains("cannot reach the storage endpoint"), "{line}");

    moto.restart();
    proxy.restart();
    assert_eq!(moto.object(key), None, "no object under the key");
    assert_eq!(moto.object(&format!("{key}.manifest.json")), None);
    assert_eq!(moto.uploads_in_progress(), 0);

    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", &s3(key)],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = mapsnap(&["verify", &s3(key)], &env);
    assert!(o.status.success(), "{}", text(&o));
}

/// Connections cut during the upload and the download are retried (with backoff) and the
/// round trip still completes, byte for byte.
#[test]
fn s3_transient_faults_are_retried() {
    let src = common::fresh_pin_dir("s3-flaky-src");
    let dst = common::fresh_pin_dir("s3-flaky-dst");
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    let env = moto.env(&proxy.endpoint());
    let _m = big_array(&src.join("big"), "big", 300_000, 5); // ~20 MB
    proxy.add(Fault::CutUp(6 << 20));
    proxy.add(Fault::CutUp(15 << 20));
    let o = mapsnap(
        &[
            "dump",
            "--pin",
            src.to_str().expect("utf8"),
            "-o",
            &s3("flaky.mapsnap"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(proxy.fired(), 2);

    proxy.add(Fault::CutDown(5 << 20));
    let o = mapsnap(
        &[
            "restore",
            &s3("flaky.mapsnap"),
            "--pin-root",
            dst.to_str().expect("utf8"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(proxy.fired(), 3);
    assert_big_array(&dst.join("big"), 300_000, 5);
}

/// A damaged object is refused before any map is published or changed.
#[test]
fn s3_corrupt_truncated_or_replaced_object_is_refused() {
    let src = common::fresh_pin_dir("s3-bad-src");
    let dst = common::fresh_pin_dir("s3-bad-dst");
    let moto = Moto::start();
    let env = moto.env(&moto.endpoint());
    let _m = counters(&src, 100, 1);
    let o = mapsnap(
        &[
            "dump",
            "--pin",
            src.to_str().expect("utf8"),
            "-o",
            &s3("good.mapsnap"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    // The target already holds a restored copy whose state must survive the bad restores.
    let o = mapsnap(
        &[
            "restore",
            &s3("good.mapsnap"),
            "--pin-root",
            dst.to_str().expect("utf8"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let pin = dst.join("counters");
    let before_id = mapsnap::sys::Map::from_pin(&pin)
        .expect("pin")
        .info()
        .expect("info")
        .id;
    mapsnap::sys::Map::from_pin(&pin)
        .expect("pin")
        .update(Some(&5u32.to_ne_bytes()), &777u64.to_ne_bytes(), 0)
        .expect("mark the live map");

    let good = moto.object("good.mapsnap").expect("object");
    let manifest = moto.object("good.mapsnap.manifest.json").expect("manifest");
    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n / 2] ^= 0x40;
    let truncated = good[..n - 20].to_vec();
    // Another valid snapshot under the key, with the old manifest beside it.
    let other_src = common::fresh_pin_dir("s3-bad-other");
    let _o = counters(&other_src, 50, 9);
    let o = mapsnap(
        &[
            "dump",
            "--pin",
            other_src.to_str().expect("utf8"),
            "-o",
            &s3("other.mapsnap"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let replaced = moto.object("other.mapsnap").expect("other");

    for (what, bytes, with_manifest) in [
        ("corrupt", flipped.clone(), true),
        ("corrupt", flipped, false),
        ("truncated", truncated.clone(), true),
        ("truncated", truncated, false),
        ("replaced", replaced, true),
    ] {
        let key = format!("bad-{what}-{with_manifest}.mapsnap");
        moto.put_object(&key, &bytes);
        if with_manifest {
            moto.put_object(&format!("{key}.manifest.json"), &manifest);
        }
        for dest in [
            vec!["--pin-root", dst.to_str().expect("utf8"), "--overwrite"],
            vec!["--into", pin.to_str().expect("utf8")],
        ] {
            let loc = s3(&key);
            let mut args = vec!["restore", loc.as_str()];
            args.extend(dest.iter().copied());
            let o = mapsnap(&args, &env);
            assert_eq!(o.status.code(), Some(3), "{what} {args:?}: {}", text(&o));
            let line = error_line(&o);
            assert!(line.contains(&loc), "{line}");
            let expect = match what {
                "truncated" => "truncated",
                "replaced" => "manifest",
                _ => "corrupt",
            };
            assert!(line.contains(expect), "{what}: {line}");
            // Target untouched: same map, same contents.
            let m = mapsnap::sys::Map::from_pin(&pin).expect("pin still there");
            assert_eq!(
                m.info().expect("info").id,
                before_id,
                "{what}: pin replaced"
            );
            assert_eq!(counter(&pin, 5), Some(777), "{what}: map changed");
            assert_eq!(counter(&pin, 99), Some(991), "{what}: map changed");
        }
        let o = mapsnap(&["verify", &s3(&key)], &env);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    }

    // The intact object still fills the existing map (verify pass, then a restore pass
    // pinned to the same ETag).
    let o = mapsnap(
        &[
            "restore",
            &s3("good.mapsnap"),
            "--into",
            pin.to_str().expect("utf8"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(counter(&pin, 5), Some(51));
}

/// Wrong credentials are refused by the server (moto with IAM checks on) with a clear error.
#[test]
fn s3_wrong_credentials() {
    let src = common::fresh_pin_dir("s3-auth-src");
    let moto = Moto::start();
    let (id, secret) = moto.enforce_auth();
    let base = moto.env(&moto.endpoint());
    let good = with(
        &base,
        &[
            ("AWS_ACCESS_KEY_ID", id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", secret.as_str()),
        ],
    );
    let _m = counters(&src, 10, 0);
    let o = mapsnap(
        &[
            "dump",
            "--pin",
            src.to_str().expect("utf8"),
            "-o",
            &s3("auth.mapsnap"),
        ],
        &good,
    );
    assert!(o.status.success(), "the right key works: {}", text(&o));

    let wrong_secret = with(&good, &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")]);
    let unknown_key = with(&good, &[("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")]);
    for env in [&wrong_secret, &unknown_key] {
        for args in [
            vec!["verify".to_string(), s3("auth.mapsnap")],
            vec![
                "dump".to_string(),
                "--pin".to_string(),
                src.to_str().expect("utf8").to_string(),
                "-o".to_string(),
                s3("auth2.mapsnap"),
            ],
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = mapsnap(&args, env);
            assert_eq!(o.status.code(), Some(7), "{args:?}: {}", text(&o));
            let line = error_line(&o);
            assert!(line.contains("s3://snap/auth"), "{line}");
            assert!(line.contains("access denied"), "{line}");
            assert!(line.contains("credentials"), "{line}");
        }
    }
}

/// Missing object, missing bucket, unreachable endpoint, bad location: one line each.
#[test]
fn s3_missing_and_unreachable() {
    let dst = common::fresh_pin_dir("s3-missing-dst");
    let moto = Moto::start();
    let env = moto.env(&moto.endpoint());
    let o = mapsnap(&["verify", &s3("nothing.mapsnap")], &env);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    let line = error_line(&o);
    assert!(
        line.contains("s3://snap/nothing.mapsnap") && line.contains("no such object"),
        "{line}"
    );

    let o = mapsnap(
        &[
            "restore",
            "s3://nobucket/x.mapsnap",
            "--pin-root",
            dst.to_str().expect("utf8"),
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(
        error_line(&o).contains("bucket does not exist"),
        "{}",
        text(&o)
    );

    let closed = storage_common::free_port();
    let dead = with(
        &moto.env(&format!("http://127.0.0.1:{closed}")),
        &[("MAPSNAP_STORAGE_RETRIES", "2")],
    );
    let t = Instant::now();
    let o = mapsnap(&["inspect", &s3("x.mapsnap")], &dead);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    let line = error_line(&o);
    assert!(
        line.contains("s3://snap/x.mapsnap")
            && line.contains(&format!(
                "cannot reach the storage endpoint http://127.0.0.1:{closed}"
            )),
        "{line}"
    );
    assert!(t.elapsed().as_secs() < 30, "retries are bounded");

    // The overall timeout bounds a stuck transfer.
    let o = mapsnap(&["--timeout", "1ms", "verify", &s3("x.mapsnap")], &env);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(
        error_line(&o).contains("overall timeout of 1ms"),
        "{}",
        text(&o)
    );

    for bad in [
        "s3://key:secret@snap/x",
        "s3://snap/x?endpoint=http://elsewhere",
    ] {
        let o = mapsnap(&["verify", bad], &env);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(error_line(&o).contains("refused"), "{}", text(&o));
    }
}

/// An existing snapshot is replaced only with --overwrite; small objects use a conditional
/// PUT, multipart ones are checked before completion.
#[test]
fn s3_overwrite_rules() {
    let src = common::fresh_pin_dir("s3-ow-src");
    let moto = Moto::start();
    let env = with(
        &moto.env(&moto.endpoint()),
        &[("MAPSNAP_STORAGE_PART_SIZE", "5MiB")],
    );
    let m = counters(&src, 10, 0);
    let dump = |extra: &[&str]| {
        let mut args = vec!["dump", "--pin", src.to_str().expect("utf8"), "-o"];
        let loc = s3("ow.mapsnap");
        args.push(&loc);
        args.extend_from_slice(extra);
        mapsnap(&args, &env)
    };
    let o = dump(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let first = moto.object("ow.mapsnap").expect("object");
    let first_manifest = moto.object("ow.mapsnap.manifest.json").expect("manifest");

    m.update(Some(&1u32.to_ne_bytes()), &5u64.to_ne_bytes(), 0)
        .expect("update");
    let o = dump(&[]);
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    let line = error_line(&o);
    assert!(
        line.contains("s3://snap/ow.mapsnap: already exists") && line.contains("--overwrite"),
        "{line}"
    );
    assert_eq!(moto.object("ow.mapsnap"), Some(first.clone()), "unchanged");
    assert_eq!(
        moto.object("ow.mapsnap.manifest.json"),
        Some(first_manifest)
    );

    let o = dump(&["--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    let second = moto.object("ow.mapsnap").expect("object");
    assert_ne!(second, first, "replaced");
    let o = mapsnap(&["verify", &s3("ow.mapsnap")], &env);
    assert!(text(&o).contains("manifest: matches"), "{}", text(&o));

    // Another writer creates the key while ours is in progress: the commit refuses, for a
    // single conditional PUT and for a multipart upload alike.
    let mut cfg = StorageConfig {
        part_size: 5 << 20,
        retries: 1,
        ..StorageConfig::default()
    };
    let vars = moto.env(&moto.endpoint());
    for (k, v) in &vars {
        if k.starts_with("AWS_") {
            cfg.s3
                .push((k.trim_start_matches("AWS_").to_ascii_lowercase(), v.clone()));
        }
    }
    for (key, size) in [("race-small", 1000usize), ("race-big", 12 << 20)] {
        let st = Storage::open(Location::parse(&s3(key)).expect("loc"), &cfg).expect("open");
        let mut w = st.writer(false).expect("writer");
        w.write_all(&vec![1u8; size]).expect("write");
        moto.put_object(key, b"the other writer");
        let e = w.commit().expect_err("must not replace");
        assert_eq!(e.kind, ErrorKind::AlreadyExists, "{key}: {e}");
        assert_eq!(
            moto.object(key).as_deref(),
            Some(&b"the other writer"[..]),
            "{key}"
        );
    }
    assert_eq!(
        moto.uploads_in_progress(),
        0,
        "the refused multipart upload was aborted"
    );
}

/// A writer dropped in the middle of a multipart upload (a failed dump) aborts it: no parts
/// remain, no object appears.
#[test]
fn s3_abandoned_upload_is_aborted() {
    let moto = Moto::start();
    let mut cfg = StorageConfig {
        part_size: 5 << 20,
        ..StorageConfig::default()
    };
    for (k, v) in moto.env(&moto.endpoint()) {
        if let Some(name) = k.strip_prefix("AWS_") {
            cfg.s3.push((name.to_ascii_lowercase(), v));
        }
    }
    let st = Storage::open(Location::parse(&s3("abandoned")).expect("loc"), &cfg).expect("open");
    let mut w = st.writer(false).expect("writer");
    w.write_all(&vec![7u8; 12 << 20]).expect("write two parts");
    assert_eq!(moto.uploads_in_progress(), 1, "multipart upload started");
    drop(w);
    assert_eq!(moto.uploads_in_progress(), 0, "aborted");
    assert_eq!(moto.object("abandoned"), None);
}

/// Deleting a snapshot removes it and its manifest; deleting again finds nothing and is fine
/// (the operator's finalizer retries cleanups).
#[test]
fn s3_delete_removes_snapshot_and_manifest() {
    let src = common::fresh_pin_dir("s3-del-src");
    let moto = Moto::start();
    let env = moto.env(&moto.endpoint());
    let _m = counters(&src, 5, 0);
    let loc = s3("del.mapsnap");
    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", &loc],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        moto.object("del.mapsnap").is_some() && moto.object("del.mapsnap.manifest.json").is_some()
    );
    let mut cfg = StorageConfig::default();
    for (k, v) in &env {
        if k.starts_with("AWS_") {
            cfg.s3
                .push((k.trim_start_matches("AWS_").to_ascii_lowercase(), v.clone()));
        }
    }
    let st = Storage::open(Location::parse(&loc).expect("loc"), &cfg).expect("open");
    assert!(st.delete().expect("delete"), "it was there");
    assert_eq!(moto.object("del.mapsnap"), None);
    assert_eq!(moto.object("del.mapsnap.manifest.json"), None);
    assert!(
        !st.delete().expect("delete again"),
        "nothing left to delete"
    );
}
