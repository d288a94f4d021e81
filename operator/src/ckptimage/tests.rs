use super::*;

#[test]
fn push_references_split_into_repository_and_tag() {
    assert_eq!(
        split_tag("127.0.0.1:5000/ckpt/web:v1").expect("ok"),
        ("127.0.0.1:5000/ckpt/web".into(), "v1".into())
    );
    assert_eq!(
        split_tag("127.0.0.1:5000/ckpt/web").expect("ok"),
        ("127.0.0.1:5000/ckpt/web".into(), "latest".into())
    );
    assert!(split_tag("reg.example/a@sha256:00").is_err());
}

#[test]
fn repositories_need_a_registry_host() {
    assert!(parse_reference("127.0.0.1:5000/ckpt/web", ":t").is_ok());
    assert!(parse_reference("localhost/web", ":t").is_ok());
    for bad in ["web", "library/web", "reg.example/web:tag", "reg.example/"] {
        let e = parse_reference(bad, ":t").expect_err(bad);
        assert!(
            e.to_string().contains("host[:port]/path") || e.to_string().contains("no tag"),
            "{e}"
        );
    }
}

#[test]
fn annotations_carry_every_engines_marker_and_the_dump_fields() {
    let dump = serde_json::json!({
        "name": "web", "rootfsImageName": "localhost/busybox:ck",
        "rootfsImageID": "abc123", "RawImageName": "busybox:ck", "runtime": "runc"
    });
    let a = checkpoint_annotations("web", &dump);
    assert_eq!(a[annotations::CRIO_NAME], "web");
    assert_eq!(a[annotations::CRIU_NAME], "web");
    assert_eq!(a[annotations::PODMAN_NAME], "web");
    assert_eq!(
        a[annotations::PODMAN_ROOTFS_IMAGE_NAME],
        "localhost/busybox:ck"
    );
    assert_eq!(a[annotations::CRIO_ROOTFS_IMAGE_ID], "abc123");
    assert_eq!(a[annotations::PODMAN_RAW_IMAGE_NAME], "busybox:ck");
    assert_eq!(a[annotations::PODMAN_RUNTIME_NAME], "runc");
    // CRI-O's config.dump names the image ref and runtime differently.
    let crio = serde_json::json!({"rootfsImageRef": "sha256:ff", "ociRuntime": "crun"});
    let a = checkpoint_annotations("c", &crio);
    assert_eq!(a[annotations::CRIU_ROOTFS_IMAGE_ID], "sha256:ff");
    assert_eq!(a[annotations::CRIU_RUNTIME_NAME], "crun");
    assert!(!a.contains_key(annotations::CRIO_ROOTFS_IMAGE_NAME));
}

fn archive_bytes(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        b.append_data(&mut h, name, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

fn scan_bytes(bytes: &[u8]) -> (Result<layer::Scan, ImageError>, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("a");
    std::fs::write(&p, bytes).expect("write");
    let (tx, mut rx) = tokio::sync::mpsc::channel(1 << 16);
    let r = layer::scan(std::fs::File::open(&p).expect("open"), "test.tar", tx);
    let mut sent = Vec::new();
    while let Ok(item) = rx.try_recv() {
        match item {
            Ok(b) => sent.extend_from_slice(&b),
            Err(_) => break,
        }
    }
    (r, sent)
}

fn checkpoint_files(big: &[u8]) -> Vec<(&'static str, &[u8])> {
    vec![
        (
            "config.dump",
            br#"{"name":"web","rootfsImageName":"img"}"#.as_slice(),
        ),
        ("spec.dump", b"{}".as_slice()),
        ("checkpoint/pages-1.img", big),
    ]
}

#[test]
fn the_scan_hashes_sends_and_reads_every_format() {
    // Bigger than one read block, so the pass spans several sends.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let plain = archive_bytes(&checkpoint_files(&big));
    let diff = sha256(&plain);
    let gz = {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&plain).expect("gz");
        e.finish().expect("gz")
    };
    let zst = zstd::encode_all(plain.as_slice(), 1).expect("zstd");
    for (bytes, compression) in [
        (&plain, Compression::None),
        (&gz, Compression::Gzip),
        (&zst, Compression::Zstd),
    ] {
        let (r, sent) = scan_bytes(bytes);
        let s = r.expect("scan");
        assert_eq!(s.compression, compression);
        assert_eq!(&sent, bytes, "the uploader got the file's bytes, in order");
        assert_eq!(s.digest, sha256(bytes));
        assert_eq!(s.diff_id, diff, "diff ID is the uncompressed tar's digest");
        assert_eq!(s.size, bytes.len() as u64);
        assert_eq!(s.entries, 3);
        assert_eq!(s.config_dump["rootfsImageName"], "img");
    }
}

#[test]
fn the_scan_refuses_what_is_not_a_checkpoint_and_aborts_the_upload() {
    let (r, _) = scan_bytes(&archive_bytes(&[
        ("config.dump", b"{}"),
        ("etc/passwd", b"x"),
    ]));
    let e = r.expect_err("no spec.dump");
    assert!(e.to_string().contains("spec.dump, checkpoint/"), "{e}");

    let mut escaping = archive_bytes(&checkpoint_files(b"x"));
    // Rewrite the first entry's name in place to one leaving the layer.
    escaping[..11].copy_from_slice(b"../etc/x.dd");
    let mut h = tar::Header::from_byte_slice(&escaping[..512]).clone();
    h.set_cksum();
    escaping[..512].copy_from_slice(h.as_bytes());
    let (r, _) = scan_bytes(&escaping);
    assert!(r.expect_err("..").to_string().contains("leaves the layer"));

    let huge = vec![b' '; MAX_METADATA_FILE as usize + 1];
    let (r, _) = scan_bytes(&archive_bytes(&[("config.dump", &huge)]));
    assert!(r.expect_err("big").to_string().contains("more than"));

    let (r, _) = scan_bytes(b"definitely not a tar archive, only text");
    assert!(r.is_err());
}
