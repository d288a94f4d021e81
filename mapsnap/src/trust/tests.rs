//! Unit tests: round trips, tampering, and cross-checks against the minisign crate's own
//! signer and verifier (the CLI interop tests are in tests/trust_interop.rs).

use std::io::{Cursor, Read, Write};

use super::*;

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + i / 251) as u8).collect()
}

fn sign(key: &SecretKey, data: &[u8], manifest: Option<&str>) -> Signed {
    let mut w = SigningWriter::new(Vec::new(), key);
    // Odd-sized writes: the signature must not depend on how the stream was chunked.
    for c in data.chunks(7777) {
        w.write_all(c).expect("write to a Vec");
    }
    let (out, signed) = w.finish(manifest).expect("sign");
    assert_eq!(out, data);
    signed
}

fn set_of(keys: &[&PublicKey]) -> TrustSet {
    let mut set = TrustSet::new();
    for k in keys {
        set.add((*k).clone(), "test").expect("add key");
    }
    set
}

#[test]
fn sign_then_verify_names_key_and_facts() {
    let kp = keygen(None).expect("keygen");
    let data = payload(300_000);
    let signed = sign(&kp.secret, &data, Some("sha256:abcd"));
    let text = String::from_utf8(signed.signature.clone()).expect("utf8");
    assert!(text.starts_with("untrusted comment: "), "{text}");
    assert!(text.contains(&format!(
        "trusted comment: mapsnap-snapshot sha256:{} size:300000 manifest:sha256:abcd timestamp:",
        hex::encode(sha2::Sha256::digest(&data))
    )));
    let v = set_of(&[&kp.public])
        .verify_stream(Cursor::new(&data), &signed.signature)
        .expect("verifies");
    assert_eq!(v.key_id, kp.public.key_id());
    assert_eq!(v.size, 300_000);
    let facts = v.facts.clone().expect("mapsnap facts");
    assert_eq!(facts.manifest_digest.as_deref(), Some("sha256:abcd"));
    assert_eq!(facts.sha256, v.sha256);
    v.check(&Expected {
        sha256: Some(v.sha256),
        size: Some(300_000),
        manifest_digest: Some("sha256:abcd".into()),
    })
    .expect("expected facts");
    let err = v
        .check(&Expected {
            size: Some(299_999),
            ..Expected::default()
        })
        .expect_err("size mismatch");
    assert!(
        err.to_string()
            .contains("names size 300000, expected 299999"),
        "{err}"
    );
    let err = v
        .check(&Expected {
            manifest_digest: Some("sha256:other".into()),
            ..Expected::default()
        })
        .expect_err("manifest mismatch");
    assert!(
        err.to_string().contains("names manifest sha256:abcd"),
        "{err}"
    );
}

use sha2::Digest as _;

#[test]
fn refusals_name_the_signing_key() {
    let a = keygen(None).expect("keygen");
    let b = keygen(None).expect("keygen");
    let data = payload(100_000);
    let signed = sign(&a.secret, &data, None);
    let err = set_of(&[&b.public])
        .verify_stream(Cursor::new(&data), &signed.signature)
        .expect_err("other key");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "signed by key {}, which is not in the trust set",
            a.public.key_id()
        )),
        "{msg}"
    );
    assert!(msg.contains(&b.public.key_id().to_string()), "{msg}");

    // Rotation: both keys trusted, either signature verifies.
    let both = set_of(&[&b.public, &a.public]);
    assert_eq!(
        both.verify_stream(Cursor::new(&data), &signed.signature)
            .expect("a")
            .key_id,
        a.public.key_id()
    );

    // One flipped payload bit.
    let mut altered = data.clone();
    altered[54_321] ^= 0x10;
    let err = both
        .verify_stream(Cursor::new(&altered), &signed.signature)
        .expect_err("altered");
    assert!(matches!(err, TrustError::DataMismatch { key_id } if key_id == a.public.key_id()));

    // Truncated and extended payloads.
    for bad in [
        &data[..data.len() - 1],
        &[data.as_slice(), b"x"].concat()[..],
    ] {
        assert!(matches!(
            both.verify_stream(Cursor::new(bad), &signed.signature),
            Err(TrustError::DataMismatch { .. })
        ));
    }

    // Edited trusted comment (a different size) is caught before any data is read.
    let text = String::from_utf8(signed.signature.clone()).expect("utf8");
    let edited = text.replace("size:100000", "size:100001");
    assert_ne!(edited, text);
    let err = both.verifier(edited.as_bytes()).expect_err("comment");
    assert!(matches!(err, TrustError::CommentMismatch { .. }), "{err}");
}

#[test]
fn our_signatures_verify_in_the_minisign_crate_and_back() {
    let kp = keygen(None).expect("keygen");
    let data = payload(200_000);
    let signed = sign(&kp.secret, &data, Some("sha256:ff"));
    let pk = minisign::PublicKey::from_box(
        minisign::PublicKeyBox::from_string(&kp.public_file).expect("pk box"),
    )
    .expect("pk");
    let sig_box =
        minisign::SignatureBox::from_string(std::str::from_utf8(&signed.signature).expect("utf8"))
            .expect("minisign crate parses our signature");
    assert!(sig_box.is_prehashed());
    assert_eq!(
        sig_box.trusted_comment().expect("comment"),
        signed.trusted_comment
    );
    minisign::verify(&pk, &sig_box, Cursor::new(&data), true, false, false)
        .expect("minisign crate verifies our signature");

    // And the crate's own signer's output verifies here.
    let sk = minisign::SecretKey::from_unencrypted_box(
        minisign::SecretKeyBox::from_string(&kp.secret_file).expect("sk box"),
    )
    .expect("sk");
    let theirs = minisign::sign(
        Some(&pk),
        &sk,
        Cursor::new(&data),
        Some("their comment"),
        None,
    )
    .expect("crate signs");
    let v = set_of(&[&kp.public])
        .verify_stream(Cursor::new(&data), &theirs.to_bytes())
        .expect("verifies");
    assert_eq!(v.trusted_comment, "their comment");
    assert_eq!(v.facts, None);
    assert!(
        v.check(&Expected {
            size: Some(200_000),
            ..Expected::default()
        })
        .is_err()
    );
}

#[test]
fn password_protected_keys() {
    let kp = keygen(Some("correct horse")).expect("keygen");
    assert!(kp.secret_file.starts_with("untrusted comment: "));
    let err = SecretKey::parse(&kp.secret_file, None, "k").expect_err("needs password");
    assert!(matches!(err, TrustError::KeyNeedsPassword { .. }), "{err}");
    let err = SecretKey::parse(&kp.secret_file, Some("wrong"), "k").expect_err("wrong password");
    assert!(matches!(err, TrustError::WrongPassword { .. }), "{err}");
    let sk = SecretKey::parse(&kp.secret_file, Some("correct horse"), "k").expect("decrypts");
    assert_eq!(sk.key_id(), kp.public.key_id());
    assert_eq!(sk.public_key(), kp.public);
    // The public key round-trips through its file format.
    assert_eq!(
        PublicKey::parse(&kp.public.to_box_string(), "x").expect("parse"),
        kp.public
    );
}

#[test]
fn trust_set_from_directory_and_duplicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = keygen(None).expect("keygen");
    let b = keygen(None).expect("keygen");
    std::fs::write(dir.path().join("a.pub"), &a.public_file).expect("write");
    std::fs::write(dir.path().join("b.pub"), &b.public_file).expect("write");
    std::fs::write(dir.path().join("notes.txt"), "not a key").expect("write");
    let set = TrustSet::from_paths(&[dir.path()]).expect("dir");
    let mut ids = set.key_ids();
    ids.sort();
    let mut want = vec![a.public.key_id(), b.public.key_id()];
    want.sort();
    assert_eq!(ids, want);

    let empty = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        TrustSet::from_paths(&[empty.path()]),
        Err(TrustError::EmptyTrustSet { .. })
    ));

    // Same key id, different key: refused as ambiguous.
    let forged = PublicKey {
        key_id: a.public.key_id(),
        key: b.public.key,
    };
    let mut set = set_of(&[&a.public]);
    set.add(a.public.clone(), "again")
        .expect("same key twice is fine");
    assert!(matches!(
        set.add(forged, "forged"),
        Err(TrustError::DuplicateKeyId { .. })
    ));
}

#[test]
fn verifying_reader_needs_finish_and_reads_the_rest() {
    let kp = keygen(None).expect("keygen");
    let data = payload(150_000);
    let signed = sign(&kp.secret, &data, None);
    let set = set_of(&[&kp.public]);
    let mut r = set
        .verifying_reader(Cursor::new(&data), &signed.signature)
        .expect("reader");
    let mut head = vec![0u8; 1000];
    r.read_exact(&mut head).expect("read head");
    assert_eq!(head, data[..1000]);
    // finish() reads the remaining 149000 bytes itself.
    let (_, v) = r.finish().expect("verifies");
    assert_eq!(v.size, 150_000);
}

#[test]
fn age_round_trip_and_refusals() {
    let id = age::x25519::Identity::generate();
    let other = age::x25519::Identity::generate();
    let recipient = Recipient::parse(&id.to_public().to_string()).expect("recipient");
    let mut ids = Identities::new();
    ids.add_bytes(
        format!(
            "# created: now\n{}\n",
            age::secrecy::ExposeSecret::expose_secret(&id.to_string())
        )
        .as_bytes(),
        "test identity",
    )
    .expect("identity");
    let data = payload(1_000_000);
    let mut w = encrypt_writer(Vec::new(), std::slice::from_ref(&recipient)).expect("encrypt");
    for c in data.chunks(10_000) {
        w.write_all(c).expect("write");
    }
    let ct = w.finish().expect("finish");
    assert!(ct.starts_with(b"age-encryption.org/v1\n"));

    let mut out = Vec::new();
    decrypt_reader(Cursor::new(&ct), &ids)
        .expect("decrypt")
        .read_to_end(&mut out)
        .expect("read");
    assert_eq!(out, data);

    let mut wrong = Identities::new();
    wrong
        .add_bytes(
            age::secrecy::ExposeSecret::expose_secret(&other.to_string()).as_bytes(),
            "other identity",
        )
        .expect("identity");
    let err = decrypt_reader(Cursor::new(&ct), &wrong).expect_err("wrong key");
    assert!(
        matches!(err, TrustError::NoMatchingIdentity { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("other identity"), "{err}");

    // 1,000,000 bytes = 15 full 64 KiB chunks + 16960 bytes, sealed with a 16-byte tag.
    // Cut at the chunk boundary: every chunk left authenticates, only the end is missing.
    let mut cut = Vec::new();
    let err = decrypt_reader(Cursor::new(&ct[..ct.len() - (16_960 + 16)]), &ids)
        .expect("header intact")
        .read_to_end(&mut cut)
        .expect_err("truncated");
    assert!(
        err.to_string()
            .contains("age stream truncated after 983040"),
        "{err}"
    );
    // Cut inside a chunk: that chunk fails authentication.
    let err = decrypt_reader(Cursor::new(&ct[..ct.len() - 100_000]), &ids)
        .expect("header intact")
        .read_to_end(&mut cut)
        .expect_err("truncated");
    assert!(err.to_string().contains("failed authentication"), "{err}");

    let mut altered = ct.clone();
    let n = altered.len();
    altered[n / 2] ^= 1;
    let mut sink = Vec::new();
    let err = decrypt_reader(Cursor::new(&altered), &ids)
        .expect("header intact")
        .read_to_end(&mut sink)
        .expect_err("altered");
    assert!(err.to_string().contains("failed authentication"), "{err}");

    assert!(matches!(
        decrypt_reader(Cursor::new(&data), &ids),
        Err(TrustError::NotAge { .. })
    ));
    assert!(matches!(
        Recipient::parse("AGE-SECRET-KEY-1XYZ"),
        Err(TrustError::BadRecipient { .. })
    ));
}

#[test]
fn missing_signature_file_is_unsigned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = dir.path().join("s.msnap");
    std::fs::write(&snap, b"data").expect("write");
    assert_eq!(signature_path(&snap), dir.path().join("s.msnap.minisig"));
    let err = read_signature(&snap).expect_err("unsigned");
    assert!(matches!(err, TrustError::Unsigned { .. }), "{err}");
    assert!(err.to_string().contains("is not signed"), "{err}");
    let kp = keygen(None).expect("keygen");
    let signed = sign(&kp.secret, b"data", None);
    std::fs::write(signature_path(&snap), &signed.signature).expect("write sig");
    let sig = read_signature(&snap).expect("signed");
    set_of(&[&kp.public])
        .verify_stream(std::fs::File::open(&snap).expect("open"), &sig)
        .expect("verifies");
}

fn age_identity() -> (Recipient, Identities) {
    let id = age::x25519::Identity::generate();
    let recipient = Recipient::parse(&id.to_public().to_string()).expect("recipient");
    let mut ids = Identities::new();
    ids.add_bytes(
        age::secrecy::ExposeSecret::expose_secret(&id.to_string()).as_bytes(),
        "test identity",
    )
    .expect("identity");
    (recipient, ids)
}

/// Seals `data` as a dump would (the plaintext digest comes from the "snapshot writer").
fn seal(policy: &SealPolicy, data: &[u8], manifest: &[u8]) -> (Vec<u8>, Option<Signed>, Sealed) {
    let mut w = policy.seal(Vec::new()).expect("seal");
    for c in data.chunks(9_999) {
        w.write_all(c).expect("write");
    }
    let written = crate::format::StreamDigest {
        sha256: sha2::Sha256::digest(data).into(),
        bytes: data.len() as u64,
    };
    let (stored, sealed) = w.finish(&written).expect("finish");
    assert_eq!(sealed.stored().bytes, stored.len() as u64);
    assert_eq!(
        sealed.stored().sha256,
        <[u8; 32]>::from(sha2::Sha256::digest(&stored))
    );
    let signed = sealed.sign(Some(manifest)).expect("sign");
    (stored, signed, sealed)
}

/// Reads through an admitted reader in small pieces; returns what was handed on and the
/// error that stopped it, if any.
fn read_admitted(a: &Admitted, stored: &[u8]) -> (Vec<u8>, Option<std::io::Error>) {
    let mut r = match a.reader(Cursor::new(stored.to_vec())) {
        Ok(r) => r,
        Err(e) => return (Vec::new(), Some(std::io::Error::other(e))),
    };
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e)),
        }
    }
}

#[test]
fn seal_and_open_sign_and_encrypt() {
    let kp = keygen(None).expect("keygen");
    let (recipient, ids) = age_identity();
    let policy = SealPolicy::new(Some(kp.secret.clone()), vec![recipient]);
    let data = payload(700_000);
    let manifest = b"{\"manifest\": 1}\n";
    let (stored, signed, sealed) = seal(&policy, &data, manifest);
    assert!(sealed.encrypted());
    assert!(stored.starts_with(AGE_MAGIC_FOR_TESTS));
    let signed = signed.expect("signed");
    assert_eq!(signed.key_id, kp.public.key_id());
    // The signature alone (no identity) verifies the stored bytes.
    set_of(&[&kp.public])
        .verify_stream(Cursor::new(&stored), &signed.signature)
        .expect("signature covers the ciphertext");

    let open = OpenPolicy::new(Some(set_of(&[&kp.public])), ids);
    let a = open
        .admit(
            "snap",
            Some(&signed.signature),
            Some(manifest),
            Some(stored.len() as u64),
        )
        .expect("admit");
    assert_eq!(a.signer(), Some(kp.public.key_id()));
    assert!(a.manifest_authenticated());
    let mut r = a.reader(Cursor::new(stored.clone())).expect("reader");
    assert!(r.encrypted());
    let mut out = Vec::new();
    r.read_to_end(&mut out).expect("read");
    assert_eq!(out, data);
    let v = r.finish().expect("finish").expect("verified");
    assert_eq!(v.key_id, kp.public.key_id());

    // A second read is held to the bytes the first verified: a change is refused before
    // the end of the stream.
    let (again, err) = read_admitted(&a, &stored);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(again, data);
    let mut changed = stored.clone();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    let (_, err) = read_admitted(&a, &changed);
    let err = err.expect("changed bytes refused");
    assert!(
        matches!(
            TrustError::find(&err),
            Some(TrustError::Changed { .. } | TrustError::BadAgeHeader { .. })
        ) || err.to_string().contains("changed since it was verified"),
        "{err}"
    );

    // Without an identity: a clear error before anything is read.
    let no_id = OpenPolicy::new(Some(set_of(&[&kp.public])), Identities::new());
    let a = no_id
        .admit("snap", Some(&signed.signature), Some(manifest), None)
        .expect("admit");
    let e = a
        .reader(Cursor::new(stored.clone()))
        .expect_err("no identity");
    assert!(matches!(e, TrustError::NeedIdentity { .. }), "{e}");
    // With another identity: no matching identity.
    let (_, other_ids) = age_identity();
    let other = OpenPolicy::new(None, other_ids);
    let a = other.admit("snap", None, None, None).expect("no trust set");
    let e = a.reader(Cursor::new(stored)).expect_err("wrong identity");
    assert!(matches!(e, TrustError::NoMatchingIdentity { .. }), "{e}");
}

const AGE_MAGIC_FOR_TESTS: &[u8] = b"age-encryption.org/v1\n";

#[test]
fn seal_and_open_refusals_before_and_while_reading() {
    let kp = keygen(None).expect("keygen");
    let stranger = keygen(None).expect("keygen");
    let policy = SealPolicy::new(Some(kp.secret.clone()), vec![]);
    let data = payload(300_000);
    let manifest = b"{\"manifest\": 1}\n";
    let (stored, signed, sealed) = seal(&policy, &data, manifest);
    assert!(!sealed.encrypted());
    assert_eq!(stored, data, "signing alone leaves the stream as it is");
    let sig = signed.expect("signed").signature;
    let open = OpenPolicy::new(Some(set_of(&[&kp.public])), Identities::new());
    let size = Some(stored.len() as u64);

    // Refused at admission, naming the key id.
    let e = open
        .admit("snap", None, Some(manifest), size)
        .expect_err("unsigned");
    assert!(
        matches!(e, TrustError::Unsigned { .. }) && e.is_refusal(),
        "{e}"
    );
    let strange = seal(
        &SealPolicy::new(Some(stranger.secret.clone()), vec![]),
        &data,
        manifest,
    )
    .1
    .expect("signed");
    let e = open
        .admit("snap", Some(&strange.signature), Some(manifest), size)
        .expect_err("untrusted");
    assert!(
        e.to_string()
            .contains(&stranger.public.key_id().to_string()),
        "{e}"
    );
    let e = open
        .admit("snap", Some(&sig), Some(b"{\"manifest\": 2}\n"), size)
        .expect_err("other manifest");
    assert!(e.to_string().contains("do not belong together"), "{e}");
    let e = open
        .admit("snap", Some(&sig), None, size)
        .expect_err("no manifest");
    assert!(matches!(e, TrustError::FactsMismatch { .. }), "{e}");
    let e = open
        .admit("snap", Some(&sig), Some(manifest), Some(1))
        .expect_err("size");
    assert!(e.to_string().contains("names size 300000"), "{e}");
    let mut bad_sig = sig.clone();
    let i = bad_sig.len() - 10;
    bad_sig[i] = if bad_sig[i] == b'A' { b'B' } else { b'A' };
    let e = open
        .admit("snap", Some(&bad_sig), Some(manifest), size)
        .expect_err("altered signature");
    assert!(e.is_refusal(), "{e}");

    // Refused while reading: a flipped byte, a truncation, an extension. The error takes
    // the place of the last bytes: what was handed on is short of the stream.
    let a = open
        .admit("snap", Some(&sig), Some(manifest), size)
        .expect("admit");
    let mut flipped = stored.clone();
    flipped[1234] ^= 0x40;
    let (out, err) = read_admitted(&a, &flipped);
    let err = err.expect("flipped byte refused");
    assert!(
        matches!(
            TrustError::find(&err),
            Some(TrustError::DataMismatch { .. })
        ),
        "{err}"
    );
    assert!(out.len() < stored.len());
    let (_, err) = read_admitted(&a, &stored[..stored.len() - 1]);
    assert!(
        matches!(
            TrustError::find(&err.expect("truncated")),
            Some(TrustError::Truncated { .. })
        ),
        "truncated"
    );
    let mut longer = stored.clone();
    longer.push(0);
    let (_, err) = read_admitted(&a, &longer);
    let err = err.expect("extended");
    assert!(
        matches!(TrustError::find(&err), Some(TrustError::Extended { .. })),
        "{err}"
    );
    assert!(a.verified().is_none(), "no read verified");
    // The intact stream still verifies.
    let (out, err) = read_admitted(&a, &stored);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(out, data);
    assert_eq!(a.verified().map(|v| v.key_id), Some(kp.public.key_id()));

    // Without a trust set nothing is required and plaintext passes unchanged.
    let a = OpenPolicy::default()
        .admit("snap", None, None, None)
        .expect("admit");
    assert_eq!(a.signer(), None);
    let r = a.reader(Cursor::new(stored.clone())).expect("reader");
    assert!(r.finish().expect("finish").is_none());
}

#[test]
fn recipients_from_args_and_files() {
    let (r1, _) = age_identity();
    let (r2, _) = age_identity();
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("recipients.txt");
    std::fs::write(&f, format!("# team\n{r2}\n\n")).expect("write");
    let list =
        Recipient::parse_args(&[r1.to_string(), format!("@{}", f.display())]).expect("parse");
    assert_eq!(
        list.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        vec![r1.to_string(), r2.to_string()]
    );
    let e = Recipient::parse_args(&["@/nonexistent/recipients"]).expect_err("missing file");
    assert!(e.to_string().contains("/nonexistent/recipients"), "{e}");
}

#[test]
fn policies_and_streams_cross_threads() {
    // The hook and the plugin hand readers and writers to other threads and keep policies
    // in shared state.
    fn send<T: Send>() {}
    fn share<T: Send + Sync>() {}
    share::<SealPolicy>();
    share::<OpenPolicy>();
    share::<Admitted>();
    send::<SealWriter<Box<dyn std::io::Write + Send>>>();
    send::<Sealed>();
    send::<OpenReader<Box<dyn std::io::Read + Send>>>();
}
