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

impl RegistryServer {
    pub fn start() -> Self {
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
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n",
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
        loop {
            if r.get_v2() == Some(200) {
                break;
            }
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
