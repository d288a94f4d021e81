//! Helpers shared by the plugin's tests with real CRIU (and runc).
//!
//! They need root and CRIU 4.1 installed by `scripts/install-criu.sh` (run by `make test`
//! through `scripts/install-deps.sh`): the wrapper `/usr/local/sbin/criu-mapsnap`, or the
//! path in `MAPSNAP_CRIU`.

// Each test binary compiles its own copy of this module and uses only part of it.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const TESTEE: &str = env!("CARGO_BIN_EXE_mapsnap-criu-testee");

/// Panics unless running as root.
pub fn require_root() {
    let uid = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "the CRIU tests must run as root (effective uid {uid}): CRIU and BPF need it"
    );
}

/// The CRIU 4.1 command (a wrapper script installed by scripts/install-criu.sh).
pub fn criu() -> PathBuf {
    let path = std::env::var_os("MAPSNAP_CRIU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/sbin/criu-mapsnap"));
    assert!(
        path.exists(),
        "{} not found: install CRIU 4.1 with `bash scripts/install-criu.sh` (make test does), \
         or point MAPSNAP_CRIU at a CRIU >= 4.1",
        path.display()
    );
    path
}

/// The plugin built beside the test helper (cargo builds the cdylib with the crate):
/// `cargo test` leaves the fresh one in `deps/`, `cargo build` copies it up a directory, so
/// the newer of the two.
pub fn plugin_so() -> PathBuf {
    let dir = Path::new(TESTEE)
        .parent()
        .expect("the helper has a directory");
    [dir.join("deps"), dir.to_path_buf()]
        .into_iter()
        .map(|d| d.join("libmapsnap_criu.so"))
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("libmapsnap_criu.so not built in {}", dir.display()))
}

/// The plugin as shipped: built once per test process by scripts/build-criu-plugin.sh (glibc
/// 2.28 symbol versions, no object storage), in a target directory of its own so that it
/// never waits on the cargo that runs these tests. `MAPSNAP_CRIU_PLUGIN` names a prebuilt one.
pub fn shipped_plugin_so() -> PathBuf {
    static SO: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SO.get_or_init(|| {
        if let Some(p) = std::env::var_os("MAPSNAP_CRIU_PLUGIN") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the workspace");
        let target = Path::new(TESTEE)
            .parent()
            .and_then(Path::parent)
            .expect("the target directory");
        let out = run(Command::new("bash")
            .arg(root.join("scripts/build-criu-plugin.sh"))
            .arg("--target-dir")
            .arg(target.join("criu-plugin-glibc")));
        assert!(
            out.status.success(),
            "scripts/build-criu-plugin.sh failed (zig and cargo-zigbuild come from \
             scripts/install-zig.sh, which make deps runs)"
        );
        let path = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .map(|l| PathBuf::from(l.trim()))
            .expect("the script prints the plugin's path");
        assert!(path.is_file(), "{} not built", path.display());
        path
    })
    .clone()
}

/// A CRIU plugin directory holding a copy of the plugin (CRIU loads every `*.so` there).
pub fn plugin_dir(parent: &Path) -> PathBuf {
    plugin_dir_with(parent, &plugin_so())
}

/// A CRIU plugin directory holding a copy of `so`.
pub fn plugin_dir_with(parent: &Path, so: &Path) -> PathBuf {
    let dir = parent.join("criu-lib");
    fs::create_dir_all(&dir).expect("mkdir criu-lib");
    fs::copy(so, dir.join("libmapsnap_criu.so")).expect("copy the plugin");
    dir
}

/// CRIU's default plugin directory, read when no `libdir` is configured.
pub const CRIU_DEFAULT_PLUGIN_DIR: &str = "/usr/lib/criu";

/// A command that runs `program` in a private mount namespace where `plugins` is mounted on
/// CRIU's default plugin directory: CRIU (run by `program`, e.g. runc) finds the plugin
/// where it is installed on a node, without a `libdir`, while the host's directory is left
/// alone. The directory must exist (scripts/install-criu.sh creates it).
pub fn with_default_plugin_dir(plugins: &Path, program: &str) -> Command {
    assert!(
        Path::new(CRIU_DEFAULT_PLUGIN_DIR).is_dir(),
        "{CRIU_DEFAULT_PLUGIN_DIR} missing: run scripts/install-criu.sh (make deps does)"
    );
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount --bind \"$0\" {CRIU_DEFAULT_PLUGIN_DIR} && exec \"$@\""
        ))
        .arg(plugins)
        .arg(program);
    c
}

/// An empty directory to give CRIU as `--libdir`: no plugin at all.
pub fn empty_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    fs::create_dir_all(&dir).expect("mkdir");
    dir
}

/// Waits for `path` to exist. On timeout, panics with the helper's error file if it wrote one.
pub fn wait_for_file(path: &Path, timeout: Duration, state_dir: &Path) {
    let start = Instant::now();
    while !path.exists() {
        if let Ok(e) = fs::read_to_string(state_dir.join("error.txt")) {
            panic!("the test helper failed: {e}");
        }
        assert!(
            start.elapsed() < timeout,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Waits until `pid` no longer exists (reaping it when it is our child or an orphan handed
/// to us as subreaper): CRIU can only restore a process whose pid is free.
pub fn wait_pid_free(pid: u32, timeout: Duration) {
    let start = Instant::now();
    loop {
        let _ = mapsnap_criu::ffi::try_reap(pid);
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "pid {pid} still exists after {timeout:?} (a zombie nobody reaps?)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command, printing it and what it said.
pub fn run(cmd: &mut Command) -> Output {
    eprintln!("$ {cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    eprintln!("  -> {}", out.status);
    for s in [&out.stdout, &out.stderr] {
        let text = String::from_utf8_lossy(s);
        if !text.trim().is_empty() {
            eprintln!("  {}", text.trim_end().replace('\n', "\n  "));
        }
    }
    out
}

/// The last `n` lines of a log file (for failure messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Lines of a log that mention mapsnap or are errors.
pub fn interesting(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("mapsnap") || l.contains("Error"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn read_json(path: &Path) -> Value {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The plugin's index (`mapsnap-criu.json`) of an image directory.
pub fn read_index(images: &Path) -> Value {
    read_json(&images.join(mapsnap_criu::images::INDEX_NAME))
}

/// The helper's pid, its child's pid and the dump-time id of its map called `name`.
pub fn state_pids(state_dir: &Path) -> (u32, u32) {
    let s = read_json(&state_dir.join("state.json"));
    let pid = s["pid"].as_u64().expect("pid") as u32;
    let child = s["child_pid"].as_u64().expect("child_pid") as u32;
    (pid, child)
}

pub fn state_map_id(state_dir: &Path, name: &str) -> u32 {
    let s = read_json(&state_dir.join("state.json"));
    s["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["map_id"].as_u64())
        .unwrap_or_else(|| panic!("no map {name} in state.json")) as u32
}

/// Names of the files in `dir` starting with `prefix`.
pub fn files_with_prefix(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// Says `go` to the restored helper, waits for its verdict, prints its before/after views of
/// the maps and fails the test on any failed check.
pub fn finish_and_check(state_dir: &Path) {
    fs::write(state_dir.join("go"), "").expect("write go");
    wait_for_file(
        &state_dir.join("result.json"),
        Duration::from_secs(60),
        state_dir,
    );
    for name in ["before.txt", "after.txt"] {
        let text = fs::read_to_string(state_dir.join(name)).unwrap_or_default();
        eprintln!("---- helper's {name} ----\n{text}");
    }
    let result = read_json(&state_dir.join("result.json"));
    eprintln!(
        "helper: {} checks passed, failed: {}",
        result["passed"], result["failed"]
    );
    assert_eq!(
        result["ok"],
        Value::Bool(true),
        "the restored helper found differences: {:#}",
        result["failed"]
    );
}

/// Kills the listed pids when dropped (a failed test leaves nothing running).
#[derive(Debug, Default)]
pub struct KillOnDrop(pub Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            if alive(*pid) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            let _ = mapsnap_criu::ffi::try_reap(*pid);
        }
    }
}
