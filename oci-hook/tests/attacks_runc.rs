//! Attacks on mapsnap-hook that need running containers (real runc): post-dump of containers
//! that never opted in and of a reused image directory, a hung file at post-dump, pid reuse
//! under the wait-mode waiter. The tests run one at a time: the bench reaps every exited child
//! of this process, which would race another test's waits.

mod common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::attack::*;
use common::*;
use mapsnap::model::map_type;
use mapsnap::sys::{CreateAttrs, Map};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
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
    let _s = serial();
    let b = Bench::new("optin");
    let rb = ringbuf();
    rb.pin(&b.bpf_dir.join("events")).expect("pin ringbuf");
    let images = b.dir.path().join("images");
    fs::create_dir_all(&images).expect("mkdir");
    let bundle = b.bundle("plain", &[]);
    let id = format!("{}-plain", b.tag);
    b.start_ok(&bundle, &id);
    let (_, pid) = b.state_of(&id).expect("state");
    let pins_before = b.pins();
    let counters = b.counters();
    // 1. A container without any mapsnap.io/ annotation and an unsupported pin: its
    //    checkpoint must not fail, and nothing is written for it.
    let out = post_dump(&b, pid, &images);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a non-opted-in checkpoint failed: {}",
        stderr(&out)
    );
    assert_eq!(
        fs::read_dir(&images).expect("read").count(),
        0,
        "nothing written"
    );
    // 2. The image directory is reused and holds an earlier checkpoint's manifest.
    let stale = mapsnap_hook::manifest::CheckpointManifest {
        finished_later: None,
        version: mapsnap_hook::manifest::MANIFEST_VERSION,
        container_id: format!("{}-plain", b.tag),
        created: "2020-01-01T00:00:00Z".into(),
        snapshot: format!("image:{}", mapsnap_hook::manifest::IMAGE_SNAPSHOT),
        sha256: "00".repeat(32),
        size: 1,
        maps: Vec::new(),
        checkpoint: None,
        dump: None,
        signer: None,
        encrypted: false,
    };
    stale.write(&images).expect("stale manifest");
    fs::write(images.join(mapsnap_hook::manifest::IMAGE_SNAPSHOT), b"old").expect("old");
    let out = post_dump(&b, pid, &images);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
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
    let _s = serial();
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
    let _s = serial();
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
