//! Attacks on mapsnap-hook, performed for real on this kernel's bpffs (and real runc where
//! the attack needs a running container). Each test plays the attacker (a container flipping
//! names in its own bpffs directory or a shared volume, a pod naming another tenant's
//! snapshot, a crafted URL, a reused pid, a hung file) while the real hook binary runs, then
//! checks that nothing outside the target changed, byte for byte.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use mapsnap::model::map_type;
use mapsnap::sys::{CreateAttrs, Map};
use serde_json::json;

/// A small world without a runtime: a tenant bpffs directory (the container's /sys/fs/bpf),
/// another tenant's bpffs directory, a /data volume, a host directory, a node config.
struct World {
    dir: tempfile::TempDir,
    bpf: PathBuf,
    victim: PathBuf,
    data: PathBuf,
    host: PathBuf,
    config: PathBuf,
    log: PathBuf,
    root: PathBuf,
}

impl World {
    fn new(name: &str) -> Self {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("mapsnap-attack.")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        if !mounts.lines().any(|l| l.contains(" /sys/fs/bpf bpf ")) {
            ok(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]));
        }
        let root = PathBuf::from(format!(
            "/sys/fs/bpf/mapsnap-attack-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&root);
        let bpf = root.join("tenant");
        let victim = root.join("victim");
        fs::create_dir_all(&bpf).expect("mkdir");
        fs::create_dir_all(&victim).expect("mkdir");
        let data = dir.path().join("data");
        let host = dir.path().join("host");
        fs::create_dir_all(&data).expect("mkdir");
        fs::create_dir_all(&host).expect("mkdir");
        let w = World {
            config: dir.path().join("config.toml"),
            log: dir.path().join("hook.log"),
            dir,
            bpf,
            victim,
            data,
            host,
            root,
        };
        w.write_config("");
        w
    }

    fn write_config(&self, extra: &str) {
        let text = format!(
            "[hook]\nlog_file = \"{}\"\ndeadline = \"20s\"\nwait_timeout = \"3s\"\n\
             state_dir = \"{}\"\nrequest_dir = \"{}\"\nrestore_request_dir = \"{}\"\n{extra}",
            self.log.display(),
            self.dir.path().join("hook-state").display(),
            self.dir.path().join("requests").display(),
            self.dir.path().join("restores").display(),
        );
        fs::write(&self.config, text).expect("config");
    }

    /// A bundle whose config.json bind-mounts the tenant bpffs dir at /sys/fs/bpf and the
    /// data dir at /data.
    fn bundle(&self, name: &str, annotations: &[(&str, &str)]) -> PathBuf {
        let b = self.dir.path().join(name);
        fs::create_dir_all(b.join("rootfs")).expect("mkdir");
        let ann: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        let spec = json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/sys/fs/bpf", "type": "bind", "source": self.bpf, "options": ["rbind"]},
                {"destination": "/data", "type": "bind", "source": self.data, "options": ["rbind"]},
            ],
            "annotations": ann,
        });
        fs::write(b.join("config.json"), spec.to_string()).expect("spec");
        b
    }

    /// Runs the hook binary for `stage` with the state on stdin.
    fn hook(&self, stage: &str, bundle: &Path, id: &str, pid: Option<u32>) -> Output {
        let state = json!({"ociVersion": "1.0.2", "id": id, "status": "running", "pid": pid,
                           "bundle": bundle});
        hook_with(&self.config, &["oci", stage], &state.to_string(), &[])
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn hook_with(config: &Path, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    use std::io::Write;
    let mut child = Command::new(HOOK)
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hook");
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(stdin.as_bytes());
    }
    child.wait_with_output().expect("hook output")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The run did its work: exit 0 and no tolerated failure (`(ignored)`) on stderr.
fn did(o: &Output) -> bool {
    o.status.success() && !stderr(o).contains("(ignored)")
}

/// An array map of 4 u64 slots holding `values`.
fn array(name: &str, values: [u64; 4]) -> Map {
    let m = Map::create(&CreateAttrs {
        map_type: map_type::ARRAY,
        name,
        key_size: 4,
        value_size: 8,
        max_entries: 4,
        ..CreateAttrs::default()
    })
    .expect("create map");
    for (i, v) in values.iter().enumerate() {
        m.update(Some(&(i as u32).to_ne_bytes()), &v.to_ne_bytes(), 0)
            .expect("update");
    }
    m
}

/// Every byte of a 4-slot array map.
fn contents(m: &Map) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..4u32 {
        let mut v = [0u8; 8];
        assert!(m.lookup(Some(&i.to_ne_bytes()), &mut v, 0).expect("lookup"));
        out.extend_from_slice(&v);
    }
    out
}

/// A snapshot file holding `maps` (map, pin path relative to the container's root).
fn snapshot_bytes(maps: Vec<(Map, &str)>) -> Vec<u8> {
    let found: Vec<_> = maps
        .into_iter()
        .map(|(m, pin)| {
            mapsnap::discover::Found::from_map(m, Some(pin.to_string())).expect("found")
        })
        .collect();
    let info = mapsnap::model::SnapshotInfo {
        tool: "attack test".into(),
        created_unix: 0,
        hostname: String::new(),
        kernel: String::new(),
        possible_cpus: mapsnap::sys::possible_cpus().expect("cpus"),
        source: "test".into(),
    };
    let (buf, _) = mapsnap::dump::dump(
        &found,
        Vec::new(),
        &info,
        &mapsnap::dump::DumpOptions::default(),
        &mapsnap::progress::NoProgress,
    )
    .expect("dump");
    buf
}

/// Map names in a snapshot file.
fn names_in(bytes: &[u8]) -> Vec<String> {
    mapsnap::format::verify(bytes)
        .expect("verify")
        .maps
        .iter()
        .map(|(m, _)| m.name.clone())
        .collect()
}

/// Swaps two names atomically (renameat2 RENAME_EXCHANGE): a directory and a symlink trade
/// places, as a container (or a sibling sharing the volume) can do at any moment.
fn exchange(a: &Path, b: &Path) -> bool {
    let ca = CString::new(a.as_os_str().as_bytes()).expect("c");
    let cb = CString::new(b.as_os_str().as_bytes()).expect("c");
    // SAFETY: valid C strings; renameat2 with AT_FDCWD.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    rc == 0
}

/// Runs `flip` in a thread until stopped and at least `min` flips were done.
struct Flipper {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Flipper {
    fn start(min: u64, mut flip: impl FnMut() + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) || c.load(Ordering::SeqCst) < min {
                flip();
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
        Flipper {
            stop,
            count,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("flipper");
        }
        self.count.load(Ordering::SeqCst)
    }
}

/// Finding: in `restore-mode: wait` the hook polled the pin by path, following links, so a
/// container flipping `x` between its own pin and a link to another tenant's map made the
/// root hook empty and refill that map. Here a thread flips `x` 10,000+ times while the hook
/// runs ten times; the other tenant's map must stay byte-identical.
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
    for i in 0..10 {
        let out = w.hook("poststart", &bundle, &format!("flip-{i}"), Some(init.id()));
        let err = stderr(&out);
        if out.status.success() {
            filled += 1;
        }
        assert!(
            !err.contains("4369")
                && !err.contains("victim")
                && !err.contains(w.root.to_str().expect("utf-8")),
            "a message leaks the other tenant's map or host paths: {err}"
        );
    }
    let flips = flipper.finish();
    let _ = init.kill();
    let _ = init.wait();
    eprintln!("{flips} flips, {filled} of 10 runs filled the container's own map");
    assert!(flips >= 10_000);
    assert_eq!(contents(&victim), before, "the other tenant's map changed");
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

/// Names and contents of the files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
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
    for i in 0..20 {
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
    let a_file = base.join("team-a/app.mapsnap");
    let a_bytes = fs::read(&a_file).expect("team-a's snapshot under its namespace");
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
        "allowed_locations = [\"s3://snap/tenant-a/\"]\ntenant_prefix = \"\"\n{s3conf}"
    ));
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
        "s3://snap/tenant-a/%2e%2e/tenant-b/x.mapsnap",
        "s3://snap/tenant-a/%2E%2E/tenant-b/x.mapsnap",
        "s3://snap/tenant-a/../tenant-b/x.mapsnap",
        "s3://snap/tenant-a/..%2ftenant-b/x.mapsnap",
        "s3://snap/tenant-a//../tenant-b/x.mapsnap",
        "S3://SNAP/tenant-a/./../tenant-b/x.mapsnap",
    ];
    for (i, url) in spellings.iter().enumerate() {
        let out = w.hook(
            "poststop",
            &w.bundle(
                &format!("w{i}"),
                &[
                    ("mapsnap.io/snapshot-on-stop", "true"),
                    ("mapsnap.io/snapshot-to", url),
                ],
            ),
            &format!("w{i}"),
            None,
        );
        assert!(stderr(&out).contains("refused"), "{url}: {}", stderr(&out));
        assert_eq!(
            get(victim_url),
            victim_bytes,
            "{url}: tenant-b's object changed"
        );
        let out = w.hook(
            "createRuntime",
            &w.bundle(&format!("r{i}"), &[("mapsnap.io/restore-from", url)]),
            &format!("r{i}"),
            None,
        );
        assert!(
            !out.status.success() && stderr(&out).contains("refused"),
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
                ("mapsnap.io/snapshot-on-stop", "true"),
                ("mapsnap.io/snapshot-to", "s3://snap/tenant-a/mine.mapsnap"),
            ],
        ),
        "ok",
        None,
    );
    assert!(did(&out), "{}", stderr(&out));
    assert_eq!(
        names_in(&get("s3://snap/tenant-a/mine.mapsnap")),
        vec!["amap"]
    );
    assert_eq!(get(victim_url), victim_bytes);
}

/// A map type mapsnap cannot carry, pinned in the container's bpffs directory.
fn ringbuf() -> Map {
    Map::create(&CreateAttrs {
        map_type: map_type::RINGBUF,
        name: "events",
        key_size: 0,
        value_size: 0,
        max_entries: 4096,
        ..CreateAttrs::default()
    })
    .expect("ringbuf")
}

fn post_dump(b: &Bench, pid: u32, images: &Path) -> Output {
    hook_with(
        &b.config,
        &["criu"],
        "",
        &[
            ("CRTOOLS_SCRIPT_ACTION", "post-dump"),
            ("CRTOOLS_INIT_PID", &pid.to_string()),
            ("CRTOOLS_IMAGE_DIR", images.to_str().expect("utf-8")),
        ],
    )
}

/// Findings: post-dump snapshotted containers that never opted in and failed their
/// checkpoints on unsupported pins; a stale manifest in a reused image directory was taken
/// for this dump's. With real runc containers and the hook run as CRIU runs its action
/// script at post-dump.
#[test]
fn post_dump_leaves_non_opted_in_containers_alone_and_refuses_stale_manifests() {
    let b = Bench::new("optin");
    let rb = ringbuf();
    rb.pin(&b.bpf_dir.join("events")).expect("pin ringbuf");
    let images = b.dir.path().join("images");
    fs::create_dir_all(&images).expect("mkdir");
    // An earlier checkpoint's manifest and snapshot in the (reused) image directory.
    let stale = mapsnap_hook::manifest::CheckpointManifest {
        version: mapsnap_hook::manifest::MANIFEST_VERSION,
        container_id: format!("{}-plain", b.tag),
        created: "2020-01-01T00:00:00Z".into(),
        snapshot: format!("image:{}", mapsnap_hook::manifest::IMAGE_SNAPSHOT),
        sha256: "00".repeat(32),
        size: 1,
        maps: Vec::new(),
        checkpoint: None,
        dump: None,
    };
    stale.write(&images).expect("stale manifest");
    fs::write(images.join(mapsnap_hook::manifest::IMAGE_SNAPSHOT), b"old").expect("old");

    let bundle = b.bundle("plain", &[]);
    let id = format!("{}-plain", b.tag);
    b.start_ok(&bundle, &id);
    let (_, pid) = b.state_of(&id).expect("state");
    let pins_before = b.pins();
    let counters = b.counters();
    let out = post_dump(&b, pid, &images);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a non-opted-in checkpoint failed: {}",
        stderr(&out)
    );
    assert!(
        !images.join(mapsnap_hook::manifest::MANIFEST_NAME).exists(),
        "the stale manifest would make this checkpoint carry another's maps"
    );
    assert_eq!(b.pins(), pins_before);
    assert_eq!(b.counters(), counters);
    b.stop(&id);

    // The same container opted in: the unsupported pin fails it (strict), which is what a
    // non-opted-in container was spared above.
    stale.write(&images).expect("stale manifest");
    let bundle = b.bundle("opted", &[("mapsnap.io/policy", "strict")]);
    let id = format!("{}-opted", b.tag);
    b.start_ok(&bundle, &id);
    let (_, pid) = b.state_of(&id).expect("state");
    let out = post_dump(&b, pid, &images);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("ring"), "{}", stderr(&out));
    // Without the unsupported pin, the stale manifest is replaced by this dump's own.
    fs::remove_file(b.bpf_dir.join("events")).expect("rm");
    let out = post_dump(&b, pid, &images);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let m = mapsnap_hook::manifest::CheckpointManifest::read(&images)
        .expect("read")
        .expect("manifest");
    assert_eq!(m.container_id, id);
    assert_ne!(m.sha256, stale.sha256);
    let snap = fs::read(images.join(mapsnap_hook::manifest::IMAGE_SNAPSHOT)).expect("snapshot");
    assert_eq!(names_in(&snap), vec!["pkt_count", "src_count"]);
    // CRIU runs the action twice: the second run recognises this dump's manifest.
    let out = post_dump(&b, pid, &images);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        mapsnap_hook::manifest::CheckpointManifest::read(&images).expect("read"),
        Some(m)
    );
    b.stop(&id);
}

/// Finding: work before the deadline started was unbounded, so a hung file kept a container
/// frozen at post-dump. Here the container's config.json is replaced by a FIFO nobody writes
/// (a read of it blocks forever): the hook must end within its deadline without failing the
/// checkpoint of a container whose opt-in it cannot read.
#[test]
fn a_hung_file_never_keeps_post_dump_waiting() {
    let b = Bench::new("hung");
    b.write_config("");
    let bundle = b.bundle("hung", &[]);
    let id = format!("{}-hung", b.tag);
    b.start_ok(&bundle, &id);
    let (_, pid) = b.state_of(&id).expect("state");
    let spec = bundle.join("config.json");
    fs::remove_file(&spec).expect("rm spec");
    let c = CString::new(spec.as_os_str().as_bytes()).expect("c");
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let images = b.dir.path().join("images");
    fs::create_dir_all(&images).expect("mkdir");
    let t = Instant::now();
    let mut child = Command::new(HOOK)
        .arg("--config")
        .arg(&b.config)
        .arg("criu")
        .env("CRTOOLS_SCRIPT_ACTION", "post-dump")
        .env("CRTOOLS_INIT_PID", pid.to_string())
        .env("CRTOOLS_IMAGE_DIR", &images)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hook");
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t.elapsed() > Duration::from_secs(40) {
            let _ = child.kill();
            let _ = child.wait();
            // Unblock nothing: the FIFO stays; the container is removed by the bench.
            panic!("the hook was still running after 40 s (deadline 20 s)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("post-dump ended after {:?} with {status}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(25));
    assert_eq!(status.code(), Some(0));
    let _ = fs::remove_file(&spec);
    b.stop(&id);
}

/// Finding: the wait-mode waiter SIGKILLed a pid it had read long before. Here the container
/// dies, its pid is handed to an unrelated process (ns_last_pid), and the waiter gives up:
/// the unrelated process must live.
#[test]
fn the_waiter_never_kills_a_reused_pid() {
    let b = Bench::new("pidreuse");
    let snap = snapshot_bytes(vec![(array("never", [1; 4]), "sys/fs/bpf/never")]);
    fs::write(b.data.join("never.mapsnap"), snap).expect("snapshot");
    let bundle = b.bundle(
        "waiter",
        &[
            ("mapsnap.io/restore-from", "/data/never.mapsnap"),
            ("mapsnap.io/restore-mode", "wait"),
        ],
    );
    let id = format!("{}-waiter", b.tag);
    b.start_ok(&bundle, &id);
    let (_, pid) = b.state_of(&id).expect("state");
    b.stop(&id);
    wait_pid_free(pid, Duration::from_secs(10));
    // Hand the pid to a decoy.
    let mut decoy = None;
    for _ in 0..500 {
        let _ = fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string());
        let c = Command::new("sleep").arg("60").spawn().expect("sleep");
        if c.id() == pid {
            decoy = Some(c);
            break;
        }
        let mut c = c;
        let _ = c.kill();
        let _ = c.wait();
    }
    let mut decoy = decoy.expect("could not get the container's pid reused");
    // The waiter gives up after wait_timeout (10 s in the bench config).
    b.wait_log("did not pin");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        decoy.try_wait().expect("try_wait").is_none(),
        "the waiter killed an unrelated process that reused the container's pid:\n{}",
        b.log_text()
    );
    let _ = decoy.kill();
    let _ = decoy.wait();
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
