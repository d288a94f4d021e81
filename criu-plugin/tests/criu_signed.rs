//! The plugin with a signing key and a trust set (its config file, as the chart mounts the
//! keys from Secrets), on real CRIU 4.1: every per-map snapshot of a `criu dump` gets a
//! minisign signature that the real `minisign -V` accepts; at `criu restore` a per-map
//! snapshot altered by someone who also fixed up the (unsigned) index, one whose signature
//! was removed, or one signed by a key outside the trust set is refused before any map is
//! created; the intact images restore and the helper finds its maps as they were.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use sha2::Digest as _;

fn minisign_keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (public, secret) = (
        dir.join(format!("{name}.pub")),
        dir.join(format!("{name}.key")),
    );
    let out = run(Command::new("minisign")
        .args(["-G", "-W", "-f", "-p"])
        .arg(&public)
        .arg("-s")
        .arg(&secret));
    assert!(
        out.status.success(),
        "minisign -G (scripts/install-trust-tools.sh)"
    );
    (public, secret)
}

#[test]
fn signed_per_map_snapshots_and_refusals_on_real_criu() {
    require_root();
    let criu = criu();
    mapsnap_criu::ffi::become_child_subreaper().expect("PR_SET_CHILD_SUBREAPER");
    let work = tempfile::Builder::new()
        .prefix("mapsnap-criu-signed.")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let root = work.path();
    let state = root.join("state");
    fs::create_dir_all(&state).expect("mkdir state");
    let lib = plugin_dir_with(root, &shipped_plugin_so());

    // Keys: the trust set is a directory with the old and the new key (rotation); the node
    // signs with the new one; a third key is trusted by nobody.
    let keys = root.join("keys");
    let trusted = keys.join("trusted");
    fs::create_dir_all(&trusted).expect("mkdir");
    let (old_pub, _) = minisign_keypair(&keys, "old");
    let (new_pub, new_key) = minisign_keypair(&keys, "new");
    let (_, stranger) = minisign_keypair(&keys, "stranger");
    fs::copy(&old_pub, trusted.join("old.pub")).expect("copy");
    fs::copy(&new_pub, trusted.join("new.pub")).expect("copy");
    let config = root.join("criu-plugin.toml");
    fs::write(
        &config,
        format!(
            "trust_keys = [\"{}\"]\nsigning_key = \"{}\"\n",
            trusted.display(),
            new_key.display()
        ),
    )
    .expect("config");
    let criu_cmd = || {
        let mut c = Command::new(&criu);
        c.env("MAPSNAP_CRIU_CONFIG", &config);
        c
    };

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
    guard.0.push(child);

    let img = empty_dir(root, "images");
    let out = run(criu_cmd()
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
    assert!(
        out.status.success(),
        "criu dump failed:\n{}",
        tail(&img.join("dump.log"), 30)
    );
    let _ = testee.wait();
    wait_pid_free(pid, Duration::from_secs(10));
    wait_pid_free(child, Duration::from_secs(10));

    // Every per-map snapshot is signed, and the real minisign agrees.
    let snapshots: Vec<String> = files_with_prefix(&img, "mapsnap-map-")
        .into_iter()
        .filter(|n| n.ends_with(".snap"))
        .collect();
    assert_eq!(snapshots.len(), 14, "{snapshots:?}");
    for s in &snapshots {
        let v = run(Command::new("minisign")
            .arg("-V")
            .arg("-p")
            .arg(&new_pub)
            .arg("-m")
            .arg(img.join(s)));
        assert!(v.status.success(), "minisign -V {s}");
    }

    let hash_id = state_map_id(&state, "hash");
    let snap_name = format!("mapsnap-map-{hash_id}.snap");
    let refuse = |name: &str, change: &dyn Fn(&Path), want: &str| {
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
        let out = run(criu_cmd()
            .args(["restore", "-d", "-v4", "-o", "restore.log", "-D"])
            .arg(&dir)
            .arg("--libdir")
            .arg(&lib));
        let text = fs::read_to_string(dir.join("restore.log")).unwrap_or_default();
        let line = text
            .lines()
            .find(|l| l.contains("Error (mapsnap)"))
            .unwrap_or_default()
            .to_string();
        eprintln!("{name}: {line}");
        assert!(!out.status.success(), "{name}: the restore must fail");
        assert!(
            line.contains(want) && line.contains(&snap_name),
            "{name}: {want:?} and {snap_name} not in {line:?}:\n{}",
            tail(&dir.join("restore.log"), 20)
        );
        assert!(!alive(pid), "{name}: nothing restored");
    };
    // 1. One byte of a map's entries changed, and the index made to match it: only the
    // signature can tell.
    refuse(
        "tampered",
        &|d| {
            let path = d.join(&snap_name);
            let mut bytes = fs::read(&path).expect("read");
            let at = bytes.len() / 2;
            bytes[at] ^= 0x01;
            fs::write(&path, &bytes).expect("write");
            let mut v = read_index(d);
            for s in v["snapshots"].as_array_mut().expect("snapshots") {
                if s["map_id"] == hash_id {
                    s["sha256"] = hex::encode(sha2::Sha256::digest(&bytes)).into();
                }
            }
            fs::write(d.join("mapsnap-criu.json"), v.to_string()).expect("write");
        },
        "does not match the data",
    );
    // 2. The signature removed.
    refuse(
        "unsigned",
        &|d| fs::remove_file(d.join(format!("{snap_name}.minisig"))).expect("rm"),
        "is not signed",
    );
    // 3. Re-signed by a key outside the trust set (the real minisign).
    refuse(
        "stranger",
        &|d| {
            let s = run(Command::new("minisign")
                .arg("-S")
                .arg("-s")
                .arg(&stranger)
                .arg("-m")
                .arg(d.join(&snap_name)));
            assert!(s.status.success());
        },
        "which is not in the trust set",
    );

    // The images as signed restore, every map as it was.
    let out = run(criu_cmd()
        .args(["restore", "-d", "-v4", "-o", "restore.log", "-D"])
        .arg(&img)
        .arg("--libdir")
        .arg(&lib));
    let restore_log = img.join("restore.log");
    assert!(
        out.status.success(),
        "criu restore failed:\n{}",
        tail(&restore_log, 30)
    );
    let verified = fs::read_to_string(&restore_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("signature by key") && l.contains("verified"))
        .count();
    assert_eq!(verified, 14, "{}", interesting(&restore_log));
    finish_and_check(&state);
}
