//! Attacks on mapsnap-hook, performed for real on this kernel's bpffs: each test plays the
//! attacker (a container flipping names in its own bpffs directory or a shared volume, a pod
//! naming another tenant's snapshot, a crafted URL) while the real hook binary runs, then
//! checks that nothing outside the target changed, byte for byte. The attacks that need a
//! running container are in attacks_runc.rs.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::attack::*;
use common::*;
use mapsnap::sys::Map;
use serde_json::json;

/// Finding: in `restore-mode: wait` the hook polled the pin by path, following links, so a
/// container flipping `x` between its own pin and a link to another tenant's map made the
/// root hook empty and refill that map. Here a thread flips `x` 10,000+ times while the hook
/// runs forty times; the other tenant's map must stay byte-identical.
#[test]
fn wait_mode_link_flip_never_fills_another_tenants_map() {
    let w = World::new("flip");
    let victim = array("victim", [0x1111, 0x2222, 0x3333, 0x4444]);
    victim.pin(&w.victim.join("map")).expect("pin victim");
    let before = contents(&victim);
    let victim_id = victim.info().expect("info").id;
    let snap = snapshot_bytes(vec![(array("x", [0x55; 4]), "sys/fs/bpf/x")]);
    fs::write(w.data.join("snap.mapsnap"), snap).expect("snapshot");
    let own = array("own", [0; 4]);
    let (bpf, target) = (w.bpf.clone(), w.victim.join("map"));
    let own2 = own.try_clone().expect("clone");
    let flipper = Flipper::start(10_000, move || {
        let _ = fs::remove_file(bpf.join("tmp_pin"));
        if own2.pin(&bpf.join("tmp_pin")).is_ok() {
            let _ = fs::rename(bpf.join("tmp_pin"), bpf.join("x"));
        }
        let _ = fs::remove_file(bpf.join("tmp_link"));
        if std::os::unix::fs::symlink(&target, bpf.join("tmp_link")).is_ok() {
            let _ = fs::rename(bpf.join("tmp_link"), bpf.join("x"));
        }
    });
    let bundle = w.bundle(
        "b",
        &[
            ("mapsnap.io/restore-from", "/data/snap.mapsnap"),
            ("mapsnap.io/restore-mode", "wait"),
        ],
    );
    // The "container's init": a process that has started (not runc's init).
    let mut init = Command::new("sleep").arg("120").spawn().expect("sleep");
    let mut filled = 0;
    let mut leaks = Vec::new();
    for i in 0..40 {
        let out = w.hook("poststart", &bundle, &format!("flip-{i}"), Some(init.id()));
        let err = stderr(&out);
        if out.status.success() {
            filled += 1;
        }
        // Whole numbers only: log timestamps (".843699Z") hold the digits too.
        let numbers: Vec<&str> = err.split(|c: char| !c.is_ascii_digit()).collect();
        if numbers.contains(&"4369")
            || err.contains("victim")
            || err.contains(w.root.to_str().expect("utf-8"))
        {
            leaks.push(err);
        }
    }
    let flips = flipper.finish();
    let _ = init.kill();
    let _ = init.wait();
    eprintln!("{flips} flips, {filled} of 40 runs filled the container's own map");
    assert!(flips >= 10_000);
    assert_eq!(contents(&victim), before, "the other tenant's map changed");
    assert!(
        leaks.is_empty(),
        "messages leak the other tenant's map or host paths: {leaks:?}"
    );
    assert_eq!(
        Map::from_pin(&w.victim.join("map"))
            .expect("victim pin")
            .info()
            .expect("info")
            .id,
        victim_id
    );
    assert!(
        filled > 0,
        "the hook never filled the real pin:\n{}",
        w.log_text()
    );
    assert_eq!(
        contents(&own),
        0x55u64.to_ne_bytes().repeat(4),
        "own map filled"
    );
}

/// Finding: volume paths were lstat-checked and then used by name, so a sibling container
/// turning a directory of a shared volume into a link to a host directory got a poststop
/// snapshot written over a host file, or a host file read as a snapshot. Here `sub` and a
/// link to a host directory trade places continuously while the hook writes and reads
/// `/data/sub/...` twenty times each.
#[test]
fn shared_volume_link_flip_never_reaches_a_host_file() {
    let w = World::new("volume");
    // The host directory the link points at: a file named like the snapshot, and a valid
    // snapshot the container must never get to read.
    fs::write(w.host.join("app.mapsnap"), b"host file: do not touch\n").expect("host file");
    let evil = snapshot_bytes(vec![(array("hostsecret", [7; 4]), "sys/fs/bpf/hostsecret")]);
    fs::write(w.host.join("evil.mapsnap"), &evil).expect("host snapshot");
    let host_before: Vec<(String, Vec<u8>)> = listing(&w.host);
    fs::create_dir(w.data.join("sub")).expect("sub");
    let fine = snapshot_bytes(vec![(array("fine", [1; 4]), "sys/fs/bpf/fine")]);
    fs::write(w.data.join("sub/evil.mapsnap"), &fine).expect("volume snapshot");
    std::os::unix::fs::symlink(&w.host, w.data.join("alt")).expect("link");
    let own = array("own", [9; 4]);
    own.pin(&w.bpf.join("own")).expect("pin");
    let (a, b) = (w.data.join("sub"), w.data.join("alt"));
    let flipper = Flipper::start(10_000, move || {
        exchange(&a, &b);
    });
    let stop = w.bundle(
        "stop",
        &[
            ("mapsnap.io/snapshot-on-stop", "true"),
            ("mapsnap.io/snapshot-to", "/data/sub/app.mapsnap"),
        ],
    );
    let start = w.bundle(
        "start",
        &[("mapsnap.io/restore-from", "/data/sub/evil.mapsnap")],
    );
    let (mut written, mut restored) = (0, 0);
    for i in 0..20 {
        let out = w.hook("poststop", &stop, &format!("vol-stop-{i}"), None);
        assert!(
            out.status.success(),
            "poststop never fails: {}",
            stderr(&out)
        );
        if did(&out) {
            written += 1;
        }
        let out = w.hook("createRuntime", &start, &format!("vol-start-{i}"), None);
        assert!(
            !w.bpf.join("hostsecret").exists(),
            "the host's snapshot was read and restored (run {i}): {}",
            stderr(&out)
        );
        if out.status.success() {
            restored += 1;
            fs::remove_file(w.bpf.join("fine")).expect("rm restored pin");
        }
        assert!(
            !stderr(&out).contains(w.host.to_str().expect("utf-8")),
            "host path leaked"
        );
    }
    let flips = flipper.finish();
    eprintln!("{flips} flips; {written} snapshots written, {restored} restores from the volume");
    assert_eq!(listing(&w.host), host_before, "the host directory changed");
    assert!(written > 0 && restored > 0, "{}", w.log_text());
}

/// Finding: the bpffs walk and the publish used paths, so a writer on the container's bpffs
/// mount could put another tenant's maps into a snapshot (a directory flipped into a link
/// during the walk) or have restored pins renamed into another tenant's directory.
#[test]
fn bpffs_dir_flip_never_takes_or_touches_foreign_maps() {
    let w = World::new("walk");
    let victim = array("victimmap", [0xabcd; 4]);
    victim.pin(&w.victim.join("victimmap")).expect("pin");
    let before = contents(&victim);
    fs::create_dir(w.bpf.join("sub")).expect("sub");
    array("ownmap", [3; 4])
        .pin(&w.bpf.join("sub/ownmap"))
        .expect("pin own");
    std::os::unix::fs::symlink(&w.victim, w.bpf.join("alt")).expect("link");
    let victim_names = || {
        let mut v: Vec<String> = fs::read_dir(&w.victim)
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let names_before = victim_names();
    let snap = snapshot_bytes(vec![(array("newmap", [5; 4]), "sys/fs/bpf/sub/newmap")]);
    fs::write(w.data.join("new.mapsnap"), snap).expect("snapshot");
    let (a, b) = (w.bpf.join("sub"), w.bpf.join("alt"));
    let flipper = Flipper::start(10_000, move || {
        exchange(&a, &b);
    });
    let stop = w.bundle(
        "stop",
        &[
            ("mapsnap.io/snapshot-on-stop", "true"),
            ("mapsnap.io/snapshot-to", "/data/walk.mapsnap"),
        ],
    );
    let start = w.bundle("start", &[("mapsnap.io/restore-from", "/data/new.mapsnap")]);
    let mut snapshots = 0;
    for i in 0..100 {
        let out = w.hook("poststop", &stop, &format!("walk-{i}"), None);
        assert!(out.status.success());
        if let Ok(bytes) = fs::read(w.data.join("walk.mapsnap")) {
            let names = names_in(&bytes);
            assert!(
                !names.contains(&"victimmap".to_string()),
                "run {i}: {names:?}"
            );
            snapshots += 1;
            fs::remove_file(w.data.join("walk.mapsnap")).expect("rm");
        }
        let _ = w.hook("createRuntime", &start, &format!("walk-start-{i}"), None);
        // Whatever got published is in the container's own directory: remove it again.
        for d in [w.bpf.join("sub"), w.bpf.join("alt")] {
            if fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir()) {
                let _ = fs::remove_file(d.join("newmap"));
            }
        }
        assert_eq!(
            victim_names(),
            names_before,
            "run {i}: the other tenant's directory changed"
        );
    }
    let flips = flipper.finish();
    eprintln!("{flips} flips, {snapshots} snapshots checked");
    assert_eq!(contents(&victim), before);
    assert_eq!(victim_names(), names_before);
    assert!(snapshots > 0, "{}", w.log_text());
}

/// Finding: tenants. A pod in one namespace names another namespace's snapshot by its bare
/// name, by `..`, or pretends to be in that namespace through a second pod-identity key; with
/// the operator installed, a restore needs the node agent's request.
#[test]
fn another_tenants_snapshot_is_never_read_or_overwritten() {
    let w = World::new("tenant");
    let base = w.dir.path().join("store");
    w.write_config(&format!("storage_base = \"{}\"\n", base.display()));
    array("ownmap", [0x77; 4])
        .pin(&w.bpf.join("ownmap"))
        .expect("pin");
    let pod = |ns: &'static str, name: &'static str| {
        vec![
            ("io.kubernetes.pod.namespace", ns),
            ("io.kubernetes.pod.name", name),
        ]
    };
    // team-a saves its maps under a bare name.
    let mut ann = pod("team-a", "a-0");
    ann.extend([
        ("mapsnap.io/snapshot-on-stop", "true"),
        ("mapsnap.io/snapshot-to", "app.mapsnap"),
    ]);
    let out = w.hook("poststop", &w.bundle("a-stop", &ann), "a-stop", None);
    assert!(did(&out), "{}", stderr(&out));
    // Wherever it went, it is the only file under the base.
    let a_file = only_file(&base);
    let a_bytes = fs::read(&a_file).expect("team-a's snapshot");
    fs::remove_file(w.bpf.join("ownmap")).expect("rm");
    // team-b tries to read it, every way.
    for (i, from) in ["app.mapsnap", "../team-a/app.mapsnap", "team-a/app.mapsnap"]
        .into_iter()
        .enumerate()
    {
        let mut ann = pod("team-b", "b-0");
        ann.push(("mapsnap.io/restore-from", from));
        let out = w.hook(
            "createRuntime",
            &w.bundle(&format!("b{i}"), &ann),
            "b",
            None,
        );
        assert!(
            !out.status.success(),
            "{from}: team-b read team-a's snapshot"
        );
        assert!(!w.bpf.join("ownmap").exists(), "{from}: restored");
    }
    // A second pod-identity key claiming team-a is refused, not believed.
    let mut ann = pod("team-b", "b-0");
    ann.extend([
        ("io.kubernetes.cri.sandbox-namespace", "team-a"),
        ("mapsnap.io/restore-from", "app.mapsnap"),
    ]);
    let out = w.hook("createRuntime", &w.bundle("spoof", &ann), "b", None);
    assert!(
        !out.status.success() && stderr(&out).contains("disagrees"),
        "{}",
        stderr(&out)
    );
    assert!(!w.bpf.join("ownmap").exists());
    // team-b writing the same bare name lands in its own namespace.
    array("bmap", [0x99; 4])
        .pin(&w.bpf.join("bmap"))
        .expect("pin");
    let mut ann = pod("team-b", "b-0");
    ann.extend([
        ("mapsnap.io/snapshot-on-stop", "true"),
        ("mapsnap.io/snapshot-to", "app.mapsnap"),
    ]);
    let out = w.hook("poststop", &w.bundle("b-stop", &ann), "b-stop", None);
    assert!(did(&out), "{}", stderr(&out));
    assert_eq!(
        fs::read(&a_file).expect("a"),
        a_bytes,
        "team-a's snapshot changed"
    );
    assert_eq!(
        a_file,
        base.join("team-a/app.mapsnap"),
        "below the namespace"
    );
    assert!(base.join("team-b/app.mapsnap").exists());
    fs::remove_file(w.bpf.join("bmap")).expect("rm");
    // {namespace}/{pod}: a sibling pod of the same namespace is refused too.
    w.write_config(&format!(
        "storage_base = \"{}\"\ntenant_prefix = \"{{namespace}}/{{pod}}\"\n",
        base.display()
    ));
    let mut ann = pod("team-a", "a-1");
    ann.push(("mapsnap.io/restore-from", "app.mapsnap"));
    let out = w.hook("createRuntime", &w.bundle("a1", &ann), "a1", None);
    assert!(!out.status.success(), "a sibling pod read a-0's snapshot");
    // With the operator installed, its own pod's name still needs the agent's request.
    w.write_config(&format!(
        "storage_base = \"{}\"\noperator = true\n",
        base.display()
    ));
    let mut ann = pod("team-a", "a-0");
    ann.push(("mapsnap.io/restore-from", "app.mapsnap"));
    let out = w.hook("createRuntime", &w.bundle("op", &ann), "op", None);
    assert!(
        !out.status.success() && stderr(&out).contains("no (unexpired) restore request"),
        "{}",
        stderr(&out)
    );
    assert!(!w.bpf.join("ownmap").exists());
    assert_eq!(fs::read(&a_file).expect("a"), a_bytes);
}

/// The one snapshot file below `dir` (manifests aside).
fn only_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).expect("read").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if !p.to_string_lossy().ends_with(".manifest.json") {
                found.push(p);
            }
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

/// Finding: `allowed_locations` was compared on the raw string, then the URL was normalised
/// (`..`, `%2e%2e`): a pod allowed `s3://snap/tenant-a/` wrote over another tenant's object.
/// Against a real S3 server (moto): every spelling is refused and the object is unchanged.
#[test]
fn encoded_traversal_in_a_location_is_refused() {
    let s3 = S3::start("snap");
    let w = World::new("url");
    let s3conf = format!(
        "\n[s3]\nendpoint = \"{}\"\nallow_http = true\nregion = \"us-east-1\"\n\
         access_key_id = \"test\"\nsecret_access_key = \"test\"\n",
        s3.endpoint()
    );
    w.write_config(&format!(
        "allowed_locations = [\"s3://snap/tenant-a/\"]\n{s3conf}"
    ));
    // The pod's namespace: its names live below s3://snap/tenant-a/a/.
    let pod = [
        ("io.kubernetes.pod.namespace", "a"),
        ("io.kubernetes.pod.name", "a-0"),
    ];
    let cfg = mapsnap_hook::config::NodeConfig::load(Some(&w.config)).expect("config");
    let victim_url = "s3://snap/tenant-b/x.mapsnap";
    let victim_bytes = snapshot_bytes(vec![(array("tenantb", [0xb; 4]), "sys/fs/bpf/tenantb")]);
    let put = |url: &str, bytes: &[u8]| {
        let st = mapsnap::storage::Storage::open(
            mapsnap::storage::Location::parse(url).expect("url"),
            &cfg.storage,
        )
        .expect("open");
        let mut wr = st.writer(true).expect("writer");
        std::io::Write::write_all(&mut wr, bytes).expect("write");
        wr.commit().expect("commit");
    };
    let get = |url: &str| -> Vec<u8> {
        let st = mapsnap::storage::Storage::open(
            mapsnap::storage::Location::parse(url).expect("url"),
            &cfg.storage,
        )
        .expect("open");
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut st.reader(None).expect("reader"), &mut out).expect("read");
        out
    };
    put(victim_url, &victim_bytes);
    array("amap", [0xa; 4])
        .pin(&w.bpf.join("amap"))
        .expect("pin");
    let spellings = [
        "s3://snap/tenant-a/a/%2e%2e/%2e%2e/tenant-b/x.mapsnap",
        "s3://snap/tenant-a/a/%2E%2E/%2E%2E/tenant-b/x.mapsnap",
        "s3://snap/tenant-a/a/../../tenant-b/x.mapsnap",
        "s3://snap/tenant-a/a/..%2f..%2ftenant-b/x.mapsnap",
        "s3://snap/tenant-a/a//../../tenant-b/x.mapsnap",
        "S3://SNAP/tenant-a/a/./../../tenant-b/x.mapsnap",
    ];
    for (i, url) in spellings.iter().enumerate() {
        let out = w.hook(
            "poststop",
            &w.bundle(
                &format!("w{i}"),
                &[
                    pod[0],
                    pod[1],
                    ("mapsnap.io/snapshot-on-stop", "true"),
                    ("mapsnap.io/snapshot-to", url),
                ],
            ),
            &format!("w{i}"),
            None,
        );
        // Refused for the URL itself, not for a missing tenant.
        let err = stderr(&out);
        assert!(
            err.contains("refused mapsnap.io/snapshot-to"),
            "{url}: {err}"
        );
        assert_eq!(
            get(victim_url),
            victim_bytes,
            "{url}: tenant-b's object changed"
        );
        let out = w.hook(
            "createRuntime",
            &w.bundle(
                &format!("r{i}"),
                &[pod[0], pod[1], ("mapsnap.io/restore-from", url)],
            ),
            &format!("r{i}"),
            None,
        );
        assert!(
            !out.status.success() && stderr(&out).contains("refused mapsnap.io/restore-from"),
            "{url}: {}",
            stderr(&out)
        );
        assert!(
            !w.bpf.join("tenantb").exists(),
            "{url}: tenant-b's maps restored"
        );
    }
    // The honest spelling still works.
    let out = w.hook(
        "poststop",
        &w.bundle(
            "ok",
            &[
                pod[0],
                pod[1],
                ("mapsnap.io/snapshot-on-stop", "true"),
                (
                    "mapsnap.io/snapshot-to",
                    "s3://snap/tenant-a/a/mine.mapsnap",
                ),
            ],
        ),
        "ok",
        None,
    );
    assert!(did(&out), "{}", stderr(&out));
    assert_eq!(
        names_in(&get("s3://snap/tenant-a/a/mine.mapsnap")),
        vec!["amap"]
    );
    assert_eq!(get(victim_url), victim_bytes);
}

/// Finding: a publish that failed half-way left earlier pins published and temporary pins
/// behind, so retries were refused forever. Here the container keeps turning the second
/// target name into a directory and back while the hook restores two maps sixty times:
/// every run either published both maps or left nothing (no first pin, no temporary pin),
/// and temporary pins an interrupted run left behind are cleared by the next one.
#[test]
fn a_failed_publish_leaves_nothing_behind() {
    let w = World::new("publish");
    let snap = snapshot_bytes(vec![
        (array("first", [1; 4]), "sys/fs/bpf/first"),
        (array("second", [2; 4]), "sys/fs/bpf/second"),
    ]);
    fs::write(w.data.join("two.mapsnap"), snap).expect("snapshot");
    // What a run killed between pinning and renaming leaves: a temporary pin of another pid.
    array("leftover", [0; 4])
        .pin(&w.bpf.join("mapsnap_tmp_1_0"))
        .expect("pin leftover");
    let second = w.bpf.join("second");
    let s2 = second.clone();
    let flipper = Flipper::start(1_000, move || {
        if fs::create_dir(&s2).is_ok() {
            let _ = fs::remove_dir(&s2);
        }
    });
    let start = w.bundle("start", &[("mapsnap.io/restore-from", "/data/two.mapsnap")]);
    let (mut both, mut none) = (0, 0);
    for i in 0..60 {
        let out = w.hook("createRuntime", &start, &format!("pub-{i}"), None);
        let temps: Vec<String> = fs::read_dir(&w.bpf)
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("mapsnap_tmp_"))
            .collect();
        assert!(temps.is_empty(), "run {i}: temporary pins left: {temps:?}");
        if out.status.success() {
            both += 1;
            let f = Map::from_pin(&w.bpf.join("first")).expect("first");
            let s = Map::from_pin(&second).expect("second");
            assert_eq!(contents(&f), 1u64.to_ne_bytes().repeat(4));
            assert_eq!(contents(&s), 2u64.to_ne_bytes().repeat(4));
            fs::remove_file(w.bpf.join("first")).expect("rm");
            fs::remove_file(&second).expect("rm");
        } else {
            none += 1;
            let err = stderr(&out);
            eprintln!("run {i} refused: {}", err.lines().last().unwrap_or(""));
            assert!(
                !w.bpf.join("first").exists(),
                "run {i}: a failed restore left its first pin: {}",
                stderr(&out)
            );
        }
    }
    let flips = flipper.finish();
    eprintln!("{flips} flips; {both} runs published both maps, {none} published nothing");
    assert!(both > 0, "{}", w.log_text());
}

/// A restore killed at any point (SIGKILL after a random delay, so the kill lands before,
/// during or after the publish): the retry always succeeds and leaves exactly the snapshot's
/// pins, without temporary pins or journals.
#[test]
fn a_restore_killed_at_any_point_is_retried_cleanly() {
    let w = World::new("kill");
    let snap = snapshot_bytes(vec![
        (array("first", [1; 4]), "sys/fs/bpf/first"),
        (array("second", [2; 4]), "sys/fs/bpf/second"),
    ]);
    fs::write(w.data.join("two.mapsnap"), snap).expect("snapshot");
    let bundle = w.bundle(
        "start",
        &[
            ("mapsnap.io/restore-from", "/data/two.mapsnap"),
            ("mapsnap.io/existing", "keep"),
        ],
    );
    let state_dir = w.dir.path().join("hook-state");
    let mut outcomes = BTreeMap::new();
    for i in 0..80u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .subsec_nanos();
        let delay = Duration::from_micros(u64::from(nanos % 12_000));
        let state = json!({"ociVersion": "1.0.2", "id": format!("kill-{i}"), "status": "creating",
                           "bundle": bundle});
        let mut child = Command::new(HOOK)
            .arg("--config")
            .arg(&w.config)
            .args(["oci", "createRuntime"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("hook");
        if let Some(mut s) = child.stdin.take() {
            let _ = std::io::Write::write_all(&mut s, state.to_string().as_bytes());
        }
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().expect("wait");
        let pins: Vec<String> = ["first", "second"]
            .into_iter()
            .filter(|n| w.bpf.join(n).exists())
            .map(String::from)
            .collect();
        *outcomes
            .entry(format!(
                "{} {pins:?}",
                if status.success() {
                    "finished"
                } else {
                    "killed"
                }
            ))
            .or_insert(0) += 1;
        let out = w.hook("createRuntime", &bundle, &format!("retry-{i}"), None);
        assert!(
            out.status.success(),
            "run {i}: the retry failed: {}",
            stderr(&out)
        );
        let f = Map::from_pin(&w.bpf.join("first")).expect("first");
        let s = Map::from_pin(&w.bpf.join("second")).expect("second");
        assert_eq!(contents(&f), 1u64.to_ne_bytes().repeat(4));
        assert_eq!(contents(&s), 2u64.to_ne_bytes().repeat(4));
        let names: Vec<String> = fs::read_dir(&w.bpf)
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "run {i}: {names:?}");
        let journals = fs::read_dir(&state_dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("publish-"))
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(journals, 0, "run {i}: a journal was left");
        fs::remove_file(w.bpf.join("first")).expect("rm");
        fs::remove_file(w.bpf.join("second")).expect("rm");
    }
    eprintln!("state after the kill, before the retry: {outcomes:?}");
}
