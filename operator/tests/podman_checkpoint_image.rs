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
