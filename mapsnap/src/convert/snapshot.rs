//! Converting a whole snapshot to new BTF types (`mapsnap convert --to-btf`), writing a new
//! snapshot whose maps have the new layouts, to be restored later with a plain restore.

use std::io::{Read, Write};

use super::{BtfGraph, MapConversion, MapTypes, RestoreConversion};
use crate::error::{Error, Result};
use crate::format::{Event, SnapshotReader, SnapshotWriter, WriterOptions};
use crate::limits::Limits;
use crate::model::BtfRef;

/// Where the new types come from.
#[derive(Debug, Clone)]
pub enum TargetBtf {
    /// An object's `.BTF` ([`super::btf_from_elf`]): every snapshot map converts to the
    /// object's BTF-defined map of the same name; maps the object does not define are
    /// copied as they are.
    Object(Vec<u8>),
    /// One map's BTF (a pinned map's, from the kernel): the snapshot's only top-level map,
    /// or the one named by `select`, converts to it; the others are copied.
    Map {
        btf: Vec<u8>,
        key_type_id: u32,
        value_type_id: u32,
    },
}

/// One map of a converted snapshot.
#[derive(Debug)]
pub struct ConvertedMap {
    pub name: String,
    /// `None`: copied as it is (not in the target, or already of the target's layout).
    pub conversion: Option<MapConversion>,
    pub entries: u64,
}

/// Reads the snapshot `source`, converts the maps `target` has types for, and writes the
/// result to `out` (clocks, other maps and their BTF are carried over; converted maps refer
/// to the target's BTF). Timestamps are not rebased here: that happens when the converted
/// snapshot is restored, against the clocks it carries. Write to a scratch sink first to
/// find every refusal before creating a file (the command line does).
pub fn convert_snapshot<R: Read, W: Write>(
    source: R,
    target: &TargetBtf,
    select: Option<&str>,
    conv: &RestoreConversion,
    out: W,
    limits: &Limits,
) -> Result<(W, Vec<ConvertedMap>)> {
    let fail = |map: &str, reason: String| Error::Restore {
        map: map.to_string(),
        reason,
    };
    if !conv.key.rebase.is_empty() || !conv.value.rebase.is_empty() {
        return Err(fail(
            "convert",
            "--rebase applies when a snapshot is restored (against the restoring host's clocks), \
             not when it is converted"
                .into(),
        ));
    }
    let conv = RestoreConversion {
        convert: true,
        ..conv.clone()
    };
    let (blob, graph) = match target {
        TargetBtf::Object(b) | TargetBtf::Map { btf: b, .. } => (
            b.as_slice(),
            BtfGraph::parse(b).map_err(|e| fail("target BTF", e.to_string()))?,
        ),
    };
    let mut reader = SnapshotReader::with_limits(source, limits)?;
    let Some(Event::Info(info)) = reader.next_event()? else {
        return Err(fail("snapshot", "it does not start with INFO".into()));
    };
    let mut w = SnapshotWriter::new(out, &info, WriterOptions::default())?;
    let mut clocks_done = false;
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    let mut target_index: Option<u32> = None;
    let mut done: Vec<ConvertedMap> = Vec::new();
    let mut current: Option<usize> = None;
    let mut top_level = 0usize;
    loop {
        let Some(event) = reader.next_event()? else {
            return Err(fail(
                "snapshot",
                "the stream ended without its trailer".into(),
            ));
        };
        if !clocks_done {
            if let Some(c) = reader.clocks() {
                w.add_clocks(c)?;
            }
            clocks_done = true;
        }
        match event {
            Event::Btf { blob, .. } => {
                w.add_btf(&blob)?;
                blobs.push(blob);
            }
            Event::MapBegin { meta, .. } => {
                let label = format!("snapshot map {:?}", meta.name);
                let wanted: Option<(u32, u32)> = match target {
                    _ if meta.inner => None,
                    TargetBtf::Object(_) => graph.map_types(&meta.name).ok(),
                    TargetBtf::Map {
                        key_type_id,
                        value_type_id,
                        ..
                    } => {
                        top_level += 1;
                        let chosen = match select {
                            Some(s) => meta.name == s || meta.pin_path.as_deref() == Some(s),
                            None => true,
                        };
                        if chosen && select.is_none() && top_level > 1 {
                            return Err(fail(
                                "convert",
                                "the snapshot holds several maps: say which one converts to \
                                 the pinned map's types (--map NAME)"
                                    .into(),
                            ));
                        }
                        chosen.then_some((*key_type_id, *value_type_id))
                    }
                };
                let mut new_meta = meta.clone();
                let mut conversion = None;
                if let Some((key_type_id, value_type_id)) = wanted {
                    let from = meta.btf.as_ref().and_then(|b| {
                        Some(MapTypes {
                            btf: blobs.get(b.index as usize)?,
                            key_type_id: b.key_type_id,
                            value_type_id: b.value_type_id,
                        })
                    });
                    let to = MapTypes {
                        btf: blob,
                        key_type_id,
                        value_type_id,
                    };
                    if from.is_none() {
                        return Err(fail(
                            &label,
                            "it has no BTF in the snapshot, so its entries cannot be converted"
                                .into(),
                        ));
                    }
                    let planned = MapConversion::plan(&meta, from, Some(to), &conv, None, false)
                        .map_err(|e| fail(&label, e.to_string()))?;
                    if let Some(p) = &planned {
                        new_meta = p.target_meta(&meta);
                    }
                    let index = match target_index {
                        Some(i) => i,
                        None => {
                            let i = w.add_btf(blob)?;
                            target_index = Some(i);
                            i
                        }
                    };
                    new_meta.btf = Some(BtfRef {
                        index,
                        key_type_id,
                        value_type_id,
                    });
                    conversion = planned;
                }
                w.begin_map(&new_meta)?;
                done.push(ConvertedMap {
                    name: meta.name.clone(),
                    conversion,
                    entries: 0,
                });
                current = Some(done.len() - 1);
            }
            Event::Entries(chunk) => {
                let Some(m) = current.and_then(|i| done.get_mut(i)) else {
                    continue;
                };
                match &mut m.conversion {
                    Some(p) => {
                        let c = p.convert_chunk(&chunk).map_err(|e| {
                            fail(
                                &format!("snapshot map {:?}", m.name),
                                format!("converting an entry failed: {e}"),
                            )
                        })?;
                        w.write_entries(c.count, &c.keys, &c.values)?;
                    }
                    None => w.write_entries(chunk.count, &chunk.keys, &chunk.values)?,
                }
                m.entries += chunk.count as u64;
                reader.recycle(chunk);
            }
            Event::MapEnd { .. } => {
                w.end_map()?;
                current = None;
            }
            Event::End(_) => break,
            Event::Info(_) => {}
        }
    }
    if target_index.is_none() {
        return Err(fail(
            "convert",
            match target {
                TargetBtf::Object(_) => {
                    "no map of the snapshot has a BTF-defined map of the same name in the object"
                        .into()
                }
                TargetBtf::Map { .. } => format!(
                    "no map named {:?} in the snapshot",
                    select.unwrap_or_default()
                ),
            },
        ));
    }
    conv.check_used(done.iter().filter_map(|m| m.conversion.as_ref()))
        .map_err(|e| fail("convert", e.to_string()))?;
    let (out, _) = w.finish()?;
    Ok((out, done))
}
