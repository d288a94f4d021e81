//! `mapsnap keygen`, `dump --sign --encrypt-to` and `restore/verify/inspect --trust
//! --identity` end to end on real kernel maps, against Debian's `minisign` and `age` CLIs
//! (scripts/install-trust-tools.sh) and a real S3 server (moto): interoperability both ways,
//! and every tampering refused with the restore targets untouched (their contents asserted).

mod common;
mod storage_common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use mapsnap::sys::Map;
use storage_common::{Kind, Server, counter, counters, error_line, text};

const N: u32 = 300;
/// Exit code of a snapshot refused by the trust set or the encryption.
const UNTRUSTED: i32 = 8;

fn mapsnap(args: &[&str]) -> Output {
    storage_common::mapsnap(args, &[])
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", text(&o));
    o
}

fn tool(cmd: &mut Command) -> Output {
    let o = cmd.stdin(Stdio::null()).output().expect("run tool");
    assert!(o.status.success(), "{cmd:?}: {}", text(&o));
    o
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

fn sibling(p: &Path, suffix: &str) -> PathBuf {
    let mut o = p.as_os_str().to_owned();
    o.push(suffix);
    o.into()
}

struct Keys {
    public: PathBuf,
    secret: PathBuf,
    identity: PathBuf,
    recipient: String,
}

fn keys(dir: &Path, name: &str) -> Keys {
    let prefix = dir.join(name);
    let o = ok(mapsnap(&["keygen", "--out", s(&prefix), "--json"]));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("keygen JSON");
    assert_eq!(j["key_id"].as_str().map(str::len), Some(16), "{j}");
    let identity = dir.join(format!("{name}.age"));
    tool(Command::new("age-keygen").arg("-o").arg(&identity));
    let recipient =
        String::from_utf8(tool(Command::new("age-keygen").arg("-y").arg(&identity)).stdout)
            .expect("utf8")
            .trim()
            .to_string();
    Keys {
        public: sibling(&prefix, ".pub"),
        secret: sibling(&prefix, ".key"),
        identity,
        recipient,
    }
}

fn key_id(public: &Path) -> String {
    mapsnap::trust::PublicKey::from_file(public)
        .expect("public key")
        .key_id()
        .to_string()
}

/// The target a restore must not touch: a pinned hash map "counters" holding seed 5.
fn assert_untouched(dir: &Path, map_id: u32) {
    let pin = dir.join("counters");
    let m = Map::from_pin(&pin).expect("target pin still there");
    assert_eq!(
        m.info().expect("info").id,
        map_id,
        "the pin holds the same map"
    );
    for k in [0, 1, N / 2, N - 1] {
        assert_eq!(counter(&pin, k), Some(u64::from(k) * 10 + 5), "key {k}");
    }
}

fn assert_restored(pin: &Path, seed: u64) {
    for k in [0, 1, N / 2, N - 1] {
        assert_eq!(counter(pin, k), Some(u64::from(k) * 10 + seed), "key {k}");
    }
}

fn dump(src: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["dump", "--pin", s(src), "-o", s(out), "--overwrite"];
    args.extend_from_slice(extra);
    ok(mapsnap(&args))
}

/// Every refused restore: exit code, message, and both kinds of targets untouched (an
/// existing pin replaced with --overwrite, an existing map filled with --into).
fn assert_refused(snapshot: &str, open: &[&str], target: &Path, map_id: u32, want: &str) {
    let into = format!("{}", target.join("counters").display());
    let attempts: [Vec<&str>; 2] = [
        vec!["restore", snapshot, "--pin-root", s(target), "--overwrite"],
        vec!["restore", snapshot, "--into", &into],
    ];
    for mut args in attempts {
        args.extend_from_slice(open);
        let o = mapsnap(&args);
        assert_eq!(o.status.code(), Some(UNTRUSTED), "{args:?}: {}", text(&o));
        let line = error_line(&o);
        assert!(line.contains(want), "{args:?}: wanted {want:?} in {line}");
        assert_untouched(target, map_id);
    }
}

#[test]
fn cli_snapshots_interoperate_with_minisign_and_age() {
    common::ensure_bpffs();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = common::fresh_pin_dir("trust-cli-src");
    let _m = counters(&src, N, 3);
    let k = keys(d, "ops");

    // mapsnap signs and encrypts; minisign -V and age -d accept it.
    let snap = d.join("a.mapsnap");
    let o = dump(
        &src,
        &snap,
        &[
            "--sign",
            s(&k.secret),
            "--encrypt-to",
            &k.recipient,
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("dump JSON");
    assert_eq!(report["encrypted"], true);
    assert_eq!(
        report["signed_by"].as_str(),
        Some(key_id(&k.public).as_str())
    );
    let stored = fs::read(&snap).expect("snapshot");
    assert!(stored.starts_with(b"age-encryption.org/v1\n"));
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&stored));
    assert_eq!(report["sha256"].as_str(), Some(sha.as_str()));
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(sibling(&snap, ".manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    assert_eq!(
        manifest["sha256"].as_str(),
        Some(sha.as_str()),
        "stored bytes"
    );
    assert_eq!(manifest["maps"][0]["name"], "counters");
    assert_eq!(manifest["maps"][0]["entries"], N);
    let v = tool(Command::new("minisign").args(["-V", "-p", s(&k.public), "-m", s(&snap)]));
    let out = text(&v);
    assert!(
        out.contains(&format!(
            "mapsnap-snapshot sha256:{sha} size:{}",
            stored.len()
        )),
        "{out}"
    );
    let plain = d.join("a.plain");
    tool(Command::new("age").args(["-d", "-i", s(&k.identity), "-o", s(&plain), s(&snap)]));
    let o = ok(mapsnap(&[
        "inspect",
        s(&plain),
        "--json",
        "--entries",
        "--limit",
        "3",
    ]));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(
        shown.contains("\"counters\"") && shown.contains(&N.to_string()),
        "{shown}"
    );
    ok(mapsnap(&["verify", s(&plain)]));

    // And mapsnap restores it with the trust set and the identity.
    let open = ["--trust", s(&k.public), "--identity", s(&k.identity)];
    let o = ok(mapsnap(&[&["verify", s(&snap)][..], &open[..]].concat()));
    assert!(text(&o).contains(&format!("signed by trusted key {}", key_id(&k.public))));
    let dst = common::fresh_pin_dir("trust-cli-dst");
    ok(mapsnap(
        &[&["restore", s(&snap), "--pin-root", s(&dst)][..], &open[..]].concat(),
    ));
    assert_restored(&dst.join("counters"), 3);

    // minisign -S signs a plain dump: mapsnap restores it with the trust set (a trust
    // directory, as for rotation: the old key and the new one).
    let plain_snap = d.join("b.mapsnap");
    dump(&src, &plain_snap, &[]);
    tool(Command::new("minisign").args(["-S", "-s", s(&k.secret), "-m", s(&plain_snap)]));
    let trusted = d.join("trusted");
    fs::create_dir(&trusted).expect("mkdir");
    fs::copy(&k.public, trusted.join("ops.pub")).expect("copy");
    let other = keys(d, "next");
    fs::copy(&other.public, trusted.join("next.pub")).expect("copy");
    let dst2 = common::fresh_pin_dir("trust-cli-dst2");
    ok(mapsnap(&[
        "restore",
        s(&plain_snap),
        "--pin-root",
        s(&dst2),
        "--trust",
        s(&trusted),
    ]));
    assert_restored(&dst2.join("counters"), 3);

    // age -r encrypts a plain dump: mapsnap restores it with the identity.
    let aged = d.join("c.mapsnap");
    tool(Command::new("age").args(["-r", &k.recipient, "-o", s(&aged), s(&plain_snap)]));
    let dst3 = common::fresh_pin_dir("trust-cli-dst3");
    ok(mapsnap(&[
        "restore",
        s(&aged),
        "--pin-root",
        s(&dst3),
        "--identity",
        s(&k.identity),
    ]));
    assert_restored(&dst3.join("counters"), 3);
    // Without the identity: a clear error naming the flag, exit 9.
    let o = mapsnap(&["verify", s(&aged)]);
    assert_eq!(o.status.code(), Some(9), "{}", text(&o));
    assert!(error_line(&o).contains("--identity"));

    // diff and inspect take the same flags: the signed + encrypted snapshot against the plain
    // one (same maps: no differences), and its manifest, vouched for by the signature.
    let o = ok(mapsnap(
        &[&["diff", s(&snap), s(&plain_snap)][..], &open[..]].concat(),
    ));
    assert!(text(&o).contains("no differences"), "{}", text(&o));
    let o = mapsnap(&["diff", s(&snap), s(&plain_snap), "--trust", s(&k.public)]);
    assert_eq!(
        o.status.code(),
        Some(9),
        "encrypted without identity: {}",
        text(&o)
    );
    let o = ok(mapsnap(&[
        "inspect",
        s(&snap),
        "--manifest",
        "--trust",
        s(&k.public),
    ]));
    assert!(text(&o).contains("\"counters\""), "{}", text(&o));
    // minisign -S's own comment does not name the manifest: not vouched for.
    let o = mapsnap(&[
        "inspect",
        s(&plain_snap),
        "--manifest",
        "--trust",
        s(&k.public),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(error_line(&o).contains("does not name the manifest"));

    // A password-protected key: keygen and dump take the password from a file or the
    // environment, never from an argument; a wrong one is exit 9.
    let pw = d.join("pw");
    fs::write(&pw, "correct horse\n").expect("write");
    let locked = d.join("locked");
    ok(mapsnap(&[
        "keygen",
        "--out",
        s(&locked),
        "--password-file",
        s(&pw),
    ]));
    let signed = d.join("d.mapsnap");
    let lk = sibling(&locked, ".key");
    let o = mapsnap(&["dump", "--pin", s(&src), "-o", s(&signed), "--sign", s(&lk)]);
    assert_eq!(o.status.code(), Some(9), "no password: {}", text(&o));
    assert!(!signed.exists(), "nothing written");
    let o = storage_common::mapsnap(
        &["dump", "--pin", s(&src), "-o", s(&signed), "--sign", s(&lk)],
        &[("MAPSNAP_KEY_PASSWORD".into(), "wrong".into())],
    );
    assert_eq!(o.status.code(), Some(9), "wrong password: {}", text(&o));
    ok(mapsnap(&[
        "dump",
        "--pin",
        s(&src),
        "-o",
        s(&signed),
        "--sign",
        s(&lk),
        "--password-file",
        s(&pw),
    ]));
    tool(Command::new("minisign").args([
        "-V",
        "-p",
        s(&sibling(&locked, ".pub")),
        "-m",
        s(&signed),
    ]));
}

#[test]
fn tampered_snapshots_are_refused_with_targets_untouched() {
    common::ensure_bpffs();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = common::fresh_pin_dir("trust-tamper-src");
    let target = common::fresh_pin_dir("trust-tamper-dst");
    let _m = counters(&src, N, 3);
    let t = counters(&target, N, 5);
    let map_id = t.info().expect("info").id;
    let k = keys(d, "ops");
    let stranger = keys(d, "stranger");
    let id = key_id(&k.public);
    let trust = ["--trust", s(&k.public)];
    let both = ["--trust", s(&k.public), "--identity", s(&k.identity)];

    for (encrypt, open) in [(false, &trust[..]), (true, &both[..])] {
        let mut seal = vec!["--sign", s(&k.secret)];
        if encrypt {
            seal.extend_from_slice(&["--encrypt-to", &k.recipient]);
        }
        let good = d.join(format!("good-{encrypt}.mapsnap"));
        dump(&src, &good, &seal);
        let fresh = |name: &str| -> PathBuf {
            let p = d.join(format!("{name}-{encrypt}.mapsnap"));
            for suffix in ["", ".manifest.json", ".minisig"] {
                fs::copy(sibling(&good, suffix), sibling(&p, suffix)).expect("copy");
            }
            p
        };

        // A flipped byte in the payload.
        let p = fresh("payload");
        let mut b = fs::read(&p).expect("read");
        let i = b.len() / 2;
        b[i] ^= 0x01;
        fs::write(&p, &b).expect("write");
        assert_refused(s(&p), open, &target, map_id, &id);

        // A flipped byte in the manifest (still valid JSON: another map name).
        let p = fresh("manifest");
        let m = sibling(&p, ".manifest.json");
        let text_m = fs::read_to_string(&m).expect("read");
        fs::write(&m, text_m.replacen("\"counters\"", "\"counterz\"", 1)).expect("write");
        assert_refused(s(&p), open, &target, map_id, "do not belong together");

        // A flipped byte in the signature (in the base64 of the data signature).
        let p = fresh("signature");
        let sig = sibling(&p, ".minisig");
        let mut b = fs::read(&sig).expect("read");
        let line2 = b.iter().position(|&c| c == b'\n').expect("line") + 40;
        b[line2] = if b[line2] == b'A' { b'B' } else { b'A' };
        fs::write(&sig, &b).expect("write");
        assert_refused(s(&p), open, &target, map_id, "signature");

        // Snapshot and manifest swapped in from another (signed) dump of other contents.
        let other_src = common::fresh_pin_dir(&format!("trust-tamper-other-{encrypt}"));
        let _o = counters(&other_src, N, 9);
        let other = d.join(format!("other-{encrypt}.mapsnap"));
        dump(&other_src, &other, &seal);
        let p = fresh("swapped");
        fs::copy(&other, &p).expect("copy");
        fs::copy(
            sibling(&other, ".manifest.json"),
            sibling(&p, ".manifest.json"),
        )
        .expect("copy");
        assert_refused(s(&p), open, &target, map_id, &id);

        // Signed by a key outside the trust set: refused, naming that key.
        let p = d.join(format!("stranger-{encrypt}.mapsnap"));
        let mut sseal = vec!["--sign", s(&stranger.secret)];
        if encrypt {
            sseal.extend_from_slice(&["--encrypt-to", &k.recipient]);
        }
        dump(&src, &p, &sseal);
        assert_refused(s(&p), open, &target, map_id, &key_id(&stranger.public));

        // Unsigned, with a trust set.
        let p = fresh("unsigned");
        fs::remove_file(sibling(&p, ".minisig")).expect("rm");
        assert_refused(s(&p), open, &target, map_id, "is not signed");

        // The good one restores (so the refusals above were about the tampering).
        let dst = common::fresh_pin_dir(&format!("trust-tamper-good-{encrypt}"));
        ok(mapsnap(
            &[&["restore", s(&good), "--pin-root", s(&dst)][..], open].concat(),
        ));
        assert_restored(&dst.join("counters"), 3);
    }

    // Encrypted, no trust set: a truncated or altered ciphertext, a wrong identity.
    let enc = d.join("enc.mapsnap");
    dump(&src, &enc, &["--encrypt-to", &k.recipient]);
    let id_only = ["--identity", s(&k.identity)];
    let bytes = fs::read(&enc).expect("read");
    // The manifest would catch these first: take it away, so the ciphertext's own
    // authentication is what refuses them.
    fs::remove_file(sibling(&enc, ".manifest.json")).expect("rm");
    let cut = d.join("cut.mapsnap");
    fs::write(&cut, &bytes[..bytes.len() - 20]).expect("write");
    assert_refused(s(&cut), &id_only, &target, map_id, "age stream");
    let flipped = d.join("flipped.mapsnap");
    let mut b = bytes.clone();
    let i = b.len() - 100;
    b[i] ^= 0x80;
    fs::write(&flipped, &b).expect("write");
    assert_refused(s(&flipped), &id_only, &target, map_id, "age stream");
    let o = mapsnap(&[
        "restore",
        s(&enc),
        "--into",
        s(&target.join("counters")),
        "--identity",
        s(&stranger.identity),
    ]);
    assert_eq!(o.status.code(), Some(UNTRUSTED), "{}", text(&o));
    assert!(
        error_line(&o).contains("no identity matches"),
        "{}",
        text(&o)
    );
    assert_untouched(&target, map_id);
}

#[test]
fn remote_signed_encrypted_snapshot_tampering_refused() {
    common::ensure_bpffs();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let server = Server::start(Kind::S3);
    let env = server.env(&server.endpoint());
    let run = |args: &[&str]| storage_common::mapsnap(args, &env);
    let src = common::fresh_pin_dir("trust-s3-src");
    let target = common::fresh_pin_dir("trust-s3-dst");
    let _m = counters(&src, N, 3);
    let t = counters(&target, N, 5);
    let map_id = t.info().expect("info").id;
    let k = keys(d, "ops");
    let loc = Kind::S3.url("node-a/app.mapsnap");
    let o = run(&[
        "dump",
        "--pin",
        s(&src),
        "-o",
        &loc,
        "--sign",
        s(&k.secret),
        "--encrypt-to",
        &k.recipient,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let object = server.object("node-a/app.mapsnap").expect("object");
    let sig = server
        .object("node-a/app.mapsnap.minisig")
        .expect("signature stored beside the object");
    assert!(String::from_utf8_lossy(&sig).contains("mapsnap-snapshot sha256:"));
    let open = ["--trust", s(&k.public), "--identity", s(&k.identity)];

    // Replaced object (one flipped byte, manifest left as it was): refused, one-pass
    // (--pin-root, new maps published only at the end) and verify-first (--into) alike.
    let mut b = object.clone();
    let i = b.len() / 2;
    b[i] ^= 0x01;
    server.put_object("node-a/app.mapsnap", &b);
    let into = target.join("counters");
    for args in [
        vec!["restore", &loc, "--pin-root", s(&target), "--overwrite"],
        vec!["restore", &loc, "--into", s(&into)],
    ] {
        let o = run(&[&args[..], &open[..]].concat());
        assert_eq!(o.status.code(), Some(UNTRUSTED), "{args:?}: {}", text(&o));
        assert_untouched(&target, map_id);
    }
    // A new pin root: nothing published.
    let fresh = common::fresh_pin_dir("trust-s3-fresh");
    let o = run(&[&["restore", &loc, "--pin-root", s(&fresh)][..], &open[..]].concat());
    assert_eq!(o.status.code(), Some(UNTRUSTED), "{}", text(&o));
    assert_eq!(
        fs::read_dir(&fresh).expect("dir").count(),
        0,
        "nothing pinned"
    );

    // Unsigned (signature removed): refused before the object is read.
    server.put_object("node-a/app.mapsnap", &object);
    let cfg = server.config(&server.endpoint());
    let st = mapsnap::storage::Storage::open(
        mapsnap::storage::Location::parse(&loc).expect("loc"),
        &cfg,
    )
    .expect("open");
    st.delete_signature().expect("delete signature");
    let o = run(&[&["restore", &loc, "--into", s(&into)][..], &open[..]].concat());
    assert_eq!(o.status.code(), Some(UNTRUSTED), "{}", text(&o));
    assert!(error_line(&o).contains("is not signed"));
    assert_untouched(&target, map_id);

    // Signature back: the intact object restores in one pass.
    server.put_object("node-a/app.mapsnap.minisig", &sig);
    ok(run(&[
        &["restore", &loc, "--pin-root", s(&fresh)][..],
        &open[..],
    ]
    .concat()));
    assert_restored(&fresh.join("counters"), 3);
}
