//! Helpers of the attack tests: a world of bpffs directories and a volume without a runtime,
//! the hook binary run directly, maps, snapshots, and a thread that flips names.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mapsnap::model::map_type;
use mapsnap::sys::{CreateAttrs, Map};
use serde_json::json;

use super::{HOOK, ok, require_root};

/// A small world without a runtime: a tenant bpffs directory (the container's /sys/fs/bpf),
/// another tenant's bpffs directory, a /data volume, a host directory, a node config.
pub struct World {
    pub dir: tempfile::TempDir,
    pub bpf: PathBuf,
    pub victim: PathBuf,
    pub data: PathBuf,
    pub host: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub root: PathBuf,
}

impl World {
    pub fn new(name: &str) -> Self {
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

    pub fn write_config(&self, extra: &str) {
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
    pub fn bundle(&self, name: &str, annotations: &[(&str, &str)]) -> PathBuf {
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
    pub fn hook(&self, stage: &str, bundle: &Path, id: &str, pid: Option<u32>) -> Output {
        let state = json!({"ociVersion": "1.0.2", "id": id, "status": "running", "pid": pid,
                           "bundle": bundle});
        hook_with(&self.config, &["oci", stage], &state.to_string(), &[])
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

pub fn hook_with(config: &Path, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
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

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The run did its work: exit 0 and no tolerated failure (`(ignored)`) on stderr.
pub fn did(o: &Output) -> bool {
    o.status.success() && !stderr(o).contains("(ignored)")
}

/// An array map of 4 u64 slots holding `values`.
pub fn array(name: &str, values: [u64; 4]) -> Map {
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
pub fn contents(m: &Map) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..4u32 {
        let mut v = [0u8; 8];
        assert!(m.lookup(Some(&i.to_ne_bytes()), &mut v, 0).expect("lookup"));
        out.extend_from_slice(&v);
    }
    out
}

/// A snapshot file holding `maps` (map, pin path relative to the container's root).
pub fn snapshot_bytes(maps: Vec<(Map, &str)>) -> Vec<u8> {
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
pub fn names_in(bytes: &[u8]) -> Vec<String> {
    mapsnap::format::verify(bytes)
        .expect("verify")
        .maps
        .iter()
        .map(|(m, _)| m.name.clone())
        .collect()
}

/// Swaps two names atomically (renameat2 RENAME_EXCHANGE): a directory and a symlink trade
/// places, as a container (or a sibling sharing the volume) can do at any moment.
pub fn exchange(a: &Path, b: &Path) -> bool {
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
pub struct Flipper {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Flipper {
    pub fn start(min: u64, mut flip: impl FnMut() + Send + 'static) -> Self {
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

    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("flipper");
        }
        self.count.load(Ordering::SeqCst)
    }
}

/// Names and contents of the files in `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
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
