//! `criu dump -t PID` / `criu restore` of a process holding BPF maps of every supported type,
//! with real CRIU 4.1 and the plugin; the restored process checks its maps itself.
//!
//! The plugin CRIU loads here is the shipped build (scripts/build-criu-plugin.sh: glibc 2.28
//! symbols, no object storage). It is given as `--libdir` rather than in `/usr/lib/criu`: a
//! plain process restored by `criu restore` lives in criu's mount namespace, so the private
//! mount namespace that runc_checkpoint_restore.rs uses for the default directory would
//! become the restored process's (containers have their own and do not mind).
//!
//! One test, one process: it makes itself a child subreaper so that the helper's child,
//! orphaned when `criu dump` kills the tree, can be reaped and its pid freed for the restore.

mod common;

use std::fs;
use std::path::Path;
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
    let lib = plugin_dir_with(root, &shipped_plugin_so());
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

    // With the plugin but a deadline too short for any map: the dump fails with a line naming
    // the map, the tree keeps running, and no index is left to restore from.
    let img_late = empty_dir(root, "images-deadline");
    let out = run(Command::new(&criu)
        .env("MAPSNAP_CRIU_DEADLINE", "1ms")
        .args([
            "dump",
            "-v4",
            "-o",
            "dump.log",
            "-t",
            &pid.to_string(),
            "-D",
        ])
        .arg(&img_late)
        .arg("--libdir")
        .arg(&lib));
    let late_log = fs::read_to_string(img_late.join("dump.log")).unwrap_or_default();
    let line = late_log
        .lines()
        .find(|l| l.contains("Error (mapsnap)"))
        .unwrap_or_default()
        .to_string();
    eprintln!("deadline: {line}");
    assert!(
        !out.status.success()
            && line.contains("the deadline of 1ms passed while dumping map ")
            && line.contains("(CRIU file "),
        "a dump past its deadline must fail naming the map:\n{}",
        tail(&img_late.join("dump.log"), 20)
    );
    assert!(
        alive(pid) && alive(child),
        "a failed dump leaves the tree running"
    );
    assert!(
        !img_late.join("mapsnap-criu.json").exists(),
        "no index after a failed dump"
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

    // A damaged snapshot fails the restore with a log line naming the map and the reason (its
    // sha256 is not the one the index records).
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
            && line.contains("sha256"),
        "a damaged snapshot must fail the restore naming the map and the reason:\n{}",
        tail(&bad.join("restore.log"), 20)
    );
    assert!(!alive(pid), "nothing restored from the damaged images");

    // Hostile image directories: each refused with a clear line in CRIU's log, nothing
    // restored. (The in-process tests check that no map is left behind in each case.)
    let snap_name = format!("mapsnap-map-{hash_id}.snap");
    let refuse = |name: &str, env: &[(&str, &str)], change: &dyn Fn(&Path), want: &[&str]| {
        let dir = root.join(format!("images-{name}"));
        assert!(
            Command::new("cp")
                .arg("-a")
                .arg(&img)
                .arg(&dir)
                .status()
                .expect("cp")
                .success()
        );
        change(&dir);
        let mut cmd = Command::new(&criu);
        cmd.args(["restore", "-d", "-v4", "-o", "restore.log", "-D"])
            .arg(&dir)
            .arg("--libdir")
            .arg(&lib);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run(&mut cmd);
        let log = fs::read_to_string(dir.join("restore.log")).unwrap_or_default();
        let line = log
            .lines()
            .find(|l| l.contains("Error (mapsnap)"))
            .unwrap_or_default()
            .to_string();
        eprintln!("{name}: {line}");
        assert!(!out.status.success(), "{name}: the restore must fail");
        for w in want {
            assert!(
                line.contains(w),
                "{name}: {w:?} not in the plugin's error line {line:?}:\n{}",
                tail(&dir.join("restore.log"), 20)
            );
        }
        assert!(!alive(pid), "{name}: nothing restored");
    };
    let elsewhere = root.join("elsewhere.snap");
    fs::copy(img.join(&snap_name), &elsewhere).expect("copy");
    refuse(
        "symlink",
        &[],
        &|d| {
            fs::remove_file(d.join(&snap_name)).expect("rm");
            std::os::unix::fs::symlink(&elsewhere, d.join(&snap_name)).expect("symlink");
        },
        &[
            &snap_name,
            "symbolic link",
            &format!("map {hash_id} \"hash\""),
        ],
    );
    refuse(
        "devzero",
        &[],
        &|d| {
            fs::remove_file(d.join(&snap_name)).expect("rm");
            std::os::unix::fs::symlink("/dev/zero", d.join(&snap_name)).expect("symlink");
        },
        &[&snap_name, "symbolic link"],
    );
    refuse(
        "fifo",
        &[],
        &|d| {
            fs::remove_file(d.join(&snap_name)).expect("rm");
            let ok = Command::new("mkfifo")
                .arg(d.join(&snap_name))
                .status()
                .expect("mkfifo");
            assert!(ok.success());
        },
        &[&snap_name, "not a regular file"],
    );
    refuse(
        "oversized",
        &[("MAPSNAP_CRIU_MAX_SNAPSHOT_BYTES", "512")],
        &|_| {},
        &["more than the limit of 512", "max_snapshot_bytes"],
    );
    refuse(
        "no-sha256",
        &[],
        &|d| {
            let mut v = read_index(d);
            for s in v["snapshots"].as_array_mut().expect("snapshots") {
                s.as_object_mut().expect("object").remove("sha256");
            }
            fs::write(d.join("mapsnap-criu.json"), v.to_string()).expect("write");
        },
        &["mapsnap-criu.json", "sha256"],
    );
    // A stale index: a later dump into the same directory removes the earlier dump's files
    // when it starts (here a dump of a process without maps), so an index left there by
    // other means names snapshots that are gone or not its own.
    let stale = root.join("images-stale");
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(&img)
            .arg(&stale)
            .status()
            .expect("cp")
            .success()
    );
    let mut sleeper = Command::new("setsid")
        .args(["sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let sleeper_pid = sleeper.id();
    guard.0.push(sleeper_pid);
    let out = run(Command::new(&criu)
        .args([
            "dump",
            "-v4",
            "-o",
            "dump2.log",
            "-t",
            &sleeper_pid.to_string(),
            "-D",
        ])
        .arg(&stale)
        .arg("--libdir")
        .arg(&lib));
    assert!(
        out.status.success(),
        "dump of a process without maps into a reused directory:\n{}",
        tail(&stale.join("dump2.log"), 20)
    );
    let _ = sleeper.wait();
    wait_pid_free(sleeper_pid, Duration::from_secs(10));
    assert!(
        files_with_prefix(&stale, "mapsnap-").is_empty(),
        "the earlier dump's files are removed: {:?}\n{}",
        files_with_prefix(&stale, "mapsnap-"),
        interesting(&stale.join("dump2.log"))
    );
    fs::copy(
        img.join("mapsnap-criu.json"),
        stale.join("mapsnap-criu.json"),
    )
    .expect("cp");
    let out = run(Command::new(&criu)
        .args(["restore", "-d", "-v4", "-o", "restore.log", "-D"])
        .arg(&stale)
        .arg("--libdir")
        .arg(&lib));
    let log = fs::read_to_string(stale.join("restore.log")).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("Error (mapsnap)"))
        .unwrap_or_default()
        .to_string();
    eprintln!("stale: {line}");
    assert!(
        !out.status.success() && line.contains("mapsnap-map-") && line.contains("cannot restore"),
        "a stale index must be refused:\n{}",
        tail(&stale.join("restore.log"), 20)
    );
    assert!(!alive(sleeper_pid), "the restore failed as a whole");

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
