//! Unit tests: round trip, and one crafted input per error variant.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use super::*;
use crate::model::{BtfRef, map_type};

fn info() -> SnapshotInfo {
    SnapshotInfo {
        tool: "mapsnap test".into(),
        created_unix: 1_700_000_000,
        hostname: "host".into(),
        kernel: "6.8.0".into(),
        possible_cpus: 4,
        source: "pin:/sys/fs/bpf/app".into(),
    }
}

fn meta(name: &str, map_type: u32, key_size: u32, value_size: u32) -> MapMeta {
    MapMeta {
        map_type,
        name: name.into(),
        key_size,
        value_size,
        max_entries: 1024,
        flags: 0,
        map_extra: 0,
        numa_node: None,
        frozen: false,
        possible_cpus: None,
        btf: None,
        pin_path: None,
        source_id: 7,
        inner_template: None,
        inner: false,
    }
}

fn read_all(bytes: &[u8]) -> Result<Vec<Event>, FormatError> {
    let mut r = SnapshotReader::new(bytes)?;
    let mut out = Vec::new();
    while let Some(e) = r.next_event()? {
        out.push(e);
    }
    Ok(out)
}

/// Reads until the first error; panics if there is none.
fn read_err(bytes: &[u8]) -> FormatError {
    match read_all(bytes) {
        Ok(events) => panic!("expected an error, got {} events", events.len()),
        Err(e) => e,
    }
}

// --- crafting helpers: build files section by section, with valid CRCs and trailer ---

fn file_header(version: u16) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&[0; 6]);
    h
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

fn plain(kind: u16, payload: &[u8]) -> Vec<u8> {
    section(kind, 0, payload, payload.len() as u32)
}

fn info_section() -> Vec<u8> {
    plain(kind::INFO, &serde_json::to_vec(&info()).expect("json"))
}

fn map_begin(m: &MapMeta) -> Vec<u8> {
    plain(kind::MAP_BEGIN, &serde_json::to_vec(m).expect("json"))
}

fn entries(count: u32, keys: &[u8], values: &[u8]) -> Vec<u8> {
    let mut p = count.to_le_bytes().to_vec();
    p.extend_from_slice(keys);
    p.extend_from_slice(values);
    plain(kind::ENTRIES, &p)
}

/// Header + sections + a correct trailer.
fn craft(sections: &[Vec<u8>]) -> Vec<u8> {
    let mut f = file_header(VERSION);
    for s in sections {
        f.extend_from_slice(s);
    }
    let sha: [u8; 32] = Sha256::digest(&f).into();
    f.extend_from_slice(&plain(kind::TRAILER, &sha));
    f
}

fn sample(opts: WriterOptions) -> (Vec<u8>, StreamDigest) {
    let mut w = SnapshotWriter::new(Vec::new(), &info(), opts).expect("new");
    assert_eq!(w.add_btf(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).expect("btf"), 0);
    assert_eq!(w.add_btf(&vec![7u8; 5000]).expect("btf"), 1);

    let mut hash = meta("counters", map_type::HASH, 4, 8);
    hash.btf = Some(BtfRef {
        index: 1,
        key_type_id: 2,
        value_type_id: 3,
    });
    assert_eq!(w.begin_map(&hash).expect("begin"), 0);
    let n = 300usize;
    let keys: Vec<u8> = (0..n as u32).flat_map(|i| i.to_le_bytes()).collect();
    let values: Vec<u8> = (0..n as u64).flat_map(|i| (i * 3).to_le_bytes()).collect();
    w.write_entries(n, &keys, &values).expect("entries");
    w.write_entries(0, &[], &[]).expect("no entries");
    assert_eq!(w.end_map().expect("end"), n as u64);

    let mut percpu = meta("per_cpu", map_type::PERCPU_ARRAY, 4, 12);
    percpu.possible_cpus = Some(3);
    w.begin_map(&percpu).expect("begin");
    // value_len = round_up8(12) * 3 = 48
    w.write_entries(2, &[0, 0, 0, 0, 1, 0, 0, 0], &[5u8; 96])
        .expect("entries");
    w.end_map().expect("end");

    let queue = meta("q", map_type::QUEUE, 0, 4);
    w.begin_map(&queue).expect("begin");
    w.write_entries(3, &[], &[1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
        .expect("entries");
    w.end_map().expect("end");

    let mut outer = meta("outer", map_type::HASH_OF_MAPS, 4, 4);
    outer.inner_template = Some(2);
    w.begin_map(&outer).expect("begin");
    w.end_map().expect("end");

    let written = w.bytes_written();
    let (bytes, digest) = w.finish().expect("finish");
    assert!(written < bytes.len() as u64);
    (bytes, digest)
}

#[test]
fn round_trip() {
    let opts = WriterOptions {
        zstd_level: 3,
        chunk_bytes: 1000,
    };
    let (bytes, digest) = sample(opts);
    assert_eq!(digest.bytes, bytes.len() as u64);
    assert_eq!(digest.sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
    assert_eq!(digest.sha256_hex().len(), 64);

    let events = read_all(&bytes).expect("read");
    assert_eq!(events[0], Event::Info(info()));
    assert!(matches!(&events[1], Event::Btf { index: 0, blob } if blob.len() == 8));
    assert!(matches!(&events[2], Event::Btf { index: 1, blob } if *blob == vec![7u8; 5000]));
    assert!(matches!(&events[3], Event::MapBegin { index: 0, meta } if meta.name == "counters"));

    // 300 entries of 12 bytes in chunks of <= 1000 raw bytes: 83 per chunk.
    let mut got = Vec::new();
    let mut i = 4;
    while let Event::Entries(c) = &events[i] {
        assert!(c.count <= 83 && c.count >= 1);
        assert_eq!((c.key_len(), c.value_len()), (4, 8));
        got.extend(c.iter().map(|(k, v)| (k.to_vec(), v.to_vec())));
        i += 1;
    }
    assert_eq!(i, 8, "four chunks");
    assert_eq!(got.len(), 300);
    assert_eq!(got[299].0, 299u32.to_le_bytes());
    assert_eq!(got[299].1, (299u64 * 3).to_le_bytes());
    assert_eq!(
        events[8],
        Event::MapEnd {
            index: 0,
            entries: 300
        }
    );
    let Event::Entries(q) = &events[13] else {
        panic!("queue entries expected, got {:?}", events[13]);
    };
    assert_eq!(q.key_len(), 0);
    assert_eq!(q.key(2), b"");
    assert_eq!(q.value(2), [3, 3, 3, 3]);
    assert_eq!(events.last(), Some(&Event::End(digest)));

    let summary = verify(bytes.as_slice()).expect("verify");
    assert_eq!(summary.digest, digest);
    assert_eq!(summary.btf_count, 2);
    assert_eq!(summary.info, info());
    let counts: Vec<_> = summary
        .maps
        .iter()
        .map(|(m, n)| (m.name.as_str(), *n))
        .collect();
    assert_eq!(
        counts,
        [("counters", 300), ("per_cpu", 2), ("q", 3), ("outer", 0)]
    );
}

#[test]
fn reader_recycles_buffers_and_stops_after_end() {
    let (bytes, _) = sample(WriterOptions {
        zstd_level: 1,
        chunk_bytes: 100,
    });
    let mut r = SnapshotReader::new(bytes.as_slice()).expect("new");
    let mut chunks = 0;
    while let Some(e) = r.next_event().expect("event") {
        if let Event::Entries(c) = e {
            chunks += 1;
            r.recycle(c);
        }
    }
    assert!(chunks > 30);
    assert_eq!(r.bytes_read(), bytes.len() as u64);
    assert!(r.next_event().expect("after end").is_none());
}

#[test]
fn compresses_when_it_helps_and_stores_raw_otherwise() {
    let (bytes, _) = sample(WriterOptions::default());
    // Walk sections: the 5000-byte BTF blob of 7s must be compressed, the 8-byte one not.
    let mut pos = FILE_HEADER_LEN;
    let mut seen = Vec::new();
    while pos < bytes.len() {
        let h = &bytes[pos..pos + SECTION_HEADER_LEN];
        let kind = u16::from_le_bytes([h[0], h[1]]);
        let flags = u16::from_le_bytes([h[2], h[3]]);
        let stored = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        seen.push((kind, flags));
        pos += SECTION_HEADER_LEN + stored;
    }
    assert_eq!(pos, bytes.len());
    assert_eq!(seen[1], (kind::BTF, 0));
    assert_eq!(seen[2], (kind::BTF, FLAG_ZSTD));
    assert_eq!(seen[4], (kind::ENTRIES, FLAG_ZSTD));
    assert_eq!(seen.last(), Some(&(kind::TRAILER, 0)));
}

#[test]
fn unknown_kind_is_skipped() {
    let bytes = craft(&[
        info_section(),
        plain(0x1234, b"from the future"),
        map_begin(&meta("m", map_type::ARRAY, 4, 1)),
        section(0x4321, 0xFFFF, b"flags ignored", 1),
        entries(1, &[0; 4], &[9]),
        plain(kind::MAP_END, &1u64.to_le_bytes()),
    ]);
    let events = read_all(&bytes).expect("read");
    assert_eq!(events.len(), 5);
    let s = verify(bytes.as_slice()).expect("verify");
    assert_eq!(s.maps[0].1, 1);
}

// --- one crafted input per error variant ---

struct FailAfter<'a> {
    data: &'a [u8],
    pos: usize,
    fail_at: usize,
}

impl Read for FailAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.fail_at {
            return Err(io::Error::other("disk on fire"));
        }
        let n = buf
            .len()
            .min(self.fail_at - self.pos)
            .min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn err_io() {
    let (bytes, _) = sample(WriterOptions::default());
    let r = FailAfter {
        data: &bytes,
        pos: 0,
        fail_at: 100,
    };
    let mut rd = SnapshotReader::new(r).expect("header reads fine");
    let err = loop {
        match rd.next_event() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("should fail"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, FormatError::Io(_)), "{err}");
    // A failed reader stays failed.
    assert!(matches!(rd.next_event(), Err(FormatError::Usage(_))));

    struct BrokenWriter;
    impl io::Write for BrokenWriter {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("no space"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::other("no space"))
        }
    }
    // The BufWriter absorbs small writes; the error shows by finish at the latest.
    let w = SnapshotWriter::new(BrokenWriter, &info(), WriterOptions::default()).expect("new");
    assert!(matches!(w.finish(), Err(FormatError::Io(_))));
}

#[test]
fn err_not_a_snapshot() {
    for input in [
        &b"PK\x03\x04 zip file here"[..],
        b"\x89MAPSNAQ........",
        b"x",
    ] {
        assert!(matches!(
            SnapshotReader::new(input),
            Err(FormatError::NotASnapshot)
        ));
        assert!(matches!(verify(input), Err(FormatError::NotASnapshot)));
    }
}

#[test]
fn err_unsupported_version() {
    let mut bytes = sample(WriterOptions::default()).0;
    bytes[8] = 2;
    let err = SnapshotReader::new(bytes.as_slice()).expect_err("v2");
    assert!(matches!(
        err,
        FormatError::UnsupportedVersion {
            found: 2,
            supported: 1
        }
    ));
    assert!(err.to_string().contains("version 2"), "{err}");
}

#[test]
fn err_truncated() {
    let (bytes, _) = sample(WriterOptions::default());
    assert!(matches!(
        SnapshotReader::new(&bytes[..0]),
        Err(FormatError::Truncated { offset: 0, .. })
    ));
    assert!(matches!(
        SnapshotReader::new(&bytes[..10]),
        Err(FormatError::Truncated { offset: 10, .. })
    ));
    for cut in [16, 20, 40, bytes.len() - 48, bytes.len() - 1] {
        let err = read_err(&bytes[..cut]);
        match &err {
            FormatError::Truncated { offset, .. } => assert_eq!(*offset, cut as u64),
            other => panic!("cut at {cut}: {other}"),
        }
        assert!(err.to_string().contains("copy or download it again"));
        assert!(matches!(
            verify(&bytes[..cut]),
            Err(FormatError::Truncated { .. })
        ));
    }
    let err = read_err(&bytes[..bytes.len() - 48]);
    assert!(
        err.to_string().contains("TRAILER section is missing"),
        "{err}"
    );
}

#[test]
fn err_chunk_crc() {
    let (mut bytes, _) = sample(WriterOptions::default());
    // A byte inside the INFO JSON.
    bytes[FILE_HEADER_LEN + SECTION_HEADER_LEN + 3] ^= 0x20;
    let err = read_err(&bytes);
    assert!(
        matches!(
            err,
            FormatError::ChunkCrc {
                offset: 16,
                kind: kind::INFO
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("INFO section at byte 16"), "{err}");
}

#[test]
fn err_checksum() {
    let (mut bytes, _) = sample(WriterOptions::default());
    // The header's reserved bytes are not interpreted, so only the trailer hash catches this.
    bytes[12] = 1;
    let err = read_err(&bytes);
    assert!(matches!(err, FormatError::Checksum { .. }), "{err}");
    assert!(matches!(
        verify(bytes.as_slice()),
        Err(FormatError::Checksum { .. })
    ));
}

#[test]
fn err_malformed() {
    let m = meta("m", map_type::HASH, 4, 4);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "first section must be INFO",
            craft(&[map_begin(&m), info_section()]),
        ),
        (
            "first section must be INFO",
            craft(&[plain(0x77, b"x"), info_section()]),
        ),
        ("second INFO", craft(&[info_section(), info_section()])),
        (
            "outside a map",
            craft(&[info_section(), entries(0, &[], &[])]),
        ),
        (
            "no open map",
            craft(&[info_section(), plain(kind::MAP_END, &0u64.to_le_bytes())]),
        ),
        (
            "cannot nest",
            craft(&[info_section(), map_begin(&m), map_begin(&m)]),
        ),
        (
            "BTF section inside map",
            craft(&[info_section(), map_begin(&m), plain(kind::BTF, b"btf")]),
        ),
        ("still open", craft(&[info_section(), map_begin(&m)])),
        (
            "says 2 entries",
            craft(&[
                info_section(),
                map_begin(&m),
                entries(1, &[0; 4], &[0; 4]),
                plain(kind::MAP_END, &2u64.to_le_bytes()),
            ]),
        ),
        (
            "must be 8",
            craft(&[info_section(), map_begin(&m), plain(kind::MAP_END, &[0; 4])]),
        ),
        (
            "not 4 +",
            craft(&[info_section(), map_begin(&m), entries(2, &[0; 4], &[0; 4])]),
        ),
        (
            "refers to BTF section 0",
            craft(&[
                info_section(),
                map_begin(&MapMeta {
                    btf: Some(BtfRef {
                        index: 0,
                        key_type_id: 1,
                        value_type_id: 1,
                    }),
                    ..m.clone()
                }),
            ]),
        ),
        (
            "inner template",
            craft(&[
                info_section(),
                map_begin(&MapMeta {
                    inner_template: Some(0),
                    ..m.clone()
                }),
            ]),
        ),
        (
            "0-byte keys",
            craft(&[info_section(), map_begin(&meta("z", map_type::QUEUE, 0, 0))]),
        ),
        (
            "does not fit in memory",
            craft(&[
                info_section(),
                map_begin(&meta("p", map_type::PERCPU_HASH, 4, u32::MAX)),
            ]),
        ),
        (
            "bits this version does not define",
            craft(&[info_section(), section(kind::BTF, 2, b"btf", 3)]),
        ),
        (
            "must be equal",
            craft(&[info_section(), section(kind::BTF, 0, b"btf", 4)]),
        ),
        (
            "does not decompress",
            craft(&[
                info_section(),
                section(kind::BTF, FLAG_ZSTD, b"not zstd", 100),
            ]),
        ),
        (
            "decompresses to 3 bytes",
            craft(&[
                info_section(),
                section(
                    kind::BTF,
                    FLAG_ZSTD,
                    &zstd::bulk::compress(b"btf", 1).expect("zstd"),
                    10,
                ),
            ]),
        ),
    ];
    for (want, bytes) in cases {
        let err = read_err(&bytes);
        assert!(
            matches!(err, FormatError::Malformed { .. }) && err.to_string().contains(want),
            "want {want:?}, got: {err}"
        );
        let err = verify(bytes.as_slice()).expect_err(want);
        assert!(
            matches!(err, FormatError::Malformed { .. }),
            "verify {want}: {err}"
        );
    }

    // Verify derives counts from raw_len, so it catches a non-multiple without decompressing.
    let bytes = craft(&[info_section(), map_begin(&m), entries(1, &[0; 4], &[0; 5])]);
    assert!(matches!(
        verify(bytes.as_slice()),
        Err(FormatError::Malformed { .. })
    ));

    // Trailer rules: compressed, wrong length, trailing data.
    let mut f = file_header(VERSION);
    f.extend_from_slice(&info_section());
    let sha: [u8; 32] = Sha256::digest(&f).into();
    let mut compressed = f.clone();
    compressed.extend_from_slice(&section(kind::TRAILER, FLAG_ZSTD, &sha, 32));
    assert!(read_err(&compressed).to_string().contains("compressed"));
    let mut short = f.clone();
    short.extend_from_slice(&plain(kind::TRAILER, &sha[..31]));
    assert!(read_err(&short).to_string().contains("must be 32"));
    let mut trailing = craft(&[info_section()]);
    let end = trailing.len();
    trailing.push(0);
    let err = read_err(&trailing);
    assert!(
        matches!(err, FormatError::Malformed { offset, .. } if offset == end as u64),
        "{err}"
    );
}

#[test]
fn err_too_large() {
    let mut f = file_header(VERSION);
    f.extend_from_slice(&info_section());
    let off = f.len() as u64;
    let mut h = Vec::new();
    h.extend_from_slice(&kind::ENTRIES.to_le_bytes());
    h.extend_from_slice(&FLAG_ZSTD.to_le_bytes());
    h.extend_from_slice(&100u32.to_le_bytes());
    h.extend_from_slice(&(MAX_SECTION_LEN + 1).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&h);
    let err = read_err(&f);
    assert!(
        matches!(err, FormatError::TooLarge { offset, len } if offset == off && len == u64::from(MAX_SECTION_LEN) + 1),
        "{err}"
    );
}

#[test]
fn err_json() {
    let bytes = craft(&[plain(kind::INFO, b"{not json")]);
    let err = read_err(&bytes);
    assert!(matches!(err, FormatError::Json { offset: 16, .. }), "{err}");
    let bytes = craft(&[info_section(), plain(kind::MAP_BEGIN, b"{\"name\":1}")]);
    assert!(matches!(read_err(&bytes), FormatError::Json { .. }));
}

#[test]
fn err_usage() {
    let opts = WriterOptions::default();
    fn usage<T>(r: Result<T, FormatError>) -> bool {
        matches!(r, Err(FormatError::Usage(_)))
    }
    let mut w = SnapshotWriter::new(Vec::new(), &info(), opts).expect("new");
    assert!(usage(w.write_entries(1, &[0; 4], &[0; 4])));
    assert!(usage(w.end_map()));
    let mut bad = meta("m", map_type::HASH, 4, 4);
    bad.btf = Some(BtfRef {
        index: 0,
        key_type_id: 1,
        value_type_id: 1,
    });
    assert!(usage(w.begin_map(&bad)));
    bad.btf = None;
    bad.inner_template = Some(0);
    assert!(usage(w.begin_map(&bad)));
    assert!(usage(w.begin_map(&meta("z", map_type::QUEUE, 0, 0))));
    w.begin_map(&meta("m", map_type::HASH, 4, 4))
        .expect("begin");
    assert!(usage(w.begin_map(&meta("m2", map_type::HASH, 4, 4))));
    assert!(usage(w.add_btf(b"x")));
    assert!(usage(w.write_entries(2, &[0; 4], &[0; 8])));
    assert!(usage(w.write_entries(usize::MAX, &[], &[])));
    // Misuse writes nothing, so the stream is still valid afterwards.
    w.write_entries(1, &[1; 4], &[2; 4]).expect("entries");
    assert_eq!(w.end_map().expect("end"), 1);
    let (bytes, _) = w.finish().expect("finish");
    assert_eq!(verify(bytes.as_slice()).expect("verify").maps[0].1, 1);

    let mut w = SnapshotWriter::new(Vec::new(), &info(), opts).expect("new");
    w.begin_map(&meta("m", map_type::HASH, 4, 4))
        .expect("begin");
    assert!(usage(w.finish()));

    assert!(usage(EntryChunk::new(4, 4, 1, vec![0; 4], vec![0; 3])));
}

#[test]
fn entry_wider_than_chunk_still_written_one_per_section() {
    let mut w = SnapshotWriter::new(
        Vec::new(),
        &info(),
        WriterOptions {
            zstd_level: 1,
            chunk_bytes: 0,
        },
    )
    .expect("new");
    w.begin_map(&meta("m", map_type::HASH, 8, 100))
        .expect("begin");
    w.write_entries(3, &[1; 24], &[2; 300]).expect("entries");
    w.end_map().expect("end");
    let (bytes, _) = w.finish().expect("finish");
    let counts: Vec<usize> = read_all(&bytes)
        .expect("read")
        .into_iter()
        .filter_map(|e| match e {
            Event::Entries(c) => Some(c.count),
            _ => None,
        })
        .collect();
    assert_eq!(counts, [1, 1, 1]);
}

fn clocks() -> crate::clocks::ClockSample {
    crate::clocks::ClockSample {
        monotonic_ns: 5_000_000_000,
        boottime_ns: 6_000_000_000,
        realtime_ns: 1_700_000_000_000_000_000,
        tai_ns: 1_700_000_037_000_000_000,
        jiffies: Some(4_295_000_000),
        hz: Some(250),
        uncertainty_ns: 120,
    }
}

#[test]
fn clocks_round_trip_and_verify() {
    let mut w = SnapshotWriter::new(Vec::new(), &info(), WriterOptions::default()).expect("new");
    w.add_clocks(&clocks()).expect("clocks");
    w.begin_map(&meta("m", map_type::HASH, 4, 4))
        .expect("begin");
    w.write_entries(1, &[1, 0, 0, 0], &[2, 0, 0, 0])
        .expect("entries");
    w.end_map().expect("end");
    let (bytes, _) = w.finish().expect("finish");

    let mut r = SnapshotReader::new(bytes.as_slice()).expect("reader");
    assert_eq!(r.clocks(), None);
    let mut seen_before_map = None;
    while let Some(e) = r.next_event().expect("event") {
        if let Event::MapBegin { .. } = e {
            seen_before_map = Some(r.clocks().copied());
        }
    }
    assert_eq!(seen_before_map, Some(Some(clocks())));
    // The events are those of a snapshot without clocks: older consumers see no change.
    assert_eq!(read_all(&bytes).expect("events").len(), 5);
    assert_eq!(
        verify(bytes.as_slice()).expect("verify").clocks,
        Some(clocks())
    );
}

#[test]
fn snapshot_without_clocks_reads() {
    let m = meta("m", map_type::HASH, 4, 4);
    let bytes = craft(&[
        info_section(),
        map_begin(&m),
        plain(kind::MAP_END, &0u64.to_le_bytes()),
    ]);
    assert_eq!(verify(bytes.as_slice()).expect("verify").clocks, None);
    assert_eq!(read_all(&bytes).expect("events").len(), 4);
}

#[test]
fn clocks_must_come_once_before_maps() {
    let m = meta("m", map_type::HASH, 4, 4);
    let c = plain(kind::CLOCKS, &serde_json::to_vec(&clocks()).expect("json"));
    let end = plain(kind::MAP_END, &0u64.to_le_bytes());
    let late = craft(&[info_section(), map_begin(&m), end.clone(), c.clone()]);
    assert!(read_err(&late).to_string().contains("after a MAP_BEGIN"));
    let twice = craft(&[info_section(), c.clone(), c.clone()]);
    assert!(read_err(&twice).to_string().contains("second CLOCKS"));

    let mut w = SnapshotWriter::new(Vec::new(), &info(), WriterOptions::default()).expect("new");
    w.begin_map(&m).expect("begin");
    w.end_map().expect("end");
    assert!(matches!(
        w.add_clocks(&clocks()),
        Err(FormatError::Usage(_))
    ));
}
