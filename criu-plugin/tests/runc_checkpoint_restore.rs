//! `runc checkpoint` / `runc restore` of a container whose process holds BPF maps of every
//! supported type, with runc's `--criu` pointing at CRIU 4.1 and the plugin installed the way
//! a node has it: in CRIU's default plugin directory `/usr/lib/criu`, with no `libdir` in the
//! CRIU config file (named by the container's `org.criu.config` annotation). The directory is
//! a private bind mount in runc's own mount namespace, so the host's stays untouched.
//!
//! The container: a busybox-static rootfs plus the test helper and the shared libraries
//! `ldd` lists for it; CAP_BPF and CAP_SYS_ADMIN (to create maps and open them by id); its
//! own pid, mount, network, ipc and uts namespaces (runc's default spec); a host directory
//! bind-mounted at /state for the helper's files.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const RUNC: &str = "runc";

/// Removes the container (and runc's state) when dropped.
struct Container {
    id: String,
    runc_root: PathBuf,
}

impl Container {
    fn runc(&self, criu: &Path) -> Command {
        let mut c = Command::new(RUNC);
        c.arg("--root").arg(&self.runc_root).arg("--criu").arg(criu);
        c
    }

    /// runc with `plugins` as CRIU's default plugin directory.
    fn runc_with_plugins(&self, criu: &Path, plugins: &Path) -> Command {
        let mut c = with_default_plugin_dir(plugins, RUNC);
        c.arg("--root").arg(&self.runc_root).arg("--criu").arg(criu);
        c
    }

    /// `runc state`: (status, host pid of the init process), None once it is gone.
    fn state(&self) -> Option<(String, u32)> {
        let out = Command::new(RUNC)
            .arg("--root")
            .arg(&self.runc_root)
            .args(["state", &self.id])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        Some((
            v["status"].as_str().unwrap_or_default().to_string(),
            v["pid"].as_u64().unwrap_or(0) as u32,
        ))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new(RUNC)
            .arg("--root")
            .arg(&self.runc_root)
            .args(["delete", "-f", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Copies `src` to the same absolute path under `rootfs`.
fn copy_into(rootfs: &Path, src: &Path) {
    let dst = rootfs.join(src.strip_prefix("/").expect("absolute path"));
    fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
    fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
}

/// A busybox rootfs with the helper at /testee and the libraries it links.
fn make_rootfs(rootfs: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "state"] {
        fs::create_dir_all(rootfs.join(d)).expect("mkdir");
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox not found: install busybox-static (make deps)");
    fs::copy(busybox, rootfs.join("bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("symlink sh");
    fs::copy(TESTEE, rootfs.join("testee")).expect("copy the helper");
    let ldd = Command::new("ldd").arg(TESTEE).output().expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        copy_into(rootfs, Path::new(lib));
    }
}

/// runc's default spec, adapted: the helper as process, BPF capabilities, /state, the CRIU
/// config annotation.
fn make_config(bundle: &Path, state: &Path, criu_conf: &Path) {
    let out = run(Command::new(RUNC).args(["spec", "--bundle"]).arg(bundle));
    assert!(out.status.success(), "runc spec failed");
    let path = bundle.join("config.json");
    let mut spec = read_json(&path);
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(["/testee", "run", "--dir", "/state"]);
    let caps = &mut spec["process"]["capabilities"];
    for set in ["bounding", "effective", "permitted"] {
        let list = caps[set].as_array_mut().expect("capability list");
        for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"] {
            list.push(json!(cap));
        }
    }
    spec["hostname"] = json!("mapsnap-criu-test");
    spec["mounts"].as_array_mut().expect("mounts").push(json!({
        "destination": "/state",
        "type": "bind",
        "source": state,
        "options": ["rbind", "rw"],
    }));
    spec["annotations"] = json!({ "org.criu.config": criu_conf });
    fs::write(&path, serde_json::to_string_pretty(&spec).expect("json")).expect("write config");
}

#[test]
fn runc_checkpoints_and_restores_a_container_holding_maps() {
    require_root();
    let criu = criu();
    // runc exits after starting the container: its init is re-parented to us, so the pids
    // `runc checkpoint` kills can be reaped.
    mapsnap_criu::ffi::become_child_subreaper().expect("PR_SET_CHILD_SUBREAPER");
    let work = tempfile::Builder::new()
        .prefix("mapsnap-runc-test.")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let root = work.path();
    let state = root.join("state");
    fs::create_dir_all(&state).expect("mkdir state");
    let bundle = root.join("bundle");
    make_rootfs(&bundle.join("rootfs"));
    let lib = plugin_dir(root);
    let no_lib = empty_dir(root, "no-plugins");
    let criu_conf = root.join("criu.conf");
    make_config(&bundle, &state, &criu_conf);

    let ctr = Container {
        id: format!("mapsnap-criu-{}", std::process::id()),
        runc_root: root.join("runc-root"),
    };
    let out = run(ctr
        .runc(&criu)
        .args(["run", "-d", "--bundle"])
        .arg(&bundle)
        .arg(&ctr.id)
        .stdout(Stdio::null())
        .stderr(Stdio::null()));
    assert!(out.status.success(), "runc run failed");
    wait_for_file(&state.join("ready"), Duration::from_secs(60), &state);
    let (status, host_pid) = ctr.state().expect("runc state");
    assert_eq!(status, "running");

    // No `libdir`: CRIU reads its default plugin directory.
    fs::write(&criu_conf, "# no libdir: plugins from /usr/lib/criu\n").expect("criu.conf");

    // Without the plugin there, the checkpoint fails as it always did, and the container
    // keeps running.
    let work0 = root.join("work-no-plugin");
    let out = run(ctr
        .runc_with_plugins(&criu, &no_lib)
        .arg("checkpoint")
        .arg("--image-path")
        .arg(root.join("images-no-plugin"))
        .arg("--work-path")
        .arg(&work0)
        .arg(&ctr.id));
    let log0 = fs::read_to_string(work0.join("dump.log")).unwrap_or_default();
    assert!(
        !out.status.success() && log0.contains("Can't dump file") && log0.contains("bpf-map"),
        "without the plugin the checkpoint must fail on the BPF map fds:\n{}",
        tail(&work0.join("dump.log"), 20)
    );
    assert_eq!(
        ctr.state().map(|s| s.0).as_deref(),
        Some("running"),
        "a failed checkpoint leaves the container running"
    );

    // With the plugin in the default directory.
    let images = root.join("images");
    let dump_work = root.join("work-dump");
    let out = run(ctr
        .runc_with_plugins(&criu, &lib)
        .arg("checkpoint")
        .arg("--image-path")
        .arg(&images)
        .arg("--work-path")
        .arg(&dump_work)
        .arg(&ctr.id));
    eprintln!(
        "---- dump.log (mapsnap lines) ----\n{}",
        interesting(&dump_work.join("dump.log"))
    );
    assert!(
        out.status.success(),
        "runc checkpoint with the plugin failed:\n{}",
        tail(&dump_work.join("dump.log"), 30)
    );
    wait_pid_free(host_pid, Duration::from_secs(10));
    let snapshots = files_with_prefix(&images, "mapsnap-map-");
    assert_eq!(snapshots.len(), 14, "one snapshot per map: {snapshots:?}");
    assert_eq!(
        read_index(&images)["files"].as_array().map(Vec::len),
        Some(18)
    );

    let restore_work = root.join("work-restore");
    let out = run(ctr
        .runc_with_plugins(&criu, &lib)
        .args(["restore", "-d", "--image-path"])
        .arg(&images)
        .arg("--work-path")
        .arg(&restore_work)
        .arg("--bundle")
        .arg(&bundle)
        .arg(&ctr.id)
        .stdout(Stdio::null())
        .stderr(Stdio::null()));
    eprintln!(
        "---- restore.log (mapsnap lines) ----\n{}",
        interesting(&restore_work.join("restore.log"))
    );
    assert!(
        out.status.success(),
        "runc restore with the plugin failed:\n{}",
        tail(&restore_work.join("restore.log"), 30)
    );
    assert_eq!(ctr.state().map(|s| s.0).as_deref(), Some("running"));
    finish_and_check(&state);
}
