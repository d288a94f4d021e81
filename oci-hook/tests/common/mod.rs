//! Test bench for mapsnap-hook with real runc (and CRIU): a busybox-static rootfs bundle
//! whose process is our static test app (`tests/app/app.c`), which loads a clang-compiled XDP
//! program (`tests/app/xdp_count.bpf.c`) with two maps pinned by name in the container's
//! bpffs mount (a host bpffs directory bind-mounted at /sys/fs/bpf) and attaches it to the
//! container's veth, in a network namespace the test creates. Pings from the host end of
//! the veth drive the counters.
//!
//! Everything a test creates (container, netns, veth, bpffs directory, host pins) is removed
//! when its [`Bench`] is dropped, also when the test fails. Waits are bounded.

#![allow(dead_code)]

pub mod attack;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mapsnap::sys::Map;
use serde_json::{Value, json};

pub const HOOK: &str = env!("CARGO_BIN_EXE_mapsnap-hook");
pub const RUNC: &str = "runc";

/// Panics unless running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "these tests need root: runc, netns, BPF");
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

/// Runs a runtime command that leaves a detached container behind: its stdout and stderr
/// go to files (read back into the returned output).
pub fn run_detached(mut cmd: Command, out_file: &Path) -> Output {
    let err_file = out_file.with_extension("err");
    let o = fs::File::create(out_file).expect("stdout file");
    let e = fs::File::create(&err_file).expect("stderr file");
    eprintln!("$ {cmd:?}");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(o)
        .stderr(e)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stderr = fs::read(&err_file).unwrap_or_default();
    eprintln!("  -> {status}");
    let text = String::from_utf8_lossy(&stderr);
    if !text.trim().is_empty() {
        eprintln!("  {}", text.trim_end().replace('\n', "\n  "));
    }
    Output {
        status,
        stdout: fs::read(out_file).unwrap_or_default(),
        stderr,
    }
}

pub fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed");
    out
}

fn quiet(cmd: &mut Command) {
    let _ = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The test app and BPF object, built once per test binary.
pub struct App {
    pub app: PathBuf,
    pub obj: PathBuf,
}

pub fn app() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/app");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("mapsnap-hook-app-{}", std::process::id()));
        fs::create_dir_all(&out).expect("mkdir app out");
        let arch_inc = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
        let obj = out.join("xdp_count.bpf.o");
        ok(Command::new("clang")
            .args(["-O2", "-g", "-target", "bpf", "-I"])
            .arg(&arch_inc)
            .arg("-c")
            .arg(src.join("xdp_count.bpf.c"))
            .arg("-o")
            .arg(&obj));
        let app = out.join("app");
        // Static: the busybox rootfs has no libraries. libelf may need libzstd when built
        // with it; try without, then with.
        let mut built = false;
        for extra in [&[][..], &["-lzstd"][..]] {
            let o = run(Command::new("cc")
                .args(["-O2", "-static", "-o"])
                .arg(&app)
                .arg(src.join("app.c"))
                .args(["-lbpf", "-lelf", "-lz"])
                .args(extra));
            if o.status.success() {
                built = true;
                break;
            }
        }
        assert!(
            built,
            "cannot build the static test app: install libbpf-dev, libelf-dev and zlib1g-dev \
             (make deps)"
        );
        App { app, obj }
    })
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One test's world: a network namespace with a veth pair, a bpffs directory for the
/// container's /sys/fs/bpf, a /data volume, a /state directory, a runc root and a node
/// config for the hook.
pub struct Bench {
    pub tag: String,
    pub dir: tempfile::TempDir,
    pub netns: String,
    pub host_veth: String,
    pub host_ip: String,
    pub ctr_ip: String,
    pub bpf_dir: PathBuf,
    pub data: PathBuf,
    pub state: PathBuf,
    pub runc_root: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub hook_state: PathBuf,
    pub requests: PathBuf,
    pub containers: std::cell::RefCell<Vec<String>>,
    pub extra_cleanup: std::cell::RefCell<Vec<PathBuf>>,
}

impl Bench {
    pub fn new(name: &str) -> Self {
        require_root();
        become_subreaper();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{name}-{pid}-{n}");
        let dir = tempfile::Builder::new()
            .prefix("mapsnap-hook-test.")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let short = format!("{:x}{n}", pid % 0xfffff);
        let netns = format!("mh-{short}");
        let host_veth = format!("mh{short}");
        // A /24 per test: pid and sequence spread over 10.100-199.0-249.
        let (a, b) = (100 + ((pid / 250) + n) % 100, pid % 250);
        let host_ip = format!("10.{a}.{b}.1");
        let ctr_ip = format!("10.{a}.{b}.2");
        ensure_bpffs();
        let bpf_dir = PathBuf::from(format!("/sys/fs/bpf/mapsnap-hook-test-{short}"));
        let _ = fs::remove_dir_all(&bpf_dir);
        fs::create_dir_all(&bpf_dir).expect("mkdir bpffs dir");
        let root = dir.path();
        let data = root.join("data");
        let state = root.join("state");
        let runc_root = root.join("runc-root");
        let hook_state = root.join("hook-state");
        let requests = root.join("requests");
        for d in [&data, &state, &runc_root, &requests] {
            fs::create_dir_all(d).expect("mkdir");
        }
        let b = Bench {
            tag,
            netns,
            host_veth,
            host_ip,
            ctr_ip,
            bpf_dir,
            data,
            state,
            runc_root,
            config: root.join("config.toml"),
            log: root.join("hook.log"),
            hook_state,
            requests,
            dir,
            containers: Default::default(),
            extra_cleanup: Default::default(),
        };
        b.write_config("");
        b.make_net();
        b
    }

    /// Writes the hook's node config; `extra` is appended (more TOML).
    pub fn write_config(&self, extra: &str) {
        let text = format!(
            "[hook]\nlog_file = \"{}\"\ndeadline = \"20s\"\nwait_timeout = \"10s\"\n\
             state_dir = \"{}\"\nrequest_dir = \"{}\"\nruntime_roots = [\"{}\"]\n{extra}",
            self.log.display(),
            self.hook_state.display(),
            self.requests.display(),
            self.runc_root.display()
        );
        fs::write(&self.config, text).expect("write config");
    }

    fn make_net(&self) {
        quiet(Command::new("ip").args(["netns", "del", &self.netns]));
        quiet(Command::new("ip").args(["link", "del", &self.host_veth]));
        ok(Command::new("ip").args(["netns", "add", &self.netns]));
        ok(Command::new("ip").args([
            "link",
            "add",
            &self.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &self.netns,
        ]));
        // No IPv6 on either end: only the test's pings cross the link.
        let _ = fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", self.host_veth),
            "1",
        );
        ok(Command::new("ip").args([
            "netns",
            "exec",
            &self.netns,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 || true",
        ]));
        ok(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/24", self.host_ip),
            "dev",
            &self.host_veth,
        ]));
        ok(Command::new("ip").args(["link", "set", &self.host_veth, "up"]));
        ok(Command::new("ip").args([
            "-n",
            &self.netns,
            "addr",
            "add",
            &format!("{}/24", self.ctr_ip),
            "dev",
            "eth0",
        ]));
        ok(Command::new("ip").args(["-n", &self.netns, "link", "set", "eth0", "up"]));
        ok(Command::new("ip").args(["-n", &self.netns, "link", "set", "lo", "up"]));
    }

    /// A bundle `name` under the test dir: busybox rootfs, the app, config.json.
    pub fn bundle(&self, name: &str, annotations: &[(&str, &str)]) -> PathBuf {
        let bundle = self.dir.path().join(name);
        let rootfs = bundle.join("rootfs");
        for d in ["bin", "proc", "sys", "dev", "tmp", "state", "data"] {
            fs::create_dir_all(rootfs.join(d)).expect("mkdir");
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox not found: install busybox-static (make deps)");
        fs::copy(busybox, rootfs.join("bin/busybox")).expect("copy busybox");
        let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh"));
        let a = app();
        fs::copy(&a.app, rootfs.join("app")).expect("copy app");
        fs::copy(&a.obj, rootfs.join("xdp_count.bpf.o")).expect("copy obj");
        ok(Command::new(RUNC).args(["spec", "--bundle"]).arg(&bundle));
        let path = bundle.join("config.json");
        let mut spec: Value =
            serde_json::from_str(&fs::read_to_string(&path).expect("read spec")).expect("json");
        spec["process"]["terminal"] = json!(false);
        spec["process"]["args"] = json!(["/app", "run", "/state", "eth0", "/xdp_count.bpf.o"]);
        for set in ["bounding", "effective", "permitted"] {
            let list = spec["process"]["capabilities"][set]
                .as_array_mut()
                .expect("capability list");
            for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_NET_ADMIN"] {
                list.push(json!(cap));
            }
        }
        spec["hostname"] = json!("mapsnap-hook-test");
        let mounts = spec["mounts"].as_array_mut().expect("mounts");
        for (dest, src) in [
            ("/state", &self.state),
            ("/data", &self.data),
            ("/sys/fs/bpf", &self.bpf_dir),
        ] {
            mounts.push(json!({
                "destination": dest, "type": "bind", "source": src, "options": ["rbind", "rw"],
            }));
        }
        for ns in spec["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
        {
            if ns["type"] == "network" {
                ns["path"] = json!(format!("/run/netns/{}", self.netns));
            }
        }
        let mut ann = serde_json::Map::new();
        for (k, v) in annotations {
            ann.insert(k.to_string(), json!(v));
        }
        spec["annotations"] = Value::Object(ann);
        let hook = |stage: &str| {
            json!([{
                "path": HOOK,
                "args": ["mapsnap-hook", "--config", self.config, "oci", stage],
                "timeout": 30,
            }])
        };
        spec["hooks"] = json!({
            "createRuntime": hook("createRuntime"),
            "poststart": hook("poststart"),
            "poststop": hook("poststop"),
        });
        fs::write(&path, serde_json::to_string_pretty(&spec).expect("json")).expect("write");
        bundle
    }

    pub fn runc(&self) -> Command {
        let mut c = Command::new(RUNC);
        c.arg("--root").arg(&self.runc_root);
        c
    }

    /// `runc run -d`; the output (stderr holds hook errors) for the caller to check.
    ///
    /// The detached container inherits runc's stdio, so stdout and stderr are files (a pipe
    /// would never reach end-of-file while the container runs).
    pub fn start(&self, bundle: &Path, id: &str) -> Output {
        self.containers.borrow_mut().push(id.to_string());
        let _ = fs::remove_file(self.state.join("ready"));
        let _ = fs::remove_file(self.state.join("error"));
        let mut cmd = self.runc();
        cmd.args(["run", "-d", "--bundle"]).arg(bundle).arg(id);
        run_detached(cmd, &self.dir.path().join(format!("{id}.out")))
    }

    /// `runc run -d` with the container's stdio on /dev/null (CRIU cannot checkpoint a
    /// process whose stdio is a host file outside its mounts); hook errors are in the log.
    pub fn start_null_stdio(&self, bundle: &Path, id: &str) {
        self.containers.borrow_mut().push(id.to_string());
        let _ = fs::remove_file(self.state.join("ready"));
        let out = run(self
            .runc()
            .args(["run", "-d", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdout(Stdio::null())
            .stderr(Stdio::null()));
        assert!(
            out.status.success(),
            "runc run failed:\n{}",
            self.log_text()
        );
        self.wait_file("ready");
    }

    /// Starts and waits for the app to be ready (program attached, maps pinned).
    pub fn start_ok(&self, bundle: &Path, id: &str) {
        let out = self.start(bundle, id);
        assert!(
            out.status.success(),
            "runc run failed: {}\nhook log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        self.wait_file("ready");
    }

    /// Waits (bounded) for `name` in the state dir; fails early on the app's error file.
    pub fn wait_file(&self, name: &str) {
        let start = Instant::now();
        let path = self.state.join(name);
        while !path.exists() {
            if let Ok(e) = fs::read_to_string(self.state.join("error")) {
                panic!("the app failed: {e}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} did not appear within 30 s",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `runc state`: (status, pid), None once gone.
    pub fn state_of(&self, id: &str) -> Option<(String, u32)> {
        let out = self
            .runc()
            .args(["state", id])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        Some((
            v["status"].as_str().unwrap_or_default().to_string(),
            v["pid"].as_u64().unwrap_or(0) as u32,
        ))
    }

    /// Stops the container the way an orchestrator does: kill, wait, delete (poststop runs).
    pub fn stop(&self, id: &str) -> Output {
        let _ = run(self.runc().args(["kill", id, "KILL"]));
        let start = Instant::now();
        while self.state_of(id).is_some_and(|(s, _)| s != "stopped") {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{id} did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = run(self.runc().args(["delete", id]));
        assert!(out.status.success(), "runc delete {id} failed");
        reap_children();
        out
    }

    /// Sends `n` pings from the host end of the veth; all must be answered.
    pub fn ping(&self, n: u32) {
        let out = run(Command::new("busybox").args([
            "ping",
            "-c",
            &n.to_string(),
            "-i",
            "0.1",
            "-W",
            "2",
            &self.ctr_ip,
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("{n} packets received")),
            "pings lost: {text}"
        );
    }

    /// The pinned counter array: [every packet, IPv4 packets, ICMP echo requests].
    pub fn counters(&self) -> [u64; 3] {
        let m = Map::from_pin(&self.bpf_dir.join("pkt_count")).expect("open pkt_count");
        let mut out = [0u64; 3];
        for (i, slot) in out.iter_mut().enumerate() {
            let mut v = [0u8; 8];
            let found = m
                .lookup(Some(&(i as u32).to_ne_bytes()), &mut v, 0)
                .expect("lookup");
            assert!(found);
            *slot = u64::from_ne_bytes(v);
        }
        out
    }

    /// ICMP echo requests counted for the host end's address in the hash map.
    pub fn echo_from_host(&self) -> u64 {
        let m = Map::from_pin(&self.bpf_dir.join("src_count")).expect("open src_count");
        let ip: std::net::Ipv4Addr = self.host_ip.parse().expect("ip");
        let key = u32::from_ne_bytes(ip.octets());
        let mut v = [0u8; 8];
        if m.lookup(Some(&key.to_ne_bytes()), &mut v, 0)
            .expect("lookup")
        {
            u64::from_ne_bytes(v)
        } else {
            0
        }
    }

    /// Files (pins, dirs, links) in the container's bpffs directory.
    pub fn pins(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.bpf_dir)
            .expect("read bpffs dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// "A new node": the XDP program detached, the pins gone (the maps with them).
    pub fn wipe_node(&self) {
        ok(Command::new("ip").args([
            "-n",
            &self.netns,
            "link",
            "set",
            "eth0",
            "xdpgeneric",
            "off",
        ]));
        for p in self.pins() {
            let path = self.bpf_dir.join(&p);
            if path.is_dir() {
                fs::remove_dir_all(&path).expect("rm dir");
            } else {
                fs::remove_file(&path).expect("rm pin");
            }
        }
    }

    /// Whether an XDP program is attached to the container's veth.
    pub fn xdp_attached(&self) -> bool {
        let out = run(Command::new("ip").args(["-n", &self.netns, "link", "show", "eth0"]));
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    }

    /// Waits (bounded) for a hook log line containing `needle`.
    pub fn wait_log(&self, needle: &str) {
        let start = Instant::now();
        while self.log_lines_with(needle).is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no hook log line with {needle:?} within 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The hook's log lines (JSON) whose text contains `needle`.
    pub fn log_lines_with(&self, needle: &str) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("log line not JSON: {e}: {l}"))
            })
            .collect()
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for id in self.containers.borrow().iter() {
            quiet(self.runc().args(["delete", "-f", id]));
        }
        reap_children();
        quiet(Command::new("ip").args(["netns", "del", &self.netns]));
        quiet(Command::new("ip").args(["link", "del", &self.host_veth]));
        let _ = fs::remove_dir_all(&self.bpf_dir);
        for p in self.extra_cleanup.borrow().iter() {
            let _ = fs::remove_dir_all(p);
            let _ = fs::remove_file(p);
        }
    }
}

fn ensure_bpffs() {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        ok(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]));
    }
}

/// Containers started with `runc run -d` are re-parented to us, so that killed ones can be
/// reaped (CRIU restores only into a free pid).
pub fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
}

/// Reaps every exited child without blocking.
pub fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG and a valid status pointer.
        let rc = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if rc <= 0 {
            break;
        }
    }
}

/// Waits until `pid` no longer exists, reaping it.
pub fn wait_pid_free(pid: u32, timeout: Duration) {
    let start = Instant::now();
    loop {
        reap_children();
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "pid {pid} still exists after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The CRIU 4.1 wrapper (scripts/install-criu.sh).
pub fn criu() -> PathBuf {
    let path = std::env::var_os("MAPSNAP_CRIU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/sbin/criu-mapsnap"));
    assert!(
        path.exists(),
        "{} not found: install CRIU 4.1 with `bash scripts/install-criu.sh` (make test does)",
        path.display()
    );
    path
}

/// The CRIU plugin built in this workspace, when it is there (cargo builds it with the
/// workspace's tests): the directory to give CRIU as `libdir`.
pub fn criu_plugin_dir(parent: &Path) -> Option<PathBuf> {
    let target = Path::new(HOOK).parent()?;
    let so = [
        target.join("libmapsnap_criu.so"),
        target.join("deps/libmapsnap_criu.so"),
    ]
    .into_iter()
    .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
    .max()
    .map(|(_, p)| p)?;
    let dir = parent.join("criu-lib");
    fs::create_dir_all(&dir).ok()?;
    fs::copy(&so, dir.join("libmapsnap_criu.so")).ok()?;
    Some(dir)
}

/// A moto S3 server on a free loopback port with one bucket; killed on drop.
pub struct S3 {
    pub port: u16,
    child: std::process::Child,
    _log: tempfile::NamedTempFile,
}

impl S3 {
    pub fn start(bucket: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = tempfile::NamedTempFile::new().expect("log");
        let python = std::env::var("MAPSNAP_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("log"))
            .stderr(log.reopen().expect("log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start moto ({python} -m moto.server): {e}; run scripts/install-s3.sh"
                )
            });
        let s3 = S3 {
            port,
            child,
            _log: log,
        };
        let start = Instant::now();
        loop {
            if let Ok(200) = http_status(port, "GET", "/moto-api/") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            http_status(port, "PUT", &format!("/{bucket}")).expect("create bucket"),
            200
        );
        s3
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_status(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let head = String::from_utf8_lossy(&resp);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))
}

/// The CRIU config file runc passes through `org.criu.config`: what `mapsnap-hook install
/// --config` writes (a wrapper, as CRIU's config takes no arguments after the script path),
/// and the mapsnap CRIU plugin as `libdir` when the workspace built it.
pub fn criu_conf(b: &Bench) -> PathBuf {
    let wrapper = b.dir.path().join("criu-action");
    // The wrapper `mapsnap-hook install` writes, with this bench's hook and config.
    fs::write(
        &wrapper,
        mapsnap_hook::install::criu_wrapper_text(Path::new(HOOK), &b.config),
    )
    .expect("wrapper");
    fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut text = format!("action-script {}\n", wrapper.display());
    if let Some(dir) = criu_plugin_dir(b.dir.path()) {
        eprintln!(
            "(CRIU runs with the mapsnap CRIU plugin from {})",
            dir.display()
        );
        text.push_str(&format!("libdir {}\n", dir.display()));
    } else {
        eprintln!("(the CRIU plugin is not built in this target dir: CRIU runs without it)");
    }
    let path = b.dir.path().join("criu.conf");
    fs::write(&path, text).expect("criu.conf");
    path
}

/// The last `n` lines of a file (a CRIU log), for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Bench {
    /// `runc checkpoint` of `id` with CRIU into `images` (`extra`: e.g. `--leave-running`);
    /// fails the test with CRIU's and the hook's logs.
    pub fn criu_checkpoint(&self, id: &str, images: &Path, extra: &[&str]) {
        let work = self.dir.path().join("work-dump");
        let out = run(self
            .runc()
            .arg("--criu")
            .arg(criu())
            .arg("checkpoint")
            .args(extra)
            .arg("--image-path")
            .arg(images)
            .arg("--work-path")
            .arg(&work)
            .arg(id));
        assert!(
            out.status.success(),
            "runc checkpoint failed\n--- dump.log ---\n{}\n--- hook log ---\n{}",
            tail(&work.join("dump.log"), 30),
            self.log_text()
        );
    }

    /// `runc restore -d` of `id` from `images` with `bundle`; fails the test with CRIU's and
    /// the hook's logs.
    pub fn criu_restore(&self, id: &str, images: &Path, bundle: &Path) {
        let (out, log) = self.try_criu_restore(id, images, bundle);
        assert!(
            out.status.success(),
            "runc restore failed\n--- restore.log ---\n{}\n--- hook log ---\n{}",
            tail(&log, 30),
            self.log_text()
        );
    }

    /// `runc restore -d`, for the caller to check: its output and CRIU's restore log (a
    /// hook's refusal is in the hook's log; runc's stdio is /dev/null, which the restored
    /// container may inherit).
    pub fn try_criu_restore(&self, id: &str, images: &Path, bundle: &Path) -> (Output, PathBuf) {
        let rwork = self.dir.path().join("work-restore");
        let out = run(self
            .runc()
            .arg("--criu")
            .arg(criu())
            .args(["restore", "-d", "--image-path"])
            .arg(images)
            .arg("--work-path")
            .arg(&rwork)
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdout(Stdio::null())
            .stderr(Stdio::null()));
        (out, rwork.join("restore.log"))
    }
}
