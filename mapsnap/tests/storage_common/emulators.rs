//! Azurite and fake-gcs-server, started on a free loopback port with the bucket `snap` and
//! stopped on drop; plus Shared Key signed requests to Azurite. Standard library only, so
//! the hook's and the agent's tests include this file as it is (`#[path]`).
//!
//! Installed by scripts/install-azurite.sh and scripts/install-gcs.sh under
//! `MAPSNAP_TEST_PREFIX` (default /opt/mapsnap-test).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Azurite's well-known development account and key (public, documented by Microsoft).
pub const AZ_ACCOUNT: &str = "devstoreaccount1";
pub const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The bearer token given to clients of fake-gcs-server (which does not check it).
pub const GCS_TOKEN: &str = "mapsnap-test-token";

/// Where the install scripts put the servers.
pub fn prefix() -> PathBuf {
    std::env::var_os("MAPSNAP_TEST_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/mapsnap-test"))
}

fn python() -> String {
    std::env::var("MAPSNAP_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Which emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emu {
    Azurite,
    FakeGcs,
}

/// A running emulator with the bucket (container) `snap`.
pub struct Emulator {
    pub kind: Emu,
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl Emulator {
    pub fn start(kind: Emu) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = std::env::temp_dir().join(format!("mapsnap-emu-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("emulator dir");
        let log = std::fs::File::create(dir.join("log")).expect("log");
        let (mut cmd, script) = match kind {
            Emu::Azurite => {
                let mut c = Command::new(prefix().join("azurite/node_modules/.bin/azurite-blob"));
                c.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                    .arg("--location")
                    .arg(dir.join("data"))
                    .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"]);
                (c, "scripts/install-azurite.sh")
            }
            Emu::FakeGcs => {
                let mut c = Command::new(prefix().join("gcs/bin/fake-gcs-server"));
                c.args([
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-port",
                    &port.to_string(),
                ])
                .args(["-backend", "filesystem", "-filesystem-root"])
                .arg(dir.join("data"))
                .args(["-public-host", "127.0.0.1", "-log-level", "warn"]);
                (c, "scripts/install-gcs.sh")
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}; run make deps ({script})"));
        let mut emu = Emulator {
            kind,
            port,
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while status_of(port, "GET", "/", &[], b"").is_none() {
            if let Ok(Some(status)) = emu.child.try_wait() {
                let log = std::fs::read_to_string(emu.dir.join("log")).unwrap_or_default();
                panic!("{cmd:?} exited at once ({status}); run make deps ({script}):\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "{cmd:?} did not answer within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = match kind {
            Emu::Azurite => azure_request(port, "PUT", "/snap", &[("restype", "container")]).0,
            Emu::FakeGcs => status_of(
                port,
                "POST",
                "/storage/v1/b",
                &[("Content-Type", "application/json")],
                b"{\"name\":\"snap\"}",
            )
            .unwrap_or(0),
        };
        assert!((200..300).contains(&status), "create bucket snap: {status}");
        emu
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `gs` or `az`.
    pub fn scheme(&self) -> &'static str {
        match self.kind {
            Emu::Azurite => "az",
            Emu::FakeGcs => "gs",
        }
    }

    /// The config file section and its options (object_store key names) that reach it.
    pub fn section(&self) -> (&'static str, Vec<(&'static str, String)>) {
        match self.kind {
            Emu::Azurite => (
                "azure",
                vec![
                    ("use_emulator", "true".into()),
                    ("endpoint", format!("{}/{AZ_ACCOUNT}", self.endpoint())),
                ],
            ),
            Emu::FakeGcs => (
                "gcs",
                vec![
                    ("base_url", self.endpoint()),
                    ("allow_http", "true".into()),
                    ("bearer_token", GCS_TOKEN.into()),
                ],
            ),
        }
    }

    /// The same as TOML (`[azure]` / `[gcs]` table).
    pub fn toml(&self) -> String {
        let (name, opts) = self.section();
        let mut t = format!("\n[{name}]\n");
        for (k, v) in opts {
            t.push_str(&format!("{k} = \"{v}\"\n"));
        }
        t
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The status of one HTTP request, `None` when there is no HTTP answer.
fn status_of(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    String::from_utf8_lossy(&resp)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// One Shared Key signed request to Azurite on `port`: (status, body).
pub fn azure_request(
    port: u16,
    method: &str,
    path: &str,
    query: &[(&str, &str)],
) -> (u16, Vec<u8>) {
    let mut args = vec![
        AZ_SIGNER.to_string(),
        port.to_string(),
        method.to_string(),
        path.to_string(),
    ];
    args.extend(query.iter().map(|(k, v)| format!("{k}={v}")));
    let out = Command::new(python())
        .arg("-c")
        .args(&args)
        .output()
        .expect("run the Azure request signer");
    assert!(
        out.status.success(),
        "Azure request {method} {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (status, body) = text.split_once(' ').unwrap_or((&text, ""));
    (
        status.trim().parse().expect("status"),
        body.as_bytes().to_vec(),
    )
}

/// Signs one request with Azure Shared Key (Python standard library only) and prints
/// `STATUS BODY`: argv = port, method, path (under the account), then `k=v` query pairs.
const AZ_SIGNER: &str = r#"
import base64, email.utils, hashlib, hmac, sys, urllib.error, urllib.parse, urllib.request
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
ACC = "devstoreaccount1"
port, method, path = sys.argv[1], sys.argv[2], sys.argv[3]
query = dict(a.split("=", 1) for a in sys.argv[4:])
hdrs = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
ct = "application/octet-stream" if method == "PUT" else ""
canon_h = "".join(f"{k}:{v}\n" for k, v in sorted(hdrs.items()))
canon_r = f"/{ACC}/{ACC}{path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
sts = f"{method}\n\n\n\n\n{ct}\n\n\n\n\n\n\n{canon_h}{canon_r}"
sig = base64.b64encode(hmac.new(base64.b64decode(KEY), sts.encode(), hashlib.sha256).digest()).decode()
hdrs["Authorization"] = f"SharedKey {ACC}:{sig}"
if ct:
    hdrs["Content-Type"] = ct
q = urllib.parse.urlencode(query)
url = f"http://127.0.0.1:{port}/{ACC}{path}" + (f"?{q}" if q else "")
req = urllib.request.Request(url, method=method, headers=hdrs, data=b"" if method == "PUT" else None)
try:
    with urllib.request.urlopen(req) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
"#;
