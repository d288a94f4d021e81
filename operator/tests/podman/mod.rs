//! Helpers for the checkpoint-image tests with real components: a CNCF distribution registry
//! (`docker-registry`, installed by scripts/install-registry.sh) on a free 127.0.0.1 port,
//! skopeo, and commands run with their output shown. Everything started here is stopped
//! when its guard drops, also when a test fails.

#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const OPERATOR: &str = env!("CARGO_BIN_EXE_mapsnap-operator");

/// Panics unless running as root.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_string();
    assert_eq!(euid, "0", "these tests need root (Podman, CRIU, BPF)");
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
            let t: String = text.chars().take(8000).collect();
            eprintln!("  {}", t.trim_end().replace('\n', "\n  "));
        }
    }
    out
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// `docker-registry serve` on 127.0.0.1 with a private storage root; killed on drop.
pub struct RegistryServer {
    pub addr: String,
    child: Child,
    pub dir: tempfile::TempDir,
}

/// What the test registry demands.
#[derive(Debug, Default, Clone)]
pub struct Security {
    /// TLS with a self-signed certificate for 127.0.0.1 (its PEM is the CA to trust).
    pub tls: bool,
    /// Basic auth: this user and password (htpasswd, bcrypt).
    pub user: Option<(String, String)>,
}

impl RegistryServer {
    pub fn start() -> Self {
        Self::start_with(&Security::default())
    }

    /// The CA certificate clients must trust (with `Security::tls`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn start_with(sec: &Security) -> Self {
        let bin = which("docker-registry").unwrap_or_else(|| {
            panic!(
                "docker-registry not found: run `bash scripts/install-registry.sh` (make deps does)"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("mapsnap-registry.")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut extra = String::new();
        if sec.tls {
            // A CA and a server certificate it signed: TLS verifiers refuse a self-signed
            // CA certificate as the server's own.
            let p = |n: &str| dir.path().join(n);
            let (cert, key) = (p("cert.pem"), p("key.pem"));
            ok(Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args(["-subj", "/CN=mapsnap test CA", "-keyout"])
                .arg(p("ca.key"))
                .arg("-out")
                .arg(p("ca.pem")));
            ok(Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=127.0.0.1",
                ])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(p("server.csr")));
            std::fs::write(
                p("server.ext"),
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                 extendedKeyUsage=serverAuth\n",
            )
            .expect("ext");
            ok(Command::new("openssl")
                .args(["x509", "-req", "-days", "1", "-in"])
                .arg(p("server.csr"))
                .arg("-CA")
                .arg(p("ca.pem"))
                .arg("-CAkey")
                .arg(p("ca.key"))
                .arg("-CAcreateserial")
                .arg("-extfile")
                .arg(p("server.ext"))
                .arg("-out")
                .arg(&cert));
            extra.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        let mut auth = String::new();
        if let Some((user, password)) = &sec.user {
            let line = ok(Command::new("htpasswd").args(["-Bbn", user, password]));
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, line.trim()).expect("htpasswd file");
            auth = format!(
                "auth:\n  htpasswd:\n    realm: mapsnap-test\n    path: {}\n",
                file.display()
            );
        }
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n{extra}{auth}",
                dir.path().join("data").display()
            ),
        )
        .expect("registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut r = RegistryServer { addr, child, dir };
        let start = Instant::now();
        // Any HTTP answer means it listens (a TLS port answers plain HTTP with 400, an
        // authenticated one with 401).
        while r.get_v2().is_none() {
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!("docker-registry exited ({status}): {}", r.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "docker-registry did not answer on {} within 20s: {}",
                r.addr,
                r.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("registry: {} (root {})", r.addr, r.dir.path().display());
        r
    }

    /// The status of `GET /v2/` (None when nothing answers).
    fn get_v2(&self) -> Option<u16> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).ok()?;
        let head = String::from_utf8_lossy(&buf[..n]);
        head.split_whitespace().nth(1)?.parse().ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// `skopeo inspect --tls-verify=false [extra] docker://REF` as JSON.
pub fn skopeo_inspect(reference: &str, extra: &[&str]) -> Value {
    let text = ok(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .args(extra)
        .arg(format!("docker://{reference}")));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("skopeo said no JSON ({e}): {text}"))
}

/// `mapsnap-operator checkpoint-image ...` pushing `archive` to `push` over plain HTTP;
/// returns the printed `REF@sha256:...`.
pub fn checkpoint_image_cli(archive: &Path, container: &str, push: &str) -> String {
    let out = ok(Command::new(OPERATOR)
        .arg("checkpoint-image")
        .arg("--archive")
        .arg(archive)
        .args(["--container", container, "--push", push, "--insecure-http"]));
    let reference = out.trim().to_string();
    assert!(
        reference.contains("@sha256:") && !reference.contains('\n'),
        "checkpoint-image printed {out:?}"
    );
    reference
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path).expect("open");
    std::io::copy(&mut f, &mut h).expect("hash");
    format!("sha256:{}", hex::encode(h.finalize()))
}

// ---- Podman nodes -------------------------------------------------------------------------

/// One "node": a Podman storage root, run root and tmp dir of its own (one machine, two
/// nodes), with the hooks directory `mapsnap-hook install` wrote. Drop removes every
/// container, image and layer it holds (`podman system reset`).
pub struct Node {
    pub name: &'static str,
    pub root: PathBuf,
    pub runroot: PathBuf,
    pub tmpdir: PathBuf,
    pub hooks_dir: PathBuf,
}

impl Node {
    pub fn new(base: &Path, name: &'static str, hooks_dir: &Path) -> Self {
        let dir = base.join(name);
        let n = Node {
            name,
            root: dir.join("root"),
            runroot: dir.join("run"),
            tmpdir: dir.join("tmp"),
            hooks_dir: hooks_dir.to_path_buf(),
        };
        for d in [&n.root, &n.runroot, &n.tmpdir] {
            std::fs::create_dir_all(d).expect("mkdir node dir");
        }
        n
    }

    /// `podman` with this node's global flags. cgroupfs and file events: no systemd here.
    /// `--hooks-dir`: the test's private hooks directory instead of the machine's.
    pub fn podman(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .arg("--tmpdir")
            .arg(&self.tmpdir)
            .arg("--hooks-dir")
            .arg(&self.hooks_dir)
            .args(["--cgroup-manager=cgroupfs", "--events-backend=file"]);
        c
    }

    /// `tar -C rootfs -c . | podman import - image`.
    pub fn import_rootfs(&self, rootfs: &Path, image: &str) {
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        let out = self
            .podman()
            .args(["import", "-", image])
            .stdin(tar.stdout.take().expect("tar stdout"))
            .output()
            .expect("podman import");
        let tar_status = tar.wait().expect("tar");
        assert!(
            tar_status.success() && out.status.success(),
            "tar | podman import ({tar_status}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `podman inspect` of a container as JSON (None when it does not exist).
    pub fn inspect(&self, name: &str) -> Option<Value> {
        let out = self
            .podman()
            .args(["container", "inspect", name])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.get(0).cloned()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for args in [
            &["rm", "--all", "--force", "--time", "0"][..],
            &["system", "reset", "--force"],
        ] {
            let _ = self
                .podman()
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Binaries of the other workspace crates the end-to-end test needs, from this test's target
/// directory: a workspace test run (`make test`) has built them with its own tests. When one
/// is missing (only this crate's tests were built), cargo builds them. They are not rebuilt
/// when present: another crate's tests may be running them at this moment.
pub struct Artifacts {
    pub hook: PathBuf,
    pub testee: PathBuf,
    pub plugin: PathBuf,
}

fn newest(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
}

pub fn artifacts() -> Artifacts {
    // target/<profile>/deps/<this test> -> target/<profile>
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary under target/<profile>/deps")
        .to_path_buf();
    let find = || {
        Some(Artifacts {
            hook: newest(&[profile_dir.join("mapsnap-hook")])?,
            testee: newest(&[profile_dir.join("mapsnap-criu-testee")])?,
            // `cargo test` leaves the fresh cdylib in deps/, `cargo build` copies it up.
            plugin: newest(&[
                profile_dir.join("libmapsnap_criu.so"),
                profile_dir.join("deps/libmapsnap_criu.so"),
            ])?,
        })
    };
    if let Some(a) = find() {
        return a;
    }
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", "mapsnap-hook", "--bin", "mapsnap-hook"])
        .args([
            "-p",
            "mapsnap-criu",
            "--bin",
            "mapsnap-criu-testee",
            "--lib",
        ])
        .env("CARGO_TARGET_DIR", &target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    ok(&mut cmd);
    find().unwrap_or_else(|| {
        panic!(
            "mapsnap-hook, mapsnap-criu-testee or libmapsnap_criu.so missing in {} after cargo build",
            profile_dir.display()
        )
    })
}

/// Copies `src` to the same absolute path under `rootfs`.
pub fn copy_into(rootfs: &Path, src: &Path) {
    let dst = rootfs.join(src.strip_prefix("/").expect("absolute path"));
    std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
    std::fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
}

/// A busybox-static rootfs with `bin` at /testee and the shared libraries `ldd` lists for it.
pub fn testee_rootfs(rootfs: &Path, bin: &Path) {
    for d in ["bin", "proc", "sys/fs/bpf", "dev", "tmp", "state"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir");
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox not found: install busybox-static (make deps)");
    std::fs::copy(busybox, rootfs.join("bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("symlink sh");
    std::fs::copy(bin, rootfs.join("testee")).expect("copy the testee");
    let ldd = Command::new("ldd").arg(bin).output().expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        copy_into(rootfs, Path::new(lib));
    }
}

/// Waits for `path`; on timeout (or when the testee wrote its error file) panics with why.
pub fn wait_for_file(path: &Path, timeout: Duration, state_dir: &Path) {
    let start = Instant::now();
    while !path.exists() {
        if let Ok(e) = std::fs::read_to_string(state_dir.join("error.txt")) {
            panic!("the testee failed: {e}");
        }
        assert!(
            start.elapsed() < timeout,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes a host bpffs directory with its pins when dropped.
pub struct BpffsDir(pub PathBuf);

impl BpffsDir {
    pub fn new(name: &str) -> Self {
        let mounted = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
        if !mounted {
            ok(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]));
        }
        let dir = PathBuf::from("/sys/fs/bpf").join(name);
        let d = BpffsDir(dir);
        d.clear();
        std::fs::create_dir_all(&d.0).expect("mkdir in bpffs");
        d
    }

    /// Unlinks every pin (a fresh node's empty directory).
    pub fn clear(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.0) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        self.clear();
        let _ = std::fs::remove_dir(&self.0);
    }
}
