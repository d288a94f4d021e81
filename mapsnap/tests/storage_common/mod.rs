//! Test harness for the storage tests: real object storage servers (S3: moto, Azure Blob:
//! Azurite, GCS: fake-gcs-server), each started on a free loopback port and stopped on drop,
//! a fault-injecting TCP proxy in front of them, raw looks into the bucket behind mapsnap's
//! back, and big deterministic maps.
//!
//! The servers come from scripts/install-s3.sh, install-azurite.sh and install-gcs.sh
//! (`make deps`): `MAPSNAP_TEST_PYTHON` picks the interpreter for moto (default `python3`),
//! `MAPSNAP_TEST_PREFIX` the prefix of the other two (default /opt/mapsnap-test).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod emulators;

use mapsnap::model::map_type as mt;
use mapsnap::storage::StorageConfig;
use mapsnap::sys::{CreateAttrs, Map};

pub const BUCKET: &str = "snap";

/// The bearer token given to mapsnap for GCS (fake-gcs-server does not check it).
pub const GCS_TOKEN: &str = "mapsnap-test-token";

pub use emulators::{AZ_ACCOUNT, AZ_KEY};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn python() -> String {
    std::env::var("MAPSNAP_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

use emulators::prefix;

/// Which object storage protocol a [`Server`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    S3,
    Azure,
    Gcs,
}

impl Kind {
    pub fn scheme(self) -> &'static str {
        match self {
            Kind::S3 => "s3",
            Kind::Azure => "az",
            Kind::Gcs => "gs",
        }
    }

    /// `scheme://snap/key`.
    pub fn url(self, key: &str) -> String {
        format!("{}://{BUCKET}/{key}", self.scheme())
    }

    fn server_name(self) -> &'static str {
        match self {
            Kind::S3 => "moto (S3)",
            Kind::Azure => "Azurite (Azure Blob)",
            Kind::Gcs => "fake-gcs-server (GCS)",
        }
    }

    fn install_script(self) -> &'static str {
        match self {
            Kind::S3 => "scripts/install-s3.sh",
            Kind::Azure => "scripts/install-azurite.sh",
            Kind::Gcs => "scripts/install-gcs.sh",
        }
    }
}

/// An object storage server process on 127.0.0.1 with the bucket [`BUCKET`].
pub struct Server {
    pub kind: Kind,
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
    /// Azurite and fake-gcs-server keep their data here, so it survives a restart.
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts a server on a free port and creates [`BUCKET`].
    pub fn start(kind: Kind) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let mut m = Server {
            kind,
            port: free_port(),
            child: None,
            log: dir.path().join("server.log"),
            data,
            _dir: dir,
        };
        // Another test process may take the free port first: try a few.
        let mut tries = 0;
        while let Err(log) = m.spawn() {
            tries += 1;
            assert!(
                tries < 3 && (log.contains("in use") || log.contains("EADDRINUSE")),
                "the {} test server exited at once; run `make deps` ({} installs it):\n{log}",
                kind.server_name(),
                kind.install_script()
            );
            m.port = free_port();
        }
        m.create_bucket(BUCKET);
        m
    }

    fn command(&self) -> Command {
        let port = self.port.to_string();
        match self.kind {
            Kind::S3 => {
                let mut c = Command::new(python());
                c.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port]);
                c
            }
            Kind::Azure => {
                let mut c = Command::new(prefix().join("azurite/node_modules/.bin/azurite-blob"));
                c.args(["--blobHost", "127.0.0.1", "--blobPort", &port, "--location"])
                    .arg(&self.data)
                    .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"]);
                c
            }
            Kind::Gcs => {
                let mut c = Command::new(prefix().join("gcs/bin/fake-gcs-server"));
                c.args(["-scheme", "http", "-host", "127.0.0.1", "-port", &port])
                    .args(["-backend", "filesystem", "-filesystem-root"])
                    .arg(&self.data)
                    // Host-only public host: object URLs on any port (the proxy's too).
                    .args(["-public-host", "127.0.0.1", "-log-level", "warn"]);
                c
            }
        }
    }

    /// Starts the server; `Err(log)` when it exits at once.
    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(&self.log).expect("log file");
        let err = log.try_clone().expect("log file");
        let mut cmd = self.command();
        let child = cmd.stdin(Stdio::null()).stdout(log).stderr(err).spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start the {} test server ({cmd:?}): {e}; run `make deps` ({} installs it)",
                self.kind.server_name(),
                self.kind.install_script()
            ),
        };
        let probe = match self.kind {
            Kind::S3 => "/moto-api/",
            Kind::Azure => "/devstoreaccount1?comp=list",
            Kind::Gcs => "/storage/v1/b",
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(format!("{status}: {log}"));
            }
            // Any HTTP answer means it is up (Azurite answers 403 to an unsigned request).
            if let Ok((status, _)) = http(self.port, "GET", probe, &[], &[])
                && status > 0
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the {} test server did not answer on 127.0.0.1:{} within 30 s",
                self.kind.server_name(),
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        Ok(())
    }

    /// The server's process id (to kill it from a proxy fault).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Kills the server at once (SIGKILL): in-flight requests see their connections die.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port. fake-gcs-server keeps its data on disk,
    /// Azurite what it had saved, moto nothing (the bucket is created again when missing).
    pub fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.spawn() {
            panic!(
                "the {} test server did not restart on port {}: {log}",
                self.kind.server_name(),
                self.port
            );
        }
        // moto keeps no state; Azurite may lose recent metadata to a SIGKILL.
        if self.kind != Kind::Gcs {
            self.create_bucket(BUCKET);
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn create_bucket(&self, name: &str) {
        let (status, body) = match self.kind {
            Kind::S3 => http(self.port, "PUT", &format!("/{name}"), &[], &[]).expect("PUT"),
            Kind::Azure => self.azure("PUT", &format!("/{name}"), &[("restype", "container")]),
            Kind::Gcs => http(
                self.port,
                "POST",
                "/storage/v1/b",
                &[("Content-Type", "application/json")],
                format!("{{\"name\":\"{name}\"}}").as_bytes(),
            )
            .expect("POST bucket"),
        };
        assert!(
            (200..300).contains(&status) || status == 409,
            "create bucket {name}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// One Shared Key signed request to Azurite (the same signing the service checks).
    pub fn azure(&self, method: &str, path: &str, query: &[(&str, &str)]) -> (u16, Vec<u8>) {
        emulators::azure_request(self.port, method, path, query)
    }

    /// A client of the bucket behind mapsnap's back (object_store, same test credentials).
    /// GCS has none: fake-gcs-server takes no XML API writes, so it is reached raw.
    fn client(&self) -> (tokio::runtime::Runtime, Box<dyn object_store::ObjectStore>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let store: Box<dyn object_store::ObjectStore> = match self.kind {
            Kind::S3 => Box::new(
                object_store::aws::AmazonS3Builder::new()
                    .with_endpoint(self.endpoint())
                    .with_allow_http(true)
                    .with_bucket_name(BUCKET)
                    .with_region("us-east-1")
                    .with_access_key_id("mapsnap-test")
                    .with_secret_access_key("mapsnap-test-secret")
                    .build()
                    .expect("test S3 client"),
            ),
            Kind::Azure => Box::new(
                object_store::azure::MicrosoftAzureBuilder::new()
                    .with_account(AZ_ACCOUNT)
                    .with_access_key(AZ_KEY)
                    .with_endpoint(format!("{}/{AZ_ACCOUNT}", self.endpoint()))
                    .with_allow_http(true)
                    .with_container_name(BUCKET)
                    .build()
                    .expect("test Azure client"),
            ),
            Kind::Gcs => unreachable!("GCS is reached raw"),
        };
        (rt, store)
    }

    /// The object's bytes, or `None` when there is no object under the key.
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        use object_store::ObjectStoreExt;
        if self.kind == Kind::Gcs {
            let (status, body) = http(
                self.port,
                "GET",
                &format!("/download/storage/v1/b/{BUCKET}/o/{}?alt=media", enc(key)),
                &[],
                &[],
            )
            .expect("GET object");
            return match status {
                200 => Some(body),
                404 => None,
                s => panic!("GET {key}: {s} {}", String::from_utf8_lossy(&body)),
            };
        }
        let (rt, store) = self.client();
        rt.block_on(async {
            match store.get(&object_store::path::Path::from(key)).await {
                Ok(r) => Some(r.bytes().await.expect("GET body").to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("GET {key}: {e}"),
            }
        })
    }

    /// Replaces an object behind mapsnap's back (no conditions).
    pub fn put_object(&self, key: &str, bytes: &[u8]) {
        use object_store::ObjectStoreExt;
        if self.kind == Kind::Gcs {
            let (status, body) = http(
                self.port,
                "POST",
                &format!(
                    "/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={}",
                    enc(key)
                ),
                &[("Content-Type", "application/octet-stream")],
                bytes,
            )
            .expect("POST object");
            assert_eq!(status, 200, "PUT {key}: {}", String::from_utf8_lossy(&body));
            return;
        }
        let (rt, store) = self.client();
        rt.block_on(store.put(
            &object_store::path::Path::from(key),
            object_store::PutPayload::from(bytes.to_vec()),
        ))
        .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
    }

    /// How many parts the stored object was assembled from, where the protocol shows it:
    /// S3 (the ETag's `-N`), Azure (the committed block list). GCS: `None` (a resumable
    /// upload leaves one plain object).
    pub fn parts(&self, key: &str) -> Option<usize> {
        use object_store::ObjectStoreExt;
        match self.kind {
            Kind::S3 => {
                let (rt, store) = self.client();
                let tag = rt
                    .block_on(store.head(&object_store::path::Path::from(key)))
                    .ok()?
                    .e_tag?;
                tag.trim_matches('"')
                    .rsplit_once('-')
                    .and_then(|(_, n)| n.parse().ok())
            }
            Kind::Azure => {
                let (status, body) = self.azure(
                    "GET",
                    &format!("/{BUCKET}/{key}"),
                    &[("comp", "blocklist"), ("blocklisttype", "committed")],
                );
                (status == 200).then(|| String::from_utf8_lossy(&body).matches("<Block>").count())
            }
            Kind::Gcs => None,
        }
    }

    /// Unfinished uploads the protocol lets a client see, by key: S3 multipart uploads in
    /// progress; Azure blobs holding uncommitted blocks. `None` for GCS, whose resumable
    /// sessions cannot be listed.
    pub fn leftovers(&self) -> Option<Vec<String>> {
        match self.kind {
            Kind::S3 => {
                let (status, body) =
                    http(self.port, "GET", &format!("/{BUCKET}?uploads"), &[], &[])
                        .expect("GET uploads");
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                Some(xml_all(&String::from_utf8_lossy(&body), "Key"))
            }
            Kind::Azure => {
                let (status, body) = self.azure(
                    "GET",
                    &format!("/{BUCKET}"),
                    &[
                        ("restype", "container"),
                        ("comp", "list"),
                        ("include", "uncommittedblobs"),
                    ],
                );
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                let names = xml_all(&String::from_utf8_lossy(&body), "Name");
                Some(
                    names
                        .into_iter()
                        .filter(|name| {
                            let (s, b) = self.azure(
                                "GET",
                                &format!("/{BUCKET}/{name}"),
                                &[("comp", "blocklist"), ("blocklisttype", "uncommitted")],
                            );
                            s == 200 && String::from_utf8_lossy(&b).contains("<Block>")
                        })
                        .collect(),
                )
            }
            Kind::Gcs => None,
        }
    }

    /// Environment for mapsnap: endpoint, credentials, no config file from the host.
    pub fn env(&self, endpoint: &str) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = match self.kind {
            Kind::S3 => vec![
                ("AWS_ENDPOINT".into(), endpoint.into()),
                ("AWS_ALLOW_HTTP".into(), "true".into()),
                ("AWS_ACCESS_KEY_ID".into(), "mapsnap-test".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "mapsnap-test-secret".into()),
                ("AWS_REGION".into(), "us-east-1".into()),
            ],
            Kind::Azure => vec![
                ("AZURE_STORAGE_USE_EMULATOR".into(), "true".into()),
                (
                    "AZURE_STORAGE_ENDPOINT".into(),
                    format!("{endpoint}/{AZ_ACCOUNT}"),
                ),
            ],
            Kind::Gcs => vec![
                ("GOOGLE_BASE_URL".into(), endpoint.into()),
                ("GOOGLE_ALLOW_HTTP".into(), "true".into()),
                ("GOOGLE_BEARER_TOKEN".into(), GCS_TOKEN.into()),
            ],
        };
        v.push((
            "MAPSNAP_CONFIG".into(),
            empty_config().display().to_string(),
        ));
        v
    }

    /// The same settings as [`Self::env`], as a config for the library API.
    pub fn config(&self, endpoint: &str) -> StorageConfig {
        let mut cfg = StorageConfig::default();
        for (k, v) in self.env(endpoint) {
            let key = k.to_ascii_lowercase();
            match self.kind {
                Kind::S3 if k.starts_with("AWS_") => cfg.s3.push((key, v)),
                Kind::Azure if k.starts_with("AZURE_") => cfg.azure.push((key, v)),
                Kind::Gcs if k.starts_with("GOOGLE_") => cfg.gcs.push((key, v)),
                _ => {}
            }
        }
        cfg
    }

    /// Turns on moto's IAM checks: requests must be signed by the access key returned
    /// (created in moto's IAM with an s3:* policy); anything else is refused.
    pub fn enforce_auth(&self) -> (String, String) {
        assert_eq!(self.kind, Kind::S3, "only moto needs IAM switched on");
        let script = r#"
import json, sys, urllib.request
import boto3
ep = sys.argv[1]
kw = dict(endpoint_url=ep, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="mapsnap")
key = iam.create_access_key(UserName="mapsnap")["AccessKey"]
iam.put_user_policy(UserName="mapsnap", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
urllib.request.urlopen(urllib.request.Request(ep + "/moto-api/reset-auth", data=b"0", method="POST",
                                              headers={"Content-Type": "text/plain"}))
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
        let out = Command::new(python())
            .args(["-c", script, &self.endpoint()])
            .output()
            .expect("run the moto IAM setup");
        assert!(
            out.status.success(),
            "moto IAM setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut it = text.split_whitespace();
        let id = it.next().expect("key id").to_string();
        let secret = it.next().expect("secret").to_string();
        (id, secret)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every `<tag>...</tag>` text in `s`.
fn xml_all(s: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(after[..j].to_string());
        rest = &after[j + close.len()..];
    }
    out
}

/// Percent-encodes a key for a URL path segment or query value.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An empty config file, so a host's /etc/mapsnap/config.toml cannot change the tests.
/// One name for every test process (they all write the same empty file), so runs leave
/// one file behind, not one per process.
pub fn empty_config() -> PathBuf {
    let p = std::env::temp_dir().join("mapsnap-test-empty.toml");
    if !p.exists() {
        std::fs::write(&p, "").expect("write empty config");
    }
    p
}

/// One HTTP/1.1 request with `Connection: close`; returns the raw response.
pub fn http_raw(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    Ok(resp)
}

/// One HTTP request; returns (status, body), de-chunked.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let resp = http_raw(port, method, path, headers, body)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..eol])
                    .split(';')
                    .next()
                    .unwrap_or("0")
                    .trim(),
                16,
            )
            .unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    Ok((status, body))
}

/// Runs the mapsnap binary with extra environment.
pub fn mapsnap(args: &[&str], env: &[(String, String)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mapsnap"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run mapsnap")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The single `mapsnap: error: ...` line of a failed run (asserting there is exactly one).
pub fn error_line(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("mapsnap: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{stderr}");
    lines[0].to_string()
}

/// 64 pseudo-random bytes for entry `i` (splitmix64), incompressible.
pub fn value_of(seed: u64, i: u32, out: &mut [u8]) {
    let mut x = seed ^ (u64::from(i) << 20) ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in out.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

pub const VALUE_SIZE: usize = 64;

/// An array map of `n` entries with 64-byte pseudo-random values, filled with
/// `BPF_MAP_UPDATE_BATCH`, pinned at `pin`.
pub fn big_array(pin: &Path, name: &str, n: u32, seed: u64) -> Map {
    let m = Map::create(&CreateAttrs {
        map_type: mt::ARRAY,
        name,
        key_size: 4,
        value_size: VALUE_SIZE as u32,
        max_entries: n,
        ..Default::default()
    })
    .expect("create array map");
    let batch = 65_536u32;
    let mut keys = Vec::with_capacity(batch as usize * 4);
    let mut values = vec![0u8; batch as usize * VALUE_SIZE];
    let mut start = 0u32;
    while start < n {
        let count = batch.min(n - start);
        keys.clear();
        for (j, i) in (start..start + count).enumerate() {
            keys.extend_from_slice(&i.to_ne_bytes());
            value_of(seed, i, &mut values[j * VALUE_SIZE..(j + 1) * VALUE_SIZE]);
        }
        let done = m
            .update_batch(&keys, &values[..count as usize * VALUE_SIZE], count, 0)
            .map_err(|(_, e)| e)
            .expect("update_batch");
        assert_eq!(done, count);
        start += count;
    }
    m.pin(pin).expect("pin");
    m
}

/// Reads every entry of the array map at `pin` and compares it with [`value_of`].
pub fn assert_big_array(pin: &Path, n: u32, seed: u64) {
    let m = Map::from_pin(pin).expect("open restored map");
    let info = m.info().expect("info");
    assert_eq!(info.max_entries, n, "{}", pin.display());
    assert_eq!(info.value_size as usize, VALUE_SIZE);
    let mut expect = [0u8; VALUE_SIZE];
    let mut seen = 0u64;
    mapsnap::dump::read_entries(&m, 4, VALUE_SIZE, 65_536, &mut |count, keys, values| {
        for j in 0..count {
            let k = u32::from_ne_bytes([
                keys[j * 4],
                keys[j * 4 + 1],
                keys[j * 4 + 2],
                keys[j * 4 + 3],
            ]);
            value_of(seed, k, &mut expect);
            assert_eq!(
                &values[j * VALUE_SIZE..(j + 1) * VALUE_SIZE],
                &expect[..],
                "entry {k} of {} differs",
                pin.display()
            );
        }
        seen += count as u64;
        Ok(())
    })
    .expect("read restored map");
    assert_eq!(seen, u64::from(n), "entries read from {}", pin.display());
}

/// A small hash map `counters` (key i -> i * 10 + seed) pinned at `dir/counters`.
pub fn counters(dir: &Path, n: u32, seed: u64) -> Map {
    let m = Map::create(&CreateAttrs {
        map_type: mt::HASH,
        name: "counters",
        key_size: 4,
        value_size: 8,
        max_entries: 1024,
        ..Default::default()
    })
    .expect("create");
    for i in 0..n {
        m.update(
            Some(&i.to_ne_bytes()),
            &(u64::from(i) * 10 + seed).to_ne_bytes(),
            0,
        )
        .expect("update");
    }
    m.pin(&dir.join("counters")).expect("pin");
    m
}

/// Value of key `k` in the hash map at `pin`.
pub fn counter(pin: &Path, k: u32) -> Option<u64> {
    let m = Map::from_pin(pin).expect("open");
    let mut v = [0u8; 8];
    m.lookup(Some(&k.to_ne_bytes()), &mut v, 0)
        .expect("lookup")
        .then(|| u64::from_ne_bytes(v))
}

/// Which fault a [`Proxy`] injects, once, when its byte counter crosses a threshold.
pub enum Fault {
    /// Close every open connection when this many bytes went up (client to server).
    CutUp(u64),
    /// Close every open connection when this many bytes came down (server to client).
    CutDown(u64),
    /// When this many bytes went up: run the hook (e.g. kill the server), close every
    /// connection and stop listening (new connections are refused).
    StopUp(u64, Box<dyn FnOnce() + Send>),
}

struct ProxyShared {
    port: u16,
    upstream: u16,
    up: AtomicU64,
    down: AtomicU64,
    stopping: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    faults: Mutex<Vec<Fault>>,
    fired: AtomicU64,
    /// Request lines and `authorization` headers the clients sent (for what a server does not
    /// check itself).
    seen: Mutex<Vec<String>>,
}

/// A TCP proxy on 127.0.0.1 in front of a server, injecting [`Fault`]s.
pub struct Proxy {
    pub port: u16,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Self {
        let port = free_port();
        let shared = Arc::new(ProxyShared {
            port,
            upstream,
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            fired: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let mut p = Proxy {
            port,
            shared,
            accept: None,
        };
        p.listen();
        p
    }

    fn listen(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("proxy bind");
        self.shared.stopping.store(false, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        self.accept = Some(std::thread::spawn(move || {
            for conn in listener.incoming() {
                if shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", shared.upstream)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                for s in [&client, &server] {
                    if let Ok(c) = s.try_clone() {
                        shared.conns.lock().expect("lock").push(c);
                    }
                }
                pump(&shared, &client, &server, true);
                pump(&shared, &server, &client, false);
            }
        }));
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn add(&self, fault: Fault) {
        self.shared.faults.lock().expect("lock").push(fault);
    }

    /// Faults that fired so far.
    pub fn fired(&self) -> u64 {
        self.shared.fired.load(Ordering::SeqCst)
    }

    /// Request lines (`METHOD /path?query HTTP/1.1`) and `authorization:` header lines sent
    /// through the proxy so far.
    pub fn seen(&self) -> Vec<String> {
        self.shared.seen.lock().expect("lock").clone()
    }

    pub fn bytes_up(&self) -> u64 {
        self.shared.up.load(Ordering::SeqCst)
    }

    /// Stops listening (after [`Fault::StopUp`] fired, this is a no-op) and listens again
    /// on the same port.
    pub fn restart(&mut self) {
        stop_listening(&self.shared, self.port);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        self.listen();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        stop_listening(&self.shared, self.port);
        close_all(&self.shared);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn stop_listening(shared: &ProxyShared, port: u16) {
    if !shared.stopping.swap(true, Ordering::SeqCst) {
        // Wake the accept loop so it sees the flag and drops the listener.
        let _ = TcpStream::connect(("127.0.0.1", port));
    }
}

fn close_all(shared: &ProxyShared) {
    for c in shared.conns.lock().expect("lock").drain(..) {
        let _ = c.shutdown(Shutdown::Both);
    }
}

fn pump(shared: &Arc<ProxyShared>, from: &TcpStream, to: &TcpStream, up: bool) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let shared = Arc::clone(shared);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if up {
                record_heads(&shared, &buf[..n]);
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            let counter = if up { &shared.up } else { &shared.down };
            let total = counter.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            check_faults(&shared, up, total);
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// Records request lines and authorization headers found at the start of a chunk (clients
/// write a request's head in one piece, before its body).
fn record_heads(shared: &ProxyShared, chunk: &[u8]) {
    let head = &chunk[..chunk.len().min(16 << 10)];
    let text = String::from_utf8_lossy(head);
    let Some(first) = text.split("\r\n").next() else {
        return;
    };
    let is_request = ["GET /", "PUT /", "POST /", "DELETE /", "HEAD /", "PATCH /"]
        .iter()
        .any(|m| first.starts_with(m));
    if !is_request {
        return;
    }
    let mut seen = shared.seen.lock().expect("lock");
    for line in text.split("\r\n") {
        if line.is_empty() {
            break;
        }
        if line == first || line.to_ascii_lowercase().starts_with("authorization:") {
            seen.push(line.to_string());
        }
    }
}

fn check_faults(shared: &Arc<ProxyShared>, up: bool, total: u64) {
    let mut due = Vec::new();
    {
        let mut faults = shared.faults.lock().expect("lock");
        let mut i = 0;
        while i < faults.len() {
            let fire = match &faults[i] {
                Fault::CutUp(at) | Fault::StopUp(at, _) => up && total >= *at,
                Fault::CutDown(at) => !up && total >= *at,
            };
            if fire {
                due.push(faults.remove(i));
            } else {
                i += 1;
            }
        }
    }
    for f in due {
        shared.fired.fetch_add(1, Ordering::SeqCst);
        match f {
            Fault::CutUp(_) | Fault::CutDown(_) => close_all(shared),
            Fault::StopUp(_, hook) => {
                hook();
                stop_listening(shared, shared.port);
                close_all(shared);
            }
        }
    }
}
