//! Snapshots in object storage, one suite run against a real server per protocol, each
//! started on a free loopback port by the test: S3 (moto), Azure Blob (Azurite) and GCS
//! (fake-gcs-server). Cases: multipart round trip of a 70 MB snapshot, server killed
//! mid-upload, transient faults, corrupt / truncated / replaced objects, wrong credentials,
//! missing objects and unreachable endpoints, `--overwrite` rules (conditional writes),
//! abandoned uploads, delete.
//!
//! Where an emulator does less than the real service, the case asserts what the emulator can
//! show and says so (fake-gcs-server checks no credentials and ignores `ifGenerationMatch`;
//! GCS resumable sessions cannot be listed).
//!
//! Needs root and bpffs (kernel maps) and the servers (`make deps`: scripts/install-s3.sh,
//! install-azurite.sh, install-gcs.sh).

mod common;
mod storage_common;

use std::io::Write;
use std::time::Instant;

use mapsnap::storage::{ErrorKind, Location, Storage};
use storage_common::{
    Fault, GCS_TOKEN, Kind, Proxy, Server, assert_big_array, big_array, counter, counters,
    error_line, mapsnap, text,
};

/// One `#[test]` per case for a provider, in a module named after it.
macro_rules! provider_suite {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::Kind;
            #[test]
            fn round_trip_of_a_multipart_snapshot() {
                super::round_trip_of_a_multipart_snapshot($kind)
            }
            #[test]
            fn server_killed_during_upload() {
                super::server_killed_during_upload($kind)
            }
            #[test]
            fn transient_faults_are_retried() {
                super::transient_faults_are_retried($kind)
            }
            #[test]
            fn corrupt_truncated_or_replaced_object_is_refused() {
                super::corrupt_truncated_or_replaced_object_is_refused($kind)
            }
            #[test]
            fn wrong_credentials() {
                super::wrong_credentials($kind)
            }
            #[test]
            fn missing_and_unreachable() {
                super::missing_and_unreachable($kind)
            }
            #[test]
            fn overwrite_rules() {
                super::overwrite_rules($kind)
            }
            #[test]
            fn abandoned_upload_is_aborted() {
                super::abandoned_upload_is_aborted($kind)
            }
            #[test]
            fn delete_removes_snapshot_and_manifest() {
                super::delete_removes_snapshot_and_manifest($kind)
            }
        }
    };
}

provider_suite!(s3, Kind::S3);
provider_suite!(azure, Kind::Azure);
provider_suite!(gcs, Kind::Gcs);

fn with(env: &[(String, String)], extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = env.to_vec();
    e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    e
}

fn pin_dir(kind: Kind, what: &str) -> common::PinDir {
    common::fresh_pin_dir(&format!("{}-{what}", kind.scheme()))
}

/// 1M entries of 64 pseudo-random bytes: a 70 MB snapshot, 9 parts of 8 MiB.
fn round_trip_of_a_multipart_snapshot(kind: Kind) {
    const N: u32 = 1 << 20;
    let src = pin_dir(kind, "big-src");
    let dst = pin_dir(kind, "big-dst");
    let server = Server::start(kind);
    let env = server.env(&server.endpoint());
    let _m = big_array(&src.join("big"), "big", N, 7);
    let loc = kind.url("node-a/big.mapsnap");

    let t = Instant::now();
    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", &loc],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let dump_time = t.elapsed();
    let object = server
        .object("node-a/big.mapsnap")
        .expect("object uploaded");
    assert!(object.len() > 50 << 20, "{} bytes", object.len());
    match kind {
        Kind::S3 | Kind::Azure => assert_eq!(
            server.parts("node-a/big.mapsnap"),
            Some(9),
            "a 9-part upload (S3 ETag -9, Azure: 9 committed blocks)"
        ),
        // One resumable upload: the object does not show its chunks.
        Kind::Gcs => assert_eq!(server.parts("node-a/big.mapsnap"), None),
    }
    if let Some(left) = server.leftovers() {
        assert!(left.is_empty(), "unfinished uploads left: {left:?}");
    }

    // The manifest beside it: version, digest, size, source, maps.
    let manifest: serde_json::Value = serde_json::from_slice(
        &server
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

    let o = mapsnap(&["inspect", &loc, "--manifest", "--json"], &env);
    assert!(o.status.success(), "{}", text(&o));
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(shown, manifest);
    let o = mapsnap(&["verify", &loc], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("manifest: matches"), "{}", text(&o));

    let t = Instant::now();
    let o = mapsnap(
        &["restore", &loc, "--pin-root", dst.to_str().expect("utf8")],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let restore_time = t.elapsed();
    assert_big_array(&dst.join("big"), N, 7);
    eprintln!(
        "{} round trip: {} bytes, dump+upload {:.2?}, download+restore {:.2?}",
        kind.scheme(),
        object.len(),
        dump_time,
        restore_time
    );

    let o = mapsnap(
        &[
            "diff",
            &loc,
            "--pin",
            dst.join("big").to_str().expect("utf8"),
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// The server is killed in the middle of a multipart upload: a clear error, nothing under the
/// key once it is back (Azurite and fake-gcs-server keep their data across the restart), and
/// the same command then succeeds and leaves no unfinished upload behind.
fn server_killed_during_upload(kind: Kind) {
    let src = pin_dir(kind, "stop-src");
    let mut server = Server::start(kind);
    let mut proxy = Proxy::start(server.port);
    let env = with(
        &server.env(&proxy.endpoint()),
        &[("MAPSNAP_STORAGE_RETRIES", "2")],
    );
    let _m = big_array(&src.join("big"), "big", 400_000, 3); // ~27 MB, 4 parts
    let pid = server.pid();
    proxy.add(Fault::StopUp(
        12 << 20,
        Box::new(move || {
            // SAFETY: kill(2) on the server process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }),
    ));

    let key = "stop/big.mapsnap";
    let loc = kind.url(key);
    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", &loc],
        &env,
    );
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert_eq!(proxy.fired(), 1, "the server was killed mid-upload");
    let line = error_line(&o);
    assert!(line.contains(&loc), "{line}");
    assert!(line.contains("cannot reach the storage endpoint"), "{line}");

    server.restart();
    proxy.restart();
    assert_eq!(server.object(key), None, "no object under the key");
    assert_eq!(server.object(&format!("{key}.manifest.json")), None);
    // The client could not clean up a server that was gone: Azure keeps the blocks it had
    // received as uncommitted blocks (S3: moto keeps nothing across a restart).
    let stranded = server.leftovers();
    eprintln!(
        "{}: unfinished uploads after the restart: {stranded:?}",
        kind.scheme()
    );

    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", &loc],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = mapsnap(&["verify", &loc], &env);
    assert!(o.status.success(), "{}", text(&o));
    // Committing the key discards what the killed upload left (Azure: its uncommitted blocks).
    if let Some(left) = server.leftovers() {
        assert!(left.is_empty(), "unfinished uploads left: {left:?}");
    }
}

/// Connections cut during the upload and the download are retried (with backoff) and the
/// round trip still completes, byte for byte.
fn transient_faults_are_retried(kind: Kind) {
    let src = pin_dir(kind, "flaky-src");
    let dst = pin_dir(kind, "flaky-dst");
    let server = Server::start(kind);
    let proxy = Proxy::start(server.port);
    let env = server.env(&proxy.endpoint());
    let _m = big_array(&src.join("big"), "big", 300_000, 5); // ~20 MB
    proxy.add(Fault::CutUp(6 << 20));
    proxy.add(Fault::CutUp(15 << 20));
    let loc = kind.url("flaky.mapsnap");
    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", &loc],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(proxy.fired(), 2);

    proxy.add(Fault::CutDown(5 << 20));
    let o = mapsnap(
        &["restore", &loc, "--pin-root", dst.to_str().expect("utf8")],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(proxy.fired(), 3);
    assert_big_array(&dst.join("big"), 300_000, 5);
    if let Some(left) = server.leftovers() {
        assert!(left.is_empty(), "unfinished uploads left: {left:?}");
    }
}

/// A damaged object is refused before any map is published or changed.
fn corrupt_truncated_or_replaced_object_is_refused(kind: Kind) {
    let src = pin_dir(kind, "bad-src");
    let dst = pin_dir(kind, "bad-dst");
    let server = Server::start(kind);
    let env = server.env(&server.endpoint());
    let _m = counters(&src, 100, 1);
    let o = mapsnap(
        &[
            "dump",
            "--pin",
            src.to_str().expect("utf8"),
            "-o",
            &kind.url("good.mapsnap"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    // The target already holds a restored copy whose state must survive the bad restores.
    let o = mapsnap(
        &[
            "restore",
            &kind.url("good.mapsnap"),
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

    let good = server.object("good.mapsnap").expect("object");
    let manifest = server
        .object("good.mapsnap.manifest.json")
        .expect("manifest");
    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n / 2] ^= 0x40;
    let truncated = good[..n - 20].to_vec();
    // Another valid snapshot under the key, with the old manifest beside it.
    let other_src = pin_dir(kind, "bad-other");
    let _o = counters(&other_src, 50, 9);
    let o = mapsnap(
        &[
            "dump",
            "--pin",
            other_src.to_str().expect("utf8"),
            "-o",
            &kind.url("other.mapsnap"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let replaced = server.object("other.mapsnap").expect("other");

    for (what, bytes, with_manifest) in [
        ("corrupt", flipped.clone(), true),
        ("corrupt", flipped, false),
        ("truncated", truncated.clone(), true),
        ("truncated", truncated, false),
        ("replaced", replaced, true),
    ] {
        let key = format!("bad-{what}-{with_manifest}.mapsnap");
        server.put_object(&key, &bytes);
        if with_manifest {
            server.put_object(&format!("{key}.manifest.json"), &manifest);
        }
        for dest in [
            vec!["--pin-root", dst.to_str().expect("utf8"), "--overwrite"],
            vec!["--into", pin.to_str().expect("utf8")],
        ] {
            let loc = kind.url(&key);
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
        let o = mapsnap(&["verify", &kind.url(&key)], &env);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    }

    // The intact object still fills the existing map (verify pass, then a restore pass
    // pinned to the same version).
    let o = mapsnap(
        &[
            "restore",
            &kind.url("good.mapsnap"),
            "--into",
            pin.to_str().expect("utf8"),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(counter(&pin, 5), Some(51));
}

/// Wrong credentials are refused with a clear error: by moto with its IAM checks on and by
/// Azurite (Shared Key signatures). fake-gcs-server checks no credentials, so for GCS this
/// shows what the client controls: the configured token is what every request carries, and
/// an unusable credential file is refused before any request.
fn wrong_credentials(kind: Kind) {
    let src = pin_dir(kind, "auth-src");
    let server = Server::start(kind);
    let _m = counters(&src, 10, 0);
    let dump_args = |key: &str| {
        vec![
            "dump".to_string(),
            "--pin".to_string(),
            src.to_str().expect("utf8").to_string(),
            "-o".to_string(),
            kind.url(key),
        ]
    };
    let run = |args: &[String], env: &[(String, String)]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        mapsnap(&args, env)
    };

    if kind == Kind::Gcs {
        let proxy = Proxy::start(server.port);
        let env = server.env(&proxy.endpoint());
        let o = run(&dump_args("auth.mapsnap"), &env);
        assert!(o.status.success(), "{}", text(&o));
        let o = mapsnap(&["verify", &kind.url("auth.mapsnap")], &env);
        assert!(o.status.success(), "{}", text(&o));
        let seen = proxy.seen();
        let requests = seen.iter().filter(|l| !l.contains(':')).count();
        let auth: Vec<&String> = seen
            .iter()
            .filter(|l| l.to_ascii_lowercase().starts_with("authorization:"))
            .collect();
        assert!(requests >= 4, "uploads, lookups and reads: {seen:?}");
        assert_eq!(
            auth.len(),
            requests,
            "every request carries a token: {seen:?}"
        );
        for a in auth {
            assert_eq!(
                a.split_once(':').map(|(_, v)| v.trim()),
                Some(format!("Bearer {GCS_TOKEN}").as_str()),
                "{seen:?}"
            );
        }

        let bad_key = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(bad_key.path(), b"{\"type\": \"service_account\"}").expect("write");
        let mut bad = server.env(&server.endpoint());
        bad.retain(|(k, _)| k != "GOOGLE_BEARER_TOKEN");
        bad.push((
            "GOOGLE_SERVICE_ACCOUNT".into(),
            bad_key.path().display().to_string(),
        ));
        let o = mapsnap(&["verify", &kind.url("auth.mapsnap")], &bad);
        assert!(!o.status.success(), "{}", text(&o));
        let line = error_line(&o);
        assert!(line.contains(&kind.url("auth.mapsnap")), "{line}");
        return;
    }

    let (good, wrong) = match kind {
        Kind::S3 => {
            let (id, secret) = server.enforce_auth();
            let good = with(
                &server.env(&server.endpoint()),
                &[
                    ("AWS_ACCESS_KEY_ID", id.as_str()),
                    ("AWS_SECRET_ACCESS_KEY", secret.as_str()),
                ],
            );
            let wrong = vec![
                with(&good, &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")]),
                with(&good, &[("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")]),
            ];
            (good, wrong)
        }
        _ => {
            let good = server.env(&server.endpoint());
            // A well-formed key that is not the account's, and another account's name.
            let other_key =
                "bm90LXRoZS1hY2NvdW50LWtleS1ub3QtdGhlLWFjY291bnQta2V5LW5vdC10aGUta2V5IQ==";
            let wrong = vec![
                with(&good, &[("AZURE_STORAGE_ACCOUNT_KEY", other_key)]),
                with(
                    &good,
                    &[
                        ("AZURE_STORAGE_ACCOUNT_NAME", "otheraccount"),
                        ("AZURE_STORAGE_ACCOUNT_KEY", other_key),
                    ],
                ),
            ];
            (good, wrong)
        }
    };
    let o = run(&dump_args("auth.mapsnap"), &good);
    assert!(o.status.success(), "the right key works: {}", text(&o));

    for env in &wrong {
        for args in [
            vec!["verify".to_string(), kind.url("auth.mapsnap")],
            dump_args("auth2.mapsnap"),
        ] {
            let o = run(&args, env);
            assert_eq!(o.status.code(), Some(7), "{args:?}: {}", text(&o));
            let line = error_line(&o);
            assert!(line.contains(&kind.url("auth")), "{line}");
            assert!(line.contains("access denied"), "{line}");
            assert!(line.contains("credentials"), "{line}");
        }
    }
    if kind == Kind::Azure {
        // (moto with IAM on refuses the test client's own reads)
        assert_eq!(server.object("auth2.mapsnap"), None, "nothing written");
    }
}

/// Missing object, missing bucket, unreachable endpoint, bad location: one line each.
fn missing_and_unreachable(kind: Kind) {
    let dst = pin_dir(kind, "missing-dst");
    let server = Server::start(kind);
    let env = server.env(&server.endpoint());
    let o = mapsnap(&["verify", &kind.url("nothing.mapsnap")], &env);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    let line = error_line(&o);
    assert!(
        line.contains(&kind.url("nothing.mapsnap")) && line.contains("no such object"),
        "{line}"
    );

    let nobucket = format!("{}://nobucket/x.mapsnap", kind.scheme());
    let o = mapsnap(
        &[
            "restore",
            &nobucket,
            "--pin-root",
            dst.to_str().expect("utf8"),
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    let line = error_line(&o);
    assert!(line.contains(&nobucket), "{line}");
    match kind {
        Kind::S3 => assert!(line.contains("bucket does not exist"), "{line}"),
        Kind::Azure | Kind::Gcs => assert!(line.contains("no such object"), "{line}"),
    }

    let closed = storage_common::free_port();
    let dead = with(
        &server.env(&format!("http://127.0.0.1:{closed}")),
        &[("MAPSNAP_STORAGE_RETRIES", "2")],
    );
    let t = Instant::now();
    let o = mapsnap(&["inspect", &kind.url("x.mapsnap")], &dead);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    let line = error_line(&o);
    assert!(
        line.contains(&kind.url("x.mapsnap"))
            && line.contains(&format!(
                "cannot reach the storage endpoint http://127.0.0.1:{closed}"
            )),
        "{line}"
    );
    assert!(t.elapsed().as_secs() < 30, "retries are bounded");

    // The overall timeout bounds a stuck transfer: an endpoint that takes the connection
    // and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_ep = format!("http://{}", silent.local_addr().expect("addr"));
    let t = Instant::now();
    let o = mapsnap(
        &["--timeout", "2s", "verify", &kind.url("x.mapsnap")],
        &server.env(&silent_ep),
    );
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(
        error_line(&o).contains("overall timeout of 2s"),
        "{}",
        text(&o)
    );
    assert!(t.elapsed().as_secs() < 15, "{:?}", t.elapsed());
    drop(silent);

    for bad in [
        format!("{}://key:secret@snap/x", kind.scheme()),
        format!("{}://snap/x?endpoint=http://elsewhere", kind.scheme()),
        format!("{}://snap:10000/x", kind.scheme()),
    ] {
        let o = mapsnap(&["verify", &bad], &env);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(error_line(&o).contains("refused"), "{}", text(&o));
    }
}

/// An existing snapshot is replaced only with --overwrite; small objects are one conditional
/// write (S3 and Azure `If-None-Match: *`, GCS `ifGenerationMatch=0`), multipart ones are
/// checked before completion (GCS: the resumable upload carries `ifGenerationMatch=0` too).
fn overwrite_rules(kind: Kind) {
    let src = pin_dir(kind, "ow-src");
    let server = Server::start(kind);
    let proxy = Proxy::start(server.port);
    let env = with(
        &server.env(&proxy.endpoint()),
        &[("MAPSNAP_STORAGE_PART_SIZE", "5MiB")],
    );
    let m = counters(&src, 10, 0);
    let loc = kind.url("ow.mapsnap");
    let dump = |extra: &[&str]| {
        let mut args = vec!["dump", "--pin", src.to_str().expect("utf8"), "-o", &loc];
        args.extend_from_slice(extra);
        mapsnap(&args, &env)
    };
    let o = dump(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let first = server.object("ow.mapsnap").expect("object");
    let first_manifest = server.object("ow.mapsnap.manifest.json").expect("manifest");

    m.update(Some(&1u32.to_ne_bytes()), &5u64.to_ne_bytes(), 0)
        .expect("update");
    let o = dump(&[]);
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    let line = error_line(&o);
    assert!(
        line.contains(&format!("{loc}: already exists")) && line.contains("--overwrite"),
        "{line}"
    );
    assert_eq!(
        server.object("ow.mapsnap"),
        Some(first.clone()),
        "unchanged"
    );
    assert_eq!(
        server.object("ow.mapsnap.manifest.json"),
        Some(first_manifest)
    );

    let o = dump(&["--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    let second = server.object("ow.mapsnap").expect("object");
    assert_ne!(second, first, "replaced");
    let o = mapsnap(&["verify", &loc], &env);
    assert!(text(&o).contains("manifest: matches"), "{}", text(&o));

    // Another writer creates the key while ours is in progress: the commit refuses, for a
    // single conditional write and for a multipart upload alike.
    let mut cfg = server.config(&proxy.endpoint());
    cfg.part_size = 5 << 20;
    cfg.retries = 1;
    for (key, size) in [("race-small", 1000usize), ("race-big", 12 << 20)] {
        let st = Storage::open(Location::parse(&kind.url(key)).expect("loc"), &cfg).expect("open");
        let mut w = st.writer(false).expect("writer");
        w.write_all(&vec![1u8; size]).expect("write");
        server.put_object(key, b"the other writer");
        let r = w.commit();
        if kind == Kind::Gcs && key == "race-small" {
            // fake-gcs-server ignores ifGenerationMatch (the real service answers 412): the
            // case can only show that the write was sent with the condition.
            let upload = proxy
                .seen()
                .into_iter()
                .find(|l| l.starts_with("POST ") && l.contains(&format!("name={key}")))
                .expect("the upload request went through the proxy");
            assert!(
                upload.contains("uploadType=media") && upload.contains("ifGenerationMatch=0"),
                "{upload}"
            );
            eprintln!("gs: race-small sent as `{upload}`; the emulator replaced: {r:?}");
            continue;
        }
        let e = r.expect_err("must not replace");
        assert_eq!(e.kind, ErrorKind::AlreadyExists, "{key}: {e}");
        assert_eq!(
            server.object(key).as_deref(),
            Some(&b"the other writer"[..]),
            "{key}"
        );
    }
    if kind == Kind::Gcs {
        let start = proxy
            .seen()
            .into_iter()
            .find(|l| l.starts_with("POST ") && l.contains("name=race-big"))
            .expect("the resumable upload started through the proxy");
        assert!(
            start.contains("uploadType=resumable") && start.contains("ifGenerationMatch=0"),
            "{start}"
        );
    }
    match kind {
        Kind::S3 => assert_eq!(
            server.leftovers(),
            Some(vec![]),
            "the refused multipart upload was aborted"
        ),
        // Azure cannot drop the blocks of a refused upload while another blob holds the key:
        // they stay with that blob (Azurite keeps them across its next Put Blob too) until it
        // is deleted. Show exactly that.
        Kind::Azure => {
            assert_eq!(server.leftovers(), Some(vec!["race-big".to_string()]));
            let st = Storage::open(Location::parse(&kind.url("race-big")).expect("loc"), &cfg)
                .expect("open");
            assert!(st.delete().expect("delete"));
            assert_eq!(server.leftovers(), Some(vec![]));
        }
        Kind::Gcs => {}
    }
}

/// A writer dropped in the middle of a multipart upload (a failed dump) aborts it: no parts
/// remain, no object appears.
fn abandoned_upload_is_aborted(kind: Kind) {
    let server = Server::start(kind);
    let proxy = Proxy::start(server.port);
    let mut cfg = server.config(&proxy.endpoint());
    cfg.part_size = 5 << 20;
    let st =
        Storage::open(Location::parse(&kind.url("abandoned")).expect("loc"), &cfg).expect("open");
    let mut w = st.writer(false).expect("writer");
    w.write_all(&vec![7u8; 12 << 20]).expect("write two parts");
    match server.leftovers() {
        Some(left) => assert_eq!(left, vec!["abandoned".to_string()], "upload started"),
        None => assert!(
            proxy
                .seen()
                .iter()
                .any(|l| l.starts_with("POST ") && l.contains("uploadType=resumable")),
            "GCS: a resumable upload started: {:?}",
            proxy.seen()
        ),
    }
    drop(w);
    assert_eq!(server.object("abandoned"), None);
    match server.leftovers() {
        Some(left) => assert!(left.is_empty(), "aborted: {left:?}"),
        None => {
            // The session was cancelled (GCS answers 499 and drops it). fake-gcs-server
            // answers the same but keeps the session, so only the request can be checked.
            let seen = proxy.seen();
            assert!(
                seen.iter()
                    .any(|l| l.starts_with("DELETE ") && l.contains("upload_id=")),
                "no session cancel: {seen:?}"
            );
        }
    }
}

/// Deleting a snapshot removes it and its manifest; deleting again finds nothing and is fine
/// (the operator's finalizer retries cleanups).
fn delete_removes_snapshot_and_manifest(kind: Kind) {
    let src = pin_dir(kind, "del-src");
    let server = Server::start(kind);
    let env = server.env(&server.endpoint());
    let _m = counters(&src, 5, 0);
    let loc = kind.url("del.mapsnap");
    let o = mapsnap(
        &["dump", "--pin", src.to_str().expect("utf8"), "-o", &loc],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        server.object("del.mapsnap").is_some()
            && server.object("del.mapsnap.manifest.json").is_some()
    );
    let cfg = server.config(&server.endpoint());
    let st = Storage::open(Location::parse(&loc).expect("loc"), &cfg).expect("open");
    assert!(st.delete().expect("delete"), "it was there");
    assert_eq!(server.object("del.mapsnap"), None);
    assert_eq!(server.object("del.mapsnap.manifest.json"), None);
    assert!(
        !st.delete().expect("delete again"),
        "nothing left to delete"
    );
}
