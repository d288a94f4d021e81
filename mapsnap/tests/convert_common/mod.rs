//! Helpers shared by the conversion tests (`mod convert_common;`).

#![allow(dead_code, clippy::unwrap_used)]

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
