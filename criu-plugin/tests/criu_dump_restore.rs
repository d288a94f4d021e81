//! `criu dump -t PID` / `criu restore` of a process holding BPF maps of every supported type,
//! with real CRIU 4.1 and the plugin; the restored process checks its maps itself.
//!
//! One test, one process: it makes itself a child subreaper so that the helper's child,
//! orphaned when `criu dump` kills the tree, can be reaped and its pid freed for the restore.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn criu_checkpoints_and_restores_every_map_type() {
    require_root();
    let criu = criu();
    mapsnap_criu::ffi::become_child_subreaper().expect("PR_SET_CHILD_SUBREAPER");
    let work = tempfile::Builder::new()
        .prefix("mapsnap-criu-test.")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let root = work.path();
    let state = root.join("state");
    fs::create_dir_all(&state).expect("mkdir state");
    let lib = plugin_dir(root);
    let no_lib = empty_dir(root, "no-plugins");

    // The helper runs in its own session (CRIU dumps whole sessions only with --shell-job)
    // with stdio on files, which CRIU carries by path.
    let log = fs::File::create(root.join("testee.log")).expect("log");
    let mut testee = Command::new("setsid")
        .arg(TESTEE)
        .args(["run", "--dir"])
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("spawn the helper");
    let mut guard = KillOnDrop(vec![testee.id()]);
    wait_for_file(&state.join("ready"), Duration::from_secs(60), &state);
    let (pid, child) = state_pids(&state);
    assert_eq!(pid, testee.id(), "setsid must exec the helper in place");
    guard.0.push(child);

    // Without the plugin, CRIU refuses the BPF map fds, as Debian's CRIU always did.
    let img0 = empty_dir(root, "images-no-plugin");
    let out = run(Command::new(&criu)
        .args([
            "dump",
            "-v4",
            "-o",
            "dump.log",
            "-t",
            &pid.to_string(),
            "-D",
        ])
        .arg(&img0)
        .arg("--libdir")
        .arg(&no_lib));
    let dump0 = fs::read_to_string(img0.join("dump.log")).unwrap_or_default();
    assert!(
        !out.status.success() && dump0.contains("Can't dump file") && dump0.contains("bpf-map"),
        "without the plugin the dump must fail on the BPF map fds:\n{}",
        tail(&img0.join("dump.log"), 20)
    );
    assert!(
        alive(pid) && alive(child),
        "a failed dump leaves the tree running"
    );

    // With the plugin.
    let img = empty_dir(root, "images");
    let out = run(Command::new(&criu)
        .args([
            "dump",
            "-v4",
            "-o",
            "dump.log",
            "-t",
            &pid.to_string(),
            "-D",
        ])
        .arg(&img)
        .arg("--libdir")
        .arg(&lib));
    eprintln!(
        "---- dump.log (mapsnap lines) ----\n{}",
        interesting(&img.join("dump.log"))
    );
    assert!(
        out.status.success(),
        "criu dump with the plugin failed:\n{}",
        tail(&img.join("dump.log"), 30)
    );
    let _ = testee.wait();
    wait_pid_free(pid, Duration::from_secs(10));
    wait_pid_free(child, Duration::from_secs(10));

    // One snapshot per distinct map, one record per CRIU file.
    let snapshots = files_with_prefix(&img, "mapsnap-map-");
    let index = read_index(&img);
    let records = &index["files"];
    eprintln!("images: {snapshots:?}\n{records}");
    // hash percpu_hash lru_hash array percpu_array lpm_trie hash_of_maps inner1 array_of_maps
    // queue stack frozen_array spin_lock shared
    assert_eq!(snapshots.len(), 14, "one snapshot per map: {snapshots:?}");
    // The 18 fds of the parent (shared's dup is the same CRIU file as shared) are 17 files,
    // plus the child's own open of `shared` (its inherited fd is the parent's file).
    assert_eq!(
        records.as_array().map(Vec::len),
        Some(18),
        "one record per CRIU file: {records}"
    );

    // A damaged snapshot fails the restore with a log line naming the map and the reason.
    let bad = root.join("images-damaged");
    assert!(
        Command::new("cp")
            .args(["-a"])
            .arg(&img)
            .arg(&bad)
            .status()
            .expect("cp")
            .success()
    );
    let hash_id = state_map_id(&state, "hash");
    let victim = bad.join(format!("mapsnap-map-{hash_id}.snap"));
    let mut bytes = fs::read(&victim).expect("read snapshot");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&victim, bytes).expect("write snapshot");
    let out = run(Command::new(&criu)
        .args(["restore", "-d", "-v4", "-o", "restore.log", "-D"])
        .arg(&bad)
        .arg("--libdir")
        .arg(&lib));
    let log_bad = fs::read_to_string(bad.join("restore.log")).unwrap_or_default();
    let line = log_bad
        .lines()
        .find(|l| l.contains("mapsnap") && l.contains("cannot restore"))
        .unwrap_or_default()
        .to_string();
    eprintln!("damaged snapshot, CRIU log: {line}");
    assert!(
        !out.status.success()
            && line.contains(&format!("map {hash_id} \"hash\""))
            && line.contains(&format!("mapsnap-map-{hash_id}.snap"))
            && (line.contains("CRC") || line.contains("corrupt") || line.contains("checksum")),
        "a damaged snapshot must fail the restore naming the map and the reason:\n{}",
        tail(&bad.join("restore.log"), 20)
    );
    assert!(!alive(pid), "nothing restored from the damaged images");

    // The real restore: the same pids, the maps recreated and installed at their fd numbers.
    let out = run(Command::new(&criu)
        .args(["restore", "-d", "-v4", "-o", "restore.log", "-D"])
        .arg(&img)
        .arg("--libdir")
        .arg(&lib));
    eprintln!(
        "---- restore.log (mapsnap lines) ----\n{}",
        interesting(&img.join("restore.log"))
    );
    assert!(
        out.status.success(),
        "criu restore with the plugin failed:\n{}",
        tail(&img.join("restore.log"), 30)
    );
    assert!(alive(pid), "the helper runs again under its pid {pid}");
    finish_and_check(&state);
    wait_pid_free(pid, Duration::from_secs(10));
}
