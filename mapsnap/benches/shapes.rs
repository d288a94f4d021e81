//! The small per-CPU hash other BPF libraries benchmark their batch reads on (1000 entries,
//! 8-byte keys and values): the time of one full dump in process, where start-up does not
//! hide it. Prints JSON lines; `bench/bench.py` runs it beside the C `lookup_batch` loop of
//! bench/anchors on the same machine. Needs root (it creates and pins a map).
//!
//! `cargo bench -p mapsnap --bench shapes [-- ENTRIES DUMPS]`

use std::path::PathBuf;
use std::time::Instant;

use mapsnap::discover::{self, Source};
use mapsnap::dump::{self, DumpOptions};
use mapsnap::model::{SnapshotInfo, map_type, round_up8};
use mapsnap::progress::NoProgress;
use mapsnap::sys::{CreateAttrs, Map, possible_cpus};

fn report(op: &str, n: usize, dumps: u32, secs: f64) {
    let per = secs / f64::from(dumps);
    println!(
        "{{\"op\":\"{op}\",\"entries\":{n},\"dumps\":{dumps},\"seconds_per_dump\":{per:.9},\"ns_per_entry\":{:.1}}}",
        per * 1e9 / n as f64
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args.first().map_or(Ok(1000), |a| a.parse())?;
    let dumps: u32 = args.get(1).map_or(Ok(2000), |a| a.parse())?;
    let cpus = possible_cpus()? as usize;
    let vl = round_up8(8) as usize * cpus;
    let map = Map::create(&CreateAttrs {
        map_type: map_type::PERCPU_HASH,
        name: "shapes",
        key_size: 8,
        value_size: 8,
        max_entries: n as u32,
        ..Default::default()
    })?;
    let keys: Vec<u8> = (0..n as u64).flat_map(u64::to_ne_bytes).collect();
    let mut values = vec![0u8; n * vl];
    for i in 0..n {
        values[i * vl..i * vl + 8].copy_from_slice(&(i as u64).to_ne_bytes());
    }
    map.update_batch(&keys, &values, n as u32, 0)
        .map_err(|(_, e)| e)?;
    let dir = PathBuf::from(format!("/sys/fs/bpf/mapsnap-shapes-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pin = dir.join("m");
    map.pin(&pin)?;
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let meta = dump::meta_of(&map.info()?, false, None)?;
        // The batch read alone: what the C loop does, through mapsnap's syscall layer.
        let mut sink = |_: usize, k: &[u8], v: &[u8]| {
            std::hint::black_box((k, v));
            Ok(())
        };
        for _ in 0..dumps / 10 {
            dump::read_entries_parallel(&map, &meta, 4096, 1, &mut sink)?;
        }
        let t = Instant::now();
        for _ in 0..dumps {
            dump::read_entries_parallel(&map, &meta, 4096, 1, &mut sink)?;
        }
        report("mapsnap batch read", n, dumps, t.elapsed().as_secs_f64());
        // A whole snapshot in memory: read, zstd, CRC32C, SHA-256, the format's framing.
        let found = discover::find(&[Source::Pin(pin.clone())])?;
        let info = SnapshotInfo {
            tool: "shapes".into(),
            possible_cpus: cpus as u32,
            ..Default::default()
        };
        let opts = DumpOptions {
            threads: 1,
            ..DumpOptions::default()
        };
        for _ in 0..dumps / 10 {
            dump::dump(&found, Vec::new(), &info, &opts, &NoProgress)?;
        }
        let t = Instant::now();
        for _ in 0..dumps {
            std::hint::black_box(dump::dump(&found, Vec::new(), &info, &opts, &NoProgress)?);
        }
        report(
            "mapsnap dump (in memory)",
            n,
            dumps,
            t.elapsed().as_secs_f64(),
        );
        Ok(())
    };
    let r = run();
    let _ = std::fs::remove_file(&pin);
    let _ = std::fs::remove_dir(&dir);
    r
}
