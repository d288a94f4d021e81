//! Checkpoint OCI images against real components: the CNCF distribution registry
//! (`docker-registry`) on 127.0.0.1, skopeo to look at what was pushed, and Podman 4 + runc +
//! CRIU 4.1 checkpointing a container that holds BPF maps on one storage root ("node A") and
//! restoring it from the pushed image on another ("node B").
//!
//! Needs root and what `make deps` installs (scripts/install-criu.sh, install-podman.sh,
//! install-registry.sh).

mod podman;

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mapsnap_operator::ckptimage::{self, Registry, RegistryAuth, annotations};
use podman::*;
use serde_json::json;

/// A small but real-shaped checkpoint archive: the files CRI-O and Podman write.
fn synthetic_archive(path: &Path, zstd_level: Option<i32>) -> String {
    let mut b = tar::Builder::new(Vec::new());
    let pages: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let config = json!({
        "id": "0123abcd", "name": "web", "rootfsImageName": "localhost/busybox:mapsnap",
        "rootfsImageID": "feedbeef", "rawImageName": "busybox:mapsnap", "runtime": "runc"
    })
    .to_string();
    for (name, data) in [
        ("config.dump", config.as_bytes()),
        ("spec.dump", br#"{"ociVersion":"1.0.2"}"#.as_slice()),
        ("checkpoint/inventory.img", b"inventory".as_slice()),
        ("checkpoint/pages-1.img", pages.as_slice()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        b.append_data(&mut h, name, data).expect("append");
    }
    let tar = b.into_inner().expect("tar");
    let diff_id = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&tar))
    );
    let bytes = match zstd_level {
        Some(l) => zstd::encode_all(tar.as_slice(), l).expect("zstd"),
        None => tar,
    };
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(&bytes))
        .expect("write archive");
    diff_id
}

#[test]
fn checkpoint_image_round_trips_through_a_real_registry() {
    require_root();
    let reg = RegistryServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("checkpoint.tar.zst");
    let diff_id = synthetic_archive(&archive, Some(3));
    let repo = format!("{}/mapsnap/ckpt", reg.addr);

    let reference = checkpoint_image_cli(&archive, "web", &format!("{repo}:web-1"));
    let (printed_repo, digest) = reference.split_once('@').expect("by digest");
    assert_eq!(printed_repo, repo);

    // The manifest, as the registry serves it.
    let manifest = skopeo_inspect(&reference, &["--raw"]);
    eprintln!("manifest: {manifest:#}");
    assert_eq!(manifest["mediaType"], ckptimage::MANIFEST_MEDIA_TYPE);
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    assert_eq!(
        layers[0]["digest"],
        sha256_file(&archive),
        "the layer is the archive's bytes"
    );
    assert_eq!(
        layers[0]["size"],
        std::fs::metadata(&archive).expect("len").len()
    );
    let ann = &manifest["annotations"];
    for key in [
        annotations::CRIO_NAME,
        annotations::CRIU_NAME,
        annotations::PODMAN_NAME,
    ] {
        assert_eq!(ann[key], "web", "{key}");
    }
    assert_eq!(
        ann[annotations::PODMAN_ROOTFS_IMAGE_NAME],
        "localhost/busybox:mapsnap"
    );
    assert_eq!(ann[annotations::PODMAN_ROOTFS_IMAGE_ID], "feedbeef");
    assert_eq!(ann[annotations::PODMAN_RUNTIME_NAME], "runc");

    // The config: the uncompressed tar's digest as the one diff ID.
    let config = skopeo_inspect(&reference, &["--config"]);
    assert_eq!(config["rootfs"]["diff_ids"], json!([diff_id]));
    assert_eq!(config["os"], "linux");

    // The tag names the same image; skopeo's summary agrees on one layer.
    let by_tag = skopeo_inspect(&format!("{repo}:web-1"), &[]);
    assert_eq!(by_tag["Digest"], digest);
    assert_eq!(by_tag["Layers"].as_array().map(Vec::len), Some(1));

    // The layer pulled back is the archive, byte for byte.
    let pulled = dir.path().join("pulled");
    ok(Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("dir:{}", pulled.display())));
    let blob = pulled.join(
        sha256_file(&archive)
            .strip_prefix("sha256:")
            .expect("sha256"),
    );
    assert_eq!(
        std::fs::read(&blob).expect("pulled layer"),
        std::fs::read(&archive).expect("archive")
    );

    // An uncompressed archive is a plain tar layer whose digest is its diff ID.
    let plain = dir.path().join("checkpoint.tar");
    let plain_diff = synthetic_archive(&plain, None);
    let r2 = checkpoint_image_cli(&plain, "web", &format!("{repo}:web-plain"));
    let m2 = skopeo_inspect(&r2, &["--raw"]);
    assert_eq!(
        m2["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(m2["layers"][0]["digest"], plain_diff);

    // Not a checkpoint archive: refused, nothing tagged.
    let junk = dir.path().join("junk.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&junk).expect("junk"));
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_cksum();
        b.append_data(&mut h, "etc/motd", b"hi\n".as_slice())
            .expect("append");
        b.finish().expect("finish");
    }
    let out = run(Command::new(OPERATOR)
        .arg("checkpoint-image")
        .arg("--archive")
        .arg(&junk)
        .args([
            "--container",
            "web",
            "--push",
            &format!("{repo}:junk"),
            "--insecure-http",
        ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a container checkpoint archive"),
        "{err}"
    );
    let out = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{repo}:junk")));
    assert!(
        !out.status.success(),
        "no manifest was pushed for a refused archive"
    );

    // Delete by digest; a second delete is not an error (already gone).
    let registry = Registry {
        repository: repo.clone(),
        auth: RegistryAuth::Anonymous,
        insecure_http: true,
        ca_file: None,
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(ckptimage::delete(&reference, &registry))
        .expect("delete");
    let out = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{reference}")));
    assert!(!out.status.success(), "the manifest is gone");
    rt.block_on(ckptimage::delete(&reference, &registry))
        .expect("delete again");

    // Nothing listens: the error names the registry and what to check.
    let gone = Registry {
        repository: format!("127.0.0.1:{}/mapsnap/ckpt", free_port()),
        ..registry
    };
    let e = rt
        .block_on(ckptimage::build_and_push(
            std::fs::File::open(&archive).expect("open"),
            "web",
            "t",
            &gone,
        ))
        .expect_err("no registry there");
    let msg = e.to_string();
    assert!(
        msg.contains(&gone.repository) && msg.contains("reachable"),
        "{msg}"
    );
}

#[test]
fn checkpoint_image_with_a_password_and_a_private_ca() {
    require_root();
    let reg = RegistryServer::start_with(&Security {
        tls: true,
        user: Some(("pusher".into(), "s3cret pass".into())),
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("checkpoint.tar.zst");
    synthetic_archive(&archive, Some(1));
    let repo = format!("{}/mapsnap/auth", reg.addr);
    let ca = reg.ca_file();
    let pw = dir.path().join("password");
    std::fs::write(&pw, "s3cret pass\n").expect("password file");
    let push = |extra: &[&std::ffi::OsStr], tag: &str| {
        run(Command::new(OPERATOR)
            .arg("checkpoint-image")
            .arg("--archive")
            .arg(&archive)
            .args(["--container", "web", "--push", &format!("{repo}:{tag}")])
            .args(extra))
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // User and password file, the registry's certificate as CA.
    let out = push(
        &[
            "--username".as_ref(),
            "pusher".as_ref(),
            "--password-file".as_ref(),
            pw.as_os_str(),
            "--ca-file".as_ref(),
            ca.as_os_str(),
        ],
        "pw",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let reference = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let manifest = skopeo_inspect(&reference, &["--creds", "pusher:s3cret pass", "--raw"]);
    assert_eq!(manifest["annotations"][annotations::CRIO_NAME], "web");

    // The same credentials from a docker config JSON (a dockerconfigjson Secret's value).
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("pusher:s3cret pass");
    let authfile = dir.path().join("config.json");
    std::fs::write(
        &authfile,
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr),
    )
    .expect("authfile");
    let out = push(
        &[
            "--authfile".as_ref(),
            authfile.as_os_str(),
            "--ca-file".as_ref(),
            ca.as_os_str(),
        ],
        "authfile",
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // A wrong password: refused, and the message says to check the credentials.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "nope").expect("bad password");
    let out = push(
        &[
            "--username".as_ref(),
            "pusher".as_ref(),
            "--password-file".as_ref(),
            bad.as_os_str(),
            "--ca-file".as_ref(),
            ca.as_os_str(),
        ],
        "bad",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&reg.addr) && stderr(&out).contains("credentials"),
        "{}",
        stderr(&out)
    );

    // Without the CA the certificate is not trusted: refused, naming --ca-file.
    let out = push(
        &[
            "--username".as_ref(),
            "pusher".as_ref(),
            "--password-file".as_ref(),
            pw.as_os_str(),
        ],
        "noca",
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--ca-file"), "{}", stderr(&out));

    // Delete with the same credentials.
    let registry = Registry {
        repository: repo.clone(),
        auth: RegistryAuth::Basic {
            username: "pusher".into(),
            password: "s3cret pass".into(),
        },
        insecure_http: false,
        ca_file: Some(ca.clone()),
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(ckptimage::delete(&reference, &registry))
        .expect("delete");
    let out = run(Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            "pusher:s3cret pass",
            "--raw",
        ])
        .arg(format!("docker://{reference}")));
    assert!(!out.status.success(), "the manifest is gone");
}

/// `len` bytes that do not compress (xorshift), produced as they are read.
struct Noise {
    left: u64,
    state: u64,
}

impl std::io::Read for Noise {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = out.len().min(self.left as usize) & !7;
        for chunk in out[..n].chunks_exact_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.copy_from_slice(&self.state.to_le_bytes());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A plain-tar checkpoint archive whose CRIU pages file holds `len` bytes, written streaming.
fn big_archive(path: &Path, len: u64) {
    let mut b = tar::Builder::new(std::io::BufWriter::new(
        std::fs::File::create(path).expect("archive"),
    ));
    let mut add = |name: &str, size: u64, data: &mut dyn std::io::Read| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o600);
        h.set_cksum();
        b.append_data(&mut h, name, data).expect("append");
    };
    add(
        "config.dump",
        15,
        &mut br#"{"name":"big"}
"#
        .as_slice(),
    );
    add("spec.dump", 2, &mut b"{}".as_slice());
    add(
        "checkpoint/pages-1.img",
        len,
        &mut Noise {
            left: len,
            state: 0x9e37_79b9_7f4a_7c15,
        },
    );
    b.into_inner()
        .expect("tar")
        .into_inner()
        .map_err(|e| e.into_error())
        .expect("flush");
}

/// Peak RSS (KiB) of one `checkpoint-image` push, measured by GNU time.
fn push_peak_rss(archive: &Path, push: &str) -> u64 {
    let out = run(Command::new("/usr/bin/time")
        .args(["-f", "peak-rss-kib=%M"])
        .arg(OPERATOR)
        .arg("checkpoint-image")
        .arg("--archive")
        .arg(archive)
        .args(["--container", "big", "--push", push, "--insecure-http"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("peak-rss-kib="))
        .and_then(|v| v.trim().parse().ok())
        .expect("GNU time's peak RSS (install the `time` package: make deps)")
}

#[test]
fn checkpoint_image_memory_does_not_grow_with_the_archive() {
    require_root();
    let reg = RegistryServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (small, big) = (dir.path().join("small.tar"), dir.path().join("big.tar"));
    big_archive(&small, 8 << 20);
    big_archive(&big, 128 << 20);
    let repo = format!("{}/mapsnap/big", reg.addr);
    let small_rss = push_peak_rss(&small, &format!("{repo}:small"));
    let big_rss = push_peak_rss(&big, &format!("{repo}:big"));
    eprintln!("peak RSS: 8 MiB archive {small_rss} KiB, 128 MiB archive {big_rss} KiB");
    // Both hold the same buffers; 120 MiB more archive may not cost even 16 MiB more memory.
    assert!(
        big_rss < small_rss + 16 * 1024,
        "peak RSS grew with the archive: {small_rss} KiB -> {big_rss} KiB"
    );
    let m = skopeo_inspect(&format!("{repo}:big"), &["--raw"]);
    assert_eq!(m["layers"][0]["digest"], sha256_file(&big));
}

// ---- Podman end to end ----------------------------------------------------------------------

type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Two maps pinned in the container's bpffs directory (the host side of its bind mount):
/// a hash of counters and an array of 16-byte records. Returns their contents by name.
fn make_pins(dir: &Path) -> Vec<(String, Entries)> {
    use mapsnap::model::map_type;
    use mapsnap::sys::{CreateAttrs, Map};
    let specs: [(&str, u32, u32, u32, u32, Entries); 2] = [
        (
            "counters",
            map_type::HASH,
            4,
            8,
            256,
            (0..200u32)
                .map(|i| {
                    let v = u64::from(i) * u64::from(i) + 0x5eed;
                    (i.to_le_bytes().to_vec(), v.to_le_bytes().to_vec())
                })
                .collect(),
        ),
        (
            "records",
            map_type::ARRAY,
            4,
            16,
            16,
            (0..16u32)
                .map(|i| {
                    let v: Vec<u8> = (0..16u8).map(|b| b ^ (i as u8).wrapping_mul(37)).collect();
                    (i.to_le_bytes().to_vec(), v)
                })
                .collect(),
        ),
    ];
    let mut out = Vec::new();
    for (name, map_type, key, value, max, entries) in specs {
        let map = Map::create(&CreateAttrs {
            map_type,
            name,
            key_size: key,
            value_size: value,
            max_entries: max,
            ..CreateAttrs::default()
        })
        .expect("create map");
        for (k, v) in &entries {
            map.update(Some(k), v, 0).expect("update");
        }
        map.pin(&dir.join(name)).expect("pin");
        out.push((name.to_string(), entries));
    }
    out
}

/// A pinned map's entries, sorted by key.
fn read_pin(path: &Path) -> Entries {
    let map = mapsnap::sys::Map::from_pin(path)
        .unwrap_or_else(|e| panic!("{} is not a pinned map: {e}", path.display()));
    let info = map.info().expect("info");
    let (ks, vs) = (info.key_size as usize, info.value_size as usize);
    let mut out = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    let mut next = vec![0u8; ks];
    while map.next_key(key.as_deref(), &mut next).expect("next_key") {
        let mut v = vec![0u8; vs];
        assert!(map.lookup(Some(&next), &mut v, 0).expect("lookup"));
        out.push((next.clone(), v));
        key = Some(next.clone());
    }
    out.sort();
    out
}

/// The entry names of a `podman container checkpoint --export` archive (zstd tar) and its
/// config.dump.
fn archive_listing(path: &Path) -> (Vec<String>, serde_json::Value) {
    let f = std::fs::File::open(path).expect("archive");
    let dec = zstd::stream::read::Decoder::new(f).expect("zstd archive");
    let mut ar = tar::Archive::new(dec);
    let mut names = Vec::new();
    let mut config = serde_json::Value::Null;
    for e in ar.entries().expect("tar") {
        let mut e = e.expect("entry");
        let name = e.path().expect("path").to_string_lossy().into_owned();
        if name == "config.dump" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).expect("config.dump");
            config = serde_json::from_str(&s).expect("config.dump JSON");
        }
        names.push(name);
    }
    (names, config)
}

#[test]
fn podman_restores_bpf_maps_from_a_pushed_checkpoint_image() {
    require_root();
    for tool in ["podman", "skopeo", "criu"] {
        assert!(
            which(tool).is_some(),
            "{tool} not on PATH: run `bash scripts/install-podman.sh` (make deps does)"
        );
    }
    let art = artifacts();
    eprintln!(
        "using {}, {} and {}",
        art.hook.display(),
        art.testee.display(),
        art.plugin.display()
    );
    let reg = RegistryServer::start();
    let work = tempfile::Builder::new()
        .prefix("mapsnap-podman.")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let w = work.path();
    let tag = format!("{}", std::process::id());

    // The node's hook setup, as `mapsnap-hook install --runtime podman` writes it, under a
    // private root instead of / (so the machine's own hooks and CRIU config stay untouched).
    let host = w.join("host");
    let config = w.join("hook.toml");
    let hook_log = w.join("hook.log");
    std::fs::write(
        &config,
        format!(
            "[hook]\nlog_file = \"{}\"\ndeadline = \"25s\"\nstate_dir = \"{}\"\n\
             request_dir = \"{}\"\nruntime_roots = [\"/run/runc\"]\n",
            hook_log.display(),
            w.join("hook-state").display(),
            w.join("requests").display()
        ),
    )
    .expect("hook config");
    ok(Command::new(&art.hook)
        .arg("--config")
        .arg(&config)
        .args(["install", "--runtime", "podman", "--root"])
        .arg(&host)
        .arg("--hook-path")
        .arg(&art.hook)
        .arg("--criu-libdir")
        .arg(host.join("usr/lib/criu"))
        .arg("--criu-plugin")
        .arg(&art.plugin));
    let hooks_dir = host.join("usr/share/containers/oci/hooks.d");
    for stage in ["createruntime", "poststart", "poststop"] {
        assert!(
            hooks_dir
                .join(format!("mapsnap-hook-{stage}.json"))
                .exists()
        );
    }
    // runc hands CRIU the file the container's org.criu.config annotation names: install's
    // runc.conf, with the action script's path under the private root.
    let wrapper = "/usr/local/libexec/mapsnap-hook/criu-action";
    let installed = std::fs::read_to_string(host.join("etc/criu/runc.conf")).expect("runc.conf");
    assert!(
        installed.contains(&format!("action-script {wrapper}")),
        "{installed}"
    );
    let criu_conf = w.join("criu.conf");
    std::fs::write(
        &criu_conf,
        installed.replace(wrapper, &host.join(&wrapper[1..]).display().to_string()),
    )
    .expect("criu.conf");
    eprintln!(
        "CRIU config:\n{}",
        std::fs::read_to_string(&criu_conf).unwrap_or_default()
    );

    // Pinned maps in the container's bpffs directory.
    let bpf = BpffsDir::new(&format!("mapsnap-podman-{tag}"));
    let pins = make_pins(&bpf.0);

    // Two nodes; the base image on A, copied to B with save/load (same image ID).
    let a = Node::new(w, "node-a", &hooks_dir);
    let b = Node::new(w, "node-b", &hooks_dir);
    let rootfs = w.join("rootfs");
    testee_rootfs(&rootfs, &art.testee);
    let image = format!("localhost/mapsnap-testee:{tag}");
    a.import_rootfs(&rootfs, &image);
    let base = w.join("base.tar");
    ok(a.podman().args(["save", "-o"]).arg(&base).arg(&image));
    ok(b.podman().arg("load").arg("-i").arg(&base));

    // The container: maps held by fd (every type the plugin carries) and the pins.
    let state = w.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let name = format!("mapsnap-e2e-{tag}");
    ok(a.podman()
        .args(["run", "-d", "--name", &name, "--network", "none"])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args([
            "--cap-add",
            "sys_admin",
            "--cap-add",
            "bpf",
            "--cap-add",
            "perfmon",
        ])
        .arg("--annotation")
        .arg(format!("org.criu.config={}", criu_conf.display()))
        .args(["--annotation", "mapsnap.io/policy=strict"])
        .arg("-v")
        .arg(format!("{}:/state", state.display()))
        .arg("-v")
        .arg(format!("{}:/sys/fs/bpf", bpf.0.display()))
        .args([&image, "/testee", "run", "--dir", "/state"]));
    wait_for_file(&state.join("ready"), Duration::from_secs(60), &state);

    // Checkpoint on A.
    let archive = w.join("checkpoint.tar.zst");
    let out = run(a
        .podman()
        .args(["container", "checkpoint", "--export"])
        .arg(&archive)
        .arg(&name));
    assert!(
        out.status.success(),
        "podman checkpoint failed\n--- hook log ---\n{}",
        std::fs::read_to_string(&hook_log).unwrap_or_default()
    );
    let (names, config_dump) = archive_listing(&archive);
    let plugin_files = names
        .iter()
        .filter(|n| n.starts_with("checkpoint/mapsnap-map-"))
        .count();
    assert_eq!(
        plugin_files, 14,
        "the CRIU plugin saved one file per map held by fd"
    );
    for f in [
        "checkpoint/mapsnap-hook.json",
        "checkpoint/mapsnap-pins.mapsnap",
    ] {
        assert!(
            names.iter().any(|n| n == f),
            "{f} missing from the archive: {names:?}"
        );
    }

    // Node B's bpffs directory starts empty.
    bpf.clear();
    assert_eq!(std::fs::read_dir(&bpf.0).expect("bpffs dir").count(), 0);

    // The checkpoint image.
    let reference =
        checkpoint_image_cli(&archive, &name, &format!("{}/mapsnap/e2e:{tag}", reg.addr));
    let manifest = skopeo_inspect(&reference, &["--raw"]);
    assert_eq!(manifest["layers"].as_array().map(Vec::len), Some(1));
    assert_eq!(manifest["layers"][0]["digest"], sha256_file(&archive));
    for key in [
        annotations::CRIO_NAME,
        annotations::CRIU_NAME,
        annotations::PODMAN_NAME,
    ] {
        assert_eq!(manifest["annotations"][key], name.as_str(), "{key}");
    }
    assert_eq!(
        manifest["annotations"][annotations::PODMAN_RUNTIME_NAME],
        "runc"
    );

    // One machine, two nodes: conmon's pidfile is named under A's run root in config.dump.
    if let Some(p) = config_dump["conmonPidFile"].as_str().map(Path::new) {
        std::fs::create_dir_all(p.parent().expect("parent")).expect("conmon pidfile dir");
    }

    // Pull and restore on B.
    ok(b.podman().args(["pull", "--tls-verify=false", &reference]));
    let inspect = ok(b.podman().args(["image", "inspect", &reference]));
    assert!(inspect.contains(annotations::PODMAN_NAME), "{inspect}");
    let out = run(b.podman().args(["container", "restore", &reference]));
    assert!(
        out.status.success(),
        "podman container restore {reference} failed\n--- hook log ---\n{}",
        std::fs::read_to_string(&hook_log).unwrap_or_default()
    );
    let status = b.inspect(&name).map(|v| v["State"]["Status"].clone());
    assert_eq!(status, Some(json!("running")), "restored on node B");

    // The pins, put back by the createRuntime hook before the tasks resumed.
    for (pin, entries) in &pins {
        let got = read_pin(&bpf.0.join(pin));
        assert_eq!(got.len(), entries.len(), "{pin}: entry count");
        for ((k, v), (gk, gv)) in entries.iter().zip(&got) {
            assert_eq!((k, v), (gk, gv), "{pin}: entry {k:?}");
        }
        eprintln!("pin {pin}: {} entries, all equal", got.len());
    }
    let log = std::fs::read_to_string(&hook_log).unwrap_or_default();
    assert!(log.contains("restored 2 pinned maps"), "hook log:\n{log}");

    // The maps held by fd: the restored testee compares each with what it held before.
    std::fs::write(state.join("go"), "").expect("go");
    wait_for_file(&state.join("result.json"), Duration::from_secs(60), &state);
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("result.json")).expect("result"))
            .expect("result JSON");
    eprintln!(
        "---- testee after restore ----\n{}",
        std::fs::read_to_string(state.join("after.txt")).unwrap_or_default()
    );
    eprintln!(
        "testee: {} checks passed, failed: {}",
        result["passed"], result["failed"]
    );
    assert_eq!(result["ok"], json!(true), "{:#}", result["failed"]);
    drop(a);
    drop(b);
}
