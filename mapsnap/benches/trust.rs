//! What signing and encryption cost on a ~70 MB snapshot stream (1M hash entries, 4-byte
//! keys, 64-byte values that do not compress away), compared with the same work without them.
//!
//! - `dump plain` / `dump signed+encrypted`: the snapshot writer into a sink, directly or
//!   through age encryption then minisign signing (the dump order: the signature covers the
//!   ciphertext).
//! - `read plain` / `read verified+decrypted`: `format::verify` of the snapshot, directly or
//!   through signature verification then decryption.
//! - `sign only`, `encrypt only`: each layer alone over the snapshot bytes in memory.
//!
//! `cargo bench -p mapsnap --bench trust`

use std::hint::black_box;
use std::io::{self, Write};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mapsnap::format::{SnapshotWriter, StreamDigest, WriterOptions, verify};
use mapsnap::model::{MapMeta, SnapshotInfo, map_type};
use mapsnap::trust::{
    self, Identities, OpenPolicy, Recipient, SealPolicy, SigningWriter, TrustSet,
};

const N: usize = 1_000_000;

struct Data {
    keys: Vec<u8>,
    values: Vec<u8>,
}

fn data() -> Data {
    let mut keys = Vec::with_capacity(N * 4);
    let mut values = Vec::with_capacity(N * 64);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..N {
        keys.extend_from_slice(&(i as u32).to_le_bytes());
        for _ in 0..8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.extend_from_slice(&x.to_le_bytes());
        }
    }
    Data { keys, values }
}

fn write_snapshot<W: Write>(w: W, d: &Data) -> W {
    write_snapshot_digest(w, d).0
}

fn write_snapshot_digest<W: Write>(w: W, d: &Data) -> (W, StreamDigest) {
    let meta = MapMeta {
        map_type: map_type::HASH,
        name: "bench".into(),
        key_size: 4,
        value_size: 64,
        max_entries: N as u32,
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
    let mut sw =
        SnapshotWriter::new(w, &SnapshotInfo::default(), WriterOptions::default()).expect("writer");
    sw.begin_map(&meta).expect("begin");
    let per = 15_000;
    for start in (0..N).step_by(per) {
        let end = (start + per).min(N);
        sw.write_entries(
            end - start,
            &d.keys[start * 4..end * 4],
            &d.values[start * 64..end * 64],
        )
        .expect("entries");
    }
    sw.end_map().expect("end");
    sw.finish().expect("finish")
}

fn trust_bench(c: &mut Criterion) {
    let d = data();
    let snap = write_snapshot(Vec::new(), &d);
    let kp = trust::keygen(None).expect("keygen");
    let id = age::x25519::Identity::generate();
    let recipient = Recipient::parse(&id.to_public().to_string()).expect("recipient");
    let mut ids = Identities::new();
    ids.add_bytes(
        age::secrecy::ExposeSecret::expose_secret(&id.to_string()).as_bytes(),
        "bench identity",
    )
    .expect("identity");
    let mut set = TrustSet::new();
    set.add(kp.public.clone(), "bench").expect("trust");

    let recipients = std::slice::from_ref(&recipient);
    let seal = |bytes: &[u8]| -> (Vec<u8>, Vec<u8>) {
        let signer = SigningWriter::new(Vec::with_capacity(bytes.len() + 65_536), &kp.secret);
        let mut enc = trust::encrypt_writer(signer, recipients).expect("encrypt");
        enc.write_all(bytes).expect("write");
        let (ct, signed) = enc
            .finish()
            .expect("age")
            .finish(Some("sha256:bench"))
            .expect("sign");
        (ct, signed.signature)
    };
    let (ct, sig) = seal(&snap);

    let mut g = c.benchmark_group("trust");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(snap.len() as u64));
    eprintln!(
        "snapshot {} bytes, ciphertext {} bytes",
        snap.len(),
        ct.len()
    );

    g.bench_function("dump plain", |b| {
        b.iter(|| black_box(write_snapshot(io::sink(), &d)))
    });
    g.bench_function("dump signed+encrypted", |b| {
        b.iter(|| {
            let signer = SigningWriter::new(io::sink(), &kp.secret);
            let enc = trust::encrypt_writer(signer, recipients).expect("encrypt");
            let enc = write_snapshot(enc, &d);
            black_box(
                enc.finish()
                    .expect("age")
                    .finish(Some("sha256:bench"))
                    .expect("sign")
                    .1,
            )
        })
    });
    // The API the commands use: SealPolicy (BLAKE2b on a helper thread, the writer's own
    // SHA-256 reused for plaintext) and OpenPolicy (signature checked before the last byte).
    let seal_policy = SealPolicy::new(Some(kp.secret.clone()), vec![recipient.clone()]);
    g.bench_function("dump sealed (SealPolicy)", |b| {
        b.iter(|| {
            let w = seal_policy.seal(io::sink()).expect("seal");
            let (w, digest) = write_snapshot_digest(w, &d);
            let (_, sealed) = w.finish(&digest).expect("finish");
            black_box(sealed.sign(Some(b"manifest")).expect("sign"))
        })
    });
    let (sealed_ct, sealed_sig) = {
        let w = seal_policy.seal(Vec::new()).expect("seal");
        let (w, digest) = write_snapshot_digest(w, &d);
        let (ct, sealed) = w.finish(&digest).expect("finish");
        let sig = sealed
            .sign(Some(b"manifest"))
            .expect("sign")
            .expect("signed");
        (ct, sig.signature)
    };
    let mut open_ids = Identities::new();
    open_ids
        .add_bytes(
            age::secrecy::ExposeSecret::expose_secret(&id.to_string()).as_bytes(),
            "bench identity",
        )
        .expect("identity");
    let open_policy = OpenPolicy::new(Some(set.clone()), open_ids);
    g.bench_function("read opened (OpenPolicy)", |b| {
        b.iter(|| {
            let admitted = open_policy
                .admit(
                    "bench",
                    Some(&sealed_sig),
                    Some(b"manifest"),
                    Some(sealed_ct.len() as u64),
                )
                .expect("admit");
            let mut r = admitted.reader(sealed_ct.as_slice()).expect("reader");
            let summary = verify(&mut r).expect("verify");
            black_box((summary, r.finish().expect("verified")))
        })
    });
    g.bench_function("read plain", |b| {
        b.iter(|| black_box(verify(snap.as_slice()).expect("verify")))
    });
    g.bench_function("read verified+decrypted", |b| {
        b.iter(|| {
            // Borrowed, so the signature verdict is still reachable after decryption.
            let mut vr = set.verifying_reader(ct.as_slice(), &sig).expect("sig");
            let mut dr = trust::decrypt_reader(&mut vr, &ids).expect("decrypt");
            let summary = verify(&mut dr).expect("verify");
            // The snapshot reader stops at its trailer; the age and signature checks need
            // the stream's end (which is where restore would check them too).
            let left = dr.finish().expect("age end");
            assert_eq!(left, 0);
            let verified = vr.finish().expect("signature").1;
            black_box((summary, verified));
        })
    });
    g.bench_function("sign only", |b| {
        b.iter(|| {
            let mut w = SigningWriter::new(io::sink(), &kp.secret);
            w.write_all(&snap).expect("write");
            black_box(w.finish(None).expect("sign").1)
        })
    });
    g.bench_function("encrypt only", |b| {
        b.iter(|| {
            let mut w = trust::encrypt_writer(io::sink(), recipients).expect("encrypt");
            w.write_all(&snap).expect("write");
            w.finish().expect("finish")
        })
    });
    g.bench_function("verify signature only", |b| {
        b.iter(|| black_box(set.verify_stream(ct.as_slice(), &sig).expect("verify")))
    });
    g.bench_function("decrypt only", |b| {
        b.iter(|| {
            let mut r = trust::decrypt_reader(ct.as_slice(), &ids).expect("decrypt");
            black_box(io::copy(&mut r, &mut io::sink()).expect("read"))
        })
    });
    g.finish();
}

criterion_group!(benches, trust_bench);
criterion_main!(benches);
