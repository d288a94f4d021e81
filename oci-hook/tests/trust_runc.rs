//! mapsnap-hook with the node's trust settings (the key files the chart mounts from
//! Secrets), on real runc containers and a real CRIU checkpoint: what the hook writes at stop
//! and at post-dump is signed (and encrypted to the node's recipients), checks out with the
//! real `minisign -V` and `age -d`, and restores; a tampered, unsigned or foreign-signed
//! snapshot is refused before any pin is created or changed; an encrypted one restores only
//! with the identity.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use mapsnap::sys::Map;
use mapsnap_hook::manifest::{CheckpointManifest, IMAGE_SNAPSHOT};
use mapsnap_hook::seal::AGE_MAGIC;

/// Key files as an administrator makes them with the real tools.
struct Keys {
    /// Directory of trusted minisign public keys: the old and the new key (rotation).
    trusted: PathBuf,
    /// The new key's secret: what the node signs with.
    signing: PathBuf,
    signing_pub: PathBuf,
    /// A key pair outside the trust set.
    stranger: PathBuf,
    identity: PathBuf,
    other_identity: PathBuf,
    recipients: PathBuf,
}

fn minisign_keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (public, secret) = (
        dir.join(format!("{name}.pub")),
        dir.join(format!("{name}.key")),
    );
    ok(Command::new("minisign")
        .args(["-G", "-W", "-f", "-p"])
        .arg(&public)
        .arg("-s")
        .arg(&secret));
    (public, secret)
}

fn age_identity(path: &Path) -> String {
    ok(Command::new("age-keygen").arg("-o").arg(path));
    let out = ok(Command::new("age-keygen").arg("-y").arg(path));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn keys(b: &Bench) -> Keys {
    let root = b.dir.path().join("keys");
    let trusted = root.join("trusted");
    fs::create_dir_all(&trusted).expect("mkdir");
    let (old_pub, _) = minisign_keypair(&root, "old");
    fs::copy(&old_pub, trusted.join("old.pub")).expect("copy");
    let (signing_pub, signing) = minisign_keypair(&root, "new");
    fs::copy(&signing_pub, trusted.join("new.pub")).expect("copy");
    let (_, stranger) = minisign_keypair(&root, "stranger");
    let identity = root.join("node.agekey");
    let recipient = age_identity(&identity);
    let other_identity = root.join("other.agekey");
    age_identity(&other_identity);
    let recipients = root.join("recipients.txt");
    fs::write(
        &recipients,
        format!("# the nodes that restore\n{recipient}"),
    )
    .expect("write");
    Keys {
        trusted,
        signing,
        signing_pub,
        stranger,
        identity,
        other_identity,
        recipients,
    }
}

/// The `[hook]` keys; `encrypt`: recipients too; `identity`: the identity file, if any.
fn trust_config(k: &Keys, encrypt: bool, identity: Option<&Path>) -> String {
    let mut t = format!(
        "trust_keys = [\"{}\"]\nsigning_key = \"{}\"\n",
        k.trusted.display(),
        k.signing.display()
    );
    if encrypt {
        t.push_str(&format!("recipients = [\"{}\"]\n", k.recipients.display()));
    }
    if let Some(i) = identity {
        t.push_str(&format!("identities = [\"{}\"]\n", i.display()));
    }
    t
}

/// The key id minisign prints for a public key file.
fn key_id(public: &Path) -> String {
    mapsnap::trust::PublicKey::from_file(public)
        .expect("public key")
        .key_id()
        .to_string()
}

/// Runs an app with a poststop snapshot to /data/app.mapsnap, 3 pings, stop.
fn counted_then_stopped(b: &Bench) -> [u64; 3] {
    let bundle = b.bundle(
        "first",
        &[
            ("mapsnap.io/snapshot-on-stop", "true"),
            ("mapsnap.io/snapshot-to", "/data/app.mapsnap"),
        ],
    );
    let id = format!("{}-first", b.tag);
    b.start_ok(&bundle, &id);
    b.ping(3);
    let before = b.counters();
    assert_eq!(before[2], 3, "{before:?}");
    b.stop(&id);
    assert!(b.data.join("app.mapsnap").exists(), "{}", b.log_text());
    before
}

/// A start whose createRuntime restore must be refused with `want`, touching no pin.
fn refused(b: &Bench, name: &str, annotations: &[(&str, &str)], want: &str) {
    let bundle = b.bundle(name, annotations);
    let id = format!("{}-{name}", b.tag);
    let out = b.start(&bundle, &id);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{name}: the start must fail");
    assert!(
        stderr.contains(want),
        "{name}: runc must show the hook's message containing {want:?}:\n{stderr}"
    );
    let _ = run(b.runc().args(["delete", "-f", &id]));
}

/// (map id, contents) of every pin: what "untouched" means.
fn pin_state(b: &Bench) -> Vec<(String, u32, [u64; 3])> {
    b.pins()
        .into_iter()
        .map(|p| {
            let id = Map::from_pin(&b.bpf_dir.join(&p))
                .expect("open pin")
                .info()
                .expect("info")
                .id;
            (p, id, b.counters())
        })
        .collect()
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = fs::read(path).expect("read");
    bytes[at] ^= 0x20;
    fs::write(path, bytes).expect("write");
}

#[test]
fn signed_stop_snapshot_restores_and_forgeries_change_no_pin() {
    let b = Bench::new("trust-sign");
    let k = keys(&b);
    b.write_config(&trust_config(&k, false, None));
    let before = counted_then_stopped(&b);
    let snap = b.data.join("app.mapsnap");
    let sig = b.data.join("app.mapsnap.minisig");
    let kid = key_id(&k.signing_pub);
    let signed = b.log_lines_with("signed");
    assert!(
        signed.iter().any(|l| l["fields"]["key_id"] == kid.as_str()),
        "a 'signed' line naming key {kid}:\n{}",
        b.log_text()
    );
    // The real minisign verifies what the hook signed, and the comment names the snapshot.
    let v = ok(Command::new("minisign")
        .arg("-V")
        .arg("-p")
        .arg(&k.signing_pub)
        .arg("-m")
        .arg(&snap)
        .arg("-x")
        .arg(&sig));
    let said = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(
        said.contains("Trusted comment: mapsnap-snapshot sha256:"),
        "{said}"
    );

    // A new node: the signed snapshot restores, the app counts on.
    b.wipe_node();
    let bundle = b.bundle(
        "second",
        &[("mapsnap.io/restore-from", "/data/app.mapsnap")],
    );
    let id = format!("{}-second", b.tag);
    b.start_ok(&bundle, &id);
    assert_eq!(
        b.counters(),
        before,
        "the signed snapshot restored the counters"
    );
    let verified = b.log_lines_with("signature verified");
    assert!(!verified.is_empty(), "{}", b.log_text());
    assert_eq!(verified[0]["fields"]["key_id"], kid.as_str());
    b.ping(2);
    assert_eq!(b.counters()[2], 5);
    b.stop(&id);
    // The pins outlive the app: these must survive every forged restore below.
    let live = pin_state(&b);
    assert_eq!(live.len(), 2, "{live:?}");

    let forge = |name: &str, with_sig: Option<&Path>| {
        let f = b.data.join(format!("{name}.mapsnap"));
        fs::copy(&snap, &f).expect("copy");
        if let Some(s) = with_sig {
            fs::copy(s, b.data.join(format!("{name}.mapsnap.minisig"))).expect("copy sig");
        }
        f
    };
    let attempt = |name: &str, want: &str| {
        refused(
            &b,
            name,
            &[
                ("mapsnap.io/restore-from", &format!("/data/{name}.mapsnap")),
                ("mapsnap.io/existing", "overwrite"),
            ],
            want,
        );
        assert_eq!(pin_state(&b), live, "{name}: the pins are the ones before");
    };
    // 1. One flipped byte in the middle of the signed snapshot.
    let t = forge("tampered", Some(&sig));
    flip_byte(&t, fs::metadata(&t).expect("meta").len() as usize / 2);
    attempt("tampered", "does not match the data");
    // 2. The signature removed.
    forge("unsigned", None);
    attempt("unsigned", "is not signed");
    // 3. Signed by a key outside the trust set (the real minisign).
    let s = forge("stranger", None);
    ok(Command::new("minisign")
        .arg("-S")
        .arg("-s")
        .arg(&k.stranger)
        .arg("-m")
        .arg(&s));
    attempt("stranger", "which is not in the trust set");
    // 4. The signature's trusted comment altered.
    forge("comment", None);
    let text = fs::read_to_string(&sig).expect("sig");
    fs::write(
        b.data.join("comment.mapsnap.minisig"),
        text.replace("size:", "size:1"),
    )
    .expect("write");
    attempt("comment", "trusted comment");
}

#[test]
fn encrypted_stop_snapshot_restores_only_with_the_identity() {
    let b = Bench::new("trust-enc");
    let k = keys(&b);
    b.write_config(&trust_config(&k, true, None));
    let before = counted_then_stopped(&b);
    let snap = b.data.join("app.mapsnap");
    let stored = fs::read(&snap).expect("read");
    assert!(stored.starts_with(AGE_MAGIC), "stored as an age stream");
    assert!(
        !stored.windows(9).any(|w| w == b"pkt_count"),
        "map names are inside the ciphertext"
    );
    // The real age decrypts it to a valid snapshot of the two maps.
    let plain = b.dir.path().join("plain.mapsnap");
    ok(Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&k.identity)
        .arg("-o")
        .arg(&plain)
        .arg(&snap));
    let summary =
        mapsnap::format::verify(fs::File::open(&plain).expect("open")).expect("a valid snapshot");
    let names: Vec<&str> = summary.maps.iter().map(|(m, _)| m.name.as_str()).collect();
    assert_eq!(names, vec!["pkt_count", "src_count"]);

    b.wipe_node();
    let ann = [("mapsnap.io/restore-from", "/data/app.mapsnap")];
    refused(&b, "no-identity", &ann, "no identities to decrypt it");
    assert!(b.pins().is_empty());
    b.write_config(&trust_config(&k, true, Some(&k.other_identity)));
    refused(&b, "wrong-identity", &ann, "no identity matches");
    assert!(b.pins().is_empty());
    b.write_config(&trust_config(&k, true, Some(&k.identity)));
    let bundle = b.bundle("second", &ann);
    let id = format!("{}-second", b.tag);
    b.start_ok(&bundle, &id);
    assert_eq!(b.counters(), before, "decrypted and restored");
    b.stop(&id);
}

#[test]
fn signed_checkpoint_restores_and_a_tampered_image_is_refused() {
    let b = Bench::new("trust-criu");
    let k = keys(&b);
    b.write_config(&trust_config(&k, true, Some(&k.identity)));
    let conf = criu_conf(&b);
    let bundle = b.bundle(
        "bundle",
        &[
            ("org.criu.config", conf.to_str().expect("utf-8")),
            ("mapsnap.io/policy", "strict"),
        ],
    );
    let id = format!("{}-ctr", b.tag);
    b.start_null_stdio(&bundle, &id);
    let (_, pid) = b.state_of(&id).expect("state");
    b.ping(3);
    let before = b.counters();
    let images = b.dir.path().join("images");
    b.criu_checkpoint(&id, &images, &[]);
    wait_pid_free(pid, Duration::from_secs(10));
    let m = CheckpointManifest::read(&images)
        .expect("manifest")
        .expect("a manifest");
    assert_eq!(m.signer.as_deref(), Some(key_id(&k.signing_pub).as_str()));
    assert!(m.encrypted);
    let snap = images.join(IMAGE_SNAPSHOT);
    assert!(fs::read(&snap).expect("read").starts_with(AGE_MAGIC));
    ok(Command::new("minisign")
        .arg("-V")
        .arg("-p")
        .arg(&k.signing_pub)
        .arg("-m")
        .arg(&snap));

    // Another node gets an archive whose pinned-map snapshot was altered: refused.
    b.wipe_node();
    let tampered = b.dir.path().join("images-tampered");
    ok(Command::new("cp").arg("-a").arg(&images).arg(&tampered));
    flip_byte(
        &tampered.join(IMAGE_SNAPSHOT),
        fs::metadata(&snap).expect("meta").len() as usize - 40,
    );
    let (out, _) = b.try_criu_restore(&id, &tampered, &bundle);
    assert!(
        !out.status.success(),
        "a tampered checkpoint must not restore"
    );
    let refusals = b.log_lines_with("does not match the data");
    assert!(!refusals.is_empty(), "{}", b.log_text());
    assert!(b.pins().is_empty(), "nothing pinned: {:?}", b.pins());
    let _ = run(b.runc().args(["delete", "-f", &id]));
    reap_children();
    wait_pid_free(pid, Duration::from_secs(10));

    // The archive as signed restores.
    b.criu_restore(&id, &images, &bundle);
    assert_eq!(b.counters(), before);
    assert!(!b.log_lines_with("signature verified").is_empty());
    b.stop(&id);
}
