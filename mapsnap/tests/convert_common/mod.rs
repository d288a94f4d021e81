//! Helpers shared by the conversion tests (`mod convert_common;`).

#![allow(dead_code, clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use mapsnap::{
    clocks::ClockSample,
    dump::{DumpOptions, dump},
    format::{Event, SnapshotReader, SnapshotWriter, WriterOptions},
    model::SnapshotInfo,
    progress::NoProgress,
    sys::Map,
};

/// A snapshot of these maps, written by the library's dump path (so with its clocks).
pub fn dump_maps(maps: &[&Map]) -> Vec<u8> {
    let found: Vec<_> = maps
        .iter()
        .map(|m| mapsnap::discover::Found::from_map(m.try_clone().unwrap(), None).unwrap())
        .collect();
    let (out, _) = dump(
        &found,
        Vec::new(),
        &SnapshotInfo::default(),
        &DumpOptions::default(),
        &NoProgress,
    )
    .unwrap();
    out
}

/// The clocks a snapshot recorded.
pub fn recorded_clocks(snapshot: &[u8]) -> Option<ClockSample> {
    mapsnap::format::verify(snapshot).unwrap().clocks
}

/// Rewrites a snapshot through the library's writer with its clock record changed by
/// `edit_clocks` and every value changed by `edit_value(map name, value)`: how a test makes
/// a snapshot look as if it came from another host.
pub fn rewrite(
    snapshot: &[u8],
    edit_clocks: &dyn Fn(&mut ClockSample),
    edit_value: &dyn Fn(&str, &mut [u8]),
) -> Vec<u8> {
    let mut r = SnapshotReader::new(snapshot).unwrap();
    let Some(Event::Info(info)) = r.next_event().unwrap() else {
        panic!("a snapshot starts with INFO");
    };
    let mut w = SnapshotWriter::new(Vec::new(), &info, WriterOptions::default()).unwrap();
    let mut clocks_done = false;
    let mut name = String::new();
    while let Some(e) = r.next_event().unwrap() {
        // The reader has passed the CLOCKS section before any BTF or map event.
        if !clocks_done {
            if let Some(c) = r.clocks() {
                let mut c = *c;
                edit_clocks(&mut c);
                w.add_clocks(&c).unwrap();
            }
            clocks_done = true;
        }
        match e {
            Event::Btf { blob, .. } => {
                w.add_btf(&blob).unwrap();
            }
            Event::MapBegin { meta, .. } => {
                name = meta.name.clone();
                w.begin_map(&meta).unwrap();
            }
            Event::Entries(mut chunk) => {
                let vl = chunk.value_len();
                for v in chunk.values.chunks_exact_mut(vl) {
                    edit_value(&name, v);
                }
                w.write_entries(chunk.count, &chunk.keys, &chunk.values)
                    .unwrap();
            }
            Event::MapEnd { .. } => {
                w.end_map().unwrap();
            }
            Event::End(_) => break,
            Event::Info(_) => unreachable!(),
        }
    }
    w.finish().unwrap().0
}

const SRC_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/bpf/convert");

/// Compile `tests/bpf/convert/<name>.bpf.c` (with `-g` unless `debug` is false) into
/// CARGO_TARGET_TMPDIR and return the object's bytes.
pub fn object(name: &str, debug: bool) -> Vec<u8> {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(out_dir).unwrap();
    let suffix = if debug { "" } else { ".nodebug" };
    let out: PathBuf = out_dir.join(format!("convert-{name}{suffix}.{}.o", std::process::id()));
    let clang = std::env::var_os("CLANG").unwrap_or_else(|| "clang".into());
    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-Wall", "-Werror", "-target", "bpf"]);
    if debug {
        cmd.arg("-g");
    }
    let output = cmd
        .arg(format!(
            "-I/usr/include/{}-linux-gnu",
            std::env::consts::ARCH
        ))
        .arg("-c")
        .arg(format!("{SRC_DIR}/{name}.bpf.c"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {clang:?} (run `make deps`): {e}"));
    assert!(
        output.status.success(),
        "clang failed on {name}.bpf.c:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    bytes
}
