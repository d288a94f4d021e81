//! mapsnap-hook as OCI hooks of real runc containers (no CRIU): poststop snapshot and
//! createRuntime restore, poststart `wait` fill, refusals, corrupt snapshots.
//!
//! Each test runs the static test app in a busybox container whose /sys/fs/bpf is a host
//! bpffs directory; pings over the container's veth drive its XDP counters (see common/).

mod common;

use std::fs;
use std::path::Path;

use common::*;

const STOP_TO: &str = "/data/app.mapsnap";

/// Runs an app, sends `pings`, stops it with a poststop snapshot to /data/app.mapsnap.
fn counted_then_stopped(b: &Bench, pings: u32) -> [u64; 3] {
    let bundle = b.bundle(
        "first",
        &[
            ("mapsnap.io/snapshot-on-stop", "true"),
            ("mapsnap.io/snapshot-to", STOP_TO),
        ],
    );
    let id = format!("{}-first", b.tag);
    b.start_ok(&bundle, &id);
    assert_eq!(b.pins(), vec!["pkt_count", "src_count"]);
    b.ping(pings);
    let before = b.counters();
    assert_eq!(
        before[2],
        u64::from(pings),
        "echo requests counted: {before:?}"
    );
    assert_eq!(b.echo_from_host(), u64::from(pings));
    b.stop(&id);
    assert!(
        b.data.join("app.mapsnap").exists(),
        "poststop wrote no snapshot:\n{}",
        b.log_text()
    );
    before
}

#[test]
fn poststop_snapshot_then_create_runtime_restore() {
    let b = Bench::new("stop");
    let before = counted_then_stopped(&b, 3);
    let saved = b.log_lines_with("saved 2 pinned maps");
    assert_eq!(
        saved.len(),
        1,
        "one poststop summary line:\n{}",
        b.log_text()
    );
    assert_eq!(saved[0]["span"]["stage"], "poststop");

    // A new node: program detached, pins gone.
    b.wipe_node();
    assert!(b.pins().is_empty());

    let bundle = b.bundle("second", &[("mapsnap.io/restore-from", STOP_TO)]);
    let id = format!("{}-second", b.tag);
    b.start_ok(&bundle, &id);
    // The pins were restored before the app ran, and it re-used them (pinned by name).
    assert_eq!(b.pins(), vec!["pkt_count", "src_count"]);
    let restored = b.counters();
    assert_eq!(restored, before, "the app found the saved counters");
    b.ping(2);
    let after = b.counters();
    eprintln!(
        "counters before stop {before:?}, after restore {restored:?}, after 2 more pings {after:?}"
    );
    assert_eq!(after[2], 5, "3 echo requests before, 2 after: {after:?}");
    assert_eq!(b.echo_from_host(), 5);
    assert_eq!(
        b.log_lines_with("restored 2 pinned maps").len(),
        1,
        "{}",
        b.log_text()
    );
    b.stop(&id);
}

#[test]
fn poststart_wait_fills_the_apps_own_pins() {
    let b = Bench::new("wait");
    let before = counted_then_stopped(&b, 4);
    b.wipe_node();
    let bundle = b.bundle(
        "second",
        &[
            ("mapsnap.io/restore-from", STOP_TO),
            ("mapsnap.io/restore-mode", "wait"),
        ],
    );
    let id = format!("{}-second", b.tag);
    // runc 1.1 runs poststart before the app execs: the hook waits in the background.
    b.start_ok(&bundle, &id);
    b.wait_log("filled 2 pinned maps");
    let filled = b.counters();
    assert_eq!(filled[2], before[2], "filled from the snapshot: {filled:?}");
    b.ping(1);
    assert_eq!(b.counters()[2], 5);
    assert_eq!(b.echo_from_host(), 5);
    let lines = b.log_lines_with("filled 2 pinned maps");
    assert_eq!(lines.len(), 1, "{}", b.log_text());
    assert_eq!(lines[0]["span"]["stage"], "poststart");
    b.stop(&id);
}

/// A container start that the createRuntime hook must refuse; nothing may appear in the
/// container's bpffs directory.
fn refused_start(b: &Bench, name: &str, annotations: &[(&str, &str)], want: &str) {
    let bundle = b.bundle(name, annotations);
    let id = format!("{}-{name}", b.tag);
    let out = b.start(&bundle, &id);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{name}: the start must fail");
    assert!(
        stderr.contains(want),
        "{name}: runc must show the hook's message containing {want:?}:\n{stderr}"
    );
    assert!(
        b.pins().is_empty(),
        "{name}: nothing pinned: {:?}",
        b.pins()
    );
    let _ = run(b.runc().args(["delete", "-f", &id]));
}

#[test]
fn refusals_touch_nothing() {
    let b = Bench::new("refuse");
    // 1. A restore annotation naming files outside the container's mounts.
    refused_start(
        &b,
        "outside",
        &[("mapsnap.io/restore-from", "/etc/passwd")],
        "outside the container's bind mounts",
    );
    refused_start(
        &b,
        "dotdot",
        &[("mapsnap.io/restore-from", "/data/../etc/passwd")],
        "contains `..`",
    );
    refused_start(
        &b,
        "host-path",
        &[("mapsnap.io/restore-from", "file:///tmp/x.mapsnap")],
        "outside the container's bind mounts",
    );
    refused_start(
        &b,
        "remote",
        &[("mapsnap.io/restore-from", "s3://someone-elses-bucket/x")],
        "refused",
    );

    // A node that requires the agent's restore request refuses a restore-from annotation that
    // no request backs (anyone who can create pods can set annotations).
    b.write_config("require_restore_request = true\n");
    refused_start(
        &b,
        "no-request",
        &[
            ("mapsnap.io/restore-from", "/data/app.mapsnap"),
            ("io.kubernetes.pod.namespace", "edge"),
            ("io.kubernetes.pod.name", "lb-0"),
        ],
        "no (unexpired) restore request for pod edge/lb-0",
    );
    b.write_config("");

    // 2. Snapshots whose pin paths escape the container's bpffs mounts.
    for (file, pin, want) in [
        (
            "dotdot.mapsnap",
            "sys/fs/bpf/../../../etc/evil",
            "contains `..`",
        ),
        ("abs.mapsnap", "/etc/evil", "is absolute"),
        (
            "elsewhere.mapsnap",
            "etc/evil",
            "outside the container's bpffs mounts",
        ),
        ("volume.mapsnap", "data/evil", "not a bpffs"),
    ] {
        write_snapshot_with_pin(&b.data.join(file), pin);
        refused_start(
            &b,
            &format!("pin-{}", file.trim_end_matches(".mapsnap")),
            &[("mapsnap.io/restore-from", &format!("/data/{file}"))],
            want,
        );
        assert!(!Path::new("/etc/evil").exists());
        assert!(!b.data.join("evil").exists());
    }

    // 3. A map on the host outside the container's mounts, reachable by a symlink placed in
    //    the container's bpffs directory: not followed, not saved; a `maps` pattern naming
    //    host paths is refused (the poststop hook logs it and exits 0).
    let host_dir = std::path::PathBuf::from(format!("{}-host", b.bpf_dir.display()));
    b.extra_cleanup.borrow_mut().push(host_dir.clone());
    fs::create_dir_all(&host_dir).expect("mkdir host dir");
    let secret = host_map(&host_dir.join("secret"), 0x5ec4e7);
    std::os::unix::fs::symlink(host_dir.join("secret"), b.bpf_dir.join("secret"))
        .expect("symlink in bpffs");
    let bundle = b.bundle(
        "link",
        &[
            ("mapsnap.io/snapshot-on-stop", "true"),
            ("mapsnap.io/snapshot-to", "/data/link.mapsnap"),
        ],
    );
    let id = format!("{}-link", b.tag);
    b.start_ok(&bundle, &id);
    b.stop(&id);
    let summary =
        mapsnap::format::verify(fs::File::open(b.data.join("link.mapsnap")).expect("open"))
            .expect("verify");
    let names: Vec<&str> = summary.maps.iter().map(|(m, _)| m.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["pkt_count", "src_count"],
        "the host map was not saved"
    );
    assert!(
        !b.log_lines_with("refused: symbolic link").is_empty(),
        "the link is logged:\n{}",
        b.log_text()
    );
    let bundle = b.bundle(
        "glob",
        &[
            ("mapsnap.io/snapshot-on-stop", "true"),
            ("mapsnap.io/snapshot-to", "/data/glob.mapsnap"),
            ("mapsnap.io/maps", "/sys/fs/bpf/*, /etc/*"),
        ],
    );
    let id = format!("{}-glob", b.tag);
    b.start_ok(&bundle, &id);
    let out = b.stop(&id);
    assert!(out.status.success(), "poststop never fails the runtime");
    assert!(!b.data.join("glob.mapsnap").exists());
    assert!(
        !b.log_lines_with("maps pattern \\\"/etc/*\\\"").is_empty(),
        "the refusal is logged:\n{}",
        b.log_text()
    );
    // The host map was never touched.
    let mut v = [0u8; 8];
    assert!(
        secret
            .lookup(Some(&0u32.to_ne_bytes()), &mut v, 0)
            .expect("lookup")
    );
    assert_eq!(u64::from_ne_bytes(v), 0x5ec4e7);
}

#[test]
fn corrupt_snapshot_fails_strict_and_is_skipped_best_effort() {
    let b = Bench::new("corrupt");
    counted_then_stopped(&b, 2);
    b.wipe_node();
    let path = b.data.join("app.mapsnap");
    let mut bytes = fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(b.data.join("bad.mapsnap"), &bytes).expect("write");

    refused_start(
        &b,
        "strict",
        &[("mapsnap.io/restore-from", "/data/bad.mapsnap")],
        "snapshot is corrupt",
    );

    let bundle = b.bundle(
        "lenient",
        &[
            ("mapsnap.io/restore-from", "/data/bad.mapsnap"),
            ("mapsnap.io/policy", "best-effort"),
        ],
    );
    let id = format!("{}-lenient", b.tag);
    b.start_ok(&bundle, &id);
    // The app started with fresh maps.
    assert_eq!(b.counters()[2], 0);
    let lines = b.log_lines_with("not failing the runtime");
    assert_eq!(lines.len(), 1, "{}", b.log_text());
    assert_eq!(lines[0]["level"], "ERROR");
    b.stop(&id);
}

/// A snapshot holding one small array map whose pin path is `pin`.
fn write_snapshot_with_pin(path: &Path, pin: &str) {
    use mapsnap::model::map_type;
    use mapsnap::sys::{CreateAttrs, Map};
    let map = Map::create(&CreateAttrs {
        map_type: map_type::ARRAY,
        name: "evil",
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        ..CreateAttrs::default()
    })
    .expect("create map");
    let found = mapsnap::discover::Found::from_map(map, Some(pin.to_string())).expect("found");
    let info = mapsnap::model::SnapshotInfo {
        tool: "test".into(),
        created_unix: 0,
        hostname: String::new(),
        kernel: String::new(),
        possible_cpus: 1,
        source: "test".into(),
    };
    let file = fs::File::create(path).expect("create");
    mapsnap::dump::dump(
        &[found],
        file,
        &info,
        &mapsnap::dump::DumpOptions::default(),
        &mapsnap::progress::NoProgress,
    )
    .expect("dump");
}

/// An array map pinned at `path` holding `value` at key 0.
fn host_map(path: &Path, value: u64) -> mapsnap::sys::Map {
    use mapsnap::model::map_type;
    use mapsnap::sys::{CreateAttrs, Map};
    let map = Map::create(&CreateAttrs {
        map_type: map_type::ARRAY,
        name: "secret",
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        ..CreateAttrs::default()
    })
    .expect("create map");
    map.update(Some(&0u32.to_ne_bytes()), &value.to_ne_bytes(), 0)
        .expect("update");
    map.pin(path).expect("pin");
    map
}

#[test]
fn rebase_annotations_reach_the_restore() {
    let b = Bench::new("rebase");
    let before = counted_then_stopped(&b, 3);
    b.wipe_node();
    // A member the maps do not have: the library refuses the restore before creating a map.
    refused_start(
        &b,
        "no-member",
        &[
            ("mapsnap.io/restore-from", STOP_TO),
            ("mapsnap.io/rebase", "value.expires=monotonic_ns"),
        ],
        "expires",
    );
    // A bad specification is refused by the hook, naming the annotation.
    refused_start(
        &b,
        "bad-spec",
        &[
            ("mapsnap.io/restore-from", STOP_TO),
            ("mapsnap.io/rebase", "value.expires=monotonic_hours"),
        ],
        "annotation mapsnap.io/rebase",
    );
    // The mode alone rebases only BTF-tagged members: these counters have none, so they come
    // back as they were.
    let bundle = b.bundle(
        "mode",
        &[
            ("mapsnap.io/restore-from", STOP_TO),
            ("mapsnap.io/rebase-mode", "elapsed"),
        ],
    );
    let id = format!("{}-mode", b.tag);
    b.start_ok(&bundle, &id);
    assert_eq!(b.counters(), before);
    b.stop(&id);
}
