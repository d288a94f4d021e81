//! Criterion benchmarks of the snapshot codec alone (no kernel): writing and reading
//! 100K hash-shaped entries (4-byte keys, 64-byte values) through zstd, CRC32C and SHA-256.
//!
//! `cargo bench -p mapsnap --bench codec`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mapsnap::format::{Event, SnapshotReader, SnapshotWriter, WriterOptions, verify};
use mapsnap::model::{MapMeta, SnapshotInfo, map_type};

const N: usize = 100_000;

fn meta() -> MapMeta {
    MapMeta {
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
    }
}

/// Keys 0..N; values like a counter table (first 8 bytes vary, the rest mostly zero).
fn columns() -> (Vec<u8>, Vec<u8>) {
    let mut keys = Vec::with_capacity(N * 4);
    let mut values = vec![0u8; N * 64];
    for i in 0..N {
        keys.extend_from_slice(&(i as u32).to_le_bytes());
        values[i * 64..i * 64 + 8].copy_from_slice(&((i as u64) * 1_000_003).to_le_bytes());
    }
    (keys, values)
}

fn write(keys: &[u8], values: &[u8]) -> Vec<u8> {
    let mut w = SnapshotWriter::new(
        Vec::new(),
        &SnapshotInfo::default(),
        WriterOptions::default(),
    )
    .expect("writer");
    w.begin_map(&meta()).expect("begin");
    // Batches the size the dump hands over (about one 1 MiB chunk).
    let per = 15_000;
    for start in (0..N).step_by(per) {
        let end = (start + per).min(N);
        w.write_entries(
            end - start,
            &keys[start * 4..end * 4],
            &values[start * 64..end * 64],
        )
        .expect("entries");
    }
    w.end_map().expect("end");
    w.finish().expect("finish").0
}

fn codec(c: &mut Criterion) {
    let (keys, values) = columns();
    let snap = write(&keys, &values);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes((keys.len() + values.len()) as u64));
    g.bench_function("write 100K entries", |b| {
        b.iter(|| black_box(write(&keys, &values)))
    });
    g.bench_function("read 100K entries", |b| {
        b.iter(|| {
            let mut r = SnapshotReader::new(snap.as_slice()).expect("reader");
            let mut n = 0usize;
            while let Some(ev) = r.next_event().expect("event") {
                if let Event::Entries(chunk) = ev {
                    n += chunk.count;
                }
            }
            black_box(n)
        })
    });
    g.bench_function("verify 100K entries", |b| {
        b.iter(|| black_box(verify(snap.as_slice()).expect("verify")))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
