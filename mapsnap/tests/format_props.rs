//! Property tests of the snapshot codec: exact round trips, and that damage of any kind is
//! reported as an error (never a panic, never a silent success).

use mapsnap::format::{
    Event, FILE_HEADER_LEN, FormatError, MAX_SECTION_LEN, SECTION_HEADER_LEN, SnapshotReader,
    SnapshotWriter, StreamDigest, WriterOptions, kind, verify,
};
use mapsnap::model::{BtfRef, MapMeta, SnapshotInfo, map_type};
use proptest::prelude::*;
use proptest::sample::Index;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
struct MapSpec {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    cpus: u32,
    /// Picks an earlier BTF blob (modulo how many exist), if any.
    btf: Option<u32>,
    /// Picks an earlier map as inner template (modulo how many exist), if any.
    inner: Option<u32>,
    count: usize,
    seed: u64,
    /// Low-entropy data, so zstd actually compresses (random data is stored raw).
    compressible: bool,
    /// Sizes of the write_entries calls, cycled.
    batches: Vec<usize>,
}

#[derive(Debug, Clone)]
enum Op {
    Btf(Vec<u8>),
    Map(MapSpec),
}

#[derive(Debug, Clone)]
struct Spec {
    ops: Vec<Op>,
    opts: WriterOptions,
}

fn map_spec() -> impl Strategy<Value = MapSpec> {
    let types = prop::sample::select(vec![
        map_type::HASH,
        map_type::ARRAY,
        map_type::LRU_HASH,
        map_type::PERCPU_HASH,
        map_type::PERCPU_ARRAY,
        map_type::QUEUE,
        map_type::STACK,
        map_type::HASH_OF_MAPS,
        map_type::LPM_TRIE,
        999, // unknown to this build: stored with key_size/value_size as-is
    ]);
    (
        types,
        0u32..=16,
        0u32..=40,
        1u32..=4,
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u32>()),
        0usize..=60,
        any::<u64>(),
        any::<bool>(),
        prop::collection::vec(1usize..=30, 1..4),
    )
        .prop_map(
            |(
                map_type,
                key_size,
                value_size,
                cpus,
                btf,
                inner,
                count,
                seed,
                compressible,
                batches,
            )| {
                MapSpec {
                    map_type,
                    key_size,
                    value_size,
                    cpus,
                    btf,
                    inner,
                    count,
                    seed,
                    compressible,
                    batches,
                }
            },
        )
}

fn spec() -> impl Strategy<Value = Spec> {
    let op = prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Op::Btf),
        1 => prop::collection::vec(0u8..3, 0..3000).prop_map(Op::Btf),
        3 => map_spec().prop_map(Op::Map),
    ];
    let chunk = prop_oneof![0usize..64, 64usize..2048, Just(1usize << 20)];
    (prop::collection::vec(op, 0..7), chunk, -3i32..=5).prop_map(
        |(ops, chunk_bytes, zstd_level)| Spec {
            ops,
            opts: WriterOptions {
                zstd_level,
                chunk_bytes,
            },
        },
    )
}

fn info() -> SnapshotInfo {
    SnapshotInfo {
        tool: "mapsnap proptest".into(),
        created_unix: 1,
        hostname: "h".into(),
        kernel: "6.1".into(),
        possible_cpus: 4,
        source: "test".into(),
    }
}

/// Deterministic filler (splitmix64), so sizes can depend on generated metadata.
fn fill(seed: u64, len: usize, compressible: bool) -> Vec<u8> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let b = (z ^ (z >> 31)) as u8;
            if compressible { b % 3 } else { b }
        })
        .collect()
}

/// Events with all ENTRIES of one map merged into one, since chunking is a writer choice.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Norm {
    Ev(Event),
    Entries {
        count: usize,
        keys: Vec<u8>,
        values: Vec<u8>,
    },
}

struct Built {
    bytes: Vec<u8>,
    digest: StreamDigest,
    expected: Vec<Norm>,
    maps: Vec<(MapMeta, u64)>,
    btf_count: u32,
}

fn build(spec: &Spec) -> Built {
    let mut w = SnapshotWriter::new(Vec::new(), &info(), spec.opts).expect("writer");
    let mut expected = vec![Norm::Ev(Event::Info(info()))];
    let mut maps: Vec<(MapMeta, u64)> = Vec::new();
    let mut btf_count = 0u32;
    for op in &spec.ops {
        match op {
            Op::Btf(blob) => {
                let index = w.add_btf(blob).expect("btf");
                assert_eq!(index, btf_count);
                btf_count += 1;
                expected.push(Norm::Ev(Event::Btf {
                    index,
                    blob: blob.clone(),
                }));
            }
            Op::Map(m) => {
                let queue = matches!(m.map_type, map_type::QUEUE | map_type::STACK);
                let key_size = if queue { 0 } else { m.key_size };
                // No map has 0-byte entries; the format refuses them.
                let value_size = if m.value_size == 0 && (queue || key_size == 0) {
                    1
                } else {
                    m.value_size
                };
                let percpu = matches!(m.map_type, map_type::PERCPU_HASH | map_type::PERCPU_ARRAY);
                let meta = MapMeta {
                    map_type: m.map_type,
                    name: format!("map{}", maps.len()),
                    key_size,
                    value_size,
                    max_entries: 100,
                    flags: 0,
                    map_extra: 0,
                    numa_node: None,
                    frozen: m.seed % 2 == 0,
                    possible_cpus: percpu.then_some(m.cpus),
                    btf: m.btf.filter(|_| btf_count > 0).map(|b| BtfRef {
                        index: b % btf_count,
                        key_type_id: 1,
                        value_type_id: 2,
                    }),
                    pin_path: Some(format!("app/map{}", maps.len())),
                    source_id: 42,
                    // Templates are plain maps: the reader refuses map-of-maps nesting
                    // deeper than the kernel supports (Limits::max_nesting).
                    inner_template: m
                        .inner
                        .filter(|_| !maps.is_empty())
                        .map(|i| i % maps.len() as u32)
                        .filter(|t| maps[*t as usize].0.map_type != map_type::HASH_OF_MAPS),
                    inner: false,
                };
                let index = w.begin_map(&meta).expect("begin");
                assert_eq!(index as usize, maps.len());
                expected.push(Norm::Ev(Event::MapBegin {
                    index,
                    meta: meta.clone(),
                }));
                let (k, v) = (meta.key_len(), meta.value_len());
                let keys = fill(m.seed, m.count * k, m.compressible);
                let values = fill(!m.seed, m.count * v, m.compressible);
                let mut start = 0;
                for &b in m.batches.iter().cycle() {
                    if start >= m.count {
                        break;
                    }
                    let n = b.min(m.count - start);
                    w.write_entries(
                        n,
                        &keys[start * k..(start + n) * k],
                        &values[start * v..(start + n) * v],
                    )
                    .expect("entries");
                    start += n;
                }
                if m.count > 0 {
                    expected.push(Norm::Entries {
                        count: m.count,
                        keys,
                        values,
                    });
                }
                assert_eq!(w.end_map().expect("end"), m.count as u64);
                expected.push(Norm::Ev(Event::MapEnd {
                    index,
                    entries: m.count as u64,
                }));
                maps.push((meta, m.count as u64));
            }
        }
    }
    let (bytes, digest) = w.finish().expect("finish");
    expected.push(Norm::Ev(Event::End(digest)));
    Built {
        bytes,
        digest,
        expected,
        maps,
        btf_count,
    }
}

/// Reads to the end, merging entry chunks; checks each chunk respects `chunk_bytes`.
fn read_norm(bytes: &[u8], chunk_bytes: Option<usize>) -> Result<Vec<Norm>, FormatError> {
    let mut r = SnapshotReader::new(bytes)?;
    let mut out: Vec<Norm> = Vec::new();
    while let Some(e) = r.next_event()? {
        match e {
            Event::Entries(c) => {
                assert!(c.count >= 1, "writer never emits empty chunks");
                if let Some(limit) = chunk_bytes {
                    let raw = 4 + c.count * (c.key_len() + c.value_len());
                    assert!(
                        c.count == 1 || raw <= limit,
                        "chunk of {raw} raw bytes > {limit}"
                    );
                }
                assert_eq!(c.iter().len(), c.count);
                match out.last_mut() {
                    Some(Norm::Entries {
                        count,
                        keys,
                        values,
                    }) => {
                        *count += c.count;
                        keys.extend_from_slice(&c.keys);
                        values.extend_from_slice(&c.values);
                    }
                    _ => out.push(Norm::Entries {
                        count: c.count,
                        keys: c.keys.clone(),
                        values: c.values.clone(),
                    }),
                }
                r.recycle(c);
            }
            other => out.push(Norm::Ev(other)),
        }
    }
    assert_eq!(r.bytes_read(), bytes.len() as u64);
    Ok(out)
}

/// The reader must fail somewhere (a partial event list before the error is fine).
fn reader_fails(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut r = match SnapshotReader::new(bytes) {
        Ok(r) => r,
        Err(_) => return Ok(()),
    };
    loop {
        match r.next_event() {
            Ok(Some(_)) => {}
            Ok(None) => return Err(TestCaseError::fail("reader accepted a damaged snapshot")),
            Err(_) => return Ok(()),
        }
    }
}

/// Offsets where sections start, from INFO to TRAILER (the test's own walker, independent of
/// the reader, following docs/FORMAT.md).
fn section_starts(bytes: &[u8]) -> Vec<usize> {
    let mut pos = FILE_HEADER_LEN;
    let mut starts = Vec::new();
    while pos < bytes.len() {
        starts.push(pos);
        let stored = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4 bytes"));
        pos += SECTION_HEADER_LEN + stored as usize;
    }
    assert_eq!(pos, bytes.len());
    starts
}

fn section(kind: u16, flags: u16, stored: &[u8], raw_len: u32) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&kind.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    s.extend_from_slice(&raw_len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&s), stored);
    s.extend_from_slice(&crc.to_le_bytes());
    s.extend_from_slice(stored);
    s
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    // Modest by default so the suite runs in seconds; PROPTEST_CASES=5000 for a soak.
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn round_trip_is_exact(spec in spec()) {
        let b = build(&spec);
        let got = read_norm(&b.bytes, Some(spec.opts.chunk_bytes.max(4))).expect("read");
        prop_assert_eq!(&got, &b.expected);

        let s = verify(b.bytes.as_slice()).expect("verify");
        prop_assert_eq!(s.digest, b.digest);
        prop_assert_eq!(&s.maps, &b.maps);
        prop_assert_eq!(s.btf_count, b.btf_count);
        prop_assert_eq!(&s.info, &info());
        let sha: [u8; 32] = Sha256::digest(&b.bytes).into();
        prop_assert_eq!(b.digest.sha256, sha);
        prop_assert_eq!(b.digest.bytes, b.bytes.len() as u64);
    }

    #[test]
    fn any_flipped_byte_is_detected(spec in spec(), at in any::<Index>(), mask in 1u8..=255) {
        let mut bytes = build(&spec).bytes;
        let i = at.index(bytes.len());
        bytes[i] ^= mask;
        prop_assert!(verify(bytes.as_slice()).is_err(), "verify accepted a flip at {}", i);
        reader_fails(&bytes)?;
    }

    #[test]
    fn any_truncation_is_detected(spec in spec(), at in any::<Index>()) {
        let bytes = build(&spec).bytes;
        let cut = at.index(bytes.len());
        let err = verify(&bytes[..cut]).expect_err("truncated input verified");
        prop_assert!(
            matches!(err, FormatError::Truncated { .. }),
            "cut at {}: {}", cut, err
        );
        reader_fails(&bytes[..cut])?;
    }

    #[test]
    fn other_versions_are_refused(spec in spec(), version in any::<u16>().prop_filter("not v1", |v| *v != 1)) {
        let mut bytes = build(&spec).bytes;
        bytes[8..10].copy_from_slice(&version.to_le_bytes());
        let err = SnapshotReader::new(bytes.as_slice()).expect_err("other version read");
        prop_assert!(
            matches!(err, FormatError::UnsupportedVersion { found, supported: 1 } if found == version),
            "{}", err
        );
        prop_assert!(
            matches!(verify(bytes.as_slice()), Err(FormatError::UnsupportedVersion { .. })),
            "verify read another version"
        );
    }

    #[test]
    fn unknown_sections_are_skipped(
        spec in spec(),
        at in any::<Index>(),
        kind_no in any::<u16>().prop_filter("unknown kind", |k| !matches!(*k, 1..=5 | 0xFFFF)),
        flags in any::<u16>(),
        raw_len in 0..=MAX_SECTION_LEN,
        payload in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let b = build(&spec);
        let starts = section_starts(&b.bytes);
        // Anywhere after INFO, up to just before the trailer (inside maps too).
        let trailer = starts[starts.len() - 1];
        let pos = starts[1 + at.index(starts.len() - 1)];
        let mut bytes = b.bytes[..pos].to_vec();
        bytes.extend_from_slice(&section(kind_no, flags, &payload, raw_len));
        bytes.extend_from_slice(&b.bytes[pos..trailer]);
        // The trailer hashes everything before it, so it has to be redone.
        let sha: [u8; 32] = Sha256::digest(&bytes).into();
        bytes.extend_from_slice(&section(kind::TRAILER, 0, &sha, 32));

        let got = read_norm(&bytes, None).expect("read with unknown section");
        let mut want = b.expected.clone();
        want.pop();
        let mut got_body = got.clone();
        let end = got_body.pop();
        prop_assert_eq!(got_body, want);
        let full: [u8; 32] = Sha256::digest(&bytes).into();
        prop_assert_eq!(
            end,
            Some(Norm::Ev(Event::End(StreamDigest { sha256: full, bytes: bytes.len() as u64 })))
        );
        let s = verify(bytes.as_slice()).expect("verify with unknown section");
        prop_assert_eq!(&s.maps, &b.maps);
    }
}
