//! Signed and encrypted snapshots against the real tools: Debian's `minisign` and `age` CLIs
//! (and `ssh-keygen` for ssh-ed25519 keys), installed by scripts/install-trust-tools.sh.
//!
//! Every direction is checked: what mapsnap signs verifies with `minisign -V`, what `minisign
//! -S` signs verifies in mapsnap, what mapsnap encrypts decrypts with `age -d` to the same
//! (valid) snapshot, what `age -r`/`age -R` encrypts decrypts in mapsnap; tampering and wrong
//! keys are refused by both sides.

use std::fs;
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use mapsnap::format::{SnapshotWriter, WriterOptions, verify};
use mapsnap::model::{MapMeta, SnapshotInfo, map_type};
use mapsnap::trust::{
    self, Identities, PublicKey, Recipient, SIGNATURE_SUFFIX, SecretKey, SigningWriter, TrustError,
    TrustSet,
};
use sha2::Digest as _;

const ENTRIES: usize = 50_000;

/// A real snapshot of one hash map (4-byte keys, 64-byte values that do not compress away),
/// written into `w` through the library's own writer.
fn write_snapshot<W: Write>(w: W) -> W {
    let meta = MapMeta {
        map_type: map_type::HASH,
        name: "interop".into(),
        key_size: 4,
        value_size: 64,
        max_entries: ENTRIES as u32,
        flags: 0,
        map_extra: 0,
        numa_node: None,
        frozen: false,
        possible_cpus: None,
        btf: None,
        pin_path: None,
        source_id: 1,
        inner_template: None,
        inner: false,
    };
    let mut keys = Vec::with_capacity(ENTRIES * 4);
    let mut values = Vec::with_capacity(ENTRIES * 64);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..ENTRIES {
        keys.extend_from_slice(&(i as u32).to_le_bytes());
        for _ in 0..8 {
            // xorshift: values that zstd cannot shrink much, like real hashes or addresses
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.extend_from_slice(&x.to_le_bytes());
        }
    }
    let mut sw = SnapshotWriter::new(w, &SnapshotInfo::default(), WriterOptions::default())
        .expect("snapshot writer");
    sw.begin_map(&meta).expect("begin map");
    for (k, v) in keys.chunks(4 * 10_000).zip(values.chunks(64 * 10_000)) {
        sw.write_entries(k.len() / 4, k, v).expect("entries");
    }
    sw.end_map().expect("end map");
    sw.finish().expect("finish snapshot").0
}

fn snapshot_bytes() -> Vec<u8> {
    write_snapshot(Vec::new())
}

/// Asserts the bytes are a whole, valid snapshot with our one map and all its entries.
fn assert_valid_snapshot(bytes: &[u8]) {
    let summary = verify(bytes).expect("a valid snapshot");
    assert_eq!(summary.maps.len(), 1);
    assert_eq!(summary.maps[0].0.name, "interop");
    assert_eq!(summary.maps[0].1, ENTRIES as u64);
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/install-trust-tools.sh)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that must fail; returns its stdout+stderr.
fn run_fails(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/install-trust-tools.sh)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "{cmd:?} unexpectedly succeeded: {text}"
    );
    text
}

fn minisign_verify(pubkey: &Path, file: &Path, sig: &Path) -> Command {
    let mut c = Command::new("minisign");
    c.arg("-V")
        .arg("-p")
        .arg(pubkey)
        .arg("-m")
        .arg(file)
        .arg("-x")
        .arg(sig);
    c
}

/// `minisign -G -W`: a password-less key pair as the CLI writes it.
fn minisign_keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (p, s) = (
        dir.join(format!("{name}.pub")),
        dir.join(format!("{name}.key")),
    );
    run(Command::new("minisign")
        .args(["-G", "-W", "-p"])
        .arg(&p)
        .arg("-s")
        .arg(&s));
    (p, s)
}

/// A mapsnap key pair written to files.
fn mapsnap_keygen(
    dir: &Path,
    name: &str,
    password: Option<&str>,
) -> (PathBuf, PathBuf, trust::KeyPair) {
    let kp = trust::keygen(password).expect("keygen");
    let (p, s) = (
        dir.join(format!("{name}.pub")),
        dir.join(format!("{name}.key")),
    );
    kp.write_files(&p, &s).expect("write key files");
    (p, s, kp)
}

/// Signs `data` with `key` through a SigningWriter into `dir/name`, plus `name.minisig`.
fn sign_to_file(
    dir: &Path,
    name: &str,
    data: &[u8],
    key: &SecretKey,
    manifest: &str,
) -> (PathBuf, PathBuf, trust::Signed) {
    let path = dir.join(name);
    let mut w = SigningWriter::new(fs::File::create(&path).expect("create"), key);
    for c in data.chunks(100_003) {
        w.write_all(c).expect("write");
    }
    let (_file, signed) = w.finish(Some(manifest)).expect("sign");
    let sig = dir.join(format!("{name}{SIGNATURE_SUFFIX}"));
    fs::write(&sig, &signed.signature).expect("write signature");
    (path, sig, signed)
}

#[test]
fn mapsnap_signature_verifies_with_minisign_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let snap = snapshot_bytes();
    let sha = hex::encode(sha2::Sha256::digest(&snap));

    // Keys from mapsnap, password-less and password-protected.
    let (pub_a, sec_a, kp_a) = mapsnap_keygen(d, "a", None);
    let (pub_b, sec_b, kp_b) = mapsnap_keygen(d, "b", Some("s3cret pass"));
    let key_a = SecretKey::from_file(&sec_a, None).expect("load a");
    let key_b = SecretKey::from_file(&sec_b, Some("s3cret pass")).expect("load b");
    assert_eq!(key_a.key_id(), kp_a.public.key_id());
    assert_eq!(key_b.key_id(), kp_b.public.key_id());

    for (key, pubf) in [(&key_a, &pub_a), (&key_b, &pub_b)] {
        let name = format!("snap-{}.msnap", key.key_id());
        let (file, sig, signed) = sign_to_file(d, &name, &snap, key, "sha256:0123abcd");
        assert_eq!(
            fs::read(&file).expect("read"),
            snap,
            "the writer passes bytes through"
        );
        let out = run(&mut minisign_verify(pubf, &file, &sig));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!(
                "Trusted comment: mapsnap-snapshot sha256:{sha} size:{} manifest:sha256:0123abcd",
                snap.len()
            )),
            "{stdout}"
        );
        assert_eq!(signed.facts.size, snap.len() as u64);
        // The public key file minisign reads names the same key id mapsnap reports.
        let pub_text = fs::read_to_string(pubf).expect("read pub");
        assert!(pub_text.contains(&key.key_id().to_string()), "{pub_text}");
    }

    // A password-less key file from mapsnap signs in `minisign -S` without a prompt.
    let plain = d.join("plain.bin");
    fs::write(&plain, b"some bytes").expect("write");
    run(Command::new("minisign")
        .args(["-S", "-s"])
        .arg(&sec_a)
        .arg("-m")
        .arg(&plain)
        .stdin(Stdio::null()));
    run(&mut minisign_verify(
        &pub_a,
        &plain,
        &d.join("plain.bin.minisig"),
    ));
}

#[test]
fn minisign_cli_signature_verifies_in_mapsnap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let snap = snapshot_bytes();
    let file = d.join("snap.msnap");
    fs::write(&file, &snap).expect("write");
    let (pubf, secf) = minisign_keygen(d, "cli");

    run(Command::new("minisign")
        .args(["-S", "-s"])
        .arg(&secf)
        .arg("-m")
        .arg(&file)
        .args(["-t", "signed by the minisign CLI"]));
    let sig = fs::read(d.join("snap.msnap.minisig")).expect("signature");

    let set = TrustSet::from_paths(&[&pubf]).expect("trust set");
    let v = set
        .verify_stream(fs::File::open(&file).expect("open"), &sig)
        .expect("minisign -S signature verifies in mapsnap");
    assert_eq!(v.trusted_comment, "signed by the minisign CLI");
    assert_eq!(v.size, snap.len() as u64);
    assert_eq!(v.sha256.as_slice(), sha2::Sha256::digest(&snap).as_slice());
    let pub_text = fs::read_to_string(&pubf).expect("pub");
    assert!(
        // minisign prints the key id as a number: without leading zeros.
        pub_text.contains(&format!(
            "minisign public key {}",
            v.key_id.to_string().trim_start_matches('0')
        )),
        "key id {} vs {pub_text}",
        v.key_id
    );

    // `minisign -G -W` secret keys (zero checksum) load and sign in mapsnap; minisign -V
    // accepts the result.
    let key = SecretKey::from_file(&secf, None).expect("minisign -W key loads");
    assert_eq!(key.key_id(), v.key_id);
    let (f2, s2, _) = sign_to_file(d, "again.msnap", &snap, &key, "sha256:ee");
    run(&mut minisign_verify(&pubf, &f2, &s2));

    // A password-protected `minisign -G` key (password on stdin) loads with its password.
    let (pp, ps) = (d.join("pw.pub"), d.join("pw.key"));
    let mut child = Command::new("minisign")
        .args(["-G", "-p"])
        .arg(&pp)
        .arg("-s")
        .arg(&ps)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("minisign -G");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"pw-for-test\npw-for-test\n")
        .expect("password");
    assert!(child.wait().expect("wait").success());
    assert!(matches!(
        SecretKey::from_file(&ps, None),
        Err(TrustError::KeyNeedsPassword { .. })
    ));
    assert!(matches!(
        SecretKey::from_file(&ps, Some("not it")),
        Err(TrustError::WrongPassword { .. })
    ));
    let key = SecretKey::from_file(&ps, Some("pw-for-test")).expect("decrypts");
    assert_eq!(key.public_key(), PublicKey::from_file(&pp).expect("pub"));
}

#[test]
fn tampering_is_refused_by_mapsnap_and_minisign() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let snap = snapshot_bytes();
    let (pub_a, sec_a) = minisign_keygen(d, "a");
    let (pub_b, sec_b) = minisign_keygen(d, "b");
    let key_a = SecretKey::from_file(&sec_a, None).expect("a");
    let key_b = SecretKey::from_file(&sec_b, None).expect("b");
    let (file, sig, _) = sign_to_file(d, "snap.msnap", &snap, &key_a, "sha256:aa");
    let sig_text = fs::read_to_string(&sig).expect("sig");
    let trusted = TrustSet::from_paths(&[&pub_a]).expect("set");
    assert!(
        trusted
            .verify_stream(Cursor::new(&snap), sig_text.as_bytes())
            .is_ok()
    );

    // 1. One flipped byte in the payload.
    let mut altered = snap.clone();
    altered[snap.len() / 3] ^= 0x01;
    let alt_file = d.join("altered.msnap");
    fs::write(&alt_file, &altered).expect("write");
    let err = trusted
        .verify_stream(Cursor::new(&altered), sig_text.as_bytes())
        .expect_err("altered payload");
    assert!(
        matches!(err, TrustError::DataMismatch { key_id } if key_id == key_a.key_id()),
        "{err}"
    );
    let cli = run_fails(&mut minisign_verify(&pub_a, &alt_file, &sig));
    assert!(cli.contains("Signature verification failed"), "{cli}");

    // 2. One flipped bit in the data signature (inside line 2's base64, past the key id).
    let mut lines: Vec<String> = sig_text.lines().map(str::to_string).collect();
    let mut raw = base64_decode(&lines[1]);
    raw[40] ^= 0x04;
    lines[1] = base64_encode(&raw);
    let bad_sig = d.join("badsig.minisig");
    fs::write(&bad_sig, lines.join("\n") + "\n").expect("write");
    let err = trusted
        .verify_stream(Cursor::new(&snap), &fs::read(&bad_sig).expect("read"))
        .expect_err("altered signature");
    // The comment signature covers the data signature, so this is caught before any data.
    assert!(matches!(err, TrustError::CommentMismatch { .. }), "{err}");
    run_fails(&mut minisign_verify(&pub_a, &file, &bad_sig));

    // 3. Trusted comment edited (claims another manifest).
    let edited = sig_text.replace("manifest:sha256:aa", "manifest:sha256:ab");
    assert_ne!(edited, sig_text);
    let bad_comment = d.join("badcomment.minisig");
    fs::write(&bad_comment, &edited).expect("write");
    let err = trusted
        .verify_stream(Cursor::new(&snap), edited.as_bytes())
        .expect_err("edited comment");
    assert!(matches!(err, TrustError::CommentMismatch { .. }), "{err}");
    let cli = run_fails(&mut minisign_verify(&pub_a, &file, &bad_comment));
    assert!(
        cli.contains("Comment signature verification failed"),
        "{cli}"
    );

    // 4. Signed by another key: refused, naming the key that signed.
    let (_, sig_b, _) = sign_to_file(d, "by-b.msnap", &snap, &key_b, "sha256:aa");
    let err = trusted
        .verify_stream(Cursor::new(&snap), &fs::read(&sig_b).expect("read"))
        .expect_err("other key");
    assert_eq!(
        err.to_string(),
        format!(
            "signed by key {}, which is not in the trust set (trusted: {})",
            key_b.key_id(),
            key_a.key_id()
        )
    );
    run_fails(&mut minisign_verify(&pub_a, &file, &sig_b));
    // ... and accepted once that key is trusted too (rotation).
    let both = TrustSet::from_paths(&[&pub_a, &pub_b]).expect("both");
    let v = both
        .verify_stream(Cursor::new(&snap), &fs::read(&sig_b).expect("read"))
        .expect("b trusted");
    assert_eq!(v.key_id, key_b.key_id());

    // 5. The signature of another snapshot (swapped pair) does not vouch for this one.
    let other = write_snapshot(Vec::new())
        .into_iter()
        .chain(std::iter::once(0u8))
        .collect::<Vec<_>>();
    let (_, sig_other, _) = sign_to_file(d, "other.msnap", &other, &key_a, "sha256:bb");
    let err = trusted
        .verify_stream(Cursor::new(&snap), &fs::read(&sig_other).expect("read"))
        .expect_err("swapped");
    assert!(matches!(err, TrustError::DataMismatch { .. }), "{err}");

    // 6. A signature whose facts do not match what the manifest expects.
    let v = trusted
        .verify_stream(Cursor::new(&snap), sig_text.as_bytes())
        .expect("ok");
    let err = v
        .check(&trust::Expected {
            manifest_digest: Some("sha256:bb".into()),
            ..Default::default()
        })
        .expect_err("manifest mismatch");
    assert!(
        err.to_string()
            .contains("names manifest sha256:aa, expected sha256:bb"),
        "{err}"
    );

    // 7. Legacy (non-prehashed) minisign signatures are refused.
    run(Command::new("minisign")
        .args(["-S", "-l", "-s"])
        .arg(&sec_a)
        .arg("-m")
        .arg(&file)
        .arg("-x")
        .arg(d.join("legacy.minisig")));
    let err = trusted
        .verify_stream(
            Cursor::new(&snap),
            &fs::read(d.join("legacy.minisig")).expect("read"),
        )
        .expect_err("legacy");
    assert!(matches!(err, TrustError::LegacySignature), "{err}");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .expect("base64")
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// `age-keygen -o FILE`; returns (identity file, recipient).
fn age_keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let id = dir.join(format!("{name}.txt"));
    run(Command::new("age-keygen").arg("-o").arg(&id));
    let out = run(Command::new("age-keygen").arg("-y").arg(&id));
    let r = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string();
    assert!(r.starts_with("age1"), "{r}");
    (id, r)
}

/// `ssh-keygen -t ed25519`; returns (private key, public key file).
fn ssh_keygen(dir: &Path, name: &str, passphrase: &str) -> (PathBuf, PathBuf) {
    let k = dir.join(name);
    run(Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-C",
            "interop-test",
            "-N",
            passphrase,
            "-f",
        ])
        .arg(&k));
    (k.clone(), k.with_extension("pub"))
}

fn mapsnap_encrypt(data: &[u8], recipients: &[Recipient]) -> Vec<u8> {
    let mut w = trust::encrypt_writer(Vec::new(), recipients).expect("encrypt");
    for c in data.chunks(65_000) {
        w.write_all(c).expect("write");
    }
    w.finish().expect("finish")
}

fn mapsnap_decrypt(ct: &[u8], ids: &Identities) -> Result<Vec<u8>, String> {
    let mut r = trust::decrypt_reader(Cursor::new(ct), ids).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    r.read_to_end(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

#[test]
fn mapsnap_encryption_decrypts_with_age_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let snap = snapshot_bytes();
    let (age_id, age_r) = age_keygen(d, "id");
    let (ssh_key, ssh_pub) = ssh_keygen(d, "ssh_ed25519", "");
    let ssh_recipient = fs::read_to_string(&ssh_pub).expect("ssh pub");
    assert!(ssh_recipient.starts_with("ssh-ed25519 "));

    // One stream to both recipients: each identity alone decrypts it.
    let recipients = [
        Recipient::parse(&age_r).expect("age recipient"),
        Recipient::parse(&ssh_recipient).expect("ssh recipient"),
    ];
    let ct = mapsnap_encrypt(&snap, &recipients);
    let ct_file = d.join("snap.msnap.age");
    fs::write(&ct_file, &ct).expect("write");
    for id in [&age_id, &ssh_key] {
        let out_file = d.join("out.msnap");
        let _ = fs::remove_file(&out_file);
        run(Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(id)
            .arg("-o")
            .arg(&out_file)
            .arg(&ct_file));
        let out = fs::read(&out_file).expect("read");
        assert_eq!(out.len(), snap.len());
        assert!(
            out == snap,
            "age -d -i {} gave different bytes",
            id.display()
        );
        assert_valid_snapshot(&out);
    }

    // Encrypt then sign: the signature covers the ciphertext, so minisign -V checks it
    // without any identity, and age -d still gives the snapshot back.
    let (pubf, secf) = minisign_keygen(d, "signer");
    let key = SecretKey::from_file(&secf, None).expect("key");
    let out_file = d.join("both.msnap.age");
    let signer = SigningWriter::new(fs::File::create(&out_file).expect("create"), &key);
    let enc = trust::encrypt_writer(signer, &recipients[..1]).expect("encrypt");
    let enc = write_snapshot(enc);
    let signer = enc.finish().expect("finish age");
    let (_, signed) = signer.finish(Some("sha256:1234")).expect("sign");
    let sig_file = d.join(format!("both.msnap.age{SIGNATURE_SUFFIX}"));
    fs::write(&sig_file, &signed.signature).expect("write sig");
    let verified = run(&mut minisign_verify(&pubf, &out_file, &sig_file));
    let out = run(Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&age_id)
        .arg(&out_file));
    assert!(out.stdout == snap);
    // A transcript for humans (shown with --nocapture).
    eprintln!(
        "$ minisign -V -p signer.pub -m both.msnap.age -x both.msnap.age.minisig\n{}{}\
         $ age -d -i id.txt both.msnap.age | sha256sum\n{:x}  -\n\
         (snapshot written by mapsnap: {} bytes, sha256 {:x})",
        String::from_utf8_lossy(&verified.stderr),
        String::from_utf8_lossy(&verified.stdout),
        sha2::Sha256::digest(&out.stdout),
        snap.len(),
        sha2::Sha256::digest(&snap)
    );
    let v = TrustSet::from_paths(&[&pubf])
        .expect("set")
        .verify_stream(fs::File::open(&out_file).expect("open"), &signed.signature)
        .expect("verifies");
    assert_eq!(v.size, fs::metadata(&out_file).expect("meta").len());
}

#[test]
fn age_cli_encryption_decrypts_in_mapsnap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let snap = snapshot_bytes();
    let plain = d.join("snap.msnap");
    fs::write(&plain, &snap).expect("write");
    let (age_id, age_r) = age_keygen(d, "id");
    let (ssh_key, ssh_pub) = ssh_keygen(d, "ssh_ed25519", "");

    // age -r RECIPIENT
    let ct_r = d.join("r.age");
    run(Command::new("age")
        .arg("-r")
        .arg(&age_r)
        .arg("-o")
        .arg(&ct_r)
        .arg(&plain));
    let ids = Identities::from_files(&[&age_id]).expect("age identity file");
    let out = mapsnap_decrypt(&fs::read(&ct_r).expect("read"), &ids).expect("decrypts");
    assert!(out == snap);
    assert_valid_snapshot(&out);

    // age -R ssh-ed25519 public key file
    let ct_ssh = d.join("ssh.age");
    run(Command::new("age")
        .arg("-R")
        .arg(&ssh_pub)
        .arg("-o")
        .arg(&ct_ssh)
        .arg(&plain));
    let ssh_ids = Identities::from_files(&[&ssh_key]).expect("ssh identity");
    let ct_ssh = fs::read(&ct_ssh).expect("read");
    let out = mapsnap_decrypt(&ct_ssh, &ssh_ids).expect("decrypts");
    assert!(out == snap);

    // Recipients files as `age -R` reads them load in mapsnap too.
    let rfile = d.join("recipients.txt");
    fs::write(
        &rfile,
        format!(
            "# team\n{age_r}\n\n{}",
            fs::read_to_string(&ssh_pub).expect("pub")
        ),
    )
    .expect("write");
    assert_eq!(
        Recipient::from_file(&rfile).expect("recipients file").len(),
        2
    );

    // Wrong identity: refused, naming what was tried.
    let (other_id, _) = age_keygen(d, "other");
    let wrong = Identities::from_files(&[&other_id]).expect("other");
    let err = mapsnap_decrypt(&fs::read(&ct_r).expect("read"), &wrong).expect_err("wrong key");
    assert!(err.contains("no identity matches"), "{err}");
    assert!(err.contains(&other_id.display().to_string()), "{err}");
    let err = mapsnap_decrypt(&ct_ssh, &ids).expect_err("age key for an ssh stream");
    assert!(err.contains("no identity matches"), "{err}");

    // Truncated ciphertext (cut mid-chunk and cut at a chunk boundary) and altered ciphertext.
    let ct = fs::read(&ct_r).expect("read");
    let err = mapsnap_decrypt(&ct[..ct.len() - 1], &ids).expect_err("cut by one byte");
    assert!(err.contains("failed authentication"), "{err}");
    let last_chunk = (snap.len() % 65_536) + 16;
    let err = mapsnap_decrypt(&ct[..ct.len() - last_chunk], &ids).expect_err("cut at boundary");
    assert!(err.contains("age stream truncated"), "{err}");
    let mut altered = ct.clone();
    let i = ct.len() - 70_000;
    altered[i] ^= 0x80;
    let err = mapsnap_decrypt(&altered, &ids).expect_err("altered");
    assert!(err.contains("altered, damaged or cut short"), "{err}");
    // The real CLI agrees on all three.
    for (name, bytes) in [
        ("cut1.age", &ct[..ct.len() - 1]),
        ("cutb.age", &ct[..ct.len() - last_chunk]),
        ("alt.age", &altered[..]),
    ] {
        let p = d.join(name);
        fs::write(&p, bytes).expect("write");
        run_fails(
            Command::new("age")
                .arg("-d")
                .arg("-i")
                .arg(&age_id)
                .arg(&p)
                .stdout(Stdio::null()),
        );
    }
    // Header altered (a byte of the recipient stanza): refused before any plaintext.
    let mut hdr = ct.clone();
    hdr[40] ^= 0x01;
    let err = mapsnap_decrypt(&hdr, &ids).expect_err("header");
    assert!(
        err.contains("header") || err.contains("no identity matches"),
        "{err}"
    );

    // A passphrase-protected ssh key is refused with advice, not a prompt.
    let (locked, _) = ssh_keygen(d, "locked", "a passphrase");
    let err = Identities::from_files(&[&locked]).expect_err("locked ssh key");
    assert!(err.to_string().contains("passphrase-protected"), "{err}");

    // An unencrypted stream is not mistaken for ciphertext.
    let err = mapsnap_decrypt(&snap, &ids).expect_err("plain");
    assert!(err.contains("not an age-encrypted stream"), "{err}");
}
